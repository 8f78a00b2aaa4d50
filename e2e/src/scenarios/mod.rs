//! The e2e scenarios and their one registry, [`SCENARIOS`]: in the order they run (later ones
//! build on earlier ones), each with its name (what `corescale-e2e --only` takes), what it
//! shows, whether it injects faults, and the function that runs it. Adding a scenario is a
//! module file here and one line in the registry.

mod aarch64;
mod admission;
mod agent_faults;
mod budget;
mod chart;
mod control_plane;
pub mod cycles;
mod example;
mod foreign_arch;
mod granularity;
mod guest_faults;
pub(crate) mod guest_ssh;
mod metrics;
pub mod no_agent;
mod ppc64le;
mod storm;
mod support;
pub(crate) mod workload;

pub(crate) use support::{metric_sum, resized_events};

use crate::Stack;
use anyhow::Result;
use futures::future::LocalBoxFuture;
use std::time::Duration;

/// The namespace the scenarios' VMs live in.
pub const NS: &str = "demo";
/// How long a guest may take to boot.
const BOOT: Duration = Duration::from_secs(90);
/// How long a change may take to show in status.
const CONVERGE: Duration = Duration::from_secs(60);

/// Which table of the summary a scenario's figures go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// A plain assertion about what a user sees.
    Main,
    /// It injects faults and reports [`Faults`]: how many, and how the system came back.
    Fault,
}

/// A scenario's function: runs it against the stack, counting the faults it injects in the
/// [`Faults`]; its `Ok` is the one-line detail of the summary.
pub type Run = for<'a> fn(&'a Stack, &'a mut Faults) -> LocalBoxFuture<'a, Result<String>>;

/// One entry of the registry.
pub struct Scenario {
    /// The name `--only` selects it by.
    pub name: &'static str,
    /// What it shows (printed when it starts).
    pub what: &'static str,
    /// Main or fault scenario.
    pub group: Group,
    /// Runs it.
    pub run: Run,
}

use Group::{Fault, Main};

/// Every scenario, in the order they run; later ones build on earlier ones.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "chart",
        what: "the rendered Helm chart validates on the API server (server-side dry run)",
        group: Main,
        run: |s, _| Box::pin(chart::chart(s)),
    },
    Scenario {
        name: "bad-manifests",
        what: "every bad manifest is refused by the API server with a message naming the field",
        group: Main,
        run: |s, _| Box::pin(admission::bad_manifests(s)),
    },
    Scenario {
        name: "apply",
        what: "the example VM is placed, boots, status.cpus == spec.cpus, Ready",
        group: Main,
        run: |s, _| Box::pin(example::apply(s)),
    },
    Scenario {
        name: "scale",
        what: "kubectl scale 3, 1, 4 converges in the guest and in status; Events; columns",
        group: Main,
        run: |s, _| Box::pin(example::scale(s)),
    },
    Scenario {
        name: "refused-patch",
        what: "a refused patch leaves the running guest untouched",
        group: Main,
        run: |s, _| Box::pin(admission::refused_patch(s)),
    },
    Scenario {
        name: "core",
        what: "a Core-granularity VM (threads=2) scales by whole cores",
        group: Main,
        run: |s, _| Box::pin(granularity::core(s)),
    },
    Scenario {
        name: "metrics",
        what: "Prometheus has the documented series; histogram counts match the resizes done",
        group: Main,
        run: |s, _| Box::pin(metrics::metrics(s)),
    },
    Scenario {
        name: "infeasible-deferred",
        what: "Infeasible above the node budget; Deferred until room is freed",
        group: Main,
        run: |s, _| Box::pin(budget::infeasible_deferred(s)),
    },
    Scenario {
        name: "no-agent",
        what: "guests without an agent: Running, 1 -> 3 -> 1 Present; an agent 30 s late turns them Online",
        group: Main,
        run: |s, _| Box::pin(no_agent::no_agent(s, NS)),
    },
    Scenario {
        name: "cycles",
        what: "one TCG guest scaled 1 <-> 4 twenty times: same QEMU, no more vCPU threads than slots",
        group: Main,
        run: |s, _| Box::pin(cycles::cycles(s, NS)),
    },
    Scenario {
        name: "autoscale",
        what: "KEDA + the HPA drive spec.cpus from busy loops in the guest: 1 -> 2 -> 3|4 -> 1, Events name the HPA",
        group: Main,
        // It lives in crate::autoscale, next to the loop machinery the autoscale benchmark shares.
        run: |s, _| {
            Box::pin(async move {
                crate::autoscale::autoscale(s, NS, &|node| crate::autoscale::stack_state_dir(s, node))
                    .await
            })
        },
    },
    Scenario {
        name: "workload",
        what: "a Debian VM from its disk image with cloud-init: HTTP and SSH through forwarded ports, a job spreads over 1 -> 4 vCPUs, disks survive an agent restart and a reboot",
        group: Main,
        run: |s, _| Box::pin(workload::workload(s, NS)),
    },
    Scenario {
        name: "agent-kill",
        what: "kill -9 the node agent mid-resize: guest keeps running, re-adopted, converges",
        group: Fault,
        run: |s, f| Box::pin(agent_faults::agent_kill(s, f)),
    },
    Scenario {
        name: "storm",
        what: "200 random writes in 10 s converge to the last; nothing hangs or fails",
        group: Main,
        run: |s, _| Box::pin(storm::storm(s)),
    },
    Scenario {
        name: "api-outage",
        what: "the API server frozen mid-resize: the guest is untouched, status converges after",
        group: Fault,
        run: |s, f| Box::pin(control_plane::api_outage(s, f)),
    },
    Scenario {
        name: "apiserver-restart",
        what: "kube-apiserver restarted mid-resize: guest untouched, all reconnect, the last write wins",
        group: Fault,
        run: |s, f| Box::pin(control_plane::apiserver_restart(s, f)),
    },
    Scenario {
        name: "etcd-pause",
        what: "etcd frozen 20 s mid-resize: guest untouched, all recover, the last write wins",
        group: Fault,
        run: |s, f| Box::pin(control_plane::etcd_pause(s, f)),
    },
    Scenario {
        name: "qemu-kill",
        what: "QEMU killed mid-plug: noticed within 2 s, Event and condition, restarted at spec.cpus",
        group: Fault,
        run: |s, f| Box::pin(guest_faults::qemu_kill(s, f)),
    },
    Scenario {
        name: "delete-mid-resize",
        what: "a VM deleted while it resizes: the guest stops, nothing is left",
        group: Fault,
        run: |s, f| Box::pin(guest_faults::delete_mid_resize(s, f)),
    },
    Scenario {
        name: "reschedule",
        what: "an agent gone past its lease: its VMs come up on the other node",
        group: Fault,
        run: |s, f| Box::pin(agent_faults::reschedule(s, f)),
    },
    Scenario {
        name: "ppc64le",
        what: "POWER (pseries) VMs: threads=2 scaled 2 -> 4 -> 2 by whole cores, threads=1 1 -> 3 -> 2, deleted",
        group: Main,
        run: |s, _| Box::pin(ppc64le::ppc64le(s)),
    },
    Scenario {
        name: "aarch64",
        what: "an arm64 VM (virt, no CPU hot-plug) scaled 1 -> 3 -> 2 by GuestOnline, Events, metrics by method, deleted",
        group: Main,
        run: |s, _| Box::pin(aarch64::aarch64(s)),
    },
    Scenario {
        name: "delete",
        what: "deleting a VM stops its guest, removes the finalizer, leaves no QEMU",
        group: Main,
        run: |s, _| Box::pin(example::delete(s)),
    },
];

