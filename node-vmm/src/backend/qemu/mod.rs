//! The QEMU backend: guests run in QEMU processes owned by the launcher, driven over QMP,
//! with the guest agent on a second port. What follows describes x86_64 (`q35`); what
//! differs for ppc64le (`pseries`: whole-core units, DEVICE_DELETED, hard CPU ids,
//! virtio-serial agent) is in [`crate::backend::qemu::machine`], the only place that knows architectures.
//!
//! # Command line
//!
//! `-machine q35`, `-smp boot,maxcpus,sockets,cores,threads` (slots `0..boot` are present at
//! boot), one NUMA node per socket when there are several (`-numa node` with a RAM backend
//! each, `-numa cpu,node-id=i,socket-id=i`), `-accel kvm` or `-accel tcg,thread=multi`,
//! `-sandbox on`, `-run-with user=` when configured, `-no-reboot`, `-nodefaults`, the
//! console in `serial.log` (and on `console.sock`, x86), QMP on `qmp.sock`, and the guest agent's chardev on `qga.sock`
//! behind an `isa-serial` device (the guest's ttyS1). Under TCG the CPU model is
//! `qemu64,vendor=GenuineIntel`: with TCG's default AMD vendor string and no TOPOEXT, Linux
//! ignores SMT siblings.
//!
//! # A resize
//!
//! Plug, per unit (one slot, or every thread of a core under Core granularity):
//! `device_add` of the slot's `type` and `props` from `query-hotpluggable-cpus` (phase
//! *applied*), then the guest's `ACPI_DEVICE_OST` for that slot with source 1 and status 0
//! (*acked*), then the new logical CPUs are identified through the guest agent (see
//! below) and onlined with `guest-set-vcpus` until `guest-get-vcpus` reports them online
//! (*online*). A plug cut short (a timeout, an agent restart) is recorded and finished by
//! the next `observe`. A guest without an agent stops at *acked*; its vCPUs stay Present.
//!
//! Unplug, per unit: offline through the agent, `device_del` (*applied*, the slot is then
//! `Unplugging`), and the final eject `ACPI_DEVICE_OST` (source 3, status 0; QEMU sends no
//! `DEVICE_DELETED` for x86 CPUs) until the unplug deadline (*acked*). Past the deadline
//! the slot stays `Unplugging` and the step reports a timeout; a later attempt retries.
//!
//! One operation at a time per VM: every QMP or agent conversation of a handle runs under
//! one mutex.
//!
//! # The TCG vCPU budget
//!
//! Under multi-threaded TCG one QEMU process can create at most `maxcpus` vCPU threads in
//! its whole life (an unplugged vCPU's thread is not reused; the next creation past the
//! budget aborts QEMU with `tcg_register_thread: assertion failed`). The backend counts
//! creations in `backend.json` (it survives an agent restart) and refuses a plug that
//! would exceed the budget with [`BackendError::VcpuBudget`].
//!
//! # Mapping guest CPUs to slots
//!
//! Never by `cpuN` order. Online CPUs: the APIC id in the guest's `/proc/cpuinfo`, which
//! QEMU derives from (socket, core, thread). Offline CPUs: the CPU's ACPI processor device
//! `firmware_node/path` (`\_SB_.CPUS.C%03X`, the possible-CPU index, which is the slot
//! index). A plug of one slot that makes exactly one CPU appear (against a snapshot taken
//! just before, while the handle holds the VM) needs no file read: nothing else can add a
//! CPU meanwhile. The map is kept between operations and rebuilt by `observe` whenever the
//! guest's CPU set is not the one it was built for.
//!
//! # GuestOnline
//!
//! Under `spec.resizeMethod: GuestOnline` QEMU boots with every slot present
//! (`-smp max,maxcpus=max`) and the kernel's `maxcpus=<boot>` onlines only the first boot
//! vCPUs; the others are present, offline and recorded parked from the start. A resize
//! never sends `device_add` or `device_del`: it is the parking mechanism (`park`) in both
//! directions, one `guest-set-vcpus` per direction, confirmed by `guest-get-vcpus`. A
//! guest without an agent cannot be resized this way (the agent reports it Infeasible).
//!
//! # Files
//!
//! This module holds [`QemuConfig`] and [`QemuBackend`] (starting, adopting, listing and
//! cleaning up guests). A running guest is a [`QemuVm`] (`vm`); what it does is split by
//! responsibility: the command line (`cmdline`), the state that survives an agent restart
//! (`persisted`), which guest CPU is which slot (`cpumap`), observing (`observe`), one
//! resize (`resize`) made of plugs (`plug`), unplugs (`unplug`) and parked vCPUs
//! (`park`).

