//! The node agent with a `resizeMethod: GuestOnline` VM on the real QEMU backend (QEMU/TCG
//! guests, a mocked API server): status lists every slot Online or Offline, the metrics
//! carry the method, and a guest without an agent is Infeasible with the reason.

mod common;

use common::agent::key;
use common::mock_api::*;
use common::{prerequisites, Env};
use corescale_api::{VirtualMachine, FINALIZER};
use corescale_node_vmm::agent::{self, Config, Dispatcher, Shared};
use corescale_node_vmm::backend::qemu::QemuBackend;
use corescale_node_vmm::backend::Backend;
use corescale_node_vmm::images::ImageDir;
use corescale_node_vmm::metrics::Metrics;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn agent(env: &Env) -> (Arc<Shared>, Calls) {
    prerequisites();
    let (client, calls) = api();
    let mut cfg = env.cfg.clone();
    // This machine's /dev/kvm cannot boot Linux.
    cfg.accel = "tcg".into();
    let backend: Arc<dyn Backend> = Arc::new(QemuBackend::new(cfg));
    let config = Config {
        // Short: the guest without an agent counts as such after 8 s.
        agent_grace: Duration::from_secs(8),
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

/// A GuestOnline VM placed on n1: 1 socket of 4 cores; `boot` is extra YAML for spec.
fn vm(name: &str, cpus: u32, generation: i64, boot: &str) -> Arc<VirtualMachine> {
    Arc::new(
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: d\n  uid: uid-{name}\n  generation: {generation}\n  resourceVersion: '5'\n  finalizers: [{FINALIZER}]\nspec: {{cpus: {cpus}, resizeMethod: GuestOnline, topology: {{sockets: 1, cores: 4, threads: 1}}{boot}}}\nstatus: {{nodeName: n1, topology: {{sockets: 1, cores: 4, threads: 1}}}}\n"
        ))
        .unwrap(),
    )
}

/// The state of each of the 4 slots as status.vcpus lists them.
fn states(st: &Value) -> Vec<String> {
    let mut out = vec!["Absent".to_string(); 4];
    for v in st["vcpus"].as_array().into_iter().flatten() {
        let i = usize::try_from(v["index"].as_u64().unwrap()).unwrap();
        out[i] = v["state"].as_str().unwrap().to_string();
    }
    out
}

fn settled(st: &Value, cpus: u32) -> bool {
    st["phase"] == "Running"
        && st["cpus"] == cpus
        && cond(st, "Ready").is_some_and(|c| c["status"] == "True")
        && !cond(st, "ResizeInProgress").is_some_and(|c| c["status"] == "True")
}

/// The value of the one sample of `metric` whose labels include every one of `labels`.
fn sample(shared: &Shared, metric: &str, labels: &[&str]) -> Option<f64> {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&shared.metrics.registry.gather())
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_vm_scales_1_3_2_through_the_agent() {
    let env = Env::new().await;
    let (shared, calls) = agent(&env);
    let mut d = Dispatcher::new(Arc::clone(&shared), HashMap::new());
    d.dispatch(key("go"), Some(vm("go", 1, 1, "")));
    until_within(&calls, "go: running with 1", Duration::from_secs(90), |c| {
        last_status_has(c, "go", |s| settled(s, 1))
    })
    .await;
    let st = statuses(&calls, "go").pop().unwrap();
    assert_eq!(states(&st), ["Online", "Offline", "Offline", "Offline"]);
    for (to, want) in [
        (3, ["Online", "Online", "Online", "Offline"]),
        (2, ["Online", "Online", "Offline", "Offline"]),
    ] {
        let generation = if to == 3 { 2 } else { 3 };
        d.dispatch(key("go"), Some(vm("go", to, generation, "")));
        until_within(&calls, &format!("go: {to}"), Duration::from_secs(60), |c| {
            last_status_has(c, "go", |s| {
                settled(s, to)
                    && s["lastResize"]["result"] == "Succeeded"
                    && s["lastResize"]["to"] == to
            })
        })
        .await;
        let st = statuses(&calls, "go").pop().unwrap();
        assert_eq!(states(&st), want, "{st}");
        println!("[go] -> {to}: {}", st["lastResize"]);
    }
    // Counted and timed under the VM's method, never under Hotplug.
    let ops = |dir: &str| {
        sample(
            &shared,
            "corescale_vcpu_hotplug_operations_total",
            &[
                "name=\"go\"",
                "method=\"GuestOnline\"",
                &format!("direction=\"{dir}\""),
                "result=\"success\"",
            ],
        )
    };
    assert_eq!((ops("plug"), ops("unplug")), (Some(2.0), Some(1.0)));
    let count = sample(
        &shared,
        "corescale_vcpu_hotplug_duration_seconds_count",
        &[
            "method=\"GuestOnline\"",
            "direction=\"plug\"",
            "phase=\"total\"",
        ],
    );
    assert_eq!(count, Some(2.0));
    assert_eq!(
        sample(
            &shared,
            "corescale_vcpu_hotplug_operations_total",
            &["method=\"Hotplug\""]
        ),
        None
    );
    let offline = sample(
        &shared,
        "corescale_vm_vcpus",
        &["name=\"go\"", "method=\"GuestOnline\"", "state=\"offline\""],
    );
    assert_eq!(offline, Some(2.0));
    drop(d);
    env.shutdown().await;
}

/// A GuestOnline guest whose agent never starts: it runs, and a resize is ResizePending
/// Infeasible naming the missing agent (with a Warning Event), never a silent wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_online_without_an_agent_is_infeasible() {
    let env = Env::new().await;
    let (shared, calls) = agent(&env);
    let mut d = Dispatcher::new(shared, HashMap::new());
    let off = ", boot: {cmdline: 'corescale.agent=off'}";
    d.dispatch(key("mute"), Some(vm("mute", 1, 1, off)));
    until_within(&calls, "mute: running", Duration::from_secs(90), |c| {
        last_status_has(c, "mute", |s| s["phase"] == "Running")
    })
    .await;
    d.dispatch(key("mute"), Some(vm("mute", 2, 2, off)));
    until_within(&calls, "mute: infeasible", Duration::from_secs(30), |c| {
        last_status_has(c, "mute", |s| {
            cond(s, "ResizePending").is_some_and(|c| {
                c["status"] == "True"
                    && c["reason"] == "Infeasible"
                    && c["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("qemu-guest-agent")
            })
        })
    })
    .await;
    let st = statuses(&calls, "mute").pop().unwrap();
    assert_eq!(st["cpus"], 1, "nothing changed: {st}");
    assert_eq!(st["guestAgent"], "Absent");
    assert_eq!(states(&st), ["Present", "Offline", "Offline", "Offline"]);
    println!("[mute] {}", cond(&st, "ResizePending").unwrap()["message"]);
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "Infeasible" && n.contains("resizeMethod Hotplug")));
    drop(d);
    env.shutdown().await;
}
