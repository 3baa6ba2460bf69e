//! Where the gateway forwards the spans runner pods relay to it ([`super::relay`]): the collector
//! its own spans go to, named the standard way (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; `OTEL_EXPORTER_OTLP_HEADERS`), over OTLP/HTTP
//! with protobuf. Forwards run in the background, bounded in number (per replica and per tenant)
//! and time: a slow collector or a busy tenant costs runners dropped spans, never the gateway's
//! turns or another tenant's share.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost_otlp::Message as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Forwards in flight at once, per replica.
const MAX_FORWARDS: u32 = 16;
/// Forwards in flight at once for one tenant, per replica.
const MAX_TENANT_FORWARDS: u32 = 4;
/// The last forwards of a replica's [`MAX_FORWARDS`], kept for tenants with none in flight:
/// three tenants holding their whole share leave room for four more.
const RESERVED_FORWARDS: u32 = 4;
/// How long one forward may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Runs whose relayed spans are counted at once, per replica (the oldest counts are forgotten
/// past it: the budget is a bound on what a run sends, not an exact ledger).
const MAX_COUNTED_RUNS: usize = 16_384;
/// Failures to forward are logged at most this often (with how many there were).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The collector relayed spans go to.
#[derive(Debug)]
pub struct TraceSink {
    url: String,
    /// The URL as logged: without credentials or query.
    shown: String,
    headers: HeaderMap,
    client: reqwest::Client,
    /// Forwards in flight, in all and per tenant.
    forwards: crate::gateway::shares::Shares,
    /// Spans relayed per (tenant, run), and the order runs were first counted in.
    spent: Mutex<SpentByRun>,
    failures: Mutex<(Option<Instant>, u64)>,
}

/// Why a forward did not reach the collector (logged by the gateway; never shown to runners,
/// since the collector's address is the cluster admin's).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the trace collector at {url} cannot be reached: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the trace collector at {url} refused the spans: HTTP {status}")]
    Refused { url: String, status: u16 },
}

/// Spans relayed per (tenant, run), and the order runs were first counted in.
#[derive(Debug, Default)]
struct SpentByRun {
    spent: HashMap<(String, String), usize>,
    order: std::collections::VecDeque<(String, String)>,
}

/// A place in the forwards in flight, for one tenant's batch (given back when dropped).
#[derive(Debug)]
pub struct Turn {
    _share: crate::gateway::shares::Share,
}

