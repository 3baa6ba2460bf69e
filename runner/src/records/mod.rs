//! DecisionRecords: typed, hash-chained, signed entries per run, the stores that keep them, and
//! their verification.

pub mod canonical;
pub mod entry;
pub mod read;
pub mod recorder;
pub mod store;
pub mod timeline;
pub mod vaulted;
pub mod verify;

pub use entry::{EntryBody, Hash, PinnedDigests, RecordEntry, StoredEntry};
pub use read::{ReadError, read_run, read_run_from};
pub use recorder::{RecordError, Recorder, RunStart};
#[cfg(feature = "embedded")]
pub use store::embedded::EmbeddedStore;
pub use store::{
    RecordStore, RunCursor, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
    any::{AnyStore, StoreLocation},
    scratch::ScratchStore,
};
pub use verify::{VerifiedChain, VerifyError, verify_entries, verify_run};
