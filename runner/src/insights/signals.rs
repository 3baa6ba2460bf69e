//! Signals from the records: what went wrong or was under pressure in the runs of a window,
//! counted per agent, tool, rule and context source, each count with the entries it came from.
//! Pure: a run's entries in, counts out (reading the store is [`super::gather`]'s).
//!
//! A run's entries are first folded per call, because a call can be recorded more than once: a
//! call that waited for approval is sent again when the run resumes (requested and decided
//! again), and a run resumed after a crash sends its last turn's calls again. Each call counts
//! once, with its last decision and the last word on its approval.

use std::collections::BTreeMap;

use contextos_crds::{agent::FunctionalSignal, policy::PolicyEffect};
use serde::Serialize;

use crate::{
    policy::strictness,
    records::{EntryBody, Hash, RecordEntry, entry::Verdict},
    run::{critic, state::FunctionalState},
};

/// The most entries a signal lists as its evidence (it counts past that).
pub const MAX_EVIDENCE: usize = 20;

/// One entry a signal points at: the run (and when it started), the entry's position and hash
/// (which the chain's verification vouches for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRef {
    pub run_id: String,
    pub run_started_ms: i64,
    pub seq: u64,
    pub hash: Hash,
    /// The call the entry is about, where it is a call's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

impl EntryRef {
    /// Newest run first, then by run and position: the evidence kept does not depend on the
    /// order runs were read in.
    fn order(&self) -> (std::cmp::Reverse<i64>, &str, u64) {
        (std::cmp::Reverse(self.run_started_ms), &self.run_id, self.seq)
    }
}

/// A count, how many runs it was seen in and when the newest started, and the entries behind
/// it (those of the newest runs, at most [`MAX_EVIDENCE`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub count: u64,
    pub runs: u64,
    pub newest_ms: i64,
    pub evidence: Vec<EntryRef>,
    /// The last run counted (a run's entries are counted together, so once each).
    #[serde(skip)]
    last_run: Option<String>,
}

impl Tally {
    fn add(&mut self, at: &EntryRef) {
        self.count += 1;
        if self.last_run.as_deref() != Some(at.run_id.as_str()) {
            self.runs += 1;
            self.last_run = Some(at.run_id.clone());
        }
        self.newest_ms = self.newest_ms.max(at.run_started_ms);
        let place = self.evidence.partition_point(|e| e.order() < at.order());
        if place < MAX_EVIDENCE {
            self.evidence.insert(place, at.clone());
            self.evidence.truncate(MAX_EVIDENCE);
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
    /// Critic verdicts other than continue — `revise`, `halt`, `escalate` — not counting the
    /// pauses for an approval (recorded as escalations to the approvers).
    pub critic: BTreeMap<String, Tally>,
    /// Steps where a Functional State signal was raised, at the critic's own thresholds for a
    /// step that calls tools (`budget`, `loop`, `gate`, `conflict`; an answer without evidence
    /// shows as a `revise` verdict). Not counting the steps that paused for an approval.
    pub pressure: BTreeMap<String, Tally>,
    /// Steps whose Functional State could not be read (a run about a person since erased).
    pub unreadable_states: u64,
    pub tools: BTreeMap<String, ToolSignals>,
    pub rules: BTreeMap<String, RuleSignals>,
    /// Calls refused before they were taken as a call of a tool (a tool the agent does not
    /// have, outside the run's scope, over its call budget), by the rule that refused.
    pub refused_unlisted: BTreeMap<String, Tally>,
    /// ContextPack sources cut to fit the context, by source.
    pub sources_cut: BTreeMap<String, Tally>,
    /// People's corrections of runs that name no call, by label.
    pub corrections: BTreeMap<String, Tally>,
}

/// What the calls of one tool show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSignals {
    pub calls: u64,
    /// Calls a policy denied, by the rule that denied.
    pub denied: BTreeMap<String, Tally>,
    pub dead_lettered: Tally,
    /// Calls whose approval was, in the end, granted or refused (a refusal is also an approval
    /// that did not match the call).
    pub approvals_granted: Tally,
    pub approvals_refused: Tally,
    /// People's corrections of its calls, by label.
    pub corrections: BTreeMap<String, Tally>,
    /// Its calls as the model asked for them, newest runs first (at most [`MAX_SAMPLES`]),
    /// for a compiler to tell the calls people corrected from the others. None from runs
    /// about a person: what they said is not material for a rule.
    pub samples: Vec<CallSample>,
}

/// The most calls of one tool kept as samples.
pub const MAX_SAMPLES: usize = 200;

/// One call of a tool: where it was, its top-level scalar arguments and how it was decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallSample {
    pub run_id: String,
    pub call_id: String,
    /// Its string, number and boolean arguments (nested values left out).
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// `policy/rule` that decided it, and what was applied.
    pub rule: String,
    pub effect: PolicyEffect,
}

