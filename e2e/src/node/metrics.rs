//! Scenario `metrics`: `/metrics` scraped from the pods the chart's Services select (their
//! EndpointSlices, port `metrics`: what a ServiceMonitor scrapes), checked against the VM's
//! status and the resizes of scenario `scale`.

use super::{Ctx, RELEASE, SLOTS, VM, VM_NS};
use crate::scenarios::metric_sum;
use anyhow::{ensure, Context as _, Result};
use std::time::{Duration, Instant};

/// The value of an unlabelled sample (`name value`).
fn plain(text: &str, metric: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(metric)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Run it.
pub(super) async fn metrics(c: &Ctx) -> Result<String> {
    let vm = c.stack.vms(VM_NS).get(VM).await?;
    let st = vm.status.as_ref().context("no status")?;
    let online = st.cpus.context("no status.cpus")?;
    let desired = vm.spec.cpus;

    // The busy time is read while the VM is idle (every few seconds): wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = super::pods::scrape_service(c, &format!("{RELEASE}-node-vmm"), 1)
            .await?
            .swap_remove(0);
        let busy = metric_sum(
            &t,
            "corescale_vm_vcpu_busy_seconds_total",
            &[format!("name=\"{VM}\"")],
        );
        if busy.is_some_and(|b| b > 0.0) || Instant::now() >= deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let text = &text;
    let of_vm = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![format!("namespace=\"{VM_NS}\""), format!("name=\"{VM}\"")];
        v.extend(extra.iter().map(|s| (*s).to_string()));
        v
    };
    let gauge = |state: &str| {
        metric_sum(
            text,
            "corescale_vm_vcpus",
            &of_vm(&[&format!("state=\"{state}\"")]),
        )
    };
    for (state, want) in [("online", online), ("desired", desired), ("max", SLOTS)] {
        ensure!(
            gauge(state) == Some(f64::from(want)),
            "corescale_vm_vcpus{{state=\"{state}\"}} is {:?}, status/spec say {want}",
            gauge(state)
        );
    }
    ensure!(
        metric_sum(text, "corescale_vm_phase", &of_vm(&["phase=\"Running\""])) == Some(1.0),
        "corescale_vm_phase{{phase=\"Running\"}} is not 1"
    );
    // Scenario scale plugged 1 -> 3 and 1 -> 2 and unplugged 3 -> 1: at least 3 plugs and
    // 2 unplugs succeeded, none failed.
    let ops = |dir: &str, result: &str| {
        metric_sum(
            text,
            "corescale_vcpu_hotplug_operations_total",
            &of_vm(&[
                &format!("direction=\"{dir}\""),
                &format!("result=\"{result}\""),
            ]),
        )
        .unwrap_or(0.0)
    };
    let (plugs, unplugs) = (ops("plug", "success"), ops("unplug", "success"));
    ensure!(
        plugs >= 3.0 && unplugs >= 2.0,
        "hot-plug operations: {plugs} plugs, {unplugs} unplugs succeeded; expected >= 3 and >= 2"
    );
    let failed = ops("plug", "failure") + ops("unplug", "failure");
    ensure!(failed == 0.0, "{failed} hot-plug operations failed");
    let timed = metric_sum(
        text,
        "corescale_vcpu_hotplug_duration_seconds_count",
        &of_vm(&["direction=\"plug\"", "phase=\"total\""]),
    )
    .unwrap_or(0.0);
    ensure!(
        timed >= 3.0,
        "plug latency histogram counts {timed} plugs, expected >= 3"
    );
    // CPU time of the vCPU threads, which run in the launcher container: the agent must
    // see them (the busy-cores series autoscaling runs on).
    let busy = metric_sum(text, "corescale_vm_vcpu_busy_seconds_total", &of_vm(&[]));
    ensure!(
        busy.is_some_and(|b| b > 0.0),
        "corescale_vm_vcpu_busy_seconds_total is {busy:?} after 30 s: the agent cannot read the vCPU threads' CPU time"
    );
    let slot0 = metric_sum(
        text,
        "corescale_vcpu_cpu_seconds_total",
        &of_vm(&["vcpu=\"0\""]),
    );
    ensure!(
        slot0.is_some_and(|b| b > 0.0),
        "corescale_vcpu_cpu_seconds_total{{vcpu=\"0\"}} is {slot0:?}"
    );
    ensure!(
        metric_sum(
            text,
            "corescale_build_info",
            &["component=\"node-vmm\"".into()]
        ) == Some(1.0),
        "no corescale_build_info{{component=\"node-vmm\"}} 1"
    );

    // The operator recounts VMs by phase every 5 s: wait for the Running VM to show.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = super::pods::scrape_service(c, &format!("{RELEASE}-operator"), 1)
            .await?
            .swap_remove(0);
        let running = metric_sum(&t, "corescale_operator_vms", &["phase=\"Running\"".into()]);
        if running.is_some_and(|r| r >= 1.0) || Instant::now() >= deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let text = &text;
    ensure!(
        plain(text, "corescale_operator_leader") == Some(1.0),
        "the operator pod does not lead: corescale_operator_leader {:?}",
        plain(text, "corescale_operator_leader")
    );
    let running = metric_sum(
        text,
        "corescale_operator_vms",
        &["phase=\"Running\"".into()],
    );
    ensure!(
        running.is_some_and(|r| r >= 1.0),
        "corescale_operator_vms{{phase=\"Running\"}} is {running:?} after 30 s"
    );
    Ok(format!(
        "node-vmm pod: online {online}, desired {desired}, max {SLOTS}, {plugs} plugs + {unplugs} unplugs, {:.2} busy vCPU s; operator pod leads, {} VM Running",
        busy.unwrap_or(0.0),
        running.unwrap_or(0.0)
    ))
}

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn plain_reads_unlabelled_samples_only() {
        let text = "# HELP corescale_operator_leader x\ncorescale_operator_leader_other 3\ncorescale_operator_leader 1\n";
        assert_eq!(plain(text, "corescale_operator_leader"), Some(1.0));
        assert_eq!(plain(text, "corescale_missing"), None);
    }
}
