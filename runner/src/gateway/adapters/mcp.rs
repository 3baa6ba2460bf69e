//! MCP tools via rmcp, over streamable HTTP (`adapter.mcp.url`) or stdio (`adapter.mcp.command`).
//! A command-started server is started here, with a clean environment, only in a local run; the
//! gateway service reaches it in the Session's capability pod instead ([`StdioServers`]). Connections are kept per server (and response
//! cap) and dropped when a call fails, so the next call reconnects. Trace context and the
//! idempotency key travel in the request's `_meta`.
//!
//! A server is not trusted to be brief: every message it sends is bounded in bytes while it is
//! read (HTTP bodies and SSE events by the transport, stdio lines by the line reader), HTTP goes
//! through the gateway's egress-guarded client (no redirects, no denied addresses), and the
//! result is cut to the tool's `maxResponseBytes`.

use std::{collections::HashMap, sync::Arc};

use contextos_crds::agent::McpAdapter;
use rmcp::{
    RoleClient, ServiceExt as _,
    model::{CallToolRequestParams, ContentBlock, MetaObject, RequestMetaObject},
    service::RunningService,
    transport::{
        StreamableHttpClientTransport, async_rw::AsyncRwTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::{AdapterError, AdapterResponse, CallContext, ServerTool, ToolHints};
use crate::gateway::capabilities::CapabilityRoute;

mod ending;

/// Bound of one page of a tool listing (the transport allows [`message_limit`] of it).
pub const LISTING_CAP: usize = 1024 * 1024;
/// A server is not trusted to stop paginating: at most this many tools, bytes (all pages, as
/// JSON), pages and seconds.
pub const MAX_LISTED_TOOLS: usize = 1_000;
const MAX_LISTING_BYTES: usize = 16 * 1024 * 1024;
const MAX_LISTING_PAGES: usize = 100;
const LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Every page of `tools/list`, within [`MAX_LISTED_TOOLS`] and [`MAX_LISTING_PAGES`].
async fn list_pages(client: &Client) -> Result<Vec<rmcp::model::Tool>, String> {
    let mut tools = Vec::new();
    let mut bytes = 0usize;
    let mut cursor = None;
    for _ in 0..MAX_LISTING_PAGES {
        let params = rmcp::model::PaginatedRequestParams::default().with_cursor(cursor);
        let page = client
            .list_tools(Some(params))
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        bytes += page
            .tools
            .iter()
            .map(|t| serde_json::to_vec(t).map_or(0, |v| v.len()))
            .sum::<usize>();
        tools.extend(page.tools);
        if tools.len() > MAX_LISTED_TOOLS {
            return Err(format!("the server lists more than {MAX_LISTED_TOOLS} tools"));
        }
        if bytes > MAX_LISTING_BYTES {
            return Err(format!(
                "the server's tool list is larger than {MAX_LISTING_BYTES} bytes"
            ));
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(tools),
        }
    }
    Err(format!(
        "the server's tool list did not end within {MAX_LISTING_PAGES} pages"
    ))
}

/// `_meta` key carrying the idempotency key.
pub const IDEMPOTENCY_META: &str = "dev.contextos/idempotencyKey";

/// An open session, shared by the calls using it.
type Client = Arc<Session>;

/// Open MCP client sessions, by server and response cap.
pub struct McpClients {
    clients: Mutex<HashMap<String, Client>>,
    /// Where HTTP servers are reached through (the gateway's egress-guarded client).
    http: reqwest::Client,
    /// Where command-started servers run.
    stdio: StdioServers,
}

/// Where a command-started (stdio) MCP server runs.
#[derive(Clone, Debug)]
pub enum StdioServers {
    /// Here, as a child process with a clean environment (`contextos run` on a workstation);
    /// each server's stderr is appended to `<logs>/mcp-<server digest>.log` (or dropped without
    /// a directory), never mixed into the caller's output.
    Local { logs: Option<std::path::PathBuf> },
    /// In the run's capability pods (the gateway service).
    Capability(CapabilityRoute),
    /// Nowhere: this process holds other runs' credentials and has no capability pods.
    Refused,
}

/// A client session, and what it lives on: the stdio server process it talks to or the guard
/// that ends its HTTP requests (see [`ending`]) — killed or dropped once the session is
/// forgotten and the last call using it is done with it.
struct Session {
    service: RunningService<RoleClient, ()>,
    _process: Option<tokio::process::Child>,
    _requests: Option<ending::Session>,
}

impl std::ops::Deref for Session {
    type Target = RunningService<RoleClient, ()>;

    fn deref(&self) -> &Self::Target {
        &self.service
    }
}

impl Default for McpClients {
    /// A local run's clients: HTTP servers through a plain client, stdio servers started here.
    fn default() -> Self {
        Self::new(crate::http::client()).with_stdio(StdioServers::Local { logs: None })
    }
}

impl std::fmt::Debug for McpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClients").finish_non_exhaustive()
    }
}

