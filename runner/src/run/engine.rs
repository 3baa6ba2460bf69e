//! The decision loop of one run: plan (a model turn) → execute (every call through the Tool
//! Gateway) → critic (Functional State, validators, verdict) → checkpoint, step after step,
//! until the critic ends the run, a call waits for approval, or a bound is hit.
//!
//! Crash safety: a model turn that asked for tools is written before any of them runs, and a
//! resumed run reuses it; calls carry idempotency keys derived from the run, step and call, and
//! the gateway answers calls it already executed from the record. So a run killed at any point
//! and resumed ends with the same decisions and no duplicate effects.

use std::{collections::HashMap, time::Instant};

use contextos_crds::{
    common::{Approvers, ToolKind, ToolRisk},
    policy::PolicyEffect,
    session::ApprovalDecision,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{
    bundle::RunBundle,
    critic::{self, Ending, Judgement, Review, StepResult},
    input_value, issue_run_context, reissue_run_context, request_text,
    state::{CallFate, CallSeen, Usage, assess},
    validate::{self, CompiledValidator, ValidatorError},
};
use crate::{
    context::{self, CompileError, CompiledContext},
    gateway::{
        CallOutcome, GatewayError, RunProgress, ToolGateway,
        envelope::{ApprovalGrant, CallEnvelope, traceparent},
    },
    keys::KeyPair,
    model::{Message, Model, ModelError, ModelRequest, ModelTurn, Role, ToolCallRequest, ToolSpec},
    records::{
        EntryBody, Hash, ReadError, RecordEntry, RecordError, RecordStore, Recorder, RunStart, StoreError,
        TenantId,
        canonical::{canonical_bytes_of, to_canonical_bytes},
        entry::{PolicyDecisionRecord, Verdict},
        read_run,
        recorder::now_ms,
    },
    run_context::{OverrideError, SignedRunContext},
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
}

/// A call of the current step not handled yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingCall {
    /// Position in the model turn.
    pub index: usize,
    pub call: ToolCallRequest,
}

/// What a checkpoint holds: enough to continue the run exactly where it was.
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
}

/// How a run ended (or paused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RunOutcome {
    Completed { output: String, validators: Vec<String> },
    Failed { reason: String, message: String },
    AwaitingApproval(AwaitingApproval),
}

/// The result of starting or resuming a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunReport {
    pub run_id: String,
    pub session: String,
    pub outcome: RunOutcome,
    pub steps: u32,
    pub usage: Usage,
    /// Hash of the newest record entry.
    pub head: Option<Hash>,
}

/// What the loop reports as it goes (for terminals, logs and fault-injection tests).
#[derive(Debug)]
pub enum Progress<'a> {
    Started {
        run_id: &'a str,
        session: &'a str,
        resumed: bool,
    },
    Context {
        tokens: u64,
        budget: u64,
        cut: usize,
    },
    Turn {
        step: u32,
        content: &'a str,
        calls: usize,
        reused: bool,
    },
    Call {
        step: u32,
        tool: &'a str,
        outcome: &'a CallOutcome,
    },
    Verdict {
        step: u32,
        verdict: Verdict,
        reason: &'a str,
    },
    /// Everything before this point is durable; a crash here resumes from it.
    Boundary {
        step: u32,
        after: &'static str,
    },
}

/// Why a run could not go on. Everything else (denials, validation failures, budgets) is an
/// outcome recorded in the run, not an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("Session {session}: {0}", session = .1)]
    Override(OverrideError, String),
    #[error(transparent)]
    Validator(#[from] ValidatorError),
    #[error("session {session} has no run to resume in tenant {tenant}; start it with `contextos run`")]
    NoRun { tenant: String, session: String },
    #[error("run {run_id}: {problem}")]
    Corrupt { run_id: String, problem: String },
    #[error(
        "run {run_id} was compiled to context {recorded} but the bundle now compiles to {now}; a run resumes only under the specs it was pinned to"
    )]
    BundleChanged {
        run_id: String,
        recorded: String,
        now: String,
    },
}

/// Replays differ from live runs in where model turns, results, approvals and time come from.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    #[default]
    Live,
    Replay {
        /// Approvers the original run had, by call id.
        approvals: HashMap<String, String>,
        /// Wall time the original run had used at each step.
        wall_ms: HashMap<u32, u64>,
    },
}

