//! Semantic tool discovery: which of an Agent's tools a model turn is offered, resolved from
//! the turn's intent (the request, the plan so far, the last results) rather than the whole
//! catalog every time.
//!
//! Tools are scored by embedding similarity ([`embedding`]: a model in-process or an
//! OpenAI-compatible endpoint) or, as the baseline and the fallback when no model is at hand or
//! it fails, by BM25 ([`bm25`]); [`select`] then picks what is offered under the Agent's
//! limits. The engine records the selection with its scores, and a replay offers what was
//! recorded, so what a turn saw never depends on a model that may have changed since.

pub mod bm25;
pub mod embedding;
#[cfg(feature = "local-embeddings")]
pub mod minilm;
pub mod select;
#[cfg(feature = "local-embeddings")]
mod wordpiece;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use self::{
    bm25::Bm25Index,
    embedding::{Embedder, Embedding, EmbeddingError},
    select::Candidate,
};
use crate::model::ToolSpec;

/// A tool as discovery reads it: what the model is shown, and the requests its author says it
/// serves (`examples`, never shown to the model).
#[derive(Clone, Debug, PartialEq)]
pub struct Discoverable {
    pub spec: ToolSpec,
    pub examples: Vec<String>,
}

impl Discoverable {
    /// The texts a tool is embedded by: its document, then each example.
    fn texts(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(document(&self.spec)).chain(self.examples.iter().cloned())
    }
}

/// How much keywords weigh beside embeddings (see [`ToolIndex::resolved_scores`]): measured on
/// the labelled set of `runner/benches/discovery`, where it moves recall@5 by about five points
/// over embeddings alone and more weight starts to cost.
const KEYWORD_WEIGHT: f32 = 0.1;

/// An Agent's tools, ready to be scored against intents.
#[derive(Debug)]
pub struct ToolIndex {
    names: Vec<String>,
    schema_tokens: Vec<u32>,
    bm25: Bm25Index,
    /// Per tool, the embeddings of its texts (see [`Discoverable::texts`]) and the model that
    /// made them, once computed.
    vectors: Option<(String, Vec<Vec<Embedding>>)>,
}

/// The text a tool is found by: its name in words, its description, and its arguments' names
/// and descriptions (what a person reading the catalog would go by).
pub fn document(tool: &ToolSpec) -> String {
    let mut text = tool.name.replace(['-', '_'], " ");
    text.push_str(". ");
    text.push_str(&tool.description);
    if let Some(properties) = tool.parameters.get("properties").and_then(|p| p.as_object()) {
        text.push_str(" Arguments:");
        for (name, schema) in properties {
            text.push(' ');
            text.push_str(&name.replace(['-', '_'], " "));
            if let Some(about) = schema.get("description").and_then(|d| d.as_str()) {
                text.push_str(" (");
                text.push_str(about);
                text.push(')');
            }
            text.push(',');
        }
        text.pop();
        text.push('.');
    }
    text
}

