//! One task per VM on this node: it owns the VM's guest handle, takes the latest spec
//! (level-triggered: bursts of writes coalesce, only the newest target matters), acts one
//! plan at a time, and reports only what it observed.
//!
//! This file holds the worker's state and its loop: what the VM wants next, the steps that
//! stop a guest, and the wait between steps. A step that runs the guest is in `step`, a
//! resize in `resize`; the status they report is built in `status` (pure) and written in
//! `report`; the metrics they update are in `metrics`.

mod metrics;
mod report;
mod resize;
mod status;
mod step;
mod wake;

use super::decide::{self, SlotBook, Want};
use super::Shared;
use crate::backend::{Observation, VmEvent, VmHandle, VmKey};
use corescale_api::conditions as cond;
use corescale_api::{LastResize, Phase, VcpuState, VirtualMachine, VirtualMachineStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::EventType;
use kube::Resource;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub use step::vm_spec_of;

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
/// Longest delay between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
    /// Done once the step's status reached the API server; until then, run again in 2 s
    /// (the guest stays stopped).
    ExitOnceReported,
}

/// What a step leaves for its end, done by [`Worker::finish`] in this order: one status
/// write, then an Event that must not delay it, then the per-vCPU CPU seconds (a QMP round
/// trip, never between a new target and the backend call). Events that must reach the API
/// server before the status (the status is what readers wait on) the step publishes itself.
struct Step {
    next: Next,
    /// Write the status at the end of the step.
    report: bool,
    /// The observation the status is built from (None: slots from the book, 0 online).
    obs: Option<Observation>,
    /// Published after the status write.
    then_event: Option<(EventType, &'static str, String)>,
    /// Read the per-vCPU CPU seconds after the status write.
    cpu_metrics: bool,
}

impl Step {
    /// No status write.
    fn quiet(next: Next) -> Self {
        Step {
            next,
            report: false,
            obs: None,
            then_event: None,
            cpu_metrics: false,
        }
    }

    /// A status write without an observation.
    fn report(next: Next) -> Self {
        Step {
            report: true,
            ..Step::quiet(next)
        }
    }

    /// A status write from `obs`.
    fn observed(next: Next, obs: Observation) -> Self {
        Step {
            obs: Some(obs),
            ..Step::report(next)
        }
    }

    /// An Event published after the status write.
    fn then_event(self, type_: EventType, reason: &'static str, note: String) -> Self {
        Step {
            then_event: Some((type_, reason, note)),
            ..self
        }
    }

