//! `contextos audit`: an agent harness audited against its own manifests and, with `--records`,
//! against what its records show the agents did. Objects are read from files (with the line of
//! every field) or a live cluster into a [`Harness`]; every rule of the
//! [`rules::catalogue`] checks it (pure: no IO); the [`Report`] orders the findings, scores each
//! Agent and renders them for people (text), machines (JSON) and code-scanning UIs (SARIF).

pub mod evidence;
/// Field paths (kept outside the audit: local runs name fields with them too).
pub use crate::field_path as field;
pub mod finding;
pub mod harness;
pub mod live;
pub mod openapi;
pub mod report;
pub mod rules;
pub mod source;

pub use field::FieldPath;
pub use finding::{Finding, Rule, RuleId, Severity};
pub use harness::{Harness, ObjectRef};
pub use report::Report;

/// Audits `harness` with every rule.
pub fn audit(harness: &Harness) -> Report {
    Report::new(harness, rules::run(harness))
}
