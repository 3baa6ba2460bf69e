//! The TiKV record store: the same model as the embedded store on TiKV's transactional API.
//!
//! Every key starts with `cx/<tenant>/`, so a tenant's data is one contiguous key range and no
//! scan can reach another tenant. An append is one optimistic transaction that reads the head
//! and writes entries, head and indexes; if the commit conflicts, the head is re-read and the
//! caller is told it moved — the batch is never blindly retried.

use std::time::Duration;

use tikv_client::{BoundRange, CheckLevel, Key, TransactionClient, TransactionOptions};

use super::{
    AppendBatch, Checkpoint, RecordStore, Result, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
    check_batch, validate_id,
};
use crate::{
    memory::backend::{Change, MemoryBackend, Pairs, Write, check_key, check_range, check_writes, counted},
    records::entry::{Hash, StoredEntry},
};

/// How long connecting to PD may take before the store reports it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Page size of chain and index scans.
const SCAN_PAGE: u32 = 1024;

/// A record store on a TiKV cluster.
pub struct TikvStore {
    client: TransactionClient,
    pd: Vec<String>,
    /// Where the identity vault's key rings are (never in TiKV: see `crate::vault::kek`).
    rings: crate::vault::kek::KeyRings,
    /// The keys a scan reads at a time.
    page: u32,
}

impl std::fmt::Debug for TikvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TikvStore")
            .field("pd", &self.pd)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("tikv: {e}"))
}

/// Key builders. Ids are validated (no `/`), so `/` separates components unambiguously.
mod keys {
    use super::Hash;

    #[cfg(test)]
    pub fn tenant_prefix(tenant: &str) -> Vec<u8> {
        format!("cx/{tenant}/").into_bytes()
    }
    pub fn head(tenant: &str, run: &str) -> Vec<u8> {
        format!("cx/{tenant}/h/{run}").into_bytes()
    }
    pub fn summary(tenant: &str, run: &str) -> Vec<u8> {
        format!("cx/{tenant}/r/{run}").into_bytes()
    }
    pub fn summaries_prefix(tenant: &str) -> Vec<u8> {
        format!("cx/{tenant}/r/").into_bytes()
    }
    pub fn entries_prefix(tenant: &str, run: &str) -> Vec<u8> {
        format!("cx/{tenant}/e/{run}/").into_bytes()
    }
    pub fn entry(tenant: &str, run: &str, seq: u64) -> Vec<u8> {
        let mut key = entries_prefix(tenant, run);
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }
    pub fn by_time_prefix(tenant: &str) -> Vec<u8> {
        format!("cx/{tenant}/t/").into_bytes()
    }
    /// Start times are offset so that byte order equals numeric order for negative values too.
    pub fn by_time(tenant: &str, started_at_ms: i64, run: &str) -> Vec<u8> {
        let mut key = by_time_prefix(tenant);
        key.extend_from_slice(&((started_at_ms as u64) ^ (1 << 63)).to_be_bytes());
        key.extend_from_slice(run.as_bytes());
        key
    }
    pub fn blob(tenant: &str, hash: &Hash) -> Vec<u8> {
        let mut key = format!("cx/{tenant}/b/").into_bytes();
        key.extend_from_slice(&hash.0);
        key
    }
    pub fn checkpoint(tenant: &str, session: &str) -> Vec<u8> {
        format!("cx/{tenant}/c/{session}").into_bytes()
    }
    pub use crate::records::store::prefix_end;
}

fn range(start: Vec<u8>, end: Vec<u8>) -> BoundRange {
    BoundRange::from(Key::from(start)..Key::from(end))
}

/// Which way [`Pages`] walks its range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forwards,
    Backwards,
}

/// What [`Pages`] reads of each key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Keys,
    KeysAndValues,
}

