//! A VM's disks, cloud-init data and ports, resolved on this node for the backend: disk
//! images inside the node's image directory, cloud-init Secrets read from the VM's
//! namespace, host ports chosen and checked free. Every error names the spec field.
//!
//! Secrets: the agent's ClusterRole grants no access to Secrets. A VM's owner lets the
//! agent read one Secret by name with a Role (`get`, `resourceNames: [<secret>]`) bound to
//! the node agent's ServiceAccount in the VM's namespace (README, "cloud-init"); a Secret
//! it may not read is refused with a message saying so. The agent reads only the Secrets
//! named by the VMs placed on its node.

use super::Shared;
use crate::backend::workload::{forwards_for, DiskSource, DiskSpec, PortForward, SeedData};
use crate::backend::BackendError;
use corescale_api::validate::parse_quantity;
use corescale_api::{SecretRef, VirtualMachine};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

/// The VM's disks, resolved.
pub fn disks_of(shared: &Shared, vm: &VirtualMachine) -> Result<Vec<DiskSpec>, BackendError> {
    let mut out = Vec::with_capacity(vm.spec.disks.len());
    for (i, d) in vm.spec.disks.iter().enumerate() {
        let source = match (&d.image, &d.size) {
            (Some(rel), None) => {
                let images = shared.images.as_ref().ok_or_else(|| BackendError::Field {
                    field: format!("spec.disks[{i}].image"),
                    message: "this node's backend runs no disk images".into(),
                })?;
                DiskSource::Image(images.resolve_disk_image(i, rel)?)
            }
            (None, Some(q)) => {
                DiskSource::Empty(parse_quantity(&q.0).ok_or_else(|| BackendError::Field {
                    field: format!("spec.disks[{i}].size"),
                    message: format!("{:?} is not a quantity of bytes", q.0),
                })?)
            }
            _ => {
                return Err(BackendError::Field {
                    field: format!("spec.disks[{i}]"),
                    message: "give exactly one of image and size".into(),
                })
            }
        };
        out.push(DiskSpec {
            name: d.name.clone(),
            source,
        });
    }
    Ok(out)
}

/// One key of a Secret as text: the first of `keys` that it has.
async fn secret_text(
    shared: &Shared,
    ns: &str,
    field: &str,
    r: &SecretRef,
    keys: &[&str],
) -> Result<String, BackendError> {
    let err = |message: String| BackendError::Field {
        field: format!("{field}.name"),
        message,
    };
    let api: Api<Secret> = Api::namespaced(shared.client.clone(), ns);
    let secret = match api.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(err(format!("Secret {ns}/{} not found", r.name))),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Err(err(format!(
                "the node agent may not read Secret {ns}/{}: grant its ServiceAccount get on that Secret with a Role in {ns} (resourceNames: [{}]); see README, cloud-init",
                r.name, r.name
            )))
        }
        Err(e) => return Err(err(format!("reading Secret {ns}/{}: {e}", r.name))),
    };
    let data = secret.data.unwrap_or_default();
    for k in keys {
        if let Some(v) = data.get(*k) {
            return String::from_utf8(v.0.clone())
                .map_err(|_| err(format!("Secret {ns}/{} key {k} is not UTF-8 text", r.name)));
        }
    }
    Err(err(format!(
        "Secret {ns}/{} has none of the keys {}",
        r.name,
        keys.join(", ")
    )))
}

/// The VM's cloud-init seed data (None without spec.cloudInit).
pub async fn seed_of(
    shared: &Shared,
    vm: &VirtualMachine,
) -> Result<Option<SeedData>, BackendError> {
    let Some(c) = &vm.spec.cloud_init else {
        return Ok(None);
    };
    let ns = vm.namespace().unwrap_or_default();
    let user_data = match (&c.user_data, &c.user_data_secret_ref) {
        (_, Some(r)) => Some(
            secret_text(
                shared,
                &ns,
                "spec.cloudInit.userDataSecretRef",
                r,
                &["userdata", "userData"],
            )
            .await?,
        ),
        (inline, None) => inline.clone(),
    };
    let network_config = match (&c.network_data, &c.network_data_secret_ref) {
        (_, Some(r)) => Some(
            secret_text(
                shared,
                &ns,
                "spec.cloudInit.networkDataSecretRef",
                r,
                &["networkdata", "networkData"],
            )
            .await?,
        ),
        (inline, None) => inline.clone(),
    };
    Ok(Some(SeedData {
        instance_id: vm.uid().unwrap_or_default(),
        hostname: vm.name_any(),
        user_data,
        network_config,
        ssh_keys: c.ssh_authorized_keys.clone(),
    }))
}

/// The VM's forwarded ports on this node: the ports of the guest's last start (`last`,
/// or else what the status shows) are taken again when still free.
pub fn ports_of(
    shared: &Shared,
    vm: &VirtualMachine,
    last: &[PortForward],
) -> Result<Vec<PortForward>, BackendError> {
    let addr = shared.config.port_address;
    let mut keep: Vec<PortForward> = last.to_vec();
    let from_status: Vec<PortForward> = vm
        .status
        .as_ref()
        .map(|s| {
            s.ports
                .iter()
                .filter_map(|p| {
                    Some(PortForward {
                        name: p.name.clone(),
                        protocol: p.protocol,
                        guest_port: u16::try_from(p.guest_port).ok()?,
                        host_ip: addr,
                        host_port: u16::try_from(p.host_port).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    keep.extend(from_status);
    forwards_for(&vm.spec.ports, addr, &keep)
}

/// The nodes that held this VM's disks before, other than this one (from its status): a
/// VM that moved starts with fresh disks, and the agent says so.
pub fn disks_left_behind(vm: &VirtualMachine, node: &str) -> Vec<String> {
    let mut nodes: Vec<String> = vm
        .status
        .as_ref()
        .map(|s| {
            s.disks
                .iter()
                .filter(|d| d.node != node)
                .map(|d| d.node.clone())
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_left_on_other_nodes_are_named_once() {
        let mut vm = VirtualMachine::new(
            "web",
            serde_json::from_value(serde_json::json!({"cpus": 1})).unwrap(),
        );
        assert!(
            disks_left_behind(&vm, "node-b").is_empty(),
            "no status, nothing behind"
        );
        vm.status = Some(corescale_api::VirtualMachineStatus {
            disks: ["root", "data"]
                .iter()
                .map(|n| corescale_api::DiskStatus {
                    name: (*n).into(),
                    node: "node-a".into(),
                })
                .collect(),
            ..Default::default()
        });
        assert_eq!(disks_left_behind(&vm, "node-b"), ["node-a"]);
        assert!(
            disks_left_behind(&vm, "node-a").is_empty(),
            "its own node keeps them"
        );
    }
}
