//! What the gateway service knows of one run's record, kept in step with the store by reading
//! only what was appended since it last looked: the chain's head and summary (to append without
//! reading the chain), the model ledger (steps and tokens the run has used), and whether the
//! run's Tool Gateway remembers exactly what the record says (results, used approvals, budget
//! counters). Another replica, or the runner, may append between two requests; their entries are
//! read and folded in. Anything unexpected (a tail that does not link up) starts over from the
//! whole chain.

use std::collections::HashMap;

use super::ToolGateway;
use crate::{
    consent::SubjectHandle,
    keys::KeyPair,
    memory::desk::RecallRecord,
    model::ModelTurn,
    records::{
        EntryBody, Hash, ReadError, RecordEntry, RecordStore, Recorder, StoredEntry, TenantId,
        read::read_stored_page, recorder::fold_into_summary, store::RunSummary, vaulted,
    },
    vault::SecretKey,
};

/// Entries a refresh reads and folds at a time.
const REFRESH_PAGE: usize = 256;

/// What the record says a run has used: model steps and tokens (counted from the model turns
/// the gateway itself recorded, and the tokens it paid for that no turn holds), and the turn
/// of the latest step.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub steps: u32,
    pub tokens: u64,
    pub turns: HashMap<u32, ModelTurn>,
    /// The riskiest tool the run asked for (model routing reads it).
    pub riskiest_called: Option<contextos_crds::common::ToolRisk>,
    /// The recalls of the run's ContextPack memory sources, made once when it started.
    pub recalled: Vec<RecallRecord>,
    /// Whether a call was asked for, decided or answered since the latest model turn (a run
    /// completes only with an answer nothing followed).
    pub acted_since_turn: bool,
    /// The tools each turn was offered, by step (an Agent with `spec.discovery`; the latest
    /// offer of a step counts).
    pub offered: HashMap<u32, std::collections::BTreeSet<String>>,
}

impl Ledger {
    /// The model's latest turn, if nothing was asked of a tool after it: what a run may complete
    /// with.
    pub fn last_answer(&self) -> Option<(u32, &ModelTurn)> {
        if self.acted_since_turn {
            return None;
        }
        let step = *self.turns.keys().max()?;
        let turn = self.turns.get(&step)?;
        turn.tool_calls.is_empty().then_some((step, turn))
    }

    fn fold(&mut self, entry: &RecordEntry) {
        if matches!(
            entry.body,
            EntryBody::ToolCallRequested(_)
                | EntryBody::PolicyDecision(_)
                | EntryBody::ApprovalRequested { .. }
                | EntryBody::ToolResult(_)
                | EntryBody::DeadLettered { .. }
        ) {
            self.acted_since_turn = true;
        }
        if let EntryBody::ToolsOffered { step, selection, .. } = &entry.body {
            self.offered.insert(*step, selection.offered_names());
        }
        if let EntryBody::ToolCallRequested(call) = &entry.body {
            self.riskiest_called = self.riskiest_called.max(Some(call.risk));
        }
        if let EntryBody::MemoryRecalled(recall) = &entry.body
            && recall.source.is_some()
        {
            self.recalled.push(recall.clone());
        }
        // Tokens paid for that no turn holds count as a turn's do: asking twice is never free.
        if let EntryBody::ModelSpend { tokens, .. } = &entry.body {
            self.tokens = self.tokens.saturating_add(*tokens);
        }
        if let EntryBody::ModelTurn {
            step,
            response,
            prompt_tokens,
            completion_tokens,
            ..
        } = &entry.body
        {
            self.steps = self.steps.max(*step);
            self.tokens = self
                .tokens
                .saturating_add(*prompt_tokens)
                .saturating_add(*completion_tokens);
            if let Ok(turn) = serde_json::from_value(response.clone()) {
                self.turns.insert(*step, turn);
            }
            self.acted_since_turn = false;
        }
    }
}

/// One run's record as far as this replica has read it.
#[derive(Debug, Default)]
pub struct RunLog {
    summary: Option<RunSummary>,
    head: Option<(u64, Hash)>,
    pub ledger: Ledger,
    /// Whether the run's gateway has folded in every entry up to `head`.
    gateway_in_step: bool,
    /// Bytes of the entries up to `head` (their canonical encoding).
    bytes: u64,
    /// For a run about a subject: who, and the run's key (read once, from the vault).
    vault: Option<(SubjectHandle, SecretKey)>,
    /// `model_spend` entries for tokens this replica paid a model for that no turn on record
    /// holds, not written yet: they go on record with the run's next model turn here (after
    /// the runner's own entries, so a runner is never told a head that moved under it), and
    /// count against its budget until then. Kept when the log is read again.
    unrecorded: Vec<EntryBody>,
}

impl RunLog {
    /// Forgets that the run's gateway matches the record (after a write that failed half-way):
    /// the next refresh rebuilds it from the whole chain.
    pub fn mark_stale(&mut self) {
        self.gateway_in_step = false;
    }