/// What offering `tool` costs: tokens of its name, description and schema, counted with the
/// tokenizer every budget is counted with.
pub fn schema_tokens(tool: &ToolSpec) -> u32 {
    let text = serde_json::json!({
        "name": tool.name, "description": tool.description, "parameters": tool.parameters,
    })
    .to_string();
    let tokens = crate::context::tokenizer().count(&text);
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

impl ToolIndex {
    /// An index over `tools` that scores with BM25 (over each tool's document and examples)
    /// until [`ToolIndex::embedded`] adds vectors.
    pub fn new(tools: &[Discoverable]) -> Self {
        let documents: Vec<String> = tools
            .iter()
            .map(|t| t.texts().collect::<Vec<_>>().join("\n"))
            .collect();
        Self {
            names: tools.iter().map(|t| t.spec.name.clone()).collect(),
            schema_tokens: tools.iter().map(|t| schema_tokens(&t.spec)).collect(),
            bm25: Bm25Index::new(documents.iter().map(String::as_str)),
            vectors: None,
        }
    }

    /// The index with the embeddings of every tool's texts by `embedder`.
    pub async fn embedded(
        mut self,
        tools: &[Discoverable],
        embedder: &Embedder,
    ) -> Result<Self, EmbeddingError> {
        let counts: Vec<usize> = tools.iter().map(|t| 1 + t.examples.len()).collect();
        let texts: Vec<String> = tools.iter().flat_map(Discoverable::texts).collect();
        let mut flat = embedder.embed(&texts).await?.into_iter();
        let vectors = counts.iter().map(|n| flat.by_ref().take(*n).collect()).collect();
        self.vectors = Some((embedder.id(), vectors));
        Ok(self)
    }

    /// Whether the tools' texts were embedded by `model`.
    pub fn is_embedded_by(&self, model: &str) -> bool {
        self.vectors.as_ref().is_some_and(|(by, _)| by == model)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Each tool as [`select::select`] takes it, with `scores` in index order.
    pub fn candidates<'a>(&'a self, scores: &[f32]) -> Vec<Candidate<'a>> {
        self.names
            .iter()
            .zip(&self.schema_tokens)
            .zip(scores.iter().chain(std::iter::repeat(&0.0)))
            .map(|((name, tokens), score)| Candidate {
                name,
                score: *score,
                schema_tokens: *tokens,
            })
            .collect()
    }

    /// BM25 scores of every tool for `intent`.
    pub fn keyword_scores(&self, intent: &str) -> Vec<f32> {
        self.bm25.scores(intent)
    }

    /// For every tool, how close its texts are to `intent`'s embedding: the mean of the best
    /// cosine similarity of one of them and of their average similarity (one example that
    /// happens to match counts, a tool all of whose texts fit counts more), if this index holds
    /// vectors made by the same model.
    pub fn semantic_scores(&self, intent: &Embedding, model: &str) -> Option<Vec<f32>> {
        let (made_by, vectors) = self.vectors.as_ref()?;
        (made_by == model).then(|| {
            vectors
                .iter()
                .map(|texts| {
                    let similarities = texts.iter().map(|v| v.similarity(intent));
                    let (best, sum) =
                        similarities.fold((f32::MIN, 0.0), |(best, sum), s| (best.max(s), sum + s));
                    (best + sum / texts.len().max(1) as f32) / 2.0
                })
                .collect()
        })
    }

    /// What the embeddings resolver ranks by: [`ToolIndex::semantic_scores`], with a tenth of
    /// the BM25 score (scaled to the best tool's) added so that shared rare words break
    /// near-ties between tools the model finds alike.
    pub fn resolved_scores(&self, intent_text: &str, intent: &Embedding, model: &str) -> Option<Vec<f32>> {
        let semantic = self.semantic_scores(intent, model)?;
        let keyword = self.keyword_scores(intent_text);
        let top = keyword.iter().copied().fold(0.0f32, f32::max).max(f32::EPSILON);
        Some(
            semantic
                .iter()
                .zip(&keyword)
                .map(|(s, k)| s + KEYWORD_WEIGHT * k / top)
                .collect(),
        )
    }
}

/// How a turn's tools were scored, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Scoring {
    /// Embedding similarity, by the model named.
    Embeddings { model: String },
    /// BM25 over the tools' text; `fallback` says why not embeddings, when they were wanted.
    Bm25 {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<Fallback>,
    },
}

/// Why a turn that wanted embeddings was scored by BM25 (a code: records of runs about a
/// person hold no free text in the clear; the detail is logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// This runner has no embedding model configured.
    NoModel,
    /// The model or endpoint failed for this intent.
    ModelFailed,
    /// The tools could not be embedded (the model failed while indexing them).
    ToolsNotEmbedded,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoModel => "no embedding model is configured here",
            Self::ModelFailed => "the embedding model failed for this turn",
            Self::ToolsNotEmbedded => "the tools could not be embedded",
        })
    }
}

/// Scores every tool of `index` for `intent`: by embeddings when `embedder` is given and
/// works, else by BM25 (saying why; `wanted`: the Agent asked for embeddings).
pub async fn score(
    index: &ToolIndex,
    embedder: Option<&Embedder>,
    wanted: bool,
    intent: &str,
) -> (Scoring, Vec<f32>) {
    let bm25 = |fallback| (Scoring::Bm25 { fallback }, index.keyword_scores(intent));
    let Some(embedder) = embedder.filter(|_| wanted) else {
        return bm25(wanted.then_some(Fallback::NoModel));
    };
    let model = embedder.id();
    if !index.is_embedded_by(&model) {
        return bm25(Some(Fallback::ToolsNotEmbedded));
    }
    match embedder.embed(&[intent.to_owned()]).await {
        Ok(mut embedded) => match embedded
            .pop()
            .and_then(|e| index.resolved_scores(intent, &e, &model))
        {
            Some(scores) => (Scoring::Embeddings { model }, scores),
            None => bm25(Some(Fallback::ToolsNotEmbedded)),
        },
        Err(error) => {
            tracing::warn!(%error, "tool discovery: the intent could not be embedded; scoring by BM25");
            bm25(Some(Fallback::ModelFailed))
        }
    }
}

