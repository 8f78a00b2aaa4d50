#!/usr/bin/env bash
# The whole corescale stack on one machine, for the e2e suite, the demo and by hand:
# a real kube-apiserver (+ controller-manager, etcd), the CRD, the chart's RBAC, two
# simulated nodes (Node objects) each with a launcher and a node agent running as their
# own service accounts, the operator, Prometheus scraping all three (with the chart's
# recording rules and alerts), and KEDA serving external metrics to the HPA controller.
#
#   e2e/stack.sh up                 start everything (idempotent); writes $DIR/env
#   e2e/stack.sh down               stop everything, guests included
#   e2e/stack.sh agent start|stop|kill NODE    control one node agent (kill = SIGKILL)
#   e2e/stack.sh apiserver stop|start|restart   stop kube-apiserver (SIGTERM) / start it
#                                   again with the very flags it ran with; start waits for /readyz
#   e2e/stack.sh etcd pause|resume  freeze (SIGSTOP) / thaw (SIGCONT) etcd
#   e2e/stack.sh status             what runs
#
# DIR defaults to e2e/.run/stack (CORESCALE_STACK_DIR). Binaries come from
# target/debug (CORESCALE_BIN_DIR). Guests run under TCG from the image that
# node-vmm/guest/build.sh builds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dir="${CORESCALE_STACK_DIR:-$repo/e2e/.run/stack}"
bin="${CORESCALE_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
ns=corescale-system
nodes=(node-a node-b)

log() { printf 'stack: %s\n' "$*" >&2; }
# shellcheck source=e2e/lib.sh
source "$repo/e2e/lib.sh"
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

require() {
	for b in corescale-operator corescale-node-vmm; do
		[[ -x "$bin/$b" ]] || die "$bin/$b is missing: run 'cargo build -p corescale-operator -p corescale-node-vmm' (or make e2e)"
	done
	command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing: run scripts/install-deps.sh"
	command -v prometheus >/dev/null || die "prometheus is missing: run scripts/install-deps.sh"
	[[ -f "$cache/guest/x86_64/vmlinux" ]] || die "no guest image in $cache/guest/x86_64: run node-vmm/guest/build.sh (make guest)"
}

# --- pieces -----------------------------------------------------------------
start_launcher() { # node
	local n=$1 d="$dir/nodes/$1"
	mkdir -p "$d/vms" "$d/run" && chmod 700 "$d" "$d/vms" "$d/run"
	if alive "$(cat "$d/launcher.pid" 2>/dev/null)"; then return; fi
	rm -f "$d/run/launcher.sock"
	setsid "$bin/corescale-node-vmm" launcher --socket "$d/run/launcher.sock" --state-dir "$d/vms" \
		>>"$d/launcher.log" 2>&1 </dev/null &
	echo $! >"$d/launcher.pid"
	local i
	for ((i = 0; i < 100; i++)); do [[ -S "$d/run/launcher.sock" ]] && return; sleep 0.1; done
	die "launcher of $n did not open its socket; see $d/launcher.log"
}

start_agent() { # node
	local n=$1 d="$dir/nodes/$1"
	if alive "$(cat "$d/agent.pid" 2>/dev/null)"; then return; fi
	local port
	port=$(cat "$d/agent.port" 2>/dev/null || free_port)
	echo "$port" >"$d/agent.port"
	NODE_NAME=$n POD_NAMESPACE=$ns KUBECONFIG="$dir/node-vmm.kubeconfig" RUST_LOG="${RUST_LOG:-info}" \
		setsid "$bin/corescale-node-vmm" agent \
		--state-dir "$d/vms" --launcher-socket "$d/run/launcher.sock" \
		--image-dir "$cache/guest" --accel tcg \
		--metrics-addr "127.0.0.1:$port" --lease-seconds "${CORESCALE_LEASE_SECONDS:-10}" \
		--overcommit "${CORESCALE_OVERCOMMIT:-4}" --log-format text \
		--guest-agent-grace-seconds "${CORESCALE_AGENT_GRACE_SECONDS:-10}" \
		>>"$d/agent.log" 2>&1 </dev/null &
	echo $! >"$d/agent.pid"
	wait_http "http://127.0.0.1:$port/readyz" 30 || die "agent of $n is not ready; see $d/agent.log"
}

