//! The status the agent reports, built by pure functions: `status.vcpus[]` and the rest of
//! the status from what was observed, the conditions the steps set, and `lastResize`
//! for a resize begun, abandoned or finished.

use crate::agent::decide::{self, SlotBook};
use crate::backend::{Observation, ResizeReport, StepReport};
use chrono::{DateTime, Utc};
use corescale_api::conditions::{self as cond, set_condition};
use corescale_api::{
    LastResize, Phase, ResizeResult, VcpuState, VcpuStatus, VirtualMachine, VirtualMachineStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use std::time::Duration;

/// How long a guest may take to boot before the status says so.
const BOOT_WARN: Duration = Duration::from_secs(120);

/// What the status is built from, besides the object and the observation.
pub(super) struct Facts<'a> {
    /// The slots' states and since when, while a guest runs; None when none does.
    pub book: Option<&'a SlotBook>,
    /// The node's accelerator.
    pub accel: &'a str,
    /// Whether the guest agent answered the last observation.
    pub guest_agent: bool,
    pub phase: Phase,
    pub conds: &'a [Condition],
    pub last_resize: Option<&'a LastResize>,
    /// The running guest's forwarded ports, disks and what its agent says of it.
    pub workload: Option<Workload<'a>>,
}

/// What status says of a running guest's ports, disks and OS.
pub(super) struct Workload<'a> {
    pub ports: Vec<corescale_api::PortStatus>,
    pub disks: Vec<corescale_api::DiskStatus>,
    pub guest: Option<&'a corescale_api::GuestInfo>,
}

/// The status this agent owns, from the book (observed states) and the conditions.
pub(super) fn status(
    vm: &VirtualMachine,
    obs: Option<&Observation>,
    f: &Facts<'_>,
) -> VirtualMachineStatus {
    let topology = decide::topology_of(vm);
    let running = f.book.is_some();
    // Only slots that are not Absent: the list (and so every status write and watch
    // event) grows with the vCPUs in use, not with maxCpus. A stopped guest has none.
    let vcpus: Vec<VcpuStatus> = corescale_api::planner::slots(&topology)
        .into_iter()
        .filter_map(|s| {
            let (state, since) = match f.book.and_then(|b| b.slots.get(&s.index)) {
                Some((st, t)) if *st != VcpuState::Absent => (*st, *t),
                _ => return None,
            };
            let guest_cpu = obs
                .and_then(|o| o.slots.get(usize::try_from(s.index).ok()?))
                .and_then(|o| o.guest_cpu);
            Some(VcpuStatus {
                index: s.index,
                socket: s.socket,
                core: s.core,
                thread: s.thread,
                numa_node: s.numa_node(),
                state,
                since: Some(since),
                guest_cpu,
            })
        })
        .collect();
    let cpus = obs.map(Observation::online).unwrap_or(0);
    let cpus = if running { Some(cpus) } else { Some(0) };
    VirtualMachineStatus {
        phase: Some(f.phase),
        cpus,
        vcpus,
        accelerator: running.then(|| f.accel.to_string()),
        guest_agent: running
            .then(|| if f.guest_agent { "Connected" } else { "Absent" }.to_string()),
        conditions: f.conds.to_vec(),
        observed_generation: vm.metadata.generation,
        last_resize: f.last_resize.cloned(),
        ports: f
            .workload
            .as_ref()
            .map(|w| w.ports.clone())
            .unwrap_or_default(),
        disks: f
            .workload
            .as_ref()
            .map(|w| w.disks.clone())
            .unwrap_or_default(),
        guest: f.workload.as_ref().and_then(|w| w.guest.cloned()),
        ..Default::default()
    }
}

/// The Ready condition for a guest observed as `obs`: (status, reason, message). Ready
/// follows the target: not ready while the guest differs from spec.cpus.
pub(super) fn ready(vm: &VirtualMachine, obs: &Observation) -> (bool, &'static str, String) {
    let online = obs.online();
    if online == vm.spec.cpus {
        if obs.guest_agent {
            (true, "Ready", format!("{online} vCPUs online"))
        } else {
            (
                true,
                cond::REASON_NO_GUEST_AGENT,
                format!("{online} vCPUs present; no guest agent answers, so their online state in the guest is unknown"),
            )
        }
    } else {
        let msg = format!("{online} of {} vCPUs online", vm.spec.cpus);
        (false, "Resizing", msg)
    }
}

