//! A fresh install, as a platform admin does it, on the real node: `kubectl apply -k
//! manifests/overlays/tikv --server-side` (the records in PD/TiKV, two gateway replicas), then the
//! quickstart (`examples/quickstart`, unchanged apart from the image pin) in a tenant namespace,
//! with the quickstart's tool service `ops-tools.shop-platform.svc` running as a pod behind its
//! Service and reached through the cluster DNS. The operator and the gateway run as the
//! manifests' Deployments, in pods; nothing is injected by the test.
//!
//! What the test changes in the manifests, all in a kustomization of its own:
//! - the images, pinned to the workspace's build;
//! - PD and TiKV: no PD or TiKV image can be had on this machine, so the `pd` StatefulSet runs
//!   one `tikv-testserver` (kind-tests/tikv-testserver: PD's and TiKV's real gRPC services over
//!   the TiKV project's mock store, in memory, in the same image) that serves PD on 2379 and
//!   TiKV on 20160 and names its pod's address to clients; `tikv` gets no replicas. Names,
//!   Services, labels, ports, the records NetworkPolicy and the gateway's `--store` stay as
//!   shipped.
//!
//! Its own test binary (its own control plane and node): the installed operator reconciles every
//! namespace, which would take over the objects of tests that run their own operator.
//!
//! Needs root. Without it the test is skipped with the reason, unless
//! `CONTEXTOS_REQUIRE_REALNODE=1` (CI) makes that a failure.

mod a2a;
mod hostile;
mod improvement;
mod memory;
mod traces;

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{
    Check, FIELD_MANAGER, TestEnv, TestNamespace,
    dump::namespace_report,
    env::repo_root,
    operator_env::tikv_testserver::TESTSERVER_ENV,
    real_node::{self, REQUIRE_ENV},
    wait_for_object,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::TokenRequest,
    core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount},
    rbac::v1::RoleBinding,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;

/// The repositories the manifests name; the test gives the workspace's image these names too.
const RUNNER_REPOSITORY: &str = "ghcr.io/contextos/runner";
const OPERATOR_REPOSITORY: &str = "ghcr.io/contextos/operator";
/// The webhook key the quickstart's `post_status_update` tool signs with.
const HMAC_KEY: &str = "install-test-webhook-key";
const SYSTEM: &str = "contextos-system";
/// The record store's namespace (PD and TiKV).
const RECORDS: &str = "contextos-records";
/// Where the quickstart's tools live (`ops-tools.shop-platform.svc`).
const TOOLS_NAMESPACE: &str = "shop-platform";
/// Start-up of both Deployments, and each Session phase (a replay Job runs first).
const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_fresh_install_from_the_manifests_runs_the_quickstart_through_the_gateway_service() -> Result<()> {
    if let Some(why) = real_node::unavailable() {
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            bail!("{REQUIRE_ENV}=1 but {why}");
        }
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let env = TestEnv::real_node().await?;
    let node = env.real().context("real node")?;
    let runner_image = node.name_image(env.runner_image(), RUNNER_REPOSITORY)?;
    // The trace backend, where pods reach this machine (see traces.rs).
    let jaeger = traces::jaeger::Jaeger::start(&real_node::NODE_IP.to_string()).with_context(|| {
        format!(
            "{} is not set: `make kind-tests` builds Jaeger with runner/tests/support/jaeger.sh",
            traces::jaeger::JAEGER_ENV
        )
    })?;
    let exporting = traces::exporting_to(&jaeger);
    let exporting_yaml: String = exporting
        .iter()
        .map(|(name, value)| format!("{{name: {name}, value: \"{value}\"}}, "))
        .collect();
    let operator_image = node.name_image(env.runner_image(), OPERATOR_REPOSITORY)?;

    ensure!(
        std::env::var_os(TESTSERVER_ENV).is_some(),
        "{TESTSERVER_ENV} is not set: the install's stand-in for PD and TiKV is packed from it \
         (`make kind-tests` builds it with kind-tests/tikv-testserver/build.sh)"
    );

    let install = node.dir().join("install");
    write_kustomization(
        &install.join("manifests"),
        &format!(
            r#"resources: [{manifests}]
images:
  - {{name: {RUNNER_REPOSITORY}, digest: {runner_digest}}}
  - {{name: {OPERATOR_REPOSITORY}, digest: {operator_digest}}}
  - {{name: pingcap/pd, newName: {RUNNER_REPOSITORY}, digest: {runner_digest}}}
  - {{name: pingcap/tikv, newName: {RUNNER_REPOSITORY}, digest: {runner_digest}}}
patches:
  # One tikv-testserver in the place of PD and TiKV (see the module's comment).
  - target: {{kind: StatefulSet, name: pd}}
    patch: |-
      - op: replace
        path: /spec/replicas
        value: 1
      - op: replace
        path: /spec/template/spec/containers/0/command
        value: [tikv-testserver, -listen, 0.0.0.0, -pd-port, "2379", -kv-port, "20160", -advertise, $(POD_IP)]
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
      - op: replace
        path: /spec/template/spec/containers/0/readinessProbe
        value: {{tcpSocket: {{port: 2379}}, periodSeconds: 1}}
      - op: replace
        path: /spec/template/spec/containers/0/resources
        value: {{requests: {{cpu: 50m, memory: 64Mi}}}}
      - op: remove
        path: /spec/template/spec/containers/0/volumeMounts
      - op: remove
        path: /spec/volumeClaimTemplates
  - target: {{kind: StatefulSet, name: tikv}}
    patch: |-
      - op: replace
        path: /spec/replicas
        value: 0
    # Replay Jobs run the runner image, which the operator names by flag or environment.
  - target: {{kind: Deployment, name: contextos-operator}}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: CONTEXTOS_REPLAY_IMAGE, value: "{runner_image}"}}
  # Traces to the test's Jaeger, as an admin points them at a collector.
  - target: {{kind: Deployment, name: contextos-operator}}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: "{otlp}"}}
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: OTEL_BSP_SCHEDULE_DELAY, value: "200"}}
  - target: {{kind: Deployment, name: contextos-gateway}}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env
        value: [{exporting_yaml}]
