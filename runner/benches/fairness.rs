//! Tenant fairness at one gateway replica: how long a quiet tenant's governed calls take while
//! another tenant floods the same replica, beside the same calls with the replica to itself
//! (the baseline, measured in the same run).
//!
//! Run: `cargo bench -p contextos-runner --bench fairness`.
//!
//! Two gateway services (as deployed: pod identity, RunContext check, policy, the tool's HTTP
//! call, the decision and result durable in an embedded store), each serving two tenants. The
//! quiet tenant runs one Session calling a tool one call after the other. The noisy tenant runs
//! [`NOISY_RUNS`] Sessions at once, each calling as fast as the replica answers it, in two
//! floods: calls its tool answers at once (what they compete for is the replica's CPU), and
//! calls its tool answers only after [`SLOW_TOOL_MS`] (a tool that hangs: what they compete for
//! is the replica's room for requests). Both replicas serve at most 64 of one tenant's requests
//! at once and turn the others away (`503`; runners ask again). The first works on a few
//! requests at once and hands its turns round the tenants (as deployed); the second works on
//! every admitted request at once (the baseline: the bound on requests in flight alone).
//!
//! The load generators share the machine's two cores with the replica. So that the quiet
//! tenant's own runner is not starved by the noisy tenant's runners (which in a cluster run in
//! pods of their own), each side runs on its own thread: the replica on two, the noisy runners
//! on one, the quiet runner on one.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::Query, routing::get};
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
    records::{EmbeddedStore, RecordStore as _, Recorder, RunStart, TenantId, recorder::now_ms},
    run::{bundle::RunBundle, issue_run_context},
    run_context::SignedRunContext,
};
use serde_json::json;

