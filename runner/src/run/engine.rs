//! The decision loop of one run: plan (a model turn) → execute (every call through the Tool
//! Gateway) → critic (Functional State, validators, verdict) → checkpoint, step after step,
//! until the critic ends the run, a call waits for approval, or a bound is hit.
//!
//! Crash safety: a model turn that asked for tools is written before any of them runs, and a
//! resumed run reuses it; calls carry idempotency keys derived from the run, step and call, and
//! the gateway answers calls it already executed from the record. So a run killed at any point
//! and resumed ends with the same decisions and no duplicate effects. Because of that, a step's
//! verdict and checkpoint need not be written on their own: they travel with the next write
//! (the next model turn), and only pauses and endings are written at once. A crash in between
//! resumes one checkpoint earlier and re-derives the same verdict from the record.

use std::{collections::HashMap, time::Instant};

use tracing::Instrument as _;

use contextos_crds::{common::ToolKind, session::Resolution};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    bundle::RunBundle,
    checkpoint::{AwaitingApproval, LoopState, PendingCall, Recorded, UnresolvedCall},
    critic::{self, Ending, Judgement, Review, StepResult},
    issue_run_context, reissue_run_context, request_text, service_tail,
    state::{Usage, assess},
    validate::{self, CompiledValidator, ValidatorError},
};
use crate::{
    consent::SubjectHandle,
    context::{self, CompileError, CompiledContext},
    gateway::{CallOutcome, GatewayError, ToolGateway, envelope::ApprovalGrant, remote::GatewayClient},
    keys::KeyPair,
    memory::desk::{RecallAsk, RecallFor, RecallRecord},
    model::{Message, Model, ModelError, ModelRequest, ModelTurn, Role, ToolSpec},
    records::{
        EntryBody, Hash, ReadError, RecordEntry, RecordError, RecordStore, Recorder, RunStart, StoreError,
        TenantId, entry::Verdict, read_run, recorder::now_ms, store::remote::RemoteStore,
    },
    run_context::{OverrideError, SignedRunContext},
};

/// How a run ended (or paused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
// One outcome is made per run, so the size of its largest variant costs nothing worth boxing.
#[allow(clippy::large_enum_variant)]
pub enum RunOutcome {
    Completed {
        output: String,
        validators: Vec<String>,
    },
    Failed {
        reason: String,
        message: String,
    },
    AwaitingApproval(AwaitingApproval),
    /// A call's outcome is unknown; a human says whether it acted (`Session.spec.resolutions`).
    AwaitingResolution(UnresolvedCall),
}

impl RunOutcome {
    /// How the run ended or paused, as one word (spans, logs).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
            Self::AwaitingApproval(_) => "awaiting_approval",
            Self::AwaitingResolution(_) => "awaiting_resolution",
        }
    }
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
    /// In a replay: every body the replayed run recorded (after `run_started`), in order.
    pub replayed: Vec<EntryBody>,
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
    #[error(transparent)]
    Remote(crate::gateway::remote::RemoteError),
    #[error("Session {session}: {0}", session = .1)]
    Override(OverrideError, String),
    #[error(transparent)]
    Validator(#[from] ValidatorError),
    #[error("session {session} has no run to resume in tenant {tenant}; start it with `contextos run`")]
    NoRun { tenant: String, session: String },
    #[error("run {run_id}: {problem}")]
    Corrupt { run_id: String, problem: String },
    #[error(
        "ContextPack memory source {name} asks for other memory than the recorded run was offered (another scope, type, query or number of items, or a new source): a replay cannot know what it would recall; an approver may promote the candidate without a replay (annotation contextos.dev/promote-without-replay)"
    )]
    MemorySourceChanged { name: String },
    #[error("Session {session}: spec.subject: {problem}")]
    BadSubject { session: String, problem: String },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("call {call_id} is still being carried out by another gateway replica; try again shortly")]
    CallInProgress { call_id: String },
    /// A SpendQuota refused a call (the gateway recorded which): the run ends `QuotaExceeded`.
    #[error("{0}")]
    SpendQuota(String),
    #[error(
        "run {run_id} was compiled to context {recorded} but the bundle now compiles to {now}; a run resumes only under the specs it was pinned to"
    )]
    BundleChanged {
        run_id: String,
        recorded: String,
        now: String,
    },
}

impl RunError {
    /// Whether the run is about a subject who was erased: nothing more is kept about them, so
    /// it cannot run (retrying would change nothing).
    pub fn is_subject_erased(&self) -> bool {
        match self {
            Self::Record(RecordError::Vault(e)) => e.is_erased(),
            Self::Read(ReadError::Vault { source, .. }) => source.is_erased(),
            Self::Memory(crate::memory::MemoryError::Vault(e)) => e.is_erased(),
            _ => false,
        }
    }