/// A range of keys read a page at a time as of one moment (a timestamp), each page in a
/// snapshot of its own: a transaction keeps in its buffer every pair it has read, so one
/// snapshot for the whole walk would hold the range, not a page.
struct Pages<'a> {
    client: &'a TransactionClient,
    at: tikv_client::Timestamp,
    /// What is left to read: `[from, to)`.
    from: Vec<u8>,
    to: Vec<u8>,
    direction: Direction,
    read: Read,
    done: bool,
}

impl<'a> Pages<'a> {
    async fn new(
        client: &'a TransactionClient,
        (from, to): (Vec<u8>, Vec<u8>),
        direction: Direction,
        read: Read,
    ) -> Result<Self> {
        Ok(Self {
            at: client.current_timestamp().await.map_err(backend)?,
            client,
            from,
            to,
            direction,
            read,
            done: false,
        })
    }

    /// A snapshot as of the walk's moment, for one page (read-only: dropped, not rolled back).
    fn snapshot(&self) -> tikv_client::Snapshot {
        self.client.snapshot(
            self.at.clone(),
            TransactionOptions::new_optimistic().drop_check(CheckLevel::None),
        )
    }

    /// The next (at most) `size` pairs (values empty when reading keys), in the walk's order;
    /// `None` once the range is read.
    async fn next(&mut self, size: u32) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>> {
        if self.done || size == 0 || self.from >= self.to {
            return Ok(None);
        }
        let left = range(self.from.clone(), self.to.clone());
        let mut snapshot = self.snapshot();
        let pair = |kv: tikv_client::KvPair| (Vec::from(kv.0), kv.1);
        let key = |key: Key| (Vec::from(key), Vec::new());
        let page: Vec<(Vec<u8>, Vec<u8>)> = match (self.direction, self.read) {
            (Direction::Forwards, Read::KeysAndValues) => snapshot
                .scan(left, size)
                .await
                .map_err(backend)?
                .map(pair)
                .collect(),
            (Direction::Backwards, Read::KeysAndValues) => snapshot
                .scan_reverse(left, size)
                .await
                .map_err(backend)?
                .map(pair)
                .collect(),
            (Direction::Forwards, Read::Keys) => snapshot
                .scan_keys(left, size)
                .await
                .map_err(backend)?
                .map(key)
                .collect(),
            (Direction::Backwards, Read::Keys) => snapshot
                .scan_keys_reverse(left, size)
                .await
                .map_err(backend)?
                .map(key)
                .collect(),
        };
        self.done = page.len() < size as usize;
        match (self.direction, page.last()) {
            (Direction::Forwards, Some((last, _))) => {
                self.from = last.clone();
                self.from.push(0);
            }
            // The range's end is exclusive: the last key read is where the rest ends.
            (Direction::Backwards, Some((last, _))) => self.to = last.clone(),
            (_, None) => self.done = true,
        }
        Ok((!page.is_empty()).then_some(page))
    }

    /// The values of `keys` as of the walk's moment (in a snapshot of their own).
    async fn values(&self, keys: Vec<Vec<u8>>) -> Result<std::collections::HashMap<Vec<u8>, Vec<u8>>> {
        Ok(self
            .snapshot()
            .batch_get(keys)
            .await
            .map_err(backend)?
            .map(|kv| (Vec::from(kv.0), kv.1))
            .collect())
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8], key: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        problem: e.to_string(),
    })
}

