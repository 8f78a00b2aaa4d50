//! The operator's reconcile loop, as a pipeline of small steps:
//! observe (stores) -> decide (pure, [`decide`]) -> act (one API write per step) -> report
//! (status by server-side apply, Events, metrics).

use crate::load::{Loads, NodeLoad};
use crate::metrics::Metrics;
use crate::placement::{choose_node, Candidate};
use corescale_api::conditions::{self, set_condition};
use corescale_api::node::{NodeAnnouncement, AGENT_LEASE_PREFIX};
use corescale_api::{
    validate_spec, Phase, RunStrategy, Topology, VirtualMachine, VirtualMachineStatus, FINALIZER,
    NODE_LABEL, VM_LABEL,
};
use corescale_common::events::EventRecorder as Recorder;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Field manager of the operator's writes.
pub const MANAGER: &str = "corescale-operator";

/// Errors of one reconcile.
#[derive(Debug, Error)]
pub enum ReconcileError {
    /// A write or read against the API server failed.
    #[error("{action} failed: {source}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// The client error.
        source: kube::Error,
    },
    /// The object has no namespace (the CRD is namespaced, so this is a bug).
    #[error("VirtualMachine {0} has no namespace")]
    NoNamespace(String),
}

impl ReconcileError {
    /// A bounded category for the errors metric.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 409 => "conflict",
            ReconcileError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 404 => "not_found",
            ReconcileError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => "forbidden",
            ReconcileError::Api {
                source: kube::Error::Api(_),
                ..
            } => "api_refused",
            ReconcileError::Api { .. } => "api_unreachable",
            ReconcileError::NoNamespace(_) => "invalid_object",
        }
    }
}

/// Settings of the operator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace holding the node agents' Leases.
    pub system_namespace: String,
    /// How often to retry placing a VM that fits nowhere.
    pub unschedulable_retry: Duration,
}

/// Shared state of all reconciles.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: Config,
    /// Node-agent Leases in the system namespace.
    pub leases: Store<Lease>,
    /// Which agents count as alive (fed every Lease the watch delivers).
    pub liveness: std::sync::Arc<crate::liveness::Liveness>,
    /// Node objects (for nodeSelector).
    pub nodes: Store<Node>,
    /// All VirtualMachines (phase counts).
    pub vms: Store<VirtualMachine>,
    /// vCPUs per node, fed by the VM watch and by placements made here that the watch
    /// does not show yet (the store lags the writes).
    pub load: Arc<NodeLoad>,
    /// Placements whose status (`nodeName`) was written and is not yet seen in `vms`. A
    /// placement writes the labels first and the status second; the labels' watch event
    /// triggers a reconcile that may read the object before its status arrives, and must
    /// neither place it again nor move it.
    pub status_written: Mutex<HashMap<ObjectRef<VirtualMachine>, String>>,
}

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
fn labelled_for(vm: &VirtualMachine, node: &str) -> bool {
    vm.labels().get(NODE_LABEL).map(String::as_str) == Some(node)
        && vm.labels().get(VM_LABEL) == Some(&vm.name_any())
}

impl Context {
    /// Build the [`View`] for one VM from the stores and the load index.
    ///
    /// The caller holds the load index's lock across the decision so that choosing a node
    /// and reserving it is one step (concurrent reconciles of a burst would otherwise all
    /// see one load).
    pub fn view(&self, vm: &VirtualMachine, loads: &Loads) -> View {
        let now = Timestamp::now();
        let nodes: HashMap<String, BTreeMap<String, String>> = self
            .nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect();
        let candidates: Vec<Candidate> = self
            .leases
            .state()
            .iter()
            .filter(|l| l.name_any().starts_with(AGENT_LEASE_PREFIX))
            .filter_map(|l| {
                let ann = l.annotations();
                match NodeAnnouncement::from_lease(&l.name_any(), ann) {
                    Ok(a) => Some(Candidate {
                        labels: nodes.get(&a.node).cloned().unwrap_or_default(),
                        live: self.liveness.is_live(l, now),
                        announcement: a,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring malformed node-agent lease");
                        None
                    }
                }
            })
            .collect();
        // The load of every node is needed only to place the VM (a VM on a live node is
        // reconciled on each of its status writes); it comes from the index, O(nodes).
        let node = vm.status.as_ref().and_then(|s| s.node_name.as_deref());
        let placed_on_live = node.is_some_and(|n| {
            candidates
                .iter()
                .any(|c| c.live && c.announcement.node == n)
        });
        if placed_on_live {
            return View {
                candidates,
                load: BTreeMap::new(),
                status_written: None,
            };
        }
        let load = loads.except(vm);
        View {
            candidates,
            load,
            status_written: None,
        }
    }
}

/// The status the operator writes when it places a VM on `node`. On a reschedule it also
/// takes over what the lost node's agent last reported (online vCPUs, Ready), so nobody
/// reads the old node's guest as the new one's until the new agent reports.
fn placed_status(
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

fn pending_status(vm: &VirtualMachine, reason: &str, message: &str) -> VirtualMachineStatus {
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
fn status_differs(vm: &VirtualMachine, want: &VirtualMachineStatus) -> bool {
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

async fn apply_status(
    api: &Api<VirtualMachine>,
    name: &str,
    status: &VirtualMachineStatus,
) -> Result<(), ReconcileError> {
    let body = corescale_api::status_apply_body(status);
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| ReconcileError::Api {
        action: "apply status",
        source,
    })?;
    Ok(())
}

/// Parameters of the operator's updates (merge patches): named after it in managedFields,
/// not "unknown".
fn update_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.to_string()),
        ..PatchParams::default()
    }
}

