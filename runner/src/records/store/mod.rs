//! The `RecordStore` trait: durable, tenant-scoped storage of record chains, signed heads,
//! content-addressed blobs, run summaries and session checkpoints — and its two backends.
//!
//! Every call takes a [`TenantId`]; there is deliberately no call that reads across tenants.
//! Appends are optimistic: a batch names the head it extends and is refused if the chain has
//! moved, so two writers can never fork a run.

pub mod any;
#[cfg(feature = "embedded")]
pub mod embedded;
#[cfg(feature = "tikv")]
pub mod pd_stores;
pub mod remote;
mod run_pages;
pub mod scratch;
#[cfg(feature = "tikv")]
pub mod tikv;

use std::future::Future;

use serde::{Deserialize, Serialize};

use super::entry::{Hash, StoredEntry};
use crate::{
    consent::SubjectHandle,
    vault::{KeyUse, SecretKey, Vault, VaultError},
};

/// How long an entry written by [`RecordStore::append_flushed_soon`] may wait for a flush when
/// no durable write comes first: long enough that a runner's next request (a fraction of a
/// millisecond later) flushes it with its own, short enough that a crash seldom finds one.
pub const FLUSHED_WITHIN: std::time::Duration = std::time::Duration::from_millis(2);

/// A tenant: the Kubernetes namespace a run belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

/// Whether `name` is a DNS label (RFC 1123, what a namespace name is): 1–63 of `a-z`, `0-9` and
/// `-`, starting and ending with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl TenantId {
    /// Accepts a DNS label (what a namespace name is): 1–63 of `a-z`, `0-9`, `-`.
    pub fn new(name: impl Into<String>) -> Result<Self, StoreError> {
        let name = name.into();
        if is_dns_label(&name) {
            Ok(Self(name))
        } else {
            Err(StoreError::InvalidName { what: "tenant", name })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = StoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<TenantId> for String {
    fn from(value: TenantId) -> Self {
        value.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The smallest key greater than every key starting with `prefix` (the end of a prefix scan in
/// an ordered key space).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Checks a run or session id: 1–128 of letters, digits, `-`, `_`, `.` (they appear in keys).
pub fn validate_id(what: &'static str, id: &str) -> Result<(), StoreError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what,
            name: id.to_owned(),
        })
    }
}

/// `bytes` read under blob `hash`, if they are that blob.
pub(crate) fn intact_blob(hash: &Hash, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if Hash::of(&bytes) == *hash {
        Ok(bytes)
    } else {
        Err(StoreError::Corrupt {
            key: format!("blob {hash}"),
            problem: "the bytes read have another hash: they were altered".into(),
        })
    }
}

/// The newest entry of a chain and the signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub seq: u64,
    pub hash: Hash,
    /// Id of the key that signed (see `keys::PublicKey::key_id`).
    pub key_id: String,
    /// Ed25519 signature (hex) of [`SignedHead::message`].
    pub signature: String,
}

impl SignedHead {
    /// The bytes a head signature covers: tenant, run, position and hash, so a signature cannot
    /// be moved to another run, tenant or point in the chain.
    pub fn message(tenant: &TenantId, run_id: &str, seq: u64, hash: &Hash) -> Vec<u8> {
        format!("contextos-record-head/v1\n{tenant}\n{run_id}\n{seq}\n{hash}").into_bytes()
    }
}

/// What a run is, for listing without reading its chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub session_id: String,
    pub agent: String,
    pub started_at_ms: i64,
    /// `running`, `completed`, `failed`.
    pub outcome: String,
    pub entries: u64,
    pub head: Hash,
    /// What the run keeps in the store as the gateway service counted it against the run's
    /// quota when it last wrote: its entries and the blobs it uploaded (0 for runs no gateway
    /// service wrote, and for those written before it was counted). The sum over a tenant's
    /// runs is what its bound (`--max-tenant-store-bytes`) is checked against.
    #[serde(default)]
    pub bytes: u64,
}

