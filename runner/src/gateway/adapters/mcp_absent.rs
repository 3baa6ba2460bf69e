//! The MCP adapter's place in a build without it (feature `mcp` off — the operator's build,
//! which never calls a tool): the same surface, and every call refused as unsupported.

use contextos_crds::agent::McpAdapter;
use serde_json::Value;

use super::{AdapterError, AdapterResponse, CallContext, ServerTool};
use crate::gateway::capabilities::CapabilityRoute;

/// No client sessions: this build cannot speak MCP.
#[derive(Debug, Default)]
pub struct McpClients {
    _none: (),
}

/// Where a command-started (stdio) MCP server runs (see the `mcp` feature's adapter).
#[derive(Clone, Debug)]
pub enum StdioServers {
    Local { logs: Option<std::path::PathBuf> },
    Capability(CapabilityRoute),
    Refused,
}

/// The server a tool lives on, as the key of its circuit breaker.
pub fn server_of(adapter: &McpAdapter) -> String {
    match (&adapter.url, &adapter.command) {
        (Some(url), _) => url.clone(),
        (None, Some(command)) => format!("stdio:{}", crate::capability::ServerDigest::of(command)),
        (None, None) => "mcp:unconfigured".into(),
    }
}

impl McpClients {
    pub fn new(_http: reqwest::Client) -> Self {
        Self::default()
    }

    pub fn with_stdio(self, _stdio: StdioServers) -> Self {
        self
    }

    pub async fn call(
        &self,
        tool_name: &str,
        _adapter: &McpAdapter,
        _args: &Value,
        _ctx: &CallContext,
    ) -> Result<AdapterResponse, AdapterError> {
        Err(AdapterError::Unsupported(format!(
            "tool {tool_name} uses the MCP adapter, which this build of contextos does not include (feature `mcp`)"
        )))
    }

    pub async fn list_tools(&self, adapter: &McpAdapter) -> Result<Vec<ServerTool>, AdapterError> {
        Err(AdapterError::Unsupported(format!(
            "{} is an MCP server, which this build of contextos cannot reach (feature `mcp`)",
            server_of(adapter)
        )))
    }
}
