//! The launcher container's resources follow its guests (in-place pod resize).
//!
//! Every guest's QEMU runs in the launcher container's cgroup. With fixed resources the
//! container either throttles its guests (a CPU limit below their vCPUs) or lets the
//! scheduler overcommit the node (requests that do not count them). So the agent resizes
//! its own pod (the `pods/resize` subresource, GA in Kubernetes 1.35) to
//!
//! - CPU request: base + vCPUs held x `cpu_request_per_vcpu` (1/overcommit of a CPU by
//!   default: what the node's vCPU budget promises each vCPU);
//! - CPU limit: base + vCPUs held x `cpu_limit_per_vcpu` (a whole CPU by default), so
//!   each vCPU may run a core and the guests together no more than they were given; no
//!   limit when the base has none;
//! - memory request: base + per VM its `spec.memory` and `memory_per_vm` (QEMU itself);
//! - memory limit: the same sum over the base's limit, only when the base has one (a
//!   memory limit is one limit on every guest of the node together).
//!
//! A VM grows the pod **before** it boots or plugs, and waits until the kubelet has
//! applied the resize; an answer `PodResizePending` (`Infeasible` or `Deferred`) gives
//! back its claim and becomes the VM's `ResizePending` with the kubelet's message. Shrinks
//! (after an unplug, a stop, a delete) are written in the background and not waited for:
//! a late shrink only reserves too much for a while.

use crate::backend::VmKey;
use corescale_api::validate::parse_quantity;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use kube::api::{Api, Patch, PatchParams};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// Condition the kubelet sets on a pod whose resize it cannot apply now.
const POD_RESIZE_PENDING: &str = "PodResizePending";
/// Condition the kubelet sets while it applies a resize (reason `Error` when it failed).
const POD_RESIZE_IN_PROGRESS: &str = "PodResizeInProgress";
/// Millicores a reported CPU figure may fall short of the written one (rounding).
const CPU_SLACK: u64 = 10;
/// How often a grow looks at the pod while the kubelet applies it.
const POLL: Duration = Duration::from_millis(200);

/// What can go wrong in sizing the launcher container.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// A setting is not a quantity of its kind.
    #[error("{field}: {value:?} is not a {kind} quantity")]
    Quantity {
        /// The flag or field.
        field: String,
        /// What was given.
        value: String,
        /// cpu or memory.
        kind: &'static str,
    },
    /// The base resources are not a ResourceRequirements object.
    #[error("{field}: {source}")]
    Base {
        /// The flag.
        field: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// The pod could not be resized or read.
    #[error("cannot resize pod {pod}: {source}")]
    Api {
        /// The pod.
        pod: String,
        /// The API's answer.
        source: kube::Error,
    },
}

/// CPU (millicores) and memory (bytes) of a container, as the sizer computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// requests.cpu in millicores.
    pub cpu_request: u64,
    /// limits.cpu in millicores; None: no limit.
    pub cpu_limit: Option<u64>,
    /// requests.memory in bytes.
    pub memory_request: u64,
    /// limits.memory in bytes; None: no limit.
    pub memory_limit: Option<u64>,
}

impl Resources {
    /// Parse a container's resources; `field` names where they came from in errors.
    pub fn parse(r: &ResourceRequirements, field: &str) -> Result<Self, SizeError> {
        let get = |m: &Option<
            std::collections::BTreeMap<
                String,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity,
            >,
        >,
                   which: &str,
                   key: &str|
         -> Result<Option<u64>, SizeError> {
            let Some(q) = m.as_ref().and_then(|m| m.get(key)) else {
                return Ok(None);
            };
            let (parsed, kind) = if key == "cpu" {
                (parse_cpu_millis(&q.0), "cpu")
            } else {
                (parse_quantity(&q.0), "memory")
            };
            parsed.map(Some).ok_or_else(|| SizeError::Quantity {
                field: format!("{field}.{which}.{key}"),
                value: q.0.clone(),
                kind,
            })
        };
        Ok(Resources {
            cpu_request: get(&r.requests, "requests", "cpu")?.unwrap_or(0),
            cpu_limit: get(&r.limits, "limits", "cpu")?,
            memory_request: get(&r.requests, "requests", "memory")?.unwrap_or(0),
            memory_limit: get(&r.limits, "limits", "memory")?,
        })
    }

