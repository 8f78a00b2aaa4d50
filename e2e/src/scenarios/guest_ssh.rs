//! Logging in to a guest over SSH, as a user of a workload VM does: a throw-away ed25519
//! key, the system's `ssh` client, every call bounded. Used by the `workload` scenario.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The user cloud-init creates in the Debian image.
pub const USER: &str = "debian";
/// The longest one command may take.
const CALL: Duration = Duration::from_secs(60);

/// An SSH identity and the client that uses it.
pub struct Ssh {
    key: PathBuf,
}

impl Ssh {
    /// A new key pair in `dir`.
    pub async fn new(dir: &Path) -> Result<Self> {
        let key = dir.join("id_ed25519");
        let out = tokio::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "corescale-e2e", "-f"])
            .arg(&key)
            .output()
            .await
            .context("ssh-keygen not found: install openssh-client (scripts/install-deps.sh)")?;
        if !out.status.success() {
            bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Ssh { key })
    }

    /// The public key, one line.
    pub fn public_key(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.key.with_extension("pub"))?)
    }

    /// Run `cmd` in the guest; its stdout. Fails on a non-zero exit or after a minute.
    pub async fn run(&self, host: &str, port: u32, cmd: &str) -> Result<String> {
        let mut c = tokio::process::Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args([
                "-p",
                &port.to_string(),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                &format!("{USER}@{host}"),
                cmd,
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(CALL, c.output())
            .await
            .with_context(|| {
                format!(
                    "ssh {host}:{port} {cmd:?}: no answer in {} s",
                    CALL.as_secs()
                )
            })?
            .context("ssh not found: install openssh-client (scripts/install-deps.sh)")?;
        if !out.status.success() {
            bail!(
                "ssh {host}:{port} {cmd:?} exited {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Wait until a login works (sshd up, the key installed); `nproc`'s answer.
    pub async fn wait(&self, host: &str, port: u32, timeout: Duration) -> Result<String> {
        let t0 = Instant::now();
        loop {
            match self.run(host, port, "nproc").await {
                Ok(out) => return Ok(out),
                Err(e) if t0.elapsed() > timeout => {
                    return Err(e.context(format!("no SSH login in {} s", timeout.as_secs())))
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }
}

/// Busy jiffies (user, nice, system, irq, softirq, steal) of each `cpuN` line of /proc/stat.
pub fn busy_jiffies(stat: &str) -> Vec<(String, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            let busy = [0usize, 1, 2, 5, 6, 7]
                .iter()
                .filter_map(|i| v.get(*i))
                .sum();
            Some((name, busy))
        })
        .collect()
}

/// Busy cores of each online guest CPU over `window` (USER_HZ is 100 on Linux).
pub async fn busy_cores(ssh: &Ssh, host: &str, port: u32, window: Duration) -> Result<Vec<f64>> {
    let a = busy_jiffies(&ssh.run(host, port, "cat /proc/stat").await?);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let b = busy_jiffies(&ssh.run(host, port, "cat /proc/stat").await?);
    let secs = t0.elapsed().as_secs_f64();
    Ok(b.iter()
        .map(|(cpu, after)| {
            let before = a.iter().find(|(c, _)| c == cpu).map_or(0, |(_, j)| *j);
            #[allow(clippy::cast_precision_loss)]
            let j = after.saturating_sub(before) as f64;
            j / 100.0 / secs
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_jiffies_skip_idle_and_iowait() {
        let stat = "cpu  10 0 0 0 0 0 0 0 0 0\ncpu0 1 2 3 400 500 6 7 8 0 0\ncpu1 0 0 0 9 0 0 0 0 0 0\nintr 1\n";
        assert_eq!(
            busy_jiffies(stat),
            [
                ("cpu0".to_string(), 1 + 2 + 3 + 6 + 7 + 8),
                ("cpu1".to_string(), 0)
            ]
        );
    }
}
