//! The observed side of a `VirtualMachine`: its status (written only by corescale from
//! what it observed), the lifecycle phases, the vCPU slot states and the last resize.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::Topology;

/// Observed state of a virtual machine, written only from what was observed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Lifecycle phase: Pending, Scheduled, Starting, Running, Stopped or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Node whose agent runs (or will run) the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// vCPUs the guest has online, as the guest agent reports them (present vCPUs when the
    /// guest has no agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// vCPU slots of the VM (sockets*cores*threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// The topology in force (spec.topology or its default), fixed at first placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// Label selector that matches only this VM (used by the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The accelerator the VMM uses: kvm or tcg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Whether a guest agent answers: Connected, or Absent (online state then unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<String>,
    /// One entry per vCPU slot that is not Absent (Plugging, Present, Online, Offline,
    /// Unplugging or Failed); a slot of the topology (maxCpus slots in all) that is not
    /// listed is Absent. Under spec.resizeMethod GuestOnline every slot is Online or Offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["index"]))]
    pub vcpus: Vec<VcpuStatus>,
    /// Scheduled, Running, Ready, ResizePending (reason Deferred or Infeasible) and
    /// ResizeInProgress (reason Error when the last attempt failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last resize attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resize: Option<LastResize>,
    /// The forwarded ports, as the node set them up for the running guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub ports: Vec<crate::workload::PortStatus>,
    /// The disks and the node that holds their data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<crate::workload::DiskStatus>,
    /// What the guest agent says of the guest: OS, kernel, host name, IP addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::workload::GuestInfo>,
}

/// Lifecycle phase of a VM.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Not placed on a node yet.
    Pending,
    /// Placed; the node agent has not started it yet.
    Scheduled,
    /// The VMM runs; the guest is booting.
    Starting,
    /// The guest runs.
    Running,
    /// The guest is stopped (runStrategy Halted).
    Stopped,
    /// The guest cannot run; see the conditions.
    Failed,
}

impl Phase {
    /// Every phase, for metrics that export one series per phase.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Scheduled,
        Phase::Starting,
        Phase::Running,
        Phase::Stopped,
        Phase::Failed,
    ];
    /// The phase's name as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Stopped => "Stopped",
            Phase::Failed => "Failed",
        }
    }
}

/// State of one vCPU slot.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum VcpuState {
    /// No vCPU in this slot.
    #[default]
    Absent,
    /// Plug requested; the guest has not confirmed it yet.
    Plugging,
    /// The guest has the vCPU but it is offline (or the guest has no agent to tell).
    Present,
    /// The guest has the vCPU online.
    Online,
    /// Unplug requested; the guest has not released it yet.
    Unplugging,
    /// The last operation on this slot failed.
    Failed,
    /// Present in the VMM, offline in the guest, counting for nothing (its host thread
    /// sleeps); the next plug of the slot onlines it through the guest agent. Every slot
    /// not in use is Offline under spec.resizeMethod GuestOnline. Under Hotplug a slot is
    /// Offline when parked: under TCG, where one QEMU process can create only maxCpus vCPU
    /// threads in its life, an unplug offlines the vCPU instead of removing it.
    Offline,
}

impl VcpuState {
    /// Every state, for metrics.
    pub const ALL: [VcpuState; 7] = [
        VcpuState::Absent,
        VcpuState::Plugging,
        VcpuState::Present,
        VcpuState::Online,
        VcpuState::Unplugging,
        VcpuState::Failed,
        VcpuState::Offline,
    ];
    /// The state's name as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VcpuState::Absent => "Absent",
            VcpuState::Plugging => "Plugging",
            VcpuState::Present => "Present",
            VcpuState::Online => "Online",
            VcpuState::Unplugging => "Unplugging",
            VcpuState::Failed => "Failed",
            VcpuState::Offline => "Offline",
        }
    }
    /// Whether a vCPU occupies the slot in the guest (it counts toward the current size).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VcpuState::Plugging | VcpuState::Present | VcpuState::Online
        )
    }
}

/// One vCPU slot of the VM.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VcpuStatus {
    /// Slot index: ((socket * cores) + core) * threads + thread.
    pub index: u32,
    /// Socket of the slot.
    pub socket: u32,
    /// Core within the socket.
    pub core: u32,
    /// Thread within the core.
    pub thread: u32,
    /// Virtual NUMA node of the slot (its socket).
    pub numa_node: u32,
    /// Plugging, Present, Online, Offline, Unplugging or Failed (an Absent slot is not
    /// listed).
    pub state: VcpuState,
    /// When the slot entered its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// The guest's logical CPU number (cpuN) while present, as the guest agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpu: Option<u32>,
}

/// The last resize attempt.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastResize {
    /// vCPUs online before.
    pub from: u32,
    /// Target vCPUs.
    pub to: u32,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Wall time of the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Seconds until the VMM accepted the last plug or unplug (phase applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_seconds: Option<f64>,
    /// Seconds until the guest acknowledged the last plug or unplug (phase acked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_seconds: Option<f64>,
    /// Seconds until the guest had the new vCPUs online (phase online; plugs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_seconds: Option<f64>,
    /// Succeeded, Failed or InProgress.
    pub result: ResizeResult,
    /// What went wrong, when the result is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Outcome of a resize attempt.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ResizeResult {
    /// Still acting.
    InProgress,
    /// The guest reached the target.
    Succeeded,
    /// A step failed; see the message and the ResizeInProgress condition.
    Failed,
}
