//! `contextos tools import`: tool declarations for an Agent from what an MCP server lists, with
//! risk, kind and idempotency inferred from its annotations and marked for review where the
//! server did not say.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use contextos_crds::agent::McpAdapter;
use contextos_runner::audit::{
    live::{self, Imported},
    openapi::{self, ApiDocument, MAX_DOCUMENT_BYTES},
};
use contextos_runner::text::for_terminal;

#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// Print `tools:` entries for an Agent from an MCP server's tool list or an OpenAPI 3
    /// document's operations (YAML, to stdout).
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// With --openapi: the API's base URL, instead of the document's `servers[0].url`.
    #[arg(long, requires = "openapi")]
    server_url: Option<String>,
    /// With --openapi: the adapter the tools use. `openapi` (the default for a document read
    /// from a URL) binds each tool to its operation in the document at that URL; `http` (the
    /// default for a file) declares each operation's URL and method.
    #[arg(long = "adapter", value_enum, requires = "openapi")]
    adapter: Option<ImportAs>,
}

/// What an imported OpenAPI operation is declared as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportAs {
    Openapi,
    Http,
}

/// Which server: exactly one of an MCP URL, an MCP command and an OpenAPI document.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ServerArgs {
    /// An OpenAPI 3 document (a file, JSON or YAML, or an http(s) URL).
    #[arg(long, value_name = "FILE|URL")]
    openapi: Option<String>,
    /// A streamable-HTTP MCP server.
    #[arg(long, visible_alias = "mcp", value_name = "URL")]
    mcp_url: Option<String>,
    /// A stdio MCP server: the command and its arguments, as one string (split at spaces),
    /// started here with a clean environment for as long as the listing takes.
    #[arg(long)]
    mcp_command: Option<String>,
}

impl ServerArgs {
    pub fn adapter(&self) -> anyhow::Result<McpAdapter> {
        adapter(self.mcp_url.as_deref(), self.mcp_command.as_deref())
    }
}

/// The adapter for a server given by URL or by command line.
pub fn adapter(url: Option<&str>, command: Option<&str>) -> anyhow::Result<McpAdapter> {
    let command: Option<Vec<String>> = command.map(|c| c.split_whitespace().map(str::to_owned).collect());
    if command.as_ref().is_some_and(Vec::is_empty) {
        anyhow::bail!("--mcp-command is empty: give the server's command and arguments");
    }
    serde_json::from_value(serde_json::json!({"url": url, "command": command}))
        .context("the MCP server's address")
}

pub async fn run(command: ToolsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ToolsCommand::Import(args) => import(args).await,
    }
}

async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    if let Some(source) = &args.server.openapi {
        let document = read_openapi(source, args.server_url.as_deref()).await?;
        let clashes = openapi::colliding_names(&document.operations);
        if let Some((name, ids)) = clashes.iter().next() {
            anyhow::bail!(
                "{source}: operations {} would all be declared as {name}; give them distinct operationIds",
                ids.join(", ")
            );
        }
        let from_url = source.starts_with("http://") || source.starts_with("https://");
        let bound = match args.adapter {
            Some(ImportAs::Openapi) if !from_url => anyhow::bail!(
                "--adapter openapi: an OpenAPI tool names its document by URL, and {source} is a file; serve it over http(s) where the gateway can read it, or use --adapter http"
            ),
            Some(ImportAs::Openapi) => true,
            Some(ImportAs::Http) => false,
            None => from_url,
        };
        let mut listed = Vec::new();
        for operation in &document.operations {
            if !bound {
                listed.push(openapi::infer(operation));
                continue;
            }
            match openapi::infer_bound(&document, operation, args.server_url.as_deref()) {
                Ok(imported) => listed.push(imported),
                Err(why) => eprintln!(
                    "contextos tools import: left out {}: {}",
                    for_terminal(&operation.id),
                    for_terminal(&why.to_string())
                ),
            }
        }
        let imported = live::finish(listed);
        print!(
            "{}",
            render(&document.source, "the operations' HTTP methods", &imported)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let adapter = args.server.adapter()?;
    let listing = live::introspect(adapter.clone())
        .await
        .with_context(|| "listing the MCP server's tools".to_owned())?;
    let mut listed = Vec::new();
    for tool in &listing.tools {
        if tool.name.is_empty() || tool.name.chars().count() > live::MAX_SERVER_TOOL_NAME {
            eprintln!(
                "contextos tools import: left out a tool whose name is empty or longer than {} characters",
                live::MAX_SERVER_TOOL_NAME
            );
            continue;
        }
        listed.push(live::infer(tool, &adapter));
    }
    let imported = live::finish(listed);
    print!(
        "{}",
        render(&listing.server(), "the server's annotations", &imported)?
    );
    Ok(ExitCode::SUCCESS)
}

/// The `tools:` YAML, each tool preceded by what to review in it.
pub fn render(server: &str, basis: &str, imported: &[Imported]) -> anyhow::Result<String> {
    let to_review = imported.iter().filter(|i| !i.review.is_empty()).count();
    let mut out = format!(
        "# {} tools imported from {server} by `contextos tools import`.\n\
         # Risk, kind and idempotency come from {basis}; {to_review} carry `review:` lines saying\n\
         # what was assumed or changed. Check them before applying.\n\
         tools:\n",
        imported.len()
    );
    for item in imported {
        for line in &item.review {
            // A comment line: what the document named (a path, a parameter) cannot end it and
            // start YAML of its own, nor reach the terminal as a command.
            out.push_str(&format!("  # review: {}\n", for_terminal(line)));
        }
        // JSON, which is YAML too: every string quoted, so no name or value a server chose
        // (`yes`, `on`, `NO`) reads back as a boolean under YAML 1.1 (kubectl's reader).
        let json = serde_json::to_string_pretty(&item.tool).context("encoding a tool")?;
        for (i, line) in json.lines().enumerate() {
            out.push_str(if i == 0 { "  - " } else { "    " });
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// An OpenAPI document from a file or an http(s) URL, read within [`MAX_DOCUMENT_BYTES`].
pub async fn read_openapi(source: &str, server: Option<&str>) -> anyhow::Result<ApiDocument> {
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        let mut response = contextos_runner::http::client()
            .get(source)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("fetching {source}"))?;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .with_context(|| format!("reading {source}"))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT_BYTES {
                anyhow::bail!("{source}: more than {MAX_DOCUMENT_BYTES} bytes");
            }
        }
        String::from_utf8(body).with_context(|| format!("{source}: not UTF-8 text"))?
    } else {
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open(source)
            .with_context(|| format!("opening {source}"))?
            .take(MAX_DOCUMENT_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {source}"))?;
        text
    };
    openapi::parse(source, &text, server).map_err(anyhow::Error::msg)
}