fn encode_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl TikvStore {
    /// Connects to the PD endpoints (comma-separated `host:port` list).
    pub async fn connect(pd_endpoints: &str) -> Result<Self> {
        let pd: Vec<String> = pd_endpoints
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if pd.is_empty() {
            return Err(StoreError::Backend(
                "no PD endpoint given (expected host:port[,host:port…])".into(),
            ));
        }
        let client = tokio::time::timeout(CONNECT_TIMEOUT, TransactionClient::new(pd.clone()))
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "tikv: PD at {pd:?} did not answer within {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| StoreError::Backend(format!("tikv: cannot connect to PD at {pd:?}: {e}")))?;
        Ok(Self {
            client,
            pd,
            rings: crate::vault::kek::KeyRings::Dir(crate::vault::kek::KeyDir::default_location()),
            page: SCAN_PAGE,
        })
    }

    /// Scans `page` keys at a time instead of 1,024 (tests: page boundaries within a few runs).
    pub fn with_scan_page(mut self, page: u32) -> Self {
        self.page = page.max(1);
        self
    }

    /// Keeps the identity vault's key rings in `rings` instead of the default place.
    pub fn with_key_rings(mut self, rings: crate::vault::kek::KeyRings) -> Self {
        self.rings = rings;
        self
    }

    fn options() -> TransactionOptions {
        // Every path commits or rolls back explicitly; a dropped transaction is a bug to log,
        // not a reason to abort the process.
        TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn)
    }

    async fn begin(&self) -> Result<tikv_client::Transaction> {
        self.client
            .begin_with_options(Self::options())
            .await
            .map_err(backend)
    }

    /// Reads one key in its own transaction.
    async fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let mut txn = self.begin().await?;
        let value = txn.get(key).await;
        txn.rollback().await.map_err(backend)?;
        value.map_err(backend)
    }

    /// The first `limit` pairs of `[start, end)`, scanned in pages, forwards.
    async fn scan_at_most(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut pages = Pages::new(
            &self.client,
            (start, end),
            Direction::Forwards,
            Read::KeysAndValues,
        )
        .await?;
        let mut out = Vec::new();
        while out.len() < limit {
            let wanted = u32::try_from(limit - out.len()).map_or(self.page, |n| n.min(self.page));
            let Some(page) = pages.next(wanted).await? else {
                break;
            };
            out.extend(page);
        }
        Ok(out)
    }

    async fn current_head(&self, tenant: &str, run: &str) -> Result<Option<SignedHead>> {
        let key = keys::head(tenant, run);
        match self.get(key.clone()).await? {
            Some(v) => Ok(Some(decode_json(&v, &key)?)),
            None => Ok(None),
        }
    }

    async fn try_append(&self, tenant: &str, batch: &AppendBatch) -> Result<()> {
        let run = batch.run_id.as_str();
        let mut txn = self.begin().await?;
        let written: Result<()> = async {
            let head_key = keys::head(tenant, run);
            let current = match txn.get(head_key.clone()).await.map_err(backend)? {
                Some(v) => Some(decode_json::<SignedHead>(&v, &head_key)?),
                None => None,
            };
            check_batch(batch, current.as_ref())?;
            for entry in &batch.entries {
                txn.put(keys::entry(tenant, run, entry.seq), entry.to_value_bytes())
                    .await
                    .map_err(backend)?;
            }
            txn.put(head_key, encode_json(&batch.head))
                .await
                .map_err(backend)?;
            txn.put(keys::summary(tenant, run), encode_json(&batch.summary))
                .await
                .map_err(backend)?;
            if batch.expected_head.is_none() {
                let key = keys::by_time(tenant, batch.summary.started_at_ms, run);
                txn.put(key, b"1".to_vec()).await.map_err(backend)?;
            }
            if let Some(checkpoint) = &batch.checkpoint {
                let key = keys::checkpoint(tenant, &checkpoint.session_id);
                txn.put(key, encode_json(checkpoint)).await.map_err(backend)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            txn.rollback().await.map_err(backend)?;
            return Err(e);
        }
        match txn.commit().await {
            Ok(_) => Ok(()),
            Err(commit_error) => {
                // A conflicting commit means another writer got there first. Re-read the head to
                // tell the caller what happened; never resubmit the same batch.
                let current = self.current_head(tenant, run).await?;
                if current.as_ref().map(|h| h.hash) == Some(batch.head.hash) {
                    // The commit landed even though its acknowledgement was lost.
                    return Ok(());
                }
                check_batch(batch, current.as_ref())?;
                Err(backend(format!("commit of run {run} failed: {commit_error}")))
            }
        }
    }
}

