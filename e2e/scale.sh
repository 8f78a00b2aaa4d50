#!/usr/bin/env bash
# Scale benchmarks (issue 7; print figures, write JSON; not pass/fail, not part of `make ci`):
# a real kube-apiserver + etcd, the CRD and the chart's RBAC, NODES simulated nodes (one
# node agent each with `--backend simulator`, no launcher, no QEMU) and the operator, all
# release builds. For each size in SIZES: a fresh cluster, SIZE VMs applied at once (time
# to Running, CPU seconds, peak RSS, API requests per VM), then a resize storm on all of
# them; then a growth plot.
#
#   e2e/scale.sh                    SIZES="100 300 1000" NODES=10 (defaults)
#   SIZES=1000 e2e/scale.sh         one size
#   REPEAT=3 e2e/scale.sh           each size 3 times (a fresh cluster each); the growth
#                                   table and plot take each size's medians
#   IDLE=9000 SIZES=1000 e2e/scale.sh   first 9000 halted VMs in a namespace of their own:
#                                   the same 1000 VMs against a store of 10,000
#   KEEP=1 e2e/scale.sh             leave the last stack running (e2e/scale.sh down stops it)
#   AGENT_ARGS="--max-writes-in-flight 0" e2e/scale.sh   extra flags of every node agent
#
# Results: $DIR/scale-<size>[-idle<M>][-r<k>].json (DIR = e2e/.run/scale), docs/scale-growth.png when
# PLOT_OUT is unset (PLOT_OUT= disables the plot).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dir="${CORESCALE_STACK_DIR:-$repo/e2e/.run/scale}"
bin="${CORESCALE_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
ns=corescale-system
nnodes="${NODES:-10}"
sizes="${SIZES:-100 300 1000}"
repeat="${REPEAT:-1}"
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "scale: error: REPEAT must be a positive number, not '$repeat'" >&2; exit 1; }
[[ "${IDLE:-0}" =~ ^[0-9]+$ ]] || { echo "scale: error: IDLE must be a number of VMs, not '${IDLE}'" >&2; exit 1; }
# Simulated host CPUs per node: SIM_HOST_CPUS, or enough for the storm (every VM at 2
# vCPUs, overcommit 4) with a quarter to spare, at least 64. A fixed 64 capped the cluster
# at 2,560 single-vCPU VMs (10 nodes x 64 x 4): the rest stayed Unschedulable.
sim_host_cpus() { # size
	local need=$(( ($1 * 2 * 5 / 4 + nnodes * 4 - 1) / (nnodes * 4) ))
	echo "${SIM_HOST_CPUS:-$(( need > 64 ? need : 64 ))}"
}
host_cpus=64
nodes=()
for ((i = 0; i < nnodes; i++)); do nodes+=("sim-$(printf '%02d' "$i")"); done

log() { printf 'scale: %s\n' "$*" >&2; }
# shellcheck source=e2e/lib.sh
source "$repo/e2e/lib.sh"
die() { printf 'scale: error: %s\n' "$*" >&2; exit 1; }

