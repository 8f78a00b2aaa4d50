//! Scenario `ppc64le`: POWER (pseries) guests scaled by whole cores through the real API server.

use super::foreign_arch::{boot, delete_and_check, ensure_announced};
use super::support::{manifest, no_split_core};
use super::{BOOT, CONVERGE, NS};
use crate::Stack;
use anyhow::{ensure, Result};
use corescale_api::VcpuState;

/// `ppc64le`: a ppc64le guest through the real API server: the nodes announce the
/// architecture, the VM boots under qemu-system-ppc64, kubectl scale moves whole cores
/// (both SMT threads) in the guest and in status, with the same Events and metrics as on
/// x86; deleting it leaves no QEMU.
pub(super) async fn ppc64le(s: &Stack) -> Result<String> {
    ensure_announced(s, "ppc64le", "is qemu-system-ppc64 installed?")?;
    let g = boot(
        s,
        &manifest(s, "good/ppc64le.yaml")?,
        "power",
        2,
        "qemu-system-ppc64",
    )
    .await?;
    let mut took = Vec::new();
    for n in [4u32, 2] {
        let (vm, t) = g.scale(s, n).await?;
        took.push(t);
        no_split_core(&vm)?;
    }
    g.finish(
        s,
        &["2 -> 4 vCPUs", "4 -> 2 vCPUs"],
        "",
        [("plug", 2.0), ("unplug", 2.0)],
    )
    .await?;
    // One thread per core: a core is one vCPU, so Thread granularity is allowed; 1 -> 3 -> 2.
    let single = "power-st";
    s.create(
        NS,
        &format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {single}}}\n\
             spec: {{arch: ppc64le, cpus: 1, memory: 512Mi, topology: {{sockets: 1, cores: 4, threads: 1}}}}\n"
        ),
    )
    .await?;
    s.wait_online(NS, single, 1, BOOT).await?;
    for n in [3u32, 2] {
        s.scale(NS, single, n).await?;
        let vm = s.wait_online(NS, single, n, CONVERGE).await?;
        let online: Vec<u32> = vm
            .status
            .as_ref()
            .map(|st| {
                st.vcpus
                    .iter()
                    .filter(|v| v.state == VcpuState::Online)
                    .map(|v| v.index)
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            online == (0..n).collect::<Vec<_>>(),
            "threads=1 POWER VM at {n}: Online slots {online:?}"
        );
    }
    delete_and_check(s, single).await?;
    Ok(format!(
        "booted in {:.1} s on {}; 2 -> 4 in {:.2} s, 4 -> 2 in {:.2} s (threads=2); 1 -> 3 -> 2 (threads=1); Events, metrics; deleted",
        g.boot, g.node, took[0], took[1]
    ))
}
