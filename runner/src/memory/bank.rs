//! A tenant's memory in a store backend: keeping an item with its index rows in one
//! transaction, forgetting it the same way, and recall — the newest items of a scope that match
//! a query and that the caller's check admits.

use super::sealed::{self, ScopeKeys};
use super::{
    Exclusion, ItemId, ItemScope, MAX_RECALL_ITEMS, MemoryError, MemoryItem, RecallQuery,
    backend::{Change, Guard, MemoryBackend, Write, count_of},
    keys,
    terms::{MAX_QUERY_TERMS, TermKey, entity_type_term, holds_all, item_terms, query_terms, words},
};
use std::collections::BTreeSet;

use crate::{
    consent::SubjectHandle,
    ontology::EntityTypeName,
    records::{Hash, StoreError, TenantId},
    vault::{KeyUse, SecretKey},
};

/// The most index rows one recall reads before it stops (and says so): a query whose every
/// word is common, with most matches refused by the check, still ends quickly.
pub const MAX_EXAMINED: usize = 5_000;
/// The most bytes of item text one recall checks (classifies and judges against consent)
/// before it stops (and says so): items all refused after their check — a subject's after a
/// revocation, say — cost a recall no more than this, however large each is.
pub const MAX_CHECKED_BYTES: usize = 4 << 20;
/// The most exclusions a recall lists (the rest are counted).
pub const MAX_LISTED_EXCLUSIONS: usize = 100;
/// The most items one write keeps.
pub const MAX_KEEP_BATCH: usize = 256;
/// Index rows read per scan after the first.
const PAGE: usize = 256;
/// An index row's value: the key says it all (TiKV keeps no empty values).
const ROW: &[u8] = b"1";

/// Whether an item was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    New(ItemId),
    /// The same item (same content, same provenance) was kept before; nothing changed.
    AlreadyKept(ItemId),
}

/// Why a recall stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// It found as many items as it was asked for.
    Filled,
    /// It read every item that matches.
    Exhausted,
    /// It read [`MAX_EXAMINED`] index rows, or checked [`MAX_CHECKED_BYTES`] of items; older
    /// matches were not looked at.
    ExaminedLimit,
}

/// What a recall found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recalled {
    /// Newest first.
    pub offered: Vec<(ItemId, MemoryItem)>,
    /// Items that matched and were refused by the check, newest first (at most
    /// [`MAX_LISTED_EXCLUSIONS`]).
    pub excluded: Vec<Exclusion>,
    pub excluded_total: usize,
    pub examined: usize,
    pub stop: Stop,
}

/// One tenant's memory in `store`.
#[derive(Debug)]
pub struct MemoryBank<'s, S> {
    store: &'s S,
    tenant: TenantId,
    keys: ScopeKeys<'s, S>,
}

