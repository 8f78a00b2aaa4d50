//! Fault scenarios `qemu-kill` and `delete-mid-resize`: the guest's QEMU killed mid-plug, and a
//! VM deleted while it resizes.

use super::support::signal;
use super::{Faults, BOOT, CONVERGE, NS};
use crate::{condition, Stack};
use anyhow::{ensure, Context as _, Result};
use std::time::{Duration, Instant};

/// QEMU is killed (SIGKILL) while it plugs: the agent notices within 2 s (Event
/// VmmExited, condition Running=False), restarts the guest per runStrategy with the
/// current spec.cpus, and leaves exactly one QEMU for the VM.
pub(super) async fn qemu_kill(s: &Stack, f: &mut Faults) -> Result<String> {
    let node = s.boot_one(NS, "crash", 8).await?;
    let (pid, _) = s.qemu(&node, NS, "crash").context("no QEMU")?;
    s.scale(NS, "crash", 3).await?;
    s.wait_plugging(NS, "crash").await;
    signal(pid, "KILL")?;
    f.inject();
    let killed = chrono::Utc::now();
    let killed_at = Instant::now();
    let vm = s
        .wait_vm(
            NS,
            "crash",
            "Running=False after the kill",
            Duration::from_secs(10),
            |v| {
                condition(v, "Running").is_some_and(|c| c.reason == "VmmExited")
                    || s.events(NS, "crash")
                        .is_ok_and(|e| e.iter().any(|(r, _)| r == "VmmExited"))
            },
        )
        .await?;
    let _ = vm;
    let ev_time = event_time(s, "crash", "VmmExited")?.context("no VmmExited event")?;
    let detect = (ev_time - killed).num_milliseconds();
    ensure!(detect <= 2000, "VmmExited {detect} ms after the kill");
    let note = s
        .events(NS, "crash")?
        .into_iter()
        .find(|(r, _)| r == "VmmExited")
        .map(|(_, n)| n)
        .unwrap_or_default();
    ensure!(
        note.contains("; console: "),
        "the VmmExited Event carries the console's last lines: {note}"
    );
    let vm = s.wait_online(NS, "crash", 3, BOOT).await?;
    let restarted = killed_at.elapsed().as_secs_f64();
    let (new_pid, _) = s
        .qemu(&node, NS, "crash")
        .context("no QEMU after restart")?;
    ensure!(new_pid != pid, "same QEMU pid after a kill");
    let procs = s.qemu_processes(NS, "crash");
    ensure!(
        procs == vec![new_pid],
        "QEMU processes for the VM: {procs:?}"
    );
    let ev = s.events(NS, "crash")?;
    ensure!(
        ev.iter().any(|(r, _)| r == "VmmRestarted"),
        "no VmmRestarted event: {ev:?}"
    );
    ensure!(
        condition(&vm, "Running").is_some_and(|c| c.status == "True"),
        "Running not True"
    );
    s.delete(NS, "crash").await?;
    f.recovered(restarted);
    Ok(format!(
        "noticed in {detect} ms; restarted with 3 vCPUs in {restarted:.1} s (pid {pid} -> {new_pid})"
    ))
}

/// When the newest Event with `reason` about `name` happened.
fn event_time(
    s: &Stack,
    name: &str,
    reason: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let (ok, out, err) = s.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        NS,
        "-o",
        "json",
        "--field-selector",
        &format!("regarding.name={name},reason={reason}"),
    ])?;
    ensure!(ok, "listing events: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["eventTime"].as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .max())
}

/// A VM deleted while a resize is under way: the resize step ends, the guest stops, the
/// finalizer goes, no QEMU is left.
pub(super) async fn delete_mid_resize(s: &Stack, f: &mut Faults) -> Result<String> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: dmr}\n\
                spec: {cpus: 1, topology: {sockets: 1, cores: 8, threads: 1}}\n";
    s.create(NS, yaml).await?;
    s.wait_online(NS, "dmr", 1, BOOT).await?;
    s.scale(NS, "dmr", 6).await?;
    s.wait_plugging(NS, "dmr").await;
    let t0 = Instant::now();
    s.delete(NS, "dmr").await?;
    f.inject();
    s.wait_gone(NS, "dmr", CONVERGE).await?;
    let left = s.qemu_processes(NS, "dmr");
    ensure!(left.is_empty(), "QEMU processes left: {left:?}");
    let gone = t0.elapsed().as_secs_f64();
    f.recovered(gone);
    Ok(format!(
        "deleted mid-resize; gone in {gone:.1} s, no QEMU left"
    ))
}
