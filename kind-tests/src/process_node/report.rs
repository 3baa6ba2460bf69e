//! What the node tells the API server about a pod: its status (a strategic-merge patch, sent
//! only when it changed, retried with backoff) and Events.

use std::time::Duration;

use jiff::Timestamp;
use kube::{
    Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
};
use serde_json::json;
use tokio::time::Instant;

use super::supervisor::Supervisor;

impl Supervisor {
    /// Writes the pod status if it changed since the last write.
    pub(super) async fn publish(&mut self) {
        if self.gone || self.adopted_terminal || self.retry_status_at.is_some() {
            return;
        }
        let previous = self
            .written
            .as_ref()
            .and_then(|s| serde_json::from_value(s["conditions"].clone()).ok())
            .or_else(|| self.pod.status.as_ref().and_then(|s| s.conditions.clone()))
            .unwrap_or_default();
        let status = self.rt.status(&self.shared.host_ip, &previous, Timestamp::now());
        let Ok(value) = serde_json::to_value(&status) else {
            return;
        };
        if self.written.as_ref() == Some(&value) {
            return;
        }
        let patch = Patch::Strategic(json!({ "status": value }));
        match self
            .pods
            .patch_status(&self.pod.name_any(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                self.written = Some(value);
                self.status_retry_delay = Duration::from_millis(500);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => self.written = Some(value),
            Err(err) => {
                tracing::warn!(pod = %self.pod.name_any(), %err, "cannot write pod status; will retry");
                self.retry_status_at = Some(Instant::now() + self.status_retry_delay);
                self.status_retry_delay = (self.status_retry_delay * 2).min(Duration::from_secs(30));
            }
        }
    }

    /// Records an Event about the pod (best effort, in the background).
    pub(super) fn event(&self, type_: EventType, reason: &str, note: &str) {
        let recorder = self.shared.recorder.clone();
        let reference = self.pod.object_ref(&());
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_owned(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&event, &reference).await {
                tracing::debug!(%err, "cannot record event");
            }
        });
    }
}
