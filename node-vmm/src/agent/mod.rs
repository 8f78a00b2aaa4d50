//! The node agent: turns the `VirtualMachine`s placed on this node into running guests
//! whose online vCPUs follow `spec.cpus`, one hop from the API server.
//!
//! - announces the node (a Lease with its capacity) and renews it;
//! - watches only the VMs labelled for this node, in all namespaces;
//! - runs one [`worker::Worker`] task per VM, fed the latest object through a watch
//!   channel, so bursts of writes coalesce and one VM's slow guest never blocks another;
//! - re-adopts guests that kept running while the agent was away.

pub mod budget;
pub mod decide;
pub mod launcher_size;
pub mod requester;
pub mod worker;
pub mod workload;
pub mod write_bound;

use crate::backend::{Backend, BackendError, NodeCapacity, VmHandle, VmKey, VmSpec};
use crate::images::ImageDir;
use crate::metrics::Metrics;
use budget::Budget;
use corescale_api::node::{lease_name, NodeAnnouncement, AGENT_LEASE_LABEL};
use corescale_api::{Topology, VirtualMachine, NODE_LABEL};
use corescale_common::events::EventRecorder as Recorder;
use corescale_common::lease::{acquire_or_renew, LeaseClaim};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use launcher_size::{Answer, Claim, LauncherSizer};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// How long after start the launcher container is written to the guests found, whether
/// or not a hold changed.
const ADOPTION_SETTLES: Duration = Duration::from_secs(30);

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace of the node-agent Leases.
    pub system_namespace: String,
    /// Lease duration (renewed every third of it).
    pub lease_duration: Duration,
    /// The node's vCPU budget is host CPUs times this ratio.
    pub overcommit: f64,
    /// How long a plugged vCPU may take to be acknowledged and onlined.
    pub plug_timeout: Duration,
    /// How long a guest may take to power off before its VMM is killed.
    pub stop_grace: Duration,
    /// A resize step still running after this long has its in-progress status (slots
    /// Plugging/Unplugging, `lastResize` InProgress, `ResizeInProgress` True) written while
    /// it goes on, and a guest still booting after this long is reported Starting; a step
    /// or boot done sooner is reported once, when it is done. Those writes would otherwise
    /// be half the status writes of every resize and start, and compete with the work.
    pub in_progress_after: Duration,
    /// How long a booting guest's agent may stay silent before the VM is run as a guest
    /// without one: Running, resized on the VMM's own signals, its vCPUs reported Present
    /// (Ready reason `NoGuestAgent`). An agent that answers later is picked up then.
    pub agent_grace: Duration,
    /// The node address forwarded guest ports listen on (QEMU's hostfwd: IPv4).
    pub port_address: std::net::Ipv4Addr,
    /// The address status.ports shows for them (the pod or node IP clients reach), when it
    /// differs from `port_address` (which may be 0.0.0.0).
    pub port_advertise: Option<String>,
    /// Status writes and Events the node's workers may have in flight at once (0: no
    /// bound; see [`write_bound`]).
    pub writes_in_flight: usize,
}

/// What every worker shares.
pub struct Shared {
    /// API client.
    pub client: Client,
    /// This node.
    pub node: String,
    /// The backend running the guests.
    pub backend: Arc<dyn Backend>,
    /// What the node can run.
    pub capacity: NodeCapacity,
    /// Boot files (None for backends that boot nothing, like the simulator).
    pub images: Option<ImageDir>,
    /// Metrics.
    pub metrics: Metrics,
    /// Event recorder.
    pub recorder: Recorder,
    /// The node's vCPU budget.
    pub budget: Budget,
    /// Sizes the launcher container to the guests (None outside a pod, or when off).
    pub sizer: Option<Arc<LauncherSizer>>,
    /// Settings.
    pub config: Config,
    /// Bounds the workers' API writes in flight (`Config::writes_in_flight`).
    pub writes: write_bound::WriteBound,
}

