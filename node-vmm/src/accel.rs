//! Choosing the accelerator: KVM where the host's KVM can run an unmodified Linux guest,
//! QEMU's TCG otherwise, and what the node can offer (host CPUs, vCPUs per VM).
//!
//! `/dev/kvm` existing is not enough. Some hosts expose a KVM that cannot boot an ordinary
//! kernel: `kvm_pvm`, a software nested hypervisor for paravirtualized guests, is the case
//! on this project's CI machines. Such a KVM is detected (the `kvm_pvm` module, or no
//! `vmx`/`svm` CPU flag and no `kvm_intel`/`kvm_amd` module) and TCG is chosen instead.
//! `CORESCALE_ACCEL=tcg|kvm` (or the node's configuration) overrides the choice.

use corescale_api::MAX_VCPUS;
use kvm_ioctls::Kvm;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Hardware accelerator for a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (tests, and hosts whose KVM cannot run the guest).
    Tcg,
}

impl Accel {
    /// The name used in QEMU's `-accel` and in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Environment variable that forces the accelerator.
pub const ACCEL_ENV: &str = "CORESCALE_ACCEL";

/// Errors of accelerator selection.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AccelError {
    /// The override names no accelerator.
    #[error("{source_name}={value:?} is not an accelerator: use tcg, kvm or auto")]
    BadOverride {
        /// Where the value came from (the variable or config field).
        source_name: String,
        /// The value.
        value: String,
    },
    /// KVM was forced but cannot be used.
    #[error("KVM was requested ({source_name}=kvm) but cannot run guests on this host: {reason}; remove the override to fall back to tcg")]
    KvmForcedButUnusable {
        /// Where the override came from.
        source_name: String,
        /// Why KVM is unusable.
        reason: String,
    },
}

/// What probing KVM found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmStatus {
    /// KVM can run guests.
    Usable {
        /// KVM_CAP_MAX_VCPUS.
        max_vcpus: u32,
        /// KVM_CAP_NR_VCPUS (the recommended maximum).
        recommended_vcpus: u32,
    },
    /// `/dev/kvm` opens but cannot run an unmodified Linux guest.
    Unusable {
        /// Why.
        reason: String,
        /// KVM_CAP_MAX_VCPUS, when the device answered.
        max_vcpus: Option<u32>,
    },
    /// No KVM device, or it cannot be opened.
    Absent {
        /// Why.
        reason: String,
    },
}

impl KvmStatus {
    /// Whether KVM can run guests.
    pub fn usable(&self) -> bool {
        matches!(self, KvmStatus::Usable { .. })
    }
    /// Why KVM is not used (empty when usable).
    pub fn reason(&self) -> &str {
        match self {
            KvmStatus::Usable { .. } => "",
            KvmStatus::Unusable { reason, .. } | KvmStatus::Absent { reason } => reason,
        }
    }
}

/// What this node offers, for its announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    /// CPUs this process may run on.
    pub host_cpus: u32,
    /// The accelerator guests get.
    pub accel: Accel,
    /// Largest vCPU count one VM may have with that accelerator.
    pub max_vcpus: u32,
    /// The KVM probe.
    pub kvm: KvmStatus,
    /// Why this accelerator (for logs and the node's status).
    pub reason: String,
}

/// Where the host's facts are read; tests point it at fixtures.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// `/sys/module`.
    pub sys_module: PathBuf,
    /// `/proc/cpuinfo`.
    pub cpuinfo: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            kvm_device: PathBuf::from("/dev/kvm"),
            sys_module: PathBuf::from("/sys/module"),
            cpuinfo: PathBuf::from("/proc/cpuinfo"),
        }
    }
}

/// Parse an override value: `tcg`, `kvm`, or empty/`auto` for no override.
pub fn parse_override(source_name: &str, value: &str) -> Result<Option<Accel>, AccelError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "tcg" => Ok(Some(Accel::Tcg)),
        "kvm" => Ok(Some(Accel::Kvm)),
        _ => Err(AccelError::BadOverride {
            source_name: source_name.to_string(),
            value: value.to_string(),
        }),
    }
}

