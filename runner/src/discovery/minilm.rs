//! A sentence-embedding model of the BERT family run in-process (all-MiniLM-L6-v2 by default,
//! fetched by `runner/models/all-minilm-l6-v2.sh`): ONNX weights evaluated by tract, a pure-Rust
//! inference library, so local mode and tests need no embedding service.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tract_onnx::prelude::*;

use super::embedding::{Embedding, EmbeddingError};
use super::wordpiece::WordPiece;

/// Word pieces per text the model reads (its tokenizer's own truncation): longer text is cut.
pub const MAX_TOKENS: usize = 128;

/// The model's files in a directory: `model.onnx` (inputs `input_ids`, `attention_mask`,
/// `token_type_ids`; first output the last hidden state) and `tokenizer.json`.
#[derive(Debug)]
pub struct MiniLm {
    plan: std::sync::Arc<TypedRunnableModel>,
    tokenizer: WordPiece,
    /// Names the model in records and caches: its directory's last components and the
    /// digest of its weights, so two different models never share cached embeddings.
    id: String,
}

impl MiniLm {
    /// Loads and optimises the model in `dir` (about a second for all-MiniLM-L6-v2).
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
        let plan = optimise(&weights).map_err(|e| problem("model.onnx", format!("{e:#}")))?;
        Ok(Self { plan, tokenizer, id })
    }

    /// What records and caches call this model.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The unit-length embedding of `text` (its first [`MAX_TOKENS`] word pieces): the mean
    /// of the model's last hidden state over the tokens, as the model was trained to be used.
    pub fn embed(&self, text: &str) -> Result<Embedding, EmbeddingError> {
        let ids: Vec<i64> = self
            .tokenizer
            .encode(text, MAX_TOKENS)
            .into_iter()
            .map(i64::from)
            .collect();
        let n = ids.len();
        let tensor = |values: Vec<i64>| -> TractResult<TValue> {
            Ok(tract_ndarray::Array2::from_shape_vec((1, n), values)?
                .into_tensor()
                .into())
        };
        let run = || -> TractResult<Vec<f32>> {
            let outputs = self.plan.run(tvec!(
                tensor(ids.clone())?,
                tensor(vec![1; n])?,
                tensor(vec![0; n])?
            ))?;
            let Some(first) = outputs.first() else {
                anyhow::bail!("the model has no output");
            };
            let hidden = first.to_plain_array_view::<f32>()?;
            let shape = hidden.shape().to_vec();
            let [1, tokens, width] = shape[..] else {
                anyhow::bail!("the model's first output has shape {shape:?}, not [1, tokens, width]");
            };
            if tokens == 0 || width == 0 {
                anyhow::bail!("the model's first output is empty ({shape:?})");
            }
            let Some(values) = hidden.as_slice() else {
                anyhow::bail!("the model's first output is not laid out contiguously");
            };
            let mut mean = vec![0f32; width];
            for row in values.chunks_exact(width) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= tokens as f32);
            Ok(mean)
        };
        run()
            .map(Embedding::normalized)
            .map_err(|e| EmbeddingError::Inference(format!("{e:#}")))
    }
}

fn optimise(weights: &[u8]) -> TractResult<std::sync::Arc<TypedRunnableModel>> {
    let mut model = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(weights))?;
    let tokens = model.symbols.sym("tokens");
    for input in 0..3 {
        let shape = ShapeFact::from(&[TDim::from(1i64), TDim::from(tokens.clone())]);
        model = model.with_input_fact(input, i64::fact(shape).into())?;
    }
    model.into_optimized()?.into_runnable()
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
