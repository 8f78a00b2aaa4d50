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
//! > {"op":"spawn","namespace":"ns","name":"vm","argv":["qemu-system-x86_64","..."],"spec":{...}}
//! < {"ok":true,"vm":{"namespace":"ns","name":"vm","pid":4242,"running":true,...}}
//! > {"op":"wait","namespace":"ns","name":"vm","timeout_ms":2000}
//! < {"ok":true,"vm":{...,"running":false,"exit":{"code":0,"signal":null}}}
//! ```
//!
//! # Per-VM state
//!
//! `<state>/<namespace>/<name>/` (mode 0700): `vm.json` (the spec and the pid, written by
//! the launcher), `qmp.sock`, `qga.sock`, `console.sock` and `serial.log` (created by QEMU with umask 0177,
//! so mode 0600), `qemu.log` (the VMM's stdout and stderr).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Mutex};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/corescale/launcher.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/corescale/vms";
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
    fn nix(self) -> nix::sys::signal::Signal {
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
    fn op(&self) -> &'static str {
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
    fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
    fn vm(vm: Option<VmProcess>) -> Self {
        Response {
            ok: true,
            vm,
            ..Default::default()
        }
    }
}

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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Create a directory (and missing parents, e.g. a VM's namespace directory, also 0700: other
/// users must not even list which VMs run) and set it to mode 0700.
fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Why a per-VM directory cannot be made, naming the path in the way: a regular file where
/// the directory (or its namespace directory) should be gives the OS error "File exists" or
/// "Not a directory", which does not say which path to remove.
fn dir_error(dir: &Path, e: &std::io::Error) -> String {
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

struct Entry {
    proc: VmProcess,
    status: watch::Receiver<Option<ExitInfo>>,
    kill: mpsc::UnboundedSender<KillSignal>,
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

type Table = Arc<Mutex<HashMap<(String, String), Entry>>>;

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
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &table, &state_dir).await,
            Err(e) => Response::error(format!("not a launcher request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
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

async fn spawn(
    table: &Table,
    state_dir: &Path,
    namespace: String,
    name: String,
    argv: Vec<String>,
    spec: Value,
) -> Result<VmProcess, String> {
    check_name("namespace", &namespace)?;
    check_name("name", &name)?;
    let Some(program) = argv.first() else {
        return Err("argv is empty".into());
    };
    // Holding the table lock across the spawn makes two spawns of one VM impossible.
    let mut t = table.lock().await;
    let key = (namespace.clone(), name.clone());
    if let Some(e) = t.get(&key) {
        if e.status.borrow().is_none() {
            return Err(format!(
                "{namespace}/{name} already runs (pid {}); adopt it or stop it first",
                e.proc.pid
            ));
        }
    }
    let dir = vm_dir(state_dir, &namespace, &name);
    private_dir(&dir).map_err(|e| dir_error(&dir, &e))?;
    for f in [QMP_SOCK, QGA_SOCK, CONSOLE_SOCK, VM_JSON] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(QEMU_LOG))
        .map_err(|e| format!("cannot open {}: {e}", dir.join(QEMU_LOG).display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", dir.join(QEMU_LOG).display()))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    let launcher_pid = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (umask, prctl, getppid) through nix, which allocate
    // nothing and take no locks.
    unsafe {
        cmd.pre_exec(move || {
            // Sockets and files QEMU creates are then private to the launcher's user.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            // The VMM dies with the launcher, as it would with the launcher's container.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            // The launcher may have died before prctl: then do not start at all.
            if nix::unistd::getppid() != launcher_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("cannot start {program:?}: not found")
        } else {
            format!("cannot start {program:?}: {e}")
        }
    })?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| "the VMM exited before its pid was known".to_string())?;
    let started_unix_ms = now_ms();
    let record = VmRecord {
        spec,
        pid,
        argv: argv.clone(),
        started_unix_ms,
    };
    let bytes = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    if let Err(e) = write_private(&dir.join(VM_JSON), &bytes) {
        tracing::error!(error = %e, "cannot write vm.json");
    }
    let (status_tx, status_rx) = watch::channel(None);
    let (kill_tx, kill_rx) = mpsc::unbounded_channel();
    let proc = VmProcess {
        namespace: namespace.clone(),
        name: name.clone(),
        pid,
        started_unix_ms,
        running: true,
        exit: None,
        dir: dir.clone(),
    };
    tracing::info!(vm = %format!("{namespace}/{name}"), pid, program, "VMM started");
    tokio::spawn(reap(
        child,
        format!("{namespace}/{name}"),
        status_tx,
        kill_rx,
    ));
    t.insert(
        key,
        Entry {
            proc: proc.clone(),
            status: status_rx,
            kill: kill_tx,
        },
    );
    Ok(proc)
}

async fn reap(
    mut child: tokio::process::Child,
    vm: String,
    status: watch::Sender<Option<ExitInfo>>,
    mut kill: mpsc::UnboundedReceiver<KillSignal>,
) {
    let result = loop {
        tokio::select! {
            r = child.wait() => break r,
            Some(sig) = kill.recv() => {
                // The child is not reaped until wait() returns, so its pid cannot have
                // been reused.
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig.nix()) {
                        tracing::warn!(vm, pid, error = %e, "cannot signal the VMM");
                    }
                }
            }
        }
    };
    let info = match result {
        Ok(st) => ExitInfo {
            code: st.code(),
            signal: st.signal(),
        },
        Err(e) => {
            tracing::error!(vm, error = %e, "waiting for the VMM failed");
            ExitInfo {
                code: None,
                signal: None,
            }
        }
    };
    tracing::info!(vm, status = %info, "VMM exited");
    status.send_replace(Some(info));
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
    fn names_cannot_escape_the_state_dir() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "UPPER", "a b"] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
        for good in ["vm-1", "a.b", "x"] {
            assert!(check_name("name", good).is_ok(), "{good:?}");
        }
    }

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
