//! The run API (`/v1/run/…`): what a runner pod may do for its own run — append the entries
//! only it can know, read its own chain, checkpoint and blobs, make tool calls and ask its model.

use std::sync::Arc;

use crate::quota::book::QuotaRefusal;
use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use tracing::Instrument as _;

use super::*;
use crate::{
    gateway::remote::RunnerTail,
    records::{
        RecordError,
        entry::UnansweredSpend,
        recorder::Flush,
        store::remote::{HEAD_HEADER, head_header_value},
    },
};

/// What names a blob the service reads for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NamedBy {
    /// What the runner sends now: only a blob its own run uploaded.
    Runner,
    /// An entry already on the run's record, checked when it was written (a run that began
    /// under a gateway that kept no upload marks resumes).
    Record,
}

/// An entry body of a run about a subject as a runner may send it: every field that says what
/// the run learned encrypted under the run's `key`, and what stays readable only codes, names
/// and digests.
fn about_subject(body: &EntryBody, key: &crate::vault::SecretKey) -> Result<(), String> {
    crate::records::vaulted::check_locked(body, key).map_err(|e| e.to_string())?;
    crate::records::vaulted::check_readable_fields(body)
}

/// The entry bodies a runner writes itself (the rest are the gateway's).
const RUNNER_WRITES: [&str; 6] = [
    "context_compiled",
    "tools_offered",
    "critic_verdict",
    "checkpoint",
    "completed",
    "failed",
];

/// Why a call of a run about a subject carries identifiers the runner could have spelled a
/// person's data into: they are recorded readable, and stay so after the person is erased. A
/// runner makes a call id from the step and the call's place in it, and an idempotency key
/// from a hash of the call; nothing else is taken.
fn subject_run_identifiers(call_id: &str, idempotency_key: &str) -> Option<String> {
    let digits = |text: &str, most: usize| {
        !text.is_empty() && text.len() <= most && text.bytes().all(|b| b.is_ascii_digit())
    };
    let call_id_ok = call_id
        .split_once('.')
        .is_some_and(|(step, index)| digits(step, 9) && digits(index, 4));
    if !call_id_ok {
        return Some(format!(
            "call_id {:?}: in a run about a subject a call id is <step>.<index> (digits)",
            call_id.chars().take(32).collect::<String>()
        ));
    }
    let key_ok = idempotency_key
        .strip_prefix("ctxos-")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    if !key_ok {
        return Some(
            "idempotency_key: in a run about a subject an idempotency key is ctxos- and 32 lowercase hex digits (a hash of the call)".into(),
        );
    }
    None
}

/// Why a blob for a run about a subject was refused.
const SUBJECT_BLOB: &str = "a run about a subject uploads only its bundle as stored (its personal parts encrypted) or entry bodies with every personal field encrypted";

/// The most bytes of an envelope's identifiers (call id, idempotency key, traceparent).
const MAX_ENVELOPE_FIELD: usize = 256;
/// Why a runner's `run_started` was refused.
const RUN_STARTED_FIRST: &str = "run_started must be the first entry and carry the caller's RunContext, its session, agent, pins and bundle";
/// How far a runner's `run_started` time may be from the gateway's clock.
const START_SKEW_MS: u64 = 60 * 60 * 1000;
/// The most bytes a run's closing entry may take once the run is over its quota.
const ENDING_BYTES: u64 = 16 * 1024;
/// The most entries one batch of a runner's own may hold (a runner sends what it recorded
/// since its last request: a few).
const MAX_BATCH_ENTRIES: usize = 4096;
/// The most bytes a batch's references to blobs may bring in: each blob is read and its body
/// checked before the batch is written, and held until then against the namespace's share of
/// what a replica holds in flight — beside the request that names them, one largest body.
const MAX_BATCH_INLINED: u64 = super::MAX_REQUEST_BYTES as u64;

/// What a batch's references to `blobs` add to its run's record as every reader reads it (each
/// blob in its place, once per reference): counted before they are written, as the run's
/// bytes count them once they are.
fn inlined(blobs: &[(Hash, u64)]) -> u64 {
    blobs.iter().fold(0, |sum, (_, size)| sum.saturating_add(*size))
}

