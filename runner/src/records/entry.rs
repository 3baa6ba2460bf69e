//! The typed entries of a DecisionRecord and their hashing.
//!
//! A record is an append-only chain per run: entry `n` carries the hash of entry `n-1`, so
//! changing or removing any entry breaks every later link. Each entry's hash is the SHA-256 of
//! its canonical JSON encoding.

use std::fmt;

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::canonical::to_canonical_bytes;
use crate::consent::SubjectHandle;

/// A SHA-256 hash (of an entry or a blob).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters, optionally prefixed with `sha256:`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Hash::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("not a sha256 hash: {text:?}")))
    }
}

/// Digests a run was pinned to when it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedDigests {
    pub context_pack: String,
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_profile: Option<String>,
}

/// One source's fate in context compilation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceNote {
    pub source: String,
    pub tokens: u64,
    /// Why it was cut or dropped; `None` when included in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<String>,
}

/// A tool call requested by the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    pub call_id: String,
    pub tool: String,
    pub risk: ToolRisk,
    pub kind: ToolKind,
    pub arguments: Value,
    pub idempotency_key: String,
    /// Hash of the exact call envelope and policy digest; approvals bind to it.
    pub call_hash: String,
}

/// The gateway's decision on a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDecisionRecord {
    pub call_id: String,
    /// What the policy decided.
    pub effect: PolicyEffect,
    /// What was applied (differs from `effect` in dryRun mode or when a safety mode tightens).
    pub enforced: PolicyEffect,
    /// `policy/rule`, or `policy/<default>` when no rule matched, or a built-in check name.
    pub rule: String,
    pub reason: String,
    pub dry_run: bool,
}

/// The outcome of executing a call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResultRecord {
    pub call_id: String,
    pub ok: bool,
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    #[serde(default)]
    pub truncated: bool,
    /// What the call cost, at the price its tool had when the run started (none: the tool has
    /// no price). Charged once a call was sent, whatever it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::pricing::TurnCost>,
    /// Answered from the gateway's cache (a read-only tool's `cache`): the call whose result
    /// this is. The tool was not reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<CachedRead>,
}

/// Where a cached result came from: the call that reached the tool, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRead {
    pub run_id: String,
    pub call_id: String,
    pub fetched_at_ms: i64,
}

/// The critic's verdict after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Continue,
    Revise,
    Halt,
    Escalate,
}

/// Why a model was paid for tokens that no model turn on record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnansweredSpend {
    /// The step was asked of two gateway replicas at once and the other's answer was recorded
    /// first: this one was dropped (one step has one answer on record), its tokens were not.
    TurnDropped,
    /// The model was cut off after the request was sent (it timed out generating, say), so it
    /// may have cost what it could: counted at the prompt as estimated and the output limit of
    /// the model's own spec, if it sets one.
    CutOff,
}

impl std::fmt::Display for UnansweredSpend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TurnDropped => "an answer dropped: another gateway replica recorded the step's turn first",
            Self::CutOff => "cut off after it was asked",
        })
    }
}

