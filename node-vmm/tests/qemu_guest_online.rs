//! `spec.resizeMethod: GuestOnline` on real QEMU/TCG x86_64 guests: every slot present
//! from boot (kernel `maxcpus=` onlines the first ones), resizes online and offline vCPUs
//! through the guest agent only. Each step is checked in the slot states and inside the
//! guest; QEMU never adds or removes a vCPU (same pid, same vCPU threads throughout).

mod common;

use common::*;
use corescale_api::{Granularity, Placement, ResizeMethod, Topology, VcpuState};
use corescale_node_vmm::backend::qemu::QemuVm;
use corescale_node_vmm::backend::{BackendError, Direction, VmHandle, VmSpec};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn online_spec(name: &str, t: Topology, g: Granularity, p: Placement, boot: u32) -> VmSpec {
    VmSpec {
        resize_method: ResizeMethod::GuestOnline,
        ..spec(name, t, g, p, boot)
    }
}

/// QEMU's vCPU threads ("CPU n/TCG" with debug-threads=on), by thread id.
fn vcpu_threads(pid: i32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            comm.starts_with("CPU ").then_some(tid)
        })
        .collect()
}

fn steps(r: &corescale_node_vmm::backend::ResizeReport) -> Vec<(u32, Direction)> {
    r.steps.iter().map(|s| (s.slot, s.direction)).collect()
}

/// Slots in states, `Online` for `online`, `Offline` for every other one.
async fn check_states(vm: &QemuVm, online: &[u32]) {
    let obs = vm.observe().await.unwrap();
    for (i, s) in obs.slots.iter().enumerate() {
        let want = if online.contains(&u32::try_from(i).unwrap()) {
            VcpuState::Online
        } else {
            VcpuState::Offline
        };
        assert_eq!(s.state, want, "slot {i}: {:?}", obs.slots);
        assert!(s.host_thread.is_some(), "every slot has its thread: {s:?}");
    }
}

/// No device_add ever: QEMU lists every slot as plugged at boot (no peripheral ids).
async fn check_no_hotplug(vm: &QemuVm) {
    let hp = vm
        .qmp_command("query-hotpluggable-cpus", None)
        .await
        .unwrap();
    for c in hp.as_array().unwrap() {
        let qom = c["qom-path"].as_str().expect("every slot is present");
        assert!(!qom.contains("peripheral"), "a hot-plugged vCPU: {c}");
    }
}

/// 1 -> 4 -> 2 -> 3 of 4 slots; boot with one online and three present-offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_1_4_2_3() {
    let env = Env::new().await;
    let t = Topology::new(1, 4, 1);
    let spec = online_spec("online", t, Granularity::Thread, Placement::Packed, 1);
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    let threads = vcpu_threads(pid);
    assert_eq!(threads.len(), 4, "every slot's vCPU thread from boot");
    assert_eq!(
        guest(&vm, "/sys/devices/system/cpu/present").await.trim(),
        "0-3"
    );
    verify(&vm, 1).await;
    check_states(&vm, &[0]).await;

    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(
        steps(&r),
        [
            (1, Direction::Plug),
            (2, Direction::Plug),
            (3, Direction::Plug)
        ]
    );
    let obs = vm.observe().await.unwrap();
    for slot in 1..4 {
        check_guest_topology(&vm, &obs, slot).await;
    }
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(3, Direction::Unplug), (2, Direction::Unplug)]);
    assert!(r.steps.iter().all(|s| s.kept_offline));
    check_states(&vm, &[0, 1]).await;
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(steps(&r), [(2, Direction::Plug)]);
    check_states(&vm, &[0, 1, 2]).await;
    let obs = vm.observe().await.unwrap();
    check_guest_topology(&vm, &obs, 2).await;

    assert_eq!(vm.pid(), pid, "the same QEMU throughout");
    assert_eq!(
        vcpu_threads(pid),
        threads,
        "no vCPU thread created or removed"
    );
    check_no_hotplug(&vm).await;
    finish(&env, vm).await;
    env.shutdown().await;
}

