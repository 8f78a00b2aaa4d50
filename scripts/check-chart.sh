#!/usr/bin/env bash
# Static checks of the Helm chart, its alerts and its dashboard (no cluster needed):
#
#   1. `helm lint --strict` with the default values and with other valid value sets;
#   2. `helm template` with those value sets, and assertions on the rendered objects:
#      the RBAC objects and their names (the e2e applies exactly these), least-privilege
#      rules each with a comment saying why, the operator's and the agents' security
#      settings, probes, NODE_NAME, /dev/kvm, OnDelete, the dashboard ConfigMap, and the
#      PrometheusRule equal to files/recording-rules.yaml + files/alerts.yaml;
#   3. wrong values fail `helm template` with a message naming the field
#      (values.schema.json, or the chart's own checks);
#   4. `promtool check rules` and `promtool test rules` on files/alerts.yaml and
#      files/recording-rules.yaml, then the same tests against deliberately broken copies
#      of the rules, which must fail;
#   5. the dashboard: every query uses no Grafana variable but $namespace/$vm, parses as
#      PromQL (promtool), and names only metrics the Rust sources define;
#   6. the chart's CRD is a copy of crds/ (make check-generated regenerates both).
#
# Usage: scripts/check-chart.sh
# Needs: helm (installed by e2e/cluster/install-helm.sh into the cache when missing),
# promtool (Debian package prometheus), python3 with yaml (python3-yaml), jq:
# scripts/install-deps.sh installs them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$repo/charts/corescale"
export CORESCALE_CACHE="${CORESCALE_CACHE:-$HOME/.cache/corescale}"

log() { printf 'check-chart.sh: %s\n' "$*" >&2; }
die() { printf 'check-chart.sh: error: %s\n' "$*" >&2; exit 1; }

command -v promtool >/dev/null || die "promtool is missing: run scripts/install-deps.sh (Debian package prometheus)"
command -v jq >/dev/null || die "jq is missing: run scripts/install-deps.sh (apt-get install jq)"
python3 -c 'import yaml' 2>/dev/null || die "python3 with yaml is missing: run scripts/install-deps.sh (apt-get install python3-yaml)"
if [[ -n "${HELM:-}" ]]; then
	helm="$HELM"
else
	helm="$(bash "$repo/e2e/cluster/install-helm.sh" | tail -n1)"
fi
[[ -x "$helm" ]] || die "helm not found at '$helm' (e2e/cluster/install-helm.sh installs it)"
log "using $("$helm" version --short) and $(promtool --version 2>&1 | head -n1)"

work="$(mktemp -d "${TMPDIR:-/tmp}/check-chart.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The release the docs and the e2e use.
release=corescale
namespace=corescale-system

# --- 1 + 2: lint and render valid value sets ------------------------------------------
# name|helm --set arguments (space separated)
valid_sets=(
	"defaults|"
	"hostpath-rolling|--set nodeVmm.kvm.mode=hostPath --set nodeVmm.updateStrategy.type=RollingUpdate --set nodeVmm.updateStrategy.maxUnavailable=10% --set nodeVmm.guestImages.hostPath=/srv/corescale/guest --set nodeVmm.supplementalGroups={108}"
	"tcg-only|--set nodeVmm.kvm.mode=none --set nodeVmm.agent.accel=tcg --set operator.replicas=2 --set operator.watchNamespace=vms --set logFormat=text"
	"servicemonitor-rules|--set metrics.serviceMonitor.enabled=true --set prometheusRule.enabled=true --set prometheusRule.labels.release=kube-prometheus-stack --set dashboards.namespace=monitoring"
	"podmonitor-overrides|--set metrics.podMonitor.enabled=true --set prometheusRule.enabled=true --set prometheusRule.disabled={CorescaleOperatorDown} --set prometheusRule.for.CorescaleResizeStuck=30m --set prometheusRule.alertLabels.team=virt"
	"no-leader-election|--set operator.leaderElection.enabled=false --set rbac.aggregateToDefaultRoles=false --set dashboards.enabled=false"
	"follow-off|--set nodeVmm.launcher.followGuests.enabled=false --set nodeVmm.launcher.resources.limits.memory=8Gi"
	"other-release|--set apiPriorityAndFairness.enabled=false --set fullnameOverride=cs --set operator.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)
for entry in "${valid_sets[@]}"; do
	name="${entry%%|*}"
	read -r -a args <<<"${entry#*|}"
	"$helm" lint --strict --quiet "$chart" "${args[@]}" >"$work/lint-$name.log" 2>&1 ||
		{ cat "$work/lint-$name.log" >&2; die "helm lint --strict failed with value set '$name'"; }
	"$helm" template "$release" "$chart" --namespace "$namespace" "${args[@]}" >"$work/$name.yaml" 2>"$work/$name.err" ||
		{ cat "$work/$name.err" >&2; die "helm template failed with value set '$name'"; }
	log "lint + template ok: $name"
done
# With the CRD (what the e2e applies first).
"$helm" template "$release" "$chart" --namespace "$namespace" --include-crds >"$work/with-crds.yaml"
grep -q '^kind: CustomResourceDefinition' "$work/with-crds.yaml" || die "helm template --include-crds rendered no CustomResourceDefinition"

python3 - "$work" "$chart" <<'PY'
import json, os, re, sys, yaml

work, chart = sys.argv[1], sys.argv[2]
errors = []


def fail(msg):
    errors.append(msg)


def load(name):
    docs = [d for d in yaml.safe_load_all(open(os.path.join(work, name + ".yaml"))) if d]
    return docs


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name, where):
    got = find(docs, kind, name)
    if len(got) != 1:
        fail(f"{where}: expected one {kind} {name}, found {len(got)}")
        return {}
    return got[0]


