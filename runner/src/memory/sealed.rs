//! A subject's memory at rest: the text of their items and held candidates is encrypted under
//! their memory key (derived from their data key in the identity vault, see `crate::vault`),
//! and the index rows and markers that stand for what the text says are keyed digests under
//! it, so neither a copy of the store nor its index tells what they say — and once the subject
//! is erased, nothing opens them. Agent and tenant memory hold no one's personal data and are
//! kept as they are.

use std::{collections::BTreeMap, sync::Mutex};

use super::{ItemScope, MemoryError, MemoryItem, backend::MemoryBackend, terms::TermKey};
use crate::{
    consent::SubjectHandle,
    records::TenantId,
    vault::{KeyUse, SecretKey, Vault, cipher},
};

/// What an item's text is bound to when encrypted.
const TEXT_LABEL: &str = "memory.text";
/// What an item's text and the entities it refers to are bound to, encrypted together (as
/// JSON) when it refers to any: which incidents a person's memory is about is theirs too.
const TEXT_AND_ENTITIES_LABEL: &str = "memory.text+entities";

/// The plaintext of [`TEXT_AND_ENTITIES_LABEL`].
#[derive(serde::Serialize, serde::Deserialize)]
struct TextAndEntities {
    text: String,
    entities: std::collections::BTreeSet<crate::ontology::EntityRef>,
}

/// The memory keys of the subjects a bank or a list of held candidates touches, read from the
/// vault once each.
pub struct ScopeKeys<'s, S> {
    store: &'s S,
    tenant: TenantId,
    known: Mutex<BTreeMap<SubjectHandle, SecretKey>>,
}

impl<S> std::fmt::Debug for ScopeKeys<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeKeys")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl<'s, S: MemoryBackend> ScopeKeys<'s, S> {
    pub fn new(store: &'s S, tenant: &TenantId) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
            known: Mutex::new(BTreeMap::new()),
        }
    }

    /// Uses `key` for `subject` instead of asking the vault (an erasure, which has begun, still
    /// opens their memory to forget it).
    pub fn give(&self, subject: SubjectHandle, key: SecretKey) {
        self.lock().insert(subject, key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SubjectHandle, SecretKey>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key of `scope`'s memory: none for an agent's or the tenant's. For a subject's: to
    /// read, none once they are erased (nothing of theirs opens); to keep, made if they have
    /// none yet, refused once they are erased.
    pub async fn key(&self, scope: &ItemScope, to: KeyUse) -> Result<Option<SecretKey>, MemoryError> {
        let Some(subject) = scope.subject() else {
            return Ok(None);
        };
        if let Some(key) = self.lock().get(subject) {
            return Ok(Some(key.clone()));
        }
        let key = Vault::new(self.store, self.tenant.clone())
            .memory_key(subject, to)
            .await
            .map_err(MemoryError::Vault)?;
        if let Some(key) = &key {
            self.lock().insert(subject.clone(), key.clone());
        }
        Ok(key)
    }
}

/// `item` as stored: a subject's text encrypted under `key`.
pub fn seal(item: &MemoryItem, key: Option<&SecretKey>) -> Result<MemoryItem, MemoryError> {
    let mut stored = item.clone();
    if item.scope.subject().is_some() {
        let key = key
            .ok_or_else(|| MemoryError::Invalid(format!("scope {}: no key to keep it under", item.scope)))?;
        stored.text = if item.entities.is_empty() {
            key.lock(TEXT_LABEL, item.text.as_bytes())
        } else {
            let plain = serde_json::to_vec(&TextAndEntities {
                text: item.text.clone(),
                entities: std::mem::take(&mut stored.entities),
            })
            .map_err(|e| MemoryError::Invalid(format!("entities: {e}")))?;
            key.lock(TEXT_AND_ENTITIES_LABEL, &plain)
        }
        .map_err(MemoryError::Vault)?;
    }
    Ok(stored)
}

/// `stored` with its text opened (a subject's), or why it cannot be read.
pub fn open(mut stored: MemoryItem, key: Option<&SecretKey>) -> Result<MemoryItem, String> {
    if stored.scope.subject().is_none() {
        return Ok(stored);
    }
    if !cipher::is_envelope(&stored.text) {
        return Err("a subject's item holds its text in the clear".into());
    }
    if !stored.entities.is_empty() {
        return Err("a subject's item names the entities it refers to in the clear".into());
    }
    let key = key.ok_or("its subject is erased: its key is gone")?;
    // The label says which of the two it is: one failing to open is tried as the other.
    if let Ok(plain) = key.unlock(TEXT_LABEL, &stored.text) {
        stored.text = String::from_utf8(plain).map_err(|_| "its text is not UTF-8".to_owned())?;
        return Ok(stored);
    }
    let plain = key
        .unlock(TEXT_AND_ENTITIES_LABEL, &stored.text)
        .map_err(|e| e.to_string())?;
    let opened: TextAndEntities =
        serde_json::from_slice(&plain).map_err(|e| format!("its text and entities do not read: {e}"))?;
    stored.text = opened.text;
    stored.entities = opened.entities;
    Ok(stored)
}

/// What `item` says, as its markers key it: under the subject's key for a subject's item.
pub fn what_it_says(item: &MemoryItem, key: Option<&SecretKey>) -> [u8; 32] {
    let plain = super::keys::what_it_says(item);
    match (item.scope.subject(), key) {
        (Some(_), Some(key)) => key.digest(&plain),
        _ => plain,
    }
}

/// A word as the index of `scope` keys it: under the subject's key for a subject's.
pub fn term(scope: &ItemScope, term: TermKey, key: Option<&SecretKey>) -> TermKey {
    match (scope.subject(), key) {
        (Some(_), Some(key)) => TermKey(key.digest(&term.0)),
        _ => term,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryType, Provenance};

    fn item(scope: ItemScope) -> MemoryItem {
        MemoryItem {
            scope,
            memory_type: MemoryType::Preference,
            text: "prefers mail to ann@example.com".into(),
            categories: Default::default(),
            purpose: None,
            provenance: Provenance {
                run_id: "run-1".into(),
                evidence: Vec::new(),
                at_ms: 1,
                context_pack: "sha256:p".into(),
                policies: Vec::new(),
                reviewed_by: None,
            },
            expires_at_ms: None,
            entities: Default::default(),
        }
    }

    #[test]
    fn a_subjects_text_is_stored_encrypted_and_others_as_they_are() {
        let key = SecretKey::generate().expect("random");
        let subject = ItemScope::Subject(SubjectHandle::new("subj:ann").expect("handle"));
        let stored = seal(&item(subject.clone()), Some(&key)).expect("sealed");
        assert!(!stored.text.contains("ann@"));
        assert_eq!(
            open(stored.clone(), Some(&key)).expect("opens"),
            item(subject.clone())
        );
        assert!(open(stored, None).is_err(), "erased: nothing opens");
        assert!(
            seal(&item(subject.clone()), None).is_err(),
            "never kept in the clear"
        );
        assert!(
            open(item(subject.clone()), Some(&key)).is_err(),
            "clear text is refused"
        );
        let tenant = item(ItemScope::Tenant);
        assert_eq!(seal(&tenant, None).expect("as is"), tenant);
        assert_ne!(
            what_it_says(&item(subject.clone()), Some(&key)),
            crate::memory::keys::what_it_says(&item(subject)),
            "a subject's marker cannot be checked against a guess without their key"
        );
    }
}