"#,
            manifests = relative(
                &install.join("manifests"),
                &repo_root().join("manifests/overlays/tikv")
            ),
            runner_digest = digest(&runner_image)?,
            operator_digest = digest(&operator_image)?,
            otlp = jaeger.otlp,
        ),
    )?;
    kubectl(env, &["apply", "--server-side", "-k"], &install.join("manifests")).await?;
    // The record store first: the gateway's replicas wait for it.
    let store = Api::<Pod>::namespaced(env.client(), RECORDS);
    if let Err(err) = pod_ready(&store, "pd-0").await {
        bail!("{err:#}\n{}", namespace_report(env, RECORDS).await);
    }
    let system = Api::<Deployment>::namespaced(env.client(), SYSTEM);
    for name in ["contextos-gateway", "contextos-operator"] {
        available(env, &system, name).await?;
    }
    fairness_is_in_force(env).await?;

    // The quickstart's tool service, under the name the quickstart gives it (this test binary
    // has the cluster to itself).
    let namespaces = Api::<Namespace>::all(env.client());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": TOOLS_NAMESPACE}}))?,
        )
        .await?;
    start_ops_tools(env, TOOLS_NAMESPACE, &runner_image, &exporting).await?;

    let tenant = TestNamespace::with_labels(
        env,
        "install-tenant",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    write_kustomization(
        &install.join("quickstart"),
        &format!(
            r#"resources: [{quickstart}]
namespace: {namespace}
patches:
  - target: {{kind: SandboxProfile, name: restricted-runner}}
    patch: |-
      - op: replace
        path: /spec/image
        value: "{runner_image}"
"#,
            quickstart = relative(
                &install.join("quickstart"),
                &repo_root().join("examples/quickstart")
            ),
            namespace = tenant.name(),
        ),
    )?;
    webhook_secret(&tenant).await?;
    // The cluster prices models before the quickstart runs: its scripted model's turns are
    // costed at the price its runs pin.
    kubectl(
        env,
        &["apply", "--server-side", "-f"],
        &repo_root().join("examples/pricing/pricelist.yaml"),
    )
    .await?;
    kubectl(
        env,
        &["apply", "--server-side", "-k"],
        &install.join("quickstart"),
    )
    .await?;

    let sessions: Api<Session> = tenant.api();

    // A hostile capability next to it, in the same tenant (see hostile.rs).
    let (targets, record_api) = hostile::targets(env, &runner_image).await?;
    hostile::start(&tenant, &targets, &record_api).await?;
    let control = async {
        let capability = hostile::capability_pod(&tenant).await?;
        phase(&sessions, hostile::SESSION, SessionPhase::AwaitingApproval).await?;
        let mut targets = targets.clone();
        targets.insert(hostile::CAPABILITY_TARGET.into(), capability);
        let control = hostile::control(&tenant, &runner_image, &targets, &record_api).await?;
        hostile::cancel(&tenant, &sessions).await?;
        anyhow::Ok(control)
    };
    let control = match control.await {
        Ok(control) => control,
        Err(err) => bail!("{err:#}\n{}", reports(env, &tenant).await),
    };

    let paused = match phase(&sessions, "checkout-5xx", SessionPhase::AwaitingApproval).await {
        Ok(paused) => paused,
        Err(err) => bail!("{err:#}\n{}", reports(env, &tenant).await),
    };
    let pending = paused
        .status
        .and_then(|s| s.pending_approval)
        .context("AwaitingApproval shows the pending call")?;
    // The on-call engineer approves in their own name, with the tenant role the admin gave them.
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "oncall-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-tenant-edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "sre-oncall"}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let approval = json!({"spec": {"approvals": [{
        "callHash": pending.call_hash,
        "decision": "approve",
        "approver": "dana@example.com",
    }]}});
    let output = env
        .kubectl()
        .args([
            "patch",
            "sessions.contextos.dev",
            "checkout-5xx",
            "-n",
            tenant.name(),
            "--type=merge",
        ])
        .args([
            "--as",
            "dana@example.com",
            "--as-group",
            "sre-oncall",
            "-p",
            &approval.to_string(),
        ])
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "the on-call engineer's approval was refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let done = match phase(&sessions, "checkout-5xx", SessionPhase::Succeeded).await {
        Ok(done) => done,
        Err(err) => bail!("{err:#}\n{}", reports(env, &tenant).await),
    };
    let output = done.status.clone().and_then(|s| s.output).unwrap_or_default();
    ensure!(output.contains("checkout-api"), "output {output:?}");
    gateway_reads_secrets_only_where_agents_are(env, &tenant).await?;
    traces::one_trace_per_session(jaeger, &done).await?;

    // The runner pods held nothing that acts outside their run: no Secret (as a volume, in a
    // projected volume, or as environment), no host path or CSI volume, no store address; they
    // named the gateway Service.
    let mut inspected = 0;
    for pod in tenant.api::<Pod>().list(&Default::default()).await?.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if !name.starts_with("checkout-5xx-run-") {
            continue;
        }
        inspected += 1;
        let spec = pod.spec.clone().unwrap_or_default();
        for volume in spec.volumes.iter().flatten() {
            let projected_secret = volume
                .projected
                .as_ref()
                .is_some_and(|p| p.sources.iter().flatten().any(|s| s.secret.is_some()));
            ensure!(
                volume.secret.is_none()
                    && volume.host_path.is_none()
                    && volume.csi.is_none()
                    && !projected_secret,
                "{name}: volume {volume:?}"
            );
        }
        let rendered = serde_json::to_string(&spec)?;
        for needle in ["secretKeyRef", "secretRef", "tikv://", ":2379"] {
            ensure!(
                !rendered.contains(needle),
                "{name}: the spec holds {needle}: {rendered}"
            );
        }
        ensure!(
            rendered.contains("contextos-gateway.contextos-system.svc"),
            "{name}: the runner does not name the gateway Service: {rendered}"
        );
    }
    ensure!(
        inspected >= 2,
        "expected the two attempts' runner pods, found {inspected}"
    );

    let run_id = done_run_id(&sessions, "checkout-5xx").await?;
    let hostile_run = done_run_id(&sessions, hostile::SESSION).await?;
    let export = verify_through_the_gateway(env, &tenant, &run_id, &hostile_run).await?;
    let capability = hostile::report_in(&export)?;
    eprintln!("the capability's report: {capability}\nthe control's: {control}");
    hostile::judge(&capability, &control)?;
    unpriced_model_is_refused(&tenant).await?;
    a2a::called_through_the_installed_gateway(env, &tenant).await?;
    tenant.pass();
    memory::remembered_across_sessions(env, &install, &runner_image).await?;
    improvement::proposals_through_the_gate(env, &install, &runner_image).await
}

