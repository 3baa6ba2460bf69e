//! batch/v1 Jobs run to completion or failure with real pod status, and clean up their pods.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, describe::job_summary, wait_for, wait_for_object};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};

use crate::workloads::{phase, shell_job, terminated};

/// Job backoff (10 s before the second pod) plus an image pull on a real cluster.
const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn has_condition(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>> {
    let selector = format!("batch.kubernetes.io/job-name={job}");
    Ok(pods.list(&ListParams::default().labels(&selector)).await?.items)
}

#[tokio::test]
async fn a_job_runs_to_complete_and_its_output_is_logged() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "job-complete").await?;
    let jobs: Api<Job> = ns.api();
    let job = shell_job(env, "hello", r#"echo "hello from $HOSTNAME""#, 0)?;
    jobs.create(&PostParams::default(), &job).await?;

    let done = wait_for_object(&jobs, "hello", "condition Complete", JOB_TIMEOUT, |job| {
        Check::when(has_condition(job, "Complete"), || job_summary(job))
    })
    .await?;
    ensure!(
        done.status.as_ref().and_then(|s| s.succeeded) == Some(1),
        "{}",
        job_summary(&done)
    );

    let pods: Api<Pod> = ns.api();
    let finished = job_pods(&pods, "hello").await?;
    let pod = finished
        .iter()
        .find(|p| phase(p) == "Succeeded")
        .context("no Succeeded pod for the Job")?;
    let log = env
        .container_log(ns.name(), &pod.name_any(), "main")
        .await
        .map_err(anyhow::Error::msg)?;
    let expected = format!("hello from {}", pod.name_any());
    ensure!(
        log.contains(&expected),
        "log of {} is {log:?}, expected {expected:?}",
        pod.name_any()
    );

    // Background propagation: the garbage collector removes the pods with the Job.
    jobs.delete("hello", &DeleteParams::background()).await?;
    wait_for("the Job's pods to be deleted with it", JOB_TIMEOUT, || async {
        match job_pods(&pods, "hello").await {
            Ok(left) if left.is_empty() => Check::Done(()),
            Ok(left) => Check::NotYet(format!("{} pods left", left.len())),
            Err(err) => Check::NotYet(err.to_string()),
        }
    })
    .await?;
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_failing_job_stops_at_its_backoff_limit() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "job-failed").await?;
    let jobs: Api<Job> = ns.api();
    jobs.create(
        &PostParams::default(),
        &shell_job(env, "fails", "echo failing; exit 3", 1)?,
    )
    .await?;

    let failed = wait_for_object(&jobs, "fails", "condition Failed", JOB_TIMEOUT, |job| {
        Check::when(has_condition(job, "Failed"), || job_summary(job))
    })
    .await?;
    let condition = failed
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed"))
        .context("Failed condition")?;
    ensure!(
        condition.reason.as_deref() == Some("BackoffLimitExceeded"),
        "Failed for the wrong reason: {}",
        job_summary(&failed)
    );
    ensure!(
        failed.status.as_ref().and_then(|s| s.failed) == Some(2),
        "{}",
        job_summary(&failed)
    );

    let pods = job_pods(&ns.api(), "fails").await?;
    ensure!(
        pods.len() == 2,
        "expected 2 pods (backoffLimit 1), found {}",
        pods.len()
    );
    for pod in &pods {
        let exit = terminated(pod).map(|t| t.exit_code);
        ensure!(
            phase(pod) == "Failed" && exit == Some(3),
            "pod {}: phase {}, exit code {exit:?}",
            pod.name_any(),
            phase(pod)
        );
    }
    ns.pass();
    Ok(())
}
