//! The node's record of a pod as it runs — per-container state, restarts, pod-level failure — and
//! the `PodStatus` the kubelet would report for it (phase rules from the kubelet's `getPhase`).
//! Pure: time comes in as an argument.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// `restartPolicy` of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    /// Whether a container that exited with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => exit_code != 0,
            Self::Never => false,
        }
    }
}

/// A finished run of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub container_id: Option<String>,
}

impl Terminated {
    /// `Completed` for exit code 0, `Error` otherwise (what container runtimes report).
    pub fn reason_for(exit_code: i32) -> &'static str {
        if exit_code == 0 { "Completed" } else { "Error" }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerPhase {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
        container_id: String,
    },
    Terminated(Terminated),
}

/// One container as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRuntime {
    pub name: String,
    pub image: String,
    pub state: ContainerPhase,
    pub restart_count: i32,
    pub last_terminated: Option<Terminated>,
}

impl ContainerRuntime {
    pub fn new(name: &str, image: &str, waiting_reason: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            state: ContainerPhase::Waiting {
                reason: waiting_reason.to_owned(),
                message: None,
            },
            restart_count: 0,
            last_terminated: None,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, ContainerPhase::Running { .. })
    }

    pub fn exit_code(&self) -> Option<i32> {
        match &self.state {
            ContainerPhase::Terminated(t) => Some(t.exit_code),
            _ => None,
        }
    }

    /// Stopped for good or between restarts (kubelet counts a waiting container with a previous
    /// termination as stopped).
    fn is_stopped(&self) -> bool {
        match self.state {
            ContainerPhase::Terminated(_) => true,
            ContainerPhase::Waiting { .. } => self.last_terminated.is_some(),
            ContainerPhase::Running { .. } => false,
        }
    }
}

/// Why the whole pod failed (`status.reason`/`status.message`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFailure {
    pub reason: String,
    pub message: String,
}

/// The node's record of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRuntime {
    pub start_time: Timestamp,
    pub restart_policy: RestartPolicy,
    pub init: Vec<ContainerRuntime>,
    pub containers: Vec<ContainerRuntime>,
    /// Volumes and directories are in place (`PodReadyToStartContainers`).
    pub sandbox_ready: bool,
    pub failure: Option<PodFailure>,
    /// Nothing in the pod will start again: it finished, was deleted or hit its deadline.
    pub terminal: bool,
    /// Readiness gates whose condition is not `True`.
    pub unready_gates: Vec<String>,
}

impl PodRuntime {
    /// A pod the node has just taken on: every container waits.
    pub fn new(pod: &Pod, now: Timestamp) -> Self {
        let spec = pod.spec.as_ref();
        let init: Vec<ContainerRuntime> = spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .map(|c| {
                ContainerRuntime::new(&c.name, c.image.as_deref().unwrap_or_default(), "PodInitializing")
            })
            .collect();
        let app_reason = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let containers = spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|c| ContainerRuntime::new(&c.name, c.image.as_deref().unwrap_or_default(), app_reason))
            .collect();
        Self {
            start_time: now,
            restart_policy: RestartPolicy::of(pod),
            init,
            containers,
            sandbox_ready: false,
            failure: None,
            terminal: false,
            unready_gates: Vec::new(),
        }
    }

    /// All init containers exited 0.
    pub fn initialized(&self) -> bool {
        self.init.iter().all(|c| c.exit_code() == Some(0))
    }

    /// The pod phase, following the kubelet's `getPhase`.
    pub fn phase(&self) -> &'static str {
        if self.failure.is_some() {
            return PHASE_FAILED;
        }
        if !self.initialized() {
            // A pod stopped before its init containers all succeeded never ran: it failed.
            return if self.terminal {
                PHASE_FAILED
            } else {
                PHASE_PENDING
            };
        }
        let total = self.containers.len();
        let running = self.containers.iter().filter(|c| c.is_running()).count();
        let stopped = self.containers.iter().filter(|c| c.is_stopped()).count();
        let succeeded = self
            .containers
            .iter()
            .filter(|c| c.exit_code() == Some(0))
            .count();
        let waiting = total - running - stopped;
        if waiting > 0 && !self.terminal {
            return PHASE_PENDING;
        }
        if running > 0 {
            return PHASE_RUNNING;
        }
        if self.terminal {
            return if waiting == 0 && stopped == succeeded {
                PHASE_SUCCEEDED
            } else {
                PHASE_FAILED
            };
        }
        match self.restart_policy {
            RestartPolicy::Always => PHASE_RUNNING,
            _ if stopped == succeeded => PHASE_SUCCEEDED,
            RestartPolicy::Never => PHASE_FAILED,
            RestartPolicy::OnFailure => PHASE_RUNNING,
        }
    }

    /// The status the kubelet would report. `previous` conditions keep their
    /// `lastTransitionTime` while their status does not change.
    pub fn status(&self, host_ip: &str, previous: &[PodCondition], now: Timestamp) -> PodStatus {
        let phase = self.phase();
        let has_ip = self.sandbox_ready || phase != PHASE_PENDING;
        let ip = has_ip.then(|| host_ip.to_owned());
        PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(self.conditions(phase, previous, now)),
            start_time: Some(Time(self.start_time)),
            host_ip: Some(host_ip.to_owned()),
            host_ips: Some(vec![HostIP {
                ip: host_ip.to_owned(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(|c| container_status(c, false)).collect()),
            container_statuses: Some(
                self.containers
                    .iter()
                    .map(|c| container_status(c, !self.terminal))
                    .collect(),
            ),
            reason: self.failure.as_ref().map(|f| f.reason.clone()),
            message: self.failure.as_ref().map(|f| f.message.clone()),
            ..Default::default()
        }
    }

    fn conditions(&self, phase: &str, previous: &[PodCondition], now: Timestamp) -> Vec<PodCondition> {
        let done = phase == PHASE_SUCCEEDED || phase == PHASE_FAILED;
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| done || !c.is_running())
            .map(|c| c.name.as_str())
            .collect();
        let containers_ready = if unready.is_empty() {
            (true, None, None)
        } else if done {
            (false, Some("PodCompleted"), None)
        } else {
            let message = format!("containers with unready status: [{}]", unready.join(" "));
            (false, Some("ContainersNotReady"), Some(message))
        };
        let ready = if containers_ready.0 && !self.unready_gates.is_empty() {
            let message = format!(
                "corresponding condition of pod readiness gate {:?} does not exist.",
                self.unready_gates[0]
            );
            (false, Some("ReadinessGatesNotReady"), Some(message))
        } else {
            containers_ready.clone()
        };
        let incomplete: Vec<&str> = self
            .init
            .iter()
            .filter(|c| c.exit_code() != Some(0))
            .map(|c| c.name.as_str())
            .collect();
        let initialized = if incomplete.is_empty() {
            (true, None, None)
        } else {
            let message = format!("containers with incomplete status: [{}]", incomplete.join(" "));
            (false, Some("ContainersNotInitialized"), Some(message))
        };
        [
            ("PodReadyToStartContainers", (self.sandbox_ready, None, None)),
            ("Initialized", initialized),
            ("Ready", ready),
            ("ContainersReady", containers_ready),
            ("PodScheduled", (true, None, None)),
        ]
        .into_iter()
        .map(|(type_, (status, reason, message))| condition(type_, status, reason, message, previous, now))
        .collect()
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: Timestamp,
) -> PodCondition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    PodCondition {
        type_: type_.to_owned(),
        status,
        reason: reason.map(str::to_owned),
        message,
        last_transition_time: Some(since),
        ..Default::default()
    }
}

