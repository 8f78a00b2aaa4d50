//! How a node agent announces itself and its capacity, and how the operator reads it.
//!
//! Each node agent keeps a `coordination.k8s.io/v1` Lease named `corescale-node-<node>` in
//! the corescale namespace, renewed every few seconds, like kubelets do with their node
//! leases. Its capacity travels in annotations on that Lease, so one object carries both
//! "alive" and "how much room". Pure parsing here; the I/O lives in the agent and operator.

use crate::types::Arch;
use std::collections::BTreeMap;
use thiserror::Error;

/// Label on every node-agent Lease, so the operator can watch just those.
pub const AGENT_LEASE_LABEL: &str = "corescale.dev/node-agent";
/// Prefix of a node-agent Lease's name; the node name follows.
pub const AGENT_LEASE_PREFIX: &str = "corescale-node-";
/// vCPUs the node may give to its VMs (host CPUs x overcommit ratio).
pub const ANN_CAPACITY: &str = "corescale.dev/capacity-vcpus";
/// Host CPUs.
pub const ANN_HOST_CPUS: &str = "corescale.dev/host-cpus";
/// Largest VM (slots) the node can run.
pub const ANN_MAX_VCPUS: &str = "corescale.dev/max-vcpus-per-vm";
/// Accelerator the node's VMM uses (kvm or tcg).
pub const ANN_ACCEL: &str = "corescale.dev/accelerator";
/// Guest architectures the node can run, comma-separated.
pub const ANN_ARCHES: &str = "corescale.dev/architectures";
/// Version of the agent.
pub const ANN_VERSION: &str = "corescale.dev/agent-version";

/// The Lease name of a node's agent.
pub fn lease_name(node: &str) -> String {
    format!("{AGENT_LEASE_PREFIX}{node}")
}

/// What a node agent says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnnouncement {
    /// Node name.
    pub node: String,
    /// vCPUs the node may hand out in total.
    pub capacity_vcpus: u32,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Largest VM, in vCPU slots.
    pub max_vcpus_per_vm: u32,
    /// kvm or tcg.
    pub accelerator: String,
    /// Guest architectures it runs (one this version does not know, announced by a newer
    /// agent, is left out when read).
    pub arches: Vec<Arch>,
    /// Agent version.
    pub version: String,
}

/// A Lease annotation that is missing or malformed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnnouncementError {
    /// The annotation is absent.
    #[error("node-agent lease {lease}: annotation {key} is missing")]
    Missing {
        /// Lease name.
        lease: String,
        /// Annotation key.
        key: &'static str,
    },
    /// The annotation is not a number.
    #[error("node-agent lease {lease}: annotation {key}={value:?} is not a whole number")]
    NotANumber {
        /// Lease name.
        lease: String,
        /// Annotation key.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// The Lease name does not carry a node.
    #[error("lease {0} is not a node-agent lease (name must start with {AGENT_LEASE_PREFIX})")]
    NotAnAgentLease(String),
}

impl NodeAnnouncement {
    /// Annotations to put on the Lease.
    pub fn to_annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ANN_CAPACITY.to_string(), self.capacity_vcpus.to_string()),
            (ANN_HOST_CPUS.to_string(), self.host_cpus.to_string()),
            (ANN_MAX_VCPUS.to_string(), self.max_vcpus_per_vm.to_string()),
            (ANN_ACCEL.to_string(), self.accelerator.clone()),
            (
                ANN_ARCHES.to_string(),
                self.arches
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (ANN_VERSION.to_string(), self.version.clone()),
        ])
    }

    /// Read an announcement from a Lease's name and annotations.
    pub fn from_lease(
        lease_name: &str,
        ann: &BTreeMap<String, String>,
    ) -> Result<Self, AnnouncementError> {
        let node = lease_name
            .strip_prefix(AGENT_LEASE_PREFIX)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| AnnouncementError::NotAnAgentLease(lease_name.to_string()))?;
        let get = |key: &'static str| {
            ann.get(key).ok_or(AnnouncementError::Missing {
                lease: lease_name.to_string(),
                key,
            })
        };
        let num = |key: &'static str| -> Result<u32, AnnouncementError> {
            let v = get(key)?;
            v.parse().map_err(|_| AnnouncementError::NotANumber {
                lease: lease_name.to_string(),
                key,
                value: v.clone(),
            })
        };
        Ok(NodeAnnouncement {
            node: node.to_string(),
            capacity_vcpus: num(ANN_CAPACITY)?,
            host_cpus: num(ANN_HOST_CPUS)?,
            max_vcpus_per_vm: num(ANN_MAX_VCPUS)?,
            accelerator: get(ANN_ACCEL)?.clone(),
            arches: get(ANN_ARCHES)?
                .split(',')
                .map(str::trim)
                .filter_map(|s| s.parse().ok())
                .collect(),
            version: ann.get(ANN_VERSION).cloned().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let a = NodeAnnouncement {
            node: "n1".into(),
            capacity_vcpus: 8,
            host_cpus: 2,
            max_vcpus_per_vm: 255,
            accelerator: "tcg".into(),
            arches: vec![Arch::X86_64, Arch::Aarch64],
            version: "0.1.0".into(),
        };
        let ann = a.to_annotations();
        assert_eq!(ann[ANN_ARCHES], "x86_64,aarch64");
        assert_eq!(NodeAnnouncement::from_lease(&lease_name("n1"), &ann), Ok(a));
        let mut newer = ann.clone();
        newer.insert(ANN_ARCHES.into(), "riscv64, x86_64".into());
        let read = NodeAnnouncement::from_lease(&lease_name("n1"), &newer).unwrap();
        assert_eq!(
            read.arches,
            [Arch::X86_64],
            "an unknown architecture is left out"
        );
        let mut bad = ann.clone();
        bad.insert(ANN_CAPACITY.into(), "lots".into());
        let e = NodeAnnouncement::from_lease("corescale-node-n1", &bad).unwrap_err();
        assert!(
            e.to_string().contains("corescale.dev/capacity-vcpus"),
            "{e}"
        );
        assert!(NodeAnnouncement::from_lease("other", &ann).is_err());
        let mut missing = ann;
        missing.remove(ANN_ARCHES);
        assert!(matches!(
            NodeAnnouncement::from_lease("corescale-node-n1", &missing),
            Err(AnnouncementError::Missing {
                key: ANN_ARCHES,
                ..
            })
        ));
    }
}
