//! Memory: what agents keep between runs — typed items, each scoped to an agent, a subject (a
//! person, by pseudonymous handle) or the whole tenant, with the provenance that says where it
//! came from — and recall, which offers a run the newest items that match a query and are
//! still allowed: not expired, and (for personal data) under a consent in force now.
//!
//! The model and the decisions are here and pure; [`bank`] keeps items, and [`consents`] the
//! subjects' chained consent records, in a record store backend (the same embedded file or TiKV
//! cluster as the records), through the small ordered key-value contract of [`backend`].

pub mod backend;
pub mod bank;
pub mod chain;
pub mod consents;
pub mod desk;
pub mod held;
pub(crate) mod keys;
pub mod remote;
pub mod sealed;
pub mod terms;

use std::{collections::BTreeSet, fmt};

use serde::{Deserialize, Serialize};

pub use crate::consent::{MemoryScope, MemoryType};
use crate::{
    consent::{ConsentLedger, Purpose, SubjectHandle},
    ontology::{EntityRef, EntityTypeName, MAX_ENTITIES},
    personal_data::Category,
    records::{
        Hash,
        canonical::canonical_bytes_of,
        store::{is_dns_label, validate_id},
    },
};

/// The most bytes of an item's text.
pub const MAX_TEXT: usize = 4096;
/// The most record entries one item names as its evidence.
pub const MAX_EVIDENCE: usize = 64;
/// The most policy digests one item's provenance names.
pub const MAX_POLICIES: usize = 32;
/// The most bytes of a digest (`sha256:` and 64 hex digits is 71).
const MAX_DIGEST: usize = 80;
/// The most items one recall offers.
pub const MAX_RECALL_ITEMS: usize = 100;

/// Whose memory an item is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemScope {
    /// One agent's (by the Agent's name in the tenant's namespace).
    Agent(String),
    /// One person's, under their consent.
    Subject(SubjectHandle),
    /// Every agent's of the tenant.
    Tenant,
}

impl ItemScope {
    pub fn kind(&self) -> MemoryScope {
        match self {
            Self::Agent(_) => MemoryScope::Agent,
            Self::Subject(_) => MemoryScope::Subject,
            Self::Tenant => MemoryScope::Tenant,
        }
    }

    /// The person the scope is, if it is one.
    pub fn subject(&self) -> Option<&SubjectHandle> {
        match self {
            Self::Subject(subject) => Some(subject),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), MemoryError> {
        match self {
            // A Kubernetes object name: DNS labels joined by dots.
            Self::Agent(name) if name.len() > 253 || !name.split('.').all(is_dns_label) => {
                Err(MemoryError::Invalid(format!(
                    "scope: agent name {:?} is not a Kubernetes object name",
                    truncated(name)
                )))
            }
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for ItemScope {
    type Err = MemoryError;

    /// `agent:<name>`, `subject:<handle>` or `tenant`, as [`fmt::Display`] writes them.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let scope = match text.split_once(':') {
            None if text == "tenant" => Self::Tenant,
            Some(("agent", name)) => Self::Agent(name.to_owned()),
            Some(("subject", handle)) => Self::Subject(
                SubjectHandle::new(handle).map_err(|e| MemoryError::BadQuery(format!("scope: {e}")))?,
            ),
            _ => {
                return Err(MemoryError::BadQuery(format!(
                    "scope {:?}: use agent:<name>, subject:<handle> or tenant",
                    truncated(text)
                )));
            }
        };
        scope
            .validate()
            .map_err(|e| MemoryError::BadQuery(e.to_string()))?;
        Ok(scope)
    }
}

impl fmt::Display for ItemScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(name) => write!(f, "agent:{name}"),
            Self::Subject(subject) => write!(f, "subject:{subject}"),
            Self::Tenant => f.write_str("tenant"),
        }
    }
}

/// A record entry an item came from: its position in the run's chain and its hash, which the
/// chain's verification vouches for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EvidenceHandle {
    pub seq: u64,
    pub hash: Hash,
}