pub mod direct;
pub mod machine;
pub mod qga;
pub mod qmp;

mod cmdline;
mod cpumap;
pub mod disks;
mod observe;
mod park;
mod persisted;
mod plug;
mod resize;
pub mod seed;
mod unplug;
mod vm;

pub use cmdline::{base_cmdline, find_binary, find_binary_for, qemu_argv, validate_spec};
pub use cpumap::{apic_id, parse_cpuinfo_apic};
pub use persisted::BACKEND_JSON;
pub use vm::QemuVm;

use crate::backend::qemu::machine::Machine;
use crate::backend::{Accel, Backend, BackendError, Cause, NodeCapacity, VmHandle, VmKey, VmSpec};
use crate::launcher::{self, KillSignal, LauncherClient, LauncherError};
use corescale_api::{Arch, ResizeMethod};
use persisted::{load_persisted, store_persisted, Persisted};
use qmp::QmpClient;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The x86_64 QEMU binary looked up in `PATH` by default.
pub const DEFAULT_BINARY: &str = crate::backend::qemu::machine::X86_64_BINARY;
/// x86_64 CPU model under TCG (see the module documentation).
pub const TCG_CPU_MODEL: &str = crate::backend::qemu::machine::X86_64_TCG_CPU_MODEL;
/// CPU model under KVM.
pub const KVM_CPU_MODEL: &str = "host";

/// Configuration of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// QEMU binary for x86_64 guests: a name looked up in `PATH`, or a path.
    pub binary: String,
    /// QEMU binary for ppc64le guests.
    pub ppc64_binary: String,
    /// QEMU binary for aarch64 guests.
    pub aarch64_binary: String,
    /// Where the per-VM directories are (`<state>/<namespace>/<name>/`); the launcher's.
    pub state_dir: PathBuf,
    /// The launcher's socket.
    pub launcher_socket: PathBuf,
    /// Run QEMU as this user (`-run-with user=`), when set.
    pub run_as_user: Option<String>,
    /// `-cpu` of x86_64 guests under TCG (ppc64le guests get POWER9).
    pub tcg_cpu_model: String,
    /// `-cpu` under KVM (any architecture: KVM runs guests of the host's own).
    pub kvm_cpu_model: String,
    /// How long QEMU may take to open its QMP socket after spawning.
    pub connect_timeout: Duration,
    /// Deadline of one QMP command.
    pub qmp_timeout: Duration,
    /// Deadline of one guest agent command outside a resize (observe, readiness).
    pub agent_timeout: Duration,
    /// Extra arguments appended to QEMU's command line.
    pub extra_args: Vec<String>,
    /// The node's accelerator setting: "", "auto", "tcg" or "kvm" (`CORESCALE_ACCEL` wins).
    pub accel: String,
}

impl QemuConfig {
    /// Defaults for a state directory and a launcher socket.
    pub fn new(state_dir: impl Into<PathBuf>, launcher_socket: impl Into<PathBuf>) -> Self {
        QemuConfig {
            binary: DEFAULT_BINARY.into(),
            ppc64_binary: crate::backend::qemu::machine::PPC64_BINARY.into(),
            aarch64_binary: crate::backend::qemu::machine::AARCH64_BINARY.into(),
            state_dir: state_dir.into(),
            launcher_socket: launcher_socket.into(),
            run_as_user: None,
            tcg_cpu_model: TCG_CPU_MODEL.into(),
            kvm_cpu_model: KVM_CPU_MODEL.into(),
            connect_timeout: Duration::from_secs(20),
            qmp_timeout: Duration::from_secs(10),
            agent_timeout: Duration::from_secs(2),
            extra_args: Vec::new(),
            accel: String::new(),
        }
    }

    /// The QEMU binary for guests of `arch`.
    pub fn binary_for(&self, arch: Arch) -> &str {
        match arch {
            Arch::X86_64 => &self.binary,
            Arch::Ppc64le => &self.ppc64_binary,
            Arch::Aarch64 => &self.aarch64_binary,
        }
    }

    /// `-cpu` for guests of `arch` under `accel`.
    pub fn cpu_model(&self, arch: Arch, accel: Accel) -> &str {
        match (accel, arch) {
            (Accel::Kvm, _) => &self.kvm_cpu_model,
            (Accel::Tcg, Arch::X86_64) => &self.tcg_cpu_model,
            (Accel::Tcg, a) => Machine::of(a).tcg_cpu_model(),
        }
    }
}

