//! What memory needs of a record store backend: point reads, ordered scans and guarded
//! transactional writes over the tenant's memory keys (see `keys`). The embedded store, TiKV
//! and the in-process scratch store implement it; [`super::bank`] builds items, indexes and
//! recall on it once, for all of them.
//!
//! Every call names its tenant and every key must lie in that tenant's memory range: a backend
//! refuses anything else before touching its store, so this contract cannot reach records, or
//! another tenant.

use std::future::Future;

use super::keys;
use crate::records::{StoreError, TenantId};

/// Keys and values, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
/// Values of keys asked for (absent: `None`) and the pairs of a range, read together.
pub type Snapshot = (Vec<Option<Vec<u8>>>, Pairs);

/// One change of a memory write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Adds to the count kept under the key (8 bytes, big-endian); a count that falls to zero
    /// is deleted.
    Count(Vec<u8>, i64),
}

/// What must hold, in the write's own transaction, for its changes to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    Absent(Vec<u8>),
    Present(Vec<u8>),
    /// The key holds exactly this value (a row rewritten only as it was read).
    Holds(Vec<u8>, Vec<u8>),
    /// The key is absent, or holds exactly this value (a marker that may be taken over only
    /// from the holder it names).
    AbsentOr(Vec<u8>, Vec<u8>),
    /// Every one of these holds (rows read together are written together, or not at all).
    All(Vec<Guard>),
}

/// Changes that apply together if their guard holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub guard: Guard,
    pub changes: Vec<Change>,
}

impl Guard {
    /// The keys the guard reads, in the order [`Self::holds`] takes their values.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Self::Absent(key) | Self::Present(key) | Self::Holds(key, _) | Self::AbsentOr(key, _) => {
                vec![key.as_slice()]
            }
            Self::All(guards) => guards.iter().flat_map(Self::keys).collect(),
        }
    }

    /// Whether the guard holds with `current` the values under its [`Self::keys`], in order.
    pub fn holds(&self, current: &[Option<&[u8]>]) -> bool {
        let one = current.first().copied().flatten();
        match self {
            Self::Absent(_) => one.is_none(),
            Self::Present(_) => one.is_some(),
            Self::Holds(_, value) => one == Some(value.as_slice()),
            Self::AbsentOr(_, value) => one.is_none_or(|c| c == value.as_slice()),
            Self::All(guards) => {
                let mut rest = current;
                guards.iter().all(|guard| {
                    let (mine, after) = rest.split_at(guard.keys().len().min(rest.len()));
                    rest = after;
                    guard.holds(mine)
                })
            }
        }
    }
}

/// How soon a memory change must be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Before the write returns.
    Now,
    /// With the store's next flush (see [`MemoryBackend::memory_write_unflushed`]).
    WithNextRecord,
}

/// What [`MemoryBackend::memory_update`] makes of the rows it read: the rows to put (none:
/// nothing is written) and its answer.
pub type Updated<R> = (Vec<(Vec<u8>, Vec<u8>)>, R);

/// Times [`MemoryBackend::memory_update`] reads again when another writer changed its rows.
const UPDATE_ATTEMPTS: u32 = 64;

