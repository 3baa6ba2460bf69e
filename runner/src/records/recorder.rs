//! The writer side of a DecisionRecord: stages typed entries for one run, chains and seals
//! them, moves large bodies to blobs, signs the head and appends in batches.
//!
//! If another writer extended the run in the meantime (the gateway and the runner may both
//! write to one run), the store refuses the batch; the recorder then re-reads the head and
//! re-chains its staged entries on top of it. It never retries the refused batch as it was.

use serde_json::Value;
use tracing::Instrument as _;

use super::{
    entry::{EntryBody, Hash, PinnedDigests, Position, RecordEntry, StoredEntry, encode_parts},
    store::{
        AppendBatch, Checkpoint, RecordStore, RunSummary, SignedHead, StoreError, TenantId, validate_id,
    },
};
use crate::{consent::SubjectHandle, keys::KeyPair, vault::SecretKey};

/// Bodies whose canonical encoding exceeds this many bytes are stored once as a blob and
/// referenced by hash.
pub const DEFAULT_BLOB_THRESHOLD: usize = 16 * 1024;

/// How many times a batch is re-chained after other writers moved the head.
const MAX_RECHAINS: usize = 32;

/// How long a writer waits for a record that ends before the head it was told (the write may
/// still be under way at another gateway replica) before it gives up on it as lost.
const LOST_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors writing a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {run_id} does not exist in tenant {tenant}; start it before resuming")]
    UnknownRun { tenant: String, run_id: String },
    #[error("run {run_id}: entry {seq} cannot be decoded: {problem}")]
    Undecodable {
        run_id: String,
        seq: u64,
        problem: String,
    },
    #[error("run {run_id}: other writers kept moving the head; gave up after {attempts} re-chains")]
    Contended { run_id: String, attempts: usize },
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    #[error(
        "run {run_id}: the record ends at entry {found}, before entry {known} this writer was told is written (a gateway replica failed before making it durable); end this attempt and resume from the record"
    )]
    Lost { run_id: String, known: u64, found: u64 },
    #[error(
        "run {run_id}: another writer recorded the model's turn for step {step} first; this one is not recorded (read the record's)"
    )]
    TurnRecorded { run_id: String, step: u32 },
}

/// When a write must be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Before the write returns.
    Now,
    /// With the store's next flush (see [`RecordStore::append_flushed_soon`]): for a batch
    /// whose head was already given to a runner, which proves on its next request that the
    /// record still holds it.
    Soon,
}

/// A batch chained and sealed but not written yet: its head is known before it is durable, so
/// the gateway service can answer with it while the write is under way (see
/// [`Recorder::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    batch: AppendBatch,
    effects: Vec<SummaryEffect>,
    /// The bodies this recorder chained itself (after any entries chained elsewhere, which
    /// cannot be chained again).
    own: Vec<Staged>,
}

impl Prepared {
    /// Seq and hash of the batch's last entry: the run's head once it is written.
    pub fn head(&self) -> (u64, Hash) {
        (self.batch.head.seq, self.batch.head.hash)
    }

    /// The batch's entries, in chain order.
    pub fn entries(&self) -> &[StoredEntry] {
        &self.batch.entries
    }
}

/// What starts a run.
#[derive(Clone, Debug)]
pub struct RunStart {
    pub run_id: String,
    pub session_id: String,
    pub agent: String,
    pub run_context: Value,
    pub pinned: PinnedDigests,
    /// Blob of the run bundle (see `run::bundle`), stored before the run starts.
    pub bundle: Option<Hash>,
}

/// Appends entries to one run.
#[derive(Debug)]
pub struct Recorder<'s, S> {
    store: &'s S,
    tenant: TenantId,
    key: KeyPair,
    summary: RunSummary,
    /// Seq and hash of the last entry known to be stored.
    head: Option<(u64, Hash)>,
    /// Entries someone else chained onto this recorder's head (a runner's own entries, sent
    /// with its request to the gateway service), waiting to be written ahead of `staged`.
    chained: Vec<(StoredEntry, SummaryEffect)>,
    /// Bodies waiting for `flush`, in order, already encoded.
    staged: Vec<Staged>,
    blob_threshold: usize,
    clock: fn() -> i64,
    /// Whether heads are signed (always, except for a replay's throw-away record).
    sign_heads: bool,
    /// Copies of staged bodies, kept when asked for (a replay reads its decisions from them).
    tap: Option<Vec<EntryBody>>,
    /// Copies of the entries this recorder appended, when asked for (see
    /// [`Recorder::keeping_written`]); dropped once other writers' entries turn up between them.
    written: Option<Vec<StoredEntry>>,
    /// For a run about a subject: who, and the run's key its entries are encrypted under.
    vault: Option<(SubjectHandle, SecretKey)>,
    /// A body that could not be encrypted when staged: the next flush fails with it.
    failed_lock: Option<crate::vault::VaultError>,
    /// The uid of the Session the run was started for, as its `run_started` entry's RunContext
    /// says (none for a run started outside a cluster, or before contexts carried it).
    session_uid: Option<String>,
}

