//! The embedded record store: a redb file (pure Rust, ACID, copy-on-write B-trees) and its
//! write-ahead log (see [`wal`]). Each append is one redb write transaction, committed without
//! a flush of its own and made durable by its frame in the log before `append` returns (or, for
//! [`RecordStore::append_flushed_soon`], with the log's next flush); redb
//! allows one writer at a time, which is what makes the head check and the write atomic.
//!
//! Only one process opens the store (redb locks the file), so a commit is seen by this
//! process's readers as soon as it is made, a flush before it is acknowledged as durable (an
//! entry written to be flushed soon: up to [`FLUSHED_WITHIN`] later). What the gateway service
//! shows a reader outside the run is flushed first ([`RecordStore::flush_pending`]). The
//! gateway serialises each run's writes; what reads a run beside them (its runner's own head
//! and chain, a refusal being recorded, a reader) sees each append whole or not at all.

mod wal;

use std::{ffi::OsString, path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use self::wal::{Put, Wal};
use super::{
    AppendBatch, Checkpoint, FLUSHED_WITHIN, RecordStore, Result, RunFilter, RunSummary, SignedHead,
    StoreError, TenantId, check_batch_at, validate_id,
};
use crate::{
    memory::backend::{
        Change, Durability, MemoryBackend, Pairs, Write, check_key, check_range, check_writes, counted,
    },
    records::entry::{Hash, StoredEntry},
};

/// (tenant, run, seq) → 32-byte hash ‖ canonical entry, and (tenant, run, [`RUN_ROW`]) → the
/// run's RunRow JSON (signed head and summary). Keeping the run row in the entries table means
/// an append modifies a single B-tree.
const ENTRIES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("entries");
/// The sequence number under which a run's row is kept (never a real entry's).
const RUN_ROW: u64 = u64::MAX;
/// (tenant, started_at_ms, run) → nothing; orders runs by start time.
const RUNS_BY_TIME: TableDefinition<(&str, i64, &str), ()> = TableDefinition::new("runs_by_time");
/// (tenant, sha256) → bytes.
const BLOBS: TableDefinition<(&str, &[u8; 32]), &[u8]> = TableDefinition::new("blobs");
/// (tenant, session) → Checkpoint JSON.
const CHECKPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("checkpoints");
/// Memory's ordered key space (see `memory::backend`; keys carry their tenant). Memory is
/// written seldom (at the end of a run), so each write is its own durable redb commit rather
/// than a frame of the log.
const MEMORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("memory");

/// One row of the runs table.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunRow {
    head: SignedHead,
    summary: RunSummary,
}

/// A record store in one local file (and its log, beside it).
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    files: Arc<Files>,
    ends: Arc<RunEnds>,
    /// How long an entry written to be flushed soon waits for a flush ([`FLUSHED_WITHIN`]).
    flush_delay: std::time::Duration,
    /// Where the identity vault's key rings are (never in the store file: see
    /// `crate::vault::kek`).
    rings: crate::vault::kek::KeyRings,
}

/// The database and its log, open together.
#[derive(Debug)]
struct Files {
    db: Database,
    wal: Wal,
}

impl Drop for Files {
    /// A clean close folds the log into the database, so the next open has nothing to replay.
    fn drop(&mut self) {
        let folded = self.wal.writer().map_err(backend).and_then(|mut writer| {
            writer.flush_all().map_err(backend)?;
            let txn = self.db.begin_write().map_err(backend)?;
            txn.commit().map_err(backend)?;
            writer.fold().map_err(backend)
        });
        if let Err(error) = folded {
            tracing::warn!(%error, "the record store's log was not folded on close; the next open replays it");
        }
    }
}

/// The end (last sequence number and hash) of each run appended to since open. This process is
/// the store's only writer, so a read of a chain past its end — which the gateway service makes
/// before every request of a run, to see whether anyone else wrote — is answered without a
/// transaction or a trip to a blocking thread, and an append checks the head it extends without
/// reading and decoding the run's row. Written only under the log's writer lock, right after a
/// commit, so the next writer sees it.
#[derive(Debug, Default)]
struct RunEnds(std::sync::Mutex<std::collections::HashMap<String, (u64, Hash)>>);

