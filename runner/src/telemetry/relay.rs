//! What the gateway forwards of the spans a runner pod sends it (`POST /v1/run/traces`, OTLP over
//! HTTP with protobuf). A runner pod reaches nothing but the gateway, so its spans — its run,
//! steps, context compiles, model calls, critic verdicts — reach the collector through it. The
//! pod is a tenant's sandbox and may run hostile code: its spans are taken only as far as they
//! describe its own run. This module is the decision, without IO: the service authenticates the
//! pod, [`measure`]s the body on the wire before decoding it, and forwards what [`admit`] returns.
//!
//! A span is forwarded when it is of the run's verified trace, has a name a runner makes, a
//! parent (a `run` span's is the Session's root, which no other span may name or be), and times
//! within the run's validity. Its ids are mapped for the run ([`super::relayed_span_id`]), so a
//! pod cannot give a span the id of one of the gateway's or another run's, nor hang its spans
//! under them. What it says is cut down to the attributes runner spans carry, each of the type
//! and from the values they have (free text — a stolen argument, a person's name — has nowhere
//! to go), with the tenant, agent, Session and run the gateway verified in place of the pod's
//! own; its kind follows from its name; status messages, events and links are dropped. The
//! resource (the service, the pod) is the gateway's to say.

use super::SessionTrace;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind},
};

/// The service name relayed spans are exported under.
pub const RUNNER_SERVICE: &str = "contextos-runner";
/// Spans one request may carry (the SDK's batches hold 512).
pub const MAX_SPANS: usize = 2048;
/// Length-delimited items (messages, texts) one request may carry: what decoding it allocates
/// is bounded by this, not by its bytes (an empty span is two bytes on the wire).
pub const MAX_ITEMS: usize = 65_536;
/// How deeply messages may nest (attribute values can hold arrays of arrays…).
const MAX_DEPTH: usize = 12;
/// The characters of a span's name quoted in a refusal.
const MAX_QUOTED: usize = 64;

/// The spans a runner pod makes (see `run::engine`), each with its kind. Not among them:
/// `session` (a Session's root is the operator's) and the gateway's own — `tool.call`,
/// `gateway.decision`, `approval.wait`, `model.proxy`, `record.append` — which a runner must
/// not be able to counterfeit in the trace people read decisions from.
const RUNNER_SPANS: &[(&str, SpanKind)] = &[
    ("run", SpanKind::Internal),
    ("step", SpanKind::Internal),
    ("context.compile", SpanKind::Internal),
    ("model.call", SpanKind::Client),
    ("critic.verdict", SpanKind::Internal),
];

/// Spans a runner pod makes that the relay leaves out without counting them refused: its
/// appends are requests to the gateway, whose own `record.append` spans are the appends.
const OMITTED_SPANS: &[&str] = &["record.append"];

