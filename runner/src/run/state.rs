//! Functional State: deterministic per-step pressure signals — budget, loop, evidence, gate,
//! conflict — computed from what the run has done. The critic reads them; the model never sees
//! them. Pure: the same history gives the same signals, so a replay recomputes them exactly.

use contextos_crds::common::{RunBudget, ToolKind};
use serde::{Deserialize, Serialize};

use crate::policy::StateFacts;

/// What the run has consumed so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub steps: u32,
    pub tokens: u64,
    pub tool_calls: u32,
    /// Wall time spent running (not waiting for a human), in milliseconds.
    pub wall_ms: u64,
}

/// How a call ended, as far as the signals care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFate {
    Succeeded,
    Failed,
    Denied,
    AwaitingApproval,
}

/// One call the run made: enough to see repetition and evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSeen {
    pub call_id: String,
    pub step: u32,
    pub tool: String,
    pub kind: ToolKind,
    /// Digest of the canonical arguments.
    pub args: String,
    pub fate: CallFate,
}

/// The signals of one step, each 0.0 (no pressure) to 1.0, and why each is what it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionalState {
    pub budget: f64,
    #[serde(rename = "loop")]
    pub loop_: f64,
    pub evidence: f64,
    pub gate: f64,
    pub conflict: f64,
    /// One line per raised signal, for the record and the critic's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl FunctionalState {
    /// The signals as policy conditions read them (`state.*`).
    pub fn facts(&self) -> StateFacts {
        StateFacts {
            budget: self.budget,
            loop_: self.loop_,
            evidence: self.evidence,
            gate: self.gate,
            conflict: self.conflict,
        }
    }
}

/// Computes the signals after step `step`, given every call so far.
pub fn assess(step: u32, usage: &Usage, budget: &RunBudget, calls: &[CallSeen]) -> FunctionalState {
    let mut state = FunctionalState::default();
    let (fraction, limit) = budget_pressure(usage, budget);
    state.budget = fraction;
    if fraction >= 0.8 {
        state.notes.push(format!(
            "budget: {limit} at {:.0}% of its limit",
            fraction * 100.0
        ));
    }

    let this_step: Vec<&CallSeen> = calls.iter().filter(|c| c.step == step).collect();
    let earlier: Vec<&CallSeen> = calls.iter().filter(|c| c.step < step).collect();

    let repeats = this_step
        .iter()
        .filter(|c| earlier.iter().any(|e| e.tool == c.tool && e.args == c.args))
        .count();
    state.loop_ = match repeats {
        0 => 0.0,
        1 => 0.5,
        _ => 1.0,
    };
    if repeats > 0 {
        state.notes.push(format!(
            "loop: {repeats} call(s) repeat an earlier call with the same arguments"
        ));
    }

    let evidence = calls
        .iter()
        .filter(|c| c.fate == CallFate::Succeeded && is_evidence(c.kind))
        .count();
    state.evidence = match evidence {
        0 => 1.0,
        1 => 0.5,
        _ => 0.0,
    };

    if this_step.iter().any(|c| c.fate == CallFate::AwaitingApproval) {
        state.gate = 1.0;
        state.notes.push("gate: a call waits for approval".into());
    } else if !this_step.is_empty() {
        let denied = this_step.iter().filter(|c| c.fate == CallFate::Denied).count();
        state.gate = denied as f64 / this_step.len() as f64;
        if denied > 0 {
            state
                .notes
                .push(format!("gate: {denied} of {} call(s) denied", this_step.len()));
        }
    }

    // Asking again for what policy already refused works against the boundary, not with it.
    let persisted = this_step
        .iter()
        .filter(|c| {
            earlier
                .iter()
                .any(|e| e.fate == CallFate::Denied && e.tool == c.tool)
        })
        .collect::<Vec<_>>();
    state.conflict = if persisted.iter().any(|c| {
        earlier
            .iter()
            .any(|e| e.fate == CallFate::Denied && e.tool == c.tool && e.args == c.args)
    }) {
        1.0
    } else if persisted.is_empty() {
        0.0
    } else {
        0.5
    };
    if let Some(c) = persisted.first() {
        state.notes.push(format!(
            "conflict: asked again for {}, which policy denied before",
            c.tool
        ));
    }
    state
}

/// Observations, recalls and verifications are what an answer can cite.
fn is_evidence(kind: ToolKind) -> bool {
    matches!(kind, ToolKind::Observe | ToolKind::Recall | ToolKind::Verify)
}

/// The largest used/limit fraction and which limit it is.
fn budget_pressure(usage: &Usage, budget: &RunBudget) -> (f64, &'static str) {
    let ratio = |used: f64, max: f64| if max <= 0.0 { 1.0 } else { used / max };
    [
        (
            ratio(f64::from(usage.steps), f64::from(budget.max_steps)),
            "maxSteps",
        ),
        (ratio(usage.tokens as f64, budget.max_tokens as f64), "maxTokens"),
        (
            ratio(f64::from(usage.tool_calls), f64::from(budget.max_tool_calls)),
            "maxToolCalls",
        ),
        (
            ratio(usage.wall_ms as f64 / 1000.0, f64::from(budget.max_wall_seconds)),
            "maxWallSeconds",
        ),
    ]
    .into_iter()
    .fold(
        (0.0, "maxSteps"),
        |best, item| if item.0 > best.0 { item } else { best },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RunBudget {
        RunBudget {
            max_steps: 10,
            max_tokens: 1000,
            max_tool_calls: 4,
            max_wall_seconds: 60,
            max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
        }
    }

    fn call(step: u32, tool: &str, args: &str, kind: ToolKind, fate: CallFate) -> CallSeen {
        CallSeen {
            call_id: format!("{step}.{tool}"),
            step,
            tool: tool.into(),
            kind,
            args: args.into(),
            fate,
        }
    }

    #[test]
    fn budget_reports_the_tightest_limit() {
        let usage = Usage {
            steps: 2,
            tokens: 100,
            tool_calls: 4,
            wall_ms: 1000,
        };
        let state = assess(2, &usage, &budget(), &[]);
        assert_eq!(state.budget, 1.0);
        assert!(state.notes[0].contains("maxToolCalls"), "{:?}", state.notes);
    }

    #[test]
    fn repeating_a_call_raises_loop_and_repeating_a_denied_one_raises_conflict() {
        let calls = vec![
            call(1, "search", "a", ToolKind::Observe, CallFate::Succeeded),
            call(1, "delete", "x", ToolKind::Act, CallFate::Denied),
            call(2, "search", "a", ToolKind::Observe, CallFate::Succeeded),
            call(2, "delete", "x", ToolKind::Act, CallFate::Denied),
        ];
        let state = assess(2, &Usage::default(), &budget(), &calls);
        assert_eq!(state.loop_, 1.0);
        assert_eq!(state.conflict, 1.0);
        assert_eq!(state.gate, 0.5);
        assert_eq!(state.evidence, 0.0);
    }

    #[test]
    fn no_evidence_and_a_pending_approval_are_full_pressure() {
        let calls = vec![call(1, "restart", "r", ToolKind::Act, CallFate::AwaitingApproval)];
        let state = assess(1, &Usage::default(), &budget(), &calls);
        assert_eq!((state.evidence, state.gate, state.loop_), (1.0, 1.0, 0.0));
    }
}
