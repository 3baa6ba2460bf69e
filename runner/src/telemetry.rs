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

/// The id of the root span of the Session whose trace is `trace_id` (deterministic: any
/// process can parent a run on it without having seen it).
pub fn session_span_id(trace_id: TraceId) -> SpanId {
    let digest = Sha256::digest([b"contextos session ".as_slice(), &trace_id.to_bytes()].concat());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    // All zeros is the invalid span id.
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId::from_bytes(id)
}

/// The trace id a RunContext names (32 hex characters), if it is one.
pub fn trace_id_of(hex: &str) -> Option<TraceId> {
    TraceId::from_hex(hex).ok().filter(|id| *id != TraceId::INVALID)
}

/// A context whose parent is the root span of the Session with `trace_id`: what a run span
/// is parented on.
pub fn under_session(trace_id: TraceId) -> Context {
    remote(trace_id, session_span_id(trace_id), true)
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

/// Parses a W3C `traceparent` (`00-<trace>-<span>-<flags>`) into a remote parent context.
pub fn parse_traceparent(value: &str) -> Option<Context> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(remote(trace, span, flags & 1 == 1))
}

/// The `traceparent` of `span`, when it is being exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of `parent` (a remote context). A span already started keeps its parent.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    let _ = span.set_parent(parent);
}

/// The trace id (hex) of a W3C `traceparent`, if it is a valid one.
pub fn trace_id_in(traceparent: &str) -> Option<String> {
    let context = parse_traceparent(traceparent)?;
    let trace = context.span().span_context().trace_id();
    Some(trace.to_string())
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
    set_parent(&span, under_session(trace));
    span.set_attribute(ANCHOR, true);
    let caller = caller
        .and_then(parse_traceparent)
        .map(|c| c.span().span_context().clone())
        .filter(|c| c.trace_id() == trace);
    if let Some(caller) = caller {
        span.set_attribute(CALLER, caller.span_id().to_string());
    }
    span
}

#[cfg(feature = "otlp")]
pub use export::{Telemetry, from_env};

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

    use super::{ANCHOR, CALLER, TARGET, configured, session_span_id};

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
    ) -> Result<Option<(impl tracing_subscriber::Layer<S>, Telemetry)>, String>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        use tracing_subscriber::Layer as _;

        if !configured() {
            return Ok(None);
        }
        let client =
            crate::http::blocking_client().map_err(|e| format!("the OTLP exporter's HTTP client: {e}"))?;
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
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let tracer = provider.tracer("contextos");
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO),
        );
        Ok(Some((layer, Telemetry { provider })))
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
            if let Some(at) = span.attributes.iter().position(|kv| kv.key.as_str() == ANCHOR) {
                span.attributes.remove(at);
                let old = &span.span_context;
                span.span_context = SpanContext::new(
                    old.trace_id(),
                    session_span_id(old.trace_id()),
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
        // A later version may carry more fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x").is_some());
    }

    #[test]
    fn a_sessions_root_id_depends_on_its_trace_only() {
        let trace = trace_id_of("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
        let other = trace_id_of("4bf92f3577b34da6a3ce929d0e0e4737").expect("trace id");
        assert_eq!(session_span_id(trace), session_span_id(trace));
        assert_ne!(session_span_id(trace), session_span_id(other));
        assert_ne!(session_span_id(trace), SpanId::INVALID);
        assert!(trace_id_of("not hex").is_none());
        assert!(trace_id_of("00000000000000000000000000000000").is_none());
    }
}
