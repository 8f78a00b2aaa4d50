//! The launcher's server: it binds the socket, answers each connection's requests, keeps
//! the table of VMM processes, and stops them all when it stops.

use super::process::spawn;
use super::protocol::{
    decode_request, encode_response, ExitInfo, KillSignal, Request, Response, VmProcess,
};
use super::state::private_dir;
use super::{LauncherArgs, LauncherError};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Mutex};

pub(super) struct Entry {
    pub(super) proc: VmProcess,
    pub(super) status: watch::Receiver<Option<ExitInfo>>,
    pub(super) kill: mpsc::UnboundedSender<KillSignal>,
}

impl Entry {
    fn snapshot(&self) -> VmProcess {
        let exit = *self.status.borrow();
        VmProcess {
            running: exit.is_none(),
            exit,
            ..self.proc.clone()
        }
    }
}

pub(super) type Table = Arc<Mutex<HashMap<(String, String), Entry>>>;

/// A bound launcher, ready to serve.
pub struct Launcher {
    listener: UnixListener,
    socket: PathBuf,
    state_dir: PathBuf,
    table: Table,
    stop_grace: Duration,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("socket", &self.socket)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl Launcher {
    /// Bind the socket (mode 0600; its directory is created with mode 0700) and create the
    /// state directory. A stale socket file is replaced; a live launcher on it is an error.
    pub async fn bind(
        socket: &Path,
        state_dir: &Path,
        stop_grace: Duration,
    ) -> Result<Self, LauncherError> {
        let sock_err = |message: String| LauncherError::Socket {
            path: socket.display().to_string(),
            message,
        };
        if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                private_dir(parent)
                    .map_err(|e| sock_err(format!("cannot create its directory: {e}")))?;
            }
        }
        if socket.exists() {
            if UnixStream::connect(socket).await.is_ok() {
                return Err(sock_err("another launcher is listening on it".into()));
            }
            std::fs::remove_file(socket)
                .map_err(|e| sock_err(format!("cannot remove the stale socket: {e}")))?;
        }
        let listener = UnixListener::bind(socket).map_err(|e| sock_err(e.to_string()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| sock_err(format!("cannot set mode 0600: {e}")))?;
        private_dir(state_dir).map_err(|e| LauncherError::State {
            path: state_dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Launcher {
            listener,
            socket: socket.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            table: Arc::new(Mutex::new(HashMap::new())),
            stop_grace,
        })
    }

    /// Serve until `shutdown` completes; then stop every VMM (SIGTERM, and SIGKILL after
    /// the grace period) and remove the socket.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        tracing::info!(socket = %self.socket.display(), state_dir = %self.state_dir.display(), "launcher listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok((conn, _)) => {
                        let table = Arc::clone(&self.table);
                        let state_dir = self.state_dir.clone();
                        tokio::spawn(async move { serve_conn(conn, table, state_dir).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "launcher accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        stop_all(&self.table, self.stop_grace).await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("launcher stopped");
    }
}

/// The `launcher` subcommand: serve until SIGTERM or SIGINT, then stop the VMMs.
pub async fn run_launcher(args: LauncherArgs) -> anyhow::Result<()> {
    let launcher = Launcher::bind(
        &args.socket,
        &args.state_dir,
        Duration::from_secs(args.stop_grace_seconds),
    )
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the VMMs"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping the VMMs"),
        }
    };
    launcher.serve(shutdown).await;
    Ok(())
}

async fn stop_all(table: &Table, grace: Duration) {
    let mut waits = Vec::new();
    {
        let t = table.lock().await;
        for e in t.values() {
            if e.status.borrow().is_none() {
                let _ = e.kill.send(KillSignal::Term);
                waits.push((e.status.clone(), e.kill.clone()));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for (mut st, kill) in waits {
        if tokio::time::timeout_at(deadline, st.wait_for(|s| s.is_some()))
            .await
            .is_err()
        {
            let _ = kill.send(KillSignal::Kill);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), st.wait_for(|s| s.is_some())).await;
        }
    }
}

async fn serve_conn(conn: UnixStream, table: Table, state_dir: PathBuf) {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        // Answered in the request's version; a refused version gets this launcher's own.
        let resp = match decode_request(&line) {
            Ok((version, req)) => Response {
                version,
                ..handle(req, &table, &state_dir).await
            },
            Err(e) => Response::error(e),
        };
        if w.write_all(&encode_response(&resp)).await.is_err() {
            break;
        }
    }
}