    /// The per-vCPU CPU seconds read after the status write.
    fn then_cpu_metrics(self) -> Self {
        Step {
            cpu_metrics: true,
            ..self
        }
    }
}

/// The running VMM and what the worker knows of it: all of it goes when the guest goes
/// (lost, stopped, or its object re-created).
struct Vmm {
    handle: Box<dyn VmHandle>,
    /// When it was started (or adopted).
    started_at: Instant,
    /// Per-slot states and since when, merged from each observation.
    book: SlotBook,
    /// The last observation and when it was made (reused to plan a target set right after).
    last_obs: Option<(Instant, Observation)>,
    /// What the guest agent last said of the guest, and when it was asked.
    info: Option<corescale_api::GuestInfo>,
    info_at: Option<Instant>,
}

impl Vmm {
    fn new(handle: Box<dyn VmHandle>, book: SlotBook) -> Self {
        Vmm {
            handle,
            started_at: Instant::now(),
            book,
            last_obs: None,
            info: None,
            info_at: None,
        }
    }
}

/// What the worker knows of the VM object it serves (one UID): dropped whole when the
/// object is re-created under the same name, and the worker starts over.
struct GuestState {
    /// The running guest, if any.
    vmm: Option<Vmm>,
    /// Slot states from the object's status, for a guest not running yet (after an agent
    /// restart: plug order survives).
    seed: SlotBook,
    /// Whether `seed` (or the adopted guest's book) was taken from the status already.
    seeded: bool,
    /// States that win over observations while acting (Plugging, Unplugging) and after a
    /// failed step (Failed, Unplugging).
    overrides: BTreeMap<u32, VcpuState>,
    /// The conditions this agent owns.
    conds: Vec<Condition>,
    last_resize: Option<LastResize>,
    phase: Phase,
    /// Failed attempts in a row (starts, resizes, VMM losses): the backoff.
    failures: u32,
    /// A VMM of this guest exited (not by the guest's reboot) since its last start: the
    /// next start is a restart (`VmmRestarted`), where a start that failed before the
    /// guest ever ran is not.
    lost: bool,
    /// The status last applied, None when the last write failed. Compared as the typed
    /// status: each idle observation (every 5 s per guest) builds one, and most are
    /// unchanged, so the JSON body is made only for a write.
    last_applied: Option<VirtualMachineStatus>,
    /// Per-vCPU CPU seconds last read, by slot.
    cpu_seen: HashMap<u32, f64>,
    /// The forwarded ports of the guest's last start: a restart takes them again while
    /// they are free (status may have dropped them by then).
    ports: Vec<crate::backend::workload::PortForward>,
}

impl GuestState {
    fn new(vmm: Option<Vmm>) -> Self {
        GuestState {
            vmm,
            seed: SlotBook::default(),
            seeded: false,
            overrides: BTreeMap::new(),
            conds: Vec::new(),
            last_resize: None,
            phase: Phase::Scheduled,
            failures: 0,
            lost: false,
            last_applied: None,
            cpu_seen: HashMap::new(),
            ports: Vec::new(),
        }
    }
}

/// The per-VM worker.
pub struct Worker {
    key: VmKey,
    shared: Arc<Shared>,
    rx: watch::Receiver<Option<Arc<VirtualMachine>>>,
    g: GuestState,
    /// Whether the guest agent answered the last observation. It outlives a guest: a new
    /// guest's status says what the last one's agent did until its first observation.
    guest_agent: bool,
    /// The last Event published, (object UID, reason, note): an identical one about the
    /// same object is not published again.
    last_event: Option<(String, String, String)>,
    /// The VM's vCPU slots, to forget its per-vCPU series when the worker ends.
    max_vcpus: u32,
    /// The per-VM gauges as last set (set again only when they change).
    exported: std::sync::Mutex<Option<metrics::Gauges>>,
    /// What the current step acted on, of the object.
    seen: Option<Relevant>,
}

/// What of a VM object the worker acts on: a change in anything else (a status write of
/// its own, the operator's conditions) does not wake it.
#[derive(Debug, Clone, PartialEq)]
struct Relevant {
    uid: Option<String>,
    spec: corescale_api::VirtualMachineSpec,
    deleting: bool,
    /// The placement the operator writes in status.
    node: Option<String>,
    topology: Option<corescale_api::Topology>,
}

impl Relevant {
    fn of(vm: Option<&VirtualMachine>) -> Option<Self> {
        vm.map(|vm| Relevant {
            uid: vm.metadata.uid.clone(),
            spec: vm.spec.clone(),
            deleting: vm.metadata.deletion_timestamp.is_some(),
            node: vm.status.as_ref().and_then(|s| s.node_name.clone()),
            topology: vm.status.as_ref().and_then(|s| s.topology),
        })
    }
}

impl Worker {
    /// A worker for `key`, possibly with a guest adopted after an agent restart.
    pub fn new(
        key: VmKey,
        shared: Arc<Shared>,
        rx: watch::Receiver<Option<Arc<VirtualMachine>>>,
        adopted: Option<Box<dyn VmHandle>>,
    ) -> Self {
        Worker {
            key,
            shared,
            rx,
            g: GuestState::new(adopted.map(|h| Vmm::new(h, SlotBook::default()))),
            guest_agent: false,
            last_event: None,
            max_vcpus: 0,
            exported: std::sync::Mutex::new(None),
            seen: None,
        }
    }

