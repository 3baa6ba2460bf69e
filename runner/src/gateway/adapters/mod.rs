//! Adapters: how the gateway reaches a tool. Each returns a typed result; none panics on a
//! misbehaving server.

pub mod http;
#[cfg(feature = "mcp")]
pub mod mcp;
#[cfg(not(feature = "mcp"))]
#[path = "mcp_absent.rs"]
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

/// A tool as an MCP server describes it (`tools/list`): what `contextos audit --mcp` compares
/// with what Agents declare and `contextos tools import` turns into declarations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerTool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    pub hints: ToolHints,
}

/// The server's annotations of a tool. Hints, not guarantees; absent means the server did not say
/// (MCP's defaults then apply: not read-only, destructive, not idempotent, open world).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToolHints {
    pub read_only: Option<bool>,
    pub destructive: Option<bool>,
    pub idempotent: Option<bool>,
    pub open_world: Option<bool>,
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

/// The first tool whose adapter this release cannot run (A2A), as a message naming the field
/// and what to do instead. Refused where an Agent is admitted to run, never at call time.
pub fn unavailable_adapter(tools: &[contextos_crds::agent::Tool]) -> Option<String> {
    tools.iter().enumerate().find_map(|(i, tool)| {
        tool.adapter.a2a.as_ref().map(|_| {
            format!(
                "spec.tools[{i}].adapter.a2a ({}): the A2A adapter is not available in this release; reach the remote agent through an HTTP or MCP endpoint instead",
                tool.name
            )
        })
    })
}

impl AdapterError {
    /// Whether the call may have reached the tool: everything but a refusal before anything was
    /// sent (the circuit open, the destination refused, an adapter not run here). A paid call
    /// is charged when it may have been.
    pub fn may_have_been_sent(&self) -> bool {
        !matches!(
            self,
            Self::CircuitOpen(_) | Self::Unsupported(_) | Self::Refused(_)
        )
    }

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

#[cfg(test)]
mod tests {
    use super::unavailable_adapter;

    #[test]
    fn an_a2a_tool_is_refused_naming_its_field() {
        let tools: Vec<contextos_crds::agent::Tool> = serde_json::from_value(serde_json::json!([
            {"name": "search", "description": "d", "risk": "read_only", "kind": "observe",
             "adapter": {"http": {"url": "http://tools/search"}}},
            {"name": "ask_billing", "description": "d", "risk": "delegated", "kind": "act",
             "adapter": {"a2a": {"url": "http://billing-agent", "skill": "refund"}}},
        ]))
        .expect("tools");
        let problem = unavailable_adapter(&tools).expect("refused");
        assert!(
            problem.starts_with("spec.tools[1].adapter.a2a (ask_billing)"),
            "{problem}"
        );
        assert_eq!(unavailable_adapter(&tools[..1]), None);
    }
}
