#!/usr/bin/env bash
# Benchmarks (print figures, write JSON; not pass/fail):
#  - the QEMU backend's per-phase plug/unplug latency against a direct QMP client
#    (node-vmm/examples/qemu_bench.rs), when present, and big jumps against small ones
#    (batch_bench.rs: 1 -> 8 and 8 -> 1 against 1 -> 2 and 2 -> 1), and resizeMethod
#    Hotplug against GuestOnline with the host CPU of offline vCPUs (online_bench.rs);
#  - the control-plane overhead of a resize through the real API server against a direct
#    QMP + guest-agent client on the same guest in the same run (corescale-bench), with a
#    percentile plot (CORESCALE_BENCH_PLOT, default $CORESCALE_STACK_DIR/bench-latency.png);
#  - the autoscaling loop's reaction time to steps of guest load (KEDA + the HPA + Prometheus
#    + corescale), split into its parts (corescale-bench autoscale, AUTOSCALE_STEPS, default 5).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CORESCALE_STACK_DIR="${CORESCALE_STACK_DIR:-$repo/e2e/.run/bench}"
if [[ -f node-vmm/examples/qemu_bench.rs && "${SKIP_QMP_BENCH:-0}" != 1 ]]; then
	cargo run -q --release -p corescale-node-vmm --example qemu_bench
	cargo run -q --release -p corescale-node-vmm --example batch_bench
	cargo run -q --release -p corescale-node-vmm --example online_bench
fi
cargo build -q --release -p corescale-operator -p corescale-node-vmm -p corescale-e2e
export CORESCALE_BIN_DIR="${CARGO_TARGET_DIR:-$repo/target}/release"
bash e2e/stack.sh down >/dev/null 2>&1 || true
rm -rf "$CORESCALE_STACK_DIR"
trap 'bash e2e/stack.sh down >/dev/null 2>&1 || true' EXIT
bash e2e/stack.sh up >/dev/null
CORESCALE_BENCH_PLOT="${CORESCALE_BENCH_PLOT:-$CORESCALE_STACK_DIR/bench-latency.png}" \
	"$CORESCALE_BIN_DIR/corescale-bench" overhead "${OVERHEAD_ROUNDS:-4}" "${OVERHEAD_PER_ROUND:-10}"
"$CORESCALE_BIN_DIR/corescale-bench" autoscale "${AUTOSCALE_STEPS:-5}"
