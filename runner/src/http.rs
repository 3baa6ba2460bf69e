//! HTTP clients: every client ContextOS builds (tools, models, the gateway service, the
//! operator's key fetches) uses one TLS setup — rustls with the ring provider and the
//! platform's certificate roots — installed once per process before the first client.

use std::sync::Once;

static PROVIDER: Once = Once::new();

/// Installs the process-wide TLS provider (once; a provider installed earlier is kept).
pub fn install_tls_provider() {
    PROVIDER.call_once(|| {
        // Err means another provider is already the default: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client builder with the TLS provider in place.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder()
}

/// A client with default settings.
pub fn client() -> reqwest::Client {
    client_builder()
        .build()
        .expect("an HTTP client builds once the ring TLS provider is installed")
}
