//! e2e scenario `cycles`: one TCG guest scaled 1 <-> 4 twenty times through the API server.
//! Multi-threaded TCG lets one QEMU process create only maxCpus vCPU threads in its life;
//! the node parks what it cannot afford to remove (offline in the guest, kept by QEMU,
//! reported `Offline`), so the VM goes up and down for ever in the same QEMU process.
//! Every step is checked in the guest's own view (status comes from its agent), and the
//! QEMU process never holds more vCPU threads than the VM has slots.

use crate::{node_of, Stack};
use anyhow::{ensure, Context as _, Result};
use corescale_api::VcpuState;
use std::time::{Duration, Instant};

const CYCLES: u32 = 20;
const SLOTS: u32 = 4;

/// vCPU threads of a QEMU process (TCG names them "CPU n/TCG").
fn vcpu_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("CPU "))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Run the scenario in namespace `ns`.
pub async fn cycles(s: &Stack, ns: &str) -> Result<String> {
    let name = "cycles";
    let node = s.boot_one(ns, name, SLOTS).await?;
    let (pid, started) = s.qemu(&node, ns, name).context("no QEMU")?;
    let mut times = Vec::new();
    for cycle in 1..=CYCLES {
        for target in [SLOTS, 1] {
            let t0 = Instant::now();
            s.scale(ns, name, target).await?;
            let vm = s
                .wait_online(ns, name, target, Duration::from_secs(60))
                .await
                .with_context(|| format!("cycle {cycle}, to {target}"))?;
            times.push(t0.elapsed().as_secs_f64());
            let st = vm.status.as_ref().context("no status")?;
            ensure!(
                st.guest_agent.as_deref() == Some("Connected"),
                "cycle {cycle}: the guest agent does not answer: {:?}",
                st.guest_agent
            );
            let parked = st
                .vcpus
                .iter()
                .filter(|v| v.state == VcpuState::Offline)
                .count();
            ensure!(
                u32::try_from(parked)? + target <= SLOTS,
                "cycle {cycle}: {parked} Offline and {target} online in {SLOTS} slots"
            );
            ensure!(
                node_of(&vm).as_deref() == Some(node.as_str()),
                "cycle {cycle}: the VM moved"
            );
        }
        ensure!(
            s.qemu(&node, ns, name) == Some((pid, started)),
            "cycle {cycle}: the QEMU process changed (restart)"
        );
        let threads = vcpu_threads(pid);
        ensure!(
            threads <= usize::try_from(SLOTS)?,
            "cycle {cycle}: QEMU holds {threads} vCPU threads, more than {SLOTS} slots"
        );
    }
    let ev = s.events(ns, name)?;
    let resized = ev.iter().filter(|(r, _)| r == "Resized").count();
    ensure!(
        resized >= usize::try_from(2 * CYCLES)?,
        "{resized} Resized events for {} resizes",
        2 * CYCLES
    );
    s.delete(ns, name).await?;
    s.wait_gone(ns, name, Duration::from_secs(60)).await?;
    times.sort_by(f64::total_cmp);
    Ok(format!(
        "{} resizes 1 <-> {SLOTS} in QEMU pid {pid}: median {:.2} s, max {:.2} s",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    ))
}
