//! corescale's node side: the agent that turns `VirtualMachine` objects placed on this node
//! into running guests whose online vCPUs follow `spec.cpus`, the launcher that owns the
//! VMM processes, and the backends that run guests (QEMU over QMP today).

pub mod accel;
pub mod agent;
pub mod backend;
pub mod console;
pub mod images;
pub mod launcher;
pub mod metrics;

/// A duration in seconds rounded to the millisecond, as the errors of the protocol clients
/// and the backend report deadlines.
pub(crate) fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
