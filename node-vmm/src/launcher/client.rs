//! The launcher's client, as the agent and the QEMU backend use it: one connection per
//! request.

use super::protocol::{ExitInfo, KillSignal, Request, Response, VmProcess};
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
            let mut line =
                serde_json::to_vec(req).map_err(|e| LauncherError::Protocol(e.to_string()))?;
            line.push(b'\n');
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
            serde_json::from_str::<Response>(&reply)
                .map_err(|e| LauncherError::Protocol(format!("{e}: {reply}")))
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
