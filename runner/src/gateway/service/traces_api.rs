//! `POST /v1/run/traces`: a runner pod's spans, relayed to the collector the gateway exports to.
//! A runner pod reaches nothing but the gateway; its exporter is pointed here by the operator
//! and presents the run's credentials. What is forwarded is decided by
//! [`crate::telemetry::relay::admit`] (the run's own trace, runner spans only, cut to operator
//! facts, under the gateway's resource), after the body is measured on the wire
//! ([`crate::telemetry::relay::measure`]); it is forwarded in the background, so the request's
//! turn is given back at once.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::IntoResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost_otlp::Message as _;

use super::*;
use crate::telemetry::relay::{self, RelayedRun};

/// Where a runner's exporter sends its spans (the operator sets its
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` to the gateway's URL and this path).
pub const TRACES_PATH: &str = "/v1/run/traces";
/// The most bytes of one batch of spans (a batch of 512 runner spans is ~150 KiB).
const MAX_TRACE_BYTES: usize = 1 << 20;
const PROTOBUF: &str = "application/x-protobuf";
/// How far a pod's clock may be from the gateway's.
const CLOCK_LEEWAY_MS: i64 = 5 * 60 * 1000;

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn relay_traces(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: axum::body::Body,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let Some(sink) = service.traces.clone() else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "traces_not_collected",
                "this gateway exports no traces (OTEL_EXPORTER_OTLP_ENDPOINT is not set on it), so it relays none: set it on the gateway, or unset it on the operator so runner pods stop sending spans".into(),
            ));
        };
        let protobuf = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(PROTOBUF));
        if !protobuf {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("spans are relayed as OTLP/HTTP with protobuf (Content-Type: {PROTOBUF})"),
            ));
        }
        let body = read_body(body, MAX_TRACE_BYTES).await?;
        // Counted before anything is decoded: what decoding allocates is bounded by the count.
        let shape = relay::measure(&body).map_err(bad)?;
        let context = &caller.context.context;
        let Some(trace) = context.trace() else {
            return Err(bad("the run's RunContext names no W3C trace id"));
        };
        // The Session is not exported: nothing of it is, by anyone.
        if !trace.sampled {
            return Ok(protobuf_answer(&ExportTraceServiceResponse::default()));
        }
        // Answered, not refused, when there is no room: an exporter asks again after a refusal,
        // and the spans would only come back to a busier relay.
        let Some(turn) = sink.turn(caller.tenant.as_str()) else {
            return Ok(protobuf_answer(&ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: i64::try_from(shape.spans).unwrap_or(i64::MAX),
                    error_message: "the gateway is forwarding as many of this tenant's spans as it may; these are dropped".into(),
                }),
            }));
        };
        let request = ExportTraceServiceRequest::decode(body)
            .map_err(|e| bad(format!("the body is not an OTLP ExportTraceServiceRequest: {e}")))?;
        let now_ms = crate::records::recorder::now_ms();
        let nanos = |ms: i64| u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000);
        let run = RelayedRun {
            trace: &trace,
            agent: &context.agent.name,
            run: &context.run_id,
            max_steps: context.budget.max_steps,
            pod: &caller.identity.pod,
            window: (
                nanos(context.issued_at_ms.saturating_sub(CLOCK_LEEWAY_MS)),
                nanos(now_ms.saturating_add(CLOCK_LEEWAY_MS)),
            ),
        };
        let mut admitted = relay::admit(request, &run);
        // What one run may send in all, at this replica: a few spans a step.
        let budget = relay::run_span_budget(context.budget.max_steps);
        let left = sink.spend(
            caller.tenant.as_str(),
            &context.run_id,
            admitted.forwarded,
            budget,
        );
        admitted.keep_at_most(
            left,
            &format!(
                "run {} has sent the {budget} spans its budget allows",
                context.run_id
            ),
        );
        if let Some(reason) = &admitted.reason {
            tracing::debug!(
                tenant = %caller.tenant,
                pod = %caller.identity.pod,
                rejected = admitted.rejected,
                %reason,
                "spans of a runner pod refused"
            );
        }
        let answer = admitted.response();
        if admitted.forwarded > 0 {
            sink.forward_later(turn, admitted.request);
        }
        Ok(protobuf_answer(&answer))
    }
}

fn protobuf_answer(answer: &ExportTraceServiceResponse) -> Response {
    ([(CONTENT_TYPE, PROTOBUF)], answer.encode_to_vec()).into_response()
}