# Default render ----------------------------------------------------------------------
d = load("defaults")
W = "defaults"
rbac_kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
got = sorted((x["kind"], x["metadata"]["name"], x["metadata"].get("namespace", "")) for x in d if x["kind"] in rbac_kinds)
want = sorted([
    ("ServiceAccount", "corescale-operator", "corescale-system"),
    ("ServiceAccount", "corescale-node-vmm", "corescale-system"),
    ("ClusterRole", "corescale-operator", ""),
    ("ClusterRole", "corescale-node-vmm", ""),
    ("ClusterRoleBinding", "corescale-operator", ""),
    ("ClusterRoleBinding", "corescale-node-vmm", ""),
    ("Role", "corescale-operator", "corescale-system"),
    ("Role", "corescale-node-vmm", "corescale-system"),
    ("RoleBinding", "corescale-operator", "corescale-system"),
    ("RoleBinding", "corescale-node-vmm", "corescale-system"),
    ("ClusterRole", "corescale-view", ""),
    ("ClusterRole", "corescale-edit", ""),
])
if got != want:
    fail(f"{W}: RBAC objects differ from what the e2e expects:\n  got  {got}\n  want {want}")
for kind in ("ClusterRoleBinding", "RoleBinding"):
    for b in find(d, kind):
        n = b["metadata"]["name"]
        if b["roleRef"]["name"] != n or b["subjects"] != [{"kind": "ServiceAccount", "name": n, "namespace": "corescale-system"}]:
            fail(f"{W}: {kind} {n} does not bind role {n} to ServiceAccount corescale-system/{n}")


def verbs(role, group, resource):
    out = set()
    for r in role.get("rules", []):
        if group in r.get("apiGroups", []) and resource in r.get("resources", []):
            out |= set(r.get("verbs", []))
    return out


def all_resources(role):
    return {(g, res) for r in role.get("rules", []) for g in r.get("apiGroups", []) for res in r.get("resources", [])}


agent_cr = one(d, "ClusterRole", "corescale-node-vmm", W)
agent_r = one(d, "Role", "corescale-node-vmm", W)
op_cr = one(d, "ClusterRole", "corescale-operator", W)
op_r = one(d, "Role", "corescale-operator", W)
expect = [
    (agent_cr, "corescale.dev", "virtualmachines", {"get", "list", "watch"}),
    (agent_cr, "corescale.dev", "virtualmachines/status", {"get", "patch"}),
    (agent_cr, "events.k8s.io", "events", {"create", "patch"}),
    (agent_r, "coordination.k8s.io", "leases", {"get", "create", "update"}),
    (agent_r, "", "pods", {"get"}),
    (agent_r, "", "pods/resize", {"patch"}),
    (op_cr, "corescale.dev", "virtualmachines", {"get", "list", "watch", "patch"}),
    (op_cr, "corescale.dev", "virtualmachines/status", {"get", "patch"}),
    (op_cr, "", "nodes", {"get", "list", "watch"}),
    (op_cr, "events.k8s.io", "events", {"create", "patch"}),
    (op_r, "coordination.k8s.io", "leases", {"get", "list", "watch", "create", "update"}),
]
for role, g, res, v in expect:
    got = verbs(role, g, res)
    if got != v:
        fail(f"{W}: {role.get('kind')} {role.get('metadata', {}).get('name')}: verbs on {g or 'core'}/{res} are {sorted(got)}, want {sorted(v)}")
