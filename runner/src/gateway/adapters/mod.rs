//! Adapters: how the gateway reaches a tool. Each returns a typed result; none panics on a
//! misbehaving server.

pub mod a2a;
pub mod http;
#[cfg(feature = "mcp")]
pub mod mcp;
#[cfg(not(feature = "mcp"))]
#[path = "mcp_absent.rs"]
pub mod mcp;
pub mod openapi;

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
    /// Who the call is made for, as a remote agent (A2A) is told.
    pub delegation: Option<Delegation>,
}

/// Who a call is made for: the tenant, the agent and its run, and the person who delegated
/// to it, if any (from the verified RunContext, never from the call's arguments).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Delegation {
    pub tenant: String,
    pub agent: String,
    pub run: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What a tool answered: its result, or (a remote agent, over A2A) a question for a person
/// before its task can go on.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Done(AdapterResponse),
    Asks(a2a::RemoteQuestion),
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
    /// The call does not fit what the tool's OpenAPI document says (nothing was sent).
    #[error("the call does not fit its OpenAPI document: {0}")]
    Mismatch(String),
    /// The tool's OpenAPI document could not be read (nothing was sent to the API).
    #[error("the tool's OpenAPI document cannot be read: {detail}")]
    DocumentUnavailable { detail: String, retryable: bool },
    /// The call was stopped while it ran: the run's Session ended (see
    /// `gateway::session_watch`). Never retried.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// The first tool whose adapter is declared so that it cannot be run as governed, as a
/// message naming the field and the fix: an A2A tool whose remote agent may do more than the
/// tool's own risk says (policies judge a call by its tool's risk). Refused where an Agent is
/// admitted to run, never at call time.
pub fn adapter_problem(tools: &[contextos_crds::agent::Tool]) -> Option<String> {
    tools
        .iter()
        .enumerate()
        .find_map(|(i, tool)| a2a_problem(i, tool).or_else(|| query_problem(i, tool)))
}

/// An HTTP tool sent with GET or DELETE carries its arguments as query parameters, one per
/// field of an object: arguments of another type would be sent as nothing at all.
fn query_problem(i: usize, tool: &contextos_crds::agent::Tool) -> Option<String> {
    use contextos_crds::agent::HttpMethod;
    let http = tool.adapter.http.as_ref()?;
    let declared = tool.input_schema.as_ref()?.get("type")?;
    let in_query = matches!(http.method, HttpMethod::Get | HttpMethod::Delete);
    let object = declared == "object"
        || declared
            .as_array()
            .is_some_and(|types| types.iter().any(|t| t == "object"));
    (in_query && !object).then(|| {
        format!(
            "spec.tools[{i}].inputSchema ({}): a {} call sends its arguments as query parameters, \
             one per field of an object, but the schema's type is {declared}; make it an object \
             (`type: object` with properties) or use POST",
            tool.name,
            if http.method == HttpMethod::Get {
                "GET"
            } else {
                "DELETE"
            },
        )
    })
}

/// A remote agent allowed to act above its tool's own risk would be judged by the lower one.
fn a2a_problem(i: usize, tool: &contextos_crds::agent::Tool) -> Option<String> {
    let a2a = tool.adapter.a2a.as_ref()?;
    (a2a.risk_ceiling > tool.risk).then(|| {
        format!(
            "spec.tools[{i}].adapter.a2a.riskCeiling ({}): the remote agent may act up to risk {}, above the tool's own risk {}; policies judge a call by its tool's risk, so raise spec.tools[{i}].risk to at least {}",
            tool.name,
            a2a.risk_ceiling.as_str(),
            tool.risk.as_str(),
            a2a.risk_ceiling.as_str()
        )
    })
}

impl AdapterError {
    /// Whether the call may have reached the tool: everything but a refusal before anything was
    /// sent (the circuit open, the destination refused, an adapter not run here). A paid call
    /// is charged when it may have been.
    pub fn may_have_been_sent(&self) -> bool {
        !matches!(
            self,
            Self::CircuitOpen(_)
                | Self::Unsupported(_)
                | Self::Refused(_)
                | Self::Mismatch(_)
                | Self::DocumentUnavailable { .. }
        )
    }

    /// Whether trying again may help (network trouble, overload, server errors).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Unreachable { .. } => true,
            Self::DocumentUnavailable { retryable, .. } => *retryable,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::CircuitOpen(_)
            | Self::ToolFailed(_)
            | Self::Protocol(_)
            | Self::Unsupported(_)
            | Self::Refused(_)
            | Self::Mismatch(_)
            | Self::Stopped(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::adapter_problem;

    #[test]
    fn an_a2a_tool_below_its_remote_ceiling_is_refused_naming_its_field() {
        let tools: Vec<contextos_crds::agent::Tool> = serde_json::from_value(serde_json::json!([
            {"name": "search", "description": "d", "risk": "read_only", "kind": "observe",
             "adapter": {"http": {"url": "http://tools/search"}}},
            {"name": "ask_billing", "description": "d", "risk": "network", "kind": "act",
             "adapter": {"a2a": {"url": "http://billing-agent", "skill": "refund", "riskCeiling": "delegated"}}},
            {"name": "ask_search", "description": "d", "risk": "delegated", "kind": "act",
             "adapter": {"a2a": {"url": "http://search-agent", "riskCeiling": "delegated"}}},
        ]))
        .expect("tools");
        let problem = adapter_problem(&tools).expect("refused");
        assert!(
            problem.starts_with("spec.tools[1].adapter.a2a.riskCeiling (ask_billing)"),
            "{problem}"
        );
        assert!(problem.contains("at least delegated"), "{problem}");
        assert_eq!(adapter_problem(&[tools[0].clone(), tools[2].clone()]), None);
    }

    #[test]
    fn a_get_or_delete_tool_takes_its_arguments_as_an_object() {
        let tool = |method: &str, schema: serde_json::Value| -> contextos_crds::agent::Tool {
            serde_json::from_value(serde_json::json!(
                {"name": "lookup", "description": "d", "risk": "read_only", "kind": "observe",
                 "adapter": {"http": {"url": "http://tools/lookup", "method": method}},
                 "inputSchema": schema}
            ))
            .expect("tool")
        };
        let array = serde_json::json!({"type": "array", "items": {"type": "string"}});
        let object = serde_json::json!({"type": "object", "properties": {"id": {"type": "string"}}});
        let problem = adapter_problem(&[tool("GET", array.clone())]).expect("refused");
        assert!(
            problem.starts_with("spec.tools[0].inputSchema (lookup): a GET call"),
            "{problem}"
        );
        assert!(adapter_problem(&[tool("DELETE", serde_json::json!({"type": "string"}))]).is_some());
        assert_eq!(adapter_problem(&[tool("GET", object)]), None);
        assert_eq!(adapter_problem(&[tool("POST", array)]), None, "sent as the body");
    }
}
