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
    /// The ring last read of each tenant: its Secret's resourceVersion and when it was read.
    read: Mutex<HashMap<String, (KeyRing, String, Instant)>>,
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

    fn remember(&self, tenant: &TenantId, ring: &KeyRing, version: String) {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_string(), (ring.clone(), version, Instant::now()));
    }

    /// The tenant's ring (made, in a new Secret, when it has none); `fresh`: read now, not
    /// from the copy read in the last few seconds.
    pub async fn load(&self, tenant: &TenantId, fresh: bool) -> Result<KeyRing, VaultError> {
        if !fresh
            && let Some((ring, _, at)) = self
                .read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(tenant.as_str())
            && at.elapsed() < FRESH_FOR
        {
            return Ok(ring.clone());
        }
        let name = Self::name(tenant);
        for _ in 0..3 {
            if let Some(secret) = self
                .api()
                .get_opt(&name)
                .await
                .map_err(|e| self.kube(tenant, e))?
            {
                let ring = self.ring_of(tenant, &secret)?;
                let version = secret.metadata.resource_version.unwrap_or_default();
                self.remember(tenant, &ring, version);
                return Ok(ring);
            }
            let ring = KeyRing::generate()?;
            match self
                .api()
                .create(&PostParams::default(), &self.secret(tenant, &ring, None)?)
                .await
            {
                Ok(created) => {
                    self.remember(
                        tenant,
                        &ring,
                        created.metadata.resource_version.unwrap_or_default(),
                    );
                    return Ok(ring);
                }
                // Another replica made it first: read theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(self.kube(tenant, e)),
            }
        }
        Err(VaultError::KeyRing(format!(
            "Secret {}/{name} is created and deleted again by someone else",
            self.namespace
        )))
    }

    /// Replaces the tenant's ring, if its Secret is still the version last read here.
    pub async fn save(&self, tenant: &TenantId, ring: &KeyRing) -> Result<(), VaultError> {
        let version = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant.as_str())
            .map(|(_, version, _)| version.clone())
            .ok_or_else(|| VaultError::KeyRing("a ring is saved only after it was read".into()))?;
        let secret = self.secret(tenant, ring, Some(version))?;
        match self
            .api()
            .replace(&Self::name(tenant), &PostParams::default(), &secret)
            .await
        {
            Ok(replaced) => {
                self.remember(
                    tenant,
                    ring,
                    replaced.metadata.resource_version.unwrap_or_default(),
                );
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(VaultError::KeyRing(format!(
                "Secret {}/{} was changed by another gateway replica meanwhile (a rotation there); try again",
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
