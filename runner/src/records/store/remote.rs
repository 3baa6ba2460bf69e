//! A record store reached through the gateway service, for processes that may not touch the
//! store themselves: a runner pod (its own run only, with its RunContext) and a replay Job (its
//! tenant's runs, read-only but for its report, with an operator-signed ReadGrant), both proving
//! their pod identity with a projected service-account token; and a person reading a
//! namespace's runs with their own Kubernetes token (`contextos records`), if the API server
//! lets them. The service decides what each may see. Store URL: `gateway+http://<host>:<port>`.

use std::{path::PathBuf, time::Duration};

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{AppendBatch, Checkpoint, RecordStore, RunFilter, RunSummary, SignedHead, StoreError, TenantId};
use crate::records::{Hash, StoredEntry};

/// Header carrying a runner's signed RunContext (base64 of its JSON).
pub const RUN_CONTEXT_HEADER: &str = "x-contextos-run-context";
/// Header carrying a replay Job's signed ReadGrant (base64 of its JSON).
pub const READ_GRANT_HEADER: &str = "x-contextos-read-grant";
/// Header naming the namespace a person reads (with their own token instead of a grant).
pub const READER_NAMESPACE_HEADER: &str = "x-contextos-namespace";
/// The run's head after a call or model turn, as the service answers it (`<seq>.<hash>`): the
/// entries it wrote for the request end there. The runner moves its recorder to it instead of
/// reading the head and the new entries back (two round trips per request).
pub const HEAD_HEADER: &str = "x-contextos-head";

/// Formats a head for [`HEAD_HEADER`].
pub fn head_header_value(seq: u64, hash: &Hash) -> String {
    format!("{seq}.{}", hash.to_hex())
}

/// Reads a [`HEAD_HEADER`] value; `None` if it is not one.
pub fn parse_head_header(value: &str) -> Option<(u64, Hash)> {
    let (seq, hash) = value.split_once('.')?;
    Some((seq.parse().ok()?, Hash::parse(hash)?))
}
/// Environment variable holding a person's Kubernetes bearer token for `contextos records`.
pub const READER_TOKEN_ENV: &str = "CONTEXTOS_TOKEN";
/// Environment variable naming the projected token file (default: the runner pod's path).
pub const TOKEN_FILE_ENV: &str = "CONTEXTOS_GATEWAY_TOKEN_FILE";
/// Where pods find their projected token for the gateway's audience.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/contextos/gateway-token";
/// Largest response read (a long run's chain); larger answers are refused.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Most entries the gateway service answers one chain request with (entries hold at most
/// 16 KiB inline, larger bodies are blobs): a few MiB an answer, however long the run; a
/// reader asks again from the entry after the last until a page comes back empty.
pub const CHAIN_PAGE: usize = 256;
/// The most bytes of entries one chain read takes in (a run writes at most 256 MiB unless its
/// gateway allows more): past it the answer is refused rather than held.
const MAX_CHAIN_BYTES: usize = 1 << 30;
/// Most runs one listing request asks the service for; a longer listing is read a page at a
/// time (see `run_pages`).
pub const RUNS_PAGE: usize = 1_000;
/// Most runs the service answers one listing request with. A page shorter than asked ends a
/// listing, so a page never asks for more than the service answers.
pub const MAX_LISTED_RUNS: usize = 10_000;
const _: () = assert!(RUNS_PAGE <= MAX_LISTED_RUNS);
/// Attempts per request when the service cannot be reached (another replica may answer).
const ATTEMPTS: u32 = 6;
/// The longest a throttled request waits when the service says to (`Retry-After`) before it
/// is sent again: a runner's attempt has a deadline of its own.
const MAX_TOLD_WAIT: Duration = Duration::from_secs(5);

/// The code of a refusal made before the caller's request was looked at — its address had too
/// many tokens refused lately (`gateway::refused_tokens`), or the person too many access
/// reviews denied (`gateway::readers`): asked again a little later, it may be answered.
pub const THROTTLED: &str = "throttled";

