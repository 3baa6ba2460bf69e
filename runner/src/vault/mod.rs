//! The identity vault: a data key per subject (a person, by pseudonymous handle), so that what
//! the records and memory keep about them can be made unreadable everywhere at once — by
//! destroying one key — while every chain still verifies (the chains hash ciphertext).
//!
//! - A subject's **data key** is made the first time something about them is kept, wrapped by
//!   the tenant's key-encryption key of the current epoch (see [`kek`]), and stored with the
//!   tenant's memory (`v/d/<subject>`) in the same backend as the records.
//! - What is kept is encrypted under keys **derived** from it: one per run about the subject
//!   (a runner is given only its own run's key) and one for their memory.
//! - **Erasure** ([`Vault::erase`]) records that the subject is erased (`v/e/<subject>`: nothing
//!   is kept for that handle again), deletes the wrapped data key, and rotates the tenant's
//!   key-encryption key, so no copy of the store taken before it can be opened either.
//!
//! The cryptography is in [`cipher`]; which fields of a record entry are encrypted is decided
//! by `records::vaulted`.

pub mod cipher;
pub mod kek;
pub mod remote;
pub mod secret_rings;

use serde::{Deserialize, Serialize};

pub use self::cipher::SecretKey;
use self::kek::KeyRing;
use crate::{
    consent::SubjectHandle,
    memory::{
        backend::{Change, Guard, MemoryBackend, Write},
        keys,
    },
    records::{StoreError, TenantId},
};

/// Wrapped data keys rewrapped per transaction during a rotation.
const ROTATION_PAGE: usize = 512;

/// Why the vault refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "subject {subject} was erased (at {erased_at_ms} ms, by {by}); nothing is kept about that handle again — a person who returns gets a new handle"
    )]
    Erased {
        subject: String,
        erased_at_ms: i64,
        by: String,
    },
    #[error("vault key ring: {0}")]
    KeyRing(String),
    #[error("vault: {0}")]
    Cipher(String),
    #[error("vault: no randomness from the operating system: {0}")]
    Random(String),
    #[error(
        "vault: subject {subject}'s data key is wrapped under key epoch {epoch}, which the key ring no longer holds (restored from a copy older than a rotation?)"
    )]
    LostEpoch { subject: String, epoch: u32 },
    #[error("vault: {0} was changed by another writer meanwhile (a rotation elsewhere); try again")]
    RingChanged(String),
    #[error("vault (through the gateway service): {0}")]
    Remote(String),
    /// [`Self::Erased`], as the gateway service said it.
    #[error("{0}")]
    ErasedRemotely(String),
    #[error("vault: stored row for {what} is corrupt: {problem}")]
    Corrupt { what: String, problem: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subject's data key. Never stored in the clear, never sent: only keys derived from it are.
#[derive(Clone, Debug)]
pub struct DataKey(SecretKey);

impl DataKey {
    /// The key of one run's record: what the run's entries about the subject are encrypted with.
    pub fn run_key(&self, tenant: &TenantId, run_id: &str) -> SecretKey {
        self.0.derive(&["contextos/v1/run", tenant.as_str(), run_id])
    }

    /// The key of the subject's memory items and held candidates.
    pub fn memory_key(&self, tenant: &TenantId) -> SecretKey {
        self.0.derive(&["contextos/v1/memory", tenant.as_str()])
    }
}

/// A subject's erasure, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    pub erased_at_ms: i64,
    /// Who erased them (the local user, or the requester's verified identity).
    pub by: String,
}

/// What an erasure did.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Erased {
    pub subject: SubjectHandle,
    #[serde(flatten)]
    pub erasure: Erasure,
    /// Whether they had a data key (anything kept about them).
    pub had_key: bool,
    /// Memory items and held candidates forgotten.
    pub memory_forgotten: usize,
    pub rotation: Rotation,
}

/// What a key is wanted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// To read what was kept: none once the subject is erased.
    Read,
    /// To keep something new: the data key is made if needed; refused once erased.
    Keep,
}

/// What the vault holds for a subject.
#[derive(Clone, Debug)]
pub enum KeyState {
    Active(DataKey),
    Erased(Erasure),
    /// Nothing was ever kept about them.
    Unknown,
}

/// A wrapped data key as stored.
#[derive(Serialize, Deserialize)]
struct WrappedKey {
    epoch: u32,
    /// URL-safe base64 of nonce, ciphertext and tag.
    wrapped: String,
}