allowed = {
    "corescale-node-vmm": {("corescale.dev", "virtualmachines"), ("corescale.dev", "virtualmachines/status"),
                           ("events.k8s.io", "events"), ("coordination.k8s.io", "leases"),
                           ("", "pods"), ("", "pods/resize")},
    "corescale-operator": {("corescale.dev", "virtualmachines"), ("corescale.dev", "virtualmachines/status"),
                           ("", "nodes"), ("events.k8s.io", "events"), ("coordination.k8s.io", "leases")},
}
for role in (agent_cr, agent_r, op_cr, op_r):
    n = role.get("metadata", {}).get("name")
    extra = all_resources(role) - allowed.get(n, set())
    if extra:
        fail(f"{W}: {role.get('kind')} {n} grants more than it needs: {sorted(extra)}")
    for r in role.get("rules", []):
        if "*" in r.get("verbs", []) or "*" in r.get("resources", []) or "*" in r.get("apiGroups", []):
            fail(f"{W}: {role.get('kind')} {n} has a wildcard rule {r}")
# The operator's get/update of Leases is limited to its own Lease.
for r in op_r.get("rules", []):
    if set(r.get("verbs", [])) & {"get", "update"} and r.get("resourceNames") != ["corescale-operator"]:
        fail(f"{W}: Role corescale-operator: get/update of leases must be limited to resourceNames [corescale-operator], rule {r}")

# Every RBAC rule carries a comment saying why (checked on the rendered text).
text = open(os.path.join(work, "defaults.yaml")).read()
for doc in text.split("\n---\n"):
    if not re.search(r"^kind: (ClusterRole|Role)$", doc, re.M):
        continue
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            if not (i > 0 and lines[i - 1].strip().startswith("#")):
                m = re.search(r"^  name: (.*)$", doc, re.M)
                if m and m.group(1) in ("corescale-operator", "corescale-node-vmm"):
                    fail(f"{W}: role {m.group(1)}: rule {line.strip()} ... has no comment line above it")

# Operator Deployment.
dep = one(d, "Deployment", "corescale-operator", W)
if dep:
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    psc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        fail(f"{W}: operator pod must run as non-root (runAsNonRoot, runAsUser)")
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False \
            or sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("privileged"):
        fail(f"{W}: operator container must have a read-only root, no privilege escalation, all capabilities dropped")
    for p in ("livenessProbe", "readinessProbe"):
        if p not in c:
            fail(f"{W}: operator container has no {p}")
    if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
        fail(f"{W}: operator container needs resource requests and limits")
    if spec.get("serviceAccountName") != "corescale-operator":
        fail(f"{W}: operator runs as {spec.get('serviceAccountName')}, not corescale-operator")
    envs = {e["name"]: e for e in c.get("env", [])}
    if envs.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.namespace":
        fail(f"{W}: operator POD_NAMESPACE must come from metadata.namespace")

