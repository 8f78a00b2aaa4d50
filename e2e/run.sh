#!/usr/bin/env bash
# The e2e suite: build the binaries, bring up the whole stack (e2e/stack.sh), run every
# scenario (corescale-e2e), then the security checks (corescale-security) against the same
# stack, tear everything down. Extra arguments go to corescale-e2e (e.g. --only apply,scale).
# On failure the logs' tails are printed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CORESCALE_STACK_DIR="${CORESCALE_STACK_DIR:-$repo/e2e/.run/e2e}"
cargo build -q -p corescale-operator -p corescale-node-vmm -p corescale-e2e
bash e2e/stack.sh down >/dev/null 2>&1 || true
rm -rf "$CORESCALE_STACK_DIR"
dump() {
	local f
	for f in "$CORESCALE_STACK_DIR"/operator.log "$CORESCALE_STACK_DIR"/nodes/*/agent.log "$CORESCALE_STACK_DIR"/nodes/*/launcher.log; do
		[[ -f "$f" ]] || continue
		echo "----- last lines of ${f#"$CORESCALE_STACK_DIR"/}"
		tail -n 40 "$f"
	done
}
cleanup() {
	local rc=$?
	[[ $rc -eq 0 ]] || dump
	bash e2e/stack.sh down || true
	exit $rc
}
trap cleanup EXIT
t0=$(date +%s)
bash e2e/stack.sh up
echo "e2e: stack up in $(( $(date +%s) - t0 )) s"
rc=0
"${CARGO_TARGET_DIR:-$repo/target}/debug/corescale-e2e" "$@" || rc=$?
# Security checks (RBAC, node-bound Lease policy, file modes, no token leaks, kernel paths).
"${CARGO_TARGET_DIR:-$repo/target}/debug/corescale-security" || rc=1
echo "e2e: ran with"
bash e2e/versions.sh | sed 's/^/  /'
[[ $rc -eq 0 ]] || exit "$rc"
