//! What the worker writes to the API server: the VM's status (server-side apply, field
//! manager `node-vmm`, skipped when unchanged) and Events (repeats not published again).

use super::status::{self, Facts};
use super::{Worker, MANAGER};
use crate::backend::Observation;
use corescale_api::{VirtualMachine, VirtualMachineStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

impl Worker {
    pub(super) fn api(&self, vm: &VirtualMachine) -> Api<VirtualMachine> {
        Api::namespaced(
            self.shared.client.clone(),
            &vm.namespace().unwrap_or_default(),
        )
    }

    pub(super) async fn event(
        &mut self,
        vm: &VirtualMachine,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        // Repeated identical decisions (a Deferred VM re-checked) make one Event, not many;
        // an object re-created under the same name is another object and hears it again.
        let key = (
            vm.uid().unwrap_or_default(),
            reason.to_string(),
            note.clone(),
        );
        if self.last_event.as_ref() == Some(&key) {
            return;
        }
        self.last_event = Some(key);
        let (shared, object) = (&self.shared, vm.object_ref(&()));
        let note = shared.recorder.note(&object, type_, reason, note);
        if let Err(e) = shared.writes.send(note).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }

    /// Build the status from what was observed and apply it (server-side apply, manager
    /// `node-vmm`), unless it equals what was applied last.
    pub(super) async fn report(&mut self, vm: &VirtualMachine, obs: Option<&Observation>) {
        let status = self.status_now(vm, obs);
        if self.g.last_applied.as_ref() == Some(&status) {
            return;
        }
        let body = corescale_api::status_apply_body(&status);
        let pp = PatchParams::apply(MANAGER).force();
        let (api, name, patch) = (self.api(vm), vm.name_any(), Patch::Apply(&body));
        match self
            .shared
            .writes
            .send(api.patch_status(&name, &pp, &patch))
            .await
        {
            Ok(_) => self.g.last_applied = Some(status),
            Err(e) => {
                // The API server may be down: the guest is untouched, and the next step
                // applies the status again.
                tracing::warn!(error = %e, "cannot apply status");
                self.g.last_applied = None;
            }
        }
    }

    /// The status as observed now, with the metrics gauges updated to match.
    pub(super) fn status_now(
        &self,
        vm: &VirtualMachine,
        obs: Option<&Observation>,
    ) -> VirtualMachineStatus {
        let facts = Facts {
            book: self.g.vmm.as_ref().map(|v| &v.book),
            // The VM's own accelerator: a guest of another architecture runs under TCG
            // even on a KVM node.
            accel: self
                .g
                .vmm
                .as_ref()
                .map_or(self.shared.capacity.accel, |v| v.handle.spec().accel)
                .as_str(),
            guest_agent: self.guest_agent,
            phase: self.g.phase,
            conds: &self.g.conds,
            last_resize: self.g.last_resize.as_ref(),
            workload: self.g.vmm.as_ref().map(|v| {
                let spec = v.handle.spec();
                let advertise = self.shared.config.port_advertise.as_deref();
                status::Workload {
                    ports: spec.ports.iter().map(|p| p.status(advertise)).collect(),
                    disks: spec
                        .disks
                        .iter()
                        .map(|d| corescale_api::DiskStatus {
                            name: d.name.clone(),
                            node: self.shared.node.clone(),
                        })
                        .collect(),
                    guest: v.info.as_ref(),
                }
            }),
        };
        let status = status::status(vm, obs, &facts);
        self.export_gauges(vm, &status);
        status
    }
}
