//! Stopping a pod the way the kubelet does: SIGTERM to every container's process group, SIGKILL
//! when the grace period ends, the terminal status written, and for a deleted pod a final
//! `DELETE` with grace period 0 and a UID precondition.

use std::time::Duration;

use jiff::Timestamp;
use kube::{
    ResourceExt,
    api::{DeleteParams, Preconditions},
};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{
    status::{ContainerPhase, Terminated},
    supervisor::{Stage, Supervisor},
};

impl Supervisor {
    /// SIGTERM to every running container; SIGKILL at `kill_at`.
    pub(super) async fn begin_termination(&mut self, kill_at: Instant, then_delete: bool) {
        self.restart_at.clear();
        self.retry_prepare_at = None;
        self.stage = Stage::Terminating { kill_at, then_delete };
        for running in self.running.values() {
            running.group.signal(Signal::SIGTERM);
        }
        if self.running.is_empty() {
            self.finish_termination(then_delete).await;
        }
    }

    /// Every process has stopped: write the terminal status, then (for a deleted pod) remove it.
    pub(super) async fn finish_termination(&mut self, then_delete: bool) {
        let now = Timestamp::now();
        for c in self.rt.init.iter_mut().chain(self.rt.containers.iter_mut()) {
            if matches!(c.state, ContainerPhase::Waiting { .. }) && c.last_terminated.is_none() {
                c.state = ContainerPhase::Terminated(Terminated {
                    exit_code: 137,
                    signal: None,
                    reason: "ContainerStatusUnknown".to_owned(),
                    message: Some(
                        "The container could not be located when the pod was terminated".to_owned(),
                    ),
                    started_at: None,
                    finished_at: now,
                    container_id: None,
                });
            }
        }
        self.finish_pod();
        // The terminal phase must reach the API server before the pod is removed: the Job
        // controller counts a deleted pod only once it is terminal.
        for _ in 0..10 {
            self.retry_status_at = None;
            self.publish().await;
            if self.retry_status_at.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if then_delete {
            self.delete_final().await;
        }
    }

    /// `DELETE` with grace 0 and a UID precondition, as the kubelet does once a pod is terminal.
    pub(super) async fn delete_final(&mut self) {
        if self.delete_sent {
            return;
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let name = self.pod.name_any();
        for attempt in 0..5u64 {
            match self.pods.delete(&name, &params).await {
                Ok(_) => break,
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => break,
                Err(err) => {
                    tracing::warn!(pod = %name, %err, "cannot delete terminated pod");
                    tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                }
            }
        }
        self.delete_sent = true;
    }
}
