//! Why a runner attempt ended without a report, read from its pod: the kubelet's reasons (past
//! the deadline, evicted) and the runtime's (out of memory, killed by a signal, exited), worded
//! for the Session's status with the SandboxProfile field that sets the limit.

use std::fmt;

use k8s_openapi::api::core::v1::Pod;

/// The runner container's name in the pods the operator writes.
const RUNNER_CONTAINER: &str = "runner";
/// How much of the kubelet's eviction message a Session's status repeats.
const MESSAGE_CHARS: usize = 256;

/// `text` without control characters, cut to `max` characters.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// What ended an attempt that did not report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashCause {
    /// The container passed its memory limit and the kernel killed it.
    OutOfMemory { limit: Option<String> },
    /// The kubelet ended the pod at `activeDeadlineSeconds`.
    DeadlineExceeded { seconds: Option<i64> },
    /// The kubelet evicted the pod (node pressure).
    Evicted { message: String },
    /// The process ended with an exit code above 128: 128 + a signal number, usually a kill
    /// (a process may also exit with such a code itself).
    Signalled { code: i32 },
    /// The process exited with a code but wrote no report.
    Exited { code: i32 },
    /// Nothing in the pod's status says (deleted, never started, status not written yet).
    Unknown,
    /// It reported a completion the gateway service did not sign (`why`): not believed.
    Unverified { why: String },
}

/// Reads why `pod` ended (pure: no API call).
pub fn crash_cause(pod: &Pod) -> CrashCause {
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    match status.and_then(|s| s.reason.as_deref()) {
        Some("DeadlineExceeded") => {
            return CrashCause::DeadlineExceeded {
                seconds: spec.and_then(|s| s.active_deadline_seconds),
            };
        }
        Some("Evicted") => {
            let message = status.and_then(|s| s.message.as_deref()).unwrap_or_default();
            return CrashCause::Evicted {
                message: printable(message, MESSAGE_CHARS),
            };
        }
        _ => {}
    }
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == RUNNER_CONTAINER))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let Some(terminated) = terminated else {
        return CrashCause::Unknown;
    };
    if terminated.reason.as_deref() == Some("OOMKilled") {
        let limit = spec
            .and_then(|s| s.containers.iter().find(|c| c.name == RUNNER_CONTAINER))
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| q.0.clone());
        return CrashCause::OutOfMemory { limit };
    }
    match terminated.exit_code {
        code if code > 128 => CrashCause::Signalled { code },
        code => CrashCause::Exited { code },
    }
}

impl fmt::Display for CrashCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory { limit } => write!(
                f,
                "was killed for running out of memory at its limit of {} (raise the SandboxProfile's spec.resources.memory)",
                limit.as_deref().unwrap_or("(unknown)")
            ),
            Self::DeadlineExceeded { seconds } => write!(
                f,
                "was stopped by the kubelet at its deadline of {} s (the SandboxProfile's spec.activeDeadlineSeconds)",
                seconds.map_or_else(|| "(unknown)".to_owned(), |s| s.to_string())
            ),
            Self::Evicted { message } => write!(f, "was evicted by the kubelet: {message}"),
            Self::Signalled { code } => write!(
                f,
                "exited with code {code} (128 + {}: usually killed by that signal)",
                code - 128
            ),
            Self::Exited { code } => write!(f, "exited with code {code} without a report"),
            Self::Unknown => f.write_str("ended without saying why"),
            Self::Unverified { why } => write!(
                f,
                "reported a completion the gateway service did not attest ({why}); the record decides"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "s-run-1"},
            "spec": {
                "activeDeadlineSeconds": 1800,
                "containers": [{"name": "runner", "resources": {"limits": {"memory": "64Mi"}}}],
            },
            "status": status,
        }))
        .expect("pod")
    }

    fn terminated(reason: &str, code: i32) -> serde_json::Value {
        json!({"phase": "Failed", "containerStatuses": [{
            "name": "runner", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"reason": reason, "exitCode": code}},
        }]})
    }

    #[test]
    fn each_way_a_runner_pod_ends_reads_as_its_cause() {
        let cases = [
            (
                terminated("OOMKilled", 137),
                CrashCause::OutOfMemory {
                    limit: Some("64Mi".into()),
                },
            ),
            (
                json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}),
                CrashCause::DeadlineExceeded { seconds: Some(1800) },
            ),
            (
                json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
                CrashCause::Evicted {
                    message: "The node was low on resource: memory.".into(),
                },
            ),
            (terminated("Error", 137), CrashCause::Signalled { code: 137 }),
            (terminated("Error", 3), CrashCause::Exited { code: 3 }),
            (json!({"phase": "Failed"}), CrashCause::Unknown),
        ];
        for (status, expected) in cases {
            assert_eq!(crash_cause(&pod(status.clone())), expected, "{status}");
        }
    }

    #[test]
    fn an_eviction_message_is_cut_and_stripped_of_control_characters() {
        let long = format!("low on memory\u{1b}[2J{}", "x".repeat(1000));
        let cause = crash_cause(&pod(
            json!({"phase": "Failed", "reason": "Evicted", "message": long}),
        ));
        let CrashCause::Evicted { message } = cause else {
            panic!("evicted: {cause:?}");
        };
        assert_eq!(message.chars().count(), MESSAGE_CHARS);
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }

    #[test]
    fn the_wording_names_the_field_to_change() {
        let oom = CrashCause::OutOfMemory {
            limit: Some("64Mi".into()),
        }
        .to_string();
        assert!(
            oom.contains("64Mi") && oom.contains("spec.resources.memory"),
            "{oom}"
        );
        let deadline = CrashCause::DeadlineExceeded { seconds: Some(30) }.to_string();
        assert!(
            deadline.contains("30 s") && deadline.contains("spec.activeDeadlineSeconds"),
            "{deadline}"
        );
    }
}
