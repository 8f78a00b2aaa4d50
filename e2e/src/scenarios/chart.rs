//! Scenario `chart`: the rendered Helm chart validates on the API server, and its
//! FlowSchemas classify the stack's Lease renewals.

use crate::Stack;
use anyhow::{ensure, Context as _, Result};
use std::path::PathBuf;

/// `chart`: every object of the rendered chart validates on the real API server, with the
/// default values and with hostPath /dev/kvm and rolling updates. (The RBAC objects in it
/// are the ones the stack runs the operator and agents under.)
pub(super) async fn chart(s: &Stack) -> Result<String> {
    let helm = std::env::var("CORESCALE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/corescale")
        })
        .join("bin/helm");
    let mut objects = 0;
    for extra in [
        &[][..],
        &[
            "--set",
            "nodeVmm.kvm.mode=hostPath",
            "--set",
            "nodeVmm.updateStrategy.type=RollingUpdate",
        ][..],
    ] {
        let out = std::process::Command::new(&helm)
            .args(["template", "corescale"])
            .arg(s.repo.join("charts/corescale"))
            .args(["--namespace", "corescale-system"])
            .args(extra)
            .output()
            .with_context(|| {
                format!(
                    "running {} (e2e/cluster/install-helm.sh installs it)",
                    helm.display()
                )
            })?;
        ensure!(
            out.status.success(),
            "helm template {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout)?;
        let (ok, stdout, err) = s.kubectl_with(
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&rendered),
        )?;
        ensure!(ok, "the chart {extra:?} does not validate: {err}");
        objects += stdout.lines().count();
    }
    let flows = lease_flows(s)?;
    Ok(format!(
        "{objects} objects validated by the API server (2 value sets); {flows}"
    ))
}

/// The chart's FlowSchemas (applied with its RBAC by e2e/stack.sh) match what the agents
/// and the operator really send: the API server has dispatched their Lease renewals under
/// them, in the priority levels the chart names.
fn lease_flows(s: &Stack) -> Result<String> {
    let (ok, text, err) = s.kubectl(&["get", "--raw", "/metrics"])?;
    ensure!(ok, "reading the API server's /metrics: {err}");
    let mut said = vec![];
    for (schema, level) in [
        ("corescale-node-vmm-leases", "node-high"),
        ("corescale-operator-leader-election", "leader-election"),
    ] {
        let n = super::support::metric_sum(
            &text,
            "apiserver_flowcontrol_dispatched_requests_total",
            &[
                format!("flow_schema=\"{schema}\""),
                format!("priority_level=\"{level}\""),
            ],
        )
        .unwrap_or(0.0);
        ensure!(
            n > 0.0,
            "the API server dispatched no request under FlowSchema {schema} (priority level {level}): \
             the chart's FlowSchema does not match the Lease renewals it is for"
        );
        said.push(format!("{n:.0} Lease requests via {schema} ({level})"));
    }
    Ok(said.join(", "))
}
