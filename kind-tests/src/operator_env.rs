//! What the operator e2e tests run against, started once per test binary: the operator's
//! controllers and the gateway service (both in process, on their own runtime; the gateway
//! authenticates runner pods with the API server's real TokenReview and reads tenants' Secrets
//! and Sessions through it), a TiKV test server as the record store, and the ops-tools server
//! the test agent's tools call. Runner pods run the workspace's real `contextos` binary — on the
//! real node from the image it was packed into, on the process node as a host process (the
//! image the quickstart's SandboxProfile pins, mapped by its default image map) — and reach only
//! the gateway, which listens where pods reach this machine ([`TestEnv::host_address`]).

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, OnceLock},
};

use crate::{TestEnv, process_node::workspace_binary};
use contextos_operator::{OperatorConfig, metrics::Metrics, session_children::RunnerSettings};
use contextos_runner::{
    gateway::{identity::TokenReviewer, service::GatewayService, tenancy::KubeTenants},
    key_secrets,
    keys::TenantKeys,
    records::store::tikv::TikvStore,
    vault::{kek::KeyRings, secret_rings::SecretRings},
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

#[path = "../../runner/tests/support/tikv_testserver.rs"]
#[allow(dead_code, missing_debug_implementations)]
pub mod tikv_testserver;

/// Namespace of the operator's signing key in these tests.
pub const OPERATOR_NAMESPACE: &str = "contextos-e2e-operator";
/// Namespace of the identity vault's key rings in these tests (as in an installation).
pub const VAULT_NAMESPACE: &str = "contextos-vault";
/// Label of the objects the operator-restart test reconciles with its own operator.
pub const CHAOS_LABEL: &str = "contextos.dev/operator-test";

/// The webhook key the ops-tools server checks and the test Secret holds.
pub const HMAC_KEY: &str = "e2e-webhook-key";

/// The running operator and its dependencies.
pub struct OperatorEnv {
    /// `tikv://<pd>`: the record store (the gateway writes it; replay Jobs read it).
    pub store: String,
    /// Base URL of the gateway service runner pods send every effect to.
    pub gateway: String,
    /// The gateway's tenant record keys (a chain verifies with `for_tenant(ns).public()`).
    pub record_keys: TenantKeys,
    /// Base URL of the ops-tools server.
    pub tools_url: String,
    _tikv: tikv_testserver::TestServer,
    _tools: Child,
    _runtime: tokio::runtime::Runtime,
}

impl OperatorEnv {
    /// Checks that the record of a Session's run is in the store, verifies with the tenant's
    /// published key (the gateway's) and ends at the head the Session reports.
    pub async fn verify_session_record(
        &self,
        namespace: &str,
        status: &contextos_crds::SessionStatus,
    ) -> Result<(), String> {
        use contextos_runner::records::{TenantId, verify_run};
        let key = self.record_keys.for_tenant(namespace).public();
        let store = TikvStore::connect(self.store.trim_start_matches("tikv://"))
            .await
            .map_err(|e| format!("store: {e}"))?;
        let run_id = status.run_id.as_deref().ok_or("the Session reports no runId")?;
        let tenant = TenantId::new(namespace).map_err(|e| e.to_string())?;
        let verified = verify_run(&store, &tenant, run_id, &key)
            .await
            .map_err(|e| format!("run {run_id} does not verify: {e}"))?;
        if Some(verified.head.to_hex()) != status.record_head {
            return Err(format!(
                "recordHead {:?} is not the verified head {}",
                status.record_head, verified.head
            ));
        }
        Ok(())
    }

    /// The signed RunContext the record of a Session's run starts with (its user is the
    /// delegating identity).
    pub async fn recorded_run_context(
        &self,
        namespace: &str,
        run_id: &str,
    ) -> Result<serde_json::Value, String> {
        use contextos_runner::records::{EntryBody, TenantId, read_run};
        let store = TikvStore::connect(self.store.trim_start_matches("tikv://"))
            .await
            .map_err(|e| format!("store: {e}"))?;
        let tenant = TenantId::new(namespace).map_err(|e| e.to_string())?;
        let entries = read_run(&store, &tenant, run_id)
            .await
            .map_err(|e| format!("run {run_id}: {e}"))?;
        entries
            .into_iter()
            .find_map(|(_, entry)| match entry.body {
                EntryBody::RunStarted { run_context, .. } => Some(run_context),
                _ => None,
            })
            .ok_or_else(|| format!("run {run_id} has no run_started entry"))
    }
}

impl std::fmt::Debug for OperatorEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorEnv")
            .field("store", &self.store)
            .field("gateway", &self.gateway)
            .field("tools_url", &self.tools_url)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Result<OperatorEnv, String>> = OnceLock::new();

/// The shared operator environment, or `None` on a `KUBECONFIG` cluster (its runner pods cannot
/// reach the services these tests run on this machine, so they need a local node).
pub async fn shared(env: &'static TestEnv) -> Result<Option<&'static OperatorEnv>, String> {
    if !env.is_local() {
        return Ok(None);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(SHARED.get_or_init(|| start(env)));
    });
    let started = rx
        .await
        .map_err(|_| "the operator start-up thread panicked".to_owned())?;
    started.as_ref().map(Some).map_err(Clone::clone)
}

fn start(env: &'static TestEnv) -> Result<OperatorEnv, String> {
    let tikv_bin = std::env::var(tikv_testserver::TESTSERVER_ENV).map_err(|_| {
        format!(
            "{} is not set: `make kind-tests` builds the TiKV test server and sets it",
            tikv_testserver::TESTSERVER_ENV
        )
    })?;
    if workspace_binary("contextos").is_none() {
        return Err("target/<profile>/contextos is missing: `make kind-tests` builds it".into());
    }
    let tikv = tikv_testserver::TestServer::start(&tikv_bin, &[]);
    let (tools, tools_url) = start_tools_with(&[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("e2e-operator")
        .enable_all()
        .build()
        .map_err(|e| format!("operator runtime: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let store = format!("tikv://{}", tikv.pd);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((env.host_address(), 0)))
        .map_err(|e| format!("gateway listener: {e}"))?;
    let gateway = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| format!("gateway address: {e}"))?
    );
    let config = OperatorConfig {
        namespace: OPERATOR_NAMESPACE.into(),
        runner: runner_settings(&gateway),
        max_crash_attempts: 3,
        concurrency: 8,
        replay_image: env.runner_image().to_owned(),
        // Objects of the restart test belong to that test's own operator.
        selector: Some(format!("!{CHAOS_LABEL}")),
    };
    let record_keys = runtime.block_on(async {
        let client = env.client();
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": OPERATOR_NAMESPACE}
        }))
        .map_err(|e| e.to_string())?;
        match Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("create namespace {OPERATOR_NAMESPACE}: {e}")),
        }
        // The operator runs for the life of the test binary: the stop signal is never sent.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _keep = stop;
            if let Err(e) = contextos_operator::run(client, config, metrics, stopped).await {
                eprintln!("e2e operator stopped: {e:#}");
            }
        });
        // The gateway trusts the RunContext key the operator publishes when it starts.
        let trust = wait_for_operator_key(&env.client()).await?;
        // Its master key from the Secret, as the service keeps it (the chaos tests' gateway
        // processes use the same), and its certifier published where the operator reads it.
        let master =
            key_secrets::ensure_key(&env.client(), OPERATOR_NAMESPACE, key_secrets::RECORD_MASTER_KEY)
                .await
                .map_err(|e| e.to_string())?;
        let record_keys = TenantKeys::new(&master);
        key_secrets::publish_record_certifier(&env.client(), OPERATOR_NAMESPACE, &record_keys.certifier())
            .await
            .map_err(|e| format!("publish the record-key certifier: {e}"))?;
        // The vault's key rings in Secrets, as the gateway service keeps them.
        for name in [VAULT_NAMESPACE] {
            let namespace: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                    .map_err(|e| e.to_string())?;
            match Api::<Namespace>::all(env.client())
                .create(&PostParams::default(), &namespace)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(format!("create namespace {name}: {e}")),
            }
        }
        let records = TikvStore::connect(&tikv.pd)
            .await
            .map_err(|e| format!("store: {e}"))?
            .with_key_rings(KeyRings::Secrets(Arc::new(SecretRings::new(
                env.client(),
                VAULT_NAMESPACE,
            ))));
        let service = GatewayService::new(
            records,
            TokenReviewer::new(env.client()),
            KubeTenants::new(env.client()),
            record_keys.clone(),
            trust,
        )
        .with_system_namespace(OPERATOR_NAMESPACE)
        // Runner pods' tool discovery embeds with the model CONTEXTOS_EMBEDDING_MODEL names.
        .with_embedder(contextos_runner::discovery::configured_embedder())
        .with_a2a(
            Arc::new(contextos_runner::gateway::a2a_server::sessions::KubeSessions::new(env.client())),
            None,
        );
        let router = Arc::new(service).router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("e2e gateway stopped: {e}");
            }
        });
        Ok::<TenantKeys, String>(record_keys)
    })?;
    Ok(OperatorEnv {
        store,
        gateway,
        record_keys,
        tools_url,
        _tikv: tikv,
        _tools: tools,
        _runtime: runtime,
    })
}

