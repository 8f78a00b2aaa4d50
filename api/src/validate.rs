//! Validation of a spec in Rust, mirroring the CRD's CEL rules.
//!
//! The API server enforces the CEL rules at admission; the node agent and the operator run
//! these same checks again before acting, so a spec that reached them some other way (an
//! older API server, a CRD installed without rules) is refused with the same field-naming
//! message, and the running guest is left untouched.

use crate::names::{is_dns_subdomain, is_label_key, is_label_value};
use crate::types::{Arch, Granularity, ResizeMethod, VirtualMachineSpec, MAX_VCPUS};
use thiserror::Error;

/// A spec field that breaks a rule. Messages name the field as `kubectl explain` does.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ValidationError {
    /// A field is outside its allowed range.
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// Field path.
        field: &'static str,
        /// Given value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// spec.minCpus > spec.cpus.
    #[error("spec.minCpus ({min}) must not exceed spec.cpus ({cpus})")]
    MinAboveCpus {
        /// spec.minCpus.
        min: u32,
        /// spec.cpus.
        cpus: u32,
    },
    /// spec.cpus above the topology's product.
    #[error("spec.cpus ({cpus}) must not exceed the VM's maximum, spec.topology sockets*cores*threads ({max})")]
    AboveMax {
        /// spec.cpus.
        cpus: u32,
        /// The product.
        max: u32,
    },
    /// Core granularity with a count that is not whole cores.
    #[error("{field} ({value}) must be a multiple of spec.topology.threads ({threads}) when spec.granularity is Core")]
    NotWholeCores {
        /// Field path.
        field: &'static str,
        /// Its value.
        value: u32,
        /// Threads per core.
        threads: u32,
    },
    /// A boot path leaves the image directory.
    #[error("{field} must be a relative path inside the node's image directory, without '..': {value:?}")]
    BootPath {
        /// Field path.
        field: &'static str,
        /// Given path.
        value: String,
    },
    /// spec.memory is not a quantity in bounds.
    #[error("spec.memory must be a quantity between 64Mi and 1Ti, got {0:?}")]
    Memory(String),
    /// aarch64 with resizeMethod Hotplug.
    #[error("spec.arch aarch64 is not supported: QEMU's arm64 'virt' machine cannot hot-plug CPUs (it is with spec.resizeMethod GuestOnline)")]
    ArmNeedsGuestOnline,
    /// ppc64le with an SMT mode POWER does not have.
    #[error("spec.topology.threads must be 1, 2, 4 or 8 when spec.arch is ppc64le (POWER SMT modes), got {0}")]
    PowerThreads(u32),
    /// ppc64le with Thread granularity and several threads per core.
    #[error("spec.granularity must be Core when spec.arch is ppc64le and spec.topology.threads > 1 ({0}): POWER hot-plugs whole cores, every SMT thread at once")]
    PowerNeedsCore(u32),
    /// spec.nodeName is not a DNS subdomain.
    #[error("spec.nodeName must be a node name: a DNS subdomain of lowercase letters, digits, '-' and '.', at most 253 characters, got {0:?}")]
    NodeName(String),
    /// A spec.nodeSelector key or value breaks label syntax.
    #[error("spec.nodeSelector {what} must be label {what}: {value:?} is not one")]
    NodeSelector {
        /// "keys" or "values".
        what: &'static str,
        /// The offending key or value.
        value: String,
    },
    /// spec.boot.cmdline is too long.
    #[error("spec.boot.cmdline must be at most 1024 characters, got {0}")]
    CmdlineTooLong(usize),
    /// A disk, port or cloud-init field breaks a rule (the field is indexed: spec.disks[1].image).
    #[error("{field}: {message}")]
    Workload {
        /// Field path, with the list index.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Check a spec; the first broken rule is returned.
pub fn validate_spec(spec: &VirtualMachineSpec) -> Result<(), ValidationError> {
    range("spec.cpus", spec.cpus.into(), 1, MAX_VCPUS.into())?;
    range("spec.minCpus", spec.min_cpus.into(), 1, MAX_VCPUS.into())?;
    range(
        "spec.unplugTimeoutSeconds",
        spec.unplug_timeout_seconds.into(),
        1,
        600,
    )?;
    if spec.min_cpus > spec.cpus {
        return Err(ValidationError::MinAboveCpus {
            min: spec.min_cpus,
            cpus: spec.cpus,
        });
    }
    if spec.effective_arch() == Arch::Aarch64 && spec.resize_method != ResizeMethod::GuestOnline {
        return Err(ValidationError::ArmNeedsGuestOnline);
    }
    if let Some(t) = spec.topology {
        range("spec.topology.sockets", t.sockets.into(), 1, 16)?;
        range("spec.topology.cores", t.cores.into(), 1, 255)?;
        range("spec.topology.threads", t.threads.into(), 1, 8)?;
        let max = t.max_vcpus();
        range(
            "spec.topology (sockets*cores*threads)",
            max.into(),
            1,
            MAX_VCPUS.into(),
        )?;
        if spec.cpus > max {
            return Err(ValidationError::AboveMax {
                cpus: spec.cpus,
                max,
            });
        }
        if spec.effective_arch() == Arch::Ppc64le {
            if ![1, 2, 4, 8].contains(&t.threads) {
                return Err(ValidationError::PowerThreads(t.threads));
            }
            if spec.granularity == Granularity::Thread && t.threads > 1 {
                return Err(ValidationError::PowerNeedsCore(t.threads));
            }
        }
        if spec.granularity == Granularity::Core {
            for (field, value) in [("spec.cpus", spec.cpus), ("spec.minCpus", spec.min_cpus)] {
                if !value.is_multiple_of(t.threads) {
                    return Err(ValidationError::NotWholeCores {
                        field,
                        value,
                        threads: t.threads,
                    });
                }
            }
        }
    }
    if let Some(n) = &spec.node_name {
        if !is_dns_subdomain(n) {
            return Err(ValidationError::NodeName(n.clone()));
        }
    }
    for (k, v) in spec.node_selector.iter().flatten() {
        if !is_label_key(k) {
            return Err(ValidationError::NodeSelector {
                what: "keys",
                value: k.clone(),
            });
        }
        if !is_label_value(v) {
            return Err(ValidationError::NodeSelector {
                what: "values",
                value: v.clone(),
            });
        }
    }
    let bytes = parse_quantity(&spec.memory.0)
        .ok_or_else(|| ValidationError::Memory(spec.memory.0.clone()))?;
    if !(64 << 20..=1 << 40).contains(&bytes) {
        return Err(ValidationError::Memory(spec.memory.0.clone()));
    }
    if let Some(boot) = &spec.boot {
        for (field, value) in [
            ("spec.boot.kernel", &boot.kernel),
            ("spec.boot.initrd", &boot.initrd),
        ] {
            if let Some(v) = value {
                if !crate::names::is_relative_path(v) {
                    return Err(ValidationError::BootPath {
                        field,
                        value: v.clone(),
                    });
                }
            }
        }
        if let Some(c) = &boot.cmdline {
            if c.chars().count() > 1024 {
                return Err(ValidationError::CmdlineTooLong(c.chars().count()));
            }
        }
    }
    validate_workload(spec)
}

fn workload_err(field: String, message: impl Into<String>) -> ValidationError {
    ValidationError::Workload {
        field,
        message: message.into(),
    }
}

fn dns_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && is_dns_subdomain(s) && !s.contains('.')
}

