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

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use contextos_crds::session::Approval;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use super::{
    ToolGateway,
    identity::{AuthError, Authenticator, PodIdentity},
    remote::{CallRequest, ModelCall},
    run_log::RunLog,
    tenancy::{TenantError, TenantView},
};
use crate::{
    keys::{PublicKey, TenantKeys},
    model::{Model, ModelError},
    read_grant::SignedReadGrant,
    records::{
        EntryBody, Hash, RecordEntry, RecordStore, Recorder, StoredEntry, TenantId,
        recorder::now_ms,
        store::remote::{AppendRequest, Problem, READ_GRANT_HEADER, RUN_CONTEXT_HEADER, WireEntry},
    },
    run::bundle::RunBundle,
    run_context::SignedRunContext,
};

/// Largest request body (a batch of entries or a blob).
const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Verified RunContext signatures remembered at most (then the memory starts over).
const VERIFIED_CONTEXTS: usize = 4096;
/// Runs whose gateway is kept built at most; the least recently used is dropped first.
const MAX_CACHED_RUNS: usize = 256;

/// The service's shared state.
pub struct GatewayService<S, A, T> {
    store: S,
    auth: A,
    tenants: T,
    keys: TenantKeys,
    /// The operator's key: the only signer of RunContexts this service accepts.
    trust: PublicKey,
    runs: Mutex<RunSlots>,
    /// Fingerprints of RunContexts whose signature verified.
    verified: Mutex<std::collections::HashSet<[u8; 32]>>,
    /// URL prefix rewrites for tools (single-machine setups and tests).
    endpoint_overrides: Vec<(String, String)>,
    /// ContextOS's own namespace: its keys live there, and no caller from it is served.
    system_namespace: String,
}

impl<S, A, T> std::fmt::Debug for GatewayService<S, A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

/// Built runs by (tenant, run id), with when each was last used.
type RunSlots = HashMap<(String, String), (Arc<RunSlot>, i64)>;

/// A run the service governs: its pinned bundle, its gateway (tools with credentials, compiled
/// policies) and its model.
struct RunSlot {
    bundle: RunBundle,
    gateway: ToolGateway,
    model: Model,
    /// What this replica has read of the run's record. Requests of one run are handled one at
    /// a time in a replica (a run is sequential), holding this lock.
    log: tokio::sync::Mutex<RunLog>,
}

/// A verified caller: a runner pod and the RunContext issued to it.
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

/// A refused request: status, machine-readable code, message for a human.
#[derive(Debug)]
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let problem = Problem {
            error: self.2,
            code: self.1.to_owned(),
        };
        (self.0, Json(problem)).into_response()
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, "bad_request", message.into())
}

fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::FORBIDDEN, "forbidden", message.into())
}

fn unavailable(message: impl std::fmt::Display) -> Refusal {
    Refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        message.to_string(),
    )
}

type Reply = Result<Response, Refusal>;

#[derive(Debug, Deserialize)]
struct RunQuery {
    run: String,
    #[serde(default)]
    from: u64,
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
}

