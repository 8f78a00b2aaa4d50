//! The operator's decisions, pure: what one reconcile of a VM does next ([`decide`]),
//! from the VM and a [`View`] of the nodes and their load. No I/O; unit-tested from
//! fixtures.

use crate::placement::{choose_node, Candidate};
use corescale_api::conditions;
use corescale_api::{
    validate_spec, RunStrategy, Topology, VirtualMachine, FINALIZER, NODE_LABEL, VM_LABEL,
};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// What one reconcile decided to do. Each variant is one write.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do now.
    Nothing,
    /// The VM is being deleted and its node's agent is alive: it stops the guest and then
    /// removes the finalizer.
    WaitForAgent(String),
    /// Remove our finalizer (never placed, or the node's agent is gone).
    RemoveFinalizer(String),
    /// Add our finalizer so deletion waits for the guest to stop; in the same write, the
    /// defaulted topology when the spec has none (one write instead of two per new VM).
    /// Taken when the new VM cannot be placed yet (no node fits, or an invalid spec).
    AddFinalizer(Option<Topology>),
    /// A new VM that fits on `node`: the finalizer, the defaulted topology and the node
    /// labels in one write, then the placement status (two writes instead of three).
    Admit {
        /// The defaulted topology, when the spec has none.
        topology: Option<Topology>,
        /// Target node.
        node: String,
    },
    /// Write the defaulted topology into the spec so it is fixed for the VM's life.
    DefaultTopology(Topology),
    /// The spec breaks a rule that admission should have enforced.
    Invalid(String),
    /// Place the VM on `node`; `from` is set when moving off a lost node.
    Place {
        /// Target node.
        node: String,
        /// Node the VM is moved away from.
        from: Option<String>,
    },
    /// Make sure the labels the node agent selects on are set.
    Label(String),
    /// No node fits now.
    Unschedulable(String),
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct View {
    /// Nodes and their agents' announcements.
    pub candidates: Vec<Candidate>,
    /// vCPUs wanted per node by the VMs placed there, not counting this VM.
    pub load: BTreeMap<String, u32>,
    /// The node this operator wrote into the VM's `status.nodeName`, when the store does
    /// not show it yet.
    pub status_written: Option<String>,
}

impl View {
    fn live(&self, node: &str) -> bool {
        self.candidates
            .iter()
            .any(|c| c.live && c.announcement.node == node)
    }
}

/// Decide the next step for one VM. Pure: unit-tested from fixtures.
pub fn decide(vm: &VirtualMachine, view: &View) -> Decision {
    let status = vm.status.clone().unwrap_or_default();
    let has_finalizer = vm.finalizers().iter().any(|f| f == FINALIZER);
    if vm.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Decision::Nothing;
        }
        let stopped = conditions::get_condition(&status.conditions, conditions::RUNNING)
            .is_some_and(|c| c.status == "False" && c.reason == conditions::REASON_GUEST_STOPPED);
        return match &status.node_name {
            Some(n) if stopped => {
                Decision::RemoveFinalizer(format!("node {n}'s agent stopped the guest"))
            }
            Some(n) if view.live(n) => Decision::WaitForAgent(n.clone()),
            Some(n) => Decision::RemoveFinalizer(format!(
                "node {n}'s agent is gone; its guest is stopped when the agent returns"
            )),
            None => Decision::RemoveFinalizer("the VM was never placed".into()),
        };
    }
    if !has_finalizer {
        if validate_spec(&vm.spec).is_err() {
            return Decision::AddFinalizer(None);
        }
        let topology = vm
            .spec
            .topology
            .is_none()
            .then(|| Topology::default_for(vm.spec.cpus));
        if status.node_name.is_none() {
            let max = vm.spec.effective_topology().max_vcpus();
            if let Ok(node) = choose_node(&vm.spec, max, &view.candidates, &view.load, None) {
                return Decision::Admit { topology, node };
            }
        }
        return Decision::AddFinalizer(topology);
    }
    if let Err(e) = validate_spec(&vm.spec) {
        return Decision::Invalid(e.to_string());
    }
    let Some(topology) = vm.spec.topology else {
        return Decision::DefaultTopology(Topology::default_for(vm.spec.cpus));
    };
    if view
        .status_written
        .as_ref()
        .is_some_and(|n| status.node_name.as_ref() != Some(n))
    {
        // Our placement's status is on its way: the store shows an older object.
        return Decision::Nothing;
    }
    let max = topology.max_vcpus();
    match &status.node_name {
        Some(n) if view.live(n) => {
            if labelled_for(vm, n) {
                Decision::Nothing
            } else {
                Decision::Label(n.clone())
            }
        }
        Some(n) if vm.spec.run_strategy == RunStrategy::Halted => {
            // A halted VM on a lost node has no guest to move; it stays assigned.
            let _ = n;
            Decision::Nothing
        }
        Some(n) => match choose_node(&vm.spec, max, &view.candidates, &view.load, Some(n)) {
            Ok(node) => Decision::Place {
                node,
                from: Some(n.clone()),
            },
            Err(e) => Decision::Unschedulable(format!("node {n}'s agent is gone and {e}")),
        },
        None => match choose_node(&vm.spec, max, &view.candidates, &view.load, None) {
            Ok(node) => Decision::Place { node, from: None },
            Err(e) => Decision::Unschedulable(e.to_string()),
        },
    }
}

