//! Condition types and reasons written to `status.conditions` of ContextOS objects.
//!
//! Types follow the kstatus conventions that Argo CD, Flux and `kubectl wait` understand: `Ready`
//! is the summary condition on every kind, `True` when the object is fully usable.

/// Summary condition on every kind.
pub const READY: &str = "Ready";
/// kstatus: the controller is still working toward the spec (or waits on something that will
/// come: a reference being created, a runner, an approval). `True` exactly when `Ready` is False
/// and the object is not stalled.
pub const RECONCILING: &str = "Reconciling";
/// kstatus: the object cannot become Ready without someone changing something (an invalid spec,
/// a failed or cancelled Session). Health tools show it as failed, not as progressing.
pub const STALLED: &str = "Stalled";
/// A ContextPack or Policy revision passed its replay gate (or was promoted directly).
pub const PROMOTED: &str = "Promoted";
/// The replay Job for the current candidate revision finished without exceeding its threshold.
pub const REPLAY_PASSED: &str = "ReplayPassed";
/// A Skill's candidate revision passed every scenario of its evaluation suite.
pub const EVALS_PASSED: &str = "EvalsPassed";
/// A revision passed replay and waits for a listed approver.
pub const AWAITING_PROMOTION: &str = "AwaitingPromotion";
/// A Proposal was accepted by a reviewer and its candidate put on the target.
pub const ACCEPTED: &str = "Accepted";

/// Whether a `Ready=False` reason means the object is stuck until a person acts (kstatus
/// `Stalled`) rather than on its way (`Reconciling`).
pub fn is_stalled(reason: &str) -> bool {
    use reason::*;
    [
        INVALID_SPEC,
        INVALID_EXPRESSION,
        EXECUTION_NOT_ALLOWED,
        PRICE_MISSING,
        OVERRIDE_LOOSENS,
        RUN_FAILED,
        QUOTA_EXCEEDED,
        ATTEMPTS_EXHAUSTED,
        CANCELLED,
        STALE,
        REPLAY_FAILED,
        EVALS_FAILED,
    ]
    .contains(&reason)
}

/// Reasons (CamelCase, stable: automation may match on them).
pub mod reason {
    /// Every reference resolved and the spec is valid.
    pub const RESOLVED: &str = "Resolved";
    /// A `*Ref` names an object that does not exist in this namespace.
    pub const REFERENCE_NOT_FOUND: &str = "ReferenceNotFound";
    /// A referenced object exists but is not Ready itself.
    pub const REFERENCE_NOT_READY: &str = "ReferenceNotReady";
    /// A field is syntactically valid but semantically wrong (the message names the field).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A CEL condition or validator does not compile.
    pub const INVALID_EXPRESSION: &str = "InvalidExpression";
    /// A tool would execute code (a stdio MCP server) that the SandboxProfile does not allow.
    pub const EXECUTION_NOT_ALLOWED: &str = "ExecutionNotAllowed";
    /// The cluster prices models (it has a PriceList) and none prices the Agent's, or two
    /// price it (or one of its paid tools) differently: its calls would be free or ambiguous.
    pub const PRICE_MISSING: &str = "PriceMissing";
    /// A Session override would loosen the Agent's budget or safety mode.
    pub const OVERRIDE_LOOSENS: &str = "OverrideLoosens";
    /// A revision was promoted.
    pub const PROMOTED: &str = "Promoted";
    /// Replay results are not known yet.
    pub const REPLAY_PENDING: &str = "ReplayPending";
    /// Replay stayed within the divergence threshold.
    pub const REPLAY_PASSED: &str = "ReplayPassed";
    /// Replay exceeded the divergence threshold.
    pub const REPLAY_FAILED: &str = "ReplayFailed";
    /// A Skill's evaluation Job is running its suite.
    pub const EVALS_RUNNING: &str = "EvalsRunning";
    /// Every scenario of a Skill's suite passed.
    pub const EVALS_PASSED: &str = "EvalsPassed";
    /// A scenario of a Skill's suite failed: the revision is not promoted.
    pub const EVALS_FAILED: &str = "EvalsFailed";
    /// A Skill's evaluation ended without a verdict.
    pub const EVALS_INCONCLUSIVE: &str = "EvalsInconclusive";
    /// An Agent uses two tools of one name, or a tool its SandboxProfile does not allow.
    pub const SKILL_CONFLICT: &str = "SkillConflict";
    /// There are no recorded sessions to replay against yet.
    pub const NO_RECORDED_HISTORY: &str = "NoRecordedHistory";
    /// A replay ended without a verdict the gateway vouches for (evicted, past its deadline,
    /// no report): neither a pass nor a failure.
    pub const REPLAY_INCONCLUSIVE: &str = "ReplayInconclusive";
    /// An object at a name the operator uses for its own children was not made by the operator
    /// (a planted or altered child); it is never used.
    pub const UNTRUSTED_CHILD: &str = "UntrustedChild";
    /// A started Session's pinned run bundle is gone: what it runs cannot be pinned again
    /// mid-run, so it goes no further.
    pub const BUNDLE_LOST: &str = "BundleLost";
    /// A Session waits for its runner pod or is being run.
    pub const RUNNING: &str = "Running";
    /// A Session's run waits for a human to approve a call.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// A Session's run waits for a human to say whether a call whose outcome is unknown acted.
    pub const AWAITING_RESOLUTION: &str = "AwaitingResolution";
    /// A Session's run completed with an accepted output.
    pub const SUCCEEDED: &str = "Succeeded";
    /// A Session's run ended without an accepted output (the message says why).
    pub const RUN_FAILED: &str = "RunFailed";
    /// Every runner attempt of a Session crashed; no more are made.
    pub const ATTEMPTS_EXHAUSTED: &str = "AttemptsExhausted";
    /// A Session waits to start: a SpendQuota's Session limit is reached (the message names
    /// the quota and the limit).
    pub const QUOTA_WAIT: &str = "QuotaWait";
    /// The API server refused a Session's runner pod (the message quotes it: a ResourceQuota,
    /// Pod Security admission, a limit range); the Session stays Pending and is tried again
    /// every 30 seconds.
    pub const POD_REJECTED: &str = "PodRejected";
    /// A Session's attempt waits for its ended capability pods to be gone, to make them again
    /// before its runner pod (the message names them; one that stays is usually held by a
    /// finalizer, or by a node that is gone).
    pub const CAPABILITY_PODS_WAIT: &str = "CapabilityPodsWait";
    /// A Session's run was refused a call by a SpendQuota (the message names it and its
    /// window).
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// A Session was stopped by `spec.cancel`.
    pub const CANCELLED: &str = "Cancelled";
    /// A Proposal's target changed since it was drafted: it would apply to a spec nobody
    /// replayed it with.
    pub const STALE: &str = "Stale";
    /// A Proposal waits for one of its reviewers.
    pub const AWAITING_DECISION: &str = "AwaitingDecision";
    /// A Proposal was accepted.
    pub const ACCEPTED: &str = "Accepted";
    /// A Proposal was rejected.
    pub const REJECTED: &str = "Rejected";
    /// A Proposal is done without effect now (its target moved on, or its candidate changed
    /// after the decision).
    pub const SUPERSEDED: &str = "Superseded";
}

/// Condition status values.
pub mod status {
    pub const TRUE: &str = "True";
    pub const FALSE: &str = "False";
    pub const UNKNOWN: &str = "Unknown";
}
