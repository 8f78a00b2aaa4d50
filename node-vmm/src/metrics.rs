//! The node agent's Prometheus metrics (`corescale_` prefix). Per-VM series carry only
//! `namespace` and `name` (bounded by the VMs of one node) plus small fixed label sets
//! (`method` is the VM's spec.resizeMethod, Hotplug or GuestOnline, fixed for its life);
//! a VM's series are removed when it leaves the node.

use crate::backend::Direction;
use corescale_api::{Phase, ResizeMethod};
use prometheus::core::{AtomicF64, GenericCounterVec};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use thiserror::Error;

/// Errors creating the metrics.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// Registration failed (a duplicate name: a bug).
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// States exported by `corescale_vm_vcpus`.
pub const VCPU_GAUGE_STATES: [&str; 7] = [
    "desired",
    "online",
    "present",
    "offline",
    "plugging",
    "unplugging",
    "max",
];
/// Hot-plug phases exported by the latency histogram.
pub const PHASES: [&str; 4] = ["applied", "acked", "online", "total"];
/// Resize-pending reasons.
pub const PENDING_REASONS: [&str; 2] = ["Deferred", "Infeasible"];
/// Results of a hot-plug operation.
pub const RESULTS: [&str; 2] = ["success", "failure"];

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// vCPUs per VM by state.
    pub vcpus: IntGaugeVec,
    /// Hot-plug latency per phase.
    pub hotplug_seconds: HistogramVec,
    /// Hot-plug operations by direction and result.
    pub hotplug_ops: IntCounterVec,
    /// CPU seconds per vCPU thread.
    pub vcpu_cpu_seconds: GenericCounterVec<AtomicF64>,
    /// CPU seconds of all the VM's vCPU threads together: `rate()` is the cores the guest
    /// keeps busy, the signal an autoscaler divides by its target per vCPU.
    pub vm_busy_seconds: GenericCounterVec<AtomicF64>,
    /// 1 for the VM's current phase, 0 for the others.
    pub phase: IntGaugeVec,
    /// 1 while a resize of the VM waits, by reason.
    pub resize_pending: IntGaugeVec,
    /// Reconnects and restarts of VMMs.
    pub vmm_restarts: IntCounterVec,
}

