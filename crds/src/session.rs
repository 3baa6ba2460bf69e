//! The Session kind: one durable invokeAgent request — input, user delegation, tightening
//! overrides and approvals — and its observed run: phase, pinned revisions, budget used, the
//! pending approval and the record head.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Approvers, BudgetOverride, LocalRef, SafetyMode, ToolRisk, free_form_object};

/// The approvals a Session holds (`spec.approvals`): a run asks for this many at most, and a
/// call that would need one more is denied (rule `session/approvals`) rather than left waiting
/// for a decision the Session has no room for.
pub const MAX_APPROVALS: usize = 64;

/// Desired state of a Session.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Session",
    doc = "One run of an Agent. The spec is immutable once created, except that approvers append to `approvals` and anyone allowed to update the Session may set `cancel: true`.",
    namespaced,
    cel,
    validation = Rule::new("self.metadata.name.size() <= 63").message("a Session's name is at most 63 characters: it labels the Session's runner pods (a label value is at most 63); shorten metadata.name"),
    status = "SessionStatus",
    // Listed by phase on the API server (`--field-selector status.phase!=Succeeded`): the
    // gateway counts an A2A caller's open tasks without reading the ended ones.
    selectable = ".status.phase",
    shortname = "sess",
    category = "contextos",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agentRef.name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Steps", type_ = "integer", json_path = ".status.steps"),
    printcolumn(
        name = "Attempt",
        type_ = "integer",
        json_path = ".status.attempt",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.agentRef == oldSelf.agentRef && self.input == oldSelf.input && has(self.user) == has(oldSelf.user) && (!has(self.user) || self.user == oldSelf.user) && has(self.subject) == has(oldSelf.subject) && (!has(self.subject) || self.subject == oldSelf.subject) && has(self.overrides) == has(oldSelf.overrides) && (!has(self.overrides) || self.overrides == oldSelf.overrides)").message("a Session's spec cannot change after creation (only spec.approvals, spec.resolutions and spec.cancel may); create a new Session instead").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(oldSelf.approvals) || (has(self.approvals) && oldSelf.approvals.all(a, a in self.approvals))").message("spec.approvals is append-only: a recorded approval cannot be changed or removed").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(oldSelf.resolutions) || (has(self.resolutions) && oldSelf.resolutions.all(r, r in self.resolutions))").message("spec.resolutions is append-only: a recorded resolution cannot be changed or removed").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)").message("spec.cancel cannot be unset once a Session is cancelled").reason(Reason::FieldValueForbidden)
)]
pub struct SessionSpec {
    /// The Agent to run, in this namespace.
    pub agent_ref: LocalRef,
    /// The request.
    pub input: SessionInput,
    /// The user on whose behalf the agent acts (carried in the signed RunContext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserDelegation>,
    /// The person this Session is about, by pseudonymous handle (never a name or an e-mail):
    /// the subject whose memory it may recall and keep, under that subject's consent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[a-z0-9][a-z0-9._:-]*$"))]
    pub subject: Option<String>,
    /// Tighter limits than the Agent's for this Session only; loosening is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<SessionOverrides>,
    /// Decisions on calls that needed approval, each bound to one call's hash (at most 64: a
    /// run asks for no more; a call that would need one more is denied, rule
    /// `session/approvals`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["callHash".into()]))]
    #[schemars(length(max = MAX_APPROVALS))]
    pub approvals: Vec<Approval>,
    /// What humans found out about calls whose outcome was unknown (started before an
    /// interruption, no result recorded, not safe to send again), each bound to one call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["callId".into()]))]
    #[schemars(length(max = 16))]
    pub resolutions: Vec<Resolution>,
    /// Set to true to stop the run; the Session ends `Cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// The request an agent works on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInput {
    /// The task, in natural language.
    #[schemars(length(min = 1, max = 65536))]
    pub prompt: String,
    /// Structured input: given to the model after the prompt, and to policies as
    /// `run.input.data` (`run.input.prompt` is the prompt).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub data: Option<serde_json::Value>,
}

/// The delegating user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserDelegation {
    /// Stable user identifier, e.g. `alice@example.com`.
    #[schemars(length(min = 1, max = 253))]
    pub subject: String,
    /// Groups of the user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub groups: Vec<String>,
    /// Scopes delegated to the agent, e.g. `tickets:write`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    pub scopes: Vec<String>,
}

/// Per-Session tightening of the Agent's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionOverrides {
    /// Lower budget limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetOverride>,
    /// A safety mode at least as strict as the Agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_mode: Option<SafetyMode>,
}

/// A human decision on one pending call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// `status.pendingApproval.callHash` of the call decided on (sha256 hex of the exact call
    /// envelope and policy digest). An approval never applies to any other call.
    #[schemars(length(min = 64, max = 64), regex(pattern = r"^[a-f0-9]{64}$"))]
    pub call_hash: String,
    /// approve or reject.
    pub decision: ApprovalDecision,
    /// Who decided; must be the user making the change (checked at admission).
    #[schemars(length(min = 1, max = 253))]
    pub approver: String,
    /// Optional note recorded with the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// A human's finding on one call whose outcome was unknown, or their answer to a remote
