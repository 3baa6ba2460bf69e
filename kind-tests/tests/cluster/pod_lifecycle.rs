//! Deleting a running pod goes through graceful termination: SIGTERM first, a terminal status,
//! then the pod disappears — without waiting for the grace period.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use contextos_kind_tests::{TestEnv, TestNamespace, describe::pod_summary};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
    runtime::watcher::{self, Event},
};
use serde_json::json;
use tokio::sync::oneshot;

use crate::workloads::{shell_pod, terminated, wait_for_log, wait_for_phase};

const GRACE_SECONDS: i64 = 5;

/// Traps SIGTERM, leaves a marker in the termination message and exits 42.
const SCRIPT: &str = r#"
trap 'echo got SIGTERM; echo sigterm-received > "${CONTEXTOS_ROOT:-}/dev/termination-log"; exit 42' TERM
echo trap installed
sleep 300 &
wait
"#;

#[tokio::test]
async fn deleting_a_running_pod_terminates_it_gracefully() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "graceful-delete").await?;
    let pods: Api<Pod> = ns.api();
    let pod = shell_pod(
        env,
        "graceful",
        SCRIPT,
        json!({ "terminationGracePeriodSeconds": GRACE_SECONDS }),
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_for_phase(&ns, "graceful", "Running").await?;
    wait_for_log(&ns, "graceful", "main", "trap installed").await?;

    // Watch from before the delete, to see the last status the node writes.
    let (ready_tx, ready_rx) = oneshot::channel();
    let watch = tokio::spawn(observe_until_deleted(pods.clone(), ready_tx));
    ready_rx.await.context("the watch ended before it started")?;
    let deleted_at = Instant::now();
    pods.delete("graceful", &DeleteParams::default()).await?;
    let seen = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .context("the pod was not deleted within 60 s")???;
    let elapsed = deleted_at.elapsed();

    let last = seen.last().context("no pod status observed")?;
    let state = seen
        .iter()
        .rev()
        .find_map(|pod| terminated(pod))
        .with_context(|| format!("never saw the container terminated; last: {}", pod_summary(last)))?;
    ensure!(
        state.exit_code == 42,
        "the SIGTERM trap did not run (exit {} instead of 42; 137 means SIGKILL): {}",
        state.exit_code,
        pod_summary(last)
    );
    ensure!(
        state
            .message
            .as_deref()
            .is_some_and(|m| m.contains("sigterm-received")),
        "no marker in the termination message: {state:?}"
    );
    ensure!(
        elapsed < Duration::from_secs(GRACE_SECONDS as u64),
        "the pod took {elapsed:?} to go, as long as its {GRACE_SECONDS} s grace period"
    );
    eprintln!("graceful deletion took {elapsed:?}");
    ns.pass();
    Ok(())
}

/// Collects every version of the pod until it is deleted.
async fn observe_until_deleted(pods: Api<Pod>, ready: oneshot::Sender<()>) -> Result<Vec<Pod>> {
    let config = watcher::Config::default().fields("metadata.name=graceful");
    let mut stream = watcher::watcher(pods, config).boxed();
    let mut ready = Some(ready);
    let mut seen = Vec::new();
    while let Some(event) = stream.next().await {
        match event? {
            Event::InitApply(pod) | Event::Apply(pod) => seen.push(pod),
            Event::InitDone => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Event::Delete(pod) => {
                seen.push(pod);
                return Ok(seen);
            }
            Event::Init => {}
        }
    }
    anyhow::bail!("the watch ended before the pod was deleted")
}
