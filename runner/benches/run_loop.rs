//! The run loop's own cost, measured in one run against baselines:
//! - harness overhead per step: a live run (scripted model, one read-only HTTP call per step to
//!   a local tool server) minus the same number of direct HTTP calls to that server — on the
//!   in-memory store, on the durable embedded store (each write flushed), and as in a cluster:
//!   the runner sending every call, model turn and record entry to the gateway service over
//!   loopback HTTP, which records them durably in its embedded store;
//! - replay throughput: recorded runs replayed under the same versions, in steps per second,
//!   next to just reading those records back.
//!
//! Run: `cargo bench -p contextos-runner --bench run_loop`. Targets: overhead < 1 ms per step,
//! replay ≥ 5,000 steps/s.

use std::{path::Path, sync::Arc, time::Instant};

use axum::{Json, Router, routing::get};
use contextos_runner::{
    gateway::{
        bundle::NamedPolicy,
        identity::{PodIdentity, StaticTokens},
        remote::{GatewayClient, TokenSource},
        service::GatewayService,
        tenancy::StaticTenants,
    },
    keys::KeyPair,
    keys::TenantKeys,
    manifests::ManifestSet,
    model::{Model, scripted::ScriptedModel},
    records::{EmbeddedStore, RecordStore, ScratchStore, TenantId, read_run, recorder::now_ms},
    run::{
        Harness, RunOutcome,
        bundle::{Candidate, RunBundle},
        issue_run_context,
        replay::replay_run,
    },
};
use serde_json::json;

const STEPS: usize = 40;
const RUNS: usize = 10;

