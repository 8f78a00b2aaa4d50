//! Scenarios `agent-restart` and `pod-delete`: the two restarts README's "Upgrades and your
//! guests" table tells apart. The agent container restarting leaves the guests running
//! (they belong to the launcher container) and the new agent re-adopts them; deleting the
//! node-vmm pod stops them, and the new pod boots the VMs still placed on the node.

use super::pods::{node_vmm_pod, wait_pod, PodView, NODE_VMM_PODS};
use super::{host, Ctx, BOOT, SLOTS, VM, VM_NS};
use anyhow::{ensure, Context as _, Result};
use corescale_api::Phase;
use std::time::{Duration, Instant};

/// `agent-restart`: SIGKILL the agent container's process through containerd, as a crash
/// or the OOM killer would.
pub(super) async fn agent_restart(c: &Ctx) -> Result<String> {
    let pod = node_vmm_pod(c).await?;
    let launcher = pod.container("launcher")?.clone();
    let qemu = host::one_qemu(VM_NS, VM)?;
    let cpus = c.spec_cpus().await?;
    let started_before = started_events(c)?.len();

    let (back, secs) = kill_agent(c, &[VM]).await?;
    let l = back.container("launcher")?;
    ensure!(
        l.restarts == launcher.restarts && l.id == launcher.id,
        "the launcher container restarted too ({launcher:?} -> {l:?})"
    );
    ensure!(
        host::one_qemu(VM_NS, VM)? == qemu,
        "the guest's QEMU process changed across the agent's restart (was {qemu:?})"
    );
    let log = super::pods::logs(c, &back.name, "agent")?;
    ensure!(
        log.lines()
            .any(|l| l.contains("adopted running guest") && l.contains(&format!("{VM_NS}/{VM}"))),
        "the new agent's log does not say it adopted {VM_NS}/{VM}"
    );
    // The re-adopted guest still resizes, and the guest sees it.
    c.guest_sees(cpus).await?;
    let to = if cpus < SLOTS { cpus + 1 } else { cpus - 1 };
    let resize = c.scale_and_check(to).await?;
    ensure!(
        host::one_qemu(VM_NS, VM)? == qemu,
        "the QEMU process changed while resizing after the restart"
    );
    let started = started_events(c)?;
    ensure!(
        started.len() == started_before,
        "the guest was started again: Started events {started:?}"
    );
    Ok(format!(
        "agent Ready again in {secs:.1} s, VM Running throughout, QEMU pid {} kept, re-adopted; then {cpus} -> {to} in {resize:.1} s",
        qemu.pid
    ))
}

