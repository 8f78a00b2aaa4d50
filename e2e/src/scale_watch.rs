//! The scale benchmark's view of its VMs: a watch keeps each VM's phase, node and vCPUs,
//! and [`wait_all`] times how long until every VM is in a given state.

use crate::Stack;
use anyhow::{bail, Result};
use corescale_api::{Phase, VirtualMachine};
use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the benchmark reads of one VM.
#[derive(Clone, Default)]
pub struct View {
    pub phase: Option<Phase>,
    pub node: Option<String>,
    pub spec_cpus: u32,
    pub status_cpus: u32,
}

/// Every VM of a namespace by name, as last seen.
pub type Views = Arc<Mutex<HashMap<String, View>>>;

/// Watch the VMs of `ns` in the background.
pub fn watch_ns(s: &Stack, ns: &str) -> Views {
    let views: Views = Arc::default();
    let api = s.vms(ns);
    let v = views.clone();
    tokio::spawn(async move {
        let mut st = std::pin::pin!(watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects());
        while let Some(ev) = st.next().await {
            let Ok(vm): Result<VirtualMachine, _> = ev else {
                continue;
            };
            let status = vm.status.as_ref();
            let view = View {
                phase: status.and_then(|s| s.phase),
                node: status.and_then(|s| s.node_name.clone()),
                spec_cpus: vm.spec.cpus,
                status_cpus: status.and_then(|s| s.cpus).unwrap_or(0),
            };
            v.lock().expect("not poisoned").insert(vm.name_any(), view);
        }
    });
    views
}

/// How long a wait for all VMs took.
#[derive(Clone, Copy, Debug)]
pub struct Waited {
    /// Seconds until all held.
    pub all: f64,
    /// Seconds until half held.
    pub half: f64,
    /// Seconds until 90 % held.
    pub ninety: f64,
    /// The integral of the number that held over the wait, in VM-seconds (sampled every
    /// 20 ms): how long VMs were already in the state while the others got there.
    pub vm_seconds: f64,
}

/// Wait until `pred` holds for all `n` VMs, timed from `t0`; at most 600 s.
pub async fn wait_all(
    views: &Views,
    n: usize,
    t0: Instant,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> Result<Waited> {
    let (mut half, mut ninety) = (None, None);
    let (mut vm_seconds, mut last) = (0.0, 0.0);
    let deadline = Duration::from_secs(600);
    loop {
        let done = views
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|v| pred(v))
            .count();
        let t = t0.elapsed().as_secs_f64();
        vm_seconds += f64::from(u32::try_from(done).unwrap_or(u32::MAX)) * (t - last);
        last = t;
        if half.is_none() && done * 2 >= n {
            half = Some(t);
        }
        if ninety.is_none() && done * 10 >= n * 9 {
            ninety = Some(t);
        }
        if done >= n {
            return Ok(Waited {
                all: t,
                half: half.unwrap_or(t),
                ninety: ninety.unwrap_or(t),
                vm_seconds,
            });
        }
        if t0.elapsed() > deadline {
            bail!(
                "{what}: only {done} of {n} VMs after {} s",
                deadline.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
