//! e2e scenario `autoscale`: a real autoscaler drives `spec.cpus` from the guest's load.
//! Busy loops start in a TCG guest (typed into its console shell), the node agent exports
//! the guest's busy vCPU seconds, Prometheus records the busy cores per VM (the chart's
//! recording rule), KEDA serves them as an external metric, the kube-controller-manager's
//! HPA writes `spec.cpus` through /scale, and the agent plugs or unplugs vCPUs. The guest's
//! own /proc/stat shows the new vCPUs doing the work.

pub mod plot;

use crate::console::{busy_jiffies, Console};
use crate::{node_of, online, prom_value, Stack};
use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::VcpuState;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Busy cores per vCPU the ScaledObject aims at (AverageValue).
pub const TARGET: f64 = 0.6;
/// The HPA controller's sync period in the e2e control plane (e2e/cluster/up.sh).
pub const HPA_SYNC_SECONDS: u64 = 15;
/// The ScaledObject's scale-down stabilization window.
pub const STABILIZATION_SECONDS: u64 = 30;
/// The recording rule's rate window (charts/corescale/files/recording-rules.yaml).
pub const RATE_WINDOW_SECONDS: u64 = 60;
const NAME: &str = "auto";
const SLOTS: u32 = 4;

/// One observation of the loop.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the scenario's VM ran.
    pub t: f64,
    /// Busy cores (the recorded series), NaN before it exists.
    pub busy: f64,
    /// `spec.cpus`.
    pub desired: u32,
    /// vCPUs the guest has online (status).
    pub online: u32,
    /// Busy loops running in the guest.
    pub loops: u32,
}

/// The loop under observation: samples busy cores, `spec.cpus` and online vCPUs.
pub struct Run<'a> {
    s: &'a Stack,
    ns: &'a str,
    t0: Instant,
    /// Busy loops running now (recorded with each sample).
    pub loops: u32,
    query: String,
    /// Every sample so far.
    pub samples: Vec<Sample>,
}

