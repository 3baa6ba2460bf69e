//! The tenants' public record keys, as the gateway service publishes them
//! (`GET /v1/tenants/<namespace>/record-key`): the operator checks with them what a runner relays
//! from the gateway (an approval request) before it shows it to humans. Keys never change for a
//! tenant, so each is fetched once.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use contextos_runner::keys::PublicKey;

/// Fetched keys by namespace.
#[derive(Debug, Default)]
pub struct TenantKeys {
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
    /// The public key the gateway at `gateway` signs `tenant`'s records and requests with.
    pub async fn get(&self, gateway: &str, tenant: &str) -> Result<PublicKey, TenantKeyError> {
        if let Some(key) = self.known.lock().ok().and_then(|k| k.get(tenant).copied()) {
            return Ok(key);
        }
        let error = |detail: String| TenantKeyError {
            tenant: tenant.to_owned(),
            gateway: gateway.to_owned(),
            detail,
        };
        let url = format!("{}/v1/tenants/{tenant}/record-key", gateway.trim_end_matches('/'));
        let answer: serde_json::Value = contextos_runner::http::client()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| error(e.to_string()))?
            .json()
            .await
            .map_err(|e| error(e.to_string()))?;
        let key = answer["publicKey"]
            .as_str()
            .and_then(|hex| PublicKey::from_hex(hex).ok())
            .ok_or_else(|| error(format!("the answer names no key: {answer}")))?;
        if let Ok(mut known) = self.known.lock() {
            known.insert(tenant.to_owned(), key);
        }
        Ok(key)
    }
}
