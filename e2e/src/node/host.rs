//! What the node's host shows, read without the API server: the QEMU process of a VM
//! (host pid and start time, so "the same process" means the same), the guest's own count
//! of online CPUs through its console socket, containerd's tasks, and the CPU quota of the
//! cgroup a process runs in.
//!
//! The chart keeps per-VM state in a hostPath (`nodeVmm.stateDir`, by default
//! `/var/lib/corescale/vms`), so root on the node reaches a guest's console there.

use crate::console::Console;
use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The chart's per-VM state directory on the node (`nodeVmm.stateDir`'s default).
pub const STATE_DIR: &str = "/var/lib/corescale/vms";

/// One process, told apart from a later one that reuses its pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qemu {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// The VM's state directory on the node.
pub fn vm_dir(ns: &str, name: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(ns).join(name)
}

/// The live (not zombie) QEMU processes of this host whose command line names the VM's
/// state directory under [`STATE_DIR`].
pub fn qemu_of(ns: &str, name: &str) -> Vec<Qemu> {
    let needle = format!("{}/", vm_dir(ns, name).display());
    crate::procs::qemu_pids(&[&needle])
        .into_iter()
        .map(|(pid, start_ticks)| Qemu { pid, start_ticks })
        .collect()
}

/// The one QEMU process of the VM on this host.
pub fn one_qemu(ns: &str, name: &str) -> Result<Qemu> {
    let q = qemu_of(ns, name);
    ensure!(
        q.len() == 1,
        "expected one QEMU process for {ns}/{name} under {STATE_DIR}, found {q:?}"
    );
    Ok(q[0])
}

/// Wait until the VM has exactly one QEMU process that `pred` accepts.
pub async fn wait_qemu(
    ns: &str,
    name: &str,
    what: &str,
    within: Duration,
    pred: impl Fn(&[Qemu]) -> bool,
) -> Result<Vec<Qemu>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let q = qemu_of(ns, name);
        if pred(&q) {
            return Ok(q);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{ns}/{name}: QEMU not {what} within {} s; processes now: {q:?}",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Count the CPUs of a kernel CPU list (`/sys/devices/system/cpu/online`: "0-2,5").
pub fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty()
        || !list
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-' || b == b',')
    {
        return None;
    }
    let mut n = 0u32;
    for part in list.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// The guest's own count of online CPUs: `/sys/devices/system/cpu/online` read in its
/// console shell (the test guest runs one on its console). Independent of the guest agent
/// that status comes from.
pub async fn guest_online_cpus(ns: &str, name: &str) -> Result<u32> {
    let sock = vm_dir(ns, name).join(crate::node::CONSOLE_SOCK);
    let mut c = Console::attach(&sock, Duration::from_secs(10)).await?;
    // A guest that just booted may still be starting its console shell, which then loses
    // the start of what is typed: ask again (three tries of 10 s).
    let mut last = None;
    for _ in 0..3 {
        match c
            .run(
                "cat /sys/devices/system/cpu/online",
                Duration::from_secs(10),
            )
            .await
        {
            // Kernel messages may share the console: the CPU list is the last line that is one.
            Ok(out) => {
                return out
                    .lines()
                    .rev()
                    .find_map(count_cpu_list)
                    .with_context(|| format!("no CPU list in the guest's answer {out:?}"))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("three tries")).context("the guest's console shell did not answer")
}

/// Send a signal to a container's task through containerd (namespace k8s.io), as a crash
/// or the OOM killer would end it: the kubelet sees the container exit and restarts it.
pub fn kill_container(socket: &str, container_id: &str, signal: &str) -> Result<()> {
    let out = Command::new("ctr")
        .args(["--address", socket, "-n", "k8s.io", "tasks", "kill", "-s"])
        .args([signal, container_id])
        .output()
        .context("running ctr (apt-get install containerd)")?;
    ensure!(
        out.status.success(),
        "ctr tasks kill -s {signal} {container_id}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Give an image of the node's containerd a second name (an "upgrade" to the same bits).
pub fn tag_image(socket: &str, from: &str, to: &str) -> Result<()> {
    let out = Command::new("ctr")
        .args([
            "--address",
            socket,
            "-n",
            "k8s.io",
            "images",
            "tag",
            "--force",
        ])
        .args([from, to])
        .output()
        .context("running ctr (apt-get install containerd)")?;
    ensure!(
        out.status.success(),
        "ctr images tag {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The cgroup v1 `cpu` directory (or the v2 directory) a process is in, from
/// `/proc/<pid>/cgroup`.
pub fn cpu_cgroup(pid: i32) -> Result<(PathBuf, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        if let (Some(ctrls), Some(path)) = (ctrls, path) {
            if ctrls.split(',').any(|c| c == "cpu") {
                let base = if ctrls == "cpu" { "cpu" } else { ctrls };
                return Ok((PathBuf::from(format!("/sys/fs/cgroup/{base}{path}")), false));
            }
        }
    }
    let v2 = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cpu controller in /proc/<pid>/cgroup")?;
    Ok((PathBuf::from(format!("/sys/fs/cgroup{v2}")), true))
}

/// The CPU quota of a cgroup directory in millicores (None: unlimited).
pub fn quota_millis(dir: &Path, v2: bool) -> Result<Option<u64>> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let (quota, period) = if v2 {
        let max = read("cpu.max")?;
        let mut it = max.split_whitespace();
        (
            it.next().unwrap_or("max").to_string(),
            it.next().unwrap_or("100000").to_string(),
        )
    } else {
        (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?)
    };
    let (quota, period) = (quota.trim(), period.trim());
    if quota == "max" || quota.starts_with('-') {
        return Ok(None);
    }
    let q: u64 = quota.parse()?;
    let p: u64 = period.parse()?;
    Ok(Some(q * 1000 / p.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_ranges_and_singles() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-2\n"), Some(3));
        assert_eq!(count_cpu_list("0-1,3,5-6"), Some(5));
        assert_eq!(count_cpu_list("[   3.1] CPU1 has been hot-added"), None);
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }
}