// Each operation is network round trips to TiKV, where the work is done: at a gateway replica
// it is waited for out of the request's turn (`fair::away`).
impl RecordStore for TikvStore {
    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        crate::gateway::fair::away(async move { self.try_append(tenant.as_str(), &batch).await }).await
    }

    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>> {
        crate::gateway::fair::away(async move {
            validate_id("run", run_id)?;
            self.current_head(tenant.as_str(), run_id).await
        })
        .await
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
        crate::gateway::fair::away(async move {
            validate_id("run", run_id)?;
            let t = tenant.as_str();
            let prefix = keys::entries_prefix(t, run_id);
            let pairs = self
                .scan_at_most(keys::entry(t, run_id, from_seq), keys::prefix_end(&prefix), limit)
                .await?;
            pairs
                .into_iter()
                .map(|(key, value)| {
                    let seq_bytes: [u8; 8] =
                        key[prefix.len()..].try_into().map_err(|_| StoreError::Corrupt {
                            key: String::from_utf8_lossy(&key).into_owned(),
                            problem: "entry key has no 8-byte sequence number".into(),
                        })?;
                    let seq = u64::from_be_bytes(seq_bytes);
                    StoredEntry::from_value_bytes(seq, &value).ok_or_else(|| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        problem: "value shorter than a hash".into(),
                    })
                })
                .collect()
        })
        .await
    }

    async fn list_runs(&self, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        crate::gateway::fair::away(async move {
            let t = tenant.as_str();
            let start = keys::by_time(t, filter.since_ms.unwrap_or(i64::MIN), "");
            let end = match filter.until_ms {
                Some(until) => keys::by_time(t, until, ""),
                None => keys::prefix_end(&keys::by_time_prefix(t)),
            };
            // Or at the cursor, if that comes first.
            let end = match &filter.after {
                Some(after) => end.min(keys::by_time(t, after.started_at_ms, &after.run_id)),
                None => end,
            };
            if start >= end {
                // Since after until: nothing started in between.
                return Ok(Vec::new());
            }
            // Newest first, a page of the time index at a time, each page's summaries read in
            // one request: what a listing holds is its answer and one page, however many runs
            // the tenant has (a listing with a limit stops at it).
            let time_prefix_len = keys::by_time_prefix(t).len() + 8;
            let mut pages = Pages::new(&self.client, (start, end), Direction::Backwards, Read::Keys).await?;
            let mut out = Vec::new();
            if filter.limit == Some(0) {
                return Ok(out);
            }
            while let Some(page) = pages.next(self.page).await? {
                let wanted: Vec<Vec<u8>> = page
                    .iter()
                    .filter_map(|(key, _)| key.get(time_prefix_len..))
                    .map(|run| keys::summary(t, &String::from_utf8_lossy(run)))
                    .collect();
                let mut found = pages.values(wanted.clone()).await?;
                for summary_key in wanted {
                    let Some(value) = found.remove(&summary_key) else {
                        continue;
                    };
                    let summary: RunSummary = decode_json(&value, &summary_key)?;
                    if filter.matches(&summary) {
                        out.push(summary);
                        if filter.limit.is_some_and(|limit| out.len() >= limit) {
                            return Ok(out);
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash> {
        crate::gateway::fair::away(async move {
            let hash = Hash::of(&bytes);
            let key = keys::blob(tenant.as_str(), &hash);
            let mut txn = self.begin().await?;
            let exists = match txn.key_exists(key.clone()).await {
                Ok(exists) => exists,
                Err(e) => {
                    txn.rollback().await.map_err(backend)?;
                    return Err(backend(e));
                }
            };
            if exists {
                txn.rollback().await.map_err(backend)?;
                return Ok(hash);
            }
            if let Err(e) = txn.put(key.clone(), bytes).await {
                txn.rollback().await.map_err(backend)?;
                return Err(backend(e));
            }
            if let Err(e) = txn.commit().await {
                // Content-addressed: a concurrent writer of the same blob wrote the same bytes.
                if self.get(key).await?.is_some() {
                    return Ok(hash);
                }
                return Err(backend(e));
            }
            Ok(hash)
        })
        .await
    }

    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>> {
        crate::gateway::fair::away(async move {
            let bytes = self.get(keys::blob(tenant.as_str(), hash)).await?;
            bytes.map(|bytes| super::intact_blob(hash, bytes)).transpose()
        })
        .await
    }

    async fn run_summary(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunSummary>> {
        crate::gateway::fair::away(async move {
            validate_id("run", run_id)?;
            let key = keys::summary(tenant.as_str(), run_id);
            match self.get(key.clone()).await? {
                Some(value) => Ok(Some(decode_json(&value, &key)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn recorded_bytes(&self, tenant: &TenantId) -> Result<u64> {
        crate::gateway::fair::away(async move {
            // One scan of the tenant's run summaries, not a read per run, a page at a time:
            // summed as it goes, never held whole.
            let prefix = keys::summaries_prefix(tenant.as_str());
            let end = keys::prefix_end(&prefix);
            let mut pages = Pages::new(
                &self.client,
                (prefix, end),
                Direction::Forwards,
                Read::KeysAndValues,
            )
            .await?;
            let mut total = 0u64;
            while let Some(page) = pages.next(self.page).await? {
                for (key, value) in page {
                    let summary: RunSummary = decode_json(&value, &key)?;
                    total = total.saturating_add(summary.bytes);
                }
            }
            Ok(total)
        })
        .await
    }

    async fn latest_checkpoint(&self, tenant: &TenantId, session_id: &str) -> Result<Option<Checkpoint>> {
        crate::gateway::fair::away(async move {
            validate_id("session", session_id)?;
            let key = keys::checkpoint(tenant.as_str(), session_id);
            match self.get(key.clone()).await? {
                Some(v) => Ok(Some(decode_json(&v, &key)?)),
                None => Ok(None),
            }
        })
        .await
    }
}

/// Times a memory write is tried when its commit conflicts with another writer's.
const MEMORY_WRITE_ATTEMPTS: u32 = 10;
/// The first wait before trying a conflicted memory write again (doubling, with jitter).
const MEMORY_WRITE_BACKOFF: Duration = Duration::from_millis(2);

impl TikvStore {
    /// One attempt at memory writes: `Ok(None)` when the commit conflicted.
    async fn try_memory_write(&self, writes: &[Write]) -> Result<Option<Vec<bool>>> {
        let mut txn = self.begin().await?;
        let staged: Result<Vec<bool>> = async {
            let mut applied = Vec::with_capacity(writes.len());
            for write in writes {
                // The transaction reads its own buffered writes: a guard sees the writes before it.
                let mut current = Vec::new();
                for key in write.guard.keys() {
                    current.push(txn.get(key.to_vec()).await.map_err(backend)?);
                }
                let current: Vec<_> = current.iter().map(Option::as_deref).collect();
                let holds = write.guard.holds(&current);
                applied.push(holds);
                if !holds {
                    continue;
                }
                for change in &write.changes {
                    match change {
                        Change::Put(key, value) => {
                            txn.put(key.clone(), value.clone()).await.map_err(backend)?
                        }
                        Change::Delete(key) => txn.delete(key.clone()).await.map_err(backend)?,
                        Change::Count(key, delta) => {
                            let current = txn.get(key.clone()).await.map_err(backend)?;
                            match counted(current.as_deref(), *delta) {
                                Some(value) => txn.put(key.clone(), value).await.map_err(backend)?,
                                None => txn.delete(key.clone()).await.map_err(backend)?,
                            }
                        }
                    }
                }
            }
            Ok(applied)
        }
        .await;
        match staged {
            Ok(applied) if applied.iter().any(|a| *a) => match txn.commit().await {
                Ok(_) => Ok(Some(applied)),
                Err(error) => {
                    tracing::debug!(%error, "a memory write's commit failed; trying again");
                    Ok(None)
                }
            },
            other => {
                txn.rollback().await.map_err(backend)?;
                other.map(Some)
            }
        }
    }
}

impl MemoryBackend for TikvStore {
    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        &self.rings
    }

    async fn memory_get(&self, tenant: &TenantId, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        crate::gateway::fair::away(async move {
            keys.iter().try_for_each(|key| check_key(tenant, key))?;
            let mut txn = self.begin().await?;
            let found = txn.batch_get(keys.clone()).await;
            txn.rollback().await.map_err(backend)?;
            let mut found: std::collections::HashMap<Vec<u8>, Vec<u8>> = found
                .map_err(backend)?
                .map(|kv| (Vec::from(kv.0), kv.1))
                .collect();
            Ok(keys.iter().map(|key| found.remove(key)).collect())
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
        crate::gateway::fair::away(async move {
            check_range(tenant, &start, &end)?;
            let mut txn = self.begin().await?;
            let limit = u32::try_from(limit).unwrap_or(u32::MAX);
            let page = txn.scan(range(start, end), limit).await;
            txn.rollback().await.map_err(backend)?;
            Ok(page.map_err(backend)?.map(|kv| (Vec::from(kv.0), kv.1)).collect())
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
        crate::gateway::fair::away(async move {
            keys.iter().try_for_each(|key| check_key(tenant, key))?;
            check_range(tenant, &start, &end)?;
            // One transaction: both reads at its start timestamp.
            let mut txn = self.begin().await?;
            let read: Result<_> = async {
                let mut found: std::collections::HashMap<Vec<u8>, Vec<u8>> = txn
                    .batch_get(keys.clone())
                    .await
                    .map_err(backend)?
                    .map(|kv| (Vec::from(kv.0), kv.1))
                    .collect();
                let limit = u32::try_from(limit).unwrap_or(u32::MAX);
                let pairs: Pairs = txn
                    .scan(range(start, end), limit)
                    .await
                    .map_err(backend)?
                    .map(|kv| (Vec::from(kv.0), kv.1))
                    .collect();
                Ok((keys.iter().map(|key| found.remove(key)).collect(), pairs))
            }
            .await;
            txn.rollback().await.map_err(backend)?;
            read
        })
        .await
    }

    async fn memory_write(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>> {
        crate::gateway::fair::away(async move {
            check_writes(tenant, &writes)?;
            let mut backoff = MEMORY_WRITE_BACKOFF;
            for _ in 0..MEMORY_WRITE_ATTEMPTS {
                // A retried write re-reads its guard: one that landed although its acknowledgement
                // was lost finds the guard no longer holds, and changes nothing twice.
                if let Some(applied) = self.try_memory_write(&writes).await? {
                    return Ok(applied);
                }
                // Writers that conflicted together should not all come back together.
                let mut jitter = [0u8; 2];
                let jitter = getrandom::fill(&mut jitter).map_or(0, |()| u16::from_le_bytes(jitter));
                let pause = backoff + backoff.mul_f64(f64::from(jitter) / f64::from(u16::MAX));
                crate::gateway::fair::away(tokio::time::sleep(pause)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(backend(format!(
                "a memory write conflicted with other writers {MEMORY_WRITE_ATTEMPTS} times; try again"
            )))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::keys;

    #[test]
    fn time_keys_sort_numerically() {
        let a = keys::by_time("t", -5, "r");
        let b = keys::by_time("t", 3, "r");
        let c = keys::by_time("t", 1_700_000_000_000, "r");
        assert!(a < b && b < c);
    }

    #[test]
    fn tenant_ranges_do_not_overlap() {
        let end = keys::prefix_end(&keys::tenant_prefix("team-a"));
        assert!(keys::head("team-a", "run") < end);
        assert!(
            keys::head("team-ab", "run") >= end
                || keys::head("team-ab", "run") < keys::tenant_prefix("team-a")
        );
    }

    #[test]
    fn entry_keys_of_prefix_runs_do_not_mix() {
        let p = keys::entries_prefix("t", "run-1");
        assert!(!keys::entry("t", "run-10", 0).starts_with(&p));
    }
}
