//! The planner under spec.resizeMethod GuestOnline: every slot is present from boot, so the
//! free pool is the Offline slots (no Absent slot ever), and the rules are the Hotplug
//! ones: never slot 0, whole cores under Core, Spread balances sockets.

use corescale_api::{plan, Granularity, Placement, PlanInput, SlotView, Topology, VcpuState};

/// A GuestOnline VM after boot: slots `online` Online, every other slot Offline.
fn booted(t: &Topology, online: &[u32]) -> Vec<SlotView> {
    (0..t.max_vcpus())
        .map(|i| SlotView {
            state: if online.contains(&i) {
                VcpuState::Online
            } else {
                VcpuState::Offline
            },
            plugged_seq: 0,
        })
        .collect()
}

/// Apply a plan as a GuestOnline backend does: plugs come Online, unplugs go Offline.
fn apply(slots: &mut [SlotView], p: &corescale_api::Plan, seq: &mut u64) {
    for i in p.plug_slots() {
        *seq += 1;
        slots[i as usize] = SlotView {
            state: VcpuState::Online,
            plugged_seq: *seq,
        };
    }
    for i in p.unplug_slots() {
        slots[i as usize] = SlotView {
            state: VcpuState::Offline,
            plugged_seq: 0,
        };
    }
}

fn step(
    t: Topology,
    g: Granularity,
    p: Placement,
    target: u32,
    slots: &mut [SlotView],
    seq: &mut u64,
) -> corescale_api::Plan {
    let out = plan(&PlanInput {
        topology: t,
        granularity: g,
        placement: p,
        target,
        slots,
    })
    .unwrap();
    assert_eq!(out.shortfall, 0, "offline slots are free: {out:?}");
    apply(slots, &out, seq);
    let online = slots
        .iter()
        .filter(|s| s.state == VcpuState::Online)
        .count();
    assert_eq!(online, target as usize);
    assert_eq!(slots[0].state, VcpuState::Online, "slot 0 stays online");
    out
}

#[test]
fn offline_slots_are_the_free_pool_1_4_2_3() {
    let t = Topology::new(1, 4, 1);
    let mut s = booted(&t, &[0]);
    let mut seq = 0;
    let (g, p) = (Granularity::Thread, Placement::Packed);
    assert_eq!(step(t, g, p, 4, &mut s, &mut seq).plug_slots(), [1, 2, 3]);
    assert_eq!(
        step(t, g, p, 2, &mut s, &mut seq).unplug_slots(),
        [3, 2],
        "the most recently onlined first"
    );
    assert_eq!(step(t, g, p, 3, &mut s, &mut seq).plug_slots(), [2]);
    // Down to the boot vCPU, never below.
    assert_eq!(step(t, g, p, 1, &mut s, &mut seq).unplug_slots(), [2, 1]);
}

#[test]
fn core_granularity_onlines_whole_cores() {
    let t = Topology::new(1, 3, 2);
    let mut s = booted(&t, &[0, 1]);
    let mut seq = 0;
    let (g, p) = (Granularity::Core, Placement::Packed);
    assert_eq!(
        step(t, g, p, 6, &mut s, &mut seq).plug_slots(),
        [2, 3, 4, 5]
    );
    assert_eq!(step(t, g, p, 4, &mut s, &mut seq).unplug_slots(), [4, 5]);
    assert_eq!(step(t, g, p, 2, &mut s, &mut seq).unplug_slots(), [2, 3]);
}

#[test]
fn spread_balances_sockets_over_offline_slots() {
    let t = Topology::new(2, 2, 1);
    let mut s = booted(&t, &[0]);
    let mut seq = 0;
    let (g, p) = (Granularity::Thread, Placement::Spread);
    assert_eq!(
        step(t, g, p, 2, &mut s, &mut seq).plug_slots(),
        [2],
        "socket 1 first"
    );
    assert_eq!(step(t, g, p, 4, &mut s, &mut seq).plug_slots(), [1, 3]);
    let down = step(t, g, p, 2, &mut s, &mut seq).unplug_slots();
    assert_eq!(down, [3, 1]);
    let per_socket = |sock: usize| {
        s[sock * 2..sock * 2 + 2]
            .iter()
            .filter(|v| v.state == VcpuState::Online)
            .count()
    };
    assert_eq!((per_socket(0), per_socket(1)), (1, 1));
}