/// What one entry says. Every variant is a fact about the run at that point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryBody {
    /// The run began under this signed RunContext and these pinned revisions.
    RunStarted {
        session_id: String,
        agent: String,
        run_context: Value,
        pinned: PinnedDigests,
        /// Blob holding the run bundle (every pinned spec), so the run can be replayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bundle: Option<Hash>,
    },
    /// The context the model saw: its digest, size, and what was cut.
    ContextCompiled {
        digest: String,
        tokens: u64,
        budget: u64,
        sources: Vec<SourceNote>,
    },
    /// One model request/response.
    ModelTurn {
        step: u32,
        model: String,
        response: Value,
        prompt_tokens: u64,
        completion_tokens: u64,
        /// Of the prompt tokens, those the endpoint served from its cache.
        #[serde(default, skip_serializing_if = "is_zero")]
        cached_prompt_tokens: u64,
        /// What the turn cost, at the price the run pinned (none: the run had no price).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<crate::pricing::TurnCost>,
    },
    /// Tokens a model was paid for on this run that no model turn on record holds, written by
    /// the gateway: they count against the run's `maxTokens` as a turn's do, so asking twice
    /// is never free (see [`UnansweredSpend`]).
    ModelSpend {
        /// The step the model was asked for.
        step: u32,
        /// The model paid.
        model: String,
        tokens: u64,
        reason: UnansweredSpend,
        /// What it cost, at the price the run pinned for that model (none: no price).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<crate::pricing::TurnCost>,
    },
    /// The model asked for a tool call.
    ToolCallRequested(ToolCallRecord),
    /// The gateway decided on it.
    PolicyDecision(PolicyDecisionRecord),
    /// A human must approve the call first.
    ApprovalRequested {
        call_id: String,
        call_hash: String,
        approvers: Vec<String>,
    },
    /// A human said whether a call whose outcome was unknown acted; its result follows.
    CallResolved {
        call_id: String,
        outcome: contextos_crds::session::ResolvedOutcome,
        resolver: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// A remote agent (A2A) stopped the call's task to ask for input: the Session waits for a
    /// person's answer (a resolution naming `question_id`, outcome `answered`), which continues
    /// the same task; declined (`did_not_act`), the task is cancelled.
    RemoteInputRequired {
        call_id: String,
        /// `<call id>.q<n>`, the n-th question of the call.
        question_id: String,
        task: crate::gateway::adapters::a2a::RemoteTask,
        question: String,
        /// The id of the remote agent's message that asked it, when it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        /// The call's price, with its first question: it went out (its result then costs
        /// nothing more).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<crate::pricing::TurnCost>,
    },
    /// A human approved it.
    ApprovalGranted {
        call_id: String,
        call_hash: String,
        approver: String,
        /// The approver's note (`spec.approvals[].reason`), when they gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A human refused it, or an approval did not match the call.
    ApprovalRefused {
        call_id: String,
        call_hash: String,
        approver: String,
        reason: String,
    },
    /// What the tool returned.
    ToolResult(ToolResultRecord),
    /// A call exhausted its retries (or could not be attempted) and was set aside for a human.
    DeadLettered {
        call_id: String,
        tool: String,
        idempotency_key: String,
        attempts: u32,
        error: String,
    },
    /// The critic's verdict and the Functional State it read.
    CriticVerdict {
        step: u32,
        verdict: Verdict,
        reason: String,
        functional_state: Value,
    },
    /// Enough state to resume after this step.
    Checkpoint { step: u32, state: Value },
    /// The run produced an accepted output.
    Completed { output: String, validators: Vec<String> },
    /// The run ended without an accepted output.
    Failed { reason: String, message: String },
    /// The gateway service refused a request from this run's pod (e.g. a RunContext it was not
    /// issued, or another run's records): who asked, and why it was refused.
    AccessRefused { caller: String, reason: String },
    /// Memory recalled for the run (a ContextPack memory source, or a `recall` call): which
    /// items were offered, which were held back and why, and what the run was given.
    MemoryRecalled(crate::memory::desk::RecallRecord),
    /// A `remember` call's candidate and the decision on it, with its reason.
    MemoryCandidate(crate::memory::desk::CandidateRecord),
    /// The tools a model turn was offered (an Agent with `spec.discovery`), how they were
    /// scored, and which were held back: a replay offers the same.
    ToolsOffered {
        step: u32,
        scoring: crate::discovery::Scoring,
        selection: crate::discovery::select::Selection,
    },
    /// The body was larger than the inline threshold and is stored as a blob.
    Blob {
        blob: Hash,
        size: u64,
        body_type: String,
    },
}

impl EntryBody {
    /// The `type` tag, e.g. `tool_result`.
    /// The call the entry belongs to, when it is a call's.
    pub fn call_id(&self) -> Option<&str> {
        match self {
            Self::ToolCallRequested(call) => Some(&call.call_id),
            Self::PolicyDecision(d) => Some(&d.call_id),
            Self::ToolResult(r) => Some(&r.call_id),
            Self::ApprovalRequested { call_id, .. }
            | Self::ApprovalGranted { call_id, .. }
            | Self::ApprovalRefused { call_id, .. }
            | Self::DeadLettered { call_id, .. }
            | Self::RemoteInputRequired { call_id, .. } => Some(call_id),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::RunStarted { .. } => "run_started",
            Self::ContextCompiled { .. } => "context_compiled",
            Self::ModelTurn { .. } => "model_turn",
            Self::ModelSpend { .. } => "model_spend",
            Self::ToolCallRequested(_) => "tool_call_requested",
            Self::PolicyDecision(_) => "policy_decision",
            Self::ApprovalRequested { .. } => "approval_requested",
            Self::CallResolved { .. } => "call_resolved",
            Self::RemoteInputRequired { .. } => "remote_input_required",
            Self::ApprovalGranted { .. } => "approval_granted",
            Self::ApprovalRefused { .. } => "approval_refused",
            Self::ToolResult(_) => "tool_result",
            Self::DeadLettered { .. } => "dead_lettered",
            Self::CriticVerdict { .. } => "critic_verdict",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
            Self::AccessRefused { .. } => "access_refused",
            Self::MemoryRecalled(_) => "memory_recalled",
            Self::ToolsOffered { .. } => "tools_offered",
            Self::MemoryCandidate(_) => "memory_candidate",
            Self::Blob { .. } => "blob",
        }
    }
}

/// One link of a run's chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordEntry {
    pub run_id: String,
    /// Position in the chain, from 0.
    pub seq: u64,
    /// Hash of entry `seq - 1`; absent for the first entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Hash>,
    /// Milliseconds since the Unix epoch when the entry was written.
    pub at_ms: i64,
    pub body: EntryBody,
    /// The person the run is about, when it is about one: then what the body says of them is
    /// encrypted under the run's key from that person's data key (see [`super::vaulted`]), and
    /// this entry's hash is of that ciphertext — it verifies after they are erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vaulted: Option<SubjectHandle>,
}

impl EntryBody {
    /// The canonical bytes of the body alone.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain data types cannot fail (no maps with non-string keys).
        to_canonical_bytes(&serde_json::to_value(self).unwrap_or(Value::Null))
    }
}

