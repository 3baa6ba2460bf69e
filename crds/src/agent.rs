//! The Agent kind: which model drives the run, which tools it may call (each typed by risk and
//! kind), which ContextPack, Policies and SandboxProfile govern it, and its run budget.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Approvers, KeyRef, LocalRef, MemoryScope, MemoryType, PromotionSpec, RevisionStatus, RunBudget,
    SafetyMode, ToolKind, ToolRisk, free_form_object,
};

/// Desired state of an Agent.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Agent",
    doc = "An AI agent: a model, a set of typed tools, and the context, policies and sandbox that govern every run. Runs are started by creating a Session that references the Agent.",
    namespaced,
    cel,
    validation = Rule::new("self.metadata.name.size() <= 57").message("an Agent's name is at most 57 characters: agent.<name> labels its revision snapshots and replay Jobs (a label value is at most 63); shorten metadata.name"),
    validation = Rule::new("!has(self.spec.promotion) || !has(self.spec.promotion.replay) || !has(self.spec.promotion.replay.selector) || ((!has(self.spec.promotion.replay.selector.agents) || size(self.spec.promotion.replay.selector.agents) == 0) && (!has(self.spec.promotion.replay.selector.matchLabels) || size(self.spec.promotion.replay.selector.matchLabels) == 0))").message("spec.promotion.replay.selector: an Agent's gate replays every recent session of this Agent, so it takes no selector; remove it (a selector narrows the gate of a Policy or ContextPack)"),
    status = "AgentStatus",
    shortname = "agent",
    category = "contextos",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.model"),
    printcolumn(name = "Tools", type_ = "integer", json_path = ".status.toolCount"),
    printcolumn(name = "Safety", type_ = "string", json_path = ".spec.safetyMode"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The model that plans and writes answers (named `primary` in `routing`).
    pub model: ModelSpec,
    /// Other models, and which answers each step: by the kind of step, the risk in play, the
    /// budget left, and in order when one fails. Without it `model` answers every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<crate::model_routing::ModelRouting>,
    /// The ContextPack whose promoted revision supplies instructions and sources.
    pub context_pack_ref: LocalRef,
    /// Policies checked for every tool call: each decides by its own rules, and the strictest
    /// verdict of an enforced policy stands (deny over approval over allow).
    #[x_kube(validation = Rule::new("self.map(p, p.name).all(n, self.exists_one(p, p.name == n))").message("policyRefs lists the same Policy twice; remove the duplicate"))]
    #[schemars(length(min = 1, max = 16))]
    pub policy_refs: Vec<LocalRef>,
    /// The SandboxProfile every runner pod of this Agent runs under.
    pub sandbox_profile_ref: LocalRef,
    /// Skills whose promoted revisions this Agent uses, in order: their tools join `tools`
    /// (after the Agent's own, under the Agent's policies) and their prompt fragments join the
    /// context under the pack's budget. A tool name two of them (or the Agent and one) declare,
    /// or a tool riskier than the SandboxProfile's `maxToolRisk`, leaves the Agent not Ready
    /// (reason SkillConflict) naming both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.map(s, s.name).all(n, self.exists_one(s, s.name == n))").message("skillRefs lists the same Skill twice; remove the duplicate"))]
    #[schemars(length(max = 16))]
    pub skill_refs: Vec<LocalRef>,
    /// The tools this agent may request. Names are unique; each declares its risk and kind.
    /// (One list as a whole: a GitOps source owns all of an Agent's tools.)
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.name == t.name))").message("two tools have the same name; tool names must be unique"))]
    #[schemars(length(max = 64))]
    pub tools: Vec<Tool>,
    /// Hard limits for every run of this agent (a Session may only lower them).
    pub budget: RunBudget,
    /// Autonomy of runs: `read_only` allows only read-only tools, `supervised` (default) asks
    /// for approval above `local_write`, `autonomous` leaves it to the policies.
    #[serde(default)]
    pub safety_mode: SafetyMode,
    /// How the critic reviews each step.
    #[serde(default)]
    pub critic: CriticSpec,
    /// Checks the final output must pass before a run may succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("two validators have the same name; validator names must be unique"))]
    #[schemars(length(max = 16))]
    pub validators: Vec<OutputValidator>,
    /// Who may approve this agent's tool calls when a policy requires approval and the rule
    /// names no approvers of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
    /// The replay gate a change to what this agent runs must pass: its own spec (tools and
    /// their risk, policyRefs, validators, model, budget) and the revisions of the pack and
    /// policies it uses. Without it, the gates of the objects it uses (now or in the promoted
    /// revision) apply; with neither, changes are promoted directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionSpec>,
    /// What the agent may keep between runs, and what for. Without it the agent keeps nothing,
    /// and a tool with `adapter.memory` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<AgentMemory>,
    /// Offers this agent to other agents over A2A, at the gateway service
    /// (`/a2a/<namespace>/<agent>`, its card below `.well-known/agent-card.json`). Each message
    /// a caller sends starts a Session of this Agent acting for the caller, who needs RBAC verb
    /// `invoke` on this agent (ClusterRole `contextos-a2a-caller`, or a Role naming it) and a
    /// token for audience `contextos-a2a`. Without it the agent is not reachable over A2A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a2a: Option<AgentA2a>,
    /// Offer each model turn only the tools that fit what the run is doing, rather than every
    /// tool: each tool is scored against the turn's intent (the request, the model's plan so
    /// far, the last results), and the best are offered within a token budget for tool
    /// schemas. Tools a policy denies outright are never offered. What each turn was offered,
    /// with the scores, is recorded, and a replay offers the same. Without it every turn is
    /// offered every tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<ToolDiscovery>,
    /// Shows results of read-only tools to the model once, and by a short alias after that
    /// (`@status.checkout-api#2`): a result the model already read in full is not pasted into
    /// the context again, and results older than `fullForSteps` steps are shown by alias only.
    /// The model reads an alias again with the built-in read-only tool `contextos_deref`.
    /// Without it every result stays in the context in full, however often it repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<ReadAliases>,
}

