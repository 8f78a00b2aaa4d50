//! The launcher's client, as the agent and the QEMU backend use it: one connection per
//! request.

use super::protocol::{
    decode_response, encode_request, understands, ExitInfo, KillSignal, Request, Response,
    VmProcess, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use super::LauncherError;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A client of the launcher. Cheap to clone; one connection per request.
#[derive(Debug, Clone)]
pub struct LauncherClient {
    socket: PathBuf,
    timeout: Duration,
}

impl LauncherClient {
    /// A client for the launcher on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        LauncherClient {
            socket: socket.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(&self, req: &Request, extra: Duration) -> Result<Response, LauncherError> {
        let path = self.socket.display().to_string();
        let unreachable = |message: String| LauncherError::Unreachable {
            path: path.clone(),
            message,
        };
        let fut = async {
            let conn = UnixStream::connect(&self.socket)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (r, mut w) = conn.into_split();
            let line = encode_request(req).map_err(|e| LauncherError::Protocol(e.to_string()))?;
            w.write_all(&line)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let mut lines = BufReader::new(r).lines();
            let reply = lines
                .next_line()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .ok_or_else(|| {
                    LauncherError::Protocol(
                        "the launcher closed the connection without a reply".into(),
                    )
                })?;
            decode_response(&reply).map_err(LauncherError::Protocol)
        };
        let resp = tokio::time::timeout(self.timeout + extra, fut)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no reply to {} within {:?}",
                    req.op(),
                    self.timeout + extra
                ))
            })??;
        // Checked before `ok`: a launcher that does not speak this client's version refuses
        // in its own, and the mismatch is the error to report.
        if !understands(resp.version) {
            return Err(LauncherError::Version {
                path,
                launcher: resp.version,
                min: MIN_PROTOCOL_VERSION,
                client: PROTOCOL_VERSION,
            });
        }
        if resp.ok {
            Ok(resp)
        } else {
            Err(LauncherError::Refused {
                op: req.op().into(),
                message: resp.error.unwrap_or_default(),
            })
        }
    }

    /// Check that the launcher answers.
    pub async fn ping(&self) -> Result<(), LauncherError> {
        self.call(&Request::Ping, Duration::ZERO).await.map(|_| ())
    }

    /// The protocol version the launcher answers this client in: [`PROTOCOL_VERSION`]
    /// from a launcher of this build, 1 from a launcher older than versions.
    pub async fn protocol_version(&self) -> Result<u32, LauncherError> {
        Ok(self.call(&Request::Ping, Duration::ZERO).await?.version)
    }

    /// Spawn a VMM.
    pub async fn spawn(
        &self,
        namespace: &str,
        name: &str,
        argv: Vec<String>,
        spec: Value,
    ) -> Result<VmProcess, LauncherError> {
        let req = Request::Spawn {
            namespace: namespace.into(),
            name: name.into(),
            argv,
            spec,
        };
        self.call(&req, Duration::ZERO)
            .await?
            .vm
            .ok_or_else(|| LauncherError::Protocol("spawn returned no process".into()))
    }

    /// Every VMM the launcher knows.
    pub async fn list(&self) -> Result<Vec<VmProcess>, LauncherError> {
        Ok(self.call(&Request::List, Duration::ZERO).await?.vms)
    }

    /// One VMM, or None if the launcher does not know it.
    pub async fn status(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VmProcess>, LauncherError> {
        Ok(self
            .call(
                &Request::Status {
                    namespace: namespace.into(),
                    name: name.into(),
                },
                Duration::ZERO,
            )
            .await?
            .vm)
    }

    /// Wait until the VMM exits or `timeout` passes; returns its state then.
    pub async fn wait(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<VmProcess>, LauncherError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let req = Request::Wait {
            namespace: namespace.into(),
            name: name.into(),
            timeout_ms,
        };
        Ok(self.call(&req, timeout).await?.vm)
    }

    /// Signal the VMM.
    pub async fn kill(
        &self,
        namespace: &str,
        name: &str,
        signal: KillSignal,
    ) -> Result<(), LauncherError> {
        self.call(
            &Request::Kill {
                namespace: namespace.into(),
                name: name.into(),
                signal,
            },
            Duration::ZERO,
        )
        .await
        .map(|_| ())
    }

    /// Drop an exited VMM's record.
    pub async fn forget(&self, namespace: &str, name: &str) -> Result<(), LauncherError> {
        self.call(
            &Request::Forget {
                namespace: namespace.into(),
                name: name.into(),
            },
            Duration::ZERO,
        )
        .await
        .map(|_| ())
    }
}

/// Wait up to `within` for the VMM to exit; its exit status, or None if it still runs
/// (or the launcher cannot tell).
pub(crate) async fn exit_of(
    client: &LauncherClient,
    namespace: &str,
    name: &str,
    within: Duration,
) -> Option<ExitInfo> {
    match client.wait(namespace, name, within).await {
        Ok(Some(vm)) if !vm.running => vm.exit,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake launcher that answers every request with `reply`, and the request lines it
    /// read.
    async fn fake_launcher(
        sock: &Path,
        reply: &'static str,
    ) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let listener = UnixListener::bind(sock).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (r, mut w) = conn.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = tx.send(line);
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                }
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_client_tells_an_older_launcher_from_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        // A launcher older than versions answers without one: version 1, understood.
        let old = dir.path().join("old.sock");
        let mut seen = fake_launcher(&old, r#"{"ok":true}"#).await;
        let c = LauncherClient::new(&old);
        assert_eq!(c.protocol_version().await.unwrap(), 1);
        c.ping().await.unwrap();
        let sent: serde_json::Value = serde_json::from_str(&seen.recv().await.unwrap()).unwrap();
        assert_eq!(sent["version"], PROTOCOL_VERSION);
        assert_eq!(sent["op"], "ping");

        // A newer launcher that refuses this client's version answers in its own: the
        // error names both versions, not the refusal's text.
        let newer = dir.path().join("newer.sock");
        let _seen = fake_launcher(
            &newer,
            r#"{"version":99,"ok":false,"error":"launcher protocol version mismatch"}"#,
        )
        .await;
        let e = LauncherClient::new(&newer).ping().await.unwrap_err();
        assert_eq!(
            e,
            LauncherError::Version {
                path: newer.display().to_string(),
                launcher: 99,
                min: MIN_PROTOCOL_VERSION,
                client: PROTOCOL_VERSION,
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("speaks version 99"), "{msg}");
        assert!(
            msg.contains(&format!(
                "this client speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
            )),
            "{msg}"
        );
    }
}
