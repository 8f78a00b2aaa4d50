//! The node agent's decide/act/report steps against a mocked API server (tower-test) and
//! the simulated backend: every status write and Event the worker sends is recorded and
//! checked. The same worker drives real QEMU guests in the e2e suite.

mod common;

use common::agent::{fast, key};
use common::mock_api::*;
use corescale_api::VirtualMachine;
use corescale_node_vmm::agent::{self, Config, Dispatcher, Shared};
use corescale_node_vmm::backend::sim::SimBackend;
use corescale_node_vmm::backend::{Accel, Backend, NodeCapacity};
use corescale_node_vmm::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn setup(host_cpus: u32, overcommit: f64) -> (Arc<Shared>, Arc<SimBackend>, Arc<Mutex<Vec<Call>>>) {
    // Every step here takes ~10 ms: write the in-progress status of each at once, so the
    // tests see it.
    setup_with(host_cpus, overcommit, Duration::ZERO)
}

fn setup_with(
    host_cpus: u32,
    overcommit: f64,
    in_progress_after: Duration,
) -> (Arc<Shared>, Arc<SimBackend>, Arc<Mutex<Vec<Call>>>) {
    let (client, calls) = api();
    let cap = NodeCapacity {
        host_cpus,
        max_vcpus_per_vm: 16,
        accel: Accel::Tcg,
        arches: [(corescale_api::Arch::X86_64, Accel::Tcg)].into(),
    };
    let sim = Arc::new(SimBackend::new(fast(), cap));
    let backend: Arc<dyn Backend> = sim.clone();
    let config = Config {
        overcommit,
        plug_timeout: Duration::from_secs(5),
        stop_grace: Duration::from_millis(100),
        in_progress_after,
        ..common::agent::config()
    };
    let shared = agent::shared(
        client,
        "n1".into(),
        backend,
        None,
        Metrics::new().unwrap(),
        config,
        None,
    );
    (shared, sim, calls)
}

fn vm(name: &str, spec: &str, extra_meta: &str) -> Arc<VirtualMachine> {
    common::agent::placed(name, 1, spec, extra_meta, 4)
}

#[tokio::test]
async fn start_then_resize_reports_only_what_was_observed() {
    let (shared, _sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("a"), Some(vm("a", "{cpus: 1}", "")));
    until(&calls, "Running with 1 vCPU", |c| {
        last_status_has(c, "a", |s| s["phase"] == "Running" && s["cpus"] == 1)
    })
    .await;
    let st = statuses(&calls, "a");
    assert!(
        st.iter().any(|s| s["phase"] == "Starting"),
        "Starting before Running: {st:?}"
    );
    assert!(
        statuses(&calls, "a")
            .iter()
            .all(|s| s["cpus"].as_u64() <= Some(1)),
        "never claims more than observed"
    );
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "Started" && n.contains("with 1 of 4 vCPUs")));

    d.dispatch(key("a"), Some(vm("a", "{cpus: 3}", "")));
    until(&calls, "3 vCPUs online", |c| {
        last_status_has(c, "a", |s| {
            s["cpus"] == 3 && s["lastResize"]["result"] == "Succeeded"
        })
    })
    .await;
    let st = statuses(&calls, "a");
    // While acting, the slots being plugged are shown as Plugging, and cpus is still 1.
    assert!(
        st.iter().any(|s| s["cpus"] == 1
            && s["vcpus"][1]["state"] == "Plugging"
            && s["lastResize"]["result"] == "InProgress"),
        "an in-progress status: {st:?}"
    );
    let last = st.last().unwrap();
    // Only slots that are not Absent are listed: slot 3 of 4 is not.
    let states: Vec<(u64, &str)> = last["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["index"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(0, "Online"), (1, "Online"), (2, "Online")]);
    assert_eq!(cond(last, "Ready").unwrap()["status"], "True");
    assert_eq!(cond(last, "ResizeInProgress").unwrap()["status"], "False");
    assert!(last["lastResize"]["seconds"].as_f64().unwrap() > 0.0);
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "Resized" && n.starts_with("1 -> 3 vCPUs in ")));
    // Status writes are server-side applies owned by node-vmm.
    let uris: Vec<String> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.uri.contains("/status"))
        .map(|c| c.uri.clone())
        .collect();
    assert!(
        uris.iter()
            .all(|u| u.contains("fieldManager=node-vmm") && u.contains("force=true")),
        "{uris:?}"
    );
}