/// Tool indexes by bundle digest and model, so a tool catalog is embedded once per promoted
/// bundle rather than once per run; at most [`IndexCache::CAPACITY`] are kept (the oldest
/// built is dropped first).
#[derive(Debug, Default)]
pub struct IndexCache {
    entries: Mutex<Vec<(CacheKey, Arc<ToolIndex>)>>,
}

type CacheKey = (String, Option<String>);

impl IndexCache {
    pub const CAPACITY: usize = 32;

    /// The index of `tools` for the bundle `digest`, embedded by `embedder` when given; built
    /// (and its tools embedded) only if not cached. An embedding failure leaves a BM25-only
    /// index, not cached, so the next run tries again.
    pub async fn get(
        &self,
        digest: &str,
        tools: &[Discoverable],
        embedder: Option<&Embedder>,
    ) -> (Arc<ToolIndex>, Option<EmbeddingError>) {
        let key = (digest.to_owned(), embedder.map(Embedder::id));
        if let Some(found) = self.lookup(&key) {
            return (found, None);
        }
        let plain = ToolIndex::new(tools);
        let (index, problem) = match embedder {
            None => (plain, None),
            Some(embedder) => match ToolIndex::new(tools).embedded(tools, embedder).await {
                Ok(index) => (index, None),
                Err(e) => return (Arc::new(plain), Some(e)),
            },
        };
        let index = Arc::new(index);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= Self::CAPACITY {
            entries.remove(0);
        }
        entries.push((key, index.clone()));
        (index, problem)
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<ToolIndex>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().find(|(k, _)| k == key).map(|(_, i)| i.clone())
    }
}

/// Whether `agent` scores its tools by embeddings (`spec.discovery.resolver`), so its runs need
/// an embedder.
pub fn by_embeddings(agent: &contextos_crds::AgentSpec) -> bool {
    agent
        .discovery
        .as_ref()
        .is_some_and(|d| d.resolver == contextos_crds::agent::DiscoveryResolver::Embeddings)
}

/// The embedder this process is configured with, loaded once: an OpenAI-compatible endpoint
/// (`CONTEXTOS_EMBEDDINGS_URL`, the API base; `CONTEXTOS_EMBEDDINGS_MODEL`, default
/// `text-embedding-3-small`; `CONTEXTOS_EMBEDDINGS_API_KEY`), else the model in the directory
/// `CONTEXTOS_EMBEDDING_MODEL` names (see `runner/models/all-minilm-l6-v2.sh`), else none —
/// discovery then scores by BM25, and records that it did.
pub fn configured_embedder() -> Option<Embedder> {
    static CONFIGURED: std::sync::OnceLock<Option<Embedder>> = std::sync::OnceLock::new();
    CONFIGURED.get_or_init(load_configured).clone()
}

fn load_configured() -> Option<Embedder> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(url) = var("CONTEXTOS_EMBEDDINGS_URL") {
        let model = var("CONTEXTOS_EMBEDDINGS_MODEL").unwrap_or_else(|| "text-embedding-3-small".into());
        return Some(Embedder::Remote(embedding::RemoteEmbeddings::new(
            &url,
            &model,
            var("CONTEXTOS_EMBEDDINGS_API_KEY"),
            std::time::Duration::from_secs(30),
        )));
    }
    #[cfg(feature = "local-embeddings")]
    if let Some(dir) = minilm::configured_dir() {
        match minilm::MiniLm::load(&dir) {
            Ok(model) => return Some(Embedder::Local(Arc::new(model))),
            Err(error) => tracing::warn!(%error, "tool discovery: no embedding model; scoring by BM25"),
        }
    }
    None
}

