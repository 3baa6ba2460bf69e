//! Semantic tool discovery in a runner pod: the pod holds no model, so the quickstart Agent with
//! `spec.discovery` (embeddings, top 2 and an always-offered tool) scores its tools with the
//! embeddings the gateway service serves (all-MiniLM-L6-v2 in the e2e gateway's process). Every
//! turn's `tools_offered` names the gateway's model, offers the always-offered tool first and
//! two by score, and never the tool the policies deny outright.
//!
//! The e2e gateway embeds with the model CONTEXTOS_EMBEDDING_MODEL names (`make test` fetches it
//! with runner/models/all-minilm-l6-v2.sh); without it the test is skipped.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{TestEnv, TestNamespace, operator_env};
use contextos_runner::{
    discovery::Scoring,
    records::{EntryBody, TenantId, read_run, store::tikv::TikvStore},
};
use kube::Api;
use serde_json::json;

use crate::{
    objects::apply,
    operator::{agent_ready, objects_for, phase_is, session},
};

#[tokio::test]
async fn a_runner_pod_scores_its_tools_with_the_gateways_embeddings() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    if contextos_runner::discovery::minilm::configured_dir().is_none() {
        eprintln!(
            "skipped: CONTEXTOS_EMBEDDING_MODEL names the model the e2e gateway embeds with (`make test` fetches it)"
        );
        return Ok(());
    }
    let ns = TestNamespace::new(env, "discovery").await?;
    let client = env.client();
    for mut object in objects_for(env, &op.tools_url)? {
        if object["kind"] == "Agent" {
            object["spec"]["discovery"] =
                json!({"topK": 2, "alwaysOffer": ["post_status_update"], "resolver": "embeddings"});
        }
        apply(&client, ns.name(), &object).await?;
    }
    agent_ready(&ns).await?;
    apply(&client, ns.name(), &session("discovered")?).await?;
    let sessions: Api<Session> = ns.api();
    let done = phase_is(&sessions, "discovered", SessionPhase::AwaitingApproval).await?;
    let status = done.status.clone().unwrap_or_default();

    let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
    let run = status.run_id.clone().context("runId")?;
    let offers: Vec<(u32, Scoring, Vec<String>, Vec<String>)> =
        read_run(&store, &TenantId::new(ns.name().to_owned())?, &run)
            .await?
            .into_iter()
            .filter_map(|(_, e)| match e.body {
                EntryBody::ToolsOffered {
                    step,
                    scoring,
                    selection,
                } => Some((
                    step,
                    scoring,
                    selection.offered.into_iter().map(|o| o.tool).collect(),
                    selection.denied,
                )),
                _ => None,
            })
            .collect();
    ensure!(!offers.is_empty(), "the run recorded what its turns were offered");
    for (step, scoring, offered, denied) in &offers {
        let Scoring::Embeddings { model } = scoring else {
            anyhow::bail!("step {step} was scored by {scoring:?}, not the gateway's embeddings");
        };
        ensure!(
            model.starts_with("local:all-minilm-l6-v2/"),
            "step {step}: {model}"
        );
        ensure!(
            offered.len() == 3 && offered[0] == "post_status_update",
            "step {step}: the always-offered tool and two by score: {offered:?}"
        );
        ensure!(
            !offered.iter().any(|t| t == "delete_namespace")
                && denied.iter().any(|t| t == "delete_namespace"),
            "step {step}: the tool every call of which is denied is never offered: {offered:?} {denied:?}"
        );
    }
    // The first turn knows only the incident: it is offered ways to find out why.
    let first = &offers[0].2;
    ensure!(
        first
            .iter()
            .any(|t| t == "get_service_status" || t == "search_runbooks"),
        "{first:?}"
    );
    ns.pass();
    Ok(())
}