# node-vmm DaemonSet.
ds = one(d, "DaemonSet", "corescale-node-vmm", W)
if ds:
    if ds["spec"]["updateStrategy"] != {"type": "OnDelete"}:
        fail(f"{W}: DaemonSet updateStrategy is {ds['spec']['updateStrategy']}, want OnDelete")
    spec = ds["spec"]["template"]["spec"]
    cs = {c["name"]: c for c in spec["containers"]}
    if set(cs) != {"agent", "launcher"}:
        fail(f"{W}: DaemonSet containers are {sorted(cs)}, want agent and launcher")
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        fail(f"{W}: node-vmm pod must run as non-root")
    if spec.get("serviceAccountName") != "corescale-node-vmm":
        fail(f"{W}: node-vmm runs as {spec.get('serviceAccountName')}")
    if spec.get("nodeSelector") is None:
        fail(f"{W}: node-vmm has no nodeSelector")
    vols = {v["name"]: v for v in spec["volumes"]}
    if vols.get("state", {}).get("hostPath", {}).get("path") != "/var/lib/corescale/vms":
        fail(f"{W}: the state dir must be hostPath /var/lib/corescale/vms")
    for name, c in cs.items():
        sc = c.get("securityContext", {})
        if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{W}: {name} container must be unprivileged with a read-only root by default")
        lim = c.get("resources", {}).get("limits", {})
        if lim.get("devices.kubevirt.io/kvm") != 1:
            fail(f"{W}: {name} container must request /dev/kvm from the device plugin by default")
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        if mounts.get("state") != "/var/lib/corescale/vms" or mounts.get("run") != "/run/corescale":
            fail(f"{W}: {name} container must mount the state dir and the socket dir")
    agent, launcher = cs.get("agent", {}), cs.get("launcher", {})
    envs = {e["name"]: e for e in agent.get("env", [])}
    if envs.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        fail(f"{W}: agent NODE_NAME must come from the downward API spec.nodeName")
    if agent.get("args", [None])[0] != "agent" or launcher.get("args", [None])[0] != "launcher":
        fail(f"{W}: containers must run `corescale-node-vmm agent` / `launcher`")
    if "livenessProbe" in launcher:
        fail(f"{W}: the launcher must have no liveness probe (a restart stops every guest)")
    for p in ("livenessProbe", "readinessProbe"):
        if p not in agent:
            fail(f"{W}: agent has no {p}")
    if "cpu" in agent.get("resources", {}).get("limits", {}):
        fail(f"{W}: the agent must have no CPU limit (it announces the CPUs it may use as node capacity)")
    # The launcher container follows its guests: resized in place, never restarted, from
    # the base its values give (without the KVM device, which the agent never touches).
    if launcher.get("resizePolicy") != [{"resourceName": "cpu", "restartPolicy": "NotRequired"},
                                        {"resourceName": "memory", "restartPolicy": "NotRequired"}]:
        fail(f"{W}: the launcher's resizePolicy must be NotRequired for cpu and memory (a restart stops every guest)")
    if envs.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        fail(f"{W}: agent POD_NAME must come from the downward API metadata.name (the pod it resizes)")
    base = json.loads(envs.get("CORESCALE_LAUNCHER_RESOURCES", {}).get("value") or "null")
    if base != {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}}:
        fail(f"{W}: CORESCALE_LAUNCHER_RESOURCES is {base}, want the launcher's resources from values.yaml")
    if "--launcher-resize-timeout-seconds=30" not in agent.get("args", []):
        fail(f"{W}: the agent is not given launcher.followGuests.timeoutSeconds")
    vap = one(d, "ValidatingAdmissionPolicy", "corescale-node-vmm-launcher-resize", W)
    if vap:
        rules = vap["spec"]["matchConstraints"]["resourceRules"]
        if rules != [{"apiGroups": [""], "apiVersions": ["*"], "operations": ["UPDATE"], "resources": ["pods/resize"], "scope": "Namespaced"}]:
            fail(f"{W}: the launcher-resize policy must match UPDATE of pods/resize, not {rules}")
        if not any("object.spec.nodeName == variables.node" in v["expression"] for v in vap["spec"]["validations"]):
            fail(f"{W}: the launcher-resize policy does not hold an agent to its own node's pod")
    one(d, "ValidatingAdmissionPolicyBinding", "corescale-node-vmm-launcher-resize", W)
    sock = {e["name"]: e.get("value") for e in launcher.get("env", [])}.get("CORESCALE_LAUNCHER_SOCKET")
    if sock != {k: e.get("value") for k, e in envs.items()}.get("CORESCALE_LAUNCHER_SOCKET"):
        fail(f"{W}: agent and launcher disagree on the launcher socket")

svc = {s["metadata"]["name"]: s for s in find(d, "Service")}
for n, port in (("corescale-operator", 8080), ("corescale-node-vmm", 9090)):
    if n not in svc or svc[n]["spec"]["ports"][0]["port"] != port or svc[n]["spec"]["ports"][0]["name"] != "metrics":
        fail(f"{W}: Service {n} with port metrics/{port} missing")

cm = one(d, "ConfigMap", "corescale-dashboard", W)
if cm:
    if cm["metadata"]["labels"].get("grafana_dashboard") != "1":
        fail(f"{W}: dashboard ConfigMap lacks label grafana_dashboard: \"1\"")
    if json.loads(cm["data"]["corescale.json"]) != json.load(open(os.path.join(chart, "files/dashboard.json"))):
        fail(f"{W}: dashboard ConfigMap differs from files/dashboard.json")
for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
    if find(d, kind):
        fail(f"{W}: {kind} rendered by default (needs the Prometheus Operator's CRDs; must be opt-in)")