/// The intent of a turn, from what the run knows so far: the request, the model's last words
/// (its plan), and the tools called last with the start of their results. Each part is cut so
/// that none crowds out the others in the model's few hundred words.
pub fn intent(request: &str, plan: Option<&str>, last_results: &[(&str, &str)]) -> String {
    const PART: usize = 400;
    let cut = |text: &str| text.chars().take(PART).collect::<String>();
    let mut intent = cut(request);
    if let Some(plan) = plan.filter(|p| !p.trim().is_empty()) {
        intent.push('\n');
        intent.push_str(&cut(plan));
    }
    for (tool, result) in last_results.iter().take(4) {
        intent.push('\n');
        intent.push_str(&tool.replace(['-', '_'], " "));
        intent.push_str(": ");
        intent.push_str(&result.chars().take(PART / 4).collect::<String>());
    }
    intent
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tool(name: &str, description: &str) -> Discoverable {
        Discoverable {
            spec: ToolSpec {
                name: name.into(),
                description: description.into(),
                parameters: json!({"type": "object", "properties": {
                    "service": {"type": "string", "description": "Name of the service."},
                    "since_minutes": {"type": "integer"},
                }}),
            },
            examples: Vec::new(),
        }
    }

    #[test]
    fn a_tool_is_found_by_its_name_description_and_arguments() {
        let text = document(&tool("get-pod-logs", "Read the logs of a pod.").spec);
        assert_eq!(
            text,
            "get pod logs. Read the logs of a pod. Arguments: service (Name of the service.), since minutes."
        );
    }

    #[tokio::test]
    async fn without_an_embedder_tools_are_scored_by_keywords() {
        let tools = [
            tool("get-pod-logs", "Read the logs of a pod."),
            tool("list-invoices", "List a customer's invoices."),
        ];
        let index = ToolIndex::new(&tools);
        let (scoring, scores) = score(&index, None, false, "show me the invoices of ACME").await;
        assert_eq!(scoring, Scoring::Bm25 { fallback: None });
        let (scoring, _) = score(&index, None, true, "invoices").await;
        assert_eq!(
            scoring,
            Scoring::Bm25 {
                fallback: Some(Fallback::NoModel)
            }
        );
        assert!(scores[1] > scores[0]);
        assert!(index.schema_tokens.iter().all(|t| *t > 10));
    }

    #[tokio::test]
    async fn a_failing_embeddings_endpoint_falls_back_to_keywords_and_says_why() {
        let tools = [tool("get-pod-logs", "Read the logs of a pod.")];
        let endpoint = embedding::RemoteEmbeddings::new(
            "http://127.0.0.1:9/v1",
            "text-embedding-3-small",
            None,
            std::time::Duration::from_secs(2),
        );
        let embedder = Embedder::Remote(endpoint);
        let cache = IndexCache::default();
        let (index, problem) = cache.get("sha256:abc", &tools, Some(&embedder)).await;
        assert!(matches!(problem, Some(EmbeddingError::Unreachable { .. })));
        // The tools have no vectors: the intent is not sent to be embedded for nothing.
        let (scoring, _) = score(&index, Some(&embedder), true, "pod logs").await;
        assert_eq!(
            scoring,
            Scoring::Bm25 {
                fallback: Some(Fallback::ToolsNotEmbedded)
            }
        );
        // Not cached: the next run tries the endpoint again.
        assert!(
            cache
                .lookup(&("sha256:abc".into(), Some(embedder.id())))
                .is_none()
        );
    }

    #[test]
    fn a_tool_is_also_found_by_the_examples_its_author_gave() {
        let mut invoices = tool("list-invoices", "List a customer's invoices.");
        invoices.examples = vec!["what did ACME pay us last quarter?".into()];
        let tools = [tool("get-pod-logs", "Read the logs of a pod."), invoices];
        let scores = ToolIndex::new(&tools).keyword_scores("what did they pay last quarter");
        assert!(scores[1] > 0.0 && scores[0] == 0.0, "{scores:?}");
    }

    #[test]
    fn each_part_of_an_intent_is_kept_however_long_the_others_are() {
        let long = "x".repeat(10_000);
        let text = intent(
            &long,
            Some("check the logs next"),
            &[("get-pod-logs", "OOMKilled")],
        );
        assert!(text.contains("check the logs next") && text.contains("get pod logs: OOMKilled"));
        assert!(text.len() < 1_000);
    }
}
