//! An agent restart: the agent dies in the middle of a plug (its handle is dropped mid-
//! operation, as `kill -9` would), the launcher and QEMU stay; a fresh backend finds the
//! guest, adopts it and resizes it again, and the guest never restarted.

mod common;

use common::*;
use corescale_api::VcpuState;
use corescale_node_vmm::backend::{Backend, BackendError, VmHandle};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_adopts_and_resizes() {
    let env = Env::new().await;
    let spec = thread_spec("adopt", 6);
    let (vm, _) = boot(&env, &spec).await;
    let mut tr = Tracker::default();
    resize_to(&vm, &mut tr, 2).await;
    let pid = vm.pid();
    let boot_id = guest(&vm, "/proc/sys/kernel/random/boot_id").await;
    let uptime_before = vm.guest_uptime().await.unwrap();

    // Starting it again is refused while it runs.
    let e = env
        .backend
        .start(&spec)
        .await
        .err()
        .expect("already running");
    assert!(
        matches!(e, BackendError::State { .. }) && e.to_string().contains("adopt it"),
        "{e}"
    );
    // QEMU serves one QMP client: a second agent cannot take the guest from a live one.
    let e = env
        .fresh_backend()
        .adopt(&spec)
        .await
        .err()
        .expect("QMP is taken");
    println!("[adopt] adopt while another handle holds QMP: {e}");
    assert!(e.to_string().contains("another client"), "{e}");

    // The agent dies while plugging a third vCPU.
    let vm = Arc::new(vm);
    let obs = vm.observe().await.unwrap();
    let plan = tr.plan(&spec, &obs, 3).unwrap();
    assert_eq!(plan.plug_slots(), vec![2]);
    let task = tokio::spawn({
        let vm = Arc::clone(&vm);
        async move { vm.resize(&plan, OPTS).await }
    });
    tokio::time::sleep(Duration::from_millis(60)).await;
    task.abort();
    let finished = task.await.is_ok();
    println!(
        "[adopt] the interrupted resize {}",
        if finished {
            "had already finished"
        } else {
            "was cut off"
        }
    );
    drop(Arc::try_unwrap(vm).expect("the aborted task released the handle"));
    drop(tr);

    // A restarted agent: a fresh backend on the same launcher and state directory.
    let backend = env.fresh_backend();
    let running = backend.running().await.unwrap();
    assert_eq!(
        running,
        vec![spec.clone()],
        "the running guest is found with its spec"
    );
    let vm = backend.adopt_vm(&running[0]).await.unwrap();
    assert_eq!(vm.pid(), pid, "the same QEMU process");
    vm.wait_guest_ready(Duration::from_secs(30)).await.unwrap();
    // The first observation finishes the interrupted plug if QEMU got the device_add.
    let obs = vm.observe().await.unwrap();
    let states: Vec<VcpuState> = obs.slots.iter().map(|s| s.state).collect();
    println!("[adopt] slots after adoption: {states:?}");
    assert!(obs.online() == 2 || obs.online() == 3, "{states:?}");
    assert!(
        states
            .iter()
            .all(|s| matches!(s, VcpuState::Online | VcpuState::Absent)),
        "nothing left half-plugged: {states:?}"
    );
    verify(&vm, obs.online()).await;

    // Resize again from the adopted handle, both ways.
    let mut tr = Tracker::default();
    resize_to(&vm, &mut tr, 4).await;
    resize_to(&vm, &mut tr, 2).await;
    resize_to(&vm, &mut tr, 3).await;
    let obs = vm.observe().await.unwrap();
    for (slot, s) in obs.slots.iter().enumerate() {
        if s.state == VcpuState::Online {
            check_guest_topology(&vm, &obs, u32::try_from(slot).unwrap()).await;
        }
    }
    let budget = vm.vcpu_budget().await.unwrap();
    assert!(budget.0 <= 6, "the budget survived the restart: {budget:?}");
    assert!(
        budget.0 >= 5,
        "1 boot + plugs before and after the restart: {budget:?}"
    );

    // The guest never restarted.
    assert_eq!(
        guest(&vm, "/proc/sys/kernel/random/boot_id").await,
        boot_id,
        "same guest boot"
    );
    let uptime_after = vm.guest_uptime().await.unwrap();
    assert!(
        uptime_after > uptime_before,
        "uptime {uptime_before} -> {uptime_after}"
    );
    println!("[adopt] same pid {pid}, same boot id, guest uptime {uptime_before:.1} s -> {uptime_after:.1} s");
    finish(&env, vm).await;
    assert!(backend.running().await.unwrap().is_empty());
    env.shutdown().await;
}