impl Shared {
    /// The node's budget: host CPUs times the overcommit ratio.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn budget_of(capacity: &NodeCapacity, overcommit: f64) -> u32 {
        let b = (f64::from(capacity.host_cpus) * overcommit).floor();
        if b.is_finite() && b >= 1.0 && b < f64::from(u32::MAX) {
            // Checked above: finite, whole, within u32, so the cast is exact.
            b as u32
        } else {
            capacity.host_cpus.max(1)
        }
    }

    /// What `vm` holds at `vcpus` vCPUs.
    fn claim(vm: &VirtualMachine, vcpus: u32) -> Claim {
        Claim {
            vcpus,
            memory: corescale_api::validate::parse_quantity(&vm.spec.memory.0).unwrap_or(0),
        }
    }

    /// Record that `vm` holds `vcpus` vCPUs now, in the node's budget and the launcher
    /// container (a shrink there is written in the background).
    pub fn hold(&self, key: &VmKey, vm: &VirtualMachine, vcpus: u32) {
        self.budget.hold(key, vcpus);
        if let Some(s) = &self.sizer {
            s.hold(key, Self::claim(vm, vcpus));
        }
    }

    /// `key` holds nothing on this node any more.
    pub fn release(&self, key: &VmKey) {
        self.budget.release(key);
        if let Some(s) = &self.sizer {
            s.release(key);
        }
    }

    /// Give the launcher container room for `vm` at `vcpus` vCPUs before it boots or
    /// plugs, and wait for the kubelet; [`Answer::Applied`] when there is no sizer.
    pub async fn grow(&self, key: &VmKey, vm: &VirtualMachine, vcpus: u32) -> Answer {
        match &self.sizer {
            Some(s) => s.grow(key, Self::claim(vm, vcpus)).await,
            None => Answer::Applied,
        }
    }

    /// The backend's start request for a VM.
    pub fn vm_spec(
        &self,
        vm: &VirtualMachine,
        topology: Topology,
        boot_vcpus: u32,
    ) -> Result<VmSpec, BackendError> {
        let (kernel, initrd, cmdline) = match &self.images {
            Some(images) => {
                let f = images.resolve(vm.spec.boot.as_ref(), vm.spec.effective_arch())?;
                (f.kernel, f.initrd, Some(f.cmdline))
            }
            None => (Default::default(), None, None),
        };
        // The backend said which accelerator each architecture gets here.
        let arch = vm.spec.effective_arch();
        let accel = self
            .capacity
            .accel_for(arch)
            .map_err(|message| BackendError::InvalidSpec {
                field: "spec.arch",
                message,
            })?;
        let mut spec = worker::vm_spec_of(vm, topology, boot_vcpus, accel, kernel, initrd)?;
        if let Some(c) = cmdline {
            spec.cmdline = c;
        }
        Ok(spec)
    }

    /// What this node announces on its Lease.
    pub fn announcement(&self) -> NodeAnnouncement {
        NodeAnnouncement {
            node: self.node.clone(),
            capacity_vcpus: self.budget.total(),
            host_cpus: self.capacity.host_cpus,
            max_vcpus_per_vm: self.capacity.max_vcpus_per_vm,
            accelerator: self.capacity.accel.as_str().to_string(),
            arches: self.capacity.arches.keys().copied().collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Keep this node's Lease renewed with its announcement, forever.
pub async fn announce(shared: Arc<Shared>) {
    let api: Api<Lease> = Api::namespaced(shared.client.clone(), &shared.config.system_namespace);
    let claim = LeaseClaim {
        name: lease_name(&shared.node),
        holder: shared.node.clone(),
        duration: shared.config.lease_duration,
        labels: [(AGENT_LEASE_LABEL.to_string(), "true".to_string())].into(),
        annotations: shared.announcement().to_annotations(),
    };
    let period = shared.config.lease_duration / 3;
    loop {
        match acquire_or_renew(&api, &claim).await {
            Ok(true) => tracing::debug!(lease = %claim.name, "lease renewed"),
            Ok(false) => {
                tracing::warn!(lease = %claim.name, "another holder has this node's lease")
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the node lease"),
        }
        tokio::time::sleep(period).await;
    }
}

struct Slot {
    tx: watch::Sender<Option<Arc<VirtualMachine>>>,
}

/// Route watch events to per-VM workers, spawning them as VMs appear.
pub struct Dispatcher {
    shared: Arc<Shared>,
    workers: HashMap<VmKey, Slot>,
    adopted: HashMap<VmKey, Box<dyn VmHandle>>,
    done_tx: mpsc::UnboundedSender<VmKey>,
    done_rx: mpsc::UnboundedReceiver<VmKey>,
}

impl Dispatcher {
    /// A dispatcher with the guests found running at start-up.
    pub fn new(shared: Arc<Shared>, adopted: HashMap<VmKey, Box<dyn VmHandle>>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Dispatcher {
            shared,
            workers: HashMap::new(),
            adopted,
            done_tx,
            done_rx,
        }
    }

    fn key_of(vm: &VirtualMachine) -> VmKey {
        VmKey {
            namespace: vm.namespace().unwrap_or_default(),
            name: vm.name_any(),
        }
    }

    /// Hand the latest object (or its absence) to the VM's worker.
    pub fn dispatch(&mut self, key: VmKey, vm: Option<Arc<VirtualMachine>>) {
        while let Ok(k) = self.done_rx.try_recv() {
            self.workers.remove(&k);
        }
        if let Some(slot) = self.workers.get(&key) {
            if !slot.tx.is_closed() {
                slot.tx.send_replace(vm);
                return;
            }
        }
        if vm.is_none() && !self.adopted.contains_key(&key) {
            return; // nothing runs for it here
        }
        let (tx, rx) = watch::channel(vm);
        let adopted = self.adopted.remove(&key);
        let w = worker::Worker::new(key.clone(), self.shared.clone(), rx, adopted);
        let done = self.done_tx.clone();
        let k = key.clone();
        // Every line the worker logs carries the VM: one span for the task.
        let span = tracing::info_span!("vm", vm = %key);
        tokio::spawn(
            async move {
                w.run().await;
                let _ = done.send(k);
            }
            .instrument(span),
        );
        self.workers.insert(key, Slot { tx });
    }

    /// After the first full list: adopted guests without an object here are stopped.
    pub fn init_done(&mut self) {
        let orphans: Vec<VmKey> = self.adopted.keys().cloned().collect();
        for k in orphans {
            tracing::info!(vm = %k, "guest has no VM object placed on this node; stopping it");
            self.dispatch(k, None);
        }
    }
}

/// Adopt every guest the backend finds running (after an agent restart).
pub async fn adopt_running(backend: &dyn Backend) -> HashMap<VmKey, Box<dyn VmHandle>> {
    let mut out = HashMap::new();
    match backend.running().await {
        Ok(specs) => {
            for spec in specs {
                match backend.adopt(&spec).await {
                    Ok(h) => {
                        tracing::info!(vm = %spec.key(), "adopted running guest");
                        out.insert(spec.key(), h);
                    }
                    Err(e) => {
                        tracing::warn!(vm = %spec.key(), error = %e, "cannot adopt guest; cleaning up");
                        let _ = backend.cleanup(&spec.key()).await;
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list running guests"),
    }
    out
}

/// Run the agent until the process ends.
pub async fn run_agent(shared: Arc<Shared>) -> anyhow::Result<()> {
    tokio::spawn(announce(shared.clone()));
    if let Some(sizer) = shared.sizer.clone() {
        tokio::spawn(async move {
            // Once the guests found at start have been observed (their holds are written
            // as they come), the pod is written to them even if none changed: the agent
            // before this one may have left it sized for guests that are gone.
            tokio::time::sleep(ADOPTION_SETTLES).await;
            sizer.poke();
            sizer.run().await;
        });
    }
    let adopted = adopt_running(shared.backend.as_ref()).await;
    let mut dispatcher = Dispatcher::new(shared.clone(), adopted);
    let vms: Api<VirtualMachine> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().labels(&format!("{NODE_LABEL}={}", shared.node));
    let mut stream = std::pin::pin!(watcher(vms, cfg).default_backoff());
    let mut initial: Vec<Arc<VirtualMachine>> = Vec::new();
    let mut listing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => {
                listing = true;
                initial.clear();
            }
            Ok(watcher::Event::InitApply(vm)) => initial.push(Arc::new(vm)),
            Ok(watcher::Event::InitDone) => {
                listing = false;
                // A re-list (after a watch expired) replaces what we knew: objects not in it
                // were deleted while we were not looking.
                let seen: std::collections::HashSet<VmKey> =
                    initial.iter().map(|v| Dispatcher::key_of(v)).collect();
                let known: Vec<VmKey> = dispatcher.workers.keys().cloned().collect();
                for k in known.into_iter().filter(|k| !seen.contains(k)) {
                    dispatcher.dispatch(k, None);
                }
                for vm in initial.drain(..) {
                    dispatcher.dispatch(Dispatcher::key_of(&vm), Some(vm));
                }
                dispatcher.init_done();
            }
            Ok(watcher::Event::Apply(vm)) => {
                dispatcher.dispatch(Dispatcher::key_of(&vm), Some(Arc::new(vm)));
            }
            Ok(watcher::Event::Delete(vm)) => {
                dispatcher.dispatch(Dispatcher::key_of(&vm), None);
            }
            Err(e) => {
                // The API server may be away: guests keep running untouched; the watcher
                // retries with backoff and re-lists.
                tracing::warn!(error = %e, listing, "watch error");
            }
        }
    }
    Ok(())
}

/// Build the agent's shared state.
#[allow(clippy::too_many_arguments)]
pub fn shared(
    client: Client,
    node: String,
    backend: Arc<dyn Backend>,
    images: Option<ImageDir>,
    metrics: Metrics,
    config: Config,
    sizer: Option<Arc<LauncherSizer>>,
) -> Arc<Shared> {
    let capacity = backend.capacity();
    let budget = Budget::new(Shared::budget_of(&capacity, config.overcommit));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "corescale-node-vmm".into(),
            instance: Some(node.clone()),
        },
    );
    Arc::new(Shared {
        client,
        node,
        backend,
        capacity,
        images,
        metrics,
        recorder,
        budget,
        sizer,
        writes: write_bound::WriteBound::new(config.writes_in_flight),
        config,
    })
}
