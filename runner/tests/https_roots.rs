//! HTTPS clients trust the platform's CA certificates — read once per process — and nothing
//! else: a server whose certificate chains to a CA in the platform bundle is reached, the same
//! server is refused when the bundle holds another CA. The bundle is fixed at the first client
//! a process builds, so each check runs in a child process of this test binary whose
//! `SSL_CERT_FILE` names the bundle (tests/fixtures/tls: two test CAs and a server certificate
//! for 127.0.0.1 issued by one of them, valid until 2126).

use std::{path::PathBuf, sync::Arc, time::Duration};

use contextos_runner::model::{Message, ModelRequest, Role, openai::OpenAiCompatible};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Set in the child: the outcome it must see (`reached` or `refused`).
const EXPECT_ENV: &str = "CONTEXTOS_TEST_HTTPS_EXPECT";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A TLS server on 127.0.0.1 answering every request with one chat completion; its URL.
async fn tls_server() -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.pem"))
        .expect("server.pem")
        .collect::<Result<_, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).expect("server.key");
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then the body its Content-Length announces (bounded: a test client).
                while request.len() < 1 << 20 {
                    let Ok(n) = tls.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let body = r#"{"choices":[{"message":{"role":"assistant","content":"ok"}}]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

fn request() -> ModelRequest {
    ModelRequest {
        model: "test".into(),
        messages: vec![Message::new(Role::User, "hi")],
        tools: Vec::new(),
        max_output_tokens: None,
    }
}

/// In the child: one completion from the TLS server, reached or refused as expected.
async fn ask(expect: &str) {
    let url = tls_server().await;
    let answer = OpenAiCompatible::new(&url, None, Duration::from_secs(5))
        .complete(&request())
        .await;
    match expect {
        "reached" => assert_eq!(
            answer
                .expect("a server the bundle's CA issued for is reached")
                .content,
            "ok"
        ),
        _ => {
            let error = format!(
                "{:#}",
                answer.expect_err("a server of a CA outside the bundle is refused")
            );
            assert!(!error.contains("\"ok\""), "{error}");
        }
    }
}

/// Runs the check in a child whose platform bundle is `bundle`.
fn in_child(test: &str, bundle: &str, expect: &str) {
    let empty = tempfile::tempdir().expect("temp dir");
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture"])
        .env(EXPECT_ENV, expect)
        .env("SSL_CERT_FILE", fixture(bundle))
        .env("SSL_CERT_DIR", empty.path())
        .output()
        .expect("run the child test");
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the child failed:\n{said}");
    assert!(said.contains("1 passed"), "the child ran the check: {said}");
}

fn child_or(test: &str, bundle: &str, expect: &str) {
    match std::env::var(EXPECT_ENV) {
        Ok(expect) => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(ask(&expect)),
        Err(_) => in_child(test, bundle, expect),
    }
}

#[test]
fn a_server_whose_ca_is_in_the_platform_bundle_is_reached() {
    child_or(
        "a_server_whose_ca_is_in_the_platform_bundle_is_reached",
        "trusted-ca.pem",
        "reached",
    );
}

#[test]
fn a_server_whose_ca_is_not_in_the_platform_bundle_is_refused() {
    child_or(
        "a_server_whose_ca_is_not_in_the_platform_bundle_is_refused",
        "other-ca.pem",
        "refused",
    );
}