/// The Session uid a `run_started` entry's `run_context` (a signed RunContext) names.
fn session_uid_of(run_context: &Value) -> Option<String> {
    run_context
        .get("context")?
        .get("session_uid")?
        .as_str()
        .map(str::to_owned)
}

/// A body waiting to be chained: encoded once, at staging time.
#[derive(Clone, Debug)]
struct Staged {
    at_ms: i64,
    body: Vec<u8>,
    effect: SummaryEffect,
    /// The size of the blob the body was moved to (0: it was not).
    blob_bytes: u64,
}

/// What other writers appended since this recorder's head: their hashes, and the steps of the
/// model turns among them.
#[derive(Debug, Default)]
struct CaughtUp {
    hashes: Vec<Hash>,
    turns: Vec<u32>,
}

/// What a body changes in the run summary.
#[derive(Clone, Copy, Debug)]
enum SummaryEffect {
    None,
    Completed,
    Failed,
    Checkpoint(u32),
}

impl SummaryEffect {
    fn of(body: &EntryBody) -> Self {
        match body {
            EntryBody::Completed { .. } => Self::Completed,
            EntryBody::Failed { .. } => Self::Failed,
            EntryBody::Checkpoint { step, .. } => Self::Checkpoint(*step),
            // A completion large enough to be stored as a blob still ends the run.
            EntryBody::Blob { body_type, .. } if body_type == "completed" => Self::Completed,
            EntryBody::Blob { body_type, .. } if body_type == "failed" => Self::Failed,
            _ => Self::None,
        }
    }

