//! The embedded record store: a redb file (pure Rust, ACID, copy-on-write B-trees). Each append
//! is one write transaction, durable when `commit` returns; redb allows one writer at a time,
//! which is what makes the head check and the write atomic.

use std::{path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    AppendBatch, Checkpoint, RecordStore, Result, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
    check_batch, validate_id,
};
use crate::records::entry::{Hash, StoredEntry};

/// (tenant, run, seq) → 32-byte hash ‖ canonical entry, and (tenant, run, [`RUN_ROW`]) → the
/// run's RunRow JSON (signed head and summary). Keeping the run row in the entries table means
/// an append modifies a single B-tree, which is most of the cost of a redb commit after fsync.
const ENTRIES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("entries");
/// The sequence number under which a run's row is kept (never a real entry's).
const RUN_ROW: u64 = u64::MAX;
/// (tenant, started_at_ms, run) → nothing; orders runs by start time.
const RUNS_BY_TIME: TableDefinition<(&str, i64, &str), ()> = TableDefinition::new("runs_by_time");
/// (tenant, sha256) → bytes.
const BLOBS: TableDefinition<(&str, &[u8; 32]), &[u8]> = TableDefinition::new("blobs");
/// (tenant, session) → Checkpoint JSON.
const CHECKPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("checkpoints");

/// One row of the runs table.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunRow {
    head: SignedHead,
    summary: RunSummary,
}

/// A record store in one local file.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(key: String, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key,
        problem: e.to_string(),
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`. Only one process may have it open at a time.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open record store {}: {e}", path.display())))?;
        // Create every table up front so readers never see a missing table.
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(ENTRIES).map_err(backend)?;
            txn.open_table(RUNS_BY_TIME).map_err(backend)?;
            txn.open_table(BLOBS).map_err(backend)?;
            txn.open_table(CHECKPOINTS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs blocking redb work off the async executor.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(backend)?
    }

    fn append_blocking(db: &Database, tenant: &TenantId, batch: &AppendBatch) -> Result<()> {
        let t = tenant.as_str();
        let run = batch.run_id.as_str();
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
            let current = match entries.get((t, run, RUN_ROW)).map_err(backend)? {
                Some(v) => Some(decode_json::<RunRow>(v.value(), format!("runs/{t}/{run}"))?.head),
                None => None,
            };
            check_batch(batch, current.as_ref())?;
            for entry in &batch.entries {
                entries
                    .insert((t, run, entry.seq), entry.to_value_bytes().as_slice())
                    .map_err(backend)?;
            }
            let row = RunRow {
                head: batch.head.clone(),
                summary: batch.summary.clone(),
            };
            entries
                .insert((t, run, RUN_ROW), encode_json(&row).as_slice())
                .map_err(backend)?;
            if batch.expected_head.is_none() {
                let mut by_time = txn.open_table(RUNS_BY_TIME).map_err(backend)?;
                by_time
                    .insert((t, batch.summary.started_at_ms, run), ())
                    .map_err(backend)?;
            }
            if let Some(checkpoint) = &batch.checkpoint {
                let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(backend)?;
                checkpoints
                    .insert(
                        (t, checkpoint.session_id.as_str()),
                        encode_json(checkpoint).as_slice(),
                    )
                    .map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }

    fn list_blocking(db: &Database, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let t = tenant.as_str();
        let txn = db.begin_read().map_err(backend)?;
        let by_time = txn.open_table(RUNS_BY_TIME).map_err(backend)?;
        let entries = txn.open_table(ENTRIES).map_err(backend)?;
        let since = filter.since_ms.unwrap_or(i64::MIN);
        let until = filter.until_ms.unwrap_or(i64::MAX);
        let mut out = Vec::new();
        let range = by_time.range((t, since, "")..(t, until, "")).map_err(backend)?;
        for item in range.rev() {
            let (key, _) = item.map_err(backend)?;
            let (_, _, run) = key.value();
            let Some(value) = entries.get((t, run, RUN_ROW)).map_err(backend)? else {
                continue;
            };
            let summary = decode_json::<RunRow>(value.value(), format!("runs/{t}/{run}"))?.summary;
            if filter.matches(&summary) {
                out.push(summary);
                if filter.limit.is_some_and(|limit| out.len() >= limit) {
                    break;
                }
            }
        }
        Ok(out)
    }
}

fn encode_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys: serialization cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8], key: String) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))
}

impl RecordStore for EmbeddedStore {
    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        let tenant = tenant.clone();
        self.blocking(move |db| Self::append_blocking(db, &tenant, &batch))
            .await
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>> {
        validate_id("run", run_id)?;
        let (tenant, run_id) = (tenant.clone(), run_id.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let entries = txn.open_table(ENTRIES).map_err(backend)?;
            let key = format!("runs/{tenant}/{run_id}");
            match entries
                .get((tenant.as_str(), run_id.as_str(), RUN_ROW))
                .map_err(backend)?
            {
                Some(v) => Ok(Some(decode_json::<RunRow>(v.value(), key)?.head)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn read_chain(&self, tenant: &TenantId, run_id: &str, from_seq: u64) -> Result<Vec<StoredEntry>> {
        validate_id("run", run_id)?;
        let (tenant, run_id) = (tenant.clone(), run_id.to_owned());
        self.blocking(move |db| {
            let (t, run) = (tenant.as_str(), run_id.as_str());
            let txn = db.begin_read().map_err(backend)?;
            let entries = txn.open_table(ENTRIES).map_err(backend)?;
            let mut out = Vec::new();
            for item in entries
                .range((t, run, from_seq)..(t, run, RUN_ROW))
                .map_err(backend)?
            {
                let (key, value) = item.map_err(backend)?;
                let seq = key.value().2;
                let entry = StoredEntry::from_value_bytes(seq, value.value()).ok_or_else(|| {
                    corrupt(format!("entries/{t}/{run}/{seq}"), "value shorter than a hash")
                })?;
                out.push(entry);
            }
            Ok(out)
        })
        .await
    }

    async fn list_runs(&self, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let (tenant, filter) = (tenant.clone(), filter.clone());
        self.blocking(move |db| Self::list_blocking(db, &tenant, &filter))
            .await
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash> {
        let tenant = tenant.clone();
        self.blocking(move |db| {
            let hash = Hash::of(&bytes);
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut blobs = txn.open_table(BLOBS).map_err(backend)?;
                if blobs.get((tenant.as_str(), &hash.0)).map_err(backend)?.is_none() {
                    blobs
                        .insert((tenant.as_str(), &hash.0), bytes.as_slice())
                        .map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)?;
            Ok(hash)
        })
        .await
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let (tenant, hash) = (tenant.clone(), *hash);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let blobs = txn.open_table(BLOBS).map_err(backend)?;
            Ok(blobs
                .get((tenant.as_str(), &hash.0))
                .map_err(backend)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn latest_checkpoint(&self, tenant: &TenantId, session_id: &str) -> Result<Option<Checkpoint>> {
        validate_id("session", session_id)?;
        let (tenant, session_id) = (tenant.clone(), session_id.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let checkpoints = txn.open_table(CHECKPOINTS).map_err(backend)?;
            let key = format!("checkpoints/{tenant}/{session_id}");
            match checkpoints
                .get((tenant.as_str(), session_id.as_str()))
                .map_err(backend)?
            {
                Some(v) => Ok(Some(decode_json(v.value(), key)?)),
                None => Ok(None),
            }
        })
        .await
    }
}
