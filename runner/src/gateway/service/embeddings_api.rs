//! Embeddings for runner pods' tool discovery (`/v1/run/embeddings`). A runner pod holds no
//! model and no endpoint credential: for an Agent whose `spec.discovery` scores by embeddings,
//! it asks its gateway service, which embeds with what it was configured with (the model in
//! `CONTEXTOS_EMBEDDING_MODEL`, or an OpenAI-compatible endpoint whose key only the service
//! holds). The run then records `tools_offered` as scored by that model, which the service
//! accepts only under its own model's name.
//!
//! Bounded, since the work is the replica's CPU or its provider's bill: only a run whose Agent
//! asks for embeddings is served; a request holds at most [`GATEWAY_BATCH`] texts of at most
//! [`GATEWAY_MAX_TEXT_BYTES`]; a run has at most as many distinct texts embedded as its discovery
//! needs — each of its tools' texts and an intent a step, twice over — and asking again for a
//! text it had costs nothing (an attempt that starts again indexes the same catalog); one
//! request embeds at a time per replica (the encoder splits its work over the cores). Each
//! replica counts on its own, for its last [`MAX_COUNTED_RUNS`] runs: with N replicas a run may
//! have N times its share. Vectors are kept per tenant and text (one tenant's timing never tells
//! what another embedded), so a catalog is embedded once per replica, not once per run.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use axum::{Json, body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::discovery::embedding::{
    Embedder, GATEWAY_BATCH, GATEWAY_MAX_TEXT_BYTES, GatewayEmbedAnswer, GatewayEmbedRequest, GatewayModel,
};

/// Requests embedding at once on one replica.
const EMBEDDING_WORKERS: usize = 1;
/// Vectors kept per replica (about 6 MB at 384 dimensions).
const MAX_KEPT_VECTORS: usize = 4096;
/// Runs whose texts are counted per replica (the oldest forgotten first).
const MAX_COUNTED_RUNS: usize = 1024;

/// The code of a refusal: the run may not have (more) embeddings.
const EMBEDDINGS_REFUSED: &str = "embeddings_refused";

/// A replica's embedder and what it has made.
#[derive(Debug)]
pub struct EmbeddingDesk {
    embedder: Embedder,
    model: String,
    working: tokio::sync::Semaphore,
    kept: Mutex<Kept>,
    /// The distinct texts each run had embedded, for the last [`MAX_COUNTED_RUNS`] runs.
    used: Mutex<RunTexts>,
}

/// The distinct texts each run had embedded (the first 8 bytes of their digests), by (tenant,
/// run), and the runs in the order they came.
#[derive(Debug, Default)]
struct RunTexts {
    by_run: HashMap<(String, String), HashSet<u64>>,
    order: VecDeque<(String, String)>,
}

#[derive(Debug, Default)]
struct Kept {
    vectors: HashMap<[u8; 32], Arc<Vec<f32>>>,
    order: VecDeque<[u8; 32]>,
}

impl EmbeddingDesk {
    /// A desk embedding with `embedder` (a model in this process or an endpoint; never the
    /// gateway's own, which would ask itself).
    pub fn new(embedder: Embedder) -> Option<Self> {
        if matches!(embedder, Embedder::Gateway(_)) {
            return None;
        }
        Some(Self {
            model: embedder.id(),
            embedder,
            working: tokio::sync::Semaphore::new(EMBEDDING_WORKERS),
            kept: Mutex::default(),
            used: Mutex::default(),
        })
    }

    /// The model's name, as runs record it.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Counts the texts of `digests` the run has not had yet against its `allowance`: those
    /// newly counted (to give back if they cannot be embedded), or `None` if they would pass it.
    fn reserve(&self, run: &(String, String), digests: &[[u8; 32]], allowance: usize) -> Option<Vec<u64>> {
        let mut guard = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let RunTexts {
            by_run: counts,
            order,
        } = &mut *guard;
        if !counts.contains_key(run) {
            if counts.len() >= MAX_COUNTED_RUNS
                && let Some(oldest) = order.pop_front()
            {
                counts.remove(&oldest);
            }
            order.push_back(run.clone());
        }
        let had = counts.entry(run.clone()).or_default();
        let new: Vec<u64> = digests
            .iter()
            .map(short)
            .filter(|d| !had.contains(d))
            .collect::<HashSet<u64>>()
            .into_iter()
            .collect();
        if had.len() + new.len() > allowance {
            return None;
        }
        had.extend(&new);
        Some(new)
    }

    /// Gives back texts [`EmbeddingDesk::reserve`] counted.
    fn release(&self, run: &(String, String), reserved: &[u64]) {
        let mut guard = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(had) = guard.by_run.get_mut(run) {
            for digest in reserved {
                had.remove(digest);
            }
        }
    }

