//! `corescale-bench crd-cost BASELINE.yaml IMPROVED.yaml [BATCHES] [STATUS_WRITES]`: what
//! the CRD's validation costs the kube-apiserver per write (issue 22), measured as the API
//! server process's own CPU time (`/proc/<pid>/stat` utime + stime) around a batch of writes.
//!
//! Three variants of the CRD are installed side by side, each under an API group of its own
//! (`a.`, `b.`, `c.crd-cost.corescale.dev`; nothing else differs): (a) BASELINE, (b)
//! BASELINE with every `x-kubernetes-validations` removed (the floor: no CEL at all) and (c)
//! IMPROVED. Each gets [`VMS`] VMs, created in batches, and the operator's placement status
//! once; then STATUS_WRITES status writes per variant shaped like the node agent's
//! (server-side apply of the whole status, field manager `node-vmm`, forced), then
//! [`SPEC_WRITES`] spec writes (merge patches of `spec.cpus`), [`PARALLEL`] in flight. The
//! variants take turns batch by batch (a b c a b c ...), so whatever else the host does hits
//! them alike; each batch is one sample of CPU per write. It prints, per kind of write and
//! variant, the median over the batches with the lowest and highest batch, and the ratios
//! (c)/(a) and (b)/(a): of the medians, and the median of the ratios of batches that ran
//! one after the other.

use crate::procs::median;
use crate::Stack;
use anyhow::{bail, Context as _, Result};
use corescale_api::VirtualMachineStatus;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use std::path::Path;
use std::time::{Duration, Instant};

/// The benchmark's namespace.
const NS: &str = "crd-cost";
/// VMs per variant.
pub const VMS: usize = 200;
/// Spec writes per variant.
pub const SPEC_WRITES: usize = 2000;
/// Requests in flight at once.
pub const PARALLEL: usize = 8;
/// Writes per batch (one sample) of creates and of spec writes.
const CREATE_BATCH: usize = 50;
const SPEC_BATCH: usize = 100;
/// The kinds of writes measured, in the order they run.
const KINDS: [&str; 3] = ["create", "status apply", "spec patch"];
/// Variant labels and the API group each is installed under.
const VARIANTS: [(&str, &str); 3] = [
    ("(a) CRD as generated before", "a.crd-cost.corescale.dev"),
    ("(b) (a) without CEL (floor)", "b.crd-cost.corescale.dev"),
    ("(c) improved CRD", "c.crd-cost.corescale.dev"),
];

/// One variant: its label, CRD and the resource to write to.
struct Variant {
    label: &'static str,
    crd: CustomResourceDefinition,
    ar: ApiResource,
}

/// The kube-apiserver process and its clock.
#[derive(Clone, Copy)]
struct Cpu {
    pid: u32,
    ticks: f64,
}

/// Run the benchmark; returns its figures as JSON.
pub async fn bench(
    s: &Stack,
    baseline: &Path,
    improved: &Path,
    batches: usize,
    status_writes: usize,
) -> Result<serde_json::Value> {
    let a = load_crd(baseline)?;
    let crds = [without_cel(&a)?, load_crd(improved)?];
    let mut variants = Vec::new();
    for ((label, group), crd) in VARIANTS
        .into_iter()
        .zip([a, crds[0].clone(), crds[1].clone()])
    {
        let crd = regrouped(crd, group)?;
        println!("  {label}: {} CEL rules", count_rules(&crd)?);
        let ar = ApiResource {
            group: group.into(),
            version: "v1alpha1".into(),
            api_version: format!("{group}/v1alpha1"),
            kind: "VirtualMachine".into(),
            plural: "virtualmachines".into(),
        };
        variants.push(Variant { label, crd, ar });
    }
    let cpu = Cpu {
        pid: s
            .var("CORESCALE_APISERVER_PID")?
            .parse()
            .context("CORESCALE_APISERVER_PID in the cluster's env is not a pid")?,
        ticks: crate::procs::clock_ticks(),
    };
    s.namespace(NS)?;
    for v in &variants {
        install(s, v).await?;
    }
    let status_batch = status_writes.div_ceil(batches.max(1));
    println!(
        "  kube-apiserver CPU µs per write, per variant: {VMS} creates ({CREATE_BATCH} a batch), {status_writes} agent status applies ({status_batch} a batch), {SPEC_WRITES} spec patches ({SPEC_BATCH} a batch); {PARALLEL} in flight; variants interleaved batch by batch"
    );
    let mut samples: Vec<[Vec<f64>; 3]> = variants.iter().map(|_| Default::default()).collect();
    let plan = [
        (CREATE_BATCH, VMS),
        (status_batch, status_batch * batches.max(1)),
        (SPEC_BATCH, SPEC_WRITES),
    ];
    for (kind, (batch, total)) in plan.into_iter().enumerate() {
        for first in (0..total).step_by(batch) {
            let n = batch.min(total - first);
            for (i, v) in variants.iter().enumerate() {
                samples[i][kind].push(write_batch(s, cpu, v, kind, first, n).await?);
            }
        }
        if kind == 0 {
            for v in &variants {
                place_all(s, v).await?;
            }
        }
    }
    for v in &variants {
        remove_crd(s, &v.crd).await?;
    }
    report(&variants, &samples)
}

