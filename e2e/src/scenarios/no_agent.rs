//! e2e scenario `no-agent`: guests without a QEMU guest agent, as most cloud images are.
//! The test image's `corescale.agent=` kernel argument plays them: `off` (never an agent)
//! and `delay=30` (an agent that starts 30 s after boot). The stack's agents give a guest
//! `CORESCALE_AGENT_GRACE_SECONDS` (10 s) to answer before running it without one.

use crate::{condition, node_of, Stack};
use anyhow::{ensure, Context as _, Result};
use corescale_api::{Phase, VcpuState, VirtualMachine};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(60);

fn manifest(name: &str, cmdline: &str) -> String {
    format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{cpus: 1, topology: {{sockets: 1, cores: 4, threads: 1}}, boot: {{cmdline: \"{cmdline}\"}}}}\n"
    )
}

fn states(vm: &VirtualMachine) -> Vec<(u32, VcpuState)> {
    vm.status
        .as_ref()
        .map(|s| s.vcpus.iter().map(|v| (v.index, v.state)).collect())
        .unwrap_or_default()
}

fn agent(vm: &VirtualMachine) -> Option<&str> {
    vm.status.as_ref().and_then(|s| s.guest_agent.as_deref())
}

/// Running without an agent, `cpus` vCPUs Present, Ready with reason NoGuestAgent.
fn agentless_at(vm: &VirtualMachine, cpus: u32) -> bool {
    let st = vm.status.as_ref();
    st.is_some_and(|s| {
        s.phase == Some(Phase::Running)
            && s.cpus == Some(cpus)
            && s.observed_generation == vm.metadata.generation
    }) && agent(vm) == Some("Absent")
        && condition(vm, "Ready").is_some_and(|c| c.status == "True" && c.reason == "NoGuestAgent")
        && states(vm).len() == usize::try_from(cpus).unwrap_or(0)
        && states(vm)
            .iter()
            .all(|(i, s)| *i == 0 || *s == VcpuState::Present)
}

/// Run the scenario in namespace `ns`.
pub async fn no_agent(s: &Stack, ns: &str) -> Result<String> {
    // 1. Never an agent: Running after the grace, scaled 1 -> 3 -> 1 on the VMM's signals.
    let name = "noagent";
    let t0 = Instant::now();
    s.create(ns, &manifest(name, "corescale.agent=off")).await?;
    let vm = s
        .wait_vm(ns, name, "Running without an agent", BOOT, |vm| {
            agentless_at(vm, 1)
        })
        .await?;
    let running_after = t0.elapsed().as_secs_f64();
    let node = node_of(&vm).context("no node")?;
    let qemu = s.qemu(&node, ns, name).context("no QEMU")?;
    let ready = condition(&vm, "Ready").context("no Ready")?;
    ensure!(
        ready.message.contains("no guest agent"),
        "Ready says why: {}",
        ready.message
    );
    for (to, from) in [(3u32, 1u32), (1, 3)] {
        s.scale(ns, name, to).await?;
        s.wait_vm(ns, name, &format!("{to} vCPUs present"), CONVERGE, |vm| {
            agentless_at(vm, to)
        })
        .await?;
        let ev = s.events(ns, name)?;
        let want = format!("{from} -> {to} vCPUs in");
        ensure!(
            ev.iter()
                .any(|(r, n)| r == "Resized" && n.starts_with(&want)),
            "no Resized event {want:?}: {ev:?}"
        );
    }
    ensure!(
        s.qemu(&node, ns, name) == Some(qemu),
        "the guest was restarted"
    );
    s.delete(ns, name).await?;

    // 2. An agent that starts 30 s after boot: agentless first (a plug ends Present), then
    //    the same guest switches to Online counts, the earlier plug onlined.
    let late = "lateagent";
    s.create(ns, &manifest(late, "corescale.agent=delay=30"))
        .await?;
    let vm = s
        .wait_vm(ns, late, "Running without an agent (yet)", BOOT, |vm| {
            agentless_at(vm, 1)
        })
        .await?;
    let node = node_of(&vm).context("no node")?;
    let qemu = s.qemu(&node, ns, late).context("no QEMU")?;
    s.scale(ns, late, 2).await?;
    let t1 = Instant::now();
    let vm = s
        .wait_vm(
            ns,
            late,
            "2 vCPUs online through the late agent",
            BOOT,
            |vm| {
                agent(vm) == Some("Connected")
                    && vm.status.as_ref().is_some_and(|s| s.cpus == Some(2))
                    && states(vm) == [(0, VcpuState::Online), (1, VcpuState::Online)]
                    && condition(vm, "Ready")
                        .is_some_and(|c| c.status == "True" && c.reason == "Ready")
            },
        )
        .await?;
    ensure!(
        s.qemu(&node, ns, late) == Some(qemu),
        "the guest was restarted"
    );
    let switched_after = t1.elapsed().as_secs_f64();
    ensure!(vm.status.is_some());
    s.delete(ns, late).await?;
    s.wait_gone(ns, name, CONVERGE).await?;
    s.wait_gone(ns, late, CONVERGE).await?;
    Ok(format!(
        "agentless Running after {running_after:.1} s, 1 -> 3 -> 1 Present; late agent: Online 2/2 {switched_after:.1} s after the scale, same QEMU"
    ))
}
