//! The Skill kind: a named, versioned bundle of typed tools and prompt fragments that Agents
//! compose (`spec.skillRefs`), with the evaluation suite a revision must pass before any Agent
//! runs it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    agent::{OutputValidator, Tool},
    common::{LocalRef, RevisionStatus, RunBudget, SafetyMode, free_form_object},
    context_pack::SourceKind,
};

/// Desired state of a Skill.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Skill",
    doc = "A reusable capability: typed tools, the prompt fragments that teach a model to use them, and an evaluation suite. A revision is promoted only when every scenario of its suite passes (run as a Job, like a replay gate); Agents that list it in spec.skillRefs run its promoted revision.",
    namespaced,
    cel,
    validation = Rule::new("self.metadata.name.size() <= 57").message("a Skill's name is at most 57 characters: skill.<name> labels its revision snapshots and evaluation Jobs (a label value is at most 63); shorten metadata.name"),
    status = "SkillStatus",
    shortname = "skill",
    category = "contextos",
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
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
    printcolumn(
        name = "Evals",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"EvalsPassed\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SkillSpec {
    /// The version people know this revision by (e.g. `1.4.0`). A revision's identity is the
    /// digest of its spec; the version is what status, records and conflicts show.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$"))]
    pub version: String,
    /// What the skill is for, for the people composing agents.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub description: String,
    /// The tools it brings, declared as an Agent declares its own (risk and kind required).
    /// An Agent that uses the skill may call them under the Agent's own policies.
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.name == t.name))").message("two tools have the same name; tool names must be unique"))]
    #[schemars(length(min = 1, max = 32))]
    pub tools: Vec<Tool>,
    /// Text compiled into the context of every run of an Agent that uses the skill, under the
    /// Agent's ContextPack token budget, each fragment at its own priority (as pack sources are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(f, self.exists_one(g, g.name == f.name))").message("two prompt fragments have the same name"))]
    #[schemars(length(max = 16))]
    pub prompt_fragments: Vec<PromptFragment>,
    /// The scenarios a revision must pass before it is promoted.
    pub evals: EvalSuite,
}

/// One prompt fragment of a skill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptFragment {
    /// Unique within the skill; the context records it as source `skill.<skill>.<name>`.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$")
    )]
    pub name: String,
    /// guideline (default), reference, example or evidence.
    #[serde(default = "guideline")]
    pub kind: SourceKind,
    /// Higher priorities are included first when the budget is tight (0–1000).
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
    /// Cap on tokens this fragment may use; a longer one is cut and the cut recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_tokens: Option<u32>,
    /// When true, a run fails to start if the fragment cannot be included in full (and an
    /// Agent whose pack budget cannot hold it is not Ready).
    #[serde(default)]
    pub required: bool,
    /// The text.
    #[schemars(length(min = 1, max = 16384))]
    pub text: String,
}

fn guideline() -> SourceKind {
    SourceKind::Guideline
}

fn default_priority() -> u32 {
    500
}

/// A skill's evaluation suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalSuite {
    /// Policies in this namespace (at their promoted revisions) every scenario runs under, in
    /// order, as an Agent's `policyRefs`. A change to one of them is a new candidate: the suite
    /// runs again.
    #[x_kube(validation = Rule::new("self.map(p, p.name).all(n, self.exists_one(p, p.name == n))").message("evals.policyRefs lists the same Policy twice; remove the duplicate"))]
    #[schemars(length(min = 1, max = 8))]
    pub policy_refs: Vec<LocalRef>,
    /// The scenarios; every one must pass.
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("two scenarios have the same name"))]
    #[schemars(length(min = 1, max = 32))]
    pub scenarios: Vec<EvalScenario>,
}

/// One scenario: a request, the model's turns, what the skill's tools answer, and what the
/// resulting record must show. Nothing leaves the evaluation: no tool is reached, no model is
/// asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalScenario {
    /// Unique within the suite; failures name it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The request the run starts with (a Session's `input.prompt`).
    #[schemars(length(min = 1, max = 8192))]
    pub request: String,
    /// Structured input, as a Session's `input.data` (policies read it as `run.input.data`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub data: Option<serde_json::Value>,
    /// The model's turns, as a scripted model plays them (`{"turns": [{"content": …,
    /// "toolCalls": [{"tool": …, "arguments": {…}}]}]}`): a scripted model, or turns copied
    /// from a recorded run (`contextos records show --output json`).
    #[serde(deserialize_with = "crate::free_form::bounded_required")]
    #[schemars(schema_with = "free_form_object")]
    pub script: serde_json::Value,
    /// What the skill's tools answer. A call is answered by the first entry for its tool whose
    /// `arguments` (when given) equal the call's; a call no entry answers fails with an error
    /// result, as a tool that is down would.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tool_results: Vec<CannedResult>,
    /// The run's limits (default: 12 steps, 60000 tokens, 16 tool calls, 60 s; at most 50 steps,
    /// 2000000 tokens, 64 tool calls, 16 a turn and 60 s — the suite's whole minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RunBudget>,
    /// The run's autonomy, as an Agent's `safetyMode` (default: supervised).
    #[serde(default)]
    pub safety_mode: SafetyMode,
    /// What the record must show.
    pub expect: EvalExpectations,
}

/// A tool's answer in a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CannedResult {
    /// One of the skill's tools.
    #[schemars(length(min = 1, max = 64))]
    pub tool: String,
    /// Answer only calls with exactly these arguments (default: any call of the tool).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub arguments: Option<serde_json::Value>,
    /// The tool's output.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub output: Option<serde_json::Value>,
    /// The tool fails with this error instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub error: Option<String>,
}

/// What a scenario's record must show. Every check given must hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalExpectations {
    /// How the run ends: completed, awaiting_approval or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ExpectedOutcome>,
    /// Tools that must have run, in this order (other calls may come between).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub called: Vec<String>,
    /// Tools that must not have run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub not_called: Vec<String>,
    /// Tools a call of which a policy must have denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub denied: Vec<String>,
    /// Tools a call of which must have waited for a person's approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub approval_requested: Vec<String>,
    /// Checks the final output must pass (as an Agent's `validators`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("two output checks have the same name"))]
    #[schemars(length(max = 8))]
    pub output: Vec<OutputValidator>,
    /// No call to a `delegated` or `destructive` tool ran without a person's approval on
    /// record (default true). Scenarios approve nothing, so such a call that ran was let
    /// through by a policy: the skill would act unsupervised.
    #[serde(default = "yes")]
    pub no_approval_bypass: bool,
    /// The most tool calls (allowed or not) the run may make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10_000))]
    pub max_tool_calls: Option<u32>,
    /// The most model tokens the run may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub max_tokens: Option<u64>,
}

fn yes() -> bool {
    true
}

/// How a scenario's run must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedOutcome {
    Completed,
    AwaitingApproval,
    Failed,
}

impl ExpectedOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Failed => "failed",
        }
    }
}

/// Observed state of a Skill.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillStatus {
    /// `Ready`, `Promoted`, `EvalsPassed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Candidate and promoted revisions (a revision is the spec with the promoted revisions
    /// of the policies its suite runs under). `replay` holds the last suite's result:
    /// `sessions` scenarios, `decisions` checks, `divergences` failed checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionStatus>,
}
