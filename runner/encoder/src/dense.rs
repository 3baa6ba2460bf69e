//! The encoder's one heavy operation: a dense projection `x · W + b` of a few dozen token rows
//! by a weight matrix of a few hundred thousand entries, in SIMD picked at run time (AVX2+FMA or
//! AVX-512 on x86-64, NEON on ARM; `pulp` dispatches, safely).
//!
//! Why not a general matrix product: with so few rows, a general one spends most of its time
//! re-packing the weights on every call (reading and writing all 40 MB of them per text).
//! Here they are packed once, at load, into panels of [`PANEL`] output columns, each panel's
//! rows contiguous: one pass over a panel computes those columns for a block of token rows (8
//! with AVX-512, 4 with AVX2), whose inputs are laid out input by input beforehand, and the
//! next block finds the panel in cache (24 KiB for a 384-wide input, in L1; 96 KiB for the
//! 1,536-wide one, in L2).

use pulp::{Arch, Simd, WithSimd};

/// Output columns per panel: one AVX-512 vector, two AVX2 vectors.
const PANEL: usize = 16;

/// A projection with its weights packed for [`Dense::apply`].
#[derive(Debug)]
pub struct Dense {
    /// Shared with the helper threads a product is split over.
    weights: std::sync::Arc<Weights>,
}

#[derive(Debug)]
struct Weights {
    inputs: usize,
    outputs: usize,
    /// `outputs / PANEL` panels (rounded up, the last zero-padded), each `inputs × PANEL`.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    /// Packs `weight` (`inputs × outputs`, row-major: `x · weight`) and `bias` (`outputs`).
    pub fn new(weight: &[f32], inputs: usize, outputs: usize, bias: Vec<f32>) -> Option<Self> {
        if weight.len() != inputs.checked_mul(outputs)?
            || bias.len() != outputs
            || inputs == 0
            || outputs == 0
        {
            return None;
        }
        let count = outputs.div_ceil(PANEL);
        let mut panels = vec![0.0; count * inputs * PANEL];
        for (p, panel) in panels.chunks_exact_mut(inputs * PANEL).enumerate() {
            let first = p * PANEL;
            let width = PANEL.min(outputs - first);
            for (row, packed) in weight.chunks_exact(outputs).zip(panel.chunks_exact_mut(PANEL)) {
                packed[..width].copy_from_slice(&row[first..first + width]);
            }
        }
        Some(Self {
            weights: std::sync::Arc::new(Weights {
                inputs,
                outputs,
                panels,
                bias,
            }),
        })
    }

    pub fn outputs(&self) -> usize {
        self.weights.outputs
    }

    /// `x · W + b` for `x` of `tokens × inputs` (row-major), as `tokens × outputs`. A large
    /// enough product is split by panels over the machine's cores (at most [`MAX_WORKERS`]).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let work = x.len().saturating_mul(self.weights.outputs);
        let workers = if work < SPLIT_ABOVE {
            1
        } else {
            1 + super::pool::pool().helpers()
        };
        self.apply_on(x, workers)
    }

    /// [`Dense::apply`] over at most `workers` threads (this one and the pool's helpers).
    fn apply_on(&self, x: &[f32], workers: usize) -> Vec<f32> {
        let weights = &self.weights;
        let tokens = x.len() / weights.inputs;
        let x = &x[..tokens * weights.inputs];
        let panels = weights.outputs.div_ceil(PANEL);
        let workers = workers.clamp(1, panels);
        if workers == 1 {
            let mut out = vec![0.0; tokens * weights.outputs];
            weights.project(x, 0..panels, &mut out, weights.outputs);
            return out;
        }
        // Each worker fills its own columns (whole panels) of a buffer of its own; the buffers
        // are then laid side by side. The helpers get their own copy of the (small) input.
        let per_worker = panels.div_ceil(workers);
        let shared: std::sync::Arc<[f32]> = x.into();
        let asked: Vec<_> = (per_worker..panels)
            .step_by(per_worker)
            .map(|start| {
                let range = start..(start + per_worker).min(panels);
                let (weights, x) = (weights.clone(), shared.clone());
                let job_range = range.clone();
                (
                    range,
                    super::pool::pool().run(move || weights.part(&x, job_range)),
                )
            })
            .collect();
        let mut parts = vec![(
            0..per_worker.min(panels),
            weights.part(x, 0..per_worker.min(panels)),
        )];
        for (range, answer) in asked {
            // No answer (the job panicked, or no helper ran): this thread computes it, and a bug
            // panics here as it would have there.
            let part =
                super::pool::spin_then_wait(&answer).unwrap_or_else(|_| weights.part(x, range.clone()));
            parts.push((range, part));
        }
        let mut out = vec![0.0; tokens * weights.outputs];
        for (range, part) in parts {
            let first = range.start * PANEL;
            let width = (range.end * PANEL).min(weights.outputs) - first;
            for (target, source) in out
                .chunks_exact_mut(weights.outputs)
                .zip(part.chunks_exact(width))
            {
                target[first..first + width].copy_from_slice(source);
            }
        }
        out
    }
}

