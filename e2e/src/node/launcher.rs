//! Scenario `launcher-resources`: the launcher container's resources follow its guests.
//!
//! A VM's QEMU runs in the launcher container's cgroup; as the VM goes 1 -> 4 -> 2
//! vCPUs, the pod's `status.containerStatuses[launcher].resources` and the cgroup's own
//! CPU quota on the node follow (the chart's `nodeVmm.launcher.followGuests`). A pod of
//! lower priority holding the node's free CPU is evicted by the kubelet for a grow (the
//! node-vmm pod is system-node-critical); then the kubelet says no twice: a pod of the same
//! priority holding it makes a grow `Deferred` (the VM's `ResizePending`, the guest
//! untouched, resumed once the pod is gone), and a VM whose memory the node cannot hold
//! is `Infeasible` before it boots.

use super::pods::{node_vmm_pod, PodView};
use super::{host, Ctx, RELEASE, RELEASE_NS, VM, VM_NS};
use crate::condition;
use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::validate::parse_quantity;
use corescale_node_vmm::agent::launcher_size::parse_cpu_millis;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long the kubelet may take to show a resize in the pod and the cgroup.
const APPLIED: Duration = Duration::from_secs(60);
/// The pod that takes the node's free CPU.
const FILLER: &str = "node-e2e-cpu-filler";
/// The node's sandbox image (e2e/node/up.sh), the one image a plain pod can run there.
const PAUSE: &str = "localhost/corescale/pause:3.10";
/// The scenario's own VM, resized 1 -> 4 -> 2 -> 3.
const OWN: &str = "node-e2e-res";
/// The VM the node has no memory for.
const HUGE: &str = "node-e2e-huge";

/// What the launcher container should have, from the release's values.
struct Expected {
    cpu_request: u64,
    cpu_limit: u64,
    memory_request: u64,
    per_vcpu_request: u64,
    per_vcpu_limit: u64,
    per_vm_memory: u64,
}

impl Expected {
    /// From `helm get values --all`: the launcher's base resources, followGuests and the
    /// overcommit ratio (the default CPU request per vCPU is 1/overcommit).
    // The overcommit ratio is a positive value of the chart's schema (> 0): 1000 / it,
    // rounded up, is a whole number of millicores.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn from_release(c: &Ctx) -> Result<Self> {
        let v: Value = serde_json::from_str(&c.helm(&[
            "get", "values", RELEASE, "-n", RELEASE_NS, "--all", "-o", "json",
        ])?)?;
        let l = &v["nodeVmm"]["launcher"];
        let f = &l["followGuests"];
        ensure!(
            f["enabled"] == true,
            "the release runs with followGuests off"
        );
        let cpu = |x: &Value, what: &str| {
            x.as_str()
                .and_then(parse_cpu_millis)
                .with_context(|| format!("{what} {x} is not a CPU quantity"))
        };
        let overcommit = v["nodeVmm"]["agent"]["overcommit"]
            .as_f64()
            .context("no nodeVmm.agent.overcommit")?;
        let per_vcpu_request = match f["cpuRequestPerVcpu"].as_str() {
            Some("") | None => (1000.0 / overcommit).ceil() as u64,
            Some(_) => cpu(&f["cpuRequestPerVcpu"], "cpuRequestPerVcpu")?,
        };
        let mem = |x: &Value, what: &str| {
            x.as_str()
                .and_then(parse_quantity)
                .with_context(|| format!("{what} {x} is not a memory quantity"))
        };
        Ok(Expected {
            cpu_request: cpu(&l["resources"]["requests"]["cpu"], "requests.cpu")?,
            cpu_limit: cpu(&l["resources"]["limits"]["cpu"], "limits.cpu")?,
            memory_request: mem(&l["resources"]["requests"]["memory"], "requests.memory")?,
            per_vcpu_request,
            per_vcpu_limit: cpu(&f["cpuLimitPerVcpu"], "cpuLimitPerVcpu")?,
            per_vm_memory: mem(&f["memoryPerVm"], "memoryPerVm")?,
        })
    }

    /// (CPU request, CPU limit, memory request) with `vms` VMs holding `vcpus` vCPUs and
    /// `memory` bytes in all.
    fn at(&self, vcpus: u64, memory: u64, vms: u64) -> (u64, u64, u64) {
        (
            self.cpu_request + vcpus * self.per_vcpu_request,
            self.cpu_limit + vcpus * self.per_vcpu_limit,
            self.memory_request + memory + vms * self.per_vm_memory,
        )
    }
}

