//! QEMU's command line for a spec: the checks a spec must pass first, where the binary is,
//! and every argument (machine, accelerator, topology, NUMA, boot, sockets, sandbox).

use super::QemuConfig;
use crate::backend::qemu::machine::Machine;
use crate::backend::{Accel, BackendError, VmSpec};
use crate::launcher;
use corescale_api::{Arch, Granularity, ResizeMethod, MAX_VCPUS};
use std::path::{Path, PathBuf};

/// The kernel command line the backend puts before the spec's.
pub fn base_cmdline(m: Machine) -> String {
    format!("console={} panic=-1", m.console())
}

/// Find the QEMU binary: a path must be an executable file; a name is looked up in `PATH`.
pub fn find_binary(binary: &str) -> Result<PathBuf, BackendError> {
    find_binary_for(binary, Arch::X86_64)
}

/// [`find_binary`] for guests of `arch` (the error says what to install for it).
pub fn find_binary_for(binary: &str, arch: Arch) -> Result<PathBuf, BackendError> {
    use std::os::unix::fs::PermissionsExt;
    let missing = || BackendError::MissingBinary {
        binary: binary.to_string(),
        hint: Machine::of(arch).install_hint().to_string(),
    };
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.contains('/') {
        let p = PathBuf::from(binary);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| executable(p))
        .ok_or_else(missing)
}

fn invalid_spec(field: &'static str, message: String) -> BackendError {
    BackendError::InvalidSpec { field, message }
}

/// Check what the backend relies on in a spec (the API validates the same; this keeps a
/// bad spec from becoming an obscure QEMU error).
pub fn validate_spec(spec: &VmSpec) -> Result<(), BackendError> {
    launcher::check_name("namespace", &spec.namespace)
        .map_err(|m| invalid_spec("metadata.namespace", m))?;
    launcher::check_name("name", &spec.name).map_err(|m| invalid_spec("metadata.name", m))?;
    let t = &spec.topology;
    if t.sockets == 0 || t.cores == 0 || t.threads == 0 || t.max_vcpus() > MAX_VCPUS {
        return Err(invalid_spec(
            "spec.topology",
            format!(
                "{}x{}x{} must have between 1 and {MAX_VCPUS} slots",
                t.sockets, t.cores, t.threads
            ),
        ));
    }
    if spec.boot_vcpus == 0 || spec.boot_vcpus > t.max_vcpus() {
        return Err(invalid_spec(
            "spec.cpus",
            format!(
                "boot vCPUs {} must be between 1 and {}",
                spec.boot_vcpus,
                t.max_vcpus()
            ),
        ));
    }
    if Machine::of(spec.arch).unit_threads(t) > 1 && spec.granularity != Granularity::Core {
        return Err(invalid_spec(
            "spec.granularity",
            format!(
                "{} hot-plugs whole cores ({} threads each): use granularity Core",
                spec.arch, t.threads
            ),
        ));
    }
    if !Machine::of(spec.arch).cpu_hotplug() && spec.resize_method != ResizeMethod::GuestOnline {
        return Err(invalid_spec(
            "spec.resizeMethod",
            format!(
                "QEMU's {} machine cannot hot-plug CPUs: use resizeMethod GuestOnline",
                Machine::of(spec.arch).machine_arg()
            ),
        ));
    }
    if spec.granularity == Granularity::Core && !spec.boot_vcpus.is_multiple_of(t.threads) {
        return Err(invalid_spec(
            "spec.cpus",
            format!(
                "boot vCPUs {} must be whole cores of {} threads under granularity Core",
                spec.boot_vcpus, t.threads
            ),
        ));
    }
    if spec.memory_mib < 64 || spec.memory_mib < u64::from(t.sockets) * 32 {
        return Err(invalid_spec(
            "spec.memory",
            format!(
                "{} MiB is too little: at least 64 MiB and 32 MiB per socket (NUMA node)",
                spec.memory_mib
            ),
        ));
    }
    Ok(())
}

