//! The identity vault through the gateway service's person API (`/v1/subjects/…`): erase a
//! subject, see whether they are, rotate the tenant's key-encryption key. The service checks
//! the person's own Kubernetes permissions (`delete` on `subjects.contextos.dev` to erase or
//! rotate, `get` to look) and records who they are from their token.

use serde::{Deserialize, Serialize};

use super::{Erased, Erasure, KeyState, Rotation};
use crate::{consent::SubjectHandle, records::store::remote::RemoteStore};

pub const SUBJECT_ERASE_PATH: &str = "/v1/subjects/erase";
pub const SUBJECT_STATE_PATH: &str = "/v1/subjects/state";
pub const SUBJECT_ROTATE_PATH: &str = "/v1/subjects/rotate-keys";

/// What the vault holds for a subject, as shown to a person (never their key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum SubjectState {
    /// Something is kept about them: their data key exists.
    Active,
    Erased {
        #[serde(flatten)]
        erasure: Erasure,
    },
    /// Nothing was ever kept about them.
    Unknown,
}

impl SubjectState {
    pub fn of(state: &KeyState) -> Self {
        match state {
            KeyState::Active(_) => Self::Active,
            KeyState::Erased(erasure) => Self::Erased {
                erasure: erasure.clone(),
            },
            KeyState::Unknown => Self::Unknown,
        }
    }
}

/// What a person asks to erase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EraseRequest {
    pub subject: SubjectHandle,
}

/// The person API's vault operations, through a reader's [`RemoteStore`].
#[derive(Debug)]
pub struct SubjectsApi<'s>(pub &'s RemoteStore);

impl SubjectsApi<'_> {
    pub async fn erase(&self, subject: &SubjectHandle) -> anyhow::Result<Erased> {
        Ok(self
            .0
            .post_json(
                SUBJECT_ERASE_PATH,
                &EraseRequest {
                    subject: subject.clone(),
                },
            )
            .await?)
    }

    pub async fn state(&self, subject: &SubjectHandle) -> anyhow::Result<SubjectState> {
        Ok(self
            .0
            .get_json(&format!("{SUBJECT_STATE_PATH}?subject={subject}"))
            .await?)
    }

    pub async fn rotate(&self) -> anyhow::Result<Rotation> {
        Ok(self
            .0
            .post_json(SUBJECT_ROTATE_PATH, &serde_json::json!({}))
            .await?)
    }
}
