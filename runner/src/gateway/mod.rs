//! The Tool Gateway: the one place a tool call can become an effect. For every envelope it
//! verifies the signed RunContext, checks the tool and its arguments, asks the policies,
//! handles approvals, and only then executes — once per idempotency key, with retries,
//! timeouts and a circuit breaker — recording each step in the run's DecisionRecord.

pub mod a2a_server;
pub mod adapters;
pub mod allowance;
pub mod approvals;
pub mod bundle;
pub mod capabilities;
pub mod consent_objects;
pub mod egress;
pub mod envelope;
pub mod fair;
pub mod feedback_objects;
pub mod identity;
pub mod intents;
pub mod metrics;
pub mod object_chains;
pub mod readers;
pub mod refused_tokens;
pub mod reliability;
pub mod remote;
pub mod result_cache;
pub mod run_log;
pub mod service;
pub mod session_watch;
pub(crate) mod shares;
pub(crate) mod shelves;
pub mod tenancy;

/// What a re-executed run is told of a call its recorded run never made: it is not executed.
pub const UNRECORDED_CALL: &str = "re-execution: the recorded run never made this call, so it is not executed; only recorded calls are answered";

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use contextos_crds::{
    agent::Tool,
    common::{Approvers, ToolRisk},
    policy::PolicyEffect,
    session::{ApprovalDecision, MAX_APPROVALS},
};
use serde_json::Value;
use tracing::Instrument as _;

use self::{
    adapters::{AdapterError, CallContext},
    approvals::{ApprovalBook, Attested as _},
    envelope::CallEnvelope,
    reliability::{CircuitBreakers, backoff},
};
use crate::{
    keys::PublicKey,
    policy::{CallFacts, PolicySet, RunFacts, StateFacts},
    records::{
        EntryBody, RecordError, RecordStore, Recorder,
        entry::{CachedRead, PolicyDecisionRecord, ToolCallRecord, ToolResultRecord},
        recorder::now_ms,
    },
    run_context::{RunContext, RunContextError, SignedRunContext},
};

/// What happened to a call.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CallOutcome {
    /// The tool ran; its result.
    Executed(ToolResultRecord),
    /// Refused; the reason names the rule or check.
    Denied { rule: String, reason: String },
    /// Started before an interruption, with no recorded result, and not safe to send again:
    /// a human must find out whether it acted.
    OutcomeUnknown {
        /// The call, or for a remote agent's question the question's id (`<call>.q<n>`, what a
        /// person's resolution names).
        call_id: String,
        reason: String,
        /// The gateway service's signature (tenant key) over what it reports (see
        /// [`approvals::UnresolvedReport`]); none in process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attestation: Option<String>,
        /// For a remote agent's question: the call it belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_call: Option<String>,
        /// What the call cost, for its first question: a priced call is charged once it went
        /// out, and a question means it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<crate::pricing::TurnCost>,
    },
    /// Started moments ago by another executor (a gateway replica) and not finished yet.
    InProgress { call_id: String },
    /// Waits for one of `approvers` to approve `call_hash`.
    NeedsApproval {
        call_hash: String,
        rule: String,
        reason: String,
        approvers: Approvers,
        /// The gateway service's signature (tenant key) over the request (see
        /// [`approvals::ApprovalRequest`]); none in process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attestation: Option<String>,
    },
}

impl CallOutcome {
    /// What this outcome charges: a result's cost, or a first question's.
    pub fn cost(&self) -> Option<&crate::pricing::TurnCost> {
        match self {
            Self::Executed(result) => result.cost.as_ref(),
            Self::OutcomeUnknown { cost, .. } => cost.as_ref(),
            _ => None,
        }
    }
}

/// A call whose remote agent keeps asking is ended after this many questions (its task
/// cancelled): people have better things to do.
pub const MAX_QUESTIONS: u32 = 4;
/// Questions a run's remote agents may ask in all: a Session holds at most 16 resolutions,
/// and some must stay free for calls whose outcome is unknown.
pub const MAX_RUN_QUESTIONS: u32 = 12;

/// Errors that stop the gateway from deciding at all (the call is not executed).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("recording the call failed: {0}")]
    Record(#[from] RecordError),
}

/// A tool as the gateway knows it: the Agent's declaration plus resolved secrets.
#[derive(Debug)]
pub struct CatalogTool {
    pub spec: Tool,
    schema: Option<jsonschema::Validator>,
    pub bearer_token: Option<String>,
    pub hmac_key: Option<Vec<u8>>,
    /// Its price per call, as the run pinned it (none: its calls cost nothing in money).
    pub price: Option<crate::pricing::PinnedToolPrice>,
}

impl CatalogTool {
    /// Compiles the tool's input schema; an invalid schema is an error naming the tool.
    pub fn new(mut spec: Tool) -> Result<Self, String> {
        if let Some(memory) = spec.adapter.memory {
            // Its arguments are the gateway's to define, and a retried call keeps nothing twice.
            spec.input_schema = Some(crate::memory::desk::tool_schema(memory.operation));
            spec.idempotent = true;
        }
        let schema =
            match &spec.input_schema {
                Some(s) => Some(crate::json_schema::compile(s).map_err(|e| {
                    format!("tool {}: inputSchema is not a valid JSON Schema: {e}", spec.name)
                })?),
                None => None,
            };
        Ok(Self {
            spec,
            schema,
            bearer_token: None,
            hmac_key: None,
            price: None,
        })
    }
}

/// Requests under one call id remembered at most (a runner may send one again and again).
const MAX_REQUESTS_PER_CALL_ID: usize = 8;

/// The requests a record holds under one call id, latest last, each with whether a decision let
/// it through — so that a result read later is matched to the request it answers. A runner
/// chooses call ids and may send one again with another call (to another replica, while the
/// first is carried out); the request that gets a result is the latest one not refused.
/// A request and its decision are written in one batch, so nothing comes between them.
#[derive(Clone, Debug)]
struct Asked<T>(Vec<(T, bool)>);

impl<T> Default for Asked<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Asked<T> {
    fn requested(&mut self, request: T) {
        if self.0.len() >= MAX_REQUESTS_PER_CALL_ID {
            self.0.remove(0);
        }
        self.0.push((request, false));
    }

    /// The call id of an entry that says what became of a request (see [`Self::follow`]).
    fn followed(body: &EntryBody) -> Option<&str> {
        match body {
            EntryBody::PolicyDecision(decision) if !decision.dry_run => Some(&decision.call_id),
            EntryBody::ApprovalRequested { call_id, .. } | EntryBody::ApprovalGranted { call_id, .. } => {
                Some(call_id)
            }
            _ => None,
        }
    }

    /// What `body` (one [`Self::followed`] names this call id) says of the latest request. A
    /// decision (a dry run's aside): let through, it waits for its result; denied, it gets
    /// none; held for an approval, it is approved (then waits for its result) or the run
    /// pauses for one (it gets none: the call is requested again when the run resumes). A
    /// decision with no undecided request before it — a refusal made before the request was
    /// recorded — is about none of them.
    fn follow(&mut self, body: &EntryBody) {
        match body {
            EntryBody::PolicyDecision(decision) => match decision.enforced {
                PolicyEffect::Allow => self.let_through(),
                PolicyEffect::Deny => self.ended(),
                PolicyEffect::RequireApproval => {}
            },
            EntryBody::ApprovalGranted { .. } => self.let_through(),
            EntryBody::ApprovalRequested { .. } => self.ended(),
            _ => {}
        }
    }

    fn let_through(&mut self) {
        if let Some((_, decided)) = self.0.last_mut() {
            *decided = true;
        }
    }

    fn ended(&mut self) {
        if self.0.last().is_some_and(|(_, decided)| !*decided) {
            self.0.pop();
        }
    }

    /// The request a result under this call id answers.
    fn answered(&self) -> Option<&T> {
        self.0.last().map(|(request, _)| request)
    }
}

/// A call read from a record, until its result is.
#[derive(Clone, Debug)]
struct RequestedCall {
    idempotency_key: String,
    call_hash: String,
    tool: String,
    risk: ToolRisk,
}

/// A call that succeeded, by its idempotency key: what was called (the call's hash) and what it
/// returned. A call sent again under the key is answered from it only if it is the same call.
#[derive(Clone, Debug)]
struct Completed {
    call_hash: String,
    result: ToolResultRecord,
}

/// Per-run counters the policies' budgets read, and the calls the run asked approval for.
#[derive(Clone, Debug, Default)]
struct RunCounters {
    calls: u32,
    per_tool: HashMap<String, u32>,
    destructive: u32,
    approvals_asked: HashSet<String>,
}

