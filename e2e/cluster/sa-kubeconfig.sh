#!/usr/bin/env bash
# Write a kubeconfig for a ServiceAccount, so that the operator and the node
# agents run in e2e tests as the least-privileged identities the chart gives
# them, not as cluster admin.
#
# Usage: sa-kubeconfig.sh [--dir DIR] NAMESPACE SERVICEACCOUNT OUT
#
# Creates the namespace and the ServiceAccount if missing (as the admin of the
# cluster in DIR, default e2e/.run/cluster), requests a bound token through
# the TokenRequest API (kubectl create token) and writes OUT with the cluster's
# server and CA, that token, and NAMESPACE as the default namespace. Grants no
# permissions: bind Roles/ClusterRoles separately (the chart's RBAC).
#
# Environment: CORESCALE_SA_TOKEN_DURATION (default 24h; at least 10m).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/cluster"

usage() {
	echo "usage: sa-kubeconfig.sh [--dir DIR] NAMESPACE SERVICEACCOUNT OUT" >&2
	exit 2
}

args=()
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir)
		[[ $# -ge 2 && -n "$2" ]] || usage
		dir="$2"
		shift 2
		;;
	--dir=*)
		dir="${1#--dir=}"
		shift
		;;
	-h | --help) usage ;;
	*)
		args+=("$1")
		shift
		;;
	esac
done
[[ ${#args[@]} -eq 3 ]] || usage
ns="${args[0]}" sa="${args[1]}" out="${args[2]}"
duration="${CORESCALE_SA_TOKEN_DURATION:-24h}"

# DNS-1123 labels (RFC 1123): what the API server would reject anyway, but
# with a message naming the argument.
label='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
[[ ${#ns} -le 63 && "$ns" =~ $label ]] || {
	echo "sa-kubeconfig.sh: NAMESPACE '$ns' is not a valid namespace name (lower-case DNS label)" >&2
	exit 2
}
[[ ${#sa} -le 253 && "$sa" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || {
	echo "sa-kubeconfig.sh: SERVICEACCOUNT '$sa' is not a valid name (lower-case DNS subdomain)" >&2
	exit 2
}

admin="$dir/kubeconfig"
[[ -f "$admin" ]] || {
	echo "sa-kubeconfig.sh: no admin kubeconfig at $admin: run e2e/cluster/up.sh --dir $dir first" >&2
	exit 1
}
# The kubectl that up.sh built (same version as the server), else any on PATH.
kubectl="$(
	# shellcheck disable=SC1091
	[[ -f "$dir/env" ]] && source "$dir/env" && echo "${CORESCALE_KUBECTL:-}"
)" || true
if [[ -z "$kubectl" || ! -x "$kubectl" ]]; then
	kubectl="$(command -v kubectl)" || {
		echo "sa-kubeconfig.sh: no kubectl: start the cluster with up.sh (it builds one) or install kubectl" >&2
		exit 1
	}
fi
k() { "$kubectl" --kubeconfig "$admin" "$@"; }

k get namespace "$ns" >/dev/null 2>&1 || k create namespace "$ns" >/dev/null
k get serviceaccount "$sa" -n "$ns" >/dev/null 2>&1 || k create serviceaccount "$sa" -n "$ns" >/dev/null
token="$(k create token "$sa" -n "$ns" --duration="$duration")"

server="$(k config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')"
ca_data="$(k config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
[[ -n "$server" && -n "$ca_data" ]] || {
	echo "sa-kubeconfig.sh: $admin has no server or certificate-authority-data" >&2
	exit 1
}

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
(
	umask 077
	cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: corescale-e2e
  cluster:
    server: $server
    certificate-authority-data: $ca_data
users:
- name: system:serviceaccount:$ns:$sa
  user:
    token: $token
contexts:
- name: $sa@corescale-e2e
  context:
    cluster: corescale-e2e
    namespace: $ns
    user: system:serviceaccount:$ns:$sa
current-context: $sa@corescale-e2e
EOF
)
mv -f "$tmp" "$out"
echo "sa-kubeconfig.sh: wrote $out for system:serviceaccount:$ns:$sa (token valid $duration)" >&2