/// The launcher container's resources as the kubelet reports them: (CPU request, CPU
/// limit, memory request), and the spec's.
async fn launcher_resources(c: &Ctx, pod: &str) -> Result<((u64, u64, u64), (u64, u64, u64))> {
    let api: Api<Pod> = Api::namespaced(c.stack.client.clone(), RELEASE_NS);
    let p = api.get(pod).await?;
    let figures =
        |r: Option<&k8s_openapi::api::core::v1::ResourceRequirements>| -> (u64, u64, u64) {
            let q = |m: Option<
                &std::collections::BTreeMap<
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                >,
            >,
                     k: &str| {
                m.and_then(|m| m.get(k))
                    .map(|q| q.0.clone())
                    .unwrap_or_default()
            };
            let (req, lim) = (
                r.and_then(|r| r.requests.as_ref()),
                r.and_then(|r| r.limits.as_ref()),
            );
            (
                parse_cpu_millis(&q(req, "cpu")).unwrap_or(0),
                parse_cpu_millis(&q(lim, "cpu")).unwrap_or(0),
                parse_quantity(&q(req, "memory")).unwrap_or(0),
            )
        };
    let status = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "launcher"))
        .and_then(|c| c.resources.as_ref());
    let spec = p
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "launcher"))
        .and_then(|c| c.resources.as_ref());
    Ok((figures(status), figures(spec)))
}

/// Close enough: the runtime reports CPU back from shares and quota, which round.
fn near(a: u64, b: u64) -> bool {
    a.abs_diff(b) <= 10
}

