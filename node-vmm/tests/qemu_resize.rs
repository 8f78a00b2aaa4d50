//! Resizes of real QEMU/TCG guests, checked inside the guest through its agent:
//! Thread granularity, Core granularity with SMT threads, Spread placement over sockets.

mod common;

use common::*;
use corescale_api::{Granularity, Placement, Topology, VcpuState};
use corescale_node_vmm::backend::{Backend, BackendError, Direction, VmEvent, VmHandle};
use corescale_node_vmm::launcher::{KillSignal, LauncherClient};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Boot to agent-ready (boot time reported), then 1 -> 4 -> 2 -> 3 vCPUs, each step checked
/// in the slot states and in the guest's online CPU list; vCPU threads and their CPU time;
/// and the VMM's death is reported within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_granularity_1_4_2_3() {
    let env = Env::new().await;
    let spec = spec(
        "threads",
        Topology {
            sockets: 1,
            cores: 8,
            threads: 1,
        },
        Granularity::Thread,
        Placement::Packed,
        1,
    );
    let (vm, boot) = boot(&env, &spec).await;
    assert!(boot < Duration::from_secs(60));
    let obs = verify(&vm, 1).await;
    assert_eq!(obs.slots.len(), 8);
    assert_eq!(obs.slots[0].guest_cpu, Some(0));
    // The per-VM directory is private, and so are the sockets and the console log.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(vm.dir()), 0o700);
    for f in [
        "qmp.sock",
        "qga.sock",
        "console.sock",
        "serial.log",
        "vm.json",
        "backend.json",
    ] {
        assert_eq!(mode(&vm.dir().join(f)), 0o600, "{f}");
    }
    let record = corescale_node_vmm::launcher::read_record(vm.dir()).unwrap();
    assert_eq!(record.pid, vm.pid());
    assert_eq!(
        serde_json::from_value::<corescale_node_vmm::backend::VmSpec>(record.spec).unwrap(),
        spec
    );
    let version = vm.qemu_version();
    println!(
        "[threads] QEMU {}.{}.{}",
        version.major, version.minor, version.micro
    );

    let mut tr = Tracker::default();
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(
        r.steps
            .iter()
            .map(|s| (s.slot, s.direction))
            .collect::<Vec<_>>(),
        vec![
            (1, Direction::Plug),
            (2, Direction::Plug),
            (3, Direction::Plug)
        ]
    );
    let obs = vm.observe().await.unwrap();
    for slot in 1..4 {
        check_guest_topology(&vm, &obs, slot).await;
    }
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(
        r.steps
            .iter()
            .map(|s| (s.slot, s.direction))
            .collect::<Vec<_>>(),
        vec![(3, Direction::Unplug), (2, Direction::Unplug)],
        "most recent first"
    );
    let r = resize_to(&vm, &mut tr, 3).await;
    assert_eq!(r.steps.len(), 1);
    let obs = vm.observe().await.unwrap();
    let states: Vec<VcpuState> = obs.slots.iter().map(|s| s.state).collect();
    assert_eq!(
        &states[..4],
        &[
            VcpuState::Online,
            VcpuState::Online,
            VcpuState::Online,
            VcpuState::Absent
        ]
    );
    check_guest_topology(&vm, &obs, 2).await;
    assert_eq!(
        vm.vcpu_budget().await,
        Some((5, 8)),
        "1 boot + 3 + 1 vCPU threads created"
    );

    // vCPU threads: one per present slot, with CPU time from /proc.
    let secs = vm.vcpu_cpu_seconds().await.unwrap();
    assert_eq!(
        secs.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(secs[0].1 > 0.1, "the boot vCPU ran the boot: {secs:?}");
    let threads: BTreeSet<i32> = obs.slots.iter().filter_map(|s| s.host_thread).collect();
    assert_eq!(threads.len(), 3);
    for tid in &threads {
        assert!(
            std::path::Path::new(&format!("/proc/{}/task/{tid}", vm.pid())).exists(),
            "thread {tid} belongs to QEMU"
        );
    }

    // A resize starts from the handle's own copy of QEMU's CPU list, kept current through
    // its plugs and unplugs. A raw QMP command may change QEMU behind it: here slot 3 is
    // plugged by hand, and an unplug of slot 3 planned without observing again must
    // still eject it (not take the old copy's word that the slot is already empty).
    let listed = |hp: &serde_json::Value, id: &str| {
        hp.as_array()
            .unwrap()
            .iter()
            .any(|c| c["qom-path"].as_str() == Some(&format!("/machine/peripheral/{id}")))
    };
    let hp = vm
        .qmp_command("query-hotpluggable-cpus", None)
        .await
        .unwrap();
    let slot3 = hp
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["props"]["core-id"] == 3)
        .expect("QEMU lists slot 3")
        .clone();
    let mut add = serde_json::json!({"driver": slot3["type"], "id": "cpu-s0-c3-t0"});
    for (k, v) in slot3["props"].as_object().unwrap() {
        add[k] = v.clone();
    }
    vm.qmp_command("device_add", Some(add)).await.unwrap();
    let plan = unplug(&[3]);
    let r = vm.resize(&plan, OPTS).await;
    print_report("threads", "unplug of a slot plugged by hand", &r);
    assert!(r.first_error().is_none(), "{:?}", r.first_error());
    let hp = vm
        .qmp_command("query-hotpluggable-cpus", None)
        .await
        .unwrap();
    assert!(!listed(&hp, "cpu-s0-c3-t0"), "slot 3 was ejected: {hp}");
    verify(&vm, 3).await;

    // The VMM dies: the handle reports it within 2 s, with the signal as status.
    let launcher = LauncherClient::new(&env.cfg.launcher_socket);
    let t0 = Instant::now();
    launcher
        .kill("test", "threads", KillSignal::Kill)
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(2), vm.next_event())
        .await
        .expect("exit seen within 2 s");
    println!(
        "[threads] VMM exit seen after {:.0} ms: {ev:?}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        ev,
        Some(VmEvent::Exited {
            status: Some(128 + 9)
        })
    );
    let e = vm.observe().await.unwrap_err();
    assert!(matches!(e, BackendError::NotRunning(_)), "{e}");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), vm.next_event())
            .await
            .unwrap(),
        None,
        "closed after the exit"
    );
    vm.stop(Duration::from_secs(1)).await.unwrap();
    let key = vm.spec().key();
    drop(vm);
    env.backend.cleanup(&key).await.unwrap();
    assert!(!env.cfg.state_dir.join("test/threads").exists());
    env.shutdown().await;
}

