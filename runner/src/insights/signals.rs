//! Signals from the records: what went wrong or was under pressure in the runs of a window,
//! counted per agent, tool, rule and context source, each count with the entries it came from.
//! Pure: a run's entries in, counts out (reading the store is [`super::gather`]'s).

use std::collections::BTreeMap;

use contextos_crds::policy::PolicyEffect;
use serde::Serialize;

use crate::records::{EntryBody, Hash, RecordEntry, entry::Verdict};

/// The most entries a signal lists as its evidence (it counts past that).
pub const MAX_EVIDENCE: usize = 20;

/// One entry a signal points at: the run, the entry's position and hash (which the chain's
/// verification vouches for).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRef {
    pub run_id: String,
    pub seq: u64,
    pub hash: Hash,
}

/// A count and the entries behind it (the first [`MAX_EVIDENCE`]), and how many runs and when
/// the newest of them started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub count: u64,
    pub runs: u64,
    pub newest_ms: i64,
    pub evidence: Vec<EntryRef>,
    /// The last run counted (runs are counted once each).
    #[serde(skip)]
    last_run: Option<String>,
}

impl Tally {
    fn add(&mut self, run: &RunEntries, at: (u64, Hash)) {
        self.count += 1;
        if self.last_run.as_deref() != Some(run.run_id.as_str()) {
            self.runs += 1;
            self.last_run = Some(run.run_id.clone());
        }
        self.newest_ms = self.newest_ms.max(run.started_at_ms);
        if self.evidence.len() < MAX_EVIDENCE {
            self.evidence.push(EntryRef {
                run_id: run.run_id.clone(),
                seq: at.0,
                hash: at.1,
            });
        }
    }
}

/// One run as read: its id, agent, when it started and its entries with their hashes.
#[derive(Clone, Debug)]
pub struct RunEntries {
    pub run_id: String,
    pub agent: String,
    pub started_at_ms: i64,
    pub entries: Vec<(Hash, RecordEntry)>,
}

/// What the runs of one agent show.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSignals {
    pub runs: u64,
    pub completed: u64,
    /// Failed runs by reason code (`ValidationFailed`, `Looping`, `BudgetExhausted`, …).
    pub failed: BTreeMap<String, Tally>,
    /// Critic verdicts other than continue: `revise`, `halt`, `escalate`.
    pub critic: BTreeMap<String, Tally>,
    /// Steps where a Functional State signal was raised (budget ≥ 0.8, loop/gate/conflict ≥
    /// 0.5, evidence 1.0), by signal.
    pub pressure: BTreeMap<String, Tally>,
    pub tools: BTreeMap<String, ToolSignals>,
    pub rules: BTreeMap<String, RuleSignals>,
    /// ContextPack sources cut to fit the context, by source.
    pub sources_cut: BTreeMap<String, Tally>,
}

/// What the calls of one tool show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSignals {
    pub calls: u64,
    /// Denials by the rule that denied.
    pub denied: BTreeMap<String, Tally>,
    pub dead_lettered: Tally,
    pub approvals_granted: Tally,
    pub approvals_refused: Tally,
}

/// What the decisions of one rule (`policy/rule`, `policy/default`, …) show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSignals {
    /// Decisions it made, by effect (`allow`, `deny`, `require_approval`).
    pub decided: BTreeMap<String, u64>,
    /// Decisions of a dryRun policy's rule that differ from the decision applied to the call.
    pub would_change: Tally,
    /// Approvals asked for under it: granted and refused.
    pub approvals_granted: Tally,
    pub approvals_refused: Tally,
}

/// The signals of every agent in a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signals {
    pub agents: BTreeMap<String, AgentSignals>,
}

fn effect_name(effect: PolicyEffect) -> &'static str {
    match effect {
        PolicyEffect::Allow => "allow",
        PolicyEffect::Deny => "deny",
        PolicyEffect::RequireApproval => "require_approval",
    }
}

fn verdict_name(verdict: Verdict) -> Option<&'static str> {
    match verdict {
        Verdict::Continue => None,
        Verdict::Revise => Some("revise"),
        Verdict::Halt => Some("halt"),
        Verdict::Escalate => Some("escalate"),
    }
}

