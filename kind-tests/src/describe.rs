//! One-line descriptions of pods, Jobs and Events, for wait messages and failure dumps. Pure.

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{ContainerState, ContainerStatus, Event, Pod},
};

/// `phase=Running node=n reason=… | main: running restarts=0 | Ready=True …`
pub fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let mut out = format!("phase={}", status.phase.as_deref().unwrap_or("<none>"));
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        out.push_str(&format!(" node={node}"));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        out.push_str(" terminating");
    }
    if let Some(reason) = &status.reason {
        out.push_str(&format!(" reason={reason}"));
    }
    if let Some(message) = &status.message {
        out.push_str(&format!(" message={message:?}"));
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .map(|c| format!("init {}", container_summary(c)))
        .chain(status.container_statuses.iter().flatten().map(container_summary));
    for container in containers {
        out.push_str(" | ");
        out.push_str(&container);
    }
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .flatten()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    if !conditions.is_empty() {
        out.push_str(&format!(" | {}", conditions.join(" ")));
    }
    out
}

fn container_summary(c: &ContainerStatus) -> String {
    let mut out = format!("{}: {}", c.name, state_summary(c.state.as_ref()));
    if c.restart_count > 0 {
        out.push_str(&format!(
            " restarts={} last=({})",
            c.restart_count,
            state_summary(c.last_state.as_ref())
        ));
    }
    out
}

fn state_summary(state: Option<&ContainerState>) -> String {
    let Some(state) = state else {
        return "unknown".to_owned();
    };
    if let Some(w) = &state.waiting {
        let reason = w.reason.as_deref().unwrap_or_default();
        return match &w.message {
            Some(message) => format!("waiting {reason}: {message}"),
            None => format!("waiting {reason}"),
        };
    }
    if state.running.is_some() {
        return "running".to_owned();
    }
    if let Some(t) = &state.terminated {
        let mut out = format!(
            "terminated exit={} {}",
            t.exit_code,
            t.reason.as_deref().unwrap_or_default()
        );
        if let Some(message) = &t.message {
            out.push_str(&format!(" message={:?}", message.trim()));
        }
        return out;
    }
    "unknown".to_owned()
}

/// `active=0 succeeded=1 failed=0 | Complete=True(…)`
pub fn job_summary(job: &Job) -> String {
    let status = job.status.clone().unwrap_or_default();
    let mut out = format!(
        "active={} succeeded={} failed={} terminating={}",
        status.active.unwrap_or(0),
        status.succeeded.unwrap_or(0),
        status.failed.unwrap_or(0),
        status.terminating.unwrap_or(0)
    );
    for c in status.conditions.iter().flatten() {
        out.push_str(&format!(
            " | {}={} reason={} {:?}",
            c.type_,
            c.status,
            c.reason.as_deref().unwrap_or_default(),
            c.message.as_deref().unwrap_or_default()
        ));
    }
    out
}

/// `Warning BackOff Pod/web-0: back-off 10s …`
pub fn event_line(event: &Event) -> String {
    let object = &event.involved_object;
    format!(
        "{} {} {}/{}: {}",
        event.type_.as_deref().unwrap_or("?"),
        event.reason.as_deref().unwrap_or("?"),
        object.kind.as_deref().unwrap_or("?"),
        object.name.as_deref().unwrap_or("?"),
        event.message.as_deref().unwrap_or_default().trim()
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerStateTerminated, PodStatus};

    use super::*;

    #[test]
    fn pod_summary_shows_phase_and_exit_codes() {
        let pod = Pod {
            status: Some(PodStatus {
                phase: Some("Failed".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "main".into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 3,
                            reason: Some("Error".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_summary(&pod), "phase=Failed | main: terminated exit=3 Error");
        assert_eq!(pod_summary(&Pod::default()), "phase=<none>");
    }
}
