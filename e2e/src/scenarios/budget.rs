//! Scenario `infeasible-deferred`: a target above the node's whole budget is Infeasible; one
//! the full budget cannot take now is Deferred until room is freed.

use super::{BOOT, CONVERGE, NS};
use crate::{condition, node_of, online, prom_value, Stack};
use anyhow::{bail, ensure, Result};
use std::time::Duration;

/// `infeasible-deferred`: Infeasible (above the node's whole budget) and Deferred (budget full, then freed).
/// The smt VM leaves first so node budgets are easy to reason about; both VMs are pinned
/// to node-b, whose budget is 2 host CPUs x 4 = 8 vCPUs.
pub(super) async fn infeasible_deferred(s: &Stack) -> Result<String> {
    s.delete(NS, "smt").await?;
    s.wait_gone(NS, "smt", CONVERGE).await?;
    let node = "node-b";
    let on_b = |n: &str| {
        format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {n}}}\n"
        )
    };
    // Make sure nothing else holds node-b's budget.
    for vm in s.vms(NS).list(&Default::default()).await? {
        if node_of(&vm).as_deref() == Some(node) && vm.metadata.deletion_timestamp.is_none() {
            bail!(
                "{} runs on {node}; the scenario needs it empty",
                crate::id(&vm)
            );
        }
    }
    s.create(NS, &format!("{}spec: {{cpus: 5, nodeName: {node}, topology: {{sockets: 1, cores: 6, threads: 1}}}}\n", on_b("hog"))).await?;
    s.create(NS, &format!("{}spec: {{cpus: 1, nodeName: {node}, topology: {{sockets: 1, cores: 12, threads: 1}}}}\n", on_b("wide"))).await?;
    s.wait_online(NS, "hog", 5, BOOT).await?;
    s.wait_online(NS, "wide", 1, BOOT).await?;
    // 10 > 8: never on this node.
    s.scale(NS, "wide", 10).await?;
    let vm = s
        .wait_vm(NS, "wide", "Infeasible", CONVERGE, |v| {
            condition(v, "ResizePending")
                .is_some_and(|c| c.status == "True" && c.reason == "Infeasible")
        })
        .await?;
    let msg = condition(&vm, "ResizePending")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        msg.contains("whole vCPU budget of 8"),
        "Infeasible message: {msg}"
    );
    ensure!(online(&vm) == 1, "the guest changed while Infeasible");
    s.wait_prom(
        r#"corescale_resize_pending{namespace="demo",name="wide",reason="Infeasible"}"#,
        Duration::from_secs(20),
        |r| r.len() == 1 && prom_value(&r[0]) == 1.0,
    )
    .await?;
    // 5 + 4 > 8: later.
    s.scale(NS, "wide", 4).await?;
    let vm = s
        .wait_vm(NS, "wide", "Deferred", CONVERGE, |v| {
            condition(v, "ResizePending")
                .is_some_and(|c| c.status == "True" && c.reason == "Deferred")
        })
        .await?;
    ensure!(online(&vm) == 1, "grew while Deferred");
    let ev = s.events(NS, "wide")?;
    ensure!(
        ev.iter().any(|(r, _)| r == "Infeasible") && ev.iter().any(|(r, _)| r == "Deferred"),
        "events: {ev:?}"
    );
    // Free room: the deferred resize proceeds by itself.
    s.scale(NS, "hog", 2).await?;
    s.wait_online(NS, "hog", 2, CONVERGE).await?;
    let vm = s.wait_online(NS, "wide", 4, CONVERGE).await?;
    ensure!(
        condition(&vm, "ResizePending").is_some_and(|c| c.status == "False"),
        "still pending"
    );
    for n in ["hog", "wide"] {
        s.delete(NS, n).await?;
    }
    Ok("Infeasible at 10 > 8; Deferred at 5+4 > 8; resumed when hog went 5 -> 2".into())
}
