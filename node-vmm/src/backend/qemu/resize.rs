//! One resize: the plan's hot-plug units acted on in one batch per direction (parked vCPUs,
//! unplugs, unparks, plugs), with the step reports every direction fills in.

use super::vm::QemuVm;
use crate::backend::{BackendError, Direction, ResizeOptions, ResizeReport, StepReport};
use corescale_api::{Plan, ResizeMethod, Unit};
use std::time::{Duration, Instant};

/// Time left until `deadline`, at least a millisecond (a call given zero would not even
/// try).
pub(super) fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
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
                .unplug_slots()
                .into_iter()
                .map(|s| (s, Direction::Unplug))
                .chain(plan.plug_slots().into_iter().map(|s| (s, Direction::Plug)));
            for (s, d) in all {
                let mut st = Self::step(s, d);
                st.error = Some(e.clone());
                report.steps.push(st);
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
        for u in &plan.unplug {
            let removing = u32::try_from(remove.len()).unwrap_or(u32::MAX);
            if self.parks(&ops, removing.saturating_add(u.len())) {
                park.extend_from_slice(u.slots());
            } else {
                remove.extend_from_slice(u.slots());
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
        let (unpark, add): (Vec<&Unit>, Vec<&Unit>) = plan
            .plug
            .iter()
            .partition(|u| u.slots().iter().all(|s| ops.st.parked.contains(s)));
        let unpark: Vec<u32> = unpark.iter().flat_map(|u| u.slots()).copied().collect();
        let add: Vec<u32> = add.iter().flat_map(|u| u.slots()).copied().collect();
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
