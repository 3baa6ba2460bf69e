//! A BERT-family sentence encoder (all-MiniLM-L6-v2 and its kind) evaluated in-process: the
//! weights of the model's ONNX export (`onnx`), the architecture written out (`bert`), the
//! dense projections that are nearly all of its work (`dense`), and the helper threads a large
//! projection is split over (`pool`).
//!
//! It is a crate of its own so that its kernels are optimised in every build profile (see the
//! workspace's `[profile.dev.package.contextos-encoder]`): unoptimised, one text takes a second
//! instead of milliseconds.

mod bert;
mod dense;
mod onnx;
mod pool;

pub use bert::Encoder;
pub use onnx::OnnxError;
