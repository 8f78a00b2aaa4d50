//! The e2e scenarios, run against the stack that `e2e/stack.sh up` started. Each scenario
//! is an assertion; the run ends with a summary table and `N passed, M failed`. Fault
//! scenarios also report their figures (faults injected, recoveries, seconds to recover)
//! in a second table and in `$CORESCALE_STACK_DIR/e2e-faults.json`.
//!
//! Usage: corescale-e2e [--only NAME[,NAME]]   (CORESCALE_STACK_DIR selects the stack)

use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::{VcpuState, VirtualMachine};
use corescale_e2e::{condition, node_of, online, prom_value, Stack};
use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use rand::Rng;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NS: &str = "demo";
const BOOT: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);

type Scenario = (&'static str, &'static str);

/// (name, what it shows), in the order they run; later ones build on earlier ones.
const SCENARIOS: &[Scenario] = &[
    (
        "chart",
        "the rendered Helm chart validates on the API server (server-side dry run)",
    ),
    (
        "bad-manifests",
        "every bad manifest is refused by the API server with a message naming the field",
    ),
    (
        "apply",
        "the example VM is placed, boots, status.cpus == spec.cpus, Ready",
    ),
    (
        "scale",
        "kubectl scale 3, 1, 4 converges in the guest and in status; Events; columns",
    ),
    (
        "refused-patch",
        "a refused patch leaves the running guest untouched",
    ),
    (
        "core",
        "a Core-granularity VM (threads=2) scales by whole cores",
    ),
    (
        "metrics",
        "Prometheus has the documented series; histogram counts match the resizes done",
    ),
    (
        "infeasible-deferred",
        "Infeasible above the node budget; Deferred until room is freed",
    ),
    (
        "no-agent",
        "guests without an agent: Running, 1 -> 3 -> 1 Present; an agent 30 s late turns them Online",
    ),
    (
        "cycles",
        "one TCG guest scaled 1 <-> 4 twenty times: same QEMU, no more vCPU threads than slots",
    ),
    (
        "autoscale",
        "KEDA + the HPA drive spec.cpus from busy loops in the guest: 1 -> 2 -> 3|4 -> 1, Events name the HPA",
    ),
    (
        "agent-kill",
        "kill -9 the node agent mid-resize: guest keeps running, re-adopted, converges",
    ),
    (
        "storm",
        "200 random writes in 10 s converge to the last; nothing hangs or fails",
    ),
    (
        "api-outage",
        "the API server frozen mid-resize: the guest is untouched, status converges after",
    ),
    (
        "apiserver-restart",
        "kube-apiserver restarted mid-resize: guest untouched, all reconnect, the last write wins",
    ),
    (
        "etcd-pause",
        "etcd frozen 20 s mid-resize: guest untouched, all recover, the last write wins",
    ),
    (
        "qemu-kill",
        "QEMU killed mid-plug: noticed within 2 s, Event and condition, restarted at spec.cpus",
    ),
    (
        "delete-mid-resize",
        "a VM deleted while it resizes: the guest stops, nothing is left",
    ),
    (
        "reschedule",
        "an agent gone past its lease: its VMs come up on the other node",
    ),
    (
        "ppc64le",
        "POWER (pseries) VMs: threads=2 scaled 2 -> 4 -> 2 by whole cores, threads=1 1 -> 3 -> 2, deleted",
    ),
    (
        "delete",
        "deleting a VM stops its guest, removes the finalizer, leaves no QEMU",
    ),
];

/// Scenarios that inject faults; each reports [`Faults`].
const FAULT_SCENARIOS: &[&str] = &[
    "agent-kill",
    "api-outage",
    "apiserver-restart",
    "etcd-pause",
    "qemu-kill",
    "delete-mid-resize",
    "reschedule",
];

struct Outcome {
    name: &'static str,
    ok: bool,
    seconds: f64,
    detail: String,
    faults: Faults,
}

/// The figures of a fault scenario: what was done to the system and how it came back.
#[derive(Debug, Default, Clone)]
struct Faults {
    /// Faults injected (a process killed, stopped or frozen; a VM deleted mid-resize).
    injected: u32,
    /// Seconds from the end of each fault to the system's recovery, one per recovery.
    recoveries: Vec<f64>,
}

