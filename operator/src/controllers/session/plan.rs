//! What a Session needs next, decided from what was observed of it — no API calls here. The
//! controller fetches an [`Observed`], asks [`plan`] (or [`held`] / [`cancelled`] before a run
//! bundle exists) for the [`Step`], and applies it.

use std::time::Duration;

use contextos_crds::{
    Session,
    common::Approvers,
    conditions::reason,
    session::{PendingApproval, SessionPhase, UnresolvedCallStatus},
};
use contextos_runner::{
    gateway::approvals::ApprovalRequest,
    run::{
        bundle::RunBundle,
        checkpoint::{AwaitingApproval, UnresolvedCall},
        pod::{PodReport, ReportedOutcome},
    },
};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;

use contextos_runner::gateway::approvals::RunProgress;

use super::status::Update;
use crate::{controllers::Invalid, crash::CrashCause};

/// How long a Session whose report cannot be shown, or whose bundle was planted, waits before
/// it looks again (nothing it watches changes when that is fixed).
pub const RECHECK_UNSHOWABLE: Duration = Duration::from_secs(30);
pub const RECHECK_UNTRUSTED: Duration = Duration::from_secs(15);

/// What was observed of a Session whose run bundle is pinned.
pub struct Observed<'a> {
    pub session: &'a Session,
    pub bundle: &'a RunBundle,
    /// The attempt the status names (1 before any).
    pub attempt: u32,
    pub pod: &'a AttemptPod,
    /// Attempts allowed to end without a report before the Session fails.
    pub max_crash_attempts: u32,
    pub now: Timestamp,
}

/// The current attempt's pod, as far as the decision needs it.
#[derive(Debug)]
pub enum AttemptPod {
    Missing,
    /// A pod with the attempt's name that this Session does not own (an earlier Session's
    /// of the same name, not yet garbage-collected).
    Foreign {
        name: String,
    },
    /// Created and not ended; `phase` is the pod's.
    Live {
        name: String,
        phase: String,
    },
    Ended(Box<Ended>),
}

/// An attempt's pod that has ended (Succeeded or Failed).
#[derive(Debug)]
pub struct Ended {
    pub name: String,
    /// The pod's uid (a signed progress names the pod that asked).
    pub uid: String,
    /// Its termination message, if that is a whole report.
    pub report: Option<PodReport>,
    /// Whether the gateway signed what the report relays for people (the approval request, or
    /// the call whose outcome is unknown), when it relays one; the error says why not.
    pub attestation: Option<Result<(), String>>,
    /// How far the run got, as the gateway signed it for this run (the report's relay,
    /// verified); `None` when the report carries none that verifies.
    pub progress: Option<RunProgress>,
    /// The annotation saying which decision or finding this attempt was started for.
    pub resumed_for: Option<String>,
    pub finished_at: Option<Timestamp>,
    pub cause: CrashCause,
    /// Attempts of the Session that ended without a report, this one included; counted only
    /// when this one has none (see `observe_end`).
    pub crashes: u32,
    /// Whether the Session's status already counts this attempt's crash.
    pub crash_counted: bool,
}

/// Why the previous attempt ended (it crashed), and how many attempts have crashed so far.
#[derive(Debug, PartialEq, Eq)]
pub struct AfterCrash {
    pub why: String,
    pub crashes: u32,
}

/// What the controller does next.
#[derive(Debug)]
pub enum Step {
    /// A pod of an earlier Session holds the attempt's name: an error, retried with backoff.
    WaitForForeignPod { name: String },
    /// Start this attempt: a pod with a fresh RunContext.
    Start {
        attempt: u32,
        /// The decision (call hash) or finding (`resolution/<call id>`) it is started for.
        resumed_for: Option<String>,
        /// Why the previous attempt ended, when it crashed.
        after_crash: Option<AfterCrash>,
    },
    /// Write the status, then wait for a change (or look again after `recheck`).
    Report {
        update: Box<Update>,
        recheck: Option<Duration>,
    },
    /// Nothing to write yet; look again after this long (a crashed attempt's backoff).
    Wait(Duration),
    /// Delete the running attempt's pod, if any, and end `Cancelled`.
    Cancel { stop: Option<String> },
}