/// Runs remembered at most (then forgotten all at once; a forgotten run is read from the file).
const MAX_RUN_ENDS: usize = 100_000;

impl RunEnds {
    fn key(tenant: &str, run: &str) -> String {
        format!("{tenant}\0{run}")
    }

    fn end(&self, tenant: &str, run: &str) -> Option<(u64, Hash)> {
        self.0
            .lock()
            .ok()
            .and_then(|ends| ends.get(&Self::key(tenant, run)).copied())
    }

    fn past_end(&self, tenant: &str, run: &str, from_seq: u64) -> bool {
        self.end(tenant, run).is_some_and(|(last, _)| from_seq > last)
    }

    /// Notes a committed append (called with the writer lock held: appends of a run are noted
    /// in the order they committed).
    fn appended(&self, tenant: &str, run: &str, end: (u64, Hash)) {
        if let Ok(mut ends) = self.0.lock() {
            if ends.len() >= MAX_RUN_ENDS {
                ends.clear();
            }
            ends.insert(Self::key(tenant, run), end);
        }
    }
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

/// The log of the store at `path`: the same name with `.wal` appended.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".wal");
    name.into()
}

impl EmbeddedStore {
    /// The run's row: its signed head and summary, kept together.
    async fn run_row(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunRow>> {
        validate_id("run", run_id)?;
        let (tenant, run_id) = (tenant.clone(), run_id.to_owned());
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(backend)?;
            let entries = txn.open_table(ENTRIES).map_err(backend)?;
            let key = format!("runs/{tenant}/{run_id}");
            match entries
                .get((tenant.as_str(), run_id.as_str(), RUN_ROW))
                .map_err(backend)?
            {
                Some(v) => Ok(Some(decode_json::<RunRow>(v.value(), key)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Opens (or creates) the store at `path`, replaying its log. Only one process may have it
    /// open at a time.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open record store {}: {e}", path.display())))?;
        // Create every table up front so readers never see a missing table. The log is opened
        // only now: redb's lock on the file is what keeps a second process away from both.
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(ENTRIES).map_err(backend)?;
            txn.open_table(RUNS_BY_TIME).map_err(backend)?;
            txn.open_table(BLOBS).map_err(backend)?;
            txn.open_table(CHECKPOINTS).map_err(backend)?;
            txn.open_table(MEMORY).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let (wal, frames) = Wal::open(&wal_path(path)).map_err(backend)?;
        // What was acknowledged before a crash may be only in the log: apply it again (a frame
        // redb already holds is rewritten with the same rows), durably, then start a new epoch.
        let mut writer = wal.writer().map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        for puts in &frames {
            apply(&txn, puts)?;
        }
        txn.commit().map_err(backend)?;
        writer.fold().map_err(backend)?;
        drop(writer);
        if !frames.is_empty() {
            tracing::info!(store = %path.display(), transactions = frames.len(),
                "replayed the record store's log after an unclean shutdown");
        }
        Ok(Self {
            files: Arc::new(Files { db, wal }),
            ends: Arc::default(),
            flush_delay: FLUSHED_WITHIN,
            rings: crate::vault::kek::KeyRings::Dir(crate::vault::kek::KeyDir::default_location()),
        })
    }

    /// Waits `delay` instead of [`FLUSHED_WITHIN`] before flushing what was written to be
    /// flushed soon.
    #[cfg(test)]
    fn with_flush_delay(mut self, delay: std::time::Duration) -> Self {
        self.flush_delay = delay;
        self
    }

    /// Keeps the identity vault's key rings in `rings` instead of the default place.
    pub fn with_key_rings(mut self, rings: crate::vault::kek::KeyRings) -> Self {
        self.rings = rings;
        self
    }

    /// Runs blocking redb work without holding up the async executor: on a multi-threaded
    /// runtime in this very thread, its other tasks handed to another worker meanwhile
    /// ([`tokio::task::block_in_place`]); otherwise on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database, &Wal) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // After a failed write to the log, what the database holds may not be durable: nothing
        // is served from it, reads included, until a restart replays the log.
        self.files.wal.check().map_err(backend)?;
        let files = self.files.clone();
        // A trip to a blocking thread and back costs two wake-ups of a sleeping thread — on a
        // governed call's go-ahead, whose flush the tool waits for, a tenth of what the gateway
        // adds. In place, the work starts at once and the task goes on where it was.
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            return tokio::task::block_in_place(|| work(&files.db, &files.wal));
        }
        // From here until a blocking thread picks the work up.
        let handoff = tracing::debug_span!("store.handoff");
        tokio::task::spawn_blocking(move || {
            drop(handoff);
            work(&files.db, &files.wal)
        })
        .await
        .map_err(backend)?
    }

    /// Commits `puts` (decided inside `txn`, which has not written them yet) and returns once
    /// they are durable.
    fn commit(
        db: &Database,
        wal: &Wal,
        decide: impl FnOnce(&WriteTransaction) -> Result<Vec<Put>>,
    ) -> Result<()> {
        let position = Self::commit_logged(db, wal, decide, || ())?;
        let _phase = tracing::debug_span!("store.flush").entered();
        wal.sync_to(position).map_err(backend)
    }

    /// Commits `puts` (decided inside `txn`) with their frame in the log, not yet flushed, and
    /// returns the log position to flush to before anyone is told they are durable.
    /// `after_commit` runs once the transaction committed, before the next writer may start.
    fn commit_logged(
        db: &Database,
        wal: &Wal,
        decide: impl FnOnce(&WriteTransaction) -> Result<Vec<Put>>,
        after_commit: impl FnOnce(),
    ) -> Result<u64> {
        let mut writer = {
            let _phase = tracing::debug_span!("store.writer_lock").entered();
            wal.writer().map_err(backend)?
        };
        let phase = tracing::debug_span!("store.transaction").entered();
        let mut txn = db.begin_write().map_err(backend)?;
        txn.set_durability(redb::Durability::None).map_err(backend)?;
        let puts = decide(&txn)?;
        if puts.is_empty() {
            // Nothing to write (the blob is stored already) — but perhaps by a writer still
            // waiting for its flush: answer only once that is durable too.
            drop(txn);
            return Ok(wal.written());
        }
        apply(&txn, &puts)?;
        drop(phase);
        Self::commit_after_frame(db, &mut writer, txn, &puts, after_commit)
    }

    /// Appends `puts` (already written in `txn`) to the log as one frame and then commits
    /// `txn` (then runs `after_commit`), folding the log if it is due; returns the log position
    /// that makes them durable. Frame first: one that cannot be written leaves the transaction
    /// aborted, unseen.
    fn commit_after_frame(
        db: &Database,
        writer: &mut wal::Writer<'_>,
        txn: WriteTransaction,
        puts: &[Put],
        after_commit: impl FnOnce(),
    ) -> Result<u64> {
        let position = {
            let _phase = tracing::debug_span!("store.log_frame").entered();
            writer.append(puts).map_err(backend)?
        };
        let committed = {
            let _phase = tracing::debug_span!("store.redb_commit").entered();
            txn.commit()
        };
        if let Err(e) = committed {
            writer.poison("a transaction whose log frame was written did not commit");
            return Err(backend(e));
        }
        after_commit();
        Self::fold_if_due(db, writer)?;
        Ok(position)
    }

    /// Flushes the log up to `position` after the store's delay ([`FLUSHED_WITHIN`]), unless a
    /// flush covered it first (then this finds nothing to do).
    fn flush_soon(&self, position: u64) {
        // Not a strong reference: a store closed meanwhile must not stay open (locked) for it.
        let files = Arc::downgrade(&self.files);
        let delay = self.flush_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Closed: its close flushed the log and folded it into the database.
            let Some(files) = files.upgrade() else {
                return;
            };
            if files.wal.synced_past(position) {
                return;
            }
            // A failed flush marks the log failed and says so; nothing is left to answer here.
            let _ = tokio::task::spawn_blocking(move || files.wal.sync_to(position)).await;
        });
    }

