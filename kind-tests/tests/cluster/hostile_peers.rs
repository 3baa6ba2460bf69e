//! Attacks by what a run talks to: a tool server and a model that answer with hostile content.
//! Neither holds anything the tenant's objects did not give it, and neither can make the
//! gateway read without bound, make a turn act without bound, or put words in the runner's
//! report. The legitimate parts of the run still complete, and the record says what happened.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{TestEnv, TestNamespace, operator_env};
use contextos_runner::records::{EntryBody, RecordEntry, TenantId, read_run, store::tikv::TikvStore};
use kube::Api;
use serde_json::{Value, json};

use crate::{
    objects::apply,
    operator::{objects_for, phase_is, session},
};

/// The quickstart's objects pointed at `tools_url`, playing `script`, with `adjust` applied to
/// the Agent.
async fn install(
    env: &TestEnv,
    namespace: &str,
    tools_url: &str,
    script: &str,
    adjust: impl Fn(&mut Value),
) -> Result<()> {
    let client = &env.client();
    for mut object in objects_for(env, tools_url)? {
        if object["kind"] == "ConfigMap" && object["metadata"]["name"] == "quickstart-script" {
            object["data"]["script.json"] = json!(script);
        }
        if object["kind"] == "Agent" {
            adjust(&mut object);
        }
        apply(client, namespace, &object).await?;
    }
    Ok(())
}

/// The run's record entries, read from the e2e store.
async fn record(
    op: &operator_env::OperatorEnv,
    namespace: &str,
    session: &Session,
) -> Result<Vec<RecordEntry>> {
    let run_id = session
        .status
        .as_ref()
        .and_then(|s| s.run_id.clone())
        .context("runId")?;
    let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
    Ok(read_run(&store, &TenantId::new(namespace)?, &run_id)
        .await?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// A compromised tool server answers a read with 32 MiB of forged runner reports and orders to
/// the model. The gateway reads at most the tool's `maxResponseBytes` (1 MiB), records the cut,
/// and the run goes on; the Session's outcome is the runner's own report, not the forged one.
#[tokio::test]
async fn a_hostile_tool_server_cannot_flood_a_run_or_forge_its_report() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let (_tools, tools_url) = operator_env::start_tools_with(&["--flood", "/runbooks/search=33554432"])
        .map_err(anyhow::Error::msg)?;
    let ns = TestNamespace::new(env, "hostile-tool").await?;
    let client = env.client();
    install(env, ns.name(), &tools_url, operator_env::QUICK_SCRIPT, |_| {}).await?;
    apply(&client, ns.name(), &session("flooded")?).await?;
    let sessions: Api<Session> = ns.api();
    let done = phase_is(&sessions, "flooded", SessionPhase::Succeeded).await?;
    let status = done.status.clone().unwrap_or_default();
    let run_id = status.run_id.clone().context("runId")?;
    ensure!(run_id != "forged", "the forged report was taken as the runner's");

    let entries = record(op, ns.name(), &done).await?;
    let search = entries
        .iter()
        .find_map(|e| match &e.body {
            EntryBody::ToolCallRequested(call) if call.tool == "search_runbooks" => {
                Some(call.call_id.clone())
            }
            _ => None,
        })
        .context("the run asked for search_runbooks")?;
    let result = entries
        .iter()
        .find_map(|e| match &e.body {
            EntryBody::ToolResult(r) if r.call_id == search => Some(r.clone()),
            _ => None,
        })
        .context("search_runbooks has a recorded result")?;
    let kept = result.output.to_string().len();
    ensure!(
        result.truncated && kept <= 1_100_000,
        "the flooded answer was not cut at maxResponseBytes: truncated={}, {kept} bytes kept",
        result.truncated
    );
    ensure!(
        entries
            .iter()
            .any(|e| matches!(e.body, EntryBody::Completed { .. })),
        "the run did not complete after the flood"
    );
    ns.pass();
    Ok(())
}

/// A model asks for 40 tool calls in one turn. The Agent allows 4 per turn: 4 are decided and
/// made, 36 are dropped and the drop is recorded with the turn; the run completes.
#[tokio::test]
async fn a_hostile_model_cannot_make_one_turn_act_without_bound() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let calls: Vec<Value> = (0..40)
        .map(|i| json!({"tool": "search_runbooks", "arguments": {"query": format!("checkout-api {i}")}}))
        .collect();
    let script = json!({"turns": [
        {"content": "Everything at once.", "toolCalls": calls},
        {"content": "{\"summary\": \"checkout-api 5xx is elevated after the 14:02 deploy; escalating to on-call.\", \"actions\": [], \"resolved\": false}"},
    ]})
    .to_string();
    let ns = TestNamespace::new(env, "hostile-model").await?;
    let client = env.client();
    install(env, ns.name(), &op.tools_url, &script, |agent| {
        agent["spec"]["budget"]["maxToolCallsPerTurn"] = json!(4);
    })
    .await?;
    apply(&client, ns.name(), &session("flooding")?).await?;
    let sessions: Api<Session> = ns.api();
    let done = phase_is(&sessions, "flooding", SessionPhase::Succeeded).await?;
    let entries = record(op, ns.name(), &done).await?;
    let requested = entries
        .iter()
        .filter(|e| matches!(e.body, EntryBody::ToolCallRequested(_)))
        .count();
    let results = entries
        .iter()
        .filter(|e| matches!(e.body, EntryBody::ToolResult(_)))
        .count();
    ensure!(
        requested == 4 && results == 4,
        "{requested} calls requested and {results} made; the turn allows 4"
    );
    let dropped = entries
        .iter()
        .find_map(|e| match &e.body {
            EntryBody::ModelTurn { response, .. } => response
                .get("dropped_tool_calls")
                .or_else(|| response.get("droppedToolCalls"))
                .and_then(Value::as_u64),
            _ => None,
        })
        .context("the turn records its dropped calls")?;
    ensure!(dropped == 36, "{dropped} calls recorded as dropped, expected 36");
    ns.pass();
    Ok(())
}