impl Weights {
    /// The columns of `panels` for every token, as `tokens × (their width)`.
    fn part(&self, x: &[f32], panels: std::ops::Range<usize>) -> Vec<f32> {
        let width = (panels.end * PANEL).min(self.outputs) - panels.start * PANEL;
        let mut out = vec![0.0; x.len() / self.inputs * width];
        self.project(x, panels, &mut out, width);
        out
    }

    /// Computes the columns of `panels` into `out`, whose rows are `stride` wide and start at
    /// the first of those columns.
    fn project(&self, x: &[f32], panels: std::ops::Range<usize>, out: &mut [f32], stride: usize) {
        Arch::new().dispatch(Project {
            dense: self,
            x,
            panels,
            out,
            stride,
        });
    }
}

/// Products at least this large (multiply-adds) are split over cores: below it, handing work
/// to a helper costs more than it saves (measured on two cores: a text of 18 word pieces embeds
/// in 4.1 ms split above 3 M, 4.2 ms above 1 M or 2 M, 4.5 ms above 6 M, 5.1 ms on one core;
/// with helpers that spin between products, see `pool::SPIN`, 1 M, 2 M and 3 M all embed the
/// benchmark's intents in 3.5–3.8 ms p50 on another two-core machine).
const SPLIT_ABOVE: usize = 3 << 20;
/// At most this many cores work on one product.
const MAX_WORKERS: usize = 4;

/// The cores one product is split over (asked once: the answer reads cgroup files).
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS)
    })
}

struct Project<'a> {
    dense: &'a Weights,
    x: &'a [f32],
    panels: std::ops::Range<usize>,
    out: &'a mut [f32],
    stride: usize,
}

impl WithSimd for Project<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let Project {
            dense,
            x,
            panels,
            out,
            stride,
        } = self;
        let lanes = S::F32_LANES;
        if !PANEL.is_multiple_of(lanes) || PANEL / lanes > 4 {
            return scalar(dense, x, panels, out, stride);
        }
        match PANEL / lanes {
            1 => project::<S, 1, 8>(simd, dense, x, panels, out, stride),
            2 => project::<S, 2, 4>(simd, dense, x, panels, out, stride),
            _ => project::<S, 4, 2>(simd, dense, x, panels, out, stride),
        }
    }
}