    /// Once the log is long enough: one durable redb commit holds every frame so far (all
    /// flushed first), and the log starts over.
    fn fold_if_due(db: &Database, writer: &mut wal::Writer<'_>) -> Result<()> {
        if writer.wants_fold() {
            writer.flush_all().map_err(backend)?;
            let folded = db
                .begin_write()
                .map_err(backend)
                .and_then(|txn| txn.commit().map_err(backend));
            if let Err(e) = folded {
                writer.poison("the record store could not fold its log");
                return Err(backend(e));
            }
            writer.fold().map_err(backend)?;
        }
        Ok(())
    }

    /// Memory writes committed with their frame in the log, not yet flushed. The frame holds
    /// what each applied change left (the row's value, or its removal), so replaying it gives
    /// the same rows whatever was there before. Returns which writes applied and the log
    /// position to flush to before any of it is called durable (when nothing applied, the
    /// position of everything written so far: the guards may have read rows still waiting
    /// for their flush).
    fn memory_write_logged(db: &Database, wal: &Wal, writes: Vec<Write>) -> Result<(Vec<bool>, u64)> {
        let mut writer = wal.writer().map_err(backend)?;
        let mut txn = db.begin_write().map_err(backend)?;
        txn.set_durability(redb::Durability::None).map_err(backend)?;
        let mut applied = Vec::with_capacity(writes.len());
        let mut puts = Vec::new();
        {
            let mut memory = txn.open_table(MEMORY).map_err(backend)?;
            for write in writes {
                let holds = guard_holds(&memory, &write.guard)?;
                applied.push(holds);
                if !holds {
                    continue;
                }
                for change in write.changes {
                    let (key, value) = match change {
                        Change::Put(key, value) => (key, Some(value)),
                        Change::Delete(key) => (key, None),
                        Change::Count(key, delta) => {
                            let current = memory
                                .get(key.as_slice())
                                .map_err(backend)?
                                .map(|v| v.value().to_vec());
                            let value = counted(current.as_deref(), delta);
                            (key, value)
                        }
                    };
                    match value {
                        Some(value) => {
                            memory.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
                            puts.push(Put::Memory { key, value });
                        }
                        None => {
                            memory.remove(key.as_slice()).map_err(backend)?;
                            puts.push(Put::MemoryRemoved { key });
                        }
                    }
                }
            }
        }
        if puts.is_empty() {
            return Ok((applied, wal.written()));
        }
        let position = Self::commit_after_frame(db, &mut writer, txn, &puts, || ())?;
        Ok((applied, position))
    }

