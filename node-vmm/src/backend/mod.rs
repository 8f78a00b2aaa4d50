//! The seam between the node agent and whatever runs the guest.
//!
//! The agent decides (with the pure planner) and reports; a [`Backend`] starts, adopts and
//! stops guests, and a [`VmHandle`] acts on one running guest and observes it. The agent
//! never names QEMU: the QEMU backend (and later a built-in microVM, or the scale
//! simulator) live behind these traits.

mod error;
pub mod qemu;
pub mod sim;
pub mod workload;

pub use crate::accel::Accel;
pub use error::{BackendError, Cause};

use corescale_api::{Arch, Granularity, Placement, Plan, ResizeMethod, Topology, VcpuState};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Why a VM under `spec.resizeMethod: GuestOnline` whose guest agent does not answer cannot
/// be resized (the backend's error and the agent's `Infeasible` message).
pub const GUEST_ONLINE_NEEDS_AGENT: &str = "spec.resizeMethod GuestOnline onlines and offlines vCPUs through the guest agent, and this guest's agent does not answer: install and start qemu-guest-agent in the guest, or use resizeMethod Hotplug";

/// Namespace and name of a VM: the key of everything per VM on a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    /// Namespace of the VirtualMachine object.
    pub namespace: String,
    /// Name of the VirtualMachine object.
    pub name: String,
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything a backend needs to start one guest. Paths are already resolved inside the
/// node's image directory (see `images`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// Namespace of the VM.
    pub namespace: String,
    /// Name of the VM.
    pub name: String,
    /// UID of the VirtualMachine object this guest belongs to (a re-created object with the
    /// same name is a different VM).
    pub uid: String,
    /// Slot topology.
    pub topology: Topology,
    /// Plug unit.
    pub granularity: Granularity,
    /// Which free slots a plug fills first.
    pub placement: Placement,
    /// vCPUs in use at boot: present (`-smp N` boots slots `0..N`) under Hotplug; online
    /// (kernel `maxcpus=N`, every slot present) under GuestOnline.
    pub boot_vcpus: u32,
    /// How a resize changes the vCPUs in use (absent in records of older agents: Hotplug).
    #[serde(default)]
    pub resize_method: ResizeMethod,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Guest architecture.
    pub arch: Arch,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line (the backend adds its console settings).
    pub cmdline: String,
    /// Accelerator.
    pub accel: Accel,
    /// Disks, in the guest's order (older records have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<workload::DiskSpec>,
    /// cloud-init data for a NoCloud seed disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<workload::SeedData>,
    /// Forwarded ports, host side chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<workload::PortForward>,
}

impl VmSpec {
    /// The VM's key.
    pub fn key(&self) -> VmKey {
        VmKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// What the backend observed of one vCPU slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotObservation {
    /// Absent, Present (in the guest, offline or online state unknown), Online, or
    /// Unplugging (an eject was requested and the vCPU is still there).
    pub state: VcpuState,
    /// The guest's logical CPU number, when the guest agent maps it.
    pub guest_cpu: Option<u32>,
    /// Host thread id of the vCPU, when the VMM reports it.
    pub host_thread: Option<i32>,
}

/// A snapshot of one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// One entry per slot, in slot index order.
    pub slots: Vec<SlotObservation>,
    /// Whether the guest agent answered (without it, online state is unknown and plugged
    /// vCPUs are reported Present).
    pub guest_agent: bool,
}

impl Observation {
    /// An observation of slots in these states, with nothing else known of them.
    pub fn of_states(states: &[VcpuState], guest_agent: bool) -> Self {
        Observation {
            slots: states
                .iter()
                .map(|s| SlotObservation {
                    state: *s,
                    guest_cpu: None,
                    host_thread: None,
                })
                .collect(),
            guest_agent,
        }
    }

