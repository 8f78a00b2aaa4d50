//! corescale's node side: the agent that turns `VirtualMachine` objects placed on this node
//! into running guests whose online vCPUs follow `spec.cpus`, the launcher that owns the
//! VMM processes, and the backends that run guests (QEMU over QMP today).

pub mod backend;
pub mod agent;
pub mod images;
pub mod metrics;
pub mod sim;
