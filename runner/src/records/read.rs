//! Reading a run back: its entries decoded, with blob references replaced by the bodies they
//! stand for.

use super::{
    entry::{EntryBody, Hash, RecordEntry},
    store::{RecordStore, StoreError, TenantId},
};

/// Why a run could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("run {run_id} not found in tenant {tenant} (see `contextos records list --tenant {tenant}`)")]
    NotFound { tenant: String, run_id: String },
    #[error("run {run_id}: entry {seq} is unreadable ({problem}); run `contextos records verify {run_id}`")]
    Unreadable {
        run_id: String,
        seq: u64,
        problem: String,
    },
    #[error("run {run_id}: what it recorded about its subject cannot be opened: {source}")]
    Vault {
        run_id: String,
        source: crate::vault::VaultError,
    },
    #[error("run {run_id}: entry {seq} references blob {blob}, which is missing")]
    MissingBlob { run_id: String, seq: u64, blob: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every entry of `run_id` with its stored hash, blobs resolved.
pub async fn read_run<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
) -> Result<Vec<(Hash, RecordEntry)>, ReadError> {
    let entries = read_run_from(store, tenant, run_id, 0).await?;
    if entries.is_empty() {
        return Err(ReadError::NotFound {
            tenant: tenant.to_string(),
            run_id: run_id.to_owned(),
        });
    }
    Ok(entries)
}

/// The entries of `run_id` from `from_seq` on (none if there are none yet), blobs resolved
/// and, in a run about a subject, what it recorded about them opened (or, once they are
/// erased, reading [`super::vaulted::ERASED`]).
pub async fn read_run_from<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    from_seq: u64,
) -> Result<Vec<(Hash, RecordEntry)>, ReadError> {
    let mut entries = read_stored_from(store, tenant, run_id, from_seq).await?;
    open_entries(store, tenant, run_id, &mut entries).await?;
    Ok(entries)
}

/// Opens what entries of a run about a subject recorded about them, with the run's key from
/// `store` (see [`super::vaulted`]). Every entry must be of the same subject, or of none.
pub async fn open_entries<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    entries: &mut [(Hash, RecordEntry)],
) -> Result<(), ReadError> {
    let Some(subject) = entries.iter().find_map(|(_, e)| e.vaulted.clone()) else {
        return Ok(());
    };
    let vault = |source| ReadError::Vault {
        run_id: run_id.to_owned(),
        source,
    };
    let key = store
        .run_key(tenant, run_id, &subject, crate::vault::KeyUse::Read)
        .await
        .map_err(vault)?;
    for (_, entry) in entries.iter_mut() {
        if entry.vaulted.as_ref() != Some(&subject) {
            return Err(ReadError::Unreadable {
                run_id: run_id.to_owned(),
                seq: entry.seq,
                problem: format!(
                    "the run is about {subject}, and this entry is {}",
                    entry
                        .vaulted
                        .as_ref()
                        .map_or_else(|| "about no one".to_owned(), |s| format!("about {s}"))
                ),
            });
        }
        super::vaulted::unlock(&mut entry.body, key.as_ref()).map_err(|e| ReadError::Unreadable {
            run_id: run_id.to_owned(),
            seq: entry.seq,
            problem: e.to_string(),
        })?;
    }
    Ok(())
}

/// The entries of `run_id` from `from_seq` on as stored (blobs resolved; nothing opened).
pub async fn read_stored_from<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    from_seq: u64,
) -> Result<Vec<(Hash, RecordEntry)>, ReadError> {
    read_stored_page(store, tenant, run_id, from_seq, usize::MAX).await
}

/// [`read_stored_from`], at most `limit` entries.
pub async fn read_stored_page<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<(Hash, RecordEntry)>, ReadError> {
    let chain = store.read_chain_page(tenant, run_id, from_seq, limit).await?;
    let unreadable = |seq: u64, problem: String| ReadError::Unreadable {
        run_id: run_id.to_owned(),
        seq,
        problem,
    };
    let mut out = Vec::with_capacity(chain.len());
    for stored in chain {
        let mut entry =
            RecordEntry::decode(&stored.bytes).map_err(|e| unreadable(stored.seq, e.to_string()))?;
        if let EntryBody::Blob { blob, .. } = &entry.body {
            let bytes = store
                .get_blob(tenant, blob)
                .await?
                .ok_or_else(|| ReadError::MissingBlob {
                    run_id: run_id.to_owned(),
                    seq: stored.seq,
                    blob: blob.to_hex(),
                })?;
            entry.body = serde_json::from_slice(&bytes)
                .map_err(|e| unreadable(stored.seq, format!("its blob {blob} does not decode: {e}")))?;
        }
        out.push((stored.hash, entry));
    }
    Ok(out)
}
