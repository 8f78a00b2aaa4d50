//! Parked vCPUs: how a TCG guest goes up and down for ever.
//!
//! Under multi-threaded TCG one QEMU process can create at most `maxcpus` vCPU threads in
//! its life (QEMU gives each a TCG context it never takes back), so plugging and removing
//! vCPUs would stop working after a few cycles. An unplug under TCG removes the vCPU only
//! while the process could still create a thread for every vCPU that step removes (so the
//! VM can always come back to the size it had); past that, when the guest's agent answers,
//! it parks the vCPU instead: the agent offlines it in the guest and QEMU keeps it (the slot is reported `Offline`, costing the host nothing: an offline vCPU's
//! thread sleeps); a later plug of that slot onlines it again, in one agent round trip and
//! with no new thread. A guest without an agent cannot offline a vCPU on request, so its
//! unplugs remove the vCPU as under KVM. Under KVM nothing is parked.
//!
//! `spec.resizeMethod: GuestOnline` is this mechanism as the only one, under any
//! accelerator: every slot is present from boot, unused ones parked, and a resize parks
//! and unparks ([`QemuVm::guest_online_plan`]); nothing is ever removed or added.

use super::resize::left;
use super::vm::{Ops, QemuVm};
use crate::backend::{
    Accel, BackendError, Cause, Direction, ResizeOptions, StepReport, GUEST_ONLINE_NEEDS_AGENT,
};
use crate::secs;
use corescale_api::{Plan, ResizeMethod};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl QemuVm {
    /// Whether an unplug that brings this step's removals to `removing` vCPUs parks them:
    /// TCG, an agent that has answered, and too little thread budget left to plug that
    /// many back.
    pub(super) fn parks(&self, ops: &Ops, removing: u32) -> bool {
        let left = self
            .spec
            .topology
            .max_vcpus()
            .saturating_sub(ops.st.vcpu_threads_created);
        self.spec.accel == Accel::Tcg && self.ready.load(Ordering::Relaxed) && left < removing
    }

    /// A resize under GuestOnline: the plan's unplugs are parked (offlined in the guest, one
    /// agent call) and its plugs unparked (onlined, one agent call). Without an agent that
    /// answers nothing can be done, and every step says so.
    pub(super) async fn guest_online_plan(
        &self,
        ops: &mut Ops,
        plan: &Plan,
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        debug_assert_eq!(self.spec.resize_method, ResizeMethod::GuestOnline);
        let fail = |slots: &[u32], d: Direction, e: &BackendError| {
            let mut steps = Self::steps(slots, d);
            for st in &mut steps {
                st.error = Some(e.clone());
            }
            steps
        };
        let (unplug, plug) = (plan.unplug_slots(), plan.plug_slots());
        let fail_all = |e: BackendError| {
            let mut steps = fail(&unplug, Direction::Unplug, &e);
            steps.extend(fail(&plug, Direction::Plug, &e));
            steps
        };
        if !self.has_agent(ops).await {
            return fail_all(BackendError::GuestAgent(Cause::msg(
                GUEST_ONLINE_NEEDS_AGENT,
            )));
        }
        // Every slot is present: map every guest CPU to its slot first when the map does
        // not cover the plan's slots yet (an adopted handle starts with an empty map).
        let acted = unplug.iter().chain(&plug);
        if acted.clone().any(|&s| ops.map.slot_logical(s).is_none()) {
            let present: Vec<u32> = (0..self.spec.topology.max_vcpus()).collect();
            let budget = self.cfg.agent_timeout.max(Duration::from_secs(5));
            if let Err(e) = self.agent_view(ops, &present, budget).await {
                return fail_all(Self::qga_err(e));
            }
            if let Some(s) = acted.clone().find(|&&s| ops.map.slot_logical(s).is_none()) {
                return fail_all(BackendError::GuestAgent(Cause::msg(format!(
                    "the guest lists no CPU for vCPU slot {s}: is the guest's kernel the one booted with every slot present?"
                ))));
            }
        }
        let mut steps = Vec::new();
        if !unplug.is_empty() {
            match self.park(ops, &unplug, opts).await {
                Some(s) => steps.extend(s),
                None => steps.extend(fail(
                    &unplug,
                    Direction::Unplug,
                    &BackendError::GuestAgent(Cause::msg(format!(
                        "the guest agent could not offline vCPU slots {:?} (guest-set-vcpus refused; see the node's log); they stay online",
                        unplug
                    ))),
                )),
            }
        }
        if !plug.is_empty() {
            steps.extend(self.unpark(ops, &plug, opts).await);
        }
        steps
    }

    /// Park every slot of `unit` (a whole batch): offline each through the agent and wait until the guest
    /// lists it offline. `None` when the unit cannot be parked (a slot without a known
    /// guest CPU, slot 0, or an agent that refuses): the caller removes it instead.
    pub(super) async fn park(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        opts: &ResizeOptions,
    ) -> Option<Vec<StepReport>> {
        if unit.contains(&0) {
            return None;
        }
        let logical: Vec<u32> = unit
            .iter()
            .map(|&s| ops.map.slot_logical(s))
            .collect::<Option<Vec<u32>>>()?;
        let t0 = Instant::now();
        let deadline = t0 + opts.unplug_timeout;
        // Recorded parked before the guest is asked: a resize dropped after the guest
        // offlined them must not leave present, offline vCPUs that status calls Present.
        // A slot recorded parked that the guest still has online is taken back by the
        // next observation (which trusts the guest), so erring this way is safe.
        ops.st.parked.extend(unit.iter().copied());
        self.persist(&ops.st);
        let changes: Vec<(u32, bool)> = logical.iter().map(|&l| (l, false)).collect();
        let done = match ops.qga.set_vcpus(&changes, left(deadline)).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(vm = %self.key, error = %e, "cannot offline through the agent");
                for s in unit {
                    ops.st.parked.remove(s);
                }
                self.persist(&ops.st);
                return None;
            }
        };
        let applied = t0.elapsed();
        let mut steps = Self::steps(unit, Direction::Unplug);
        let confirmed = self
            .confirm_online_state(ops, (unit[0], &logical), (false, done), (t0, deadline))
            .await;
        for (st, &slot) in steps.iter_mut().zip(unit) {
            st.applied = Some(applied);
            match &confirmed {
                Ok(at) => {
                    st.acked = Some(*at - t0);
                    st.kept_offline = true;
                    ops.st.plugging.remove(&slot);
                    ops.st.unplugging.remove(&slot);
                }
                // Left recorded parked: observation keeps those the guest has offline and
                // takes back those it still has online.
                Err(e) => st.error = Some(e.clone()),
            }
        }
        self.persist(&ops.st);
        Some(steps)
    }

    /// Bring the parked slots of `unit` back: online each through the agent and wait until
    /// the guest lists it online.
    pub(super) async fn unpark(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        let t0 = Instant::now();
        let deadline = t0 + opts.plug_timeout;
        let mut steps = Self::steps(unit, Direction::Plug);
        let fail = |steps: &mut Vec<StepReport>, e: BackendError| {
            for st in steps.iter_mut() {
                st.error = Some(e.clone());
            }
        };
        let Some(logical) = unit
            .iter()
            .map(|&s| ops.map.slot_logical(s))
            .collect::<Option<Vec<u32>>>()
        else {
            fail(
                &mut steps,
                BackendError::GuestAgent(Cause::msg(format!(
                    "parked vCPU slots {unit:?} have no known guest CPU: observe the VM first"
                ))),
            );
            return steps;
        };
        let changes: Vec<(u32, bool)> = logical.iter().map(|&l| (l, true)).collect();
        let done = match ops.qga.set_vcpus(&changes, left(deadline)).await {
            Ok(n) => n,
            Err(e) => {
                fail(&mut steps, Self::qga_err(e));
                return steps;
            }
        };
        let applied = t0.elapsed();
        let confirmed = self
            .confirm_online_state(ops, (unit[0], &logical), (true, done), (t0, deadline))
            .await;
        for ((st, &slot), &l) in steps.iter_mut().zip(unit).zip(&logical) {
            st.applied = Some(applied);
            match &confirmed {
                Ok(at) => {
                    st.acked = Some(*at - t0);
                    st.online = Some(*at - t0);
                    st.guest_cpu = Some(l);
                    ops.st.parked.remove(&slot);
                }
                Err(e) => st.error = Some(e.clone()),
            }
        }
        self.persist(&ops.st);
        steps
    }

    /// When every CPU of `logical` was `online` (or offline), given that `guest-set-vcpus`
    /// reported `done` of them changed. The agent writes each CPU's sysfs `online` file,
    /// and that write returns once the kernel has brought the CPU up (or down), so all of
    /// them done is the guest's own confirmation: no second round trip (`guest-get-vcpus`
    /// reads every present CPU's file, which under GuestOnline is every slot). Otherwise
    /// the agent is polled.
    async fn confirm_online_state(
        &self,
        ops: &mut Ops,
        (slot, logical): (u32, &[u32]),
        (online, done): (bool, u32),
        times: (Instant, Instant),
    ) -> Result<Instant, BackendError> {
        if usize::try_from(done).is_ok_and(|d| d == logical.len()) {
            return Ok(Instant::now());
        }
        self.wait_online_state(ops, (slot, logical), online, times)
            .await
    }

    /// Poll the agent until every CPU of `logical` is `online` (or offline); when it was.
    /// A timeout names the step's whole time, from `t0`.
    /// `guest-set-vcpus` stops at the first CPU it cannot change, so the rest is asked
    /// again while waiting.
    async fn wait_online_state(
        &self,
        ops: &mut Ops,
        (slot, logical): (u32, &[u32]),
        online: bool,
        (t0, deadline): (Instant, Instant),
    ) -> Result<Instant, BackendError> {
        let want: BTreeSet<u32> = logical.iter().copied().collect();
        loop {
            let vcpus = ops
                .qga
                .get_vcpus(left(deadline))
                .await
                .map_err(Self::qga_err)?;
            let wrong: Vec<u32> = vcpus
                .iter()
                .filter(|v| want.contains(&v.logical_id) && v.online != online)
                .map(|v| v.logical_id)
                .collect();
            if wrong.is_empty() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout {
                    what: if online {
                        "bring online"
                    } else {
                        "take offline"
                    },
                    slot,
                    seconds: secs(deadline - t0),
                });
            }
            let retry: Vec<(u32, bool)> = wrong.iter().map(|&l| (l, online)).collect();
            let _ = ops.qga.set_vcpus(&retry, left(deadline)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
