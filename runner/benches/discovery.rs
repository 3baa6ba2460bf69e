//! Semantic tool discovery: quality and latency, the embedding resolver next to the BM25
//! baseline in the same run.
//!
//! Quality: the labelled set in `runner/benches/discovery/` (tools across domains, with
//! confusable neighbours, and intents each labelled with the one tool that serves it; at least
//! half share no content word with that tool); recall@1, recall@5 and MRR per resolver.
//! Latency: one resolution (embed the intent, score every tool, select) over 1,000 tools whose
//! embeddings are precomputed, as the engine caches them by bundle digest.
//!
//! Run: `cargo bench -p contextos-runner --bench discovery`. The embedding model is fetched
//! once by `runner/models/all-minilm-l6-v2.sh` (or named by CONTEXTOS_EMBEDDING_MODEL).
//! Targets: recall@5 ≥ 0.9 (embeddings), p50 ≤ 5 ms per resolution over 1,000 tools.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Instant};

use contextos_runner::{
    discovery::{
        Discoverable, ToolIndex,
        embedding::{Embedder, Embedding},
        minilm::MiniLm,
        select::{Limits, select},
    },
    model::ToolSpec,
};
use embedding_model::model_dir;
use serde::Deserialize;
use serde_json::json;

#[path = "../tests/support/embedding_model.rs"]
mod embedding_model;

#[derive(Deserialize)]
struct LabelledTool {
    name: String,
    domain: String,
    description: String,
    #[serde(default)]
    parameters: std::collections::BTreeMap<String, String>,
    /// Requests the tool serves, as its author would write them (`examples` of an Agent's tool).
    #[serde(default)]
    examples: Vec<String>,
}

#[derive(Deserialize)]
struct Intent {
    intent: String,
    tool: String,
}

