//! What the real-node tests share: the environment (or why it is skipped), the quickstart made
//! for the real node, and probes — busybox scripts run in the exact pod the operator would
//! create for a Session, that print `key=value` lines.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use contextos_crds::{SandboxProfileSpec, Session};
use contextos_kind_tests::{
    Check, TestEnv, TestNamespace,
    operator_env::{self, OperatorEnv},
    real_node::{self, BUSYBOX_IMAGE, REQUIRE_ENV},
    wait_for_object,
};
use contextos_operator::session_children::{self, RunnerSettings};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The real-node environment, or `None` when this machine cannot run it (the reason printed;
/// a failure instead when CI requires the node).
pub async fn env() -> Result<Option<&'static TestEnv>> {
    if let Some(why) = real_node::unavailable() {
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            bail!("{REQUIRE_ENV}=1 but {why}");
        }
        eprintln!("skipped: {why}");
        return Ok(None);
    }
    Ok(Some(TestEnv::real_node().await?))
}

/// The operator and gateway for the real node (the gateway listens on the node's address).
pub async fn operator(env: &'static TestEnv) -> Result<&'static OperatorEnv> {
    operator_env::shared(env)
        .await
        .map_err(anyhow::Error::msg)?
        .context("the local control plane runs the operator")
}

/// A tenant namespace enforcing Pod Security "restricted".
pub async fn tenant(env: &'static TestEnv, test: &str) -> Result<TestNamespace> {
    Ok(
        TestNamespace::with_labels(env, test, &[("pod-security.kubernetes.io/enforce", "restricted")])
            .await?,
    )
}

/// A namespace without Pod Security enforcement, for the control pods that show what a
/// protection stops (they would not be admitted next to the runner).
pub async fn unrestricted(env: &'static TestEnv, test: &str) -> Result<TestNamespace> {
    Ok(TestNamespace::new(env, test).await?)
}

/// The quickstart's objects (no Session), the agent's tools on the test's ops-tools server and
/// the SandboxProfile pinning the image the workspace's binaries were packed into.
pub fn quickstart(env: &TestEnv, op: &OperatorEnv) -> Result<Vec<Value>> {
    operator_env::quickstart_for(env, &op.tools_url).map_err(anyhow::Error::msg)
}

/// The quickstart's Session, named `name`.
pub fn session(name: &str) -> Result<Value> {
    operator_env::quickstart_session(name).map_err(anyhow::Error::msg)
}

/// The quickstart's SandboxProfile spec.
pub fn quickstart_sandbox() -> Result<SandboxProfileSpec> {
    let path = contextos_kind_tests::env::repo_root().join("examples/quickstart/sandboxprofile.yaml");
    let profile: Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    Ok(serde_json::from_value(profile["spec"].clone())?)
}

/// Runner settings for probes that never reach a gateway.
pub fn no_gateway() -> RunnerSettings {
    RunnerSettings {
        gateway: "http://gateway.invalid:8480".into(),
        gateway_namespace: "contextos-system".into(),
        gateway_account: String::new(),
        egress: Vec::new(),
        relay_traces: false,
    }
}

/// The pod the operator creates for attempt 1 of Session `session` in `namespace` under
/// `sandbox`, with its container running `script` in busybox instead of `contextos` — labels,
/// security context, volumes, limits and deadline exactly as the operator writes them.
pub fn probe_pod(
    namespace: &str,
    session: &str,
    sandbox: &SandboxProfileSpec,
    settings: &RunnerSettings,
    script: &str,
) -> Result<Pod> {
    let mut object: Session = serde_json::from_value(self::session(session)?)?;
    object.metadata.namespace = Some(namespace.to_owned());
    let mut pod = session_children::runner_pod(&object, sandbox, 1, "{}", settings)?;
    // No Session owns it: the garbage collector would delete a pod whose owner is missing.
    pod.metadata.owner_references = None;
    let container = pod
        .spec
        .as_mut()
        .and_then(|s| s.containers.first_mut())
        .context("the runner pod has a container")?;
    container.image = Some(BUSYBOX_IMAGE.to_owned());
    container.image_pull_policy = Some("Never".to_owned());
    container.command = Some(vec!["sh".into(), "-c".into(), script.to_owned()]);
    container.args = None;
    Ok(pod)
}

/// What a probe printed and how its pod ended.
#[derive(Debug)]
pub struct Probe {
    pub values: BTreeMap<String, String>,
    /// The pod's phase (`Succeeded`, `Failed`).
    pub phase: String,
    /// The pod's own reason (`DeadlineExceeded`).
    pub pod_reason: Option<String>,
    /// Why the container terminated (`OOMKilled`, `Error`, `Completed`).
    pub container_reason: Option<String>,
    pub log: String,
}

impl Probe {
    pub fn get(&self, key: &str) -> Result<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("the probe printed no {key}=…; its output:\n{}", self.log))
    }
}

/// Creates the (empty) bundle ConfigMap a runner pod mounts, so that its volume can be set up.
pub async fn ensure_bundle(env: &TestEnv, namespace: &str, pod: &Pod) -> Result<()> {
    let bundle = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()));
    if let Some(bundle) = bundle {
        let config_maps: Api<ConfigMap> = Api::namespaced(env.client(), namespace);
        if config_maps.get_opt(&bundle).await?.is_none() {
            let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": bundle}}))?;
            config_maps.create(&PostParams::default(), &map).await?;
        }
    }
    Ok(())
}

/// Creates `pod` in `namespace` (with the empty bundle ConfigMap a runner pod mounts), waits
/// until it has ended and returns its output.
pub async fn run_probe(env: &'static TestEnv, namespace: &str, pod: Pod) -> Result<Probe> {
    let name = pod.metadata.name.clone().context("pod name")?;
    ensure_bundle(env, namespace, &pod).await?;
    let pods: Api<Pod> = Api::namespaced(env.client(), namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {name}"))?;
    let ended = wait_for_object(&pods, &name, "ended", TIMEOUT, |p: &Pod| {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        Check::when(matches!(phase.as_str(), "Succeeded" | "Failed"), || {
            format!("phase {phase}")
        })
    })
    .await?;
    let status = ended.status.clone().unwrap_or_default();
    let container_reason = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.reason.clone());
    let log = env
        .container_log(namespace, &name, "runner")
        .await
        .map_err(anyhow::Error::msg)?;
    let values = log
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Probe {
        values,
        phase: status.phase.unwrap_or_default(),
        pod_reason: status.reason,
        container_reason,
        log,
    })
}