/// Wait until the pod's status and the cgroup's quota show `want`; returns the quota.
async fn wait_applied(
    c: &Ctx,
    pod: &str,
    cg: &(PathBuf, bool),
    want: (u64, u64, u64),
) -> Result<u64> {
    let deadline = Instant::now() + APPLIED;
    loop {
        let (status, _) = launcher_resources(c, pod).await?;
        let quota = host::quota_millis(&cg.0, cg.1)?;
        if near(status.0, want.0)
            && near(status.1, want.1)
            && status.2 == want.2
            && quota.is_some_and(|q| near(q, want.1))
        {
            return Ok(quota.unwrap_or(0));
        }
        if Instant::now() >= deadline {
            bail!(
                "launcher container not at (cpu request, cpu limit, memory request) {want:?} within {} s: \
                 the pod's status says {status:?}, the cgroup's quota {quota:?} millicores ({})",
                APPLIED.as_secs(),
                cg.0.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// CPU the node has left for a new pod: allocatable minus what its pods request.
async fn free_cpu(c: &Ctx) -> Result<u64> {
    let node: Node = Api::<Node>::all(c.stack.client.clone())
        .get(&c.node)
        .await?;
    let alloc = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("cpu"))
        .and_then(|q| parse_cpu_millis(&q.0))
        .context("the node has no allocatable cpu")?;
    let pods: Api<Pod> = Api::all(c.stack.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={}", c.node));
    let mut used = 0;
    for p in pods.list(&lp).await? {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        let Some(spec) = p.spec else { continue };
        let cpu = |c: &k8s_openapi::api::core::v1::Container| {
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("cpu"))
                .and_then(|q| parse_cpu_millis(&q.0))
                .unwrap_or(0)
        };
        let run: u64 = spec.containers.iter().map(cpu).sum();
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(cpu)
            .max()
            .unwrap_or(0);
        used += run.max(init);
    }
    Ok(alloc.saturating_sub(used))
}

/// A pause pod on the node requesting `cpu` millicores, in kube-system at
/// `system-node-critical` when `critical` (the node-vmm pod's own priority, which the
/// kubelet does not evict for it).
async fn start_filler(c: &Ctx, cpu: u64, critical: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.stack.client.clone(), filler_ns(critical));
    let priority = if critical { "system-node-critical" } else { "" };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": FILLER},
        "spec": {
            "nodeName": c.node,
            "priorityClassName": priority,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "pause", "image": PAUSE, "imagePullPolicy": "Never",
                "resources": {"requests": {"cpu": format!("{cpu}m")}}}]
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get(FILLER).await?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Running" {
            return Ok(());
        }
        ensure!(
            phase != "Failed",
            "the filler pod failed (the kubelet refused {cpu}m?)"
        );
        if Instant::now() >= deadline {
            bail!("the filler pod is {phase:?}, not Running, after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn filler_ns(critical: bool) -> &'static str {
    if critical {
        "kube-system"
    } else {
        VM_NS
    }
}

/// Wait (30 s at most) until the kubelet has stopped the filler pod for good to take its
/// room back (a terminal phase: the pause process exits 0 on the kubelet's SIGTERM, so
/// it may end Succeeded); returns the phase and the kubelet's DisruptionTarget reason.
async fn filler_preempted(c: &Ctx, critical: bool) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(c.stack.client.clone(), filler_ns(critical));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = pods.get_opt(FILLER).await?.and_then(|p| p.status);
        let phase = st
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Failed" || phase == "Succeeded" {
            let why = st
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "DisruptionTarget")
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            return Ok(format!("{phase}, {why}"));
        }
        ensure!(
            Instant::now() < deadline,
            "the kubelet made room for the launcher but the filler pod is still {phase:?} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn delete_filler(c: &Ctx, critical: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.stack.client.clone(), filler_ns(critical));
    let _ = pods
        .delete(FILLER, &DeleteParams::default().grace_period(0))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pods.get_opt(FILLER).await?.is_some() {
        ensure!(
            Instant::now() < deadline,
            "the filler pod is still there after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Wait until the VM's `ResizePending` is True with `reason`; returns its message.
async fn wait_pending(c: &Ctx, name: &str, reason: &str) -> Result<String> {
    let vm = c
        .stack
        .wait_vm(
            VM_NS,
            name,
            &format!("ResizePending {reason}"),
            Duration::from_secs(90),
            |v| {
                condition(v, "ResizePending")
                    .is_some_and(|x| x.status == "True" && x.reason == reason)
            },
        )
        .await?;
    let msg = condition(&vm, "ResizePending")
        .map(|x| x.message.clone())
        .unwrap_or_default();
    ensure!(
        msg.starts_with("the kubelet cannot give the launcher container room for this VM: "),
        "ResizePending {reason} does not carry the kubelet's answer: {msg:?}"
    );
    Ok(msg)
}

/// A client with the token the agent of `pod` holds: bound to that pod, so it names the
/// pod's node (what the admission policy compares).
async fn as_agent_of(c: &Ctx, pod: &PodView) -> Result<kube::Client> {
    let (ok, token, err) = c.stack.kubectl(&[
        "create",
        "token",
        &format!("{RELEASE}-node-vmm"),
        "-n",
        RELEASE_NS,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        &pod.name,
        "--bound-object-uid",
        &pod.uid,
        "--duration",
        "10m",
    ])?;
    ensure!(ok, "kubectl create token: {err}");
    let kc = kube::config::Kubeconfig::read_from(c.stack.var("KUBECONFIG")?)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    cfg.auth_info = kube::config::AuthInfo {
        token: Some(token.trim().to_string().into()),
        ..Default::default()
    };
    Ok(kube::Client::try_from(cfg)?)
}

/// The agent's own token may resize its pod's launcher container and nothing else of it
/// (checked with server-side dry runs: admission runs, nothing changes).
async fn only_the_launcher(c: &Ctx, pod: &PodView) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(as_agent_of(c, pod).await?, RELEASE_NS);
    let (_, spec) = launcher_resources(c, &pod.name).await?;
    let dry = PatchParams::default().dry_run();
    let resize = |container: &str, cpu: String| {
        Patch::Strategic(serde_json::json!({"spec": {"containers": [
            {"name": container, "resources": {"requests": {"cpu": cpu}}}]}}))
    };
    pods.patch_subresource(
        "resize",
        &pod.name,
        &dry,
        &resize("launcher", format!("{}m", spec.0 + 1)),
    )
    .await
    .context("the agent's own token may not resize its launcher container")?;
    let refused = pods
        .patch_subresource("resize", &pod.name, &dry, &resize("agent", "77m".into()))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(
        refused.contains("may resize only the launcher container"),
        "the agent's token resized its own agent container (or was refused for another reason: {refused:?})"
    );
    Ok(())
}

/// Scale `name` with `kubectl scale` and wait until the agent reports `n` online.
async fn scale_to(c: &Ctx, name: &str, n: u32) -> Result<()> {
    let (ok, _, err) = c.stack.kubectl(&[
        "scale",
        "-n",
        VM_NS,
        &format!("cvm/{name}"),
        &format!("--replicas={n}"),
    ])?;
    ensure!(ok, "kubectl scale {name} --replicas={n}: {err}");
    c.stack
        .wait_online(VM_NS, name, n, Duration::from_secs(120))
        .await?;
    let seen = host::guest_online_cpus(VM_NS, name).await?;
    ensure!(
        seen == n,
        "{name}: status says {n} online, the guest counts {seen}"
    );
    Ok(())
}

/// Run it. A VM of its own ([`OWN`]) is resized: under TCG one QEMU process creates at
/// most `maxcpus` vCPU threads in its life, and the shared VM spent its budget in `scale`.
/// The shared VM stays as it is, its share counted in every figure.
pub(super) async fn launcher_resources_follow(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let want = Expected::from_release(c)?;
    let pod = node_vmm_pod(c).await?;
    let launcher = pod.container("launcher")?.clone();
    let shared_vm = s.vms(VM_NS).get(VM).await?;
    let other = (
        u64::from(shared_vm.spec.cpus),
        parse_quantity(&shared_vm.spec.memory.0).context("spec.memory")?,
    );
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {OWN}\n\
         spec:\n  cpus: 1\n  topology: {{sockets: 1, cores: 6, threads: 1}}\n"
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", VM_NS, "-f", "-"], Some(&yaml))?;
    ensure!(ok, "kubectl apply {OWN}: {err}");
    let vm = s.wait_online(VM_NS, OWN, 1, super::BOOT).await?;
    let memory = parse_quantity(&vm.spec.memory.0).context("spec.memory")?;
    // (CPU request, CPU limit, memory request) with the own VM at `n` beside the shared one.
    let at = |n: u64| want.at(other.0 + n, other.1 + memory, 2);
    let qemu = host::one_qemu(VM_NS, OWN)?;
    let cg = host::cpu_cgroup(qemu.pid)?;
    let suffix = format!("/pod{}/{}", pod.uid, launcher.id);
    ensure!(
        cg.0.display().to_string().ends_with(&suffix),
        "QEMU (pid {}) runs in cgroup {}, not in the launcher container's (…{suffix})",
        qemu.pid,
        cg.0.display()
    );
    only_the_launcher(c, &pod).await?;

    let mut steps = Vec::new();
    for n in [1u32, 4, 2] {
        if n != 1 {
            scale_to(c, OWN, n)
                .await
                .with_context(|| format!("scaling {OWN} to {n}"))?;
        }
        let want = at(n.into());
        let quota = wait_applied(c, &pod.name, &cg, want)
            .await
            .with_context(|| format!("at {n} vCPUs"))?;
        steps.push(format!(
            "{n} vCPUs: request {}m, limit {}m (cgroup quota {quota}m)",
            want.0, want.1
        ));
    }

    // The node-vmm pod is system-node-critical (the chart's default): for its grow the
    // kubelet evicts a pod of lower priority that took the node's free CPU.
    start_filler(c, free_cpu(c).await?, false).await?;
    scale_to(c, OWN, 3)
        .await
        .context("growing 2 -> 3 past a normal pod that holds the node's free CPU")?;
    let evicted = filler_preempted(c, false).await;
    delete_filler(c, false).await?;
    let evicted = evicted?;
    wait_applied(c, &pod.name, &cg, at(3)).await?;
    scale_to(c, OWN, 2).await?;
    wait_applied(c, &pod.name, &cg, at(2)).await?;

    // Deferred: a pod of the same priority takes the node's free CPU, so 2 -> 3 waits.
    start_filler(c, free_cpu(c).await?, true).await?;
    let t0 = Instant::now();
    let (ok, _, err) = s.kubectl(&["scale", "-n", VM_NS, &format!("cvm/{OWN}"), "--replicas=3"])?;
    ensure!(ok, "kubectl scale --replicas=3: {err}");
    let deferred = wait_pending(c, OWN, "Deferred").await;
    let checked = async {
        let msg = deferred?;
        let seen = host::guest_online_cpus(VM_NS, OWN).await?;
        ensure!(seen == 2, "the guest went to {seen} CPUs while its resize was deferred");
        let (status, spec) = launcher_resources(c, &pod.name).await?;
        let at2 = at(2);
        ensure!(
            near(status.1, at2.1) && near(spec.0, at2.0),
            "a deferred grow left the launcher at status {status:?} / spec {spec:?}, not at 2 vCPUs' {at2:?}"
        );
        Ok::<_, anyhow::Error>(msg)
    }
    .await;
    delete_filler(c, true).await?;
    let deferred_msg = checked?;
    s.wait_online(VM_NS, OWN, 3, Duration::from_secs(120))
        .await
        .context("the deferred resize did not go on once the filler pod was gone")?;
    wait_applied(c, &pod.name, &cg, at(3)).await?;
    let resumed = t0.elapsed().as_secs_f64();

    // Infeasible: a VM with more memory than the node has never boots.
    let node: Node = Api::<Node>::all(s.client.clone()).get(&c.node).await?;
    let node_mem = node
        .status
        .and_then(|st| st.allocatable)
        .and_then(|a| a.get("memory").and_then(|q| parse_quantity(&q.0)))
        .context("the node has no allocatable memory")?;
    let huge_mi = node_mem / (1 << 20) + 1024;
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {HUGE}\n\
         spec:\n  cpus: 1\n  memory: {huge_mi}Mi\n  topology: {{sockets: 1, cores: 2, threads: 1}}\n"
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", VM_NS, "-f", "-"], Some(&yaml))?;
    ensure!(ok, "kubectl apply {HUGE}: {err}");
    let infeasible = wait_pending(c, HUGE, "Infeasible").await;
    let no_qemu = host::qemu_of(VM_NS, HUGE).is_empty();
    let (_, spec) = launcher_resources(c, &pod.name).await?;
    s.delete(VM_NS, HUGE).await?;
    s.wait_gone(VM_NS, HUGE, Duration::from_secs(60)).await?;
    let infeasible_msg = infeasible?;
    ensure!(
        infeasible_msg.contains("memory"),
        "Infeasible without naming memory: {infeasible_msg}"
    );
    ensure!(
        no_qemu,
        "{HUGE} got a QEMU process although the kubelet refused its memory"
    );
    let at3 = at(3);
    ensure!(
        near(spec.0, at3.0) && spec.2 == at3.2,
        "the refused VM left the launcher's spec at {spec:?}, not at {at3:?}"
    );
    ensure!(
        host::one_qemu(VM_NS, OWN)? == qemu,
        "{OWN}'s QEMU process changed (was {qemu:?})"
    );

    // A VM that goes gives its share back.
    s.delete(VM_NS, OWN).await?;
    s.wait_gone(VM_NS, OWN, Duration::from_secs(120)).await?;
    let alone = want.at(other.0, other.1, 1);
    let shared_cg = host::cpu_cgroup(host::one_qemu(VM_NS, VM)?.pid)?;
    wait_applied(c, &pod.name, &shared_cg, alone)
        .await
        .context("after the VM was deleted")?;
    Ok(format!(
        "the agent's token resizes only its launcher container; {}; 2 -> 3 evicted a normal pod holding the node's CPU ({evicted:?}); with a system-node-critical one 2 -> 3 was Deferred ({deferred_msg:?}) and went on {resumed:.1} s after the request once it left; \
         a {huge_mi}Mi VM was Infeasible ({infeasible_msg:?}); one QEMU throughout; deleted, back to {}m / {}m",
        steps.join(", "),
        alone.0,
        alone.1
    ))
}
