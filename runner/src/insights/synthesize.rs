//! The Insight Synthesizer: signals grouped into insights — one recurring pattern each (a
//! failure, a denial the model keeps running into, approvals always given), with its evidence
//! and a strength (how many runs, how recent), ordered strongest first. Deterministic: the same
//! signals give the same insights in the same order.

use serde::Serialize;

use super::signals::{AgentSignals, EntryRef, Signals, Tally};

/// What kind of pattern an insight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InsightKind {
    /// People keep correcting the agent the same way.
    Corrections,
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

impl InsightKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Corrections => "corrections",
            Self::RecurringFailure => "recurring-failure",
            Self::RepeatedDenial => "repeated-denial",
            Self::ApprovalsAlwaysGranted => "approvals-always-granted",
            Self::ApprovalsAlwaysRefused => "approvals-always-refused",
            Self::DeadLetters => "dead-letters",
            Self::DryRunWouldChange => "dry-run-would-change",
            Self::Pressure => "pressure",
            Self::Escalations => "escalations",
            Self::SourceCut => "source-cut",
        }
    }
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
    /// The label people gave, for corrections (`should-have-asked`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
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
        label: None,
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
    for (agent, s) in &signals.agents {
        run_insights(agent, s, thresholds, &mut out);
        tool_insights(agent, s, thresholds, &mut out);
        rule_insights(agent, s, thresholds, &mut out);
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

fn enough(tally: &Tally, thresholds: Thresholds) -> bool {
    tally.runs >= thresholds.min_runs.max(1)
}

/// Failures, pressure, escalations and sources cut: how the agent's runs went.
fn run_insights(agent: &str, s: &AgentSignals, thresholds: Thresholds, out: &mut Vec<Insight>) {
    for (reason, tally) in s.failed.iter().filter(|(_, t)| enough(t, thresholds)) {
        let consider = match reason.as_str() {
            "ValidationFailed" => {
                "say in the ContextPack's instructions what a valid answer looks like, or review the validators"
            }
            "Looping" => "a budget per tool (Policy budget.maxCallsPerTool) or instructions on when to stop",
            r if r.contains("Budget") => "a larger run budget if the work needs it, or a narrower task",
            _ => "read the runs' records (contextos records show <run>)",
        };
        let summary = format!(
            "{} of {} runs of agent {agent} failed with {}",
            tally.runs,
            s.runs,
            crate::text::for_terminal(reason)
        );
        out.push(insight(
            InsightKind::RecurringFailure,
            agent,
            reason,
            tally,
            summary,
            consider.into(),
        ));
    }
    for (signal, tally) in s.pressure.iter().filter(|(_, t)| enough(t, thresholds)) {
        let consider = match signal.as_str() {
            "budget" => "a budget that fits the work, or a narrower task",
            "loop" => "instructions on when to stop repeating a call, or a per-tool budget",
            "gate" => "rules that let the routine calls through, or fewer tools the agent may not use",
            _ => "instructions that tell the agent what policy does not allow",
        };
        let summary = format!(
            "{} runs of agent {agent} raised the {signal} signal ({} step(s))",
            tally.runs, tally.count
        );
        out.push(insight(
            InsightKind::Pressure,
            agent,
            signal,
            tally,
            summary,
            consider.into(),
        ));
    }
    if let Some(tally) = s.critic.get("escalate").filter(|t| enough(t, thresholds)) {
        let summary = format!(
            "the critic escalated {} time(s) in {} runs",
            tally.count, tally.runs
        );
        let consider = "look at what the escalations have in common; the Agent's critic.escalateOn says when";
        out.push(insight(
            InsightKind::Escalations,
            agent,
            "escalate",
            tally,
            summary,
            consider.into(),
        ));
    }
    for (source, tally) in s.sources_cut.iter().filter(|(_, t)| enough(t, thresholds)) {
        let shown = crate::text::for_terminal(source);
        let summary = format!("context source {shown} was cut to fit in {} runs", tally.runs);
        let consider = format!("a larger maxTokens for {shown}, a higher priority, or a shorter source");
        out.push(insight(
            InsightKind::SourceCut,
            agent,
            source,
            tally,
            summary,
            consider,
        ));
    }
}

/// What people said was wrong, and what it suggests.
fn correction(agent: &str, about: &str, label: &str, tally: &Tally) -> Insight {
    let consider = match label {
        "should-have-asked" => {
            format!("a rule that requires approval for {about} (with a condition for the cases people named)")
        }
        "should-not-have-acted" => format!("a rule that denies {about} in the cases people named"),
        "wrong-tool" => {
            format!("say in the ContextPack when {about} is the right tool, or narrow its description")
        }
        "missing-context" => "a ContextPack source with what the agent lacked".into(),
        "wrong-answer" => "an output validator for what was wrong, or instructions on the answer".into(),
        _ => "a tighter budget, or a narrower task".into(),
    };
    let summary = format!(
        "people corrected agent {agent} as {label} {} time(s) in {} runs ({about})",
        tally.count, tally.runs
    );
    Insight {
        label: Some(label.to_owned()),
        ..insight(InsightKind::Corrections, agent, about, tally, summary, consider)
    }
}

/// Denials the model keeps running into and calls that keep failing, per tool.
fn tool_insights(agent: &str, s: &AgentSignals, thresholds: Thresholds, out: &mut Vec<Insight>) {
    for (label, tally) in s.corrections.iter().filter(|(_, t)| enough(t, thresholds)) {
        out.push(correction(agent, "its runs", label, tally));
    }
    for (tool, t) in &s.tools {
        for (label, tally) in t.corrections.iter().filter(|(_, t)| enough(t, thresholds)) {
            out.push(correction(agent, tool, label, tally));
        }
        for (rule, tally) in t.denied.iter().filter(|(_, t)| enough(t, thresholds)) {
            let summary = format!(
                "agent {agent} asked for {tool} in {} call(s) over {} runs and {rule} denied it each time",
                tally.count, tally.runs
            );
            let consider = format!(
                "tell the agent in its ContextPack that {tool} is not for it (or when it is), or remove the tool from the Agent"
            );
            out.push(insight(
                InsightKind::RepeatedDenial,
                agent,
                tool,
                tally,
                summary,
                consider,
            ));
        }
        if enough(&t.dead_lettered, thresholds) {
            let tally = &t.dead_lettered;
            let summary = format!(
                "calls of {tool} failed for good {} time(s) in {} runs",
                tally.count, tally.runs
            );
            let consider =
                format!("check {tool}'s endpoint and timeout; a retry policy only if it is idempotent");
            out.push(insight(
                InsightKind::DeadLetters,
                agent,
                tool,
                tally,
                summary,
                consider,
            ));
        }
    }
}

/// Approvals always given or always refused, and dryRun rules that would change decisions.
fn rule_insights(agent: &str, s: &AgentSignals, thresholds: Thresholds, out: &mut Vec<Insight>) {
    for (rule, r) in &s.rules {
        let (granted, refused) = (&r.approvals_granted, &r.approvals_refused);
        if granted.count >= thresholds.min_approvals && refused.count == 0 && enough(granted, thresholds) {
            let summary = format!(
                "all {} calls that asked for approval under {rule} were approved",
                granted.count
            );
            let consider = format!(
                "a CEL condition on {rule} that asks only for the calls people actually weigh, if the approvals are a formality"
            );
            out.push(insight(
                InsightKind::ApprovalsAlwaysGranted,
                agent,
                rule,
                granted,
                summary,
                consider,
            ));
        }
        if refused.count >= thresholds.min_approvals && granted.count == 0 && enough(refused, thresholds) {
            let summary = format!(
                "none of the {} calls that asked for approval under {rule} was approved (refused, or the approval did not match the call)",
                refused.count
            );
            let consider = format!("make {rule} deny, if nobody approves these calls");
            out.push(insight(
                InsightKind::ApprovalsAlwaysRefused,
                agent,
                rule,
                refused,
                summary,
                consider,
            ));
        }
        if r.would_change.count > 0 {
            let tally = &r.would_change;
            let summary = format!(
                "dryRun rule {rule} would have decided {} call(s) in {} runs more strictly than what was applied",
                tally.count, tally.runs
            );
            let consider =
                format!("review those calls, then enforce the policy of {rule} or change the rule");
            out.push(insight(
                InsightKind::DryRunWouldChange,
                agent,
                rule,
                tally,
                summary,
                consider,
            ));
        }
    }
}

/// An insight without enough evidence yet: the pattern, and what would settle it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Question {
    pub insight: Insight,
    /// What would settle it, in a sentence.
    pub settle: String,
}

