//! The runner's side of the gateway service: in a cluster a runner pod holds no credential, key
//! or store address, so everything durable or external it does — record appends and reads, tool
//! calls, model turns — is a request to the gateway service, authenticated by the pod's
//! projected token and scoped by its signed RunContext. [`GatewayClient`] is a [`RecordStore`]
//! (so the run loop's recorder works unchanged) plus the call and model requests.
//!
//! The wire types are shared with the service (`gateway::service`).

use std::{path::PathBuf, time::Duration};

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{CallOutcome, envelope::CallEnvelope};
use crate::{
    model::{ModelError, ModelRequest, ModelTurn},
    policy::StateFacts,
    records::{
        Hash, StoredEntry,
        store::{
            AppendBatch, Checkpoint, RecordStore, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
        },
    },
    run_context::SignedRunContext,
};

/// Header carrying the caller's signed RunContext (base64 of its JSON).
pub const RUN_CONTEXT_HEADER: &str = "x-contextos-run-context";
/// Largest response the client reads (a long run's chain); larger answers are refused.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Attempts per request when the service cannot be reached (another replica may answer).
const ATTEMPTS: u32 = 6;

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

/// `POST /v1/run/calls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRequest {
    pub envelope: CallEnvelope,
    /// The runner's Functional State (CEL `state.*`): the runner's own assessment.
    pub state: StateFacts,
}

/// `POST /v1/run/model`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCall {
    pub request: ModelRequest,
    /// The step this turn is for (1-based); a step already answered is answered again from the
    /// record, never asked twice.
    pub step: u32,
}

/// An error answer of the service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    pub error: String,
    /// Machine-readable kind: `head_moved`, `token_budget`, `forbidden`, `unauthenticated`,
    /// `bad_request`, `unavailable`, `not_found`.
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
    },
    #[error("the gateway service sent an answer that cannot be read: {0}")]
    Malformed(String),
    #[error("{0}")]
    Token(String),
}

/// A runner's connection to the gateway service, for one run.
#[derive(Clone, Debug)]
pub struct GatewayClient {
    base: String,
    http: reqwest::Client,
    token: TokenSource,
    context_header: String,
    tenant: String,
}

impl GatewayClient {
    /// A client for the service at `base` (e.g. `http://contextos-gateway.contextos-system.svc:8480`)
    /// acting for the run `context` was issued for.
    pub fn new(base: &str, token: TokenSource, context: &SignedRunContext) -> Result<Self, RemoteError> {
        let json = serde_json::to_vec(context).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .map_err(|e| RemoteError::Malformed(e.to_string()))?,
            token,
            context_header: base64::engine::general_purpose::STANDARD.encode(json),
            tenant: context.context.tenant_id.clone(),
        })
    }

    /// Sends one call through the service's Tool Gateway.
    pub async fn call(
        &self,
        envelope: &CallEnvelope,
        state: &StateFacts,
    ) -> Result<CallOutcome, RemoteError> {
        let request = CallRequest {
            envelope: envelope.clone(),
            state: state.clone(),
        };
        self.post_json("/v1/run/calls", &request).await
    }

    /// Asks the agent's model for the turn of `step`, through the service (which holds the model
    /// credentials, enforces the token budget and records the turn).
    pub async fn model(&self, request: &ModelRequest, step: u32) -> Result<ModelTurn, ModelError> {
        let body = ModelCall {
            request: request.clone(),
            step,
        };
        self.post_json("/v1/run/model", &body).await.map_err(|e| match e {
            RemoteError::Refused { code, error, .. } if code == "token_budget" => {
                ModelError::TokenBudget { detail: error }
            }
            RemoteError::Refused { code, error, .. } if code == "model_script" => ModelError::BadScript {
                script: "the agent's script (at the gateway service)".into(),
                detail: error,
            },
            other => ModelError::Unreachable {
                endpoint: format!("{}/v1/run/model", self.base),
                detail: other.to_string(),
            },
        })
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, RemoteError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        let answer = self.send(reqwest::Method::POST, path, Some(bytes)).await?;
        serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        let answer = self.send(reqwest::Method::GET, path, None).await?;
        serde_json::from_slice(&answer).map_err(|e| RemoteError::Malformed(format!("{path}: {e}")))
    }

    /// One request, retried while no replica answers; answers are read up to a bound.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}{path}", self.base);
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            let token = self.token.read().map_err(RemoteError::Token)?;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token)
                .header(RUN_CONTEXT_HEADER, &self.context_header);
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => {
                    last = Some(e.to_string());
                    continue;
                }
            };
            let status = response.status();
            let bytes = match read_bounded(response).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            if status.is_success() {
                return Ok(bytes);
            }
            // A replica going away answers 502/503 through the Service; try another.
            if matches!(status.as_u16(), 502..=504) {
                last = Some(format!("HTTP {status}"));
                continue;
            }
            let problem: Problem = serde_json::from_slice(&bytes).unwrap_or(Problem {
                error: String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
                code: "unknown".into(),
            });
            return Err(RemoteError::Refused {
                code: problem.code,
                error: problem.error,
                status: status.as_u16(),
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
                "this runner acts for tenant {} only, not {tenant}",
                self.tenant
            )))
        }
    }
}