fn main() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/discovery");
    let tools: Vec<LabelledTool> = read_yaml(&data.join("tools.yaml"));
    let intents: Vec<Intent> = read_yaml(&data.join("intents.yaml"));
    let domains: BTreeSet<&str> = tools.iter().map(|t| t.domain.as_str()).collect();
    let described: Vec<Discoverable> = tools.iter().map(|t| spec(t, false)).collect();
    let with_examples: Vec<Discoverable> = tools.iter().map(|t| spec(t, true)).collect();
    let examples: usize = with_examples.iter().map(|t| t.examples.len()).sum();
    let model = Arc::new(MiniLm::load(&model_dir()).expect("the embedding model loads"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let embedder = Embedder::Local(model.clone());

    let started = Instant::now();
    let plain = runtime
        .block_on(ToolIndex::new(&described).embedded(&described, &embedder))
        .expect("tools embed");
    let indexing = started.elapsed();
    let index = runtime
        .block_on(ToolIndex::new(&with_examples).embedded(&with_examples, &embedder))
        .expect("tools embed");
    let intent_vectors: Vec<Embedding> = intents
        .iter()
        .map(|i| model.embed(&i.intent).expect("intent embeds"))
        .collect();

    // Where the labelled tool comes, ties broken by name as the selection breaks them (a
    // resolver that scores many tools alike gets no credit for it).
    let rank_of = |scores: &[f32], label: &str| -> usize {
        let target = described
            .iter()
            .position(|s| s.spec.name == label)
            .expect("label names a tool");
        let ahead = |(i, s): &(usize, &f32)| {
            **s > scores[target] || (**s == scores[target] && described[*i].spec.name.as_str() < label)
        };
        scores.iter().enumerate().filter(ahead).count() + 1
    };
    // Per resolver: description only, then with the tools' examples.
    let mut bm25 = [Quality::default(), Quality::default()];
    let mut embeddings = [Quality::default(), Quality::default()];
    let mut hybrid = [Quality::default(), Quality::default()];
    for (intent, vector) in intents.iter().zip(&intent_vectors) {
        for (i, index) in [&plain, &index].into_iter().enumerate() {
            let keyword = index.keyword_scores(&intent.intent);
            let semantic = index.semantic_scores(vector, &embedder.id()).expect("same model");
            let resolved = index
                .resolved_scores(&intent.intent, vector, &embedder.id())
                .expect("same model");
            bm25[i].add(rank_of(&keyword, &intent.tool));
            embeddings[i].add(rank_of(&semantic, &intent.tool));
            hybrid[i].add(rank_of(&resolved, &intent.tool));
        }
    }
    println!(
        "discovery quality — {} tools in {} domains, {} labelled intents; tools described, then also with their {examples} examples (descriptions embedded in {:.1} s)",
        described.len(),
        domains.len(),
        intents.len(),
        indexing.as_secs_f64()
    );
    println!("  resolver                 tools' text     recall@1  recall@5  MRR");
    for (name, quality) in [
        ("BM25 (baseline)", &bm25),
        ("embeddings only", &embeddings),
        ("embeddings + BM25/10", &hybrid),
    ] {
        for (text, quality) in ["description", "+ examples"].into_iter().zip(quality) {
            println!(
                "  {name:<24} {text:<14} {:>8.3}  {:>8.3}  {:.3}",
                quality.recall(1),
                quality.recall(5),
                quality.mrr()
            );
        }
    }

    latency(&runtime, &described, &embedder, &intents);
}

/// One resolution over 1,000 tools (the labelled ones, repeated under other team prefixes).
fn latency(
    runtime: &tokio::runtime::Runtime,
    tools: &[Discoverable],
    embedder: &Embedder,
    intents: &[Intent],
) {
    let many: Vec<Discoverable> = (0..)
        .flat_map(|team| {
            tools.iter().map(move |t| Discoverable {
                spec: ToolSpec {
                    name: format!("t{team}-{}", t.spec.name),
                    ..t.spec.clone()
                },
                examples: t.examples.clone(),
            })
        })
        .take(1_000)
        .collect();
    let started = Instant::now();
    let index = runtime
        .block_on(ToolIndex::new(&many).embedded(&many, embedder))
        .expect("tools embed");
    let indexing = started.elapsed();
    let limits = Limits {
        top_k: 8,
        schema_tokens: 4_000,
    };
    let none = BTreeSet::new();
    let sample = intents.iter().step_by(intents.len().div_ceil(200).max(1));
    let mut semantic_ms = Vec::new();
    let mut keyword_ms = Vec::new();
    let mut embedding_ms = Vec::new();
    let mut offered_tokens = 0u64;
    for intent in sample {
        let started = Instant::now();
        let (_, scores) = runtime.block_on(contextos_runner::discovery::score(
            &index,
            Some(embedder),
            true,
            &intent.intent,
        ));
        let chosen = select(&index.candidates(&scores), &none, &none, limits);
        semantic_ms.push(started.elapsed().as_secs_f64() * 1e3);
        offered_tokens += index
            .candidates(&scores)
            .iter()
            .filter(|c| chosen.offers(c.name))
            .map(|c| u64::from(c.schema_tokens))
            .sum::<u64>();
        let started = Instant::now();
        let _ = runtime.block_on(embedder.embed(std::slice::from_ref(&intent.intent)));
        embedding_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let scores = index.keyword_scores(&intent.intent);
        let _ = select(&index.candidates(&scores), &none, &none, limits);
        keyword_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let samples = semantic_ms.len();
    let catalog: u64 = index
        .candidates(&[])
        .iter()
        .map(|c| u64::from(c.schema_tokens))
        .sum();
    println!(
        "discovery latency — one resolution over {} tools ({} intents; tool embeddings precomputed in {:.1} s)",
        many.len(),
        samples,
        indexing.as_secs_f64()
    );
    println!(
        "  BM25 (baseline)        p50 {:.2} ms  p95 {:.2} ms",
        percentile(&mut keyword_ms, 0.5),
        percentile(&mut keyword_ms, 0.95)
    );
    println!(
        "  embeddings + BM25/10   p50 {:.2} ms  p95 {:.2} ms   target p50 ≤ 5 ms",
        percentile(&mut semantic_ms, 0.5),
        percentile(&mut semantic_ms, 0.95)
    );
    println!(
        "    of which the intent's embedding  p50 {:.2} ms  p95 {:.2} ms ({} core(s))",
        percentile(&mut embedding_ms, 0.5),
        percentile(&mut embedding_ms, 0.95),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "  tool schema tokens per turn: whole catalog {catalog}, offered (top 8 within 4,000) {} on average",
        offered_tokens / samples.max(1) as u64
    );
}

#[derive(Default)]
struct Quality {
    ranks: Vec<usize>,
}

impl Quality {
    fn add(&mut self, rank: usize) {
        self.ranks.push(rank);
    }

    fn recall(&self, k: usize) -> f64 {
        self.ranks.iter().filter(|r| **r <= k).count() as f64 / self.ranks.len().max(1) as f64
    }

    fn mrr(&self) -> f64 {
        self.ranks.iter().map(|r| 1.0 / *r as f64).sum::<f64>() / self.ranks.len().max(1) as f64
    }
}

fn spec(tool: &LabelledTool, with_examples: bool) -> Discoverable {
    let properties: serde_json::Map<String, serde_json::Value> = tool
        .parameters
        .iter()
        .map(|(name, about)| (name.clone(), json!({"type": "string", "description": about})))
        .collect();
    Discoverable {
        spec: ToolSpec {
            name: tool.name.clone(),
            description: tool.description.clone(),
            parameters: json!({"type": "object", "properties": properties}),
        },
        examples: if with_examples {
            tool.examples.clone()
        } else {
            Vec::new()
        },
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 * p) as usize).min(values.len() - 1)]
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
