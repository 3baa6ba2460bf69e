//! Autotune: the tightest value of one numeric knob — an Agent's run budget or critic revisions,
//! its ContextPack's token budget or a source's token cap — that the Agent's recorded runs still
//! replay under without a single new divergence, found by measuring: each trial replays the
//! recorded runs with the candidate value (deterministically, or re-executing them with the
//! model asked again, as a pack's gate does). The value is proposed with headroom as a typed
//! patch of the object that holds the knob, with what was measured. A value the caller asks for
//! that would halt or change recorded runs is refused, with the runs it would change.
//!
//! The search is a binary search between the knob's floor and the current value (it can only
//! be tightened here), and assumes what the replay confirms: a tighter value never lets a run
//! further than a looser one. Every figure reported is a trial's, not an inference.

use std::collections::BTreeMap;

use contextos_crds::{
    AgentSpec,
    proposal::{
        AgentOperation, AgentPatch, BudgetChange, ContextPackOperation, ContextPackPatch, CriticChange,
        ProposalInsight, ProposalPatch, ProposalTarget, SetSourceMaxTokens, TargetKind,
    },
};
use serde::Serialize;

use super::Draft;
use crate::{
    records::{RecordStore, RunFilter, TenantId},
    run::{
        bundle::{Candidate, NamedAgent, NamedPack, spec_digest},
        replay::{Judging, Reexecution, ReplayError, ReplaySummary, replay_runs},
    },
};

/// A numeric limit autotune can tighten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum Knob {
    /// The Agent's budget.maxTokens
    MaxTokens,
    /// The Agent's budget.maxSteps
    MaxSteps,
    /// The Agent's budget.maxToolCalls
    MaxToolCalls,
    /// The Agent's critic.maxRevisions
    MaxRevisions,
    /// The tokenBudget of the Agent's ContextPack
    TokenBudget,
    /// One source's maxTokens in the Agent's ContextPack (name it with --source)
    SourceMaxTokens,
}

impl Knob {
    /// The lowest value the field admits.
    fn floor(self) -> u64 {
        match self {
            Self::MaxRevisions => 0,
            Self::TokenBudget => 256,
            _ => 1,
        }
    }

    /// Whether the knob is the ContextPack's rather than the Agent's.
    fn in_pack(self) -> bool {
        matches!(self, Self::TokenBudget | Self::SourceMaxTokens)
    }
}

/// What one knob is, in one workload: the field by name, its current value, and how a value
/// becomes a candidate and a patch.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Setting {
    pub knob: Knob,
    /// The field, as its object's spec names it (e.g. `sources[runbook].maxTokens`).
    pub field: String,
    pub current: u64,
}

/// The recorded runs of one agent, and how to replay them.
#[derive(Debug)]
pub struct Workload<'a, S> {
    pub store: &'a S,
    pub tenant: &'a TenantId,
    pub agent: &'a str,
    pub spec: &'a AgentSpec,
    /// The Agent's ContextPack, for the pack's knobs.
    pub pack: Option<&'a NamedPack>,
    /// The source whose cap `Knob::SourceMaxTokens` tunes.
    pub source: Option<&'a str>,
    pub filter: RunFilter,
    /// Trials re-execute the runs (the model asked again) instead of replaying their turns.
    pub reexecution: Option<Reexecution>,
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
    pub setting: Setting,
    /// The smallest value the runs replay under unchanged.
    pub tightest: u64,
    /// What is proposed: `tightest` with headroom, never above the current value.
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
    #[error("{0}")]
    NoSuchKnob(String),
    #[error("a trial stopped short: {0}")]
    Stopped(String),
    #[error(
        "the recorded runs do not replay unchanged even at the current {field} ({current}): {changed}; a tighter value cannot be judged"
    )]
    NotClean {
        field: String,
        current: u64,
        changed: String,
    },
    #[error("{field} = {value} would change {} of {runs} recorded run(s): {}", changed.len(), changed.iter().map(|(r, why)| format!("run {r} at {why}")).collect::<Vec<_>>().join("; "))]
    WouldChange {
        field: String,
        value: u64,
        runs: usize,
        changed: Vec<(String, String)>,
    },
    #[error("{field} = {value} is not tighter than the current {current}: autotune only tightens")]
    NotTighter { field: String, value: u64, current: u64 },
    #[error("{field} = {value} is below the lowest value the field admits ({floor})")]
    BelowFloor { field: String, value: u64, floor: u64 },
}

