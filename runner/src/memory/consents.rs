//! The consent records of a tenant's subjects, kept in the store as one hash chain per subject:
//! each link holds a record, its position and the hash of the link before it, so a record
//! removed, reordered or edited no longer links up, and reading a history verifies it. What a
//! run decided under consent names the head it read (see [`ConsentHistory::head`]), and the
//! run's own signed record then vouches for the consent history it relied on.
//!
//! Appends are append-only by construction: a link is written only where no link is yet (the
//! write's guard), so two writers racing for the same position cannot both land, and the loser
//! reads the new head and links after it.

use serde::{Deserialize, Serialize};

use super::{
    MemoryError,
    backend::{Change, Guard, MemoryBackend, Write},
};
use crate::{
    consent::{ConsentLedger, ConsentRecord, SubjectHandle},
    records::{Hash, StoreError, TenantId, canonical::canonical_bytes_of},
};

/// The most consent records one subject's history may hold.
pub const MAX_RECORDS_PER_SUBJECT: u64 = 10_000;
/// Times an append is tried when another writer took its position.
const APPEND_ATTEMPTS: usize = 8;
/// Subjects listed per scan.
const LIST_PAGE: usize = 1_000;

/// A grant or revocation as a person asks for it: the gateway service adds who they are (from
/// their authenticated token) and when, so neither can be claimed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsentRequest {
    pub subject: SubjectHandle,
    pub purpose: crate::consent::Purpose,
    pub action: crate::consent::ConsentAction,
    #[serde(default)]
    pub categories: std::collections::BTreeSet<crate::personal_data::Category>,
    #[serde(default)]
    pub evidence: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

impl ConsentRequest {
    /// The record, recorded by `by` at `at_ms`.
    pub fn into_record(self, by: String, at_ms: i64) -> ConsentRecord {
        ConsentRecord {
            subject: self.subject,
            purpose: self.purpose,
            action: self.action,
            categories: self.categories,
            by,
            evidence: self.evidence,
            at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// The gateway service's consent API, for a person with their own token (`contextos consent
/// … --store gateway+http://…`).
#[derive(Debug)]
pub struct RemoteConsents<'s>(pub &'s crate::records::store::remote::RemoteStore);

impl RemoteConsents<'_> {
    pub async fn append(&self, request: &ConsentRequest) -> Result<ConsentLink, MemoryError> {
        self.0
            .post_json(CONSENT_RECORDS_PATH, request)
            .await
            .map_err(|e| MemoryError::Store(StoreError::Backend(e.to_string())))
    }

    /// The subject's history as the service verified it, verified here again.
    pub async fn history(&self, subject: &SubjectHandle) -> Result<ConsentHistory, MemoryError> {
        let links: Vec<ConsentLink> = self
            .0
            .get_json(&format!("{CONSENT_HISTORY_PATH}?subject={subject}"))
            .await
            .map_err(|e| MemoryError::Store(StoreError::Backend(e.to_string())))?;
        let history = ConsentHistory { links };
        history.verify(subject).map_err(|problem| {
            MemoryError::Store(StoreError::Corrupt {
                key: format!("consent history of {subject} from the gateway service"),
                problem,
            })
        })?;
        Ok(history)
    }

    pub async fn subjects(&self, limit: usize) -> Result<Vec<SubjectHandle>, MemoryError> {
        self.0
            .get_json(&format!("{CONSENT_SUBJECTS_PATH}?limit={limit}"))
            .await
            .map_err(|e| MemoryError::Store(StoreError::Backend(e.to_string())))
    }
}

/// The gateway service's routes for consent.
pub const CONSENT_RECORDS_PATH: &str = "/v1/consent/records";
pub const CONSENT_HISTORY_PATH: &str = "/v1/consent/history";
pub const CONSENT_SUBJECTS_PATH: &str = "/v1/consent/subjects";

/// One link of a subject's consent chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentLink {
    /// Position in the subject's chain, from 0.
    pub seq: u64,
    /// The hash of the link before (none for the first).
    pub prev: Option<Hash>,
    pub record: ConsentRecord,
    /// SHA-256 of the canonical JSON of `seq`, `prev` and `record`.
    pub hash: Hash,
}

