//! The operator binary: flags, logging, health and metrics endpoints, graceful shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, routing::get};
use clap::Parser;
use contextos_operator::{
    OperatorConfig, leader::LeaderElection, metrics::Metrics, session_children::RunnerSettings,
};

/// Runs the ContextOS controllers against the cluster in the current kubeconfig or service
/// account.
#[derive(Debug, Parser)]
#[command(name = "contextos-operator", version)]
struct Args {
    /// Namespace of the operator's own objects (its signing-key Secret).
    #[arg(long, env = "CONTEXTOS_NAMESPACE", default_value = "contextos-system")]
    namespace: String,
    /// The gateway service runner pods send every effect to.
    #[arg(
        long,
        env = "CONTEXTOS_RUNNER_GATEWAY",
        default_value = "http://contextos-gateway.contextos-system.svc:8480"
    )]
    runner_gateway: String,
    /// Namespace of the gateway service's pods (runner pods may reach only them, and DNS).
    #[arg(long, env = "CONTEXTOS_GATEWAY_NAMESPACE", default_value = "contextos-system")]
    gateway_namespace: String,
    /// The gateway's service account in that namespace: in each namespace with an Agent, the
    /// operator binds ClusterRole contextos-gateway-agent-secrets to it (the gateway reads
    /// Secrets nowhere else). Empty: bind it by hand where it may read.
    #[arg(
        long,
        env = "CONTEXTOS_GATEWAY_SERVICE_ACCOUNT",
        default_value = "contextos-gateway"
    )]
    gateway_service_account: String,
    /// Egress every runner pod is allowed besides the gateway's pods and DNS, as `cidr:port`;
    /// repeatable (for a gateway outside the pod network).
    #[arg(long = "runner-egress", value_parser = parse_egress)]
    runner_egress: Vec<(String, u16)>,
    /// Runner attempts a Session may make after crashes.
    #[arg(long, default_value_t = 3)]
    max_crash_attempts: u32,
    /// Objects reconciled at once per kind.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Compete for a Lease so only one replica reconciles (turn off only for a single replica
    /// outside a cluster).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Image of replay Jobs: the runner image (its entrypoint is `contextos`).
    #[arg(
        long,
        env = "CONTEXTOS_REPLAY_IMAGE",
        default_value = "ghcr.io/contextos/runner:0.1.0@sha256:8efb2271583453e455faacdc1941d214c2a8e6c6beb667cbc5b69589baf7d3b2"
    )]
    replay_image: String,
    /// Reconcile only ContextOS objects matching this label selector (default: all).
    #[arg(long)]
    selector: Option<String>,
    /// This replica's name in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn parse_egress(text: &str) -> Result<(String, u16), String> {
    let (cidr, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: expected cidr:port, e.g. 10.96.0.0/12:2379"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{text:?}: {port} is not a port"))?;
    Ok((cidr.to_owned(), port))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    // Each Session's root span is exported when OTEL_EXPORTER_OTLP_ENDPOINT names a collector
    // (the exporter's client runs on its own thread: made before the runtime, flushed when
    // dropped after it).
    let telemetry = match contextos_runner::telemetry::from_env::<tracing_subscriber::Registry>(
        "contextos-operator",
        None,
    ) {
        Ok(exporting) => exporting.map(|(_, telemetry)| telemetry),
        Err(e) => {
            eprintln!("contextos-operator: traces are not exported: {e}");
            None
        }
    };
    // Runner pods export their spans (through the gateway) when the operator does.
    let relay_traces = telemetry.is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(operate(args, relay_traces));
    drop(runtime);
    drop(telemetry);
    result
}

async fn operate(args: Args, relay_traces: bool) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let served = metrics.clone();
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        contextos_operator::metrics::CONTENT_TYPE,
                    )],
                    served.render(),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tokio::spawn(contextos_runner::serve::serve(
        listener,
        router,
        contextos_runner::serve::Limits::default(),
        std::future::pending(),
    ));
    let config = OperatorConfig {
        namespace: args.namespace,
        runner: RunnerSettings {
            gateway: args.runner_gateway,
            gateway_namespace: args.gateway_namespace,
            gateway_account: args.gateway_service_account,
            egress: args.runner_egress,
            relay_traces,
        },
        max_crash_attempts: args.max_crash_attempts,
        concurrency: args.concurrency,
        replay_image: args.replay_image.clone(),
        selector: args.selector.clone(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = std::sync::Arc::new(stop);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        contextos_runner::signals::shutdown().await;
        let _ = on_signal.send(true);
    });
    if !args.leader_election {
        return contextos_operator::run(client, config, metrics, stopped).await;
    }
    let election = LeaderElection {
        namespace: config.namespace.clone(),
        lease: "contextos-operator".into(),
        identity: args.identity.unwrap_or_else(|| {
            format!(
                "contextos-operator-{}",
                contextos_runner::run_context::random_hex(4)
            )
        }),
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(5),
    };
    let mut waiting = stopped.clone();
    tokio::select! {
        () = election.acquire(&client) => {}
        _ = waiting.wait_for(|stop| *stop) => return Ok(()),
    }
    tracing::info!(identity = %election.identity, "leading");
    let holder = {
        let (election, client) = (election.clone(), client.clone());
        tokio::spawn(async move { election.hold(&client).await })
    };
    tokio::select! {
        result = contextos_operator::run(client, config, metrics, stopped) => result,
        _ = holder => {
            let _ = stop.send(true);
            anyhow::bail!("leadership lost; exiting so this replica starts over as a follower")
        }
    }
}
