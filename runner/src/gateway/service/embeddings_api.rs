//! Embeddings for runner pods' tool discovery (`/v1/run/embeddings`). A runner pod holds no
//! model and no endpoint credential: for an Agent whose `spec.discovery` scores by embeddings,
//! it asks its gateway service, which embeds with what it was configured with (the model in
//! `CONTEXTOS_EMBEDDING_MODEL`, or an OpenAI-compatible endpoint whose key only the service
//! holds). The run then records `tools_offered` as scored by that model, which the service
//! accepts only under its own model's name.
//!
//! Bounded, since the work is the replica's CPU or its provider's bill: only a run whose Agent
//! asks for embeddings is served; a request holds at most [`GATEWAY_BATCH`] texts of at most
//! [`GATEWAY_MAX_TEXT_BYTES`]; a run has at most as many texts embedded for it as its discovery
//! needs — each of its tools' texts and an intent a step, twice over — counting each text the
//! replica embeds for it: asking again for a text the replica still keeps costs nothing (an
//! attempt that starts again indexes the same catalog), while one no longer kept is embedded,
//! and counted, again — so asking for the same texts over and over, after other runs pushed
//! them out, spends the run's share like new ones. One request embeds at a time per replica (the
//! encoder splits its work over the cores); requests waiting for it are served a tenant at a
//! time in rotation, so a tenant with many waiting delays another's by about one of its own;
//! and a request waits at most [`EMBEDDING_WAIT`] for its turn (then the runner scores by BM25
//! what it could not have embedded: the whole attempt, when that was its catalog). Each
//! replica counts on its own, for its last [`MAX_COUNTED_RUNS`] runs: with N replicas a run
//! may have N times its share. Vectors are kept per tenant and text (one tenant's timing never
//! tells what another embedded), so a catalog is embedded once per replica, not once per run;
//! when the replica keeps all it may, the tenant keeping the most forgets its least recently
//! used — a tenant embedding text after text pushes out its own once it keeps more than
//! another (see [`crate::gateway::shelves`]), not the catalog of a tenant keeping no more than
//! an equal share.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use axum::{Json, body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::{
    discovery::embedding::{
        Embedder, GATEWAY_BATCH, GATEWAY_MAX_TEXT_BYTES, GatewayEmbedAnswer, GatewayEmbedRequest,
        GatewayModel,
    },
    gateway::{
        fair::FairTurns,
        shelves::{Bounds, Shelves},
    },
};

/// Requests embedding at once on one replica.
const EMBEDDING_WORKERS: usize = 1;
/// How long a request waits for an embedding worker: one run keeping them busy delays another
/// run's turn at most this long (that turn is then scored by BM25).
const EMBEDDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Vectors kept per replica (about 6 MB at 384 dimensions), by one tenant or many.
const MAX_KEPT_VECTORS: usize = 4096;
const KEPT_BOUNDS: Bounds = Bounds {
    tenant_entries: MAX_KEPT_VECTORS,
    tenant_weight: MAX_KEPT_VECTORS,
    total_weight: MAX_KEPT_VECTORS,
};
/// Runs whose texts are counted per replica (the oldest forgotten first).
const MAX_COUNTED_RUNS: usize = 1024;

/// The code of a refusal: the run may not have (more) embeddings.
const EMBEDDINGS_REFUSED: &str = "embeddings_refused";
/// The code of an answer: the embedding model was busy for [`EMBEDDING_WAIT`].
const EMBEDDINGS_BUSY: &str = "embeddings_busy";

/// A replica's embedder and what it has made.
#[derive(Debug)]
pub struct EmbeddingDesk {
    embedder: Embedder,
    model: String,
    /// Turns at the embedder, taken a tenant at a time.
    working: Arc<FairTurns>,
    /// Vectors made, by tenant and the digest of tenant and text; each weighs 1.
    kept: Mutex<Shelves<[u8; 32], Arc<Vec<f32>>>>,
    /// The texts embedded for each run, for the last [`MAX_COUNTED_RUNS`] runs.
    used: Mutex<RunTexts>,
}

