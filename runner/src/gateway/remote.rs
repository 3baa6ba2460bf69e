//! The runner's side of the gateway service: in a cluster a runner pod holds no credential, key
//! or store address, so everything durable or external it does — record appends and reads, tool
//! calls, model turns — is a request to the gateway service, authenticated by the pod's
//! projected token and scoped by its signed RunContext. [`GatewayClient`] holds the run's
//! [`RemoteStore`] (so the run loop's recorder works unchanged) and makes the call and model
//! requests.

use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use super::{CallOutcome, envelope::CallEnvelope};
pub use crate::records::store::remote::{RUN_CONTEXT_HEADER, RemoteError, TokenSource, WireEntry};
use crate::{
    model::{ModelError, ModelRequest, ModelTurn},
    policy::StateFacts,
    records::{
        Hash,
        recorder::Prepared,
        store::remote::{Credential, RemoteStore, head_header_value, parse_head_header},
    },
    run_context::SignedRunContext,
};

/// How long a runner keeps asking for a call the service cannot answer yet (longer than a
/// tool's timeout, so a replica carrying it can finish).
const CALL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// The code of a refusal whose told head is past the record's end: the replica that answered
/// may still be writing it.
pub const HEAD_PENDING: &str = "head_pending";

/// The code of a refusal whose told head is not on record: a different entry holds its place,
/// or it never arrived.
pub const HEAD_UNRECORDED: &str = "head_unrecorded";

/// How long a runner keeps asking while its told head is [`HEAD_PENDING`] (a write takes
/// milliseconds; one that has not landed by then is lost, and the service says so).
const PENDING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest pause between asking again for a request a SpendQuota holds back.
const QUOTA_WAIT_MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(15);
/// The shortest such pause.
const QUOTA_WAIT_MIN_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long to wait before asking again for a request a SpendQuota holds back: what the service
/// said (`Retry-After`: when the window frees enough, or a hold in flight ends) if it said,
/// else the backoff; within [`QUOTA_WAIT_MIN_PAUSE`] and [`QUOTA_WAIT_MAX_PAUSE`] (a window
/// ending in an hour is asked about again meanwhile: a hold released early frees it sooner).
fn quota_pause(told: Option<std::time::Duration>, backoff: std::time::Duration) -> std::time::Duration {
    told.unwrap_or(backoff)
        .clamp(QUOTA_WAIT_MIN_PAUSE, QUOTA_WAIT_MAX_PAUSE)
}

/// `POST /v1/run/calls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRequest {
    pub envelope: CallEnvelope,
    /// The runner's Functional State (CEL `state.*`): the runner's own assessment.
    pub state: StateFacts,
    pub tail: RunnerTail,
}

/// `POST /v1/run/model`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCall {
    pub request: ModelRequest,
    /// The step this turn is for (1-based); a step already answered is answered again from the
    /// record, never asked twice.
    pub step: u32,
    pub tail: RunnerTail,
}

/// `POST /v1/run/recall`: the memory sources of the run's ContextPack, recalled by the service
/// and recorded there — once per run; asked again, it answers from the record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecallCall {
    pub tail: RunnerTail,
}

/// Where the runner's record stands as it asks: the head it was last told, and its own entries
/// (context compiled, verdicts, checkpoints) chained on that head, which the service writes
/// ahead of what it records for the request — one round trip and one durable write for both.
///
/// The service may answer a call or a model turn before the entries it wrote for it are durable
/// (the answer and the write overlap). The head a runner tells proves what it heard is on
/// record: a service that does not hold that head refuses the request (`head_unrecorded`), so
/// nothing is ever decided on a result the record lost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunnerTail {
    /// `<seq>.<hash>` of the newest entry the runner knows is on record.
    pub head: String,
    #[serde(default)]
    pub entries: Vec<WireEntry>,
}

impl RunnerTail {
    /// The runner at `head`, with `prepared` (its own entries) chained on it, if any.
    pub fn new(head: (u64, Hash), prepared: Option<&Prepared>) -> Self {
        Self {
            head: head_header_value(head.0, &head.1),
            entries: prepared
                .map(|p| p.entries().iter().map(WireEntry::of).collect())
                .unwrap_or_default(),
        }
    }

    /// The told head; `None` if it is not `<seq>.<hash>`.
    pub fn told_head(&self) -> Option<(u64, Hash)> {
        parse_head_header(&self.head)
    }
}

