//! Plugging vCPUs: `device_add` per hot-plug unit (counted against the TCG budget first),
//! the guest's insert acknowledgement, then the new guest CPUs identified and onlined
//! through the agent.

use super::cpumap::parse_cpuinfo_apic;
use super::qmp::{self, HotpluggableCpu, QmpError};
use super::resize::left;
use super::vm::{Ops, QemuVm};
use crate::backend::qemu::machine::{GuestCpuId, InsertDone};
use crate::backend::{Accel, BackendError, Cause, Direction, ResizeOptions, StepReport};
use crate::secs;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

impl QemuVm {
    pub(super) async fn plug_unit(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        hp: &mut BTreeMap<u32, HotpluggableCpu>,
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        // The guest's CPUs before the plug (not timed: preparation). A CPU that shows up
        // afterwards, while this handle holds the VM, can only be one this unit plugged.
        // A guest whose agent never answered has none: its vCPUs end Present, which is
        // all such a guest can report, and that is no error.
        let has_agent = self.has_agent(ops).await;
        // The map's signature, when current, already lists the guest's CPUs: no round
        // trip. (Were it stale, two CPUs would look new and each would be identified by
        // its own files below: slower, never wrong.)
        let known = ops
            .map
            .signature
            .as_ref()
            .map(|(_, logical)| logical.iter().copied().collect::<BTreeSet<u32>>());
        let before: Option<BTreeSet<u32>> = if has_agent && known.is_some() {
            known
        } else if has_agent {
            match self.guest_vcpus(&mut ops.qga, self.cfg.agent_timeout).await {
                Ok(v) => Some(v.iter().map(|c| c.logical_id).collect()),
                Err(e) => {
                    tracing::debug!(vm = %self.key, error = %e, "guest agent unavailable before plug");
                    None
                }
            }
        } else {
            None
        };
        let t0 = Instant::now();
        let deadline = t0 + opts.plug_timeout;
        let mut steps = Self::steps(unit, Direction::Plug);
        let n = u32::try_from(unit.len()).unwrap_or(u32::MAX);
        if self.spec.accel == Accel::Tcg {
            let max = self.spec.topology.max_vcpus();
            let used = ops.st.vcpu_threads_created;
            if used.saturating_add(n) > max {
                for st in &mut steps {
                    st.error = Some(BackendError::VcpuBudget {
                        used,
                        max,
                        wanted: n,
                    });
                }
                return steps;
            }
        }
        let mut events = self.qmp.subscribe();
        let mut added: Vec<usize> = Vec::new();
        // One device_add per hot-plug unit QEMU knows: a slot on x86, a whole core (every
        // slot of the plan unit) on sPAPR.
        let t = self.spec.topology;
        let mut groups: Vec<(u32, HotpluggableCpu, Vec<usize>)> = Vec::new();
        for (i, &slot) in unit.iter().enumerate() {
            let Some(entry) = hp.get(&slot) else {
                steps[i].error = Some(BackendError::Protocol(Cause::msg(format!(
                    "QEMU does not list vCPU slot {slot} as hot-pluggable"
                ))));
                continue;
            };
            let first = self.machine.slot_of_props(&t, &entry.props).unwrap_or(slot);
            if self.slot_id(first).is_none() {
                steps[i].error = Some(BackendError::Protocol(Cause::msg(format!(
                    "QEMU places vCPU slot {slot} at slot {first}, outside the VM's {} slots",
                    self.slots.len()
                ))));
                continue;
            }
            match groups.iter_mut().find(|g| g.0 == first) {
                Some(g) => g.2.push(i),
                None => groups.push((first, entry.clone(), vec![i])),
            }
        }
        for (first, entry, idx) in groups {
            let Some(sid) = self.slot_id(first) else {
                continue; // refused above
            };
            let threads = u32::try_from(idx.len()).unwrap_or(u32::MAX);
            // Counted before the command: a crash in between must not hide a thread.
            ops.st.vcpu_threads_created += threads;
            for &i in &idx {
                ops.st.plugging.insert(unit[i]);
            }
            self.persist(&ops.st);
            let r = self
                .qmp
                .device_add_cpu(
                    &entry.type_,
                    &self.machine.device_id(&sid),
                    &entry.props,
                    self.cfg.qmp_timeout,
                )
                .await;
            match r {
                Ok(()) => {
                    let at = t0.elapsed();
                    for &i in &idx {
                        steps[i].applied = Some(at);
                        ops.st.failed.remove(&unit[i]);
                        added.push(i);
                    }
                }
                Err(e) => {
                    let refused = matches!(e, QmpError::Refused { .. });
                    if refused {
                        // QEMU refuses before it creates the vCPU threads.
                        ops.st.vcpu_threads_created -= threads;
                        for &i in &idx {
                            ops.st.plugging.remove(&unit[i]);
                        }
                    }
                    let mut err = self.qmp_err(e);
                    if let BackendError::Qmp { desc, .. } = &mut err {
                        if entry.qom_path.is_some() {
                            desc.push_str(&format!("; vCPU slot {first} is already plugged: observe the VM and plan again"));
                        }
                    }
                    for &i in &idx {
                        if entry.qom_path.is_none() && refused {
                            ops.st.failed.insert(unit[i]);
                        }
                        steps[i].error = Some(err.clone());
                    }
                }
            }
            self.persist(&ops.st);
        }
        // QEMU holds a device for every slot it added, whatever the guest does next: the
        // handle's copy of QEMU's list says so (an unplug plans from it).
        for &i in &added {
            let slot = unit[i];
            if let Some(e) = hp.get_mut(&slot) {
                let first = self.machine.slot_of_props(&t, &e.props).unwrap_or(slot);
                if let Some(sid) = self.slot_id(first) {
                    e.qom_path = Some(format!(
                        "/machine/peripheral/{}",
                        self.machine.device_id(&sid)
                    ));
                }
            }
        }
        match self.machine.insert_done() {
            InsertDone::AcpiOst => {
                self.wait_insert_ost(&mut events, unit, &added, &mut steps, deadline, t0, opts)
                    .await
            }
            // The hypervisor has notified the guest; its kernel takes the CPUs by itself
            // and the agent below sees them come online.
            InsertDone::DeviceAdded => {
                for &i in &added {
                    steps[i].acked = steps[i].applied;
                }
            }
        }
        // Online the acknowledged vCPUs through the agent.
        let acked: Vec<usize> = added
            .iter()
            .copied()
            .filter(|&i| steps[i].acked.is_some())
            .collect();
        if acked.is_empty() || !has_agent {
            // Without an agent the plug is as done as it gets: the vCPU is reported Present.
            // It stays in `plugging`, so an agent that answers later (installed, started
            // late) finds it and onlines it (`finish_plugs`).
            self.persist(&ops.st);
            return steps;
        }
        if let Err(e) = self
            .online_slots(
                ops,
                unit,
                &acked,
                before.as_ref(),
                &mut steps,
                (t0, deadline),
            )
            .await
        {
            for &i in &acked {
                if steps[i].online.is_none() && steps[i].error.is_none() {
                    steps[i].error = Some(e.clone());
                }
            }
        }
        for &i in &acked {
            if steps[i].online.is_some() {
                ops.st.plugging.remove(&unit[i]);
            }
        }
        self.persist(&ops.st);
        steps
    }