fn container_status(c: &ContainerRuntime, can_be_ready: bool) -> ContainerStatus {
    let (state, container_id) = match &c.state {
        ContainerPhase::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            None,
        ),
        ContainerPhase::Running {
            started_at,
            container_id,
        } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            Some(container_id.clone()),
        ),
        ContainerPhase::Terminated(t) => (terminated_state(t), t.container_id.clone()),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("process-node://{}", c.image),
        container_id,
        ready: can_be_ready && c.is_running(),
        started: Some(c.is_running()),
        restart_count: c.restart_count,
        state: Some(state),
        last_state: Some(
            c.last_terminated
                .as_ref()
                .map(terminated_state)
                .unwrap_or_default(),
        ),
        ..Default::default()
    }
}

fn terminated_state(t: &Terminated) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            message: t.message.clone(),
            started_at: t.started_at.map(Time),
            finished_at: Some(Time(t.finished_at)),
            container_id: t.container_id.clone(),
        }),
        ..Default::default()
    }
}

/// Delay before restart number `restarts + 1` of a crashing container: the first restart is
/// immediate, then `initial`, doubling up to `max` (the kubelet's CrashLoopBackOff).
pub fn crash_backoff(restarts: i32, initial: Duration, max: Duration) -> Duration {
    if restarts <= 0 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(restarts - 1).unwrap_or(0).min(16);
    initial.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Container, PodSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn pod(policy: &str, containers: &[&str], init: &[&str]) -> Pod {
        let make = |names: &[&str]| -> Vec<Container> {
            names
                .iter()
                .map(|n| Container {
                    name: (*n).to_owned(),
                    image: Some("busybox:1.36".into()),
                    ..Default::default()
                })
                .collect()
        };
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                restart_policy: Some(policy.to_owned()),
                containers: make(containers),
                init_containers: (!init.is_empty()).then(|| make(init)),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid timestamp")
    }

    fn terminated(code: i32) -> ContainerPhase {
        ContainerPhase::Terminated(Terminated {
            exit_code: code,
            signal: None,
            reason: Terminated::reason_for(code).to_owned(),
            message: None,
            started_at: Some(t(1)),
            finished_at: t(2),
            container_id: Some("process://1".into()),
        })
    }

    fn running() -> ContainerPhase {
        ContainerPhase::Running {
            started_at: t(1),
            container_id: "process://1".into(),
        }
    }

    fn condition_of<'a>(status: &'a PodStatus, type_: &str) -> &'a PodCondition {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn a_new_pod_is_pending_and_not_ready() {
        let rt = PodRuntime::new(&pod("Never", &["a"], &[]), t(0));
        assert_eq!(rt.phase(), PHASE_PENDING);
        let status = rt.status("127.0.0.1", &[], t(0));
        assert_eq!(condition_of(&status, "Ready").status, "False");
        assert_eq!(condition_of(&status, "PodScheduled").status, "True");
        assert_eq!(status.pod_ip, None);
        let waiting = status.container_statuses.as_ref().expect("statuses")[0]
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone());
        assert_eq!(waiting.as_deref(), Some("ContainerCreating"));
    }

    #[test]
    fn running_pod_is_ready_with_ips() {
        let mut rt = PodRuntime::new(&pod("Never", &["a", "b"], &[]), t(0));
        rt.sandbox_ready = true;
        rt.containers[0].state = running();
        rt.containers[1].state = running();
        assert_eq!(rt.phase(), PHASE_RUNNING);
        let status = rt.status("127.0.0.1", &[], t(5));
        assert_eq!(condition_of(&status, "Ready").status, "True");
        assert_eq!(condition_of(&status, "ContainersReady").status, "True");
        assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
        assert!(status.container_statuses.iter().flatten().all(|c| c.ready));
    }

    #[test]
    fn phases_follow_restart_policy() {
        let cases = [
            ("Never", 0, PHASE_SUCCEEDED),
            ("Never", 3, PHASE_FAILED),
            ("OnFailure", 0, PHASE_SUCCEEDED),
            ("Always", 0, PHASE_RUNNING),
        ];
        for (policy, code, phase) in cases {
            let mut rt = PodRuntime::new(&pod(policy, &["a"], &[]), t(0));
            rt.containers[0].state = terminated(code);
            assert_eq!(rt.phase(), phase, "{policy} exit {code}");
        }
        // A crash-looping container counts as stopped: OnFailure keeps the pod Running.
        let mut rt = PodRuntime::new(&pod("OnFailure", &["a"], &[]), t(0));
        rt.containers[0].last_terminated = Some(Terminated {
            exit_code: 1,
            signal: None,
            reason: "Error".into(),
            message: None,
            started_at: None,
            finished_at: t(1),
            container_id: None,
        });
        rt.containers[0].state = ContainerPhase::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: None,
        };
        assert_eq!(rt.phase(), PHASE_RUNNING);
    }

    #[test]
    fn terminated_pods_are_terminal_even_with_always() {
        let mut rt = PodRuntime::new(&pod("Always", &["a", "b"], &[]), t(0));
        rt.containers[0].state = terminated(0);
        rt.containers[1].state = terminated(143);
        rt.terminal = true;
        assert_eq!(rt.phase(), PHASE_FAILED);
        rt.containers[1].state = terminated(0);
        assert_eq!(rt.phase(), PHASE_SUCCEEDED);
        let status = rt.status("127.0.0.1", &[], t(9));
        let ready = condition_of(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("PodCompleted"))
        );
    }

    #[test]
    fn pod_failures_win_and_carry_reason() {
        let mut rt = PodRuntime::new(&pod("Always", &["a"], &[]), t(0));
        rt.containers[0].state = running();
        rt.failure = Some(PodFailure {
            reason: "DeadlineExceeded".into(),
            message: "Pod was active on the node longer than the specified deadline".into(),
        });
        let status = rt.status("127.0.0.1", &[], t(1));
        assert_eq!(status.phase.as_deref(), Some(PHASE_FAILED));
        assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    }

    #[test]
    fn init_containers_gate_the_pod() {
        let mut rt = PodRuntime::new(&pod("Never", &["a"], &["setup"]), t(0));
        assert_eq!(rt.phase(), PHASE_PENDING);
        let status = rt.status("127.0.0.1", &[], t(0));
        assert_eq!(condition_of(&status, "Initialized").status, "False");
        rt.init[0].state = terminated(1);
        rt.terminal = true;
        assert_eq!(rt.phase(), PHASE_FAILED);
        rt.terminal = false;
        rt.init[0].state = terminated(0);
        rt.containers[0].state = running();
        assert_eq!(rt.phase(), PHASE_RUNNING);
    }

    #[test]
    fn transition_times_only_move_on_change() {
        let mut rt = PodRuntime::new(&pod("Never", &["a"], &[]), t(0));
        let first = rt.status("127.0.0.1", &[], t(0));
        let previous = first.conditions.clone().unwrap_or_default();
        let again = rt.status("127.0.0.1", &previous, t(30));
        assert_eq!(first, again, "no change, no new timestamps");
        rt.sandbox_ready = true;
        rt.containers[0].state = running();
        let later = rt.status("127.0.0.1", &previous, t(40));
        assert_eq!(
            condition_of(&later, "Ready").last_transition_time,
            Some(Time(t(40)))
        );
        assert_eq!(
            condition_of(&later, "PodScheduled").last_transition_time,
            Some(Time(t(0)))
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let (initial, max) = (Duration::from_secs(10), Duration::from_secs(300));
        let delays: Vec<u64> = (0..8).map(|n| crash_backoff(n, initial, max).as_secs()).collect();
        assert_eq!(delays, vec![0, 10, 20, 40, 80, 160, 300, 300]);
    }
}
