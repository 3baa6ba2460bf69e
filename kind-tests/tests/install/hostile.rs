//! A hostile capability on the installed cluster: an Agent whose one tool is an MCP server
//! started from a command (`hostile_mcp`, in the workspace's image), allowed to execute code by
//! its SandboxProfile. The operator runs it in a capability pod; the gateway pod is the only
//! thing that reaches it. Its tool looks for credentials in its environment, its pod's
//! environment and files, tries the tool service, the gateway's pod and Service, the record
//! store (PD), the API server, the kubelet and a port-53 listener that is not the cluster DNS,
//! and tries to append to a record directly — and its report, recorded like any result, must
//! say it found nothing and reached nothing.
//!
//! The control: the same probe in a plain pod of the tenant (a service-account token mounted, a
//! store address in its environment, no NetworkPolicy, labelled so the gateway's own policy lets
//! it knock) finds each of those and reaches each target — so an empty report means the
//! sandbox, not a blind probe — except two: the capability pod and the record store, which let
//! in only the gateway's pods in `contextos-system`, however a tenant's pod is labelled (the
//! gateway reaching the store is shown by every Session that succeeds).

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::{Agent, SandboxProfile, Session, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, wait_for_object};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::{
    Api,
    api::{ListParams, LogParams, PostParams},
};
use serde_json::{Value, json};

use super::{RECORDS, SYSTEM, TIMEOUT, TOOLS_NAMESPACE};

/// The hostile Session's name.
pub const SESSION: &str = "hostile-capability";
/// The control's name for the capability pod's address.
pub const CAPABILITY_TARGET: &str = "capability_pod";
/// The record store's client ports (PD, and TiKV in the same pod here), which only the gateway
/// reaches.
const STORE_TARGET: &str = "record_store";
const STORE_KV_TARGET: &str = "record_store_kv";
/// The addresses the probe tries, by name.
pub type Targets = BTreeMap<String, String>;

/// The addresses a hostile capability would like to reach: the tool service's pod, the gateway's
/// pod and Service, the record store, the API server, the kubelet and a port-53 listener that
/// is not the cluster DNS.
pub async fn targets(env: &'static TestEnv, image: &str) -> Result<(Targets, String)> {
    let exfil = exfil_listener(env, image).await?;
    let ip_of = |namespace: &str, selector: &str| {
        let pods: Api<Pod> = Api::namespaced(env.client(), namespace);
        let selector = selector.to_owned();
        async move {
            pods.list(&ListParams::default().labels(&selector))
                .await?
                .items
                .into_iter()
                .find_map(|p| p.status?.pod_ip)
                .with_context(|| format!("no pod with an address matches {selector}"))
        }
    };
    let tools = ip_of(TOOLS_NAMESPACE, "app=ops-tools").await?;
    let gateway = ip_of(SYSTEM, "app.kubernetes.io/name=contextos-gateway").await?;
    let store = ip_of(RECORDS, "app.kubernetes.io/name=pd").await?;
    let gateway_service = Api::<Service>::namespaced(env.client(), SYSTEM)
        .get("contextos-gateway")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the gateway Service has no cluster IP")?;
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(env.client())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .flat_map(|n| n.status.and_then(|s| s.addresses).unwrap_or_default())
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .context("the node has no InternalIP")?;
    let record_api = format!("{gateway}:8480");
    let targets = Targets::from([
        ("tool_service".into(), format!("{tools}:8080")),
        ("gateway_pod".into(), record_api.clone()),
        ("gateway_service".into(), format!("{gateway_service}:8480")),
        (STORE_TARGET.into(), format!("{store}:2379")),
        (STORE_KV_TARGET.into(), format!("{store}:20160")),
        ("api_server".into(), "10.0.0.1:443".into()),
        ("port_53_elsewhere".into(), format!("{exfil}:53")),
        ("kubelet".into(), format!("{node}:10250")),
    ]);
    Ok((targets, record_api))
}

