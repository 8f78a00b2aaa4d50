//! The node's vCPU budget: host CPUs times the overcommit ratio, shared by its VMs.
//!
//! Each VM holds what it has or was granted; a VM that wants to grow asks for room, and
//! a VM that shrinks or leaves wakes the ones that were deferred.

use crate::backend::VmKey;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Shared budget of one node.
#[derive(Debug)]
pub struct Budget {
    total: u32,
    held: Mutex<Held>,
    freed: Notify,
}

/// What each VM holds, and the sum kept with it: asking for room is O(1), not a sum over
/// the node's VMs (which made a node's decisions quadratic in its VMs).
#[derive(Debug, Default)]
struct Held {
    per_vm: HashMap<VmKey, u32>,
    sum: u64,
}

impl Held {
    fn set(&mut self, key: &VmKey, vcpus: Option<u32>) -> Option<u32> {
        let before = match vcpus {
            Some(v) => self.per_vm.insert(key.clone(), v),
            None => self.per_vm.remove(key),
        };
        self.sum = self.sum - u64::from(before.unwrap_or(0)) + u64::from(vcpus.unwrap_or(0));
        before
    }
}

impl Budget {
    /// A budget of `total` vCPUs.
    pub fn new(total: u32) -> Self {
        Budget {
            total,
            held: Mutex::default(),
            freed: Notify::new(),
        }
    }

    /// The node's total.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// What every VM but `key` holds.
    pub fn held_by_others(&self, key: &VmKey) -> u32 {
        self.held
            .lock()
            .map(|h| {
                let own = h.per_vm.get(key).copied().unwrap_or(0);
                u32::try_from(h.sum - u64::from(own)).unwrap_or(u32::MAX)
            })
            .unwrap_or(0)
    }

    /// Record what `key` holds now; wakes deferred VMs when it went down.
    pub fn hold(&self, key: &VmKey, vcpus: u32) {
        let before = self
            .held
            .lock()
            .ok()
            .and_then(|mut h| h.set(key, Some(vcpus)));
        if before.is_some_and(|b| b > vcpus) {
            self.freed.notify_waiters();
        }
    }

    /// `key` left the node.
    pub fn release(&self, key: &VmKey) {
        if self
            .held
            .lock()
            .ok()
            .and_then(|mut h| h.set(key, None))
            .is_some()
        {
            self.freed.notify_waiters();
        }
    }

    /// Resolves the next time room is freed.
    pub async fn freed(&self) {
        self.freed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> VmKey {
        VmKey {
            namespace: "d".into(),
            name: n.into(),
        }
    }

    #[tokio::test]
    async fn holding_less_or_leaving_wakes_waiters() {
        let b = std::sync::Arc::new(Budget::new(8));
        b.hold(&k("a"), 6);
        b.hold(&k("b"), 2);
        assert_eq!(b.held_by_others(&k("b")), 6);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.freed().await })
        };
        tokio::task::yield_now().await;
        b.hold(&k("a"), 3);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        // The kept sum follows every change.
        assert_eq!(b.held_by_others(&k("b")), 3);
        assert_eq!(b.held_by_others(&k("a")), 2);
        assert_eq!(b.held_by_others(&k("new")), 5);
        b.release(&k("a"));
        assert_eq!(b.held_by_others(&k("b")), 0);
    }
}
