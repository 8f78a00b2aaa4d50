//! A simulated backend, for scale tests and benchmarks only (like kwok for kubelets).
//!
//! It keeps slot states in memory and answers plugs and unplugs after configurable delays,
//! so one machine can host many "VMs" without QEMU. The agent drives it through exactly
//! the same code path as a real backend. It is never a default: the agent selects it only
//! with `--backend simulator`, which the benchmarks set.

use crate::backend::{
    Backend, BackendError, Direction, NodeCapacity, Observation, ResizeOptions, ResizeReport,
    SlotObservation, StepReport, VmEvent, VmHandle, VmKey, VmSpec,
};
use corescale_api::{Plan, VcpuState};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex as AsyncMutex};

/// Delays of the simulated guest.
#[derive(Debug, Clone, Copy)]
pub struct SimDelays {
    /// From start to guest agent ready.
    pub boot: Duration,
    /// device_add returning.
    pub applied: Duration,
    /// ACPI acknowledgement after applied.
    pub acked: Duration,
    /// Online after acked (plugs).
    pub online: Duration,
}

impl Default for SimDelays {
    fn default() -> Self {
        // About a single plug under QEMU/TCG since plugs are batched: device_add returns
        // in ~2 ms, the guest acknowledges at ~47 ms and the whole 1 -> 2 is ~90-100 ms
        // (batch_bench, docs/benchmarks.md).
        SimDelays {
            boot: Duration::from_millis(50),
            applied: Duration::from_millis(2),
            acked: Duration::from_millis(45),
            online: Duration::from_millis(50),
        }
    }
}

/// The simulator.
pub struct SimBackend {
    vms: Mutex<HashMap<VmKey, Arc<SimVm>>>,
    delays: SimDelays,
    capacity: NodeCapacity,
}

impl SimBackend {
    /// A simulator with these delays and this announced capacity.
    pub fn new(delays: SimDelays, capacity: NodeCapacity) -> Self {
        SimBackend {
            vms: Mutex::default(),
            delays,
            capacity,
        }
    }

    /// The simulated guest of `key`, for tests that inject faults.
    pub fn vm(&self, key: &VmKey) -> Option<Arc<SimVm>> {
        self.vms.lock().ok()?.get(key).cloned()
    }
}

/// One simulated guest.
pub struct SimVm {
    spec: VmSpec,
    slots: Mutex<Vec<VcpuState>>,
    started: Instant,
    delays: SimDelays,
    stopped: AtomicBool,
    /// While set, the guest never releases a vCPU (an unplug times out).
    pub refuse_unplug: AtomicBool,
    events_tx: mpsc::UnboundedSender<VmEvent>,
    events_rx: AsyncMutex<mpsc::UnboundedReceiver<VmEvent>>,
    op: AsyncMutex<()>,
}

impl SimVm {
    /// Make the simulated VMM exit, as if QEMU died.
    pub fn crash(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.events_tx.send(VmEvent::Exited { status: Some(137) });
    }
}

