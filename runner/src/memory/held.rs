//! Held candidates: proposals the memory policy did not drop but would not keep yet — a person
//! must review them (`review: required`), or a consent must cover them first (`withoutConsent:
//! hold`). A held candidate is never recalled. A person approves it (kept then, if consent
//! covers it at that moment, with their name on its provenance) or rejects it; unreviewed, it
//! lapses after [`HOLD_MS`] and is deleted. A candidate is held by what it says: the same
//! proposal made again (a call retried after a crash, the next Session) is one candidate.

use serde::{Deserialize, Serialize};

use super::{
    ItemId, ItemScope, MemoryError, MemoryItem,
    backend::{Change, Guard, MemoryBackend, Write},
    bank::{Kept, MemoryBank},
    consents::ConsentBook,
    keys,
    sealed::{self, ScopeKeys},
};
use crate::{
    records::{Hash, StoreError, TenantId},
    vault::{KeyUse, SecretKey},
};

/// How long a candidate is held for review (30 days); then it lapses, unkept, and is deleted.
pub const HOLD_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Candidates one scope may have waiting: a model proposing without end cannot bury a
/// subject's candidates (or their listing) under its own.
pub const MAX_HELD_PER_SCOPE: usize = 1_000;
/// Candidates read at most per listing of the whole tenant (a scope's listing is complete).
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

/// A held candidate's id: what it says (see [`keys::what_it_says`]), keyed under its subject's
/// memory key for a subject's candidate.
fn held_id(item: &MemoryItem, key: Option<&SecretKey>) -> ItemId {
    ItemId(Hash(sealed::what_it_says(item, key)))
}

/// One tenant's held candidates in `store`.
#[derive(Debug)]
pub struct HeldCandidates<'s, S> {
    store: &'s S,
    tenant: TenantId,
    keys: ScopeKeys<'s, S>,
}