/// How results of read-only tools are shown by alias (see `spec.aliases`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadAliases {
    /// For how many steps after it was read a result stays in the context in full; after that
    /// the model sees its alias and size. Unset: a result stays in full, and only a repeat of a
    /// result the context already holds is shown by alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub full_for_steps: Option<u32>,
}

/// How an Agent's tools are chosen for each model turn (see `spec.discovery`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolDiscovery {
    /// Tools chosen by score per turn (those in `alwaysOffer` come on top).
    #[serde(default = "default_top_k")]
    #[schemars(range(min = 1, max = 64))]
    pub top_k: u32,
    /// The most tokens of tool names, descriptions and input schemas offered in one turn. The
    /// always-offered tools are offered whatever they take and count against it; of the others
    /// a tool that does not fit what is left is left out for smaller ones.
    #[serde(default = "default_tool_schema_tokens")]
    #[schemars(range(min = 64, max = 65536))]
    pub tool_schema_tokens: u32,
    /// Tools offered on every turn whatever their score (unless a policy denies them
    /// outright), e.g. the one that hands over to a person: the Agent's own or its skills'
    /// (a name that is neither leaves the Agent not Ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    pub always_offer: Vec<String>,
    /// How tools are scored: `embeddings` (default) by the similarity of sentence embeddings,
    /// with the embedding model the runner is configured with — BM25 when it has none or it
    /// fails, which the record says; `bm25` by keywords only.
    #[serde(default)]
    pub resolver: DiscoveryResolver,
}

/// How tools are scored against a turn's intent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryResolver {
    #[default]
    Embeddings,
    Bm25,
}

fn default_top_k() -> u32 {
    8
}

fn default_tool_schema_tokens() -> u32 {
    4000
}