/// Histogram buckets from 1 ms to 30 s, roughly x2.5 apart.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let vm = ["namespace", "name"];
        let vcpus = IntGaugeVec::new(
            Opts::new(
                "corescale_vm_vcpus",
                "vCPUs of a VM by state: desired, online, present, offline (present in the VMM, offline in the guest), plugging, unplugging, max; method is the VM's resize method.",
            ),
            &["namespace", "name", "method", "state"],
        )?;
        let hotplug_seconds = HistogramVec::new(
            HistogramOpts::new(
                "corescale_vcpu_hotplug_duration_seconds",
                "Time from the start of a vCPU plug or unplug to each phase: applied (VMM accepted, or the guest agent's online/offline call returned), acked (guest ACPI acknowledgement, or the agent lists the new state), online (guest agent sees it online), total; method Hotplug or GuestOnline.",
            )
            .buckets(latency_buckets()),
            &["namespace", "name", "method", "direction", "phase"],
        )?;
        let hotplug_ops = IntCounterVec::new(
            Opts::new(
                "corescale_vcpu_hotplug_operations_total",
                "vCPU plug and unplug operations (onlines and offlines under GuestOnline) by result.",
            ),
            &["namespace", "name", "method", "direction", "result"],
        )?;
        let vcpu_cpu_seconds = GenericCounterVec::<AtomicF64>::new(
            Opts::new(
                "corescale_vcpu_cpu_seconds_total",
                "CPU time consumed by each vCPU's host thread.",
            ),
            &["namespace", "name", "vcpu"],
        )?;
        let vm_busy_seconds = GenericCounterVec::<AtomicF64>::new(
            Opts::new(
                "corescale_vm_vcpu_busy_seconds_total",
                "CPU time consumed by all of a VM's vCPU threads together; rate() is the number of cores the guest keeps busy (the autoscaling signal).",
            ),
            &vm,
        )?;
        let phase = IntGaugeVec::new(
            Opts::new(
                "corescale_vm_phase",
                "1 for the VM's current phase, 0 for the others.",
            ),
            &["namespace", "name", "phase"],
        )?;
        let resize_pending = IntGaugeVec::new(
            Opts::new("corescale_resize_pending", "1 while a resize of the VM waits: Deferred (node budget full) or Infeasible (never fits)."),
            &["namespace", "name", "reason"],
        )?;
        let vmm_restarts = IntCounterVec::new(
            Opts::new(
                "corescale_vmm_restarts_total",
                "Times the VM's VMM process died and was restarted.",
            ),
            &vm,
        )?;
        let build = corescale_common::build_info("node-vmm")?;
        for c in [
            Box::new(vcpus.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(hotplug_seconds.clone()),
            Box::new(hotplug_ops.clone()),
            Box::new(vcpu_cpu_seconds.clone()),
            Box::new(vm_busy_seconds.clone()),
            Box::new(phase.clone()),
            Box::new(resize_pending.clone()),
            Box::new(vmm_restarts.clone()),
            Box::new(build),
        ] {
            registry.register(c)?;
        }
        Ok(Metrics {
            registry,
            vcpus,
            hotplug_seconds,
            hotplug_ops,
            vcpu_cpu_seconds,
            vm_busy_seconds,
            phase,
            resize_pending,
            vmm_restarts,
        })
    }

    /// Create a VM's series with zero values, so counters start at zero.
    pub fn register_vm(&self, ns: &str, name: &str, method: ResizeMethod) {
        let m = method.as_str();
        for d in [Direction::Plug, Direction::Unplug] {
            for r in RESULTS {
                self.hotplug_ops
                    .with_label_values(&[ns, name, m, d.as_str(), r]);
            }
            // Histogram series exist from the start too, so a VM's first resize is a rate
            // that dashboards can see rather than a series that appears with its sample.
            for p in PHASES {
                self.hotplug_seconds
                    .with_label_values(&[ns, name, m, d.as_str(), p]);
            }
        }
        for r in PENDING_REASONS {
            self.resize_pending.with_label_values(&[ns, name, r]);
        }
        self.vmm_restarts.with_label_values(&[ns, name]);
        // Not vm_busy_seconds: its first value is the vCPU threads' whole lifetime (a new
        // agent re-adopting a guest continues where the old one left off), and a series
        // that started at 0 would make that look like a burst of load.
    }

    /// Remove every series of a VM that left the node (`max_vcpus`: its slot count).
    pub fn forget_vm(&self, ns: &str, name: &str, max_vcpus: u32) {
        for m in ResizeMethod::ALL.map(ResizeMethod::as_str) {
            for st in VCPU_GAUGE_STATES {
                let _ = self.vcpus.remove_label_values(&[ns, name, m, st]);
            }
            for d in [Direction::Plug, Direction::Unplug] {
                for p in PHASES {
                    let _ = self
                        .hotplug_seconds
                        .remove_label_values(&[ns, name, m, d.as_str(), p]);
                }
                for r in RESULTS {
                    let _ = self
                        .hotplug_ops
                        .remove_label_values(&[ns, name, m, d.as_str(), r]);
                }
            }
        }
        for v in 0..max_vcpus {
            let _ = self
                .vcpu_cpu_seconds
                .remove_label_values(&[ns, name, &v.to_string()]);
        }
        for p in Phase::ALL {
            let _ = self.phase.remove_label_values(&[ns, name, p.as_str()]);
        }
        for r in PENDING_REASONS {
            let _ = self.resize_pending.remove_label_values(&[ns, name, r]);
        }
        let _ = self.vmm_restarts.remove_label_values(&[ns, name]);
        let _ = self.vm_busy_seconds.remove_label_values(&[ns, name]);
    }

    /// Set the phase gauges of a VM.
    pub fn set_phase(&self, ns: &str, name: &str, phase: Phase) {
        for p in Phase::ALL {
            self.phase
                .with_label_values(&[ns, name, p.as_str()])
                .set(i64::from(p == phase));
        }
    }
}
