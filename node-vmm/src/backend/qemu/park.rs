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

use super::resize::left;
use super::vm::{Ops, QemuVm};
use crate::backend::{Accel, BackendError, Direction, ResizeOptions, StepReport};
use crate::secs;
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
        let changes: Vec<(u32, bool)> = logical.iter().map(|&l| (l, false)).collect();
        if let Err(e) = ops.qga.set_vcpus(&changes, left(deadline)).await {
            tracing::warn!(vm = %self.key, error = %e, "cannot offline through the agent; removing the vCPUs instead");
            return None;
        }
        let applied = t0.elapsed();
        let mut steps = Self::steps(unit, Direction::Unplug);
        let confirmed = self
            .wait_online_state(ops, (unit[0], &logical), false, (t0, deadline))
            .await;
        for (st, &slot) in steps.iter_mut().zip(unit) {
            st.applied = Some(applied);
            match &confirmed {
                Ok(at) => {
                    st.acked = Some(*at - t0);
                    ops.st.parked.insert(slot);
                    ops.st.plugging.remove(&slot);
                    ops.st.unplugging.remove(&slot);
                }
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
                BackendError::GuestAgent(format!(
                    "parked vCPU slots {unit:?} have no known guest CPU: observe the VM first"
                )),
            );
            return steps;
        };
        let changes: Vec<(u32, bool)> = logical.iter().map(|&l| (l, true)).collect();
        if let Err(e) = ops.qga.set_vcpus(&changes, left(deadline)).await {
            fail(&mut steps, Self::qga_err(e));
            return steps;
        }
        let applied = t0.elapsed();
        let confirmed = self
            .wait_online_state(ops, (unit[0], &logical), true, (t0, deadline))
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
