//! The Policy kind: ordered rules the Tool Gateway checks deterministically before any tool call
//! runs, versioned by digest and promoted through the replay gate.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Approvers, PromotionSpec, RevisionStatus, ToolKind, ToolRisk};

/// Desired state of a Policy.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Policy",
    doc = "Ordered rules deciding, for every tool call, whether it is allowed, denied or needs a human approval. The first matching rule decides; `defaultEffect` applies when none matches.",
    namespaced,
    cel,
    validation = Rule::new("self.metadata.name.size() <= 56").message("a Policy's name is at most 56 characters: policy.<name> labels its revision snapshots and replay Jobs (a label value is at most 63); shorten metadata.name"),
    status = "PolicyStatus",
    shortname = "cpol",
    category = "contextos",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Promoted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Promoted\")].status"
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Default", type_ = "string", json_path = ".spec.defaultEffect"),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.revisions.promoted",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Rules in evaluation order; rule names are unique.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 512))]
    pub rules: Vec<PolicyRule>,
    /// Effect when no rule matches. Defaults to `deny`.
    #[serde(default = "default_effect")]
    pub default_effect: PolicyEffect,
    /// `enforce` applies decisions; `dryRun` records what would have been decided and allows
    /// the call.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Limits on tool calls per run, counted by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<ToolCallBudget>,
    /// How candidate revisions are promoted. Without it, revisions are promoted directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionSpec>,
}

fn default_effect() -> PolicyEffect {
    PolicyEffect::Deny
}

/// What a rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyEffect {
    /// The call runs.
    Allow,
    /// The call is refused; the agent is told why.
    Deny,
    /// The run pauses until a listed approver approves this exact call.
    RequireApproval,
}

impl PolicyEffect {
    /// The wire name (`allow`, `deny`, `require_approval`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::RequireApproval => "require_approval",
        }
    }
}

/// Whether decisions are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PolicyMode {
    /// Decisions are applied.
    #[default]
    #[serde(rename = "enforce")]
    Enforce,
    /// Decisions are recorded but every call is allowed; use to preview a policy.
    #[serde(rename = "dryRun")]
    DryRun,
}

/// One rule: a match, an optional CEL condition, and an effect with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.effect == 'require_approval' || !has(self.approvers)").message("approvers are only meaningful on a rule whose effect is require_approval"))]
pub struct PolicyRule {
    /// Unique name, recorded with every decision the rule makes.
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Which calls the rule applies to. All listed criteria must hold; an empty match applies
    /// to every call.
    #[serde(default, rename = "match")]
    pub match_: RuleMatch,
    /// Optional CEL expression that must also be true. Variables: `call` (tool, risk, kind,
    /// args), `run` (tenant, agent, user, safetyMode, budget used), `state` (Functional State).
    /// Example: `call.args.amount > 1000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub condition: Option<String>,
    /// allow, deny or require_approval.
    pub effect: PolicyEffect,
    /// Why this rule exists; recorded with each decision and shown to approvers.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Who may approve (require_approval only). Defaults to the Agent's approvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
}

/// Criteria a call must meet for a rule to apply. Empty lists match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleMatch {
    /// Matches if the tool's risk is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub risks: Vec<ToolRisk>,
    /// Matches if the tool's kind is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub kinds: Vec<ToolKind>,
    /// Matches if the tool name fits one of these globs (`*` any run of characters, `?` one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 128), regex(pattern = r"^[a-z0-9_*?-]+$"))
    )]
    pub tools: Vec<String>,
}

/// Tool-call limits enforced per run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolCallBudget {
    /// Calls of any tool per run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_calls: Option<u32>,
    /// Calls of any single tool per run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_calls_per_tool: Option<u32>,
    /// Calls of `destructive` tools per run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10_000))]
    pub max_destructive_calls: Option<u32>,
}

/// Observed state of a Policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Ready` (False when a rule's condition does not compile), `Promoted`, `ReplayPassed`,
    /// `AwaitingPromotion`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Candidate and promoted revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionStatus>,
}