/// The step for a Session whose run bundle cannot be pinned.
pub fn held(invalid: &Invalid) -> Step {
    // An override that loosens the agent's limits can never become valid: the spec is
    // immutable. Anything else (a missing or unready reference) may be fixed later.
    // Nor can a started run's lost bundle come back.
    let phase = if invalid.reason == reason::OVERRIDE_LOOSENS || invalid.reason == reason::BUNDLE_LOST {
        SessionPhase::Failed
    } else {
        SessionPhase::Pending
    };
    let update = Update::phase(phase, invalid.reason, invalid.message.clone());
    Step::Report {
        update: Box::new(if phase.is_terminal() {
            update.completed()
        } else {
            update
        }),
        // Sessions do not watch ConfigMaps: look again for the planted one's removal.
        recheck: (invalid.reason == reason::UNTRUSTED_CHILD).then_some(RECHECK_UNTRUSTED),
    }
}

/// The step for a Session whose spec says cancel.
pub fn cancelled(pod: &AttemptPod) -> Step {
    Step::Cancel {
        stop: match pod {
            AttemptPod::Live { name, phase } if phase == "Running" || phase == "Pending" => {
                Some(name.clone())
            }
            _ => None,
        },
    }
}

/// The step for a pinned Session that is neither finished nor cancelled.
pub fn plan(observed: &Observed) -> Step {
    match observed.pod {
        AttemptPod::Missing => missing(observed),
        AttemptPod::Foreign { name } => Step::WaitForForeignPod { name: name.clone() },
        AttemptPod::Live { name, phase } => Step::Report {
            update: Box::new(
                Update::phase(
                    SessionPhase::Running,
                    reason::RUNNING,
                    format!("runner pod {name} is {phase}"),
                )
                .attempt(observed.attempt),
            ),
            recheck: None,
        },
        AttemptPod::Ended(ended) => after(observed, ended),
    }
}

/// The attempt's pod is not there: it is started — unless its crash was counted already (the
/// pod was deleted after it ended without a report), when the next attempt starts, or the
/// Session fails if that was the last one allowed. A pod deleted before the operator saw it
/// end is started again, as a pod taken away from a drained node is.
fn missing(observed: &Observed) -> Step {
    let status = observed.session.status.as_ref();
    if status.and_then(|s| s.last_crashed_attempt) != Some(observed.attempt) {
        return Step::Start {
            attempt: observed.attempt,
            resumed_for: None,
            after_crash: None,
        };
    }
    let crashes = status.and_then(|s| s.crashed_attempts).unwrap_or(1);
    let name = crate::session_children::pod_name(&observed.session.name_any(), observed.attempt);
    let ended_how = format!("pod {name} ended without a report and was deleted");
    if crashes >= observed.max_crash_attempts {
        return exhausted(observed, crashes, &ended_how);
    }
    after_crashes(observed, crashes, &ended_how)
}

/// The attempt after this one, which ended as `ended_how` said, `crashes` attempts having
/// crashed: it resumes from the last checkpoint.
fn after_crashes(observed: &Observed, crashes: u32, ended_how: &str) -> Step {
    Step::Start {
        attempt: observed.attempt + 1,
        resumed_for: None,
        after_crash: Some(AfterCrash {
            why: format!("{ended_how}; resuming from the last checkpoint"),
            crashes,
        }),
    }
}

/// An attempt's pod has ended: what it reported decides what comes next.
fn after(observed: &Observed, ended: &Ended) -> Step {
    let Some(report) = &ended.report else {
        return after_crash(observed, ended);
    };
    let update = Update::default()
        .attempt(observed.attempt)
        .report(report, ended.progress.as_ref());
    let done = |update: Update| Step::Report {
        update: Box::new(update.completed()),
        recheck: None,
    };
    match report.outcome {
        ReportedOutcome::Completed => done(update.with_phase(
            SessionPhase::Succeeded,
            reason::SUCCEEDED,
            "the run completed and its output passed validation",
        )),
        ReportedOutcome::Failed => done(update.with_phase(
            SessionPhase::Failed,
            // A quota's refusal is its own condition, so alerts and `kubectl wait` can tell it
            // from a run that went wrong.
            if report.reason.as_deref() == Some(reason::QUOTA_EXCEEDED) {
                reason::QUOTA_EXCEEDED
            } else {
                reason::RUN_FAILED
            },
            format!(
                "{}: {}",
                report.reason.as_deref().unwrap_or_default(),
                report.message.as_deref().unwrap_or_default()
            ),
        )),
        ReportedOutcome::AwaitingApproval => awaiting_approval(observed, ended, report, update),
        ReportedOutcome::AwaitingResolution => awaiting_resolution(observed, ended, report, update),
    }
}