/// One sealed entry on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireEntry {
    pub seq: u64,
    /// The entry's canonical bytes, base64.
    pub bytes: String,
}

impl WireEntry {
    pub fn of(entry: &StoredEntry) -> Self {
        Self {
            seq: entry.seq,
            bytes: base64::engine::general_purpose::STANDARD.encode(&entry.bytes),
        }
    }

    /// The stored entry (its hash recomputed from the bytes, never taken from the sender).
    pub fn decode(&self) -> Result<StoredEntry, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.bytes)
            .map_err(|e| format!("entry {}: not base64: {e}", self.seq))?;
        Ok(StoredEntry::from_bytes(self.seq, bytes))
    }
}

/// `POST /v1/run/append`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendRequest {
    /// Hex hash of the entry the batch extends; `None` for the first batch of a run.
    pub expected_head: Option<String>,
    pub entries: Vec<WireEntry>,
}

/// An error answer of the service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    pub error: String,
    /// Machine-readable kind: `head_moved`, `token_budget`, `model_script`, `forbidden`,
    /// `unauthenticated`, `bad_request`, `unavailable`, `not_found`.
    pub code: String,
}

/// Where the pod's projected token is read from (re-read per request: the kubelet rotates it).
#[derive(Clone, Debug)]
pub enum TokenSource {
    File(PathBuf),
    Fixed(String),
}

impl TokenSource {
    fn read(&self) -> Result<String, String> {
        match self {
            Self::Fixed(token) => Ok(token.clone()),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| format!("cannot read the pod's gateway token {}: {e}", path.display())),
        }
    }
}

/// What a caller presents besides its token.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A runner: its signed RunContext (JSON); reads and writes its own run.
    Run(Vec<u8>),
    /// A replay Job: its signed ReadGrant (JSON); reads its tenant's runs.
    Read(Vec<u8>),
    /// A person (or any workload with RBAC): reads this namespace's runs, if allowed.
    Reader { namespace: String },
}

impl Credential {
    fn header(&self) -> (&'static str, String) {
        let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        match self {
            Self::Run(json) => (RUN_CONTEXT_HEADER, encode(json)),
            Self::Read(json) => (READ_GRANT_HEADER, encode(json)),
            Self::Reader { namespace } => (READER_NAMESPACE_HEADER, namespace.clone()),
        }
    }

    fn prefix(&self) -> &'static str {
        match self {
            Self::Run(_) => "/v1/run",
            Self::Read(_) | Self::Reader { .. } => "/v1/records",
        }
    }
}

/// Why a request to the service failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the gateway service at {url} cannot be reached: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the gateway service refused the request ({code}): {error}")]
    Refused {
        code: String,
        error: String,
        status: u16,
        /// How long the service said to wait before asking again (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    #[error("the gateway service sent an answer that cannot be read: {0}")]
    Malformed(String),
    #[error("{0}")]
    Token(String),
}