/// spec.disks, spec.ports and spec.cloudInit, as the CRD's rules check them.
pub fn validate_workload(spec: &VirtualMachineSpec) -> Result<(), ValidationError> {
    use crate::workload::{MAX_DISKS, MAX_INLINE_DATA, MAX_PORTS, MAX_SSH_KEYS};
    if spec.disks.len() > MAX_DISKS {
        return Err(workload_err(
            "spec.disks".into(),
            format!("at most {MAX_DISKS} disks, got {}", spec.disks.len()),
        ));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let f = |name: &str| format!("spec.disks[{i}].{name}");
        if !dns_label(&d.name, 20) {
            return Err(workload_err(
                f("name"),
                format!("{:?} must be a DNS label of at most 20 characters", d.name),
            ));
        }
        if spec.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(workload_err(
                f("name"),
                format!("{:?} is used by an earlier disk", d.name),
            ));
        }
        match (&d.image, &d.size) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(workload_err(
                    format!("spec.disks[{i}]"),
                    "give exactly one of image (a disk from an image) and size (an empty disk)",
                ))
            }
            (Some(img), None) => {
                if img.is_empty() || !crate::names::is_relative_path(img) {
                    return Err(workload_err(f("image"), format!("{img:?} must be a relative path inside the node's image directory, without '..'")));
                }
            }
            (None, Some(q)) => match parse_quantity(&q.0) {
                Some(b) if (1 << 20..=2 << 40).contains(&b) => {}
                _ => {
                    return Err(workload_err(
                        f("size"),
                        format!("{:?} must be a quantity between 1Mi and 2Ti", q.0),
                    ))
                }
            },
        }
    }
    if spec.ports.len() > MAX_PORTS {
        return Err(workload_err(
            "spec.ports".into(),
            format!("at most {MAX_PORTS} ports, got {}", spec.ports.len()),
        ));
    }
    for (i, p) in spec.ports.iter().enumerate() {
        let f = |name: &str| format!("spec.ports[{i}].{name}");
        if !dns_label(&p.name, 15) {
            return Err(workload_err(
                f("name"),
                format!("{:?} must be a DNS label of at most 15 characters", p.name),
            ));
        }
        let earlier = &spec.ports[..i];
        if earlier.iter().any(|o| o.name == p.name) {
            return Err(workload_err(
                f("name"),
                format!("{:?} is used by an earlier port", p.name),
            ));
        }
        if !(1..=65535).contains(&p.guest_port) {
            return Err(workload_err(
                f("guestPort"),
                format!("must be between 1 and 65535, got {}", p.guest_port),
            ));
        }
        if let Some(h) = p.host_port {
            if !(1..=65535).contains(&h) {
                return Err(workload_err(
                    f("hostPort"),
                    format!("must be between 1 and 65535, got {h}"),
                ));
            }
            if earlier
                .iter()
                .any(|o| o.host_port == Some(h) && o.protocol == p.protocol)
            {
                return Err(workload_err(
                    f("hostPort"),
                    format!("{h}/{} is used by an earlier port", p.protocol.as_str()),
                ));
            }
        }
    }
    if let Some(c) = &spec.cloud_init {
        for (field, inline, secret) in [
            (
                "spec.cloudInit.userData",
                &c.user_data,
                c.user_data_secret_ref.is_some(),
            ),
            (
                "spec.cloudInit.networkData",
                &c.network_data,
                c.network_data_secret_ref.is_some(),
            ),
        ] {
            if let Some(d) = inline {
                if secret {
                    return Err(workload_err(
                        field.into(),
                        "give the data inline or from a Secret (secretRef), not both",
                    ));
                }
                if d.len() > MAX_INLINE_DATA {
                    return Err(workload_err(field.into(), format!("at most {MAX_INLINE_DATA} bytes inline, got {}; put larger data in a Secret", d.len())));
                }
            }
        }
        if c.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(workload_err(
                "spec.cloudInit.sshAuthorizedKeys".into(),
                format!(
                    "at most {MAX_SSH_KEYS} keys, got {}",
                    c.ssh_authorized_keys.len()
                ),
            ));
        }
        for (i, k) in c.ssh_authorized_keys.iter().enumerate() {
            if k.contains('\n') || k.trim().is_empty() {
                return Err(workload_err(
                    format!("spec.cloudInit.sshAuthorizedKeys[{i}]"),
                    "must be one public key on one line",
                ));
            }
        }
    }
    Ok(())
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ValidationError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// Parse a Kubernetes quantity of bytes (`256Mi`, `1G`, `1073741824`) into bytes.
/// Fractions and exponents are not accepted: memory sizes are whole numbers.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("256Mi"), Some(256 << 20));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1024"), Some(1024));
        assert_eq!(parse_quantity("1.5Gi"), None);
        assert_eq!(parse_quantity("Mi"), None);
        assert_eq!(parse_quantity("99999999999999999999Ti"), None);
    }

    fn power(cpus: u32, threads: u32, granularity: Granularity) -> VirtualMachineSpec {
        serde_json::from_value(serde_json::json!({
            "cpus": cpus,
            "minCpus": threads,
            "arch": "ppc64le",
            "granularity": granularity,
            "topology": {"sockets": 1, "cores": 4, "threads": threads},
        }))
        .expect("a spec")
    }

    #[test]
    fn power_needs_whole_cores_and_its_smt_modes() {
        assert_eq!(validate_spec(&power(2, 1, Granularity::Thread)), Ok(()));
        assert_eq!(validate_spec(&power(4, 2, Granularity::Core)), Ok(()));
        let e = validate_spec(&power(2, 2, Granularity::Thread)).unwrap_err();
        assert_eq!(e, ValidationError::PowerNeedsCore(2));
        assert!(
            e.to_string().starts_with("spec.granularity must be Core"),
            "{e}"
        );
        let e = validate_spec(&power(3, 3, Granularity::Core)).unwrap_err();
        assert_eq!(e, ValidationError::PowerThreads(3));
        assert!(e.to_string().contains("spec.topology.threads"), "{e}");
        // The same shape is fine on x86_64.
        let mut x86 = power(3, 3, Granularity::Core);
        x86.arch = None;
        assert_eq!(validate_spec(&x86), Ok(()));
    }
}
