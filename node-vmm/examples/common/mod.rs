//! What the QEMU benchmarks share: a launcher and a QEMU backend in a temporary state
//! directory, and the spec of a benchmark guest (TCG, one socket of single-thread slots,
//! one vCPU at boot).

// Each benchmark uses part of this module.
#![allow(dead_code)]

use corescale_api::{Arch, Granularity, Placement, Plan, ResizeMethod, Topology};
use corescale_node_vmm::backend::qemu::direct::DirectClient;
use corescale_node_vmm::backend::qemu::{QemuBackend, QemuConfig};
use corescale_node_vmm::backend::{Accel, VmSpec};
use corescale_node_vmm::images::ImageDir;
use corescale_node_vmm::launcher::Launcher;
use std::path::PathBuf;
use std::time::Duration;

/// A launcher serving a QEMU backend, in a temporary directory removed with it.
pub struct Lab {
    /// The backend.
    pub backend: QemuBackend,
    /// The node's default boot files for the architecture.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: Option<PathBuf>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// Start a launcher (state under a temporary directory named `prefix`...) and a
    /// backend on it, with the default image of `arch`.
    pub async fn start(prefix: &str, arch: Arch) -> anyhow::Result<Lab> {
        let images = ImageDir::new(ImageDir::default_root());
        let boot = images
            .resolve(None, arch)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let socket = tmp.path().join("launcher.sock");
        let state = tmp.path().join("vms");
        let l = Launcher::bind(&socket, &state, Duration::from_secs(5)).await?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(l.serve(async move {
            let _ = stop_rx.await;
        }));
        Ok(Lab {
            backend: QemuBackend::new(QemuConfig::new(&state, &socket)),
            kernel: boot.kernel,
            initrd: boot.initrd,
            stop,
            server,
            _tmp: tmp,
        })
    }

    /// A benchmark guest named `name`: `slots` single-thread slots on one socket, one vCPU
    /// at boot, resized by `method`, under TCG.
    pub fn spec(&self, name: &str, arch: Arch, slots: u32, method: ResizeMethod) -> VmSpec {
        VmSpec {
            namespace: "bench".into(),
            name: name.into(),
            uid: name.into(),
            topology: Topology::new(1, slots, 1),
            granularity: Granularity::Thread,
            placement: Placement::Packed,
            boot_vcpus: 1,
            resize_method: method,
            arch,
            memory_mib: if arch == Arch::X86_64 { 512 } else { 1024 },
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: String::new(),
            accel: Accel::Tcg,
            disks: Vec::new(),
            seed: None,
            ports: Vec::new(),
        }
    }

    /// Stop the launcher (its guests must be stopped first) and wait for it, at most 15 s.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.server).await;
    }
}

/// The direct client plugs and onlines `entries[..n]` (QEMU's hot-pluggable CPU entries
/// of slots `first_slot..`) in one batch, waits `settle`, then offlines and unplugs them
/// in one batch; the two times in ms. Device ids are `<tag>-<slot>`.
pub fn direct_plug_unplug(
    d: &mut DirectClient,
    entries: &[serde_json::Value],
    first_slot: u32,
    tag: &str,
    settle: Duration,
) -> anyhow::Result<(f64, f64)> {
    let plugs: Vec<(serde_json::Value, String, u32)> = entries
        .iter()
        .zip(first_slot..)
        .map(|(e, slot)| (e.clone(), format!("{tag}-{slot}"), slot))
        .collect();
    let (logical, took) = d.plug_online_many(&plugs)?;
    std::thread::sleep(settle);
    let unplugs: Vec<(String, u64, u32)> = plugs
        .iter()
        .zip(&logical)
        .map(|((_, id, slot), l)| (id.clone(), *l, *slot))
        .collect();
    let gone = d.unplug_many(&unplugs)?;
    Ok((took.as_secs_f64() * 1e3, gone.as_secs_f64() * 1e3))
}

/// A plan that plugs `slots` of the VM of `spec` (its own topology and granularity).
pub fn plug(spec: &VmSpec, slots: std::ops::Range<u32>) -> Plan {
    Plan::of_slots(
        &spec.topology,
        spec.granularity,
        &slots.collect::<Vec<_>>(),
        &[],
    )
    .expect("a plan of the VM's slots")
}

/// A plan that unplugs `slots` of the VM of `spec`, highest first.
pub fn unplug(spec: &VmSpec, slots: std::ops::Range<u32>) -> Plan {
    Plan::of_slots(
        &spec.topology,
        spec.granularity,
        &[],
        &slots.rev().collect::<Vec<_>>(),
    )
    .expect("a plan of the VM's slots")
}