/// The record store behind the gateway service, for one caller.
#[derive(Clone, Debug)]
pub struct RemoteStore {
    base: String,
    http: reqwest::Client,
    token: TokenSource,
    credential: Credential,
    header: (&'static str, String),
    tenant: String,
}

impl RemoteStore {
    /// A store at the service `base` (e.g. `http://contextos-gateway.contextos-system.svc:8480`)
    /// for a caller of `tenant` presenting `credential`.
    pub fn new(
        base: &str,
        token: TokenSource,
        credential: Credential,
        tenant: &str,
    ) -> Result<Self, RemoteError> {
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http: crate::http::client_builder()
                .timeout(Duration::from_secs(300))
                // Less than the gateway keeps an idle connection open (`crate::serve`), so a
                // request is rarely sent on one it is closing.
                .pool_idle_timeout(Duration::from_secs(20))
                .build()
                .map_err(|e| RemoteError::Malformed(e.to_string()))?,
            token,
            header: credential.header(),
            credential,
            tenant: tenant.to_owned(),
        })
    }

    /// The service's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// POSTs JSON to `path` (under the service root) and reads a JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, RemoteError> {
        Ok(self.post_json_headed(path, body).await?.0)
    }

    /// [`RemoteStore::post_json`], with the run's head the service answered in [`HEAD_HEADER`].
    pub async fn post_json_headed<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, Option<(u64, Hash)>), RemoteError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        let (answer, head) = self.send(reqwest::Method::POST, path, Some(bytes)).await?;
        let value =
            serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))?;
        Ok((value, head))
    }

    /// POSTs JSON to `path` for an answer that takes long to make (a replay gate): waited for up
    /// to `timeout`, and sent again only if no replica took it — a request that reached one is
    /// never repeated, since the work it started would be done twice.
    pub async fn post_json_once<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, RemoteError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        let (answer, _) = self
            .send_with(reqwest::Method::POST, path, Some(bytes), Some(timeout))
            .await?;
        serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))
    }

    /// DELETEs `path` (under the service root) and reads a JSON answer.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        let (answer, _) = self.send(reqwest::Method::DELETE, path, None).await?;
        serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))
    }

    /// GETs `path` (under the service root) and reads a JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        let (answer, _) = self.send(reqwest::Method::GET, path, None).await?;
        serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))
    }

    /// One page of a listing: the runs the service answers for `filter`.
    async fn list_runs_page(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let mut query = Vec::new();
        if let Some(agent) = &filter.agent {
            query.push(format!("agent={}", q(agent)));
        }
        if let Some(session) = &filter.session_id {
            query.push(format!("session={}", q(session)));
        }
        if let Some(since) = filter.since_ms {
            query.push(format!("since_ms={since}"));
        }
        if let Some(until) = filter.until_ms {
            query.push(format!("until_ms={until}"));
        }
        if let Some(limit) = filter.limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(after) = &filter.after {
            query.push(format!("after_ms={}", after.started_at_ms));
            query.push(format!("after_run={}", q(&after.run_id)));
        }
        self.get_json(&self.path(&format!("/runs?{}", query.join("&"))))
            .await
            .map_err(|e| store_error(e, "-"))
    }

    fn path(&self, rest: &str) -> String {
        format!("{}{rest}", self.credential.prefix())
    }

    /// One request, retried while no replica answers; answers are read up to a bound. With the
    /// answer, the run's head if the service said it.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Option<(u64, Hash)>), RemoteError> {
        self.send_with(method, path, body, None).await
    }

    /// [`RemoteStore::send`]; with `once`, the request waits that long and is sent again only
    /// when it reached no replica.
    async fn send_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        once: Option<Duration>,
    ) -> Result<(Vec<u8>, Option<(u64, Hash)>), RemoteError> {
        let url = format!("{}{path}", self.base);
        let mut last = None;
        // What the service said to wait before asking again (`Retry-After` on a throttled answer).
        let mut told_to_wait = Duration::ZERO;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let backoff = Duration::from_millis(100 << attempt.min(5));
                tokio::time::sleep(backoff.max(std::mem::take(&mut told_to_wait))).await;
            }
            let token = self.token.read().map_err(RemoteError::Token)?;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token)
                .header(self.header.0, &self.header.1);
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            if let Some(timeout) = once {
                request = request.timeout(timeout);
            }
            // The span asking (a runner's model call, say): what the service's own span for the
            // request is a child of, when it is of the run's trace.
            if let Some(traceparent) = crate::telemetry::current_traceparent() {
                request = request.header("traceparent", traceparent);
            }

            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if once.is_none() || e.is_connect() => {
                    last = Some(e.to_string());
                    continue;
                }
                Err(e) => {
                    return Err(RemoteError::Unreachable {
                        url,
                        detail: e.to_string(),
                    });
                }
            };
            let status = response.status();
            let told = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let head = response
                .headers()
                .get(HEAD_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_head_header);
            let bytes = match read_bounded(response).await {
                Ok(bytes) => bytes,
                Err(e) if once.is_none() => {
                    last = Some(e);
                    continue;
                }
                Err(detail) => return Err(RemoteError::Unreachable { url, detail }),
            };
            if status.is_success() {
                return Ok((bytes, head));
            }
            // A replica going away answers 502/503 through the Service; try another.
            if once.is_none() && matches!(status.as_u16(), 502..=504) {
                last = Some(format!("HTTP {status}"));
                continue;
            }
            let problem: Problem = serde_json::from_slice(&bytes).unwrap_or(Problem {
                error: String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
                code: "unknown".into(),
            });
            // Throttled before the request was looked at (a neighbour sharing this address, say),
            // and the allowance refills within a second: asked again, but the last refusal is
            // said as it is. Other 429s (quotas, budgets) are answers, not to be asked again.
            if once.is_none() && status.as_u16() == 429 && problem.code == THROTTLED && attempt + 1 < ATTEMPTS
            {
                last = Some(problem.error);
                told_to_wait = told.unwrap_or_default().min(MAX_TOLD_WAIT);
                continue;
            }
            return Err(RemoteError::Refused {
                code: problem.code,
                error: problem.error,
                status: status.as_u16(),
                retry_after: told,
            });
        }
        Err(RemoteError::Unreachable {
            url,
            detail: last.unwrap_or_default(),
        })
    }

    fn check_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        if tenant.as_str() == self.tenant {
            Ok(())
        } else {
            Err(StoreError::Backend(format!(
                "this caller acts for tenant {} only, not {tenant}",
                self.tenant
            )))
        }
    }
}