/// The gateway for one agent in one tenant.
#[derive(Debug)]
pub struct ToolGateway {
    pub(crate) tenant: String,
    pub(crate) agent: String,
    trusted_key: PublicKey,
    tools: HashMap<String, CatalogTool>,
    policies: PolicySet,
    agent_approvers: Approvers,
    http: reqwest::Client,
    mcp: adapters::mcp::McpClients,
    a2a: adapters::a2a::A2aClient,
    openapi: adapters::openapi::OpenApiClient,
    breakers: CircuitBreakers,
    approvals: ApprovalBook,
    /// Results by idempotency key: a resubmitted call returns its first result.
    completed: Mutex<HashMap<String, Completed>>,
    /// A re-execution's recorded results by what was called (tool and arguments), wherever
    /// in the run it was: a re-executed model may make the same call at another step.
    by_content: Option<Mutex<HashMap<String, std::collections::VecDeque<ToolResultRecord>>>>,
    /// Calls a re-execution answered as not executed.
    unrecorded: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Calls read from records, by (run, call id) (a result may be read in a later slice of a
    /// record than its request).
    calls: Mutex<HashMap<(String, String), Asked<RequestedCall>>>,
    counters: Mutex<HashMap<String, RunCounters>>,
    /// Replay mode: never reach a tool; answer only from preloaded results.
    offline: bool,
    /// Read-only tools are asked only once their go-ahead is durable, as tools that act are,
    /// instead of while it is flushed (see [`asked_while_flushing`]): the benchmarks' baseline.
    reads_after_go_ahead: bool,
    /// A skill's evaluation: calls are answered by the scenario's results (see
    /// [`ToolGateway::answering_canned`]).
    canned: Option<Vec<contextos_crds::skill::CannedResult>>,
    /// URL prefix rewrites (`from`, `to`) applied before a tool is reached.
    endpoint_overrides: Vec<(String, String)>,
    /// The last RunContext whose signature verified, per run: a run sends the same context
    /// with every call, and an equal context need not be verified again.
    verified: Mutex<HashMap<String, SignedRunContext>>,
    /// Signs the approval requests this gateway hands out (the gateway service: the tenant's key).
    attesting_key: Option<crate::keys::KeyPair>,
    /// Whether runner spans are relayed (ids mapped per run; see `with_relayed_runner_spans`).
    relayed_runner_spans: bool,
    /// Where calls may go (the gateway service); `None`: anywhere (a local run).
    egress: Option<egress::EgressGuard>,
    /// Calls started without a recorded result (see [`intents`]).
    intents: intents::Intents,
    /// Whether other executors (gateway replicas) may be carrying calls of the same run.
    shared: bool,
    /// The agent's memory rules: its memory tools are carried out here, in the store this
    /// gateway records to.
    memory: crate::memory::desk::MemoryDesk,
    /// The tenant's entity types: what policy conditions read as `call.entities`.
    ontology: std::sync::Arc<crate::ontology::Ontology>,
    /// Results of read-only tools with a `cache` (see [`result_cache`]); shared by the runs a
    /// gateway service serves.
    results: std::sync::Arc<result_cache::ResultCache>,
    /// Digest of the promoted revisions this gateway governs by: cached results are kept and
    /// reused under it only.
    revisions: String,
    /// Results of the call in hand that may be cached once its result is on record (see
    /// [`ToolGateway::publish_cached`]): a cached answer always points at a recorded call.
    unpublished: Mutex<Vec<(result_cache::CacheKey, u64, result_cache::Reused)>>,
    /// The run's Session, watched while a remote agent's task is followed (the gateway
    /// service's runs; none locally).
    session_watch: Option<std::sync::Arc<dyn session_watch::SessionWatch>>,
}

/// Runs whose verified RunContext is remembered at most (then the memory starts over).
const VERIFIED_CONTEXTS: usize = 1024;

/// Where the run stands when a call is decided (CEL: `run.steps`, `run.tokens`, `run.input`).
#[derive(Clone, Debug, Default)]
pub struct RunProgress {
    pub steps: u32,
    pub tokens: u64,
    pub input: Value,
}

impl ToolGateway {
    pub fn new(
        tenant: &str,
        agent: &str,
        trusted_key: PublicKey,
        tools: Vec<CatalogTool>,
        policies: PolicySet,
        agent_approvers: Approvers,
    ) -> Self {
        // Without memory rules nothing is kept; consent heads are the run issuer's until
        // [`ToolGateway::with_memory`] says whose they are.
        let memory = crate::memory::desk::MemoryDesk::new(agent, None, trusted_key)
            .unwrap_or_else(|_| unreachable!("no memory rules cannot be invalid"));
        Self {
            tenant: tenant.into(),
            agent: agent.into(),
            trusted_key,
            tools: tools.into_iter().map(|t| (t.spec.name.clone(), t)).collect(),
            policies,
            agent_approvers,
            http: shared_http_client(),
            mcp: adapters::mcp::McpClients::default(),
            a2a: adapters::a2a::A2aClient::new(shared_http_client()),
            openapi: adapters::openapi::OpenApiClient::new(shared_http_client()),
            breakers: CircuitBreakers::new(5, Duration::from_secs(30)),
            approvals: ApprovalBook::default(),
            completed: Mutex::new(HashMap::new()),
            by_content: None,
            unrecorded: Default::default(),
            calls: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            offline: false,
            reads_after_go_ahead: false,
            canned: None,
            endpoint_overrides: Vec::new(),
            verified: Mutex::new(HashMap::new()),
            attesting_key: None,
            relayed_runner_spans: false,
            egress: None,
            intents: intents::Intents::default(),
            shared: false,
            memory,
            ontology: std::sync::Arc::default(),
            results: std::sync::Arc::default(),
            revisions: String::new(),
            unpublished: Mutex::new(Vec::new()),
            session_watch: None,
        }
    }

    /// The results of the last call that are waiting to be cached: kept once the call's result
    /// is on record (`written`), dropped otherwise.
    pub fn publish_cached(&self, written: bool) {
        let pending = self
            .unpublished
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default();
        if written {
            let writer = self.writer();
            for (key, generation, reused) in pending {
                self.results.keep(&writer, key, generation, reused);
            }
        }
    }

    /// Keeps and reuses results of cached read-only tools in `cache` (one per gateway service,
    /// shared by its runs), under `revisions`: the digest of the promoted revisions the calls
    /// are governed by (see [`bundle::GatewayBundle::revisions_digest`]).
    pub fn with_result_cache(mut self, cache: std::sync::Arc<result_cache::ResultCache>) -> Self {
        self.results = cache;
        self
    }

    /// See [`ToolGateway::with_result_cache`].
    pub fn with_revisions(mut self, revisions: String) -> Self {
        self.revisions = revisions;
        self
    }

    /// Finds the entities calls touch with `ontology` (the tenant's, pinned by the run).
    pub fn with_ontology(mut self, ontology: std::sync::Arc<crate::ontology::Ontology>) -> Self {
        self.ontology = ontology;
        self
    }

    /// Carries out the agent's memory tools under `desk`.
    pub fn with_memory(mut self, desk: crate::memory::desk::MemoryDesk) -> Self {
        self.memory = desk;
        self
    }

    /// Consent heads of this tenant are signed with `key` (the gateway service: the tenant's).
    pub fn with_consent_key(mut self, key: PublicKey) -> Self {
        self.memory = self.memory.with_consent_key(key);
        self
    }

    /// The agent's memory rules.
    pub fn memory(&self) -> &crate::memory::desk::MemoryDesk {
        &self.memory
    }

    /// The tools of the catalog whose every call is denied under `safety` whatever its
    /// arguments (see [`PolicySet::denies_outright`]): never offered to the model.
    pub fn denied_outright(
        &self,
        safety: contextos_crds::common::SafetyMode,
    ) -> std::collections::BTreeSet<String> {
        self.tools
            .values()
            .filter(|t| {
                self.policies
                    .denies_outright(&t.spec.name, t.spec.risk, t.spec.kind, safety)
            })
            .map(|t| t.spec.name.clone())
            .collect()
    }

    /// Other executors (gateway replicas) may carry calls of the runs this gateway serves: a
    /// recent started call is theirs to finish, not to be judged.
    pub fn shared_with_replicas(mut self) -> Self {
        self.shared = true;
        self
    }

    /// Sends calls only where `guard` allows (resolved addresses, IP literals, no redirects),
    /// and starts no command-started MCP server in this process (see
    /// [`ToolGateway::with_capabilities`]).
    pub fn with_egress(mut self, guard: egress::EgressGuard) -> Self {
        self.http = guard.client();
        self.mcp = adapters::mcp::McpClients::new(self.http.clone());
        self.a2a = adapters::a2a::A2aClient::new(self.http.clone());
        self.openapi = adapters::openapi::OpenApiClient::new(self.http.clone());
        self.egress = Some(guard);
        self
    }

    /// Appends the stderr of each command-started MCP server (started here, in a local run) to
    /// its own file in `dir`.
    pub fn with_stdio_logs(mut self, dir: std::path::PathBuf) -> Self {
        self.mcp = adapters::mcp::McpClients::new(self.http.clone())
            .with_stdio(adapters::mcp::StdioServers::Local { logs: Some(dir) });
        self
    }

    /// Reaches command-started MCP servers in the run's capability pods through `route`.
    pub fn with_capabilities(mut self, route: capabilities::CapabilityRoute) -> Self {
        self.mcp = adapters::mcp::McpClients::new(self.http.clone())
            .with_stdio(adapters::mcp::StdioServers::Capability(route));
        self
    }

    /// The runner's spans reach the collector through the gateway service's relay, under ids
    /// mapped for its run: a call's parent the runner names is mapped the same way.
    pub fn with_relayed_runner_spans(mut self) -> Self {
        self.relayed_runner_spans = true;
        self
    }

    /// Asks read-only tools only once their go-ahead is durable, as tools that act are: the
    /// benchmarks' baseline.
    pub fn with_reads_after_their_go_ahead(mut self) -> Self {
        self.reads_after_go_ahead = true;
        self
    }

    /// Stops following a remote agent's task, and cancels it, once `watch` says the run's
    /// Session ended.
    pub fn with_session_watch(mut self, watch: std::sync::Arc<dyn session_watch::SessionWatch>) -> Self {
        self.session_watch = Some(watch);
        self
    }

    /// Signs every approval request with `key`, so whoever relays it can be checked.
    pub fn with_attesting_key(mut self, key: crate::keys::KeyPair) -> Self {
        self.attesting_key = Some(key);
        self
    }

    /// Sends calls for URLs starting with `from` to `to` instead (same path after the prefix):
    /// runs an agent on a workstation against local stand-ins of its in-cluster tool services.
    pub fn with_endpoint_overrides(mut self, overrides: Vec<(String, String)>) -> Self {
        self.endpoint_overrides = overrides;
        self
    }

