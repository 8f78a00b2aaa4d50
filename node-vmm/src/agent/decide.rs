//! The node agent's decisions, pure: what a VM placed on this node needs next, whether a
//! target fits, and which slots to act on. Unit-tested from fixtures.

use crate::backend::{NodeCapacity, Observation, GUEST_ONLINE_NEEDS_AGENT};
use chrono::{DateTime, Utc};
use corescale_api::planner::{self, SlotView};
use corescale_api::{
    Plan, PlanError, ResizeMethod, RunStrategy, Topology, VcpuState, VirtualMachine,
    VirtualMachineSpec,
};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// What the node should do with a VM's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Keep the guest running and sized to spec.cpus.
    Run,
    /// Keep the guest stopped (runStrategy Halted).
    Halt,
    /// Stop the guest; the object is being deleted, so remove the finalizer after.
    Delete,
    /// Stop the guest; the object is gone (or was re-created with another UID).
    Gone,
    /// Stop the guest without touching the object: it was placed on another node.
    Leave,
}

/// What the node should do with this VM (`None`: the object does not exist).
pub fn want(vm: Option<&VirtualMachine>, node: &str, guest_uid: Option<&str>) -> Want {
    let Some(vm) = vm else { return Want::Gone };
    if guest_uid.is_some_and(|u| Some(u) != vm.uid().as_deref()) {
        return Want::Gone;
    }
    if vm.metadata.deletion_timestamp.is_some() {
        return Want::Delete;
    }
    if vm.status.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Want::Leave;
    }
    match vm.spec.run_strategy {
        RunStrategy::Always => Want::Run,
        RunStrategy::Halted => Want::Halt,
    }
}

/// Whether a target can be granted on this node now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feasibility {
    /// Go ahead.
    Fits,
    /// Never on this node or VM; the message says why.
    Infeasible(String),
    /// Not now: the node's vCPU budget is spoken for; may fit later.
    Deferred(String),
}

/// The topology in force for a VM: the one recorded at placement, else the spec's.
pub fn topology_of(vm: &VirtualMachine) -> Topology {
    vm.status
        .as_ref()
        .and_then(|s| s.topology)
        .or(vm.spec.topology)
        .unwrap_or_else(|| vm.spec.effective_topology())
}

/// Decide whether `target` vCPUs fit: the VM's topology and granularity, the node's
/// architectures and largest VM, and the node's budget (`promised_to_others` is what the
/// other VMs on this node hold or were granted; `budget` the node's total).
pub fn feasibility(
    spec: &VirtualMachineSpec,
    topology: &Topology,
    capacity: &NodeCapacity,
    budget: u32,
    promised_to_others: u32,
    current: u32,
) -> Feasibility {
    let arch = spec.effective_arch();
    if let Err(why) = capacity.accel_for(arch) {
        return Feasibility::Infeasible(why);
    }
    if topology.max_vcpus() > capacity.max_vcpus_per_vm {
        return Feasibility::Infeasible(format!(
            "the VM has {} vCPU slots but this node runs VMs of at most {} vCPUs",
            topology.max_vcpus(),
            capacity.max_vcpus_per_vm
        ));
    }
    if let Err(e) = planner::check_target(topology, spec.granularity, spec.cpus) {
        return Feasibility::Infeasible(match e {
            PlanError::AboveMax { target, max } => format!(
                "spec.cpus {target} is above the VM's maximum of {max} vCPUs (its topology is fixed at creation)"
            ),
            other => other.to_string(),
        });
    }
    if spec.cpus > budget {
        return Feasibility::Infeasible(format!(
            "spec.cpus {} is above this node's whole vCPU budget of {budget} (host CPUs x overcommit)",
            spec.cpus
        ));
    }
    // Shrinking never needs budget; growing needs room for the whole target.
    if spec.cpus > current && promised_to_others.saturating_add(spec.cpus) > budget {
        let free = budget.saturating_sub(promised_to_others);
        return Feasibility::Deferred(format!(
            "the node's vCPU budget is full: {promised_to_others} of {budget} vCPUs are promised to other VMs, {free} free, this VM wants {}",
            spec.cpus
        ));
    }
    Feasibility::Fits
}