/// What each attribute of a runner span may hold.
#[derive(Clone, Copy)]
enum Allowed {
    /// Whatever the pod says, the value the gateway verified.
    Verified(fn(&RelayedRun<'_>) -> String),
    /// A count no larger than the run allows (an integer, or its decimal text, as `tracing`
    /// records unsigned fields).
    Count(fn(&RelayedRun<'_>) -> u64),
    Bool,
    OneOf(&'static [&'static str]),
}

/// The spans one run may have relayed in all (its attempts together), by its step budget: a
/// step makes three (the step, its model call, its verdict), an attempt two more.
pub fn run_span_budget(max_steps: u32) -> usize {
    let steps = usize::try_from(max_steps).unwrap_or(usize::MAX);
    steps.saturating_add(2).saturating_mul(8).saturating_add(32)
}

/// The most entries one append of a runner's may hold, as far as its spans say.
const MAX_ENTRIES: u64 = 4096;

/// The attributes runner spans carry, and what each may hold.
const RUNNER_ATTRIBUTES: &[(&str, Allowed)] = &[
    (
        "contextos.tenant",
        Allowed::Verified(|run| run.trace.tenant.clone()),
    ),
    ("contextos.agent", Allowed::Verified(|run| run.agent.to_owned())),
    (
        "contextos.session",
        Allowed::Verified(|run| run.trace.session.clone()),
    ),
    ("contextos.run", Allowed::Verified(|run| run.run.to_owned())),
    // A run's steps are bounded by its signed budget (the one after the last is the answer).
    (
        "contextos.step",
        Allowed::Count(|run| u64::from(run.max_steps) + 1),
    ),
    ("contextos.entries", Allowed::Count(|_| MAX_ENTRIES)),
    ("contextos.resumed", Allowed::Bool),
    ("contextos.replay", Allowed::Bool),
    (
        "contextos.verdict",
        Allowed::OneOf(&["Continue", "Revise", "Halt", "Escalate"]),
    ),
    (
        "contextos.outcome",
        Allowed::OneOf(&[
            "completed",
            "failed",
            "awaiting_approval",
            "awaiting_resolution",
            "error",
            "answer",
            "tool_calls",
        ]),
    ),
    // Token counts and the model are not taken from the pod: the gateway's `model.proxy`, under
    // each `model.call`, says what the model was asked and answered.
];

/// The run a relayed request is for, as the gateway verified it (token and RunContext).
#[derive(Clone, Copy, Debug)]
pub struct RelayedRun<'a> {
    /// The Session's trace, tenant and name.
    pub trace: &'a SessionTrace,
    pub agent: &'a str,
    pub run: &'a str,
    /// The run's step budget.
    pub max_steps: u32,
    /// The pod, from its verified token.
    pub pod: &'a str,
    /// When the run's spans may start and end (Unix nanoseconds): from its RunContext's issue
    /// to now, each with some leeway for clocks.
    pub window: (u64, u64),
}

/// What a request holds, counted on its wire form (see [`measure`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub spans: usize,
    pub items: usize,
}

/// Counts the spans and the length-delimited items of an OTLP `ExportTraceServiceRequest` on its
/// wire form, allocating nothing: a request over [`MAX_SPANS`] or [`MAX_ITEMS`], nested deeper
/// than spans are, or not protobuf is refused before it is decoded.
pub fn measure(bytes: &[u8]) -> Result<Shape, String> {
    let mut shape = Shape::default();
    walk(bytes, Message::Request, 0, &mut shape)?;
    Ok(shape)
}

/// The messages of an OTLP trace export (field numbers from opentelemetry-proto).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Message {
    Request,
    ResourceSpans,
    Resource,
    EntityRef,
    ScopeSpans,
    Scope,
    Span,
    Event,
    Link,
    Status,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

/// What length-delimited field `field` of `message` is: `Some(Some(m))` a message, `Some(None)`
/// text or bytes, `None` a field the decoder skips.
fn field_of(message: Message, field: u64) -> Option<Option<Message>> {
    use Message::*;
    let child = match (message, field) {
        (Request, 1) => ResourceSpans,
        (ResourceSpans, 1) => Resource,
        (ResourceSpans, 2) => ScopeSpans,
        (Resource, 1) | (Scope, 3) | (Span, 9) | (Event, 3) | (Link, 4) | (KeyValueList, 1) => KeyValue,
        (Resource, 3) => EntityRef,
        (ScopeSpans, 1) => Scope,
        (ScopeSpans, 2) => Span,
        (Span, 11) => Event,
        (Span, 13) => Link,
        (Span, 15) => Status,
        (KeyValue, 2) | (ArrayValue, 1) => AnyValue,
        (AnyValue, 5) => ArrayValue,
        (AnyValue, 6) => KeyValueList,
        (ResourceSpans, 3)
        | (EntityRef, 1..=4)
        | (ScopeSpans, 3)
        | (Scope, 1 | 2)
        | (Span, 1..=5)
        | (Event, 2)
        | (Link, 1..=3)
        | (Status, 2)
        | (KeyValue, 1)
        | (AnyValue, 1 | 7) => return Some(None),
        _ => return None,
    };
    Some(Some(child))
}

fn walk(bytes: &[u8], message: Message, depth: usize, shape: &mut Shape) -> Result<(), String> {
    const TRUNCATED: &str = "the body is not an OTLP ExportTraceServiceRequest (a field runs past its end)";
    if depth > MAX_DEPTH {
        return Err(format!("messages nested more than {MAX_DEPTH} deep"));
    }
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at).ok_or(TRUNCATED)?;
        let skip = |at: usize, n: usize| at.checked_add(n).filter(|end| *end <= bytes.len());
        match key & 7 {
            0 => {
                varint(bytes, &mut at).ok_or(TRUNCATED)?;
            }
            1 => at = skip(at, 8).ok_or(TRUNCATED)?,
            5 => at = skip(at, 4).ok_or(TRUNCATED)?,
            2 => {
                let length = varint(bytes, &mut at).ok_or(TRUNCATED)?;
                let end = usize::try_from(length)
                    .ok()
                    .and_then(|n| skip(at, n))
                    .ok_or(TRUNCATED)?;
                if let Some(child) = field_of(message, key >> 3) {
                    shape.items += 1;
                    if shape.items > MAX_ITEMS {
                        return Err(format!("more than {MAX_ITEMS} items in one request"));
                    }
                    if let Some(child) = child {
                        if child == Message::Span {
                            shape.spans += 1;
                            if shape.spans > MAX_SPANS {
                                return Err(format!("more than {MAX_SPANS} spans in one request"));
                            }
                        }
                        walk(&bytes[at..end], child, depth + 1, shape)?;
                    }
                }
                at = end;
            }
            _ => {
                return Err(
                    "the body is not an OTLP ExportTraceServiceRequest (a group or an unknown wire type)"
                        .into(),
                );
            }
        }
    }
    Ok(())
}

