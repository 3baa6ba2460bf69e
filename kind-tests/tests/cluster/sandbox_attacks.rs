//! Attacks from inside the tenant's namespace on the gateway service, with the API server's real
//! TokenReview: a pod the tenant runs itself (any code) that copies a runner's RunContext from
//! the runner pod's spec and presents it with its own projected token, that calls without a
//! token, that asks for records without a read grant. Each must be refused; the legitimate
//! runner's record must stay intact. And the runner pod itself carries no credential.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use contextos_runner::{
    records::{TenantId, store::tikv::TikvStore, verify_run},
    run::pod::{GATEWAY_ENV, RUN_CONTEXT_ENV},
};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;

use crate::{
    objects::apply,
    operator::{TIMEOUT, objects_for, phase_is, session},
};

/// What the hostile pod runs: three requests, their HTTP codes into its termination message.
/// busybox's `wget` (in the real node's busybox image and on the host the process node runs
/// pods on) prints the status line of a refused request; a request that succeeds prints `200`.
const PROBE: &str = r#"
code() {
  out=$(busybox wget -q -O /dev/null "$@" 2>&1) && { echo 200; return; }
  c=$(printf %s "$out" | sed -n 's/.*HTTP\/1\.[01] \([0-9][0-9][0-9]\).*/\1/p' | head -n1)
  echo "${c:-unreachable}"
}
tok="$(cat "${CONTEXTOS_ROOT:-}/var/run/secrets/contextos/gateway-token")"
ctx="$(printf %s "$STOLEN" | base64 -w0)"
copied=$(code --header "Authorization: Bearer $tok" --header "x-contextos-run-context: $ctx" "$GW/v1/run/head?run=$RUN")
anonymous=$(code --header "x-contextos-run-context: $ctx" "$GW/v1/run/head?run=$RUN")
records=$(code --header "Authorization: Bearer $tok" "$GW/v1/records/runs")
echo "copied=$copied anonymous=$anonymous records=$records" > "${CONTEXTOS_ROOT:-}/dev/termination-log"
"#;

#[tokio::test]
async fn a_tenants_own_pod_cannot_use_a_runners_context_or_read_records() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "sandbox-attacks").await?;
    let client = env.client();
    for object in objects_for(env, &op.tools_url)? {
        apply(&client, ns.name(), &object).await?;
    }
    apply(&client, ns.name(), &session("victim")?).await?;
    let sessions: Api<Session> = ns.api();
    let paused = phase_is(&sessions, "victim", SessionPhase::AwaitingApproval).await?;
    let run_id = paused.status.and_then(|s| s.run_id).context("runId")?;

    // The runner pod holds nothing but its bundle, its RunContext and a gateway token.
    let pods: Api<Pod> = ns.api();
    let runner = pods.get("victim-run-1").await?;
    let spec = runner.spec.clone().context("spec")?;
    ensure!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| v.secret.is_none() && v.host_path.is_none()),
        "the runner pod mounts a Secret or host path: {:?}",
        spec.volumes
    );
    let container = &spec.containers[0];
    let env_names: Vec<String> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
    ensure!(
        env_names
            .iter()
            .all(|n| !n.contains("STORE") && !n.contains("KEY") && !n.contains("SECRET")),
        "the runner's environment names a store, key or secret: {env_names:?}"
    );
    ensure!(
        container.env_from.is_none(),
        "the runner pod imports an env source"
    );
    let value_of = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let stolen = value_of(RUN_CONTEXT_ENV).context("the runner's RunContext")?;
    let gateway = value_of(GATEWAY_ENV).context("the gateway's address")?;

    // The tenant runs its own pod with a gateway-audience token and the copied RunContext.
    let attacker = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "attacker", "labels": {"contextos.dev/role": "runner"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "probe", "image": env.busybox_image(),
                "command": ["sh", "-c", PROBE],
                "env": [
                    {"name": "STOLEN", "value": stolen},
                    {"name": "GW", "value": gateway},
                    {"name": "RUN", "value": run_id},
                ],
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/contextos", "readOnly": true}],
            }],
            "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "contextos-gateway", "expirationSeconds": 600, "path": "gateway-token",
            }}]}}],
        },
    });
    apply(&client, ns.name(), &attacker).await?;
    let done = wait_for_object(&pods, "attacker", "the probe finished", TIMEOUT, |p: &Pod| {
        let message = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.message.clone());
        Check::when(message.is_some(), || {
            format!("{:?}", p.status.as_ref().and_then(|s| s.phase.clone()))
        })
    })
    .await?;
    let message = done
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.state)
        .and_then(|s| s.terminated)
        .and_then(|t| t.message)
        .unwrap_or_default();
    ensure!(
        message.trim() == "copied=403 anonymous=401 records=400",
        "the gateway answered the hostile pod: {message}"
    );

    // The victim's record is untouched and verifies with the tenant's key.
    let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
    let key = op.record_keys.for_tenant(ns.name()).public();
    verify_run(&store, &TenantId::new(ns.name())?, &run_id, &key).await?;
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_send_a_secret_that_was_not_given_to_agents() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "sandbox-secrets").await?;
    let client = env.client();
    for mut object in objects_for(env, &op.tools_url)? {
        // The webhook key is an ordinary Secret of the namespace, not labelled for Agents.
        if object["kind"] == "Secret" {
            object["metadata"]["labels"] = json!({});
        }
        apply(&client, ns.name(), &object).await?;
    }
    apply(&client, ns.name(), &session("leaky")?).await?;
    let sessions: Api<Session> = ns.api();
    let failed = phase_is(&sessions, "leaky", SessionPhase::Failed).await?;
    let ready = failed
        .status
        .map(|s| crate::operator::condition(&s.conditions, "Ready"))
        .unwrap_or_default();
    ensure!(
        ready.contains("GatewayRefused") && ready.contains("contextos.dev/agent-secret=true"),
        "the Session says which Secret and how to fix it: {ready}"
    );
    ns.pass();
    Ok(())
}
