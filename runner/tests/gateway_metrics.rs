//! The gateway's metrics, counted exactly: this binary is its own process with one test, so
//! the process-wide registry holds only what this test does — calls answered, failed (dead
//! lettered, opening the endpoint's circuit) and refused by the open circuit, a denied call, and
//! the appends that recorded them — and the exposition is OpenMetrics text.

use std::{collections::BTreeMap, time::Duration};

use contextos_crds::{
    Policy,
    common::{SafetyMode, ToolKind, ToolRisk},
};
use contextos_runner::{
    gateway::{CallOutcome, CatalogTool, ToolGateway, envelope::CallEnvelope, metrics},
    keys::KeyPair,
    policy::{PolicySet, StateFacts, compile_policy},
    records::{EmbeddedStore, PinnedDigests, Recorder, RunStart, TenantId},
    run_context::{AgentIdentity, RunContext, SignedRunContext},
};
use serde_json::json;

const RUN: &str = "run-metrics";

fn tool(name: &str, url: &str) -> CatalogTool {
    let yaml = format!(
        "{{name: {name}, description: d, risk: read_only, kind: observe, adapter: {{http: {{url: '{url}', method: GET}}}}}}"
    );
    CatalogTool::new(serde_yaml::from_str(&yaml).expect("tool")).expect("valid")
}

fn run_context(key: &KeyPair) -> SignedRunContext {
    let now = contextos_runner::records::recorder::now_ms();
    SignedRunContext::sign(
        RunContext {
            run_id: RUN.into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            session_id: "metrics".into(),
            tenant_id: "ops".into(),
            user: None,
            agent: AgentIdentity::new("ops", "probe"),
            safety_mode: SafetyMode::Autonomous,
            budget: contextos_crds::common::RunBudget {
                max_steps: 10,
                max_tokens: 10_000,
                max_tool_calls: 50,
                max_wall_seconds: 600,
                max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            },
            pinned: PinnedDigests::default(),
            allowed_tools: ["up", "down", "forbidden"].map(str::to_owned).to_vec(),
            issued_at_ms: now,
            expires_at_ms: now + 600_000,
            pod: None,
            session_uid: None,
            bundle_digest: None,
            subject: None,
            trace_sampled: None,
        },
        key,
    )
}

/// The value of each sample line of `text`, by its name and labels.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn calls_decisions_breakers_dead_letters_and_appends_are_counted_once_each() {
    // An endpoint that answers, and one nothing listens on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = format!("http://{}/status", listener.local_addr().expect("address"));
    tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
        listener,
        axum::Router::new().route(
            "/status",
            axum::routing::get(|| async { axum::Json(json!({"ok": true})) }),
        ),
    )));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down = format!("http://{}/status", closed.local_addr().expect("address"));
    drop(closed);

    let policy: Policy = serde_yaml::from_str(
        "{apiVersion: contextos.dev/v1alpha1, kind: Policy, metadata: {name: p}, spec: {defaultEffect: allow, rules: [{name: no-forbidden, condition: \"call.tool == 'forbidden'\", effect: deny, reason: never}]}}",
    )
    .expect("policy");
    let key = KeyPair::from_seed([29; 32]);
    let gateway = ToolGateway::new(
        "ops",
        "probe",
        key.public(),
        vec![tool("up", &up), tool("down", &down), tool("forbidden", &up)],
        PolicySet {
            policies: vec![compile_policy("p", &policy.spec).expect("compiles")],
        },
        Default::default(),
    )
    // One failure opens an endpoint's circuit.
    .with_breakers(1, Duration::from_secs(600));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
    let tenant = TenantId::new("ops").expect("tenant");
    let start = RunStart {
        run_id: RUN.into(),
        session_id: "metrics".into(),
        agent: "probe".into(),
        run_context: json!({}),
        pinned: PinnedDigests::default(),
        bundle: None,
    };
    let mut rec = Recorder::start(&store, tenant, key.clone(), start)
        .await
        .expect("recorder");
    let signed = run_context(&key);
    let mut outcomes = Vec::new();
    for (i, name) in ["up", "down", "down", "forbidden"].into_iter().enumerate() {
        let call = CallEnvelope {
            call_id: format!("1.{i}"),
            tool: name.into(),
            arguments: json!({}),
            risk: ToolRisk::ReadOnly,
            kind: ToolKind::Observe,
            idempotency_key: format!("idem-{i}"),
            traceparent: String::new(),
            run_context: signed.clone(),
            approval: None,
            resolution: None,
        };
        let outcome = gateway
            .handle(&call, &mut rec, &StateFacts::default())
            .await
            .expect("handled");
        outcomes.push(match outcome {
            CallOutcome::Executed(result) => result.ok.to_string(),
            CallOutcome::Denied { rule, .. } => rule,
            other => format!("{other:?}"),
        });
    }
    assert_eq!(outcomes, ["true", "false", "false", "p/no-forbidden"]);

    let text = metrics::gateway().render();
    let got = samples(&text);
    let value = |series: &str| got.get(series).copied().unwrap_or(0.0);
    for (series, expected) in [
        (
            "contextos_gateway_decision_duration_seconds_count{effect=\"allow\"}",
            3.0,
        ),
        (
            "contextos_gateway_decision_duration_seconds_count{effect=\"deny\"}",
            1.0,
        ),
        (
            "contextos_tool_call_duration_seconds_count{adapter=\"http\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "contextos_tool_call_duration_seconds_count{adapter=\"http\",outcome=\"failed\"}",
            1.0,
        ),
        (
            "contextos_tool_call_duration_seconds_count{adapter=\"http\",outcome=\"refused\"}",
            1.0,
        ),
        ("contextos_circuits_opened_total{adapter=\"http\"}", 1.0),
        ("contextos_circuit_refusals_total{adapter=\"http\"}", 1.0),
        ("contextos_tool_dead_letters_total", 2.0),
    ] {
        assert_eq!(value(series), expected, "{series}\n{text}");
    }
    // Every handled call was written (the run's start too), each write timed once.
    let appends = value("contextos_record_append_duration_seconds_count");
    assert!((4.0..=8.0).contains(&appends), "{appends} appends\n{text}");
    assert!(
        !text.contains("# EOF"),
        "the gateway service closes the exposition itself"
    );
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        assert!(
            !line.contains("_total "),
            "OpenMetrics names a counter family without _total: {line}"
        );
    }
}
