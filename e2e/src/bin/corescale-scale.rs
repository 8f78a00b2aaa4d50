//! Scale benchmarks (issue 7) against a stack of simulated nodes that `e2e/scale.sh` brings
//! up. Each prints its figures and writes JSON under the stack directory; none is pass/fail.
//!
//! `corescale-scale run N`: N VMs (`cpus: 1`, topology 1x4x1) applied at once; time until
//! all are Running; then every VM gets `spec.cpus: 2` at once (a resize storm); time until
//! every status matches. For each phase: CPU seconds and peak RSS (VmHWM) of the operator,
//! the node agents, kube-apiserver and etcd, and the API requests counted by the
//! apiserver's `apiserver_request_total`.
//!
//! `corescale-scale growth A.json B.json ...`: how time and memory grow with N.
//!
//! `corescale-scale plot OUT.png A.json B.json ...`: the same as a PNG.

use anyhow::{anyhow, bail, Context as _, Result};
use corescale_api::{Phase, VirtualMachine};
use corescale_e2e::Stack;
use futures::{StreamExt, TryStreamExt};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "scale";
/// Requests the benchmark sends at once (creates, patches).
const PARALLEL: usize = 64;
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
            let stack = Stack::from_env("scale").await?;
            run(&stack, n).await
        }
        Some("growth") => growth(&load(&args[1..])?),
        Some("plot") => {
            let out = args.get(1).ok_or_else(|| anyhow!("plot needs OUT.png"))?;
            plot(Path::new(out), &load(&args[2..])?)
        }
        _ => bail!("usage: corescale-scale run N | growth JSON... | plot OUT.png JSON..."),
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