    fn effective_url(&self, url: &str) -> String {
        for (from, to) in &self.endpoint_overrides {
            if let Some(rest) = url.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        url.to_owned()
    }

    /// Replay mode: calls are decided as usual, but an allowed call is answered only from the
    /// results preloaded with [`ToolGateway::preload_results`]; no tool is ever reached.
    pub fn offline(mut self) -> Self {
        self.offline = true;
        self
    }

    /// Offline, answering a call from the record when the same call (tool and arguments) was
    /// recorded anywhere in the run — for re-executing a run with a model asked again. Any
    /// other call is answered as not executed, and never is.
    pub fn answering_recorded_calls(mut self) -> Self {
        self.offline = true;
        self.by_content = Some(Mutex::new(HashMap::new()));
        self
    }

    /// Offline, answering each call from `results` (a skill's evaluation scenario): the first
    /// entry for its tool whose arguments, when given, equal the call's; a call none answers
    /// fails as a tool that is down would.
    pub fn answering_canned(mut self, results: Vec<contextos_crds::skill::CannedResult>) -> Self {
        self.offline = true;
        self.canned = Some(results);
        self
    }

    /// How many calls a re-execution answered as not executed (so far).
    pub fn unrecorded_calls(&self) -> std::sync::Arc<std::sync::atomic::AtomicU32> {
        self.unrecorded.clone()
    }

    /// What identifies a call's content: its tool, risk, kind and canonical arguments.
    fn content_key(
        tool: &str,
        risk: ToolRisk,
        kind: contextos_crds::common::ToolKind,
        arguments: &Value,
    ) -> String {
        format!(
            "{tool}\u{0}{}\u{0}{}\u{0}{}",
            risk.as_str(),
            kind.as_str(),
            String::from_utf8_lossy(
                &crate::records::canonical::canonical_bytes_of(arguments).unwrap_or_default()
            )
        )
    }

    /// Loads the results a recorded run got, by idempotency key, without the budget counters
    /// or used approvals (a replay recounts those itself).
    pub fn preload_results(&self, entries: &[crate::records::RecordEntry]) {
        // By call id, what was requested (see `Asked`).
        let mut keys: HashMap<&str, Asked<(&str, &str, String)>> = HashMap::new();
        let Ok(mut completed) = self.completed.lock() else {
            return;
        };
        let mut by_content = self.by_content.as_ref().and_then(|m| m.lock().ok());
        for entry in entries {
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    let content = Self::content_key(&call.tool, call.risk, call.kind, &call.arguments);
                    keys.entry(&call.call_id).or_default().requested((
                        &call.idempotency_key,
                        &call.call_hash,
                        content,
                    ));
                }
                body if let Some(call_id) = Asked::<()>::followed(body) => {
                    if let Some(asked) = keys.get_mut(call_id) {
                        asked.follow(body);
                    }
                }
                EntryBody::ToolResult(result) => {
                    if let Some((key, call_hash, content)) =
                        keys.get(result.call_id.as_str()).and_then(Asked::answered)
                    {
                        completed.entry((*key).to_owned()).or_insert_with(|| Completed {
                            call_hash: (*call_hash).to_owned(),
                            result: result.clone(),
                        });
                        // The same call made again gets the next recorded result, in order.
                        if let Some(by_content) = by_content.as_mut() {
                            by_content
                                .entry(content.clone())
                                .or_default()
                                .push_back(result.clone());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Replaces the circuit-breaker settings (threshold failures, cooldown).
    pub fn with_breakers(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.breakers = CircuitBreakers::new(threshold, cooldown);
        self
    }

    /// Restores what a previous gateway process learned about a run from its record: results by
    /// idempotency key (so a call resubmitted after a crash answers from the first execution
    /// instead of acting twice), used approvals, and the budget counters.
    pub fn restore<'e>(&self, entries: impl IntoIterator<Item = &'e crate::records::RecordEntry>) {
        let entries: Vec<&crate::records::RecordEntry> = entries.into_iter().collect();
        self.intents.fold(entries.iter().copied());
        for entry in entries {
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    if let Ok(mut calls) = self.calls.lock() {
                        let requested = RequestedCall {
                            idempotency_key: call.idempotency_key.clone(),
                            call_hash: call.call_hash.clone(),
                            tool: call.tool.clone(),
                            risk: call.risk,
                        };
                        calls
                            .entry((entry.run_id.clone(), call.call_id.clone()))
                            .or_default()
                            .requested(requested);
                    }
                }
                body if let Some(call_id) = Asked::<()>::followed(body) => {
                    if let EntryBody::ApprovalGranted { call_hash, .. } = body {
                        self.approvals.restore([call_hash.clone()]);
                    }
                    if let EntryBody::ApprovalRequested { call_hash, .. } = body {
                        self.note_approval_asked(&entry.run_id, call_hash);
                    }
                    if let Ok(mut calls) = self.calls.lock()
                        && let Some(asked) = calls.get_mut(&(entry.run_id.clone(), call_id.to_owned()))
                    {
                        asked.follow(body);
                    }
                }
                EntryBody::ToolResult(result) => {
                    // The request may have been read in an earlier slice of the record.
                    let requested = self.calls.lock().ok().and_then(|c| {
                        c.get(&(entry.run_id.clone(), result.call_id.clone()))
                            .and_then(|asked| asked.answered().cloned())
                    });
                    let Some(requested) = requested else {
                        continue;
                    };
                    // A call answered again from its first result (resent after a crash or to
                    // another replica) is one call, counted once.
                    if self.completed_result(&requested.idempotency_key).is_some() {
                        continue;
                    }
                    self.count(&entry.run_id, &requested.tool, requested.risk);
                    if result.ok
                        && let Ok(mut completed) = self.completed.lock()
                    {
                        completed.insert(
                            requested.idempotency_key,
                            Completed {
                                call_hash: requested.call_hash,
                                result: result.clone(),
                            },
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// Forgets what this gateway remembers of `run_id` — budget counters, used approvals,
    /// results — before [`ToolGateway::restore`] reads them from the record again, so that the
    /// record alone decides (another replica may have handled calls meanwhile) and nothing is
    /// counted twice. For a gateway that serves one run (the gateway service keeps one per run).
    pub fn forget_run(&self, run_id: &str) {
        if let Ok(mut counters) = self.counters.lock() {
            counters.remove(run_id);
        }
        self.approvals.clear();
        self.intents.clear();
        if let Ok(mut calls) = self.calls.lock() {
            calls.clear();
        }
        if let Ok(mut completed) = self.completed.lock() {
            completed.clear();
        }
    }

    /// Calls of `run_id` that were executed.
    pub fn calls_made(&self, run_id: &str) -> u32 {
        self.counters_for(run_id).calls
    }

    /// Refuses a call because the run made every tool call its budget allows (the run's own
    /// bound, checked before any policy).
    pub async fn refuse_over_budget<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<CallOutcome, GatewayError> {
        let reason = format!(
            "the run may make {} tool calls and has made them all",
            call.run_context.context.budget.max_tool_calls
        );
        self.refuse(call, recorder, "run/budget.maxToolCalls".into(), reason)
            .await
    }

    /// Refuses a call because a SpendQuota the run answers to is full (or cannot count it); the
    /// record names the quota (rule `quota/<name>`) and the run then ends `QuotaExceeded`.
    pub async fn refuse_for_quota<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
        refused: &crate::quota::book::QuotaRefusal,
    ) -> Result<CallOutcome, GatewayError> {
        let rule = format!(
            "{}{}",
            crate::quota::RULE_PREFIX,
            refused.quota().unwrap_or("ledger")
        );
        self.refuse(call, recorder, rule, refused.to_string()).await
    }

    /// Whether a call under `idempotency_key` is already on record (made, or started): asked
    /// again, it is answered from the record and makes nothing new.
    pub fn knows_call(&self, idempotency_key: &str) -> bool {
        self.completed_result(idempotency_key).is_some() || self.intents.started(idempotency_key).is_some()
    }

    /// Learns from entries this gateway itself wrote which calls started, which remote
    /// questions they wait on and which ended — what it otherwise learns only by reading the
    /// record back ([`ToolGateway::restore`]); the rest of what they say it remembers already.
    pub fn note_written<'e>(&self, entries: impl IntoIterator<Item = &'e crate::records::RecordEntry>) {
        self.intents.fold(entries);
    }

    /// Whether the call under `idempotency_key` waits on the remote agent's question
    /// `question`, as far as this gateway has folded the record in.
    pub fn waits_on(&self, idempotency_key: &str, question: &str) -> bool {
        self.intents
            .started(idempotency_key)
            .and_then(|started| started.waiting)
            .is_some_and(|waiting| waiting.id == question)
    }

    /// Declines, in the run's name, the question `question` that `call` waits on, its Session
    /// having ended (see `service::question_watch`): the remote task is cancelled and the
    /// call's end staged as when a person declines — `did_not_act` by `resolver`, `note` saying
    /// why. Nothing is admitted or decided again: the call was decided when it was made, and
    /// the RunContext it carried may have expired since. `None` when the call does not wait on
    /// that question (an attempt of the run took it over); an error, with nothing sent, when
    /// someone wrote to the run since it was read.
    pub async fn decline_standing_question<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        question: &str,
        resolver: &str,
        note: &str,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<Option<ToolResultRecord>, GatewayError> {
        let Some(started) = self.intents.started(&call.idempotency_key) else {
            return Ok(None);
        };
        let Some(waiting) = started.waiting.clone().filter(|waiting| waiting.id == question) else {
            return Ok(None);
        };
        let Some(tool) = self.tools.get(&call.tool) else {
            return Ok(None);
        };
        let resolution = contextos_crds::session::Resolution {
            call_id: waiting.id.clone(),
            outcome: contextos_crds::session::ResolvedOutcome::DidNotAct,
            resolver: resolver.to_owned(),
            note: Some(note.to_owned()),
        };
        self.decline(call, tool, &started, &waiting, &resolution, recorder)
            .await
            .map(Some)
    }

    /// Digests of the policies deciding calls, in order.
    pub fn policy_digests(&self) -> Vec<String> {
        self.policies.policies.iter().map(|p| p.digest.clone()).collect()
    }

    /// Decides and, if allowed, executes one call, recording every step: everything is durable
    /// when it returns.
    pub async fn handle<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
        state: &StateFacts,
    ) -> Result<CallOutcome, GatewayError> {
        let outcome = self
            .handle_in_run(call, recorder, state, &RunProgress::default())
            .await?;
        if recorder.has_staged() {
            recorder.flush().await?;
        }
        self.publish_cached(true);
        Ok(outcome)
    }

    /// [`ToolGateway::handle`] for a call made by the run loop, which knows the run's progress.
    ///
    /// What must be durable before the tool acts (the go-ahead and the approval it used) is
    /// written before it acts — for a read the gateway can see to be one, while it is asked, and
    /// before its answer is returned (see [`asked_while_flushing`]); what is recorded after that (the result, or the refusal, for a
    /// call that did not act) is left staged, for the caller to write before anything depends
    /// on it — the run loop at once, the gateway service while its answer is on its way (see
    /// `service::run_api`).
    pub async fn handle_in_run<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
        state: &StateFacts,
        progress: &RunProgress,
    ) -> Result<CallOutcome, GatewayError> {
        // The model names the tool: a name the Agent does not declare is not exported as it
        // is (a prompt-injected model could otherwise write a person's details into every
        // trace collector, past the record's erasure).
        let tool: &str = if self.tools.contains_key(&call.tool) {
            &call.tool
        } else {
            "(undeclared)"
        };
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "tool.call",
            contextos.tenant = %self.tenant,
            contextos.agent = %self.agent,
            contextos.tool = %tool,
            contextos.call = %call.call_id,
            contextos.risk = call.risk.as_str(),
            contextos.kind = call.kind.as_str(),
            contextos.outcome = tracing::field::Empty,
            otel.kind = "client",
        );
        // The caller's span (the runner's step, in this process or a runner pod) when the
        // envelope names one of the run's own verified trace, else the Session's root; never
        // the runner's sampling flag. What the tool is told is this call's span — or, when
        // nothing is exported, one derived from the call — never the runner's string.
        let verified = self
            .verify_context(&call.run_context)
            .ok()
            .and_then(|context| Some((context.trace()?, context.trace_id.clone(), context.run_id.clone())));
        if let Some((trace, _, run)) = &verified {
            let relayed = self.relayed_runner_spans.then_some(run.as_str());
            crate::telemetry::set_parent(&span, trace.call_parent(&call.traceparent, relayed));
        }
        let traceparent = match (crate::telemetry::traceparent_of(&span), &verified) {
            (Some(traced), _) => traced,
            (None, Some((_, trace_id, _))) => {
                envelope::traceparent(trace_id, &call.run_context.context.run_id, &call.call_id)
            }
            (None, None) => envelope::traceparent(
                &call.run_context.context.trace_id,
                &call.run_context.context.run_id,
                &call.call_id,
            ),
        };
        let call = &CallEnvelope {
            traceparent,
            ..call.clone()
        };
        // Boxed: the call's future is deep, and the span's wrapper would make it deeper still
        // for every caller that awaits it.
        let outcome = Box::pin(self.handle_untraced(call, recorder, state, progress))
            .instrument(span.clone())
            .await;
        span.record("contextos.outcome", outcome_name(&outcome));
        outcome
    }

    async fn handle_untraced<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
        state: &StateFacts,
        progress: &RunProgress,
    ) -> Result<CallOutcome, GatewayError> {
        if let Some(refusal) = self.admit(call) {
            return self.refuse(call, recorder, refusal.0, refusal.1).await;
        }
        let Some(tool) = self.tools.get(&call.tool) else {
            let reason = format!("tool {} is not declared by agent {}", call.tool, self.agent);
            return self
                .refuse(call, recorder, "catalog/unknown-tool".into(), reason)
                .await;
        };
        let call_hash = call.call_hash(&self.policy_digests());
        recorder.stage(EntryBody::ToolCallRequested(ToolCallRecord {
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            risk: tool.spec.risk,
            kind: tool.spec.kind,
            arguments: call.arguments.clone(),
            idempotency_key: call.idempotency_key.clone(),
            call_hash: call_hash.clone(),
        }));
        if !self.offline
            && let Some(done) = self.completed_result(&call.idempotency_key)
        {
            if done.call_hash != call_hash {
                // Another call under a completed call's key: its result is not this call's, and
                // the key is never a way around this call's own decision.
                let reason = format!(
                    "idempotency key {} belongs to call {}, which completed with another tool or other arguments",
                    call.idempotency_key, done.result.call_id
                );
                return self
                    .refuse(call, recorder, "gateway/idempotency-key-reused".into(), reason)
                    .await;
            }
            // The same call was decided and executed before (a resubmission after a crash):
            // answer from that execution. Deciding it again would count it twice against the
            // budgets and ask for an approval that was already used. It cost nothing again.
            let done = ToolResultRecord {
                call_id: call.call_id.clone(),
                cost: None,
                ..done.result
            };
            recorder.stage(EntryBody::ToolResult(done.clone()));
            return Ok(CallOutcome::Executed(done));
        }
        if !self.offline
            && let Some(started) = self.intents.started(&call.idempotency_key)
        {
            if started.call_hash != call_hash {
                // Another call under a started call's key: never a way around the decision.
                let reason = format!(
                    "idempotency key {} belongs to call {}, which started with other arguments",
                    call.idempotency_key, started.call_id
                );
                return self
                    .refuse(call, recorder, "gateway/idempotency-key-reused".into(), reason)
                    .await;
            }
            return self.resume_started(call, tool, &started, recorder).await;
        }
        if let Some(problem) = schema_problem(tool, &call.arguments) {
            return self
                .refuse(call, recorder, format!("schema/{}", call.tool), problem)
                .await;
        }
        let decision = {
            let span = tracing::info_span!(
                target: crate::telemetry::TARGET,
                "gateway.decision",
                contextos.effect = tracing::field::Empty,
                contextos.rule = tracing::field::Empty,
            );
            let started = Instant::now();
            let decision = span.in_scope(|| self.decide(call, tool, state, progress));
            // A replay's decisions (an audit, a gate's candidate) are not the live gateway's.
            if !self.offline {
                metrics::gateway().decision(decision.effect, started.elapsed());
            }
            span.record("contextos.effect", decision.effect.as_str());
            span.record("contextos.rule", decision.rule.as_str());
            decision
        };
        let decision = self.within_room_for_approvals(call, &call_hash, decision);
        for shadow in &decision.dry_run {
            recorder.stage(decision_entry(
                call,
                shadow.effect,
                PolicyEffect::Allow,
                &shadow.rule,
                &shadow.reason,
                true,
            ));
        }
        recorder.stage(decision_entry(
            call,
            decision.effect,
            decision.effect,
            &decision.rule,
            &decision.reason,
            false,
        ));
        match decision.effect {
            PolicyEffect::Deny => {
                return Ok(CallOutcome::Denied {
                    rule: decision.rule,
                    reason: decision.reason,
                });
            }
            PolicyEffect::RequireApproval => {
                let span = tracing::info_span!(
                    target: crate::telemetry::TARGET,
                    "approval.wait",
                    contextos.rule = %decision.rule,
                    contextos.approval = tracing::field::Empty,
                );
                let waiting = self
                    .check_approval(call, &call_hash, &decision, recorder)
                    .instrument(span.clone())
                    .await?;
                span.record(
                    "contextos.approval",
                    match &waiting {
                        None => "granted",
                        Some(CallOutcome::NeedsApproval { .. }) => "requested",
                        Some(_) => "refused",
                    },
                );
                if let Some(outcome) = waiting {
                    return Ok(outcome);
                }
            }
            PolicyEffect::Allow => {}
        }
        // The go-ahead (and the approval it used) is durable before the tool acts: after a
        // crash the record shows the call may have acted, and it is never decided again. Written
        // only on top of what was read — if anyone else wrote meanwhile, nothing is executed.
        // A read asked while its go-ahead is flushed is answered only once it is durable.
        if !self.offline {
            if !self.reads_after_go_ahead
                && asked_while_flushing(&tool.spec, tool.price.as_ref(), &call.run_context.context)
            {
                recorder
                    .commit_flushed_soon()
                    .instrument(tracing::debug_span!("gateway.go_ahead_write"))
                    .await?;
                let store = recorder.store();
                let flush = store
                    .flush_pending()
                    .instrument(tracing::debug_span!("gateway.go_ahead_flush"));
                let execute = self
                    .execute(call, &call_hash, tool, 0, recorder)
                    .instrument(tracing::debug_span!("gateway.execute"));
                tokio::pin!(flush, execute);
                // The answer waits for the flush: nobody is told a result whose go-ahead a crash
                // could still take back. A flush that fails ends the call there (what the tool
                // answers would be told to no one).
                let outcome = tokio::select! {
                    flushed = &mut flush => {
                        flushed.map_err(crate::records::RecordError::from)?;
                        execute.await
                    }
                    outcome = &mut execute => {
                        flush.await.map_err(crate::records::RecordError::from)?;
                        outcome
                    }
                };
                return Ok(outcome);
            }
            recorder
                .flush_exclusive()
                .instrument(tracing::debug_span!("gateway.go_ahead_write"))
                .await?;
        }
        Ok(self
            .execute(call, &call_hash, tool, 0, recorder)
            .instrument(tracing::debug_span!("gateway.execute"))
            .await)
    }

    /// A call whose go-ahead is on record without a result (see [`intents`]).
    async fn resume_started<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        started: &intents::Started,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<CallOutcome, GatewayError> {
        match intents::resumption(&tool.spec, started, now_ms(), self.shared) {
            intents::Resumption::Retry => Ok(self
                .execute(call, &started.call_hash, tool, started.asked, recorder)
                .await),
            intents::Resumption::AwaitingInput(question) => Ok(self
                .answer_question(call, tool, started, question, recorder)
                .await?),
            // Only sent again if the task still waits on the question.
            intents::Resumption::FollowAnswer(answer) => {
                self.deliver_answer(call, tool, started, &answer, true, recorder)
                    .await
            }
            intents::Resumption::InProgress => {
                recorder.discard_staged();
                Ok(CallOutcome::InProgress {
                    call_id: started.call_id.clone(),
                })
            }
            intents::Resumption::Unknown(_)
                if let Some(resolution) = call.resolution.as_ref().filter(|r| {
                    r.call_id == started.call_id
                        && r.outcome != contextos_crds::session::ResolvedOutcome::Answered
                }) =>
            {
                // A human found out whether it acted: that is the call's result, recorded with
                // who said so. The call is not sent again either way.
                let result = resolved_result(&started.call_id, resolution, tool.price.as_ref());
                recorder.stage(EntryBody::CallResolved {
                    call_id: started.call_id.clone(),
                    outcome: resolution.outcome,
                    resolver: resolution.resolver.clone(),
                    note: resolution.note.clone(),
                });
                recorder.stage(EntryBody::ToolResult(result.clone()));
                Ok(CallOutcome::Executed(result))
            }
            intents::Resumption::Unknown(reason) => {
                let rule = "gateway/outcome-unknown";
                recorder.stage(decision_entry(
                    call,
                    PolicyEffect::Deny,
                    PolicyEffect::Deny,
                    rule,
                    &reason,
                    false,
                ));
                let attestation = self.sign_unresolved(call, &started.call_id, &reason, None);
                Ok(CallOutcome::OutcomeUnknown {
                    call_id: started.call_id.clone(),
                    reason,
                    attestation,
                    for_call: None,
                    cost: None,
                })
            }
        }
    }

    /// RunContext and catalog checks that come before any policy.
    fn admit(&self, call: &CallEnvelope) -> Option<(String, String)> {
        let context = match self.verify_context(&call.run_context) {
            Ok(context) => context,
            Err(e) => return Some(("runcontext/invalid".into(), e.to_string())),
        };
        if let Err(e) = context
            .check_agent(&self.agent)
            .and_then(|()| context.check_tool(&call.tool))
        {
            return Some(("runcontext/scope".into(), e.to_string()));
        }
        let tool = self.tools.get(&call.tool)?;
        if tool.spec.risk != call.risk || tool.spec.kind != call.kind {
            return Some((
                "catalog/declared-type".into(),
                format!(
                    "the call declares {} {} but tool {} is {} {}",
                    call.risk.as_str(),
                    call.kind.as_str(),
                    call.tool,
                    tool.spec.risk.as_str(),
                    tool.spec.kind.as_str()
                ),
            ));
        }
        None
    }

    fn verify_context<'c>(&self, signed: &'c SignedRunContext) -> Result<&'c RunContext, RunContextError> {
        let now = now_ms();
        let known = self
            .verified
            .lock()
            .ok()
            .is_some_and(|v| v.get(&signed.context.run_id) == Some(signed));
        if known {
            return signed.verify_known(&self.trusted_key, &self.tenant, now);
        }
        let context = signed.verify(&self.trusted_key, &self.tenant, now)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_CONTEXTS {
                verified.clear();
            }
            verified.insert(signed.context.run_id.clone(), signed.clone());
        }
        Ok(context)
    }

