//! `contextos gateway`: the gateway service runner pods send every effect to (in a cluster,
//! the Deployment in `contextos-system`). It needs the API server (TokenReview for callers,
//! the tenants' Secrets and Sessions, its own key Secret and the operator's published key) and
//! the record store (`--store`).

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use contextos_runner::{
    gateway::{
        capabilities::KubeCapabilities, egress::EgressGuard, identity::TokenReviewer,
        service::GatewayService, tenancy::KubeTenants,
    },
    key_secrets::{self, RECORD_MASTER_KEY},
    keys::{PublicKey, TenantKeys},
    records::StoreLocation,
    vault::{kek::KeyRings, secret_rings::SecretRings},
};

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8480", env = "CONTEXTOS_GATEWAY_LISTEN")]
    listen: SocketAddr,
    /// Address of `/metrics` (model turns, tokens and spend by tenant, agent and model), a
    /// listener of its own so that only what may read every tenant's spend reaches it.
    #[arg(long, env = "CONTEXTOS_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Namespace of ContextOS's own objects: the gateway's master record key Secret and the
    /// operator's published RunContext key.
    #[arg(long, env = "CONTEXTOS_NAMESPACE", default_value = "contextos-system")]
    namespace: String,
    /// Public key (hex) that signs RunContexts; default: the one the operator publishes in
    /// ConfigMap `contextos-public-keys` (waited for at start).
    #[arg(long, env = "CONTEXTOS_TRUST_KEY")]
    trust_key: Option<String>,
    /// A network tool and model calls may never reach (CIDR), e.g. the cluster's pod or service
    /// range; repeatable. Link-local addresses and the record store's endpoints are always denied.
    #[arg(long = "deny-destination", value_name = "CIDR")]
    deny_destinations: Vec<ipnet::IpNet>,
    /// This gateway's own addresses (its pod's IPs, from the downward API's `status.podIPs`):
    /// no tool or model is reached there, nor on loopback, where the gateway's own listeners
    /// answer (its metrics, with every tenant's spend) and no NetworkPolicy sees the traffic.
    #[arg(
        long = "own-address",
        value_name = "IP",
        env = "CONTEXTOS_POD_IPS",
        value_delimiter = ','
    )]
    own_addresses: Vec<std::net::IpAddr>,
    /// This gateway's own Services whose addresses no tool or model is reached at (resolved as
    /// `<name>.<namespace>.svc` at start; a name that does not resolve is skipped): its metrics,
    /// with every tenant's spend, would be one tool URL away through the Service. (Its API
    /// Service stays reachable: agents it offers over A2A are called there.)
    #[arg(
        long = "own-service",
        value_name = "NAME",
        default_value = "contextos-gateway-metrics"
    )]
    own_services: Vec<String>,
    /// Lets tools and models be reached on this machine's loopback: only for a gateway that runs
    /// on one machine with its tools (never in a cluster, where loopback is the gateway's own pod).
    #[arg(long)]
    allow_loopback_destinations: bool,
    /// What one run may write to the record store, in bytes: its record's entries and the blobs
    /// it uploads. Writes past it are refused (413), and the run fails saying so.
    #[arg(long, env = "CONTEXTOS_MAX_RUN_BYTES", default_value_t = contextos_runner::gateway::service::DEFAULT_MAX_RUN_BYTES)]
    max_run_bytes: u64,
    /// What one namespace's runs may keep in the record store, in bytes, all told (their
    /// records and the blobs they uploaded), so that one tenant cannot fill the disk every
    /// tenant's records are on; a namespace's `contextos.dev/max-store-bytes` annotation (a
    /// size such as `50Gi`, set by a cluster admin) replaces it for that namespace. Writes
    /// past it are refused (507) and the run fails saying so. 0: no bound.
    #[arg(long, env = "CONTEXTOS_MAX_TENANT_STORE_BYTES", default_value_t = contextos_runner::gateway::service::DEFAULT_MAX_TENANT_STORE_BYTES)]
    max_tenant_store_bytes: u64,
    /// Namespace whose Secrets hold the identity vault's key rings (one per tenant, shared by
    /// every replica): nothing else belongs there, and it is never backed up with the store.
    #[arg(long, env = "CONTEXTOS_VAULT_NAMESPACE", default_value = "contextos-vault")]
    vault_namespace: String,
    /// The gateway's URL as A2A callers reach it, e.g. `https://agents.example.com`: the
    /// endpoint the cards of Agents with `spec.a2a` name. Default: the host each request names.
    #[arg(long, env = "CONTEXTOS_A2A_PUBLIC_URL")]
    a2a_public_url: Option<String>,
}

