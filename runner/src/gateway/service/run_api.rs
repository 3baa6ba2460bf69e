//! The run API (`/v1/run/…`): what a runner pod may do for its own run — append the entries
//! only it can know, read its own chain, checkpoint and blobs, make tool calls and ask its model.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};

use super::*;
use crate::records::store::remote::{HEAD_HEADER, head_header_value};

/// The most bytes of an envelope's identifiers (call id, idempotency key, traceparent).
const MAX_ENVELOPE_FIELD: usize = 256;
/// The most bytes a run's closing entry may take once the run is over its quota.
const ENDING_BYTES: u64 = 16 * 1024;

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn append(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: AppendRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let entries = request
            .entries
            .iter()
            .map(WireEntry::decode)
            .collect::<Result<Vec<StoredEntry>, _>>()
            .map_err(bad)?;
        let decoded = entries
            .iter()
            .map(|e| RecordEntry::decode(&e.bytes).map_err(|err| bad(format!("entry {}: {err}", e.seq))))
            .collect::<Result<Vec<RecordEntry>, _>>()?;
        for (entry, stored) in decoded.iter().zip(&entries) {
            Self::own_run(&caller, &entry.run_id)?;
            // Only the canonical encoding: the bytes hashed are the bytes every verifier decodes.
            if entry.encode() != stored.bytes {
                return Err(bad(format!("entry {} is not in canonical form", entry.seq)));
            }
            service.check_runner_body(&caller, entry).await?;
        }
        let expected = match &request.expected_head {
            None => None,
            Some(text) => Some(Hash::parse(text).ok_or_else(|| bad("expected_head is not a hash"))?),
        };
        let slot = service.slot(&caller).await?;
        let mut log = slot.log.lock().await;
        log.refresh(&service.store, &caller.tenant, caller.run_id(), &slot.gateway)
            .await
            .map_err(unavailable)?;
        if log.head().map(|(_, h)| h) != expected {
            return Err(head_moved(caller.run_id()));
        }
        let incoming: u64 = entries.iter().map(|e| e.bytes.len() as u64).sum();
        let used = log.bytes().saturating_add(service.blobs_of(&caller));
        // A run over its quota may still say how it ended (a small Failed entry, so its record
        // does not stay "running" for ever).
        let ending = incoming <= ENDING_BYTES
            && decoded
                .iter()
                .all(|e| matches!(e.body, EntryBody::Failed { .. } | EntryBody::Completed { .. }));
        if !ending && used.saturating_add(incoming) > service.max_run_bytes {
            return Err(over_quota(caller.run_id(), used, incoming, service.max_run_bytes));
        }
        let key = service.keys.for_tenant(caller.tenant.as_str());
        let mut recorder = match log.recorder(&service.store, &caller.tenant, key.clone()) {
            Some(recorder) => recorder,
            None => {
                let first = decoded.first().ok_or_else(|| bad("the batch is empty"))?;
                Recorder::for_new_run(&service.store, caller.tenant.clone(), key, first)
                    .map_err(|e| bad(e.to_string()))?
                    .keeping_written()
            }
        };
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
        service.settle(&caller, &mut log, recorder.written()).await?;
        if log.finished() {
            // An ended run is served nothing more: its built gateway need not be kept.
            service.forget_slot(&caller);
        }
        Ok(Json(head).into_response())
    }

    /// Which entries a runner may write: only what the runner alone can know. A run's start must
    /// carry exactly the RunContext the caller presented and the bundle that context pins.
    pub(super) async fn check_runner_body(
        &self,
        caller: &Caller,
        entry: &RecordEntry,
    ) -> Result<(), Refusal> {
        let body = match &entry.body {
            EntryBody::Blob { blob, body_type, .. } => {
                let bytes = self
                    .store
                    .get_blob(&caller.tenant, blob)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| {
                        bad(format!(
                            "entry {} refers to blob {blob}, which was not uploaded",
                            entry.seq
                        ))
                    })?;
                let body: EntryBody = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("blob {blob} is not an entry body: {e}")))?;
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
        match &body {
            EntryBody::RunStarted {
                session_id,
                agent,
                run_context,
                pinned,
                bundle,
            } => {
                let context = &caller.context.context;
                let presented: Option<SignedRunContext> = serde_json::from_value(run_context.clone()).ok();
                let pinned_bundle = context.bundle_digest.as_deref().and_then(Hash::parse);
                let matches = entry.seq == 0
                    && presented.as_ref() == Some(&caller.context)
                    && *session_id == context.session_id
                    && *agent == context.agent.name
                    && *pinned == context.pinned
                    && bundle.is_some()
                    && *bundle == pinned_bundle;
                if !matches {
                    return Err(forbidden(
                        "run_started must be the first entry and carry the caller's RunContext, its session, agent, pins and bundle",
                    ));
                }
                Ok(())
            }
            EntryBody::ContextCompiled { .. }
            | EntryBody::CriticVerdict { .. }
            | EntryBody::Checkpoint { .. }
            | EntryBody::Completed { .. }
            | EntryBody::Failed { .. } => Ok(()),
            other => Err(forbidden(format!(
                "a runner may not write {} entries: decisions, results, approvals and model turns are written by the gateway",
                other.type_name()
            ))),
        }
    }

    pub(super) async fn head(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        Self::own_run(&caller, &q.run)?;
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
        Self::own_run(&caller, &q.run)?;
        let chain = service
            .store
            .read_chain(&caller.tenant, &q.run, q.from)
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
        service.charge_blob(&caller, body.len() as u64)?;
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
            return Err(Refusal(
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
            None => Err(Refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob {hash}"),
            )),
        }
    }

    /// Whether the caller's own chain refers to blob `hash`.
    async fn chain_refers_to(&self, caller: &Caller, hash: &Hash) -> Result<bool, Refusal> {
        let chain = self
            .store
            .read_chain(&caller.tenant, caller.run_id(), 0)
            .await
            .map_err(unavailable)?;
        Ok(chain.iter().any(|stored| {
            RecordEntry::decode(&stored.bytes)
                .is_ok_and(|e| matches!(e.body, EntryBody::Blob { blob, .. } if blob == *hash))
        }))
    }

    pub(super) async fn call(
        State(service): State<Arc<Self>>,
        held: Option<axum::Extension<TenantSlot>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        let mut request: CallRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        // The runner makes these, and they go into the record even when the call is refused:
        // short. (The tool's name is the model's; what it costs counts against the quota.)
        for (field, value) in [
            ("call_id", &request.envelope.call_id),
            ("idempotency_key", &request.envelope.idempotency_key),
            ("traceparent", &request.envelope.traceparent),
        ] {
            if value.len() > MAX_ENVELOPE_FIELD {
                return Err(bad(format!(
                    "{field} has {} bytes; at most {MAX_ENVELOPE_FIELD}",
                    value.len()
                )));
            }
        }
        let slot = service.slot(&caller).await?;
        // The call runs under the caller's verified context, whatever the envelope says.
        request.envelope.run_context = caller.context.clone();
        let (approval, resolution) = service
            .decisions_on_record(
                &caller,
                request.envelope.approval.take(),
                request.envelope.resolution.take(),
            )
            .await?;
        request.envelope.approval = approval;
        request.envelope.resolution = resolution;
        // Once decided, a call is carried through and recorded even if the runner goes away
        // mid-call (a killed pod closes its connection): its next attempt then finds the result
        // in the record instead of an effect nobody wrote down.
        let task = tokio::spawn(async move {
            let _held = held;
            service.decide_and_execute(&caller, &slot, request).await
        });
        match task.await {
            Ok(outcome) => outcome.map(|(o, head)| with_head(Json(o).into_response(), head)),
            Err(e) => Err(unavailable(format!("the call's task failed: {e}"))),
        }
    }

    pub(super) async fn decide_and_execute(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        request: CallRequest,
    ) -> Result<(crate::gateway::CallOutcome, Option<(u64, Hash)>), Refusal> {
        let request_call_id = request.envelope.call_id.clone();
        let mut log = slot.log.lock().await;
        let mut recorder = self
            .continue_run(caller, slot, &mut log, "it makes no more calls")
            .await?;
        let outcome =
            if slot.gateway.calls_made(caller.run_id()) >= caller.context.context.budget.max_tool_calls {
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
                    .await
            };
        self.settle(caller, &mut log, recorder.written()).await?;
        if outcome.is_err() {
            // What this replica remembers may be ahead of the record (an approval used, a call
            // counted, with nothing written): the record decides again next time.
            log.mark_stale();
        }
        let in_progress = |call: &str| {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "call_in_progress",
                format!("call {call} is being carried out by another replica; ask again shortly"),
            )
        };
        match outcome {
            Ok(crate::gateway::CallOutcome::InProgress { call_id }) => Err(in_progress(&call_id)),
            Ok(outcome) => Ok((outcome, log.exact_head())),
            // Someone wrote to the run between reading it and recording this call's go-ahead
            // (another replica taking the same call): nothing was executed; the runner asks again.
            Err(crate::gateway::GatewayError::Record(crate::records::RecordError::Store(
                crate::records::StoreError::HeadMoved { .. },
            ))) => Err(in_progress(&request_call_id)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Folds what this request's recorder wrote into the run's log (see [`RunLog::after_write`]).
    async fn settle(
        &self,
        caller: &Caller,
        log: &mut RunLog,
        written: Option<&[crate::records::StoredEntry]>,
    ) -> Result<(), Refusal> {
        log.after_write(&self.store, &caller.tenant, caller.run_id(), written)
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
        let decisions = self
            .tenants
            .decisions(caller.tenant.as_str(), &caller.context.context.session_id)
            .await
            .map_err(unavailable)?;
        let approval = approval.filter(|grant| {
            decisions.approvals.iter().any(|a| {
                a.call_hash == grant.call_hash && a.decision == grant.decision && a.approver == grant.approver
            })
        });
        let resolution = resolution.filter(|r| decisions.resolutions.contains(r));
        Ok((approval, resolution))
    }

    pub(super) async fn model(State(service): State<Arc<Self>>, headers: HeaderMap, body: Bytes) -> Reply {
        let caller = service.caller(&headers).await?;
        let request: ModelCall = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let slot = service.slot(&caller).await?;
        let mut log = slot.log.lock().await;
        // The turn is recorded on the run: a model is asked only once the run has started.
        let mut recorder = service
            .continue_run(&caller, &slot, &mut log, "it asks the model nothing more")
            .await?;
        let ledger = &log.ledger;
        // A turn already recorded for this step (the runner crashed before reading the answer)
        // is answered from the record: the model is never asked twice for one step.
        if let Some(turn) = ledger.turns.get(&request.step) {
            return Ok(Json(turn).into_response());
        }
        if request.step != ledger.steps.saturating_add(1) {
            return Err(bad(format!(
                "step {} does not follow the recorded step {}",
                request.step, ledger.steps
            )));
        }
        let budget = &caller.context.context.budget;
        if request.step > budget.max_steps {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "step_budget",
                format!("run {} may take {} steps", caller.run_id(), budget.max_steps),
            ));
        }
        // What the prompt will cost, estimated before asking (≈ 4 bytes a token), so one request
        // cannot overshoot the budget by the size of its prompt.
        let prompt_estimate = estimated_tokens(&request.request);
        let spent = ledger.tokens.saturating_add(prompt_estimate);
        if spent >= budget.max_tokens {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "token_budget",
                format!(
                    "run {} has used {} of its {} tokens and this prompt needs about {prompt_estimate} more",
                    caller.run_id(),
                    ledger.tokens,
                    budget.max_tokens
                ),
            ));
        }
        let mut model_request = request.request;
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
        let mut turn = slot
            .model
            .complete(&model_request, request.step)
            .await
            .map_err(|e| match e {
                ModelError::ScriptExhausted { .. } | ModelError::BadScript { .. } => {
                    Refusal(StatusCode::UNPROCESSABLE_ENTITY, "model_script", e.to_string())
                }
                other => Refusal(StatusCode::BAD_GATEWAY, "model_unavailable", other.to_string()),
            })?;
        turn.cap_tool_calls(budget.max_tool_calls_per_turn);
        // A model that reports no usage is charged the estimate, never nothing.
        if turn.prompt_tokens == 0 && turn.completion_tokens == 0 {
            turn.prompt_tokens = prompt_estimate;
            turn.completion_tokens = (turn.content.len() as u64).div_ceil(4);
        }
        recorder.stage(EntryBody::ModelTurn {
            step: request.step,
            model: model_request.model.clone(),
            response: serde_json::to_value(&turn).unwrap_or_default(),
            prompt_tokens: turn.prompt_tokens,
            completion_tokens: turn.completion_tokens,
        });
        recorder.flush().await.map_err(unavailable)?;
        service.settle(&caller, &mut log, recorder.written()).await?;
        Ok(with_head(Json(turn).into_response(), log.exact_head()))
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

/// A rough token count of a request (≈ 4 bytes a token), for budgeting before the model answers.
fn estimated_tokens(request: &crate::model::ModelRequest) -> u64 {
    let bytes: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.to_string().len())
                    .sum::<usize>()
        })
        .sum::<usize>()
        + request
            .tools
            .iter()
            .map(|t| t.description.len() + t.parameters.to_string().len())
            .sum::<usize>();
    (bytes as u64).div_ceil(4)
}