/// A boot or a step done before `in_progress_after` is reported once, done: no Starting
/// or in-progress write.
#[tokio::test]
async fn quick_step_is_reported_once() {
    let (shared, _sim, calls) = setup_with(4, 2.0, Duration::from_secs(30));
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("q"), Some(vm("q", "{cpus: 1}", "")));
    until(&calls, "Running with 1 vCPU", |c| {
        last_status_has(c, "q", |s| s["phase"] == "Running" && s["cpus"] == 1)
    })
    .await;
    // The guest answered within 20 ms: no Starting status was written before Running.
    let started = statuses(&calls, "q");
    assert!(
        started.iter().all(|s| s["phase"] != "Starting"),
        "{started:?}"
    );
    let before = started.len();
    d.dispatch(key("q"), Some(vm("q", "{cpus: 3}", "")));
    until(&calls, "3 vCPUs online", |c| {
        last_status_has(c, "q", |s| {
            s["cpus"] == 3 && s["lastResize"]["result"] == "Succeeded"
        })
    })
    .await;
    // Let the agent settle (its next step observes and finds nothing to write).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during: Vec<_> = statuses(&calls, "q").split_off(before);
    assert_eq!(
        during.len(),
        1,
        "one status write for a quick resize: {during:?}"
    );
    assert!(
        during
            .iter()
            .all(|s| s["lastResize"]["result"] != "InProgress"),
        "{during:?}"
    );
}

/// The operator labels a new VM before it writes the placement status: the agent waits
/// for the status, does nothing meanwhile, and starts the guest as soon as it arrives, even
/// right after the labelled object.
#[tokio::test]
async fn a_labelled_vm_waits_for_its_placement_status() {
    let (shared, _sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    let unplaced = |name: &str| {
        let mut v = (*vm(name, "{cpus: 1}", "")).clone();
        v.status = None;
        Arc::new(v)
    };
    d.dispatch(key("w"), Some(unplaced("w")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(statuses(&calls, "w").is_empty(), "nothing written");
    assert!(events(&calls).is_empty(), "no event");
    d.dispatch(key("w"), Some(vm("w", "{cpus: 1}", "")));
    until(&calls, "w Running", |c| {
        last_status_has(c, "w", |s| s["phase"] == "Running" && s["cpus"] == 1)
    })
    .await;
    // Back to back: the status right behind the labels is not lost.
    d.dispatch(key("x"), Some(unplaced("x")));
    d.dispatch(key("x"), Some(vm("x", "{cpus: 1}", "")));
    until(&calls, "x Running", |c| {
        last_status_has(c, "x", |s| s["phase"] == "Running" && s["cpus"] == 1)
    })
    .await;
}

#[tokio::test]
async fn infeasible_target_says_why_and_touches_nothing() {
    let (shared, sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("b"), Some(vm("b", "{cpus: 2}", "")));
    until(&calls, "running", |c| {
        last_status_has(c, "b", |s| s["cpus"] == 2)
    })
    .await;
    // Topology fixed at placement is 1x4x1: 6 can never fit.
    d.dispatch(key("b"), Some(vm("b", "{cpus: 6}", "")));
    until(&calls, "Infeasible", |c| {
        last_status_has(c, "b", |s| {
            cond(s, "ResizePending")
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "Infeasible")
        })
    })
    .await;
    let last = statuses(&calls, "b").pop().unwrap();
    assert!(cond(&last, "ResizePending").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("above the VM's maximum of 4"));
    assert_eq!(last["cpus"], 2, "the guest keeps what it had");
    assert!(events(&calls).iter().any(|(r, _)| r == "Infeasible"));
    let running = sim.running().await.unwrap();
    assert_eq!(running.len(), 1);
}

/// The same decision about a VM re-created under its name is published again: the new
/// object has not heard it.
#[tokio::test]
async fn a_recreated_vm_hears_the_same_event_again() {
    let (shared, _sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    // Topology fixed at placement is 1x4x1: 6 can never start.
    d.dispatch(key("r"), Some(vm("r", "{cpus: 6}", "")));
    let infeasible =
        |c: &Mutex<Vec<Call>>| events(c).iter().filter(|(r, _)| r == "Infeasible").count();
    until(&calls, "the first Infeasible", |c| infeasible(c) == 1).await;
    d.dispatch(key("r"), Some(vm("r", "{cpus: 6}", "")));
    let mut again = (*vm("r", "{cpus: 6}", "")).clone();
    again.metadata.uid = Some("uid-r-2".into());
    d.dispatch(key("r"), Some(Arc::new(again)));
    until(&calls, "the Infeasible of the new object", |c| {
        infeasible(c) == 2
    })
    .await;
}

#[tokio::test]
async fn deferred_resize_proceeds_when_room_appears() {
    // Budget: 4 host CPUs x 1.0 = 4 vCPUs.
    let (shared, _sim, calls) = setup(4, 1.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("big"), Some(vm("big", "{cpus: 3}", "")));
    until(&calls, "big running", |c| {
        last_status_has(c, "big", |s| s["cpus"] == 3)
    })
    .await;
    d.dispatch(key("small"), Some(vm("small", "{cpus: 1}", "")));
    until(&calls, "small running", |c| {
        last_status_has(c, "small", |s| s["cpus"] == 1)
    })
    .await;
    d.dispatch(key("small"), Some(vm("small", "{cpus: 2}", "")));
    until(&calls, "small deferred", |c| {
        last_status_has(c, "small", |s| {
            cond(s, "ResizePending")
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "Deferred")
        })
    })
    .await;
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "Deferred" && n.contains("3 of 4 vCPUs are promised")));
    d.dispatch(key("big"), Some(vm("big", "{cpus: 1}", "")));
    until(&calls, "small grows by itself", |c| {
        last_status_has(c, "small", |s| s["cpus"] == 2)
    })
    .await;
    let last = statuses(&calls, "small").pop().unwrap();
    assert_eq!(cond(&last, "ResizePending").unwrap()["status"], "False");
}