    /// The vectors of `texts` (whose digests for `tenant` are `digests`), made (at most
    /// [`EMBEDDING_WORKERS`] requests at once) for those not kept.
    async fn embed(
        &self,
        texts: &[String],
        digests: &[[u8; 32]],
    ) -> Result<Vec<Arc<Vec<f32>>>, crate::discovery::embedding::EmbeddingError> {
        let mut found: Vec<Option<Arc<Vec<f32>>>> = {
            let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            digests.iter().map(|d| kept.vectors.get(d).cloned()).collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|i| found[*i].is_none()).collect();
        if !missing.is_empty() {
            let asked: Vec<String> = missing.iter().map(|i| texts[*i].clone()).collect();
            // Waited for out of the request's turn, like a tool: a tenant queueing texts behind
            // the replica's embedding workers holds back no other tenant's requests.
            let made = crate::gateway::fair::away(async {
                let _worker = self
                    .working
                    .acquire()
                    .await
                    .map_err(|e| crate::discovery::embedding::EmbeddingError::Inference(e.to_string()))?;
                self.embedder.embed(&asked).await
            })
            .await?;
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            for (i, vector) in missing.into_iter().zip(made) {
                let vector = Arc::new(vector.values().to_vec());
                if kept.vectors.insert(digests[i], vector.clone()).is_none() {
                    kept.order.push_back(digests[i]);
                }
                while kept.order.len() > MAX_KEPT_VECTORS {
                    if let Some(oldest) = kept.order.pop_front() {
                        kept.vectors.remove(&oldest);
                    }
                }
                found[i] = Some(vector);
            }
        }
        found
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    crate::discovery::embedding::EmbeddingError::Inference(
                        "the embedder answered fewer vectors than asked".into(),
                    )
                })
            })
            .collect()
    }
}

/// Where `text` is kept for `tenant`: the digest of both.
fn digest(tenant: &str, text: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(tenant.as_bytes());
    hash.update([0]);
    hash.update(text.as_bytes());
    hash.finalize().into()
}

/// The first 8 bytes of a digest: enough to tell a run's few thousand texts apart.
fn short(digest: &[u8; 32]) -> u64 {
    u64::from_le_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ])
}

/// The distinct texts a run's discovery may have embedded: each of its tools' texts (document
/// and examples) and an intent a step, twice over.
fn allowance(bundle: &crate::run::bundle::RunBundle) -> usize {
    let spec = &bundle.agent_spec;
    let catalog: usize = spec.tools.iter().map(|t| 1 + t.examples.len()).sum();
    2 * (catalog + spec.budget.max_steps as usize)
}

fn refused(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, EMBEDDINGS_REFUSED, message.into())
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// `GET /v1/run/embeddings`: the model this replica embeds with, if any.
    pub(super) async fn embeddings_model(State(service): State<Arc<Self>>, headers: HeaderMap) -> Reply {
        service.caller(&headers).await?;
        let model = service.embeddings.as_ref().map(|d| d.model().to_owned());
        Ok(Json(GatewayModel { model }).into_response())
    }

    /// `POST /v1/run/embeddings`: the vectors of texts the caller's run discovers tools by.
    pub(super) async fn embeddings(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let Some(desk) = service.embeddings.clone() else {
            return Err(refused(
                "this gateway has no embedding model (set CONTEXTOS_EMBEDDING_MODEL or CONTEXTOS_EMBEDDINGS_URL on it); discovery scores by BM25",
            ));
        };
        let request: GatewayEmbedRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        if request.input.is_empty() || request.input.len() > GATEWAY_BATCH {
            return Err(bad(format!(
                "{} texts: a request embeds 1 to {GATEWAY_BATCH}",
                request.input.len()
            )));
        }
        if let Some(long) = request
            .input
            .iter()
            .position(|t| t.len() > GATEWAY_MAX_TEXT_BYTES)
        {
            return Err(bad(format!(
                "text {long} is longer than {GATEWAY_MAX_TEXT_BYTES} bytes"
            )));
        }
        let slot = service.slot(&caller, &[]).await?;
        let wants = crate::discovery::by_embeddings(&slot.bundle.agent_spec);
        if !wants {
            return Err(refused(
                "the run's Agent does not discover its tools by embeddings (spec.discovery.resolver)",
            ));
        }
        let run = (caller.tenant.to_string(), caller.run_id().to_owned());
        let digests: Vec<[u8; 32]> = request.input.iter().map(|t| digest(&run.0, t)).collect();
        let allowed = allowance(&slot.bundle);
        let Some(reserved) = desk.reserve(&run, &digests, allowed) else {
            return Err(refused(format!(
                "the run has had the {allowed} embeddings its discovery needs (its tools' texts and an intent a step, twice over)"
            )));
        };
        let vectors = match desk.embed(&request.input, &digests).await {
            Ok(vectors) => vectors,
            Err(error) => {
                desk.release(&run, &reserved);
                // The detail may name the provider's endpoint and repeat its answer: logged
                // here, not told to the pod.
                tracing::warn!(%error, tenant = %run.0, run = %run.1, "embedding for a runner pod failed");
                return Err(unavailable(
                    "the gateway's embedding model failed; the turn is scored by BM25",
                ));
            }
        };
        Ok(Json(GatewayEmbedAnswer {
            model: desk.model().to_owned(),
            embeddings: vectors.iter().map(|v| v.as_ref().clone()).collect(),
        })
        .into_response())
    }
}
