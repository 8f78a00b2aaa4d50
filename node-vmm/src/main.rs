//! `corescale-node-vmm`: the node side of corescale, one binary with two roles.
//!
//! - `agent`: watches the VMs placed on this node and makes their guests follow
//!   `spec.cpus`; reports status, Events and metrics.
//! - `launcher`: starts and reaps the VMM processes on the agent's request, so guests
//!   survive the agent's restarts and upgrades.

use clap::{Parser, Subcommand};
use corescale_node_vmm::agent::launcher_size::{LauncherSizer, Sizing, SizingFlags};
use corescale_node_vmm::agent::{self, Config};
use corescale_node_vmm::backend::qemu::{QemuBackend, QemuConfig};
use corescale_node_vmm::backend::sim::{SimBackend, SimDelays};
use corescale_node_vmm::backend::{Accel, Backend, NodeCapacity};
use corescale_node_vmm::images::ImageDir;
use corescale_node_vmm::launcher::{self, LauncherArgs};
use corescale_node_vmm::metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// corescale node-vmm: hot-plugs the vCPUs of the guests on this node.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Run the VMM launcher (its own container in the DaemonSet pod).
    Launcher(LauncherArgs),
    /// Attach this terminal to a guest's serial console (`<namespace>/<name>`; Ctrl-] detaches).
    Console(corescale_node_vmm::console::ConsoleArgs),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Namespace of the node-agent Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "corescale-system")]
    system_namespace: String,
    /// Directory of the per-VM state directories, shared with the launcher.
    #[arg(long, env = "CORESCALE_STATE_DIR", default_value = launcher::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The launcher's socket.
    #[arg(long, env = "CORESCALE_LAUNCHER_SOCKET", default_value = launcher::DEFAULT_SOCKET)]
    launcher_socket: PathBuf,
    /// Directory of guest images; spec.boot paths resolve only inside it
    /// (default: $CORESCALE_CACHE/guest; default images are <arch>/vmlinux and <arch>/initramfs.cpio.gz).
    #[arg(long, env = "CORESCALE_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Backend: qemu, or simulator (in-memory, for scale tests only; never a default).
    #[arg(long, default_value = "qemu", value_parser = ["qemu", "simulator"])]
    backend: String,
    /// QEMU binary for x86_64 guests (a name in PATH or a path).
    #[arg(long, env = "CORESCALE_QEMU", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// QEMU binary for ppc64le guests (a name in PATH or a path); the node runs ppc64le
    /// guests only when it is found.
    #[arg(
        long,
        env = "CORESCALE_QEMU_PPC64",
        default_value = "qemu-system-ppc64"
    )]
    qemu_ppc64: String,
    /// QEMU binary for aarch64 guests (a name in PATH or a path).
    #[arg(
        long,
        env = "CORESCALE_QEMU_AARCH64",
        default_value = "qemu-system-aarch64"
    )]
    qemu_aarch64: String,
    /// Accelerator: auto (KVM when it can run guests, else TCG), kvm or tcg.
    #[arg(long, env = "CORESCALE_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
    /// Run QEMU as this user (`-run-with user=`).
    #[arg(long, env = "CORESCALE_QEMU_USER")]
    qemu_user: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Seconds the node's Lease lives without renewal (renewed every third of it).
    #[arg(long, default_value_t = 20)]
    lease_seconds: u64,
    /// vCPU budget = host CPUs x this ratio, summed over the node's VMs' targets.
    #[arg(long, env = "CORESCALE_OVERCOMMIT", default_value_t = 4.0)]
    overcommit: f64,
    /// Seconds a plugged vCPU may take to be acknowledged and onlined.
    #[arg(long, default_value_t = 30)]
    plug_timeout_seconds: u64,
    /// Milliseconds a resize step (or a boot) may run before its in-progress status
    /// (Starting) is written; a quicker one is reported once, done.
    #[arg(long, default_value_t = 250)]
    in_progress_after_ms: u64,
    /// Status writes and Events of this node's VMs in flight to the API server at once;
    /// the others wait in the agent (0: no limit). Lease renewals are not counted.
    #[arg(long, env = "CORESCALE_MAX_WRITES_IN_FLIGHT", default_value_t = 16)]
    max_writes_in_flight: usize,
    /// Seconds a booting guest's agent may stay silent before the VM runs as a guest
    /// without an agent (Running; vCPUs reported Present; Ready reason NoGuestAgent).
    #[arg(long, env = "CORESCALE_AGENT_GRACE_SECONDS", default_value_t = 30)]
    guest_agent_grace_seconds: u64,
    /// The address forwarded guest ports (spec.ports) listen on: 127.0.0.1 (this host
    /// only), or 0.0.0.0 in a pod, where the pod IP is what clients reach. IPv4.
    #[arg(long, env = "CORESCALE_PORT_ADDRESS", default_value = "127.0.0.1")]
    port_address: std::net::Ipv4Addr,
    /// The address status.ports shows (for example the pod IP, from the downward API);
    /// default: the listen address.
    #[arg(long, env = "CORESCALE_PORT_ADVERTISE_ADDRESS")]
    port_advertise_address: Option<String>,
    /// The launcher container's `resources` with no guest (JSON, as in a pod spec). Given,
    /// the agent resizes its own pod's launcher container to its guests (in-place pod
    /// resize, Kubernetes 1.33+): requests and limits grow before a boot or a plug and
    /// shrink after an unplug or a stop. Needs --pod-name.
    #[arg(long, env = "CORESCALE_LAUNCHER_RESOURCES")]
    launcher_resources: Option<String>,
    /// This agent's pod (the downward API's metadata.name), in --system-namespace.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// The container QEMU runs in.
    #[arg(long, env = "CORESCALE_LAUNCHER_CONTAINER", default_value = "launcher")]
    launcher_container: String,
    /// CPU request per vCPU held (default: 1/overcommit of a CPU).
    #[arg(long, env = "CORESCALE_LAUNCHER_CPU_REQUEST_PER_VCPU")]
    launcher_cpu_request_per_vcpu: Option<String>,
    /// CPU limit per vCPU held (added to the base limit; no limit when the base has none).
    #[arg(
        long,
        env = "CORESCALE_LAUNCHER_CPU_LIMIT_PER_VCPU",
        default_value = "1"
    )]
    launcher_cpu_limit_per_vcpu: String,
    /// Memory per VM beside its spec.memory (QEMU's own).
    #[arg(
        long,
        env = "CORESCALE_LAUNCHER_MEMORY_PER_VM",
        default_value = "256Mi"
    )]
    launcher_memory_per_vm: String,
    /// Seconds the kubelet may take to apply a grow before the boot or plug is deferred.
    #[arg(long, default_value_t = 30)]
    launcher_resize_timeout_seconds: u64,
    /// Simulator only: host CPUs to announce.
    #[arg(long, default_value_t = 64)]
    sim_host_cpus: u32,
    /// Log as JSON lines (default) or as text.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Launcher(args) => {
            corescale_common::logging::init(true);
            launcher::run_launcher(args).await
        }
        Command::Agent(args) => run_agent(*args).await,
        Command::Console(args) => Ok(corescale_node_vmm::console::run(args).await?),
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    corescale_common::logging::init(args.log_format == "json");
    let metrics = Metrics::new()?;
    let health = Arc::new(corescale_common::http::Health::default());
    let addr =
        corescale_common::http::serve(args.metrics_addr, metrics.registry.clone(), health.clone())
            .await?;
    tracing::info!(%addr, node = %args.node_name, backend = %args.backend, "node agent starting");
    let (backend, images): (Arc<dyn Backend>, Option<ImageDir>) = match args.backend.as_str() {
        "simulator" => {
            let cap = NodeCapacity {
                host_cpus: args.sim_host_cpus,
                max_vcpus_per_vm: corescale_api::MAX_VCPUS,
                accel: Accel::Tcg,
                arches: [(corescale_api::Arch::X86_64, Accel::Tcg)].into(),
            };
            (Arc::new(SimBackend::new(SimDelays::default(), cap)), None)
        }
        _ => {
            let mut cfg = QemuConfig::new(&args.state_dir, &args.launcher_socket);
            cfg.binary = args.qemu.clone();
            cfg.ppc64_binary = args.qemu_ppc64.clone();
            cfg.aarch64_binary = args.qemu_aarch64.clone();
            cfg.accel = args.accel.clone();
            cfg.run_as_user = args.qemu_user.clone();
            let images = ImageDir::new(
                args.image_dir
                    .clone()
                    .unwrap_or_else(ImageDir::default_root),
            );
            (Arc::new(QemuBackend::new(cfg)), Some(images))
        }
    };
    let capacity = backend.capacity();
    tracing::info!(?capacity, "node capacity");
    let client = kube::Client::try_default().await?;
    let sizer = launcher_sizer(&args, &client)?;
    let config = Config {
        system_namespace: args.system_namespace.clone(),
        lease_duration: Duration::from_secs(args.lease_seconds),
        overcommit: args.overcommit,
        plug_timeout: Duration::from_secs(args.plug_timeout_seconds),
        stop_grace: Duration::from_secs(10),
        in_progress_after: Duration::from_millis(args.in_progress_after_ms),
        agent_grace: Duration::from_secs(args.guest_agent_grace_seconds),
        port_address: args.port_address,
        port_advertise: args.port_advertise_address.filter(|a| !a.is_empty()),
        writes_in_flight: args.max_writes_in_flight,
    };
    let shared = agent::shared(
        client,
        args.node_name,
        backend,
        images,
        metrics,
        config,
        sizer,
    );
    health.set_ready(true);
    // In a container of its own PID namespace the agent is PID 1 (the chart's pod shares
    // one namespace, where the pause process is), and the kernel ignores a signal PID 1
    // has no handler for: without this, SIGTERM (pod deletion, liveness restart) did nothing and
    // the kubelet killed the agent only after terminationGracePeriodSeconds, while it kept
    // restarting the guests the launcher was stopping. The agent holds nothing a new one
    // cannot rebuild, so it just exits; the guests stay with the launcher.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = agent::run_agent(shared) => r,
        _ = term.recv() => {
            tracing::info!("SIGTERM: the agent exits; guests stay with the launcher");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: the agent exits; guests stay with the launcher");
            Ok(())
        }
    }
}

