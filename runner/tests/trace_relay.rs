//! The gateway service's relay of runner pods' spans (`POST /v1/run/traces`), read back from a
//! real trace backend (Jaeger; see support/jaeger.rs). A runner pod reaches nothing but the
//! gateway, so its spans reach the collector only through it — and the pod may run hostile
//! code: it sends its own spans with forged ones among them (another trace, the Session's root,
//! spans runners do not make, attributes carrying arguments and another tenant), and only its
//! own run's spans arrive, under the gateway's resource and ids mapped for its run, cut to
//! operator facts. A Session that is not sampled sends nothing on, and a tenant whose batches
//! wait on a stalled collector has its next ones dropped, answered at once.
//!
//! Pod identities come from a fixed token table (`StaticTokens`, a test double of the API
//! server's TokenReview); the install test relays real runner pods' spans.

#[path = "support/jaeger.rs"]
mod jaeger;

use std::{path::PathBuf, sync::Arc};

use base64::Engine as _;
use contextos_runner::{
    gateway::{
        identity::{PodIdentity, StaticTokens},
        remote::RUN_CONTEXT_HEADER,
        service::GatewayService,
        tenancy::StaticTenants,
    },
    keys::{KeyPair, TenantKeys},
    manifests::ManifestSet,
    records::store::scratch::ScratchStore,
    run::issue_run_context,
    run_context::SignedRunContext,
    telemetry::{relayed_span_id, session_span_id, sink::TraceSink, trace_id_of},
};
use jaeger::{Jaeger, get};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost_otlp::Message as _;

