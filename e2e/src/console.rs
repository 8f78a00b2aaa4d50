//! A client of a guest's interactive console (`<vm dir>/console.sock`, x86): types a shell
//! command into the test guest's console shell and returns what it printed.
//!
//! The console also carries kernel messages and the echo of what was typed, so a command's
//! output is framed by markers the guest's shell computes (`$((n+0))`): the echoed command
//! line holds the formula, never the marker itself.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

/// An attached console.
pub struct Console {
    path: PathBuf,
    stream: UnixStream,
    seq: u64,
}

impl Console {
    /// Attach to the console socket at `path` (retrying for up to `within` while QEMU
    /// creates it).
    pub async fn attach(path: &Path, within: Duration) -> Result<Self> {
        let deadline = Instant::now() + within;
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => {
                    return Ok(Console {
                        path: path.to_path_buf(),
                        stream,
                        seq: u64::from(std::process::id()) * 1000,
                    })
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("cannot attach to the console {}", path.display())
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Run `cmd` in the guest's console shell and return its output (lines without `\r`),
    /// waiting at most `within`.
    pub async fn run(&mut self, cmd: &str, within: Duration) -> Result<String> {
        self.seq += 1;
        let n = self.seq;
        let (begin, end) = (format!("CS_BEGIN_{n}\n"), format!("CS_END_{n}\n"));
        let line = format!("echo CS_BEGIN_$(({n}+0)); {cmd}; echo CS_END_$(({n}+0))\n");
        let deadline = Instant::now() + within;
        timeout_at(deadline, self.stream.write_all(line.as_bytes()))
            .await
            .with_context(|| format!("typing into {} timed out", self.path.display()))??;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let cleaned = seen.replace('\r', "");
            if let Some(b) = cleaned.find(&begin) {
                let after = &cleaned[b + begin.len()..];
                if let Some(e) = after.find(&end) {
                    return Ok(after[..e].to_string());
                }
            }
            let read = timeout_at(deadline, self.stream.read(&mut buf)).await;
            match read {
                Err(_) => bail!(
                    "the guest's console did not finish `{cmd}` within {} s; it printed: {:?}",
                    within.as_secs(),
                    tail(&cleaned, 600)
                ),
                Ok(Ok(0)) => bail!("the console {} closed", self.path.display()),
                Ok(Ok(k)) => seen.push_str(&String::from_utf8_lossy(&buf[..k])),
                Ok(Err(e)) => return Err(e).context("reading the console"),
            }
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Busy jiffies per online guest CPU from `/proc/stat` text: (cpu index, user + nice +
/// system + irq + softirq + steal).
pub fn busy_jiffies(proc_stat: &str) -> Vec<(u32, u64)> {
    proc_stat
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu = f.next()?.strip_prefix("cpu")?.parse::<u32>().ok()?;
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal ...
            (v.len() >= 8).then(|| (cpu, v[0] + v[1] + v[2] + v[5] + v[6] + v[7]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_jiffies_reads_per_cpu_lines_only() {
        let stat = "cpu  10 0 5 100 0 0 0 0 0 0\ncpu0 7 0 3 50 1 1 1 0 0 0\ncpu2 3 1 2 50 0 0 0 2 0 0\nintr 5\n[  1.0] cpu9 line noise\n";
        assert_eq!(busy_jiffies(stat), vec![(0, 12), (2, 8)]);
    }
}
