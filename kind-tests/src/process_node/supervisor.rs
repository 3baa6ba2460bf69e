//! One pod's life on the process node, as an event loop: prepare (read ConfigMaps, Secrets and
//! tokens, write volumes), run init containers in order and then the app containers, restart them
//! per `restartPolicy`, enforce `activeDeadlineSeconds`, terminate gracefully when the pod is
//! deleted, and write the pod's status after every change.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    process::ExitStatus,
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, runtime::events::EventType};
use nix::sys::signal::Signal;
use tokio::{sync::watch, time::Instant};

use super::{
    NodeShared,
    containers::{RunningContainer, Slot},
    plan::{ConfigError, ContainerPlan, PlanError},
    sandbox::PodSandbox,
    status::{ContainerPhase, PodFailure, PodRuntime, RestartPolicy, Terminated},
    volumes::VolumePlan,
};

/// What the pod loop tells a supervisor.
#[derive(Clone, Debug)]
pub enum PodEvent {
    Current(Arc<Pod>),
    Gone,
}

/// Where a pod is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    Preparing,
    Init(usize),
    Running,
    Terminating { kill_at: Instant, then_delete: bool },
    Finished,
}

type ExitFuture = BoxFuture<'static, (Slot, io::Result<ExitStatus>)>;

/// Everything the node tracks for one pod.
pub(super) struct Supervisor {
    pub(super) shared: Arc<NodeShared>,
    pub(super) pods: Api<Pod>,
    pub(super) pod: Arc<Pod>,
    pub(super) rt: PodRuntime,
    pub(super) stage: Stage,
    pub(super) sandbox: PodSandbox,
    pub(super) volumes: Vec<VolumePlan>,
    pub(super) plans: BTreeMap<Slot, ContainerPlan>,
    pub(super) running: HashMap<Slot, RunningContainer>,
    pub(super) exits: FuturesUnordered<ExitFuture>,
    pub(super) restart_at: BTreeMap<Slot, Instant>,
    pub(super) logs_started: Vec<Slot>,
    /// Containers that stopped without an exit to wait for (they could not start).
    pub(super) stopped: VecDeque<(Slot, Terminated)>,
    pub(super) retry_prepare_at: Option<Instant>,
    pub(super) retry_status_at: Option<Instant>,
    pub(super) status_retry_delay: Duration,
    pub(super) deadline: Option<Instant>,
    pub(super) written: Option<serde_json::Value>,
    pub(super) delete_sent: bool,
    pub(super) gone: bool,
    /// The pod was already terminal when the node first saw it (the node restarted): its status
    /// is left alone and only its deletion is handled.
    pub(super) adopted_terminal: bool,
}

/// Runs one pod until it is gone from the API server.
pub async fn supervise(shared: Arc<NodeShared>, pod: Arc<Pod>, mut events: watch::Receiver<PodEvent>) {
    let Some(mut s) = Supervisor::new(shared, pod) else {
        return;
    };
    s.begin().await;
    while !s.gone {
        s.publish().await;
        s.wake(&mut events).await;
    }
    s.shutdown();
}

enum Wake {
    Pod,
    Exit(Slot, io::Result<ExitStatus>),
    Timer,
}

impl Supervisor {
    fn new(shared: Arc<NodeShared>, pod: Arc<Pod>) -> Option<Self> {
        let namespace = pod.namespace().unwrap_or_default();
        let uid = pod.uid().unwrap_or_default();
        let sandbox = match PodSandbox::create(&shared.dirs, &uid) {
            Ok(sandbox) => sandbox,
            Err(err) => {
                tracing::error!(pod = %pod.name_any(), %err, "cannot create pod directory");
                return None;
            }
        };
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(Timestamp::now, |t| t.0);
        let mut rt = PodRuntime::new(&pod, start_time);
        rt.start_time = start_time;
        Some(Self {
            pods: Api::namespaced(shared.client.clone(), &namespace),
            shared,
            pod,
            rt,
            stage: Stage::Preparing,
            sandbox,
            volumes: Vec::new(),
            plans: BTreeMap::new(),
            running: HashMap::new(),
            exits: FuturesUnordered::new(),
            restart_at: BTreeMap::new(),
            logs_started: Vec::new(),
            stopped: VecDeque::new(),
            retry_prepare_at: None,
            retry_status_at: None,
            status_retry_delay: Duration::from_millis(500),
            deadline: None,
            written: None,
            delete_sent: false,
            gone: false,
            adopted_terminal: false,
        })
    }

