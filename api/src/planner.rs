//! The pure resize planner: which vCPU slots to plug or unplug to reach a target.
//!
//! No I/O and no clock: the same inputs always give the same plan, so the agent can run it
//! on every reconcile and the property tests can run it millions of times.
//!
//! Slots are numbered the way QEMU numbers x86 CPUs:
//! `index = ((socket * cores) + core) * threads + thread`, so `-smp N` boots slots `0..N`.

use crate::plan::{check_topology, count_u32, idx};
pub use crate::plan::{unit_size, Plan, PlanError, Unit};
use crate::types::{Granularity, Placement, Topology, VcpuState};

/// Where a slot sits in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId {
    /// Slot index (QEMU's CPU index).
    pub index: u32,
    /// Socket.
    pub socket: u32,
    /// Core within the socket.
    pub core: u32,
    /// Thread within the core.
    pub thread: u32,
}

impl SlotId {
    /// The guest NUMA node of the slot: one node per socket.
    pub fn numa_node(&self) -> u32 {
        self.socket
    }
}

/// Every slot of a topology, in index order.
pub fn slots(topology: &Topology) -> Vec<SlotId> {
    let mut out = Vec::new();
    let mut index = 0;
    for socket in 0..topology.sockets {
        for core in 0..topology.cores {
            for thread in 0..topology.threads {
                out.push(SlotId {
                    index,
                    socket,
                    core,
                    thread,
                });
                index += 1;
            }
        }
    }
    out
}

/// What the planner needs to know of one slot now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Current state.
    pub state: VcpuState,
    /// Plug order: a higher number was plugged later (boot vCPUs have 0).
    pub plugged_seq: u64,
}

impl SlotView {
    /// A slot without a vCPU.
    pub const ABSENT: SlotView = SlotView {
        state: VcpuState::Absent,
        plugged_seq: 0,
    };
}

/// The request to the planner.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Topology of the VM.
    pub topology: Topology,
    /// Thread or Core.
    pub granularity: Granularity,
    /// Packed or Spread.
    pub placement: Placement,
    /// vCPUs wanted.
    pub target: u32,
    /// One entry per slot, in index order.
    pub slots: &'a [SlotView],
}

/// Smallest possible target: the unit holding slot 0.
pub fn min_target(topology: &Topology, granularity: Granularity) -> u32 {
    unit_size(topology, granularity)
}

/// Check that a target can ever be reached on this topology.
pub fn check_target(
    topology: &Topology,
    granularity: Granularity,
    target: u32,
) -> Result<(), PlanError> {
    check_topology(topology)?;
    let max = topology.max_vcpus();
    if target > max {
        return Err(PlanError::AboveMax { target, max });
    }
    let min = min_target(topology, granularity);
    if target < min {
        return Err(PlanError::BelowMinimum { target, min });
    }
    if granularity == Granularity::Core && !target.is_multiple_of(topology.threads) {
        return Err(PlanError::NotWholeCores {
            target,
            threads: topology.threads,
        });
    }
    Ok(())
}

/// How many vCPUs to boot with (`-smp N` boots slots `0..N`) for a VM that should start with
/// `target` vCPUs: the whole target when placement is Packed (the first slots are what Packed
/// would choose anyway), one unit when Spread (the rest is hot-plugged across sockets).
pub fn boot_vcpus(
    topology: &Topology,
    granularity: Granularity,
    placement: Placement,
    target: u32,
) -> Result<u32, PlanError> {
    check_target(topology, granularity, target)?;
    Ok(match placement {
        Placement::Packed => target,
        Placement::Spread if topology.sockets > 1 => unit_size(topology, granularity),
        Placement::Spread => target,
    })
}

