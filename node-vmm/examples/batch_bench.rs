//! Big jumps against small ones: how long the QEMU backend takes for 1 -> 8 and 8 -> 1
//! against 1 -> 2 and 2 -> 1 on the same TCG guest in the same run (goal: 1 -> 8 within 2x
//! of 1 -> 2). A resize sends every device_add (device_del) of a direction before it waits,
//! and onlines (offlines) them in one agent call, so a big jump costs little more than a
//! small one.
//!
//! ```text
//! cargo run --release -p corescale-node-vmm --example batch_bench -- [--rounds 5] [--settle-ms 200]
//! ```
//!
//! Then the backend lets go of the guest and a minimal direct QMP + guest-agent client
//! (`direct.rs`) does the same batches the shortest way on the same guest: the floor the
//! VMM and the guest set. The guest has 128 single-thread slots, so that under TCG every
//! unplug here really removes the vCPU (parking starts only when the lifetime vCPU-thread
//! budget runs short) and both clients' threads fit: this measures hot-plug, not onlining
//! parked vCPUs. Not measured here: the path through the API server.

mod common;

use clap::Parser;
use corescale_api::{Arch, Plan, ResizeMethod};
use corescale_node_vmm::backend::qemu::direct::DirectClient;
use corescale_node_vmm::backend::qemu::QemuVm;
use corescale_node_vmm::backend::{ResizeOptions, VmHandle};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Rounds of 1 -> 2 -> 1 -> 8 -> 1.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Pause between resizes, so each starts from a settled guest.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
}

const OPTS: ResizeOptions = ResizeOptions {
    unplug_timeout: Duration::from_secs(20),
    plug_timeout: Duration::from_secs(30),
};

/// Resize by `plan`; its wall time and the latest applied / acked / online phase, in ms.
async fn timed(vm: &QemuVm, plan: Plan) -> (f64, [f64; 3]) {
    let t0 = Instant::now();
    let r = vm.resize(&plan, OPTS).await;
    if let Some(e) = r.first_error() {
        panic!("resize failed: {e}");
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let last = |f: fn(&corescale_node_vmm::backend::StepReport) -> Option<Duration>| {
        r.steps
            .iter()
            .filter_map(f)
            .max()
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (
        wall,
        [last(|s| s.applied), last(|s| s.acked), last(|s| s.online)],
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Each round creates 8 vCPU threads per client; both clients' stay within 128 slots.
    let rounds = args.rounds.clamp(1, 7);
    let settle = Duration::from_millis(args.settle_ms);
    let lab = common::Lab::start("corescale-batch-bench.", Arch::X86_64).await?;
    let backend = &lab.backend;
    let spec = lab.spec("batch", Arch::X86_64, 128, ResizeMethod::Hotplug);
    let vm = backend.start_vm(&spec).await?;
    vm.wait_guest_ready(Duration::from_secs(120)).await?;
    timed(&vm, common::plug(&spec, 1..2)).await;
    tokio::time::sleep(settle).await;
    timed(&vm, common::unplug(&spec, 1..2)).await;
    let (mut up2, mut down2, mut up8, mut down8) = (vec![], vec![], vec![], vec![]);
    let mut phases = Vec::new();
    for _ in 0..rounds {
        for (plan, out) in [
            (common::plug(&spec, 1..2), &mut up2),
            (common::unplug(&spec, 1..2), &mut down2),
            (common::plug(&spec, 1..8), &mut up8),
            (common::unplug(&spec, 1..8), &mut down8),
        ] {
            tokio::time::sleep(settle).await;
            let (wall, p) = timed(&vm, plan).await;
            out.push(wall);
            phases.push(p);
        }
    }
    let (u2, d2, u8, d8) = (
        median(&mut up2),
        median(&mut down2),
        median(&mut up8),
        median(&mut down8),
    );
    println!("batch_bench: {rounds} rounds on one TCG guest, median ms of the backend's resize");
    println!(
        "  1 -> 2 {u2:8.1}   1 -> 8 {u8:8.1}   ratio {:.2} (goal <= 2)",
        u8 / u2
    );
    println!("  2 -> 1 {d2:8.1}   8 -> 1 {d8:8.1}   ratio {:.2}", d8 / d2);
    let p = phases[phases.len() - 2];
    println!(
        "  last 1 -> 8: all device_add returned at {:.1} ms, all acked (_OST) at {:.1} ms, all online at {:.1} ms",
        p[0], p[1], p[2]
    );

    // The direct client, same guest, same batches.
    let dir = vm.dir().to_path_buf();
    drop(vm);
    let direct = tokio::task::spawn_blocking(move || -> anyhow::Result<[Vec<f64>; 4]> {
        let mut d = DirectClient::connect(&dir, Duration::from_secs(30))?;
        let entries: Vec<serde_json::Value> = (1..8)
            .map(|core| d.slot(0, core, 0))
            .collect::<Result<_, _>>()?;
        let mut out: [Vec<f64>; 4] = Default::default();
        for round in 0..rounds {
            for (k, n) in [1usize, 7].into_iter().enumerate() {
                std::thread::sleep(settle);
                let tag = format!("bd-{round}-{n}");
                let (up, down) =
                    common::direct_plug_unplug(&mut d, &entries[..n], 1, &tag, settle)?;
                out[2 * k].push(up);
                out[2 * k + 1].push(down);
            }
        }
        Ok(out)
    })
    .await??;
    let [mut du2, mut dd2, mut du8, mut dd8] = direct;
    let (du2, dd2, du8, dd8) = (
        median(&mut du2),
        median(&mut dd2),
        median(&mut du8),
        median(&mut dd8),
    );
    println!("direct client, same guest, same batches (median ms)");
    println!(
        "  1 -> 2 {du2:8.1}   1 -> 8 {du8:8.1}   ratio {:.2}",
        du8 / du2
    );
    println!(
        "  2 -> 1 {dd2:8.1}   8 -> 1 {dd8:8.1}   ratio {:.2}",
        dd8 / dd2
    );
    println!(
        "backend / direct: 1 -> 2 {:.2}, 1 -> 8 {:.2}, 2 -> 1 {:.2}, 8 -> 1 {:.2}",
        u2 / du2,
        u8 / du8,
        d2 / dd2,
        d8 / dd8
    );
    let vm = backend.adopt_vm(&spec).await?;
    vm.stop(Duration::from_secs(5)).await?;
    drop(vm);
    lab.stop().await;
    Ok(())
}
