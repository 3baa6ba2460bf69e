//! An MCP tool server for the adapter tests: `service_status` (read) and `restart` (an effect,
//! performed once per idempotency key from `_meta`). Served over streamable HTTP by the tests
//! and over stdio by `examples/mcp_stdio_server.rs`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};
use serde_json::{Value, json};

/// What the server saw.
#[derive(Debug, Default)]
pub struct McpSeen {
    pub effects: u32,
    pub calls: u32,
    pub traceparents: Vec<String>,
    pub by_key: HashMap<String, Value>,
}

#[derive(Clone, Debug, Default)]
pub struct OpsTools {
    pub seen: Arc<Mutex<McpSeen>>,
}

fn schema(value: Value) -> Arc<serde_json::Map<String, Value>> {
    Arc::new(value.as_object().cloned().unwrap_or_default())
}

impl ServerHandler for OpsTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let object = json!({"type": "object"});
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("service_status", "Status of a service", schema(object.clone())),
            Tool::new("restart", "Restart a deployment", schema(object)),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let meta = request.meta.map(|m| m.0.0).unwrap_or_default();
        let meta = if meta.is_empty() {
            context.meta.0.0.clone()
        } else {
            meta
        };
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| ErrorData::internal_error("poisoned", None))?;
        seen.calls += 1;
        if let Some(tp) = meta.get("traceparent").and_then(Value::as_str) {
            seen.traceparents.push(tp.to_owned());
        }
        let args = Value::Object(request.arguments.unwrap_or_default());
        let answer = match request.name.as_ref() {
            "service_status" => {
                json!({"service": args["service"], "errorRate": 0.12, "lastDeploy": "14:02", "traceparents": seen.traceparents.len()})
            }
            "restart" => {
                let key = meta
                    .get("dev.contextos/idempotencyKey")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if let Some(previous) = seen.by_key.get(&key) {
                    previous.clone()
                } else {
                    seen.effects += 1;
                    let answer = json!({"restarted": args["deployment"], "effect": seen.effects});
                    seen.by_key.insert(key, answer.clone());
                    answer
                }
            }
            // What a hostile capability would look for: the names of its environment variables.
            "environment" => {
                let mut names: Vec<String> = std::env::vars_os()
                    .map(|(k, _)| k.to_string_lossy().into_owned())
                    .collect();
                names.sort();
                json!({"variables": names})
            }
            // A hostile server: as many bytes as asked for.
            "flood" => {
                let bytes = args["bytes"].as_u64().unwrap_or(0) as usize;
                return Ok(CallToolResult::success(vec![ContentBlock::text("x".repeat(bytes))]).into());
            }
            "fail" => {
                let mut result = CallToolResult::success(vec![ContentBlock::text("deployment not found")]);
                result.is_error = Some(true);
                return Ok(result.into());
            }
            other => return Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(answer.to_string())]).into())
    }
}
