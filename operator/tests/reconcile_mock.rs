//! Each act step of the operator's reconcile against a mocked API server (tower-test):
//! the requests it sends, in order, with the bodies that matter. The real-server proof is
//! the e2e suite.

use corescale_api::node::{lease_name, NodeAnnouncement, AGENT_LEASE_LABEL};
use corescale_api::{VirtualMachine, FINALIZER, NODE_LABEL, VM_LABEL};
use corescale_common::events::EventRecorder as Recorder;
use corescale_operator::controller::{reconcile, Config, Context, ReconcileError};
use corescale_operator::metrics::Metrics;
use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn vm(extra_meta: &str, spec: &str, status: &str) -> VirtualMachine {
    serde_yaml::from_str(&format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\n  namespace: demo\n  uid: u1\n  resourceVersion: '7'\n  generation: 1\n{extra_meta}spec: {spec}\nstatus: {status}\n"
    ))
    .unwrap()
}

fn live_lease(node: &str) -> Lease {
    let a = NodeAnnouncement {
        node: node.into(),
        capacity_vcpus: 8,
        host_cpus: 2,
        max_vcpus_per_vm: 64,
        accelerator: "tcg".into(),
        arches: vec![corescale_api::Arch::X86_64],
        version: "t".into(),
    };
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(node)),
            namespace: Some("corescale-system".into()),
            labels: Some([(AGENT_LEASE_LABEL.to_string(), "true".to_string())].into()),
            annotations: Some(a.to_annotations()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(20),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    }
}

fn context(leases: Vec<Lease>) -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (lease_store, mut lw): (_, Writer<Lease>) = reflector::store();
    for l in leases {
        lw.apply_watcher_event(&watcher::Event::Apply(l));
    }
    let (node_store, _nw) = reflector::store();
    let (vm_store, _vw) = reflector::store();
    let ctx = Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "corescale-operator".into(),
                instance: None,
            },
        ),
        metrics: Metrics::new().unwrap(),
        config: Config {
            system_namespace: "corescale-system".into(),
            unschedulable_retry: Duration::from_secs(15),
        },
        leases: lease_store,
        liveness: Default::default(),
        nodes: node_store,
        vms: vm_store,
        load: Default::default(),
        status_written: Default::default(),
    };
    (Arc::new(ctx), handle)
}

/// Wait for the next request, check it, answer with `reply`; returns the decoded body.
async fn expect(h: &mut Handle, method: Method, path: &str, reply: Value) -> (String, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request arrived; expected {method} {path}"))
        .expect("service dropped");
    assert_eq!(req.method(), method, "method of {}", req.uri());
    let uri = req.uri().to_string();
    assert!(
        uri.contains(path),
        "expected a request to {path}, got {uri}"
    );
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    (uri, body)
}

const VM_PATH: &str = "/apis/corescale.dev/v1alpha1/namespaces/demo/virtualmachines/web";

#[tokio::test]
async fn add_finalizer_is_a_compare_and_swap_patch() {
    // No live node: the finalizer and the defaulted topology, and nothing else yet.
    let (ctx, mut h) = context(vec![]);
    let v = vm("", "{cpus: 2}", "{}");
    let reply = serde_json::to_value(&v).unwrap();
    let task = tokio::spawn(reconcile(Arc::new(v), ctx));
    let (_, body) = expect(&mut h, Method::PATCH, VM_PATH, reply).await;
    assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(body["metadata"]["resourceVersion"], json!("7"));
    assert_eq!(body["spec"]["topology"]["cores"], 2);
    assert!(body["metadata"].get("labels").is_none(), "{body}");
    task.await.unwrap().unwrap();
}

/// The status write of a placement, with the operator's field manager, forced.
async fn expect_placed_status(h: &mut Handle, reply: Value, node: &str, max: u32) {
    let (uri, body) = expect(h, Method::PATCH, &format!("{VM_PATH}/status"), reply).await;
    assert!(
        uri.contains("fieldManager=corescale-operator") && uri.contains("force=true"),
        "{uri}"
    );
    let st = &body["status"];
    assert_eq!(st["nodeName"], node);
    assert_eq!(st["phase"], "Scheduled");
    assert_eq!(st["maxCpus"], max);
    assert_eq!(st["selector"], format!("{VM_LABEL}=web"));
    assert_eq!(st["conditions"][0]["type"], "Scheduled");
    assert_eq!(st["conditions"][0]["status"], "True");
}

