//! The critic: after every step it reads the Functional State (never shown to the model) and
//! the step's result and gives a verdict — continue, revise (with feedback to the model), halt
//! (accepting the answer or failing the run) or escalate (to a human). Pure and deterministic.

use contextos_crds::agent::{CriticSpec, FunctionalSignal};

use super::{state::FunctionalState, validate::Validation};
use crate::records::entry::Verdict;

/// What the step produced.
#[derive(Clone, Copy, Debug)]
pub enum StepResult<'a> {
    /// The model asked for tools; they were handled.
    Calls,
    /// A call waits for a human's approval.
    AwaitingApproval { tool: &'a str },
    /// The model answered; the validators' findings.
    Answer {
        output: &'a str,
        validation: &'a Validation,
    },
}

/// Everything the critic weighs.
#[derive(Clone, Copy, Debug)]
pub struct Review<'a> {
    pub state: &'a FunctionalState,
    pub spec: &'a CriticSpec,
    pub result: StepResult<'a>,
    /// Revisions the critic already asked for in this run.
    pub revisions_used: u32,
    /// Whether the agent has tools that gather evidence (observe, recall, verify).
    pub has_evidence_tools: bool,
}

/// How a run ends, when the verdict ends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Accepted {
        output: String,
        validators: Vec<String>,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Waits for a human; resumable.
    Paused,
}

/// The critic's verdict on one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reason: String,
    /// For `revise`: what the model is told.
    pub feedback: Option<String>,
    pub ending: Option<Ending>,
}

impl Judgement {
    fn new(verdict: Verdict, reason: String) -> Self {
        Self {
            verdict,
            reason,
            feedback: None,
            ending: None,
        }
    }

    fn ends(mut self, ending: Ending) -> Self {
        self.ending = Some(ending);
        self
    }

    fn revise(reason: String, feedback: String) -> Self {
        let mut judgement = Self::new(Verdict::Revise, reason);
        judgement.feedback = Some(feedback);
        judgement
    }
}

/// Reviews one step.
pub fn review(review: &Review<'_>) -> Judgement {
    let state = review.state;
    let revisions_left = review.revisions_used < review.spec.max_revisions;
    if let StepResult::AwaitingApproval { tool } = review.result {
        return Judgement::new(
            Verdict::Escalate,
            format!("call of {tool} waits for a human's approval"),
        )
        .ends(Ending::Paused);
    }
    let answering = matches!(review.result, StepResult::Answer { .. });
    if let Some(signal) = review
        .spec
        .escalate_on
        .iter()
        .find(|s| raised(**s, state, answering))
    {
        let message = format!(
            "signal {} is raised and the agent escalates on it: {}",
            signal_name(*signal),
            state.notes.join("; ")
        );
        return Judgement::new(Verdict::Escalate, message.clone()).ends(Ending::Failed {
            reason: "Escalated",
            message,
        });
    }
    if let StepResult::Answer { output, validation } = review.result {
        return review_answer(review, output, validation, revisions_left);
    }
    if state.budget >= 1.0 {
        let message = format!("the run budget is used up ({})", state.notes.join("; "));
        return Judgement::new(Verdict::Halt, message.clone()).ends(Ending::Failed {
            reason: "BudgetExhausted",
            message,
        });
    }
    if state.loop_ >= 1.0 {
        let why = "the step repeats earlier calls with the same arguments".to_owned();
        if revisions_left {
            return Judgement::revise(
                why,
                "You repeated calls you already made with the same arguments; use their results or try something different.".into(),
            );
        }
        return Judgement::new(Verdict::Halt, why.clone()).ends(Ending::Failed {
            reason: "Looping",
            message: why,
        });
    }
    Judgement::new(Verdict::Continue, continue_reason(state))
}

fn review_answer(
    review: &Review<'_>,
    output: &str,
    validation: &Validation,
    revisions_left: bool,
) -> Judgement {
    if !validation.failures.is_empty() {
        let failures = validation.failures.join("; ");
        if revisions_left {
            return Judgement::revise(
                format!("the answer fails validation: {failures}"),
                format!("Your answer was not accepted: {failures}. Answer again, fixing this."),
            );
        }
        let message = format!("the answer still fails validation after all revisions: {failures}");
        return Judgement::new(Verdict::Halt, message.clone()).ends(Ending::Failed {
            reason: "ValidationFailed",
            message,
        });
    }
    if review.has_evidence_tools && review.state.evidence >= 1.0 && revisions_left {
        return Judgement::revise(
            "the answer cites no tool result".into(),
            "Gather evidence with your tools before answering; no tool result supports this answer yet."
                .into(),
        );
    }
    Judgement::new(Verdict::Halt, "the answer passed every validator".into()).ends(Ending::Accepted {
        output: output.to_owned(),
        validators: validation.passed.clone(),
    })
}

