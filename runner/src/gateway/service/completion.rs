//! How a run completes through the gateway service. A runner writes its own `completed` entry
//! (it runs the loop), so the service checks it before it is written: the output must be the
//! model's last answer on record — a turn the service itself asked for and recorded — and pass
//! every validator of the run's Agent. Then, asked at `/v1/run/completion`, the service signs
//! what the record says (a [`CompletedRun`]) for the runner to relay in its report: the operator
//! marks a Session Succeeded, and shows its output, only on that signature. A runner (or anyone
//! who can write its termination message) cannot make a Session succeed with an output the
//! model did not give or the validators refuse.

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
    gateway::approvals::{Attested as _, CompletedRun},
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
    Refusal(StatusCode::UNPROCESSABLE_ENTITY, COMPLETION_UNVERIFIED, why)
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// Whether a runner's `completed` entry (`output`, and the `validators` it says passed) may
    /// be written for `slot`'s run.
    pub(super) async fn check_completion(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        output: &str,
        validators: &[String],
    ) -> Result<(), Refusal> {
        let entries = read_run_from(&self.store, &caller.tenant, caller.run_id(), 0)
            .await
            .map_err(unavailable)?;
        let last = entries.iter().rev().find_map(|(_, e)| match &e.body {
            EntryBody::ModelTurn { step, response, .. } => Some((*step, response)),
            _ => None,
        });
        let Some((step, response)) = last else {
            return Err(unverified(
                "the run has no model turn on record: its output can only be a model's answer".into(),
            ));
        };
        let answer = serde_json::from_value::<crate::model::ModelTurn>(response.clone())
            .map(|turn| turn.content)
            .ok();
        if answer.as_deref() != Some(output) {
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

    /// Checks every `completed` entry a runner sends (see [`Self::check_completion`]), opened as
    /// a reader would read it: from its blob, and decrypted in a run about a subject.
    pub(super) async fn check_completions(
        &self,
        caller: &Caller,
        slot: &RunSlot,
        entries: &[(StoredEntry, RecordEntry)],
    ) -> Result<(), Refusal> {
        for (_, entry) in entries {
            let mut body = match &entry.body {
                EntryBody::Completed { .. } => entry.body.clone(),
                EntryBody::Blob { blob, body_type, .. } if body_type == "completed" => {
                    let bytes = self
                        .uploaded(caller, blob, || {
                            format!("entry {} refers to blob {blob}", entry.seq)
                        })
                        .await?;
                    serde_json::from_slice(&bytes)
                        .map_err(|e| bad(format!("blob {blob} is not an entry body: {e}")))?
                }
                _ => continue,
            };
            if entry.vaulted.is_some() {
                let key = self.subject_run_key(caller).await?;
                crate::records::vaulted::unlock(&mut body, Some(&key))
                    .map_err(|e| bad(format!("entry {}: {e}", entry.seq)))?;
            }
            if let EntryBody::Completed { output, validators } = &body {
                self.check_completion(caller, slot, output, validators).await?;
            }
        }
        Ok(())
    }

    /// `GET /v1/run/completion`: the service's signature over how the caller's run completed,
    /// as its record says; refused while it has not.
    pub(super) async fn completion(State(service): State<Arc<Self>>, headers: HeaderMap) -> Reply {
        let caller = service.caller(&headers).await?;
        let entries = read_run_from(&service.store, &caller.tenant, caller.run_id(), 0)
            .await
            .map_err(unavailable)?;
        let Some(EntryBody::Completed { output, .. }) = entries.last().map(|(_, e)| &e.body) else {
            return Err(Refusal(
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
