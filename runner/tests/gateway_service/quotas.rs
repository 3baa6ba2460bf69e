//! SpendQuotas at the gateway service: a runaway loop stops at the tenant's exact limit with
//! two replicas serving two runs at once; a team's narrower quota applies first; a quota that
//! says so holds calls until its window allows them; spend stops within one turn's cost of its
//! limit; an unpriced model is never counted as free.

use contextos_crds::{SpendQuota, SpendQuotaSpec};
use contextos_runner::{
    pricing::{Nanos, PinnedPrice, PinnedToolPrice},
    records::entry::UnansweredSpend,
    run::RunReport,
};

use super::*;

/// A SpendQuota `name` of namespace shop with `spec` (YAML).
fn spend_quota(name: &str, spec: &str) -> SpendQuota {
    let spec: SpendQuotaSpec = serde_yaml::from_str(spec).expect("quota spec");
    let mut quota = SpendQuota::new(name, spec);
    quota.metadata.namespace = Some("shop".into());
    quota.metadata.uid = Some(format!("uid-{name}"));
    quota
}

/// `bundle` with a model that never stops asking for a read-only tool (one call a turn, each
/// with new arguments), and budgets far above any quota here.
fn runaway(bundle: &RunBundle) -> RunBundle {
    let mut bundle = bundle.clone();
    let turns: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            serde_json::json!({
                "content": format!("let me check once more ({i})"),
                "toolCalls": [{"tool": "get_service_status", "arguments": {"service": format!("svc-{i}")}}],
            })
        })
        .collect();
    bundle.model_script = Some(serde_json::json!({ "turns": turns }).to_string());
    bundle.agent_spec.budget.max_tool_calls = 200;
    bundle.agent_spec.budget.max_steps = 60;
    bundle.agent_spec.budget.max_tokens = 10_000_000;
    // A loop nobody stops but the quota: its failing checks are no reason to escalate here.
    bundle.agent_spec.critic.escalate_on.clear();
    bundle
}

/// Runs `bundle` as run `run_id` of pod `pod` (token `token`) through the service at `url`.
async fn run_through(
    rig: &Rig,
    url: &str,
    token: &str,
    pod: &str,
    run_id: &str,
    bundle: &RunBundle,
) -> RunReport {
    let now = contextos_runner::records::recorder::now_ms();
    let context = issue_run_context(bundle, run_id, TRACE, Some(pod), &rig.operator, now).expect("context");
    let client = GatewayClient::new(url, TokenSource::Fixed(token.into()), &context).expect("client");
    let harness = Harness::through_gateway(&client, transit(), bundle.clone(), context).expect("harness");
    harness
        .start(run_id, TRACE, &mut |_| {})
        .await
        .expect("the run reports")
}

/// The bodies of run `run_id`.
async fn bodies_of(rig: &Rig, run_id: &str) -> Vec<EntryBody> {
    read_run(&*rig.store, &rig.tenant(), run_id)
        .await
        .expect("record")
        .into_iter()
        .map(|(_, e)| e.body)
        .collect()
}

fn results(bodies: &[EntryBody]) -> usize {
    bodies
        .iter()
        .filter(|b| matches!(b, EntryBody::ToolResult(_)))
        .count()
}

/// The rule and reason of the run's quota refusal on record.
fn quota_refusal(bodies: &[EntryBody]) -> Option<(String, String)> {
    bodies.iter().find_map(|b| match b {
        EntryBody::PolicyDecision(d) if d.rule.starts_with("quota/") => {
            Some((d.rule.clone(), d.reason.clone()))
        }
        _ => None,
    })
}

/// Runs `bundle` as Session `other`'s run (other-r1) through the second replica, which a
/// SpendQuota must stop: the message it failed with.
async fn other_run_stopped_by_quota(rig: &Rig, bundle: &RunBundle) -> String {
    let report = run_through(
        rig,
        &rig.replica,
        "token-other",
        "other-run-1",
        "other-r1",
        bundle,
    )
    .await;
    let (reason, message) = failed_with(&report);
    assert_eq!(reason, "QuotaExceeded", "{message}");
    message.to_owned()
}

