//! `contextos gateway`: the Tool Gateway as the cluster's one effect path. Runner pods hold no
//! credential, signing key or store address; every record append and read, tool call and model
//! turn of a run is a request here. Each request is authenticated twice: the pod's projected
//! token (TokenReview → namespace and pod) and the signed RunContext, which must have been
//! issued to that very pod in that namespace. The tenant is the verified namespace.
//!
//! What a runner may write is limited to its own run and to the entries only it can know (its
//! context compilation, critic verdicts, checkpoints, outcome). Decisions, results, approvals
//! and model turns are written by the gateway itself, and the gateway alone signs heads — with
//! the tenant's key, which never leaves this service.

mod a2a_api;
mod blob_charges;
pub mod completion;
mod consent_api;
mod context_cache;
mod embeddings_api;
mod memory_api;
mod question_watch;
pub mod quotas;
mod read_api;
mod run_api;
mod session_polls;
pub mod spend_metrics;
mod subject_api;
pub mod tenant_bytes;
#[cfg(feature = "otlp")]
mod traces_api;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use contextos_crds::session::Resolution;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;
use tracing::Instrument as _;

use super::{
    ToolGateway,
    capabilities::{CapabilityResolver, CapabilityRoute},
    egress::EgressGuard,
    identity::{AuthError, Authenticator, GATEWAY_AUDIENCE, PodIdentity},
    readers::{Access, ReaderAuthority},
    remote::{CallRequest, HEAD_PENDING, ModelCall, RecallCall},
    run_log::RunLog,
    shares,
    tenancy::{TenantError, TenantView},
};
use crate::{
    keys::{PublicKey, TenantKeys},
    memory::{
        backend::MemoryBackend,
        consents::{CONSENT_HISTORY_PATH, CONSENT_RECORDS_PATH, CONSENT_SUBJECTS_PATH},
        remote::{
            MEMORY_HELD_PATH, MEMORY_HELD_PREFIX, MEMORY_ITEM_PREFIX, MEMORY_ITEMS_PATH, MEMORY_SCOPE_PREFIX,
        },
    },
    model::{Model, ModelError},
    read_grant::SignedReadGrant,
    records::{
        EntryBody, Hash, RecordEntry, RecordStore, Recorder, StoredEntry, TenantId,
        recorder::now_ms,
        store::remote::{
            AppendRequest, CHAIN_PAGE, Problem, READ_GRANT_HEADER, READER_NAMESPACE_HEADER,
            RUN_CONTEXT_HEADER, WireEntry,
        },
    },
    run::bundle::RunBundle,
    run_context::SignedRunContext,
    vault::remote::{SUBJECT_ERASE_PATH, SUBJECT_ROTATE_PATH, SUBJECT_STATE_PATH},
};

/// The bearer token of a request (empty without one).
fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// Requests being identified at once by one replica (more wait in line): what bounds the token
/// reviews a flood of strangers can cause.
const MAX_IDENTIFYING: usize = 1024;
/// Requests of identified callers one replica holds at once, whatever their tenant (more are
/// answered 503, which runners retry): memory for their bodies and their tasks.
const MAX_IN_FLIGHT: usize = 256;
/// How long a caller may take to send a request's body: a slow sender holds one of its
/// tenant's slots and of the replica's, so it is cut off.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Requests of one tenant handled at once by one replica (more are answered 503, which runners
/// retry): a tenant whose calls hang — a tool that never answers — cannot take every slot.
const MAX_IN_FLIGHT_PER_TENANT: usize = 64;
/// The last slots of a replica's [`MAX_IN_FLIGHT`], kept for tenants with at most
/// [`SMALL_SHARE`] requests in flight: however many tenants hold their whole share, one with
/// little going on still gets in (three tenants holding 64 each leave 64 slots, for eight more
/// tenants at least).
const RESERVED_SLOTS: usize = 64;
/// What a tenant may hold of a replica's [`RESERVED_SLOTS`].
const SMALL_SHARE: usize = 8;
/// Tenants whose record-key answers a replica keeps.
const MAX_RECORD_KEYS_KEPT: usize = 4096;
/// Bytes of request bodies one replica holds at once (see `shares`): eight of the largest.
const MAX_BUFFERED_BYTES: usize = 8 * MAX_REQUEST_BYTES;
/// Bytes of request bodies of one tenant a replica holds at once: two of the largest (one
/// large upload leaves 8 MiB for the run's small requests: a call, a few entries).
const MAX_BUFFERED_PER_TENANT: usize = 2 * MAX_REQUEST_BYTES;
/// The last bytes of [`MAX_BUFFERED_BYTES`], kept for tenants holding at most
/// [`SMALL_BUFFER_SHARE`]: tenants holding their whole share leave room for the small requests
/// of sixteen others.
const RESERVED_BUFFER_BYTES: usize = 2 * MAX_REQUEST_BYTES;
/// What a tenant may hold of [`RESERVED_BUFFER_BYTES`].
const SMALL_BUFFER_SHARE: usize = 1 << 20;
/// Largest request body (a batch of entries or a blob).
const MAX_REQUEST_BYTES: usize = 8 << 20;
/// What one run may write to the store by default (its record's entries, and blobs it uploads).
pub const DEFAULT_MAX_RUN_BYTES: u64 = 256 << 20;
pub use tenant_bytes::DEFAULT_MAX_TENANT_STORE_BYTES;
/// Runs whose gateway is kept built at most; the least recently used is dropped first.
const MAX_CACHED_RUNS: usize = 256;
/// A pod's refusals recorded in its run per minute, at most.
const REFUSALS_RECORDED_PER_MINUTE: u32 = 10;
/// Pods whose refusals are counted at once before those of past minutes are forgotten.
const MAX_PODS_REFUSED: usize = 4096;
/// Pods remembered as their Session's runner pods or not (past this, those expired are dropped).
const MAX_RUNNER_PODS_KNOWN: usize = 16_384;
/// How long a pod found to be its Session's runner pod is believed to be one, and a pod found
/// not to be believed not to be.
const RUNNER_POD_KEPT_MS: i64 = 10 * 60_000;
const NOT_A_RUNNER_POD_KEPT_MS: i64 = 60_000;
/// Blobs of one run the gateway keeps track of, at most: a body is moved to a blob only past
/// 16 KiB, so a run within its store quota (256 MiB by default) refers to 16,384 at most;
/// a runner that writes many tiny ones is not served those past this.
const MAX_BLOBS_REFERRED: usize = 65_536;
/// The API group of the Session that controls a runner pod.
const SESSION_GROUP: &str = "contextos.dev";

/// Requests one replica works on at once per core: the others wait in line for a turn, in
/// rotation by tenant (see [`crate::gateway::fair`]). A few per core keep the cores busy while
/// some requests wait for a flush.
const TURNS_PER_CORE: usize = 2;

/// One of a tenant's in-flight slots at this replica, and its turn, held while its request is
/// served (by the handler and by any task carrying the request on).
#[derive(Clone, Debug)]
pub(super) struct TenantSlot {
    _slot: Arc<shares::Share>,
    turn: Option<Arc<crate::gateway::fair::TurnHandle>>,
    _body: Arc<shares::Share>,
}

impl TenantSlot {
    /// Runs `work` for the request this slot was taken for, in its turn.
    pub(super) async fn carry<F: std::future::Future>(
        held: Option<axum::Extension<Self>>,
        work: F,
    ) -> F::Output {
        // On the heap: a request's whole handling is a deep future.
        let work = Box::pin(work);
        match held.as_ref().and_then(|slot| slot.turn.clone()) {
            Some(turn) => turn.scope(work).await,
            None => work.await,
        }
    }
}

