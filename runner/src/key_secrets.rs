//! Keys kept in Secrets of `contextos-system`: the operator's RunContext-signing key and the
//! gateway service's master record key. Each is generated once, if absent, and never replaced
//! (replacing one would invalidate every RunContext in flight, or every tenant's published
//! record key); a second replica racing to create it reads the winner's. Their public halves as
//! published: in ConfigMaps of that namespace, and each tenant's record key by the gateway
//! service ([`fetch_tenant_key`]).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, api::PostParams};
use serde_json::json;

use crate::keys::KeyPair;

/// A key's Secret: its name and the data key holding the hex seed.
#[derive(Clone, Copy, Debug)]
pub struct KeySecret {
    pub name: &'static str,
    pub key: &'static str,
}

/// The operator's RunContext-signing key.
pub const RUN_CONTEXT_KEY: KeySecret = KeySecret {
    name: "contextos-signing-key",
    key: "signing.key",
};

/// The gateway service's master key, from which every tenant's record key is derived.
pub const RECORD_MASTER_KEY: KeySecret = KeySecret {
    name: "contextos-record-keys",
    key: "master.key",
};

/// ConfigMap (in the operator's namespace) where the operator publishes the public half of its
/// RunContext key, for the gateway service and auditors.
pub const PUBLIC_KEYS_CONFIG_MAP: &str = "contextos-public-keys";
/// Key of the RunContext public key (hex) in [`PUBLIC_KEYS_CONFIG_MAP`].
pub const RUN_CONTEXT_PUBLIC_KEY: &str = "run-context.pub";
/// ConfigMap (in the same namespace) where the gateway service publishes the public half of its
/// record-key certifier. Apart from [`PUBLIC_KEYS_CONFIG_MAP`], so that the gateway, which may
/// patch this one, cannot touch the key it trusts RunContexts by. The operator makes it (empty)
/// when it starts: the gateway may patch it, not create ConfigMaps.
pub const GATEWAY_KEYS_CONFIG_MAP: &str = "contextos-gateway-keys";
/// Key of the gateway's record-key certifier (hex) in [`GATEWAY_KEYS_CONFIG_MAP`]: what vouches
/// for each tenant's record key (see [`crate::keys::TenantKeys::certifier`]).
pub const RECORD_CERTIFIER_PUBLIC_KEY: &str = "record-certifier.pub";

/// The field manager the gateway service writes [`GATEWAY_KEYS_CONFIG_MAP`]'s data as (the
/// operator's apply, as [`contextos_crds::FIELD_MANAGER`], owns only the object's metadata).
const GATEWAY_FIELD_MANAGER: &str = "contextos-gateway";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("reading or creating Secret {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} has no valid `{key}`; delete it to have a new key generated")]
    Invalid {
        namespace: String,
        name: &'static str,
        key: &'static str,
    },
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

/// Loads the key from its Secret, creating the Secret first if it does not exist.
pub async fn ensure_key(
    client: &Client,
    namespace: &str,
    which: KeySecret,
) -> Result<KeyPair, SigningKeyError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let kube_error = |source| SigningKeyError::Kube {
        namespace: namespace.to_owned(),
        name: which.name,
        source,
    };
    let invalid = || SigningKeyError::Invalid {
        namespace: namespace.to_owned(),
        name: which.name,
        key: which.key,
    };
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(which.name).await.map_err(kube_error)? {
            let text = secret
                .data
                .as_ref()
                .and_then(|d| d.get(which.key))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned());
            return text.as_deref().and_then(KeyPair::from_hex).ok_or_else(invalid);
        }
        let key = KeyPair::generate().map_err(|e| SigningKeyError::Generate(e.to_string()))?;
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": which.name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "contextos"}},
            "type": "Opaque",
            "stringData": {which.key: key.to_hex()},
        }))
        .map_err(|e| SigningKeyError::Generate(e.to_string()))?;
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(key),
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(kube_error(e)),
        }
    }
    Err(invalid())
}

/// Publishes the operator's RunContext public key in [`PUBLIC_KEYS_CONFIG_MAP`].
pub async fn publish_run_context_key(
    client: &Client,
    namespace: &str,
    key: &KeyPair,
) -> Result<(), kube::Error> {
    let entry = (RUN_CONTEXT_PUBLIC_KEY, key);
    apply(
        client,
        namespace,
        PUBLIC_KEYS_CONFIG_MAP,
        contextos_crds::FIELD_MANAGER,
        Some(entry),
    )
    .await
}

/// Makes [`GATEWAY_KEYS_CONFIG_MAP`] (the operator's part: the object, not its data).
pub async fn make_gateway_keys_config_map(client: &Client, namespace: &str) -> Result<(), kube::Error> {
    apply(
        client,
        namespace,
        GATEWAY_KEYS_CONFIG_MAP,
        contextos_crds::FIELD_MANAGER,
        None,
    )
    .await
}