/// Whether `signal` counts as raised for escalation. Evidence only matters once the model
/// answers; budget is raised when close to a limit.
pub fn raised(signal: FunctionalSignal, state: &FunctionalState, answering: bool) -> bool {
    match signal {
        FunctionalSignal::Budget => state.budget >= 0.8,
        FunctionalSignal::Loop => state.loop_ >= 0.5,
        FunctionalSignal::Evidence => answering && state.evidence >= 1.0,
        FunctionalSignal::Gate => state.gate >= 0.5,
        FunctionalSignal::Conflict => state.conflict >= 0.5,
    }
}

pub fn signal_name(signal: FunctionalSignal) -> &'static str {
    match signal {
        FunctionalSignal::Budget => "budget",
        FunctionalSignal::Loop => "loop",
        FunctionalSignal::Evidence => "evidence",
        FunctionalSignal::Gate => "gate",
        FunctionalSignal::Conflict => "conflict",
    }
}

fn continue_reason(state: &FunctionalState) -> String {
    if state.notes.is_empty() {
        "no signal raised".into()
    } else {
        state.notes.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CriticSpec {
        CriticSpec {
            max_revisions: 1,
            escalate_on: vec![FunctionalSignal::Conflict],
        }
    }

    fn judge(state: &FunctionalState, result: StepResult<'_>, revisions_used: u32) -> Judgement {
        review(&Review {
            state,
            spec: &spec(),
            result,
            revisions_used,
            has_evidence_tools: true,
        })
    }

    #[test]
    fn a_failing_answer_is_revised_then_halts_the_run() {
        let state = FunctionalState::default();
        let validation = Validation {
            passed: vec![],
            failures: vec!["shape: missing summary".into()],
        };
        let answer = StepResult::Answer {
            output: "x",
            validation: &validation,
        };
        let first = judge(&state, answer, 0);
        assert_eq!(first.verdict, Verdict::Revise);
        assert!(
            first
                .feedback
                .as_deref()
                .is_some_and(|f| f.contains("missing summary"))
        );
        let last = judge(&state, answer, 1);
        assert_eq!(last.verdict, Verdict::Halt);
        assert!(matches!(
            last.ending,
            Some(Ending::Failed {
                reason: "ValidationFailed",
                ..
            })
        ));
    }

    #[test]
    fn a_valid_answer_with_evidence_is_accepted() {
        let validation = Validation {
            passed: vec!["shape".into()],
            failures: vec![],
        };
        let answer = StepResult::Answer {
            output: "{}",
            validation: &validation,
        };
        let judged = judge(&FunctionalState::default(), answer, 0);
        assert!(
            matches!(judged.ending, Some(Ending::Accepted { .. })),
            "{judged:?}"
        );
        let no_evidence = FunctionalState {
            evidence: 1.0,
            ..FunctionalState::default()
        };
        assert_eq!(judge(&no_evidence, answer, 0).verdict, Verdict::Revise);
    }

    #[test]
    fn escalation_signals_budget_and_approvals_end_or_pause_the_run() {
        let conflict = FunctionalState {
            conflict: 1.0,
            ..FunctionalState::default()
        };
        let judged = judge(&conflict, StepResult::Calls, 0);
        assert_eq!(judged.verdict, Verdict::Escalate);
        assert!(matches!(
            judged.ending,
            Some(Ending::Failed {
                reason: "Escalated",
                ..
            })
        ));

        let spent = FunctionalState {
            budget: 1.0,
            ..FunctionalState::default()
        };
        assert!(matches!(
            judge(&spent, StepResult::Calls, 0).ending,
            Some(Ending::Failed {
                reason: "BudgetExhausted",
                ..
            })
        ));

        let waiting = judge(
            &FunctionalState::default(),
            StepResult::AwaitingApproval { tool: "restart" },
            0,
        );
        assert_eq!(
            (waiting.verdict, waiting.ending),
            (Verdict::Escalate, Some(Ending::Paused))
        );
        assert_eq!(
            judge(&FunctionalState::default(), StepResult::Calls, 0).verdict,
            Verdict::Continue
        );
    }
}