/// Why the VM's resize method cannot reach spec.cpus on this guest, if it cannot: under
/// GuestOnline only the guest agent onlines and offlines vCPUs, so a guest whose agent
/// does not answer cannot be resized at all (Infeasible, re-checked as the guest is
/// observed again: an agent that starts later unblocks it).
pub fn method_blocks(spec: &VirtualMachineSpec, guest_agent: bool, current: u32) -> Option<String> {
    (spec.resize_method == ResizeMethod::GuestOnline && !guest_agent && spec.cpus != current)
        .then(|| GUEST_ONLINE_NEEDS_AGENT.to_string())
}

/// Per-slot bookkeeping the agent keeps between observations: when each slot entered its
/// state (for status and for "unplug the most recently plugged first") and sticky
/// failures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotBook {
    /// Slot index -> (state, since).
    pub slots: BTreeMap<u32, (VcpuState, DateTime<Utc>)>,
}

impl SlotBook {
    /// Merge a fresh observation: a slot whose state changed gets `now` as its time.
    /// `overrides` wins over the observation (Plugging/Unplugging/Failed while acting).
    pub fn update(
        &mut self,
        obs: &Observation,
        overrides: &BTreeMap<u32, VcpuState>,
        now: DateTime<Utc>,
    ) {
        for (i, o) in obs.slots.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { continue };
            let state = match overrides.get(&i) {
                // A failed plug that the guest did get is not failed any more.
                Some(VcpuState::Failed) if o.state.is_active() => o.state,
                Some(s) => *s,
                None => o.state,
            };
            match self.slots.get(&i) {
                Some((s, _)) if *s == state => {}
                _ => {
                    self.slots.insert(i, (state, now));
                }
            }
        }
    }

    /// Seed from a previous status (after an agent restart) so plug order survives.
    pub fn seed(&mut self, vcpus: &[corescale_api::VcpuStatus]) {
        for v in vcpus {
            if let Some(since) = v.since {
                self.slots.insert(v.index, (v.state, since));
            }
        }
    }

    /// The planner's view: states, and plug order from the time each slot came in.
    pub fn views(&self, n: u32) -> Vec<SlotView> {
        (0..n)
            .map(|i| match self.slots.get(&i) {
                Some((state, since)) => SlotView {
                    state: *state,
                    plugged_seq: u64::try_from(since.timestamp_millis()).unwrap_or(0),
                },
                None => SlotView::ABSENT,
            })
            .collect()
    }

    /// State of a slot.
    pub fn state(&self, i: u32) -> VcpuState {
        self.slots
            .get(&i)
            .map(|(s, _)| *s)
            .unwrap_or(VcpuState::Absent)
    }
}