/// The most runs one listing returns.
const MAX_LISTED_RUNS: usize = 10_000;

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + 'static,
    A: Authenticator + 'static,
    T: TenantView + 'static,
{
    pub fn new(store: S, auth: A, tenants: T, keys: TenantKeys, trust: PublicKey) -> Self {
        Self {
            store,
            auth,
            tenants,
            keys,
            trust,
            runs: Mutex::new(HashMap::new()),
            verified: Mutex::new(Default::default()),
            endpoint_overrides: Vec::new(),
            system_namespace: "contextos-system".into(),
        }
    }

    /// ContextOS's own namespace (default `contextos-system`): pods there are never callers.
    pub fn with_system_namespace(mut self, namespace: &str) -> Self {
        self.system_namespace = namespace.to_owned();
        self
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

    /// The routes: the run API under `/v1/run/`, tenant public keys, `/healthz`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/run/append", post(Self::append))
            .route("/v1/run/head", get(Self::head))
            .route("/v1/run/chain", get(Self::chain))
            .route("/v1/run/checkpoint", get(Self::checkpoint))
            .route("/v1/run/blobs", post(Self::put_blob))
            .route("/v1/run/blobs/{hash}", get(Self::get_blob))
            .route("/v1/run/calls", post(Self::call))
            .route("/v1/run/model", post(Self::model))
            .route("/v1/records/runs", get(Self::reader_runs))
            .route("/v1/records/head", get(Self::reader_head))
            .route("/v1/records/chain", get(Self::reader_chain))
            .route("/v1/records/checkpoint", get(Self::reader_checkpoint))
            .route("/v1/records/blobs", post(Self::reader_put_blob))
            .route("/v1/records/blobs/{hash}", get(Self::reader_get_blob))
            .route("/v1/tenants/{tenant}/record-key", get(Self::record_key))
            .route("/healthz", get(|| async { "ok" }))
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(self)
    }

    /// The calling pod, as the API server vouches for it.
    async fn identify(&self, headers: &HeaderMap) -> Result<PodIdentity, Refusal> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let identity = self.auth.authenticate(token).await.map_err(|e| match e {
            AuthError::Unavailable(_) => unavailable(&e),
            _ => Refusal(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
        })?;
        // Runs never live in ContextOS's own namespace, where its keys are: nothing there is
        // served as a tenant.
        if identity.namespace == self.system_namespace {
            return Err(forbidden(format!(
                "namespace {} is ContextOS's own; it is not a tenant",
                identity.namespace
            )));
        }
        Ok(identity)
    }

    /// Authenticates the pod, then checks the RunContext was issued to it.
    async fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let identity = self.identify(headers).await?;
        let context = headers
            .get(RUN_CONTEXT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|bytes| serde_json::from_slice::<SignedRunContext>(&bytes).ok())
            .ok_or_else(|| {
                bad(format!(
                    "header {RUN_CONTEXT_HEADER} does not hold a signed RunContext"
                ))
            })?;
        let refuse = |why: String| {
            tracing::warn!(
                namespace = %identity.namespace, pod = %identity.pod, run_id = %context.context.run_id,
                "refused a RunContext: {why}"
            );
            forbidden(why)
        };
        // Signature, expiry, and that it was issued for the caller's own namespace. A context
        // whose signature verified before (the same bytes: a runner sends its context with every
        // request) is not verified again; expiry and tenant are checked every time.
        let fingerprint: [u8; 32] =
            sha2::Sha256::digest(serde_json::to_vec(&context).unwrap_or_default()).into();
        let known = self.verified.lock().is_ok_and(|v| v.contains(&fingerprint));
        let checked = if known {
            context.verify_known(&self.trust, &identity.namespace, now_ms())
        } else {
            context.verify(&self.trust, &identity.namespace, now_ms())
        };
        checked.map_err(|e| refuse(e.to_string()))?;
        if !known && let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_CONTEXTS {
                verified.clear();
            }
            verified.insert(fingerprint);
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
            identity,
            context,
            tenant,
        })
    }

    /// A runner reads and writes only the run its RunContext names.
    fn own_run(caller: &Caller, run: &str) -> Result<(), Refusal> {
        if run == caller.run_id() {
            Ok(())
        } else {
            Err(forbidden(format!(
                "pod {}/{} acts for run {}, not run {run}",
                caller.identity.namespace,
                caller.identity.pod,
                caller.run_id()
            )))
        }
    }

    async fn append(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: AppendRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let entries = request
            .entries
            .iter()
            .map(WireEntry::decode)
            .collect::<Result<Vec<StoredEntry>, _>>()
            .map_err(bad)?;
        let decoded = entries
            .iter()
            .map(|e| RecordEntry::decode(&e.bytes).map_err(|err| bad(format!("entry {}: {err}", e.seq))))
            .collect::<Result<Vec<RecordEntry>, _>>()?;
        for (entry, stored) in decoded.iter().zip(&entries) {
            Self::own_run(&caller, &entry.run_id)?;
            // Only the canonical encoding: the bytes hashed are the bytes every verifier decodes.
            if entry.encode() != stored.bytes {
                return Err(bad(format!("entry {} is not in canonical form", entry.seq)));
            }
            service.check_runner_body(&caller, entry).await?;
        }
        let expected = match &request.expected_head {
            None => None,
            Some(text) => Some(Hash::parse(text).ok_or_else(|| bad("expected_head is not a hash"))?),
        };
        let slot = service.slot(&caller).await?;
        let mut log = slot.log.lock().await;
        log.refresh(&service.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
            .map_err(unavailable)?;
        if log.head().map(|(_, h)| h) != expected {
            return Err(head_moved(caller.run_id()));
        }
        let key = service.keys.for_tenant(caller.tenant.as_str());
        let mut recorder = match log.recorder(&service.store, &caller.tenant, key.clone()) {
            Some(recorder) => recorder,
            None => {
                let first = decoded.first().ok_or_else(|| bad("the batch is empty"))?;
                Recorder::for_new_run(&service.store, caller.tenant.clone(), key, first)
                    .map_err(|e| bad(e.to_string()))?
            }
        };
        let head = match recorder.append_chained(entries).await {
            Ok(head) => head,
            Err(crate::records::RecordError::Store(crate::records::StoreError::HeadMoved { .. })) => {
                return Err(head_moved(caller.run_id()));
            }
            Err(crate::records::RecordError::Store(e @ crate::records::StoreError::BadBatch { .. })) => {
                return Err(bad(e.to_string()));
            }
            Err(e) => return Err(unavailable(e)),
        };
        let appended = recorder.appended();
        log.after_write(&service.store, &caller.tenant, caller.run_id(), appended)
            .await
            .map_err(unavailable)?;
        Ok(Json(head).into_response())
    }

    /// Which entries a runner may write: only what the runner alone can know. A run's start must
    /// carry exactly the RunContext the caller presented and the bundle that context pins.
    async fn check_runner_body(&self, caller: &Caller, entry: &RecordEntry) -> Result<(), Refusal> {
        let body = match &entry.body {
            EntryBody::Blob { blob, body_type, .. } => {
                let bytes = self
                    .store
                    .get_blob(&caller.tenant, blob)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| {
                        bad(format!(
                            "entry {} refers to blob {blob}, which was not uploaded",
                            entry.seq
                        ))
                    })?;
                let body: EntryBody = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("blob {blob} is not an entry body: {e}")))?;
                if body.type_name() != body_type {
                    return Err(bad(format!(
                        "blob {blob} holds a {}, not a {body_type}",
                        body.type_name()
                    )));
                }
                body
            }
            other => other.clone(),
        };
        match &body {
            EntryBody::RunStarted {
                session_id,
                agent,
                run_context,
                pinned,
                bundle,
            } => {
                let context = &caller.context.context;
                let presented: Option<SignedRunContext> = serde_json::from_value(run_context.clone()).ok();
                let pinned_bundle = context.bundle_digest.as_deref().and_then(Hash::parse);
                let matches = entry.seq == 0
                    && presented.as_ref() == Some(&caller.context)
                    && *session_id == context.session_id
                    && *agent == context.agent.name
                    && *pinned == context.pinned
                    && bundle.is_some()
                    && *bundle == pinned_bundle;
                if !matches {
                    return Err(forbidden(
                        "run_started must be the first entry and carry the caller's RunContext, its session, agent, pins and bundle",
                    ));
                }
                Ok(())
            }
            EntryBody::ContextCompiled { .. }
            | EntryBody::CriticVerdict { .. }
            | EntryBody::Checkpoint { .. }
            | EntryBody::Completed { .. }
            | EntryBody::Failed { .. } => Ok(()),
            other => Err(forbidden(format!(
                "a runner may not write {} entries: decisions, results, approvals and model turns are written by the gateway",
                other.type_name()
            ))),
        }
    }

    async fn head(State(service): State<Arc<Self>>, headers: HeaderMap, Query(q): Query<RunQuery>) -> Reply {
        let caller = service.caller(&headers).await?;
        Self::own_run(&caller, &q.run)?;
        let head = service
            .store
            .head(&caller.tenant, &q.run)
            .await
            .map_err(unavailable)?;
        Ok(Json(head).into_response())
    }

    async fn chain(State(service): State<Arc<Self>>, headers: HeaderMap, Query(q): Query<RunQuery>) -> Reply {
        let caller = service.caller(&headers).await?;
        Self::own_run(&caller, &q.run)?;
        let chain = service
            .store
            .read_chain(&caller.tenant, &q.run, q.from)
            .await
            .map_err(unavailable)?;
        let wire: Vec<WireEntry> = chain.iter().map(WireEntry::of).collect();
        Ok(Json(wire).into_response())
    }

    /// The session's latest checkpoint, if it belongs to the caller's run (an earlier Session of
    /// the same name is another run, and not the caller's to see).
    async fn checkpoint(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SessionQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        if q.session != caller.context.context.session_id {
            return Err(forbidden("a runner reads only its own Session's checkpoint"));
        }
        let checkpoint = service
            .store
            .latest_checkpoint(&caller.tenant, &q.session)
            .await
            .map_err(unavailable)?
            .filter(|c| c.run_id == caller.run_id());
        Ok(Json(checkpoint).into_response())
    }

    async fn put_blob(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let hash = service
            .store
            .put_blob(&caller.tenant, body.to_vec())
            .await
            .map_err(unavailable)?;
        Ok(Json(hash.to_hex()).into_response())
    }

    async fn get_blob(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(hash): Path<String>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let hash = Hash::parse(&hash).ok_or_else(|| bad("not a blob hash"))?;
        match service
            .store
            .get_blob(&caller.tenant, &hash)
            .await
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(bytes.into_response()),
            None => Err(Refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob {hash}"),
            )),
        }
    }

    /// A replay Job's pod: its token, and an operator-signed ReadGrant for its own Job and
    /// namespace. Reads the tenant's records and stores reports; nothing else.
    async fn reader(&self, headers: &HeaderMap) -> Result<TenantId, Refusal> {
        let identity = self.identify(headers).await?;
        let grant = headers
            .get(READ_GRANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|bytes| serde_json::from_slice::<SignedReadGrant>(&bytes).ok())
            .ok_or_else(|| {
                bad(format!(
                    "header {READ_GRANT_HEADER} does not hold a signed read grant"
                ))
            })?;
        let grant = grant
            .verify(&self.trust, &identity.namespace, now_ms())
            .map_err(|e| forbidden(e.to_string()))?;
        let controller = self
            .tenants
            .pod_controller(&identity.namespace, &identity.pod)
            .await
            .map_err(unavailable)?;
        if controller != Some(("Job".to_owned(), grant.job.clone())) {
            tracing::warn!(namespace = %identity.namespace, pod = %identity.pod, job = %grant.job,
                "refused a read grant presented by a pod its Job does not own");
            return Err(forbidden(format!(
                "the read grant is for the pods of Job {}, and pod {}/{} is not one",
                grant.job, identity.namespace, identity.pod
            )));
        }
        TenantId::new(identity.namespace).map_err(|e| bad(e.to_string()))
    }

    async fn reader_runs(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunsQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let filter = crate::records::RunFilter {
            agent: q.agent,
            session_id: q.session,
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            limit: Some(q.limit.unwrap_or(MAX_LISTED_RUNS).min(MAX_LISTED_RUNS)),
        };
        let runs = service
            .store
            .list_runs(&tenant, &filter)
            .await
            .map_err(unavailable)?;
        Ok(Json(runs).into_response())
    }

    async fn reader_head(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let head = service.store.head(&tenant, &q.run).await.map_err(unavailable)?;
        Ok(Json(head).into_response())
    }

    async fn reader_chain(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let chain = service
            .store
            .read_chain(&tenant, &q.run, q.from)
            .await
            .map_err(unavailable)?;
        Ok(Json(chain.iter().map(WireEntry::of).collect::<Vec<_>>()).into_response())
    }

    async fn reader_checkpoint(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SessionQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let checkpoint = service
            .store
            .latest_checkpoint(&tenant, &q.session)
            .await
            .map_err(unavailable)?;
        Ok(Json(checkpoint).into_response())
    }

    async fn reader_put_blob(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let tenant = service.reader(&headers).await?;
        let hash = service
            .store
            .put_blob(&tenant, body.to_vec())
            .await
            .map_err(unavailable)?;
        Ok(Json(hash.to_hex()).into_response())
    }

    async fn reader_get_blob(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(hash): Path<String>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let hash = Hash::parse(&hash).ok_or_else(|| bad("not a blob hash"))?;
        match service
            .store
            .get_blob(&tenant, &hash)
            .await
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(bytes.into_response()),
            None => Err(Refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob {hash}"),
            )),
        }
    }

    async fn record_key(State(service): State<Arc<Self>>, Path(tenant): Path<String>) -> Reply {
        let tenant = TenantId::new(tenant).map_err(|e| bad(e.to_string()))?;
        let key = service.tenant_public_key(tenant.as_str());
        Ok(Json(json!({"tenant": tenant, "publicKey": key.to_hex(), "keyId": key.key_id()})).into_response())
    }

    /// The run's governed state, built once per replica from the bundle its RunContext pins.
    async fn slot(&self, caller: &Caller) -> Result<Arc<RunSlot>, Refusal> {
        let key = (caller.tenant.to_string(), caller.run_id().to_owned());
        let now = now_ms();
        if let Ok(mut runs) = self.runs.lock()
            && let Some((slot, used)) = runs.get_mut(&key)
        {
            *used = now;
            return Ok(slot.clone());
        }
        let slot = Arc::new(self.build_slot(caller).await?);
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

    async fn build_slot(&self, caller: &Caller) -> Result<RunSlot, Refusal> {
        let context = &caller.context.context;
        let digest = context
            .bundle_digest
            .as_deref()
            .and_then(Hash::parse)
            .ok_or_else(|| forbidden("the RunContext pins no bundle"))?;
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
        let bundle: RunBundle = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("bundle {digest} does not decode: {e}")))?;
        if bundle.tenant != caller.tenant.as_str()
            || bundle.session != context.session_id
            || bundle.agent != context.agent.name
        {
            return Err(forbidden(
                "the pinned bundle is for another tenant, Session or Agent",
            ));
        }
        // A command-started MCP server would run inside this service, next to every tenant's
        // credentials: never. (Such tools need a capability sandbox; the operator refuses them.)
        if let Some(tool) = bundle
            .agent_spec
            .tools
            .iter()
            .find(|t| crate::run::execution::executes_code(t))
        {
            return Err(forbidden(format!(
                "tool {} starts an MCP server from a command; the gateway service runs no code an Agent names",
                tool.name
            )));
        }
        let secrets = self.secrets_of(caller, &bundle).await?;
        let gateway = bundle
            .gateway_bundle(secrets.clone())
            .build(self.trust)
            .map_err(|e| bad(format!("agent {}: {e}", bundle.agent)))?
            .with_endpoint_overrides(self.endpoint_overrides.clone())
            .with_attesting_key(self.keys.for_tenant(caller.tenant.as_str()));
        let model = Model::for_bundle(&bundle, &secrets).map_err(bad)?;
        Ok(RunSlot {
            bundle,
            gateway,
            model,
            log: tokio::sync::Mutex::new(RunLog::default()),
        })
    }

    /// The Secret values the run's tools and model reference, read from its own namespace.
    async fn secrets_of(
        &self,
        caller: &Caller,
        bundle: &RunBundle,
    ) -> Result<BTreeMap<String, String>, Refusal> {
        let mut out = BTreeMap::new();
        let agent = &bundle.agent_spec;
        let refs = agent
            .tools
            .iter()
            .flat_map(|t| {
                let http = t.adapter.http.as_ref().and_then(|h| h.secret_ref.clone());
                let hook = t.adapter.webhook.as_ref().map(|w| w.secret_ref.clone());
                http.into_iter().chain(hook)
            })
            .chain(agent.model.secret_ref.clone());
        for key in refs {
            let value = self
                .tenants
                .secret(caller.tenant.as_str(), &key.name, &key.key)
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

    async fn call(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let mut request: CallRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let slot = service.slot(&caller).await?;
        // The call runs under the caller's verified context, whatever the envelope says.
        request.envelope.run_context = caller.context.clone();
        request.envelope.approval = service
            .approval_on_record(&caller, request.envelope.approval.take())
            .await?;
        // Once decided, a call is carried through and recorded even if the runner goes away
        // mid-call (a killed pod closes its connection): its next attempt then finds the result
        // in the record instead of an effect nobody wrote down.
        let task = tokio::spawn(async move { service.decide_and_execute(&caller, &slot, request).await });
        match task.await {
            Ok(outcome) => outcome.map(|o| Json(o).into_response()),
            Err(e) => Err(unavailable(format!("the call's task failed: {e}"))),
        }
    }

    /// Brings `log` up to the record and a recorder to continue the run with; a run that has
    /// not started, or has ended (`ended` says what it no longer does), is refused.
    async fn continue_run<'s>(
        &'s self,
        caller: &Caller,
        slot: &RunSlot,
        log: &mut RunLog,
        ended: &str,
    ) -> Result<Recorder<'s, S>, Refusal> {
        // What the record says wins over what this replica remembers: another replica (or this
        // one before a restart) may have handled calls of this run.
        log.refresh(&self.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
            .map_err(unavailable)?;
        if log.finished() {
            return Err(forbidden(format!("the run has ended; {ended}")));
        }
        let key = self.keys.for_tenant(caller.tenant.as_str());
        log.recorder(&self.store, &caller.tenant, key)
            .ok_or_else(|| bad("the run has not started; its runner writes run_started first"))
    }

    async fn decide_and_execute(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        request: CallRequest,
    ) -> Result<super::CallOutcome, Refusal> {
        let mut log = slot.log.lock().await;
        let mut recorder = self
            .continue_run(caller, slot, &mut log, "it makes no more calls")
            .await?;
        let outcome =
            if slot.gateway.calls_made(caller.run_id()) >= caller.context.context.budget.max_tool_calls {
                slot.gateway
                    .refuse_over_budget(&request.envelope, &mut recorder)
                    .await
            } else {
                let progress = super::RunProgress {
                    steps: log.ledger.steps,
                    tokens: log.ledger.tokens,
                    input: crate::run::input_value(&slot.bundle.session_spec),
                };
                slot.gateway
                    .handle_in_run(&request.envelope, &mut recorder, &request.state, &progress)
                    .await
            };
        let appended = recorder.appended();
        log.after_write(&self.store, &caller.tenant, caller.run_id(), appended)
            .await
            .map_err(unavailable)?;
        outcome.map_err(unavailable)
    }

    /// An approval attached to a call counts only if the Session holds the same decision (written
    /// by a human and checked by admission); anything else the runner attaches is dropped.
    async fn approval_on_record(
        &self,
        caller: &Caller,
        attached: Option<super::envelope::ApprovalGrant>,
    ) -> Result<Option<super::envelope::ApprovalGrant>, Refusal> {
        let Some(grant) = attached else {
            return Ok(None);
        };
        let approvals: Vec<Approval> = self
            .tenants
            .approvals(caller.tenant.as_str(), &caller.context.context.session_id)
            .await
            .map_err(unavailable)?;
        let on_record = approvals.iter().any(|a| {
            a.call_hash == grant.call_hash && a.decision == grant.decision && a.approver == grant.approver
        });
        Ok(on_record.then_some(grant))
    }

    async fn model(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: ModelCall = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let slot = service.slot(&caller).await?;
        let mut log = slot.log.lock().await;
        // The turn is recorded on the run: a model is asked only once the run has started.
        let mut recorder = service
            .continue_run(&caller, &slot, &mut log, "it asks the model nothing more")
            .await?;
        let ledger = &log.ledger;
        // A turn already recorded for this step (the runner crashed before reading the answer)
        // is answered from the record: the model is never asked twice for one step.
        if let Some(turn) = ledger.turns.get(&request.step) {
            return Ok(Json(turn).into_response());
        }
        if request.step != ledger.steps.saturating_add(1) {
            return Err(bad(format!(
                "step {} does not follow the recorded step {}",
                request.step, ledger.steps
            )));
        }
        let budget = &caller.context.context.budget;
        if request.step > budget.max_steps {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "step_budget",
                format!("run {} may take {} steps", caller.run_id(), budget.max_steps),
            ));
        }
        // What the prompt will cost, estimated before asking (≈ 4 bytes a token), so one request
        // cannot overshoot the budget by the size of its prompt.
        let prompt_estimate = estimated_tokens(&request.request);
        let spent = ledger.tokens.saturating_add(prompt_estimate);
        if spent >= budget.max_tokens {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "token_budget",
                format!(
                    "run {} has used {} of its {} tokens and this prompt needs about {prompt_estimate} more",
                    caller.run_id(),
                    ledger.tokens,
                    budget.max_tokens
                ),
            ));
        }
        let mut model_request = request.request;
        // The model, its limits and its credentials are the Agent's, not the runner's to choose.
        model_request.model = slot.bundle.agent_spec.model.model.clone();
        let remaining = u32::try_from(budget.max_tokens - spent).unwrap_or(u32::MAX);
        model_request.max_output_tokens = Some(
            slot.bundle
                .agent_spec
                .model
                .max_output_tokens
                .unwrap_or(remaining)
                .min(remaining),
        );
        let mut turn = slot
            .model
            .complete(&model_request, request.step)
            .await
            .map_err(|e| match e {
                ModelError::ScriptExhausted { .. } | ModelError::BadScript { .. } => {
                    Refusal(StatusCode::UNPROCESSABLE_ENTITY, "model_script", e.to_string())
                }
                other => Refusal(StatusCode::BAD_GATEWAY, "model_unavailable", other.to_string()),
            })?;
        // A model that reports no usage is charged the estimate, never nothing.
        if turn.prompt_tokens == 0 && turn.completion_tokens == 0 {
            turn.prompt_tokens = prompt_estimate;
            turn.completion_tokens = (turn.content.len() as u64).div_ceil(4);
        }
        recorder.stage(EntryBody::ModelTurn {
            step: request.step,
            model: model_request.model.clone(),
            response: serde_json::to_value(&turn).unwrap_or_default(),
            prompt_tokens: turn.prompt_tokens,
            completion_tokens: turn.completion_tokens,
        });
        recorder.flush().await.map_err(unavailable)?;
        let appended = recorder.appended();
        log.after_write(&service.store, &caller.tenant, caller.run_id(), appended)
            .await
            .map_err(unavailable)?;
        Ok(Json(turn).into_response())
    }
}

/// A rough token count of a request (≈ 4 bytes a token), for budgeting before the model answers.
fn estimated_tokens(request: &crate::model::ModelRequest) -> u64 {
    let bytes: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.to_string().len())
                    .sum::<usize>()
        })
        .sum::<usize>()
        + request
            .tools
            .iter()
            .map(|t| t.description.len() + t.parameters.to_string().len())
            .sum::<usize>();
    (bytes as u64).div_ceil(4)
}

fn head_moved(run_id: &str) -> Refusal {
    Refusal(
        StatusCode::CONFLICT,
        "head_moved",
        format!("run {run_id}: the chain moved on; re-read the head and chain again"),
    )
}
