//! Observing a guest: QEMU's CPU lists and the guest agent's, asked at once, merged into
//! one state per slot; interrupted plugs are finished on the way.

use super::cpumap::AgentView;
use super::vm::{Ops, QemuVm};
use crate::backend::{BackendError, Observation, SlotObservation};
use corescale_api::{ResizeMethod, VcpuState};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl QemuVm {
    pub(super) async fn observe_locked(&self, ops: &mut Ops) -> Result<Observation, BackendError> {
        // Until the agent first answers (the guest boots) a short try is enough.
        let agent_timeout = if self.ready.load(Ordering::Relaxed) {
            self.cfg.agent_timeout
        } else {
            self.cfg.agent_timeout.min(Duration::from_millis(300))
        };
        let deadline = Instant::now() + agent_timeout;
        // QEMU's two answers and the guest agent's list are independent round trips on
        // two sockets: ask them at once (an observation can follow a resize step, so its
        // time is in the latency a user sees). A QMP failure (QEMU gone) ends the
        // observation at once: the agent's call would wait out its timeout for a socket
        // that no longer accepts.
        let ((hp, fast), vcpus) = {
            let qmp = async {
                tokio::try_join!(self.hotpluggable(), async {
                    self.qmp
                        .query_cpus_fast(self.cfg.qmp_timeout)
                        .await
                        .map_err(|e| self.qmp_err(e))
                })
            };
            let guest = self.guest_vcpus(&mut ops.qga, agent_timeout);
            tokio::pin!(qmp, guest);
            tokio::select! {
                q = &mut qmp => (q?, guest.await),
                g = &mut guest => (qmp.await?, g),
            }
        };
        let t = &self.spec.topology;
        let tids: HashMap<u32, i64> = fast
            .iter()
            .filter_map(|c| {
                let slot = self.machine.slot_of_thread(t, &c.props, &c.qom_path)?;
                Some((slot, c.thread_id))
            })
            .collect();
        let present: Vec<u32> = hp
            .iter()
            .filter(|(_, c)| c.qom_path.is_some())
            .map(|(s, _)| *s)
            .collect();
        // Pending unplugs that completed, failed plugs that were plugged after all.
        let before = ops.st.clone();
        ops.st.unplugging.retain(|s| present.contains(s));
        ops.st.failed.retain(|s| !present.contains(s));
        ops.st.parked.retain(|s| present.contains(s));
        if ops.st != before {
            self.persist(&ops.st);
        }
        let view = match vcpus {
            Ok(vcpus) => self.view_of(ops, &present, vcpus, deadline).await,
            Err(e) => Err(e),
        };
        let mut agent = match view {
            Ok(v) => {
                // An agent that answers now counts from now on, even one that came late.
                self.ready.store(true, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                tracing::debug!(vm = %self.key, error = %e, "guest agent unavailable during observe");
                None
            }
        };
        if let Some(view) = &agent {
            if let Some(v) = self.finish_plugs(ops, &present, view).await {
                agent = Some(v);
            }
        }
        // A parked vCPU that the guest onlined by itself is in use again.
        if let Some(view) = &agent {
            let n = ops.st.parked.len();
            ops.st
                .parked
                .retain(|s| !matches!(view.slots.get(s), Some((_, true))));
            if ops.st.parked.len() != n {
                self.persist(&ops.st);
            }
        }
        let guest_online = self.spec.resize_method == ResizeMethod::GuestOnline;
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let entry = hp.get(&s.index);
            let qom = entry.and_then(|c| c.qom_path.as_deref());
            let host_thread = qom
                .and(tids.get(&s.index))
                .and_then(|t| i32::try_from(*t).ok());
            let mapped = agent.as_ref().and_then(|a| a.slots.get(&s.index)).copied();
            let state = match (qom.is_some(), &agent) {
                (true, _) if ops.st.unplugging.contains(&s.index) => VcpuState::Unplugging,
                (true, _) if ops.st.parked.contains(&s.index) => VcpuState::Offline,
                (true, Some(_)) => match mapped {
                    Some((_, true)) => VcpuState::Online,
                    // Under GuestOnline a present vCPU the guest keeps offline is one not
                    // in use, whoever offlined it.
                    Some((_, false)) if guest_online => VcpuState::Offline,
                    Some((_, false)) => VcpuState::Present,
                    None => VcpuState::Plugging,
                },
                // A plug the guest has not confirmed, while an agent that answered before
                // is silent (a paused guest): still Plugging, not done.
                (true, None)
                    if ops.st.plugging.contains(&s.index) && self.ready.load(Ordering::Relaxed) =>
                {
                    VcpuState::Plugging
                }
                (true, None) => VcpuState::Present,
                (false, _) if ops.st.failed.contains(&s.index) => VcpuState::Failed,
                (false, _) => VcpuState::Absent,
            };
            out.push(SlotObservation {
                state,
                guest_cpu: mapped.map(|m| m.0),
                host_thread,
            });
        }
        ops.hp = Some(hp);
        Ok(Observation {
            slots: out,
            guest_agent: agent.is_some(),
        })
    }

    /// Finish plugs that were interrupted (by a timeout, or by an agent restart between
    /// `device_add` and onlining): vCPUs this backend plugged that the guest has but keeps
    /// offline are onlined. vCPUs the guest offlined by itself are left alone. Returns a
    /// fresh agent view when something changed.
    async fn finish_plugs(
        &self,
        ops: &mut Ops,
        present: &[u32],
        view: &AgentView,
    ) -> Option<AgentView> {
        if ops.st.plugging.is_empty() {
            return None;
        }
        let before = ops.st.plugging.clone();
        let mut online = Vec::new();
        for &slot in &before {
            match view.slots.get(&slot) {
                _ if !present.contains(&slot) => {
                    ops.st.plugging.remove(&slot);
                }
                Some((_, true)) => {
                    ops.st.plugging.remove(&slot);
                }
                Some((logical, false)) => online.push((*logical, true)),
                // Not listed by the guest yet: still being added.
                None => {}
            }
        }
        let mut fresh = None;
        if !online.is_empty() {
            tracing::info!(vm = %self.key, cpus = ?online, "onlining vCPUs of an interrupted plug");
            match ops.qga.set_vcpus(&online, self.cfg.agent_timeout).await {
                Ok(_) => {
                    fresh = self
                        .agent_view(ops, present, self.cfg.agent_timeout)
                        .await
                        .ok()
                }
                Err(e) => {
                    tracing::warn!(vm = %self.key, error = %e, "cannot online the vCPUs of an interrupted plug")
                }
            }
            if let Some(v) = &fresh {
                ops.st
                    .plugging
                    .retain(|s| !matches!(v.slots.get(s), Some((_, true))));
            }
        }
        if ops.st.plugging != before {
            self.persist(&ops.st);
        }
        fresh
    }
}
