//! Chooses a backend at run time from a store URL: `embedded:<path>` (or a bare path),
//! `tikv://<pd>[,<pd>…]`, or `gateway+http://<host>:<port>` (records read through the gateway
//! service: a replay Job with its pod's projected token and the ReadGrant in its environment, or
//! a person with their own Kubernetes token in `CONTEXTOS_TOKEN`).

use std::path::{Path, PathBuf};

#[cfg(feature = "embedded")]
use super::embedded::EmbeddedStore;
use super::{
    AppendBatch, Checkpoint, RecordStore, Result, RunFilter, RunSummary, SignedHead, StoreError, TenantId,
};
use crate::records::entry::{Hash, StoredEntry};

/// Where records are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Embedded(PathBuf),
    Tikv(String),
    /// The gateway service's base URL (`http://…`).
    Gateway(String),
}

impl StoreLocation {
    /// Parses `tikv://pd1:2379,pd2:2379`, `embedded:/path/records.redb` or a plain path.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(url) = text.strip_prefix("gateway+") {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(StoreError::Backend(format!(
                    "store URL {text}: expected gateway+http://<host>:<port>"
                )));
            }
            return Ok(Self::Gateway(url.to_owned()));
        }
        if let Some(pd) = text.strip_prefix("tikv://") {
            if pd.trim().is_empty() {
                return Err(StoreError::Backend(
                    "store URL tikv:// names no PD endpoint; use tikv://host:2379".into(),
                ));
            }
            return Ok(Self::Tikv(pd.to_owned()));
        }
        let path = text.strip_prefix("embedded:").unwrap_or(text);
        Ok(Self::Embedded(PathBuf::from(path)))
    }

    /// The embedded store file inside a data directory.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self::Embedded(data_dir.join("records.redb"))
    }
}

/// Either backend behind one type.
#[derive(Debug)]
pub enum AnyStore {
    #[cfg(feature = "embedded")]
    Embedded(EmbeddedStore),
    #[cfg(feature = "tikv")]
    Tikv(super::tikv::TikvStore),
    Gateway(super::remote::RemoteStore),
}

impl AnyStore {
    /// Keeps the identity vault's key rings in `rings` (the gateway service: its Secrets). A
    /// store reached through the gateway service holds none.
    #[cfg_attr(not(any(feature = "embedded", feature = "tikv")), allow(unused_variables))]
    pub fn with_key_rings(self, rings: crate::vault::kek::KeyRings) -> Self {
        match self {
            #[cfg(feature = "embedded")]
            Self::Embedded(store) => Self::Embedded(store.with_key_rings(rings)),
            #[cfg(feature = "tikv")]
            Self::Tikv(store) => Self::Tikv(store.with_key_rings(rings)),
            Self::Gateway(store) => Self::Gateway(store),
        }
    }

    /// Opens the store at `location`.
    pub async fn open(location: &StoreLocation) -> Result<Self> {
        match location {
            #[cfg(feature = "embedded")]
            StoreLocation::Embedded(path) => Ok(Self::Embedded(EmbeddedStore::open(path)?)),
            #[cfg(not(feature = "embedded"))]
            StoreLocation::Embedded(_) => Err(StoreError::Backend(
                "this build has no embedded store (feature `embedded`)".into(),
            )),
            #[cfg(feature = "tikv")]
            StoreLocation::Tikv(pd) => Ok(Self::Tikv(super::tikv::TikvStore::connect(pd).await?)),
            #[cfg(not(feature = "tikv"))]
            StoreLocation::Tikv(_) => Err(StoreError::Backend(
                "this build has no TiKV support (feature `tikv`)".into(),
            )),
            StoreLocation::Gateway(url) => Self::through_gateway(url).map(Self::Gateway),
        }
    }