fn awaiting_approval(observed: &Observed, ended: &Ended, report: &PodReport, update: Update) -> Step {
    // What the runner relays is shown to approvers (and checked by admission) only if the
    // gateway signed it: a runner cannot choose who may approve which call.
    if let Some(Err(why)) = &ended.attestation {
        return unshowable(
            update,
            SessionPhase::AwaitingApproval,
            reason::AWAITING_APPROVAL,
            format!("a call waits for approval, but its request cannot be shown: {why}"),
        );
    }
    let awaiting = report.awaiting.as_ref();
    let decided = awaiting.is_some_and(|a| {
        observed
            .session
            .spec
            .approvals
            .iter()
            .any(|d| d.call_hash == a.call_hash && approver_allowed(&d.approver, &a.approvers))
    });
    // An attempt started for this very decision that waits for it again: the gateway did not
    // accept the decision (see the record). Starting yet another attempt would loop; a new
    // decision is needed.
    let refused = awaiting.is_some_and(|a| ended.resumed_for.as_deref() == Some(a.call_hash.as_str()));
    if let Some(a) = awaiting
        && decided
        && !refused
    {
        return resumed(observed, update, a.call_hash.clone());
    }
    let message = awaiting.map_or_else(String::new, |a| {
        let refusal = if refused {
            "the decision in spec.approvals was not accepted by the gateway (see the run's record); "
        } else {
            ""
        };
        format!(
            "{refusal}{} needs approval ({}): {}; add {{callHash: {}, decision: approve|reject, approver: <you>}} to spec.approvals",
            a.tool,
            a.rule,
            ApprovalRequest::shown_reason(&a.reason),
            a.call_hash
        )
    });
    Step::Report {
        update: Box::new(
            update
                .with_phase(SessionPhase::AwaitingApproval, reason::AWAITING_APPROVAL, message)
                .pending(awaiting.map(|a| pending_approval(observed.bundle, a))),
        ),
        recheck: None,
    }
}

fn awaiting_resolution(observed: &Observed, ended: &Ended, report: &PodReport, update: Update) -> Step {
    // Shown to people (and checked by admission) only as the gateway signed it.
    if let Some(Err(why)) = &ended.attestation {
        return unshowable(
            update,
            SessionPhase::AwaitingResolution,
            reason::AWAITING_RESOLUTION,
            format!("a call's outcome is unknown, but the report of it cannot be shown: {why}"),
        );
    }
    let unresolved = report.unresolved.as_ref();
    let marker = unresolved.map(|u| format!("resolution/{}", u.call_id));
    let resolved = unresolved.is_some_and(|u| {
        observed
            .session
            .spec
            .resolutions
            .iter()
            .any(|r| r.call_id == u.call_id)
    });
    // An attempt started for this very finding that waits for it again: the gateway did not
    // accept it (see the record); another attempt would loop.
    let refused = marker.is_some() && ended.resumed_for == marker;
    if resolved
        && !refused
        && let Some(marker) = marker
    {
        return resumed(observed, update, marker);
    }
    let message = unresolved.map_or_else(String::new, |u| {
        let refusal = if refused {
            "the finding in spec.resolutions was not accepted by the gateway (see the run's record); "
        } else {
            ""
        };
        match &u.for_call {
            Some(call) => format!(
                "{refusal}{} (call {call}) waits on a person: {}; add {{callId: {}, outcome: answered, resolver: <you>, note: <your answer>}} to spec.resolutions, or outcome did_not_act to decline",
                u.tool, u.reason, u.call_id
            ),
            None => format!(
                "{refusal}the outcome of {} (call {}) is unknown: {}; once you know whether it acted, add {{callId: {}, outcome: acted|did_not_act, resolver: <you>, note: <what you found>}} to spec.resolutions",
                u.tool, u.call_id, u.reason, u.call_id
            ),
        }
    });
    Step::Report {
        update: Box::new(
            update
                .with_phase(
                    SessionPhase::AwaitingResolution,
                    reason::AWAITING_RESOLUTION,
                    message,
                )
                .unresolved(unresolved.map(unresolved_status)),
        ),
        recheck: None,
    }
}

/// A report relays something for people that the gateway did not sign: the Session waits
/// without showing it (nor what an earlier attempt showed), and looks again later.
fn unshowable(update: Update, phase: SessionPhase, why: &'static str, message: String) -> Step {
    Step::Report {
        update: Box::new(update.with_phase(phase, why, message).clear_pending()),
        recheck: Some(RECHECK_UNSHOWABLE),
    }
}

