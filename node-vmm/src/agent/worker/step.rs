//! A step of a VM that should run: start the guest, wait for it to boot, observe it, check
//! that the target fits the node, and plan; a plan with work in it goes to `resize`.

use super::status::{self, active, stuck_slots};
use super::{Next, Step, Vmm, Worker};
use crate::agent::decide::{self, Feasibility};
use crate::agent::launcher_size::Answer;
use crate::agent::workload;
use crate::backend::{BackendError, Observation, VmSpec};
use chrono::{DateTime, Utc};
use corescale_api::conditions::{self as cond, set_condition};
use corescale_api::{planner, Phase, VirtualMachine};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::time::{Duration, Instant};

/// How soon a boot or resize the kubelet deferred is tried again (no event tells the agent
/// that the node has room now).
pub(super) const KUBELET_RETRY: Duration = Duration::from_secs(5);

/// The ResizePending reason and message for a launcher-container grow the kubelet refused.
pub(super) fn kubelet_refusal(answer: Answer) -> Option<(&'static str, String)> {
    let said =
        |m: String| format!("the kubelet cannot give the launcher container room for this VM: {m}");
    match answer {
        Answer::Applied => None,
        Answer::Infeasible(m) => Some((cond::REASON_INFEASIBLE, said(m))),
        Answer::Deferred(m) => Some((cond::REASON_DEFERRED, said(m))),
    }
}

/// How often an idle running VM is observed again (drift, per-vCPU CPU time).
const IDLE_OBSERVE: Duration = Duration::from_secs(5);
/// How long an observation may be reused to plan a new target.
const FRESH_OBSERVATION: Duration = Duration::from_secs(2);
/// How often what the guest agent says of the guest (OS, host name, addresses) is asked.
const GUEST_INFO_EVERY: Duration = Duration::from_secs(30);
/// For this long after a guest starts, it is asked every 5 s.
const GUEST_INFO_EARLY: Duration = Duration::from_secs(180);
/// Reason of ResizeInProgress while nothing can be done but wait for the guest.
const REASON_WAITING: &str = "WaitingForGuest";

