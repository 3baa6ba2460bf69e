//! The replay model: serves the model turns a run recorded, by step, so a replay re-executes the
//! run's decisions without asking any model again.

use std::collections::BTreeMap;

use super::{ModelError, ModelTurn};
use crate::records::{EntryBody, RecordEntry};

/// Recorded turns of one run.
#[derive(Clone, Debug, Default)]
pub struct ReplayModel {
    run_id: String,
    turns: BTreeMap<u32, ModelTurn>,
    /// How the run ended when its model could not answer the step after its last turn.
    ended: Option<(u32, String, String)>,
}

/// The reasons a run ends with when its model cannot answer for good (as the engine records
/// them): a script that ran out; a token budget the gateway found spent before the next turn
/// (checked there, not by the engine a replay runs); quotas spent by other runs.
const MODEL_ENDINGS: [&str; 4] = [
    "ModelScriptExhausted",
    "TokenBudgetExhausted",
    crate::quota::EXCEEDED,
    "StoreQuotaExceeded",
];

impl ReplayModel {
    /// Collects the `model_turn` entries of a run (the first one per step: a resumed run reuses
    /// the turn it recorded before a crash, so there is one per step).
    pub fn from_entries(run_id: &str, entries: &[RecordEntry]) -> Result<Self, ModelError> {
        let mut turns = BTreeMap::new();
        for entry in entries {
            if let EntryBody::ModelTurn { step, response, .. } = &entry.body {
                let turn: ModelTurn =
                    serde_json::from_value(response.clone()).map_err(|e| ModelError::BadScript {
                        script: format!("record of run {run_id}"),
                        detail: format!("model turn of step {step} cannot be read: {e}"),
                    })?;
                turns.entry(*step).or_insert(turn);
            }
        }
        let next = turns.keys().next_back().map_or(1, |last| last + 1);
        let ended = match entries.last().map(|e| &e.body) {
            Some(EntryBody::Failed { reason, message }) if MODEL_ENDINGS.contains(&reason.as_str()) => {
                Some((next, reason.clone(), message.clone()))
            }
            _ => None,
        };
        Ok(Self {
            run_id: run_id.to_owned(),
            turns,
            ended,
        })
    }

    /// The recorded turn of `step`.
    pub fn complete(&self, step: u32) -> Result<ModelTurn, ModelError> {
        if let Some(turn) = self.turns.get(&step) {
            return Ok(turn.clone());
        }
        match &self.ended {
            // Where the recorded run's model failed for good, the replay's does too: otherwise
            // every such run (a quota spent, a script run out) would count as diverged in every
            // gate while it is in the window.
            Some((at, reason, message)) if *at == step => Err(ModelError::RecordedEnd {
                reason: reason.clone(),
                message: message.clone(),
            }),
            _ => Err(ModelError::NotRecorded {
                run_id: self.run_id.clone(),
                step,
                recorded: self.turns.len(),
            }),
        }
    }
}