/// The attempt ended without a report (killed, evicted, out of memory, past its deadline):
/// retry from the last checkpoint, with backoff, up to the bound.
fn after_crash(observed: &Observed, ended: &Ended) -> Step {
    let ended_how = format!("pod {} {}", ended.name, ended.cause);
    if ended.crashes >= observed.max_crash_attempts {
        return exhausted(observed, ended.crashes, &ended_how);
    }
    let backoff = crash_backoff(ended.crashes);
    // Counted before anything else (the backoff, a quota's wait, a refused pod): from then on
    // deleting the pod does not take the crash back.
    if !ended.crash_counted {
        return Step::Report {
            update: Box::new(
                Update::default()
                    .attempt(observed.attempt)
                    .crashed_attempts(ended.crashes, observed.attempt),
            ),
            recheck: Some(backoff),
        };
    }
    let waited = ended
        .finished_at
        .is_none_or(|t| observed.now.duration_since(t).as_secs() >= backoff.as_secs() as i64);
    if !waited {
        return Step::Wait(backoff);
    }
    after_crashes(observed, ended.crashes, &ended_how)
}

/// The Session fails: `crashes` attempts ended without a result, the last as `ended_how` says.
fn exhausted(observed: &Observed, crashes: u32, ended_how: &str) -> Step {
    Step::Report {
        update: Box::new(
            Update::default()
                .attempt(observed.attempt)
                .crashed_attempts(crashes, observed.attempt)
                .with_phase(
                    SessionPhase::Failed,
                    reason::ATTEMPTS_EXHAUSTED,
                    format!(
                        "{crashes} runner attempts ended without a result; the last: {ended_how}; see its events and logs"
                    ),
                )
                .completed(),
        ),
        recheck: None,
    }
}

/// The next attempt, started for a decision a person gave (a call hash, or
/// `resolution/<call id>`) — unless the Session has had as many attempts as its decisions and
/// crashes allow: its first, one per approval or finding in its spec, one per crash allowed.
/// The gateway signs what a runner relays, but a runner keeps those signatures: relaying two
/// decided calls in turn, each attempt for the other one's, would start attempts without end.
fn resumed(observed: &Observed, update: Update, decision: String) -> Step {
    let spec = &observed.session.spec;
    let decisions = u32::try_from(spec.approvals.len() + spec.resolutions.len()).unwrap_or(u32::MAX);
    let allowed = decisions
        .saturating_add(observed.max_crash_attempts)
        .saturating_add(1);
    if observed.attempt >= allowed {
        return Step::Report {
            update: Box::new(
                update
                    .with_phase(
                        SessionPhase::Failed,
                        reason::ATTEMPTS_EXHAUSTED,
                        format!(
                            "attempt {} would be more than the Session's {decisions} decision(s) and {} crash(es) allow: its runner asked again for decisions already acted on",
                            observed.attempt + 1,
                            observed.max_crash_attempts
                        ),
                    )
                    .completed(),
            ),
            recheck: None,
        };
    }
    Step::Start {
        attempt: observed.attempt + 1,
        resumed_for: Some(decision),
        after_crash: None,
    }
}

/// 2^crashes seconds, at most 64 s.
fn crash_backoff(crashes: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(crashes.min(6)))
}

/// Whether `approver` may decide (a listed user; group membership is checked by who may patch
/// the Session, and admission checks the approver is the user making the change).
fn approver_allowed(approver: &str, approvers: &Approvers) -> bool {
    approvers.users.iter().any(|u| u == approver) || !approvers.groups.is_empty()
}

fn pending_approval(bundle: &RunBundle, awaiting: &AwaitingApproval) -> PendingApproval {
    let risk = bundle
        .agent_spec
        .tools
        .iter()
        .find(|t| t.name == awaiting.tool)
        .map(|t| t.risk)
        // The gateway asks approval only for the Agent's own tools; never seen otherwise.
        .unwrap_or(contextos_crds::common::ToolRisk::ReadOnly);
    // Arguments the report had to cut were signed only as a digest: show none of them rather
    // than text the signature does not cover. Otherwise cut on a character boundary.
    let arguments: String = if awaiting.arguments_digest.is_some() {
        "(too long for the report; see the run's record)".into()
    } else {
        awaiting.arguments.to_string().chars().take(4096).collect()
    };
    PendingApproval {
        call_hash: awaiting.call_hash.clone(),
        tool: awaiting.tool.clone(),
        risk,
        arguments,
        rule: awaiting.rule.clone(),
        // What the gateway signed: text past it is the runner's.
        reason: ApprovalRequest::shown_reason(&awaiting.reason),
        approvers: awaiting.approvers.clone(),
    }
}