impl<S: RecordStore> Workload<'_, S> {
    /// The pack the knob is in, or why there is none.
    fn pack(&self, knob: Knob) -> Result<&NamedPack, AutotuneError> {
        self.pack.ok_or_else(|| {
            AutotuneError::NoSuchKnob(format!(
                "{knob:?} is a knob of the Agent's ContextPack, and ContextPack {} was not read",
                self.spec.context_pack_ref.name
            ))
        })
    }

    /// What `knob` is here: its field and current value.
    pub fn setting(&self, knob: Knob) -> Result<Setting, AutotuneError> {
        let agent = |field: &str, current: u64| Setting {
            knob,
            field: field.to_owned(),
            current,
        };
        Ok(match knob {
            Knob::MaxTokens => agent("budget.maxTokens", self.spec.budget.max_tokens),
            Knob::MaxSteps => agent("budget.maxSteps", self.spec.budget.max_steps.into()),
            Knob::MaxToolCalls => agent("budget.maxToolCalls", self.spec.budget.max_tool_calls.into()),
            Knob::MaxRevisions => agent("critic.maxRevisions", self.spec.critic.max_revisions.into()),
            Knob::TokenBudget => {
                let pack = self.pack(knob)?;
                agent(
                    &format!("ContextPack {} tokenBudget", pack.name),
                    pack.spec.token_budget.into(),
                )
            }
            Knob::SourceMaxTokens => {
                let pack = self.pack(knob)?;
                let name = self.source.ok_or_else(|| {
                    AutotuneError::NoSuchKnob(
                        "source-max-tokens tunes one source: name it with --source".into(),
                    )
                })?;
                let source = pack.spec.sources.iter().find(|s| s.name == name).ok_or_else(|| {
                    AutotuneError::NoSuchKnob(format!(
                        "ContextPack {} has no source {name} (it has: {})",
                        pack.name,
                        pack.spec
                            .sources
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                // Uncapped, a source can use at most the pack's whole budget.
                let current = source.max_tokens.unwrap_or(pack.spec.token_budget);
                agent(
                    &format!("ContextPack {} sources[{name}].maxTokens", pack.name),
                    current.into(),
                )
            }
        })
    }

    /// The Agent and pack with the knob at `value` (saturating where the field is narrower).
    fn candidate(&self, knob: Knob, value: u64) -> Result<Candidate, AutotuneError> {
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if knob.in_pack() {
            let mut pack = self.pack(knob)?.clone();
            match knob {
                Knob::TokenBudget => pack.spec.token_budget = narrow(value),
                _ => {
                    let name = self.source.unwrap_or_default();
                    for source in pack.spec.sources.iter_mut().filter(|s| s.name == name) {
                        source.max_tokens = Some(narrow(value));
                    }
                }
            }
            return Ok(Candidate {
                context_pack: Some(pack),
                ..Candidate::default()
            });
        }
        let mut spec = self.spec.clone();
        match knob {
            Knob::MaxTokens => spec.budget.max_tokens = value,
            Knob::MaxSteps => spec.budget.max_steps = narrow(value),
            Knob::MaxToolCalls => spec.budget.max_tool_calls = narrow(value),
            _ => spec.critic.max_revisions = narrow(value),
        }
        Ok(Candidate {
            agent: Some(NamedAgent {
                name: self.agent.to_owned(),
                spec,
            }),
            ..Candidate::default()
        })
    }

    /// Replays the runs with the knob at `value`.
    pub async fn trial(&self, knob: Knob, value: u64) -> Result<Trial, AutotuneError> {
        let candidate = self.candidate(knob, value)?;
        let summary = replay_runs(
            self.store,
            self.tenant,
            &self.filter,
            &[self.agent.to_owned()],
            &BTreeMap::new(),
            &candidate,
            &Judging {
                reexecution: self.reexecution.clone(),
                ..Judging::default()
            },
        )
        .await?;
        // A trial that stopped short judged only some runs: it says nothing of the value.
        if let Some(why) = summary.stopped {
            return Err(AutotuneError::Stopped(why));
        }
        if summary.runs == 0 {
            return Err(AutotuneError::NoRuns(self.agent.to_owned()));
        }
        Ok(Trial::of(value, &summary))
    }

    /// The tightest value of `knob` the runs replay under unchanged, and the proposed value
    /// (`headroom_percent` above it, at most the current value).
    pub async fn search(&self, knob: Knob, headroom_percent: u32) -> Result<Tuned, AutotuneError> {
        let setting = self.setting(knob)?;
        let current = setting.current;
        let mut trials = Vec::new();
        let baseline = self.trial(knob, current).await?;
        let clean = baseline.clean();
        trials.push(baseline.clone());
        if !clean {
            return Err(AutotuneError::NotClean {
                field: setting.field,
                current,
                changed: changed_text(&baseline.changed_runs),
            });
        }
        // Invariant: `high` replays clean; every value below `low` was measured not to.
        let (mut low, mut high) = (knob.floor().min(current), current);
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
                    field: setting.field,
                    value: proposed,
                    runs: trial.runs,
                    changed: trial.changed_runs,
                });
            }
        }
        Ok(Tuned {
            setting,
            tightest,
            proposed,
            trials,
        })
    }

    /// A value the caller chose, measured: refused if it would change a recorded run.
    pub async fn check(&self, knob: Knob, value: u64) -> Result<Tuned, AutotuneError> {
        let setting = self.setting(knob)?;
        if value >= setting.current {
            return Err(AutotuneError::NotTighter {
                field: setting.field,
                value,
                current: setting.current,
            });
        }
        if value < knob.floor() {
            return Err(AutotuneError::BelowFloor {
                field: setting.field,
                value,
                floor: knob.floor(),
            });
        }
        let trial = self.trial(knob, value).await?;
        if !trial.clean() {
            return Err(AutotuneError::WouldChange {
                field: setting.field,
                value,
                runs: trial.runs,
                changed: trial.changed_runs,
            });
        }
        Ok(Tuned {
            setting,
            tightest: value,
            proposed: value,
            trials: vec![trial],
        })
    }

    /// The proposal: the knob's object with the proposed value.
    pub fn draft(&self, tuned: &Tuned) -> Result<Draft, AutotuneError> {
        let knob = tuned.setting.knob;
        let value = tuned.proposed;
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let (target, base_digest, patch) = if knob.in_pack() {
            let pack = self.pack(knob)?;
            let operation = match knob {
                Knob::TokenBudget => ContextPackOperation {
                    set_token_budget: Some(narrow(value)),
                    ..ContextPackOperation::default()
                },
                _ => ContextPackOperation {
                    set_source_max_tokens: Some(SetSourceMaxTokens {
                        source: self.source.unwrap_or_default().to_owned(),
                        max_tokens: Some(narrow(value)),
                    }),
                    ..ContextPackOperation::default()
                },
            };
            (
                ProposalTarget {
                    kind: TargetKind::ContextPack,
                    name: pack.name.clone(),
                },
                spec_digest(&pack.spec),
                ProposalPatch {
                    context_pack: Some(ContextPackPatch {
                        operations: vec![operation],
                    }),
                    ..ProposalPatch::default()
                },
            )
        } else {
            let operation = match knob {
                Knob::MaxRevisions => AgentOperation {
                    set_critic: Some(CriticChange {
                        max_revisions: Some(narrow(value)),
                        ..CriticChange::default()
                    }),
                    ..AgentOperation::default()
                },
                _ => AgentOperation {
                    set_budget: Some(BudgetChange {
                        max_tokens: (knob == Knob::MaxTokens).then_some(value),
                        max_steps: (knob == Knob::MaxSteps).then(|| narrow(value)),
                        max_tool_calls: (knob == Knob::MaxToolCalls).then(|| narrow(value)),
                        ..BudgetChange::default()
                    }),
                    ..AgentOperation::default()
                },
            };
            (
                ProposalTarget {
                    kind: TargetKind::Agent,
                    name: self.agent.to_owned(),
                },
                spec_digest(self.spec),
                ProposalPatch {
                    agent: Some(AgentPatch {
                        operations: vec![operation],
                    }),
                    ..ProposalPatch::default()
                },
            )
        };
        Ok(Draft {
            target,
            base_digest,
            patch,
            insight: ProposalInsight {
                kind: "autotune".into(),
                agent: self.agent.to_owned(),
                about: tuned.setting.field.chars().take(253).collect(),
                summary: tuned.summary(self.agent).chars().take(1024).collect(),
                runs: tuned.trials.first().map_or(0, |t| t.runs as u64),
                evidence: Vec::new(),
            },
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
            self.setting.field,
            self.setting.current,
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
}
