//! Scale benchmarks (issue 7) against a stack of simulated nodes that `e2e/scale.sh` brings
//! up. Each prints its figures and writes JSON under the stack directory; none is pass/fail.
//!
//! `corescale-scale run N [TAG]`: N VMs (`cpus: 1`, topology 1x4x1) applied at once; time until
//! all are Running; then every VM gets `spec.cpus: 2` at once (a resize storm); time until
//! every status matches. For each phase: CPU seconds and peak RSS (VmHWM) of the operator,
//! the node agents, kube-apiserver and etcd, and the API requests counted by the
//! apiserver's `apiserver_request_total`. With `IDLE=M` in the environment, M halted VMs
//! are created first in a namespace of their own: the same N VMs then run against a store
//! of N + M (what a bigger store alone costs). Results: `scale-<N><TAG>.json`.
//!
//! `corescale-scale growth A.json B.json ...`: how time and memory grow with N (medians
//! of the runs of each size; `scale_growth`).
//!
//! `corescale-scale plot OUT.png A.json B.json ...`: the same as a PNG.

use anyhow::{anyhow, bail, Context as _, Result};
use corescale_api::{Phase, VirtualMachine};
use corescale_e2e::scale_growth as growth;
use corescale_e2e::scale_watch::{wait_all, watch_ns, Waited};
use corescale_e2e::Stack;
use futures::{StreamExt, TryStreamExt};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NS: &str = "scale";
/// Where `IDLE` halted VMs wait (their own namespace: the measured watch does not see them).
const IDLE_NS: &str = "scale-idle";
/// Requests the benchmark sends at once (creates, patches).
const PARALLEL: usize = 64;
/// How long the agents are watched with nothing changing, after the storm.
const STEADY: Duration = Duration::from_secs(15);
/// Goals of issue 7.
const GOAL_SECONDS: f64 = 30.0;
const GOAL_OPERATOR_MIB: f64 = 150.0;
const GOAL_AGENT_BASE_MIB: f64 = 50.0;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {
            let n: usize = args
                .get(1)
                .map(|s| s.parse())
                .transpose()
                .context("N must be a number")?
                .unwrap_or(1000);
            let idle: usize = std::env::var("IDLE")
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| v.parse())
                .transpose()
                .context("IDLE must be a number")?
                .unwrap_or(0);
            let tag = args.get(2).cloned().unwrap_or_default();
            let stack = Stack::from_env("scale").await?;
            run(&stack, n, idle, &tag).await
        }
        Some("growth") => {
            growth::growth(&growth::load(&args[1..])?);
            Ok(())
        }
        Some("plot") => {
            let out = args.get(1).ok_or_else(|| anyhow!("plot needs OUT.png"))?;
            growth::plot(Path::new(out), &growth::load(&args[2..])?)
        }
        _ => bail!("usage: corescale-scale run N [TAG] | growth JSON... | plot OUT.png JSON..."),
    }
}

// --- processes ---------------------------------------------------------------

/// A process we measure.
struct Proc {
    role: String,
    node: Option<String>,
    pid: u32,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    cpu_seconds: f64,
    hwm_mib: f64,
}

fn sample(pid: u32, ticks: f64) -> Result<Sample> {
    let cpu_seconds = corescale_e2e::procs::cpu_seconds(pid, ticks)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status: no VmHWM"))?;
    Ok(Sample {
        cpu_seconds,
        hwm_mib: hwm_kib / 1024.0,
    })
}

