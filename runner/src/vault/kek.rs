//! Key-encryption keys: what wraps the subjects' data keys kept in the store. They are kept
//! outside the store (a file per tenant, mode 0600, in a directory of their own), in epochs.
//! Rotation wraps every data key again under a new epoch and then destroys the old epoch's
//! key, so a copy of the store taken before it holds only data keys that no key in existence
//! unwraps — that is what makes an erasure reach backups of the store.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{VaultError, cipher::SecretKey};
use crate::{records::TenantId, whole_file};

/// The most bytes of a key file (a ring holds one key, two while it rotates).
const MAX_FILE: u64 = 64 * 1024;

/// A tenant's key-encryption keys, oldest epoch first. More than one only while a rotation is
/// under way (see [`super::Vault::rotate`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRing {
    keys: Vec<EpochKey>,
    /// The version of the ring's copy this was read from (none: not kept yet): a save replaces
    /// exactly that version, or fails — two writers never overwrite each other's epochs.
    #[serde(skip)]
    pub(super) version: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct EpochKey {
    epoch: u32,
    /// Standard base64 of the 32 key bytes.
    key: String,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochKey({}, …)", self.epoch)
    }
}

impl KeyRing {
    /// A ring with one fresh key, epoch 1.
    pub fn generate() -> Result<Self, VaultError> {
        let mut ring = Self {
            keys: Vec::new(),
            version: None,
        };
        ring.push(1, &SecretKey::generate()?);
        Ok(ring)
    }

    fn push(&mut self, epoch: u32, key: &SecretKey) {
        self.keys.push(EpochKey {
            epoch,
            key: base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
        });
    }

    /// The epoch new data keys are wrapped under, and its key.
    pub fn current(&self) -> Result<(u32, SecretKey), VaultError> {
        let newest = self
            .keys
            .last()
            .ok_or_else(|| VaultError::KeyRing("the key ring is empty".into()))?;
        Ok((newest.epoch, decode_key(newest)?))
    }

    /// The key of `epoch`, if the ring still holds it.
    pub fn get(&self, epoch: u32) -> Result<Option<SecretKey>, VaultError> {
        self.keys
            .iter()
            .find(|k| k.epoch == epoch)
            .map(decode_key)
            .transpose()
    }

    /// Whether a rotation was begun and not finished.
    pub fn rotating(&self) -> bool {
        self.keys.len() > 1
    }

    /// Adds the next epoch's key (kept beside the old one until every data key is rewrapped).
    pub fn begin_rotation(&mut self) -> Result<u32, VaultError> {
        let (epoch, _) = self.current()?;
        let next = epoch
            .checked_add(1)
            .ok_or_else(|| VaultError::KeyRing("the key ring ran out of epochs".into()))?;
        self.push(next, &SecretKey::generate()?);
        Ok(next)
    }

    /// Destroys every key but the newest.
    pub fn finish_rotation(&mut self) {
        let keep = self.keys.len().saturating_sub(1);
        self.keys.drain(..keep);
    }

    pub(super) fn check(&self) -> Result<(), VaultError> {
        if self.keys.is_empty() {
            return Err(VaultError::KeyRing("the key ring holds no key".into()));
        }
        if !self.keys.windows(2).all(|w| w[0].epoch < w[1].epoch) {
            return Err(VaultError::KeyRing(
                "the key ring's epochs are not ascending".into(),
            ));
        }
        self.keys.iter().try_for_each(|k| decode_key(k).map(drop))
    }
}

fn decode_key(key: &EpochKey) -> Result<SecretKey, VaultError> {
    base64::engine::general_purpose::STANDARD
        .decode(&key.key)
        .ok()
        .and_then(|bytes| SecretKey::from_bytes(&bytes))
        .ok_or_else(|| VaultError::KeyRing(format!("epoch {}: the key is not 32 bytes of base64", key.epoch)))
}

/// Where a store's key rings are kept: every backend that holds memory is opened with one.
#[derive(Clone, Debug)]
pub enum KeyRings {
    /// Files in a directory (see [`KeyDir`]).
    Dir(KeyDir),
    /// In this process only (a scratch store, tests): gone with it.
    Memory(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, KeyRing>>>),
    /// Secrets of the gateway service's own namespace (a cluster: every replica shares them).
    Secrets(std::sync::Arc<super::secret_rings::SecretRings>),
    /// None: this store keeps nothing about subjects (why, for the error).
    Refused(&'static str),
}

impl Default for KeyRings {
    /// Kept in this process only.
    fn default() -> Self {
        Self::in_memory()
    }
}

impl KeyRings {
    /// Rings kept in this process only.
    pub fn in_memory() -> Self {
        Self::Memory(Default::default())
    }