    /// Wait for the guest's insert `_OST` of every added slot (x86).
    #[allow(clippy::too_many_arguments)]
    async fn wait_insert_ost(
        &self,
        events: &mut broadcast::Receiver<qmp::Event>,
        unit: &[u32],
        added: &[usize],
        steps: &mut [StepReport],
        deadline: Instant,
        t0: Instant,
        opts: &ResizeOptions,
    ) {
        let mut waiting: BTreeMap<String, usize> =
            added.iter().map(|&i| (unit[i].to_string(), i)).collect();
        while !waiting.is_empty() {
            let got = qmp::wait_event(&self.qmp, events, deadline, |ev| {
                ev.acpi_ost().filter(|o| {
                    o.slot_type == "CPU"
                        && o.source == qmp::OST_SOURCE_INSERT
                        && waiting.contains_key(&o.slot)
                })
            })
            .await;
            let Some(ost) = got else { break };
            let Some(i) = waiting.remove(&ost.slot) else {
                continue;
            };
            if ost.status == qmp::OST_STATUS_SUCCESS {
                steps[i].acked = Some(t0.elapsed());
            } else {
                steps[i].error = Some(BackendError::Protocol(Cause::msg(format!(
                    "the guest failed to add vCPU slot {} (ACPI _OST status {:#x}); does its kernel have CONFIG_ACPI_HOTPLUG_CPU?",
                    unit[i], ost.status
                ))));
            }
        }
        for (_, i) in waiting {
            steps[i].error = Some(if self.qmp.is_closed() {
                BackendError::NotRunning(self.key.to_string())
            } else {
                BackendError::Timeout {
                    what: "acknowledge",
                    slot: unit[i],
                    seconds: secs(opts.plug_timeout),
                }
            });
        }
    }

