//! The `VirtualMachine` custom resource (`corescale.dev/v1alpha1`).
//!
//! Every field carries a doc comment: it becomes the field's description in the generated
//! CRD, which is what `kubectl explain cvm.spec.<field>` prints.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::status::{
    LastResize, Phase, ResizeResult, VcpuState, VcpuStatus, VirtualMachineStatus,
};
pub use crate::topology::Topology;

/// API group of every corescale resource.
pub const GROUP: &str = "corescale.dev";
/// Largest number of vCPU slots one VM may have (x86 APIC ids of a q35 guest without an IOMMU).
pub const MAX_VCPUS: u32 = 255;
/// Label the operator sets on a placed VM; each node agent watches only its own value.
pub const NODE_LABEL: &str = "corescale.dev/node";
/// Label that matches exactly one VM; `status.selector` points at it (scale subresource).
pub const VM_LABEL: &str = "corescale.dev/vm";
/// Finalizer that keeps a VM object until its guest is stopped.
pub const FINALIZER: &str = "corescale.dev/guest-stopped";

/// Desired state of a virtual machine whose vCPUs corescale scales in place.
// Clippy's duplicated_attributes takes the keys repeated across printcolumn(...) entries
// (type_ = "integer" twice) for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "corescale.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    shortname = "cvm",
    category = "corescale",
    status = "VirtualMachineStatus",
    derive = "PartialEq",
    doc = "A virtual machine whose online vCPUs follow spec.cpus, hot-plugged in place without a reboot or a migration.",
    scale(
        spec_replicas_path = ".spec.cpus",
        status_replicas_path = ".status.cpus",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "CPUS",
        type_ = "integer",
        json_path = ".spec.cpus",
        description = "vCPUs wanted online"
    ),
    printcolumn(
        name = "ONLINE",
        type_ = "integer",
        json_path = ".status.cpus",
        description = "vCPUs the guest has online"
    ),
    printcolumn(
        name = "MAX",
        type_ = "integer",
        json_path = ".status.maxCpus",
        description = "vCPU slots of the VM"
    ),
    printcolumn(
        name = "NODE",
        type_ = "string",
        json_path = ".status.nodeName",
        description = "node running the guest"
    ),
    printcolumn(
        name = "PHASE",
        type_ = "string",
        json_path = ".status.phase",
        description = "lifecycle phase"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// Rules on the whole spec run on every write of the object, the agents' status writes
// included, and each `self.<field>` here costs the API server a copy of the spec's whole
// property list (18 entries; apiextensions-apiserver's model.Structural.Properties, per field
// access): so only rules that need two fields live here, each reads as few fields as it can
// (`[self.topology].all(t, ...)` reads spec.topology once, not three times), and a field's
// own rules (immutability included) sit on the field. `arch`, `granularity`
// and `resizeMethod` have defaults, so they are always set and need no `has()`.
#[x_kube(
    validation = Rule::new("self.minCpus <= self.cpus").message("spec.minCpus must not exceed spec.cpus").reason(Reason::FieldValueInvalid).field_path(".minCpus"),
    validation = Rule::new("!has(self.topology) || [self.topology].all(t, self.cpus <= t.sockets * t.cores * t.threads)").message("spec.cpus must not exceed the VM's maximum, spec.topology sockets*cores*threads").reason(Reason::FieldValueInvalid).field_path(".cpus"),
    validation = Rule::new("self.granularity != 'Core' || !has(self.topology) || (self.cpus % self.topology.threads == 0 && self.minCpus % self.topology.threads == 0)").message("spec.cpus and spec.minCpus must be multiples of spec.topology.threads when spec.granularity is Core").reason(Reason::FieldValueInvalid).field_path(".cpus"),
    validation = Rule::new("has(self.topology) || !has(oldSelf.topology)").message("spec.topology is immutable once set").reason(Reason::FieldValueForbidden).field_path(".topology"),
    validation = Rule::new("has(self.disks) == has(oldSelf.disks)").message("spec.disks is immutable").reason(Reason::FieldValueForbidden).field_path(".disks"),
    validation = Rule::new("has(self.cloudInit) == has(oldSelf.cloudInit)").message("spec.cloudInit is immutable").reason(Reason::FieldValueForbidden).field_path(".cloudInit"),
    validation = Rule::new("has(self.ports) == has(oldSelf.ports)").message("spec.ports is immutable").reason(Reason::FieldValueForbidden).field_path(".ports"),
    validation = Rule::new("self.arch != 'aarch64' || self.resizeMethod == 'GuestOnline'").message("spec.arch aarch64 is not supported: QEMU's arm64 'virt' machine cannot hot-plug CPUs (it is with spec.resizeMethod GuestOnline)").reason(Reason::FieldValueInvalid).field_path(".arch"),
    validation = Rule::new("self.arch != 'ppc64le' || !has(self.topology) || self.topology.threads in [1, 2, 4, 8]").message("spec.topology.threads must be 1, 2, 4 or 8 when spec.arch is ppc64le (POWER SMT modes)").reason(Reason::FieldValueInvalid).field_path(".topology.threads"),
    validation = Rule::new("self.arch != 'ppc64le' || self.granularity == 'Core' || !has(self.topology) || self.topology.threads == 1").message("spec.granularity must be Core when spec.arch is ppc64le and spec.topology.threads > 1: POWER hot-plugs whole cores, every SMT thread at once").reason(Reason::FieldValueInvalid).field_path(".granularity"),
)]
pub struct VirtualMachineSpec {
    /// vCPUs the guest should have online. Written by people, `kubectl scale` and autoscalers
    /// (through the /scale subresource). At least minCpus, at most sockets*cores*threads.
    #[schemars(range(min = 1, max = 255))]
    pub cpus: u32,

