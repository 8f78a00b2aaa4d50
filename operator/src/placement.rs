//! Pure placement: which node should run a VM. No I/O; unit-tested from fixtures.

use corescale_api::node::NodeAnnouncement;
use corescale_api::VirtualMachineSpec;
use std::collections::BTreeMap;
use thiserror::Error;

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What the node's agent announced.
    pub announcement: NodeAnnouncement,
    /// Whether the agent's Lease is live now.
    pub live: bool,
    /// Labels of the Node object (empty when there is none).
    pub labels: BTreeMap<String, String>,
}

/// Why no node fits. The message goes into the Scheduled condition and an Event.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Unschedulable {
    /// No node agent is alive.
    #[error("no node agent is alive (no live corescale-node-* Lease)")]
    NoLiveNodes,
    /// spec.nodeName names a node without a live agent.
    #[error("spec.nodeName {0:?} has no live node agent")]
    PinnedNodeNotLive(String),
    /// Every live node was ruled out; the reasons per node.
    #[error("no node fits: {}", .0.iter().map(|(n, r)| format!("{n}: {r}")).collect::<Vec<_>>().join("; "))]
    NoneFits(Vec<(String, String)>),
}

/// Choose the node for a VM: honour `spec.nodeName` and `spec.nodeSelector`, skip nodes
/// that cannot run the VM's architecture or size, and among the rest take the one with
/// the most free vCPUs (capacity minus the targets of the VMs already placed there).
/// Ties go to the lexically first node name, so decisions are reproducible.
///
/// `load` maps node name to the vCPUs its VMs want now (not counting this VM);
/// `max_vcpus` is the VM's slot count; `exclude` is a node to avoid (a reschedule).
pub fn choose_node(
    spec: &VirtualMachineSpec,
    max_vcpus: u32,
    candidates: &[Candidate],
    load: &BTreeMap<String, u32>,
    exclude: Option<&str>,
) -> Result<String, Unschedulable> {
    let live: Vec<&Candidate> = candidates.iter().filter(|c| c.live).collect();
    if let Some(pinned) = &spec.node_name {
        if !live.iter().any(|c| &c.announcement.node == pinned) {
            return Err(Unschedulable::PinnedNodeNotLive(pinned.clone()));
        }
    }
    if live.is_empty() {
        return Err(Unschedulable::NoLiveNodes);
    }
    let arch = arch_name(spec);
    let mut rejected = Vec::new();
    let mut best: Option<(&str, i64)> = None;
    for c in live {
        let a = &c.announcement;
        let reject = |why: String| (a.node.clone(), why);
        if spec.node_name.as_ref().is_some_and(|p| p != &a.node) {
            continue;
        }
        if exclude == Some(a.node.as_str()) {
            rejected.push(reject("its agent stopped renewing its lease".into()));
            continue;
        }
        if let Some(sel) = &spec.node_selector {
            if let Some((k, v)) = sel.iter().find(|(k, v)| c.labels.get(*k) != Some(*v)) {
                rejected.push(reject(format!("node label {k}={v} does not match")));
                continue;
            }
        }
        if !a.arches.contains(&spec.effective_arch()) {
            rejected.push(reject(format!("cannot run {arch} guests")));
            continue;
        }
        if a.max_vcpus_per_vm < max_vcpus {
            rejected.push(reject(format!(
                "runs VMs of at most {} vCPUs, this VM has {max_vcpus} slots",
                a.max_vcpus_per_vm
            )));
            continue;
        }
        let used = load.get(&a.node).copied().unwrap_or(0);
        let free = i64::from(a.capacity_vcpus) - i64::from(used);
        if free < i64::from(spec.cpus) {
            rejected.push(reject(format!(
                "{free} free vCPUs of {}, this VM wants {}",
                a.capacity_vcpus, spec.cpus
            )));
            continue;
        }
        let better = match best {
            None => true,
            Some((name, f)) => free > f || (free == f && a.node.as_str() < name),
        };
        if better {
            best = Some((a.node.as_str(), free));
        }
    }
    best.map(|(n, _)| n.to_string())
        .ok_or(Unschedulable::NoneFits(rejected))
}