async fn expect_scheduled_event(h: &mut Handle, node: &str) {
    let (_, ev) = expect(
        h,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/demo/events",
        json!({}),
    )
    .await;
    assert_eq!(ev["reason"], "Scheduled");
    let note = ev["note"].as_str().unwrap();
    assert!(note.contains(&format!("placed on {node}")), "{note}");
}

#[tokio::test]
async fn a_new_vm_is_admitted_in_one_patch_then_its_status_names_the_node() {
    let (ctx, mut h) = context(vec![live_lease("node-a")]);
    let v = vm("", "{cpus: 2}", "{}");
    let reply = serde_json::to_value(&v).unwrap();
    let task = tokio::spawn(reconcile(Arc::new(v), ctx));
    let (uri, body) = expect(&mut h, Method::PATCH, VM_PATH, reply.clone()).await;
    // Named in managedFields as the operator, not "unknown".
    assert!(uri.contains("fieldManager=corescale-operator"), "{uri}");
    assert!(body.get("status").is_none(), "{body}");
    assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(body["metadata"]["resourceVersion"], json!("7"));
    assert_eq!(body["spec"]["topology"]["cores"], 2);
    assert_eq!(body["metadata"]["labels"][NODE_LABEL], "node-a");
    assert_eq!(body["metadata"]["labels"][VM_LABEL], "web");
    expect_placed_status(&mut h, reply, "node-a", 2).await;
    expect_scheduled_event(&mut h, "node-a").await;
    task.await.unwrap().unwrap();
}

type Reconciling = tokio::task::JoinHandle<Result<Action, ReconcileError>>;

/// A VM with our finalizer and a 4-slot topology, not placed, with `labels` in its
/// metadata; the reply the mock sends to each write; the reconcile of it, running.
fn reconcile_unplaced(ctx: Arc<Context>, labels: &str) -> (Value, Reconciling) {
    let meta = format!("  finalizers: [{FINALIZER}]\n{labels}");
    let v = vm(
        &meta,
        "{cpus: 2, topology: {sockets: 1, cores: 4, threads: 1}}",
        "{}",
    );
    let reply = serde_json::to_value(&v).unwrap();
    (reply, tokio::spawn(reconcile(Arc::new(v), ctx)))
}

#[tokio::test]
async fn placing_labels_then_applies_status_then_records_an_event() {
    let (ctx, mut h) = context(vec![live_lease("node-a")]);
    let (reply, task) = reconcile_unplaced(ctx, "");
    let (_, body) = expect(&mut h, Method::PATCH, VM_PATH, reply.clone()).await;
    assert_eq!(body["metadata"]["labels"][NODE_LABEL], "node-a");
    assert_eq!(body["metadata"]["labels"][VM_LABEL], "web");
    expect_placed_status(&mut h, reply, "node-a", 4).await;
    expect_scheduled_event(&mut h, "node-a").await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_labelled_vm_whose_status_write_failed_gets_only_the_status() {
    let (ctx, mut h) = context(vec![live_lease("node-a")]);
    let labels = format!("  labels: {{{NODE_LABEL}: node-a, {VM_LABEL}: web}}\n");
    let (reply, task) = reconcile_unplaced(ctx, &labels);
    expect_placed_status(&mut h, reply, "node-a", 4).await;
    expect_scheduled_event(&mut h, "node-a").await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn no_live_node_leaves_the_vm_pending_with_a_reason() {
    let (ctx, mut h) = context(vec![]);
    let (reply, task) = reconcile_unplaced(ctx, "");
    let (_, body) = expect(&mut h, Method::PATCH, &format!("{VM_PATH}/status"), reply).await;
    assert_eq!(body["status"]["phase"], "Pending");
    assert_eq!(body["status"]["conditions"][0]["status"], "False");
    assert_eq!(body["status"]["conditions"][0]["reason"], "Unschedulable");
    let (_, ev) = expect(&mut h, Method::POST, "/events", json!({})).await;
    assert_eq!(ev["reason"], "FailedScheduling");
    assert_eq!(ev["type"], "Warning");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_write_is_an_error_with_a_bounded_category() {
    let (ctx, mut h) = context(vec![live_lease("a")]);
    let v = vm("", "{cpus: 2}", "{}");
    let task = tokio::spawn(reconcile(Arc::new(v), ctx));
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.method(), Method::PATCH);
    let status = json!({"kind":"Status","apiVersion":"v1","status":"Failure","message":"conflict","reason":"Conflict","code":409});
    send.send_response(
        Response::builder()
            .status(409)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap(),
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.category(), "conflict");
}
