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
    backend::{Change, Guard, MemoryBackend, Write},
};
use crate::{
    consent::{ConsentAction, ConsentLedger, ConsentRecord, SubjectHandle},
    keys::{KeyPair, PublicKey},
    records::{Hash, StoreError, TenantId, canonical::canonical_bytes_of},
};

/// The most grants one subject's history may hold (grants and revocations counted together).
pub const MAX_RECORDS_PER_SUBJECT: u64 = 10_000;
/// Revocations are accepted this far past [`MAX_RECORDS_PER_SUBJECT`]: a history filled with
/// grants must still take its subject's revocation.
pub const REVOCATION_HEADROOM: u64 = 1_000;
/// Times an append is tried when another writer took its position.
const APPEND_ATTEMPTS: usize = 8;
/// The newest links an append looks through for its own request (sent again).
const RECENT: usize = 16;
/// Subjects listed per scan.
const LIST_PAGE: usize = 1_000;

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
        history.verify(tenant, subject, key).map_err(|problem| {
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

/// Where a subject's chain ends, signed: the newest link's position and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentHead {
    pub seq: u64,
    pub hash: Hash,
    /// Id of the key that signed (see [`PublicKey::key_id`]).
    pub key_id: String,
    /// Ed25519 signature (hex) of [`ConsentHead::message`].
    pub signature: String,
}

impl ConsentHead {
    /// What the signature covers: tenant, subject, position and hash, so a head cannot be moved
    /// to another subject, tenant or point in the chain.
    pub fn message(tenant: &TenantId, subject: &SubjectHandle, seq: u64, hash: &Hash) -> Vec<u8> {
        format!("contextos-consent-head/v1\n{tenant}\n{subject}\n{seq}\n{hash}").into_bytes()
    }

    fn sign(tenant: &TenantId, link: &ConsentLink, key: &KeyPair) -> Self {
        let message = Self::message(tenant, &link.record.subject, link.seq, &link.hash);
        Self {
            seq: link.seq,
            hash: link.hash,
            key_id: key.key_id(),
            signature: key.sign_hex(&message),
        }
    }
}

/// A subject's consent history, oldest first, and the head it ends at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentHistory {
    pub links: Vec<ConsentLink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<ConsentHead>,
}

impl ConsentHistory {
    /// The hash of the newest link: what a decision made under this history names.
    pub fn head_hash(&self) -> Option<Hash> {
        self.links.last().map(|link| link.hash)
    }

    /// Checks that the links are `subject`'s, each hashes to what it holds, positions run 0, 1,
    /// 2… with each naming the hash of the one before, and the chain ends exactly at a head
    /// `key` signed for this tenant and subject.
    pub fn verify(&self, tenant: &TenantId, subject: &SubjectHandle, key: &PublicKey) -> Result<(), String> {
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
        self.verify_tip(tenant, subject, key)
    }

    /// Checks that the newest link is the one the head names and the head is signed by `key`
    /// for this tenant and subject (the hashes then vouch for every link before it).
    fn verify_tip(&self, tenant: &TenantId, subject: &SubjectHandle, key: &PublicKey) -> Result<(), String> {
        match (&self.head, self.links.last()) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("the history has no signed head".into()),
            (Some(head), None) => Err(format!(
                "the signed head names record {}, and the history holds none: records were removed",
                head.seq
            )),
            (Some(head), Some(last)) => {
                if (head.seq, head.hash) != (last.seq, last.hash) {
                    return Err(format!(
                        "the history ends at record {} and its signed head names record {}: records were removed or rewritten",
                        last.seq, head.seq
                    ));
                }
                if head.key_id != key.key_id() {
                    return Err(format!(
                        "the head is signed by key {}, not the tenant's key {}",
                        head.key_id,
                        key.key_id()
                    ));
                }
                let message = ConsentHead::message(tenant, subject, head.seq, &head.hash);
                if key.verify_hex(&message, &head.signature) {
                    Ok(())
                } else {
                    Err("the head's signature does not verify: the history was rewritten or re-signed".into())
                }
            }
        }
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

    /// The position a link key holds.
    pub fn link_seq(prefix: &[u8], key: &[u8]) -> Option<u64> {
        let bytes: [u8; 8] = key.get(prefix.len()..)?.try_into().ok()?;
        Some(u64::MAX - u64::from_be_bytes(bytes))
    }

    /// `cx/<tenant>/m/h/<subject>`: the chain's signed head.
    pub fn head(tenant: &TenantId, subject: &SubjectHandle) -> Vec<u8> {
        format!("cx/{tenant}/m/h/{subject}").into_bytes()
    }