#[tokio::test]
async fn unplug_deadline_leaves_the_slot_unplugging_and_says_so() {
    let (shared, sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(
        key("c"),
        Some(vm("c", "{cpus: 2, unplugTimeoutSeconds: 1}", "")),
    );
    until(&calls, "running", |c| {
        last_status_has(c, "c", |s| s["cpus"] == 2)
    })
    .await;
    sim.vm(&key("c"))
        .unwrap()
        .refuse_unplug
        .store(true, Ordering::SeqCst);
    d.dispatch(
        key("c"),
        Some(vm("c", "{cpus: 1, unplugTimeoutSeconds: 1}", "")),
    );
    until(&calls, "failed unplug", |c| {
        last_status_has(c, "c", |s| s["lastResize"]["result"] == "Failed")
    })
    .await;
    let last = statuses(&calls, "c").pop().unwrap();
    assert_eq!(last["vcpus"][1]["state"], "Unplugging");
    let rip = cond(&last, "ResizeInProgress").unwrap();
    assert_eq!(rip["status"], "True");
    assert_eq!(rip["reason"], "Error");
    assert!(
        rip["message"]
            .as_str()
            .unwrap()
            .contains("did not release vCPU slot 1 within 1 s"),
        "{rip}"
    );
    assert!(events(&calls).iter().any(|(r, _)| r == "ResizeFailed"));
    // The guest lets go: the retry (with backoff) completes.
    sim.vm(&key("c"))
        .unwrap()
        .refuse_unplug
        .store(false, Ordering::SeqCst);
    until(&calls, "retry completes", |c| {
        last_status_has(c, "c", |s| {
            s["cpus"] == 1 && s["lastResize"]["result"] == "Succeeded"
        })
    })
    .await;
}

#[tokio::test]
async fn deletion_stops_the_guest_then_says_so_without_writing_the_object() {
    let (shared, sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("e"), Some(vm("e", "{cpus: 1}", "")));
    until(&calls, "running", |c| {
        last_status_has(c, "e", |s| s["phase"] == "Running")
    })
    .await;
    d.dispatch(
        key("e"),
        Some(vm(
            "e",
            "{cpus: 1}",
            "  deletionTimestamp: '2026-01-01T00:00:00Z'\n",
        )),
    );
    until(&calls, "guest stopped in status", |c| {
        last_status_has(c, "e", |s| {
            s["phase"] == "Stopped"
                && cond(s, "Running").is_some_and(|c| c["reason"] == "GuestStopped")
        })
    })
    .await;
    assert!(
        sim.running().await.unwrap().is_empty(),
        "guest stopped before status says so"
    );
    assert!(events(&calls).iter().any(|(r, _)| r == "Stopped"));
    let writes_to_object = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.method != "GET" && c.uri.contains("/virtualmachines/e?"))
        .count();
    assert_eq!(
        writes_to_object, 0,
        "the agent writes only the status subresource"
    );
}