impl Faults {
    fn inject(&mut self) {
        self.injected += 1;
    }

    fn recovered(&mut self, seconds: f64) {
        self.recoveries.push(seconds);
    }

    fn worst(&self) -> Option<f64> {
        self.recoveries.iter().copied().reduce(f64::max)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_string).collect());
    let stack = Stack::from_env("stack").await?;
    stack.namespace(NS)?;
    let mut outcomes = Vec::new();
    for (name, what) in SCENARIOS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == name)) {
            continue;
        }
        println!("=== {name}: {what}");
        let t0 = Instant::now();
        let mut faults = Faults::default();
        let r = run(&stack, name, &mut faults).await;
        let seconds = t0.elapsed().as_secs_f64();
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "--- {} {name} ({seconds:.1} s): {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        outcomes.push(Outcome {
            name,
            ok,
            seconds,
            detail,
            faults,
        });
    }
    println!(
        "\n{:<22} {:<6} {:>8}  detail",
        "scenario", "result", "seconds"
    );
    for o in &outcomes {
        let d: String = o.detail.chars().take(90).collect();
        println!(
            "{:<22} {:<6} {:>8.1}  {d}",
            o.name,
            if o.ok { "PASS" } else { "FAIL" },
            o.seconds
        );
    }
    fault_summary(&stack, &outcomes)?;
    let passed = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - passed;
    println!("\ne2e: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Print the fault figures and write them to `e2e-faults.json` in the stack's directory
/// (next to its logs).
fn fault_summary(s: &Stack, outcomes: &[Outcome]) -> Result<()> {
    let faulty: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| FAULT_SCENARIOS.contains(&o.name))
        .collect();
    if faulty.is_empty() {
        return Ok(());
    }
    println!(
        "\n{:<22} {:<6} {:>8} {:>10}  seconds to recover",
        "fault scenario", "result", "injected", "recoveries"
    );
    let mut rows = Vec::new();
    for o in &faulty {
        let f = &o.faults;
        let secs: Vec<String> = f.recoveries.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "{:<22} {:<6} {:>8} {:>10}  {}",
            o.name,
            if o.ok { "PASS" } else { "FAIL" },
            f.injected,
            f.recoveries.len(),
            if secs.is_empty() {
                "-".to_string()
            } else {
                secs.join(", ")
            }
        );
        rows.push(serde_json::json!({
            "scenario": o.name,
            "passed": o.ok,
            "faults_injected": f.injected,
            "recoveries": f.recoveries.len(),
            "seconds_to_recover": f.recoveries,
            "max_seconds_to_recover": f.worst(),
            "scenario_seconds": o.seconds,
        }));
    }
    let injected: u32 = faulty.iter().map(|o| o.faults.injected).sum();
    let recovered: usize = faulty.iter().map(|o| o.faults.recoveries.len()).sum();
    println!("faults: {injected} injected, {recovered} recoveries");
    let doc = serde_json::json!({
        "generated": chrono::Utc::now().to_rfc3339(),
        "faults_injected": injected,
        "recoveries": recovered,
        "scenarios": rows,
    });
    let path = s.dir.join("e2e-faults.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("fault figures written to {}", path.display());
    Ok(())
}

async fn run(s: &Stack, name: &str, f: &mut Faults) -> Result<String> {
    match name {
        "chart" => chart(s),
        "bad-manifests" => bad_manifests(s).await,
        "apply" => apply(s).await,
        "scale" => scale(s).await,
        "refused-patch" => refused_patch(s).await,
        "core" => core(s).await,
        "metrics" => metrics(s).await,
        "infeasible-deferred" => infeasible_deferred(s).await,
        "no-agent" => corescale_e2e::no_agent::no_agent(s, NS).await,
        "cycles" => corescale_e2e::cycles::cycles(s, NS).await,
        "autoscale" => corescale_e2e::autoscale::autoscale(s, NS).await,
        "agent-kill" => agent_kill(s, f).await,
        "storm" => storm(s).await,
        "api-outage" => api_outage(s, f).await,
        "apiserver-restart" => apiserver_restart(s, f).await,
        "etcd-pause" => etcd_pause(s, f).await,
        "qemu-kill" => qemu_kill(s, f).await,
        "delete-mid-resize" => delete_mid_resize(s, f).await,
        "reschedule" => reschedule(s, f).await,
        "ppc64le" => ppc64le(s).await,
        "delete" => delete(s).await,
        other => bail!("unknown scenario {other}"),
    }
}