    /// First steps: a pod that is already terminal is only watched for deletion.
    async fn begin(&mut self) {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.clone());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            self.stage = Stage::Finished;
            self.adopted_terminal = true;
        } else {
            self.deadline = self.active_deadline();
            self.prepare().await;
        }
        self.on_pod_changed().await;
    }

    fn active_deadline(&self) -> Option<Instant> {
        let seconds = self.pod.spec.as_ref()?.active_deadline_seconds?;
        let ends = self
            .rt
            .start_time
            .checked_add(jiff::SignedDuration::from_secs(seconds))
            .ok()?;
        let left = ends.duration_since(Timestamp::now());
        Some(after(Duration::try_from(left).unwrap_or(Duration::ZERO)))
    }

    async fn wake(&mut self, events: &mut watch::Receiver<PodEvent>) {
        if let Some((slot, terminated)) = self.stopped.pop_front() {
            return self.container_stopped(slot, terminated).await;
        }
        let timer = self.next_timer();
        let wake = tokio::select! {
            changed = events.changed() => match changed {
                Ok(()) => Wake::Pod,
                Err(_) => {
                    self.gone = true;
                    return;
                }
            },
            Some((slot, status)) = self.exits.next(), if !self.exits.is_empty() => Wake::Exit(slot, status),
            () = sleep_until(timer), if timer.is_some() => Wake::Timer,
        };
        match wake {
            Wake::Pod => {
                let event = events.borrow_and_update().clone();
                match event {
                    PodEvent::Current(pod) => {
                        self.pod = pod;
                        self.on_pod_changed().await;
                    }
                    PodEvent::Gone => self.gone = true,
                }
            }
            Wake::Exit(slot, status) => self.on_exit(slot, status).await,
            Wake::Timer => self.on_timer().await,
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let kill_at = match self.stage {
            Stage::Terminating { kill_at, .. } if !self.running.is_empty() => Some(kill_at),
            _ => None,
        };
        let deadline = match self.stage {
            Stage::Preparing | Stage::Init(_) | Stage::Running => self.deadline,
            _ => None,
        };
        [
            kill_at,
            deadline,
            self.retry_prepare_at,
            self.retry_status_at,
            self.restart_at.values().min().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_pod_changed(&mut self) {
        self.rt.unready_gates = unready_gates(&self.pod);
        if self.pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(0)
            .max(0);
        let grace_ends = after_seconds(grace);
        match self.stage {
            Stage::Terminating { kill_at, .. } => {
                self.stage = Stage::Terminating {
                    kill_at: kill_at.min(grace_ends),
                    then_delete: true,
                };
            }
            Stage::Finished => self.delete_final().await,
            _ => {
                self.event(
                    EventType::Normal,
                    "Killing",
                    "Stopping containers: the pod was deleted",
                );
                self.begin_termination(grace_ends, true).await;
            }
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.retry_status_at.is_some_and(|at| at <= now) {
            self.retry_status_at = None;
        }
        if let Stage::Terminating { kill_at, then_delete } = self.stage
            && kill_at <= now
        {
            for running in self.running.values() {
                running.group.signal(Signal::SIGKILL);
            }
            // Again in a second if a process has not died yet (e.g. in uninterruptible IO).
            self.stage = Stage::Terminating {
                kill_at: now + Duration::from_secs(1),
                then_delete,
            };
            return;
        }
        let active = matches!(self.stage, Stage::Preparing | Stage::Init(_) | Stage::Running);
        if active && self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            self.rt.failure = Some(PodFailure {
                reason: "DeadlineExceeded".to_owned(),
                message: "Pod was active on the node longer than the specified deadline".to_owned(),
            });
            self.event(
                EventType::Normal,
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline",
            );
            let grace = self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30);
            let kill_at = after_seconds(grace);
            self.begin_termination(kill_at, false).await;
            return;
        }
        if self.retry_prepare_at.is_some_and(|at| at <= now) {
            self.retry_prepare_at = None;
            self.prepare().await;
        }
        let due: Vec<Slot> = self
            .restart_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| *s)
            .collect();
        for slot in due {
            self.restart_at.remove(&slot);
            if let Some(c) = self.rt.container_mut(slot) {
                c.restart_count += 1;
            }
            self.start_container(slot);
        }
    }

    /// Fetches what the pod refers to and plans every container. A missing ConfigMap or Secret
    /// is retried; an unknown image or an unsupported spec fails the pod.
    async fn prepare(&mut self) {
        match self.plan_pod().await {
            Ok(()) => {}
            Err(PlanError::Config(ConfigError::Waiting(message))) => {
                self.set_waiting_all("CreateContainerConfigError", &message);
                self.event(EventType::Warning, "Failed", &format!("Error: {message}"));
                self.retry_prepare_at = Some(Instant::now() + Duration::from_secs(2));
                return;
            }
            Err(PlanError::Image(err)) => {
                let message = err.to_string();
                self.set_waiting_all("ErrImageNeverPull", &message);
                self.fail_pod("ErrImageNeverPull", &message);
                return;
            }
            Err(PlanError::Config(ConfigError::Unsupported(message))) => {
                let message = format!("the process node cannot run this pod: {message}");
                self.set_waiting_all("CreateContainerConfigError", &message);
                self.fail_pod("ProcessNodeUnsupported", &message);
                return;
            }
        }
        let fs_group = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| c.fs_group)
            .and_then(|g| u32::try_from(g).ok())
            .filter(|_| nix::unistd::geteuid().is_root());
        if let Err(err) = self.sandbox.write_volumes(&self.volumes, fs_group) {
            self.fail_pod(
                "ProcessNodeError",
                &format!("cannot write the pod's volumes: {err}"),
            );
            return;
        }
        self.rt.sandbox_ready = true;
        if self.rt.init.is_empty() {
            self.start_app_containers();
        } else {
            self.stage = Stage::Init(0);
            self.start_container(Slot::Init(0));
        }
    }

    fn set_waiting_all(&mut self, reason: &str, message: &str) {
        for c in self.rt.init.iter_mut().chain(self.rt.containers.iter_mut()) {
            c.state = ContainerPhase::Waiting {
                reason: reason.to_owned(),
                message: Some(message.to_owned()),
            };
        }
    }

    /// The pod can never run: report it Failed with a reason.
    pub(super) fn fail_pod(&mut self, reason: &str, message: &str) {
        tracing::info!(pod = %self.pod.name_any(), reason, message, "pod failed");
        self.event(EventType::Warning, reason, message);
        self.rt.failure = Some(PodFailure {
            reason: reason.to_owned(),
            message: message.to_owned(),
        });
        self.rt.terminal = true;
        self.stage = Stage::Finished;
        self.retry_prepare_at = None;
    }

    fn start_app_containers(&mut self) {
        self.stage = Stage::Running;
        for c in &mut self.rt.containers {
            if let ContainerPhase::Waiting { reason, .. } = &mut c.state {
                *reason = "ContainerCreating".to_owned();
            }
        }
        for index in 0..self.rt.containers.len() {
            self.start_container(Slot::App(index));
        }
    }

    async fn on_exit(&mut self, slot: Slot, status: io::Result<ExitStatus>) {
        let Some(running) = self.running.remove(&slot) else {
            return;
        };
        let terminated = running.finished(status);
        self.container_stopped(slot, terminated).await;
    }

    /// A container stopped (exited, was killed, or could not start): restart it, move on to the
    /// next init container or the app containers, or finish the pod.
    pub(super) async fn container_stopped(&mut self, slot: Slot, terminated: Terminated) {
        let code = terminated.exit_code;
        if let Stage::Terminating { then_delete, .. } = self.stage {
            self.set_terminated(slot, terminated);
            if self.running.is_empty() {
                self.finish_termination(then_delete).await;
            }
            return;
        }
        let policy = self.rt.restart_policy;
        // Init containers run again on failure unless the policy is Never.
        let restarts = match slot {
            Slot::Init(_) => code != 0 && policy != RestartPolicy::Never,
            Slot::App(_) => policy.restarts(code),
        };
        if restarts {
            self.schedule_restart(slot, terminated);
            return;
        }
        self.set_terminated(slot, terminated);
        match slot {
            Slot::Init(i) if code == 0 && i + 1 < self.rt.init.len() => {
                self.stage = Stage::Init(i + 1);
                self.start_container(Slot::Init(i + 1));
            }
            Slot::Init(_) if code == 0 => self.start_app_containers(),
            Slot::Init(_) => self.finish_pod(),
            Slot::App(_) => {
                let all_done = self.rt.containers.iter().all(|c| c.exit_code().is_some());
                if all_done {
                    self.finish_pod();
                }
            }
        }
    }

    pub(super) fn finish_pod(&mut self) {
        self.rt.terminal = true;
        self.stage = Stage::Finished;
        self.restart_at.clear();
    }

    fn set_terminated(&mut self, slot: Slot, terminated: Terminated) {
        if let Some(c) = self.rt.container_mut(slot) {
            c.state = ContainerPhase::Terminated(terminated);
        }
    }

    fn schedule_restart(&mut self, slot: Slot, terminated: Terminated) {
        let (initial, max) = self.shared.crash_loop_backoff;
        let pod_name = self.pod.name_any();
        let Some(c) = self.rt.container_mut(slot) else {
            return;
        };
        let delay = super::status::crash_backoff(c.restart_count, initial, max);
        let message = format!(
            "back-off {}s restarting failed container={} pod={pod_name}",
            delay.as_secs(),
            c.name
        );
        c.last_terminated = Some(terminated);
        c.state = ContainerPhase::Waiting {
            reason: "CrashLoopBackOff".to_owned(),
            message: Some(message.clone()),
        };
        if !delay.is_zero() {
            self.event(EventType::Warning, "BackOff", &message);
        }
        self.restart_at.insert(slot, Instant::now() + delay);
    }

    /// The pod is gone from the API server: kill whatever still runs and remove its files.
    fn shutdown(&mut self) {
        self.running.clear();
        self.exits = FuturesUnordered::new();
        self.sandbox.remove();
    }

    pub(super) fn push_exit(&mut self, slot: Slot, mut child: tokio::process::Child) {
        self.exits.push(async move { (slot, child.wait().await) }.boxed());
    }
}

/// Readiness gates of the pod whose condition is not `True`.
fn unready_gates(pod: &Pod) -> Vec<String> {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .filter(|gate| {
            !conditions
                .into_iter()
                .flatten()
                .any(|c| c.type_ == gate.condition_type && c.status == "True")
        })
        .map(|gate| gate.condition_type.clone())
        .collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// `now + duration`; a pod can ask for absurd periods, so this saturates a century ahead
/// instead of overflowing.
fn after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// `now + seconds`, negative counting as zero.
pub(super) fn after_seconds(seconds: i64) -> Instant {
    after(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_periods_do_not_overflow() {
        assert!(after_seconds(i64::MAX) > Instant::now());
        assert!(after_seconds(-5) <= Instant::now() + Duration::from_millis(1));
    }
}
