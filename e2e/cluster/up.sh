#!/usr/bin/env bash
# Start a local Kubernetes control plane for corescale's e2e tests and demo:
# etcd, kube-apiserver and kube-controller-manager as plain processes, all on
# 127.0.0.1, with real authentication (static admin token, service-account
# tokens, x509 client certificates) and RBAC authorization. There is no kubelet,
# no scheduler and no kube-proxy: corescale's operator and node agents run as
# local processes against this API server.
#
# Usage: up.sh [--dir DIR] [--node-ip IP]     (default DIR: e2e/.run/cluster in the repo)
#
# --node-ip IP  prepare the control plane for real kubelet nodes (e2e/node/up.sh): all
#   controllers in kube-controller-manager (unless CORESCALE_KCM_CONTROLLERS says
#   otherwise), Node,RBAC authorization with NodeRestriction, a client certificate for
#   the API server to call kubelets (verified kubelet serving certificates), nodes
#   reached by InternalIP, and IP as the advertised address (the Endpoints of service
#   "kubernetes", kept by the lease reconciler) and in the serving certificate. The API
#   server still listens on 127.0.0.1 only; e2e/node/up.sh forwards IP:port to it.
#
# Writes into DIR:
#   kubeconfig   admin (system:masters) kubeconfig
#   env          sourceable: KUBECONFIG, CORESCALE_APISERVER_URL, ports, pids, paths
#   pki/         CA, serving certificate, front-proxy CA, service-account keys, token file
#   logs/        etcd.log, kube-apiserver.log, kube-controller-manager.log
#   etcd/        etcd data (wiped on every start)
#
# Environment (all optional):
#   CORESCALE_CACHE              where binaries are built/cached (default ~/.cache/corescale)
#   CORESCALE_UP_ETCD_PORT, CORESCALE_UP_ETCD_PEER_PORT, CORESCALE_UP_APISERVER_PORT,
#   CORESCALE_UP_KCM_PORT        fixed ports instead of free ones chosen at start
#                                (not the CORESCALE_*_PORT names that DIR/env exports,
#                                so a shell that sourced one cluster's env can start another)
#   CORESCALE_ETCD_BIN           etcd binary to use (default: built by build-etcd.sh)
#   CORESCALE_SERVICE_CIDR       service cluster IP range (default 10.96.0.0/16)
#   CORESCALE_APISERVER_ARGS, CORESCALE_KCM_ARGS
#                                extra flags (whitespace-separated) for each component
#   CORESCALE_KCM_CONTROLLERS    --controllers of kube-controller-manager
#   CORESCALE_START_TIMEOUT      seconds to wait for each component (default 120)
#
# If the cluster in DIR is already running and ready, up.sh prints so and exits 0.
# Stop it with down.sh --dir DIR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/cluster"
node_ip=""

