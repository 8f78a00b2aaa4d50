//! One running QEMU guest ([`QemuVm`]): its handle state, the monitor task that turns QMP
//! events into [`VmEvent`]s, the calls tests and tools make, and the [`VmHandle`] methods
//! (a resize itself is in `resize`).

use super::cpumap::{apic_id, CpuMap};
use super::persisted::Persisted;
use super::qga::{QgaClient, QgaError};
use super::qmp::{self, EventKind, HotpluggableCpu, QmpClient, QmpError};
use super::{launcher_err, tail, QemuConfig};
use crate::backend::qemu::machine::Machine;
use crate::backend::{
    Accel, BackendError, Cause, Observation, ResizeOptions, ResizeReport, VmEvent, VmHandle, VmKey,
    VmSpec,
};
use crate::launcher::{self, KillSignal, LauncherClient};
use corescale_api::planner::slots as topology_slots;
use corescale_api::{Plan, SlotId};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio::task::JoinHandle;

pub(super) struct Ops {
    pub(super) qga: QgaClient,
    pub(super) map: CpuMap,
    pub(super) st: Persisted,
    /// QEMU's hot-pluggable CPU list as of the last observation, kept current through this
    /// handle's own device_add/device_del; `None` when it may not be (a step failed, a raw
    /// QMP command ran). A resize then starts without asking QEMU again: that round trip
    /// is in the latency a user waits for.
    pub(super) hp: Option<BTreeMap<u32, HotpluggableCpu>>,
}

/// One running QEMU guest.
pub struct QemuVm {
    pub(super) spec: VmSpec,
    pub(super) key: VmKey,
    pub(super) dir: PathBuf,
    pid: i32,
    pub(super) qmp: Arc<QmpClient>,
    launcher: LauncherClient,
    pub(super) cfg: Arc<QemuConfig>,
    pub(super) slots: Vec<SlotId>,
    pub(super) machine: Machine,
    /// QEMU's `vsmt` once asked (0: not yet).
    pub(super) vsmt: std::sync::atomic::AtomicU32,
    pub(super) apic_to_slot: HashMap<u32, u32>,
    pub(super) ops: Mutex<Ops>,
    pub(super) ready: AtomicBool,
    events: Mutex<mpsc::Receiver<VmEvent>>,
    monitor: JoinHandle<()>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("key", &self.key)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

async fn monitor(
    qmp: Arc<QmpClient>,
    launcher: LauncherClient,
    key: VmKey,
    tx: mpsc::Sender<VmEvent>,
) {
    let mut rx = qmp.subscribe();
    // Some(reset): the guest shut down, or rebooted (QEMU runs with -no-reboot, so a reset
    // ends the process as a shutdown with reason guest-reset).
    let shutdown = |ev: &qmp::Event| match ev.kind() {
        EventKind::Shutdown { guest, reason } => {
            tracing::info!(vm = %key, guest, reason, "guest shut down");
            Some(reason == "guest-reset")
        }
        _ => None,
    };
    loop {
        // Events first: a SHUTDOWN and the monitor closing right after it are often ready
        // together, and the guest stopping must be reported before the VMM's exit.
        tokio::select! {
            biased;
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    if let Some(reset) = shutdown(&ev) {
                        let _ = tx.send(VmEvent::GuestStopped { reset }).await;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = qmp.closed() => {
                while let Ok(ev) = rx.try_recv() {
                    if let Some(reset) = shutdown(&ev) {
                        let _ = tx.send(VmEvent::GuestStopped { reset }).await;
                    }
                }
                break;
            }
        }
    }
    // The monitor connection closed: QEMU exited, or it is beyond control.
    let exit =
        launcher::exit_of(&launcher, &key.namespace, &key.name, Duration::from_secs(2)).await;
    let status = match exit {
        Some(info) => info.status(),
        None => {
            tracing::error!(vm = %key, "QMP closed but the VMM still runs: killing it, it cannot be driven");
            let _ = launcher
                .kill(&key.namespace, &key.name, KillSignal::Kill)
                .await;
            launcher::exit_of(&launcher, &key.namespace, &key.name, Duration::from_secs(5))
                .await
                .and_then(|i| i.status())
        }
    };
    tracing::info!(vm = %key, ?status, "VMM exited");
    let _ = tx.send(VmEvent::Exited { status }).await;
}

/// CPU seconds (user + system) of a task from `/proc/<pid>/task/<tid>/stat`.
fn task_cpu_seconds(pid: i32, tid: i64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant; it has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz } else { 100 };
    let ticks = utime.saturating_add(stime);
    Some(ticks as f64 / hz as f64)
}

impl QemuVm {
    /// The topology position of `slot`, or `None` when the VM has no such slot.
    pub(super) fn slot_id(&self, slot: u32) -> Option<SlotId> {
        usize::try_from(slot)
            .ok()
            .and_then(|i| self.slots.get(i))
            .copied()
    }

