//! The Feedback store: corrections of runs by people — first-class, attributable, append-only
//! and tamper-evident. A correction points at a run and optionally at one of its entries (by
//! position, with the entry's hash taken from the verified record, and the call it is about),
//! carries a typed label and the correction itself, and names who gave it and when. Each run's
//! corrections are one signed chain (see [`crate::memory::chain`]) in the same store as the
//! run's record.
//!
//! For a run about a person the correction text is encrypted under the run's key, like what the
//! run recorded about them: it reads as erased once they are.

use serde::{Deserialize, Serialize};

use crate::{
    keys::{KeyPair, PublicKey},
    memory::{
        MemoryError,
        chain::{ChainKind, ChainRecord, Chains, History, Link},
    },
    records::{
        EntryBody, Hash, RecordStore, StoreError, TenantId,
        read::{ReadError, read_stored_from},
        store::validate_id,
        vaulted::ERASED,
    },
    vault::{KeyUse, VaultError},
};

/// The most bytes of a correction.
pub const MAX_CORRECTION: usize = 2048;
/// The most corrections one run takes.
pub const MAX_PER_RUN: u64 = 1_000;
/// What a correction's text is bound to when encrypted.
const CORRECTION_LABEL: &str = "feedback.correction";

/// Feedback chains: one per run, under `cx/<tenant>/m/fc/<run>/` (heads `fh/`, request ids
/// `fr/`, the runs that have feedback `fs/`).
pub const FEEDBACK: ChainKind = ChainKind {
    name: "feedback",
    links: "fc",
    heads: "fh",
    requests: "fr",
    owners: "fs",
};

pub use contextos_crds::feedback::FeedbackLabel;

/// The entry a correction is about, as the verified record holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AboutEntry {
    pub seq: u64,
    pub hash: Hash,
    /// The call it is part of, and its tool, when it is a call's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// One correction, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    pub run_id: String,
    pub agent: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<AboutEntry>,
    pub label: FeedbackLabel,
    /// What should have happened (an envelope under the run's key for a run about a person).
    pub correction: String,
    /// Who gave it: the authenticated user through the gateway, the local user locally.
    pub by: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ChainRecord for FeedbackRecord {
    fn owner(&self) -> &str {
        &self.run_id
    }

    fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    fn resent_as(&self, sent: &Self) -> bool {
        FeedbackRecord {
            at_ms: self.at_ms,
            ..sent.clone()
        } == *self
    }
}

/// A correction as a person gives it: who and when are added by whoever records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeedbackRequest {
    pub run_id: String,
    /// The Session the run must be of, if the giver names one (a Feedback object does): a
    /// correction meant for one Session's run is never chained to another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The position of the entry it is about (`contextos records show <run>` prints them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<u64>,
    pub label: FeedbackLabel,
    pub correction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Where the gateway service serves the runs that have corrections (`?limit=`).
pub const FEEDBACK_RUNS_PATH: &str = "/v1/records/feedback/runs";
/// Where the gateway service serves one run's corrections, verified (`?run=`).
pub const FEEDBACK_PATH: &str = "/v1/records/feedback";

