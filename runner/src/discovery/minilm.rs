//! A sentence-embedding model of the BERT family run in-process (all-MiniLM-L6-v2 by default,
//! fetched by `runner/models/all-minilm-l6-v2.sh`): the weights of its ONNX export evaluated by
//! the encoder in `bert.rs`, so local mode and tests need no embedding service and no inference
//! runtime.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::embedding::{Embedding, EmbeddingError};
use contextos_encoder::Encoder;

use super::wordpiece::WordPiece;

/// Word pieces per text the model reads (its tokenizer's own truncation): longer text is cut.
pub const MAX_TOKENS: usize = 128;

/// The model's files in a directory: `model.onnx` (a BERT encoder as Hugging Face exports it)
/// and `tokenizer.json`.
#[derive(Debug)]
pub struct MiniLm {
    encoder: Encoder,
    tokenizer: WordPiece,
    /// Names the model in records and caches: its directory's last components and the
    /// digest of its weights, so two different models never share cached embeddings.
    id: String,
}

impl MiniLm {
    /// Loads the model in `dir` (a fraction of a second for all-MiniLM-L6-v2).
    pub fn load(dir: &Path) -> Result<Self, EmbeddingError> {
        let problem = |file: &str, detail: String| EmbeddingError::Model {
            path: dir.join(file),
            detail,
        };
        let tokenizer_json = std::fs::read(dir.join("tokenizer.json"))
            .map_err(|e| problem("tokenizer.json", e.to_string()))?;
        let tokenizer = WordPiece::from_tokenizer_json(&tokenizer_json)
            .map_err(|e| problem("tokenizer.json", e.to_string()))?;
        let weights =
            std::fs::read(dir.join("model.onnx")).map_err(|e| problem("model.onnx", e.to_string()))?;
        let id = format!(
            "local:{}:{}",
            model_name(dir),
            &hex::encode(Sha256::digest(&weights))[..12]
        );
        let encoder = Encoder::from_onnx(&weights).map_err(|e| problem("model.onnx", e.to_string()))?;
        if tokenizer.largest_id() >= encoder.vocabulary() {
            return Err(problem(
                "tokenizer.json",
                format!(
                    "the tokenizer's vocabulary is larger than the model's ({} word pieces)",
                    encoder.vocabulary()
                ),
            ));
        }
        Ok(Self {
            encoder,
            tokenizer,
            id,
        })
    }

    /// What records and caches call this model.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The unit-length embedding of `text` (its first [`MAX_TOKENS`] word pieces): the mean
    /// of the model's last hidden state over the tokens, as the model was trained to be used.
    pub fn embed(&self, text: &str) -> Result<Embedding, EmbeddingError> {
        let ids = self
            .tokenizer
            .encode(text, MAX_TOKENS.min(self.encoder.max_tokens()));
        self.encoder
            .mean_hidden(&ids)
            .map(Embedding::normalized)
            .ok_or_else(|| {
                EmbeddingError::Inference(format!("{} word pieces do not fit the model", ids.len()))
            })
    }
}

/// `all-minilm-l6-v2` for `…/models/all-minilm-l6-v2/<version>`; otherwise the directory's name.
fn model_name(dir: &Path) -> String {
    let parts: Vec<_> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match &parts[..] {
        [version, name] if version.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
            format!("{name}/{version}")
        }
        [name, ..] => name.clone(),
        [] => "model".into(),
    }
}

/// Where the model is looked for when none is named: `CONTEXTOS_EMBEDDING_MODEL`.
pub fn configured_dir() -> Option<PathBuf> {
    std::env::var_os("CONTEXTOS_EMBEDDING_MODEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}