    /// Opens the store at `location` for reading `tenant`'s records: through the gateway without
    /// a read grant in the environment, as a person with the token in
    /// [`READER_TOKEN_ENV`](super::remote::READER_TOKEN_ENV) (the gateway asks the API server
    /// whether they may read that namespace).
    pub async fn open_for(location: &StoreLocation, tenant: &TenantId) -> Result<Self> {
        use super::remote::{Credential, READER_TOKEN_ENV, RemoteStore, TokenSource};
        let StoreLocation::Gateway(url) = location else {
            return Self::open(location).await;
        };
        if std::env::var_os(crate::read_grant::READ_GRANT_ENV).is_some() {
            return Self::open(location).await;
        }
        refuse_plain_http_elsewhere(url)?;
        let token = std::env::var(READER_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "using the gateway as a person needs your Kubernetes bearer token in \
                     {READER_TOKEN_ENV} (e.g. `export {READER_TOKEN_ENV}=$(kubectl create token <service-account>)`, \
                     or your OIDC id-token); in namespace {tenant} you then need, in group contextos.dev, \
                     `get` on sessions/records to read records, `get`/`create` on consents to read/record \
                     consent, `get`/`delete` on memories to list/forget memory"
                ))
            })?;
        RemoteStore::new(
            url,
            TokenSource::Fixed(token.trim().to_owned()),
            Credential::Reader {
                namespace: tenant.as_str().to_owned(),
            },
            tenant.as_str(),
        )
        .map(Self::Gateway)
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// A replay Job's view of its tenant's records: the grant the operator put in its
    /// environment, the pod's projected token.
    fn through_gateway(url: &str) -> Result<super::remote::RemoteStore> {
        use super::remote::{Credential, DEFAULT_TOKEN_FILE, RemoteStore, TOKEN_FILE_ENV, TokenSource};
        let env = crate::read_grant::READ_GRANT_ENV;
        let grant = std::env::var(env).map_err(|_| {
            StoreError::Backend(format!(
                "reading records through the gateway needs a read grant in {env} (the operator sets it on replay Jobs)"
            ))
        })?;
        let tenant = serde_json::from_str::<serde_json::Value>(&grant)
            .ok()
            .and_then(|g| g["grant"]["tenant_id"].as_str().map(str::to_owned))
            .ok_or_else(|| StoreError::Backend(format!("{env} is not a signed read grant")))?;
        let token = std::env::var(TOKEN_FILE_ENV).unwrap_or_else(|_| DEFAULT_TOKEN_FILE.to_owned());
        RemoteStore::new(
            url,
            TokenSource::File(crate::run::pod::in_pod(std::path::Path::new(&token))),
            Credential::Read(grant.into_bytes()),
            &tenant,
        )
        .map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// A person's token goes over plain HTTP only to this machine (`kubectl port-forward`); to
/// anywhere else it needs TLS.
fn refuse_plain_http_elsewhere(url: &str) -> Result<()> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| StoreError::Backend(format!("store URL {url}: {e}")))?;
    if parsed.scheme() == "https" {
        return Ok(());
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if loopback {
        return Ok(());
    }
    Err(StoreError::Backend(format!(
        "refusing to send your token over plain HTTP to {url}: use https://, or `kubectl -n contextos-system \
         port-forward service/contextos-gateway 8480` and gateway+http://127.0.0.1:8480"
    )))
}

/// Forwards a call to whichever backend is open.
macro_rules! forward {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "embedded")]
            AnyStore::Embedded($store) => $call.await,
            #[cfg(feature = "tikv")]
            AnyStore::Tikv($store) => $call.await,
            AnyStore::Gateway($store) => $call.await,
        }
    };
}

/// [`forward!`] for memory, which the gateway service keeps for its runners and does not (yet)
/// serve to a reader outside the cluster.
macro_rules! forward_memory {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "embedded")]
            AnyStore::Embedded($store) => $call.await,
            #[cfg(feature = "tikv")]
            AnyStore::Tikv($store) => $call.await,
            AnyStore::Gateway(_) => Err(super::remote::memory_refused()),
        }
    };
}