/// Plan the next resize. Slots in `Unplugging` (an unplug that did not finish before its
/// deadline) are neither counted nor reused, and their unplug is retried first; slots in
/// `Failed` are reused only after every `Absent` slot.
pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let t = &input.topology;
    check_target(t, input.granularity, input.target)?;
    let ids = slots(t);
    if input.slots.len() != ids.len() {
        return Err(PlanError::SlotCount {
            expected: t.max_vcpus(),
            got: input.slots.len(),
        });
    }
    let unit = usize::try_from(unit_size(t, input.granularity)).unwrap_or(1);
    // Units: groups of `unit` consecutive slots (a core under Core granularity).
    let units: Vec<&[SlotId]> = ids.chunks(unit).collect();
    let state = |s: &SlotId| input.slots[idx(s.index)].state;
    let current = count_u32(input.slots.iter().filter(|s| s.state.is_active()).count());

    let mut plan = Plan::default();
    // Stuck unplugs first, grouped by unit (under Core only the threads still unplugging).
    plan.unplug.extend(units.iter().filter_map(|u| {
        let stuck: Vec<u32> = u
            .iter()
            .filter(|s| state(s) == VcpuState::Unplugging && s.index != 0)
            .map(|s| s.index)
            .collect();
        (!stuck.is_empty()).then(|| Unit::new(stuck))
    }));
    if input.target > current {
        let need_units = (input.target - current).div_ceil(unit_u32(unit));
        let free: Vec<&[SlotId]> = units
            .iter()
            .copied()
            .filter(|u| {
                u.iter().all(|s| {
                    matches!(
                        state(s),
                        VcpuState::Absent | VcpuState::Failed | VcpuState::Offline
                    )
                })
            })
            .collect();
        // Absent (and parked Offline) before Failed, then the placement's order, parked
        // units first among equals (onlining one is cheaper than a plug).
        let mut per_socket = vec![0u32; idx(t.sockets)];
        for s in &ids {
            if state(s).is_active() {
                per_socket[idx(s.socket)] += 1;
            }
        }
        let mut taken = vec![false; free.len()];
        for _ in 0..need_units {
            let pick = free
                .iter()
                .enumerate()
                .filter(|(i, _)| !taken[*i])
                .min_by_key(|(_, u)| {
                    let failed = u.iter().any(|s| state(s) == VcpuState::Failed);
                    let parked = u.iter().all(|s| state(s) == VcpuState::Offline);
                    let first = u[0];
                    let spread_key = match input.placement {
                        Placement::Packed => 0,
                        Placement::Spread => per_socket[idx(first.socket)],
                    };
                    (failed, spread_key, !parked, first.index)
                })
                .map(|(i, _)| i);
            let Some(i) = pick else {
                break;
            };
            taken[i] = true;
            per_socket[idx(free[i][0].socket)] += unit_u32(unit);
            plan.plug
                .push(Unit::new(free[i].iter().map(|s| s.index).collect()));
        }
        let planned: u32 = plan.plug.iter().map(Unit::len).sum();
        plan.shortfall = (input.target - current).saturating_sub(planned);
    } else if input.target < current {
        let need_units = (current - input.target) / unit_u32(unit);
        let mut candidates: Vec<&[SlotId]> = units
            .iter()
            .copied()
            .filter(|u| u[0].index != 0 && u.iter().all(|s| state(s).is_active()))
            .collect();
        // Most recently plugged first; among equals, the highest slot first.
        candidates.sort_by_key(|u| {
            let seq = u
                .iter()
                .map(|s| input.slots[idx(s.index)].plugged_seq)
                .max();
            std::cmp::Reverse((seq, u[0].index))
        });
        for u in candidates.into_iter().take(idx(need_units)) {
            plan.unplug
                .push(Unit::new(u.iter().map(|s| s.index).collect()));
        }
    }
    Ok(plan)
}