    /// The vCPU topology; its product sockets*cores*threads is the VM's maximum vCPU count,
    /// fixed for the VM's life. When omitted the operator sets sockets=1, cores=cpus, threads=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.sockets * self.cores * self.threads <= 255").message("spec.topology: sockets*cores*threads must be at most 255").reason(Reason::FieldValueInvalid))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.topology is immutable once set").reason(Reason::FieldValueForbidden))]
    pub topology: Option<Topology>,

    /// Unit of a plug or unplug: Thread (one vCPU) or Core (a whole core with all its SMT
    /// threads; cpus must then be a multiple of threads). Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.granularity is immutable").reason(Reason::FieldValueForbidden))]
    pub granularity: Granularity,

    /// How a resize changes the vCPUs the guest uses, fixed for the VM's life. Hotplug
    /// (default): the VMM adds and removes vCPUs (QEMU device_add/device_del), so a vCPU
    /// that is not in use does not exist. GuestOnline: every slot of the topology is present
    /// from boot, the guest boots with spec.cpus online and the rest offline, and a resize
    /// onlines or offlines vCPUs inside the guest through its guest agent (the guest must
    /// run qemu-guest-agent); no hot-plug support is needed from the machine, and an offline
    /// vCPU's host thread sleeps. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.resizeMethod is immutable").reason(Reason::FieldValueForbidden))]
    pub resize_method: ResizeMethod,

    /// The floor an autoscaler may not go under (default 1).
    #[serde(default = "default_min_cpus")]
    #[schemars(range(min = 1))]
    pub min_cpus: u32,

    /// Which free slots a plug fills first: Packed (lowest socket first) or Spread (balanced
    /// across sockets; each socket is one virtual NUMA node).
    #[serde(default)]
    pub placement: Placement,

    /// Guest memory, a quantity between 64Mi and 1Ti (default 256Mi). Immutable.
    #[serde(default = "default_memory")]
    #[schemars(schema_with = "memory_schema")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('63Mi')) && quantity(self).isLessThan(quantity('1025Gi'))").message("spec.memory must be between 64Mi and 1Ti").reason(Reason::FieldValueInvalid))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.memory is immutable").reason(Reason::FieldValueForbidden))]
    pub memory: Quantity,

    /// Guest CPU architecture: x86_64 (default), ppc64le, or aarch64 (with resizeMethod
    /// GuestOnline only). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "arch_schema")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.arch is immutable").reason(Reason::FieldValueForbidden))]
    pub arch: Option<Arch>,

    /// What to boot. Paths are resolved inside the node's guest image directory; empty means
    /// the node's default guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,

    /// Disks (virtio-blk, at most 8, in this order: /dev/vda, /dev/vdb, ...): a copy-on-write
    /// overlay of an image from the node's image directory, or an empty disk. Disks live on
    /// the node: they survive agent restarts, guest reboots and VM restarts there, and a VM
    /// placed on another node starts with fresh ones. Immutable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.disks is immutable").reason(Reason::FieldValueForbidden))]
    pub disks: Vec<crate::workload::Disk>,

    /// cloud-init NoCloud data for the guest (user data, network config, SSH keys), from
    /// the manifest or from Secrets of the VM's namespace. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.cloudInit is immutable").reason(Reason::FieldValueForbidden))]
    pub cloud_init: Option<crate::workload::CloudInit>,

    /// Guest ports forwarded from the node (at most 16); status.ports gives the addresses.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.ports is immutable").reason(Reason::FieldValueForbidden))]
    pub ports: Vec<crate::workload::Port>,

    /// Always: keep the guest running (restart it if its VMM dies, reschedule it if its node
    /// goes away). Halted: stop the guest and keep it stopped.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// Seconds to wait for the guest to release a vCPU on unplug before the attempt counts
    /// as failed and the vCPU stays (1-600, default 10).
    #[serde(default = "default_unplug_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub unplug_timeout_seconds: u32,