    /// This observation carried through a resize step that ended cleanly: every plugged
    /// slot seen online by the guest agent (its logical CPU known), every unplugged slot
    /// ejected by the guest. The step's last checks observed exactly those slots, so asking
    /// the VMM and the guest again would only repeat them. None when the step left
    /// anything less certain (an error, a phase not reached, a guest without an agent):
    /// then only a full observation tells.
    pub fn after_steps(&self, report: &ResizeReport) -> Option<Observation> {
        if !self.guest_agent {
            return None;
        }
        let mut after = self.clone();
        for step in &report.steps {
            if step.error.is_some() {
                return None;
            }
            let slot = after.slots.get_mut(usize::try_from(step.slot).ok()?)?;
            *slot = match step.direction {
                Direction::Plug if step.online.is_some() => SlotObservation {
                    state: VcpuState::Online,
                    guest_cpu: Some(step.guest_cpu?),
                    host_thread: None,
                },
                Direction::Unplug if step.acked.is_some() && step.kept_offline => SlotObservation {
                    state: VcpuState::Offline,
                    ..slot.clone()
                },
                Direction::Unplug if step.acked.is_some() => SlotObservation {
                    state: VcpuState::Absent,
                    guest_cpu: None,
                    host_thread: None,
                },
                _ => return None,
            };
        }
        Some(after)
    }

    /// vCPUs the guest has online; without a guest agent, the vCPUs present.
    pub fn online(&self) -> u32 {
        let want = if self.guest_agent {
            VcpuState::Online
        } else {
            VcpuState::Present
        };
        let n = self
            .slots
            .iter()
            .filter(|s| s.state == want || (!self.guest_agent && s.state == VcpuState::Online))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Direction of a hot-plug operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Adding a vCPU.
    Plug,
    /// Removing a vCPU.
    Unplug,
}

impl Direction {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Plug => "plug",
            Direction::Unplug => "unplug",
        }
    }
}

/// Timing and outcome of one slot's plug or unplug.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Slot index.
    pub slot: u32,
    /// Plug or unplug.
    pub direction: Direction,
    /// Until the VMM accepted the request (QMP device_add/device_del returned).
    pub applied: Option<Duration>,
    /// Until the guest acknowledged it (ACPI _OST insert/eject success).
    pub acked: Option<Duration>,
    /// Until the guest agent saw the vCPU online (plugs only, guests with an agent).
    pub online: Option<Duration>,
    /// The guest's logical CPU of a plugged slot, as the agent saw it come online.
    pub guest_cpu: Option<u32>,
    /// An unplug that offlined the vCPU in the guest and left it in the VMM (GuestOnline,
    /// or a vCPU parked under TCG): the slot ends Offline, not Absent.
    pub kept_offline: bool,
    /// The error of this step, if it failed.
    pub error: Option<BackendError>,
}

/// What a resize did, step by step. A resize never stops at the first failure of an
/// unplug deadline: every slot of the plan is tried, and each has its own outcome.
#[derive(Debug, Clone, Default)]
pub struct ResizeReport {
    /// One entry per slot acted on, in the order acted on.
    pub steps: Vec<StepReport>,
}

impl ResizeReport {
    /// The first error, if any step failed.
    pub fn first_error(&self) -> Option<&BackendError> {
        self.steps.iter().find_map(|s| s.error.as_ref())
    }
}

/// Deadlines of one resize.
#[derive(Debug, Clone, Copy)]
pub struct ResizeOptions {
    /// How long the guest may take to release a vCPU (spec.unplugTimeoutSeconds).
    pub unplug_timeout: Duration,
    /// How long the guest may take to acknowledge and online a plugged vCPU.
    pub plug_timeout: Duration,
}

/// Events a running guest reports by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The VMM process exited (QMP connection closed and the process is gone).
    Exited {
        /// Exit status as the launcher saw it, if known.
        status: Option<i32>,
    },
    /// The guest shut itself down or reset.
    GuestStopped {
        /// It rebooted (a reset): the VMM ends, and the agent starts it again at once.
        reset: bool,
    },
}

