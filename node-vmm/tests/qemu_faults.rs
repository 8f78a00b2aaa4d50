//! What goes wrong, on real QEMU/TCG guests: typed errors that say what to fix, the TCG
//! vCPU-thread budget, and a guest paused in the middle of an unplug.

mod common;

use common::*;
use corescale_api::{Arch, Boot, Granularity, Placement, Plan, PlanError, Topology, VcpuState};
use corescale_node_vmm::backend::{
    Backend, BackendError, Direction, ResizeOptions, VmEvent, VmHandle,
};
use corescale_node_vmm::images::{ImageDir, KERNEL_FIELD};
use corescale_node_vmm::launcher::LauncherClient;
use corescale_node_vmm::qemu::QemuBackend;
use std::time::{Duration, Instant};

/// A target above the maximum, a missing kernel, a missing QEMU binary, QEMU failing to
/// start, and QMP errors from QEMU each give a typed error whose message says what to fix;
/// a plug past the TCG budget is refused before QEMU sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_fix() {
    let env = Env::new().await;
    let topo = Topology {
        sockets: 1,
        cores: 3,
        threads: 1,
    };
    let spec = spec("errors", topo, Granularity::Thread, Placement::Packed, 1);
    let launcher = LauncherClient::new(&env.cfg.launcher_socket);

    // A missing QEMU binary, by path and by name.
    for binary in [
        "/nonexistent/qemu-system-x86_64",
        "qemu-system-corescale-none",
    ] {
        let mut cfg = env.cfg.clone();
        cfg.binary = binary.into();
        let e = QemuBackend::new(cfg)
            .start(&spec)
            .await
            .err()
            .expect("no QEMU, no guest");
        println!("[errors] missing binary: {e}");
        assert!(
            matches!(&e, BackendError::MissingBinary { binary: b, .. } if b == binary),
            "{e:?}"
        );
        assert!(e.to_string().contains("scripts/install-deps.sh"), "{e}");
    }

    // A missing kernel: resolving spec.boot in the image directory, and starting anyway.
    let images = ImageDir::new(ImageDir::default_root());
    let bad_boot = Boot {
        kernel: Some("vmlinux-6.99".into()),
        initrd: None,
        cmdline: None,
    };
    let e = images.resolve(Some(&bad_boot), Arch::X86_64).unwrap_err();
    println!("[errors] missing kernel: {e}");
    assert!(
        matches!(
            e,
            BackendError::BootPath {
                field: KERNEL_FIELD,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("spec.boot.kernel: \"vmlinux-6.99\" not found"),
        "{e}"
    );
    let e = images
        .resolve(
            Some(&Boot {
                kernel: Some("../../etc/passwd".into()),
                ..bad_boot.clone()
            }),
            Arch::X86_64,
        )
        .unwrap_err();
    assert!(e.to_string().contains("'..'"), "{e}");
    let mut bad = spec.clone();
    bad.kernel = env.dir.path().join("no-such-vmlinux");
    let e = env
        .backend
        .start(&bad)
        .await
        .err()
        .expect("no kernel, no guest");
    println!("[errors] start without kernel: {e}");
    assert!(
        matches!(
            e,
            BackendError::BootPath {
                field: KERNEL_FIELD,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("node-vmm/guest/build.sh"), "{e}");

    // QEMU refuses its command line: QEMU's own message comes back.
    let mut cfg = env.cfg.clone();
    cfg.extra_args = vec!["-no-such-option".into()];
    let e = QemuBackend::new(cfg)
        .start(&spec)
        .await
        .err()
        .expect("QEMU refuses");
    println!("[errors] QEMU refuses to start: {e}");
    assert!(matches!(e, BackendError::Launcher(_)), "{e:?}");
    assert!(
        e.to_string().contains("-no-such-option: invalid option"),
        "{e}"
    );
    assert!(e.to_string().contains("exit code 1"), "{e}");
    env.backend.cleanup(&spec.key()).await.unwrap();
    assert!(
        launcher.list().await.unwrap().is_empty(),
        "nothing left running"
    );

    // Now a real guest.
    let (vm, _) = boot(&env, &spec).await;
    let mut tr = Tracker::default();
    let obs = verify(&vm, 1).await;

    // A target above the maximum: the planner says so, and a plan naming a slot past the
    // topology is refused by the backend.
    let e = tr.plan(&spec, &obs, 4).unwrap_err();
    assert_eq!(e, PlanError::AboveMax { target: 4, max: 3 });
    println!("[errors] target above max: {e}");
    assert!(e.to_string().contains("spec.topology"), "{e}");
    let r = vm
        .resize(
            &Plan {
                plug: vec![1, 3],
                ..Default::default()
            },
            OPTS,
        )
        .await;
    let e = r.first_error().unwrap();
    println!("[errors] plan past the topology: {e}");
    assert!(
        matches!(e, BackendError::InvalidPlan(m) if m.contains("slot 3 is outside the VM's 3 slots")),
        "{e:?}"
    );
    assert!(
        r.steps.iter().all(|s| s.applied.is_none()),
        "an invalid plan does nothing"
    );
    let r = vm
        .resize(
            &Plan {
                unplug: vec![0],
                ..Default::default()
            },
            OPTS,
        )
        .await;
    assert!(
        matches!(r.first_error(), Some(BackendError::InvalidPlan(m)) if m.contains("boot vCPU")),
        "{r:?}"
    );

    // QMP errors from QEMU: plugging a slot that is already present.
    let r = vm
        .resize(
            &Plan {
                plug: vec![0],
                ..Default::default()
            },
            OPTS,
        )
        .await;
    let e = r.first_error().unwrap();
    println!("[errors] QEMU refuses a present slot: {e}");
    match e {
        BackendError::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(
                (command.as_str(), class.as_str()),
                ("device_add", "GenericError")
            );
            assert!(desc.contains("APIC ID 0 exists"), "{desc}");
            assert!(
                desc.contains("already plugged: observe the VM and plan again"),
                "{desc}"
            );
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    assert_eq!(
        vm.vcpu_budget().await,
        Some((1, 3)),
        "a refused device_add creates no vCPU thread"
    );
    verify(&vm, 1).await;

    // The TCG budget: 1 boot + 2 plugs = 3 = maxcpus; after an unplug, a plug is refused.
    resize_to(&vm, &mut tr, 3).await;
    resize_to(&vm, &mut tr, 2).await;
    let obs = vm.observe().await.unwrap();
    let plan = tr.plan(&spec, &obs, 3).unwrap();
    let r = vm.resize(&plan, OPTS).await;
    let e = r.first_error().unwrap();
    println!("[errors] TCG budget: {e}");
    assert_eq!(
        e,
        &BackendError::VcpuBudget {
            used: 3,
            max: 3,
            wanted: 1
        }
    );
    assert_eq!(e.category(), "vcpu_budget");
    verify(&vm, 2).await;
    assert!(
        launcher
            .status("test", "errors")
            .await
            .unwrap()
            .unwrap()
            .running,
        "QEMU was not pushed past its budget"
    );
    finish(&env, vm).await;
    env.shutdown().await;
}

/// A guest paused (QMP `stop`) during an unplug: the deadline passes, the slot is reported
/// Unplugging with a timeout error, nothing crashes; after `cont` a retry completes. Then
/// the guest powers off and the handle reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_during_unplug() {
    let env = Env::new().await;
    let spec = spec(
        "paused",
        Topology {
            sockets: 1,
            cores: 4,
            threads: 1,
        },
        Granularity::Thread,
        Placement::Packed,
        1,
    );
    let (vm, _) = boot(&env, &spec).await;
    let mut tr = Tracker::default();
    resize_to(&vm, &mut tr, 2).await;

    vm.qmp_command("stop", None).await.unwrap();
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent, "a paused guest's agent cannot answer");
    let plan = tr.plan(&spec, &obs, 1).unwrap();
    assert_eq!(plan.unplug, vec![1]);
    let opts = ResizeOptions {
        unplug_timeout: Duration::from_secs(3),
        plug_timeout: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let r = vm.resize(&plan, opts).await;
    let took = t0.elapsed();
    print_report("paused", "unplug while paused", &r);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "the deadline bounds the attempt: {took:?}"
    );
    let step = &r.steps[0];
    assert_eq!((step.slot, step.direction), (1, Direction::Unplug));
    assert!(step.applied.is_some(), "device_del was accepted");
    assert!(step.acked.is_none(), "the paused guest cannot eject");
    let e = step.error.as_ref().unwrap();
    assert_eq!(
        e,
        &BackendError::Timeout {
            what: "release",
            slot: 1,
            seconds: 3.0
        }
    );
    println!("[paused] {e}");
    assert!(e.to_string().contains("the next attempt may retry"), "{e}");

    let obs = vm.observe().await.unwrap();
    assert_eq!(obs.slots[1].state, VcpuState::Unplugging, "{:?}", obs.slots);
    let status = vm.qmp_command("query-status", None).await.unwrap();
    assert_eq!(status["status"], "paused", "QEMU is alive and still paused");
    // The planner retries the pending unplug first.
    let retry = tr.plan(&spec, &obs, 1).unwrap();
    assert_eq!(retry.unplug, vec![1]);

    vm.qmp_command("cont", None).await.unwrap();
    let r = vm.resize(&retry, OPTS).await;
    print_report("paused", "retry after cont", &r);
    assert!(r.first_error().is_none(), "{r:?}");
    assert!(r.steps[0].acked.is_some());
    tr.record(&r);
    let obs = verify(&vm, 1).await;
    assert_eq!(obs.slots[1].state, VcpuState::Absent);

    // The guest powers off (ACPI power button): stopped, then exited with status 0.
    vm.stop(Duration::from_secs(20)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), vm.next_event())
        .await
        .unwrap();
    assert_eq!(ev, Some(VmEvent::GuestStopped));
    let ev = tokio::time::timeout(Duration::from_secs(5), vm.next_event())
        .await
        .unwrap();
    assert_eq!(ev, Some(VmEvent::Exited { status: Some(0) }));
    vm.stop(Duration::from_secs(1)).await.unwrap();
    let key = vm.spec().key();
    drop(vm);
    env.backend.cleanup(&key).await.unwrap();
    env.shutdown().await;
}

/// `-run-with user=`: QEMU drops to the configured user (as root), and hot-plug still
/// works inside its sandbox. Without root, QEMU cannot switch users and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_configured_user() {
    let env = Env::new().await;
    let spec = spec(
        "runas",
        Topology {
            sockets: 1,
            cores: 2,
            threads: 1,
        },
        Granularity::Thread,
        Placement::Packed,
        1,
    );
    let mut cfg = env.cfg.clone();
    cfg.run_as_user = Some("nobody".into());
    let backend = QemuBackend::new(cfg);
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody exists");
    if !nix::unistd::geteuid().is_root() {
        let e = backend
            .start(&spec)
            .await
            .err()
            .expect("only root can switch users");
        println!("[runas] as a normal user: {e}");
        assert!(matches!(e, BackendError::Launcher(_)), "{e:?}");
        env.shutdown().await;
        return;
    }
    let vm = backend.start_vm(&spec).await.unwrap();
    vm.wait_guest_ready(Duration::from_secs(90)).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    println!("[runas] QEMU {uid}");
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == nobody.uid.to_string()),
        "QEMU runs as nobody: {uid}"
    );
    let mut tr = Tracker::default();
    resize_to(&vm, &mut tr, 2).await;
    resize_to(&vm, &mut tr, 1).await;
    finish(&env, vm).await;
    env.shutdown().await;
}