    /// The tenant's ring, if it has one. Shared rings may be answered from a copy read in the
    /// last few seconds unless `fresh` (what a rotation, or a key just written, must check).
    pub async fn load(&self, tenant: &TenantId, fresh: bool) -> Result<Option<KeyRing>, VaultError> {
        match self {
            Self::Secrets(secrets) => secrets.load(tenant, fresh).await,
            Self::Dir(dir) => dir.read(tenant),
            Self::Memory(rings) => Ok(rings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(tenant.as_str())
                .cloned()),
            Self::Refused(why) => Err(VaultError::KeyRing((*why).to_owned())),
        }
    }

    /// Makes the tenant's first ring; if another writer made one meanwhile, theirs.
    pub async fn create(&self, tenant: &TenantId) -> Result<KeyRing, VaultError> {
        let ring = KeyRing::generate()?;
        match self.save(tenant, &ring).await {
            Ok(saved) => Ok(saved),
            Err(VaultError::RingChanged(_)) => self
                .load(tenant, true)
                .await?
                .ok_or_else(|| VaultError::RingChanged("the key ring was made and removed again".into())),
            Err(e) => Err(e),
        }
    }

    /// Replaces the tenant's ring with `ring` if the kept copy is still the version `ring` was
    /// read from (absent, for a ring never kept), atomically: a crash leaves the old ring or
    /// the new one. The saved ring, with its new version.
    pub async fn save(&self, tenant: &TenantId, ring: &KeyRing) -> Result<KeyRing, VaultError> {
        ring.check()?;
        match self {
            Self::Secrets(secrets) => secrets.save(tenant, ring).await,
            Self::Dir(dir) => dir.save(tenant, ring),
            Self::Memory(rings) => {
                let mut rings = rings.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let kept = rings.get(tenant.as_str()).and_then(|r| r.version.clone());
                if kept != ring.version {
                    return Err(VaultError::RingChanged(format!("tenant {tenant}'s key ring")));
                }
                let next = kept.map_or(1, |v| v.parse::<u64>().unwrap_or(0) + 1);
                let mut saved = ring.clone();
                saved.version = Some(next.to_string());
                rings.insert(tenant.to_string(), saved.clone());
                Ok(saved)
            }
            Self::Refused(why) => Err(VaultError::KeyRing((*why).to_owned())),
        }
    }
}

/// Key rings as files in a directory: `<tenant>.json`, mode 0600.
#[derive(Clone, Debug)]
pub struct KeyDir {
    dir: PathBuf,
    /// Saves in this process, one at a time (the compare and the rename are two steps).
    saving: std::sync::Arc<std::sync::Mutex<()>>,
}

impl KeyDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            saving: Default::default(),
        }
    }

    /// `$CONTEXTOS_VAULT_KEYS`, else `$XDG_CONFIG_HOME/contextos/vault-keys`, else
    /// `~/.config/contextos/vault-keys`: beside the user's configuration, not beside the store,
    /// so a copy of the store does not take its keys along.
    pub fn default_location() -> Self {
        if let Some(dir) = std::env::var_os("CONTEXTOS_VAULT_KEYS") {
            return Self::new(dir);
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        Self::new(config.join("contextos").join("vault-keys"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("{tenant}.json"))
    }

    /// Saves `ring` if the file is still the version it was read from.
    fn save(&self, tenant: &TenantId, ring: &KeyRing) -> Result<KeyRing, VaultError> {
        let _one = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = self.read(tenant)?.and_then(|r| r.version);
        if kept != ring.version {
            return Err(VaultError::RingChanged(self.file(tenant).display().to_string()));
        }
        let bytes = self.write(tenant, ring)?;
        let mut saved = ring.clone();
        saved.version = Some(file_version(&bytes));
        Ok(saved)
    }

    fn read(&self, tenant: &TenantId) -> Result<Option<KeyRing>, VaultError> {
        let path = self.file(tenant);
        let io = |e: std::io::Error| VaultError::KeyRing(format!("{}: {e}", path.display()));
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_FILE + 1).read_to_end(&mut text).map_err(io)?;
        if text.len() as u64 > MAX_FILE {
            return Err(VaultError::KeyRing(format!(
                "{}: larger than {MAX_FILE} bytes; it is not a key ring",
                path.display()
            )));
        }
        let mut ring: KeyRing = serde_json::from_slice(&text)
            .map_err(|e| VaultError::KeyRing(format!("{}: not a key ring: {e}", path.display())))?;
        ring.check()
            .map_err(|e| VaultError::KeyRing(format!("{}: {e}", path.display())))?;
        ring.version = Some(file_version(&text));
        Ok(Some(ring))
    }

    fn write(&self, tenant: &TenantId, ring: &KeyRing) -> Result<Vec<u8>, VaultError> {
        let path = self.file(tenant);
        let io = |e: std::io::Error| VaultError::KeyRing(format!("{}: {e}", path.display()));
        create_private_dir(&self.dir).map_err(io)?;
        // A name of this write's own: two writers never write into one file.
        let temporary = whole_file::temporary_beside(&path, &format!(".{tenant}.json."), ".new");
        let bytes = serde_json::to_vec_pretty(ring).map_err(|e| VaultError::KeyRing(e.to_string()))?;
        remove_leftovers(&self.dir, tenant);
        // Never through a link, and no copy left behind: it would outlive the keys a rotation
        // destroys.
        whole_file::replace(&path, &temporary, &bytes, whole_file::Access::OwnerOnly).map_err(io)?;
        Ok(bytes)
    }
}

