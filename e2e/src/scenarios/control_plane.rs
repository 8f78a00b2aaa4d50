//! Fault scenarios `api-outage`, `apiserver-restart` and `etcd-pause`: the control plane
//! frozen or restarted mid-resize; the guest is left alone and everything reconnects.

use super::support::{agent_metrics, metric_sum, signal};
use super::{Faults, CONVERGE, NS};
use crate::{condition, node_of, Stack};
use anyhow::{ensure, Context as _, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The API server is frozen (SIGSTOP) right after a write: the agent carries out the
/// resize it saw, cannot report it, and reports it once the API server is back; the guest
/// is never restarted, and a later write still gets through.
pub(super) async fn api_outage(s: &Stack, f: &mut Faults) -> Result<String> {
    let node = s.boot_one(NS, "outage", 8).await?;
    let qemu = s.qemu(&node, NS, "outage").context("no QEMU")?;
    let pid: i32 = s.var("CORESCALE_APISERVER_PID")?.parse()?;
    s.scale(NS, "outage", 3).await?;
    signal(pid, "STOP")?;
    f.inject();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let alive = s.qemu(&node, NS, "outage") == Some(qemu);
    signal(pid, "CONT")?;
    let thawed = Instant::now();
    ensure!(alive, "the guest did not survive the API server outage");
    let vm = s.wait_online(NS, "outage", 3, CONVERGE).await?;
    let after = thawed.elapsed().as_secs_f64();
    f.recovered(after);
    ensure!(
        node_of(&vm).as_deref() == Some(node.as_str()),
        "moved during the outage"
    );
    s.scale(NS, "outage", 2).await?;
    s.wait_online(NS, "outage", 2, CONVERGE).await?;
    ensure!(
        s.qemu(&node, NS, "outage") == Some(qemu),
        "the guest was restarted"
    );
    s.delete(NS, "outage").await?;
    Ok(format!(
        "6 s outage; status at 3 vCPUs {after:.1} s after the API server came back; same QEMU"
    ))
}

/// kube-apiserver is stopped (SIGTERM; SIGKILL after 10 s) while a VM plugs vCPUs, and
/// started again with the same flags; a new spec.cpus is written as soon as it answers.
pub(super) async fn apiserver_restart(s: &Stack, f: &mut Faults) -> Result<String> {
    let before = control_plane_fault_begin(s, "restart").await?;
    let marks = agent_log_marks(s);
    f.inject();
    let down = Instant::now();
    let sampler = Sampler::start(s, &before.node, "restart")?;
    let stack = (s.repo.clone(), s.dir.clone());
    tokio::task::spawn_blocking(move || stack_sh(&stack.0, &stack.1, &["apiserver", "restart"]))
        .await??;
    let back = Instant::now();
    let outage = down.elapsed().as_secs_f64();
    let recover = control_plane_fault_end(s, "restart", &before, sampler, back).await?;
    f.recovered(recover);
    // The agents' watches broke and came back with backoff: a few errors each, not a
    // hot loop (one error per attempt; 0.8 s doubling up to 30 s).
    let errors = agent_watch_errors(s, &marks)?;
    for (node, n) in &errors {
        ensure!(
            (1..=20).contains(n),
            "{node}'s agent logged {n} watch errors over a {outage:.0} s outage (want 1..=20: it noticed, and backed off)"
        );
    }
    let probe = watches_work(s, "after-restart").await?;
    Ok(format!(
        "API server away {outage:.1} s; status at the last write (3) {recover:.1} s after it was back; same QEMU pid {}; watch errors {errors:?}; {probe}",
        before.qemu.0
    ))
}

/// etcd is frozen (SIGSTOP) for 20 s while a VM plugs vCPUs — longer than the clients'
/// patience for a request — then thawed; a new spec.cpus is written right after.
pub(super) async fn etcd_pause(s: &Stack, f: &mut Faults) -> Result<String> {
    const FROZEN: Duration = Duration::from_secs(20);
    let before = control_plane_fault_begin(s, "frozen").await?;
    let sampler = Sampler::start(s, &before.node, "frozen")?;
    s.stack(&["etcd", "pause"])?;
    f.inject();
    let thaw = async {
        tokio::time::sleep(FROZEN).await;
        s.stack(&["etcd", "resume"])
    };
    // Whatever happens meanwhile, etcd is thawed.
    let api = s.vms(NS);
    let (stuck, thawed) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), api.get("frozen")),
        thaw
    );
    thawed?;
    let back = Instant::now();
    ensure!(
        !matches!(stuck, Ok(Ok(_))),
        "a read of the VM went through while etcd was frozen: the fault was not injected"
    );
    let recover = control_plane_fault_end(s, "frozen", &before, sampler, back).await?;
    f.recovered(recover);
    let probe = watches_work(s, "after-pause").await?;
    Ok(format!(
        "etcd frozen {} s; status at the last write (3) {recover:.1} s after the thaw; same QEMU pid {}; {probe}",
        FROZEN.as_secs(),
        before.qemu.0
    ))
}