/// What a node can run, as the backend sees it; announced on the node-agent Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    /// Host CPUs.
    pub host_cpus: u32,
    /// Largest VM (vCPU slots) the backend can run.
    pub max_vcpus_per_vm: u32,
    /// Accelerator guests of the host's own architecture get (announced on the Lease).
    pub accel: Accel,
    /// Guest architectures it can run, each with the accelerator its guests get: the
    /// backend decides (QEMU: KVM only for the host's own architecture, where usable).
    pub arches: BTreeMap<Arch, Accel>,
}

impl NodeCapacity {
    /// This host's CPUs, 255-slot VMs, TCG, x86_64: what any QEMU can do.
    pub fn host_default() -> Self {
        let host_cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        NodeCapacity {
            host_cpus,
            max_vcpus_per_vm: corescale_api::MAX_VCPUS,
            accel: Accel::Tcg,
            arches: BTreeMap::from([(Arch::X86_64, Accel::Tcg)]),
        }
    }

    /// The accelerator a guest of `arch` gets here, or why the node cannot run it.
    pub fn accel_for(&self, arch: Arch) -> Result<Accel, String> {
        self.arches.get(&arch).copied().ok_or_else(|| {
            let runs: Vec<&str> = self.arches.keys().map(|a| a.as_str()).collect();
            format!(
                "this node cannot run {arch} guests (it runs {})",
                runs.join(", ")
            )
        })
    }
}

