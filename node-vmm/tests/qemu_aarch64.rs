//! arm64 guests on QEMU's `virt` machine under TCG, which cannot hot-plug CPUs: scaled
//! through `resizeMethod: GuestOnline` only, each step checked in the slot states and in
//! the guest's online CPUs (and its topology files), in one QEMU process.

mod common;

use common::*;
use corescale_api::{Arch, Granularity, Placement, ResizeMethod, Topology, VcpuState};
use corescale_node_vmm::backend::{Backend, BackendError, Direction, VmHandle, VmSpec};
use std::time::Duration;

fn arm_spec(name: &str, t: Topology, p: Placement, boot: u32) -> VmSpec {
    let (kernel, initrd) = prerequisites_for(Arch::Aarch64);
    VmSpec {
        arch: Arch::Aarch64,
        kernel,
        initrd: Some(initrd),
        resize_method: ResizeMethod::GuestOnline,
        ..spec(name, t, Granularity::Thread, p, boot)
    }
}

fn steps(r: &corescale_node_vmm::backend::ResizeReport) -> Vec<(u32, Direction)> {
    r.steps.iter().map(|s| (s.slot, s.direction)).collect()
}

/// 1 -> 4 -> 2 -> 3 of 4 slots; Hotplug is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_guest_online_1_4_2_3() {
    let env = Env::new().await;
    let t = Topology::new(1, 4, 1);
    let hotplug = VmSpec {
        resize_method: ResizeMethod::Hotplug,
        ..arm_spec("arm-hotplug", t, Placement::Packed, 1)
    };
    match env.backend.start(&hotplug).await {
        Err(e @ BackendError::InvalidSpec { .. }) => {
            assert!(e.to_string().starts_with("spec.resizeMethod:"), "{e}")
        }
        Err(other) => panic!("expected InvalidSpec, got {other}"),
        Ok(_) => panic!("an aarch64 Hotplug guest started"),
    }
    let spec = arm_spec("arm", t, Placement::Packed, 1);
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    assert_eq!(
        guest(&vm, "/sys/devices/system/cpu/present").await.trim(),
        "0-3"
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
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(3, Direction::Unplug), (2, Direction::Unplug)]);
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(steps(&r), [(2, Direction::Plug)]);
    let obs = vm.observe().await.unwrap();
    let states: Vec<VcpuState> = obs.slots.iter().map(|s| s.state).collect();
    use VcpuState::{Offline, Online};
    assert_eq!(states, [Online, Online, Online, Offline]);
    // Slot n is guest CPU n, and the guest puts it where the topology does.
    for slot in 0..3u32 {
        let cpu = obs.slots[slot as usize].guest_cpu.unwrap();
        assert_eq!(cpu, slot);
        let core: u32 = guest(
            &vm,
            &format!("/sys/devices/system/cpu/cpu{cpu}/topology/core_id"),
        )
        .await
        .trim()
        .parse()
        .unwrap();
        assert_eq!(core, slot, "cpu{cpu} is core {slot}");
    }
    assert_eq!(vm.pid(), pid, "the same QEMU throughout");
    assert_eq!(
        vm.vcpu_cpu_seconds()
            .await
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "every slot's thread from boot"
    );
    vm.stop(Duration::from_secs(10)).await.unwrap();
    env.shutdown().await;
}

/// Spread over 2 sockets (NUMA nodes): growth goes to socket 1 first, checked in the
/// guest's NUMA node CPU lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_guest_online_spread_2_sockets() {
    let env = Env::new().await;
    let spec = arm_spec("arm-spread", Topology::new(2, 2, 1), Placement::Spread, 1);
    let (vm, _) = boot(&env, &spec).await;
    verify(&vm, 1).await;
    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(steps(&r), [(2, Direction::Plug)], "socket 1 first");
    let node1 = parse_cpulist(&guest(&vm, "/sys/devices/system/node/node1/cpulist").await);
    assert!(
        node1.contains(&2),
        "slot 2 (cpu2) is on NUMA node 1: {node1:?}"
    );
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(steps(&r), [(1, Direction::Plug), (3, Direction::Plug)]);
    vm.stop(Duration::from_secs(10)).await.unwrap();
    env.shutdown().await;
}