impl<'s, S: MemoryBackend> MemoryBank<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
            keys: ScopeKeys::new(store, tenant),
        }
    }

    /// Opens `subject`'s memory with `key` instead of asking the vault (an erasure under way).
    pub fn with_subject_key(self, subject: SubjectHandle, key: SecretKey) -> Self {
        self.keys.give(subject, key);
        self
    }

    /// The marker of what `item` says (keyed for a subject's item).
    fn known(&self, item: &MemoryItem, key: Option<&SecretKey>) -> Vec<u8> {
        keys::known_as(&self.tenant, &sealed::what_it_says(item, key))
    }

    /// The index rows of `item` (every one holds the item's id last), and the words counted.
    fn index_rows(
        &self,
        id: &ItemId,
        item: &MemoryItem,
        key: Option<&SecretKey>,
    ) -> (Vec<Vec<u8>>, Vec<TermKey>) {
        let (t, scope, at) = (&self.tenant, &item.scope, item.provenance.at_ms);
        let mut rows = vec![
            keys::row(&keys::by_type_prefix(t, scope, Some(item.memory_type)), at, id),
            keys::row(&keys::by_type_prefix(t, scope, None), at, id),
        ];
        let types: BTreeSet<&EntityTypeName> = item.entities.iter().map(|e| &e.entity_type).collect();
        let terms: Vec<TermKey> = item_terms(&item.text)
            .into_iter()
            .chain(types.into_iter().map(entity_type_term))
            .map(|term| sealed::term(scope, term, key))
            .collect();
        rows.extend(
            terms
                .iter()
                .map(|term| keys::row(&keys::by_term_prefix(t, scope, term), at, id)),
        );
        (rows, terms)
    }

    /// Keeps `item` (validated first): the item and all its index rows in one transaction.
    pub async fn keep(&self, item: &MemoryItem) -> Result<Kept, MemoryError> {
        let mut kept = self.keep_all(std::slice::from_ref(item)).await?;
        Ok(kept.remove(0))
    }

    /// Keeps `item` unless the same thing — same scope, type and text — is kept already and
    /// still recallable at `now_ms`; then answers with that item. A model that learns the same
    /// fact in every session keeps it once, and a call retried after a crash keeps nothing
    /// twice. (Forgetting an item forgets that it was known: it may be kept again.)
    /// The item saying what `item` says, if one is kept and recallable at `now_ms`.
    pub async fn kept_already(&self, item: &MemoryItem, now_ms: i64) -> Result<Option<ItemId>, MemoryError> {
        let key = self.keys.key(&item.scope, KeyUse::Read).await?;
        if item.scope.subject().is_some() && key.is_none() {
            return Ok(None);
        }
        let holder = self
            .store
            .memory_get(&self.tenant, vec![self.known(item, key.as_ref())])
            .await?
            .pop()
            .flatten();
        if let Some(id) = holder.as_deref().and_then(marker_item)
            && let Ok(Some(known)) = self.get(&id).await
            && known.expires_at_ms.is_none_or(|e| e > now_ms)
        {
            return Ok(Some(id));
        }
        Ok(None)
    }

    pub async fn keep_new(&self, item: &MemoryItem, now_ms: i64) -> Result<Kept, MemoryError> {
        item.validate()?;
        let key = self.keys.key(&item.scope, KeyUse::Keep).await?;
        let marker = self.known(item, key.as_ref());
        let holder = self
            .store
            .memory_get(&self.tenant, vec![marker.clone()])
            .await?
            .pop()
            .flatten();
        if let Some(id) = holder.as_deref().and_then(marker_item)
            && let Ok(Some(known)) = self.get(&id).await
            && known.expires_at_ms.is_none_or(|e| e > now_ms)
        {
            return Ok(Kept::AlreadyKept(id));
        }
        let id = item.id();
        let mut write = self.keep_write(&id, item, key.as_ref())?;
        // The marker is taken where no one holds it, or from the lapsed holder just read: of two
        // Sessions keeping the same thing at once, one keeps it. (An item is new whenever its
        // marker is free: its id holds the time it was kept, so only a retry of this very keep
        // could find it stored already — and that finds the marker naming it, above.)
        write.guard = match holder {
            None => Guard::Absent(marker.clone()),
            Some(lapsed) => Guard::AbsentOr(marker.clone(), lapsed),
        };
        write
            .changes
            .push(Change::Put(marker.clone(), id.to_string().into_bytes()));
        if self.store.memory_write(&self.tenant, vec![write]).await?.first() == Some(&true) {
            return Ok(Kept::New(id));
        }
        let holder = self
            .store
            .memory_get(&self.tenant, vec![marker])
            .await?
            .pop()
            .flatten();
        Ok(Kept::AlreadyKept(
            holder.as_deref().and_then(marker_item).unwrap_or(id),
        ))
    }

    /// Keeps `items` in one transaction: all of them (with their index rows) or, if any is
    /// invalid or the write fails, none.
    pub async fn keep_all(&self, items: &[MemoryItem]) -> Result<Vec<Kept>, MemoryError> {
        if items.len() > MAX_KEEP_BATCH {
            return Err(MemoryError::Invalid(format!(
                "{} items in one write, more than {MAX_KEEP_BATCH}; write them in batches",
                items.len()
            )));
        }
        for (index, item) in items.iter().enumerate() {
            item.validate().map_err(|e| match e {
                MemoryError::Invalid(problem) if items.len() > 1 => {
                    MemoryError::Invalid(format!("item {index}: {problem}"))
                }
                other => other,
            })?;
        }
        let ids: Vec<ItemId> = items.iter().map(MemoryItem::id).collect();
        let mut writes = Vec::with_capacity(items.len());
        for (item, id) in items.iter().zip(&ids) {
            let key = self.keys.key(&item.scope, KeyUse::Keep).await?;
            writes.push(self.keep_write(id, item, key.as_ref())?);
        }
        let applied = self.store.memory_write(&self.tenant, writes).await?;
        Ok(ids
            .into_iter()
            .zip(applied)
            .map(|(id, new)| if new { Kept::New(id) } else { Kept::AlreadyKept(id) })
            .collect())
    }

    /// The write keeping `item`, unless an item with its id is kept already.
    fn keep_write(
        &self,
        id: &ItemId,
        item: &MemoryItem,
        secret: Option<&SecretKey>,
    ) -> Result<Write, MemoryError> {
        let key = keys::item(&self.tenant, id);
        // Plain data with string keys: serialization cannot fail.
        let value = serde_json::to_vec(&sealed::seal(item, secret)?).unwrap_or_default();
        let (rows, terms) = self.index_rows(id, item, secret);
        let mut changes = Vec::with_capacity(1 + rows.len() + terms.len());
        changes.push(Change::Put(key.clone(), value));
        changes.extend(rows.into_iter().map(|row| Change::Put(row, ROW.to_vec())));
        changes.extend(
            terms
                .iter()
                .map(|term| Change::Count(keys::term_count(&self.tenant, &item.scope, term, id), 1)),
        );
        Ok(Write {
            guard: Guard::Absent(key),
            changes,
        })
    }

    /// The item `id`, if kept (checked against its id: a value that does not hash to the key
    /// it is under is reported corrupt, never returned).
    pub async fn get(&self, id: &ItemId) -> Result<Option<MemoryItem>, MemoryError> {
        let mut values = self
            .store
            .memory_get(&self.tenant, vec![keys::item(&self.tenant, id)])
            .await?;
        match values.pop().flatten() {
            Some(value) => Ok(Some(self.decode(id, &value).await?)),
            None => Ok(None),
        }
    }

    /// Removes the item `id` and its index rows in one transaction; whether it was there. A
    /// corrupt item is removed too (what cannot be read cannot be kept): if its bytes still read
    /// as an item, with the rows they name; otherwise alone, its rows left to point at nothing
    /// (recall skips them).
    pub async fn forget(&self, id: &ItemId) -> Result<bool, MemoryError> {
        let key = keys::item(&self.tenant, id);
        let Some(value) = self
            .store
            .memory_get(&self.tenant, vec![key])
            .await?
            .pop()
            .flatten()
        else {
            return Ok(false);
        };
        let writes = self.forget_writes(id, &value).await;
        let applied = self.store.memory_write(&self.tenant, writes).await?;
        Ok(applied.first().copied().unwrap_or(false))
    }

    /// The writes removing the item `id` kept as `value`: the item, the rows its content names
    /// and its word counts — or, if it no longer reads as an item, the item alone — and then its
    /// "kept once" marker, if the marker still names this item (a newer item saying the same
    /// keeps its own).
    async fn forget_writes(&self, id: &ItemId, value: &[u8]) -> Vec<Write> {
        let key = keys::item(&self.tenant, id);
        let mut changes = vec![Change::Delete(key.clone())];
        let mut marker = None;
        let stored = self.parse(id, value).ok();
        let secret = match &stored {
            Some(item) => self.keys.key(&item.scope, KeyUse::Read).await.ok().flatten(),
            None => None,
        };
        if let Some(item) = stored.and_then(|stored| sealed::open(stored, secret.as_ref()).ok()) {
            let known = self.known(&item, secret.as_ref());
            marker = Some(Write {
                guard: Guard::AbsentOr(known.clone(), id.to_string().into_bytes()),
                changes: vec![Change::Delete(known)],
            });
            let (rows, terms) = self.index_rows(id, &item, secret.as_ref());
            changes.extend(rows.into_iter().map(Change::Delete));
            changes.extend(
                terms
                    .iter()
                    .map(|term| Change::Count(keys::term_count(&self.tenant, &item.scope, term, id), -1)),
            );
        }
        let mut writes = vec![Write {
            guard: Guard::Present(key),
            changes,
        }];
        writes.extend(marker);
        writes
    }

    /// Forgets every item of `scope` — a subject's whole memory, when they ask for it — a page
    /// of [`MAX_KEEP_BATCH`] items per transaction; how many were forgotten.
    pub async fn forget_scope(&self, scope: &ItemScope) -> Result<usize, MemoryError> {
        let prefix = keys::by_type_prefix(&self.tenant, scope, None);
        let end = keys::prefix_end(&prefix);
        let mut forgotten = 0;
        loop {
            // Forgotten rows disappear, so each page starts at the front again.
            let rows = self
                .store
                .memory_scan(&self.tenant, prefix.clone(), end.clone(), MAX_KEEP_BATCH)
                .await?;
            if rows.is_empty() {
                return Ok(forgotten);
            }
            let ids = row_items(&rows)?;
            let values = self
                .store
                .memory_get(
                    &self.tenant,
                    ids.iter().map(|id| keys::item(&self.tenant, id)).collect(),
                )
                .await?;
            // Each item's removal first, then the markers: the count is of the first `items`.
            let (mut writes, mut markers): (Vec<Write>, Vec<Write>) = (Vec::new(), Vec::new());
            for (id, value) in ids.iter().zip(&values) {
                if let Some(value) = value {
                    let mut item_writes = self.forget_writes(id, value).await.into_iter();
                    writes.extend(item_writes.next());
                    markers.extend(item_writes);
                }
            }
            let items = writes.len();
            writes.append(&mut markers);
            // The scanned rows go too, whatever the items said their rows were (a changed item
            // names others; a gone one none), so the scan always moves on.
            writes.extend(rows.into_iter().map(|(key, _)| Write {
                guard: Guard::Present(key.clone()),
                changes: vec![Change::Delete(key)],
            }));
            let applied = self.store.memory_write(&self.tenant, writes).await?;
            forgotten += applied.iter().take(items).filter(|a| **a).count();
        }
    }

    /// Forgets a scope's items ([`Self::forget_scope`]) and the candidates held for it: a
    /// subject's whole memory, when they ask for it; how many of both.
    pub async fn forget_scope_and_held(&self, scope: &ItemScope) -> Result<usize, MemoryError> {
        let items = self.forget_scope(scope).await?;
        let held = super::held::HeldCandidates::new(self.store, &self.tenant)
            .forget_scope(scope)
            .await?;
        Ok(items + held)
    }

    fn corrupt(&self, id: &ItemId, problem: String) -> MemoryError {
        MemoryError::Store(StoreError::Corrupt {
            key: format!("cx/{}/m/i/{id}", self.tenant),
            problem,
        })
    }

    /// An item as stored (a subject's text still encrypted).
    fn parse(&self, id: &ItemId, value: &[u8]) -> Result<MemoryItem, MemoryError> {
        serde_json::from_slice(value).map_err(|e| self.corrupt(id, e.to_string()))
    }

    /// An item as stored, opened with `key` (its scope's).
    fn parse_open(
        &self,
        id: &ItemId,
        value: &[u8],
        key: Option<&SecretKey>,
    ) -> Result<MemoryItem, MemoryError> {
        sealed::open(self.parse(id, value)?, key).map_err(|problem| self.corrupt(id, problem))
    }

    /// A value that does not hash to the id it is kept under is reported, never returned.
    fn verify(&self, id: &ItemId, item: &MemoryItem) -> Result<(), MemoryError> {
        if item.id() == *id {
            Ok(())
        } else {
            Err(self.corrupt(id, "the item does not hash to the id it is kept under".into()))
        }
    }

    async fn decode(&self, id: &ItemId, value: &[u8]) -> Result<MemoryItem, MemoryError> {
        let stored = self.parse(id, value)?;
        let key = self.keys.key(&stored.scope, KeyUse::Read).await?;
        let item = sealed::open(stored, key.as_ref()).map_err(|problem| self.corrupt(id, problem))?;
        self.verify(id, &item)?;
        Ok(item)
    }

    /// The newest items of the query's scope (and type) holding every word of its text, that
    /// `admit` lets through; what `admit` refuses is listed with its reason. The check runs on
    /// every recall, so a consent revoked before it is honoured by it.
    pub async fn recall(
        &self,
        query: &RecallQuery,
        mut admit: impl FnMut(&MemoryItem) -> Result<(), String>,
    ) -> Result<Recalled, MemoryError> {
        if query.max_items == 0 || query.max_items > MAX_RECALL_ITEMS {
            return Err(MemoryError::BadQuery(format!(
                "maxItems is {}; ask for 1 to {MAX_RECALL_ITEMS} items",
                query.max_items
            )));
        }
        let key = self.keys.key(&query.scope, KeyUse::Read).await?;
        let words_asked = query_terms(&query.text).map_err(MemoryError::BadQuery)?;
        let no_word = words_asked.is_empty();
        let terms: Vec<TermKey> = words_asked
            .into_iter()
            .chain(query.entity_type.iter().map(entity_type_term))
            .map(|term| sealed::term(&query.scope, term, key.as_ref()))
            .collect();
        if no_word && !query.text.trim().is_empty() {
            // Not "the newest items": the caller asked for something, and it cannot be found.
            return Err(MemoryError::BadQuery(format!(
                "the query {:?} has no word the index keeps (two characters or more, at most 64 bytes); leave it empty for the newest items",
                query.text.chars().take(64).collect::<String>()
            )));
        }
        let words = words(&query.text, MAX_QUERY_TERMS);
        // Bytes of item text checked so far (see MAX_CHECKED_BYTES).
        let mut checked = 0usize;
        let mut recalled = Recalled {
            offered: Vec::new(),
            excluded: Vec::new(),
            excluded_total: 0,
            examined: 0,
            stop: Stop::Exhausted,
        };
        if query.scope.subject().is_some() && key.is_none() {
            // An erased subject (or one nothing was ever kept about): nothing of theirs opens.
            return Ok(recalled);
        }
        let (prefix, filter) = if terms.is_empty() {
            (
                keys::by_type_prefix(&self.tenant, &query.scope, query.memory_type),
                false,
            )
        } else {
            // Scan the rarest word's rows; check the others (and the type) on each item.
            let counted: Vec<Vec<u8>> = terms
                .iter()
                .flat_map(|term| keys::term_count_shards(&self.tenant, &query.scope, term))
                .collect();
            let counts = self.store.memory_get(&self.tenant, counted).await?;
            let Some((rarest, count)) = terms
                .iter()
                .zip(
                    counts
                        .chunks(usize::from(keys::COUNT_SHARDS))
                        .map(|shards| shards.iter().map(|c| count_of(c.as_deref())).sum::<u64>()),
                )
                .min_by_key(|(_, count)| *count)
            else {
                return Ok(recalled);
            };
            if count == 0 {
                return Ok(recalled);
            }
            (keys::by_term_prefix(&self.tenant, &query.scope, rarest), true)
        };
        let end = keys::prefix_end(&prefix);
        let mut start = prefix;
        let mut page = (query.max_items * 2).clamp(16, PAGE);
        loop {
            let limit = page.min(MAX_EXAMINED - recalled.examined);
            let rows = self
                .store
                .memory_scan(&self.tenant, start, end.clone(), limit)
                .await?;
            recalled.examined += rows.len();
            let ids = row_items(&rows)?;
            let values = self
                .store
                .memory_get(
                    &self.tenant,
                    ids.iter().map(|id| keys::item(&self.tenant, id)).collect(),
                )
                .await?;
            for (id, value) in ids.iter().zip(values) {
                // A row whose item is gone: forgotten between the scan and the read.
                let Some(value) = value else { continue };
                let item = match self.parse_open(id, &value, key.as_ref()) {
                    Ok(item) => item,
                    Err(error) => {
                        exclude(&mut recalled, *id, format!("corrupt: {error}"));
                        continue;
                    }
                };
                // The row's scope is not the item's word: a stale or planted row pointing at
                // another scope's item offers nothing.
                if item.scope != query.scope
                    || query.memory_type.is_some_and(|t| t != item.memory_type)
                    || (filter && !holds_all(&item.text, &words))
                    || query
                        .entity_type
                        .as_ref()
                        .is_some_and(|t| !item.entities.iter().any(|e| e.entity_type == *t))
                {
                    continue;
                }
                // Checked for every item offered or excluded (one filtered out is neither); a
                // corrupt one is reported, and the rest of the recall goes on.
                if let Err(error) = self.verify(id, &item) {
                    tracing::warn!(tenant = %self.tenant, item = %id, %error, "a memory item is corrupt; not offered");
                    exclude(&mut recalled, *id, format!("corrupt: {error}"));
                    continue;
                }
                if checked > MAX_CHECKED_BYTES {
                    recalled.stop = Stop::ExaminedLimit;
                    return Ok(recalled);
                }
                checked += item.text.len();
                match admit(&item) {
                    Ok(()) => recalled.offered.push((*id, item)),
                    Err(reason) => exclude(&mut recalled, *id, reason),
                }
                if recalled.offered.len() == query.max_items {
                    recalled.stop = Stop::Filled;
                    return Ok(recalled);
                }
            }
            let Some((last, _)) = rows.last() else {
                return Ok(recalled);
            };
            if rows.len() < limit {
                return Ok(recalled);
            }
            if recalled.examined >= MAX_EXAMINED {
                recalled.stop = Stop::ExaminedLimit;
                return Ok(recalled);
            }
            start = keys::after(last);
            // The next page holds about as many rows as the rest needs at the rate seen so far
            // (a rare word's rows mostly pass, a common one's with another word mostly not).
            let needed = query.max_items - recalled.offered.len();
            page = match recalled.offered.len() {
                0 => PAGE,
                offered => (needed * recalled.examined * 3 / (offered * 2)).clamp(16, PAGE),
            };
        }
    }
}

/// Lists an item a recall did not offer, with the reason (counted past the listing's bound).
fn exclude(recalled: &mut Recalled, item: ItemId, reason: String) {
    recalled.excluded_total += 1;
    if recalled.excluded.len() < MAX_LISTED_EXCLUSIONS {
        recalled.excluded.push(Exclusion { item, reason });
    }
}

/// The items index rows point at (a row without one is corrupt).
fn row_items(rows: &super::backend::Pairs) -> Result<Vec<ItemId>, MemoryError> {
    rows.iter()
        .map(|(key, _)| {
            keys::row_item(key).ok_or_else(|| {
                MemoryError::Store(StoreError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    problem: "an index row without an item id".into(),
                })
            })
        })
        .collect()
}

/// The item a "kept once" marker names.
fn marker_item(value: &[u8]) -> Option<ItemId> {
    Hash::parse(std::str::from_utf8(value).ok()?).map(ItemId)
}
