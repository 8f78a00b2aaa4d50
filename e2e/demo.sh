#!/usr/bin/env bash
# The main job, end to end on this machine: a real kube-apiserver, the operator, two node
# agents and a real QEMU guest. Applies the example VM, scales it with kubectl, shows what
# a user sees, and tears everything down (KEEP=1 leaves it running: source
# e2e/.run/demo/env, and stop it with CORESCALE_STACK_DIR=e2e/.run/demo e2e/stack.sh down).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CORESCALE_STACK_DIR="${CORESCALE_STACK_DIR:-$repo/e2e/.run/demo}"
cargo build -q -p corescale-operator -p corescale-node-vmm
[[ "${KEEP:-0}" == 1 ]] || trap 'bash e2e/stack.sh down' EXIT
bash e2e/stack.sh up
# shellcheck disable=SC1091
source "$CORESCALE_STACK_DIR/env"
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
wait_online() { # cpus
	local i
	for ((i = 0; i < 300; i++)); do
		[[ "$(kubectl get cvm example -n demo -o jsonpath='{.status.cpus}/{.status.conditions[?(@.type=="Ready")].status}')" == "$1/True" ]] && return 0
		sleep 0.3
	done
	echo "demo: the VM did not reach $1 vCPUs; see $CORESCALE_STACK_DIR/nodes/*/agent.log" >&2
	return 1
}
step kubectl apply -n demo -f e2e/manifests/good/example.yaml
wait_online 2
step kubectl get cvm -n demo
for n in 4 1 3; do
	step kubectl scale -n demo cvm/example --replicas=$n
	wait_online $n
	step kubectl get cvm -n demo example -o jsonpath='{range .status.vcpus[*]}{.index}:{.state} {end}{"\n"}'
done
step kubectl get events.events.k8s.io -n demo --field-selector regarding.name=example
for m in "$CORESCALE_NODE_A_METRICS" "$CORESCALE_NODE_B_METRICS"; do curl -s "$m/metrics" | grep -E "^corescale_vm_vcpus\{namespace=\"demo\",name=\"example\"" || true; done
echo "demo: done"