/// What an Agent's A2A card tells callers. The card is generated from it and from the Agent:
/// its name, the JSON-RPC endpoint, streaming, and the highest risk of its tools as the most
/// it may do on a caller's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentA2a {
    /// What the agent does, for callers choosing an agent.
    #[schemars(length(min = 1, max = 2048))]
    pub description: String,
    /// What callers may ask of it, as its card lists them (A2A skills are descriptive: a
    /// message is one request in words, whichever skill it is meant for).
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.id == s.id))").message("a2a.skills lists the same id twice; skill ids must be unique"))]
    pub skills: Vec<A2aSkill>,
}

/// One skill of an agent's A2A card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct A2aSkill {
    /// Stable id, e.g. `triage-incident`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub id: String,
    /// Its name for people.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// What it does.
    #[schemars(length(min = 1, max = 1024))]
    pub description: String,
    /// Keywords.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    pub tags: Vec<String>,
    /// Example requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 512)))]
    pub examples: Vec<String>,
}

/// An agent's memory policy. A candidate (a `remember` call) becomes an item only if its type
/// and scope are listed in `keep`; personal data only in a subject's scope, and only while a
/// consent of that subject for `purpose` covers every category found in it. Everything else is
/// dropped, and the decision is recorded with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentMemory {
    /// What the memory is kept for, e.g. `support-history` (lowercase letters, digits and `-`).
    /// Subjects consent per purpose; recall offers a subject's items only for the purpose they
    /// were kept for.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub purpose: String,
    /// The kinds of item the agent may keep, each a type in a scope.
    #[x_kube(validation = Rule::new("self.all(k, self.exists_one(l, l.type == k.type && l.scope == k.scope))").message("memory.keep lists the same type and scope twice; remove the duplicate"))]
    #[schemars(length(min = 1, max = 12))]
    pub keep: Vec<MemoryKeep>,
    /// Days a kept item is recalled for; after that it is not offered again (none: until it is
    /// forgotten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub retain_days: Option<u32>,
    /// auto: what the policy allows is kept at once; required: a person approves each item
    /// first (`contextos memory held`, `approve`).
    #[serde(default)]
    pub review: Review,
    /// drop (default): a proposal holding personal data no consent covers is dropped; hold: it
    /// is held, for a person to approve once a consent covers it.
    #[serde(default)]
    pub without_consent: WithoutConsent,
    /// What a run about a person (a Session with `spec.subject`) may keep outside that
    /// person's memory. subjectOnly (default): nothing — what it learns is kept only in their
    /// scope, encrypted under their key, and erased with them. allScopes: what `keep` allows in
    /// agent or tenant scope is kept too, in the clear and not erased with the person (only
    /// items without personal data the detectors know: "refunds over 100 EUR need a supervisor").
    #[serde(default)]
    pub from_subject_runs: FromSubjectRuns,
    /// Personal data of the tenant's own kinds (badge ids, customer numbers), found beside the
    /// built-in detectors; each is a category `tenant:<name>` that consents name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("memory.patterns names the same pattern twice"))]
    #[schemars(length(max = 32))]
    pub patterns: Vec<PersonalDataPattern>,
}

/// A tenant's kind of personal data, found by a regular expression (RE2 syntax, no look-around).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersonalDataPattern {
    /// The category's name: it is `tenant:<name>` in consents and records.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// What it looks like, e.g. `\bBADGE-[0-9]{6}\b`.
    #[schemars(length(min = 1, max = 512))]
    pub regex: String,
}

/// How items the memory policy allows become memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Review {
    /// Kept as soon as they pass.
    #[default]
    Auto,
    /// Held until a person approves them.
    Required,
}

/// What becomes of a proposal holding personal data that no consent covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WithoutConsent {
    /// Dropped: not kept in memory (the call that proposed it stays in the run's record).
    #[default]
    Drop,
    /// Held for a person to approve once a consent covers it (or to reject).
    Hold,
}

/// What a run about a person may keep outside that person's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FromSubjectRuns {
    /// Only items in the subject's own scope.
    #[default]
    SubjectOnly,
    /// Items in any scope `keep` allows.
    AllScopes,
}

