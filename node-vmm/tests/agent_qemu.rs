//! The node agent with the real QEMU backend (a launcher in this process, QEMU/TCG guests)
//! and a mocked API server (tower-test) that records every status write and Event: faults
//! of the node's state directory and guests that never acknowledge a plug or an unplug.

mod common;

use common::agent::key;
use common::mock_api::*;
use common::{prerequisites, Env};
use corescale_api::{VirtualMachine, FINALIZER};
use corescale_node_vmm::agent::{self, Config, Dispatcher, Shared};
use corescale_node_vmm::backend::qemu::qmp::QmpClient;
use corescale_node_vmm::backend::qemu::QemuBackend;
use corescale_node_vmm::backend::Backend;
use corescale_node_vmm::images::ImageDir;
use corescale_node_vmm::launcher;
use corescale_node_vmm::metrics::Metrics;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An agent for node n1 over the QEMU backend of `env` (with `extra_args` for QEMU).
fn agent(env: &Env, extra_args: Vec<String>) -> (Arc<Shared>, Calls) {
    prerequisites();
    let (client, calls) = api();
    let mut cfg = env.cfg.clone();
    // This machine's /dev/kvm cannot boot Linux.
    cfg.accel = "tcg".into();
    cfg.extra_args = extra_args;
    let backend: Arc<dyn Backend> = Arc::new(QemuBackend::new(cfg));
    let config = Config {
        // Long, so a test can tell "taken up at once" from "waited out the deadline".
        plug_timeout: Duration::from_secs(60),
        ..common::agent::config()
    };
    let shared = agent::shared(
        client,
        "n1".into(),
        backend,
        Some(ImageDir::new(ImageDir::default_root())),
        Metrics::new().unwrap(),
        config,
        None,
    );
    (shared, calls)
}

/// A VM placed on n1: 1 socket of 6 cores, unplug deadline 2 s.
fn vm(name: &str, cpus: u32, generation: i64) -> Arc<VirtualMachine> {
    Arc::new(
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: d\n  uid: uid-{name}\n  generation: {generation}\n  resourceVersion: '5'\n  finalizers: [{FINALIZER}]\nspec: {{cpus: {cpus}, unplugTimeoutSeconds: 2, topology: {{sockets: 1, cores: 6, threads: 1}}}}\nstatus: {{nodeName: n1, topology: {{sockets: 1, cores: 6, threads: 1}}}}\n"
        ))
        .unwrap(),
    )
}

/// The state of each of the first `n` slots; status.vcpus lists only slots that are not
/// Absent.
fn states(st: &Value, n: usize) -> Vec<String> {
    let mut out = vec!["Absent".to_string(); n];
    for v in st["vcpus"].as_array().into_iter().flatten() {
        let i = v["index"].as_u64().and_then(|i| usize::try_from(i).ok());
        match i.and_then(|i| out.get_mut(i)) {
            Some(slot) => {
                let state = v["state"].as_str().unwrap_or("");
                assert_ne!(state, "Absent", "an Absent slot is listed: {v}");
                *slot = state.to_string();
            }
            None => panic!("a vCPU entry past slot {n}: {v}"),
        }
    }
    out
}

fn cond_is(st: &Value, t: &str, status: &str, reason: &str) -> bool {
    cond(st, t).is_some_and(|c| c["status"] == status && c["reason"] == reason)
}