/// The API server took ContextOS's fairness configuration: both FlowSchemas name a priority
/// level it has (it says so in their `Dangling` condition).
async fn fairness_is_in_force(env: &TestEnv) -> Result<()> {
    let mut last = String::new();
    for _ in 0..30 {
        let mut dangling = Vec::new();
        for name in ["contextos", "contextos-leader-election"] {
            let output = env
                .kubectl()
                .args(["get", "flowschema", name, "-o", "json"])
                .output()
                .await?;
            let schema: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
            let settled = schema["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Dangling" && c["status"] == "False");
            if !settled {
                dangling.push(format!("{name}: {}", schema["status"]));
            }
        }
        if dangling.is_empty() {
            return Ok(());
        }
        last = dangling.join("; ");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("ContextOS's FlowSchemas are not in force after 30 s: {last}")
}

/// The gateway replicas' metrics listeners count the quickstart's turns and spend, and its
/// priced tool calls' spend (summed over the replicas, as Prometheus would).
async fn spend_in_the_gateways_metrics(env: &TestEnv, tenant: &TestNamespace) -> Result<()> {
    let pods = Api::<Pod>::namespaced(env.client(), SYSTEM)
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=contextos-gateway"))
        .await?;
    let (mut turns, mut spend, mut searches) = (0u64, 0f64, 0f64);
    let labels = format!(
        "tenant=\"{}\",agent=\"oncall-assistant\",model=\"quickstart-script\"",
        tenant.name()
    );
    let search = format!(
        "tenant=\"{}\",agent=\"oncall-assistant\",tool=\"search_runbooks\"",
        tenant.name()
    );
    for pod in pods.items {
        let name = format!("pod/{}", pod.metadata.name.unwrap_or_default());
        let (mut forward, local) = port_forward(env, &name, 9090).await?;
        let text = http_get(&local, "/metrics").await?;
        let _ = forward.kill().await;
        let value = |metric: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(metric)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        turns += value(&format!("contextos_model_turns_total{{{labels}}}")) as u64;
        spend += value(&format!(
            "contextos_model_spend_total{{{labels},currency=\"USD\"}}"
        ));
        // The runbook search is priced per call by the example PriceList's `tools`.
        searches += value(&format!(
            "contextos_tool_spend_total{{{search},currency=\"USD\"}}"
        ));
    }
    ensure!(
        turns >= 5 && spend > 0.0 && searches >= 0.002,
        "the gateways counted {turns} quickstart turns costing {spend} USD, and runbook searches costing {searches} USD"
    );
    Ok(())
}

/// Once the cluster prices models, an Agent whose model no PriceList prices is not Ready (and
/// stalled: a person must price it), naming the model; its calls are never free.
async fn unpriced_model_is_refused(tenant: &TestNamespace) -> Result<()> {
    let agents: Api<contextos_crds::Agent> = tenant.api();
    let mut agent = serde_json::to_value(agents.get("oncall-assistant").await?)?;
    agent["metadata"] = json!({"name": "unpriced"});
    agent["status"] = serde_json::Value::Null;
    agent["spec"]["model"] = json!({
        "provider": "openai_compatible",
        "endpoint": "https://models.example/v1",
        "model": "gpt-unpriced",
    });
    agents
        .create(&PostParams::default(), &serde_json::from_value(agent)?)
        .await?;
    let refused = wait_for_object(
        &agents,
        "unpriced",
        "Ready=False with reason PriceMissing",
        Duration::from_secs(60),
        |a: &contextos_crds::Agent| {
            let conditions = a.status.clone().unwrap_or_default().conditions;
            Check::when(
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "PriceMissing"),
                || format!("{conditions:?}"),
            )
        },
    )
    .await?;
    let conditions = refused.status.unwrap_or_default().conditions;
    let ready = conditions.iter().find(|c| c.type_ == "Ready").context("Ready")?;
    ensure!(
        ready
            .message
            .contains("spec.model: no PriceList prices model \"gpt-unpriced\"")
            && ready.message.contains("models-usd")
            && conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True"),
        "{conditions:?}"
    );
    Ok(())
}

