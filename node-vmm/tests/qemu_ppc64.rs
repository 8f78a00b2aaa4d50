//! POWER (pseries, ppc64le) guests under QEMU/TCG through the same backend: whole cores
//! are hot-plugged (every SMT thread at once), the guest kernel onlines them by itself,
//! removal completes with DEVICE_DELETED. Each step is checked in the slot states and
//! inside the guest (online CPUs, and each Online slot's hard CPU id).

mod common;

use common::*;
use corescale_api::{Arch, Granularity, Placement, Topology, VcpuState};
use corescale_node_vmm::backend::qemu::QemuVm;
use corescale_node_vmm::backend::{Backend, BackendError, Direction, VmHandle, VmSpec};
use std::time::Duration;

fn power_spec(name: &str, topology: Topology, granularity: Granularity, boot: u32) -> VmSpec {
    let (kernel, initrd) = prerequisites_for(Arch::Ppc64le);
    VmSpec {
        arch: Arch::Ppc64le,
        kernel,
        initrd: Some(initrd),
        memory_mib: 512,
        ..spec(name, topology, granularity, Placement::Packed, boot)
    }
}

/// Every Online slot's guest CPU has the hard id QEMU gives that slot (under TCG QEMU's
/// vsmt equals the threads per core, so the hard id is the slot index).
async fn check_hard_ids(vm: &QemuVm) {
    let obs = vm.observe().await.unwrap();
    for (slot, s) in obs.slots.iter().enumerate() {
        if s.state != VcpuState::Online {
            continue;
        }
        let cpu = s.guest_cpu.expect("Online slots are mapped");
        let id: usize = guest(vm, &format!("/sys/devices/system/cpu/cpu{cpu}/physical_id"))
            .await
            .trim()
            .parse()
            .unwrap();
        assert_eq!(id, slot, "guest cpu{cpu} (slot {slot}) has hard id {id}");
    }
}

fn steps(r: &corescale_node_vmm::backend::ResizeReport) -> Vec<(u32, Direction)> {
    r.steps.iter().map(|s| (s.slot, s.direction)).collect()
}

/// threads=1: 1 -> 3 -> 2 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cores_1_3_2() {
    let env = Env::new().await;
    let t = Topology {
        sockets: 1,
        cores: 4,
        threads: 1,
    };
    let spec = power_spec("power1", t, Granularity::Thread, 1);
    let (vm, _) = boot(&env, &spec).await;
    assert!(
        std::fs::read_to_string(vm.dir().join("serial.log"))
            .unwrap()
            .contains("corescale-guest"),
        "the console (hvc0) is in serial.log"
    );
    verify(&vm, 1).await;
    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(steps(&r), [(1, Direction::Plug), (2, Direction::Plug)]);
    check_hard_ids(&vm).await;
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(2, Direction::Unplug)]);
    check_hard_ids(&vm).await;
    // Per-vCPU host threads for the metrics, as on x86.
    let secs = vm.vcpu_cpu_seconds().await.unwrap();
    assert_eq!(
        secs.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [0, 1],
        "CPU time of each present vCPU thread: {secs:?}"
    );
    vm.stop(Duration::from_secs(20)).await.unwrap();
    env.shutdown().await;
}

/// threads=2, Core granularity: 2 -> 4 -> 2 vCPUs, a core (both threads) per step; a
/// Thread-granularity spec with SMT threads is refused by the backend, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_smt2_cores_2_4_2() {
    let env = Env::new().await;
    let t = Topology {
        sockets: 1,
        cores: 4,
        threads: 2,
    };
    let bad = power_spec("power-bad", t, Granularity::Thread, 2);
    match env.backend.start(&bad).await {
        Err(e @ BackendError::InvalidSpec { .. }) => {
            assert!(e.to_string().contains("spec.granularity"), "{e}");
            assert!(e.to_string().contains("whole cores"), "{e}");
        }
        Err(other) => panic!("expected InvalidSpec, got {other}"),
        Ok(_) => panic!("a Thread-granularity POWER spec with threads=2 started"),
    }
    let spec = power_spec("power2", t, Granularity::Core, 2);
    let (vm, _) = boot(&env, &spec).await;
    verify(&vm, 2).await;
    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(steps(&r), [(2, Direction::Plug), (3, Direction::Plug)]);
    // Both threads of the core come from one device_add: the same phase times.
    assert_eq!(r.steps[0].applied, r.steps[1].applied);
    check_hard_ids(&vm).await;
    let siblings = guest(
        &vm,
        &format!(
            "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list",
            vm.observe().await.unwrap().slots[2].guest_cpu.unwrap()
        ),
    )
    .await;
    assert_eq!(
        parse_cpulist(&siblings).len(),
        2,
        "the plugged core has two SMT threads in the guest: {siblings}"
    );
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(2, Direction::Unplug), (3, Direction::Unplug)]);
    check_hard_ids(&vm).await;
    assert_eq!(vm.vcpu_budget().await, Some((4, 8)));
    vm.stop(Duration::from_secs(20)).await.unwrap();
    env.shutdown().await;
}

/// resizeMethod GuestOnline on POWER: every core present from boot, the kernel's
/// `maxcpus=1` onlines one; 1 -> 4 -> 2 -> 3 through the guest agent only, in the same
/// QEMU, each step checked in the guest (online CPUs, hard ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_guest_online_1_4_2_3() {
    let env = Env::new().await;
    let t = Topology {
        sockets: 1,
        cores: 4,
        threads: 1,
    };
    let spec = VmSpec {
        resize_method: corescale_api::ResizeMethod::GuestOnline,
        ..power_spec("power-online", t, Granularity::Thread, 1)
    };
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    assert_eq!(
        guest(&vm, "/sys/devices/system/cpu/present").await.trim(),
        "0-3",
        "every core is present from boot"
    );
    verify(&vm, 1).await;
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
    check_hard_ids(&vm).await;
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(3, Direction::Unplug), (2, Direction::Unplug)]);
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(steps(&r), [(2, Direction::Plug)]);
    check_hard_ids(&vm).await;
    let states: Vec<VcpuState> = vm
        .observe()
        .await
        .unwrap()
        .slots
        .iter()
        .map(|s| s.state)
        .collect();
    use VcpuState::{Offline, Online};
    assert_eq!(states, [Online, Online, Online, Offline]);
    assert_eq!(vm.pid(), pid, "the same QEMU throughout");
    let hp = vm
        .qmp_command("query-hotpluggable-cpus", None)
        .await
        .unwrap();
    assert!(
        hp.as_array().unwrap().iter().all(|c| c["qom-path"]
            .as_str()
            .is_some_and(|p| !p.contains("peripheral"))),
        "no core was hot-plugged: {hp}"
    );
    vm.stop(Duration::from_secs(20)).await.unwrap();
    env.shutdown().await;
}
