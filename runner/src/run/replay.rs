//! Replay: re-executes a recorded run with its model turns and tool results taken from the
//! record, under the same or a candidate Policy/ContextPack, and reports every divergence — a
//! decision that changes, a call newly denied or needing approval, a budget overrun, a context
//! that no longer fits, a different verdict or outcome. Under the same versions the replayed
//! decisions are byte-identical to the recorded ones.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use contextos_crds::policy::PolicyEffect;
use serde::{Deserialize, Serialize};

pub use super::reexecute::{Reexecution, ReexecutionReport};
use super::{
    bundle::{Candidate, CandidateError, RunBundle},
    checkpoint::CheckpointState,
    engine::{Harness, Mode, RunError},
    policy_change::{self, Exercise, PolicyChange, ToolShape},
};
use crate::{
    keys::KeyPair,
    model::{Model, ModelError, replay::ReplayModel},
    records::{
        EntryBody, ReadError, RecordEntry, RecordStore, RunFilter, RunSummary, ScratchStore, StoreError,
        TenantId, canonical::to_canonical_bytes, entry::Verdict, read_run,
    },
    run_context::SignedRunContext,
};

/// Why a run could not be replayed at all.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {run_id} was recorded without its bundle (an older record); it cannot be replayed")]
    NoBundle { run_id: String },
    #[error("run {run_id}: {problem}")]
    Unreadable { run_id: String, problem: String },
    #[error("run {run_id}: {source}")]
    Candidate {
        run_id: String,
        #[source]
        source: CandidateError,
    },
    #[error("run {run_id}: the candidate cannot be used: {problem}")]
    BadCandidate { run_id: String, problem: String },
    #[error("run {run_id}: the model it recorded cannot be asked again: {problem}")]
    ModelUnavailable { run_id: String, problem: String },
    /// The re-execution's token limit was spent while this run (its id) was re-executed.
    #[error(
        "run {0}: the re-execution's token limit (reexecute.maxTokens, or --max-tokens) was spent before it was re-executed in full"
    )]
    SpendLimit(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// The decisions of a run, in a form two runs can be compared by (and byte-compared).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionTrace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextPoint>,
    pub calls: Vec<CallPoint>,
    pub verdicts: Vec<VerdictPoint>,
    pub outcome: String,
    /// The tools each turn was offered, by step (an Agent with `spec.discovery`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offered: BTreeMap<u32, Vec<String>>,
    /// Whether the run's Agent discovers its tools (`spec.discovery`), as its bundle says
    /// (set by whoever holds the bundle; records of runs from before discovery have no offers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discovers: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextPoint {
    pub digest: String,
    pub tokens: u64,
    pub budget: u64,
}

/// The final decision on one call (a call resubmitted after a crash or an approval is one
/// call).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallPoint {
    pub call_id: String,
    pub step: u32,
    pub tool: String,
    pub arguments: String,
    pub effect: PolicyEffect,
    pub rule: String,
    /// What dryRun policies would have decided: `rule=effect`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<String>,
    pub approved: bool,
    pub executed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictPoint {
    pub step: u32,
    pub verdict: Verdict,
    pub reason: String,
}

impl DecisionTrace {
    /// Reads the decisions out of a run's entries.
    pub fn of(entries: &[RecordEntry]) -> Self {
        Self::of_bodies(entries.iter().map(|e| &e.body))
    }

    /// Reads the decisions out of entry bodies, in chain order.
    pub fn of_bodies<'b>(bodies: impl IntoIterator<Item = &'b EntryBody>) -> Self {
        let mut trace = Self {
            outcome: "running".into(),
            ..Self::default()
        };
        let mut verdicts: BTreeMap<u32, VerdictPoint> = BTreeMap::new();
        for body in bodies {
            match body {
                EntryBody::ContextCompiled {
                    digest,
                    tokens,
                    budget,
                    ..
                } => {
                    trace.context = Some(ContextPoint {
                        digest: digest.clone(),
                        tokens: *tokens,
                        budget: *budget,
                    });
                }
                EntryBody::CriticVerdict {
                    step,
                    verdict,
                    reason,
                    ..
                } => {
                    let point = VerdictPoint {
                        step: *step,
                        verdict: *verdict,
                        reason: reason.clone(),
                    };
                    verdicts.insert(*step, point);
                }
                EntryBody::ToolsOffered { step, selection, .. } => {
                    let tools = selection.offered.iter().map(|o| o.tool.clone()).collect();
                    trace.offered.insert(*step, tools);
                }
                EntryBody::Completed { output, .. } => trace.outcome = format!("completed: {output}"),
                EntryBody::Failed { reason, message } => {
                    trace.outcome = format!("failed ({reason}): {message}")
                }
                body => trace.note_call(body),
            }
        }
        trace.verdicts = verdicts.into_values().collect();
        trace
    }

    /// Folds a call-related entry into the call's final decision.
    fn note_call(&mut self, body: &EntryBody) {
        match body {
            EntryBody::ToolCallRequested(call) if self.call(&call.call_id).is_none() => {
                self.calls.push(CallPoint {
                    call_id: call.call_id.clone(),
                    step: step_of(&call.call_id),
                    tool: call.tool.clone(),
                    arguments: String::from_utf8_lossy(&to_canonical_bytes(&call.arguments)).into(),
                    effect: PolicyEffect::Deny,
                    rule: String::new(),
                    shadow: Vec::new(),
                    approved: false,
                    executed: false,
                });
            }
            EntryBody::PolicyDecision(decision) => {
                let Some(call) = self.call(&decision.call_id) else {
                    return;
                };
                if decision.dry_run {
                    let shadow = format!("{}={}", decision.rule, decision.effect.as_str());
                    if !call.shadow.contains(&shadow) {
                        call.shadow.push(shadow);
                    }
                } else {
                    call.effect = decision.enforced;
                    call.rule = decision.rule.clone();
                }
            }
            EntryBody::ApprovalGranted { call_id, .. } => {
                if let Some(call) = self.call(call_id) {
                    call.approved = true;
                }
            }
            EntryBody::ToolResult(result) => {
                if let Some(call) = self.call(&result.call_id) {
                    call.executed = result.ok;
                }
            }
            _ => {}
        }
    }

    fn call(&mut self, call_id: &str) -> Option<&mut CallPoint> {
        self.calls.iter_mut().find(|c| c.call_id == call_id)
    }

    /// The trace of a run about a subject as a report may keep it: what it saw and said of
    /// them (arguments, the critic's reasons, the output, a failure's message) left out —
    /// reports are stored in the clear and outlive an erasure. The decisions stay.
    pub fn redact(&mut self) {
        for call in &mut self.calls {
            call.arguments = ABOUT_SUBJECT.into();
        }
        for verdict in &mut self.verdicts {
            verdict.reason = ABOUT_SUBJECT.into();
        }
        self.outcome = redact_outcome(&self.outcome);
    }

    /// The canonical bytes two traces are compared by.
    pub fn bytes(&self) -> Vec<u8> {
        to_canonical_bytes(&serde_json::to_value(self).unwrap_or_default())
    }

    fn steps(&self) -> u32 {
        self.verdicts.iter().map(|v| v.step).max().unwrap_or(0)
    }
}

