//! Starting a VMM (in its state directory, with its log, as a child that dies with the
//! launcher) and reaping it when it exits.

use super::protocol::{ExitInfo, KillSignal, VmProcess};
use super::server::{Entry, Table};
use super::state::{
    check_name, dir_error, now_ms, private_dir, vm_dir, write_private, VmRecord, CONSOLE_SOCK,
    QEMU_LOG, QGA_SOCK, QMP_SOCK, VM_JSON,
};
use serde_json::Value;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use tokio::sync::{mpsc, watch};

pub(super) async fn spawn(
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