impl Worker {
    /// Start, wait for boot, check feasibility, resize, report.
    pub(super) async fn run_step(&mut self, vm: &VirtualMachine) -> Step {
        let now = Utc::now();
        let generation = vm.meta().generation;
        let topology = decide::topology_of(vm);
        let Some(vmm) = &self.g.vmm else {
            return self.start(vm).await;
        };
        // Past the grace a silent agent no longer holds the VM back: it runs as a guest
        // without an agent (observations still ask for one, and pick it up when it answers).
        let waited = vmm.started_at.elapsed();
        let past_grace = waited >= self.shared.config.agent_grace;
        if !past_grace && !vmm.handle.guest_ready().await {
            self.g.phase = Phase::Starting;
            let msg = status::booting_message(waited);
            set_condition(
                &mut self.g.conds,
                cond::READY,
                false,
                "Booting",
                msg,
                generation,
                now,
            );
            let next = Next::After(Duration::from_millis(100));
            return if waited >= self.shared.config.in_progress_after {
                Step::report(next)
            } else {
                Step::quiet(next)
            };
        }
        // A spec change right after an observation plans from it instead of asking the
        // guest again: that round trip would sit between the API write and the backend
        // call. The backend still checks every step against the VMM, and an idle VM is
        // observed afresh every few seconds.
        let (obs, seen) = match &vmm.last_obs {
            Some((t, o)) if t.elapsed() < FRESH_OBSERVATION => (o.clone(), *t),
            _ => match vmm.handle.observe().await {
                Ok(o) => (o, Instant::now()),
                Err(e) => return self.observe_failed(vm, e),
            },
        };
        // A reused observation keeps its own time: a loop that comes back within the
        // freshness window must not keep an old observation fresh for ever.
        self.absorb(&obs, seen, now);
        if let Some(v) = self.g.vmm.as_mut() {
            // Early in a guest's life its host name and addresses are still being set
            // (cloud-init, DHCP): ask more often then.
            let every = if v.started_at.elapsed() < GUEST_INFO_EARLY {
                GUEST_INFO_EVERY / 6
            } else {
                GUEST_INFO_EVERY
            };
            let due = v.info_at.is_none_or(|t| t.elapsed() >= every);
            if obs.guest_agent && due {
                v.info_at = Some(Instant::now());
                if let Some(i) = v.handle.guest_info().await {
                    v.info = Some(i);
                }
            }
        }
        self.g.phase = Phase::Running;
        set_condition(
            &mut self.g.conds,
            cond::RUNNING,
            true,
            "Running",
            "the VMM runs the guest",
            generation,
            now,
        );

        let current = obs.online().max(active(&obs));
        let budget = &self.shared.budget;
        let feas = decide::feasibility(
            &vm.spec,
            &topology,
            &self.shared.capacity,
            budget.total(),
            budget.held_by_others(&self.key),
            current,
        );
        self.shared.hold(&self.key, vm, current);
        let blocked = decide::method_blocks(&vm.spec, obs.guest_agent, current);
        let pending = match (blocked, feas) {
            // Looked at again with each observation: an agent that starts late unblocks it.
            (Some(msg), _) => Some((
                cond::REASON_INFEASIBLE,
                EventType::Warning,
                msg,
                Next::After(IDLE_OBSERVE),
            )),
            (None, feas) => match feas {
                Feasibility::Infeasible(msg) => Some((
                    cond::REASON_INFEASIBLE,
                    EventType::Warning,
                    msg,
                    Next::Change,
                )),
                Feasibility::Deferred(msg) => {
                    Some((cond::REASON_DEFERRED, EventType::Normal, msg, Next::Budget))
                }
                Feasibility::Fits => None,
            },
        };
        if let Some((reason, type_, msg, next)) = pending {
            self.mark_pending(vm, &obs, (reason, type_, msg), now).await;
            return Step::observed(next, obs).then_cpu_metrics();
        }
        set_condition(
            &mut self.g.conds,
            cond::RESIZE_PENDING,
            false,
            "Fits",
            "",
            generation,
            now,
        );
        let book = &self.g.vmm.as_ref().expect("checked above").book;
        let plan = match decide::plan_for(vm, book) {
            Ok(p) => p,
            Err(e) => {
                set_condition(
                    &mut self.g.conds,
                    cond::RESIZE_PENDING,
                    true,
                    cond::REASON_INFEASIBLE,
                    e.to_string(),
                    generation,
                    now,
                );
                return Step::observed(Next::Change, obs);
            }
        };
        if plan.is_empty() {
            self.set_ready(vm, &obs, now);
            // Nothing to do, but a slot the guest has not finished with (a plug a paused
            // guest never acknowledged) is no success: say which, and look again soon.
            let stuck = stuck_slots(&obs);
            if let Some(what) = &stuck {
                set_condition(
                    &mut self.g.conds,
                    cond::RESIZE_IN_PROGRESS,
                    true,
                    REASON_WAITING,
                    format!("waiting for the guest: {what}"),
                    generation,
                    now,
                );
            } else if self.g.failures == 0 || obs.online() == vm.spec.cpus {
                self.g.failures = 0;
                if cond::get_condition(&self.g.conds, cond::RESIZE_IN_PROGRESS)
                    .is_some_and(|c| c.status == "True")
                {
                    set_condition(
                        &mut self.g.conds,
                        cond::RESIZE_IN_PROGRESS,
                        false,
                        "Done",
                        "",
                        generation,
                        now,
                    );
                }
            }
            let next = if plan.shortfall > 0 || stuck.is_some() {
                Next::After(self.backoff())
            } else {
                Next::After(IDLE_OBSERVE)
            };
            // Per-vCPU CPU seconds cost a QMP round trip: read them when there is nothing
            // to do, never between a new target and the backend call.
            return Step::observed(next, obs).then_cpu_metrics();
        }
        self.resize(vm, (&obs, seen), plan).await
    }

