//! Unplugging vCPUs: recorded first, offlined through the agent, `device_del` per device,
//! then the guest's eject (an `_OST` or `DEVICE_DELETED`) until the unplug deadline.

use super::qmp::{self, EventKind, HotpluggableCpu, QmpError};
use super::vm::{Ops, QemuVm};
use crate::backend::qemu::machine::EjectDone;
use crate::backend::{BackendError, Cause, Direction, ResizeOptions, StepReport};
use crate::secs;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

impl QemuVm {
    /// Whether QEMU lists the slot without a vCPU now.
    async fn slot_gone(&self, slot: u32) -> bool {
        self.hotpluggable()
            .await
            .ok()
            .and_then(|hp| hp.get(&slot).map(|c| c.qom_path.is_none()))
            .unwrap_or(false)
    }

    pub(super) async fn unplug_unit(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        hp: &mut BTreeMap<u32, HotpluggableCpu>,
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        let t0 = Instant::now();
        let deadline = t0 + opts.unplug_timeout;
        let mut steps = Self::steps(unit, Direction::Unplug);
        if let Some(&s) = unit.iter().find(|&&s| s == 0) {
            for st in &mut steps {
                st.error = Some(BackendError::InvalidPlan(format!(
                    "slot {s} holds the boot vCPU, which cannot be unplugged"
                )));
            }
            return steps;
        }
        // Slots already gone (a retry after the guest caught up) are done.
        let mut todo: Vec<usize> = Vec::new();
        for (i, &slot) in unit.iter().enumerate() {
            ops.st.plugging.remove(&slot);
            if hp.get(&slot).and_then(|c| c.qom_path.as_ref()).is_none() {
                steps[i].applied = Some(t0.elapsed());
                steps[i].acked = Some(t0.elapsed());
                ops.st.unplugging.remove(&slot);
                ops.map.forget_slot(slot);
            } else {
                todo.push(i);
            }
        }
        if todo.is_empty() {
            self.persist(&ops.st);
            return steps;
        }
        // Recorded before the guest is touched: a step cut short between offlining and
        // device_del (a newer target, an agent restart) leaves the slot Unplugging, which
        // the next plan finishes, not a Present vCPU that nothing would bring back online.
        for &i in &todo {
            ops.st.unplugging.insert(unit[i]);
        }
        self.persist(&ops.st);
        // Offline through the agent first: the guest then only has to eject. Half the
        // deadline at most: a guest that cannot answer (paused, no agent) still gets the
        // eject request, which its kernel handles by itself.
        let offline: Vec<(u32, bool)> = todo
            .iter()
            .filter_map(|&i| ops.map.slot_logical(unit[i]))
            .map(|l| (l, false))
            .collect();
        if !offline.is_empty() {
            let budget =
                (opts.unplug_timeout / 2).min(self.cfg.agent_timeout.max(Duration::from_secs(5)));
            match ops.qga.set_vcpus(&offline, budget).await {
                Ok(n) => {
                    tracing::debug!(vm = %self.key, offlined = n, ms = t0.elapsed().as_secs_f64() * 1e3, "vCPUs offlined through the agent")
                }
                Err(e) => {
                    tracing::warn!(vm = %self.key, error = %e, "could not offline through the agent; ejecting anyway")
                }
            }
        }
        let mut events = self.qmp.subscribe();
        // One device_del per device (a slot on x86, a core on sPAPR); `waiting` is keyed
        // by what names the completion: the _OST slot (x86) or the device's QOM path.
        let eject = self.machine.eject_done();
        let mut waiting: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut by_device: Vec<(String, Vec<usize>)> = Vec::new();
        for &i in &todo {
            let qom = hp
                .get(&unit[i])
                .and_then(|c| c.qom_path.clone())
                .unwrap_or_default();
            match by_device.iter_mut().find(|d| d.0 == qom) {
                Some(d) => d.1.push(i),
                None => by_device.push((qom, vec![i])),
            }
        }
        for (qom, idx) in by_device {
            let first = unit[idx[0]];
            let mut pending = |steps: &mut [StepReport], ops: &mut Ops| {
                for &i in &idx {
                    steps[i].applied = Some(t0.elapsed());
                    ops.st.unplugging.insert(unit[i]);
                    let key = match eject {
                        EjectDone::AcpiOst => unit[i].to_string(),
                        EjectDone::DeviceDeleted => qom.clone(),
                    };
                    waiting.entry(key).or_default().push(i);
                }
            };
            match self.qmp.device_del(&qom, self.cfg.qmp_timeout).await {
                Ok(()) => pending(&mut steps, ops),
                Err(QmpError::Refused { class, .. })
                    if class == "DeviceNotFound" && self.slot_gone(first).await =>
                {
                    // The guest finished an earlier eject in the meantime (a retry).
                    for &i in &idx {
                        steps[i].applied = Some(t0.elapsed());
                        steps[i].acked = Some(t0.elapsed());
                    }
                }
                Err(QmpError::Refused { desc, .. })
                    if desc.contains("in the process of unplug")
                        || desc.contains("already in progress") =>
                {
                    pending(&mut steps, ops)
                }
                Err(e) => {
                    let err = self.qmp_err(e);
                    for &i in &idx {
                        steps[i].error = Some(err.clone());
                    }
                }
            }
        }
        self.persist(&ops.st);
        // Wait for the completion; poll QEMU now and then in case the event was missed.
        let mut next_poll = Instant::now() + Duration::from_millis(500);
        while !waiting.is_empty() && Instant::now() < deadline && !self.qmp.is_closed() {
            let until = deadline.min(next_poll);
            let got = qmp::wait_event(&self.qmp, &mut events, until, |ev| match eject {
                EjectDone::AcpiOst => ev
                    .acpi_ost()
                    .filter(|o| {
                        o.slot_type == "CPU"
                            && o.source == qmp::OST_SOURCE_EJECT
                            && waiting.contains_key(&o.slot)
                    })
                    .map(|o| (o.slot, o.status)),
                EjectDone::DeviceDeleted => match ev.kind() {
                    EventKind::DeviceDeleted { path, .. } if waiting.contains_key(&path) => {
                        Some((path, qmp::OST_STATUS_SUCCESS))
                    }
                    _ => None,
                },
            })
            .await;
            match got {
                Some((key, status)) if status == qmp::OST_STATUS_SUCCESS => {
                    for i in waiting.remove(&key).unwrap_or_default() {
                        steps[i].acked = Some(t0.elapsed());
                    }
                }
                Some((_, status)) if status == qmp::OST_STATUS_EJECT_IN_PROGRESS => {}
                Some((key, status)) => {
                    for i in waiting.remove(&key).unwrap_or_default() {
                        steps[i].error = Some(BackendError::Protocol(Cause::msg(format!(
                            "the guest refused to eject vCPU slot {} (ACPI _OST status {status:#x}); it stays Unplugging and the next attempt retries",
                            unit[i]
                        ))));
                    }
                }
                None if Instant::now() >= next_poll => {
                    next_poll = Instant::now() + Duration::from_millis(500);
                    if let Ok(now) = self.hotpluggable().await {
                        waiting.retain(|_, idx| {
                            let gone = idx
                                .iter()
                                .all(|&i| now.get(&unit[i]).is_some_and(|c| c.qom_path.is_none()));
                            if gone {
                                for &i in idx.iter() {
                                    steps[i].acked = Some(t0.elapsed());
                                }
                            }
                            !gone
                        });
                    }
                }
                None => {}
            }
        }
        for &i in &todo {
            let slot = unit[i];
            if steps[i].acked.is_some() {
                ops.st.unplugging.remove(&slot);
                ops.map.forget_slot(slot);
                if let Some(c) = hp.get_mut(&slot) {
                    c.qom_path = None;
                }
            } else if steps[i].error.is_none() {
                steps[i].error = Some(if self.qmp.is_closed() {
                    BackendError::NotRunning(self.key.to_string())
                } else {
                    BackendError::Timeout {
                        what: "release",
                        slot,
                        seconds: secs(opts.unplug_timeout),
                    }
                });
            }
        }
        self.persist(&ops.st);
        steps
    }
}