async fn clear_vcpus(api: &Api<VirtualMachine>, name: &str) -> Result<(), ReconcileError> {
    let body = json!({"status": {"vcpus": null}});
    api.patch_status(name, &update_params(), &Patch::Merge(&body))
        .await
        .map_err(|source| ReconcileError::Api {
            action: "clear the lost node's vCPU states",
            source,
        })?;
    Ok(())
}

/// The labels the node agent of `node` selects on, as a merge-patch `metadata.labels`.
fn node_labels(vm: &VirtualMachine, node: &str) -> serde_json::Value {
    json!({NODE_LABEL: node, VM_LABEL: vm.name_any()})
}

async fn set_finalizers(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    finalizers: Vec<String>,
    topology: Option<Topology>,
    node: Option<&str>,
) -> Result<(), ReconcileError> {
    // The resourceVersion makes this a compare-and-swap: a concurrent change of the list
    // (another controller's finalizer) makes it fail with 409 and we retry on fresh data.
    let mut body = json!({"metadata": {
        "resourceVersion": vm.resource_version(),
        "finalizers": finalizers,
    }});
    if let Some(t) = topology {
        body["spec"] = json!({ "topology": t });
    }
    if let Some(n) = node {
        body["metadata"]["labels"] = node_labels(vm, n);
    }
    merge_patch(api, vm, &body, "patch finalizers").await
}

async fn set_labels(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    node: &str,
) -> Result<(), ReconcileError> {
    let body = json!({"metadata": {"labels": node_labels(vm, node)}});
    merge_patch(api, vm, &body, "label VM").await
}

async fn merge_patch(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    body: &serde_json::Value,
    action: &'static str,
) -> Result<(), ReconcileError> {
    api.patch(&vm.name_any(), &update_params(), &Patch::Merge(body))
        .await
        .map_err(|source| ReconcileError::Api { action, source })?;
    Ok(())
}

async fn publish(ctx: &Context, vm: &VirtualMachine, type_: EventType, reason: &str, note: String) {
    if let Err(e) = ctx
        .recorder
        .note(&vm.object_ref(&()), type_, reason, note)
        .await
    {
        tracing::warn!(error = %e, vm = %vm.name_any(), reason, "cannot publish event");
    }
}