/// One kind of item an agent may keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryKeep {
    /// fact, preference, procedure or episode.
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    /// agent (this agent's), subject (the Session's subject's) or tenant (every agent's here).
    pub scope: MemoryScope,
}

/// Which model API the runner speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelProvider {
    /// Any OpenAI-compatible chat-completions endpoint with tool calling (OpenAI, vLLM,
    /// Ollama, llama.cpp server, …).
    OpenaiCompatible,
    /// Responses read in order from a script (a ConfigMap key); for demos and tests.
    Scripted,
}

/// The model behind an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider != 'openai_compatible' || has(self.endpoint)").message("model.endpoint is required when model.provider is openai_compatible (for example https://api.openai.com/v1)").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.provider != 'scripted' || has(self.scriptRef)").message("model.scriptRef is required when model.provider is scripted (a ConfigMap key holding the scripted responses)").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.provider == 'scripted' || !has(self.scriptRef)").message("model.scriptRef is read only when model.provider is scripted; remove it"),
    validation = Rule::new("self.provider != 'scripted' || (!has(self.endpoint) && !has(self.secretRef))").message("a scripted model reaches no endpoint: remove model.endpoint and model.secretRef")
)]
pub struct ModelSpec {
    /// Which API to speak: `openai_compatible` or `scripted`.
    pub provider: ModelProvider,
    /// Base URL of the chat-completions API, e.g. `https://api.openai.com/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
    /// Model name as the endpoint knows it, e.g. `gpt-4o-mini` or `llama3.1:8b`.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Secret key holding the API key, sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
    /// ConfigMap key holding scripted responses (provider `scripted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_ref: Option<KeyRef>,
    /// Upper bound on tokens the model may produce per turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_output_tokens: Option<u32>,
}

/// A capability the agent may request. Every call goes through the Tool Gateway, which checks
/// the declared risk and kind against the policies before anything happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.retry) || self.retry.maxAttempts <= 1 || self.idempotent || self.risk == 'read_only'").message("retry.maxAttempts > 1 is only allowed for idempotent or read_only tools: set idempotent: true or retry.maxAttempts: 1"))]
#[x_kube(validation = Rule::new("!has(self.adapter.memory) || !has(self.inputSchema)").message("a memory tool's arguments are fixed by the gateway: remove inputSchema"))]
#[x_kube(validation = Rule::new("!has(self.adapter.memory) || self.adapter.memory.operation != 'remember' || self.risk == 'local_write'").message("a remember tool writes the agent's memory: declare risk: local_write"))]
#[x_kube(validation = Rule::new("!has(self.adapter.memory) || self.adapter.memory.operation != 'recall' || (self.risk == 'read_only' && self.kind == 'recall')").message("a recall tool only reads memory: declare risk: read_only and kind: recall"))]
#[x_kube(validation = Rule::new("!has(self.cache) || (self.risk == 'read_only' && !has(self.adapter.memory))").message("only a read_only tool's results may be cached, and memory is never cached: remove cache or declare risk: read_only"))]
#[x_kube(validation = Rule::new("!has(self.cache) || self.kind != 'verify'").message("a verify tool checks what an action did and must read it afresh: remove cache"))]
#[x_kube(validation = Rule::new("!has(self.cache) || (!has(self.adapter.a2a) && !(has(self.adapter.mcp) && has(self.adapter.mcp.command)))").message("answers of another agent (a2a) or of an MCP server started for each Session (mcp.command) are the Session's own and are never cached: remove cache"))]
#[x_kube(validation = Rule::new("!self.name.startsWith('contextos_')").message("tool names starting with contextos_ are reserved for built-in tools; rename the tool"))]
pub struct Tool {
    /// Unique name the model uses to call the tool (lowercase letters, digits, `_` and `-`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z][a-z0-9_-]*$"))]
    pub name: String,
    /// What the tool does, shown to the model.
    #[serde(default)]
    #[schemars(length(max = 2048))]
    pub description: String,
    /// How much harm a call can do: read_only, local_write, network, delegated or destructive.
    pub risk: ToolRisk,
    /// What the tool is for: observe, recall, think_support, act or verify.
    pub kind: ToolKind,
    /// How the gateway reaches the tool. Exactly one adapter is set.
    pub adapter: ToolAdapter,
    /// JSON Schema the call's arguments must satisfy; checked by the gateway before sending.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub input_schema: Option<serde_json::Value>,
    /// Seconds one attempt may take.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: u32,
    /// Retries after failed attempts (only for idempotent or read_only tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Whether repeating a call with the same arguments has no further effect. The gateway
    /// always sends an idempotency key; this flag allows retries.
    #[serde(default)]
    pub idempotent: bool,
    /// The entities a call touches, by where their ids are in its arguments: each names a type
    /// of the namespace's Ontology and a JSON pointer into the arguments (`/service`,
    /// `/targets/*/name`, where `*` is every element or member) holding an id, or an array of
    /// ids. Policy conditions read them as
    /// `call.entities` and `call.entityTypes` (with the ids the Ontology's `idPattern`s find in
    /// any argument).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub touches: Vec<EntityArgument>,
    /// Requests this tool serves, in the words of the people and plans that ask for it (e.g.
    /// "why does the checkout pod keep restarting?"). Tool discovery (`spec.discovery`) matches
    /// a turn's intent against them as well as against the description; the model never sees
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub examples: Vec<String>,
    /// Answers a call from the gateway's cache while the same call (same arguments, same user)
    /// under the same promoted revisions was answered less than `ttlSeconds` ago, instead of
    /// reaching the tool again; the record says which call it came from. Only for read_only
    /// tools that are not `verify`, memory, A2A or a command-started MCP server. A newly
    /// promoted revision of the Agent, its skills, its ContextPack or a Policy, or a rotated
    /// secret, starts from an empty cache; a call of the Agent that is not read-only makes
    /// every cached result stale; runs about a person (`subject`) are never cached. Each
    /// gateway replica keeps its own cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ToolCache>,
}

