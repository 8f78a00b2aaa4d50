//! Wiring: command-line options, leader election, watches and the controller.

use crate::controller::{self, Config, Context};
use crate::liveness::Liveness;
use crate::load::NodeLoad;
use crate::metrics::Metrics;
use clap::Parser;
use corescale_api::node::{NodeAnnouncement, AGENT_LEASE_LABEL};
use corescale_api::VirtualMachine;
use corescale_common::events::EventRecorder as Recorder;
use corescale_common::lease::{self, LeaseClaim};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The annotation `kubectl apply` (client-side) keeps the whole applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// corescale operator: places VirtualMachines on nodes and owns their lifecycle.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Watch VirtualMachines in this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the operator's own Lease and of the node agents' Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "corescale-system")]
    pub system_namespace: String,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Identity in leader election (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Run without leader election (a single replica only).
    #[arg(long)]
    pub no_leader_elect: bool,
    /// Name of the operator's leader-election Lease.
    #[arg(long, default_value = "corescale-operator")]
    pub lease_name: String,
    /// Seconds a leader may go without renewing before another replica takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds between placement retries of a VM that fits nowhere.
    #[arg(long, default_value_t = 15)]
    pub unschedulable_retry_seconds: u64,
    /// Reconciles in flight at once. Bounded so that a burst (1000 VMs applied at once)
    /// queues here, not in the API server, where the operator's own Lease renewals would
    /// wait behind it and leadership could be lost in the middle of the burst.
    #[arg(long, env = "CORESCALE_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// Log as JSON lines (default) or as text (`--log-format text`).
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

/// Run the operator until it is told to stop (SIGTERM or SIGINT).
///
/// With leader election it acts only while it holds the Lease. Losing it (another replica
/// took it, or the API server was away longer than the Lease) stops every reconcile at
/// once; the process stays, campaigns again, and resumes with fresh watches when it leads
/// again, so an API-server restart does not need a pod restart.
pub async fn run(args: Args) -> anyhow::Result<()> {
    corescale_common::logging::init(args.log_format == "json");
    let client = Client::try_default().await?;
    let metrics = Metrics::new()?;
    let health = Arc::new(corescale_common::http::Health::default());
    let addr =
        corescale_common::http::serve(args.metrics_addr, metrics.registry.clone(), health.clone())
            .await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("told to stop");
            let _ = stop_tx.send(true);
        });
    }

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("corescale-operator-{}", std::process::id()));
    let mut leading = None;
    if !args.no_leader_elect {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let claim = LeaseClaim {
            name: args.lease_name.clone(),
            holder: identity.clone(),
            duration: Duration::from_secs(args.lease_seconds),
            labels: Default::default(),
            annotations: Default::default(),
        };
        let api: Api<Lease> = Api::namespaced(client.clone(), &args.system_namespace);
        tokio::spawn(lease::hold_forever(api, claim, tx));
        leading = Some(rx);
    }

    let vms: Api<VirtualMachine> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let liveness = Arc::new(Liveness::default());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &args.system_namespace);
    let (lease_store, lease_writer) = reflector::store();
    let lease_stream = reflector(
        lease_writer,
        watcher(
            leases_api,
            watcher::Config::default().labels(&format!("{AGENT_LEASE_LABEL}=true")),
        ),
    )
    .default_backoff()
    .touched_objects();
    let nodes_api: Api<Node> = Api::all(client.clone());
    let (node_store, node_writer) = reflector::store();
    let node_stream = reflector(node_writer, watcher(nodes_api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    {
        let liveness = liveness.clone();
        tokio::spawn(lease_stream.for_each(move |l| {
            if let Ok(l) = l {
                liveness.observe(&l);
            }
            futures::future::ready(())
        }));
    }
    tokio::spawn(node_stream.for_each(|_| futures::future::ready(())));

    // Reconcile every VM when the set of live nodes or their announcements change (an agent
    // appears, dies, or changes capacity) — not on every Lease renewal, which would make
    // the work grow with nodes x VMs.
    let (trigger_tx, _) = tokio::sync::watch::channel(0u64);
    {
        let leases = lease_store.clone();
        let liveness = liveness.clone();
        let trigger_tx = trigger_tx.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = k8s_openapi::jiff::Timestamp::now();
                let mut fp: Vec<String> = leases
                    .state()
                    .iter()
                    .filter(|l| liveness.is_live(l, now))
                    .filter_map(|l| {
                        NodeAnnouncement::from_lease(&l.name_any(), l.annotations()).ok()
                    })
                    .map(|a| format!("{a:?}"))
                    .collect();
                fp.sort();
                let fp = fp.join("|");
                if fp != last {
                    tracing::info!(nodes = %fp, "live node agents changed");
                    last = fp;
                    trigger_tx.send_modify(|n| *n += 1);
                }
            }
        });
    }

    loop {
        if let Some(rx) = leading.as_mut() {
            tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
            let mut stop = stop_rx.clone();
            tokio::select! {
                r = rx.wait_for(|l| *l) => { r?; }
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            tracing::info!(%identity, "leading");
            metrics.leader.set(1);
        }
        // One VM watch feeds the store, the load index and the controller's queue.
        let load = Arc::new(NodeLoad::default());
        let (vm_store, vm_writer) = reflector::store();
        let vm_stream = {
            let load = load.clone();
            watcher(vms.clone(), watcher::Config::default())
                .default_backoff()
                // The store keeps every VM of the cluster; nothing here reads who wrote
                // which field or what `kubectl apply` last sent, which are most of a
                // small object's bytes (operator RSS at 10,000 VMs: the scale benchmark).
                .modify(|vm| {
                    vm.managed_fields_mut().clear();
                    vm.annotations_mut().remove(LAST_APPLIED);
                })
                .reflect(vm_writer)
                .inspect_ok(move |event| load.lock().observe(event))
                .applied_objects()
        };
        let controller = Controller::for_stream(vm_stream, vm_store.clone()).with_config(
            kube::runtime::controller::Config::default().concurrency(args.concurrency.max(1)),
        );
        let ctx = Arc::new(Context {
            client: client.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "corescale-operator".into(),
                    instance: Some(identity.clone()),
                },
            ),
            metrics: metrics.clone(),
            config: Config {
                system_namespace: args.system_namespace.clone(),
                unschedulable_retry: Duration::from_secs(args.unschedulable_retry_seconds),
            },
            leases: lease_store.clone(),
            liveness: liveness.clone(),
            nodes: node_store.clone(),
            vms: vm_store.clone(),
            load,
            status_written: Default::default(),
        });
        // Phase gauges, recounted from the store.
        let phases = {
            let store = vm_store.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    metrics.count_phases(store.state().iter().map(|v| v.as_ref()));
                }
            })
        };
        let mut stop = stop_rx.clone();
        let run = controller
            .reconcile_all_on(changes(trigger_tx.subscribe()))
            .graceful_shutdown_on(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .run(controller::reconcile, controller::error_policy, ctx)
            .for_each(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "controller event");
                }
                futures::future::ready(())
            });
        health.set_ready(true);
        let lost = match leading.as_mut() {
            None => {
                run.await;
                false
            }
            Some(rx) => tokio::select! {
                () = run => false,
                _ = rx.wait_for(|l| !*l) => true,
            },
        };
        phases.abort();
        if !lost {
            return Ok(());
        }
        // Another replica may act now: every reconcile of ours was dropped with `run`.
        metrics.leader.set(0);
        tracing::error!("lost leadership; stopped acting until it leads again");
    }
}

/// One item per change of the trigger counter.
fn changes(rx: tokio::sync::watch::Receiver<u64>) -> impl futures::Stream<Item = ()> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}
