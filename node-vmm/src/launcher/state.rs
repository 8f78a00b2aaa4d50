//! The per-VM state directories: `<state>/<namespace>/<name>/`, their files, the names
//! allowed in their paths, and the private (mode 0700/0600) way they are written.

use super::LauncherError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The spec and pid of a VM.
pub const VM_JSON: &str = "vm.json";
/// QMP socket.
pub const QMP_SOCK: &str = "qmp.sock";
/// Guest agent chardev socket.
pub const QGA_SOCK: &str = "qga.sock";
/// The guest's console output.
pub const SERIAL_LOG: &str = "serial.log";
/// The guest's console, interactive, for root on the node (x86; see `Machine::console_args`).
pub const CONSOLE_SOCK: &str = "console.sock";
/// The VMM's stdout and stderr.
pub const QEMU_LOG: &str = "qemu.log";

/// What `vm.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's spec as the agent sent it.
    pub spec: Value,
    /// The VMM's pid.
    pub pid: i32,
    /// Its command line.
    pub argv: Vec<String>,
    /// When it was spawned (ms since the epoch).
    pub started_unix_ms: u64,
}

/// `<state>/<namespace>/<name>`.
pub fn vm_dir(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    state_dir.join(namespace).join(name)
}

/// Read `vm.json` of a VM directory.
pub fn read_record(dir: &Path) -> Result<VmRecord, LauncherError> {
    let path = dir.join(VM_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| LauncherError::State {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| LauncherError::State {
        path: path.display().to_string(),
        message: format!("not a VM record: {e}"),
    })
}

/// Check a namespace or name before it becomes a path component: what Kubernetes allows
/// (lower-case alphanumerics, '-' and '.'), never '.', '..' or a leading '.'.
pub fn check_name(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {v:?} must be 1-253 lower-case letters, digits, '-' or '.', not starting with '.'"))
    }
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Create a directory (and missing parents, e.g. a VM's namespace directory, also 0700: other
/// users must not even list which VMs run) and set it to mode 0700.
pub(super) fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Why a per-VM directory cannot be made, naming the path in the way: a regular file where
/// the directory (or its namespace directory) should be gives the OS error "File exists" or
/// "Not a directory", which does not say which path to remove.
pub(super) fn dir_error(dir: &Path, e: &std::io::Error) -> String {
    let blocker = dir
        .ancestors()
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()));
    match blocker {
        Some(p) => format!(
            "cannot create {}: {} is not a directory (remove it)",
            dir.display(),
            p.display()
        ),
        None => format!("cannot create {}: {e}", dir.display()),
    }
}

/// Write a file atomically with mode 0600. Atomic against a crash of this process (the
/// rename), not against a power loss: the VMMs would not survive that either, so no fsync
/// sits in the resize path.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_state_dir() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "UPPER", "a b"] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
        for good in ["vm-1", "a.b", "x"] {
            assert!(check_name("name", good).is_ok(), "{good:?}");
        }
    }
}
