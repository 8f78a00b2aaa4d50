//! A VM's vCPU topology, which both its spec and its status carry.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// vCPU topology of a VM: sockets x cores x threads slots.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// Sockets (1-16); each socket is one virtual NUMA node of the guest.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("spec.topology.sockets must be between 1 and 16").reason(Reason::FieldValueInvalid))]
    pub sockets: u32,
    /// Cores per socket (1-255).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 255").message("spec.topology.cores must be between 1 and 255").reason(Reason::FieldValueInvalid))]
    pub cores: u32,
    /// Threads per core (1-8).
    #[serde(default = "default_threads")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8").message("spec.topology.threads must be between 1 and 8").reason(Reason::FieldValueInvalid))]
    pub threads: u32,
}

fn default_threads() -> u32 {
    1
}

impl Topology {
    /// `sockets` x `cores` x `threads` slots.
    pub const fn new(sockets: u32, cores: u32, threads: u32) -> Self {
        Topology {
            sockets,
            cores,
            threads,
        }
    }
    /// The topology used when `spec.topology` is omitted: one socket, `cpus` cores, one thread.
    pub fn default_for(cpus: u32) -> Self {
        Topology {
            sockets: 1,
            cores: cpus.max(1),
            threads: 1,
        }
    }
    /// Number of vCPU slots (the VM's maximum vCPUs).
    pub fn max_vcpus(&self) -> u32 {
        self.sockets
            .saturating_mul(self.cores)
            .saturating_mul(self.threads)
    }
}
