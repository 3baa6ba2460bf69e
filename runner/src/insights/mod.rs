//! The improvement loop's first half: signals read from the records of a window (failures,
//! denials, dead letters, approvals, dryRun would-be changes, Functional State pressure,
//! context cut to fit) and the insights grouped from them, each with the entries it rests on.
//! Nothing here changes anything: an insight says what a change could be, for people (and
//! later typed proposals) to take through replay and promotion.
//!
//! [`signals`] and [`synthesize`] are pure; [`gather`] reads the store.

pub mod signals;
pub mod synthesize;

use std::collections::BTreeSet;

use crate::{
    feedback::{Corrections, FeedbackError},
    records::{
        RecordStore, RunFilter, TenantId,
        read::{ReadError, read_run},
    },
};

/// Why a window could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
}

pub use self::{
    signals::{RunEntries, Signals},
    synthesize::{Insight, InsightKind, Question, Thresholds, open_questions, synthesize},
};

/// Most runs one window reads (newest first); a wider window is cut to these.
pub const MAX_RUNS: usize = 10_000;

/// The signals of a window, and what could not be read.
#[derive(Clone, Debug, Default)]
pub struct Gathered {
    pub signals: Signals,
    pub runs: usize,
    /// Runs left out (id, why): one damaged run is not a reason to say nothing.
    pub unreadable: Vec<(String, String)>,
    /// The window held more than [`MAX_RUNS`] runs; the newest were read.
    pub truncated: bool,
}

/// Reads the runs of `tenant` that `filter` selects (at most [`MAX_RUNS`]) into signals, with
/// people's `corrections` of them.
pub async fn gather<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    filter: &RunFilter,
    corrections: &Corrections<'_, S>,
) -> Result<Gathered, GatherError> {
    let corrected: BTreeSet<String> = corrections.runs(MAX_RUNS * 10).await?.into_iter().collect();
    // One more than read, to tell a full window from a cut one.
    let filter = RunFilter {
        limit: Some(MAX_RUNS + 1),
        ..filter.clone()
    };
    let mut summaries = store.list_runs(tenant, &filter).await.map_err(ReadError::from)?;
    let mut gathered = Gathered {
        truncated: summaries.len() > MAX_RUNS,
        ..Gathered::default()
    };
    summaries.truncate(MAX_RUNS);
    for summary in summaries {
        match read_run(store, tenant, &summary.run_id).await {
            Ok(entries) => {
                let run = RunEntries {
                    run_id: summary.run_id.clone(),
                    agent: summary.agent.clone(),
                    started_at_ms: summary.started_at_ms,
                    entries,
                };
                gathered.signals.add(&run);
                if corrected.contains(&run.run_id) {
                    let records = corrections.of_run(&run.run_id).await?;
                    gathered.signals.add_corrections(&run, &records);
                }
                gathered.runs += 1;
            }
            Err(ReadError::Store(error)) => return Err(GatherError::Read(ReadError::Store(error))),
            Err(error) => gathered
                .unreadable
                .push((summary.run_id.clone(), error.to_string())),
        }
    }
    Ok(gathered)
}

#[cfg(test)]
pub(crate) mod tests;