/// What a rotation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub epoch: u32,
    /// Whether it finished a rotation already under way instead of beginning one.
    #[serde(default)]
    pub joined: bool,
    pub rewrapped: usize,
    /// Data keys no epoch of the ring unwraps (lost already), left as they were.
    #[serde(default)]
    pub unreadable: usize,
    /// Data keys of erased subjects found and deleted (a key kept while its subject was being
    /// erased).
    pub removed: usize,
}

impl VaultError {
    /// Whether the subject was erased (here, or as the gateway service said).
    pub fn is_erased(&self) -> bool {
        matches!(self, Self::Erased { .. } | Self::ErasedRemotely(_))
    }
}

/// One tenant's vault in a store backend (its data keys) and the backend's key rings.
pub struct Vault<'a, B: ?Sized> {
    backend: &'a B,
    tenant: TenantId,
}

impl<B: ?Sized> std::fmt::Debug for Vault<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl<'a, B: MemoryBackend + ?Sized> Vault<'a, B> {
    pub fn new(backend: &'a B, tenant: TenantId) -> Self {
        Self { backend, tenant }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The subject's data key, if it exists and they are not erased. An erasure wins over a
    /// data key found beside it (one kept while the erasure was under way).
    pub async fn key(&self, subject: &SubjectHandle) -> Result<KeyState, VaultError> {
        let rows = self
            .backend
            .memory_get(
                &self.tenant,
                vec![
                    keys::vault_erased(&self.tenant, subject),
                    keys::vault_key(&self.tenant, subject),
                ],
            )
            .await?;
        if let Some(Some(erased)) = rows.first() {
            return Ok(KeyState::Erased(self.erasure_of(subject, erased)?));
        }
        match rows.get(1).and_then(Option::as_ref) {
            None => Ok(KeyState::Unknown),
            Some(wrapped) => {
                let ring = self.ring(false).await?;
                match self.unwrap(&ring, subject, wrapped) {
                    // Wrapped under an epoch newer than the ring this replica had at hand.
                    Err(VaultError::LostEpoch { .. }) => {
                        let ring = self.ring(true).await?;
                        Ok(KeyState::Active(self.unwrap(&ring, subject, wrapped)?))
                    }
                    other => Ok(KeyState::Active(other?)),
                }
            }
        }
    }

    /// The key of run `run_id` about `subject`. To read it: `None` once they are erased (or
    /// when nothing was ever kept about them): its encrypted fields read as erased. To keep:
    /// their data key is made if they have none; refused once they are erased.
    pub async fn run_key(
        &self,
        subject: &SubjectHandle,
        run_id: &str,
        to: KeyUse,
    ) -> Result<Option<SecretKey>, VaultError> {
        Ok(self
            .data_key(subject, to)
            .await?
            .map(|key| key.run_key(&self.tenant, run_id)))
    }

    /// The key of the subject's memory (see [`Self::run_key`] for `to`).
    pub async fn memory_key(
        &self,
        subject: &SubjectHandle,
        to: KeyUse,
    ) -> Result<Option<SecretKey>, VaultError> {
        Ok(self
            .data_key(subject, to)
            .await?
            .map(|key| key.memory_key(&self.tenant)))
    }

    /// The subject's data key: to keep, made if needed (refused once erased); to read, none
    /// once erased or when nothing was ever kept.
    async fn data_key(&self, subject: &SubjectHandle, to: KeyUse) -> Result<Option<DataKey>, VaultError> {
        Ok(match to {
            KeyUse::Keep => Some(self.key_for_keeping(subject).await?),
            KeyUse::Read => match self.key(subject).await? {
                KeyState::Active(key) => Some(key),
                KeyState::Erased(_) | KeyState::Unknown => None,
            },
        })
    }

    /// The subject's data key whether or not an erasure has begun (an erasure finishing what
    /// a failed one started needs it to forget their memory).
    async fn key_even_if_erased(&self, subject: &SubjectHandle) -> Result<Option<DataKey>, VaultError> {
        let row = self
            .backend
            .memory_get(&self.tenant, vec![keys::vault_key(&self.tenant, subject)])
            .await?
            .pop()
            .flatten();
        match row {
            None => Ok(None),
            Some(wrapped) => {
                let ring = self.ring(true).await?;
                self.unwrap(&ring, subject, &wrapped).map(Some)
            }
        }
    }

    /// The subject's data key, made now if they have none; refused for an erased subject.
    pub async fn key_for_keeping(&self, subject: &SubjectHandle) -> Result<DataKey, VaultError> {
        for _ in 0..3 {
            match self.key(subject).await? {
                KeyState::Active(key) => return Ok(key),
                KeyState::Erased(erasure) => return Err(erased(subject, erasure)),
                KeyState::Unknown => {}
            }
            let ring = self.ring(true).await?;
            let key = SecretKey::generate()?;
            let row = keys::vault_key(&self.tenant, subject);
            let wrapped = self.wrap(&ring, subject, &key)?;
            let applied = self
                .backend
                .memory_write(
                    &self.tenant,
                    vec![Write {
                        guard: Guard::Absent(row.clone()),
                        changes: vec![Change::Put(row.clone(), wrapped.clone())],
                    }],
                )
                .await?;
            if applied.first() == Some(&true) {
                self.settle_epoch(subject, &row, wrapped, &key).await?;
                // Read back: an erasure that began meanwhile wins over this key.
                continue;
            }
            // Another writer made one first: use theirs.
        }
        match self.key(subject).await? {
            KeyState::Active(key) => Ok(key),
            KeyState::Erased(erasure) => Err(erased(subject, erasure)),
            KeyState::Unknown => Err(VaultError::Corrupt {
                what: format!("subject {subject}"),
                problem: "a data key written was not there when read back".into(),
            }),
        }
    }

    /// A data key just written under the epoch the ring had a moment ago: if a rotation has
    /// begun or ended since (another replica), it is wrapped again under the newest epoch — a
    /// rotation that scanned before it was written would otherwise destroy the only key that
    /// unwraps it. (A rotation saves its new epoch before it scans, so a key written before the
    /// rotation began is found by its scan, and one written after sees the new epoch here.)
    async fn settle_epoch(
        &self,
        subject: &SubjectHandle,
        row: &[u8],
        written: Vec<u8>,
        key: &SecretKey,
    ) -> Result<(), VaultError> {
        let ring = self.ring(true).await?;
        let stored: WrappedKey = parse_row(subject, &written)?;
        if ring.current()?.0 == stored.epoch {
            return Ok(());
        }
        let rewrapped = self.wrap(&ring, subject, key)?;
        self.backend
            .memory_write(
                &self.tenant,
                vec![Write {
                    guard: Guard::Holds(row.to_vec(), written),
                    changes: vec![Change::Put(row.to_vec(), rewrapped)],
                }],
            )
            .await?;
        Ok(())
    }

    /// Erases a subject: records the erasure (the first one's time and author are kept, and
    /// from then on nothing is kept about the handle), forgets their memory and held
    /// candidates, destroys their data key and rotates the tenant's key-encryption key. Safe to
    /// run again after a failure part way: each step is idempotent.
    pub async fn erase(&self, subject: &SubjectHandle, by: &str, now_ms: i64) -> Result<Erased, VaultError>
    where
        B: Sized,
    {
        let tombstone = keys::vault_erased(&self.tenant, subject);
        let erasure = Erasure {
            erased_at_ms: now_ms,
            by: by.to_owned(),
        };
        let value = serde_json::to_vec(&erasure).map_err(|e| VaultError::Cipher(e.to_string()))?;
        self.backend
            .memory_write(
                &self.tenant,
                vec![Write {
                    guard: Guard::Absent(tombstone.clone()),
                    changes: vec![Change::Put(tombstone.clone(), value)],
                }],
            )
            .await?;
        // A data key that no key-encryption key unwraps any more (lost with a ring) cannot stop
        // the erasure: its memory is forgotten unread.
        let data_key = match self.key_even_if_erased(subject).await {
            Ok(key) => key,
            Err(
                error @ (VaultError::LostEpoch { .. } | VaultError::Cipher(_) | VaultError::Corrupt { .. }),
            ) => {
                tracing::warn!(%error, %subject, "erasing a subject whose data key cannot be unwrapped");
                None
            }
            Err(other) => return Err(other),
        };
        // Their memory goes while its key still opens it (its index rows are found from the
        // items); what it held was never stored in the clear.
        let scope = crate::memory::ItemScope::Subject(subject.clone());
        let bank = crate::memory::bank::MemoryBank::new(self.backend, &self.tenant);
        let bank = match &data_key {
            Some(key) => bank.with_subject_key(subject.clone(), key.memory_key(&self.tenant)),
            None => bank,
        };
        let forgotten = bank.forget_scope_and_held(&scope).await.map_err(|e| match e {
            crate::memory::MemoryError::Store(e) => VaultError::Store(e),
            other => VaultError::Corrupt {
                what: format!("subject {subject}'s memory"),
                problem: other.to_string(),
            },
        })?;
        self.backend
            .memory_write(
                &self.tenant,
                vec![Write {
                    guard: Guard::Present(tombstone.clone()),
                    changes: vec![Change::Delete(keys::vault_key(&self.tenant, subject))],
                }],
            )
            .await?;
        // The key-encryption key in force from now on must be one that never wrapped their data
        // key: a rotation begun before the key was deleted (elsewhere, or cut short) may have
        // wrapped it under its new epoch — that one is finished, and another one made.
        let mut rotation = self.rotate().await?;
        if rotation.joined {
            rotation = self.rotate().await?;
        }
        let stored = self
            .backend
            .memory_get(&self.tenant, vec![tombstone])
            .await?
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| VaultError::Corrupt {
                what: format!("subject {subject}'s erasure"),
                problem: "it was not there when read back".into(),
            })?;
        Ok(Erased {
            subject: subject.clone(),
            erasure: self.erasure_of(subject, &stored)?,
            had_key: data_key.is_some(),
            memory_forgotten: forgotten,
            rotation,
        })
    }

