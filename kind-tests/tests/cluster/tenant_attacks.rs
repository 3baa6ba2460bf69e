//! Attacks by a tenant — someone who may create and change any object in their own namespace —
//! on what the operator trusts. Each attack must be refused or detected with a condition that
//! names the object, and the legitimate flow must work right after it.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{Api, api::DeleteParams};
use serde_json::json;

use crate::{
    objects::apply,
    operator::{TIMEOUT, condition, objects_for, phase_is, session},
};

/// The tenant creates a Session whose Agent does not exist yet, plants the Session's bundle
/// ConfigMap (owned by the Session's uid, as the operator's would be) holding its own sandbox
/// and no Policies, then creates the Agent. The operator must not run the planted bundle.
#[tokio::test]
async fn a_tenant_cannot_plant_a_sessions_run_bundle() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need the local process node");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "tenant-plants-bundle").await?;
    let client = env.client();
    let objects = objects_for(&op.tools_url)?;
    let (agents, others): (Vec<_>, Vec<_>) = objects.into_iter().partition(|o| o["kind"] == "Agent");
    for object in &others {
        apply(&client, ns.name(), object).await?;
    }
    apply(&client, ns.name(), &session("planted")?).await?;
    let sessions: Api<Session> = ns.api();
    let waiting = phase_is(&sessions, "planted", SessionPhase::Pending).await?;
    let uid = waiting.metadata.uid.clone().context("the Session's uid")?;

    let planted = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "planted-bundle",
            "labels": {"contextos.dev/session": "planted"},
            "ownerReferences": [{"apiVersion": "contextos.dev/v1alpha1", "kind": "Session",
                "name": "planted", "uid": uid, "controller": true}],
        },
        "data": {"bundle.json": json!({
            "bundle": {"tenant": "contextos-system", "policies": []},
            "sandbox": {"image": "registry.example.com/tenant/anything@sha256:0",
                        "egress": [{"cidr": "0.0.0.0/0", "ports": [{"port": 443}]}]},
        }).to_string()},
    });
    apply(&client, ns.name(), &planted).await?;
    for agent in &agents {
        apply(&client, ns.name(), agent).await?;
    }
    let refused = wait_for_object(
        &sessions,
        "planted",
        "Ready=False naming the planted bundle",
        TIMEOUT,
        |s: &Session| {
            let ready = condition(&s.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(ready.contains("UntrustedChild"), || ready.clone())
        },
    )
    .await?;
    let ready = condition(&refused.status.unwrap_or_default().conditions, "Ready");
    ensure!(
        ready.contains("ConfigMap planted-bundle is not the run bundle the operator wrote"),
        "the condition does not name the planted ConfigMap: {ready}"
    );
    let pods: Api<Pod> = ns.api();
    ensure!(
        pods.get_opt("planted-run-1").await?.is_none(),
        "a runner pod was started from the planted bundle"
    );

    // Removing the planted object lets the operator pin the Agent's revisions itself.
    let config_maps: Api<ConfigMap> = ns.api();
    config_maps.delete("planted-bundle", &DeleteParams::default()).await?;
    phase_is(&sessions, "planted", SessionPhase::AwaitingApproval).await?;
    let bundle = config_maps.get("planted-bundle").await?;
    ensure!(
        bundle
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("contextos.dev/seal"),
        "the operator's bundle carries no seal"
    );
    ns.pass();
    Ok(())
}