# Variations ----------------------------------------------------------------------------
v = load("hostpath-rolling")
ds = one(v, "DaemonSet", "corescale-node-vmm", "hostpath-rolling")
if ds:
    if ds["spec"]["updateStrategy"].get("type") != "RollingUpdate":
        fail("hostpath-rolling: updateStrategy not RollingUpdate")
    spec = ds["spec"]["template"]["spec"]
    if spec["volumes"][-1] != {"name": "dev-kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}}:
        fail("hostpath-rolling: no hostPath /dev/kvm CharDevice volume")
    for c in spec["containers"]:
        if not c["securityContext"].get("privileged"):
            fail(f"hostpath-rolling: {c['name']} must be privileged to open a hostPath /dev/kvm")
        if "devices.kubevirt.io/kvm" in c.get("resources", {}).get("limits", {}):
            fail(f"hostpath-rolling: {c['name']} still requests the device plugin")
    if spec["securityContext"].get("supplementalGroups") != [108]:
        fail("hostpath-rolling: supplementalGroups not applied")

v = load("tcg-only")
ds = one(v, "DaemonSet", "corescale-node-vmm", "tcg-only")
if ds:
    for c in ds["spec"]["template"]["spec"]["containers"]:
        if any(k.startswith("devices.") for k in c.get("resources", {}).get("limits", {})) or c["securityContext"].get("privileged"):
            fail(f"tcg-only: {c['name']} must get no KVM device and no privilege")
dep = one(v, "Deployment", "corescale-operator", "tcg-only")
if dep and "--namespace=vms" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]:
    fail("tcg-only: operator.watchNamespace not passed as --namespace")

alerts = yaml.safe_load(open(os.path.join(chart, "files/alerts.yaml")))
recording = yaml.safe_load(open(os.path.join(chart, "files/recording-rules.yaml")))
v = load("servicemonitor-rules")
pr = one(v, "PrometheusRule", "corescale", "servicemonitor-rules")
if pr and pr["spec"]["groups"] != recording["groups"] + alerts["groups"]:
    fail("servicemonitor-rules: the PrometheusRule's groups differ from files/recording-rules.yaml + files/alerts.yaml")
sms = find(v, "ServiceMonitor")
if sorted(s["metadata"]["name"] for s in sms) != ["corescale-node-vmm", "corescale-operator"]:
    fail("servicemonitor-rules: expected ServiceMonitors corescale-operator and corescale-node-vmm")
for s in sms:
    if s["spec"]["endpoints"][0].get("honorLabels") is not True:
        fail(f"servicemonitor-rules: ServiceMonitor {s['metadata']['name']} must set honorLabels (the VM series' own namespace label)")
    job = [r for r in s["spec"]["endpoints"][0]["relabelings"] if r.get("targetLabel") == "job"]
    if not job or job[0]["replacement"] != s["metadata"]["name"]:
        fail(f"servicemonitor-rules: ServiceMonitor {s['metadata']['name']} must set job={s['metadata']['name']} (the alerts use it)")
cm = one(v, "ConfigMap", "corescale-dashboard", "servicemonitor-rules")
if cm and cm["metadata"]["namespace"] != "monitoring":
    fail("servicemonitor-rules: dashboards.namespace not applied")

v = load("podmonitor-overrides")
pr = one(v, "PrometheusRule", "corescale", "podmonitor-overrides")
if pr:
    rules = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r}
    if not any("record" in r for g in pr["spec"]["groups"] for r in g["rules"]):
        fail("podmonitor-overrides: the recording rules are missing from the PrometheusRule")
    if "CorescaleOperatorDown" in rules:
        fail("podmonitor-overrides: prometheusRule.disabled did not drop CorescaleOperatorDown")
    if rules.get("CorescaleResizeStuck", {}).get("for") != "30m":
        fail("podmonitor-overrides: prometheusRule.for did not change CorescaleResizeStuck")
    if any(r["labels"].get("team") != "virt" or "severity" not in r["labels"] for r in rules.values()):
        fail("podmonitor-overrides: prometheusRule.alertLabels not added to every alert (or severity lost)")
    if '{{ $labels.namespace }}' not in rules.get("CorescaleVMInfeasible", {}).get("annotations", {}).get("summary", ""):
        fail("podmonitor-overrides: alert annotation templates were not kept verbatim")
if len(find(v, "PodMonitor")) != 2 or find(v, "ServiceMonitor"):
    fail("podmonitor-overrides: expected two PodMonitors and no ServiceMonitor")
if any(p["spec"]["podMetricsEndpoints"][0].get("honorLabels") is not True for p in find(v, "PodMonitor")):
    fail("podmonitor-overrides: every PodMonitor must set honorLabels (the VM series' own namespace label)")

v = load("no-leader-election")
dep = one(v, "Deployment", "corescale-operator", "no-leader-election")
if dep and "--no-leader-elect" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]:
    fail("no-leader-election: --no-leader-elect missing")
r = one(v, "Role", "corescale-operator", "no-leader-election")
if r and verbs(r, "coordination.k8s.io", "leases") != {"list", "watch"}:
    fail("no-leader-election: the operator still may write Leases")

v = load("follow-off")
r = one(v, "Role", "corescale-node-vmm", "follow-off")
if r and (verbs(r, "", "pods") or verbs(r, "", "pods/resize")):
    fail("follow-off: the agent may still read or resize pods")