/// The quickstart's tool webhook key, as the tenant's Secret the Agent names.
async fn webhook_secret(tenant: &TestNamespace) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ops-tools-webhook", "labels": {"contextos.dev/agent-secret": "true"}},
        "stringData": {"hmac-key": HMAC_KEY},
    }))?;
    tenant
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// The gateway read the webhook's key (the run's calls were signed with it) through the binding
/// the operator made in the tenant's namespace; it may read no Secret where no Agent is, nor the
/// operator's signing key.
async fn gateway_reads_secrets_only_where_agents_are(env: &TestEnv, tenant: &TestNamespace) -> Result<()> {
    let gateway = format!("system:serviceaccount:{SYSTEM}:contextos-gateway");
    let checks: [(&str, &str, bool); 4] = [
        ("secrets/ops-tools-webhook", tenant.name(), true),
        ("secrets", TOOLS_NAMESPACE, false),
        ("secrets", "kube-system", false),
        ("secrets/contextos-signing-key", SYSTEM, false),
    ];
    for (resource, namespace, allowed) in checks {
        let answer = env
            .kubectl()
            .args([
                "auth", "can-i", "get", resource, "-n", namespace, "--as", &gateway,
            ])
            .output()
            .await?;
        let yes = String::from_utf8_lossy(&answer.stdout).trim() == "yes";
        ensure!(
            yes == allowed,
            "the gateway {} get {resource} in {namespace}",
            if yes { "may" } else { "may not" }
        );
    }
    Ok(())
}

