//! What goes wrong, on real QEMU/TCG guests: typed errors that say what to fix, the TCG
//! vCPU-thread budget, a guest paused in the middle of an unplug or a plug, and a damaged
//! per-VM state directory.

mod common;

use common::*;
use corescale_api::{Arch, Boot, Plan, PlanError, VcpuState};
use corescale_node_vmm::backend::qemu::QemuBackend;
use corescale_node_vmm::backend::{
    Backend, BackendError, Direction, ResizeOptions, VmEvent, VmHandle,
};
use corescale_node_vmm::images::{ImageDir, ImageError, KERNEL_FIELD};
use corescale_node_vmm::launcher::{self, LauncherClient, VmRecord};
use std::time::{Duration, Instant};

/// A target above the maximum, a missing kernel, a missing QEMU binary, QEMU failing to
/// start, and QMP errors from QEMU each give a typed error whose message says what to fix;
/// once the TCG budget is spent, unplugged vCPUs are parked and plugged back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_fix() {
    let env = Env::new().await;
    let spec = thread_spec("errors", 3);
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
            ImageError::BootPath {
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

    // A target above the maximum: the planner says so; a plan naming a slot past the
    // topology cannot be made for it, and one made for a wider VM is refused by QEMU's own
    // list, with nothing done.
    let e = tr.plan(&spec, &obs, 4).unwrap_err();
    assert_eq!(e, PlanError::AboveMax { target: 4, max: 3 });
    println!("[errors] target above max: {e}");
    assert!(e.to_string().contains("spec.topology"), "{e}");
    let e = Plan::of_slots(&spec.topology, spec.granularity, &[1, 3], &[]).unwrap_err();
    println!("[errors] plan past the topology: {e}");
    assert_eq!(e, PlanError::SlotOutside { slot: 3, max: 3 });
    let r = vm.resize(&plug(&[3]), OPTS).await;
    let e = r.first_error().unwrap();
    assert!(
        matches!(e, BackendError::Protocol(m) if m.contains("does not list vCPU slot 3")),
        "{e:?}"
    );
    assert!(
        r.steps.iter().all(|s| s.applied.is_none()),
        "a slot the VM does not have is not plugged"
    );
    let r = vm.resize(&unplug(&[0]), OPTS).await;
    assert!(
        matches!(r.first_error(), Some(BackendError::InvalidPlan(m)) if m.contains("boot vCPU")),
        "{r:?}"
    );

    // QMP errors from QEMU: plugging a slot that is already present.
    let r = vm.resize(&plug(&[0]), OPTS).await;
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

    // The TCG budget: 1 boot + 2 plugs = 3 = maxcpus; an unplug then parks the vCPU
    // (Offline) rather than remove it for good, and the next plug onlines it again with
    // no new thread. (A guest without an agent gets the typed refusal instead:
    // guest_without_agent.)
    resize_to(&vm, &mut tr, 3).await;
    resize_to(&vm, &mut tr, 2).await;
    let obs = vm.observe().await.unwrap();
    let parked: Vec<usize> = (0..obs.slots.len())
        .filter(|&i| obs.slots[i].state == VcpuState::Offline)
        .collect();
    assert_eq!(parked.len(), 1, "{obs:?}");
    let r = resize_to(&vm, &mut tr, 3).await;
    println!(
        "[errors] TCG budget spent: slot {} onlined again",
        r.steps[0].slot
    );
    assert_eq!(usize::try_from(r.steps[0].slot).unwrap(), parked[0]);
    assert_eq!(vm.vcpu_budget().await, Some((3, 3)));
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
    let spec = thread_spec("paused", 4);
    let (vm, _) = boot(&env, &spec).await;
    let mut tr = Tracker::default();
    resize_to(&vm, &mut tr, 2).await;

    vm.qmp_command("stop", None).await.unwrap();
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent, "a paused guest's agent cannot answer");
    let plan = tr.plan(&spec, &obs, 1).unwrap();
    assert_eq!(plan.unplug_slots(), vec![1]);
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
    assert_eq!(retry.unplug_slots(), vec![1]);

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
    assert_eq!(ev, Some(VmEvent::GuestStopped { reset: false }));
    let ev = tokio::time::timeout(Duration::from_secs(5), vm.next_event())
        .await
        .unwrap();
    assert_eq!(ev, Some(VmEvent::Exited { status: Some(0) }));
    vm.stop(Duration::from_secs(1)).await.unwrap();
    forget(&env, vm).await;
    env.shutdown().await;
}