/// The columns of `panels` for every token row of `x`, `R` rows at a time, each panel column
/// group `V` vectors wide: `V × R` accumulators (eight, as many as keep two FMA units busy
/// through their latency, and fit the registers with the weights and the broadcast input).
/// The rows past the last block of `R` are a block of their own, as few rows as fit them
/// (1, 2, 4…) with the inputs spread over more accumulator chains: a text of 17 word pieces
/// costs 17 rows of work, not 24.
#[inline(always)]
fn project<S: Simd, const V: usize, const R: usize>(
    simd: S,
    dense: &Weights,
    x: &[f32],
    panels: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let (inputs, outputs) = (dense.inputs, dense.outputs);
    let tokens = x.len() / inputs;
    let (whole, tail) = (tokens / R, tokens % R);
    // Rows of the tail block: a power of two, so that it divides the eight accumulators.
    let tail_rows = if tail == 0 { 0 } else { tail.next_power_of_two() };
    // The token rows by blocks (`R` rows each, then the tail's), each block input-major (its
    // rows' values per input, the rows past the last token zero), so a kernel reads its inputs
    // in order.
    let mut transposed = vec![0.0f32; whole * inputs * R + inputs * tail_rows];
    for (t, row) in x.chunks_exact(inputs).enumerate() {
        let (start, rows, r) = if t < whole * R {
            ((t / R) * inputs * R, R, t % R)
        } else {
            (whole * inputs * R, tail_rows, t - whole * R)
        };
        for (i, value) in row.iter().enumerate() {
            transposed[start + i * rows + r] = *value;
        }
    }
    let (blocks, tail_block) = transposed.split_at(whole * inputs * R);
    let offset = panels.start * PANEL;
    for p in panels {
        let panel = &dense.panels[p * inputs * PANEL..(p + 1) * inputs * PANEL];
        let (weights, _) = S::as_simd_f32s(panel);
        let first = p * PANEL;
        let mut write = |t: usize, acc: &[S::f32s; V]| {
            let width = PANEL.min(outputs - first);
            let mut lane_values = [0.0f32; PANEL];
            let (stored, _) = S::as_mut_simd_f32s(&mut lane_values);
            stored.copy_from_slice(acc);
            let start = t * stride + first - offset;
            let target = &mut out[start..start + width];
            for ((o, v), b) in target.iter_mut().zip(lane_values).zip(&dense.bias[first..]) {
                *o = v + b;
            }
        };
        for (b, block) in blocks.chunks_exact(inputs * R).enumerate() {
            let acc = kernel::<S, V, R, 1>(simd, weights, block);
            for (r, acc) in acc.iter().enumerate() {
                write(b * R + r, acc);
            }
        }
        if tail == 0 {
            continue;
        }
        // As many chains as make eight accumulators with the tail's rows (`V × rows × chains`).
        let mut tail_out = |rows: &[[S::f32s; V]]| {
            for (r, acc) in rows.iter().take(tail).enumerate() {
                write(whole * R + r, acc);
            }
        };
        match (V, tail_rows) {
            (_, rows) if rows == R => tail_out(&kernel::<S, V, R, 1>(simd, weights, tail_block)),
            (1, 1) => tail_out(&kernel::<S, V, 1, 8>(simd, weights, tail_block)),
            (1, 2) => tail_out(&kernel::<S, V, 2, 4>(simd, weights, tail_block)),
            (1, 4) => tail_out(&kernel::<S, V, 4, 2>(simd, weights, tail_block)),
            (2, 1) => tail_out(&kernel::<S, V, 1, 4>(simd, weights, tail_block)),
            (2, 2) => tail_out(&kernel::<S, V, 2, 2>(simd, weights, tail_block)),
            (_, 1) => tail_out(&kernel::<S, V, 1, 2>(simd, weights, tail_block)),
            _ => unreachable!("a tail is fewer rows than a block of {R}"),
        }
    }
}

/// One block of `R` token rows (`xs`: `R` values per input) times a panel (`weights`: `V`
/// vectors per input), the inputs spread round-robin over `C` chains of accumulators summed at
/// the end (more chains, more independent multiply-adds in flight when the rows are few).
#[inline(always)]
fn kernel<S: Simd, const V: usize, const R: usize, const C: usize>(
    simd: S,
    weights: &[S::f32s],
    xs: &[f32],
) -> [[S::f32s; V]; R] {
    let mut acc = [[[simd.splat_f32s(0.0); V]; R]; C];
    let inputs = xs.len() / R;
    let grouped = inputs / C * C;
    let (w_grouped, w_rest) = weights.split_at(grouped * V);
    let (x_grouped, x_rest) = xs.split_at(grouped * R);
    for (w, x) in w_grouped.chunks_exact(V * C).zip(x_grouped.chunks_exact(R * C)) {
        for c in 0..C {
            for r in 0..R {
                let v = simd.splat_f32s(x[c * R + r]);
                for k in 0..V {
                    acc[c][r][k] = simd.mul_add_e_f32s(v, w[c * V + k], acc[c][r][k]);
                }
            }
        }
    }
    for (w, x) in w_rest.chunks_exact(V).zip(x_rest.chunks_exact(R)) {
        for r in 0..R {
            let v = simd.splat_f32s(x[r]);
            for k in 0..V {
                acc[0][r][k] = simd.mul_add_e_f32s(v, w[k], acc[0][r][k]);
            }
        }
    }
    let mut sum = acc[0];
    for chain in &acc[1..] {
        for (rows, more) in sum.iter_mut().zip(chain) {
            for (s, m) in rows.iter_mut().zip(more) {
                *s = simd.add_f32s(*s, *m);
            }
        }
    }
    sum
}

