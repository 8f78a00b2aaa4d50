//! Hotplug against GuestOnline on the same guest image and topology, in one run, each
//! against a minimal direct client doing the same operations on the same VM; then what an
//! offline vCPU costs the host.
//!
//! ```text
//! cargo run --release -p corescale-node-vmm --example online_bench -- [--rounds 5] [--idle-seconds 60]
//! ```
//!
//! 1. Latency. Two x86_64 TCG guests of one socket x 64 single-thread slots, one vCPU at
//!    boot: one `resizeMethod: Hotplug` (device_add, ACPI, online through the agent; then
//!    offline, device_del, eject), one `GuestOnline` (every slot present, one
//!    guest-set-vcpus per direction). Each does 1 -> 2 -> 1 and 1 -> 4 -> 1 `--rounds`
//!    times through the backend; then the backend lets go and the direct client
//!    (`direct.rs`) does the same on the same guest: the floor the VMM and the guest set.
//!    Medians, ms.
//! 2. Host cost of offline vCPUs. Each guest is left with 1 vCPU online after slots 1-3
//!    came and went (GuestOnline: offline after use, the rest never online; Hotplug:
//!    removed, no thread); every QEMU thread's utime+stime (`/proc/<pid>/task/*/stat`,
//!    vCPU threads named "CPU n/TCG") is read before and after `--idle-seconds` and
//!    printed per thread.
//!
//! Figures, not assertions: the results are in docs/benchmarks.md.

mod common;

use clap::Parser;
use corescale_api::{Arch, Plan, ResizeMethod};
use corescale_node_vmm::backend::qemu::direct::DirectClient;
use corescale_node_vmm::backend::qemu::QemuVm;
use corescale_node_vmm::backend::{Backend, ResizeOptions, VmHandle, VmSpec};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Rounds of 1 -> 2 -> 1 -> 4 -> 1 per client and method.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Pause between resizes, so each starts from a settled guest.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// How long to measure the host CPU of the idle guest's threads (0: skip).
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Single-thread slots of each guest (at least 8).
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Guest architecture: x86_64, ppc64le (threads=1 cores; no direct client for its
    /// Hotplug) or aarch64 (GuestOnline only).
    #[arg(long, default_value = "x86_64")]
    arch: String,
    /// Methods to measure (Hotplug, GuestOnline), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "Hotplug,GuestOnline")]
    methods: Vec<String>,
}

const OPTS: ResizeOptions = ResizeOptions {
    unplug_timeout: Duration::from_secs(20),
    plug_timeout: Duration::from_secs(30),
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms of [1 -> 2, 2 -> 1, 1 -> 4, 4 -> 1].
type Medians = [f64; 4];

fn medians(mut v: [Vec<f64>; 4]) -> Medians {
    [
        median(&mut v[0]),
        median(&mut v[1]),
        median(&mut v[2]),
        median(&mut v[3]),
    ]
}

async fn timed(vm: &QemuVm, plan: Plan) -> f64 {
    let t0 = Instant::now();
    let r = vm.resize(&plan, OPTS).await;
    if let Some(e) = r.first_error() {
        panic!("resize failed: {e}");
    }
    t0.elapsed().as_secs_f64() * 1e3
}

/// The backend's rounds (after a warm-up 1 -> 4 -> 1: the first online in a guest is slow).
async fn backend_rounds(vm: &QemuVm, rounds: usize, settle: Duration) -> Medians {
    timed(vm, common::plug(vm.spec(), 1..4)).await;
    tokio::time::sleep(settle).await;
    timed(vm, common::unplug(vm.spec(), 1..4)).await;
    let mut out: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        for (k, plan) in [
            common::plug(vm.spec(), 1..2),
            common::unplug(vm.spec(), 1..2),
            common::plug(vm.spec(), 1..4),
            common::unplug(vm.spec(), 1..4),
        ]
        .into_iter()
        .enumerate()
        {
            tokio::time::sleep(settle).await;
            out[k].push(timed(vm, plan).await);
        }
    }
    medians(out)
}

