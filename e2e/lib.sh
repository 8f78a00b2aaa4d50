# shellcheck shell=bash
# Shell helpers shared by e2e/stack.sh and e2e/scale.sh (sourced, not run).
# Needs: repo (the repository root), cache (CORESCALE_CACHE), set by the sourcing script.
# shellcheck disable=SC2154

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Whether pid $1 runs (a zombie does not count).
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# Wait up to $2 seconds for URL $1 to answer 2xx.
wait_http() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

# Stop the process in pidfile $1 with signal ${2:-TERM}, SIGKILL after 10 s; remove the file.
stop_pidfile() {
	local pid i
	pid=$(cat "$1" 2>/dev/null || true)
	if alive "$pid"; then
		kill "-${2:-TERM}" "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
		alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$1"
}

# Render the chart into $1/chart.yaml and keep the objects the node agents and the operator
# run under (RBAC, service accounts, the node-Lease admission policy) in $1/rbac.yaml, for
# release namespace $2. Prints how many objects were kept.
rbac_from_chart() {
	local out=$1 ns=$2 helm="$cache/bin/helm"
	[[ -x "$helm" ]] || bash "$repo/e2e/cluster/install-helm.sh" >&2
	"$helm" template corescale "$repo/charts/corescale" --namespace "$ns" >"$out/chart.yaml"
	/usr/bin/python3 - "$out/chart.yaml" "$out/rbac.yaml" <<'PY'
import sys, yaml
keep = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "FlowSchema",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") in keep]
if not any(d["kind"] == "ClusterRole" for d in docs):
    sys.exit("the chart renders no ClusterRole")
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
print(len(docs))
PY
}