/// The memory operations of a store backend.
pub trait MemoryBackend: Send + Sync {
    /// The values of `keys`, in their order.
    fn memory_get(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, StoreError>> + Send;

    /// At most `limit` pairs with keys in `[start, end)`, ascending.
    fn memory_scan(
        &self,
        tenant: &TenantId,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> impl Future<Output = Result<Pairs, StoreError>> + Send;

    /// The values of `keys` and at most `limit` pairs of `[start, end)`, read together from one
    /// snapshot: no write lands between the two (a chain and its head read this way agree).
    fn memory_snapshot(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// Where the key rings of this store's identity vault are kept (see `crate::vault`).
    fn key_rings(&self) -> &crate::vault::kek::KeyRings;

    /// Applies `writes` in one transaction, in order, each only if its guard holds there (after
    /// the writes before it); for each, whether it was applied.
    fn memory_write(
        &self,
        tenant: &TenantId,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// [`Self::memory_write`] of puts only, seen by every reader at once but durable only with
    /// the store's next flush instead of before it returns: for rows that need be no more
    /// durable than a record append that follows them (a tool call's quota hold is made durable
    /// by the call's go-ahead, written before the tool acts; lost with a crash before that, it
    /// held back nothing that happened). Stores whose every write is durable (TiKV) just write.
    fn memory_write_unflushed(
        &self,
        tenant: &TenantId,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        self.memory_write(tenant, writes)
    }

    /// Reads `keys` and puts what `update` makes of their values, as one change: no other write
    /// lands between the read and the write. `update` may be called more than once (a store
    /// that cannot lock the rows reads again when another writer changed them). Its answer is
    /// returned.
    fn memory_update<R, F>(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        durability: Durability,
        update: F,
    ) -> impl Future<Output = Result<R, StoreError>> + Send
    where
        R: Send + 'static,
        F: Fn(&[Option<Vec<u8>>]) -> Updated<R> + Send + Sync + 'static,
    {
        async move {
            for attempt in 0..UPDATE_ATTEMPTS {
                let values = self.memory_get(tenant, keys.clone()).await?;
                let (puts, answer) = update(&values);
                if puts.is_empty() {
                    return Ok(answer);
                }
                let guard = Guard::All(
                    keys.iter()
                        .zip(&values)
                        .map(|(key, value)| match value {
                            Some(value) => Guard::Holds(key.clone(), value.clone()),
                            None => Guard::Absent(key.clone()),
                        })
                        .collect(),
                );
                let writes = vec![Write {
                    guard,
                    changes: puts.into_iter().map(|(k, v)| Change::Put(k, v)).collect(),
                }];
                let applied = match durability {
                    Durability::Now => self.memory_write(tenant, writes).await?,
                    Durability::WithNextRecord => self.memory_write_unflushed(tenant, writes).await?,
                };
                if applied.first().copied().unwrap_or(false) {
                    return Ok(answer);
                }
                // Another writer changed the rows: a short pause, growing, before reading again.
                let mut byte = [0u8; 1];
                let jitter = getrandom::fill(&mut byte).map_or(0, |()| u64::from(byte[0] % 4));
                let pause = u64::from(attempt.min(10)) + jitter;
                crate::gateway::fair::away(tokio::time::sleep(std::time::Duration::from_millis(pause))).await;
            }
            Err(StoreError::Backend(format!(
                "other writers kept changing the rows; tried {UPDATE_ATTEMPTS} times"
            )))
        }
    }
}

impl<B: MemoryBackend> MemoryBackend for std::sync::Arc<B> {
    async fn memory_get(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        (**self).memory_get(tenant, keys).await
    }

    async fn memory_scan(
        &self,
        tenant: &TenantId,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Pairs, StoreError> {
        (**self).memory_scan(tenant, start, end, limit).await
    }

    async fn memory_snapshot(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Snapshot, StoreError> {
        (**self).memory_snapshot(tenant, keys, start, end, limit).await
    }

    async fn memory_write(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>, StoreError> {
        (**self).memory_write(tenant, writes).await
    }

    async fn memory_write_unflushed(
        &self,
        tenant: &TenantId,
        writes: Vec<Write>,
    ) -> Result<Vec<bool>, StoreError> {
        (**self).memory_write_unflushed(tenant, writes).await
    }

    async fn memory_update<R, F>(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        durability: Durability,
        update: F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&[Option<Vec<u8>>]) -> Updated<R> + Send + Sync + 'static,
    {
        (**self).memory_update(tenant, keys, durability, update).await
    }

    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        (**self).key_rings()
    }
}

/// Refuses a key outside `tenant`'s memory range (every backend calls this first).
pub fn check_key(tenant: &TenantId, key: &[u8]) -> Result<(), StoreError> {
    if key.starts_with(&keys::tenant_prefix(tenant)) {
        Ok(())
    } else {
        Err(StoreError::Refused(format!(
            "a memory key outside tenant {tenant}'s memory was asked for: {}",
            String::from_utf8_lossy(&key[..key.len().min(48)])
        )))
    }
}

/// Refuses a scan reaching outside `tenant`'s memory range.
pub fn check_range(tenant: &TenantId, start: &[u8], end: &[u8]) -> Result<(), StoreError> {
    check_key(tenant, start)?;
    if start <= end && end <= keys::prefix_end(&keys::tenant_prefix(tenant)).as_slice() {
        Ok(())
    } else {
        Err(StoreError::Refused(format!(
            "a memory scan reaching outside tenant {tenant}'s memory was asked for"
        )))
    }
}

/// Refuses writes with any key outside `tenant`'s memory range.
pub fn check_writes(tenant: &TenantId, writes: &[Write]) -> Result<(), StoreError> {
    writes.iter().try_for_each(|write| {
        write
            .guard
            .keys()
            .into_iter()
            .try_for_each(|key| check_key(tenant, key))?;
        write.changes.iter().try_for_each(|change| match change {
            Change::Put(key, _) | Change::Delete(key) | Change::Count(key, _) => check_key(tenant, key),
        })
    })
}

/// A count after adding `delta` to the stored `current` (`None` when it falls to zero).
pub fn counted(current: Option<&[u8]>, delta: i64) -> Option<Vec<u8>> {
    let now = current
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map_or(0, u64::from_be_bytes);
    let next = now.saturating_add_signed(delta);
    (next > 0).then(|| next.to_be_bytes().to_vec())
}

/// Reads a count as [`Change::Count`] keeps it.
pub fn count_of(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_and_vanish_at_zero() {
        let one = counted(None, 1).expect("one");
        assert_eq!(count_of(Some(&one)), 1);
        let three = counted(Some(&one), 2).expect("three");
        assert_eq!(count_of(Some(&three)), 3);
        assert_eq!(counted(Some(&three), -3), None);
        assert_eq!(counted(None, -1), None, "a count never goes below zero");
    }

    #[test]
    fn keys_outside_the_tenants_memory_are_refused() {
        let tenant = TenantId::new("shop").expect("tenant");
        let other = TenantId::new("shop-2").expect("tenant");
        let mine = keys::tenant_prefix(&tenant);
        assert!(check_key(&tenant, &mine).is_ok());
        assert!(check_key(&tenant, &keys::tenant_prefix(&other)).is_err());
        assert!(
            check_key(&tenant, b"cx/shop/h/run-1").is_err(),
            "records are not memory"
        );
        let end = keys::prefix_end(&mine);
        assert!(check_range(&tenant, &mine, &end).is_ok());
        assert!(check_range(&tenant, &mine, &keys::prefix_end(b"cx/")).is_err());
        let stray = Write {
            guard: Guard::Absent(mine.clone()),
            changes: vec![Change::Delete(b"cx/shop-2/m/i/x".to_vec())],
        };
        assert!(check_writes(&tenant, &[stray]).is_err());
    }
}
