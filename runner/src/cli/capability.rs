//! `contextos capability serve`: the entrypoint of a capability pod. It serves one Agent's
//! command-started MCP server to the gateway service only: each connection that names this
//! pod's Session and server gets its own server process, started with a clean environment.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use contextos_runner::capability::{self, ChannelKey, Hello, ServerDigest};

#[derive(Debug, Subcommand)]
pub enum CapabilityCommand {
    /// Serve an MCP server started from a command to the gateway (capability pod entrypoint).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], capability::PORT)))]
    listen: SocketAddr,
    /// Namespace of the Session this pod serves.
    #[arg(long)]
    namespace: String,
    /// Name of the Session this pod serves.
    #[arg(long)]
    session: String,
    /// Digest of the server's command, as the operator computed it.
    #[arg(long)]
    server: String,
    /// This pod's channel key (64 hex characters), which the bridge proves itself with.
    #[arg(long)]
    key: String,
    /// The server's program and arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn run(command: CapabilityCommand) -> anyhow::Result<ExitCode> {
    let CapabilityCommand::Serve(args) = command;
    let server = ServerDigest::parse(&args.server).with_context(|| {
        format!(
            "--server {}: not a server digest (12 lowercase hex characters)",
            args.server
        )
    })?;
    anyhow::ensure!(
        ServerDigest::of(&args.command) == server,
        "--server {server} is not the digest of the command after `--`; the pod was not made by the operator"
    );
    let key =
        ChannelKey::parse(&args.key).context("--key: not a channel key (64 lowercase hex characters)")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        namespace = %args.namespace,
        session = %args.session,
        %server,
        "capability: serving {}",
        args.command.join(" ")
    );
    let hello = Hello {
        namespace: args.namespace,
        session: args.session,
        server,
    };
    // As a container's first process, a signal without a handler would be ignored: stop on
    // SIGTERM (the Session ended) at once, killing the servers with the connections.
    tokio::select! {
        served = capability::serve(listener, hello, key, args.command) => served?,
        () = contextos_runner::signals::shutdown() => {}
    }
    Ok(ExitCode::SUCCESS)
}