/// A guest without an agent still works: its vCPUs are plugged and unplugged, reported
/// Present (online state unknown), with no error; stop() kills it when it ignores the
/// power button.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_without_agent() {
    let env = Env::new().await;
    let mut spec = spec(
        "noagent",
        Topology {
            sockets: 1,
            cores: 2,
            threads: 1,
        },
        Granularity::Thread,
        Placement::Packed,
        1,
    );
    // PID 1 is `sleep`: no guest agent, no ACPI daemon.
    spec.cmdline = "rdinit=/bin/sleep -- 100000".into();
    let vm = env.backend.start_vm(&spec).await.unwrap();
    let serial = vm.dir().join("serial.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("Run /bin/sleep as init process")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the guest kernel did not reach init"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "[noagent] kernel reached init after {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(!vm.guest_ready().await);
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent);
    assert_eq!(obs.slots[0].state, VcpuState::Present);
    assert_eq!(obs.online(), 1, "without an agent, present vCPUs count");

    let r = vm
        .resize(
            &Plan {
                plug: vec![1],
                ..Default::default()
            },
            OPTS,
        )
        .await;
    print_report("noagent", "plug", &r);
    assert!(r.first_error().is_none(), "{r:?}");
    assert!(
        r.steps[0].acked.is_some() && r.steps[0].online.is_none(),
        "{r:?}"
    );
    let obs = vm.observe().await.unwrap();
    assert_eq!(obs.slots[1].state, VcpuState::Present);
    assert_eq!(obs.slots[1].guest_cpu, None);
    assert_eq!(obs.online(), 2);
    let r = vm
        .resize(
            &Plan {
                unplug: vec![1],
                ..Default::default()
            },
            OPTS,
        )
        .await;
    print_report("noagent", "unplug", &r);
    assert!(r.first_error().is_none(), "{r:?}");
    assert_eq!(vm.observe().await.unwrap().online(), 1);

    let t0 = Instant::now();
    vm.stop(Duration::from_secs(1)).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let mut events = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), vm.next_event()).await {
        events.push(ev);
    }
    assert_eq!(
        events.last(),
        Some(&VmEvent::Exited {
            status: Some(128 + 9)
        }),
        "killed after the grace: {events:?}"
    );
    let key = vm.spec().key();
    drop(vm);
    env.backend.cleanup(&key).await.unwrap();
    env.shutdown().await;
}