    /// `cx/<tenant>/m/r/<subject>/<sha256 of the request id>` → the position it was appended at.
    pub fn request(tenant: &TenantId, subject: &SubjectHandle, request_id: &str) -> Vec<u8> {
        use sha2::Digest as _;
        let mut key = format!("cx/{tenant}/m/r/{subject}/").into_bytes();
        key.extend_from_slice(&sha2::Sha256::digest(request_id.as_bytes()));
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

/// Whether `stored` answers the request `wanted` came from: the same request id (or, without
/// one, the very same record, time included) — `Err` if the id was used for another record.
fn same_request(stored: &ConsentRecord, wanted: &ConsentRecord) -> Result<bool, String> {
    let Some(id) = &wanted.request_id else {
        return Ok(stored == wanted);
    };
    if stored.request_id.as_ref() != Some(id) {
        return Ok(false);
    }
    // Sent again, only its time may differ (the gateway dates each attempt).
    let same = ConsentRecord {
        at_ms: stored.at_ms,
        ..wanted.clone()
    } == *stored;
    if same {
        Ok(true)
    } else {
        Err(format!(
            "requestId {id} was used for another consent record (link of {} at {} ms); give each request its own id",
            stored.subject, stored.at_ms
        ))
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

    /// Appends `record` (validated first) to its subject's chain, signs the new head with `key`
    /// and returns the new link — or the link of the same request appended before.
    pub async fn append(&self, record: ConsentRecord, key: &KeyPair) -> Result<ConsentLink, MemoryError> {
        record
            .validate()
            .map_err(|e| MemoryError::BadConsent(e.to_string()))?;
        let subject = record.subject.clone();
        // A request with an id is found wherever it landed in the chain, not only among the
        // newest links: sent again much later (a Consent object listed again after many
        // records), it is never appended twice.
        let request_key = record
            .request_id
            .as_deref()
            .map(|id| keys::request(&self.tenant, &subject, id));
        if let Some(request_key) = &request_key
            && let Some(link) = self.requested(&subject, request_key).await?
            && same_request(&link.record, &record).map_err(MemoryError::BadConsent)?
        {
            return Ok(link);
        }
        for _ in 0..APPEND_ATTEMPTS {
            // The chain is extended only from a newest link its signed head vouches for (and so
            // for every link before it, through the hashes): a forged history is never signed
            // with the tenant's key by an append on top of it.
            let recent = self
                .read_verified(&subject, RECENT, |links, head| {
                    let tip = ConsentHistory {
                        links: links.last().cloned().into_iter().collect(),
                        head: head.clone(),
                    };
                    tip.verify_tip(&self.tenant, &subject, &key.public())
                })
                .await?;
            let recent: Vec<ConsentLink> = recent.links.into_iter().rev().collect();
            for link in &recent {
                if same_request(&link.record, &record).map_err(MemoryError::BadConsent)? {
                    return Ok(link.clone());
                }
            }
            let newest = recent.first();
            let seq = match newest {
                None => 0,
                Some(link) => link.seq.checked_add(1).ok_or_else(|| {
                    self.corrupt(&subject, "the newest link is at the last position there is")
                })?,
            };
            let cap = match record.action {
                ConsentAction::Grant => MAX_RECORDS_PER_SUBJECT,
                ConsentAction::Revoke => MAX_RECORDS_PER_SUBJECT + REVOCATION_HEADROOM,
            };
            if seq >= cap {
                return Err(MemoryError::BadConsent(format!(
                    "subject {subject} has {seq} consent records, as many as one subject may have{}",
                    match record.action {
                        ConsentAction::Grant => "; revocations are still accepted",
                        ConsentAction::Revoke => "",
                    }
                )));
            }
            let link = ConsentLink::new(seq, newest.map(|link| link.hash), record.clone());
            let head = ConsentHead::sign(&self.tenant, &link, key);
            let key = keys::link(&self.tenant, &subject, seq);
            // Plain data with string keys: serialization cannot fail.
            let write = Write {
                guard: Guard::Absent(key.clone()),
                changes: vec![
                    Change::Put(key, serde_json::to_vec(&link).unwrap_or_default()),
                    Change::Put(
                        keys::head(&self.tenant, &subject),
                        serde_json::to_vec(&head).unwrap_or_default(),
                    ),
                    Change::Put(keys::subject(&self.tenant, &subject), b"1".to_vec()),
                ]
                .into_iter()
                .chain(
                    request_key
                        .clone()
                        .map(|request| Change::Put(request, seq.to_be_bytes().to_vec())),
                )
                .collect(),
            };
            if self.store.memory_write(&self.tenant, vec![write]).await?.first() == Some(&true) {
                return Ok(link);
            }
            // Another writer took this position (or this very request did, its answer lost):
            // look again.
        }
        Err(MemoryError::Store(StoreError::Backend(format!(
            "consent records of subject {subject} were appended by others {APPEND_ATTEMPTS} times while this one was; try again"
        ))))
    }

    /// The link a request id was appended as, if it was.
    async fn requested(
        &self,
        subject: &SubjectHandle,
        request_key: &[u8],
    ) -> Result<Option<ConsentLink>, MemoryError> {
        let Some(seq) = self
            .store
            .memory_get(&self.tenant, vec![request_key.to_vec()])
            .await?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let seq = <[u8; 8]>::try_from(seq.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| self.corrupt(subject, "a request's position is not 8 bytes"))?;
        let link_key = keys::link(&self.tenant, subject, seq);
        let value = self
            .store
            .memory_get(&self.tenant, vec![link_key.clone()])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| {
                self.corrupt(subject, format!("a request names link {seq}, which is not there"))
            })?;
        self.decode(
            subject,
            &keys::chain_prefix(&self.tenant, subject),
            &link_key,
            &value,
        )
        .map(Some)
    }

    fn decode(
        &self,
        subject: &SubjectHandle,
        prefix: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Result<ConsentLink, MemoryError> {
        let link: ConsentLink =
            serde_json::from_slice(value).map_err(|e| self.corrupt(subject, e.to_string()))?;
        if keys::link_seq(prefix, key) != Some(link.seq) {
            return Err(self.corrupt(subject, format!("link {} is kept at another position", link.seq)));
        }
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

    /// `subject`'s whole history, oldest first, verified against `key` (see
    /// [`ConsentHistory::verify`]). Anything else is reported as corrupt, never folded into
    /// what is in force.
    pub async fn history(
        &self,
        subject: &SubjectHandle,
        key: &PublicKey,
    ) -> Result<ConsentHistory, MemoryError> {
        let limit = usize::try_from(MAX_RECORDS_PER_SUBJECT + REVOCATION_HEADROOM + 1).unwrap_or(usize::MAX);
        self.read_verified(subject, limit, |links, head| {
            let history = ConsentHistory {
                links: links.to_vec(),
                head: head.clone(),
            };
            history.verify(&self.tenant, subject, key)
        })
        .await
    }

    /// The newest `count` links (oldest first) and the head, read from one snapshot, once
    /// `check` passes on them; what fails it is corrupt.
    async fn read_verified(
        &self,
        subject: &SubjectHandle,
        count: usize,
        check: impl Fn(&[ConsentLink], &Option<ConsentHead>) -> Result<(), String>,
    ) -> Result<ConsentHistory, MemoryError> {
        let prefix = keys::chain_prefix(&self.tenant, subject);
        let end = super::keys::prefix_end(&prefix);
        let (mut values, pairs) = self
            .store
            .memory_snapshot(
                &self.tenant,
                vec![keys::head(&self.tenant, subject)],
                prefix.clone(),
                end,
                count,
            )
            .await?;
        let mut links = pairs
            .iter()
            .map(|(key, value)| self.decode(subject, &prefix, key, value))
            .collect::<Result<Vec<_>, _>>()?;
        links.reverse();
        let head = match values.pop().flatten() {
            Some(bytes) => Some(
                serde_json::from_slice::<ConsentHead>(&bytes)
                    .map_err(|e| self.corrupt(subject, format!("the signed head: {e}")))?,
            ),
            None => None,
        };
        check(&links, &head).map_err(|problem| self.corrupt(subject, problem))?;
        Ok(ConsentHistory { links, head })
    }

    /// The subjects that have consent records, in order, at most `limit`.
    pub async fn subjects(&self, limit: usize) -> Result<Vec<SubjectHandle>, MemoryError> {
        let prefix = keys::subjects_prefix(&self.tenant);
        let end = super::keys::prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        while out.len() < limit {
            let want = LIST_PAGE.min(limit - out.len());
            let page = self
                .store
                .memory_scan(&self.tenant, start, end.clone(), want)
                .await?;
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
                Some((last, _)) if page.len() == want => start = super::keys::after(last),
                _ => break,
            }
        }
        Ok(out)
    }
}
