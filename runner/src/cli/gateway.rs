//! `contextos gateway`: serve the Tool Gateway over HTTP for runner pods.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Args;
use contextos_runner::{
    gateway::{bundle::GatewayBundle, service::GatewayService},
    keys::{KeyPair, PublicKey},
};

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8480", env = "CONTEXTOS_GATEWAY_LISTEN")]
    listen: SocketAddr,
    /// Gateway bundle files (YAML or JSON), one per agent: tenant, agent, spec, policies, secrets.
    #[arg(long = "bundle", required = true)]
    bundles: Vec<PathBuf>,
    /// Public key (hex) that signs RunContexts; default: the data directory's key.
    #[arg(long, env = "CONTEXTOS_TRUST_KEY")]
    trust_key: Option<String>,
}

pub async fn run(global: &GlobalArgs, args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let record_key = KeyPair::load_or_create(&global.key_path())?;
    let trusted = match &args.trust_key {
        Some(hex) => PublicKey::from_hex(hex)?,
        None => record_key.public(),
    };
    let mut gateways = Vec::new();
    for path in &args.bundles {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bundle: GatewayBundle = serde_yaml::from_str(&text).with_context(|| {
            format!(
                "{}: not a gateway bundle (tenant, agent, spec, policies)",
                path.display()
            )
        })?;
        let gateway = bundle
            .build(trusted)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        gateways.push(gateway);
    }
    let store = global.open_store().await?;
    let service = Arc::new(GatewayService::new(store, record_key, gateways));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "contextos gateway: serving {} bundle(s) on http://{}",
        args.bundles.len(),
        listener.local_addr()?
    );
    axum::serve(listener, service.router())
        .with_graceful_shutdown(contextos_runner::signals::shutdown())
        .await
        .context("gateway server failed")?;
    Ok(ExitCode::SUCCESS)
}