fn message(st: &Value, t: &str) -> String {
    cond(st, t)
        .and_then(|c| c["message"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Running with `cpus` online and Ready.
fn settled(st: &Value, cpus: u32) -> bool {
    st["phase"] == "Running"
        && st["cpus"] == cpus
        && cond_is(st, "Ready", "True", "Ready")
        && !cond(st, "ResizeInProgress").is_some_and(|c| c["status"] == "True")
}

/// A file where one VM's directory should be: that VM's status says StartFailed with the
/// path, the other VM on the same agent starts and resizes meanwhile, and once the file is
/// removed the retries (with backoff) start the VM without anyone touching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_vm_dir_is_reported_and_heals() {
    let env = Env::new().await;
    let (shared, calls) = agent(&env, Vec::new());
    let blocker = launcher::vm_dir(&env.cfg.state_dir, "d", "blocked");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("blocked"), Some(vm("blocked", 1, 1)));
    d.dispatch(key("fine"), Some(vm("fine", 1, 1)));

    let want = format!("{} is not a directory (remove it)", blocker.display());
    until_within(
        &calls,
        "blocked: StartFailed naming the path",
        Duration::from_secs(30),
        |c| {
            last_status_has(c, "blocked", |s| {
                cond_is(s, "Running", "False", "StartFailed")
                    && message(s, "Running").contains(&want)
            })
        },
    )
    .await;
    println!(
        "[blocked] {}",
        message(statuses(&calls, "blocked").last().unwrap(), "Running")
    );
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "StartFailed" && n.contains(&want)));

    // The other VM is not held up.
    until_within(&calls, "fine: running", Duration::from_secs(90), |c| {
        last_status_has(c, "fine", |s| settled(s, 1))
    })
    .await;
    d.dispatch(key("fine"), Some(vm("fine", 2, 2)));
    until_within(&calls, "fine: resized to 2", Duration::from_secs(60), |c| {
        last_status_has(c, "fine", |s| {
            settled(s, 2) && s["lastResize"]["result"] == "Succeeded"
        })
    })
    .await;
    let last = statuses(&calls, "blocked").pop().unwrap();
    assert!(
        cond_is(&last, "Running", "False", "StartFailed"),
        "still failing while the file is there: {last}"
    );

    // Repair: the VM starts by itself.
    std::fs::remove_file(&blocker).unwrap();
    let t0 = Instant::now();
    until_within(
        &calls,
        "blocked: running after repair",
        Duration::from_secs(120),
        |c| last_status_has(c, "blocked", |s| settled(s, 1)),
    )
    .await;
    println!(
        "[blocked] running {:.1} s after the repair",
        t0.elapsed().as_secs_f64()
    );
    assert!(blocker.is_dir());
    assert!(events(&calls)
        .iter()
        .any(|(r, _)| r == "VmmRestarted" || r == "Started"));
    drop(d);
    env.shutdown().await;
}

/// The distinct lastResize.startedAt values of the InProgress writes with target `to`,
/// with the time the first write of each arrived: one entry per attempt.
fn attempts(calls: &Mutex<Vec<Call>>, name: &str, to: u32) -> Vec<(Instant, String)> {
    let mut out: Vec<(Instant, String)> = Vec::new();
    for (at, s) in timed_statuses(calls, name) {
        let lr = &s["lastResize"];
        if lr["result"] == "InProgress" && lr["to"] == to {
            let started = lr["startedAt"].as_str().unwrap_or("").to_string();
            if !out.iter().any(|(_, s)| *s == started) {
                out.push((at, started));
            }
        }
    }
    out
}

