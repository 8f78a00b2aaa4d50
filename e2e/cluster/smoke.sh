#!/usr/bin/env bash
# shellcheck disable=SC2016 # the bash -c snippets expand in their own shell, on purpose
# Smoke test of the local control plane: up.sh, then checks that fail loudly
# if authentication, RBAC, CRDs, the controllers or down.sh do not work as in a
# real cluster, then down.sh. Exits non-zero on the first failed check.
#
# Usage: smoke.sh [--dir DIR]    (default: a fresh temporary directory)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir=""
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir)
		[[ $# -ge 2 && -n "$2" ]] || {
			echo "smoke.sh: --dir needs a directory" >&2
			exit 2
		}
		dir="$2"
		shift 2
		;;
	*)
		echo "smoke.sh: unknown argument '$1' (expected --dir DIR)" >&2
		exit 2
		;;
	esac
done
own_dir=0
if [[ -z "$dir" ]]; then
	dir="$(mktemp -d "${TMPDIR:-/tmp}/corescale-smoke.XXXXXX")"
	own_dir=1
fi

passed=0
failed=0
check() { # description command...
	local what="$1" t
	shift
	t=$(date +%s.%N)
	if "$@"; then
		echo "ok   - $what ($(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
		passed=$((passed + 1))
	else
		echo "FAIL - $what" >&2
		failed=$((failed + 1))
	fi
}

finish() {
	"$here/down.sh" --dir "$dir" || failed=$((failed + 1))
	[[ $own_dir -eq 0 ]] || rm -rf "$dir"
}
trap finish EXIT

t0=$(date +%s.%N)
"$here/up.sh" --dir "$dir"
echo "up.sh took $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
# shellcheck disable=SC1091
source "$dir/env"

check "kubectl get ns lists default, kube-system, kube-public" \
	bash -c 'ns="$(kubectl get ns -o name)"; for n in default kube-system kube-public; do grep -qx "namespace/$n" <<<"$ns" || exit 1; done'

check "/version reports $CORESCALE_KUBE_VERSION" \
	bash -c '[[ "$(kubectl version -o json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"serverVersion\"][\"gitVersion\"])")" == "$CORESCALE_KUBE_VERSION" ]]'

code() { curl -s -o /dev/null -w "%{http_code}" --cacert "$CORESCALE_CA_FILE" "$@"; }
check "a request with a wrong token is rejected as unauthenticated (401)" \
	test "$(code -H "Authorization: Bearer not-a-token" "$CORESCALE_APISERVER_URL/api/v1/namespaces")" = 401
check "an anonymous request may not list namespaces (403)" \
	test "$(code "$CORESCALE_APISERVER_URL/api/v1/namespaces")" = 403
check "the admin token may (200)" \
	test "$(code -H "Authorization: Bearer $(cat "$CORESCALE_ADMIN_TOKEN_FILE")" "$CORESCALE_APISERVER_URL/api/v1/namespaces")" = 200

sa_kc="$dir/smoke-sa.kubeconfig"
"$here/sa-kubeconfig.sh" --dir "$dir" smoke nobody "$sa_kc"
check "service account without roles: can-i list pods says no" \
	bash -c "[[ \"\$(kubectl --kubeconfig '$sa_kc' auth can-i list pods -n smoke 2>/dev/null)\" == no ]]"
check "service account is who the API server says it is" \
	bash -c "kubectl --kubeconfig '$sa_kc' auth whoami -o jsonpath='{.status.userInfo.username}' | grep -qx system:serviceaccount:smoke:nobody"
check "service account without roles: listing pods is forbidden (403)" \
	bash -c "out=\$(kubectl --kubeconfig '$sa_kc' get pods -n smoke 2>&1) && exit 1; grep -q '(Forbidden)' <<<\"\$out\""

kubectl create role pod-reader -n smoke --verb=get,list --resource=pods >/dev/null
kubectl create rolebinding nobody-reads -n smoke --role=pod-reader --serviceaccount=smoke:nobody >/dev/null
check "after a RoleBinding: can-i list pods says yes" \
	bash -c "[[ \"\$(kubectl --kubeconfig '$sa_kc' auth can-i list pods -n smoke)\" == yes ]]"
check "after a RoleBinding: can-i delete pods still says no" \
	bash -c "[[ \"\$(kubectl --kubeconfig '$sa_kc' auth can-i delete pods -n smoke 2>/dev/null)\" == no ]]"

check "kube-controller-manager made service account 'default' and kube-root-ca.crt in the new namespace" \
	bash -c 'for _ in $(seq 100); do kubectl get sa default -n smoke >/dev/null 2>&1 && kubectl get configmap kube-root-ca.crt -n smoke >/dev/null 2>&1 && exit 0; sleep 0.1; done; exit 1'

kubectl apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.corescale.dev
spec:
  group: smoke.corescale.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
EOF
check "CRD becomes Established" \
	kubectl wait --for=condition=Established --timeout=30s crd/widgets.smoke.corescale.dev
check "a valid custom resource is accepted" \
	bash -c 'printf "apiVersion: smoke.corescale.dev/v1\nkind: Widget\nmetadata: {name: w1, namespace: smoke}\nspec: {size: 2}\n" | kubectl apply -f - >/dev/null'
check "an invalid custom resource (size 0) is rejected by the schema" \
	bash -c '! printf "apiVersion: smoke.corescale.dev/v1\nkind: Widget\nmetadata: {name: w0, namespace: smoke}\nspec: {size: 0}\n" | kubectl apply -f - 2>/dev/null'

# Garbage collector: a ConfigMap owned by the Widget goes when the Widget goes.
uid="$(kubectl get widget w1 -n smoke -o jsonpath='{.metadata.uid}')"
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: owned-by-w1
  namespace: smoke
  ownerReferences:
  - {apiVersion: smoke.corescale.dev/v1, kind: Widget, name: w1, uid: "$uid"}
EOF
kubectl delete widget w1 -n smoke >/dev/null
check "garbage collector deletes a dependent of a deleted custom resource" \
	bash -c 'for _ in $(seq 300); do kubectl get configmap owned-by-w1 -n smoke >/dev/null 2>&1 || exit 0; sleep 0.2; done; exit 1'

kubectl delete namespace smoke --wait=false >/dev/null
check "namespace controller finishes deleting a namespace" \
	bash -c 'for _ in $(seq 300); do kubectl get ns smoke >/dev/null 2>&1 || exit 0; sleep 0.2; done; exit 1'

pids="$CORESCALE_ETCD_PID $CORESCALE_APISERVER_PID $CORESCALE_KCM_PID"
trap - EXIT
finish
# An exited process may linger a moment as a zombie until init reaps it:
# that is not running.
running() { [[ -r "/proc/$1/stat" && "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }
check "down.sh leaves none of the cluster's processes running" \
	bash -c "$(declare -f running); for p in $pids; do running \$p && exit 1; done; exit 0"
check "down.sh again is a no-op that succeeds" "$here/down.sh" --dir "$dir"

echo "smoke: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