fn cpu_flags(cpuinfo: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Probe the KVM device and decide whether it can run an unmodified Linux guest.
pub fn probe_kvm(paths: &HostPaths) -> KvmStatus {
    let dev = paths.kvm_device.display().to_string();
    if !paths.kvm_device.exists() {
        return KvmStatus::Absent { reason: format!("{dev} does not exist (no KVM module loaded, or the device is not passed into the container)") };
    }
    let Ok(cpath) = CString::new(paths.kvm_device.as_os_str().as_encoded_bytes()) else {
        return KvmStatus::Absent {
            reason: format!("{dev} is not a valid device path"),
        };
    };
    let kvm = match Kvm::new_with_path(&cpath) {
        Ok(k) => k,
        Err(e) => {
            let hint = if e.errno() == libc::EACCES {
                ": add the node's user to the kvm group or pass the device with write access"
            } else {
                ""
            };
            return KvmStatus::Absent {
                reason: format!("cannot open {dev}: {e}{hint}"),
            };
        }
    };
    let max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    let recommended = u32::try_from(kvm.get_nr_vcpus()).unwrap_or(u32::MAX);
    if let Err(e) = kvm.create_vm() {
        return KvmStatus::Unusable {
            reason: format!("KVM_CREATE_VM on {dev} failed: {e}"),
            max_vcpus: Some(max),
        };
    }
    if paths.sys_module.join("kvm_pvm").exists() {
        return KvmStatus::Unusable {
            reason: "the host's KVM is kvm_pvm, a software nested hypervisor for paravirtualized guests that cannot boot an unmodified Linux kernel".into(),
            max_vcpus: Some(max),
        };
    }
    let hw_module = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| paths.sys_module.join(m).exists());
    let flags = cpu_flags(&paths.cpuinfo);
    let hw_flag = flags.iter().any(|f| f == "vmx" || f == "svm");
    if !hw_module && !hw_flag {
        return KvmStatus::Unusable {
            reason: "no hardware virtualization: neither kvm_intel nor kvm_amd is loaded and the CPU has no vmx/svm flag".into(),
            max_vcpus: Some(max),
        };
    }
    KvmStatus::Usable {
        max_vcpus: max,
        recommended_vcpus: recommended,
    }
}

/// CPUs this process may use (affinity and cgroup quota aware).
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// Choose the accelerator. `configured` is the node configuration's value (empty for
/// none); the `CORESCALE_ACCEL` environment variable wins over it.
pub fn choose(configured: &str, paths: &HostPaths) -> Result<HostCapacity, AccelError> {
    choose_from(std::env::var(ACCEL_ENV).ok().as_deref(), configured, paths)
}

