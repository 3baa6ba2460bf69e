//! The vault's cryptography: 256-bit keys, authenticated encryption of values into envelopes
//! (ChaCha20-Poly1305 with a random nonce), and the derivation of narrow keys from a subject's
//! data key, so what a run or the memory bank is given opens only its own values.
//!
//! An envelope is text — `vault:v1:` and the URL-safe base64 of nonce, ciphertext and tag — so
//! it takes the place of a string or a JSON value alike, and a record entry that holds one
//! still encodes and hashes like any other. Each envelope is bound to a label (which field of
//! what it is) as associated data: one cut from one place does not open in another.

use base64::Engine as _;
use ring::{aead, hmac};

use super::VaultError;

/// What every envelope starts with.
pub const ENVELOPE_PREFIX: &str = "vault:v1:";
/// The most bytes one envelope may open to: the largest record body or memory item fits.
const MAX_PLAINTEXT: usize = 64 * 1024 * 1024;
const NONCE: usize = 12;
const TAG: usize = 16;

/// A 256-bit secret key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, VaultError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| VaultError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key for one use of this one (HMAC-SHA256 over `purpose`): knowing it tells nothing of
    /// this key or of keys derived for other purposes.
    pub fn derive(&self, purpose: &[&str]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut context = hmac::Context::with_key(&key);
        for part in purpose {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part.as_bytes());
        }
        let tag = context.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Self(out)
    }

    /// A keyed digest of `bytes`: equal inputs give equal digests, and without the key nobody
    /// can test a guess against one.
    pub fn digest(&self, bytes: &[u8]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&key, bytes).as_ref());
        out
    }

    fn aead(&self) -> aead::LessSafeKey {
        // 32 bytes is always a valid ChaCha20-Poly1305 key.
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &self.0)
                .unwrap_or_else(|_| unreachable!("a 32-byte key is a valid ChaCha20-Poly1305 key")),
        )
    }

    /// Encrypts `plaintext` bound to `label` into raw bytes (nonce, ciphertext, tag).
    pub fn seal_bytes(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).map_err(|e| VaultError::Random(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE + plaintext.len() + TAG);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(label.as_bytes()),
                &mut body,
            )
            .map_err(|_| VaultError::Cipher(format!("{label}: could not encrypt")))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decrypts what [`Self::seal_bytes`] made for the same `label`.
    pub fn open_bytes(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < NONCE + TAG || sealed.len() > MAX_PLAINTEXT + NONCE + TAG {
            return Err(VaultError::Cipher(format!(
                "{label}: not a sealed value of a possible size"
            )));
        }
        let nonce: [u8; NONCE] = sealed[..NONCE].try_into().unwrap_or([0; NONCE]);
        let mut body = sealed[NONCE..].to_vec();
        let plain = self
            .aead()
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(label.as_bytes()),
                &mut body,
            )
            .map_err(|_| VaultError::Cipher(format!("{label}: does not open with this key")))?;
        Ok(plain.to_vec())
    }

    /// Encrypts `plaintext` into an envelope bound to `label`.
    pub fn lock(&self, label: &str, plaintext: &[u8]) -> Result<String, VaultError> {
        let sealed = self.seal_bytes(label, plaintext)?;
        let mut out = String::with_capacity(ENVELOPE_PREFIX.len() + sealed.len() * 4 / 3 + 4);
        out.push_str(ENVELOPE_PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&sealed, &mut out);
        Ok(out)
    }

    /// Opens an envelope made by [`Self::lock`] for the same `label`.
    pub fn unlock(&self, label: &str, envelope: &str) -> Result<Vec<u8>, VaultError> {
        let encoded = envelope
            .strip_prefix(ENVELOPE_PREFIX)
            .ok_or_else(|| VaultError::Cipher(format!("{label}: not a vault envelope")))?;
        if encoded.len() > (MAX_PLAINTEXT + NONCE + TAG) * 4 / 3 + 4 {
            return Err(VaultError::Cipher(format!("{label}: envelope too large")));
        }
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|e| VaultError::Cipher(format!("{label}: envelope is not base64: {e}")))?;
        self.open_bytes(label, &sealed)
    }
}

/// Whether `text` is an envelope (by its prefix; whether it opens is another matter).
pub fn is_envelope(text: &str) -> bool {
    text.starts_with(ENVELOPE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_open_only_with_their_key_and_label() {
        let key = SecretKey::generate().expect("random");
        let other = SecretKey::generate().expect("random");
        let envelope = key
            .lock("tool_result.output", b"alice@example.com")
            .expect("lock");
        assert!(is_envelope(&envelope));
        assert!(!envelope.contains("alice"));
        assert_eq!(
            key.unlock("tool_result.output", &envelope).expect("opens"),
            b"alice@example.com"
        );
        assert!(
            key.unlock("model_turn.response", &envelope).is_err(),
            "another field"
        );
        assert!(
            other.unlock("tool_result.output", &envelope).is_err(),
            "another key"
        );
        let mut flipped = envelope.clone().into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert!(key.unlock("tool_result.output", &flipped).is_err(), "tampered");
        assert!(key.unlock("x", "vault:v1:!!").is_err());
        assert!(key.unlock("x", "plain").is_err());
    }

    #[test]
    fn the_same_value_locks_differently_each_time() {
        let key = SecretKey::generate().expect("random");
        assert_ne!(
            key.lock("l", b"same").expect("lock"),
            key.lock("l", b"same").expect("lock")
        );
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_parts() {
        let key = SecretKey::generate().expect("random");
        assert_eq!(key.derive(&["run", "t", "r1"]), key.derive(&["run", "t", "r1"]));
        assert_ne!(key.derive(&["run", "t", "r1"]), key.derive(&["run", "t", "r2"]));
        assert_ne!(key.derive(&["run", "tr", "1"]), key.derive(&["run", "t", "r1"]));
        assert_ne!(key.derive(&["memory", "t"]), key.derive(&["run", "t"]));
    }
}