    /// Wraps every data key of the tenant under a new key-encryption key and destroys the old
    /// one. A rotation cut short (or under way at another replica) is finished by the next,
    /// which says it `joined` it: the ring keeps both keys until then.
    pub async fn rotate(&self) -> Result<Rotation, VaultError> {
        let mut last = None;
        for _ in 0..3 {
            match self.rotate_once().await {
                // Another writer saved the ring meanwhile: start again from theirs.
                Err(e @ VaultError::RingChanged(_)) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| VaultError::RingChanged("the key ring".into())))
    }

    async fn rotate_once(&self) -> Result<Rotation, VaultError> {
        let rings = self.backend.key_rings();
        let mut ring = self.ring(true).await?;
        let joined = ring.rotating();
        if !joined {
            ring.begin_rotation()?;
            ring = rings.save(&self.tenant, &ring).await?;
        }
        let (epoch, _) = ring.current()?;
        let mut rotation = Rotation {
            epoch,
            joined,
            ..Rotation::default()
        };
        let prefix = keys::vault_keys_prefix(&self.tenant);
        let end = keys::prefix_end(&prefix);
        let mut start = prefix.clone();
        loop {
            let page = self
                .backend
                .memory_scan(&self.tenant, start.clone(), end.clone(), ROTATION_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            start = keys::after(last);
            let full = page.len() == ROTATION_PAGE;
            let mut writes = Vec::with_capacity(page.len() * 2);
            for (key, value) in page {
                let handle = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let Ok(subject) = SubjectHandle::new(&handle) else {
                    rotation.unreadable += 1;
                    continue;
                };
                let data = match parse_row(&subject, &value) {
                    Ok(stored) if stored.epoch == epoch => continue,
                    Ok(_) => self.unwrap(&ring, &subject, &value),
                    Err(e) => Err(e),
                };
                // A key no epoch of the ring unwraps is lost already; it does not hold up the
                // others (and is reported).
                let Ok(data) = data else {
                    tracing::warn!(%subject, tenant = %self.tenant, "a data key no key-encryption key unwraps; left as it is");
                    rotation.unreadable += 1;
                    continue;
                };
                let rewrapped = self.wrap(&ring, &subject, &data.0)?;
                writes.push(Write {
                    guard: Guard::Absent(keys::vault_erased(&self.tenant, &subject)),
                    changes: vec![Change::Put(key.clone(), rewrapped)],
                });
                // The erased subject's stray key goes (the write above did not apply).
                writes.push(Write {
                    guard: Guard::Present(keys::vault_erased(&self.tenant, &subject)),
                    changes: vec![Change::Delete(key)],
                });
            }
            let applied = self.backend.memory_write(&self.tenant, writes).await?;
            for pair in applied.chunks(2) {
                match pair {
                    [true, _] => rotation.rewrapped += 1,
                    [_, true] => rotation.removed += 1,
                    _ => {}
                }
            }
            if !full {
                break;
            }
        }
        ring.finish_rotation();
        rings.save(&self.tenant, &ring).await?;
        Ok(rotation)
    }

    /// The tenant's key ring. A tenant without one gets its first — unless data keys are kept
    /// already: then its ring was lost (deleted, or this store is opened with another place's
    /// rings), and a new one would wrap new keys beside ones nothing unwraps.
    async fn ring(&self, fresh: bool) -> Result<KeyRing, VaultError> {
        let rings = self.backend.key_rings();
        if let Some(ring) = rings.load(&self.tenant, fresh).await? {
            return Ok(ring);
        }
        let prefix = keys::vault_keys_prefix(&self.tenant);
        let kept = self
            .backend
            .memory_scan(&self.tenant, prefix.clone(), keys::prefix_end(&prefix), 1)
            .await?;
        if !kept.is_empty() {
            return Err(VaultError::KeyRing(format!(
                "tenant {}'s key ring is missing, yet data keys wrapped by it are kept: restore it (in a cluster the Secret contextos-vault-{} in namespace contextos-vault; locally the key directory, CONTEXTOS_VAULT_KEYS) — a new ring would leave every subject's data unreadable",
                self.tenant, self.tenant
            )));
        }
        rings.create(&self.tenant).await
    }

    fn wrap(&self, ring: &KeyRing, subject: &SubjectHandle, key: &SecretKey) -> Result<Vec<u8>, VaultError> {
        use base64::Engine as _;
        let (epoch, kek) = ring.current()?;
        let sealed = kek.seal_bytes(&self.wrap_label(subject, epoch), key.as_bytes())?;
        serde_json::to_vec(&WrappedKey {
            epoch,
            wrapped: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed),
        })
        .map_err(|e| VaultError::Cipher(e.to_string()))
    }