/// Starts, adopts and lists guests on this node.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Short name for logs and status ("qemu", "simulator").
    fn name(&self) -> &'static str;
    /// What this node can run.
    fn capacity(&self) -> NodeCapacity {
        NodeCapacity::host_default()
    }
    /// Start a guest and return its handle once the VMM answers (the guest may still boot).
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError>;
    /// Guests that are running on this node now (found in the state directory), so a
    /// restarted agent can adopt them instead of starting them again.
    async fn running(&self) -> Result<Vec<VmSpec>, BackendError>;
    /// Re-attach to a running guest.
    async fn adopt(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError>;
    /// Remove what is left of a guest that is not running (sockets, per-VM files). Its
    /// disks stay: see [`remove_disks`](Backend::remove_disks).
    async fn cleanup(&self, key: &VmKey) -> Result<(), BackendError>;
    /// The last lines of a guest's console (for the Event that says it stopped), while its
    /// files are still there (before [`cleanup`](Backend::cleanup)).
    fn console_tail(&self, _key: &VmKey) -> Option<String> {
        None
    }
    /// Remove a guest's disks: the VM was deleted or left this node. A backend without
    /// disks has nothing to do.
    async fn remove_disks(&self, _key: &VmKey) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One running guest. Calls on one handle are serialized by the caller (one plan at a
/// time per VM); implementations also serialize internally so no two VMM operations
/// overlap.
#[async_trait::async_trait]
pub trait VmHandle: Send + Sync {
    /// The spec the guest was started with.
    fn spec(&self) -> &VmSpec;
    /// Whether the guest agent has answered since boot (boot is complete enough to resize).
    async fn guest_ready(&self) -> bool;
    /// Observe every slot now, from the VMM and (where present) the guest agent.
    async fn observe(&self) -> Result<Observation, BackendError>;
    /// Carry out a plan: plug (and online through the guest agent), or offline and unplug.
    ///
    /// # Cancellation: dropping a resize mid-step is safe
    ///
    /// The agent drops the returned future at whatever await it has reached when a newer
    /// target supersedes the step, the VM is to be stopped, or the VMM exits
    /// (`agent::worker`); no report comes back, and the next plan starts from a fresh
    /// [`observe`](VmHandle::observe). An implementation must therefore keep that safe at
    /// every await:
    ///
    /// * Record a plug or an unplug, in state that outlives the future (the QEMU backend's
    ///   `backend.json`), *before* asking the VMM or the guest for it. A slot left
    ///   mid-step is then observed as `Plugging` or `Unplugging` and finished or retried by
    ///   a later `observe` or `resize`, never reported as a settled `Present` or `Absent`
    ///   that nothing would bring back.
    /// * Count anything with a lifetime budget (TCG's vCPU threads) before the command that
    ///   spends it, so a dropped step can only over-count, never over-spend.
    /// * Keep no cache across the drop that the step was updating (the QEMU backend takes
    ///   its copy of QEMU's CPU list out for the step and puts it back only on success).
    /// * Hold per-VM exclusion in a guard that the drop releases (an async mutex guard),
    ///   and use protocol clients that survive an abandoned request (QMP and guest-agent
    ///   replies are matched by id, so the reply to a dropped request is skipped).
    async fn resize(&self, plan: &Plan, opts: ResizeOptions) -> ResizeReport;
    /// What the guest agent says of the guest (OS, host name, addresses); None when the
    /// backend cannot ask (no agent, or a backend without guests).
    async fn guest_info(&self) -> Option<corescale_api::GuestInfo> {
        None
    }
    /// CPU seconds consumed so far by each present vCPU's host thread, by slot index.
    async fn vcpu_cpu_seconds(&self) -> Result<Vec<(u32, f64)>, BackendError>;
    /// Wait for the next event (VMM exit, guest stop). Returns None when the handle is closed.
    async fn next_event(&self) -> Option<VmEvent>;
    /// Stop the guest: ask it to power off, and after `grace` kill the VMM. Idempotent.
    async fn stop(&self, grace: Duration) -> Result<(), BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuState::{Absent, Online, Present};

    fn step(slot: u32, direction: Direction) -> StepReport {
        StepReport {
            slot,
            direction,
            applied: Some(Duration::from_millis(2)),
            acked: Some(Duration::from_millis(40)),
            online: None,
            guest_cpu: None,
            kept_offline: false,
            error: None,
        }
    }

    fn plugged(slot: u32, cpu: u32) -> StepReport {
        StepReport {
            online: Some(Duration::from_millis(80)),
            guest_cpu: Some(cpu),
            ..step(slot, Direction::Plug)
        }
    }

    #[test]
    fn a_clean_step_carries_the_observation() {
        let before = Observation::of_states(&[Online, Online, Absent, Absent], true);
        let report = ResizeReport {
            steps: vec![step(1, Direction::Unplug), plugged(3, 7)],
        };
        let after = before.after_steps(&report).expect("clean step");
        let states: Vec<VcpuState> = after.slots.iter().map(|s| s.state).collect();
        assert_eq!(states, [Online, Absent, Absent, Online]);
        assert_eq!(after.slots[3].guest_cpu, Some(7));
        assert_eq!(after.slots[1].guest_cpu, None);
        assert_eq!(after.online(), 2);
        // An unplug that only offlined the vCPU (GuestOnline, parked) leaves it Offline.
        let kept = StepReport {
            kept_offline: true,
            ..step(1, Direction::Unplug)
        };
        let after = before
            .after_steps(&ResizeReport { steps: vec![kept] })
            .expect("clean step");
        assert_eq!(after.slots[1].state, VcpuState::Offline);
        assert_eq!(after.online(), 1);
    }

    #[test]
    fn anything_uncertain_needs_a_full_observation() {
        let before = Observation::of_states(&[Online, Absent, Online], true);
        let failed = StepReport {
            error: Some(BackendError::Protocol(Cause::msg("no"))),
            ..plugged(1, 1)
        };
        let not_online = step(1, Direction::Plug);
        let no_cpu = StepReport {
            guest_cpu: None,
            ..plugged(1, 1)
        };
        let not_ejected = StepReport {
            acked: None,
            ..step(2, Direction::Unplug)
        };
        let outside = plugged(9, 9);
        for s in [failed, not_online, no_cpu, not_ejected, outside] {
            let report = ResizeReport {
                steps: vec![s.clone()],
            };
            assert_eq!(before.after_steps(&report), None, "{s:?}");
        }
        // A guest without an agent reports Present, never Online: observe it.
        let blind = Observation::of_states(&[Present, Absent], false);
        let report = ResizeReport {
            steps: vec![plugged(1, 1)],
        };
        assert_eq!(blind.after_steps(&report), None);
    }
}
