//! The launcher's protocol: its messages ([`Request`], [`Response`] and what they carry)
//! and their framing, one JSON object per line.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Signals the launcher sends on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum KillSignal {
    /// SIGTERM: QEMU shuts the machine down and exits.
    Term,
    /// SIGKILL.
    Kill,
}

impl KillSignal {
    pub(super) fn nix(self) -> nix::sys::signal::Signal {
        match self {
            KillSignal::Term => nix::sys::signal::Signal::SIGTERM,
            KillSignal::Kill => nix::sys::signal::Signal::SIGKILL,
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the launcher there?
    Ping,
    /// Start a VMM for a VM: `argv[0]` with `argv[1..]`, in the VM's state directory.
    Spawn {
        /// Namespace of the VM.
        namespace: String,
        /// Name of the VM.
        name: String,
        /// The command line.
        argv: Vec<String>,
        /// The VM's spec, stored in `vm.json` for a restarted agent.
        spec: Value,
    },
    /// Every VMM the launcher knows (running, or exited and not forgotten).
    List,
    /// One VMM.
    Status {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Wait until the VMM exits, at most `timeout_ms`.
    Wait {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// How long to wait.
        timeout_ms: u64,
    },
    /// Signal the VMM.
    Kill {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Which signal.
        signal: KillSignal,
    },
    /// Drop an exited VMM's record.
    Forget {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

impl Request {
    pub(super) fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Spawn { .. } => "spawn",
            Request::List => "list",
            Request::Status { .. } => "status",
            Request::Wait { .. } => "wait",
            Request::Kill { .. } => "kill",
            Request::Forget { .. } => "forget",
        }
    }
}

/// How a VMM exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// One number in the shell's convention: the code, or 128 + the signal.
    pub fn status(&self) -> Option<i32> {
        self.code.or_else(|| self.signal.map(|s| 128 + s))
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

/// A VMM process as the launcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Process id.
    pub pid: i32,
    /// When it was spawned (ms since the epoch).
    pub started_unix_ms: u64,
    /// Whether it runs (not reaped yet).
    pub running: bool,
    /// How it exited.
    #[serde(default)]
    pub exit: Option<ExitInfo>,
    /// Its state directory.
    pub dir: PathBuf,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VMM acted on (or None for an unknown VM in `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmProcess>,
    /// Every VMM (`list`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmProcess>,
}

impl Response {
    pub(super) fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
    pub(super) fn vm(vm: Option<VmProcess>) -> Self {
        Response {
            ok: true,
            vm,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::Kill {
            namespace: "ns".into(),
            name: "vm".into(),
            signal: KillSignal::Kill,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"op": "kill", "namespace": "ns", "name": "vm", "signal": "KILL"})
        );
        let back: Request =
            serde_json::from_str(r#"{"op":"wait","namespace":"a","name":"b","timeout_ms":5}"#)
                .unwrap();
        assert_eq!(
            back,
            Request::Wait {
                namespace: "a".into(),
                name: "b".into(),
                timeout_ms: 5
            }
        );
        assert_eq!(
            ExitInfo {
                code: None,
                signal: Some(9)
            }
            .status(),
            Some(137)
        );
    }
}
