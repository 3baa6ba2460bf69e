//! HTTP clients: every client ContextOS builds (tools, models, the gateway service, the
//! operator's key fetches) uses one TLS setup — rustls with the ring provider and the
//! platform's certificate roots — installed once per process before the first client.
//!
//! A minimal image may have no CA certificates at all (a runner pod needs none: it speaks plain
//! HTTP to the gateway service). Building a client must not fail for that — it would take the
//! whole process down over a capability it does not use — so without platform roots the
//! clients verify HTTPS servers against an empty root store: every HTTPS connection is refused
//! with an unknown-issuer error, plain HTTP works, and a warning says how to fix it.

use std::sync::{LazyLock, Once};

static PROVIDER: Once = Once::new();

/// Whether the platform has CA certificates the verifier will accept (looked up once; the
/// bundle is parsed again by the verifier of each client, which is what it would cost anyway).
/// Counted the way the verifier counts them — only certificates that parse — so that a bundle
/// of unreadable entries means "none" here too instead of a client that fails to build.
static PLATFORM_ROOTS: LazyLock<bool> = LazyLock::new(|| {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let found = added > 0;
    if !found {
        tracing::warn!(
            "no CA certificates found on this system: HTTPS servers cannot be verified and every \
             HTTPS call will be refused; install them (Debian: ca-certificates) or set SSL_CERT_FILE \
             to a PEM bundle"
        );
    }
    found
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
    let builder = reqwest::Client::builder();
    if *PLATFORM_ROOTS {
        builder
    } else {
        builder.tls_certs_only([])
    }
}

/// A client with default settings.
pub fn client() -> reqwest::Client {
    client_builder()
        .build()
        .expect("an HTTP client with default settings builds once the TLS provider is installed")
}