if find(v, "ValidatingAdmissionPolicy", "corescale-node-vmm-launcher-resize"):
    fail("follow-off: the launcher-resize policy is still rendered")
ds = one(v, "DaemonSet", "corescale-node-vmm", "follow-off")
if ds:
    cs = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    if any(e["name"].startswith("CORESCALE_LAUNCHER_RESOURCES") for e in cs["agent"].get("env", [])):
        fail("follow-off: the agent still resizes the launcher container")
    if cs["launcher"]["resources"]["limits"].get("memory") != "8Gi":
        fail("follow-off: launcher.resources not applied")

# FlowSchemas: the agents' and the operator's Lease renewals in their own priority levels.
def flow(docs, name, sa, level, where):
    fs = one(docs, "FlowSchema", name, where)
    if not fs:
        return
    spec = fs["spec"]
    if spec["priorityLevelConfiguration"]["name"] != level:
        fail(f"{where}: FlowSchema {name} goes to {spec['priorityLevelConfiguration']['name']}, want {level}")
    if not spec["matchingPrecedence"] < 9000:
        fail(f"{where}: FlowSchema {name} loses to the built-in service-accounts FlowSchema (9000)")
    (rule,) = spec["rules"]
    subj = [s["serviceAccount"] for s in rule["subjects"]]
    if subj != [{"name": sa, "namespace": "corescale-system"}]:
        fail(f"{where}: FlowSchema {name} matches {subj}, want only ServiceAccount {sa}")
    rr = rule["resourceRules"]
    if [(r["apiGroups"], r["resources"], r["namespaces"]) for r in rr] != [(["coordination.k8s.io"], ["leases"], ["corescale-system"])]:
        fail(f"{where}: FlowSchema {name} matches more or other than the release's Leases: {rr}")


flow(d, "corescale-node-vmm-leases", "corescale-node-vmm", "node-high", W)
flow(d, "corescale-operator-leader-election", "corescale-operator", "leader-election", W)
if find(load("no-leader-election"), "FlowSchema", "corescale-operator-leader-election"):
    fail("no-leader-election: the operator's leader-election FlowSchema is still rendered")

v = load("other-release")
names = sorted({x["metadata"]["name"] for x in v if x["kind"] in rbac_kinds})
if names != ["cs-edit", "cs-node-vmm", "cs-operator", "cs-view"]:
    fail(f"other-release: fullnameOverride names are {names}")
if find(v, "FlowSchema"):
    fail("other-release: apiPriorityAndFairness.enabled=false still renders FlowSchemas")
dep = one(v, "Deployment", "cs-operator", "other-release")
if dep and not dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"):
    fail("other-release: operator.image.digest not used")

if errors:
    for e in errors:
        print(f"check-chart.sh: error: {e}", file=sys.stderr)
    sys.exit(1)
print("check-chart.sh: rendered objects ok (RBAC names and rules, security, probes, DaemonSet, monitoring, dashboard)", file=sys.stderr)
PY

# --- 3: wrong values fail -----------------------------------------------------------------
# expected message fragment|--set argument(s)
invalid_sets=(
	"/nodeVmm/kvm/mode|--set nodeVmm.kvm.mode=kvm"
	"/nodeVmm/agent/accel|--set nodeVmm.agent.accel=fast"
	"/nodeVmm/updateStrategy/type|--set nodeVmm.updateStrategy.type=Rolling"
	"/nodeVmm/runAsUser|--set nodeVmm.runAsUser=0"
	"/nodeVmm/stateDir|--set nodeVmm.stateDir=var/lib/corescale"
	"/nodeVmm/agent/overcommit|--set nodeVmm.agent.overcommit=0"
	"/nodeVmm/launcher/followGuests/cpuLimitPerVcpu|--set-string nodeVmm.launcher.followGuests.cpuLimitPerVcpu=1Gi"
	"/nodeVmm/launcher/followGuests/memoryPerVm|--set nodeVmm.launcher.followGuests.memoryPerVm=lots"
	"/nodeVmm/agent/leaseSeconds|--set-string nodeVmm.agent.leaseSeconds=twenty"
	"/nodeVmm/agent/maxWritesInFlight|--set nodeVmm.agent.maxWritesInFlight=-1"
	"/operator/replicas|--set operator.replicas=-1"
	"/operator/resources/limits/memory|--set operator.resources.limits.memory=lots"
	"/operator/image/digest|--set operator.image.digest=latest"
	"/logFormat|--set logFormat=xml"
	"/prometheusRule/for/CorescaleResizeStuck|--set prometheusRule.for.CorescaleResizeStuck=ten"
	"/metrics/serviceMonitor/interval|--set metrics.serviceMonitor.interval=often"
	"additional properties 'operatr' not allowed|--set operatr.replicas=2"
	"additional properties 'maxSurge' not allowed|--set nodeVmm.updateStrategy.maxSurge=1"
	"both true|--set metrics.serviceMonitor.enabled=true --set metrics.podMonitor.enabled=true"
	"needs operator.leaderElection.enabled|--set operator.replicas=2 --set operator.leaderElection.enabled=false"
	"nodeVmm.kvm.mode is none|--set nodeVmm.kvm.mode=none --set nodeVmm.agent.accel=kvm"
	"not an alert of files/alerts.yaml|--set prometheusRule.disabled={CorescaleNoSuchAlert}"
)
for entry in "${invalid_sets[@]}"; do
	want="${entry%%|*}"
	read -r -a args <<<"${entry#*|}"
	if "$helm" template "$release" "$chart" --namespace "$namespace" "${args[@]}" >/dev/null 2>"$work/invalid.err"; then
		die "helm template accepted wrong values: ${args[*]}"
	fi
	grep -qF -- "$want" "$work/invalid.err" ||
		{ cat "$work/invalid.err" >&2; die "helm template rejected '${args[*]}' but its message does not name '$want'"; }