/// Runs one Session's bundle.
#[derive(Debug)]
pub struct Harness<'s, S> {
    store: &'s S,
    tenant: TenantId,
    key: KeyPair,
    bundle: RunBundle,
    gateway: ToolGateway,
    model: Model,
    validators: Vec<CompiledValidator>,
    tools: Vec<ToolSpec>,
    mode: Mode,
    clock: fn() -> i64,
}

type Observer<'o> = &'o mut (dyn FnMut(&Progress<'_>) + Send);

impl<'s, S: RecordStore> Harness<'s, S> {
    /// A harness for `bundle` whose calls go through `gateway` (which must trust `key`).
    pub fn new(
        store: &'s S,
        key: KeyPair,
        bundle: RunBundle,
        gateway: ToolGateway,
        model: Model,
    ) -> Result<Self, RunError> {
        let tenant = TenantId::new(bundle.tenant.clone())?;
        let validators = validate::compile(&bundle.agent, &bundle.agent_spec.validators)?;
        let tools = bundle
            .agent_spec
            .tools
            .iter()
            .map(|t| ToolSpec {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t
                    .input_schema
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({"type": "object"})),
            })
            .collect();
        Ok(Self {
            store,
            tenant,
            key,
            bundle,
            gateway,
            model,
            validators,
            tools,
            mode: Mode::Live,
            clock: now_ms,
        })
    }

    /// Replay mode (see [`Mode::Replay`]).
    pub fn replaying(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// A fixed clock for record timestamps (replays).
    pub fn with_clock(mut self, clock: fn() -> i64) -> Self {
        self.clock = clock;
        self
    }

    pub fn bundle(&self) -> &RunBundle {
        &self.bundle
    }

    /// Starts a new run of the Session as `run_id` under W3C trace `trace_id`.
    pub async fn start(
        &self,
        run_id: &str,
        trace_id: &str,
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let signed = issue_run_context(&self.bundle, run_id, trace_id, &self.key, (self.clock)())
            .map_err(|e| RunError::Override(e, self.bundle.session.clone()))?;
        let bundle_bytes = canonical_bytes_of(&self.bundle).unwrap_or_default();
        let bundle_blob = self.store.put_blob(&self.tenant, bundle_bytes).await?;
        let start = RunStart {
            run_id: run_id.to_owned(),
            session_id: self.bundle.session.clone(),
            agent: self.bundle.agent.clone(),
            run_context: serde_json::to_value(&signed).unwrap_or(Value::Null),
            pinned: self.bundle.pinned(),
            bundle: Some(bundle_blob),
        };
        let mut recorder = Recorder::start(self.store, self.tenant.clone(), self.key.clone(), start)
            .await?
            .with_clock(self.clock);
        observe(&Progress::Started {
            run_id,
            session: &self.bundle.session,
            resumed: false,
        });
        let compiled = match self.compile() {
            Ok(compiled) => compiled,
            Err(e) => {
                let outcome = RunOutcome::Failed {
                    reason: "ContextDoesNotFit".into(),
                    message: e.to_string(),
                };
                recorder.stage(EntryBody::Failed {
                    reason: "ContextDoesNotFit".into(),
                    message: e.to_string(),
                });
                recorder.flush().await?;
                return Ok(self.report(&recorder, outcome, &initial_state(&self.bundle)));
            }
        };
        recorder.stage(EntryBody::ContextCompiled {
            digest: compiled.digest.clone(),
            tokens: compiled.tokens,
            budget: compiled.budget,
            sources: compiled.sources.clone(),
        });
        observe(&Progress::Context {
            tokens: compiled.tokens,
            budget: compiled.budget,
            cut: compiled.sources.iter().filter(|s| s.cut.is_some()).count(),
        });
        let state = initial_state(&self.bundle);
        recorder.stage(checkpoint(&state));
        recorder.flush().await?;
        observe(&Progress::Boundary {
            step: 0,
            after: "start",
        });
        self.drive(&mut recorder, &signed, &compiled, state, None, None, observe)
            .await
    }

    /// Resumes the Session's run from its latest checkpoint. `approvals` are the decisions
    /// humans made (Session `spec.approvals`); a run waiting for one that is not there stays
    /// paused and nothing is written.
    pub async fn resume(
        &self,
        approvals: &[ApprovalGrant],
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let no_run = || RunError::NoRun {
            tenant: self.tenant.to_string(),
            session: self.bundle.session.clone(),
        };
        let checkpoint = self
            .store
            .latest_checkpoint(&self.tenant, &self.bundle.session)
            .await?
            .ok_or_else(no_run)?;
        let run_id = checkpoint.run_id.clone();
        let entries: Vec<RecordEntry> = read_run(self.store, &self.tenant, &run_id)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let recorded = Recorded::read(&run_id, &entries, checkpoint.seq)?;
        let mut recorder = Recorder::resume(self.store, self.tenant.clone(), self.key.clone(), &run_id)
            .await?
            .with_clock(self.clock);
        if let Some(outcome) = recorded.outcome.clone() {
            return Ok(self.report(&recorder, outcome, &recorded.state));
        }
        let compiled = self.compile().map_err(|e| RunError::Corrupt {
            run_id: run_id.clone(),
            problem: format!("its pinned context no longer compiles: {e}"),
        })?;
        if compiled.digest != recorded.context_digest {
            return Err(RunError::BundleChanged {
                run_id,
                recorded: recorded.context_digest,
                now: compiled.digest,
            });
        }
        let mut grant = None;
        if let Some(awaiting) = &recorded.state.awaiting {
            match approvals.iter().find(|a| a.call_hash == awaiting.call_hash) {
                Some(approval) => grant = Some(approval.clone()),
                None => {
                    let outcome = RunOutcome::AwaitingApproval(awaiting.clone());
                    return Ok(self.report(&recorder, outcome, &recorded.state));
                }
            }
        }
        self.gateway.restore(&entries);
        let signed = reissue_run_context(&recorded.run_context.context, &self.key, (self.clock)());
        observe(&Progress::Started {
            run_id: &run_id,
            session: &self.bundle.session,
            resumed: true,
        });
        self.drive(
            &mut recorder,
            &signed,
            &compiled,
            recorded.state,
            grant,
            recorded.turn_in_progress,
            observe,
        )
        .await
    }

    fn compile(&self) -> Result<CompiledContext, CompileError> {
        context::compile(
            &self.bundle.context_pack.spec,
            &self.bundle.resolved_sources(),
            &request_text(&self.bundle.session_spec),
            &[],
        )
    }

    /// Steps until the critic ends or pauses the run.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &self,
        recorder: &mut Recorder<'_, S>,
        signed: &SignedRunContext,
        compiled: &CompiledContext,
        mut state: LoopState,
        mut grant: Option<ApprovalGrant>,
        mut turn_in_progress: Option<ModelTurn>,
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let wall_base = state.usage.wall_ms;
        loop {
            let result = if state.pending.is_empty() {
                state.step += 1;
                let reused = turn_in_progress.is_some();
                let turn = match turn_in_progress.take() {
                    Some(turn) => turn,
                    None => match self.ask_model(compiled, &state).await {
                        Ok(turn) => turn,
                        Err(e) => return self.model_failed(recorder, e, &state).await,
                    },
                };
                self.take_turn(recorder, &mut state, &turn, reused, observe)
                    .await?
            } else {
                Owned::Calls
            };
            let result = match result {
                Owned::Calls => {
                    self.handle_calls(recorder, signed, &mut state, grant.take(), observe)
                        .await?
                }
                answer => answer,
            };
            state.usage.wall_ms = self.wall_ms(state.step, wall_base, started);
            let judgement = self.judge(&state, &result);
            observe(&Progress::Verdict {
                step: state.step,
                verdict: judgement.verdict,
                reason: &judgement.reason,
            });
            if let Some(feedback) = &judgement.feedback {
                state.revisions += 1;
                state.messages.push(Message::new(Role::User, feedback.clone()));
            }
            recorder.stage(EntryBody::CriticVerdict {
                step: state.step,
                verdict: judgement.verdict,
                reason: judgement.reason.clone(),
                functional_state: serde_json::to_value(assess(
                    state.step,
                    &state.usage,
                    &signed.context.budget,
                    &state.calls,
                ))
                .unwrap_or(Value::Null),
            });
            recorder.stage(checkpoint(&state));
            let outcome = ending_outcome(&judgement, &state);
            match &outcome {
                Some(RunOutcome::Completed { output, validators }) => recorder.stage(EntryBody::Completed {
                    output: output.clone(),
                    validators: validators.clone(),
                }),
                Some(RunOutcome::Failed { reason, message }) => recorder.stage(EntryBody::Failed {
                    reason: reason.clone(),
                    message: message.clone(),
                }),
                _ => {}
            }
            recorder.flush().await?;
            observe(&Progress::Boundary {
                step: state.step,
                after: "checkpoint",
            });
            if let Some(outcome) = outcome {
                return Ok(self.report(recorder, outcome, &state));
            }
        }
    }

    async fn ask_model(
        &self,
        compiled: &CompiledContext,
        state: &LoopState,
    ) -> Result<ModelTurn, ModelError> {
        let mut messages = Vec::with_capacity(state.messages.len() + 1);
        messages.push(Message::new(Role::System, compiled.text.clone()));
        messages.extend(state.messages.iter().cloned());
        let request = ModelRequest {
            model: self.bundle.agent_spec.model.model.clone(),
            messages,
            tools: self.tools.clone(),
            max_output_tokens: self.bundle.agent_spec.model.max_output_tokens,
        };
        self.model.complete(&request, state.step).await
    }

    /// A model that cannot answer for good (a script or a replay that ran out) ends the run; an
    /// unreachable endpoint is an error, so the attempt can be retried and resume.
    async fn model_failed(
        &self,
        recorder: &mut Recorder<'_, S>,
        error: ModelError,
        state: &LoopState,
    ) -> Result<RunReport, RunError> {
        let reason = match &error {
            ModelError::ScriptExhausted { .. } | ModelError::BadScript { .. } => "ModelScriptExhausted",
            ModelError::NotRecorded { .. } => "ReplayExhausted",
            _ if matches!(self.mode, Mode::Replay { .. }) => "ReplayExhausted",
            _ => return Err(error.into()),
        };
        recorder.stage(EntryBody::Failed {
            reason: reason.into(),
            message: error.to_string(),
        });
        recorder.flush().await?;
        let outcome = RunOutcome::Failed {
            reason: reason.into(),
            message: error.to_string(),
        };
        Ok(self.report(recorder, outcome, state))
    }

    /// Records a model turn and adds it to the conversation. A turn that asks for tools is made
    /// durable first, so a crash while they run resumes with the same calls.
    async fn take_turn(
        &self,
        recorder: &mut Recorder<'_, S>,
        state: &mut LoopState,
        turn: &ModelTurn,
        reused: bool,
        observe: Observer<'_>,
    ) -> Result<Owned, RunError> {
        if !reused {
            recorder.stage(EntryBody::ModelTurn {
                step: state.step,
                model: self.bundle.agent_spec.model.model.clone(),
                response: serde_json::to_value(turn).unwrap_or(Value::Null),
                prompt_tokens: turn.prompt_tokens,
                completion_tokens: turn.completion_tokens,
            });
            if !turn.tool_calls.is_empty() {
                recorder.flush().await?;
            }
        }
        observe(&Progress::Turn {
            step: state.step,
            content: &turn.content,
            calls: turn.tool_calls.len(),
            reused,
        });
        state.usage.steps = state.step;
        state.usage.tokens += turn.prompt_tokens + turn.completion_tokens;
        let mut message = Message::new(Role::Assistant, turn.content.clone());
        message.tool_calls = turn.tool_calls.clone();
        state.messages.push(message);
        if turn.tool_calls.is_empty() {
            return Ok(Owned::Answer(turn.content.clone()));
        }
        observe(&Progress::Boundary {
            step: state.step,
            after: "model-turn",
        });
        state.pending = turn
            .tool_calls
            .iter()
            .cloned()
            .enumerate()
            .map(|(index, call)| PendingCall { index, call })
            .collect();
        Ok(Owned::Calls)
    }

    /// Sends the step's pending calls through the gateway, in order.
    async fn handle_calls(
        &self,
        recorder: &mut Recorder<'_, S>,
        signed: &SignedRunContext,
        state: &mut LoopState,
        mut grant: Option<ApprovalGrant>,
        observe: Observer<'_>,
    ) -> Result<Owned, RunError> {
        while let Some(pending) = state.pending.first().cloned() {
            let call_id = format!("{}.{}", state.step, pending.index);
            let envelope = self.envelope(signed, &call_id, &pending.call, &mut grant, state);
            state.awaiting = None;
            let outcome = if state.usage.tool_calls >= signed.context.budget.max_tool_calls {
                self.refuse_over_budget(recorder, &envelope, signed).await?
            } else {
                let facts = assess(state.step, &state.usage, &signed.context.budget, &state.calls).facts();
                let progress = RunProgress {
                    steps: state.step,
                    tokens: state.usage.tokens,
                    input: input_value(&self.bundle.session_spec),
                };
                self.gateway
                    .handle_in_run(&envelope, recorder, &facts, &progress)
                    .await?
            };
            observe(&Progress::Call {
                step: state.step,
                tool: &envelope.tool,
                outcome: &outcome,
            });
            let (fate, reply) = match &outcome {
                CallOutcome::Executed(result) => {
                    state.usage.tool_calls += 1;
                    let fate = if result.ok {
                        CallFate::Succeeded
                    } else {
                        CallFate::Failed
                    };
                    (fate, result_message(result))
                }
                CallOutcome::Denied { rule, reason } => {
                    (CallFate::Denied, format!("denied by policy ({rule}): {reason}"))
                }
                CallOutcome::NeedsApproval {
                    call_hash,
                    rule,
                    reason,
                    approvers,
                } => {
                    if matches!(self.mode, Mode::Live) {
                        note_call(state, &call_id, &envelope, CallFate::AwaitingApproval);
                        let awaiting = AwaitingApproval {
                            call_id: call_id.clone(),
                            call_hash: call_hash.clone(),
                            tool: envelope.tool.clone(),
                            arguments: envelope.arguments.clone(),
                            rule: rule.clone(),
                            reason: reason.clone(),
                            approvers: approvers.clone(),
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
            note_call(state, &call_id, &envelope, fate);
            let mut message = Message::new(Role::Tool, reply);
            message.tool_call_id = Some(pending.call.id.clone());
            state.messages.push(message);
            state.pending.remove(0);
            observe(&Progress::Boundary {
                step: state.step,
                after: "tool-call",
            });
        }
        Ok(Owned::Calls)
    }

    fn envelope(
        &self,
        signed: &SignedRunContext,
        call_id: &str,
        call: &ToolCallRequest,
        grant: &mut Option<ApprovalGrant>,
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
            traceparent: traceparent(&signed.context.trace_id, call_id),
            run_context: signed.clone(),
            approval: None,
        };
        envelope.approval = match &self.mode {
            Mode::Live => grant
                .take()
                .filter(|_| state.awaiting.as_ref().is_some_and(|a| a.call_id == call_id)),
            // The human approved this call in the original run; under a candidate policy the
            // call hash changes, so the approval is re-bound to it.
            Mode::Replay { approvals, .. } => approvals.get(call_id).map(|approver| ApprovalGrant {
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

    fn judge(&self, state: &LoopState, result: &Owned) -> Judgement {
        let budget = &self.bundle_budget();
        let functional = assess(state.step, &state.usage, budget, &state.calls);
        let validation;
        let step_result = match result {
            Owned::Calls => StepResult::Calls,
            Owned::AwaitingApproval(tool) => StepResult::AwaitingApproval { tool },
            Owned::Answer(output) => {
                validation = validate::check(&self.validators, output);
                StepResult::Answer {
                    output,
                    validation: &validation,
                }
            }
        };
        critic::review(&Review {
            state: &functional,
            spec: &self.bundle.agent_spec.critic,
            result: step_result,
            revisions_used: state.revisions,
            has_evidence_tools: self
                .bundle
                .agent_spec
                .tools
                .iter()
                .any(|t| matches!(t.kind, ToolKind::Observe | ToolKind::Recall | ToolKind::Verify)),
        })
    }

    fn bundle_budget(&self) -> contextos_crds::common::RunBudget {
        let agent = &self.bundle.agent_spec;
        super::super::run_context::effective_limits(
            &agent.budget,
            agent.safety_mode,
            self.bundle.session_spec.overrides.as_ref(),
        )
        .map(|(budget, _)| budget)
        .unwrap_or_else(|_| agent.budget.clone())
    }

    fn wall_ms(&self, step: u32, base: u64, started: Instant) -> u64 {
        match &self.mode {
            Mode::Live => base + started.elapsed().as_millis() as u64,
            Mode::Replay { wall_ms, .. } => wall_ms.get(&step).copied().unwrap_or(base),
        }
    }

    fn report(&self, recorder: &Recorder<'_, S>, outcome: RunOutcome, state: &LoopState) -> RunReport {
        RunReport {
            run_id: recorder.run_id().to_owned(),
            session: self.bundle.session.clone(),
            outcome,
            steps: state.step,
            usage: state.usage.clone(),
            head: recorder.head().map(|(_, hash)| hash),
        }
    }
}

/// A step's result before the critic reads it.
#[derive(Debug)]
enum Owned {
    Calls,
    AwaitingApproval(String),
    Answer(String),
}

fn initial_state(bundle: &RunBundle) -> LoopState {
    LoopState {
        step: 0,
        messages: vec![Message::new(Role::User, request_text(&bundle.session_spec))],
        usage: Usage::default(),
        revisions: 0,
        calls: Vec::new(),
        pending: Vec::new(),
        awaiting: None,
    }
}

fn checkpoint(state: &LoopState) -> EntryBody {
    EntryBody::Checkpoint {
        step: state.step,
        state: serde_json::to_value(state).unwrap_or(Value::Null),
    }
}

fn ending_outcome(judgement: &Judgement, state: &LoopState) -> Option<RunOutcome> {
    match judgement.ending.as_ref()? {
        Ending::Accepted { output, validators } => Some(RunOutcome::Completed {
            output: output.clone(),
            validators: validators.clone(),
        }),
        Ending::Failed { reason, message } => Some(RunOutcome::Failed {
            reason: (*reason).to_owned(),
            message: message.clone(),
        }),
        Ending::Paused => state.awaiting.clone().map(RunOutcome::AwaitingApproval),
    }
}

/// Records the fate of a call, replacing an earlier fate of the same call (an approved call
/// was first seen waiting).
fn note_call(state: &mut LoopState, call_id: &str, envelope: &CallEnvelope, fate: CallFate) {
    let seen = CallSeen {
        call_id: call_id.to_owned(),
        step: state.step,
        tool: envelope.tool.clone(),
        kind: envelope.kind,
        args: args_digest(&envelope.arguments),
        fate,
    };
    match state.calls.iter_mut().find(|c| c.call_id == call_id) {
        Some(existing) => *existing = seen,
        None => state.calls.push(seen),
    }
}

fn args_digest(args: &Value) -> String {
    hex::encode(&Sha256::digest(to_canonical_bytes(args))[..12])
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
fn result_message(result: &crate::records::entry::ToolResultRecord) -> String {
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

/// What resuming needs from a run's record.
struct Recorded {
    run_context: SignedRunContext,
    context_digest: String,
    state: LoopState,
    outcome: Option<RunOutcome>,
    /// A model turn written after the checkpoint whose calls had not all been handled.
    turn_in_progress: Option<ModelTurn>,
}

impl Recorded {
    fn read(run_id: &str, entries: &[RecordEntry], checkpoint_seq: u64) -> Result<Self, RunError> {
        let corrupt = |problem: String| RunError::Corrupt {
            run_id: run_id.to_owned(),
            problem,
        };
        let mut run_context = None;
        let mut context_digest = None;
        let mut state = None;
        let mut outcome = None;
        let mut turn_in_progress = None;
        for entry in entries {
            match &entry.body {
                EntryBody::RunStarted {
                    run_context: value, ..
                } => {
                    run_context = Some(
                        serde_json::from_value::<SignedRunContext>(value.clone())
                            .map_err(|e| corrupt(format!("its RunContext cannot be read: {e}")))?,
                    );
                }
                EntryBody::ContextCompiled { digest, .. } => context_digest = Some(digest.clone()),
                EntryBody::Checkpoint { state: value, .. } if entry.seq == checkpoint_seq => {
                    state =
                        Some(serde_json::from_value::<LoopState>(value.clone()).map_err(|e| {
                            corrupt(format!("checkpoint {checkpoint_seq} cannot be read: {e}"))
                        })?);
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
        let state = state.ok_or_else(|| corrupt(format!("entry {checkpoint_seq} is not a checkpoint")))?;
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