fn processes(s: &Stack) -> Result<Vec<Proc>> {
    let pid_file = |p: PathBuf| -> Result<u32> {
        std::fs::read_to_string(&p)
            .with_context(|| format!("{} is missing: run e2e/scale.sh up", p.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", p.display()))
    };
    let mut out = vec![Proc {
        role: "operator".into(),
        node: None,
        pid: pid_file(s.dir.join("operator.pid"))?,
    }];
    let mut nodes: Vec<_> = std::fs::read_dir(s.dir.join("nodes"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    nodes.sort();
    for n in nodes {
        out.push(Proc {
            role: "agent".into(),
            pid: pid_file(s.dir.join("nodes").join(&n).join("agent.pid"))?,
            node: Some(n),
        });
    }
    for (role, var) in [
        ("kube-apiserver", "CORESCALE_APISERVER_PID"),
        ("etcd", "CORESCALE_ETCD_PID"),
        // Its garbage collector watches every resource, VMs and Events included.
        ("kube-controller-manager", "CORESCALE_KCM_PID"),
    ] {
        out.push(Proc {
            role: role.into(),
            node: None,
            pid: s.var(var)?.parse()?,
        });
    }
    Ok(out)
}

fn samples(procs: &[Proc], ticks: f64) -> Result<Vec<Sample>> {
    procs.iter().map(|p| sample(p.pid, ticks)).collect()
}

// --- the apiserver's request counter -------------------------------------------

/// The API server's counters the benchmark reads.
struct ApiCounters {
    /// apiserver_request_total summed by (verb, resource, subresource).
    requests: BTreeMap<String, f64>,
    /// API Priority and Fairness: for the requests that ran, by "flow schema (priority
    /// level)", their number ("... requests"), their seconds queued ("... wait"), and the
    /// requests refused with 429 ("... rejected": queues full or waited too long; kube's
    /// client sends them again after a backoff).
    apf: BTreeMap<String, f64>,
}

fn api_counters(s: &Stack) -> Result<ApiCounters> {
    let token = std::fs::read_to_string(s.var("CORESCALE_ADMIN_TOKEN_FILE")?)?;
    let url = format!("{}/metrics", s.var("CORESCALE_APISERVER_URL")?);
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--cacert", s.var("CORESCALE_CA_FILE")?, "-H"])
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg(&url)
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut c = ApiCounters {
        requests: BTreeMap::new(),
        apf: BTreeMap::new(),
    };
    const WAIT: &str = "apiserver_flowcontrol_request_wait_duration_seconds_";
    const REJECTED: &str = "apiserver_flowcontrol_rejected_requests_total";
    for line in text.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split("\",")
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let value = value.trim().parse::<f64>().unwrap_or(0.0);
        if name == "apiserver_request_total" {
            let mut key = format!("{} {}", label("verb"), label("resource"));
            let sub = label("subresource");
            if !sub.is_empty() {
                key = format!("{key}/{sub}");
            }
            *c.requests.entry(key).or_insert(0.0) += value;
        } else if name == REJECTED {
            let key = format!(
                "{} ({}) rejected",
                label("flow_schema"),
                label("priority_level")
            );
            *c.apf.entry(key).or_insert(0.0) += value;
        } else if let Some(what) = name.strip_prefix(WAIT) {
            let what = match what {
                "count" => "requests",
                "sum" => "wait",
                _ => continue,
            };
            if label("execute") != "true" {
                continue;
            }
            let key = format!(
                "{} ({}) {what}",
                label("flow_schema"),
                label("priority_level")
            );
            *c.apf.entry(key).or_insert(0.0) += value;
        }
    }
    Ok(c)
}

/// The APF figures of a phase as (flow schema (priority level), requests, mean wait s,
/// rejected), most requests first.
fn apf_rows(apf: &BTreeMap<String, f64>) -> Vec<(String, f64, f64, f64)> {
    let mut rows: Vec<_> = apf
        .iter()
        .filter_map(|(k, n)| {
            let flow = k.strip_suffix(" requests")?;
            let wait = apf.get(&format!("{flow} wait")).copied().unwrap_or(0.0);
            let rejected = apf.get(&format!("{flow} rejected")).copied().unwrap_or(0.0);
            Some((flow.to_string(), *n, wait / n, rejected))
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

// --- the benchmark ----------------------------------------------------------

struct Phase1Or2 {
    seconds: Waited,
    before: Vec<Sample>,
    after: Vec<Sample>,
    requests: BTreeMap<String, f64>,
    apf: BTreeMap<String, f64>,
    own_requests: usize,
}

fn report(
    name: &str,
    n: usize,
    procs: &[Proc],
    p: &Phase1Or2,
    per_node: &BTreeMap<String, usize>,
) -> Value {
    let Waited {
        all: total,
        half,
        ninety,
        ..
    } = p.seconds;
    let cpu = |i: usize| p.after[i].cpu_seconds - p.before[i].cpu_seconds;
    let requests: f64 = p.requests.values().sum();
    let own = f64::from(u32::try_from(p.own_requests).unwrap_or(u32::MAX));
    let nf = f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    let mut roles: BTreeMap<&str, (f64, f64)> = BTreeMap::new(); // cpu sum, max hwm
    let mut agents = vec![];
    let mut agent_goal_met = true;
    for (i, pr) in procs.iter().enumerate() {
        let e = roles.entry(pr.role.as_str()).or_insert((0.0, 0.0));
        e.0 += cpu(i);
        e.1 = e.1.max(p.after[i].hwm_mib);
        if let Some(node) = &pr.node {
            let vms = per_node.get(node).copied().unwrap_or(0);
            let goal = GOAL_AGENT_BASE_MIB + f64::from(u32::try_from(vms).unwrap_or(0));
            agent_goal_met &= p.after[i].hwm_mib <= goal;
            agents.push(json!({"node": node, "vms": vms, "cpu_seconds": cpu(i),
                "peak_rss_mib": p.after[i].hwm_mib, "goal_mib": goal}));
        }
    }
    println!("  {name}: {n} VMs in {total:.2} s (50 % at {half:.2} s, 90 % at {ninety:.2} s)");
    println!(
        "    API requests: {requests:.0} ({:.2} per VM; {:.2} per VM besides the benchmark's own {})",
        requests / nf,
        (requests - own) / nf,
        p.own_requests
    );
    let mut top: Vec<_> = p.requests.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(a.1));
    for (k, v) in top.iter().take(8) {
        println!("      {v:>8.0}  {k}");
    }
    let apf = apf_rows(&p.apf);
    println!(
        "    API Priority and Fairness (requests that ran, mean time queued, refused with 429):"
    );
    for (flow, n, wait, rejected) in apf.iter().take(6) {
        println!(
            "      {n:>8.0}  {flow}: {:.1} ms, {rejected:.0} refused",
            wait * 1000.0
        );
    }
    println!(
        "    {:<16} {:>12} {:>14}",
        "process", "CPU seconds", "peak RSS MiB"
    );
    for (role, (c, h)) in &roles {
        let label = if *role == "agent" {
            format!("agents ({})", agents.len())
        } else {
            (*role).to_string()
        };
        let hw = if *role == "agent" {
            format!("{h:.1} max")
        } else {
            format!("{h:.1}")
        };
        println!("    {label:<16} {c:>12.2} {hw:>14}");
    }
    let op = roles.get("operator").map(|r| r.1).unwrap_or(0.0);
    json!({
        "seconds": total, "seconds_to_half": half, "seconds_to_90_percent": ninety,
        "api_requests": requests,
        "api_requests_per_vm": requests / nf,
        "benchmark_own_requests": p.own_requests,
        "api_requests_per_vm_excluding_benchmark": (requests - own) / nf,
        "api_requests_by_verb_resource": p.requests,
        "apf": apf.iter().map(|(flow, n, wait, rejected)| (flow.clone(), json!({"requests": n, "mean_wait_seconds": wait, "rejected": rejected}))).collect::<serde_json::Map<_, _>>(),
        "cpu_seconds": roles.iter().map(|(r, (c, _))| (r.to_string(), json!(c))).collect::<serde_json::Map<_, _>>(),
        "peak_rss_mib": roles.iter().map(|(r, (_, h))| (r.to_string(), json!(h))).collect::<serde_json::Map<_, _>>(),
        "agents": agents,
        "goals": {
            "seconds": {"goal": GOAL_SECONDS, "met": total <= GOAL_SECONDS},
            "operator_rss_mib": {"goal": GOAL_OPERATOR_MIB, "met": op <= GOAL_OPERATOR_MIB},
            "agent_rss_mib": {"goal": "50 + 1 per VM on the node", "met": agent_goal_met},
        },
    })
}

/// Create `n` VMs named `name(i)` (`cpus: 1`, topology 1x4x1, and the `spec` fields in
/// `extra`, flow-style YAML ending in ", "), PARALLEL requests at once.
async fn create_vms(
    api: &Api<VirtualMachine>,
    n: usize,
    name: impl Fn(usize) -> String,
    extra: &str,
) -> Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, name) = (api.clone(), name(i));
            async move {
                let yaml = format!(
                    "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\n\
                     metadata: {{name: {name}}}\n\
                     spec: {{cpus: 1, {extra}topology: {{sockets: 1, cores: 4, threads: 1}}}}\n"
                );
                let vm: VirtualMachine = serde_yaml::from_str(&yaml)?;
                api.create(&PostParams::default(), &vm)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Fill the cluster with `idle` halted VMs in a namespace of their own (placed, Stopped,
/// no guest), so that the measured phases run against a store of `idle + n` VMs.
async fn prefill(s: &Stack, idle: usize) -> Result<()> {
    if idle == 0 {
        return Ok(());
    }
    s.namespace(IDLE_NS)?;
    let api = s.vms(IDLE_NS);
    let t0 = Instant::now();
    create_vms(
        &api,
        idle,
        |i| format!("idle-{i:05}"),
        "runStrategy: Halted, ",
    )
    .await?;
    let views = watch_ns(s, IDLE_NS);
    let seconds = wait_all(&views, idle, t0, "Stopped", |v| {
        v.phase == Some(Phase::Stopped)
    })
    .await?;
    println!(
        "  prefilled {idle} halted VMs in namespace {IDLE_NS}: all Stopped in {:.2} s",
        seconds.all
    );
    // Let the write burst's after-effects (watch cache, GC) settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(())
}

async fn run(s: &Stack, n: usize, idle: usize, tag: &str) -> Result<()> {
    prefill(s, idle).await?;
    s.namespace(NS)?;
    let ticks = corescale_e2e::procs::clock_ticks();
    let procs = processes(s)?;
    let api = s.vms(NS);
    let views = watch_ns(s, NS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "scale: {n} VMs on {} simulated nodes ({})",
        procs.iter().filter(|p| p.node.is_some()).count(),
        corescale_e2e::machine()
    );

    let loadavg_at_start = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    println!("  load average before: {loadavg_at_start}");
    // 1. Placement and start.
    let before = samples(&procs, ticks)?;
    let c0 = api_counters(s)?;
    let t0 = Instant::now();
    println!("  applying at {}", chrono::Utc::now().to_rfc3339());
    create_vms(&api, n, |i| format!("vm-{i:04}"), "").await?;
    let applied = t0.elapsed().as_secs_f64();
    let seconds = wait_all(&views, n, t0, "Running", |v| {
        v.phase == Some(Phase::Running) && v.status_cpus == 1
    })
    .await?;
    let after = samples(&procs, ticks)?;
    let c1 = api_counters(s)?;
    let start = Phase1Or2 {
        seconds,
        after,
        before,
        requests: delta(&c0.requests, &c1.requests),
        apf: delta(&c0.apf, &c1.apf),
        own_requests: n,
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in views.lock().expect("not poisoned").values() {
        *per_node
            .entry(v.node.clone().unwrap_or_else(|| "(none)".into()))
            .or_insert(0) += 1;
    }
    println!("  all {n} created in {applied:.2} s; VMs per node: {per_node:?}");
    let mut start_json = report("placement and start", n, &procs, &start, &per_node);

    // 2. Resize storm: every VM to 2 vCPUs at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = samples(&procs, ticks)?;
    let c0 = api_counters(s)?;
    let t0 = Instant::now();
    println!("  resizing at {}", chrono::Utc::now().to_rfc3339());
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let body = json!({"spec": {"cpus": 2}});
                api.patch(
                    &format!("vm-{i:04}"),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .with_context(|| format!("patching vm-{i:04}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let seconds = wait_all(&views, n, t0, "resized", |v| {
        v.spec_cpus == 2 && v.status_cpus == 2
    })
    .await?;
    let after = samples(&procs, ticks)?;
    let c1 = api_counters(s)?;
    let storm = Phase1Or2 {
        seconds,
        after,
        before,
        requests: delta(&c0.requests, &c1.requests),
        apf: delta(&c0.apf, &c1.apf),
        own_requests: n,
    };
    let mut storm_json = report("resize storm (1 -> 2 vCPUs)", n, &procs, &storm, &per_node);

    // 3. Steady: nothing changes. What the agents use now is what a running guest costs
    // them per second (its observations), in any phase: the longer a phase, the more of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = samples(&procs, ticks)?;
    tokio::time::sleep(STEADY).await;
    let after = samples(&procs, ticks)?;
    let steady_cpu: f64 = (0..procs.len())
        .filter(|&i| procs[i].node.is_some())
        .map(|i| after[i].cpu_seconds - before[i].cpu_seconds)
        .sum();
    let nf = f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    let per_vm_second = steady_cpu / (nf * STEADY.as_secs_f64());
    println!(
        "  steady ({} s, {n} guests running, nothing changing): agents used {steady_cpu:.2} CPU s, {:.1} us per guest per second",
        STEADY.as_secs(),
        per_vm_second * 1e6
    );
    // The guests ran for the part of the start after each was Running, and for the whole
    // storm.
    let beyond = |phase: &mut Value, vm_seconds: f64| {
        let cpu = phase["cpu_seconds"]["agent"].as_f64().unwrap_or(f64::NAN);
        let b = cpu - per_vm_second * vm_seconds;
        phase["running_vm_seconds"] = json!(vm_seconds);
        phase["agents_cpu_seconds_beyond_steady"] = json!(b);
        b * 1000.0 / nf
    };
    println!(
        "  agents' CPU beyond that steady cost, per VM: start {:.2} ms, storm {:.2} ms",
        beyond(&mut start_json, start.seconds.vm_seconds),
        beyond(&mut storm_json, nf * storm.seconds.all)
    );

    let out = json!({
        "benchmark": "scale",
        "vms": n,
        "idle_vms": idle,
        "nodes": per_node.len(),
        "machine": corescale_e2e::machine(),
        "date": chrono::Utc::now().to_rfc3339(),
        // Other work on the machine competes with the apiserver for its cores.
        "loadavg_at_start": loadavg_at_start,
        "vms_per_node": per_node,
        "start": start_json,
        "resize_storm": storm_json,
        "steady": {"seconds": STEADY.as_secs_f64(), "agents_cpu_seconds": steady_cpu,
            "agents_cpu_seconds_per_vm_second": per_vm_second},
    });
    let path = s.dir.join(format!("scale-{n}{tag}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("  written to {}", path.display());
    Ok(())
}