#[tokio::test]
async fn a_dead_vmm_is_noticed_and_restarted() {
    let (shared, sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("f"), Some(vm("f", "{cpus: 2}", "")));
    until(&calls, "running", |c| {
        last_status_has(c, "f", |s| s["cpus"] == 2)
    })
    .await;
    sim.vm(&key("f")).unwrap().crash();
    until(&calls, "restarted", |c| {
        events(c).iter().any(|(r, _)| r == "VmmRestarted")
            && last_status_has(c, "f", |s| s["phase"] == "Running" && s["cpus"] == 2)
    })
    .await;
    assert!(events(&calls).iter().any(|(r, _)| r == "VmmExited"));
}

/// A start refused before the guest ever ran (its host port is taken) is not a restart:
/// once the port is free the guest is `Started`; only a VMM that ran and died makes the
/// next start a `VmmRestarted`.
#[tokio::test]
async fn a_first_start_after_a_refused_one_is_started_not_restarted() {
    let (shared, sim, calls) = setup(4, 2.0);
    let held = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let mut d = Dispatcher::new(shared, HashMap::new());
    let spec = format!("{{cpus: 1, ports: [{{name: http, guestPort: 80, hostPort: {port}}}]}}");
    d.dispatch(key("p"), Some(vm("p", &spec, "")));
    until(&calls, "refused", |c| {
        events(c).iter().any(|(r, _)| r == "StartFailed")
    })
    .await;
    drop(held);
    until(&calls, "running", |c| {
        last_status_has(c, "p", |s| s["phase"] == "Running")
    })
    .await;
    let ev = events(&calls);
    assert!(ev.iter().any(|(r, _)| r == "Started"), "{ev:?}");
    assert!(!ev.iter().any(|(r, _)| r == "VmmRestarted"), "{ev:?}");
    sim.vm(&key("p")).unwrap().crash();
    until(&calls, "restarted after the crash", |c| {
        events(c).iter().any(|(r, _)| r == "VmmRestarted")
    })
    .await;
}

#[tokio::test]
async fn guests_without_an_object_are_stopped_after_the_first_list() {
    let (shared, sim, _calls) = setup(4, 2.0);
    let spec = shared
        .vm_spec(
            &vm("orphan", "{cpus: 1}", ""),
            corescale_api::Topology {
                sockets: 1,
                cores: 4,
                threads: 1,
            },
            1,
        )
        .unwrap();
    sim.start(&spec).await.unwrap();
    let adopted = agent::adopt_running(sim.as_ref()).await;
    assert_eq!(adopted.len(), 1);
    let mut d = Dispatcher::new(shared, adopted);
    d.init_done();
    for _ in 0..200 {
        if sim.running().await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the orphan guest is still running");
}

/// A change of the object in nothing the worker acts on (its own status write coming back
/// through the watch) does not cut a backoff short: the failed resize is not retried
/// before its time, however often the status changes.
#[tokio::test]
async fn its_own_status_coming_back_does_not_cut_a_backoff_short() {
    let (shared, sim, calls) = setup(4, 2.0);
    let mut d = Dispatcher::new(shared, HashMap::new());
    let spec = "{cpus: 2, unplugTimeoutSeconds: 1}";
    d.dispatch(key("e"), Some(vm("e", spec, "")));
    until(&calls, "running", |c| {
        last_status_has(c, "e", |s| s["cpus"] == 2)
    })
    .await;
    sim.vm(&key("e"))
        .unwrap()
        .refuse_unplug
        .store(true, Ordering::SeqCst);
    let target = "{cpus: 1, unplugTimeoutSeconds: 1}";
    d.dispatch(key("e"), Some(vm("e", target, "")));
    let failed = |c: &Mutex<Vec<Call>>| {
        events(c)
            .iter()
            .filter(|(r, _)| r == "ResizeFailed")
            .count()
    };
    until(&calls, "the first failure", |c| failed(c) == 1).await;
    // The next attempt is due 2 s later (backoff after one failure). Status-only changes
    // arrive meanwhile, as the watch would bring the agent's own writes back.
    for i in 0..15 {
        let mut echo = (*vm("e", target, "")).clone();
        echo.metadata.resource_version = Some(format!("{}", 100 + i));
        echo.status.as_mut().unwrap().phase = Some(corescale_api::Phase::Running);
        echo.status.as_mut().unwrap().cpus = Some(2);
        d.dispatch(key("e"), Some(Arc::new(echo)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        failed(&calls),
        1,
        "a status change retried the resize before its backoff"
    );
    // The backoff still ends: the retry comes by itself.
    until_within(
        &calls,
        "the retry after the backoff",
        Duration::from_secs(6),
        |c| failed(c) == 2,
    )
    .await;
}