    /// Whether the run recorded its outcome (completed or failed): it acts no more.
    pub fn finished(&self) -> bool {
        self.summary.as_ref().is_some_and(|s| s.outcome != "running")
    }

    /// The chain's head as last read.
    pub fn head(&self) -> Option<(u64, Hash)> {
        self.head
    }

    /// The head, if what this replica folded in is known to reach it exactly (nothing written
    /// by anyone else since): what the runner is told after a call or model turn.
    pub fn exact_head(&self) -> Option<(u64, Hash)> {
        self.head.filter(|_| self.gateway_in_step)
    }

    /// Bytes of the record up to the head as last read.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads what was appended since the last look and folds it into the summary, the ledger
    /// and `gateway`, [`REFRESH_PAGE`] entries at a time (a replica new to a long run does not
    /// hold all of it at once).
    pub async fn refresh<S: RecordStore>(
        &mut self,
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        gateway: &ToolGateway,
    ) -> Result<(), ReadError> {
        if !self.gateway_in_step {
            self.start_over(gateway, run_id);
        }
        loop {
            let page = match self.read_tail(store, tenant, run_id, REFRESH_PAGE).await? {
                Some(page) => page,
                None => {
                    // The tail does not link to what was read before: read everything again
                    // (from the start, where it links to nothing).
                    self.start_over(gateway, run_id);
                    self.read_tail(store, tenant, run_id, REFRESH_PAGE)
                        .await?
                        .unwrap_or_default()
                }
            };
            let last = page.len() < REFRESH_PAGE;
            // Opened first: the run's gateway remembers results as the run saw them.
            let opened = self.open_all(page, store, tenant, run_id).await?;
            gateway.restore(opened.iter().map(|(_, e, _)| e));
            self.fold(&opened);
            if last {
                break;
            }
        }
        self.gateway_in_step = true;
        Ok(())
    }

    /// Folds in the entries this replica just wrote on top of the refreshed head (its gateway
    /// already remembers their effects, but for which calls started and what they wait on,
    /// which it learns here), as its recorder kept them — no read of the store,
    /// unless one of them went to a blob (a large model turn or result, whose body the ledger
    /// and the byte count need): then they are read back, bodies inlined. If anyone else wrote
    /// in between (`written` is `None`, or the entries do not link up), the gateway is rebuilt
    /// from the whole chain at the next refresh.
    pub async fn after_write<S: RecordStore>(
        &mut self,
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        written: Option<&[StoredEntry]>,
        gateway: &ToolGateway,
    ) -> Result<(), ReadError> {
        let Some(written) = written else {
            self.gateway_in_step = false;
            return Ok(());
        };
        // The run's key, if its entries are about a subject and this log has not read one yet.
        if let Some(first) = written.first()
            && let Ok(entry) = RecordEntry::decode(&first.bytes)
            && let Some(subject) = &entry.vaulted
        {
            self.ensure_key(store, tenant, run_id, subject).await?;
        }
        // Decoded, and checked to extend the head this log read, link by link.
        let mut tail = Vec::with_capacity(written.len());
        let mut prev = self.head.map(|(_, hash)| hash);
        for stored in written {
            let opened = RecordEntry::decode(&stored.bytes)
                .ok()
                .filter(|entry| prev.is_none() || entry.prev == prev)
                .and_then(|mut entry| self.open(&mut entry).is_ok().then_some(entry));
            let Some(entry) = opened else {
                self.gateway_in_step = false;
                return Ok(());
            };
            prev = Some(stored.hash);
            tail.push((stored.hash, entry, stored.bytes.len()));
        }
        if tail
            .iter()
            .any(|(_, e, _)| matches!(e.body, EntryBody::Blob { .. }))
        {
            match self.read_tail(store, tenant, run_id, tail.len()).await? {
                Some(read) if read.len() == tail.len() => {
                    let opened = self.open_all(read, store, tenant, run_id).await?;
                    gateway.note_written(opened.iter().map(|(_, e, _)| e));
                    self.fold(&opened);
                }
                _ => self.gateway_in_step = false,
            }
            return Ok(());
        }
        gateway.note_written(tail.iter().map(|(_, e, _)| e));
        // Their bytes as written are their canonical encoding: no need to encode them again.
        for (hash, entry, bytes) in &tail {
            self.fold_one(*hash, entry, *bytes);
        }
        Ok(())
    }

