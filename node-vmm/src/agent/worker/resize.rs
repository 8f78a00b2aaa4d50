//! A resize step, in three parts: begin (mark the slots acted on and the resize in
//! progress, in memory), act (the backend plugs and unplugs, raced against the loss of the
//! VMM and a newer target; the in-progress status goes out only if it takes long), and
//! conclude (what the guest now has, `lastResize`, conditions, the status, then the
//! `Resized` or `ResizeFailed` Event).

use super::status::{self, active, stuck_slots};
use super::step::{kubelet_refusal, KUBELET_RETRY};
use super::{Next, Step, Worker, MANAGER};
use crate::agent::decide::{self, Want};
use crate::agent::requester;
use crate::backend::{Direction, Observation, ResizeOptions, ResizeReport, VmEvent};
use chrono::Utc;
use corescale_api::conditions::{self as cond, set_condition};
use corescale_api::{LastResize, Plan, VcpuState, VirtualMachine};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::time::{Duration, Instant};

/// A resize under way: what it set out to do, and when it began.
struct Begun {
    from: u32,
    to: u32,
    generation: Option<i64>,
    t0: Instant,
    /// `lastResize` while it is in progress.
    last_resize: LastResize,
}

/// How the backend's part of a resize ended.
enum Acted {
    /// The backend finished (every step succeeded or failed on its own); `applied` is the
    /// in-progress status write, if the step took long enough to make one.
    Done {
        applied: Option<kube::Result<()>>,
        report: ResizeReport,
    },
    /// The VMM exited or the guest stopped mid-step.
    Lost(Option<VmEvent>),
    /// A newer target arrived (its spec.cpus), or the VM is to be stopped (None).
    Superseded(Option<u32>),
}