/// Escape a value for QEMU's comma-separated option syntax.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Disks (virtio-blk, in order, serial = name), the cloud-init seed (read-only, last), and
/// one NIC on QEMU's user-mode network with the spec's forwarded ports. The NIC has no
/// option ROM: guests boot their kernel directly, never from the network.
fn workload_args(spec: &VmSpec, cfg: &QemuConfig, dir: &Path) -> Vec<String> {
    let mut a = Vec::new();
    let key = spec.key();
    for (i, d) in spec.disks.iter().enumerate() {
        let file = super::disks::disk_path(&cfg.state_dir, &key, &d.name);
        a.push("-drive".to_string());
        a.push(format!(
            "file={},if=none,id=disk{i},format=qcow2,discard=unmap",
            opt_escape(&file.display().to_string())
        ));
        a.push("-device".to_string());
        a.push(format!("virtio-blk-pci,drive=disk{i},serial={}", d.name));
    }
    if spec.seed.is_some() {
        let file = dir.join(super::seed::SEED_IMAGE);
        a.push("-drive".to_string());
        a.push(format!(
            "file={},if=none,id=cidata,format=raw,readonly=on",
            opt_escape(&file.display().to_string())
        ));
        a.push("-device".to_string());
        a.push("virtio-blk-pci,drive=cidata,serial=cidata".to_string());
    }
    let mut netdev = "user,id=net0".to_string();
    for p in &spec.ports {
        let proto = match p.protocol {
            corescale_api::Protocol::Tcp => "tcp",
            corescale_api::Protocol::Udp => "udp",
        };
        netdev.push_str(&format!(
            ",hostfwd={proto}:{}:{}-:{}",
            p.host_ip, p.host_port, p.guest_port
        ));
    }
    a.push("-netdev".to_string());
    a.push(netdev);
    a.push("-device".to_string());
    a.push("virtio-net-pci,netdev=net0,romfile=".to_string());
    a
}

