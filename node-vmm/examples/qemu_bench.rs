//! Plug and unplug latency of the QEMU backend, per phase, against a minimal direct
//! QMP + guest-agent client doing the same operations on the same guest in the same run.
//!
//! ```text
//! cargo run --release -p corescale-node-vmm --example qemu_bench -- [--runs 20] [--rounds N] [--settle-ms 100]
//! ```
//!
//! One TCG guest (1 socket x `2*runs+8` cores, so the lifetime vCPU-thread budget of TCG
//! covers every plug of both clients). Rounds alternate: the backend plugs and unplugs slot 1
//! `runs/rounds` times, then its handle is dropped and the direct client does the same on
//! the same sockets, then the backend adopts the guest again, and so on. Both clients wait
//! `--settle-ms` between operations: Linux offlines a CPU it onlined a moment ago faster
//! (measured: ~32 ms right after the online vs ~55 ms once settled), which would otherwise
//! favour whichever client unplugs sooner after its plug.
//!
//! Phases, all measured from the start of the operation:
//! plug: `applied` (device_add returned), `acked` (insert ACPI_DEVICE_OST), `online` (the
//! agent reports the new CPU online); unplug: `applied` (offline through the agent, then
//! device_del returned), `acked` (final eject ACPI_DEVICE_OST).

mod common;

use clap::Parser;
use corescale_api::{Arch, Plan, ResizeMethod};
use corescale_node_vmm::backend::qemu::direct::DirectClient;
use corescale_node_vmm::backend::qemu::QemuVm;
use corescale_node_vmm::backend::{ResizeOptions, StepReport, VmHandle};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Plug+unplug cycles per client (at least 20 for the report).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Rounds the runs are split into; the clients alternate each round (default: every
    /// cycle, so both see the same machine load).
    #[arg(long)]
    rounds: Option<usize>,
    /// Pause between operations (both clients), so each starts from a settled guest.
    #[arg(long, default_value_t = 100)]
    settle_ms: u64,
}

#[derive(Default)]
struct Samples {
    plug_applied: Vec<f64>,
    plug_acked: Vec<f64>,
    plug_online: Vec<f64>,
    unplug_applied: Vec<f64>,
    unplug_acked: Vec<f64>,
}

fn ms(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64() * 1e3).expect("phase measured")
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let last = s.len() - 1;
    // Nearest-rank quantile: index round(last * pct / 100).
    let pick = |pct: usize| s[(last * pct + 50) / 100];
    (s[0], pick(50), pick(99))
}

// ---- the backend ------------------------------------------------------------------------

async fn backend_round(vm: &QemuVm, runs: usize, settle: Duration, out: &mut Samples) {
    let opts = ResizeOptions {
        unplug_timeout: Duration::from_secs(20),
        plug_timeout: Duration::from_secs(30),
    };
    let one = |r: corescale_node_vmm::backend::ResizeReport| -> StepReport {
        if let Some(e) = r.first_error() {
            panic!("backend step failed: {e}");
        }
        r.steps.into_iter().next().expect("one step")
    };
    let (topology, granularity) = (vm.spec().topology, vm.spec().granularity);
    for _ in 0..runs {
        let s = one(vm
            .resize(
                &Plan::of_slots(&topology, granularity, &[1], &[]).expect("slot 1 of the VM"),
                opts,
            )
            .await);
        out.plug_applied.push(ms(s.applied));
        out.plug_acked.push(ms(s.acked));
        out.plug_online.push(ms(s.online));
        tokio::time::sleep(settle).await;
        let s = one(vm
            .resize(
                &Plan::of_slots(&topology, granularity, &[], &[1]).expect("slot 1 of the VM"),
                opts,
            )
            .await);
        out.unplug_applied.push(ms(s.applied));
        out.unplug_acked.push(ms(s.acked));
        tokio::time::sleep(settle).await;
    }
}

// ---- the baseline: a minimal direct client ---------------------------------------------