fn manifest(s: &Stack, rel: &str) -> Result<String> {
    let p = s.repo.join("e2e/manifests").join(rel);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

/// Issue 6: every object of the rendered chart validates on the real API server, with the
/// default values and with hostPath /dev/kvm and rolling updates. (The RBAC objects in it
/// are the ones the stack runs the operator and agents under.)
fn chart(s: &Stack) -> Result<String> {
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
    Ok(format!(
        "{objects} objects validated by the API server (2 value sets)"
    ))
}

fn expect_line(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string)
}

/// Scenario 4: The generated CRD on a real API server: every bad manifest refused, naming the field;
/// bad updates refused too; good ones accepted (server-side dry run, nothing created).
async fn bad_manifests(s: &Stack) -> Result<String> {
    let mut checked = 0;
    for sub in ["good", "bad", "bad-updates"] {
        let mut files: Vec<_> = std::fs::read_dir(s.repo.join("e2e/manifests").join(sub))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            let fname = f.display().to_string();
            match sub {
                "good" => {
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", NS, "--dry-run=server", "-f", "-"],
                        Some(&text),
                    )?;
                    ensure!(ok, "{fname} refused: {err}");
                }
                "bad" => {
                    let want =
                        expect_line(&text).with_context(|| format!("{fname}: no # expect line"))?;
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", NS, "--dry-run=server", "-f", "-"],
                        Some(&text),
                    )?;
                    ensure!(!ok, "{fname} was accepted");
                    ensure!(
                        err.contains(&want),
                        "{fname}: error does not say {want:?}: {err}"
                    );
                }
                _ => {
                    let want =
                        expect_line(&text).with_context(|| format!("{fname}: no # expect line"))?;
                    let docs: Vec<&str> = text.split("\n---\n").collect();
                    ensure!(docs.len() == 2, "{fname}: needs two documents");
                    let ns = "manifests-update";
                    s.namespace(ns)?;
                    // The original is created for real, Halted so that no guest boots for it;
                    // the update is a server-side dry run against it.
                    let halted = |d: &str| -> Result<String> {
                        let mut v: serde_yaml::Value = serde_yaml::from_str(d)?;
                        v["spec"]["runStrategy"] = "Halted".into();
                        Ok(serde_yaml::to_string(&v)?)
                    };
                    let (ok, _, err) =
                        s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&halted(docs[0])?))?;
                    ensure!(ok, "{fname}: original refused: {err}");
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", ns, "--dry-run=server", "-f", "-"],
                        Some(&halted(docs[1])?),
                    )?;
                    let name = serde_yaml::from_str::<serde_yaml::Value>(docs[0])?["metadata"]
                        ["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let _ = s.kubectl(&["delete", "cvm", "-n", ns, &name, "--wait=false"]);
                    ensure!(!ok, "{fname}: the update was accepted");
                    ensure!(
                        err.contains(&want),
                        "{fname}: error does not say {want:?}: {err}"
                    );
                }
            }
            checked += 1;
        }
    }
    // kubectl explain shows descriptions from the Rust doc comments.
    let (ok, out, err) = s.kubectl(&["explain", "cvm.spec.granularity"])?;
    ensure!(
        ok && out.contains("whole core"),
        "kubectl explain: {out}{err}"
    );
    Ok(format!(
        "{checked} manifests checked against kube-apiserver {}",
        s.var("CORESCALE_KUBE_VERSION").unwrap_or("?")
    ))
}

