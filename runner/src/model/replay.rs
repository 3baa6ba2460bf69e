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
}

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
        Ok(Self {
            run_id: run_id.to_owned(),
            turns,
        })
    }

    /// The recorded turn of `step`.
    pub fn complete(&self, step: u32) -> Result<ModelTurn, ModelError> {
        self.turns
            .get(&step)
            .cloned()
            .ok_or_else(|| ModelError::NotRecorded {
                run_id: self.run_id.clone(),
                step,
                recorded: self.turns.len(),
            })
    }
}
