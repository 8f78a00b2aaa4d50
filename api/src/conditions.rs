//! Condition types and reasons, and a helper that keeps `lastTransitionTime` honest.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The operator placed the VM on a node.
pub const SCHEDULED: &str = "Scheduled";
/// The VMM runs.
pub const RUNNING: &str = "Running";
/// The guest runs with the vCPUs it was asked for.
pub const READY: &str = "Ready";
/// A resize waits: reason Deferred (may fit later) or Infeasible (never fits).
pub const RESIZE_PENDING: &str = "ResizePending";
/// A resize is being carried out; reason Error when the last attempt failed.
pub const RESIZE_IN_PROGRESS: &str = "ResizeInProgress";

/// Reason: may fit later.
pub const REASON_DEFERRED: &str = "Deferred";
/// Reason: can never fit.
pub const REASON_INFEASIBLE: &str = "Infeasible";
/// Reason: the last attempt failed.
pub const REASON_ERROR: &str = "Error";
/// Reason of Running=False once the node agent stopped the guest of a VM being deleted;
/// the operator then removes the finalizer.
pub const REASON_GUEST_STOPPED: &str = "GuestStopped";
/// Ready reason of a guest whose agent does not answer (none installed, not started yet):
/// its vCPUs are counted present, their online state in the guest unknown.
pub const REASON_NO_GUEST_AGENT: &str = "NoGuestAgent";

/// Set (or replace) the condition of `type_` in `conditions`. `lastTransitionTime` moves
/// only when the status changes, as the Kubernetes API conventions ask.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let status_s = if status { "True" } else { "False" };
    // Updated in place: an agent re-sets the same conditions on every observation of every
    // guest, and most of the time nothing in them changes.
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status_s {
                c.status = status_s.to_string();
                c.last_transition_time = Time(to_timestamp(now));
            }
            if c.reason != reason {
                c.reason = reason.to_string();
            }
            c.message = message.into();
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status_s.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            observed_generation,
            last_transition_time: Time(to_timestamp(now)),
        }),
    }
}

/// The condition of `type_`, if present.
pub fn get_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_nanosecond(t.timestamp_nanos_opt().unwrap_or(0).into())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let mut c = Vec::new();
        set_condition(&mut c, READY, false, "Booting", "a", Some(1), t0);
        set_condition(&mut c, READY, false, "Booting", "b", Some(2), t1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].message, "b");
        assert_eq!(c[0].observed_generation, Some(2));
        assert_eq!(c[0].last_transition_time.0.as_second(), 1_000);
        set_condition(&mut c, READY, true, "Running", "c", Some(2), t1);
        assert_eq!(c[0].last_transition_time.0.as_second(), 2_000);
        assert_eq!(
            (c[0].reason.as_str(), c[0].message.as_str()),
            ("Running", "c")
        );
        assert!(is_true(&c, READY));
        // Another type is added beside it, with its own time.
        set_condition(&mut c, RUNNING, true, "Running", "d", Some(2), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].last_transition_time.0.as_second(), 1_000);
    }
}
