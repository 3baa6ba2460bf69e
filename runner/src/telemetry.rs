//! Traces over OpenTelemetry. What a run does is a tree of `tracing` spans under the target
//! [`TARGET`] (session, run, step, context compile, model call, critic verdict, tool call,
//! gateway decision, approval wait, record append), exported over OTLP (HTTP, protobuf) when a
//! collector is configured the standard way: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SDK_DISABLED`. Without one nothing
//! is exported and the spans cost what a disabled `tracing` span costs.
//!
//! One Session is one trace: its trace id is the Session's (the RunContext's `trace_id`, which
//! the record keeps), and its root span, `session`, has an id derived from the trace id
//! ([`session_span_id`]), so every attempt of the Session — in this process, a runner pod, or a
//! later resume — is a child of the same root, whoever emits it. W3C trace context goes out in
//! every request the gateway and the runner make (`traceparent`), and comes in from an envelope
//! or a Session annotation.
//!
//! Attributes name what an operator needs — tenant, agent, session, run, step, tool, risk, rule,
//! effect, outcome, model, token counts — never arguments, answers, prompts, people or secrets.

use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState},
};
use sha2::{Digest as _, Sha256};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `tracing` target of every span ContextOS exports.
pub const TARGET: &str = "contextos::trace";

/// The attribute that marks a Session's root span, whose id is rewritten to
/// [`session_span_id`] on export (the SDK chooses span ids itself).
const ANCHOR: &str = "contextos.session_root";
/// The attribute carrying the span that started a Session (from its `traceparent`
/// annotation), which its root span is a child of on export.
const CALLER: &str = "contextos.session_caller";

/// The Session annotation naming the trace a Session belongs to (W3C `traceparent`: a CI
/// pipeline's or a calling service's span), when it should not start its own.
pub const TRACEPARENT_ANNOTATION: &str = "contextos.dev/traceparent";

/// The id of the root span of Session `session` of `tenant`, whose trace is `trace_id`
/// (deterministic: any process can parent a run on it without having seen it; Sessions that
/// share a trace — one caller starting several — each have their own).
pub fn session_span_id(trace_id: TraceId, tenant: &str, session: &str) -> SpanId {
    let mut hasher = Sha256::new();
    hasher.update(b"contextos session\0");
    hasher.update(trace_id.to_bytes());
    for part in [tenant, session] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    SpanId::from_bytes(span_id_of(hasher))
}

/// The first 8 bytes of `hasher`'s digest as a span id (never all zeros: the invalid id).
fn span_id_of(hasher: Sha256) -> [u8; 8] {
    let digest = hasher.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// The trace id a RunContext names (32 lowercase hex characters), if it is one.
pub fn trace_id_of(hex: &str) -> Option<TraceId> {
    (hex.len() == 32 && is_lower_hex(hex))
        .then(|| TraceId::from_hex(hex).ok())
        .flatten()
        .filter(|id| *id != TraceId::INVALID)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether the Session whose trace is `trace_id` is sampled, by the configured sampler
/// (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) applied to the trace id: the same answer
/// in every process, so every attempt of a Session is traced or none is.
pub fn session_sampled(trace_id: TraceId) -> bool {
    static RATIO: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        // Outside [0, 1] clamped, as the SDK's sampler does.
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|a| a.trim().parse::<f64>().ok())
            .filter(|r| !r.is_nan())
            .map(|r| r.clamp(0.0, 1.0));
        match sampler.trim() {
            "always_off" | "parentbased_always_off" => 0.0,
            "traceidratio" | "parentbased_traceidratio" => arg.unwrap_or(1.0),
            _ => 1.0,
        }
    });
    ratio_admits(*RATIO, trace_id)
}