/// A runner's own entries as it sent them, checked (see [`GatewayService::runner_entries`]).
struct RunnerBatch {
    entries: Vec<(StoredEntry, RecordEntry)>,
    /// Each entry's body (a body stored as a blob, read).
    bodies: Vec<EntryBody>,
    /// The blobs the entries refer to, in order, each with its size.
    blobs: Vec<(Hash, u64)>,
    /// Their bytes, counted against the namespace's share of what the replica holds in flight
    /// for as long as the batch is.
    held: Option<crate::gateway::shares::Share>,
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn append(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: AppendRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let RunnerBatch {
            entries,
            bodies,
            blobs,
            held: _held,
        } = service.runner_entries(&caller, &request.entries).await?;
        let expected = match &request.expected_head {
            None => None,
            Some(text) => Some(Hash::parse(text).ok_or_else(|| bad("expected_head is not a hash"))?),
        };
        let slot = service.slot(&caller, &request.entries).await?;
        let mut log = crate::gateway::fair::away(slot.log.lock()).await;
        log.refresh(&service.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
            .map_err(unavailable)?;
        if log.head().map(|(_, h)| h) != expected {
            return Err(head_moved(caller.run_id()));
        }
        check_entry_steps(&log.ledger, &bodies)?;
        // A run's end is written once, last; a completion only with the model's answer passing
        // every validator — as the record has it up to the head the runner names (a turn
        // answered before it was durable is on record by now).
        service.check_ending(&caller, &slot, &log, &entries).await?;
        let incoming = entries
            .iter()
            .map(|(e, _)| e.bytes.len() as u64)
            .sum::<u64>()
            .saturating_add(inlined(&blobs));
        let used = log.bytes().saturating_add(service.blobs_of(&caller));
        // A run over its quota may still say how it ended (a small Failed entry, so its record
        // does not stay "running" for ever).
        let ending = incoming <= ENDING_BYTES
            && entries
                .iter()
                .all(|(_, e)| matches!(e.body, EntryBody::Failed { .. } | EntryBody::Completed { .. }));
        if !ending && used.saturating_add(incoming) > service.max_run_bytes {
            return Err(over_quota(caller.run_id(), used, incoming, service.max_run_bytes));
        }
        if !ending {
            service.tenant_room(&caller.tenant, incoming).await?;
        }
        let key = service.keys.for_tenant(caller.tenant.as_str());
        let mut recorder = match log.recorder(&service.store, &caller.tenant, key.clone()) {
            Some(recorder) => recorder,
            None => {
                let (_, first) = entries.first().ok_or_else(|| bad("the batch is empty"))?;
                Recorder::for_new_run(&service.store, caller.tenant.clone(), key, first)
                    .map_err(|e| bad(e.to_string()))?
                    .keeping_written()
            }
        };
        recorder.count_stored_bytes(log.bytes());
        let head = match recorder.append_chained(entries).await {
            Ok(head) => head,
            Err(crate::records::RecordError::Store(crate::records::StoreError::HeadMoved { .. })) => {
                return Err(head_moved(caller.run_id()));
            }
            Err(crate::records::RecordError::Store(e @ crate::records::StoreError::BadBatch { .. })) => {
                return Err(bad(e.to_string()));
            }
            Err(e) => return Err(unavailable(e)),
        };
        service
            .settle(&caller, &slot.gateway, &mut log, recorder.written())
            .await?;
        if log.finished() {
            // An ended run is served nothing more: its built gateway need not be kept.
            service.forget_slot(&caller);
        }
        Ok(Json(head).into_response())
    }

    /// A runner's own entries as it sent them, each with its decoded form, checked: decodable,
    /// of its own run, in canonical form, of kinds only a runner writes (see
    /// [`Self::check_runner_body`]), and referring to blobs of at most [`MAX_BATCH_INLINED`]
    /// bytes in all — counted from the sizes their uploads recorded, before any is read.
    async fn runner_entries(&self, caller: &Caller, wire: &[WireEntry]) -> Result<RunnerBatch, Refusal> {
        if wire.len() > MAX_BATCH_ENTRIES {
            return Err(bad(format!(
                "the batch holds {} entries; send at most {MAX_BATCH_ENTRIES} at once",
                wire.len()
            )));
        }
        let mut entries = Vec::with_capacity(wire.len());
        let mut started = false;
        // A run about a subject: what its runner records about them must be encrypted under
        // the run's key, and every entry marked as about them (erasure must reach all of it).
        let subject = caller.context.context.subject.as_ref();
        let key = match subject {
            Some(_) if !wire.is_empty() => Some(self.subject_run_key(caller).await?),
            _ => None,
        };
        for wire in wire {
            let stored = wire.decode().map_err(bad)?;
            let entry = RecordEntry::decode(&stored.bytes)
                .map_err(|err| bad(format!("entry {}: {err}", stored.seq)))?;
            self.own_run(caller, &entry.run_id).await?;
            // Only the canonical encoding: the bytes hashed are the bytes every verifier decodes.
            if entry.encode() != stored.bytes {
                return Err(bad(format!("entry {} is not in canonical form", entry.seq)));
            }
            if entry.vaulted.as_ref() != subject {
                return Err(forbidden(format!(
                    "entry {} must be marked as about {} (the run's RunContext says so)",
                    entry.seq,
                    subject.map_or_else(|| "no one".to_owned(), ToString::to_string)
                )));
            }
            // One start, first: checked before any bundle it names is read.
            if matches!(entry.body, EntryBody::RunStarted { .. }) {
                if entry.seq != 0 || started {
                    return Err(forbidden(RUN_STARTED_FIRST));
                }
                started = true;
            }
            entries.push((stored, entry));
        }
        let (blobs, held) = self.blobs_referred(caller, &entries).await?;
        let mut bodies = Vec::with_capacity(entries.len());
        for (_, entry) in &entries {
            bodies.push(self.check_runner_body(caller, entry, key.as_ref()).await?);
        }
        Ok(RunnerBatch {
            entries,
            bodies,
            blobs,
            held,
        })
    }

    /// The blobs `entries` refer to, each with its size as its upload recorded it (a blob
    /// uploaded before uploads recorded sizes is read once to learn it), and their bytes held
    /// against the namespace's share of the replica; refused when the run did not upload one,
    /// when together they come to more than [`MAX_BATCH_INLINED`] (a blob referred to twice
    /// counts twice: every reader reads it twice), or when the share has no room for them now.
    async fn blobs_referred(
        &self,
        caller: &Caller,
        entries: &[(StoredEntry, RecordEntry)],
    ) -> Result<(Vec<(Hash, u64)>, Option<crate::gateway::shares::Share>), Refusal> {
        let mut sizes: HashMap<Hash, u64> = HashMap::new();
        let mut blobs = Vec::new();
        let mut inlined = 0u64;
        for (_, entry) in entries {
            let EntryBody::Blob { blob, .. } = &entry.body else {
                continue;
            };
            let size = match sizes.get(blob) {
                Some(size) => *size,
                None => {
                    let not_uploaded = || {
                        bad(format!(
                            "entry {} refers to blob {blob}, which this run did not upload; upload it first",
                            entry.seq
                        ))
                    };
                    let size = match self.uploaded_size(caller, blob).await? {
                        None => return Err(not_uploaded()),
                        Some(0) => self
                            .store
                            .get_blob(&caller.tenant, blob)
                            .await
                            .map_err(unavailable)?
                            .ok_or_else(not_uploaded)?
                            .len() as u64,
                        Some(size) => size,
                    };
                    sizes.insert(*blob, size);
                    size
                }
            };
            inlined = inlined.saturating_add(size);
            if inlined > MAX_BATCH_INLINED {
                return Err(bad(format!(
                    "the batch's entries refer to more than {MAX_BATCH_INLINED} bytes of blobs (entry {} passes it); send them in smaller batches",
                    entry.seq
                )));
            }
            blobs.push((*blob, size));
        }
        if inlined == 0 {
            return Ok((blobs, None));
        }
        let bytes = usize::try_from(inlined).unwrap_or(usize::MAX);
        let held = self
            .bodies
            .take(caller.tenant.as_str(), crate::gateway::shares::kib(bytes))
            .map_err(|_| {
                unavailable(format!(
                    "the blobs this batch refers to ({:.1} MiB, read before it is written) do not fit beside what namespace {} holds in flight at this gateway replica now; try again",
                    inlined as f64 / f64::from(1 << 20),
                    caller.tenant
                ))
            })?;
        Ok((blobs, Some(held)))
    }

    /// Takes in what a call or model request says of the runner's record ([`RunnerTail`]): the
    /// head it was told must be on record, and its own entries, chained on that head, are staged
    /// ahead of what the request records. A runner one answer behind (the answer was lost on
    /// the way) re-sends entries that are already written: they are not written twice.
    async fn take_tail(
        &self,
        caller: &Caller,
        log: &RunLog,
        recorder: &mut Recorder<'_, S>,
        tail: &RunnerTail,
    ) -> Result<Vec<EntryBody>, Refusal> {
        let told = tail
            .told_head()
            .ok_or_else(|| bad("tail.head must be <seq>.<hash> of the newest entry the runner knows"))?;
        let RunnerBatch {
            entries,
            bodies,
            blobs,
            held: _held,
        } = self.runner_entries(caller, &tail.entries).await?;
        // A run ends with its own append: nothing may be decided after an end in the same batch.
        let ends = |e: &RecordEntry| match &e.body {
            EntryBody::Blob { body_type, .. } => body_type == "completed" || body_type == "failed",
            body => matches!(body, EntryBody::Completed { .. } | EntryBody::Failed { .. }),
        };
        if entries.iter().any(|(_, e)| ends(e)) {
            return Err(bad(
                "a run's outcome (completed, failed) is written with /v1/run/append, not sent with a call or model request",
            ));
        }
        if log.head() == Some(told) {
            if entries.is_empty() {
                return Ok(bodies);
            }
            let incoming = entries
                .iter()
                .map(|(e, _)| e.bytes.len() as u64)
                .sum::<u64>()
                .saturating_add(inlined(&blobs));
            let used = log.bytes().saturating_add(self.blobs_of(caller));
            if used.saturating_add(incoming) > self.max_run_bytes {
                return Err(over_quota(caller.run_id(), used, incoming, self.max_run_bytes));
            }
            self.tenant_room(&caller.tenant, incoming).await?;
            recorder.count_stored_bytes(log.bytes());
            check_entry_steps(&log.ledger, &bodies)?;
            recorder.stage_chained(entries).map_err(|e| bad(e.to_string()))?;
            return Ok(bodies);
        }
        // Behind the head: fine if what the runner was told is on record, and so is what it sends.
        // The entry it was told and as many after it as it sends, not the run from there on.
        let on_record = self
            .store
            .read_chain_page(
                &caller.tenant,
                caller.run_id(),
                told.0,
                entries.len().saturating_add(1),
            )
            .await
            .map_err(unavailable)?;
        if on_record.first().map(|e| e.hash) != Some(told.1) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                crate::gateway::remote::HEAD_UNRECORDED,
                format!(
                    "run {}: entry {} that this runner was told is written is not on record (a gateway replica failed before it was durable); this attempt must end and resume from the record",
                    caller.run_id(),
                    told.0
                ),
            ));
        }
        let written = entries
            .iter()
            .zip(on_record.iter().skip(1))
            .all(|((sent, _), stored)| sent.hash == stored.hash)
            && on_record.len() > entries.len();
        if !entries.is_empty() && !written {
            return Err(head_moved(caller.run_id()));
        }
        // Already on record, and so in the ledger: what the request goes by is what the record
        // holds now, not what this runner once sent.
        Ok(Vec::new())
    }

    /// Which entries a runner may write: only what the runner alone can know. A run's start must
    /// carry exactly the RunContext the caller presented and the bundle that context pins.
    /// Answers the body checked (a body stored as a blob, read).
    pub(super) async fn check_runner_body(
        &self,
        caller: &Caller,
        entry: &RecordEntry,
        key: Option<&crate::vault::SecretKey>,
    ) -> Result<EntryBody, Refusal> {
        let body = match &entry.body {
            EntryBody::Blob { blob, body_type, .. } => {
                let bytes = self
                    .uploaded(caller, blob, NamedBy::Runner, || {
                        format!("entry {} refers to blob {blob}", entry.seq)
                    })
                    .await?;
                let body: EntryBody = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("blob {blob} is not an entry body: {e}")))?;
                // Only the canonical encoding: nothing rides along that a reader would not see.
                if body.encode() != bytes {
                    return Err(bad(format!("blob {blob} is not an entry body in canonical form")));
                }
                if body.type_name() != body_type {
                    return Err(bad(format!(
                        "blob {blob} holds a {}, not a {body_type}",
                        body.type_name()
                    )));
                }
                body
            }
            other => other.clone(),
        };
        if let Some(key) = key {
            about_subject(&body, key).map_err(|e| forbidden(format!("entry {}: {e}", entry.seq)))?;
        }
        // A run's start time orders it among the tenant's runs (listing by time, and the sum a
        // tenant's store bound reads): it is now, give or take clocks, not any time a runner
        // chooses.
        if matches!(body, EntryBody::RunStarted { .. }) {
            let now = crate::records::recorder::now_ms();
            if entry.at_ms.abs_diff(now) > START_SKEW_MS {
                return Err(bad(format!(
                    "entry {}: run_started says {} ms since the epoch, more than an hour from the gateway's clock ({now}): a run starts when it is recorded",
                    entry.seq, entry.at_ms
                )));
            }
        }
        self.check_runner_kind(caller, entry.seq, &body, key).await?;
        Ok(body)
    }

    /// Whether a runner may write `body` (entry `seq` of its run, about a subject if `key` is
    /// theirs), and whether what it says holds.
    async fn check_runner_kind(
        &self,
        caller: &Caller,
        seq: u64,
        body: &EntryBody,
        key: Option<&crate::vault::SecretKey>,
    ) -> Result<(), Refusal> {
        match body {
            EntryBody::RunStarted {
                session_id,
                agent,
                run_context,
                pinned,
                bundle,
            } => {
                let context = &caller.context.context;
                // Exactly the context presented, as JSON: nothing rides along in it.
                let presented = serde_json::to_value(&caller.context).ok();
                let pinned_bundle = context.bundle_digest.as_deref().and_then(Hash::parse);
                // A run about a subject stores its bundle with their part encrypted: it must
                // open to the bundle pinned.
                let bundle_pinned = match (bundle, key) {
                    (Some(stored), Some(key)) => {
                        self.stored_bundle(caller, stored, NamedBy::Runner, key)
                            .await?
                            .content_digest()
                            == pinned_bundle.unwrap_or(Hash([0; 32]))
                    }
                    (stored, _) => stored.is_some() && *stored == pinned_bundle,
                };
                let matches = seq == 0
                    && presented.as_ref() == Some(run_context)
                    && *session_id == context.session_id
                    && *agent == context.agent.name
                    && *pinned == context.pinned
                    && bundle_pinned;
                if !matches {
                    return Err(forbidden(RUN_STARTED_FIRST));
                }
                Ok(())
            }
            EntryBody::ContextCompiled { .. }
            | EntryBody::CriticVerdict { .. }
            | EntryBody::Checkpoint { .. }
            | EntryBody::Completed { .. }
            | EntryBody::Failed { .. } => Ok(()),
            // What the model was shown: only the Agent's tools, the policies' own denials, and
            // scores by BM25 or by the embeddings this service serves (runner pods hold no
            // embedding model of their own).
            EntryBody::ToolsOffered {
                scoring, selection, ..
            } => {
                let refuse = |e: String| forbidden(format!("entry {}: {e}", seq));
                let slot = self.slot(caller, &[]).await?;
                let discovers_by_embeddings = crate::discovery::by_embeddings(&slot.bundle.agent_spec);
                if matches!(scoring, crate::discovery::Scoring::Embeddings { .. }) && !discovers_by_embeddings
                {
                    return Err(refuse(
                        "tools scored by embeddings for a run whose Agent does not discover by them (spec.discovery.resolver)".into(),
                    ));
                }
                if let crate::discovery::Scoring::Embeddings { model } = scoring
                    && self.embeddings.as_ref().is_none_or(|desk| desk.model() != model)
                {
                    return Err(refuse(match &self.embeddings {
                        Some(desk) => format!(
                            "tools scored by embeddings of {model}: this gateway serves {}, and a runner pod holds no model of its own",
                            desk.model()
                        ),
                        None => "a runner pod scores tools by BM25 only here: this gateway serves no embeddings and the pod holds no model".into(),
                                        }));
                }
                let catalog = slot
                    .bundle
                    .agent_spec
                    .tools
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect();
                let denied = slot.gateway.denied_outright(caller.context.context.safety_mode);
                selection.check(&catalog, &denied).map_err(refuse)?;
                match &slot.bundle.agent_spec.discovery {
                    Some(discovery) => {
                        let always = discovery.always_offer.iter().map(String::as_str).collect();
                        selection
                            .check_shape(&catalog, &denied, &always, discovery.top_k)
                            .map_err(refuse)
                    }
                    None => Ok(()),
                }
            }
            other => Err(forbidden(format!(
                "a runner may not write {} entries: decisions, results, approvals and model turns are written by the gateway",
                other.type_name()
            ))),
        }
    }

    /// A blob a runner uploads for a run about a subject must be one the run has a use for,
    /// with what it says about them encrypted: its bundle as stored (opening to the bundle its
    /// RunContext pins), or an entry body (canonical, every field encrypted). Anything else
    /// could hold their data in the clear.
    async fn check_subject_blob(&self, caller: &Caller, bytes: &[u8]) -> Result<(), Refusal> {
        if caller.context.context.subject.is_none() {
            return Ok(());
        }
        let key = self.subject_run_key(caller).await?;
        if let Ok(body) = serde_json::from_slice::<EntryBody>(bytes) {
            if body.encode() != bytes {
                return Err(bad("the blob is an entry body not in canonical form"));
            }
            // Only bodies a runner may write: the others hold fields that stay readable.
            if !RUNNER_WRITES.contains(&body.type_name()) {
                return Err(forbidden(format!(
                    "a runner uploads no {} body: {SUBJECT_BLOB}",
                    body.type_name()
                )));
            }
            return about_subject(&body, &key).map_err(|e| forbidden(format!("the blob: {e}")));
        }
        let pinned = caller
            .context
            .context
            .bundle_digest
            .as_deref()
            .and_then(Hash::parse);
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| forbidden(SUBJECT_BLOB))?;
        if crate::records::canonical::to_canonical_bytes(&value) != bytes {
            return Err(forbidden(SUBJECT_BLOB));
        }
        let bundle = RunBundle::from_stored(bytes, Some(&key))
            .map_err(|e| forbidden(format!("{SUBJECT_BLOB} ({e})")))?;
        if Some(bundle.content_digest()) != pinned {
            return Err(forbidden(format!(
                "{SUBJECT_BLOB} (a bundle, but not the one the RunContext pins)"
            )));
        }
        Ok(())
    }

    /// The key the caller's run, about the subject its RunContext names, keeps what it learns
    /// of them under (refused once they are erased).
    pub(super) async fn subject_run_key(&self, caller: &Caller) -> Result<crate::vault::SecretKey, Refusal> {
        let subject = caller
            .context
            .context
            .subject
            .as_ref()
            .ok_or_else(|| forbidden("the run is about no one: it has no key"))?;
        self.store
            .key_to_keep(&caller.tenant, caller.run_id(), subject)
            .await
            .map_err(super::consent_api::vault_refusal)
    }

    /// The blob `hash` the caller's run uploaded (or, `named_by` its record, any blob of its
    /// tenant); `what` names what refers to it, for the refusal. A blob another run uploaded is
    /// refused as one never uploaded, before the store is asked for it: a hash learned elsewhere
    /// neither reads the blob nor tells whether it exists.
    pub(super) async fn uploaded(
        &self,
        caller: &Caller,
        hash: &Hash,
        named_by: NamedBy,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<u8>, Refusal> {
        let refused = move || {
            bad(format!(
                "{}, which this run did not upload; upload it first",
                what()
            ))
        };
        if named_by == NamedBy::Runner && !self.run_uploaded(caller, hash).await? {
            return Err(refused());
        }
        self.store
            .get_blob(&caller.tenant, hash)
            .await
            .map_err(unavailable)?
            .ok_or_else(refused)
    }

    /// Whether the caller's run uploaded blob `hash` (see [`crate::memory::keys::run_blob`]).
    async fn run_uploaded(&self, caller: &Caller, hash: &Hash) -> Result<bool, Refusal> {
        Ok(self.uploaded_size(caller, hash).await?.is_some())
    }

    /// The size of blob `hash` as the caller's run uploaded it (0: uploaded before uploads
    /// recorded sizes), or `None` if it did not.
    async fn uploaded_size(&self, caller: &Caller, hash: &Hash) -> Result<Option<u64>, Refusal> {
        let mark = crate::memory::keys::run_blob(&caller.tenant, caller.run_id(), hash);
        let values = self
            .store
            .memory_get(&caller.tenant, vec![mark])
            .await
            .map_err(unavailable)?;
        Ok(values
            .into_iter()
            .next()
            .flatten()
            .map(|mark| crate::memory::keys::run_blob_size(&mark)))
    }

    /// The bundle a run about a subject stored (blob `stored`), opened with the run's `key`.
    pub(super) async fn stored_bundle(
        &self,
        caller: &Caller,
        stored: &Hash,
        named_by: NamedBy,
        key: &crate::vault::SecretKey,
    ) -> Result<RunBundle, Refusal> {
        let bytes = self
            .uploaded(caller, stored, named_by, || format!("the run's bundle {stored}"))
            .await?;
        RunBundle::from_stored(&bytes, Some(key)).map_err(|e| bad(format!("the run's bundle {stored}: {e}")))
    }

    pub(super) async fn head(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        service.own_run(&caller, &q.run).await?;
        let head = service
            .store
            .head(&caller.tenant, &q.run)
            .await
            .map_err(unavailable)?;
        Ok(Json(head).into_response())
    }

    pub(super) async fn chain(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        service.own_run(&caller, &q.run).await?;
        let chain = service
            .store
            .read_chain_page(&caller.tenant, &q.run, q.from, q.page())
            .await
            .map_err(unavailable)?;
        let wire: Vec<WireEntry> = chain.iter().map(WireEntry::of).collect();
        Ok(Json(wire).into_response())
    }

    /// The session's latest checkpoint, if it belongs to the caller's run (an earlier Session of
    /// the same name is another run, and not the caller's to see).
    pub(super) async fn checkpoint(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SessionQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        if q.session != caller.context.context.session_id {
            return Err(forbidden("a runner reads only its own Session's checkpoint"));
        }
        let checkpoint = service
            .store
            .latest_checkpoint(&caller.tenant, &q.session)
            .await
            .map_err(unavailable)?
            .filter(|c| c.run_id == caller.run_id());
        Ok(Json(checkpoint).into_response())
    }

    pub(super) async fn put_blob(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        service.check_subject_blob(&caller, &body).await?;
        // Once the run started, a blob counts with its record against the run's quota, and a
        // run that ended stores nothing more. (Before, the runner uploads its bundle.)
        let started = service
            .store
            .head(&caller.tenant, caller.run_id())
            .await
            .map_err(unavailable)?
            .is_some();
        let recorded = if started {
            let slot = service.slot(&caller, &[]).await?;
            let mut log = crate::gateway::fair::away(slot.log.lock()).await;
            log.refresh(&service.store, &caller.tenant, caller.run_id(), &slot.gateway)
                .await
                .map_err(unavailable)?;
            if log.finished() {
                return Err(forbidden(format!(
                    "run {} has ended: it stores no more blobs",
                    caller.run_id()
                )));
            }
            log.bytes()
        } else {
            0
        };
        service.tenant_room(&caller.tenant, body.len() as u64).await?;
        service.charge_blob(&caller, recorded, body.len() as u64)?;
        // The run's mark first: the blob's own write makes it durable with it (and a store
        // whose every write is durable has it already), so no blob answered as stored lacks it.
        let mark = crate::memory::keys::run_blob(&caller.tenant, caller.run_id(), &Hash::of(&body));
        service
            .store
            .memory_write_unflushed(
                &caller.tenant,
                vec![crate::memory::backend::Write {
                    guard: crate::memory::backend::Guard::All(Vec::new()),
                    changes: vec![crate::memory::backend::Change::Put(
                        mark,
                        crate::memory::keys::run_blob_mark(body.len() as u64),
                    )],
                }],
            )
            .await
            .map_err(unavailable)?;
        let hash = service
            .store
            .put_blob(&caller.tenant, body.to_vec())
            .await
            .map_err(unavailable)?;
        Ok(Json(hash.to_hex()).into_response())
    }

    pub(super) async fn get_blob(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(hash): Path<String>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let hash = Hash::parse(&hash).ok_or_else(|| bad("not a blob hash"))?;
        // Only the run's own blobs: its pinned bundle and what its chain refers to. Blobs are
        // content-addressed per tenant, so any other hash would let a runner probe other runs.
        let pinned = caller
            .context
            .context
            .bundle_digest
            .as_deref()
            .and_then(Hash::parse);
        let own = pinned == Some(hash) || service.chain_refers_to(&caller, &hash).await?;
        if !own {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("run {} has no blob {hash}", caller.run_id()),
            ));
        }
        match service
            .store
            .get_blob(&caller.tenant, &hash)
            .await
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(bytes.into_response()),
            None => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob {hash}"),
            )),
        }
    }

    /// Whether the caller's own chain refers to blob `hash`: each entry is read once per replica
    /// (the run's [`super::BlobsReferred`]), however often the runner asks.
    async fn chain_refers_to(&self, caller: &Caller, hash: &Hash) -> Result<bool, Refusal> {
        let slot = self.slot(caller, &[]).await?;
        let mut referred = crate::gateway::fair::away(slot.blobs.lock()).await;
        if referred.hashes.contains(hash) {
            return Ok(true);
        }
        // A page at a time: the run's entries are not all held at once.
        loop {
            let page = self
                .store
                .read_chain_page(&caller.tenant, caller.run_id(), referred.next, CHAIN_PAGE)
                .await
                .map_err(unavailable)?;
            let Some(last) = page.last().map(|stored| stored.seq) else {
                break;
            };
            for stored in &page {
                if let Ok(entry) = RecordEntry::decode(&stored.bytes)
                    && let EntryBody::Blob { blob, .. } = entry.body
                    && referred.hashes.len() < super::MAX_BLOBS_REFERRED
                {
                    referred.hashes.insert(blob);
                }
            }
            referred.next = last + 1;
            if referred.hashes.contains(hash) || page.len() < CHAIN_PAGE {
                break;
            }
        }
        Ok(referred.hashes.contains(hash))
    }

    pub(super) async fn call(
        State(service): State<Arc<Self>>,
        held: Option<axum::Extension<TenantSlot>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        Self::handle_call(service, held, headers, body)
            .instrument(tracing::debug_span!("gateway.call"))
            .await
    }

    async fn handle_call(
        service: Arc<Self>,
        held: Option<axum::Extension<TenantSlot>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let mut request: CallRequest = {
            let _phase = tracing::debug_span!("gateway.parse_call").entered();
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?
        };
        // The runner makes these, and they go into the record even when the call is refused:
        // short. (The tool's name is the model's; what it costs counts against the quota.)
        for (field, value) in [
            ("call_id", &request.envelope.call_id),
            ("idempotency_key", &request.envelope.idempotency_key),
            ("traceparent", &request.envelope.traceparent),
            ("tool", &request.envelope.tool),
        ] {
            if value.len() > MAX_ENVELOPE_FIELD {
                return Err(bad(format!(
                    "{field} has {} bytes; at most {MAX_ENVELOPE_FIELD}",
                    value.len()
                )));
            }
            // Sent on to tools as HTTP headers: a control character would fail the request
            // before it left, and that would read as a tool that may have acted.
            if field != "tool" && !value.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "{field} holds a character other than printable ASCII (no spaces or control characters)"
                )));
            }
        }
        if caller.context.context.subject.is_some()
            && let Some(problem) =
                subject_run_identifiers(&request.envelope.call_id, &request.envelope.idempotency_key)
        {
            return Err(bad(problem));
        }
        let slot = service
            .slot(&caller, &request.tail.entries)
            .instrument(tracing::debug_span!("gateway.slot"))
            .await?;
        // The call runs under the caller's verified context, whatever the envelope says.
        request.envelope.run_context = caller.context.clone();
        let (approval, resolution) = service
            .decisions_on_record(
                &caller,
                request.envelope.approval.take(),
                request.envelope.resolution.take(),
            )
            .instrument(tracing::debug_span!("gateway.decisions_on_record"))
            .await?;
        request.envelope.approval = approval;
        request.envelope.resolution = resolution;
        // Once decided, a call is carried through and recorded even if the runner goes away
        // mid-call (a killed pod closes its connection): its next attempt then finds the result
        // in the record instead of an effect nobody wrote down.
        let (answer, answered) = tokio::sync::oneshot::channel();
        // The task outlives the answer (the result is written after it): its span follows from
        // the request's instead of being its child, which would hold the request's span open.
        let carried = tracing::debug_span!(parent: None, "gateway.carry_out");
        carried.follows_from(tracing::Span::current());
        let task = tokio::spawn(
            async move {
                TenantSlot::carry(held, service.decide_and_execute(&caller, &slot, request, answer)).await;
            }
            .instrument(carried),
        );
        answered_by(answered, task)
            .instrument(tracing::debug_span!("gateway.until_answered"))
            .await
    }

    /// Decides and carries out one call holding the run's log, and answers on `answer` — for a
    /// call that acted or was denied, as soon as its entries are chained and sealed, while they
    /// are written (the runner's next request proves they were, see [`RunnerTail`]); for
    /// anything that ends the runner's attempt (an approval to wait for, an outcome nobody
    /// knows), only once they are durable.
    pub(super) async fn decide_and_execute(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &RunSlot,
        request: CallRequest,
        answer: tokio::sync::oneshot::Sender<Reply>,
    ) {
        let request_call_id = request.envelope.call_id.clone();
        // Another request of the run may hold the log while it waits for its tool: this one
        // waits out of its turn (holding turns while waiting on each other could take them all).
        let mut log = crate::gateway::fair::away(slot.log.lock())
            .instrument(tracing::debug_span!("gateway.log_lock"))
            .await;
        let mut recorder = match self
            .continue_run(
                caller,
                slot,
                &mut log,
                "it makes no more calls",
                request.tail.told_head(),
            )
            .instrument(tracing::debug_span!("gateway.continue_run"))
            .await
        {
            Ok(recorder) => recorder,
            Err(refusal) => {
                let _ = answer.send(Err(refusal));
                return;
            }
        };
        if let Err(refusal) = self
            .take_tail(caller, &log, &mut recorder, &request.tail)
            .instrument(tracing::debug_span!("gateway.take_tail"))
            .await
        {
            let _ = answer.send(Err(refusal));
            return;
        }
        let calls_before = slot.gateway.calls_made(caller.run_id());
        // A call new to the record holds its share of the run's quotas before anything is
        // decided; one already on record (asked again) was counted when it was made.
        // Keyed as the gateway knows a call again — by its idempotency key — and bounded.
        let quota_key = {
            use sha2::Digest as _;
            let key = sha2::Sha256::digest(request.envelope.idempotency_key.as_bytes());
            format!("{}/call/{}", caller.run_id(), hex::encode(&key[..16]))
        };
        let owner = super::quotas::request_owner();
        let mut held = None;
        let mut quota_refusal = None;
        // A call on record already (resent, or carrying a person's answer) was counted when it
        // was made: neither the run's call budget nor a quota holds it again.
        let known = slot.gateway.knows_call(&request.envelope.idempotency_key);
        if !known && calls_before < caller.context.context.budget.max_tool_calls {
            let quotas = match self.run_quotas(caller, slot).await {
                Ok(quotas) => quotas,
                Err(refusal) => {
                    let _ = answer.send(Err(refusal));
                    return;
                }
            };
            let price = slot.bundle.tool_prices.get(&request.envelope.tool);
            let demand = crate::quota::book::Demand {
                call: &quota_key,
                owner: &owner,
                amounts: call_cost(price),
                currency: price.map(|p| p.currency.as_str()),
                model_turn: false,
            };
            // Made durable by the call's go-ahead, which is written before the tool acts (for an
            // unpriced read asked while its go-ahead is flushed: before it is answered; a crash
            // in between takes back both, and the read, asked again, is counted once).
            let durability = crate::quota::book::Durability::WithNextRecord;
            match self
                .hold_in_quotas(&caller.tenant, &quotas, &demand, durability)
                .await
            {
                Ok(()) => held = Some(quotas),
                Err(refused @ (QuotaRefusal::Full { wait: false, .. } | QuotaRefusal::Unpriced { .. })) => {
                    quota_refusal = Some(refused)
                }
                // Held back (the quota waits for its window) or the ledger is away: nothing is
                // recorded, and the runner asks again.
                Err(refused) => {
                    let _ = answer.send(Err(super::quotas::refusal(refused)));
                    return;
                }
            }
        }
        // A SpendQuota that refuses a call ends the run on record (after the refusal).
        let quota_end = quota_refusal
            .as_ref()
            .map(|refused| ended_by_quota(&refused.to_string()));
        let outcome = if let Some(refused) = quota_refusal {
            slot.gateway
                .refuse_for_quota(&request.envelope, &mut recorder, &refused)
                .await
        } else if !known && calls_before >= caller.context.context.budget.max_tool_calls {
            slot.gateway
                .refuse_over_budget(&request.envelope, &mut recorder)
                .await
        } else {
            let progress = crate::gateway::RunProgress {
                steps: log.ledger.steps,
                tokens: log.ledger.tokens,
                input: crate::run::input_value(&slot.bundle.session_spec),
            };
            slot.gateway
                .handle_in_run(&request.envelope, &mut recorder, &request.state, &progress)
                .instrument(tracing::debug_span!("gateway.handle_in_run"))
                .await
        };
        let in_progress = |call: &str| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "call_in_progress",
                format!("call {call} is being carried out by another replica; ask again shortly"),
            )
        };
        let outcome = match outcome {
            Ok(crate::gateway::CallOutcome::InProgress { call_id }) => {
                // Nothing of this request is written; the runner asks again with the same tail.
                recorder.discard_staged();
                let _ = answer.send(Err(in_progress(&call_id)));
                // This request lets go of its part; the replica carrying the call settles it.
                self.spent_or_released(
                    caller,
                    slot,
                    held,
                    (&quota_key, &owner, &request.envelope.tool),
                    calls_before,
                )
                .await;
                return;
            }
            Ok(outcome) => outcome,
            Err(error) => {
                // What this replica remembers may be ahead of the record (an approval used, a
                // call counted, with nothing written): the record decides again next time.
                log.mark_stale();
                // A read asked while its go-ahead failed to flush: its result is on no record,
                // and no other run may be answered with it from the cache.
                slot.gateway.publish_cached(false);
                let refusal = match error {
                    // Someone wrote to the run between reading it and recording this call's
                    // go-ahead (another replica taking the same call): nothing was executed.
                    crate::gateway::GatewayError::Record(crate::records::RecordError::Store(
                        crate::records::StoreError::HeadMoved { .. },
                    )) => in_progress(&request_call_id),
                    e => unavailable(e),
                };
                let _ = answer.send(Err(refusal));
                self.spent_or_released(
                    caller,
                    slot,
                    held,
                    (&quota_key, &owner, &request.envelope.tool),
                    calls_before,
                )
                .await;
                return;
            }
        };
        // A run ended here is answered once its end is durable.
        let ends_run = quota_end.is_some();
        if let Some(end) = quota_end {
            recorder.stage(end);
        }
        let early = !ends_run
            && matches!(
                outcome,
                crate::gateway::CallOutcome::Executed(_) | crate::gateway::CallOutcome::Denied { .. }
            );
        let reply = |head| with_head(Json(&outcome).into_response(), head);
        let written = self
            .write_and_answer(
                caller,
                &slot.gateway,
                &mut log,
                recorder,
                answer,
                Answering::early(early),
                reply,
            )
            .await
            == Written::Yes;
        slot.gateway.publish_cached(written);
        // A remote agent's question on record: watched until an attempt takes it over, or
        // declined if the Session ends first.
        if written
            && let crate::gateway::CallOutcome::OutcomeUnknown {
                call_id: question,
                for_call: Some(_),
                ..
            } = &outcome
            && let Some((head, _)) = log.head()
        {
            self.watch_question(caller, &request.envelope, question, head);
        }
        let made = slot.gateway.calls_made(caller.run_id()) > calls_before;
        if made
            && written
            && let Some(cost) = outcome.cost()
        {
            self.spend.record_tool_call(
                caller.tenant.as_str(),
                &slot.bundle.agent,
                &request.envelope.tool,
                cost,
            );
        }
        match held {
            // Denied or paused, and on record as such: nothing was spent.
            Some(quotas) if written && !made => {
                self.settle_in_quotas(
                    &caller.tenant,
                    &quotas,
                    (&quota_key, &owner),
                    &crate::quota::Amounts::default(),
                    None,
                )
                .await;
            }
            // Made: what its result says it cost (nothing in money if it was refused before
            // anything was sent), as the record has it.
            Some(quotas) if made => {
                let cost = outcome.cost();
                let spent = crate::quota::Amounts {
                    calls: 1,
                    nanos: cost.map_or(0, |c| c.nanos.0),
                    ..Default::default()
                };
                let currency = cost.map(|c| c.currency.as_str());
                self.settle_in_quotas(&caller.tenant, &quotas, (&quota_key, &owner), &spent, currency)
                    .await;
            }
            held => {
                self.spent_or_released(
                    caller,
                    slot,
                    held,
                    (&quota_key, &owner, &request.envelope.tool),
                    calls_before,
                )
                .await
            }
        }
    }

    /// Watches `question`, recorded for `call` (the run's record ending at entry `seq` then),
    /// until an attempt of the run takes it over, and declines it if the run's Session ends
    /// first (see [`question_watch`]). One task per question, within
    /// [`question_watch::MAX_WATCHED`] and the namespace's share.
    fn watch_question(
        self: &Arc<Self>,
        caller: &Caller,
        call: &crate::gateway::envelope::CallEnvelope,
        question: &str,
        seq: u64,
    ) {
        use super::question_watch::{MAX_UNREAD, Next, NotWatched, next};
        let place = match self
            .questions_watched
            .take(caller.tenant.as_str(), caller.run_id(), question)
        {
            Ok(place) => place,
            Err(NotWatched::Already) => return,
            Err(NotWatched::Full) => {
                tracing::warn!(
                    tenant = %caller.tenant, run = caller.run_id(), %question,
                    "this replica watches as many remote questions as it may (here or in this namespace): this one's task is not cancelled if its Session ends first"
                );
                return;
            }
        };
        // What declining takes, without the arguments (which may be large).
        let call = crate::gateway::envelope::CallEnvelope {
            arguments: serde_json::Value::Null,
            approval: None,
            resolution: None,
            run_context: call.run_context.clone(),
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            risk: call.risk,
            kind: call.kind,
            idempotency_key: call.idempotency_key.clone(),
            traceparent: call.traceparent.clone(),
        };
        // The service is not kept alive for a question's sake.
        let service = Arc::downgrade(self);
        let (caller, question) = (caller.clone(), question.to_owned());
        let every = self.question_polls;
        tokio::spawn(async move {
            let _place = place;
            let context = &caller.context.context;
            let mut sightings = crate::gateway::session_watch::Sightings::default();
            // The first entry not read yet, and how many looks in a row could not read on.
            let (mut from, mut unread) = (seq.saturating_add(1), 0);
            loop {
                tokio::time::sleep(every).await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                let ended = match service
                    .tenants
                    .session_state(caller.tenant.as_str(), &context.session_id)
                    .await
                {
                    Ok(state) => sightings.look(&state, context.session_uid.as_deref()),
                    Err(_) => None,
                };
                let read =
                    crate::records::read_run_from(&service.store, &caller.tenant, caller.run_id(), from)
                        .await;
                let stands = match read {
                    Ok(entries) => {
                        unread = 0;
                        from = entries.last().map_or(from, |(_, e)| e.seq.saturating_add(1));
                        let bodies: Vec<&EntryBody> = entries.iter().map(|(_, e)| &e.body).collect();
                        Some(!super::question_watch::moves_on(
                            &bodies,
                            &call.call_id,
                            &question,
                        ))
                    }
                    Err(_) => {
                        unread += 1;
                        None
                    }
                };
                match next(stands, ended) {
                    Next::Wait if unread >= MAX_UNREAD => {
                        tracing::warn!(tenant = %caller.tenant, run = caller.run_id(), %question, "the run's record cannot be read: its remote question is no longer watched");
                        return;
                    }
                    Next::Wait => {}
                    Next::Leave => return,
                    Next::Decline(ended) => {
                        service.decline_question(&caller, &call, &question, ended).await;
                        return;
                    }
                }
            }
        });
    }

    /// Declines `question` in the run's name, its Session having ended: the decline goes on
    /// record first, written only on the record as it was read — so if an attempt wrote to
    /// the run meanwhile (took the question over), nothing is declined or cancelled — then
    /// the remote task is cancelled and the call's end recorded, as when a person declines.
    async fn decline_question(
        self: &Arc<Self>,
        caller: &Caller,
        call: &crate::gateway::envelope::CallEnvelope,
        question: &str,
        ended: crate::gateway::session_watch::SessionEnded,
    ) {
        let fail = |error: &str| {
            tracing::warn!(tenant = %caller.tenant, run = caller.run_id(), %question, %error, "cannot decline the question of a Session that ended");
        };
        let slot = match self.slot(caller, &[]).await {
            Ok(slot) => slot,
            Err(refusal) => return fail(&refusal.message),
        };
        let mut log = crate::gateway::fair::away(slot.log.lock()).await;
        if let Err(error) = log
            .refresh(&self.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
        {
            return fail(&error.to_string());
        }
        if log.finished() {
            return;
        }
        let key = self.keys.for_tenant(caller.tenant.as_str());
        let Some(mut recorder) = log.recorder(&self.store, &caller.tenant, key) else {
            return;
        };
        recorder.count_stored_bytes(log.bytes());
        let note = ended.to_string();
        let declined = slot
            .gateway
            .decline_standing_question(
                call,
                question,
                super::question_watch::RESOLVER,
                &note,
                &mut recorder,
            )
            .await;
        let result = match declined {
            Ok(Some(result)) => result,
            // The call no longer waits on it: an attempt took it over.
            Ok(None) => return,
            Err(error) => {
                // Someone wrote first (their write wins), or the store failed: nothing was
                // sent, and what this replica folded in may be behind.
                log.mark_stale();
                return fail(&error.to_string());
            }
        };
        let outcome = crate::gateway::CallOutcome::Executed(result);
        let (answer, answered) = tokio::sync::oneshot::channel();
        let reply = |head| with_head(Json(&outcome).into_response(), head);
        self.write_and_answer(
            caller,
            &slot.gateway,
            &mut log,
            recorder,
            answer,
            Answering::early(false),
            reply,
        )
        .await;
        match answered.await {
            Ok(Ok(_)) => {
                tracing::info!(tenant = %caller.tenant, run = caller.run_id(), %question, %ended, "declined a remote question and cancelled its task: its Session ended")
            }
            Ok(Err(refusal)) => fail(&refusal.message),
            Err(_) => fail("the call's end was not written"),
        }
    }

    /// Ends a call's quota holds as spent, at its tool's price, if this replica reached the tool
    /// (its result unknown: the request failed after it). Otherwise this request lets go of its
    /// part: nothing was sent, and the same call (the same key) carried by another replica — a
    /// runner can send it to two at once — holds on its own, so its hold stays until it settles.
    /// (Kept, a request that lost a race with another of the run's requests would be charged
    /// in full when its time was up, and a runner losing races on purpose could fill its
    /// namespace's quotas with calls never made.)
    async fn spent_or_released(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &RunSlot,
        held: Option<super::quotas::RunQuotas>,
        (key, owner, tool): (&str, &str, &str),
        calls_before: u32,
    ) {
        let Some(quotas) = held else {
            return;
        };
        let (spent, currency) = if slot.gateway.calls_made(caller.run_id()) > calls_before {
            let price = slot.bundle.tool_prices.get(tool);
            (call_cost(price), price.map(|p| p.currency.as_str()))
        } else {
            (crate::quota::Amounts::default(), None)
        };
        self.settle_in_quotas(&caller.tenant, &quotas, (key, owner), &spent, currency)
            .await;
    }

    /// Writes what `recorder` staged for a request and answers it with `reply` and the run's new
    /// head: before the write is durable if `answering` is early, otherwise after. An early
    /// answer whose write then fails leaves the log stale, and the runner that heard it is
    /// refused next time. Whether the entries were written.
    #[allow(clippy::too_many_arguments)]
    async fn write_and_answer(
        &self,
        caller: &Caller,
        gateway: &crate::gateway::ToolGateway,
        log: &mut RunLog,
        mut recorder: Recorder<'_, S>,
        answer: tokio::sync::oneshot::Sender<Reply>,
        answering: Answering,
        reply: impl FnOnce(Option<(u64, Hash)>) -> Response,
    ) -> Written {
        let prepared = match recorder
            .prepare()
            .instrument(tracing::debug_span!("gateway.prepare"))
            .await
        {
            Ok(prepared) => prepared,
            Err(e) => {
                log.mark_stale();
                let _ = answer.send(Err(unavailable(e)));
                return Written::No;
            }
        };
        let (mut answer, mut reply) = (Some(answer), Some(reply));
        // Answered before it is written, it need not be durable before the next flush either:
        // the runner's next request proves the record holds what it was told.
        let mut flush = Flush::Now;
        if answering.is_early()
            && self.early_answers
            && let Some(prepared) = &prepared
            && let (Some(answer), Some(reply)) = (answer.take(), reply.take())
        {
            let _ = answer.send(Ok(reply(Some(prepared.head()))));
            flush = Flush::Soon;
        }
        let mut turn_taken = false;
        let written = match prepared {
            Some(prepared) => recorder
                .commit_or_rechain_turn(prepared, flush, answering.turn())
                .instrument(tracing::debug_span!("gateway.write"))
                .await
                .map(|_| ())
                .map_err(|e| {
                    turn_taken = matches!(e, RecordError::TurnRecorded { .. });
                    unavailable(e)
                }),
            None => Ok(()),
        };
        let settled = match written {
            Ok(()) => {
                self.settle(caller, gateway, log, recorder.written())
                    .instrument(tracing::debug_span!("gateway.settle"))
                    .await
            }
            Err(refusal) => Err(refusal),
        };
        if settled.is_err() {
            // Written or not, what this replica folded in no longer matches the record.
            log.mark_stale();
        }
        let written = match settled {
            Ok(()) => Written::Yes,
            Err(_) if turn_taken => Written::TurnTaken,
            Err(_) => Written::No,
        };
        match (answer, reply) {
            (Some(answer), Some(reply)) => {
                let _ = answer.send(settled.map(|()| reply(log.exact_head())));
            }
            _ => {
                if let Err(Refusal { message: error, .. }) = settled {
                    tracing::warn!(
                        run_id = caller.run_id(),
                        %error,
                        "writing an answered request's entries failed; if they are not on record, the runner's next request is refused and its attempt resumes from the record"
                    );
                }
            }
        }
        written
    }

    /// Folds what this request's recorder wrote into the run's log (see [`RunLog::after_write`]).
    async fn settle(
        &self,
        caller: &Caller,
        gateway: &crate::gateway::ToolGateway,
        log: &mut RunLog,
        written: Option<&[crate::records::StoredEntry]>,
    ) -> Result<(), Refusal> {
        log.after_write(&self.store, &caller.tenant, caller.run_id(), written, gateway)
            .await
            .map_err(unavailable)
    }

    /// An approval or resolution attached to a call counts only if the Session holds the same
    /// decision (written by a human and checked by admission); anything else the runner
    /// attaches is dropped.
    pub(super) async fn decisions_on_record(
        &self,
        caller: &Caller,
        approval: Option<crate::gateway::envelope::ApprovalGrant>,
        resolution: Option<Resolution>,
    ) -> Result<
        (
            Option<crate::gateway::envelope::ApprovalGrant>,
            Option<Resolution>,
        ),
        Refusal,
    > {
        if approval.is_none() && resolution.is_none() {
            return Ok((None, None));
        }
        let mut decisions = self
            .tenants
            .decisions(caller.tenant.as_str(), &caller.context.context.session_id)
            .await
            .map_err(unavailable)?;
        // A Session made again under the run's Session's name decides nothing for it (its pod
        // may still be running while the earlier Session's are collected).
        if let (Some(issued), Some(found)) = (&caller.context.context.session_uid, &decisions.session_uid)
            && issued != found
        {
            decisions = crate::gateway::tenancy::SessionDecisions::default();
        }
        // The Session's decision as the human wrote it: the runner's copy picks it, and its
        // note (recorded with the decision) is theirs, not the runner's.
        let approval = approval.and_then(|grant| {
            decisions
                .approvals
                .iter()
                .find(|a| {
                    a.call_hash == grant.call_hash
                        && a.decision == grant.decision
                        && a.approver == grant.approver
                })
                .map(|a| crate::gateway::envelope::ApprovalGrant {
                    call_hash: a.call_hash.clone(),
                    decision: a.decision,
                    approver: a.approver.clone(),
                    reason: a.reason.clone(),
                })
        });
        let resolution = resolution.filter(|r| decisions.resolutions.contains(r));
        Ok((approval, resolution))
    }

    pub(super) async fn recall(
        State(service): State<Arc<Self>>,
        held: Option<axum::Extension<TenantSlot>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: RecallCall = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let slot = service.slot(&caller, &request.tail.entries).await?;
        // As for calls: what was offered is recorded even if the runner went away meanwhile.
        let (answer, answered) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            TenantSlot::carry(held, service.recall_sources(&caller, &slot, request, answer)).await;
        });
        answered_by(answered, task).await
    }

    /// Recalls the run's ContextPack memory sources holding the run's log — under the caller's
    /// verified RunContext (its agent, its subject) and the pinned pack, whatever the runner
    /// would like — records what was offered, and answers once that is durable. A run recalls
    /// once: asked again, the record answers.
    async fn recall_sources(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        request: RecallCall,
        answer: tokio::sync::oneshot::Sender<Reply>,
    ) {
        let mut log = crate::gateway::fair::away(slot.log.lock()).await;
        let mut recorder = match self
            .continue_run(
                caller,
                slot,
                &mut log,
                "it recalls nothing more",
                request.tail.told_head(),
            )
            .await
        {
            Ok(recorder) => recorder,
            Err(refusal) => {
                let _ = answer.send(Err(refusal));
                return;
            }
        };
        if let Err(refusal) = self.take_tail(caller, &log, &mut recorder, &request.tail).await {
            let _ = answer.send(Err(refusal));
            return;
        }
        let records = if log.ledger.recalled.is_empty() {
            let desk = slot.gateway.memory();
            let mut records = Vec::new();
            for source in &slot.bundle.context_pack.spec.sources {
                let Some(memory) = &source.memory else {
                    continue;
                };
                let recalled = desk
                    .recall(
                        &self.store,
                        &caller.context.context,
                        crate::memory::desk::RecallFor::Source(&source.name),
                        &memory.into(),
                        now_ms(),
                    )
                    .await;
                match recalled {
                    Ok(record) => {
                        recorder.stage(EntryBody::MemoryRecalled(record.clone()));
                        records.push(record);
                    }
                    Err(e) => {
                        let _ = answer.send(Err(super::consent_api::refusal(e)));
                        return;
                    }
                }
            }
            records
        } else {
            log.ledger.recalled.clone()
        };
        let reply = move |head| with_head(Json(&records).into_response(), head);
        self.write_and_answer(
            caller,
            &slot.gateway,
            &mut log,
            recorder,
            answer,
            Answering::Late,
            reply,
        )
        .await;
    }

    pub(super) async fn model(
        State(service): State<Arc<Self>>,
        held: Option<axum::Extension<TenantSlot>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: ModelCall = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let slot = service.slot(&caller, &request.tail.entries).await?;
        let span = model_proxy_span(&caller, &slot, &headers, request.step);
        // As for calls: a turn the model gave is recorded even if the runner went away, and the
        // tenant's slot is held until then.
        let (answer, answered) = tokio::sync::oneshot::channel();
        let (recorded, outcome) = (span.clone(), span.clone());
        let task = tokio::spawn(
            async move {
                let asked = service.ask_model(&caller, &slot, request, answer, &recorded);
                TenantSlot::carry(held, asked).await;
            }
            .instrument(span),
        );
        let reply = answered_by(answered, task).await;
        outcome.record(
            "contextos.outcome",
            match &reply {
                Ok(_) => "answered",
                Err(refusal) => refusal.code,
            },
        );
        reply
    }

    /// Asks the run's model for one turn holding the run's log, records it, and answers on
    /// `answer` as soon as the turn is chained and sealed (see [`Self::write_and_answer`]).
    async fn ask_model(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &RunSlot,
        request: ModelCall,
        answer: tokio::sync::oneshot::Sender<Reply>,
        span: &tracing::Span,
    ) {
        let mut log = crate::gateway::fair::away(slot.log.lock()).await;
        let mut recorder = match self.turn_recorder(caller, slot, &mut log, &request).await {
            Ok(recorder) => recorder,
            Err(refusal) => {
                let _ = answer.send(Err(refusal));
                return;
            }
        };
        // A turn already recorded for this step (the runner crashed before reading the answer)
        // is answered from the record: the model is never asked twice for one step.
        if let Some(turn) = log.ledger.turns.get(&request.step).cloned() {
            let reply = move |head| with_head(Json(&turn).into_response(), head);
            self.write_and_answer(
                caller,
                &slot.gateway,
                &mut log,
                recorder,
                answer,
                Answering::Late,
                reply,
            )
            .await;
            return;
        }
        let quotas = match self.run_quotas(caller, slot).await {
            Ok(quotas) => quotas,
            Err(refusal) => {
                let _ = answer.send(Err(refusal));
                return;
            }
        };
        // Each request that asks the model spends: its hold is its own.
        let owner = super::quotas::request_owner();
        let step = request.step;
        let (turn, cut_off) = match self
            .model_turn(caller, slot, &log, (request.request, step), &quotas, &owner)
            .await
        {
            Ok(answered) => answered,
            // A SpendQuota refused the turn for good: the run ends here, on record, written by
            // the gateway — whatever the runner reports, nothing more of the run is served.
            Err((refusal, _)) if refusal.code == super::quotas::QUOTA_EXCEEDED_CODE => {
                let held = log.take_unrecorded();
                for entry in &held {
                    recorder.stage(entry.clone());
                }
                recorder.stage(ended_by_quota(&refusal.message));
                let reply = move |head| with_head(refusal.into_response(), head);
                let written = self
                    .write_and_answer(
                        caller,
                        &slot.gateway,
                        &mut log,
                        recorder,
                        answer,
                        Answering::Late,
                        reply,
                    )
                    .await;
                if written == Written::Yes {
                    self.count_unanswered(caller, slot, &held);
                }
                return;
            }
            // No model answered. One that was paid for counts against the run's budget from
            // now on, and goes on record with the run's next turn: written now, it would move
            // the head under a runner whose own entries are not on record yet.
            Err((refusal, paid)) => {
                log.hold_unrecorded(
                    paid.iter()
                        .map(|spend| spend.entry(step, UnansweredSpend::CutOff)),
                );
                let _ = answer.send(Err(refusal));
                return;
            }
        };
        // After the runner's entries: what this replica paid for before (see `RunLog`), the
        // turn, then the models cut off before it answered (routing chose the turn's model
        // counting the former, not the latter; a replay's routing effect reads them so).
        let held = log.take_unrecorded();
        for entry in &held {
            recorder.stage(entry.clone());
        }
        let cost = slot.bundle.turn_cost(&turn);
        let model = slot.bundle.model_of(&turn);
        span.record("gen_ai.response.model", model.as_str());
        span.record("gen_ai.usage.input_tokens", turn.prompt_tokens);
        span.record("gen_ai.usage.output_tokens", turn.completion_tokens);
        recorder.stage(EntryBody::ModelTurn {
            step,
            model: model.clone(),
            response: serde_json::to_value(&turn).unwrap_or_default(),
            prompt_tokens: turn.prompt_tokens,
            completion_tokens: turn.completion_tokens,
            cached_prompt_tokens: turn.cached_prompt_tokens,
            cost: cost.clone(),
        });
        let cut_off_entries: Vec<EntryBody> = cut_off
            .iter()
            .map(|spend| spend.entry(step, UnansweredSpend::CutOff))
            .collect();
        for entry in &cut_off_entries {
            recorder.stage(entry.clone());
        }
        let counted = turn.clone();
        let reply = move |head| with_head(Json(&turn).into_response(), head);
        let written = self
            .write_and_answer(
                caller,
                &slot.gateway,
                &mut log,
                recorder,
                answer,
                Answering::EarlyTurn(step),
                reply,
            )
            .await;
        if written == Written::Yes {
            self.count_unanswered(caller, slot, &held);
            self.count_unanswered(caller, slot, &cut_off_entries);
        } else {
            // Not on record: what was paid for is held for the next turn. An answer dropped
            // because another replica recorded the step's turn first was paid for too (a turn
            // whose write failed otherwise is asked for again, and counted then).
            let dropped = (written == Written::TurnTaken).then(|| {
                Unanswered::dropped(&slot.bundle, &counted).entry(step, UnansweredSpend::TurnDropped)
            });
            log.hold_unrecorded(held.into_iter().chain(cut_off_entries).chain(dropped));
        }
        // The model answered: what it cost is spent, on record or not (asked again, it costs
        // again).
        self.settle_turn(caller, slot, &quotas, (step, &owner), &counted, &cut_off)
            .await;
        // Counted once on record: a turn whose write failed is asked for again, and counted then.
        if log.ledger.turns.contains_key(&step) {
            self.spend.record(
                caller.tenant.as_str(),
                &slot.bundle.agent,
                &model,
                &counted,
                cost.as_ref(),
            );
        }
    }

    /// Counts the `model_spend` entries among `written` (now on record) in the spend metrics.
    fn count_unanswered(&self, caller: &Caller, slot: &RunSlot, written: &[EntryBody]) {
        for entry in written {
            if let EntryBody::ModelSpend {
                model, tokens, cost, ..
            } = entry
            {
                self.spend.record_unanswered(
                    caller.tenant.as_str(),
                    &slot.bundle.agent,
                    model,
                    *tokens,
                    cost.as_ref(),
                );
            }
        }
    }

    /// Ends a model turn's quota holds with what it cost, and what models cut off before it
    /// answered are charged (`cut_off`).
    async fn settle_turn(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &RunSlot,
        quotas: &super::quotas::RunQuotas,
        (step, owner): (u32, &str),
        turn: &crate::model::ModelTurn,
        cut_off: &[Unanswered],
    ) {
        let cost = slot.bundle.turn_cost(turn);
        let cut_off = Unanswered::amounts(cut_off, cost.as_ref().map(|c| c.currency.as_str()));
        let spent = crate::quota::Amounts {
            tokens: turn
                .prompt_tokens
                .saturating_add(turn.completion_tokens)
                .saturating_add(cut_off.tokens),
            nanos: cost
                .as_ref()
                .map_or(0, |c| c.nanos.0)
                .saturating_add(cut_off.nanos),
            calls: 0,
        };
        let key = format!("{}/turn/{step}/{owner}", caller.run_id());
        let currency = cost.as_ref().map(|c| c.currency.as_str());
        self.settle_in_quotas(&caller.tenant, quotas, (&key, owner), &spent, currency)
            .await;
    }

    /// A recorder continuing the run, with the runner's tail staged on it.
    async fn turn_recorder<'s>(
        &'s self,
        caller: &Caller,
        slot: &RunSlot,
        log: &mut RunLog,
        request: &ModelCall,
    ) -> Result<Recorder<'s, S>, Refusal> {
        let mut recorder = self
            .continue_run(
                caller,
                slot,
                log,
                "it asks the model nothing more",
                request.tail.told_head(),
            )
            .await?;
        let sent = self.take_tail(caller, log, &mut recorder, &request.tail).await?;
        check_shown_tools(slot, &log.ledger, &sent, request)?;
        Ok(recorder)
    }

    /// The model's turn for `step`, within the run's budget as the record has it, with what
    /// models cut off before one answered were paid for; refused, with what models cut off
    /// were paid for (each [`Unanswered`] is recorded and charged).
    async fn model_turn(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &RunSlot,
        log: &RunLog,
        (request, step): (crate::model::ModelRequest, u32),
        quotas: &super::quotas::RunQuotas,
        owner: &str,
    ) -> Result<(crate::model::ModelTurn, Vec<Unanswered>), (Refusal, Vec<Unanswered>)> {
        let refused = |refusal: Refusal| (refusal, Vec::new());
        let ledger = &log.ledger;
        if step != ledger.steps.saturating_add(1) {
            return Err(refused(bad(format!(
                "step {step} does not follow the recorded step {}",
                ledger.steps
            ))));
        }
        let budget = &caller.context.context.budget;
        if step > budget.max_steps {
            return Err(refused(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "step_budget",
                format!("run {} may take {} steps", caller.run_id(), budget.max_steps),
            )));
        }
        // What the prompt will cost, estimated before asking (≈ 4 bytes a token), so one request
        // cannot overshoot the budget by the size of its prompt.
        let prompt_estimate = crate::model::estimated_tokens(&request);
        let used = log.tokens_used();
        let spent = used.saturating_add(prompt_estimate);
        if spent >= budget.max_tokens {
            return Err(refused(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "token_budget",
                format!(
                    "run {} has used {used} of its {} tokens and this prompt needs about {prompt_estimate} more",
                    caller.run_id(),
                    budget.max_tokens
                ),
            )));
        }
        let mut model_request = request;
        // The model, its limits and its credentials are the Agent's, not the runner's to choose.
        model_request.model = slot.bundle.agent_spec.model.model.clone();
        let remaining = u32::try_from(budget.max_tokens - spent).unwrap_or(u32::MAX);
        model_request.max_output_tokens = Some(
            slot.bundle
                .agent_spec
                .model
                .max_output_tokens
                .unwrap_or(remaining)
                .min(remaining),
        );
        // The most the turn may cost (its prompt as estimated, its whole output limit) is held
        // in the run's quotas before the model is asked.
        let quota_key = format!("{}/turn/{step}/{owner}", caller.run_id());
        let most_out = u64::from(model_request.max_output_tokens.unwrap_or(0));
        // Routed, the turn may be answered by any of the Agent's models: it holds the dearest.
        // The prompt is held at the most tokens it can be (a byte each), not the estimate: text
        // that tokenizes densely cannot let calls in flight pass a limit.
        let most_in = crate::model::most_prompt_tokens(&model_request);
        crate::quota::book::one_currency(&quotas.all(), &slot.bundle.model_currencies())
            .map_err(|e| refused(super::quotas::refusal(e)))?;
        let price = slot.bundle.dearest_price(most_in, most_out);
        let demand = crate::quota::book::Demand {
            call: &quota_key,
            owner,
            amounts: crate::quota::Amounts {
                tokens: most_in.saturating_add(most_out),
                nanos: price.map_or(0, |p| p.cost(most_in, 0, most_out).nanos.0),
                calls: 0,
            },
            currency: price.map(|p| p.currency.as_str()),
            model_turn: true,
        };
        // Durable before the model is asked: nothing is recorded before it answers.
        self.hold_in_quotas(
            &caller.tenant,
            quotas,
            &demand,
            crate::quota::book::Durability::Now,
        )
        .await
        .map_err(|e| refused(super::quotas::refusal(e)))?;
        let facts = crate::model::routing::RouteFacts {
            step,
            max_steps: budget.max_steps,
            riskiest_called: ledger.riskiest_called,
            tokens_used: used,
            max_tokens: budget.max_tokens,
        };
        // The model's time is spent out of the request's turn.
        let completed = crate::gateway::fair::away(slot.models.complete(&model_request, step, &facts)).await;
        // Models cut off or answering unreadably — one timed out generating, say — may have
        // cost what they could, whether another answered or not (see `Unanswered::cut_off`).
        let asked = Asked {
            most_in,
            most_out,
            prompt_estimate,
        };
        let cut_off = |failed: &[crate::model::routing::Failed]| -> Vec<Unanswered> {
            failed
                .iter()
                .filter(|f| f.may_have_cost)
                .map(|f| Unanswered::cut_off(&slot.bundle, &f.model, asked))
                .collect()
        };
        let unanswered = match &completed {
            Ok(turn) => cut_off(turn.route.as_ref().map_or(&[], |r| r.failed.as_slice())),
            Err((_, Some(route))) => cut_off(&route.failed),
            Err((error, None)) if error.may_have_cost() => vec![Unanswered::cut_off(
                &slot.bundle,
                contextos_crds::model_routing::PRIMARY,
                asked,
            )],
            // Refused or never sent: nothing was spent.
            Err(_) => Vec::new(),
        };
        if completed.is_err() {
            // Spent, the hold is settled at what may have been paid, so asking again and again
            // is never free (in the quotas here, in the run's own budget by `model_spend`).
            let spent = Unanswered::amounts(&unanswered, demand.currency);
            self.settle_in_quotas(
                &caller.tenant,
                quotas,
                (&quota_key, owner),
                &spent,
                demand.currency,
            )
            .await;
        }
        let mut turn = match completed {
            Ok(turn) => turn,
            Err((error, route)) => return Err((failed_turn(error, route), unanswered)),
        };
        // Its usage is as `Model::complete` accounts it: an estimate when the model reports
        // none, never nothing.
        turn.cap_tool_calls(budget.max_tool_calls_per_turn);
        Ok((turn, unanswered))
    }
}