fn unresolved_status(unresolved: &UnresolvedCall) -> UnresolvedCallStatus {
    // Cut to fit the report, the arguments are signed by their digest only: what the runner
    // shows of them is not shown on (as for a pending approval).
    let arguments = if unresolved.arguments_digest.is_some() {
        "(too long for the report; see the run's record)".into()
    } else {
        unresolved.arguments.to_string().chars().take(4096).collect()
    };
    UnresolvedCallStatus {
        call_id: unresolved.call_id.clone(),
        tool: unresolved.tool.clone(),
        arguments,
        reason: unresolved.reason.clone(),
        for_call: unresolved.for_call.clone(),
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::session::{SessionSpec, SessionStatus};
    use serde_json::json;

    use super::*;
    use crate::fixtures::{run_bundle, session};

    const HASH: &str = "c0ffee";
    const CALL: &str = "3.0";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    fn report(outcome: &str) -> PodReport {
        serde_json::from_value(json!({
            "outcome": outcome, "runId": "r-1", "steps": 3,
            "usage": {"steps": 3, "tokens": 120, "tool_calls": 2, "wall_ms": 4500},
            "head": "abc", "output": "done", "reason": "ValidatorFailed", "message": "no service named",
            "awaiting": {
                "call_id": "2.0", "call_hash": HASH, "tool": "restart_deployment",
                "arguments": {"name": "checkout-api"}, "rule": "oncall/approve-destructive",
                "reason": "destructive", "approvers": {"users": ["dana@example.com"]},
                "attestation": "sig",
            },
            "unresolved": {
                "call_id": CALL, "tool": "post_status_update", "arguments": {"text": "x"},
                "reason": "timed out after sending", "attestation": "sig",
            },
        }))
        .expect("report")
    }

    fn ended(report: Option<PodReport>) -> Ended {
        Ended {
            name: "checkout-5xx-run-2".into(),
            uid: "uid-2".into(),
            report,
            attestation: Some(Ok(())),
            progress: None,
            resumed_for: None,
            finished_at: Some(at(1_000)),
            cause: CrashCause::Unknown,
            crashes: 0,
            crash_counted: false,
        }
    }

    /// The status a step's update leaves on one that still shows an earlier attempt's approval
    /// request and unknown call.
    fn status_of(step: &Step) -> SessionStatus {
        let Step::Report { update, .. } = step else {
            panic!("expected a status report, got {step:?}");
        };
        let mut status = SessionStatus {
            pending_approval: Some(PendingApproval {
                call_hash: "earlier".into(),
                tool: "restart_deployment".into(),
                risk: contextos_crds::common::ToolRisk::Destructive,
                arguments: "{}".into(),
                rule: "oncall/approve-destructive".into(),
                reason: "destructive".into(),
                approvers: Default::default(),
            }),
            unresolved_call: Some(UnresolvedCallStatus {
                call_id: "1.0".into(),
                tool: "post_status_update".into(),
                arguments: "{}".into(),
                reason: "earlier".into(),
                for_call: None,
            }),
            ..Default::default()
        };
        let update: Update = (**update).clone();
        update.apply(&mut status, Some(1), at(2_000));
        status
    }

    fn ready(status: &SessionStatus) -> (String, String, String) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == contextos_crds::conditions::READY)
            .expect("Ready");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn approved_by(approver: &str) -> SessionSpec {
        let mut spec = session().spec;
        spec.approvals = serde_json::from_value(json!([{
            "callHash": HASH, "decision": "approve", "approver": approver,
        }]))
        .expect("approvals");
        spec
    }

    fn resolved() -> SessionSpec {
        let mut spec = session().spec;
        spec.resolutions = serde_json::from_value(json!([{
            "callId": CALL, "outcome": "did_not_act", "resolver": "dana@example.com", "note": "checked",
        }]))
        .expect("resolutions");
        spec
    }

    /// Each row: a name, the Session's spec, the attempt's pod, and what the step must be.
    #[test]
    fn the_next_step_follows_from_what_was_observed() {
        type Check = fn(&Step);
        let crashed = |crashes: u32, finished: i64| {
            let mut e = ended(None);
            e.crashes = crashes;
            e.crash_counted = true;
            e.finished_at = Some(at(finished));
            e.cause = CrashCause::Unknown;
            AttemptPod::Ended(Box::new(e))
        };
        let with = |outcome: &str, change: fn(&mut Ended)| {
            let mut e = ended(Some(report(outcome)));
            change(&mut e);
            AttemptPod::Ended(Box::new(e))
        };
        let rows: Vec<(&str, SessionSpec, AttemptPod, Check)> = vec![
            (
                "no pod yet: start the attempt the status names",
                session().spec,
                AttemptPod::Missing,
                |step| {
                    assert!(
                        matches!(
                            step,
                            Step::Start {
                                attempt: 2,
                                resumed_for: None,
                                after_crash: None
                            }
                        ),
                        "{step:?}"
                    );
                },
            ),
            (
                "an earlier Session's pod holds the name: wait for it",
                session().spec,
                AttemptPod::Foreign {
                    name: "checkout-5xx-run-2".into(),
                },
                |step| assert!(matches!(step, Step::WaitForForeignPod { .. }), "{step:?}"),
            ),
            (
                "a live pod: Running, naming the pod's phase",
                session().spec,
                AttemptPod::Live {
                    name: "checkout-5xx-run-2".into(),
                    phase: "Pending".into(),
                },
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::Running));
                    assert_eq!(status.attempt, Some(2));
                    assert!(ready(&status).2.contains("checkout-5xx-run-2 is Pending"));
                    assert!(status.completion_time.is_none());
                },
            ),
            (
                "completed: Succeeded and Ready, with its output and progress (as the gateway signed it)",
                session().spec,
                with("completed", |e| {
                    e.progress = Some(RunProgress {
                        run_id: "r-1".into(),
                        pod: "checkout-5xx-run-2".into(),
                        pod_uid: "uid-2".into(),
                        ended: true,
                        head: Some("abc".into()),
                        steps: 3,
                        tokens: 40,
                        tool_calls: 2,
                        checkpoint: None,
                    });
                }),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::Succeeded));
                    assert_eq!(ready(&status).0, "True");
                    assert_eq!(status.output.as_deref(), Some("done"));
                    assert_eq!(status.record_head.as_deref(), Some("abc"));
                    assert!(status.completion_time.is_some());
                },
            ),
            (
                "failed: Failed, with the run's reason and message",
                session().spec,
                with("failed", |_| {}),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::Failed));
                    let (ok, why, message) = ready(&status);
                    assert_eq!((ok.as_str(), why.as_str()), ("False", reason::RUN_FAILED));
                    assert_eq!(message, "ValidatorFailed: no service named");
                    assert!(status.completion_time.is_some());
                },
            ),
            (
                "awaiting approval, undecided: the request is shown with the tool's risk",
                session().spec,
                with("awaiting_approval", |_| {}),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::AwaitingApproval));
                    let pending = status.pending_approval.clone().expect("pending");
                    assert_eq!(pending.call_hash, HASH);
                    assert_eq!(pending.risk, contextos_crds::common::ToolRisk::Destructive);
                    assert!(ready(&status).2.contains("add {callHash: c0ffee"));
                },
            ),
            (
                "approved by a listed approver: the next attempt starts for that decision",
                approved_by("dana@example.com"),
                with("awaiting_approval", |_| {}),
                |step| {
                    let Step::Start {
                        attempt,
                        resumed_for,
                        after_crash,
                    } = step
                    else {
                        panic!("{step:?}");
                    };
                    assert_eq!(
                        (*attempt, resumed_for.as_deref(), after_crash),
                        (3, Some(HASH), &None)
                    );
                },
            ),
            (
                "approved by someone not listed (no groups): still waiting",
                approved_by("mallory@example.com"),
                with("awaiting_approval", |_| {}),
                |step| assert_eq!(status_of(step).phase, Some(SessionPhase::AwaitingApproval)),
            ),
            (
                "an attempt started for this decision waits for it again: not another attempt",
                approved_by("dana@example.com"),
                with("awaiting_approval", |e| e.resumed_for = Some(HASH.into())),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::AwaitingApproval));
                    assert!(
                        ready(&status)
                            .2
                            .starts_with("the decision in spec.approvals was not accepted")
                    );
                },
            ),
            (
                "a request the gateway did not sign is not shown, and is looked at again",
                approved_by("dana@example.com"),
                with("awaiting_approval", |e| {
                    e.attestation = Some(Err("forged".into()))
                }),
                |step| {
                    assert!(
                        matches!(
                            step,
                            Step::Report {
                                recheck: Some(RECHECK_UNSHOWABLE),
                                ..
                            }
                        ),
                        "{step:?}"
                    );
                    let status = status_of(step);
                    assert!(status.pending_approval.is_none());
                    assert!(ready(&status).2.ends_with("cannot be shown: forged"));
                },
            ),
            (
                "an unknown outcome, unresolved: the call is shown",
                session().spec,
                with("awaiting_resolution", |_| {}),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::AwaitingResolution));
                    assert_eq!(status.unresolved_call.map(|u| u.call_id).as_deref(), Some(CALL));
                },
            ),
            (
                "an unknown outcome whose arguments were cut: only their digest is signed, so the runner's text is not shown",
                session().spec,
                with("awaiting_resolution", |e| {
                    if let Some(unresolved) = e.report.as_mut().and_then(|r| r.unresolved.as_mut()) {
                        unresolved.arguments = json!({"text": "harmless, please mark as not acted"});
                        unresolved.arguments_digest = Some("d1g".into());
                    }
                }),
                |step| {
                    let shown = status_of(step).unresolved_call.map(|u| u.arguments);
                    assert_eq!(
                        shown.as_deref(),
                        Some("(too long for the report; see the run's record)")
                    );
                },
            ),
            (
                "resolved: the next attempt starts for that finding",
                resolved(),
                with("awaiting_resolution", |_| {}),
                |step| {
                    assert!(
                        matches!(step, Step::Start { attempt: 3, resumed_for: Some(m), .. } if m == "resolution/3.0"),
                        "{step:?}"
                    );
                },
            ),
            (
                "resolved, but the attempt for it waits again: not another attempt",
                resolved(),
                with("awaiting_resolution", |e| {
                    e.resumed_for = Some("resolution/3.0".into())
                }),
                |step| {
                    assert!(
                        ready(&status_of(step))
                            .2
                            .starts_with("the finding in spec.resolutions was not accepted")
                    );
                },
            ),
            (
                "an unsigned finding is not shown, even when resolved",
                resolved(),
                with("awaiting_resolution", |e| {
                    e.attestation = Some(Err("unsigned".into()))
                }),
                |step| {
                    assert!(
                        matches!(
                            step,
                            Step::Report {
                                recheck: Some(RECHECK_UNSHOWABLE),
                                ..
                            }
                        ),
                        "{step:?}"
                    );
                    assert!(status_of(step).unresolved_call.is_none());
                },
            ),
            (
                "crashed once, its backoff (2 s) past: resume from the checkpoint",
                session().spec,
                crashed(1, 1_000),
                |step| {
                    let Step::Start {
                        attempt: 3,
                        resumed_for: None,
                        after_crash: Some(AfterCrash { why, crashes: 1 }),
                    } = step
                    else {
                        panic!("{step:?}");
                    };
                    assert!(
                        why.starts_with("pod checkout-5xx-run-2 ")
                            && why.ends_with("resuming from the last checkpoint"),
                        "{why}"
                    );
                },
            ),
            (
                "crashed, not counted yet: the count is written before the backoff",
                session().spec,
                {
                    let mut e = ended(None);
                    e.crashes = 1;
                    AttemptPod::Ended(Box::new(e))
                },
                |step| {
                    assert!(
                        matches!(step, Step::Report { recheck: Some(d), .. } if *d == Duration::from_secs(2)),
                        "{step:?}"
                    );
                    let status = status_of(step);
                    assert_eq!(
                        (status.crashed_attempts, status.last_crashed_attempt),
                        (Some(1), Some(2))
                    );
                },
            ),
            (
                "crashed three times, 5 s ago: wait out the 8 s backoff",
                session().spec,
                crashed(3, 1_995),
                |step| {
                    assert!(
                        matches!(step, Step::Wait(d) if *d == Duration::from_secs(8)),
                        "{step:?}"
                    )
                },
            ),
            (
                "crashed as often as allowed: Failed, naming the last cause",
                session().spec,
                crashed(4, 1_000),
                |step| {
                    let status = status_of(step);
                    assert_eq!(status.phase, Some(SessionPhase::Failed));
                    let (_, why, message) = ready(&status);
                    assert_eq!(why, reason::ATTEMPTS_EXHAUSTED);
                    assert!(
                        message.starts_with("4 runner attempts ended without a result"),
                        "{message}"
                    );
                },
            ),
        ];
        let bundle = run_bundle(&session());
        for (name, spec, pod, check) in rows {
            let mut session = session();
            session.spec = spec;
            let step = plan(&Observed {
                session: &session,
                bundle: &bundle,
                attempt: 2,
                pod: &pod,
                max_crash_attempts: 4,
                now: at(2_000),
            });
            eprintln!("{name}: {step:?}");
            check(&step);
        }
    }

    /// A runner keeps the gateway's signatures of what it relayed: relaying two decided calls
    /// in turn would start attempts without end. A Session has at most its first attempt, one
    /// per decision in its spec and one per crash allowed.
    #[test]
    fn decisions_relayed_again_and_again_do_not_start_attempts_without_end() {
        let bundle = run_bundle(&session());
        let mut session = session();
        session.spec = approved_by("dana@example.com");
        let pod = AttemptPod::Ended(Box::new(ended(Some(report("awaiting_approval")))));
        let at_attempt = |attempt: u32| {
            plan(&Observed {
                session: &session,
                bundle: &bundle,
                attempt,
                pod: &pod,
                max_crash_attempts: 4,
                now: at(2_000),
            })
        };
        // One decision and four crashes allowed: attempts 2 to 6 may follow the first.
        assert!(
            matches!(at_attempt(5), Step::Start { attempt: 6, .. }),
            "{:?}",
            at_attempt(5)
        );
        let step = at_attempt(6);
        let status = status_of(&step);
        assert_eq!(status.phase, Some(SessionPhase::Failed));
        let (_, why, message) = ready(&status);
        assert_eq!(why, reason::ATTEMPTS_EXHAUSTED);
        assert!(
            message.contains("asked again for decisions already acted on"),
            "{message}"
        );
    }

    #[test]
    fn a_crashed_pod_deleted_after_its_crash_was_counted_starts_the_next_attempt() {
        let bundle = run_bundle(&session());
        let next = |session: &Session| {
            plan(&Observed {
                session,
                bundle: &bundle,
                attempt: 2,
                pod: &AttemptPod::Missing,
                max_crash_attempts: 4,
                now: at(2_000),
            })
        };
        // Not seen to end: started again, as a pod taken from a drained node is.
        let mut session = session();
        assert!(
            matches!(
                next(&session),
                Step::Start {
                    attempt: 2,
                    after_crash: None,
                    ..
                }
            ),
            "{:?}",
            next(&session)
        );
        // Its crash counted, then the pod deleted: the next attempt, the count carried on.
        session.status = Some(SessionStatus {
            attempt: Some(2),
            crashed_attempts: Some(1),
            last_crashed_attempt: Some(2),
            ..Default::default()
        });
        let Step::Start {
            attempt: 3,
            after_crash: Some(AfterCrash { why, crashes: 1 }),
            ..
        } = next(&session)
        else {
            panic!("{:?}", next(&session));
        };
        assert!(why.contains("was deleted"), "{why}");
        // And when that was the last attempt allowed: Failed.
        session.status.as_mut().expect("status").crashed_attempts = Some(4);
        let failed = status_of(&next(&session));
        assert_eq!(failed.phase, Some(SessionPhase::Failed));
        assert_eq!(ready(&failed).1, reason::ATTEMPTS_EXHAUSTED);
    }

    #[test]
    fn a_bundle_that_cannot_be_pinned_holds_the_session_or_fails_it() {
        let failed = held(&Invalid::new(
            reason::OVERRIDE_LOOSENS,
            "spec.overrides.budget.tokens",
        ));
        let status = status_of(&failed);
        assert_eq!(status.phase, Some(SessionPhase::Failed));
        assert!(
            status.completion_time.is_some(),
            "a spec that cannot change never recovers"
        );

        let missing = held(&Invalid::new(reason::REFERENCE_NOT_FOUND, "spec.agentRef.name"));
        assert!(matches!(missing, Step::Report { recheck: None, .. }));
        assert_eq!(status_of(&missing).phase, Some(SessionPhase::Pending));

        // Sessions do not watch ConfigMaps: a planted bundle's removal is looked for.
        let planted = held(&Invalid::new(
            reason::UNTRUSTED_CHILD,
            "ConfigMap checkout-5xx-bundle",
        ));
        assert!(matches!(
            planted,
            Step::Report {
                recheck: Some(RECHECK_UNTRUSTED),
                ..
            }
        ));
        assert_eq!(status_of(&planted).phase, Some(SessionPhase::Pending));
    }

    #[test]
    fn cancelling_stops_only_a_running_attempt() {
        let live = |phase: &str| AttemptPod::Live {
            name: "checkout-5xx-run-1".into(),
            phase: phase.into(),
        };
        let stop = |pod: &AttemptPod| match cancelled(pod) {
            Step::Cancel { stop } => stop,
            other => panic!("{other:?}"),
        };
        assert_eq!(stop(&live("Running")).as_deref(), Some("checkout-5xx-run-1"));
        assert_eq!(stop(&live("Pending")).as_deref(), Some("checkout-5xx-run-1"));
        assert_eq!(stop(&live("Unknown")), None);
        assert_eq!(stop(&AttemptPod::Missing), None);
        assert_eq!(
            stop(&AttemptPod::Foreign { name: "x".into() }),
            None,
            "not ours to delete"
        );
        assert_eq!(stop(&AttemptPod::Ended(Box::new(ended(None)))), None);
    }
}