/// Reads a response body, refusing it once it passes [`MAX_RESPONSE_BYTES`].
async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn store_error(e: RemoteError, run_id: &str) -> StoreError {
    match e {
        RemoteError::Refused { code, error, .. } if code == "head_moved" => StoreError::HeadMoved {
            run_id: run_id.to_owned(),
            expected: "(runner's head)".into(),
            actual: error,
        },
        other => StoreError::Backend(other.to_string()),
    }
}

impl RecordStore for GatewayClient {
    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<(), StoreError> {
        self.check_tenant(tenant)?;
        let request = AppendRequest {
            expected_head: batch.expected_head.map(|h| h.to_hex()),
            entries: batch.entries.iter().map(WireEntry::of).collect(),
        };
        self.post_json::<_, SignedHead>("/v1/run/append", &request)
            .await
            .map(|_| ())
            .map_err(|e| store_error(e, &batch.run_id))
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>, StoreError> {
        self.check_tenant(tenant)?;
        self.get_json(&format!("/v1/run/head?run={run_id}"))
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
        let wire: Vec<WireEntry> = self
            .get_json(&format!("/v1/run/chain?run={run_id}&from={from_seq}"))
            .await
            .map_err(|e| store_error(e, run_id))?;
        wire.iter()
            .map(|e| e.decode().map_err(StoreError::Backend))
            .collect()
    }

    async fn list_runs(
        &self,
        _tenant: &TenantId,
        _filter: &RunFilter,
    ) -> Result<Vec<RunSummary>, StoreError> {
        Err(StoreError::Backend(
            "a runner reads only its own run; listing runs is not available through the gateway service"
                .into(),
        ))
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash, StoreError> {
        self.check_tenant(tenant)?;
        let answer = self
            .send(reqwest::Method::POST, "/v1/run/blobs", Some(bytes))
            .await
            .map_err(|e| store_error(e, "-"))?;
        let text: String = serde_json::from_slice(&answer).map_err(|e| StoreError::Backend(e.to_string()))?;
        Hash::parse(&text).ok_or_else(|| StoreError::Backend(format!("{text:?} is not a blob hash")))
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_tenant(tenant)?;
        match self
            .send(reqwest::Method::GET, &format!("/v1/run/blobs/{hash}"), None)
            .await
        {
            Ok(bytes) => Ok(Some(bytes)),
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
        self.get_json(&format!("/v1/run/checkpoint?session={session_id}"))
            .await
            .map_err(|e| store_error(e, "-"))
    }
}
