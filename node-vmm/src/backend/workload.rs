//! What a guest needs beyond vCPUs and memory to run a workload, as a backend receives it:
//! disks (an image resolved inside the node's image directory, or an empty disk of a size),
//! the cloud-init data of its seed disk (Secrets already read), and forwarded ports (host
//! ports already chosen and checked free on this node). The agent resolves a VM's spec
//! into these ([`forwards_for`] for ports); a backend only attaches them.

use super::BackendError;
use corescale_api::{Port, PortStatus, Protocol};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// spec.disks[].name: the disk's serial in the guest.
    pub name: String,
    /// Where its data comes from.
    pub source: DiskSource,
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskSource {
    /// A copy-on-write overlay of this image (absolute, inside the node's image directory).
    Image(PathBuf),
    /// An empty disk of this many bytes.
    Empty(u64),
}

/// The data of a cloud-init NoCloud seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedData {
    /// meta-data `instance-id` (the VM's UID: cloud-init's per-instance steps run once).
    pub instance_id: String,
    /// meta-data `local-hostname` (the VM's name).
    pub hostname: String,
    /// user-data, when given.
    pub user_data: Option<String>,
    /// network-config, when given.
    pub network_config: Option<String>,
    /// meta-data `public-keys`.
    pub ssh_keys: Vec<String>,
}

/// One forwarded port, its host side chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// spec.ports[].name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The guest's port.
    pub guest_port: u16,
    /// The node address QEMU listens on (QEMU's hostfwd takes IPv4 addresses).
    pub host_ip: Ipv4Addr,
    /// The node port QEMU listens on.
    pub host_port: u16,
}

impl PortForward {
    /// The port as status reports it, at `advertised` (the address clients use; the bind
    /// address when it is a specific one).
    pub fn status(&self, advertised: Option<&str>) -> PortStatus {
        PortStatus {
            name: self.name.clone(),
            protocol: self.protocol,
            guest_port: u32::from(self.guest_port),
            host_ip: advertised
                .map(str::to_string)
                .unwrap_or_else(|| self.host_ip.to_string()),
            host_port: u32::from(self.host_port),
        }
    }
}

fn field_err(field: String, message: String) -> BackendError {
    BackendError::Field { field, message }
}

/// Bind `addr` for `protocol` and return the port bound (the socket is closed again).
fn probe(protocol: Protocol, addr: SocketAddr) -> std::io::Result<u16> {
    match protocol {
        Protocol::Tcp => TcpListener::bind(addr)?.local_addr().map(|a| a.port()),
        Protocol::Udp => UdpSocket::bind(addr)?.local_addr().map(|a| a.port()),
    }
}

/// Choose and check the host side of `ports` on `addr`: a port given in spec.ports[].hostPort
/// must be free on this node (else the error names that field); an omitted one gets a free
/// port from the kernel. `keep` are the forwards of the guest's previous start: their ports
/// are taken again when free, so a restarted guest keeps its addresses.
pub fn forwards_for(
    ports: &[Port],
    addr: Ipv4Addr,
    keep: &[PortForward],
) -> Result<Vec<PortForward>, BackendError> {
    let mut out: Vec<PortForward> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let guest_port = u16::try_from(p.guest_port)
            .ok()
            .filter(|g| *g > 0)
            .ok_or_else(|| {
                field_err(
                    format!("spec.ports[{i}].guestPort"),
                    format!("must be between 1 and 65535, got {}", p.guest_port),
                )
            })?;
        let host_port = match p.host_port {
            Some(h) => {
                let h = u16::try_from(h).ok().filter(|h| *h > 0).ok_or_else(|| {
                    field_err(
                        format!("spec.ports[{i}].hostPort"),
                        format!("must be between 1 and 65535, got {h}"),
                    )
                })?;
                probe(p.protocol, SocketAddr::new(addr.into(), h)).map_err(|e| {
                    field_err(
                        format!("spec.ports[{i}].hostPort"),
                        format!(
                            "{addr}:{h}/{} cannot be forwarded on this node: {e} (another VM or process holds it; choose another hostPort, or omit it for a free one)",
                            p.protocol.as_str()
                        ),
                    )
                })?
            }
            None => {
                let again = keep
                    .iter()
                    .find(|k| k.name == p.name && k.protocol == p.protocol && k.host_ip == addr)
                    .map(|k| k.host_port)
                    .filter(|h| probe(p.protocol, SocketAddr::new(addr.into(), *h)).is_ok());
                match again {
                    Some(h) => h,
                    None => probe(p.protocol, SocketAddr::new(addr.into(), 0)).map_err(|e| {
                        field_err(
                            format!("spec.ports[{i}]"),
                            format!("no free {} port on {addr}: {e}", p.protocol.as_str()),
                        )
                    })?,
                }
            }
        };
        if out
            .iter()
            .any(|o| o.host_port == host_port && o.protocol == p.protocol)
        {
            return Err(field_err(
                format!("spec.ports[{i}].hostPort"),
                format!("{host_port} is used by an earlier port of this VM"),
            ));
        }
        out.push(PortForward {
            name: p.name.clone(),
            protocol: p.protocol,
            guest_port,
            host_ip: addr,
            host_port,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, guest: u32, host: Option<u32>) -> Port {
        Port {
            name: name.into(),
            guest_port: guest,
            host_port: host,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn a_taken_host_port_is_refused_naming_the_field() {
        let lo = Ipv4Addr::LOCALHOST;
        let held = TcpListener::bind((lo, 0)).unwrap();
        let taken = u32::from(held.local_addr().unwrap().port());
        let e = forwards_for(
            &[port("ssh", 22, None), port("http", 80, Some(taken))],
            lo,
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("spec.ports[1].hostPort:"), "{e}");
        assert!(
            e.to_string().contains("already in use") || e.to_string().contains("in use"),
            "{e}"
        );
        drop(held);
        // Free now: taken as given; an omitted one gets some free port.
        let f = forwards_for(
            &[port("ssh", 22, None), port("http", 80, Some(taken))],
            lo,
            &[],
        )
        .unwrap();
        assert_eq!(u32::from(f[1].host_port), taken);
        assert!(f[0].host_port > 0 && f[0].guest_port == 22);
        // A restart keeps the chosen port when it is still free.
        let again = forwards_for(&[port("ssh", 22, None)], lo, &f).unwrap();
        assert_eq!(again[0].host_port, f[0].host_port);
        assert_eq!(
            f[0].status(Some("10.0.0.5")).host_ip,
            "10.0.0.5",
            "status shows the advertised address"
        );
    }
}