impl ConsentLink {
    fn hash_of(seq: u64, prev: Option<&Hash>, record: &ConsentRecord) -> Hash {
        #[derive(Serialize)]
        struct Linked<'a> {
            seq: u64,
            prev: Option<&'a Hash>,
            record: &'a ConsentRecord,
        }
        // Plain data with string keys: serialization cannot fail.
        let bytes = canonical_bytes_of(&Linked { seq, prev, record }).unwrap_or_default();
        Hash::of(&bytes)
    }

    fn new(seq: u64, prev: Option<Hash>, record: ConsentRecord) -> Self {
        let hash = Self::hash_of(seq, prev.as_ref(), &record);
        Self {
            seq,
            prev,
            record,
            hash,
        }
    }
}

/// A subject's verified consent history, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsentHistory {
    pub links: Vec<ConsentLink>,
}

impl ConsentHistory {
    /// The hash of the newest link: what a decision made under this history names.
    pub fn head(&self) -> Option<Hash> {
        self.links.last().map(|link| link.hash)
    }

    /// Checks that the links are `subject`'s, each hashes to what it holds, positions run 0, 1,
    /// 2… and each names the hash of the one before.
    pub fn verify(&self, subject: &SubjectHandle) -> Result<(), String> {
        let mut prev: Option<Hash> = None;
        for (position, link) in self.links.iter().enumerate() {
            if link.record.subject != *subject {
                return Err(format!("link {} is another subject's record", link.seq));
            }
            if ConsentLink::hash_of(link.seq, link.prev.as_ref(), &link.record) != link.hash {
                return Err(format!("link {} does not hash to the hash it holds", link.seq));
            }
            if link.seq != position as u64 {
                return Err(format!(
                    "link {} is at position {position}: a record was removed or moved",
                    link.seq
                ));
            }
            if link.prev != prev {
                return Err(format!(
                    "link {} does not name the link before it: the history was rewritten",
                    link.seq
                ));
            }
            prev = Some(link.hash);
        }
        Ok(())
    }

    /// What is in force, folded from the records in the order they were appended.
    pub fn ledger(&self) -> ConsentLedger {
        ConsentLedger::from_records(self.links.iter().map(|link| &link.record))
    }
}

mod keys {
    use super::{SubjectHandle, TenantId};

    /// `cx/<tenant>/m/c/<subject>/` then `u64::MAX − seq` (newest first).
    pub fn chain_prefix(tenant: &TenantId, subject: &SubjectHandle) -> Vec<u8> {
        format!("cx/{tenant}/m/c/{subject}/").into_bytes()
    }

    pub fn link(tenant: &TenantId, subject: &SubjectHandle, seq: u64) -> Vec<u8> {
        let mut key = chain_prefix(tenant, subject);
        key.extend_from_slice(&(u64::MAX - seq).to_be_bytes());
        key
    }

    /// `cx/<tenant>/m/s/<subject>`: the subjects that have a history.
    pub fn subjects_prefix(tenant: &TenantId) -> Vec<u8> {
        format!("cx/{tenant}/m/s/").into_bytes()
    }

    pub fn subject(tenant: &TenantId, subject: &SubjectHandle) -> Vec<u8> {
        let mut key = subjects_prefix(tenant);
        key.extend_from_slice(subject.as_str().as_bytes());
        key
    }
}

/// One tenant's consent records in `store`.
#[derive(Debug)]
pub struct ConsentBook<'s, S> {
    store: &'s S,
    tenant: TenantId,
}

