//! Which guest CPU is which slot: QEMU's APIC ids, the guest's `/proc/cpuinfo`, ACPI
//! processor paths and sPAPR hard ids, and the map a handle keeps between operations
//! (see "Mapping guest CPUs to slots" in the module documentation).

use super::qga::{slot_from_acpi_path, GuestLogicalProcessor, QgaClient, QgaError};
use super::vm::{Ops, QemuVm};
use crate::backend::qemu::machine::GuestCpuId;
use corescale_api::{SlotId, Topology};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bits needed to count `n` values (QEMU's `apicid_bitwidth_for_count`).
fn bitwidth(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The x86 APIC id QEMU gives a slot (one die and one module per socket).
pub fn apic_id(t: &Topology, s: &SlotId) -> u32 {
    let tw = bitwidth(t.threads);
    let cw = bitwidth(t.cores);
    (s.socket << (cw + tw)) | (s.core << tw) | s.thread
}

/// Parse `/proc/cpuinfo` into logical CPU -> APIC id.
pub fn parse_cpuinfo_apic(text: &str) -> BTreeMap<u32, u32> {
    let mut out = BTreeMap::new();
    let mut cur = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "processor" => cur = v.trim().parse().ok(),
            "apicid" => {
                if let (Some(c), Ok(a)) = (cur, v.trim().parse()) {
                    out.insert(c, a);
                }
            }
            _ => {}
        }
    }
    out
}

/// What the agent knows of the guest's CPUs, cached between observations.
#[derive(Debug, Default)]
pub(super) struct CpuMap {
    /// Logical CPU -> slot.
    pub(super) by_logical: BTreeMap<u32, u32>,
    /// (present slots, logical ids), both sorted, the map is valid for. Built by a full
    /// mapping, then kept current by this handle's own plugs and unplugs, so observing
    /// right after a resize does not read the guest's files again.
    pub(super) signature: Option<(Vec<u32>, Vec<u32>)>,
}

impl CpuMap {
    pub(super) fn slot_logical(&self, slot: u32) -> Option<u32> {
        self.by_logical
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(l, _)| *l)
    }
    pub(super) fn forget_slot(&mut self, slot: u32) {
        let gone = self.slot_logical(slot);
        self.by_logical.retain(|_, s| *s != slot);
        if let Some((present, logical)) = &mut self.signature {
            present.retain(|s| *s != slot);
            if let Some(l) = gone {
                logical.retain(|x| *x != l);
            }
        }
    }
    /// A plug of this handle brought `slot` in as guest CPU `logical`.
    pub(super) fn note_plugged(&mut self, slot: u32, logical: u32) {
        self.by_logical.retain(|_, s| *s != slot);
        self.by_logical.insert(logical, slot);
        if let Some((present, all)) = &mut self.signature {
            for (v, x) in [(present, slot), (all, logical)] {
                if let Err(i) = v.binary_search(&x) {
                    v.insert(i, x);
                }
            }
        }
    }
}

/// The guest agent's view of one observation.
pub(super) struct AgentView {
    /// Slot -> (logical id, online).
    pub(super) slots: BTreeMap<u32, (u32, bool)>,
}