/// A runner's connection to the gateway service, for one run.
#[derive(Clone, Debug)]
pub struct GatewayClient {
    records: RemoteStore,
    tenant: crate::records::TenantId,
    run_id: String,
    /// The run's head after the last call or model turn, as the service answered it, until
    /// taken.
    head: std::sync::Arc<std::sync::Mutex<Option<(u64, Hash)>>>,
    /// The newest head the service answered.
    known: std::sync::Arc<std::sync::Mutex<Option<(u64, Hash)>>>,
}

impl GatewayClient {
    /// A client for the service at `base` acting for the run `context` was issued for.
    pub fn new(base: &str, token: TokenSource, context: &SignedRunContext) -> Result<Self, RemoteError> {
        let json = serde_json::to_vec(context).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        Ok(Self {
            records: RemoteStore::new(base, token, Credential::Run(json), &context.context.tenant_id)?,
            tenant: crate::records::TenantId::new(context.context.tenant_id.clone())
                .map_err(|e| RemoteError::Malformed(e.to_string()))?,
            run_id: context.context.run_id.clone(),
            head: Default::default(),
            known: Default::default(),
        })
    }

    /// The run's head after the last call or model turn (the entries the service wrote for it
    /// end there), once; `None` if the service did not say.
    pub fn take_head(&self) -> Option<(u64, Hash)> {
        self.head.lock().ok().and_then(|mut head| head.take())
    }

    fn remember_head(&self, head: Option<(u64, Hash)>) {
        if let Ok(mut last) = self.head.lock() {
            *last = head;
        }
        if let (Some(head), Ok(mut known)) = (head, self.known.lock()) {
            *known = Some(head);
        }
    }

    /// A tail with no entries, at the newest head the service answered this client (read from
    /// the service if it answered none): for callers that keep no recorder of their own.
    pub async fn current_tail(&self) -> Result<RunnerTail, RemoteError> {
        let known = self.known.lock().ok().and_then(|k| *k);
        let head = match known {
            Some(head) => head,
            None => {
                use crate::records::RecordStore as _;
                let head = self
                    .records
                    .head(&self.tenant, &self.run_id)
                    .await
                    .map_err(|e| RemoteError::Malformed(e.to_string()))?
                    .ok_or_else(|| RemoteError::Malformed(format!("run {} has not started", self.run_id)))?;
                (head.seq, head.hash)
            }
        };
        Ok(RunnerTail::new(head, None))
    }

