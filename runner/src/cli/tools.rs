//! `contextos tools import`: tool declarations for an Agent from what an MCP server lists, with
//! risk, kind and idempotency inferred from its annotations and marked for review where the
//! server did not say.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use contextos_crds::agent::McpAdapter;
use contextos_runner::audit::live::{self, Imported};

#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// Print `tools:` entries for an Agent from an MCP server's tool list (YAML, to stdout).
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    server: ServerArgs,
}

/// Which MCP server: exactly one of a URL and a command.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ServerArgs {
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
    let adapter = args.server.adapter()?;
    let listing = live::introspect(adapter.clone())
        .await
        .with_context(|| "listing the MCP server's tools".to_owned())?;
    let imported: Vec<Imported> = listing.tools.iter().map(|t| live::infer(t, &adapter)).collect();
    print!("{}", render(&listing.server(), &imported)?);
    Ok(ExitCode::SUCCESS)
}

/// The `tools:` YAML, each tool preceded by what to review in it.
pub fn render(server: &str, imported: &[Imported]) -> anyhow::Result<String> {
    let to_review = imported.iter().filter(|i| !i.review.is_empty()).count();
    let mut out = format!(
        "# {} tools imported from {server} by `contextos tools import`.\n\
         # Risk, kind and idempotency come from the server's annotations; {to_review} marked `review:` were\n\
         # inferred where the server said nothing. Check them before applying.\n\
         tools:\n",
        imported.len()
    );
    for item in imported {
        for line in &item.review {
            out.push_str(&format!("  # review: {line}\n"));
        }
        let yaml = serde_yaml::to_string(&vec![&item.tool]).context("encoding a tool")?;
        for line in yaml.lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}