impl<'s, S: MemoryBackend> ConsentBook<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
        }
    }

    fn corrupt(&self, subject: &SubjectHandle, problem: impl Into<String>) -> MemoryError {
        MemoryError::Store(StoreError::Corrupt {
            key: format!("cx/{}/m/c/{subject}", self.tenant),
            problem: problem.into(),
        })
    }

    /// Appends `record` (validated first) to its subject's chain and returns the new link.
    pub async fn append(&self, record: ConsentRecord) -> Result<ConsentLink, MemoryError> {
        record
            .validate()
            .map_err(|e| MemoryError::BadConsent(e.to_string()))?;
        let subject = record.subject.clone();
        for _ in 0..APPEND_ATTEMPTS {
            let newest = self.newest(&subject).await?;
            let seq = newest.as_ref().map_or(0, |link| link.seq + 1);
            if seq >= MAX_RECORDS_PER_SUBJECT {
                return Err(MemoryError::BadConsent(format!(
                    "subject {subject} has {MAX_RECORDS_PER_SUBJECT} consent records, as many as one subject may have"
                )));
            }
            let link = ConsentLink::new(seq, newest.map(|link| link.hash), record.clone());
            let key = keys::link(&self.tenant, &subject, seq);
            let write = Write {
                guard: Guard::Absent(key.clone()),
                changes: vec![
                    // Plain data with string keys: serialization cannot fail.
                    Change::Put(key, serde_json::to_vec(&link).unwrap_or_default()),
                    Change::Put(keys::subject(&self.tenant, &subject), b"1".to_vec()),
                ],
            };
            if self.store.memory_write(&self.tenant, vec![write]).await?.first() == Some(&true) {
                return Ok(link);
            }
            // Another writer took this position: link after theirs.
        }
        Err(MemoryError::Store(StoreError::Backend(format!(
            "consent records of subject {subject} were appended by others {APPEND_ATTEMPTS} times while this one was; try again"
        ))))
    }

    /// The newest link of `subject`'s chain (checked against its own hash).
    async fn newest(&self, subject: &SubjectHandle) -> Result<Option<ConsentLink>, MemoryError> {
        let prefix = keys::chain_prefix(&self.tenant, subject);
        let end = super::keys::prefix_end(&prefix);
        let page = self.store.memory_scan(&self.tenant, prefix, end, 1).await?;
        let Some((_, value)) = page.into_iter().next() else {
            return Ok(None);
        };
        let link = self.decode(subject, &value)?;
        Ok(Some(link))
    }

    fn decode(&self, subject: &SubjectHandle, value: &[u8]) -> Result<ConsentLink, MemoryError> {
        let link: ConsentLink =
            serde_json::from_slice(value).map_err(|e| self.corrupt(subject, e.to_string()))?;
        if ConsentLink::hash_of(link.seq, link.prev.as_ref(), &link.record) != link.hash {
            return Err(self.corrupt(
                subject,
                format!("link {} does not hash to the hash it holds", link.seq),
            ));
        }
        if link.record.subject != *subject {
            return Err(self.corrupt(subject, format!("link {} is another subject's record", link.seq)));
        }
        Ok(link)
    }

    /// `subject`'s whole history, oldest first, verified: every link hashes to what it holds,
    /// positions run 0, 1, 2… and each names the hash of the one before. Anything else is
    /// reported as corrupt, never folded into what is in force.
    pub async fn history(&self, subject: &SubjectHandle) -> Result<ConsentHistory, MemoryError> {
        let prefix = keys::chain_prefix(&self.tenant, subject);
        let end = super::keys::prefix_end(&prefix);
        let limit = usize::try_from(MAX_RECORDS_PER_SUBJECT + 1).unwrap_or(usize::MAX);
        let pairs = self.store.memory_scan(&self.tenant, prefix, end, limit).await?;
        let mut links = pairs
            .iter()
            .map(|(_, value)| self.decode(subject, value))
            .collect::<Result<Vec<_>, _>>()?;
        links.reverse();
        let history = ConsentHistory { links };
        history
            .verify(subject)
            .map_err(|problem| self.corrupt(subject, problem))?;
        Ok(history)
    }

    /// The subjects that have consent records, in order, at most `limit`.
    pub async fn subjects(&self, limit: usize) -> Result<Vec<SubjectHandle>, MemoryError> {
        let prefix = keys::subjects_prefix(&self.tenant);
        let end = super::keys::prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        while out.len() < limit {
            let page = self
                .store
                .memory_scan(&self.tenant, start, end.clone(), LIST_PAGE.min(limit - out.len()))
                .await?;
            let full = page.len() == LIST_PAGE.min(limit - out.len());
            for (key, _) in &page {
                let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let subject = SubjectHandle::new(&name).map_err(|e| {
                    MemoryError::Store(StoreError::Corrupt {
                        key: String::from_utf8_lossy(key).into_owned(),
                        problem: e.to_string(),
                    })
                })?;
                out.push(subject);
            }
            match page.last() {
                Some((last, _)) if full => start = super::keys::after(last),
                _ => break,
            }
        }
        Ok(out)
    }
}