/// A key file's version: the hash of its bytes.
fn file_version(bytes: &[u8]) -> String {
    crate::records::Hash::of(bytes).to_hex()
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Removes the temporary copies of `tenant`'s ring that writes which did not finish (a crash)
/// left in `dir`, once they are older than any write still going could be: a copy of the ring
/// would otherwise outlive the keys a rotation destroys.
fn remove_leftovers(dir: &Path, tenant: &TenantId) {
    const STALE: std::time::Duration = std::time::Duration::from_secs(60);
    let prefix = format!(".{tenant}.json.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > STALE));
        if name.starts_with(&prefix) && name.ends_with(".new") && stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy a crashed write left goes with the next write (once no write could still be
    /// making it): it would otherwise keep keys a rotation destroyed.
    #[tokio::test]
    async fn copies_of_a_ring_left_by_a_crash_are_removed() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let keys = KeyDir::new(dir.path());
        let stale = dir.path().join(".shop.json.1-2.new");
        let fresh = dir.path().join(".shop.json.3-4.new");
        for copy in [&stale, &fresh] {
            std::fs::write(copy, "{\"keys\": []}").expect("write");
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(hour_ago))
            .expect("aged");
        KeyRings::Dir(keys)
            .create(&TenantId::new("shop").expect("tenant"))
            .await
            .expect("made");
        assert!(!stale.exists(), "the crash's copy is gone");
        assert!(fresh.exists(), "a write that may still be going keeps its file");
    }

    #[tokio::test]
    async fn a_ring_is_made_once_kept_and_rotated_and_never_overwritten_by_a_stale_copy() {
        let dir = std::env::temp_dir().join(format!("contextos-kek-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for keys in [KeyRings::Dir(KeyDir::new(&dir)), KeyRings::in_memory()] {
            let tenant = TenantId::new("shop").expect("tenant");
            assert!(keys.load(&tenant, true).await.expect("read").is_none());
            let first = keys.create(&tenant).await.expect("made");
            let again = keys.load(&tenant, true).await.expect("read").expect("kept");
            assert_eq!(first.current().expect("key"), again.current().expect("key"));
            let mut ring = again.clone();
            assert_eq!(ring.begin_rotation().expect("rotates"), 2);
            assert!(ring.rotating());
            assert!(ring.get(1).expect("decodes").is_some());
            ring.finish_rotation();
            assert!(!ring.rotating());
            assert!(
                ring.get(1).expect("decodes").is_none(),
                "the old epoch is destroyed"
            );
            keys.save(&tenant, &ring).await.expect("saved");
            // Another writer's copy read before this save: its epoch 2 would replace ours.
            let mut stale = again;
            stale.begin_rotation().expect("rotates");
            assert!(matches!(
                keys.save(&tenant, &stale).await,
                Err(VaultError::RingChanged(_))
            ));
            let read = keys.load(&tenant, true).await.expect("read").expect("kept");
            assert_eq!(read.current().expect("key"), ring.current().expect("key"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("shop.json"))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "only its owner may read a key ring");
        }
        std::fs::write(dir.join("shop.json"), b"{\"keys\":[]}").expect("write");
        let keys = KeyRings::Dir(KeyDir::new(&dir));
        let tenant = TenantId::new("shop").expect("tenant");
        assert!(
            keys.load(&tenant, true).await.is_err(),
            "an empty ring is refused, not replaced"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
