//! The Insight Synthesizer: signals grouped into insights — one recurring pattern each (a
//! failure, a denial the model keeps running into, approvals always given), with its evidence
//! and a strength (how many runs, how recent), ordered strongest first. Deterministic: the same
//! signals give the same insights in the same order.

use serde::Serialize;

use super::signals::{EntryRef, Signals, Tally};

/// What kind of pattern an insight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InsightKind {
    /// Runs of an agent keep failing for one reason.
    RecurringFailure,
    /// The model keeps asking for a call a rule denies.
    RepeatedDenial,
    /// Every approval asked under a rule was granted: the approval may be ceremony.
    ApprovalsAlwaysGranted,
    /// Every approval asked under a rule was refused: the rule may as well deny.
    ApprovalsAlwaysRefused,
    /// A tool's calls keep failing for good (dead-lettered).
    DeadLetters,
    /// A dryRun policy's rule would change decisions if enforced.
    DryRunWouldChange,
    /// Runs keep raising one Functional State signal.
    Pressure,
    /// The critic keeps escalating to people.
    Escalations,
    /// A context source keeps being cut to fit.
    SourceCut,
}

/// How strong an insight is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Strength {
    /// Runs it was seen in.
    pub runs: u64,
    /// Times it was seen.
    pub count: u64,
    /// When the newest of those runs started (ms since the epoch).
    pub newest_ms: i64,
}

/// One insight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Insight {
    pub kind: InsightKind,
    pub agent: String,
    /// What it is about: a tool, a rule, a failure reason, a signal or a source.
    pub about: String,
    /// What was seen, in a sentence.
    pub summary: String,
    /// What a change could be (a proposal's starting point, never applied from here).
    pub consider: String,
    pub strength: Strength,
    pub evidence: Vec<EntryRef>,
}

/// How much it takes to be an insight.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// Runs a pattern must be seen in (a dryRun rule's would-change decisions: one is enough).
    pub min_runs: u64,
    /// Approvals under a rule before "always granted" or "always refused" means something.
    pub min_approvals: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_runs: 2,
            min_approvals: 3,
        }
    }
}

fn insight(
    kind: InsightKind,
    agent: &str,
    about: &str,
    tally: &Tally,
    summary: String,
    consider: String,
) -> Insight {
    Insight {
        kind,
        agent: agent.to_owned(),
        about: about.to_owned(),
        summary,
        consider,
        strength: Strength {
            runs: tally.runs,
            count: tally.count,
            newest_ms: tally.newest_ms,
        },
        evidence: tally.evidence.clone(),
    }
}

