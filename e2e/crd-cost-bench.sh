#!/usr/bin/env bash
# What the VirtualMachine CRD's validation costs the kube-apiserver per write (issue 22;
# prints figures and writes JSON; not pass/fail, not part of `make ci`): a bare control
# plane of its own (e2e/cluster/up.sh, free ports, so it runs beside another cluster), then
# `corescale-bench crd-cost`: the CRD as of BASELINE_REV (a), the same without its CEL rules
# (b, the floor) and the CRD in crds/ (c), side by side under API groups of their own, each
# with VMs created and written to like the node agents do, batch by batch in turns; the API
# server's CPU per write and the ratios (c)/(a), (b)/(a).
#
#   e2e/crd-cost-bench.sh        BATCHES=40 STATUS_WRITES=8000 BASELINE_REV=d3a45b0 (defaults)
#
# Results: $DIR/bench-crd-cost.json (DIR = e2e/.run/crd-cost).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dir="${CORESCALE_STACK_DIR:-$repo/e2e/.run/crd-cost}"
bin="${CORESCALE_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}"
# The last commit whose CRD had every rule in CEL.
rev="${BASELINE_REV:-d3a45b0}"
crd=crds/virtualmachines.corescale.dev.yaml

cd "$repo"
cargo build -q --release -p corescale-e2e --bin corescale-bench
bash e2e/cluster/down.sh --dir "$dir/cluster" >/dev/null 2>&1 || true
rm -rf "$dir"
mkdir -p "$dir" && chmod 700 "$dir"
git show "$rev:$crd" >"$dir/crd-baseline.yaml" || { echo "crd-cost-bench: no $crd at $rev" >&2; exit 1; }
trap 'bash e2e/cluster/down.sh --dir "$dir/cluster" >/dev/null 2>&1 || true' EXIT
bash e2e/cluster/up.sh --dir "$dir/cluster" >&2
echo "# Written by e2e/crd-cost-bench.sh: the cluster's env is cluster/env" >"$dir/env"
echo "crd-cost: baseline $crd at $rev, improved $crd at $(git rev-parse --short HEAD)$(git diff --quiet -- "$crd" || echo ' (modified)')"
CORESCALE_STACK_DIR="$dir" "$bin/corescale-bench" crd-cost \
	"$dir/crd-baseline.yaml" "$repo/$crd" "${BATCHES:-40}" "${STATUS_WRITES:-8000}"
