//! MCP tools via rmcp, over streamable HTTP (`adapter.mcp.url`) or stdio (`adapter.mcp.command`,
//! a server process started inside the sandbox). Connections are kept per server and dropped
//! when a call fails, so the next call reconnects. Trace context and the idempotency key travel
//! in the request's `_meta`.

use std::{collections::HashMap, sync::Arc};

use contextos_crds::agent::McpAdapter;
use rmcp::{
    RoleClient, ServiceExt as _,
    model::{CallToolRequestParams, ContentBlock, MetaObject, RequestMetaObject},
    service::RunningService,
    transport::{StreamableHttpClientTransport, TokioChildProcess},
};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::{AdapterError, AdapterResponse, CallContext};

/// `_meta` key carrying the idempotency key.
pub const IDEMPOTENCY_META: &str = "dev.contextos/idempotencyKey";

type Client = Arc<RunningService<RoleClient, ()>>;

/// Open MCP client sessions, by server.
#[derive(Default)]
pub struct McpClients {
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for McpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClients").finish_non_exhaustive()
    }
}

/// The server a tool lives on, as the key of its session.
pub fn server_of(adapter: &McpAdapter) -> String {
    match (&adapter.url, &adapter.command) {
        (Some(url), _) => url.clone(),
        (None, Some(command)) => format!("stdio:{}", command.join(" ")),
        (None, None) => "mcp:unconfigured".into(),
    }
}

impl McpClients {
    async fn client(&self, adapter: &McpAdapter) -> Result<Client, AdapterError> {
        let key = server_of(adapter);
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let unreachable = |detail: String| AdapterError::Unreachable {
            endpoint: key.clone(),
            detail,
        };
        let client = match (&adapter.url, &adapter.command) {
            (Some(url), _) => ().serve(StreamableHttpClientTransport::from_uri(url.as_str())).await,
            (None, Some(command)) => {
                let Some((program, args)) = command.split_first() else {
                    return Err(AdapterError::Protocol("adapter.mcp.command is empty".into()));
                };
                let mut cmd = tokio::process::Command::new(program);
                // A clean environment: the server gets nothing of this process's (credentials,
                // store addresses, tokens), only a search path; its stderr goes nowhere near the
                // caller's output.
                cmd.args(args)
                    .env_clear()
                    .env(
                        "PATH",
                        std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
                    )
                    .stderr(std::process::Stdio::null());
                let transport = TokioChildProcess::new(cmd)
                    .map_err(|e| unreachable(format!("cannot start {program}: {e}")))?;
                ().serve(transport).await
            }
            (None, None) => {
                return Err(AdapterError::Protocol(
                    "adapter.mcp has neither url nor command".into(),
                ));
            }
        }
        .map_err(|e| unreachable(format!("MCP initialization failed: {e}")))?;
        let client = Arc::new(client);
        clients.insert(key, client.clone());
        Ok(client)
    }

    async fn forget(&self, adapter: &McpAdapter) {
        self.clients.lock().await.remove(&server_of(adapter));
    }

    /// Calls `tool_name` (or `adapter.tool`) with `args`.
    pub async fn call(
        &self,
        tool_name: &str,
        adapter: &McpAdapter,
        args: &Value,
        ctx: &CallContext,
    ) -> Result<AdapterResponse, AdapterError> {
        let client = self.client(adapter).await?;
        let arguments = match args {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            other => {
                return Err(AdapterError::Protocol(format!(
                    "MCP arguments must be an object, got {other}"
                )));
            }
        };
        let mut meta = Map::new();
        meta.insert("traceparent".into(), Value::String(ctx.traceparent.clone()));
        meta.insert(
            IDEMPOTENCY_META.into(),
            Value::String(ctx.idempotency_key.clone()),
        );
        let mut params =
            CallToolRequestParams::new(adapter.tool.clone().unwrap_or_else(|| tool_name.to_owned()))
                .with_arguments(arguments);
        params.meta = Some(RequestMetaObject(MetaObject(meta)));
        let outcome = tokio::time::timeout(ctx.timeout, client.call_tool(params)).await;
        let result = match outcome {
            Err(_) => {
                self.forget(adapter).await;
                return Err(AdapterError::Timeout(ctx.timeout));
            }
            Ok(Err(e)) => {
                self.forget(adapter).await;
                return Err(AdapterError::Unreachable {
                    endpoint: server_of(adapter),
                    detail: e.to_string(),
                });
            }
            Ok(Ok(result)) => result,
        };
        let text: Vec<String> = result
            .content
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text(t) => Some(t.text.clone()),
                _ => None,
            })
            .collect();
        let text = text.join("\n");
        if result.is_error == Some(true) {
            return Err(AdapterError::ToolFailed(text.chars().take(512).collect()));
        }
        let body = match result.structured_content {
            Some(structured) => structured,
            None => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        };
        let encoded = body.to_string();
        if encoded.len() > ctx.max_response_bytes {
            let cut: String = encoded.chars().take(ctx.max_response_bytes).collect();
            return Ok(AdapterResponse {
                status: 200,
                body: Value::String(cut),
                truncated: true,
            });
        }
        Ok(AdapterResponse {
            status: 200,
            body,
            truncated: false,
        })
    }
}