/// Core granularity with 2 threads per core: whole cores online and offline, the SMT
/// siblings together (checked in the guest's thread_siblings_list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_core_threads_2() {
    let env = Env::new().await;
    let t = Topology::new(1, 3, 2);
    let spec = online_spec("online-core", t, Granularity::Core, Placement::Packed, 2);
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    verify(&vm, 2).await;
    check_states(&vm, &[0, 1]).await;
    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 6).await;
    assert_eq!(
        steps(&r),
        [
            (2, Direction::Plug),
            (3, Direction::Plug),
            (4, Direction::Plug),
            (5, Direction::Plug)
        ]
    );
    let obs = vm.observe().await.unwrap();
    for slot in 2..6 {
        check_guest_topology(&vm, &obs, slot).await;
    }
    // The two threads of core 2 are SMT siblings in the guest.
    let (a, b) = (
        obs.slots[4].guest_cpu.unwrap(),
        obs.slots[5].guest_cpu.unwrap(),
    );
    let siblings = parse_cpulist(
        &guest(
            &vm,
            &format!("/sys/devices/system/cpu/cpu{a}/topology/thread_siblings_list"),
        )
        .await,
    );
    assert_eq!(siblings, BTreeSet::from([a, b]));
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(steps(&r), [(4, Direction::Unplug), (5, Direction::Unplug)]);
    check_states(&vm, &[0, 1, 2, 3]).await;
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(2, Direction::Unplug), (3, Direction::Unplug)]);
    check_states(&vm, &[0, 1]).await;
    assert_eq!(vm.pid(), pid);
    assert_eq!(vcpu_threads(pid).len(), 6);
    finish(&env, vm).await;
    env.shutdown().await;
}

/// Spread over 2 sockets (2 NUMA nodes): growth alternates sockets, checked in the guest's
/// package ids and NUMA nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_spread_2_sockets() {
    let env = Env::new().await;
    let t = Topology::new(2, 2, 1);
    let spec = online_spec(
        "online-spread",
        t,
        Granularity::Thread,
        Placement::Spread,
        1,
    );
    let (vm, _) = boot(&env, &spec).await;
    verify(&vm, 1).await;
    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(2, Direction::Plug)], "socket 1 first");
    let obs = vm.observe().await.unwrap();
    let (cpu, package) = check_guest_topology(&vm, &obs, 2).await;
    assert_eq!(package, 1);
    let node1 = parse_cpulist(&guest(&vm, "/sys/devices/system/node/node1/cpulist").await);
    assert!(
        node1.contains(&cpu),
        "cpu{cpu} is on NUMA node 1: {node1:?}"
    );
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(steps(&r), [(1, Direction::Plug), (3, Direction::Plug)]);
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(steps(&r), [(3, Direction::Unplug)]);
    check_states(&vm, &[0, 1, 2]).await;
    finish(&env, vm).await;
    env.shutdown().await;
}

/// A guest without an agent: the resize fails at once saying why (never a silent wait),
/// nothing changes in QEMU, and the unused slots are still reported Offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_without_an_agent_cannot_resize() {
    let env = Env::new().await;
    let mut spec = online_spec(
        "online-noagent",
        Topology::new(1, 3, 1),
        Granularity::Thread,
        Placement::Packed,
        1,
    );
    spec.cmdline = "corescale.agent=off".into();
    let vm = env.backend.start_vm(&spec).await.unwrap();
    let serial = vm.dir().join("serial.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("no guest agent (corescale.agent=off)")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the guest did not boot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let r = vm.resize(&plug(&[1]), OPTS).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "no waiting: {r:?}");
    match r.first_error() {
        Some(BackendError::GuestAgent(m)) => {
            assert!(
                m.contains("qemu-guest-agent") && m.contains("Hotplug"),
                "{m}"
            )
        }
        other => panic!("expected a guest agent error, got {other:?}"),
    }
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent);
    let states: Vec<VcpuState> = obs.slots.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [VcpuState::Present, VcpuState::Offline, VcpuState::Offline]
    );
    check_no_hotplug(&vm).await;
    finish(&env, vm).await;
    env.shutdown().await;
}

/// An agent restart: a fresh backend adopts a GuestOnline guest (its handle starts with no
/// map of guest CPUs), sees the unused slots Offline from the persisted state, and
/// resizes it through the agent; the guest never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_adopted_after_an_agent_restart() {
    let env = Env::new().await;
    let spec = online_spec(
        "online-adopt",
        Topology::new(1, 4, 1),
        Granularity::Thread,
        Placement::Packed,
        2,
    );
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    let uptime = vm.guest_uptime().await.unwrap();
    drop(vm);
    let vm = env.fresh_backend().adopt_vm(&spec).await.unwrap();
    assert_eq!(vm.pid(), pid);
    // Before anything is observed, a resize maps the guest's CPUs itself.
    let r = vm.resize(&plug(&[2, 3]), OPTS).await;
    assert!(r.first_error().is_none(), "{r:?}");
    check_states(&vm, &[0, 1, 2, 3]).await;
    let r = vm.resize(&unplug(&[3, 2, 1]), OPTS).await;
    assert!(r.first_error().is_none(), "{r:?}");
    verify(&vm, 1).await;
    check_states(&vm, &[0]).await;
    assert!(
        vm.guest_uptime().await.unwrap() > uptime,
        "the guest never restarted"
    );
    check_no_hotplug(&vm).await;
    finish(&env, vm).await;
    env.shutdown().await;
}
