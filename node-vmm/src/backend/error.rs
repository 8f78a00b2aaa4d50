//! The backend's errors: one enum, each variant with a message that says what to fix, and
//! the underlying error kept as its source (shared, so a step's error can be cloned into
//! every step it failed).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use thiserror::Error;

/// An underlying error, kept whole for `source()` chains and shared so that
/// [`BackendError`] stays `Clone`; or a message of the backend's own where there is no
/// error underneath. Two causes are equal when they read the same.
#[derive(Clone)]
pub struct Cause(Arc<dyn StdError + Send + Sync + 'static>);

/// A cause that is only a message.
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Message {}

impl Cause {
    /// Keep `e` as the cause.
    pub fn of(e: impl StdError + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }

    /// A cause that is a message of the backend's own.
    pub fn msg(m: impl Into<String>) -> Self {
        Cause(Arc::new(Message(m.into())))
    }

    /// The underlying error, to downcast (e.g. to `std::io::Error`).
    pub fn get(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }

    /// Whether the message contains `needle` (for tests and callers that match on text).
    pub fn contains(&self, needle: &str) -> bool {
        self.to_string().contains(needle)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Transparent: the chain goes on with the underlying error's own source.
impl StdError for Cause {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

/// Errors of a backend, each with a message that says what to fix.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum BackendError {
    /// The VMM binary is not installed.
    #[error("VMM binary {binary:?} not found: {hint}")]
    MissingBinary {
        /// What was looked for.
        binary: String,
        /// How to install it.
        hint: String,
    },
    /// A boot path is missing or leaves the image directory.
    #[error("{field}: {message}")]
    BootPath {
        /// The spec field (spec.boot.kernel, spec.boot.initrd).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The VMM refused a command.
    #[error("QEMU refused {command} ({class}): {desc}")]
    Qmp {
        /// The QMP command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The guest did not finish an operation in time.
    #[error("the guest did not {what} vCPU slot {slot} within {seconds} s; it stays as it is and the next attempt may retry")]
    Timeout {
        /// "release" or "acknowledge" etc.
        what: &'static str,
        /// Slot index.
        slot: u32,
        /// Deadline in seconds.
        seconds: f64,
    },
    /// The guest agent failed or answered nonsense.
    #[error("guest agent: {0}")]
    GuestAgent(#[source] Cause),
    /// The VMM process is gone.
    #[error("the VMM of {0} is not running")]
    NotRunning(String),
    /// The launcher failed or is unreachable.
    #[error("launcher: {0}")]
    Launcher(#[source] Cause),
    /// The VMM sent something that is not valid protocol.
    #[error("protocol: {0}")]
    Protocol(#[source] Cause),
    /// The plan does not fit this VM (a bug in the caller, or a stale plan).
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// The per-VM state directory is damaged.
    #[error("state directory {path}: {message}")]
    State {
        /// The directory or file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The spec cannot run on this backend (the field names what to change).
    #[error("{field}: {message}")]
    InvalidSpec {
        /// The spec field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A disk, port or cloud-init field of the spec cannot be satisfied on this node (the
    /// field is indexed: spec.ports[1].hostPort).
    #[error("{field}: {message}")]
    Field {
        /// The spec field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The VMM process cannot create more vCPUs in its life (QEMU under TCG creates at
    /// most maxcpus vCPU threads per process, unplugged ones included).
    #[error("this QEMU process has created {used} of its lifetime budget of {max} vCPU threads (TCG cannot reuse an unplugged vCPU's thread), so it cannot plug {wanted} more; restart the guest (or run it under KVM) to plug again")]
    VcpuBudget {
        /// vCPU threads created so far (boot vCPUs included).
        used: u32,
        /// The budget: the VM's slot count.
        max: u32,
        /// vCPUs the refused step needed.
        wanted: u32,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: Cause,
    },
}

impl BackendError {
    /// A bounded category for metric labels (never the message itself).
    pub fn category(&self) -> &'static str {
        match self {
            BackendError::MissingBinary { .. } => "missing_binary",
            BackendError::BootPath { .. } => "boot_path",
            BackendError::Qmp { .. } => "vmm_refused",
            BackendError::Timeout { .. } => "timeout",
            BackendError::GuestAgent(_) => "guest_agent",
            BackendError::NotRunning(_) => "not_running",
            BackendError::Launcher(_) => "launcher",
            BackendError::Protocol(_) => "protocol",
            BackendError::InvalidPlan(_) => "invalid_plan",
            BackendError::State { .. } => "state",
            BackendError::InvalidSpec { .. } => "invalid_spec",
            BackendError::Field { .. } => "invalid_spec",
            BackendError::VcpuBudget { .. } => "vcpu_budget",
            BackendError::Io { .. } => "io",
        }
    }
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source: Cause::of(e),
        }
    }
}

impl From<crate::images::ImageError> for BackendError {
    fn from(e: crate::images::ImageError) -> Self {
        match e {
            crate::images::ImageError::BootPath { field, message } => {
                BackendError::BootPath { field, message }
            }
            crate::images::ImageError::DiskImage { index, message } => BackendError::Field {
                field: format!("spec.disks[{index}].image"),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_kept_as_sources_and_clone() {
        let e = BackendError::io(
            "creating /x",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        );
        assert_eq!(e.to_string(), "creating /x: denied");
        let copy = e.clone();
        assert_eq!(copy, e);
        let src = StdError::source(&e).expect("the I/O error is the source");
        assert_eq!(src.to_string(), "denied");
        let BackendError::Io { source, .. } = &e else {
            unreachable!()
        };
        let io = source
            .get()
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        let m = BackendError::GuestAgent(Cause::msg("no agent"));
        assert_eq!(m.to_string(), "guest agent: no agent");
        assert!(matches!(&m, BackendError::GuestAgent(c) if c.contains("no agent")));
        assert_ne!(m, BackendError::GuestAgent(Cause::msg("other")));
    }
}