/// Medians, spread and ratios of the batches; returns the JSON figures.
fn report(variants: &[Variant], samples: &[[Vec<f64>; 3]]) -> Result<serde_json::Value> {
    let med = |v: usize, k: usize| median(samples[v][k].clone());
    println!("  median of the batches [lowest - highest batch], kube-apiserver CPU µs per write:");
    println!(
        "    {:<30} {:>22} {:>22} {:>22}",
        "", KINDS[0], KINDS[1], KINDS[2]
    );
    let mut json = serde_json::Map::new();
    for (v, variant) in variants.iter().enumerate() {
        let mut cells = Vec::new();
        let mut kinds = serde_json::Map::new();
        for (k, kind) in KINDS.iter().enumerate() {
            let all = &samples[v][k];
            let (lo, hi) = all.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
            cells.push(format!("{:.0} [{lo:.0} - {hi:.0}]", med(v, k)));
            kinds.insert(
                (*kind).into(),
                serde_json::json!({"median_us": med(v, k), "batches_us": all}),
            );
        }
        println!(
            "    {:<30} {:>22} {:>22} {:>22}",
            variant.label, cells[0], cells[1], cells[2]
        );
        json.insert(variant.label.into(), kinds.into());
    }
    // Two views of each ratio: of the medians, and the median of the ratios of batches that
    // ran one after the other (a drift of the host's load cancels out in those pairs).
    let mut ratios = serde_json::Map::new();
    let mut paired = serde_json::Map::new();
    for (num, name) in [(2, "(c)/(a)"), (1, "(b)/(a)")] {
        let r: Vec<f64> = (0..KINDS.len()).map(|k| med(num, k) / med(0, k)).collect();
        let p: Vec<f64> = (0..KINDS.len())
            .map(|k| {
                let pairs = samples[num][k].iter().zip(&samples[0][k]);
                median(pairs.map(|(x, a)| x / a).collect())
            })
            .collect();
        println!(
            "  {name}: of the medians {} {:.2}, {} {:.2}, {} {:.2}; median of paired batches {} {:.2}, {} {:.2}, {} {:.2}",
            KINDS[0], r[0], KINDS[1], r[1], KINDS[2], r[2], KINDS[0], p[0], KINDS[1], p[1], KINDS[2], p[2]
        );
        ratios.insert(
            name.into(),
            serde_json::json!({KINDS[0]: r[0], KINDS[1]: r[1], KINDS[2]: r[2]}),
        );
        paired.insert(
            name.into(),
            serde_json::json!({KINDS[0]: p[0], KINDS[1]: p[1], KINDS[2]: p[2]}),
        );
    }
    json.insert("ratios".into(), ratios.into());
    json.insert("paired_ratios".into(), paired.into());
    json.insert("benchmark".into(), "crd-validation-cost".into());
    json.insert("machine".into(), crate::machine().into());
    Ok(json.into())
}

/// A CRD from a YAML file.
fn load_crd(path: &Path) -> Result<CustomResourceDefinition> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not a CRD", path.display()))
}

/// The CRD as a JSON value, for walking its schema.
fn as_value(crd: &CustomResourceDefinition) -> Result<serde_json::Value> {
    serde_json::to_value(crd).context("serializing a CRD")
}