fn failed_with(report: &RunReport) -> (&str, &str) {
    match &report.outcome {
        RunOutcome::Failed { reason, message } => (reason.as_str(), message.as_str()),
        other => panic!("expected the run to fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_loop_stops_at_the_tenants_exact_limit_with_two_replicas_serving_two_runs_at_once() {
    let rig = rig().await;
    rig.tenants.set_quotas(
        "shop",
        vec![spend_quota("tenant", "limits:\n- window: hour\n  toolCalls: 7\n")],
    );
    let first = runaway(&rig.bundle);
    let second = other_session(&first, &[]);
    // Two runs of the tenant, each through its own replica, at the same time.
    let (a, b) = tokio::join!(
        run_through(&rig, &rig.url, "token-run-1", "checkout-5xx-run-1", RUN, &first),
        run_through(
            &rig,
            &rig.replica,
            "token-other",
            "other-run-1",
            "other-r1",
            &second
        ),
    );
    let (a_bodies, b_bodies) = (bodies_of(&rig, RUN).await, bodies_of(&rig, "other-r1").await);
    // Exactly the limit between them: neither replica let a call through the other had filled.
    assert_eq!(
        results(&a_bodies) + results(&b_bodies),
        7,
        "tool calls made by the two runs"
    );
    for (report, bodies) in [(&a, &a_bodies), (&b, &b_bodies)] {
        let (reason, message) = failed_with(report);
        assert_eq!(reason, "QuotaExceeded");
        assert!(
            message.contains("SpendQuota tenant: toolCalls in the last hour is 7 of its limit 7"),
            "{message}"
        );
        // The refusal is on record, naming the quota.
        let (rule, _) = quota_refusal(bodies).expect("the refusal is recorded");
        assert_eq!(rule, "quota/tenant");
    }
    // The quota's status says so, and Events fired at 80 % and 100 %.
    let mut reported = None;
    for _ in 0..100 {
        reported = rig
            .tenants
            .quota_reports()
            .into_iter()
            .rev()
            .find(|(_, quota, r)| quota == "tenant" && r.usage.first().is_some_and(|u| u.used == "7"));
        if reported.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, _, report) = reported.expect("a report with the final usage");
    assert_eq!(report.usage[0].percent, 100);
    assert_eq!(report.summary.tool_calls.as_deref(), Some("7/7 (hour)"));
    // Each once, whichever replica made the charge that crossed it — which may report after
    // the other replica reported the final usage.
    let events = || {
        let mut events: Vec<String> = rig
            .tenants
            .quota_reports()
            .into_iter()
            .flat_map(|(_, _, r)| r.events)
            .map(|(reason, _)| reason)
            .collect();
        events.sort();
        events
    };
    for _ in 0..100 {
        if events().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(events(), ["QuotaNearlyReached", "QuotaReached"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_quota_narrower_than_the_tenants_applies_first_and_only_to_the_team() {
    let rig = rig().await;
    rig.tenants.set_quotas(
        "shop",
        vec![
            spend_quota("tenant", "limits:\n- window: day\n  toolCalls: 50\n"),
            spend_quota(
                "team-payments",
                "sessionSelector:\n  matchLabels: {team: payments}\nlimits:\n- window: hour\n  toolCalls: 3\n",
            ),
        ],
    );
    let mut payments = runaway(&rig.bundle);
    payments.session_labels = [("team".to_owned(), "payments".to_owned())].into();
    let report = run_through(
        &rig,
        &rig.url,
        "token-run-1",
        "checkout-5xx-run-1",
        RUN,
        &payments,
    )
    .await;
    let bodies = bodies_of(&rig, RUN).await;
    assert_eq!(failed_with(&report).0, "QuotaExceeded");
    assert_eq!(results(&bodies), 3);
    assert_eq!(quota_refusal(&bodies).expect("recorded").0, "quota/team-payments");
    // Another team's run answers to the tenant's quota only: it makes more calls than the team
    // may (until the Agent's own policy stops the loop).
    let search = other_session(&runaway(&rig.bundle), &[("team", "search")]);
    let report = run_through(
        &rig,
        &rig.replica,
        "token-other",
        "other-run-1",
        "other-r1",
        &search,
    )
    .await;
    let bodies = bodies_of(&rig, "other-r1").await;
    assert!(
        !matches!(&report.outcome, RunOutcome::Failed { reason, .. } if reason == "QuotaExceeded"),
        "{:?}",
        report.outcome
    );
    assert!(results(&bodies) > 3, "{:?}", report.outcome);
    assert!(quota_refusal(&bodies).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_that_waits_holds_the_call_until_the_limit_allows_it() {
    let rig = rig().await;
    let waiting = |calls: u32| {
        spend_quota(
            "tenant",
            &format!("whenWindowFull: Wait\nlimits:\n- window: hour\n  toolCalls: {calls}\n"),
        )
    };
    rig.tenants.set_quotas("shop", vec![waiting(2)]);
    let mut bundle = runaway(&rig.bundle);
    bundle.model_script = Some(
        serde_json::json!({"turns": (0..3).map(|i| serde_json::json!({
            "content": format!("check {i}"),
            "toolCalls": [{"tool": "get_service_status", "arguments": {"service": format!("svc-{i}")}}],
        })).chain([serde_json::json!({"content": "done"})]).collect::<Vec<_>>()})
        .to_string(),
    );
    let run = {
        let (rig, bundle) = (&rig, &bundle);
        async move { run_through(rig, &rig.url, "token-run-1", "checkout-5xx-run-1", RUN, bundle).await }
    };
    let raise = async {
        // The third call waits; nothing about it is recorded while it does.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let bodies = rig.bodies_if_started().await;
        assert_eq!(results(&bodies), 2, "two calls made, the third held");
        assert!(quota_refusal(&bodies).is_none(), "a held call is not refused");
        // An admin raises the limit: the held call goes ahead.
        rig.tenants.set_quotas("shop", vec![waiting(3)]);
    };
    let (report, ()) = tokio::join!(run, raise);
    // It ran on once the limit allowed (its output is the validators' to judge).
    assert!(
        !matches!(&report.outcome, RunOutcome::Failed { reason, .. } if reason == "QuotaExceeded"),
        "{:?}",
        report.outcome
    );
    let bodies = bodies_of(&rig, RUN).await;
    assert_eq!(results(&bodies), 3);
    assert!(quota_refusal(&bodies).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_stops_within_one_turns_cost_of_its_limit_and_an_unpriced_model_is_never_free() {
    let rig = rig().await;
    rig.tenants.set_quotas(
        "shop",
        vec![spend_quota(
            "money",
            "limits:\n- window: day\n  spend: {amount: \"0.004\", currency: USD}\n",
        )],
    );
    let bundle = runaway(&rig.bundle);
    // Unpriced, the first turn is refused: it would otherwise be counted as free.
    let report = run_through(&rig, &rig.url, "token-run-1", "checkout-5xx-run-1", RUN, &bundle).await;
    let (reason, message) = failed_with(&report);
    assert_eq!(reason, "QuotaExceeded");
    assert!(message.contains("has no price"), "{message}");
    let bodies = bodies_of(&rig, RUN).await;
    assert_eq!(results(&bodies), 0);
    // The gateway ended the run on record (the runner writes nothing after a quota's refusal).
    assert!(
        matches!(bodies.last(), Some(EntryBody::Failed { reason, message })
            if reason == "QuotaExceeded" && message.contains("has no price")),
        "{:?}",
        bodies.last()
    );
    // Priced at 1 USD per million tokens either way.
    let mut priced = other_session(&bundle, &[]);
    priced.model_price = Some(PinnedPrice {
        price_list: "test".into(),
        currency: "USD".into(),
        input_per_million: Nanos::parse("1").expect("price"),
        output_per_million: Nanos::parse("1").expect("price"),
        cached_input_per_million: Nanos::parse("1").expect("price"),
    });
    let message = other_run_stopped_by_quota(&rig, &priced).await;
    assert!(
        message.contains("SpendQuota money: spend in the last day"),
        "{message}"
    );
    let costs: Vec<u64> = bodies_of(&rig, "other-r1")
        .await
        .iter()
        .filter_map(|b| match b {
            EntryBody::ModelTurn { cost, .. } => cost.as_ref().map(|c| c.nanos.0),
            _ => None,
        })
        .collect();
    let limit = 4_000_000;
    let spent: u64 = costs.iter().sum();
    let last = costs.last().copied().unwrap_or_default();
    assert!(costs.len() > 1, "several turns fit: {costs:?}");
    assert!(
        spent >= limit,
        "stopped only once the limit was reached: {spent} of {limit}"
    );
    assert!(
        spent - last < limit,
        "the last turn was admitted below the limit, and none after it: {costs:?}"
    );
}

/// A model endpoint that takes the request and hangs up without answering (as one cut off
/// while it generates).
async fn hanging_up_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncReadExt as _;
            let mut request = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut request).await;
            drop(socket);
        }
    });
    url
}

/// What `service`'s metrics listener serves.
async fn scrape(service: &Service) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
        listener,
        service.metrics_router(),
    )));
    reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
}

/// `bundle` asking the OpenAI-compatible endpoint at `endpoint` as model `model`, with an
/// output limit of 500 tokens and no script.
fn at_endpoint(bundle: &RunBundle, model: &str, endpoint: &str) -> RunBundle {
    let mut bundle = bundle.clone();
    bundle.agent_spec.model = serde_yaml::from_str(&format!(
        "provider: openai_compatible\nmodel: {model}\nendpoint: {endpoint}\nmaxOutputTokens: 500\n"
    ))
    .expect("model");
    bundle.model_script = None;
    bundle
}

/// A runner's request for a turn of `bundle`'s Agent asking `question`.
fn asking(bundle: &RunBundle, question: &str) -> ModelRequest {
    ModelRequest {
        model: "m".into(),
        messages: vec![Message::new(Role::User, question)],
        tools: agent_tools(&bundle.agent_spec),
        max_output_tokens: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_turn_cut_off_after_it_was_sent_spends_what_it_held_and_asking_again_is_never_free() {
    use contextos_runner::quota::{ActiveQuota, book};
    let rig = rig().await;
    let quota = spend_quota("tenant", "limits:\n- window: day\n  tokens: 1000000000\n");
    rig.tenants.set_quotas("shop", vec![quota.clone()]);
    let bundle = at_endpoint(&rig.bundle, "gpt-cut-off", &hanging_up_endpoint().await);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    let request = asking(&bundle, "write a very long essay");
    let active = ActiveQuota::compile(&quota).expect("quota");
    let used = || async {
        book::usage(
            &*rig.store,
            &rig.tenant(),
            &active,
            contextos_runner::records::recorder::now_ms(),
        )
        .await
        .expect("usage")[0]
            .1
    };
    let mut spent = Vec::new();
    for _ in 0..3 {
        client.model(&request, 1).await.expect_err("no answer");
        spent.push(used().await);
    }
    // Each attempt spent its hold: the prompt at a token a byte and the whole output limit.
    assert!(spent[0] >= 500, "{spent:?}");
    assert_eq!(spent[1], 2 * spent[0], "{spent:?}");
    assert_eq!(spent[2], 3 * spent[0], "{spent:?}");
}

/// A model endpoint that hangs up on the first `cut_offs` requests, then answers each with a
/// short completion reporting 10 + 5 tokens.
async fn answering_after(cut_offs: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut seen = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut request = vec![0u8; 256 * 1024];
            let _ = socket.read(&mut request).await;
            seen += 1;
            if seen <= cut_offs {
                continue;
            }
            let body = serde_json::json!({
                "id": "c", "object": "chat.completion", "model": "gpt-flaky",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "done"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            })
            .to_string();
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_cut_off_again_and_again_spends_the_runs_own_token_budget_without_any_quota() {
    // No SpendQuota: the run's maxTokens alone must stop a runner that asks a model which
    // keeps being cut off mid-turn. Before, such attempts were charged to quotas only, and a
    // run without one could ask without end. Each counts its prompt as estimated and the
    // model's own output limit.
    let rig = rig().await;
    let mut bundle = at_endpoint(&rig.bundle, "gpt-cut-off", &hanging_up_endpoint().await);
    let request = asking(&bundle, "write a very long essay");
    let estimate = contextos_runner::model::estimated_tokens(&request);
    let attempt = estimate + 500;
    // Room for three attempts, not a fourth.
    bundle.agent_spec.budget.max_tokens = 3 * attempt + estimate - 1;
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    // (The client itself asks again after a model failed: count attempts by what they used.)
    let mut refusals = Vec::new();
    for _ in 0..10 {
        let refusal = client
            .model(&request, 1)
            .await
            .expect_err("no answer")
            .to_string();
        let over_budget = refusal.contains("tokens and this prompt needs");
        refusals.push(refusal);
        if over_budget {
            break;
        }
    }
    let used = format!("has used {} of its", 3 * attempt);
    assert!(
        refusals.last().is_some_and(|r| r.contains(&used)),
        "three attempts, then the run's budget: {refusals:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_cut_off_go_on_record_with_the_runs_next_turn() {
    // Written when they happened, the gateway's entries would move the head under a runner
    // whose own entries are still on their way: they wait for the next turn, and go after
    // what the runner sends with it.
    let rig = rig().await;
    let bundle = at_endpoint(&rig.bundle, "gpt-flaky", &answering_after(2).await);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    let request = asking(&bundle, "what is wrong with checkout-api?");
    // Two attempts cut off, then answered (the client asks again by itself, or the test does).
    let mut answered = None;
    for _ in 0..3 {
        if let Ok(turn) = client.model(&request, 1).await {
            answered = Some(turn);
            break;
        }
    }
    let turn = answered.expect("answered after two cut-offs");
    assert_eq!(turn.content, "done");
    let estimate = contextos_runner::model::estimated_tokens(&request);
    let kinds: Vec<(&str, u64)> = bodies_of(&rig, RUN)
        .await
        .iter()
        .filter_map(|b| match b {
            EntryBody::ModelSpend {
                tokens,
                reason: UnansweredSpend::CutOff,
                model,
                ..
            } if model == "gpt-flaky" => Some(("cut off", *tokens)),
            EntryBody::ModelTurn { .. } => Some(("turn", 0)),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("cut off", estimate + 500),
            ("cut off", estimate + 500),
            ("turn", 0)
        ]
    );
    // Once on record, the replica's metrics count them, a kind of tokens of their own.
    let unanswered = format!(
        "contextos_model_tokens_total{{tenant=\"shop\",agent=\"oncall-assistant\",model=\"gpt-flaky\",kind=\"unanswered\"}} {}",
        2 * (estimate + 500)
    );
    let metrics = scrape(&rig.services[0]).await;
    assert!(
        metrics.lines().any(|l| l == unanswered),
        "{unanswered} missing from:\n{metrics}"
    );
    let shop = TenantKeys::new(&KeyPair::from_seed([12; 32]))
        .for_tenant("shop")
        .public();
    verify_run(&*rig.store, &rig.tenant(), RUN, &shop)
        .await
        .unwrap_or_else(|e| panic!("the chain verifies: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_ignores_a_quotas_refusal_is_served_nothing_more_the_run_ended_on_record() {
    let rig = rig().await;
    rig.tenants.set_quotas(
        "shop",
        vec![spend_quota("tenant", "limits:\n- window: hour\n  toolCalls: 1\n")],
    );
    let context = rig.context(&rig.bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &rig.bundle, &context).await;
    let call = |i: usize| {
        let mut call = search(&context);
        call.call_id = format!("{i}.0");
        call.idempotency_key = format!("search-{i}");
        call
    };
    let first = client
        .call(&call(1), &Default::default())
        .await
        .expect("answered");
    assert!(matches!(first, CallOutcome::Executed(_)), "{first:?}");
    let second = client
        .call(&call(2), &Default::default())
        .await
        .expect("answered");
    assert!(
        matches!(&second, CallOutcome::Denied { rule, .. } if rule == "quota/tenant"),
        "{second:?}"
    );
    // Written by the gateway, after the refusal: the run's end, naming the quota.
    let bodies = bodies_of(&rig, RUN).await;
    assert!(
        matches!(bodies.last(), Some(EntryBody::Failed { reason, message })
            if reason == "QuotaExceeded" && message.contains("SpendQuota tenant")),
        "{:?}",
        bodies.last()
    );
    // A runner that goes on as if nothing happened (a hostile one) is refused: the run ended.
    let third = client.call(&call(3), &Default::default()).await;
    assert!(
        matches!(&third, Err(e) if e.to_string().contains("the run has ended")),
        "{third:?}"
    );
    assert_eq!(results(&bodies_of(&rig, RUN).await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_cut_off_before_the_fallback_answered_is_charged_beside_the_answer() {
    use contextos_runner::quota::{ActiveQuota, book};
    let rig = rig().await;
    let quota = spend_quota("tenant", "limits:\n- window: day\n  tokens: 1000000000\n");
    rig.tenants.set_quotas("shop", vec![quota.clone()]);
    // The Agent's own model hangs up mid-turn; a scripted backup answers.
    let mut bundle = at_endpoint(&rig.bundle, "gpt-cut-off", &hanging_up_endpoint().await);
    bundle.agent_spec.routing = Some(
        serde_yaml::from_str(
            "models:\n- name: backup\n  model: {provider: scripted, model: backup-script, scriptRef: {name: scripts, key: backup}}\nfallback: [backup]\n",
        )
        .expect("routing"),
    );
    bundle.routed_scripts.insert(
        "backup".into(),
        serde_json::json!({"turns": [{"content": "the backup's answer"}]}).to_string(),
    );
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    let request = asking(&bundle, "write a very long essay");
    let turn = client.model(&request, 1).await.expect("the backup answered");
    let route = turn.route.clone().expect("routed");
    assert_eq!(route.answered_by, "backup");
    assert!(route.failed[0].may_have_cost, "{route:?}");
    let active = ActiveQuota::compile(&quota).expect("quota");
    // The answer's tokens, and the cut-off attempt as it was held: its prompt at a token a byte
    // and its whole output limit. The service settles the turn after it answers: read until it
    // has (bounded), then exactly.
    let held = contextos_runner::model::most_prompt_tokens(&request) + 500;
    let expected = turn.prompt_tokens + turn.completion_tokens + held;
    let mut used = 0;
    for _ in 0..100 {
        used = book::usage(
            &*rig.store,
            &rig.tenant(),
            &active,
            contextos_runner::records::recorder::now_ms(),
        )
        .await
        .expect("usage")[0]
            .1;
        if used == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(used, expected, "{turn:?}");
    // On record after the turn the backup gave: the primary cut off, counted against the
    // run's budget at its prompt as estimated and its own output limit.
    let estimate = contextos_runner::model::estimated_tokens(&request);
    let bodies = bodies_of(&rig, RUN).await;
    let after_turn: Vec<&EntryBody> = bodies
        .iter()
        .skip_while(|b| !matches!(b, EntryBody::ModelTurn { .. }))
        .skip(1)
        .collect();
    assert!(
        matches!(after_turn.as_slice(), [EntryBody::ModelSpend { model, tokens, reason: UnansweredSpend::CutOff, .. }]
            if model == "gpt-cut-off" && *tokens == estimate + 500),
        "{after_turn:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priced_tools_calls_are_charged_at_their_pinned_price_and_stop_at_the_money_limit() {
    let rig = rig().await;
    rig.tenants.set_quotas(
        "shop",
        vec![spend_quota(
            "money",
            "limits:\n- window: hour\n  spend: {amount: \"0.025\", currency: USD}\n",
        )],
    );
    let free = PinnedPrice {
        price_list: "test".into(),
        currency: "USD".into(),
        input_per_million: Nanos(0),
        output_per_million: Nanos(0),
        cached_input_per_million: Nanos(0),
    };
    let tool_price = |currency: &str| PinnedToolPrice {
        price_list: "tools".into(),
        currency: currency.into(),
        per_call: Nanos::parse("0.01").expect("price"),
    };
    // The model costs nothing; each status check costs 0.01 USD.
    let mut bundle = runaway(&rig.bundle);
    bundle.model_price = Some(free.clone());
    bundle
        .tool_prices
        .insert("get_service_status".into(), tool_price("USD"));
    let report = run_through(&rig, &rig.url, "token-run-1", "checkout-5xx-run-1", RUN, &bundle).await;
    let (reason, message) = failed_with(&report);
    assert_eq!(reason, "QuotaExceeded");
    assert!(
        message.contains("SpendQuota money: spend in the last hour is 0.02 of its limit 0.025"),
        "{message}"
    );
    let bodies = bodies_of(&rig, RUN).await;
    // Two calls fit under 0.025; the third would pass it and is refused before it is made.
    let costs: Vec<_> = bodies
        .iter()
        .filter_map(|b| match b {
            EntryBody::ToolResult(r) => Some(r.cost.clone()),
            _ => None,
        })
        .collect();
    let cent = contextos_runner::pricing::TurnCost {
        currency: "USD".into(),
        nanos: Nanos(10_000_000),
    };
    assert_eq!(
        costs,
        vec![Some(cent.clone()), Some(cent)],
        "each result records its cost"
    );
    assert_eq!(
        quota_refusal(&bodies).expect("refused on record").0,
        "quota/money"
    );
    // The replica's metrics count the two calls and what they cost.
    let metrics = scrape(&rig.services[0]).await;
    assert!(
        metrics.lines().any(|l| l
            == "contextos_tool_spend_total{tenant=\"shop\",agent=\"oncall-assistant\",tool=\"get_service_status\",currency=\"USD\"} 0.02"),
        "{metrics}"
    );
    // Next to the spend, how the calls went (this process's, at least these two).
    let count = |series: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        count("contextos_tool_call_duration_seconds_count{adapter=\"mcp\",outcome=\"ok\"}") >= 2,
        "{metrics}"
    );
    assert!(
        count("contextos_gateway_decision_duration_seconds_count{effect=\"allow\"}") >= 2,
        "{metrics}"
    );
    assert!(
        count("contextos_record_append_duration_seconds_count") >= 1,
        "{metrics}"
    );

    // A tool priced in another currency than the quota counts cannot be counted: refused, never
    // made as if free.
    let mut euros = other_session(&bundle, &[]);
    euros
        .tool_prices
        .insert("get_service_status".into(), tool_price("EUR"));
    let message = other_run_stopped_by_quota(&rig, &euros).await;
    assert!(
        message.contains("counts it in USD, but the tool is priced in EUR"),
        "{message}"
    );
    assert_eq!(results(&bodies_of(&rig, "other-r1").await), 0);
}

/// The tokens `quota` of namespace shop counts in its hour now.
async fn tokens_used(rig: &Rig, quota: &SpendQuota) -> u64 {
    let active = contextos_runner::quota::ActiveQuota::compile(quota).expect("compiles");
    let now = contextos_runner::records::recorder::now_ms();
    contextos_runner::quota::book::usage(&*rig.store, &rig.tenant(), &active, now)
        .await
        .expect("usage")
        .iter()
        .find(|(limit, _)| limit.resource == contextos_runner::quota::Resource::Tokens)
        .map(|(_, used)| *used)
        .expect("a token limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_gates_re_executed_turns_are_the_tenants_spend_and_its_quota_stops_them() {
    use contextos_runner::run::{
        bundle::spec_digest,
        gate::{GATE_PATH, GateOrder, GatedKind, SignedGateVerdict},
    };
    let rig = rig().await;
    // A run to judge: the runaway, ended by the tenant's quota after three calls.
    let roomy = spend_quota(
        "tenant",
        "limits:\n- window: hour\n  tokens: 10000000\n  toolCalls: 3\n",
    );
    rig.tenants.set_quotas("shop", vec![roomy.clone()]);
    let bundle = runaway(&rig.bundle);
    let report = run_through(&rig, &rig.url, "token-run-1", "checkout-5xx-run-1", RUN, &bundle).await;
    assert_eq!(failed_with(&report).0, "QuotaExceeded");
    let before = tokens_used(&rig, &roomy).await;
    assert!(before > 0);

    // A Policy gate (the same policy) that re-executes each run once.
    let policy = bundle.policies[0].clone();
    let candidate = serde_json::json!({
        "apiVersion": "contextos.dev/v1alpha1", "kind": "Policy",
        "metadata": {"name": policy.name}, "spec": policy.spec,
    });
    let replay = contextos_crds::common::ReplaySpec {
        reexecute: Some(contextos_crds::common::ReexecuteSpec {
            samples: 1,
            max_tokens: None,
        }),
        ..Default::default()
    };
    let order = GateOrder {
        kind: GatedKind::Policy,
        name: policy.name.clone(),
        candidate_digest: spec_digest(&policy.spec),
        replay,
        expected: Vec::new(),
        prices: Default::default(),
        round: None,
    };
    let gate = |job: &'static str| {
        let reader = replay_reader(&rig, job, Some(order.clone()));
        let candidate = candidate.clone();
        let key = rig.keys.for_tenant("shop").public();
        async move {
            let signed: SignedGateVerdict = reader.post_json(GATE_PATH, &candidate).await.expect("a verdict");
            signed.verify(&key).expect("signed").gate.clone()
        }
    };
    let judged = gate("replay-policy-guardrails-0123456789").await;
    let tokens = judged.reexecution.as_ref().expect("re-executed").tokens;
    assert!(tokens > 0, "{judged:?}");
    // Every token the gate's turns took is in the quota's ledger, exactly.
    let after = tokens_used(&rig, &roomy).await;
    assert_eq!(after - before, tokens, "the gate's turns are the tenant's spend");

    // With the window full, the gate asks the model nothing and fails, naming the quota.
    let full = spend_quota(
        "tenant",
        &format!("limits:\n- window: hour\n  tokens: {after}\n  toolCalls: 3\n"),
    );
    rig.tenants.set_quotas("shop", vec![full.clone()]);
    // Quotas are read again within 2 s.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let refused = gate("replay-policy-guardrails-0123456789").await;
    // Refused, not "no history": a first revision with no history would be promoted.
    assert!(!refused.passed && !refused.no_history, "{refused:?}");
    assert!(
        refused.top.iter().any(|line| line
            .contains("re-execution stopped after 0 run(s): SpendQuota tenant: tokens in the last hour")),
        "{refused:?}"
    );
    assert_eq!(tokens_used(&rig, &full).await, after, "nothing more was spent");
}