    /// A recorder continuing the run at the head read last (none before the run started).
    pub fn recorder<'s, S: RecordStore>(
        &self,
        store: &'s S,
        tenant: &TenantId,
        key: KeyPair,
    ) -> Option<Recorder<'s, S>> {
        let summary = self.summary.clone()?;
        let head = self.head?;
        let recorder = Recorder::at(store, tenant.clone(), key, summary, head).keeping_written();
        Some(match &self.vault {
            Some((subject, key)) => recorder.vaulted(subject.clone(), key.clone()),
            None => recorder,
        })
    }

    /// The subject the run is about, and its key, once an entry of the run was read.
    pub fn vault(&self) -> Option<&(SubjectHandle, SecretKey)> {
        self.vault.as_ref()
    }

    /// Opens what `entry` recorded about the run's subject with the key read before.
    fn open(&self, entry: &mut RecordEntry) -> Result<(), String> {
        match (&entry.vaulted, &self.vault) {
            (None, None) => Ok(()),
            (Some(subject), Some((about, key))) if subject == about => {
                vaulted::unlock(&mut entry.body, Some(key)).map_err(|e| e.to_string())
            }
            _ => Err(format!("entry {} is not about the run's subject", entry.seq)),
        }
    }

    fn start_over(&mut self, gateway: &ToolGateway, run_id: &str) {
        let unrecorded = std::mem::take(&mut self.unrecorded);
        *self = Self::default();
        self.unrecorded = unrecorded;
        gateway.forget_run(run_id);
    }

    /// Keeps `model_spend` entries to write with the run's next model turn (see
    /// [`RunLog::take_unrecorded`]).
    pub fn hold_unrecorded(&mut self, entries: impl IntoIterator<Item = EntryBody>) {
        self.unrecorded.extend(entries);
    }

    /// The `model_spend` entries held, to stage; held again if their write fails.
    pub fn take_unrecorded(&mut self) -> Vec<EntryBody> {
        std::mem::take(&mut self.unrecorded)
    }

    /// The tokens the run has used: the ledger's, and what this replica paid for that is not
    /// on record yet.
    pub fn tokens_used(&self) -> u64 {
        self.unrecorded
            .iter()
            .filter_map(|entry| match entry {
                EntryBody::ModelSpend { tokens, .. } => Some(*tokens),
                _ => None,
            })
            .fold(self.ledger.tokens, u64::saturating_add)
    }

    /// The entries after the head read last (at most `limit`), as stored (each with its
    /// size); `None` if they do not link to it.
    async fn read_tail<S: RecordStore>(
        &self,
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        limit: usize,
    ) -> Result<Option<Vec<(Hash, RecordEntry, usize)>>, ReadError> {
        let from = self.head.map_or(0, |(seq, _)| seq + 1);
        let tail = read_stored_page(store, tenant, run_id, from, limit).await?;
        let links = match (self.head, tail.first()) {
            (Some((_, hash)), Some((_, first))) => first.prev == Some(hash),
            _ => true,
        };
        Ok(links.then(|| {
            tail.into_iter()
                .map(|(hash, entry)| {
                    let size = entry.encode().len();
                    (hash, entry, size)
                })
                .collect()
        }))
    }

    /// Opens what entries read back recorded about the run's subject — with the run's key,
    /// asked of the vault the first time (to keep: a run about an erased subject records
    /// nothing more).
    async fn open_all<S: RecordStore>(
        &mut self,
        tail: Vec<(Hash, RecordEntry, usize)>,
        store: &S,
        tenant: &TenantId,
        run_id: &str,
    ) -> Result<Vec<(Hash, RecordEntry, usize)>, ReadError> {
        let mut opened = Vec::with_capacity(tail.len());
        for (hash, mut entry, size) in tail {
            if let Some(subject) = &entry.vaulted {
                self.ensure_key(store, tenant, run_id, subject).await?;
            }
            self.open(&mut entry).map_err(|problem| ReadError::Unreadable {
                run_id: run_id.to_owned(),
                seq: entry.seq,
                problem,
            })?;
            opened.push((hash, entry, size));
        }
        Ok(opened)
    }

    /// Reads the run's key (to keep) from the vault, once.
    async fn ensure_key<S: RecordStore>(
        &mut self,
        store: &S,
        tenant: &TenantId,
        run_id: &str,
        subject: &SubjectHandle,
    ) -> Result<(), ReadError> {
        if self.vault.is_some() {
            return Ok(());
        }
        let vault = |source| ReadError::Vault {
            run_id: run_id.to_owned(),
            source,
        };
        let key = store.key_to_keep(tenant, run_id, subject).await.map_err(vault)?;
        self.vault = Some((subject.clone(), key));
        Ok(())
    }

    /// Folds in entries read back and opened (blob bodies inlined; their size as stored).
    fn fold(&mut self, tail: &[(Hash, RecordEntry, usize)]) {
        for (hash, entry, size) in tail {
            self.fold_one(*hash, entry, *size);
        }
    }

    fn fold_one(&mut self, hash: Hash, entry: &RecordEntry, bytes: usize) {
        fold_into_summary(&mut self.summary, hash, entry);
        self.ledger.fold(entry);
        self.head = Some((entry.seq, hash));
        self.bytes = self.bytes.saturating_add(bytes as u64);
    }
}