/// Starts an MCP client session in a task of its own. rmcp runs each session in a task that
/// keeps the span it was started in (`Span::current()`) for as long as the session lives — kept
/// open for many calls here — and a call's span held that long would never end, nor be exported
/// (its children would hang under a parent the trace never gets).
async fn serve_detached<T, E, A>(transport: T) -> Result<RunningService<RoleClient, ()>, String>
where
    T: rmcp::transport::IntoTransport<RoleClient, E, A> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    A: Send + 'static,
{
    /// Ends the task when its caller stops waiting (a call's timeout): a server that takes
    /// the greeting and never answers would otherwise hold the task and its connection for
    /// ever, one more with every call.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = tokio::spawn(async move { ().serve(transport).await.map_err(|e| e.to_string()) });
    let _abort = AbortOnDrop(task.abort_handle());
    task.await.map_err(|e| format!("the session's task ended: {e}"))?
}

/// The server a tool lives on, as the key of its session.
pub fn server_of(adapter: &McpAdapter) -> String {
    match (&adapter.url, &adapter.command) {
        (Some(url), _) => url.clone(),
        (None, Some(command)) => format!("stdio:{}", crate::capability::ServerDigest::of(command)),
        (None, None) => "mcp:unconfigured".into(),
    }
}

/// The most bytes one message from a server may have for a tool capped at `cap`: JSON-RPC
/// framing, escaping, and the text and structured copies of one result.
pub fn message_limit(cap: usize) -> usize {
    cap.saturating_mul(4).saturating_add(64 * 1024)
}

/// The log a command-started server's stderr is appended to: never one reached through a link
/// or shared by a hard link (a data directory can come with a checkout, and the log's name is
/// known in advance), checked on what was opened.
fn open_log(dir: &std::path::Path, path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::MetadataExt as _;
    let refused = |why: &str| {
        format!(
            "{} {why}; the server's stderr is not written there (remove it)",
            path.display()
        )
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refused("is a symbolic link"));
    }
    let file = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(path))
        .map_err(|e| format!("cannot open {} for the server's stderr: {e}", path.display()))?;
    let opened = file.metadata().map_err(|e| e.to_string())?;
    let named = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !opened.is_file() || opened.nlink() != 1 || (opened.dev(), opened.ino()) != (named.dev(), named.ino())
    {
        return Err(refused("is not a file of its own"));
    }
    Ok(file)
}

/// Starts `command` as a child process with a clean environment: the server gets nothing of
/// this process's (credentials, store addresses, tokens), only a search path; its stderr goes to
/// its own log in `logs`, nowhere near the caller's output.
fn spawn_local(
    command: &[String],
    limit: usize,
    logs: Option<&std::path::Path>,
) -> Result<
    (
        tokio::process::Child,
        AsyncRwTransport<RoleClient, tokio::process::ChildStdout, tokio::process::ChildStdin>,
    ),
    String,
> {
    let Some((program, args)) = command.split_first() else {
        return Err("adapter.mcp.command is empty".into());
    };
    let stderr = match logs {
        None => std::process::Stdio::null(),
        Some(dir) => {
            let path = dir.join(format!(
                "mcp-{}.log",
                crate::capability::ServerDigest::of(command)
            ));
            open_log(dir, &path)?.into()
        }
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err(format!("{program} has no stdio pipes"));
    };
    let transport = AsyncRwTransport::<RoleClient, _, _>::new(stdout, stdin).with_max_line_length(limit);
    Ok((child, transport))
}

