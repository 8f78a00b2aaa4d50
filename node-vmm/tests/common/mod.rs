//! Helpers of the QEMU integration tests: an in-process launcher, real QEMU/TCG guests
//! booted from `node-vmm/guest/build.sh`'s image, plans from the real planner, and
//! checks made inside the guest through its agent.
#![allow(dead_code)]

pub mod agent;
pub mod mock_api;

use corescale_api::{Arch, Granularity, Placement, Plan, PlanInput, SlotView, Topology, VcpuState};
use corescale_node_vmm::backend::qemu::{QemuBackend, QemuConfig, QemuVm};
use corescale_node_vmm::backend::{
    Accel, Backend, Observation, ResizeOptions, ResizeReport, VmHandle, VmSpec,
};
use corescale_node_vmm::images::ImageDir;
use corescale_node_vmm::launcher::Launcher;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Deadlines used by the tests (TCG on a loaded 2-core machine is slow).
pub const OPTS: ResizeOptions = ResizeOptions {
    unplug_timeout: Duration::from_secs(20),
    plug_timeout: Duration::from_secs(30),
};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// The x86_64 guest image and QEMU, or a panic that says what to run.
pub fn prerequisites() -> (PathBuf, PathBuf) {
    prerequisites_for(Arch::X86_64)
}

/// The guest image and QEMU of an architecture, or a panic that says what to run.
pub fn prerequisites_for(arch: Arch) -> (PathBuf, PathBuf) {
    let m = corescale_node_vmm::backend::qemu::machine::Machine::of(arch);
    if let Err(e) = corescale_node_vmm::backend::qemu::find_binary_for(m.default_binary(), arch) {
        panic!("these tests boot real {arch} guests: {e}");
    }
    let dir = ImageDir::default_root().join(arch.as_str());
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio.gz");
    for f in [&kernel, &initrd] {
        assert!(f.is_file(), "guest image file {} is missing: run node-vmm/guest/build.sh --arch {arch} (it needs scripts/install-deps.sh first)", f.display());
    }
    (kernel, initrd)
}

/// A launcher served in this process, and a backend that uses it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub cfg: QemuConfig,
    pub backend: QemuBackend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    pub async fn new() -> Env {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("corescale-qemu-test.")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("run/launcher.sock");
        let state = dir.path().join("vms");
        let launcher = Launcher::bind(&socket, &state, Duration::from_secs(5))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(launcher.serve(async move {
            let _ = rx.await;
        }));
        let cfg = QemuConfig::new(&state, &socket);
        let backend = QemuBackend::new(cfg.clone());
        Env {
            dir,
            cfg,
            backend,
            stop: Some(tx),
            server: Some(server),
        }
    }

    /// A second backend on the same launcher, as a restarted agent would build it.
    pub fn fresh_backend(&self) -> QemuBackend {
        QemuBackend::new(self.cfg.clone())
    }

    /// Stop the launcher (and with it any VMM still running).
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), s).await;
        }
    }
}

pub fn spec(
    name: &str,
    topology: Topology,
    granularity: Granularity,
    placement: Placement,
    boot: u32,
) -> VmSpec {
    let (kernel, initrd) = prerequisites();
    VmSpec {
        namespace: "test".into(),
        name: name.into(),
        uid: format!("uid-{name}-{}", std::process::id()),
        topology,
        granularity,
        placement,
        boot_vcpus: boot,
        resize_method: corescale_api::ResizeMethod::Hotplug,
        memory_mib: 256,
        arch: Arch::X86_64,
        kernel,
        initrd: Some(initrd),
        cmdline: String::new(),
        // The tests force TCG: this machine's /dev/kvm cannot boot Linux.
        accel: Accel::Tcg,
        disks: Vec::new(),
        seed: None,
        ports: Vec::new(),
    }
}

/// One socket of `cores` single-thread cores, Thread granularity, Packed, one vCPU at boot:
/// the VM most tests use.
pub fn thread_spec(name: &str, cores: u32) -> VmSpec {
    spec(
        name,
        Topology {
            sockets: 1,
            cores,
            threads: 1,
        },
        Granularity::Thread,
        Placement::Packed,
        1,
    )
}