/// The service's shared state.
pub struct GatewayService<S, A, T> {
    store: S,
    auth: A,
    tenants: Arc<T>,
    keys: TenantKeys,
    /// The operator's key: the only signer of RunContexts this service accepts.
    trust: PublicKey,
    runs: Mutex<RunSlots>,
    /// How often a followed remote task's Session is read (see [`session_polls`]).
    session_polls: std::time::Duration,
    /// How often a standing remote question's run and Session are read, and how many
    /// questions are watched now (see [`question_watch`]).
    question_polls: std::time::Duration,
    questions_watched: Arc<question_watch::Watched>,
    /// RunContexts whose signature verified.
    verified: Mutex<context_cache::ContextCache>,
    /// URL prefix rewrites for tools (single-machine setups and tests).
    endpoint_overrides: Vec<(String, String)>,
    /// ContextOS's own namespace: its keys live there, and no caller from it is served.
    system_namespace: String,
    /// Where the identity vault's key rings are: no tenant either.
    vault_namespace: String,
    /// Where tool and model calls may go.
    egress: EgressGuard,
    /// Finds runs' capability pods; without it, Agents with command-started tools are refused.
    capabilities: Option<Arc<dyn CapabilityResolver>>,
    /// Requests in flight, in all and per tenant.
    slots: shares::Shares,
    /// KiB of request bodies held, in all and per tenant.
    bodies: shares::Shares,
    /// Answers of `/v1/tenants/{tenant}/record-key` made so far, by tenant.
    record_keys: Mutex<HashMap<String, serde_json::Value>>,
    /// Turns for the requests worked on at once, handed round the tenants (`None`: every
    /// admitted request is worked on at once — the fairness benchmark's baseline).
    turns: Option<Arc<crate::gateway::fair::FairTurns>>,
    /// The replay gates this replica is running: (Job, tenant).
    gates: Mutex<Vec<(String, String)>>,
    /// What the model turns it recorded cost (served on the metrics listener only).
    spend: Arc<spend_metrics::SpendMetrics>,
    /// What one run may write to the store.
    max_run_bytes: u64,
    /// What each tenant keeps in the store, against its bound.
    tenant_bytes: tenant_bytes::TenantBytes,
    /// Bytes of blobs each run uploaded through this replica, by (tenant, run).
    blob_bytes: Mutex<blob_charges::BlobCharges>,
    /// Refusals recorded per pod in the current minute, by (namespace, pod): when the minute
    /// began, and how many (see [`GatewayService::record_refusal`]).
    refusals_recorded: Mutex<HashMap<(String, String), (i64, u32)>>,
    /// Tokens the API server refused lately, and how many more each address may have refused
    /// before its new tokens wait (see `gateway::refused_tokens`).
    refused_tokens: crate::gateway::refused_tokens::RefusedTokens,
    /// Whether pods were found controlled by their Session.
    runner_pods: Mutex<RunnerPods>,
    /// Whether a call or model turn is answered while its entries are written (the runner's
    /// next request proves they were), or only once they are durable.
    early_answers: bool,
    /// Whether read-only tools are asked only once their go-ahead is durable (see
    /// [`crate::gateway::ToolGateway::with_reads_after_their_go_ahead`]).
    reads_after_go_ahead: bool,
    /// The tenants' SpendQuotas as read, and their reports due.
    quota_desk: quotas::QuotaDesk,
    /// Results of cached read-only tools, shared by every run this replica serves (keyed by
    /// tenant, promoted revisions, user and subject; see `gateway::result_cache`).
    results: Arc<crate::gateway::result_cache::ResultCache>,
    /// Agents offered over A2A (none without it).
    a2a: Option<a2a_api::A2aSettings>,
    /// What runner pods' tool discovery embeds with (none: their runs score by BM25).
    embeddings: Option<Arc<embeddings_api::EmbeddingDesk>>,
    /// The collector runner pods' spans are relayed to (none: they are refused).
    #[cfg(feature = "otlp")]
    traces: Option<Arc<crate::telemetry::sink::TraceSink>>,
}

impl<S, A, T> std::fmt::Debug for GatewayService<S, A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

/// Whether pods were found controlled by their Session, by (namespace, pod uid, Session, the
/// Session's uid as the context names it), and until when that is believed.
type RunnerPods = HashMap<(String, String, String, Option<String>), (bool, i64)>;

/// Built runs by (tenant, run id), with when each was last used.
type RunSlots = HashMap<(String, String), (Arc<RunSlot>, i64)>;

/// A run the service governs: its pinned bundle, its gateway (tools with credentials, compiled
/// policies) and its model.
struct RunSlot {
    bundle: RunBundle,
    gateway: ToolGateway,
    /// The Agent's model, and those its routing names.
    models: crate::model::routing::Models,
    /// What this replica has read of the run's record. Requests of one run are handled one at
    /// a time in a replica (a run is sequential), holding this lock.
    log: tokio::sync::Mutex<RunLog>,
    /// The blobs the run's chain refers to, as far as read (see [`BlobsReferred`]).
    blobs: tokio::sync::Mutex<BlobsReferred>,
}

/// The blobs a run's chain refers to, read entry by entry as the chain grows: whether a blob is
/// the run's own is answered without reading the whole chain again, so asking for blobs a run
/// does not have costs the replica next to nothing.
#[derive(Default)]
struct BlobsReferred {
    /// The first entry not read yet.
    next: u64,
    hashes: std::collections::HashSet<Hash>,
}

/// A verified caller: a runner pod and the RunContext issued to it.
#[derive(Clone)]
struct Caller {
    identity: PodIdentity,
    context: SignedRunContext,
    tenant: TenantId,
}

impl Caller {
    fn run_id(&self) -> &str {
        &self.context.context.run_id
    }
}

/// A refused request: status, machine-readable code, message for a human, and — when asking
/// again later will do — after how long (`Retry-After`).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<std::time::Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            message,
            retry_after: None,
        }
    }

    /// Says the request may be asked again after `wait` (in whole seconds, at least one).
    fn retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let problem = Problem {
            error: self.message,
            code: self.code.to_owned(),
        };
        let mut response = (self.status, Json(problem)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The code of a refusal of a pod's request whose RunContext header is missing or holds no
/// signed RunContext: recorded in the pod's run, as a forged context is.
const NOT_A_RUN_CONTEXT: &str = "not_a_run_context";

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message.into())
}

fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, "forbidden", message.into())
}

fn unavailable(message: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        message.to_string(),
    )
}

/// A request refused before it was looked at: its address had too many tokens refused lately,
/// or its person too many access reviews denied.
fn throttled(e: &AuthError) -> Refusal {
    let refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        crate::records::store::remote::THROTTLED,
        e.to_string(),
    );
    match e {
        AuthError::Throttled(seconds) | AuthError::AccessThrottled(seconds) => {
            refusal.retry_after(std::time::Duration::from_secs(*seconds))
        }
        _ => refusal,
    }
}

type Reply = Result<Response, Refusal>;

/// What a person's request asks to do, by its method and path; `None` for what a person may
/// not ask at all.
fn person_access(method: &axum::http::Method, path: &str) -> Option<Access> {
    use axum::http::Method;
    match (method, path) {
        (&Method::GET, path) if path.starts_with("/v1/records/") => Some(Access::ReadRecords),
        (&Method::GET, CONSENT_HISTORY_PATH | CONSENT_SUBJECTS_PATH) => Some(Access::ReadConsents),
        (&Method::POST, CONSENT_RECORDS_PATH) => Some(Access::RecordConsent),
        (&Method::GET, MEMORY_ITEMS_PATH | MEMORY_HELD_PATH) => Some(Access::ReadMemory),
        (&Method::DELETE, path)
            if path.starts_with(MEMORY_ITEM_PREFIX)
                || path.starts_with(MEMORY_SCOPE_PREFIX)
                || path.starts_with(MEMORY_HELD_PREFIX) =>
        {
            Some(Access::ForgetMemory)
        }
        (&Method::POST, path) if path.starts_with(MEMORY_HELD_PREFIX) => Some(Access::KeepMemory),
        (&Method::GET, SUBJECT_STATE_PATH) => Some(Access::ReadSubjects),
        (&Method::POST, SUBJECT_ERASE_PATH | SUBJECT_ROTATE_PATH) => Some(Access::EraseSubject),
        _ => None,
    }
}

/// A request's body, read within [`BODY_READ_TIMEOUT`] and `max` bytes: a caller that sends
/// slowly or too much holds what it was given for that long at most.
async fn read_body(body: axum::body::Body, max: usize) -> Result<axum::body::Bytes, Refusal> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Ok(Ok(body)) => Ok(body),
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_too_slow",
            format!(
                "the request body was not sent within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_unreadable",
            format!("the request body could not be read in full (at most {max} bytes): {e}"),
        )),
    }
}