/// The Functional State signals a step's state raises (the critic's thresholds).
fn raised(state: &serde_json::Value) -> Vec<&'static str> {
    let level = |name: &str| state.get(name).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    [
        ("budget", level("budget") >= 0.8),
        ("loop", level("loop") >= 0.5),
        ("evidence", level("evidence") >= 1.0),
        ("gate", level("gate") >= 0.5),
        ("conflict", level("conflict") >= 0.5),
    ]
    .into_iter()
    .filter_map(|(name, up)| up.then_some(name))
    .collect()
}

impl Signals {
    /// Adds what `run` shows.
    pub fn add(&mut self, run: &RunEntries) {
        let agent = self.agents.entry(run.agent.clone()).or_default();
        agent.runs += 1;
        // Calls by id: their tool, and the rule their approval was asked under.
        let mut tools: BTreeMap<&str, &str> = BTreeMap::new();
        let mut gated: BTreeMap<&str, String> = BTreeMap::new();
        // dryRun decisions of a call, judged once the applied one is read (they come first).
        let mut shadows: Vec<(&str, &str, PolicyEffect, (u64, Hash))> = Vec::new();
        for (hash, entry) in &run.entries {
            let at = (entry.seq, *hash);
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    tools.insert(&call.call_id, &call.tool);
                    agent.tools.entry(call.tool.clone()).or_default().calls += 1;
                }
                EntryBody::PolicyDecision(decision) => {
                    if decision.dry_run {
                        shadows.push((&decision.call_id, &decision.rule, decision.effect, at));
                        continue;
                    }
                    for (_, shadow, effect, at) in shadows.iter().filter(|s| s.0 == decision.call_id) {
                        if *effect != decision.enforced {
                            agent
                                .rules
                                .entry((*shadow).to_owned())
                                .or_default()
                                .would_change
                                .add(run, *at);
                        }
                    }
                    shadows.retain(|s| s.0 != decision.call_id);
                    let rule = agent.rules.entry(decision.rule.clone()).or_default();
                    *rule
                        .decided
                        .entry(effect_name(decision.enforced).into())
                        .or_default() += 1;
                    match decision.enforced {
                        PolicyEffect::Deny => {
                            let tool = tools
                                .get(decision.call_id.as_str())
                                .copied()
                                .unwrap_or("(unknown)");
                            agent
                                .tools
                                .entry(tool.to_owned())
                                .or_default()
                                .denied
                                .entry(decision.rule.clone())
                                .or_default()
                                .add(run, at);
                        }
                        PolicyEffect::RequireApproval => {
                            gated.insert(&decision.call_id, decision.rule.clone());
                        }
                        PolicyEffect::Allow => {}
                    }
                }
                EntryBody::ApprovalGranted { call_id, .. } | EntryBody::ApprovalRefused { call_id, .. } => {
                    let granted = matches!(entry.body, EntryBody::ApprovalGranted { .. });
                    let tool = tools.get(call_id.as_str()).copied().unwrap_or("(unknown)");
                    let by_tool = agent.tools.entry(tool.to_owned()).or_default();
                    if granted {
                        by_tool.approvals_granted.add(run, at);
                    } else {
                        by_tool.approvals_refused.add(run, at);
                    }
                    if let Some(rule) = gated.get(call_id.as_str()) {
                        let by_rule = agent.rules.entry(rule.clone()).or_default();
                        if granted {
                            by_rule.approvals_granted.add(run, at);
                        } else {
                            by_rule.approvals_refused.add(run, at);
                        }
                    }
                }
                EntryBody::DeadLettered { tool, .. } => {
                    agent
                        .tools
                        .entry(tool.clone())
                        .or_default()
                        .dead_lettered
                        .add(run, at);
                }
                EntryBody::CriticVerdict {
                    verdict,
                    functional_state,
                    ..
                } => {
                    if let Some(name) = verdict_name(*verdict) {
                        agent.critic.entry(name.into()).or_default().add(run, at);
                    }
                    for signal in raised(functional_state) {
                        agent.pressure.entry(signal.into()).or_default().add(run, at);
                    }
                }
                EntryBody::ContextCompiled { sources, .. } => {
                    for source in sources.iter().filter(|s| s.cut.is_some()) {
                        agent
                            .sources_cut
                            .entry(source.source.clone())
                            .or_default()
                            .add(run, at);
                    }
                }
                EntryBody::Completed { .. } => agent.completed += 1,
                EntryBody::Failed { reason, .. } => {
                    agent.failed.entry(reason.clone()).or_default().add(run, at);
                }
                _ => {}
            }
        }
    }
}
