//! The cluster path's cost: a governed tool call sent by a runner to the gateway *service* over
//! loopback HTTP (pod identity, RunContext check, policy, execution against a local HTTP tool,
//! the decision and result made durable in the embedded store) against the same call sent
//! directly to the tool, in one run of this binary. Calls are measured in short runs (the size
//! of real sessions) and in one long run (a chain that keeps growing).
//!
//! Run: `cargo bench -p contextos-runner --bench gateway_service`. Target: added p50 ≤ 300 µs.
//!
//! A governed call makes two durable writes one after the other (the go-ahead before the tool
//! acts, the result before the runner hears it), so the run also times, on the same disk, one
//! flush of a small write (what the disk itself costs) and one durable append to an embedded
//! store (a redb transaction and its log frame, flushed). Two flushes plus one loopback HTTP
//! round trip (the direct call) is what no implementation that keeps both crash guarantees can
//! go below here.

use std::{path::PathBuf, sync::Arc, time::Instant};

use axum::{Json, Router, routing::get};
use contextos_crds::common::{ToolKind, ToolRisk};
use contextos_runner::{
    gateway::{
        CallOutcome,
        envelope::{CallEnvelope, traceparent},
        identity::{PodIdentity, StaticTokens},
        remote::{GatewayClient, TokenSource},
        service::GatewayService,
        tenancy::StaticTenants,
    },
    keys::{KeyPair, TenantKeys},
    manifests::ManifestSet,
    policy::StateFacts,
    records::{EmbeddedStore, EntryBody, RecordStore as _, Recorder, RunStart, TenantId, recorder::now_ms},
    run::{bundle::RunBundle, issue_run_context},
    run_context::SignedRunContext,
};
use serde_json::json;

const SHORT_RUNS: usize = 40;
const CALLS_PER_SHORT_RUN: usize = 25;
const LONG_RUN_CALLS: usize = 1_000;
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p) as usize]
}