/// Where an item came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub run_id: String,
    /// The entries of that run it was drawn from.
    pub evidence: Vec<EvidenceHandle>,
    /// When it was promoted (ms since the epoch).
    pub at_ms: i64,
    /// The ContextPack and Policy revisions the run was pinned to.
    pub context_pack: String,
    pub policies: Vec<String>,
    /// The person who approved it, when it was held for review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_by: Option<String>,
}

/// One memory item, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryItem {
    pub scope: ItemScope,
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    pub text: String,
    /// The personal data the classifier found in it. Only a subject's items hold any, each
    /// category under that subject's consent for `purpose`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub categories: BTreeSet<Category>,
    /// What it is kept for (the Agent's memory purpose); consent is checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    pub provenance: Provenance,
    /// Not recalled from this time on (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// The entities of the tenant's Ontology it refers to: found in its text by their id
    /// patterns, or named when it was proposed. Recall filters on their types.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub entities: BTreeSet<EntityRef>,
}

/// An item's identity: the SHA-256 of its canonical JSON. The same item kept twice is one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(pub Hash);

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a memory operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory item refused: {0}")]
    Invalid(String),
    #[error("recall refused: {0}")]
    BadQuery(String),
    #[error("consent record refused: {0}")]
    BadConsent(String),
    #[error(transparent)]
    Store(#[from] crate::records::StoreError),
    #[error(transparent)]
    Vault(crate::vault::VaultError),
}

fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

impl MemoryItem {
    /// Checks the bounds and the rule that personal data is only ever a subject's, kept for a
    /// purpose. Every backend refuses what this refuses, before writing anything.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let invalid = |problem: String| Err(MemoryError::Invalid(problem));
        self.scope.validate()?;
        if self.text.trim().is_empty() {
            return invalid("text: it is empty".into());
        }
        if self.text.len() > MAX_TEXT {
            return invalid(format!(
                "text: {} bytes, more than the {MAX_TEXT} an item may hold; keep a summary and point at the evidence",
                self.text.len()
            ));
        }
        if self.categories.len() > crate::consent::MAX_CATEGORIES {
            return invalid(format!(
                "categories: {} named, more than {}",
                self.categories.len(),
                crate::consent::MAX_CATEGORIES
            ));
        }
        // A subject's items are theirs whether or not the classifier found personal data in
        // them ("prefers calls after 6pm"): they are kept, and offered, under their consent.
        if self.scope.subject().is_some() && self.purpose.is_none() {
            return invalid("a subject's item names no purpose its consent is checked against".into());
        }
        if !self.categories.is_empty() {
            if self.scope.subject().is_none() {
                return invalid(format!(
                    "it holds personal data ({}) in {} scope; only a subject's items may, under that subject's consent",
                    self.categories
                        .iter()
                        .map(Category::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.scope
                ));
            }
            if self.purpose.is_none() {
                return invalid(
                    "it holds personal data but names no purpose its consent is checked against".into(),
                );
            }
        }
        if self.entities.len() > MAX_ENTITIES {
            return invalid(format!(
                "entities: {} named, more than {MAX_ENTITIES}",
                self.entities.len()
            ));
        }
        if let Some(problem) = self.entities.iter().find_map(|e| e.validate().err()) {
            return invalid(format!("entities: {problem}"));
        }
        let p = &self.provenance;
        validate_id("run", &p.run_id).map_err(|e| MemoryError::Invalid(format!("provenance.runId: {e}")))?;
        if p.evidence.len() > MAX_EVIDENCE {
            return invalid(format!(
                "provenance.evidence: {} entries, more than {MAX_EVIDENCE}",
                p.evidence.len()
            ));
        }
        if p.policies.len() > MAX_POLICIES {
            return invalid(format!(
                "provenance.policies: {} digests, more than {MAX_POLICIES}",
                p.policies.len()
            ));
        }
        if let Some(digest) = std::iter::once(&p.context_pack)
            .chain(&p.policies)
            .find(|d| d.is_empty() || d.len() > MAX_DIGEST || d.chars().any(char::is_control))
        {
            return invalid(format!("provenance: {:?} is not a digest", truncated(digest)));
        }
        if let Some(reviewer) = &p.reviewed_by
            && (reviewer.trim().is_empty()
                || reviewer.len() > crate::consent::MAX_TEXT_FIELD
                || reviewer.chars().any(char::is_control))
        {
            return invalid(
                "provenance.reviewedBy: a name of at most 512 bytes, without control characters".into(),
            );
        }
        if p.at_ms < 0 || self.expires_at_ms.is_some_and(|e| e <= p.at_ms) {
            return invalid(
                "expiresAtMs: an item must be promoted (provenance.atMs ≥ 0) before it expires".into(),
            );
        }
        Ok(())
    }

