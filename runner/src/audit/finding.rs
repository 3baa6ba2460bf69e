//! What an audit reports: rules (a stable id, a severity, why it matters, how to fix it) and the
//! findings they make about objects.

use std::{fmt, path::PathBuf};

use serde::Serialize;

use super::{field::FieldPath, harness::ObjectRef};

/// How much a finding matters. Ordered: `Info` < … < `Critical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [Self::Critical, Self::High, Self::Medium, Self::Low, Self::Info];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// Points an agent's score loses for one finding of this severity.
    pub fn weight(self) -> u32 {
        match self {
            Self::Info => 0,
            Self::Low => 1,
            Self::Medium => 4,
            Self::High => 12,
            Self::Critical => 30,
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule's stable identifier (`policy/default-allow`): what CI configurations and suppressions
/// name, never renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RuleId(pub &'static str);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// One audit rule, as documented (README table, `contextos audit --rules`).
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub id: RuleId,
    pub severity: Severity,
    /// What the rule finds, in a few words.
    pub title: &'static str,
    /// Why it matters to someone running agents in production.
    pub why: &'static str,
    /// What to change.
    pub fix: &'static str,
}

/// One thing a rule found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub rule: RuleId,
    pub severity: Severity,
    pub object: ObjectRef,
    pub field: FieldPath,
    /// What exactly is wrong here (names values, tools, rules).
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl Serialize for FieldPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
