//! What a run carries from step to step, and how it is checkpointed and read back: the loop
//! state, its recorded form (the conversation is append-only, so each checkpoint carries only
//! the messages added since the previous one), and what a resumed run needs from its record.

use contextos_crds::common::Approvers;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{
    bundle::RunBundle,
    engine::{RunError, RunOutcome},
    request_text,
    state::{CallFate, CallSeen, Usage},
};
use crate::{
    gateway::envelope::CallEnvelope,
    model::{Message, ModelTurn, Role, ToolCallRequest},
    records::{EntryBody, RecordEntry, canonical::to_canonical_bytes},
    run_context::{RunContext, SignedRunContext},
};

/// A call the run waits on a human for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AwaitingApproval {
    pub call_id: String,
    pub call_hash: String,
    pub tool: String,
    pub arguments: Value,
    pub rule: String,
    pub reason: String,
    pub approvers: Approvers,
    /// The gateway service's signature over the request (see `gateway::approvals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// Digest of the full arguments, when a report had to cut them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
}

/// A call started before an interruption whose result was never recorded, and which the
/// gateway will not send again: the run waits for a human to say whether it acted. Or a call
/// whose remote agent (A2A) asked a question: the run waits for a person's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnresolvedCall {
    pub call_id: String,
    pub tool: String,
    pub arguments: Value,
    pub reason: String,
    /// The gateway service's signature over the report (see `gateway::approvals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// Digest of the full arguments, when a report had to cut them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
    /// For a remote agent's question (`call_id` is then the question's id): the call it
    /// belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_call: Option<String>,
}

impl UnresolvedCall {
    /// Whether this waits on call `call_id` (itself, or a question of its remote agent).
    pub fn is_for(&self, call_id: &str) -> bool {
        self.for_call.as_deref().unwrap_or(&self.call_id) == call_id
    }
}

/// A call of the current step not handled yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingCall {
    /// Position in the model turn.
    pub index: usize,
    pub call: ToolCallRequest,
}

/// The loop state: enough to continue the run exactly where it was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// The step in progress or last completed (1-based; 0 before the first).
    pub step: u32,
    /// The conversation after the compiled context.
    pub messages: Vec<Message>,
    pub usage: Usage,
    pub revisions: u32,
    pub calls: Vec<CallSeen>,
    /// Calls of step `step` still to handle; the first may be awaiting approval.
    #[serde(default)]
    pub pending: Vec<PendingCall>,
    #[serde(default)]
    pub awaiting: Option<AwaitingApproval>,
    /// The first pending call, when its outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<UnresolvedCall>,
}

impl LoopState {
    /// The state before the first step: the request as the first message.
    pub fn initial(bundle: &RunBundle) -> Self {
        Self {
            step: 0,
            messages: vec![Message::new(Role::User, request_text(&bundle.session_spec))],
            usage: Usage::default(),
            revisions: 0,
            calls: Vec::new(),
            pending: Vec::new(),
            awaiting: None,
            unresolved: None,
        }
    }

    /// The checkpoint entry for this state; the first `recorded` messages are already in an
    /// earlier checkpoint.
    pub fn checkpoint(&self, recorded: usize) -> EntryBody {
        let state = CheckpointState {
            step: self.step,
            message_count: self.messages.len(),
            new_messages: self.messages.get(recorded..).unwrap_or_default().to_vec(),
            usage: self.usage.clone(),
            revisions: self.revisions,
            calls: self.calls.clone(),
            pending: self.pending.clone(),
            awaiting: self.awaiting.clone(),
            unresolved: self.unresolved.clone(),
        };
        EntryBody::Checkpoint {
            step: self.step,
            state: serde_json::to_value(&state).unwrap_or(Value::Null),
        }
    }

    /// Folds checkpoints (in chain order) into the state of the last one; `None` when they do
    /// not form one conversation.
    pub fn from_checkpoints(checkpoints: &[CheckpointState]) -> Option<Self> {
        let mut messages = Vec::new();
        for checkpoint in checkpoints {
            if messages.len() + checkpoint.new_messages.len() != checkpoint.message_count {
                return None;
            }
            messages.extend(checkpoint.new_messages.iter().cloned());
        }
        let last = checkpoints.last()?;
        Some(Self {
            step: last.step,
            messages,
            usage: last.usage.clone(),
            revisions: last.revisions,
            calls: last.calls.clone(),
            pending: last.pending.clone(),
            awaiting: last.awaiting.clone(),
            unresolved: last.unresolved.clone(),
        })
    }

    /// Records the fate of a call, replacing an earlier fate of the same call (an approved call
    /// was first seen waiting).
    pub fn note_call(&mut self, call_id: &str, envelope: &CallEnvelope, fate: CallFate) {
        let seen = CallSeen {
            call_id: call_id.to_owned(),
            step: self.step,
            tool: envelope.tool.clone(),
            kind: envelope.kind,
            args: hex::encode(&Sha256::digest(to_canonical_bytes(&envelope.arguments))[..12]),
            fate,
        };
        match self.calls.iter_mut().find(|c| c.call_id == call_id) {
            Some(existing) => *existing = seen,
            None => self.calls.push(seen),
        }
    }
}