/// Which runs to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub agent: Option<String>,
    pub session_id: Option<String>,
    /// Started at or after (ms since epoch).
    pub since_ms: Option<i64>,
    /// Started before (ms since epoch).
    pub until_ms: Option<i64>,
    /// At most this many, newest first.
    pub limit: Option<usize>,
    /// Only the runs a listing (newest first) holds after this one: where the last page of a
    /// listing read a page at a time ended.
    pub after: Option<RunCursor>,
}

/// A place in a listing of runs, newest first: runs that started earlier come after it, and
/// of those that started in the same millisecond, those with a run id that sorts before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunCursor {
    pub started_at_ms: i64,
    pub run_id: String,
}

impl RunCursor {
    /// The place of `run`.
    pub fn of(run: &RunSummary) -> Self {
        Self {
            started_at_ms: run.started_at_ms,
            run_id: run.run_id.clone(),
        }
    }

    /// Whether `run` comes after this place.
    pub fn precedes(&self, run: &RunSummary) -> bool {
        (run.started_at_ms, run.run_id.as_str()) < (self.started_at_ms, self.run_id.as_str())
    }
}

impl RunFilter {
    /// Whether `run` passes the non-time criteria.
    pub fn matches(&self, run: &RunSummary) -> bool {
        self.agent.as_ref().is_none_or(|a| *a == run.agent)
            && self.session_id.as_ref().is_none_or(|s| *s == run.session_id)
    }
}

/// The latest resumable point of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub session_id: String,
    pub run_id: String,
    /// Sequence number of the checkpoint entry in the run's chain.
    pub seq: u64,
    pub entry_hash: Hash,
    pub step: u32,
}

/// One atomic append: entries that extend `expected_head`, the head signature over the last
/// one, and index updates that must land in the same transaction.
#[derive(Clone, Debug)]
pub struct AppendBatch {
    pub run_id: String,
    /// Hash of the entry this batch extends; `None` to start a new chain.
    pub expected_head: Option<Hash>,
    pub entries: Vec<StoredEntry>,
    pub head: SignedHead,
    /// The run's summary after this batch.
    pub summary: RunSummary,
    /// Set when the batch contains a checkpoint entry.
    pub checkpoint: Option<Checkpoint>,
}

/// Errors of every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "run {run_id}: the chain head moved (expected {expected}, found {actual}); another writer appended — re-read the head before writing again"
    )]
    HeadMoved {
        run_id: String,
        expected: String,
        actual: String,
    },
    #[error("run {run_id}: batch does not link up: {problem}")]
    BadBatch { run_id: String, problem: String },
    #[error("{what} name {name:?} is invalid: use 1–63 lowercase letters, digits and '-'")]
    InvalidName { what: &'static str, name: String },
    #[error("run {run_id} not found in tenant {tenant}")]
    RunNotFound { tenant: String, run_id: String },
    #[error("record store backend error: {0}")]
    Backend(String),
    /// The store (the gateway service) refused the request for good: retrying changes nothing.
    #[error("{0}")]
    Refused(String),
    /// The run has written as much to the store as the gateway allows it (`--max-run-bytes`).
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("record store holds a corrupt value at {key}: {problem}")]
    Corrupt { key: String, problem: String },
}

/// Result alias for store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Durable storage of DecisionRecords. Implementations must make `append` atomic (all of a
/// batch or nothing) and durable when it returns.
/// Every record store also keeps memory (see [`crate::memory::backend`]): the gateway that
/// records a run is the one that keeps and recalls its memory, in the same store.
pub trait RecordStore: crate::memory::backend::MemoryBackend + Send + Sync {
    /// Appends a batch if the run's head is still `batch.expected_head`.
    fn append(&self, tenant: &TenantId, batch: AppendBatch) -> impl Future<Output = Result<()>> + Send;

