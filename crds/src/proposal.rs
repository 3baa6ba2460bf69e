//! The Proposal kind: one typed change to a Policy, ContextPack or Agent — a structured patch,
//! never free text — with the insight and recorded evidence it comes from. The operator applies
//! the patch to the target's current spec, has the API server check the result as it would a
//! hand-written change, replays it against the target's recorded sessions, and names who may
//! decide (the target's promotion approvers). Accepting it is a reviewer's decision on the
//! object; only then does the candidate reach the target, whose own gate promotes it. Nothing
//! is ever applied any other way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{FunctionalSignal, OutputValidator},
    common::{Approvers, ReplaySummary, ToolRisk},
    context_pack::ContextSource,
    policy::{PolicyEffect, PolicyMode, PolicyRule, ToolCallBudget},
};

/// A proposed change.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Proposal",
    doc = "A typed change to a Policy, ContextPack or Agent drawn from what its runs showed. It is replayed against recorded sessions and reaches the target only when one of the target's approvers accepts it; the target's promotion gate does the rest.",
    namespaced,
    cel,
    status = "ProposalStatus",
    shortname = "cprop",
    category = "contextos",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.name"),
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.target.kind"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Replay",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ReplayPassed\")].status"
    ),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision.action"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.target == oldSelf.target && self.baseDigest == oldSelf.baseDigest && self.patch == oldSelf.patch").message("a Proposal's target, baseDigest and patch cannot change: what was replayed and reviewed is what is decided; create a new Proposal").reason(Reason::FieldValueForbidden),
    validation = Rule::new("has(self.insight) == has(oldSelf.insight) && (!has(self.insight) || self.insight == oldSelf.insight)").message("spec.insight cannot change: it is the evidence the proposal was drafted from").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(oldSelf.decision) || (has(self.decision) && self.decision == oldSelf.decision)").message("spec.decision is final once made; create a new Proposal to change course").reason(Reason::FieldValueForbidden),
    validation = Rule::new("(self.target.kind == 'Policy') == has(self.patch.policy) && (self.target.kind == 'ContextPack') == has(self.patch.contextPack) && (self.target.kind == 'Agent') == has(self.patch.agent)").message("spec.patch must be of the target's kind: patch.policy for a Policy, patch.contextPack for a ContextPack, patch.agent for an Agent")
)]
pub struct ProposalSpec {
    /// The object the change is for, in this namespace.
    pub target: ProposalTarget,
    /// The digest of the target's spec the patch was drafted against (`status.revisions.
    /// candidate` of the target). If the target changes meanwhile the proposal is stale: it is
    /// never applied on top of a spec nobody replayed it with.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub base_digest: String,
    /// The change, as typed operations on the target's spec.
    pub patch: ProposalPatch,
    /// The insight it comes from: what was seen, and the recorded entries that show it.
    /// Divergences the replay finds at these calls (and after them in the same runs) are the
    /// change's intended effect and do not count against it; any other divergence does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insight: Option<ProposalInsight>,
    /// A reviewer's decision. Admission (policy `contextos-proposal-decisions`) takes it only
    /// from one of `status.reviewers`, naming themselves in `by`, and only once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<ProposalDecision>,
}

/// What a proposal changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProposalTarget {
    /// Policy, ContextPack or Agent.
    pub kind: TargetKind,
    /// Its name, in the proposal's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// The kinds a proposal can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum TargetKind {
    Policy,
    ContextPack,
    Agent,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "Policy",
            Self::ContextPack => "ContextPack",
            Self::Agent => "Agent",
        }
    }

    /// The resource's plural, as RBAC and admission name it.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Policy => "policies",
            Self::ContextPack => "contextpacks",
            Self::Agent => "agents",
        }
    }
}

/// The typed patch: exactly the one of the target's kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProposalPatch {
    /// Operations on a Policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyPatch>,
    /// Operations on a ContextPack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_pack: Option<ContextPackPatch>,
    /// Operations on an Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentPatch>,
}

/// Operations on a Policy, applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPatch {
    /// The operations, applied in order (1–32).
    #[schemars(length(min = 1, max = 32))]
    pub operations: Vec<PolicyOperation>,
}

