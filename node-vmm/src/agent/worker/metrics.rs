//! The metrics a worker updates: hot-plug operations and their latency by phase, per-vCPU
//! and per-VM CPU seconds, the per-VM gauges that mirror each status (vCPUs by state,
//! phase, pending resizes), and VMM restarts.

use super::Worker;
use crate::agent::decide;
use crate::backend::ResizeReport;
use corescale_api::conditions as cond;
use corescale_api::{Phase, ResizeMethod, VcpuState, VirtualMachine, VirtualMachineStatus};

/// The per-VM gauges as last set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gauges {
    method: ResizeMethod,
    /// In the order of [`crate::metrics::VCPU_GAUGE_STATES`].
    vcpus: [i64; crate::metrics::VCPU_GAUGE_STATES.len()],
    phase: Phase,
    pending: [bool; crate::metrics::PENDING_REASONS.len()],
}

impl Worker {
    /// Count each step of a resize, and time its phases.
    pub(super) fn record_metrics(&self, vm: &VirtualMachine, report: &ResizeReport) {
        let m = &self.shared.metrics;
        let (ns, name) = (self.key.namespace.as_str(), self.key.name.as_str());
        let method = vm.spec.resize_method.as_str();
        for s in &report.steps {
            let d = s.direction.as_str();
            let result = if s.error.is_some() {
                "failure"
            } else {
                "success"
            };
            m.hotplug_ops
                .with_label_values(&[ns, name, method, d, result])
                .inc();
            let phases = [
                ("applied", s.applied),
                ("acked", s.acked),
                ("online", s.online),
            ];
            for (p, v) in phases {
                if let Some(v) = v {
                    m.hotplug_seconds
                        .with_label_values(&[ns, name, method, d, p])
                        .observe(v.as_secs_f64());
                }
            }
            if s.error.is_none() {
                let total = s.online.or(s.acked).or(s.applied);
                if let Some(t) = total {
                    m.hotplug_seconds
                        .with_label_values(&[ns, name, method, d, "total"])
                        .observe(t.as_secs_f64());
                }
            }
        }
    }

    /// Add the CPU seconds each vCPU thread ran since the last read, per vCPU and per VM.
    pub(super) async fn update_cpu_metrics(&mut self) {
        let Some(v) = &self.g.vmm else { return };
        let Ok(times) = v.handle.vcpu_cpu_seconds().await else {
            return;
        };
        let m = &self.shared.metrics;
        let (ns, name) = (&self.key.namespace, &self.key.name);
        for (slot, secs) in times {
            let seen = self.g.cpu_seen.entry(slot).or_insert(0.0);
            // Less than last time: a new thread (a re-plugged vCPU, a restarted QEMU)
            // that started from zero; all of its time is new.
            let ran = if secs >= *seen { secs - *seen } else { secs };
            if ran > 0.0 {
                m.vcpu_cpu_seconds
                    .with_label_values(&[ns, name, &slot.to_string()])
                    .inc_by(ran);
                m.vm_busy_seconds.with_label_values(&[ns, name]).inc_by(ran);
            }
            *seen = secs;
        }
    }

    /// The per-VM gauges, set to match `status` (about to be written). An idle guest is
    /// observed every few seconds and mostly unchanged: the gauges are set only when one
    /// of them changed (15 series lookups per observation were the largest part of a
    /// node agent's idle CPU at 1,000 VMs per node).
    pub(super) fn export_gauges(&self, vm: &VirtualMachine, status: &VirtualMachineStatus) {
        let count = |st: VcpuState| {
            i64::try_from(status.vcpus.iter().filter(|v| v.state == st).count()).unwrap_or(i64::MAX)
        };
        // Present: in the guest, online or not; a vCPU being unplugged is still there.
        let present =
            count(VcpuState::Present) + count(VcpuState::Online) + count(VcpuState::Unplugging);
        let pending = crate::metrics::PENDING_REASONS.map(|reason| {
            cond::get_condition(&status.conditions, cond::RESIZE_PENDING)
                .is_some_and(|c| c.status == "True" && c.reason == reason)
        });
        let now = Gauges {
            method: vm.spec.resize_method,
            vcpus: [
                i64::from(vm.spec.cpus),
                i64::from(status.cpus.unwrap_or(0)),
                present,
                count(VcpuState::Offline),
                count(VcpuState::Plugging),
                count(VcpuState::Unplugging),
                i64::from(decide::topology_of(vm).max_vcpus()),
            ],
            phase: self.g.phase,
            pending,
        };
        {
            let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
            if *exported == Some(now) {
                return;
            }
            *exported = Some(now);
        }
        let m = &self.shared.metrics;
        let (ns, name) = (self.key.namespace.as_str(), self.key.name.as_str());
        let method = now.method.as_str();
        for (state, v) in crate::metrics::VCPU_GAUGE_STATES.into_iter().zip(now.vcpus) {
            m.vcpus.with_label_values(&[ns, name, method, state]).set(v);
        }
        m.set_phase(ns, name, now.phase);
        for (reason, on) in crate::metrics::PENDING_REASONS.into_iter().zip(now.pending) {
            m.resize_pending
                .with_label_values(&[ns, name, reason])
                .set(i64::from(on));
        }
    }

    /// The guest was lost (its VMM exited, or it powered off); it will be restarted.
    pub(super) fn count_vmm_restart(&self) {
        self.shared
            .metrics
            .vmm_restarts
            .with_label_values(&[&self.key.namespace, &self.key.name])
            .inc();
    }

    /// The worker ends: the VM's series go (its per-vCPU ones up to its `max_vcpus` slots).
    pub(super) fn forget_metrics(&self) {
        self.shared
            .metrics
            .forget_vm(&self.key.namespace, &self.key.name, self.max_vcpus);
    }
}