    /// Run until the VM leaves this node.
    pub async fn run(mut self) {
        loop {
            let vm = self.rx.borrow_and_update().clone();
            self.seen = Relevant::of(vm.as_deref());
            if let Some(vm) = &vm {
                self.seed_from(vm);
            }
            let guest_uid = self.g.vmm.as_ref().map(|v| v.handle.spec().uid.clone());
            let step = match decide::want(vm.as_deref(), &self.shared.node, guest_uid.as_deref()) {
                Want::Gone if vm.is_some() => {
                    // The object was re-created under the same name: stop the old guest and
                    // start over as a fresh worker for the new object.
                    self.stop_guest("VM re-created with a new UID").await;
                    self.remove_disks().await;
                    self.g = GuestState::new(None);
                    Step::quiet(Next::Now)
                }
                Want::Leave if self.g.vmm.is_none() => {
                    // Labelled for this node, its placement status not written yet (the
                    // operator labels first): wait for it. The watch says when the labels
                    // go elsewhere. Exiting here could drop a status that arrives while
                    // the worker winds down.
                    Step::quiet(Next::Change)
                }
                Want::Gone | Want::Leave => {
                    self.stop_guest("VM left this node").await;
                    self.remove_disks().await;
                    Step::quiet(Next::Exit)
                }
                Want::Delete => {
                    let vm = vm.as_deref().expect("Delete implies an object");
                    self.delete(vm).await
                }
                Want::Halt => {
                    let vm = vm.as_deref().expect("Halt implies an object");
                    self.halt(vm).await
                }
                Want::Run => {
                    let vm = vm.as_deref().expect("Run implies an object");
                    self.run_step(vm).await
                }
            };
            let next = self.finish(vm.as_deref(), step).await;
            if !self.wait(next).await {
                break;
            }
        }
        self.shared.release(&self.key);
        self.forget_metrics();
        tracing::info!("worker done");
    }

    /// The end of a step: its status write, what follows it, and what to wait for.
    async fn finish(&mut self, vm: Option<&VirtualMachine>, step: Step) -> Next {
        if let (true, Some(vm)) = (step.report, vm) {
            self.report(vm, step.obs.as_ref()).await;
        }
        if let (Some((type_, reason, note)), Some(vm)) = (step.then_event, vm) {
            self.event(vm, type_, reason, note).await;
        }
        if step.cpu_metrics {
            self.update_cpu_metrics().await;
        }
        step.next
    }