/// [`choose`] with the environment variable's value given.
pub fn choose_from(
    env: Option<&str>,
    configured: &str,
    paths: &HostPaths,
) -> Result<HostCapacity, AccelError> {
    let env = env.unwrap_or_default();
    let (source_name, forced) = if !env.trim().is_empty() {
        (ACCEL_ENV.to_string(), parse_override(ACCEL_ENV, env)?)
    } else {
        (
            "accel (node configuration)".to_string(),
            parse_override("accel (node configuration)", configured)?,
        )
    };
    let kvm = probe_kvm(paths);
    let host_cpus = host_cpus();
    let tcg = |kvm: KvmStatus, reason: String| HostCapacity {
        host_cpus,
        accel: Accel::Tcg,
        max_vcpus: MAX_VCPUS,
        kvm,
        reason,
    };
    match (forced, &kvm) {
        (Some(Accel::Tcg), _) => Ok(tcg(kvm, format!("{source_name}=tcg"))),
        (Some(Accel::Kvm), KvmStatus::Absent { reason }) => Err(AccelError::KvmForcedButUnusable {
            source_name,
            reason: reason.clone(),
        }),
        (Some(Accel::Kvm), KvmStatus::Unusable { max_vcpus, .. }) => {
            // The operator insists (e.g. a paravirtualized guest kernel): honour it.
            let max = max_vcpus.unwrap_or(MAX_VCPUS).min(MAX_VCPUS);
            let reason = format!(
                "{source_name}=kvm although the probe says: {}",
                kvm.reason()
            );
            Ok(HostCapacity {
                host_cpus,
                accel: Accel::Kvm,
                max_vcpus: max,
                kvm,
                reason,
            })
        }
        (_, KvmStatus::Usable { max_vcpus, .. }) => {
            let max = (*max_vcpus).min(MAX_VCPUS);
            Ok(HostCapacity {
                host_cpus,
                accel: Accel::Kvm,
                max_vcpus: max,
                kvm,
                reason: "KVM can run guests".into(),
            })
        }
        (None, _) => {
            let reason = format!(
                "KVM is not usable ({}), so guests run under TCG",
                kvm.reason()
            );
            Ok(tcg(kvm, reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse() {
        assert_eq!(parse_override("X", "tcg"), Ok(Some(Accel::Tcg)));
        assert_eq!(parse_override("X", " KVM "), Ok(Some(Accel::Kvm)));
        assert_eq!(parse_override("X", ""), Ok(None));
        assert_eq!(parse_override("X", "auto"), Ok(None));
        let e = parse_override("CORESCALE_ACCEL", "hvf").unwrap_err();
        assert_eq!(
            e.to_string(),
            "CORESCALE_ACCEL=\"hvf\" is not an accelerator: use tcg, kvm or auto"
        );
    }

    #[test]
    fn missing_device_is_absent_and_gives_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths {
            kvm_device: dir.path().join("kvm"),
            sys_module: dir.path().into(),
            cpuinfo: dir.path().join("cpuinfo"),
        };
        let st = probe_kvm(&paths);
        assert!(matches!(st, KvmStatus::Absent { .. }), "{st:?}");
        assert!(st.reason().contains("does not exist"));
        let cap = choose_from(None, "", &paths).unwrap();
        assert_eq!(cap.accel, Accel::Tcg);
        assert_eq!(cap.max_vcpus, MAX_VCPUS);
        assert!(cap.host_cpus >= 1);
        assert!(cap.reason.contains("does not exist"), "{}", cap.reason);
        let e = choose_from(None, "kvm", &paths).unwrap_err();
        assert!(matches!(e, AccelError::KvmForcedButUnusable { .. }), "{e}");
        assert!(e.to_string().contains("remove the override"), "{e}");
        let e = choose_from(Some("kvm"), "tcg", &paths).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("KVM was requested (CORESCALE_ACCEL=kvm)"),
            "{e}"
        );
        assert_eq!(
            choose_from(Some("tcg"), "kvm", &paths).unwrap().accel,
            Accel::Tcg
        );
        assert!(choose_from(Some("xen"), "", &paths).is_err());
    }

    /// On this host: if /dev/kvm is kvm_pvm, the probe must say unusable and pick tcg.
    #[test]
    fn this_hosts_kvm() {
        let paths = HostPaths::default();
        let st = probe_kvm(&paths);
        let cap = choose_from(None, "", &paths).unwrap();
        if !st.usable() {
            assert_eq!(cap.accel, Accel::Tcg, "an unusable KVM falls back to tcg");
        }
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            match &st {
                KvmStatus::Unusable { reason, max_vcpus } => {
                    assert!(reason.contains("kvm_pvm"), "{reason}");
                    assert!(max_vcpus.unwrap_or(0) >= 1);
                }
                KvmStatus::Absent { reason } => assert!(reason.contains("cannot open"), "{reason}"),
                other => panic!("kvm_pvm must not count as usable: {other:?}"),
            }
        }
        eprintln!("KVM probe on this host: {st:?}");
    }
}
