//! The launcher container follows its guests, through the worker: a boot or a grow waits
//! for the kubelet (a stand-in answering for the node-vmm pod, on a mocked API server),
//! a grow it refuses leaves the guest as it was with the VM's `ResizePending` carrying the
//! kubelet's message, and a shrink is written after the unplug. The real kubelet does the
//! same in `make node-e2e` (scenario `launcher-resources`).

mod common;

use common::agent::{fast, key};
use common::mock_api::*;
use corescale_api::VirtualMachine;
use corescale_node_vmm::agent::launcher_size::{LauncherSizer, Resources, Sizing};
use corescale_node_vmm::agent::{self, Config, Dispatcher};
use corescale_node_vmm::backend::sim::SimBackend;
use corescale_node_vmm::backend::{Accel, Backend, NodeCapacity};
use corescale_node_vmm::metrics::Metrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const MI: u64 = 1 << 20;

fn vm(name: &str, spec: &str) -> Arc<VirtualMachine> {
    common::agent::placed(name, 1, spec, "", 4)
}

#[tokio::test]
async fn the_launcher_container_follows_the_guest_and_the_kubelet_has_the_last_word() {
    // A node of 1 CPU and 2 GiB for pods: 100m + 250m per vCPU fits 3 vCPUs, not 4.
    let (client, calls) = api_with_kubelet(1000, 2048 * MI);
    let cap = NodeCapacity {
        host_cpus: 4,
        max_vcpus_per_vm: 16,
        accel: Accel::Tcg,
        arches: [(corescale_api::Arch::X86_64, Accel::Tcg)].into(),
    };
    let sim = Arc::new(SimBackend::new(fast(), cap));
    let backend: Arc<dyn Backend> = sim.clone();
    let sizer = Arc::new(LauncherSizer::new(
        kube::Api::namespaced(client.clone(), "corescale-system"),
        "p".into(),
        "launcher".into(),
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
        },
        Duration::from_secs(5),
    ));
    let config = Config {
        overcommit: 4.0,
        plug_timeout: Duration::from_secs(5),
        stop_grace: Duration::from_millis(100),
        in_progress_after: Duration::ZERO,
        ..common::agent::config()
    };
    let shared = agent::shared(
        client,
        "n1".into(),
        backend,
        None,
        Metrics::new().unwrap(),
        config,
        Some(sizer.clone()),
    );
    let bg = tokio::spawn(async move { sizer.run().await });
    let mut d = Dispatcher::new(shared, HashMap::new());

    // The boot waits for room: 100m + 2 x 250m.
    d.dispatch(key("a"), Some(vm("a", "{cpus: 2}")));
    until(&calls, "a Running with 2", |c| {
        last_status_has(c, "a", |s| s["phase"] == "Running" && s["cpus"] == 2)
    })
    .await;
    assert_eq!(launcher_cpu_requests(&calls), ["600m"]);

    // 4 vCPUs need 1100m of a 1000m node: refused, given back, the guest keeps 2.
    d.dispatch(key("a"), Some(vm("a", "{cpus: 4}")));
    until(&calls, "a Infeasible", |c| {
        last_status_has(c, "a", |s| {
            cond(s, "ResizePending")
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "Infeasible")
        })
    })
    .await;
    let last = statuses(&calls, "a").pop().unwrap();
    let msg = cond(&last, "ResizePending").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        msg,
        "the kubelet cannot give the launcher container room for this VM: Node didn't have enough capacity: cpu, requested: 1100, capacity: 1000"
    );
    assert_eq!(last["cpus"], 2, "the guest keeps what it had");
    let running = sim.running().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(launcher_cpu_requests(&calls), ["600m", "1100m", "600m"]);
    assert!(events(&calls)
        .iter()
        .any(|(r, n)| r == "Infeasible" && *n == msg));

    // 3 fits: grown first, then plugged; back to 1: unplugged, then shrunk.
    d.dispatch(key("a"), Some(vm("a", "{cpus: 3}")));
    until(&calls, "a at 3", |c| {
        last_status_has(c, "a", |s| s["cpus"] == 3)
    })
    .await;
    assert_eq!(launcher_cpu_requests(&calls).last().unwrap(), "850m");
    d.dispatch(key("a"), Some(vm("a", "{cpus: 1}")));
    until(&calls, "a at 1", |c| {
        last_status_has(c, "a", |s| s["cpus"] == 1)
    })
    .await;
    until(&calls, "the shrink written", |c| {
        launcher_cpu_requests(c).last().map(String::as_str) == Some("350m")
    })
    .await;

    // A guest whose memory the node cannot hold never boots.
    d.dispatch(key("big"), Some(vm("big", "{cpus: 1, memory: 4Gi}")));
    until(&calls, "big Infeasible", |c| {
        last_status_has(c, "big", |s| {
            s["phase"] == "Failed"
                && cond(s, "Running")
                    .is_some_and(|c| c["status"] == "False" && c["reason"] == "Infeasible")
        })
    })
    .await;
    let last = statuses(&calls, "big").pop().unwrap();
    assert!(
        cond(&last, "ResizePending").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("memory, requested"),
        "{last}"
    );
    assert_eq!(sim.running().await.unwrap().len(), 1, "big has no guest");
    // Written back to what `a` holds at 1 vCPU.
    assert_eq!(launcher_cpu_requests(&calls).last().unwrap(), "350m");
    bg.abort();
}