/// The trace-id ratio rule: the trace id's low 63 bits below `ratio` of their range.
fn ratio_admits(ratio: f64, trace_id: TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    let value = u64::from_be_bytes(low) >> 1;
    // 2^63 as f64 is exact; the product is within u64 for ratio < 1.
    (value as f64) < ratio * 9_223_372_036_854_775_808.0
}

fn remote(trace_id: TraceId, span_id: SpanId, sampled: bool) -> Context {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// A W3C `traceparent` of version 00 (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, nothing else)
/// as a remote parent context; anything else is `None`. Values come from tenants' annotations
/// and from runner pods: nothing but this exact shape is taken.
pub fn parse_traceparent(value: &str) -> Option<Context> {
    let (trace, span, sampled) = parse_parts(value)?;
    Some(remote(trace, span, sampled))
}

fn parse_parts(value: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = value.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !(is_lower_hex(trace) && is_lower_hex(span) && is_lower_hex(flags)) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, flags & 1 == 1))
}

/// The trace id (32 lowercase hex digits) of a strict version-00 `traceparent`, if it is one:
/// what a Session's `contextos.dev/traceparent` annotation makes its run's trace.
pub fn traceparent_trace_id(value: &str) -> Option<String> {
    parse_parts(value).map(|(trace, _, _)| trace.to_string())
}

/// A Session's trace as every process serving one of its runs knows it, from the run's signed
/// RunContext (`RunContext::trace`): its id, its root, and whether it is exported (decided once,
/// by the context's issuer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTrace {
    pub trace: TraceId,
    pub tenant: String,
    pub session: String,
    pub sampled: bool,
}

impl SessionTrace {
    /// The id of the Session's root span.
    pub fn root(&self) -> SpanId {
        session_span_id(self.trace, &self.tenant, &self.session)
    }

    /// A context whose parent is the Session's root: what a run span is parented on.
    pub fn under_root(&self) -> Context {
        remote(self.trace, self.root(), self.sampled)
    }

    /// The parent a gateway gives a call (or a model turn) of the run: the span the runner
    /// names (the envelope's or the request's `traceparent`) when it is of this very trace —
    /// sampled as the Session is, whatever the runner's flag says — else the Session's root.
    /// A runner pod's spans reach the collector through the relay under ids mapped for its run
    /// (`relayed_run`; see [`relayed_span_id`]), and so does the span it names here.
    pub fn call_parent(&self, runner_traceparent: &str, relayed_run: Option<&str>) -> Context {
        match parse_parts(runner_traceparent) {
            Some((trace, span, _)) if trace == self.trace => {
                let span = match relayed_run {
                    Some(run) => SpanId::from_bytes(relayed_span_id(self, run, span.to_bytes())),
                    None => span,
                };
                remote(trace, span, self.sampled)
            }
            _ => self.under_root(),
        }
    }
}

/// The id a span of run `run`'s runner pod is forwarded under by the gateway's relay (and its
/// calls are parented on): a pod chooses its spans' ids, so they are mapped through a hash with
/// the run — it cannot make one the id of a span of the gateway, of another run or of a Session
/// root, nor hang its spans under them.
pub fn relayed_span_id(trace: &SessionTrace, run: &str, id: [u8; 8]) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update(b"contextos relayed span\0");
    hasher.update(trace.trace.to_bytes());
    for part in [trace.tenant.as_str(), run] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.update(id);
    span_id_of(hasher)
}

/// The `traceparent` of `span`, when it is being exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    format_traceparent(&span.context())
}

/// The `traceparent` of the innermost exported span this task is in (what an outgoing request
/// carries), whatever spans only the logs record are entered inside it.
pub fn current_traceparent() -> Option<String> {
    format_traceparent(&Context::current())
}

fn format_traceparent(context: &Context) -> Option<String> {
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8() & 1
        )
    })
}

/// Links `span` to the root of Session `session` of `tenant` (trace `trace`) without making it a
/// child: what a replay of one of its runs is.
pub fn link_to_session(span: &tracing::Span, trace: &SessionTrace) {
    span.add_link(trace.under_root().span().span_context().clone());
}

