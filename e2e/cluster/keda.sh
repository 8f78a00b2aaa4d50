#!/usr/bin/env bash
# Run KEDA (operator + external-metrics API server, built from Go modules by build-keda.sh)
# against the control plane of e2e/cluster/up.sh, the way its own manifests install it:
# upstream's CRDs and RBAC unchanged, both processes as the ServiceAccount keda/keda-operator,
# the metrics server registered as the APIService v1beta1.external.metrics.k8s.io, so the
# kube-controller-manager's HPA controller reads KEDA's metrics through the aggregation layer.
#
# Usage: keda.sh up|down [--dir DIR]      (DIR: the cluster directory of up.sh)
#
# Differences from a pod install, because the processes run on the host:
# - Certificates come from openssl (one CA, one leaf for 127.0.0.1 with server and client
#   use), not from KEDA's cert rotation, which writes to a Secret mounted as /certs.
# - The APIService's Service is an ExternalName for localhost (the way a pod's would be a
#   ClusterIP Service): Endpoints and EndpointSlices refuse loopback addresses.
# - Ports are free loopback ports; the operator's gRPC metrics service and health/metrics
#   endpoints bind to 127.0.0.1. (The adapter's own /metrics port binds all interfaces: it
#   has no address flag upstream.)
# Writes DIR/keda/{certs,run,logs,keda.env}. up is idempotent; down stops both processes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/cluster"
cmd="${1:-}"
shift || true
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir) dir="$2"; shift 2 ;;
	--dir=*) dir="${1#--dir=}"; shift ;;
	*) echo "keda.sh: unknown argument '$1' (expected up|down [--dir DIR])" >&2; exit 2 ;;
	esac
done
log() { echo "keda.sh: $*" >&2; }
die() { log "$*"; exit 1; }
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
# shellcheck source=e2e/lib.sh
source "$repo/e2e/lib.sh"
k="$dir/keda"
ns=keda

down() {
	stop_pidfile "$k/run/keda-adapter.pid" TERM
	stop_pidfile "$k/run/keda.pid" TERM
	log "down"
}

keda_src() { # KEDA's module directory (config/ holds its CRDs and RBAC)
	local v
	v=$(sed -n 's/^KEDA_VERSION=//p' "$here/build-keda.sh")
	echo "$cache/go/mod/github.com/kedacore/keda/v2@$v"
}

certs() {
	local c="$k/certs"
	[[ -s "$c/tls.crt" ]] && return
	mkdir -p "$c" && chmod 700 "$c"
	openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=corescale-e2e KEDA CA" \
		-keyout "$c/ca.key" -out "$c/ca.crt" 2>/dev/null
	openssl req -newkey rsa:2048 -nodes -subj "/O=KEDAORG/CN=keda-operator" \
		-keyout "$c/tls.key" -out "$c/tls.csr" 2>/dev/null
	printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:keda-operator.keda.svc,DNS:keda-metrics-apiserver.keda.svc" \
		"extendedKeyUsage=serverAuth,clientAuth" "keyUsage=digitalSignature,keyEncipherment" >"$c/ext.cnf"
	openssl x509 -req -in "$c/tls.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial -days 2 \
		-extfile "$c/ext.cnf" -out "$c/tls.crt" 2>/dev/null
	rm -f "$c/tls.csr"
}