    fn decide(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        state: &StateFacts,
        progress: &RunProgress,
    ) -> crate::policy::Decision {
        let context = &call.run_context.context;
        let counters = self.counters_for(&context.run_id);
        let run = RunFacts {
            tenant: context.tenant_id.clone(),
            agent: context.agent.name.clone(),
            user: context
                .user
                .as_ref()
                .map(|u| u.subject.clone())
                .unwrap_or_default(),
            groups: context
                .user
                .as_ref()
                .map(|u| u.groups.clone())
                .unwrap_or_default(),
            scopes: context
                .user
                .as_ref()
                .map(|u| u.scopes.clone())
                .unwrap_or_default(),
            safety_mode: context.safety_mode.as_str().into(),
            tool_calls: counters.calls,
            calls_of_tool: counters.per_tool.get(&call.tool).copied().unwrap_or(0),
            destructive_calls: counters.destructive,
            steps: progress.steps,
            tokens: progress.tokens,
            input: progress.input.clone(),
        };
        // Found only when a condition can read them: most policies never look.
        let entities = if self.policies.reads_call() {
            self.ontology.of_call(&tool.spec.touches, &call.arguments)
        } else {
            crate::ontology::CallEntities::default()
        };
        if entities.overflow {
            // A condition on an id must see every id; a call naming this many is not judged.
            return crate::policy::Decision {
                effect: contextos_crds::policy::PolicyEffect::Deny,
                rule: "ontology/too-many-entities".into(),
                reason: format!(
                    "the call names more than {} entities of the namespace's Ontology; the policies cannot judge it whole: ask about fewer at a time",
                    crate::ontology::MAX_CALL_ENTITIES
                ),
                approvers: Default::default(),
                dry_run: Vec::new(),
            };
        }
        let facts = CallFacts {
            tool: &call.tool,
            risk: tool.spec.risk,
            kind: tool.spec.kind,
            args: &call.arguments,
            entities: &entities,
        };
        self.policies
            .decide(&facts, &run, state, context.safety_mode, &self.agent_approvers)
    }