/// Call ids are `<step>.<index>`.
fn step_of(call_id: &str) -> u32 {
    call_id
        .split('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What kind of difference a divergence is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceKind {
    NewlyDenied,
    NewlyNeedsApproval,
    NewlyAllowed,
    DecisionChanged,
    BudgetOverrun,
    ContextNoLongerFits,
    CallNotReached,
    NewCall,
    /// Another call (another tool) where the recorded run made this one (a re-executed model
    /// chose differently).
    CallChanged,
    VerdictChanged,
    OutcomeChanged,
    /// A dryRun policy would decide a call differently than what was enforced (a report; it
    /// does not count against the gate, since dryRun enforces nothing).
    WouldChange,
    /// A turn would be shown other tools (the candidate no longer has, or now denies outright,
    /// a tool the turn was offered, or discovers tools where the run did not, or the reverse).
    /// A report: the recorded model's turns are replayed as they were, so what it changes shows
    /// as divergences of its own (a call now denied, say), which count.
    OfferChanged,
}

impl DivergenceKind {
    /// Whether it counts against a replay gate.
    pub fn counts(self) -> bool {
        !matches!(self, Self::WouldChange | Self::OfferChanged)
    }

    /// Whether it is a call decided otherwise.
    pub fn is_decision(self) -> bool {
        matches!(
            self,
            Self::NewlyDenied | Self::NewlyNeedsApproval | Self::NewlyAllowed | Self::DecisionChanged
        )
    }
}

/// One difference between the recorded run and its replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub kind: DivergenceKind,
    /// The step it happened in (0: the run as a whole).
    pub step: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub recorded: String,
    pub replayed: String,
    pub detail: String,
    /// The change a proposal means to make (at or after a call its evidence names, in that
    /// run): shown, not counted against the gate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub intended: bool,
    /// The candidate opens what the recorded run kept shut: a call let through that was denied
    /// or held for approval, a denied call now held for approval, a call allowed or held that
    /// the run did not make, a critic that halted or escalated the run now letting it go on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loosens: bool,
    /// The call whose decision changed, for a decision's divergence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

impl Divergence {
    /// Whether it counts against a replay gate.
    pub fn counts(&self) -> bool {
        self.kind.counts() && !self.intended
    }

    /// As a report about a run about a subject keeps it: the kind and the decisions, not what
    /// the run said (an outcome's text, a critic's reason).
    fn redact(&mut self) {
        self.recorded = redact_outcome(&self.recorded);
        self.replayed = redact_outcome(&self.replayed);
        self.detail = ABOUT_SUBJECT.into();
    }
}

/// `completed: <output>` or `failed (<reason>): <message>` without what follows the colon.
fn redact_outcome(text: &str) -> String {
    match text.split_once(": ") {
        Some((kind, _)) => format!("{kind}: {ABOUT_SUBJECT}"),
        None => text.to_owned(),
    }
}

/// The replay of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReplay {
    pub run_id: String,
    pub session: String,
    pub agent: String,
    /// Whether the replayed decisions are byte-identical to the recorded ones.
    pub identical: bool,
    pub steps: u32,
    pub divergent_steps: u32,
    pub divergences: Vec<Divergence>,
    /// Context digest change (expected under a candidate pack; not a divergence by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_change: Option<String>,
    /// Both decision traces, so a pipeline can show exactly what changed.
    pub recorded: DecisionTrace,
    pub replayed: DecisionTrace,
    /// The subject the run was about, when they have been erased since: the replay saw their
    /// values as erased, so what it finds says nothing of the candidate and is not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erased: Option<crate::consent::SubjectHandle>,
    /// When re-executed: what the samples found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reexecution: Option<ReexecutionReport>,
    /// Why the run was judged otherwise than asked (its decisions replayed, not re-executed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Where the run or the candidate routes model turns: the turns the candidate would send
    /// elsewhere, and the run's cost at its prices for the same tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<super::routing_effect::RoutingEffect>,
}

/// Compares a recorded trace with its replay (pure).
pub fn compare(recorded: &DecisionTrace, replayed: &DecisionTrace) -> Vec<Divergence> {
    let mut out = Vec::new();
    if let (Some(_), None) = (&recorded.context, &replayed.context) {
        out.push(Divergence {
            kind: DivergenceKind::ContextNoLongerFits,
            step: 0,
            tool: None,
            recorded: "compiled".into(),
            replayed: "does not compile".into(),
            detail: replayed.outcome.clone(),
            intended: false,
            loosens: false,
            call_id: None,
        });
    }
    let replayed_calls: HashMap<&str, &CallPoint> =
        replayed.calls.iter().map(|c| (c.call_id.as_str(), c)).collect();
    for call in &recorded.calls {
        match replayed_calls.get(call.call_id.as_str()) {
            None => out.push(Divergence {
                kind: DivergenceKind::CallNotReached,
                step: call.step,
                tool: Some(call.tool.clone()),
                recorded: call.effect.as_str().into(),
                replayed: "not made".into(),
                detail: "the replayed run ended or went another way before this call".into(),
                intended: false,
                loosens: false,
                call_id: Some(call.call_id.clone()),
            }),
            Some(again) if again.effect != call.effect || (again.tool != call.tool) => {
                out.push(call_divergence(call, again));
            }
            Some(_) => {}
        }
    }
    for call in &recorded.calls {
        let Some(again) = replayed_calls.get(call.call_id.as_str()) else {
            continue;
        };
        for shadow in again.shadow.iter().filter(|s| !call.shadow.contains(s)) {
            let effect = shadow.rsplit_once('=').map_or("", |(_, e)| e);
            if effect != again.effect.as_str() {
                out.push(Divergence {
                    kind: DivergenceKind::WouldChange,
                    step: call.step,
                    tool: Some(call.tool.clone()),
                    recorded: call.effect.as_str().into(),
                    replayed: format!("dryRun {shadow}"),
                    detail: "a dryRun policy would decide this call differently; nothing is enforced".into(),
                    intended: false,
                    loosens: false,
                    call_id: Some(call.call_id.clone()),
                });
            }
        }
    }
    let recorded_ids: BTreeSet<&str> = recorded.calls.iter().map(|c| c.call_id.as_str()).collect();
    for call in replayed
        .calls
        .iter()
        .filter(|c| !recorded_ids.contains(c.call_id.as_str()))
    {
        out.push(Divergence {
            kind: DivergenceKind::NewCall,
            step: call.step,
            tool: Some(call.tool.clone()),
            recorded: "not made".into(),
            replayed: call.effect.as_str().into(),
            detail: format!("decided by {}", call.rule),
            intended: false,
            loosens: call.effect != PolicyEffect::Deny,
            call_id: Some(call.call_id.clone()),
        });
    }
    let replayed_verdicts: HashMap<u32, &VerdictPoint> =
        replayed.verdicts.iter().map(|v| (v.step, v)).collect();
    for verdict in &recorded.verdicts {
        let again = replayed_verdicts.get(&verdict.step);
        if again.is_none_or(|v| v.verdict != verdict.verdict) {
            out.push(Divergence {
                kind: DivergenceKind::VerdictChanged,
                step: verdict.step,
                tool: None,
                recorded: verdict_name(verdict.verdict).into(),
                replayed: again.map_or("no step".into(), |v| verdict_name(v.verdict).into()),
                detail: again.map_or_else(|| "the replayed run ended earlier".into(), |v| v.reason.clone()),
                intended: false,
                loosens: matches!(verdict.verdict, Verdict::Halt | Verdict::Escalate)
                    && again.is_some_and(|v| matches!(v.verdict, Verdict::Continue | Verdict::Revise)),
                call_id: None,
            });
        }
    }
    out.extend(offer_changes(recorded, replayed));
    if recorded.outcome != replayed.outcome {
        out.push(Divergence {
            kind: DivergenceKind::OutcomeChanged,
            step: 0,
            tool: None,
            recorded: recorded.outcome.clone(),
            replayed: replayed.outcome.clone(),
            detail: "the run would end differently".into(),
            intended: false,
            loosens: false,
            call_id: None,
        });
    }
    out.sort_by(|a, b| a.step.cmp(&b.step).then(a.kind.cmp(&b.kind)));
    out
}

/// The turns offered other tools in the replay: where both runs discover tools, each step both
/// reached whose offers differ (a step only one reached is not compared: the run went another
/// way, which other divergences say); where one discovers and the other does not, one report
/// for the run.
fn offer_changes(recorded: &DecisionTrace, replayed: &DecisionTrace) -> Vec<Divergence> {
    const EVERY_TOOL: &str = "every tool, every turn";
    const CHOSEN: &str = "the tools chosen for each turn (spec.discovery)";
    let whole_run = |recorded: &str, replayed: &str, detail: &str| Divergence {
        kind: DivergenceKind::OfferChanged,
        step: 0,
        tool: None,
        recorded: recorded.to_owned(),
        replayed: replayed.to_owned(),
        detail: detail.to_owned(),
        intended: false,
        loosens: false,
        call_id: None,
    };
    match (recorded.discovers, replayed.discovers) {
        (true, false) if !recorded.offered.is_empty() => {
            return vec![whole_run(
                CHOSEN,
                EVERY_TOOL,
                "the candidate does not discover tools: every turn is shown the whole catalog",
            )];
        }
        (false, true) if !replayed.offered.is_empty() => {
            return vec![whole_run(
                EVERY_TOOL,
                CHOSEN,
                "the candidate discovers tools: each turn is shown only those chosen for it",
            )];
        }
        _ => {}
    }
    let mut out = Vec::new();
    for (step, before) in &recorded.offered {
        let Some(after) = replayed.offered.get(step) else {
            continue;
        };
        if before == after {
            continue;
        }
        let missing = |from: &[String], in_: &[String]| -> Vec<String> {
            from.iter().filter(|t| !in_.contains(t)).cloned().collect()
        };
        let (gone, new) = (missing(before, after), missing(after, before));
        let mut detail = Vec::new();
        if !gone.is_empty() {
            detail.push(format!(
                "no longer offered: {} (the candidate does not have them, or denies them outright)",
                gone.join(", ")
            ));
        }
        if !new.is_empty() {
            detail.push(format!("newly offered: {}", new.join(", ")));
        }
        if detail.is_empty() {
            detail.push("the same tools in another order".to_owned());
        }
        out.push(Divergence {
            kind: DivergenceKind::OfferChanged,
            step: *step,
            tool: None,
            recorded: before.join(", "),
            replayed: after.join(", "),
            detail: detail.join("; "),
            intended: false,
            loosens: false,
            call_id: None,
        });
    }
    out
}

