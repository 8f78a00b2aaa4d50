//! A mocked API server (tower-test) for the agent tests: it answers every request and
//! records it, with the time it arrived, so tests can check each status write and Event.

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the agent sent.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub uri: String,
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

pub type Calls = Arc<Mutex<Vec<Call>>>;

/// A mocked API server that answers every request and records it.
pub fn api() -> (Client, Calls) {
    serve(None)
}

/// The same, answering for one pod `p` too as a kubelet of a node with `cpu` millicores
/// and `memory` bytes would: a resize that fits is applied at once (status resources =
/// spec), one that does not is left pending (`PodResizePending` Infeasible).
pub fn api_with_kubelet(cpu: u64, memory: u64) -> (Client, Calls) {
    serve(Some(Kubelet {
        cpu,
        memory,
        resources: json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}}),
        generation: 1,
        pending: None,
    }))
}

/// The stand-in kubelet's pod.
struct Kubelet {
    cpu: u64,
    memory: u64,
    resources: Value,
    generation: i64,
    pending: Option<String>,
}

impl Kubelet {
    fn answer(&mut self, method: &str, body: &Value) -> Value {
        if method == "PATCH" {
            self.generation += 1;
            let asked = body["spec"]["containers"][0]["resources"].clone();
            let cpu = asked["requests"]["cpu"]
                .as_str()
                .and_then(|c| c.strip_suffix('m'))
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
            let mem = asked["requests"]["memory"]
                .as_str()
                .and_then(|m| m.parse::<u64>().ok())
                .unwrap_or(0);
            self.pending = None;
            if cpu > self.cpu {
                self.pending = Some(format!(
                    "Node didn't have enough capacity: cpu, requested: {cpu}, capacity: {}",
                    self.cpu
                ));
            } else if mem > self.memory {
                self.pending = Some(format!(
                    "Node didn't have enough capacity: memory, requested: {mem}, capacity: {}",
                    self.memory
                ));
            } else {
                self.resources = asked;
            }
        }
        let conditions = match &self.pending {
            Some(m) => {
                json!([{"type": "PodResizePending", "status": "True", "reason": "Infeasible",
                               "message": m, "observedGeneration": self.generation}])
            }
            None => json!([]),
        };
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "namespace": "corescale-system", "generation": self.generation},
               "spec": {"containers": [{"name": "launcher", "resources": body["spec"]["containers"][0]["resources"].clone()}]},
               "status": {"conditions": conditions, "containerStatuses": [
                   {"name": "launcher", "image": "i", "imageID": "", "ready": true,
                    "restartCount": 0, "resources": self.resources.clone()}]}})
    }
}

fn serve(mut kubelet: Option<Kubelet>) -> (Client, Calls) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let rec = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let at = Instant::now();
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let reply = match kubelet.as_mut() {
                Some(k) if uri.contains("/pods/") => k.answer(&method, &body),
                _ if uri.contains("/events") => {
                    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}})
                }
                _ => json!({"apiVersion": "corescale.dev/v1alpha1", "kind": "VirtualMachine",
                       "metadata": {"name": "x", "namespace": "d"}, "spec": {"cpus": 1}}),
            };
            rec.lock().unwrap().push(Call {
                method,
                uri,
                body,
                at,
            });
            send.send_response(
                Response::builder()
                    .body(Body::from(reply.to_string().into_bytes()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), calls)
}

/// The CPU requests of the launcher container's resizes, in order.
pub fn launcher_cpu_requests(calls: &Mutex<Vec<Call>>) -> Vec<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.method == "PATCH" && c.uri.contains("/pods/p/resize"))
        .map(|c| {
            c.body["spec"]["containers"][0]["resources"]["requests"]["cpu"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The status writes for VM `name`, in order, with their arrival times.
pub fn timed_statuses(calls: &Mutex<Vec<Call>>, name: &str) -> Vec<(Instant, Value)> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| {
            c.method == "PATCH" && c.uri.contains(&format!("/virtualmachines/{name}/status"))
        })
        .map(|c| (c.at, c.body["status"].clone()))
        .collect()
}

/// The status writes for VM `name`, in order.
pub fn statuses(calls: &Mutex<Vec<Call>>, name: &str) -> Vec<Value> {
    timed_statuses(calls, name)
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// Every Event published: (reason, note).
pub fn events(calls: &Mutex<Vec<Call>>) -> Vec<(String, String)> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.uri.contains("/events"))
        .map(|c| {
            (
                c.body["reason"].as_str().unwrap_or("").into(),
                c.body["note"].as_str().unwrap_or("").into(),
            )
        })
        .collect()
}

/// Wait up to 5 s until `f` holds for the recorded calls.
pub async fn until(calls: &Calls, what: &str, f: impl Fn(&Mutex<Vec<Call>>) -> bool) {
    until_within(calls, what, Duration::from_secs(5), f).await;
}

/// Wait up to `within` until `f` holds for the recorded calls; panics with every call
/// recorded when it does not.
pub async fn until_within(
    calls: &Calls,
    what: &str,
    within: Duration,
    f: impl Fn(&Mutex<Vec<Call>>) -> bool,
) {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f(calls) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dump: Vec<String> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| format!("{} {} {}", c.method, c.uri, c.body))
        .collect();
    panic!(
        "timed out after {within:?} waiting for {what}; calls:\n{}",
        dump.join("\n")
    );
}

pub fn last_status_has(calls: &Mutex<Vec<Call>>, name: &str, f: impl Fn(&Value) -> bool) -> bool {
    statuses(calls, name).last().is_some_and(f)
}

/// A condition of a status.
pub fn cond<'a>(st: &'a Value, t: &str) -> Option<&'a Value> {
    st["conditions"].as_array()?.iter().find(|c| c["type"] == t)
}
