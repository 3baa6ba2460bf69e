//! Value types shared by several kinds: references, the tool taxonomy, budgets, safety modes,
//! approvers and the promotion spec of ContextPacks and Policies.

use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A reference to another ContextOS object by name. References never cross namespaces: the
/// object must live in the same namespace (tenant) as the referrer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRef {
    /// Name of the object in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// A key in a Secret or ConfigMap in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within its data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// How much harm a tool can do. Every tool declares one; policies and safety modes match on it.
/// Ordered from least to most dangerous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolRisk {
    /// Reads data; changes nothing anywhere.
    ReadOnly,
    /// Writes only inside the run's own sandbox (scratch files, local state).
    LocalWrite,
    /// Talks to other systems over the network in ways that may change them.
    Network,
    /// Acts on behalf of the delegating user with their credentials.
    Delegated,
    /// Deletes or irreversibly changes something outside the sandbox.
    Destructive,
}

impl ToolRisk {
    /// All risks, least dangerous first.
    pub const ALL: [ToolRisk; 5] = [
        Self::ReadOnly,
        Self::LocalWrite,
        Self::Network,
        Self::Delegated,
        Self::Destructive,
    ];

    /// The wire name (`read_only`, …) used in YAML, CEL and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "read_only",
            Self::LocalWrite => "local_write",
            Self::Network => "network",
            Self::Delegated => "delegated",
            Self::Destructive => "destructive",
        }
    }
}

/// What a tool is for in the decision loop. Every tool declares one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    /// Looks at the world (search, get, list).
    Observe,
    /// Reads the agent's own memory.
    Recall,
    /// Helps reasoning without touching the world (calculators, formatters).
    ThinkSupport,
    /// Changes the world.
    Act,
    /// Checks that an action had the intended effect.
    Verify,
}

impl ToolKind {
    /// The wire name (`observe`, …) used in YAML, CEL and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Recall => "recall",
            Self::ThinkSupport => "think_support",
            Self::Act => "act",
            Self::Verify => "verify",
        }
    }
}

/// What a memory item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryType {
    /// Something true about the world ("the payments service runs in eu-west-1").
    Fact,
    /// How someone likes things done ("prefers summaries in German").
    Preference,
    /// How to do something ("restart the worker before clearing the queue").
    Procedure,
    /// What happened in a run ("the 3 May outage was a full disk").
    Episode,
}

/// Whose memory an item is: one agent's, one subject's (a person's, under their consent), or
/// every agent's of the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryScope {
    Agent,
    Subject,
    Tenant,
}

/// How much autonomy a run has. Ordered from most to least restrictive; a Session may only move
/// towards `read_only`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SafetyMode {
    /// Only `read_only` tools may run; every other call is denied.
    ReadOnly,
    /// Calls above `local_write` need an approval even where a policy would allow them.
    #[default]
    Supervised,
    /// Policies alone decide.
    Autonomous,
}

impl SafetyMode {
    /// The wire name (`read_only`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "read_only",
            Self::Supervised => "supervised",
            Self::Autonomous => "autonomous",
        }
    }
}

/// Hard limits on one run. The loop stops (and the Session fails with reason `BudgetExhausted`)
/// when any of them is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunBudget {
    /// Maximum plan/execute/critic iterations.
    #[schemars(range(min = 1, max = 1000))]
    pub max_steps: u32,
    /// Maximum model tokens (prompt + completion) over the whole run.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_tokens: u64,
    /// Maximum tool calls (allowed or not) over the whole run.
    #[schemars(range(min = 1, max = 10_000))]
    pub max_tool_calls: u32,
    /// Maximum wall-clock seconds the run spends running, over all its attempts (checked
    /// between steps). Time paused for an approval or a person's finding does not count; a
    /// runner pod's own deadline is its SandboxProfile's `activeDeadlineSeconds`.
    #[schemars(range(min = 1, max = 604_800))]
    pub max_wall_seconds: u32,
    /// Maximum tool calls one model turn may ask for; calls past it are dropped (and the drop
    /// recorded) before any of them is decided.
    #[serde(
        default = "default_max_tool_calls_per_turn",
        skip_serializing_if = "is_default_max_tool_calls_per_turn"
    )]
    #[schemars(range(min = 1, max = 256))]
    pub max_tool_calls_per_turn: u32,
}

/// Default of [`RunBudget::max_tool_calls_per_turn`].
pub const DEFAULT_MAX_TOOL_CALLS_PER_TURN: u32 = 16;

fn default_max_tool_calls_per_turn() -> u32 {
    DEFAULT_MAX_TOOL_CALLS_PER_TURN
}

// Left out when it is the default, so budgets signed before the field existed keep their bytes.
fn is_default_max_tool_calls_per_turn(value: &u32) -> bool {
    *value == DEFAULT_MAX_TOOL_CALLS_PER_TURN
}

