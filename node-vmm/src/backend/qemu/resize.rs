//! One resize: a plan cut into hot-plug units, then one batch per direction (parked vCPUs,
//! unplugs, unparks, plugs), with the step reports every direction fills in.

use super::vm::QemuVm;
use crate::backend::{BackendError, Direction, ResizeOptions, ResizeReport, StepReport, VmSpec};
use corescale_api::{Granularity, Plan, ResizeMethod};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Time left until `deadline`, at least a millisecond (a call given zero would not even
/// try).
pub(super) fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A unit of a plan: one slot, or every thread of one core.
fn units(plan_slots: &[u32], spec: &VmSpec) -> Result<Vec<Vec<u32>>, String> {
    let t = &spec.topology;
    let max = t.max_vcpus();
    let mut seen = BTreeSet::new();
    for &s in plan_slots {
        if s >= max {
            return Err(format!(
                "slot {s} is outside the VM's {max} slots (spec.topology {}x{}x{}); the target is above the maximum",
                t.sockets, t.cores, t.threads
            ));
        }
        if !seen.insert(s) {
            return Err(format!("slot {s} appears twice in the plan"));
        }
    }
    if spec.granularity == Granularity::Thread || t.threads == 1 {
        return Ok(plan_slots.iter().map(|&s| vec![s]).collect());
    }
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut by_core: BTreeMap<u32, usize> = BTreeMap::new();
    for &s in plan_slots {
        let core = s / t.threads;
        match by_core.get(&core) {
            Some(&i) => out[i].push(s),
            None => {
                by_core.insert(core, out.len());
                out.push(vec![s]);
            }
        }
    }
    for u in &out {
        if u.len() != usize::try_from(t.threads).unwrap_or(usize::MAX) {
            let core = u[0] / t.threads;
            let all: Vec<u32> = (core * t.threads..(core + 1) * t.threads).collect();
            return Err(format!(
                "granularity Core acts on whole cores: the plan has slots {u:?} of the core with slots {all:?}"
            ));
        }
    }
    Ok(out)
}

impl QemuVm {
    /// One report per slot of `slots`, nothing done yet.
    pub(super) fn steps(slots: &[u32], direction: Direction) -> Vec<StepReport> {
        slots.iter().map(|&s| Self::step(s, direction)).collect()
    }

    fn step(slot: u32, direction: Direction) -> StepReport {
        StepReport {
            slot,
            direction,
            applied: None,
            acked: None,
            online: None,
            guest_cpu: None,
            kept_offline: false,
            error: None,
        }
    }

    /// [`VmHandle::resize`](crate::backend::VmHandle::resize) of a QEMU guest, under the
    /// handle's lock.
    pub(super) async fn run_plan(&self, plan: &Plan, opts: ResizeOptions) -> ResizeReport {
        let mut ops = self.ops.lock().await;
        let mut report = ResizeReport::default();
        let fail_all = |report: &mut ResizeReport, e: BackendError| {
            let all = plan
                .unplug
                .iter()
                .map(|&s| (s, Direction::Unplug))
                .chain(plan.plug.iter().map(|&s| (s, Direction::Plug)));
            for (s, d) in all {
                let mut st = Self::step(s, d);
                st.error = Some(e.clone());
                report.steps.push(st);
            }
        };
        let both: Vec<u32> = plan
            .unplug
            .iter()
            .chain(plan.plug.iter())
            .copied()
            .collect();
        let (unplug_units, plug_units) = match (
            units(&plan.unplug, &self.spec),
            units(&plan.plug, &self.spec),
            units(&both, &self.spec),
        ) {
            (Ok(u), Ok(p), Ok(_)) => (u, p),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                fail_all(&mut report, BackendError::InvalidPlan(e));
                return report;
            }
        };
        if self.spec.resize_method == ResizeMethod::GuestOnline {
            report.steps = self.guest_online_plan(&mut ops, plan, &opts).await;
            self.log_steps(&report);
            return report;
        }
        let cached = ops.hp.take();
        let mut hp = match cached {
            Some(hp) => hp,
            None => match self.hotpluggable().await {
                Ok(hp) => hp,
                Err(e) => {
                    fail_all(&mut report, e);
                    return report;
                }
            },
        };
        // Know which logical CPU is which before offlining any (an adopted handle starts
        // with an empty map).
        if !plan.unplug.is_empty() && ops.map.signature.is_none() && self.has_agent(&mut ops).await
        {
            let present: Vec<u32> = hp
                .iter()
                .filter(|(_, c)| c.qom_path.is_some())
                .map(|(s, _)| *s)
                .collect();
            if let Err(e) = self
                .agent_view(
                    &mut ops,
                    &present,
                    self.cfg.agent_timeout.min(opts.unplug_timeout),
                )
                .await
            {
                tracing::warn!(vm = %self.key, error = %e, "guest agent unavailable before unplug");
            }
        }
        // Each direction is one batch (plus one of parked vCPUs): every device_add or
        // device_del is sent before any waiting, and the guest is asked to online or
        // offline them all in one agent call, so 1 -> 8 costs little more than 1 -> 2.
        let (mut park, mut remove) = (Vec::new(), Vec::new());
        for u in &unplug_units {
            let n = u32::try_from(u.len()).unwrap_or(u32::MAX);
            let removing = u32::try_from(remove.len()).unwrap_or(u32::MAX);
            if self.parks(&ops, removing.saturating_add(n)) {
                park.extend_from_slice(u);
            } else {
                remove.extend_from_slice(u);
            }
        }
        if !park.is_empty() {
            match self.park(&mut ops, &park, &opts).await {
                Some(steps) => report.steps.extend(steps),
                None => remove.extend(park),
            }
        }
        if !remove.is_empty() {
            let steps = self.unplug_unit(&mut ops, &remove, &mut hp, &opts).await;
            report.steps.extend(steps);
        }
        let (unpark, add): (Vec<&Vec<u32>>, Vec<&Vec<u32>>) = plug_units
            .iter()
            .partition(|u| u.iter().all(|s| ops.st.parked.contains(s)));
        let unpark: Vec<u32> = unpark.into_iter().flatten().copied().collect();
        let add: Vec<u32> = add.into_iter().flatten().copied().collect();
        if !unpark.is_empty() {
            let steps = self.unpark(&mut ops, &unpark, &opts).await;
            report.steps.extend(steps);
        }
        if !add.is_empty() {
            let steps = self.plug_unit(&mut ops, &add, &mut hp, &opts).await;
            report.steps.extend(steps);
        }
        // Every step kept `hp` current; after a failure QEMU may hold something else.
        if report.steps.iter().all(|s| s.error.is_none()) {
            ops.hp = Some(hp);
        }
        self.log_steps(&report);
        report
    }

    fn log_steps(&self, report: &ResizeReport) {
        for s in &report.steps {
            tracing::info!(
                vm = %self.key, slot = s.slot, direction = s.direction.as_str(),
                applied_ms = s.applied.map(|d| d.as_secs_f64() * 1e3), acked_ms = s.acked.map(|d| d.as_secs_f64() * 1e3),
                online_ms = s.online.map(|d| d.as_secs_f64() * 1e3), error = s.error.as_ref().map(ToString::to_string),
                "resize step"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::test_spec as spec;

    #[test]
    fn plans_are_split_into_units() {
        let mut s = spec(1, 3, 2, 2);
        assert_eq!(
            units(&[2, 3, 5], &s).unwrap(),
            vec![vec![2], vec![3], vec![5]]
        );
        s.granularity = Granularity::Core;
        assert_eq!(
            units(&[2, 3, 4, 5], &s).unwrap(),
            vec![vec![2, 3], vec![4, 5]]
        );
        let e = units(&[2, 3, 5], &s).unwrap_err();
        assert!(e.contains("whole cores"), "{e}");
        let e = units(&[6], &s).unwrap_err();
        assert!(e.contains("outside the VM's 6 slots"), "{e}");
        assert!(units(&[2, 2], &s).unwrap_err().contains("twice"));
    }
}
