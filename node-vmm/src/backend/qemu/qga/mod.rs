//! QEMU guest agent (QGA) client over the isa-serial chardev socket.
//!
//! The guest side is `qemu-ga -m isa-serial -p /dev/ttyS1`; the host side is a
//! `-chardev socket,server=on` that QEMU connects to the guest's second UART. A serial line
//! has no framing and can hold garbage: bytes written before the agent opened the port,
//! a request half-written by a client that died, replies to requests of an earlier client.
//! So:
//!
//! * Before the first command (and after any timeout) the client resynchronises: it sends
//!   `0xFF` (the agent's JSON lexer resets on an invalid byte) followed by
//!   `guest-sync-delimited` with a fresh id, and skips everything until `{"return": id}`.
//!   The agent answers the `0xFF` itself with a parse error (no id), then `0xFF` and the
//!   sync reply; both the error and the delimiter are skipped.
//! * Every request carries an `id`; the agent (7.2 was checked) echoes it, so stale replies
//!   of timed-out requests and the agent's id-less parse errors are recognised and dropped.
//! * Garbage that is not JSON is skipped up to the next newline.
//!
//! The agent answers only while the guest runs: a paused guest gives timeouts, not errors.

use crate::secs;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

mod commands;

pub use commands::{slot_from_acpi_path, GuestLogicalProcessor};

/// Errors of the guest agent client.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum QgaError {
    /// The chardev socket could not be connected.
    #[error("cannot connect to the guest agent socket {path}: {message}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        message: String,
    },
    /// No answer in time (the guest is booting, paused, or runs no agent).
    #[error("the guest agent did not answer {command} within {seconds} s (is the guest running, with qemu-ga on its agent port?)")]
    Timeout {
        /// Command name.
        command: String,
        /// The deadline.
        seconds: f64,
    },
    /// The agent answered with an error.
    #[error("the guest agent refused {command} ({class}): {desc}")]
    Refused {
        /// Command name.
        command: String,
        /// QAPI error class.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The socket closed (QEMU exited).
    #[error("the guest agent socket closed (QEMU exited?)")]
    Closed,
    /// A reply of an unexpected shape.
    #[error("guest agent protocol: {0}")]
    Protocol(String),
}

/// Largest garbage run kept while looking for a JSON object.
const MAX_BUFFER: usize = 4 << 20;
/// How long connecting to the chardev socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A guest agent client. Not shareable: the serial line is one conversation, so the
/// owner serializes commands (the QEMU backend keeps it behind its per-VM mutex).
pub struct QgaClient {
    path: PathBuf,
    stream: Option<UnixStream>,
    buf: Vec<u8>,
    next_id: u64,
    synced: bool,
}

impl std::fmt::Debug for QgaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QgaClient")
            .field("path", &self.path)
            .field("connected", &self.stream.is_some())
            .field("synced", &self.synced)
            .finish()
    }
}

/// Take the next JSON object out of `buf`, skipping whitespace, `0xFF` delimiters and
/// garbage. `None` when more bytes are needed. Public so that the decoding can be fuzzed.
pub fn next_object(buf: &mut Vec<u8>) -> Option<Value> {
    loop {
        let start = buf
            .iter()
            .position(|&b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0xFF))
            .unwrap_or(buf.len());
        buf.drain(..start);
        if buf.is_empty() {
            return None;
        }
        if buf[0] != b'{' {
            // Garbage: drop through the next newline or delimiter, or all of it.
            let end = buf
                .iter()
                .position(|&b| b == b'\n' || b == 0xFF || b == b'{')
                .unwrap_or(buf.len());
            buf.drain(..end.max(1));
            continue;
        }
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let used = it.byte_offset();
                buf.drain(..used);
                return Some(v);
            }
            Some(Err(e)) if e.is_eof() => {
                // Incomplete: wait for more bytes, unless a newline or delimiter shows the
                // object was cut off (a torn write), in which case skip past it.
                match buf.iter().position(|&b| b == b'\n' || b == 0xFF) {
                    Some(cut) => {
                        buf.drain(..=cut);
                        continue;
                    }
                    None => return None,
                }
            }
            _ => {
                let end = buf
                    .iter()
                    .skip(1)
                    .position(|&b| b == b'\n' || b == 0xFF || b == b'{')
                    .map_or(buf.len(), |p| p + 1);
                buf.drain(..end);
            }
        }
    }
}

