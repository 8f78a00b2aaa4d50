//! One task per VM on this node: it owns the VM's guest handle, takes the latest spec
//! (level-triggered: bursts of writes coalesce, only the newest target matters), acts one
//! plan at a time, and reports only what it observed.

use super::decide::{self, Feasibility, SlotBook, Want};
use super::requester;
use super::Shared;
use crate::backend::{
    BackendError, Direction, Observation, ResizeOptions, ResizeReport, VmEvent, VmHandle, VmKey,
    VmSpec,
};
use chrono::{DateTime, Utc};
use corescale_api::conditions::{self as cond, set_condition};
use corescale_api::{
    planner, LastResize, Phase, Plan, ResizeResult, VcpuState, VcpuStatus, VirtualMachine,
    VirtualMachineStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Reason of the Running condition once the agent stopped a deleted VM's guest; the
/// operator removes the finalizer when it sees it.
pub const GUEST_STOPPED: &str = corescale_api::conditions::REASON_GUEST_STOPPED;
/// Field manager of the agent's status writes.
pub const MANAGER: &str = "node-vmm";
/// Condition types this agent owns in status (the operator owns Scheduled).
const OWNED: [&str; 4] = [
    cond::RUNNING,
    cond::READY,
    cond::RESIZE_PENDING,
    cond::RESIZE_IN_PROGRESS,
];
/// How often an idle running VM is observed again (drift, per-vCPU CPU time).
const IDLE_OBSERVE: Duration = Duration::from_secs(5);
/// How long an observation may be reused to plan a new target.
const FRESH_OBSERVATION: Duration = Duration::from_secs(2);
/// How long a guest may take to boot before the status says so.
const BOOT_WARN: Duration = Duration::from_secs(120);

/// Longest delay between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Reason of ResizeInProgress while nothing can be done but wait for the guest.
const REASON_WAITING: &str = "WaitingForGuest";

/// How a resize step ended.
enum Outcome<T> {
    /// The backend finished (every step succeeded or failed on its own).
    Done(T),
    /// The VMM exited or the guest stopped mid-step.
    Lost(Option<VmEvent>),
    /// A newer target arrived (its spec.cpus), or the VM is to be stopped (None).
    Superseded(Option<u32>),
}

/// What the loop waits for after a step.
enum Next {
    /// Only a spec change (or a VMM event).
    Change,
    /// A spec change, a VMM event, or this much time.
    After(Duration),
    /// A spec change, a VMM event, or freed budget.
    Budget,
    /// Run again now.
    Now,
    /// The worker is done (the guest is gone for good).
    Exit,
}

/// The per-VM worker.
pub struct Worker {
    key: VmKey,
    shared: Arc<Shared>,
    rx: watch::Receiver<Option<Arc<VirtualMachine>>>,
    handle: Option<Box<dyn VmHandle>>,
    started_at: Option<Instant>,
    book: SlotBook,
    overrides: BTreeMap<u32, VcpuState>,
    conds: Vec<Condition>,
    last_resize: Option<LastResize>,
    phase: Phase,
    guest_agent: bool,
    failures: u32,
    last_applied: Option<serde_json::Value>,
    last_event: Option<(String, String)>,
    cpu_seen: HashMap<u32, f64>,
    last_obs: Option<(Instant, Observation)>,
    max_vcpus: u32,
    seeded: bool,
}

impl Worker {
    /// A worker for `key`, possibly with a guest adopted after an agent restart.
    pub fn new(
        key: VmKey,
        shared: Arc<Shared>,
        rx: watch::Receiver<Option<Arc<VirtualMachine>>>,
        adopted: Option<Box<dyn VmHandle>>,
    ) -> Self {
        shared.metrics.register_vm(&key.namespace, &key.name);
        Worker {
            key,
            shared,
            rx,
            started_at: adopted.as_ref().map(|_| Instant::now()),
            handle: adopted,
            book: SlotBook::default(),
            overrides: BTreeMap::new(),
            conds: Vec::new(),
            last_resize: None,
            phase: Phase::Scheduled,
            guest_agent: false,
            failures: 0,
            last_applied: None,
            last_event: None,
            cpu_seen: HashMap::new(),
            last_obs: None,
            max_vcpus: 0,
            seeded: false,
        }
    }

    /// Run until the VM leaves this node.
    pub async fn run(mut self) {
        loop {
            let vm = self.rx.borrow_and_update().clone();
            if let Some(vm) = &vm {
                self.seed_from(vm);
            }
            let guest_uid = self.handle.as_ref().map(|h| h.spec().uid.clone());
            let next = match decide::want(vm.as_deref(), &self.shared.node, guest_uid.as_deref()) {
                Want::Gone if vm.is_some() => {
                    // The object was re-created under the same name: stop the old guest and
                    // start over as a fresh worker for the new object.
                    self.stop_guest("VM re-created with a new UID").await;
                    self.reset();
                    Next::Now
                }
                Want::Leave if self.handle.is_none() => {
                    // Labelled for this node, its placement status not written yet (the
                    // operator labels first): wait for it. The watch says when the labels
                    // go elsewhere. Exiting here could drop a status that arrives while
                    // the worker winds down.
                    Next::Change
                }
                Want::Gone | Want::Leave => {
                    self.stop_guest("VM left this node").await;
                    Next::Exit
                }
                Want::Delete => {
                    let vm = vm.expect("Delete implies an object");
                    self.delete(&vm).await
                }
                Want::Halt => {
                    let vm = vm.expect("Halt implies an object");
                    self.halt(&vm).await
                }
                Want::Run => {
                    let vm = vm.expect("Run implies an object");
                    self.run_step(&vm).await
                }
            };
            if !self.wait(next).await {
                break;
            }
        }
        self.shared.budget.release(&self.key);
        self.shared
            .metrics
            .forget_vm(&self.key.namespace, &self.key.name, self.max_vcpus);
        tracing::info!(vm = %self.key, "worker done");
    }

    /// Wait for what `next` asks; false when the worker should end.
    async fn wait(&mut self, next: Next) -> bool {
        let sleep = match next {
            Next::Exit => return false,
            Next::Now => return true,
            Next::After(d) => d,
            Next::Change | Next::Budget => Duration::from_secs(3600),
        };
        let budget = matches!(next, Next::Budget);
        enum Woke {
            Spec(bool),
            Vmm(Option<VmEvent>),
            Other,
        }
        let shared = self.shared.clone();
        let handle = &self.handle;
        let rx = &mut self.rx;
        let event = async {
            match handle {
                Some(h) => h.next_event().await,
                None => std::future::pending().await,
            }
        };
        let woke = tokio::select! {
            r = rx.changed() => Woke::Spec(r.is_ok()),
            ev = event => Woke::Vmm(ev),
            _ = shared.budget.freed(), if budget => Woke::Other,
            _ = tokio::time::sleep(sleep) => Woke::Other,
        };
        match woke {
            // The dispatcher dropped the sender: the agent is shutting down.
            Woke::Spec(alive) => alive,
            Woke::Vmm(ev) => {
                self.on_vmm_event(ev).await;
                true
            }
            Woke::Other => true,
        }
    }

    fn seed_from(&mut self, vm: &VirtualMachine) {
        self.max_vcpus = decide::topology_of(vm).max_vcpus();
        if self.seeded {
            return;
        }
        self.seeded = true;
        if let Some(st) = &vm.status {
            if st.node_name.as_deref() == Some(self.shared.node.as_str()) {
                self.book.seed(&st.vcpus);
                self.conds = st
                    .conditions
                    .iter()
                    .filter(|c| OWNED.contains(&c.type_.as_str()))
                    .cloned()
                    .collect();
                self.last_resize = st.last_resize.clone();
            }
        }
    }

    fn reset(&mut self) {
        self.handle = None;
        self.started_at = None;
        self.book = SlotBook::default();
        self.overrides.clear();
        self.conds.clear();
        self.last_resize = None;
        self.phase = Phase::Scheduled;
        self.failures = 0;
        self.last_applied = None;
        self.cpu_seen.clear();
        self.last_obs = None;
        self.seeded = false;
    }

    async fn on_vmm_event(&mut self, ev: Option<VmEvent>) {
        let what = match ev {
            Some(VmEvent::Exited { status }) => format!("the VMM exited (status {status:?})"),
            Some(VmEvent::GuestStopped) => "the guest powered off".to_string(),
            None => "the VMM connection closed".to_string(),
        };
        tracing::warn!(vm = %self.key, %what, "guest lost");
        if let Some(h) = self.handle.take() {
            let _ = h.stop(Duration::from_secs(1)).await;
        }
        let _ = self.shared.backend.cleanup(&self.key).await;
        self.started_at = None;
        self.book = SlotBook::default();
        self.overrides.clear();
        self.last_obs = None;
        self.failures += 1;
        self.shared
            .metrics
            .vmm_restarts
            .with_label_values(&[&self.key.namespace, &self.key.name])
            .inc();
        let now = Utc::now();
        set_condition(
            &mut self.conds,
            cond::RUNNING,
            false,
            "VmmExited",
            what.clone(),
            None,
            now,
        );
        set_condition(
            &mut self.conds,
            cond::READY,
            false,
            "VmmExited",
            what.clone(),
            None,
            now,
        );
        let vm = self.rx.borrow().clone();
        if let Some(vm) = vm {
            self.event(
                &vm,
                EventType::Warning,
                "VmmExited",
                format!("{what}; restarting per runStrategy"),
            )
            .await;
        }
        self.phase = Phase::Starting;
    }

    async fn stop_guest(&mut self, why: &str) {
        self.last_obs = None;
        if let Some(h) = self.handle.take() {
            // A guest that never finished booting cannot power itself off: do not wait.
            let grace = if h.guest_ready().await {
                self.shared.config.stop_grace
            } else {
                Duration::ZERO
            };
            tracing::info!(vm = %self.key, why, ?grace, "stopping guest");
            if let Err(e) = h.stop(grace).await {
                tracing::warn!(vm = %self.key, error = %e, "stop failed");
            }
        }
        if let Err(e) = self.shared.backend.cleanup(&self.key).await {
            tracing::warn!(vm = %self.key, error = %e, "cleanup failed");
        }
        self.shared.budget.release(&self.key);
    }

    /// The object is being deleted: stop the guest, then say so in status. The operator
    /// removes the finalizer when it sees the guest stopped; the agent never writes the
    /// VM object itself, only its status (least privilege: it cannot change a spec).
    async fn delete(&mut self, vm: &VirtualMachine) -> Next {
        let had_guest = self.handle.is_some();
        self.stop_guest("VM deleted").await;
        if had_guest {
            let note = "guest stopped: the VM is being deleted".to_string();
            self.event(vm, EventType::Normal, "Stopped", note).await;
        }
        self.phase = Phase::Stopped;
        self.book = SlotBook::default();
        let now = Utc::now();
        let g = vm.meta().generation;
        let msg = format!("guest stopped on {} for deletion", self.shared.node);
        set_condition(
            &mut self.conds,
            cond::RUNNING,
            false,
            GUEST_STOPPED,
            msg.clone(),
            g,
            now,
        );
        set_condition(
            &mut self.conds,
            cond::READY,
            false,
            GUEST_STOPPED,
            msg,
            g,
            now,
        );
        self.report(vm, None).await;
        if self.last_applied.is_none() {
            // The status did not reach the API server: try again, the guest stays stopped.
            return Next::After(Duration::from_secs(2));
        }
        Next::Exit
    }

    async fn halt(&mut self, vm: &VirtualMachine) -> Next {
        if self.handle.is_some() {
            self.stop_guest("runStrategy Halted").await;
            self.event(
                vm,
                EventType::Normal,
                "Stopped",
                "guest stopped: runStrategy is Halted".into(),
            )
            .await;
        }
        self.phase = Phase::Stopped;
        self.book = SlotBook::default();
        let now = Utc::now();
        let g = vm.meta().generation;
        set_condition(
            &mut self.conds,
            cond::RUNNING,
            false,
            "Halted",
            "runStrategy is Halted",
            g,
            now,
        );
        set_condition(
            &mut self.conds,
            cond::READY,
            false,
            "Halted",
            "runStrategy is Halted",
            g,
            now,
        );
        self.report(vm, None).await;
        Next::Change
    }

    /// Start, wait for boot, check feasibility, resize, report.
    async fn run_step(&mut self, vm: &VirtualMachine) -> Next {
        let now = Utc::now();
        let generation = vm.meta().generation;
        let topology = decide::topology_of(vm);
        if self.handle.is_none() {
            return self.start(vm).await;
        }
        let handle = self.handle.as_ref().expect("checked above");
        // Past the grace a silent agent no longer holds the VM back: it runs as a guest
        // without an agent (observations still ask for one, and pick it up when it answers).
        let waited = self.started_at.map(|t| t.elapsed()).unwrap_or_default();
        let past_grace = waited >= self.shared.config.agent_grace;
        if !past_grace && !handle.guest_ready().await {
            self.phase = Phase::Starting;
            let msg = if waited > BOOT_WARN {
                format!(
                    "the guest agent has not answered for {} s",
                    waited.as_secs()
                )
            } else {
                "waiting for the guest agent".to_string()
            };
            set_condition(
                &mut self.conds,
                cond::READY,
                false,
                "Booting",
                msg,
                generation,
                now,
            );
            if waited >= self.shared.config.in_progress_after {
                self.report(vm, None).await;
            }
            return Next::After(Duration::from_millis(100));
        }
        // A spec change right after an observation plans from it instead of asking the
        // guest again: that round trip would sit between the API write and the backend
        // call. The backend still checks every step against the VMM, and an idle VM is
        // observed afresh every few seconds.
        let (obs, seen) = match &self.last_obs {
            Some((t, o)) if t.elapsed() < FRESH_OBSERVATION => (o.clone(), *t),
            _ => match handle.observe().await {
                Ok(o) => (o, Instant::now()),
                Err(e) => return self.observe_failed(vm, e).await,
            },
        };
        // A reused observation keeps its own time: a loop that comes back within the
        // freshness window must not keep an old observation fresh for ever.
        self.absorb(&obs, seen, now);
        self.phase = Phase::Running;
        set_condition(
            &mut self.conds,
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
        budget.hold(&self.key, current);
        let pending = match feas {
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
        };
        if let Some((reason, type_, msg, next)) = pending {
            set_condition(
                &mut self.conds,
                cond::RESIZE_PENDING,
                true,
                reason,
                msg.clone(),
                generation,
                now,
            );
            self.set_ready(vm, &obs, now);
            self.event(vm, type_, reason, msg).await;
            self.report(vm, Some(&obs)).await;
            self.update_cpu_metrics().await;
            return next;
        }
        set_condition(
            &mut self.conds,
            cond::RESIZE_PENDING,
            false,
            "Fits",
            "",
            generation,
            now,
        );
        let plan = match decide::plan_for(vm, &self.book) {
            Ok(p) => p,
            Err(e) => {
                set_condition(
                    &mut self.conds,
                    cond::RESIZE_PENDING,
                    true,
                    cond::REASON_INFEASIBLE,
                    e.to_string(),
                    generation,
                    now,
                );
                self.report(vm, Some(&obs)).await;
                return Next::Change;
            }
        };
        if plan.is_empty() {
            self.set_ready(vm, &obs, now);
            // Nothing to do, but a slot the guest has not finished with (a plug a paused
            // guest never acknowledged) is no success: say which, and look again soon.
            let stuck = stuck_slots(&obs);
            if let Some(what) = &stuck {
                set_condition(
                    &mut self.conds,
                    cond::RESIZE_IN_PROGRESS,
                    true,
                    REASON_WAITING,
                    format!("waiting for the guest: {what}"),
                    generation,
                    now,
                );
            } else if self.failures == 0 || obs.online() == vm.spec.cpus {
                self.failures = 0;
                if cond::get_condition(&self.conds, cond::RESIZE_IN_PROGRESS)
                    .is_some_and(|c| c.status == "True")
                {
                    set_condition(
                        &mut self.conds,
                        cond::RESIZE_IN_PROGRESS,
                        false,
                        "Done",
                        "",
                        generation,
                        now,
                    );
                }
            }
            self.report(vm, Some(&obs)).await;
            // Per-vCPU CPU seconds cost a QMP round trip: read them when there is nothing
            // to do, never between a new target and the backend call.
            self.update_cpu_metrics().await;
            return if plan.shortfall > 0 || stuck.is_some() {
                Next::After(self.backoff())
            } else {
                Next::After(IDLE_OBSERVE)
            };
        }
        self.resize(vm, (&obs, seen), plan).await
    }

    async fn start(&mut self, vm: &VirtualMachine) -> Next {
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
            set_condition(
                &mut self.conds,
                cond::RESIZE_PENDING,
                true,
                reason,
                msg.clone(),
                generation,
                now,
            );
            set_condition(
                &mut self.conds,
                cond::RUNNING,
                false,
                reason,
                msg.clone(),
                generation,
                now,
            );
            self.phase = if reason == cond::REASON_INFEASIBLE {
                Phase::Failed
            } else {
                Phase::Scheduled
            };
            self.event(vm, EventType::Warning, reason, msg).await;
            self.report(vm, None).await;
            return if reason == cond::REASON_DEFERRED {
                Next::Budget
            } else {
                Next::Change
            };
        }
        let boot = boot.unwrap_or(1);
        let spec = match self.shared.vm_spec(vm, topology, boot) {
            Ok(s) => s,
            Err(e) => return self.start_failed(vm, e).await,
        };
        let restarted = self.failures > 0;
        match self.shared.backend.start(&spec).await {
            Ok(h) => {
                self.handle = Some(h);
                self.started_at = Some(Instant::now());
                self.phase = Phase::Starting;
                budget.hold(&self.key, boot);
                set_condition(
                    &mut self.conds,
                    cond::RUNNING,
                    true,
                    "Started",
                    format!("{} started the guest", self.shared.backend.name()),
                    generation,
                    now,
                );
                set_condition(
                    &mut self.conds,
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
                self.event(vm, EventType::Normal, reason, msg).await;
                // No status write yet: the boot loop writes Starting once the guest has
                // taken longer than `in_progress_after`, so a quick start is reported once,
                // Running (as a quick resize is).
                Next::Now
            }
            Err(e) => self.start_failed(vm, e).await,
        }
    }

    async fn start_failed(&mut self, vm: &VirtualMachine, e: BackendError) -> Next {
        let now = Utc::now();
        self.failures += 1;
        self.phase = Phase::Failed;
        let msg = e.to_string();
        set_condition(
            &mut self.conds,
            cond::RUNNING,
            false,
            "StartFailed",
            msg.clone(),
            vm.meta().generation,
            now,
        );
        self.event(vm, EventType::Warning, "StartFailed", msg).await;
        self.report(vm, None).await;
        Next::After(self.backoff())
    }

    async fn observe_failed(&mut self, vm: &VirtualMachine, e: BackendError) -> Next {
        tracing::warn!(vm = %self.key, error = %e, "cannot observe guest");
        let now = Utc::now();
        set_condition(
            &mut self.conds,
            cond::READY,
            false,
            "ObserveFailed",
            e.to_string(),
            vm.meta().generation,
            now,
        );
        self.report(vm, None).await;
        Next::After(Duration::from_secs(1))
    }

    /// Take an observation made at `seen` into the book (at wall-clock `now`).
    fn absorb(&mut self, obs: &Observation, seen: Instant, now: DateTime<Utc>) {
        self.last_obs = Some((seen, obs.clone()));
        self.guest_agent = obs.guest_agent;
        self.book.update(obs, &self.overrides, now);
    }

    fn set_ready(&mut self, vm: &VirtualMachine, obs: &Observation, now: DateTime<Utc>) {
        let online = obs.online();
        let g = vm.meta().generation;
        if online == vm.spec.cpus {
            let (reason, msg) = if obs.guest_agent {
                ("Ready", format!("{online} vCPUs online"))
            } else {
                (
                    cond::REASON_NO_GUEST_AGENT,
                    format!("{online} vCPUs present; no guest agent answers, so their online state in the guest is unknown"),
                )
            };
            set_condition(&mut self.conds, cond::READY, true, reason, msg, g, now);
        } else {
            let msg = format!("{online} of {} vCPUs online", vm.spec.cpus);
            set_condition(&mut self.conds, cond::READY, false, "Resizing", msg, g, now);
        }
    }

    /// Carry out `plan` from `before`, an observation made at `seen`.
    async fn resize(
        &mut self,
        vm: &VirtualMachine,
        (before, seen): (&Observation, Instant),
        plan: Plan,
    ) -> Next {
        let started = Utc::now();
        let t0 = Instant::now();
        let generation = vm.meta().generation;
        let from = before.online();
        let to = vm.spec.cpus;
        let shared = self.shared.clone();
        let budget = &shared.budget;
        budget.hold(&self.key, from.max(to));
        for &s in &plan.plug {
            self.overrides.insert(s, VcpuState::Plugging);
        }
        for &s in &plan.unplug {
            self.overrides.insert(s, VcpuState::Unplugging);
        }
        self.book.update(before, &self.overrides, started);
        let msg = format!("{from} -> {to} vCPUs");
        set_condition(
            &mut self.conds,
            cond::RESIZE_IN_PROGRESS,
            true,
            "Resizing",
            msg.clone(),
            generation,
            started,
        );
        self.last_resize = Some(LastResize {
            from,
            to,
            started_at: started,
            finished_at: None,
            seconds: None,
            applied_seconds: None,
            acked_seconds: None,
            online_seconds: None,
            result: ResizeResult::InProgress,
            message: None,
        });
        // Ready follows the target being acted on: not ready while the guest differs.
        self.set_ready(vm, before, started);
        let opts = ResizeOptions {
            unplug_timeout: Duration::from_secs(vm.spec.unplug_timeout_seconds.into()),
            plug_timeout: self.shared.config.plug_timeout,
        };
        // The in-progress status (slots Plugging/Unplugging, lastResize InProgress) goes
        // out while the backend acts, and only once the step has taken longer than
        // `in_progress_after`: the API round trip is never in the hot path, and a quick
        // step costs one status write, not two.
        let body = self.status_body(vm, Some(before));
        let in_progress_after = self.shared.config.in_progress_after;
        let api = self.api(vm);
        let pp = PatchParams::apply(MANAGER).force();
        let handle = self.handle.as_ref().expect("resize needs a guest");
        let name = vm.name_any();
        let patch = Patch::Apply(&body);
        // The VMM may die mid-step: then its events say so at once, while the step's
        // own calls could wait out their deadlines. Drop the step and handle the loss.
        // A newer target (or a deletion, a halt) does not wait for a guest that does not
        // answer either: the step is dropped and the new target planned from a fresh
        // observation. Dropping is safe at any await of a resize: the backend records a
        // plug or unplug before it asks the VMM, so a slot left mid-step is observed as
        // Plugging or Unplugging, and finished or retried later.
        let rx = &mut self.rx;
        let (node, guest_uid) = (&self.shared.node, handle.spec().uid.clone());
        let superseded = async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                let latest = rx.borrow().clone();
                let moved = latest.as_deref().is_none_or(|v| {
                    decide::want(Some(v), node, Some(&guest_uid)) != Want::Run || v.spec.cpus != to
                });
                if moved {
                    return latest.map(|v| v.spec.cpus);
                }
            }
        };
        let outcome = tokio::select! {
            done = async {
                let step = handle.resize(&plan, opts);
                tokio::pin!(step);
                tokio::select! {
                    biased;
                    report = &mut step => (None, report),
                    () = tokio::time::sleep(in_progress_after) => {
                        let (applied, report) =
                            tokio::join!(api.patch_status(&name, &pp, &patch), step);
                        (Some(applied), report)
                    }
                }
            } => Outcome::Done(done),
            ev = handle.next_event() => Outcome::Lost(ev),
            newer = superseded => Outcome::Superseded(newer),
        };
        let (applied, report) = match outcome {
            Outcome::Done(done) => done,
            Outcome::Lost(ev) => {
                self.last_applied = None;
                self.overrides.clear();
                self.on_vmm_event(ev).await;
                return Next::Now;
            }
            Outcome::Superseded(newer) => {
                let seconds = t0.elapsed().as_secs_f64();
                let why = match newer {
                    Some(n) => format!("superseded by a new target of {n} vCPUs"),
                    None => "superseded: the VM is being stopped".to_string(),
                };
                let msg = format!("{from} -> {to} vCPUs {why} after {seconds:.2} s; slots left mid-step are observed again");
                tracing::info!(vm = %self.key, %msg, "resize step abandoned");
                self.last_applied = None;
                self.overrides.clear();
                self.last_obs = None;
                let finished = Utc::now();
                self.last_resize = Some(LastResize {
                    from,
                    to,
                    started_at: started,
                    finished_at: Some(finished),
                    seconds: Some(seconds),
                    applied_seconds: None,
                    acked_seconds: None,
                    online_seconds: None,
                    result: ResizeResult::Failed,
                    message: Some(msg.clone()),
                });
                self.event(vm, EventType::Normal, "ResizeSuperseded", msg)
                    .await;
                return Next::Now;
            }
        };
        match applied {
            Some(Ok(_)) => self.last_applied = Some(body),
            Some(Err(e)) => {
                tracing::warn!(vm = %self.key, error = %e, "cannot apply status");
                self.last_applied = None;
            }
            // Not written: what was applied before still stands.
            None => {}
        }
        // A step that ended cleanly observed its own slots last: carry the observation
        // through it rather than ask the VMM and the guest again (a full observation costs
        // three round trips, in the latency a user waits for). The other slots keep the
        // time they were seen at, so the next full observation is not put off by it.
        let handle = self.handle.as_ref().expect("resize needs a guest");
        let (after, after_seen) = match before.after_steps(&report) {
            Some(o) => (Ok(o), seen),
            None => (handle.observe().await, Instant::now()),
        };
        let finished = Utc::now();
        let seconds = t0.elapsed().as_secs_f64();
        self.record_metrics(&report, seconds);

        // Slots whose step failed keep an honest state: a failed plug that the guest did
        // not get is Failed; a failed unplug that the guest still has stays Unplugging.
        self.overrides.clear();
        for step in report.steps.iter().filter(|s| s.error.is_some()) {
            let st = match step.direction {
                Direction::Plug => VcpuState::Failed,
                Direction::Unplug => VcpuState::Unplugging,
            };
            self.overrides.insert(step.slot, st);
        }
        let after = match after {
            Ok(o) => o,
            Err(e) => return self.observe_failed(vm, e).await,
        };
        // An Unplugging override only holds while the guest still has the vCPU.
        self.overrides.retain(|s, st| {
            *st != VcpuState::Unplugging
                || after
                    .slots
                    .get(usize::try_from(*s).unwrap_or(usize::MAX))
                    .is_some_and(|o| o.state.is_active())
        });
        self.absorb(&after, after_seen, finished);
        let online = after.online();
        budget.hold(&self.key, online.max(active(&after)));
        let phase_max = |f: fn(&crate::backend::StepReport) -> Option<Duration>| {
            report
                .steps
                .iter()
                .filter_map(f)
                .map(|d| d.as_secs_f64())
                .reduce(f64::max)
        };
        let err = report.first_error().cloned();
        let result = if err.is_none() && online == to {
            ResizeResult::Succeeded
        } else {
            ResizeResult::Failed
        };
        let message = match (&err, result) {
            (Some(e), _) => Some(e.to_string()),
            (None, ResizeResult::Failed) => {
                Some(format!("the guest has {online} vCPUs online, not {to}"))
            }
            _ => None,
        };
        self.last_resize = Some(LastResize {
            from,
            to,
            started_at: started,
            finished_at: Some(finished),
            seconds: Some(seconds),
            applied_seconds: phase_max(|s| s.applied),
            acked_seconds: phase_max(|s| s.acked),
            online_seconds: phase_max(|s| s.online),
            result,
            message: message.clone(),
        });
        self.set_ready(vm, &after, finished);
        // The status goes out before the Event: it is what autoscalers and `kubectl wait`
        // read, so the Event's round trip is not in its latency.
        let (next, event) = if result == ResizeResult::Succeeded {
            self.failures = 0;
            set_condition(
                &mut self.conds,
                cond::RESIZE_IN_PROGRESS,
                false,
                "Done",
                format!("{from} -> {online} vCPUs in {seconds:.2} s"),
                generation,
                finished,
            );
            let by = requester::cpus_requester(&vm.metadata)
                .map(|who| format!(", requested by {who}"))
                .unwrap_or_default();
            (
                Next::Now,
                (
                    EventType::Normal,
                    "Resized",
                    format!("{from} -> {online} vCPUs in {seconds:.2} s{by}"),
                ),
            )
        } else {
            self.failures += 1;
            let mut m = message.unwrap_or_default();
            if let Some(what) = stuck_slots(&after) {
                m.push_str(&format!("; {what}"));
            }
            m.push_str(&format!(
                "; attempt {}, next in {} s",
                self.failures,
                self.backoff().as_secs()
            ));
            set_condition(
                &mut self.conds,
                cond::RESIZE_IN_PROGRESS,
                true,
                cond::REASON_ERROR,
                m.clone(),
                generation,
                finished,
            );
            (
                Next::After(self.backoff()),
                (
                    EventType::Warning,
                    "ResizeFailed",
                    format!("{from} -> {to} vCPUs stopped at {online}: {m}"),
                ),
            )
        };
        self.report(vm, Some(&after)).await;
        let (type_, reason, note) = event;
        self.event(vm, type_, reason, note).await;
        next
    }

    fn record_metrics(&self, report: &ResizeReport, _seconds: f64) {
        let m = &self.shared.metrics;
        let (ns, name) = (self.key.namespace.as_str(), self.key.name.as_str());
        for s in &report.steps {
            let d = s.direction.as_str();
            let result = if s.error.is_some() {
                "failure"
            } else {
                "success"
            };
            m.hotplug_ops
                .with_label_values(&[ns, name, d, result])
                .inc();
            let phases = [
                ("applied", s.applied),
                ("acked", s.acked),
                ("online", s.online),
            ];
            for (p, v) in phases {
                if let Some(v) = v {
                    m.hotplug_seconds
                        .with_label_values(&[ns, name, d, p])
                        .observe(v.as_secs_f64());
                }
            }
            if s.error.is_none() {
                let total = s.online.or(s.acked).or(s.applied);
                if let Some(t) = total {
                    m.hotplug_seconds
                        .with_label_values(&[ns, name, d, "total"])
                        .observe(t.as_secs_f64());
                }
            }
        }
    }

    async fn update_cpu_metrics(&mut self) {
        let Some(h) = &self.handle else { return };
        let Ok(times) = h.vcpu_cpu_seconds().await else {
            return;
        };
        let m = &self.shared.metrics;
        let (ns, name) = (&self.key.namespace, &self.key.name);
        for (slot, secs) in times {
            let seen = self.cpu_seen.entry(slot).or_insert(0.0);
            // A re-plugged vCPU's new thread starts from zero: count from there.
            if secs > *seen {
                let ran = secs - *seen;
                m.vcpu_cpu_seconds
                    .with_label_values(&[ns, name, &slot.to_string()])
                    .inc_by(ran);
                m.vm_busy_seconds.with_label_values(&[ns, name]).inc_by(ran);
            }
            *seen = secs;
        }
    }

    fn backoff(&self) -> Duration {
        backoff_after(self.failures)
    }

    fn api(&self, vm: &VirtualMachine) -> Api<VirtualMachine> {
        Api::namespaced(
            self.shared.client.clone(),
            &vm.namespace().unwrap_or_default(),
        )
    }

    async fn event(&mut self, vm: &VirtualMachine, type_: EventType, reason: &str, note: String) {
        // Repeated identical decisions (a Deferred VM re-checked) make one Event, not many.
        let key = (reason.to_string(), note.clone());
        if self.last_event.as_ref() == Some(&key) {
            return;
        }
        self.last_event = Some(key);
        if let Err(e) = self
            .shared
            .recorder
            .note(&vm.object_ref(&()), type_, reason, note)
            .await
        {
            tracing::warn!(vm = %self.key, error = %e, reason, "cannot publish event");
        }
    }

    /// Build the status from what was observed and apply it (server-side apply, manager
    /// `node-vmm`), unless it equals what was applied last.
    async fn report(&mut self, vm: &VirtualMachine, obs: Option<&Observation>) {
        let body = self.status_body(vm, obs);
        if self.last_applied.as_ref() == Some(&body) {
            return;
        }
        let pp = PatchParams::apply(MANAGER).force();
        match self
            .api(vm)
            .patch_status(&vm.name_any(), &pp, &Patch::Apply(&body))
            .await
        {
            Ok(_) => self.last_applied = Some(body),
            Err(e) => {
                // The API server may be down: the guest is untouched, and the next step
                // applies the status again.
                tracing::warn!(vm = %self.key, error = %e, "cannot apply status");
                self.last_applied = None;
            }
        }
    }

    /// The server-side-apply body of the status, with the metrics gauges updated to match.
    fn status_body(&self, vm: &VirtualMachine, obs: Option<&Observation>) -> serde_json::Value {
        let status = self.status(vm, obs);
        self.export_gauges(vm, &status);
        corescale_api::status_apply_body(&status)
    }

    /// The status this agent owns, from the book (observed states) and the conditions.
    fn status(&self, vm: &VirtualMachine, obs: Option<&Observation>) -> VirtualMachineStatus {
        let topology = decide::topology_of(vm);
        let running = self.handle.is_some();
        // Only slots that are not Absent: the list (and so every status write and watch
        // event) grows with the vCPUs in use, not with maxCpus. A stopped guest has none.
        let vcpus: Vec<VcpuStatus> = corescale_api::planner::slots(&topology)
            .into_iter()
            .filter_map(|s| {
                let (state, since) = match self.book.slots.get(&s.index) {
                    Some((st, t)) if running && *st != VcpuState::Absent => (*st, *t),
                    _ => return None,
                };
                let guest_cpu = obs
                    .and_then(|o| o.slots.get(usize::try_from(s.index).ok()?))
                    .and_then(|o| o.guest_cpu);
                Some(VcpuStatus {
                    index: s.index,
                    socket: s.socket,
                    core: s.core,
                    thread: s.thread,
                    numa_node: s.numa_node(),
                    state,
                    since: Some(since),
                    guest_cpu,
                })
            })
            .collect();
        let cpus = obs.map(Observation::online).unwrap_or(0);
        let cpus = if running { Some(cpus) } else { Some(0) };
        VirtualMachineStatus {
            phase: Some(self.phase),
            cpus,
            vcpus,
            accelerator: running.then(|| self.shared.capacity.accel.as_str().to_string()),
            guest_agent: running.then(|| {
                if self.guest_agent {
                    "Connected"
                } else {
                    "Absent"
                }
                .to_string()
            }),
            conditions: self.conds.clone(),
            observed_generation: vm.meta().generation,
            last_resize: self.last_resize.clone(),
            ..Default::default()
        }
    }

    fn export_gauges(&self, vm: &VirtualMachine, status: &VirtualMachineStatus) {
        let m = &self.shared.metrics;
        let (ns, name) = (self.key.namespace.as_str(), self.key.name.as_str());
        let count = |st: VcpuState| {
            i64::try_from(status.vcpus.iter().filter(|v| v.state == st).count()).unwrap_or(i64::MAX)
        };
        // Present: in the guest, online or not; a vCPU being unplugged is still there.
        let present =
            count(VcpuState::Present) + count(VcpuState::Online) + count(VcpuState::Unplugging);
        let values = [
            ("desired", i64::from(vm.spec.cpus)),
            ("online", i64::from(status.cpus.unwrap_or(0))),
            ("present", present),
            ("plugging", count(VcpuState::Plugging)),
            ("unplugging", count(VcpuState::Unplugging)),
            ("max", i64::from(decide::topology_of(vm).max_vcpus())),
        ];
        for (state, v) in values {
            m.vcpus.with_label_values(&[ns, name, state]).set(v);
        }
        m.set_phase(ns, name, self.phase);
        for reason in crate::metrics::PENDING_REASONS {
            let on = cond::get_condition(&status.conditions, cond::RESIZE_PENDING)
                .is_some_and(|c| c.status == "True" && c.reason == reason);
            m.resize_pending
                .with_label_values(&[ns, name, reason])
                .set(i64::from(on));
        }
    }
}

