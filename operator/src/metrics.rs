//! Operator metrics (`prometheus-client`), served as Prometheus text on `/metrics`: reconciles,
//! their durations and failures by a low-cardinality label (the kind, the error class), and
//! runner pods created.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

fn reconcile_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The exposition's media type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Metrics shared by every controller.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    failures: Family<ErrorLabels, Counter>,
    runner_pods: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<KindLabels, Counter>::default();
        let durations: Family<KindLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(reconcile_histogram);
        let failures = Family::<ErrorLabels, Counter>::default();
        let runner_pods = Counter::default();
        let mut registry = Registry::with_prefix("contextos");
        registry.register("reconciles", "Reconciles by kind", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took, by kind (whatever it decided)",
            durations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by error",
            failures.clone(),
        );
        registry.register("runner_pods_created", "Runner pods created", runner_pods.clone());
        Self {
            registry,
            reconciles,
            durations,
            failures,
            runner_pods,
        }
    }
}

impl Metrics {
    pub fn reconcile(&self, kind: &'static str) {
        self.reconciles.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn reconciled(&self, kind: &'static str, took: Duration) {
        self.durations
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    pub fn failure(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }

    pub fn runner_pod_created(&self) {
        self.runner_pods.inc();
    }

    /// The exposition, as OpenMetrics text (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_and_timed_by_kind() {
        let metrics = Metrics::default();
        metrics.reconcile("Session");
        metrics.reconciled("Session", Duration::from_millis(7));
        metrics.failure("kube");
        metrics.runner_pod_created();
        let text = metrics.render();
        for line in [
            "contextos_reconciles_total{kind=\"Session\"} 1",
            "contextos_reconcile_duration_seconds_count{kind=\"Session\"} 1",
            "contextos_reconcile_duration_seconds_bucket{le=\"0.01\",kind=\"Session\"} 1",
            "contextos_reconcile_duration_seconds_bucket{le=\"0.005\",kind=\"Session\"} 0",
            "contextos_reconcile_failures_total{error=\"kube\"} 1",
            "contextos_runner_pods_created_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