    fn apply(self, summary: &mut RunSummary) {
        match self {
            Self::Completed => summary.outcome = "completed".into(),
            Self::Failed => summary.outcome = "failed".into(),
            Self::None | Self::Checkpoint(_) => {}
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl<'s, S: RecordStore> Recorder<'s, S> {
    /// Starts a new run and writes its `run_started` entry.
    pub async fn start(
        store: &'s S,
        tenant: TenantId,
        key: KeyPair,
        start: RunStart,
    ) -> Result<Self, RecordError> {
        let mut recorder = Self::begin(store, tenant, key, start)?;
        recorder.flush().await?;
        Ok(recorder)
    }

    /// Like [`Recorder::start`], but `run_started` is only staged: it becomes durable with the
    /// entries staged after it, in one batch. A run loop uses this so that a run never exists
    /// without its first checkpoint — a crash in between would leave a run that can neither be
    /// resumed (no checkpoint) nor started again (its first entry is taken).
    pub fn begin(store: &'s S, tenant: TenantId, key: KeyPair, start: RunStart) -> Result<Self, RecordError> {
        validate_id("run", &start.run_id)?;
        validate_id("session", &start.session_id)?;
        let clock: fn() -> i64 = now_ms;
        let summary = RunSummary {
            run_id: start.run_id.clone(),
            session_id: start.session_id.clone(),
            agent: start.agent.clone(),
            started_at_ms: clock(),
            outcome: "running".into(),
            entries: 0,
            head: Hash([0; 32]),
            bytes: 0,
        };
        let mut recorder = Self::with_state(store, tenant, key, summary, None);
        recorder.session_uid = session_uid_of(&start.run_context);
        recorder.stage(EntryBody::RunStarted {
            session_id: start.session_id,
            agent: start.agent,
            run_context: start.run_context,
            pinned: start.pinned,
            bundle: start.bundle,
        });
        Ok(recorder)
    }

    /// A recorder for a run that does not exist yet, whose `run_started` entry someone else
    /// chained (see [`Recorder::append_chained`]): the summary is taken from that entry.
    pub fn for_new_run(
        store: &'s S,
        tenant: TenantId,
        key: KeyPair,
        run_started: &RecordEntry,
    ) -> Result<Self, RecordError> {
        let EntryBody::RunStarted {
            session_id,
            agent,
            run_context,
            ..
        } = &run_started.body
        else {
            return Err(RecordError::Store(StoreError::BadBatch {
                run_id: run_started.run_id.clone(),
                problem: "a run must start with run_started".into(),
            }));
        };
        validate_id("run", &run_started.run_id)?;
        validate_id("session", session_id)?;
        let summary = RunSummary {
            run_id: run_started.run_id.clone(),
            session_id: session_id.clone(),
            agent: agent.clone(),
            started_at_ms: run_started.at_ms,
            outcome: "running".into(),
            entries: 0,
            head: Hash([0; 32]),
            bytes: 0,
        };
        let mut recorder = Self::with_state(store, tenant, key, summary, None);
        recorder.session_uid = session_uid_of(run_context);
        Ok(recorder)
    }

    /// Continues a run whose summary and head the caller already knows (it read them before,
    /// see [`fold_into_summary`]): no read of the chain. An append that finds the head moved is
    /// re-chained as usual.
    pub fn at(store: &'s S, tenant: TenantId, key: KeyPair, summary: RunSummary, head: (u64, Hash)) -> Self {
        Self::with_state(store, tenant, key, summary, Some(head))
    }

    /// A recorder over a known summary and head, with nothing staged.
    fn with_state(
        store: &'s S,
        tenant: TenantId,
        key: KeyPair,
        summary: RunSummary,
        head: Option<(u64, Hash)>,
    ) -> Self {
        Self {
            store,
            tenant,
            key,
            summary,
            head,
            chained: Vec::new(),
            staged: Vec::new(),
            blob_threshold: DEFAULT_BLOB_THRESHOLD,
            clock: now_ms,
            sign_heads: true,
            tap: None,
            written: None,
            vault: None,
            failed_lock: None,
            session_uid: None,
        }
    }

    /// Encrypts what this run learns about `subject` under the run's `key` (see
    /// [`super::vaulted`]) in every entry staged from now on.
    pub fn vaulted(mut self, subject: SubjectHandle, key: SecretKey) -> Self {
        self.vault = Some((subject, key));
        self
    }

    /// The uid of the Session the run was started for, as its first entry says (known to a
    /// recorder that began or resumed the run).
    pub fn session_uid(&self) -> Option<&str> {
        self.session_uid.as_deref()
    }

    /// The subject this recorder's entries are encrypted for, if any.
    pub fn vaulted_for(&self) -> Option<&SubjectHandle> {
        self.vault.as_ref().map(|(subject, _)| subject)
    }

    /// Keeps a copy of every entry this recorder appends, for a caller that folds them into its
    /// own view of the run instead of reading them back (see [`Recorder::written`]).
    pub fn keeping_written(mut self) -> Self {
        self.written = Some(Vec::new());
        self
    }

    /// The entries this recorder appended, in chain order, if it kept them and no other
    /// writer's entries came between them (after a re-chain the caller must read the chain).
    pub fn written(&self) -> Option<&[StoredEntry]> {
        self.written.as_deref()
    }

    /// Continues an existing run (after a restart), reading its head and first entry.
    pub async fn resume(
        store: &'s S,
        tenant: TenantId,
        key: KeyPair,
        run_id: &str,
    ) -> Result<Self, RecordError> {
        let unknown = || RecordError::UnknownRun {
            tenant: tenant.to_string(),
            run_id: run_id.to_owned(),
        };
        let first = store
            .read_chain_page(&tenant, run_id, 0, 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(unknown)?;
        let decoded = RecordEntry::decode(&first.bytes).map_err(|e| RecordError::Undecodable {
            run_id: run_id.into(),
            seq: 0,
            problem: e.to_string(),
        })?;
        let EntryBody::RunStarted {
            session_id,
            agent,
            run_context,
            ..
        } = decoded.body
        else {
            return Err(RecordError::Undecodable {
                run_id: run_id.into(),
                seq: 0,
                problem: "the first entry is not run_started".into(),
            });
        };
        // The summary the store keeps beside the head, where it keeps one: a run may hold
        // hundreds of MiB, and whoever resumes it to add an entry (the gateway recording a
        // refusal) must not hold them all. Otherwise it is worked out page by page.
        let summary = match store.run_summary(&tenant, run_id).await? {
            Some(kept) if kept.entries > 0 => kept,
            _ => {
                let head = store.head(&tenant, run_id).await?.ok_or_else(unknown)?;
                let mut summary = RunSummary {
                    run_id: run_id.into(),
                    session_id,
                    agent,
                    started_at_ms: decoded.at_ms,
                    outcome: "running".into(),
                    entries: head.seq + 1,
                    head: head.hash,
                    bytes: 0,
                };
                Self::summarise(store, &tenant, run_id, head.seq, &mut summary).await?;
                summary
            }
        };
        let head = (summary.entries - 1, summary.head);
        // A run about a subject goes on being recorded under its key (refused once they are
        // erased: nothing more is kept about them).
        let vault = match decoded.vaulted {
            Some(subject) => {
                let key = store.key_to_keep(&tenant, run_id, &subject).await?;
                Some((subject, key))
            }
            None => None,
        };
        let mut recorder = Self::with_state(store, tenant, key, summary, Some(head));
        recorder.session_uid = session_uid_of(&run_context);
        Ok(match vault {
            Some((subject, key)) => recorder.vaulted(subject, key),
            None => recorder,
        })
    }

    /// Applies what each entry up to `last` changes in the summary, reading the chain a page at
    /// a time.
    async fn summarise(
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        last: u64,
        summary: &mut RunSummary,
    ) -> Result<(), RecordError> {
        const PAGE: usize = 64;
        let mut from = 0;
        while from <= last {
            let page = store.read_chain_page(tenant, run_id, from, PAGE).await?;
            for entry in page.iter().take_while(|e| e.seq <= last) {
                if let Ok(e) = RecordEntry::decode(&entry.bytes) {
                    SummaryEffect::of(&e.body).apply(summary);
                }
            }
            // A page may be shorter than asked (a store's own bound): only an empty one ends it.
            match page.last() {
                Some(entry) => from = entry.seq + 1,
                None => break,
            }
        }
        Ok(())
    }

    /// Uses a fixed clock (for byte-identical records in tests and replays).
    pub fn with_clock(mut self, clock: fn() -> i64) -> Self {
        self.clock = clock;
        self
    }

    /// Changes the inline size limit for bodies.
    pub fn with_blob_threshold(mut self, bytes: usize) -> Self {
        self.blob_threshold = bytes;
        self
    }

    pub fn run_id(&self) -> &str {
        &self.summary.run_id
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The store this recorder writes to.
    pub fn store(&self) -> &'s S {
        self.store
    }

    /// Seq and hash of the newest stored entry.
    pub fn head(&self) -> Option<(u64, Hash)> {
        self.head
    }

    /// Whether the run recorded its outcome (completed or failed): nothing follows it.
    pub fn finished(&self) -> bool {
        self.summary.outcome != "running"
    }

    /// For a replay's throw-away record: heads from now on are not signed, and every staged
    /// body is also kept in memory for [`Recorder::take_tapped`].
    pub fn for_replay(mut self) -> Self {
        self.sign_heads = false;
        self.tap = Some(Vec::new());
        self
    }

    /// The bodies staged since [`Recorder::for_replay`], in order.
    pub fn take_tapped(&mut self) -> Vec<EntryBody> {
        self.tap.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether entries wait for the next flush.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty() || !self.chained.is_empty()
    }

    /// Queues an entry for the next flush.
    pub fn stage(&mut self, body: EntryBody) {
        let effect = SummaryEffect::of(&body);
        if let Some(tap) = &mut self.tap {
            tap.push(body.clone());
        }
        let encoded = match &self.vault {
            None => body.encode(),
            Some((_, key)) => {
                let mut locked = body;
                if let Err(e) = super::vaulted::lock(&mut locked, key) {
                    self.failed_lock.get_or_insert(e);
                    return;
                }
                locked.encode()
            }
        };
        self.staged.push(Staged {
            at_ms: (self.clock)(),
            body: encoded,
            effect,
            blob_bytes: 0,
        });
    }

    /// Writes one entry now and returns its hash.
    pub async fn record(&mut self, body: EntryBody) -> Result<Hash, RecordError> {
        self.stage(body);
        Ok(self.flush().await?.hash)
    }

    /// Appends everything staged in one atomic batch and returns the new signed head.
    pub async fn flush(&mut self) -> Result<SignedHead, RecordError> {
        let span = append_span(self.staged.len());
        self.flush_untraced().instrument(span).await
    }

    async fn flush_untraced(&mut self) -> Result<SignedHead, RecordError> {
        self.flush_unless_recorded(None).await
    }

    /// [`Recorder::flush`]; with `turn`, the staged bodies hold the model's turn for that step,
    /// and are dropped rather than chained again if another writer recorded that step's turn
    /// first ([`RecordError::TurnRecorded`]): one step has one answer on record.
    async fn flush_unless_recorded(&mut self, turn: Option<u32>) -> Result<SignedHead, RecordError> {
        if let Some(e) = self.failed_lock.take() {
            return Err(e.into());
        }
        if !self.chained.is_empty() {
            // Entries someone else chained cannot be re-chained: they go on this head or not at all.
            return self.flush_exclusive_untraced().await;
        }
        let staged = std::mem::take(&mut self.staged);
        let bodies = self.offload_blobs(staged).await?;
        for attempt in 0..MAX_RECHAINS {
            let batch = self.build_batch(&bodies);
            let written: Vec<Hash> = batch.entries.iter().map(|e| e.hash).collect();
            match self.append_sealed(batch, Flush::Now).await {
                Ok(head) => return Ok(head),
                Err(RecordError::Store(StoreError::HeadMoved { .. })) => {
                    let appended = self.catch_up().await?;
                    // A remote store may have written the batch and lost its answer: when the
                    // chain now continues with exactly this batch (whatever followed it since),
                    // it is written — re-chaining it would record everything twice.
                    if appended.hashes.starts_with(&written)
                        && let Some(stored) = self.store.head(&self.tenant, &self.summary.run_id).await?
                    {
                        return Ok(stored);
                    }
                    if let Some(step) = turn
                        && appended.turns.contains(&step)
                    {
                        return Err(RecordError::TurnRecorded {
                            run_id: self.summary.run_id.clone(),
                            step,
                        });
                    }
                    // Writers that collided would collide again in lockstep; a random pause
                    // lets one of them through.
                    crate::gateway::fair::away(tokio::time::sleep(rechain_pause(attempt))).await;
                }
                Err(e) => {
                    // Keep the bodies so a caller that retries after a transient error loses nothing.
                    self.staged = bodies;
                    return Err(e);
                }
            }
        }
        self.staged = bodies;
        Err(RecordError::Contended {
            run_id: self.summary.run_id.clone(),
            attempts: MAX_RECHAINS,
        })
    }

    /// Appends everything staged on top of the head this recorder knows, or nothing: if another
    /// writer moved the head, the staged entries are dropped and the error returned (what they
    /// said was decided on a state that is gone).
    pub async fn flush_exclusive(&mut self) -> Result<SignedHead, RecordError> {
        let span = append_span(self.staged.len());
        self.flush_exclusive_untraced().instrument(span).await
    }

    async fn flush_exclusive_untraced(&mut self) -> Result<SignedHead, RecordError> {
        let prepared = self
            .prepare()
            .instrument(tracing::debug_span!("record.prepare"))
            .await?;
        match prepared {
            Some(prepared) => self.commit(prepared).await,
            None => self
                .store
                .head(&self.tenant, &self.summary.run_id)
                .await?
                .ok_or_else(|| RecordError::UnknownRun {
                    tenant: self.tenant.to_string(),
                    run_id: self.summary.run_id.clone(),
                }),
        }
    }

    /// [`Recorder::flush_exclusive`], but durable only with the store's next flush
    /// ([`RecordStore::flush_pending`]) instead of before it returns: seen by every reader at
    /// once, and written only on the head it was chained onto (if anyone else wrote meanwhile,
    /// [`StoreError::HeadMoved`] and nothing is written). For a read-only tool's go-ahead, made
    /// durable while the tool is asked.
    pub async fn commit_flushed_soon(&mut self) -> Result<(), RecordError> {
        if let Some(prepared) = self.prepare().await? {
            self.append_sealed(prepared.batch, Flush::Soon)
                .instrument(tracing::debug_span!("record.store_append"))
                .await?;
        }
        Ok(())
    }

    /// Chains and seals everything staged onto the current head without writing it (large
    /// bodies are stored as blobs first); `None` if nothing is staged. [`Recorder::commit`]
    /// writes it; until then this recorder's head stays where it was.
    pub async fn prepare(&mut self) -> Result<Option<Prepared>, RecordError> {
        if let Some(e) = self.failed_lock.take() {
            return Err(e.into());
        }
        if !self.has_staged() {
            return Ok(None);
        }
        let staged = std::mem::take(&mut self.staged);
        let bodies = self.offload_blobs(staged).await?;
        let mut sealed = std::mem::take(&mut self.chained);
        let mut prev = sealed.last().map(|(e, _)| (e.seq, e.hash)).or(self.head);
        for item in &bodies {
            let entry = self.chain_one(prev, item);
            prev = Some((entry.seq, entry.hash));
            sealed.push((entry, item.effect));
        }
        let effects = sealed.iter().map(|(_, effect)| *effect).collect();
        Ok(Some(Prepared {
            batch: self.seal(sealed, offloaded(&bodies)),
            effects,
            own: bodies,
        }))
    }

    /// Takes back a prepared batch nobody wrote (the request carrying it failed): its entries
    /// wait again, chained as they were, ahead of anything staged since.
    pub fn undo(&mut self, prepared: Prepared) {
        let mut chained: Vec<_> = prepared.batch.entries.into_iter().zip(prepared.effects).collect();
        chained.append(&mut self.chained);
        self.chained = chained;
    }

    /// Writes a prepared batch on the head it was chained onto, or not at all (a go-ahead is
    /// written only on top of what was read), and moves this recorder past it.
    pub async fn commit(&mut self, prepared: Prepared) -> Result<SignedHead, RecordError> {
        self.append_sealed(prepared.batch, Flush::Now)
            .instrument(tracing::debug_span!("record.store_append"))
            .await
    }

    /// Like [`Recorder::commit`], but if another writer moved the head meanwhile, this
    /// recorder's own bodies are chained again on top of it, as [`Recorder::flush`] does; entries
    /// chained elsewhere in the batch are dropped (they cannot move). What the bodies record (a
    /// call's result, a model turn and the tokens it cost) matters more than the head someone
    /// was told, who then finds that head missing and reads the record again.
    /// `flush` says when the batch must be durable; a batch chained again is durable before
    /// this returns.
    pub async fn commit_or_rechain(
        &mut self,
        prepared: Prepared,
        flush: Flush,
    ) -> Result<SignedHead, RecordError> {
        self.commit_or_rechain_turn(prepared, flush, None).await
    }

    /// [`Recorder::commit_or_rechain`] for a batch holding the model's turn for step `turn`:
    /// not chained again if another writer recorded that step's turn meanwhile (two gateway
    /// replicas asked for one step at once), [`RecordError::TurnRecorded`] instead.
    pub async fn commit_or_rechain_turn(
        &mut self,
        prepared: Prepared,
        flush: Flush,
        turn: Option<u32>,
    ) -> Result<SignedHead, RecordError> {
        let Prepared { batch, own, .. } = prepared;
        let appended = self
            .append_sealed(batch, flush)
            .instrument(tracing::debug_span!("record.store_append"))
            .await;
        match appended {
            Err(RecordError::Store(StoreError::HeadMoved { .. })) if !own.is_empty() => {
                self.chained.clear();
                self.staged = own;
                let span = append_span(self.staged.len());
                self.flush_unless_recorded(turn).instrument(span).await
            }
            result => result,
        }
    }

    /// Moves this recorder past a batch it prepared that someone else wrote (the gateway
    /// service, which received it with a request and chained its own entries after it).
    pub fn delivered(&mut self, prepared: Prepared) {
        self.summary = prepared.batch.summary;
        self.advance(&prepared.batch.head);
    }

    /// Counts `bytes` as what the run kept in the store before what this recorder writes next
    /// (the gateway service's count of its record as read): written with the run's summary,
    /// each batch adding its own entries and the blobs their bodies moved to, where the
    /// tenant's bound reads it. Never lowers what was counted.
    pub fn count_stored_bytes(&mut self, bytes: u64) {
        self.summary.bytes = self.summary.bytes.max(bytes);
    }

    /// Drops what is staged (a decision that will not be written).
    pub fn discard_staged(&mut self) {
        self.staged.clear();
        self.chained.clear();
    }

    fn advance(&mut self, head: &SignedHead) {
        self.advance_to(head.seq, head.hash);
    }

    fn advance_to(&mut self, seq: u64, hash: Hash) {
        self.head = Some((seq, hash));
        self.summary.entries = seq + 1;
        self.summary.head = hash;
    }

    /// Reads what other writers appended to the run since this recorder last wrote (the gateway
    /// service writes decisions and model turns between a runner's own entries).
    pub async fn sync(&mut self) -> Result<(), RecordError> {
        self.catch_up().await.map(|_| ())
    }

    /// Moves to `head`, the run's head as the gateway service answered it after writing entries
    /// of its own (decisions, results, model turns — none of which changes the run's summary),
    /// instead of reading them back; without one, reads them as [`Recorder::sync`] does. A head
    /// that turns out wrong costs one refused append, after which the recorder catches up as
    /// after any other writer.
    pub async fn follow(&mut self, head: Option<(u64, Hash)>) -> Result<(), RecordError> {
        match (head, self.head) {
            (Some((seq, hash)), Some((known, _))) if seq > known => {
                self.advance_to(seq, hash);
                Ok(())
            }
            (Some(_), Some(_)) => Ok(()),
            _ => self.sync().await,
        }
    }

    /// Re-reads the head after another writer appended, folding what it wrote into the summary;
    /// returns the hashes of the entries it found.
    async fn catch_up(&mut self) -> Result<CaughtUp, RecordError> {
        let run_id = self.summary.run_id.clone();
        let Some(head) = self.store.head(&self.tenant, &run_id).await? else {
            return Err(RecordError::UnknownRun {
                tenant: self.tenant.to_string(),
                run_id,
            });
        };
        // A record that ends before what this writer was told is written lost entries someone
        // may already have acted on: never re-chain past that. (Another replica of the gateway
        // service may still be writing them: it is given a moment.)
        let mut head = head;
        let mut waited = std::time::Duration::ZERO;
        while let Some((known, known_hash)) = self.head {
            let behind = head.seq < known;
            let diverged = head.seq == known && head.hash != known_hash;
            if !(behind || diverged) {
                break;
            }
            if diverged || waited >= LOST_PATIENCE {
                return Err(RecordError::Lost {
                    run_id,
                    known,
                    found: head.seq,
                });
            }
            let pause = std::time::Duration::from_millis(50);
            crate::gateway::fair::away(tokio::time::sleep(pause)).await;
            waited += pause;
            head = self
                .store
                .head(&self.tenant, &run_id)
                .await?
                .ok_or_else(|| RecordError::UnknownRun {
                    tenant: self.tenant.to_string(),
                    run_id: run_id.clone(),
                })?;
        }
        let from = self.head.map_or(0, |(seq, _)| seq + 1);
        let mut appended = CaughtUp::default();
        let others = self.store.read_chain(&self.tenant, &run_id, from).await?;
        if !others.is_empty() {
            self.written = None;
        }
        for entry in others {
            appended.hashes.push(entry.hash);
            // What the other writer wrote is kept too: a batch re-chained after it counts on.
            self.summary.bytes = self.summary.bytes.saturating_add(entry.bytes.len() as u64);
            if let Ok(e) = RecordEntry::decode(&entry.bytes) {
                SummaryEffect::of(&e.body).apply(&mut self.summary);
                if let Some(step) = self.turn_step(&e.body).await? {
                    appended.turns.push(step);
                }
            }
        }
        self.advance(&head);
        Ok(appended)
    }

    /// The step of a model turn (one stored as a blob is read for it: a turn whose step cannot
    /// be read is an error, never taken for another entry).
    async fn turn_step(&self, body: &EntryBody) -> Result<Option<u32>, RecordError> {
        match body {
            EntryBody::ModelTurn { step, .. } => Ok(Some(*step)),
            EntryBody::Blob { blob, body_type, .. } if body_type == "model_turn" => {
                let unreadable = |problem: String| StoreError::Corrupt {
                    key: format!("blob {blob}"),
                    problem,
                };
                let bytes = self
                    .store
                    .get_blob(&self.tenant, blob)
                    .await?
                    .ok_or_else(|| unreadable("a model turn's blob is missing".into()))?;
                match serde_json::from_slice(&bytes) {
                    Ok(EntryBody::ModelTurn { step, .. }) => Ok(Some(step)),
                    _ => Err(unreadable("a model turn's blob holds no model turn".into()).into()),
                }
            }
            _ => Ok(None),
        }
    }

    /// Appends entries someone else chained (a runner submitting its own entries to the gateway
    /// service): they must extend this recorder's head exactly, link up entry by entry and
    /// belong to this run; the batch is sealed with this recorder's key. The caller decides which
    /// bodies it accepts from that writer.
    pub(crate) async fn append_chained(
        &mut self,
        entries: Vec<(StoredEntry, RecordEntry)>,
    ) -> Result<SignedHead, RecordError> {
        self.stage_chained(entries)?;
        self.flush_exclusive().await
    }

    /// Stages entries someone else chained onto this recorder's head (and whatever it staged
    /// that way before), checked as [`Recorder::append_chained`] checks them; they are written
    /// ahead of the bodies staged after them, by the next flush. Each comes with its decoded
    /// form: the caller decoded it from those bytes to vet it, and it is not decoded twice.
    pub(crate) fn stage_chained(
        &mut self,
        entries: Vec<(StoredEntry, RecordEntry)>,
    ) -> Result<(), RecordError> {
        let run_id = self.summary.run_id.clone();
        let refuse = |problem: String| {
            RecordError::Store(StoreError::BadBatch {
                run_id: run_id.clone(),
                problem,
            })
        };
        if entries.is_empty() {
            return Err(refuse("the batch is empty".into()));
        }
        if !self.staged.is_empty() {
            return Err(refuse(
                "entries chained elsewhere must come before this writer's own".into(),
            ));
        }
        let mut prev = self.chained.last().map(|(e, _)| (e.seq, e.hash)).or(self.head);
        let mut sealed = Vec::with_capacity(entries.len());
        for (stored, entry) in entries {
            let expected_seq = prev.map_or(0, |(s, _)| s + 1);
            if entry.run_id != run_id || entry.seq != expected_seq || stored.seq != expected_seq {
                return Err(refuse(format!(
                    "entry {} of run {} does not continue run {run_id} at seq {expected_seq}",
                    entry.seq, entry.run_id
                )));
            }
            if entry.prev != prev.map(|(_, h)| h) {
                return Err(refuse(format!(
                    "entry {} does not link to the entry before it",
                    entry.seq
                )));
            }
            prev = Some((stored.seq, stored.hash));
            sealed.push((stored, SummaryEffect::of(&entry.body)));
        }
        self.chained.extend(sealed);
        Ok(())
    }

    /// Appends a sealed batch and moves this recorder past it.
    async fn append_sealed(&mut self, batch: AppendBatch, flush: Flush) -> Result<SignedHead, RecordError> {
        let head = batch.head.clone();
        let summary = batch.summary.clone();
        let kept = self.written.is_some().then(|| batch.entries.clone());
        // Every write of a run's record comes here: timed, and its dead letters counted once
        // they are on record (a replay's record, kept in memory, is not the service's).
        let measured = self.tap.is_none();
        let dead_letters = if measured {
            dead_letters_in(&batch.entries)
        } else {
            0
        };
        let started = std::time::Instant::now();
        let appended = match flush {
            Flush::Now => self.store.append(&self.tenant, batch).await,
            Flush::Soon => self.store.append_flushed_soon(&self.tenant, batch).await,
        };
        if measured {
            let metrics = crate::gateway::metrics::gateway();
            metrics.append(started.elapsed());
            if appended.is_ok() {
                metrics.dead_letters(dead_letters);
            }
        }
        appended?;
        if let (Some(written), Some(kept)) = (&mut self.written, kept) {
            written.extend(kept);
        }
        self.summary = summary;
        self.advance(&head);
        Ok(head)
    }

    /// Replaces bodies above the threshold with blob references.
    async fn offload_blobs(&self, staged: Vec<Staged>) -> Result<Vec<Staged>, RecordError> {
        let mut out = Vec::with_capacity(staged.len());
        for item in staged {
            if item.body.len() <= self.blob_threshold {
                out.push(item);
                continue;
            }
            let size = item.body.len() as u64;
            let body_type = body_type_of(&item.body);
            let blob = self.store.put_blob(&self.tenant, item.body).await?;
            let reference = EntryBody::Blob {
                blob,
                size,
                body_type,
            };
            out.push(Staged {
                at_ms: item.at_ms,
                body: reference.encode(),
                effect: item.effect,
                blob_bytes: size,
            });
        }
        Ok(out)
    }

    /// Chains `bodies` onto the current head, seals them and signs the new head.
    fn build_batch(&self, bodies: &[Staged]) -> AppendBatch {
        let mut prev = self.head;
        let mut sealed = Vec::with_capacity(bodies.len());
        for item in bodies {
            let entry = self.chain_one(prev, item);
            prev = Some((entry.seq, entry.hash));
            sealed.push((entry, item.effect));
        }
        self.seal(sealed, offloaded(bodies))
    }

    /// `item` as the entry after `prev`.
    fn chain_one(&self, prev: Option<(u64, Hash)>, item: &Staged) -> StoredEntry {
        let seq = prev.map_or(0, |(s, _)| s + 1);
        let bytes = encode_parts(
            Position {
                run_id: &self.summary.run_id,
                seq,
                prev: prev.map(|(_, h)| h).as_ref(),
                at_ms: item.at_ms,
                vaulted: self.vaulted_for(),
            },
            &item.body,
        );
        StoredEntry::from_bytes(seq, bytes)
    }

    /// The batch appending `entries` (already chained onto this recorder's head, their large
    /// bodies moved to blobs of `offloaded` bytes): the summary they lead to — counting what
    /// they keep in the store — the checkpoint among them, and the head signature.
    fn seal(&self, entries: Vec<(StoredEntry, SummaryEffect)>, offloaded: u64) -> AppendBatch {
        let mut summary = self.summary.clone();
        let written: u64 = entries.iter().map(|(e, _)| e.bytes.len() as u64).sum();
        summary.bytes = summary.bytes.saturating_add(written).saturating_add(offloaded);
        let mut checkpoint = None;
        let mut last = self.head;
        let mut stored = Vec::with_capacity(entries.len());
        for (entry, effect) in entries {
            effect.apply(&mut summary);
            if let SummaryEffect::Checkpoint(step) = effect {
                checkpoint = Some(Checkpoint {
                    session_id: summary.session_id.clone(),
                    run_id: summary.run_id.clone(),
                    seq: entry.seq,
                    entry_hash: entry.hash,
                    step,
                });
            }
            last = Some((entry.seq, entry.hash));
            stored.push(entry);
        }
        let (seq, hash) = last.unwrap_or((0, Hash([0; 32])));
        summary.entries = seq + 1;
        summary.head = hash;
        let message = SignedHead::message(&self.tenant, &summary.run_id, seq, &hash);
        let head = SignedHead {
            seq,
            hash,
            key_id: self.key.key_id(),
            signature: if self.sign_heads {
                self.key.sign_hex(&message)
            } else {
                String::new()
            },
        };
        AppendBatch {
            run_id: summary.run_id.clone(),
            expected_head: self.head.map(|(_, h)| h),
            entries: stored,
            head,
            summary,
            checkpoint,
        }
    }
}

/// The bytes of the blobs `bodies` were moved to.
fn offloaded(bodies: &[Staged]) -> u64 {
    bodies.iter().map(|b| b.blob_bytes).sum()
}

/// Folds one entry into a run's summary (what a reader that follows a chain keeps, to continue
/// it with [`Recorder::at`]). The first entry (`run_started`) starts the summary.
pub fn fold_into_summary(summary: &mut Option<RunSummary>, hash: Hash, entry: &RecordEntry) {
    if let EntryBody::RunStarted {
        session_id, agent, ..
    } = &entry.body
    {
        *summary = Some(RunSummary {
            run_id: entry.run_id.clone(),
            session_id: session_id.clone(),
            agent: agent.clone(),
            started_at_ms: entry.at_ms,
            outcome: "running".into(),
            entries: 0,
            head: hash,
            bytes: 0,
        });
    }
    if let Some(summary) = summary {
        SummaryEffect::of(&entry.body).apply(summary);
        summary.entries = entry.seq + 1;
        summary.head = hash;
    }
}

/// A random pause of up to `100µs × 2^attempt` (capped at ~50 ms).
fn rechain_pause(attempt: usize) -> std::time::Duration {
    let mut bytes = [0u8; 4];
    let random = getrandom::fill(&mut bytes)
        .map(|()| u32::from_le_bytes(bytes))
        .unwrap_or(0);
    let ceiling = 100u32 << attempt.min(9);
    std::time::Duration::from_micros(u64::from(random % ceiling.max(1)))
}

/// The `type` tag of an encoded body (canonical JSON: `"type"` is a top-level key).
fn body_type_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Tag {
        r#type: String,
    }
    serde_json::from_slice::<Tag>(body)
        .map(|t| t.r#type)
        .unwrap_or_default()
}

/// How many of `entries` are dead letters (entries are decoded only when their bytes name one).
fn dead_letters_in(entries: &[StoredEntry]) -> u64 {
    const TAG: &[u8] = b"\"dead_lettered\"";
    entries
        .iter()
        .filter(|e| e.bytes.windows(TAG.len()).any(|w| w == TAG))
        .filter(|e| {
            RecordEntry::decode(&e.bytes).is_ok_and(|e| matches!(e.body, EntryBody::DeadLettered { .. }))
        })
        .count() as u64
}

/// The span of one append to a run's record: `entries` staged entries.
fn append_span(entries: usize) -> tracing::Span {
    tracing::info_span!(target: crate::telemetry::TARGET, "record.append", contextos.entries = entries)
}
