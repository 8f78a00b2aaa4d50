#!/usr/bin/env bash
# A real Kubernetes node on this machine, for running corescale's chart from its images:
# the e2e/cluster control plane (started with --node-ip) plus containerd (Debian's, with
# runc), a kubelet, kube-scheduler and kube-proxy, all as processes of this run dir.
#
#   - containerd: own config, root, state and socket under DIR/containerd; runc v2 with
#     cgroupfs; sandbox image localhost/corescale/pause:3.10 (e2e/node/images.sh).
#   - network: a bridge (default csnode0, 10.217.0.1/24) made here and used by the CNI
#     bridge plugin (no masquerade: pods talk only to this machine). The node's IP is
#     the bridge's; the API server stays on 127.0.0.1 and socat forwards NODE_IP:port to
#     it, so pods reach it through service "kubernetes" (kube-proxy, iptables mode).
#   - kubelet: client certificate system:node:<name> signed by the cluster CA, serving
#     certificate for the node IP, Webhook authentication and authorization, cgroupfs,
#     failCgroupV1: false (these hosts run hybrid cgroups v1), image GC at 95/90 %.
#   - the sysctls the kubelet and the bridge plugin change are put back (DIR/sysctl.saved,
#     restored again by down.sh).
#
# Usage: up.sh [--dir DIR]   (default DIR: e2e/.run/node)
# The node gets only the pause image here; `make images` (e2e/node/images.sh --load)
# builds corescale's images and loads them into its containerd.
# Env: CORESCALE_NODE_NAME (corescale-node-1), CORESCALE_NODE_BRIDGE (csnode0),
#      CORESCALE_NODE_SUBNET (10.217.0.0/24), CORESCALE_START_TIMEOUT (120)
# Writes DIR/env (sources the cluster's env too). Stop with down.sh --dir DIR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/node"
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "up.sh: unknown argument '$1'" >&2; exit 2 ;;
	esac
