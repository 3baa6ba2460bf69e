//! The memory API (`/v1/memory/…`): people list a namespace's memory items (`get` on
//! `memories` in group `contextos.dev` there) and forget one item or a whole scope — a
//! subject's memory, when they ask for it (`delete` on `memories`), with their own Kubernetes
//! identity. Listing shows every item of the scope, consented or not: it is how items kept
//! against someone's wishes are found and forgotten.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::IntoResponse,
};

use super::*;
use crate::memory::{
    ItemId, ItemScope, MAX_RECALL_ITEMS, RecallQuery,
    bank::MemoryBank,
    held::HeldCandidates,
    remote::{Approved, Forgotten, HeldListed, Listed, parse_type},
};

#[derive(Debug, Deserialize)]
pub(super) struct HeldQuery {
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ItemsQuery {
    scope: String,
    #[serde(rename = "type")]
    memory_type: Option<String>,
    query: Option<String>,
    max: Option<usize>,
    #[serde(rename = "entityType")]
    entity_type: Option<String>,
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    pub(super) async fn memory_items(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<ItemsQuery>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ReadMemory).await?;
        let scope: ItemScope = q.scope.parse().map_err(super::consent_api::refusal)?;
        let query = RecallQuery {
            scope,
            memory_type: q
                .memory_type
                .as_deref()
                .map(parse_type)
                .transpose()
                .map_err(super::consent_api::refusal)?,
            text: q.query.unwrap_or_default(),
            max_items: q.max.unwrap_or(20).clamp(1, MAX_RECALL_ITEMS),
            purpose: None,
            entity_type: q
                .entity_type
                .as_deref()
                .map(crate::ontology::EntityTypeName::new)
                .transpose()
                .map_err(|why| {
                    super::consent_api::refusal(crate::memory::MemoryError::BadQuery(format!(
                        "entityType: {why}"
                    )))
                })?,
        };
        let recalled = MemoryBank::new(&service.store, &tenant)
            .recall(&query, |_| Ok(()))
            .await
            .map_err(super::consent_api::refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, scope = %query.scope, "memory listed");
        let listed: Vec<Listed> = recalled
            .offered
            .into_iter()
            .map(|(id, item)| Listed { id, item })
            .collect();
        Ok(Json(listed).into_response())
    }

    pub(super) async fn memory_forget_item(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(id): Path<String>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ForgetMemory).await?;
        let id = crate::records::Hash::parse(&id)
            .map(ItemId)
            .ok_or_else(|| bad("an item id is 64 hex digits (sha256:… accepted)"))?;
        let forgotten = MemoryBank::new(&service.store, &tenant)
            .forget(&id)
            .await
            .map_err(super::consent_api::refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, item = %id, forgotten, "memory item forgotten");
        Ok(Json(Forgotten {
            forgotten: usize::from(forgotten),
        })
        .into_response())
    }

    pub(super) async fn memory_forget_scope(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(scope): Path<String>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ForgetMemory).await?;
        let scope: ItemScope = scope.parse().map_err(super::consent_api::refusal)?;
        let forgotten = MemoryBank::new(&service.store, &tenant)
            .forget_scope_and_held(&scope)
            .await
            .map_err(super::consent_api::refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, %scope, forgotten, "memory scope forgotten");
        Ok(Json(Forgotten { forgotten }).into_response())
    }

    pub(super) async fn memory_held(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<HeldQuery>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ReadMemory).await?;
        let scope = q
            .scope
            .as_deref()
            .map(str::parse::<ItemScope>)
            .transpose()
            .map_err(super::consent_api::refusal)?;
        let held = HeldCandidates::new(&service.store, &tenant)
            .list(scope.as_ref(), now_ms())
            .await
            .map_err(super::consent_api::refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, held = held.len(), "held memory candidates listed");
        let listed: Vec<HeldListed> = held
            .into_iter()
            .map(|(id, held)| HeldListed { id, held })
            .collect();
        Ok(Json(listed).into_response())
    }

    pub(super) async fn memory_approve_held(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(id): Path<String>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::KeepMemory).await?;
        let id = item_id(&id)?;
        let key = service.keys.for_tenant(tenant.as_str()).public();
        let kept = HeldCandidates::new(&service.store, &tenant)
            .approve_under_consent(&id, &person.username, now_ms(), &key)
            .await
            .map_err(super::consent_api::refusal)?;
        let approved = Approved::from(kept);
        // The audit trail of who kept what about whom.
        tracing::info!(user = %person.username, namespace = %tenant, candidate = %id, item = %approved.item, "held memory candidate approved");
        Ok(Json(approved).into_response())
    }

    pub(super) async fn memory_reject_held(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(id): Path<String>,
    ) -> Reply {
        let (tenant, person) = service.permitted_person(&headers, Access::ForgetMemory).await?;
        let id = item_id(&id)?;
        let rejected = HeldCandidates::new(&service.store, &tenant)
            .reject(&id)
            .await
            .map_err(super::consent_api::refusal)?;
        tracing::info!(user = %person.username, namespace = %tenant, candidate = %id, rejected, "held memory candidate rejected");
        Ok(Json(Forgotten {
            forgotten: usize::from(rejected),
        })
        .into_response())
    }
}

fn item_id(text: &str) -> Result<ItemId, Refusal> {
    crate::records::Hash::parse(text)
        .map(ItemId)
        .ok_or_else(|| bad("an item id is 64 hex digits (sha256:… accepted)"))
}