    /// Wait for what `next` asks; false when the worker should end.
    async fn wait(&mut self, next: Next) -> bool {
        let sleep = match next {
            Next::Exit => return false,
            Next::ExitOnceReported if self.g.last_applied.is_some() => return false,
            // The status did not reach the API server: try again, the guest stays stopped.
            Next::ExitOnceReported => Duration::from_secs(2),
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
        // The pending VMM event borrows the guest: it is dropped before acting on what woke.
        let woke = {
            let shared = self.shared.clone();
            let vmm = &self.g.vmm;
            let rx = &mut self.rx;
            let seen = &self.seen;
            let event = async {
                match vmm {
                    Some(v) => v.handle.next_event().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(event);
            let deadline = wake::deadline(tokio::time::Instant::now(), sleep);
            loop {
                let woke = tokio::select! {
                    r = rx.changed() => Woke::Spec(r.is_ok()),
                    ev = &mut event => Woke::Vmm(ev),
                    _ = shared.budget.freed(), if budget => Woke::Other,
                    _ = tokio::time::sleep_until(deadline) => Woke::Other,
                };
                // The object changed in nothing the worker acts on (its own status write
                // coming back, the operator's conditions): keep waiting. Waking on those cut
                // every backoff short (a failing resize retried at once, again and again) and
                // ran a step for each status write.
                if matches!(woke, Woke::Spec(true))
                    && Relevant::of(rx.borrow_and_update().as_deref()) == *seen
                {
                    continue;
                }
                break woke;
            }
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
        if self.max_vcpus == 0 {
            // The VM's series, labelled with its (immutable) resize method, once.
            let (ns, name) = (&self.key.namespace, &self.key.name);
            let method = vm.spec.resize_method;
            self.shared.metrics.register_vm(ns, name, method);
        }
        self.max_vcpus = decide::topology_of(vm).max_vcpus();
        if self.g.seeded {
            return;
        }
        self.g.seeded = true;
        if let Some(st) = &vm.status {
            if st.node_name.as_deref() == Some(self.shared.node.as_str()) {
                match &mut self.g.vmm {
                    Some(v) => v.book.seed(&st.vcpus),
                    None => self.g.seed.seed(&st.vcpus),
                }
                self.g.conds = st
                    .conditions
                    .iter()
                    .filter(|c| OWNED.contains(&c.type_.as_str()))
                    .cloned()
                    .collect();
                self.g.last_resize = st.last_resize.clone();
            }
        }
    }

    async fn on_vmm_event(&mut self, ev: Option<VmEvent>) {
        let reboot = matches!(ev, Some(VmEvent::GuestStopped { reset: true }));
        let what = match ev {
            Some(VmEvent::Exited { status }) => format!("the VMM exited (status {status:?})"),
            Some(VmEvent::GuestStopped { reset: false }) => "the guest powered off".to_string(),
            Some(VmEvent::GuestStopped { reset: true }) => "the guest rebooted".to_string(),
            None => "the VMM connection closed".to_string(),
        };
        tracing::warn!(%what, "guest lost");
        if let Some(v) = self.g.vmm.take() {
            let _ = v.handle.stop(Duration::from_secs(1)).await;
        }
        // The console's last lines say why (a kernel panic, a failed mount), before the
        // cleanup removes serial.log.
        let console = (!reboot)
            .then(|| self.shared.backend.console_tail(&self.key))
            .flatten();
        let _ = self.shared.backend.cleanup(&self.key).await;
        self.g.overrides.clear();
        // A reboot is the guest's own doing, not a failure: no backoff grows from it.
        if !reboot {
            self.g.failures += 1;
            self.g.lost = true;
        }
        self.count_vmm_restart();
        status::set_stopped(
            &mut self.g.conds,
            "VmmExited",
            &what,
            None,
            chrono::Utc::now(),
        );
        let vm = self.rx.borrow().clone();
        if let Some(vm) = vm {
            let (type_, reason, msg) = if reboot {
                (
                    EventType::Normal,
                    "Rebooted",
                    "the guest rebooted: its VMM ends with the reset (QEMU runs with -no-reboot) and starts again, with the same disks".to_string(),
                )
            } else {
                let console = console
                    .map(|c| format!("; console: {c}"))
                    .unwrap_or_default();
                (
                    EventType::Warning,
                    "VmmExited",
                    format!("{what}; restarting per runStrategy{console}"),
                )
            };
            self.event(&vm, type_, reason, msg).await;
        }
        self.g.phase = Phase::Starting;
    }

    async fn stop_guest(&mut self, why: &str) {
        if let Some(v) = self.g.vmm.take() {
            // A guest that never finished booting cannot power itself off: do not wait.
            let grace = if v.handle.guest_ready().await {
                self.shared.config.stop_grace
            } else {
                Duration::ZERO
            };
            tracing::info!(why, ?grace, "stopping guest");
            if let Err(e) = v.handle.stop(grace).await {
                tracing::warn!(error = %e, "stop failed");
            }
        }
        if let Err(e) = self.shared.backend.cleanup(&self.key).await {
            tracing::warn!(error = %e, "cleanup failed");
        }
        self.shared.release(&self.key);
    }

    /// The VM is gone from this node (deleted, moved, re-created): its node-local disks go.
    async fn remove_disks(&mut self) {
        if let Err(e) = self.shared.backend.remove_disks(&self.key).await {
            tracing::warn!(error = %e, "cannot remove the guest's disks");
        }
    }

    /// The object is being deleted: stop the guest, then say so in status. The operator
    /// removes the finalizer when it sees the guest stopped; the agent never writes the
    /// VM object itself, only its status (least privilege: it cannot change a spec).
    async fn delete(&mut self, vm: &VirtualMachine) -> Step {
        let had_guest = self.g.vmm.is_some();
        self.stop_guest("VM deleted").await;
        self.remove_disks().await;
        if had_guest {
            let note = "guest stopped: the VM is being deleted".to_string();
            self.event(vm, EventType::Normal, "Stopped", note).await;
        }
        self.g.phase = Phase::Stopped;
        self.g.seed = SlotBook::default();
        let msg = format!("guest stopped on {} for deletion", self.shared.node);
        let g = vm.meta().generation;
        status::set_stopped(
            &mut self.g.conds,
            GUEST_STOPPED,
            &msg,
            g,
            chrono::Utc::now(),
        );
        Step::report(Next::ExitOnceReported)
    }

    async fn halt(&mut self, vm: &VirtualMachine) -> Step {
        if self.g.vmm.is_some() {
            self.stop_guest("runStrategy Halted").await;
            self.event(
                vm,
                EventType::Normal,
                "Stopped",
                "guest stopped: runStrategy is Halted".into(),
            )
            .await;
        }
        self.g.phase = Phase::Stopped;
        self.g.seed = SlotBook::default();
        let g = vm.meta().generation;
        let msg = "runStrategy is Halted";
        status::set_stopped(&mut self.g.conds, "Halted", msg, g, chrono::Utc::now());
        Step::report(Next::Change)
    }

    fn backoff(&self) -> Duration {
        backoff_after(self.g.failures)
    }
}

/// The delay before the next attempt after `failures` failed ones in a row: 1 s, then
/// doubling, at most a minute; a spec change cuts it short.
fn backoff_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF)
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
}
