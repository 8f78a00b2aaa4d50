#!/usr/bin/env bash
# `make node-e2e`: corescale installed with Helm on a real kubelet node, from the
# project's Dockerfile, end to end from a clean state, then everything torn down.
#
#   1. binaries    kubelet, kube-scheduler, kube-proxy (+ the control plane) from Go modules
#   2. node        e2e/node/up.sh: control plane, containerd, kubelet, scheduler, kube-proxy
#   3. images      e2e/node/images.sh: base images, `podman build` of both Dockerfile
#                  targets, loaded into the node's containerd
#   4. helm        `helm install --wait` as README's "Install on a cluster (Helm)" says, image
#                  names overridden to the local tags (pullPolicy Never: nothing is pulled),
#                  KVM off (guests run under TCG here), without README's ServiceMonitor and
#                  PrometheusRule (no Prometheus Operator CRDs here)
#   5. autoscaler e2e/node/autoscaler.sh: Prometheus discovering the chart's pods as its
#                 ServiceMonitors say, KEDA (e2e/cluster/keda.sh) against the node's API server
#   6. scenarios  corescale-node-e2e (e2e/src/node/, one assertion each, in this order):
#                 scale (1 -> 3 -> 1 -> 2, status and the guest's own /sys agree),
#                 launcher-resources (the launcher container's requests, limits and cgroup
#                 CPU quota follow the VM 1 -> 4 -> 2; kubelet Deferred and Infeasible
#                 become the VM's ResizePending), metrics
#                 (scraped from the pods behind the chart's Services), agent-restart (the
#                 agent container SIGKILLed: same QEMU, re-adopted), helm-upgrade
#                 (--wait=legacy to new tags and the node's image directory, OnDelete:
#                 node-vmm pod and guest untouched), pod-delete (guest stopped, booted
#                 again by the new pod), workload (examples/workload.yaml's Debian VM in the
#                 pod: Secret, pod-IP ports, a Service, ssh, console via kubectl exec, a job
#                 over 1 -> 4 vCPUs, disks across the agent's SIGKILL), autoscale (KEDA
#                 scales a VM from its load, Prometheus scraping the pods), helm-uninstall
#                 (what is gone and what remains, as README says)
#   7. teardown   what the scenarios left (VM, release), autoscaler.sh down, e2e/node/down.sh
# Prints the time of each stage. Needs root, the packages of scripts/install-deps.sh and the
# guest images of `make guest` (the node's image directory, scenario workload).
# Starts from a clean node (DIR e2e/.run/node purged: containerd's store too) and purges
# it again on success; caches (binaries, podman's store, cargo's) stay in CORESCALE_CACHE.
#
# Usage: e2e.sh [--keep] [--only NAME[,NAME]]
#   --keep   leave the node and release up for a look; stop it with e2e/node/down.sh
#   --only   run only these scenarios (each starts from where the one before it ended, so
#            keep the ones a scenario needs: `--only scale,launcher-resources`)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/node"
keep=0
only=()
while [[ $# -gt 0 ]]; do
	a="$1"
	shift
	case "$a" in
	--keep) keep=1 ;;
	--only)
		[[ $# -gt 0 ]] || { echo "node-e2e: --only needs NAME[,NAME]" >&2; exit 2; }
		only=(--only "$1")
		shift
		;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "node-e2e: unknown argument '$a'" >&2; exit 2 ;;
	esac
done
log() { echo "node-e2e: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# --- what must be there ----------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "must run as root (containerd, kubelet, bridges, iptables)"
missing=()
for t in containerd runc ctr podman buildah mmdebstrap iptables conntrack socat gcc go cargo rustc python3 openssl; do
	command -v "$t" >/dev/null 2>&1 || [[ $t == go && -x /usr/local/go/bin/go ]] || missing+=("$t")
done
[[ -x /usr/lib/cni/bridge ]] || missing+=("containernetworking-plugins")
[[ ${#missing[@]} -eq 0 ]] || die "missing: ${missing[*]} (system packages: make deps; Go and Rust: see README)"

timings=()
stage_start=0
stage_open=0
begin() { stage_name="$1"; stage_start=$(date +%s.%N); stage_open=1; log "--- $1"; }
end() {
	stage_open=0
	local s
	s="$(awk -v a="$stage_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
	timings+=("$(printf '%-10s %7s s' "$stage_name" "$s")")
	log "$stage_name: ${s} s"
}
summary() {
	log "stage times:"
	local t
	for t in "${timings[@]}"; do echo "  $t" >&2; done
}

ns=corescale-system
vm_ns=default
vm=node-e2e
helm=""
teardown() {
	local rc=$?
	trap - EXIT
	if [[ $stage_open -eq 1 ]]; then
		stage_name="$stage_name FAILED"
		end
	fi
	if [[ $rc -ne 0 && -f "$dir/env" ]]; then
		log "diagnostics (exit $rc):"
		(
			# shellcheck disable=SC1091
			source "$dir/env"
			kubectl get nodes,pods -A -o wide
			kubectl get cvm -A -o wide
			kubectl -n "$ns" describe pods | tail -n 60
			for p in $(kubectl -n "$ns" get pods -o name); do
				for c in $(kubectl -n "$ns" get "$p" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}'); do
					echo "--- $p $c"
					kubectl -n "$ns" logs "$p" -c "$c" --tail=30
				done
			done
			kubectl get events -A --sort-by=.lastTimestamp | tail -n 30
		) >&2 2>&1 || true
	fi
	if [[ $keep -eq 1 ]]; then
		summary
		log "kept up: source $dir/env; stop with e2e/node/down.sh"
		exit "$rc"
	fi
	begin teardown
	"$here/autoscaler.sh" down --dir "$dir" >&2 2>&1 || log "autoscaler.sh down failed; tearing the node down anyway"
	if [[ -f "$dir/env" ]]; then
		(
			# shellcheck disable=SC1091
			source "$dir/env"
			# Scenario helm-uninstall ends with neither; a failure before it leaves both.
			if [[ -n "$helm" ]] && "$helm" status corescale -n "$ns" >/dev/null 2>&1; then
				kubectl -n "$vm_ns" delete cvm "$vm" --ignore-not-found --timeout=60s
				"$helm" uninstall corescale -n "$ns" --wait --timeout 2m
			fi
		) >&2 2>&1 || log "VM delete / helm uninstall failed; tearing the node down anyway"
	fi
	if [[ $rc -eq 0 ]]; then "$here/down.sh" --dir "$dir" --purge; else "$here/down.sh" --dir "$dir"; fi
	end
	summary
	if [[ $rc -eq 0 ]]; then log "PASS"; else log "FAIL (exit $rc): logs in $dir/logs, $dir/cluster/logs"; fi
	exit "$rc"
}

# --- 1. binaries ---------------------------------------------------------------------------
begin binaries
"$repo/e2e/cluster/build-kube.sh" --node >/dev/null
"$repo/e2e/cluster/build-etcd.sh" >/dev/null
helm="$("$repo/e2e/cluster/install-helm.sh" | tail -n1)"
(cd "$repo" && cargo build -q -p corescale-e2e --bin corescale-node-e2e)
scenarios_bin="${CARGO_TARGET_DIR:-$repo/target}/debug/corescale-node-e2e"
end

# --- 2. node -------------------------------------------------------------------------------
trap teardown EXIT
begin node
"$here/down.sh" --dir "$dir" --purge >/dev/null 2>&1 || true # a clean state
"$here/up.sh" --dir "$dir"
# shellcheck disable=SC1091
source "$dir/env"
end

# --- 3. images -----------------------------------------------------------------------------
begin images
mkdir -p "$dir/logs"
log "building (or reusing) the images; progress in $dir/logs/images.log (first build: ~20 min on 2 cores)"
refs="$("$here/images.sh" --load "$CORESCALE_CONTAINERD_SOCKET" 2>"$dir/logs/images.log" | tail -n1)" || {
	tail -n 40 "$dir/logs/images.log" >&2
	die "image build failed (whole log: $dir/logs/images.log)"
}
operator_ref="$(sed -nE 's/.*operator=([^ ]+).*/\1/p' <<<"$refs")"
node_vmm_ref="$(sed -nE 's/.*node-vmm=([^ ]+).*/\1/p' <<<"$refs")"
[[ -n "$operator_ref" && -n "$node_vmm_ref" ]] || die "images.sh printed no image refs: '$refs'"
log "images: $operator_ref $node_vmm_ref"
end

# --- 4. helm install --wait, as README says ------------------------------------------------
begin helm
"$helm" install corescale "$repo/charts/corescale" -n "$ns" --create-namespace \
	--set operator.image.repository="${operator_ref%:*}" --set operator.image.tag="${operator_ref##*:}" \
	--set nodeVmm.image.repository="${node_vmm_ref%:*}" --set nodeVmm.image.tag="${node_vmm_ref##*:}" \
	--set operator.image.pullPolicy=Never --set nodeVmm.image.pullPolicy=Never \
	--set nodeVmm.kvm.mode=none --set nodeVmm.agent.accel=tcg \
	--wait --timeout 5m
kubectl -n "$ns" get pods -o wide
leases="$(kubectl -n "$ns" get leases -l corescale.dev/node-agent=true -o name | wc -l)"
[[ "$leases" -ge 1 ]] || die "no node-agent Lease in $ns after helm install --wait"
end

# --- 5. the autoscaler's parts: Prometheus discovering the pods, KEDA ----------------------
begin autoscaler
"$here/autoscaler.sh" up --dir "$dir"
end

# --- 6. the scenarios ----------------------------------------------------------------------
begin scenarios
CORESCALE_STACK_DIR="$dir" CORESCALE_HELM="$helm" \
	CORESCALE_OPERATOR_IMAGE="$operator_ref" CORESCALE_NODE_VMM_IMAGE="$node_vmm_ref" \
	"$scenarios_bin" "${only[@]}"
end