    /// Commits `batch` with its frame in the log, not yet flushed, and notes the run's new end;
    /// returns the log position that makes it durable. The head it extends is the run's end as
    /// noted, when this process appended to the run since open (nobody else writes the file);
    /// otherwise read from the run's row.
    fn append_logged(
        db: &Database,
        wal: &Wal,
        ends: &RunEnds,
        tenant: &TenantId,
        batch: &AppendBatch,
    ) -> Result<u64> {
        let (t, run) = (tenant.as_str(), batch.run_id.as_str());
        let decide = |txn: &WriteTransaction| {
            let current = match ends.end(t, run) {
                Some(end) => Some(end),
                None => {
                    let entries = txn.open_table(ENTRIES).map_err(backend)?;
                    match entries.get((t, run, RUN_ROW)).map_err(backend)? {
                        Some(v) => {
                            let head = decode_json::<RunRow>(v.value(), format!("runs/{t}/{run}"))?.head;
                            Some((head.seq, head.hash))
                        }
                        None => None,
                    }
                }
            };
            check_batch_at(batch, current)?;
            let mut puts = Vec::with_capacity(batch.entries.len() + 3);
            for entry in &batch.entries {
                puts.push(Put::Entry {
                    tenant: t.to_owned(),
                    run: run.to_owned(),
                    seq: entry.seq,
                    value: entry.to_value_bytes(),
                });
            }
            let row = RunRow {
                head: batch.head.clone(),
                summary: batch.summary.clone(),
            };
            puts.push(Put::Entry {
                tenant: t.to_owned(),
                run: run.to_owned(),
                seq: RUN_ROW,
                value: encode_json(&row),
            });
            if batch.expected_head.is_none() {
                puts.push(Put::RunByTime {
                    tenant: t.to_owned(),
                    started_ms: batch.summary.started_at_ms,
                    run: run.to_owned(),
                });
            }
            if let Some(checkpoint) = &batch.checkpoint {
                puts.push(Put::Checkpoint {
                    tenant: t.to_owned(),
                    session: checkpoint.session_id.clone(),
                    value: encode_json(checkpoint),
                });
            }
            Ok(puts)
        };
        Self::commit_logged(db, wal, decide, || {
            ends.appended(t, run, (batch.head.seq, batch.head.hash));
        })
    }

