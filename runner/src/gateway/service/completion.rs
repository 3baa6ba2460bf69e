//! How a run completes through the gateway service. A runner writes its own `completed` entry
//! (it runs the loop), so the service checks it before it is written: the run has not ended,
//! the output is the model's latest answer on record — a turn the service itself asked for and
//! recorded, which asked for no tool, with nothing asked of a tool since — and every validator of
//! the run's Agent passes it. Then, asked at `/v1/run/completion`, the service signs
//! what the record says (a [`CompletedRun`]) for the runner to relay in its report: the operator
//! marks a Session Succeeded, and shows its output, only on that signature. A runner (or anyone
//! who can write its termination message) cannot make a Session succeed with an output that is
//! not an answer the gateway recorded, or that a validator refuses, or after its run ended.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use serde::{Deserialize, Serialize};

use super::*;
use crate::{
    gateway::approvals::{Attested as _, CompletedRun, RunProgress, SignedRunProgress},
    records::read::read_run_from,
    run::pod::shown_output,
};

/// The code of a `completed` entry the service will not write.
pub const COMPLETION_UNVERIFIED: &str = "completion_unverified";

/// The service's word on a completed run, for its runner's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionAttestation {
    /// The output as the report shows it, and the whole output's digest.
    pub shown_output: String,
    pub output_digest: String,
    /// The tenant key's signature over the [`CompletedRun`].
    pub signature: String,
}