impl McpClients {
    /// Sessions whose HTTP requests go through `http`; no stdio server is started (see
    /// [`McpClients::with_stdio`]).
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            clients: Mutex::default(),
            http,
            stdio: StdioServers::Refused,
        }
    }

    /// Runs command-started servers as `stdio` says.
    pub fn with_stdio(mut self, stdio: StdioServers) -> Self {
        self.stdio = stdio;
        self
    }

    /// The session for `adapter`'s server: the open one, or a new one. Connecting happens
    /// without holding the map, so one slow server holds up no other.
    async fn client(&self, adapter: &McpAdapter, cap: usize) -> Result<Client, AdapterError> {
        let key = format!("{}#{cap}", server_of(adapter));
        if let Some(session) = self.clients.lock().await.get(&key) {
            return Ok(session.clone());
        }
        let session = self.connect(adapter, cap).await?;
        let mut clients = self.clients.lock().await;
        // A concurrent call may have connected meanwhile: keep its session, drop this one.
        Ok(clients.entry(key).or_insert(session).clone())
    }

    async fn connect(&self, adapter: &McpAdapter, cap: usize) -> Result<Client, AdapterError> {
        let unreachable = |detail: String| AdapterError::Unreachable {
            endpoint: server_of(adapter),
            detail,
        };
        let limit = message_limit(cap);
        let mut requests = None;
        let (client, process) = match (&adapter.url, &adapter.command) {
            (Some(url), _) => {
                let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                    .max_json_response_size(limit)
                    .max_sse_event_size(limit)
                    .max_error_response_size(64 * 1024);
                // Held here while connecting: a call that gives up on the greeting ends it.
                let (http, guard) = ending::client(self.http.clone());
                requests = Some(guard);
                let transport = StreamableHttpClientTransport::with_client(http, config);
                (serve_detached(transport).await, None)
            }
            (None, Some(command)) => match &self.stdio {
                StdioServers::Local { logs } => {
                    let (child, transport) =
                        spawn_local(command, limit, logs.as_deref()).map_err(unreachable)?;
                    (serve_detached(transport).await, Some(child))
                }
                StdioServers::Capability(route) => {
                    let (read, write) = route.connect(command).await.map_err(unreachable)?;
                    let transport =
                        AsyncRwTransport::<RoleClient, _, _>::new(read, write).with_max_line_length(limit);
                    (serve_detached(transport).await, None)
                }
                StdioServers::Refused => {
                    return Err(unreachable(
                        "this gateway starts no code an Agent names and has no capability pods to send it to"
                            .into(),
                    ));
                }
            },
            (None, None) => {
                return Err(AdapterError::Protocol(
                    "adapter.mcp has neither url nor command".into(),
                ));
            }
        };
        let service = client.map_err(|e| unreachable(format!("MCP initialization failed: {e}")))?;
        Ok(Arc::new(Session {
            service,
            _process: process,
            _requests: requests,
        }))
    }

    /// Forgets the open session of `adapter`'s server — only `failed`, when given: a session
    /// another call opened since is not the one that failed. Calls still using it go on.
    async fn forget(&self, adapter: &McpAdapter, cap: usize, failed: Option<&Client>) {
        let key = format!("{}#{cap}", server_of(adapter));
        let mut clients = self.clients.lock().await;
        if failed.is_none_or(|failed| clients.get(&key).is_some_and(|open| Arc::ptr_eq(open, failed))) {
            clients.remove(&key);
        }
    }

    /// Every tool the server of `adapter` lists (`tools/list`, all pages), for audits and imports;
    /// each message is bounded like a call's response ([`LISTING_CAP`]).
    pub async fn list_tools(&self, adapter: &McpAdapter) -> Result<Vec<ServerTool>, AdapterError> {
        // One deadline for starting or reaching the server, initializing, and every page.
        let unreachable = |detail: String| AdapterError::Unreachable {
            endpoint: server_of(adapter),
            detail,
        };
        let listing = async {
            let client = self.client(adapter, LISTING_CAP).await?;
            list_pages(&client).await.map_err(unreachable)
        };
        let listed = tokio::time::timeout(LISTING_TIMEOUT, listing)
            .await
            .unwrap_or_else(|_| {
                Err(unreachable(format!(
                    "no complete tool list within {LISTING_TIMEOUT:?}"
                )))
            });
        if listed.is_err() {
            self.forget(adapter, LISTING_CAP, None).await;
        }
        Ok(listed?
            .into_iter()
            .map(|tool| {
                let hints = tool.annotations.as_ref();
                ServerTool {
                    name: tool.name.into_owned(),
                    description: tool.description.map(|d| d.into_owned()).unwrap_or_default(),
                    input_schema: Value::Object((*tool.input_schema).clone()),
                    hints: ToolHints {
                        read_only: hints.and_then(|h| h.read_only_hint),
                        destructive: hints.and_then(|h| h.destructive_hint),
                        idempotent: hints.and_then(|h| h.idempotent_hint),
                        open_world: hints.and_then(|h| h.open_world_hint),
                    },
                }
            })
            .collect())
    }

    /// Calls `tool_name` (or `adapter.tool`) with `args`.
    pub async fn call(
        &self,
        tool_name: &str,
        adapter: &McpAdapter,
        args: &Value,
        ctx: &CallContext,
    ) -> Result<AdapterResponse, AdapterError> {
        let cap = ctx.max_response_bytes;
        // Connecting (finding a capability pod, MCP's initialization) counts against the call's
        // timeout: a server that greets and then says nothing holds up nothing for long.
        let client = tokio::time::timeout(ctx.timeout, self.client(adapter, cap))
            .await
            .map_err(|_| AdapterError::Timeout(ctx.timeout))??;
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
                self.forget(adapter, cap, Some(&client)).await;
                return Err(AdapterError::Timeout(ctx.timeout));
            }
            Ok(Err(e)) => {
                self.forget(adapter, cap, Some(&client)).await;
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
        if encoded.len() > cap {
            return Ok(AdapterResponse {
                status: 200,
                body: Value::String(cut_to_bytes(&encoded, cap).to_owned()),
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

/// The longest prefix of `text` of at most `cap` bytes that ends on a character boundary.
fn cut_to_bytes(text: &str, cap: usize) -> &str {
    let mut end = cap.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_cut_counts_bytes_and_never_splits_a_character() {
        assert_eq!(cut_to_bytes("abcdef", 4), "abcd");
        // "é" is two bytes: a cap in its middle keeps the text before it.
        assert_eq!(cut_to_bytes("aéb", 2), "a");
        assert_eq!(cut_to_bytes("aéb", 3), "aé");
        assert_eq!(cut_to_bytes("ab", 10), "ab");
    }

    /// An MCP server whose one tool, `sleep`, answers after `ms` milliseconds.
    #[derive(Clone)]
    struct Sleeper;

    impl rmcp::ServerHandler for Sleeper {
        fn get_info(&self) -> rmcp::model::ServerConfig {
            rmcp::model::ServerConfig::new(rmcp::model::ServerCapabilities::builder().enable_tools().build())
        }

        async fn call_tool(
            &self,
            request: CallToolRequestParams,
            _: rmcp::service::RequestContext<rmcp::RoleServer>,
        ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
            let ms = request
                .arguments
                .as_ref()
                .and_then(|a| a.get("ms"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(
                rmcp::model::CallToolResult::success(vec![ContentBlock::text(format!(
                    "{{\"slept\": {ms}}}"
                ))])
                .into(),
            )
        }
    }

    fn call_context(timeout_ms: u64) -> CallContext {
        CallContext {
            idempotency_key: "key-1".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            timeout: Duration::from_millis(timeout_ms),
            max_response_bytes: 1 << 20,
            bearer_token: None,
            hmac_key: None,
            delegation: None,
        }
    }

    /// A call that times out forgets its server's session; a call still using that session
    /// goes on to its answer, not cut off with it.
    #[tokio::test]
    async fn a_call_that_times_out_leaves_the_others_on_its_session_to_finish() {
        use rmcp::transport::streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        };
        let service = StreamableHttpService::new(
            || Ok(Sleeper),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let adapter = McpAdapter {
            url: Some(format!("http://{}/mcp", listener.local_addr().expect("address"))),
            command: None,
            tool: Some("sleep".into()),
            max_response_bytes: 1 << 20,
        };
        tokio::spawn(async move {
            axum::serve(listener, axum::Router::new().nest_service("/mcp", service)).await
        });
        let clients = McpClients::new(crate::http::client());
        let sleep = |ms: u64| serde_json::json!({ "ms": ms });
        clients
            .call("sleep", &adapter, &sleep(0), &call_context(10_000))
            .await
            .expect("the session opened");
        let (long_args, long_context) = (sleep(1_500), call_context(10_000));
        let long = clients.call("sleep", &adapter, &long_args, &long_context);
        let short = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            clients
                .call("sleep", &adapter, &sleep(5_000), &call_context(300))
                .await
        };
        let (long, short) = tokio::join!(long, short);
        assert!(matches!(short, Err(AdapterError::Timeout(_))), "{short:?}");
        let long = long.expect("the other call on the session answered");
        assert_eq!(long.body["slept"], 1_500, "{long:?}");
    }

    /// A server that takes MCP's greeting and never answers: the call ends at its timeout, and
    /// so does the connection it opened (nothing is left waiting on it).
    #[tokio::test]
    async fn a_server_that_never_greets_back_keeps_no_connection() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let adapter = McpAdapter {
            url: Some(format!("http://{}/mcp", listener.local_addr().expect("address"))),
            command: None,
            tool: None,
            max_response_bytes: 1 << 20,
        };
        let server = tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.expect("accept");
            let mut buffer = vec![0; 64 * 1024];
            // Reads the greeting and then waits, answering nothing, until the client hangs up.
            while connection.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        let ctx = CallContext {
            idempotency_key: "key-1".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            timeout: Duration::from_millis(300),
            max_response_bytes: 1 << 20,
            bearer_token: None,
            hmac_key: None,
            delegation: None,
        };
        let clients = McpClients::new(crate::http::client());
        let called = clients
            .call("status", &adapter, &Value::Object(Map::new()), &ctx)
            .await;
        assert!(matches!(called, Err(AdapterError::Timeout(_))), "{called:?}");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the connection to a server that never answered is still open")
            .expect("server");
    }
}