async fn done_run_id(sessions: &Api<Session>, name: &str) -> Result<String> {
    sessions
        .get(name)
        .await?
        .status
        .and_then(|s| s.run_id)
        .context("the finished Session names its run")
}

/// An auditor verifies the run with their own identity — a service account of their own
/// namespace, with a token minted for the readers' audience (`kubectl create token auditor
/// --audience contextos-records`) — through `kubectl port-forward` to the gateway Service and the
/// key the gateway publishes: refused until an admin binds `contextos-records-reader` in the
/// tenant's namespace, then OK; never for another namespace; and a token for the runners'
/// audience is no reader's, even bound; then records consent (see
/// [`record_consent_through_the_gateway`]). Returns `export`'s record, exported by the auditor.
async fn verify_through_the_gateway(
    env: &'static TestEnv,
    tenant: &TestNamespace,
    run_id: &str,
    export: &str,
) -> Result<String> {
    let audit = TestNamespace::new(env, "audit").await?;
    let accounts = audit.api::<ServiceAccount>();
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "auditor"}}))?;
    accounts.create(&PostParams::default(), &account).await?;
    let token_for = |audience: &'static str| {
        let accounts = accounts.clone();
        async move {
            let request: TokenRequest =
                serde_json::from_value(json!({"spec": {"audiences": [audience], "expirationSeconds": 600}}))?;
            accounts
                .create_token_request("auditor", &PostParams::default(), &request)
                .await?
                .status
                .and_then(|s| s.token)
                .context("the token request returned no token")
        }
    };
    let token = token_for(contextos_runner::gateway::readers::READER_AUDIENCE).await?;
    // A token for the runners' audience is a node's only (admission policy
    // contextos-gateway-tokens refuses it to the admin this test acts as), so it is minted as one.
    let runner_audience = env
        .kubectl()
        .args([
            "create",
            "token",
            "auditor",
            "-n",
            audit.name(),
            "--duration",
            "10m",
        ])
        .args([
            "--audience",
            contextos_runner::gateway::identity::GATEWAY_AUDIENCE,
        ])
        .args(contextos_kind_tests::AS_A_NODE)
        .output()
        .await?;
    ensure!(
        runner_audience.status.success(),
        "kubectl create token as a node: {}",
        said(&runner_audience)
    );
    let runner_audience = String::from_utf8_lossy(&runner_audience.stdout).trim().to_owned();

    let (mut forward, local) = gateway_port_forward(env).await?;
    let published = http_get(&local, &format!("/v1/tenants/{}/record-key", tenant.name())).await?;
    let published: serde_json::Value = serde_json::from_str(&published)?;
    let key = published["publicKey"].as_str().context("publicKey")?.to_owned();
    let store = format!("gateway+http://{local}");
    let records =
        |token: &str, args: &[&str], namespace: &str| as_person("records", args, &store, namespace, token);
    let refused = records(&token, &["verify", run_id, "--public-key", &key], tenant.name())
        .output()
        .await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("sessions/records"),
        "without a binding the auditor is refused, naming the permission: {}",
        said(&refused)
    );
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "auditor-records"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-records-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "auditor", "namespace": audit.name()}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    // The gateway remembers an access review for 10 s.
    let mut verified = None;
    for _ in 0..30 {
        let output = records(&token, &["verify", run_id, "--public-key", &key], tenant.name())
            .output()
            .await?;
        if output.status.success() {
            verified = Some(String::from_utf8_lossy(&output.stdout).into_owned());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let verified = verified.context("the bound auditor could not verify the run within 30 s")?;
    ensure!(verified.contains(&format!("run {run_id}: OK")), "{verified}");
    // Another namespace: the listing itself is refused.
    let elsewhere = records(&token, &["list"], TOOLS_NAMESPACE).output().await?;
    ensure!(
        !elsewhere.status.success() && said(&elsewhere).contains("sessions/records"),
        "the auditor listed another namespace's records: {}",
        said(&elsewhere)
    );
    let as_runner = records(&runner_audience, &["list"], tenant.name())
        .output()
        .await?;
    ensure!(
        !as_runner.status.success() && said(&as_runner).contains("unauthenticated"),
        "a token for the runners' audience read records: {}",
        said(&as_runner)
    );
    let exported = records(&token, &["export", export], tenant.name())
        .output()
        .await?;
    ensure!(
        exported.status.success(),
        "the auditor could not export run {export}: {}",
        said(&exported)
    );
    // What recurs in the namespace's records, read by the same auditor through the gateway:
    // the quickstart's denied namespace deletion, pointing at a run that asked for it.
    let insights = as_person(
        "insights",
        &["--since", "1d", "--min-runs", "1", "--format", "json"],
        &store,
        tenant.name(),
        &token,
    )
    .output()
    .await?;
    ensure!(
        insights.status.success(),
        "the auditor could not read insights: {}",
        said(&insights)
    );
    let report: serde_json::Value = serde_json::from_slice(&insights.stdout)?;
    let denial = report["insights"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|i| i["kind"] == "repeated-denial" && i["about"] == "delete_namespace")
        })
        .with_context(|| format!("no insight on the denied namespace deletion: {report}"))?;
    let cited = denial["evidence"][0]["runId"].as_str().unwrap_or_default();
    ensure!(
        cited == run_id || cited == export,
        "the denial's evidence names run {cited:?}, not a quickstart run"
    );
    // What the namespace's models cost, read by the same auditor through the gateway: every
    // turn priced at the PriceList the runs pinned.
    let cost = as_person(
        "cost",
        &["--since", "1d", "--by", "model", "--format", "json"],
        &store,
        tenant.name(),
        &token,
    )
    .output()
    .await?;
    ensure!(
        cost.status.success(),
        "the auditor could not read spend: {}",
        said(&cost)
    );
    let cost: serde_json::Value = serde_json::from_slice(&cost.stdout)?;
    let quickstart = &cost["groups"]["quickstart-script"];
    ensure!(
        quickstart["turns"].as_u64().unwrap_or(0) >= 5
            && quickstart["costNanos"]["USD"].as_u64().unwrap_or(0) > 0
            && quickstart["unpricedTokens"] == 0,
        "the quickstart's spend: {cost:#}"
    );
    spend_in_the_gateways_metrics(env, tenant).await?;
    record_consent_through_the_gateway(tenant, &audit, &store, &token).await?;
    let _ = forward.kill().await;
    audit.pass();
    Ok(String::from_utf8_lossy(&exported.stdout).into_owned())
}

