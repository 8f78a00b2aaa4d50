//! Scenario `storm`: an autoscaler storm of 200 random writes in 10 s converges to the last.

use super::support::resized_events;
use super::{CONVERGE, NS};
use crate::{condition, prom_value, Stack};
use anyhow::{ensure, Context as _, Result};
use kube::api::{Patch, PatchParams};
use rand::Rng;
use std::time::{Duration, Instant};

/// `storm`: an autoscaler storm: 200 writes of random targets within 10 s.
pub(super) async fn storm(s: &Stack) -> Result<String> {
    // 64 slots: under TCG one QEMU process creates at most maxcpus vCPU threads in its life.
    let node = s.boot_one(NS, "storm", 64).await?;
    let qemu = s.qemu(&node, NS, "storm").context("no QEMU")?;
    let api = s.vms(NS);
    let mut last = 1;
    let t0 = Instant::now();
    let mut rng = rand::rng();
    let mut mid = None;
    for i in 0..200u32 {
        last = rng.random_range(1..=4u32);
        let body = serde_json::json!({"spec": {"replicas": last}});
        api.patch_scale("storm", &PatchParams::default(), &Patch::Merge(&body))
            .await?;
        if i == 100 {
            mid = Some(scrape_during(s, &node).await?);
        }
        let due = Duration::from_millis(50) * (i + 1);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let wrote = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let vm = s.wait_online(NS, "storm", last, CONVERGE).await?;
    let settle = t1.elapsed().as_secs_f64();
    ensure!(
        s.qemu(&node, NS, "storm") == Some(qemu),
        "QEMU restarted during the storm"
    );
    ensure!(
        condition(&vm, "ResizeInProgress").is_none_or(|c| c.status == "False"),
        "resize still in progress/error"
    );
    let fails = s
        .wait_prom(r#"sum(corescale_vcpu_hotplug_operations_total{namespace="demo",name="storm",result="failure"})"#, Duration::from_secs(20), |r| r.len() == 1)
        .await?;
    ensure!(
        prom_value(&fails[0]) == 0.0,
        "{} hot-plug operations failed",
        prom_value(&fails[0])
    );
    let resized = resized_events(&s.events(NS, "storm")?).len();
    let mid = mid.unwrap_or_default();
    s.delete(NS, "storm").await?;
    Ok(format!("200 writes in {wrote:.1} s coalesced into {resized} resizes; at {last} {settle:.1} s after the last write; mid-storm /metrics: {mid}"))
}

/// Scrape the node agent's /metrics directly in the middle of a storm: the VM's series
/// are there with sane values (desired in 1..=4, max 64, online <= present <= max).
async fn scrape_during(s: &Stack, node: &str) -> Result<String> {
    let var = if node == "node-a" {
        "CORESCALE_NODE_A_METRICS"
    } else {
        "CORESCALE_NODE_B_METRICS"
    };
    let text = crate::http_get(&format!("{}/metrics", s.var(var)?)).await?;
    // The text format sorts labels by name; match the metric and each pair.
    let get = |state: &str| -> Result<f64> {
        let pairs = [
            "namespace=\"demo\"",
            "name=\"storm\"",
            &format!("state=\"{state}\""),
        ];
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("corescale_vm_vcpus{")
                    && pairs
                        .iter()
                        .all(|p| l.contains(&format!("{{{p}")) || l.contains(&format!(",{p}")))
            })
            .with_context(|| {
                format!("no corescale_vm_vcpus of demo/storm state {state} in /metrics")
            })?;
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    };
    let (desired, online, present, max) = (
        get("desired")?,
        get("online")?,
        get("present")?,
        get("max")?,
    );
    ensure!((1.0..=4.0).contains(&desired), "desired {desired}");
    ensure!(max == 64.0, "max {max}");
    ensure!(
        online <= present && present <= max,
        "online {online} present {present} max {max}"
    );
    ensure!(
        text.contains("corescale_vcpu_hotplug_duration_seconds_bucket{"),
        "no latency histogram"
    );
    Ok(format!(
        "desired {desired} online {online} present {present}"
    ))
}