/// The refusal for a turn no model answered.
fn failed_turn(error: ModelError, route: Option<crate::model::routing::Route>) -> Refusal {
    match error {
        ModelError::ScriptExhausted { .. } | ModelError::BadScript { .. } => Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "model_script",
            error.to_string(),
        ),
        other => {
            // Every model routing allowed failed: each one's failure, in the order tried.
            let tried = route
                .map(|r| {
                    r.failed
                        .iter()
                        .map(|f| format!("{}: {}", f.model, f.error))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .filter(|t| !t.is_empty());
            let message = match tried {
                Some(tried) => format!("no routed model answered ({tried})"),
                None => other.to_string(),
            };
            Refusal::new(StatusCode::BAD_GATEWAY, "model_unavailable", message)
        }
    }
}

/// What a model turn was asked with: its prompt at most (a token a byte) and as estimated
/// (about four bytes a token), and its output limit.
#[derive(Clone, Copy, Debug)]
struct Asked {
    most_in: u64,
    most_out: u64,
    prompt_estimate: u64,
}

/// Tokens a model was paid for that no answer on record holds: recorded as
/// [`EntryBody::ModelSpend`] (the run's `maxTokens` counts `tokens`), and what the quotas are
/// charged for them (`held`).
#[derive(Clone, Debug)]
struct Unanswered {
    /// The model at its endpoint.
    model: String,
    tokens: u64,
    cost: Option<crate::pricing::TurnCost>,
    held: u64,
    held_cost: Option<crate::pricing::TurnCost>,
}

impl Unanswered {
    /// A model (`route`: its name in the Agent's routing, `primary` for its own) cut off after
    /// it was sent, which may have cost what it could. The quotas, which guard money, are
    /// charged as the turn was held: the prompt at a token a byte and the whole output limit.
    /// The run's budget counts the prompt as estimated and the output limit the model's own
    /// spec sets (`maxOutputTokens`); without one, the limit sent is the rest of the run's
    /// budget, and counting it would end a run at its first timeout.
    fn cut_off(bundle: &RunBundle, route: &str, asked: Asked) -> Self {
        let own_limit = bundle
            .model_spec_routed_as(route)
            .max_output_tokens
            .map(u64::from);
        let held_out = own_limit.map_or(asked.most_out, |limit| limit.min(asked.most_out));
        let counted_out = own_limit.map_or(0, |limit| limit.min(asked.most_out));
        let price = bundle.price_of_route(route);
        Self {
            model: bundle.model_routed_as(route),
            tokens: asked.prompt_estimate.saturating_add(counted_out),
            cost: price.map(|p| p.cost(asked.prompt_estimate, 0, counted_out)),
            held: asked.most_in.saturating_add(held_out),
            held_cost: price.map(|p| p.cost(asked.most_in, 0, held_out)),
        }
    }

    /// An answer that was paid for and dropped (another replica recorded the step first): what
    /// the model reported.
    fn dropped(bundle: &RunBundle, turn: &crate::model::ModelTurn) -> Self {
        let tokens = turn.prompt_tokens.saturating_add(turn.completion_tokens);
        let cost = bundle.turn_cost(turn);
        Self {
            model: bundle.model_of(turn),
            tokens,
            cost: cost.clone(),
            held: tokens,
            held_cost: cost,
        }
    }

    fn entry(&self, step: u32, reason: crate::records::entry::UnansweredSpend) -> EntryBody {
        EntryBody::ModelSpend {
            step,
            model: self.model.clone(),
            tokens: self.tokens,
            reason,
            cost: self.cost.clone(),
        }
    }

    /// What `spends` charge a quota that counts money in `currency` (costs in another currency
    /// count their tokens only, as a turn's do).
    fn amounts(spends: &[Self], currency: Option<&str>) -> crate::quota::Amounts {
        let mut amounts = crate::quota::Amounts::default();
        for spend in spends {
            amounts.tokens = amounts.tokens.saturating_add(spend.held);
            if let Some(cost) = &spend.held_cost
                && currency.is_none_or(|c| c == cost.currency)
            {
                amounts.nanos = amounts.nanos.saturating_add(cost.nanos.0);
            }
        }
        amounts
    }
}

/// The gateway's span for a model turn it asks for a runner (the model's request carries it):
/// a child of the runner's `model.call` when the request names one of the run's own trace,
/// else of the Session's root.
fn model_proxy_span(caller: &Caller, slot: &RunSlot, headers: &HeaderMap, step: u32) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "model.proxy",
        contextos.tenant = %caller.tenant,
        contextos.agent = %slot.bundle.agent,
        contextos.step = step,
        gen_ai.request.model = %slot.bundle.agent_spec.model.model,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        contextos.outcome = tracing::field::Empty,
        otel.kind = "client",
    );
    let context = &caller.context.context;
    if let Some(trace) = context.trace() {
        let asked = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        crate::telemetry::set_parent(&span, trace.call_parent(asked, Some(&context.run_id)));
    }
    span
}

