//! Live tool servers, for `contextos audit --mcp` and `contextos tools import`: what an MCP
//! server lists (read over streamable HTTP, or from a command started here with a clean
//! environment), and the tool declaration each listed tool implies — risk, kind and idempotency
//! inferred from the server's annotations, with the inference the server did not back up marked
//! for review.

use contextos_crds::{
    agent::{DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT_SECONDS, McpAdapter, Tool, ToolAdapter},
    common::{ToolKind, ToolRisk},
};

use crate::gateway::adapters::{AdapterError, ServerTool, mcp::McpClients};

/// One server and the tools it lists.
#[derive(Clone, Debug)]
pub struct ServerListing {
    /// The adapter the server is reached by (as Agents declare it: `url` or `command`).
    pub adapter: McpAdapter,
    pub tools: Vec<ServerTool>,
}

impl ServerListing {
    /// The URL, or the command as one line.
    pub fn server(&self) -> String {
        match (&self.adapter.url, &self.adapter.command) {
            (Some(url), _) => url.clone(),
            (None, Some(command)) => command.join(" "),
            (None, None) => String::new(),
        }
    }

    /// Whether a tool's adapter reaches this server: the same URL (scheme and host in any case,
    /// a default port or not, with or without a trailing `/`), or the same command.
    pub fn serves(&self, adapter: &McpAdapter) -> bool {
        match (&self.adapter.url, &self.adapter.command) {
            (Some(url), _) => adapter.url.as_deref().is_some_and(|u| same_url(u, url)),
            (None, Some(command)) => adapter.command.as_ref() == Some(command),
            (None, None) => false,
        }
    }
}

fn same_url(a: &str, b: &str) -> bool {
    let normal = |u: &str| {
        url::Url::parse(u).map_or_else(
            |_| u.trim_end_matches('/').to_owned(),
            |parsed| parsed.as_str().trim_end_matches('/').to_owned(),
        )
    };
    normal(a) == normal(b)
}

/// The server's listing. A command-started server runs here, as a child process with a clean
/// environment, for as long as the listing takes.
pub async fn introspect(adapter: McpAdapter) -> Result<ServerListing, AdapterError> {
    let tools = McpClients::default().list_tools(&adapter).await?;
    Ok(ServerListing { adapter, tools })
}

/// A tool declaration for a listed tool, and what a reviewer should check in it.
#[derive(Clone, Debug)]
pub struct Imported {
    pub tool: Tool,
    /// What was inferred without the server saying so, one line each.
    pub review: Vec<String>,
}

/// The declaration `listed` implies, on the server `adapter` reaches:
/// - `readOnlyHint: true` → risk read_only, kind observe;
/// - otherwise `destructiveHint` (MCP's default: true) → destructive, act;
/// - otherwise `openWorldHint` (default: true) → network, act; a closed world → local_write;
/// - `idempotentHint` → idempotent.
///
/// Where the server gives no hint, MCP's defaults are the cautious ones, and the line says so.
pub fn infer(listed: &ServerTool, adapter: &McpAdapter) -> Imported {
    let hints = listed.hints;
    let mut review = Vec::new();
    let (risk, kind) = if hints.read_only == Some(true) {
        (ToolRisk::ReadOnly, ToolKind::Observe)
    } else {
        if hints.read_only.is_none() {
            review.push(
                "the server does not say whether it is read-only (readOnlyHint): declared as acting"
                    .to_owned(),
            );
        }
        match (hints.destructive, hints.open_world) {
            (Some(false), Some(false)) => (ToolRisk::LocalWrite, ToolKind::Act),
            (Some(false), open) => {
                if open.is_none() {
                    review.push("the server does not say whether it reaches outside (openWorldHint): declared network".to_owned());
                }
                (ToolRisk::Network, ToolKind::Act)
            }
            (destructive, _) => {
                if destructive.is_none() {
                    review.push("the server does not say whether it is destructive (destructiveHint): declared destructive".to_owned());
                }
                (ToolRisk::Destructive, ToolKind::Act)
            }
        }
    };
    let idempotent = hints.idempotent == Some(true) || risk == ToolRisk::ReadOnly;
    if hints.idempotent.is_none() && risk != ToolRisk::ReadOnly {
        review.push(
            "the server does not say whether a repeat is harmless (idempotentHint): declared not idempotent"
                .to_owned(),
        );
    }
    let name = declared_name(&listed.name);
    if name != listed.name {
        review.push(format!("declared as {name} (tool names are lower-case letters, digits, _ and -); adapter.mcp.tool keeps the server's name"));
    }
    let tool = Tool {
        name: name.clone(),
        description: listed.description.chars().take(2048).collect(),
        risk,
        kind,
        adapter: ToolAdapter {
            http: None,
            mcp: Some(McpAdapter {
                url: adapter.url.clone(),
                command: adapter.command.clone(),
                tool: (name != listed.name).then(|| listed.name.clone()),
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            }),
            webhook: None,
            a2a: None,
            openapi: None,
            memory: None,
        },
        input_schema: Some(listed.input_schema.clone()),
        timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
        retry: None,
        idempotent,
        touches: Vec::new(),
        examples: Vec::new(),
        cache: None,
    };
    Imported { tool, review }
}