/// A guest that never acknowledges (paused with QMP `stop` on a second monitor, so the
/// agent keeps its own): a batched plug waiting for the insert is superseded at once by a
/// newer target, which takes back the slot it no longer wants, and the status says which
/// slots are stuck; a failing unplug is retried with a
/// growing delay, each attempt ending at its deadline with the stuck slot named; a new
/// target written meanwhile is acted on at once, not after the backoff; after `cont`
/// everything converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_guest_backs_off_and_takes_a_new_target() {
    let env = Env::new().await;
    let ctl_path = env.dir.path().join("ctl.sock");
    let (shared, calls) = agent(
        &env,
        vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", ctl_path.display()),
        ],
    );
    let mut d = Dispatcher::new(shared, HashMap::new());
    d.dispatch(key("stuck"), Some(vm("stuck", 1, 1)));
    until_within(&calls, "running", Duration::from_secs(90), |c| {
        last_status_has(c, "stuck", |s| settled(s, 1))
    })
    .await;
    let ctl = QmpClient::connect(&ctl_path, Duration::from_secs(5))
        .await
        .unwrap();
    let t = Duration::from_secs(10);
    let plugged = |slot: i64| {
        let ctl = &ctl;
        async move {
            ctl.query_hotpluggable_cpus(t)
                .await
                .unwrap()
                .iter()
                .any(|c| c.props.core_id == Some(slot) && c.qom_path.is_some())
        }
    };

    // Insert never acknowledged: 1 -> 3 with the guest paused.
    ctl.execute_value("stop", None, t).await.unwrap();
    d.dispatch(key("stuck"), Some(vm("stuck", 3, 2)));
    let t0 = Instant::now();
    while !plugged(1).await {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slot 1 was not device_added"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The agent waits for the insert (deadline 60 s); a new target of 2 supersedes it.
    let written = Instant::now();
    d.dispatch(key("stuck"), Some(vm("stuck", 2, 3)));
    until_within(
        &calls,
        "the plug superseded",
        Duration::from_secs(10),
        |c| {
            events(c).iter().any(|(r, n)| {
                r == "ResizeSuperseded"
                    && n.contains("1 -> 3 vCPUs superseded by a new target of 2")
            })
        },
    )
    .await;
    // Both slots of 1 -> 3 were device_added before any waiting (one batch): the new
    // target keeps slot 1 and takes slot 2 back, which the paused guest cannot release.
    until_within(
        &calls,
        "waiting for the stuck slots",
        Duration::from_secs(15),
        |c| {
            last_status_has(c, "stuck", |s| {
                s["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "ResizeInProgress" && c["status"] == "True")
                }) && states(s, 6)[..3] == ["Present", "Plugging", "Unplugging"]
                    && message(s, "ResizeInProgress").contains("vCPU slot 1 is Plugging")
            })
        },
    )
    .await;
    let taken = written.elapsed();
    let last = statuses(&calls, "stuck").pop().unwrap();
    let msg = message(&last, "ResizeInProgress");
    println!(
        "[stuck] new target taken up after {:.2} s: {msg}",
        taken.as_secs_f64()
    );
    assert!(
        taken < Duration::from_secs(15),
        "not the 60 s plug deadline: {taken:?}"
    );
    assert!(
        msg.contains("vCPU slot 1 is Plugging (not acknowledged or onlined by the guest yet)"),
        "{msg}"
    );
    assert_eq!(last["cpus"], 1, "only what the guest confirmed");
    assert!(plugged(2).await, "slot 2 went out in the same batch");
    assert!(events(&calls).iter().any(|(r, _)| r == "ResizeSuperseded"));
    ctl.execute_value("cont", None, t).await.unwrap();
    until_within(
        &calls,
        "the resumed guest has 2",
        Duration::from_secs(30),
        |c| {
            last_status_has(c, "stuck", |s| {
                settled(s, 2) && states(s, 6)[..3] == ["Online", "Online", "Absent"]
            })
        },
    )
    .await;

    // Eject never acknowledged: 2 -> 1 with the guest paused; retries back off.
    ctl.execute_value("stop", None, t).await.unwrap();
    d.dispatch(key("stuck"), Some(vm("stuck", 1, 4)));
    let window = Instant::now();
    until_within(
        &calls,
        "four failed attempts",
        Duration::from_secs(90),
        |c| {
            events(c)
                .iter()
                .filter(|(r, n)| r == "ResizeFailed" && n.contains("-> 1 vCPUs stopped at 1:"))
                .count()
                >= 4
        },
    )
    .await;
    let tries = attempts(&calls, "stuck", 1);
    let gaps: Vec<f64> = tries
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64())
        .collect();
    println!(
        "[stuck] {} attempts in {:.1} s, gaps {gaps:.1?}",
        tries.len(),
        window.elapsed().as_secs_f64()
    );
    // Each attempt costs the same (observe, offline try, 2 s deadline); the backoff after
    // it doubles: 2, 4, 8 s.
    assert_eq!(
        tries.len(),
        4,
        "one InProgress write per attempt: {tries:?}"
    );
    assert!(
        gaps[1] > gaps[0] + 1.0 && gaps[2] > gaps[1] + 2.5,
        "the delay between attempts grows: {gaps:?}"
    );
    let failed: Vec<String> = events(&calls)
        .into_iter()
        .filter(|(r, n)| r == "ResizeFailed" && n.contains("-> 1 vCPUs stopped at 1:"))
        .map(|(_, n)| n)
        .collect();
    for (i, n) in failed.iter().enumerate() {
        assert!(
            n.contains("did not release vCPU slot 1 within 2 s")
                && n.contains("vCPU slot 1 is Unplugging (not released by the guest yet)")
                && n.contains(&format!("attempt {}, next in {} s", i + 1, 2u64 << i)),
            "attempt {}: {n}",
            i + 1
        );
    }
    let last = statuses(&calls, "stuck").pop().unwrap();
    assert!(
        cond_is(&last, "ResizeInProgress", "True", "Error"),
        "{last}"
    );
    assert_eq!(states(&last, 6)[1], "Unplugging");

    // A new target while the retries wait 16 s: acted on at once.
    let written = Instant::now();
    d.dispatch(key("stuck"), Some(vm("stuck", 2, 5)));
    until_within(
        &calls,
        "target 2 in progress",
        Duration::from_secs(8),
        |c| {
            !attempts(
                &Arc::new(std::sync::Mutex::new(c.lock().unwrap().clone())),
                "stuck",
                2,
            )
            .iter()
            .all(|(at, _)| *at < written)
        },
    )
    .await;
    let taken = written.elapsed();
    println!(
        "[stuck] target 2 acted on after {:.2} s",
        taken.as_secs_f64()
    );
    assert!(
        taken < Duration::from_secs(6),
        "not after the 16 s backoff: {taken:?}"
    );
    ctl.execute_value("cont", None, t).await.unwrap();
    until_within(&calls, "converged on 2", Duration::from_secs(60), |c| {
        last_status_has(c, "stuck", |s| {
            settled(s, 2)
                && states(s, 6).iter().filter(|st| *st == "Online").count() == 2
                && !states(s, 6)
                    .iter()
                    .any(|st| st == "Unplugging" || st == "Plugging")
        })
    })
    .await;
    drop(d);
    env.shutdown().await;
}
