//! Processes of this host, found through /proc: the QEMU processes the scenarios check a
//! guest's VMM by (still the same process, gone after a delete), and the CPU time the
//! benchmarks measure a process by.

use anyhow::{anyhow, Context as _, Result};

/// Field 22 (starttime) and the state of a `/proc/<pid>/stat` line; the command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn stat_fields(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let state = f.first()?.chars().next()?;
    Some((state, f.get(19)?.parse().ok()?))
}

/// The live (not zombie) `qemu-system-*` processes whose command line contains every one of
/// `needles`: each pid with its start time (clock ticks since boot, which tells a new
/// process from an old one with the same pid).
pub fn qemu_pids(needles: &[&str]) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let is_qemu = cmd
            .split(' ')
            .next()
            .and_then(|a| a.rsplit('/').next())
            .is_some_and(|b| b.starts_with("qemu-system"));
        if !is_qemu || !needles.iter().all(|n| cmd.contains(n)) {
            continue;
        }
        let Some((state, start_ticks)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(stat_fields)
        else {
            continue;
        };
        if state != 'Z' {
            out.push((pid, start_ticks));
        }
    }
    out
}

/// The clock ticks per second of `/proc/<pid>/stat`'s times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds process `pid` has used so far, `ticks` clock ticks a second.
pub fn cpu_seconds(pid: u32, ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name (which may hold spaces): state is field 3, so utime
    // (field 14) and stime (field 15) are the 12th and 13th after ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: field {} unreadable", i + 3))
    };
    Ok((num(11)? + num(12)?) / ticks)
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_name_with_spaces() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 9 0 123456 1000 10";
        assert_eq!(stat_fields(stat), Some(('S', 123_456)));
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn this_process_is_not_qemu() {
        let me = std::process::id().to_string();
        assert!(qemu_pids(&[&me]).iter().all(|(p, _)| p.to_string() != me));
    }
}
