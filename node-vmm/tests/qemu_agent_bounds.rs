//! Every wait of the QEMU backend holds its bound whatever the guest's agent does, on real
//! QEMU/TCG guests whose init plays each kind of bad agent (the test image's
//! `corescale.agent=` command-line switch): none at all (the port is never opened, so QEMU
//! stops reading the socket), a port held open and never read, a port that carries only
//! garbage, and an agent killed and restarted every second. `wait_guest_ready`, `observe`
//! and a plug and an unplug each return within their deadline plus a small margin (a
//! resize step's deadline starts after one preparing agent round trip, which has its own
//! `agent_timeout`).

mod common;

use common::*;
use corescale_api::VcpuState;
use corescale_node_vmm::backend::{BackendError, VmHandle};
use std::time::Duration;

/// Slack for the scheduler and one agent probe (300 ms) on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(2);

/// One guest with `corescale.agent=<mode>`: boot wait, observe, plug, unplug, stop.
/// `answers`: whether the agent can answer at all (flap: sometimes).
async fn play(env: &Env, mode: &str, ready_wait: Duration, answers: bool) {
    let mut spec = thread_spec(&format!("agent-{mode}"), 2);
    spec.cmdline = format!("corescale.agent={mode}");
    let vm = env.backend.start_vm(&spec).await.unwrap();
    let name = format!("[{mode}]");

    let ready = within(
        &format!("{name} wait_guest_ready({ready_wait:?})"),
        ready_wait,
        MARGIN,
        vm.wait_guest_ready(ready_wait),
    )
    .await;
    if !answers {
        let e = ready.expect_err("no agent answers in this mode");
        assert!(matches!(e, BackendError::GuestAgent(_)), "{e:?}");
        assert!(
            e.to_string().contains(&format!("corescale.agent={mode}")),
            "the error carries the console, which names the mode: {e}"
        );
    }

    let agent_bound = env.cfg.agent_timeout + env.cfg.qmp_timeout;
    let obs = within(
        &format!("{name} observe"),
        agent_bound,
        MARGIN,
        vm.observe(),
    )
    .await;
    let obs = obs.expect("QEMU answers even when the agent does not");
    if !answers {
        assert!(!obs.guest_agent, "{mode}: no agent answered: {obs:?}");
    }

    let r = within(
        &format!("{name} plug"),
        OPTS.plug_timeout + env.cfg.agent_timeout,
        MARGIN,
        vm.resize(&plug(&[1]), OPTS),
    )
    .await;
    print_report(&spec.name, "plug", &r);
    if !answers {
        assert!(r.first_error().is_none(), "{mode}: {r:?}");
        assert!(r.steps[0].acked.is_some(), "the guest kernel acks: {r:?}");
    }
    let r = within(
        &format!("{name} unplug"),
        OPTS.unplug_timeout + env.cfg.agent_timeout,
        MARGIN,
        vm.resize(&unplug(&[1]), OPTS),
    )
    .await;
    print_report(&spec.name, "unplug", &r);
    if !answers {
        assert!(r.first_error().is_none(), "{mode}: {r:?}");
        // QEMU really ejected it: the guest released the vCPU without an agent.
        let obs = vm.observe().await.unwrap();
        assert_eq!(obs.slots[1].state, VcpuState::Absent, "{mode}: {obs:?}");
        assert_eq!(obs.online(), 1, "{mode}: {obs:?}");
    }
    within(
        &format!("{name} stop"),
        Duration::from_secs(3),
        MARGIN,
        vm.stop(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    forget(env, vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wait_is_bounded_whatever_the_agent_does() {
    let env = Env::new().await;
    // `off` waits as long as a boot does (90 s): long enough for the probes' requests to
    // fill the socket that QEMU no longer reads, which once blocked a write for good.
    tokio::join!(
        play(&env, "off", Duration::from_secs(90), false),
        play(&env, "silent", Duration::from_secs(20), false),
        play(&env, "garbage", Duration::from_secs(20), false),
        play(&env, "flap", Duration::from_secs(20), true),
    );
    env.shutdown().await;
}
