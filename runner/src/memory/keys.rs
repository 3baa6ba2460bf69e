//! Where memory lives in a backend's ordered key space. Every key starts with
//! `cx/<tenant>/m/`: one contiguous range per tenant (beside its records, `cx/<tenant>/…` in
//! TiKV), so no scan reaches another tenant.
//!
//! - `i/<id>` → the item's JSON;
//! - `k/<what it says>` → the id of the item saying that (see [`known`]);
//! - `q/<what it says>` → a held candidate, `p/<scope>/<what it says>` its scope's index (see
//!   [`super::held`]);
//! - `x/<scope>/<type or *>/<newest><id>` → index of a scope's items, newest first, by type and
//!   of all types;
//! - `w/<scope>/<term><newest><id>` → index of a scope's items by word;
//! - `n/<scope>/<term><shard>` → how many items of the scope hold the word, in
//!   [`COUNT_SHARDS`] rows (the rarest word of a query is the one scanned).
//!
//! (Subjects' consent chains are beside them: `c/`, `h/`, `r/`, `s/`, see
//! [`super::consents`]; their wrapped data keys, `v/`, see `crate::vault`; and the tenant's
//! SpendQuota ledgers, `u/<quota>/<uid>`, see `crate::quota`; and which run uploaded which
//! blob, `b/<run><blob>`, see [`run_blob`].)
//!
//! `<newest>` is `u64::MAX − promoted-at ms`, big-endian, so ascending key order is newest
//! first; `<id>` and `<term>` are 32 raw bytes. Scopes and type names hold no `/`.

use super::{ItemId, ItemScope, MemoryType, terms::TermKey};
use crate::consent::SubjectHandle;
use crate::records::{Hash, TenantId};

/// The byte after an index row's fixed prefix: 8 bytes of time, then 32 of id.
pub const ROW_SUFFIX: usize = 8 + 32;

fn base(tenant: &TenantId) -> String {
    format!("cx/{tenant}/m/")
}

/// The prefix every memory key of `tenant` starts with.
pub fn tenant_prefix(tenant: &TenantId) -> Vec<u8> {
    base(tenant).into_bytes()
}

pub fn item(tenant: &TenantId, id: &ItemId) -> Vec<u8> {
    let mut key = format!("{}i/", base(tenant)).into_bytes();
    key.extend_from_slice(&id.0.0);
    key
}

/// The ledger of SpendQuota `name` (uid `uid`: a quota made again under its name starts
/// afresh), see `crate::quota`.
pub fn quota_ledger(tenant: &TenantId, name: &str, uid: &str) -> Vec<u8> {
    format!("{}u/{name}/{uid}", base(tenant)).into_bytes()
}

/// That run `run_id` uploaded blob `blob` (`b/<run><blob>`, the run id as its SHA-256, so
/// every mark has one length and none is a prefix of another): a runner's entries may name only
/// blobs its own run uploaded. Blobs are content-addressed per tenant, so without the mark a
/// hash learned elsewhere would read another run's blob, or tell whether it exists.
pub fn run_blob(tenant: &TenantId, run_id: &str, blob: &Hash) -> Vec<u8> {
    let mut key = run_blobs_prefix(tenant);
    key.extend_from_slice(&Hash::of(run_id.as_bytes()).0);
    key.extend_from_slice(&blob.0);
    key
}

/// Where every [`run_blob`] mark of `tenant` is.
pub fn run_blobs_prefix(tenant: &TenantId) -> Vec<u8> {
    format!("{}b/", base(tenant)).into_bytes()
}

/// A [`run_blob`] mark's value: the blob's size, so what a tenant's runners uploaded can be
/// summed.
pub fn run_blob_mark(size: u64) -> Vec<u8> {
    size.to_be_bytes().to_vec()
}

/// The size a [`run_blob`] mark holds (0 for marks written before they held one).
pub fn run_blob_size(mark: &[u8]) -> u64 {
    <[u8; 8]>::try_from(mark).map_or(0, u64::from_be_bytes)
}

/// A subject's wrapped data key in the identity vault (`v/d/<subject>`, see `crate::vault`).
pub fn vault_key(tenant: &TenantId, subject: &SubjectHandle) -> Vec<u8> {
    format!("{}d/{subject}", vault_base(tenant)).into_bytes()
}

/// Where a tenant's wrapped data keys are.
pub fn vault_keys_prefix(tenant: &TenantId) -> Vec<u8> {
    format!("{}d/", vault_base(tenant)).into_bytes()
}

/// The record of a subject's erasure (`v/e/<subject>`): once there, nothing is kept for them
/// again under that handle.
pub fn vault_erased(tenant: &TenantId, subject: &SubjectHandle) -> Vec<u8> {
    format!("{}e/{subject}", vault_base(tenant)).into_bytes()
}

fn vault_base(tenant: &TenantId) -> String {
    format!("{}v/", base(tenant))
}

/// A held candidate (`q/<what it says>`, see [`super::held`]): held by what it says, so the
/// same proposal held again (a retried call, the next Session) is one candidate.
pub fn held(tenant: &TenantId, id: &ItemId) -> Vec<u8> {
    let mut key = held_prefix(tenant);
    key.extend_from_slice(&id.0.0);
    key
}

/// Where a tenant's held candidates are.
pub fn held_prefix(tenant: &TenantId) -> Vec<u8> {
    format!("{}q/", base(tenant)).into_bytes()
}

