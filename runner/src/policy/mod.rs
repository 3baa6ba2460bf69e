//! The policy engine: Policy specs compiled once, then deterministic decisions per tool call.

pub mod cel_vars;
pub mod compile;
pub mod cost;
pub mod decide;
pub mod glob;

pub use compile::{CompiledPolicy, PolicyCompileError, compile_condition, compile_policy};
pub use decide::{CallFacts, Decision, PolicySet, RunFacts, ShadowDecision, StateFacts, strictness};