pub async fn run(global: &GlobalArgs, args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let client = kube::Client::try_default()
        .await
        .context("the gateway service needs the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let master = key_secrets::ensure_key(&client, &args.namespace, RECORD_MASTER_KEY).await?;
    let trust = match &args.trust_key {
        Some(hex) => PublicKey::from_hex(hex)?,
        None => wait_for_operator_key(&client, &args.namespace).await?,
    };
    let egress = egress_guard(&args);
    for service in &args.own_services {
        let host = format!("{service}.{}.svc", args.namespace);
        match egress.deny_host(&host, 80).await {
            Ok(()) => tracing::info!(%host, "tools may not reach this gateway's own Service"),
            Err(e) => tracing::debug!(%host, error = %e, "own Service not resolved (outside a cluster?)"),
        }
    }
    // The store's own endpoints: an Agent's tool must never be pointed at them.
    if let Ok(StoreLocation::Tikv(endpoints)) = global.store_location() {
        for endpoint in endpoints.split(',') {
            let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, "2379"));
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = port.parse().unwrap_or(2379);
            egress
                .deny_host(host, port)
                .await
                .map_err(|e| anyhow::anyhow!("the record store's endpoint {endpoint}: {e}"))?;
        }
    }
    let store = Arc::new(
        global
            .open_store()
            .await?
            .with_key_rings(KeyRings::Secrets(Arc::new(SecretRings::new(
                client.clone(),
                &args.vault_namespace,
            )))),
    );
    // The TiKV nodes behind PD, and any added later: no tool may be pointed at them.
    #[cfg(feature = "tikv")]
    if let Ok(StoreLocation::Tikv(endpoints)) = global.store_location() {
        deny_store_nodes(&egress, &endpoints)
            .await
            .context("cannot list the record store's TiKV nodes, which tools must never reach")?;
        let (egress, endpoints) = (egress.clone(), endpoints.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STORE_NODES_REFRESH).await;
                if let Err(e) = deny_store_nodes(&egress, &endpoints).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot refresh the record store's TiKV nodes; the ones known stay denied");
                }
            }
        });
    }
    let keys = TenantKeys::new(&master);
    tokio::spawn(publish_certifier(
        client.clone(),
        args.namespace.clone(),
        keys.certifier(),
    ));
    // Consents applied as objects join their subjects' histories, chained by every replica
    // (each object once).
    tokio::spawn(contextos_runner::gateway::consent_objects::chain_consent_objects(
        client.clone(),
        store.clone(),
        keys.clone(),
    ));
    // So are people's corrections of runs, applied as Feedback objects.
    tokio::spawn(
        contextos_runner::gateway::feedback_objects::chain_feedback_objects(
            client.clone(),
            store.clone(),
            keys.clone(),
        ),
    );
    let service = GatewayService::new(
        store,
        TokenReviewer::new(client.clone()),
        KubeTenants::new(client.clone()),
        keys,
        trust,
    )
    .with_system_namespace(&args.namespace)
    .with_vault_namespace(&args.vault_namespace)
    .with_egress(egress)
    .with_a2a(
        Arc::new(contextos_runner::gateway::a2a_server::sessions::KubeSessions::new(client.clone())),
        args.a2a_public_url,
    )
    .with_capabilities(Arc::new(KubeCapabilities::new(client)))
    .with_max_run_bytes(args.max_run_bytes)
    .with_max_tenant_store_bytes(args.max_tenant_store_bytes)
    // Runner pods' tool discovery embeds with what this process is configured with (a model
    // directory or an endpoint and its key, which never reach a pod).
    .with_embedder(contextos_runner::discovery::configured_embedder());
    // Runner pods' spans reach the collector through this service, when it exports to one.
    #[cfg(feature = "otlp")]
    let service =
        match contextos_runner::telemetry::sink::TraceSink::from_env().map_err(anyhow::Error::msg)? {
            Some(sink) => service.with_trace_sink(sink),
            None => service,
        };
    let service = Arc::new(service);
    if let Some(address) = args.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for metrics"))?;
        tracing::info!(listen = %metrics.local_addr()?, "contextos gateway: serving /metrics");
        let router = service.metrics_router();
        tokio::spawn(async move {
            let served = contextos_runner::serve::serve(
                metrics,
                router,
                contextos_runner::serve::Limits::default(),
                contextos_runner::signals::shutdown(),
            )
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        trust_key = %trust.key_id(),
        "contextos gateway: serving runner pods"
    );
    eprintln!("contextos gateway: serving on http://{}", listener.local_addr()?);
    // Each request carries its connection's address: a caller's refused tokens spend its own
    // allowance.
    contextos_runner::serve::serve(
        listener,
        service.router(),
        contextos_runner::serve::Limits::default(),
        contextos_runner::signals::shutdown(),
    )
    .await
    .context("gateway server failed")?;
    Ok(ExitCode::SUCCESS)
}