fn call_divergence(call: &CallPoint, again: &CallPoint) -> Divergence {
    if again.tool != call.tool {
        return Divergence {
            kind: DivergenceKind::CallChanged,
            step: call.step,
            tool: Some(call.tool.clone()),
            recorded: format!("{} {} ({})", call.tool, call.effect.as_str(), call.rule),
            replayed: format!("{} {} ({})", again.tool, again.effect.as_str(), again.rule),
            detail: format!("arguments {}", again.arguments),
            intended: false,
            loosens: again.effect != PolicyEffect::Deny,
            call_id: Some(call.call_id.clone()),
        };
    }
    // A budget refusal is a consequence of what came before in the run, not the candidate
    // deciding this call otherwise — only a Policy's own budget refusal, not a rule named alike.
    use crate::policy::decide::is_budget_refusal;
    let kind = if is_budget_refusal(again.effect, &again.rule) && !is_budget_refusal(call.effect, &call.rule)
    {
        DivergenceKind::BudgetOverrun
    } else {
        match (call.effect, again.effect) {
            (_, PolicyEffect::Deny) => DivergenceKind::NewlyDenied,
            (PolicyEffect::Allow, PolicyEffect::RequireApproval) => DivergenceKind::NewlyNeedsApproval,
            (_, PolicyEffect::Allow) => DivergenceKind::NewlyAllowed,
            _ => DivergenceKind::DecisionChanged,
        }
    };
    Divergence {
        kind,
        step: call.step,
        tool: Some(call.tool.clone()),
        recorded: format!("{} ({})", call.effect.as_str(), call.rule),
        replayed: format!("{} ({})", again.effect.as_str(), again.rule),
        detail: format!("arguments {}", call.arguments),
        intended: false,
        loosens: openness(again.effect) > openness(call.effect),
        call_id: Some(call.call_id.clone()),
    }
}

/// How far an effect lets a call go: denied, held for a person, run.
fn openness(effect: PolicyEffect) -> u8 {
    match effect {
        PolicyEffect::Deny => 0,
        PolicyEffect::RequireApproval => 1,
        PolicyEffect::Allow => 2,
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Continue => "continue",
        Verdict::Revise => "revise",
        Verdict::Halt => "halt",
        Verdict::Escalate => "escalate",
    }
}

/// What a replay report says in place of what a run about a subject saw and said.
pub const ABOUT_SUBJECT: &str = "[about the run's subject]";

/// Replays run `run_id` of `tenant` from `store` under `candidate`.
pub async fn replay_run<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    candidate: &Candidate,
) -> Result<RunReplay, ReplayError> {
    replay_run_as(store, tenant, run_id, candidate, None).await
}

/// [`replay_run`], or re-executing the run when `reexecute` says so (the sample that diverged
/// most is the one reported). A run whose candidate changes the model, or about a subject
/// erased since, has its decisions replayed instead, and says so: re-execution asks only the
/// model the run recorded, and an erased run is not judged.
pub async fn replay_run_as<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    candidate: &Candidate,
    reexecute: Option<&Reexecution>,
) -> Result<RunReplay, ReplayError> {
    let entries: Vec<RecordEntry> = read_run(store, tenant, run_id)
        .await?
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let original = RecordedRun::read(store, tenant, run_id, &entries).await?;
    let erased = erased_subject(store, tenant, run_id, &entries).await?;
    let mut bundle = original
        .bundle
        .clone()
        .with_candidate(candidate)
        .map_err(|source| ReplayError::Candidate {
            run_id: run_id.to_owned(),
            source,
        })?;
    let recorded_model = &original.bundle.agent_spec.model;
    let (reexecute, note) = match reexecute {
        Some(_) if erased.is_some() => (None, None),
        Some(_) if bundle.agent_spec.model != *recorded_model => (
            None,
            Some(format!(
                "decisions replayed, not re-executed: the candidate changes the model ({} → {}), and re-execution asks only the model the run recorded",
                recorded_model.model, bundle.agent_spec.model.model
            )),
        ),
        other => (other, None),
    };
    // The recorded model, asked as the run asked it: a candidate does not choose where the model
    // key and the recorded results go, nor which model an endpoint routes them to. A scripted
    // model's script reaches nothing and is that model: the candidate's is played (an edit to
    // it is what the Agent's gate judges).
    let model = match reexecute {
        Some(r) => {
            let mut asked = original.bundle.clone();
            if bundle.model_script.is_some() {
                asked.model_script = bundle.model_script.clone();
            }
            asked.routed_scripts.extend(bundle.routed_scripts.clone());
            bundle.model_script = asked.model_script.clone();
            let model =
                r.models
                    .model_for(&asked)
                    .await
                    .map_err(|problem| ReplayError::ModelUnavailable {
                        run_id: run_id.to_owned(),
                        problem,
                    })?;
            Some(r.meter.metering(model))
        }
        None => None,
    };
    let mut recorded = DecisionTrace::of(&entries);
    recorded.discovers = original.bundle.agent_spec.discovery.is_some();
    let samples = reexecute.map_or(1, Reexecution::samples);
    let mut worst: Option<(DecisionTrace, Vec<Divergence>)> = None;
    let mut reexecution = ReexecutionReport {
        samples: 0,
        ..ReexecutionReport::default()
    };
    for _ in 0..samples {
        let spent = reexecute.map_or(0, |r| r.meter.spent());
        let pass = run_once(&original, bundle.clone(), run_id, &entries, model.clone()).await;
        // A sample the limit cut short (a turn refused, or the last one allowed) is not judged:
        // the replay stops with the runs done before it.
        if reexecute.is_some_and(|r| r.meter.exhausted()) {
            return Err(ReplayError::SpendLimit(run_id.to_owned()));
        }
        let (mut replayed, unrecorded) = pass?;
        replayed.discovers = bundle.agent_spec.discovery.is_some();
        let divergences = compare(&recorded, &replayed);
        reexecution.samples += 1;
        reexecution.tokens = reexecution
            .tokens
            .saturating_add(reexecute.map_or(0, |r| r.meter.spent().saturating_sub(spent)));
        reexecution.unrecorded_calls += unrecorded;
        if divergences.iter().any(Divergence::counts) {
            reexecution.diverged_samples += 1;
        }
        let worse = worst
            .as_ref()
            .is_none_or(|(_, w)| divergent_steps(&divergences) > divergent_steps(w));
        if worse {
            worst = Some((replayed, divergences));
        }
    }
    let (mut replayed, mut divergences) = worst.unwrap_or_default();
    let identical = recorded.bytes() == replayed.bytes();
    // Judged on everything; reported without what the run saw and said of its subject.
    if entries.first().is_some_and(|e| e.vaulted.is_some()) {
        recorded.redact();
        replayed.redact();
        divergences.iter_mut().for_each(Divergence::redact);
    }
    let divergent_steps = divergent_steps(&divergences);
    let context_change = match (&recorded.context, &replayed.context) {
        (Some(a), Some(b)) if a.digest != b.digest => Some(format!(
            "context {} ({} tokens) → {} ({} tokens)",
            short(&a.digest),
            a.tokens,
            short(&b.digest),
            b.tokens
        )),
        _ => None,
    };
    // Priced as the candidate's files price its models, else as the run pinned them.
    let price = |name: &str| -> Option<crate::pricing::PinnedPrice> {
        if let Some(price) = candidate.prices.get(name) {
            return Some(price.clone());
        }
        let original_bundle = &original.bundle;
        let spec = bundle
            .agent_spec
            .routing
            .as_ref()
            .and_then(|r| r.model(&bundle.agent_spec.model, name))
            .unwrap_or(&bundle.agent_spec.model);
        if *spec == original_bundle.agent_spec.model {
            return original_bundle.model_price.clone();
        }
        original_bundle
            .agent_spec
            .routing
            .iter()
            .flat_map(|r| r.models.iter())
            .find(|m| m.model == *spec)
            .and_then(|m| original_bundle.routed_prices.get(&m.name).cloned())
    };
    let routing = super::routing_effect::routing_effect(&entries, &bundle, &price);
    Ok(RunReplay {
        routing,
        run_id: run_id.to_owned(),
        session: original.bundle.session.clone(),
        agent: original.bundle.agent.clone(),
        identical,
        steps: recorded.steps().max(1),
        divergent_steps,
        divergences,
        context_change,
        recorded,
        replayed,
        erased,
        reexecution: reexecute.map(|_| reexecution),
        note,
    })
}

/// One pass over a recorded run: its model turns played again, or (re-executing, `model` is
/// the recorded model) the model asked again; the decisions it made and the calls it made that
/// the recorded run never made (answered as not executed).
async fn run_once(
    original: &RecordedRun,
    bundle: RunBundle,
    run_id: &str,
    entries: &[RecordEntry],
    model: Option<Model>,
) -> Result<(DecisionTrace, u32), ReplayError> {
    // An ephemeral key: the replayed record lives only in memory.
    let key = KeyPair::generate().map_err(|e| ReplayError::Unreadable {
        run_id: run_id.to_owned(),
        problem: format!("no signing key for the replay: {e}"),
    })?;
    let gateway = bundle
        .gateway_bundle(BTreeMap::new())
        .build_offline(key.public())
        .map_err(|problem| ReplayError::BadCandidate {
            run_id: run_id.to_owned(),
            problem,
        })?;
    let (gateway, model) = match model {
        None => (
            gateway,
            Model::Replay(ReplayModel::from_entries(run_id, entries)?),
        ),
        Some(model) => (gateway.answering_recorded_calls(), model),
    };
    gateway.preload_results(entries);
    let refused = gateway.unrecorded_calls();
    let scratch = ScratchStore::new();
    let harness = Harness::new(&scratch, key, bundle, gateway, model)?.replaying(original.mode(entries));
    let trace_id = original.run_context.context.trace_id.clone();
    let report = harness.start(run_id, &trace_id, &mut |_| {}).await?;
    let unrecorded = refused.load(std::sync::atomic::Ordering::Relaxed);
    Ok((DecisionTrace::of_bodies(&report.replayed), unrecorded))
}