    /// At least `want` in every part the sizer sets (no limit counts as unlimited). CPU
    /// may be up to [`CPU_SLACK`] millicores short: the runtime reports it back from
    /// cgroup shares and quota, which round.
    pub fn covers(&self, want: &Resources) -> bool {
        let lim = |have: Option<u64>, want: Option<u64>, slack: u64| match (have, want) {
            (_, None) | (None, Some(_)) => true,
            (Some(h), Some(w)) => h + slack >= w,
        };
        self.cpu_request + CPU_SLACK >= want.cpu_request
            && self.memory_request >= want.memory_request
            && lim(self.cpu_limit, want.cpu_limit, CPU_SLACK)
            && lim(self.memory_limit, want.memory_limit, 0)
    }

    /// The strategic-merge patch of the `resize` subresource that sets these on `container`.
    pub fn resize_patch(&self, container: &str) -> serde_json::Value {
        let mut limits = serde_json::Map::new();
        if let Some(c) = self.cpu_limit {
            limits.insert("cpu".into(), format!("{c}m").into());
        }
        if let Some(m) = self.memory_limit {
            limits.insert("memory".into(), m.to_string().into());
        }
        let mut resources = serde_json::json!({
            "requests": {
                "cpu": format!("{}m", self.cpu_request),
                "memory": self.memory_request.to_string(),
            }
        });
        if !limits.is_empty() {
            resources["limits"] = limits.into();
        }
        serde_json::json!({"spec": {"containers": [{"name": container, "resources": resources}]}})
    }
}

/// Parse a CPU quantity (`250m`, `2`, `0.5`) into millicores; None when it is not one.
pub fn parse_cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return if !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()) {
            m.parse().ok()
        } else {
            None
        };
    }
    let (whole, frac) = q.split_once('.').unwrap_or((q, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 3 {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    whole.checked_mul(1000)?.checked_add(frac)
}

/// How the launcher container is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// The launcher with no guest.
    pub base: Resources,
    /// CPU request per vCPU held, millicores.
    pub cpu_request_per_vcpu: u64,
    /// CPU limit per vCPU held, millicores.
    pub cpu_limit_per_vcpu: u64,
    /// Memory per VM beside its `spec.memory`: QEMU's own, bytes.
    pub memory_per_vm: u64,
}

/// What one VM holds in the launcher container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claim {
    /// vCPUs it has or was granted.
    pub vcpus: u32,
    /// Its guest memory (`spec.memory`), bytes.
    pub memory: u64,
}

/// The sizer's flags, as given (see `corescale-node-vmm agent --help`).
#[derive(Debug, Clone, Default)]
pub struct SizingFlags {
    /// `--launcher-resources`: the container's `resources` with no guest, JSON.
    pub base: String,
    /// `--launcher-cpu-request-per-vcpu`; None or empty: 1/overcommit of a CPU.
    pub cpu_request_per_vcpu: Option<String>,
    /// `--launcher-cpu-limit-per-vcpu`.
    pub cpu_limit_per_vcpu: String,
    /// `--launcher-memory-per-vm`.
    pub memory_per_vm: String,
}

impl Sizing {
    /// The sizing the flags describe; errors name the flag.
    pub fn from_flags(f: &SizingFlags, overcommit: f64) -> Result<Self, SizeError> {
        let base: ResourceRequirements =
            serde_json::from_str(&f.base).map_err(|source| SizeError::Base {
                field: "--launcher-resources",
                source,
            })?;
        let cpu = |flag: &str, v: &str| {
            parse_cpu_millis(v).ok_or_else(|| SizeError::Quantity {
                field: flag.into(),
                value: v.into(),
                kind: "cpu",
            })
        };
        let cpu_request_per_vcpu = match f.cpu_request_per_vcpu.as_deref() {
            Some(v) if !v.trim().is_empty() => cpu("--launcher-cpu-request-per-vcpu", v)?,
            // What the node's vCPU budget promises a vCPU: 1/overcommit of a CPU.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            _ => (1000.0 / overcommit.max(1.0)).ceil() as u64,
        };
        Ok(Sizing {
            base: Resources::parse(&base, "--launcher-resources")?,
            cpu_request_per_vcpu,
            cpu_limit_per_vcpu: cpu("--launcher-cpu-limit-per-vcpu", &f.cpu_limit_per_vcpu)?,
            memory_per_vm: parse_quantity(&f.memory_per_vm).ok_or_else(|| SizeError::Quantity {
                field: "--launcher-memory-per-vm".into(),
                value: f.memory_per_vm.clone(),
                kind: "memory",
            })?,
        })
    }