async fn handle(req: Request, table: &Table, state_dir: &Path) -> Response {
    match req {
        Request::Ping => Response::vm(None),
        Request::List => {
            let t = table.lock().await;
            let mut vms: Vec<VmProcess> = t.values().map(Entry::snapshot).collect();
            vms.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            Response {
                ok: true,
                vms,
                ..Default::default()
            }
        }
        Request::Status { namespace, name } => {
            let t = table.lock().await;
            Response::vm(t.get(&(namespace, name)).map(Entry::snapshot))
        }
        Request::Wait {
            namespace,
            name,
            timeout_ms,
        } => {
            let st = {
                let t = table.lock().await;
                match t.get(&(namespace.clone(), name.clone())) {
                    Some(e) => e.status.clone(),
                    None => return Response::error(format!("no VMM for {namespace}/{name}")),
                }
            };
            let mut st = st;
            let _ = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                st.wait_for(|s| s.is_some()),
            )
            .await;
            let t = table.lock().await;
            Response::vm(t.get(&(namespace, name)).map(Entry::snapshot))
        }
        Request::Kill {
            namespace,
            name,
            signal,
        } => {
            let t = table.lock().await;
            match t.get(&(namespace.clone(), name.clone())) {
                None => Response::error(format!("no VMM for {namespace}/{name}")),
                Some(e) => {
                    if e.status.borrow().is_none() {
                        let _ = e.kill.send(signal);
                    }
                    Response::vm(Some(e.snapshot()))
                }
            }
        }
        Request::Forget { namespace, name } => {
            let mut t = table.lock().await;
            let key = (namespace.clone(), name.clone());
            match t.get(&key) {
                Some(e) if e.status.borrow().is_none() => Response::error(format!(
                    "{namespace}/{name} is still running (pid {}); kill it first",
                    e.proc.pid
                )),
                _ => Response::vm(t.remove(&key).map(|e| e.snapshot())),
            }
        }
        Request::Spawn {
            namespace,
            name,
            argv,
            spec,
        } => match spawn(table, state_dir, namespace, name, argv, spec).await {
            Ok(vm) => Response::vm(Some(vm)),
            Err(e) => Response::error(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::{read_record, vm_dir, LauncherClient, QEMU_LOG};
    use serde_json::Value;
    use std::time::Instant;

    /// A real launcher with real child processes (`sleep`, `sh`): spawn, list, wait, kill,
    /// forget, the exit status and the modes of the files it creates.
    #[tokio::test]
    async fn spawns_reaps_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/launcher.sock");
        let state = dir.path().join("state");
        let l = Launcher::bind(&sock, &state, Duration::from_secs(2))
            .await
            .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(l.serve(async move {
            let _ = stop_rx.await;
        }));
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = LauncherClient::new(&sock);
        c.ping().await.unwrap();
        assert_eq!(
            c.protocol_version().await.unwrap(),
            crate::launcher::PROTOCOL_VERSION
        );
        // A request of a version this launcher does not speak is refused, in its own.
        {
            let newer = crate::launcher::PROTOCOL_VERSION + 1;
            let conn = UnixStream::connect(&sock).await.unwrap();
            let (r, mut w) = conn.into_split();
            w.write_all(format!("{{\"version\":{newer},\"op\":\"ping\"}}\n").as_bytes())
                .await
                .unwrap();
            let reply = BufReader::new(r)
                .lines()
                .next_line()
                .await
                .unwrap()
                .unwrap();
            let resp: Response = serde_json::from_str(&reply).unwrap();
            assert_eq!(resp.version, crate::launcher::PROTOCOL_VERSION);
            let e = resp.error.unwrap_or_default();
            assert!(
                !resp.ok && e.contains(&format!("the request is version {newer}")),
                "{e}"
            );
        }
        let vm = c
            .spawn(
                "ns",
                "a",
                vec![
                    "sh".into(),
                    "-c".into(),
                    "echo hi; touch made; exit 3".into(),
                ],
                serde_json::json!({"x": 1}),
            )
            .await
            .unwrap();
        let done = c
            .wait("ns", "a", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(!done.running);
        assert_eq!(
            done.exit,
            Some(ExitInfo {
                code: Some(3),
                signal: None
            })
        );
        let vdir = vm_dir(&state, "ns", "a");
        assert_eq!(
            std::fs::metadata(&vdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // The namespace directory too: other users cannot list the VMs.
        assert_eq!(
            std::fs::metadata(vdir.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(vdir.join("made"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "umask 0177"
        );
        assert_eq!(
            std::fs::read_to_string(vdir.join(QEMU_LOG)).unwrap(),
            "hi\n"
        );
        let rec = read_record(&vdir).unwrap();
        assert_eq!(
            (rec.pid, rec.spec.clone()),
            (vm.pid, serde_json::json!({"x": 1}))
        );

        let b = c
            .spawn("ns", "b", vec!["sleep".into(), "60".into()], Value::Null)
            .await
            .unwrap();
        let e = c
            .spawn("ns", "b", vec!["sleep".into(), "60".into()], Value::Null)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already runs"), "{e}");
        assert!(c
            .forget("ns", "b")
            .await
            .unwrap_err()
            .to_string()
            .contains("still running"));
        let list = c.list().await.unwrap();
        assert_eq!(
            list.iter()
                .map(|v| (v.name.as_str(), v.running))
                .collect::<Vec<_>>(),
            vec![("a", false), ("b", true)]
        );
        let t0 = Instant::now();
        c.kill("ns", "b", KillSignal::Kill).await.unwrap();
        let st = c
            .wait("ns", "b", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            st.exit,
            Some(ExitInfo {
                code: None,
                signal: Some(9)
            })
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(b.pid, st.pid);
        c.forget("ns", "b").await.unwrap();
        assert_eq!(c.status("ns", "b").await.unwrap(), None);

        let e = c
            .spawn("ns", "../x", vec!["true".into()], Value::Null)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("name \"../x\""), "{e}");
        let e = c
            .spawn("ns", "c", vec!["/nonexistent/qemu".into()], Value::Null)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");

        // Stopping the launcher stops what still runs.
        let _long = c
            .spawn("ns", "d", vec!["sleep".into(), "60".into()], Value::Null)
            .await
            .unwrap();
        let pid = c.status("ns", "d").await.unwrap().unwrap().pid;
        stop_tx.send(()).unwrap();
        server.await.unwrap();
        assert!(!sock.exists());
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "child {pid} reaped"
        );
        let e = c.ping().await.unwrap_err();
        assert!(
            e.to_string().contains("is `corescale-node-vmm launcher"),
            "{e}"
        );
    }
}
