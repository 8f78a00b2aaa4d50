//! What differs between guest architectures, in one place: the QEMU binary and machine,
//! the CPU model, the consoles, the unit of a CPU hot-plug, how QEMU names a slot, which
//! signal completes a plug or an unplug, and how a guest CPU is matched to its slot.
//!
//! The QEMU backend asks this module and has no other architecture `if`s; the planner and
//! the node agent only see the unit size (through `spec.granularity`, which the API forces
//! to whole cores where the machine plugs cores) and the completion timings.
//!
//! | | x86_64 (`q35`) | ppc64le (`pseries`) |
//! |---|---|---|
//! | hot-plug unit | one thread (`<model>-x86_64-cpu`, props socket/core/thread-id) | one core with every thread (`<model>-spapr-cpu-core`, props core-id/node-id) |
//! | plug done | `ACPI_DEVICE_OST` source 1 status 0; the node onlines the CPU | `device_add` returns; the guest kernel onlines the threads itself |
//! | unplug done | `ACPI_DEVICE_OST` source 3 status 0 (no `DEVICE_DELETED`) | `DEVICE_DELETED` of the core device |
//! | guest CPU -> slot | APIC id (`/proc/cpuinfo`), ACPI processor path | `/sys/devices/system/cpu/cpuN/physical_id` (the hard id) |
//! | console, agent port | `ttyS0`, `isa-serial` (ttyS1) | `hvc0` (`spapr-vty`), `virtio-serial` |

use crate::backend::qemu::qmp::CpuProps;
use crate::backend::Accel;
use corescale_api::{Arch, SlotId, Topology};

/// The x86 QEMU binary looked up in `PATH`.
pub const X86_64_BINARY: &str = "qemu-system-x86_64";
/// The POWER QEMU binary looked up in `PATH`.
pub const PPC64_BINARY: &str = "qemu-system-ppc64";
/// The 64-bit Arm QEMU binary looked up in `PATH`.
pub const AARCH64_BINARY: &str = "qemu-system-aarch64";
/// The x86_64 CPU model under TCG: with TCG's default AMD vendor string and no TOPOEXT,
/// Linux ignores SMT siblings.
pub const X86_64_TCG_CPU_MODEL: &str = "qemu64,vendor=GenuineIntel";

/// How the backend learns that the guest took a plugged vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertDone {
    /// The guest's `ACPI_DEVICE_OST` for the slot (source 1); the node then onlines the
    /// CPU through the guest agent.
    AcpiOst,
    /// Nothing to wait for: `device_add` returning means the hypervisor notified the
    /// guest, whose kernel adds and onlines the CPUs by itself (sPAPR).
    DeviceAdded,
}

/// How the backend learns that the guest released an unplugged vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectDone {
    /// The final eject `ACPI_DEVICE_OST` (source 3, status 0); QEMU sends no
    /// `DEVICE_DELETED` for x86 CPUs.
    AcpiOst,
    /// `DEVICE_DELETED` of the hot-plugged device (the core).
    DeviceDeleted,
}

/// How a guest logical CPU is matched to its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCpuId {
    /// Online CPUs by APIC id in `/proc/cpuinfo`, others by their ACPI processor path.
    ApicAndAcpi,
    /// `/sys/devices/system/cpu/cpuN/physical_id`: the hard (interrupt server) id QEMU
    /// gives the thread, `core index * vsmt + thread`.
    PhysicalId,
    /// The logical number is the slot: every CPU is present from boot (virt cannot
    /// hot-plug), QEMU lists them in the device tree in slot order and Linux numbers them
    /// in that order.
    BootOrder,
}

/// The facts of one guest architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// The architecture.
    pub arch: Arch,
}

impl Machine {
    /// The machine of an architecture.
    pub fn of(arch: Arch) -> Self {
        Machine { arch }
    }