/// How long a read-only tool's results are reused (see `tools[].cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolCache {
    /// Seconds a result is reused after the tool gave it (at most a day).
    #[schemars(range(min = 1, max = 86400))]
    pub ttl_seconds: u32,
}

/// Where a call's arguments hold the id of an entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityArgument {
    /// A type of the namespace's Ontology.
    #[serde(rename = "type")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub entity_type: String,
    /// A JSON pointer (RFC 6901) into the call's arguments: `/service`, `/target/name`;
    /// a `*` segment is every element of an array or member of an object.
    #[schemars(length(min = 2, max = 256), regex(pattern = r"^/"))]
    pub argument: String,
}

/// A tool call's timeout when `timeoutSeconds` is not set.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 30;

fn default_timeout_seconds() -> u32 {
    DEFAULT_TIMEOUT_SECONDS
}

/// Retry behaviour for one tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts in total, including the first.
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time, up to 30 s, with jitter.
    #[serde(default = "default_backoff_millis")]
    #[schemars(range(min = 10, max = 30_000))]
    pub initial_backoff_millis: u32,
}

fn default_backoff_millis() -> u32 {
    200
}

/// How the gateway reaches a tool. Set exactly one field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.http) ? 1 : 0) + (has(self.mcp) ? 1 : 0) + (has(self.webhook) ? 1 : 0) + (has(self.a2a) ? 1 : 0) + (has(self.memory) ? 1 : 0) + (has(self.openapi) ? 1 : 0) == 1").message("set exactly one of adapter.http, adapter.openapi, adapter.mcp, adapter.webhook, adapter.a2a or adapter.memory"))]
pub struct ToolAdapter {
    /// A plain HTTP endpoint; arguments are sent as the JSON body, or for GET and DELETE as
    /// query parameters (one per field: the tool's inputSchema must then be an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpAdapter>,
    /// An operation of an OpenAPI 3 document: parameters and body mapped from the arguments,
    /// the answer checked against the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openapi: Option<OpenApiAdapter>,
    /// A tool served by an MCP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpAdapter>,
    /// A webhook receiving the call signed with HMAC-SHA256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookAdapter>,
    /// Another agent reached over the A2A protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a2a: Option<A2aAdapter>,
    /// The agent's own memory, kept by the gateway under the Agent's `spec.memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryAdapter>,
}

