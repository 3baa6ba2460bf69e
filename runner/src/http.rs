//! HTTP clients: every client ContextOS builds (tools, models, the gateway service, the
//! operator's key fetches) uses one TLS setup — rustls with the ring provider and the
//! platform's certificate roots, read once per process — installed before the first client.
//!
//! A minimal image may have no CA certificates at all (a runner pod needs none: it speaks plain
//! HTTP to the gateway service). Building a client must not fail for that — it would take the
//! whole process down over a capability it does not use — so without platform roots the
//! clients verify HTTPS servers against an empty root store: every HTTPS connection is refused
//! with an unknown-issuer error, plain HTTP works, and a warning says how to fix it.

use std::sync::{LazyLock, Once};

static PROVIDER: Once = Once::new();

/// The platform's CA certificates, read once per process. Reading and decoding the bundle
/// (hundreds of files on a Debian host) costs far more than building a client from parsed
/// certificates, and the gateway service builds clients for every run it serves. Only
/// certificates that parse as trust anchors are kept — the way the verifier counts them — so a
/// bundle of unreadable entries means "none" here too, instead of a client that fails to build.
static PLATFORM_ROOTS: LazyLock<Vec<reqwest::Certificate>> = LazyLock::new(|| {
    let mut anchors = rustls::RootCertStore::empty();
    let roots: Vec<reqwest::Certificate> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .filter(|der| anchors.add(der.clone()).is_ok())
        .filter_map(|der| reqwest::Certificate::from_der(&der).ok())
        .collect();
    if roots.is_empty() {
        tracing::warn!(
            "no CA certificates found on this system: HTTPS servers cannot be verified and every \
             HTTPS call will be refused; install them (Debian: ca-certificates) or set SSL_CERT_FILE \
             to a PEM bundle"
        );
    }
    roots
});

/// Installs the process-wide TLS provider (once; a provider installed earlier is kept).
pub fn install_tls_provider() {
    PROVIDER.call_once(|| {
        // Err means another provider is already the default: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client builder with the TLS provider and the platform's roots (or none, see above) in place.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder().tls_certs_only(PLATFORM_ROOTS.iter().cloned())
}

/// A client with default settings.
pub fn client() -> reqwest::Client {
    client_builder()
        .build()
        .expect("an HTTP client with default settings builds once the TLS provider is installed")
}

/// A response body, read up to `cap` bytes: `None` once it passes them (reading stops there, so
/// a peer that sends more never has the excess held in memory).
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> reqwest::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// A blocking client (for a thread outside any async runtime, such as the trace exporter's),
/// with the same TLS setup.
pub fn blocking_client() -> reqwest::Result<reqwest::blocking::Client> {
    install_tls_provider();
    reqwest::blocking::Client::builder()
        .tls_certs_only(PLATFORM_ROOTS.iter().cloned())
        .build()
}