/// Running and Ready False for the same reason: the guest is not running (lost, halted,
/// stopped for deletion).
pub(super) fn set_stopped(
    conds: &mut Vec<Condition>,
    reason: &str,
    msg: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    set_condition(conds, cond::RUNNING, false, reason, msg, generation, now);
    set_condition(conds, cond::READY, false, reason, msg, generation, now);
}

/// The Ready message of a guest whose agent has not answered for `waited`.
pub(super) fn booting_message(waited: Duration) -> String {
    if waited > BOOT_WARN {
        format!(
            "the guest agent has not answered for {} s",
            waited.as_secs()
        )
    } else {
        "waiting for the guest agent".to_string()
    }
}

/// `lastResize` of a resize from `from` to `to` vCPUs begun at `started`.
pub(super) fn resize_in_progress(from: u32, to: u32, started: DateTime<Utc>) -> LastResize {
    LastResize {
        from,
        to,
        started_at: started,
        finished_at: None,
        seconds: None,
        applied_seconds: None,
        acked_seconds: None,
        online_seconds: None,
        result: ResizeResult::InProgress,
        message: None,
    }
}

/// `lastResize` of a resize given up at `finished` after `seconds`, saying why.
pub(super) fn resize_abandoned(
    begun: &LastResize,
    finished: DateTime<Utc>,
    seconds: f64,
    message: String,
) -> LastResize {
    LastResize {
        finished_at: Some(finished),
        seconds: Some(seconds),
        result: ResizeResult::Failed,
        message: Some(message),
        ..begun.clone()
    }
}

/// `lastResize` of a resize whose steps the backend finished at `finished`, after which the
/// guest had `online` vCPUs online: Succeeded when no step failed and the guest has the
/// target; the slowest step's time to each phase.
pub(super) fn resize_finished(
    begun: &LastResize,
    finished: DateTime<Utc>,
    seconds: f64,
    report: &ResizeReport,
    online: u32,
) -> LastResize {
    let phase_max = |f: fn(&StepReport) -> Option<Duration>| {
        report
            .steps
            .iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64())
            .reduce(f64::max)
    };
    let err = report.first_error();
    let result = if err.is_none() && online == begun.to {
        ResizeResult::Succeeded
    } else {
        ResizeResult::Failed
    };
    let message = match (err, result) {
        (Some(e), _) => Some(e.to_string()),
        (None, ResizeResult::Failed) => Some(format!(
            "the guest has {online} vCPUs online, not {}",
            begun.to
        )),
        _ => None,
    };
    LastResize {
        finished_at: Some(finished),
        seconds: Some(seconds),
        applied_seconds: phase_max(|s| s.applied),
        acked_seconds: phase_max(|s| s.acked),
        online_seconds: phase_max(|s| s.online),
        result,
        message,
        ..begun.clone()
    }
}