    /// The QEMU binary looked up in `PATH` by default.
    pub fn default_binary(self) -> &'static str {
        match self.arch {
            Arch::X86_64 => X86_64_BINARY,
            Arch::Ppc64le => PPC64_BINARY,
            Arch::Aarch64 => AARCH64_BINARY,
        }
    }

    /// What to install when the binary is missing.
    pub fn install_hint(self) -> &'static str {
        match self.arch {
            Arch::X86_64 => "install QEMU 10 or newer (Debian 12: qemu-system-x86 from bookworm-backports; scripts/install-deps.sh does it, as root)",
            Arch::Ppc64le => "install QEMU 10 or newer for POWER (Debian 12: qemu-system-ppc from bookworm-backports; scripts/install-deps.sh does it, as root)",
            Arch::Aarch64 => "install QEMU 10 or newer for 64-bit Arm (Debian 12: qemu-system-arm from bookworm-backports; scripts/install-deps.sh does it, as root)",
        }
    }

    /// `-machine`. pseries boots the kernel through QEMU's Virtual Open Firmware
    /// (`x-vof=on`): SLOF would add 7-10 s to every boot under TCG, and corescale always
    /// boots a kernel directly.
    pub fn machine_arg(self) -> &'static str {
        match self.arch {
            Arch::X86_64 => "q35",
            Arch::Ppc64le => "pseries,x-vof=on",
            // GICv3: GICv2 addresses at most 8 CPUs.
            Arch::Aarch64 => "virt,gic-version=3",
        }
    }

    /// Extra `-machine` settings under TCG. pseries asks for Spectre mitigation
    /// capabilities that TCG does not emulate (and warns on each start); under KVM they
    /// stay at QEMU's defaults.
    pub fn tcg_machine_caps(self) -> &'static str {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => "",
            Arch::Ppc64le => ",cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        }
    }

    /// `-cpu` under TCG when the node's configuration does not say.
    pub fn tcg_cpu_model(self) -> &'static str {
        match self.arch {
            Arch::X86_64 => X86_64_TCG_CPU_MODEL,
            Arch::Ppc64le => "POWER9",
            // Not `max`: its pointer authentication is slow to emulate.
            Arch::Aarch64 => "cortex-a72",
        }
    }

    /// The guest's console device (kernel `console=`).
    pub fn console(self) -> &'static str {
        match self.arch {
            Arch::X86_64 => "ttyS0",
            Arch::Ppc64le => "hvc0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// QEMU arguments that write the guest's console to `log` (both paths already escaped
    /// for QEMU's option syntax).
    ///
    /// x86: the console is also a socket at `sock`, where root on the node can attach
    /// (`socat - UNIX-CONNECT:<vm dir>/console.sock`) and type into the guest's ttyS0; QEMU
    /// keeps writing `log` whether or not someone is attached.
    ///
    /// pseries: `-nodefaults` leaves the nvram at reg 0x71000000, so the console vty takes
    /// 0x71000001 (the lowest vty is the firmware's stdout and the guest's hvc0). A vty's
    /// IRQ follows the low bits of its reg: a reg far from this collides with the nvram's.
    pub fn console_args(self, log: &str, sock: &str) -> Vec<String> {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => vec![
                "-chardev".into(),
                format!("socket,id=con0,path={sock},server=on,wait=off,logfile={log}"),
                "-serial".into(),
                "chardev:con0".into(),
            ],
            Arch::Ppc64le => vec![
                "-chardev".into(),
                format!("file,id=con0,path={log}"),
                "-device".into(),
                "spapr-vty,chardev=con0,reg=0x71000001".into(),
            ],
        }
    }

    /// The devices that carry the guest agent's chardev `qga0`: the guest's ttyS1 on x86
    /// (no virtio modules needed), a virtio-serial port on pseries (a second spapr-vty
    /// would be an hvc tty, whose echo before the agent sets it raw garbles replies).
    /// `distro`: the guest boots a disk (a distribution), whose qemu-guest-agent listens on
    /// the virtio-serial port `org.qemu.guest_agent.0` on every architecture.
    pub fn agent_port_args(self, distro: bool) -> Vec<String> {
        let devices: &[&str] = match self.arch {
            Arch::X86_64 if !distro => &["isa-serial,chardev=qga0"],
            Arch::X86_64 | Arch::Ppc64le | Arch::Aarch64 => &[
                "virtio-serial-pci,id=agent-serial",
                "virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
            ],
        };
        devices
            .iter()
            .flat_map(|d| ["-device".to_string(), (*d).to_string()])
            .collect()
    }

    /// Whether the machine can hot-plug CPUs (and answers `query-hotpluggable-cpus`):
    /// arm64 `virt` cannot, so it runs under resizeMethod GuestOnline only.
    pub fn cpu_hotplug(self) -> bool {
        match self.arch {
            Arch::X86_64 | Arch::Ppc64le => true,
            Arch::Aarch64 => false,
        }
    }

    /// vCPUs in one hot-plug unit (one `device_add`).
    pub fn unit_threads(self, t: &Topology) -> u32 {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => 1,
            Arch::Ppc64le => t.threads.max(1),
        }
    }

    /// The plug completion signal.
    pub fn insert_done(self) -> InsertDone {
        match self.arch {
            Arch::X86_64 => InsertDone::AcpiOst,
            // virt never hot-plugs (GuestOnline only): no completion to wait for.
            Arch::Ppc64le | Arch::Aarch64 => InsertDone::DeviceAdded,
        }
    }

    /// The unplug completion signal.
    pub fn eject_done(self) -> EjectDone {
        match self.arch {
            Arch::X86_64 => EjectDone::AcpiOst,
            Arch::Ppc64le | Arch::Aarch64 => EjectDone::DeviceDeleted,
        }
    }

    /// How guest CPUs are matched to slots.
    pub fn guest_cpu_id(self) -> GuestCpuId {
        match self.arch {
            Arch::X86_64 => GuestCpuId::ApicAndAcpi,
            Arch::Ppc64le => GuestCpuId::PhysicalId,
            Arch::Aarch64 => GuestCpuId::BootOrder,
        }
    }

    /// The first slot of the hot-plug unit a `query-hotpluggable-cpus` entry describes.
    pub fn slot_of_props(self, t: &Topology, p: &CpuProps) -> Option<u32> {
        let get = |v: Option<i64>| u32::try_from(v.unwrap_or(0)).ok();
        match self.arch {
            // virt lists socket/cluster/core/thread ids like q35 (one cluster per socket).
            Arch::X86_64 | Arch::Aarch64 => {
                let (s, c, th) = (get(p.socket_id)?, get(p.core_id)?, get(p.thread_id)?);
                if s >= t.sockets || c >= t.cores || th >= t.threads {
                    return None;
                }
                Some((s * t.cores + c) * t.threads + th)
            }
            // sPAPR core-ids count threads: core i of the machine has core-id i*threads,
            // which is the slot index of its thread 0.
            Arch::Ppc64le => {
                let id = u32::try_from(p.core_id?).ok()?;
                (id % t.threads.max(1) == 0 && id < t.max_vcpus()).then_some(id)
            }
        }
    }

    /// The slot of one vCPU thread listed by `query-cpus-fast`.
    pub fn slot_of_thread(self, t: &Topology, props: &CpuProps, qom_path: &str) -> Option<u32> {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => self.slot_of_props(t, props),
            // Threads of a core are its children `.../thread[i]`.
            Arch::Ppc64le => {
                let core = self.slot_of_props(t, props)?;
                let i: u32 = qom_path
                    .rsplit_once("thread[")?
                    .1
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                (i < t.threads).then_some(core + i)
            }
        }
    }

    /// The `device_add` id of the unit whose first slot is `s`.
    pub fn device_id(self, s: &SlotId) -> String {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => format!("cpu-s{}-c{}-t{}", s.socket, s.core, s.thread),
            Arch::Ppc64le => format!("core-s{}-c{}", s.socket, s.core),
        }
    }

    /// The `-numa cpu` settings that put socket `i` on NUMA node `i`.
    pub fn numa_cpu_args(self, t: &Topology) -> Vec<String> {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => (0..t.sockets)
                .map(|i| format!("cpu,node-id={i},socket-id={i}"))
                .collect(),
            // pseries CPUs have no socket-id: place each core.
            Arch::Ppc64le => (0..t.sockets * t.cores)
                .map(|c| format!("cpu,node-id={},core-id={}", c / t.cores, c * t.threads))
                .collect(),
        }
    }

    /// The slot of a guest CPU from its hard id (`physical_id`), given QEMU's `vsmt`
    /// (hard ids of one core are `core index * vsmt + thread`).
    pub fn slot_of_hard_id(self, t: &Topology, vsmt: u32, hard_id: u32) -> Option<u32> {
        let vsmt = vsmt.max(t.threads).max(1);
        let (core, thread) = (hard_id / vsmt, hard_id % vsmt);
        (thread < t.threads && core < t.sockets * t.cores).then_some(core * t.threads + thread)
    }
}