    pub(super) fn new(
        spec: VmSpec,
        dir: PathBuf,
        pid: i32,
        qmp: Arc<QmpClient>,
        launcher: LauncherClient,
        cfg: Arc<QemuConfig>,
        st: Persisted,
    ) -> Self {
        let key = spec.key();
        let spec_arch = spec.arch;
        let slots = topology_slots(&spec.topology);
        let apic_to_slot = slots
            .iter()
            .map(|s| (apic_id(&spec.topology, s), s.index))
            .collect();
        let (tx, rx) = mpsc::channel(16);
        let monitor = tokio::spawn(monitor(Arc::clone(&qmp), launcher.clone(), key.clone(), tx));
        let qga = QgaClient::new(dir.join(launcher::QGA_SOCK));
        QemuVm {
            spec,
            key,
            dir,
            pid,
            qmp,
            launcher,
            cfg,
            slots,
            machine: Machine::of(spec_arch),
            vsmt: std::sync::atomic::AtomicU32::new(0),
            apic_to_slot,
            ops: Mutex::new(Ops {
                qga,
                map: CpuMap::default(),
                st,
                hp: None,
            }),
            ready: AtomicBool::new(false),
            events: Mutex::new(rx),
            monitor,
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The VM's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The QEMU version from the QMP greeting.
    pub fn qemu_version(&self) -> qmp::QemuVersion {
        self.qmp.greeting().version
    }

    pub(super) fn qmp_err(&self, e: QmpError) -> BackendError {
        match e {
            QmpError::Refused {
                command,
                class,
                desc,
            } => BackendError::Qmp {
                command,
                class,
                desc,
            },
            QmpError::Closed => BackendError::NotRunning(self.key.to_string()),
            other => BackendError::Protocol(Cause::of(other)),
        }
    }

    pub(super) fn qga_err(e: QgaError) -> BackendError {
        BackendError::GuestAgent(Cause::of(e))
    }

    /// Run a QMP command (tests and tools: `stop`, `cont`, `qom-get` ...), serialized with
    /// the handle's other operations.
    pub async fn qmp_command(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        let mut ops = self.ops.lock().await;
        // The command may add or remove devices behind the handle's back.
        ops.hp = None;
        self.qmp
            .execute_value(command, arguments, self.cfg.qmp_timeout)
            .await
            .map_err(|e| self.qmp_err(e))
    }

    /// Read a guest file through the agent.
    pub async fn guest_read(&self, path: &str) -> Result<String, BackendError> {
        let mut ops = self.ops.lock().await;
        ops.qga
            .read_text(path, self.cfg.agent_timeout.max(Duration::from_secs(5)))
            .await
            .map_err(Self::qga_err)
    }

    /// The guest's uptime in seconds, through the agent.
    pub async fn guest_uptime(&self) -> Result<f64, BackendError> {
        let mut ops = self.ops.lock().await;
        ops.qga
            .uptime(self.cfg.agent_timeout.max(Duration::from_secs(5)))
            .await
            .map_err(Self::qga_err)
    }

    /// vCPU threads created so far and the lifetime budget, under TCG (None under KVM).
    pub async fn vcpu_budget(&self) -> Option<(u32, u32)> {
        let ops = self.ops.lock().await;
        (self.spec.accel == Accel::Tcg)
            .then(|| (ops.st.vcpu_threads_created, self.spec.topology.max_vcpus()))
    }

    /// Wait until the guest agent answers; the time it took. Returns within `timeout` plus
    /// one probe (300 ms) whatever the guest does: each probe is bounded (see
    /// `QgaClient::send`), and a probe skipped because another call holds the guest's
    /// line waits a little instead of spinning.
    pub async fn wait_guest_ready(&self, timeout: Duration) -> Result<Duration, BackendError> {
        let t0 = Instant::now();
        while !self.guest_ready().await {
            if self.qmp.is_closed() {
                return Err(BackendError::NotRunning(self.key.to_string()));
            }
            if t0.elapsed() > timeout {
                return Err(BackendError::GuestAgent(Cause::msg(format!(
                    "no answer within {timeout:?}; console: {}",
                    tail(&self.dir.join(launcher::SERIAL_LOG), 1500)
                ))));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(t0.elapsed())
    }

    /// Present slots from QEMU: slot -> hotpluggable entry.
    pub(super) async fn hotpluggable(
        &self,
    ) -> Result<BTreeMap<u32, HotpluggableCpu>, BackendError> {
        let list = if self.machine.cpu_hotplug() {
            self.qmp
                .query_hotpluggable_cpus(self.cfg.qmp_timeout)
                .await
                .map_err(|e| self.qmp_err(e))?
        } else {
            // A machine without CPU hot-plug (arm virt) refuses query-hotpluggable-cpus;
            // its CPUs are all there from boot, and query-cpus-fast lists them.
            self.qmp
                .query_cpus_fast(self.cfg.qmp_timeout)
                .await
                .map_err(|e| self.qmp_err(e))?
                .into_iter()
                .map(|c| HotpluggableCpu {
                    type_: String::new(),
                    vcpus_count: 1,
                    props: c.props,
                    qom_path: Some(c.qom_path),
                })
                .collect()
        };
        let t = &self.spec.topology;
        let per_unit = self.machine.unit_threads(t);
        let mut out = BTreeMap::new();
        for c in list {
            match self.machine.slot_of_props(t, &c.props) {
                // Every slot of the unit (the threads of a sPAPR core) shares its entry.
                Some(s) => {
                    for slot in s..s.saturating_add(per_unit).min(t.max_vcpus()) {
                        out.insert(slot, c.clone());
                    }
                }
                None => {
                    tracing::warn!(vm = %self.key, props = ?c.props, "a CPU slot outside the topology")
                }
            }
        }
        Ok(out)
    }

    /// Whether the guest has an agent: it answered once, or answers a short sync now.
    pub(super) async fn has_agent(&self, ops: &mut Ops) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let ok = ops
            .qga
            .sync(Duration::from_millis(300), Duration::from_millis(300))
            .await
            .is_ok();
        if ok {
            self.ready.store(true, Ordering::Relaxed);
        }
        ok
    }
}

#[async_trait::async_trait]
impl VmHandle for QemuVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    async fn guest_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let Ok(mut ops) = self.ops.try_lock() else {
            return self.ready.load(Ordering::Relaxed);
        };
        self.has_agent(&mut ops).await
    }

    async fn guest_info(&self) -> Option<corescale_api::GuestInfo> {
        if !self.ready.load(Ordering::Relaxed) {
            return None;
        }
        let mut ops = self.ops.lock().await;
        match ops.qga.guest_info(self.cfg.agent_timeout).await {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::debug!(vm = %self.key, error = %e, "guest info unavailable");
                None
            }
        }
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        let mut ops = self.ops.lock().await;
        self.observe_locked(&mut ops).await
    }

