//! OpenAI-compatible chat completions with tool calling (OpenAI, vLLM, Ollama, llama.cpp
//! server): `POST {endpoint}/chat/completions`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Message, ModelError, ModelRequest, ModelTurn, Role, ToolCallRequest};

/// A client for one endpoint.
#[derive(Clone, Debug)]
pub struct OpenAiCompatible {
    endpoint: String,
    api_key: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
}

impl OpenAiCompatible {
    /// `endpoint` is the API base, e.g. `https://api.openai.com/v1`.
    pub fn new(endpoint: &str, api_key: Option<String>, timeout: Duration) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            api_key,
            http: crate::http::client(),
            timeout,
        }
    }

    /// Sends requests with `client` (the gateway service's, which checks destinations).
    pub fn with_client(mut self, client: reqwest::Client) -> Self {
        self.http = client;
        self
    }

    /// The request body for `request`.
    pub fn body(request: &ModelRequest) -> Value {
        let messages: Vec<Value> = request.messages.iter().map(message_json).collect();
        let mut body = json!({"model": request.model, "messages": messages});
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                .collect();
        }
        if let Some(max) = request.max_output_tokens {
            body["max_tokens"] = json!(max);
        }
        body
    }

    /// Asks for one turn.
    pub async fn complete(&self, request: &ModelRequest) -> Result<ModelTurn, ModelError> {
        let url = format!("{}/chat/completions", self.endpoint);
        let mut call = self
            .http
            .post(&url)
            .timeout(self.timeout)
            .json(&Self::body(request));
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        if let Some(parent) = crate::telemetry::current_traceparent() {
            call = call.header("traceparent", parent);
        }
        let response = call.send().await.map_err(|e| {
            // Not connected: the request never reached the endpoint. Otherwise it may have been
            // sent and worked on (a timeout while the model generates): it may cost.
            if e.is_connect() || e.is_builder() {
                ModelError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    detail: e.to_string(),
                }
            } else {
                ModelError::Interrupted {
                    endpoint: self.endpoint.clone(),
                    detail: e.to_string(),
                }
            }
        })?;
        let status = response.status().as_u16();
        let text = self.read_bounded(response).await?;
        if !(200..300).contains(&status) {
            return Err(ModelError::Status {
                endpoint: self.endpoint.clone(),
                status,
                body: text.chars().take(512).collect(),
            });
        }
        parse_turn(&text).map_err(|detail| ModelError::Malformed {
            endpoint: self.endpoint.clone(),
            detail,
        })
    }
}

impl OpenAiCompatible {
    /// The body, read up to [`MAX_RESPONSE_BYTES`]: an endpoint that sends more is refused
    /// before the excess is held in memory.
    async fn read_bounded(&self, response: reqwest::Response) -> Result<String, ModelError> {
        let body = crate::http::read_capped(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| ModelError::Interrupted {
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            })?
            .ok_or_else(|| ModelError::Malformed {
                endpoint: self.endpoint.clone(),
                detail: format!("the answer is longer than {MAX_RESPONSE_BYTES} bytes"),
            })?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The longest chat completion accepted, in bytes (far above any model's output limit).
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

fn message_json(m: &Message) -> Value {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut out = json!({"role": role, "content": m.content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.tool, "arguments": c.arguments.to_string()}}))
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    out
}

/// Parses a chat-completions response body.
pub fn parse_turn(text: &str) -> Result<ModelTurn, String> {
    let body: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let message = body
        .pointer("/choices/0/message")
        .ok_or("no choices[0].message")?;
    let content = message
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut tool_calls = Vec::new();
    for (i, call) in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or(format!("tool_calls[{i}] has no function.name"))?;
        let raw = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        // Models sometimes send arguments that are not JSON; keep them as a string so the
        // gateway's schema check refuses them with a clear message instead of failing here.
        let arguments = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("call-{i}"), str::to_owned);
        tool_calls.push(ToolCallRequest {
            id,
            tool: name.to_owned(),
            arguments,
        });
    }
    let usage = |key: &str| {
        body.pointer(&format!("/usage/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(ModelTurn {
        content,
        tool_calls,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
        cached_prompt_tokens: usage("prompt_tokens_details/cached_tokens"),
        dropped_tool_calls: 0,
        route: None,
    })
}
