//! Verification of a stored chain: every entry's bytes match its hash, every entry links to the
//! one before it, the signed head points at the last entry and carries a valid signature, and
//! every blob an entry references (an offloaded entry's, the run's bundle) is present and
//! intact. The first problem found is reported
//! with the entry it concerns.

use serde::Deserialize;

use super::{
    entry::{EntryBody, Hash, RecordEntry, StoredEntry},
    store::{RecordStore, SignedHead, StoreError, TenantId},
};
use crate::keys::PublicKey;

/// What a successful verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChain {
    pub entries: u64,
    pub bytes: u64,
    pub head: Hash,
    pub key_id: String,
    /// Blobs referenced by entries, as (seq, hash), checked by [`verify_run`].
    pub blobs: Vec<(u64, Hash)>,
}

/// Why a chain failed verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("run {run_id} has no entries")]
    Empty { run_id: String },
    #[error("entry {seq} was altered: its bytes no longer match the hash recorded for them")]
    HashMismatch { seq: u64 },
    #[error("entry {seq} cannot be read ({problem}); the stored bytes are damaged")]
    Unreadable { seq: u64, problem: String },
    #[error("entry {seq} belongs to run {found:?}, not {expected:?}: entries were moved between runs")]
    WrongRun {
        seq: u64,
        expected: String,
        found: String,
    },
    #[error("entry {seq} is out of place: expected sequence number {expected}")]
    OutOfSequence { seq: u64, expected: u64 },
    #[error("entry {seq} does not link to entry {prev_seq}: the chain was cut or an entry replaced")]
    BrokenLink { seq: u64, prev_seq: u64 },
    #[error(
        "the signed head names entry {head_seq} ({head_hash}) but the chain ends at entry {last_seq}: entries were added or removed after signing"
    )]
    HeadMismatch {
        head_seq: u64,
        head_hash: String,
        last_seq: u64,
    },
    #[error(
        "the head signature of entry {seq} is invalid for key {key_id}: the record was tampered with or re-signed"
    )]
    BadSignature { seq: u64, key_id: String },
    #[error("the head was signed by key {found}, but verification uses key {expected}")]
    UnknownKey { found: String, expected: String },
    #[error("entry {seq} references blob {hash}, which is missing")]
    MissingBlob { seq: u64, hash: String },
    #[error("blob {hash} referenced by entry {seq} was altered")]
    BlobMismatch { seq: u64, hash: String },
    #[error("run {run_id} not found")]
    NotFound { run_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The fields verification needs; the body is skipped without being materialized.
#[derive(Deserialize)]
struct EntryHeader {
    run_id: String,
    seq: u64,
    #[serde(default)]
    prev: Option<Hash>,
}

/// Verifies entries against their signed head (pure: no IO).
pub fn verify_entries(
    tenant: &TenantId,
    run_id: &str,
    entries: &[StoredEntry],
    head: &SignedHead,
    key: &PublicKey,
) -> Result<VerifiedChain, VerifyError> {
    let Some(last) = entries.last() else {
        return Err(VerifyError::Empty {
            run_id: run_id.to_owned(),
        });
    };
    let mut prev: Option<Hash> = None;
    let mut bytes = 0u64;
    let mut blobs = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let expected = index as u64;
        if entry.seq != expected {
            return Err(VerifyError::OutOfSequence {
                seq: entry.seq,
                expected,
            });
        }
        if Hash::of(&entry.bytes) != entry.hash {
            return Err(VerifyError::HashMismatch { seq: entry.seq });
        }
        let header: EntryHeader =
            serde_json::from_slice(&entry.bytes).map_err(|e| VerifyError::Unreadable {
                seq: entry.seq,
                problem: e.to_string(),
            })?;
        if header.run_id != run_id {
            return Err(VerifyError::WrongRun {
                seq: entry.seq,
                expected: run_id.into(),
                found: header.run_id,
            });
        }
        if header.seq != expected {
            return Err(VerifyError::OutOfSequence {
                seq: entry.seq,
                expected,
            });
        }
        if header.prev != prev {
            return Err(VerifyError::BrokenLink {
                seq: entry.seq,
                prev_seq: expected.saturating_sub(1),
            });
        }
        // Only the entries that can name a blob are decoded whole: an offloaded entry, and the
        // run's start (the bundle a replay re-runs the run under).
        let names = |marker: &[u8]| entry.bytes.windows(marker.len()).any(|w| w == marker);
        if names(br#""type":"blob""#) || names(br#""type":"run_started""#) {
            let full = RecordEntry::decode(&entry.bytes).map_err(|e| VerifyError::Unreadable {
                seq: entry.seq,
                problem: e.to_string(),
            })?;
            match full.body {
                EntryBody::Blob { blob, .. } => blobs.push((entry.seq, blob)),
                EntryBody::RunStarted {
                    bundle: Some(bundle), ..
                } => blobs.push((entry.seq, bundle)),
                _ => {}
            }
        }
        prev = Some(entry.hash);
        bytes += entry.bytes.len() as u64;
    }
    if head.seq != last.seq || head.hash != last.hash {
        return Err(VerifyError::HeadMismatch {
            head_seq: head.seq,
            head_hash: head.hash.to_hex(),
            last_seq: last.seq,
        });
    }
    if head.key_id != key.key_id() {
        return Err(VerifyError::UnknownKey {
            found: head.key_id.clone(),
            expected: key.key_id(),
        });
    }
    let message = SignedHead::message(tenant, run_id, head.seq, &head.hash);
    if !key.verify_hex(&message, &head.signature) {
        return Err(VerifyError::BadSignature {
            seq: head.seq,
            key_id: head.key_id.clone(),
        });
    }
    Ok(VerifiedChain {
        entries: entries.len() as u64,
        bytes,
        head: head.hash,
        key_id: head.key_id.clone(),
        blobs,
    })
}