    async fn resize(&self, plan: &Plan, opts: ResizeOptions) -> ResizeReport {
        self.run_plan(plan, opts).await
    }

    async fn vcpu_cpu_seconds(&self) -> Result<Vec<(u32, f64)>, BackendError> {
        let fast = {
            let _ops = self.ops.lock().await;
            self.qmp
                .query_cpus_fast(self.cfg.qmp_timeout)
                .await
                .map_err(|e| self.qmp_err(e))?
        };
        let mut out = Vec::new();
        for c in fast {
            let Some(slot) =
                self.machine
                    .slot_of_thread(&self.spec.topology, &c.props, &c.qom_path)
            else {
                continue;
            };
            if let Some(secs) = task_cpu_seconds(self.pid, c.thread_id) {
                out.push((slot, secs));
            }
        }
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }

    async fn next_event(&self) -> Option<VmEvent> {
        self.events.lock().await.recv().await
    }

    async fn stop(&self, grace: Duration) -> Result<(), BackendError> {
        let (ns, name) = (&self.key.namespace, &self.key.name);
        match self.launcher.status(ns, name).await.map_err(launcher_err)? {
            Some(p) if p.running && p.pid == self.pid => {}
            _ => return Ok(()),
        }
        if !self.qmp.is_closed() {
            // Ask twice: the guest agent (no ACPI daemon needed), when it is idle and has
            // answered before; and the ACPI power button. QEMU (-no-reboot) then exits.
            if self.ready.load(Ordering::Relaxed) {
                if let Ok(mut ops) = self.ops.try_lock() {
                    if let Err(e) = ops.qga.shutdown("powerdown", Duration::from_secs(1)).await {
                        tracing::debug!(vm = %self.key, error = %e, "guest-shutdown failed");
                    }
                }
            }
            if let Err(e) = self
                .qmp
                .execute_value("system_powerdown", None, self.cfg.qmp_timeout)
                .await
            {
                tracing::debug!(vm = %self.key, error = %e, "system_powerdown failed");
            }
        }
        if launcher::exit_of(&self.launcher, ns, name, grace)
            .await
            .is_some()
        {
            return Ok(());
        }
        tracing::warn!(vm = %self.key, ?grace, "the guest did not power off in time: killing QEMU");
        self.launcher
            .kill(ns, name, KillSignal::Kill)
            .await
            .map_err(launcher_err)?;
        match launcher::exit_of(&self.launcher, ns, name, Duration::from_secs(10)).await {
            Some(_) => Ok(()),
            None => Err(BackendError::Launcher(Cause::msg(format!(
                "QEMU of {} (pid {}) did not exit after SIGKILL",
                self.key, self.pid
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_thread_cpu_time_reads() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let tid = i64::from(nix::unistd::gettid().as_raw());
        let t = task_cpu_seconds(pid, tid).unwrap();
        assert!(t >= 0.0);
    }
}