    /// The sum of the tenant's runs' counted bytes: every run of its time index, whatever start
    /// time its record gives (a listing's time range ends before `i64::MAX`).
    fn recorded_bytes_blocking(db: &Database, tenant: &TenantId) -> Result<u64> {
        let t = tenant.as_str();
        let txn = db.begin_read().map_err(backend)?;
        let by_time = txn.open_table(RUNS_BY_TIME).map_err(backend)?;
        let entries = txn.open_table(ENTRIES).map_err(backend)?;
        let mut total = 0u64;
        for item in by_time.range((t, i64::MIN, "")..).map_err(backend)? {
            let (key, _) = item.map_err(backend)?;
            let (owner, _, run) = key.value();
            if owner != t {
                break;
            }
            if let Some(value) = entries.get((t, run, RUN_ROW)).map_err(backend)? {
                let row = decode_json::<RunRow>(value.value(), format!("runs/{t}/{run}"))?;
                total = total.saturating_add(row.summary.bytes);
            }
        }
        Ok(total)
    }

    fn list_blocking(db: &Database, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let t = tenant.as_str();
        let txn = db.begin_read().map_err(backend)?;
        let by_time = txn.open_table(RUNS_BY_TIME).map_err(backend)?;
        let entries = txn.open_table(ENTRIES).map_err(backend)?;
        let since = filter.since_ms.unwrap_or(i64::MIN);
        let until = filter.until_ms.unwrap_or(i64::MAX);
        let mut out = Vec::new();
        // The listing ends where `until` does, or at the cursor if that comes first.
        let end = match &filter.after {
            Some(after) if (after.started_at_ms, after.run_id.as_str()) < (until, "") => {
                (t, after.started_at_ms, after.run_id.as_str())
            }
            _ => (t, until, ""),
        };
        if (since, "") >= (end.1, end.2) {
            return Ok(Vec::new());
        }
        let range = by_time.range((t, since, "")..end).map_err(backend)?;
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
        let ends = self.ends.clone();
        let tenant = tenant.clone();
        self.blocking(move |db, wal| {
            let position = Self::append_logged(db, wal, &ends, &tenant, &batch)?;
            let _phase = tracing::debug_span!("store.flush").entered();
            wal.sync_to(position).map_err(backend)
        })
        .await
    }