/// The first 12 characters of a digest's hex, for people to tell digests apart. Whatever the
/// text is (a runner wrote some of it), it is cut between characters, never inside one.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.char_indices().nth(12).map_or(hex, |(end, _)| &hex[..end])
}

/// What a replay needs from the recorded run besides its entries.
struct RecordedRun {
    bundle: RunBundle,
    run_context: SignedRunContext,
}

impl RecordedRun {
    async fn read<S: RecordStore>(
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        entries: &[RecordEntry],
    ) -> Result<Self, ReplayError> {
        let unreadable = |problem: String| ReplayError::Unreadable {
            run_id: run_id.to_owned(),
            problem,
        };
        let Some(EntryBody::RunStarted {
            run_context, bundle, ..
        }) = entries.first().map(|e| &e.body)
        else {
            return Err(unreadable("its first entry is not run_started".into()));
        };
        if bundle.is_none() {
            return Err(ReplayError::NoBundle {
                run_id: run_id.to_owned(),
            });
        }
        let first = entries
            .first()
            .ok_or_else(|| unreadable("it has no entries".into()))?;
        let bundle = super::bundle::recorded_bundle(store, tenant, run_id, first)
            .await
            .map_err(unreadable)?
            .ok_or_else(|| ReplayError::NoBundle {
                run_id: run_id.to_owned(),
            })?;
        let run_context: SignedRunContext = serde_json::from_value(run_context.clone())
            .map_err(|e| unreadable(format!("its RunContext cannot be read: {e}")))?;
        Ok(Self { bundle, run_context })
    }

    /// Approvals the original got and the wall time it had used, by step.
    fn mode(&self, entries: &[RecordEntry]) -> Mode {
        let mut approvals = HashMap::new();
        let mut wall_ms = HashMap::new();
        let mut offered = HashMap::new();
        let mut calls: HashMap<&str, (&str, &serde_json::Value)> = HashMap::new();
        for entry in entries {
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    calls.insert(&call.call_id, (&call.tool, &call.arguments));
                }
                EntryBody::ApprovalGranted {
                    call_id, approver, ..
                } => {
                    if let Some((tool, arguments)) = calls.get(call_id.as_str()) {
                        approvals.insert(
                            call_id.clone(),
                            (approver.clone(), (*tool).to_owned(), (*arguments).clone()),
                        );
                    }
                }
                EntryBody::Checkpoint { step, state } => {
                    if let Ok(state) = serde_json::from_value::<CheckpointState>(state.clone()) {
                        wall_ms.insert(*step, state.usage.wall_ms);
                    }
                }
                EntryBody::ToolsOffered {
                    step,
                    scoring,
                    selection,
                } => {
                    offered.insert(*step, (scoring.clone(), selection.clone()));
                }
                _ => {}
            }
        }
        Mode::Replay {
            approvals,
            wall_ms,
            recalled: super::engine::recalled_in(entries),
            offered,
        }
    }
}

/// The subject a run is about, if it was erased since (its key is gone: the run can be replayed
/// with its values erased, never judged).
async fn erased_subject<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    entries: &[RecordEntry],
) -> Result<Option<crate::consent::SubjectHandle>, ReplayError> {
    let Some(subject) = entries.first().and_then(|e| e.vaulted.as_ref()) else {
        return Ok(None);
    };
    let key = store
        .run_key(tenant, run_id, subject, crate::vault::KeyUse::Read)
        .await
        .map_err(|e| ReplayError::Unreadable {
            run_id: run_id.to_owned(),
            problem: e.to_string(),
        })?;
    Ok(key.is_none().then(|| subject.clone()))
}

/// Whether a listed run is one a replay of `agents` and `labels` takes.
enum Selected {
    Yes,
    No,
    /// Not finished: nothing final to compare.
    Running,
}

async fn selected<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run: &RunSummary,
    agents: &[String],
    labels: &BTreeMap<String, String>,
) -> Result<Selected, ReplayError> {
    if !agents.is_empty() && !agents.contains(&run.agent) {
        return Ok(Selected::No);
    }
    if run.outcome == "running" {
        return Ok(Selected::Running);
    }
    if !labels.is_empty() && !session_matches(store, tenant, &run.run_id, labels).await? {
        return Ok(Selected::No);
    }
    Ok(Selected::Yes)
}

/// The steps with a divergence that counts.
fn divergent_steps(divergences: &[Divergence]) -> u32 {
    divergences
        .iter()
        .filter(|d| d.counts())
        .map(|d| d.step.max(1))
        .collect::<BTreeSet<_>>()
        .len() as u32
}

impl RunReplay {
    /// Marks what a proposal means to change in this run as intended, and counts the rest: if
    /// the run's first divergence is a changed decision on one of `calls` (the calls its
    /// evidence names), that divergence and what follows from it in the run (calls no longer
    /// reached or made anew, the run's own outcome) are the change's consequences; otherwise
    /// nothing is excused. A later changed decision on a call the evidence does not name is
    /// the candidate's own doing, not a consequence (a replay decides each recorded call
    /// anew), and counts: else naming the first changed call of each run would excuse a
    /// patch's every other effect.
    pub fn mark_intended(&mut self, calls: &BTreeSet<String>) {
        let first = self
            .divergences
            .iter()
            .filter(|d| d.counts())
            .min_by_key(|d| if d.step == 0 { u32::MAX } else { d.step });
        let Some(first) = first else { return };
        if !first.kind.is_decision() || !first.call_id.as_ref().is_some_and(|c| calls.contains(c)) {
            return;
        }
        let from = first.step;
        for d in &mut self.divergences {
            let named = d.call_id.as_ref().is_some_and(|c| calls.contains(c));
            if d.kind.counts() && (d.step == 0 || d.step >= from) && (named || !d.kind.is_decision()) {
                d.intended = true;
            }
        }
        self.divergent_steps = divergent_steps(&self.divergences);
    }

    /// Steps with an intended divergence.
    pub fn intended_steps(&self) -> u32 {
        self.divergences
            .iter()
            .filter(|d| d.intended)
            .map(|d| d.step.max(1))
            .collect::<BTreeSet<_>>()
            .len() as u32
    }
}

/// The calls a proposal's evidence names, by run.
pub fn intended_calls(expected: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (run, call) in expected {
        out.entry(run.clone()).or_default().insert(call.clone());
    }
    out
}

/// One run's divergent steps as a percentage of its steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunDivergence {
    pub run_id: String,
    pub percent: f64,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn percent_of(divergent: u32, steps: u32) -> f64 {
    if steps == 0 {
        0.0
    } else {
        f64::from(divergent) * 100.0 / f64::from(steps)
    }
}

/// Replays of several runs against one threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplaySummary {
    pub runs: usize,
    pub identical_runs: usize,
    pub diverged_runs: usize,
    pub steps: u32,
    pub divergent_steps: u32,
    /// Steps whose divergence a proposal means (not counted in `divergent_steps`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub intended_steps: u32,
    /// Divergent steps as a percentage of all replayed steps.
    pub divergence_percent: f64,
    pub max_divergence_percent: f64,
    /// The run that diverged most, as a share of its own steps: the gate holds every run to
    /// the threshold, so one run's regression cannot hide behind the others' average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_run: Option<RunDivergence>,
    pub passed: bool,
    /// Runs that could not be replayed, with why.
    pub skipped: Vec<String>,
    /// When the runs were re-executed: the figures over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reexecution: Option<ReexecutionReport>,
    /// Where runs or the candidate route model turns: the effect over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<super::routing_effect::RoutingEffect>,
    /// Why the replay stopped before its sample was done (it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub replays: Vec<RunReplay>,
}