/// `pod-delete`: `kubectl delete pod` of the node's node-vmm pod, without draining first,
/// after `helm-upgrade` changed its template (how an OnDelete upgrade reaches a node).
/// README: the guests are stopped; the new pod boots the VMs still placed there.
pub(super) async fn pod_delete(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let pod = node_vmm_pod(c).await?;
    let qemu = host::one_qemu(VM_NS, VM)?;
    let cpus = c.spec_cpus().await?;
    let started_before = started_events(c)?;

    let t0 = Instant::now();
    let since = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    let (ok, _, err) = s.kubectl(&[
        "delete",
        "pod",
        "-n",
        super::RELEASE_NS,
        &pod.name,
        "--wait=false",
    ])?;
    ensure!(ok, "kubectl delete pod {}: {err}", pod.name);
    host::wait_qemu(VM_NS, VM, "stopped", Duration::from_secs(60), |q| {
        !q.contains(&qemu)
    })
    .await
    .context("the old pod's guest did not stop")?;
    let stopped = t0.elapsed().as_secs_f64();
    let new_pod = wait_pod(
        c,
        NODE_VMM_PODS,
        "replacing the deleted one",
        Duration::from_secs(180),
        |p| p.uid != pod.uid,
    )
    .await?;
    let pod_ready = t0.elapsed().as_secs_f64();
    // It is made from the template helm-upgrade left for it.
    let want_image = super::helm::upgraded(&c.node_vmm_image);
    ensure!(
        new_pod.containers.iter().all(|x| x.image == want_image),
        "the new pod does not run the upgraded template's image {want_image}: {:?}",
        new_pod.containers
    );
    // Status still shows the stopped guest Ready until the new agent writes: wait for
    // Ready to turn True again after the deletion (it is False while the guest boots).
    // Strictly after the second of the deletion: a resize just before it (helm-upgrade
    // ends with one) turns Ready True in that same second, and the boot takes seconds.
    let vm = s
        .wait_vm(
            VM_NS,
            VM,
            &format!("Ready again (after the deletion) with {cpus} vCPUs online"),
            BOOT,
            |v| {
                crate::online(v) == cpus
                    && v.status.as_ref().is_some_and(|st| st.cpus == Some(cpus))
                    && crate::condition(v, "Ready").is_some_and(|c| {
                        c.status == "True" && c.last_transition_time.0.as_second() > since
                    })
            },
        )
        .await?;
    let running = t0.elapsed().as_secs_f64();
    let new_qemu = host::one_qemu(VM_NS, VM)?;
    ensure!(new_qemu != qemu, "the guest kept its QEMU process {qemu:?}");
    ensure!(
        crate::node_of(&vm).as_deref() == Some(c.node.as_str()),
        "the VM is on {:?}, not back on {}",
        crate::node_of(&vm),
        c.node
    );
    c.guest_sees(cpus).await?;
    let started = started_events(c)?;
    let new: Vec<&String> = started.iter().skip(started_before.len()).collect();
    let want = format!("with {cpus} of {SLOTS} vCPUs");
    ensure!(
        new.iter().any(|n| n.contains(&c.node) && n.contains(&want)),
        "no new Started event '... on {} {want} ...' after the pod's deletion: {new:?}",
        c.node
    );
    Ok(format!(
        "guest stopped after {stopped:.1} s, new pod {} Ready at {pod_ready:.1} s, VM Ready again with {cpus} vCPUs (new QEMU pid {}) at {running:.1} s",
        new_pod.name, new_qemu.pid
    ))
}

/// SIGKILL the node-vmm pod's agent container and wait (up to 120 s) until the kubelet has
/// a new one Ready; the VMs `vms` (in [`VM_NS`]) must stay Running all along. Returns the
/// pod and the seconds it took.
pub(super) async fn kill_agent(c: &Ctx, vms: &[&str]) -> Result<(PodView, f64)> {
    let s = &c.stack;
    let pod = node_vmm_pod(c).await?;
    let agent = pod.container("agent")?.clone();
    let t0 = Instant::now();
    host::kill_container(&c.containerd, &agent.id, "SIGKILL")?;
    let deadline = t0 + Duration::from_secs(120);
    loop {
        for vm in vms {
            let v = s.vms(VM_NS).get(vm).await?;
            let phase = v.status.as_ref().and_then(|st| st.phase);
            ensure!(
                phase == Some(Phase::Running),
                "{VM_NS}/{vm} left Running while its agent restarted: phase {phase:?}"
            );
        }
        let p = node_vmm_pod(c).await?;
        let a = p.container("agent")?;
        if a.restarts > agent.restarts && a.ready {
            ensure!(
                p.uid == pod.uid,
                "the pod was replaced ({} -> {})",
                pod.uid,
                p.uid
            );
            return Ok((p, t0.elapsed().as_secs_f64()));
        }
        ensure!(
            Instant::now() < deadline,
            "the agent container did not come back Ready within 120 s (restarts {}, ready {})",
            a.restarts,
            a.ready
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The notes of the VM's `Started` and `VmmRestarted` Events, oldest first.
fn started_events(c: &Ctx) -> Result<Vec<String>> {
    Ok(c.stack
        .events(VM_NS, VM)?
        .into_iter()
        .filter(|(r, _)| r == "Started" || r == "VmmRestarted")
        .map(|(_, n)| n)
        .collect())
}
