//! A tiny MCP server on stdio (the test tool server of `tests/gateway.rs`'s stdio case).

#[path = "../tests/support/mcp_server.rs"]
mod mcp_server;

use rmcp::ServiceExt as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let service = mcp_server::OpsTools::default()
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