impl ToolAdapter {
    /// The adapter this names (admission lets exactly one field be set; were several, `memory`
    /// first — the gateway answers a memory tool itself whatever else it names — then the
    /// order of [`Adapter`]), `None` if none is. Match on it rather than on the fields: a new
    /// adapter is then a compile error wherever adapters are told apart.
    pub fn chosen(&self) -> Option<Adapter<'_>> {
        if let Some(memory) = &self.memory {
            return Some(Adapter::Memory(memory));
        }
        if let Some(http) = &self.http {
            return Some(Adapter::Http(http));
        }
        if let Some(api) = &self.openapi {
            return Some(Adapter::OpenApi(api));
        }
        if let Some(mcp) = &self.mcp {
            return Some(Adapter::Mcp(mcp));
        }
        if let Some(hook) = &self.webhook {
            return Some(Adapter::Webhook(hook));
        }
        self.a2a.as_ref().map(Adapter::A2a)
    }

    /// The Secret key whose value the gateway sends as a bearer token, and the URL it goes to.
    pub fn bearer_secret(&self) -> Option<(&KeyRef, &str)> {
        match self.chosen()? {
            Adapter::Http(http) => http.secret_ref.as_ref().map(|s| (s, http.url.as_str())),
            Adapter::A2a(a2a) => a2a.secret_ref.as_ref().map(|s| (s, a2a.url.as_str())),
            Adapter::OpenApi(api) => api.secret_ref.as_ref().map(|s| (s, api.base_url())),
            // A webhook's Secret signs the call (HMAC); it is never sent.
            Adapter::Mcp(_) | Adapter::Webhook(_) | Adapter::Memory(_) => None,
        }
    }
}

/// The one adapter of a tool (see [`ToolAdapter::chosen`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adapter<'a> {
    Http(&'a HttpAdapter),
    OpenApi(&'a OpenApiAdapter),
    Mcp(&'a McpAdapter),
    Webhook(&'a WebhookAdapter),
    A2a(&'a A2aAdapter),
    Memory(&'a MemoryAdapter),
}

impl<'a> Adapter<'a> {
    /// Its field's name under `adapter` (`http`, `openapi`, `mcp`, `webhook`, `a2a`, `memory`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::OpenApi(_) => "openapi",
            Self::Mcp(_) => "mcp",
            Self::Webhook(_) => "webhook",
            Self::A2a(_) => "a2a",
            Self::Memory(_) => "memory",
        }
    }

    /// The most bytes of an answer the gateway reads, for adapters that say.
    pub fn max_response_bytes(self) -> Option<u32> {
        match self {
            Self::Http(http) => Some(http.max_response_bytes),
            Self::OpenApi(api) => Some(api.max_response_bytes),
            Self::Mcp(mcp) => Some(mcp.max_response_bytes),
            Self::A2a(a2a) => Some(a2a.max_response_bytes),
            Self::Webhook(_) | Self::Memory(_) => None,
        }
    }
}

/// A memory tool. Its arguments are fixed by the gateway (set no `inputSchema`):
/// `remember` takes `{text, type, scope}` and proposes a candidate item (risk `local_write`);
/// `recall` takes `{query, type, scope, maxItems}` and answers with the items the run may see
/// (risk `read_only`, kind `recall`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryAdapter {
    /// remember or recall.
    pub operation: MemoryOperation,
}

/// What a memory tool does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryOperation {
    /// Proposes a memory item (the candidate stage decides whether it is kept).
    Remember,
    /// Reads the items this run may see.
    Recall,
}

/// HTTP method of an HTTP tool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

/// An HTTP/OpenAPI tool endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpAdapter {
    /// Full URL of the operation.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// HTTP method; arguments go in the query string for GET and DELETE, in the body otherwise.
    #[serde(default)]
    pub method: HttpMethod,
    /// Largest response body accepted; longer responses are cut and the cut is recorded.
    #[serde(default = "default_max_response_bytes")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_response_bytes: u32,
    /// Secret key whose value is sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
}

