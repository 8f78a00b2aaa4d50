//! Fuzzing the planner (issue 8, part 5): arbitrary slot-state vectors (every state,
//! including Plugging, Unplugging and Failed), arbitrary topologies (including empty, huge
//! and overflowing ones), arbitrary targets and slot counts that do not match. `plan` must
//! never panic; it must refuse what is invalid with an error; and whatever plan it returns
//! must be safe to act on: never unplug slot 0, never plug a slot that holds a vCPU or is
//! still unplugging, never name a slot outside the topology, never leave more vCPUs than
//! the topology has.

use corescale_api::planner::{check_target, slots};
use corescale_api::{
    plan, Granularity, Placement, PlanError, PlanInput, SlotView, Topology, VcpuState, MAX_VCPUS,
};
use proptest::prelude::*;
use std::collections::HashSet;

fn state() -> impl Strategy<Value = VcpuState> {
    proptest::sample::select(VcpuState::ALL.to_vec())
}

fn slot_view() -> impl Strategy<Value = SlotView> {
    (state(), any::<u64>()).prop_map(|(state, plugged_seq)| SlotView { state, plugged_seq })
}

fn granularity() -> impl Strategy<Value = Granularity> {
    prop_oneof![Just(Granularity::Thread), Just(Granularity::Core)]
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![Just(Placement::Packed), Just(Placement::Spread)]
}

/// Mostly small valid topologies, some with a zero dimension, some far too large, some
/// whose product overflows a u32.
fn topology() -> impl Strategy<Value = Topology> {
    prop_oneof![
        6 => (1u32..=4, 1u32..=8, 1u32..=4),
        1 => (0u32..=2, 0u32..=300, 0u32..=9),
        1 => (any::<u32>(), any::<u32>(), any::<u32>()),
        1 => (Just(u32::MAX), Just(u32::MAX), Just(2u32)),
    ]
    .prop_map(|(sockets, cores, threads)| Topology {
        sockets,
        cores,
        threads,
    })
}