/// The insights in `signals`, strongest first (more runs, then more recent), then by kind,
/// agent and subject.
pub fn synthesize(signals: &Signals, thresholds: Thresholds) -> Vec<Insight> {
    let mut out = Vec::new();
    let enough = |t: &Tally| t.runs >= thresholds.min_runs.max(1);
    for (agent, s) in &signals.agents {
        for (reason, tally) in s.failed.iter().filter(|(_, t)| enough(t)) {
            out.push(insight(
                InsightKind::RecurringFailure,
                agent,
                reason,
                tally,
                format!("{} of {} runs of agent {agent} failed with {reason}", tally.runs, s.runs),
                match reason.as_str() {
                    "ValidationFailed" => "say in the ContextPack's instructions what a valid answer looks like, or review the validators".into(),
                    "Looping" => "a budget per tool (Policy budget.maxCallsPerTool) or instructions on when to stop".into(),
                    r if r.contains("Budget") => "a larger run budget if the work needs it, or a tighter task".into(),
                    _ => "read the runs' records (contextos records show <run>)".into(),
                },
            ));
        }
        for (tool, t) in &s.tools {
            for (rule, tally) in t.denied.iter().filter(|(_, t)| enough(t)) {
                out.push(insight(
                    InsightKind::RepeatedDenial,
                    agent,
                    tool,
                    tally,
                    format!(
                        "agent {agent} asked for {tool} {} time(s) in {} runs and {rule} denied it each time",
                        tally.count, tally.runs
                    ),
                    format!("tell the agent in its ContextPack that {tool} is not for it (or when it is), or remove the tool from the Agent"),
                ));
            }
            if enough(&t.dead_lettered) {
                out.push(insight(
                    InsightKind::DeadLetters,
                    agent,
                    tool,
                    &t.dead_lettered,
                    format!(
                        "calls of {tool} failed for good {} time(s) in {} runs",
                        t.dead_lettered.count, t.dead_lettered.runs
                    ),
                    format!("check {tool}'s endpoint and timeout; a retry policy only if it is idempotent"),
                ));
            }
        }
        for (rule, r) in &s.rules {
            let (granted, refused) = (&r.approvals_granted, &r.approvals_refused);
            if granted.count >= thresholds.min_approvals && refused.count == 0 && enough(granted) {
                out.push(insight(
                    InsightKind::ApprovalsAlwaysGranted,
                    agent,
                    rule,
                    granted,
                    format!("all {} approvals asked under {rule} were granted", granted.count),
                    format!("a CEL condition on {rule} that asks only for the calls people actually weigh, if the approvals are a formality"),
                ));
            }
            if refused.count >= thresholds.min_approvals && granted.count == 0 && enough(refused) {
                out.push(insight(
                    InsightKind::ApprovalsAlwaysRefused,
                    agent,
                    rule,
                    refused,
                    format!("all {} approvals asked under {rule} were refused", refused.count),
                    format!("make {rule} deny: nobody approves these calls"),
                ));
            }
            if r.would_change.count > 0 {
                out.push(insight(
                    InsightKind::DryRunWouldChange,
                    agent,
                    rule,
                    &r.would_change,
                    format!(
                        "dryRun rule {rule} would have changed {} decision(s) in {} runs",
                        r.would_change.count, r.would_change.runs
                    ),
                    format!("review those decisions, then enforce the policy of {rule} or change the rule"),
                ));
            }
        }
        for (signal, tally) in s.pressure.iter().filter(|(_, t)| enough(t)) {
            out.push(insight(
                InsightKind::Pressure,
                agent,
                signal,
                tally,
                format!(
                    "{} runs of agent {agent} raised the {signal} signal ({} step(s))",
                    tally.runs, tally.count
                ),
                match signal.as_str() {
                    "budget" => "a budget that fits the work, or a narrower task".into(),
                    "loop" => "instructions on when to stop repeating a call, or a per-tool budget".into(),
                    "evidence" => "tools or sources that give the answer its evidence".into(),
                    "gate" => {
                        "rules that let the routine calls through, or fewer tools the agent may not use"
                            .into()
                    }
                    _ => "instructions that tell the agent what policy does not allow".into(),
                },
            ));
        }
        if let Some(tally) = s.critic.get("escalate").filter(|t| enough(t)) {
            out.push(insight(
                InsightKind::Escalations,
                agent,
                "escalate",
                tally,
                format!(
                    "the critic escalated {} time(s) in {} runs",
                    tally.count, tally.runs
                ),
                "look at what the escalations have in common; the Agent's critic.escalateOn says when".into(),
            ));
        }
        for (source, tally) in s.sources_cut.iter().filter(|(_, t)| enough(t)) {
            out.push(insight(
                InsightKind::SourceCut,
                agent,
                source,
                tally,
                format!("context source {source} was cut to fit in {} runs", tally.runs),
                format!("a larger maxTokens for {source}, a higher priority, or a shorter source"),
            ));
        }
    }
    out.sort_by(|a, b| {
        b.strength
            .runs
            .cmp(&a.strength.runs)
            .then(b.strength.newest_ms.cmp(&a.strength.newest_ms))
            .then(a.kind.cmp(&b.kind))
            .then(a.agent.cmp(&b.agent))
            .then(a.about.cmp(&b.about))
    });
    out
}