/// How many texts the replica embedded for each run, by (tenant, run), and the runs in the
/// order they came.
#[derive(Debug, Default)]
struct RunTexts {
    by_run: HashMap<(String, String), usize>,
    order: VecDeque<(String, String)>,
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
            working: FairTurns::new(EMBEDDING_WORKERS),
            kept: Mutex::new(Shelves::new(KEPT_BOUNDS)),
            used: Mutex::default(),
        })
    }

    /// The model's name, as runs record it.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// How many distinct texts of `digests` the replica does not keep for `tenant`: what
    /// embedding them costs.
    fn unkept(&self, tenant: &str, digests: &[[u8; 32]]) -> usize {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        digests
            .iter()
            .filter(|d| kept.peek(tenant, d).is_none())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Counts `texts` more embedded for the run against its `allowance`, if they fit in it.
    fn reserve(&self, run: &(String, String), texts: usize, allowance: usize) -> bool {
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
        let made = counts.entry(run.clone()).or_default();
        if made.saturating_add(texts) > allowance {
            return false;
        }
        *made += texts;
        true
    }

    /// Gives back texts [`EmbeddingDesk::reserve`] counted.
    fn release(&self, run: &(String, String), texts: usize) {
        let mut guard = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(made) = guard.by_run.get_mut(run) {
            *made = made.saturating_sub(texts);
        }
    }

    /// Keeps `vector` for `tenant` as the one of the text whose digest is `digest`, making
    /// room as [`KEPT_BOUNDS`] require.
    fn keep(&self, tenant: &str, digest: [u8; 32], vector: Arc<Vec<f32>>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.insert(tenant, digest, vector, 1);
    }

    /// The vectors of `texts` (whose digests for `tenant` are `digests`), made (at most
    /// [`EMBEDDING_WORKERS`] requests at once, tenants in rotation) for those not kept — each
    /// distinct text once, however often a request repeats it, as [`EmbeddingDesk::unkept`]
    /// counts them.
    async fn embed(
        &self,
        tenant: &str,
        texts: &[String],
        digests: &[[u8; 32]],
    ) -> Result<Vec<Arc<Vec<f32>>>, EmbedFailure> {
        let mut found: Vec<Option<Arc<Vec<f32>>>> = {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            digests.iter().map(|d| kept.get(tenant, d).cloned()).collect()
        };
        // The first position of each distinct text not kept.
        let mut seen = HashSet::new();
        let missing: Vec<usize> = (0..texts.len())
            .filter(|i| found[*i].is_none() && seen.insert(digests[*i]))
            .collect();
        if !missing.is_empty() {
            let asked: Vec<String> = missing.iter().map(|i| texts[*i].clone()).collect();
            // Waited for out of the request's turn, like a tool: a tenant queueing texts behind
            // the replica's embedding workers holds back no other tenant's requests.
            let made = crate::gateway::fair::away(async {
                let Ok(_turn) = tokio::time::timeout(EMBEDDING_WAIT, self.working.take(tenant)).await else {
                    return Err(EmbedFailure::Busy);
                };
                self.embedder.embed(&asked).await.map_err(EmbedFailure::Failed)
            })
            .await?;
            let mut made_for: HashMap<[u8; 32], Arc<Vec<f32>>> = HashMap::new();
            for (i, vector) in missing.into_iter().zip(made) {
                let vector = Arc::new(vector.values().to_vec());
                self.keep(tenant, digests[i], vector.clone());
                made_for.insert(digests[i], vector);
            }
            for (i, slot) in found.iter_mut().enumerate() {
                if slot.is_none() {
                    *slot = made_for.get(&digests[i]).cloned();
                }
            }
        }
        found
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    EmbedFailure::Failed(crate::discovery::embedding::EmbeddingError::Inference(
                        "the embedder answered fewer vectors than asked".into(),
                    ))
                })
            })
            .collect()
    }
}