async fn tool_server() -> String {
    let app = Router::new().route(
        "/runbooks/search",
        get(|| async { Json(json!({"results": ["runbook-7"]})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The quickstart agent, with a budget large enough for the benchmark's runs.
fn bundle() -> RunBundle {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let mut bundle = ManifestSet::load(&[examples])
        .expect("quickstart")
        .bundle("bench", None)
        .expect("bundle");
    bundle.agent_spec.budget.max_tool_calls = 1_000_000;
    for policy in &mut bundle.policies {
        policy.spec.budget = None;
    }
    bundle
}

struct Rig {
    url: String,
    operator: KeyPair,
    bundle: RunBundle,
}

impl Rig {
    /// Starts run `run_id` (as its runner would) and returns a client for it.
    async fn start(&self, run_id: &str) -> (GatewayClient, SignedRunContext) {
        let context = issue_run_context(
            &self.bundle,
            run_id,
            TRACE,
            Some("bench-run-1"),
            &self.operator,
            now_ms(),
        )
        .expect("context");
        let client = GatewayClient::new(&self.url, TokenSource::Fixed("bench-token".into()), &context)
            .expect("client");
        let tenant = TenantId::new("bench").expect("tenant");
        let blob = client
            .records()
            .put_blob(&tenant, self.bundle.canonical_bytes())
            .await
            .expect("bundle");
        let start = RunStart {
            run_id: run_id.into(),
            session_id: self.bundle.session.clone(),
            agent: self.bundle.agent.clone(),
            run_context: serde_json::to_value(&context).expect("json"),
            pinned: self.bundle.pinned(),
            bundle: Some(blob),
        };
        Recorder::start(client.records(), tenant, KeyPair::from_seed([9; 32]), start)
            .await
            .expect("run started");
        (client, context)
    }
}

fn envelope(context: &SignedRunContext, i: usize) -> CallEnvelope {
    let call_id = format!("{}.0", i + 1);
    CallEnvelope {
        call_id: call_id.clone(),
        tool: "search_runbooks".into(),
        arguments: json!({"query": "checkout 5xx"}),
        risk: ToolRisk::ReadOnly,
        kind: ToolKind::Observe,
        idempotency_key: format!("{}-{i}", context.context.run_id),
        traceparent: traceparent(TRACE, &call_id),
        run_context: context.clone(),
        approval: None,
        resolution: None,
    }
}

/// Times `calls` governed calls of one run and as many direct calls, interleaved.
async fn measure(
    rig: &Rig,
    tools: &str,
    http: &reqwest::Client,
    run_id: &str,
    calls: usize,
    direct: &mut Vec<f64>,
    governed: &mut Vec<f64>,
) {
    let (client, context) = rig.start(run_id).await;
    for i in 0..calls {
        let e = envelope(&context, i);
        let t = Instant::now();
        let body: serde_json::Value = http
            .get(format!("{tools}/runbooks/search"))
            .query(&[("query", "checkout 5xx")])
            .header("idempotency-key", &e.idempotency_key)
            .header("traceparent", &e.traceparent)
            .send()
            .await
            .expect("direct")
            .json()
            .await
            .expect("json");
        std::hint::black_box(body);
        direct.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let outcome = client.call(&e, &StateFacts::default()).await.expect("governed");
        governed.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(
            matches!(outcome, CallOutcome::Executed(ref r) if r.ok),
            "{outcome:?}"
        );
    }
}

/// p50 of one small write flushed to disk (`fdatasync`), in place in a file whose blocks exist.
fn flush_p50(dir: &std::path::Path) -> f64 {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::create(dir.join("flush-floor")).expect("file");
    file.write_all_at(&vec![0; 1 << 20], 0).expect("zeros");
    file.sync_all().expect("sync");
    let mut samples = Vec::new();
    for i in 0..400u64 {
        let t = Instant::now();
        file.write_all_at(&[7; 512], i * 512).expect("write");
        file.sync_data().expect("flush");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    percentile(&mut samples, 0.5)
}

/// p50 of one entry appended durably to a store of its own on the same disk.
async fn durable_append_p50(dir: &std::path::Path) -> f64 {
    let store = EmbeddedStore::open(&dir.join("floor.redb")).expect("store");
    let tenant = TenantId::new("bench").expect("tenant");
    let start = RunStart {
        run_id: "floor".into(),
        session_id: "floor".into(),
        agent: "bench".into(),
        run_context: json!({}),
        pinned: Default::default(),
        bundle: None,
    };
    let mut recorder = Recorder::start(&store, tenant, KeyPair::from_seed([9; 32]), start)
        .await
        .expect("run started");
    let mut samples = Vec::new();
    for step in 0..400 {
        let t = Instant::now();
        recorder
            .record(EntryBody::Checkpoint {
                step,
                state: json!({"results": ["runbook-7"]}),
            })
            .await
            .expect("append");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    percentile(&mut samples, 0.5)
}

fn report(label: &str, direct: &mut [f64], governed: &mut [f64], append: f64, flush: f64) {
    let (d50, d99) = (percentile(direct, 0.5), percentile(direct, 0.99));
    let (g50, g99) = (percentile(governed, 0.5), percentile(governed, 0.99));
    println!("{label} — {} calls each", direct.len());
    println!("  direct HTTP call to the tool          p50 {d50:>8.0} µs   p99 {d99:>8.0} µs   (baseline)");
    println!("  through the gateway service           p50 {g50:>8.0} µs   p99 {g99:>8.0} µs");
    println!(
        "  added by the gateway service          p50 {:>8.0} µs   (target ≤ 300 µs)",
        g50 - d50
    );
    println!(
        "  … of which two durable appends        p50 {:>8.0} µs   (measured alone; the rest: {:.0} µs)",
        2.0 * append,
        g50 - d50 - 2.0 * append
    );
    // The runner's round trip to the gateway costs about what the direct call does.
    println!(
        "  floor of the added time               p50 {:>8.0} µs   (two flushes alone + one more round trip)",
        2.0 * flush + d50
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tools = tool_server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        let operator = KeyPair::from_seed([1; 32]);
        let identity = PodIdentity {
            namespace: "bench".into(),
            pod: "bench-run-1".into(),
            pod_uid: "uid".into(),
            username: "system:serviceaccount:bench:default".into(),
        };
        let service = GatewayService::new(
            store,
            StaticTokens::default().with("bench-token", identity),
            StaticTenants::default().with_secret("bench", "ops-tools-webhook", "hmac-key", "k"),
            TenantKeys::new(&KeyPair::from_seed([2; 32])),
            operator.public(),
        )
        .with_endpoint_overrides(vec![(
            "http://ops-tools.shop-platform.svc:8080".into(),
            tools.clone(),
        )]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let router = Arc::new(service).router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let rig = Rig {
            url,
            operator,
            bundle: bundle(),
        };
        let http = contextos_runner::http::client();
        // Warm both paths (connection pools, page cache, the run's built gateway).
        measure(
            &rig,
            &tools,
            &http,
            "warm-up",
            30,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await;

        let flush = flush_p50(dir.path());
        println!("one small write flushed to this disk, alone      p50 {flush:>6.0} µs");
        let append = durable_append_p50(dir.path()).await;
        println!("one durable append to the embedded store, alone  p50 {append:>6.0} µs");
        let (mut direct, mut governed) = (Vec::new(), Vec::new());
        for run in 0..SHORT_RUNS {
            let run_id = format!("short-{run}");
            measure(
                &rig,
                &tools,
                &http,
                &run_id,
                CALLS_PER_SHORT_RUN,
                &mut direct,
                &mut governed,
            )
            .await;
        }
        report(
            &format!("{SHORT_RUNS} runs of {CALLS_PER_SHORT_RUN} calls (a session's size)"),
            &mut direct,
            &mut governed,
            append,
            flush,
        );
        let (mut direct, mut governed) = (Vec::new(), Vec::new());
        measure(
            &rig,
            &tools,
            &http,
            "long",
            LONG_RUN_CALLS,
            &mut direct,
            &mut governed,
        )
        .await;
        let late = governed.split_off(LONG_RUN_CALLS - 100);
        let mut late_direct = direct.split_off(LONG_RUN_CALLS - 100);
        report(
            "one run of 1,000 calls: the first 900",
            &mut direct,
            &mut governed,
            append,
            flush,
        );
        let mut late = late;
        report(
            "the same run: its last 100 calls",
            &mut late_direct,
            &mut late,
            append,
            flush,
        );
    });
}
