//! Sessions on the real node: the quickstart runs in a real runner pod (the workspace's
//! `contextos` in an image, under the SandboxProfile and the operator's NetworkPolicy, enforced)
//! and reaches only the gateway; and the kubelet's limits end attempts the Session then reports.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Agent, Session, session::SessionPhase};
use contextos_kind_tests::{Check, wait_for_object};
use contextos_operator::session_children;
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::{
    objects::apply,
    support::{self, TIMEOUT},
};

fn condition(s: &Session, type_: &str) -> String {
    let status = s.status.clone().unwrap_or_default();
    status.conditions.iter().find(|c| c.type_ == type_).map_or_else(
        || "none".into(),
        |c| format!("{} {} {}", c.status, c.reason, c.message),
    )
}

async fn phase_is(api: &Api<Session>, name: &str, wanted: SessionPhase) -> Result<Session> {
    Ok(
        wait_for_object(api, name, &format!("phase {wanted:?}"), TIMEOUT, |s: &Session| {
            let phase = s.status.as_ref().and_then(|s| s.phase);
            Check::when(phase == Some(wanted), || {
                format!("phase {phase:?}, Ready: {}", condition(s, "Ready"))
            })
        })
        .await?,
    )
}

#[tokio::test]
async fn the_quickstart_session_succeeds_in_a_real_pod_that_reaches_only_the_gateway() -> Result<()> {
    quickstart_in_a_real_pod("real-quickstart", None).await
}

/// The same Session with its SandboxProfile naming the node's gVisor RuntimeClass: its runner
/// pod asks for it (sandbox.rs shows that a pod asking for it runs on gVisor's kernel), and the
/// runner reaches the gateway through gVisor's own network stack (network.rs shows the
/// NetworkPolicy holding a runner on gVisor as it holds one on runc).
#[tokio::test]
async fn the_quickstart_session_succeeds_in_a_real_pod_under_gvisor() -> Result<()> {
    quickstart_in_a_real_pod("real-gvisor-quickstart", Some("gvisor")).await
}

/// Runs the quickstart Session to its approval and on to success in a real runner pod, under
/// the runtime class `runtime_class` if one is given, and checks the pod and its policy.
async fn quickstart_in_a_real_pod(namespace: &str, runtime_class: Option<&str>) -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let op = support::operator(env).await?;
    let ns = support::tenant(env, namespace).await?;
    let client = env.client();
    for mut object in support::quickstart(env, op)? {
        if let Some(class) = runtime_class
            && object["kind"] == "SandboxProfile"
        {
            object["spec"]["runtimeClassName"] = json!(class);
        }
        apply(&client, ns.name(), &object).await?;
    }
    let agents: Api<Agent> = ns.api();
    wait_for_object(&agents, "oncall-assistant", "Ready", TIMEOUT, |a: &Agent| {
        let conditions = a.status.clone().unwrap_or_default().conditions;
        Check::when(contextos_operator::controllers::is_ready(&conditions), || {
            format!("{conditions:?}")
        })
    })
    .await?;
    apply(&client, ns.name(), &support::session("checkout")?).await?;
    let sessions: Api<Session> = ns.api();
    let paused = phase_is(&sessions, "checkout", SessionPhase::AwaitingApproval).await?;
    let pending = paused
        .status
        .and_then(|s| s.pending_approval)
        .context("AwaitingApproval shows the pending call")?;

    // The pod ran on the real node, from the image the profile pins, and kube-router enforced
    // its NetworkPolicy (the gateway is reachable only through the operator's egress rule).
    let pods: Api<Pod> = ns.api();
    let first = pods.get("checkout-run-1").await?;
    let spec = first.spec.clone().unwrap_or_default();
    let node = env.real().context("real node")?;
    ensure!(
        spec.node_name.as_deref() == Some(node.name()),
        "scheduled to {:?}",
        spec.node_name
    );
    ensure!(
        spec.runtime_class_name.as_deref() == runtime_class,
        "runtime class {:?}, the profile's {runtime_class:?}",
        spec.runtime_class_name
    );
    ensure!(
        spec.containers.first().and_then(|c| c.image.as_deref()) == Some(env.runner_image()),
        "image {:?}",
        spec.containers.first().and_then(|c| c.image.clone())
    );
    let image_id = first
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.image_id.clone())
        .unwrap_or_default();
    let digest = env.runner_image().rsplit('@').next().unwrap_or_default();
    ensure!(
        image_id.ends_with(digest),
        "the container ran image {image_id}, not {digest}"
    );
    ensure!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| v.secret.is_none() && v.host_path.is_none()),
        "no Secret or host path volume: {:?}",
        spec.volumes
    );
    // The policy kube-router enforces for this pod is the operator's: it selects the pod and
    // denies all ingress (network.rs shows such a policy enforced).
    let policies: Api<NetworkPolicy> = ns.api();
    let policy = policies
        .get(session_children::RUNNER_NETWORK_POLICY)
        .await?
        .spec
        .unwrap_or_default();
    let labels = first.metadata.labels.clone().unwrap_or_default();
    let selected = policy
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .is_some_and(|wanted| !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v)));
    ensure!(
        selected,
        "the runner's NetworkPolicy selects its pod: {policy:?} / {labels:?}"
    );
    ensure!(
        policy.policy_types.as_deref() == Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
            && policy.ingress.as_ref().is_none_or(Vec::is_empty),
        "no ingress, egress only as listed: {policy:?}"
    );

    let approval = json!({"spec": {"approvals": [{
        "callHash": pending.call_hash,
        "decision": "approve",
        "approver": "dana@example.com",
    }]}});
    sessions
        .patch("checkout", &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    let done = phase_is(&sessions, "checkout", SessionPhase::Succeeded).await?;
    let status = done.status.unwrap_or_default();
    ensure!(
        status
            .output
            .as_deref()
            .is_some_and(|o| o.contains("checkout-api")),
        "output {:?}",
        status.output
    );
    op.verify_session_record(ns.name(), &status)
        .await
        .map_err(anyhow::Error::msg)?;
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_runner_killed_at_its_memory_limit_fails_the_session_saying_so() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let op = support::operator(env).await?;
    let ns = support::tenant(env, "real-oom-session").await?;
    let client = env.client();
    for mut object in support::quickstart(env, op)? {
        if object["kind"] == "SandboxProfile" {
            // Far below what the runner needs to start: the kernel kills it on every attempt.
            object["spec"]["resources"]["memory"] = json!(OOM_LIMIT);
        }
        apply(&client, ns.name(), &object).await?;
    }
    apply(&client, ns.name(), &support::session("starved")?).await?;
    let sessions: Api<Session> = ns.api();
    let failed = phase_is(&sessions, "starved", SessionPhase::Failed).await?;
    let ready = condition(&failed, "Ready");
    ensure!(
        ready.contains("running out of memory")
            && ready.contains(OOM_LIMIT)
            && ready.contains("spec.resources.memory"),
        "the Session names the cause and the field: {ready}"
    );
    let pods: Api<Pod> = ns.api();
    let last = pods.get("starved-run-3").await?;
    let reason = last
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.state?.terminated?.reason);
    ensure!(
        reason.as_deref() == Some("OOMKilled"),
        "the runtime reported {reason:?}"
    );
    ns.pass();
    Ok(())
}

/// A memory limit the runner cannot start under.
const OOM_LIMIT: &str = "8Mi";