/// One operation on a Policy: set exactly one field. A proposal never changes a gate
/// (`spec.promotion`): that is the approvers' own decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.addRule) ? 1 : 0) + (has(self.setEffect) ? 1 : 0) + (has(self.setCondition) ? 1 : 0) + (has(self.removeRule) ? 1 : 0) + (has(self.setBudget) ? 1 : 0) + (has(self.setDefaultEffect) ? 1 : 0) + (has(self.setMode) ? 1 : 0) == 1").message("set exactly one operation per entry: addRule, setEffect, setCondition, removeRule, setBudget, setDefaultEffect or setMode"))]
pub struct PolicyOperation {
    /// Insert a rule before `before`, or last when it names none (the first matching rule
    /// decides, so a rule meant to catch calls goes before the one that lets them through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_rule: Option<AddRule>,
    /// Change a rule's effect (tighten or loosen it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_effect: Option<SetEffect>,
    /// Set (or, without `condition`, remove) a rule's CEL condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_condition: Option<SetCondition>,
    /// Remove a rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_rule: Option<RuleName>,
    /// Replace the tool-call budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_budget: Option<ToolCallBudget>,
    /// The policy's default effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_default_effect: Option<PolicyEffect>,
    /// `enforce` a dryRun policy (or the reverse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_mode: Option<PolicyMode>,
}

/// A rule to insert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddRule {
    pub rule: PolicyRule,
    /// The rule it goes before; without it, it goes last (just ahead of the default effect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub before: Option<String>,
}

/// A rule by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleName {
    /// The rule's name.
    #[schemars(length(min = 1, max = 64))]
    pub rule: String,
}

/// A rule's new effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetEffect {
    /// The rule's name.
    #[schemars(length(min = 1, max = 64))]
    pub rule: String,
    pub effect: PolicyEffect,
    /// The rule's new reason (recorded with each decision it makes, shown to approvers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub reason: Option<String>,
}

/// A rule's new condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetCondition {
    /// The rule's name.
    #[schemars(length(min = 1, max = 64))]
    pub rule: String,
    /// The CEL condition; none removes the rule's condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub condition: Option<String>,
}

/// Operations on a ContextPack, applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextPackPatch {
    /// The operations, applied in order (1–32).
    #[schemars(length(min = 1, max = 32))]
    pub operations: Vec<ContextPackOperation>,
}

/// One operation on a ContextPack: set exactly one field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.amendInstructions) ? 1 : 0) + (has(self.addSource) ? 1 : 0) + (has(self.setSourcePriority) ? 1 : 0) + (has(self.setSourceMaxTokens) ? 1 : 0) + (has(self.setTokenBudget) ? 1 : 0) == 1").message("set exactly one operation per entry: amendInstructions, addSource, setSourcePriority, setSourceMaxTokens or setTokenBudget"))]
pub struct ContextPackOperation {
    /// A paragraph added to the end of the instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8192))]
    pub amend_instructions: Option<String>,
    /// A new source (its name must be new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_source: Option<ContextSource>,
    /// A source's priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_source_priority: Option<SetSourcePriority>,
    /// A source's token cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_source_max_tokens: Option<SetSourceMaxTokens>,
    /// The pack's new tokenBudget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 2_000_000))]
    pub set_token_budget: Option<u32>,
}

/// A source's new priority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetSourcePriority {
    /// The source's name.
    #[schemars(length(min = 1, max = 64))]
    pub source: String,
    /// Its new priority (0–1000).
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
}

/// A source's new token cap (none: uncapped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetSourceMaxTokens {
    /// The source's name.
    #[schemars(length(min = 1, max = 64))]
    pub source: String,
    /// Its new cap; none removes the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2_000_000))]
    pub max_tokens: Option<u32>,
}

/// Operations on an Agent, applied in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPatch {
    /// The operations, applied in order (1–32).
    #[schemars(length(min = 1, max = 32))]
    pub operations: Vec<AgentOperation>,
}

/// One operation on an Agent: set exactly one field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.setBudget) ? 1 : 0) + (has(self.setToolRisk) ? 1 : 0) + (has(self.addValidator) ? 1 : 0) + (has(self.setCritic) ? 1 : 0) == 1").message("set exactly one operation per entry: setBudget, setToolRisk, addValidator or setCritic"))]
pub struct AgentOperation {
    /// New values for some of the run budget's limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_budget: Option<BudgetChange>,
    /// A tool's declared risk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_tool_risk: Option<SetToolRisk>,
    /// A new output validator (its name must be new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_validator: Option<OutputValidator>,
    /// The critic's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_critic: Option<CriticChange>,
}

/// New values for some run budget limits; unset ones stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxSteps) || has(self.maxTokens) || has(self.maxToolCalls) || has(self.maxWallSeconds)").message("setBudget names at least one limit"))]
pub struct BudgetChange {
    /// New budget.maxSteps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_steps: Option<u32>,
    /// New budget.maxTokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_tokens: Option<u64>,
    /// New budget.maxToolCalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_tool_calls: Option<u32>,
    /// New budget.maxWallSeconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604_800))]
    pub max_wall_seconds: Option<u32>,
}