/// Makes `span` a child of `parent` (a remote context). A span already started keeps its parent.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    let _ = span.set_parent(parent);
}

/// The root span of a Session whose trace is `trace` (see [`session_span_id`]), started by
/// `caller` (the span of its `traceparent` annotation) if any: created parented on the
/// Session's root id only so that it takes the Session's trace id; on export it becomes that
/// root, under `caller`.
pub fn session_span(tenant: &str, session: &str, trace: TraceId, caller: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "session",
        contextos.tenant = tenant,
        contextos.session = session,
        contextos.outcome = tracing::field::Empty,
    );
    let caller = caller.and_then(parse_parts).filter(|(t, _, _)| *t == trace);
    // The sampler decides, from the trace id, as for every attempt (a caller's flag is not
    // followed: the processes serving the Session could not all see it).
    let sampled = session_sampled(trace);
    let root = session_span_id(trace, tenant, session);
    set_parent(&span, remote(trace, root, sampled));
    span.set_attribute(ANCHOR, root.to_string());
    if let Some((_, caller, _)) = caller {
        span.set_attribute(CALLER, caller.to_string());
    }
    span
}

#[cfg(feature = "otlp")]
pub use export::{Telemetry, from_env};
#[cfg(feature = "otlp")]
pub mod relay;
#[cfg(feature = "otlp")]
pub mod sink;

/// What a runner pod sends with its spans to the gateway's relay (`/v1/run/traces`): the same
/// credentials as every other request of its run — its projected token, read afresh for each
/// batch (the kubelet rotates it), and its signed RunContext.
#[derive(Clone, Debug)]
pub struct RelayCredentials {
    pub token_file: std::path::PathBuf,
    /// The `x-contextos-run-context` header's value (base64 of the signed RunContext's JSON).
    pub run_context: String,
}

/// A Session's root span, made when the Session has ended (by the operator, which sees it from
/// creation to end): its id is [`session_span_id`], so the runs parented on that id while it
/// ran are its children.
#[derive(Clone, Copy, Debug)]
pub struct SessionRoot<'a> {
    pub tenant: &'a str,
    pub session: &'a str,
    pub agent: &'a str,
    pub trace: TraceId,
    /// The Session's `contextos.dev/traceparent` annotation: the root is that span's child.
    pub caller: Option<&'a str>,
    pub started: std::time::SystemTime,
    pub ended: std::time::SystemTime,
    /// The phase it ended in (`Succeeded`, `Failed`, `Cancelled`).
    pub outcome: &'a str,
    pub attempts: u32,
}

/// Exports `root` through this process's tracer provider (nothing happens without one: see
/// [`from_env`]).
pub fn export_session_root(root: &SessionRoot<'_>) {
    use opentelemetry::{
        KeyValue,
        trace::{Span as _, SpanKind, Tracer as _},
    };
    let tracer = opentelemetry::global::tracer("contextos");
    let caller = root
        .caller
        .and_then(parse_parts)
        .filter(|(trace, _, _)| *trace == root.trace);
    // As the RunContexts of its runs were issued (by this process's sampler).
    let sampled = session_sampled(root.trace);
    let id = session_span_id(root.trace, root.tenant, root.session);
    let mut attributes = vec![
        KeyValue::new("contextos.tenant", root.tenant.to_owned()),
        KeyValue::new("contextos.session", root.session.to_owned()),
        KeyValue::new("contextos.agent", root.agent.to_owned()),
        KeyValue::new("contextos.outcome", root.outcome.to_owned()),
        KeyValue::new("contextos.attempts", i64::from(root.attempts)),
        KeyValue::new(ANCHOR, id.to_string()),
    ];
    if let Some((_, caller, _)) = caller {
        attributes.push(KeyValue::new(CALLER, caller.to_string()));
    }
    let mut span = tracer
        .span_builder("session")
        .with_kind(SpanKind::Internal)
        .with_start_time(root.started)
        .with_attributes(attributes)
        .start_with_context(&tracer, &remote(root.trace, id, sampled));
    span.end_with_timestamp(root.ended);
}

