//! Benchmarks against a running stack (`e2e/bench.sh` brings one up). Each prints its
//! figures and writes JSON under the stack directory; none is pass/fail.
//!
//! `corescale-bench overhead [ROUNDS] [PER_ROUND]`: control-plane overhead of a resize on a
//! real guest, against a direct QMP + guest-agent client doing the same on the same guest
//! in the same run: from the API write to the node agent's backend call, and to the status
//! showing the vCPUs online (as a watch sees it); the ratio of the medians. Defaults: 4
//! rounds of 10 resizes. `CORESCALE_BENCH_PLOT=file.png` also plots the percentiles. It
//! ends with the API server's share (see `floor`), measured in the same run.
//!
//! `corescale-bench floor [N]`: the API server's own time for each kind of write a resize
//! makes (the user's spec change by `/scale` or by a PATCH, the agent's status report as a
//! server-side apply, a merge patch or a JSON patch), from the request until a watcher sees
//! it; N of each (default 50), with a typical status of a 2-vCPU guest.
//!
//! `corescale-bench crd-cost BASELINE.yaml IMPROVED.yaml [BATCHES] [STATUS_WRITES]`: the API
//! server's CPU per write under each of three CRDs (see `corescale_e2e::crd_cost_bench`;
//! `e2e/crd-cost-bench.sh` brings up a bare control plane for it).

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use corescale_api::{ResizeResult, VirtualMachine};
use corescale_e2e::Stack;
use corescale_node_vmm::backend::qemu::direct::DirectClient;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "bench";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stack = Stack::from_env("bench").await?;
    match args.first().map(String::as_str) {
        Some("overhead") => {
            let rounds = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
            let per_round = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
            overhead(&stack, rounds, per_round).await
        }
        Some("floor") => {
            let n = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(50);
            stack.namespace(NS)?;
            api_floor(&stack, &typical_status()?, n).await.map(|_| ())
        }
        Some("autoscale") => {
            let steps = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let figures = corescale_e2e::autoscale_bench::bench(&stack, NS, steps).await?;
            let path = stack.dir.join("bench-autoscale.json");
            std::fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;
            println!("figures written to {}", path.display());
            Ok(())
        }
        Some("crd-cost") => {
            let path = |i: usize| -> Result<std::path::PathBuf> {
                args.get(i)
                    .map(std::path::PathBuf::from)
                    .context("crd-cost needs BASELINE.yaml and IMPROVED.yaml")
            };
            let batches = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(40);
            let writes = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(8000);
            let figures =
                corescale_e2e::crd_cost_bench::bench(&stack, &path(1)?, &path(2)?, batches, writes)
                    .await?;
            let out = stack.dir.join("bench-crd-cost.json");
            std::fs::write(&out, serde_json::to_string_pretty(&figures)? + "\n")?;
            println!("figures written to {}", out.display());
            Ok(())
        }
        _ => bail!(
            "usage: corescale-bench overhead [ROUNDS] [PER_ROUND] | floor [N] | autoscale [STEPS] | crd-cost BASELINE.yaml IMPROVED.yaml [BATCHES] [STATUS_WRITES]"
        ),
    }
}

/// min, median, p99 (nearest rank) of milliseconds.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    // Nearest rank: the smallest value with at least q of the samples at or below it,
    // computed in integers (percent) so no float-to-index cast is needed.
    let rank = |percent: usize| {
        let i = (percent * v.len()).div_ceil(100).max(1) - 1;
        v[i.min(v.len() - 1)]
    };
    (v[0], rank(50), rank(99))
}