/// Why a correction was not kept.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("reading corrections through the gateway service: {0}")]
    Remote(#[from] crate::records::store::remote::RemoteError),
    #[error("feedback refused: {0}")]
    Invalid(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl FeedbackRequest {
    /// Checks the bounds that need no store.
    fn validate(&self) -> Result<(), FeedbackError> {
        let invalid = |why: String| Err(FeedbackError::Invalid(why));
        validate_id("run", &self.run_id).map_err(|e| FeedbackError::Invalid(format!("run: {e}")))?;
        if self.correction.trim().is_empty() {
            return invalid("correction: say what should have happened".into());
        }
        if self.correction.len() > MAX_CORRECTION {
            return invalid(format!(
                "correction: {} bytes, more than {MAX_CORRECTION}; point at the entry and keep it short",
                self.correction.len()
            ));
        }
        if self.correction.chars().any(|c| c.is_control() && c != '\n') {
            return invalid("correction: it holds control characters".into());
        }
        Ok(())
    }
}

/// One tenant's corrections in `store`.
#[derive(Debug)]
pub struct FeedbackBook<'s, S> {
    store: &'s S,
    tenant: TenantId,
    chains: Chains<'s, S, FeedbackRecord>,
}

impl<'s, S: RecordStore> FeedbackBook<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
            chains: Chains::new(store, tenant, FEEDBACK),
        }
    }

    /// Keeps `request`, given by `by` at `at_ms`, signed with `key`: the run must be in the
    /// record and the entry it names in the run (its hash and call are taken from there).
    pub async fn give(
        &self,
        request: FeedbackRequest,
        by: String,
        at_ms: i64,
        key: &KeyPair,
    ) -> Result<Link<FeedbackRecord>, FeedbackError> {
        request.validate()?;
        if by.trim().is_empty() || by.len() > 256 || by.chars().any(char::is_control) {
            return Err(FeedbackError::Invalid("by: a name of at most 256 bytes".into()));
        }
        // As stored: what is read here (positions, hashes, calls, tools, who the run is about)
        // stays readable in a run about a person, so nothing needs opening.
        let entries = read_stored_from(self.store, &self.tenant, &request.run_id, 0).await?;
        if entries.is_empty() {
            return Err(FeedbackError::Invalid(format!(
                "run {} is not in the record of tenant {}",
                request.run_id, self.tenant
            )));
        }
        let (agent, session_id, subject) = match entries.first().map(|(_, e)| (&e.body, &e.vaulted)) {
            Some((
                EntryBody::RunStarted {
                    agent, session_id, ..
                },
                subject,
            )) => (agent.clone(), session_id.clone(), subject.clone()),
            _ => {
                return Err(FeedbackError::Invalid(format!(
                    "run {}: its record does not start with run_started",
                    request.run_id
                )));
            }
        };
        if let Some(expected) = request.session.as_deref()
            && expected != session_id
        {
            return Err(FeedbackError::Invalid(format!(
                "run {} is a run of Session {session_id}, not of {expected}",
                request.run_id
            )));
        }
        let entry = match request.entry {
            None => None,
            Some(seq) => Some(about(&entries, seq).ok_or_else(|| {
                FeedbackError::Invalid(format!(
                    "entry: run {} has no entry {seq} (it has {})",
                    request.run_id,
                    entries.len()
                ))
            })?),
        };
        let correction = match &subject {
            None => request.correction.clone(),
            Some(subject) => self
                .store
                .key_to_keep(&self.tenant, &request.run_id, subject)
                .await?
                .lock(CORRECTION_LABEL, request.correction.as_bytes())?,
        };
        let record = FeedbackRecord {
            run_id: request.run_id,
            agent,
            session_id,
            entry,
            label: request.label,
            correction,
            by,
            at_ms,
            request_id: request.request_id,
        };
        // Said as they are: these refusals are the person's to read, not a store's failure.
        let refused =
            |why: String| MemoryError::Store(StoreError::Refused(format!("feedback refused: {why}")));
        let room = |seq: u64| {
            if seq < MAX_PER_RUN {
                Ok(())
            } else {
                Err(refused(format!(
                    "run {} has {MAX_PER_RUN} corrections already",
                    record.run_id
                )))
            }
        };
        Ok(self.chains.append(record.clone(), key, room, refused).await?)
    }

    /// The corrections of `run_id`, oldest first, verified against `key`, with the text of a
    /// run about a person opened (or read as erased).
    pub async fn of_run(
        &self,
        run_id: &str,
        key: &PublicKey,
    ) -> Result<History<FeedbackRecord>, FeedbackError> {
        let mut history = self.chains.history(run_id, key, MAX_PER_RUN as usize + 1).await?;
        let sealed = |link: &Link<FeedbackRecord>| crate::vault::cipher::is_envelope(&link.record.correction);
        if !history.links.iter().any(sealed) {
            return Ok(history);
        }
        // A run about a person: its key opens the corrections (none once they are erased).
        let subject = read_stored_from(self.store, &self.tenant, run_id, 0)
            .await?
            .first()
            .and_then(|(_, e)| e.vaulted.clone())
            .ok_or_else(|| {
                FeedbackError::Invalid(format!(
                    "run {run_id} is about no one, yet a correction of it is sealed"
                ))
            })?;
        let run_key = self
            .store
            .run_key(&self.tenant, run_id, &subject, KeyUse::Read)
            .await?;
        for link in history.links.iter_mut().filter(|l| sealed(l)) {
            link.record.correction = match &run_key {
                Some(run_key) => {
                    String::from_utf8_lossy(&run_key.unlock(CORRECTION_LABEL, &link.record.correction)?)
                        .into_owned()
                }
                None => ERASED.into(),
            };
        }
        Ok(history)
    }

    /// The runs that have corrections, at most `limit`.
    pub async fn runs(&self, limit: usize) -> Result<Vec<String>, FeedbackError> {
        Ok(self.chains.owners(limit).await?)
    }
}

/// Entry `seq` of a run as a correction names it: its hash, and its call when it is a call's.
fn about(entries: &[(Hash, crate::records::RecordEntry)], seq: u64) -> Option<AboutEntry> {
    let (hash, entry) = entries.iter().find(|(_, e)| e.seq == seq)?;
    let call_id = entry.body.call_id().map(str::to_owned);
    let tool = call_id.as_ref().and_then(|id| {
        entries.iter().find_map(|(_, e)| match &e.body {
            EntryBody::ToolCallRequested(call) if call.call_id == *id => Some(call.tool.clone()),
            _ => None,
        })
    });
    Some(AboutEntry {
        seq,
        hash: *hash,
        call_id,
        tool,
    })
}

/// People's corrections as insights read them: kept beside a local store (verified here with
/// its key), or served by the gateway service (which verifies them with the tenant's key and
/// serves them only to those who may read the records).
#[derive(Debug)]
pub enum Corrections<'a, S> {
    Local {
        book: FeedbackBook<'a, S>,
        key: &'a PublicKey,
    },
    Gateway(&'a crate::records::store::remote::RemoteStore),
    /// Not read (no key to verify them with).
    Unread,
}

impl<S: RecordStore> Corrections<'_, S> {
    /// The runs that have corrections, at most `limit`.
    pub async fn runs(&self, limit: usize) -> Result<Vec<String>, FeedbackError> {
        match self {
            Self::Local { book, .. } => book.runs(limit).await,
            Self::Gateway(remote) => Ok(remote
                .get_json(&format!("{FEEDBACK_RUNS_PATH}?limit={limit}"))
                .await?),
            Self::Unread => Ok(Vec::new()),
        }
    }

    /// The corrections of `run_id`, oldest first.
    pub async fn of_run(&self, run_id: &str) -> Result<Vec<FeedbackRecord>, FeedbackError> {
        match self {
            Self::Local { book, key } => Ok(book
                .of_run(run_id, key)
                .await?
                .links
                .into_iter()
                .map(|l| l.record)
                .collect()),
            Self::Gateway(remote) => {
                validate_id("run", run_id).map_err(|e| FeedbackError::Invalid(e.to_string()))?;
                Ok(remote.get_json(&format!("{FEEDBACK_PATH}?run={run_id}")).await?)
            }
            Self::Unread => Ok(Vec::new()),
        }
    }
}
