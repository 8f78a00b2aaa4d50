//! Many cycles on one TCG guest: QEMU under multi-threaded TCG can create only maxcpus vCPU
//! threads in its life, so without parking a 1 <-> 4 VM could go up once. With parking
//! (an unplug offlines the vCPU through the agent and QEMU keeps it, reported Offline; the
//! next plug onlines it) it goes up and down 20 times in the same QEMU process, each step
//! checked inside the guest, and never creates more vCPU threads than its slots.

mod common;

use common::*;
use corescale_api::VcpuState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cycles_one_to_four_in_one_tcg_process() {
    let env = Env::new().await;
    let spec = thread_spec("cycles", 4);
    let (vm, _) = boot(&env, &spec).await;
    let pid = vm.pid();
    let mut tracker = Tracker::default();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for cycle in 1..=20 {
        for target in [4u32, 1] {
            let r = resize_to(&vm, &mut tracker, target).await;
            let took = r
                .steps
                .iter()
                .filter_map(|s| s.acked)
                .max()
                .unwrap_or_default();
            if target == 4 { &mut up } else { &mut down }.push(took.as_secs_f64());
            let obs = verify(&vm, target).await;
            let online = parse_cpulist(&guest(&vm, "/sys/devices/system/cpu/online").await);
            assert_eq!(
                online.len(),
                usize::try_from(target).unwrap(),
                "cycle {cycle}: the guest has {online:?} online, wanted {target}"
            );
            if target == 1 {
                // The vCPUs stay in QEMU, offline in the guest: parked.
                let parked = obs
                    .slots
                    .iter()
                    .filter(|s| s.state == VcpuState::Offline)
                    .count();
                assert_eq!(parked, 3, "cycle {cycle}: {obs:?}");
            }
        }
        let (threads, max) = vm.vcpu_budget().await.expect("TCG keeps a thread budget");
        assert!(
            threads <= max,
            "cycle {cycle}: {threads} vCPU threads created, budget {max}"
        );
    }
    assert_eq!(vm.pid(), pid, "the same QEMU process all along");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    println!(
        "[cycles] 20 cycles 1 <-> 4 in one QEMU: median 1 -> 4 {:.1} ms, 4 -> 1 {:.1} ms",
        median(&mut up),
        median(&mut down)
    );
    finish(&env, vm).await;
    env.shutdown().await;
}
