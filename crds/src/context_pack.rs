//! The ContextPack kind: instructions and sources compiled into each run's budgeted context,
//! versioned by digest and promoted through the replay gate.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{KeyRef, MemoryScope, MemoryType, PromotionSpec, RevisionStatus};

/// Desired state of a ContextPack.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "ContextPack",
    doc = "Instructions and knowledge sources an Agent's runs draw on. Each spec change is a candidate revision; runs use the promoted revision.",
    namespaced,
    cel,
    validation = Rule::new("self.metadata.name.size() <= 51").message("a ContextPack's name is at most 51 characters: contextpack.<name> labels its revision snapshots and replay Jobs (a label value is at most 63); shorten metadata.name"),
    status = "ContextPackStatus",
    shortname = "cpack",
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
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.revisions.promoted",
        priority = 1
    ),
    printcolumn(name = "Budget", type_ = "integer", json_path = ".spec.tokenBudget"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.sources) || self.sources.all(s, !has(s.maxTokens) || s.maxTokens <= self.tokenBudget)").message("a source's maxTokens cannot exceed the pack's tokenBudget"))]
pub struct ContextPackSpec {
    /// System instructions placed first in every compiled context.
    #[schemars(length(min = 1, max = 65536))]
    pub instructions: String,
    /// Knowledge sources, compiled by descending priority until the budget is used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 64))]
    pub sources: Vec<ContextSource>,
    /// Tokens the compiled context (instructions + sources + request) may use.
    #[schemars(range(min = 256, max = 2_000_000))]
    pub token_budget: u32,
    /// How candidate revisions are promoted. Without it, revisions pass an empty gate and are
    /// promoted directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionSpec>,
}

/// What a source contributes; the compiler groups sections by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Rules and procedures the agent must follow.
    Guideline,
    /// Reference material (runbooks, docs).
    #[default]
    Reference,
    /// Worked examples.
    Example,
    /// Facts about the current situation.
    Evidence,
}

/// One knowledge source. Set exactly one of `inline`, `configMapRef` or `memory`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.inline) ? 1 : 0) + (has(self.configMapRef) ? 1 : 0) + (has(self.memory) ? 1 : 0) == 1").message("set exactly one of sources[].inline, sources[].configMapRef or sources[].memory"))]
pub struct ContextSource {
    /// Unique name, recorded when the source is cut or included.
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// guideline, reference, example or evidence.
    #[serde(default)]
    pub kind: SourceKind,
    /// Higher priorities are included first when the budget is tight (0–1000).
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
    /// Cap on tokens this source may use; longer content is cut and the cut is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2_000_000))]
    pub max_tokens: Option<u32>,
    /// When true, a run fails to start if this source cannot be included in full.
    #[serde(default)]
    pub required: bool,
    /// The content itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262_144))]
    pub inline: Option<String>,
    /// A ConfigMap key in the same namespace holding the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,
    /// Items recalled from memory when the run starts: the newest that match, that the run may
    /// see now (not expired; a subject's only under their consent in force). Which items were
    /// offered is recorded, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySource>,
}

/// What a memory source recalls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySource {
    /// agent (the running agent's items), subject (the Session's subject's, for the Agent's
    /// memory purpose; nothing when the Session names no subject) or tenant.
    pub scope: MemoryScope,
    /// Only items of this type: fact, preference, procedure or episode (all when unset).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub memory_type: Option<MemoryType>,
    /// Words every recalled item contains (none: the newest items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub query: Option<String>,
    /// Only items that refer to an entity of this type of the namespace's Ontology (found in
    /// their text by its `idPattern`, or named when they were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub entity_type: Option<String>,
    /// Items offered at most (newest first).
    #[serde(default = "default_max_items")]
    #[schemars(range(min = 1, max = 100))]
    pub max_items: u32,
}

fn default_max_items() -> u32 {
    20
}

fn default_priority() -> u32 {
    100
}

/// Observed state of a ContextPack.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextPackStatus {
    /// `Ready`, `Promoted`, `ReplayPassed`, `AwaitingPromotion`.
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