/// Scenario 1: Apply the example manifest.
async fn apply(s: &Stack) -> Result<String> {
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

fn resized_events(ev: &[(String, String)]) -> Vec<String> {
    ev.iter()
        .filter(|(r, _)| r == "Resized")
        .map(|(_, n)| n.clone())
        .collect()
}

/// Scenario 2: kubectl scale to 3, 1, 4.
async fn scale(s: &Stack) -> Result<String> {
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

/// Scenario 4b: A patch the API server refuses changes nothing in the guest.
async fn refused_patch(s: &Stack) -> Result<String> {
    let before = s.vms(NS).get("example").await?;
    let node = node_of(&before).context("no node")?;
    let qemu = s.qemu(&node, NS, "example").context("no QEMU")?;
    let (ok, _, err) = s.kubectl(&[
        "patch",
        "cvm",
        "-n",
        NS,
        "example",
        "--type=merge",
        "-p",
        r#"{"spec":{"cpus":9}}"#,
    ])?;
    ensure!(
        !ok && err.contains("spec.cpus must not exceed the VM's maximum"),
        "patch to 9: {err}"
    );
    let (ok, _, err) = s.kubectl(&[
        "patch",
        "cvm",
        "-n",
        NS,
        "example",
        "--type=merge",
        "-p",
        r#"{"spec":{"topology":{"sockets":1,"cores":16,"threads":1}}}"#,
    ])?;
    ensure!(
        !ok && err.contains("spec.topology is immutable"),
        "topology patch: {err}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = s.vms(NS).get("example").await?;
    ensure!(after.spec == before.spec, "spec changed");
    let vc = |v: &VirtualMachine| v.status.as_ref().map(|s| s.vcpus.clone());
    ensure!(vc(&after) == vc(&before), "vCPU states changed");
    ensure!(s.qemu(&node, NS, "example") == Some(qemu), "QEMU changed");
    Ok("cpus 9 and a topology change refused; spec, vCPUs and QEMU unchanged".into())
}

/// Scenario 3: Core granularity with threads=2: whole cores.
async fn core(s: &Stack) -> Result<String> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: smt}\n\
                spec: {cpus: 2, minCpus: 2, granularity: Core, topology: {sockets: 1, cores: 3, threads: 2}}\n";
    s.create(NS, yaml).await?;
    s.wait_online(NS, "smt", 2, BOOT).await?;
    for n in [4u32, 2, 4] {
        s.scale(NS, "smt", n).await?;
        let vm = s.wait_online(NS, "smt", n, CONVERGE).await?;
        no_split_core(&vm)?;
    }
    // A target that is not whole cores is refused at admission.
    let (ok, _, err) = s.kubectl(&["scale", "-n", NS, "cvm/smt", "--replicas=3"])?;
    ensure!(
        !ok && err.contains("multiples of spec.topology.threads"),
        "scale to 3: {err}"
    );
    Ok("2 -> 4 -> 2 -> 4 vCPUs, both threads of a core each time; 3 refused".into())
}

/// Every core's threads are in one state in status: Core granularity never splits a core.
/// status.vcpus lists only slots that are not Absent, so a core listed at all must have all
/// its threads listed.
fn no_split_core(vm: &VirtualMachine) -> Result<()> {
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

/// Scenario 10: Prometheus: the documented series exist for each VM, and the latency histogram's
/// counts match the operations done on the smt VM (4 plugs, 2 unplugs of one thread each).
async fn metrics(s: &Stack) -> Result<String> {
    let sel = r#"namespace="demo",name="smt""#;
    let want = [("plug", 4.0), ("unplug", 2.0)];
    for (dir, n) in want {
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_duration_seconds_count{{{sel},direction="{dir}",phase="total"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == n
        })
        .await?;
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_operations_total{{{sel},direction="{dir}",result="success"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == n
        })
        .await?;
    }
    let series = [
        "corescale_vm_vcpus{state=\"desired\"}",
        "corescale_vm_vcpus{state=\"online\"}",
        "corescale_vm_vcpus{state=\"present\"}",
        "corescale_vm_vcpus{state=\"plugging\"}",
        "corescale_vm_vcpus{state=\"unplugging\"}",
        "corescale_vm_vcpus{state=\"max\"}",
        "corescale_vcpu_hotplug_duration_seconds_bucket",
        "corescale_vcpu_hotplug_operations_total",
        "corescale_vcpu_cpu_seconds_total",
        "corescale_vm_phase",
        "corescale_resize_pending",
        "corescale_build_info",
        "corescale_operator_reconcile_duration_seconds_count",
        "corescale_operator_vms",
    ];
    for q in series {
        let per_vm = q.starts_with("corescale_vm")
            || q.starts_with("corescale_vcpu")
            || q.starts_with("corescale_resize");
        for vm in ["example", "smt"] {
            let q = if per_vm {
                let (m, rest) = q
                    .split_once('{')
                    .map(|(m, r)| (m, format!(",{r}")))
                    .unwrap_or((q, "}".into()));
                format!("{m}{{namespace=\"demo\",name=\"{vm}\"{rest}")
            } else {
                q.to_string()
            };
            s.wait_prom(&q, Duration::from_secs(20), |r| !r.is_empty())
                .await?;
        }
    }
    let r = s
        .prom(r#"corescale_vm_vcpus{namespace="demo",name="example",state="online"}"#)
        .await?;
    ensure!(
        r.len() == 1 && prom_value(&r[0]) == 4.0,
        "online gauge of example: {r:?}"
    );
    let r = s
        .prom(
            r#"sum(rate(corescale_vcpu_cpu_seconds_total{namespace="demo",name="example"}[30s]))"#,
        )
        .await?;
    ensure!(
        r.len() == 1 && prom_value(&r[0]) > 0.0,
        "vCPU CPU time of example does not move: {r:?}"
    );
    let r = s.prom("histogram_quantile(0.5, sum by (le) (rate(corescale_vcpu_hotplug_duration_seconds_bucket{phase=\"total\",direction=\"plug\"}[5m])))").await?;
    let median = r.first().map(prom_value).unwrap_or(f64::NAN);
    dashboard_queries(s).await?;
    Ok(format!("histogram counts 4 plugs / 2 unplugs as done; {} series present; plug median {median:.3} s", series.len()))
}

/// Every query of the chart's Grafana dashboard returns series now.
async fn dashboard_queries(s: &Stack) -> Result<()> {
    let path = s.repo.join("charts/corescale/files");
    let rd = std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut n = 0;
    for f in rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
    {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        let mut exprs = Vec::new();
        collect_exprs(&v, &mut exprs);
        for e in exprs {
            let q = e
                .replace("$namespace", "demo")
                .replace("$vm", "example")
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "30s");
            s.wait_prom(&q, Duration::from_secs(20), |r| !r.is_empty())
                .await
                .with_context(|| format!("dashboard {} query {e}", f.display()))?;
            n += 1;
        }
    }
    ensure!(n > 0, "the dashboards hold no queries");
    Ok(())
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                out.push(e.to_string());
            }
            for x in m.values() {
                collect_exprs(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// Scenario 5: Infeasible (above the node's whole budget) and Deferred (budget full, then freed).
/// The smt VM leaves first so node budgets are easy to reason about; both VMs are pinned
/// to node-b, whose budget is 2 host CPUs x 4 = 8 vCPUs.
async fn infeasible_deferred(s: &Stack) -> Result<String> {
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
                corescale_e2e::id(&vm)
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

/// Scenario 7: kill -9 the agent during a resize; the guest keeps running; the restarted agent
/// re-adopts it and converges without restarting it.
async fn agent_kill(s: &Stack, f: &mut Faults) -> Result<String> {
    s.scale(NS, "example", 2).await?;
    let vm = s.wait_online(NS, "example", 2, CONVERGE).await?;
    let node = node_of(&vm).context("no node")?;
    let qemu = s.qemu(&node, NS, "example").context("no QEMU")?;
    s.scale(NS, "example", 4).await?;
    // Mid-resize: as soon as the agent reports a slot Plugging (or right away).
    s.wait_plugging(NS, "example").await;
    s.stack(&["agent", "kill", &node])?;
    f.inject();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        s.qemu(&node, NS, "example") == Some(qemu),
        "the guest died with its agent"
    );
    let back = Instant::now();
    s.stack(&["agent", "start", &node])?;
    let vm = s.wait_online(NS, "example", 4, CONVERGE).await?;
    let recover = back.elapsed().as_secs_f64();
    ensure!(node_of(&vm).as_deref() == Some(node.as_str()), "moved");
    ensure!(
        s.qemu(&node, NS, "example") == Some(qemu),
        "the guest was restarted (QEMU pid/start changed)"
    );
    let ev = s.events(NS, "example")?;
    let started = ev
        .iter()
        .filter(|(r, _)| r == "Started" || r == "VmmRestarted")
        .count();
    ensure!(started == 1, "guest started {started} times: {ev:?}");
    f.recovered(recover);
    Ok(format!(
        "QEMU pid {} survived; converged to 4 {recover:.1} s after the agent restarted",
        qemu.0
    ))
}

/// Scenario 9: An autoscaler storm: 200 writes of random targets within 10 s.
async fn storm(s: &Stack) -> Result<String> {
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
    let text = corescale_e2e::http_get(&format!("{}/metrics", s.var(var)?)).await?;
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

/// The API server is frozen (SIGSTOP) right after a write: the agent carries out the
/// resize it saw, cannot report it, and reports it once the API server is back; the guest
/// is never restarted, and a later write still gets through.
async fn api_outage(s: &Stack, f: &mut Faults) -> Result<String> {
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

fn signal(pid: i32, sig: &str) -> Result<()> {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// kube-apiserver is stopped (SIGTERM; SIGKILL after 10 s) while a VM plugs vCPUs, and
/// started again with the same flags; a new spec.cpus is written as soon as it answers.
async fn apiserver_restart(s: &Stack, f: &mut Faults) -> Result<String> {
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
async fn etcd_pause(s: &Stack, f: &mut Faults) -> Result<String> {
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
        corescale_e2e::http_get(&format!("{url}/readyz"))
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
                if let Ok(text) = corescale_e2e::http_get(&url).await {
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

fn agent_metrics(s: &Stack, node: &str) -> Result<String> {
    let var = match node {
        "node-a" => "CORESCALE_NODE_A_METRICS",
        "node-b" => "CORESCALE_NODE_B_METRICS",
        other => bail!("no agent metrics for node {other}"),
    };
    Ok(s.var(var)?.to_string())
}

/// The sum of `metric`'s samples whose labels include all `pairs` (text format), or None
/// if there is none.
fn metric_sum(text: &str, metric: &str, pairs: &[String]) -> Option<f64> {
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

/// Failed hot-plug operations of a VM, from its node agent's /metrics.
async fn hotplug_failures(s: &Stack, node: &str, name: &str) -> Result<f64> {
    let text = corescale_e2e::http_get(&format!("{}/metrics", agent_metrics(s, node)?)).await?;
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

/// QEMU is killed (SIGKILL) while it plugs: the agent notices within 2 s (Event
/// VmmExited, condition Running=False), restarts the guest per runStrategy with the
/// current spec.cpus, and leaves exactly one QEMU for the VM.
async fn qemu_kill(s: &Stack, f: &mut Faults) -> Result<String> {
    let node = s.boot_one(NS, "crash", 8).await?;
    let (pid, _) = s.qemu(&node, NS, "crash").context("no QEMU")?;
    s.scale(NS, "crash", 3).await?;
    s.wait_plugging(NS, "crash").await;
    signal(pid, "KILL")?;
    f.inject();
    let killed = chrono::Utc::now();
    let killed_at = Instant::now();
    let vm = s
        .wait_vm(
            NS,
            "crash",
            "Running=False after the kill",
            Duration::from_secs(10),
            |v| {
                condition(v, "Running").is_some_and(|c| c.reason == "VmmExited")
                    || s.events(NS, "crash")
                        .is_ok_and(|e| e.iter().any(|(r, _)| r == "VmmExited"))
            },
        )
        .await?;
    let _ = vm;
    let ev_time = event_time(s, "crash", "VmmExited")?.context("no VmmExited event")?;
    let detect = (ev_time - killed).num_milliseconds();
    ensure!(detect <= 2000, "VmmExited {detect} ms after the kill");
    let vm = s.wait_online(NS, "crash", 3, BOOT).await?;
    let restarted = killed_at.elapsed().as_secs_f64();
    let (new_pid, _) = s
        .qemu(&node, NS, "crash")
        .context("no QEMU after restart")?;
    ensure!(new_pid != pid, "same QEMU pid after a kill");
    let procs = s.qemu_processes(NS, "crash");
    ensure!(
        procs == vec![new_pid],
        "QEMU processes for the VM: {procs:?}"
    );
    let ev = s.events(NS, "crash")?;
    ensure!(
        ev.iter().any(|(r, _)| r == "VmmRestarted"),
        "no VmmRestarted event: {ev:?}"
    );
    ensure!(
        condition(&vm, "Running").is_some_and(|c| c.status == "True"),
        "Running not True"
    );
    s.delete(NS, "crash").await?;
    f.recovered(restarted);
    Ok(format!(
        "noticed in {detect} ms; restarted with 3 vCPUs in {restarted:.1} s (pid {pid} -> {new_pid})"
    ))
}

/// When the newest Event with `reason` about `name` happened.
fn event_time(
    s: &Stack,
    name: &str,
    reason: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let (ok, out, err) = s.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        NS,
        "-o",
        "json",
        "--field-selector",
        &format!("regarding.name={name},reason={reason}"),
    ])?;
    ensure!(ok, "listing events: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["eventTime"].as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .max())
}

/// A VM deleted while a resize is under way: the resize step ends, the guest stops, the
/// finalizer goes, no QEMU is left.
async fn delete_mid_resize(s: &Stack, f: &mut Faults) -> Result<String> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: dmr}\n\
                spec: {cpus: 1, topology: {sockets: 1, cores: 8, threads: 1}}\n";
    s.create(NS, yaml).await?;
    s.wait_online(NS, "dmr", 1, BOOT).await?;
    s.scale(NS, "dmr", 6).await?;
    s.wait_plugging(NS, "dmr").await;
    let t0 = Instant::now();
    s.delete(NS, "dmr").await?;
    f.inject();
    s.wait_gone(NS, "dmr", CONVERGE).await?;
    let left = s.qemu_processes(NS, "dmr");
    ensure!(left.is_empty(), "QEMU processes left: {left:?}");
    let gone = t0.elapsed().as_secs_f64();
    f.recovered(gone);
    Ok(format!(
        "deleted mid-resize; gone in {gone:.1} s, no QEMU left"
    ))
}

/// Scenario 8: Stop the example VM's agent past its lease: the operator moves the VM, it runs on
/// the other node; the old agent, back, stops its stale guest.
async fn reschedule(s: &Stack, f: &mut Faults) -> Result<String> {
    let vm = s.vms(NS).get("example").await?;
    let from = node_of(&vm).context("no node")?;
    let to = if from == "node-a" { "node-b" } else { "node-a" };
    let t0 = Instant::now();
    s.stack(&["agent", "stop", &from])?;
    f.inject();
    let vm = s
        .wait_vm(
            NS,
            "example",
            &format!("moved to {to}"),
            Duration::from_secs(60),
            |v| node_of(v).as_deref() == Some(to),
        )
        .await?;
    let moved = t0.elapsed().as_secs_f64();
    let want = vm.spec.cpus;
    // The operator resets what the lost node reported; Ready comes back from the new agent.
    let moved_vm = s.vms(NS).get("example").await?;
    ensure!(
        condition(&moved_vm, "Ready").is_none_or(|c| c.status == "False"),
        "Ready still claims the old node's guest"
    );
    ensure!(
        online(&moved_vm) == 0,
        "status.vcpus still shows the old node's Online vCPUs: {:?}",
        moved_vm.status.as_ref().map(|st| &st.vcpus)
    );
    s.wait_online(NS, "example", want, BOOT).await?;
    let running = t0.elapsed().as_secs_f64();
    ensure!(s.qemu(to, NS, "example").is_some(), "no QEMU on {to}");
    let ev = s.events(NS, "example")?;
    ensure!(
        ev.iter()
            .any(|(r, n)| r == "Rescheduled" && n.contains(&from)),
        "no Rescheduled event: {ev:?}"
    );
    s.stack(&["agent", "start", &from])?;
    let start = Instant::now();
    while s.qemu(&from, NS, "example").is_some() {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the stale guest on {from} still runs"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    f.recovered(running);
    Ok(format!("moved {from} -> {to} in {moved:.1} s; Running with {want} vCPUs after {running:.1} s; stale guest on {from} stopped"))
}

/// Scenario 6: Delete: the guest stops, the finalizer goes, no QEMU remains.
/// Issue 9: a ppc64le guest through the real API server: the nodes announce the
/// architecture, the VM boots under qemu-system-ppc64, kubectl scale moves whole cores
/// (both SMT threads) in the guest and in status, with the same Events and metrics as on
/// x86; deleting it leaves no QEMU.
async fn ppc64le(s: &Stack) -> Result<String> {
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

async fn delete(s: &Stack) -> Result<String> {
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