/// The delay before the next attempt after `failures` failed ones in a row: 1 s, then
/// doubling, at most a minute; a spec change cuts it short.
fn backoff_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF)
}

/// What a slot the guest has not finished with is waiting for, e.g. "vCPU slot 1 is
/// Plugging (not acknowledged or onlined by the guest yet)", or None when no slot is.
fn stuck_slots(obs: &Observation) -> Option<String> {
    let of = |st: VcpuState| -> Vec<u32> {
        (0u32..)
            .zip(&obs.slots)
            .filter(|(_, o)| o.state == st)
            .map(|(i, _)| i)
            .collect()
    };
    let parts: Vec<String> = [
        (
            of(VcpuState::Plugging),
            "Plugging (not acknowledged or onlined by the guest yet)",
        ),
        (
            of(VcpuState::Unplugging),
            "Unplugging (not released by the guest yet)",
        ),
    ]
    .into_iter()
    .filter(|(slots, _)| !slots.is_empty())
    .map(|(slots, what)| match slots.as_slice() {
        [one] => format!("vCPU slot {one} is {what}"),
        many => format!("vCPU slots {many:?} are {what}"),
    })
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn active(obs: &Observation) -> u32 {
    u32::try_from(obs.slots.iter().filter(|s| s.state.is_active()).count()).unwrap_or(u32::MAX)
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
        BackendError::InvalidPlan(format!(
            "spec.memory {:?} is not a quantity",
            vm.spec.memory.0
        ))
    })?;
    Ok(VmSpec {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        uid: vm.uid().unwrap_or_default(),
        topology,
        granularity: vm.spec.granularity,
        placement: vm.spec.placement,
        boot_vcpus,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let secs: Vec<u64> = (0..10).map(|f| backoff_after(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(backoff_after(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn stuck_slots_names_each_slot_and_why() {
        let obs = |states: &[VcpuState]| Observation::of_states(states, false);
        use VcpuState::*;
        assert_eq!(stuck_slots(&obs(&[Online, Present, Absent])), None);
        assert_eq!(
            stuck_slots(&obs(&[Online, Plugging, Unplugging, Unplugging])).unwrap(),
            "vCPU slot 1 is Plugging (not acknowledged or onlined by the guest yet), vCPU slots [2, 3] are Unplugging (not released by the guest yet)"
        );
    }
}