/// A listener on port 53 that is not the cluster DNS (an exfiltration path if DNS egress were
/// open to every address): the ops tools service on TCP 53, in the tools' namespace. Its
/// address.
async fn exfil_listener(env: &'static TestEnv, image: &str) -> Result<String> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "exfil-53", "labels": {"app": "exfil-53"}},
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}],
            },
            "containers": [{
                "name": "listener",
                "image": image,
                "command": ["ops_tools", "--in-pod", "--listen", "0.0.0.0:53", "--hmac-key", "unused"],
                "readinessProbe": {"tcpSocket": {"port": 53}, "periodSeconds": 1},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(env.client(), TOOLS_NAMESPACE);
    pods.create(&PostParams::default(), &pod).await?;
    let ready = wait_for_object(&pods, "exfil-53", "Ready", TIMEOUT, |p: &Pod| {
        let status = p.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Check::when(ready && status.pod_ip.is_some(), || format!("{:?}", status.phase))
    })
    .await?;
    ready
        .status
        .and_then(|s| s.pod_ip)
        .context("the port-53 listener has no address")
}

/// The probe's arguments.
fn arguments(targets: &Targets, record_api: &str) -> Value {
    json!({"targets": targets, "recordApi": record_api})
}

/// Starts the hostile Agent's Session, built from the installed quickstart: its profile now lets
/// `probe_*` tools execute code (read-only risk at most) with no egress at all.
pub async fn start(tenant: &TestNamespace, targets: &Targets, record_api: &str) -> Result<()> {
    let profiles: Api<SandboxProfile> = tenant.api();
    let mut spec = serde_json::to_value(profiles.get("restricted-runner").await?)?["spec"].take();
    spec["execution"] = json!({"allowedTools": ["probe_*"], "maxRisk": "read_only"});
    spec["egress"] = json!([]);
    let profile = json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "SandboxProfile",
        "metadata": {"name": "capability-sandbox"},
        "spec": spec,
    });
    create::<SandboxProfile>(tenant, &profile).await?;
    // The probe, then a call that waits for a human: the Session (and its capability pod) stays
    // up until the test cancels it.
    let script = json!({"turns": [
        {"content": "Probing.", "toolCalls": [{"tool": "probe_sandbox", "arguments": arguments(targets, record_api)}]},
        {"content": "Restarting.", "toolCalls": [{"tool": "restart_deployment", "arguments": {"namespace": "shop", "deployment": "checkout-api"}}]},
        {"content": "Probed."},
    ]});
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "hostile-script"},
        "data": {"script.json": script.to_string()},
    }))?;
    tenant
        .api::<ConfigMap>()
        .create(&PostParams::default(), &config_map)
        .await?;
    let agents: Api<Agent> = tenant.api();
    let mut agent = serde_json::to_value(agents.get("oncall-assistant").await?)?;
    let mut spec = agent["spec"].take();
    spec["sandboxProfileRef"] = json!({"name": "capability-sandbox"});
    spec["model"]["scriptRef"]["name"] = json!("hostile-script");
    spec["validators"] = json!([]);
    let mut tools = spec["tools"].as_array().cloned().unwrap_or_default();
    tools.push(contextos_kind_tests::operator_env::capability_probe_tool());
    spec["tools"] = json!(tools);
    create::<Agent>(
        tenant,
        &json!({"apiVersion": "contextos.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "hostile-agent"}, "spec": spec}),
    )
    .await?;
    let sessions: Api<Session> = tenant.api();
    let mut session = serde_json::to_value(sessions.get("checkout-5xx").await?)?;
    let mut spec = session["spec"].take();
    spec["agentRef"] = json!({"name": "hostile-agent"});
    spec["approvals"] = json!([]);
    create::<Session>(
        tenant,
        &json!({"apiVersion": "contextos.dev/v1alpha1", "kind": "Session", "metadata": {"name": SESSION}, "spec": spec}),
    )
    .await
}

async fn create<K>(tenant: &TestNamespace, object: &Value) -> Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object.clone())?;
    tenant
        .api::<K>()
        .create(&PostParams::default(), &typed)
        .await
        .with_context(|| format!("creating {}", K::kind(&())))?;
    Ok(())
}

fn capability_selector() -> String {
    format!("contextos.dev/session={SESSION},contextos.dev/role=capability")
}

