//! The cluster path's cost: a governed tool call sent by a runner to the gateway *service* over
//! loopback HTTP (pod identity, RunContext check, policy, execution against a local HTTP tool,
//! the decision and result made durable in the embedded store) against the same call sent
//! directly to the tool, in one run of this binary. Calls are measured in short runs (the size
//! of real sessions) and in one long run (a chain that keeps growing).
//!
//! Run: `cargo bench -p contextos-runner --bench gateway_service`. Target: added p50 ≤ 300 µs.
//!
//! A third service, like the first but whose tenant has two SpendQuotas (a tenant-wide one and
//! a narrower one, both counting the calls), takes the same calls too: the difference of the two
//! is what checking quotas adds to a governed call (target ≤ 50 µs p50). Its hold is one guarded
//! transaction over both quotas' ledger rows, made durable by the call's go-ahead; what the call
//! spent is settled after the answer.
//!
//! A governed call makes two durable writes: the go-ahead before the tool acts, and the result.
//! The service answers while the result is being written (the runner's next request proves it
//! was); a second service over its own store answers only once the result is durable, as the
//! service did before — the same calls go to both, interleaved. The call is a read-only tool's,
//! which the service asks while the go-ahead is flushed (answering once it is durable); a
//! fourth service asks it only once its go-ahead is durable, as it asks tools that act. The
//! run also times, on the same disk, one flush of a small write (what the disk itself costs)
//! and one durable append to an embedded store (a redb transaction and its log frame,
//! flushed). One flush plus one loopback HTTP round trip (the direct call) is what no
//! implementation that makes the go-ahead durable before the tool acts can go below here; for
//! a read asked while its go-ahead is flushed, one round trip and what of the flush the tool's
//! own time does not cover.

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
/// Runs of the pass that times the service's phases (spans on, so not part of the figures).
const PHASE_RUNS: usize = 10;
const CALLS_PER_SHORT_RUN: usize = 25;
const LONG_RUN_CALLS: usize = 1_000;
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Where a governed call's time goes: the wall time of each of the service's phases (its
/// `debug` spans: `runner.*` in the runner's client, `gateway.*` in the service), collected by a
/// subscriber installed only after the main figures are taken (with no subscriber the spans
/// cost next to nothing; with one they cost a few µs each).
mod phases {
    use std::{collections::BTreeMap, sync::Mutex, time::Instant};

    use tracing::{Subscriber, span};
    use tracing_subscriber::{
        Layer,
        filter::filter_fn,
        layer::{Context, SubscriberExt as _},
        registry::LookupSpan,
    };

    /// Each phase in the order a call goes through it, indented under the phase it is part of.
    const ORDER: &[(&str, usize)] = &[
        ("runner.current_tail", 0),
        ("runner.call", 0),
        ("gateway.call", 1),
        ("gateway.identify", 2),
        ("gateway.check_context", 2),
        ("gateway.parse_call", 2),
        ("gateway.slot", 2),
        ("gateway.decisions_on_record", 2),
        ("gateway.until_answered", 2),
        ("gateway.log_lock", 3),
        ("gateway.continue_run", 3),
        ("gateway.take_tail", 3),
        ("gateway.handle_in_run", 3),
        ("gateway.decide", 4),
        ("gateway.go_ahead_write", 4),
        ("record.prepare", 5),
        ("record.store_append", 5),
        ("store.handoff", 6),
        ("store.writer_lock", 6),
        ("store.transaction", 6),
        ("store.log_frame", 6),
        ("store.redb_commit", 6),
        ("store.flush", 6),
        ("gateway.execute", 4),
        ("gateway.prepare", 3),
        ("gateway.write", 3),
        ("gateway.settle", 3),
    ];

    static TIMES: Mutex<BTreeMap<&'static str, Vec<f64>>> = Mutex::new(BTreeMap::new());

    /// Records each span's wall time, from creation to close, under its name.
    struct WallTime;

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for WallTime {
        fn on_new_span(&self, _: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(Instant::now());
            }
        }

        fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
            let Some(span) = ctx.span(&id) else { return };
            let Some(start) = span.extensions().get::<Instant>().copied() else {
                return;
            };
            if let Ok(mut times) = TIMES.lock() {
                times
                    .entry(span.name())
                    .or_default()
                    .push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
    }

    /// Installs the timing subscriber for the rest of the process.
    pub fn start() {
        let layer = WallTime.with_filter(filter_fn(|meta| {
            meta.is_span()
                && ["gateway.", "runner.", "record.", "store."]
                    .iter()
                    .any(|prefix| meta.name().starts_with(prefix))
        }));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other subscriber");
    }

    /// Prints the p50 of each phase, per call.
    pub fn report(calls: usize) {
        let mut times = TIMES.lock().expect("times");
        println!(
            "where a governed call's time goes ({calls} calls, spans on; p50 of each phase's wall time):"
        );
        for (name, depth) in ORDER {
            let Some(samples) = times.get_mut(name) else {
                println!("  {:indent$}{name:<32} (not seen)", "", indent = depth * 2);
                continue;
            };
            let p50 = super::percentile(samples, 0.5);
            println!(
                "  {:indent$}{name:<width$} p50 {p50:>7.0} µs   ({} per call)",
                "",
                samples.len() as f64 / calls as f64,
                indent = depth * 2,
                width = 40 - depth * 2,
            );
        }
    }
}

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

/// The tenant's quotas in the quota-checking service: limits no benchmark reaches, each counting
/// every call (so each call holds and spends in both ledgers).
fn spend_quotas() -> Vec<contextos_crds::SpendQuota> {
    [
        (
            "tenant",
            "limits:\n- window: day\n  toolCalls: 1000000000\n  tokens: 1000000000000\n",
        ),
        ("platform", "limits:\n- window: hour\n  toolCalls: 1000000000\n"),
    ]
    .into_iter()
    .map(|(name, spec)| {
        let mut quota =
            contextos_crds::SpendQuota::new(name, serde_yaml::from_str(spec).expect("quota spec"));
        quota.metadata.uid = Some(format!("uid-{name}"));
        quota
    })
    .collect()
}

struct Rig {
    /// The service as deployed: answers while the result is written.
    url: String,
    /// The same service, with two SpendQuotas on the tenant.
    with_quotas: String,
    /// The same service answering only once the result is durable.
    after_writes: String,
    /// The same service asking a read-only tool only once its go-ahead is durable.
    reads_after_go_ahead: String,
    operator: KeyPair,
    bundle: RunBundle,
}

impl Rig {
    /// Starts run `run_id` (as its runner would) at the service at `url` and returns a client
    /// for it.
    async fn start(&self, url: &str, run_id: &str) -> (GatewayClient, SignedRunContext) {
        let context = issue_run_context(
            &self.bundle,
            run_id,
            TRACE,
            Some("bench-run-1"),
            &self.operator,
            now_ms(),
        )
        .expect("context");
        let client =
            GatewayClient::new(url, TokenSource::Fixed("bench-token".into()), &context).expect("client");
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
        traceparent: traceparent(TRACE, &context.context.run_id, &call_id),
        run_context: context.clone(),
        approval: None,
        resolution: None,
    }
}

/// Latencies of one kind of call, in µs.
#[derive(Default)]
struct Samples {
    direct: Vec<f64>,
    governed: Vec<f64>,
    after_writes: Vec<f64>,
    with_quotas: Vec<f64>,
    reads_after_go_ahead: Vec<f64>,
}

/// Times `calls` governed calls of one run at each service and as many direct calls, interleaved.
async fn measure(
    rig: &Rig,
    tools: &str,
    http: &reqwest::Client,
    run_id: &str,
    calls: usize,
    samples: &mut Samples,
) {
    let (client, context) = rig.start(&rig.url, run_id).await;
    let (baseline, baseline_context) = rig.start(&rig.after_writes, run_id).await;
    let (quoted, quoted_context) = rig.start(&rig.with_quotas, run_id).await;
    let (flushed_first, flushed_first_context) = rig.start(&rig.reads_after_go_ahead, run_id).await;
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
        samples.direct.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let outcome = client.call(&e, &StateFacts::default()).await.expect("governed");
        samples.governed.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(
            matches!(outcome, CallOutcome::Executed(ref r) if r.ok),
            "{outcome:?}"
        );
        let e = envelope(&baseline_context, i);
        let t = Instant::now();
        let outcome = baseline.call(&e, &StateFacts::default()).await.expect("governed");
        samples.after_writes.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(
            matches!(outcome, CallOutcome::Executed(ref r) if r.ok),
            "{outcome:?}"
        );
        let e = envelope(&quoted_context, i);
        let t = Instant::now();
        let outcome = quoted.call(&e, &StateFacts::default()).await.expect("governed");
        samples.with_quotas.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(
            matches!(outcome, CallOutcome::Executed(ref r) if r.ok),
            "{outcome:?}"
        );
        let e = envelope(&flushed_first_context, i);
        let t = Instant::now();
        let outcome = flushed_first
            .call(&e, &StateFacts::default())
            .await
            .expect("governed");
        samples.reads_after_go_ahead.push(t.elapsed().as_secs_f64() * 1e6);
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

/// p50 of one call's quota hold (before the call) and of its settlement (after), alone, against
/// the two quotas of [`spend_quotas`] in an embedded store on the same disk.
async fn quota_check_p50(dir: &std::path::Path) -> (f64, f64) {
    use contextos_runner::quota::{ActiveQuota, Amounts, book};
    let store = EmbeddedStore::open(&dir.join("quota-floor.redb")).expect("store");
    let tenant = TenantId::new("bench").expect("tenant");
    let quotas: Vec<ActiveQuota> = spend_quotas()
        .iter()
        .map(|q| ActiveQuota::compile(q).expect("quota"))
        .collect();
    let quotas: Vec<&ActiveQuota> = quotas.iter().collect();
    let one = Amounts {
        calls: 1,
        ..Amounts::default()
    };
    let (mut holds, mut settles) = (Vec::new(), Vec::new());
    for i in 0..400 {
        let call = format!("floor/call/{i}");
        let demand = book::Demand {
            call: &call,
            owner: "bench",
            amounts: one,
            currency: None,
            model_turn: false,
        };
        let t = Instant::now();
        book::hold(
            &store,
            &tenant,
            &quotas,
            &demand,
            book::Durability::WithNextRecord,
            now_ms(),
        )
        .await
        .expect("hold");
        holds.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        book::settle(&store, &tenant, &quotas, &call, "bench", &one, None, now_ms())
            .await
            .expect("settle");
        settles.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (percentile(&mut holds, 0.5), percentile(&mut settles, 0.5))
}

fn report(label: &str, samples: &mut Samples, append: f64, flush: f64) {
    let (d50, d99) = (
        percentile(&mut samples.direct, 0.5),
        percentile(&mut samples.direct, 0.99),
    );
    let (g50, g99) = (
        percentile(&mut samples.governed, 0.5),
        percentile(&mut samples.governed, 0.99),
    );
    let (w50, w99) = (
        percentile(&mut samples.after_writes, 0.5),
        percentile(&mut samples.after_writes, 0.99),
    );
    let (q50, q99) = (
        percentile(&mut samples.with_quotas, 0.5),
        percentile(&mut samples.with_quotas, 0.99),
    );
    let (r50, r99) = (
        percentile(&mut samples.reads_after_go_ahead, 0.5),
        percentile(&mut samples.reads_after_go_ahead, 0.99),
    );
    println!("{label} — {} calls each", samples.direct.len());
    println!("  direct HTTP call to the tool          p50 {d50:>8.0} µs   p99 {d99:>8.0} µs   (baseline)");
    println!("  service answering once all is durable p50 {w50:>8.0} µs   p99 {w99:>8.0} µs   (baseline)");
    println!("  service asking after the go-ahead     p50 {r50:>8.0} µs   p99 {r99:>8.0} µs   (baseline)");
    println!("  service answering while it writes     p50 {g50:>8.0} µs   p99 {g99:>8.0} µs");
    println!(
        "  added by the gateway service          p50 {:>8.0} µs   (target ≤ 300 µs; answering after the writes: {:.0} µs; asking after the go-ahead: {:.0} µs)",
        g50 - d50,
        w50 - d50,
        r50 - d50
    );
    println!(
        "  … of which one durable append         p50 {append:>8.0} µs   (measured alone; the rest: {:.0} µs)",
        g50 - d50 - append
    );
    println!("  the service with two SpendQuotas      p50 {q50:>8.0} µs   p99 {q99:>8.0} µs");
    println!(
        "  added by checking the quotas          p50 {:>8.0} µs   (target ≤ 50 µs; beside the service without them)",
        q50 - g50
    );
    // The runner's round trip to the gateway costs about what the direct call does.
    println!(
        "  floor of the added time               p50 {:>8.0} µs   (one flush alone + one more round trip)",
        flush + d50
    );
    println!(
        "  … for a read asked while it flushes   p50 {:>8.0} µs   (one more round trip + what of the flush the tool's time does not cover)",
        d50 + (flush - d50).max(0.0)
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
        let operator = KeyPair::from_seed([1; 32]);
        let identity = PodIdentity {
            namespace: "bench".into(),
            pod: "bench-run-1".into(),
            pod_uid: "uid".into(),
            username: "system:serviceaccount:bench:default".into(),
        };
        let serve = |file: &str, early: bool, quotas: bool, reads_after_go_ahead: bool| {
            let store = EmbeddedStore::open(&dir.path().join(file)).expect("store");
            let tenants = StaticTenants::default()
                .with_secret("bench", "ops-tools-webhook", "hmac-key", "k")
                .with_controller("bench", "bench-run-1", "Session", &bundle().session);
            if quotas {
                tenants.set_quotas("bench", spend_quotas());
            }
            let service = GatewayService::new(
                store,
                StaticTokens::default().with("bench-token", identity.clone()),
                tenants,
                TenantKeys::new(&KeyPair::from_seed([2; 32])),
                operator.public(),
            )
            .with_endpoint_overrides(vec![(
                "http://ops-tools.shop-platform.svc:8080".into(),
                tools.clone(),
            )]);
            let service = if early {
                service
            } else {
                service.with_answers_after_writes()
            };
            let service = if reads_after_go_ahead {
                service.with_reads_after_their_go_ahead()
            } else {
                service
            };
            let router = Arc::new(service).router();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            tokio::spawn(async move { axum::serve(listener, router).await });
            url
        };
        let url = serve("records.redb", true, false, false);
        let after_writes = serve("baseline.redb", false, false, false);
        let with_quotas = serve("quotas.redb", true, true, false);
        let reads_after_go_ahead = serve("reads-after.redb", true, false, true);
        let rig = Rig {
            url,
            with_quotas,
            after_writes,
            reads_after_go_ahead,
            operator,
            bundle: bundle(),
        };
        let http = contextos_runner::http::client();
        // Warm both paths (connection pools, page cache, the run's built gateway).
        measure(&rig, &tools, &http, "warm-up", 30, &mut Samples::default()).await;

        let flush = flush_p50(dir.path());
        println!("one small write flushed to this disk, alone      p50 {flush:>6.0} µs");
        let append = durable_append_p50(dir.path()).await;
        println!("one durable append to the embedded store, alone  p50 {append:>6.0} µs");
        let (hold, settle) = quota_check_p50(dir.path()).await;
        println!("one call's hold in two SpendQuotas, alone        p50 {hold:>6.0} µs   (before the call)");
        println!(
            "… and its settlement, alone                      p50 {settle:>6.0} µs   (after the answer)"
        );
        let mut samples = Samples::default();
        for run in 0..SHORT_RUNS {
            let run_id = format!("short-{run}");
            measure(&rig, &tools, &http, &run_id, CALLS_PER_SHORT_RUN, &mut samples).await;
        }
        report(
            &format!("{SHORT_RUNS} runs of {CALLS_PER_SHORT_RUN} calls (a session's size)"),
            &mut samples,
            append,
            flush,
        );
        let mut samples = Samples::default();
        measure(&rig, &tools, &http, "long", LONG_RUN_CALLS, &mut samples).await;
        let late = LONG_RUN_CALLS - 100;
        let mut last = Samples {
            direct: samples.direct.split_off(late),
            governed: samples.governed.split_off(late),
            after_writes: samples.after_writes.split_off(late),
            with_quotas: samples.with_quotas.split_off(late),
            reads_after_go_ahead: samples.reads_after_go_ahead.split_off(late),
        };
        report(
            "one run of 1,000 calls: the first 900",
            &mut samples,
            append,
            flush,
        );
        report("the same run: its last 100 calls", &mut last, append, flush);

        phases::start();
        for run in 0..PHASE_RUNS {
            let (client, context) = rig.start(&rig.url, &format!("phases-{run}")).await;
            for i in 0..CALLS_PER_SHORT_RUN {
                let outcome = client
                    .call(&envelope(&context, i), &StateFacts::default())
                    .await
                    .expect("governed");
                assert!(
                    matches!(outcome, CallOutcome::Executed(ref r) if r.ok),
                    "{outcome:?}"
                );
            }
        }
        phases::report(PHASE_RUNS * CALLS_PER_SHORT_RUN);
    });
}
