//! Autotune: the tightest value of one numeric knob of an Agent's run budget that its recorded
//! runs still replay under without a single new divergence, found by measuring — each trial is
//! a deterministic replay of the recorded runs with the candidate value — and proposed with
//! headroom as a typed Agent patch, with what was measured. A value the caller asks for that
//! would halt or change recorded runs is refused, with the runs it would change.
//!
//! The search is a binary search between 1 and the current value (the budget can only be
//! tightened here), and assumes what the replay confirms: a tighter budget never lets a run
//! further than a looser one. Every figure reported is a trial's, not an inference.

use std::collections::BTreeMap;

use contextos_crds::{
    AgentSpec,
    proposal::{
        AgentOperation, AgentPatch, BudgetChange, ProposalInsight, ProposalPatch, ProposalTarget, TargetKind,
    },
};
use serde::Serialize;

use super::Draft;
use crate::{
    records::{RecordStore, RunFilter, TenantId},
    run::{
        bundle::{Candidate, NamedAgent, spec_digest},
        replay::{Judging, ReplayError, ReplaySummary, replay_runs},
    },
};

/// A run-budget limit autotune can tighten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum Knob {
    /// budget.maxTokens
    MaxTokens,
    /// budget.maxSteps
    MaxSteps,
    /// budget.maxToolCalls
    MaxToolCalls,
}

impl Knob {
    /// The field, as the Agent's spec names it.
    pub fn field(self) -> &'static str {
        match self {
            Self::MaxTokens => "budget.maxTokens",
            Self::MaxSteps => "budget.maxSteps",
            Self::MaxToolCalls => "budget.maxToolCalls",
        }
    }

    /// Its value in `spec`.
    pub fn get(self, spec: &AgentSpec) -> u64 {
        match self {
            Self::MaxTokens => spec.budget.max_tokens,
            Self::MaxSteps => spec.budget.max_steps.into(),
            Self::MaxToolCalls => spec.budget.max_tool_calls.into(),
        }
    }

    /// `spec` with the knob at `value` (saturating where the field is narrower).
    pub fn set(self, spec: &AgentSpec, value: u64) -> AgentSpec {
        let mut spec = spec.clone();
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        match self {
            Self::MaxTokens => spec.budget.max_tokens = value,
            Self::MaxSteps => spec.budget.max_steps = narrow(value),
            Self::MaxToolCalls => spec.budget.max_tool_calls = narrow(value),
        }
        spec
    }

    fn change(self, value: u64) -> BudgetChange {
        let narrow = |v: u64| Some(u32::try_from(v).unwrap_or(u32::MAX));
        match self {
            Self::MaxTokens => BudgetChange {
                max_tokens: Some(value),
                ..BudgetChange::default()
            },
            Self::MaxSteps => BudgetChange {
                max_steps: narrow(value),
                ..BudgetChange::default()
            },
            Self::MaxToolCalls => BudgetChange {
                max_tool_calls: narrow(value),
                ..BudgetChange::default()
            },
        }
    }
}

/// One measured value: the replay of the recorded runs under it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trial {
    pub value: u64,
    pub runs: usize,
    pub divergent_steps: u32,
    /// Runs that would end differently or change a decision, with the first difference.
    pub changed_runs: Vec<(String, String)>,
}

impl Trial {
    /// Whether nothing recorded would change.
    pub fn clean(&self) -> bool {
        self.divergent_steps == 0 && self.changed_runs.is_empty()
    }

    fn of(value: u64, summary: &ReplaySummary) -> Self {
        let changed_runs = summary
            .replays
            .iter()
            .filter(|r| r.erased.is_none())
            .filter_map(|r| {
                // The earliest step that changes (the run's own outcome last).
                let first = r
                    .divergences
                    .iter()
                    .filter(|d| d.counts())
                    .min_by_key(|d| if d.step == 0 { u32::MAX } else { d.step })?;
                let at = if first.step == 0 {
                    "the run".to_owned()
                } else {
                    format!("step {}", first.step)
                };
                let clip = |text: &str| -> String {
                    let mut out: String = text.chars().take(120).collect();
                    if out.len() < text.len() {
                        out.push('…');
                    }
                    out
                };
                Some((
                    r.run_id.clone(),
                    format!(
                        "{at}: {:?} ({} → {})",
                        first.kind,
                        clip(&first.recorded),
                        clip(&first.replayed)
                    ),
                ))
            })
            .collect();
        Self {
            value,
            runs: summary.runs,
            divergent_steps: summary.divergent_steps,
            changed_runs,
        }
    }
}

/// What a search found.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tuned {
    pub knob: Knob,
    pub current: u64,
    /// The smallest value the runs replay under unchanged.
    pub tightest: u64,
    /// What is proposed: `tightest` with headroom, never above `current`.
    pub proposed: u64,
    /// Every trial, in the order it was made.
    pub trials: Vec<Trial>,
}

/// Why no value is proposed.
#[derive(Debug, thiserror::Error)]
pub enum AutotuneError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("no finished run of agent {0} in the window: nothing to measure a budget against")]
    NoRuns(String),
    #[error(
        "the recorded runs do not replay unchanged even at the current {field} ({current}): {changed}; a tighter value cannot be judged"
    )]
    NotClean {
        field: &'static str,
        current: u64,
        changed: String,
    },
    #[error("{field} = {value} would change {} of {runs} recorded run(s): {}", changed.len(), changed.iter().map(|(r, why)| format!("run {r} at {why}")).collect::<Vec<_>>().join("; "))]
    WouldChange {
        field: &'static str,
        value: u64,
        runs: usize,
        changed: Vec<(String, String)>,
    },
    #[error("{field} = {value} is not tighter than the current {current}: autotune only tightens")]
    NotTighter {
        field: &'static str,
        value: u64,
        current: u64,
    },
}

