//! Scenarios `apply`, `scale` and `delete`: the life of the example VM, from its manifest
//! to nothing left.

use super::support::{manifest, resized_events};
use super::{BOOT, CONVERGE, NS};
use crate::{condition, node_of, Stack};
use anyhow::{ensure, Context as _, Result};
use kube::ResourceExt;
use std::time::Instant;

/// `apply`: apply the example manifest.
pub(super) async fn apply(s: &Stack) -> Result<String> {
    let text = manifest(s, "good/example.yaml")?;
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", NS, "-f", "-"], Some(&text))?;
    ensure!(ok, "kubectl apply: {err}");
    let t0 = Instant::now();
    let vm = s.wait_online(NS, "example", 2, BOOT).await?;
    let node = node_of(&vm).context("no node")?;
    ensure!(
        condition(&vm, "Scheduled").is_some_and(|c| c.status == "True"),
        "Scheduled not True"
    );
    let st = vm.status.as_ref().unwrap();
    ensure!(
        st.phase == Some(corescale_api::Phase::Running),
        "phase {:?}",
        st.phase
    );
    ensure!(st.max_cpus == Some(8), "maxCpus {:?}", st.max_cpus);
    ensure!(
        st.selector.as_deref() == Some("corescale.dev/vm=example"),
        "selector {:?}",
        st.selector
    );
    ensure!(
        st.guest_agent.as_deref() == Some("Connected"),
        "guest agent {:?}",
        st.guest_agent
    );
    ensure!(
        s.qemu(&node, NS, "example").is_some(),
        "no QEMU for example on {node}"
    );
    let ev = s.events(NS, "example")?;
    ensure!(
        ev.iter().any(|(r, _)| r == "Scheduled"),
        "no Scheduled event: {ev:?}"
    );
    ensure!(
        ev.iter().any(|(r, _)| r == "Started"),
        "no Started event: {ev:?}"
    );
    Ok(format!(
        "Running on {node} with 2 vCPUs online in {:.1} s",
        t0.elapsed().as_secs_f64()
    ))
}

/// `scale`: kubectl scale to 3, 1, 4.
pub(super) async fn scale(s: &Stack) -> Result<String> {
    let mut timings = Vec::new();
    for n in [3u32, 1, 4] {
        let t0 = Instant::now();
        let (ok, _, err) =
            s.kubectl(&["scale", "-n", NS, "cvm/example", &format!("--replicas={n}")])?;
        ensure!(ok, "kubectl scale: {err}");
        let vm = s.wait_online(NS, "example", n, CONVERGE).await?;
        let lr = vm
            .status
            .as_ref()
            .and_then(|s| s.last_resize.clone())
            .context("no lastResize")?;
        ensure!(
            lr.to == n && lr.result == corescale_api::ResizeResult::Succeeded,
            "lastResize {lr:?}"
        );
        timings.push(format!("{n}: {:.2} s", t0.elapsed().as_secs_f64()));
    }
    let ev = resized_events(&s.events(NS, "example")?);
    for want in ["2 -> 3 vCPUs in", "3 -> 1 vCPUs in", "1 -> 4 vCPUs in"] {
        ensure!(
            ev.iter().any(|e| e.starts_with(want)),
            "no Resized event {want:?}: {ev:?}"
        );
    }
    let (ok, out, err) = s.kubectl(&["get", "cvm", "-n", NS, "example"])?;
    ensure!(ok, "kubectl get: {err}");
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "CPUS", "ONLINE", "MAX", "NODE", "PHASE", "AGE"],
        "columns: {header:?}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        row.get(1..4) == Some(&["4", "4", "8"][..]) && row.get(5) == Some(&"Running"),
        "row: {row:?}"
    );
    Ok(timings.join(", "))
}

/// `delete`: the guest stops, the finalizer goes, no QEMU remains; whatever an earlier
/// scenario left behind goes too.
pub(super) async fn delete(s: &Stack) -> Result<String> {
    let t0 = Instant::now();
    s.delete(NS, "example").await?;
    s.wait_gone(NS, "example", CONVERGE)
        .await
        .context("the finalizer was not removed")?;
    let left = s.qemu_processes(NS, "example");
    ensure!(left.is_empty(), "QEMU processes left: {left:?}");
    // Whatever an earlier scenario left behind goes too, and must leave nothing either.
    let others: Vec<String> = s
        .vms(NS)
        .list(&Default::default())
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    for n in &others {
        let _ = s.delete(NS, n).await;
    }
    for n in others.iter().map(String::as_str).chain([
        "hog", "wide", "smt", "storm", "outage", "restart", "frozen", "dmr", "crash",
    ]) {
        s.wait_gone(NS, n, CONVERGE).await?;
        ensure!(s.qemu_processes(NS, n).is_empty(), "QEMU of {n} left");
    }
    Ok(format!(
        "gone in {:.1} s; no QEMU process left for any VM",
        t0.elapsed().as_secs_f64()
    ))
}
