//! The pods and Jobs the tests run: a small real image (busybox, see
//! [`TestEnv::busybox_image`]) with an explicit shell command, so they run on the real node, on a
//! cluster from `KUBECONFIG` and on the process node (which maps the image to the host's `sh`).

use std::time::Duration;

use anyhow::{Context, Result};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, describe::pod_summary, wait_for_object};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use serde_json::{Value, json};

/// Long enough for an image pull on a real cluster.
pub const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// A `Never`-restarting pod running `sh -c script`; `extra` is merged into the pod spec.
pub fn shell_pod(env: &TestEnv, name: &str, script: &str, extra: Value) -> Result<Pod> {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "main",
                "image": env.busybox_image(),
                "command": ["sh", "-c", script],
            }],
        },
    });
    merge(&mut pod["spec"], extra);
    serde_json::from_value(pod).context("pod spec")
}

/// A Job of one `Never`-restarting pod running `sh -c script`.
pub fn shell_job(env: &TestEnv, name: &str, script: &str, backoff_limit: i32) -> Result<Job> {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name },
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "main",
                        "image": env.busybox_image(),
                        "command": ["sh", "-c", script],
                    }],
                },
            },
        },
    }))
    .context("job spec")
}

/// Deep-merges `patch` into `target` (objects merge, everything else replaces).
pub fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// Waits for the pod to reach `phase`.
pub async fn wait_for_phase(ns: &TestNamespace, name: &str, wanted: &str) -> Result<Pod> {
    let pod = wait_for_object(
        &ns.api::<Pod>(),
        name,
        &format!("phase {wanted}"),
        POD_TIMEOUT,
        |pod| Check::when(phase(pod) == wanted, || pod_summary(pod)),
    )
    .await?;
    Ok(pod)
}

/// Waits until the container's log contains `text`; returns the whole log.
pub async fn wait_for_log(ns: &TestNamespace, pod: &str, container: &str, text: &str) -> Result<String> {
    let env = ns.env();
    let log = contextos_kind_tests::wait_for(
        format!("log of {pod}/{container} to contain {text:?}"),
        POD_TIMEOUT,
        || async {
            match env.container_log(ns.name(), pod, container).await {
                Ok(log) if log.contains(text) => Check::Done(log),
                Ok(log) => Check::NotYet(format!("log so far: {log:?}")),
                Err(err) => Check::NotYet(err),
            }
        },
    )
    .await?;
    Ok(log)
}

/// The first container's terminated state, if it has one.
pub fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}
