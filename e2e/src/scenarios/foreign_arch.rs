//! What the scenarios of guests of another architecture (`ppc64le`, `aarch64`) share: the
//! nodes announce the architecture, the VM boots under that architecture's QEMU, a scale
//! keeps the same QEMU, Events and metrics say what happened, and deleting it leaves no
//! QEMU.

use super::{BOOT, CONVERGE, NS};
use crate::{node_of, prom_value, Stack};
use anyhow::{ensure, Context as _, Result};
use std::time::{Duration, Instant};

/// A booted guest of another architecture.
pub(super) struct ForeignGuest {
    /// Its name in [`NS`].
    pub name: String,
    /// Seconds from create to `cpus` online.
    pub boot: f64,
    /// The node running it.
    pub node: String,
    /// Its QEMU's pid.
    pub pid: i32,
}

/// Fail unless some node announces `arch` (`install` says what gives a node it).
pub(super) fn ensure_announced(s: &Stack, arch: &str, install: &str) -> Result<()> {
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
        arches.iter().any(|l| l.split(',').any(|a| a == arch)),
        "no node announces {arch} ({install}): {arches:?}"
    );
    Ok(())
}

/// Create the VM of `yaml` named `name`, wait until `cpus` are online, and check that it
/// runs under `qemu` (the binary's name).
pub(super) async fn boot(
    s: &Stack,
    yaml: &str,
    name: &str,
    cpus: u32,
    qemu: &str,
) -> Result<ForeignGuest> {
    s.create(NS, yaml).await?;
    let t0 = Instant::now();
    s.wait_online(NS, name, cpus, BOOT).await?;
    let boot = t0.elapsed().as_secs_f64();
    let vm = s.vms(NS).get(name).await?;
    let node = node_of(&vm).context("no node in status")?;
    let (pid, _) = s
        .qemu(&node, NS, name)
        .with_context(|| format!("no QEMU process for VM {name}"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    ensure!(
        exe.to_string_lossy().ends_with(qemu),
        "VM {name} runs {}, not {qemu}",
        exe.display()
    );
    Ok(ForeignGuest {
        name: name.to_string(),
        boot,
        node,
        pid,
    })
}

impl ForeignGuest {
    /// Scale to `n`, wait until the guest has them online, and check it is the same QEMU;
    /// the VM as it then is, and the seconds it took.
    pub(super) async fn scale(
        &self,
        s: &Stack,
        n: u32,
    ) -> Result<(corescale_api::VirtualMachine, f64)> {
        let t = Instant::now();
        s.scale(NS, &self.name, n).await?;
        let vm = s.wait_online(NS, &self.name, n, CONVERGE).await?;
        let took = t.elapsed().as_secs_f64();
        ensure!(
            s.qemu(&self.node, NS, &self.name).map(|q| q.0) == Some(self.pid),
            "QEMU of {} was restarted while scaling",
            self.name
        );
        Ok((vm, took))
    }

    /// Check the Resized Events (each of `wants`, e.g. "1 -> 3 vCPUs") and the successful
    /// plug/unplug operations Prometheus counts for the VM (`extra` labels, e.g. the
    /// method), then delete it and check its QEMU is gone.
    pub(super) async fn finish(
        &self,
        s: &Stack,
        wants: &[&str],
        extra: &str,
        counts: [(&str, f64); 2],
    ) -> Result<()> {
        let name = &self.name;
        let events = s.events(NS, name)?;
        for want in wants {
            ensure!(
                events
                    .iter()
                    .any(|(r, note)| r == "Resized" && note.contains(want)),
                "no Resized event saying {want:?}: {events:?}"
            );
        }
        let sel = format!(r#"namespace="{NS}",name="{name}"{extra}"#);
        for (dir, count) in counts {
            let q = format!(
                r#"sum(corescale_vcpu_hotplug_operations_total{{{sel},direction="{dir}",result="success"}})"#
            );
            s.wait_prom(&q, Duration::from_secs(30), |r| {
                r.len() == 1 && prom_value(&r[0]) == count
            })
            .await
            .with_context(|| format!("{dir} operations of VM {name} in Prometheus"))?;
        }
        delete_and_check(s, name).await
    }
}

/// Delete VM `name` and check that no QEMU of it is left.
pub(super) async fn delete_and_check(s: &Stack, name: &str) -> Result<()> {
    s.delete(NS, name).await?;
    s.wait_gone(NS, name, CONVERGE).await?;
    ensure!(
        s.qemu_processes(NS, name).is_empty(),
        "QEMU of VM {name} left"
    );
    Ok(())
}