/// `crd` under API group `group`, without short names and categories (which would clash
/// with the real CRD's in kubectl).
fn regrouped(mut crd: CustomResourceDefinition, group: &str) -> Result<CustomResourceDefinition> {
    crd.metadata = Default::default();
    crd.metadata.name = Some(format!("{}.{group}", crd.spec.names.plural));
    crd.spec.group = group.into();
    crd.spec.names.short_names = None;
    crd.spec.names.categories = None;
    crd.status = None;
    if crd.spec.versions.iter().all(|v| v.name != "v1alpha1") {
        bail!("the CRD has no version v1alpha1");
    }
    Ok(crd)
}

/// `crd` with every `x-kubernetes-validations` removed.
fn without_cel(crd: &CustomResourceDefinition) -> Result<CustomResourceDefinition> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = as_value(crd)?;
    strip(&mut v);
    serde_json::from_value(v).context("a CRD without its CEL rules")
}

/// How many CEL rules the CRD holds.
fn count_rules(crd: &CustomResourceDefinition) -> Result<usize> {
    fn count(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(m) => {
                m.get("x-kubernetes-validations")
                    .and_then(serde_json::Value::as_array)
                    .map_or(0, Vec::len)
                    + m.values().map(count).sum::<usize>()
            }
            serde_json::Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    Ok(count(&as_value(crd)?))
}

/// Delete the CRD (and with it its objects) if present; bounded wait until it is gone.
async fn remove_crd(s: &Stack, crd: &CustomResourceDefinition) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(s.client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    if crds.get_opt(&name).await?.is_none() {
        return Ok(());
    }
    crds.delete(&name, &DeleteParams::background()).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while crds.get_opt(&name).await?.is_some() {
        if Instant::now() > deadline {
            bail!("CRD {name} still present 180 s after its deletion");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Install the variant's CRD afresh: wait until it is Established and its objects can be
/// listed.
async fn install(s: &Stack, v: &Variant) -> Result<()> {
    remove_crd(s, &v.crd).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(s.client.clone());
    let name = v.crd.metadata.name.clone().unwrap_or_default();
    crds.create(&Default::default(), &v.crd)
        .await
        .with_context(|| format!("creating CRD {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let established = crds.get(&name).await?.status.is_some_and(|st| {
            st.conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established
            && api(s, v)
                .list(&ListParams::default().limit(1))
                .await
                .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CRD {name} not Established and served within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn api(s: &Stack, v: &Variant) -> Api<DynamicObject> {
    Api::namespaced_with(s.client.clone(), NS, &v.ar)
}

/// User + system CPU seconds of the kube-apiserver so far.
fn cpu_seconds(cpu: Cpu) -> Result<f64> {
    crate::procs::cpu_seconds(cpu.pid, cpu.ticks)
        .with_context(|| format!("kube-apiserver (pid {})", cpu.pid))
}

fn vm_name(i: usize) -> String {
    format!("vm-{i:04}")
}

/// A user's VM: a 1-vCPU guest of up to 4 with a disk from an image and an SSH port.
fn vm_manifest(v: &Variant, i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": v.ar.api_version,
        "kind": "VirtualMachine",
        "metadata": {"name": vm_name(i), "namespace": NS},
        "spec": {
            "cpus": 1,
            "topology": {"sockets": 1, "cores": 4, "threads": 1},
            "memory": "512Mi",
            "disks": [{"name": "root", "image": "debian-12.qcow2"}],
            "ports": [{"name": "ssh", "guestPort": 22}],
        }
    })
}

/// The body of a server-side apply of `status`, as `corescale_api::status_apply_body` makes
/// it for the real group.
fn status_body(v: &Variant, status: &VirtualMachineStatus) -> serde_json::Value {
    serde_json::json!({"apiVersion": v.ar.api_version, "kind": "VirtualMachine", "status": status})
}

/// What the operator writes once it placed the VM.
fn placed_status(i: usize) -> VirtualMachineStatus {
    VirtualMachineStatus {
        phase: Some(corescale_api::Phase::Scheduled),
        node_name: Some(format!("node-{}", i % 10)),
        max_cpus: Some(4),
        topology: Some(corescale_api::Topology::new(1, 4, 1)),
        selector: Some(format!("{}={}", corescale_api::VM_LABEL, vm_name(i))),
        ..Default::default()
    }
}

/// The agent's status of a running guest after its `k`-th resize: 1 or 2 vCPUs online.
fn agent_status(k: usize) -> Result<VirtualMachineStatus> {
    let cpus = 1 + k % 2;
    let mut vcpus = String::new();
    for i in 0..cpus {
        vcpus += &format!(
            "- {{index: {i}, socket: 0, core: {i}, thread: 0, numaNode: 0, state: Online, since: '2026-12-01T00:00:0{i}Z', guestCpu: {i}}}\n"
        );
    }
    let yaml = format!(
        "phase: Running\ncpus: {cpus}\naccelerator: tcg\nguestAgent: Connected\nvcpus:\n{vcpus}\
         conditions:\n\
         - {{type: Running, status: 'True', reason: GuestRunning, message: the guest runs, lastTransitionTime: '2026-12-01T00:00:00Z', observedGeneration: 1}}\n\
         - {{type: Ready, status: 'True', reason: AsRequested, message: {cpus} of {cpus} vCPUs online, lastTransitionTime: '2026-12-01T00:00:01Z', observedGeneration: 1}}\n\
         - {{type: ResizeInProgress, status: 'False', reason: Done, message: resize {k}, lastTransitionTime: '2026-12-01T00:00:01Z', observedGeneration: 1}}\n\
         observedGeneration: 1\n\
         lastResize: {{from: {}, to: {cpus}, startedAt: '2026-12-01T00:00:00Z', finishedAt: '2026-12-01T00:00:01Z', seconds: 0.1, appliedSeconds: 0.002, ackedSeconds: 0.05, onlineSeconds: 0.09, result: Succeeded}}\n",
        3 - cpus
    );
    serde_yaml::from_str(&yaml).context("the agent's status")
}

/// The operator's placement status on every VM of the variant (not measured).
async fn place_all(s: &Stack, v: &Variant) -> Result<()> {
    let (api, pp) = (api(s, v), PatchParams::apply("corescale-operator").force());
    stream::iter(0..VMS)
        .map(|i| {
            let (api, pp) = (api.clone(), pp.clone());
            let body = status_body(v, &placed_status(i));
            async move {
                api.patch_status(&vm_name(i), &pp, &Patch::Apply(&body))
                    .await
                    .with_context(|| format!("placing {}", vm_name(i)))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Writes `first..first + n` of kind `kind` to the variant, [`PARALLEL`] at a time: the API
/// server's CPU µs per write. Write k goes to VM k % VMS; every status and spec write
/// differs from what the VM holds (the resize count, and with it cpus, moves on).
async fn write_batch(
    s: &Stack,
    cpu: Cpu,
    v: &Variant,
    kind: usize,
    first: usize,
    n: usize,
) -> Result<f64> {
    let api = api(s, v);
    let agent = PatchParams::apply("node-vmm").force();
    let plain = PatchParams::default();
    let mut bodies = Vec::with_capacity(n);
    for k in first..first + n {
        bodies.push(match kind {
            0 => vm_manifest(v, k),
            1 => status_body(v, &agent_status(k / VMS + 1)?),
            _ => serde_json::json!({"spec": {"cpus": 1 + (k / VMS + 1) % 2}}),
        });
    }
    let before = cpu_seconds(cpu)?;
    stream::iter((first..).zip(bodies))
        .map(|(k, body)| {
            let (api, agent, plain) = (api.clone(), agent.clone(), plain.clone());
            async move {
                let name = vm_name(k % VMS);
                match kind {
                    0 => {
                        let obj: DynamicObject = serde_json::from_value(body)?;
                        api.create(&Default::default(), &obj).await.map(|_| ())
                    }
                    1 => api
                        .patch_status(&name, &agent, &Patch::Apply(&body))
                        .await
                        .map(|_| ()),
                    _ => api
                        .patch(&name, &plain, &Patch::Merge(&body))
                        .await
                        .map(|_| ()),
                }
                .with_context(|| format!("{} of {name} ({})", KINDS[kind], v.ar.group))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    let after = cpu_seconds(cpu)?;
    Ok((after - before) * 1e6 / f64::from(u32::try_from(n.max(1))?))
}