    /// What a SpendQuota said refusing the run's call or model turn, if one did.
    pub fn spend_quota(&self) -> Option<&str> {
        match self {
            Self::SpendQuota(message) | Self::Model(ModelError::QuotaExceeded { detail: message }) => {
                Some(message)
            }
            Self::Remote(crate::gateway::remote::RemoteError::Refused { code, error, .. })
                if code == crate::gateway::service::quotas::QUOTA_EXCEEDED_CODE =>
            {
                Some(error)
            }
            _ => None,
        }
    }

    /// Whether the gateway service refused a write because the run has written as much to the
    /// store as it may (`--max-run-bytes`), or its namespace keeps as much as it may
    /// (`--max-tenant-store-bytes`).
    pub fn is_store_quota(&self) -> bool {
        let quota = |e: &StoreError| matches!(e, StoreError::QuotaExceeded(_));
        match self {
            Self::Store(e) | Self::Record(RecordError::Store(e)) => quota(e),
            Self::Model(ModelError::StoreQuotaExceeded { .. }) => true,
            Self::Remote(crate::gateway::remote::RemoteError::Refused { code, .. }) => {
                code == crate::records::store::remote::QUOTA_EXCEEDED
            }
            _ => false,
        }
    }
}

/// Replays differ from live runs in where model turns, results, approvals and time come from.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    #[default]
    Live,
    Replay {
        /// Approvers the original run had, by call id, with the call they approved (tool and
        /// arguments): an approval binds only to that same call again.
        approvals: HashMap<String, (String, String, serde_json::Value)>,
        /// Wall time the original run had used at each step.
        wall_ms: HashMap<u32, u64>,
        /// What the original run recalled for its ContextPack memory sources: a replay is given
        /// the same memory, never what the store holds now.
        recalled: Vec<RecallRecord>,
        /// What each of the original run's turns was offered (an Agent with
        /// `spec.discovery`), by step: a replay offers the same tools.
        offered: HashMap<u32, (crate::discovery::Scoring, crate::discovery::select::Selection)>,
    },
}

/// Runs one Session's bundle.
#[derive(Debug)]
pub struct Harness<'s, S> {
    pub(super) store: &'s S,
    pub(super) tenant: TenantId,
    pub(super) key: KeyPair,
    pub(super) bundle: RunBundle,
    pub(super) gateway: ToolGateway,
    /// The model asked for turns; `None` when they come through the gateway service.
    pub(super) model: Option<crate::model::routing::Models>,
    /// In a cluster: the gateway service that makes every call, model turn and record write
    /// for this run (see [`Harness::through_gateway`]).
    pub(super) remote: Option<&'s GatewayClient>,
    pub(super) validators: Vec<CompiledValidator>,
    pub(super) tools: Vec<ToolSpec>,
    pub(super) mode: Mode,
    /// A RunContext issued by someone else (the operator), used instead of issuing one.
    pub(super) issued: Option<SignedRunContext>,
    pub(super) clock: fn() -> i64,
    /// What humans found out about calls whose outcome was unknown (`spec.resolutions`).
    pub(super) resolutions: Vec<Resolution>,
    /// The person the Session is about (its `spec.subject`): what the run records about them
    /// is encrypted under the run's key (see `crate::records::vaulted`).
    pub(super) subject: Option<SubjectHandle>,
    /// Where tool discovery gets embeddings (an Agent with `spec.discovery`); without one,
    /// tools are scored by BM25.
    pub(super) embedder: Option<crate::discovery::embedding::Embedder>,
    /// The run's tools indexed for discovery, once the first turn needs them.
    pub(super) offering: tokio::sync::OnceCell<super::offer::Offering>,
}

/// The recalls of a run's ContextPack memory sources on record, in order.
pub(super) fn recalled_in(entries: &[RecordEntry]) -> Vec<RecallRecord> {
    entries
        .iter()
        .filter_map(|e| match &e.body {
            EntryBody::MemoryRecalled(recall) if recall.source.is_some() => Some(recall.clone()),
            _ => None,
        })
        .collect()
}

