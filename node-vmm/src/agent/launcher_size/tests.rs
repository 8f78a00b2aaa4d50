use super::*;
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;

fn k(n: &str) -> VmKey {
    VmKey {
        namespace: "d".into(),
        name: n.into(),
    }
}

const MI: u64 = 1 << 20;

fn sizing() -> Sizing {
    Sizing {
        base: Resources {
            cpu_request: 100,
            cpu_limit: Some(1000),
            memory_request: 128 * MI,
            memory_limit: None,
        },
        cpu_request_per_vcpu: 250,
        cpu_limit_per_vcpu: 1000,
        memory_per_vm: 256 * MI,
    }
}

#[test]
fn cpu_quantities() {
    assert_eq!(parse_cpu_millis("250m"), Some(250));
    assert_eq!(parse_cpu_millis("2"), Some(2000));
    assert_eq!(parse_cpu_millis("0.5"), Some(500));
    assert_eq!(parse_cpu_millis("1.25"), Some(1250));
    assert_eq!(parse_cpu_millis(".1"), Some(100));
    for bad in ["", "m", "1.2345", "1Gi", "-1", "1.5m", "abc"] {
        assert_eq!(parse_cpu_millis(bad), None, "{bad:?}");
    }
}

#[test]
fn a_bad_base_names_its_field() {
    let r: ResourceRequirements =
        serde_json::from_value(json!({"requests": {"cpu": "lots"}})).unwrap();
    let e = Resources::parse(&r, "--launcher-resources").unwrap_err();
    assert_eq!(
        e.to_string(),
        "--launcher-resources.requests.cpu: \"lots\" is not a cpu quantity"
    );
    let r: ResourceRequirements =
        serde_json::from_value(json!({"limits": {"memory": "1.5Gi"}})).unwrap();
    let e = Resources::parse(&r, "x").unwrap_err();
    assert!(e.to_string().starts_with("x.limits.memory"), "{e}");
}

#[test]
fn sizing_from_flags() {
    let f = SizingFlags {
        base: r#"{"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}}"#.into(),
        cpu_request_per_vcpu: Some(String::new()),
        cpu_limit_per_vcpu: "1".into(),
        memory_per_vm: "256Mi".into(),
    };
    assert_eq!(Sizing::from_flags(&f, 4.0).unwrap(), sizing());
    // An overcommit of 3 asks a third of a CPU per vCPU, rounded up.
    assert_eq!(
        Sizing::from_flags(&f, 3.0).unwrap().cpu_request_per_vcpu,
        334
    );
    let given = SizingFlags {
        cpu_request_per_vcpu: Some("500m".into()),
        ..f.clone()
    };
    assert_eq!(
        Sizing::from_flags(&given, 4.0)
            .unwrap()
            .cpu_request_per_vcpu,
        500
    );
    let bad = |f: SizingFlags| Sizing::from_flags(&f, 4.0).unwrap_err().to_string();
    assert!(
        bad(SizingFlags {
            base: "{".into(),
            ..f.clone()
        })
        .starts_with("--launcher-resources: "),
        "names the flag"
    );
    assert_eq!(
        bad(SizingFlags {
            memory_per_vm: "lots".into(),
            ..f.clone()
        }),
        "--launcher-memory-per-vm: \"lots\" is not a memory quantity"
    );
    assert_eq!(
        bad(SizingFlags {
            cpu_limit_per_vcpu: "1Gi".into(),
            ..f
        }),
        "--launcher-cpu-limit-per-vcpu: \"1Gi\" is not a cpu quantity"
    );
}

#[test]
fn resources_follow_the_guests() {
    let s = sizing();
    assert_eq!(s.for_guests(0, 0, 0), s.base);
    // One VM of 256Mi at 4 vCPUs: 100m + 4 x 250m, limit 1 + 4 CPUs, 128Mi + 256Mi + 256Mi.
    let r = s.for_guests(1, 4, 256 * MI);
    assert_eq!(r.cpu_request, 1100);
    assert_eq!(r.cpu_limit, Some(5000));
    assert_eq!(r.memory_request, 640 * MI);
    assert_eq!(
        r.memory_limit, None,
        "no memory limit unless the base has one"
    );
    let with_limit = Sizing {
        base: Resources {
            memory_limit: Some(512 * MI),
            cpu_limit: None,
            ..s.base
        },
        ..s
    };
    let r = with_limit.for_guests(2, 3, 512 * MI);
    assert_eq!(r.memory_limit, Some(512 * MI + 512 * MI + 2 * 256 * MI));
    assert_eq!(r.cpu_limit, None, "no CPU limit unless the base has one");
}