/// The same product without SIMD, for targets `pulp` has no vectors for.
fn scalar(dense: &Weights, x: &[f32], panels: std::ops::Range<usize>, out: &mut [f32], stride: usize) {
    let (inputs, outputs) = (dense.inputs, dense.outputs);
    let offset = panels.start * PANEL;
    for (row, target) in x.chunks_exact(inputs).zip(out.chunks_exact_mut(stride)) {
        for p in panels.clone() {
            let panel = &dense.panels[p * inputs * PANEL..(p + 1) * inputs * PANEL];
            let first = p * PANEL;
            let width = PANEL.min(outputs - first);
            let target = &mut target[first - offset..first - offset + width];
            target.copy_from_slice(&dense.bias[first..first + width]);
            for (value, packed) in row.iter().zip(panel.chunks_exact(PANEL)) {
                for (o, w) in target.iter_mut().zip(packed) {
                    *o += value * w;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product as written in a textbook, to compare with.
    fn naive(x: &[f32], w: &[f32], b: &[f32], inputs: usize, outputs: usize) -> Vec<f32> {
        let tokens = x.len() / inputs;
        let mut out = vec![0.0; tokens * outputs];
        for t in 0..tokens {
            for o in 0..outputs {
                out[t * outputs + o] = b[o]
                    + (0..inputs)
                        .map(|i| x[t * inputs + i] * w[i * outputs + o])
                        .sum::<f32>();
            }
        }
        out
    }

    #[test]
    fn packed_products_equal_the_textbook_product() {
        // Widths that are not multiples of the panel, token counts that are not multiples of the
        // row block, and a product large enough to be split over cores, included.
        for (tokens, inputs, outputs) in [
            (1, 1, 1),
            (2, 19, 20),
            (3, 5, 17),
            (4, 16, 16),
            (6, 10, 33),
            (7, 24, 16),
            (9, 33, 40),
            (16, 64, 48),
            (17, 256, 300),
        ] {
            let x: Vec<f32> = (0..tokens * inputs)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let w: Vec<f32> = (0..inputs * outputs)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                .collect();
            let b: Vec<f32> = (0..outputs).map(|i| i as f32 / 10.0).collect();
            let dense = Dense::new(&w, inputs, outputs, b.clone()).expect("shapes fit");
            let want = naive(&x, &w, &b, inputs, outputs);
            let mut results = vec![("simd", dense.apply(&x))];
            for workers in 1..=3 {
                results.push(("split over workers", dense.apply_on(&x, workers)));
            }
            let mut whole = vec![0.0; tokens * outputs];
            scalar(
                &dense.weights,
                &x,
                0..outputs.div_ceil(PANEL),
                &mut whole,
                outputs,
            );
            results.push(("scalar", whole));
            // Each vector width this CPU has, whichever `dispatch` would choose.
            let with = |simd: &dyn Fn(Project<'_>)| {
                let mut out = vec![0.0; tokens * outputs];
                simd(Project {
                    dense: &dense.weights,
                    x: &x,
                    panels: 0..outputs.div_ceil(PANEL),
                    out: &mut out,
                    stride: outputs,
                });
                out
            };
            results.push(("no vectors", with(&|op| Simd::vectorize(pulp::Scalar::new(), op))));
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(avx2) = pulp::x86::V3::try_new() {
                    results.push(("AVX2", with(&|op| Simd::vectorize(avx2, op))));
                }
                if let Some(avx512) = pulp::x86::V4::try_new() {
                    results.push(("AVX-512", with(&|op| Simd::vectorize(avx512, op))));
                }
            }
            for (name, got) in results {
                assert_eq!(got.len(), want.len());
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() < 1e-4,
                        "{name} {tokens}×{inputs}·{inputs}×{outputs}: {g} vs {e}"
                    );
                }
            }
            // The columns of panels 1.. alone, as a worker computes its share (rows as wide as
            // its columns, starting at its first).
            if outputs > PANEL {
                let width = outputs - PANEL;
                let panels = 1..outputs.div_ceil(PANEL);
                let mut scalar_part = vec![0.0; tokens * width];
                scalar(&dense.weights, &x, panels.clone(), &mut scalar_part, width);
                for (name, part) in [
                    ("part", dense.weights.part(&x, panels)),
                    ("scalar part", scalar_part),
                ] {
                    for (row, expected) in part.chunks_exact(width).zip(want.chunks_exact(outputs)) {
                        for (g, e) in row.iter().zip(&expected[PANEL..]) {
                            assert!(
                                (g - e).abs() < 1e-4,
                                "{name} {tokens}×{inputs}·{inputs}×{outputs}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            Dense::new(&[1.0; 6], 2, 2, vec![0.0; 2]).is_none(),
            "6 weights are not 2×2"
        );
        assert!(Dense::new(&[], 2, 0, Vec::new()).is_none(), "no outputs");
    }
}