/// Reconcile one VM: decide, then carry out the one write the decision needs.
pub async fn reconcile(
    vm: Arc<VirtualMachine>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let timer = ctx.metrics.reconcile_duration.start_timer();
    let ns = vm
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(vm.name_any()))?;
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let name = vm.name_any();
    let (view, decision) = {
        let mut loads = ctx.load.lock();
        let mut view = ctx.view(&vm, &loads);
        if let Ok(mut written) = ctx.status_written.lock() {
            let me = ObjectRef::from_obj(vm.as_ref());
            let shown = vm.status.as_ref().and_then(|s| s.node_name.as_ref());
            match written.get(&me) {
                Some(n) if shown == Some(n) => {
                    written.remove(&me);
                }
                Some(n) => view.status_written = Some(n.clone()),
                None => {}
            }
        }
        let decision = decide(&vm, &view);
        if let Decision::Place { node, .. } | Decision::Admit { node, .. } = &decision {
            loads.place(&vm, node);
        }
        (view, decision)
    };
    tracing::debug!(vm = %format!("{ns}/{name}"), ?decision, "reconcile");
    let action = match decision {
        Decision::Nothing => Action::requeue(Duration::from_secs(300)),
        Decision::WaitForAgent(_) => Action::requeue(Duration::from_secs(10)),
        Decision::RemoveFinalizer(why) => {
            let rest = vm
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&api, &vm, rest, None, None).await?;
            publish(&ctx, &vm, EventType::Normal, "FinalizerRemoved", why).await;
            forget(&ctx, &vm);
            Action::await_change()
        }
        Decision::AddFinalizer(topology) => {
            let mut all = vm.finalizers().to_vec();
            all.push(FINALIZER.to_string());
            set_finalizers(&api, &vm, all, topology, None).await?;
            Action::await_change()
        }
        Decision::Admit { topology, node } => {
            let mut all = vm.finalizers().to_vec();
            all.push(FINALIZER.to_string());
            // Labels before status: the agent that the labels route the VM to waits for
            // its nodeName, so a failed status write leaves nothing started.
            set_finalizers(&api, &vm, all, topology, Some(&node)).await?;
            write_placement(&ctx, &api, &vm, &view, &node, None).await?;
            Action::requeue(Duration::from_secs(300))
        }
        Decision::DefaultTopology(t) => {
            let body = json!({"spec": {"topology": t}});
            api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&body))
                .await
                .map_err(|source| ReconcileError::Api {
                    action: "default spec.topology",
                    source,
                })?;
            Action::await_change()
        }
        Decision::Invalid(msg) => {
            let want = pending_status(&vm, "InvalidSpec", &msg);
            if status_differs(&vm, &want) {
                apply_status(&api, &name, &want).await?;
                publish(&ctx, &vm, EventType::Warning, "InvalidSpec", msg).await;
            }
            Action::await_change()
        }
        Decision::Label(node) => {
            set_labels(&api, &vm, &node).await?;
            Action::requeue(Duration::from_secs(300))
        }
        Decision::Place { node, from } => {
            if from.is_some() {
                // The lost node's agent owns the vCPU entries: an update (not an apply)
                // removes them whoever owns them, before the new node is named, so the new
                // agent's first report starts from an empty list.
                clear_vcpus(&api, &name).await?;
            }
            if !labelled_for(&vm, &node) {
                set_labels(&api, &vm, &node).await?;
            }
            write_placement(&ctx, &api, &vm, &view, &node, from.as_deref()).await?;
            Action::requeue(Duration::from_secs(300))
        }
        Decision::Unschedulable(msg) => {
            let want = pending_status(&vm, "Unschedulable", &msg);
            if status_differs(&vm, &want) {
                apply_status(&api, &name, &want).await?;
                publish(&ctx, &vm, EventType::Warning, "FailedScheduling", msg).await;
            }
            Action::requeue(ctx.config.unschedulable_retry)
        }
    };
    timer.observe_duration();
    Ok(action)
}

/// The last write of a placement: the status that names `node` (the agent there starts
/// the guest when it sees it), remembered until the store shows it; then the Event.
async fn write_placement(
    ctx: &Context,
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    view: &View,
    node: &str,
    from: Option<&str>,
) -> Result<(), ReconcileError> {
    let message = match from {
        Some(old) => format!("moved from {old} (its agent stopped renewing its lease) to {node}"),
        None => {
            let free = view
                .candidates
                .iter()
                .find(|c| c.announcement.node == node)
                .map(|c| {
                    i64::from(c.announcement.capacity_vcpus)
                        - i64::from(view.load.get(node).copied().unwrap_or(0))
                })
                .unwrap_or(0);
            format!("placed on {node} ({free} free vCPUs)")
        }
    };
    let status = placed_status(vm, node, &message, from.is_some());
    apply_status(api, &vm.name_any(), &status).await?;
    if let Ok(mut written) = ctx.status_written.lock() {
        written.insert(ObjectRef::from_obj(vm), node.to_string());
    }
    let reason = if from.is_some() {
        "Rescheduled"
    } else {
        "Scheduled"
    };
    publish(ctx, vm, EventType::Normal, reason, message).await;
    Ok(())
}

fn forget(ctx: &Context, vm: &VirtualMachine) {
    ctx.load.lock().forget(vm);
    if let Ok(mut w) = ctx.status_written.lock() {
        w.remove(&ObjectRef::from_obj(vm));
    }
}

/// Back off after a failed reconcile, and count the failure by category.
pub fn error_policy(_vm: Arc<VirtualMachine>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.category()])
        .inc();
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
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
                        arches: vec!["x86_64".into()],
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