/// A protobuf varint at `*at`, moving past it.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// What [`admit`] decided: the request to forward (empty when nothing is), and the spans
/// refused, with the first reason.
#[derive(Debug)]
pub struct Admitted {
    pub request: ExportTraceServiceRequest,
    pub forwarded: usize,
    pub rejected: usize,
    pub reason: Option<String>,
}

impl Admitted {
    /// Keeps the first `most` spans to forward; the others are refused for `reason`.
    pub fn keep_at_most(&mut self, most: usize, reason: &str) {
        if self.forwarded <= most {
            return;
        }
        let over = self.forwarded - most;
        for resource in &mut self.request.resource_spans {
            for scope in &mut resource.scope_spans {
                scope.spans.truncate(most);
            }
        }
        if most == 0 {
            self.request.resource_spans.clear();
        }
        self.forwarded = most;
        self.rejected += over;
        self.reason.get_or_insert_with(|| reason.to_owned());
    }

    /// The OTLP answer to the runner: partial success names what was refused.
    pub fn response(&self) -> ExportTraceServiceResponse {
        ExportTraceServiceResponse {
            partial_success: (self.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: i64::try_from(self.rejected).unwrap_or(i64::MAX),
                error_message: self.reason.clone().unwrap_or_default(),
            }),
        }
    }
}

/// The spans of `request` that describe `run`, each cut to what a runner's span says, under the
/// gateway's resource (see the module's documentation).
pub fn admit(request: ExportTraceServiceRequest, run: &RelayedRun<'_>) -> Admitted {
    let root = run.trace.root().to_bytes();
    let mut kept = Vec::new();
    let mut rejected = 0usize;
    let mut reason = None;
    let spans = request
        .resource_spans
        .into_iter()
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans);
    for span in spans {
        if OMITTED_SPANS.contains(&span.name.as_str()) {
            continue;
        }
        if kept.len() >= MAX_SPANS {
            rejected += 1;
            reason.get_or_insert_with(|| format!("more than {MAX_SPANS} spans in one request"));
            continue;
        }
        match checked(span, run, root) {
            Ok(span) => kept.push(span),
            Err(why) => {
                rejected += 1;
                reason.get_or_insert(why);
            }
        }
    }
    let forwarded = kept.len();
    let request = ExportTraceServiceRequest {
        resource_spans: if kept.is_empty() {
            Vec::new()
        } else {
            vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        text("service.name", RUNNER_SERVICE),
                        text("contextos.tenant", &run.trace.tenant),
                        text("contextos.agent", run.agent),
                        text("contextos.session", &run.trace.session),
                        text("contextos.run", run.run),
                        text("k8s.namespace.name", &run.trace.tenant),
                        text("k8s.pod.name", run.pod),
                    ],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "contextos".into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: kept,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }]
        },
    };
    Admitted {
        request,
        forwarded,
        rejected,
        reason,
    }
}