/// Core granularity with 2 threads per core: a plug adds both threads of a core (SMT
/// siblings in the guest), an unplug takes both; once the TCG thread budget is spent the
/// unplugged cores are parked and a later plug onlines them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_granularity_two_threads() {
    let env = Env::new().await;
    let spec = spec(
        "cores",
        Topology {
            sockets: 1,
            cores: 3,
            threads: 2,
        },
        Granularity::Core,
        Placement::Packed,
        2,
    );
    let (vm, _) = boot(&env, &spec).await;
    verify(&vm, 2).await;
    let mut tr = Tracker::default();

    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(
        r.steps.iter().map(|s| s.slot).collect::<Vec<_>>(),
        vec![2, 3],
        "both threads of core 1"
    );
    let obs = vm.observe().await.unwrap();
    let (a, _) = check_guest_topology(&vm, &obs, 2).await;
    let (b, _) = check_guest_topology(&vm, &obs, 3).await;
    let siblings = parse_cpulist(
        &guest(
            &vm,
            &format!("/sys/devices/system/cpu/cpu{a}/topology/thread_siblings_list"),
        )
        .await,
    );
    assert_eq!(
        siblings,
        BTreeSet::from([a, b]),
        "the two new vCPUs are SMT siblings of one core"
    );

    let r = resize_to(&vm, &mut tr, 6).await;
    assert_eq!(
        r.steps.iter().map(|s| s.slot).collect::<Vec<_>>(),
        vec![4, 5]
    );
    let r = resize_to(&vm, &mut tr, 2).await;
    assert_eq!(
        r.steps
            .iter()
            .map(|s| (s.slot, s.direction))
            .collect::<Vec<_>>(),
        vec![
            (4, Direction::Unplug),
            (5, Direction::Unplug),
            (2, Direction::Unplug),
            (3, Direction::Unplug)
        ]
    );
    let obs = verify(&vm, 2).await;
    // 6 vCPU threads created = maxcpus: under TCG removing them would leave no way back,
    // so both cores are parked (Offline: kept by QEMU, offline in the guest)...
    assert_eq!(vm.vcpu_budget().await, Some((6, 6)));
    assert!(
        obs.slots[2..].iter().all(|s| s.state == VcpuState::Offline),
        "{obs:?}"
    );
    // ...and the next plug onlines a parked core again, whole, with no new thread.
    let r = resize_to(&vm, &mut tr, 4).await;
    assert_eq!(
        r.steps.iter().map(|s| s.slot).collect::<Vec<_>>(),
        vec![2, 3],
        "the lowest parked core"
    );
    let obs = verify(&vm, 4).await;
    let (a, _) = check_guest_topology(&vm, &obs, 2).await;
    let (b, _) = check_guest_topology(&vm, &obs, 3).await;
    assert_ne!(a, b);
    assert_eq!(
        vm.vcpu_budget().await,
        Some((6, 6)),
        "no thread was created"
    );
    finish(&env, vm).await;
    env.shutdown().await;
}