/// What a slot the guest has not finished with is waiting for, e.g. "vCPU slot 1 is
/// Plugging (not acknowledged or onlined by the guest yet)", or None when no slot is.
pub(super) fn stuck_slots(obs: &Observation) -> Option<String> {
    let of = |st: VcpuState| -> Vec<u32> {
        (0u32..)
            .zip(&obs.slots)
            .filter(|(_, o)| o.state == st)
            .map(|(i, _)| i)
            .collect()
    };
    let parts: Vec<String> = [
        (
            of(VcpuState::Plugging),
            "Plugging (not acknowledged or onlined by the guest yet)",
        ),
        (
            of(VcpuState::Unplugging),
            "Unplugging (not released by the guest yet)",
        ),
    ]
    .into_iter()
    .filter(|(slots, _)| !slots.is_empty())
    .map(|(slots, what)| match slots.as_slice() {
        [one] => format!("vCPU slot {one} is {what}"),
        many => format!("vCPU slots {many:?} are {what}"),
    })
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Slots the guest holds (online, present, or on their way in or out).
pub(super) fn active(obs: &Observation) -> u32 {
    u32::try_from(obs.slots.iter().filter(|s| s.state.is_active()).count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, Direction};

    fn vm(cpus: u32) -> VirtualMachine {
        serde_yaml::from_str(&format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: a, namespace: demo, generation: 3}}\n\
             spec: {{cpus: {cpus}, topology: {{sockets: 1, cores: 4, threads: 1}}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn stuck_slots_names_each_slot_and_why() {
        let obs = |states: &[VcpuState]| Observation::of_states(states, false);
        use VcpuState::*;
        assert_eq!(stuck_slots(&obs(&[Online, Present, Absent])), None);
        assert_eq!(
            stuck_slots(&obs(&[Online, Plugging, Unplugging, Unplugging])).unwrap(),
            "vCPU slot 1 is Plugging (not acknowledged or onlined by the guest yet), vCPU slots [2, 3] are Unplugging (not released by the guest yet)"
        );
    }

    #[test]
    fn status_lists_the_slots_in_use_of_a_running_guest_only() {
        use VcpuState::*;
        let now = Utc::now();
        let obs = Observation::of_states(&[Online, Online, Absent, Absent], true);
        let mut book = SlotBook::default();
        book.update(&obs, &Default::default(), now);
        let mut facts = Facts {
            book: Some(&book),
            accel: "tcg",
            guest_agent: true,
            phase: Phase::Running,
            conds: &[],
            last_resize: None,
            workload: None,
        };
        let st = status(&vm(2), Some(&obs), &facts);
        let slots: Vec<(u32, VcpuState)> = st.vcpus.iter().map(|v| (v.index, v.state)).collect();
        assert_eq!(slots, [(0, Online), (1, Online)]);
        assert_eq!(st.cpus, Some(2));
        assert_eq!(st.accelerator.as_deref(), Some("tcg"));
        assert_eq!(st.guest_agent.as_deref(), Some("Connected"));
        assert_eq!(st.observed_generation, Some(3));
        // Stopped: no slots, 0 vCPUs, no accelerator or agent.
        facts.book = None;
        facts.phase = Phase::Stopped;
        let st = status(&vm(2), None, &facts);
        assert!(st.vcpus.is_empty());
        assert_eq!(st.cpus, Some(0));
        assert_eq!((st.accelerator, st.guest_agent), (None, None));
        assert_eq!(st.phase, Some(Phase::Stopped));
    }

    #[test]
    fn ready_follows_the_target_and_says_when_no_agent_answers() {
        use VcpuState::*;
        let with = Observation::of_states(&[Online, Online, Absent], true);
        assert_eq!(
            ready(&vm(2), &with),
            (true, "Ready", "2 vCPUs online".into())
        );
        assert_eq!(
            ready(&vm(3), &with),
            (false, "Resizing", "2 of 3 vCPUs online".into())
        );
        let without = Observation::of_states(&[Online, Present, Absent], false);
        assert_eq!(ready(&vm(2), &without).1, cond::REASON_NO_GUEST_AGENT);
    }

    #[test]
    fn a_finished_resize_succeeds_only_at_the_target_without_errors() {
        let begun = resize_in_progress(1, 3, Utc::now());
        let step = |slot, error: Option<BackendError>| StepReport {
            slot,
            direction: Direction::Plug,
            applied: Some(Duration::from_millis(100 * u64::from(slot))),
            acked: None,
            online: None,
            guest_cpu: None,
            kept_offline: false,
            error,
        };
        let ok = ResizeReport {
            steps: vec![step(1, None), step(2, None)],
        };
        let done = resize_finished(&begun, Utc::now(), 0.5, &ok, 3);
        assert_eq!(done.result, ResizeResult::Succeeded);
        assert_eq!((done.from, done.to, done.message), (1, 3, None));
        assert_eq!(done.applied_seconds, Some(0.2));
        let short = resize_finished(&begun, Utc::now(), 0.5, &ok, 2);
        assert_eq!(short.result, ResizeResult::Failed);
        assert_eq!(
            short.message.as_deref(),
            Some("the guest has 2 vCPUs online, not 3")
        );
        let failed = ResizeReport {
            steps: vec![step(1, Some(BackendError::InvalidPlan("no".into())))],
        };
        let done = resize_finished(&begun, Utc::now(), 0.5, &failed, 3);
        assert_eq!(done.result, ResizeResult::Failed);
        assert!(done.message.is_some_and(|m| m.contains("no")));
    }
}
