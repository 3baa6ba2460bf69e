//! A BERT-family sentence encoder (all-MiniLM-L6-v2 and its kind), evaluated directly: the
//! architecture is written out below and the weights come from the model's ONNX export, read by
//! `onnx.rs`. One text at a time, so there is no padding and no attention mask; the projections,
//! nearly all of the work, are `dense.rs`'s.
//!
//! The weights are found by the names Hugging Face's ONNX export gives them: named biases and
//! layer norms (`encoder.layer.3.attention.self.query.bias`), and the projection matrices as the
//! second input of the `MatMul` whose output is named for the projection
//! (`/encoder/layer.3/attention/self/query/MatMul_output_0`). The number of attention heads is
//! read from the graph too: it divides the scores by √(head width).

use super::dense::Dense;
use super::onnx::{Graph, OnnxError, Tensor};

/// The epsilon BERT's layer norms use.
const LAYER_NORM_EPSILON: f32 = 1e-12;

/// The encoder's weights, laid out for one text at a time.
#[derive(Debug)]
pub struct Encoder {
    hidden: usize,
    /// `vocabulary × hidden`.
    word: Vec<f32>,
    /// `positions × hidden`.
    position: Vec<f32>,
    /// The embedding of token type 0 (one text, one segment).
    segment: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
}

#[derive(Debug)]
struct Layer {
    /// Query, key and value projections side by side: one pass instead of three.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

#[derive(Debug)]
struct Norm {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Encoder {
    /// The encoder whose weights the ONNX file `bytes` holds.
    pub fn from_onnx(bytes: &[u8]) -> Result<Self, OnnxError> {
        Self::from_graph(super::onnx::read(bytes)?)
    }

    /// The encoder whose weights `graph` holds.
    fn from_graph(mut graph: Graph) -> Result<Self, OnnxError> {
        let (word, [_, hidden]) = matrix(take(&mut graph, "embeddings.word_embeddings.weight")?)?;
        let (position, [_, position_width]) =
            matrix(take(&mut graph, "embeddings.position_embeddings.weight")?)?;
        let (segments, [segment_count, segment_width]) =
            matrix(take(&mut graph, "embeddings.token_type_embeddings.weight")?)?;
        if hidden == 0 || position_width != hidden || segment_width != hidden || segment_count == 0 {
            return Err(OnnxError::new("the embedding tables differ in width"));
        }
        let embedding_norm = norm(&mut graph, "embeddings.LayerNorm", hidden)?;
        let heads = heads(&graph, hidden)?;
        let mut layers = Vec::new();
        while graph.initializers.contains_key(&format!(
            "encoder.layer.{}.attention.self.query.bias",
            layers.len()
        )) {
            layers.push(layer(&mut graph, layers.len(), hidden)?);
        }
        if layers.is_empty() {
            return Err(OnnxError::new("the model has no encoder layers"));
        }
        Ok(Self {
            hidden,
            word,
            position,
            segment: segments[..hidden].to_vec(),
            embedding_norm,
            layers,
            heads,
        })
    }

    /// How many word pieces the position table covers.
    pub fn max_tokens(&self) -> usize {
        self.position.len() / self.hidden
    }

    /// The vocabulary's size: every id given to [`Encoder::mean_hidden`] must be below it.
    pub fn vocabulary(&self) -> usize {
        self.word.len() / self.hidden
    }