/// Parse a kernel CPU list (`0-2,5`); malformed parts are skipped.
pub fn parse_cpulist(s: &str) -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    // A guest lists at most a few thousand CPUs; bound a hostile range.
                    out.extend((a..=b).take(4096));
                }
            }
            None => {
                if let Ok(n) = part.trim().parse() {
                    out.insert(n);
                }
            }
        }
    }
    out
}

/// The architecture of the host this process runs on, when it is one guests can be.
pub fn host_arch() -> Option<Arch> {
    match (std::env::consts::ARCH, cfg!(target_endian = "little")) {
        ("x86_64", _) => Some(Arch::X86_64),
        ("powerpc64", true) => Some(Arch::Ppc64le),
        ("aarch64", _) => Some(Arch::Aarch64),
        _ => None,
    }
}

/// The accelerator a guest of `arch` gets on a node whose own guests get `native`: KVM
/// runs only guests of the host's architecture; every other one is emulated (TCG).
pub fn accel_for(arch: Arch, native: Accel) -> Accel {
    if host_arch() == Some(arch) {
        native
    } else {
        Accel::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Topology as T;
    fn topo(sockets: u32, cores: u32, threads: u32) -> Topology {
        T::new(sockets, cores, threads)
    }

    fn core_props(core_id: i64) -> CpuProps {
        CpuProps {
            core_id: Some(core_id),
            node_id: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn cpulists_parse() {
        assert_eq!(
            parse_cpulist("0-2,5\n").into_iter().collect::<Vec<_>>(),
            [0, 1, 2, 5]
        );
        assert_eq!(parse_cpulist("").len(), 0);
        assert_eq!(
            parse_cpulist("x,3,4-y").into_iter().collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(parse_cpulist("0-4294967295").len(), 4096);
    }

    #[test]
    fn power_core_ids_are_thread_0_slots() {
        // Measured: -smp 2,maxcpus=8,sockets=2,cores=2,threads=2 lists core-ids 0,2,4,6.
        let m = Machine::of(Arch::Ppc64le);
        let t = topo(2, 2, 2);
        let got: Vec<Option<u32>> = [0, 2, 4, 6, 3, 8]
            .iter()
            .map(|&c| m.slot_of_props(&t, &core_props(c)))
            .collect();
        assert_eq!(got, [Some(0), Some(2), Some(4), Some(6), None, None]);
        assert_eq!(m.unit_threads(&t), 2);
        assert_eq!(Machine::of(Arch::X86_64).unit_threads(&t), 1);
    }

    #[test]
    fn power_threads_map_from_their_qom_path() {
        let m = Machine::of(Arch::Ppc64le);
        let t = topo(1, 4, 2);
        let p = core_props(4);
        assert_eq!(
            m.slot_of_thread(&t, &p, "/machine/peripheral/core-s0-c2/thread[1]"),
            Some(5)
        );
        assert_eq!(
            m.slot_of_thread(&t, &p, "/machine/unattached/device[1]/thread[0]"),
            Some(4)
        );
        assert_eq!(
            m.slot_of_thread(&t, &p, "/machine/peripheral/x/thread[2]"),
            None
        );
        assert_eq!(m.slot_of_thread(&t, &p, "/machine/peripheral/x"), None);
    }

    #[test]
    fn hard_ids_follow_vsmt() {
        let m = Machine::of(Arch::Ppc64le);
        let t = topo(1, 4, 2);
        // TCG: vsmt == threads, hard id == slot.
        assert_eq!(m.slot_of_hard_id(&t, 2, 5), Some(5));
        // KVM on POWER9 may space cores by 8 (vsmt 8): core 2 thread 1 is hard id 17.
        assert_eq!(m.slot_of_hard_id(&t, 8, 17), Some(5));
        assert_eq!(m.slot_of_hard_id(&t, 8, 18), None);
        assert_eq!(m.slot_of_hard_id(&t, 2, 8), None);
    }

    #[test]
    fn numa_places_power_cores_by_socket() {
        let m = Machine::of(Arch::Ppc64le);
        assert_eq!(
            m.numa_cpu_args(&topo(2, 2, 2)),
            [
                "cpu,node-id=0,core-id=0",
                "cpu,node-id=0,core-id=2",
                "cpu,node-id=1,core-id=4",
                "cpu,node-id=1,core-id=6"
            ]
        );
        assert_eq!(
            Machine::of(Arch::X86_64).numa_cpu_args(&topo(2, 2, 2)),
            ["cpu,node-id=0,socket-id=0", "cpu,node-id=1,socket-id=1"]
        );
    }

    #[test]
    fn only_the_host_arch_gets_kvm() {
        let other = match host_arch() {
            Some(Arch::X86_64) | Some(Arch::Aarch64) | None => Arch::Ppc64le,
            Some(Arch::Ppc64le) => Arch::X86_64,
        };
        assert_eq!(accel_for(other, Accel::Kvm), Accel::Tcg);
        if let Some(h) = host_arch() {
            assert_eq!(accel_for(h, Accel::Kvm), Accel::Kvm);
        }
    }
}
