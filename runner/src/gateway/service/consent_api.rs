//! The consent API (`/v1/consent/…`): people record grants and revocations of a subject's
//! consent in a namespace, and read its subjects' histories, with their own Kubernetes identity
//! if the API server lets them (`create` or `get` on `consents` in group `contextos.dev`
//! there). Who recorded a record and when are the gateway's to say: the authenticated user and
//! its clock, never the request's.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};

use super::*;
use crate::{
    consent::SubjectHandle,
    memory::{
        MemoryError,
        consents::{ConsentBook, ConsentRequest},
    },
    records::StoreError,
};

/// The most subjects one listing returns.
const MAX_LISTED_SUBJECTS: usize = 10_000;

#[derive(Debug, Deserialize)]
pub(super) struct HistoryQuery {
    subject: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct SubjectsQuery {
    limit: Option<usize>,
}

/// A memory or consent error as the person sees it (the consent and memory APIs).
pub(super) fn refusal(error: MemoryError) -> Refusal {
    match error {
        MemoryError::Invalid(_) | MemoryError::BadQuery(_) | MemoryError::BadConsent(_) => {
            bad(error.to_string())
        }
        MemoryError::Store(StoreError::Corrupt { .. }) => {
            tracing::error!(%error, "the store holds a corrupt value");
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt",
                format!("{error}; it is not served until it is repaired"),
            )
        }
        MemoryError::Store(StoreError::Refused(message)) => forbidden(message),
        MemoryError::Store(other) => unavailable(other),
        MemoryError::Vault(error) => vault_refusal(error),
    }
}

/// A vault error as the caller sees it: an erased subject is a conflict they can act on.
pub(super) fn vault_refusal(error: crate::vault::VaultError) -> Refusal {
    match error {
        crate::vault::VaultError::Erased { .. } => Refusal::new(
            StatusCode::CONFLICT,
            crate::records::store::remote::SUBJECT_ERASED,
            error.to_string(),
        ),
        crate::vault::VaultError::Store(StoreError::Refused(message)) => forbidden(message),
        other => unavailable(other),
    }
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn consent_append(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::RecordConsent).await?;
        let request: ConsentRequest = serde_json::from_slice(&body).map_err(|e| {
            // serde's message may quote the body: say only where it went wrong.
            let problem: String = e.to_string().chars().take(200).collect();
            bad(format!(
                "the body is not a consent request ({problem}); send subject, purpose, action (grant or revoke), \
                 categories, evidence and optionally expiresAtMs and requestId — who you are and when are \
                 recorded by the gateway"
            ))
        })?;
        if request
            .request_id
            .as_deref()
            .is_some_and(|id| id.starts_with(crate::gateway::consent_objects::OBJECT_REQUEST_PREFIX))
        {
            return Err(bad(format!(
                "requestId: ids starting with {:?} belong to Consent objects, which the gateway chains itself; choose another",
                crate::gateway::consent_objects::OBJECT_REQUEST_PREFIX
            )));
        }
        let record = request.into_record(person.username.clone(), now_ms());
        // A person withdrawing consent is always heard, whatever the namespace keeps: runs must
        // stop treating the subject as consented.
        if record.action != crate::consent::ConsentAction::Revoke {
            let size = serde_json::to_vec(&record).map_or(0, |bytes| bytes.len() as u64);
            service.tenant_room(&tenant, size).await?;
        }
        let key = service.keys.for_tenant(tenant.as_str());
        let link = ConsentBook::new(&service.store, &tenant)
            .append(record, &key)
            .await
            .map_err(refusal)?;
        // The audit trail of who changed whose consent.
        tracing::info!(user = %person.username, namespace = %tenant, subject = %link.record.subject,
            purpose = %link.record.purpose, action = ?link.record.action, seq = link.seq, "consent recorded");
        Ok(Json(link).into_response())
    }

    pub(super) async fn consent_history(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<HistoryQuery>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ReadConsents).await?;
        let subject = SubjectHandle::new(&q.subject).map_err(|e| bad(e.to_string()))?;
        let key = service.keys.for_tenant(tenant.as_str()).public();
        let history = ConsentBook::new(&service.store, &tenant)
            .history(&subject, &key)
            .await
            .map_err(refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, %subject, "consent history read");
        Ok(Json(history).into_response())
    }

    pub(super) async fn consent_subjects(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SubjectsQuery>,
    ) -> Reply {
        let (tenant, _) = service.permitted_person(&headers, Access::ReadConsents).await?;
        let limit = q
            .limit
            .unwrap_or(MAX_LISTED_SUBJECTS)
            .clamp(1, MAX_LISTED_SUBJECTS);
        let subjects = ConsentBook::new(&service.store, &tenant)
            .subjects(limit)
            .await
            .map_err(refusal)?;
        Ok(Json(subjects).into_response())
    }
}