#[test]
fn the_patch_sets_only_the_launcher_container() {
    let r = sizing().for_guests(1, 2, 256 * MI);
    assert_eq!(
        r.resize_patch("launcher"),
        json!({"spec": {"containers": [{"name": "launcher", "resources": {
            "requests": {"cpu": "600m", "memory": (640 * MI).to_string()},
            "limits": {"cpu": "3000m"}}}]}})
    );
    // What it writes reads back as itself.
    let back: ResourceRequirements =
        serde_json::from_value(r.resize_patch("l")["spec"]["containers"][0]["resources"].clone())
            .unwrap();
    assert_eq!(Resources::parse(&back, "x").unwrap(), r);
}

#[test]
fn covering_allows_rounding_of_cpu_only() {
    let want = sizing().for_guests(1, 2, 256 * MI);
    let mut have = want;
    assert!(have.covers(&want));
    have.cpu_request -= 5;
    assert!(have.covers(&want), "shares round CPU requests");
    have.cpu_limit = Some(2000);
    assert!(!have.covers(&want));
    let mut have = want;
    have.memory_request -= 1;
    assert!(!have.covers(&want));
    let unlimited = Resources {
        cpu_limit: None,
        ..want
    };
    assert!(unlimited.covers(&want));
}

fn pod(conditions: Value, resources: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "generation": 3},
        "status": {
            "conditions": conditions,
            "containerStatuses": [
                {"name": "agent", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                 "resources": {"requests": {"cpu": "50m"}}},
                {"name": "launcher", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                 "resources": resources},
            ],
        }
    }))
    .unwrap()
}

#[test]
fn the_kubelets_verdicts() {
    let want = sizing().for_guests(1, 2, 256 * MI);
    let applied = json!({"requests": {"cpu": "600m", "memory": "640Mi"}, "limits": {"cpu": "3"}});
    let before = json!({"requests": {"cpu": "350m", "memory": "640Mi"}, "limits": {"cpu": "2"}});
    assert_eq!(
        judge(&pod(json!([]), applied.clone()), "launcher", &want, Some(3)),
        Some(Answer::Applied)
    );
    assert_eq!(
        judge(&pod(json!([]), before.clone()), "launcher", &want, Some(3)),
        None
    );
    let pending = |reason: &str, generation: i64| {
        json!([{"type": "PodResizePending", "status": "True", "reason": reason,
                "message": "Node didn't have enough capacity: cpu, requested: 2010, capacity: 2000",
                "observedGeneration": generation}])
    };
    assert_eq!(
        judge(
            &pod(pending("Infeasible", 3), before.clone()),
            "launcher",
            &want,
            Some(3)
        ),
        Some(Answer::Infeasible(
            "Node didn't have enough capacity: cpu, requested: 2010, capacity: 2000".into()
        ))
    );
    assert!(matches!(
        judge(
            &pod(pending("Deferred", 3), before.clone()),
            "launcher",
            &want,
            Some(3)
        ),
        Some(Answer::Deferred(_))
    ));
    // A verdict on an earlier patch is not this one's.
    assert_eq!(
        judge(
            &pod(pending("Infeasible", 2), before.clone()),
            "launcher",
            &want,
            Some(3)
        ),
        None
    );
    let failed = json!([{"type": "PodResizeInProgress", "status": "True", "reason": "Error",
                         "message": "runtime said no", "observedGeneration": 3}]);
    assert_eq!(
        judge(&pod(failed, before.clone()), "launcher", &want, Some(3)),
        Some(Answer::Deferred("runtime said no".into()))
    );
    let working =
        json!([{"type": "PodResizeInProgress", "status": "True", "observedGeneration": 3}]);
    assert_eq!(
        judge(&pod(working, before), "launcher", &want, Some(3)),
        None
    );
}

#[test]
fn claims_keep_their_sums() {
    let mut c = Claims::default();
    c.set(
        &k("a"),
        Some(Claim {
            vcpus: 4,
            memory: 256,
        }),
    );
    c.set(
        &k("b"),
        Some(Claim {
            vcpus: 2,
            memory: 512,
        }),
    );
    c.set(
        &k("a"),
        Some(Claim {
            vcpus: 1,
            memory: 256,
        }),
    );
    assert_eq!((c.vcpus, c.memory), (3, 768));
    assert_eq!(
        c.set(&k("b"), None),
        Some(Claim {
            vcpus: 2,
            memory: 512
        })
    );
    assert_eq!((c.vcpus, c.memory, c.per_vm.len()), (1, 256, 1));
}