/// A slot count that mostly matches the topology (capped so huge topologies stay cheap),
/// sometimes off by a few.
fn case() -> impl Strategy<Value = (Topology, Granularity, Placement, u32, Vec<SlotView>)> {
    (topology(), granularity(), placement(), any::<u8>(), 0u8..8).prop_flat_map(
        |(t, g, p, skew, which)| {
            let n = usize::try_from(t.max_vcpus().min(300)).unwrap_or(300);
            let len = match which {
                0 => n.saturating_sub(1),
                1 => n + 1,
                2 => usize::from(skew % 16),
                _ => n,
            };
            let target = prop_oneof![
                3 => 0u32..=40,
                1 => any::<u32>(),
                1 => Just(t.max_vcpus()),
                1 => Just(t.max_vcpus().saturating_add(1)),
            ];
            (
                Just(t),
                Just(g),
                Just(p),
                target,
                proptest::collection::vec(slot_view(), len),
            )
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn plan_never_panics_refuses_invalid_input_and_returns_only_safe_plans(
        (topology, granularity, placement, target, views) in case()
    ) {
        let input = PlanInput { topology, granularity, placement, target, slots: &views };
        let result = plan(&input);
        let max = topology.max_vcpus();
        let bad_topology = topology.sockets == 0
            || topology.cores == 0
            || topology.threads == 0
            || max > MAX_VCPUS;
        let target_ok = check_target(&topology, granularity, target).is_ok();
        let count_ok = !bad_topology && usize::try_from(max).ok() == Some(views.len());
        match result {
            Err(e) => {
                // Only invalid inputs are refused, each with the error naming what is wrong.
                prop_assert!(
                    !target_ok || !count_ok,
                    "a valid input was refused: {e} ({topology:?}, {granularity:?}, target {target}, {} slots)",
                    views.len()
                );
                if bad_topology {
                    prop_assert!(matches!(e, PlanError::BadTopology { .. }), "{e:?}");
                }
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(p) => {
                prop_assert!(!bad_topology, "a plan for the invalid topology {topology:?}");
                prop_assert!(target_ok, "a plan for the invalid target {target} on {topology:?}");
                prop_assert!(count_ok, "a plan for {} slot states on {topology:?}", views.len());
                let n = views.len();
                let in_range = |i: &u32| usize::try_from(*i).is_ok_and(|i| i < n);
                prop_assert!(p.plug_slots().iter().all(in_range), "plug outside the topology: {p:?}");
                prop_assert!(p.unplug_slots().iter().all(in_range), "unplug outside the topology: {p:?}");
                prop_assert!(!p.unplug_slots().contains(&0), "slot 0 unplugged: {p:?} from {views:?}");
                let st = |i: u32| views[usize::try_from(i).unwrap()].state;
                for i in p.plug_slots() {
                    prop_assert!(
                        matches!(st(i), VcpuState::Absent | VcpuState::Failed | VcpuState::Offline),
                        "plugs slot {i} which is {:?}: {p:?}", st(i)
                    );
                }
                for i in p.unplug_slots() {
                    prop_assert!(
                        st(i).is_active() || st(i) == VcpuState::Unplugging,
                        "unplugs slot {i} which is {:?}: {p:?}", st(i)
                    );
                }
                let plug: HashSet<u32> = p.plug_slots().iter().copied().collect();
                let unplug: HashSet<u32> = p.unplug_slots().iter().copied().collect();
                prop_assert_eq!(plug.len(), p.plug_slots().len(), "a slot plugged twice");
                prop_assert_eq!(unplug.len(), p.unplug_slots().len(), "a slot unplugged twice");
                prop_assert!(plug.is_disjoint(&unplug));
                let active = views.iter().filter(|v| v.state.is_active()).count();
                let removed = p.unplug_slots().iter().filter(|&&i| st(i).is_active()).count();
                let after = active - removed + p.plug_slots().len();
                prop_assert!(
                    after <= usize::try_from(max).unwrap(),
                    "{after} vCPUs after the plan, above the maximum {max}"
                );
                // Growing never overshoots the target by more than one unit (Core plugs whole
                // cores); shrinking never goes below it.
                let target = usize::try_from(target).unwrap();
                if target > active {
                    let unit = usize::try_from(match granularity {
                        Granularity::Thread => 1,
                        Granularity::Core => topology.threads,
                    })
                    .unwrap();
                    prop_assert!(after < target + unit, "overshoot: {after} for {target}");
                    prop_assert!(p.unplug_slots().iter().all(|&i| st(i) == VcpuState::Unplugging));
                } else {
                    prop_assert!(p.plug.is_empty(), "plugs while at or above the target: {p:?}");
                    prop_assert!(after >= target, "shrinks below the target: {after} < {target}");
                }
                // Every slot named is one of the topology's slots.
                let ids = slots(&topology);
                prop_assert_eq!(ids.len(), n);
            }
        }
    }
}

/// The cases a random search is unlikely to hit, written out.
#[test]
fn edge_cases_are_refused_with_the_right_error() {
    let t = |sockets, cores, threads| Topology {
        sockets,
        cores,
        threads,
    };
    let four = [SlotView::ABSENT; 4];
    let run = |topology, target, slots: &[SlotView]| {
        plan(&PlanInput {
            topology,
            granularity: Granularity::Thread,
            placement: Placement::Spread,
            target,
            slots,
        })
    };
    assert!(matches!(
        run(t(u32::MAX, u32::MAX, u32::MAX), 1, &four),
        Err(PlanError::BadTopology { .. })
    ));
    assert!(matches!(
        run(t(0, 4, 1), 1, &four),
        Err(PlanError::BadTopology { .. })
    ));
    assert!(matches!(
        run(t(1, 4, 1), 5, &four),
        Err(PlanError::AboveMax { target: 5, max: 4 })
    ));
    assert!(matches!(
        run(t(1, 4, 1), 0, &four),
        Err(PlanError::BelowMinimum { .. })
    ));
    assert!(matches!(
        run(t(1, 5, 1), 2, &four),
        Err(PlanError::SlotCount {
            expected: 5,
            got: 4
        })
    ));
    // Slot 0 stuck Unplugging (a state the agent never writes, but a status can say
    // anything): the retry list still leaves slot 0 alone.
    let mut odd = [SlotView::ABSENT; 4];
    odd[0].state = VcpuState::Unplugging;
    odd[1].state = VcpuState::Unplugging;
    let p = run(t(1, 4, 1), 1, &odd).unwrap();
    assert_eq!(p.unplug_slots(), vec![1]);
}