/// Names in `only` that match no scenario (a typo must fail the run, not pass it empty).
pub fn unknown(only: &[String]) -> Vec<String> {
    only.iter()
        .filter(|n| !SCENARIOS.iter().any(|sc| sc.name == n.as_str()))
        .cloned()
        .collect()
}

/// The scenarios to run, in registry order: all of them, or those named in `only` (names
/// that match no scenario select nothing; see [`unknown`]).
pub fn selected(only: Option<&[String]>) -> impl Iterator<Item = &'static Scenario> + '_ {
    SCENARIOS
        .iter()
        .filter(move |sc| only.is_none_or(|o| o.iter().any(|x| x == sc.name)))
}

/// The figures of a fault scenario: what was done to the system and how it came back.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Faults injected (a process killed, stopped or frozen; a VM deleted mid-resize).
    pub injected: u32,
    /// Seconds from the end of each fault to the system's recovery, one per recovery.
    pub recoveries: Vec<f64>,
}

impl Faults {
    /// One more fault injected.
    pub fn inject(&mut self) {
        self.injected += 1;
    }

    /// The system recovered, `seconds` after the fault ended.
    pub fn recovered(&mut self, seconds: f64) {
        self.recoveries.push(seconds);
    }

    /// The longest recovery.
    pub fn worst(&self) -> Option<f64> {
        self.recoveries.iter().copied().reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_in_the_documented_order() {
        let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "chart",
                "bad-manifests",
                "apply",
                "scale",
                "refused-patch",
                "core",
                "metrics",
                "infeasible-deferred",
                "no-agent",
                "cycles",
                "autoscale",
                "workload",
                "agent-kill",
                "storm",
                "api-outage",
                "apiserver-restart",
                "etcd-pause",
                "qemu-kill",
                "delete-mid-resize",
                "reschedule",
                "ppc64le",
                "aarch64",
                "delete",
            ]
        );
    }

    #[test]
    fn fault_scenarios_are_the_ones_that_inject_faults() {
        let faults: Vec<&str> = SCENARIOS
            .iter()
            .filter(|s| s.group == Group::Fault)
            .map(|s| s.name)
            .collect();
        assert_eq!(
            faults,
            [
                "agent-kill",
                "api-outage",
                "apiserver-restart",
                "etcd-pause",
                "qemu-kill",
                "delete-mid-resize",
                "reschedule",
            ]
        );
    }

    #[test]
    fn only_selects_by_name_in_registry_order() {
        let all: Vec<&str> = selected(None).map(|s| s.name).collect();
        assert_eq!(all.len(), SCENARIOS.len());
        let only = ["scale".to_string(), "apply".into(), "nonesuch".into()];
        let some: Vec<&str> = selected(Some(&only)).map(|s| s.name).collect();
        assert_eq!(unknown(&only), vec!["nonesuch".to_string()]);
        assert_eq!(some, ["apply", "scale"]);
    }

    #[test]
    fn faults_count_and_keep_the_worst_recovery() {
        let mut f = Faults::default();
        assert_eq!(f.worst(), None);
        f.inject();
        f.recovered(2.5);
        f.recovered(7.0);
        f.recovered(1.0);
        assert_eq!((f.injected, f.worst()), (1, Some(7.0)));
    }
}