/// Where an entry sits in its run's chain, and what its body is encrypted for.
#[derive(Clone, Copy, Debug)]
pub struct Position<'a> {
    pub run_id: &'a str,
    pub seq: u64,
    pub prev: Option<&'a Hash>,
    pub at_ms: i64,
    pub vaulted: Option<&'a SubjectHandle>,
}

/// Canonical entry bytes around an already-encoded body. Writing the envelope directly (its
/// keys in byte order: at_ms, body, prev, run_id, seq, vaulted) lets the recorder encode each
/// body once; a test pins it to the generic canonical encoding.
pub fn encode_parts(position: Position<'_>, body: &[u8]) -> Vec<u8> {
    let Position {
        run_id,
        seq,
        prev,
        at_ms,
        vaulted,
    } = position;
    let mut out = Vec::with_capacity(body.len() + 192);
    out.extend_from_slice(b"{\"at_ms\":");
    out.extend_from_slice(at_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"body\":");
    out.extend_from_slice(body);
    if let Some(prev) = prev {
        out.extend_from_slice(b",\"prev\":\"");
        out.extend_from_slice(prev.to_hex().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"run_id\":");
    out.extend_from_slice(Value::String(run_id.to_owned()).to_string().as_bytes());
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    if let Some(subject) = vaulted {
        out.extend_from_slice(b",\"vaulted\":");
        out.extend_from_slice(Value::String(subject.as_str().to_owned()).to_string().as_bytes());
    }
    out.push(b'}');
    out
}

impl RecordEntry {
    /// The canonical bytes that are stored and hashed.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(
            Position {
                run_id: &self.run_id,
                seq: self.seq,
                prev: self.prev.as_ref(),
                at_ms: self.at_ms,
                vaulted: self.vaulted.as_ref(),
            },
            &self.body.encode(),
        )
    }

    /// Decodes stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// An entry as stored: its canonical bytes and the hash recorded for them at write time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    pub seq: u64,
    pub hash: Hash,
    pub bytes: Vec<u8>,
}

impl StoredEntry {
    /// Seals an entry: encodes it and computes its hash.
    pub fn seal(entry: &RecordEntry) -> Self {
        Self::from_bytes(entry.seq, entry.encode())
    }

    /// Seals already-encoded entry bytes.
    pub fn from_bytes(seq: u64, bytes: Vec<u8>) -> Self {
        Self {
            seq,
            hash: Hash::of(&bytes),
            bytes,
        }
    }

    /// The on-disk value: 32 hash bytes followed by the canonical entry.
    pub fn to_value_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.bytes.len());
        out.extend_from_slice(&self.hash.0);
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Splits an on-disk value; `None` when it is too short to hold a hash.
    pub fn from_value_bytes(seq: u64, value: &[u8]) -> Option<Self> {
        if value.len() < 32 {
            return None;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&value[..32]);
        Some(Self {
            seq,
            hash: Hash(hash),
            bytes: value[32..].to_vec(),
        })
    }
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, prev: Option<Hash>) -> RecordEntry {
        RecordEntry {
            run_id: "run-1".into(),
            seq,
            prev,
            at_ms: 1_700_000_000_000,
            body: EntryBody::Failed {
                reason: "Test".into(),
                message: "m".into(),
            },
            vaulted: None,
        }
    }

    #[test]
    fn encoding_round_trips_and_is_stable() {
        let e = entry(1, Some(Hash::of(b"x")));
        let bytes = e.encode();
        assert_eq!(RecordEntry::decode(&bytes).expect("decodes"), e);
        assert_eq!(bytes, RecordEntry::decode(&bytes).expect("decodes").encode());
    }

    #[test]
    fn any_field_change_changes_the_hash() {
        let a = StoredEntry::seal(&entry(1, None));
        let mut changed = entry(1, None);
        changed.at_ms += 1;
        assert_ne!(a.hash, StoredEntry::seal(&changed).hash);
    }

    #[test]
    fn envelope_writer_matches_the_generic_canonical_encoding() {
        let mut vaulted = entry(3, Some(Hash::of(b"q")));
        vaulted.vaulted = Some(SubjectHandle::new("subj:ann").expect("handle"));
        for e in [entry(0, None), entry(7, Some(Hash::of(b"p"))), vaulted] {
            let generic = to_canonical_bytes(&serde_json::to_value(&e).expect("json"));
            assert_eq!(e.encode(), generic);
        }
    }

    #[test]
    fn value_bytes_round_trip() {
        let sealed = StoredEntry::seal(&entry(0, None));
        let back = StoredEntry::from_value_bytes(0, &sealed.to_value_bytes()).expect("long enough");
        assert_eq!(back, sealed);
        assert!(StoredEntry::from_value_bytes(0, &[1, 2, 3]).is_none());
    }

    #[test]
    fn hash_parses_with_and_without_prefix() {
        let h = Hash::of(b"abc");
        assert_eq!(Hash::parse(&h.to_hex()), Some(h));
        assert_eq!(Hash::parse(&format!("sha256:{h}")), Some(h));
        assert_eq!(Hash::parse("nothex"), None);
    }
}