done
log() { echo "node/up.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (containerd, kubelet, bridges)"
for t in containerd containerd-shim-runc-v2 runc ctr iptables conntrack socat ip openssl python3; do
	command -v "$t" >/dev/null || die "'$t' is missing: run 'bash scripts/install-deps.sh'"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
	die "CNI plugins missing in /usr/lib/cni: run 'bash scripts/install-deps.sh' (containernetworking-plugins)"

name="${CORESCALE_NODE_NAME:-corescale-node-1}"
bridge="${CORESCALE_NODE_BRIDGE:-csnode0}"
subnet="${CORESCALE_NODE_SUBNET:-10.217.0.0/24}"
timeout_s="${CORESCALE_START_TIMEOUT:-120}"
read -r node_ip prefix < <(python3 -c 'import ipaddress,sys; n=ipaddress.ip_network(sys.argv[1]); print(n[1], n.prefixlen)' "$subnet") ||
	die "CORESCALE_NODE_SUBNET '$subnet' is not a CIDR"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if compgen -G "$dir/run/*.pid" >/dev/null; then
	log "stale node state in $dir: running down.sh first"
	"$here/down.sh" --dir "$dir"
fi
mkdir -p "$dir/run" "$dir/logs" "$dir/pki"
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

on_exit() {
	local rc=$?
	if [[ $rc -ne 0 ]]; then
		log "start failed (exit $rc): tearing down (logs stay in $dir/logs)"
		"$here/down.sh" --dir "$dir" || true
	fi
}
trap on_exit EXIT

start() { # name binary args...
	local name="$1"
	shift
	setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
	echo "$!" >"$dir/run/$name.pid"
	echo "$1" >"$dir/run/$name.exe"
}
alive() { kill -0 "$1" 2>/dev/null; }
wait_until() { # what pid-name command...
	local what="$1" pname="$2" deadline=$(($(date +%s) + timeout_s))
	shift 2
	until "$@" >/dev/null 2>&1; do
		if [[ -n "$pname" ]] && ! alive "$(cat "$dir/run/$pname.pid")"; then
			tail -n 30 "$dir/logs/$pname.log" >&2
			die "$pname exited while waiting for $what"
		fi
		[[ $(date +%s) -lt $deadline ]] || {
			[[ -z "$pname" ]] || tail -n 30 "$dir/logs/$pname.log" >&2
			die "$what not after ${timeout_s}s"
		}
		sleep 0.3
	done
}

# --- sysctls we may change: saved once, restored by down.sh ----------------------------
sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward
	net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
	net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
	net.netfilter.nf_conntrack_tcp_timeout_close_wait kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
if [[ ! -f "$dir/sysctl.saved" ]]; then
	for k in "${sysctls[@]}"; do
		f="/proc/sys/${k//.//}"
		[[ -f "$f" ]] && echo "$k=$(cat "$f")"
	done >"$dir/sysctl.saved.tmp"
	mv "$dir/sysctl.saved.tmp" "$dir/sysctl.saved"
fi
restore_sysctls() {
	local kv k v f
	while IFS= read -r kv; do
		k="${kv%%=*}" v="${kv#*=}" f="/proc/sys/${k//.//}"
		if [[ -f "$f" && "$(cat "$f")" != "$v" ]]; then echo "$v" >"$f" 2>/dev/null || true; fi
	done <"$dir/sysctl.saved"
}
# The chart's hostPath state dir: removed by down.sh only if this run created it.
[[ -e /var/lib/corescale ]] || touch "$dir/run/created-var-lib-corescale"

# --- control plane -------------------------------------------------------------------
"$repo/e2e/cluster/up.sh" --dir "$dir/cluster" --node-ip "$node_ip"
# shellcheck disable=SC1091
source "$dir/cluster/env"
kubectl="$CORESCALE_KUBECTL"
kbin="$CORESCALE_KUBE_BIN_DIR"
pki="$dir/pki"
log "control plane up after $(elapsed) s"

# --- bridge and the API server forward -----------------------------------------------
if ! ip link show "$bridge" >/dev/null 2>&1; then
	ip link add "$bridge" type bridge
	echo "$bridge" >"$dir/run/bridge"
fi
ip addr replace "$node_ip/$prefix" dev "$bridge"
ip link set "$bridge" up
start apiserver-forward "$(command -v socat)" \
	"TCP-LISTEN:$CORESCALE_APISERVER_PORT,bind=$node_ip,fork,reuseaddr" "TCP:127.0.0.1:$CORESCALE_APISERVER_PORT"

# --- containerd ----------------------------------------------------------------------
cd_dir="$dir/containerd"
sock="$cd_dir/containerd.sock"
mkdir -p "$cd_dir" "$dir/cni/net.d"
cat >"$dir/cni/net.d/10-corescale.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "corescale-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$subnet", "gateway": "$node_ip"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
cat >"$cd_dir/config.toml" <<TOML
version = 2
root = "$cd_dir/root"
state = "$cd_dir/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$cd_dir/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/corescale/pause:3.10"
  # root lacks CAP_SYS_RESOURCE here: never lower a process's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
TOML
start containerd "$(command -v containerd)" --config "$cd_dir/config.toml"
wait_until "containerd's socket" containerd ctr --address "$sock" version
log "containerd up after $(elapsed) s"

"$here/images.sh" --pause-only --load "$sock" >/dev/null

# --- certificates and kubeconfigs ----------------------------------------------------
ossl() { openssl "$@" 2>>"$dir/logs/openssl.log"; }
sign() { # name subject extfile-content
	printf '%b' "$3" >"$pki/$1.ext"
	ossl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr"
	ossl x509 -req -in "$pki/$1.csr" -CA "$CORESCALE_CA_FILE" -CAkey "$CORESCALE_CA_KEY_FILE" \
		-CAcreateserial -days 365 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
}
client_ext='basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'
sign kubelet-client "/O=system:nodes/CN=system:node:$name" "$client_ext"
sign kubelet-serving "/CN=$name" "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:$node_ip,DNS:$name\n"
sign kube-scheduler "/CN=system:kube-scheduler" "$client_ext"
sign kube-proxy "/CN=system:kube-proxy" "$client_ext"
kubeconfig() { # name user
	cat >"$pki/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$CORESCALE_APISERVER_URL", certificate-authority: "$CORESCALE_CA_FILE"}
users:
- name: $2
  user: {client-certificate: "$pki/$1.crt", client-key: "$pki/$1.key"}
contexts:
- name: local
  context: {cluster: local, user: $2}
current-context: local
EOF
	chmod 600 "$pki/$1.kubeconfig"
}
kubeconfig kubelet-client "system:node:$name"
kubeconfig kube-scheduler system:kube-scheduler
kubeconfig kube-proxy system:kube-proxy
# The API server's kubelet client (e2e/cluster/up.sh --node-ip) may use the kubelet API.
"$kubectl" create clusterrolebinding corescale-apiserver-kubelet-client --clusterrole=system:kubelet-api-admin \
	--user=kube-apiserver-kubelet-client --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null