while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir)
		[[ $# -ge 2 && -n "$2" ]] || {
			echo "up.sh: --dir needs a directory" >&2
			exit 2
		}
		dir="$2"
		shift 2
		;;
	--dir=*)
		dir="${1#--dir=}"
		shift
		;;
	--node-ip)
		[[ $# -ge 2 && "$2" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || {
			echo "up.sh: --node-ip needs an IPv4 address" >&2
			exit 2
		}
		node_ip="$2"
		shift 2
		;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "up.sh: unknown argument '$1' (expected --dir DIR or --node-ip IP)" >&2
		exit 2
		;;
	esac
done

log() { echo "up.sh: $*" >&2; }
die() {
	log "$*"
	exit 1
}

for tool in openssl curl python3; do
	command -v "$tool" >/dev/null 2>&1 || die "'$tool' is missing: run 'bash scripts/install-deps.sh' (or apt-get install $tool)"
done

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
timeout_s="${CORESCALE_START_TIMEOUT:-120}"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "CORESCALE_START_TIMEOUT must be a whole number of seconds, got '$timeout_s'"

# --- already running? ------------------------------------------------------
if [[ -f "$dir/env" ]]; then
	# shellcheck disable=SC1091
	if (
		source "$dir/env"
		# shellcheck disable=SC2153 # set by the sourced env file
		for p in "$CORESCALE_ETCD_PID" "$CORESCALE_APISERVER_PID" "$CORESCALE_KCM_PID"; do
			kill -0 "$p" 2>/dev/null || exit 1
		done
		curl -fsS --max-time 5 --cacert "$CORESCALE_CA_FILE" \
			-H "Authorization: Bearer $(cat "$CORESCALE_ADMIN_TOKEN_FILE")" \
			"$CORESCALE_APISERVER_URL/readyz" >/dev/null
	) 2>/dev/null; then
		log "cluster in $dir is already up (source $dir/env)"
		exit 0
	fi
fi
if compgen -G "$dir/run/*.pid" >/dev/null; then
	log "stale cluster state in $dir: stopping leftovers first"
	"$here/down.sh" --dir "$dir"
fi

# --- binaries --------------------------------------------------------------
if [[ -n "$node_ip" ]]; then
	kube_bin="$("$here/build-kube.sh" --node | tail -n1)"
else
	kube_bin="$("$here/build-kube.sh" | tail -n1)"
fi
if [[ -n "${CORESCALE_ETCD_BIN:-}" ]]; then
	etcd_bin="$CORESCALE_ETCD_BIN"
else
	etcd_bin="$("$here/build-etcd.sh" | tail -n1)/etcd"
fi
[[ -x "$etcd_bin" ]] || die "etcd binary '$etcd_bin' is not executable (CORESCALE_ETCD_BIN)"
apiserver_bin="$kube_bin/kube-apiserver"
kcm_bin="$kube_bin/kube-controller-manager"
kubectl="$kube_bin/kubectl"
kube_version="$("$apiserver_bin" --version | awk '{print $2}')"

# --- ports -----------------------------------------------------------------
# Free ports are chosen by binding port 0 on 127.0.0.1 (all at once, so they
# differ); a fixed port from the environment wins.
free_ports() {
	python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r p1 p2 p3 p4 <<<"$(free_ports 4)"
etcd_port="${CORESCALE_UP_ETCD_PORT:-$p1}"
etcd_peer_port="${CORESCALE_UP_ETCD_PEER_PORT:-$p2}"
apiserver_port="${CORESCALE_UP_APISERVER_PORT:-$p3}"
kcm_port="${CORESCALE_UP_KCM_PORT:-$p4}"
for v in etcd_port etcd_peer_port apiserver_port kcm_port; do
	[[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 && "${!v}" -le 65535 ]] ||
		die "CORESCALE_UP_$(tr '[:lower:]' '[:upper:]' <<<"$v") must be a port number (1-65535), got '${!v}'"
done
service_cidr="${CORESCALE_SERVICE_CIDR:-10.96.0.0/16}"
# The first address of the range is the ClusterIP of service "kubernetes".
first_service_ip="$(python3 -c 'import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1], strict=False)[1])' "$service_cidr" 2>/dev/null)" ||
	die "CORESCALE_SERVICE_CIDR '$service_cidr' is not a valid CIDR"

# --- clean slate -----------------------------------------------------------
rm -rf "$dir/etcd" "$dir/pki" "$dir/logs" "$dir/run" "$dir/kubeconfig" "$dir/env"
mkdir -p "$dir/pki" "$dir/logs" "$dir/run"
chmod 700 "$dir/pki"
pki="$dir/pki"

# If anything below fails, stop what was already started.
started=()
cleanup_on_error() {
	local rc=$?
	if [[ $rc -ne 0 ]]; then
		log "start failed (exit $rc); stopping what was started"
		local pid
		for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
		sleep 1
		for pid in "${started[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
	fi
}
trap cleanup_on_error EXIT

# --- PKI -------------------------------------------------------------------
# Own CA instead of the API server's self-signed certificate: the admin
# kubeconfig, kube-controller-manager (--root-ca-file, published to every
# namespace as kube-root-ca.crt) and client-certificate users all need one CA.
t_start=$(date +%s.%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
ossl() { openssl "$@" 2>>"$dir/logs/openssl.log"; }
ossl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=corescale-e2e-ca" \
	-keyout "$pki/ca.key" -out "$pki/ca.crt"
cat >"$pki/serving.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:$first_service_ip,${node_ip:+IP:$node_ip,}DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
ossl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
	-keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
ossl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
	-days 3650 -extfile "$pki/serving.ext" -out "$pki/apiserver.crt"
# Front proxy (aggregation layer): lets APIService backends such as a metrics
# adapter authenticate requests the API server forwards to them.
ossl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=corescale-e2e-front-proxy-ca" \
	-keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$pki/client.ext"
ossl req -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" \
	-keyout "$pki/front-proxy-client.key" -out "$pki/front-proxy-client.csr"
ossl x509 -req -in "$pki/front-proxy-client.csr" -CA "$pki/front-proxy-ca.crt" \
	-CAkey "$pki/front-proxy-ca.key" -CAcreateserial -days 3650 -extfile "$pki/client.ext" \
	-out "$pki/front-proxy-client.crt"
# The API server's client certificate towards kubelets (logs, exec, port-forward); the
# kubelets authorize it by Webhook (e2e/node/up.sh binds it to system:kubelet-api-admin).
if [[ -n "$node_ip" ]]; then
	ossl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver-kubelet-client" \
		-keyout "$pki/apiserver-kubelet-client.key" -out "$pki/apiserver-kubelet-client.csr"
	ossl x509 -req -in "$pki/apiserver-kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
		-CAcreateserial -days 3650 -extfile "$pki/client.ext" -out "$pki/apiserver-kubelet-client.crt"
fi
# Service-account token signing keys.
ossl genrsa -out "$pki/sa.key" 2048
ossl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
# Static admin token (user "corescale-admin", group system:masters).
admin_token="$(openssl rand -hex 32)"
umask_old=$(umask)
umask 077
printf '%s\n' "$admin_token" >"$pki/admin.token"
printf '%s,corescale-admin,corescale-admin,"system:masters"\n' "$admin_token" >"$pki/tokens.csv"
umask "$umask_old"
log "PKI generated after $(elapsed) s"

write_kubeconfig() { # file token port
	local ca_data
	ca_data="$(base64 -w0 <"$pki/ca.crt")"
	(
		umask 077
		cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: corescale-e2e
  cluster:
    server: https://127.0.0.1:$3
    certificate-authority-data: $ca_data
users:
- name: corescale-admin
  user:
    token: $2
contexts:
- name: corescale-e2e
  context:
    cluster: corescale-e2e
    user: corescale-admin
current-context: corescale-e2e
EOF
	)
}
write_kubeconfig "$dir/kubeconfig" "$admin_token" "$apiserver_port"

# --- process helpers -------------------------------------------------------
last_pid=""
start() { # name binary args...   (sets last_pid)
	local name="$1"
	shift
	# setsid: own session, so a terminal's Ctrl-C or the caller's process group
	# does not reach it; down.sh stops it by pid.
	setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
	last_pid=$!
	started+=("$last_pid")
	echo "$last_pid" >"$dir/run/$name.pid"
}

wait_for() { # name pid url [curl args...]
	local name="$1" pid="$2" url="$3"
	shift 3
	local deadline=$(($(date +%s) + timeout_s))
	while true; do
		if ! kill -0 "$pid" 2>/dev/null; then
			log "$name exited during start-up; last lines of $dir/logs/$name.log:"
			tail -n 30 "$dir/logs/$name.log" >&2
			return 1
		fi
		if curl -fsS --max-time 5 "$@" "$url" >/dev/null 2>&1; then
			return 0
		fi
		if [[ $(date +%s) -ge $deadline ]]; then
			log "$name not ready at $url after ${timeout_s}s; last lines of $dir/logs/$name.log:"
			tail -n 30 "$dir/logs/$name.log" >&2
			curl -sS --max-time 5 "$@" "$url?verbose" >&2 || true
			return 1
		fi
		sleep 0.2
	done
}

# --- etcd ------------------------------------------------------------------
etcd_url="http://127.0.0.1:$etcd_port"
etcd_args=(
	--name=corescale-e2e
	--data-dir="$dir/etcd"
	--listen-client-urls="$etcd_url"
	--advertise-client-urls="$etcd_url"
	--listen-peer-urls="http://127.0.0.1:$etcd_peer_port"
	--initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port"
	--initial-cluster="corescale-e2e=http://127.0.0.1:$etcd_peer_port"
	--initial-cluster-state=new
	--log-level=warn
)
# A throwaway test cluster does not need durable writes.
if "$etcd_bin" --help 2>&1 | grep -q -- '--unsafe-no-fsync'; then
	etcd_args+=(--unsafe-no-fsync=true)
else
	log "warning: $etcd_bin has no --unsafe-no-fsync (etcd < 3.5); writes will fsync"
fi
start etcd "$etcd_bin" "${etcd_args[@]}"
etcd_pid="$last_pid"
wait_for etcd "$etcd_pid" "$etcd_url/health"
log "etcd ready on 127.0.0.1:$etcd_port after $(elapsed) s"

# --- kube-apiserver --------------------------------------------------------
apiserver_url="https://127.0.0.1:$apiserver_port"
apiserver_args=(
	--etcd-servers="$etcd_url"
	--bind-address=127.0.0.1
	--secure-port="$apiserver_port"
	--advertise-address=127.0.0.1
	--endpoint-reconciler-type=none
	--cert-dir="$pki/apiserver-certs"
	--tls-cert-file="$pki/apiserver.crt"
	--tls-private-key-file="$pki/apiserver.key"
	--client-ca-file="$pki/ca.crt"
	--token-auth-file="$pki/tokens.csv"
	--authorization-mode="${node_ip:+Node,}RBAC"
	--service-account-issuer=https://kubernetes.default.svc.cluster.local
	--service-account-key-file="$pki/sa.pub"
	--service-account-signing-key-file="$pki/sa.key"
	--service-cluster-ip-range="$service_cidr"
	--requestheader-client-ca-file="$pki/front-proxy-ca.crt"
	--requestheader-allowed-names=front-proxy-client
	--requestheader-username-headers=X-Remote-User
	--requestheader-group-headers=X-Remote-Group
	--requestheader-extra-headers-prefix=X-Remote-Extra-
	--proxy-client-cert-file="$pki/front-proxy-client.crt"
	--proxy-client-key-file="$pki/front-proxy-client.key"
	# No --enable-aggregator-routing: an APIService served by a host process (KEDA's
	# metrics server in e2e/cluster/keda.sh) is an ExternalName Service on localhost,
	# which only the ClusterIP resolver follows (endpoints may not be loopback).
	# The chart's node DaemonSet may ask for privileged containers.
	--allow-privileged=true
	--profiling=false
)
if [[ -n "$node_ip" ]]; then
	# Later flags win: these replace the loopback-only ones above.
	apiserver_args+=(
		--advertise-address="$node_ip"
		--endpoint-reconciler-type=lease
		--enable-admission-plugins=NodeRestriction
		--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt"
		--kubelet-client-key="$pki/apiserver-kubelet-client.key"
		--kubelet-certificate-authority="$pki/ca.crt"
		--kubelet-preferred-address-types=InternalIP,Hostname
	)
fi
# shellcheck disable=SC2206
apiserver_args+=(${CORESCALE_APISERVER_ARGS:-})
# CORESCALE_APISERVER_ENV: environment of the kube-apiserver alone, e.g. GOGC=400 (its Go
# garbage collector's target; see docs/benchmarks.md for what it changes at 10,000 VMs).
# shellcheck disable=SC2086
start kube-apiserver env ${CORESCALE_APISERVER_ENV:-} "$apiserver_bin" "${apiserver_args[@]}"
apiserver_pid="$last_pid"
wait_for kube-apiserver "$apiserver_pid" "$apiserver_url/readyz" \
	--cacert "$pki/ca.crt" -H "Authorization: Bearer $admin_token"
log "kube-apiserver $kube_version ready at $apiserver_url after $(elapsed) s"

# --- kube-controller-manager -----------------------------------------------
# Only controllers that make sense without kubelets: service accounts and their
# tokens, kube-root-ca.crt, namespace deletion, garbage collection (owner
# references), aggregated ClusterRoles and the HorizontalPodAutoscaler.
default_controllers="serviceaccount-token-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,namespace-controller,garbage-collector-controller,clusterrole-aggregation-controller,horizontal-pod-autoscaler-controller"
# Real nodes need them all (Deployments, DaemonSets, the node lifecycle, endpoints).
[[ -z "$node_ip" ]] || default_controllers='*'
kcm_controllers="${CORESCALE_KCM_CONTROLLERS:-$default_controllers}"
kcm_args=(
	--kubeconfig="$dir/kubeconfig"
	--authentication-kubeconfig="$dir/kubeconfig"
	--authorization-kubeconfig="$dir/kubeconfig"
	--bind-address=127.0.0.1
	--secure-port="$kcm_port"
	--cert-dir="$pki/kcm-certs"
	--leader-elect=false
	--controllers="$kcm_controllers"
	--service-account-private-key-file="$pki/sa.key"
	--root-ca-file="$pki/ca.crt"
	--service-cluster-ip-range="$service_cidr"
	--horizontal-pod-autoscaler-sync-period=15s
)
# shellcheck disable=SC2206
kcm_args+=(${CORESCALE_KCM_ARGS:-})
start kube-controller-manager "$kcm_bin" "${kcm_args[@]}"
kcm_pid="$last_pid"
wait_for kube-controller-manager "$kcm_pid" "https://127.0.0.1:$kcm_port/healthz" -k
# The serviceaccount controller creating "default" in namespace default shows
# the controllers are really working, not just serving /healthz.
deadline=$(($(date +%s) + timeout_s))
until "$kubectl" --kubeconfig "$dir/kubeconfig" get serviceaccount default -n default >/dev/null 2>&1; do
	kill -0 "$kcm_pid" 2>/dev/null || {
		tail -n 30 "$dir/logs/kube-controller-manager.log" >&2
		die "kube-controller-manager exited"
	}
	[[ $(date +%s) -lt $deadline ]] || die "service account default/default not created after ${timeout_s}s; see $dir/logs/kube-controller-manager.log"
	sleep 0.2
done
log "kube-controller-manager ready after $(elapsed) s"

# --- env -------------------------------------------------------------------
cat >"$dir/env" <<EOF
# Written by e2e/cluster/up.sh; source it. Stop with: e2e/cluster/down.sh --dir $dir
export CORESCALE_CLUSTER_DIR=$dir
export KUBECONFIG=$dir/kubeconfig
# kubectl of the server's version (and the control plane's binaries) first.
export PATH=$kube_bin:\$PATH
export CORESCALE_KUBECTL=$kubectl
export CORESCALE_KUBE_VERSION=$kube_version
export CORESCALE_KUBE_BIN_DIR=$kube_bin
export CORESCALE_APISERVER_URL=$apiserver_url
export CORESCALE_APISERVER_PORT=$apiserver_port
export CORESCALE_CA_FILE=$pki/ca.crt
export CORESCALE_CA_KEY_FILE=$pki/ca.key
export CORESCALE_FRONT_PROXY_CA_FILE=$pki/front-proxy-ca.crt
export CORESCALE_ADMIN_TOKEN_FILE=$pki/admin.token
export CORESCALE_SERVICE_CIDR=$service_cidr
export CORESCALE_NODE_IP=$node_ip
export CORESCALE_ETCD_URL=$etcd_url
export CORESCALE_ETCD_PORT=$etcd_port
export CORESCALE_ETCD_PEER_PORT=$etcd_peer_port
export CORESCALE_KCM_PORT=$kcm_port
export CORESCALE_ETCD_PID=$etcd_pid
export CORESCALE_APISERVER_PID=$apiserver_pid
export CORESCALE_KCM_PID=$kcm_pid
EOF
trap - EXIT
log "cluster up in $(elapsed) s: source $dir/env (KUBECONFIG=$dir/kubeconfig)"
