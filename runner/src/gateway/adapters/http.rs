//! HTTP/OpenAPI tools and signed webhooks over one HTTP client.
//!
//! Arguments go in the query string for GET and DELETE and as the JSON body otherwise. Every
//! request carries `Idempotency-Key` and `traceparent`; webhooks add
//! `X-ContextOS-Signature: sha256=<hex HMAC of the body>`.

use contextos_crds::agent::HttpMethod;
use hmac::{KeyInit as _, Mac as _};
use serde_json::Value;

use super::{AdapterError, AdapterResponse, CallContext};

/// Header carrying the webhook signature.
pub const SIGNATURE_HEADER: &str = "x-contextos-signature";

/// The endpoint part of a URL (`scheme://host:port`), the key of its circuit breaker.
pub fn endpoint_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// HMAC-SHA256 of `body` under `key`, as the hex the signature header carries.
pub fn sign_body(key: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

// HMAC accepts keys of any length; this only satisfies the type signature.
fn unreachable_hmac() -> hmac::Hmac<sha2::Sha256> {
    hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k").unwrap_or_else(|_| unreachable_hmac())
}

/// Sends one call. `signed` makes it a webhook (POST with an HMAC signature).
pub async fn call(
    client: &reqwest::Client,
    url: &str,
    method: HttpMethod,
    args: &Value,
    ctx: &CallContext,
    signed: bool,
) -> Result<AdapterResponse, AdapterError> {
    let endpoint = endpoint_of(url);
    let body = serde_json::to_vec(args).unwrap_or_default();
    let mut request = match (method, signed) {
        (_, true) => client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone()),
        (HttpMethod::Get, false) => client.get(url).query(&query_pairs(args)),
        (HttpMethod::Delete, false) => client.delete(url).query(&query_pairs(args)),
        (HttpMethod::Post, false) => client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone()),
        (HttpMethod::Put, false) => client
            .put(url)
            .header("content-type", "application/json")
            .body(body.clone()),
        (HttpMethod::Patch, false) => client
            .patch(url)
            .header("content-type", "application/json")
            .body(body.clone()),
    };
    request = request
        .timeout(ctx.timeout)
        .header("idempotency-key", &ctx.idempotency_key)
        .header("traceparent", &ctx.traceparent);
    if let Some(token) = &ctx.bearer_token {
        request = request.bearer_auth(token);
    }
    if signed {
        let key = ctx.hmac_key.as_deref().ok_or_else(|| {
            AdapterError::Protocol("webhook has no signing key (adapter.webhook.secretRef)".into())
        })?;
        request = request.header(SIGNATURE_HEADER, format!("sha256={}", sign_body(key, &body)));
    }
    let response = request.send().await.map_err(|e| classify(&endpoint, ctx, &e))?;
    let status = response.status().as_u16();
    let (bytes, truncated) = read_capped(response, ctx.max_response_bytes, &endpoint, ctx).await?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if !(200..300).contains(&status) {
        let excerpt: String = text.chars().take(512).collect();
        return Err(AdapterError::Status {
            status,
            body: excerpt,
        });
    }
    let body = if truncated {
        Value::String(text)
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::String(text))
    };
    Ok(AdapterResponse {
        status,
        body,
        truncated,
    })
}

/// Reads at most `cap` bytes of the body; the rest is dropped and reported as truncated.
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
    endpoint: &str,
    ctx: &CallContext,
) -> Result<(Vec<u8>, bool), AdapterError> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(endpoint, ctx, &e))? {
        let room = cap.saturating_sub(out.len());
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
}

pub(super) fn classify(endpoint: &str, ctx: &CallContext, e: &reqwest::Error) -> AdapterError {
    if e.is_timeout() {
        AdapterError::Timeout(ctx.timeout)
    } else {
        AdapterError::Unreachable {
            endpoint: endpoint_of(endpoint),
            detail: e.to_string(),
        }
    }
}

/// The body, or `None` when it is larger than `cap` (reading stops there).
pub(super) async fn read_bounded(
    response: reqwest::Response,
    cap: usize,
    endpoint: &str,
    ctx: &CallContext,
) -> Result<Option<Vec<u8>>, AdapterError> {
    crate::http::read_capped(response, cap)
        .await
        .map_err(|e| classify(endpoint, ctx, &e))
}

fn query_pairs(args: &Value) -> Vec<(String, String)> {
    match args {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_key_by_scheme_host_and_port() {
        assert_eq!(
            endpoint_of("http://tools.svc:8080/a/b?x=1"),
            "http://tools.svc:8080"
        );
        assert_eq!(
            endpoint_of("https://api.example.com/v1"),
            "https://api.example.com:443"
        );
    }

    #[test]
    fn hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign_body(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