up() {
	[[ -f "$dir/env" ]] || die "no cluster in $dir: run e2e/cluster/up.sh --dir $dir first"
	# shellcheck disable=SC1091
	source "$dir/env"
	local bin src
	bin="$(bash "$here/build-keda.sh" | tail -n1)"
	src="$(keda_src)"
	[[ -d "$src/config/crd/bases" ]] || die "KEDA's sources are not in $src (build-keda.sh downloads them)"
	mkdir -p "$k/run" "$k/logs" && chmod 700 "$k"
	certs
	kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >&2
	kubectl apply --server-side -f "$src/config/crd/bases/" >&2
	kubectl apply -f "$src/config/service_account/service_account.yaml" \
		-f "$src/config/rbac/role.yaml" -f "$src/config/rbac/role_binding.yaml" \
		-f "$src/config/metrics-server/role.yaml" -f "$src/config/metrics-server/role_binding.yaml" >&2
	kubectl wait --for=condition=Established crd/scaledobjects.keda.sh --timeout=60s >&2
	bash "$here/sa-kubeconfig.sh" --dir "$dir" "$ns" keda-operator "$k/kubeconfig" >&2

	local grpc_port health_port metrics_port adapter_port adapter_metrics_port
	if ! alive "$(cat "$k/run/keda.pid" 2>/dev/null)"; then
		grpc_port=$(free_port) health_port=$(free_port) metrics_port=$(free_port)
		echo "$grpc_port" >"$k/grpc.port"
		echo "$health_port" >"$k/health.port"
		echo "$metrics_port" >"$k/metrics.port"
		POD_NAMESPACE=$ns KEDA_CLUSTER_OBJECT_NAMESPACE=$ns WATCH_NAMESPACE="" KUBECONFIG="$k/kubeconfig" \
			setsid "$bin/keda" --zap-log-level=info --zap-encoder=console \
			--metrics-bind-address="127.0.0.1:$metrics_port" \
			--health-probe-bind-address="127.0.0.1:$health_port" \
			--metrics-service-bind-address="127.0.0.1:$grpc_port" \
			--cert-dir="$k/certs" --enable-cert-rotation=false \
			--enable-webhook-patching=false --enable-apiservice-patching=false \
			>>"$k/logs/keda.log" 2>&1 </dev/null &
		echo $! >"$k/run/keda.pid"
		wait_http "http://127.0.0.1:$health_port/readyz" 120 || die "the KEDA operator is not ready; see $k/logs/keda.log"
	fi
	grpc_port=$(cat "$k/grpc.port")
	if ! alive "$(cat "$k/run/keda-adapter.pid" 2>/dev/null)"; then
		adapter_port=$(free_port) adapter_metrics_port=$(free_port)
		echo "$adapter_port" >"$k/adapter.port"
		POD_NAMESPACE=$ns KEDA_CLUSTER_OBJECT_NAMESPACE=$ns WATCH_NAMESPACE="" KUBECONFIG="$k/kubeconfig" \
			setsid "$bin/keda-adapter" --zap-log-level=info \
			--secure-port="$adapter_port" --bind-address=127.0.0.1 --port="$adapter_metrics_port" \
			--cert-dir="$k/certs" --tls-cert-file="$k/certs/tls.crt" --tls-private-key-file="$k/certs/tls.key" \
			--client-ca-file="$k/certs/ca.crt" \
			--lister-kubeconfig="$k/kubeconfig" --authentication-kubeconfig="$k/kubeconfig" \
			--authorization-kubeconfig="$k/kubeconfig" \
			--metrics-service-address="127.0.0.1:$grpc_port" \
			>>"$k/logs/keda-adapter.log" 2>&1 </dev/null &
		echo $! >"$k/run/keda-adapter.pid"
	fi
	adapter_port=$(cat "$k/adapter.port")
	# The APIService, as upstream's api_service.yaml, reaching the adapter through an
	# ExternalName Service on localhost (Endpoints and EndpointSlices refuse loopback
	# addresses); the aggregator dials localhost at the APIService's port and checks the
	# certificate for keda-metrics-apiserver.keda.svc.
	kubectl apply -f - >&2 <<EOF
apiVersion: v1
kind: Service
metadata: {name: keda-metrics-apiserver, namespace: $ns}
spec:
  type: ExternalName
  externalName: localhost
  ports: [{name: https, port: $adapter_port}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.external.metrics.k8s.io}
spec:
  service: {name: keda-metrics-apiserver, namespace: $ns, port: $adapter_port}
  group: external.metrics.k8s.io
  version: v1beta1
  caBundle: $(base64 -w0 <"$k/certs/ca.crt")
  groupPriorityMinimum: 100
  versionPriority: 100
EOF
	local i
	for ((i = 0; i < 600; i++)); do
		alive "$(cat "$k/run/keda-adapter.pid")" || die "the KEDA metrics server exited; see $k/logs/keda-adapter.log"
		kubectl get --raw /apis/external.metrics.k8s.io/v1beta1 >/dev/null 2>&1 && break
		sleep 0.2
	done
	kubectl get --raw /apis/external.metrics.k8s.io/v1beta1 >/dev/null ||
		die "external.metrics.k8s.io is not served after 120 s; see $k/logs/keda-adapter.log and kubectl get apiservice v1beta1.external.metrics.k8s.io -o yaml"
	cat >"$k/keda.env" <<EOF
export CORESCALE_KEDA_VERSION=$(sed -n 's/^KEDA_VERSION=//p' "$here/build-keda.sh")
export CORESCALE_KEDA_METRICS=http://127.0.0.1:$(cat "$k/metrics.port")/metrics
EOF
	log "KEDA up: operator (gRPC 127.0.0.1:$grpc_port), metrics server 127.0.0.1:$adapter_port serving external.metrics.k8s.io"
}

case "$cmd" in
up) up ;;
down) down ;;
*) die "usage: keda.sh up|down [--dir DIR]" ;;
esac
