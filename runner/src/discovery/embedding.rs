//! Embeddings of text, from the model in-process or from an OpenAI-compatible
//! `/v1/embeddings` endpoint, as unit vectors so a dot product is their cosine similarity.

#[cfg(feature = "local-embeddings")]
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

#[cfg(feature = "local-embeddings")]
use super::minilm::MiniLm;

/// A unit-length vector (or all zeros, for text the model saw nothing in).
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding(Vec<f32>);

impl Embedding {
    /// `values` scaled to unit length.
    pub fn normalized(mut values: Vec<f32>) -> Self {
        let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > f32::EPSILON && norm.is_finite() {
            values.iter_mut().for_each(|v| *v /= norm);
        } else {
            values.iter_mut().for_each(|v| *v = 0.0);
        }
        Self(values)
    }

    /// Cosine similarity with `other` (0 when their widths differ).
    pub fn similarity(&self, other: &Embedding) -> f32 {
        if self.0.len() != other.0.len() {
            return 0.0;
        }
        // Summed in eight lanes, which the compiler vectorises (a sum in order it cannot): a
        // resolution scores every tool text of a catalog.
        let mut lanes = [0.0f32; 8];
        let (mine, theirs) = (self.0.chunks_exact(8), other.0.chunks_exact(8));
        let tail: f32 = mine
            .remainder()
            .iter()
            .zip(theirs.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in mine.zip(theirs) {
            for k in 0..8 {
                lanes[k] += a[k] * b[k];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }

    pub fn width(&self) -> usize {
        self.0.len()
    }

    pub fn values(&self) -> &[f32] {
        &self.0
    }
}

/// Why text could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("the embedding model at {path} cannot be used: {detail}")]
    Model {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("the embedding model failed: {0}")]
    Inference(String),
    #[error("the embeddings endpoint {endpoint} did not answer: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("the embeddings endpoint {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("the embeddings endpoint {endpoint} answered something else than embeddings: {detail}")]
    Malformed { endpoint: String, detail: String },
}

/// Where embeddings come from.
#[derive(Clone, Debug)]
pub enum Embedder {
    /// A model run in this process (local mode, tests, or a gateway that holds one).
    #[cfg(feature = "local-embeddings")]
    Local(Arc<MiniLm>),
    /// An OpenAI-compatible endpoint (production).
    Remote(RemoteEmbeddings),
    /// The gateway service's embedder, asked by a runner pod for its run (the pod holds no
    /// model and no endpoint credential).
    Gateway(GatewayEmbeddings),
}

impl Embedder {
    /// Names the model, so embeddings made by two models are never mixed or shared.
    pub fn id(&self) -> String {
        match self {
            #[cfg(feature = "local-embeddings")]
            Self::Local(model) => model.id().to_owned(),
            Self::Remote(remote) => format!("openai:{}", remote.model),
            Self::Gateway(gateway) => gateway.model.clone(),
        }
    }

    /// The embeddings of `texts`, in order.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Embedding>, EmbeddingError> {
        match self {
            #[cfg(feature = "local-embeddings")]
            Self::Local(model) => {
                let model = model.clone();
                let texts = texts.to_vec();
                // Inference is CPU work: off the async workers.
                tokio::task::spawn_blocking(move || texts.iter().map(|t| model.embed(t)).collect())
                    .await
                    .map_err(|e| EmbeddingError::Inference(e.to_string()))?
            }
            Self::Remote(remote) => remote.embed(texts).await,
            Self::Gateway(gateway) => gateway.embed(texts).await,
        }
    }
}

/// Where a runner pod asks the gateway service for embeddings: `GET` names the service's model
/// (or none), `POST` embeds texts for the caller's run (see `gateway::service::embeddings_api`).
pub const GATEWAY_EMBEDDINGS_PATH: &str = "/v1/run/embeddings";

/// The most texts a runner sends the gateway in one request (the service refuses more).
pub const GATEWAY_BATCH: usize = 64;

/// The longest text the gateway embeds; a runner sends the start of a longer one (an in-process
/// model reads the first 128 word pieces anyway).
pub const GATEWAY_MAX_TEXT_BYTES: usize = 16 << 10;

/// `GET` [`GATEWAY_EMBEDDINGS_PATH`]: the model the service embeds with, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayModel {
    pub model: Option<String>,
}

/// `POST` [`GATEWAY_EMBEDDINGS_PATH`]: texts to embed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayEmbedRequest {
    pub input: Vec<String>,
}