impl QgaClient {
    /// A client for the agent behind `path`; it connects on first use.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QgaClient {
            path: path.into(),
            stream: None,
            buf: Vec::new(),
            next_id: initial_id(),
            synced: false,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the line is connected and synchronised.
    pub fn is_synced(&self) -> bool {
        self.stream.is_some() && self.synced
    }

    /// Drop the connection (the next command reconnects and resynchronises).
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.synced = false;
        self.buf.clear();
    }

    async fn ensure_connected(&mut self) -> Result<(), QgaError> {
        if self.stream.is_none() {
            let connect = UnixStream::connect(&self.path);
            let s = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            }
            .map_err(|message| QgaError::Connect {
                path: self.path.display().to_string(),
                message,
            })?;
            self.stream = Some(s);
            self.buf.clear();
            self.synced = false;
        }
        Ok(())
    }

    /// Write a request, by `deadline`. A guest that does not read its end (no agent, or an
    /// agent that never reads) stops QEMU reading the socket, so a write can block for good
    /// once the socket's buffer is full: past the deadline the connection is dropped (its
    /// buffered bytes go with it, and a half-written request cannot reach the agent) and
    /// the command times out.
    async fn send(
        &mut self,
        bytes: &[u8],
        command: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), QgaError> {
        let Some(s) = self.stream.as_mut() else {
            return Err(QgaError::Closed);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "guest agent write failed");
                self.disconnect();
                Err(QgaError::Closed)
            }
            Err(_) => {
                tracing::debug!(
                    command,
                    "guest agent write timed out: the guest does not read its port"
                );
                self.disconnect();
                Err(QgaError::Timeout {
                    command: command.to_string(),
                    seconds: secs(timeout),
                })
            }
        }
    }

    /// Read more bytes until `deadline`. Ok(false) on timeout.
    async fn fill(&mut self, deadline: Instant) -> Result<bool, QgaError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let Some(s) = self.stream.as_mut() else {
            return Err(QgaError::Closed);
        };
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.disconnect();
                Err(QgaError::Closed)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > MAX_BUFFER {
                    let cut = self.buf.len() - MAX_BUFFER;
                    self.buf.drain(..cut);
                }
                Ok(true)
            }
        }
    }

    /// Resynchronise the line: connect if needed, then `0xFF` + `guest-sync-delimited`
    /// until the agent echoes the id, retrying every `attempt` until `timeout`.
    /// Returns the number of attempts.
    pub async fn sync(&mut self, timeout: Duration, attempt: Duration) -> Result<u32, QgaError> {
        let deadline = Instant::now() + timeout;
        let mut attempts = 0;
        loop {
            if let Err(e) = self.ensure_connected().await {
                if Instant::now() >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            attempts += 1;
            self.next_id += 1;
            let id = self.next_id;
            let mut req = vec![0xFFu8];
            req.extend_from_slice(
                format!(
                    "{{\"execute\": \"guest-sync-delimited\", \"arguments\": {{\"id\": {id}}}}}\n"
                )
                .as_bytes(),
            );
            self.send(&req, "guest-sync-delimited", deadline, timeout)
                .await?;
            let until = deadline.min(Instant::now() + attempt);
            loop {
                while let Some(obj) = next_object(&mut self.buf) {
                    if obj.get("return").and_then(Value::as_u64) == Some(id) {
                        self.synced = true;
                        return Ok(attempts);
                    }
                    tracing::trace!(%obj, "guest agent: skipped while resynchronising");
                }
                if !self.fill(until).await? {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(QgaError::Timeout {
                    command: "guest-sync-delimited".into(),
                    seconds: secs(timeout),
                });
            }
        }
    }

    /// Execute a command and return its raw `return` value.
    pub async fn execute_value(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let deadline = Instant::now() + timeout;
        if !self.is_synced() {
            self.sync(timeout, Duration::from_millis(500).min(timeout))
                .await?;
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut req = Map::new();
        req.insert("execute".into(), Value::String(command.to_string()));
        if let Some(a) = arguments {
            req.insert("arguments".into(), a);
        }
        req.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(req))
            .map_err(|e| QgaError::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');
        // Not synchronised while the request is on its way: a caller that drops this
        // future mid-write leaves part of it in the agent's parser, and the next command
        // must start with the resync's 0xFF, which makes the agent discard it.
        self.synced = false;
        self.send(&line, command, deadline, timeout).await?;
        self.synced = true;
        loop {
            while let Some(obj) = next_object(&mut self.buf) {
                if obj.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::trace!(%obj, "guest agent: skipped a reply that is not ours");
                    continue;
                }
                if let Some(r) = obj.get("return") {
                    return Ok(r.clone());
                }
                let e = obj.get("error").cloned().unwrap_or(Value::Null);
                return Err(QgaError::Refused {
                    command: command.to_string(),
                    class: e
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("GenericError")
                        .to_string(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .map_or_else(|| e.to_string(), str::to_string),
                });
            }
            if !self.fill(deadline).await? {
                // The reply may still come later; the next command resynchronises first.
                self.synced = false;
                return Err(QgaError::Timeout {
                    command: command.to_string(),
                    seconds: secs(timeout),
                });
            }
        }
    }

    /// Execute a command and decode its `return` value.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, QgaError> {
        let v = self.execute_value(command, arguments, timeout).await?;
        serde_json::from_value(v.clone())
            .map_err(|e| QgaError::Protocol(format!("unexpected reply to {command}: {e}: {v}")))
    }
}

/// Ids start at a per-process, per-time value so a reconnecting client (e.g. a restarted
/// agent) never mistakes an old client's stale reply for its own.
fn initial_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
    let mixed = low ^ (u64::from(std::process::id()) << 40);
    mixed & ((1u64 << 52) - 1) // stays exact in the agent's JSON numbers (doubles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_delimiters_errors_and_garbage() {
        // Exactly what qemu-ga 7.2 sent after "\xff" + guest-sync-delimited (id 42).
        let mut buf = b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": 42}\n".to_vec();
        let a = next_object(&mut buf).unwrap();
        assert!(a.get("error").is_some());
        let b = next_object(&mut buf).unwrap();
        assert_eq!(b, serde_json::json!({"return": 42}));
        assert_eq!(next_object(&mut buf), None);
        assert!(buf.is_empty());

        let mut buf = b"garbage here\n{\"return\": {}, \"id\": 13}\n{\"ret".to_vec();
        assert_eq!(
            next_object(&mut buf).unwrap(),
            serde_json::json!({"return": {}, "id": 13})
        );
        assert_eq!(
            next_object(&mut buf),
            None,
            "incomplete object waits for more bytes"
        );
        buf.extend_from_slice(b"urn\": 1, \"id\": 14}\n");
        assert_eq!(
            next_object(&mut buf).unwrap(),
            serde_json::json!({"return": 1, "id": 14})
        );

        // A torn object followed by a newline is dropped, the next one is read.
        let mut buf = b"{\"return\": {\"co\n{\"return\": 2, \"id\": 15}".to_vec();
        assert_eq!(
            next_object(&mut buf).unwrap(),
            serde_json::json!({"return": 2, "id": 15})
        );
        // Invalid JSON that starts with a brace.
        let mut buf = b"{nope}\n{\"return\": 3}".to_vec();
        assert_eq!(
            next_object(&mut buf).unwrap(),
            serde_json::json!({"return": 3})
        );
    }

    /// A fake agent on a socket: echoes during "boot", answers the 0xFF with an error,
    /// sends stale replies, and leaves one command unanswered.
    #[tokio::test]
    async fn resyncs_skips_stale_replies_and_recovers_from_timeouts() {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).split(b'\n');
            let mut syncs = 0;
            while let Ok(Some(raw)) = lines.next_segment().await {
                let starts_with_ff = raw.first() == Some(&0xFF);
                let body = if starts_with_ff { &raw[1..] } else { &raw[..] };
                let req: Value = serde_json::from_slice(body).unwrap();
                let cmd = req["execute"].as_str().unwrap().to_string();
                if cmd == "guest-sync-delimited" {
                    assert!(starts_with_ff, "a resync starts with 0xFF");
                    syncs += 1;
                    let id = req["arguments"]["id"].clone();
                    // The tty echoes what it gets (as while the guest boots); the first
                    // sync gets no answer: the agent is not up yet.
                    let mut out = raw.clone();
                    out.extend_from_slice(b"\r\n");
                    w.write_all(&out).await.unwrap();
                    if syncs == 1 {
                        continue;
                    }
                    w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n").await.unwrap();
                    let mut b = vec![0xFF];
                    b.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                    w.write_all(&b).await.unwrap();
                    continue;
                }
                let id = req["id"].as_u64().unwrap();
                match cmd.as_str() {
                    "guest-ping" => {
                        w.write_all(
                            format!("{{\"return\": {{}}, \"id\": {}}}\n", id - 7).as_bytes(),
                        )
                        .await
                        .unwrap();
                        w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                            .await
                            .unwrap();
                    }
                    "guest-get-vcpus" => {} // never answered
                    "guest-set-vcpus" => {
                        w.write_all(format!("{{\"id\": {id}, \"error\": {{\"class\": \"GenericError\", \"desc\": \"logical processor #0 can't be offlined\"}}}}\n").as_bytes()).await.unwrap();
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            syncs
        });
        let mut c = QgaClient::new(&path);
        let t = Duration::from_secs(5);
        let attempts = c.sync(t, Duration::from_millis(100)).await.unwrap();
        assert_eq!(
            attempts, 2,
            "the echoed first sync is not taken for an answer"
        );
        c.ping(t).await.unwrap();
        let e = c.get_vcpus(Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(
            e,
            QgaError::Timeout {
                command: "guest-get-vcpus".into(),
                seconds: 0.2
            }
        );
        assert!(!c.is_synced(), "a timeout forces a resync");
        let e = c.set_vcpus(&[(0, false)], t).await.unwrap_err();
        assert!(
            matches!(&e, QgaError::Refused { desc, .. } if desc.contains("can't be offlined")),
            "{e}"
        );
        c.ping(t).await.unwrap();
        c.disconnect();
        assert_eq!(
            server.await.unwrap(),
            3,
            "connect, and once more after the timeout"
        );
    }

    /// A command dropped while its request is half written (the guest reads its port
    /// slowly) leaves the line unsynchronised, so the next command resyncs first.
    #[tokio::test]
    async fn a_command_dropped_mid_write_forces_a_resync() {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).split(b'\n');
            let raw = lines.next_segment().await.unwrap().unwrap();
            let req: Value = serde_json::from_slice(&raw[1..]).unwrap();
            let id = &req["arguments"]["id"];
            w.write_all(format!("\u{ff}{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            // Then read nothing more: the socket buffer fills up.
            let _ = stop_rx.await;
        });
        let mut c = QgaClient::new(&path);
        c.sync(Duration::from_secs(5), Duration::from_millis(500))
            .await
            .unwrap();
        assert!(c.is_synced());
        let big = serde_json::json!({ "pad": "x".repeat(8 << 20) });
        let dropped = tokio::time::timeout(
            Duration::from_millis(200),
            c.execute_value("guest-ping", Some(big), Duration::from_secs(30)),
        )
        .await;
        assert!(dropped.is_err(), "the write cannot finish: nobody reads");
        assert!(
            !c.is_synced(),
            "a half-written request must make the next command resync"
        );
        let _ = stop_tx.send(());
        server.await.unwrap();
    }

    #[test]
    fn ids_fit_in_a_double() {
        let id = initial_id();
        assert!(id < (1u64 << 53));
    }
}