/// `span` as forwarded, or why it is not.
fn checked(span: Span, run: &RelayedRun<'_>, root: [u8; 8]) -> Result<Span, String> {
    if span.trace_id.as_slice() != run.trace.trace.to_bytes() {
        return Err("a span of another trace than the run's".into());
    }
    let Some(&(name, kind)) = RUNNER_SPANS.iter().find(|(name, _)| *name == span.name) else {
        let quoted: String = span.name.chars().take(MAX_QUOTED).collect();
        return Err(format!("a span named {quoted:?}, which runner pods do not make"));
    };
    let id = span_id(&span.span_id).ok_or("a span without a valid span id")?;
    let parent =
        span_id(&span.parent_span_id).ok_or("a span without a parent (only the Session's root has none)")?;
    // A run hangs under the Session's root; everything else under the run's own spans.
    let parent = match (name == "run", parent == root) {
        (true, true) => root,
        (false, false) => super::relayed_span_id(run.trace, run.run, parent),
        (true, false) => return Err("a run span not under the Session's root".into()),
        (false, true) => return Err(format!("a {name} span under the Session's root")),
    };
    let (from, to) = run.window;
    if span.start_time_unix_nano < from
        || span.end_time_unix_nano > to
        || span.end_time_unix_nano < span.start_time_unix_nano
    {
        return Err(format!(
            "a {name} span outside the run's time (or ending before it starts)"
        ));
    }
    let given = span.attributes.len();
    let mut attributes: Vec<KeyValue> = Vec::new();
    for kv in span.attributes {
        let Some(&(key, allowed)) = RUNNER_ATTRIBUTES.iter().find(|(key, _)| *key == kv.key) else {
            continue;
        };
        if attributes.iter().any(|kept| kept.key == key) {
            continue;
        }
        let value = kv.value.and_then(|v| v.value);
        let value = match (allowed, value) {
            (Allowed::Verified(verified), _) => Value::StringValue(verified(run)),
            (Allowed::Count(most), Some(Value::IntValue(n)))
                if u64::try_from(n).is_ok_and(|n| n <= most(run)) =>
            {
                Value::IntValue(n)
            }
            (Allowed::Count(most), Some(Value::StringValue(text)))
                if text.len() <= 20 && text.parse::<u64>().is_ok_and(|n| n <= most(run)) =>
            {
                Value::StringValue(text)
            }
            (Allowed::Bool, Some(Value::BoolValue(b))) => Value::BoolValue(b),
            (Allowed::OneOf(values), Some(Value::StringValue(text))) if values.contains(&text.as_str()) => {
                Value::StringValue(text)
            }
            _ => continue,
        };
        attributes.push(KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        });
    }
    let dropped = given.saturating_sub(attributes.len());
    Ok(Span {
        trace_id: span.trace_id,
        span_id: super::relayed_span_id(run.trace, run.run, id).to_vec(),
        trace_state: String::new(),
        parent_span_id: parent.to_vec(),
        // Only W3C's sampled bit and the parent-is-remote bits are the span's to say.
        flags: span.flags & 0x301,
        name: name.to_owned(),
        kind: kind as i32,
        start_time_unix_nano: span.start_time_unix_nano,
        end_time_unix_nano: span.end_time_unix_nano,
        attributes,
        dropped_attributes_count: u32::try_from(dropped).unwrap_or(u32::MAX),
        events: Vec::new(),
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status: span.status.map(|s| Status {
            message: String::new(),
            code: s.code.clamp(0, 2),
        }),
    })
}