# --- kubelet -------------------------------------------------------------------------
read -r healthz_port sched_port proxy_health proxy_metrics < <(python3 -c '
import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
mkdir -p "$dir/kubelet" "$dir/pod-logs"
cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$CORESCALE_CA_FILE"}
authorization: {mode: Webhook}
tlsCertFile: "$pki/kubelet-serving.crt"
tlsPrivateKeyFile: "$pki/kubelet-serving.key"
containerRuntimeEndpoint: "unix://$sock"
imageServiceEndpoint: "unix://$sock"
cgroupDriver: cgroupfs
# These hosts run hybrid cgroups (v1): allowed, with a warning.
failCgroupV1: false
podLogsDir: "$dir/pod-logs"
# This machine's disk is shared and 70-97 % full (measured): percentages would put the node
# under DiskPressure (its taint keeps the operator Pending) and let image GC delete the
# locally built images, which no registry can give back. No image GC (100 disables it),
# and eviction only when less than 512Mi are free.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "512Mi", imagefs.available: "512Mi"}
clusterDomain: cluster.local
failSwapOn: false
maxPods: 30
serializeImagePulls: false
EOF
start kubelet "$kbin/kubelet" --config="$dir/kubelet/config.yaml" --kubeconfig="$pki/kubelet-client.kubeconfig" \
	--root-dir="$dir/kubelet/root" --hostname-override="$name" --node-ip="$node_ip" --v=1
wait_until "node $name registered" kubelet "$kubectl" get node "$name"
# The kubelet sets vm.overcommit_memory, kernel.panic and kernel.panic_on_oops as it
# starts (and keeps running when they change back); the bridge plugin sets ip_forward.
sleep 1
restore_sysctls
log "kubelet up after $(elapsed) s"

# --- kube-scheduler and kube-proxy ---------------------------------------------------
cat >"$dir/kube-scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {kubeconfig: "$pki/kube-scheduler.kubeconfig"}
leaderElection: {leaderElect: false}
EOF
start kube-scheduler "$kbin/kube-scheduler" --config="$dir/kube-scheduler.yaml" \
	--bind-address=127.0.0.1 --secure-port="$sched_port" \
	--authentication-kubeconfig="$pki/kube-scheduler.kubeconfig" --authorization-kubeconfig="$pki/kube-scheduler.kubeconfig"
cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$pki/kube-proxy.kubeconfig"}
mode: iptables
hostnameOverride: $name
bindAddress: $node_ip
healthzBindAddress: 127.0.0.1:$proxy_health
metricsBindAddress: 127.0.0.1:$proxy_metrics
clusterCIDR: $subnet
nodePortAddresses: ["$node_ip/32"]
iptables: {localhostNodePorts: false}
# Leave the host's conntrack table size and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
start kube-proxy "$kbin/kube-proxy" --config="$dir/kube-proxy.yaml"
wait_until "kube-scheduler healthy" kube-scheduler curl -fsk "https://127.0.0.1:$sched_port/healthz"
wait_until "kube-proxy healthy" kube-proxy curl -fs "http://127.0.0.1:$proxy_health/healthz"
wait_until "node $name Ready" kubelet "$kubectl" wait --for=condition=Ready "node/$name" --timeout=2s
restore_sysctls

cat >"$dir/env" <<EOF
# Written by e2e/node/up.sh; source it. Stop with: e2e/node/down.sh --dir $dir
source $dir/cluster/env
export CORESCALE_NODE_DIR=$dir
export CORESCALE_NODE_NAME=$name
export CORESCALE_NODE_IP=$node_ip
export CORESCALE_CONTAINERD_SOCKET=$sock
export CONTAINERD_ADDRESS=$sock
export CONTAINERD_NAMESPACE=k8s.io
EOF
trap - EXIT
log "node $name Ready after $(elapsed) s: source $dir/env"