/// Start a guest and wait for its agent; prints and returns the boot time.
pub async fn boot(env: &Env, spec: &VmSpec) -> (QemuVm, Duration) {
    let t0 = Instant::now();
    let vm = env
        .backend
        .start_vm(spec)
        .await
        .unwrap_or_else(|e| panic!("start {}: {e}", spec.name));
    let qmp_up = t0.elapsed();
    vm.wait_guest_ready(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("boot {}: {e}", spec.name));
    let boot = t0.elapsed();
    println!(
        "[{}] boot: QMP up after {:.0} ms, guest agent ready after {:.2} s",
        spec.name,
        qmp_up.as_secs_f64() * 1e3,
        boot.as_secs_f64()
    );
    (vm, boot)
}

/// Run `f` and require it to end within `bound` plus `margin`; an outer limit a minute
/// later keeps a hang from hanging the test.
pub async fn within<T>(
    what: &str,
    bound: Duration,
    margin: Duration,
    f: impl std::future::Future<Output = T>,
) -> T {
    let t0 = Instant::now();
    let out = tokio::time::timeout(bound + margin + Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting a minute after its deadline {bound:?}"));
    let took = t0.elapsed();
    println!("{what}: returned after {:.3} s", took.as_secs_f64());
    assert!(
        took <= bound + margin,
        "{what}: returned after {took:?}, past its deadline {bound:?}"
    );
    out
}

/// A plan of single-slot units (the tests' VMs resize by thread), for any slot a VM can
/// have: a slot past a VM's own topology is the backend's to refuse.
fn of_slots(plug: &[u32], unplug: &[u32]) -> Plan {
    let widest = Topology::new(1, corescale_api::MAX_VCPUS, 1);
    Plan::of_slots(&widest, Granularity::Thread, plug, unplug).expect("a plan of distinct slots")
}

/// A plan that plugs `slots`.
pub fn plug(slots: &[u32]) -> Plan {
    of_slots(slots, &[])
}

/// A plan that unplugs `slots`.
pub fn unplug(slots: &[u32]) -> Plan {
    of_slots(&[], slots)
}

/// Plug order of slots, for the planner's "most recently plugged first" unplug choice.
#[derive(Debug, Default)]
pub struct Tracker {
    seq: BTreeMap<u32, u64>,
    next: u64,
}

impl Tracker {
    pub fn plan(
        &self,
        spec: &VmSpec,
        obs: &Observation,
        target: u32,
    ) -> Result<Plan, corescale_api::PlanError> {
        let views: Vec<SlotView> = obs
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotView {
                state: s.state,
                plugged_seq: self
                    .seq
                    .get(&u32::try_from(i).unwrap())
                    .copied()
                    .unwrap_or(0),
            })
            .collect();
        corescale_api::plan(&PlanInput {
            topology: spec.topology,
            granularity: spec.granularity,
            placement: spec.placement,
            target,
            slots: &views,
        })
    }

    pub fn record(&mut self, report: &ResizeReport) {
        for s in &report.steps {
            if s.error.is_some() {
                continue;
            }
            match s.direction {
                corescale_node_vmm::backend::Direction::Plug => {
                    self.next += 1;
                    self.seq.insert(s.slot, self.next);
                }
                corescale_node_vmm::backend::Direction::Unplug => {
                    self.seq.remove(&s.slot);
                }
            }
        }
    }
}

/// Parse a kernel cpulist ("0-2,5").
pub fn parse_cpulist(s: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap()),
            None => {
                out.insert(part.parse().unwrap());
            }
        }
    }
    out
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

pub fn print_report(name: &str, what: &str, r: &ResizeReport) {
    for s in &r.steps {
        println!(
            "[{name}] {what}: slot {} {} applied {} ms, acked {} ms, online {} ms{}",
            s.slot,
            s.direction.as_str(),
            ms(s.applied),
            ms(s.acked),
            ms(s.online),
            s.error
                .as_ref()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default()
        );
    }
}

