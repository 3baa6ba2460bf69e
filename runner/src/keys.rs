//! Ed25519 signing keys: generated once, kept in a file, identified by a short key id.
//!
//! The same key type signs record chain heads and RunContexts. Locally the key lives in the data
//! directory; in a cluster it comes from a Secret mounted into the pod.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// Errors loading or creating a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write signing key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("signing key {path} is not 64 hex characters (an ed25519 seed); delete it to generate a new one")]
    Malformed { path: PathBuf },
    #[error("public key {0:?} is not 64 hex characters of a valid ed25519 key")]
    BadPublicKey(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// A signing key and its id.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// The key for a 32-byte seed (deterministic; for tests and key files).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// Parses a key file's content: the seed as 64 hex characters.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).ok()?;
        Some(Self::from_seed(seed))
    }

    /// Loads the key at `path`, creating it (mode 0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::from_hex(&text).ok_or_else(|| KeyError::Malformed {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                write_private(path, hex::encode(key.signing.to_bytes()).as_bytes()).map_err(|source| {
                    KeyError::Write {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The seed as hex (what a key file or Secret holds).
    pub fn to_hex(&self) -> String {
        hex::encode(self.signing.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// Short id of the public key, recorded next to signatures.
    pub fn key_id(&self) -> String {
        self.public().key_id()
    }

    /// Signs `message`, returning the signature as hex.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.signing.sign(message).to_bytes())
    }
}

/// A public key that verifies signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| KeyError::BadPublicKey(text.into()))?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::BadPublicKey(text.into()))
    }

    /// The key as hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// First 16 hex characters of the SHA-256 of the key.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.to_bytes())[..8])
    }

    /// Whether `signature_hex` is this key's signature of `message`.
    pub fn verify_hex(&self, message: &[u8], signature_hex: &str) -> bool {
        let mut bytes = [0u8; 64];
        if hex::decode_to_slice(signature_hex, &mut bytes).is_err() {
            return false;
        }
        self.0.verify(message, &Signature::from_bytes(&bytes)).is_ok()
    }
}

/// The record-signing keys of every tenant, derived from one master secret held by the gateway
/// service (in `contextos-system`). Every gateway replica derives the same key for a tenant
/// without sharing state, no tenant key is ever stored in a tenant's namespace, and one tenant's
/// key says nothing about another's (HMAC-SHA256 of the tenant name under the master secret).
#[derive(Clone)]
pub struct TenantKeys {
    master: [u8; 32],
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys").finish_non_exhaustive()
    }
}

impl TenantKeys {
    /// Keys derived from `master` (the 32-byte seed of a key file or Secret).
    pub fn new(master: &KeyPair) -> Self {
        Self {
            master: master.signing.to_bytes(),
        }
    }

    /// The key that signs `tenant`'s record heads.
    pub fn for_tenant(&self, tenant: &str) -> KeyPair {
        self.derive(b"contextos-tenant-record-key/v1\n", tenant.as_bytes())
    }

    /// The key that vouches for every tenant's record key (see [`TenantKeys::certificate`]). Its
    /// public half is published where only the platform writes (ConfigMap
    /// `contextos-public-keys`), so whoever reads a tenant's key over a channel it cannot trust
    /// (the gateway's plain-HTTP Service) can still tell it is the gateway's. Derived under a
    /// label of its own: it signs nothing a tenant key signs, and no tenant name derives it.
    pub fn certifier(&self) -> KeyPair {
        self.derive(b"contextos-record-key-certifier/v1\n", b"")
    }

    /// The certifier's signature (hex) saying that `tenant`'s record key is the one derived here.
    pub fn certificate(&self, tenant: &str) -> String {
        self.certifier()
            .sign_hex(&certificate_message(tenant, &self.for_tenant(tenant).public()))
    }

    fn derive(&self, label: &[u8], input: &[u8]) -> KeyPair {
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = match hmac::Hmac::<Sha256>::new_from_slice(&self.master) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; a 32-byte key cannot be refused.
            Err(_) => return KeyPair::from_seed(self.master),
        };
        mac.update(label);
        mac.update(input);
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&mac.finalize().into_bytes()[..32]);
        KeyPair::from_seed(seed)
    }
}