/// Whether the environment configures an OTLP trace exporter.
pub fn configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The OTLP exporter (feature `otlp`).
#[cfg(feature = "otlp")]
mod export {
    use std::time::Duration;

    use opentelemetry::{
        Context, KeyValue,
        trace::{SpanContext, SpanId, TracerProvider as _},
    };
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};

    use super::{ANCHOR, CALLER, TARGET, configured};

    /// The exporter, while spans are exported: dropping it flushes what is buffered (bounded by the
    /// exporter's timeout) and stops the export thread.
    pub struct Telemetry {
        provider: SdkTracerProvider,
    }

    impl Drop for Telemetry {
        fn drop(&mut self) {
            let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
        }
    }

    impl std::fmt::Debug for Telemetry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Telemetry")
        }
    }

    /// The layer exporting ContextOS's spans, and the exporter to keep alive while they are made,
    /// when the environment configures one (see the module's documentation); `service` is the
    /// service name unless `OTEL_SERVICE_NAME` says otherwise. Call before any async runtime starts
    /// (the exporter's HTTP client runs on its own thread).
    pub fn from_env<S>(
        service: &'static str,
        relay: Option<super::RelayCredentials>,
    ) -> Result<Option<(impl tracing_subscriber::Layer<S>, Telemetry)>, String>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        use tracing_subscriber::Layer as _;

        if !configured() {
            return Ok(None);
        }
        let client = Credentialed {
            inner: crate::http::blocking_client()
                .map_err(|e| format!("the OTLP exporter's HTTP client: {e}"))?,
            relay,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(client)
            .build()
            .map_err(|e| format!("the OTLP trace exporter (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(service);
        }
        let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(SessionRoots { inner: batch })
            .with_resource(
                resource
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        // The operator's Session roots are made through the global provider.
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let tracer = provider.tracer("contextos");
        // Only the attributes ContextOS sets: no source locations, threads or timings.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO),
            );
        Ok(Some((layer, Telemetry { provider })))
    }

    /// The exporter's HTTP client; in a runner pod it presents the run's credentials to the
    /// gateway's relay with every batch.
    #[derive(Debug)]
    struct Credentialed {
        inner: reqwest::blocking::Client,
        relay: Option<super::RelayCredentials>,
    }

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for Credentialed {
        async fn send_bytes(
            &self,
            mut request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
        ) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError>
        {
            use reqwest::header::{AUTHORIZATION, HeaderValue};
            if let Some(relay) = &self.relay {
                let token = std::fs::read_to_string(&relay.token_file)?;
                let headers = request.headers_mut();
                headers.insert(
                    AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer {}", token.trim()))?,
                );
                headers.insert(
                    crate::records::store::remote::RUN_CONTEXT_HEADER,
                    HeaderValue::from_str(&relay.run_context)?,
                );
            }
            self.inner.send_bytes(request).await
        }
    }

    /// Gives each Session root span its deterministic id (and no parent) before it is exported.
    #[derive(Debug)]
    struct SessionRoots<P> {
        inner: P,
    }

    impl<P: SpanProcessor> SpanProcessor for SessionRoots<P> {
        fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
            self.inner.on_start(span, cx);
        }

        fn on_end(&self, mut span: SpanData) {
            let root = span
                .attributes
                .iter()
                .position(|kv| kv.key.as_str() == ANCHOR)
                .map(|at| span.attributes.remove(at))
                .and_then(|kv| SpanId::from_hex(kv.value.as_str().as_ref()).ok());
            if let Some(root) = root {
                let old = &span.span_context;
                span.span_context = SpanContext::new(
                    old.trace_id(),
                    root,
                    old.trace_flags(),
                    false,
                    old.trace_state().clone(),
                );
                let caller = span
                    .attributes
                    .iter()
                    .position(|kv| kv.key.as_str() == CALLER)
                    .map(|at| span.attributes.remove(at))
                    .and_then(|kv| SpanId::from_hex(kv.value.as_str().as_ref()).ok());
                span.parent_span_id = caller.unwrap_or(SpanId::INVALID);
                span.parent_span_is_remote = caller.is_some();
            }
            self.inner.on_end(span);
        }

        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            self.inner.force_flush()
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
            self.inner.set_resource(resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_w3c_says_and_nothing_else() {
        let parent =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        let span = parent.span();
        let context = span.span_context();
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        // Only version 00, lowercase, exactly: these values come from tenants and runner pods.
        for strict in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y",
        ] {
            assert!(parse_traceparent(strict).is_none(), "{strict:?}");
        }
    }

    #[test]
    fn a_sessions_root_id_depends_on_its_trace_tenant_and_name() {
        let trace = trace_id_of("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
        let other = trace_id_of("4bf92f3577b34da6a3ce929d0e0e4737").expect("trace id");
        let root = session_span_id(trace, "shop", "refund-7");
        assert_eq!(root, session_span_id(trace, "shop", "refund-7"));
        for (t, tenant, session) in [
            (other, "shop", "refund-7"),
            (trace, "shop", "refund-8"),
            (trace, "shopx", "refund-7"),
            (trace, "sho", "prefund-7"),
        ] {
            assert_ne!(root, session_span_id(t, tenant, session), "{tenant}/{session}");
        }
        assert_ne!(root, SpanId::INVALID);
        assert!(trace_id_of("not hex").is_none());
        assert!(trace_id_of("4BF92F3577B34DA6A3CE929D0E0E4736").is_none());
        assert!(trace_id_of("00000000000000000000000000000000").is_none());
    }

    #[test]
    fn a_runner_cannot_move_its_calls_into_another_trace_or_force_sampling() {
        let trace = trace_id_of("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
        let session = SessionTrace {
            trace,
            tenant: "shop".into(),
            session: "refund-7".into(),
            sampled: false,
        };
        let parent = |value: &str| session.call_parent(value, None).span().span_context().clone();
        let own = parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(own.span_id().to_string(), "00f067aa0ba902b7");
        let elsewhere = parent("00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01");
        assert_eq!(
            (elsewhere.trace_id(), elsewhere.span_id()),
            (trace, session_span_id(trace, "shop", "refund-7"))
        );
        assert_eq!(
            parent("garbage").span_id(),
            session_span_id(trace, "shop", "refund-7")
        );
        assert!(
            !parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_sampled(),
            "the runner's flag is not taken: the Session's decision is"
        );
        // A relayed runner's span is named by the id the relay forwards it under.
        let relayed = session
            .call_parent(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("refund-7-abc"),
            )
            .span()
            .span_context()
            .span_id();
        let id = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
        let mapped = relayed_span_id(&session, "refund-7-abc", id);
        assert_eq!(relayed.to_bytes(), mapped);
        assert_ne!(mapped, relayed_span_id(&session, "refund-7-abd", id));
        let elsewhere = SessionTrace {
            tenant: "bank".into(),
            ..session.clone()
        };
        assert_ne!(mapped, relayed_span_id(&elsewhere, "refund-7-abc", id));
    }

    #[test]
    fn the_ratio_rule_is_the_trace_ids_low_bits() {
        let low = TraceId::from_hex("ffffffffffffffff0000000000000001").expect("id");
        let high = TraceId::from_hex("0000000000000000fffffffffffffffe").expect("id");
        assert!(ratio_admits(0.5, low) && !ratio_admits(0.5, high));
        assert!(ratio_admits(1.0, high) && !ratio_admits(0.0, low));
    }
}
