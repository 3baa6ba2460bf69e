//! The runner's side of the gateway service: in a cluster a runner pod holds no credential, key
//! or store address, so everything durable or external it does — record appends and reads, tool
//! calls, model turns — is a request to the gateway service, authenticated by the pod's
//! projected token and scoped by its signed RunContext. [`GatewayClient`] holds the run's
//! [`RemoteStore`] (so the run loop's recorder works unchanged) and makes the call and model
//! requests.

use serde::{Deserialize, Serialize};

use super::{CallOutcome, envelope::CallEnvelope};
pub use crate::records::store::remote::{RUN_CONTEXT_HEADER, RemoteError, TokenSource};
use crate::{
    model::{ModelError, ModelRequest, ModelTurn},
    policy::StateFacts,
    records::{
        Hash,
        store::remote::{Credential, RemoteStore},
    },
    run_context::SignedRunContext,
};

/// How long a runner keeps asking for a call the service cannot answer yet (longer than a
/// tool's timeout, so a replica carrying it can finish).
const CALL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// `POST /v1/run/calls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRequest {
    pub envelope: CallEnvelope,
    /// The runner's Functional State (CEL `state.*`): the runner's own assessment.
    pub state: StateFacts,
}

/// `POST /v1/run/model`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCall {
    pub request: ModelRequest,
    /// The step this turn is for (1-based); a step already answered is answered again from the
    /// record, never asked twice.
    pub step: u32,
}

/// A runner's connection to the gateway service, for one run.
#[derive(Clone, Debug)]
pub struct GatewayClient {
    records: RemoteStore,
    /// The run's head after the last call or model turn, as the service answered it.
    head: std::sync::Arc<std::sync::Mutex<Option<(u64, Hash)>>>,
}

impl GatewayClient {
    /// A client for the service at `base` acting for the run `context` was issued for.
    pub fn new(base: &str, token: TokenSource, context: &SignedRunContext) -> Result<Self, RemoteError> {
        let json = serde_json::to_vec(context).map_err(|e| RemoteError::Malformed(e.to_string()))?;
        Ok(Self {
            records: RemoteStore::new(base, token, Credential::Run(json), &context.context.tenant_id)?,
            head: Default::default(),
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
    }

    /// The run's record, through the service.
    pub fn records(&self) -> &RemoteStore {
        &self.records
    }

    /// Sends one call through the service's Tool Gateway.
    pub async fn call(
        &self,
        envelope: &CallEnvelope,
        state: &StateFacts,
    ) -> Result<CallOutcome, RemoteError> {
        let request = CallRequest {
            envelope: envelope.clone(),
            state: state.clone(),
        };
        // A call another replica is still carrying (or a replica going away) is answered
        // "unavailable" for a while; the same call, with its key, is asked again until a bound.
        let give_up = std::time::Instant::now() + CALL_PATIENCE;
        loop {
            match self.records.post_json_headed("/v1/run/calls", &request).await {
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

    /// Asks the agent's model for the turn of `step`, through the service (which holds the model
    /// credentials, enforces the token budget and records the turn).
    pub async fn model(&self, request: &ModelRequest, step: u32) -> Result<ModelTurn, ModelError> {
        let body = ModelCall {
            request: request.clone(),
            step,
        };
        let answer = self.records.post_json_headed("/v1/run/model", &body).await;
        self.remember_head(answer.as_ref().ok().and_then(|(_, head)| *head));
        answer.map(|(turn, _)| turn).map_err(|e| match e {
            RemoteError::Refused { code, error, .. } if code == "token_budget" || code == "step_budget" => {
                ModelError::TokenBudget { detail: error }
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