impl Worker {
    /// Carry out `plan` from `before`, an observation made at `seen`.
    pub(super) async fn resize(
        &mut self,
        vm: &VirtualMachine,
        (before, seen): (&Observation, Instant),
        plan: Plan,
    ) -> Step {
        // The launcher container grows for the new vCPUs before they are plugged.
        if vm.spec.cpus > before.online() {
            let answer = self.shared.grow(&self.key, vm, vm.spec.cpus).await;
            if let Some((reason, msg)) = kubelet_refusal(answer) {
                return self.refused_by_kubelet(vm, before, reason, msg).await;
            }
        }
        let begun = self.begin(vm, before, &plan);
        // The status while in progress (slots Plugging/Unplugging, lastResize InProgress).
        let status = self.status_now(vm, Some(before));
        let body = corescale_api::status_apply_body(&status);
        match self.act(vm, &begun, &plan, &body).await {
            Acted::Done { applied, report } => {
                match applied {
                    Some(Ok(_)) => self.g.last_applied = Some(status),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot apply status");
                        self.g.last_applied = None;
                    }
                    // Not written: what was applied before still stands.
                    None => {}
                }
                self.conclude(vm, &begun, (before, seen), &report).await
            }
            Acted::Lost(ev) => {
                self.g.last_applied = None;
                self.g.overrides.clear();
                self.on_vmm_event(ev).await;
                Step::quiet(Next::Now)
            }
            Acted::Superseded(newer) => self.superseded(vm, &begun, newer).await,
        }
    }

    /// A grow the kubelet refused: `ResizePending` with its message, the guest untouched;
    /// tried again after [`KUBELET_RETRY`] when Deferred, on a spec change when Infeasible.
    async fn refused_by_kubelet(
        &mut self,
        vm: &VirtualMachine,
        before: &Observation,
        reason: &'static str,
        msg: String,
    ) -> Step {
        self.mark_pending(vm, before, (reason, EventType::Warning, msg), Utc::now())
            .await;
        let next = if reason == cond::REASON_DEFERRED {
            Next::After(KUBELET_RETRY)
        } else {
            Next::Change
        };
        Step::observed(next, before.clone())
    }

    /// Mark the slots of `plan` Plugging or Unplugging and the resize in progress.
    fn begin(&mut self, vm: &VirtualMachine, before: &Observation, plan: &Plan) -> Begun {
        let started = Utc::now();
        let t0 = Instant::now();
        let generation = vm.meta().generation;
        let from = before.online();
        let to = vm.spec.cpus;
        self.shared.hold(&self.key, vm, from.max(to));
        for s in plan.plug_slots() {
            self.g.overrides.insert(s, VcpuState::Plugging);
        }
        for s in plan.unplug_slots() {
            self.g.overrides.insert(s, VcpuState::Unplugging);
        }
        let vmm = self.g.vmm.as_mut().expect("resize needs a guest");
        vmm.book.update(before, &self.g.overrides, started);
        set_condition(
            &mut self.g.conds,
            cond::RESIZE_IN_PROGRESS,
            true,
            "Resizing",
            format!("{from} -> {to} vCPUs"),
            generation,
            started,
        );
        let last_resize = status::resize_in_progress(from, to, started);
        self.g.last_resize = Some(last_resize.clone());
        // Ready follows the target being acted on: not ready while the guest differs.
        self.set_ready(vm, before, started);
        Begun {
            from,
            to,
            generation,
            t0,
            last_resize,
        }
    }

    /// The backend carries out `plan`; `body` (the in-progress status) is written if it
    /// takes longer than `in_progress_after`.
    async fn act(
        &mut self,
        vm: &VirtualMachine,
        begun: &Begun,
        plan: &Plan,
        body: &serde_json::Value,
    ) -> Acted {
        let opts = ResizeOptions {
            unplug_timeout: Duration::from_secs(vm.spec.unplug_timeout_seconds.into()),
            plug_timeout: self.shared.config.plug_timeout,
        };
        // The in-progress status goes out while the backend acts, and only once the step
        // has taken longer than `in_progress_after`: the API round trip is never in the
        // hot path, and a quick step costs one status write, not two.
        let in_progress_after = self.shared.config.in_progress_after;
        let api = self.api(vm);
        let pp = PatchParams::apply(MANAGER).force();
        let handle = &self.g.vmm.as_ref().expect("resize needs a guest").handle;
        let name = vm.name_any();
        let patch = Patch::Apply(body);
        let writes = &self.shared.writes;
        // The VMM may die mid-step: then its events say so at once, while the step's
        // own calls could wait out their deadlines. Drop the step and handle the loss.
        // A newer target (or a deletion, a halt) does not wait for a guest that does not
        // answer either: the step is dropped and the new target planned from a fresh
        // observation. Dropping is safe at any await of a resize: the backend records a
        // plug or unplug before it asks the VMM, so a slot left mid-step is observed as
        // Plugging or Unplugging, and finished or retried later.
        let rx = &mut self.rx;
        let (node, guest_uid) = (&self.shared.node, handle.spec().uid.clone());
        let to = begun.to;
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
        tokio::select! {
            (applied, report) = async {
                let step = handle.resize(plan, opts);
                tokio::pin!(step);
                tokio::select! {
                    biased;
                    report = &mut step => (None, report),
                    () = tokio::time::sleep(in_progress_after) => {
                        let (applied, report) =
                            tokio::join!(writes.send(api.patch_status(&name, &pp, &patch)), step);
                        (Some(applied.map(|_| ())), report)
                    }
                }
            } => Acted::Done { applied, report },
            ev = handle.next_event() => Acted::Lost(ev),
            newer = superseded => Acted::Superseded(newer),
        }
    }

    /// A newer target (or a stop) came mid-step: the step is given up, and its slots are
    /// observed afresh by the next step.
    async fn superseded(&mut self, vm: &VirtualMachine, begun: &Begun, newer: Option<u32>) -> Step {
        let (from, to) = (begun.from, begun.to);
        let seconds = begun.t0.elapsed().as_secs_f64();
        let why = match newer {
            Some(n) => format!("superseded by a new target of {n} vCPUs"),
            None => "superseded: the VM is being stopped".to_string(),
        };
        let msg = format!("{from} -> {to} vCPUs {why} after {seconds:.2} s; slots left mid-step are observed again");
        tracing::info!(%msg, "resize step abandoned");
        self.g.last_applied = None;
        self.g.overrides.clear();
        if let Some(v) = &mut self.g.vmm {
            v.last_obs = None;
        }
        let finished = Utc::now();
        self.g.last_resize = Some(status::resize_abandoned(
            &begun.last_resize,
            finished,
            seconds,
            msg.clone(),
        ));
        self.event(vm, EventType::Normal, "ResizeSuperseded", msg)
            .await;
        Step::quiet(Next::Now)
    }

    /// The backend finished: take in what the guest now has, and report the status, then
    /// the Resized (or ResizeFailed) Event.
    async fn conclude(
        &mut self,
        vm: &VirtualMachine,
        begun: &Begun,
        (before, seen): (&Observation, Instant),
        report: &ResizeReport,
    ) -> Step {
        let (from, to, generation) = (begun.from, begun.to, begun.generation);
        // A step that ended cleanly observed its own slots last: carry the observation
        // through it rather than ask the VMM and the guest again (a full observation costs
        // three round trips, in the latency a user waits for). The other slots keep the
        // time they were seen at, so the next full observation is not put off by it.
        let handle = &self.g.vmm.as_ref().expect("resize needs a guest").handle;
        let (after, after_seen) = match before.after_steps(report) {
            Some(o) => (Ok(o), seen),
            None => (handle.observe().await, Instant::now()),
        };
        let finished = Utc::now();
        let seconds = begun.t0.elapsed().as_secs_f64();
        self.record_metrics(vm, report);

        // Slots whose step failed keep an honest state: a failed plug that the guest did
        // not get is Failed; a failed unplug that the guest still has stays Unplugging.
        self.g.overrides.clear();
        for step in report.steps.iter().filter(|s| s.error.is_some()) {
            let st = match step.direction {
                Direction::Plug => VcpuState::Failed,
                Direction::Unplug => VcpuState::Unplugging,
            };
            self.g.overrides.insert(step.slot, st);
        }
        let after = match after {
            Ok(o) => o,
            Err(e) => return self.observe_failed(vm, e),
        };
        // An Unplugging override only holds while the guest still has the vCPU.
        self.g.overrides.retain(|s, st| {
            *st != VcpuState::Unplugging
                || after
                    .slots
                    .get(usize::try_from(*s).unwrap_or(usize::MAX))
                    .is_some_and(|o| o.state.is_active())
        });
        self.absorb(&after, after_seen, finished);
        let online = after.online();
        self.shared.hold(&self.key, vm, online.max(active(&after)));
        let last = status::resize_finished(&begun.last_resize, finished, seconds, report, online);
        let (succeeded, message) = (
            last.result == corescale_api::ResizeResult::Succeeded,
            last.message.clone(),
        );
        self.g.last_resize = Some(last);
        self.set_ready(vm, &after, finished);
        // The status goes out before the Event (see `Step`): it is what autoscalers and
        // `kubectl wait` read, so the Event's round trip is not in its latency.
        if succeeded {
            self.g.failures = 0;
            let msg = format!("{from} -> {online} vCPUs in {seconds:.2} s");
            set_condition(
                &mut self.g.conds,
                cond::RESIZE_IN_PROGRESS,
                false,
                "Done",
                msg.clone(),
                generation,
                finished,
            );
            // The Resized Event names who asked for the new spec.cpus, when it is known.
            let by = requester::cpus_requester(&vm.metadata)
                .map(|who| format!(", requested by {who}"))
                .unwrap_or_default();
            Step::observed(Next::Now, after).then_event(
                EventType::Normal,
                "Resized",
                format!("{msg}{by}"),
            )
        } else {
            self.g.failures += 1;
            let mut m = message.unwrap_or_default();
            if let Some(what) = stuck_slots(&after) {
                m.push_str(&format!("; {what}"));
            }
            m.push_str(&format!(
                "; attempt {}, next in {} s",
                self.g.failures,
                self.backoff().as_secs()
            ));
            set_condition(
                &mut self.g.conds,
                cond::RESIZE_IN_PROGRESS,
                true,
                cond::REASON_ERROR,
                m.clone(),
                generation,
                finished,
            );
            let note = format!("{from} -> {to} vCPUs stopped at {online}: {m}");
            Step::observed(Next::After(self.backoff()), after).then_event(
                EventType::Warning,
                "ResizeFailed",
                note,
            )
        }
    }
}
