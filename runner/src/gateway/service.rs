//! `contextos gateway`: the Tool Gateway as an HTTP service for runner pods. A runner POSTs a
//! `CallEnvelope` to `/v1/calls`; the signed RunContext inside it is the credential. The
//! service appends to the run's record (the runner started the run) and answers with the
//! `CallOutcome`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use super::{ToolGateway, envelope::CallEnvelope};
use crate::{
    keys::KeyPair,
    policy::StateFacts,
    records::{RecordEntry, RecordStore, Recorder, TenantId},
};

/// Gateways by (tenant, agent), plus the store they record into.
#[derive(Debug)]
pub struct GatewayService<S> {
    store: S,
    /// Signs the record heads the service appends.
    record_key: KeyPair,
    gateways: HashMap<(String, String), ToolGateway>,
}

impl<S: RecordStore + 'static> GatewayService<S> {
    pub fn new(store: S, record_key: KeyPair, gateways: Vec<ToolGateway>) -> Self {
        let gateways = gateways
            .into_iter()
            .map(|g| ((g.tenant.clone(), g.agent.clone()), g))
            .collect();
        Self {
            store,
            record_key,
            gateways,
        }
    }

    /// The HTTP routes: `POST /v1/calls`, `GET /healthz`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/calls", post(Self::call))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self)
    }

    async fn call(State(service): State<Arc<Self>>, Json(envelope): Json<CallEnvelope>) -> Response {
        let context = &envelope.run_context.context;
        let key = (context.tenant_id.clone(), context.agent.name.clone());
        let Some(gateway) = service.gateways.get(&key) else {
            return problem(
                StatusCode::NOT_FOUND,
                format!("this gateway serves no agent {} in tenant {}", key.1, key.0),
            );
        };
        let tenant = match TenantId::new(&context.tenant_id) {
            Ok(t) => t,
            Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
        };
        // Another gateway replica (or this one before a restart) may have handled calls of this
        // run: what the record says wins over what this process remembers.
        match service.store.read_chain(&tenant, &context.run_id, 0).await {
            Ok(chain) => {
                let entries: Vec<RecordEntry> = chain
                    .iter()
                    .filter_map(|e| RecordEntry::decode(&e.bytes).ok())
                    .collect();
                gateway.restore(&entries);
            }
            Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
        let mut recorder = match Recorder::resume(
            &service.store,
            tenant,
            service.record_key.clone(),
            &context.run_id,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return problem(StatusCode::CONFLICT, e.to_string()),
        };
        match gateway
            .handle(&envelope, &mut recorder, &StateFacts::default())
            .await
        {
            Ok(outcome) => Json(outcome).into_response(),
            Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

fn problem(status: StatusCode, message: String) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