/// A valid (8 bytes, not all zero) span id.
fn span_id(bytes: &[u8]) -> Option<[u8; 8]> {
    let id: [u8; 8] = bytes.try_into().ok()?;
    (id != [0; 8]).then_some(id)
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceId;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use prost_otlp::Message as _;

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const RUN: &str = "refund-7-abc";

    fn session() -> &'static SessionTrace {
        static SESSION: std::sync::LazyLock<SessionTrace> = std::sync::LazyLock::new(|| SessionTrace {
            trace: TraceId::from_hex(TRACE).expect("trace"),
            tenant: "shop".into(),
            session: "refund-7".into(),
            sampled: true,
        });
        &SESSION
    }

    fn run() -> RelayedRun<'static> {
        RelayedRun {
            trace: session(),
            agent: "refunds",
            run: RUN,
            max_steps: 10,
            pod: "refund-7-run-1",
            window: (5, 100),
        }
    }

    fn root() -> Vec<u8> {
        session().root().to_bytes().to_vec()
    }

    fn id(n: u8) -> Vec<u8> {
        vec![0, 0, 0, 0, 0, 0, 0, n]
    }

    fn span(name: &str, n: u8, parent: Vec<u8>, attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: TraceId::from_hex(TRACE).expect("trace").to_bytes().to_vec(),
            span_id: id(n),
            parent_span_id: parent,
            name: name.into(),
            start_time_unix_nano: 10,
            end_time_unix_nano: 20,
            attributes,
            ..Span::default()
        }
    }

    fn value(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("service.name", "contextos-gateway")],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn forwarded(admitted: &Admitted) -> Vec<&Span> {
        admitted
            .request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect()
    }

    fn mapped(n: u8) -> Vec<u8> {
        super::super::relayed_span_id(session(), RUN, [0, 0, 0, 0, 0, 0, 0, n]).to_vec()
    }

    #[test]
    fn a_runners_own_spans_are_forwarded_under_its_runs_ids_and_the_gateways_resource() {
        let admitted = admit(
            request(vec![
                span("run", 2, root(), vec![text("contextos.tenant", "bank")]),
                span("step", 3, id(2), vec![]),
                span("model.call", 4, id(3), vec![]),
            ]),
            &run(),
        );
        assert_eq!((admitted.forwarded, admitted.rejected), (3, 0));
        assert!(admitted.response().partial_success.is_none());
        let resource = admitted.request.resource_spans[0]
            .resource
            .as_ref()
            .expect("resource");
        let said: Vec<(String, String)> = resource
            .attributes
            .iter()
            .map(|kv| match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(Value::StringValue(v)) => (kv.key.clone(), v),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(said.contains(&("service.name".into(), RUNNER_SERVICE.into())));
        assert!(said.contains(&("k8s.pod.name".into(), "refund-7-run-1".into())));
        let spans = forwarded(&admitted);
        // The run under the root, the step under the run, each under its mapped id.
        assert_eq!(
            (spans[0].span_id.clone(), spans[0].parent_span_id.clone()),
            (mapped(2), root())
        );
        assert_eq!(
            (spans[1].span_id.clone(), spans[1].parent_span_id.clone()),
            (mapped(3), mapped(2))
        );
        // Its kind follows from its name.
        assert_eq!(spans[2].kind, SpanKind::Client as i32);
        // The tenant a span names is the verified one.
        assert_eq!(
            spans[0].attributes[0]
                .value
                .as_ref()
                .and_then(|v| v.value.clone()),
            Some(Value::StringValue("shop".into()))
        );
    }

    #[test]
    fn spans_of_other_traces_roots_the_gateways_and_strangers_are_refused() {
        let mut foreign = span("run", 2, root(), vec![]);
        foreign.trace_id = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c")
            .expect("trace")
            .to_bytes()
            .to_vec();
        let mut early = span("step", 8, id(2), vec![]);
        early.start_time_unix_nano = 1;
        let mut late = span("step", 9, id(2), vec![]);
        late.end_time_unix_nano = 101;
        let mut backwards = span("step", 10, id(2), vec![]);
        backwards.end_time_unix_nano = 9;
        let mut short = span("step", 11, id(2), vec![]);
        short.span_id = vec![1, 2, 3];
        let admitted = admit(
            request(vec![
                foreign,
                span("session", 3, Vec::new(), vec![]),
                span("run", 4, Vec::new(), vec![]),
                span("run", 5, id(9), vec![]),
                span("step", 6, root(), vec![]),
                span("http.request", 7, id(2), vec![]),
                span(
                    "gateway.decision",
                    12,
                    id(2),
                    vec![text("contextos.effect", "allow")],
                ),
                span("tool.call", 13, id(2), vec![]),
                span("model.proxy", 14, id(2), vec![]),
                early,
                late,
                backwards,
                short,
                // A runner's appends are left out, not refused.
                span("record.append", 15, id(2), vec![]),
                span("step", 16, id(2), vec![]),
            ]),
            &run(),
        );
        assert_eq!((admitted.forwarded, admitted.rejected), (1, 13));
        assert_eq!(forwarded(&admitted)[0].span_id, mapped(16));
        let answer = admitted.response().partial_success.expect("partial");
        assert_eq!(answer.rejected_spans, 13);
        assert!(answer.error_message.contains("another trace"), "{answer:?}");
        // Nothing at all: nothing to forward.
        let none = admit(request(vec![span("session", 7, Vec::new(), vec![])]), &run());
        assert!(none.request.resource_spans.is_empty());
    }

    #[test]
    fn only_runner_attributes_of_their_types_and_values_are_kept() {
        let mut said = span(
            "model.call",
            2,
            id(1),
            vec![
                text("contextos.outcome", "answer"),
                text("contextos.outcome", "tool_calls"),
                text("contextos.verdict", "card 4111 1111 1111 1111"),
                text("gen_ai.request.model", "dana@example.com"),
                text("contextos.arguments", "{\"card\": \"4111\"}"),
                text("enduser.id", "dana@example.com"),
                text("contextos.session", "someone-elses"),
                text("contextos.step", "3"),
                // A number as large as a card's: not a step of a ten-step run.
                value("contextos.entries", Value::IntValue(4_111_111_111_111_111)),
                value("gen_ai.usage.input_tokens", Value::IntValue(120)),
                value("contextos.resumed", Value::BoolValue(true)),
                value("contextos.replay", Value::IntValue(1)),
            ],
        );
        said.kind = SpanKind::Server as i32;
        said.flags = 0xffff_ffff;
        said.events.push(Event::default());
        said.links.push(Link::default());
        said.trace_state = "vendor=x".into();
        said.status = Some(Status {
            message: "dana@example.com asked for a refund".into(),
            code: 2,
        });
        let admitted = admit(request(vec![said]), &run());
        let span = forwarded(&admitted)[0];
        let kept: Vec<(&str, Option<Value>)> = span
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_ref().and_then(|v| v.value.clone())))
            .collect();
        assert_eq!(
            kept,
            [
                ("contextos.outcome", Some(Value::StringValue("answer".into()))),
                ("contextos.session", Some(Value::StringValue("refund-7".into()))),
                ("contextos.step", Some(Value::StringValue("3".into()))),
                ("contextos.resumed", Some(Value::BoolValue(true))),
            ]
        );
        assert_eq!(span.dropped_attributes_count, 8);
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.flags, 0x301);
        assert!(span.events.is_empty() && span.links.is_empty() && span.trace_state.is_empty());
        assert_eq!(
            span.status.as_ref().map(|s| (s.message.as_str(), s.code)),
            Some(("", 2))
        );
    }

    #[test]
    fn a_run_sends_no_more_spans_than_its_budget() {
        let mut admitted = admit(
            request(vec![
                span("run", 2, root(), vec![]),
                span("step", 3, id(2), vec![]),
                span("step", 4, id(2), vec![]),
            ]),
            &run(),
        );
        admitted.keep_at_most(1, "spent");
        assert_eq!((admitted.forwarded, admitted.rejected), (1, 2));
        assert_eq!(forwarded(&admitted).len(), 1);
        assert_eq!(admitted.reason.as_deref(), Some("spent"));
        admitted.keep_at_most(0, "spent");
        assert!(admitted.request.resource_spans.is_empty());
        assert_eq!(run_span_budget(10), 128);
    }

    #[test]
    fn a_request_is_measured_on_the_wire_before_it_is_decoded() {
        let spans = vec![
            span("run", 2, root(), vec![text("contextos.tenant", "shop")]),
            span("step", 3, id(2), vec![]),
        ];
        let bytes = request(spans).encode_to_vec();
        let shape = measure(&bytes).expect("measured");
        assert_eq!(shape.spans, 2);
        // Resource spans, resource, its attribute (key, value, text), scope spans, the spans
        // with their ids, names and attribute.
        assert!(shape.items > 10, "{shape:?}");
        // Too many spans, however small: refused before anything is decoded.
        let many = request((0..MAX_SPANS + 1).map(|_| Span::default()).collect()).encode_to_vec();
        assert!(measure(&many).expect_err("too many").contains("spans"));
        // Too many items in one span (empty attributes are two bytes each on the wire).
        let crowded = Span {
            attributes: vec![KeyValue::default(); MAX_ITEMS + 1],
            ..Span::default()
        };
        let crowded = request(vec![crowded]).encode_to_vec();
        assert!(measure(&crowded).expect_err("too many").contains("items"));
        // Attribute values nested ever deeper.
        let mut nested = AnyValue::default();
        for _ in 0..MAX_DEPTH {
            nested = AnyValue {
                value: Some(Value::ArrayValue(
                    opentelemetry_proto::tonic::common::v1::ArrayValue { values: vec![nested] },
                )),
            };
        }
        let deep = request(vec![span(
            "step",
            3,
            id(2),
            vec![KeyValue {
                key: "k".into(),
                value: Some(nested),
                ..KeyValue::default()
            }],
        )])
        .encode_to_vec();
        assert!(measure(&deep).expect_err("too deep").contains("nested"));
        // Not protobuf.
        assert!(measure(&[0x0a, 0x05, 0x01]).is_err(), "a field past the end");
        assert!(measure(&[0x0b]).is_err(), "a group");
        assert!(measure(&[0xff; 11]).is_err(), "a varint without end");
        assert_eq!(measure(&[]), Ok(Shape::default()));
    }
}