/// What a control-plane fault scenario knows before the fault.
struct Before {
    node: String,
    qemu: (i32, u64),
    failures: f64,
}

/// Boot `name` at 2 vCPUs, then ask for 4 and return once the agent is mid-plug.
async fn control_plane_fault_begin(s: &Stack, name: &str) -> Result<Before> {
    let node = s.boot_one(NS, name, 8).await?;
    s.scale(NS, name, 2).await?;
    s.wait_online(NS, name, 2, CONVERGE).await?;
    let qemu = s.qemu(&node, NS, name).context("no QEMU")?;
    let failures = hotplug_failures(s, &node, name).await?;
    s.scale(NS, name, 4).await?;
    s.wait_plugging(NS, name).await;
    Ok(Before {
        node,
        qemu,
        failures,
    })
}

/// After the control plane is `back`: write spec.cpus 3 at once (retrying while the API
/// server settles), wait until the status shows it, and check that the guest was left
/// alone. Returns the seconds from `back` to the converged status.
async fn control_plane_fault_end(
    s: &Stack,
    name: &str,
    before: &Before,
    sampler: Sampler,
    back: Instant,
) -> Result<f64> {
    let mut tries = 0;
    while let Err(e) = s.scale(NS, name, 3).await {
        tries += 1;
        ensure!(
            back.elapsed() < CONVERGE,
            "writing spec.cpus 3 after the fault: {e:#} ({tries} tries)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let vm = s.wait_online(NS, name, 3, CONVERGE).await?;
    let recover = back.elapsed().as_secs_f64();
    let samples = sampler.stop().await?;
    // The plan was 2 -> 4, then 3: the guest never had fewer than 2 or more than 4 online.
    ensure!(
        samples.len() >= 10,
        "only {} samples of the agent's online gauge during the fault",
        samples.len()
    );
    let (lo, hi) = samples
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    ensure!(
        lo >= 2.0 && hi <= 4.0,
        "the guest's online vCPUs left the plan's range 2..=4 during the fault: {lo}..={hi} (samples, 200 ms apart: {})",
        run_lengths(&samples)
    );
    ensure!(
        node_of(&vm).as_deref() == Some(before.node.as_str()),
        "moved from {} during the fault",
        before.node
    );
    ensure!(
        s.qemu(&before.node, NS, name) == Some(before.qemu),
        "the guest was restarted (QEMU pid/start changed)"
    );
    let procs = s.qemu_processes(NS, name);
    ensure!(
        procs == vec![before.qemu.0],
        "QEMU processes for the VM: {procs:?}"
    );
    let st = vm.status.as_ref().context("no status")?;
    let lr = st.last_resize.as_ref().context("no lastResize")?;
    ensure!(
        lr.to == 3 && lr.result == corescale_api::ResizeResult::Succeeded,
        "lastResize {lr:?}"
    );
    ensure!(
        condition(&vm, "ResizeInProgress").is_none_or(|c| c.status == "False"),
        "ResizeInProgress: {:?}",
        condition(&vm, "ResizeInProgress")
    );
    let failures = hotplug_failures(s, &before.node, name).await?;
    ensure!(
        failures == before.failures,
        "failed hot-plug operations went from {} to {failures}",
        before.failures
    );
    // This VM's Events only (by UID: an earlier run may have used the name).
    let uid = vm.metadata.uid.clone().context("no uid")?;
    let (ok, out, err) = s.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        NS,
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
        "--field-selector",
        &format!("regarding.uid={uid}"),
    ])?;
    ensure!(ok, "listing events: {err}");
    let ev: Vec<&str> = out.lines().collect();
    let started = ev
        .iter()
        .filter(|r| ["Started", "VmmRestarted", "Rescheduled", "FailedScheduling"].contains(r))
        .count();
    ensure!(
        started == 1,
        "the guest was started, moved or unschedulable {started} times: {ev:?}"
    );
    for (what, url) in [
        ("operator", s.var("CORESCALE_OPERATOR_METRICS")?),
        ("node-a agent", s.var("CORESCALE_NODE_A_METRICS")?),
        ("node-b agent", s.var("CORESCALE_NODE_B_METRICS")?),
    ] {
        crate::http_get(&format!("{url}/readyz"))
            .await
            .with_context(|| format!("the {what} is not ready after the fault"))?;
    }
    s.delete(NS, name).await?;
    Ok(recover)
}