impl QemuVm {
    /// Map logical CPUs to slots from scratch.
    async fn map_logical(
        &self,
        qga: &mut QgaClient,
        vcpus: &[GuestLogicalProcessor],
        deadline: Instant,
    ) -> Result<BTreeMap<u32, u32>, QgaError> {
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50))
        };
        let mut map = BTreeMap::new();
        if self.machine.guest_cpu_id() == GuestCpuId::ApicAndAcpi && vcpus.iter().any(|v| v.online)
        {
            let text = qga.read_text("/proc/cpuinfo", left()).await?;
            for (logical, apic) in parse_cpuinfo_apic(&text) {
                if let Some(&slot) = self.apic_to_slot.get(&apic) {
                    map.insert(logical, slot);
                }
            }
        }
        for v in vcpus {
            if map.contains_key(&v.logical_id) {
                continue;
            }
            if let Some(slot) = self.guest_slot(qga, v.logical_id, left()).await? {
                map.insert(v.logical_id, slot);
            }
        }
        Ok(map)
    }

    /// The guest's logical CPUs as the agent lists them, without the ones the guest does
    /// not have: on sPAPR, `guest-get-vcpus` also lists every possible CPU that is not
    /// present (as offline, with hard id 0), so those are dropped by the guest's
    /// `/sys/devices/system/cpu/present`.
    pub(super) async fn guest_vcpus(
        &self,
        qga: &mut QgaClient,
        timeout: Duration,
    ) -> Result<Vec<GuestLogicalProcessor>, QgaError> {
        let deadline = Instant::now() + timeout;
        let mut vcpus = qga.get_vcpus(timeout).await?;
        if self.machine.guest_cpu_id() == GuestCpuId::PhysicalId {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50));
            let present = crate::backend::qemu::machine::parse_cpulist(
                &qga.read_text("/sys/devices/system/cpu/present", left)
                    .await?,
            );
            vcpus.retain(|v| present.contains(&v.logical_id));
        }
        Ok(vcpus)
    }

    /// QEMU's `vsmt` (spacing of sPAPR hard CPU ids per core), asked once.
    async fn vsmt(&self) -> u32 {
        let known = self.vsmt.load(Ordering::Relaxed);
        if known != 0 {
            return known;
        }
        let got = self
            .qmp
            .execute_value(
                "qom-get",
                Some(serde_json::json!({"path": "/machine", "property": "vsmt"})),
                self.cfg.qmp_timeout,
            )
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0);
        let v = got.unwrap_or(self.spec.topology.threads);
        self.vsmt.store(v, Ordering::Relaxed);
        v
    }

    /// The slot of a logical CPU from what the guest says of it: its ACPI processor path
    /// (x86), or its hard id (sPAPR).
    pub(super) async fn guest_slot(
        &self,
        qga: &mut QgaClient,
        logical: u32,
        timeout: Duration,
    ) -> Result<Option<u32>, QgaError> {
        let t = &self.spec.topology;
        let path = match self.machine.guest_cpu_id() {
            GuestCpuId::BootOrder => return Ok(Some(logical).filter(|s| *s < t.max_vcpus())),
            GuestCpuId::ApicAndAcpi => {
                format!("/sys/devices/system/cpu/cpu{logical}/firmware_node/path")
            }
            GuestCpuId::PhysicalId => format!("/sys/devices/system/cpu/cpu{logical}/physical_id"),
        };
        match qga.read_text(&path, timeout).await {
            Ok(text) => Ok(match self.machine.guest_cpu_id() {
                GuestCpuId::ApicAndAcpi => {
                    slot_from_acpi_path(&text).filter(|s| *s < t.max_vcpus())
                }
                GuestCpuId::PhysicalId => match text.trim().parse::<u32>() {
                    Ok(id) => self.machine.slot_of_hard_id(t, self.vsmt().await, id),
                    Err(_) => None,
                },
                GuestCpuId::BootOrder => None,
            }),
            Err(QgaError::Refused { desc, .. }) => {
                tracing::debug!(vm = %self.key, logical, desc, "no ACPI path for a guest CPU");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The agent's view: logical CPUs, their online state and their slots.
    pub(super) async fn agent_view(
        &self,
        ops: &mut Ops,
        present: &[u32],
        timeout: Duration,
    ) -> Result<AgentView, QgaError> {
        let deadline = Instant::now() + timeout;
        let vcpus = self.guest_vcpus(&mut ops.qga, timeout).await?;
        self.view_of(ops, present, vcpus, deadline).await
    }

    /// The agent's view from the logical CPUs it listed: map them to slots (asking the
    /// guest again only when the set changed since the last mapping).
    pub(super) async fn view_of(
        &self,
        ops: &mut Ops,
        present: &[u32],
        vcpus: Vec<GuestLogicalProcessor>,
        deadline: Instant,
    ) -> Result<AgentView, QgaError> {
        let mut logical: Vec<u32> = vcpus.iter().map(|v| v.logical_id).collect();
        logical.sort_unstable();
        let mut present = present.to_vec();
        present.sort_unstable();
        let sig = (present, logical);
        if ops.map.signature.as_ref() != Some(&sig) {
            let map = self.map_logical(&mut ops.qga, &vcpus, deadline).await?;
            ops.map.by_logical = map;
            ops.map.signature = Some(sig);
        }
        let mut slots = BTreeMap::new();
        for v in &vcpus {
            if let Some(&slot) = ops.map.by_logical.get(&v.logical_id) {
                slots.insert(slot, (v.logical_id, v.online));
            } else {
                tracing::debug!(vm = %self.key, logical = v.logical_id, "guest CPU not mapped to a slot");
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        Ok(AgentView { slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::machine::Machine;
    use crate::backend::qemu::qmp::CpuProps;
    use corescale_api::planner::slots as topology_slots;
    use corescale_api::Arch;

    #[test]
    fn apic_ids_follow_qemu() {
        // 2 sockets x 2 cores: socket 1 core 0 has APIC id 2 (seen in the guest).
        let t = Topology {
            sockets: 2,
            cores: 2,
            threads: 1,
        };
        let s = topology_slots(&t);
        assert_eq!(
            s.iter().map(|x| apic_id(&t, x)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // 1 socket x 2 cores x 2 threads: core 1 thread 0 has APIC id 2.
        let t = Topology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        assert_eq!(
            topology_slots(&t)
                .iter()
                .map(|x| apic_id(&t, x))
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // 3 cores need 2 bits: socket 1 starts at 4; 3 threads need 2 bits.
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 3,
        };
        let ids: Vec<u32> = topology_slots(&t).iter().map(|x| apic_id(&t, x)).collect();
        assert_eq!(&ids[..4], &[0, 1, 2, 4]);
        assert_eq!(ids[9], 16);
        let p = CpuProps {
            socket_id: Some(1),
            core_id: Some(2),
            thread_id: Some(1),
            ..Default::default()
        };
        let x86 = Machine::of(Arch::X86_64);
        assert_eq!(x86.slot_of_props(&t, &p), Some(16));
        let bad = CpuProps {
            socket_id: Some(2),
            core_id: Some(0),
            thread_id: Some(0),
            ..Default::default()
        };
        assert_eq!(x86.slot_of_props(&t, &bad), None);
    }

    #[test]
    fn cpuinfo_gives_apic_ids() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\napicid\t\t: 0\ninitial apicid\t: 0\n\nprocessor\t: 1\napicid\t\t: 2\n";
        assert_eq!(parse_cpuinfo_apic(text), BTreeMap::from([(0, 0), (1, 2)]));
    }
}