impl RecordStore for AnyStore {
    async fn append(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        forward!(self, s => s.append(tenant, batch))
    }
    async fn append_flushed_soon(&self, tenant: &TenantId, batch: AppendBatch) -> Result<()> {
        forward!(self, s => s.append_flushed_soon(tenant, batch))
    }
    async fn flush_pending(&self) -> Result<()> {
        forward!(self, s => s.flush_pending())
    }
    async fn head(&self, tenant: &TenantId, run_id: &str) -> Result<Option<SignedHead>> {
        forward!(self, s => s.head(tenant, run_id))
    }
    async fn read_chain(&self, tenant: &TenantId, run_id: &str, from_seq: u64) -> Result<Vec<StoredEntry>> {
        forward!(self, s => s.read_chain(tenant, run_id, from_seq))
    }
    async fn read_chain_page(
        &self,
        tenant: &TenantId,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>> {
        forward!(self, s => s.read_chain_page(tenant, run_id, from_seq, limit))
    }
    async fn list_runs(&self, tenant: &TenantId, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        forward!(self, s => s.list_runs(tenant, filter))
    }
    async fn run_summary(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunSummary>> {
        forward!(self, s => s.run_summary(tenant, run_id))
    }
    async fn recorded_bytes(&self, tenant: &TenantId) -> Result<u64> {
        forward!(self, s => s.recorded_bytes(tenant))
    }
    async fn put_blob(&self, tenant: &TenantId, bytes: Vec<u8>) -> Result<Hash> {
        forward!(self, s => s.put_blob(tenant, bytes))
    }
    async fn get_blob(&self, tenant: &TenantId, hash: &Hash) -> Result<Option<Vec<u8>>> {
        forward!(self, s => s.get_blob(tenant, hash))
    }
    async fn latest_checkpoint(&self, tenant: &TenantId, session_id: &str) -> Result<Option<Checkpoint>> {
        forward!(self, s => s.latest_checkpoint(tenant, session_id))
    }
    async fn run_key(
        &self,
        tenant: &TenantId,
        run_id: &str,
        subject: &crate::consent::SubjectHandle,
        to: crate::vault::KeyUse,
    ) -> std::result::Result<Option<crate::vault::SecretKey>, crate::vault::VaultError> {
        forward!(self, s => s.run_key(tenant, run_id, subject, to))
    }
}

// Without a backend of its own (neither feature), every call is refused unread.
#[cfg_attr(not(any(feature = "embedded", feature = "tikv")), allow(unused_variables))]
impl crate::memory::backend::MemoryBackend for AnyStore {
    fn key_rings(&self) -> &crate::vault::kek::KeyRings {
        match self {
            #[cfg(feature = "embedded")]
            AnyStore::Embedded(s) => s.key_rings(),
            #[cfg(feature = "tikv")]
            AnyStore::Tikv(s) => s.key_rings(),
            AnyStore::Gateway(s) => s.key_rings(),
        }
    }

    async fn memory_get(&self, tenant: &TenantId, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        forward_memory!(self, s => s.memory_get(tenant, keys))
    }
    async fn memory_scan(
        &self,
        tenant: &TenantId,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<crate::memory::backend::Pairs> {
        forward_memory!(self, s => s.memory_scan(tenant, start, end, limit))
    }
    async fn memory_snapshot(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<(Vec<Option<Vec<u8>>>, crate::memory::backend::Pairs)> {
        forward_memory!(self, s => s.memory_snapshot(tenant, keys, start, end, limit))
    }
    async fn memory_write(
        &self,
        tenant: &TenantId,
        writes: Vec<crate::memory::backend::Write>,
    ) -> Result<Vec<bool>> {
        forward_memory!(self, s => s.memory_write(tenant, writes))
    }

    async fn memory_write_unflushed(
        &self,
        tenant: &TenantId,
        writes: Vec<crate::memory::backend::Write>,
    ) -> Result<Vec<bool>> {
        forward_memory!(self, s => s.memory_write_unflushed(tenant, writes))
    }

    async fn memory_update<R, F>(
        &self,
        tenant: &TenantId,
        keys: Vec<Vec<u8>>,
        durability: crate::memory::backend::Durability,
        update: F,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: Fn(&[Option<Vec<u8>>]) -> crate::memory::backend::Updated<R> + Send + Sync + 'static,
    {
        forward_memory!(self, s => s.memory_update(tenant, keys, durability, update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readers_token_travels_in_clear_only_to_this_machine() {
        for ok in [
            "http://127.0.0.1:8480",
            "http://localhost:8480",
            "http://[::1]:8480",
            "https://gw.example.com",
        ] {
            assert!(refuse_plain_http_elsewhere(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://gw.example.com:8480",
            "http://10.0.0.7:8480",
            "http://127.0.0.1.nip.io:8480",
        ] {
            assert!(refuse_plain_http_elsewhere(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn store_urls_parse() {
        assert_eq!(
            StoreLocation::parse("tikv://a:1,b:2").expect("ok"),
            StoreLocation::Tikv("a:1,b:2".into())
        );
        assert_eq!(
            StoreLocation::parse("embedded:/x.redb").expect("ok"),
            StoreLocation::Embedded("/x.redb".into())
        );
        assert_eq!(
            StoreLocation::parse("rel/x.redb").expect("ok"),
            StoreLocation::Embedded("rel/x.redb".into())
        );
        assert!(StoreLocation::parse("tikv://").is_err());
        assert_eq!(
            StoreLocation::parse("gateway+http://gw:8480").expect("ok"),
            StoreLocation::Gateway("http://gw:8480".into())
        );
        assert!(StoreLocation::parse("gateway+ftp://gw").is_err());
    }
}
