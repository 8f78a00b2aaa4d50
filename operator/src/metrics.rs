//! The operator's Prometheus metrics. Labels are bounded: a phase, an error category.

use corescale_api::{Phase, VirtualMachine};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use thiserror::Error;

/// Errors creating the metrics.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// A metric could not be registered (a duplicate name: a bug).
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// Duration of reconciles.
    pub reconcile_duration: Histogram,
    /// Failed reconciles by category.
    pub reconcile_errors: IntCounterVec,
    /// VMs by phase.
    pub vms: IntGaugeVec,
    /// 1 while this replica leads.
    pub leader: IntGauge,
}

impl Metrics {
    /// Create and register every metric; counters start at zero for every category.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "corescale_operator_reconcile_duration_seconds",
                "Time one VirtualMachine reconcile took.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "corescale_operator_reconcile_errors_total",
                "Failed reconciles by category.",
            ),
            &["category"],
        )?;
        for c in [
            "conflict",
            "not_found",
            "forbidden",
            "api_refused",
            "api_unreachable",
            "invalid_object",
        ] {
            reconcile_errors.with_label_values(&[c]);
        }
        let vms = IntGaugeVec::new(
            Opts::new(
                "corescale_operator_vms",
                "VirtualMachines by phase (no phase yet counts as Pending).",
            ),
            &["phase"],
        )?;
        let leader = IntGauge::new(
            "corescale_operator_leader",
            "1 while this replica is the leader.",
        )?;
        let build = corescale_common::build_info("operator")?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(vms.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(build))?;
        Ok(Metrics {
            registry,
            reconcile_duration,
            reconcile_errors,
            vms,
            leader,
        })
    }

    /// Recount VMs by phase.
    pub fn count_phases<'a>(&self, vms: impl Iterator<Item = &'a VirtualMachine>) {
        let mut counts = [0i64; Phase::ALL.len()];
        for vm in vms {
            let p = vm
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Pending);
            if let Some(i) = Phase::ALL.iter().position(|x| *x == p) {
                counts[i] += 1;
            }
        }
        for (p, n) in Phase::ALL.iter().zip(counts) {
            self.vms.with_label_values(&[p.as_str()]).set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_and_every_series_exists_from_the_start() {
        let m = Metrics::new().unwrap();
        let vms: Vec<VirtualMachine> = ["Running", "Running", "Pending"]
            .iter()
            .map(|p| {
                serde_yaml::from_str(&format!(
                    "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: a}}\nspec: {{cpus: 1}}\nstatus: {{phase: {p}}}"
                ))
                .unwrap()
            })
            .collect();
        m.count_phases(vms.iter());
        assert_eq!(m.vms.with_label_values(&["Running"]).get(), 2);
        assert_eq!(m.vms.with_label_values(&["Pending"]).get(), 1);
        assert_eq!(m.vms.with_label_values(&["Failed"]).get(), 0);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .unwrap();
        assert!(text.contains("corescale_operator_reconcile_errors_total{category=\"conflict\"} 0"));
        assert!(text.contains("corescale_build_info{component=\"operator\""));
    }
}