impl ReplaySummary {
    pub fn new(replays: Vec<RunReplay>, mut skipped: Vec<String>, max_divergence_percent: f64) -> Self {
        skipped.extend(
            replays
                .iter()
                .filter_map(|r| r.note.as_ref().map(|note| format!("run {}: {note}", r.run_id))),
        );
        skipped.extend(replays.iter().filter_map(|r| {
            r.erased.as_ref().map(|subject| {
                format!(
                    "run {}: about subject {subject}, erased since; replayed with their values erased, not judged",
                    r.run_id
                )
            })
        }));
        // Runs about erased subjects are replayed and shown, never judged: their values are
        // gone, so how they diverge says nothing of the candidate.
        let counted = || replays.iter().filter(|r| r.erased.is_none());
        let total =
            |steps: &dyn Fn(&RunReplay) -> u32| counted().fold(0u32, |sum, r| sum.saturating_add(steps(r)));
        let steps = total(&|r| r.steps);
        let divergent_steps = total(&|r| r.divergent_steps);
        let intended_steps = total(&RunReplay::intended_steps);
        let divergence_percent = if steps == 0 {
            0.0
        } else {
            f64::from(divergent_steps) * 100.0 / f64::from(steps)
        };
        let worst_run = counted()
            .map(|r| RunDivergence {
                run_id: r.run_id.clone(),
                percent: percent_of(r.divergent_steps, r.steps),
            })
            .max_by(|a, b| a.percent.total_cmp(&b.percent));
        let passed = divergence_percent <= max_divergence_percent
            && worst_run
                .as_ref()
                .is_none_or(|w| w.percent <= max_divergence_percent);
        Self {
            runs: counted().count(),
            identical_runs: counted().filter(|r| r.identical).count(),
            diverged_runs: counted()
                .filter(|r| r.divergences.iter().any(Divergence::counts))
                .count(),
            steps,
            divergent_steps,
            intended_steps,
            divergence_percent,
            max_divergence_percent,
            worst_run,
            passed,
            skipped,
            reexecution: None,
            routing: replays.iter().filter_map(|r| r.routing.as_ref()).fold(
                None,
                |total: Option<super::routing_effect::RoutingEffect>, r| {
                    let mut total = total.unwrap_or_default();
                    total.add(r);
                    Some(total)
                },
            ),
            stopped: None,
            replays,
        }
    }

    /// The summary, failed if `stopped` says why the replay stopped short.
    pub fn stopped(mut self, stopped: Option<String>) -> Self {
        if stopped.is_some() {
            self.passed = false;
        }
        self.stopped = stopped;
        self
    }

    /// The summary of re-executed runs (`samples` each); `stopped` says why they stopped short,
    /// which fails the replay.
    pub fn reexecuted(mut self, samples: u32, stopped: Option<String>) -> Self {
        let runs = self.replays.iter().filter_map(|r| r.reexecution.as_ref());
        self.reexecution = Some(ReexecutionReport::total(samples, runs));
        self.stopped(stopped)
    }

    /// The report as a person reads it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for replay in &self.replays {
            out.push_str(&format!(
                "run {} (session {}, agent {}): {}\n",
                replay.run_id,
                replay.session,
                replay.agent,
                if let Some(subject) = &replay.erased {
                    format!(
                        "about subject {subject}, erased since: replayed with their values erased; {} of {} steps differ, not counted",
                        replay.divergent_steps, replay.steps
                    )
                } else if replay.identical {
                    "decisions identical".to_owned()
                } else if replay.divergences.iter().any(|d| d.intended)
                    && !replay.divergences.iter().any(Divergence::counts)
                {
                    format!("changes only as intended ({} step(s))", replay.intended_steps())
                                } else if !replay.divergences.iter().any(Divergence::counts)
                    && replay
                        .divergences
                        .iter()
                        .any(|d| d.kind == DivergenceKind::OfferChanged)
                {
                    "same decisions (turns offered other tools)".to_owned()
                } else if !replay.divergences.iter().any(Divergence::counts) {
                    "same decisions (reasons differ)".to_owned()
                } else {
                    format!("{} of {} steps diverge", replay.divergent_steps, replay.steps)
                }
            ));
            if let Some(change) = &replay.context_change {
                out.push_str(&format!("  {change}\n"));
            }
            if let Some(r) = &replay.reexecution {
                out.push_str(&format!("  {}\n", r.line()));
            }
            for d in &replay.divergences {
                let at = if d.step == 0 {
                    "run".to_owned()
                } else {
                    format!("step {}", d.step)
                };
                let tool = d.tool.as_deref().map(|t| format!(" {t}")).unwrap_or_default();
                out.push_str(&format!(
                    "  {at}{tool}: {}{} — recorded {} → replayed {}",
                    if d.intended { "intended: " } else { "" },
                    kind_text(d.kind),
                    d.recorded,
                    d.replayed
                ));
                out.push_str(&format!(" ({})\n", d.detail));
            }
        }
        for skipped in &self.skipped {
            out.push_str(&format!("skipped: {skipped}\n"));
        }
        if let Some(r) = &self.reexecution {
            out.push_str(&format!("all runs {}\n", r.line()));
        }
        if let Some(r) = &self.routing {
            out.push_str(&format!("{}\n", r.line()));
        }
        if let Some(why) = &self.stopped {
            out.push_str(&format!("stopped: {why}\n"));
        }
        if let Some(worst) = self.worst_run.as_ref().filter(|w| w.percent > 0.0) {
            out.push_str(&format!(
                "most diverged: run {} ({:.1}% of its steps; each run is held to the threshold)\n",
                worst.run_id, worst.percent
            ));
        }
        out.push_str(&format!(
            "replayed {} run(s), {} step(s): {} identical, {} diverged; {} divergent step(s){} = {:.1}% (threshold {:.1}%) → {}\n",
            self.runs,
            self.steps,
            self.identical_runs,
            self.diverged_runs,
            self.divergent_steps,
            if self.intended_steps > 0 {
                format!(" (and {} changed as intended)", self.intended_steps)
            } else {
                String::new()
            },
            self.divergence_percent,
            self.max_divergence_percent,
            if self.passed { "PASS" } else { "FAIL" }
        ));
        out
    }
}

fn kind_text(kind: DivergenceKind) -> &'static str {
    match kind {
        DivergenceKind::NewlyDenied => "newly denied",
        DivergenceKind::NewlyNeedsApproval => "newly needs approval",
        DivergenceKind::NewlyAllowed => "newly allowed",
        DivergenceKind::DecisionChanged => "decision changed",
        DivergenceKind::BudgetOverrun => "budget overrun",
        DivergenceKind::ContextNoLongerFits => "context no longer fits",
        DivergenceKind::CallNotReached => "call not reached",
        DivergenceKind::NewCall => "new call",
        DivergenceKind::CallChanged => "a different call",
        DivergenceKind::VerdictChanged => "verdict changed",
        DivergenceKind::OutcomeChanged => "outcome changed",
        DivergenceKind::WouldChange => "a dryRun policy would change it",
        DivergenceKind::OfferChanged => "offered other tools",
    }
}

/// Runs of the window examined for each place of a sample (and at least [`MIN_EXAMINED`]): a
/// gate reads a bounded part of a busy window, never all of it.
const EXAMINED_PER_PLACE: usize = 20;
const MIN_EXAMINED: usize = 2_000;