/// A partial budget used by Sessions to tighten their Agent's budget. Each field, when set, must
/// not exceed the Agent's value (the operator rejects a loosening override with `Ready=False`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetOverride {
    /// Lower `maxSteps` for this Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_steps: Option<u32>,
    /// Lower `maxTokens` for this Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_tokens: Option<u64>,
    /// Lower `maxToolCalls` for this Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_tool_calls: Option<u32>,
    /// Lower `maxWallSeconds` for this Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604_800))]
    pub max_wall_seconds: Option<u32>,
}

/// People allowed to approve something, by Kubernetes user name or group (as the API server
/// authenticates them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// User names, e.g. `alice@example.com` or `system:serviceaccount:ops:release-bot`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub users: Vec<String>,
    /// Group names, e.g. `sre-oncall`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub groups: Vec<String>,
}

impl Approvers {
    /// True when nobody is listed.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// How a candidate revision of a ContextPack or Policy is promoted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromotionMode {
    /// Promote as soon as the replay gate passes.
    #[default]
    Automatic,
    /// After the replay gate passes, wait for one of `approvers` (condition `AwaitingPromotion`).
    Manual,
}

/// Which recorded sessions a replay gate re-runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySelector {
    /// Only sessions of these Agents (by name). Empty means every Agent using this object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub agents: Vec<String>,
    /// Only sessions whose labels contain all of these (at most 16).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub match_labels: std::collections::BTreeMap<String, String>,
}

/// The replay gate: how many recorded sessions to re-run and how much divergence is tolerated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySpec {
    /// How many recorded sessions to re-run (the most recent first).
    #[serde(default = "default_sample_size")]
    #[schemars(range(min = 1, max = 1000))]
    pub sample_size: u32,
    /// Only sessions recorded within this many hours.
    #[serde(default = "default_window_hours")]
    #[schemars(range(min = 1, max = 8760))]
    pub window_hours: u32,
    /// Which sessions qualify.
    #[serde(default)]
    pub selector: ReplaySelector,
    /// The gate fails when more than this percentage of the replayed steps diverge — over all
    /// the sessions replayed, or in any one of them. 0 means any divergence fails the gate.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_divergence_percent: u32,
    /// Re-execution: ask the recorded model again with the candidate's context, instead of only
    /// playing its recorded turns, so a change to what the model is told (instructions,
    /// sources) is judged by what the model then does. Unset: a ContextPack's or an Agent's gate
    /// re-executes with 3 samples, a Policy's replays decisions only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reexecute: Option<ReexecuteSpec>,
}

impl Default for ReplaySpec {
    fn default() -> Self {
        Self {
            sample_size: default_sample_size(),
            window_hours: default_window_hours(),
            selector: ReplaySelector::default(),
            max_divergence_percent: 0,
            reexecute: None,
        }
    }
}

/// How a replay gate re-executes recorded sessions. Tool calls are answered from the record
/// when the recorded run made the same call, and refused (never executed) when it did not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReexecuteSpec {
    /// How many times each recorded session is re-executed, to bound the model's
    /// nondeterminism (the sample that diverges most is judged). 0 turns re-execution off —
    /// except for a Proposal's candidate of a ContextPack, which is a change to what the model
    /// is told and is always re-executed (3 samples).
    #[schemars(range(min = 0, max = 20))]
    pub samples: u32,
    /// The most model tokens one gate may spend re-executing, counted turn by turn: once they
    /// are spent no more turns are asked for, and the gate fails, saying so. Unset: no limit
    /// beyond `sampleSize` × `samples` sessions and the gate's 20 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u64>,
}

impl ReexecuteSpec {
    /// What an unset `reexecute` means for a gate that re-executes by default.
    pub const DEFAULT_SAMPLES: u32 = 3;
}

fn default_sample_size() -> u32 {
    20
}

fn default_window_hours() -> u32 {
    168
}

/// Promotion of new revisions of a ContextPack or Policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.mode != 'manual' || (has(self.approvers) && ((has(self.approvers.users) && size(self.approvers.users) > 0) || (has(self.approvers.groups) && size(self.approvers.groups) > 0)))")
        .message("promotion.mode 'manual' needs at least one entry in promotion.approvers.users or promotion.approvers.groups")
        .reason(Reason::FieldValueRequired)
)]
pub struct PromotionSpec {
    /// `automatic` promotes when replay passes; `manual` also waits for an approver.
    #[serde(default)]
    pub mode: PromotionMode,
    /// The replay gate every candidate revision must pass.
    #[serde(default)]
    pub replay: ReplaySpec,
    /// Who may approve a promotion when `mode` is `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
}

/// A free-form JSON object (kept verbatim by the API server), and one unit to server-side apply:
/// the API server then records who set the field, not each field inside it. Were it tracked
/// field by field, its record (`metadata.managedFields`) would nest as deep as the object, and
/// an object nested past a JSON decoder's limit would fail every list of its kind in the
/// metadata, before the field's own bound (see [`crate::free_form`]) is reached.
pub fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-map-type": "atomic",
    })
}

/// Optional variant of [`free_form_object`].
pub fn optional_free_form_object(generator: &mut SchemaGenerator) -> Schema {
    free_form_object(generator)
}