/// How many bytes a request's `body` is counted as: its declared length, or `max` (the most it
/// may be) when it declares none.
fn declared_bytes(body: &axum::body::Body, max: usize) -> usize {
    axum::body::HttpBody::size_hint(body)
        .upper()
        .map_or(max, |n| usize::try_from(n).unwrap_or(max))
        .min(max)
}

/// The refusal of a body of `tenant`'s, counted as `bytes`, that does not fit in the replica's
/// budget now.
fn bodies_refused(tenant: &str, bytes: usize, exhausted: shares::Exhausted) -> Refusal {
    let counted = format!(
        "counted as {:.1} MiB; a body without Content-Length counts as {} MiB",
        bytes as f64 / (1 << 20) as f64,
        MAX_REQUEST_BYTES >> 20
    );
    unavailable(match exhausted {
        shares::Exhausted::Tenant => format!(
            "with this request's body ({counted}), namespace {tenant}'s request bodies in flight at this \
             gateway replica would pass its {} MiB; try again",
            MAX_BUFFERED_PER_TENANT >> 20
        ),
        shares::Exhausted::Reserved => format!(
            "this gateway replica's last {} MiB for request bodies are kept for namespaces holding at \
             most {} MiB, and with this request's body ({counted}) namespace {tenant} would hold more; \
             try again",
            RESERVED_BUFFER_BYTES >> 20,
            SMALL_BUFFER_SHARE >> 20
        ),
        shares::Exhausted::Replica => format!(
            "this gateway replica holds {} MiB of request bodies, and this one ({counted}) does not fit; \
             try again",
            MAX_BUFFERED_BYTES >> 20
        ),
    })
}

/// The refusal of a person or caller whose token the API server did not vouch for; `needs`
/// says what token it takes.
fn not_authenticated(e: AuthError, needs: &str) -> Refusal {
    match e {
        AuthError::Unavailable(_) => unavailable(&e),
        AuthError::Throttled(_) | AuthError::AccessThrottled(_) => throttled(&e),
        AuthError::Missing => Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("no bearer token: {needs}"),
        ),
        _ => Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("{e} ({needs})"),
        ),
    }
}

/// A write a tenant's store bound has no room for (see [`tenant_bytes`]).
fn over_tenant_bound(tenant: &TenantId, over: &tenant_bytes::Over) -> Refusal {
    Refusal::new(
        StatusCode::INSUFFICIENT_STORAGE,
        crate::records::store::remote::QUOTA_EXCEEDED,
        format!("namespace {tenant}: {over}"),
    )
}

/// A write past the run's quota of store bytes.
fn over_quota(run: &str, used: u64, more: u64, limit: u64) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        crate::records::store::remote::QUOTA_EXCEEDED,
        format!(
            "run {run} has written {used} bytes to the store and this write adds {more}; a run may write at most {limit} (the gateway's --max-run-bytes)"
        ),
    )
}

#[derive(Debug, Deserialize)]
struct RunQuery {
    run: String,
    #[serde(default)]
    from: u64,
    /// Entries wanted from `from` on: at most [`CHAIN_PAGE`], which is also what none asks for.
    #[serde(default)]
    limit: Option<usize>,
}

impl RunQuery {
    /// How many entries of the chain one answer holds.
    fn page(&self) -> usize {
        self.limit.unwrap_or(CHAIN_PAGE).clamp(1, CHAIN_PAGE)
    }
}

#[derive(Debug, Deserialize)]
struct SessionQuery {
    session: String,
}

#[derive(Debug, Deserialize)]
struct RunsQuery {
    agent: Option<String>,
    session: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<usize>,
    /// Where the reader's last page ended (both, or neither).
    after_ms: Option<i64>,
    after_run: Option<String>,
}