    fn completed_result(&self, idempotency_key: &str) -> Option<Completed> {
        self.completed
            .lock()
            .ok()
            .and_then(|c| c.get(idempotency_key).cloned())
    }

    fn counters_for(&self, run_id: &str) -> RunCounters {
        self.counters
            .lock()
            .ok()
            .and_then(|c| c.get(run_id).cloned())
            .unwrap_or_default()
    }

    /// `decision`, or — when it holds the call for an approval the run has no room left to ask
    /// (its Session holds [`MAX_APPROVALS`] decisions, and this call is not among those asked) —
    /// a denial saying so: a call left waiting for a decision nobody can write would stop the
    /// Session for good.
    fn within_room_for_approvals(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        decision: crate::policy::Decision,
    ) -> crate::policy::Decision {
        if decision.effect != PolicyEffect::RequireApproval || call.approval.is_some() {
            return decision;
        }
        let asked = self
            .counters_for(&call.run_context.context.run_id)
            .approvals_asked;
        if asked.len() < MAX_APPROVALS || asked.contains(call_hash) {
            return decision;
        }
        crate::policy::Decision {
            effect: PolicyEffect::Deny,
            rule: "session/approvals".into(),
            reason: format!(
                "the run has asked for {MAX_APPROVALS} approvals, all its Session can hold \
                 (spec.approvals); a call that needs one more is denied (rule {} wanted an \
                 approval): start a new Session to go on",
                decision.rule
            ),
            ..decision
        }
    }

    fn note_approval_asked(&self, run_id: &str, call_hash: &str) {
        if let Ok(mut counters) = self.counters.lock() {
            let run = counters.entry(run_id.to_owned()).or_default();
            run.approvals_asked.insert(call_hash.to_owned());
        }
    }

    fn count(&self, run_id: &str, tool: &str, risk: ToolRisk) {
        if let Ok(mut counters) = self.counters.lock() {
            let run = counters.entry(run_id.to_owned()).or_default();
            run.calls += 1;
            *run.per_tool.entry(tool.to_owned()).or_default() += 1;
            run.destructive += u32::from(risk == ToolRisk::Destructive);
        }
    }

    /// `None` when an approval lets the call proceed; otherwise the outcome to return.
    async fn check_approval<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        decision: &crate::policy::Decision,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<Option<CallOutcome>, GatewayError> {
        let reason = approvals::ApprovalRequest::shown_reason(&decision.reason);
        let attestation = self.attesting_key.as_ref().map(|key| {
            approvals::ApprovalRequest {
                run_id: &call.run_context.context.run_id,
                call_id: &call.call_id,
                call_hash,
                tool: &call.tool,
                arguments_digest: approvals::ApprovalRequest::digest_of(&call.arguments),
                rule: &decision.rule,
                reason: &reason,
                approvers: &decision.approvers,
            }
            .sign(key)
        });
        let needs = CallOutcome::NeedsApproval {
            call_hash: call_hash.to_owned(),
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
            approvers: decision.approvers.clone(),
            attestation,
        };
        let Some(grant) = &call.approval else {
            let mut approvers: Vec<String> = decision.approvers.users.clone();
            approvers.extend(decision.approvers.groups.iter().map(|g| format!("group:{g}")));
            recorder.stage(EntryBody::ApprovalRequested {
                call_id: call.call_id.clone(),
                call_hash: call_hash.to_owned(),
                approvers,
            });
            self.note_approval_asked(&call.run_context.context.run_id, call_hash);
            return Ok(Some(needs));
        };
        // Group membership is the API server's word, checked by admission when the decision was
        // written; a rule that names only users is checked here as well.
        let unlisted =
            decision.approvers.groups.is_empty() && !decision.approvers.users.contains(&grant.approver);
        let refusal = if grant.call_hash != call_hash {
            Some(format!(
                "the approval is for call {}, not this call ({call_hash})",
                grant.call_hash
            ))
        } else if unlisted {
            Some(format!(
                "{} is not among the approvers of rule {} ({}); only they can decide this call",
                grant.approver,
                decision.rule,
                decision.approvers.users.join(", ")
            ))
        } else if grant.decision == ApprovalDecision::Reject {
            Some(
                grant
                    .reason
                    .clone()
                    .unwrap_or_else(|| "rejected by the approver".into()),
            )
        } else if !self.approvals.consume(call_hash) {
            Some("this approval was already used once; approvals are single-use".into())
        } else {
            None
        };
        match refusal {
            None => {
                recorder.stage(EntryBody::ApprovalGranted {
                    call_id: call.call_id.clone(),
                    call_hash: call_hash.to_owned(),
                    approver: grant.approver.clone(),
                    reason: grant.reason.clone(),
                });
                Ok(None)
            }
            Some(reason) => {
                recorder.stage(EntryBody::ApprovalRefused {
                    call_id: call.call_id.clone(),
                    call_hash: call_hash.to_owned(),
                    approver: grant.approver.clone(),
                    reason: reason.clone(),
                });
                if grant.decision == ApprovalDecision::Reject && grant.call_hash == call_hash && !unlisted {
                    return Ok(Some(CallOutcome::Denied {
                        rule: "approval/rejected".into(),
                        reason,
                    }));
                }
                Ok(Some(needs))
            }
        }
    }