/// The answer to a [`GatewayEmbedRequest`]: the model that embedded them and one vector per
/// text, in the request's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayEmbedAnswer {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
}

/// A runner pod's client of its gateway service's embeddings, for its own run.
#[derive(Clone, Debug)]
pub struct GatewayEmbeddings {
    records: crate::records::store::remote::RemoteStore,
    /// The service's model, as it named it when asked: answers from another model (a replica
    /// configured differently) are refused, so one run's vectors are never mixed.
    model: String,
}

impl GatewayEmbeddings {
    /// The gateway's embeddings for the run `records` is scoped to, if the service has a model.
    pub async fn ask(
        records: &crate::records::store::remote::RemoteStore,
    ) -> Result<Option<Self>, EmbeddingError> {
        let answer: GatewayModel = records
            .get_json(GATEWAY_EMBEDDINGS_PATH)
            .await
            .map_err(|e| gateway_unreachable(records, e))?;
        Ok(answer.model.map(|model| Self {
            records: records.clone(),
            model,
        }))
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Embedding>, EmbeddingError> {
        let mut all = Vec::with_capacity(texts.len());
        for batch in texts.chunks(GATEWAY_BATCH) {
            let request = GatewayEmbedRequest {
                input: batch
                    .iter()
                    .map(|t| {
                        let mut end = t.len().min(GATEWAY_MAX_TEXT_BYTES);
                        while !t.is_char_boundary(end) {
                            end -= 1;
                        }
                        t[..end].to_owned()
                    })
                    .collect(),
            };
            let answer: GatewayEmbedAnswer = self
                .records
                .post_json(GATEWAY_EMBEDDINGS_PATH, &request)
                .await
                .map_err(|e| gateway_unreachable(&self.records, e))?;
            let malformed = |detail: String| EmbeddingError::Malformed {
                endpoint: self.records.base().to_owned(),
                detail,
            };
            if answer.model != self.model {
                return Err(malformed(format!(
                    "embedded by {} where this run embeds with {}",
                    answer.model, self.model
                )));
            }
            if answer.embeddings.len() != batch.len() {
                return Err(malformed(format!(
                    "{} embeddings for {} texts",
                    answer.embeddings.len(),
                    batch.len()
                )));
            }
            all.extend(answer.embeddings.into_iter().map(Embedding::normalized));
        }
        if all.windows(2).any(|w| w[0].width() != w[1].width())
            || all
                .first()
                .is_some_and(|e| e.width() == 0 || e.width() > MAX_WIDTH)
        {
            return Err(EmbeddingError::Malformed {
                endpoint: self.records.base().to_owned(),
                detail: format!("embeddings must all have one width of 1 to {MAX_WIDTH} dimensions"),
            });
        }
        Ok(all)
    }
}

/// What a request to the gateway's embeddings came to, as an [`EmbeddingError`].
fn gateway_unreachable(
    records: &crate::records::store::remote::RemoteStore,
    error: crate::records::store::remote::RemoteError,
) -> EmbeddingError {
    use crate::records::store::remote::RemoteError;
    let endpoint = format!("{}{GATEWAY_EMBEDDINGS_PATH}", records.base());
    match error {
        RemoteError::Refused { status, error, .. } => EmbeddingError::Status {
            endpoint,
            status,
            body: error,
        },
        RemoteError::Malformed(detail) => EmbeddingError::Malformed { endpoint, detail },
        other => EmbeddingError::Unreachable {
            endpoint,
            detail: other.to_string(),
        },
    }
}

/// A client of `POST {endpoint}/embeddings`.
#[derive(Clone)]
pub struct RemoteEmbeddings {
    endpoint: String,
    model: String,
    api_key: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
}

impl std::fmt::Debug for RemoteEmbeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the API key.
        f.debug_struct("RemoteEmbeddings")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The longest answer read, in bytes: 2,048 texts of 3,072 dimensions written as JSON fit.
const MAX_RESPONSE_BYTES: usize = 128 << 20;

/// The widest embedding accepted (the widest common models give 3,072 dimensions).
const MAX_WIDTH: usize = 8192;

/// The most texts sent in one request (endpoints cap batches; OpenAI at 2,048).
const BATCH: usize = 256;

impl RemoteEmbeddings {
    /// `endpoint` is the API base, e.g. `https://api.openai.com/v1`.
    pub fn new(endpoint: &str, model: &str, api_key: Option<String>, timeout: Duration) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            api_key,
            http: crate::http::client(),
            timeout,
        }
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Embedding>, EmbeddingError> {
        let mut all: Vec<Embedding> = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            let embedded = self.embed_batch(batch).await?;
            if let (Some(first), Some(next)) = (all.first(), embedded.first())
                && first.width() != next.width()
            {
                return Err(self.malformed("embeddings of different widths across requests".into()));
            }
            all.extend(embedded);
        }
        Ok(all)
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Embedding>, EmbeddingError> {
        let url = format!("{}/embeddings", self.endpoint);
        let mut call = self
            .http
            .post(&url)
            .timeout(self.timeout)
            .json(&json!({"model": self.model, "input": texts}));
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        let unreachable = |e: reqwest::Error| EmbeddingError::Unreachable {
            endpoint: self.endpoint.clone(),
            detail: e.to_string(),
        };
        let mut response = call.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
                return Err(self.malformed(format!("the answer is longer than {MAX_RESPONSE_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&status) {
            return Err(EmbeddingError::Status {
                endpoint: self.endpoint.clone(),
                status,
                body: String::from_utf8_lossy(&body).chars().take(512).collect(),
            });
        }
        parse(&body, texts.len()).map_err(|detail| self.malformed(detail))
    }

    fn malformed(&self, detail: String) -> EmbeddingError {
        EmbeddingError::Malformed {
            endpoint: self.endpoint.clone(),
            detail,
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    index: usize,
    embedding: Vec<f32>,
}

/// The embeddings of an answer in the order of the request: exactly one per text, all of one
/// width, whatever order the endpoint listed them in.
fn parse(body: &[u8], expected: usize) -> Result<Vec<Embedding>, String> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if answer.data.len() != expected {
        return Err(format!("{} embeddings for {expected} texts", answer.data.len()));
    }
    let mut slots: Vec<Option<Embedding>> = vec![None; expected];
    for item in answer.data {
        let slot = slots
            .get_mut(item.index)
            .ok_or_else(|| format!("an embedding for text {} of {expected}", item.index))?;
        if slot.replace(Embedding::normalized(item.embedding)).is_some() {
            return Err(format!("two embeddings for text {}", item.index));
        }
    }
    let embeddings: Vec<Embedding> = slots.into_iter().flatten().collect();
    if embeddings.windows(2).any(|w| w[0].width() != w[1].width()) {
        return Err("embeddings of different widths".into());
    }
    if embeddings
        .first()
        .is_some_and(|e| e.width() == 0 || e.width() > MAX_WIDTH)
    {
        return Err(format!("embeddings must have 1 to {MAX_WIDTH} dimensions"));
    }
    Ok(embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_unit_vectors_and_similarity_is_their_cosine() {
        let a = Embedding::normalized(vec![3.0, 4.0]);
        assert_eq!(a, Embedding(vec![0.6, 0.8]));
        let b = Embedding::normalized(vec![4.0, 3.0]);
        assert!((a.similarity(&b) - 0.96).abs() < 1e-6);
        assert_eq!(Embedding::normalized(vec![0.0, 0.0]).similarity(&a), 0.0);
        assert_eq!(
            Embedding::normalized(vec![f32::NAN, 1.0]),
            Embedding(vec![0.0, 0.0])
        );
        assert_eq!(a.similarity(&Embedding::normalized(vec![1.0])), 0.0);
    }

    #[test]
    fn an_answer_is_put_back_in_the_order_of_the_request() {
        let body = br#"{"data": [{"index": 1, "embedding": [0, 2]}, {"index": 0, "embedding": [5, 0]}]}"#;
        let got = parse(body, 2).expect("parses");
        assert_eq!(got, vec![Embedding(vec![1.0, 0.0]), Embedding(vec![0.0, 1.0])]);
    }

    #[test]
    fn an_answer_that_does_not_fit_the_request_is_refused() {
        let cases: [(&[u8], &str); 5] = [
            (
                br#"{"data": [{"index": 0, "embedding": [1]}]}"#,
                "1 embeddings for 2 texts",
            ),
            (
                br#"{"data": [{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [1]}]}"#,
                "two embeddings",
            ),
            (
                br#"{"data": [{"index": 0, "embedding": [1]}, {"index": 7, "embedding": [1]}]}"#,
                "text 7 of 2",
            ),
            (
                br#"{"data": [{"index": 0, "embedding": [1]}, {"index": 1, "embedding": [1, 2]}]}"#,
                "different widths",
            ),
            (br#"{"error": "quota"}"#, "missing field"),
        ];
        for (body, expected) in cases {
            let problem = parse(body, 2).expect_err("refused");
            assert!(problem.contains(expected), "{problem}");
        }
    }
}