/// What one tool call that was carried out spends: a call, and its tool's price if it has one.
fn call_cost(price: Option<&crate::pricing::PinnedToolPrice>) -> crate::quota::Amounts {
    crate::quota::Amounts {
        calls: 1,
        nanos: price.map_or(0, |p| p.per_call.0),
        ..Default::default()
    }
}

/// The entry by which the gateway ends a run a SpendQuota refused (`QuotaExceeded`, naming the
/// quota and its window as the refusal does).
fn ended_by_quota(why: &str) -> EntryBody {
    EntryBody::Failed {
        reason: crate::quota::EXCEEDED.into(),
        message: why.chars().take(1024).collect(),
    }
}

/// The answer a request's task gave; if it ended without one (it panicked), a refusal.
async fn answered_by(
    answered: tokio::sync::oneshot::Receiver<Reply>,
    task: tokio::task::JoinHandle<()>,
) -> Reply {
    match answered.await {
        Ok(reply) => reply,
        Err(_) => Err(unavailable(match task.await {
            Err(e) => format!("the request's task failed: {e}"),
            Ok(()) => "the request's task ended without an answer".to_owned(),
        })),
    }
}

/// Whether a request's entries were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    Yes,
    No,
    /// Not: they held the model's turn for a step another replica recorded first.
    TurnTaken,
}

