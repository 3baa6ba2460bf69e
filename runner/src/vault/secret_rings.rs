//! Key rings kept in Secrets of the gateway service's own namespace (`contextos-vault-<tenant>`,
//! key `ring.json`): every replica reads and writes the same rings, each write conditional on
//! the version it read, so two replicas rotating at once cannot lose a key. The rings never
//! enter the record store, and a copy of the store holds none of them.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::{VaultError, kek::KeyRing};
use crate::records::TenantId;

/// The data key of a ring in its Secret.
const RING_KEY: &str = "ring.json";
/// How long a ring read is used again before the Secret is read anew (a rotation elsewhere is
/// seen by then; an unwrap that meets an epoch it does not know reads anew at once).
const FRESH_FOR: Duration = Duration::from_secs(5);
/// The most bytes of a ring's Secret value.
const MAX_RING: usize = 64 * 1024;

/// Tenants' key rings in Secrets of one namespace.
pub struct SecretRings {
    client: Client,
    namespace: String,
    /// The ring last read of each tenant (with its Secret's resourceVersion), and when.
    read: Mutex<HashMap<String, (KeyRing, Instant)>>,
}

impl std::fmt::Debug for SecretRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRings")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl SecretRings {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            read: Mutex::new(HashMap::new()),
        }
    }

    fn api(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn name(tenant: &TenantId) -> String {
        format!("contextos-vault-{tenant}")
    }

    fn kube(&self, tenant: &TenantId, e: kube::Error) -> VaultError {
        VaultError::KeyRing(format!("Secret {}/{}: {e}", self.namespace, Self::name(tenant)))
    }

    fn remember(&self, tenant: &TenantId, ring: &KeyRing) {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_string(), (ring.clone(), Instant::now()));
    }

    /// The tenant's ring, if it has one (with its Secret's resourceVersion); `fresh`: read
    /// now, not from the copy read in the last few seconds.
    pub async fn load(&self, tenant: &TenantId, fresh: bool) -> Result<Option<KeyRing>, VaultError> {
        if !fresh
            && let Some((ring, at)) = self
                .read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(tenant.as_str())
            && at.elapsed() < FRESH_FOR
        {
            return Ok(Some(ring.clone()));
        }
        let Some(secret) = self
            .api()
            .get_opt(&Self::name(tenant))
            .await
            .map_err(|e| self.kube(tenant, e))?
        else {
            return Ok(None);
        };
        let mut ring = self.ring_of(tenant, &secret)?;
        ring.version = secret.metadata.resource_version;
        self.remember(tenant, &ring);
        Ok(Some(ring))
    }

    /// Creates the tenant's Secret (a ring never kept) or replaces it if it is still the
    /// version the ring was read from; the saved ring with its new version.
    pub async fn save(&self, tenant: &TenantId, ring: &KeyRing) -> Result<KeyRing, VaultError> {
        let secret = self.secret(tenant, ring, ring.version.clone())?;
        let saved = match &ring.version {
            None => self.api().create(&PostParams::default(), &secret).await,
            Some(_) => {
                self.api()
                    .replace(&Self::name(tenant), &PostParams::default(), &secret)
                    .await
            }
        };
        match saved {
            Ok(saved) => {
                let mut ring = ring.clone();
                ring.version = saved.metadata.resource_version;
                self.remember(tenant, &ring);
                Ok(ring)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(VaultError::RingChanged(format!(
                "Secret {}/{}",
                self.namespace,
                Self::name(tenant)
            ))),
            Err(e) => Err(self.kube(tenant, e)),
        }
    }

    fn ring_of(&self, tenant: &TenantId, secret: &Secret) -> Result<KeyRing, VaultError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|data| data.get(RING_KEY))
            .map(|b| b.0.as_slice())
            .unwrap_or_default();
        if bytes.len() > MAX_RING {
            return Err(VaultError::KeyRing(format!(
                "Secret {}/{}: {RING_KEY} is larger than {MAX_RING} bytes",
                self.namespace,
                Self::name(tenant)
            )));
        }
        let ring: KeyRing = serde_json::from_slice(bytes).map_err(|e| {
            VaultError::KeyRing(format!(
                "Secret {}/{}: {RING_KEY} is not a key ring ({e}); it is never replaced by a new one, as that would make every subject's data unreadable",
                self.namespace,
                Self::name(tenant)
            ))
        })?;
        ring.check()?;
        Ok(ring)
    }

    fn secret(
        &self,
        tenant: &TenantId,
        ring: &KeyRing,
        version: Option<String>,
    ) -> Result<Secret, VaultError> {
        let bytes = serde_json::to_vec(ring).map_err(|e| VaultError::KeyRing(e.to_string()))?;
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(Self::name(tenant)),
                namespace: Some(self.namespace.clone()),
                resource_version: version,
                labels: Some(
                    [
                        ("app.kubernetes.io/part-of".to_owned(), "contextos".to_owned()),
                        ("contextos.dev/vault-tenant".to_owned(), tenant.to_string()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(RING_KEY.to_owned(), ByteString(bytes))].into()),
            ..Secret::default()
        })
    }
}