/// `-run-with user=`: QEMU drops to the configured user (as root), and hot-plug still
/// works inside its sandbox. Without root, QEMU cannot switch users and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_configured_user() {
    let env = Env::new().await;
    let spec = thread_spec("runas", 2);
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
    let mut spec = thread_spec("noagent", 2);
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

    let r = vm.resize(&plug(&[1]), OPTS).await;
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
    let r = vm.resize(&unplug(&[1]), OPTS).await;
    print_report("noagent", "unplug", &r);
    assert!(r.first_error().is_none(), "{r:?}");
    assert_eq!(vm.observe().await.unwrap().online(), 1);
    assert_eq!(
        vm.observe().await.unwrap().slots[1].state,
        VcpuState::Absent,
        "without an agent nothing is parked: the vCPU was removed"
    );

    // 2 vCPU threads created = maxcpus, and nothing parked: under TCG the next plug must
    // be refused, typed, before QEMU sees it.
    assert_eq!(vm.vcpu_budget().await, Some((2, 2)));
    let r = vm.resize(&plug(&[1]), OPTS).await;
    print_report("noagent", "plug past the TCG budget", &r);
    match &r.steps[0].error {
        Some(BackendError::VcpuBudget {
            used: 2,
            max: 2,
            wanted: 1,
        }) => {}
        other => panic!("expected a VcpuBudget error, got {other:?}"),
    }
    assert!(r.steps[0].applied.is_none(), "nothing was sent to QEMU");
    let msg = r.first_error().unwrap().to_string();
    assert!(msg.contains("restart the guest"), "{msg}");

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
    forget(&env, vm).await;
    env.shutdown().await;
}

/// A guest paused (QMP `stop`) during a plug: the insert is never acknowledged, so the step
/// ends at its deadline with a typed timeout and the slot is reported Plugging (not Present:
/// the guest has not confirmed it). After `cont` the guest takes the vCPU and the next
/// observation onlines it, with no new plug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_during_plug() {
    let env = Env::new().await;
    let spec = thread_spec("pausedplug", 3);
    let (vm, _) = boot(&env, &spec).await;
    verify(&vm, 1).await;

    vm.qmp_command("stop", None).await.unwrap();
    let opts = ResizeOptions {
        unplug_timeout: Duration::from_secs(20),
        plug_timeout: Duration::from_secs(3),
    };
    let plan = plug(&[1]);
    let t0 = Instant::now();
    let r = vm.resize(&plan, opts).await;
    let took = t0.elapsed();
    print_report("pausedplug", "plug while paused", &r);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "the deadline bounds the attempt: {took:?}"
    );
    let step = &r.steps[0];
    assert_eq!((step.slot, step.direction), (1, Direction::Plug));
    assert!(step.applied.is_some(), "device_add was accepted");
    assert!(step.acked.is_none(), "the paused guest cannot acknowledge");
    assert_eq!(
        step.error.as_ref().unwrap(),
        &BackendError::Timeout {
            what: "acknowledge",
            slot: 1,
            seconds: 3.0
        }
    );
    let obs = vm.observe().await.unwrap();
    assert!(!obs.guest_agent);
    assert_eq!(obs.slots[1].state, VcpuState::Plugging, "{:?}", obs.slots);
    assert_eq!(obs.online(), 1, "an unconfirmed plug is not counted");
    assert_eq!(vm.vcpu_budget().await, Some((2, 3)), "one vCPU thread made");

    vm.qmp_command("cont", None).await.unwrap();
    let t0 = Instant::now();
    loop {
        let obs = vm.observe().await.unwrap();
        if obs.guest_agent && obs.slots[1].state == VcpuState::Online {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the resumed guest did not get slot 1 online: {:?}",
            obs.slots
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "[pausedplug] slot 1 online {:.2} s after cont",
        t0.elapsed().as_secs_f64()
    );
    verify(&vm, 2).await;
    assert_eq!(
        vm.vcpu_budget().await,
        Some((2, 3)),
        "finished, not re-plugged"
    );
    finish(&env, vm).await;
    env.shutdown().await;
}