/// Resize to `target` with the real planner, require every step to succeed, and check the
/// result both in the backend's slot states and inside the guest.
pub async fn resize_to(vm: &QemuVm, tracker: &mut Tracker, target: u32) -> ResizeReport {
    let spec = vm.spec().clone();
    let obs = vm.observe().await.unwrap();
    let plan = tracker.plan(&spec, &obs, target).unwrap();
    let report = vm.resize(&plan, OPTS).await;
    print_report(&spec.name, &format!("resize to {target}"), &report);
    if let Some(e) = report.first_error() {
        panic!("resize of {} to {target} failed: {e}", spec.name);
    }
    for s in &report.steps {
        assert!(
            s.applied.is_some() && s.acked.is_some(),
            "every step has applied and acked: {s:?}"
        );
        if s.direction == corescale_node_vmm::backend::Direction::Plug {
            assert!(s.online.is_some(), "plugs have an online phase: {s:?}");
            assert!(
                s.applied <= s.acked && s.acked <= s.online,
                "phases in order: {s:?}"
            );
        }
    }
    tracker.record(&report);
    verify(vm, target).await;
    report
}

/// The backend's view and the guest's own view agree on `target` online vCPUs.
pub async fn verify(vm: &QemuVm, target: u32) -> Observation {
    let obs = vm.observe().await.unwrap();
    assert!(obs.guest_agent, "the agent answers");
    assert_eq!(
        obs.online(),
        target,
        "online vCPUs in the slot states: {:?}",
        obs.slots
    );
    for (i, s) in obs.slots.iter().enumerate() {
        assert!(
            matches!(
                s.state,
                VcpuState::Online | VcpuState::Absent | VcpuState::Offline
            ),
            "slot {i} is {:?}",
            s.state
        );
        if s.state == VcpuState::Online {
            assert!(
                s.guest_cpu.is_some() && s.host_thread.is_some(),
                "slot {i}: {s:?}"
            );
        }
    }
    let online = parse_cpulist(
        &vm.guest_read("/sys/devices/system/cpu/online")
            .await
            .unwrap(),
    );
    let from_slots: BTreeSet<u32> = obs
        .slots
        .iter()
        .filter(|s| s.state == VcpuState::Online)
        .filter_map(|s| s.guest_cpu)
        .collect();
    assert_eq!(
        online, from_slots,
        "the guest's online CPUs are exactly the Online slots' guest CPUs"
    );
    obs
}

/// Read a guest file through the agent.
pub async fn guest(vm: &QemuVm, path: &str) -> String {
    vm.guest_read(path)
        .await
        .unwrap_or_else(|e| panic!("reading {path} in the guest: {e}"))
}

/// Check, inside the guest, that the CPU in `slot` is where the topology puts it.
pub async fn check_guest_topology(vm: &QemuVm, obs: &Observation, slot: u32) -> (u32, u32) {
    let t = vm.spec().topology;
    let ids = corescale_api::planner::slots(&t);
    let id = ids[usize::try_from(slot).unwrap()];
    let cpu = obs.slots[usize::try_from(slot).unwrap()]
        .guest_cpu
        .expect("mapped");
    let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
    let package: u32 = guest(vm, &format!("{base}/physical_package_id"))
        .await
        .parse()
        .unwrap();
    let core: u32 = guest(vm, &format!("{base}/core_id")).await.parse().unwrap();
    assert_eq!(
        package, id.socket,
        "slot {slot} (cpu{cpu}) is on socket {}",
        id.socket
    );
    assert_eq!(core, id.core, "slot {slot} (cpu{cpu}) is core {}", id.core);
    // QEMU's own APIC id of the vCPU matches the backend's formula.
    let path = format!(
        "/machine/peripheral/cpu-s{}-c{}-t{}",
        id.socket, id.core, id.thread
    );
    if slot >= vm.spec().boot_vcpus
        && vm.spec().resize_method == corescale_api::ResizeMethod::Hotplug
    {
        let apic = vm
            .qmp_command(
                "qom-get",
                Some(serde_json::json!({"path": path, "property": "apic-id"})),
            )
            .await
            .unwrap();
        assert_eq!(
            apic.as_u64(),
            Some(u64::from(corescale_node_vmm::backend::qemu::apic_id(
                &t, &id
            ))),
            "APIC id of slot {slot}"
        );
    }
    (cpu, package)
}

/// Stop a guest and remove its directory.
pub async fn finish(env: &Env, vm: QemuVm) {
    vm.stop(Duration::from_secs(10)).await.unwrap();
    forget(env, vm).await;
}

/// Drop the handle of a guest that has stopped and remove its directory.
pub async fn forget(env: &Env, vm: QemuVm) {
    let key = vm.spec().key();
    drop(vm);
    env.backend.cleanup(&key).await.unwrap();
}
