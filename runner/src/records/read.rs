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

/// The entries of `run_id` from `from_seq` on (none if there are none yet), blobs resolved.
pub async fn read_run_from<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    run_id: &str,
    from_seq: u64,
) -> Result<Vec<(Hash, RecordEntry)>, ReadError> {
    let chain = store.read_chain(tenant, run_id, from_seq).await?;
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
