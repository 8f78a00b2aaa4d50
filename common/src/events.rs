//! Events (`events.k8s.io/v1`), one per decision.
//!
//! kube-runtime's `Recorder` folds every Event with the same reason and action into one
//! series and keeps the first note, so "2 -> 4 vCPUs in 0.37 s" followed by "4 -> 1 vCPUs
//! in 0.21 s" would show only the first. Each resize is its own story: this recorder
//! creates one Event per call (callers drop exact repeats themselves).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};

/// Publishes Events about objects, as one reporting controller instance.
#[derive(Clone)]
pub struct EventRecorder {
    client: Client,
    reporter: Reporter,
}

impl EventRecorder {
    /// A recorder for `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        EventRecorder { client, reporter }
    }

    /// Create one Event whose action is its reason, the way corescale reports decisions.
    pub async fn note(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        self.publish(&ev, regarding).await
    }

    /// Create one Event about `regarding`. Notes are cut to the API's 1 kB limit.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let ns = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = regarding
            .name
            .clone()
            .unwrap_or_else(|| self.reporter.controller.clone());
        let note = ev.note.as_ref().map(|n| {
            let mut n = n.clone();
            while n.len() > 1024 {
                n.pop();
            }
            n
        });
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note,
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(())
    }
}
