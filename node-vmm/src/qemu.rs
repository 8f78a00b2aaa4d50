//! The QEMU backend: guests run in QEMU processes owned by the launcher, driven over QMP,
//! with the guest agent on a second port. What follows describes x86_64 (`q35`); what
//! differs for ppc64le (`pseries`: whole-core units, DEVICE_DELETED, hard CPU ids,
//! virtio-serial agent) is in [`crate::machine`], the only place that knows architectures.
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

use crate::backend::{
    Accel, Backend, BackendError, Direction, NodeCapacity, Observation, ResizeOptions,
    ResizeReport, SlotObservation, StepReport, VmEvent, VmHandle, VmKey, VmSpec,
};
use crate::launcher::{self, KillSignal, LauncherClient, LauncherError};
use crate::machine::{EjectDone, GuestCpuId, InsertDone, Machine};
use crate::qga::{slot_from_acpi_path, QgaClient, QgaError};
use crate::qmp::{self, EventKind, HotpluggableCpu, QmpClient, QmpError};
use crate::secs;
use corescale_api::planner::slots as topology_slots;
use corescale_api::{Arch, Granularity, Plan, SlotId, Topology, VcpuState, MAX_VCPUS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio::task::JoinHandle;

mod park;

/// The x86_64 QEMU binary looked up in `PATH` by default.
pub const DEFAULT_BINARY: &str = crate::machine::X86_64_BINARY;
/// x86_64 CPU model under TCG (see the module documentation).
pub const TCG_CPU_MODEL: &str = crate::machine::X86_64_TCG_CPU_MODEL;
/// CPU model under KVM.
pub const KVM_CPU_MODEL: &str = "host";
/// The backend's own per-VM state (budget, pending unplugs), next to `vm.json`.
pub const BACKEND_JSON: &str = "backend.json";
/// The kernel command line the backend puts before the spec's.
pub fn base_cmdline(m: Machine) -> String {
    format!("console={} panic=-1", m.console())
}

/// Configuration of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// QEMU binary for x86_64 guests: a name looked up in `PATH`, or a path.
    pub binary: String,
    /// QEMU binary for ppc64le guests.
    pub ppc64_binary: String,
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
            ppc64_binary: crate::machine::PPC64_BINARY.into(),
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

/// The backend's per-VM state that must survive an agent restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Persisted {
    /// UID of the VM this state belongs to.
    uid: String,
    /// vCPU threads this QEMU process has created (boot vCPUs included).
    vcpu_threads_created: u32,
    /// Slots with a `device_del` the guest has not completed.
    unplugging: BTreeSet<u32>,
    /// Absent slots whose last plug failed.
    failed: BTreeSet<u32>,
    /// Slots with a `device_add` whose vCPU is not confirmed online yet: a plug that a
    /// timeout or an agent restart interrupted. Observing finishes them (see `observe`).
    #[serde(default)]
    plugging: BTreeSet<u32>,
    /// Slots parked under TCG: QEMU keeps the vCPU, the guest has it offline (see `park`).
    #[serde(default)]
    parked: BTreeSet<u32>,
}

fn load_persisted(dir: &Path) -> Result<Option<Persisted>, BackendError> {
    let path = dir.join(BACKEND_JSON);
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackendError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| BackendError::State {
                path: path.display().to_string(),
                message: format!("unreadable: {e}"),
            }),
    }
}

fn store_persisted(dir: &Path, st: &Persisted) -> Result<(), BackendError> {
    let path = dir.join(BACKEND_JSON);
    let bytes = serde_json::to_vec_pretty(st).map_err(|e| BackendError::State {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    launcher::write_private(&path, &bytes)
        .map_err(|e| BackendError::io(format!("writing {}", path.display()), &e))
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
    push(&[
        "-smp",
        &format!(
            "{},maxcpus={},sockets={},cores={},threads={}",
            spec.boot_vcpus,
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
    let append = if spec.cmdline.trim().is_empty() {
        base
    } else {
        format!("{base} {}", spec.cmdline.trim())
    };
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
    let agent = m.agent_port_args();
    push(&agent.iter().map(String::as_str).collect::<Vec<_>>());
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

/// Bits needed to count `n` values (QEMU's `apicid_bitwidth_for_count`).
fn bitwidth(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The x86 APIC id QEMU gives a slot (one die and one module per socket).
pub fn apic_id(t: &Topology, s: &SlotId) -> u32 {
    let tw = bitwidth(t.threads);
    let cw = bitwidth(t.cores);
    (s.socket << (cw + tw)) | (s.core << tw) | s.thread
}

/// Parse `/proc/cpuinfo` into logical CPU -> APIC id.
pub fn parse_cpuinfo_apic(text: &str) -> BTreeMap<u32, u32> {
    let mut out = BTreeMap::new();
    let mut cur = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "processor" => cur = v.trim().parse().ok(),
            "apicid" => {
                if let (Some(c), Ok(a)) = (cur, v.trim().parse()) {
                    out.insert(c, a);
                }
            }
            _ => {}
        }
    }
    out
}

/// CPU seconds (user + system) of a task from `/proc/<pid>/task/<tid>/stat`.
fn task_cpu_seconds(pid: i32, tid: i64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant; it has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz } else { 100 };
    let ticks = utime.saturating_add(stime);
    Some(ticks as f64 / hz as f64)
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
    BackendError::Launcher(e.to_string())
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

    /// The guest architectures this node can run: those whose QEMU binary is installed
    /// (guests of another architecture than the host's run under TCG).
    pub fn arches(&self) -> Vec<String> {
        Arch::ALL
            .into_iter()
            .filter(|&a| match find_binary_for(self.cfg.binary_for(a), a) {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!(arch = %a, error = %e, "this node cannot run these guests");
                    false
                }
            })
            .map(|a| a.as_str().to_string())
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
        let spec_json =
            serde_json::to_value(spec).map_err(|e| BackendError::Protocol(e.to_string()))?;
        let t0 = Instant::now();
        let proc = self
            .launcher
            .spawn(&key.namespace, &key.name, argv, spec_json)
            .await
            .map_err(launcher_err)?;
        let st = Persisted {
            uid: spec.uid.clone(),
            vcpu_threads_created: spec.boot_vcpus,
            ..Default::default()
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
                    return Err(BackendError::Launcher(format!(
                        "QEMU for {key} exited ({exit}) right after starting: {}",
                        tail(&dir.join(launcher::QEMU_LOG), 2000)
                    )));
                }
                None => return Err(BackendError::NotRunning(key.to_string())),
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Launcher(format!(
                    "QEMU for {key} did not open its QMP socket {} within {:?}: {last}",
                    sock.display(),
                    self.cfg.connect_timeout
                )));
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
                message: e.to_string(),
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
                arches: self.arches(),
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

    async fn cleanup(&self, key: &VmKey) -> Result<(), BackendError> {
        let dir = self.dir(key);
        self.forget_exited(key, "stop it before cleaning up")
            .await?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(BackendError::io(format!("removing {}", dir.display()), &e))
            }
            _ => Ok(()),
        }
    }
}

/// What the agent knows of the guest's CPUs, cached between observations.
#[derive(Debug, Default)]
struct CpuMap {
    /// Logical CPU -> slot.
    by_logical: BTreeMap<u32, u32>,
    /// (present slots, logical ids), both sorted, the map is valid for. Built by a full
    /// mapping, then kept current by this handle's own plugs and unplugs, so observing
    /// right after a resize does not read the guest's files again.
    signature: Option<(Vec<u32>, Vec<u32>)>,
}

impl CpuMap {
    fn slot_logical(&self, slot: u32) -> Option<u32> {
        self.by_logical
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(l, _)| *l)
    }
    fn forget_slot(&mut self, slot: u32) {
        let gone = self.slot_logical(slot);
        self.by_logical.retain(|_, s| *s != slot);
        if let Some((present, logical)) = &mut self.signature {
            present.retain(|s| *s != slot);
            if let Some(l) = gone {
                logical.retain(|x| *x != l);
            }
        }
    }
    /// A plug of this handle brought `slot` in as guest CPU `logical`.
    fn note_plugged(&mut self, slot: u32, logical: u32) {
        self.by_logical.retain(|_, s| *s != slot);
        self.by_logical.insert(logical, slot);
        if let Some((present, all)) = &mut self.signature {
            for (v, x) in [(present, slot), (all, logical)] {
                if let Err(i) = v.binary_search(&x) {
                    v.insert(i, x);
                }
            }
        }
    }
}

