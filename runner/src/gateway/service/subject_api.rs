//! The subject API (`/v1/subjects/…`): people erase a subject of a namespace (`delete` on
//! `subjects` in group `contextos.dev` there), see whether one is erased (`get`), and rotate
//! the namespace's key-encryption key (`delete`) — with their own Kubernetes identity, which
//! the erasure records. And the run key endpoints (`…/key`): a runner pod's own run's key, and
//! a reader's for a run they may read — never a subject's data key.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::HeaderMap,
    response::IntoResponse,
};

use super::*;
use crate::{
    consent::SubjectHandle,
    records::store::remote::KeyAnswer,
    vault::{
        KeyUse, Vault,
        remote::{EraseRequest, SubjectState},
    },
};

#[derive(Debug, Deserialize)]
pub(super) struct SubjectQuery {
    subject: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct KeyQuery {
    run: String,
    subject: String,
    #[serde(rename = "use")]
    to: String,
}

impl KeyQuery {
    fn subject(&self) -> Result<SubjectHandle, Refusal> {
        SubjectHandle::new(&self.subject).map_err(|e| bad(format!("subject: {e}")))
    }

    fn to(&self) -> Result<KeyUse, Refusal> {
        match self.to.as_str() {
            "read" => Ok(KeyUse::Read),
            "keep" => Ok(KeyUse::Keep),
            other => Err(bad(format!("use={other:?}: read or keep"))),
        }
    }
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn subject_erase(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::EraseSubject).await?;
        let request: EraseRequest = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let erased = Vault::new(&service.store, tenant.clone())
            .erase(&request.subject, &person.username, now_ms())
            .await
            .map_err(super::consent_api::vault_refusal)?;
        // The audit trail of erasures (the vault keeps the first one's author and time).
        tracing::info!(user = %person.username, namespace = %tenant, subject = %request.subject,
            memory_forgotten = erased.memory_forgotten, key_epoch = erased.rotation.epoch, "subject erased");
        Ok(Json(erased).into_response())
    }

    pub(super) async fn subject_state(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SubjectQuery>,
    ) -> Reply {
        let (tenant, _) = service.permitted_person(&headers, Access::ReadSubjects).await?;
        let subject = SubjectHandle::new(&q.subject).map_err(|e| bad(format!("subject: {e}")))?;
        let state = Vault::new(&service.store, tenant)
            .key(&subject)
            .await
            .map_err(super::consent_api::vault_refusal)?;
        Ok(Json(SubjectState::of(&state)).into_response())
    }

    pub(super) async fn subject_rotate(State(service): State<Arc<Self>>, headers: HeaderMap) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::EraseSubject).await?;
        let rotation = Vault::new(&service.store, tenant.clone())
            .rotate()
            .await
            .map_err(super::consent_api::vault_refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, key_epoch = rotation.epoch,
            rewrapped = rotation.rewrapped, "key-encryption key rotated");
        Ok(Json(rotation).into_response())
    }

    /// A runner pod's own run's key — only for the subject its RunContext names. To keep, the
    /// subject's data key is made if needed; once they are erased, the run may keep nothing.
    pub(super) async fn run_key(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<KeyQuery>,
    ) -> Reply {
        let caller = service.caller(&headers).await?;
        service.own_run(&caller, &q.run).await?;
        let subject = q.subject()?;
        if caller.context.context.subject.as_ref() != Some(&subject) {
            return Err(forbidden(
                "a run's key is given only for the subject its RunContext names",
            ));
        }
        let key = service
            .store
            .run_key(&caller.tenant, caller.run_id(), &subject, q.to()?)
            .await
            .map_err(super::consent_api::vault_refusal)?;
        Ok(Json(KeyAnswer::of(key.as_ref())).into_response())
    }

    /// The key of a run a reader may read (its records' readers see what the run recorded),
    /// to read only; the run's subject is taken from its record, never from the request.
    pub(super) async fn reader_run_key(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<KeyQuery>,
    ) -> Reply {
        // People who may read the namespace's records only: a replay Job's grant does not
        // reach keys (its gate is replayed by the gateway itself).
        let (tenant, _) = service.permitted_person(&headers, Access::ReadRecords).await?;
        if q.to()? != KeyUse::Read {
            return Err(forbidden("a reader reads: only a run's own pod keeps"));
        }
        let first = service
            .store
            .read_chain_page(&tenant, &q.run, 0, 1)
            .await
            .map_err(unavailable)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no run {} in namespace {tenant}", q.run),
                )
            })?;
        let about = crate::records::RecordEntry::decode(&first.bytes)
            .map_err(|e| unavailable(format!("run {}: its first entry is unreadable: {e}", q.run)))?
            .vaulted;
        let subject = q.subject()?;
        if about.as_ref() != Some(&subject) {
            return Err(bad(format!("run {} is not about subject {subject}", q.run)));
        }
        let key = service
            .store
            .run_key(&tenant, &q.run, &subject, KeyUse::Read)
            .await
            .map_err(super::consent_api::vault_refusal)?;
        Ok(Json(KeyAnswer::of(key.as_ref())).into_response())
    }
}