/// A checkpoint as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u32,
    /// Messages in the conversation at this checkpoint.
    pub message_count: usize,
    /// The messages added since the previous checkpoint.
    pub new_messages: Vec<Message>,
    pub usage: Usage,
    pub revisions: u32,
    pub calls: Vec<CallSeen>,
    #[serde(default)]
    pub pending: Vec<PendingCall>,
    #[serde(default)]
    pub awaiting: Option<AwaitingApproval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<UnresolvedCall>,
}

/// What resuming needs from a run's record.
#[derive(Debug)]
pub(super) struct Recorded {
    pub run_context: SignedRunContext,
    pub context_digest: String,
    pub state: LoopState,
    pub outcome: Option<RunOutcome>,
    /// A model turn written after the checkpoint whose calls had not all been handled.
    pub turn_in_progress: Option<ModelTurn>,
}

impl Recorded {
    /// The RunContext a run started under (its `run_started` entry).
    pub fn run_context_of(run_id: &str, entries: &[RecordEntry]) -> Result<RunContext, RunError> {
        let corrupt = |problem: String| RunError::Corrupt {
            run_id: run_id.to_owned(),
            problem,
        };
        let value = entries
            .iter()
            .find_map(|e| match &e.body {
                EntryBody::RunStarted { run_context, .. } => Some(run_context),
                _ => None,
            })
            .ok_or_else(|| corrupt("it has no run_started entry".into()))?;
        serde_json::from_value::<SignedRunContext>(value.clone())
            .map(|signed| signed.context)
            .map_err(|e| corrupt(format!("its RunContext cannot be read: {e}")))
    }

    /// Reads a run up to the checkpoint at `checkpoint_seq` (and the turn written after it).
    pub fn read(run_id: &str, entries: &[RecordEntry], checkpoint_seq: u64) -> Result<Self, RunError> {
        let corrupt = |problem: String| RunError::Corrupt {
            run_id: run_id.to_owned(),
            problem,
        };
        let mut run_context = None;
        let mut context_digest = None;
        let mut checkpoints = Vec::new();
        let mut outcome = None;
        let mut turn_in_progress = None;
        for entry in entries {
            match &entry.body {
                EntryBody::RunStarted {
                    run_context: value, ..
                } => {
                    let context = serde_json::from_value::<SignedRunContext>(value.clone())
                        .map_err(|e| corrupt(format!("its RunContext cannot be read: {e}")))?;
                    run_context = Some(context);
                }
                EntryBody::ContextCompiled { digest, .. } => context_digest = Some(digest.clone()),
                EntryBody::Checkpoint { state: value, .. } if entry.seq <= checkpoint_seq => {
                    let checkpoint = serde_json::from_value::<CheckpointState>(value.clone())
                        .map_err(|e| corrupt(format!("checkpoint {} cannot be read: {e}", entry.seq)))?;
                    checkpoints.push(checkpoint);
                }
                EntryBody::ModelTurn { step, response, .. } if entry.seq > checkpoint_seq => {
                    let turn = serde_json::from_value::<ModelTurn>(response.clone())
                        .map_err(|e| corrupt(format!("the model turn of step {step} cannot be read: {e}")))?;
                    turn_in_progress = Some((*step, turn));
                }
                EntryBody::Completed { output, validators } => {
                    outcome = Some(RunOutcome::Completed {
                        output: output.clone(),
                        validators: validators.clone(),
                    });
                }
                EntryBody::Failed { reason, message } => {
                    outcome = Some(RunOutcome::Failed {
                        reason: reason.clone(),
                        message: message.clone(),
                    });
                }
                _ => {}
            }
        }
        let state = LoopState::from_checkpoints(&checkpoints).ok_or_else(|| {
            corrupt(format!(
                "its checkpoints up to entry {checkpoint_seq} do not fold into one conversation"
            ))
        })?;
        let next_step = state.step + 1;
        Ok(Self {
            run_context: run_context.ok_or_else(|| corrupt("it has no run_started entry".into()))?,
            context_digest: context_digest
                .ok_or_else(|| corrupt("it has no context_compiled entry".into()))?,
            turn_in_progress: turn_in_progress
                .filter(|(step, _)| state.pending.is_empty() && *step == next_step)
                .map(|(_, turn)| turn),
            state,
            outcome,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u32, messages: &[&str]) -> LoopState {
        LoopState {
            step,
            messages: messages.iter().map(|m| Message::new(Role::User, *m)).collect(),
            usage: Usage::default(),
            revisions: 0,
            calls: Vec::new(),
            pending: Vec::new(),
            awaiting: None,
            unresolved: None,
        }
    }

    fn recorded(body: EntryBody) -> CheckpointState {
        let EntryBody::Checkpoint { state, .. } = body else {
            panic!("not a checkpoint");
        };
        serde_json::from_value(state).expect("checkpoint state")
    }

    #[test]
    fn checkpoints_carry_only_new_messages_and_fold_back_into_the_conversation() {
        let first = recorded(state(1, &["a", "b"]).checkpoint(0));
        let second = recorded(state(2, &["a", "b", "c"]).checkpoint(2));
        assert_eq!(second.new_messages.len(), 1);
        let folded = LoopState::from_checkpoints(&[first.clone(), second.clone()]).expect("folds");
        assert_eq!(folded, state(2, &["a", "b", "c"]));
        assert!(
            LoopState::from_checkpoints(&[second]).is_none(),
            "a missing checkpoint is detected"
        );
    }
}
