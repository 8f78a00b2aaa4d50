//! What a resize plan is: units of vCPU slots to plug and unplug, and why none can be made.

use crate::types::{Granularity, Topology};
use thiserror::Error;

/// Why no plan can be made.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum PlanError {
    /// The target is above the VM's slot count.
    #[error("target of {target} vCPUs is above the VM's maximum of {max} (spec.topology sockets*cores*threads)")]
    AboveMax {
        /// Requested vCPUs.
        target: u32,
        /// Slots of the VM.
        max: u32,
    },
    /// The target would remove the boot vCPU.
    #[error("target of {target} vCPUs is below the minimum of {min}: the boot vCPU (slot 0) and its core always stay")]
    BelowMinimum {
        /// Requested vCPUs.
        target: u32,
        /// Smallest possible target.
        min: u32,
    },
    /// Core granularity needs whole cores.
    #[error("target of {target} vCPUs is not a multiple of {threads} threads per core, which spec.granularity Core requires")]
    NotWholeCores {
        /// Requested vCPUs.
        target: u32,
        /// Threads per core.
        threads: u32,
    },
    /// The caller passed slot states that do not match the topology.
    #[error("slot states list {got} slots but the topology has {expected}")]
    SlotCount {
        /// Slots in the topology.
        expected: u32,
        /// Slots given.
        got: usize,
    },
    /// A slot named in a plan is not in the topology.
    #[error("slot {slot} is outside the VM's {max} slots (spec.topology sockets*cores*threads)")]
    SlotOutside {
        /// The slot.
        slot: u32,
        /// Slots of the VM.
        max: u32,
    },
    /// A slot is named twice in a plan.
    #[error("slot {slot} appears twice in the plan")]
    SlotTwice {
        /// The slot.
        slot: u32,
    },
    /// A plan names part of a core under Core granularity.
    #[error("granularity Core acts on whole cores: the plan has slots {slots:?} of the core with slots {core:?}")]
    PartOfCore {
        /// The slots named.
        slots: Vec<u32>,
        /// Every slot of their core.
        core: Vec<u32>,
    },
    /// The topology is empty or too large.
    #[error("topology {sockets}x{cores}x{threads} must have between 1 and {max} slots")]
    BadTopology {
        /// Sockets.
        sockets: u32,
        /// Cores per socket.
        cores: u32,
        /// Threads per core.
        threads: u32,
        /// Largest allowed slot count.
        max: u32,
    },
}

/// vCPU slots the VMM acts on together, ascending: one slot under Thread granularity, every
/// thread of one core under Core (all of them; only an unplug retried after it finished for
/// some threads of a core and not others holds fewer: the ones still unplugging).
///
/// Units come only from [`plan`](crate::planner::plan) or [`Plan::of_slots`], which group and check them, so a
/// backend acts on them as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit(Vec<u32>);

impl Unit {
    /// A unit of `slots`, ascending (the planner's and `of_slots`' own: they checked them).
    pub(crate) fn new(slots: Vec<u32>) -> Self {
        Unit(slots)
    }

    /// The unit's slot indexes, ascending.
    pub fn slots(&self) -> &[u32] {
        &self.0
    }

    /// How many vCPUs it holds.
    pub fn len(&self) -> u32 {
        count_u32(self.0.len())
    }

    /// Whether it holds none (never true of a unit a plan holds).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Units to plug and unplug, in the order to act on them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Units to plug, in order.
    pub plug: Vec<Unit>,
    /// Units to unplug, in order (retries of stuck unplugs first).
    pub unplug: Vec<Unit>,
    /// vCPUs the plan cannot reach now because slots are busy (e.g. stuck Unplugging).
    pub shortfall: u32,
}