/// When a request is answered, relative to the write of its entries.
#[derive(Clone, Copy, Debug)]
enum Answering {
    /// Once the write is durable.
    Late,
    /// As soon as the entries are chained and sealed.
    Early,
    /// Early, for entries holding the model's turn for this step: dropped rather than chained
    /// again if another replica recorded that step's turn first, so one step has one answer on
    /// record (the runner that heard this one is refused next time, as after a lost write).
    EarlyTurn(u32),
}

impl Answering {
    fn early(early: bool) -> Self {
        if early { Self::Early } else { Self::Late }
    }

    fn is_early(self) -> bool {
        !matches!(self, Self::Late)
    }

    fn turn(self) -> Option<u32> {
        match self {
            Self::EarlyTurn(step) => Some(step),
            _ => None,
        }
    }
}

/// Tells the runner where the entries written for its request end ([`HEAD_HEADER`]).
fn with_head(mut response: axum::response::Response, head: Option<(u64, Hash)>) -> axum::response::Response {
    if let Some((seq, hash)) = head
        && let Ok(value) = axum::http::HeaderValue::from_str(&head_header_value(seq, &hash))
    {
        response.headers_mut().insert(HEAD_HEADER, value);
    }
    response
}

/// The steps a runner's entries name must be the record's. A runner records what a turn is
/// offered before asking the model for it: an offer names the run's next step (one past its
/// latest model turn on record), so what an answered turn was shown can never be rewritten
/// after it. A critic's verdict judges a turn on record (replay counts a run's steps by its
/// verdicts, so a made-up step would weigh how far a candidate diverges).
fn check_entry_steps(ledger: &crate::gateway::run_log::Ledger, bodies: &[EntryBody]) -> Result<(), Refusal> {
    let next = ledger.steps.saturating_add(1);
    for body in bodies {
        match body {
            EntryBody::ToolsOffered { step, .. } if *step != next => {
                return Err(forbidden(format!(
                    "tools_offered for step {step}: the run's next model turn is step {next}, and a turn's offer is recorded before the turn, never after"
                )));
            }
            EntryBody::CriticVerdict { step, .. } if *step == 0 || *step > ledger.steps => {
                return Err(forbidden(format!(
                    "critic_verdict for step {step}: the run's model turns on record are steps 1 to {}, and a verdict judges one of them",
                    ledger.steps
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a runner shows its model for a turn must be what the record says the turn was offered
/// (see [`crate::run::offer::check_shown`]); for an Agent with `spec.discovery`, the turn's
/// `tools_offered` entry, sent with the request (`sent`) or already on record.
fn check_shown_tools(
    slot: &RunSlot,
    ledger: &crate::gateway::run_log::Ledger,
    sent: &[EntryBody],
    request: &ModelCall,
) -> Result<(), Refusal> {
    let agent = &slot.bundle.agent_spec;
    let step = request.step;
    let offered = match agent.discovery {
        None => None,
        Some(_) => {
            let in_request = sent.iter().rev().find_map(|body| match body {
                EntryBody::ToolsOffered {
                    step: offered_at,
                    selection,
                    ..
                } if *offered_at == step => Some(selection.offered_names()),
                _ => None,
            });
            let offered = in_request.or_else(|| ledger.offered.get(&step).cloned());
            Some(offered.ok_or_else(|| {
                forbidden(format!(
                    "model turn {step}: the Agent discovers its tools (spec.discovery) and no tools_offered entry for this step is sent or on record; a runner records what a turn is offered before asking the model"
                ))
            })?)
        }
    };
    crate::run::offer::check_shown(
        &request.request.tools,
        &crate::run::offer::agent_tools(agent),
        offered.as_ref(),
        agent.aliases.is_some(),
    )
    .map_err(|e| forbidden(format!("model turn {step}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::subject_run_identifiers;

    #[test]
    fn a_subject_runs_identifiers_are_only_what_a_runner_makes() {
        let key = "ctxos-0123456789abcdef0123456789abcdef";
        assert_eq!(subject_run_identifiers("3.0", key), None);
        assert_eq!(subject_run_identifiers("123456789.9999", key), None);
        for call_id in [
            "",
            "3",
            "3.",
            ".0",
            "3.0.1",
            "ana@example.com",
            "3.x",
            "1234567890.0",
            "3.12345",
        ] {
            assert!(
                subject_run_identifiers(call_id, key).is_some(),
                "{call_id:?} taken"
            );
        }
        for key in [
            "",
            "ctxos-",
            "ctxos-0123456789ABCDEF0123456789abcdef",
            "ctxos-0123456789abcdef0123456789abcde",
            "ana.lopez@example.com",
            "ctxos-ana.lopez@example.com.........",
        ] {
            assert!(subject_run_identifiers("3.0", key).is_some(), "{key:?} taken");
        }
    }
}