/// Replays the runs `filter` selects (finished runs only; a running run has nothing final to
/// compare), skipping those the candidate does not apply to.
pub async fn replay_runs<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    filter: &RunFilter,
    agents: &[String],
    labels: &BTreeMap<String, String>,
    candidate: &Candidate,
    judging: &Judging,
) -> Result<ReplaySummary, ReplayError> {
    let mut replays = Vec::new();
    let mut skipped = Vec::new();
    // The sample is the newest `limit` runs that can be replayed: running runs, runs of other
    // Agents or Sessions with other labels, runs the candidate does not apply to, and — for a
    // candidate that changes only Policies — runs that call no tool the change reaches (see
    // `policy_change`) do not take places in it.
    let wanted = filter.limit.unwrap_or(usize::MAX);
    let examined = judging
        .examine_at_most
        .unwrap_or_else(|| wanted.saturating_mul(EXAMINED_PER_PLACE).max(MIN_EXAMINED));
    // One more than is examined: whether the window held more is then known.
    let listing = RunFilter {
        limit: Some(examined.saturating_add(1)),
        agent: filter.agent.clone().or_else(|| match agents {
            [only] => Some(only.clone()),
            _ => None,
        }),
        ..filter.clone()
    };
    let listed = store.list_runs(tenant, &listing).await?;
    let examined_all = listed.len() <= examined;
    let mut stopped = None;
    let mut unseen = None;
    // A Session named by the caller is replayed whatever the change reaches in it.
    let (queue, chosen) = if candidate.changes_policies_only() && filter.session_id.is_none() {
        let sample = policy_sample(
            store,
            tenant,
            listed.into_iter().take(examined),
            agents,
            labels,
            candidate,
            wanted,
            (examined, examined_all),
        )
        .await?;
        skipped.extend(sample.skipped);
        unseen = sample.unseen;
        (sample.judged, true)
    } else {
        (listed.into_iter().take(examined).collect(), false)
    };
    for run in queue {
        if replays.len() >= wanted {
            break;
        }
        if !chosen {
            match selected(store, tenant, &run, agents, labels).await? {
                Selected::Yes => {}
                Selected::No => continue,
                Selected::Running => {
                    skipped.push(format!("run {} is still running", run.run_id));
                    continue;
                }
            }
        }
        match replay_run_as(
            store,
            tenant,
            &run.run_id,
            candidate,
            judging.reexecution.as_ref(),
        )
        .await
        {
            // Chosen for what it shows of a Policy change, a run whose subject was erased since
            // shows nothing: the sample no longer holds what it was chosen to hold.
            Ok(replay) if chosen && replay.erased.is_some() => {
                stopped = Some(format!(
                    "run {} was chosen to judge the change, and its subject was erased while the replay ran; replay again",
                    replay.run_id
                ));
                break;
            }
            Ok(mut replay) => {
                if let Some(calls) = judging.intended.get(&replay.run_id) {
                    replay.mark_intended(calls);
                }
                replays.push(replay);
                stopped = judging
                    .reexecution
                    .as_ref()
                    .and_then(|r| r.over_budget(replays.len()));
                if stopped.is_some() {
                    break;
                }
            }
            // The limit was spent inside a run: the runs judged so far are reported, and the
            // replay fails.
            Err(ReplayError::SpendLimit(_)) => {
                stopped = judging
                    .reexecution
                    .as_ref()
                    .and_then(|r| r.over_budget(replays.len()));
                break;
            }
            // A recorded model that cannot be asked (a key deleted, an endpoint no longer
            // allowed) fails the replay, saying which run and why: retrying cannot help, and
            // judging the run some other way would pass what was not judged.
            Err(e @ ReplayError::ModelUnavailable { .. }) => {
                stopped = Some(format!(
                    "{e}; restore what it needs, or have an approver promote without replay"
                ));
                break;
            }
            Err(e @ (ReplayError::Candidate { .. } | ReplayError::NoBundle { .. })) => {
                skipped.push(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    // What the sample could not see of a Policy change fails it before a short sample does.
    stopped = stopped.or(unseen);
    // A Policy change's sample is short whenever few runs call what it changes; it is held to
    // having judged one, and to every tool it may loosen (`unseen`).
    let short = if chosen {
        replays.is_empty()
    } else {
        replays.len() < wanted
    };
    if !examined_all && short && stopped.is_none() {
        // More runs than a gate reads, and too few of them to judge: whoever can start
        // Sessions could otherwise shrink the sample to what they choose by starting enough
        // others just before a gate. It does not pass on fewer runs than it asks for.
        stopped = Some(format!(
            "the newest {examined} runs of the window held only {} of the {wanted} runs to judge; narrow the window (windowHours) or the selector, or have an approver promote without replay",
            replays.len()
        ));
    }
    let summary = ReplaySummary::new(replays, skipped, judging.max_divergence_percent);
    Ok(match &judging.reexecution {
        Some(r) => summary.reexecuted(r.samples(), stopped),
        None => summary.stopped(stopped),
    })
}

/// The sample of a gate whose candidate changes only Policies (see [`policy_change`]).
struct PolicySample {
    /// Newest first.
    judged: Vec<RunSummary>,
    skipped: Vec<String>,
    /// Why the gate fails whatever the judged runs show: a tool the change may loosen that no
    /// judged run calls.
    unseen: Option<String>,
}

/// Reads the `runs` a gate examines (newest first) for the tools their calls named, and
/// chooses among them with [`policy_change::choose`]. Every examined run is read (its entries
/// and pinned bundle, not replayed): what the change may loosen is known only once all are.
#[allow(clippy::too_many_arguments)]
async fn policy_sample<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    runs: impl Iterator<Item = RunSummary>,
    agents: &[String],
    labels: &BTreeMap<String, String>,
    candidate: &Candidate,
    wanted: usize,
    (examined, examined_all): (usize, bool),
) -> Result<PolicySample, ReplayError> {
    let mut running = 0usize;
    let mut without_calls = 0usize;
    let mut erased = 0usize;
    // Why runs the candidate does not apply to were left out, each said once.
    let mut not_applying: BTreeMap<String, usize> = BTreeMap::new();
    let mut read = Vec::new();
    // Runs pinned to the same policies and tools share what the change reaches.
    let mut changes: HashMap<String, Arc<PolicyChange>> = HashMap::new();
    for run in runs {
        match selected(store, tenant, &run, agents, labels).await? {
            Selected::Yes => {}
            Selected::No => continue,
            Selected::Running => {
                running += 1;
                continue;
            }
        }
        let entries: Vec<RecordEntry> = read_run(store, tenant, &run.run_id)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let recorded = match RecordedRun::read(store, tenant, &run.run_id, &entries).await {
            Ok(recorded) => recorded,
            Err(ReplayError::NoBundle { .. }) => {
                *not_applying
                    .entry("recorded without its bundle (an older record); it cannot be replayed".into())
                    .or_default() += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        // A run about a subject erased since is replayed but never judged: it shows nothing.
        if erased_subject(store, tenant, &run.run_id, &entries)
            .await?
            .is_some()
        {
            erased += 1;
            continue;
        }
        let bundle = &recorded.bundle;
        let tools: Vec<ToolShape> = bundle
            .agent_spec
            .tools
            .iter()
            .map(|t| ToolShape {
                name: t.name.clone(),
                risk: t.risk,
                kind: t.kind,
            })
            .collect();
        let trace = DecisionTrace::of(&entries);
        let called: BTreeSet<String> = trace
            .calls
            .iter()
            .map(|call| &call.tool)
            .filter(|tool| tools.iter().any(|t| &t.name == *tool))
            .cloned()
            .collect();
        if called.is_empty() {
            without_calls += 1;
            continue;
        }
        let shapes: Vec<(&str, &str, &str)> = tools
            .iter()
            .map(|t| (t.name.as_str(), t.risk.as_str(), t.kind.as_str()))
            .collect();
        let key = super::bundle::spec_digest(&(&bundle.policies, shapes));
        let change = match changes.get(&key) {
            Some(change) => change.clone(),
            None => match bundle.policies_under(candidate) {
                Ok(under) => {
                    let change = Arc::new(PolicyChange::between(&bundle.policies, &under, &tools));
                    changes.insert(key, change.clone());
                    change
                }
                Err(e) => {
                    *not_applying.entry(e.to_string()).or_default() += 1;
                    continue;
                }
            },
        };
        let hit_budget = trace.calls.iter().any(|call| {
            crate::policy::decide::is_budget_refusal(call.effect, &call.rule)
                && change.loosens_limit(&call.rule)
        });
        read.push(Exercise {
            run,
            called,
            hit_budget,
            change,
        });
    }
    let choice = policy_change::choose(read, wanted);
    let mut skipped: Vec<String> = not_applying
        .into_iter()
        .map(|(why, runs)| format!("{runs} run(s) not replayed: {why}"))
        .collect();
    for (count, why) in [
        (running, "still running"),
        (
            without_calls,
            "made no tool call: a Policy cannot change them, so they take no place in the sample",
        ),
        (
            choice.unexercised,
            "call no tool whose rules the candidate changes: it decides them as recorded, so they take no place in the sample",
        ),
        (
            erased,
            "are about subjects erased since: they show nothing of the change, so they take no place in the sample",
        ),
    ] {
        if count > 0 {
            skipped.push(format!("{count} run(s) {why}"));
        }
    }
    if choice.decides_nothing {
        skipped.push(
            "the candidate decides no call differently from the policies the runs ran under (what it changes decides nothing, such as a rule's reason): it is judged on the newest runs that made calls"
                .to_owned(),
        );
    }
    Ok(PolicySample {
        judged: choice.judged,
        skipped,
        unseen: unseen_reason(
            &choice.unseen,
            choice.budget_unseen,
            wanted,
            (examined, examined_all),
        ),
    })
}

/// Why a Policy gate fails whatever its judged runs show (see [`policy_change::Choice`]).
fn unseen_reason(
    unseen: &[(String, bool)],
    budget_unseen: Option<bool>,
    wanted: usize,
    (examined, examined_all): (usize, bool),
) -> Option<String> {
    // Where the window held more than was read, a wider one would be read no further.
    let more = if examined_all {
        "widen the window (windowHours)"
    } else {
        "read more of the window (contextos replay --examine)"
    };
    let names = |seen: bool| -> Vec<String> {
        unseen
            .iter()
            .filter(|(_, s)| *s == seen)
            .map(|(tool, _)| crate::text::for_terminal(tool).into_owned())
            .collect()
    };
    let (never, crowded) = (names(false), names(true));
    let them = |tools: &[String]| if tools.len() == 1 { "it" } else { "them" };
    if !never.is_empty() {
        Some(format!(
            "the candidate may decide calls of {} more leniently than the policies the runs ran under, and none of the newest {examined} runs of the window calls {}: replay cannot judge that; {more}, or have an approver promote without replay",
            never.join(", "),
            them(&never)
        ))
    } else if !crowded.is_empty() {
        Some(format!(
            "the candidate may decide calls of {} more leniently than the policies the runs ran under, and the sample of {wanted} has no place left for a run that calls {}: raise the sample size (sampleSize, or --sample)",
            crowded.join(", "),
            them(&crowded)
        ))
    } else {
        budget_unseen.map(|seen| {
            if seen {
                format!(
                    "the candidate raises or removes a tool-call budget, and the sample of {wanted} has no place left for a run that ran into a limit it raises: raise the sample size (sampleSize, or --sample)"
                )
            } else {
                format!(
                    "the candidate raises or removes a tool-call budget, and none of the newest {examined} runs of the window ran into a limit it raises: replay cannot judge that; {more}, or have an approver promote without replay"
                )
            }
        })
    }
}

/// How replays are judged: the threshold, and what a proposal means to change (see
/// [`intended_calls`]).
#[derive(Clone, Debug, Default)]
pub struct Judging {
    pub max_divergence_percent: f64,
    /// Run id → the calls a proposal's evidence names there.
    pub intended: BTreeMap<String, BTreeSet<String>>,
    /// Re-execute the runs (ask the model again) instead of playing their model turns.
    pub reexecution: Option<Reexecution>,
    /// Most runs of the window read to fill the sample (none: [`EXAMINED_PER_PLACE`] a place,
    /// at least [`MIN_EXAMINED`]).
    pub examine_at_most: Option<usize>,
}

/// Whether a recorded run's Session carried every label of `labels`.
async fn session_matches<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<bool, ReplayError> {
    let entries: Vec<RecordEntry> = store
        .read_chain(tenant, run_id, 0)
        .await?
        .into_iter()
        .take(1)
        .filter_map(|e| RecordEntry::decode(&e.bytes).ok())
        .collect();
    match RecordedRun::read(store, tenant, run_id, &entries).await {
        Ok(run) => Ok(labels
            .iter()
            .all(|(k, v)| run.bundle.session_labels.get(k) == Some(v))),
        Err(_) => Ok(false),
    }
}

/// The few lines a replay gate's outcome needs (a replay Job's termination message, at most
/// 4 KiB; the full report is the JSON of [`ReplaySummary`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayGate {
    pub runs: usize,
    pub steps: u32,
    pub divergent_steps: u32,
    /// Steps a proposal's evidence says it means to change (not counted).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub intended_steps: u32,
    /// Of the changes the evidence excuses, those that open what the recorded runs kept shut
    /// (see [`Divergence::loosens`]): the evidence is the proposer's word, so a reviewer is
    /// told how much of what it excuses loosens the harness.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub intended_loosening: u32,
    pub divergence_percent: f64,
    pub max_divergence_percent: f64,
    /// The run that diverged most and its own percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_run: Option<RunDivergence>,
    pub passed: bool,
    /// There was no finished run to replay.
    #[serde(default)]
    pub no_history: bool,
    /// The most significant divergences, one line each (at most five).
    #[serde(default)]
    pub top: Vec<String>,
    /// SHA-256 of the full report, stored as a blob with the tenant's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// When the runs were re-executed: what that took and found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reexecution: Option<ReexecutionReport>,
    /// What the candidate's model routing would change in the runs (turns moved to another
    /// model, their cost as recorded and at the candidate's prices), when it changes any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<super::routing_effect::RoutingEffect>,
}

impl ReplayGate {
    pub fn of(summary: &ReplaySummary) -> Self {
        let stopped = summary.stopped.iter().map(|why| why.chars().take(300).collect());
        let top = stopped
            .chain(summary.replays.iter().flat_map(|r| {
                // What breaks recorded runs first, then what a proposal means to change, then
                // what only reports (a dryRun policy's would-be changes).
                let mut ordered: Vec<&Divergence> = r.divergences.iter().filter(|d| d.counts()).collect();
                ordered.extend(r.divergences.iter().filter(|d| d.intended));
                ordered.extend(r.divergences.iter().filter(|d| !d.kind.counts()));
                ordered.into_iter().map(move |d| {
                    let tool = d.tool.as_deref().map(|t| format!(" {t}")).unwrap_or_default();
                    let line = format!(
                        "{} step {}{tool}: {}{} ({} → {})",
                        r.session,
                        d.step,
                        if d.intended { "intended: " } else { "" },
                        kind_text(d.kind),
                        d.recorded,
                        d.replayed
                    );
                    line.chars().take(300).collect::<String>()
                })
            }))
            .take(5)
            .collect();
        Self {
            runs: summary.runs,
            steps: summary.steps,
            divergent_steps: summary.divergent_steps,
            intended_steps: summary.intended_steps,
            intended_loosening: summary
                .replays
                .iter()
                .flat_map(|r| &r.divergences)
                .filter(|d| d.intended && d.loosens)
                .count()
                .try_into()
                .unwrap_or(u32::MAX),
            divergence_percent: summary.divergence_percent,
            max_divergence_percent: summary.max_divergence_percent,
            worst_run: summary.worst_run.clone(),
            passed: summary.passed,
            no_history: false,
            top,
            report: None,
            reexecution: summary.reexecution.clone(),
            routing: summary.routing.clone(),
        }
    }

    /// A gate that could not judge the candidate as ordered (`why`): it does not pass.
    pub fn refused(why: &str) -> Self {
        Self {
            no_history: false,
            top: vec![why.chars().take(300).collect()],
            ..Self::no_history(&[])
        }
    }

    pub fn no_history(skipped: &[String]) -> Self {
        Self {
            runs: 0,
            steps: 0,
            divergent_steps: 0,
            intended_steps: 0,
            intended_loosening: 0,
            divergence_percent: 0.0,
            max_divergence_percent: 0.0,
            worst_run: None,
            passed: false,
            no_history: true,
            top: skipped
                .iter()
                .take(5)
                .map(|s| s.chars().take(300).collect())
                .collect(),
            report: None,
            reexecution: None,
            routing: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_shortened_between_characters_whatever_it_holds() {
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        // A runner wrote this one: the twelfth character ends inside no other.
        assert_eq!(short("a€€€€€€€€€€€€€"), "a€€€€€€€€€€€");
    }

    fn call(id: &str, effect: PolicyEffect, rule: &str, shadow: &[&str]) -> CallPoint {
        CallPoint {
            call_id: id.into(),
            step: step_of(id),
            tool: "restart".into(),
            arguments: "{}".into(),
            effect,
            rule: rule.into(),
            shadow: shadow.iter().map(|s| (*s).to_owned()).collect(),
            approved: false,
            executed: effect == PolicyEffect::Allow,
        }
    }

    fn trace(calls: Vec<CallPoint>) -> DecisionTrace {
        DecisionTrace {
            context: None,
            calls,
            verdicts: vec![],
            outcome: "completed: ok".into(),
            offered: BTreeMap::new(),
            discovers: false,
        }
    }

    #[test]
    fn a_turn_shown_other_tools_is_reported_and_does_not_count() {
        let offered = |steps: &[(u32, &[&str])]| -> BTreeMap<u32, Vec<String>> {
            steps
                .iter()
                .map(|(step, tools)| (*step, tools.iter().map(|t| (*t).to_owned()).collect()))
                .collect()
        };
        let with = |steps: &[(u32, &[&str])]| DecisionTrace {
            offered: offered(steps),
            discovers: true,
            ..trace(vec![])
        };
        let recorded = with(&[(1, &["escalate", "get-logs"]), (2, &["get-logs", "restart"])]);
        assert!(compare(&recorded, &recorded.clone()).is_empty());
        // Step 2 loses restart; the replay ends before step 3 of a longer record.
        let longer = with(&[
            (1, &["escalate", "get-logs"]),
            (2, &["get-logs", "restart"]),
            (3, &["escalate"]),
        ]);
        let replayed = with(&[(1, &["escalate", "get-logs"]), (2, &["get-logs"])]);
        let divergences = compare(&longer, &replayed);
        assert_eq!(divergences.len(), 1, "{divergences:?}");
        let changed = &divergences[0];
        assert_eq!((changed.kind, changed.step), (DivergenceKind::OfferChanged, 2));
        assert_eq!(changed.replayed, "get-logs");
        assert!(
            changed.detail.contains("no longer offered: restart"),
            "{}",
            changed.detail
        );
        assert!(
            !changed.kind.counts(),
            "a report: what it changes counts as its own divergence"
        );
        // A replay that ends before its first offer is not a change of what turns are shown.
        let cut_short = with(&[]);
        assert!(compare(&recorded, &cut_short).is_empty());
        // Discovery turned off: one report for the run, whose turns are shown the whole catalog.
        let undiscovered = compare(&recorded, &trace(vec![]));
        assert_eq!(undiscovered.len(), 1, "{undiscovered:?}");
        assert_eq!(undiscovered[0].step, 0);
        assert!(undiscovered[0].replayed.starts_with("every tool"));
        // A record from before offers were recorded, replayed under its own discovery: nothing.
        let before_offers = DecisionTrace {
            discovers: true,
            ..trace(vec![])
        };
        assert!(compare(&before_offers, &recorded).is_empty());
    }

    #[test]
    fn a_newly_denied_call_diverges_and_an_identical_trace_does_not() {
        let recorded = trace(vec![call("1.0", PolicyEffect::Allow, "p/allow", &[])]);
        assert!(compare(&recorded, &recorded).is_empty());
        let replayed = trace(vec![call("1.0", PolicyEffect::Deny, "p/deny", &[])]);
        let divergences = compare(&recorded, &replayed);
        assert_eq!(divergences.len(), 1);
        assert_eq!(divergences[0].kind, DivergenceKind::NewlyDenied);
        assert!(divergences[0].kind.counts());
    }

    #[test]
    fn a_dry_run_policy_reports_what_it_would_change_without_counting_it() {
        let recorded = trace(vec![call("2.0", PolicyEffect::Allow, "p/allow", &[])]);
        let replayed = trace(vec![call(
            "2.0",
            PolicyEffect::Allow,
            "p/allow",
            &["freeze/no-restarts=deny"],
        )]);
        let divergences = compare(&recorded, &replayed);
        assert_eq!(divergences.len(), 1, "{divergences:?}");
        assert_eq!(divergences[0].kind, DivergenceKind::WouldChange);
        assert!(!divergences[0].kind.counts());
    }

    fn replayed(run_id: &str, steps: u32, divergent_steps: u32) -> RunReplay {
        RunReplay {
            run_id: run_id.into(),
            session: run_id.into(),
            agent: "a".into(),
            identical: divergent_steps == 0,
            steps,
            divergent_steps,
            divergences: Vec::new(),
            context_change: None,
            recorded: DecisionTrace::default(),
            replayed: DecisionTrace::default(),
            erased: None,
            reexecution: None,
            note: None,
            routing: None,
        }
    }

    fn divergence(kind: DivergenceKind, step: u32, call: Option<&str>) -> Divergence {
        Divergence {
            kind,
            step,
            tool: call.map(|_| "restart".into()),
            recorded: "allow".into(),
            replayed: "require_approval".into(),
            detail: String::new(),
            intended: false,
            loosens: false,
            call_id: call.map(str::to_owned),
        }
    }

    /// A call its Policy's budget now refuses is a budget overrun (a consequence of the calls
    /// before it); a call a rule merely named like a budget now lets through is not.
    #[test]
    fn only_a_policys_own_budget_refusal_is_a_budget_overrun() {
        let point = |effect, rule: &str| CallPoint {
            call_id: "3.0".into(),
            step: 3,
            tool: "refund".into(),
            arguments: "{}".into(),
            effect,
            rule: rule.into(),
            shadow: Vec::new(),
            approved: false,
            executed: effect == PolicyEffect::Allow,
        };
        let recorded = point(PolicyEffect::Deny, "payments/no-refunds");
        let overrun = call_divergence(
            &point(PolicyEffect::Allow, "payments/default"),
            &point(PolicyEffect::Deny, "payments/budget.maxCalls"),
        );
        assert_eq!(overrun.kind, DivergenceKind::BudgetOverrun);
        for (effect, rule) in [
            (PolicyEffect::Allow, "budget.guard/allow-refunds"),
            (PolicyEffect::Allow, "payments/budget.maxCalls"),
            (PolicyEffect::Allow, "payments/budget.refunds"),
        ] {
            let changed = call_divergence(&recorded, &point(effect, rule));
            assert_eq!(changed.kind, DivergenceKind::NewlyAllowed, "{rule}");
        }
    }

    /// What a reviewer is told opens the harness: an effect that lets a call go further.
    #[test]
    fn a_decision_loosens_when_it_lets_a_call_go_further_than_recorded() {
        use PolicyEffect::{Allow, Deny, RequireApproval};
        let point = |effect| CallPoint {
            call_id: "3.0".into(),
            step: 3,
            tool: "refund".into(),
            arguments: "{}".into(),
            effect,
            rule: "payments/refunds".into(),
            shadow: Vec::new(),
            approved: false,
            executed: effect == Allow,
        };
        for (recorded, replayed, loosens) in [
            (Deny, Allow, true),
            (Deny, RequireApproval, true),
            (RequireApproval, Allow, true),
            (Allow, Deny, false),
            (Allow, RequireApproval, false),
            (RequireApproval, Deny, false),
        ] {
            let change = call_divergence(&point(recorded), &point(replayed));
            assert_eq!(change.loosens, loosens, "{recorded:?} → {replayed:?}");
        }
    }

    #[test]
    fn only_a_change_that_starts_at_the_named_call_is_excused_with_what_follows_from_it() {
        let calls: BTreeSet<String> = ["2.0".to_owned()].into();
        let run = |divergences: Vec<Divergence>| {
            let mut r = replayed("r", 4, 0);
            r.divergent_steps = divergent_steps(&divergences);
            r.divergences = divergences;
            r
        };
        // The named call newly needs approval; what follows in the run follows from it.
        let mut meant = run(vec![
            divergence(DivergenceKind::NewlyNeedsApproval, 2, Some("2.0")),
            divergence(DivergenceKind::CallNotReached, 3, Some("3.0")),
            divergence(DivergenceKind::OutcomeChanged, 0, None),
        ]);
        meant.mark_intended(&calls);
        assert_eq!((meant.divergent_steps, meant.intended_steps()), (0, 3));
        // An earlier change than the named call is the candidate's own doing: nothing excused.
        let mut earlier = run(vec![
            divergence(DivergenceKind::NewlyDenied, 1, Some("1.0")),
            divergence(DivergenceKind::NewlyNeedsApproval, 2, Some("2.0")),
        ]);
        earlier.mark_intended(&calls);
        assert_eq!((earlier.divergent_steps, earlier.intended_steps()), (2, 0));
        // A run whose first change is not a decision on the named call: nothing excused.
        let mut other = run(vec![divergence(DivergenceKind::VerdictChanged, 2, None)]);
        other.mark_intended(&calls);
        assert_eq!(other.intended_steps(), 0);
        // A call the evidence does not name, in the same step: nothing excused.
        let mut unnamed = run(vec![divergence(DivergenceKind::NewlyDenied, 2, Some("2.1"))]);
        unnamed.mark_intended(&calls);
        assert_eq!(unnamed.intended_steps(), 0);
        // After the named call, another call decided otherwise is the candidate's own doing (a
        // rule removed lets it through): it counts, though what follows is excused.
        let mut beyond = run(vec![
            divergence(DivergenceKind::NewlyNeedsApproval, 2, Some("2.0")),
            divergence(DivergenceKind::NewlyAllowed, 3, Some("3.0")),
            divergence(DivergenceKind::CallNotReached, 4, Some("4.0")),
        ]);
        beyond.mark_intended(&calls);
        assert_eq!((beyond.divergent_steps, beyond.intended_steps()), (1, 2));
    }

    /// The evidence is the proposer's: a gate that excuses changes opening what the runs kept
    /// shut says how many, so a loosening proposal does not read as a harmless one.
    #[test]
    fn a_gate_says_how_many_excused_calls_are_now_let_through() {
        let calls: BTreeSet<String> = ["2.0".to_owned()].into();
        let mut loosened = replayed("r", 4, 0);
        let opened = |kind, step, call| Divergence {
            loosens: true,
            ..divergence(kind, step, Some(call))
        };
        loosened.divergences = vec![
            opened(DivergenceKind::NewlyAllowed, 2, "2.0"),
            opened(DivergenceKind::NewCall, 3, "3.0"),
        ];
        loosened.divergent_steps = divergent_steps(&loosened.divergences);
        loosened.mark_intended(&calls);
        let mut tightened = replayed("t", 4, 0);
        tightened.divergences = vec![divergence(DivergenceKind::NewlyDenied, 2, Some("2.0"))];
        tightened.divergent_steps = divergent_steps(&tightened.divergences);
        tightened.mark_intended(&calls);
        let gate = ReplayGate::of(&ReplaySummary::new(vec![loosened, tightened], Vec::new(), 0.0));
        assert!(gate.passed);
        assert_eq!((gate.intended_steps, gate.intended_loosening), (3, 2));
    }

    #[test]
    fn a_run_about_an_erased_subject_is_shown_and_never_judged() {
        let mut erased = replayed("gone", 4, 4);
        erased.erased = Some(crate::consent::SubjectHandle::new("cust-1").expect("handle"));
        let summary = ReplaySummary::new(vec![replayed("kept", 10, 0), erased], Vec::new(), 0.0);
        assert!(summary.passed, "{}", summary.text());
        assert_eq!((summary.runs, summary.steps), (1, 10));
        assert!(summary.text().contains("about subject cust-1, erased since"));
        let alone = ReplaySummary::new(vec![summary.replays[1].clone()], Vec::new(), 0.0);
        assert!(alone.passed && alone.runs == 0);
    }

    #[test]
    fn one_runs_regression_fails_the_gate_even_when_the_average_is_within_it() {
        // 1 divergent step in 100: 1 % on average, but the short run diverged on half its steps.
        let runs = vec![replayed("long", 98, 0), replayed("short", 2, 1)];
        let summary = ReplaySummary::new(runs, Vec::new(), 10.0);
        assert!(summary.divergence_percent <= 10.0);
        assert!(!summary.passed);
        let worst = summary.worst_run.clone().expect("a worst run");
        assert_eq!((worst.run_id.as_str(), worst.percent), ("short", 50.0));
        assert!(summary.text().contains("most diverged: run short (50.0%"));

        let within = ReplaySummary::new(
            vec![replayed("long", 98, 0), replayed("short", 20, 1)],
            Vec::new(),
            10.0,
        );
        assert!(within.passed);
    }
}
