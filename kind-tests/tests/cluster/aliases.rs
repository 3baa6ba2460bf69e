//! Cached read-only results and aliases in the cluster: a Session whose Agent shows read-only
//! results by alias (`spec.aliases`) and whose runbook search is cached (`cache` on the
//! diagnosis skill's tool) runs in a runner pod; the gateway service answers the repeated
//! search from its cache (the record names the call it came from, and no attempt was made),
//! the runner renders the repeat by alias, and the model's `contextos_deref` reads it again
//! from the run's own conversation — all in the record the gateway wrote.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{TestEnv, TestNamespace, operator_env};
use contextos_runner::records::{EntryBody, TenantId, read_run, store::tikv::TikvStore};
use kube::Api;
use serde_json::{Value, json};

use crate::{
    objects::apply,
    operator::{agent_ready, objects_for, phase_is, session},
};

const RUNBOOKS_ALIAS: &str = "@search_runbooks.checkout-api-5xx#1";

/// The model's turns: search, status, the same search again, read the first search again by
/// its alias, answer.
fn script() -> String {
    let runbooks = json!({"tool": "search_runbooks", "arguments": {"query": "checkout-api 5xx"}});
    let turns = json!([
        {"content": "Looking up the runbook.", "toolCalls": [runbooks]},
        {"content": "Checking the live status.", "toolCalls": [{"tool": "get_service_status", "arguments": {"service": "checkout-api"}}]},
        {"content": "Looking the runbook up again.", "toolCalls": [runbooks]},
        {"content": "Reading the first search again.", "toolCalls": [{"tool": "contextos_deref", "arguments": {"alias": RUNBOOKS_ALIAS}}]},
        {"content": "{\"summary\": \"checkout-api 5xx started right after the 14:02 deploy.\", \"actions\": [], \"resolved\": false}"},
    ]);
    json!({ "turns": turns }).to_string()
}

#[tokio::test]
async fn a_repeated_read_is_answered_by_the_gateways_cache_and_shown_by_alias_in_a_runner_pod() -> Result<()>
{
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "aliases").await?;
    let client = env.client();
    for mut object in objects_for(env, &op.tools_url)? {
        match (object["kind"].as_str(), object["metadata"]["name"].as_str()) {
            (Some("Agent"), _) => object["spec"]["aliases"] = json!({"fullForSteps": 1}),
            (Some("Skill"), Some("diagnosis")) => {
                let tool = &mut object["spec"]["tools"][0];
                ensure!(
                    tool["name"] == "search_runbooks",
                    "the quickstart changed: {tool}"
                );
                tool["cache"] = json!({"ttlSeconds": 600});
            }
            (Some("ConfigMap"), Some("quickstart-script")) => object["data"]["script.json"] = json!(script()),
            _ => {}
        }
        apply(&client, ns.name(), &object).await?;
    }
    agent_ready(&ns).await?;
    apply(&client, ns.name(), &session("aliased")?).await?;
    let sessions: Api<Session> = ns.api();
    let done = phase_is(&sessions, "aliased", SessionPhase::Succeeded).await?;
    let status = done.status.clone().unwrap_or_default();
    op.verify_session_record(ns.name(), &status)
        .await
        .map_err(anyhow::Error::msg)?;

    let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
    let run = status.run_id.clone().context("runId")?;
    let bodies: Vec<EntryBody> = read_run(&store, &TenantId::new(ns.name().to_owned())?, &run)
        .await?
        .into_iter()
        .map(|(_, e)| e.body)
        .collect();
    let search_calls: Vec<&str> = bodies
        .iter()
        .filter_map(|b| match b {
            EntryBody::ToolCallRequested(c) if c.tool == "search_runbooks" => Some(c.call_id.as_str()),
            _ => None,
        })
        .collect();
    let searches: Vec<_> = bodies
        .iter()
        .filter_map(|b| match b {
            EntryBody::ToolResult(r) if search_calls.contains(&r.call_id.as_str()) => Some(r),
            _ => None,
        })
        .collect();
    ensure!(searches.len() == 2, "two runbook searches: {searches:?}");
    ensure!(
        searches[0].cached.is_none() && searches[0].attempts >= 1,
        "{:?}",
        searches[0]
    );
    let origin = searches[1]
        .cached
        .as_ref()
        .context("the repeat came from the cache")?;
    ensure!(
        origin.run_id == run && origin.call_id == "1.0" && searches[1].attempts == 0,
        "{:?}",
        searches[1]
    );
    ensure!(
        !bodies
            .iter()
            .any(|b| matches!(b, EntryBody::ToolCallRequested(c) if c.tool == "contextos_deref")),
        "a dereference reaches no gateway"
    );
    // The conversation the checkpoints hold: each search with its alias, and the dereference
    // answered with the first search's content.
    let messages: Vec<Value> = bodies
        .iter()
        .filter_map(|b| match b {
            EntryBody::Checkpoint { state, .. } => state["new_messages"].as_array().cloned(),
            _ => None,
        })
        .flatten()
        .filter(|m| m["role"] == "tool")
        .collect();
    let aliased: Vec<&Value> = messages
        .iter()
        .filter(|m| m["read"]["name"] == RUNBOOKS_ALIAS)
        .collect();
    ensure!(
        aliased.len() == 3,
        "two searches and a dereference: {messages:#?}"
    );
    ensure!(
        aliased[2]["read"]["dereferenced"] == true && aliased[2]["content"] == aliased[0]["content"],
        "{messages:#?}"
    );
    ns.pass();
    Ok(())
}