    async fn start(&mut self, vm: &VirtualMachine) -> Step {
        let now = Utc::now();
        let generation = vm.meta().generation;
        let topology = decide::topology_of(vm);
        let budget = &self.shared.budget;
        let boot = planner::boot_vcpus(
            &topology,
            vm.spec.granularity,
            vm.spec.placement,
            vm.spec.cpus,
        );
        let feas = decide::feasibility(
            &vm.spec,
            &topology,
            &self.shared.capacity,
            budget.total(),
            budget.held_by_others(&self.key),
            0,
        );
        let reason_msg = match (&feas, &boot) {
            (Feasibility::Infeasible(m), _) => Some((cond::REASON_INFEASIBLE, m.clone())),
            (_, Err(e)) => Some((cond::REASON_INFEASIBLE, e.to_string())),
            (Feasibility::Deferred(m), _) => Some((cond::REASON_DEFERRED, m.clone())),
            (Feasibility::Fits, Ok(_)) => None,
        };
        if let Some((reason, msg)) = reason_msg {
            // Budget freed by another VM may make room.
            return self.not_started(vm, reason, msg, Next::Budget).await;
        }
        let boot = boot.unwrap_or(1);
        let spec = match self.shared.vm_spec(vm, topology, boot) {
            Ok(s) => s,
            Err(e) => return self.start_failed(vm, e).await,
        };
        let spec = match self.with_workload(vm, spec).await {
            Ok(s) => s,
            Err(e) => return self.start_failed(vm, e).await,
        };
        // The launcher container grows for the guest before it boots.
        if let Some((reason, msg)) = kubelet_refusal(self.shared.grow(&self.key, vm, boot).await) {
            return self
                .not_started(vm, reason, msg, Next::After(KUBELET_RETRY))
                .await;
        }
        let restarted = self.g.lost;
        match self.shared.backend.start(&spec).await {
            Ok(h) => {
                self.g.lost = false;
                // The slots a previous status recorded (after an agent restart) seed the
                // new guest's book.
                let seed = std::mem::take(&mut self.g.seed);
                self.g.vmm = Some(Vmm::new(h, seed));
                self.g.ports.clone_from(&spec.ports);
                self.g.phase = Phase::Starting;
                self.shared.hold(&self.key, vm, boot);
                set_condition(
                    &mut self.g.conds,
                    cond::RUNNING,
                    true,
                    "Started",
                    format!("{} started the guest", self.shared.backend.name()),
                    generation,
                    now,
                );
                set_condition(
                    &mut self.g.conds,
                    cond::RESIZE_PENDING,
                    false,
                    "Fits",
                    "",
                    generation,
                    now,
                );
                let (reason, what) = if restarted {
                    ("VmmRestarted", "restarted")
                } else {
                    ("Started", "started")
                };
                let msg = format!(
                    "guest {what} on {} with {boot} of {} vCPUs ({})",
                    self.shared.node,
                    topology.max_vcpus(),
                    spec.accel.as_str()
                );
                let ports: Vec<String> = spec
                    .ports
                    .iter()
                    .map(|p| format!("{} {}:{}", p.name, p.host_ip, p.host_port))
                    .collect();
                let msg = if ports.is_empty() {
                    msg
                } else {
                    format!("{msg}; ports {}", ports.join(", "))
                };
                self.event(vm, EventType::Normal, reason, msg).await;
                let behind = workload::disks_left_behind(vm, &self.shared.node);
                if !spec.disks.is_empty() && !behind.is_empty() {
                    let msg = format!(
                        "node-local disks do not follow a VM: their data stays on {}, and {} starts the guest with fresh disks",
                        behind.join(", "),
                        self.shared.node
                    );
                    self.event(vm, EventType::Warning, "DisksReset", msg).await;
                }
                // No status write yet: the boot loop writes Starting once the guest has
                // taken longer than `in_progress_after`, so a quick start is reported once,
                // Running (as a quick resize is).
                Step::quiet(Next::Now)
            }
            Err(e) => {
                self.shared.release(&self.key);
                self.start_failed(vm, e).await
            }
        }
    }