/// The launcher container's sizer, when --launcher-resources is given.
fn launcher_sizer(
    args: &AgentArgs,
    client: &kube::Client,
) -> anyhow::Result<Option<Arc<LauncherSizer>>> {
    let Some(base) = args
        .launcher_resources
        .clone()
        .filter(|b| !b.trim().is_empty())
    else {
        return Ok(None);
    };
    let Some(pod) = args.pod_name.clone().filter(|p| !p.is_empty()) else {
        anyhow::bail!("--launcher-resources needs --pod-name (POD_NAME): the pod to resize");
    };
    let flags = SizingFlags {
        base,
        cpu_request_per_vcpu: args.launcher_cpu_request_per_vcpu.clone(),
        cpu_limit_per_vcpu: args.launcher_cpu_limit_per_vcpu.clone(),
        memory_per_vm: args.launcher_memory_per_vm.clone(),
    };
    let sizing = Sizing::from_flags(&flags, args.overcommit)?;
    tracing::info!(%pod, container = %args.launcher_container, ?sizing, "the launcher container follows its guests");
    Ok(Some(Arc::new(LauncherSizer::new(
        kube::Api::namespaced(client.clone(), &args.system_namespace),
        pod,
        args.launcher_container.clone(),
        sizing,
        Duration::from_secs(args.launcher_resize_timeout_seconds),
    ))))
}
