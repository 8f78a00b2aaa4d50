//! `corescale-node-vmm console <namespace>/<name>`: attach a terminal to a guest's serial
//! console on this node (x86: the console socket beside `serial.log`). Run it in the node-vmm
//! pod: `kubectl exec -it -n corescale-system <node-vmm pod> -c launcher -- corescale-node-vmm
//! console demo/web`. The last lines of `serial.log` are printed first; `Ctrl-]` detaches.
//! A terminal on stdin is put in raw mode (keys go to the guest as typed) and restored on exit.

use crate::launcher::{check_name, vm_dir, CONSOLE_SOCK, SERIAL_LOG};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The byte `Ctrl-]` sends: it detaches (as in telnet and virsh console).
pub const DETACH: u8 = 0x1d;

/// Errors of the console command.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The target is not `<namespace>/<name>`.
    #[error("console: {0}")]
    Target(String),
    /// No console socket: the VM does not run here, or its machine has none.
    #[error("console: no console socket at {path}: {why} (is {target} running on this node? POWER guests have only serial.log)")]
    NoSocket {
        /// The socket path.
        path: String,
        /// `namespace/name`.
        target: String,
        /// The OS error.
        why: String,
    },
    /// Reading or writing failed.
    #[error("console: {0}")]
    Io(#[from] std::io::Error),
}

/// Arguments of `console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// The VM, as `<namespace>/<name>`.
    pub target: String,
    /// Directory of the per-VM state directories (the launcher's).
    #[arg(long, env = "CORESCALE_STATE_DIR", default_value = crate::launcher::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Lines of serial.log to print before attaching.
    #[arg(long, default_value_t = 20)]
    pub tail: usize,
}

/// The VM directory of `<namespace>/<name>`, names checked.
pub fn target_dir(state: &Path, target: &str) -> Result<PathBuf, ConsoleError> {
    let (ns, name) = target
        .split_once('/')
        .ok_or_else(|| ConsoleError::Target(format!("{target:?} is not <namespace>/<name>")))?;
    check_name("namespace", ns).map_err(ConsoleError::Target)?;
    check_name("name", name).map_err(ConsoleError::Target)?;
    Ok(vm_dir(state, ns, name))
}

/// The last `n` lines of a file (empty when it cannot be read).
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Copy `input` to the console and the console to `output` until `input` ends, the user
/// types [`DETACH`], or the guest's side closes.
pub async fn pump<S, I, O>(sock: S, mut input: I, mut output: O) -> Result<(), ConsoleError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let (mut from_guest, mut to_guest) = tokio::io::split(sock);
    let keys = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            match buf[..n].iter().position(|b| *b == DETACH) {
                Some(i) => {
                    to_guest.write_all(&buf[..i]).await?;
                    return Ok(());
                }
                None => to_guest.write_all(&buf[..n]).await?,
            }
        }
    };
    let screen = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = from_guest.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            output.write_all(&buf[..n]).await?;
            output.flush().await?;
        }
    };
    tokio::select! {
        r = keys => r?,
        r = screen => r?,
    }
    Ok(())
}

/// Raw mode on a terminal, restored when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?; // not a terminal: leave it as it is
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = nix::sys::termios::tcsetattr(
            stdin.as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Run the console command.
pub async fn run(args: ConsoleArgs) -> Result<(), ConsoleError> {
    let dir = target_dir(&args.state_dir, &args.target)?;
    let path = dir.join(CONSOLE_SOCK);
    let sock =
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| ConsoleError::NoSocket {
                path: path.display().to_string(),
                target: args.target.clone(),
                why: e.to_string(),
            })?;
    let tail = last_lines(&dir.join(SERIAL_LOG), args.tail);
    if !tail.is_empty() {
        println!("{tail}");
    }
    eprint!("[connected to {}; Ctrl-] detaches]\r\n", args.target);
    let raw = RawMode::enter();
    let r = pump(sock, tokio::io::stdin(), tokio::io::stdout()).await;
    drop(raw);
    eprintln!("\r\n[detached from {}]", args.target);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_reach_the_guest_output_reaches_the_screen_and_ctrl_bracket_detaches() {
        let (ours, mut guest) = tokio::io::duplex(1024);
        let (mut user, input) = tokio::io::duplex(1024);
        let (output, mut screen) = tokio::io::duplex(1024);
        let task = tokio::spawn(pump(ours, input, output));
        guest.write_all(b"login: ").await.unwrap();
        let mut buf = [0u8; 7];
        screen.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"login: ");
        user.write_all(b"root\r").await.unwrap();
        let mut got = [0u8; 5];
        guest.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"root\r");
        // Ctrl-] ends the session; what came before it on the same read still goes.
        user.write_all(&[b'x', DETACH, b'y']).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("Ctrl-] detaches")
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        guest.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"x", "nothing after Ctrl-] is sent");
    }

    #[test]
    fn targets_are_namespace_slash_name() {
        let d = target_dir(Path::new("/state"), "demo/web").unwrap();
        assert_eq!(d, Path::new("/state/demo/web"));
        for bad in ["web", "demo/../x", "../x/y", "demo/"] {
            assert!(target_dir(Path::new("/state"), bad).is_err(), "{bad}");
        }
    }
}
