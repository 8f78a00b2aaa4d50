//! The operator's reconcile loop, as a pipeline of small steps:
//! observe (stores) -> decide (pure, [`decide`]) -> act (one API write per step) -> report
//! (status by server-side apply, Events, metrics).

use crate::decide::{decide, labelled_for, Decision, View};
use crate::load::{Loads, NodeLoad};
use crate::metrics::Metrics;
use crate::placement::Candidate;
use crate::status::{pending_status, placed_status, status_differs};
use corescale_api::node::{NodeAnnouncement, AGENT_LEASE_PREFIX};
use corescale_api::{
    Topology, VirtualMachine, VirtualMachineStatus, FINALIZER, NODE_LABEL, VM_LABEL,
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