    /// Runs the call once per idempotency key, retrying where that is safe. `asked` is how
    /// many questions its remote agent asked before (a call resumed after one was answered).
    async fn execute<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        tool: &CatalogTool,
        asked: u32,
        recorder: &mut Recorder<'_, S>,
    ) -> CallOutcome {
        self.count(&call.run_context.context.run_id, &call.tool, tool.spec.risk);
        if self.offline {
            return CallOutcome::Executed(self.recorded_result(call, recorder));
        }
        if let Some(memory) = tool.spec.adapter.memory {
            return CallOutcome::Executed(
                self.carry_out_memory(call, call_hash, memory.operation, recorder)
                    .await,
            );
        }
        if let Ok(mut unpublished) = self.unpublished.lock() {
            unpublished.clear();
        }
        let cached = self.cache_key(call, tool);
        // Only calls of cached tools look (the writer is built for those alone).
        let reused = cached.as_ref().and_then(|(ttl, key)| {
            let reused = self.results.fresh(&self.writer(), key, *ttl, now_ms());
            metrics::gateway().cache_lookup(match reused {
                Some(_) => metrics::CacheLookup::hit,
                None => metrics::CacheLookup::miss,
            });
            reused
        });
        if let Some(reused) = reused {
            let result = ToolResultRecord {
                call_id: call.call_id.clone(),
                ok: true,
                output: reused.output,
                error: None,
                attempts: 0,
                truncated: reused.truncated,
                cost: None,
                cached: Some(reused.origin),
            };
            return CallOutcome::Executed(self.settle_result(call, call_hash, result, recorder));
        }
        let generation = cached
            .as_ref()
            .map_or(0, |_| self.results.generation(&self.writer()));
        let sent = self.send(call, tool, adapters::a2a::Turn::First).await;
        let outcome = self.conclude(call, call_hash, tool, sent, asked, recorder).await;
        if let (Some((_, key)), CallOutcome::Executed(result)) = (cached, &outcome)
            && result.ok
            && let Ok(mut unpublished) = self.unpublished.lock()
        {
            let reused = result_cache::Reused {
                output: result.output.clone(),
                truncated: result.truncated,
                origin: CachedRead {
                    run_id: call.run_context.context.run_id.clone(),
                    call_id: call.call_id.clone(),
                    fetched_at_ms: now_ms(),
                },
            };
            unpublished.push((key, generation, reused));
        }
        outcome
    }

    /// Whose writes make this gateway's cached results stale.
    fn writer(&self) -> result_cache::Writer {
        result_cache::Writer {
            tenant: self.tenant.clone(),
            agent: self.agent.clone(),
        }
    }

    /// For a call of a cached tool, its TTL and what it is the same question as (see
    /// [`result_cache::CacheKey`]); `None` when its result is not to be cached — the tool has
    /// no `cache`, or the run is about a person.
    fn cache_key(&self, call: &CallEnvelope, tool: &CatalogTool) -> Option<(u32, result_cache::CacheKey)> {
        let cache = tool.spec.cache?;
        let context = &call.run_context.context;
        if context.subject.is_some() {
            return None;
        }
        let scope = result_cache::CacheScope {
            revisions: &self.revisions,
            tenant: &self.tenant,
            user: context.user.as_ref().map(|u| u.subject.as_str()),
        };
        Some((
            cache.ttl_seconds,
            result_cache::CacheKey::of(scope, &call.tool, &call.arguments),
        ))
    }

    /// Sends one turn of a call — retrying where that is safe — and says how it went.
    async fn send(&self, call: &CallEnvelope, tool: &CatalogTool, turn: adapters::a2a::Turn<'_>) -> Sent {
        let retries_allowed = tool.spec.idempotent || tool.spec.risk == ToolRisk::ReadOnly;
        let max_attempts = match (&tool.spec.retry, retries_allowed) {
            (Some(retry), true) => retry.max_attempts.max(1),
            _ => 1,
        };
        let initial = Duration::from_millis(
            tool.spec
                .retry
                .as_ref()
                .map_or(200, |r| u64::from(r.initial_backoff_millis)),
        );
        // A call that can change something makes every cached result of the agent stale: from
        // before it is sent (a read in flight meanwhile is not kept) and again once it answered.
        let writes = tool.spec.risk != ToolRisk::ReadOnly;
        if writes {
            self.results.wrote(&self.writer());
        }
        let mut attempts = 0;
        let mut may_have_acted = false;
        let outcome = loop {
            attempts += 1;
            // The tool's time, and the pause before asking again, are spent out of the
            // request's turn at a gateway replica (the tool is not the replica's work).
            let outcome = fair::away(self.attempt(call, tool, turn)).await;
            may_have_acted |= outcome
                .as_ref()
                .map_or_else(AdapterError::may_have_been_sent, |_| true);
            match &outcome {
                Err(e) if e.is_retryable() && attempts < max_attempts => {
                    fair::away(tokio::time::sleep(backoff(initial, attempts))).await;
                }
                _ => break outcome,
            }
        };
        if writes {
            self.results.wrote(&self.writer());
        }
        Sent {
            outcome,
            attempts,
            may_have_acted,
        }
    }

    /// Records how a sent call ended: its result, or its remote agent's question (the call
    /// then waits for a person; its result comes with the answer). `asked` is how many
    /// questions it asked before.
    async fn conclude<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        tool: &CatalogTool,
        sent: Sent,
        asked: u32,
        recorder: &mut Recorder<'_, S>,
    ) -> CallOutcome {
        // A priced tool's call costs its price once it may have been sent, whatever it
        // answered; refused before anything left (circuit open, destination refused), nothing.
        // A call that asked a question was charged with its first one.
        let cost = tool
            .price
            .as_ref()
            .filter(|_| sent.may_have_acted && asked == 0)
            .map(crate::pricing::PinnedToolPrice::cost);
        let attempts = sent.attempts;
        let outcome = match sent.outcome {
            Ok(adapters::Reply::Asks(question))
                if asked < MAX_QUESTIONS
                    && self.intents.questions_in(&call.run_context.context.run_id) < MAX_RUN_QUESTIONS =>
            {
                let question = intents::Question {
                    id: intents::question_id(
                        &call.call_id,
                        &call.call_hash(&self.policy_digests()),
                        asked + 1,
                    ),
                    asked: question,
                };
                recorder.stage(EntryBody::RemoteInputRequired {
                    call_id: call.call_id.clone(),
                    question_id: question.id.clone(),
                    task: question.asked.task.clone(),
                    question: question.asked.text.clone(),
                    message_id: question.asked.message_id.clone(),
                    cost: cost.clone(),
                });
                let mut asking = self.ask_person(call, &question);
                if let CallOutcome::OutcomeUnknown { cost: charged, .. } = &mut asking {
                    *charged = cost;
                }
                return asking;
            }
            Ok(adapters::Reply::Asks(question)) => {
                let cancelled = self.cancel_remote(call, tool, &question.task).await;
                Err(AdapterError::ToolFailed(format!(
                    "the remote agent asked question {} of this call; a call may ask {MAX_QUESTIONS} and a run {MAX_RUN_QUESTIONS}, so its task {} {}",
                    asked + 1,
                    question.task.task_id,
                    cancelled_or_not(cancelled)
                )))
            }
            Ok(adapters::Reply::Done(response)) => Ok(response),
            Err(error) => Err(error),
        };
        let result = match outcome {
            Ok(response) => ToolResultRecord {
                call_id: call.call_id.clone(),
                ok: true,
                output: response.body,
                error: None,
                attempts,
                truncated: response.truncated,
                cost,
                cached: None,
            },
            Err(error) => {
                recorder.stage(EntryBody::DeadLettered {
                    call_id: call.call_id.clone(),
                    tool: call.tool.clone(),
                    idempotency_key: call.idempotency_key.clone(),
                    attempts,
                    error: error.to_string(),
                });
                ToolResultRecord {
                    call_id: call.call_id.clone(),
                    ok: false,
                    output: Value::Null,
                    error: Some(error.to_string()),
                    attempts,
                    truncated: false,
                    cost,
                    cached: None,
                }
            }
        };
        CallOutcome::Executed(self.settle_result(call, call_hash, result, recorder))
    }

    /// Asks a remote agent to cancel `task` (where egress allows); whether it confirmed.
    async fn cancel_remote(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        task: &adapters::a2a::RemoteTask,
    ) -> bool {
        let Some(a2a) = tool.spec.adapter.a2a.as_ref() else {
            return false;
        };
        let mut remote = a2a.clone();
        remote.url = self.effective_url(&a2a.url);
        if let Some(guard) = &self.egress
            && guard.check_resolved(&remote.url).await.is_err()
        {
            return false;
        }
        let ctx = self.call_context(call, tool);
        let rewrite = |url: &str| self.effective_url(url);
        fair::away(self.a2a.cancel(&remote, &rewrite, task, &ctx)).await
    }

    /// The gateway service's signature (tenant key) over what it reports of a call a person
    /// must resolve — `call_id` (the call, or a question's id), `reason`, and for a question the
    /// call it belongs to; none in process.
    fn sign_unresolved(
        &self,
        call: &CallEnvelope,
        call_id: &str,
        reason: &str,
        for_call: Option<&str>,
    ) -> Option<String> {
        self.attesting_key.as_ref().map(|key| {
            approvals::UnresolvedReport {
                run_id: &call.run_context.context.run_id,
                call_id,
                tool: &call.tool,
                arguments_digest: approvals::ApprovalRequest::digest_of(&call.arguments),
                reason,
                for_call,
            }
            .sign(key)
        })
    }

    /// The pause for a remote agent's question: the person who resolves it is shown the
    /// call and, quoted, the question (signed by the gateway service, like any unresolved
    /// call). What to do comes first, so nothing the remote agent writes reads as the
    /// gateway's instructions.
    fn ask_person(&self, call: &CallEnvelope, question: &intents::Question) -> CallOutcome {
        let task: String = question.asked.task.task_id.chars().take(64).collect();
        let reason = format!(
            "the remote agent of {} asks a question (task {task}); answer it with a resolution naming {} with outcome answered and the answer as its note, or decline it with outcome did_not_act (its task is then cancelled). It asks: {:?}",
            call.tool, question.id, question.asked.text
        );
        let attestation = self.sign_unresolved(call, &question.id, &reason, Some(&call.call_id));
        CallOutcome::OutcomeUnknown {
            call_id: question.id.clone(),
            reason,
            attestation,
            for_call: Some(call.call_id.clone()),
            cost: None,
        }
    }

    /// A call whose remote agent waits on `question`: a person's answer continues its task,
    /// a refusal cancels it, and without either the Session goes on waiting.
    async fn answer_question<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        started: &intents::Started,
        question: intents::Question,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<CallOutcome, GatewayError> {
        use contextos_crds::session::ResolvedOutcome;
        let Some(resolution) = call.resolution.as_ref().filter(|r| r.call_id == question.id) else {
            return Ok(self.ask_person(call, &question));
        };
        match (resolution.outcome, resolution.note.as_deref()) {
            (ResolvedOutcome::Answered, Some(answer)) if !answer.is_empty() => {
                let answer = intents::Answer {
                    question,
                    text: answer.to_owned(),
                    resolver: resolution.resolver.clone(),
                };
                self.deliver_answer(call, tool, started, &answer, false, recorder)
                    .await
            }
            (ResolvedOutcome::DidNotAct, _) => Ok(CallOutcome::Executed(
                self.decline(call, tool, started, &question, resolution, recorder)
                    .await?,
            )),
            // Admission refuses other findings on a question; one that got through (or an
            // empty answer) is not an answer: the question stands.
            _ => Ok(self.ask_person(call, &question)),
        }
    }

    /// Declines `question` as `resolution` says (`did_not_act`): the decline goes on record
    /// first — only on the record as it was read, so of two executors (a person's attempt, the
    /// gateway for a Session that ended) one declines and the other cancels nothing — then its
    /// remote task is cancelled and the call fails.
    async fn decline<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        started: &intents::Started,
        question: &intents::Question,
        resolution: &contextos_crds::session::Resolution,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<ToolResultRecord, GatewayError> {
        recorder.stage(EntryBody::CallResolved {
            call_id: started.call_id.clone(),
            outcome: resolution.outcome,
            resolver: resolution.resolver.clone(),
            note: resolution.note.clone(),
        });
        recorder.flush_exclusive().await?;
        let cancelled = self.cancel_remote(call, tool, &question.asked.task).await;
        let result = ToolResultRecord {
            call_id: started.call_id.clone(),
            ok: false,
            output: Value::Null,
            error: Some(format!(
                "{} declined the remote agent's question{}; its task {} {}",
                resolution.resolver,
                resolution
                    .note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default(),
                question.asked.task.task_id,
                cancelled_or_not(cancelled)
            )),
            attempts: 0,
            truncated: false,
            // Charged when it first asked.
            cost: None,
            cached: None,
        };
        Ok(self.settle_result(call, &started.call_hash, result, recorder))
    }

    /// Puts a person's answer on record, then sends it and records how the call ended. On
    /// record first: only one executor sends it (the exclusive write fails for the others,
    /// who wait out the tool's time), and after a crash the call's task is followed (see
    /// `intents::Resumption::FollowAnswer`), never asked again. `resent`: the answer may have
    /// gone before, so it is sent only if the task still waits on its question.
    async fn deliver_answer<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        started: &intents::Started,
        answer: &intents::Answer,
        resent: bool,
        recorder: &mut Recorder<'_, S>,
    ) -> Result<CallOutcome, GatewayError> {
        recorder.stage(EntryBody::CallResolved {
            call_id: started.call_id.clone(),
            outcome: contextos_crds::session::ResolvedOutcome::Answered,
            resolver: answer.resolver.clone(),
            note: Some(answer.text.clone()),
        });
        recorder.flush_exclusive().await?;
        let turn = adapters::a2a::Turn::Answer {
            task: &answer.question.asked.task,
            text: &answer.text,
            asked: &answer.question.asked,
            question: started.asked,
            resent,
        };
        let sent = self.send(call, tool, turn).await;
        Ok(self
            .conclude(
                call,
                &started.call_hash,
                tool,
                sent.acted(),
                started.asked,
                recorder,
            )
            .await)
    }

    /// A memory tool's call, carried out in the store the run is recorded to: the candidate
    /// stage of `remember`, or a `recall`. The decision (or what was offered) is recorded
    /// beside the result. A store that fails is a failed call the run may try again.
    async fn carry_out_memory<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        operation: contextos_crds::agent::MemoryOperation,
        recorder: &mut Recorder<'_, S>,
    ) -> ToolResultRecord {
        use contextos_crds::agent::MemoryOperation;

        use crate::memory::desk::MemoryDesk;
        let run = &call.run_context.context;
        let now = now_ms();
        let done = match operation {
            MemoryOperation::Remember => {
                let evidence = recorder
                    .head()
                    .map(|(seq, hash)| crate::memory::EvidenceHandle { seq, hash });
                self.memory
                    .remember(
                        recorder.store(),
                        run,
                        &call.call_id,
                        evidence,
                        now,
                        &call.arguments,
                    )
                    .await
                    .map(|candidate| {
                        let answer = candidate.answer();
                        (EntryBody::MemoryCandidate(candidate), answer)
                    })
            }
            MemoryOperation::Recall => match MemoryDesk::recall_ask(&call.arguments) {
                Ok(ask) => self
                    .memory
                    .recall(
                        recorder.store(),
                        run,
                        crate::memory::desk::RecallFor::Call(&call.call_id),
                        &ask,
                        now,
                    )
                    .await
                    .map(|recall| {
                        let answer = serde_json::json!({
                            "items": recall.content.lines().collect::<Vec<_>>(),
                            "heldBack": recall.excluded_total,
                            "note": recall.note,
                        });
                        (EntryBody::MemoryRecalled(recall), answer)
                    }),
                Err(e) => Err(e),
            },
        };
        let result = match done {
            Ok((entry, output)) => {
                recorder.stage(entry);
                ToolResultRecord {
                    call_id: call.call_id.clone(),
                    ok: true,
                    output,
                    error: None,
                    attempts: 1,
                    truncated: false,
                    cost: None,
                    cached: None,
                }
            }
            Err(e) => ToolResultRecord {
                call_id: call.call_id.clone(),
                ok: false,
                output: Value::Null,
                error: Some(e.to_string()),
                attempts: 1,
                truncated: false,
                cost: None,
                cached: None,
            },
        };
        self.settle_result(call, call_hash, result, recorder)
    }

    /// Records an executed call's result, and remembers a success by its idempotency key (a
    /// call resubmitted after a crash answers from it).
    fn settle_result<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        call_hash: &str,
        result: ToolResultRecord,
        recorder: &mut Recorder<'_, S>,
    ) -> ToolResultRecord {
        recorder.stage(EntryBody::ToolResult(result.clone()));
        if result.ok
            && let Ok(mut completed) = self.completed.lock()
        {
            completed.insert(
                call.idempotency_key.clone(),
                Completed {
                    call_hash: call_hash.to_owned(),
                    result: result.clone(),
                },
            );
        }
        result
    }

    /// In replay, the result the original run got; a call it never executed has none to serve.
    fn recorded_result<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
    ) -> ToolResultRecord {
        let same_call = || {
            let mut by_content = self.by_content.as_ref()?.lock().ok()?;
            let key = Self::content_key(&call.tool, call.risk, call.kind, &call.arguments);
            by_content.get_mut(&key)?.pop_front()
        };
        let recorded = self
            .completed_result(&call.idempotency_key)
            .map(|done| done.result);
        let result = match recorded.or_else(same_call) {
            Some(done) => ToolResultRecord {
                call_id: call.call_id.clone(),
                ..done
            },
            None => match &self.canned {
                Some(results) => canned_result(results, call),
                None => self.unrecorded_result(call),
            },
        };
        recorder.stage(EntryBody::ToolResult(result.clone()));
        result
    }

    fn unrecorded_result(&self, call: &CallEnvelope) -> ToolResultRecord {
        ToolResultRecord {
            call_id: call.call_id.clone(),
            ok: false,
            output: Value::Null,
            error: Some(if self.by_content.is_some() {
                self.unrecorded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                UNRECORDED_CALL.into()
            } else {
                "replay: the original run has no result for this call (it was not executed then)".into()
            }),
            attempts: 0,
            truncated: false,
            cost: None,
            cached: None,
        }
    }

    /// Headers and limits of one call to `tool`.
    fn call_context(&self, call: &CallEnvelope, tool: &CatalogTool) -> CallContext {
        let adapter = &tool.spec.adapter;
        let context = &call.run_context.context;
        CallContext {
            idempotency_key: call.idempotency_key.clone(),
            // The call's span (see `handle_in_run`), or one derived from the call when nothing
            // is traced: the same for a replayed call.
            traceparent: match crate::telemetry::traceparent_trace_id(&call.traceparent) {
                Some(trace) if trace == context.trace_id => call.traceparent.clone(),
                _ => envelope::traceparent(&context.trace_id, &context.run_id, &call.call_id),
            },
            timeout: Duration::from_secs(u64::from(tool.spec.timeout_seconds)),
            max_response_bytes: adapter
                .chosen()
                .and_then(contextos_crds::agent::Adapter::max_response_bytes)
                .unwrap_or(contextos_crds::agent::DEFAULT_MAX_RESPONSE_BYTES)
                as usize,
            bearer_token: tool.bearer_token.clone(),
            hmac_key: tool.hmac_key.clone(),
            delegation: adapter.a2a.as_ref().map(|_| adapters::Delegation {
                tenant: context.tenant_id.clone(),
                agent: context.agent.name.clone(),
                run: context.run_id.clone(),
                user: context.user.as_ref().map(|u| u.subject.clone()),
            }),
        }
    }

    /// One attempt of a call, counted in the gateway's metrics by adapter and outcome.
    async fn attempt(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        turn: adapters::a2a::Turn<'_>,
    ) -> Result<adapters::Reply, AdapterError> {
        let started = Instant::now();
        let result = self.attempt_unmeasured(call, tool, turn).await;
        if let Some(adapter) = metrics::adapter_of(&tool.spec.adapter) {
            let outcome = match &result {
                Ok(_) => metrics::Outcome::ok,
                Err(AdapterError::CircuitOpen(_)) => {
                    metrics::gateway().circuit_refusal(adapter);
                    metrics::Outcome::refused
                }
                Err(error) if !error.may_have_been_sent() => metrics::Outcome::refused,
                Err(_) => metrics::Outcome::failed,
            };
            metrics::gateway().call(adapter, outcome, started.elapsed());
        }
        result
    }

    async fn attempt_unmeasured(
        &self,
        call: &CallEnvelope,
        tool: &CatalogTool,
        turn: adapters::a2a::Turn<'_>,
    ) -> Result<adapters::Reply, AdapterError> {
        let adapter = &tool.spec.adapter;
        let ctx = self.call_context(call, tool);
        use contextos_crds::agent::Adapter;
        let route = match adapter.chosen() {
            Some(Adapter::Http(http)) => Route::Http(http),
            Some(Adapter::Webhook(hook)) => Route::Webhook(hook),
            Some(Adapter::Mcp(mcp)) => Route::Mcp(mcp),
            Some(Adapter::A2a(a2a)) => Route::A2a(a2a),
            Some(Adapter::OpenApi(api)) => Route::OpenApi(api),
            // Memory tools are the gateway's own: answered before any adapter is reached.
            Some(Adapter::Memory(_)) | None => {
                return Err(AdapterError::Unsupported(format!(
                    "tool {} names no adapter this gateway runs",
                    call.tool
                )));
            }
        };
        let endpoint = match route {
            Route::Http(http) => adapters::http::endpoint_of(&http.url),
            Route::Webhook(hook) => adapters::http::endpoint_of(&hook.url),
            Route::Mcp(mcp) => adapters::mcp::server_of(mcp),
            Route::A2a(a2a) => adapters::http::endpoint_of(&a2a.url),
            Route::OpenApi(api) => adapters::http::endpoint_of(api.base_url()),
        };
        if !self.breakers.allow(&endpoint, Instant::now()) {
            return Err(AdapterError::CircuitOpen(endpoint));
        }
        if let Some(guard) = &self.egress {
            let destinations = match route {
                Route::Http(http) => vec![&http.url],
                Route::Webhook(hook) => vec![&hook.url],
                Route::Mcp(mcp) => mcp.url.iter().collect(),
                Route::A2a(a2a) => vec![&a2a.url],
                // Calls go to the document's origin, or to the server the Agent names.
                Route::OpenApi(api) => std::iter::once(&api.document).chain(&api.server).collect(),
            };
            for url in destinations {
                guard
                    .check_resolved(&self.effective_url(url))
                    .await
                    .map_err(AdapterError::Refused)?;
            }
        }
        let args = &call.arguments;
        let result = match route {
            Route::Http(http) => {
                let url = self.effective_url(&http.url);
                adapters::http::call(&self.http, &url, http.method, args, &ctx, false)
                    .await
                    .map(adapters::Reply::Done)
            }
            Route::Webhook(hook) => {
                let post = contextos_crds::agent::HttpMethod::Post;
                let url = self.effective_url(&hook.url);
                adapters::http::call(&self.http, &url, post, args, &ctx, true)
                    .await
                    .map(adapters::Reply::Done)
            }
            Route::Mcp(mcp) => {
                let mut mcp = mcp.clone();
                mcp.url = mcp.url.map(|url| self.effective_url(&url));
                self.mcp
                    .call(&call.tool, &mcp, args, &ctx)
                    .await
                    .map(adapters::Reply::Done)
            }
            Route::A2a(a2a) => {
                let mut a2a = a2a.clone();
                a2a.url = self.effective_url(&a2a.url);
                let rewrite = |url: &str| self.effective_url(url);
                let until = self.session_watch.as_ref().map(|watch| watch.ended());
                Box::pin(self.a2a.call(&a2a, &rewrite, args, &ctx, turn, until)).await
            }
            Route::OpenApi(api) => {
                let rewrite = |url: &str| self.effective_url(url);
                self.openapi
                    .call(api, &call.tool, tool.spec.risk, &rewrite, args, &ctx)
                    .await
                    .map(adapters::Reply::Done)
            }
        };
        // Only failures that say something about the endpoint's health count against it.
        let healthy = match &result {
            Ok(_) => true,
            Err(e) => !e.is_retryable(),
        };
        if self.breakers.report(&endpoint, healthy, Instant::now())
            && let Some(adapter) = metrics::adapter_of(adapter)
        {
            metrics::gateway().circuit_opened(adapter);
        }
        result
    }

    async fn refuse<S: RecordStore>(
        &self,
        call: &CallEnvelope,
        recorder: &mut Recorder<'_, S>,
        rule: String,
        reason: String,
    ) -> Result<CallOutcome, GatewayError> {
        recorder.stage(decision_entry(
            call,
            PolicyEffect::Deny,
            PolicyEffect::Deny,
            &rule,
            &reason,
            false,
        ));
        Ok(CallOutcome::Denied { rule, reason })
    }
}