/// The operator and both agents act on new objects again: a Halted VM pinned to each node
/// is placed by the operator and reported Halted by that node's agent.
async fn watches_work(s: &Stack, tag: &str) -> Result<String> {
    let t0 = Instant::now();
    let names: Vec<String> = ["node-a", "node-b"]
        .iter()
        .map(|n| format!("probe-{tag}-{n}"))
        .collect();
    for (name, node) in names.iter().zip(["node-a", "node-b"]) {
        let yaml = format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
             spec: {{cpus: 1, runStrategy: Halted, nodeName: {node}, topology: {{sockets: 1, cores: 1, threads: 1}}}}\n"
        );
        s.create(NS, &yaml).await?;
    }
    for (name, node) in names.iter().zip(["node-a", "node-b"]) {
        s.wait_vm(
            NS,
            name,
            &format!("placed on {node} and reported Halted by its agent"),
            CONVERGE,
            |v| {
                node_of(v).as_deref() == Some(node)
                    && condition(v, "Running").is_some_and(|c| c.reason == "Halted")
            },
        )
        .await?;
    }
    let took = t0.elapsed().as_secs_f64();
    for name in &names {
        s.delete(NS, name).await?;
    }
    for name in &names {
        s.wait_gone(NS, name, CONVERGE).await?;
    }
    Ok(format!(
        "new VMs placed and reported by both agents in {took:.1} s"
    ))
}

/// Samples the VM's online-vCPU gauge from its node agent's /metrics every 200 ms (the
/// agent's own view of the guest, available while the API server is not).
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl Sampler {
    fn start(s: &Stack, node: &str, name: &str) -> Result<Self> {
        let url = format!("{}/metrics", agent_metrics(s, node)?);
        let pairs = [
            "namespace=\"demo\"".to_string(),
            format!("name=\"{name}\""),
            "state=\"online\"".to_string(),
        ];
        let (stop, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                if let Ok(text) = crate::http_get(&url).await {
                    if let Some(v) = metric_sum(&text, "corescale_vm_vcpus", &pairs) {
                        out.push(v);
                    }
                }
                tokio::select! {
                    _ = &mut rx => return out,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(Sampler { stop, task })
    }

    async fn stop(self) -> Result<Vec<f64>> {
        let _ = self.stop.send(());
        Ok(self.task.await?)
    }
}

/// "2x5 4x12 3x3": each value with how many samples in a row had it.
fn run_lengths(samples: &[f64]) -> String {
    let mut out: Vec<(f64, usize)> = Vec::new();
    for &x in samples {
        match out.last_mut() {
            Some((v, n)) if *v == x => *n += 1,
            _ => out.push((x, 1)),
        }
    }
    out.iter()
        .map(|(v, n)| format!("{v}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Failed hot-plug operations of a VM, from its node agent's /metrics.
async fn hotplug_failures(s: &Stack, node: &str, name: &str) -> Result<f64> {
    let text = crate::http_get(&format!("{}/metrics", agent_metrics(s, node)?)).await?;
    Ok(metric_sum(
        &text,
        "corescale_vcpu_hotplug_operations_total",
        &[
            "namespace=\"demo\"".into(),
            format!("name=\"{name}\""),
            "result=\"failure\"".into(),
        ],
    )
    .unwrap_or(0.0))
}

fn agent_log(s: &Stack, node: &str) -> PathBuf {
    s.dir.join("nodes").join(node).join("agent.log")
}

/// How long each agent's log is now.
fn agent_log_marks(s: &Stack) -> Vec<(String, u64)> {
    ["node-a", "node-b"]
        .iter()
        .map(|n| {
            let len = std::fs::metadata(agent_log(s, n))
                .map(|m| m.len())
                .unwrap_or(0);
            (n.to_string(), len)
        })
        .collect()
}

/// "watch error" lines each agent logged since `marks`.
fn agent_watch_errors(s: &Stack, marks: &[(String, u64)]) -> Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for (node, from) in marks {
        let text = std::fs::read(agent_log(s, node))?;
        let from = usize::try_from(*from)?.min(text.len());
        let n = String::from_utf8_lossy(&text[from..])
            .lines()
            .filter(|l| l.contains("watch error"))
            .count();
        out.push((node.clone(), n));
    }
    Ok(out)
}

fn stack_sh(repo: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> Result<()> {
    let st = std::process::Command::new("bash")
        .arg(repo.join("e2e/stack.sh"))
        .args(args)
        .env("CORESCALE_STACK_DIR", dir)
        .status()?;
    ensure!(st.success(), "e2e/stack.sh {} failed", args.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lengths_counts_repeats() {
        assert_eq!(run_lengths(&[2.0, 2.0, 4.0, 3.0, 3.0, 3.0]), "2x2 4x1 3x3");
        assert_eq!(run_lengths(&[]), "");
    }
}