/// The recorded runs of one agent, and how to replay them.
#[derive(Debug)]
pub struct Workload<'a, S> {
    pub store: &'a S,
    pub tenant: &'a TenantId,
    pub agent: &'a str,
    pub spec: &'a AgentSpec,
    pub filter: RunFilter,
}

impl<S: RecordStore> Workload<'_, S> {
    /// Replays the runs with the knob at `value`.
    pub async fn trial(&self, knob: Knob, value: u64) -> Result<Trial, AutotuneError> {
        let candidate = Candidate {
            agent: Some(NamedAgent {
                name: self.agent.to_owned(),
                spec: knob.set(self.spec, value),
            }),
            ..Candidate::default()
        };
        let summary = replay_runs(
            self.store,
            self.tenant,
            &self.filter,
            &[self.agent.to_owned()],
            &BTreeMap::new(),
            &candidate,
            &Judging::default(),
        )
        .await?;
        if summary.runs == 0 {
            return Err(AutotuneError::NoRuns(self.agent.to_owned()));
        }
        Ok(Trial::of(value, &summary))
    }

    /// The tightest value of `knob` the runs replay under unchanged, and the proposed value
    /// (`headroom_percent` above it, at most the current value).
    pub async fn search(&self, knob: Knob, headroom_percent: u32) -> Result<Tuned, AutotuneError> {
        let current = knob.get(self.spec);
        let mut trials = Vec::new();
        let baseline = self.trial(knob, current).await?;
        let clean = baseline.clean();
        trials.push(baseline.clone());
        if !clean {
            return Err(AutotuneError::NotClean {
                field: knob.field(),
                current,
                changed: changed_text(&baseline.changed_runs),
            });
        }
        // Invariant: `high` replays clean; every value below `low` was measured not to.
        let (mut low, mut high) = (1, current);
        while low < high {
            let middle = low + (high - low) / 2;
            let trial = self.trial(knob, middle).await?;
            let clean = trial.clean();
            trials.push(trial);
            if clean {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        let tightest = high;
        let headroom = tightest.saturating_mul(u64::from(headroom_percent)).div_ceil(100);
        let proposed = tightest.saturating_add(headroom).min(current);
        if proposed != tightest && !trials.iter().any(|t| t.value == proposed) {
            let trial = self.trial(knob, proposed).await?;
            let clean = trial.clean();
            trials.push(trial.clone());
            if !clean {
                // Not monotonic after all: say so rather than propose what was not measured clean.
                return Err(AutotuneError::WouldChange {
                    field: knob.field(),
                    value: proposed,
                    runs: trial.runs,
                    changed: trial.changed_runs,
                });
            }
        }
        Ok(Tuned {
            knob,
            current,
            tightest,
            proposed,
            trials,
        })
    }

    /// A value the caller chose, measured: refused if it would change a recorded run.
    pub async fn check(&self, knob: Knob, value: u64) -> Result<Tuned, AutotuneError> {
        let current = knob.get(self.spec);
        if value >= current {
            return Err(AutotuneError::NotTighter {
                field: knob.field(),
                value,
                current,
            });
        }
        let trial = self.trial(knob, value).await?;
        if !trial.clean() {
            return Err(AutotuneError::WouldChange {
                field: knob.field(),
                value,
                runs: trial.runs,
                changed: trial.changed_runs,
            });
        }
        Ok(Tuned {
            knob,
            current,
            tightest: value,
            proposed: value,
            trials: vec![trial],
        })
    }
}

fn changed_text(changed: &[(String, String)]) -> String {
    changed
        .iter()
        .map(|(run, why)| format!("run {run} at {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Tuned {
    /// The measured effect, in a sentence.
    pub fn summary(&self, agent: &str) -> String {
        let runs = self.trials.first().map_or(0, |t| t.runs);
        let below = self.trials.iter().filter(|t| !t.clean()).max_by_key(|t| t.value);
        format!(
            "{}: {} → {} for agent {agent}: its {runs} recorded run(s) replay with no new divergence down to {}{}; {} trial(s)",
            self.knob.field(),
            self.current,
            self.proposed,
            self.tightest,
            below.map_or_else(String::new, |t| format!(
                " ({} would change {} run(s))",
                t.value,
                t.changed_runs.len()
            )),
            self.trials.len()
        )
    }

    /// The proposal: the Agent's budget set to the proposed value.
    pub fn draft(&self, agent: &str, spec: &AgentSpec) -> Draft {
        Draft {
            target: ProposalTarget {
                kind: TargetKind::Agent,
                name: agent.to_owned(),
            },
            base_digest: spec_digest(spec),
            patch: ProposalPatch {
                agent: Some(AgentPatch {
                    operations: vec![AgentOperation {
                        set_budget: Some(self.knob.change(self.proposed)),
                        ..AgentOperation::default()
                    }],
                }),
                ..ProposalPatch::default()
            },
            insight: ProposalInsight {
                kind: "autotune".into(),
                agent: agent.to_owned(),
                about: self.knob.field().into(),
                summary: self.summary(agent).chars().take(1024).collect(),
                runs: self.trials.first().map_or(0, |t| t.runs as u64),
                evidence: Vec::new(),
            },
        }
    }
}