    fn unwrap(&self, ring: &KeyRing, subject: &SubjectHandle, value: &[u8]) -> Result<DataKey, VaultError> {
        use base64::Engine as _;
        let stored: WrappedKey = parse_row(subject, value)?;
        let kek = ring.get(stored.epoch)?.ok_or_else(|| VaultError::LostEpoch {
            subject: subject.to_string(),
            epoch: stored.epoch,
        })?;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&stored.wrapped)
            .map_err(|e| VaultError::Corrupt {
                what: format!("subject {subject}'s data key"),
                problem: e.to_string(),
            })?;
        let bytes = kek.open_bytes(&self.wrap_label(subject, stored.epoch), &sealed)?;
        SecretKey::from_bytes(&bytes)
            .map(DataKey)
            .ok_or_else(|| VaultError::Corrupt {
                what: format!("subject {subject}'s data key"),
                problem: "not 32 bytes".into(),
            })
    }

    /// What a wrapped key is bound to: a row copied to another subject or tenant does not open.
    fn wrap_label(&self, subject: &SubjectHandle, epoch: u32) -> String {
        format!("contextos/v1/data-key/{}/{subject}/{epoch}", self.tenant)
    }

    fn erasure_of(&self, subject: &SubjectHandle, value: &[u8]) -> Result<Erasure, VaultError> {
        serde_json::from_slice(value).map_err(|e| VaultError::Corrupt {
            what: format!("subject {subject}'s erasure"),
            problem: e.to_string(),
        })
    }
}