fn baseline_round(
    dir: &Path,
    slot: &Value,
    run0: usize,
    runs: usize,
    settle: Duration,
    out: &mut Samples,
) {
    let mut d = DirectClient::connect(dir, Duration::from_secs(30)).expect("direct client");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for r in 0..runs {
        let id = format!("bench-cpu-{}", run0 + r);
        let p = d.plug_online(slot, &id, 1).expect("direct plug");
        out.plug_applied.push(ms(p.applied));
        out.plug_acked.push(ms(p.acked));
        out.plug_online.push(ms(p.online));
        std::thread::sleep(settle);
        let u = d.unplug(&id, p.logical, 1).expect("direct unplug");
        out.unplug_applied.push(ms(u.applied));
        out.unplug_acked.push(ms(u.acked));
        std::thread::sleep(settle);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let runs = args.runs.max(1);
    let rounds = args.rounds.unwrap_or(runs).clamp(1, runs);
    let cores = u32::try_from(2 * runs + 8).unwrap_or(255).min(255);
    let lab = common::Lab::start("corescale-bench.", Arch::X86_64).await?;
    let backend = &lab.backend;
    let spec = lab.spec("latency", Arch::X86_64, cores, ResizeMethod::Hotplug);
    let t0 = Instant::now();
    let mut vm = backend.start_vm(&spec).await?;
    let boot_time = vm.wait_guest_ready(Duration::from_secs(120)).await?;
    println!("guest: 1 socket x {cores} cores under TCG, agent ready {:.2} s after QEMU start ({:.2} s total)", boot_time.as_secs_f64(), t0.elapsed().as_secs_f64());
    let dir: PathBuf = vm.dir().to_path_buf();
    let hp = vm.qmp_command("query-hotpluggable-cpus", None).await?;
    let slot1 = hp
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["props"]["core-id"] == 1)
        .cloned()
        .expect("slot 1");

    let mut ours = Samples::default();
    let mut direct = Samples::default();
    let per = runs.div_ceil(rounds);
    let mut done = 0;
    // Warm-up (the first online in a guest is slow): one cycle each, not counted.
    let settle = Duration::from_millis(args.settle_ms);
    backend_round(&vm, 1, settle, &mut Samples::default()).await;
    while done < runs {
        let n = per.min(runs - done);
        backend_round(&vm, n, settle, &mut ours).await;
        drop(vm);
        let (d, s) = (dir.clone(), slot1.clone());
        let run0 = done;
        let part = tokio::task::spawn_blocking(move || {
            let mut p = Samples::default();
            baseline_round(&d, &s, run0, n, settle, &mut p);
            p
        })
        .await?;
        direct.plug_applied.extend(part.plug_applied);
        direct.plug_acked.extend(part.plug_acked);
        direct.plug_online.extend(part.plug_online);
        direct.unplug_applied.extend(part.unplug_applied);
        direct.unplug_acked.extend(part.unplug_acked);
        done += n;
        vm = backend.adopt_vm(&spec).await?;
        vm.wait_guest_ready(Duration::from_secs(30)).await?;
    }
    if let Some((used, max)) = vm.vcpu_budget().await {
        println!("vCPU threads created by the backend in this QEMU: {used} of {max} (the direct client's are not counted)");
    }
    vm.stop(Duration::from_secs(10)).await?;
    drop(vm);
    lab.stop().await;

    println!("\n{runs} plug + {runs} unplug cycles per client, ms from the start of the operation");
    println!(
        "{:<16} {:>28} {:>28} {:>8}",
        "phase", "backend min/median/p99", "direct QMP min/median/p99", "ratio"
    );
    let rows: [(&str, &Vec<f64>, &Vec<f64>); 5] = [
        ("plug applied", &ours.plug_applied, &direct.plug_applied),
        ("plug acked", &ours.plug_acked, &direct.plug_acked),
        ("plug online", &ours.plug_online, &direct.plug_online),
        (
            "unplug applied",
            &ours.unplug_applied,
            &direct.unplug_applied,
        ),
        ("unplug acked", &ours.unplug_acked, &direct.unplug_acked),
    ];
    for (name, a, b) in rows {
        let (a0, a1, a2) = stats(a);
        let (b0, b1, b2) = stats(b);
        println!(
            "{name:<16} {:>28} {:>28} {:>8.2}",
            format!("{a0:.1} / {a1:.1} / {a2:.1}"),
            format!("{b0:.1} / {b1:.1} / {b2:.1}"),
            a1 / b1
        );
    }
    println!("ratio = backend median / direct median (1.00: no overhead)");
    Ok(())
}