    /// Run on this node (a DNS subdomain, like a Pod's nodeName); skips placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(crate::names::DNS_SUBDOMAIN_PATTERN))]
    pub node_name: Option<String>,

    /// Run only on nodes whose labels match all of these (label keys and values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "node_selector_schema")]
    #[x_kube(validation = Rule::new(crate::names::NODE_SELECTOR_KEYS_RULE).message("spec.nodeSelector keys must be label keys: [prefix/]name, the name at most 63 letters, digits, '-', '_' or '.' that start and end alphanumeric, the prefix a DNS subdomain").reason(Reason::FieldValueInvalid))]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
}

fn default_min_cpus() -> u32 {
    1
}
fn default_memory() -> Quantity {
    Quantity("256Mi".into())
}
fn memory_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": 32,
        "default": "256Mi",
        "description": "Guest memory, a quantity between 64Mi and 1Ti (default 256Mi). Immutable."
    })
}
/// Values are label values (OpenAPI `pattern`); keys, which OpenAPI cannot constrain, are
/// checked by a CEL rule.
fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "maxLength": 63,
            "pattern": crate::names::LABEL_VALUE_PATTERN
        },
        "description": "Run only on nodes whose labels match all of these (label keys and values)."
    })
}
/// Always set: the API server writes the default into a VM created without it (and into
/// older objects as it reads them), so the immutability rule holds from creation. An enum:
/// an unknown architecture is refused as an unsupported value; a known one corescale cannot
/// run with the rest of the spec (aarch64 with Hotplug) by a CEL rule that says why.
fn arch_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["x86_64", "ppc64le", "aarch64"],
        "default": "x86_64",
        "description": "Guest CPU architecture: x86_64 (default), ppc64le or aarch64. Immutable. On ppc64le a core is the unit of hot-plug (granularity Core, or threads=1). aarch64 (QEMU's virt machine, which cannot hot-plug CPUs) needs resizeMethod GuestOnline."
    })
}
fn default_unplug_timeout() -> u32 {
    10
}

/// Unit of a plug or unplug.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One vCPU at a time.
    #[default]
    Thread,
    /// A whole core with all its SMT threads.
    Core,
}

/// Which free slots a plug fills first.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Placement {
    /// The lowest free slot first (fills socket 0, then socket 1, ...).
    #[default]
    Packed,
    /// The socket (NUMA node) with the fewest vCPUs first.
    Spread,
}

/// How a resize changes the vCPUs a guest uses.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResizeMethod {
    /// The VMM hot-plugs and hot-unplugs vCPUs; the guest agent onlines plugged ones.
    #[default]
    Hotplug,
    /// Every vCPU is present from boot; the guest agent onlines and offlines them.
    GuestOnline,
}

impl ResizeMethod {
    /// Every method, for metrics that export one series per method.
    pub const ALL: [ResizeMethod; 2] = [ResizeMethod::Hotplug, ResizeMethod::GuestOnline];

    /// The method's name as it appears in the API and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ResizeMethod::Hotplug => "Hotplug",
            ResizeMethod::GuestOnline => "GuestOnline",
        }
    }
}

impl std::fmt::Display for ResizeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Guest CPU architecture.
#[derive(
    JsonSchema,
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 64-bit x86 (q35 machine, ACPI CPU hot-plug).
    #[default]
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit little-endian POWER (pseries machine, sPAPR core hot-plug: a core with all
    /// its threads is the unit).
    #[serde(rename = "ppc64le")]
    Ppc64le,
    /// 64-bit Arm (virt machine, which cannot hot-plug CPUs: resizeMethod GuestOnline only).
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    /// Every architecture the API accepts.
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Ppc64le, Arch::Aarch64];

    /// The name used in the API, node announcements and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Ppc64le => "ppc64le",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not an architecture this version knows"))
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the guest should run.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RunStrategy {
    /// Keep the guest running.
    #[default]
    Always,
    /// Keep the guest stopped.
    Halted,
}

/// What to boot: paths relative to the node's guest image directory.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Boot {
    /// Kernel image (an uncompressed vmlinux with a PVH note, or a bzImage), relative to the
    /// node's image directory. Empty: the node's default kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(crate::names::RELATIVE_PATH_PATTERN))]
    pub kernel: Option<String>,
    /// Initial ramdisk, relative to the node's image directory. Empty: the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(crate::names::RELATIVE_PATH_PATTERN))]
    pub initrd: Option<String>,
    /// Extra kernel command line, appended to the node's console settings (at most 1024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub cmdline: Option<String>,
}

impl VirtualMachineSpec {
    /// The topology in force: spec.topology, or the default for the current cpus.
    pub fn effective_topology(&self) -> Topology {
        self.topology
            .unwrap_or_else(|| Topology::default_for(self.cpus))
    }
    /// The architecture in force.
    pub fn effective_arch(&self) -> Arch {
        self.arch.unwrap_or_default()
    }
}