const RUN: &str = "checkout-5xx-r1";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const OTHER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const POD: &str = "checkout-5xx-run-1";

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn span(trace: &str, id: [u8; 8], parent: [u8; 8], name: &str, attributes: Vec<KeyValue>) -> Span {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    Span {
        trace_id: hex(trace),
        span_id: id.to_vec(),
        parent_span_id: parent.to_vec(),
        name: name.into(),
        start_time_unix_nano: now - 2_000_000,
        end_time_unix_nano: now,
        attributes,
        ..Span::default()
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn batch(spans: Vec<Span>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            // What the pod claims to be: not what the collector is told.
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", "contextos-gateway"),
                    text("k8s.pod.name", "someone-else"),
                ],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..ScopeSpans::default()
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

/// A gateway service on loopback relaying to `sink` (none: it relays nothing).
async fn service(sink: Option<TraceSink>, operator: &KeyPair) -> String {
    let store = Arc::new(ScratchStore::default());
    let tenants = StaticTenants::default()
        .with_controller("shop", POD, "Session", "checkout-5xx")
        .with_controller("bank", POD, "Session", "checkout-5xx");
    let pod = |namespace: &str, name: &str| PodIdentity {
        namespace: namespace.into(),
        pod: name.into(),
        pod_uid: format!("uid-{name}"),
        username: format!("system:serviceaccount:{namespace}:default"),
    };
    let tokens = StaticTokens::default()
        .with("token-run-1", pod("shop", POD))
        .with("token-bank", pod("bank", POD));
    let mut service = GatewayService::new(
        store,
        tokens,
        tenants,
        TenantKeys::new(&KeyPair::from_seed([12; 32])),
        operator.public(),
    );
    if let Some(sink) = sink {
        service = service.with_trace_sink(sink);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = Arc::new(service).router();
    tokio::spawn(async move {
        let _ = contextos_runner::serve::serve(listener, router, Default::default(), std::future::pending())
            .await;
    });
    url
}

fn quickstart_bundle() -> contextos_runner::run::bundle::RunBundle {
    quickstart_bundle_in("shop")
}

fn quickstart_bundle_in(tenant: &str) -> contextos_runner::run::bundle::RunBundle {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    ManifestSet::load(&[examples])
        .expect("quickstart manifests")
        .bundle(tenant, None)
        .expect("bundle")
}

/// The RunContext the operator issues the pod, sampled as `sampled` says (`None`: as issued).
fn context_for(
    bundle: &contextos_runner::run::bundle::RunBundle,
    operator: &KeyPair,
    sampled: Option<bool>,
) -> SignedRunContext {
    let now = contextos_runner::records::recorder::now_ms();
    let issued = issue_run_context(bundle, RUN, TRACE, Some(POD), operator, now).expect("context");
    match sampled {
        None => issued,
        Some(sampled) => {
            let mut context = issued.context;
            context.trace_sampled = Some(sampled);
            SignedRunContext::sign(context, operator)
        }
    }
}

fn header(context: &SignedRunContext) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(context).expect("json"))
}

async fn post(
    url: &str,
    token: Option<&str>,
    context: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/v1/run/traces"))
        .header(RUN_CONTEXT_HEADER, context)
        .header("content-type", content_type)
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("the service answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_pods_spans_reach_the_collector_only_as_its_own_runs() {
    let Some(jaeger) = Jaeger::start("127.0.0.1") else {
        return;
    };
    let operator = KeyPair::from_seed([11; 32]);
    let url = service(
        Some(TraceSink::to(
            format!("{}/v1/traces", jaeger.otlp),
            Default::default(),
        )),
        &operator,
    )
    .await;
    let bundle = quickstart_bundle();
    let context = header(&context_for(&bundle, &operator, None));

    let trace = trace_id_of(TRACE).expect("trace");
    let root = session_span_id(trace, "shop", &bundle.session).to_bytes();
    let run_id = [1, 0, 0, 0, 0, 0, 0, 1];
    let step_id = [1, 0, 0, 0, 0, 0, 0, 2];
    let spans = vec![
        // The pod's own: its run under the Session's root, a step under the run.
        span(
            TRACE,
            run_id,
            root,
            "run",
            vec![text("contextos.tenant", "bank"), text("contextos.run", RUN)],
        ),
        span(
            TRACE,
            step_id,
            run_id,
            "step",
            vec![
                text("contextos.arguments", "{\"card\": \"4111 1111 1111 1111\"}"),
                text("enduser.id", "dana@example.com"),
            ],
        ),
        // Forged: another Session's trace, the Session's root, a span runners do not make.
        span(
            OTHER_TRACE,
            [2, 0, 0, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 0, 0, 9],
            "run",
            vec![],
        ),
        span(TRACE, root, [0; 8], "session", vec![]),
        span(TRACE, [3, 0, 0, 0, 0, 0, 0, 1], run_id, "http.request", vec![]),
    ];

    // Nobody's, or another tenant's pod with this run's context, refused before anything else;
    // then only OTLP's protobuf, and only what a batch can be.
    const PROTOBUF: &str = "application/x-protobuf";
    for (why, token, content_type, body, status) in [
        ("no token", None, PROTOBUF, batch(spans.clone()), 401),
        (
            "another tenant's pod",
            Some("token-bank"),
            PROTOBUF,
            batch(spans.clone()),
            403,
        ),
        (
            "JSON",
            Some("token-run-1"),
            "application/json",
            b"{}".to_vec(),
            415,
        ),
        ("not protobuf", Some("token-run-1"), PROTOBUF, vec![0xff; 64], 400),
        (
            "over 1 MiB",
            Some("token-run-1"),
            PROTOBUF,
            vec![0; (1 << 20) + 1],
            413,
        ),
    ] {
        let refused = post(&url, token, &context, content_type, body).await;
        assert_eq!(refused.status(), status, "{why}: {:?}", refused.text().await);
    }
    // A gateway that exports nowhere relays nothing, and says why.
    let exporting_nowhere = service(None, &operator).await;
    let refused = post(
        &exporting_nowhere,
        Some("token-run-1"),
        &context,
        "application/x-protobuf",
        batch(spans.clone()),
    )
    .await;
    assert_eq!(refused.status(), 404);
    assert!(
        refused
            .text()
            .await
            .expect("body")
            .contains("traces_not_collected")
    );

    let answer = post(
        &url,
        Some("token-run-1"),
        &context,
        "application/x-protobuf",
        batch(spans),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let answer =
        ExportTraceServiceResponse::decode(answer.bytes().await.expect("body")).expect("an OTLP answer");
    let partial = answer.partial_success.expect("the refused spans are counted");
    assert_eq!(partial.rejected_spans, 3, "{partial:?}");

    let query = jaeger.query.clone();
    let found = tokio::task::spawn_blocking(move || jaeger.trace(TRACE, &["contextos-runner"]))
        .await
        .expect("trace");
    let names: Vec<&str> = found.spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let run = found.named("run")[0];
    let step = found.named("step")[0];
    assert_eq!(step.parent.as_deref(), Some(run.id.as_str()));
    // Under the ids the relay gives the run's spans, not the pod's own.
    let hex_of = |id: [u8; 8]| id.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let session = contextos_runner::telemetry::SessionTrace {
        trace,
        tenant: "shop".into(),
        session: bundle.session.clone(),
        sampled: true,
    };
    assert_eq!(run.id, hex_of(relayed_span_id(&session, RUN, run_id)));
    assert_eq!(run.parent.as_deref(), Some(hex_of(root).as_str()));
    // The verified tenant and pod, whatever the pod said.
    assert_eq!(run.tags["contextos.tenant"], "shop");
    for span in [run, step] {
        assert_eq!(span.service, "contextos-runner");
        assert_eq!(span.process["k8s.pod.name"], POD);
        assert_eq!(span.process["contextos.tenant"], "shop");
        assert_eq!(span.process["contextos.run"], RUN);
    }
    assert!(
        !step.tags.contains_key("contextos.arguments") && !step.tags.contains_key("enduser.id"),
        "{:?}",
        step.tags
    );
    // Nothing went into the other trace.
    let other = tokio::task::spawn_blocking(move || get(&format!("{query}/api/traces/{OTHER_TRACE}")))
        .await
        .expect("query");
    assert!(
        other
            .as_ref()
            .is_none_or(|v| v["data"].as_array().is_none_or(|d| d.is_empty())),
        "{other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_session_sends_nothing_on_and_a_stalled_collector_costs_only_its_tenants_spans() {
    // A collector that takes connections and never answers.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stalled_url = format!("http://{}/v1/traces", stalled.local_addr().expect("addr"));
    let (seen, mut requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = stalled.accept().await {
            let _ = seen.send(());
            held.push(connection);
        }
    });
    let operator = KeyPair::from_seed([11; 32]);
    let url = service(Some(TraceSink::to(stalled_url, Default::default())), &operator).await;
    let bundle = quickstart_bundle();
    let trace = trace_id_of(TRACE).expect("trace");
    let root = session_span_id(trace, "shop", &bundle.session).to_bytes();
    let batch_of_one = || batch(vec![span(TRACE, [1, 0, 0, 0, 0, 0, 0, 1], root, "run", vec![])]);
    let answer_of =
        |bytes: axum::body::Bytes| ExportTraceServiceResponse::decode(bytes).expect("an OTLP answer");

    // Not sampled: answered, and nothing reaches the collector.
    let unsampled = header(&context_for(&bundle, &operator, Some(false)));
    let answer = post(
        &url,
        Some("token-run-1"),
        &unsampled,
        "application/x-protobuf",
        batch_of_one(),
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert!(
        answer_of(answer.bytes().await.expect("body"))
            .partial_success
            .is_none()
    );

    // Sampled: each batch is answered at once while its forward waits on the collector; the
    // tenant's fifth batch finds its four places taken and is dropped, saying so.
    let sampled = header(&context_for(&bundle, &operator, Some(true)));
    for _ in 0..4 {
        let started = std::time::Instant::now();
        let answer = post(
            &url,
            Some("token-run-1"),
            &sampled,
            "application/x-protobuf",
            batch_of_one(),
        )
        .await;
        assert_eq!(answer.status(), 200);
        assert!(
            answer_of(answer.bytes().await.expect("body"))
                .partial_success
                .is_none()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "answered while forwarding"
        );
    }
    for _ in 0..4 {
        tokio::time::timeout(std::time::Duration::from_secs(5), requests.recv())
            .await
            .expect("the forwards reach the collector")
            .expect("a connection");
    }
    let answer = post(
        &url,
        Some("token-run-1"),
        &sampled,
        "application/x-protobuf",
        batch_of_one(),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let dropped = answer_of(answer.bytes().await.expect("body"))
        .partial_success
        .expect("the batch is dropped");
    assert_eq!(dropped.rejected_spans, 1);
    assert!(dropped.error_message.contains("dropped"), "{dropped:?}");
    // Another tenant's batch still goes on: a fifth connection.
    let bank = header(&context_for(&quickstart_bundle_in("bank"), &operator, Some(true)));
    let bank_root = session_span_id(trace, "bank", &bundle.session).to_bytes();
    let answer = post(
        &url,
        Some("token-bank"),
        &bank,
        "application/x-protobuf",
        batch(vec![span(
            TRACE,
            [1, 0, 0, 0, 0, 0, 0, 1],
            bank_root,
            "run",
            vec![],
        )]),
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert!(
        answer_of(answer.bytes().await.expect("body"))
            .partial_success
            .is_none()
    );
    tokio::time::timeout(std::time::Duration::from_secs(5), requests.recv())
        .await
        .expect("the other tenant's forward reaches the collector")
        .expect("a connection");
    // The unsampled Session never reached it: five connections in all.
    assert!(requests.try_recv().is_err());
}
