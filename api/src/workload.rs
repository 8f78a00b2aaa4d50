//! What a VM needs to run a workload: disks, cloud-init, forwarded ports (spec), and what
//! the guest reports of itself (status).
//!
//! Every field carries a doc comment: it becomes the field's description in the generated
//! CRD, which is what `kubectl explain cvm.spec.disks` prints.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most disks one VM may have (virtio-blk devices; the cloud-init seed is one more).
pub const MAX_DISKS: usize = 8;
/// Most forwarded ports one VM may have.
pub const MAX_PORTS: usize = 16;
/// Most SSH keys in spec.cloudInit.sshAuthorizedKeys.
pub const MAX_SSH_KEYS: usize = 32;
/// Longest inline user or network data (bytes); larger data belongs in a Secret.
pub const MAX_INLINE_DATA: usize = 32 * 1024;
/// OpenAPI `pattern` of a DNS label (disk and port names).
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// One disk of the VM, a virtio-blk device. Disks appear in the guest in this order
/// (/dev/vda, /dev/vdb, ...) and by name as /dev/disk/by-id/virtio-<name>.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.image) != has(self.size)").message("spec.disks[]: give exactly one of image (a disk from an image) and size (an empty disk)").reason(Reason::FieldValueInvalid),
)]
pub struct Disk {
    /// Name of the disk, unique in the VM (a DNS label, at most 20 characters: it is the
    /// disk's serial number in the guest).
    #[schemars(length(max = 20), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// A qcow2 or raw image file, relative to the node's image directory. The VM gets a
    /// copy-on-write overlay of it in its state directory: the image is shared by every VM
    /// that uses it and never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(crate::names::RELATIVE_PATH_PATTERN))]
    pub image: Option<String>,
    /// Size of an empty disk (a quantity between 1Mi and 2Ti), created on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "size_schema")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('1023Ki')) && quantity(self).isLessThan(quantity('2049Gi'))").message("spec.disks[].size must be a quantity between 1Mi and 2Ti").reason(Reason::FieldValueInvalid))]
    pub size: Option<Quantity>,
}

fn size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": 32,
        "description": "Size of an empty disk (a quantity between 1Mi and 2Ti), created on the node."
    })
}

/// A Secret in the VM's own namespace (a VM cannot name a Secret of another namespace).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the VM's namespace.
    #[schemars(length(max = 253), pattern(crate::names::DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// cloud-init configuration, given to the guest as a NoCloud seed disk (label `cidata`)
/// that the node builds at each start. The instance id is the VM's UID, so cloud-init's
/// once-per-instance steps run on the VM's first boot only.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.userData) && has(self.userDataSecretRef))").message("spec.cloudInit: give userData or userDataSecretRef, not both").reason(Reason::FieldValueInvalid),
    validation = Rule::new("!(has(self.networkData) && has(self.networkDataSecretRef))").message("spec.cloudInit: give networkData or networkDataSecretRef, not both").reason(Reason::FieldValueInvalid),
)]
pub struct CloudInit {
    /// User data (for example a `#cloud-config` document), at most 32 KiB inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub user_data: Option<String>,
    /// User data from a Secret of the VM's namespace: its key `userdata` (or `userData`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<SecretRef>,
    /// Network configuration (cloud-init's network-config, version 1 or 2), at most 32 KiB
    /// inline. Without it the guest configures its first NIC by DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub network_data: Option<String>,
    /// Network configuration from a Secret of the VM's namespace: its key `networkdata`
    /// (or `networkData`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data_secret_ref: Option<SecretRef>,
    /// SSH public keys for the image's default user (cloud-init's public-keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 16384)))]
    pub ssh_authorized_keys: Vec<String>,
}

/// Transport protocol of a forwarded port.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// A guest port forwarded from the node. The guest's first NIC is on QEMU's user-mode
/// network (the guest reaches out through the node; nothing reaches in except these ports).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// Name of the port, unique in the VM (a DNS label, at most 15 characters, like a
    /// container port's name).
    #[schemars(length(max = 15), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// The port the guest listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub guest_port: u32,
    /// The node port to forward from (1-65535). Omitted: a free port chosen at each start
    /// (status.ports says which); give one for an address that stays the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub host_port: Option<u32>,
    /// TCP (default) or UDP.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A forwarded port as the node set it up.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    /// spec.ports[].name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The guest's port.
    pub guest_port: u32,
    /// The node address the port is forwarded from.
    pub host_ip: String,
    /// The node port it is forwarded from.
    pub host_port: u32,
}

/// One disk as the node holds it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// spec.disks[].name.
    pub name: String,
    /// The node that holds the disk's data: node-local disks do not follow a VM that moves.
    pub node: String,
}

/// What the guest says about itself, through its guest agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    /// Operating system name (os-release PRETTY_NAME or NAME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_name: Option<String>,
    /// Operating system version (os-release VERSION_ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Kernel release (uname -r).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// The guest's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// IP addresses of the guest's interfaces (loopback left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
}