/// What the decisions of one rule (`policy/rule`, `policy/default`, …) show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSignals {
    /// Calls it decided, by effect (`allow`, `deny`, `require_approval`).
    pub decided: BTreeMap<&'static str, u64>,
    /// For a dryRun policy's rule: calls it would have decided more strictly than the decision
    /// applied (enforcing it could change only those: the strictest verdict wins).
    pub would_change: Tally,
    /// Calls that asked for approval under it, granted or refused in the end.
    pub approvals_granted: Tally,
    pub approvals_refused: Tally,
}

/// The signals of every agent in a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signals {
    pub agents: BTreeMap<String, AgentSignals>,
}

fn verdict_name(verdict: Verdict) -> Option<&'static str> {
    match verdict {
        Verdict::Continue => None,
        Verdict::Revise => Some("revise"),
        Verdict::Halt => Some("halt"),
        Verdict::Escalate => Some("escalate"),
    }
}

/// One call of a run, folded from however many times it was recorded.
#[derive(Debug, Default)]
struct CallFold<'e> {
    /// As the model asked for it; none when refused before it was taken as a tool's call.
    tool: Option<&'e str>,
    call_id: &'e str,
    arguments: Option<&'e serde_json::Value>,
    /// The last applied decision: rule, effect, where.
    applied: Option<(&'e str, PolicyEffect, EntryRef)>,
    /// dryRun decisions, by rule (the last of each).
    shadows: BTreeMap<&'e str, (PolicyEffect, EntryRef)>,
    /// The last word on its approval: granted or not, where.
    approval: Option<(bool, EntryRef)>,
    dead_lettered: Option<EntryRef>,
}

/// A run's calls in the order they were first recorded.
fn fold_calls(run: &RunEntries) -> Vec<CallFold<'_>> {
    let mut order: Vec<&str> = Vec::new();
    let mut calls: BTreeMap<&str, CallFold<'_>> = BTreeMap::new();
    for (hash, entry) in &run.entries {
        let id = match &entry.body {
            EntryBody::ToolCallRequested(call) => &call.call_id,
            EntryBody::PolicyDecision(d) => &d.call_id,
            EntryBody::ApprovalGranted { call_id, .. }
            | EntryBody::ApprovalRefused { call_id, .. }
            | EntryBody::DeadLettered { call_id, .. } => call_id,
            _ => continue,
        };
        if !calls.contains_key(id.as_str()) {
            order.push(id);
        }
        let fold = calls.entry(id).or_default();
        fold.call_id = id;
        let at = entry_ref(run, entry, hash);
        match &entry.body {
            EntryBody::ToolCallRequested(call) => {
                fold.tool = Some(&call.tool);
                fold.arguments = Some(&call.arguments);
            }
            EntryBody::PolicyDecision(d) if d.dry_run => {
                fold.shadows.insert(&d.rule, (d.effect, at));
            }
            EntryBody::PolicyDecision(d) => fold.applied = Some((&d.rule, d.enforced, at)),
            EntryBody::ApprovalGranted { .. } => fold.approval = Some((true, at)),
            EntryBody::ApprovalRefused { .. } => fold.approval = Some((false, at)),
            EntryBody::DeadLettered { tool, .. } => {
                fold.tool = fold.tool.or(Some(tool));
                fold.dead_lettered = Some(at);
            }
            _ => {}
        }
    }
    order.into_iter().filter_map(|id| calls.remove(id)).collect()
}

/// The longest string argument a sample keeps.
const MAX_SAMPLE_TEXT: usize = 256;