fn write(path: &std::path::Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A damaged per-VM state directory, one VM at a time, while another VM on the same
/// launcher keeps resizing: stale sockets and a vm.json left by a dead QEMU (its pid now
/// another process) are cleaned by the next start; a file where the VM's directory should
/// be, and a directory where backend.json should be, give errors naming the path (and leave
/// no QEMU running), and the VM starts once repaired; a running guest whose vm.json is
/// garbage is not listed and its adoption names the file; one whose backend.json is
/// truncated is adopted with the state rebuilt from QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_state_dir_names_the_file_and_spares_other_vms() {
    let env = Env::new().await;
    let launcher = LauncherClient::new(&env.cfg.launcher_socket);
    let healthy = thread_spec("healthy", 4);
    let (a, _) = boot(&env, &healthy).await;
    let mut tr = Tracker::default();

    // Stale sockets, a vm.json whose pid is a live process that is not QEMU (this test),
    // and a truncated backend.json, as a launcher that died with its QEMU leaves them.
    let stale = thread_spec("stale", 2);
    let dir = launcher::vm_dir(&env.cfg.state_dir, "test", "stale");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [launcher::QMP_SOCK, launcher::QGA_SOCK] {
        drop(std::os::unix::net::UnixListener::bind(dir.join(f)).unwrap());
        assert!(
            std::os::unix::net::UnixStream::connect(dir.join(f)).is_err(),
            "{f} is stale: nothing listens"
        );
    }
    let record = VmRecord {
        spec: serde_json::to_value(&stale).unwrap(),
        pid: i32::try_from(std::process::id()).unwrap(),
        argv: vec!["qemu-system-x86_64".into()],
        started_unix_ms: 1,
    };
    write(
        &dir.join(launcher::VM_JSON),
        &serde_json::to_vec(&record).unwrap(),
    );
    write(&dir.join("backend.json"), b"{\"uid\": \"uid-stale");
    let running = env.backend.running().await.unwrap();
    assert_eq!(
        running,
        vec![healthy.clone()],
        "only what the launcher runs"
    );
    let t0 = Instant::now();
    let e = env.backend.adopt(&stale).await.err().expect("nothing runs");
    assert_eq!(e, BackendError::NotRunning("test/stale".into()));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "no hang on stale files"
    );
    let (b, _) = boot(&env, &stale).await;
    let rec = launcher::read_record(&dir).unwrap();
    assert_eq!(rec.pid, b.pid(), "vm.json now names this QEMU");
    assert_eq!(
        b.vcpu_budget().await,
        Some((1, 2)),
        "backend.json rewritten"
    );
    resize_to(&a, &mut tr, 2).await;

    // A regular file where a VM's directory should be.
    let blocked = thread_spec("blocked", 2);
    let bdir = launcher::vm_dir(&env.cfg.state_dir, "test", "blocked");
    write(&bdir, b"not a directory");
    let e = env
        .backend
        .start(&blocked)
        .await
        .err()
        .expect("no directory");
    println!("[state] file in place of the VM dir: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "{} is not a directory (remove it)",
            bdir.display()
        )),
        "{msg}"
    );
    assert_eq!(launcher.status("test", "blocked").await.unwrap(), None);
    resize_to(&a, &mut tr, 3).await;
    std::fs::remove_file(&bdir).unwrap();
    let c = env.backend.start_vm(&blocked).await.expect("repaired");
    c.stop(Duration::ZERO).await.unwrap();
    forget(&env, c).await;

    // A directory where backend.json should be: the start fails naming it, QEMU is not
    // left running, and once repaired the VM starts.
    std::fs::create_dir_all(bdir.join("backend.json")).unwrap();
    let e = env.backend.start(&blocked).await.err().expect("unwritable");
    println!("[state] backend.json unwritable: {e}");
    assert!(
        e.to_string()
            .contains(&format!("writing {}", bdir.join("backend.json").display())),
        "{e}"
    );
    let p = launcher.status("test", "blocked").await.unwrap().unwrap();
    assert!(!p.running, "the QEMU of a failed start is stopped: {p:?}");
    std::fs::remove_dir(bdir.join("backend.json")).unwrap();
    let c = env.backend.start_vm(&blocked).await.expect("repaired");
    assert_eq!(c.vcpu_budget().await, Some((1, 2)));
    c.stop(Duration::ZERO).await.unwrap();
    forget(&env, c).await;

    // A running guest whose vm.json is garbage: not adoptable, and the error names the file.
    let good = std::fs::read(dir.join(launcher::VM_JSON)).unwrap();
    let pid = b.pid();
    drop(b);
    write(&dir.join(launcher::VM_JSON), &good[..good.len() / 2]);
    let running = env.backend.running().await.unwrap();
    assert_eq!(
        running,
        vec![healthy.clone()],
        "garbage vm.json: not listed"
    );
    let e = env
        .backend
        .adopt(&stale)
        .await
        .err()
        .expect("garbage vm.json");
    println!("[state] garbage vm.json: {e}");
    match &e {
        BackendError::State { path, message } => {
            assert_eq!(path, &dir.join("vm.json").display().to_string());
            assert!(message.contains("not a VM record"), "{message}");
        }
        other => panic!("expected a state error, got {other:?}"),
    }
    let e = env.backend.start(&stale).await.err().expect("still runs");
    assert!(
        e.to_string().contains(&format!("still runs (pid {pid})")),
        "{e}"
    );

    // Repaired vm.json, truncated backend.json: adopted, the budget rebuilt from QEMU.
    write(&dir.join(launcher::VM_JSON), &good);
    write(&dir.join("backend.json"), b"{\"uid\":");
    let b = env.backend.adopt_vm(&stale).await.expect("adopted");
    assert_eq!(b.pid(), pid);
    assert_eq!(b.vcpu_budget().await, Some((1, 2)), "counted from QEMU");
    let text = std::fs::read_to_string(dir.join("backend.json")).unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_ok(),
        "backend.json rewritten: {text}"
    );
    b.wait_guest_ready(Duration::from_secs(30)).await.unwrap();
    let mut tr_b = Tracker::default();
    resize_to(&b, &mut tr_b, 2).await;
    resize_to(&a, &mut tr, 2).await;
    finish(&env, b).await;
    finish(&env, a).await;
    env.shutdown().await;
}