/// A tool's new declared risk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetToolRisk {
    /// The tool's name.
    #[schemars(length(min = 1, max = 64))]
    pub tool: String,
    /// Its new declared risk.
    pub risk: ToolRisk,
}

/// New critic settings; unset ones stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CriticChange {
    /// New critic.maxRevisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub max_revisions: Option<u32>,
    /// Signals that make the critic escalate (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5))]
    pub escalate_on: Option<Vec<FunctionalSignal>>,
}

/// The insight a proposal was drafted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProposalInsight {
    /// The insight's kind (`corrections`, `repeated-denial`, …; `contextos insights` names
    /// them).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z][a-z0-9-]*$"))]
    pub kind: String,
    /// The agent whose runs showed it.
    #[schemars(length(min = 1, max = 253))]
    pub agent: String,
    /// What it is about: a tool, a rule, a failure reason, a signal, a source.
    #[schemars(length(min = 1, max = 253))]
    pub about: String,
    /// What was seen, in a sentence.
    #[schemars(length(min = 1, max = 1024))]
    pub summary: String,
    /// Runs it was seen in.
    pub runs: u64,
    /// The recorded entries it rests on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub evidence: Vec<EvidenceEntry>,
}

/// One recorded entry an insight rests on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceEntry {
    /// The run's id.
    #[schemars(length(min = 1, max = 128))]
    pub run: String,
    /// The entry's position in the run.
    pub seq: u64,
    /// The entry's hash in the run's chain (hex).
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub hash: String,
    /// The call the entry belongs to, when it is a call's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub call: Option<String>,
}

/// A reviewer's decision on a proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.action == 'reject' || has(self.candidate)").message("an acceptance names the candidate it accepts (spec.decision.candidate: status.candidate as it was reviewed)").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.action == 'accept' || has(self.reason)").message("a rejection says why (spec.decision.reason)").reason(Reason::FieldValueRequired),
    validation = Rule::new(r"!has(self.reason) || !self.reason.matches('[\x00-\x09\x0b-\x1f\x7f]')").message("spec.decision.reason holds a control character")
)]
pub struct ProposalDecision {
    /// accept or reject.
    pub action: DecisionAction,
    /// Who decides: must be the user who sets it (admission checks it).
    #[schemars(length(min = 1, max = 253))]
    pub by: String,
    /// The candidate digest accepted (`status.candidate`): a decision about what was reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub candidate: Option<String>,
    /// Why (required for a rejection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub reason: Option<String>,
}

/// Accept or reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DecisionAction {
    Accept,
    Reject,
}

/// Where a proposal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ProposalPhase {
    /// The patch does not apply to the target, or the result is not a valid spec.
    Invalid,
    /// The target changed since the proposal was drafted.
    Stale,
    /// Its candidate is being replayed.
    Replaying,
    /// Replayed: waiting for a reviewer.
    Reviewable,
    /// The replay broke recorded runs; it cannot be accepted.
    ReplayFailed,
    /// Accepted: the candidate is on the target, whose gate promotes it.
    Accepted,
    /// The candidate is the target's revision in force.
    Promoted,
    Rejected,
    /// Done without effect now: the target moved on from the accepted candidate, or the
    /// candidate changed after the decision (what an Agent uses was promoted meanwhile). A
    /// proposal is applied at most once; draft a new one.
    Superseded,
}

/// Observed state of a Proposal.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProposalStatus {
    /// `Ready` (the patch applies and the result is valid), `ReplayPassed`, `Accepted`,
    /// `Promoted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProposalPhase>,
    /// What is replayed and what a reviewer accepts: the digest of the target's spec with the
    /// patch applied (for an Agent, of its composition with that spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Digest of the target's spec with the patch applied (the target's once accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_digest: Option<String>,
    /// The change in words, one line per operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub changes: Vec<String>,
    /// The candidate's replay against the target's recorded sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySummary>,
    /// Divergences at the evidence (the intended effect), not counted against the replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intended_divergences: Option<u32>,
    /// The replay's round: one more each time the proposal went Stale (its target changed) or
    /// Invalid, so that a replay from before counts no more when the target comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// Who may decide: the target's promotion approvers (frozen once a decision is made: the
    /// target's gate honours it only while they are still the target's). Empty: holders of
    /// the `promote` verb on the target's resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewers: Option<Approvers>,
}
