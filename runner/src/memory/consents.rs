//! The consent records of a tenant's subjects, kept in the store as one hash chain per subject,
//! ending at a signed head: each link holds a record, its position and the hash of the link
//! before it, and the head — the newest position and hash, signed with the tenant's key —
//! says where the chain ends. Reading a history verifies both: a record edited (even with every
//! later hash recomputed), removed, reordered, or cut off the end (a revocation dropped) no
//! longer verifies against the head's signature, which only the key's holder (the gateway, or
//! the local data directory's key) can make.
//!
//! Appends are append-only by construction: a link is written only where no link is yet (the
//! write's guard), so two writers racing for the same position cannot both land, and the loser
//! links after the winner. A request sent again finds its own record among the newest and is
//! answered with it instead of appending it twice.

use serde::{Deserialize, Serialize};

use super::{
    MemoryError,
    backend::MemoryBackend,
    chain::{ChainKind, ChainRecord, Chains, Head, History, Link},
};
use crate::{
    consent::{ConsentAction, ConsentLedger, ConsentRecord, SubjectHandle},
    keys::{KeyPair, PublicKey},
    records::{StoreError, TenantId},
};

/// The most grants one subject's history may hold (grants and revocations counted together).
pub const MAX_RECORDS_PER_SUBJECT: u64 = 10_000;
/// Revocations are accepted this far past [`MAX_RECORDS_PER_SUBJECT`]: a history filled with
/// grants must still take its subject's revocation.
pub const REVOCATION_HEADROOM: u64 = 1_000;
/// Consent chains: one per subject, under `cx/<tenant>/m/c/<subject>/` (heads `h/`, request
/// ids `r/`, the subjects that have one `s/`).
pub const CONSENT: ChainKind = ChainKind {
    name: "consent",
    links: "c",
    heads: "h",
    requests: "r",
    owners: "s",
};

/// One link of a subject's consent chain.
pub type ConsentLink = Link<ConsentRecord>;
/// Where a subject's chain ends, signed.
pub type ConsentHead = Head;
/// A subject's consent history, oldest first, and the head it ends at.
pub type ConsentHistory = History<ConsentRecord>;

impl ChainRecord for ConsentRecord {
    fn owner(&self) -> &str {
        self.subject.as_str()
    }

    fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Sent again, only its time may differ (the gateway dates each attempt).
    fn resent_as(&self, sent: &Self) -> bool {
        ConsentRecord {
            at_ms: self.at_ms,
            ..sent.clone()
        } == *self
    }
}

/// A grant or revocation as a person asks for it: the gateway service adds who they are (from
/// their authenticated token) and when, so neither can be claimed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsentRequest {
    pub subject: SubjectHandle,
    pub purpose: crate::consent::Purpose,
    pub action: ConsentAction,
    #[serde(default)]
    pub categories: std::collections::BTreeSet<crate::personal_data::Category>,
    #[serde(default)]
    pub evidence: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// The client's id for this request, so that sending it again appends nothing twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
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
            request_id: self.request_id,
        }
    }
}

/// The gateway service's consent API, for a person with their own token (`contextos consent
/// … --store gateway+http://…`).
#[derive(Debug)]
pub struct RemoteConsents<'s>(pub &'s crate::records::store::remote::RemoteStore);

fn remote(error: impl std::fmt::Display) -> MemoryError {
    MemoryError::Store(StoreError::Backend(error.to_string()))
}

impl RemoteConsents<'_> {
    pub async fn append(&self, request: &ConsentRequest) -> Result<ConsentLink, MemoryError> {
        self.0
            .post_json(CONSENT_RECORDS_PATH, request)
            .await
            .map_err(remote)
    }

    /// The subject's history as the service read it, verified here against `key` (the tenant's
    /// published key).
    pub async fn history(
        &self,
        tenant: &TenantId,
        subject: &SubjectHandle,
        key: &PublicKey,
    ) -> Result<ConsentHistory, MemoryError> {
        let history: ConsentHistory = self
            .0
            .get_json(&format!("{CONSENT_HISTORY_PATH}?subject={subject}"))
            .await
            .map_err(remote)?;
        history.verify_subject(tenant, subject, key).map_err(|problem| {
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
            .map_err(remote)
    }
}

/// The gateway service's routes for consent.
pub const CONSENT_RECORDS_PATH: &str = "/v1/consent/records";
pub const CONSENT_HISTORY_PATH: &str = "/v1/consent/history";
pub const CONSENT_SUBJECTS_PATH: &str = "/v1/consent/subjects";

impl History<ConsentRecord> {
    /// Checks the history is `subject`'s, whole and signed by `key` for this tenant (see
    /// [`History::verify`]).
    pub fn verify_subject(
        &self,
        tenant: &TenantId,
        subject: &SubjectHandle,
        key: &PublicKey,
    ) -> Result<(), String> {
        self.verify(&CONSENT, tenant, subject.as_str(), key)
    }

    /// What is in force: the latest decision about each category (see [`ConsentLedger`]).
    pub fn ledger(&self) -> ConsentLedger {
        ConsentLedger::from_records(self.links.iter().map(|link| &link.record))
    }
}

/// One tenant's consent records in `store`.
#[derive(Debug)]
pub struct ConsentBook<'s, S> {
    chains: Chains<'s, S, ConsentRecord>,
}

impl<'s, S: MemoryBackend> ConsentBook<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            chains: Chains::new(store, tenant, CONSENT),
        }
    }

    /// Appends `record` (validated first) to its subject's chain, signs the new head with `key`
    /// and returns the new link — or the link of the same request appended before.
    pub async fn append(&self, record: ConsentRecord, key: &KeyPair) -> Result<ConsentLink, MemoryError> {
        record
            .validate()
            .map_err(|e| MemoryError::BadConsent(e.to_string()))?;
        let (subject, action) = (record.subject.clone(), record.action);
        let cap = match action {
            ConsentAction::Grant => MAX_RECORDS_PER_SUBJECT,
            ConsentAction::Revoke => MAX_RECORDS_PER_SUBJECT + REVOCATION_HEADROOM,
        };
        let room = |seq: u64| {
            if seq < cap {
                return Ok(());
            }
            Err(MemoryError::BadConsent(format!(
                "subject {subject} has {seq} consent records, as many as one subject may have{}",
                match action {
                    ConsentAction::Grant => "; revocations are still accepted",
                    ConsentAction::Revoke => "",
                }
            )))
        };
        self.chains
            .append(record.clone(), key, room, MemoryError::BadConsent)
            .await
    }

    /// `subject`'s whole history, oldest first, verified against `key` (see
    /// [`History::verify`]). Anything else is reported as corrupt, never folded into what is in
    /// force.
    pub async fn history(
        &self,
        subject: &SubjectHandle,
        key: &PublicKey,
    ) -> Result<ConsentHistory, MemoryError> {
        let limit = usize::try_from(MAX_RECORDS_PER_SUBJECT + REVOCATION_HEADROOM + 1).unwrap_or(usize::MAX);
        self.chains.history(subject.as_str(), key, limit).await
    }

    /// The subjects that have consent records, in order, at most `limit`.
    pub async fn subjects(&self, limit: usize) -> Result<Vec<SubjectHandle>, MemoryError> {
        self.chains
            .owners(limit)
            .await?
            .into_iter()
            .map(|name| {
                SubjectHandle::new(&name).map_err(|e| {
                    MemoryError::Store(StoreError::Corrupt {
                        key: format!("consent subject {name:?}"),
                        problem: e.to_string(),
                    })
                })
            })
            .collect()
    }
}