    /// POSTs a call or model request; while the service says the entries this runner was told
    /// of are still being written ([`HEAD_PENDING`]), asks again, for a bounded time.
    async fn post_told<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, Option<(u64, Hash)>), RemoteError> {
        let give_up = std::time::Instant::now() + PENDING_PATIENCE;
        let mut pause = std::time::Duration::from_millis(20);
        let mut backoff = QUOTA_WAIT_MIN_PAUSE;
        loop {
            match self.records.post_json_headed(path, body).await {
                // A SpendQuota holds the request until its window allows it: asked again, for as
                // long as it takes (the Session's deadline bounds the pod).
                Err(RemoteError::Refused {
                    code,
                    error,
                    retry_after,
                    ..
                }) if code == crate::gateway::service::quotas::QUOTA_WAIT_CODE => {
                    let pause = quota_pause(retry_after, backoff);
                    tracing::info!(%error, wait_ms = pause.as_millis() as u64, "waiting for a SpendQuota's window");
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(QUOTA_WAIT_MAX_PAUSE);
                }
                Err(RemoteError::Refused { code, .. }) if code == HEAD_PENDING => {
                    if std::time::Instant::now() >= give_up {
                        return Err(RemoteError::Refused {
                            code: HEAD_UNRECORDED.into(),
                            error: format!(
                                "the entries this runner was told of did not reach the record within {} s (the gateway replica that answered failed before they were durable); this attempt ends and the next one resumes from the record",
                                PENDING_PATIENCE.as_secs()
                            ),
                            status: 409,
                            retry_after: None,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// The service's signed word on how the run completed, for the pod's report (the operator
    /// believes a completion only with it).
    pub async fn completion(
        &self,
    ) -> Result<crate::gateway::service::completion::CompletionAttestation, RemoteError> {
        self.records.get_json("/v1/run/completion").await
    }

    /// The service's signed word on how far the run got, for the pod's report (the operator
    /// shows a Session's progress only from it).
    pub async fn progress(&self) -> Result<crate::gateway::approvals::SignedRunProgress, RemoteError> {
        self.records.get_json("/v1/run/progress").await
    }

    /// The run's record, through the service.
    pub fn records(&self) -> &RemoteStore {
        &self.records
    }

    /// Sends one call through the service's Tool Gateway, at [`GatewayClient::current_tail`].
    pub async fn call(
        &self,
        envelope: &CallEnvelope,
        state: &StateFacts,
    ) -> Result<CallOutcome, RemoteError> {
        let tail = self
            .current_tail()
            .instrument(tracing::debug_span!("runner.current_tail"))
            .await?;
        self.call_with(envelope, state, tail)
            .instrument(tracing::debug_span!("runner.call"))
            .await
    }

    /// Sends one call through the service's Tool Gateway, with the runner's `tail`.
    pub async fn call_with(
        &self,
        envelope: &CallEnvelope,
        state: &StateFacts,
        tail: RunnerTail,
    ) -> Result<CallOutcome, RemoteError> {
        let request = CallRequest {
            envelope: envelope.clone(),
            state: state.clone(),
            tail,
        };
        // A call another replica is still carrying (or a replica going away) is answered
        // "unavailable" for a while; the same call, with its key, is asked again until a bound.
        let give_up = std::time::Instant::now() + CALL_PATIENCE;
        loop {
            match self.post_told("/v1/run/calls", &request).await {
                Err(RemoteError::Unreachable { .. }) if std::time::Instant::now() < give_up => {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Ok((outcome, head)) => {
                    self.remember_head(head);
                    return Ok(outcome);
                }
                Err(e) => {
                    self.remember_head(None);
                    return Err(e);
                }
            }
        }
    }

    /// Recalls the run's ContextPack memory sources through the service, which reads the
    /// memory and consents and records what it offered.
    pub async fn recall_with(
        &self,
        tail: RunnerTail,
    ) -> Result<Vec<crate::memory::desk::RecallRecord>, RemoteError> {
        let answer = self.post_told("/v1/run/recall", &RecallCall { tail }).await;
        self.remember_head(answer.as_ref().ok().and_then(|(_, head)| *head));
        answer.map(|(records, _)| records)
    }

    /// Asks the agent's model for the turn of `step`, through the service (which holds the model
    /// credentials, enforces the token budget and records the turn).
    pub async fn model(&self, request: &ModelRequest, step: u32) -> Result<ModelTurn, ModelError> {
        let tail = self.current_tail().await.map_err(|e| ModelError::Unreachable {
            endpoint: format!("{}/v1/run/model", self.records.base()),
            detail: e.to_string(),
        })?;
        self.model_with(request, step, tail).await
    }

    /// [`GatewayClient::model`] with the runner's `tail`.
    pub async fn model_with(
        &self,
        request: &ModelRequest,
        step: u32,
        tail: RunnerTail,
    ) -> Result<ModelTurn, ModelError> {
        let body = ModelCall {
            request: request.clone(),
            step,
            tail,
        };
        let answer = self.post_told("/v1/run/model", &body).await;
        self.remember_head(answer.as_ref().ok().and_then(|(_, head)| *head));
        answer.map(|(turn, _)| turn).map_err(|e| match e {
            RemoteError::Refused { code, error, .. } if code == "token_budget" || code == "step_budget" => {
                ModelError::TokenBudget { detail: error }
            }
            RemoteError::Refused { code, error, .. }
                if code == crate::gateway::service::quotas::QUOTA_EXCEEDED_CODE =>
            {
                ModelError::QuotaExceeded { detail: error }
            }
            RemoteError::Refused { code, error, .. }
                if code == crate::records::store::remote::QUOTA_EXCEEDED =>
            {
                ModelError::StoreQuotaExceeded { detail: error }
            }
            RemoteError::Refused { code, error, .. } if code == "model_script" => ModelError::BadScript {
                script: "the agent's script (at the gateway service)".into(),
                detail: error,
            },
            other => ModelError::Unreachable {
                endpoint: format!("{}/v1/run/model", self.records.base()),
                detail: other.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::quota_pause;

    #[test]
    fn a_held_back_request_waits_as_the_service_says_within_bounds() {
        let backoff = Duration::from_secs(2);
        // Told: as told, not the backoff (sooner or later than it).
        assert_eq!(
            quota_pause(Some(Duration::from_secs(1)), backoff),
            Duration::from_secs(1)
        );
        assert_eq!(
            quota_pause(Some(Duration::from_secs(7)), backoff),
            Duration::from_secs(7)
        );
        // A window ending in an hour is asked about again within 15 s; never at once.
        assert_eq!(
            quota_pause(Some(Duration::from_secs(3600)), backoff),
            Duration::from_secs(15)
        );
        assert_eq!(
            quota_pause(Some(Duration::ZERO), backoff),
            Duration::from_millis(500)
        );
        // Not told: the backoff.
        assert_eq!(quota_pause(None, backoff), backoff);
    }
}