    /// The item's identity.
    pub fn id(&self) -> ItemId {
        // Plain data with string keys: serialization cannot fail.
        let bytes = canonical_bytes_of(self).unwrap_or_default();
        ItemId(Hash::of(&bytes))
    }
}

/// What a recall asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecallQuery {
    pub scope: ItemScope,
    /// Only items of this type (all types if none).
    pub memory_type: Option<MemoryType>,
    /// Words every offered item contains (see [`terms`]); none: the newest items.
    pub text: String,
    pub max_items: usize,
    /// The purpose the run recalls for; personal data is offered only under consent for it.
    pub purpose: Option<Purpose>,
    /// Only items that refer to an entity of this type.
    pub entity_type: Option<EntityTypeName>,
}

/// Why an item that matched was not offered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    pub item: ItemId,
    pub reason: String,
}

/// Whether `item` may be offered to a run recalling for `purpose` at `now_ms`, given the
/// consents in force (read fresh for the recall: a revocation appended before it is seen).
pub fn admit(
    item: &MemoryItem,
    purpose: Option<&Purpose>,
    consents: &ConsentLedger,
    now_ms: i64,
) -> Result<(), String> {
    if let Some(expired) = item.expires_at_ms.filter(|e| *e <= now_ms) {
        return Err(format!("it expired at {expired} ms"));
    }
    let Some(subject) = item.scope.subject() else {
        if item.categories.is_empty() {
            return Ok(());
        }
        // validate() refuses such items; one in the store is not offered either.
        return Err("it holds personal data outside a subject's scope".into());
    };
    let Some(kept_for) = item.purpose.as_ref() else {
        return Err("it is a subject's and names no purpose".into());
    };
    if purpose != Some(kept_for) {
        return Err(format!(
            "it holds personal data kept for purpose {kept_for}, and the recall is for {}",
            purpose.map_or_else(|| "no purpose".to_owned(), Purpose::to_string)
        ));
    }
    if item.categories.is_empty() {
        // No personal data found, but the subject's all the same: offered while they consent
        // to anything for the purpose, and not once they have revoked it all.
        return if consents.in_force(subject, kept_for, now_ms).is_empty() {
            Err(format!(
                "no consent of subject {subject} for purpose {kept_for} is in force now"
            ))
        } else {
            Ok(())
        };
    }
    let missing = consents.uncovered(subject, kept_for, &item.categories, now_ms);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no consent of subject {subject} for purpose {kept_for} covers its {} now",
            missing
                .iter()
                .map(Category::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_read_back_what_they_write_and_refuse_anything_else() {
        for scope in [
            ItemScope::Tenant,
            ItemScope::Agent("sre-agent".into()),
            ItemScope::Subject(SubjectHandle::new("subj:7f3a").expect("handle")),
        ] {
            assert_eq!(scope.to_string().parse::<ItemScope>().expect("parses"), scope);
        }
        for bad in [
            "",
            "agent",
            "agent:",
            "agent:Bad_Name",
            "subject:Ana@x",
            "team:sre",
            "tenant:x",
        ] {
            assert!(bad.parse::<ItemScope>().is_err(), "{bad:?} parsed");
        }
    }
}