    /// On a blocking thread, never in place: its caller may have other work to go on with
    /// meanwhile (the gateway asks a read-only tool while the tool's go-ahead is flushed).
    async fn flush_pending(&self) -> Result<()> {
        let wal = &self.files.wal;
        if wal.synced_past(wal.written()) {
            return wal.check().map_err(backend);
        }
        wal.check().map_err(backend)?;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.wal.sync_to(files.wal.written()).map_err(backend))
            .await
            .map_err(backend)?
    }

    async fn append_flushed_soon(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        let ends = self.ends.clone();
        let tenant = tenant.clone();
        let position = self
            .blocking(move |db, wal| Self::append_logged(db, wal, &ends, &tenant, &batch))
            .await?;
        self.flush_soon(position);
        Ok(())
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>> {
        Ok(self.run_row(tenant, run_id).await?.map(|row| row.head))
    }

    async fn read_chain(&self, tenant: &TenantId, run_id: &str, from_seq: u64) -> Result<Vec<StoredEntry>> {
        self.read_chain_page(tenant, run_id, from_seq, usize::MAX).await
    }

    async fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>> {
        validate_id("run", run_id)?;
        if self.ends.past_end(tenant.as_str(), run_id, from_seq) {
            return Ok(Vec::new());
        }
        let (tenant, run_id) = (tenant.clone(), run_id.to_owned());
        self.blocking(move |db, _| {
            let (t, run) = (tenant.as_str(), run_id.as_str());
            let txn = db.begin_read().map_err(backend)?;
            let entries = txn.open_table(ENTRIES).map_err(backend)?;
            let mut out = Vec::new();
            for item in entries
                .range((t, run, from_seq)..(t, run, RUN_ROW))
                .map_err(backend)?
                .take(limit)
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
        self.blocking(move |db, _| Self::list_blocking(db, &tenant, &filter))
            .await
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash> {
        let tenant = tenant.clone();
        self.blocking(move |db, wal| {
            let hash = Hash::of(&bytes);
            Self::commit(db, wal, |txn| {
                let blobs = txn.open_table(BLOBS).map_err(backend)?;
                if blobs.get((tenant.as_str(), &hash.0)).map_err(backend)?.is_some() {
                    return Ok(Vec::new());
                }
                Ok(vec![Put::Blob {
                    tenant: tenant.to_string(),
                    hash: hash.0,
                    value: bytes,
                }])
            })?;
            Ok(hash)
        })
        .await
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let (tenant, hash) = (tenant.clone(), *hash);
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(backend)?;
            let blobs = txn.open_table(BLOBS).map_err(backend)?;
            let bytes = blobs
                .get((tenant.as_str(), &hash.0))
                .map_err(backend)?
                .map(|v| v.value().to_vec());
            bytes.map(|bytes| super::intact_blob(&hash, bytes)).transpose()
        })
        .await
    }

    async fn run_summary(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunSummary>> {
        Ok(self.run_row(tenant, run_id).await?.map(|row| row.summary))
    }

    async fn recorded_bytes(&self, tenant: &TenantId) -> Result<u64> {
        let tenant = tenant.clone();
        self.blocking(move |db, _| Self::recorded_bytes_blocking(db, &tenant))
            .await
    }

    async fn latest_checkpoint(&self, tenant: &TenantId, session_id: &str) -> Result<Option<Checkpoint>> {
        validate_id("session", session_id)?;
        let (tenant, session_id) = (tenant.clone(), session_id.to_owned());
        self.blocking(move |db, _| {
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

/// Whether `guard` holds over the memory table as `memory` has it now (after the writes of its
/// transaction so far).
fn guard_holds(
    memory: &redb::Table<'_, &[u8], &[u8]>,
    guard: &crate::memory::backend::Guard,
) -> Result<bool> {
    let mut current = Vec::new();
    for key in guard.keys() {
        current.push(memory.get(key).map_err(backend)?.map(|v| v.value().to_vec()));
    }
    let current: Vec<_> = current.iter().map(Option::as_deref).collect();
    Ok(guard.holds(&current))
}

/// Writes `puts` in `txn`: the one place rows are stored, for new transactions and for the log's
/// replay alike.
fn apply(txn: &WriteTransaction, puts: &[Put]) -> Result<()> {
    let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
    for put in puts {
        match put {
            Put::Entry {
                tenant,
                run,
                seq,
                value,
            } => {
                entries
                    .insert((tenant.as_str(), run.as_str(), *seq), value.as_slice())
                    .map_err(backend)?;
            }
            Put::RunByTime {
                tenant,
                started_ms,
                run,
            } => {
                let mut table = txn.open_table(RUNS_BY_TIME).map_err(backend)?;
                table
                    .insert((tenant.as_str(), *started_ms, run.as_str()), ())
                    .map_err(backend)?;
            }
            Put::Blob { tenant, hash, value } => {
                let mut table = txn.open_table(BLOBS).map_err(backend)?;
                table
                    .insert((tenant.as_str(), hash), value.as_slice())
                    .map_err(backend)?;
            }
            Put::Checkpoint {
                tenant,
                session,
                value,
            } => {
                let mut table = txn.open_table(CHECKPOINTS).map_err(backend)?;
                table
                    .insert((tenant.as_str(), session.as_str()), value.as_slice())
                    .map_err(backend)?;
            }
            Put::Memory { key, value } => {
                let mut table = txn.open_table(MEMORY).map_err(backend)?;
                table.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
            }
            Put::MemoryRemoved { key } => {
                let mut table = txn.open_table(MEMORY).map_err(backend)?;
                table.remove(key.as_slice()).map_err(backend)?;
            }
        }
    }
    Ok(())
}

impl MemoryBackend for EmbeddedStore {
    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        &self.rings
    }

    async fn memory_get(&self, tenant: &TenantId, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().try_for_each(|key| check_key(tenant, key))?;
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(backend)?;
            let memory = txn.open_table(MEMORY).map_err(backend)?;
            keys.iter()
                .map(|key| {
                    Ok(memory
                        .get(key.as_slice())
                        .map_err(backend)?
                        .map(|v| v.value().to_vec()))
                })
                .collect()
        })
        .await
    }

    async fn memory_scan(
        &self,
        tenant: &TenantId,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Pairs> {
        check_range(tenant, &start, &end)?;
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(backend)?;
            let memory = txn.open_table(MEMORY).map_err(backend)?;
            let mut out = Vec::new();
            for pair in memory
                .range(start.as_slice()..end.as_slice())
                .map_err(backend)?
                .take(limit)
            {
                let (key, value) = pair.map_err(backend)?;
                out.push((key.value().to_vec(), value.value().to_vec()));
            }
            Ok(out)
        })
        .await
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
        self.blocking(move |db, _| {
            let txn = db.begin_read().map_err(backend)?;
            let memory = txn.open_table(MEMORY).map_err(backend)?;
            let values = keys
                .iter()
                .map(|key| {
                    Ok(memory
                        .get(key.as_slice())
                        .map_err(backend)?
                        .map(|v| v.value().to_vec()))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut pairs = Vec::new();
            for pair in memory
                .range(start.as_slice()..end.as_slice())
                .map_err(backend)?
                .take(limit)
            {
                let (key, value) = pair.map_err(backend)?;
                pairs.push((key.value().to_vec(), value.value().to_vec()));
            }
            Ok((values, pairs))
        })
        .await
    }

    /// One write transaction reads the rows, asks `update`, and writes its puts: redb has one
    /// writer at a time, so nothing lands in between and `update` is asked once.
    async fn memory_update<R, F>(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        durability: Durability,
        update: F,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: Fn(&[Option<Vec<u8>>]) -> crate::memory::backend::Updated<R> + Send + Sync + 'static,
    {
        keys.iter().try_for_each(|key| check_key(tenant, key))?;
        let tenant = tenant.clone();
        self.blocking(move |db, wal| {
            let mut writer = wal.writer().map_err(backend)?;
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(redb::Durability::None).map_err(backend)?;
            let answer = {
                let mut memory = txn.open_table(MEMORY).map_err(backend)?;
                let mut values = Vec::with_capacity(keys.len());
                for key in &keys {
                    values.push(
                        memory
                            .get(key.as_slice())
                            .map_err(backend)?
                            .map(|v| v.value().to_vec()),
                    );
                }
                let (puts, answer) = update(&values);
                if puts.is_empty() {
                    // An answer from rows read, some perhaps still waiting for their flush:
                    // given as durable, only once they are.
                    drop(memory);
                    drop(txn);
                    drop(writer);
                    if durability == Durability::Now {
                        wal.sync_to(wal.written()).map_err(backend)?;
                    }
                    return Ok(answer);
                }
                let mut logged = Vec::with_capacity(puts.len());
                for (key, value) in puts {
                    check_key(&tenant, &key)?;
                    memory.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
                    logged.push(Put::Memory { key, value });
                }
                (answer, logged)
            };
            let (answer, logged) = answer;
            let position = Self::commit_after_frame(db, &mut writer, txn, &logged, || ())?;
            drop(writer);
            if durability == Durability::Now {
                wal.sync_to(position).map_err(backend)?;
            }
            Ok(answer)
        })
        .await
    }

    async fn memory_write_unflushed(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>> {
        check_writes(tenant, &writes)?;
        self.blocking(move |db, wal| Self::memory_write_logged(db, wal, writes).map(|(applied, _)| applied))
            .await
    }

    /// Logged like every other write, then flushed: a durable redb commit of its own would also
    /// make durable the unflushed transactions before it, which the log, replayed after a crash,
    /// would then take back only in part (see the log's module).
    async fn memory_write(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>> {
        check_writes(tenant, &writes)?;
        self.blocking(move |db, wal| {
            let (applied, position) = Self::memory_write_logged(db, wal, writes)?;
            wal.sync_to(position).map_err(backend)?;
            Ok(applied)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        keys::KeyPair,
        records::{EntryBody, PinnedDigests, Recorder, RunStart, recorder::Flush},
    };

    fn start(run_id: &str) -> RunStart {
        RunStart {
            run_id: run_id.into(),
            session_id: "session".into(),
            agent: "agent".into(),
            run_context: serde_json::json!({"run_id": run_id}),
            pinned: PinnedDigests {
                context_pack: "sha256:pack".into(),
                policies: vec![],
                sandbox_profile: None,
            },
            bundle: None,
        }
    }

    fn note(step: u32) -> EntryBody {
        EntryBody::Checkpoint {
            step,
            state: serde_json::json!({"step": step}),
        }
    }

    /// Writes checkpoint 1 of a new run `run` to be flushed soon; returns the log position that
    /// makes it durable, checked before anything yields to the flush timer (the test runtime
    /// has one thread): its own write did not flush it.
    async fn soon<'s>(store: &'s EmbeddedStore, run: &str) -> (Recorder<'s, EmbeddedStore>, u64) {
        let tenant = TenantId::new("shop").expect("tenant");
        let mut recorder = Recorder::start(store, tenant.clone(), KeyPair::from_seed([7; 32]), start(run))
            .await
            .expect("start");
        recorder.stage(note(1));
        let prepared = recorder.prepare().await.expect("prepare").expect("staged");
        let head = prepared.head();
        recorder
            .commit_or_rechain(prepared, Flush::Soon)
            .await
            .expect("written");
        let wal = &store.files.wal;
        let position = wal.written();
        assert!(
            !wal.synced_past(position),
            "its own write does not wait for a flush"
        );
        let stored = store.head(&tenant, run).await.expect("head").expect("run");
        assert_eq!((stored.seq, stored.hash), head, "readers see it at once");
        (recorder, position)
    }

    /// An entry written to be flushed soon is seen at once and is on disk within the delay, or
    /// as soon as a durable write follows it or a reader outside the run is served.
    #[tokio::test]
    async fn an_entry_flushed_soon_is_seen_at_once_and_durable_shortly_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str, delay| {
            EmbeddedStore::open(&dir.path().join(name))
                .expect("open")
                .with_flush_delay(delay)
        };

        // Alone: the timer flushes it.
        let store = open("alone.redb", FLUSHED_WITHIN);
        let (_, position) = soon(&store, "alone").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !store.files.wal.synced_past(position) && std::time::Instant::now() < deadline {
            tokio::time::sleep(FLUSHED_WITHIN).await;
        }
        assert!(store.files.wal.synced_past(position), "flushed by its timer");

        // With a timer that would not fire during the test, what flushes it is what follows.
        let never = std::time::Duration::from_secs(3600);
        let store = open("followed.redb", never);
        let (mut recorder, position) = soon(&store, "followed").await;
        recorder.record(note(2)).await.expect("durable write");
        assert!(
            store.files.wal.synced_past(position),
            "a durable write flushes what came before it"
        );

        let store = open("read.redb", never);
        let (_, position) = soon(&store, "read").await;
        store.flush_pending().await.expect("flushed for a reader");
        assert!(
            store.files.wal.synced_past(position),
            "flushed before a reader is served"
        );
    }
}