up() {
	require
	mkdir -p "$dir" && chmod 700 "$dir"
	bash "$repo/e2e/cluster/up.sh" --dir "$dir/cluster" >&2
	# shellcheck disable=SC1091
	source "$dir/cluster/env"
	kubectl apply --server-side -f "$repo/crds/" >&2
	kubectl wait --for=condition=Established crd/virtualmachines.corescale.dev --timeout=60s >&2
	kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >&2
	local n
	n=$(rbac_from_chart "$dir" "$ns")
	kubectl apply -f "$dir/rbac.yaml" >&2
	log "applied $n RBAC objects rendered from charts/corescale"
	bash "$repo/e2e/cluster/sa-kubeconfig.sh" --dir "$dir/cluster" "$ns" corescale-operator "$dir/operator.kubeconfig" >&2
	bash "$repo/e2e/cluster/sa-kubeconfig.sh" --dir "$dir/cluster" "$ns" corescale-node-vmm "$dir/node-vmm.kubeconfig" >&2
	for n in "${nodes[@]}"; do
		kubectl apply -f - >&2 <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $n
  labels: {kubernetes.io/hostname: $n, corescale.dev/pool: general}
EOF
		start_launcher "$n"
		start_agent "$n"
	done
	if ! alive "$(cat "$dir/operator.pid" 2>/dev/null)"; then
		local port
		port=$(cat "$dir/operator.port" 2>/dev/null || free_port)
		echo "$port" >"$dir/operator.port"
		POD_NAMESPACE=$ns POD_NAME=operator-0 KUBECONFIG="$dir/operator.kubeconfig" RUST_LOG="${RUST_LOG:-info}" \
			setsid "$bin/corescale-operator" --metrics-addr "127.0.0.1:$port" --log-format text \
			--unschedulable-retry-seconds 3 >>"$dir/operator.log" 2>&1 </dev/null &
		echo $! >"$dir/operator.pid"
		wait_http "http://127.0.0.1:$port/readyz" 60 || die "operator is not ready; see $dir/operator.log"
	fi
	start_prometheus
	bash "$repo/e2e/cluster/keda.sh" up --dir "$dir/cluster"
	write_env
	log "up: source $dir/env"
}

start_prometheus() {
	if alive "$(cat "$dir/prometheus.pid" 2>/dev/null)"; then return; fi
	local port
	port=$(cat "$dir/prometheus.port" 2>/dev/null || free_port)
	echo "$port" >"$dir/prometheus.port"
	{
		echo "global: {scrape_interval: 2s, evaluation_interval: 2s}"
		echo "rule_files: ['$repo/charts/corescale/files/recording-rules.yaml', '$repo/charts/corescale/files/alerts.yaml']"
		echo "scrape_configs:"
		echo "- job_name: corescale-operator"
		echo "  static_configs: [{targets: ['127.0.0.1:$(cat "$dir/operator.port")']}]"
		echo "- job_name: corescale-node-vmm"
		echo "  static_configs:"
		for n in "${nodes[@]}"; do
			echo "  - {targets: ['127.0.0.1:$(cat "$dir/nodes/$n/agent.port")'], labels: {node: $n}}"
		done
	} >"$dir/prometheus.yml"
	mkdir -p "$dir/prometheus-data"
	setsid prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus-data" \
		--web.listen-address="127.0.0.1:$port" >>"$dir/prometheus.log" 2>&1 </dev/null &
	echo $! >"$dir/prometheus.pid"
	wait_http "http://127.0.0.1:$port/-/ready" 60 || die "prometheus is not ready; see $dir/prometheus.log"
}

write_env() {
	cat >"$dir/env" <<EOF
# Written by e2e/stack.sh up. Stop with: e2e/stack.sh down
source $dir/cluster/env
export CORESCALE_STACK_DIR=$dir
export CORESCALE_OPERATOR_METRICS=http://127.0.0.1:$(cat "$dir/operator.port")
export CORESCALE_PROMETHEUS=http://127.0.0.1:$(cat "$dir/prometheus.port")
export CORESCALE_NODE_A_METRICS=http://127.0.0.1:$(cat "$dir/nodes/node-a/agent.port")
export CORESCALE_NODE_B_METRICS=http://127.0.0.1:$(cat "$dir/nodes/node-b/agent.port")
source $dir/cluster/keda/keda.env
EOF
}