fn unverified(why: String) -> Refusal {
    Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, COMPLETION_UNVERIFIED, why)
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// Whether a runner's `completed` entry (`output`, and the `validators` it says passed) may
    /// be written for `slot`'s run, as `log` (read up to the head the runner names) has it: the
    /// run has not ended, its latest model turn answered without asking for a tool and nothing
    /// was asked of a tool since, the output is that answer, and every validator passes it.
    fn check_completion(
        log: &RunLog,
        slot: &RunSlot,
        output: &str,
        validators: &[String],
    ) -> Result<(), Refusal> {
        let Some((step, answer)) = log.ledger.last_answer() else {
            return Err(unverified(
                "the run's latest model turn on record is not an answer (it asked for tools, or a tool was asked of since, or there is none): a run completes with its model's answer"
                    .into(),
            ));
        };
        if answer.content != output {
            return Err(unverified(format!(
                "the output is not the model's answer on record (its last turn, step {step}): a run completes with what its model said"
            )));
        }
        let agent = &slot.bundle.agent_spec;
        let compiled = crate::run::validate::compile(&slot.bundle.agent, &agent.validators)
            .map_err(|e| unverified(e.to_string()))?;
        let validation = crate::run::validate::check(&compiled, output);
        if let Some(failure) = validation.failures.first() {
            return Err(unverified(format!(
                "the output fails validator {failure}: a run completes only with an output every validator passes"
            )));
        }
        if validation.passed != validators {
            return Err(unverified(format!(
                "the entry says validators [{}] passed; they are [{}]",
                validators.join(", "),
                validation.passed.join(", ")
            )));
        }
        Ok(())
    }

    /// Checks what a runner's batch says of how its run ended: nothing after an end already on
    /// record, an end only as the batch's last entry, and a `completed` entry (opened as a
    /// reader would read it: from its blob, decrypted in a run about a subject) as
    /// [`Self::check_completion`] says.
    pub(super) async fn check_ending(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        log: &RunLog,
        entries: &[(StoredEntry, RecordEntry)],
    ) -> Result<(), Refusal> {
        if log.finished() && !entries.is_empty() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "run_ended",
                format!(
                    "run {} has ended on record: nothing more is written to it",
                    caller.run_id()
                ),
            ));
        }
        let ends = |e: &RecordEntry| match &e.body {
            EntryBody::Blob { body_type, .. } => body_type == "completed" || body_type == "failed",
            body => matches!(body, EntryBody::Completed { .. } | EntryBody::Failed { .. }),
        };
        let last = entries.len().saturating_sub(1);
        if entries.iter().enumerate().any(|(i, (_, e))| ends(e) && i != last) {
            return Err(bad(
                "a run's end (completed, failed) is the last entry of its batch",
            ));
        }
        let Some((_, entry)) = entries.last() else {
            return Ok(());
        };
        let mut body = match &entry.body {
            EntryBody::Completed { .. } => entry.body.clone(),
            EntryBody::Blob { blob, body_type, .. } if body_type == "completed" => {
                let bytes = self
                    .uploaded(caller, blob, run_api::NamedBy::Runner, || {
                        format!("entry {} refers to blob {blob}", entry.seq)
                    })
                    .await?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("blob {blob} is not an entry body: {e}")))?
            }
            _ => return Ok(()),
        };
        if entry.vaulted.is_some() {
            let key = self.subject_run_key(caller).await?;
            crate::records::vaulted::unlock(&mut body, Some(&key))
                .map_err(|e| bad(format!("entry {}: {e}", entry.seq)))?;
        }
        match &body {
            EntryBody::Completed { output, validators } => {
                Self::check_completion(log, slot, output, validators)
            }
            _ => Ok(()),
        }
    }

    /// `GET /v1/run/progress`: the service's signature over how far the caller's run got, as
    /// its record says, for the pod's report whatever the outcome.
    pub(super) async fn progress(State(service): State<Arc<Self>>, headers: HeaderMap) -> Reply {
        let caller = service.caller(&headers).await?;
        let slot = service.slot(&caller, &[]).await?;
        let (head, steps, tokens, ended) = {
            let mut log = crate::gateway::fair::away(slot.log.lock()).await;
            log.refresh(&service.store, &caller.tenant, caller.run_id(), &slot.gateway)
                .await
                .map_err(unavailable)?;
            (log.head(), log.ledger.steps, log.tokens_used(), log.finished())
        };
        // What is signed is durable: no head a crash could still take back (flushed after the
        // read, which may have seen entries written a moment ago).
        service.store.flush_pending().await.map_err(unavailable)?;
        let checkpoint = service
            .store
            .latest_checkpoint(&caller.tenant, &caller.context.context.session_id)
            .await
            .map_err(unavailable)?
            .filter(|c| c.run_id == caller.run_id());
        let progress = RunProgress {
            run_id: caller.run_id().to_owned(),
            pod: caller.identity.pod.clone(),
            pod_uid: caller.identity.pod_uid.clone(),
            ended,
            head: head.map(|(_, hash)| hash.to_hex()),
            steps,
            tokens,
            // Folded from the record by the refresh above.
            tool_calls: slot.gateway.calls_made(caller.run_id()),
            checkpoint: checkpoint.map(|c| (c.step, c.entry_hash.to_hex())),
        };
        if ended {
            // Asked once a run ended, as its report is written: not kept for what never comes.
            service.forget_slot(&caller);
        }
        let key = service.keys.for_tenant(caller.tenant.as_str());
        Ok(Json(SignedRunProgress::sign(progress, &key)).into_response())
    }

    /// `GET /v1/run/completion`: the service's signature over how the caller's run completed,
    /// as its record says; refused while it has not.
    pub(super) async fn completion(State(service): State<Arc<Self>>, headers: HeaderMap) -> Reply {
        let caller = service.caller(&headers).await?;
        // Only the last entry is read: a run ends with one, and nothing is written after it.
        let head = service
            .store
            .head(&caller.tenant, caller.run_id())
            .await
            .map_err(unavailable)?;
        let entries = match head {
            Some(head) => read_run_from(&service.store, &caller.tenant, caller.run_id(), head.seq)
                .await
                .map_err(unavailable)?,
            None => Vec::new(),
        };
        let Some(EntryBody::Completed { output, .. }) = entries.last().map(|(_, e)| &e.body) else {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "not_completed",
                format!("run {} has not completed on record", caller.run_id()),
            ));
        };
        let shown = shown_output(output);
        let statement = CompletedRun {
            run_id: caller.run_id(),
            shown_output: &shown,
            output_digest: CompletedRun::digest_of(output),
        };
        let signature = statement.sign(&service.keys.for_tenant(caller.tenant.as_str()));
        Ok(Json(CompletionAttestation {
            output_digest: statement.output_digest.clone(),
            shown_output: shown,
            signature,
        })
        .into_response())
    }
}
