//! Helpers several scenarios share: manifests, Events, status checks, signals and the
//! node agents' /metrics.

use crate::Stack;
use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::{VcpuState, VirtualMachine};

pub(super) fn manifest(s: &Stack, rel: &str) -> Result<String> {
    let p = s.repo.join("e2e/manifests").join(rel);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

pub(crate) fn resized_events(ev: &[(String, String)]) -> Vec<String> {
    ev.iter()
        .filter(|(r, _)| r == "Resized")
        .map(|(_, n)| n.clone())
        .collect()
}

/// Every core's threads are in one state in status: Core granularity never splits a core.
/// status.vcpus lists only slots that are not Absent, so a core listed at all must have all
/// its threads listed.
pub(super) fn no_split_core(vm: &VirtualMachine) -> Result<()> {
    let st = vm.status.as_ref().context("no status")?;
    let threads = st.topology.context("no status.topology")?.threads;
    let mut by_core: std::collections::BTreeMap<(u32, u32), Vec<VcpuState>> = Default::default();
    for v in &st.vcpus {
        ensure!(
            v.state != VcpuState::Absent,
            "slot {} is listed as Absent",
            v.index
        );
        by_core.entry((v.socket, v.core)).or_default().push(v.state);
    }
    for ((socket, core), states) in by_core {
        ensure!(
            states.len() == threads as usize && states.iter().all(|t| *t == states[0]),
            "socket {socket} core {core} is split: {states:?} of {threads} threads"
        );
    }
    Ok(())
}

pub(super) fn signal(pid: i32, sig: &str) -> Result<()> {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

pub(super) fn agent_metrics(s: &Stack, node: &str) -> Result<String> {
    let var = match node {
        "node-a" => "CORESCALE_NODE_A_METRICS",
        "node-b" => "CORESCALE_NODE_B_METRICS",
        other => bail!("no agent metrics for node {other}"),
    };
    Ok(s.var(var)?.to_string())
}

/// The sum of `metric`'s samples whose labels include all `pairs` (text format), or None
/// if there is none.
pub(crate) fn metric_sum(text: &str, metric: &str, pairs: &[String]) -> Option<f64> {
    let prefix = format!("{metric}{{");
    let mut sum = None;
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, value)) = l[prefix.len()..].rsplit_once("} ") else {
            continue;
        };
        let labels: Vec<&str> = labels.split(',').collect();
        if pairs.iter().all(|p| labels.contains(&p.as_str())) {
            if let Ok(v) = value.trim().parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_the_samples_with_every_pair() {
        let text = "\
corescale_vm_vcpus{name=\"a\",namespace=\"demo\",state=\"online\"} 2
corescale_vm_vcpus{name=\"a\",namespace=\"demo\",state=\"present\"} 3
corescale_vm_vcpus{name=\"b\",namespace=\"demo\",state=\"online\"} 4
corescale_vm_vcpus_other{name=\"a\",namespace=\"demo\",state=\"online\"} 9
";
        let pairs = |name: &str| vec![format!("name=\"{name}\""), "state=\"online\"".to_string()];
        assert_eq!(
            metric_sum(text, "corescale_vm_vcpus", &pairs("a")),
            Some(2.0)
        );
        assert_eq!(
            metric_sum(text, "corescale_vm_vcpus", &["namespace=\"demo\"".into()]),
            Some(9.0)
        );
        assert_eq!(metric_sum(text, "corescale_vm_vcpus", &pairs("c")), None);
    }

    #[test]
    fn resized_events_keeps_the_notes_of_resized_only() {
        let ev = [
            ("Started".to_string(), "guest started".to_string()),
            ("Resized".to_string(), "1 -> 2 vCPUs in 0.10 s".to_string()),
        ];
        assert_eq!(resized_events(&ev), ["1 -> 2 vCPUs in 0.10 s"]);
    }
}