    /// The container's resources for `vms` VMs holding `vcpus` vCPUs and `memory` bytes of
    /// guest memory in all.
    pub fn for_guests(&self, vms: u64, vcpus: u64, memory: u64) -> Resources {
        let mem = memory.saturating_add(vms.saturating_mul(self.memory_per_vm));
        Resources {
            cpu_request: self
                .base
                .cpu_request
                .saturating_add(vcpus.saturating_mul(self.cpu_request_per_vcpu)),
            cpu_limit: self
                .base
                .cpu_limit
                .map(|b| b.saturating_add(vcpus.saturating_mul(self.cpu_limit_per_vcpu))),
            memory_request: self.base.memory_request.saturating_add(mem),
            memory_limit: self.base.memory_limit.map(|b| b.saturating_add(mem)),
        }
    }
}

/// Every VM's claim, and their sums (kept with them: O(1) per change).
#[derive(Debug, Default)]
struct Claims {
    per_vm: HashMap<VmKey, Claim>,
    vcpus: u64,
    memory: u64,
}

impl Claims {
    fn set(&mut self, key: &VmKey, claim: Option<Claim>) -> Option<Claim> {
        let before = match claim {
            Some(c) => self.per_vm.insert(key.clone(), c),
            None => self.per_vm.remove(key),
        };
        let (b, a) = (before.unwrap_or_default(), claim.unwrap_or_default());
        self.vcpus = self.vcpus - u64::from(b.vcpus) + u64::from(a.vcpus);
        self.memory = self.memory - b.memory + a.memory;
        before
    }
}

/// The kubelet's answer to a grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The container has room for the claim now.
    Applied,
    /// The node can never give it (`PodResizePending` reason Infeasible): the message.
    Infeasible(String),
    /// Not now (Deferred by the kubelet, a failed or slow resize, or an API error).
    Deferred(String),
}

/// Sizes this node's launcher container (one per agent).
pub struct LauncherSizer {
    pods: Api<Pod>,
    pod: String,
    container: String,
    sizing: Sizing,
    timeout: Duration,
    claims: Mutex<Claims>,
    /// The resources last written to the pod; patches are written one at a time.
    written: tokio::sync::Mutex<Option<Resources>>,
    changed: Notify,
}

