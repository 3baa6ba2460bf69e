//! The tenants' public record keys, as the gateway service publishes them
//! (`GET /v1/tenants/<namespace>/record-key`): the operator checks with them what a runner relays
//! from the gateway (approval requests, completions, progress, replay verdicts) before it acts on
//! it. That answer crosses the gateway's plain-HTTP Service, so a key is taken only with the
//! certificate of the gateway's record-key certifier, whose public half the gateway publishes
//! through the API server (ConfigMap `contextos-gateway-keys` in the operator's namespace, which
//! no tenant can write): whoever answers in the gateway's place cannot hand the operator a key
//! of their own. Keys never change for a tenant, so each is fetched once.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use contextos_runner::{key_secrets, keys::PublicKey};

/// Fetched keys by namespace, and the certifier they were checked with.
#[derive(Debug)]
pub struct TenantKeys {
    /// Where the gateway publishes its certifier: the operator's own namespace.
    namespace: String,
    certifier: Mutex<Option<PublicKey>>,
    known: Mutex<HashMap<String, PublicKey>>,
}

/// Why a key could not be had.
#[derive(Debug, thiserror::Error)]
#[error("cannot get tenant {tenant}'s record key from the gateway service at {gateway}: {detail}")]
pub struct TenantKeyError {
    tenant: String,
    gateway: String,
    detail: String,
}

impl TenantKeys {
    /// Keys checked against the certifier the gateway publishes in `namespace`.
    pub fn published_in(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            certifier: Mutex::new(None),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The public key the gateway at `gateway` signs `tenant`'s records and requests with.
    pub async fn get(
        &self,
        client: &kube::Client,
        gateway: &str,
        tenant: &str,
    ) -> Result<PublicKey, TenantKeyError> {
        if let Some(key) = self.known.lock().ok().and_then(|k| k.get(tenant).copied()) {
            return Ok(key);
        }
        let error = |detail: String| TenantKeyError {
            tenant: tenant.to_owned(),
            gateway: gateway.to_owned(),
            detail,
        };
        let certifier = self.certifier(client).await.map_err(error)?;
        let published = key_secrets::fetch_tenant_key(gateway, tenant, Duration::from_secs(10))
            .await
            .map_err(error)?;
        let key = published.vouched(tenant, &certifier).map_err(error)?;
        if let Ok(mut known) = self.known.lock() {
            known.insert(tenant.to_owned(), key);
        }
        Ok(key)
    }

    /// The gateway's record-key certifier, read once from the API server.
    async fn certifier(&self, client: &kube::Client) -> Result<PublicKey, String> {
        if let Some(key) = self.certifier.lock().ok().and_then(|c| *c) {
            return Ok(key);
        }
        let found = key_secrets::published_record_certifier(client, &self.namespace)
            .await
            .map_err(|e| {
                format!(
                    "cannot read ConfigMap {}/{}: {e}",
                    self.namespace,
                    key_secrets::GATEWAY_KEYS_CONFIG_MAP
                )
            })?;
        let key = found.ok_or_else(|| {
            format!(
                "the gateway service has not published its record-key certifier (`{}` in ConfigMap \
                 {}/{}) to check tenant keys with: is it running, and may it patch that ConfigMap?",
                key_secrets::RECORD_CERTIFIER_PUBLIC_KEY,
                self.namespace,
                key_secrets::GATEWAY_KEYS_CONFIG_MAP
            )
        })?;
        if let Ok(mut certifier) = self.certifier.lock() {
            *certifier = Some(key);
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use contextos_runner::{
        key_secrets::PublishedTenantKey,
        keys::{KeyPair, TenantKeys as Derived},
    };
    use serde_json::json;

    use super::*;

    /// What `get` does with an answer's body.
    fn taken(body: &[u8], tenant: &str, certifier: &PublicKey) -> Result<PublicKey, String> {
        PublishedTenantKey::parse(body)?.vouched(tenant, certifier)
    }

    fn answer(key: &PublicKey, certificate: Option<String>) -> Vec<u8> {
        json!({"tenant": "shop", "publicKey": key.to_hex(), "certificate": certificate})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_gateways_answer_is_taken() {
        let gateway = Derived::new(&KeyPair::from_seed([3; 32]));
        let certifier = gateway.certifier().public();
        let key = gateway.for_tenant("shop").public();
        let body = answer(&key, Some(gateway.certificate("shop")));
        assert_eq!(taken(&body, "shop", &certifier), Ok(key));
    }

    #[test]
    fn a_key_from_whoever_answers_in_the_gateways_place_is_refused() {
        let gateway = Derived::new(&KeyPair::from_seed([3; 32]));
        let certifier = gateway.certifier().public();
        let forged = KeyPair::from_seed([9; 32]);
        let impostor = Derived::new(&KeyPair::from_seed([4; 32]));
        let refused = [
            // A key of the attacker's, without a certificate or with one it made itself.
            answer(&forged.public(), None),
            answer(&forged.public(), Some(forged.sign_hex(b"shop"))),
            // A whole gateway of the attacker's: its own master, certifier and certificate.
            answer(
                &impostor.for_tenant("shop").public(),
                Some(impostor.certificate("shop")),
            ),
            // The real gateway's key and certificate for another tenant, offered for this one.
            answer(
                &gateway.for_tenant("bank").public(),
                Some(gateway.certificate("bank")),
            ),
            // The real key with another tenant's certificate.
            answer(
                &gateway.for_tenant("shop").public(),
                Some(gateway.certificate("bank")),
            ),
            b"not json".to_vec(),
            json!({"publicKey": "zz", "certificate": "00"})
                .to_string()
                .into_bytes(),
        ];
        for body in refused {
            assert!(
                taken(&body, "shop", &certifier).is_err(),
                "taken: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