pub(super) type Observer<'o> = &'o mut (dyn FnMut(&Progress<'_>) + Send);

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
        let subject = bundle
            .session_spec
            .subject
            .as_deref()
            .map(SubjectHandle::new)
            .transpose()
            .map_err(|e| RunError::BadSubject {
                session: bundle.session.clone(),
                problem: e.to_string(),
            })?;
        let validators = validate::compile(&bundle.agent, &bundle.agent_spec.validators)?;
        let tools = super::offer::agent_tools(&bundle.agent_spec);
        Ok(Self {
            store,
            tenant,
            key,
            bundle,
            gateway,
            model: Some(crate::model::routing::Models::single(model)),
            remote: None,
            validators,
            tools,
            mode: Mode::Live,
            issued: None,
            clock: now_ms,
            resolutions: Vec::new(),
            subject,
            embedder: None,
            offering: tokio::sync::OnceCell::new(),
        })
    }

    /// Scores tools for discovery with `embedder` (see `spec.discovery`).
    pub fn with_embedder(mut self, embedder: Option<crate::discovery::embedding::Embedder>) -> Self {
        self.embedder = embedder;
        self
    }

    /// Asks `models` (the Agent's own and those its routing names) instead of the one model it
    /// was made with.
    pub fn with_models(mut self, models: crate::model::routing::Models) -> Self {
        self.model = Some(models);
        self
    }

    /// Runs under a RunContext the operator issued (a runner pod) instead of issuing one with
    /// this harness's key, which then only signs record heads.
    pub fn with_run_context(mut self, signed: SignedRunContext) -> Self {
        self.issued = Some(signed);
        self
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

    /// Resumes with these findings on calls whose outcome was unknown.
    pub fn with_resolutions(mut self, resolutions: Vec<Resolution>) -> Self {
        self.resolutions = resolutions;
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
        // The issuer's decision when the run was handed a context (a runner pod), else the one
        // `issue_run_context` makes below (this process's sampler).
        let trace = match &self.issued {
            Some(issued) => issued.context.trace(),
            None => crate::telemetry::trace_id_of(trace_id).map(|trace| crate::telemetry::SessionTrace {
                trace,
                tenant: self.tenant.as_str().to_owned(),
                session: self.bundle.session.clone(),
                sampled: crate::telemetry::session_sampled(trace),
            }),
        };
        let span = self.run_span(run_id, trace, false);
        let report = self
            .start_untraced(run_id, trace_id, observe)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &report);
        report
    }

    async fn start_untraced(
        &self,
        run_id: &str,
        trace_id: &str,
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let recalls = self
            .bundle
            .context_pack
            .spec
            .sources
            .iter()
            .any(|s| s.memory.is_some());
        if recalls && !self.replay() && self.store.head(&self.tenant, run_id).await?.is_some() {
            // A start interrupted between its first entry and its context (in a cluster, a pack
            // with memory sources writes them apart): it continues from what is on record.
            return self.continue_start(run_id, observe).await;
        }
        let signed = match &self.issued {
            Some(issued) => issued.clone(),
            None => issue_run_context(&self.bundle, run_id, trace_id, None, &self.key, (self.clock)())
                .map_err(|e| RunError::Override(e, self.bundle.session.clone()))?,
        };
        // A run about a person records what it learns of them under its own key (made from
        // theirs; refused once they are erased). A replay's record is thrown away.
        let vault = match (&self.subject, self.replay()) {
            (Some(subject), false) => {
                let key = self
                    .store
                    .key_to_keep(&self.tenant, run_id, subject)
                    .await
                    .map_err(RecordError::from)?;
                Some((subject.clone(), key))
            }
            _ => None,
        };
        let bundle_bytes = self
            .bundle
            .stored_bytes(vault.as_ref().map(|(_, key)| key))
            .map_err(RecordError::from)?;
        let bundle_blob = self.store.put_blob(&self.tenant, bundle_bytes).await?;
        let start = RunStart {
            run_id: run_id.to_owned(),
            session_id: self.bundle.session.clone(),
            agent: self.bundle.agent.clone(),
            run_context: serde_json::to_value(&signed).unwrap_or(Value::Null),
            pinned: self.bundle.pinned(),
            bundle: Some(bundle_blob),
        };
        // run_started is written with the compiled context and the first checkpoint, in one batch.
        let mut recorder =
            Recorder::begin(self.store, self.tenant.clone(), self.key.clone(), start)?.with_clock(self.clock);
        if let Some((subject, key)) = vault {
            recorder = recorder.vaulted(subject, key);
        }
        if self.replay() {
            recorder = recorder.for_replay();
        }
        observe(&Progress::Started {
            run_id,
            session: &self.bundle.session,
            resumed: false,
        });
        let recalled = self.recall_sources(&mut recorder, &signed).await?;
        self.begin_steps(recorder, &signed, &recalled, observe).await
    }

    /// Compiles the context with what was recalled, records it with the first checkpoint, and
    /// steps.
    async fn begin_steps(
        &self,
        mut recorder: Recorder<'_, S>,
        signed: &SignedRunContext,
        recalled: &[RecallRecord],
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let compiled = match compile_span().in_scope(|| self.compile(recalled)) {
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
                return Ok(self.report(&mut recorder, outcome, &LoopState::initial(&self.bundle)));
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
        let state = LoopState::initial(&self.bundle);
        if !self.replay() {
            recorder.stage(state.checkpoint(0));
        }
        recorder.flush().await?;
        observe(&Progress::Boundary {
            step: 0,
            after: "start",
        });
        self.drive(
            &mut recorder,
            signed,
            &compiled,
            state,
            Decided::default(),
            None,
            observe,
        )
        .await
    }

    /// The pack's memory sources for a new run, recalled now — by this process's gateway, or in
    /// a cluster by the gateway service, which records them — or in a replay, what the original
    /// run recalled. Locally the recalls are staged, to be written with the compiled context.
    async fn recall_sources(
        &self,
        recorder: &mut Recorder<'_, S>,
        signed: &SignedRunContext,
    ) -> Result<Vec<RecallRecord>, RunError> {
        let sources: Vec<_> = self
            .bundle
            .context_pack
            .spec
            .sources
            .iter()
            .filter_map(|s| s.memory.as_ref().map(|m| (s.name.as_str(), RecallAsk::from(m))))
            .collect();
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        if let Mode::Replay { recalled, .. } = &self.mode {
            // What the original run was offered, for the very same questions: a candidate that
            // recalls differently cannot be judged by replaying this run.
            return sources
                .iter()
                .map(|(name, ask)| {
                    recalled
                        .iter()
                        .find(|r| r.source.as_deref() == Some(name) && r.answers(ask))
                        .cloned()
                        .ok_or_else(|| RunError::MemorySourceChanged {
                            name: (*name).to_owned(),
                        })
                })
                .collect();
        }
        if let Some(remote) = self.remote {
            let (tail, prepared) = service_tail::tail_of(recorder).await?;
            let answer = remote.recall_with(tail).await;
            service_tail::after_answer(recorder, prepared, answer.is_ok(), remote.take_head()).await?;
            return answer.map_err(RunError::Remote);
        }
        let mut recalled = Vec::with_capacity(sources.len());
        for (name, ask) in sources {
            let record = self
                .gateway
                .memory()
                .recall(
                    self.store,
                    &signed.context,
                    RecallFor::Source(name),
                    &ask,
                    (self.clock)(),
                )
                .await?;
            recorder.stage(EntryBody::MemoryRecalled(record.clone()));
            recalled.push(record);
        }
        Ok(recalled)
    }

    /// Continues a start that was interrupted after its first entry (no context or checkpoint
    /// on record yet): recalls what was not recalled, then begins as a start does. A run that
    /// did get further is resumed instead.
    async fn continue_start(&self, run_id: &str, observe: Observer<'_>) -> Result<RunReport, RunError> {
        let entries: Vec<RecordEntry> = read_run(self.store, &self.tenant, run_id)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        if entries.iter().any(|e| {
            matches!(
                e.body,
                EntryBody::ContextCompiled { .. } | EntryBody::Checkpoint { .. }
            )
        }) {
            return self.resume(&[], observe).await;
        }
        let signed = match &self.issued {
            Some(issued) => issued.clone(),
            None => {
                let recorded = Recorded::run_context_of(run_id, &entries)?;
                reissue_run_context(&recorded, &self.key, (self.clock)())
            }
        };
        let mut recorder = Recorder::resume(self.store, self.tenant.clone(), self.key.clone(), run_id)
            .await?
            .with_clock(self.clock);
        let recorded = recalled_in(&entries);
        let recalled = if recorded.is_empty() {
            self.recall_sources(&mut recorder, &signed).await?
        } else {
            recorded
        };
        observe(&Progress::Started {
            run_id,
            session: &self.bundle.session,
            resumed: true,
        });
        self.begin_steps(recorder, &signed, &recalled, observe).await
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
            return Ok(self.report(&mut recorder, outcome, &recorded.state));
        }
        let compiled = self
            .compile(&recalled_in(&entries))
            .map_err(|e| RunError::Corrupt {
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
                    return Ok(self.report(&mut recorder, outcome, &recorded.state));
                }
            }
        }
        let mut resolution = None;
        if let Some(unresolved) = &recorded.state.unresolved {
            match self.resolutions.iter().find(|r| r.call_id == unresolved.call_id) {
                Some(found) => resolution = Some(found.clone()),
                None => {
                    let outcome = RunOutcome::AwaitingResolution(unresolved.clone());
                    return Ok(self.report(&mut recorder, outcome, &recorded.state));
                }
            }
        }
        self.gateway.restore(&entries);
        let signed = match &self.issued {
            Some(issued) => issued.clone(),
            None => reissue_run_context(&recorded.run_context.context, &self.key, (self.clock)()),
        };
        observe(&Progress::Started {
            run_id: &run_id,
            session: &self.bundle.session,
            resumed: true,
        });
        let span = self.run_span(&run_id, signed.context.trace(), true);
        let report = self
            .drive(
                &mut recorder,
                &signed,
                &compiled,
                recorded.state,
                Decided { grant, resolution },
                recorded.turn_in_progress,
                observe,
            )
            .instrument(span.clone())
            .await;
        record_outcome(&span, &report);
        report
    }

    /// The run's context: the pinned pack, its ConfigMap sources and what its memory sources
    /// recalled.
    fn compile(&self, recalled: &[RecallRecord]) -> Result<CompiledContext, CompileError> {
        let mut sources = self.bundle.resolved_sources();
        sources.extend(recalled.iter().filter_map(|r| {
            r.source.as_ref().map(|name| context::ResolvedSource {
                name: name.clone(),
                content: r.content.clone(),
            })
        }));
        context::compile(
            &crate::skills::pack_with_fragments(&self.bundle.context_pack.spec, &self.bundle.skills),
            &sources,
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
        decided: Decided,
        turn_in_progress: Option<ModelTurn>,
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let driven = self
            .drive_steps(
                recorder,
                signed,
                compiled,
                &mut state,
                decided,
                turn_in_progress,
                observe,
            )
            .await;
        match driven {
            Err(error) if error.is_store_quota() => {
                self.ended_by_quota(recorder, error, "StoreQuotaExceeded", &state)
                    .await
            }
            Err(error) if error.spend_quota().is_some() => {
                self.ended_by_quota(recorder, error, crate::quota::EXCEEDED, &state)
                    .await
            }
            other => other,
        }
    }

    /// The gateway refused a write because the run has written all the store allows it, or a
    /// SpendQuota refused a call: the run ends Failed with `reason`, and its record says so in a
    /// closing entry (which the gateway still accepts past the quota), instead of a record that
    /// stays "running" for ever. What was staged and refused is dropped.
    async fn ended_by_quota(
        &self,
        recorder: &mut Recorder<'_, S>,
        error: RunError,
        reason: &'static str,
        state: &LoopState,
    ) -> Result<RunReport, RunError> {
        let message: String = error.to_string().chars().take(1024).collect();
        recorder.discard_staged();
        if self.remote.is_some() && reason == crate::quota::EXCEEDED {
            // The gateway that refused ended the run on record itself: the runner writes
            // nothing more (it would be refused), and reads the head for its report.
            let _ = recorder.sync().await;
        } else {
            recorder.stage(EntryBody::Failed {
                reason: reason.into(),
                message: message.clone(),
            });
            if recorder.flush().await.is_err() {
                return Err(error);
            }
        }
        let outcome = RunOutcome::Failed {
            reason: reason.into(),
            message,
        };
        Ok(self.report(recorder, outcome, state))
    }

    /// The decision loop: model turns, calls, verdicts and checkpoints until the run ends or
    /// pauses. `state` is left as far as the run got.
    #[allow(clippy::too_many_arguments)]
    async fn drive_steps(
        &self,
        recorder: &mut Recorder<'_, S>,
        signed: &SignedRunContext,
        compiled: &CompiledContext,
        state: &mut LoopState,
        mut decided: Decided,
        mut turn_in_progress: Option<ModelTurn>,
        observe: Observer<'_>,
    ) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let wall_base = state.usage.wall_ms;
        // Messages already in a checkpoint (written or staged).
        let mut recorded_messages = state.messages.len();
        loop {
            // A run that never waits on anything (a scripted model over an in-memory store: a
            // skill's evaluation, inside the shared gateway service) still gives its thread back
            // once a step, so that others on it go on and its deadline can fire.
            tokio::task::yield_now().await;
            let step = tracing::info_span!(
                target: crate::telemetry::TARGET,
                "step",
                contextos.step = state.step + u32::from(state.pending.is_empty()),
            );
            let result = if state.pending.is_empty() {
                state.step += 1;
                let reused = turn_in_progress.is_some();
                let turn = match turn_in_progress.take() {
                    Some(turn) => turn,
                    None => match self
                        .next_turn(recorder, compiled, state, signed.context.safety_mode)
                        .instrument(step.clone())
                        .await?
                    {
                        Ok(turn) => turn,
                        Err(e) => return self.model_failed(recorder, e, state).await,
                    },
                };
                self.take_turn(recorder, state, &turn, reused, observe)
                    .instrument(step.clone())
                    .await?
            } else {
                Owned::Calls
            };
            let result = match result {
                Owned::Calls => {
                    self.handle_calls(recorder, signed, state, decided.take(), observe)
                        .instrument(step.clone())
                        .await?
                }
                answer => answer,
            };
            state.usage.wall_ms = self.wall_ms(state.step, wall_base, started);
            if let Owned::OutcomeUnknown(unresolved) = result {
                return self
                    .pause_for_resolution(recorder, unresolved, state.clone(), recorded_messages)
                    .await;
            }
            let judgement = step.in_scope(|| {
                let span = tracing::info_span!(
                    target: crate::telemetry::TARGET,
                    "critic.verdict",
                    contextos.verdict = tracing::field::Empty,
                );
                let judgement = span.in_scope(|| self.judge(state, &result));
                span.record("contextos.verdict", format!("{:?}", judgement.verdict).as_str());
                judgement
            });
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
            // A replay is never resumed: it needs no checkpoints.
            if !self.replay() {
                recorder.stage(state.checkpoint(recorded_messages));
                recorded_messages = state.messages.len();
            }
            let outcome = ending_outcome(&judgement, state);
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
            if let Some(outcome) = outcome {
                recorder.flush().instrument(step.clone()).await?;
                observe(&Progress::Boundary {
                    step: state.step,
                    after: "checkpoint",
                });
                return Ok(self.report(recorder, outcome, state));
            }
        }
    }

    /// The model's next turn. Through the gateway service, what is staged is written first
    /// (the service records the turn on top of it), and the turn it recorded is read back.
    async fn next_turn(
        &self,
        recorder: &mut Recorder<'_, S>,
        compiled: &CompiledContext,
        state: &LoopState,
        safety: contextos_crds::common::SafetyMode,
    ) -> Result<Result<ModelTurn, ModelError>, RunError> {
        let tools = self.offer(recorder, state, safety).await;
        let Some(remote) = self.remote else {
            return Ok(self.ask_model(compiled, state, tools, None).await);
        };
        let (tail, prepared) = super::service_tail::tail_of(recorder).await?;
        let turn = self.ask_model(compiled, state, tools, Some(tail)).await;
        super::service_tail::after_answer(recorder, prepared, turn.is_ok(), remote.take_head()).await?;
        Ok(turn)
    }

    /// The tools this turn is offered: every tool, or for an Agent with `spec.discovery` those
    /// chosen for the turn's intent (staged as `tools_offered`, so the record says what the
    /// model was shown before it answers) — in a replay, those the original turn was offered.
    /// A call of a tool not offered is still the policies' to decide: offering is about what
    /// the model reads, not what it may do.
    async fn offer(
        &self,
        recorder: &mut Recorder<'_, S>,
        state: &LoopState,
        safety: contextos_crds::common::SafetyMode,
    ) -> Vec<ToolSpec> {
        let mut tools = self.offer_catalog(recorder, state, safety).await;
        if self.bundle.agent_spec.aliases.is_some() {
            tools.push(super::aliases::deref_tool());
        }
        tools
    }

    /// The Agent's own tools this turn is offered (see [`Harness::offer`]).
    async fn offer_catalog(
        &self,
        recorder: &mut Recorder<'_, S>,
        state: &LoopState,
        safety: contextos_crds::common::SafetyMode,
    ) -> Vec<ToolSpec> {
        let Some(spec) = &self.bundle.agent_spec.discovery else {
            return self.tools.clone();
        };
        let recorded = match &self.mode {
            Mode::Replay { offered, .. } => offered.get(&state.step).cloned(),
            Mode::Live => None,
        };
        let (scoring, selection) = match recorded {
            // What the original turn was offered, as far as this bundle still has those tools
            // and allows them (what differs shows in the replay as an OfferChanged report).
            Some((scoring, selection)) => {
                let catalog = self.tools.iter().map(|t| t.name.as_str()).collect();
                let denied = self.gateway.denied_outright(safety);
                (scoring, super::offer::as_replayed(selection, &catalog, &denied))
            }
            None => {
                let offering = self
                    .offering
                    .get_or_init(|| {
                        let denied = self.gateway.denied_outright(safety);
                        let tools = super::offer::discoverable(&self.tools, &self.bundle.agent_spec.tools);
                        async move {
                            super::offer::Offering::prepare(spec, &tools, denied, self.embedder.as_ref())
                                .await
                        }
                    })
                    .await;
                let request = request_text(&self.bundle.session_spec);
                offering
                    .choose(&super::offer::intent_of(&request, &state.messages))
                    .await
            }
        };
        let tools = super::offer::offered_tools(&self.tools, &selection);
        recorder.stage(EntryBody::ToolsOffered {
            step: state.step,
            scoring,
            selection,
        });
        tools
    }

    /// Asks the model directly, or through the gateway service with the runner's `tail`.
    async fn ask_model(
        &self,
        compiled: &CompiledContext,
        state: &LoopState,
        tools: Vec<ToolSpec>,
        tail: Option<crate::gateway::remote::RunnerTail>,
    ) -> Result<ModelTurn, ModelError> {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "model.call",
            gen_ai.request.model = %self.bundle.agent_spec.model.model,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            contextos.outcome = tracing::field::Empty,
            otel.kind = "client",
        );
        let turn = self
            .ask_model_untraced(compiled, state, tools, tail)
            .instrument(span.clone())
            .await;
        match &turn {
            Ok(turn) => {
                span.record("gen_ai.usage.input_tokens", turn.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", turn.completion_tokens);
                span.record(
                    "contextos.outcome",
                    if turn.tool_calls.is_empty() {
                        "answer"
                    } else {
                        "tool_calls"
                    },
                );
            }
            Err(_) => {
                span.record("contextos.outcome", "error");
            }
        }
        turn
    }

    async fn ask_model_untraced(
        &self,
        compiled: &CompiledContext,
        state: &LoopState,
        tools: Vec<ToolSpec>,
        tail: Option<crate::gateway::remote::RunnerTail>,
    ) -> Result<ModelTurn, ModelError> {
        let mut messages = Vec::with_capacity(state.messages.len() + 1);
        messages.push(Message::new(Role::System, compiled.text.clone()));
        match &self.bundle.agent_spec.aliases {
            Some(aliases) => messages.extend(super::aliases::render(
                &state.messages,
                aliases.full_for_steps,
                state.step,
            )),
            None => messages.extend(state.messages.iter().cloned()),
        }
        let request = ModelRequest {
            model: self.bundle.agent_spec.model.model.clone(),
            messages,
            tools,
            max_output_tokens: self.bundle.agent_spec.model.max_output_tokens,
        };
        match (self.remote, &self.model) {
            // The gateway service caps the turn before it records it.
            (Some(remote), _) => match tail {
                Some(tail) => remote.model_with(&request, state.step, tail).await,
                None => remote.model(&request, state.step).await,
            },
            (None, Some(models)) => {
                let budget = self.bundle_budget();
                let riskiest_called = state
                    .calls
                    .iter()
                    .filter_map(|c| self.bundle.agent_spec.tools.iter().find(|t| t.name == c.tool))
                    .map(|t| t.risk)
                    .max();
                let facts = crate::model::routing::RouteFacts {
                    step: state.step,
                    max_steps: budget.max_steps,
                    riskiest_called,
                    tokens_used: state.usage.tokens,
                    max_tokens: budget.max_tokens,
                };
                let mut turn = models
                    .complete(&request, state.step, &facts)
                    .await
                    .map_err(|(e, _)| e)?;
                turn.cap_tool_calls(self.bundle_budget().max_tool_calls_per_turn);
                Ok(turn)
            }
            (None, None) => Err(ModelError::Unreachable {
                endpoint: "(none)".into(),
                detail: "this harness has no model".into(),
            }),
        }
    }

    /// Pauses the run because a call's outcome is unknown (see `gateway::intents`): the
    /// checkpoint keeps the call pending, and a human's resolution lets the next attempt go on.
    async fn pause_for_resolution(
        &self,
        recorder: &mut Recorder<'_, S>,
        unresolved: UnresolvedCall,
        mut state: LoopState,
        recorded_messages: usize,
    ) -> Result<RunReport, RunError> {
        state.unresolved = Some(unresolved.clone());
        if !self.replay() {
            recorder.stage(state.checkpoint(recorded_messages));
        }
        recorder.flush().await?;
        Ok(self.report(recorder, RunOutcome::AwaitingResolution(unresolved), &state))
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
            ModelError::RecordedEnd { reason, .. } => reason.as_str(),
            ModelError::ScriptExhausted { .. } | ModelError::BadScript { .. } => "ModelScriptExhausted",
            ModelError::NotRecorded { .. } => "ReplayExhausted",
            ModelError::TokenBudget { .. } => "TokenBudgetExhausted",
            // The gateway that refused ended the run on record itself.
            ModelError::QuotaExceeded { .. } if self.remote.is_some() => {
                return self
                    .ended_by_quota(recorder, error.into(), crate::quota::EXCEEDED, state)
                    .await;
            }
            ModelError::QuotaExceeded { .. } => crate::quota::EXCEEDED,
            // Past the store's bound only a closing entry is let through.
            ModelError::StoreQuotaExceeded { .. } => {
                return self
                    .ended_by_quota(recorder, error.into(), "StoreQuotaExceeded", state)
                    .await;
            }
            _ if matches!(self.mode, Mode::Replay { .. }) => "ReplayExhausted",
            _ => {
                // Keep the last step's checkpoint: the attempt is retried from it.
                if recorder.has_staged() {
                    recorder.flush().await?;
                }
                return Err(error.into());
            }
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
        // Through the gateway service the turn is already recorded (by the service).
        if !reused && self.remote.is_none() {
            recorder.stage(EntryBody::ModelTurn {
                step: state.step,
                model: self.bundle.model_of(turn),
                response: serde_json::to_value(turn).unwrap_or(Value::Null),
                prompt_tokens: turn.prompt_tokens,
                completion_tokens: turn.completion_tokens,
                cached_prompt_tokens: turn.cached_prompt_tokens,
                cost: self.bundle.turn_cost(turn),
            });
            // Live, the turn (and the previous step's checkpoint with it) is written before any
            // of its calls can act; a replay acts on nothing and writes with its calls.
            if !turn.tool_calls.is_empty() && matches!(self.mode, Mode::Live) {
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
        state.usage.tokens = state
            .usage
            .tokens
            .saturating_add(turn.prompt_tokens.saturating_add(turn.completion_tokens));
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

    fn judge(&self, state: &LoopState, result: &Owned) -> Judgement {
        let budget = &self.bundle_budget();
        let functional = assess(state.step, &state.usage, budget, &state.calls);
        let validation;
        let step_result = match result {
            Owned::Calls => StepResult::Calls,
            Owned::AwaitingApproval(tool) => StepResult::AwaitingApproval { tool },
            // Ends the run before the critic is asked.
            Owned::OutcomeUnknown(_) => StepResult::Calls,
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

    /// The span of one attempt of the Session's run: a child of the Session's root span
    /// (see `telemetry`), wherever the attempt runs.
    fn run_span(
        &self,
        run_id: &str,
        trace: Option<crate::telemetry::SessionTrace>,
        resumed: bool,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "run",
            contextos.tenant = %self.tenant,
            contextos.agent = %self.bundle.agent,
            contextos.session = %self.bundle.session,
            contextos.run = run_id,
            contextos.resumed = resumed,
            contextos.replay = self.replay(),
            contextos.outcome = tracing::field::Empty,
        );
        match trace {
            // A replay (an audit, a release pipeline's gate) is not part of the Session it
            // replays: its own trace, linked to the original.
            Some(trace) if self.replay() => crate::telemetry::link_to_session(&span, &trace),
            Some(trace) => crate::telemetry::set_parent(&span, trace.under_root()),
            None => {}
        }
        span
    }

    fn replay(&self) -> bool {
        matches!(self.mode, Mode::Replay { .. })
    }

    fn wall_ms(&self, step: u32, base: u64, started: Instant) -> u64 {
        match &self.mode {
            Mode::Live => base + started.elapsed().as_millis() as u64,
            Mode::Replay { wall_ms, .. } => wall_ms.get(&step).copied().unwrap_or(base),
        }
    }

    fn report(&self, recorder: &mut Recorder<'_, S>, outcome: RunOutcome, state: &LoopState) -> RunReport {
        RunReport {
            replayed: recorder.take_tapped(),
            run_id: recorder.run_id().to_owned(),
            session: self.bundle.session.clone(),
            outcome,
            steps: state.step,
            usage: state.usage.clone(),
            head: recorder.head().map(|(_, hash)| hash),
        }
    }
}

impl<'s> Harness<'s, RemoteStore> {
    /// A harness whose every effect goes through the gateway service (a runner pod): records
    /// are appended through `client` (the service chains and signs them with the tenant's key,
    /// so `key` here only seals batches in transit), calls and model turns are requests to it,
    /// and no credential or secret is held in this process.
    pub fn through_gateway(
        client: &'s GatewayClient,
        key: KeyPair,
        bundle: RunBundle,
        signed: SignedRunContext,
    ) -> Result<Self, RunError> {
        // Only for call hashes and catalog facts: this gateway never executes anything.
        let local = bundle
            .gateway_bundle(Default::default())
            .build_offline(key.public())
            .map_err(|e| RunError::Corrupt {
                run_id: signed.context.run_id.clone(),
                problem: format!("its pinned policies do not compile: {e}"),
            })?;
        let mut harness = Self::new(
            client.records(),
            key,
            bundle,
            local,
            Model::Replay(Default::default()),
        )?;
        harness.model = None;
        harness.remote = Some(client);
        Ok(harness.with_run_context(signed))
    }
}

/// What humans decided that the next call needs: an approval, or a finding on a call whose
/// outcome was unknown. Used once.
#[derive(Debug, Default)]
pub(super) struct Decided {
    pub grant: Option<ApprovalGrant>,
    pub resolution: Option<Resolution>,
}

impl Decided {
    fn take(&mut self) -> Self {
        std::mem::take(self)
    }
}

/// A step's result before the critic reads it.
#[derive(Debug)]
pub(super) enum Owned {
    Calls,
    AwaitingApproval(String),
    Answer(String),
    /// A call may have acted before an interruption and cannot be sent again: the run waits
    /// for a human to say whether it did.
    OutcomeUnknown(UnresolvedCall),
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

/// Names how a run attempt ended on its span.
fn record_outcome(span: &tracing::Span, report: &Result<RunReport, RunError>) {
    let outcome = match report {
        Ok(report) => report.outcome.name(),
        Err(_) => "error",
    };
    span.record("contextos.outcome", outcome);
}

/// The span of compiling a run's context.
fn compile_span() -> tracing::Span {
    tracing::info_span!(target: crate::telemetry::TARGET, "context.compile")
}
