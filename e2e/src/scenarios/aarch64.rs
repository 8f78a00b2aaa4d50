//! Scenario `aarch64`: an arm64 guest on QEMU's virt machine (no CPU hot-plug) scaled by
//! `resizeMethod: GuestOnline` through the real API server.

use super::support::manifest;
use super::{BOOT, CONVERGE, NS};
use crate::{node_of, prom_value, Stack};
use anyhow::{ensure, Context as _, Result};
use corescale_api::VcpuState;
use std::time::{Duration, Instant};

/// `aarch64`: the nodes announce aarch64, the VM boots under qemu-system-aarch64 with every
/// slot present, kubectl scale 1 -> 3 -> 2 onlines and offlines vCPUs in the same QEMU
/// (status lists the rest Offline), with Resized Events and operations counted under
/// method GuestOnline in Prometheus; deleting it leaves no QEMU.
pub(super) async fn aarch64(s: &Stack) -> Result<String> {
    let (ok, out, err) = s.kubectl(&[
        "get",
        "leases",
        "-n",
        "corescale-system",
        "-l",
        corescale_api::node::AGENT_LEASE_LABEL,
        "-o",
        "json",
    ])?;
    ensure!(ok, "listing node leases: {err}");
    let leases: serde_json::Value = serde_json::from_str(&out)?;
    let arches: Vec<String> = leases["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["metadata"]["annotations"][corescale_api::node::ANN_ARCHES].as_str())
        .map(str::to_string)
        .collect();
    ensure!(
        arches.iter().any(|l| l.split(',').any(|a| a == "aarch64")),
        "no node announces aarch64 (is qemu-system-aarch64 installed? scripts/install-deps.sh): {arches:?}"
    );
    let name = "aarch64";
    s.create(NS, &manifest(s, "good/aarch64.yaml")?).await?;
    let t0 = Instant::now();
    s.wait_online(NS, name, 1, BOOT).await?;
    let boot = t0.elapsed().as_secs_f64();
    let vm = s.vms(NS).get(name).await?;
    let node = node_of(&vm).context("no node in status")?;
    let (pid, _) = s
        .qemu(&node, NS, name)
        .context("no QEMU process for the arm64 VM")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    ensure!(
        exe.to_string_lossy().ends_with("qemu-system-aarch64"),
        "the arm64 VM runs {}",
        exe.display()
    );
    let mut took = Vec::new();
    for n in [3u32, 2] {
        let t = Instant::now();
        s.scale(NS, name, n).await?;
        let vm = s.wait_online(NS, name, n, CONVERGE).await?;
        took.push(t.elapsed().as_secs_f64());
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
        ensure!(
            s.qemu(&node, NS, name).map(|q| q.0) == Some(pid),
            "QEMU was restarted while scaling"
        );
    }
    let events = s.events(NS, name)?;
    for want in ["1 -> 3 vCPUs", "3 -> 2 vCPUs"] {
        ensure!(
            events
                .iter()
                .any(|(r, note)| r == "Resized" && note.contains(want)),
            "no Resized event saying {want:?}: {events:?}"
        );
    }
    let sel = format!(r#"namespace="{NS}",name="{name}",method="GuestOnline""#);
    for (dir, count) in [("plug", 2.0), ("unplug", 1.0)] {
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_operations_total{{{sel},direction="{dir}",result="success"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == count
        })
        .await
        .with_context(|| format!("{dir} operations of the arm64 VM by method in Prometheus"))?;
    }
    s.delete(NS, name).await?;
    s.wait_gone(NS, name, CONVERGE).await?;
    ensure!(
        s.qemu_processes(NS, name).is_empty(),
        "QEMU of the arm64 VM left"
    );
    Ok(format!(
        "booted in {boot:.1} s on {node}; 1 -> 3 in {:.2} s, 3 -> 2 in {:.2} s (GuestOnline, same QEMU); Events, metrics by method; deleted",
        took[0], took[1]
    ))
}