/// A tool bound to one operation of an OpenAPI 3 document (JSON or YAML). The gateway reads the
/// document (at most 8 MiB, read again after a minute), finds the operation by its
/// `operationId`, and maps the call's arguments onto it: each path, query and header parameter
/// is the argument of its name, the JSON request body is the argument `body`; arguments the
/// operation does not take are refused. The answer is checked against the schema the document
/// gives for its status. The operation's method bounds the tool's risk: only a GET may be
/// `read_only`; POST, PUT and PATCH are at least `network`; DELETE is `destructive`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenApiAdapter {
    /// URL of the OpenAPI 3 document.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub document: String,
    /// The `operationId` of the operation the tool calls.
    #[schemars(length(min = 1, max = 256))]
    pub operation_id: String,
    /// Base URL of the API, in place of the document's first `servers` entry. Without it, that
    /// entry (relative to the document's URL) must be on the document's own scheme, host and
    /// port, so a document cannot send calls, and the tool's credentials, elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s?#]+$"))]
    pub server: Option<String>,
    /// SHA-256 (64 hex digits) the document must have: a changed document is refused before
    /// anything is sent, until this is updated (after reviewing what changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub document_sha256: Option<String>,
    /// Largest answer accepted; a longer one is cut (and not checked), and the cut is recorded.
    #[serde(default = "default_max_response_bytes")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_response_bytes: u32,
    /// Secret key whose value is sent as a bearer token (to the API, and to the document when
    /// it is on the API's origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
}

impl OpenApiAdapter {
    /// Where the calls go, as far as the declaration says: the `server`, else the document.
    pub fn base_url(&self) -> &str {
        self.server.as_deref().unwrap_or(&self.document)
    }
}

/// A tool's response cap when `maxResponseBytes` is not set.
pub const DEFAULT_MAX_RESPONSE_BYTES: u32 = 1_048_576;

fn default_max_response_bytes() -> u32 {
    DEFAULT_MAX_RESPONSE_BYTES
}

/// A tool on an MCP server, reached over streamable HTTP (`url`) or stdio (`command`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.command)").message("set exactly one of adapter.mcp.url (streamable HTTP) or adapter.mcp.command (stdio)"))]
pub struct McpAdapter {
    /// Streamable-HTTP endpoint of the MCP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// Command (and arguments) that starts the MCP server on stdio inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 1024)))]
    pub command: Option<Vec<String>>,
    /// Tool name on the MCP server, when it differs from the ContextOS tool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub tool: Option<String>,
    /// Largest result accepted, in bytes; longer results are cut and the cut is recorded. A
    /// server message larger than a few times this is refused while it is read.
    #[serde(default = "default_max_response_bytes")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_response_bytes: u32,
}

/// A webhook: the call is POSTed as JSON with an HMAC-SHA256 signature header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAdapter {
    /// URL receiving the signed POST.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Secret key holding the HMAC signing key.
    pub secret_ref: KeyRef,
}

/// Another agent reached over A2A (protocol 1.x, JSON-RPC binding). The gateway reads the
/// remote agent's card at `<url>/.well-known/agent-card.json`, sends the call's arguments as one
/// message (streamed when the card says it can stream), follows the task to its end, and
/// cancels it when the tool's timeout passes. A remote task that asks for input pauses the
/// Session for a person, who is shown the question (`status.unresolvedCall`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct A2aAdapter {
    /// Base URL of the remote agent: its card is at `<url>/.well-known/agent-card.json`, and the
    /// JSON-RPC endpoint the card names must be on the same scheme, host and port.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Skill to invoke on the remote agent; it must be one its card lists. Sent in the
    /// message's metadata (`skill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub skill: Option<String>,
    /// The most the remote agent may do on this call's behalf. The tool's own `risk` must be
    /// at least this (policies judge the call by the worst it can lead to), and a remote agent
    /// whose card declares a higher ceiling (the `https://contextos.dev/a2a/risk-ceiling/v1`
    /// extension, as ContextOS agents publish it) is refused before anything is sent.
    pub risk_ceiling: ToolRisk,
    /// Largest answer accepted, in bytes (a streamed task's events together); a larger one is
    /// refused while it is read.
    #[serde(default = "default_max_response_bytes")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_response_bytes: u32,
    /// Secret key whose value is sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
}

