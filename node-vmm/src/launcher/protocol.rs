//! The launcher's protocol: its messages ([`Request`], [`Response`] and what they carry),
//! their version, and their framing, one JSON object per line.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// The launcher protocol this build speaks. Version 1 is the protocol as it was before
/// messages carried a version: a message without `version` is version 1. Version 2 adds
/// `version` to every request and response and is otherwise version 1, so a build of
/// either side still talks with a peer of version 1, and tells it apart.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build understands: a launcher answers requests of
/// versions `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` (in the request's version), a client
/// accepts responses of those.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Whether this build understands messages of protocol `version`.
pub(super) fn understands(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// The protocol version of a message: its `version` field, 1 when it has none.
fn version_of(msg: &Value) -> Result<u32, String> {
    match msg.get("version") {
        None => Ok(1),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("version {v} is not a protocol version (1, 2, ...)")),
    }
}

/// A request on the wire: the request's fields and the version it is written in.
#[derive(Serialize)]
struct VersionedRequest<'a> {
    version: u32,
    #[serde(flatten)]
    request: &'a Request,
}

/// One request as a line of this build's protocol version.
pub(super) fn encode_request(request: &Request) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(&VersionedRequest {
        version: PROTOCOL_VERSION,
        request,
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Decode one request line: the version it is written in and the request, or why it cannot
/// be answered (the error of the response), naming both versions when they do not match.
pub(super) fn decode_request(line: &str) -> Result<(u32, Request), String> {
    let msg: Value =
        serde_json::from_str(line).map_err(|e| format!("not a launcher request: {e}"))?;
    let version = version_of(&msg)?;
    if !understands(version) {
        return Err(format!(
            "launcher protocol version mismatch: the request is version {version}, this launcher speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; run the launcher of the agent's release (replacing the launcher stops its guests)"
        ));
    }
    // Request ignores the fields it does not know, `version` among them.
    let request =
        serde_json::from_value(msg).map_err(|e| format!("not a launcher request: {e}"))?;
    Ok((version, request))
}

/// One response as a line.
pub(super) fn encode_response(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}

/// Decode one response line (of any version: the caller checks [`Response::version`]).
pub(super) fn decode_response(line: &str) -> Result<Response, String> {
    serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))
}

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The protocol version it is written in: the request's, when the launcher understands
    /// it, else the launcher's own (and the response is an error that says so). 1 when
    /// absent (a launcher of version 1).
    #[serde(default = "version_1")]
    pub version: u32,
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

fn version_1() -> u32 {
    1
}

impl Default for Response {
    /// An empty refusal in this build's protocol version.
    fn default() -> Self {
        Response {
            version: PROTOCOL_VERSION,
            ok: false,
            error: None,
            vm: None,
            vms: Vec::new(),
        }
    }
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

    #[test]
    fn requests_carry_their_version_and_unversioned_ones_are_version_1() {
        let line = encode_request(&Request::Status {
            namespace: "ns".into(),
            name: "vm".into(),
        })
        .unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        let sent: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"version": PROTOCOL_VERSION, "op": "status", "namespace": "ns", "name": "vm"})
        );
        // What this build sends, it answers, in the request's version.
        let (v, req) = decode_request(std::str::from_utf8(&line).unwrap()).unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert!(matches!(req, Request::Status { .. }));
        let ping = encode_request(&Request::Ping).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&ping).unwrap(),
            serde_json::json!({"version": PROTOCOL_VERSION, "op": "ping"})
        );
        // A launcher of version 1 decodes the line straight into a Request, which ignores
        // the `version` it does not know.
        for line in [&ping, &line] {
            assert!(serde_json::from_slice::<Request>(line).is_ok());
        }
        // An agent of version 1 sends no version.
        assert_eq!(decode_request(r#"{"op":"ping"}"#), Ok((1, Request::Ping)));
        assert_eq!(decode_request(r#"{"op":"list"}"#).unwrap().0, 1);
        // A launcher of version 1 answers without one.
        let old = decode_response(r#"{"ok":true}"#).unwrap();
        assert_eq!((old.version, old.ok), (1, true));
        assert!(understands(old.version));
        // This build's responses say which version they are in.
        let resp = Response::vm(None);
        let back = decode_response(std::str::from_utf8(&encode_response(&resp)).unwrap()).unwrap();
        assert_eq!(back.version, PROTOCOL_VERSION);
    }

    #[test]
    fn a_request_of_another_version_is_refused_naming_both() {
        let newer = PROTOCOL_VERSION + 1;
        // A newer agent may send ops this launcher does not know: the version is checked
        // first, so the refusal says what is wrong.
        let e = decode_request(&format!(r#"{{"version":{newer},"op":"frobnicate"}}"#)).unwrap_err();
        assert!(e.contains("version mismatch"), "{e}");
        assert!(
            e.contains(&format!("the request is version {newer}")),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "this launcher speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
            )),
            "{e}"
        );
        for bad in [
            r#"{"version":0,"op":"ping"}"#,
            r#"{"version":"2","op":"ping"}"#,
        ] {
            let e = decode_request(bad).unwrap_err();
            assert!(e.contains("version"), "{bad}: {e}");
        }
        assert!(decode_request("{nope")
            .unwrap_err()
            .contains("not a launcher request"));
    }
}
