//! The gateway's operational metrics (`prometheus-client`): how its decisions, tool calls,
//! circuit breakers and record appends go, by low-cardinality labels only — the effect, the
//! adapter and the call's outcome; never a tenant, an agent, a tool or an endpoint (those are the
//! tenants' to name, and spend, which is per tenant, has its own counters). One set per process,
//! counted wherever gateway code runs and served by the gateway service's metrics listener next
//! to the spend counters.

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// The exposition's media type: OpenMetrics text (every family a counter, histogram or gauge
/// named without its `_total`, and a closing `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which adapter a call went through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Adapter {
    http,
    openapi,
    webhook,
    mcp,
    a2a,
}

/// How one attempt of a call went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// The tool answered.
    ok,
    /// It may have reached the tool, and failed.
    failed,
    /// Refused before anything was sent (circuit open, destination refused, a mismatch).
    refused,
}

/// A policy decision's effect.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Effect {
    allow,
    deny,
    require_approval,
}

impl From<contextos_crds::policy::PolicyEffect> for Effect {
    fn from(effect: contextos_crds::policy::PolicyEffect) -> Self {
        use contextos_crds::policy::PolicyEffect as P;
        match effect {
            P::Allow => Self::allow,
            P::Deny => Self::deny,
            P::RequireApproval => Self::require_approval,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EffectLabels {
    effect: Effect,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    adapter: Adapter,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdapterLabels {
    adapter: Adapter,
}

/// Whether a call of a cached tool was answered from the cache.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheLookup {
    hit,
    miss,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: CacheLookup,
}

/// What a replay gate said.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum GateResult {
    passed,
    failed,
    /// There was no finished run to replay.
    no_history,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GateLabels {
    /// Policy, ContextPack or Agent.
    kind: &'static str,
    result: GateResult,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Decisions take microseconds; calls and appends milliseconds to seconds.
fn decision_histogram() -> Histogram {
    Histogram::new([0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05])
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// The metrics, and the registry that encodes them.
pub struct GatewayMetrics {
    registry: Registry,
    decisions: Histograms<EffectLabels>,
    calls: Histograms<CallLabels>,
    dead_letters: Counter,
    circuits_opened: Family<AdapterLabels, Counter>,
    circuit_refusals: Family<AdapterLabels, Counter>,
    appends: Histogram,
    gates: Family<GateLabels, Counter>,
    cache_lookups: Family<CacheLabels, Counter>,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayMetrics")
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let decisions: Histograms<EffectLabels> = Family::new_with_constructor(decision_histogram);
        let calls: Histograms<CallLabels> = Family::new_with_constructor(latency_histogram);
        let dead_letters = Counter::default();
        let circuits_opened = Family::<AdapterLabels, Counter>::default();
        let circuit_refusals = Family::<AdapterLabels, Counter>::default();
        let appends = latency_histogram();
        let gates = Family::<GateLabels, Counter>::default();
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        let mut registry = Registry::with_prefix("contextos");
        registry.register(
            "gateway_decision_duration_seconds",
            "Time the gateway took to decide a call against the policies, by effect",
            decisions.clone(),
        );
        registry.register(
            "tool_call_duration_seconds",
            "Time one attempt of a tool call took, by adapter and outcome (ok, failed, or refused before anything was sent)",
            calls.clone(),
        );
        registry.register(
            "tool_dead_letters",
            "Calls that failed for good after their attempts, counted when their dead letter is on record",
            dead_letters.clone(),
        );
        registry.register(
            "circuits_opened",
            "Times a tool endpoint's circuit breaker opened, by adapter",
            circuits_opened.clone(),
        );
        registry.register(
            "circuit_refusals",
            "Calls refused because their endpoint's circuit was open, by adapter",
            circuit_refusals.clone(),
        );
        registry.register(
            "record_append_duration_seconds",
            "Time one append of entries to a run's record took: until durable, or for an entry already answered with (made durable by the next flush) until committed",
            appends.clone(),
        );
        registry.register(
            "replay_gate_results",
            "Replay gates this gateway ran, by the kind of object gated and what they said",
            gates.clone(),
        );
        registry.register(
            "tool_cache_lookups",
            "Calls of tools with a cache, by whether the gateway answered them from it (hit) or reached the tool (miss)",
            cache_lookups.clone(),
        );
        Self {
            registry,
            decisions,
            calls,
            dead_letters,
            circuits_opened,
            circuit_refusals,
            appends,
            gates,
            cache_lookups,
        }
    }
}

impl GatewayMetrics {
    pub fn decision(&self, effect: impl Into<Effect>, took: Duration) {
        self.decisions
            .get_or_create(&EffectLabels {
                effect: effect.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn call(&self, adapter: Adapter, outcome: Outcome, took: Duration) {
        self.calls
            .get_or_create(&CallLabels { adapter, outcome })
            .observe(took.as_secs_f64());
    }

    pub fn dead_letters(&self, count: u64) {
        if count > 0 {
            self.dead_letters.inc_by(count);
        }
    }

    pub fn circuit_opened(&self, adapter: Adapter) {
        self.circuits_opened
            .get_or_create(&AdapterLabels { adapter })
            .inc();
    }

    pub fn circuit_refusal(&self, adapter: Adapter) {
        self.circuit_refusals
            .get_or_create(&AdapterLabels { adapter })
            .inc();
    }

    pub fn append(&self, took: Duration) {
        self.appends.observe(took.as_secs_f64());
    }

    pub fn cache_lookup(&self, result: CacheLookup) {
        self.cache_lookups.get_or_create(&CacheLabels { result }).inc();
    }

    pub fn gate(&self, kind: &'static str, result: GateResult) {
        self.gates.get_or_create(&GateLabels { kind, result }).inc();
    }

    /// The text exposition (without OpenMetrics' closing `# EOF`, so it can be followed by
    /// other families in one scrape).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out
    }
}

/// The label of a tool's adapter (none for memory tools: the gateway keeps those itself).
pub fn adapter_of(adapter: &contextos_crds::agent::ToolAdapter) -> Option<Adapter> {
    use contextos_crds::agent::Adapter as Chosen;
    Some(match adapter.chosen()? {
        Chosen::Http(_) => Adapter::http,
        Chosen::OpenApi(_) => Adapter::openapi,
        Chosen::Webhook(_) => Adapter::webhook,
        Chosen::Mcp(_) => Adapter::mcp,
        Chosen::A2a(_) => Adapter::a2a,
        // Answered by the gateway itself: not a call to anything.
        Chosen::Memory(_) => return None,
    })
}

/// This process's gateway metrics.
pub fn gateway() -> &'static GatewayMetrics {
    static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(GatewayMetrics::default);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_are_exposed_by_their_labels() {
        let metrics = GatewayMetrics::default();
        metrics.decision(
            contextos_crds::policy::PolicyEffect::RequireApproval,
            Duration::from_micros(30),
        );
        metrics.call(Adapter::openapi, Outcome::ok, Duration::from_millis(20));
        metrics.call(Adapter::openapi, Outcome::ok, Duration::from_millis(200));
        metrics.call(Adapter::mcp, Outcome::refused, Duration::from_micros(5));
        metrics.dead_letters(2);
        metrics.circuit_opened(Adapter::http);
        metrics.circuit_refusal(Adapter::http);
        metrics.append(Duration::from_millis(3));
        metrics.gate("Policy", GateResult::failed);
        let text = metrics.render();
        for line in [
            "# TYPE contextos_tool_call_duration_seconds histogram",
            "contextos_tool_call_duration_seconds_count{adapter=\"openapi\",outcome=\"ok\"} 2",
            "contextos_tool_call_duration_seconds_bucket{le=\"0.025\",adapter=\"openapi\",outcome=\"ok\"} 1",
            "contextos_tool_call_duration_seconds_bucket{le=\"0.25\",adapter=\"openapi\",outcome=\"ok\"} 2",
            "contextos_tool_call_duration_seconds_count{adapter=\"mcp\",outcome=\"refused\"} 1",
            "contextos_gateway_decision_duration_seconds_count{effect=\"require_approval\"} 1",
            "contextos_tool_dead_letters_total 2",
            "contextos_circuits_opened_total{adapter=\"http\"} 1",
            "contextos_circuit_refusals_total{adapter=\"http\"} 1",
            "contextos_record_append_duration_seconds_count 1",
            "contextos_replay_gate_results_total{kind=\"Policy\",result=\"failed\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }
}