/// Revision bookkeeping of a ContextPack or Policy: which spec digest is the candidate, which is
/// promoted (the one Agents and new Sessions use), and what the last replay gate found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    /// `sha256:<hex>` of the canonical JSON of the current spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Digest of the revision in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<String>,
    /// Name of the ControllerRevision holding the promoted snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_snapshot: Option<String>,
    /// Result of the replay gate for `candidate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySummary>,
    /// How the revision in force was promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_by: Option<PromotedBy>,
    /// The revision in force before it: what its replay gate compared against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<String>,
    /// Serial number of `candidate`: one more each time the candidate changes, to any digest
    /// (one the object had before too). A replay Job's order names it, and only a verdict
    /// ordered for the candidate of now counts — not one of an earlier time the object had
    /// the same spec, replayed against what ran then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_serial: Option<u64>,
}

impl RevisionStatus {
    /// These revisions with `digest` as the candidate: its serial one more if that is a change.
    pub fn with_candidate(&self, digest: &str) -> Self {
        let serial = self.candidate_serial.unwrap_or(0);
        Self {
            candidate_serial: Some(if self.candidate.as_deref() == Some(digest) {
                serial
            } else {
                serial + 1
            }),
            candidate: Some(digest.to_owned()),
            ..self.clone()
        }
    }
}

/// How a revision came to be in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromotedBy {
    /// It passed its replay gate (and an approver's approval in `manual` mode).
    Replay,
    /// An approver promoted it without a replay (`contextos.dev/promote-without-replay`).
    Bypass,
    /// No promotion gate applied to it.
    Ungated,
    /// The object's first revision (nothing of it ran before).
    FirstRevision,
    /// Its gate found no recorded session to replay it against.
    NoHistory,
    /// An Agent's composition whose every change was promoted through the changed object's own
    /// gate.
    Members,
    /// A Proposal of it, replayed and accepted by one of its approvers.
    Proposal,
    /// A Skill revision that passed every scenario of its evaluation suite.
    Evals,
}

impl PromotedBy {
    /// Whether a gate (replay or an approver) decided it.
    pub fn gated(self) -> bool {
        matches!(self, Self::Replay | Self::Bypass | Self::Proposal | Self::Evals)
    }
}

/// Summary of one replay gate run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySummary {
    /// Name of the batch/v1 Job that ran the replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Recorded sessions re-run.
    pub sessions: u32,
    /// Decisions compared.
    pub decisions: u32,
    /// Decisions that came out differently.
    pub divergences: u32,
    /// Whether the divergence stayed within the threshold.
    pub passed: bool,
    /// The most significant divergences, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_divergences: Vec<String>,
    /// SHA-256 of the full replay report (JSON), kept with the records in the tenant's record
    /// store: `contextos records blob <hash>` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// What re-executing the sessions took and found, when the gate re-executed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reexecution: Option<ReexecutionSummary>,
    /// What an Agent candidate's model routing would change in the sessions, when it routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingChange>,
}

/// A candidate's model routing replayed over recorded sessions: each recorded turn routed
/// again by the candidate's rules with the facts the run had then.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingChange {
    /// Model turns looked at.
    pub turns: u32,
    /// Turns the candidate would send to another model than answered them.
    pub rerouted: u32,
    /// What the turns cost as recorded, per currency (e.g. `0.0123 USD`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorded_cost: Vec<String>,
    /// What the same tokens cost at the candidate's models' prices (an estimate: another model
    /// would have answered otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidate_cost: Vec<String>,
    /// Turns that could not be priced on one side.
    #[serde(default)]
    pub unpriced_turns: u32,
}

/// A gate's re-execution in figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReexecutionSummary {
    /// Samples per recorded session.
    pub samples: u32,
    /// Samples (over all sessions) whose decisions, verdicts or outcome differed from the record.
    pub diverged_samples: u32,
    /// Calls the model made that no recorded run made: refused, never executed.
    pub refused_calls: u32,
    /// Model tokens the re-execution spent (the gate's cost).
    pub tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::RevisionStatus;

    #[test]
    fn a_candidates_serial_moves_on_each_change_even_back_to_an_earlier_spec() {
        let first = RevisionStatus::default().with_candidate("sha256:a");
        assert_eq!(first.candidate_serial, Some(1));
        // Looked at again, the same candidate keeps its serial.
        assert_eq!(first.with_candidate("sha256:a").candidate_serial, Some(1));
        let other = first.with_candidate("sha256:b");
        let back = other.with_candidate("sha256:a");
        assert_eq!(
            (other.candidate_serial, back.candidate_serial),
            (Some(2), Some(3))
        );
        // Status written before serials were kept: its candidate counts as serial 0.
        let older = RevisionStatus {
            candidate: Some("sha256:a".into()),
            ..RevisionStatus::default()
        };
        assert_eq!(older.with_candidate("sha256:a").candidate_serial, Some(0));
    }
}