fn unit_u32(v: usize) -> u32 {
    count_u32(v).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topo(sockets: u32, cores: u32, threads: u32) -> Topology {
        Topology::new(sockets, cores, threads)
    }

    /// Apply a plan the way a perfect VMM would: plugs come online, unplugs go absent.
    fn apply(slots: &mut [SlotView], plan: &Plan, seq: &mut u64) {
        for i in plan.plug_slots() {
            *seq += 1;
            slots[idx(i)] = SlotView {
                state: VcpuState::Online,
                plugged_seq: *seq,
            };
        }
        for i in plan.unplug_slots() {
            slots[idx(i)] = SlotView::ABSENT;
        }
    }

    fn booted(t: &Topology, n: u32) -> Vec<SlotView> {
        let mut v = vec![SlotView::ABSENT; idx(t.max_vcpus())];
        for s in v.iter_mut().take(idx(n)) {
            s.state = VcpuState::Online;
        }
        v
    }

    fn online(slots: &[SlotView]) -> u32 {
        count_u32(slots.iter().filter(|s| s.state.is_active()).count())
    }

    fn input<'a>(
        t: Topology,
        g: Granularity,
        p: Placement,
        target: u32,
        slots: &'a [SlotView],
    ) -> PlanInput<'a> {
        PlanInput {
            topology: t,
            granularity: g,
            placement: p,
            target,
            slots,
        }
    }

    #[test]
    fn packed_plugs_lowest_free_slots_in_order() {
        let t = topo(2, 2, 1);
        let s = booted(&t, 1);
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 3, &s)).unwrap();
        assert_eq!(p.plug_slots(), vec![1, 2]);
        assert!(p.unplug.is_empty());
    }

    #[test]
    fn spread_alternates_sockets() {
        let t = topo(2, 4, 1);
        let s = booted(&t, 1);
        let p = plan(&input(t, Granularity::Thread, Placement::Spread, 5, &s)).unwrap();
        // Socket 0 has slot 0, so the first plug goes to socket 1 (slot 4), then 1, 5, 2.
        assert_eq!(p.plug_slots(), vec![4, 1, 5, 2]);
    }

    #[test]
    fn core_granularity_plugs_and_unplugs_whole_cores() {
        let t = topo(1, 4, 2);
        let mut s = booted(&t, 2);
        let mut seq = 0;
        let p = plan(&input(t, Granularity::Core, Placement::Packed, 6, &s)).unwrap();
        assert_eq!(p.plug_slots(), vec![2, 3, 4, 5]);
        let units: Vec<&[u32]> = p.plug.iter().map(Unit::slots).collect();
        assert_eq!(units, [&[2, 3][..], &[4, 5][..]], "one unit per core");
        apply(&mut s, &p, &mut seq);
        let p = plan(&input(t, Granularity::Core, Placement::Packed, 4, &s)).unwrap();
        assert_eq!(
            p.unplug_slots(),
            vec![4, 5],
            "the last plugged core goes first, both threads"
        );
    }

    #[test]
    fn a_stuck_part_of_a_core_is_retried_as_one_unit() {
        let t = topo(1, 2, 2);
        let mut s = booted(&t, 4);
        // Slot 2 went; slot 3 of the same core is still unplugging.
        s[2] = SlotView::ABSENT;
        s[3].state = VcpuState::Unplugging;
        let p = plan(&input(t, Granularity::Core, Placement::Packed, 2, &s)).unwrap();
        let units: Vec<&[u32]> = p.unplug.iter().map(Unit::slots).collect();
        assert_eq!(units, [&[3][..]]);
        assert!(p.plug.is_empty());
    }

    #[test]
    fn parked_slots_are_free_and_reused_first() {
        let t = topo(1, 4, 1);
        let mut s = booted(&t, 1);
        s[3].state = VcpuState::Offline;
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 2, &s)).unwrap();
        assert_eq!(
            p.plug_slots(),
            vec![3],
            "a parked slot before a lower absent one"
        );
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 3, &s)).unwrap();
        assert_eq!(p.plug_slots(), vec![3, 1]);
        // Offline counts for nothing: shrinking never picks it.
        s[1].state = VcpuState::Online;
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 1, &s)).unwrap();
        assert_eq!(p.unplug_slots(), vec![1]);
    }

    #[test]
    fn unplug_takes_most_recent_first_and_never_slot_zero() {
        let t = topo(1, 4, 1);
        let mut s = booted(&t, 1);
        s[3] = SlotView {
            state: VcpuState::Online,
            plugged_seq: 1,
        };
        s[1] = SlotView {
            state: VcpuState::Online,
            plugged_seq: 2,
        };
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 2, &s)).unwrap();
        assert_eq!(p.unplug_slots(), vec![1]);
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 1, &s)).unwrap();
        assert_eq!(p.unplug_slots(), vec![1, 3]);
    }

    #[test]
    fn unplugging_slots_are_not_reused_and_give_a_shortfall() {
        let t = topo(1, 2, 1);
        let mut s = booted(&t, 1);
        s[1] = SlotView {
            state: VcpuState::Unplugging,
            plugged_seq: 1,
        };
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 2, &s)).unwrap();
        assert!(p.plug.is_empty());
        assert_eq!(p.shortfall, 1);
        assert_eq!(p.unplug_slots(), vec![1], "the stuck unplug is retried");
    }

    #[test]
    fn stuck_unplugs_are_retried_before_anything_else() {
        let t = topo(1, 4, 1);
        let mut s = booted(&t, 3);
        s[3] = SlotView {
            state: VcpuState::Unplugging,
            plugged_seq: 9,
        };
        // At target: only the retry.
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 3, &s)).unwrap();
        assert_eq!(p.unplug_slots(), vec![3]);
        assert!(p.plug.is_empty());
        // Shrinking further: the retry first, then the newest active slot.
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 2, &s)).unwrap();
        assert_eq!(p.unplug_slots(), vec![3, 2]);
    }

    #[test]
    fn failed_slots_are_used_last() {
        let t = topo(1, 3, 1);
        let mut s = booted(&t, 1);
        s[1] = SlotView {
            state: VcpuState::Failed,
            plugged_seq: 0,
        };
        let p = plan(&input(t, Granularity::Thread, Placement::Packed, 2, &s)).unwrap();
        assert_eq!(p.plug_slots(), vec![2]);
    }

    #[test]
    fn errors_name_the_problem() {
        let t = topo(1, 4, 2);
        let s = booted(&t, 2);
        let e = plan(&input(t, Granularity::Thread, Placement::Packed, 9, &s)).unwrap_err();
        assert_eq!(e, PlanError::AboveMax { target: 9, max: 8 });
        assert!(e.to_string().contains("maximum of 8"));
        let e = plan(&input(t, Granularity::Core, Placement::Packed, 3, &s)).unwrap_err();
        assert!(matches!(e, PlanError::NotWholeCores { .. }));
        let e = plan(&input(t, Granularity::Core, Placement::Packed, 0, &s)).unwrap_err();
        assert!(matches!(e, PlanError::BelowMinimum { min: 2, .. }));
        let e = plan(&input(
            t,
            Granularity::Thread,
            Placement::Packed,
            2,
            &s[..3],
        ))
        .unwrap_err();
        assert!(matches!(
            e,
            PlanError::SlotCount {
                expected: 8,
                got: 3
            }
        ));
    }

    #[test]
    fn boot_vcpus_prefix() {
        let t = topo(2, 2, 1);
        assert_eq!(
            boot_vcpus(&t, Granularity::Thread, Placement::Packed, 3),
            Ok(3)
        );
        assert_eq!(
            boot_vcpus(&t, Granularity::Thread, Placement::Spread, 3),
            Ok(1)
        );
        let t = topo(2, 2, 2);
        assert_eq!(
            boot_vcpus(&t, Granularity::Core, Placement::Spread, 4),
            Ok(2)
        );
    }

    fn arb_case() -> impl Strategy<Value = (Topology, Granularity, Placement, Vec<u32>)> {
        (
            1u32..=4,
            1u32..=6,
            prop_oneof![Just(1u32), Just(2), Just(4)],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_flat_map(|(sockets, cores, threads, core_g, spread)| {
                let t = topo(sockets, cores, threads);
                let g = if core_g {
                    Granularity::Core
                } else {
                    Granularity::Thread
                };
                let p = if spread {
                    Placement::Spread
                } else {
                    Placement::Packed
                };
                let unit = unit_size(&t, g);
                let units = t.max_vcpus() / unit;
                let targets = prop::collection::vec((1..=units).prop_map(move |u| u * unit), 1..20);
                (Just(t), Just(g), Just(p), targets)
            })
    }

    proptest! {
        /// Any sequence of valid targets is reached exactly, one plan per target, without
        /// exceeding the maximum, touching slot 0 or splitting a core under Core granularity.
        #[test]
        fn any_target_sequence_converges((t, g, p, targets) in arb_case()) {
            let boot = boot_vcpus(&t, g, p, targets[0]).unwrap();
            let mut s = booted(&t, boot);
            let mut seq = 0;
            let max = t.max_vcpus();
            for &target in &targets {
                let plan = plan(&input(t, g, p, target, &s)).unwrap();
                prop_assert_eq!(plan.shortfall, 0);
                prop_assert!(!plan.unplug_slots().contains(&0), "slot 0 unplugged");
                prop_assert!(plan.plug.is_empty() || plan.unplug.is_empty());
                for i in plan.plug_slots() {
                    prop_assert!(i < max);
                    prop_assert!(!s[idx(i)].state.is_active(), "slot {} plugged twice", i);
                }
                if g == Granularity::Core {
                    for u in plan.plug.iter().chain(&plan.unplug) {
                        let c = u.slots();
                        prop_assert_eq!(u.len(), t.threads, "core split: {:?}", c);
                        prop_assert_eq!(c[0] % t.threads, 0, "core split: {:?}", c);
                        for (k, &i) in c.iter().enumerate() {
                            prop_assert_eq!(i, c[0] + count_u32(k));
                        }
                    }
                }
                apply(&mut s, &plan, &mut seq);
                prop_assert!(online(&s) <= max);
                prop_assert_eq!(online(&s), target);
                prop_assert!(s[0].state.is_active(), "slot 0 must stay");
                // Planning again at the target is a no-op: plans are idempotent.
                let again = super::plan(&input(t, g, p, target, &s)).unwrap();
                prop_assert!(again.is_empty());
            }
        }

        /// Spread placement, growing only, keeps sockets within one unit of each other.
        #[test]
        fn spread_growth_is_balanced((t, g, _p, mut targets) in arb_case()) {
            targets.sort_unstable();
            let unit = unit_size(&t, g);
            let mut s = booted(&t, unit);
            let mut seq = 0;
            for &target in &targets {
                let plan = plan(&input(t, g, Placement::Spread, target.max(unit), &s)).unwrap();
                apply(&mut s, &plan, &mut seq);
                let mut per = vec![0u32; idx(t.sockets)];
                for sl in slots(&t) {
                    if s[idx(sl.index)].state.is_active() { per[idx(sl.socket)] += 1; }
                }
                let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
                prop_assert!(hi - lo <= unit, "unbalanced: {:?}", per);
            }
        }
    }
}
