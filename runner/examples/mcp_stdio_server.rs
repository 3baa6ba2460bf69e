//! A tiny MCP server on stdio (the test tool server of `tests/gateway.rs`'s stdio case).

#[path = "../tests/support/mcp_server.rs"]
mod mcp_server;

use rmcp::ServiceExt as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Diagnostics on stderr, as servers write them: the gateway keeps them out of the MCP stream.
    eprintln!("mcp_stdio_server: serving on stdio");
    let service = mcp_server::OpsTools::default()
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
