//! Model routing at the gateway service: when the chosen model's provider fails, the turn is
//! answered by the next model of the fallback, the record says which failed and why, and once a
//! model failed often enough its breaker skips it.

use contextos_runner::model::{ModelTurn, routing::Route};

use super::*;

/// `bundle` whose own model is an OpenAI-compatible endpoint nobody answers at, with a scripted
/// `backup` to fall back to (four turns that each call a read-only tool, then an answer).
fn failing_over(bundle: &RunBundle) -> RunBundle {
    let mut bundle = bundle.clone();
    let routing = serde_yaml::from_str(
        "models:\n- name: backup\n  model: {provider: scripted, model: backup-script, scriptRef: {name: scripts, key: backup}}\nfallback: [backup]\nbreaker: {failures: 2, openSeconds: 600}\n",
    )
    .expect("routing");
    bundle.agent_spec.routing = Some(routing);
    bundle.agent_spec.model = serde_yaml::from_str(
        "provider: openai_compatible\nmodel: gpt-unreachable\nendpoint: http://127.0.0.1:9/v1\n",
    )
    .expect("model");
    bundle.model_script = None;
    let turns: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({
                "content": format!("checking ({i})"),
                "toolCalls": [{"tool": "get_service_status", "arguments": {"service": format!("svc-{i}")}}],
            })
        })
        .chain([serde_json::json!({"content": "done"})])
        .collect();
    bundle
        .routed_scripts
        .insert("backup".into(), serde_json::json!({ "turns": turns }).to_string());
    bundle.agent_spec.critic.escalate_on.clear();
    bundle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_falls_back_to_the_next_model_and_the_record_says_why() {
    let rig = rig().await;
    let bundle = failing_over(&rig.bundle);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    let harness = Harness::through_gateway(&client, transit(), bundle.clone(), context).expect("harness");
    harness
        .start(RUN, TRACE, &mut |_| {})
        .await
        .expect("the run reports");
    let turns: Vec<(String, Route)> = rig
        .bodies()
        .await
        .into_iter()
        .filter_map(|b| match b {
            EntryBody::ModelTurn { model, response, .. } => {
                let turn: ModelTurn = serde_json::from_value(response).expect("a turn");
                Some((model, turn.route.expect("a routed turn says how")))
            }
            _ => None,
        })
        .collect();
    assert_eq!(turns.len(), 5, "every step answered: {turns:?}");
    for (i, (model, route)) in turns.iter().enumerate() {
        assert_eq!(model, "backup-script", "turn {i} is the backup's");
        assert_eq!(route.chosen, "primary");
        assert_eq!(route.reason, "no routing rule matched");
        assert_eq!(route.answered_by, "backup");
        assert_eq!(route.failed.len(), 1, "turn {i}: {route:?}");
        assert_eq!(route.failed[0].model, "primary");
        let error = &route.failed[0].error;
        if i < 2 {
            // The provider itself failed …
            assert!(error.contains("cannot be reached"), "turn {i}: {error}");
        } else {
            // … twice, and its breaker skips it for the rest of the run.
            assert!(error.contains("breaker is open"), "turn {i}: {error}");
        }
    }
}
