//! Which node agents are alive, as far as this operator can tell.
//!
//! A Lease's `renewTime` alone is not enough: while the API server or etcd is away, no
//! agent can renew and the operator sees nothing new, so the Leases age past their
//! duration one after the other; and a renewal that hung through the outage lands
//! afterwards with the `renewTime` it was sent with, already expired. Judging agents by
//! the wall clock then moves VMs off healthy nodes around every control-plane outage.
//!
//! So, like kube-controller-manager's node lifecycle controller, the operator judges an
//! agent by when *it saw* the agent's Lease renewed (its own clock), and it judges no agent
//! lost while it sees no agent renew at all (for half a Lease duration: agents renew every
//! third of it, so that is a silence of the control plane, not of one node). When renewals
//! come back after such a silence, every agent gets a full Lease duration from then on.

use corescale_common::lease;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// What was last seen of one agent Lease.
#[derive(Debug, Clone)]
struct Seen {
    renew: Option<Timestamp>,
    at: Instant,
    duration: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<String, Seen>,
    /// When any agent's renewal was last seen.
    last_any: Option<Instant>,
    /// When renewals came back after the last silence.
    resumed: Option<Instant>,
}

/// Agent liveness from the Leases the operator watches; see the module docs.
#[derive(Debug, Default)]
pub struct Liveness {
    inner: Mutex<Inner>,
}

impl Liveness {
    /// Note a Lease as the watch delivered it.
    pub fn observe(&self, l: &Lease) {
        self.observe_at(l, Instant::now());
    }

    fn observe_at(&self, l: &Lease, now: Instant) {
        let spec = l.spec.as_ref();
        let renew = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = inner.seen.entry(l.name_any()).or_insert(Seen {
            renew: None,
            at: now,
            duration,
        });
        entry.duration = duration;
        if entry.renew.is_some() && entry.renew == renew {
            return;
        }
        entry.renew = renew;
        entry.at = now;
        if inner
            .last_any
            .is_some_and(|t| now.saturating_duration_since(t) > duration / 2)
        {
            tracing::info!(
                lease = %l.name_any(),
                "agent leases are renewed again after a silence: every agent gets a full lease duration to renew"
            );
            inner.resumed = Some(now);
        }
        inner.last_any = Some(now);
    }

    /// Whether the agent holding `l` counts as alive at `now` (wall clock): its Lease is
    /// live by its `renewTime`, or the operator saw it renewed within its duration (counted
    /// from the end of the last silence at the latest), or no agent renews at the moment.
    pub fn is_live(&self, l: &Lease, now: Timestamp) -> bool {
        self.is_live_at(l, now, Instant::now())
    }

    fn is_live_at(&self, l: &Lease, now: Timestamp, mono: Instant) -> bool {
        if lease::is_live(l, now) {
            return true;
        }
        let held = l
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| !h.is_empty());
        if !held {
            return false;
        }
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(seen) = inner.seen.get(&l.name_any()) else {
            return false;
        };
        let silent = inner
            .last_any
            .is_some_and(|t| mono.saturating_duration_since(t) > seen.duration / 2);
        let since = inner.resumed.map_or(seen.at, |r| r.max(seen.at));
        silent || mono.saturating_duration_since(since) <= seen.duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::SignedDuration;
    use kube::api::ObjectMeta;

    /// Lease `name` (10 s) renewed `secs` after the wall-clock start of the test.
    fn lease(name: &str, secs: u64) -> Lease {
        let secs = i64::try_from(secs).unwrap();
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.into()),
                lease_duration_seconds: Some(10),
                renew_time: Some(MicroTime(start() + SignedDuration::from_secs(secs))),
                ..Default::default()
            }),
        }
    }

    fn start() -> Timestamp {
        use std::sync::OnceLock;
        static T: OnceLock<Timestamp> = OnceLock::new();
        *T.get_or_init(Timestamp::now)
    }

    /// Both clocks `secs` after the start.
    fn at(t0: Instant, secs: u64) -> (Timestamp, Instant) {
        (
            start() + SignedDuration::from_secs(i64::try_from(secs).unwrap()),
            t0 + Duration::from_secs(secs),
        )
    }

    /// `name` renews every 3 s from `from` to `to` (inclusive), seen at once.
    fn renew(l: &Liveness, t0: Instant, name: &str, from: u64, to: u64) {
        for s in (from..=to).step_by(3) {
            l.observe_at(&lease(name, s), at(t0, s).1);
        }
    }

    #[test]
    fn one_silent_agent_among_renewing_ones_is_lost() {
        let l = Liveness::default();
        let t0 = Instant::now();
        l.observe_at(&lease("a", 0), t0);
        renew(&l, t0, "b", 0, 12);
        let (wall, mono) = at(t0, 9);
        assert!(l.is_live_at(&lease("a", 0), wall, mono));
        let (wall, mono) = at(t0, 12);
        assert!(!l.is_live_at(&lease("a", 0), wall, mono));
        assert!(l.is_live_at(&lease("b", 12), wall, mono));
    }

    #[test]
    fn nobody_is_lost_while_no_agent_renews() {
        let l = Liveness::default();
        let t0 = Instant::now();
        // a renewed at 0, b at 2; then the API server goes away: a expires first, by
        // either clock, while b still looks live.
        l.observe_at(&lease("a", 0), t0);
        l.observe_at(&lease("b", 2), at(t0, 2).1);
        for s in [11, 25] {
            let (wall, mono) = at(t0, s);
            assert!(!lease::is_live(&lease("a", 0), wall));
            assert!(l.is_live_at(&lease("a", 0), wall, mono), "a lost at {s} s");
            assert!(l.is_live_at(&lease("b", 2), wall, mono), "b lost at {s} s");
        }
    }

    #[test]
    fn after_a_silence_every_agent_gets_a_full_duration() {
        let l = Liveness::default();
        let t0 = Instant::now();
        l.observe_at(&lease("a", 0), t0);
        l.observe_at(&lease("b", 0), t0);
        // At 25 s b's renewal that hung through the outage lands, stamped 1 s: expired
        // by the wall clock, but it is news; b goes on renewing from then on.
        l.observe_at(&lease("b", 1), at(t0, 25).1);
        let (wall, mono) = at(t0, 25);
        assert!(l.is_live_at(&lease("b", 1), wall, mono));
        renew(&l, t0, "b", 28, 37);
        // a has one Lease duration from 25 s to renew...
        let (wall, mono) = at(t0, 34);
        assert!(l.is_live_at(&lease("a", 0), wall, mono));
        // ...and is lost if it does not.
        let (wall, mono) = at(t0, 36);
        assert!(!l.is_live_at(&lease("a", 0), wall, mono));
    }

    #[test]
    fn unknown_and_released_leases_follow_the_wall_clock() {
        let l = Liveness::default();
        let now = Timestamp::now();
        let fresh = |ago: i64| {
            let mut x = lease("x", 0);
            x.spec.as_mut().unwrap().renew_time =
                Some(MicroTime(now - SignedDuration::from_secs(ago)));
            x
        };
        assert!(l.is_live(&fresh(2), now));
        assert!(!l.is_live(&fresh(20), now));
        let mut released = fresh(20);
        released.spec.as_mut().unwrap().holder_identity = Some(String::new());
        l.observe(&released);
        assert!(!l.is_live(&released, now));
    }
}