/// QEMU's command line for a spec, with its sockets and logs in `dir`.
pub fn qemu_argv(
    spec: &VmSpec,
    cfg: &QemuConfig,
    binary: &Path,
    dir: &Path,
) -> Result<Vec<String>, BackendError> {
    validate_spec(spec)?;
    let t = &spec.topology;
    let path = |f: &str| opt_escape(&dir.join(f).display().to_string());
    let mut a: Vec<String> = vec![binary.display().to_string()];
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("guest={}/{},debug-threads=on", spec.namespace, spec.name),
    ]);
    let m = Machine::of(spec.arch);
    let cpu = cfg.cpu_model(spec.arch, spec.accel);
    match spec.accel {
        Accel::Kvm => push(&["-machine", m.machine_arg(), "-accel", "kvm", "-cpu", cpu]),
        // thread=single cannot unplug (QEMU aborts in qemu_thread_join): multi only.
        Accel::Tcg => push(&[
            "-machine",
            &format!("{}{}", m.machine_arg(), m.tcg_machine_caps()),
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            cpu,
        ]),
    }
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    // GuestOnline: every slot is present from boot; the kernel's `maxcpus=` (below) onlines
    // only the first boot_vcpus, the rest stay present and offline until the agent onlines
    // them.
    let present = match spec.resize_method {
        ResizeMethod::Hotplug => spec.boot_vcpus,
        ResizeMethod::GuestOnline => t.max_vcpus(),
    };
    push(&[
        "-smp",
        &format!(
            "{},maxcpus={},sockets={},cores={},threads={}",
            present,
            t.max_vcpus(),
            t.sockets,
            t.cores,
            t.threads
        ),
    ]);
    if t.sockets > 1 {
        let per = spec.memory_mib / u64::from(t.sockets);
        let first = spec.memory_mib - per * u64::from(t.sockets - 1);
        for i in 0..t.sockets {
            let size = if i == 0 { first } else { per };
            push(&[
                "-object",
                &format!("memory-backend-ram,id=mem{i},size={size}M"),
            ]);
            push(&["-numa", &format!("node,nodeid={i},memdev=mem{i}")]);
        }
        for arg in m.numa_cpu_args(t) {
            push(&["-numa", &arg]);
        }
    }
    push(&["-kernel", &spec.kernel.display().to_string()]);
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    let base = base_cmdline(m);
    let mut append = if spec.cmdline.trim().is_empty() {
        base
    } else {
        format!("{base} {}", spec.cmdline.trim())
    };
    // Last, so that it wins over a maxcpus= in spec.boot.cmdline (the kernel keeps the
    // last value): the node's record of which vCPUs are offline depends on it.
    if spec.resize_method == ResizeMethod::GuestOnline {
        append.push_str(&format!(" maxcpus={}", spec.boot_vcpus));
    }
    push(&["-append", &append]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    let console = m.console_args(&path(launcher::SERIAL_LOG), &path(launcher::CONSOLE_SOCK));
    push(&console.iter().map(String::as_str).collect::<Vec<_>>());
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(launcher::QMP_SOCK)),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qga0,path={},server=on,wait=off",
            path(launcher::QGA_SOCK)
        ),
    ]);
    let agent = m.agent_port_args(!spec.disks.is_empty());
    push(&agent.iter().map(String::as_str).collect::<Vec<_>>());
    let workload = workload_args(spec, cfg, dir);
    push(&workload.iter().map(String::as_str).collect::<Vec<_>>());
    match &cfg.run_as_user {
        // Dropping to the user is a setuid after the filter is installed: allow it.
        Some(user) => {
            push(&[
                "-sandbox",
                "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            ]);
            push(&["-run-with", &format!("user={}", opt_escape(user))]);
        }
        None => push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]),
    }
    push(&["-no-reboot"]);
    a.extend(cfg.extra_args.iter().cloned());
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::test_spec as spec;

    #[test]
    fn power_command_line_uses_pseries_cores_and_virtio_agent() {
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let mut p = spec(2, 2, 2, 2);
        p.arch = Arch::Ppc64le;
        p.granularity = Granularity::Core;
        let s = qemu_argv(
            &p,
            &cfg,
            Path::new("/usr/bin/qemu-system-ppc64"),
            Path::new("/state/ns/vm"),
        )
        .unwrap()
        .join(" ");
        for want in [
            "-machine pseries,x-vof=on,cap-cfpc=broken",
            "-accel tcg,thread=multi -cpu POWER9",
            "-smp 2,maxcpus=8,sockets=2,cores=2,threads=2",
            "-numa cpu,node-id=0,core-id=2",
            "-numa cpu,node-id=1,core-id=4",
            "-append console=hvc0 panic=-1 quiet",
            "-chardev file,id=con0,path=/state/ns/vm/serial.log -device spapr-vty,chardev=con0,reg=0x71000001",
            "-device virtio-serial-pci,id=agent-serial -device virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ] {
            assert!(s.contains(want), "{want:?} not in {s}");
        }
        assert!(!s.contains("isa-serial") && !s.contains("q35"), "{s}");
        // Thread granularity cannot split a POWER core.
        p.granularity = Granularity::Thread;
        let e = validate_spec(&p).unwrap_err();
        assert!(e.to_string().contains("spec.granularity"), "{e}");
        assert_eq!(cfg.binary_for(Arch::Ppc64le), "qemu-system-ppc64");
    }

    #[test]
    fn command_line_has_topology_numa_and_sockets() {
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let a = qemu_argv(
            &spec(2, 2, 1, 1),
            &cfg,
            Path::new("/usr/bin/qemu-system-x86_64"),
            Path::new("/state/ns/vm"),
        )
        .unwrap();
        let s = a.join(" ");
        assert!(
            s.contains("-smp 1,maxcpus=4,sockets=2,cores=2,threads=1"),
            "{s}"
        );
        assert!(
            s.contains("-accel tcg,thread=multi -cpu qemu64,vendor=GenuineIntel"),
            "{s}"
        );
        assert!(
            s.contains(
                "-object memory-backend-ram,id=mem0,size=128M -numa node,nodeid=0,memdev=mem0"
            ),
            "{s}"
        );
        assert!(s.contains("-numa cpu,node-id=1,socket-id=1"), "{s}");
        assert!(
            s.contains("-initrd /img/initrd,x"),
            "plain paths are not escaped: {s}"
        );
        assert!(s.contains("-append console=ttyS0 panic=-1 quiet"), "{s}");
        assert!(
            s.contains("-qmp unix:/state/ns/vm/qmp.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("-chardev socket,id=qga0,path=/state/ns/vm/qga.sock,server=on,wait=off -device isa-serial,chardev=qga0"), "{s}");
        assert!(
            s.contains("-sandbox on,obsolete=deny,elevateprivileges=deny"),
            "{s}"
        );
        assert!(s.contains("-no-reboot"), "{s}");
        assert!(!s.contains("-run-with"));
        let one = qemu_argv(&spec(1, 4, 1, 1), &cfg, Path::new("q"), Path::new("/s,x"))
            .unwrap()
            .join(" ");
        assert!(!one.contains("-numa"), "{one}");
        assert!(
            one.contains("unix:/s,,x/qmp.sock"),
            "commas in option values are doubled: {one}"
        );
        let mut cfg2 = cfg.clone();
        cfg2.run_as_user = Some("qemu".into());
        let mut k = spec(1, 2, 2, 2);
        k.accel = Accel::Kvm;
        let s = qemu_argv(&k, &cfg2, Path::new("q"), Path::new("/d"))
            .unwrap()
            .join(" ");
        assert!(s.contains("-accel kvm -cpu host"), "{s}");
        assert!(s.contains("-run-with user=qemu"), "{s}");
        // Odd memory splits add up.
        let mut m = spec(3, 1, 1, 1);
        m.memory_mib = 100;
        let s = qemu_argv(&m, &cfg, Path::new("q"), Path::new("/d"))
            .unwrap()
            .join(" ");
        assert!(
            s.contains("id=mem0,size=34M")
                && s.contains("id=mem1,size=33M")
                && s.contains("id=mem2,size=33M"),
            "{s}"
        );
    }

    #[test]
    fn workload_vm_gets_disks_seed_ports_and_the_distro_agent_port() {
        use crate::backend::workload::{DiskSource, DiskSpec, PortForward, SeedData};
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let plain = qemu_argv(
            &spec(1, 2, 1, 1),
            &cfg,
            Path::new("q"),
            Path::new("/state/ns/vm"),
        )
        .unwrap()
        .join(" ");
        assert!(
            plain.contains("-netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile="),
            "{plain}"
        );
        assert!(
            !plain.contains("virtio-blk") && plain.contains("isa-serial,chardev=qga0"),
            "{plain}"
        );
        let mut w = spec(1, 2, 1, 1);
        w.disks = vec![
            DiskSpec {
                name: "root".into(),
                source: DiskSource::Image("/img/d.qcow2".into()),
            },
            DiskSpec {
                name: "data".into(),
                source: DiskSource::Empty(1 << 30),
            },
        ];
        w.seed = Some(SeedData::default());
        w.ports = vec![PortForward {
            name: "ssh".into(),
            protocol: corescale_api::Protocol::Tcp,
            guest_port: 22,
            host_ip: std::net::Ipv4Addr::LOCALHOST,
            host_port: 40022,
        }];
        let s = qemu_argv(&w, &cfg, Path::new("q"), Path::new("/state/ns/vm"))
            .unwrap()
            .join(" ");
        for want in [
            "-drive file=/state/.disks/ns/vm/root.qcow2,if=none,id=disk0,format=qcow2,discard=unmap -device virtio-blk-pci,drive=disk0,serial=root",
            "-drive file=/state/.disks/ns/vm/data.qcow2,if=none,id=disk1,format=qcow2,discard=unmap -device virtio-blk-pci,drive=disk1,serial=data",
            "-drive file=/state/ns/vm/cidata.img,if=none,id=cidata,format=raw,readonly=on -device virtio-blk-pci,drive=cidata,serial=cidata",
            "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22",
            "virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ] {
            assert!(s.contains(want), "{want:?} not in {s}");
        }
        assert!(!s.contains("isa-serial,chardev=qga0"), "{s}");
    }

    #[test]
    fn guest_online_boots_every_slot_with_the_target_online() {
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let mut g = spec(2, 2, 2, 2);
        g.granularity = Granularity::Core;
        g.resize_method = ResizeMethod::GuestOnline;
        g.cmdline = "maxcpus=8 quiet".into();
        let s = qemu_argv(&g, &cfg, Path::new("q"), Path::new("/d"))
            .unwrap()
            .join(" ");
        assert!(
            s.contains("-smp 8,maxcpus=8,sockets=2,cores=2,threads=2"),
            "{s}"
        );
        assert!(
            s.contains("-append console=ttyS0 panic=-1 maxcpus=8 quiet maxcpus=2 -"),
            "the node's maxcpus= comes last: {s}"
        );
        // Hotplug keeps the kernel's own choice.
        g.resize_method = ResizeMethod::Hotplug;
        let s = qemu_argv(&g, &cfg, Path::new("q"), Path::new("/d"))
            .unwrap()
            .join(" ");
        assert!(
            s.contains("-smp 2,maxcpus=8") && !s.contains("maxcpus=2 "),
            "{s}"
        );
    }

    #[test]
    fn arm_runs_virt_with_every_slot_and_a_virtio_agent() {
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let mut a = spec(2, 2, 1, 1);
        a.arch = Arch::Aarch64;
        let e = validate_spec(&a).unwrap_err();
        assert!(e.to_string().starts_with("spec.resizeMethod:"), "{e}");
        a.resize_method = ResizeMethod::GuestOnline;
        let s = qemu_argv(&a, &cfg, Path::new("q"), Path::new("/d"))
            .unwrap()
            .join(" ");
        for want in [
            "-machine virt,gic-version=3 -accel tcg,thread=multi -cpu cortex-a72",
            "-smp 4,maxcpus=4,sockets=2,cores=2,threads=1",
            "-numa cpu,node-id=1,socket-id=1",
            "-append console=ttyAMA0 panic=-1 quiet maxcpus=1",
            "-device virtio-serial-pci,id=agent-serial -device virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ] {
            assert!(s.contains(want), "{want:?} not in {s}");
        }
        assert_eq!(cfg.binary_for(Arch::Aarch64), "qemu-system-aarch64");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cfg = QemuConfig::new("/state", "/run/l.sock");
        let mut s = spec(1, 4, 1, 5);
        let e = qemu_argv(&s, &cfg, Path::new("q"), Path::new("/d")).unwrap_err();
        assert!(e.to_string().starts_with("spec.cpus:"), "{e}");
        s = spec(16, 16, 1, 1);
        assert!(qemu_argv(&s, &cfg, Path::new("q"), Path::new("/d"))
            .unwrap_err()
            .to_string()
            .starts_with("spec.topology:"));
        s = spec(1, 2, 2, 1);
        s.granularity = Granularity::Core;
        assert!(validate_spec(&s)
            .unwrap_err()
            .to_string()
            .contains("whole cores"));
        s = spec(1, 2, 1, 1);
        s.memory_mib = 32;
        assert!(validate_spec(&s)
            .unwrap_err()
            .to_string()
            .starts_with("spec.memory:"));
        s = spec(1, 2, 1, 1);
        s.name = "../x".into();
        assert!(validate_spec(&s)
            .unwrap_err()
            .to_string()
            .starts_with("metadata.name:"));
    }

    #[test]
    fn missing_binary_says_what_to_install() {
        let e = find_binary("/nonexistent/qemu-system-x86_64").unwrap_err();
        assert!(matches!(e, BackendError::MissingBinary { .. }));
        assert!(e.to_string().contains("scripts/install-deps.sh"), "{e}");
        assert!(find_binary("corescale-no-such-binary").is_err());
        assert!(find_binary("sh").is_ok());
    }
}
