//! Gateway overhead: the same read-only call to a local HTTP tool server, sent directly with an
//! HTTP client and sent through the Tool Gateway (RunContext verification, schema check, policy
//! decision, execution, and the durable record of request, decision and result), in one run.
//!
//! Run: `cargo bench -p contextos-runner --bench gateway`. Target: added p50 ≤ 300 µs.

use std::time::{Duration, Instant};

use axum::{Json, Router, routing::get};
use contextos_crds::{
    agent::Tool,
    common::{RunBudget, SafetyMode, ToolKind, ToolRisk},
    policy::PolicySpec,
};
use contextos_runner::{
    gateway::{CallOutcome, CatalogTool, ToolGateway, envelope::CallEnvelope},
    keys::KeyPair,
    policy::{PolicySet, StateFacts, compile_policy},
    records::{EmbeddedStore, PinnedDigests, Recorder, RunStart, TenantId, recorder::now_ms},
    run_context::{AgentIdentity, RunContext, SignedRunContext},
};
use serde_json::json;

const CALLS: usize = 2_000;

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p) as usize]
}

async fn server() -> String {
    let app = Router::new().route(
        "/search",
        get(|| async { Json(json!({"results": ["runbook-7"]})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/search", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn gateway(url: &str, key: &KeyPair) -> ToolGateway {
    let tool: Tool = serde_yaml::from_str(&format!(
        "{{name: search, risk: read_only, kind: observe, adapter: {{http: {{url: \"{url}\", method: GET}}}}, \
         inputSchema: {{type: object, required: [query], properties: {{query: {{type: string}}}}}}}}"
    ))
    .expect("tool");
    let spec: PolicySpec = serde_yaml::from_str(
        "rules: [{name: reads, match: {risks: [read_only]}, condition: \"call.args.query != ''\", effect: allow, reason: reads are safe}]",
    )
    .expect("policy");
    let policies = PolicySet {
        policies: vec![compile_policy("bench", &spec).expect("compiles")],
    };
    ToolGateway::new(
        "bench",
        "agent",
        key.public(),
        vec![CatalogTool::new(tool).expect("tool")],
        policies,
        Default::default(),
    )
}

fn envelope(key: &KeyPair, i: usize) -> CallEnvelope {
    let now = now_ms();
    let context = RunContext {
        run_id: "bench-run".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        session_id: "bench".into(),
        tenant_id: "bench".into(),
        user: None,
        agent: AgentIdentity::new("bench", "agent"),
        safety_mode: SafetyMode::Autonomous,
        budget: RunBudget {
            max_steps: 10,
            max_tokens: 10,
            max_tool_calls: 10,
            max_wall_seconds: 10,
            max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
        },
        pinned: PinnedDigests::default(),
        allowed_tools: vec!["search".into()],
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        pod: None,
        session_uid: None,
        bundle_digest: None,
        subject: None,
        trace_sampled: None,
    };
    CallEnvelope {
        call_id: format!("c{i}"),
        tool: "search".into(),
        arguments: json!({"query": "checkout 5xx"}),
        risk: ToolRisk::ReadOnly,
        kind: ToolKind::Observe,
        idempotency_key: format!("k{i}"),
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        run_context: SignedRunContext::sign(context, key),
        approval: None,
        resolution: None,
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let url = server().await;
        let key = KeyPair::from_seed([3; 32]);
        let gateway = gateway(&url, &key);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        let start = RunStart {
            run_id: "bench-run".into(),
            session_id: "bench".into(),
            agent: "agent".into(),
            run_context: json!({}),
            pinned: PinnedDigests::default(),
            bundle: None,
        };
        let tenant = TenantId::new("bench").expect("tenant");
        let mut recorder = Recorder::start(&store, tenant, key.clone(), start).await.expect("recorder");
        let client = contextos_runner::http::client();
        let envelopes: Vec<CallEnvelope> = (0..CALLS).map(|i| envelope(&key, i)).collect();
        // Warm both paths (connection pools, page cache).
        for e in envelopes.iter().take(50) {
            client.get(&url).query(&[("query", "x")]).send().await.expect("direct").bytes().await.expect("body");
            gateway.handle(e, &mut recorder, &StateFacts::default()).await.expect("governed");
        }
        let mut direct = Vec::with_capacity(CALLS);
        let mut governed = Vec::with_capacity(CALLS);
        for e in envelopes.iter().skip(50) {
            let t = Instant::now();
            let response = client
                .get(&url)
                .query(&[("query", "checkout 5xx")])
                .header("idempotency-key", &e.idempotency_key)
                .header("traceparent", &e.traceparent)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("direct");
            let body: serde_json::Value = response.json().await.expect("json");
            std::hint::black_box(body);
            direct.push(t.elapsed().as_secs_f64() * 1e6);

            let t = Instant::now();
            let outcome = gateway.handle(e, &mut recorder, &StateFacts::default()).await.expect("governed");
            governed.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(matches!(outcome, CallOutcome::Executed(ref r) if r.ok), "{outcome:?}");
        }
        let (d50, d99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
        let (g50, g99) = (percentile(&mut governed, 0.5), percentile(&mut governed, 0.99));
        println!("gateway overhead — {} calls each to the same local HTTP tool, same run", direct.len());
        println!("  direct HTTP call          p50 {d50:>8.0} µs   p99 {d99:>8.0} µs");
        println!("  governed gateway call     p50 {g50:>8.0} µs   p99 {g99:>8.0} µs   (includes a durable record append: fsync)");
        println!("  added by the gateway      p50 {:>8.0} µs   (target ≤ 300 µs)", g50 - d50);
    });
}