impl<'s, S: MemoryBackend> HeldCandidates<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
            keys: ScopeKeys::new(store, tenant),
        }
    }

    fn corrupt(&self, id: &ItemId, problem: String) -> MemoryError {
        MemoryError::Store(StoreError::Corrupt {
            key: format!("cx/{}/m/q/{id}", self.tenant),
            problem,
        })
    }

    async fn decode(&self, id: &ItemId, bytes: &[u8]) -> Result<Held, MemoryError> {
        let mut held: Held = serde_json::from_slice(bytes).map_err(|e| self.corrupt(id, e.to_string()))?;
        let key = self.keys.key(&held.item.scope, KeyUse::Read).await?;
        held.item = sealed::open(held.item, key.as_ref()).map_err(|problem| self.corrupt(id, problem))?;
        if held_id(&held.item, key.as_ref()) == *id {
            Ok(held)
        } else {
            Err(self.corrupt(id, "the candidate is not held under what it says".into()))
        }
    }

    /// Holds `item` (validated) for `reason`; its id. Held again, it is the same candidate.
    pub async fn hold(&self, item: &MemoryItem, reason: &str, at_ms: i64) -> Result<ItemId, MemoryError> {
        item.validate()?;
        let key = self.keys.key(&item.scope, KeyUse::Keep).await?;
        let id = held_id(item, key.as_ref());
        if self.get(&id).await?.is_some_and(|held| !held.lapsed(at_ms)) {
            return Ok(id);
        }
        let in_scope = keys::held_in_scope_prefix(&self.tenant, &item.scope);
        let waiting = self
            .store
            .memory_scan(
                &self.tenant,
                in_scope.clone(),
                keys::prefix_end(&in_scope),
                MAX_HELD_PER_SCOPE,
            )
            .await?;
        if waiting.len() >= MAX_HELD_PER_SCOPE {
            self.sweep(Some(&item.scope), at_ms).await?;
            return Err(MemoryError::Invalid(format!(
                "{MAX_HELD_PER_SCOPE} candidates of scope {} wait for review already; review them (contextos memory held) before more are held",
                item.scope
            )));
        }
        let held = Held {
            item: sealed::seal(item, key.as_ref())?,
            reason: reason.to_owned(),
            held_at_ms: at_ms,
        };
        // Plain data with string keys: serialization cannot fail.
        let write = Write {
            guard: Guard::Absent(keys::held(&self.tenant, &id)),
            changes: vec![
                Change::Put(
                    keys::held(&self.tenant, &id),
                    serde_json::to_vec(&held).unwrap_or_default(),
                ),
                Change::Put(keys::held_in_scope(&self.tenant, &item.scope, &id), b"1".to_vec()),
            ],
        };
        if self.store.memory_write(&self.tenant, vec![write]).await?.first() != Some(&true) {
            // A lapsed candidate under the same id: replaced by this one.
            self.remove(&id, &item.scope).await?;
            return Box::pin(self.hold(item, reason, at_ms)).await;
        }
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
        match value {
            Some(bytes) => Ok(Some(self.decode(id, &bytes).await?)),
            None => Ok(None),
        }
    }

    /// Candidates held now, of `scope` if given (complete for a scope; the first
    /// [`MAX_LISTED`] of the tenant otherwise). Lapsed ones met on the way are deleted.
    pub async fn list(
        &self,
        scope: Option<&ItemScope>,
        now_ms: i64,
    ) -> Result<Vec<(ItemId, Held)>, MemoryError> {
        let found = self.read(scope).await?;
        let (lapsed, held): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, h)| h.lapsed(now_ms));
        for (id, candidate) in &lapsed {
            self.remove(id, &candidate.item.scope).await?;
        }
        Ok(held)
    }

    /// The ids of `scope`'s candidates (or of the tenant's first ones), and their values as
    /// stored when they were read with the ids.
    async fn read_stored(
        &self,
        scope: Option<&ItemScope>,
    ) -> Result<Vec<(ItemId, Option<Vec<u8>>)>, MemoryError> {
        let (prefix, limit) = match scope {
            Some(scope) => (
                keys::held_in_scope_prefix(&self.tenant, scope),
                MAX_HELD_PER_SCOPE,
            ),
            None => (keys::held_prefix(&self.tenant), MAX_LISTED),
        };
        let pairs = self
            .store
            .memory_scan(&self.tenant, prefix.clone(), keys::prefix_end(&prefix), limit)
            .await?;
        let ids: Vec<ItemId> = pairs
            .iter()
            .filter_map(|(key, _)| {
                let raw: [u8; 32] = key.strip_prefix(prefix.as_slice())?.try_into().ok()?;
                Some(ItemId(Hash(raw)))
            })
            .collect();
        let values = match scope {
            None => pairs.into_iter().map(|(_, value)| Some(value)).collect(),
            Some(_) => {
                self.store
                    .memory_get(
                        &self.tenant,
                        ids.iter().map(|id| keys::held(&self.tenant, id)).collect(),
                    )
                    .await?
            }
        };
        Ok(ids.into_iter().zip(values).collect())
    }

    async fn read(&self, scope: Option<&ItemScope>) -> Result<Vec<(ItemId, Held)>, MemoryError> {
        let stored = self.read_stored(scope).await?;
        let mut out = Vec::with_capacity(stored.len());
        for (id, value) in stored {
            if let Some(bytes) = value {
                out.push((id, self.decode(&id, &bytes).await?));
            }
        }
        Ok(out)
    }

    /// Deletes the lapsed candidates of `scope` (or of the first page of the tenant).
    async fn sweep(&self, scope: Option<&ItemScope>, now_ms: i64) -> Result<(), MemoryError> {
        self.list(scope, now_ms).await.map(drop)
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
            self.remove(id, &held.item.scope).await?;
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
        self.remove(id, &item.scope).await?;
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
        match self.get(id).await? {
            Some(held) => self.remove(id, &held.item.scope).await,
            None => Ok(false),
        }
    }

    /// Forgets every candidate of `scope` (with the rest of a subject's memory); how many.
    pub async fn forget_scope(&self, scope: &ItemScope) -> Result<usize, MemoryError> {
        let mut forgotten = 0;
        loop {
            // Not opened: an erased subject's candidates are forgotten unread.
            let found = self.read_stored(Some(scope)).await?;
            if found.is_empty() {
                return Ok(forgotten);
            }
            for (id, _) in found {
                forgotten += usize::from(self.remove(&id, scope).await?);
            }
        }
    }

    /// Deletes candidate `id` of `scope` and its scope's index row; whether it was there.
    async fn remove(&self, id: &ItemId, scope: &ItemScope) -> Result<bool, MemoryError> {
        let key = keys::held(&self.tenant, id);
        let in_scope = keys::held_in_scope(&self.tenant, scope, id);
        let writes = vec![
            Write {
                guard: Guard::Present(key.clone()),
                changes: vec![Change::Delete(key.clone()), Change::Delete(in_scope.clone())],
            },
            // A scope's row left without its candidate goes too (the scope's listing moves on).
            Write {
                guard: Guard::Absent(key),
                changes: vec![Change::Delete(in_scope)],
            },
        ];
        Ok(self.store.memory_write(&self.tenant, writes).await?.first() == Some(&true))
    }
}
