//! The launcher: a small server that owns the VMM processes of a node.
//!
//! A container's processes all die when it restarts, so the VMMs must not be children of
//! the agent: the agent asks the launcher (another container of the same pod, which is
//! small and rarely changes) to spawn them. The launcher keeps them as its own children,
//! reaps them, remembers their exit status, lists them, signals them. A restarted agent
//! finds its guests again through [`LauncherClient::list`] and the per-VM directories.
//!
//! The VMMs die with the launcher (`PR_SET_PDEATHSIG`), as they would with its container:
//! replacing the launcher stops its guests.
//!
//! # Protocol
//!
//! JSON lines over a unix socket (mode 0600): one [`Request`] per line, one [`Response`]
//! line back, any number per connection. `wait` blocks its connection until the VMM exits
//! or the timeout passes.
//!
//! ```text
//! > {"version":2,"op":"spawn","namespace":"ns","name":"vm","argv":["qemu-system-x86_64","..."],"spec":{...}}
//! < {"version":2,"ok":true,"vm":{"namespace":"ns","name":"vm","pid":4242,"running":true,...}}
//! > {"version":2,"op":"wait","namespace":"ns","name":"vm","timeout_ms":2000}
//! < {"version":2,"ok":true,"vm":{...,"running":false,"exit":{"code":0,"signal":null}}}
//! ```
//!
//! Every message carries the protocol version it is written in ([`PROTOCOL_VERSION`]);
//! one without `version` is version 1, the protocol before versions were sent. The agent
//! and the launcher are upgraded separately (replacing the launcher stops its guests), so
//! each side accepts the versions from [`MIN_PROTOCOL_VERSION`] up to its own: the
//! launcher answers a request in the request's version and refuses a newer one with an
//! error that names both; the client refuses a response in a version it does not know
//! with [`LauncherError::Version`]. A launcher of version 1 ignores the `version` field of
//! a newer agent's requests and answers without one, which the agent reads as version 1.
//!
//! # Per-VM state
//!
//! `<state>/<namespace>/<name>/` (mode 0700): `vm.json` (the spec and the pid, written by
//! the launcher), `qmp.sock`, `qga.sock`, `console.sock` and `serial.log` (created by QEMU with umask 0177,

mod client;
mod process;
mod protocol;
mod server;
mod state;

pub(crate) use client::exit_of;
pub use client::LauncherClient;
pub use protocol::{
    ExitInfo, KillSignal, Request, Response, VmProcess, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use server::{run_launcher, Launcher};
pub(crate) use state::write_private;
pub use state::{
    check_name, read_record, vm_dir, VmRecord, CONSOLE_SOCK, QEMU_LOG, QGA_SOCK, QMP_SOCK,
    SERIAL_LOG, VM_JSON,
};

use std::path::PathBuf;
use thiserror::Error;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/corescale/launcher.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/corescale/vms";

/// Errors of the launcher and its client.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LauncherError {
    /// The socket could not be set up.
    #[error("launcher socket {path}: {message}")]
    Socket {
        /// Socket path.
        path: String,
        /// What failed.
        message: String,
    },
    /// The client could not reach the launcher.
    #[error("cannot reach the launcher at {path}: {message}; is `corescale-node-vmm launcher --socket {path}` running?")]
    Unreachable {
        /// Socket path.
        path: String,
        /// OS error.
        message: String,
    },
    /// The launcher refused a request.
    #[error("the launcher refused {op}: {message}")]
    Refused {
        /// The request's op.
        op: String,
        /// Why.
        message: String,
    },
    /// The launcher answered in a protocol version this client does not speak.
    #[error("launcher protocol version mismatch: the launcher at {path} speaks version {launcher}, this client speaks versions {min} to {client}; run the agent and the launcher of one release")]
    Version {
        /// Socket path.
        path: String,
        /// The version of the launcher's response.
        launcher: u32,
        /// The oldest version this client understands.
        min: u32,
        /// This client's version.
        client: u32,
    },
    /// A message that is not valid protocol.
    #[error("launcher protocol: {0}")]
    Protocol(String),
    /// A per-VM directory or file is unusable.
    #[error("state directory {path}: {message}")]
    State {
        /// Directory or file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Command-line arguments of `corescale-node-vmm launcher`.
#[derive(Debug, Clone, clap::Args)]
pub struct LauncherArgs {
    /// Unix socket to listen on (created with mode 0600).
    #[arg(long, env = "CORESCALE_LAUNCHER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Directory of the per-VM state directories (`<state-dir>/<namespace>/<name>/`).
    #[arg(long, env = "CORESCALE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Seconds VMMs get to exit after SIGTERM when the launcher stops, before SIGKILL.
    #[arg(long, default_value_t = 10)]
    pub stop_grace_seconds: u64,
}
