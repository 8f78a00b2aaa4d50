//! Fault scenarios `agent-kill` and `reschedule`: a node agent killed mid-resize, and one
//! gone past its lease.

use super::{Faults, BOOT, CONVERGE, NS};
use crate::{condition, node_of, online, Stack};
use anyhow::{ensure, Context as _, Result};
use std::time::{Duration, Instant};

/// `agent-kill`: kill -9 the agent during a resize; the guest keeps running; the restarted agent
/// re-adopts it and converges without restarting it.
pub(super) async fn agent_kill(s: &Stack, f: &mut Faults) -> Result<String> {
    s.scale(NS, "example", 2).await?;
    let vm = s.wait_online(NS, "example", 2, CONVERGE).await?;
    let node = node_of(&vm).context("no node")?;
    let qemu = s.qemu(&node, NS, "example").context("no QEMU")?;
    s.scale(NS, "example", 4).await?;
    // Mid-resize: as soon as the agent reports a slot Plugging (or right away).
    s.wait_plugging(NS, "example").await;
    s.stack(&["agent", "kill", &node])?;
    f.inject();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        s.qemu(&node, NS, "example") == Some(qemu),
        "the guest died with its agent"
    );
    let back = Instant::now();
    s.stack(&["agent", "start", &node])?;
    let vm = s.wait_online(NS, "example", 4, CONVERGE).await?;
    let recover = back.elapsed().as_secs_f64();
    ensure!(node_of(&vm).as_deref() == Some(node.as_str()), "moved");
    ensure!(
        s.qemu(&node, NS, "example") == Some(qemu),
        "the guest was restarted (QEMU pid/start changed)"
    );
    let ev = s.events(NS, "example")?;
    let started = ev
        .iter()
        .filter(|(r, _)| r == "Started" || r == "VmmRestarted")
        .count();
    ensure!(started == 1, "guest started {started} times: {ev:?}");
    f.recovered(recover);
    Ok(format!(
        "QEMU pid {} survived; converged to 4 {recover:.1} s after the agent restarted",
        qemu.0
    ))
}

/// `reschedule`: stop the example VM's agent past its lease: the operator moves the VM, it runs on
/// the other node; the old agent, back, stops its stale guest.
pub(super) async fn reschedule(s: &Stack, f: &mut Faults) -> Result<String> {
    let vm = s.vms(NS).get("example").await?;
    let from = node_of(&vm).context("no node")?;
    let to = if from == "node-a" { "node-b" } else { "node-a" };
    let t0 = Instant::now();
    s.stack(&["agent", "stop", &from])?;
    f.inject();
    let vm = s
        .wait_vm(
            NS,
            "example",
            &format!("moved to {to}"),
            Duration::from_secs(60),
            |v| node_of(v).as_deref() == Some(to),
        )
        .await?;
    let moved = t0.elapsed().as_secs_f64();
    let want = vm.spec.cpus;
    // The operator resets what the lost node reported; Ready comes back from the new agent.
    let moved_vm = s.vms(NS).get("example").await?;
    ensure!(
        condition(&moved_vm, "Ready").is_none_or(|c| c.status == "False"),
        "Ready still claims the old node's guest"
    );
    ensure!(
        online(&moved_vm) == 0,
        "status.vcpus still shows the old node's Online vCPUs: {:?}",
        moved_vm.status.as_ref().map(|st| &st.vcpus)
    );
    s.wait_online(NS, "example", want, BOOT).await?;
    let running = t0.elapsed().as_secs_f64();
    ensure!(s.qemu(to, NS, "example").is_some(), "no QEMU on {to}");
    let ev = s.events(NS, "example")?;
    ensure!(
        ev.iter()
            .any(|(r, n)| r == "Rescheduled" && n.contains(&from)),
        "no Rescheduled event: {ev:?}"
    );
    s.stack(&["agent", "start", &from])?;
    let start = Instant::now();
    while s.qemu(&from, NS, "example").is_some() {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the stale guest on {from} still runs"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    f.recovered(running);
    Ok(format!("moved {from} -> {to} in {moved:.1} s; Running with {want} vCPUs after {running:.1} s; stale guest on {from} stopped"))
}