/// A Functional State signal: a deterministic per-step pressure measure read by the critic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FunctionalSignal {
    /// The run is close to a budget limit.
    Budget,
    /// The agent repeats the same call or plan.
    Loop,
    /// The answer lacks supporting tool results.
    Evidence,
    /// A call was denied or is waiting for approval.
    Gate,
    /// Tool results contradict each other or the plan.
    Conflict,
}

/// How the critic reviews each step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CriticSpec {
    /// Times the critic may send a step back for revision before it halts the run.
    #[serde(default = "default_max_revisions")]
    #[schemars(range(min = 0, max = 10))]
    pub max_revisions: u32,
    /// Signals that make the critic escalate to a person instead of continuing: the run ends
    /// `Failed` with reason `Escalated` and the signal's notes, for a person to look at (and
    /// start again), whatever `maxRevisions` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub escalate_on: Vec<FunctionalSignal>,
}

impl Default for CriticSpec {
    fn default() -> Self {
        Self {
            max_revisions: default_max_revisions(),
            escalate_on: Vec::new(),
        }
    }
}

fn default_max_revisions() -> u32 {
    2
}

/// A check the final output must pass. Set exactly one of `jsonSchema` or `cel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.jsonSchema) != has(self.cel)").message("set exactly one of validators[].jsonSchema or validators[].cel"))]
pub struct OutputValidator {
    /// Unique name, shown when the check fails.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z][a-z0-9_-]*$"))]
    pub name: String,
    /// JSON Schema the output (parsed as JSON) must satisfy.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::free_form::bounded"
    )]
    #[schemars(schema_with = "free_form_object")]
    pub json_schema: Option<serde_json::Value>,
    /// CEL expression over `output` (string) and `json` (parsed output, if JSON) that must be true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cel: Option<String>,
    /// Message recorded when the check fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// Observed state of an Agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// `Ready` is True when every reference resolves and every policy compiles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of tools declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_count: Option<u32>,
    /// Digest of the promoted ContextPack revision new Sessions will pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_pack_digest: Option<String>,
    /// Digests of the promoted Policy revisions new Sessions will pin, in `policyRefs` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_digests: Vec<String>,
    /// Revisions of what the agent runs (its composition: agent spec, pack and policy
    /// revisions): new Sessions pin the promoted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionStatus>,
    /// The gate the candidate composition passes, as the operator derived it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_gate: Option<AgentGateStatus>,
    /// The gates in force: the Agent's own and those of every object its promoted
    /// compositions used, as they were when promoted. Moving away from an object keeps its gate
    /// (only an approver's bypass sheds it); admission takes the Agent's approvers from here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub promoted_gates: Vec<MemberGate>,
}

/// Where an Agent's promotion gate comes from and who governs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentGateStatus {
    /// `Agent` (its spec.promotion) and the gated objects it uses or used, e.g.
    /// `Policy/guardrails`. Empty when no gate applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 96), inner(length(max = 300)))]
    pub from: Vec<String>,
    /// Who may approve or bypass a promotion of this Agent (admission reads it): everyone
    /// listed by the gates in force (`promotedGates`), never by a candidate's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
}

/// The promotion gate of one object an Agent uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberGate {
    /// `Agent` (its own gate), `Policy` or `ContextPack`.
    #[schemars(length(max = 32))]
    pub kind: String,
    #[schemars(length(max = 253))]
    pub name: String,
    pub promotion: PromotionSpec,
}