/// Reads a response body, refusing it once it passes [`MAX_RESPONSE_BYTES`].
async fn read_bounded(response: reqwest::Response) -> Result<Vec<u8>, String> {
    crate::http::read_capped(response, MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"))
}

/// The code the gateway service answers a request to keep something about an erased subject
/// with.
pub const SUBJECT_ERASED: &str = "subject_erased";

/// The code the gateway service answers a write past the run's quota with.
pub const QUOTA_EXCEEDED: &str = "quota_exceeded";

fn store_error(e: RemoteError, run_id: &str) -> StoreError {
    match &e {
        RemoteError::Refused { code, .. } if code == QUOTA_EXCEEDED => {
            StoreError::QuotaExceeded(e.to_string())
        }
        RemoteError::Refused { code, error, .. } if code == "head_moved" => StoreError::HeadMoved {
            run_id: run_id.to_owned(),
            expected: "(this writer's head)".into(),
            actual: error.clone(),
        },
        RemoteError::Refused {
            status: 400 | 401 | 403,
            ..
        } => StoreError::Refused(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

/// Query strings are built from ids the store already validated; escape anyway.
fn q(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Memory is never reached through this client as raw keys: a run's memory is kept and
/// recalled by the gateway service itself, and people use its memory and consent API.
impl crate::memory::backend::MemoryBackend for RemoteStore {
    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        static REFUSED: crate::vault::kek::KeyRings = crate::vault::kek::KeyRings::Refused(
            "the identity vault's keys are held by the gateway service, never by its clients",
        );
        &REFUSED
    }

    async fn memory_get(&self, _: &TenantId, _: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        Err(memory_refused())
    }
    async fn memory_scan(
        &self,
        _: &TenantId,
        _: Vec<u8>,
        _: Vec<u8>,
        _: usize,
    ) -> Result<crate::memory::backend::Pairs, StoreError> {
        Err(memory_refused())
    }
    async fn memory_snapshot(
        &self,
        _: &TenantId,
        _: Vec<Vec<u8>>,
        _: Vec<u8>,
        _: Vec<u8>,
        _: usize,
    ) -> Result<crate::memory::backend::Snapshot, StoreError> {
        Err(memory_refused())
    }
    async fn memory_write(
        &self,
        _: &TenantId,
        _: Vec<crate::memory::backend::Write>,
    ) -> Result<Vec<bool>, StoreError> {
        Err(memory_refused())
    }
}

/// The gateway service's answer to a run key request (`…/key`): the run's key, URL-safe
/// base64, or none when its subject is erased.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyAnswer {
    pub key: Option<String>,
}

impl KeyAnswer {
    pub fn of(key: Option<&crate::vault::SecretKey>) -> Self {
        use base64::Engine as _;
        Self {
            key: key.map(|k| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.as_bytes())),
        }
    }

    pub fn key(&self) -> Result<Option<crate::vault::SecretKey>, crate::vault::VaultError> {
        use base64::Engine as _;
        self.key
            .as_deref()
            .map(|text| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text)
                    .ok()
                    .and_then(|bytes| crate::vault::SecretKey::from_bytes(&bytes))
                    .ok_or_else(|| {
                        crate::vault::VaultError::Remote(
                            "the gateway service answered a key that is not 32 bytes".into(),
                        )
                    })
            })
            .transpose()
    }
}

