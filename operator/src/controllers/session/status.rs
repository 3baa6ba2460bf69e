//! A Session's status as the controller changes it: an [`Update`] names the fields a step
//! sets or clears, and [`Update::apply`] lays it over what is there (pure).

use contextos_crds::{
    conditions,
    session::{
        BudgetUsage, CheckpointRef, PendingApproval, PinnedRevisions, SessionPhase, SessionStatus,
        UnresolvedCallStatus,
    },
};
use contextos_runner::{gateway::approvals::RunProgress, run::pod::PodReport};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use crate::conditions::{Wanted, merge};

/// A change to one optional status field.
#[derive(Clone, Debug, Default)]
pub enum Change<T> {
    #[default]
    Keep,
    Set(T),
    Clear,
}

impl<T> Change<T> {
    fn apply_to(self, field: &mut Option<T>) {
        match self {
            Self::Keep => {}
            Self::Set(value) => *field = Some(value),
            Self::Clear => *field = None,
        }
    }
}

/// A status change for a Session, applied over what is there (see [`Update::apply`]).
#[derive(Clone, Debug, Default)]
pub struct Update {
    phase: Option<(SessionPhase, &'static str, String)>,
    attempt: Option<u32>,
    crashed_attempts: Option<(u32, u32)>,
    pinned: Option<PinnedRevisions>,
    run_id: Option<String>,
    pending: Change<PendingApproval>,
    unresolved: Change<UnresolvedCallStatus>,
    progress: Option<Progress>,
    completed: bool,
}

/// What an ended attempt says about the run so far.
#[derive(Clone, Debug)]
struct Progress {
    /// How far it got, as the gateway signed it.
    attested: Option<Attested>,
    /// A completion's output, which the gateway attested (see `observe_end`).
    output: Option<String>,
}

/// The progress fields the gateway's signature covers.
#[derive(Clone, Debug)]
struct Attested {
    steps: u32,
    budget_used: BudgetUsage,
    record_head: Option<String>,
    last_checkpoint: Option<CheckpointRef>,
}

impl Update {
    pub fn phase(phase: SessionPhase, reason: &'static str, message: impl Into<String>) -> Self {
        Self::default().with_phase(phase, reason, message)
    }

