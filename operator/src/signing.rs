//! The operator's signing key: the ed25519 key RunContexts are signed with, kept in a Secret in
//! the operator's namespace. Generated once, if absent, and never replaced (replacing it would
//! invalidate every RunContext in flight); a second replica racing to create it reads the
//! winner's.

use contextos_runner::keys::KeyPair;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, api::PostParams};
use serde_json::json;

/// Name of the Secret.
pub const SECRET: &str = "contextos-signing-key";
/// Key of the hex-encoded key in it.
pub const KEY: &str = "signing.key";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("reading or creating Secret {namespace}/{SECRET}: {source}")]
    Kube {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{SECRET} has no valid `{KEY}`; delete it to have a new key generated")]
    Invalid { namespace: String },
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

/// Loads the key from its Secret, creating the Secret first if it does not exist.
pub async fn ensure_key(client: &Client, namespace: &str) -> Result<KeyPair, SigningKeyError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let kube_error = |source| SigningKeyError::Kube {
        namespace: namespace.to_owned(),
        source,
    };
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(SECRET).await.map_err(kube_error)? {
            let text = secret
                .data
                .as_ref()
                .and_then(|d| d.get(KEY))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned());
            return text
                .as_deref()
                .and_then(KeyPair::from_hex)
                .ok_or_else(|| SigningKeyError::Invalid {
                    namespace: namespace.to_owned(),
                });
        }
        let key = KeyPair::generate().map_err(|e| SigningKeyError::Generate(e.to_string()))?;
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "contextos"}},
            "type": "Opaque",
            "stringData": {KEY: key.to_hex()},
        }))
        .map_err(|e| SigningKeyError::Generate(e.to_string()))?;
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(key),
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(kube_error(e)),
        }
    }
    Err(SigningKeyError::Invalid {
        namespace: namespace.to_owned(),
    })
}