    async fn online_slots(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        acked: &[usize],
        before: Option<&BTreeSet<u32>>,
        steps: &mut [StepReport],
        (t0, deadline): (Instant, Instant),
    ) -> Result<(), BackendError> {
        let left = || left(deadline);
        let want: BTreeSet<u32> = acked.iter().map(|&i| unit[i]).collect();
        // Find the new logical CPUs: listed by the agent, not mapped yet.
        let mut found: BTreeMap<u32, u32> = BTreeMap::new(); // slot -> logical
        let mut onlined = false;
        loop {
            let vcpus = self
                .guest_vcpus(&mut ops.qga, left())
                .await
                .map_err(Self::qga_err)?;
            let known: BTreeSet<u32> = ops.map.by_logical.keys().copied().collect();
            // One new CPU for one plugged slot: the set difference identifies it.
            if let (Some(before), [slot]) =
                (before, want.iter().copied().collect::<Vec<_>>().as_slice())
            {
                let new: Vec<u32> = vcpus
                    .iter()
                    .map(|v| v.logical_id)
                    .filter(|l| !before.contains(l))
                    .collect();
                if let [logical] = new.as_slice() {
                    ops.map.by_logical.retain(|_, s| s != slot);
                    ops.map.by_logical.insert(*logical, *slot);
                    found.insert(*slot, *logical);
                    break;
                }
            }
            // Several at once: when exactly as many new CPUs appeared as were plugged, they
            // are all ours. Online them first, then tell them apart by APIC id in one read
            // of /proc/cpuinfo (which lists online CPUs only), instead of reading each
            // one's ACPI path (three agent round trips each) before onlining any.
            if let Some(before) = before.filter(|_| {
                want.len() > 1 && self.machine.guest_cpu_id() == GuestCpuId::ApicAndAcpi
            }) {
                let new: Vec<u32> = vcpus
                    .iter()
                    .map(|v| v.logical_id)
                    .filter(|l| !before.contains(l))
                    .collect();
                if new.len() == want.len() {
                    let changes: Vec<(u32, bool)> = new.iter().map(|&l| (l, true)).collect();
                    ops.qga
                        .set_vcpus(&changes, left())
                        .await
                        .map_err(Self::qga_err)?;
                    let text = ops
                        .qga
                        .read_text("/proc/cpuinfo", left())
                        .await
                        .map_err(Self::qga_err)?;
                    for (logical, apic) in parse_cpuinfo_apic(&text) {
                        let slot = self.apic_to_slot.get(&apic).copied();
                        if let Some(slot) =
                            slot.filter(|s| new.contains(&logical) && want.contains(s))
                        {
                            ops.map.by_logical.retain(|_, s| *s != slot);
                            ops.map.by_logical.insert(logical, slot);
                            found.insert(slot, logical);
                        }
                    }
                    if found.len() == want.len() {
                        onlined = true;
                        break;
                    }
                }
            }
            // Otherwise each unknown CPU's ACPI processor path names its slot.
            for v in vcpus.iter().filter(|v| !known.contains(&v.logical_id)) {
                match self
                    .guest_slot(&mut ops.qga, v.logical_id, left())
                    .await
                    .map_err(Self::qga_err)?
                {
                    Some(slot) => {
                        ops.map.by_logical.insert(v.logical_id, slot);
                        if want.contains(&slot) {
                            found.insert(slot, v.logical_id);
                        }
                    }
                    None => {
                        tracing::debug!(vm = %self.key, logical = v.logical_id, "new guest CPU without an ACPI path")
                    }
                }
            }
            for &slot in &want {
                if let Some(l) = ops.map.slot_logical(slot) {
                    found.insert(slot, l);
                }
            }
            if found.len() == want.len() {
                break;
            }
            if Instant::now() >= deadline {
                let missing: Vec<u32> = want
                    .iter()
                    .filter(|s| !found.contains_key(s))
                    .copied()
                    .collect();
                return Err(BackendError::GuestAgent(Cause::msg(format!(
                    "the guest acknowledged vCPU slots {missing:?} but its agent does not list them (or their ACPI path) within the plug deadline"
                ))));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !onlined {
            let changes: Vec<(u32, bool)> = found.values().map(|&l| (l, true)).collect();
            let n = ops
                .qga
                .set_vcpus(&changes, left())
                .await
                .map_err(Self::qga_err)?;
            if usize::try_from(n).unwrap_or(0) < changes.len() {
                tracing::warn!(vm = %self.key, changed = n, wanted = changes.len(), "guest-set-vcpus onlined fewer CPUs than asked");
            }
        }
        // Confirm with the agent's own view.
        loop {
            let vcpus = self
                .guest_vcpus(&mut ops.qga, left())
                .await
                .map_err(Self::qga_err)?;
            let online: BTreeSet<u32> = vcpus
                .iter()
                .filter(|v| v.online)
                .map(|v| v.logical_id)
                .collect();
            let mut all = true;
            for &i in acked {
                let l = found[&unit[i]];
                if online.contains(&l) {
                    if steps[i].online.is_none() {
                        steps[i].online = Some(t0.elapsed());
                        steps[i].guest_cpu = Some(l);
                    }
                } else {
                    all = false;
                }
            }
            if all {
                for (&slot, &logical) in &found {
                    ops.map.note_plugged(slot, logical);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                for &i in acked {
                    if steps[i].online.is_none() {
                        steps[i].error = Some(BackendError::Timeout {
                            what: "bring online",
                            slot: unit[i],
                            seconds: secs(deadline - t0),
                        });
                    }
                }
                return Ok(());
            }
            // Not all came online (guest-set-vcpus stops at the first failure): ask again.
            let retry: Vec<(u32, bool)> = acked
                .iter()
                .map(|&i| found[&unit[i]])
                .filter(|l| !online.contains(l))
                .map(|l| (l, true))
                .collect();
            let _ = ops.qga.set_vcpus(&retry, left()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