/// Read the last `max` bytes of a file as text (for error messages).
fn tail(path: &Path, max: usize) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    let start = b.len().saturating_sub(max);
    String::from_utf8_lossy(&b[start..]).trim().to_string()
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    cfg: Arc<QemuConfig>,
    launcher: LauncherClient,
}

fn launcher_err(e: LauncherError) -> BackendError {
    BackendError::Launcher(Cause::of(e))
}

impl QemuBackend {
    /// A backend with this configuration.
    pub fn new(cfg: QemuConfig) -> Self {
        let launcher = LauncherClient::new(&cfg.launcher_socket);
        QemuBackend {
            cfg: Arc::new(cfg),
            launcher,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &QemuConfig {
        &self.cfg
    }

    /// The guest architectures this node can run (those whose QEMU binary is installed),
    /// each with its accelerator: `native` (the accelerator chosen for this host) for the
    /// host's own architecture, TCG for every other (KVM runs only the host's own).
    pub fn arches(&self, native: Accel) -> BTreeMap<Arch, Accel> {
        Arch::ALL
            .into_iter()
            .filter(|&a| match find_binary_for(self.cfg.binary_for(a), a) {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!(arch = %a, error = %e, "this node cannot run these guests");
                    false
                }
            })
            .map(|a| (a, crate::backend::qemu::machine::accel_for(a, native)))
            .collect()
    }

    fn dir(&self, key: &VmKey) -> PathBuf {
        launcher::vm_dir(&self.cfg.state_dir, &key.namespace, &key.name)
    }

    /// Drop the launcher's record of `key`'s VMM if it has exited; a VMM that still runs
    /// is an error whose message ends with `what_to_do`.
    async fn forget_exited(&self, key: &VmKey, what_to_do: &str) -> Result<(), BackendError> {
        let Some(p) = self
            .launcher
            .status(&key.namespace, &key.name)
            .await
            .map_err(launcher_err)?
        else {
            return Ok(());
        };
        if p.running {
            return Err(BackendError::State {
                path: self.dir(key).display().to_string(),
                message: format!("{key} still runs (pid {}); {what_to_do}", p.pid),
            });
        }
        self.launcher
            .forget(&key.namespace, &key.name)
            .await
            .map_err(launcher_err)
    }

    /// Start a guest; the concrete handle (the trait's `start` boxes it).
    pub async fn start_vm(&self, spec: &VmSpec) -> Result<QemuVm, BackendError> {
        validate_spec(spec)?;
        let binary = find_binary_for(self.cfg.binary_for(spec.arch), spec.arch)?;
        if !spec.kernel.is_file() {
            return Err(BackendError::BootPath {
                field: crate::images::KERNEL_FIELD,
                message: format!(
                    "kernel {} not found (build the default guest with node-vmm/guest/build.sh)",
                    spec.kernel.display()
                ),
            });
        }
        if let Some(initrd) = &spec.initrd {
            if !initrd.is_file() {
                return Err(BackendError::BootPath {
                    field: crate::images::INITRD_FIELD,
                    message: format!("initrd {} not found (build the default guest with node-vmm/guest/build.sh)", initrd.display()),
                });
            }
        }
        let key = spec.key();
        self.forget_exited(&key, "adopt it instead of starting it again")
            .await?;
        let dir = self.dir(&key);
        let argv = qemu_argv(spec, &self.cfg, &binary, &dir)?;
        disks::prepare(&self.cfg.state_dir, &key, &spec.uid, &spec.disks).await?;
        if let Some(seed) = &spec.seed {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
            seed::write_seed(&dir.join(seed::SEED_IMAGE), seed)?;
        }
        let spec_json =
            serde_json::to_value(spec).map_err(|e| BackendError::Protocol(Cause::of(e)))?;
        let t0 = Instant::now();
        let proc = self
            .launcher
            .spawn(&key.namespace, &key.name, argv, spec_json)
            .await
            .map_err(launcher_err)?;
        let st = match spec.resize_method {
            ResizeMethod::Hotplug => Persisted {
                uid: spec.uid.clone(),
                vcpu_threads_created: spec.boot_vcpus,
                ..Default::default()
            },
            // Every slot's thread exists from boot; the kernel (`maxcpus=`) left all but
            // the first boot_vcpus offline: they start parked.
            ResizeMethod::GuestOnline => Persisted {
                uid: spec.uid.clone(),
                vcpu_threads_created: spec.topology.max_vcpus(),
                parked: (spec.boot_vcpus..spec.topology.max_vcpus()).collect(),
                ..Default::default()
            },
        };
        // A VMM whose state cannot be recorded (or that never answers) is not left running:
        // the next start would find it in the way.
        let ready = match store_persisted(&dir, &st) {
            Ok(()) => self.connect_qmp(&key, &dir).await,
            Err(e) => Err(e),
        };
        let qmp = match ready {
            Ok(q) => q,
            Err(e) => {
                // Reaped before the error returns, so a retry does not find it running.
                let _ = self
                    .launcher
                    .kill(&key.namespace, &key.name, KillSignal::Kill)
                    .await;
                let _ = launcher::exit_of(
                    &self.launcher,
                    &key.namespace,
                    &key.name,
                    Duration::from_secs(5),
                )
                .await;
                return Err(e);
            }
        };
        tracing::info!(vm = %key, pid = proc.pid, accel = spec.accel.as_str(), qmp_ms = t0.elapsed().as_millis(), "QEMU started");
        Ok(QemuVm::new(
            spec.clone(),
            dir,
            proc.pid,
            qmp,
            self.launcher.clone(),
            Arc::clone(&self.cfg),
            st,
        ))
    }

    async fn connect_qmp(&self, key: &VmKey, dir: &Path) -> Result<Arc<QmpClient>, BackendError> {
        let sock = dir.join(launcher::QMP_SOCK);
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut last = String::from("the socket did not appear");
        loop {
            if sock.exists() {
                match QmpClient::connect(&sock, Duration::from_secs(2)).await {
                    Ok(c) => {
                        let v = c.greeting().version;
                        if v.major < 10 {
                            tracing::warn!(vm = %key, version = ?v, "QEMU older than 10: vCPU re-plug after unplug may crash it under TCG");
                        }
                        return Ok(Arc::new(c));
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            match self
                .launcher
                .status(&key.namespace, &key.name)
                .await
                .map_err(launcher_err)?
            {
                Some(p) if !p.running => {
                    let exit = p
                        .exit
                        .map_or_else(|| "unknown status".to_string(), |e| e.to_string());
                    return Err(BackendError::Launcher(Cause::msg(format!(
                        "QEMU for {key} exited ({exit}) right after starting: {}",
                        tail(&dir.join(launcher::QEMU_LOG), 2000)
                    ))));
                }
                None => return Err(BackendError::NotRunning(key.to_string())),
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Launcher(Cause::msg(format!(
                    "QEMU for {key} did not open its QMP socket {} within {:?}: {last}",
                    sock.display(),
                    self.cfg.connect_timeout
                ))));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Re-attach to a running guest; the concrete handle.
    pub async fn adopt_vm(&self, spec: &VmSpec) -> Result<QemuVm, BackendError> {
        let key = spec.key();
        let dir = self.dir(&key);
        let proc = self
            .launcher
            .status(&key.namespace, &key.name)
            .await
            .map_err(launcher_err)?
            .filter(|p| p.running)
            .ok_or_else(|| BackendError::NotRunning(key.to_string()))?;
        let rec = launcher::read_record(&dir).map_err(|e| match e {
            LauncherError::State { path, message } => BackendError::State { path, message },
            other => launcher_err(other),
        })?;
        if rec.pid != proc.pid {
            return Err(BackendError::State {
                path: dir.join(launcher::VM_JSON).display().to_string(),
                message: format!(
                    "records pid {} but the launcher runs pid {}",
                    rec.pid, proc.pid
                ),
            });
        }
        let uid = rec
            .spec
            .get("uid")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if uid != spec.uid {
            return Err(BackendError::State {
                path: dir.join(launcher::VM_JSON).display().to_string(),
                message: format!(
                    "belongs to VM uid {uid:?}, not {:?}: a different VM of the same name runs",
                    spec.uid
                ),
            });
        }
        // The socket exists: a failure here is not QEMU starting up, so give up quickly.
        let sock = dir.join(launcher::QMP_SOCK);
        let qmp = QmpClient::connect(&sock, Duration::from_secs(3))
            .await
            .map(Arc::new)
            .map_err(|e| BackendError::Io {
                context: format!("adopting {key}"),
                source: Cause::of(e),
            })?;
        // A damaged backend.json (truncated by a full disk, edited by hand) must not make a
        // running guest unmanageable: it is rebuilt like a missing one, and the log says so.
        let persisted = load_persisted(&dir).unwrap_or_else(|e| {
            tracing::warn!(vm = %key, error = %e, "ignoring the damaged backend state; rebuilding it from QEMU");
            None
        });
        let st = match persisted {
            Some(st) if st.uid == spec.uid => st,
            other => {
                // Without the record the budget is unknown: count the vCPUs present now,
                // the least it can be. Pending unplugs are unknown too: a later unplug of
                // such a slot finds QEMU already unplugging it and waits for it.
                let present = qmp
                    .query_hotpluggable_cpus(self.cfg.qmp_timeout)
                    .await
                    .map(|v| v.iter().filter(|c| c.qom_path.is_some()).count())
                    .unwrap_or(0);
                tracing::warn!(vm = %key, found = ?other.map(|o| o.uid), "no backend state for this VM; the vCPU budget restarts from the vCPUs present");
                let st = Persisted {
                    uid: spec.uid.clone(),
                    vcpu_threads_created: u32::try_from(present).unwrap_or(u32::MAX),
                    ..Default::default()
                };
                if let Err(e) = store_persisted(&dir, &st) {
                    tracing::error!(vm = %key, error = %e, "cannot record the rebuilt backend state");
                }
                st
            }
        };
        tracing::info!(vm = %key, pid = proc.pid, "adopted running QEMU");
        Ok(QemuVm::new(
            spec.clone(),
            dir,
            proc.pid,
            qmp,
            self.launcher.clone(),
            Arc::clone(&self.cfg),
            st,
        ))
    }
}

#[async_trait::async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capacity(&self) -> NodeCapacity {
        match crate::accel::choose(&self.cfg.accel, &crate::accel::HostPaths::default()) {
            Ok(c) => NodeCapacity {
                host_cpus: c.host_cpus,
                max_vcpus_per_vm: c.max_vcpus,
                accel: c.accel,
                arches: self.arches(c.accel),
            },
            Err(e) => {
                tracing::error!(error = %e, "accelerator choice failed; announcing TCG");
                NodeCapacity::host_default()
            }
        }
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        Ok(Box::new(self.start_vm(spec).await?))
    }

    async fn running(&self) -> Result<Vec<VmSpec>, BackendError> {
        let mut out = Vec::new();
        for p in self.launcher.list().await.map_err(launcher_err)? {
            if !p.running {
                continue;
            }
            let dir = launcher::vm_dir(&self.cfg.state_dir, &p.namespace, &p.name);
            match launcher::read_record(&dir) {
                Ok(rec) if rec.pid == p.pid => match serde_json::from_value::<VmSpec>(rec.spec) {
                    Ok(spec) => out.push(spec),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "vm.json holds no VM spec; not adoptable")
                    }
                },
                Ok(rec) => {
                    tracing::warn!(dir = %dir.display(), recorded = rec.pid, running = p.pid, "vm.json is stale; not adoptable")
                }
                Err(e) => tracing::warn!(error = %e, "not adoptable"),
            }
        }
        Ok(out)
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        Ok(Box::new(self.adopt_vm(spec).await?))
    }

    fn console_tail(&self, key: &VmKey) -> Option<String> {
        let text = tail(&self.dir(key).join(launcher::SERIAL_LOG), 4096);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let last = lines[lines.len().saturating_sub(4)..].join(" | ");
        // An Event's note holds at most 1 KiB: keep the end, where the reason usually is.
        let keep = last.char_indices().rev().nth(399).map_or(0, |(i, _)| i);
        (!last.is_empty()).then(|| last[keep..].to_string())
    }

    async fn remove_disks(&self, key: &VmKey) -> Result<(), BackendError> {
        disks::remove(&self.cfg.state_dir, key)
    }

    async fn cleanup(&self, key: &VmKey) -> Result<(), BackendError> {
        let dir = self.dir(key);
        self.forget_exited(key, "stop it before cleaning up")
            .await?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(BackendError::io(format!("removing {}", dir.display()), e))
            }
            _ => Ok(()),
        }
    }
}

/// A spec for the unit tests of this module's files: `sockets`x`cores`x`threads` slots,
/// `boot` of them at boot, an x86_64 TCG guest.
#[cfg(test)]
pub(crate) fn test_spec(sockets: u32, cores: u32, threads: u32, boot: u32) -> VmSpec {
    use corescale_api::{Granularity, Placement, Topology};
    VmSpec {
        namespace: "ns".into(),
        name: "vm".into(),
        uid: "u1".into(),
        topology: Topology {
            sockets,
            cores,
            threads,
        },
        granularity: Granularity::Thread,
        placement: Placement::Packed,
        boot_vcpus: boot,
        resize_method: corescale_api::ResizeMethod::Hotplug,
        memory_mib: 256,
        arch: Arch::X86_64,
        kernel: "/img/vmlinux".into(),
        initrd: Some("/img/initrd,x".into()),
        cmdline: "quiet".into(),
        accel: Accel::Tcg,
        disks: Vec::new(),
        seed: None,
        ports: Vec::new(),
    }
}