/// How often the TiKV nodes are listed again (nodes added to the cluster are denied then).
#[cfg(feature = "tikv")]
const STORE_NODES_REFRESH: Duration = Duration::from_secs(60);

/// Denies every address of every TiKV node the first answering PD of `endpoints` knows.
#[cfg(feature = "tikv")]
async fn deny_store_nodes(egress: &EgressGuard, endpoints: &str) -> anyhow::Result<()> {
    let mut last = None;
    for endpoint in endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match contextos_runner::records::store::pd_stores::store_addresses(endpoint).await {
            Ok(addresses) => {
                for address in &addresses {
                    let (host, port) = address.rsplit_once(':').unwrap_or((address, "20160"));
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    egress
                        .deny_host(host, port.parse().unwrap_or(20160))
                        .await
                        .map_err(|e| anyhow::anyhow!("TiKV node {address}: {e}"))?;
                }
                tracing::info!(nodes = ?addresses, "tools may not reach the record store's TiKV nodes");
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no PD endpoint given"), anyhow::Error::from))
}

/// Publishes the key that vouches for each tenant's record key, which the operator checks every
/// key it fetches from this service against, and again every ten minutes (the ConfigMap is the
/// operator's: it may come after this gateway, or be made again).
async fn publish_certifier(
    client: kube::Client,
    namespace: String,
    certifier: contextos_runner::keys::KeyPair,
) {
    let mut published = false;
    loop {
        match key_secrets::publish_record_certifier(&client, &namespace, &certifier).await {
            Ok(()) if !published => {
                tracing::info!(key = %certifier.key_id(), "record-key certifier published");
                published = true;
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot publish the record-key certifier in ConfigMap {namespace}/{} (made by the operator; \
                     this gateway's Role must allow `patch` on it): until it is, the operator cannot \
                     check tenant keys and relays no approval, completion or verdict",
                    key_secrets::GATEWAY_KEYS_CONFIG_MAP
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// Where tools and models may go, as the arguments say: besides what is always denied, the
/// listed networks, this gateway's own addresses, and — unless it runs on one machine with its
/// tools — loopback. (The store's and its own Services' addresses are added once resolved.)
fn egress_guard(args: &GatewayArgs) -> EgressGuard {
    let own = args.own_addresses.iter().map(|ip| ipnet::IpNet::from(*ip));
    let egress = EgressGuard::new(args.deny_destinations.iter().copied().chain(own).collect());
    if args.allow_loopback_destinations {
        egress
    } else {
        egress.denying_own_host()
    }
}

/// The operator publishes its key when it starts; a gateway started first waits for it.
async fn wait_for_operator_key(client: &kube::Client, namespace: &str) -> anyhow::Result<PublicKey> {
    let mut announced = false;
    loop {
        if let Some(key) = key_secrets::published_run_context_key(client, namespace).await? {
            return Ok(key);
        }
        if !announced {
            eprintln!(
                "contextos gateway: waiting for the operator to publish its RunContext key in ConfigMap {namespace}/{}",
                key_secrets::PUBLIC_KEYS_CONFIG_MAP
            );
            announced = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: GatewayArgs,
    }

    fn guard(args: &[&str]) -> EgressGuard {
        let command = Command::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .expect("arguments");
        egress_guard(&command.args)
    }

    #[test]
    fn the_gateway_denies_its_own_host_unless_it_runs_with_its_tools_on_one_machine() {
        let ip = |text: &str| text.parse::<std::net::IpAddr>().expect("ip");
        let cluster = guard(&["--own-address", "10.244.0.17,fd00::17"]);
        for denied in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "10.244.0.17",
            "fd00::17",
            "169.254.169.254",
        ] {
            assert!(!cluster.allows(ip(denied)), "{denied} allowed");
        }
        assert!(cluster.allows(ip("10.244.0.18")));
        let one_machine = guard(&["--allow-loopback-destinations", "--own-address", "10.244.0.17"]);
        assert!(one_machine.allows(ip("127.0.0.1")));
        assert!(
            !one_machine.allows(ip("10.244.0.17")),
            "its own pod's address all the same"
        );
        assert!(!one_machine.allows(ip("169.254.169.254")));
    }
}