/// The Session's capability pod, once running: it holds no token, Secret or environment. Its
/// address (the bridge's port), for the control to try.
pub async fn capability_pod(tenant: &TestNamespace) -> Result<String> {
    let pods: Api<Pod> = tenant.api();
    let mut seen = None;
    for _ in 0..240 {
        let running = pods
            .list(&ListParams::default().labels(&capability_selector()))
            .await?
            .items
            .into_iter()
            .find(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
            });
        if let Some(pod) = running {
            seen = Some(pod);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pod = seen.context("no capability pod was running for the hostile Session within 120 s")?;
    let spec = pod.spec.clone().unwrap_or_default();
    ensure!(
        spec.automount_service_account_token == Some(false),
        "the capability pod mounts a service-account token"
    );
    for volume in spec.volumes.iter().flatten() {
        ensure!(
            volume.empty_dir.is_some(),
            "the capability pod mounts {volume:?}; only scratch space is allowed"
        );
    }
    ensure!(
        spec.containers
            .iter()
            .all(|c| c.env.is_none() && c.env_from.is_none()),
        "the capability pod has environment from its spec"
    );
    let ip = pod.status.and_then(|s| s.pod_ip).context("address")?;
    Ok(format!("{ip}:{}", contextos_runner::capability::PORT))
}

/// Cancels the Session (waiting for approval); its capability pod is deleted with it.
pub async fn cancel(tenant: &TestNamespace, sessions: &Api<Session>) -> Result<()> {
    sessions
        .patch(
            SESSION,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await?;
    super::phase(sessions, SESSION, SessionPhase::Cancelled).await?;
    let pods: Api<Pod> = tenant.api();
    // Deleted by the operator when the Session ended, and gone within its short grace period.
    for _ in 0..40 {
        if pods
            .list(&ListParams::default().labels(&capability_selector()))
            .await?
            .items
            .is_empty()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the capability pod outlived its Session by 20 s")
}

/// The same probe in a plain pod of the tenant: its report.
pub async fn control(
    tenant: &TestNamespace,
    image: &str,
    targets: &Targets,
    record_api: &str,
) -> Result<Value> {
    let pod: Pod = serde_json::from_value(json!({
        // Labelled as an A2A caller (the gateway's policy lets it knock; a runner label would put
        // it under the namespace's runner policy) and as the gateway itself (which a tenant may
        // write on its own pods: the capability's policy must not care).
        "metadata": {"name": "hostile-control", "labels": {
            "contextos.dev/a2a-caller": "true",
            "app.kubernetes.io/name": "contextos-gateway",
        }},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe",
                "image": image,
                "command": ["hostile_mcp", "--probe", arguments(targets, record_api).to_string()],
                "env": [{"name": "RECORD_STORE", "value": "tikv://pd.contextos-records.svc:2379"}],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))?;
    let pods: Api<Pod> = tenant.api();
    pods.create(&PostParams::default(), &pod).await?;
    wait_for_object(&pods, "hostile-control", "Succeeded", TIMEOUT, |p: &Pod| {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        Check::when(phase == "Succeeded", || phase.clone())
    })
    .await?;
    let log = pods.logs("hostile-control", &LogParams::default()).await?;
    serde_json::from_str(log.trim()).with_context(|| format!("the control printed {log:?}"))
}

/// The probe's report in a run's exported record (JSON Lines): the result of `probe_sandbox`.
pub fn report_in(export: &str) -> Result<Value> {
    for line in export.lines() {
        let entry: Value = serde_json::from_str(line)?;
        if let Some(found) = find_report(&entry) {
            return Ok(found);
        }
    }
    bail!("no probe report in the record:\n{export}")
}

fn find_report(value: &Value) -> Option<Value> {
    match value {
        Value::Object(map) if map.contains_key("recordWrite") => Some(value.clone()),
        Value::Object(map) => map.values().find_map(find_report),
        Value::Array(items) => items.iter().find_map(find_report),
        Value::String(text) if text.contains("recordWrite") => serde_json::from_str::<Value>(text)
            .ok()
            .as_ref()
            .and_then(find_report),
        _ => None,
    }
}

/// The capability found nothing and reached nothing; the control found and reached everything
/// the probe looks for.
pub fn judge(capability: &Value, control: &Value) -> Result<()> {
    ensure!(
        control["files"].as_array().is_some_and(|f| f
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.ends_with("serviceaccount/token")))),
        "the control's probe did not find its mounted token: {control}"
    );
    ensure!(
        control["environment"]
            .as_array()
            .is_some_and(|e| e.contains(&json!("RECORD_STORE"))),
        "the control's probe did not find the store address in its environment: {control}"
    );
    let reached = control["reached"].as_object().context("reached")?;
    // Only the gateway's pods get into a capability pod or the record store, however a tenant's
    // pod is labelled.
    let gateway_only = [CAPABILITY_TARGET, STORE_TARGET, STORE_KV_TARGET];
    for (target, open) in reached {
        ensure!(
            gateway_only.contains(&target.as_str()) || open == &json!(true),
            "the control did not reach {target}, so the probe proves nothing there: {control}"
        );
    }
    for target in gateway_only {
        ensure!(
            control["reached"][target] == json!(false),
            "a tenant's pod labelled as the gateway reached {target}: {control}"
        );
    }
    ensure!(
        control["recordWrite"]
            .as_str()
            .is_some_and(|s| s.starts_with("HTTP/1.") && s.contains("401")),
        "the gateway should answer the control's forged append with 401: {control}"
    );

    ensure!(
        capability["environment"] == json!([]) && capability["files"] == json!([]),
        "the capability found credentials: {capability}"
    );
    let reached = capability["reached"].as_object().context("reached")?;
    ensure!(reached.len() == 8, "the capability's probe tried {reached:?}");
    for (target, open) in reached {
        ensure!(
            open == &json!(false),
            "the capability reached {target}: {capability}"
        );
    }
    ensure!(
        capability["recordWrite"] == json!("unreachable"),
        "the capability reached the record API: {capability}"
    );
    Ok(())
}
