//! Re-execution: a recorded run is run again with a candidate's context and the recorded
//! model asked afresh, so a change to what the model is told is judged by what the model then
//! does. This module owns what a re-execution is given (samples, a token limit, where the
//! model comes from) and what it reports; the run itself is [`super::replay::replay_run_as`].

use std::{collections::BTreeMap, fmt, future::Future, pin::Pin, sync::Arc};

use serde::{Deserialize, Serialize};

use super::bundle::RunBundle;
use crate::model::{Model, metered::Meter};

/// The most times one run is re-executed.
pub const MAX_SAMPLES: u32 = 20;

/// A model being looked up for a recorded run.
pub type ModelLookup<'a> = Pin<Box<dyn Future<Output = Result<Model, String>> + Send + 'a>>;

/// Where a re-execution gets the recorded model, with its key: the CLI from the keys it was
/// given, the gateway service from the tenant's namespace, reached through its egress rules.
pub trait ModelSource: Send + Sync {
    /// The model `bundle` (the recorded run's, never a candidate's) names.
    fn model_for<'a>(&'a self, bundle: &'a RunBundle) -> ModelLookup<'a>;
}

/// Model keys given by value (`<secret>/<key>` → key), as `contextos replay --secret` takes them.
pub struct GivenKeys(pub BTreeMap<String, String>);

impl fmt::Debug for GivenKeys {
    // Names only: the values are keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GivenKeys")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ModelSource for GivenKeys {
    fn model_for<'a>(&'a self, bundle: &'a RunBundle) -> ModelLookup<'a> {
        Box::pin(async move { Model::for_bundle(bundle, &self.0) })
    }
}

/// Re-executing recorded runs: the model is asked again, `samples` times, with the
/// candidate's context; a call is answered from the record when the recorded run made the same
/// call, and is never executed otherwise.
#[derive(Clone)]
pub struct Reexecution {
    pub samples: u32,
    pub models: Arc<dyn ModelSource>,
    /// The model tokens all the runs together have spent, and the most they may (checked turn
    /// by turn; past it the replay stops and fails).
    pub meter: Meter,
}

impl Reexecution {
    /// Re-execution with the model keys given by value, and no token limit.
    pub fn with_keys(samples: u32, keys: BTreeMap<String, String>) -> Self {
        Self {
            samples,
            models: Arc::new(GivenKeys(keys)),
            meter: Meter::new(None),
        }
    }

    /// The same, spending at most `max_tokens` over all runs.
    pub fn limited(self, max_tokens: Option<u64>) -> Self {
        Self {
            meter: Meter::new(max_tokens),
            ..self
        }
    }

    /// Samples per run, within bounds.
    pub fn samples(&self) -> u32 {
        self.samples.clamp(1, MAX_SAMPLES)
    }

    /// Why the re-execution stopped after `runs` runs, once its limit is spent (or a SpendQuota
    /// of the tenant refused a turn).
    pub fn over_budget(&self, runs: usize) -> Option<String> {
        if let Some(quota) = self.meter.refused_by_quota() {
            return Some(format!(
                "re-execution stopped after {runs} run(s): {quota}. A replay gate's model turns count against the tenant's SpendQuotas like its runs' turns; the rest were not re-executed and the replay fails (raise the quota, wait for its window, or sample fewer runs or fewer times)"
            ));
        }
        let limit = self.meter.limit()?;
        self.meter.exhausted().then(|| {
            format!(
                "re-execution spent {} model tokens over {runs} run(s), reaching its limit of {limit} (reexecute.maxTokens, or --max-tokens); the rest were not re-executed and the replay fails (raise the limit, or sample fewer runs or fewer times)",
                self.meter.spent()
            )
        })
    }
}

impl fmt::Debug for Reexecution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reexecution")
            .field("samples", &self.samples)
            .field("meter", &self.meter)
            .finish_non_exhaustive()
    }
}

/// What re-executing a run (or, summed, a gate's runs) found over its samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReexecutionReport {
    /// Samples per run.
    pub samples: u32,
    /// Samples whose decisions, verdicts or outcome differed from the record.
    pub diverged_samples: u32,
    /// Calls the model made that the recorded run never made (refused, not executed), over all
    /// samples.
    pub unrecorded_calls: u32,
    /// Model tokens the samples used (the cost of the gate).
    pub tokens: u64,
}

impl ReexecutionReport {
    /// The figures of several runs together.
    pub fn total<'a>(samples: u32, runs: impl IntoIterator<Item = &'a Self>) -> Self {
        runs.into_iter().fold(
            Self {
                samples,
                ..Self::default()
            },
            |sum, run| Self {
                samples,
                diverged_samples: sum.diverged_samples + run.diverged_samples,
                unrecorded_calls: sum.unrecorded_calls + run.unrecorded_calls,
                tokens: sum.tokens.saturating_add(run.tokens),
            },
        )
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        format!(
            "re-executed {} time(s) each: {} sample(s) diverged; {} call(s) the record never made were refused, not executed; {} model token(s)",
            self.samples, self.diverged_samples, self.unrecorded_calls, self.tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_a_limit_stops_only_past_it() {
        let a = ReexecutionReport {
            samples: 3,
            diverged_samples: 1,
            unrecorded_calls: 2,
            tokens: 700,
        };
        let b = ReexecutionReport {
            samples: 3,
            diverged_samples: 0,
            unrecorded_calls: 1,
            tokens: 400,
        };
        let total = ReexecutionReport::total(3, [&a, &b]);
        assert_eq!(
            (
                total.samples,
                total.diverged_samples,
                total.unrecorded_calls,
                total.tokens
            ),
            (3, 1, 3, 1100)
        );
        let mut r = Reexecution::with_keys(3, BTreeMap::new());
        assert_eq!(r.over_budget(2), None, "no limit");
        r = r.limited(Some(1100));
        assert_eq!(r.over_budget(2), None, "nothing spent");
        r.samples = 99;
        assert_eq!(r.samples(), MAX_SAMPLES);
    }
}