/// The direct client's rounds on the guest in `dir`, by `method`.
fn direct_rounds(
    dir: &std::path::Path,
    method: ResizeMethod,
    rounds: usize,
    settle: Duration,
) -> anyhow::Result<Medians> {
    let mut d = DirectClient::connect(dir, Duration::from_secs(30))?;
    let mut out: [Vec<f64>; 4] = Default::default();
    match method {
        ResizeMethod::GuestOnline => {
            // Present from boot: logical CPUs 1.. are the slots 1.. (the kernel numbers
            // boot CPUs in MADT order).
            for _ in 0..rounds {
                for (k, n) in [1u64, 3].into_iter().enumerate() {
                    let cpus: Vec<u64> = (1..=n).collect();
                    std::thread::sleep(settle);
                    out[2 * k].push(d.set_online_many(&cpus, true)?.as_secs_f64() * 1e3);
                    std::thread::sleep(settle);
                    out[2 * k + 1].push(d.set_online_many(&cpus, false)?.as_secs_f64() * 1e3);
                }
            }
        }
        ResizeMethod::Hotplug => {
            // Slots the backend never used (8..), so the direct client's device ids are
            // its own.
            let entries: Vec<serde_json::Value> = (8..11)
                .map(|core| d.slot(0, core, 0))
                .collect::<Result<_, _>>()?;
            for round in 0..rounds {
                for (k, n) in [1usize, 3].into_iter().enumerate() {
                    std::thread::sleep(settle);
                    let tag = format!("od-{round}-{n}");
                    let (up, down) =
                        common::direct_plug_unplug(&mut d, &entries[..n], 8, &tag, settle)?;
                    out[2 * k].push(up);
                    out[2 * k + 1].push(down);
                }
            }
        }
    }
    Ok(medians(out))
}

/// utime+stime seconds of every thread of `pid`, by (tid, name).
fn thread_cpu(pid: i32) -> BTreeMap<(i32, String), f64> {
    // SAFETY: sysconf only reads a system constant; it has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Some(tid) = e
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.insert((tid, name), (ticks(11) + ticks(12)) as f64 / hz);
    }
    out
}

struct Bench {
    arch: Arch,
    slots: u32,
    lab: common::Lab,
}

impl Bench {
    fn spec(&self, method: ResizeMethod) -> VmSpec {
        let name = format!("online-{}", method.as_str().to_lowercase());
        self.lab.spec(&name, self.arch, self.slots, method)
    }

    /// Backend then direct client on one fresh guest of `method`.
    async fn latency(
        &self,
        method: ResizeMethod,
        args: &Args,
    ) -> anyhow::Result<(Medians, Option<Medians>)> {
        let settle = Duration::from_millis(args.settle_ms);
        let spec = self.spec(method);
        let vm = self.lab.backend.start_vm(&spec).await?;
        vm.wait_guest_ready(Duration::from_secs(120)).await?;
        vm.observe().await?;
        let b = backend_rounds(&vm, args.rounds, settle).await;
        let dir = vm.dir().to_path_buf();
        drop(vm);
        let rounds = args.rounds;
        // The direct client hot-plugs the x86 way (ACPI); it onlines on any guest.
        let d = if method == ResizeMethod::GuestOnline || self.arch == Arch::X86_64 {
            Some(
                tokio::task::spawn_blocking(move || direct_rounds(&dir, method, rounds, settle))
                    .await??,
            )
        } else {
            None
        };
        let vm = self.lab.backend.adopt_vm(&spec).await?;
        vm.stop(Duration::from_secs(5)).await?;
        self.lab.backend.cleanup(&spec.key()).await?;
        Ok((b, d))
    }