down() {
	stop_pidfile "$dir/prometheus.pid" TERM
	stop_pidfile "$dir/operator.pid" TERM
	for n in "${nodes[@]}"; do
		stop_pidfile "$dir/nodes/$n/agent.pid" TERM
		# The launcher stops its guests when it stops.
		stop_pidfile "$dir/nodes/$n/launcher.pid" TERM
	done
	if [[ -d "$dir/cluster" ]]; then
		bash "$repo/e2e/cluster/keda.sh" down --dir "$dir/cluster" || true
		# A fault scenario that failed half-way may have left etcd or the API server frozen
		# (SIGSTOP): thaw them so that they can stop.
		local f
		for f in "$dir"/cluster/run/*.pid; do
			if [[ -f "$f" ]]; then kill -CONT "$(cat "$f")" 2>/dev/null || true; fi
		done
		bash "$repo/e2e/cluster/down.sh" --dir "$dir/cluster" >&2
	fi
	# Nothing of ours may survive: QEMU processes whose state lives under $dir.
	local left
	left=$(pgrep -f "qemu-system-x86_64.*$dir" || true)
	if [[ -n "$left" ]]; then
		log "killing leftover QEMU processes: $left"
		# shellcheck disable=SC2086 # one word per pid
		kill -KILL $left 2>/dev/null || true
	fi
	log "down"
}

# --- faults on the control plane ----------------------------------------------
# kube-apiserver's command line is saved (NUL-separated, from /proc) when it is stopped, so
# that start runs it again with the same flags, certificates and port.
apiserver_stop() {
	local run="$dir/cluster/run" pid
	pid=$(cat "$run/kube-apiserver.pid" 2>/dev/null || true)
	alive "$pid" || die "kube-apiserver is not running (no live pid in $run/kube-apiserver.pid)"
	cp "/proc/$pid/cmdline" "$run/kube-apiserver.cmdline"
	stop_pidfile "$run/kube-apiserver.pid" TERM
	log "kube-apiserver (pid $pid) stopped"
}

apiserver_start() {
	local run="$dir/cluster/run" pid
	# shellcheck disable=SC1091
	source "$dir/cluster/env"
	if alive "$(cat "$run/kube-apiserver.pid" 2>/dev/null)"; then
		log "kube-apiserver already runs"
		return
	fi
	[[ -s "$run/kube-apiserver.cmdline" ]] || die "no saved command line in $run/kube-apiserver.cmdline: stop it with 'stack.sh apiserver stop' first"
	local -a argv
	mapfile -d '' -t argv <"$run/kube-apiserver.cmdline"
	setsid "${argv[@]}" </dev/null >>"$dir/cluster/logs/kube-apiserver.log" 2>&1 &
	pid=$!
	echo "$pid" >"$run/kube-apiserver.pid"
	sed -i "s/^export CORESCALE_APISERVER_PID=.*/export CORESCALE_APISERVER_PID=$pid/" "$dir/cluster/env"
	local i
	for ((i = 0; i < 1200; i++)); do
		alive "$pid" || die "kube-apiserver exited while starting; see $dir/cluster/logs/kube-apiserver.log"
		curl -fsS --max-time 2 --cacert "$CORESCALE_CA_FILE" \
			-H "Authorization: Bearer $(cat "$CORESCALE_ADMIN_TOKEN_FILE")" \
			"$CORESCALE_APISERVER_URL/readyz" >/dev/null 2>&1 && { log "kube-apiserver (pid $pid) ready"; return; }
		sleep 0.1
	done
	die "kube-apiserver (pid $pid) not ready after 120 s; see $dir/cluster/logs/kube-apiserver.log"
}

etcd_signal() { # STOP|CONT
	local pid
	pid=$(cat "$dir/cluster/run/etcd.pid" 2>/dev/null || true)
	if ! { [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }; then
		die "etcd is not running (no live pid in $dir/cluster/run/etcd.pid)"
	fi
	kill "-$1" "$pid"
	log "etcd (pid $pid): SIG$1"
}

status() {
	local f
	for f in "$dir"/*.pid "$dir"/nodes/*/*.pid; do
		[[ -f "$f" ]] || continue
		if alive "$(cat "$f")"; then echo "running  ${f#"$dir"/}"; else echo "stopped  ${f#"$dir"/}"; fi
	done
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
agent)
	[[ $# -eq 3 ]] || die "usage: stack.sh agent start|stop|kill NODE"
	# shellcheck disable=SC1091
	source "$dir/cluster/env"
	case "$2" in
	start) start_agent "$3" ;;
	stop) stop_pidfile "$dir/nodes/$3/agent.pid" TERM ;;
	kill) stop_pidfile "$dir/nodes/$3/agent.pid" KILL ;;
	*) die "usage: stack.sh agent start|stop|kill NODE" ;;
	esac
	;;
apiserver)
	case "${2:-}" in
	stop) apiserver_stop ;;
	start) apiserver_start ;;
	restart) apiserver_stop && apiserver_start ;;
	*) die "usage: stack.sh apiserver stop|start|restart" ;;
	esac
	;;
etcd)
	case "${2:-}" in
	pause) etcd_signal STOP ;;
	resume) etcd_signal CONT ;;
	*) die "usage: stack.sh etcd pause|resume" ;;
	esac
	;;
*) die "usage: stack.sh up|down|status|agent start|stop|kill NODE|apiserver stop|start|restart|etcd pause|resume" ;;
esac