/// Whether the VM carries the labels the agent of `node` selects on.
pub(crate) fn labelled_for(vm: &VirtualMachine, node: &str) -> bool {
    vm.labels().get(NODE_LABEL).map(String::as_str) == Some(node)
        && vm.labels().get(VM_LABEL) == Some(&vm.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Candidate;
    use corescale_api::node::NodeAnnouncement;

    fn vm(yaml: &str) -> VirtualMachine {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn view(live: &[(&str, bool)]) -> View {
        View {
            candidates: live
                .iter()
                .map(|(n, l)| Candidate {
                    announcement: NodeAnnouncement {
                        node: (*n).into(),
                        capacity_vcpus: 8,
                        host_cpus: 2,
                        max_vcpus_per_vm: 64,
                        accelerator: "tcg".into(),
                        arches: vec![corescale_api::Arch::X86_64],
                        version: "t".into(),
                    },
                    live: *l,
                    labels: BTreeMap::new(),
                })
                .collect(),
            load: BTreeMap::new(),
            status_written: None,
        }
    }

    const BASE: &str = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: x\n  namespace: d\n";

    #[test]
    fn pipeline_order_finalizer_then_topology_then_place() {
        // A new VM that fits: finalizer, defaulted topology and node labels in one write.
        let v = vm(&format!("{BASE}spec: {{cpus: 2}}"));
        let two = Topology {
            sockets: 1,
            cores: 2,
            threads: 1,
        };
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::Admit {
                topology: Some(two),
                node: "a".into()
            }
        );
        // No node fits yet: the finalizer and topology alone; placing waits.
        assert_eq!(
            decide(&v, &view(&[("a", false)])),
            Decision::AddFinalizer(Some(two))
        );
        // An invalid spec gets no topology written and is not placed; one with a topology
        // keeps it.
        let v = vm(&format!("{BASE}spec: {{cpus: 2, minCpus: 3}}"));
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::AddFinalizer(None)
        );
        let v = vm(&format!(
            "{BASE}spec: {{cpus: 2, topology: {{sockets: 1, cores: 4, threads: 1}}}}"
        ));
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::Admit {
                topology: None,
                node: "a".into()
            }
        );
        // A VM that got its finalizer some other way still gets the topology defaulted.
        let v = vm(&format!(
            "{BASE}  finalizers: [{FINALIZER}]\nspec: {{cpus: 2}}"
        ));
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::DefaultTopology(Topology {
                sockets: 1,
                cores: 2,
                threads: 1
            })
        );
        let v = vm(&format!(
            "{BASE}  finalizers: [{FINALIZER}]\nspec: {{cpus: 2, topology: {{sockets: 1, cores: 4, threads: 1}}}}"
        ));
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::Place {
                node: "a".into(),
                from: None
            }
        );
        assert!(
            matches!(decide(&v, &view(&[])), Decision::Unschedulable(m) if m.contains("no node agent is alive"))
        );
    }

    #[test]
    fn placed_vm_is_labelled_then_left_alone_then_moved_when_its_node_is_lost() {
        let placed = format!(
            "{BASE}  finalizers: [{FINALIZER}]\nspec: {{cpus: 1, topology: {{sockets: 1, cores: 2, threads: 1}}}}\nstatus: {{nodeName: a}}"
        );
        let v = vm(&placed);
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::Label("a".into())
        );
        // The status write of a placement is on its way and the store shows the object of
        // the label write before it: neither placed again nor moved.
        let labels_only = format!(
            "{BASE}  labels: {{{NODE_LABEL}: a, {VM_LABEL}: x}}\n  finalizers: [{FINALIZER}]\nspec: {{cpus: 1, topology: {{sockets: 1, cores: 2, threads: 1}}}}"
        );
        let mut in_flight = view(&[("a", true), ("b", true)]);
        in_flight.status_written = Some("a".into());
        assert_eq!(decide(&vm(&labels_only), &in_flight), Decision::Nothing);
        in_flight.status_written = None;
        assert!(matches!(
            decide(&vm(&labels_only), &in_flight),
            Decision::Place { from: None, .. }
        ));
        let moving = view(&[("a", false), ("b", true)]);
        let mut moved = moving.clone();
        moved.status_written = Some("b".into());
        assert_eq!(decide(&v, &moved), Decision::Nothing);
        assert_eq!(
            decide(&v, &moving),
            Decision::Place {
                node: "b".into(),
                from: Some("a".into())
            }
        );
        let labelled = placed.replace(
            "  finalizers:",
            &format!("  labels: {{{NODE_LABEL}: a, {VM_LABEL}: x}}\n  finalizers:"),
        );
        let v = vm(&labelled);
        assert_eq!(decide(&v, &view(&[("a", true)])), Decision::Nothing);
        assert_eq!(
            decide(&v, &view(&[("a", false), ("b", true)])),
            Decision::Place {
                node: "b".into(),
                from: Some("a".into())
            }
        );
        let halted = labelled.replace("cpus: 1,", "cpus: 1, runStrategy: Halted,");
        assert_eq!(
            decide(&vm(&halted), &view(&[("a", false), ("b", true)])),
            Decision::Nothing
        );
    }

    #[test]
    fn deletion_waits_for_a_live_agent_else_releases() {
        let del = format!(
            "{BASE}  deletionTimestamp: '2026-01-01T00:00:00Z'\n  finalizers: [{FINALIZER}]\nspec: {{cpus: 1}}\nstatus: {{nodeName: a}}"
        );
        let v = vm(&del);
        assert_eq!(
            decide(&v, &view(&[("a", true)])),
            Decision::WaitForAgent("a".into())
        );
        assert!(matches!(
            decide(&v, &view(&[("a", false)])),
            Decision::RemoveFinalizer(_)
        ));
        let stopped = del.replace(
            "status: {nodeName: a}",
            "status: {nodeName: a, conditions: [{type: Running, status: 'False', reason: GuestStopped, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}]}",
        );
        assert!(matches!(
            decide(&vm(&stopped), &view(&[("a", true)])),
            Decision::RemoveFinalizer(m) if m.contains("stopped the guest")
        ));
        let never = del.replace("\nstatus: {nodeName: a}", "");
        assert!(
            matches!(decide(&vm(&never), &view(&[])), Decision::RemoveFinalizer(m) if m.contains("never placed"))
        );
    }

    #[test]
    fn invalid_spec_is_reported_not_acted_on() {
        let v = vm(&format!(
            "{BASE}  finalizers: [{FINALIZER}]\nspec: {{cpus: 9, topology: {{sockets: 1, cores: 4, threads: 1}}}}"
        ));
        assert!(
            matches!(decide(&v, &view(&[("a", true)])), Decision::Invalid(m) if m.contains("spec.cpus"))
        );
    }
}