/// One HTTP client for every gateway in the process: building one loads the system's root
/// certificates, which costs milliseconds, and clones share one connection pool.
/// The result a human's resolution stands for: what the tool did, as far as they found.
/// A call's result as a person resolved it; one that acted cost its tool's `price`.
fn resolved_result(
    call_id: &str,
    resolution: &contextos_crds::session::Resolution,
    price: Option<&crate::pricing::PinnedToolPrice>,
) -> ToolResultRecord {
    use contextos_crds::session::ResolvedOutcome;
    let note = resolution.note.clone().unwrap_or_default();
    match resolution.outcome {
        ResolvedOutcome::Acted => ToolResultRecord {
            call_id: call_id.to_owned(),
            ok: true,
            output: serde_json::json!({
                "resolved": "acted",
                "resolver": resolution.resolver,
                "note": note,
            }),
            error: None,
            attempts: 0,
            truncated: false,
            cost: price.map(crate::pricing::PinnedToolPrice::cost),
            cached: None,
        },
        // An answer is for a remote agent's question (see `answer_question`); a call that asked
        // none is never resolved by one, and would read as not having acted.
        ResolvedOutcome::DidNotAct | ResolvedOutcome::Answered => ToolResultRecord {
            call_id: call_id.to_owned(),
            ok: false,
            output: Value::Null,
            error: Some(format!(
                "the call did not act (found by {} after an interruption){}",
                resolution.resolver,
                if note.is_empty() {
                    String::new()
                } else {
                    format!(": {note}")
                }
            )),
            attempts: 0,
            truncated: false,
            cost: None,
            cached: None,
        },
    }
}

