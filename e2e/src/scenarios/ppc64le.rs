//! Scenario `ppc64le`: POWER (pseries) guests scaled by whole cores through the real API server.

use super::support::{manifest, no_split_core};
use super::{BOOT, CONVERGE, NS};
use crate::{node_of, prom_value, Stack};
use anyhow::{ensure, Context as _, Result};
use corescale_api::VcpuState;
use std::time::{Duration, Instant};

/// `ppc64le`: a ppc64le guest through the real API server: the nodes announce the
/// architecture, the VM boots under qemu-system-ppc64, kubectl scale moves whole cores
/// (both SMT threads) in the guest and in status, with the same Events and metrics as on
/// x86; deleting it leaves no QEMU.
pub(super) async fn ppc64le(s: &Stack) -> Result<String> {
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
        arches.iter().any(|l| l.split(',').any(|a| a == "ppc64le")),
        "no node announces ppc64le (is qemu-system-ppc64 installed?): {arches:?}"
    );
    let name = "power";
    let yaml = manifest(s, "good/ppc64le.yaml")?;
    s.create(NS, &yaml).await?;
    let t0 = Instant::now();
    s.wait_online(NS, name, 2, BOOT).await?;
    let boot = t0.elapsed().as_secs_f64();
    let vm = s.vms(NS).get(name).await?;
    let node = node_of(&vm).context("no node in status")?;
    let (pid, _) = s
        .qemu(&node, NS, name)
        .context("no QEMU process for the POWER VM")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    ensure!(
        exe.to_string_lossy().ends_with("qemu-system-ppc64"),
        "the POWER VM runs {}",
        exe.display()
    );
    let mut took = Vec::new();
    for n in [4u32, 2] {
        let t = Instant::now();
        s.scale(NS, name, n).await?;
        let vm = s.wait_online(NS, name, n, CONVERGE).await?;
        took.push(t.elapsed().as_secs_f64());
        no_split_core(&vm)?;
        ensure!(
            s.qemu(&node, NS, name).map(|q| q.0) == Some(pid),
            "QEMU was restarted while scaling"
        );
    }
    let events = s.events(NS, name)?;
    for want in ["2 -> 4 vCPUs", "4 -> 2 vCPUs"] {
        ensure!(
            events
                .iter()
                .any(|(r, note)| r == "Resized" && note.contains(want)),
            "no Resized event saying {want:?}: {events:?}"
        );
    }
    let sel = format!(r#"namespace="{NS}",name="{name}""#);
    for dir in ["plug", "unplug"] {
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_operations_total{{{sel},direction="{dir}",result="success"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == 2.0
        })
        .await
        .with_context(|| format!("{dir} operations of the POWER VM in Prometheus"))?;
    }
    s.delete(NS, name).await?;
    s.wait_gone(NS, name, CONVERGE).await?;
    ensure!(
        s.qemu_processes(NS, name).is_empty(),
        "QEMU of the POWER VM left"
    );
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
    s.delete(NS, single).await?;
    s.wait_gone(NS, single, CONVERGE).await?;
    ensure!(
        s.qemu_processes(NS, single).is_empty(),
        "QEMU of the threads=1 POWER VM left"
    );
    Ok(format!(
        "booted in {boot:.1} s on {node}; 2 -> 4 in {:.2} s, 4 -> 2 in {:.2} s (threads=2); 1 -> 3 -> 2 (threads=1); Events, metrics; deleted",
        took[0], took[1]
    ))
}