fn arch_name(spec: &VirtualMachineSpec) -> &'static str {
    spec.effective_arch().as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> VirtualMachineSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn node(name: &str, capacity: u32, live: bool) -> Candidate {
        Candidate {
            announcement: NodeAnnouncement {
                node: name.into(),
                capacity_vcpus: capacity,
                host_cpus: 2,
                max_vcpus_per_vm: 64,
                accelerator: "tcg".into(),
                arches: vec![corescale_api::Arch::X86_64],
                version: "test".into(),
            },
            live,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn most_free_capacity_wins_and_ties_are_stable() {
        let nodes = [node("a", 8, true), node("b", 8, true), node("c", 16, false)];
        let s = spec("cpus: 2");
        assert_eq!(
            choose_node(&s, 4, &nodes, &BTreeMap::new(), None),
            Ok("a".into())
        );
        let load = BTreeMap::from([("a".to_string(), 3)]);
        assert_eq!(choose_node(&s, 4, &nodes, &load, None), Ok("b".into()));
    }

    #[test]
    fn pinned_node_and_selector_are_honoured() {
        let mut nodes = vec![node("a", 8, true), node("b", 8, true)];
        nodes[1].labels.insert("pool".into(), "fast".into());
        let s = spec("cpus: 1\nnodeName: b");
        assert_eq!(
            choose_node(&s, 1, &nodes, &BTreeMap::new(), None),
            Ok("b".into())
        );
        let s = spec("cpus: 1\nnodeName: zz");
        assert_eq!(
            choose_node(&s, 1, &nodes, &BTreeMap::new(), None),
            Err(Unschedulable::PinnedNodeNotLive("zz".into()))
        );
        let s = spec("cpus: 1\nnodeSelector: {pool: fast}");
        assert_eq!(
            choose_node(&s, 1, &nodes, &BTreeMap::new(), None),
            Ok("b".into())
        );
    }

    #[test]
    fn nothing_fits_says_why_per_node() {
        let nodes = [node("a", 2, true), node("b", 8, true)];
        let s = spec("cpus: 3");
        let load = BTreeMap::from([("b".to_string(), 6)]);
        let e = choose_node(&s, 100, &nodes, &load, None).unwrap_err();
        assert!(
            e.to_string().contains("a: runs VMs of at most 64 vCPUs"),
            "{e}"
        );
        let e = choose_node(&s, 4, &nodes, &load, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("b: 2 free vCPUs of 8, this VM wants 3"),
            "{e}"
        );
        let e = choose_node(&s, 4, &[node("a", 8, false)], &load, None).unwrap_err();
        assert_eq!(e, Unschedulable::NoLiveNodes);
    }

    #[test]
    fn power_vms_go_only_to_nodes_that_run_them() {
        let mut power_node = node("p", 2, true);
        power_node
            .announcement
            .arches
            .push(corescale_api::Arch::Ppc64le);
        let nodes = [node("a", 8, true), power_node];
        let s = spec("cpus: 1\narch: ppc64le");
        assert_eq!(
            choose_node(&s, 2, &nodes, &BTreeMap::new(), None),
            Ok("p".into())
        );
        let e = choose_node(&s, 2, &nodes[..1], &BTreeMap::new(), None).unwrap_err();
        assert!(
            e.to_string().contains("a: cannot run ppc64le guests"),
            "{e}"
        );
    }

    #[test]
    fn reschedule_avoids_the_lost_node() {
        let nodes = [node("a", 8, true), node("b", 4, true)];
        let s = spec("cpus: 1");
        assert_eq!(
            choose_node(&s, 1, &nodes, &BTreeMap::new(), Some("a")),
            Ok("b".into())
        );
    }
}
