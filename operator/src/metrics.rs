//! Operator metrics, served as Prometheus text on `/metrics`: reconciles and failures by a
//! low-cardinality label, and runner pods created.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Counters shared by every controller.
#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: Mutex<BTreeMap<&'static str, u64>>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    runner_pods: AtomicU64,
}

impl Metrics {
    pub fn reconcile(&self, kind: &'static str) {
        if let Ok(mut map) = self.reconciles.lock() {
            *map.entry(kind).or_default() += 1;
        }
    }

    pub fn failure(&self, error: &'static str) {
        if let Ok(mut map) = self.failures.lock() {
            *map.entry(error).or_default() += 1;
        }
    }

    pub fn runner_pod_created(&self) {
        self.runner_pods.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP contextos_reconciles_total Reconciles by kind.\n# TYPE contextos_reconciles_total counter\n");
        if let Ok(map) = self.reconciles.lock() {
            for (kind, n) in map.iter() {
                let _ = writeln!(out, "contextos_reconciles_total{{kind=\"{kind}\"}} {n}");
            }
        }
        out.push_str("# HELP contextos_reconcile_failures_total Failed reconciles by error.\n# TYPE contextos_reconcile_failures_total counter\n");
        if let Ok(map) = self.failures.lock() {
            for (error, n) in map.iter() {
                let _ = writeln!(out, "contextos_reconcile_failures_total{{error=\"{error}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP contextos_runner_pods_created_total Runner pods created.\n# TYPE contextos_runner_pods_created_total counter\ncontextos_runner_pods_created_total {}",
            self.runner_pods.load(Ordering::Relaxed)
        );
        out
    }
}
