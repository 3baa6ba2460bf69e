//! Memory as a person reaches it through the gateway service (`contextos memory … --store
//! gateway+http://…` with their own token): listing a scope's items (`get` on `memories` in the
//! namespace) and forgetting one item or a whole scope (`delete` on `memories`).

use serde::{Deserialize, Serialize};

use super::{ItemId, ItemScope, MemoryError, MemoryItem, MemoryType};
use crate::records::{StoreError, store::remote::RemoteStore};

/// The gateway service's routes for memory.
pub const MEMORY_ITEMS_PATH: &str = "/v1/memory/items";
/// `DELETE` + item id.
pub const MEMORY_ITEM_PREFIX: &str = "/v1/memory/items/";
/// `DELETE` + scope (`agent:<name>`, `subject:<handle>`, `tenant`).
pub const MEMORY_SCOPE_PREFIX: &str = "/v1/memory/scopes/";

/// `GET` held candidates (`?scope=`).
pub const MEMORY_HELD_PATH: &str = "/v1/memory/held";
/// `POST` (approve) or `DELETE` (reject) + candidate id.
pub const MEMORY_HELD_PREFIX: &str = "/v1/memory/held/";

/// One held candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldListed {
    pub id: ItemId,
    pub held: super::held::Held,
}

/// What an approval kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    /// The kept item (its provenance names the reviewer, so its id is not the candidate's).
    pub item: ItemId,
    /// Whether the same thing was kept already.
    pub already_kept: bool,
}

impl From<super::bank::Kept> for Approved {
    fn from(kept: super::bank::Kept) -> Self {
        match kept {
            super::bank::Kept::New(item) => Self {
                item,
                already_kept: false,
            },
            super::bank::Kept::AlreadyKept(item) => Self {
                item,
                already_kept: true,
            },
        }
    }
}

/// One listed item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub id: ItemId,
    pub item: MemoryItem,
}

/// How many were forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub forgotten: usize,
}

fn remote(error: impl std::fmt::Display) -> MemoryError {
    MemoryError::Store(StoreError::Backend(error.to_string()))
}

/// The memory API of the gateway service, for one person in one namespace.
#[derive(Debug)]
pub struct RemoteMemory<'s>(pub &'s RemoteStore);

impl RemoteMemory<'_> {
    /// The newest `max` items of `scope` (of `memory_type`, holding every word of `query`).
    pub async fn list(
        &self,
        scope: &ItemScope,
        memory_type: Option<MemoryType>,
        query: &str,
        max: usize,
        entity_type: Option<&crate::ontology::EntityTypeName>,
    ) -> Result<Vec<Listed>, MemoryError> {
        let mut url = reqwest::Url::parse("http://x/").map_err(remote)?;
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("scope", &scope.to_string());
            pairs.append_pair("max", &max.to_string());
            if !query.is_empty() {
                pairs.append_pair("query", query);
            }
            if let Some(memory_type) = memory_type {
                pairs.append_pair("type", type_name(memory_type));
            }
            if let Some(entity_type) = entity_type {
                pairs.append_pair("entityType", entity_type.as_str());
            }
        }
        let path = format!("{MEMORY_ITEMS_PATH}?{}", url.query().unwrap_or_default());
        self.0.get_json(&path).await.map_err(remote)
    }

    pub async fn forget(&self, id: &ItemId) -> Result<bool, MemoryError> {
        let answer: Forgotten = self
            .0
            .delete_json(&format!("{MEMORY_ITEM_PREFIX}{id}"))
            .await
            .map_err(remote)?;
        Ok(answer.forgotten > 0)
    }

    /// Candidates held for review, of `scope` if given.
    pub async fn held(&self, scope: Option<&ItemScope>) -> Result<Vec<HeldListed>, MemoryError> {
        let path = match scope {
            Some(scope) => {
                let mut url = reqwest::Url::parse("http://x/").map_err(remote)?;
                url.query_pairs_mut().append_pair("scope", &scope.to_string());
                format!("{MEMORY_HELD_PATH}?{}", url.query().unwrap_or_default())
            }
            None => MEMORY_HELD_PATH.to_owned(),
        };
        self.0.get_json(&path).await.map_err(remote)
    }

    /// Approves the held candidate `id` in the caller's name.
    pub async fn approve(&self, id: &ItemId) -> Result<Approved, MemoryError> {
        self.0
            .post_json(&format!("{MEMORY_HELD_PREFIX}{id}"), &serde_json::json!({}))
            .await
            .map_err(remote)
    }

    /// Rejects the held candidate `id`; whether it was held.
    pub async fn reject(&self, id: &ItemId) -> Result<bool, MemoryError> {
        let answer: Forgotten = self
            .0
            .delete_json(&format!("{MEMORY_HELD_PREFIX}{id}"))
            .await
            .map_err(remote)?;
        Ok(answer.forgotten > 0)
    }

    pub async fn forget_scope(&self, scope: &ItemScope) -> Result<usize, MemoryError> {
        let answer: Forgotten = self
            .0
            .delete_json(&format!("{MEMORY_SCOPE_PREFIX}{scope}"))
            .await
            .map_err(remote)?;
        Ok(answer.forgotten)
    }
}

/// A type as the API and the CLI name it.
pub fn type_name(memory_type: MemoryType) -> &'static str {
    match memory_type {
        MemoryType::Fact => "fact",
        MemoryType::Preference => "preference",
        MemoryType::Procedure => "procedure",
        MemoryType::Episode => "episode",
    }
}

/// The type named `text`.
pub fn parse_type(text: &str) -> Result<MemoryType, MemoryError> {
    match text {
        "fact" => Ok(MemoryType::Fact),
        "preference" => Ok(MemoryType::Preference),
        "procedure" => Ok(MemoryType::Procedure),
        "episode" => Ok(MemoryType::Episode),
        other => Err(MemoryError::BadQuery(format!(
            "type {:?}: use fact, preference, procedure or episode",
            other.chars().take(32).collect::<String>()
        ))),
    }
}