/// The longest server-side tool name a declaration can carry (`adapter.mcp.tool`).
pub const MAX_SERVER_TOOL_NAME: usize = 128;

/// Imported declarations made applyable together: names made unique (`-2`, `-3`, … with a
/// review line), and schemas that are not valid JSON Schema left out (with a review line) so
/// the Agent is not refused for them.
pub fn finish(mut imported: Vec<Imported>) -> Vec<Imported> {
    let mut taken = std::collections::BTreeSet::new();
    for item in &mut imported {
        let base = item.tool.name.clone();
        let mut name = base.clone();
        let mut n = 1;
        while !taken.insert(name.clone()) {
            n += 1;
            let suffix = format!("-{n}");
            // Cut between characters: the name is the tool server's.
            let mut end = base.len().min(64 - suffix.len());
            while !base.is_char_boundary(end) {
                end -= 1;
            }
            name = format!("{}{suffix}", &base[..end]);
        }
        if name != base {
            item.review.push(format!(
                "declared as {name}: another tool of the server is declared {base}"
            ));
            item.tool.name = name;
        }
        if item.tool.input_schema.is_some()
            && let Err(problem) = crate::gateway::CatalogTool::new(item.tool.clone())
        {
            item.review
                .push(format!("the server's input schema is left out: {problem}"));
            item.tool.input_schema = None;
        }
    }
    imported
}

/// A tool name as Agents may declare it (`^[a-z][a-z0-9_-]*$`, at most 64).
pub fn declared_name(server_name: &str) -> String {
    let mut name: String = server_name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert(0, 't');
        name.truncate(64);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::adapters::ToolHints;

    fn listed(name: &str, hints: ToolHints) -> ServerTool {
        ServerTool {
            name: name.into(),
            description: "d".into(),
            input_schema: serde_json::json!({"type": "object"}),
            hints,
        }
    }

    fn adapter() -> McpAdapter {
        serde_json::from_value(serde_json::json!({"url": "http://mcp.example.com/mcp"})).expect("adapter")
    }

    #[test]
    fn hints_decide_risk_kind_and_idempotency_and_silence_is_cautious() {
        let read = infer(
            &listed(
                "echo",
                ToolHints {
                    read_only: Some(true),
                    ..ToolHints::default()
                },
            ),
            &adapter(),
        );
        assert_eq!(
            (read.tool.risk, read.tool.kind, read.tool.idempotent),
            (ToolRisk::ReadOnly, ToolKind::Observe, true)
        );
        assert!(read.review.is_empty());
        let silent = infer(&listed("zap", ToolHints::default()), &adapter());
        assert_eq!(silent.tool.risk, ToolRisk::Destructive);
        assert!(!silent.tool.idempotent);
        assert_eq!(silent.review.len(), 3, "{:?}", silent.review);
        let closed = ToolHints {
            read_only: Some(false),
            destructive: Some(false),
            open_world: Some(false),
            idempotent: Some(true),
        };
        let local = infer(&listed("note", closed), &adapter());
        assert_eq!(
            (local.tool.risk, local.tool.idempotent),
            (ToolRisk::LocalWrite, true)
        );
        let open = infer(
            &listed(
                "post",
                ToolHints {
                    open_world: None,
                    ..closed
                },
            ),
            &adapter(),
        );
        assert_eq!(open.tool.risk, ToolRisk::Network);
    }

    #[test]
    fn a_server_is_matched_by_its_url_however_it_is_written() {
        let listing = ServerListing {
            adapter: adapter(),
            tools: Vec::new(),
        };
        let at = |url: &str| -> McpAdapter {
            serde_json::from_value(serde_json::json!({"url": url})).expect("adapter")
        };
        assert!(listing.serves(&at("HTTP://MCP.example.com:80/mcp/")));
        assert!(!listing.serves(&at("http://mcp.example.com/other")));
    }

    #[test]
    fn imports_are_made_applyable_together() {
        let read = ToolHints {
            read_only: Some(true),
            ..ToolHints::default()
        };
        let mut bad = listed("b", read);
        bad.input_schema = serde_json::json!({"type": "nonsense"});
        let finished = finish(
            [listed("getTinyImage", read), listed("gettinyimage", read), bad]
                .iter()
                .map(|t| infer(t, &adapter()))
                .collect(),
        );
        let names: Vec<&str> = finished.iter().map(|i| i.tool.name.as_str()).collect();
        assert_eq!(names, ["gettinyimage", "gettinyimage-2", "b"]);
        assert!(finished[1].review.iter().any(|r| r.contains("another tool")));
        assert!(finished[2].tool.input_schema.is_none());
        assert!(
            finished[2]
                .review
                .iter()
                .any(|r| r.contains("input schema is left out"))
        );
    }

    #[test]
    fn server_names_become_declarable_names_and_keep_the_original() {
        let imported = infer(
            &listed(
                "getTinyImage",
                ToolHints {
                    read_only: Some(true),
                    ..ToolHints::default()
                },
            ),
            &adapter(),
        );
        assert_eq!(imported.tool.name, "gettinyimage");
        assert_eq!(
            imported.tool.adapter.mcp.and_then(|m| m.tool).as_deref(),
            Some("getTinyImage")
        );
        assert_eq!(declared_name("9lives"), "t9lives");
        assert_eq!(declared_name("a.b c"), "a_b_c");
    }
}