done
log "${#invalid_sets[@]} wrong value sets rejected, each naming the field"

# --- 4: alert and recording rules ----------------------------------------------------------
for pair in alerts.yaml:alerts_test.yaml recording-rules.yaml:recording_rules_test.yaml; do
	promtool check rules "$chart/files/${pair%%:*}" >"$work/promtool.log" 2>&1 ||
		{ cat "$work/promtool.log" >&2; die "promtool check rules files/${pair%%:*} failed"; }
	promtool test rules "$chart/tests/${pair#*:}" >"$work/promtool.log" 2>&1 ||
		{ cat "$work/promtool.log" >&2; die "promtool test rules tests/${pair#*:} failed"; }
done
log "promtool check rules + test rules ok (alerts, recording rules)"

# Break each rule in a way its tests must notice (a test that cannot fail tests nothing).
# description|file under files/|exact text in it|replacement
mutations=(
	"ResizeStuck fires too early|alerts.yaml|reason=\"Infeasible\"}) == 1)
        for: 10m|reason=\"Infeasible\"}) == 1)
        for: 5m"
	"ResizeStuck ignores the phase|alerts.yaml|corescale_vm_phase{phase=\"Running\"}|corescale_vm_phase"
	"ResizeStuck includes Infeasible VMs|alerts.yaml|corescale_resize_pending{reason=\"Infeasible\"}) == 1)
        for: 10m|corescale_resize_pending{reason=\"Infeasible\"}) == 2)
        for: 10m"
	"ResizeStuck per agent instead of per VM|alerts.yaml|max by (namespace, name) (corescale_vm_vcpus{state=\"desired\"})|corescale_vm_vcpus{state=\"desired\"}"
	"UnplugTimeouts threshold 3|alerts.yaml|) >= 4|) >= 3"
	"UnplugTimeouts counts plugs|alerts.yaml|direction=\"unplug\", result=\"failure\"|result=\"failure\""
	"UnplugTimeouts window 30m|alerts.yaml|result=\"failure\"}[15m]|result=\"failure\"}[30m]"
	"NodeAgentDown any job|alerts.yaml|up{job=\"corescale-node-vmm\"} == 0|up == 0"
	"NodeAgentDown without for|alerts.yaml|expr: up{job=\"corescale-node-vmm\"} == 0
        for: 5m|expr: up{job=\"corescale-node-vmm\"} == 0
        for: 0m"
	"VMInfeasible on Deferred|alerts.yaml|expr: max by (namespace, name) (corescale_resize_pending{reason=\"Infeasible\"}) == 1|expr: max by (namespace, name) (corescale_resize_pending) == 1"
	"OperatorDown fires too early|alerts.yaml|== 1)
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: \"No corescale|== 1)
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: \"No corescale"
	"OperatorDown ignores leadership|alerts.yaml|absent(corescale_operator_leader{job=\"corescale-operator\"} == 1)|absent(corescale_operator_leader{job=\"corescale-operator\"})"
	"busy cores over 5m|recording-rules.yaml|corescale_vm_vcpu_busy_seconds_total[1m]|corescale_vm_vcpu_busy_seconds_total[5m]"
	"busy cores per agent|recording-rules.yaml|sum by (namespace, name) (rate(|sum by (namespace, name, instance) (rate("
	"utilization per desired vCPU|recording-rules.yaml|corescale_vm_vcpus{state=\"online\"}|corescale_vm_vcpus{state=\"desired\"}"
	"utilization divides by zero|recording-rules.yaml|{state=\"online\"}) > 0)|{state=\"online\"}))"
)
for m in "${mutations[@]}"; do
	desc="${m%%|*}"
	rest="${m#*|}"
	file="${rest%%|*}"
	rest="${rest#*|}"
	from="${rest%%|*}"
	to="${rest#*|}"
	rm -rf "$work/mut" && mkdir -p "$work/mut/files" "$work/mut/tests"
	cp "$chart/tests/"*_test.yaml "$work/mut/tests/"
	cp "$chart/files/"*.yaml "$work/mut/files/"
	FROM="$from" TO="$to" python3 - "$chart/files/$file" "$work/mut/files/$file" <<'PY' || die "mutation '$desc' does not apply: files/$file changed; update scripts/check-chart.sh"
import os, sys
s = open(sys.argv[1]).read()
f, t = os.environ["FROM"], os.environ["TO"]
if s.count(f) != 1:
    sys.exit(f"check-chart.sh: mutation text found {s.count(f)} times, want 1: {f!r}")
open(sys.argv[2], "w").write(s.replace(f, t))
PY
	promtool check rules "$work/mut/files/$file" >/dev/null 2>&1 || die "mutation '$desc' makes invalid rules; fix the mutation"
	tests="alerts_test.yaml"
	[[ $file == recording-rules.yaml ]] && tests="recording_rules_test.yaml"
	if promtool test rules "$work/mut/tests/$tests" >/dev/null 2>&1; then
		die "the rule tests still pass with a broken rule ($desc): tests/$tests misses a case"
	fi
done
log "${#mutations[@]} broken variants of the rules each fail the tests"

# --- 5: dashboard queries ---------------------------------------------------------------------
dash="$chart/files/dashboard.json"
jq -e . "$dash" >/dev/null || die "files/dashboard.json is not valid JSON"
jq -r '[.. | objects | select(has("targets")) | .targets[] | .expr] | .[]' "$dash" >"$work/exprs.txt"
[[ -s "$work/exprs.txt" ]] || die "files/dashboard.json has no targets[].expr"
python3 - "$work/exprs.txt" "$work/dashboard-rules.yaml" "$repo" "$chart/files/alerts.yaml" "$chart/files/recording-rules.yaml" <<'PY'
import os, re, sys, yaml

exprs = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
repo = sys.argv[3]
errors = []
rules = []
for i, e in enumerate(exprs):
    others = set(re.findall(r"\$\{?(\w+)", e)) - {"namespace", "vm"}
    if others:
        errors.append(f"dashboard query uses Grafana variables {sorted(others)} (only $namespace and $vm are allowed): {e}")
    # How the e2e substitutes them: both are regexes, All = .*
    rules.append({"record": f"corescale:dashboard_query_{i}", "expr": e.replace("$namespace", ".*").replace("$vm", ".*")})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))