/// `kubectl port-forward` to the gateway Service, as a person reaches it from their machine: the
/// process (killed on drop) and the local address.
async fn gateway_port_forward(env: &TestEnv) -> Result<(tokio::process::Child, String)> {
    port_forward(env, "service/contextos-gateway", 8480).await
}

/// `kubectl port-forward` to `target`'s `port` in the system namespace: the process (killed on
/// drop) and the local address.
async fn port_forward(env: &TestEnv, target: &str, port: u16) -> Result<(tokio::process::Child, String)> {
    let mut forward = env
        .kubectl()
        .args(["port-forward", "-n", SYSTEM, target, &format!(":{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = forward.stdout.take().context("port-forward stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("port-forward did not start within 30 s")??
        .context("port-forward ended")?;
    // "Forwarding from 127.0.0.1:PORT -> 8480"
    let local = line
        .split_whitespace()
        .nth(2)
        .filter(|a| a.starts_with("127.0.0.1:"))
        .with_context(|| format!("port-forward said {line:?}"))?
        .to_owned();
    // It says "Handling connection for …" on every connection: its output is read to the end, or
    // it fails writing and drops the connection.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((forward, local))
}

/// The same auditor records a subject's consent through the gateway: refused while they may only
/// read records, then — once an admin binds `contextos-consent-keeper` — recorded in their own
/// authenticated name (a `--by` is refused), and shown back as a verified chain; and lists and
/// forgets the subject's memory once bound to `contextos-memory-keeper`, not before.
async fn record_consent_through_the_gateway(
    tenant: &TestNamespace,
    audit: &TestNamespace,
    store: &str,
    token: &str,
) -> Result<()> {
    let consent = |args: &[&str]| as_person("consent", args, store, tenant.name(), token);
    let grant = [
        "grant",
        "--subject",
        "subj:7f3a",
        "--purpose",
        "incident-follow-up",
        "--categories",
        "phone",
        "--evidence",
        "PRIV-1042",
    ];
    let refused = consent(&grant).output().await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("`create` on consents"),
        "a records reader recorded consent, or was refused without naming the permission: {}",
        said(&refused)
    );
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "auditor-consent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-consent-keeper"},
        "subjects": [{"kind": "ServiceAccount", "name": "auditor", "namespace": audit.name()}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let claimed = consent(&[&grant[..], &["--by", "someone-else"]].concat())
        .output()
        .await?;
    ensure!(
        !claimed.status.success() && said(&claimed).contains("records who you are"),
        "a consent record claimed its author: {}",
        said(&claimed)
    );
    // The gateway remembers an access review for 10 s.
    let mut granted = None;
    for _ in 0..30 {
        let output = consent(&grant).output().await?;
        if output.status.success() {
            granted = Some(said(&output));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let granted = granted.context("the bound auditor could not record consent within 30 s")?;
    ensure!(
        granted.starts_with("granted: subject subj:7f3a link 0 "),
        "{granted}"
    );
    // Shown with the namespace's key checked against the certifier the gateway published
    // through the API server; a key some other certifier vouches for is not believed.
    let certifier = Api::<ConfigMap>::namespaced(tenant.env().client(), SYSTEM)
        .get("contextos-gateway-keys")
        .await?
        .data
        .and_then(|data| data.get("record-certifier.pub").cloned())
        .context("the gateway published no record-key certifier")?;
    let shown = consent(&["show", "subj:7f3a", "--certifier", &certifier])
        .output()
        .await?;
    let author = format!("system:serviceaccount:{}:auditor", audit.name());
    ensure!(
        shown.status.success()
            && said(&shown).contains(&author)
            && said(&shown).contains("in force for incident-follow-up: phone")
            && said(&shown).contains("chain verified: 1 record,"),
        "the consent history does not show the grant in the auditor's name: {}",
        said(&shown)
    );
    let another = contextos_runner::keys::KeyPair::from_seed([7; 32])
        .public()
        .to_hex();
    let doubted = consent(&["show", "subj:7f3a", "--certifier", &another])
        .output()
        .await?;
    ensure!(
        !doubted.status.success() && said(&doubted).contains("is not vouched for by record-key certifier"),
        "a key another certifier does not vouch for was believed: {}",
        said(&doubted)
    );

    // Recording consent is not reading memory: listing a subject's items takes its own binding.
    let memory = |args: &[&str]| as_person("memory", args, store, tenant.name(), token);
    let list = ["list", "--scope", "subject:subj:7f3a"];
    let refused = memory(&list).output().await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("`get` on memories"),
        "the consent keeper listed memory, or was refused without naming the permission: {}",
        said(&refused)
    );
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "auditor-memory"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-memory-keeper"},
        "subjects": [{"kind": "ServiceAccount", "name": "auditor", "namespace": audit.name()}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let mut listed = None;
    for _ in 0..30 {
        let output = memory(&list).output().await?;
        if output.status.success() {
            listed = Some(said(&output));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let listed = listed.context("the bound auditor could not list memory within 30 s")?;
    ensure!(listed.contains("no items in scope subject:subj:7f3a"), "{listed}");
    let forgotten = memory(&["forget", "--scope", "subject:subj:7f3a"])
        .output()
        .await?;
    ensure!(
        forgotten.status.success() && said(&forgotten).contains("forgotten: 0 items"),
        "{}",
        said(&forgotten)
    );
    Ok(())
}

/// `contextos <command> <args>` through the gateway at `store` for `namespace`, as the person
/// whose token is `token`.
fn as_person(
    command: &str,
    args: &[&str],
    store: &str,
    namespace: &str,
    token: &str,
) -> tokio::process::Command {
    let mut process = tokio::process::Command::new(
        contextos_kind_tests::process_node::workspace_binary("contextos").expect("contextos binary"),
    );
    process
        .arg(command)
        .args(args)
        .args(["--store", store, "--tenant", namespace])
        .env("CONTEXTOS_TOKEN", token)
        .kill_on_drop(true);
    process
}

/// What a command printed, standard output then standard error.
fn said(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The body of `GET path` from `address` (HTTP/1.0, read to the end; bounded at 64 KiB).
async fn http_get(address: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    stream.take(64 << 10).read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP header")?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "GET {path}: {head}"
    );
    Ok(body.to_owned())
}

/// `sha256:…` of `REF@sha256:…`.
fn digest(reference: &str) -> Result<&str> {
    reference
        .rsplit_once('@')
        .map(|(_, digest)| digest)
        .with_context(|| format!("{reference} is not pinned by digest"))
}

/// `target` as a path relative to `from` (kustomize refuses absolute paths): up to the root,
/// then down. Both are absolute.
fn relative(from: &Path, target: &Path) -> String {
    let up = from
        .components()
        .skip(1)
        .map(|_| "..")
        .collect::<Vec<_>>()
        .join("/");
    format!("{up}{}", target.display())
}

fn write_kustomization(dir: &Path, body: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{body}"),
    )?;
    Ok(())
}

async fn kubectl(env: &TestEnv, args: &[&str], dir: &Path) -> Result<()> {
    let output = env.kubectl().args(args).arg(dir).output().await?;
    ensure!(
        output.status.success(),
        "kubectl {} {} failed: {}{}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

async fn available(env: &'static TestEnv, api: &Api<Deployment>, name: &str) -> Result<()> {
    let waited = wait_for_object(api, name, "available", TIMEOUT, |d: &Deployment| {
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
        Check::when(ready >= wanted, || {
            format!("{ready} of {wanted} replicas available")
        })
    })
    .await;
    if let Err(err) = waited {
        bail!("{err}\n{}", namespace_report(env, SYSTEM).await);
    }
    Ok(())
}

/// The quickstart's tool service: the `ops_tools` example (in the workspace's image) as a pod,
/// behind Service `ops-tools` on both ports the quickstart's tools name.
async fn start_ops_tools(
    env: &'static TestEnv,
    namespace: &str,
    image: &str,
    exporting: &[(&str, String)],
) -> Result<()> {
    let labels = json!({"app": "ops-tools"});
    let exporting: Vec<serde_json::Value> = exporting
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "ops-tools", "labels": labels},
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "ops-tools",
                "image": image,
                "command": ["ops_tools", "--in-pod", "--listen", "0.0.0.0:8080", "--hmac-key", HMAC_KEY],
                                "env": exporting,
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))?;
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ops-tools"},
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "http", "port": 8080, "targetPort": 8080},
                {"name": "mcp", "port": 8081, "targetPort": 8080},
            ],
        },
    });
    let pods: Api<Pod> = Api::namespaced(env.client(), namespace);
    pods.create(&PostParams::default(), &pod).await?;
    Api::<Service>::namespaced(env.client(), namespace)
        .patch(
            "ops-tools",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&service),
        )
        .await?;
    pod_ready(&pods, "ops-tools").await
}

