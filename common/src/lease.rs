//! `coordination.k8s.io/v1` Leases: leader election for the operator, and the node
//! agents' "I am alive, here is my capacity" announcements.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;

/// Errors of Lease handling.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// The API server refused or failed a request.
    #[error("lease {name}: {source}")]
    Api {
        /// Lease name.
        name: String,
        /// The client error.
        source: kube::Error,
    },
}

/// Which Lease to hold, and what to write on it.
#[derive(Debug, Clone)]
pub struct LeaseClaim {
    /// Lease name.
    pub name: String,
    /// Who holds it (a pod name, a node name).
    pub holder: String,
    /// How long a holder may go without renewing before others may take it.
    pub duration: Duration,
    /// Labels to keep on the Lease.
    pub labels: BTreeMap<String, String>,
    /// Annotations to keep on the Lease.
    pub annotations: BTreeMap<String, String>,
}

/// Whether `lease` is held by someone whose claim has not expired at `now`.
pub fn is_live(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    spec.holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty())
        && renew.0 + SignedDuration::from_secs(secs.into()) > now
}

/// When `lease` stops being live (None if it never was).
pub fn expires_at(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    Some(
        spec.renew_time.as_ref()?.0
            + SignedDuration::from_secs(spec.lease_duration_seconds?.into()),
    )
}

/// Take or renew the Lease. Returns whether `claim.holder` holds it now. A conflicting
/// write by another candidate is not an error: it just means someone else holds it.
pub async fn acquire_or_renew(api: &Api<Lease>, claim: &LeaseClaim) -> Result<bool, LeaseError> {
    let err = |source| LeaseError::Api {
        name: claim.name.clone(),
        source,
    };
    let secs = i32::try_from(claim.duration.as_secs()).unwrap_or(i32::MAX);
    let current = api.get_opt(&claim.name).await.map_err(err)?;
    // Stamped after the read, just before the write: a read that hung (an API server
    // restarting) must not make the renewal land already stale.
    let now = Timestamp::now();
    match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(claim.name.clone()),
                    labels: Some(claim.labels.clone()),
                    annotations: Some(claim.annotations.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(claim.holder.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(err(e)),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(claim.holder.as_str());
            if !mine && is_live(&lease, now) {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(claim.holder.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: if mine {
                    spec.acquire_time
                } else {
                    Some(MicroTime(now))
                },
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..spec
            });
            let meta = &mut lease.metadata;
            meta.labels
                .get_or_insert_with(Default::default)
                .extend(claim.labels.clone());
            meta.annotations
                .get_or_insert_with(Default::default)
                .extend(claim.annotations.clone());
            match api
                .replace(&claim.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(err(e)),
            }
        }
    }
}

/// Keep trying to hold the Lease, renewing every `duration / 3`; publish whether we hold
/// it on `tx`. Like client-go's leader election, a holder that has not renewed within the
/// renew deadline (two thirds of the Lease duration) steps down before the Lease can
/// expire for the others: a failed renewal and one that hangs (an API server or etcd
/// that does not answer) count alike, so two leaders never act at once.
pub async fn hold_forever(api: Api<Lease>, claim: LeaseClaim, tx: watch::Sender<bool>) {
    let period = claim.duration / 3;
    let renew_deadline = claim.duration * 2 / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        // The attempt gets until the renew deadline; one that runs out is a failure.
        let budget = renew_deadline.saturating_sub(last_ok.elapsed()).max(period);
        match tokio::time::timeout(budget, acquire_or_renew(&api, &claim)).await {
            Ok(Ok(held)) => {
                if held {
                    last_ok = tokio::time::Instant::now();
                }
                tx.send_if_modified(|v| std::mem::replace(v, held) != held);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {budget:?}"),
                };
                tracing::warn!(error = %why, lease = %claim.name, "cannot renew lease");
                if last_ok.elapsed() > renew_deadline {
                    tx.send_if_modified(|v| std::mem::replace(v, false));
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn liveness_follows_renew_time_and_duration() {
        let now = Timestamp::now();
        assert!(is_live(&lease("a", 5, 15), now));
        assert!(!is_live(&lease("a", 20, 15), now));
        assert!(!is_live(&lease("", 0, 15), now));
        assert!(!is_live(&Lease::default(), now));
        assert!(expires_at(&lease("a", 5, 15)).unwrap() > now);
    }
}