impl LauncherSizer {
    /// A sizer of `container` in `pod` (in the API of `pods`); a grow waits at most `timeout`.
    pub fn new(
        pods: Api<Pod>,
        pod: String,
        container: String,
        sizing: Sizing,
        timeout: Duration,
    ) -> Self {
        LauncherSizer {
            pods,
            pod,
            container,
            sizing,
            timeout,
            claims: Mutex::default(),
            written: tokio::sync::Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// What the container should have for the claims now.
    pub fn desired(&self) -> Resources {
        let c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        self.sizing
            .for_guests(c.per_vm.len() as u64, c.vcpus, c.memory)
    }

    fn set(&self, key: &VmKey, claim: Option<Claim>) -> Option<Claim> {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(key, claim)
    }

    /// Record what `key` holds now, without waiting: a shrink, or what an adopted guest
    /// already has. The background [`LauncherSizer::run`] writes it.
    pub fn hold(&self, key: &VmKey, claim: Claim) {
        if self.set(key, Some(claim)) != Some(claim) {
            self.changed.notify_one();
        }
    }

    /// `key` left the node.
    pub fn release(&self, key: &VmKey) {
        if self.set(key, None).is_some() {
            self.changed.notify_one();
        }
    }

    /// Write the desired resources if they differ from what was written last.
    pub async fn sync(&self) -> Result<(), SizeError> {
        let mut written = self.written.lock().await;
        let want = self.desired();
        if *written != Some(want) {
            self.patch(&want).await?;
            *written = Some(want);
        }
        Ok(())
    }

    async fn patch(&self, want: &Resources) -> Result<Option<i64>, SizeError> {
        let body = want.resize_patch(&self.container);
        let pod = self
            .pods
            .patch_subresource(
                "resize",
                &self.pod,
                &PatchParams::default(),
                &Patch::Strategic(body),
            )
            .await
            .map_err(|source| SizeError::Api {
                pod: self.pod.clone(),
                source,
            })?;
        tracing::info!(pod = %self.pod, container = %self.container, ?want, "launcher container resized");
        Ok(pod.metadata.generation)
    }

    /// Grow the container for `key`'s new `claim` and wait until the kubelet applied it.
    /// Anything but [`Answer::Applied`] gives the claim back (the previous one stays).
    pub async fn grow(&self, key: &VmKey, claim: Claim) -> Answer {
        let before = self.set(key, Some(claim));
        let generation = {
            let mut written = self.written.lock().await;
            let want = self.desired();
            match self.patch(&want).await {
                Ok(g) => {
                    *written = Some(want);
                    g
                }
                Err(e) => {
                    drop(written);
                    return self
                        .give_back(key, before, Answer::Deferred(e.to_string()))
                        .await;
                }
            }
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            // Met when the container has what the claims want now (they may have grown or
            // shrunk beside this one meanwhile), or the kubelet said no to this patch.
            let answer = match self.pods.get(&self.pod).await {
                Ok(pod) => judge(&pod, &self.container, &self.desired(), generation),
                Err(e) => {
                    tracing::warn!(error = %e, pod = %self.pod, "cannot read the node-vmm pod");
                    None
                }
            };
            match answer {
                Some(Answer::Applied) => return Answer::Applied,
                Some(no) => return self.give_back(key, before, no).await,
                None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let msg = format!(
                    "the kubelet did not resize the launcher container of pod {} within {} s",
                    self.pod,
                    self.timeout.as_secs()
                );
                return self.give_back(key, before, Answer::Deferred(msg)).await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Restore `key`'s previous claim and write the pod back to what the others hold, so
    /// one refused grow does not hold up the next resize of the pod.
    async fn give_back(&self, key: &VmKey, before: Option<Claim>, answer: Answer) -> Answer {
        self.set(key, before);
        if let Err(e) = self.sync().await {
            tracing::warn!(error = %e, "cannot write the launcher container back");
            self.changed.notify_one();
        }
        answer
    }

    /// Write shrinks and adoptions as they come (coalesced), retrying failed writes.
    pub async fn run(&self) {
        loop {
            self.changed.notified().await;
            // Let a burst of changes (a node's guests adopted at once) become one write.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "cannot resize the launcher container; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }

    /// Ask for a write now (at start: a previous agent may have left the pod larger than
    /// the guests it finds).
    pub fn poke(&self) {
        self.changed.notify_one();
    }
}

/// The kubelet's verdict on a pod for `want`, `generation` being that of the resize
/// patch: None while it is still at work.
pub fn judge(
    pod: &Pod,
    container: &str,
    want: &Resources,
    generation: Option<i64>,
) -> Option<Answer> {
    let status = pod.status.as_ref()?;
    let ours = |observed: Option<i64>| match (observed, generation) {
        (Some(o), Some(g)) => o >= g,
        _ => true,
    };
    for c in status.conditions.iter().flatten() {
        if c.status != "True" || !ours(c.observed_generation) {
            continue;
        }
        let msg = c.message.clone().unwrap_or_default();
        let reason = c.reason.as_deref().unwrap_or_default();
        match (c.type_.as_str(), reason) {
            (POD_RESIZE_PENDING, "Infeasible") => return Some(Answer::Infeasible(msg)),
            (POD_RESIZE_PENDING, _) => return Some(Answer::Deferred(msg)),
            (POD_RESIZE_IN_PROGRESS, "Error") => return Some(Answer::Deferred(msg)),
            _ => {}
        }
    }
    let actual = status
        .container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == container)?
        .resources
        .as_ref()?;
    let actual = Resources::parse(actual, "status.containerStatuses[].resources").ok()?;
    actual.covers(want).then_some(Answer::Applied)
}

#[cfg(test)]
mod tests;