/// One resize through the API: write, then watch until the status shows the target online
/// with a new, successful lastResize.
async fn api_resize(
    api: &Api<VirtualMachine>,
    seen: &Arc<Mutex<Vec<Seen>>>,
    name: &str,
    target: u32,
    last_started: &mut Option<DateTime<Utc>>,
) -> Result<Split> {
    let t_write = Utc::now();
    let body = serde_json::json!({"spec": {"replicas": target}});
    api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hit = seen
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|e| {
                e.at >= t_write
                    && e.cpus == target
                    && e.succeeded
                    && e.started.is_some()
                    && e.started != *last_started
            })
            .cloned();
        if let Some(e) = hit {
            *last_started = e.started;
            let started = e.started.expect("checked");
            let finished = e.finished.unwrap_or(e.at);
            let backend = e.backend_done.unwrap_or(0.0) * 1e3;
            return Ok(Split {
                to_backend: ms(t_write, started),
                backend,
                after: ms(started, finished) - backend,
                report: ms(finished, e.at),
                total: ms(t_write, e.at),
            });
        }
        if Instant::now() > deadline {
            bail!("resize to {target} did not show in status within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What our watch saw of the VM, and when.
#[derive(Clone, Debug)]
struct Seen {
    at: DateTime<Utc>,
    cpus: u32,
    started: Option<DateTime<Utc>>,
    finished: Option<DateTime<Utc>>,
    /// The backend's last phase (online for a plug, released for an unplug), seconds
    /// after the backend call.
    backend_done: Option<f64>,
    succeeded: bool,
}

/// Where one resize's time went, in ms: write -> backend call, the backend's step,
/// the agent's observation after it, its status write until our watch saw it; and the
/// whole, write -> our watch sees the status.
#[derive(Clone, Copy, Debug)]
struct Split {
    to_backend: f64,
    backend: f64,
    after: f64,
    report: f64,
    total: f64,
}

fn ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    f64::from(i32::try_from((b - a).num_microseconds().unwrap_or(0)).unwrap_or(i32::MAX)) / 1000.0
}

/// Control-plane overhead on a real guest, against a direct QMP + agent client doing the
/// same operations on the same guest in the same run. Rounds alternate: `per_round`
/// resizes through the API server (1 -> 2 -> 1 ...), then the node agent is stopped (the
/// launcher keeps the guest) and the direct client plugs and unplugs the same slot
/// `per_round / 2` times, then the agent is started again and re-adopts the guest.
async fn overhead(s: &Stack, rounds: usize, per_round: usize) -> Result<()> {
    s.namespace(NS)?;
    let name = "overhead";
    // Under TCG one QEMU process creates at most maxcpus vCPU threads in its life: the
    // budget covers every plug of both clients plus a warm-up per round.
    let plugs = rounds * (per_round + 2);
    let slots = u32::try_from(plugs + 2)?.clamp(8, 255);
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{cpus: 1, topology: {{sockets: 1, cores: {slots}, threads: 1}}}}\n"
    );
    s.create(NS, &yaml).await?;
    let vm = s.wait_online(NS, name, 1, Duration::from_secs(120)).await?;
    let node = corescale_e2e::node_of(&vm).context("no node in status")?;
    let vm_dir = s
        .dir
        .join("nodes")
        .join(&node)
        .join("vms")
        .join(NS)
        .join(name);

    // Our own watch: when does a watcher see each state of the VM?
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        watch_vm(s, name, move |vm| {
            let at = Utc::now();
            let st = vm.status.unwrap_or_default();
            let lr = st.last_resize;
            seen.lock().expect("not poisoned").push(Seen {
                at,
                cpus: st.cpus.unwrap_or(0),
                started: lr.as_ref().map(|l| l.started_at),
                finished: lr.as_ref().and_then(|l| l.finished_at),
                backend_done: lr
                    .as_ref()
                    .and_then(|l| l.online_seconds.or(l.acked_seconds)),
                succeeded: lr.is_some_and(|l| {
                    l.finished_at.is_some() && l.result == ResizeResult::Succeeded
                }),
            });
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let api = s.vms(NS);
    // Samples by "<plug|unplug>_<part>" (the API path) and "direct_<...>".
    let mut m: HashMap<String, Vec<f64>> = HashMap::new();
    let mut last_started: Option<DateTime<Utc>> = None;
    let mut direct_id = 0;
    for round in 0..rounds {
        // Warm-up after the agent (re)adopted the guest: not timed.
        for target in [2, 1] {
            api_resize(&api, &seen, name, target, &mut last_started).await?;
        }
        for i in 0..per_round {
            let target = if i % 2 == 0 { 2 } else { 1 };
            let split = api_resize(&api, &seen, name, target, &mut last_started).await?;
            let d = if target == 2 { "plug" } else { "unplug" };
            for (k, v) in [
                ("to_backend", split.to_backend),
                ("backend", split.backend),
                ("after", split.after),
                ("report", split.report),
                ("status", split.total),
            ] {
                m.entry(format!("{d}_{k}")).or_default().push(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The same operations by a direct client on the same guest.
        s.stack(&["agent", "stop", &node])?;
        let dir = vm_dir.clone();
        let n = per_round / 2;
        let first = direct_id;
        direct_id += n;
        let direct = tokio::task::spawn_blocking(move || -> Result<Vec<(f64, f64)>> {
            let mut d = DirectClient::connect(&dir, Duration::from_secs(30))?;
            let slot = d.slot(0, 1, 0)?;
            let mut out = Vec::new();
            for k in 0..n {
                let id = format!("bench-direct-{}", first + k);
                let p = d.plug_online(&slot, &id, 1)?;
                std::thread::sleep(Duration::from_millis(100));
                let u = d.unplug(&id, p.logical, 1)?;
                std::thread::sleep(Duration::from_millis(100));
                out.push((p.online.as_secs_f64() * 1e3, u.acked.as_secs_f64() * 1e3));
            }
            Ok(out)
        })
        .await??;
        for (plug, unplug) in direct {
            m.entry("direct_plug_online".into()).or_default().push(plug);
            m.entry("direct_unplug_acked".into())
                .or_default()
                .push(unplug);
        }
        s.stack(&["agent", "start", &node])?;
        println!("round {}/{rounds} done", round + 1);
    }
    watch.abort();
    let last = api.get(name).await?.status.unwrap_or_default();
    s.delete(NS, name).await?;
    let floor = api_floor(s, &last, 20).await?;

    let stat = |k: &str| -> (f64, f64, f64) {
        let mut v = m.get(k).cloned().unwrap_or_default();
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        stats(&mut v)
    };
    let rows = [
        ("plug_to_backend", "plug: API write -> backend call"),
        ("unplug_to_backend", "unplug: API write -> backend call"),
        ("plug_status", "plug: API write -> status online"),
        ("direct_plug_online", "plug: direct QMP+agent -> online"),
        ("unplug_status", "unplug: API write -> status shows it"),
        (
            "direct_unplug_acked",
            "unplug: direct QMP+agent -> released",
        ),
    ];
    println!(
        "control-plane overhead on a QEMU/TCG guest, {rounds} rounds of {per_round} API resizes and {} direct plug+unplug cycles (ms):",
        per_round / 2
    );
    println!("  {:<40} {:>8} {:>8} {:>8}", "", "min", "median", "p99");
    let mut json = serde_json::Map::new();
    for (k, label) in rows {
        let (a, b, c) = stat(k);
        println!("  {label:<40} {a:>8.1} {b:>8.1} {c:>8.1}");
        json.insert(
            k.into(),
            serde_json::json!({"min": a, "median": b, "p99": c, "samples": m.get(k).map_or(0, Vec::len)}),
        );
    }
    println!("  where the API path's time goes (medians, ms): write -> backend call | backend step | agent after the step | status write -> watch");
    for d in ["plug", "unplug"] {
        let med = |k: &str| stat(&format!("{d}_{k}")).1;
        let row = [
            med("to_backend"),
            med("backend"),
            med("after"),
            med("report"),
        ];
        println!(
            "    {d:<7} {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1}",
            row[0], row[1], row[2], row[3]
        );
        json.insert(
            format!("{d}_split_ms"),
            serde_json::json!({"to_backend": row[0], "backend": row[1], "after_step": row[2], "status_to_watch": row[3]}),
        );
    }
    let ratio_plug = stat("plug_status").1 / stat("direct_plug_online").1;
    let ratio_unplug = stat("unplug_status").1 / stat("direct_unplug_acked").1;
    println!("  end-to-end / direct (medians): plug {ratio_plug:.2}, unplug {ratio_unplug:.2}   (goal, issue #7: <= 1.3)");
    json.insert("ratio_plug".into(), ratio_plug.into());
    json.insert("ratio_unplug".into(), ratio_unplug.into());
    json.insert("api_floor_ms".into(), floor);
    json.insert("benchmark".into(), "control-plane-overhead".into());
    json.insert("machine".into(), corescale_e2e::machine().into());
    let out = s.dir.join("bench-overhead.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    println!("  written to {}", out.display());
    if let Some(png) = std::env::var_os("CORESCALE_BENCH_PLOT") {
        plot_latency(std::path::Path::new(&png), &mut m)?;
    }
    Ok(())
}

/// What an agent reports for a running 2-vCPU guest after a resize.
fn typical_status() -> Result<corescale_api::VirtualMachineStatus> {
    Ok(serde_yaml::from_str(
        "phase: Running\nnodeName: node-a\ncpus: 2\nmaxCpus: 8\naccelerator: tcg\nguestAgent: Connected\n\
         vcpus:\n\
         - {index: 0, socket: 0, core: 0, thread: 0, numaNode: 0, state: Online, since: '2026-12-01T00:00:00Z', guestCpu: 0}\n\
         - {index: 1, socket: 0, core: 1, thread: 0, numaNode: 0, state: Online, since: '2026-12-01T00:00:01Z', guestCpu: 1}\n\
         conditions:\n\
         - {type: Running, status: 'True', reason: GuestRunning, message: the guest runs, lastTransitionTime: '2026-12-01T00:00:00Z', observedGeneration: 2}\n\
         - {type: Ready, status: 'True', reason: AsRequested, message: 2 of 2 vCPUs online, lastTransitionTime: '2026-12-01T00:00:01Z', observedGeneration: 2}\n\
         - {type: ResizeInProgress, status: 'False', reason: Done, message: 1 -> 2 vCPUs, lastTransitionTime: '2026-12-01T00:00:01Z', observedGeneration: 2}\n\
         observedGeneration: 2\n\
         lastResize: {from: 1, to: 2, startedAt: '2026-12-01T00:00:00Z', finishedAt: '2026-12-01T00:00:01Z', seconds: 0.1, appliedSeconds: 0.002, ackedSeconds: 0.05, onlineSeconds: 0.09, result: Succeeded}\n",
    )?)
}

/// Watch the VM `name` of the benchmark's namespace, handing each version to `on_vm` the
/// moment it arrives; abort the task to stop.
fn watch_vm(
    s: &Stack,
    name: &str,
    mut on_vm: impl FnMut(VirtualMachine) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let api = s.vms(NS);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut st = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
        while let Some(Ok(vm)) = st.next().await {
            on_vm(vm);
        }
    })
}

/// The API server's own share of a resize: each kind of write a resize makes (the spec
/// change, the agent's status report), timed from the request until a watcher sees the
/// object it produced, on a VM that no agent runs (its nodeSelector matches no node).
/// The status body is the one the agent last wrote for the overhead VM. The kinds take
/// turns, `n` writes each, so a noisy period of the host hits them alike.
async fn api_floor(
    s: &Stack,
    status: &corescale_api::VirtualMachineStatus,
    n: usize,
) -> Result<serde_json::Value> {
    let name = "floor";
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{cpus: 1, nodeSelector: {{corescale.dev/bench: nowhere}}, topology: {{sockets: 1, cores: 8, threads: 1}}}}\n"
    );
    s.create(NS, &yaml).await?;
    let api = s.vms(NS);
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        watch_vm(s, name, move |vm| {
            if let Some(rv) = vm.metadata.resource_version {
                seen.lock()
                    .expect("not poisoned")
                    .insert(rv, Instant::now());
            }
        })
    };
    // Let the operator write its Unschedulable status first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let apply = PatchParams::apply("bench-agent").force();
    let plain = PatchParams::default();
    let kinds = [
        "scale PATCH (merge)",
        "spec PATCH (merge)",
        "status apply (server-side)",
        "status PATCH (merge)",
        "status PATCH (JSON patch)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut st = status.clone();
    let mut spec_writes = 0u32;
    for i in 0..n * kinds.len() {
        let kind = i % kinds.len();
        // Every spec write changes the value (1, 2, 3, 1, ...): an unchanged spec is no
        // write at all.
        let cpus = if kind < 2 {
            spec_writes += 1;
            1 + spec_writes % 3
        } else {
            1 + u32::try_from(i % 2)?
        };
        st.cpus = Some(cpus);
        if let Some(lr) = st.last_resize.as_mut() {
            lr.message = Some(format!("floor {i}"));
        }
        let t0 = Instant::now();
        let vm = match kind {
            0 => {
                let body = serde_json::json!({"spec": {"replicas": cpus}});
                let sc = api.patch_scale(name, &plain, &Patch::Merge(&body)).await?;
                sc.metadata.resource_version
            }
            1 => {
                let body = serde_json::json!({"spec": {"cpus": cpus}});
                api.patch(name, &plain, &Patch::Merge(&body))
                    .await?
                    .metadata
                    .resource_version
            }
            2 => {
                let body = corescale_api::status_apply_body(&st);
                api.patch_status(name, &apply, &Patch::Apply(&body))
                    .await?
                    .metadata
                    .resource_version
            }
            3 => {
                let body = serde_json::json!({"status": {
                    "cpus": st.cpus, "vcpus": st.vcpus, "lastResize": st.last_resize,
                    "observedGeneration": st.observed_generation}});
                api.patch_status(name, &plain, &Patch::Merge(&body))
                    .await?
                    .metadata
                    .resource_version
            }
            _ => {
                let ops = serde_json::json!([
                    {"op": "add", "path": "/status/cpus", "value": st.cpus},
                    {"op": "add", "path": "/status/vcpus", "value": st.vcpus},
                    {"op": "add", "path": "/status/lastResize", "value": st.last_resize},
                ]);
                let patch: json_patch::Patch = serde_json::from_value(ops)?;
                api.patch_status(name, &plain, &Patch::<()>::Json(patch))
                    .await?
                    .metadata
                    .resource_version
            }
        };
        let rv = vm.context("a write returned no resourceVersion")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let at = loop {
            if let Some(at) = seen.lock().expect("not poisoned").get(&rv) {
                break *at;
            }
            if Instant::now() > deadline {
                bail!("the watch did not show resourceVersion {rv} within 10 s");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        samples[kind].push((at - t0).as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    s.delete(NS, name).await?;
    println!("  the API server's share: one write, request -> a watcher sees it ({n} each, ms):");
    let mut out = serde_json::Map::new();
    for (k, mut v) in kinds.iter().zip(samples) {
        let (a, b, c) = stats(&mut v);
        println!("    {k:<38} {a:>8.1} {b:>8.1} {c:>8.1}");
        out.insert(
            (*k).into(),
            serde_json::json!({"min": a, "median": b, "p99": c}),
        );
    }
    Ok(out.into())
}

/// Latency percentiles of each measured path, as a PNG.
fn plot_latency(out: &std::path::Path, m: &mut HashMap<String, Vec<f64>>) -> Result<()> {
    use plotters::prelude::*;
    corescale_e2e::register_plot_font()?;
    let series: [(&str, &str, RGBColor); 4] = [
        ("plug_status", "plug: API write -> status online", BLUE),
        (
            "direct_plug_online",
            "plug: direct QMP+agent",
            RGBColor(120, 160, 255),
        ),
        ("unplug_status", "unplug: API write -> status", RED),
        (
            "direct_unplug_acked",
            "unplug: direct QMP+agent",
            RGBColor(255, 150, 150),
        ),
    ];
    let ymax = series
        .iter()
        .filter_map(|(k, _, _)| m.get(*k))
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(out, (900, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Resize latency percentiles (ms)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..100.0, 0.0..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()?;
    for (k, label, color) in series {
        let Some(v) = m.get_mut(k) else { continue };
        v.sort_by(f64::total_cmp);
        let len = v.len();
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                let p = f64::from(u32::try_from(i + 1).unwrap_or(u32::MAX))
                    / f64::from(u32::try_from(len).unwrap_or(u32::MAX));
                (p * 100.0, y)
            })
            .collect();
        corescale_e2e::plot::line(&mut chart, label, pts, color)?;
    }
    corescale_e2e::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    println!("  plot written to {}", out.display());
    Ok(())
}