/// agent's question (`status.unresolvedCall`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.outcome != 'answered' || (has(self.note) && size(self.note) > 0)").message("outcome answered sends spec.resolutions[].note to the remote agent as the answer: set note"))]
pub struct Resolution {
    /// `status.unresolvedCall.callId` of the call (for a remote agent's question, the
    /// question's id, e.g. `3.0.q1-5f2c9a1e`).
    #[schemars(length(min = 1, max = 64))]
    pub call_id: String,
    /// `acted`: the tool did what was asked (the run goes on as if it answered); `did_not_act`:
    /// it did not (the run goes on as if the call failed; the agent may ask again) — for a
    /// remote agent's question, the question is declined and the remote task cancelled;
    /// `answered`: for a remote agent's question only, `note` is sent to it as the answer.
    pub outcome: ResolvedOutcome,
    /// Who found out; must be the user making the change (checked at admission).
    #[schemars(length(min = 1, max = 253))]
    pub resolver: String,
    /// What was found (shown to the agent and recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub note: Option<String>,
}

/// Whether an unresolved call acted, or the answer to a remote agent's question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResolvedOutcome {
    Acted,
    DidNotAct,
    /// A remote agent's question is answered with the resolution's `note`.
    Answered,
}

/// An approver's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    Approve,
    Reject,
}

/// Lifecycle phase of a Session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SessionPhase {
    /// Accepted; no runner pod yet.
    Pending,
    /// A runner pod is working on it.
    Running,
    /// Paused until `status.pendingApproval` is approved or rejected.
    AwaitingApproval,
    /// Paused until a human says whether `status.unresolvedCall` acted (`spec.resolutions`).
    AwaitingResolution,
    /// Completed and its output passed validation.
    Succeeded,
    /// Ended without an accepted output; see the Ready condition's reason.
    Failed,
    /// Stopped by `spec.cancel`.
    Cancelled,
}

impl SessionPhase {
    /// Whether the Session can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A call started before an interruption whose result was never recorded, or a call whose
/// remote agent asked a question.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnresolvedCallStatus {
    /// Put this value in `spec.resolutions[].callId` to resolve it.
    pub call_id: String,
    pub tool: String,
    /// The call's arguments (JSON, cut at 4 KiB).
    #[serde(default)]
    pub arguments: String,
    /// Why it was not sent again; for a remote agent's question, the question.
    #[serde(default)]
    pub reason: String,
    /// Set when a remote agent (A2A) asked a question: the call it belongs to. `callId` is
    /// then the question's id, and a resolution of it is `answered` (the answer in `note`) or
    /// `did_not_act` (declined) — never `acted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_call: Option<String>,
}

/// Digests a Session pinned when it started; resumes use the same ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedRevisions {
    /// Promoted ContextPack revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_pack: Option<String>,
    /// Promoted Policy revisions, in the Agent's `policyRefs` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// SandboxProfile digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_profile: Option<String>,
}

/// Budget consumed so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetUsage {
    pub steps: u32,
    pub tokens: u64,
    pub tool_calls: u32,
    pub wall_seconds: u32,
}

/// The call a paused Session waits on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    /// Put this value in `spec.approvals[].callHash` to decide.
    pub call_hash: String,
    /// Tool requested.
    pub tool: String,
    /// Its declared risk.
    pub risk: ToolRisk,
    /// Arguments, as compact JSON (cut at 4 KiB).
    pub arguments: String,
    /// Policy and rule that required approval, as `policy/rule`.
    pub rule: String,
    /// The rule's reason.
    pub reason: String,
    /// Who may decide.
    pub approvers: Approvers,
}

/// Where a resumed run starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    /// Step the checkpoint was taken after.
    pub step: u32,
    /// Hash of the record entry holding the checkpoint.
    pub entry_hash: String,
}

/// Observed state of a Session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// Pending, Running, AwaitingApproval, AwaitingResolution, Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// `Ready` summarises the Session (True once Succeeded; False with a reason otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Identifier of the run in the record store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Runner pod attempt (1 for the first pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Attempts that ended without a report (crashed, killed, out of memory, past their
    /// deadline): what the operator's `--max-crash-attempts` bounds. Counted here once the
    /// operator has seen an attempt's pod end, before it waits out the backoff, so deleting
    /// the pod does not take the crash back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crashed_attempts: Option<u32>,
    /// The last attempt counted in `crashedAttempts` (each is counted once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crashed_attempt: Option<u32>,
    /// Revisions pinned at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<PinnedRevisions>,
    /// Steps completed, as the gateway signed them from the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Budget used so far: steps, tokens and tool calls as the gateway signed them from the
    /// record; wall time as the runner measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_used: Option<BudgetUsage>,
    /// The call waiting for approval, while phase is AwaitingApproval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_approval: Option<PendingApproval>,
    /// The call whose outcome is unknown, while phase is AwaitingResolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved_call: Option<UnresolvedCallStatus>,
    /// The last checkpoint, as the gateway signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,
    /// Hash of the newest DecisionRecord entry, as the gateway signed it: what the run's chain
    /// is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_head: Option<String>,
    /// The accepted output (cut at 32 KiB; the full output is in the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// When the first runner pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the Session reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
