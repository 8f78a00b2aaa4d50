//! The statuses the operator writes, pure: the placement status (taking over what a lost
//! node last reported on a reschedule) and the pending status of a VM it cannot place.

use corescale_api::conditions::{self, set_condition};
use corescale_api::{Phase, VirtualMachine, VirtualMachineStatus, VM_LABEL};
use kube::{Resource, ResourceExt};

/// The status the operator writes when it places a VM on `node`. On a reschedule it also
/// takes over what the lost node's agent last reported (online vCPUs, Ready), so nobody
/// reads the old node's guest as the new one's until the new agent reports.
pub(crate) fn placed_status(
    vm: &VirtualMachine,
    node: &str,
    message: &str,
    rescheduled: bool,
) -> VirtualMachineStatus {
    let topology = vm.spec.effective_topology();
    let mut conds = Vec::new();
    let existing = vm
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if let Some(c) = conditions::get_condition(&existing, conditions::SCHEDULED) {
        conds.push(c.clone());
    }
    set_condition(
        &mut conds,
        conditions::SCHEDULED,
        true,
        "Placed",
        message,
        vm.meta().generation,
        chrono::Utc::now(),
    );
    let mut cpus = None;
    if rescheduled {
        let now = chrono::Utc::now();
        let g = vm.meta().generation;
        let why = format!("moved to {node}; waiting for its node agent");
        for t in [conditions::RUNNING, conditions::READY] {
            set_condition(&mut conds, t, false, "Rescheduled", why.clone(), g, now);
        }
        cpus = Some(0);
    }
    VirtualMachineStatus {
        phase: Some(Phase::Scheduled),
        cpus,
        node_name: Some(node.to_string()),
        max_cpus: Some(topology.max_vcpus()),
        topology: Some(topology),
        selector: Some(format!("{VM_LABEL}={}", vm.name_any())),
        conditions: conds,
        ..Default::default()
    }
}

pub(crate) fn pending_status(
    vm: &VirtualMachine,
    reason: &str,
    message: &str,
) -> VirtualMachineStatus {
    let existing = vm
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut conds: Vec<_> = conditions::get_condition(&existing, conditions::SCHEDULED)
        .cloned()
        .into_iter()
        .collect();
    set_condition(
        &mut conds,
        conditions::SCHEDULED,
        false,
        reason,
        message,
        vm.meta().generation,
        chrono::Utc::now(),
    );
    let phase = if reason == "InvalidSpec" {
        Phase::Failed
    } else {
        Phase::Pending
    };
    VirtualMachineStatus {
        phase: Some(phase),
        selector: Some(format!("{VM_LABEL}={}", vm.name_any())),
        conditions: conds,
        ..Default::default()
    }
}

/// Whether applying `want` would change what the object shows.
pub(crate) fn status_differs(vm: &VirtualMachine, want: &VirtualMachineStatus) -> bool {
    let have = vm.status.clone().unwrap_or_default();
    let cond = |s: &VirtualMachineStatus| {
        conditions::get_condition(&s.conditions, conditions::SCHEDULED)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    have.phase != want.phase
        || have.node_name != want.node_name
        || have.selector != want.selector
        || have.topology != want.topology
        || have.max_cpus != want.max_cpus
        || cond(&have) != cond(want)
}
