//! The improvement loop's second half: insights become typed proposals ([`compile`]), which
//! are patches ([`patch`]) applied to a target's spec and taken through replay, review and the
//! target's own promotion gate (the operator's Proposal controller). Nothing here applies a
//! change: a draft is written as a `Proposal` object for people to decide on.

pub mod autotune;
pub mod compile;
pub mod patch;

use contextos_crds::proposal::ProposalSpec;
use serde_json::{Value, json};

pub use self::compile::{Compiled, Draft, World, compile};
use crate::records::canonical::canonical_bytes_of;

impl Draft {
    /// The Proposal object for this draft in `namespace`. Its name follows from its content
    /// (target, base and patch), so the same draft compiled twice is one object.
    pub fn manifest(&self, namespace: &str) -> Value {
        let spec = ProposalSpec {
            target: self.target.clone(),
            base_digest: self.base_digest.clone(),
            patch: self.patch.clone(),
            insight: Some(self.insight.clone()),
            decision: None,
        };
        json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "Proposal",
            "metadata": {"name": self.name(), "namespace": namespace},
            "spec": spec,
        })
    }

    /// `<kind>-<target>-<10 hex of the content>`, at most 63 characters.
    pub fn name(&self) -> String {
        let content = canonical_bytes_of(&(&self.target, &self.base_digest, &self.patch)).unwrap_or_default();
        let hex = crate::records::Hash::of(&content).to_hex();
        let kind = match self.target.kind {
            contextos_crds::proposal::TargetKind::Policy => "policy",
            contextos_crds::proposal::TargetKind::ContextPack => "pack",
            contextos_crds::proposal::TargetKind::Agent => "agent",
        };
        let mut prefix = format!("{kind}-{}", self.target.name);
        prefix.truncate(50);
        format!("{}-{}", prefix.trim_end_matches(['-', '.']), &hex[..10])
    }
}

#[cfg(test)]
mod tests;