    /// The idle guest's threads over `seconds`: under GuestOnline slots 1-3 offline after
    /// use and the rest never online; under Hotplug slots 1-3 plugged and removed again.
    async fn idle_cost(&self, method: ResizeMethod, seconds: u64) -> anyhow::Result<()> {
        let spec = self.spec(method);
        let vm = self.lab.backend.start_vm(&spec).await?;
        vm.wait_guest_ready(Duration::from_secs(120)).await?;
        vm.observe().await?;
        timed(&vm, common::plug(vm.spec(), 1..4)).await;
        timed(&vm, common::unplug(vm.spec(), 1..4)).await;
        let online = vm.observe().await?.online();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = vm.pid();
        let before = thread_cpu(pid);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let after = thread_cpu(pid);
        let wall = t0.elapsed().as_secs_f64();
        let slots = self.slots;
        println!(
            "idle {method} guest, {online} of {slots} vCPUs online, host CPU per QEMU thread over {wall:.1} s (utime+stime, s):"
        );
        let (mut offline_used, mut offline_never, mut other) = (0.0, 0.0, 0.0);
        let (mut n_used, mut n_never) = (0, 0);
        for ((tid, name), end) in &after {
            let ran = end - before.get(&(*tid, name.clone())).copied().unwrap_or(0.0);
            let cpu: Option<u32> = name
                .strip_prefix("CPU ")
                .and_then(|r| r.split('/').next()?.parse().ok());
            let what = match cpu {
                Some(0) => "online",
                Some(1..=3) => {
                    offline_used += ran;
                    n_used += 1;
                    "offline (after use)"
                }
                Some(_) => {
                    offline_never += ran;
                    n_never += 1;
                    "offline (never online)"
                }
                None => {
                    other += ran;
                    "not a vCPU"
                }
            };
            if ran > 0.0 || cpu.is_some_and(|c| c < 6) {
                println!("  {name:<24} {what:<24} {ran:7.2}");
            }
        }
        println!(
            "  sum: offline after use ({n_used} threads) {offline_used:.2} s, never online ({n_never} threads) {offline_never:.2} s, non-vCPU threads {other:.2} s"
        );
        vm.stop(Duration::from_secs(5)).await?;
        self.lab.backend.cleanup(&spec.key()).await?;
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let methods: Vec<ResizeMethod> = args
        .methods
        .iter()
        .map(|m| match m.as_str() {
            "Hotplug" => Ok(ResizeMethod::Hotplug),
            "GuestOnline" => Ok(ResizeMethod::GuestOnline),
            other => Err(anyhow::anyhow!(
                "--methods: {other:?} is not Hotplug or GuestOnline"
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(args.slots >= 8, "--slots must be at least 8");
    // Under TCG the Hotplug guest's lifetime vCPU-thread budget is its slots: the boot
    // vCPU, 3 (warm-up), and 4 per round for the backend and 4 for the direct client must
    // fit, or the backend would park (online/offline) instead of hot-plugging.
    let most = if methods.contains(&ResizeMethod::Hotplug) {
        ((args.slots - 4) / 8) as usize
    } else {
        usize::MAX
    };
    anyhow::ensure!(
        most >= 1,
        "--slots {}: Hotplug needs at least 12 slots",
        args.slots
    );
    let args = Args {
        rounds: args.rounds.clamp(1, most),
        ..args
    };
    let arch = match args.arch.as_str() {
        "x86_64" => Arch::X86_64,
        "ppc64le" => Arch::Ppc64le,
        "aarch64" => Arch::Aarch64,
        other => anyhow::bail!("--arch: {other:?} is not x86_64, ppc64le or aarch64"),
    };
    anyhow::ensure!(
        arch != Arch::Aarch64 || !methods.contains(&ResizeMethod::Hotplug),
        "--arch aarch64: QEMU's virt machine cannot hot-plug CPUs; use --methods GuestOnline"
    );
    let bench = Bench {
        arch,
        slots: args.slots,
        lab: common::Lab::start("corescale-online-bench.", arch).await?,
    };
    println!(
        "online_bench: {arch} TCG guests, 1 socket x {} slots, {} rounds, median ms",
        args.slots, args.rounds
    );
    println!(
        "  {:<26} {:>8} {:>8} {:>8} {:>8}",
        "", "1 -> 2", "2 -> 1", "1 -> 4", "4 -> 1"
    );
    for &method in &methods {
        let (b, d) = bench.latency(method, &args).await?;
        for (who, m) in [("backend", Some(b)), ("direct client", d)] {
            let Some(m) = m else {
                println!(
                    "  {:<26} (no direct client)",
                    format!("{} {who}", method.as_str())
                );
                continue;
            };
            println!(
                "  {:<26} {:8.1} {:8.1} {:8.1} {:8.1}",
                format!("{} {who}", method.as_str()),
                m[0],
                m[1],
                m[2],
                m[3]
            );
        }
    }
    if args.idle_seconds > 0 {
        for &method in methods.iter().rev() {
            bench.idle_cost(method, args.idle_seconds).await?;
        }
    }
    bench.lab.stop().await;
    Ok(())
}