/// How the e2e operators configure runner pods: every effect through the gateway at `gateway`,
/// a process on this machine (loopback for the process node, whose pods are host processes; the
/// real node's address for real pods), reached through the one extra egress rule it needs.
pub fn runner_settings(gateway: &str) -> RunnerSettings {
    let authority = gateway.split_once("//").map_or(gateway, |(_, rest)| rest);
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    RunnerSettings {
        gateway: gateway.to_owned(),
        gateway_namespace: OPERATOR_NAMESPACE.to_owned(),
        gateway_account: "contextos-gateway".to_owned(),
        egress: vec![(format!("{host}/32"), port.parse().unwrap_or(80))],
        relay_traces: false,
    }
}

async fn wait_for_operator_key(client: &kube::Client) -> Result<contextos_runner::keys::PublicKey, String> {
    for _ in 0..300 {
        match key_secrets::published_run_context_key(client, OPERATOR_NAMESPACE).await {
            Ok(Some(key)) => return Ok(key),
            Ok(None) => {}
            Err(e) => return Err(format!("reading the operator's published key: {e}")),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err("the operator did not publish its RunContext key within 60 s".into())
}

/// Adds `extra` labels to an object's own (the webhook Secret keeps its agent-secret label).
pub fn add_labels(object: &mut serde_json::Value, extra: &serde_json::Value) {
    let mut labels = object["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if let Some(extra) = extra.as_object() {
        labels.extend(extra.clone());
    }
    object["metadata"]["labels"] = serde_json::Value::Object(labels);
}

/// Starts an ops-tools server (`extra` e.g. `--slow PATH=MILLIS`); killed on drop of the child.
pub fn start_tools_with(extra: &[&str]) -> Result<(Child, String), String> {
    let binary = workspace_binary("examples/ops_tools")
        .ok_or("target/<profile>/examples/ops_tools is missing: `make kind-tests` builds it")?;
    let mut child = Command::new(binary)
        .args(["--hmac-key", HMAC_KEY, "--exit-on-stdin-eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start ops-tools: {e}"))?;
    let stdout = child.stdout.take().ok_or("ops-tools stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("read the ops-tools banner: {e}"))?;
    let url = line
        .trim()
        .strip_prefix("ops-tools listening on ")
        .ok_or_else(|| format!("unexpected ops-tools banner {line:?}"))?
        .to_owned();
    Ok((child, url))
}

/// Two reads and a validated answer: a quickstart Session that finishes without approval.
pub const QUICK_SCRIPT: &str = r#"{"turns": [
  {"content": "Runbook first.", "toolCalls": [{"tool": "search_runbooks", "arguments": {"query": "checkout-api 5xx"}}]},
  {"content": "Live status.", "toolCalls": [{"tool": "get_service_status", "arguments": {"service": "checkout-api"}}]},
  {"content": "{\"summary\": \"checkout-api 5xx is elevated after the 14:02 deploy; escalating to on-call.\", \"actions\": [], \"resolved\": false}"}
]}"#;

/// A read-only tool served by an MCP server the Agent starts from a command (`hostile_mcp`, in
/// the workspace's image): in a cluster it runs in the Session's capability pod, which the
/// SandboxProfile must allow (`execution.allowedTools` naming `probe_*`).
pub fn capability_probe_tool() -> serde_json::Value {
    serde_json::json!({
        "name": "probe_sandbox",
        "description": "Looks around the sandbox.",
        "risk": "read_only",
        "kind": "observe",
        "idempotent": true,
        "adapter": {"mcp": {"command": ["hostile_mcp"]}},
        "inputSchema": {"type": "object"},
    })
}

/// The quickstart's Session (`examples/quickstart/session.yaml`), named `name`.
pub fn quickstart_session(name: &str) -> Result<serde_json::Value, String> {
    let path = crate::env::repo_root().join("examples/quickstart/session.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let mut session: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("parse {}: {e}", path.display()))?;
    session["metadata"]["name"] = serde_json::json!(name);
    Ok(session)
}

/// The quickstart's objects (Session left out), with the agent's tools pointed at the
/// ops-tools server at `tools_url`, the webhook key in a Secret and the SandboxProfile pinning
/// the image `env`'s node runs the workspace's binaries from.
pub fn quickstart_for(env: &TestEnv, tools_url: &str) -> Result<Vec<serde_json::Value>, String> {
    let dir = crate::env::repo_root().join("examples/quickstart");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("read {}: {e}", file.display()))?
            .replace("http://ops-tools.shop-platform.svc:8080", tools_url)
            .replace("http://ops-tools.shop-platform.svc:8081", tools_url);
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document)
                .map_err(|e| format!("parse {}: {e}", file.display()))?;
            if value.is_null() || value["kind"] == "Session" {
                continue;
            }
            let mut value = value;
            if value["kind"] == "SandboxProfile" {
                value["spec"]["image"] = serde_json::json!(env.runner_image());
            }
            out.push(value);
        }
    }
    out.push(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "ops-tools-webhook", "labels": {"contextos.dev/agent-secret": "true"}},
        "stringData": {"hmac-key": HMAC_KEY},
    }));
    Ok(out)
}
