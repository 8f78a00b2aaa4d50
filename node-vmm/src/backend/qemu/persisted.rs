//! The backend's per-VM state that must survive an agent restart (`backend.json`, next to
//! the launcher's `vm.json`): the TCG vCPU budget and the slots left mid-step.

use super::vm::QemuVm;
use crate::backend::BackendError;
use crate::launcher;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// The backend's own per-VM state (budget, pending unplugs), next to `vm.json`.
pub const BACKEND_JSON: &str = "backend.json";

/// The backend's per-VM state that must survive an agent restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Persisted {
    /// UID of the VM this state belongs to.
    pub(super) uid: String,
    /// vCPU threads this QEMU process has created (boot vCPUs included).
    pub(super) vcpu_threads_created: u32,
    /// Slots with a `device_del` the guest has not completed.
    pub(super) unplugging: BTreeSet<u32>,
    /// Absent slots whose last plug failed.
    pub(super) failed: BTreeSet<u32>,
    /// Slots with a `device_add` whose vCPU is not confirmed online yet: a plug that a
    /// timeout or an agent restart interrupted. Observing finishes them (see `observe`).
    #[serde(default)]
    pub(super) plugging: BTreeSet<u32>,
    /// Slots parked under TCG: QEMU keeps the vCPU, the guest has it offline (see `park`).
    #[serde(default)]
    pub(super) parked: BTreeSet<u32>,
}

pub(super) fn load_persisted(dir: &Path) -> Result<Option<Persisted>, BackendError> {
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

pub(super) fn store_persisted(dir: &Path, st: &Persisted) -> Result<(), BackendError> {
    let path = dir.join(BACKEND_JSON);
    let bytes = serde_json::to_vec_pretty(st).map_err(|e| BackendError::State {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    launcher::write_private(&path, &bytes)
        .map_err(|e| BackendError::io(format!("writing {}", path.display()), e))
}

impl QemuVm {
    pub(super) fn persist(&self, st: &Persisted) {
        if let Err(e) = store_persisted(&self.dir, st) {
            tracing::error!(vm = %self.key, error = %e, "cannot record the backend state");
        }
    }
}