#[async_trait::async_trait]
impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "simulator"
    }

    fn capacity(&self) -> NodeCapacity {
        self.capacity.clone()
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        let n = usize::try_from(spec.topology.max_vcpus()).unwrap_or(0);
        let boot = usize::try_from(spec.boot_vcpus).unwrap_or(0);
        // GuestOnline: every slot is present from boot, the unused ones offline.
        let unused = match spec.resize_method {
            corescale_api::ResizeMethod::Hotplug => VcpuState::Absent,
            corescale_api::ResizeMethod::GuestOnline => VcpuState::Offline,
        };
        let mut slots = vec![unused; n];
        for s in slots.iter_mut().take(boot) {
            *s = VcpuState::Online;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let vm = Arc::new(SimVm {
            spec: spec.clone(),
            slots: Mutex::new(slots),
            started: Instant::now(),
            delays: self.delays,
            stopped: AtomicBool::new(false),
            refuse_unplug: AtomicBool::new(false),
            events_tx: tx,
            events_rx: AsyncMutex::new(rx),
            op: AsyncMutex::new(()),
        });
        if let Ok(mut m) = self.vms.lock() {
            m.insert(spec.key(), vm.clone());
        }
        Ok(Box::new(SimHandle(vm)))
    }

    async fn running(&self) -> Result<Vec<VmSpec>, BackendError> {
        Ok(self
            .vms
            .lock()
            .map(|m| {
                m.values()
                    .filter(|v| !v.stopped.load(Ordering::SeqCst))
                    .map(|v| v.spec.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        let vm = self
            .vm(&spec.key())
            .ok_or_else(|| BackendError::NotRunning(spec.key().to_string()))?;
        if vm.stopped.load(Ordering::SeqCst) {
            return Err(BackendError::NotRunning(spec.key().to_string()));
        }
        Ok(Box::new(SimHandle(vm)))
    }

    async fn cleanup(&self, key: &VmKey) -> Result<(), BackendError> {
        if let Ok(mut m) = self.vms.lock() {
            if m.get(key).is_some_and(|v| v.stopped.load(Ordering::SeqCst)) {
                m.remove(key);
            }
        }
        Ok(())
    }
}

struct SimHandle(Arc<SimVm>);

fn set_slot(vm: &SimVm, slot: u32, state: VcpuState) {
    if let (Ok(mut s), Ok(i)) = (vm.slots.lock(), usize::try_from(slot)) {
        if let Some(x) = s.get_mut(i) {
            *x = state;
        }
    }
}

/// A vCPU the simulated VMM was told about settles by itself, like a real guest onlines a
/// plugged vCPU or releases an ejected one: when the resize that asked is dropped midway,
/// the slot still ends in `end` instead of staying Plugging or Unplugging.
struct Settles<'a> {
    vm: &'a SimVm,
    slot: u32,
    end: VcpuState,
}

impl Drop for Settles<'_> {
    fn drop(&mut self) {
        set_slot(self.vm, self.slot, self.end);
    }
}

impl SimHandle {
    fn set(&self, slot: u32, state: VcpuState) {
        set_slot(&self.0, slot, state);
    }
}

#[async_trait::async_trait]
impl VmHandle for SimHandle {
    fn spec(&self) -> &VmSpec {
        &self.0.spec
    }

    async fn guest_ready(&self) -> bool {
        !self.0.stopped.load(Ordering::SeqCst) && self.0.started.elapsed() >= self.0.delays.boot
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        if self.0.stopped.load(Ordering::SeqCst) {
            return Err(BackendError::NotRunning(self.0.spec.key().to_string()));
        }
        let slots = self.0.slots.lock().map(|s| s.clone()).unwrap_or_default();
        Ok(Observation {
            slots: slots
                .into_iter()
                .enumerate()
                .map(|(i, state)| SlotObservation {
                    state,
                    guest_cpu: state.is_active().then(|| u32::try_from(i).unwrap_or(0)),
                    host_thread: None,
                })
                .collect(),
            guest_agent: true,
        })
    }

    async fn resize(&self, plan: &Plan, opts: ResizeOptions) -> ResizeReport {
        let _op = self.0.op.lock().await;
        let d = self.0.delays;
        let mut report = ResizeReport::default();
        for slot in plan.plug_slots() {
            let t0 = Instant::now();
            tokio::time::sleep(d.applied).await;
            self.set(slot, VcpuState::Plugging);
            let settles = Settles {
                vm: &self.0,
                slot,
                end: VcpuState::Online,
            };
            let applied = t0.elapsed();
            tokio::time::sleep(d.acked).await;
            self.set(slot, VcpuState::Present);
            let acked = t0.elapsed();
            tokio::time::sleep(d.online).await;
            drop(settles); // Online
            report.steps.push(StepReport {
                slot,
                direction: Direction::Plug,
                applied: Some(applied),
                acked: Some(acked),
                online: Some(t0.elapsed()),
                guest_cpu: Some(slot),
                kept_offline: false,
                error: None,
            });
        }
        for slot in plan.unplug_slots() {
            let t0 = Instant::now();
            tokio::time::sleep(d.applied).await;
            self.set(slot, VcpuState::Unplugging);
            let applied = t0.elapsed();
            if self.0.refuse_unplug.load(Ordering::SeqCst) {
                tokio::time::sleep(opts.unplug_timeout).await;
                report.steps.push(StepReport {
                    slot,
                    direction: Direction::Unplug,
                    applied: Some(applied),
                    acked: None,
                    online: None,
                    guest_cpu: None,
                    kept_offline: false,
                    error: Some(BackendError::Timeout {
                        what: "release",
                        slot,
                        seconds: opts.unplug_timeout.as_secs_f64(),
                    }),
                });
                continue;
            }
            let settles = Settles {
                vm: &self.0,
                slot,
                end: match self.0.spec.resize_method {
                    corescale_api::ResizeMethod::Hotplug => VcpuState::Absent,
                    corescale_api::ResizeMethod::GuestOnline => VcpuState::Offline,
                },
            };
            tokio::time::sleep(d.acked).await;
            drop(settles);
            report.steps.push(StepReport {
                slot,
                direction: Direction::Unplug,
                applied: Some(applied),
                acked: Some(t0.elapsed()),
                online: None,
                guest_cpu: None,
                kept_offline: self.0.spec.resize_method == corescale_api::ResizeMethod::GuestOnline,
                error: None,
            });
        }
        report
    }

    async fn vcpu_cpu_seconds(&self) -> Result<Vec<(u32, f64)>, BackendError> {
        Ok(Vec::new())
    }

    async fn next_event(&self) -> Option<VmEvent> {
        self.0.events_rx.lock().await.recv().await
    }

    async fn stop(&self, _grace: Duration) -> Result<(), BackendError> {
        self.0.stopped.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::test_spec;

    /// A resize dropped midway (the agent's task cancelled) leaves no slot Plugging or
    /// Unplugging: the simulated guest finishes what the VMM was told, as a real one does.
    #[tokio::test]
    async fn a_dropped_resize_leaves_no_slot_in_between() {
        let delays = SimDelays {
            boot: Duration::ZERO,
            applied: Duration::from_millis(1),
            acked: Duration::from_secs(30),
            online: Duration::from_secs(30),
        };
        let backend = SimBackend::new(delays, NodeCapacity::host_default());
        let vm = backend.start(&test_spec(1, 4, 1, 1)).await.unwrap();
        let t = vm.spec().topology;
        let g = vm.spec().granularity;
        let states = |o: Observation| o.slots.iter().map(|s| s.state).collect::<Vec<_>>();
        let opts = ResizeOptions {
            unplug_timeout: Duration::from_secs(1),
            plug_timeout: Duration::from_secs(1),
        };
        let plug = Plan::of_slots(&t, g, &[1], &[]).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(100), vm.resize(&plug, opts)).await;
        assert!(r.is_err(), "dropped while the guest acknowledges");
        let after = states(vm.observe().await.unwrap());
        assert_eq!(after[1], VcpuState::Online, "{after:?}");
        let unplug = Plan::of_slots(&t, g, &[], &[1]).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(100), vm.resize(&unplug, opts)).await;
        assert!(r.is_err(), "dropped while the guest releases");
        let after = states(vm.observe().await.unwrap());
        assert_eq!(after[1], VcpuState::Absent, "{after:?}");
    }
}