/// Publishes the gateway's record-key certifier in [`GATEWAY_KEYS_CONFIG_MAP`], which the
/// operator made (the gateway may patch that one ConfigMap, not create one).
pub async fn publish_record_certifier(
    client: &Client,
    namespace: &str,
    key: &KeyPair,
) -> Result<(), kube::Error> {
    let entry = (RECORD_CERTIFIER_PUBLIC_KEY, key);
    apply(
        client,
        namespace,
        GATEWAY_KEYS_CONFIG_MAP,
        GATEWAY_FIELD_MANAGER,
        Some(entry),
    )
    .await
}

/// Applies ConfigMap `name` as `manager`, with `entry` (a data key and the key pair whose public
/// half it holds) if given: each manager owns only what it applies, so each writer's apply
/// leaves the other's in place.
async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    manager: &str,
    entry: Option<(&str, &KeyPair)>,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "contextos"}},
    });
    if let Some((key, pair)) = entry {
        config_map["data"] = json!({key: pair.public().to_hex()});
    }
    let config_map: ConfigMap = serde_json::from_value(config_map).map_err(kube::Error::SerdeError)?;
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &kube::api::PatchParams::apply(manager).force(),
            &kube::api::Patch::Apply(&config_map),
        )
        .await
        .map(|_| ())
}

/// The operator's published RunContext public key, if it has published one.
pub async fn published_run_context_key(
    client: &Client,
    namespace: &str,
) -> Result<Option<crate::keys::PublicKey>, kube::Error> {
    published(client, namespace, PUBLIC_KEYS_CONFIG_MAP, RUN_CONTEXT_PUBLIC_KEY).await
}

/// The gateway's published record-key certifier, if it has published one.
pub async fn published_record_certifier(
    client: &Client,
    namespace: &str,
) -> Result<Option<crate::keys::PublicKey>, kube::Error> {
    published(
        client,
        namespace,
        GATEWAY_KEYS_CONFIG_MAP,
        RECORD_CERTIFIER_PUBLIC_KEY,
    )
    .await
}

async fn published(
    client: &Client,
    namespace: &str,
    name: &str,
    entry: &str,
) -> Result<Option<crate::keys::PublicKey>, kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let found = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(found
        .and_then(|c| c.data)
        .and_then(|d| d.get(entry).cloned())
        .and_then(|hex| crate::keys::PublicKey::from_hex(&hex).ok()))
}

/// The longest answer of the gateway's record-key endpoint read (a few hundred bytes are
/// expected).
const MAX_TENANT_KEY_ANSWER_BYTES: usize = 4096;

/// A tenant's record key as the gateway service publishes it, with the record-key certifier's
/// certificate for it (none from a gateway older than certificates): to be checked with
/// [`crate::keys::PublicKey::certifies`] before it is believed.
#[derive(Debug, PartialEq, Eq)]
pub struct PublishedTenantKey {
    pub key: crate::keys::PublicKey,
    pub certificate: Option<String>,
}

impl PublishedTenantKey {
    /// Reads the endpoint's answer (`{"publicKey": <hex>, "certificate": <hex>, …}`).
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            public_key: String,
            #[serde(default)]
            certificate: Option<String>,
        }
        let answer: Answer =
            serde_json::from_slice(body).map_err(|e| format!("the answer is not a record key: {e}"))?;
        Ok(Self {
            key: crate::keys::PublicKey::from_hex(&answer.public_key).map_err(|e| e.to_string())?,
            certificate: answer.certificate,
        })
    }

    /// The key, if `certifier` (the gateway's record-key certifier, as published in
    /// [`GATEWAY_KEYS_CONFIG_MAP`]) vouches for it as `tenant`'s.
    pub fn vouched(
        self,
        tenant: &str,
        certifier: &crate::keys::PublicKey,
    ) -> Result<crate::keys::PublicKey, String> {
        let Self { key, certificate } = self;
        let certificate = certificate
            .ok_or("the answer carries no certificate (a gateway older than this release? upgrade it)")?;
        if certifier.certifies(tenant, &key, &certificate) {
            Ok(key)
        } else {
            Err(format!(
                "the key it names ({}) is not vouched for by record-key certifier {} (published in \
                 ConfigMap {GATEWAY_KEYS_CONFIG_MAP}): whatever answered is not that gateway service",
                key.key_id(),
                certifier.key_id(),
            ))
        }
    }
}

/// `tenant`'s record key as the gateway service at `gateway` publishes it
/// (`GET /v1/tenants/<tenant>/record-key`), its answer read bounded.
pub async fn fetch_tenant_key(
    gateway: &str,
    tenant: &str,
    timeout: std::time::Duration,
) -> Result<PublishedTenantKey, String> {
    let url = format!("{}/v1/tenants/{tenant}/record-key", gateway.trim_end_matches('/'));
    let response = crate::http::client()
        .get(&url)
        .timeout(timeout)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("{url}: {e}"))?;
    let body = crate::http::read_capped(response, MAX_TENANT_KEY_ANSWER_BYTES)
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .ok_or_else(|| {
            format!("{url} answered more than {MAX_TENANT_KEY_ANSWER_BYTES} bytes: not a record key")
        })?;
    PublishedTenantKey::parse(&body).map_err(|e| format!("{url}: {e}"))
}
