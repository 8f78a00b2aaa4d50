//! What the agent tests share: the agent's settings for node n1, a VM key in namespace `d`,
//! and a VM object placed on n1.

use corescale_api::{VirtualMachine, FINALIZER};
use corescale_node_vmm::agent::Config;
use corescale_node_vmm::backend::sim::SimDelays;
use corescale_node_vmm::backend::VmKey;
use std::sync::Arc;
use std::time::Duration;

/// The agent's settings in the tests; each test file changes what it needs with
/// `Config { field: value, ..config() }`.
pub fn config() -> Config {
    Config {
        system_namespace: "corescale-system".into(),
        lease_duration: Duration::from_secs(15),
        overcommit: 8.0,
        plug_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(2),
        in_progress_after: Duration::from_millis(250),
        agent_grace: Duration::from_secs(30),
        port_address: std::net::Ipv4Addr::LOCALHOST,
        port_advertise: None,
        writes_in_flight: 16,
    }
}

/// The key of VM `name` in namespace `d`.
pub fn key(name: &str) -> VmKey {
    VmKey {
        namespace: "d".into(),
        name: name.into(),
    }
}

/// VM `name` in namespace `d`, placed on n1 with the topology `cores` x 1 x 1 recorded;
/// `spec` is its spec as YAML, `extra_meta` more metadata lines.
pub fn placed(
    name: &str,
    generation: i64,
    spec: &str,
    extra_meta: &str,
    cores: u32,
) -> Arc<VirtualMachine> {
    Arc::new(
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: d\n  uid: uid-{name}\n  generation: {generation}\n  resourceVersion: '5'\n  finalizers: [{FINALIZER}]\n{extra_meta}spec: {spec}\nstatus: {{nodeName: n1, topology: {{sockets: 1, cores: {cores}, threads: 1}}}}\n"
        ))
        .expect("a VirtualMachine"),
    )
}

/// A simulated guest that boots in 20 ms and answers a plug in about 10 ms.
pub fn fast() -> SimDelays {
    SimDelays {
        boot: Duration::from_millis(20),
        applied: Duration::from_millis(1),
        acked: Duration::from_millis(5),
        online: Duration::from_millis(5),
    }
}