async fn tool_server() -> String {
    let app = Router::new().route(
        "/search",
        get(|| async { Json(json!({"results": ["runbook-7"], "score": 0.93})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/search", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The quickstart's session and pack, with one read-only tool, an allow-reads policy, a budget
/// that fits `STEPS` steps, and a script of `STEPS - 1` searches then an answer.
fn bundle(url: &str) -> RunBundle {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let mut bundle = ManifestSet::load(&[examples])
        .expect("quickstart")
        .bundle("bench", None)
        .expect("bundle");
    let agent = &mut bundle.agent_spec;
    agent.tools = vec![
        serde_yaml::from_str(&format!(
            "{{name: search, description: search, risk: read_only, kind: observe, idempotent: true, \
             adapter: {{http: {{url: \"{url}\", method: GET}}}}, \
             inputSchema: {{type: object, required: [query], properties: {{query: {{type: string}}}}}}}}"
        ))
        .expect("tool"),
    ];
    agent.budget.max_steps = STEPS as u32 + 5;
    agent.budget.max_tool_calls = STEPS as u32 + 5;
    agent.budget.max_tokens = 10_000_000;
    agent.validators.clear();
    bundle.session_spec.overrides = None;
    bundle.policies = vec![NamedPolicy {
        name: "reads".into(),
        spec: serde_yaml::from_str(
            "rules: [{name: reads, match: {risks: [read_only]}, effect: allow, reason: reads are safe}]",
        )
        .expect("policy"),
    }];
    let mut turns: Vec<_> = (1..STEPS)
        .map(|i| json!({"content": format!("search {i}"), "toolCalls": [{"tool": "search", "arguments": {"query": format!("q{i}")}}]}))
        .collect();
    turns.push(json!({"content": "{\"summary\": \"done\"}"}));
    bundle.model_script = Some(json!({ "turns": turns }).to_string());
    bundle
}

async fn live_runs<S: RecordStore>(store: &S, bundle: &RunBundle, key: &KeyPair, label: &str) -> f64 {
    let started = Instant::now();
    for run in 0..RUNS {
        let gateway = bundle
            .gateway_bundle(Default::default())
            .build(key.public())
            .expect("gateway");
        let model = Model::Scripted(
            ScriptedModel::parse("bench", bundle.model_script.as_deref().unwrap_or("")).expect("script"),
        );
        let harness = Harness::new(store, key.clone(), bundle.clone(), gateway, model).expect("harness");
        let report = harness
            .start(
                &format!("{label}-{run}"),
                "4bf92f3577b34da6a3ce929d0e0e4736",
                &mut |_| {},
            )
            .await
            .expect("run");
        assert!(
            matches!(report.outcome, RunOutcome::Completed { .. }),
            "{:?}",
            report.outcome
        );
        assert_eq!(report.steps as usize, STEPS);
    }
    started.elapsed().as_secs_f64() * 1e6 / (RUNS * STEPS) as f64
}

async fn direct_calls(url: &str) -> f64 {
    let client = contextos_runner::http::client();
    let calls = RUNS * (STEPS - 1);
    let started = Instant::now();
    for i in 0..calls {
        let body: serde_json::Value = client
            .get(url)
            .query(&[("query", format!("q{i}"))])
            .header("idempotency-key", format!("k{i}"))
            .send()
            .await
            .expect("call")
            .json()
            .await
            .expect("json");
        std::hint::black_box(body);
    }
    started.elapsed().as_secs_f64() * 1e6 / (RUNS * STEPS) as f64
}

/// p50 of one small write flushed to disk (`fdatasync`, in place): what each durable write costs
/// at least. A live step writes twice (its model turn before any call acts, and each call's
/// result); through the gateway service a third time (the go-ahead before the tool acts).
fn flush_micros(dir: &Path) -> f64 {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::create(dir.join("flush-floor")).expect("file");
    file.write_all_at(&vec![0; 1 << 20], 0).expect("zeros");
    file.sync_all().expect("sync");
    let mut samples: Vec<f64> = (0..400u64)
        .map(|i| {
            let started = Instant::now();
            file.write_all_at(&[7; 512], i * 512).expect("write");
            file.sync_data().expect("flush");
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The gateway service over an embedded store, on loopback, trusting `operator`'s RunContexts
/// and one pod token; returns its URL.
async fn gateway_service(dir: &Path, operator: &KeyPair, early_answers: bool) -> String {
    let file = if early_answers {
        "gateway.redb"
    } else {
        "gateway-after-writes.redb"
    };
    let store = EmbeddedStore::open(&dir.join(file)).expect("store");
    let pod = PodIdentity {
        namespace: "bench".into(),
        pod: "bench-run-1".into(),
        pod_uid: "uid".into(),
        username: "system:serviceaccount:bench:default".into(),
    };
    let service = GatewayService::new(
        store,
        StaticTokens::default().with("bench-token", pod),
        // The run is the quickstart Session's, in its runner pod.
        StaticTenants::default().with_controller("bench", "bench-run-1", "Session", "checkout-5xx"),
        TenantKeys::new(&KeyPair::from_seed([5; 32])),
        operator.public(),
    );
    let service = if early_answers {
        service
    } else {
        service.with_answers_after_writes()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = Arc::new(service)
        .router()
        .layer(axum::middleware::from_fn(count_request));
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// Requests the gateway service answered (the runner's round trips).
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn count_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(request).await
}

/// Runs as a runner pod makes them: everything through the gateway service at `url`.
async fn remote_runs(url: &str, operator: &KeyPair, bundle: &RunBundle, label: &str) -> f64 {
    let started = Instant::now();
    for run in 0..RUNS {
        let run_id = format!("{label}-{run}");
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let context = issue_run_context(bundle, &run_id, trace, Some("bench-run-1"), operator, now_ms())
            .expect("context");
        let client =
            GatewayClient::new(url, TokenSource::Fixed("bench-token".into()), &context).expect("client");
        let transit = KeyPair::generate().expect("key");
        let harness = Harness::through_gateway(&client, transit, bundle.clone(), context).expect("harness");
        let report = harness.start(&run_id, trace, &mut |_| {}).await.expect("run");
        assert!(
            matches!(report.outcome, RunOutcome::Completed { .. }),
            "{:?}",
            report.outcome
        );
        assert_eq!(report.steps as usize, STEPS);
    }
    started.elapsed().as_secs_f64() * 1e6 / (RUNS * STEPS) as f64
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let url = tool_server().await;
        let bundle = bundle(&url);
        let key = KeyPair::from_seed([4; 32]);
        let tenant = TenantId::new("bench").expect("tenant");
        // Warm-up: tokenizer, connection pool, page cache.
        live_runs(&ScratchStore::new(), &bundle, &key, "warm").await;
        direct_calls(&url).await;

        let direct = direct_calls(&url).await;
        let memory = ScratchStore::new();
        let in_memory = live_runs(&memory, &bundle, &key, "mem").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let durable_store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        let durable = live_runs(&durable_store, &bundle, &key, "disk").await;
        println!("run loop — {RUNS} runs × {STEPS} steps (scripted model, one local HTTP read per step)");
        println!("  direct HTTP calls only (baseline)    {direct:>8.0} µs per step");
        println!(
            "  live run, in-memory store            {in_memory:>8.0} µs per step → harness overhead {:>6.0} µs",
            in_memory - direct
        );
        let flush = flush_micros(dir.path());
        println!(
            "  live run, embedded store (flushed)   {durable:>8.0} µs per step → harness overhead {:>6.0} µs   (target < 1000 µs)",
            durable - direct
        );
        println!(
            "  … two flushes a step alone           {:>8.0} µs per step (one flush: {flush:.0} µs on this disk)",
            2.0 * flush
        );
        let operator = KeyPair::from_seed([6; 32]);
        let service = gateway_service(dir.path(), &operator, true).await;
        let after_writes = gateway_service(dir.path(), &operator, false).await;
        remote_runs(&service, &operator, &bundle, "remote-warm").await;
        remote_runs(&after_writes, &operator, &bundle, "remote-warm").await;
        let baseline = remote_runs(&after_writes, &operator, &bundle, "remote-baseline").await;
        println!(
            "  … the service answering once all is durable {baseline:>7.0} µs per step → harness overhead {:>6.0} µs   (baseline)",
            baseline - direct
        );
        let before = REQUESTS.load(std::sync::atomic::Ordering::Relaxed);
        let remote = remote_runs(&service, &operator, &bundle, "remote").await;
        let requests = REQUESTS.load(std::sync::atomic::Ordering::Relaxed) - before;
        println!(
            "  live run, through the gateway service {remote:>7.0} µs per step → harness overhead {:>6.0} µs   (target < 1000 µs)",
            remote - direct
        );
        println!(
            "  … requests to the service            {:>8.1} per step",
            requests as f64 / (RUNS * STEPS) as f64
        );
        println!(
            "  … three flushes a step alone         {:>8.0} µs per step",
            3.0 * flush
        );

        let runs: Vec<String> = (0..RUNS).map(|r| format!("disk-{r}")).collect();
        let started = Instant::now();
        for run in &runs {
            std::hint::black_box(read_run(&durable_store, &tenant, run).await.expect("read"));
        }
        let read_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut steps = 0;
        for run in &runs {
            let replay = replay_run(&durable_store, &tenant, run, &Candidate::default())
                .await
                .expect("replay");
            assert!(replay.identical, "same-version replay must be identical");
            steps += replay.steps as usize;
        }
        let replay_secs = started.elapsed().as_secs_f64();
        println!("replay — {} recorded runs, {steps} steps, same versions, all identical", runs.len());
        println!(
            "  reading the records back (baseline)  {:>8.0} steps/s",
            steps as f64 / read_secs
        );
        println!(
            "  replay (re-decide, re-judge, diff)   {:>8.0} steps/s   (target ≥ 5,000)",
            steps as f64 / replay_secs
        );
    });
}