/// Why texts were not embedded.
#[derive(Debug)]
enum EmbedFailure {
    /// No worker was free within [`EMBEDDING_WAIT`].
    Busy,
    Failed(crate::discovery::embedding::EmbeddingError),
}

/// Where `text` is kept for `tenant`: the digest of both.
fn digest(tenant: &str, text: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(tenant.as_bytes());
    hash.update([0]);
    hash.update(text.as_bytes());
    hash.finalize().into()
}

/// The texts a run's discovery may have embedded: each of its tools' texts (document and
/// examples) and an intent a step, twice over.
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
        let reserved = desk.unkept(&run.0, &digests);
        if !desk.reserve(&run, reserved, allowed) {
            return Err(refused(format!(
                "the run has had the {allowed} embeddings its discovery needs (its tools' texts and an intent a step, twice over; a text this replica no longer keeps counts again)"
            )));
        }
        let vectors = match desk.embed(&run.0, &request.input, &digests).await {
            Ok(vectors) => vectors,
            // Answered at once, and not asked again by the runner (a 503 would be, joining the
            // queue again): it scores by BM25 what it could not have embedded.
            Err(EmbedFailure::Busy) => {
                desk.release(&run, reserved);
                return Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    EMBEDDINGS_BUSY,
                    format!(
                        "the gateway's embedding model was busy for {} s; what was not embedded is scored by BM25",
                        EMBEDDING_WAIT.as_secs()
                    ),
                ));
            }
            Err(EmbedFailure::Failed(error)) => {
                desk.release(&run, reserved);
                // The detail may name the provider's endpoint and repeat its answer: logged
                // here, not told to the pod.
                tracing::warn!(%error, tenant = %run.0, run = %run.1, "embedding for a runner pod failed");
                return Err(unavailable(
                    "the gateway's embedding model failed; what was not embedded is scored by BM25",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn desk() -> EmbeddingDesk {
        let endpoint = crate::discovery::embedding::RemoteEmbeddings::new(
            "http://127.0.0.1:9/v1",
            "test-model",
            None,
            std::time::Duration::from_secs(1),
        );
        EmbeddingDesk::new(Embedder::Remote(endpoint)).expect("a desk")
    }

    #[test]
    fn a_run_is_charged_each_text_embedded_for_it_and_a_kept_one_costs_nothing() {
        let desk = desk();
        let run = ("shop".to_owned(), "r1".to_owned());
        let d = |text: &str| digest("shop", text);
        // Distinct texts not kept: each counted once.
        assert_eq!(desk.unkept("shop", &[d("a"), d("b"), d("a")]), 2);
        assert!(desk.reserve(&run, 2, 3));
        desk.keep("shop", d("a"), Arc::new(vec![1.0]));
        desk.keep("shop", d("b"), Arc::new(vec![2.0]));
        // Asked again while kept: free.
        assert_eq!(desk.unkept("shop", &[d("a"), d("b")]), 0);
        assert!(desk.reserve(&run, 0, 3));
        // Pushed out by other texts, the same text costs again: a run cannot have its share
        // embedded over and over by asking for texts the replica no longer keeps.
        for i in 0..MAX_KEPT_VECTORS {
            desk.keep("shop", d(&i.to_string()), Arc::new(vec![0.0]));
        }
        assert_eq!(desk.unkept("shop", &[d("a"), d("b")]), 2);
        assert!(!desk.reserve(&run, 2, 3), "past the run's share");
        assert!(desk.reserve(&run, 1, 3), "what is left of it");
        // What could not be embedded is given back.
        desk.release(&run, 1);
        assert!(desk.reserve(&run, 1, 3));
        // Another run has its own share.
        assert!(desk.reserve(&("shop".to_owned(), "r2".to_owned()), 3, 3));
    }

    /// A tenant embedding text after text (within its runs' shares, over many runs) fills the
    /// replica's vectors; it must not push out the catalog another tenant's runs were charged
    /// for, which would make them pay for it again until their share ran out.
    #[tokio::test]
    async fn a_tenant_embedding_text_after_text_pushes_out_only_its_own() {
        let desk = desk();
        let mine = [digest("shop", "get_status"), digest("shop", "restart")];
        for d in mine {
            desk.keep("shop", d, Arc::new(vec![1.0]));
        }
        for i in 0..2 * MAX_KEPT_VECTORS {
            desk.keep("bank", digest("bank", &i.to_string()), Arc::new(vec![0.0]));
        }
        assert_eq!(desk.unkept("shop", &mine), 0, "shop's catalog is still kept");
        assert_eq!(
            desk.unkept(
                "bank",
                &[
                    digest("bank", "0"),
                    digest("bank", &(2 * MAX_KEPT_VECTORS - 1).to_string())
                ]
            ),
            1,
            "bank forgot its own oldest"
        );
        // Served from what is kept, without asking the embedder (here one that cannot answer).
        let texts = ["get_status".to_owned(), "restart".to_owned()];
        let vectors = desk.embed("shop", &texts, &mine).await.expect("kept vectors");
        assert_eq!(vectors.len(), 2);
    }

    /// An endpoint answering one request at a time, slowly, that notes whose text it was asked.
    async fn slow_endpoint() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::{Router, routing::post};
        let asked = Arc::new(Mutex::new(Vec::new()));
        let noted = asked.clone();
        let app = Router::new().route(
            "/v1/embeddings",
            post(move |Json(body): Json<serde_json::Value>| {
                let noted = noted.clone();
                async move {
                    let texts: Vec<String> =
                        serde_json::from_value(body["input"].clone()).unwrap_or_default();
                    noted.lock().expect("lock").extend(texts.iter().cloned());
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let data: Vec<_> = (0..texts.len())
                        .map(|i| serde_json::json!({"index": i, "embedding": [1.0, 0.0]}))
                        .collect();
                    Json(serde_json::json!({ "data": data }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v1", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, asked)
    }

    /// Requests waiting for the embedder are served a tenant at a time: a tenant that queued
    /// many delays another's request by about one of its own, not by all of them.
    #[tokio::test]
    async fn a_tenant_queueing_many_texts_delays_another_by_one_request() {
        let (url, asked) = slow_endpoint().await;
        let endpoint = crate::discovery::embedding::RemoteEmbeddings::new(
            &url,
            "test-model",
            None,
            std::time::Duration::from_secs(10),
        );
        let desk = Arc::new(EmbeddingDesk::new(Embedder::Remote(endpoint)).expect("a desk"));
        let ask = |tenant: &'static str, text: String| {
            let desk = desk.clone();
            tokio::spawn(async move {
                let texts = [text];
                let digests = [digest(tenant, &texts[0])];
                desk.embed(tenant, &texts, &digests).await.map(|_| ())
            })
        };
        // Until the embedder's turns are (working, waiting), or a test that fails, not hangs.
        let until = |counts: (usize, usize)| {
            let desk = desk.clone();
            async move {
                let waited = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    while desk.working.counts() != counts {
                        tokio::task::yield_now().await;
                    }
                });
                waited.await.expect("the requests queued in time");
            }
        };
        let mut busy = Vec::new();
        for i in 0..6 {
            busy.push(ask("bank", format!("bank-{i}")));
            // Each in line before the next, so the order they queued in is known.
            until((1, i)).await;
        }
        let quiet = ask("shop", "shop-0".to_owned());
        until((1, 6)).await;
        quiet.await.expect("task").expect("embedded");
        for request in busy {
            request.await.expect("task").expect("embedded");
        }
        let asked = asked.lock().expect("lock").clone();
        let at = asked.iter().position(|t| t == "shop-0").expect("shop asked");
        // Behind the one being embedded when it came, and the one of bank's already next in
        // the rotation; in one line (first come, first served) it would have waited for all six.
        assert!(at <= 2, "shop's request waited behind {at} of bank's: {asked:?}");
    }
}
