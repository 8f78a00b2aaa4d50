//! A guest whose agent starts late, on a real QEMU/TCG guest (`corescale.agent=delay=N`):
//! before it answers, a plug completes on the guest kernel's ACPI acknowledgement and the
//! vCPU is reported Present; once the agent answers, the next observation onlines that
//! vCPU and reports it Online, with no restart of the guest.

mod common;

use common::*;
use corescale_api::VcpuState;
use corescale_node_vmm::backend::VmHandle;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_starts_late_is_picked_up_and_onlines_earlier_plugs() {
    let env = Env::new().await;
    let mut spec = thread_spec("late-agent", 3);
    spec.cmdline = "corescale.agent=delay=20".into();
    let vm = env.backend.start_vm(&spec).await.unwrap();
    let pid = vm.pid();
    let serial = vm.dir().join("serial.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("the guest agent starts in")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the guest's init did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!vm.guest_ready().await, "the agent has not started yet");

    // Two plugs before the agent: done on the kernel's _OST, Present.
    let r = vm.resize(&plug(&[1, 2]), OPTS).await;
    print_report("late-agent", "plug without agent", &r);
    assert!(r.first_error().is_none(), "{r:?}");
    assert!(r
        .steps
        .iter()
        .all(|s| s.acked.is_some() && s.online.is_none()));
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent);
    assert_eq!(
        [obs.slots[1].state, obs.slots[2].state],
        [VcpuState::Present, VcpuState::Present],
        "{obs:?}"
    );
    assert_eq!(obs.online(), 3, "without an agent, present vCPUs count");

    // The agent starts; the next observation onlines what the earlier plugs added.
    let waited = vm
        .wait_guest_ready(Duration::from_secs(90))
        .await
        .expect("the late agent answers");
    println!(
        "[late-agent] agent answered {:.1} s after the plugs",
        waited.as_secs_f64()
    );
    let t1 = Instant::now();
    let obs = loop {
        let obs = vm.observe().await.unwrap();
        if obs.guest_agent && obs.slots[1..3].iter().all(|s| s.state == VcpuState::Online) {
            break obs;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "the vCPUs plugged before the agent were not onlined: {obs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(obs.online(), 3);
    assert_eq!(
        parse_cpulist(&guest(&vm, "/sys/devices/system/cpu/online").await).len(),
        3,
        "the guest has all three online"
    );
    assert_eq!(vm.pid(), pid, "same QEMU: no restart");
    finish(&env, vm).await;
    env.shutdown().await;
}