/// A stand-in kubelet and API server for one pod: every resize patch is recorded and the
/// pod's status answers with `verdict` (None: applied as written).
fn kubelet(verdict: Option<&'static str>) -> (Client, Arc<Mutex<Vec<Value>>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let patches = Arc::new(Mutex::new(Vec::<Value>::new()));
    let rec = patches.clone();
    tokio::spawn(async move {
        let mut resources =
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}});
        let mut generation = 1;
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let mut conditions = json!([]);
            if method == "PATCH" {
                assert!(uri.contains("/pods/p/resize"), "{uri}");
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                rec.lock().unwrap().push(body.clone());
                generation += 1;
                let asked = body["spec"]["containers"][0]["resources"].clone();
                let r: ResourceRequirements = serde_json::from_value(asked.clone()).unwrap();
                let r = Resources::parse(&r, "patch").unwrap();
                // The stand-in node has 2 CPUs.
                if verdict.is_none() || r.cpu_request <= 2000 {
                    resources = asked;
                }
            } else if let Some(reason) = verdict {
                let asked = rec.lock().unwrap().last().cloned();
                let over = asked.is_some_and(|b| {
                    let r: ResourceRequirements =
                        serde_json::from_value(b["spec"]["containers"][0]["resources"].clone())
                            .unwrap();
                    Resources::parse(&r, "patch").unwrap().cpu_request > 2000
                });
                if over {
                    conditions = json!([{"type": "PodResizePending", "status": "True",
                        "reason": reason, "message": format!("{reason}: not enough cpu"),
                        "observedGeneration": generation}]);
                }
            }
            let reply = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns", "generation": generation},
                "status": {"conditions": conditions, "containerStatuses": [
                    {"name": "launcher", "image": "i", "imageID": "", "ready": true,
                     "restartCount": 0, "resources": resources}]}});
            send.send_response(
                Response::builder()
                    .body(Body::from(reply.to_string().into_bytes()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "ns"), patches)
}

fn sizer(client: Client) -> LauncherSizer {
    LauncherSizer::new(
        Api::namespaced(client, "ns"),
        "p".into(),
        "launcher".into(),
        sizing(),
        Duration::from_secs(5),
    )
}

fn cpu_requests(patches: &Mutex<Vec<Value>>) -> Vec<String> {
    patches
        .lock()
        .unwrap()
        .iter()
        .map(|b| {
            b["spec"]["containers"][0]["resources"]["requests"]["cpu"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_grow_waits_for_the_kubelet_and_a_shrink_is_written_later() {
    let (client, patches) = kubelet(None);
    let s = Arc::new(sizer(client));
    let bg = tokio::spawn({
        let s = s.clone();
        async move { s.run().await }
    });
    let a = Claim {
        vcpus: 4,
        memory: 256 * MI,
    };
    assert_eq!(s.grow(&k("a"), a).await, Answer::Applied);
    assert_eq!(cpu_requests(&patches), ["1100m"]);
    s.hold(&k("a"), Claim { vcpus: 2, ..a });
    s.release(&k("gone"));
    tokio::time::timeout(Duration::from_secs(5), async {
        while patches.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the shrink is written");
    assert_eq!(cpu_requests(&patches), ["1100m", "600m"]);
    // Holding what is already held writes nothing.
    s.hold(&k("a"), Claim { vcpus: 2, ..a });
    s.sync().await.unwrap();
    assert_eq!(patches.lock().unwrap().len(), 2);
    bg.abort();
}

#[tokio::test]
async fn a_refused_grow_gives_its_claim_back() {
    for (verdict, infeasible) in [("Infeasible", true), ("Deferred", false)] {
        let (client, patches) = kubelet(Some(verdict));
        let s = sizer(client);
        let a = Claim {
            vcpus: 2,
            memory: 256 * MI,
        };
        assert_eq!(s.grow(&k("a"), a).await, Answer::Applied);
        // 100m + (2 + 6) x 250m = 2100m: more than the node's 2 CPUs.
        let answer = s.grow(&k("b"), Claim { vcpus: 6, ..a }).await;
        let msg = format!("{verdict}: not enough cpu");
        assert_eq!(
            answer,
            if infeasible {
                Answer::Infeasible(msg)
            } else {
                Answer::Deferred(msg)
            }
        );
        // The pod is written back to what `a` holds, and `b` holds nothing.
        assert_eq!(cpu_requests(&patches), ["600m", "2100m", "600m"]);
        assert_eq!(s.desired(), sizing().for_guests(1, 2, 256 * MI));
    }
}