/// A skill scenario's answer to `call`: the first result for its tool whose arguments, when
/// given, are the call's.
fn canned_result(results: &[contextos_crds::skill::CannedResult], call: &CallEnvelope) -> ToolResultRecord {
    let found = results.iter().find(|r| {
        r.tool == call.tool
            && r.arguments
                .as_ref()
                .is_none_or(|wanted| *wanted == call.arguments)
    });
    let (ok, output, error) = match found {
        Some(r) => match &r.error {
            Some(error) => (false, Value::Null, Some(error.clone())),
            None => (true, r.output.clone().unwrap_or(Value::Null), None),
        },
        None => (
            false,
            Value::Null,
            Some(format!(
                "the scenario gives no result for this call of {} (add a toolResults entry for it)",
                call.tool
            )),
        ),
    };
    ToolResultRecord {
        call_id: call.call_id.clone(),
        ok,
        output,
        error,
        attempts: 1,
        truncated: false,
        cost: None,
        cached: None,
    }
}

/// How a cancelled remote task is reported.
fn cancelled_or_not(cancelled: bool) -> &'static str {
    if cancelled {
        "was cancelled"
    } else {
        "could not be cancelled (the remote agent did not confirm)"
    }
}

fn shared_http_client() -> reqwest::Client {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(crate::http::client);
    CLIENT.clone()
}

/// A call's outcome as its span names it.
fn outcome_name(outcome: &Result<CallOutcome, GatewayError>) -> &'static str {
    match outcome {
        Ok(CallOutcome::Executed(result)) if result.ok => "executed",
        Ok(CallOutcome::Executed(_)) => "failed",
        Ok(CallOutcome::Denied { .. }) => "denied",
        Ok(CallOutcome::OutcomeUnknown { .. }) => "outcome_unknown",
        Ok(CallOutcome::InProgress { .. }) => "in_progress",
        Ok(CallOutcome::NeedsApproval { .. }) => "needs_approval",
        Err(_) => "error",
    }
}

/// Which adapter a call goes through.
#[derive(Clone, Copy)]
enum Route<'a> {
    Http(&'a contextos_crds::agent::HttpAdapter),
    Webhook(&'a contextos_crds::agent::WebhookAdapter),
    Mcp(&'a contextos_crds::agent::McpAdapter),
    A2a(&'a contextos_crds::agent::A2aAdapter),
    OpenApi(&'a contextos_crds::agent::OpenApiAdapter),
}

/// How sending one turn of a call went.
struct Sent {
    outcome: Result<adapters::Reply, AdapterError>,
    attempts: u32,
    /// Whether anything may have reached the tool (what a priced call is charged on).
    may_have_acted: bool,
}

impl Sent {
    /// A later turn of a call that already went out: the call has been sent, whatever this
    /// turn did.
    fn acted(self) -> Self {
        Self {
            may_have_acted: true,
            ..self
        }
    }
}

/// Whether a call of `tool` (priced `price`) in the run `context` describes may be asked while
/// its go-ahead is being made durable (and answered only once it is), instead of after. A
/// read-only GET changes nothing: if a crash takes the go-ahead back, the call is decided again
/// and the tool asked again, as a retry of a read-only tool may be anyway, and nobody was told
/// the first answer. Only what the gateway can see is a read: an HTTP tool's GET, or an OpenAPI
/// operation (admission lets only a GET be `read_only`) — not a POST said to be read-only, nor
/// an MCP tool, whose effects only its server knows; not a tool of kind `act` whatever its
/// declared risk, a webhook, an A2A agent (a task, once made, is followed from the record) or
/// the gateway's memory tools. Not a priced tool: its hold in the SpendQuotas is made durable
/// by the go-ahead, and a call paid for must be counted. And not in a run about a person, whose
/// data in the arguments must not reach a tool with no durable record that it did.
fn asked_while_flushing(
    tool: &Tool,
    price: Option<&crate::pricing::PinnedToolPrice>,
    context: &RunContext,
) -> bool {
    use contextos_crds::{
        agent::{Adapter, HttpMethod},
        common::ToolKind,
    };
    let reads = match tool.adapter.chosen() {
        Some(Adapter::Http(http)) => http.method == HttpMethod::Get,
        Some(Adapter::OpenApi(_)) => true,
        _ => false,
    };
    reads
        && tool.risk == ToolRisk::ReadOnly
        && tool.kind != ToolKind::Act
        && price.is_none()
        && context.subject.is_none()
}

fn decision_entry(
    call: &CallEnvelope,
    effect: PolicyEffect,
    enforced: PolicyEffect,
    rule: &str,
    reason: &str,
    dry_run: bool,
) -> EntryBody {
    EntryBody::PolicyDecision(PolicyDecisionRecord {
        call_id: call.call_id.clone(),
        effect,
        enforced,
        rule: rule.to_owned(),
        reason: reason.to_owned(),
        dry_run,
    })
}

/// The first schema violation of `args`, naming the field and the fix.
fn schema_problem(tool: &CatalogTool, args: &Value) -> Option<String> {
    let validator = tool.schema.as_ref()?;
    let error = validator.iter_errors(args).next()?;
    let path = error.instance_path().to_string();
    let field = if path.is_empty() {
        "the arguments".to_owned()
    } else {
        format!("argument {path}")
    };
    Some(format!(
        "{field} of tool {} violates its inputSchema: {error}",
        tool.spec.name
    ))
}

#[cfg(test)]
mod tests {
    use super::{Asked, EntryBody, PolicyEffect};
    use crate::records::entry::PolicyDecisionRecord;

    #[test]
    fn only_unpriced_reads_the_gateway_can_see_are_asked_while_their_go_ahead_is_flushed() {
        let tool = |risk: &str, adapter: &str| -> contextos_crds::agent::Tool {
            serde_yaml::from_str(&format!(
                "{{name: t, description: d, risk: {risk}, kind: observe, adapter: {adapter}}}"
            ))
            .expect("tool")
        };
        let bundle =
            crate::manifests::ManifestSet::load(&[
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
            ])
            .expect("quickstart")
            .bundle("shop", None)
            .expect("bundle");
        let operator = crate::keys::KeyPair::from_seed([1; 32]);
        let run = crate::run::issue_run_context(
            &bundle,
            "r",
            "0af7651916cd43dd8448eb211c80319c",
            None,
            &operator,
            0,
        )
        .expect("context")
        .context;
        let about_someone = crate::run_context::RunContext {
            subject: Some(crate::consent::SubjectHandle::new("subj:7f3a").expect("handle")),
            ..run.clone()
        };
        let asked_while_flushing =
            |tool: &contextos_crds::agent::Tool| super::asked_while_flushing(tool, None, &run);
        let http = "{http: {url: 'http://tools:8080/x', method: GET}}";
        let openapi = "{openapi: {document: 'http://tools:8080/openapi.json', operationId: get}}";
        let price = crate::pricing::PinnedToolPrice {
            price_list: "tools".into(),
            currency: "USD".into(),
            per_call: crate::pricing::Nanos(1_000),
        };
        for adapter in [http, openapi] {
            let read = tool("read_only", adapter);
            assert!(asked_while_flushing(&read), "{adapter}");
            // Not in a run about a person, nor priced, nor for a tool that says it acts.
            assert!(
                !super::asked_while_flushing(&read, None, &about_someone),
                "{adapter}"
            );
            assert!(
                !super::asked_while_flushing(&read, Some(&price), &run),
                "{adapter}"
            );
            let acting = contextos_crds::agent::Tool {
                kind: contextos_crds::common::ToolKind::Act,
                ..read
            };
            assert!(!asked_while_flushing(&acting), "{adapter}");
            // Anything that may change the world waits for its go-ahead to be durable.
            for risk in ["local_write", "network", "destructive"] {
                assert!(!asked_while_flushing(&tool(risk, adapter)), "{risk} {adapter}");
            }
        }
        for adapter in [
            // A POST said to read, and an MCP tool: only the tool knows what they do.
            "{http: {url: 'http://tools:8080/x', method: POST}}",
            "{mcp: {url: 'http://tools:8081/mcp', tool: x}}",
            "{webhook: {url: 'http://tools:8080/hook', secretRef: {name: s, key: k}}}",
            "{a2a: {url: 'http://agent:9999/', riskCeiling: read_only}}",
            "{memory: {operation: recall}}",
        ] {
            assert!(!asked_while_flushing(&tool("read_only", adapter)), "{adapter}");
        }
    }

    fn decided(enforced: PolicyEffect) -> EntryBody {
        EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: "1.0".into(),
            effect: enforced,
            enforced,
            rule: "p/r".into(),
            reason: "because".into(),
            dry_run: false,
        })
    }

    fn paused() -> EntryBody {
        EntryBody::ApprovalRequested {
            call_id: "1.0".into(),
            call_hash: "h".into(),
            approvers: vec![],
        }
    }

    fn approved() -> EntryBody {
        EntryBody::ApprovalGranted {
            call_id: "1.0".into(),
            call_hash: "h".into(),
            approver: "dana@example.com".into(),
            reason: None,
        }
    }

    #[test]
    fn a_result_answers_the_latest_request_let_through_under_its_call_id() {
        let mut asked = Asked::default();
        let follow = |asked: &mut Asked<&str>, body: EntryBody| {
            assert_eq!(Asked::<()>::followed(&body), Some("1.0"));
            asked.follow(&body);
        };
        asked.requested("k1");
        follow(&mut asked, decided(PolicyEffect::Allow));
        // Another call sent under the call id while k1 is carried out, and refused.
        asked.requested("k2");
        follow(&mut asked, decided(PolicyEffect::Deny));
        // A refusal recorded with no request of its own (an unknown tool, say).
        follow(&mut asked, decided(PolicyEffect::Deny));
        // Another held for an approval, and the run paused for it.
        asked.requested("k3");
        follow(&mut asked, decided(PolicyEffect::RequireApproval));
        follow(&mut asked, paused());
        assert_eq!(asked.answered(), Some(&"k1"), "k1's result is k1's");
        // Resumed and approved, k3 is carried out: the result that follows is its.
        asked.requested("k3");
        follow(&mut asked, decided(PolicyEffect::RequireApproval));
        follow(&mut asked, approved());
        assert_eq!(asked.answered(), Some(&"k3"));
        // A request answered from a completed call's result has no decision of its own.
        asked.requested("k1");
        assert_eq!(asked.answered(), Some(&"k1"));
    }
}
