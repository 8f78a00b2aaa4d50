//! The scenarios of `make node-e2e` (e2e/node/e2e.sh): corescale installed with Helm on a
//! real kubelet node from the Dockerfile's images, and what README promises there: resizes
//! the guest itself sees, metrics scraped from the pods, guests that survive the agent
//! container's restart and `helm upgrade`, are restarted when their pod is deleted, a real
//! workload (examples/workload.yaml) in the pod, KEDA scaling a VM from its load through
//! Prometheus scraping the pods, and what `helm uninstall` leaves. One
//! registry, [`SCENARIOS`], in the order they run: each builds on the state the previous
//! one left (one VM, [`VM`], lives through all of them).
//!
//! e2e.sh brings the node up, builds and loads the images and runs `helm install --wait`;
//! the binary `corescale-node-e2e` runs these against it; e2e.sh tears everything down.

mod helm;
pub mod host;
mod launcher;
mod metrics;
pub mod pods;
mod restart;
mod scale;
mod workload;

use crate::Stack;
use anyhow::{ensure, Context as _, Result};
use futures::future::LocalBoxFuture;
use std::time::{Duration, Instant};

/// The release's name and namespace, as README's install command has them.
pub const RELEASE: &str = "corescale";
/// The release's namespace.
pub const RELEASE_NS: &str = "corescale-system";
/// The namespace and name of the VM the scenarios share.
pub const VM_NS: &str = "default";
/// The VM's name.
pub const VM: &str = "node-e2e";
/// The VM's slots (one socket of this many cores).
pub const SLOTS: u32 = 4;
/// The guest's console socket in its state directory.
pub const CONSOLE_SOCK: &str = "console.sock";
/// How long a guest may take to boot under TCG in the launcher container.
const BOOT: Duration = Duration::from_secs(300);
/// How long a resize may take to show in status.
const CONVERGE: Duration = Duration::from_secs(120);

/// What the scenarios share: the node's stack and how the release was installed.
pub struct Ctx {
    /// The control plane and node (`e2e/.run/node`).
    pub stack: Stack,
    /// The helm binary.
    pub helm: String,
    /// The chart directory.
    pub chart: String,
    /// The operator image the release runs (`repository:tag`).
    pub operator_image: String,
    /// The node-vmm image the release runs.
    pub node_vmm_image: String,
    /// containerd's socket of the node.
    pub containerd: String,
    /// The node's name.
    pub node: String,
}

impl Ctx {
    /// The context from the node's env file and what e2e.sh passes in the environment:
    /// `CORESCALE_HELM`, `CORESCALE_OPERATOR_IMAGE`, `CORESCALE_NODE_VMM_IMAGE`.
    pub async fn from_env() -> Result<Self> {
        let stack = Stack::from_env("node").await?;
        let env = |k: &str| {
            std::env::var(k).with_context(|| format!("{k} is not set (e2e/node/e2e.sh sets it)"))
        };
        let chart = stack.repo.join("charts/corescale").display().to_string();
        Ok(Ctx {
            helm: env("CORESCALE_HELM")?,
            operator_image: env("CORESCALE_OPERATOR_IMAGE")?,
            node_vmm_image: env("CORESCALE_NODE_VMM_IMAGE")?,
            containerd: stack.var("CORESCALE_CONTAINERD_SOCKET")?.to_string(),
            node: stack.var("CORESCALE_NODE_NAME")?.to_string(),
            chart,
            stack,
        })
    }

    /// Run helm with the node's kubeconfig; fails with its output.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(&self.helm)
            .args(args)
            .env("KUBECONFIG", self.stack.var("KUBECONFIG")?)
            .output()
            .with_context(|| format!("running {}", self.helm))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "helm {}: {}",
            args.join(" "),
            text.trim()
        );
        Ok(text)
    }

    /// Scale the VM with `kubectl scale` and wait until the agent reports `n` online and
    /// the guest itself counts `n` online CPUs. Returns the seconds to convergence.
    pub async fn scale_and_check(&self, n: u32) -> Result<f64> {
        let t0 = Instant::now();
        let (ok, _, err) = self.stack.kubectl(&[
            "scale",
            "-n",
            VM_NS,
            &format!("cvm/{VM}"),
            &format!("--replicas={n}"),
        ])?;
        ensure!(ok, "kubectl scale --replicas={n}: {err}");
        let vm = self.stack.wait_online(VM_NS, VM, n, CONVERGE).await?;
        let secs = t0.elapsed().as_secs_f64();
        let lr = vm
            .status
            .as_ref()
            .and_then(|s| s.last_resize.clone())
            .context("no status.lastResize")?;
        ensure!(
            lr.to == n && lr.result == corescale_api::ResizeResult::Succeeded,
            "lastResize after scaling to {n}: {lr:?}"
        );
        self.guest_sees(n).await?;
        Ok(secs)
    }

    /// The guest's own count of online CPUs is `n`.
    pub async fn guest_sees(&self, n: u32) -> Result<()> {
        let seen = host::guest_online_cpus(VM_NS, VM).await?;
        ensure!(
            seen == n,
            "status says {n} vCPUs online but the guest counts {seen} in /sys/devices/system/cpu/online"
        );
        Ok(())
    }

    /// `spec.cpus` of the VM.
    pub async fn spec_cpus(&self) -> Result<u32> {
        Ok(self.stack.vms(VM_NS).get(VM).await?.spec.cpus)
    }
}