/// Spread placement over 2 sockets: new vCPUs alternate sockets, and the guest sees them on
/// the matching physical package and NUMA node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_over_two_sockets() {
    let env = Env::new().await;
    let topo = Topology {
        sockets: 2,
        cores: 2,
        threads: 1,
    };
    let boot_n =
        corescale_api::planner::boot_vcpus(&topo, Granularity::Thread, Placement::Spread, 4)
            .unwrap();
    assert_eq!(boot_n, 1);
    let spec = spec(
        "spread",
        topo,
        Granularity::Thread,
        Placement::Spread,
        boot_n,
    );
    let (vm, _) = boot(&env, &spec).await;
    assert_eq!(
        parse_cpulist(&guest(&vm, "/sys/devices/system/node/online").await),
        BTreeSet::from([0, 1]),
        "two NUMA nodes"
    );
    let mut tr = Tracker::default();
    let mut sockets = Vec::new();
    for target in 2..=4 {
        let r = resize_to(&vm, &mut tr, target).await;
        assert_eq!(r.steps.len(), 1);
        let slot = r.steps[0].slot;
        let obs = vm.observe().await.unwrap();
        let (cpu, package) = check_guest_topology(&vm, &obs, slot).await;
        let node = parse_cpulist(
            &guest(
                &vm,
                &format!("/sys/devices/system/node/node{package}/cpulist"),
            )
            .await,
        );
        assert!(
            node.contains(&cpu),
            "cpu{cpu} (slot {slot}) is in NUMA node {package}: {node:?}"
        );
        sockets.push(package);
    }
    assert_eq!(sockets, vec![1, 0, 1], "alternating sockets");
    let n0 = parse_cpulist(&guest(&vm, "/sys/devices/system/node/node0/cpulist").await);
    let n1 = parse_cpulist(&guest(&vm, "/sys/devices/system/node/node1/cpulist").await);
    assert_eq!((n0.len(), n1.len()), (2, 2), "balanced: {n0:?} {n1:?}");
    finish(&env, vm).await;
    env.shutdown().await;
}