    /// The mean of the last hidden state over the word pieces `ids` (at most
    /// [`Encoder::max_tokens`], each below [`Encoder::vocabulary`]; `None` otherwise).
    pub fn mean_hidden(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let hidden = self.hidden;
        if ids.is_empty() || ids.len() > self.max_tokens() {
            return None;
        }
        let mut x = Vec::with_capacity(ids.len() * hidden);
        for (t, &id) in ids.iter().enumerate() {
            let id = usize::try_from(id).ok().filter(|id| *id < self.vocabulary())?;
            let word = &self.word[id * hidden..(id + 1) * hidden];
            let position = &self.position[t * hidden..(t + 1) * hidden];
            x.extend(
                word.iter()
                    .zip(position)
                    .zip(&self.segment)
                    .map(|((w, p), s)| w + p + s),
            );
        }
        self.embedding_norm.apply(&mut x);
        for layer in &self.layers {
            x = layer.forward(&x, self.heads);
        }
        let mut mean = vec![0.0; hidden];
        for row in x.chunks_exact(hidden) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= ids.len() as f32);
        Some(mean)
    }
}

impl Layer {
    /// One encoder layer over `x` (`tokens × hidden`).
    fn forward(&self, x: &[f32], heads: usize) -> Vec<f32> {
        let hidden = self.attention_out.outputs();
        let tokens = x.len() / hidden;
        let width = hidden / heads;
        let qkv = self.qkv.apply(x);
        let row = |t: usize, part: usize, head: usize| {
            let start = t * 3 * hidden + part * hidden + head * width;
            &qkv[start..start + width]
        };
        let scale = 1.0 / (width as f32).sqrt();
        let mut context = vec![0.0; tokens * hidden];
        // Small loops, many of them: compiled for the CPU's vectors (`pulp` dispatches).
        pulp::Arch::new().dispatch(|| {
            let mut scores = vec![0.0; tokens];
            for head in 0..heads {
                for t in 0..tokens {
                    let q = row(t, 0, head);
                    for (u, score) in scores.iter_mut().enumerate() {
                        *score = dot(q, row(u, 1, head));
                    }
                    softmax(&mut scores, scale);
                    let out = &mut context[t * hidden + head * width..t * hidden + (head + 1) * width];
                    for (u, weight) in scores.iter().enumerate() {
                        out.iter_mut()
                            .zip(row(u, 2, head))
                            .for_each(|(o, v)| *o += weight * v);
                    }
                }
            }
        });
        let mut x: Vec<f32> = add(x, &self.attention_out.apply(&context));
        self.attention_norm.apply(&mut x);
        let mut inner = self.intermediate.apply(&x);
        gelu(&mut inner);
        let mut x = add(&x, &self.output.apply(&inner));
        self.output_norm.apply(&mut x);
        x
    }
}

/// `a · b`, summed in eight lanes so that it vectorises (a float sum in order does not).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The sum of `values`, in eight lanes (see [`dot`]).
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for k in 0..8 {
            lanes[k] += chunk[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
}

impl Norm {
    /// Normalises each row of `x` (rows as wide as this norm), in place.
    fn apply(&self, x: &mut [f32]) {
        pulp::Arch::new().dispatch(|| {
            for row in x.chunks_exact_mut(self.scale.len()) {
                let n = row.len() as f32;
                let mean = sum(row) / n;
                row.iter_mut().for_each(|v| *v -= mean);
                let variance = dot(row, row) / n;
                let inverse = 1.0 / (variance + LAYER_NORM_EPSILON).sqrt();
                row.iter_mut()
                    .zip(self.scale.iter().zip(&self.shift))
                    .for_each(|(v, (scale, shift))| *v = *v * inverse * scale + shift);
            }
        });
    }
}

/// `row · scale`, then softmax, in place.
fn softmax(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v * scale - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

/// BERT's exact GELU, `x · Φ(x)`, over `values` in place (SIMD where the CPU has it).
fn gelu(values: &mut [f32]) {
    pulp::Arch::new().dispatch(|| {
        for v in values.iter_mut() {
            let x = *v;
            *v = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// The error function to within 3e-7 (Abramowitz and Stegun 7.1.28): additions and
/// multiplications only, so the loop above vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let p = 1.0
        + z * (0.070_523_08
            + z * (0.042_282_01
                + z * (0.009_270_527 + z * (0.000_152_014_3 + z * (0.000_276_567_2 + z * 0.000_043_063_8)))));
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    let y = 1.0 - 1.0 / (p8 * p8);
    if x < 0.0 { -y } else { y }
}

fn layer(graph: &mut Graph, index: usize, hidden: usize) -> Result<Layer, OnnxError> {
    let (q, q_bias) = projection(graph, index, "attention.self.query", hidden, hidden)?;
    let (k, k_bias) = projection(graph, index, "attention.self.key", hidden, hidden)?;
    let (v, v_bias) = projection(graph, index, "attention.self.value", hidden, hidden)?;
    // Query, key and value side by side in each row: `x · [Q K V]`.
    let weight: Vec<f32> = (0..hidden)
        .flat_map(|i| {
            let row = i * hidden..(i + 1) * hidden;
            [&q[row.clone()], &k[row.clone()], &v[row]].concat()
        })
        .collect();
    let qkv = Dense::new(&weight, hidden, 3 * hidden, [q_bias, k_bias, v_bias].concat())
        .ok_or_else(|| OnnxError::new(format!("layer {index}'s attention cannot be packed")))?;
    let attention_out = dense(graph, index, "attention.output.dense", hidden, hidden)?;
    let intermediate_width = graph
        .initializers
        .get(&format!("encoder.layer.{index}.intermediate.dense.bias"))
        .map_or(0, |t| t.values.len());
    let intermediate = dense(graph, index, "intermediate.dense", hidden, intermediate_width)?;
    let output = dense(graph, index, "output.dense", intermediate_width, hidden)?;
    Ok(Layer {
        qkv,
        attention_out,
        attention_norm: norm(
            graph,
            &format!("encoder.layer.{index}.attention.output.LayerNorm"),
            hidden,
        )?,
        intermediate,
        output,
        output_norm: norm(graph, &format!("encoder.layer.{index}.output.LayerNorm"), hidden)?,
    })
}

/// A projection of layer `index`, its weight `[inputs, outputs]` (`x · weight + bias`), as
/// `(weight, bias)`.
fn projection(
    graph: &mut Graph,
    index: usize,
    part: &str,
    inputs: usize,
    outputs: usize,
) -> Result<(Vec<f32>, Vec<f32>), OnnxError> {
    let product = format!(
        "/encoder/layer.{index}/{}/MatMul_output_0",
        part.replace('.', "/")
    );
    let weight_name = graph
        .producer(&product)
        .filter(|node| node.op_type == "MatMul")
        .and_then(|node| node.inputs.get(1))
        .cloned()
        .ok_or_else(|| OnnxError::new(format!("the model has no MatMul named {product}")))?;
    let (weight, shape) = matrix(take(graph, &weight_name)?)?;
    let bias = vector(take(graph, &format!("encoder.layer.{index}.{part}.bias"))?)?;
    if shape != [inputs, outputs] || bias.len() != outputs {
        return Err(OnnxError::new(format!(
            "layer {index}'s {part} has shape {shape:?}, not [{inputs}, {outputs}]"
        )));
    }
    Ok((weight, bias))
}

fn dense(
    graph: &mut Graph,
    index: usize,
    part: &str,
    inputs: usize,
    outputs: usize,
) -> Result<Dense, OnnxError> {
    let (weight, bias) = projection(graph, index, part, inputs, outputs)?;
    Dense::new(&weight, inputs, outputs, bias)
        .ok_or_else(|| OnnxError::new(format!("layer {index}'s {part} cannot be packed")))
}

/// The number of attention heads: the first layer divides its attention scores by the square
/// root of a head's width.
fn heads(graph: &Graph, hidden: usize) -> Result<usize, OnnxError> {
    let scores = "/encoder/layer.0/attention/self/MatMul_output_0";
    let divisor = graph
        .nodes
        .iter()
        .filter(|node| node.op_type == "Div" && node.inputs.first().is_some_and(|i| i == scores))
        .find_map(|node| graph.producer(node.inputs.get(1)?)?.constant)
        .ok_or_else(|| OnnxError::new("cannot find how the first layer scales its attention"))?;
    let width = (divisor * divisor).round();
    if !(1.0..=hidden as f64).contains(&width) || !hidden.is_multiple_of(width as usize) {
        return Err(OnnxError::new(format!(
            "an attention scale of {divisor} does not divide the width {hidden} into heads"
        )));
    }
    Ok(hidden / width as usize)
}

fn norm(graph: &mut Graph, prefix: &str, hidden: usize) -> Result<Norm, OnnxError> {
    let scale = vector(take(graph, &format!("{prefix}.weight"))?)?;
    let shift = vector(take(graph, &format!("{prefix}.bias"))?)?;
    if scale.len() != hidden || shift.len() != hidden {
        return Err(OnnxError::new(format!("{prefix} is not {hidden} wide")));
    }
    Ok(Norm { scale, shift })
}

fn take(graph: &mut Graph, name: &str) -> Result<Tensor, OnnxError> {
    graph
        .initializers
        .remove(name)
        .ok_or_else(|| OnnxError::new(format!("the model has no weights named {name}")))
}

/// A matrix's values (row-major) and shape.
fn matrix(tensor: Tensor) -> Result<(Vec<f32>, [usize; 2]), OnnxError> {
    match tensor.dims[..] {
        [rows, columns] => Ok((tensor.values, [rows, columns])),
        _ => Err(OnnxError::new(format!(
            "expected a matrix, found shape {:?}",
            tensor.dims
        ))),
    }
}

fn vector(tensor: Tensor) -> Result<Vec<f32>, OnnxError> {
    match tensor.dims[..] {
        [_] => Ok(tensor.values),
        _ => Err(OnnxError::new(format!(
            "expected a vector, found shape {:?}",
            tensor.dims
        ))),
    }
}