/// Why raw memory access through the gateway service is refused.
pub fn memory_refused() -> StoreError {
    StoreError::Refused(
        "memory is not served as raw keys through the gateway service; use its memory and consent API (contextos memory / consent), or open the store itself (embedded:<path> or tikv://<pd>)".into(),
    )
}

impl RecordStore for RemoteStore {
    /// Asks the service: a runner for its own run, a reader for a run it may read.
    async fn run_key(
        &self,
        tenant: &TenantId,
        run_id: &str,
        subject: &crate::consent::SubjectHandle,
        to: crate::vault::KeyUse,
    ) -> Result<Option<crate::vault::SecretKey>, crate::vault::VaultError> {
        self.check_tenant(tenant)
            .map_err(crate::vault::VaultError::Store)?;
        let to = match to {
            crate::vault::KeyUse::Read => "read",
            crate::vault::KeyUse::Keep => "keep",
        };
        let path = self.path(&format!(
            "/key?run={}&subject={}&use={to}",
            q(run_id),
            q(subject.as_str())
        ));
        let answer: KeyAnswer = self.get_json(&path).await.map_err(|e| match e {
            RemoteError::Refused { code, error, .. } if code == SUBJECT_ERASED => {
                crate::vault::VaultError::ErasedRemotely(error)
            }
            other => crate::vault::VaultError::Store(store_error(other, run_id)),
        })?;
        answer.key()
    }

    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<(), StoreError> {
        self.check_tenant(tenant)?;
        if !matches!(self.credential, Credential::Run(_)) {
            return Err(StoreError::Backend(
                "only a runner writes records through the gateway; readers cannot".into(),
            ));
        }
        let request = AppendRequest {
            expected_head: batch.expected_head.map(|h| h.to_hex()),
            entries: batch.entries.iter().map(WireEntry::of).collect(),
        };
        self.post_json::<_, SignedHead>(&self.path("/append"), &request)
            .await
            .map(|_| ())
            .map_err(|e| store_error(e, &batch.run_id))
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>, StoreError> {
        self.check_tenant(tenant)?;
        self.get_json(&self.path(&format!("/head?run={}", q(run_id))))
            .await
            .map_err(|e| store_error(e, run_id))
    }

    async fn read_chain(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.check_tenant(tenant)?;
        let mut entries = Vec::new();
        let mut from = from_seq;
        let mut bytes = 0usize;
        // Until a page comes back empty: a service answering fewer entries a page than asked
        // (an older or differently bounded replica) ends nothing early.
        loop {
            let page = self.read_chain_page(tenant, run_id, from, CHAIN_PAGE).await?;
            if page.is_empty() {
                break;
            }
            // Each entry must be the next one: a service that answered another part of the
            // chain, or skipped or repeated an entry, is an error, not a shorter record.
            if let Some((i, entry)) = page
                .iter()
                .enumerate()
                .find(|(i, entry)| Some(entry.seq) != from.checked_add(*i as u64))
            {
                return Err(StoreError::Backend(format!(
                    "run {run_id}: the gateway answered entry {} where entry {} was due",
                    entry.seq,
                    from.saturating_add(i as u64)
                )));
            }
            bytes = page
                .iter()
                .fold(bytes, |sum, e| sum.saturating_add(e.bytes.len()));
            if bytes > MAX_CHAIN_BYTES {
                return Err(StoreError::Backend(format!(
                    "run {run_id}: its chain holds more than {} MiB, more than any run may write",
                    MAX_CHAIN_BYTES >> 20
                )));
            }
            from = from.saturating_add(page.len() as u64);
            entries.extend(page);
        }
        Ok(entries)
    }

    async fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.check_tenant(tenant)?;
        let limit = limit.min(CHAIN_PAGE);
        let wire: Vec<WireEntry> = self
            .get_json(&self.path(&format!("/chain?run={}&from={from_seq}&limit={limit}", q(run_id))))
            .await
            .map_err(|e| store_error(e, run_id))?;
        wire.iter()
            .map(|e| e.decode().map_err(StoreError::Backend))
            .collect()
    }

