//! The chart's pods as the API server shows them: the node-vmm pod and its two containers,
//! the operator's pod, the Services' endpoints, and `/metrics` scraped from them.

use super::{Ctx, RELEASE_NS};
use crate::http_get;
use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use std::time::Duration;

/// Label selector of the node-vmm DaemonSet's pods.
pub const NODE_VMM_PODS: &str = "app.kubernetes.io/component=node-vmm";
/// Label selector of the operator Deployment's pods.
pub const OPERATOR_PODS: &str = "app.kubernetes.io/component=operator";

/// One container of a pod, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Its name in the pod spec.
    pub name: String,
    /// containerd's id (without the `containerd://` prefix).
    pub id: String,
    /// The image the pod spec names.
    pub image: String,
    /// Restarts so far.
    pub restarts: i32,
    /// Passing its readiness probe.
    pub ready: bool,
}

/// A pod of the release, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Name.
    pub name: String,
    /// UID: a replaced pod has a new one even if the name came back.
    pub uid: String,
    /// Pod IP.
    pub ip: String,
    /// Being deleted.
    pub terminating: bool,
    /// Condition Ready True.
    pub ready: bool,
    /// Its containers (not the init containers).
    pub containers: Vec<Container>,
}

impl PodView {
    fn of(p: &Pod) -> Self {
        let st = p.status.clone().unwrap_or_default();
        let ready = st
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let containers = st
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .map(|c| Container {
                id: c
                    .container_id
                    .unwrap_or_default()
                    .trim_start_matches("containerd://")
                    .to_string(),
                image: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.iter().find(|x| x.name == c.name))
                    .and_then(|x| x.image.clone())
                    .unwrap_or_default(),
                name: c.name,
                restarts: c.restart_count,
                ready: c.ready,
            })
            .collect();
        PodView {
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            ip: st.pod_ip.unwrap_or_default(),
            terminating: p.metadata.deletion_timestamp.is_some(),
            ready,
            containers,
        }
    }

    /// One of its containers.
    pub fn container(&self, name: &str) -> Result<&Container> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("pod {} has no container {name} in its status", self.name))
    }
}

/// The release's pods matching a label selector.
pub async fn pods(c: &Ctx, selector: &str) -> Result<Vec<PodView>> {
    let api: Api<Pod> = Api::namespaced(c.stack.client.clone(), RELEASE_NS);
    let list = api.list(&ListParams::default().labels(selector)).await?;
    Ok(list.iter().map(PodView::of).collect())
}

/// The node-vmm pod of the (one) node, if exactly one is not terminating.
pub async fn node_vmm_pod(c: &Ctx) -> Result<PodView> {
    let live: Vec<PodView> = pods(c, NODE_VMM_PODS)
        .await?
        .into_iter()
        .filter(|p| !p.terminating)
        .collect();
    match live.as_slice() {
        [p] => Ok(p.clone()),
        _ => bail!("expected one node-vmm pod, found {live:?}"),
    }
}

/// Wait until exactly one pod of `selector` is Ready, not terminating, and accepted by
/// `pred`; returns it.
pub async fn wait_pod(
    c: &Ctx,
    selector: &str,
    what: &str,
    within: Duration,
    pred: impl Fn(&PodView) -> bool,
) -> Result<PodView> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let live: Vec<PodView> = pods(c, selector)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !p.terminating)
            .collect();
        if let [p] = live.as_slice() {
            if p.ready && pred(p) {
                return Ok(p.clone());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no Ready pod ({selector}) {what} within {} s; pods now: {live:?}",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `http://<address>:<port>/metrics` of every endpoint of a Service's EndpointSlices (port
/// named `metrics`): what a Prometheus ServiceMonitor scrapes.
pub async fn metrics_targets(c: &Ctx, service: &str) -> Result<Vec<String>> {
    let api: Api<EndpointSlice> = Api::namespaced(c.stack.client.clone(), RELEASE_NS);
    let slices = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let mut out = Vec::new();
    for s in &slices {
        let port = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .and_then(|p| p.port)
            .with_context(|| format!("EndpointSlice {} has no port named metrics", s.name_any()))?;
        for e in &s.endpoints {
            for a in &e.addresses {
                out.push(format!("http://{a}:{port}/metrics"));
            }
        }
    }
    Ok(out)
}

/// Wait until the Service has `n` metrics targets, then scrape each once.
pub async fn scrape_service(c: &Ctx, service: &str, n: usize) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let targets = loop {
        let t = metrics_targets(c, service).await?;
        if t.len() == n {
            break t;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("Service {service} has metrics endpoints {t:?}, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut out = Vec::new();
    for t in &targets {
        let body = tokio::time::timeout(Duration::from_secs(10), http_get(t))
            .await
            .with_context(|| format!("GET {t} timed out"))??;
        out.push(body);
    }
    Ok(out)
}

/// The last lines of a container's log (its current instance).
pub fn logs(c: &Ctx, pod: &str, container: &str) -> Result<String> {
    let (ok, out, err) =
        c.stack
            .kubectl(&["logs", "-n", RELEASE_NS, pod, "-c", container, "--tail=500"])?;
    if !ok {
        bail!("kubectl logs {pod} -c {container}: {err}");
    }
    Ok(out)
}
