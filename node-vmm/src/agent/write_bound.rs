//! How many of a node's status writes and Events may be in flight to the API server at
//! once (`--max-writes-in-flight`). The others wait in the agent, first come first served.
//!
//! Unbounded, a resize storm sent one write per guest at once, all in the one flow of the
//! agents' ServiceAccount: past the API server's queues for it, API Priority and Fairness
//! refused them (429) and each came back after its own growing backoff. Lease renewals do
//! not take a permit: they must never wait behind the writes.

use std::future::Future;
use tokio::sync::{Semaphore, SemaphorePermit};

/// The bound (or none).
#[derive(Debug)]
pub struct WriteBound(Option<Semaphore>);

impl WriteBound {
    /// At most `n` writes in flight; 0: no bound.
    pub fn new(n: usize) -> Self {
        WriteBound((n > 0).then(|| Semaphore::new(n)))
    }

    /// Send `write` once there is room, and hold the room until it is done: every status
    /// write and Event of the node's workers goes through here.
    pub async fn send<T>(&self, write: impl Future<Output = T>) -> T {
        let _permit = self.permit().await;
        write.await
    }

    /// Wait for room for one more write (None: no bound).
    async fn permit(&self) -> Option<SemaphorePermit<'_>> {
        match &self.0 {
            Some(s) => s.acquire().await.ok(),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_past_the_bound_waits_for_one_to_finish() {
        let b = WriteBound::new(2);
        let first = b.permit().await;
        let _second = b.permit().await;
        assert!(first.is_some());
        let third = tokio::time::timeout(Duration::from_millis(50), b.permit()).await;
        assert!(
            third.is_err(),
            "a third write went out beside two in flight"
        );
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), b.permit()).await;
        assert!(
            third.is_ok_and(|p| p.is_some()),
            "the freed room was not given"
        );
    }

    #[tokio::test]
    async fn zero_means_no_bound() {
        let b = WriteBound::new(0);
        let permits: Vec<_> = futures::future::join_all((0..1000).map(|_| b.permit())).await;
        assert!(permits.iter().all(Option::is_none));
    }
}