    /// The target waits: `ResizePending` True with `reason`, Ready as `obs` says, and the
    /// Event (before the status: who waits for ResizePending finds it).
    pub(super) async fn mark_pending(
        &mut self,
        vm: &VirtualMachine,
        obs: &Observation,
        (reason, type_, msg): (&'static str, EventType, String),
        now: DateTime<Utc>,
    ) {
        set_condition(
            &mut self.g.conds,
            cond::RESIZE_PENDING,
            true,
            reason,
            msg.clone(),
            vm.meta().generation,
            now,
        );
        self.set_ready(vm, obs, now);
        self.event(vm, type_, reason, msg).await;
    }

    /// The guest is not started: `ResizePending` and `Running` False with `reason`, the
    /// Event, then wait for `next` (Deferred) or a spec change (Infeasible).
    async fn not_started(
        &mut self,
        vm: &VirtualMachine,
        reason: &'static str,
        msg: String,
        next: Next,
    ) -> Step {
        let (now, generation) = (Utc::now(), vm.meta().generation);
        for (c, status) in [(cond::RESIZE_PENDING, true), (cond::RUNNING, false)] {
            set_condition(
                &mut self.g.conds,
                c,
                status,
                reason,
                msg.clone(),
                generation,
                now,
            );
        }
        self.g.phase = if reason == cond::REASON_INFEASIBLE {
            Phase::Failed
        } else {
            Phase::Scheduled
        };
        self.event(vm, EventType::Warning, reason, msg).await;
        Step::report(if reason == cond::REASON_DEFERRED {
            next
        } else {
            Next::Change
        })
    }

    /// The spec's disks, cloud-init seed and ports, resolved on this node.
    async fn with_workload(
        &self,
        vm: &VirtualMachine,
        mut spec: VmSpec,
    ) -> Result<VmSpec, BackendError> {
        spec.disks = workload::disks_of(&self.shared, vm)?;
        spec.seed = workload::seed_of(&self.shared, vm).await?;
        spec.ports = workload::ports_of(&self.shared, vm, &self.g.ports)?;
        Ok(spec)
    }

    async fn start_failed(&mut self, vm: &VirtualMachine, e: BackendError) -> Step {
        let now = Utc::now();
        self.g.failures += 1;
        self.g.phase = Phase::Failed;
        let msg = e.to_string();
        set_condition(
            &mut self.g.conds,
            cond::RUNNING,
            false,
            "StartFailed",
            msg.clone(),
            vm.meta().generation,
            now,
        );
        self.event(vm, EventType::Warning, "StartFailed", msg).await;
        Step::report(Next::After(self.backoff()))
    }

    pub(super) fn observe_failed(&mut self, vm: &VirtualMachine, e: BackendError) -> Step {
        tracing::warn!(error = %e, "cannot observe guest");
        let now = Utc::now();
        set_condition(
            &mut self.g.conds,
            cond::READY,
            false,
            "ObserveFailed",
            e.to_string(),
            vm.meta().generation,
            now,
        );
        Step::report(Next::After(Duration::from_secs(1)))
    }

    /// Take an observation made at `seen` into the book (at wall-clock `now`).
    pub(super) fn absorb(&mut self, obs: &Observation, seen: Instant, now: DateTime<Utc>) {
        let vmm = self.g.vmm.as_mut().expect("an observation needs a guest");
        vmm.last_obs = Some((seen, obs.clone()));
        self.guest_agent = obs.guest_agent;
        vmm.book.update(obs, &self.g.overrides, now);
    }

    /// Ready follows the target: true once the guest has spec.cpus.
    pub(super) fn set_ready(&mut self, vm: &VirtualMachine, obs: &Observation, now: DateTime<Utc>) {
        let (ready, reason, msg) = status::ready(vm, obs);
        let g = vm.meta().generation;
        set_condition(&mut self.g.conds, cond::READY, ready, reason, msg, g, now);
    }
}

/// Build the backend's start request for a VM.
pub fn vm_spec_of(
    vm: &VirtualMachine,
    topology: corescale_api::Topology,
    boot_vcpus: u32,
    accel: crate::backend::Accel,
    kernel: std::path::PathBuf,
    initrd: Option<std::path::PathBuf>,
) -> Result<VmSpec, BackendError> {
    let bytes = corescale_api::validate::parse_quantity(&vm.spec.memory.0).ok_or_else(|| {
        BackendError::InvalidSpec {
            field: "spec.memory",
            message: format!("{:?} is not a quantity of bytes", vm.spec.memory.0),
        }
    })?;
    Ok(VmSpec {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        uid: vm.uid().unwrap_or_default(),
        topology,
        granularity: vm.spec.granularity,
        placement: vm.spec.placement,
        boot_vcpus,
        resize_method: vm.spec.resize_method,
        memory_mib: bytes / (1 << 20),
        arch: vm.spec.effective_arch(),
        kernel,
        initrd,
        cmdline: vm
            .spec
            .boot
            .as_ref()
            .and_then(|b| b.cmdline.clone())
            .unwrap_or_default(),
        accel,
        disks: Vec::new(),
        seed: None,
        ports: Vec::new(),
    })
}