up() {
	for b in corescale-operator corescale-node-vmm corescale-scale; do
		[[ -x "$bin/$b" ]] || die "$bin/$b is missing: run 'cargo build --release -p corescale-operator -p corescale-node-vmm -p corescale-e2e'"
	done
	mkdir -p "$dir" && chmod 700 "$dir"
	bash "$repo/e2e/cluster/up.sh" --dir "$dir/cluster" >&2
	# shellcheck disable=SC1091
	source "$dir/cluster/env"
	kubectl apply --server-side -f "$repo/crds/" >&2
	kubectl wait --for=condition=Established crd/virtualmachines.corescale.dev --timeout=60s >&2
	kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >&2
	rbac_from_chart "$dir" "$ns" >/dev/null
	kubectl apply -f "$dir/rbac.yaml" >&2
	bash "$repo/e2e/cluster/sa-kubeconfig.sh" --dir "$dir/cluster" "$ns" corescale-operator "$dir/operator.kubeconfig" >&2
	bash "$repo/e2e/cluster/sa-kubeconfig.sh" --dir "$dir/cluster" "$ns" corescale-node-vmm "$dir/node-vmm.kubeconfig" >&2
	local n port
	for n in "${nodes[@]}"; do
		printf 'apiVersion: v1\nkind: Node\nmetadata:\n  name: %s\n  labels: {kubernetes.io/hostname: %s}\n' "$n" "$n"
		echo ---
	done | kubectl apply -f - >&2
	for n in "${nodes[@]}"; do
		local d="$dir/nodes/$n"
		mkdir -p "$d/vms" && chmod 700 "$d" "$d/vms"
		port=$(free_port)
		echo "$port" >"$d/agent.port"
		# shellcheck disable=SC2086 # AGENT_ARGS: flags, split on purpose
		NODE_NAME=$n POD_NAMESPACE=$ns KUBECONFIG="$dir/node-vmm.kubeconfig" RUST_LOG="${RUST_LOG:-warn}" \
			setsid "$bin/corescale-node-vmm" agent --backend simulator --sim-host-cpus "$host_cpus" \
			--state-dir "$d/vms" --launcher-socket "$d/launcher.sock" \
			--metrics-addr "127.0.0.1:$port" --log-format text ${AGENT_ARGS:-} \
			>>"$d/agent.log" 2>&1 </dev/null &
		echo $! >"$d/agent.pid"
	done
	for n in "${nodes[@]}"; do
		wait_http "http://127.0.0.1:$(cat "$dir/nodes/$n/agent.port")/readyz" 30 || die "agent of $n is not ready; see $dir/nodes/$n/agent.log"
	done
	port=$(free_port)
	echo "$port" >"$dir/operator.port"
	POD_NAMESPACE=$ns POD_NAME=operator-0 KUBECONFIG="$dir/operator.kubeconfig" RUST_LOG="${RUST_LOG:-warn}" \
		setsid "$bin/corescale-operator" --metrics-addr "127.0.0.1:$port" --log-format text \
		>>"$dir/operator.log" 2>&1 </dev/null &
	echo $! >"$dir/operator.pid"
	wait_http "http://127.0.0.1:$port/readyz" 60 || die "operator is not ready; see $dir/operator.log"
	{
		echo "# Written by e2e/scale.sh up. Stop with: e2e/scale.sh down"
		echo "source $dir/cluster/env"
		echo "export CORESCALE_STACK_DIR=$dir"
		echo "export CORESCALE_OPERATOR_METRICS=http://127.0.0.1:$port"
	} >"$dir/env"
	log "up: $nnodes simulated nodes ($host_cpus host CPUs each); source $dir/env"
}

down() {
	stop_pidfile "$dir/operator.pid"
	local f
	for f in "$dir"/nodes/*/agent.pid; do [[ -f "$f" ]] && stop_pidfile "$f"; done
	if [[ -d "$dir/cluster" ]]; then bash "$repo/e2e/cluster/down.sh" --dir "$dir/cluster" >&2; fi
	log "down"
}

run() {
	cd "$repo"
	cargo build -q --release -p corescale-operator -p corescale-node-vmm -p corescale-e2e
	down >/dev/null 2>&1 || true
	rm -rf "$dir"
	[[ "${KEEP:-0}" == 1 ]] || trap 'down >/dev/null 2>&1 || true' EXIT
	local size k tag results=()
	for size in $sizes; do
		for ((k = 1; k <= repeat; k++)); do
			down >/dev/null 2>&1 || true
			rm -rf "$dir/nodes" "$dir"/*.log
			host_cpus=$(sim_host_cpus "$((size + ${IDLE:-0}))")
			up
			tag=""
			((${IDLE:-0} == 0)) || tag="-idle$IDLE"
			((repeat == 1)) || tag+="-r$k"
			IDLE="${IDLE:-0}" "$bin/corescale-scale" run "$size" "$tag"
			results+=("$dir/scale-$size$tag.json")
		done
	done
	"$bin/corescale-scale" growth "${results[@]}"
	local png="${PLOT_OUT-$repo/docs/scale-growth.png}"
	if [[ -n "$png" ]]; then
		mkdir -p "$(dirname "$png")"
		"$bin/corescale-scale" plot "$png" "${results[@]}"
	fi
}

case "${1:-run}" in
run) run ;;
up) up ;;
down) down ;;
*) die "usage: scale.sh [run|up|down]" ;;
esac