/// Reads a run from `store` and verifies it, including the blobs it references.
pub async fn verify_run<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    key: &PublicKey,
) -> Result<VerifiedChain, VerifyError> {
    let head = store
        .head(tenant, run_id)
        .await?
        .ok_or_else(|| VerifyError::NotFound {
            run_id: run_id.into(),
        })?;
    let entries = store.read_chain(tenant, run_id, 0).await?;
    let mut verified = verify_entries(tenant, run_id, &entries, &head, key)?;
    let mut index = 0;
    while let Some((seq, hash)) = verified.blobs.get(index).copied() {
        index += 1;
        let bytes = match store.get_blob(tenant, &hash).await {
            Ok(None) => {
                return Err(VerifyError::MissingBlob {
                    seq,
                    hash: hash.to_hex(),
                });
            }
            // The store refuses to return altered bytes (one that does not is checked here).
            Ok(Some(bytes)) if Hash::of(&bytes) == hash => bytes,
            Ok(Some(_)) | Err(StoreError::Corrupt { .. }) => {
                return Err(VerifyError::BlobMismatch {
                    seq,
                    hash: hash.to_hex(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        // A run's start too large for an entry is in a blob: the bundle it names is checked too.
        if seq == 0
            && let Ok(EntryBody::RunStarted {
                bundle: Some(bundle), ..
            }) = serde_json::from_slice(&bytes)
            && !verified.blobs.contains(&(seq, bundle))
        {
            verified.blobs.push((seq, bundle));
        }
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{keys::KeyPair, records::entry::RecordEntry};

    fn chain(key: &KeyPair, tenant: &TenantId, n: u64) -> (Vec<StoredEntry>, SignedHead) {
        let mut entries = Vec::new();
        let mut prev = None;
        for seq in 0..n {
            let entry = RecordEntry {
                run_id: "run-1".into(),
                seq,
                prev,
                at_ms: 1_700_000_000_000 + seq as i64,
                body: EntryBody::Checkpoint {
                    step: seq as u32,
                    state: json!({"k": "v", "n": seq}),
                },
                vaulted: None,
            };
            let sealed = StoredEntry::seal(&entry);
            prev = Some(sealed.hash);
            entries.push(sealed);
        }
        let last = entries.last().expect("non-empty");
        let message = SignedHead::message(tenant, "run-1", last.seq, &last.hash);
        let head = SignedHead {
            seq: last.seq,
            hash: last.hash,
            key_id: key.key_id(),
            signature: key.sign_hex(&message),
        };
        (entries, head)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let key = KeyPair::from_seed([3; 32]);
        let tenant = TenantId::new("team-a").expect("tenant");
        let (entries, head) = chain(&key, &tenant, 4);
        let verified = verify_entries(&tenant, "run-1", &entries, &head, &key.public()).expect("verifies");
        assert_eq!(verified.entries, 4);
    }

    #[test]
    fn flipping_any_stored_byte_names_the_entry_it_is_in() {
        let key = KeyPair::from_seed([3; 32]);
        let tenant = TenantId::new("team-a").expect("tenant");
        let (entries, head) = chain(&key, &tenant, 4);
        for (index, entry) in entries.iter().enumerate() {
            let stored = entry.to_value_bytes();
            for position in 0..stored.len() {
                let mut damaged = stored.clone();
                damaged[position] ^= 0x01;
                let mut tampered = entries.clone();
                tampered[index] =
                    StoredEntry::from_value_bytes(entry.seq, &damaged).expect("still long enough");
                let error = verify_entries(&tenant, "run-1", &tampered, &head, &key.public())
                    .expect_err("tampering is detected");
                let named = match error {
                    VerifyError::HashMismatch { seq } | VerifyError::Unreadable { seq, .. } => seq,
                    other => panic!("entry {index} byte {position}: unexpected error {other}"),
                };
                assert_eq!(
                    named, index as u64,
                    "byte {position} of entry {index} blamed entry {named}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_signature_is_reported_as_such() {
        let key = KeyPair::from_seed([3; 32]);
        let tenant = TenantId::new("team-a").expect("tenant");
        let (entries, mut head) = chain(&key, &tenant, 3);
        let mut sig = head.signature.into_bytes();
        sig[0] = if sig[0] == b'a' { b'b' } else { b'a' };
        head.signature = String::from_utf8(sig).expect("hex");
        assert!(matches!(
            verify_entries(&tenant, "run-1", &entries, &head, &key.public()),
            Err(VerifyError::BadSignature { seq: 2, .. })
        ));
        // A head re-signed by another key is not accepted either.
        let other = KeyPair::from_seed([4; 32]);
        let (_, foreign) = chain(&other, &tenant, 3);
        assert!(matches!(
            verify_entries(&tenant, "run-1", &entries, &foreign, &key.public()),
            Err(VerifyError::UnknownKey { .. })
        ));
    }

    #[test]
    fn removed_or_reordered_entries_are_detected() {
        let key = KeyPair::from_seed([3; 32]);
        let tenant = TenantId::new("team-a").expect("tenant");
        let (entries, head) = chain(&key, &tenant, 4);
        let truncated = &entries[..3];
        assert!(matches!(
            verify_entries(&tenant, "run-1", truncated, &head, &key.public()),
            Err(VerifyError::HeadMismatch {
                head_seq: 3,
                last_seq: 2,
                ..
            })
        ));
        let mut gap = entries.clone();
        gap.remove(1);
        assert!(matches!(
            verify_entries(&tenant, "run-1", &gap, &head, &key.public()),
            Err(VerifyError::OutOfSequence { seq: 2, expected: 1 })
        ));
        assert!(matches!(
            verify_entries(&tenant, "other-run", &entries, &head, &key.public()),
            Err(VerifyError::WrongRun { seq: 0, .. })
        ));
    }
}