impl TraceSink {
    /// The collector the environment names, when it names one and exporting is not disabled
    /// (see [`super::configured`]); an unusable setting is an error naming it.
    pub fn from_env() -> Result<Option<Self>, String> {
        if !super::configured() {
            return Ok(None);
        }
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => traces.trim().to_owned(),
            (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_ENDPOINT {url:?} is not an http(s) URL"
            ));
        }
        let headers =
            match var("OTEL_EXPORTER_OTLP_TRACES_HEADERS").or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS")) {
                Some(list) => parse_headers(&list)?,
                None => HeaderMap::new(),
            };
        Ok(Some(Self::to(url, headers)))
    }

    /// A sink posting to the collector's traces URL `url` (e.g. `http://jaeger:4318/v1/traces`)
    /// with `headers`.
    pub fn to(url: String, headers: HeaderMap) -> Self {
        let shown = reqwest::Url::parse(&url).map_or_else(
            |_| "(the configured collector)".to_owned(),
            |mut shown| {
                let _ = shown.set_username("");
                let _ = shown.set_password(None);
                shown.set_query(None);
                shown.to_string()
            },
        );
        Self {
            url,
            shown,
            headers,
            client: crate::http::client(),
            // A tenant with none in flight may take one of the reserve.
            forwards: crate::gateway::shares::Shares::new(
                MAX_FORWARDS,
                MAX_TENANT_FORWARDS,
                RESERVED_FORWARDS,
                1,
            ),
            spent: Mutex::new(Default::default()),
            failures: Mutex::new((None, 0)),
        }
    }

    /// How many of `wanted` more spans run `run` of `tenant` may have relayed, `budget` in all
    /// (counted as granted).
    pub fn spend(&self, tenant: &str, run: &str, wanted: usize, budget: usize) -> usize {
        let mut guard = self
            .spent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let SpentByRun { spent, order } = &mut *guard;
        let key = (tenant.to_owned(), run.to_owned());
        if !spent.contains_key(&key) {
            while order.len() >= MAX_COUNTED_RUNS {
                if let Some(oldest) = order.pop_front() {
                    spent.remove(&oldest);
                }
            }
            order.push_back(key.clone());
        }
        let count = spent.entry(key).or_default();
        let granted = wanted.min(budget.saturating_sub(*count));
        *count += granted;
        granted
    }

    /// A place for one of `tenant`'s batches, if the replica and the tenant have one free.
    pub fn turn(&self, tenant: &str) -> Option<Turn> {
        let share = self.forwards.take(tenant, 1).ok()?;
        Some(Turn { _share: share })
    }

    /// Sends `request` to the collector in the background, holding `turn` until it is done.
    pub fn forward_later(self: &Arc<Self>, turn: Turn, request: ExportTraceServiceRequest) {
        let sink = self.clone();
        tokio::spawn(async move {
            let _turn = turn;
            if let Err(e) = sink.forward(&request).await {
                sink.note_failure(&e);
            }
        });
    }

    /// Sends `request` to the collector.
    pub async fn forward(&self, request: &ExportTraceServiceRequest) -> Result<(), SinkError> {
        let answer = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .timeout(FORWARD_TIMEOUT)
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|e| SinkError::Unreachable {
                url: self.shown.clone(),
                detail: e.without_url().to_string(),
            })?;
        let status = answer.status();
        if !status.is_success() {
            return Err(SinkError::Refused {
                url: self.shown.clone(),
                status: status.as_u16(),
            });
        }
        Ok(())
    }

    fn note_failure(&self, error: &SinkError) {
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        failures.1 += 1;
        if failures.0.is_none_or(|last| last.elapsed() >= WARN_EVERY) {
            tracing::warn!(%error, failures = failures.1, "runner spans were not forwarded");
            *failures = (Some(Instant::now()), 0);
        }
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas, values percent-encoded.
fn parse_headers(list: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("OTEL_EXPORTER_OTLP_HEADERS: {pair:?} is not key=value"))?;
        let name = HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("OTEL_EXPORTER_OTLP_HEADERS: {key:?} is not a header name"))?;
        let value = HeaderValue::from_bytes(&percent_decoded(value.trim()))
            .map_err(|_| format!("OTEL_EXPORTER_OTLP_HEADERS: the value of {key:?} is not a header value"))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes
            .get(at + 1..at + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[at], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_holding_their_whole_share_of_forwards_leave_room_for_others() {
        let sink = Arc::new(TraceSink::to(
            "http://127.0.0.1:9/v1/traces".into(),
            HeaderMap::new(),
        ));
        let mut held = Vec::new();
        for tenant in ["a", "b", "c"] {
            for _ in 0..MAX_TENANT_FORWARDS {
                held.push(sink.turn(tenant).expect("within the tenant's share"));
            }
            assert!(sink.turn(tenant).is_none(), "past {tenant}'s share");
        }
        // 12 of 16 taken: the last four go to tenants with nothing in flight, one each.
        held.push(sink.turn("d").expect("a tenant with none in flight"));
        assert!(sink.turn("d").is_none(), "d has one, and the rest is kept");
        for tenant in ["e", "f", "g"] {
            held.push(sink.turn(tenant).expect("another with none in flight"));
        }
        assert!(sink.turn("h").is_none(), "the replica's are all taken");
        // A forward done gives its place back.
        held.pop();
        assert!(sink.turn("h").is_some());
    }

    #[test]
    fn collector_headers_are_read_as_the_specification_writes_them() {
        let headers = parse_headers("api-key=a%20b%3Dc, x-tenant = ops ,").expect("headers");
        assert_eq!(headers["api-key"], "a b=c");
        assert_eq!(headers["x-tenant"], "ops");
        assert!(parse_headers("no-equals").is_err());
        assert!(parse_headers("bad name=x").is_err());
        assert!(parse_headers("k=line%0Abreak").is_err());
    }
}