impl Run<'_> {
    /// Take one sample.
    pub async fn sample(&mut self) -> Result<Sample> {
        let vm = self.s.vms(self.ns).get(NAME).await?;
        let busy = self
            .s
            .prom(&self.query)
            .await
            .ok()
            .and_then(|r| r.first().map(prom_value))
            .unwrap_or(f64::NAN);
        let x = Sample {
            t: self.t0.elapsed().as_secs_f64(),
            busy,
            desired: vm.spec.cpus,
            online: online(&vm),
            loops: self.loops,
        };
        self.samples.push(x);
        Ok(x)
    }

    /// Sample every second until `done` holds; returns the seconds it took.
    pub async fn until(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&Sample) -> bool,
    ) -> Result<f64> {
        let start = Instant::now();
        loop {
            let x = self.sample().await?;
            if done(&x) {
                return Ok(start.elapsed().as_secs_f64());
            }
            if start.elapsed() > within {
                bail!(
                    "{what}: not reached within {} s (last: busy {:.2} cores, spec.cpus {}, online {}); {}",
                    within.as_secs(),
                    x.busy,
                    x.desired,
                    x.online,
                    self.hpa_state()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The HPA's conditions, for failure messages.
    fn hpa_state(&self) -> String {
        match self.s.kubectl(&[
            "get",
            "hpa",
            "-n",
            self.ns,
            &format!("keda-hpa-{NAME}"),
            "-o",
            "jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}; {end}",
        ]) {
            Ok((true, out, _)) => format!("HPA: {out}"),
            Ok((false, _, err)) => format!("HPA unreadable: {}", err.trim()),
            Err(e) => format!("HPA unreadable: {e}"),
        }
    }
}

/// The VM and ScaledObject of `examples/autoscale-keda.yaml` (what README tells users to
/// apply), pointed at this stack's Prometheus and namespace. Fails when the example no
/// longer holds the numbers this scenario checks.
fn example(s: &Stack, ns: &str) -> Result<(String, String)> {
    let path = s.repo.join("examples/autoscale-keda.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for want in [
        format!("name: {NAME}\n"),
        format!("threshold: \"{TARGET}\""),
        format!("stabilizationWindowSeconds: {STABILIZATION_SECONDS}\n"),
        format!("maxReplicaCount: {SLOTS}"),
        "minReplicaCount: 1".to_string(),
        format!("cores: {SLOTS}"),
        "namespace=\"demo\"".to_string(),
    ] {
        ensure!(
            text.contains(&want),
            "{} no longer holds `{}`",
            path.display(),
            want.trim()
        );
    }
    let text = text.replace("namespace=\"demo\"", &format!("namespace=\"{ns}\""));
    let text = text
        .lines()
        .map(|l| match l.split_once("serverAddress: ") {
            Some((indent, _)) => format!(
                "{indent}serverAddress: {}",
                s.var("CORESCALE_PROMETHEUS").unwrap_or("")
            ),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (vm, so) = text
        .split_once("\n---\n")
        .context("the example holds a VM and a ScaledObject, separated by ---")?;
    Ok((vm.to_string(), so.to_string()))
}

/// Start a busy loop in the guest's console shell; returns its pid.
pub async fn start_loop(c: &mut Console) -> Result<u32> {
    let out = c
        .run(
            "(while :; do :; done) & echo LOOP=$!",
            Duration::from_secs(20),
        )
        .await?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("LOOP="))
        .and_then(|p| p.trim().parse::<u32>().ok())
        .with_context(|| format!("no LOOP=pid in {out:?}"))
}

/// Busy jiffies per CPU between two /proc/stat readings.
fn worked(before: &str, after: &str) -> Vec<(u32, u64)> {
    let b = busy_jiffies(before);
    busy_jiffies(after)
        .into_iter()
        .map(|(cpu, a)| {
            let was = b.iter().find(|(c, _)| *c == cpu).map_or(0, |(_, v)| *v);
            (cpu, a.saturating_sub(was))
        })
        .collect()
}

/// Where a node keeps its VMs' state directories (their console sockets): the stack's
/// per-node directory for host-process agents, the node's hostPath for the chart's pods.
pub type StateDirOf<'a> = &'a dyn Fn(&str) -> PathBuf;

/// The host-process stack's state directory of `node` (e2e/stack.sh).
pub fn stack_state_dir(s: &Stack, node: &str) -> PathBuf {
    s.dir.join("nodes").join(node).join("vms")
}

/// Create the example's VM and ScaledObject in `ns`, attach to the guest's console (in
/// `state_dir` of the VM's node) and wait until KEDA's HPA reads the metric. Returns the
/// loop, the console and the seconds the HPA took to become active.
pub async fn setup<'a>(
    s: &'a Stack,
    ns: &'a str,
    state_dir: StateDirOf<'_>,
) -> Result<(Run<'a>, Console, f64)> {
    let (vm_yaml, so) = example(s, ns)?;
    s.create(ns, &vm_yaml).await?;
    let vm = s.wait_online(ns, NAME, 1, Duration::from_secs(120)).await?;
    let node = node_of(&vm).context("no node")?;
    let sock = state_dir(&node).join(ns).join(NAME).join("console.sock");
    let mut console = Console::attach(&sock, Duration::from_secs(10)).await?;
    let hello = console.run("uname -r", Duration::from_secs(20)).await?;
    ensure!(
        !hello.trim().is_empty(),
        "the console shell printed nothing for uname -r"
    );

    let query = format!(
        r#"sum(namespace_name:corescale_vm_vcpu_busy_seconds:rate1m{{namespace="{ns}",name="{NAME}"}})"#
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&so))?;
    ensure!(ok, "applying the ScaledObject: {err}");
    let mut run = Run {
        s,
        ns,
        t0: Instant::now(),
        loops: 0,
        query,
        samples: Vec::new(),
    };
    // KEDA made its HPA and the HPA reads the external metric through the aggregation layer.
    let t_ready = Instant::now();
    loop {
        let (_, out, _) = s.kubectl(&[
            "get",
            "hpa",
            "-n",
            ns,
            &format!("keda-hpa-{NAME}"),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"ScalingActive\")].status}",
        ])?;
        if out.trim() == "True" {
            break;
        }
        if t_ready.elapsed() > Duration::from_secs(180) {
            bail!(
                "KEDA's HPA is not ScalingActive after 180 s; {}",
                run.hpa_state()
            );
        }
        run.sample().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let hpa_ready = t_ready.elapsed().as_secs_f64();
    Ok((run, console, hpa_ready))
}

/// Delete the ScaledObject and the VM.
pub async fn teardown(s: &Stack, ns: &str) -> Result<()> {
    let (ok, _, err) = s.kubectl(&["delete", "scaledobject", "-n", ns, NAME])?;
    ensure!(ok, "deleting the ScaledObject: {err}");
    s.delete(ns, NAME).await?;
    s.wait_gone(ns, NAME, Duration::from_secs(60)).await
}

/// Run the scenario in namespace `ns`, the VMs' state in `state_dir` of their node;
/// returns the summary line.
pub async fn autoscale(s: &Stack, ns: &str, state_dir: StateDirOf<'_>) -> Result<String> {
    let (mut run, mut console, hpa_ready) = setup(s, ns, state_dir).await?;

    // One busy loop: about one core busy, ceil(1.0 / 0.6) = 2 vCPUs, and not more.
    let mut pids = Vec::new();
    pids.push(start_loop(&mut console).await?);
    run.loops = 1;
    let up1_written = run
        .until("1 loop: spec.cpus 2", Duration::from_secs(240), |x| {
            x.desired >= 2
        })
        .await?;
    let up1_online = up1_written
        + run
            .until("1 loop: 2 online", Duration::from_secs(60), |x| {
                x.online == 2
            })
            .await?;
    // Hold until the rate window has seen only the loaded guest, then a bit more.
    let hold = Duration::from_secs(RATE_WINDOW_SECONDS + 30)
        .saturating_sub(Duration::from_secs_f64(up1_online));
    run.until("1 loop: holding", hold + Duration::from_secs(5), |_| false)
        .await
        .ok();
    let max1 = run
        .samples
        .iter()
        .filter(|x| x.loops == 1)
        .map(|x| x.desired)
        .max()
        .unwrap_or(0);
    ensure!(
        max1 == 2,
        "one busy loop drove spec.cpus to {max1}, want 2 (ceil(~1 core / {TARGET}))"
    );

    // A second loop: ~2 cores busy (less when the 2-core host is contended): 3 or 4 vCPUs.
    let stat0 = console
        .run("cat /proc/stat", Duration::from_secs(20))
        .await?;
    pids.push(start_loop(&mut console).await?);
    run.loops = 2;
    let up2_written = run
        .until("2 loops: spec.cpus 3+", Duration::from_secs(300), |x| {
            x.desired >= 3
        })
        .await?;
    let up2_online = up2_written
        + run
            .until(
                "2 loops: online = spec.cpus",
                Duration::from_secs(90),
                |x| x.desired >= 3 && x.online == x.desired,
            )
            .await?;
    let hold = Duration::from_secs(RATE_WINDOW_SECONDS + 20)
        .saturating_sub(Duration::from_secs_f64(up2_online));
    run.until("2 loops: holding", hold + Duration::from_secs(5), |_| false)
        .await
        .ok();
    let stat1 = console
        .run("cat /proc/stat", Duration::from_secs(20))
        .await?;
    let two: Vec<Sample> = run
        .samples
        .iter()
        .copied()
        .filter(|x| x.loops == 2)
        .collect();
    let max2 = two.iter().map(|x| x.desired).max().unwrap_or(0);
    let busy2 = two
        .iter()
        .map(|x| x.busy)
        .filter(|b| b.is_finite())
        .fold(0.0, f64::max);
    ensure!(
        (3..=SLOTS).contains(&max2),
        "two busy loops drove spec.cpus to {max2}, want 3 or 4"
    );
    let maths = (busy2 / TARGET).ceil();
    ensure!(
        f64::from(max2) <= maths,
        "spec.cpus reached {max2} but the busiest reading was {busy2:.2} cores: ceil({busy2:.2} / {TARGET}) = {maths}"
    );
    // The guest's own counters: hot-plugged vCPUs (not only cpu0) did the loops' work.
    let work = worked(&stat0, &stat1);
    let total: u64 = work.iter().map(|(_, j)| j).sum();
    let new_cpus: u64 = work.iter().filter(|(c, _)| *c > 0).map(|(_, j)| j).sum();
    ensure!(
        work.len() >= 3 && new_cpus * 2 >= total && new_cpus > 0,
        "the guest's /proc/stat does not show the new vCPUs busy: {work:?} (busy jiffies per CPU)"
    );

    // Load gone: the stabilization window, then back to minCpus.
    let kill = format!(
        "kill {}",
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    console.run(&kill, Duration::from_secs(20)).await?;
    run.loops = 0;
    let down_written = run
        .until("no load: spec.cpus 1", Duration::from_secs(300), |x| {
            x.desired == 1
        })
        .await?;
    let down_online = down_written
        + run
            .until("no load: 1 online", Duration::from_secs(90), |x| {
                x.online == 1
            })
            .await?;
    let vm = s.vms(ns).get(NAME).await?;
    let st = vm.status.as_ref().context("no status")?;
    ensure!(
        !st.vcpus.iter().any(|v| v.state == VcpuState::Unplugging),
        "a vCPU is left Unplugging: {:?}",
        st.vcpus
    );
    let resized: Vec<String> = s
        .events(ns, NAME)?
        .into_iter()
        .filter(|(r, _)| r == "Resized")
        .map(|(_, n)| n)
        .collect();
    ensure!(
        resized.len() >= 3
            && resized
                .iter()
                .all(|n| n.contains("requested by kube-controller-manager through /scale")),
        "Resized Events must each name the HPA's writer (kube-controller-manager through /scale): {resized:?}"
    );

    let timings = serde_json::json!({
        "hpa_ready_seconds": hpa_ready,
        "up1_written_seconds": up1_written, "up1_online_seconds": up1_online,
        "up2_written_seconds": up2_written, "up2_online_seconds": up2_online, "up2_cpus": max2,
        "down_written_seconds": down_written, "down_online_seconds": down_online,
        "hpa_sync_seconds": HPA_SYNC_SECONDS, "rate_window_seconds": RATE_WINDOW_SECONDS,
        "stabilization_seconds": STABILIZATION_SECONDS,
        "samples": run.samples.iter().map(|x| serde_json::json!([x.t, x.busy, x.desired, x.online, x.loops])).collect::<Vec<_>>(),
    });
    std::fs::write(
        s.dir.join("autoscale.json"),
        serde_json::to_vec_pretty(&timings)?,
    )?;
    plot::plot(&s.dir.join("autoscale.png"), &run.samples)?;
    teardown(s, ns).await?;
    Ok(format!(
        "KEDA/HPA: load 1 loop -> 2 vCPUs written {up1_written:.0} s / online {up1_online:.0} s; \
         2 loops -> {max2} ({busy2:.2} busy cores) written {up2_written:.0} s / online {up2_online:.0} s; \
         load stopped -> 1 vCPU written {down_written:.0} s / online {down_online:.0} s \
         (floors: HPA sync {HPA_SYNC_SECONDS} s, rate window {RATE_WINDOW_SECONDS} s, scale-down stabilization {STABILIZATION_SECONDS} s); \
         new vCPUs did {}% of the guest's busy time; Resized by kube-controller-manager through /scale",
        new_cpus * 100 / total.max(1)
    ))
}