async fn pod_ready(pods: &Api<Pod>, name: &str) -> Result<()> {
    wait_for_object(pods, name, "Ready", TIMEOUT, |p: &Pod| {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Check::when(ready, || {
            format!("{:?}", p.status.as_ref().and_then(|s| s.phase.clone()))
        })
    })
    .await?;
    Ok(())
}

async fn phase(api: &Api<Session>, name: &str, wanted: SessionPhase) -> Result<Session> {
    Ok(
        wait_for_object(api, name, &format!("phase {wanted:?}"), TIMEOUT, |s: &Session| {
            let status = s.status.clone().unwrap_or_default();
            Check::when(status.phase == Some(wanted), || {
                let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
                format!(
                    "phase {:?}, Ready: {}",
                    status.phase,
                    ready.map_or("none".into(), |c| format!(
                        "{} {} {}",
                        c.status, c.reason, c.message
                    ))
                )
            })
        })
        .await?,
    )
}

/// What a failure prints: the tenant, the tool service, the system and the store namespaces.
async fn reports(env: &TestEnv, tenant: &TestNamespace) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        namespace_report(env, tenant.name()).await,
        namespace_report(env, TOOLS_NAMESPACE).await,
        namespace_report(env, SYSTEM).await,
        namespace_report(env, RECORDS).await
    )
}