/// The top-level strings (short ones), numbers and booleans of a call's arguments.
fn scalars(arguments: Option<&serde_json::Value>) -> BTreeMap<String, serde_json::Value> {
    let Some(serde_json::Value::Object(map)) = arguments else {
        return BTreeMap::new();
    };
    map.iter()
        .filter(|(_, v)| match v {
            serde_json::Value::String(s) => s.len() <= MAX_SAMPLE_TEXT,
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => true,
            _ => false,
        })
        .take(64)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn entry_ref(run: &RunEntries, entry: &RecordEntry, hash: &Hash) -> EntryRef {
    EntryRef {
        run_id: run.run_id.clone(),
        run_started_ms: run.started_at_ms,
        seq: entry.seq,
        hash: *hash,
        call_id: entry.body.call_id().map(str::to_owned),
    }
}

impl AgentSignals {
    /// Counts one folded call of `run` (`about_someone`: a run about a person).
    fn count_call(&mut self, run: &RunEntries, about_someone: bool, call: CallFold<'_>) {
        let Some((rule, effect, decided_at)) = call.applied else {
            // Never decided (a result read without its request): nothing to judge.
            return;
        };
        *self
            .rules
            .entry(rule.to_owned())
            .or_default()
            .decided
            .entry(effect.as_str())
            .or_default() += 1;
        for (shadow, (would, at)) in &call.shadows {
            if strictness(*would) > strictness(effect) {
                self.rules
                    .entry((*shadow).to_owned())
                    .or_default()
                    .would_change
                    .add(at);
            }
        }
        let Some(tool) = call.tool else {
            if effect == PolicyEffect::Deny {
                self.refused_unlisted
                    .entry(rule.to_owned())
                    .or_default()
                    .add(&decided_at);
            }
            return;
        };
        let by_tool = self.tools.entry(tool.to_owned()).or_default();
        by_tool.calls += 1;
        if !about_someone && by_tool.samples.len() < MAX_SAMPLES {
            by_tool.samples.push(CallSample {
                run_id: run.run_id.clone(),
                call_id: call.call_id.to_owned(),
                arguments: scalars(call.arguments),
                rule: rule.to_owned(),
                effect,
            });
        }
        // The gateway's own refusals (a call whose outcome is unknown, …) are no policy's.
        if effect == PolicyEffect::Deny && !rule.starts_with("gateway/") {
            by_tool
                .denied
                .entry(rule.to_owned())
                .or_default()
                .add(&decided_at);
        }
        if let Some(at) = &call.dead_lettered {
            by_tool.dead_lettered.add(at);
        }
        if let Some((granted, at)) = &call.approval {
            let by_rule = self.rules.entry(rule.to_owned()).or_default();
            let (tool_tally, rule_tally) = if *granted {
                (&mut by_tool.approvals_granted, &mut by_rule.approvals_granted)
            } else {
                (&mut by_tool.approvals_refused, &mut by_rule.approvals_refused)
            };
            tool_tally.add(at);
            if effect == PolicyEffect::RequireApproval {
                rule_tally.add(at);
            }
        }
    }

    /// Counts a critic verdict and the signals its step raised; `paused`: the step ended
    /// waiting for an approval (its escalation is to the approvers, its gate signal the wait).
    fn count_verdict(&mut self, verdict: Verdict, state: &serde_json::Value, at: &EntryRef, paused: bool) {
        if paused && verdict == Verdict::Escalate {
            return;
        }
        if let Some(name) = verdict_name(verdict) {
            self.critic.entry(name.into()).or_default().add(at);
        }
        let Ok(state) = serde_json::from_value::<FunctionalState>(state.clone()) else {
            self.unreadable_states += 1;
            return;
        };
        for signal in [
            FunctionalSignal::Budget,
            FunctionalSignal::Loop,
            FunctionalSignal::Gate,
            FunctionalSignal::Conflict,
        ] {
            if critic::raised(signal, &state, false) {
                let name = critic::signal_name(signal);
                self.pressure.entry(name.into()).or_default().add(at);
            }
        }
    }
}

impl Signals {
    /// Adds people's `corrections` of `run`: each counts against the tool of the call it names,
    /// or the agent; its evidence is the entry it names (or the run's first).
    pub fn add_corrections(&mut self, run: &RunEntries, corrections: &[crate::feedback::FeedbackRecord]) {
        let agent = self.agents.entry(run.agent.clone()).or_default();
        for correction in corrections {
            let at = correction
                .entry
                .as_ref()
                .map(|e| (e.seq, e.hash))
                .or_else(|| run.entries.first().map(|(hash, e)| (e.seq, *hash)));
            let Some((seq, hash)) = at else { continue };
            let at = EntryRef {
                run_id: run.run_id.clone(),
                run_started_ms: run.started_at_ms,
                seq,
                hash,
                call_id: correction.entry.as_ref().and_then(|e| e.call_id.clone()),
            };
            let label = correction.label.as_str().to_owned();
            match correction.entry.as_ref().and_then(|e| e.tool.clone()) {
                Some(tool) => agent
                    .tools
                    .entry(tool)
                    .or_default()
                    .corrections
                    .entry(label)
                    .or_default()
                    .add(&at),
                None => agent.corrections.entry(label).or_default().add(&at),
            }
        }
    }

    /// Adds what `run` shows.
    pub fn add(&mut self, run: &RunEntries) {
        let agent = self.agents.entry(run.agent.clone()).or_default();
        agent.runs += 1;
        let about_someone = run.entries.first().is_some_and(|(_, e)| e.vaulted.is_some());
        for call in fold_calls(run) {
            agent.count_call(run, about_someone, call);
        }
        // Whether an approval was asked for and not yet answered (the step pauses).
        let mut waiting = false;
        for (hash, entry) in &run.entries {
            let at = entry_ref(run, entry, hash);
            match &entry.body {
                EntryBody::ApprovalRequested { .. } => waiting = true,
                EntryBody::ApprovalGranted { .. }
                | EntryBody::ApprovalRefused { .. }
                | EntryBody::ToolResult(_) => waiting = false,
                EntryBody::CriticVerdict {
                    verdict,
                    functional_state,
                    ..
                } => {
                    agent.count_verdict(*verdict, functional_state, &at, waiting);
                    waiting = false;
                }
                EntryBody::ContextCompiled { sources, .. } => {
                    for source in sources.iter().filter(|s| s.cut.is_some()) {
                        agent
                            .sources_cut
                            .entry(source.source.clone())
                            .or_default()
                            .add(&at);
                    }
                }
                EntryBody::Completed { .. } => agent.completed += 1,
                EntryBody::Failed { reason, .. } => {
                    agent.failed.entry(reason.clone()).or_default().add(&at);
                }
                _ => {}
            }
        }
    }
}
