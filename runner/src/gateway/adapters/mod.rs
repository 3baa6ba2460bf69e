//! Adapters: how the gateway reaches a tool. Each returns a typed result; none panics on a
//! misbehaving server.

pub mod http;
pub mod mcp;

use std::time::Duration;

use serde_json::Value;

/// Headers and limits every adapter call carries.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub idempotency_key: String,
    pub traceparent: String,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// Secret values resolved for this tool (bearer token, HMAC key).
    pub bearer_token: Option<String>,
    pub hmac_key: Option<Vec<u8>>,
}

/// A tool's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterResponse {
    pub status: u16,
    /// Parsed JSON, or the text as a JSON string when the body is not JSON.
    pub body: Value,
    /// The body exceeded the response cap and was cut.
    pub truncated: bool,
}

/// Why an adapter call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("the tool answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("circuit open for {0}: too many recent failures; the next probe is allowed after the cooldown")]
    CircuitOpen(String),
    #[error("the tool reported an error: {0}")]
    ToolFailed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("this adapter is not available here: {0}")]
    Unsupported(String),
    #[error("destination refused: {0}")]
    Refused(String),
}

impl AdapterError {
    /// Whether trying again may help (network trouble, overload, server errors).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::CircuitOpen(_)
            | Self::ToolFailed(_)
            | Self::Protocol(_)
            | Self::Unsupported(_)
            | Self::Refused(_) => false,
        }
    }
}
