//! Scenario `scale`: the VM boots in the node-vmm pod's launcher and follows `kubectl scale`
//! up and down, checked in status, in the guest's own `/sys` and in its one QEMU process.

use super::{host, Ctx, BOOT, SLOTS, VM, VM_NS};
use crate::scenarios::resized_events;
use crate::{condition, node_of};
use anyhow::{ensure, Context as _, Result};
use std::time::Instant;

/// Run it.
pub(super) async fn scale(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let t0 = Instant::now();
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {VM}\n\
         spec:\n  cpus: 1\n  topology: {{sockets: 1, cores: {SLOTS}, threads: 1}}\n"
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", VM_NS, "-f", "-"], Some(&yaml))?;
    ensure!(ok, "kubectl apply: {err}");
    let vm = s.wait_online(VM_NS, VM, 1, BOOT).await?;
    let boot = t0.elapsed().as_secs_f64();
    ensure!(
        node_of(&vm).as_deref() == Some(c.node.as_str()),
        "placed on {:?}, not on the node {}",
        node_of(&vm),
        c.node
    );
    ensure!(
        condition(&vm, "Ready").is_some_and(|x| x.status == "True"),
        "not Ready"
    );
    let st = vm.status.as_ref().context("no status")?;
    ensure!(
        st.guest_agent.as_deref() == Some("Connected"),
        "guest agent {:?}",
        st.guest_agent
    );
    let qemu = host::one_qemu(VM_NS, VM)?;
    c.guest_sees(1).await?;

    let mut steps = Vec::new();
    let mut from = 1;
    for n in [3u32, 1, 2] {
        let secs = c
            .scale_and_check(n)
            .await
            .with_context(|| format!("scaling {from} -> {n}"))?;
        ensure!(
            host::one_qemu(VM_NS, VM)? == qemu,
            "the QEMU process changed while scaling {from} -> {n} (was {qemu:?})"
        );
        steps.push(format!("{from}->{n} {secs:.1} s"));
        from = n;
    }
    let ev = resized_events(&s.events(VM_NS, VM)?);
    for want in ["1 -> 3 vCPUs in", "3 -> 1 vCPUs in", "1 -> 2 vCPUs in"] {
        ensure!(
            ev.iter().any(|e| e.starts_with(want)),
            "no Resized event {want:?}: {ev:?}"
        );
    }
    Ok(format!(
        "Running in {boot:.1} s (QEMU host pid {}); {}; the guest's /sys agreed each time",
        qemu.pid,
        steps.join(", ")
    ))
}