// The most runs one listing answers; readers ask again for the runs after the last one they
// were given (`after_ms`, `after_run`), as `RemoteStore` does, a page at a time.
use crate::records::store::remote::MAX_LISTED_RUNS;

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub fn new(store: S, auth: A, tenants: T, keys: TenantKeys, trust: PublicKey) -> Self {
        Self {
            store,
            auth,
            tenants: Arc::new(tenants),
            keys,
            trust,
            runs: Mutex::new(HashMap::new()),
            session_polls: session_polls::EVERY,
            question_polls: question_watch::EVERY,
            questions_watched: Arc::default(),
            verified: Mutex::new(Default::default()),
            endpoint_overrides: Vec::new(),
            system_namespace: "contextos-system".into(),
            vault_namespace: "contextos-vault".into(),
            egress: EgressGuard::default(),
            capabilities: None,
            slots: shares::Shares::new(
                MAX_IN_FLIGHT as u32,
                MAX_IN_FLIGHT_PER_TENANT as u32,
                RESERVED_SLOTS as u32,
                SMALL_SHARE as u32,
            ),
            bodies: shares::Shares::new(
                shares::kib(MAX_BUFFERED_BYTES),
                shares::kib(MAX_BUFFERED_PER_TENANT),
                shares::kib(RESERVED_BUFFER_BYTES),
                shares::kib(SMALL_BUFFER_SHARE),
            ),
            record_keys: Mutex::new(HashMap::new()),
            turns: Some(crate::gateway::fair::FairTurns::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()) * TURNS_PER_CORE,
            )),
            gates: Mutex::new(Vec::new()),
            spend: Arc::default(),
            max_run_bytes: DEFAULT_MAX_RUN_BYTES,
            tenant_bytes: tenant_bytes::TenantBytes::new(DEFAULT_MAX_TENANT_STORE_BYTES),
            early_answers: true,
            reads_after_go_ahead: false,
            blob_bytes: Mutex::new(Default::default()),
            refusals_recorded: Mutex::new(HashMap::new()),
            refused_tokens: Default::default(),
            runner_pods: Mutex::new(Default::default()),
            quota_desk: Default::default(),
            results: Default::default(),
            a2a: None,
            embeddings: None,
            #[cfg(feature = "otlp")]
            traces: None,
        }
    }

    /// Embeds for runner pods' tool discovery with `embedder` (see `embeddings_api`); `None`
    /// (or the gateway's own embeddings, which would ask this service) serves none.
    pub fn with_embedder(mut self, embedder: Option<crate::discovery::embedding::Embedder>) -> Self {
        self.embeddings = embedder
            .and_then(embeddings_api::EmbeddingDesk::new)
            .map(Arc::new);
        self
    }

    /// Relays the spans runner pods send to `POST /v1/run/traces` (their own run's, checked) to
    /// `sink`.
    #[cfg(feature = "otlp")]
    pub fn with_trace_sink(mut self, sink: crate::telemetry::sink::TraceSink) -> Self {
        self.traces = Some(Arc::new(sink));
        self
    }

    /// Serves Agents that opt in (`spec.a2a`) over A2A at `/a2a/<namespace>/<agent>`, their
    /// tasks being Sessions created and read through `sessions`; `public_url` is the gateway's
    /// URL as callers reach it (the endpoint the cards name; default: the request's host).
    pub fn with_a2a(
        mut self,
        sessions: Arc<dyn crate::gateway::a2a_server::sessions::AgentSessions>,
        public_url: Option<String>,
    ) -> Self {
        self.a2a = Some(a2a_api::A2aSettings::new(sessions, public_url));
        self
    }

    /// What one run may write to the store: its record's entries and the blobs it uploads
    /// (default [`DEFAULT_MAX_RUN_BYTES`]).
    pub fn with_max_run_bytes(mut self, bytes: u64) -> Self {
        self.max_run_bytes = bytes;
        self
    }

    /// What one tenant's runs may keep in the store, all told, where its namespace sets no
    /// bound of its own (default [`DEFAULT_MAX_TENANT_STORE_BYTES`]; 0: none). See
    /// [`tenant_bytes`].
    pub fn with_max_tenant_store_bytes(mut self, bytes: u64) -> Self {
        self.tenant_bytes = tenant_bytes::TenantBytes::new(bytes);
        self
    }

    /// Reads a followed call's Session every `every` (tests; default
    /// [`session_polls::EVERY`]).
    pub fn with_session_polled_every(mut self, every: std::time::Duration) -> Self {
        self.session_polls = every;
        self
    }

    /// Reads a standing remote question's run and Session every `every` (tests; default
    /// [`question_watch::EVERY`]).
    pub fn with_questions_polled_every(mut self, every: std::time::Duration) -> Self {
        self.question_polls = every;
        self
    }

    /// Reads what tenants keep from the store again after `every` (tests; default
    /// [`tenant_bytes::REMEASURE`]).
    pub fn with_tenant_bytes_remeasured_every(mut self, every: std::time::Duration) -> Self {
        self.tenant_bytes =
            tenant_bytes::TenantBytes::new(self.tenant_bytes.gateway_bound()).remeasured_every(every);
        self
    }

    /// Lets `incoming` bytes of `tenant` into the store if its bound has room for them (see
    /// [`tenant_bytes`]), after measuring what it keeps when the last measurement is stale.
    async fn tenant_room(&self, tenant: &TenantId, incoming: u64) -> Result<(), Refusal> {
        use tenant_bytes::Refused;
        self.tenant_bytes
            .room(tenant.as_str(), incoming, || self.measure_tenant(tenant))
            .await
            .map_err(|refused| match refused {
                Refused::Over(over) => over_tenant_bound(tenant, &over),
                Refused::Unmeasured(e) => unavailable(e),
                Refused::WaitedInVain => unavailable(format!(
                    "what namespace {tenant} keeps could not be measured just now; ask again"
                )),
                Refused::Forgotten => unavailable(format!(
                    "what namespace {tenant} keeps is being measured; ask again"
                )),
            })
    }

    /// What `tenant` keeps, and its bound.
    async fn measure_tenant(
        &self,
        tenant: &TenantId,
    ) -> Result<(u64, tenant_bytes::Bound), crate::records::StoreError> {
        use tenant_bytes::Bound;
        let gateway = self.tenant_bytes.gateway_bound();
        let bound = match self.tenants.store_bound(tenant.as_str()).await {
            Ok(annotation) => Bound::of(annotation.as_deref(), gateway),
            // The API server is away (or refused: the gateway's RBAC lacks `get` on
            // namespaces): the bound read last, else nothing is let through — the gateway's
            // own could be higher than the one the namespace was given.
            Err(why) => {
                tracing::warn!(%tenant, %why, "the namespace's store bound could not be read");
                self.tenant_bytes.last_bound(tenant.as_str()).ok_or_else(|| {
                    crate::records::StoreError::Backend(format!(
                        "the store bound of namespace {tenant} cannot be read: {why}"
                    ))
                })?
            }
        };
        let kept = if bound == Bound::Unbounded {
            0
        } else {
            self.kept_by(tenant).await?
        };
        Ok((kept, bound))
    }

    /// What `tenant` keeps in the store: its runs' records as counted, the blobs its runners
    /// uploaded (a blob two runs uploaded counts twice), and its memory — items, consent and
    /// correction chains, as their keys and values.
    async fn kept_by(&self, tenant: &TenantId) -> Result<u64, crate::records::StoreError> {
        const PAGE: usize = 1024;
        let mut kept = self.store.recorded_bytes(tenant).await?;
        let blobs = crate::memory::keys::run_blobs_prefix(tenant);
        let start = crate::memory::keys::tenant_prefix(tenant);
        let end = crate::records::store::prefix_end(&start);
        let mut from = start;
        loop {
            let page = self.store.memory_scan(tenant, from, end.clone(), PAGE).await?;
            for (key, value) in &page {
                let size = if key.starts_with(&blobs) {
                    crate::memory::keys::run_blob_size(value)
                } else {
                    (key.len() + value.len()) as u64
                };
                kept = kept.saturating_add(size);
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => {
                    // The next key after `last`.
                    from = last.clone();
                    from.push(0);
                }
                _ => return Ok(kept),
            }
        }
    }

    /// Works on `capacity` requests at once, handed round the tenants in turn (default: a few
    /// per core), or — `None` — on every admitted request at once: the fairness benchmark's
    /// baseline.
    pub fn with_fair_turns(mut self, capacity: Option<usize>) -> Self {
        self.turns = capacity.map(crate::gateway::fair::FairTurns::new);
        self
    }

    /// Answers calls and model turns only once what they recorded is durable, one write later
    /// than by default (see `run_api::write_and_answer`): the benchmarks' baseline.
    pub fn with_answers_after_writes(mut self) -> Self {
        self.early_answers = false;
        self
    }

    /// Asks read-only tools only once their go-ahead is durable, as tools that act are, instead
    /// of while it is flushed: the benchmarks' baseline.
    pub fn with_reads_after_their_go_ahead(mut self) -> Self {
        self.reads_after_go_ahead = true;
        self
    }

    /// Counts `bytes` of blobs against the run's quota, if they fit beside the blobs counted
    /// before and the `recorded` bytes of its chain; the run's blob bytes so far.
    fn charge_blob(&self, caller: &Caller, recorded: u64, bytes: u64) -> Result<u64, Refusal> {
        self.blob_bytes
            .lock()
            .map_err(|_| unavailable("blob accounting is unavailable"))?
            .charge(
                caller.tenant.as_str(),
                caller.run_id(),
                recorded,
                bytes,
                self.max_run_bytes,
            )
            .map_err(|over| over_quota(caller.run_id(), over.used, bytes, self.max_run_bytes))
    }

    /// The run's blob bytes so far at this replica.
    fn blobs_of(&self, caller: &Caller) -> u64 {
        self.blob_bytes
            .lock()
            .map_or(0, |charges| charges.of(caller.tenant.as_str(), caller.run_id()))
    }

    /// Reaches the command-started MCP servers of runs in their capability pods, found by
    /// `resolver` (the operator creates one per Session and server).
    pub fn with_capabilities(mut self, resolver: Arc<dyn CapabilityResolver>) -> Self {
        self.capabilities = Some(resolver);
        self
    }

    /// Where tool and model calls may go (default: anywhere but link-local addresses).
    pub fn with_egress(mut self, guard: EgressGuard) -> Self {
        self.egress = guard;
        self
    }

    /// ContextOS's own namespace (default `contextos-system`): pods there are never callers.
    pub fn with_system_namespace(mut self, namespace: &str) -> Self {
        self.system_namespace = namespace.to_owned();
        self
    }

    /// The namespace of the identity vault's key rings (default `contextos-vault`): never served
    /// as a tenant (a tool there could name a ring's Secret as its credential).
    pub fn with_vault_namespace(mut self, namespace: &str) -> Self {
        self.vault_namespace = namespace.to_owned();
        self
    }

    /// Whether `namespace` is ContextOS's own (its keys, its key rings): never a tenant.
    fn is_own(&self, namespace: &str) -> bool {
        namespace == self.system_namespace || namespace == self.vault_namespace
    }

    /// Sends tool calls for URLs starting with `from` to `to` instead.
    pub fn with_endpoint_overrides(mut self, overrides: Vec<(String, String)>) -> Self {
        self.endpoint_overrides = overrides;
        self
    }

    /// The public key a tenant's records are signed with (auditors verify chains with it).
    pub fn tenant_public_key(&self, tenant: &str) -> PublicKey {
        self.keys.for_tenant(tenant).public()
    }

    /// The metrics listener's routes: `/metrics` (every tenant's spend: never on the port
    /// runner pods reach; and how this process's decisions, calls, breakers and appends go).
    pub fn metrics_router(&self) -> Router {
        let spend = self.spend.clone();
        Router::new().route(
            "/metrics",
            get(move || async move {
                let mut text = spend.render();
                text.push_str(&crate::gateway::metrics::gateway().render());
                text.push_str("# EOF\n");
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        crate::gateway::metrics::CONTENT_TYPE,
                    )],
                    text,
                )
            }),
        )
    }

    /// The routes: the run API under `/v1/run/`, tenant public keys, `/healthz`.
    pub fn router(self: Arc<Self>) -> Router {
        // Callers are identified from their headers before any body is read, and requests in
        // flight are bounded: an unauthenticated or flooding caller costs little.
        let runs = Router::new()
            .route("/v1/run/append", post(Self::append))
            .route("/v1/run/head", get(Self::head))
            .route("/v1/run/chain", get(Self::chain))
            .route("/v1/run/checkpoint", get(Self::checkpoint))
            .route("/v1/run/blobs", post(Self::put_blob))
            .route("/v1/run/blobs/{hash}", get(Self::get_blob))
            .route("/v1/run/calls", post(Self::call))
            .route("/v1/run/model", post(Self::model))
            .route("/v1/run/completion", get(Self::completion))
            .route("/v1/run/progress", get(Self::progress))
            .route("/v1/run/recall", post(Self::recall))
            .route(
                crate::discovery::embedding::GATEWAY_EMBEDDINGS_PATH,
                get(Self::embeddings_model).post(Self::embeddings),
            )
            .route("/v1/run/key", get(Self::run_key))
            .route("/v1/records/key", get(Self::reader_run_key))
            .route(SUBJECT_ERASE_PATH, post(Self::subject_erase))
            .route(SUBJECT_STATE_PATH, get(Self::subject_state))
            .route(SUBJECT_ROTATE_PATH, post(Self::subject_rotate))
            .route("/v1/records/runs", get(Self::reader_runs))
            .route(
                crate::feedback::FEEDBACK_RUNS_PATH,
                get(Self::reader_feedback_runs),
            )
            .route(crate::feedback::FEEDBACK_PATH, get(Self::reader_feedback))
            .route("/v1/records/head", get(Self::reader_head))
            .route("/v1/records/chain", get(Self::reader_chain))
            .route("/v1/records/checkpoint", get(Self::reader_checkpoint))
            .route("/v1/records/blobs", post(Self::reader_put_blob))
            .route("/v1/records/blobs/{hash}", get(Self::reader_get_blob))
            .route(crate::run::gate::GATE_PATH, post(Self::reader_gate))
            .route(CONSENT_RECORDS_PATH, post(Self::consent_append))
            .route(CONSENT_HISTORY_PATH, get(Self::consent_history))
            .route(CONSENT_SUBJECTS_PATH, get(Self::consent_subjects))
            .route(MEMORY_ITEMS_PATH, get(Self::memory_items))
            .route(
                "/v1/memory/items/{id}",
                axum::routing::delete(Self::memory_forget_item),
            )
            .route(
                "/v1/memory/scopes/{scope}",
                axum::routing::delete(Self::memory_forget_scope),
            )
            .route(MEMORY_HELD_PATH, get(Self::memory_held))
            .route(
                "/v1/memory/held/{id}",
                post(Self::memory_approve_held).delete(Self::memory_reject_held),
            );
        #[cfg(feature = "otlp")]
        let runs = runs.route(traces_api::TRACES_PATH, post(Self::relay_traces));
        let authenticated = runs
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                Self::identified_first,
            ))
            // One bound shared by every route (health checks are outside it, so a busy replica
            // still answers its probes).
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_IDENTIFYING));
        // A2A callers are identified by each handler (their requests name no namespace header),
        // as many at once as callers of the other routes (more wait in line): the token reviews
        // strangers cause are bounded; the endpoint's slots are taken once a caller is permitted.
        let a2a = Router::new()
            .route("/a2a/{namespace}/{agent}", post(Self::a2a_rpc))
            .route(
                "/a2a/{namespace}/{agent}/.well-known/agent-card.json",
                get(Self::a2a_card),
            )
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_IDENTIFYING));
        Router::new()
            .merge(authenticated)
            .merge(a2a)
            .route("/v1/tenants/{tenant}/record-key", get(Self::record_key))
            .route("/healthz", get(|| async { "ok" }))
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .layer(axum::middleware::from_fn(Self::from_its_address))
            .with_state(self)
    }

    /// Handles a request as coming from its connection's address, where the server was started
    /// with connect info (`into_make_service_with_connect_info`): whose allowance of refused
    /// tokens it spends.
    async fn from_its_address(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
        let source = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        crate::gateway::refused_tokens::from(source, next.run(request)).await
    }

    /// `review` of `token` for `audience`, unless the token was refused lately (the same answer,
    /// without asking the API server again) or this address has had too many refused lately.
    async fn reviewed<R>(
        &self,
        audience: &str,
        token: &str,
        review: impl std::future::Future<Output = Result<R, AuthError>>,
    ) -> Result<R, AuthError> {
        use crate::gateway::refused_tokens::{Admission, Outcome, RefusedTokens};
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key = RefusedTokens::key(audience, token);
        let taken = match self.refused_tokens.admit(&key) {
            Admission::Review(taken) => taken,
            Admission::Refused(why) => return Err(AuthError::Refused(why)),
            Admission::Throttled { retry_after } => {
                return Err(AuthError::Throttled(retry_after.as_secs_f64().ceil() as u64));
            }
        };
        let reviewed = review.await;
        let outcome = match &reviewed {
            Ok(_) => Outcome::Accepted,
            Err(AuthError::Refused(why)) => Outcome::Refused(why.clone()),
            Err(e @ AuthError::NotAPod(_)) => Outcome::Refused(e.to_string()),
            Err(_) => Outcome::Unanswered,
        };
        self.refused_tokens.record(key, outcome, taken);
        reviewed
    }

    /// Refuses a request before its body is read unless its token identifies a pod, or — a
    /// person naming a namespace — the request is one of the person API's (reading records or
    /// consent, recording consent) and the API server lets that person make it there (the
    /// handler identifies the caller again; reviews are cached, so this costs one lookup).
    async fn identified_first(
        State(service): State<Arc<Self>>,
        request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> Response {
        let identified = if request.headers().contains_key(READER_NAMESPACE_HEADER) {
            match person_access(request.method(), request.uri().path()) {
                Some(access) => service
                    .permitted_person(request.headers(), access)
                    .await
                    .map(|(tenant, _)| tenant.as_str().to_owned()),
                None => Err(forbidden(
                    "a person may only GET /v1/records/… (runs, head, chain, checkpoint, blobs), \
                     GET /v1/consent/history or /v1/consent/subjects, POST /v1/consent/records, \
                     GET /v1/memory/items and DELETE /v1/memory/items/… or /v1/memory/scopes/…, \
                     GET /v1/subjects/state and POST /v1/subjects/erase or /v1/subjects/rotate-keys",
                )),
            }
        } else {
            service.identify(request.headers()).await.map(|pod| pod.namespace)
        };
        let tenant = match identified {
            Ok(tenant) => tenant,
            Err(refusal) => return refusal.into_response(),
        };
        let slot = match service.slots.take(&tenant, 1) {
            Ok(slot) => slot,
            Err(exhausted) => return unavailable(match exhausted {
                shares::Exhausted::Tenant => format!(
                    "namespace {tenant} has {MAX_IN_FLIGHT_PER_TENANT} requests in flight at this gateway replica; try again"
                ),
                shares::Exhausted::Reserved => format!(
                    "this gateway replica's last {RESERVED_SLOTS} slots are kept for namespaces with at most \
                     {SMALL_SHARE} requests in flight, and namespace {tenant} has {SMALL_SHARE} or more; try again"
                ),
                shares::Exhausted::Replica => format!(
                    "this gateway replica has {MAX_IN_FLIGHT} requests in flight; try again"
                ),
            })
            .into_response(),
        };
        // Its body's bytes are accounted before a byte of it is read: by the length it declares,
        // or the most a body may be when it declares none.
        let (parts, body) = request.into_parts();
        let declared = axum::body::HttpBody::size_hint(&body);
        if declared.lower() > MAX_REQUEST_BYTES as u64 {
            return Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_unreadable",
                format!(
                    "the request body declares {} bytes; at most {MAX_REQUEST_BYTES} are read",
                    declared.lower()
                ),
            )
            .into_response();
        }
        let bytes = declared_bytes(&body, MAX_REQUEST_BYTES);
        let held = match service.bodies.take(&tenant, shares::kib(bytes)) {
            Ok(held) => held,
            Err(exhausted) => return bodies_refused(&tenant, bytes, exhausted).into_response(),
        };
        // The body is read before the request waits for a turn, and within a bound: a caller
        // that sends slowly holds its slots for that long at most, and never a turn.
        let body = match read_body(body, MAX_REQUEST_BYTES).await {
            Ok(body) => body,
            Err(refusal) => return refusal.into_response(),
        };
        let turn = match &service.turns {
            Some(turns) => Some(crate::gateway::fair::TurnHandle::new(
                turns.clone(),
                &tenant,
                turns.take(&tenant).await,
            )),
            None => None,
        };
        // A handler that goes on after its caller has gone (a call being carried through)
        // keeps the slot and the turn: a caller cannot free its share by hanging up.
        let mut request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
        let slot = TenantSlot {
            _slot: Arc::new(slot),
            turn,
            _body: Arc::new(held),
        };
        request.extensions_mut().insert(slot.clone());
        TenantSlot::carry(Some(axum::Extension(slot)), next.run(request)).await
    }

    /// A reader with their own Kubernetes identity (not a runner pod's token), as the API server
    /// vouches for them.
    async fn person(&self, headers: &HeaderMap) -> Result<crate::gateway::readers::Reader, Refusal> {
        let token = bearer(headers);
        self.reviewed("reader", token, self.auth.authenticate_reader(token))
            .await
            .map_err(|e| {
                not_authenticated(
                    e,
                    "the gateway needs your Kubernetes token (e.g. `kubectl create token`, or your OIDC id-token)",
                )
            })
    }

    /// The calling pod, as the API server vouches for it.
    async fn identify(&self, headers: &HeaderMap) -> Result<PodIdentity, Refusal> {
        let token = bearer(headers);
        let identity = self
            .reviewed(GATEWAY_AUDIENCE, token, self.auth.authenticate(token))
            .await
            .map_err(|e| match e {
                AuthError::Unavailable(_) => unavailable(&e),
                AuthError::Throttled(_) => throttled(&e),
                _ => Refusal::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
            })?;
        // Runs never live in ContextOS's own namespaces, where its keys are: nothing there is
        // served as a tenant.
        if self.is_own(&identity.namespace) {
            return Err(forbidden(format!(
                "namespace {} is ContextOS's own; it is not a tenant",
                identity.namespace
            )));
        }
        Ok(identity)
    }

    /// Authenticates the pod, then checks the RunContext was issued to it.
    async fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let identity = self
            .identify(headers)
            .instrument(tracing::debug_span!("gateway.identify"))
            .await?;
        let checked = {
            let _phase = tracing::debug_span!("gateway.check_context").entered();
            self.check_context(headers, &identity)
        };
        let checked = match checked {
            Ok(caller) => self.check_runner_pod(caller).await,
            refused => refused,
        };
        match checked {
            Ok(caller) => Ok(caller),
            Err(refusal) => {
                if refusal.status == StatusCode::FORBIDDEN || refusal.code == NOT_A_RUN_CONTEXT {
                    self.record_refusal(&identity, &refusal.message).await;
                }
                Err(refusal)
            }
        }
    }

    /// Records a refusal in the caller's own run — the run of the very Session whose pod it is
    /// (by the Session's name and uid, as the operator names its run; never by the run the
    /// request named, nor by the checkpoints its runner chose to write) — never in another.
    /// Best effort: a pod that is no Session's has no run; a run not started yet, or one that
    /// ended, records nothing; and a pod's refusals are recorded
    /// [`REFUSALS_RECORDED_PER_MINUTE`] times a minute at most (each costs a read of the pod,
    /// the run's chain and a durable write: a pod sending forged requests in a loop must not
    /// grow a record, or a replica's work, without bound). All are refused just the same.
    pub(super) async fn record_refusal(&self, identity: &PodIdentity, why: &str) {
        let Ok(tenant) = TenantId::new(identity.namespace.clone()) else {
            return;
        };
        if !self.may_record_refusal(identity) {
            return;
        }
        let Ok(Some(controller)) = self
            .tenants
            .pod_controller(&identity.namespace, &identity.pod)
            .await
        else {
            return;
        };
        if !controller.is(SESSION_GROUP, "Session", &controller.name, &identity.pod_uid) {
            return;
        }
        let run_id = crate::run::session_run_id(&controller.name, &controller.owner_uid);
        let key = self.keys.for_tenant(tenant.as_str());
        let Ok(mut recorder) = Recorder::resume(&self.store, tenant, key, &run_id).await else {
            return;
        };
        // The run id holds only the start of the Session's uid: the run must say it is that
        // Session's (a Session of the same name made again is another).
        if recorder.finished()
            || recorder
                .session_uid()
                .is_some_and(|uid| uid != controller.owner_uid)
        {
            return;
        }
        recorder.stage(EntryBody::AccessRefused {
            caller: format!("pod {}/{}", identity.namespace, identity.pod),
            reason: why.chars().take(1024).collect(),
        });
        if let Err(error) = recorder.flush().await {
            tracing::warn!(%error, %run_id, "cannot record a refusal");
        }
    }

    /// A pod acts for a run only if its Session controls it: the pod the RunContext names may
    /// have been deleted and another created under its name (the token identifies that one),
    /// and only the operator can make a pod a Session's (admission policy
    /// `contextos-runner-pods`). The Session must be the very one the context was issued for
    /// (by uid, where the context names one): a Session deleted and made again under its name
    /// has pods named as the earlier one's, which must not act for its runs. The API server's
    /// answer is remembered per pod (by uid) and Session: ten minutes for a runner pod, one for a
    /// pod that is not.
    async fn check_runner_pod(&self, caller: Caller) -> Result<Caller, Refusal> {
        let identity = &caller.identity;
        let session = &caller.context.context.session_id;
        let session_uid = caller.context.context.session_uid.clone();
        let key = (
            identity.namespace.clone(),
            identity.pod_uid.clone(),
            session.clone(),
            session_uid.clone(),
        );
        let refused = |found: &str| {
            forbidden(format!(
                "pod {}/{} is not Session {session}'s runner pod ({found}); only the operator makes one",
                identity.namespace, identity.pod
            ))
        };
        // What the API server said lately, either way: a pod sending forged requests in a loop
        // costs it one read a minute.
        let now = now_ms();
        let known = self
            .runner_pods
            .lock()
            .ok()
            .and_then(|pods| pods.get(&key).copied())
            .filter(|(_, until)| now < *until);
        match known {
            Some((true, _)) => return Ok(caller),
            Some((false, _)) => return Err(refused("as read lately")),
            None => {}
        }
        let controller = self
            .tenants
            .pod_controller(&identity.namespace, &identity.pod)
            .await
            .map_err(unavailable)?;
        let runner = controller.as_ref().is_some_and(|c| {
            c.is(SESSION_GROUP, "Session", session, &identity.pod_uid)
                && session_uid.as_deref().is_none_or(|uid| c.owner_uid == uid)
        });
        if let Ok(mut pods) = self.runner_pods.lock() {
            if pods.len() >= MAX_RUNNER_PODS_KNOWN {
                pods.retain(|_, (_, until)| now < *until);
                if pods.len() >= MAX_RUNNER_PODS_KNOWN {
                    pods.clear();
                }
            }
            let kept = if runner {
                RUNNER_POD_KEPT_MS
            } else {
                NOT_A_RUNNER_POD_KEPT_MS
            };
            pods.insert(key, (runner, now + kept));
        }
        if runner {
            return Ok(caller);
        }
        let found = match controller {
            Some(c) if c.pod_uid.as_deref().is_some_and(|uid| uid != identity.pod_uid) => {
                "another pod, created since under its name".to_owned()
            }
            Some(c)
                if c.is(SESSION_GROUP, "Session", session, &identity.pod_uid)
                    && session_uid.as_deref().is_some_and(|uid| c.owner_uid != uid) =>
            {
                format!(
                    "controlled by another Session {session} (uid {}), made since under the name of the one \
                 the RunContext was issued for",
                    c.owner_uid
                )
            }
            Some(c) => format!("controlled by {} {} ({})", c.kind, c.name, c.api_version),
            None => "controlled by nothing".to_owned(),
        };
        tracing::warn!(namespace = %identity.namespace, pod = %identity.pod, %session,
            "refused a RunContext presented by a pod its Session does not control");
        Err(refused(&found))
    }

    /// Whether one more of `identity`'s refusals may be recorded this minute (and counts it).
    fn may_record_refusal(&self, identity: &PodIdentity) -> bool {
        let Ok(mut recorded) = self.refusals_recorded.lock() else {
            return false;
        };
        let now = now_ms();
        if recorded.len() >= MAX_PODS_REFUSED {
            recorded.retain(|_, (since, _)| now - *since < 60_000);
        }
        let counted = recorded
            .entry((identity.namespace.clone(), identity.pod.clone()))
            .or_insert((now, 0));
        if now - counted.0 >= 60_000 {
            *counted = (now, 0);
        }
        counted.1 = counted.1.saturating_add(1);
        counted.1 <= REFUSALS_RECORDED_PER_MINUTE
    }

    /// Checks that the RunContext in `headers` was issued to `identity`.
    fn check_context(&self, headers: &HeaderMap, identity: &PodIdentity) -> Result<Caller, Refusal> {
        let not_a_context = || {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                NOT_A_RUN_CONTEXT,
                format!("header {RUN_CONTEXT_HEADER} does not hold a signed RunContext"),
            )
        };
        let header = headers
            .get(RUN_CONTEXT_HEADER)
            .ok_or_else(not_a_context)?
            .as_bytes();
        // A runner sends the same context with every request: one whose signature verified
        // before (the same header bytes, or the same context in other bytes) is not verified
        // again. Signer, expiry, tenant and pod are checked every time.
        let fingerprint: [u8; 32] = sha2::Sha256::digest(header).into();
        let cached = self.verified.lock().ok().and_then(|v| v.by_header(&fingerprint));
        let (context, known) = match cached {
            Some(context) => (context, true),
            None => {
                let context = base64::engine::general_purpose::STANDARD
                    .decode(header)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<SignedRunContext>(&bytes).ok())
                    .ok_or_else(not_a_context)?;
                let known = self
                    .verified
                    .lock()
                    .is_ok_and(|mut v| v.known_as(fingerprint, &context));
                (context, known)
            }
        };
        let refuse = |why: String| {
            tracing::warn!(
                namespace = %identity.namespace, pod = %identity.pod, run_id = %context.context.run_id,
                "refused a RunContext: {why}"
            );
            forbidden(why)
        };
        let checked = if known {
            context.verify_known(&self.trust, &identity.namespace, now_ms())
        } else {
            context.verify(&self.trust, &identity.namespace, now_ms())
        };
        checked.map_err(|e| refuse(e.to_string()))?;
        if !known && let Ok(mut verified) = self.verified.lock() {
            verified.verified(fingerprint, &context);
        }
        if context.context.pod.as_deref() != Some(identity.pod.as_str()) {
            return Err(refuse(format!(
                "RunContext of run {} was issued to pod {}, not to the caller {}/{}",
                context.context.run_id,
                context.context.pod.as_deref().unwrap_or("(none)"),
                identity.namespace,
                identity.pod
            )));
        }
        let tenant = TenantId::new(identity.namespace.clone()).map_err(|e| bad(e.to_string()))?;
        Ok(Caller {
            identity: identity.clone(),
            context,
            tenant,
        })
    }

    /// A runner reads and writes only the run its RunContext names; asking for another is
    /// refused and recorded in the caller's own run, as a forged context is.
    async fn own_run(&self, caller: &Caller, run: &str) -> Result<(), Refusal> {
        if run == caller.run_id() {
            return Ok(());
        }
        let refusal = forbidden(format!(
            "pod {}/{} acts for run {}, not run {run}",
            caller.identity.namespace,
            caller.identity.pod,
            caller.run_id()
        ));
        self.record_refusal(&caller.identity, &refusal.message).await;
        Err(refusal)
    }

    /// A tenant's public record key, with the certifier's signature over it. Anyone may ask
    /// (it is public), so each answer is made once and kept: a caller asking in a loop costs a
    /// map lookup, not a key derivation and a signature.
    async fn record_key(State(service): State<Arc<Self>>, Path(tenant): Path<String>) -> Reply {
        let tenant = TenantId::new(tenant).map_err(|e| bad(e.to_string()))?;
        if service.is_own(tenant.as_str()) {
            return Err(forbidden(format!(
                "namespace {tenant} is ContextOS's own; it has no record key"
            )));
        }
        if let Some(answer) = service
            .record_keys
            .lock()
            .ok()
            .and_then(|keys| keys.get(tenant.as_str()).cloned())
        {
            return Ok(Json(answer).into_response());
        }
        let key = service.tenant_public_key(tenant.as_str());
        // The certifier's word for it, since this answer crosses a plain-HTTP Service: the
        // operator checks it against the certifier published in `contextos-gateway-keys`.
        let certificate = service.keys.certificate(tenant.as_str());
        let answer = json!({
            "tenant": tenant,
            "publicKey": key.to_hex(),
            "keyId": key.key_id(),
            "certificate": certificate,
            "certifierKeyId": service.keys.certifier().key_id(),
        });
        if let Ok(mut keys) = service.record_keys.lock() {
            // Namespace names are anyone's to make up: the map is emptied rather than grown.
            if keys.len() >= MAX_RECORD_KEYS_KEPT {
                keys.clear();
            }
            keys.insert(tenant.to_string(), answer.clone());
        }
        Ok(Json(answer).into_response())
    }

    /// The run's governed state, built once per replica from the bundle its RunContext pins.
    /// The run's built gateway (built now if this replica has none). `sent`: the entries the
    /// runner sent with this request, where a new run's `run_started` may still be.
    async fn slot(&self, caller: &Caller, sent: &[WireEntry]) -> Result<Arc<RunSlot>, Refusal> {
        let key = (caller.tenant.to_string(), caller.run_id().to_owned());
        let now = now_ms();
        if let Ok(mut runs) = self.runs.lock()
            && let Some((slot, used)) = runs.get_mut(&key)
        {
            *used = now;
            return Ok(slot.clone());
        }
        let slot = Arc::new(self.build_slot(caller, sent).await?);
        if let Ok(mut runs) = self.runs.lock() {
            if runs.len() >= MAX_CACHED_RUNS
                && let Some(oldest) = runs
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
            {
                runs.remove(&oldest);
            }
            runs.insert(key, (slot.clone(), now));
        }
        Ok(slot)
    }

    /// Drops the run's built gateway (its run ended; another request would rebuild it).
    fn forget_slot(&self, caller: &Caller) {
        if let Ok(mut runs) = self.runs.lock() {
            runs.remove(&(caller.tenant.to_string(), caller.run_id().to_owned()));
        }
    }

    /// Runs whose gateway is built in this replica (bounded; ended runs are dropped).
    pub fn cached_runs(&self) -> usize {
        self.runs.lock().map_or(0, |r| r.len())
    }

    async fn build_slot(&self, caller: &Caller, sent: &[WireEntry]) -> Result<RunSlot, Refusal> {
        let context = &caller.context.context;
        let digest = context
            .bundle_digest
            .as_deref()
            .and_then(Hash::parse)
            .ok_or_else(|| forbidden("the RunContext pins no bundle"))?;
        let bundle = match &context.subject {
            None => {
                let bytes = self
                    .store
                    .get_blob(&caller.tenant, &digest)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| {
                        bad(format!(
                            "the run's bundle {digest} was not uploaded; start the run first"
                        ))
                    })?;
                if Hash::of(&bytes) != digest {
                    return Err(unavailable(format!(
                        "the store returned a different bundle for {digest}"
                    )));
                }
                serde_json::from_slice::<RunBundle>(&bytes)
                    .map_err(|e| bad(format!("bundle {digest} does not decode: {e}")))?
            }
            // A run about a subject stored its bundle with their part encrypted, under another
            // hash: its run_started entry names it (on record, or sent with this request), and
            // it must open to the bundle pinned.
            Some(_) => {
                let on_record = self
                    .store
                    .read_chain_page(&caller.tenant, caller.run_id(), 0, 1)
                    .await
                    .map_err(unavailable)?
                    .into_iter()
                    .next()
                    .map(|stored| stored.bytes);
                let sent_first = sent.iter().filter_map(|w| w.decode().ok()).find(|s| s.seq == 0);
                let named_by = if on_record.is_some() {
                    run_api::NamedBy::Record
                } else {
                    run_api::NamedBy::Runner
                };
                let mut first = on_record
                    .or(sent_first.map(|s| s.bytes))
                    .and_then(|bytes| RecordEntry::decode(&bytes).ok())
                    .map(|e| e.body);
                // A run_started larger than the inline limit went to a blob.
                if let Some(EntryBody::Blob { blob, body_type, .. }) = &first
                    && body_type == "run_started"
                {
                    let bytes = self
                        .uploaded(caller, blob, named_by, || format!("run_started's blob {blob}"))
                        .await?;
                    first = serde_json::from_slice(&bytes).ok();
                }
                let Some(EntryBody::RunStarted {
                    bundle: Some(stored), ..
                }) = first
                else {
                    return Err(bad("the run has not started: send its run_started entry first"));
                };
                let key = self.subject_run_key(caller).await?;
                let bundle = self.stored_bundle(caller, &stored, named_by, &key).await?;
                if bundle.content_digest() != digest {
                    return Err(forbidden(format!(
                        "the run's stored bundle {stored} is not the bundle {digest} its RunContext pins"
                    )));
                }
                bundle
            }
        };
        if bundle.tenant != caller.tenant.as_str()
            || bundle.session != context.session_id
            || bundle.agent != context.agent.name
        {
            return Err(forbidden(
                "the pinned bundle is for another tenant, Session or Agent",
            ));
        }
        // A command-started MCP server never runs inside this service, next to every tenant's
        // credentials: only in the Session's capability pods.
        let executes_code = bundle
            .agent_spec
            .tools
            .iter()
            .find(|t| crate::run::execution::executes_code(t));
        let capabilities = match (executes_code, &self.capabilities) {
            (None, _) => None,
            (Some(_), Some(resolver)) => Some(CapabilityRoute::new(
                resolver.clone(),
                caller.tenant.as_str(),
                &bundle.session,
                self.egress.clone(),
            )),
            (Some(tool), None) => {
                return Err(forbidden(format!(
                    "tool {} starts an MCP server from a command; this gateway runs no code an Agent names and reaches no capability pods",
                    tool.name
                )));
            }
        };
        let secrets = self.secrets_of(&caller.tenant, &bundle).await?;
        let gateway = bundle
            .gateway_bundle(secrets.clone())
            .build(self.trust)
            .map_err(|e| bad(format!("agent {}: {e}", bundle.agent)))?
            .with_endpoint_overrides(self.endpoint_overrides.clone())
            .with_attesting_key(self.keys.for_tenant(caller.tenant.as_str()))
            .with_relayed_runner_spans()
            .with_consent_key(self.keys.for_tenant(caller.tenant.as_str()).public())
            .with_egress(self.egress.clone())
            .with_result_cache(self.results.clone())
            .with_session_watch(Arc::new(session_polls::SessionPolls {
                tenants: self.tenants.clone(),
                namespace: caller.tenant.to_string(),
                session: context.session_id.clone(),
                uid: context.session_uid.clone(),
                every: self.session_polls,
            }))
            .shared_with_replicas();
        let gateway = if self.reads_after_go_ahead {
            gateway.with_reads_after_their_go_ahead()
        } else {
            gateway
        };
        let gateway = match capabilities {
            Some(route) => gateway.with_capabilities(route),
            None => gateway,
        };
        let models = crate::model::routing::Models::for_bundle(&bundle, &secrets, |model, spec| {
            self.governed(model, spec).map_err(|refusal| refusal.message)
        })
        .map_err(bad)?;
        Ok(RunSlot {
            bundle,
            gateway,
            models,
            log: tokio::sync::Mutex::new(RunLog::default()),
            blobs: tokio::sync::Mutex::new(BlobsReferred::default()),
        })
    }

    /// The model `bundle` names, reached only through this service's egress rules.
    fn governed_model(
        &self,
        bundle: &RunBundle,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Model, Refusal> {
        self.governed(
            Model::for_bundle(bundle, secrets).map_err(bad)?,
            &bundle.agent_spec.model,
        )
    }

    /// `model` (as `spec` says it), reached only through this service's egress rules.
    fn governed(&self, model: Model, spec: &contextos_crds::agent::ModelSpec) -> Result<Model, Refusal> {
        Ok(match model {
            Model::OpenAi(model) => {
                if let Some(endpoint) = &spec.endpoint {
                    self.egress.check_url(endpoint).map_err(forbidden)?;
                }
                Model::OpenAi(model.with_client(self.egress.client()))
            }
            other => other,
        })
    }

    /// The Secret values the run's tools and model reference, read from its own namespace.
    async fn secrets_of(
        &self,
        tenant: &TenantId,
        bundle: &RunBundle,
    ) -> Result<BTreeMap<String, String>, Refusal> {
        let agent = &bundle.agent_spec;
        let refs = agent
            .tools
            .iter()
            .flat_map(|t| {
                let bearer = t.adapter.bearer_secret().map(|(s, _)| s.clone());
                let hook = t.adapter.webhook.as_ref().map(|w| w.secret_ref.clone());
                bearer.into_iter().chain(hook)
            })
            .chain(agent.model.secret_ref.clone())
            .chain(
                agent
                    .routing
                    .iter()
                    .flat_map(|r| r.models.iter().filter_map(|m| m.model.secret_ref.clone())),
            )
            .collect();
        self.secret_values(tenant, refs).await
    }

    /// The values of `refs` in the tenant's namespace (a missing one is left out: whoever
    /// needs it says which).
    async fn secret_values(
        &self,
        tenant: &TenantId,
        refs: Vec<contextos_crds::common::KeyRef>,
    ) -> Result<BTreeMap<String, String>, Refusal> {
        let mut out = BTreeMap::new();
        for key in refs {
            let value = self
                .tenants
                .secret(tenant.as_str(), &key.name, &key.key)
                .await
                .map_err(|e| match e {
                    TenantError::Refused(why) => forbidden(why),
                    TenantError::Unavailable(why) => unavailable(why),
                })?;
            if let Some(value) = value {
                out.insert(format!("{}/{}", key.name, key.key), value);
            }
        }
        Ok(out)
    }

    /// Brings `log` up to the record and a recorder to continue the run with; a run that has
    /// not started, or has ended (`ended` says what it no longer does), is refused.
    async fn continue_run<'s>(
        &'s self,
        caller: &Caller,
        slot: &RunSlot,
        log: &mut RunLog,
        ended: &str,
        told: Option<(u64, Hash)>,
    ) -> Result<Recorder<'s, S>, Refusal> {
        // What the record says wins over what this replica remembers: another replica (or this
        // one before a restart) may have handled calls of this run.
        log.refresh(&self.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
            .map_err(unavailable)?;
        // A runner told of entries past what was read: another replica may have just written
        // them (read again), or may still be writing them (the runner asks again shortly).
        let behind =
            |log: &RunLog| told.is_some_and(|(seq, _)| log.head().is_none_or(|(head, _)| seq > head));
        if behind(log) {
            log.refresh(&self.store, &caller.tenant, caller.run_id(), &slot.gateway)
                .await
                .map_err(unavailable)?;
            if behind(log) {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    HEAD_PENDING,
                    format!(
                        "run {}: the entries this runner was told of are not on record yet; ask again shortly",
                        caller.run_id()
                    ),
                ));
            }
        }
        if log.finished() {
            return Err(forbidden(format!("the run has ended; {ended}")));
        }
        // What the gateway itself writes (decisions, results, model turns) counts too: past the
        // quota it writes nothing more, refusals included.
        let used = log.bytes().saturating_add(self.blobs_of(caller));
        if used >= self.max_run_bytes {
            return Err(over_quota(caller.run_id(), used, 0, self.max_run_bytes));
        }
        self.tenant_room(&caller.tenant, 0).await?;
        let key = self.keys.for_tenant(caller.tenant.as_str());
        let mut recorder = log
            .recorder(&self.store, &caller.tenant, key)
            .ok_or_else(|| bad("the run has not started; its runner writes run_started first"))?;
        recorder.count_stored_bytes(log.bytes());
        Ok(recorder)
    }
}

fn head_moved(run_id: &str) -> Refusal {
    Refusal::new(
        StatusCode::CONFLICT,
        "head_moved",
        format!("run {run_id}: the chain moved on; re-read the head and chain again"),
    )
}