/// apiserver_request_total summed by (verb, resource, subresource).
fn api_requests(s: &Stack) -> Result<BTreeMap<String, f64>> {
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
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
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
        let mut key = format!("{} {}", label("verb"), label("resource"));
        let sub = label("subresource");
        if !sub.is_empty() {
            key = format!("{key}/{sub}");
        }
        *m.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(m)
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

// --- the benchmark ----------------------------------------------------------

#[derive(Clone, Default)]
struct View {
    phase: Option<Phase>,
    node: Option<String>,
    spec_cpus: u32,
    status_cpus: u32,
}

type Views = Arc<Mutex<HashMap<String, View>>>;

fn watch_all(s: &Stack) -> Views {
    let views: Views = Arc::default();
    let api = s.vms(NS);
    let v = views.clone();
    tokio::spawn(async move {
        let mut st = std::pin::pin!(watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects());
        while let Some(ev) = st.next().await {
            let Ok(vm): Result<VirtualMachine, _> = ev else {
                continue;
            };
            let status = vm.status.as_ref();
            let view = View {
                phase: status.and_then(|s| s.phase),
                node: status.and_then(|s| s.node_name.clone()),
                spec_cpus: vm.spec.cpus,
                status_cpus: status.and_then(|s| s.cpus).unwrap_or(0),
            };
            v.lock().expect("not poisoned").insert(vm.name_any(), view);
        }
    });
    views
}

/// Wait until `pred` holds for all `n` VMs; returns seconds from `t0` to when it held,
/// and the seconds when half and 90 % of them held.
async fn wait_all(
    views: &Views,
    n: usize,
    t0: Instant,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> Result<(f64, f64, f64)> {
    let (mut half, mut ninety) = (None, None);
    let deadline = Duration::from_secs(600);
    loop {
        let done = views
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|v| pred(v))
            .count();
        let t = t0.elapsed().as_secs_f64();
        if half.is_none() && done * 2 >= n {
            half = Some(t);
        }
        if ninety.is_none() && done * 10 >= n * 9 {
            ninety = Some(t);
        }
        if done >= n {
            return Ok((t, half.unwrap_or(t), ninety.unwrap_or(t)));
        }
        if t0.elapsed() > deadline {
            bail!(
                "{what}: only {done} of {n} VMs after {} s",
                deadline.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Phase1Or2 {
    seconds: (f64, f64, f64),
    before: Vec<Sample>,
    after: Vec<Sample>,
    requests: BTreeMap<String, f64>,
    own_requests: usize,
}

fn report(
    name: &str,
    n: usize,
    procs: &[Proc],
    p: &Phase1Or2,
    per_node: &BTreeMap<String, usize>,
) -> Value {
    let (total, half, ninety) = p.seconds;
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

async fn run(s: &Stack, n: usize) -> Result<()> {
    s.namespace(NS)?;
    let ticks = corescale_e2e::procs::clock_ticks();
    let procs = processes(s)?;
    let api = s.vms(NS);
    let views = watch_all(s);
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
    let req0 = api_requests(s)?;
    let t0 = Instant::now();
    println!("  applying at {}", chrono::Utc::now().to_rfc3339());
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let yaml = format!(
                    "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\n\
                     metadata: {{name: vm-{i:04}}}\n\
                     spec: {{cpus: 1, topology: {{sockets: 1, cores: 4, threads: 1}}}}\n"
                );
                let vm: VirtualMachine = serde_yaml::from_str(&yaml)?;
                api.create(&PostParams::default(), &vm)
                    .await
                    .with_context(|| format!("creating vm-{i:04}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let applied = t0.elapsed().as_secs_f64();
    let seconds = wait_all(&views, n, t0, "Running", |v| {
        v.phase == Some(Phase::Running) && v.status_cpus == 1
    })
    .await?;
    let start = Phase1Or2 {
        seconds,
        after: samples(&procs, ticks)?,
        before,
        requests: delta(&req0, &api_requests(s)?),
        own_requests: n,
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in views.lock().expect("not poisoned").values() {
        *per_node
            .entry(v.node.clone().unwrap_or_else(|| "(none)".into()))
            .or_insert(0) += 1;
    }
    println!("  all {n} created in {applied:.2} s; VMs per node: {per_node:?}");
    let start_json = report("placement and start", n, &procs, &start, &per_node);

    // 2. Resize storm: every VM to 2 vCPUs at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = samples(&procs, ticks)?;
    let req0 = api_requests(s)?;
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
    let storm = Phase1Or2 {
        seconds,
        after: samples(&procs, ticks)?,
        before,
        requests: delta(&req0, &api_requests(s)?),
        own_requests: n,
    };
    let storm_json = report("resize storm (1 -> 2 vCPUs)", n, &procs, &storm, &per_node);

    let out = json!({
        "benchmark": "scale",
        "vms": n,
        "nodes": per_node.len(),
        "machine": corescale_e2e::machine(),
        "date": chrono::Utc::now().to_rfc3339(),
        // Other work on the machine competes with the apiserver for its cores.
        "loadavg_at_start": loadavg_at_start,
        "vms_per_node": per_node,
        "start": start_json,
        "resize_storm": storm_json,
    });
    let path = s.dir.join(format!("scale-{n}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("  written to {}", path.display());
    Ok(())
}

// --- growth -------------------------------------------------------------------

fn load(paths: &[String]) -> Result<Vec<Value>> {
    let mut v: Vec<Value> = paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {p}"))
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        bail!("no result files given");
    }
    v.sort_by_key(|r| r["vms"].as_u64().unwrap_or(0));
    Ok(v)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn growth(results: &[Value]) -> Result<()> {
    println!("growth (each row against the first):");
    println!(
        "  {:>5} {:>9} {:>9} {:>10} {:>10} {:>11} {:>9} {:>9}",
        "VMs", "start s", "resize s", "op RSS", "agent RSS", "op CPU s", "req/VM", "x VMs"
    );
    let first = &results[0];
    for r in results {
        let vms = f(r, &["vms"]);
        println!(
            "  {:>5} {:>9.2} {:>9.2} {:>10.1} {:>10.1} {:>11.2} {:>9.2} {:>9.1}",
            vms,
            f(r, &["start", "seconds"]),
            f(r, &["resize_storm", "seconds"]),
            f(r, &["resize_storm", "peak_rss_mib", "operator"]),
            f(r, &["resize_storm", "peak_rss_mib", "agent"]),
            f(r, &["start", "cpu_seconds", "operator"])
                + f(r, &["resize_storm", "cpu_seconds", "operator"]),
            f(r, &["start", "api_requests_per_vm"]),
            vms / f(first, &["vms"]),
        );
    }
    if results.len() > 1 {
        let last = &results[results.len() - 1];
        let x = f(last, &["vms"]) / f(first, &["vms"]);
        let ratio = |p: &[&str]| f(last, p) / f(first, p);
        println!(
            "  {}x the VMs: start {:.1}x, resize {:.1}x, operator RSS {:.2}x, agent RSS {:.2}x (linear or better: <= {x:.0}x)",
            x,
            ratio(&["start", "seconds"]),
            ratio(&["resize_storm", "seconds"]),
            ratio(&["resize_storm", "peak_rss_mib", "operator"]),
            ratio(&["resize_storm", "peak_rss_mib", "agent"]),
        );
    }
    Ok(())
}

fn plot(out: &Path, results: &[Value]) -> Result<()> {
    use plotters::prelude::*;
    corescale_e2e::register_plot_font()?;
    let xs: Vec<f64> = results.iter().map(|r| f(r, &["vms"])).collect();
    let xmax = xs.iter().copied().fold(0.0, f64::max) * 1.05;
    let root = BitMapBackend::new(out, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    type Series<'a> = (&'a str, &'a [&'a str], RGBColor);
    let panels: [(&DrawingArea<_, _>, &str, &str, Vec<Series>); 2] = [
        (
            &left,
            "Time until all VMs match (s)",
            "seconds",
            vec![
                ("placement + start", &["start", "seconds"], BLUE),
                ("resize storm", &["resize_storm", "seconds"], RED),
            ],
        ),
        (
            &right,
            "Peak RSS (MiB)",
            "MiB",
            vec![
                (
                    "operator",
                    &["resize_storm", "peak_rss_mib", "operator"],
                    BLUE,
                ),
                (
                    "node agent (max)",
                    &["resize_storm", "peak_rss_mib", "agent"],
                    RED,
                ),
                (
                    "kube-apiserver",
                    &["resize_storm", "peak_rss_mib", "kube-apiserver"],
                    RGBColor(0, 140, 0),
                ),
            ],
        ),
    ];
    for (area, title, unit, series) in panels {
        let ymax = series
            .iter()
            .flat_map(|(_, p, _)| results.iter().map(|r| f(r, p)))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("VMs (10 simulated nodes)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc(unit)
            .draw()?;
        for (label, p, color) in series {
            let pts: Vec<(f64, f64)> = results.iter().map(|r| (f(r, &["vms"]), f(r, p))).collect();
            corescale_e2e::plot::line(&mut chart, label, pts.clone(), color)?;
            chart.draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )?;
        }
        corescale_e2e::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    println!("plot written to {}", out.display());
    Ok(())
}
