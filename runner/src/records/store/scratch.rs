//! An in-process `RecordStore`: the scratch store replays write their re-executed record to.
//! Same semantics as the durable backends (head checks, tenant scoping, checkpoints) — it runs
//! the same conformance suite — but nothing survives the process.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use super::{
    AppendBatch, Checkpoint, RecordStore, Result, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
    check_batch, validate_id,
};
use crate::{
    memory::backend::{Change, MemoryBackend, Pairs, Write, check_key, check_range, check_writes, counted},
    records::entry::{Hash, StoredEntry},
};

/// One run's chain and index rows.
#[derive(Debug)]
struct Run {
    head: SignedHead,
    summary: RunSummary,
    entries: Vec<StoredEntry>,
}

#[derive(Debug, Default)]
struct Tenant {
    runs: HashMap<String, Run>,
    blobs: HashMap<Hash, Vec<u8>>,
    checkpoints: HashMap<String, Checkpoint>,
}

/// Records (and memory) kept in process memory.
#[derive(Debug, Default)]
pub struct ScratchStore {
    tenants: Mutex<BTreeMap<TenantId, Tenant>>,
    /// Memory's ordered key space (see `memory::backend`); keys carry their tenant.
    memory: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// The identity vault's key rings: in this process, like everything else here.
    rings: crate::vault::kek::KeyRings,
}

impl ScratchStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, tenant: &TenantId, f: impl FnOnce(&mut Tenant) -> Result<T>) -> Result<T> {
        let mut tenants = self
            .tenants
            .lock()
            .map_err(|_| StoreError::Backend("the in-memory store was poisoned by a panic".into()))?;
        f(tenants.entry(tenant.clone()).or_default())
    }
}

impl RecordStore for ScratchStore {
    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        self.with(tenant, |t| {
            let current = t.runs.get(&batch.run_id).map(|r| &r.head);
            check_batch(&batch, current)?;
            if let Some(checkpoint) = batch.checkpoint {
                t.checkpoints.insert(checkpoint.session_id.clone(), checkpoint);
            }
            match t.runs.get_mut(&batch.run_id) {
                Some(run) => {
                    run.entries.extend(batch.entries);
                    run.head = batch.head;
                    run.summary = batch.summary;
                }
                None => {
                    t.runs.insert(
                        batch.run_id,
                        Run {
                            head: batch.head,
                            summary: batch.summary,
                            entries: batch.entries,
                        },
                    );
                }
            }
            Ok(())
        })
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>> {
        validate_id("run", run_id)?;
        self.with(tenant, |t| Ok(t.runs.get(run_id).map(|r| r.head.clone())))
    }

    async fn read_chain(&self, tenant: &TenantId, run_id: &str, from_seq: u64) -> Result<Vec<StoredEntry>> {
        validate_id("run", run_id)?;
        self.with(tenant, |t| {
            Ok(t.runs.get(run_id).map_or_else(Vec::new, |r| {
                r.entries.iter().filter(|e| e.seq >= from_seq).cloned().collect()
            }))
        })
    }

    async fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>> {
        validate_id("run", run_id)?;
        self.with(tenant, |t| {
            Ok(t.runs.get(run_id).map_or_else(Vec::new, |r| {
                r.entries
                    .iter()
                    .filter(|e| e.seq >= from_seq)
                    .take(limit)
                    .cloned()
                    .collect()
            }))
        })
    }

    async fn list_runs(&self, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        self.with(tenant, |t| {
            let since = filter.since_ms.unwrap_or(i64::MIN);
            let until = filter.until_ms.unwrap_or(i64::MAX);
            let mut runs: Vec<&RunSummary> = t
                .runs
                .values()
                .map(|r| &r.summary)
                .filter(|s| {
                    s.started_at_ms >= since
                        && s.started_at_ms < until
                        && filter.after.as_ref().is_none_or(|after| after.precedes(s))
                        && filter.matches(s)
                })
                .collect();
            // Newest first; ties by run id descending, as the durable backends' time index orders them.
            runs.sort_by(|a, b| {
                b.started_at_ms
                    .cmp(&a.started_at_ms)
                    .then_with(|| b.run_id.cmp(&a.run_id))
            });
            let limit = filter.limit.unwrap_or(usize::MAX);
            Ok(runs.into_iter().take(limit).cloned().collect())
        })
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash> {
        self.with(tenant, |t| {
            let hash = Hash::of(&bytes);
            t.blobs.entry(hash).or_insert(bytes);
            Ok(hash)
        })
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>> {
        self.with(tenant, |t| Ok(t.blobs.get(hash).cloned()))
    }

    async fn latest_checkpoint(&self, tenant: &TenantId, session_id: &str) -> Result<Option<Checkpoint>> {
        validate_id("session", session_id)?;
        self.with(tenant, |t| Ok(t.checkpoints.get(session_id).cloned()))
    }

    async fn run_summary(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunSummary>> {
        validate_id("run", run_id)?;
        self.with(tenant, |t| Ok(t.runs.get(run_id).map(|r| r.summary.clone())))
    }
}

impl ScratchStore {
    fn memory(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>>> {
        self.memory
            .lock()
            .map_err(|_| StoreError::Backend("the in-memory store was poisoned by a panic".into()))
    }
}

impl MemoryBackend for ScratchStore {
    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        &self.rings
    }

    async fn memory_get(&self, tenant: &TenantId, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().try_for_each(|key| check_key(tenant, key))?;
        let memory = self.memory()?;
        Ok(keys.iter().map(|key| memory.get(key).cloned()).collect())
    }

    async fn memory_scan(
        &self,
        tenant: &TenantId,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Pairs> {
        check_range(tenant, &start, &end)?;
        let memory = self.memory()?;
        Ok(memory
            .range(start..end)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn memory_snapshot(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<(Vec<Option<Vec<u8>>>, Pairs)> {
        keys.iter().try_for_each(|key| check_key(tenant, key))?;
        check_range(tenant, &start, &end)?;
        let memory = self.memory()?;
        let values = keys.iter().map(|key| memory.get(key).cloned()).collect();
        let pairs = memory
            .range(start..end)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok((values, pairs))
    }

    async fn memory_write(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>> {
        check_writes(tenant, &writes)?;
        // Concurrent writers interleave here as they would on a real store, between what they
        // read and what they write (nothing else in this store ever waits).
        tokio::task::yield_now().await;
        let mut memory = self.memory()?;
        let mut applied = Vec::with_capacity(writes.len());
        for write in writes {
            let current: Vec<_> = write
                .guard
                .keys()
                .into_iter()
                .map(|key| memory.get(key).map(Vec::as_slice))
                .collect();
            let holds = write.guard.holds(&current);
            applied.push(holds);
            if !holds {
                continue;
            }
            for change in write.changes {
                match change {
                    Change::Put(key, value) => {
                        memory.insert(key, value);
                    }
                    Change::Delete(key) => {
                        memory.remove(&key);
                    }
                    Change::Count(key, delta) => match counted(memory.get(&key).map(Vec::as_slice), delta) {
                        Some(value) => {
                            memory.insert(key, value);
                        }
                        None => {
                            memory.remove(&key);
                        }
                    },
                }
            }
        }
        Ok(applied)
    }
}