/// The noisy tenant's Sessions calling at once (more than its 64 slots at one replica).
const NOISY_RUNS: usize = 96;
/// The quiet tenant's calls timed in each phase.
const QUIET_CALLS: usize = 300;
/// How long the noisy tenant's hanging tool takes to answer.
const SLOW_TOOL_MS: u64 = 100;
/// The numbers of turns measured (a replica deployed on this machine's two cores has 4).
const TURNS: [usize; 3] = [4, 8, 16];
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A runbook search that answers at once, or after [`SLOW_TOOL_MS`] when asked for `slow`.
async fn tool_server() -> String {
    #[derive(serde::Deserialize)]
    struct Search {
        query: String,
    }
    let app = Router::new().route(
        "/runbooks/search",
        get(|Query(search): Query<Search>| async move {
            if search.query == "slow" {
                tokio::time::sleep(Duration::from_millis(SLOW_TOOL_MS)).await;
            }
            Json(json!({"results": ["runbook-7"]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The quickstart agent in `tenant`, with a budget no benchmark run reaches.
fn bundle(tenant: &str) -> RunBundle {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let mut bundle = ManifestSet::load(&[examples])
        .expect("quickstart")
        .bundle(tenant, None)
        .expect("bundle");
    bundle.agent_spec.budget.max_tool_calls = 1_000_000;
    bundle.agent_spec.budget.max_wall_seconds = 3_600;
    for policy in &mut bundle.policies {
        policy.spec.budget = None;
    }
    bundle
}

fn identity(tenant: &str, pod: &str) -> PodIdentity {
    PodIdentity {
        namespace: tenant.into(),
        pod: pod.into(),
        pod_uid: format!("uid-{pod}"),
        username: format!("system:serviceaccount:{tenant}:default"),
    }
}

/// One Session's run at the service: its client and RunContext, and the calls it has made.
struct Run {
    client: GatewayClient,
    context: SignedRunContext,
    calls: usize,
}

impl Run {
    /// Starts run `run_id` of `bundle` as the runner in pod `pod` would, with `token`.
    async fn start(url: &str, bundle: &RunBundle, operator: &KeyPair, pod: &str, token: &str) -> Run {
        let run_id = format!("{pod}-run");
        let context =
            issue_run_context(bundle, &run_id, TRACE, Some(pod), operator, now_ms()).expect("context");
        let client = GatewayClient::new(url, TokenSource::Fixed(token.into()), &context).expect("client");
        let tenant = TenantId::new(bundle.tenant.clone()).expect("tenant");
        let blob = client
            .records()
            .put_blob(&tenant, bundle.canonical_bytes())
            .await
            .expect("bundle");
        let start = RunStart {
            run_id,
            session_id: bundle.session.clone(),
            agent: bundle.agent.clone(),
            run_context: serde_json::to_value(&context).expect("json"),
            pinned: bundle.pinned(),
            bundle: Some(blob),
        };
        Recorder::start(client.records(), tenant, KeyPair::from_seed([9; 32]), start)
            .await
            .expect("run started");
        Run {
            client,
            context,
            calls: 0,
        }
    }

    /// One governed search for `query`; `false` if the replica turned it away.
    async fn call(&mut self, query: &str) -> bool {
        let i = self.calls;
        let call_id = format!("{}.0", i + 1);
        let envelope = CallEnvelope {
            call_id: call_id.clone(),
            tool: "search_runbooks".into(),
            arguments: json!({"query": query}),
            risk: ToolRisk::ReadOnly,
            kind: ToolKind::Observe,
            idempotency_key: format!("{}-{i}", self.context.context.run_id),
            traceparent: traceparent(TRACE, &self.context.context.run_id, &call_id),
            run_context: self.context.clone(),
            approval: None,
            resolution: None,
        };
        match self.client.call(&envelope, &StateFacts::default()).await {
            Ok(CallOutcome::Executed(result)) => {
                assert!(result.ok, "{result:?}");
                self.calls += 1;
                true
            }
            Ok(other) => panic!("the search was not executed: {other:?}"),
            Err(_) => false,
        }
    }
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p) as usize]
}

/// The quiet tenant's [`QUIET_CALLS`] calls, one after the other: their latencies in µs.
async fn quiet_calls(run: &mut Run) -> Vec<f64> {
    let mut samples = Vec::with_capacity(QUIET_CALLS);
    while samples.len() < QUIET_CALLS {
        let t = Instant::now();
        if run.call("checkout 5xx").await {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            panic!("the quiet tenant's call was turned away");
        }
    }
    samples
}

/// What the noisy tenant got done during one flood.
struct Flood {
    served: usize,
    seconds: f64,
}

/// Floods the replica with the noisy tenant's runs (each calling `query` until told to stop,
/// on the noisy tenant's own thread) while the quiet run makes its calls; the quiet calls'
/// latencies and the flood's figures.
async fn under_flood(
    noisy_side: &tokio::runtime::Handle,
    quiet: &mut Run,
    noisy: Vec<Run>,
    query: &'static str,
) -> (Vec<f64>, Flood, Vec<Run>) {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = noisy
        .into_iter()
        .map(|mut run| {
            let (stop, served) = (stop.clone(), served.clone());
            noisy_side.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // A request turned away (`503`) is asked again by the runner's client.
                    if run.call(query).await {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
                run
            })
        })
        .collect();
    // Let the flood fill the replica before the quiet tenant's first call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = quiet_calls(quiet).await;
    stop.store(true, Ordering::Relaxed);
    let mut runs = Vec::with_capacity(tasks.len());
    for task in tasks {
        runs.push(task.await.expect("noisy run"));
    }
    let flood = Flood {
        served: served.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    (samples, flood, runs)
}

fn report(label: &str, samples: &mut [f64], alone: Option<(f64, f64)>, flood: Option<&Flood>) -> (f64, f64) {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    print!("    {label:<36} p50 {p50:>8.0} µs   p99 {p99:>8.0} µs");
    match alone {
        Some((a50, a99)) => print!("   ({:.1}× / {:.1}× alone)", p50 / a50, p99 / a99),
        None => print!("   (alone)"),
    }
    println!();
    if let Some(flood) = flood {
        println!(
            "    {:<36} {:>6.0} calls/s served over {:.1} s",
            "… meanwhile the noisy tenant",
            flood.served as f64 / flood.seconds,
            flood.seconds
        );
    }
    (p50, p99)
}

/// A runtime of `threads` threads for one side of the benchmark.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Serves a gateway replica on the `service` runtime with `turns` requests worked on at once,
/// handed round the tenants, or — `None` — every admitted request worked on at once. Its URL.
fn serve(
    service_side: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    file: &str,
    tools: &str,
    operator: &KeyPair,
    turns: Option<usize>,
) -> String {
    let mut tokens = StaticTokens::default().with("quiet-token", identity("quiet", "quiet-pod"));
    for i in 0..NOISY_RUNS {
        tokens = tokens.with(
            &format!("noisy-token-{i}"),
            identity("noisy", &format!("noisy-pod-{i}")),
        );
    }
    // Every run is a run of the quickstart Session, each in its own pod.
    let session = bundle("quiet").session;
    let mut tenants = StaticTenants::default()
        .with_secret("quiet", "ops-tools-webhook", "hmac-key", "k")
        .with_secret("noisy", "ops-tools-webhook", "hmac-key", "k")
        .with_controller("quiet", "quiet-pod", "Session", &session);
    for i in 0..NOISY_RUNS {
        tenants = tenants.with_controller("noisy", &format!("noisy-pod-{i}"), "Session", &session);
    }
    let store = EmbeddedStore::open(&dir.join(file)).expect("store");
    let service = GatewayService::new(
        store,
        tokens,
        tenants,
        TenantKeys::new(&KeyPair::from_seed([2; 32])),
        operator.public(),
    )
    .with_endpoint_overrides(vec![(
        "http://ops-tools.shop-platform.svc:8080".into(),
        tools.to_owned(),
    )]);
    let service = service.with_fair_turns(turns);
    let router = Arc::new(service).router();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    service_side.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        axum::serve(listener, router).await
    });
    url
}

/// The three measurements at one replica: the quiet tenant alone, beside fast calls, beside
/// hanging calls.
fn measure(
    label: &str,
    url: &str,
    operator: &KeyPair,
    quiet_side: &tokio::runtime::Runtime,
    noisy_side: &tokio::runtime::Runtime,
) {
    let (quiet_bundle, noisy_bundle) = (bundle("quiet"), bundle("noisy"));
    let mut noisy = noisy_side.block_on(async {
        let mut noisy = Vec::with_capacity(NOISY_RUNS);
        for i in 0..NOISY_RUNS {
            let mut run = Run::start(
                url,
                &noisy_bundle,
                operator,
                &format!("noisy-pod-{i}"),
                &format!("noisy-token-{i}"),
            )
            .await;
            run.call("checkout 5xx").await;
            noisy.push(run);
        }
        noisy
    });
    quiet_side.block_on(async {
        let mut quiet = Run::start(url, &quiet_bundle, operator, "quiet-pod", "quiet-token").await;
        // Warm the paths (connection pools, the run's built gateway, the page cache).
        for _ in 0..30 {
            quiet.call("checkout 5xx").await;
        }
        println!("  {label}");
        let mut alone = quiet_calls(&mut quiet).await;
        let alone = report("alone", &mut alone, None, None);
        let (mut samples, flood, runs) =
            under_flood(noisy_side.handle(), &mut quiet, noisy, "checkout 5xx").await;
        noisy = runs;
        report(
            "beside a flood of fast calls",
            &mut samples,
            Some(alone),
            Some(&flood),
        );
        let (mut samples, flood, _) = under_flood(noisy_side.handle(), &mut quiet, noisy, "slow").await;
        report(
            &format!("beside a flood of calls hanging {SLOW_TOOL_MS} ms"),
            &mut samples,
            Some(alone),
            Some(&flood),
        );
    });
}

fn main() {
    let (service_side, tool_side, noisy_side, quiet_side) = (runtime(2), runtime(1), runtime(1), runtime(1));
    let tools = tool_side.block_on(tool_server());
    let dir = tempfile::tempdir().expect("tempdir");
    let operator = KeyPair::from_seed([1; 32]);
    let all_at_once = serve(&service_side, dir.path(), "all.redb", &tools, &operator, None);
    let fair: Vec<_> = TURNS
        .iter()
        .map(|&turns| {
            (
                turns,
                serve(
                    &service_side,
                    dir.path(),
                    &format!("fair-{turns}.redb"),
                    &tools,
                    &operator,
                    Some(turns),
                ),
            )
        })
        .collect();
    println!(
        "the quiet tenant's governed calls at one replica, {QUIET_CALLS} each, while {NOISY_RUNS} of another tenant's Sessions call at once"
    );
    measure(
        "every admitted request worked on at once (baseline: the bound of 64 requests in flight a tenant alone)",
        &all_at_once,
        &operator,
        &quiet_side,
        &noisy_side,
    );
    for (turns, url) in &fair {
        measure(
            &format!(
                "{turns} requests worked on at once, turns handed round the tenants (deployed: 2 a core)"
            ),
            url,
            &operator,
            &quiet_side,
            &noisy_side,
        );
    }
}