/// A scenario's function; its `Ok` is the one-line detail of the summary.
pub type Run = for<'a> fn(&'a Ctx) -> LocalBoxFuture<'a, Result<String>>;

/// One entry of the registry.
pub struct Scenario {
    /// Its name.
    pub name: &'static str,
    /// What it asserts.
    pub what: &'static str,
    /// Runs it.
    pub run: Run,
}

/// Every node scenario, in the order they run; each starts from where the last one ended.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "scale",
        what: "a VM boots in the node-vmm pod; kubectl scale 1 -> 3 -> 1 -> 2: status and the guest's own /sys count agree, one QEMU throughout",
        run: |c| Box::pin(scale::scale(c)),
    },
    Scenario {
        name: "launcher-resources",
        what: "the launcher container's requests, limits and cgroup CPU quota follow the VM 1 -> 4 -> 2 (in-place pod resize); a grow the kubelet defers (a pod took the CPU) or finds infeasible (memory) is the VM's ResizePending with its message, the guest untouched",
        run: |c| Box::pin(launcher::launcher_resources_follow(c)),
    },
    Scenario {
        name: "metrics",
        what: "/metrics scraped from the pods behind the chart's Services: the VM's vCPU gauges match its status, resize counters, the operator leads",
        run: |c| Box::pin(metrics::metrics(c)),
    },
    Scenario {
        name: "agent-restart",
        what: "the agent container killed (SIGKILL): restarted by the kubelet, the guest keeps its QEMU and stays Running, re-adopted, resizes after",
        run: |c| Box::pin(restart::agent_restart(c)),
    },
    Scenario {
        name: "helm-upgrade",
        what: "helm upgrade --wait=legacy to new image tags and the node's image directory (OnDelete): the operator rolls, the node-vmm pod and its guest stay untouched",
        run: |c| Box::pin(helm::upgrade(c)),
    },
    Scenario {
        name: "pod-delete",
        what: "the node-vmm pod deleted: its guest stops; the new pod (new template) boots the VM again at spec.cpus",
        run: |c| Box::pin(restart::pod_delete(c)),
    },
    Scenario {
        name: "workload",
        what: "examples/workload.yaml in the launcher container: Debian boots from the node's image directory (guestImages.hostPath), the Secret readable only once the Role lets the chart's ServiceAccount, HTTP at the pod IP and through a selectorless Service, ssh, the console through kubectl exec, a job spreads 1 -> 4 vCPUs, disks kept across the agent's SIGKILL and removed with the VM",
        run: |c| Box::pin(workload::workload(c)),
    },
    Scenario {
        name: "autoscale",
        what: "examples/autoscale-keda.yaml against the chart's pods: Prometheus discovers them as the chart's ServiceMonitor says (honorLabels), KEDA's HPA writes spec.cpus through /scale from the guest's load (1 loop -> 2 vCPUs, 2 loops -> 3-4, none -> 1), the launcher's QEMU plugs them",
        run: |c| {
            Box::pin(async move {
                crate::autoscale::autoscale(&c.stack, VM_NS, &|_| host::STATE_DIR.into()).await
            })
        },
    },
    Scenario {
        name: "helm-uninstall",
        what: "helm uninstall: every release object and guest gone; the CRD, the VM (finalizer held), node Leases, the namespace and the node's state dir remain",
        run: |c| Box::pin(helm::uninstall(c)),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_run_in_their_documented_order() {
        let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "scale",
                "launcher-resources",
                "metrics",
                "agent-restart",
                "helm-upgrade",
                "pod-delete",
                "workload",
                "autoscale",
                "helm-uninstall"
            ]
        );
    }
}