    async fn list_runs(&self, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.check_tenant(tenant)?;
        // The service answers at most so many runs a request; more are read a page at a time,
        // so a listing is the store's whole answer, never one cut where the service stopped.
        let mut pages = super::run_pages::RunPages::new(filter, RUNS_PAGE);
        while let Some(request) = pages.next_request() {
            let page = self.list_runs_page(&request).await?;
            pages.take(page).map_err(StoreError::Backend)?;
        }
        Ok(pages.into_runs())
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash, StoreError> {
        self.check_tenant(tenant)?;
        let (answer, _) = self
            .send(reqwest::Method::POST, &self.path("/blobs"), Some(bytes))
            .await
            .map_err(|e| store_error(e, "-"))?;
        let text: String = serde_json::from_slice(&answer).map_err(|e| StoreError::Backend(e.to_string()))?;
        Hash::parse(&text).ok_or_else(|| StoreError::Backend(format!("{text:?} is not a blob hash")))
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_tenant(tenant)?;
        match self
            .send(reqwest::Method::GET, &self.path(&format!("/blobs/{hash}")), None)
            .await
        {
            Ok((bytes, _)) => super::intact_blob(hash, bytes).map(Some),
            Err(RemoteError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(store_error(e, "-")),
        }
    }

    async fn latest_checkpoint(
        &self,
        tenant: &TenantId,
        session_id: &str,
    ) -> Result<Option<Checkpoint>, StoreError> {
        self.check_tenant(tenant)?;
        self.get_json(&self.path(&format!("/checkpoint?session={}", q(session_id))))
            .await
            .map_err(|e| store_error(e, "-"))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Instant,
    };

    use axum::{http::StatusCode, response::IntoResponse};

    use super::*;

    /// A throttled request is sent again no sooner than the service said (`Retry-After`; the
    /// client's own backoff before a second attempt is 200 ms), and then answered.
    #[tokio::test]
    async fn a_throttled_request_waits_as_long_as_it_was_told() {
        let asked: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let router = axum::Router::new().route(
            "/v1/records/runs",
            axum::routing::get({
                let asked = asked.clone();
                move || async move {
                    let first = {
                        let mut asked = asked.lock().expect("lock");
                        asked.push(Instant::now());
                        asked.len() == 1
                    };
                    if first {
                        let problem = Problem {
                            error: "too many refused tokens from this address".into(),
                            code: THROTTLED.into(),
                        };
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [(reqwest::header::RETRY_AFTER, "1")],
                            axum::Json(problem),
                        )
                            .into_response()
                    } else {
                        axum::Json(serde_json::json!({"runs": []})).into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let store = RemoteStore::new(
            &url,
            TokenSource::Fixed("token".into()),
            Credential::Reader {
                namespace: "shop".into(),
            },
            "shop",
        )
        .expect("client");
        let answer: serde_json::Value = store.get_json("/v1/records/runs").await.expect("answered");
        assert_eq!(answer, serde_json::json!({"runs": []}));
        let asked = asked.lock().expect("lock").clone();
        assert_eq!(asked.len(), 2, "asked again once");
        assert!(
            asked[1] - asked[0] >= Duration::from_secs(1),
            "waited {:?}, told 1 s",
            asked[1] - asked[0]
        );
    }
}