# Every metric the dashboard and the alerts name is defined in the Rust sources.
src = ""
for d in ("operator/src", "node-vmm/src", "common/src", "api/src"):
    for root, _, files in os.walk(os.path.join(repo, d)):
        for f in files:
            if f.endswith(".rs"):
                src += open(os.path.join(root, f)).read()
alerts = open(sys.argv[4]).read() + "\n" + open(sys.argv[5]).read()
# Recorded series (level:corescale_metric:operations) are defined by the rules, not the sources.
used = set(re.findall(r"(?<![\w:])(corescale_[a-z_]+)\b(?!:)", "\n".join(exprs) + "\n" + alerts))
for m in sorted(used):
    base = re.sub(r"_(bucket|sum|count)$", "", m)
    if f'"{base}"' not in src and f'"{m}"' not in src:
        errors.append(f"metric {m} (dashboard, alerts or recording rules) is not defined in the Rust sources")
if errors:
    for e in errors:
        print(f"check-chart.sh: error: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-chart.sh: {len(exprs)} dashboard queries use only $namespace/$vm; {len(used)} metric names exist in the sources", file=sys.stderr)
PY
promtool check rules "$work/dashboard-rules.yaml" >"$work/promtool.log" 2>&1 ||
	{ cat "$work/promtool.log" >&2; die "a dashboard query is not valid PromQL (see above)"; }
log "dashboard queries parse as PromQL"

# --- 6: the chart's CRD is the generated one -----------------------------------------------
for f in "$repo"/crds/*.yaml; do
	cmp -s "$f" "$chart/crds/$(basename "$f")" ||
		die "charts/corescale/crds/$(basename "$f") differs from crds/$(basename "$f"): run 'make generate'"
done
log "ok"