    pub fn with_phase(
        mut self,
        phase: SessionPhase,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        self.phase = Some((phase, reason, message.into()));
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    /// How many attempts have crashed so far, `attempt` the last of them (neither ever falls:
    /// see [`Update::apply`]).
    pub fn crashed_attempts(mut self, crashes: u32, attempt: u32) -> Self {
        self.crashed_attempts = Some((crashes, attempt));
        self
    }

    pub fn pinned(mut self, pinned: PinnedRevisions) -> Self {
        self.pinned = Some(pinned);
        self
    }

    pub fn run_id(mut self, run_id: String) -> Self {
        self.run_id = Some(run_id);
        self
    }

    pub fn pending(mut self, pending: Option<PendingApproval>) -> Self {
        if let Some(pending) = pending {
            self.pending = Change::Set(pending);
        }
        self
    }

    pub fn clear_pending(mut self) -> Self {
        self.pending = Change::Clear;
        self.unresolved = Change::Clear;
        self
    }

    pub fn unresolved(mut self, unresolved: Option<UnresolvedCallStatus>) -> Self {
        if let Some(unresolved) = unresolved {
            self.unresolved = Change::Set(unresolved);
        }
        self
    }

    pub fn completed(mut self) -> Self {
        self.completed = true;
        self
    }

    /// What `report` says of the run, its progress only as the gateway signed it (`progress`,
    /// verified for this run): a runner's own figures are its word, and people check a run's
    /// chain against the head its Session shows. The wall time is the runner's measure (the
    /// gateway bounds it by the RunContext's expiry).
    pub fn report(mut self, report: &PodReport, progress: Option<&RunProgress>) -> Self {
        self.run_id = Some(report.run_id.clone());
        self.progress = Some(Progress {
            attested: progress.map(|p| Attested {
                steps: p.steps,
                budget_used: BudgetUsage {
                    steps: p.steps,
                    tokens: p.tokens,
                    tool_calls: p.tool_calls,
                    wall_seconds: u32::try_from(report.usage.wall_ms / 1000).unwrap_or(u32::MAX),
                },
                record_head: p.head.clone(),
                last_checkpoint: p.checkpoint.as_ref().map(|(step, entry_hash)| CheckpointRef {
                    step: *step,
                    entry_hash: entry_hash.clone(),
                }),
            }),
            output: match report.outcome {
                contextos_runner::run::pod::ReportedOutcome::Completed => report.output.clone(),
                _ => None,
            },
        });
        self
    }

    /// The status after this change (pure): fields set or cleared, the Ready condition merged
    /// when the phase changes, start and completion times set once. Returns the Ready condition
    /// to announce, if the phase changed.
    pub fn apply(
        self,
        status: &mut SessionStatus,
        generation: Option<i64>,
        now: Timestamp,
    ) -> Option<Wanted> {
        let previous = status.conditions.clone();
        if let Some(attempt) = self.attempt {
            status.attempt = Some(attempt);
        }
        if let Some((crashes, attempt)) = self.crashed_attempts {
            status.crashed_attempts = Some(crashes.max(status.crashed_attempts.unwrap_or(0)));
            status.last_crashed_attempt = Some(attempt.max(status.last_crashed_attempt.unwrap_or(0)));
        }
        if let Some(pinned) = self.pinned {
            status.pinned = Some(pinned);
        }
        if let Some(run_id) = self.run_id {
            status.run_id = Some(run_id);
        }
        self.pending.apply_to(&mut status.pending_approval);
        self.unresolved.apply_to(&mut status.unresolved_call);
        if let Some(progress) = self.progress {
            // A report without them leaves what an earlier attempt showed. (One signed for this
            // attempt's pod is never behind what an earlier attempt's showed: the record only
            // grows. Figures an older operator took from a runner are replaced.)
            if let Some(attested) = progress.attested {
                status.steps = Some(attested.steps);
                status.budget_used = Some(attested.budget_used);
                if attested.record_head.is_some() {
                    status.record_head = attested.record_head;
                }
                if attested.last_checkpoint.is_some() {
                    status.last_checkpoint = attested.last_checkpoint;
                }
            }
            if progress.output.is_some() {
                status.output = progress.output;
            }
        }
        let mut announced = None;
        if let Some((phase, why, message)) = self.phase {
            let ready = Wanted::new(conditions::READY, phase == SessionPhase::Succeeded, why, message);
            status.phase = Some(phase);
            status.conditions = merge(&previous, std::slice::from_ref(&ready), generation, now);
            announced = Some(ready);
        }
        if status.start_time.is_none() {
            status.start_time = Some(Time(now));
        }
        if self.completed && status.completion_time.is_none() {
            status.completion_time = Some(Time(now));
        }
        status.observed_generation = generation;
        announced
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::conditions::reason;
    use serde_json::json;

    use super::*;

    /// A report whose own figures (the runner's word) differ from the gateway's.
    fn report() -> PodReport {
        serde_json::from_value(json!({
            "outcome": "completed", "runId": "r-1", "steps": 99,
            "usage": {"steps": 99, "tokens": 1, "tool_calls": 0, "wall_ms": 4500},
            "head": "forged", "output": null, "checkpoint": [9, "forged"],
        }))
        .expect("report")
    }

    fn progress(head: Option<&str>, checkpoint: Option<u32>) -> RunProgress {
        RunProgress {
            run_id: "r-1".into(),
            pod: "checkout-5xx-run-2".into(),
            pod_uid: "uid-2".into(),
            ended: false,
            head: head.map(str::to_owned),
            steps: 3,
            tokens: 120,
            tool_calls: 2,
            checkpoint: checkpoint.map(|step| (step, format!("h{step}"))),
        }
    }

    fn pending(hash: &str) -> PendingApproval {
        PendingApproval {
            call_hash: hash.into(),
            tool: "restart".into(),
            risk: contextos_crds::common::ToolRisk::Destructive,
            arguments: "{}".into(),
            rule: "p/r".into(),
            reason: "why".into(),
            approvers: Default::default(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    fn ready(status: &SessionStatus) -> Option<(&str, &str)> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    /// Each row: the status before, the change, and what must hold after.
    #[test]
    fn status_changes_apply_field_by_field() {
        type Check = fn(&SessionStatus, Option<&Wanted>);
        let running = || Update::phase(SessionPhase::Running, reason::RUNNING, "pod started");
        let rows: Vec<(&str, SessionStatus, Update, Check)> = vec![
            (
                "a report sets progress, budget, head and checkpoint as the gateway signed them",
                SessionStatus::default(),
                Update::default().report(&report(), Some(&progress(Some("abc"), Some(2)))),
                |s, announced| {
                    assert_eq!(s.run_id.as_deref(), Some("r-1"));
                    assert_eq!(s.steps, Some(3));
                    let used = s.budget_used.clone().expect("budget");
                    assert_eq!(
                        (used.steps, used.tokens, used.tool_calls, used.wall_seconds),
                        (3, 120, 2, 4)
                    );
                    assert_eq!(s.record_head.as_deref(), Some("abc"));
                    assert_eq!(
                        s.last_checkpoint
                            .as_ref()
                            .map(|c| (c.step, c.entry_hash.as_str())),
                        Some((2, "h2"))
                    );
                    assert!(
                        announced.is_none() && s.conditions.is_empty(),
                        "no phase, no condition"
                    );
                },
            ),
            (
                "a later report without head or checkpoint keeps the earlier ones",
                SessionStatus {
                    record_head: Some("old".into()),
                    last_checkpoint: Some(CheckpointRef {
                        step: 1,
                        entry_hash: "h1".into(),
                    }),
                    ..Default::default()
                },
                Update::default().report(&report(), Some(&progress(None, None))),
                |s, _| {
                    assert_eq!(s.record_head.as_deref(), Some("old"));
                    assert_eq!(s.last_checkpoint.as_ref().map(|c| c.step), Some(1));
                },
            ),
            (
                "a signed progress replaces figures an older operator took from a runner",
                SessionStatus {
                    steps: Some(u32::MAX),
                    record_head: Some("forged".into()),
                    ..Default::default()
                },
                Update::default().report(&report(), Some(&progress(Some("abc"), None))),
                |s, _| {
                    assert_eq!((s.steps, s.record_head.as_deref()), (Some(3), Some("abc")));
                },
            ),
            (
                "a report without the gateway's signed progress shows none of its own figures",
                SessionStatus {
                    steps: Some(2),
                    record_head: Some("old".into()),
                    ..Default::default()
                },
                Update::default().report(&report(), None),
                |s, _| {
                    assert_eq!(s.run_id.as_deref(), Some("r-1"));
                    assert_eq!(
                        (s.steps, s.record_head.as_deref(), s.budget_used.as_ref()),
                        (Some(2), Some("old"), None)
                    );
                    assert!(s.last_checkpoint.is_none());
                },
            ),
            (
                "a new attempt clears what waited for a human and pins its revisions",
                SessionStatus {
                    pending_approval: Some(pending("h")),
                    unresolved_call: Some(UnresolvedCallStatus {
                        call_id: "1.0".into(),
                        tool: "t".into(),
                        arguments: String::new(),
                        reason: String::new(),
                        for_call: None,
                    }),
                    ..Default::default()
                },
                running()
                    .attempt(2)
                    .pinned(PinnedRevisions::default())
                    .clear_pending(),
                |s, announced| {
                    assert!(s.pending_approval.is_none() && s.unresolved_call.is_none());
                    assert_eq!(s.attempt, Some(2));
                    assert!(s.pinned.is_some());
                    assert_eq!(s.phase, Some(SessionPhase::Running));
                    assert_eq!(ready(s), Some(("False", reason::RUNNING)));
                    assert!(announced.is_some());
                },
            ),
            (
                "the crash count and its last attempt never fall",
                SessionStatus {
                    crashed_attempts: Some(2),
                    last_crashed_attempt: Some(3),
                    ..Default::default()
                },
                running().attempt(4).crashed_attempts(1, 2),
                |s, _| {
                    assert_eq!(
                        (s.attempt, s.crashed_attempts, s.last_crashed_attempt),
                        (Some(4), Some(2), Some(3))
                    );
                },
            ),
            (
                "an approval request is shown; no request leaves the field as it was",
                SessionStatus::default(),
                Update::default().pending(Some(pending("h2"))).unresolved(None),
                |s, _| {
                    assert_eq!(
                        s.pending_approval.as_ref().map(|p| p.call_hash.as_str()),
                        Some("h2")
                    );
                    assert!(s.unresolved_call.is_none());
                },
            ),
            (
                "success completes once and is Ready",
                SessionStatus::default(),
                Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "done").completed(),
                |s, _| {
                    assert_eq!(ready(s), Some(("True", reason::SUCCEEDED)));
                    assert!(s.completion_time.is_some() && s.start_time.is_some());
                },
            ),
        ];
        for (name, mut status, update, check) in rows {
            let announced = update.apply(&mut status, Some(4), at(1_000));
            assert_eq!(status.observed_generation, Some(4), "{name}");
            check(&status, announced.as_ref());
        }
    }

    #[test]
    fn start_and_completion_times_are_set_once() {
        let mut status = SessionStatus::default();
        Update::phase(SessionPhase::Running, reason::RUNNING, "a").apply(&mut status, None, at(10));
        Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "b")
            .completed()
            .apply(&mut status, None, at(20));
        Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "b")
            .completed()
            .apply(&mut status, None, at(30));
        assert_eq!(status.start_time, Some(Time(at(10))));
        assert_eq!(status.completion_time, Some(Time(at(20))));
    }
}
