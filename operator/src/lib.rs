//! corescale's operator: places each `VirtualMachine` on a node whose agent is alive and
//! has room, owns the VM's lifecycle (finalizer, node loss), and reports cluster-level
//! conditions and Events. It is not in the resize hot path: node agents act on `spec.cpus`
//! directly.

pub mod controller;
pub mod decide;
pub mod liveness;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod run;
pub mod status;