fn parse_row(subject: &SubjectHandle, value: &[u8]) -> Result<WrappedKey, VaultError> {
    serde_json::from_slice(value).map_err(|e| VaultError::Corrupt {
        what: format!("subject {subject}'s data key"),
        problem: e.to_string(),
    })
}

fn erased(subject: &SubjectHandle, erasure: Erasure) -> VaultError {
    VaultError::Erased {
        subject: subject.to_string(),
        erased_at_ms: erasure.erased_at_ms,
        by: erasure.by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::store::scratch::ScratchStore;
    use kek::KeyRings;

    fn subject(name: &str) -> SubjectHandle {
        SubjectHandle::new(name).expect("handle")
    }

    #[tokio::test]
    async fn two_rotations_at_once_lose_no_data_key() {
        let store = ScratchStore::default();
        let tenant = TenantId::new("shop").expect("tenant");
        let vault = Vault::new(&store, tenant.clone());
        let mut kept = Vec::new();
        for name in ["subj:a", "subj:b", "subj:c"] {
            kept.push(vault.key_for_keeping(&subject(name)).await.expect("kept"));
        }
        let other = Vault::new(&store, tenant);
        let (a, b) = tokio::join!(vault.rotate(), other.rotate());
        a.expect("one rotation");
        b.expect("the other, after the first");
        for (name, key) in ["subj:a", "subj:b", "subj:c"].into_iter().zip(kept) {
            let KeyState::Active(now) = vault.key(&subject(name)).await.expect("read") else {
                panic!("{name}'s data key was lost");
            };
            assert_eq!(now.0, key.0);
        }
    }

    #[tokio::test]
    async fn an_erasure_ends_on_an_epoch_that_never_wrapped_the_erased_key() {
        let store = ScratchStore::default();
        let tenant = TenantId::new("shop").expect("tenant");
        let vault = Vault::new(&store, tenant.clone());
        let gone = subject("subj:gone");
        vault.key_for_keeping(&gone).await.expect("kept");
        vault.key_for_keeping(&subject("subj:stays")).await.expect("kept");
        // A rotation begun (and cut short) rewrapped the key under epoch 2; a copy of the store
        // is taken then.
        let rings = store.key_rings();
        let mut ring = vault.ring(true).await.expect("ring");
        ring.begin_rotation().expect("begins");
        let ring = rings.save(&tenant, &ring).await.expect("saved");
        let row = keys::vault_key(&tenant, &gone);
        let old = store.memory_get(&tenant, vec![row.clone()]).await.expect("get")[0]
            .clone()
            .expect("row");
        let data = vault.unwrap(&ring, &gone, &old).expect("unwraps");
        let copied = vault.wrap(&ring, &gone, &data.0).expect("wraps");
        let erased = vault.erase(&gone, "dpo", 1).await.expect("erased");
        assert_eq!(
            erased.rotation.epoch, 3,
            "the rotation under way was finished, then another made"
        );
        let now = vault.ring(true).await.expect("ring");
        assert!(
            matches!(
                vault.unwrap(&now, &gone, &copied),
                Err(VaultError::LostEpoch { .. })
            ),
            "the copy's key opens under the ring in force"
        );
        assert!(matches!(
            vault.key(&subject("subj:stays")).await,
            Ok(KeyState::Active(_))
        ));
        assert!(matches!(vault.key(&gone).await, Ok(KeyState::Erased(_))));
        assert!(
            vault
                .key_for_keeping(&gone)
                .await
                .expect_err("kept again")
                .is_erased()
        );
    }

    #[tokio::test]
    async fn a_lost_ring_is_never_replaced_while_keys_it_wrapped_are_kept() {
        let store = ScratchStore::default();
        let tenant = TenantId::new("shop").expect("tenant");
        let vault = Vault::new(&store, tenant.clone());
        vault.key_for_keeping(&subject("subj:a")).await.expect("kept");
        // The same store read with another place's (empty) key rings.
        let elsewhere = KeyRings::in_memory();
        let problem = match elsewhere.load(&tenant, true).await.expect("read") {
            None => {
                let with_other_rings = OtherRings {
                    store: &store,
                    rings: elsewhere,
                };
                Vault::new(&with_other_rings, tenant)
                    .key_for_keeping(&subject("subj:b"))
                    .await
                    .expect_err("a new ring was made")
                    .to_string()
            }
            Some(_) => unreachable!("a fresh place has no ring"),
        };
        assert!(problem.contains("key ring is missing"), "{problem}");
    }

    /// `store`'s memory with other key rings.
    struct OtherRings<'s> {
        store: &'s ScratchStore,
        rings: KeyRings,
    }

    impl MemoryBackend for OtherRings<'_> {
        async fn memory_get(
            &self,
            tenant: &TenantId,
            keys: Vec<Vec<u8>>,
        ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.store.memory_get(tenant, keys).await
        }
        async fn memory_scan(
            &self,
            tenant: &TenantId,
            start: Vec<u8>,
            end: Vec<u8>,
            limit: usize,
        ) -> Result<crate::memory::backend::Pairs, StoreError> {
            self.store.memory_scan(tenant, start, end, limit).await
        }
        async fn memory_snapshot(
            &self,
            tenant: &TenantId,
            keys: Vec<Vec<u8>>,
            start: Vec<u8>,
            end: Vec<u8>,
            limit: usize,
        ) -> Result<crate::memory::backend::Snapshot, StoreError> {
            self.store.memory_snapshot(tenant, keys, start, end, limit).await
        }
        fn key_rings(&self) -> &KeyRings {
            &self.rings
        }
        async fn memory_write(&self, tenant: &TenantId, writes: Vec<Write>) -> Result<Vec<bool>, StoreError> {
            self.store.memory_write(tenant, writes).await
        }
    }
}