/// The research queue: patterns seen, but in fewer runs (or approvals) than `thresholds` ask
/// for, each with what would make it an insight. Re-evaluated with every window read: a
/// question whose runs arrive becomes an insight.
pub fn open_questions(signals: &Signals, thresholds: Thresholds) -> Vec<Question> {
    let settled = synthesize(signals, thresholds);
    let same = |a: &Insight, b: &Insight| {
        a.kind == b.kind && a.agent == b.agent && a.about == b.about && a.label == b.label
    };
    let everything = Thresholds {
        min_runs: 1,
        min_approvals: 1,
    };
    synthesize(signals, everything)
        .into_iter()
        .filter(|candidate| !settled.iter().any(|i| same(i, candidate)))
        .map(|insight| {
            let runs_short = thresholds.min_runs.saturating_sub(insight.strength.runs);
            let settle = match insight.kind {
                InsightKind::ApprovalsAlwaysGranted | InsightKind::ApprovalsAlwaysRefused
                    if insight.strength.count < thresholds.min_approvals =>
                {
                    format!(
                        "{} more approval(s) under {}",
                        thresholds.min_approvals - insight.strength.count,
                        insight.about
                    )
                }
                _ => format!(
                    "{} more run(s) of agent {} showing it ({})",
                    runs_short.max(1),
                    insight.agent,
                    insight.about
                ),
            };
            Question { insight, settle }
        })
        .collect()
}
