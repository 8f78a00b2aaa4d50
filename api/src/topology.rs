//! A VM's vCPU topology, which both its spec and its status carry.
//!
//! Its bounds are OpenAPI `minimum`/`maximum`, not CEL: the status carries the same type,
//! and the API server validates the whole object on every status write, so a CEL rule here
//! would run on each of the node agents' status reports.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// vCPU topology of a VM: sockets x cores x threads slots.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// Sockets (1-16); each socket is one virtual NUMA node of the guest.
    #[schemars(range(min = 1, max = 16))]
    pub sockets: u32,
    /// Cores per socket (1-255).
    #[schemars(range(min = 1, max = 255))]
    pub cores: u32,
    /// Threads per core (1-8).
    #[serde(default = "default_threads")]
    #[schemars(range(min = 1, max = 8))]
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