impl PublicKey {
    /// Whether this key, as a record-key certifier, signed `certificate` for `key` as `tenant`'s
    /// record key.
    pub fn certifies(&self, tenant: &str, key: &PublicKey, certificate: &str) -> bool {
        self.verify_hex(&certificate_message(tenant, key), certificate)
    }
}

/// What a tenant-key certificate signs: the tenant's name and its key, under a label no other
/// signed statement starts with.
fn certificate_message(tenant: &str, key: &PublicKey) -> Vec<u8> {
    format!(
        "contextos-tenant-record-key-certificate/v1\n{tenant}\n{}",
        key.to_hex()
    )
    .into_bytes()
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut file = crate::whole_file::new_file(path, crate::whole_file::Access::OwnerOnly)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_signed_message_and_key() {
        let key = KeyPair::from_seed([7; 32]);
        let other = KeyPair::from_seed([8; 32]);
        let sig = key.sign_hex(b"hello");
        assert!(key.public().verify_hex(b"hello", &sig));
        assert!(!key.public().verify_hex(b"hellO", &sig));
        assert!(!other.public().verify_hex(b"hello", &sig));
        assert!(!key.public().verify_hex(b"hello", "zz"));
    }

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/signing.key");
        let first = KeyPair::load_or_create(&path).expect("created");
        let second = KeyPair::load_or_create(&path).expect("loaded");
        assert_eq!(first.key_id(), second.key_id());
        fs::write(&path, "garbage").expect("overwrite");
        assert!(matches!(
            KeyPair::load_or_create(&path),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn tenant_keys_are_stable_per_tenant_and_distinct_across_tenants() {
        let keys = TenantKeys::new(&KeyPair::from_seed([3; 32]));
        let again = TenantKeys::new(&KeyPair::from_seed([3; 32]));
        let other_master = TenantKeys::new(&KeyPair::from_seed([4; 32]));
        assert_eq!(
            keys.for_tenant("shop").key_id(),
            again.for_tenant("shop").key_id()
        );
        assert_ne!(keys.for_tenant("shop").key_id(), keys.for_tenant("bank").key_id());
        assert_ne!(
            keys.for_tenant("shop").key_id(),
            other_master.for_tenant("shop").key_id()
        );
    }

    #[test]
    fn a_certificate_vouches_for_one_tenants_key_only() {
        let keys = TenantKeys::new(&KeyPair::from_seed([3; 32]));
        let certifier = keys.certifier().public();
        let shop = keys.for_tenant("shop").public();
        let bank = keys.for_tenant("bank").public();
        let certificate = keys.certificate("shop");
        assert!(certifier.certifies("shop", &shop, &certificate));
        // Not another tenant's key, nor this key under another tenant's name.
        assert!(!certifier.certifies("shop", &bank, &certificate));
        assert!(!certifier.certifies("bank", &shop, &certificate));
        // Not a key someone made up, nor another master's certificate.
        let forged = KeyPair::from_seed([9; 32]);
        let other = TenantKeys::new(&KeyPair::from_seed([4; 32]));
        assert!(!certifier.certifies("shop", &forged.public(), &forged.sign_hex(b"shop")));
        assert!(!certifier.certifies(
            "shop",
            &other.for_tenant("shop").public(),
            &other.certificate("shop")
        ));
        // The certifier is none of the tenant keys, and the master seed is not used as it is.
        assert_ne!(keys.certifier().public(), keys.for_tenant("").public());
        assert_ne!(keys.certifier().public(), KeyPair::from_seed([3; 32]).public());
    }

    #[test]
    fn public_key_round_trips_through_hex() {
        let key = KeyPair::from_seed([1; 32]);
        assert_eq!(
            PublicKey::from_hex(&key.public().to_hex()).expect("parses"),
            key.public()
        );
        assert!(PublicKey::from_hex("abc").is_err());
    }
}