/// The plan that moves the VM towards spec.cpus from what the book shows.
pub fn plan_for(vm: &VirtualMachine, book: &SlotBook) -> Result<Plan, PlanError> {
    let t = topology_of(vm);
    let views = book.views(t.max_vcpus());
    planner::plan(&planner::PlanInput {
        topology: t,
        granularity: vm.spec.granularity,
        placement: vm.spec.placement,
        target: vm.spec.cpus,
        slots: &views,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Accel;

    fn vm(extra: &str) -> VirtualMachine {
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: v, namespace: d, uid: u1}}\n{extra}"
        ))
        .unwrap()
    }

    fn cap() -> NodeCapacity {
        NodeCapacity {
            host_cpus: 2,
            max_vcpus_per_vm: 8,
            accel: Accel::Tcg,
            arches: [(corescale_api::Arch::X86_64, Accel::Tcg)].into(),
        }
    }

    #[test]
    fn want_follows_placement_deletion_and_run_strategy() {
        let placed = "spec: {cpus: 1}\nstatus: {nodeName: n1}";
        assert_eq!(want(Some(&vm(placed)), "n1", Some("u1")), Want::Run);
        assert_eq!(want(Some(&vm(placed)), "n2", None), Want::Leave);
        assert_eq!(want(Some(&vm(placed)), "n1", Some("other-uid")), Want::Gone);
        assert_eq!(want(None, "n1", None), Want::Gone);
        let halted = "spec: {cpus: 1, runStrategy: Halted}\nstatus: {nodeName: n1}";
        assert_eq!(want(Some(&vm(halted)), "n1", None), Want::Halt);
        let deleting = vm(placed);
        let mut deleting = deleting;
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(want(Some(&deleting), "n1", None), Want::Delete);
    }

    #[test]
    fn infeasible_and_deferred_say_why() {
        let v = vm("spec: {cpus: 4, topology: {sockets: 1, cores: 4, threads: 1}}");
        let t = topology_of(&v);
        assert_eq!(feasibility(&v.spec, &t, &cap(), 8, 0, 1), Feasibility::Fits);
        match feasibility(&v.spec, &t, &cap(), 8, 6, 1) {
            Feasibility::Deferred(m) => assert!(m.contains("6 of 8 vCPUs are promised"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Shrinking is never deferred.
        assert_eq!(feasibility(&v.spec, &t, &cap(), 8, 8, 4), Feasibility::Fits);
        let big = vm("spec: {cpus: 2, topology: {sockets: 1, cores: 16, threads: 1}}");
        match feasibility(&big.spec, &topology_of(&big), &cap(), 64, 0, 1) {
            Feasibility::Infeasible(m) => assert!(m.contains("at most 8 vCPUs"), "{m}"),
            other => panic!("{other:?}"),
        }
        // More than the node could ever give.
        match feasibility(&v.spec, &t, &cap(), 3, 0, 1) {
            Feasibility::Infeasible(m) => assert!(m.contains("whole vCPU budget of 3"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A POWER guest on a node without qemu-system-ppc64.
        let power =
            vm("spec: {cpus: 1, arch: ppc64le, topology: {sockets: 1, cores: 2, threads: 1}}");
        match feasibility(&power.spec, &topology_of(&power), &cap(), 8, 0, 1) {
            Feasibility::Infeasible(m) => {
                assert_eq!(m, "this node cannot run ppc64le guests (it runs x86_64)")
            }
            other => panic!("{other:?}"),
        }
        let mut both = cap();
        both.arches.insert(corescale_api::Arch::Ppc64le, Accel::Tcg);
        assert_eq!(
            feasibility(&power.spec, &topology_of(&power), &both, 8, 0, 1),
            Feasibility::Fits
        );
        // Above the topology recorded at placement (a spec without topology, then scaled up).
        let grown = vm("spec: {cpus: 6}\nstatus: {topology: {sockets: 1, cores: 4, threads: 1}}");
        match feasibility(&grown.spec, &topology_of(&grown), &cap(), 64, 0, 4) {
            Feasibility::Infeasible(m) => assert!(m.contains("above the VM's maximum of 4"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn guest_online_without_an_agent_is_infeasible_and_says_why() {
        let v = vm("spec: {cpus: 3, resizeMethod: GuestOnline}");
        let m = method_blocks(&v.spec, false, 1).expect("blocked");
        assert!(
            m.contains("qemu-guest-agent") && m.contains("resizeMethod Hotplug"),
            "{m}"
        );
        assert_eq!(method_blocks(&v.spec, true, 1), None, "an agent answers");
        assert_eq!(method_blocks(&v.spec, false, 3), None, "nothing to do");
        let h = vm("spec: {cpus: 3}");
        assert_eq!(h.spec.resize_method, ResizeMethod::Hotplug);
        assert_eq!(
            method_blocks(&h.spec, false, 1),
            None,
            "Hotplug needs no agent"
        );
    }

    #[test]
    fn book_keeps_since_and_orders_unplugs_by_plug_time() {
        let v = vm("spec: {cpus: 1, topology: {sockets: 1, cores: 3, threads: 1}}");
        let obs = |states: [VcpuState; 3]| Observation::of_states(&states, true);
        use VcpuState::*;
        let t0 = DateTime::from_timestamp(100, 0).unwrap();
        let t1 = DateTime::from_timestamp(200, 0).unwrap();
        let t2 = DateTime::from_timestamp(300, 0).unwrap();
        let mut b = SlotBook::default();
        b.update(&obs([Online, Absent, Online]), &BTreeMap::new(), t0);
        b.update(&obs([Online, Online, Online]), &BTreeMap::new(), t1);
        b.update(&obs([Online, Online, Online]), &BTreeMap::new(), t2);
        assert_eq!(b.slots[&1].1, t1, "since moves only on change");
        let p = plan_for(&v, &b).unwrap();
        assert_eq!(
            p.unplug_slots(),
            vec![1, 2],
            "slot 1 came in last, so it goes first"
        );
        let mut o = BTreeMap::new();
        o.insert(2, Unplugging);
        b.update(&obs([Online, Online, Online]), &o, t2);
        assert_eq!(b.state(2), Unplugging);
    }
}