    /// [`Self::append`], seen by every reader once it returns, but durable only with the
    /// store's next flush (at the latest [`FLUSHED_WITHIN`] later) instead of before it returns.
    /// Only for entries whose loss is noticed: a call's result or a model turn the gateway
    /// service already answered with (the runner's next request names the head it was told, and
    /// is refused if the record lost it; a call's go-ahead, durable before the tool acted, then
    /// says its outcome is unknown), or a read's go-ahead flushed with
    /// [`Self::flush_pending`] while the tool is asked, before anyone is answered. The next
    /// durable write of any run, usually the same runner's next go-ahead, flushes it, so a call
    /// costs one flush instead of two. Stores whose every write is durable (TiKV) just append.
    fn append_flushed_soon(
        &self,
        tenant: &TenantId,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<()>> + Send {
        self.append(tenant, batch)
    }

    /// Makes durable every write acknowledged so far, those [`Self::append_flushed_soon`] left
    /// to the next flush included. Called before anyone outside a run reads it (a person, an
    /// auditor, a replay Job): nobody is shown a head that a crash could still take back.
    /// Stores whose every write is durable have nothing to do.
    fn flush_pending(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The signed head of a run, if it exists.
    fn head(
        &self,
        tenant: &TenantId,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<SignedHead>>> + Send;

    /// Entries of a run from `from_seq` on, in order.
    fn read_chain(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
    ) -> impl Future<Output = Result<Vec<StoredEntry>>> + Send;

    /// At most `limit` entries of a run from `from_seq` on, in order: what the gateway service
    /// reads for one request from outside, so that no request holds a whole run in memory
    /// (a run may hold hundreds of MiB). Fewer than `limit` means the chain ends there.
    fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEntry>>> + Send {
        async move {
            let mut entries = self.read_chain(tenant, run_id, from_seq).await?;
            entries.truncate(limit);
            Ok(entries)
        }
    }

    /// Summaries of runs matching `filter`, newest first.
    fn list_runs(
        &self,
        tenant: &TenantId,
        filter: &RunFilter,
    ) -> impl Future<Output = Result<Vec<RunSummary>>> + Send;

    /// What the tenant's runs' records hold, as counted ([`RunSummary::bytes`]).
    fn recorded_bytes(&self, tenant: &TenantId) -> impl Future<Output = Result<u64>> + Send {
        async move {
            let runs = self.list_runs(tenant, &RunFilter::default()).await?;
            Ok(runs.iter().fold(0u64, |sum, run| sum.saturating_add(run.bytes)))
        }
    }

    /// The summary the store keeps beside run `run_id`'s head (its outcome, entries and head),
    /// read without its entries; `None` when the run is unknown or the store keeps none to read
    /// this way (a client of the gateway service): the caller reads the chain instead.
    fn run_summary(
        &self,
        tenant: &TenantId,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<RunSummary>>> + Send {
        let _ = (tenant, run_id);
        async { Ok(None) }
    }

    /// Stores `bytes` under their SHA-256 (idempotent) and returns the hash.
    fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> impl Future<Output = Result<Hash>> + Send;

    /// The blob with this hash, if present; bytes stored under it that have another hash are
    /// [`StoreError::Corrupt`], never returned (a write that bypassed the gateway could have
    /// put them there).
    fn get_blob(
        &self,
        tenant: &TenantId,
        hash: &Hash,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// The latest checkpoint of a session.
    fn latest_checkpoint(
        &self,
        tenant: &TenantId,
        session_id: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>>> + Send;

    /// The key of run `run_id` about `subject` (see `crate::vault`): to read it, none once
    /// they are erased; to keep it, refused once they are. A store that holds memory has the
    /// vault beside it; the gateway service's clients ask the service.
    fn run_key(
        &self,
        tenant: &TenantId,
        run_id: &str,
        subject: &SubjectHandle,
        to: KeyUse,
    ) -> impl Future<Output = std::result::Result<Option<SecretKey>, VaultError>> + Send {
        async move {
            Vault::new(self, tenant.clone())
                .run_key(subject, run_id, to)
                .await
        }
    }

    /// [`Self::run_key`] to keep: the key itself (a store that gives none is an error).
    fn key_to_keep(
        &self,
        tenant: &TenantId,
        run_id: &str,
        subject: &SubjectHandle,
    ) -> impl Future<Output = std::result::Result<SecretKey, VaultError>> + Send {
        async move {
            self.run_key(tenant, run_id, subject, KeyUse::Keep)
                .await?
                .ok_or_else(|| VaultError::Remote(format!("no key was given to record run {run_id} under")))
        }
    }
}

/// Checks that a batch links up internally and to its expected head before any backend writes
/// it. Shared by every backend so they refuse the same batches.
pub fn check_batch(batch: &AppendBatch, current: Option<&SignedHead>) -> Result<()> {
    check_batch_at(batch, current.map(|h| (h.seq, h.hash)))
}

/// [`check_batch`] against the run's current end (last sequence number and hash), if it has one.
pub fn check_batch_at(batch: &AppendBatch, current: Option<(u64, Hash)>) -> Result<()> {
    validate_id("run", &batch.run_id)?;
    let current_hash = current.map(|(_, hash)| hash);
    if current_hash != batch.expected_head {
        return Err(StoreError::HeadMoved {
            run_id: batch.run_id.clone(),
            expected: batch.expected_head.map_or("<new run>".into(), |h| h.to_hex()),
            actual: current_hash.map_or("<no run>".into(), |h| h.to_hex()),
        });
    }
    let bad = |problem: String| StoreError::BadBatch {
        run_id: batch.run_id.clone(),
        problem,
    };
    let Some(last) = batch.entries.last() else {
        return Err(bad("the batch is empty".into()));
    };
    let first_seq = current.map_or(0, |(seq, _)| seq + 1);
    for (expected_seq, entry) in (first_seq..).zip(&batch.entries) {
        if entry.seq != expected_seq {
            return Err(bad(format!(
                "entry has seq {} where {expected_seq} was expected",
                entry.seq
            )));
        }
    }
    if batch.head.seq != last.seq || batch.head.hash != last.hash {
        return Err(bad("the signed head is not the batch's last entry".into()));
    }
    Ok(())
}

/// A shared store is a store (the gateway service and its tests hold one store in several places).
impl<S: RecordStore> RecordStore for std::sync::Arc<S> {
    fn append(&self, tenant: &TenantId, batch: AppendBatch) -> impl Future<Output = Result<()>> + Send {
        (**self).append(tenant, batch)
    }

    fn append_flushed_soon(
        &self,
        tenant: &TenantId,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<()>> + Send {
        (**self).append_flushed_soon(tenant, batch)
    }

    fn flush_pending(&self) -> impl Future<Output = Result<()>> + Send {
        (**self).flush_pending()
    }

    fn head(
        &self,
        tenant: &TenantId,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<SignedHead>>> + Send {
        (**self).head(tenant, run_id)
    }

    fn read_chain(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
    ) -> impl Future<Output = Result<Vec<StoredEntry>>> + Send {
        (**self).read_chain(tenant, run_id, from_seq)
    }

    fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEntry>>> + Send {
        (**self).read_chain_page(tenant, run_id, from_seq, limit)
    }

    fn list_runs(
        &self,
        tenant: &TenantId,
        filter: &RunFilter,
    ) -> impl Future<Output = Result<Vec<RunSummary>>> + Send {
        (**self).list_runs(tenant, filter)
    }

    fn run_summary(
        &self,
        tenant: &TenantId,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<RunSummary>>> + Send {
        (**self).run_summary(tenant, run_id)
    }

    fn recorded_bytes(&self, tenant: &TenantId) -> impl Future<Output = Result<u64>> + Send {
        (**self).recorded_bytes(tenant)
    }

    fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> impl Future<Output = Result<Hash>> + Send {
        (**self).put_blob(tenant, bytes)
    }

    fn get_blob(
        &self,
        tenant: &TenantId,
        hash: &Hash,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send {
        (**self).get_blob(tenant, hash)
    }

    fn latest_checkpoint(
        &self,
        tenant: &TenantId,
        session_id: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>>> + Send {
        (**self).latest_checkpoint(tenant, session_id)
    }

    fn run_key(
        &self,
        tenant: &TenantId,
        run_id: &str,
        subject: &SubjectHandle,
        to: KeyUse,
    ) -> impl Future<Output = std::result::Result<Option<SecretKey>, VaultError>> + Send {
        (**self).run_key(tenant, run_id, subject, to)
    }
}
