//! The execute phase of a step: the model's calls, in order, each as an envelope through the
//! Tool Gateway — with the run's own tool-call bound, approvals (from a human, or in a replay
//! from the recorded run), and what the model is told of each outcome.

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
    session::ApprovalDecision,
};
use sha2::{Digest as _, Sha256};

use super::{
    aliases,
    checkpoint::{AwaitingApproval, LoopState, UnresolvedCall},
    engine::{Decided, Harness, Mode, Observer, Owned, Progress, RunError},
    input_value, service_tail,
    state::{CallFate, assess},
};
use crate::{
    gateway::{
        CallOutcome, RunProgress,
        envelope::{ApprovalGrant, CallEnvelope, traceparent},
    },
    model::{Message, Role, ToolCallRequest},
    records::{
        EntryBody, RecordStore, Recorder,
        canonical::to_canonical_bytes,
        entry::{PolicyDecisionRecord, ToolResultRecord},
    },
    run_context::SignedRunContext,
};

impl<S: RecordStore> Harness<'_, S> {
    /// Sends the step's pending calls through the gateway, in order.
    pub(super) async fn handle_calls(
        &self,
        recorder: &mut Recorder<'_, S>,
        signed: &SignedRunContext,
        state: &mut LoopState,
        mut decided: Decided,
        observe: Observer<'_>,
    ) -> Result<Owned, RunError> {
        while let Some(pending) = state.pending.first().cloned() {
            if let Some(shown) = &self.bundle.agent_spec.aliases
                && pending.call.tool == aliases::DEREF_TOOL
            {
                // The run's own conversation answers: no tool, no gateway, nothing to record
                // but the message (checkpoints carry it, and a replay answers it the same).
                let (read, reply) = aliases::answer_dereference(
                    &state.messages,
                    &pending.call.arguments,
                    shown.full_for_steps,
                    state.step,
                    signed.context.budget.max_tool_calls,
                );
                let mut message = Message::new(Role::Tool, reply);
                message.tool_call_id = Some(pending.call.id.clone());
                message.read = read;
                state.messages.push(message);
                state.pending.remove(0);
                continue;
            }
            let call_id = format!("{}.{}", state.step, pending.index);
            let envelope = self.envelope(signed, &call_id, &pending.call, &mut decided, state);
            state.awaiting = None;
            state.unresolved = None;
            let outcome = if let Some(remote) = self.remote {
                // The service decides, enforces the run's call budget and records (what the
                // runner staged first); the runner then moves past what it recorded.
                let (tail, prepared) = service_tail::tail_of(recorder).await?;
                let facts = assess(state.step, &state.usage, &signed.context.budget, &state.calls).facts();
                let outcome = remote.call_with(&envelope, &facts, tail).await;
                service_tail::after_answer(recorder, prepared, outcome.is_ok(), remote.take_head()).await?;
                outcome.map_err(RunError::Remote)?
            } else if state.usage.tool_calls >= signed.context.budget.max_tool_calls {
                self.refuse_over_budget(recorder, &envelope, signed).await?
            } else {
                let facts = assess(state.step, &state.usage, &signed.context.budget, &state.calls).facts();
                let progress = RunProgress {
                    steps: state.step,
                    tokens: state.usage.tokens,
                    input: input_value(&self.bundle.session_spec),
                };
                let outcome = self
                    .gateway
                    .handle_in_run(&envelope, recorder, &facts, &progress)
                    .await?;
                if recorder.has_staged() {
                    recorder.flush().await?;
                }
                self.gateway.publish_cached(true);
                outcome
            };
            observe(&Progress::Call {
                step: state.step,
                tool: &envelope.tool,
                outcome: &outcome,
            });
            let mut read = None;
            let (fate, reply) = match &outcome {
                CallOutcome::Executed(result) => {
                    state.usage.tool_calls += 1;
                    let fate = if result.ok {
                        CallFate::Succeeded
                    } else {
                        CallFate::Failed
                    };
                    let reply = result_message(result);
                    if result.ok && self.shows_by_alias(&envelope.tool) {
                        read = aliases::name_result(
                            &state.messages,
                            &envelope.tool,
                            &envelope.arguments,
                            &reply,
                            state.step,
                        );
                    }
                    (fate, reply)
                }
                CallOutcome::OutcomeUnknown {
                    call_id,
                    reason,
                    attestation,
                    for_call,
                    ..
                } => {
                    // The call stays pending: a human's resolution answers it next attempt.
                    return Ok(Owned::OutcomeUnknown(UnresolvedCall {
                        call_id: call_id.clone(),
                        tool: envelope.tool.clone(),
                        arguments: envelope.arguments.clone(),
                        reason: reason.clone(),
                        attestation: attestation.clone(),
                        arguments_digest: None,
                        for_call: for_call.clone(),
                    }));
                }
                CallOutcome::InProgress { call_id } => {
                    return Err(RunError::CallInProgress {
                        call_id: call_id.clone(),
                    });
                }
                // A SpendQuota's refusal (on record, naming it) ends the run: nothing more may be
                // spent under it.
                CallOutcome::Denied { rule, reason } if rule.starts_with(crate::quota::RULE_PREFIX) => {
                    state.note_call(&call_id, &envelope, CallFate::Denied);
                    return Err(RunError::SpendQuota(reason.clone()));
                }
                CallOutcome::Denied { rule, reason } => {
                    (CallFate::Denied, format!("denied by policy ({rule}): {reason}"))
                }
                CallOutcome::NeedsApproval {
                    call_hash,
                    rule,
                    reason,
                    approvers,
                    attestation,
                } => {
                    if matches!(self.mode, Mode::Live) {
                        state.note_call(&call_id, &envelope, CallFate::AwaitingApproval);
                        let awaiting = AwaitingApproval {
                            call_id: call_id.clone(),
                            call_hash: call_hash.clone(),
                            tool: envelope.tool.clone(),
                            arguments: envelope.arguments.clone(),
                            rule: rule.clone(),
                            reason: reason.clone(),
                            approvers: approvers.clone(),
                            attestation: attestation.clone(),
                            arguments_digest: None,
                        };
                        state.awaiting = Some(awaiting);
                        return Ok(Owned::AwaitingApproval(envelope.tool));
                    }
                    (
                        CallFate::AwaitingApproval,
                        format!("needs approval ({rule}): {reason}; the original run had no approval for it"),
                    )
                }
            };
            state.note_call(&call_id, &envelope, fate);
            let mut message = Message::new(Role::Tool, reply);
            message.tool_call_id = Some(pending.call.id.clone());
            message.read = read;
            state.messages.push(message);
            state.pending.remove(0);
            observe(&Progress::Boundary {
                step: state.step,
                after: "tool-call",
            });
        }
        Ok(Owned::Calls)
    }

    /// Whether results of `tool` are shown by alias: the Agent asks for it and the tool only
    /// reads.
    fn shows_by_alias(&self, tool: &str) -> bool {
        self.bundle.agent_spec.aliases.is_some()
            && self
                .bundle
                .agent_spec
                .tools
                .iter()
                .any(|t| t.name == tool && t.risk == ToolRisk::ReadOnly)
    }

    fn envelope(
        &self,
        signed: &SignedRunContext,
        call_id: &str,
        call: &ToolCallRequest,
        decided: &mut Decided,
        state: &LoopState,
    ) -> CallEnvelope {
        let declared = self.bundle.agent_spec.tools.iter().find(|t| t.name == call.tool);
        // An undeclared tool still travels as an envelope: the gateway refuses and records it.
        let (risk, kind) = declared.map_or((ToolRisk::ReadOnly, ToolKind::Observe), |t| (t.risk, t.kind));
        let mut envelope = CallEnvelope {
            call_id: call_id.to_owned(),
            tool: call.tool.clone(),
            arguments: call.arguments.clone(),
            risk,
            kind,
            idempotency_key: idempotency_key(&signed.context.run_id, call_id, call),
            // The step's span when it is traced: the gateway's span for the call is its child.
            traceparent: crate::telemetry::current_traceparent()
                .unwrap_or_else(|| traceparent(&signed.context.trace_id, &signed.context.run_id, call_id)),
            run_context: signed.clone(),
            approval: None,
            resolution: None,
        };
        if matches!(self.mode, Mode::Live) && state.unresolved.as_ref().is_some_and(|u| u.is_for(call_id)) {
            envelope.resolution = decided.resolution.take();
        }
        envelope.approval = match &self.mode {
            Mode::Live => decided
                .grant
                .take()
                .filter(|_| state.awaiting.as_ref().is_some_and(|a| a.call_id == call_id)),
            // The human approved this call in the original run; under a candidate policy the
            // call hash changes, so the approval is re-bound to it.
            Mode::Replay { approvals, .. } => approvals
                .get(call_id)
                .filter(|(_, tool, arguments)| *tool == envelope.tool && *arguments == envelope.arguments)
                .map(|(approver, _, _)| ApprovalGrant {
                    call_hash: envelope.call_hash(&self.gateway.policy_digests()),
                    decision: ApprovalDecision::Approve,
                    approver: approver.clone(),
                    reason: None,
                }),
        };
        envelope
    }

    /// The run's own tool-call budget is a hard bound, enforced before the gateway.
    async fn refuse_over_budget(
        &self,
        recorder: &mut Recorder<'_, S>,
        envelope: &CallEnvelope,
        signed: &SignedRunContext,
    ) -> Result<CallOutcome, RunError> {
        let rule = "run/budget.maxToolCalls".to_owned();
        let reason = format!(
            "the run may make {} tool calls and has made them all",
            signed.context.budget.max_tool_calls
        );
        recorder.stage(EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: envelope.call_id.clone(),
            effect: PolicyEffect::Deny,
            enforced: PolicyEffect::Deny,
            rule: rule.clone(),
            reason: reason.clone(),
            dry_run: false,
        }));
        recorder.flush().await?;
        Ok(CallOutcome::Denied { rule, reason })
    }
}

/// Stable across restarts of the same run: run, call position, tool and arguments.
fn idempotency_key(run_id: &str, call_id: &str, call: &ToolCallRequest) -> String {
    let mut hasher = Sha256::new();
    for part in [run_id.as_bytes(), call_id.as_bytes(), call.tool.as_bytes()] {
        hasher.update(part);
        hasher.update([0]);
    }
    hasher.update(to_canonical_bytes(&call.arguments));
    format!("ctxos-{}", hex::encode(&hasher.finalize()[..16]))
}

/// What the model sees of a call's result.
fn result_message(result: &ToolResultRecord) -> String {
    if !result.ok {
        return format!("error: {}", result.error.as_deref().unwrap_or("the call failed"));
    }
    let body = String::from_utf8_lossy(&to_canonical_bytes(&result.output)).into_owned();
    if result.truncated {
        format!("{body}\n(truncated: the response exceeded the tool's size limit)")
    } else {
        body
    }
}