impl Plan {
    /// Whether nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.plug.is_empty() && self.unplug.is_empty()
    }

    /// Every slot to plug, in order.
    pub fn plug_slots(&self) -> Vec<u32> {
        self.plug.iter().flat_map(|u| u.0.iter().copied()).collect()
    }

    /// Every slot to unplug, in order.
    pub fn unplug_slots(&self) -> Vec<u32> {
        self.unplug
            .iter()
            .flat_map(|u| u.0.iter().copied())
            .collect()
    }

    /// A plan of explicit slots (for benchmarks, tests and tools that choose slots
    /// themselves), grouped into units the way [`plan`] groups them: under Core
    /// granularity consecutive slots of one core form a unit, which must hold the whole
    /// core. Refused: a slot outside the topology, a slot named twice, part of a core.
    pub fn of_slots(
        topology: &Topology,
        granularity: Granularity,
        plug: &[u32],
        unplug: &[u32],
    ) -> Result<Plan, PlanError> {
        check_topology(topology)?;
        let mut seen = std::collections::BTreeSet::new();
        for &slot in unplug.iter().chain(plug) {
            if slot >= topology.max_vcpus() {
                return Err(PlanError::SlotOutside {
                    slot,
                    max: topology.max_vcpus(),
                });
            }
            if !seen.insert(slot) {
                return Err(PlanError::SlotTwice { slot });
            }
        }
        let group = |slots: &[u32]| -> Result<Vec<Unit>, PlanError> {
            let threads = unit_size(topology, granularity);
            let mut out: Vec<Vec<u32>> = Vec::new();
            for &s in slots {
                match out.iter_mut().find(|u| u[0] / threads == s / threads) {
                    Some(u) => u.push(s),
                    None => out.push(vec![s]),
                }
            }
            out.into_iter()
                .map(|mut u| {
                    u.sort_unstable();
                    if u.len() != idx(threads) {
                        let core = u[0] / threads;
                        return Err(PlanError::PartOfCore {
                            slots: u,
                            core: (core * threads..(core + 1) * threads).collect(),
                        });
                    }
                    Ok(Unit(u))
                })
                .collect()
        };
        Ok(Plan {
            plug: group(plug)?,
            unplug: group(unplug)?,
            shortfall: 0,
        })
    }
}

/// vCPUs in one plug unit: 1 for Thread granularity, threads per core for Core.
pub fn unit_size(topology: &Topology, granularity: Granularity) -> u32 {
    match granularity {
        Granularity::Thread => 1,
        Granularity::Core => topology.threads,
    }
}

pub(crate) fn check_topology(t: &Topology) -> Result<(), PlanError> {
    let max = crate::types::MAX_VCPUS;
    let n = t.max_vcpus();
    if t.sockets == 0 || t.cores == 0 || t.threads == 0 || n > max {
        return Err(PlanError::BadTopology {
            sockets: t.sockets,
            cores: t.cores,
            threads: t.threads,
            max,
        });
    }
    Ok(())
}

pub(crate) fn idx(v: u32) -> usize {
    usize::try_from(v).expect("u32 fits in usize on supported targets")
}
pub(crate) fn count_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_slots_are_grouped_into_units_and_checked() {
        let t = Topology::new(1, 3, 2);
        let p = Plan::of_slots(&t, Granularity::Thread, &[2, 3, 5], &[]).unwrap();
        assert_eq!(p.plug.len(), 3, "one unit per slot under Thread");
        let p = Plan::of_slots(&t, Granularity::Core, &[5, 2, 4, 3], &[]).unwrap();
        let units: Vec<&[u32]> = p.plug.iter().map(Unit::slots).collect();
        assert_eq!(
            units,
            [&[4, 5][..], &[2, 3][..]],
            "the order of first mention"
        );
        let e = Plan::of_slots(&t, Granularity::Core, &[2, 3, 5], &[]).unwrap_err();
        assert!(e.to_string().contains("whole cores"), "{e}");
        let e = Plan::of_slots(&t, Granularity::Thread, &[6], &[]).unwrap_err();
        assert!(e.to_string().contains("outside the VM's 6 slots"), "{e}");
        let e = Plan::of_slots(&t, Granularity::Thread, &[2], &[2]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