struct Ops {
    qga: QgaClient,
    map: CpuMap,
    st: Persisted,
    /// QEMU's hot-pluggable CPU list as of the last observation, kept current through this
    /// handle's own device_add/device_del; `None` when it may not be (a step failed, a raw
    /// QMP command ran). A resize then starts without asking QEMU again: that round trip
    /// is in the latency a user waits for.
    hp: Option<BTreeMap<u32, HotpluggableCpu>>,
}

/// The guest agent's view of one observation.
struct AgentView {
    /// Slot -> (logical id, online).
    slots: BTreeMap<u32, (u32, bool)>,
}

/// One running QEMU guest.
pub struct QemuVm {
    spec: VmSpec,
    key: VmKey,
    dir: PathBuf,
    pid: i32,
    qmp: Arc<QmpClient>,
    launcher: LauncherClient,
    cfg: Arc<QemuConfig>,
    slots: Vec<SlotId>,
    machine: Machine,
    /// QEMU's `vsmt` once asked (0: not yet).
    vsmt: std::sync::atomic::AtomicU32,
    apic_to_slot: HashMap<u32, u32>,
    ops: Mutex<Ops>,
    ready: AtomicBool,
    events: Mutex<mpsc::Receiver<VmEvent>>,
    monitor: JoinHandle<()>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("key", &self.key)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

async fn monitor(
    qmp: Arc<QmpClient>,
    launcher: LauncherClient,
    key: VmKey,
    tx: mpsc::Sender<VmEvent>,
) {
    let mut rx = qmp.subscribe();
    let shutdown = |ev: &qmp::Event| match ev.kind() {
        EventKind::Shutdown { guest, reason } => {
            tracing::info!(vm = %key, guest, reason, "guest shut down");
            true
        }
        _ => false,
    };
    loop {
        // Events first: a SHUTDOWN and the monitor closing right after it are often ready
        // together, and the guest stopping must be reported before the VMM's exit.
        tokio::select! {
            biased;
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    if shutdown(&ev) {
                        let _ = tx.send(VmEvent::GuestStopped).await;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = qmp.closed() => {
                while let Ok(ev) = rx.try_recv() {
                    if shutdown(&ev) {
                        let _ = tx.send(VmEvent::GuestStopped).await;
                    }
                }
                break;
            }
        }
    }
    // The monitor connection closed: QEMU exited, or it is beyond control.
    let exit =
        launcher::exit_of(&launcher, &key.namespace, &key.name, Duration::from_secs(2)).await;
    let status = match exit {
        Some(info) => info.status(),
        None => {
            tracing::error!(vm = %key, "QMP closed but the VMM still runs: killing it, it cannot be driven");
            let _ = launcher
                .kill(&key.namespace, &key.name, KillSignal::Kill)
                .await;
            launcher::exit_of(&launcher, &key.namespace, &key.name, Duration::from_secs(5))
                .await
                .and_then(|i| i.status())
        }
    };
    tracing::info!(vm = %key, ?status, "VMM exited");
    let _ = tx.send(VmEvent::Exited { status }).await;
}

/// Time left until `deadline`, at least a millisecond (a call given zero would not even
/// try).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A unit of a plan: one slot, or every thread of one core.
fn units(plan_slots: &[u32], spec: &VmSpec) -> Result<Vec<Vec<u32>>, String> {
    let t = &spec.topology;
    let max = t.max_vcpus();
    let mut seen = BTreeSet::new();
    for &s in plan_slots {
        if s >= max {
            return Err(format!(
                "slot {s} is outside the VM's {max} slots (spec.topology {}x{}x{}); the target is above the maximum",
                t.sockets, t.cores, t.threads
            ));
        }
        if !seen.insert(s) {
            return Err(format!("slot {s} appears twice in the plan"));
        }
    }
    if spec.granularity == Granularity::Thread || t.threads == 1 {
        return Ok(plan_slots.iter().map(|&s| vec![s]).collect());
    }
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut by_core: BTreeMap<u32, usize> = BTreeMap::new();
    for &s in plan_slots {
        let core = s / t.threads;
        match by_core.get(&core) {
            Some(&i) => out[i].push(s),
            None => {
                by_core.insert(core, out.len());
                out.push(vec![s]);
            }
        }
    }
    for u in &out {
        if u.len() != usize::try_from(t.threads).unwrap_or(usize::MAX) {
            let core = u[0] / t.threads;
            let all: Vec<u32> = (core * t.threads..(core + 1) * t.threads).collect();
            return Err(format!(
                "granularity Core acts on whole cores: the plan has slots {u:?} of the core with slots {all:?}"
            ));
        }
    }
    Ok(out)
}

impl QemuVm {
    fn new(
        spec: VmSpec,
        dir: PathBuf,
        pid: i32,
        qmp: Arc<QmpClient>,
        launcher: LauncherClient,
        cfg: Arc<QemuConfig>,
        st: Persisted,
    ) -> Self {
        let key = spec.key();
        let spec_arch = spec.arch;
        let slots = topology_slots(&spec.topology);
        let apic_to_slot = slots
            .iter()
            .map(|s| (apic_id(&spec.topology, s), s.index))
            .collect();
        let (tx, rx) = mpsc::channel(16);
        let monitor = tokio::spawn(monitor(Arc::clone(&qmp), launcher.clone(), key.clone(), tx));
        let qga = QgaClient::new(dir.join(launcher::QGA_SOCK));
        QemuVm {
            spec,
            key,
            dir,
            pid,
            qmp,
            launcher,
            cfg,
            slots,
            machine: Machine::of(spec_arch),
            vsmt: std::sync::atomic::AtomicU32::new(0),
            apic_to_slot,
            ops: Mutex::new(Ops {
                qga,
                map: CpuMap::default(),
                st,
                hp: None,
            }),
            ready: AtomicBool::new(false),
            events: Mutex::new(rx),
            monitor,
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The VM's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The QEMU version from the QMP greeting.
    pub fn qemu_version(&self) -> qmp::QemuVersion {
        self.qmp.greeting().version
    }

    fn qmp_err(&self, e: QmpError) -> BackendError {
        match e {
            QmpError::Refused {
                command,
                class,
                desc,
            } => BackendError::Qmp {
                command,
                class,
                desc,
            },
            QmpError::Closed => BackendError::NotRunning(self.key.to_string()),
            other => BackendError::Protocol(other.to_string()),
        }
    }

    fn qga_err(e: QgaError) -> BackendError {
        BackendError::GuestAgent(e.to_string())
    }

    fn persist(&self, st: &Persisted) {
        if let Err(e) = store_persisted(&self.dir, st) {
            tracing::error!(vm = %self.key, error = %e, "cannot record the backend state");
        }
    }

    /// Run a QMP command (tests and tools: `stop`, `cont`, `qom-get` ...), serialized with
    /// the handle's other operations.
    pub async fn qmp_command(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        let mut ops = self.ops.lock().await;
        // The command may add or remove devices behind the handle's back.
        ops.hp = None;
        self.qmp
            .execute_value(command, arguments, self.cfg.qmp_timeout)
            .await
            .map_err(|e| self.qmp_err(e))
    }

    /// Read a guest file through the agent.
    pub async fn guest_read(&self, path: &str) -> Result<String, BackendError> {
        let mut ops = self.ops.lock().await;
        ops.qga
            .read_text(path, self.cfg.agent_timeout.max(Duration::from_secs(5)))
            .await
            .map_err(Self::qga_err)
    }

    /// The guest's uptime in seconds, through the agent.
    pub async fn guest_uptime(&self) -> Result<f64, BackendError> {
        let mut ops = self.ops.lock().await;
        ops.qga
            .uptime(self.cfg.agent_timeout.max(Duration::from_secs(5)))
            .await
            .map_err(Self::qga_err)
    }

    /// vCPU threads created so far and the lifetime budget, under TCG (None under KVM).
    pub async fn vcpu_budget(&self) -> Option<(u32, u32)> {
        let ops = self.ops.lock().await;
        (self.spec.accel == Accel::Tcg)
            .then(|| (ops.st.vcpu_threads_created, self.spec.topology.max_vcpus()))
    }

    /// Wait until the guest agent answers; the time it took. Returns within `timeout` plus
    /// one probe (300 ms) whatever the guest does: each probe is bounded (see
    /// `QgaClient::send`), and a probe skipped because another call holds the guest's
    /// line waits a little instead of spinning.
    pub async fn wait_guest_ready(&self, timeout: Duration) -> Result<Duration, BackendError> {
        let t0 = Instant::now();
        while !self.guest_ready().await {
            if self.qmp.is_closed() {
                return Err(BackendError::NotRunning(self.key.to_string()));
            }
            if t0.elapsed() > timeout {
                return Err(BackendError::GuestAgent(format!(
                    "no answer within {timeout:?}; console: {}",
                    tail(&self.dir.join(launcher::SERIAL_LOG), 1500)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(t0.elapsed())
    }

    /// Present slots from QEMU: slot -> hotpluggable entry.
    async fn hotpluggable(&self) -> Result<BTreeMap<u32, HotpluggableCpu>, BackendError> {
        let list = self
            .qmp
            .query_hotpluggable_cpus(self.cfg.qmp_timeout)
            .await
            .map_err(|e| self.qmp_err(e))?;
        let t = &self.spec.topology;
        let per_unit = self.machine.unit_threads(t);
        let mut out = BTreeMap::new();
        for c in list {
            match self.machine.slot_of_props(t, &c.props) {
                // Every slot of the unit (the threads of a sPAPR core) shares its entry.
                Some(s) => {
                    for slot in s..s.saturating_add(per_unit).min(t.max_vcpus()) {
                        out.insert(slot, c.clone());
                    }
                }
                None => {
                    tracing::warn!(vm = %self.key, props = ?c.props, "a CPU slot outside the topology")
                }
            }
        }
        Ok(out)
    }

    /// Map logical CPUs to slots from scratch.
    async fn map_logical(
        &self,
        qga: &mut QgaClient,
        vcpus: &[crate::qga::GuestLogicalProcessor],
        deadline: Instant,
    ) -> Result<BTreeMap<u32, u32>, QgaError> {
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50))
        };
        let mut map = BTreeMap::new();
        if self.machine.guest_cpu_id() == GuestCpuId::ApicAndAcpi && vcpus.iter().any(|v| v.online)
        {
            let text = qga.read_text("/proc/cpuinfo", left()).await?;
            for (logical, apic) in parse_cpuinfo_apic(&text) {
                if let Some(&slot) = self.apic_to_slot.get(&apic) {
                    map.insert(logical, slot);
                }
            }
        }
        for v in vcpus {
            if map.contains_key(&v.logical_id) {
                continue;
            }
            if let Some(slot) = self.guest_slot(qga, v.logical_id, left()).await? {
                map.insert(v.logical_id, slot);
            }
        }
        Ok(map)
    }

    /// The guest's logical CPUs as the agent lists them, without the ones the guest does
    /// not have: on sPAPR, `guest-get-vcpus` also lists every possible CPU that is not
    /// present (as offline, with hard id 0), so those are dropped by the guest's
    /// `/sys/devices/system/cpu/present`.
    async fn guest_vcpus(
        &self,
        qga: &mut QgaClient,
        timeout: Duration,
    ) -> Result<Vec<crate::qga::GuestLogicalProcessor>, QgaError> {
        let deadline = Instant::now() + timeout;
        let mut vcpus = qga.get_vcpus(timeout).await?;
        if self.machine.guest_cpu_id() == GuestCpuId::PhysicalId {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50));
            let present = crate::machine::parse_cpulist(
                &qga.read_text("/sys/devices/system/cpu/present", left)
                    .await?,
            );
            vcpus.retain(|v| present.contains(&v.logical_id));
        }
        Ok(vcpus)
    }

    /// QEMU's `vsmt` (spacing of sPAPR hard CPU ids per core), asked once.
    async fn vsmt(&self) -> u32 {
        let known = self.vsmt.load(Ordering::Relaxed);
        if known != 0 {
            return known;
        }
        let got = self
            .qmp
            .execute_value(
                "qom-get",
                Some(serde_json::json!({"path": "/machine", "property": "vsmt"})),
                self.cfg.qmp_timeout,
            )
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0);
        let v = got.unwrap_or(self.spec.topology.threads);
        self.vsmt.store(v, Ordering::Relaxed);
        v
    }

    /// The slot of a logical CPU from what the guest says of it: its ACPI processor path
    /// (x86), or its hard id (sPAPR).
    async fn guest_slot(
        &self,
        qga: &mut QgaClient,
        logical: u32,
        timeout: Duration,
    ) -> Result<Option<u32>, QgaError> {
        let t = &self.spec.topology;
        let path = match self.machine.guest_cpu_id() {
            GuestCpuId::ApicAndAcpi => {
                format!("/sys/devices/system/cpu/cpu{logical}/firmware_node/path")
            }
            GuestCpuId::PhysicalId => format!("/sys/devices/system/cpu/cpu{logical}/physical_id"),
        };
        match qga.read_text(&path, timeout).await {
            Ok(text) => Ok(match self.machine.guest_cpu_id() {
                GuestCpuId::ApicAndAcpi => {
                    slot_from_acpi_path(&text).filter(|s| *s < t.max_vcpus())
                }
                GuestCpuId::PhysicalId => match text.trim().parse::<u32>() {
                    Ok(id) => self.machine.slot_of_hard_id(t, self.vsmt().await, id),
                    Err(_) => None,
                },
            }),
            Err(QgaError::Refused { desc, .. }) => {
                tracing::debug!(vm = %self.key, logical, desc, "no ACPI path for a guest CPU");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The agent's view: logical CPUs, their online state and their slots.
    async fn agent_view(
        &self,
        ops: &mut Ops,
        present: &[u32],
        timeout: Duration,
    ) -> Result<AgentView, QgaError> {
        let deadline = Instant::now() + timeout;
        let vcpus = self.guest_vcpus(&mut ops.qga, timeout).await?;
        self.view_of(ops, present, vcpus, deadline).await
    }

    /// The agent's view from the logical CPUs it listed: map them to slots (asking the
    /// guest again only when the set changed since the last mapping).
    async fn view_of(
        &self,
        ops: &mut Ops,
        present: &[u32],
        vcpus: Vec<crate::qga::GuestLogicalProcessor>,
        deadline: Instant,
    ) -> Result<AgentView, QgaError> {
        let mut logical: Vec<u32> = vcpus.iter().map(|v| v.logical_id).collect();
        logical.sort_unstable();
        let mut present = present.to_vec();
        present.sort_unstable();
        let sig = (present, logical);
        if ops.map.signature.as_ref() != Some(&sig) {
            let map = self.map_logical(&mut ops.qga, &vcpus, deadline).await?;
            ops.map.by_logical = map;
            ops.map.signature = Some(sig);
        }
        let mut slots = BTreeMap::new();
        for v in &vcpus {
            if let Some(&slot) = ops.map.by_logical.get(&v.logical_id) {
                slots.insert(slot, (v.logical_id, v.online));
            } else {
                tracing::debug!(vm = %self.key, logical = v.logical_id, "guest CPU not mapped to a slot");
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        Ok(AgentView { slots })
    }

    async fn observe_locked(&self, ops: &mut Ops) -> Result<Observation, BackendError> {
        // Until the agent first answers (the guest boots) a short try is enough.
        let agent_timeout = if self.ready.load(Ordering::Relaxed) {
            self.cfg.agent_timeout
        } else {
            self.cfg.agent_timeout.min(Duration::from_millis(300))
        };
        let deadline = Instant::now() + agent_timeout;
        // QEMU's two answers and the guest agent's list are independent round trips on
        // two sockets: ask them at once (an observation can follow a resize step, so its
        // time is in the latency a user sees). A QMP failure (QEMU gone) ends the
        // observation at once: the agent's call would wait out its timeout for a socket
        // that no longer accepts.
        let ((hp, fast), vcpus) = {
            let qmp = async {
                tokio::try_join!(self.hotpluggable(), async {
                    self.qmp
                        .query_cpus_fast(self.cfg.qmp_timeout)
                        .await
                        .map_err(|e| self.qmp_err(e))
                })
            };
            let guest = self.guest_vcpus(&mut ops.qga, agent_timeout);
            tokio::pin!(qmp, guest);
            tokio::select! {
                q = &mut qmp => (q?, guest.await),
                g = &mut guest => (qmp.await?, g),
            }
        };
        let t = &self.spec.topology;
        let tids: HashMap<u32, i64> = fast
            .iter()
            .filter_map(|c| {
                let slot = self.machine.slot_of_thread(t, &c.props, &c.qom_path)?;
                Some((slot, c.thread_id))
            })
            .collect();
        let present: Vec<u32> = hp
            .iter()
            .filter(|(_, c)| c.qom_path.is_some())
            .map(|(s, _)| *s)
            .collect();
        // Pending unplugs that completed, failed plugs that were plugged after all.
        let before = ops.st.clone();
        ops.st.unplugging.retain(|s| present.contains(s));
        ops.st.failed.retain(|s| !present.contains(s));
        ops.st.parked.retain(|s| present.contains(s));
        if ops.st != before {
            self.persist(&ops.st);
        }
        let view = match vcpus {
            Ok(vcpus) => self.view_of(ops, &present, vcpus, deadline).await,
            Err(e) => Err(e),
        };
        let mut agent = match view {
            Ok(v) => {
                // An agent that answers now counts from now on, even one that came late.
                self.ready.store(true, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                tracing::debug!(vm = %self.key, error = %e, "guest agent unavailable during observe");
                None
            }
        };
        if let Some(view) = &agent {
            if let Some(v) = self.finish_plugs(ops, &present, view).await {
                agent = Some(v);
            }
        }
        // A parked vCPU that the guest onlined by itself is in use again.
        if let Some(view) = &agent {
            let n = ops.st.parked.len();
            ops.st
                .parked
                .retain(|s| !matches!(view.slots.get(s), Some((_, true))));
            if ops.st.parked.len() != n {
                self.persist(&ops.st);
            }
        }
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let entry = hp.get(&s.index);
            let qom = entry.and_then(|c| c.qom_path.as_deref());
            let host_thread = qom
                .and(tids.get(&s.index))
                .and_then(|t| i32::try_from(*t).ok());
            let mapped = agent.as_ref().and_then(|a| a.slots.get(&s.index)).copied();
            let state = match (qom.is_some(), &agent) {
                (true, _) if ops.st.unplugging.contains(&s.index) => VcpuState::Unplugging,
                (true, _) if ops.st.parked.contains(&s.index) => VcpuState::Offline,
                (true, Some(_)) => match mapped {
                    Some((_, true)) => VcpuState::Online,
                    Some((_, false)) => VcpuState::Present,
                    None => VcpuState::Plugging,
                },
                // A plug the guest has not confirmed, while an agent that answered before
                // is silent (a paused guest): still Plugging, not done.
                (true, None)
                    if ops.st.plugging.contains(&s.index) && self.ready.load(Ordering::Relaxed) =>
                {
                    VcpuState::Plugging
                }
                (true, None) => VcpuState::Present,
                (false, _) if ops.st.failed.contains(&s.index) => VcpuState::Failed,
                (false, _) => VcpuState::Absent,
            };
            out.push(SlotObservation {
                state,
                guest_cpu: mapped.map(|m| m.0),
                host_thread,
            });
        }
        ops.hp = Some(hp);
        Ok(Observation {
            slots: out,
            guest_agent: agent.is_some(),
        })
    }

    /// Whether the guest has an agent: it answered once, or answers a short sync now.
    async fn has_agent(&self, ops: &mut Ops) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let ok = ops
            .qga
            .sync(Duration::from_millis(300), Duration::from_millis(300))
            .await
            .is_ok();
        if ok {
            self.ready.store(true, Ordering::Relaxed);
        }
        ok
    }

    /// Whether QEMU lists the slot without a vCPU now.
    async fn slot_gone(&self, slot: u32) -> bool {
        self.hotpluggable()
            .await
            .ok()
            .and_then(|hp| hp.get(&slot).map(|c| c.qom_path.is_none()))
            .unwrap_or(false)
    }

    /// Finish plugs that were interrupted (by a timeout, or by an agent restart between
    /// `device_add` and onlining): vCPUs this backend plugged that the guest has but keeps
    /// offline are onlined. vCPUs the guest offlined by itself are left alone. Returns a
    /// fresh agent view when something changed.
    async fn finish_plugs(
        &self,
        ops: &mut Ops,
        present: &[u32],
        view: &AgentView,
    ) -> Option<AgentView> {
        if ops.st.plugging.is_empty() {
            return None;
        }
        let before = ops.st.plugging.clone();
        let mut online = Vec::new();
        for &slot in &before {
            match view.slots.get(&slot) {
                _ if !present.contains(&slot) => {
                    ops.st.plugging.remove(&slot);
                }
                Some((_, true)) => {
                    ops.st.plugging.remove(&slot);
                }
                Some((logical, false)) => online.push((*logical, true)),
                // Not listed by the guest yet: still being added.
                None => {}
            }
        }
        let mut fresh = None;
        if !online.is_empty() {
            tracing::info!(vm = %self.key, cpus = ?online, "onlining vCPUs of an interrupted plug");
            match ops.qga.set_vcpus(&online, self.cfg.agent_timeout).await {
                Ok(_) => {
                    fresh = self
                        .agent_view(ops, present, self.cfg.agent_timeout)
                        .await
                        .ok()
                }
                Err(e) => {
                    tracing::warn!(vm = %self.key, error = %e, "cannot online the vCPUs of an interrupted plug")
                }
            }
            if let Some(v) = &fresh {
                ops.st
                    .plugging
                    .retain(|s| !matches!(v.slots.get(s), Some((_, true))));
            }
        }
        if ops.st.plugging != before {
            self.persist(&ops.st);
        }
        fresh
    }

    /// One report per slot of `slots`, nothing done yet.
    fn steps(slots: &[u32], direction: Direction) -> Vec<StepReport> {
        slots.iter().map(|&s| Self::step(s, direction)).collect()
    }

    fn step(slot: u32, direction: Direction) -> StepReport {
        StepReport {
            slot,
            direction,
            applied: None,
            acked: None,
            online: None,
            guest_cpu: None,
            error: None,
        }
    }

    async fn plug_unit(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        hp: &mut BTreeMap<u32, HotpluggableCpu>,
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        // The guest's CPUs before the plug (not timed: preparation). A CPU that shows up
        // afterwards, while this handle holds the VM, can only be one this unit plugged.
        // A guest whose agent never answered has none: its vCPUs end Present, which is
        // all such a guest can report, and that is no error.
        let has_agent = self.has_agent(ops).await;
        // The map's signature, when current, already lists the guest's CPUs: no round
        // trip. (Were it stale, two CPUs would look new and each would be identified by
        // its own files below: slower, never wrong.)
        let known = ops
            .map
            .signature
            .as_ref()
            .map(|(_, logical)| logical.iter().copied().collect::<BTreeSet<u32>>());
        let before: Option<BTreeSet<u32>> = if has_agent && known.is_some() {
            known
        } else if has_agent {
            match self.guest_vcpus(&mut ops.qga, self.cfg.agent_timeout).await {
                Ok(v) => Some(v.iter().map(|c| c.logical_id).collect()),
                Err(e) => {
                    tracing::debug!(vm = %self.key, error = %e, "guest agent unavailable before plug");
                    None
                }
            }
        } else {
            None
        };
        let t0 = Instant::now();
        let deadline = t0 + opts.plug_timeout;
        let mut steps = Self::steps(unit, Direction::Plug);
        let n = u32::try_from(unit.len()).unwrap_or(u32::MAX);
        if self.spec.accel == Accel::Tcg {
            let max = self.spec.topology.max_vcpus();
            let used = ops.st.vcpu_threads_created;
            if used.saturating_add(n) > max {
                for st in &mut steps {
                    st.error = Some(BackendError::VcpuBudget {
                        used,
                        max,
                        wanted: n,
                    });
                }
                return steps;
            }
        }
        let mut events = self.qmp.subscribe();
        let mut added: Vec<usize> = Vec::new();
        // One device_add per hot-plug unit QEMU knows: a slot on x86, a whole core (every
        // slot of the plan unit) on sPAPR.
        let t = self.spec.topology;
        let mut groups: Vec<(u32, HotpluggableCpu, Vec<usize>)> = Vec::new();
        for (i, &slot) in unit.iter().enumerate() {
            let Some(entry) = hp.get(&slot) else {
                steps[i].error = Some(BackendError::Protocol(format!(
                    "QEMU does not list vCPU slot {slot} as hot-pluggable"
                )));
                continue;
            };
            let first = self.machine.slot_of_props(&t, &entry.props).unwrap_or(slot);
            match groups.iter_mut().find(|g| g.0 == first) {
                Some(g) => g.2.push(i),
                None => groups.push((first, entry.clone(), vec![i])),
            }
        }
        for (first, entry, idx) in groups {
            let sid = self.slots[usize::try_from(first).unwrap_or(0)];
            let threads = u32::try_from(idx.len()).unwrap_or(u32::MAX);
            // Counted before the command: a crash in between must not hide a thread.
            ops.st.vcpu_threads_created += threads;
            for &i in &idx {
                ops.st.plugging.insert(unit[i]);
            }
            self.persist(&ops.st);
            let r = self
                .qmp
                .device_add_cpu(
                    &entry.type_,
                    &self.machine.device_id(&sid),
                    &entry.props,
                    self.cfg.qmp_timeout,
                )
                .await;
            match r {
                Ok(()) => {
                    let at = t0.elapsed();
                    for &i in &idx {
                        steps[i].applied = Some(at);
                        ops.st.failed.remove(&unit[i]);
                        added.push(i);
                    }
                }
                Err(e) => {
                    let refused = matches!(e, QmpError::Refused { .. });
                    if refused {
                        // QEMU refuses before it creates the vCPU threads.
                        ops.st.vcpu_threads_created -= threads;
                        for &i in &idx {
                            ops.st.plugging.remove(&unit[i]);
                        }
                    }
                    let mut err = self.qmp_err(e);
                    if let BackendError::Qmp { desc, .. } = &mut err {
                        if entry.qom_path.is_some() {
                            desc.push_str(&format!("; vCPU slot {first} is already plugged: observe the VM and plan again"));
                        }
                    }
                    for &i in &idx {
                        if entry.qom_path.is_none() && refused {
                            ops.st.failed.insert(unit[i]);
                        }
                        steps[i].error = Some(err.clone());
                    }
                }
            }
            self.persist(&ops.st);
        }
        // QEMU holds a device for every slot it added, whatever the guest does next: the
        // handle's copy of QEMU's list says so (an unplug plans from it).
        for &i in &added {
            let slot = unit[i];
            if let Some(e) = hp.get_mut(&slot) {
                let first = self.machine.slot_of_props(&t, &e.props).unwrap_or(slot);
                e.qom_path = Some(format!(
                    "/machine/peripheral/{}",
                    self.machine
                        .device_id(&self.slots[usize::try_from(first).unwrap_or(0)])
                ));
            }
        }
        match self.machine.insert_done() {
            InsertDone::AcpiOst => {
                self.wait_insert_ost(&mut events, unit, &added, &mut steps, deadline, t0, opts)
                    .await
            }
            // The hypervisor has notified the guest; its kernel takes the CPUs by itself
            // and the agent below sees them come online.
            InsertDone::DeviceAdded => {
                for &i in &added {
                    steps[i].acked = steps[i].applied;
                }
            }
        }
        // Online the acknowledged vCPUs through the agent.
        let acked: Vec<usize> = added
            .iter()
            .copied()
            .filter(|&i| steps[i].acked.is_some())
            .collect();
        if acked.is_empty() || !has_agent {
            // Without an agent the plug is as done as it gets: the vCPU is reported Present.
            // It stays in `plugging`, so an agent that answers later (installed, started
            // late) finds it and onlines it (`finish_plugs`).
            self.persist(&ops.st);
            return steps;
        }
        if let Err(e) = self
            .online_slots(
                ops,
                unit,
                &acked,
                before.as_ref(),
                &mut steps,
                (t0, deadline),
            )
            .await
        {
            for &i in &acked {
                if steps[i].online.is_none() && steps[i].error.is_none() {
                    steps[i].error = Some(e.clone());
                }
            }
        }
        for &i in &acked {
            if steps[i].online.is_some() {
                ops.st.plugging.remove(&unit[i]);
            }
        }
        self.persist(&ops.st);
        steps
    }

    /// Wait for the guest's insert `_OST` of every added slot (x86).
    #[allow(clippy::too_many_arguments)]
    async fn wait_insert_ost(
        &self,
        events: &mut broadcast::Receiver<qmp::Event>,
        unit: &[u32],
        added: &[usize],
        steps: &mut [StepReport],
        deadline: Instant,
        t0: Instant,
        opts: &ResizeOptions,
    ) {
        let mut waiting: BTreeMap<String, usize> =
            added.iter().map(|&i| (unit[i].to_string(), i)).collect();
        while !waiting.is_empty() {
            let got = qmp::wait_event(&self.qmp, events, deadline, |ev| {
                ev.acpi_ost().filter(|o| {
                    o.slot_type == "CPU"
                        && o.source == qmp::OST_SOURCE_INSERT
                        && waiting.contains_key(&o.slot)
                })
            })
            .await;
            let Some(ost) = got else { break };
            let Some(i) = waiting.remove(&ost.slot) else {
                continue;
            };
            if ost.status == qmp::OST_STATUS_SUCCESS {
                steps[i].acked = Some(t0.elapsed());
            } else {
                steps[i].error = Some(BackendError::Protocol(format!(
                    "the guest failed to add vCPU slot {} (ACPI _OST status {:#x}); does its kernel have CONFIG_ACPI_HOTPLUG_CPU?",
                    unit[i], ost.status
                )));
            }
        }
        for (_, i) in waiting {
            steps[i].error = Some(if self.qmp.is_closed() {
                BackendError::NotRunning(self.key.to_string())
            } else {
                BackendError::Timeout {
                    what: "acknowledge",
                    slot: unit[i],
                    seconds: secs(opts.plug_timeout),
                }
            });
        }
    }

    async fn online_slots(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        acked: &[usize],
        before: Option<&BTreeSet<u32>>,
        steps: &mut [StepReport],
        (t0, deadline): (Instant, Instant),
    ) -> Result<(), BackendError> {
        let left = || left(deadline);
        let want: BTreeSet<u32> = acked.iter().map(|&i| unit[i]).collect();
        // Find the new logical CPUs: listed by the agent, not mapped yet.
        let mut found: BTreeMap<u32, u32> = BTreeMap::new(); // slot -> logical
        let mut onlined = false;
        loop {
            let vcpus = self
                .guest_vcpus(&mut ops.qga, left())
                .await
                .map_err(Self::qga_err)?;
            let known: BTreeSet<u32> = ops.map.by_logical.keys().copied().collect();
            // One new CPU for one plugged slot: the set difference identifies it.
            if let (Some(before), [slot]) =
                (before, want.iter().copied().collect::<Vec<_>>().as_slice())
            {
                let new: Vec<u32> = vcpus
                    .iter()
                    .map(|v| v.logical_id)
                    .filter(|l| !before.contains(l))
                    .collect();
                if let [logical] = new.as_slice() {
                    ops.map.by_logical.retain(|_, s| s != slot);
                    ops.map.by_logical.insert(*logical, *slot);
                    found.insert(*slot, *logical);
                    break;
                }
            }
            // Several at once: when exactly as many new CPUs appeared as were plugged, they
            // are all ours. Online them first, then tell them apart by APIC id in one read
            // of /proc/cpuinfo (which lists online CPUs only), instead of reading each
            // one's ACPI path (three agent round trips each) before onlining any.
            if let Some(before) = before.filter(|_| {
                want.len() > 1 && self.machine.guest_cpu_id() == GuestCpuId::ApicAndAcpi
            }) {
                let new: Vec<u32> = vcpus
                    .iter()
                    .map(|v| v.logical_id)
                    .filter(|l| !before.contains(l))
                    .collect();
                if new.len() == want.len() {
                    let changes: Vec<(u32, bool)> = new.iter().map(|&l| (l, true)).collect();
                    ops.qga
                        .set_vcpus(&changes, left())
                        .await
                        .map_err(Self::qga_err)?;
                    let text = ops
                        .qga
                        .read_text("/proc/cpuinfo", left())
                        .await
                        .map_err(Self::qga_err)?;
                    for (logical, apic) in parse_cpuinfo_apic(&text) {
                        let slot = self.apic_to_slot.get(&apic).copied();
                        if let Some(slot) =
                            slot.filter(|s| new.contains(&logical) && want.contains(s))
                        {
                            ops.map.by_logical.retain(|_, s| *s != slot);
                            ops.map.by_logical.insert(logical, slot);
                            found.insert(slot, logical);
                        }
                    }
                    if found.len() == want.len() {
                        onlined = true;
                        break;
                    }
                }
            }
            // Otherwise each unknown CPU's ACPI processor path names its slot.
            for v in vcpus.iter().filter(|v| !known.contains(&v.logical_id)) {
                match self
                    .guest_slot(&mut ops.qga, v.logical_id, left())
                    .await
                    .map_err(Self::qga_err)?
                {
                    Some(slot) => {
                        ops.map.by_logical.insert(v.logical_id, slot);
                        if want.contains(&slot) {
                            found.insert(slot, v.logical_id);
                        }
                    }
                    None => {
                        tracing::debug!(vm = %self.key, logical = v.logical_id, "new guest CPU without an ACPI path")
                    }
                }
            }
            for &slot in &want {
                if let Some(l) = ops.map.slot_logical(slot) {
                    found.insert(slot, l);
                }
            }
            if found.len() == want.len() {
                break;
            }
            if Instant::now() >= deadline {
                let missing: Vec<u32> = want
                    .iter()
                    .filter(|s| !found.contains_key(s))
                    .copied()
                    .collect();
                return Err(BackendError::GuestAgent(format!(
                    "the guest acknowledged vCPU slots {missing:?} but its agent does not list them (or their ACPI path) within the plug deadline"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !onlined {
            let changes: Vec<(u32, bool)> = found.values().map(|&l| (l, true)).collect();
            let n = ops
                .qga
                .set_vcpus(&changes, left())
                .await
                .map_err(Self::qga_err)?;
            if usize::try_from(n).unwrap_or(0) < changes.len() {
                tracing::warn!(vm = %self.key, changed = n, wanted = changes.len(), "guest-set-vcpus onlined fewer CPUs than asked");
            }
        }
        // Confirm with the agent's own view.
        loop {
            let vcpus = self
                .guest_vcpus(&mut ops.qga, left())
                .await
                .map_err(Self::qga_err)?;
            let online: BTreeSet<u32> = vcpus
                .iter()
                .filter(|v| v.online)
                .map(|v| v.logical_id)
                .collect();
            let mut all = true;
            for &i in acked {
                let l = found[&unit[i]];
                if online.contains(&l) {
                    if steps[i].online.is_none() {
                        steps[i].online = Some(t0.elapsed());
                        steps[i].guest_cpu = Some(l);
                    }
                } else {
                    all = false;
                }
            }
            if all {
                for (&slot, &logical) in &found {
                    ops.map.note_plugged(slot, logical);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                for &i in acked {
                    if steps[i].online.is_none() {
                        steps[i].error = Some(BackendError::Timeout {
                            what: "bring online",
                            slot: unit[i],
                            seconds: secs(deadline - t0),
                        });
                    }
                }
                return Ok(());
            }
            // Not all came online (guest-set-vcpus stops at the first failure): ask again.
            let retry: Vec<(u32, bool)> = acked
                .iter()
                .map(|&i| found[&unit[i]])
                .filter(|l| !online.contains(l))
                .map(|l| (l, true))
                .collect();
            let _ = ops.qga.set_vcpus(&retry, left()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn unplug_unit(
        &self,
        ops: &mut Ops,
        unit: &[u32],
        hp: &mut BTreeMap<u32, HotpluggableCpu>,
        opts: &ResizeOptions,
    ) -> Vec<StepReport> {
        let t0 = Instant::now();
        let deadline = t0 + opts.unplug_timeout;
        let mut steps = Self::steps(unit, Direction::Unplug);
        if let Some(&s) = unit.iter().find(|&&s| s == 0) {
            for st in &mut steps {
                st.error = Some(BackendError::InvalidPlan(format!(
                    "slot {s} holds the boot vCPU, which cannot be unplugged"
                )));
            }
            return steps;
        }
        // Slots already gone (a retry after the guest caught up) are done.
        let mut todo: Vec<usize> = Vec::new();
        for (i, &slot) in unit.iter().enumerate() {
            ops.st.plugging.remove(&slot);
            if hp.get(&slot).and_then(|c| c.qom_path.as_ref()).is_none() {
                steps[i].applied = Some(t0.elapsed());
                steps[i].acked = Some(t0.elapsed());
                ops.st.unplugging.remove(&slot);
                ops.map.forget_slot(slot);
            } else {
                todo.push(i);
            }
        }
        if todo.is_empty() {
            self.persist(&ops.st);
            return steps;
        }
        // Recorded before the guest is touched: a step cut short between offlining and
        // device_del (a newer target, an agent restart) leaves the slot Unplugging, which
        // the next plan finishes, not a Present vCPU that nothing would bring back online.
        for &i in &todo {
            ops.st.unplugging.insert(unit[i]);
        }
        self.persist(&ops.st);
        // Offline through the agent first: the guest then only has to eject. Half the
        // deadline at most: a guest that cannot answer (paused, no agent) still gets the
        // eject request, which its kernel handles by itself.
        let offline: Vec<(u32, bool)> = todo
            .iter()
            .filter_map(|&i| ops.map.slot_logical(unit[i]))
            .map(|l| (l, false))
            .collect();
        if !offline.is_empty() {
            let budget =
                (opts.unplug_timeout / 2).min(self.cfg.agent_timeout.max(Duration::from_secs(5)));
            match ops.qga.set_vcpus(&offline, budget).await {
                Ok(n) => {
                    tracing::debug!(vm = %self.key, offlined = n, ms = t0.elapsed().as_secs_f64() * 1e3, "vCPUs offlined through the agent")
                }
                Err(e) => {
                    tracing::warn!(vm = %self.key, error = %e, "could not offline through the agent; ejecting anyway")
                }
            }
        }
        let mut events = self.qmp.subscribe();
        // One device_del per device (a slot on x86, a core on sPAPR); `waiting` is keyed
        // by what names the completion: the _OST slot (x86) or the device's QOM path.
        let eject = self.machine.eject_done();
        let mut waiting: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut by_device: Vec<(String, Vec<usize>)> = Vec::new();
        for &i in &todo {
            let qom = hp
                .get(&unit[i])
                .and_then(|c| c.qom_path.clone())
                .unwrap_or_default();
            match by_device.iter_mut().find(|d| d.0 == qom) {
                Some(d) => d.1.push(i),
                None => by_device.push((qom, vec![i])),
            }
        }
        for (qom, idx) in by_device {
            let first = unit[idx[0]];
            let mut pending = |steps: &mut [StepReport], ops: &mut Ops| {
                for &i in &idx {
                    steps[i].applied = Some(t0.elapsed());
                    ops.st.unplugging.insert(unit[i]);
                    let key = match eject {
                        EjectDone::AcpiOst => unit[i].to_string(),
                        EjectDone::DeviceDeleted => qom.clone(),
                    };
                    waiting.entry(key).or_default().push(i);
                }
            };
            match self.qmp.device_del(&qom, self.cfg.qmp_timeout).await {
                Ok(()) => pending(&mut steps, ops),
                Err(QmpError::Refused { class, .. })
                    if class == "DeviceNotFound" && self.slot_gone(first).await =>
                {
                    // The guest finished an earlier eject in the meantime (a retry).
                    for &i in &idx {
                        steps[i].applied = Some(t0.elapsed());
                        steps[i].acked = Some(t0.elapsed());
                    }
                }
                Err(QmpError::Refused { desc, .. })
                    if desc.contains("in the process of unplug")
                        || desc.contains("already in progress") =>
                {
                    pending(&mut steps, ops)
                }
                Err(e) => {
                    let err = self.qmp_err(e);
                    for &i in &idx {
                        steps[i].error = Some(err.clone());
                    }
                }
            }
        }
        self.persist(&ops.st);
        // Wait for the completion; poll QEMU now and then in case the event was missed.
        let mut next_poll = Instant::now() + Duration::from_millis(500);
        while !waiting.is_empty() && Instant::now() < deadline && !self.qmp.is_closed() {
            let until = deadline.min(next_poll);
            let got = qmp::wait_event(&self.qmp, &mut events, until, |ev| match eject {
                EjectDone::AcpiOst => ev
                    .acpi_ost()
                    .filter(|o| {
                        o.slot_type == "CPU"
                            && o.source == qmp::OST_SOURCE_EJECT
                            && waiting.contains_key(&o.slot)
                    })
                    .map(|o| (o.slot, o.status)),
                EjectDone::DeviceDeleted => match ev.kind() {
                    EventKind::DeviceDeleted { path, .. } if waiting.contains_key(&path) => {
                        Some((path, qmp::OST_STATUS_SUCCESS))
                    }
                    _ => None,
                },
            })
            .await;
            match got {
                Some((key, status)) if status == qmp::OST_STATUS_SUCCESS => {
                    for i in waiting.remove(&key).unwrap_or_default() {
                        steps[i].acked = Some(t0.elapsed());
                    }
                }
                Some((_, status)) if status == qmp::OST_STATUS_EJECT_IN_PROGRESS => {}
                Some((key, status)) => {
                    for i in waiting.remove(&key).unwrap_or_default() {
                        steps[i].error = Some(BackendError::Protocol(format!(
                            "the guest refused to eject vCPU slot {} (ACPI _OST status {status:#x}); it stays Unplugging and the next attempt retries",
                            unit[i]
                        )));
                    }
                }
                None if Instant::now() >= next_poll => {
                    next_poll = Instant::now() + Duration::from_millis(500);
                    if let Ok(now) = self.hotpluggable().await {
                        waiting.retain(|_, idx| {
                            let gone = idx
                                .iter()
                                .all(|&i| now.get(&unit[i]).is_some_and(|c| c.qom_path.is_none()));
                            if gone {
                                for &i in idx.iter() {
                                    steps[i].acked = Some(t0.elapsed());
                                }
                            }
                            !gone
                        });
                    }
                }
                None => {}
            }
        }
        for &i in &todo {
            let slot = unit[i];
            if steps[i].acked.is_some() {
                ops.st.unplugging.remove(&slot);
                ops.map.forget_slot(slot);
                if let Some(c) = hp.get_mut(&slot) {
                    c.qom_path = None;
                }
            } else if steps[i].error.is_none() {
                steps[i].error = Some(if self.qmp.is_closed() {
                    BackendError::NotRunning(self.key.to_string())
                } else {
                    BackendError::Timeout {
                        what: "release",
                        slot,
                        seconds: secs(opts.unplug_timeout),
                    }
                });
            }
        }
        self.persist(&ops.st);
        steps
    }
}

#[async_trait::async_trait]
impl VmHandle for QemuVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    async fn guest_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let Ok(mut ops) = self.ops.try_lock() else {
            return self.ready.load(Ordering::Relaxed);
        };
        self.has_agent(&mut ops).await
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        let mut ops = self.ops.lock().await;
        self.observe_locked(&mut ops).await
    }

    async fn resize(&self, plan: &Plan, opts: ResizeOptions) -> ResizeReport {
        let mut ops = self.ops.lock().await;
        let mut report = ResizeReport::default();
        let fail_all = |report: &mut ResizeReport, e: BackendError| {
            let all = plan
                .unplug
                .iter()
                .map(|&s| (s, Direction::Unplug))
                .chain(plan.plug.iter().map(|&s| (s, Direction::Plug)));
            for (s, d) in all {
                let mut st = Self::step(s, d);
                st.error = Some(e.clone());
                report.steps.push(st);
            }
        };
        let both: Vec<u32> = plan
            .unplug
            .iter()
            .chain(plan.plug.iter())
            .copied()
            .collect();
        let (unplug_units, plug_units) = match (
            units(&plan.unplug, &self.spec),
            units(&plan.plug, &self.spec),
            units(&both, &self.spec),
        ) {
            (Ok(u), Ok(p), Ok(_)) => (u, p),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                fail_all(&mut report, BackendError::InvalidPlan(e));
                return report;
            }
        };
        let cached = ops.hp.take();
        let mut hp = match cached {
            Some(hp) => hp,
            None => match self.hotpluggable().await {
                Ok(hp) => hp,
                Err(e) => {
                    fail_all(&mut report, e);
                    return report;
                }
            },
        };
        // Know which logical CPU is which before offlining any (an adopted handle starts
        // with an empty map).
        if !plan.unplug.is_empty() && ops.map.signature.is_none() && self.has_agent(&mut ops).await
        {
            let present: Vec<u32> = hp
                .iter()
                .filter(|(_, c)| c.qom_path.is_some())
                .map(|(s, _)| *s)
                .collect();
            if let Err(e) = self
                .agent_view(
                    &mut ops,
                    &present,
                    self.cfg.agent_timeout.min(opts.unplug_timeout),
                )
                .await
            {
                tracing::warn!(vm = %self.key, error = %e, "guest agent unavailable before unplug");
            }
        }
        // Each direction is one batch (plus one of parked vCPUs): every device_add or
        // device_del is sent before any waiting, and the guest is asked to online or
        // offline them all in one agent call, so 1 -> 8 costs little more than 1 -> 2.
        let (mut park, mut remove) = (Vec::new(), Vec::new());
        for u in &unplug_units {
            let n = u32::try_from(u.len()).unwrap_or(u32::MAX);
            let removing = u32::try_from(remove.len()).unwrap_or(u32::MAX);
            if self.parks(&ops, removing.saturating_add(n)) {
                park.extend_from_slice(u);
            } else {
                remove.extend_from_slice(u);
            }
        }
        if !park.is_empty() {
            match self.park(&mut ops, &park, &opts).await {
                Some(steps) => report.steps.extend(steps),
                None => remove.extend(park),
            }
        }
        if !remove.is_empty() {
            let steps = self.unplug_unit(&mut ops, &remove, &mut hp, &opts).await;
            report.steps.extend(steps);
        }
        let (unpark, add): (Vec<&Vec<u32>>, Vec<&Vec<u32>>) = plug_units
            .iter()
            .partition(|u| u.iter().all(|s| ops.st.parked.contains(s)));
        let unpark: Vec<u32> = unpark.into_iter().flatten().copied().collect();
        let add: Vec<u32> = add.into_iter().flatten().copied().collect();
        if !unpark.is_empty() {
            let steps = self.unpark(&mut ops, &unpark, &opts).await;
            report.steps.extend(steps);
        }
        if !add.is_empty() {
            let steps = self.plug_unit(&mut ops, &add, &mut hp, &opts).await;
            report.steps.extend(steps);
        }
        // Every step kept `hp` current; after a failure QEMU may hold something else.
        if report.steps.iter().all(|s| s.error.is_none()) {
            ops.hp = Some(hp);
        }
        for s in &report.steps {
            tracing::info!(
                vm = %self.key, slot = s.slot, direction = s.direction.as_str(),
                applied_ms = s.applied.map(|d| d.as_secs_f64() * 1e3), acked_ms = s.acked.map(|d| d.as_secs_f64() * 1e3),
                online_ms = s.online.map(|d| d.as_secs_f64() * 1e3), error = s.error.as_ref().map(ToString::to_string),
                "resize step"
            );
        }
        report
    }

    async fn vcpu_cpu_seconds(&self) -> Result<Vec<(u32, f64)>, BackendError> {
        let fast = {
            let _ops = self.ops.lock().await;
            self.qmp
                .query_cpus_fast(self.cfg.qmp_timeout)
                .await
                .map_err(|e| self.qmp_err(e))?
        };
        let mut out = Vec::new();
        for c in fast {
            let Some(slot) =
                self.machine
                    .slot_of_thread(&self.spec.topology, &c.props, &c.qom_path)
            else {
                continue;
            };
            if let Some(secs) = task_cpu_seconds(self.pid, c.thread_id) {
                out.push((slot, secs));
            }
        }
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }

    async fn next_event(&self) -> Option<VmEvent> {
        self.events.lock().await.recv().await
    }

    async fn stop(&self, grace: Duration) -> Result<(), BackendError> {
        let (ns, name) = (&self.key.namespace, &self.key.name);
        match self.launcher.status(ns, name).await.map_err(launcher_err)? {
            Some(p) if p.running && p.pid == self.pid => {}
            _ => return Ok(()),
        }
        if !self.qmp.is_closed() {
            // Ask twice: the guest agent (no ACPI daemon needed), when it is idle and has
            // answered before; and the ACPI power button. QEMU (-no-reboot) then exits.
            if self.ready.load(Ordering::Relaxed) {
                if let Ok(mut ops) = self.ops.try_lock() {
                    if let Err(e) = ops.qga.shutdown("powerdown", Duration::from_secs(1)).await {
                        tracing::debug!(vm = %self.key, error = %e, "guest-shutdown failed");
                    }
                }
            }
            if let Err(e) = self
                .qmp
                .execute_value("system_powerdown", None, self.cfg.qmp_timeout)
                .await
            {
                tracing::debug!(vm = %self.key, error = %e, "system_powerdown failed");
            }
        }
        if launcher::exit_of(&self.launcher, ns, name, grace)
            .await
            .is_some()
        {
            return Ok(());
        }
        tracing::warn!(vm = %self.key, ?grace, "the guest did not power off in time: killing QEMU");
        self.launcher
            .kill(ns, name, KillSignal::Kill)
            .await
            .map_err(launcher_err)?;
        match launcher::exit_of(&self.launcher, ns, name, Duration::from_secs(10)).await {
            Some(_) => Ok(()),
            None => Err(BackendError::Launcher(format!(
                "QEMU of {} (pid {}) did not exit after SIGKILL",
                self.key, self.pid
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::CpuProps;
    use corescale_api::{Arch, Placement};

    fn spec(sockets: u32, cores: u32, threads: u32, boot: u32) -> VmSpec {
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
            memory_mib: 256,
            arch: Arch::X86_64,
            kernel: "/img/vmlinux".into(),
            initrd: Some("/img/initrd,x".into()),
            cmdline: "quiet".into(),
            accel: Accel::Tcg,
        }
    }

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
    fn apic_ids_follow_qemu() {
        // 2 sockets x 2 cores: socket 1 core 0 has APIC id 2 (seen in the guest).
        let t = Topology {
            sockets: 2,
            cores: 2,
            threads: 1,
        };
        let s = topology_slots(&t);
        assert_eq!(
            s.iter().map(|x| apic_id(&t, x)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // 1 socket x 2 cores x 2 threads: core 1 thread 0 has APIC id 2.
        let t = Topology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        assert_eq!(
            topology_slots(&t)
                .iter()
                .map(|x| apic_id(&t, x))
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // 3 cores need 2 bits: socket 1 starts at 4; 3 threads need 2 bits.
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 3,
        };
        let ids: Vec<u32> = topology_slots(&t).iter().map(|x| apic_id(&t, x)).collect();
        assert_eq!(&ids[..4], &[0, 1, 2, 4]);
        assert_eq!(ids[9], 16);
        let p = CpuProps {
            socket_id: Some(1),
            core_id: Some(2),
            thread_id: Some(1),
            ..Default::default()
        };
        let x86 = Machine::of(Arch::X86_64);
        assert_eq!(x86.slot_of_props(&t, &p), Some(16));
        let bad = CpuProps {
            socket_id: Some(2),
            core_id: Some(0),
            thread_id: Some(0),
            ..Default::default()
        };
        assert_eq!(x86.slot_of_props(&t, &bad), None);
    }

    #[test]
    fn cpuinfo_gives_apic_ids() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\napicid\t\t: 0\ninitial apicid\t: 0\n\nprocessor\t: 1\napicid\t\t: 2\n";
        assert_eq!(parse_cpuinfo_apic(text), BTreeMap::from([(0, 0), (1, 2)]));
    }

    #[test]
    fn plans_are_split_into_units() {
        let mut s = spec(1, 3, 2, 2);
        assert_eq!(
            units(&[2, 3, 5], &s).unwrap(),
            vec![vec![2], vec![3], vec![5]]
        );
        s.granularity = Granularity::Core;
        assert_eq!(
            units(&[2, 3, 4, 5], &s).unwrap(),
            vec![vec![2, 3], vec![4, 5]]
        );
        let e = units(&[2, 3, 5], &s).unwrap_err();
        assert!(e.contains("whole cores"), "{e}");
        let e = units(&[6], &s).unwrap_err();
        assert!(e.contains("outside the VM's 6 slots"), "{e}");
        assert!(units(&[2, 2], &s).unwrap_err().contains("twice"));
    }

    #[test]
    fn missing_binary_says_what_to_install() {
        let e = find_binary("/nonexistent/qemu-system-x86_64").unwrap_err();
        assert!(matches!(e, BackendError::MissingBinary { .. }));
        assert!(e.to_string().contains("scripts/install-deps.sh"), "{e}");
        assert!(find_binary("corescale-no-such-binary").is_err());
        assert!(find_binary("sh").is_ok());
    }

    #[test]
    fn own_thread_cpu_time_reads() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let tid = i64::from(nix::unistd::gettid().as_raw());
        let t = task_cpu_seconds(pid, tid).unwrap();
        assert!(t >= 0.0);
    }
}