/// The held candidates of `scope` (`p/<scope>/<what it says>` → nothing): a subject's are
/// found, and forgotten, with the rest of their memory.
pub fn held_in_scope_prefix(tenant: &TenantId, scope: &ItemScope) -> Vec<u8> {
    format!("{}p/{scope}/", base(tenant)).into_bytes()
}

pub fn held_in_scope(tenant: &TenantId, scope: &ItemScope, id: &ItemId) -> Vec<u8> {
    let mut key = held_in_scope_prefix(tenant, scope);
    key.extend_from_slice(&id.0.0);
    key
}

/// What an item says, as a hash: its scope, type, text, purpose, the personal data found in it
/// and the entities it refers to (the same text kept for another purpose is another item).
pub fn what_it_says(item: &super::MemoryItem) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let categories: Vec<String> = item.categories.iter().map(ToString::to_string).collect();
    for part in [
        item.scope.to_string().as_bytes(),
        type_name(Some(item.memory_type)).as_bytes(),
        item.text.as_bytes(),
        item.purpose.as_ref().map_or(&b""[..], |p| p.as_str().as_bytes()),
        categories.join(",").as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    // Only when it names any, so what items without entities say is as it always was.
    if !item.entities.is_empty() {
        let entities: Vec<String> = item.entities.iter().map(ToString::to_string).collect();
        let part = entities.join("\n");
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// The marker of what an item says (`k/<what it says>` → the id of the item that says it): the
/// same thing learned again is kept once.
/// (given as the digest of what it says, keyed for a subject's item: see `super::sealed`).
pub fn known_as(tenant: &TenantId, says: &[u8; 32]) -> Vec<u8> {
    let mut key = format!("{}k/", base(tenant)).into_bytes();
    key.extend_from_slice(says);
    key
}

fn type_name(memory_type: Option<MemoryType>) -> &'static str {
    match memory_type {
        None => "*",
        Some(MemoryType::Fact) => "fact",
        Some(MemoryType::Preference) => "preference",
        Some(MemoryType::Procedure) => "procedure",
        Some(MemoryType::Episode) => "episode",
    }
}

/// The newest-first index of `scope`'s items of `memory_type` (all types: `None`).
pub fn by_type_prefix(tenant: &TenantId, scope: &ItemScope, memory_type: Option<MemoryType>) -> Vec<u8> {
    format!("{}x/{scope}/{}/", base(tenant), type_name(memory_type)).into_bytes()
}

/// The newest-first index of `scope`'s items holding `term`.
pub fn by_term_prefix(tenant: &TenantId, scope: &ItemScope, term: &TermKey) -> Vec<u8> {
    let mut key = format!("{}w/{scope}/", base(tenant)).into_bytes();
    key.extend_from_slice(&term.0);
    key
}

/// A word's count is kept in this many rows, each item counted in one of them (by its id):
/// writers of different items seldom touch the same row, so a common word is not one hot key
/// every concurrent write conflicts on.
pub const COUNT_SHARDS: u8 = 16;

/// The row of `term`'s count that the item `id` is counted in.
pub fn term_count(tenant: &TenantId, scope: &ItemScope, term: &TermKey, id: &ItemId) -> Vec<u8> {
    term_count_shard(tenant, scope, term, id.0.0[0] % COUNT_SHARDS)
}

/// Every row of `term`'s count.
pub fn term_count_shards(tenant: &TenantId, scope: &ItemScope, term: &TermKey) -> Vec<Vec<u8>> {
    (0..COUNT_SHARDS)
        .map(|shard| term_count_shard(tenant, scope, term, shard))
        .collect()
}

fn term_count_shard(tenant: &TenantId, scope: &ItemScope, term: &TermKey, shard: u8) -> Vec<u8> {
    let mut key = format!("{}n/{scope}/", base(tenant)).into_bytes();
    key.extend_from_slice(&term.0);
    key.push(shard);
    key
}

/// An index row: `prefix`, then when, then which.
pub fn row(prefix: &[u8], at_ms: i64, id: &ItemId) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + ROW_SUFFIX);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&(u64::MAX - at_ms.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&id.0.0);
    key
}

/// The item an index row points at.
pub fn row_item(key: &[u8]) -> Option<ItemId> {
    let id: [u8; 32] = key.get(key.len().checked_sub(32)?..)?.try_into().ok()?;
    Some(ItemId(Hash(id)))
}

pub use crate::records::store::prefix_end;

/// The first key after `key` (for resuming a scan just past it).
pub fn after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> ItemId {
        ItemId(Hash([byte; 32]))
    }

    #[test]
    fn index_rows_sort_newest_first_and_name_their_item() {
        let tenant = TenantId::new("shop").expect("tenant");
        let prefix = by_type_prefix(&tenant, &ItemScope::Tenant, None);
        let older = row(&prefix, 1_000, &id(9));
        let newer = row(&prefix, 2_000, &id(1));
        assert!(newer < older);
        assert_eq!(row_item(&older), Some(id(9)));
        assert!(older.starts_with(&tenant_prefix(&tenant)));
    }

    #[test]
    fn one_scopes_prefix_is_never_a_prefix_of_anothers() {
        let tenant = TenantId::new("shop").expect("tenant");
        let short = by_type_prefix(&tenant, &ItemScope::Agent("ops".into()), None);
        let long = by_type_prefix(&tenant, &ItemScope::Agent("ops-2".into()), None);
        assert!(!long.starts_with(&short));
        let other = TenantId::new("shop-2").expect("tenant");
        assert!(!tenant_prefix(&other).starts_with(&tenant_prefix(&tenant)));
    }
}
