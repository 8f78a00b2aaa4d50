//! Scenario `aarch64`: an arm64 guest on QEMU's virt machine (no CPU hot-plug) scaled by
//! `resizeMethod: GuestOnline` through the real API server.

use super::foreign_arch::{boot, ensure_announced};
use super::support::manifest;
use crate::Stack;
use anyhow::{ensure, Result};
use corescale_api::VcpuState;

/// `aarch64`: the nodes announce aarch64, the VM boots under qemu-system-aarch64 with every
/// slot present, kubectl scale 1 -> 3 -> 2 onlines and offlines vCPUs in the same QEMU
/// (status lists the rest Offline), with Resized Events and operations counted under
/// method GuestOnline in Prometheus; deleting it leaves no QEMU.
pub(super) async fn aarch64(s: &Stack) -> Result<String> {
    ensure_announced(
        s,
        "aarch64",
        "is qemu-system-aarch64 installed? scripts/install-deps.sh",
    )?;
    let g = boot(
        s,
        &manifest(s, "good/aarch64.yaml")?,
        "aarch64",
        1,
        "qemu-system-aarch64",
    )
    .await?;
    let mut took = Vec::new();
    for n in [3u32, 2] {
        let (vm, t) = g.scale(s, n).await?;
        took.push(t);
        let states: Vec<(u32, VcpuState)> = vm
            .status
            .as_ref()
            .map(|st| st.vcpus.iter().map(|v| (v.index, v.state)).collect())
            .unwrap_or_default();
        let want: Vec<(u32, VcpuState)> = (0..4)
            .map(|i| {
                let st = if i < n {
                    VcpuState::Online
                } else {
                    VcpuState::Offline
                };
                (i, st)
            })
            .collect();
        ensure!(states == want, "arm64 VM at {n}: slots {states:?}");
    }
    g.finish(
        s,
        &["1 -> 3 vCPUs", "3 -> 2 vCPUs"],
        r#",method="GuestOnline""#,
        [("plug", 2.0), ("unplug", 1.0)],
    )
    .await?;
    Ok(format!(
        "booted in {:.1} s on {}; 1 -> 3 in {:.2} s, 3 -> 2 in {:.2} s (GuestOnline, same QEMU); Events, metrics by method; deleted",
        g.boot, g.node, took[0], took[1]
    ))
}
