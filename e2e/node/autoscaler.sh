#!/usr/bin/env bash
# The autoscaling loop's outside parts for the real-node stage (scenario `autoscale`):
# Prometheus (Debian's) scraping the chart's pods the way the chart's ServiceMonitors make
# the Prometheus Operator scrape them (the release's Services' endpoints, port `metrics`,
# job corescale-operator / corescale-node-vmm, label `node`, the target labels the
# Prometheus Operator adds, honor_labels), with the chart's recording rules and alerts; and
# KEDA (e2e/cluster/keda.sh) against the node's control plane. Both run as host processes
# beside the control plane; the pods are reached at their IPs on the node's bridge.
#
# Debian's Prometheus is built without Kubernetes service discovery (`kubernetes_sd_configs`
# is an unknown field there), so a loop here does its part: every 2 s it writes the
# EndpointSlices of the release's Services (their labels are the Services') as file_sd
# targets, with the labels Kubernetes discovery would give. A pod replaced by scenario
# pod-delete is followed within seconds.
#
# Usage: autoscaler.sh up|down [--dir DIR]    (DIR: the node's directory, default e2e/.run/node)
# up appends CORESCALE_PROMETHEUS to DIR/env (the scenarios read it); down stops all three.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/node"
cmd="${1:-}"
shift || true
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
	*) echo "autoscaler.sh: unknown argument '$1' (expected up|down [--dir DIR])" >&2; exit 2 ;;
	esac
done
log() { echo "autoscaler.sh: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=e2e/lib.sh
source "$repo/e2e/lib.sh"
ns=corescale-system
p="$dir/prometheus"

# One scrape job per component, as templates/monitoring.yaml's ServiceMonitor has it.
job() { # job-name
	cat <<YAML
- job_name: $1
  honor_labels: true
  file_sd_configs: [{files: ['$p/targets/$1.json'], refresh_interval: 2s}]
YAML
}

# The targets of component $1 (job $2): ready endpoints of the release's Services labelled
# with the component, port `metrics`, labelled like Kubernetes service discovery's.
targets() { # component job
	kubectl get endpointslices -n "$ns" -l "app.kubernetes.io/component=$1" -o json |
		python3 -c '
import json, sys
out = []
for s in json.load(sys.stdin)["items"]:
    port = next((p["port"] for p in s.get("ports") or [] if p.get("name") == "metrics"), None)
    if port is None:
        continue
    for e in s.get("endpoints") or []:
        if (e.get("conditions") or {}).get("ready") is False:
            continue
        ref = e.get("targetRef") or {}
        for a in e.get("addresses") or []:
            out.append({"targets": [f"{a}:{port}"], "labels": {
                "namespace": s["metadata"]["namespace"],
                "service": s["metadata"]["labels"].get("kubernetes.io/service-name", ""),
                "pod": ref.get("name", ""),
                "node": e.get("nodeName", "")}})
json.dump(out, sys.stdout)
' >"$p/targets/$2.json.tmp" && mv "$p/targets/$2.json.tmp" "$p/targets/$2.json"
}

discover() {
	while :; do
		targets operator corescale-operator || true
		targets node-vmm corescale-node-vmm || true
		sleep 2
	done
}

up() {
	[[ -f "$dir/env" ]] || die "$dir/env is missing: start the node first (e2e/node/up.sh)"
	command -v prometheus >/dev/null || die "prometheus is missing: run scripts/install-deps.sh"
	# shellcheck disable=SC1091
	source "$dir/env"
	mkdir -p "$p/data" "$p/targets"
	if ! alive "$(cat "$p/discover.pid" 2>/dev/null)"; then
		targets operator corescale-operator
		targets node-vmm corescale-node-vmm
		discover >>"$p/discover.log" 2>&1 </dev/null &
		echo $! >"$p/discover.pid"
	fi
	if ! alive "$(cat "$p/pid" 2>/dev/null)"; then
		local port
		port="$(free_port)"
		echo "$port" >"$p/port"
		{
			echo "global: {scrape_interval: 2s, evaluation_interval: 2s}"
			echo "rule_files: ['$repo/charts/corescale/files/recording-rules.yaml', '$repo/charts/corescale/files/alerts.yaml']"
			echo "scrape_configs:"
			job corescale-operator
			job corescale-node-vmm
		} >"$p/prometheus.yml"
		setsid prometheus --config.file="$p/prometheus.yml" --storage.tsdb.path="$p/data" \
			--web.listen-address="127.0.0.1:$port" >>"$p/prometheus.log" 2>&1 </dev/null &
		echo $! >"$p/pid"
		wait_http "http://127.0.0.1:$port/-/ready" 60 || die "prometheus is not ready; see $p/prometheus.log"
	fi
	grep -q '^export CORESCALE_PROMETHEUS=' "$dir/env" ||
		echo "export CORESCALE_PROMETHEUS=http://127.0.0.1:$(cat "$p/port")" >>"$dir/env"
	bash "$repo/e2e/cluster/keda.sh" up --dir "$dir/cluster"
	log "Prometheus at 127.0.0.1:$(cat "$p/port") (config $p/prometheus.yml), KEDA up"
}

down() {
	bash "$repo/e2e/cluster/keda.sh" down --dir "$dir/cluster" || true
	stop_pidfile "$p/pid" TERM
	stop_pidfile "$p/discover.pid" TERM
}

case "$cmd" in
up) up ;;
down) down ;;
*) die "usage: autoscaler.sh up|down [--dir DIR]" ;;
esac
