//! Held candidates: proposals the memory policy did not drop but would not keep yet — a person
//! must review them (`review: required`), or a consent must cover them first (`withoutConsent:
//! hold`). A held candidate is never recalled. A person approves it (kept then, if consent
//! covers it at that moment, with their name on its provenance) or rejects it; unreviewed, it
//! lapses after [`HOLD_MS`].

use serde::{Deserialize, Serialize};

use super::{
    ItemId, ItemScope, MemoryError, MemoryItem,
    backend::{Change, Guard, MemoryBackend, Write},
    bank::{Kept, MemoryBank},
    consents::ConsentBook,
    keys,
};
use crate::records::{StoreError, TenantId};

/// How long a candidate is held for review (30 days); then it lapses, unkept.
pub const HOLD_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Held candidates read at most per listing.
const MAX_LISTED: usize = 5_000;

/// A candidate as held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    /// The item it would be.
    pub item: MemoryItem,
    /// Why it is held (the decision's reason).
    pub reason: String,
    pub held_at_ms: i64,
}

impl Held {
    pub fn lapsed(&self, now_ms: i64) -> bool {
        self.held_at_ms.saturating_add(HOLD_MS) <= now_ms
    }
}

/// One tenant's held candidates in `store`.
#[derive(Debug)]
pub struct HeldCandidates<'s, S> {
    store: &'s S,
    tenant: TenantId,
}

impl<'s, S: MemoryBackend> HeldCandidates<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
        }
    }

    fn corrupt(&self, id: &ItemId, problem: String) -> MemoryError {
        MemoryError::Store(StoreError::Corrupt {
            key: format!("cx/{}/m/h/{id}", self.tenant),
            problem,
        })
    }

    /// Holds `item` (validated) for `reason`; its id. Held twice, it is one candidate.
    pub async fn hold(&self, item: &MemoryItem, reason: &str, at_ms: i64) -> Result<ItemId, MemoryError> {
        item.validate()?;
        let id = item.id();
        let held = Held {
            item: item.clone(),
            reason: reason.to_owned(),
            held_at_ms: at_ms,
        };
        let key = keys::held(&self.tenant, &id);
        // Plain data with string keys: serialization cannot fail.
        let write = Write {
            guard: Guard::Absent(key.clone()),
            changes: vec![Change::Put(key, serde_json::to_vec(&held).unwrap_or_default())],
        };
        self.store.memory_write(&self.tenant, vec![write]).await?;
        Ok(id)
    }

    /// The held candidate `id`, lapsed or not.
    pub async fn get(&self, id: &ItemId) -> Result<Option<Held>, MemoryError> {
        let value = self
            .store
            .memory_get(&self.tenant, vec![keys::held(&self.tenant, id)])
            .await?
            .pop()
            .flatten();
        value
            .map(|bytes| {
                let held: Held =
                    serde_json::from_slice(&bytes).map_err(|e| self.corrupt(id, e.to_string()))?;
                if held.item.id() == *id {
                    Ok(held)
                } else {
                    Err(self.corrupt(
                        id,
                        "the candidate does not hash to the id it is held under".into(),
                    ))
                }
            })
            .transpose()
    }

    /// Candidates held now (not lapsed), of `scope` if given.
    pub async fn list(
        &self,
        scope: Option<&ItemScope>,
        now_ms: i64,
    ) -> Result<Vec<(ItemId, Held)>, MemoryError> {
        let prefix = keys::held_prefix(&self.tenant);
        let end = keys::prefix_end(&prefix);
        let pairs = self
            .store
            .memory_scan(&self.tenant, prefix.clone(), end, MAX_LISTED)
            .await?;
        let mut out = Vec::new();
        for (key, value) in pairs {
            let Some(id) = key
                .strip_prefix(prefix.as_slice())
                .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
                .map(|raw| ItemId(crate::records::Hash(raw)))
            else {
                continue;
            };
            let held: Held = serde_json::from_slice(&value).map_err(|e| self.corrupt(&id, e.to_string()))?;
            if held.lapsed(now_ms) || scope.is_some_and(|s| *s != held.item.scope) {
                continue;
            }
            out.push((id, held));
        }
        Ok(out)
    }

    /// Keeps the held candidate `id`, reviewed by `reviewer`, if `admit` lets it through now
    /// (its subject's consent covers it at this moment); the kept item's id.
    pub async fn approve(
        &self,
        id: &ItemId,
        reviewer: &str,
        now_ms: i64,
        admit: impl FnOnce(&MemoryItem) -> Result<(), String>,
    ) -> Result<Kept, MemoryError> {
        let held = self
            .get(id)
            .await?
            .ok_or_else(|| MemoryError::Invalid(format!("no candidate {id} is held")))?;
        if held.lapsed(now_ms) {
            return Err(MemoryError::Invalid(format!(
                "candidate {id} lapsed: it was held more than 30 days without review"
            )));
        }
        admit(&held.item).map_err(|why| {
            MemoryError::Invalid(format!(
                "candidate {id} cannot be kept now: {why}; record the consent first"
            ))
        })?;
        let mut item = held.item;
        item.provenance.reviewed_by = Some(reviewer.to_owned());
        let kept = MemoryBank::new(self.store, &self.tenant)
            .keep_new(&item, now_ms)
            .await?;
        self.reject(id).await?;
        Ok(kept)
    }

    /// Approves `id` as [`Self::approve`] does, checking it against its subject's consents in
    /// force now (their chain verified with `consent_key`): personal data is kept only under a
    /// consent for the purpose it was proposed for, whoever approves it.
    pub async fn approve_under_consent(
        &self,
        id: &ItemId,
        reviewer: &str,
        now_ms: i64,
        consent_key: &crate::keys::PublicKey,
    ) -> Result<Kept, MemoryError> {
        let held = self
            .get(id)
            .await?
            .ok_or_else(|| MemoryError::Invalid(format!("no candidate {id} is held")))?;
        let ledger = match held.item.scope.subject() {
            Some(subject) => ConsentBook::new(self.store, &self.tenant)
                .history(subject, consent_key)
                .await?
                .ledger(),
            None => crate::consent::ConsentLedger::default(),
        };
        self.approve(id, reviewer, now_ms, |item| {
            super::admit(item, item.purpose.as_ref(), &ledger, now_ms)
        })
        .await
    }

    /// Drops the held candidate `id`; whether it was held.
    pub async fn reject(&self, id: &ItemId) -> Result<bool, MemoryError> {
        let key = keys::held(&self.tenant, id);
        let write = Write {
            guard: Guard::Present(key.clone()),
            changes: vec![Change::Delete(key)],
        };
        Ok(self.store.memory_write(&self.tenant, vec![write]).await?.first() == Some(&true))
    }
}
