//! Pod features the process node implements, checked the way a user of a real cluster would see
//! them: environment, volumes, restarts, deadlines, start errors, retries of missing config.
//! These tests always run on the process node (its own control plane when the other cluster tests
//! run on the real node), so the node that serves machines without root stays honest; against
//! `KUBECONFIG` they check the same behaviour of that cluster's kubelet. Tests named
//! `process_node_only_*` check process-node behaviour that differs from a real kubelet (a real
//! one pulls images) and are skipped against `KUBECONFIG`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, describe::pod_summary, wait_for_object};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, api::PostParams};
use serde_json::json;

use crate::workloads::{POD_TIMEOUT, phase, shell_pod, terminated, wait_for_phase};

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn waiting_reason(pod: &Pod) -> Option<&str> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

const ENV_SCRIPT: &str = r#"
echo "literal=$LITERAL"
echo "expanded=$EXPANDED"
echo "from-configmap=$MODE"
echo "from-secret=$TOKEN"
echo "pod=$POD_NAME ns-matches=$([ "$POD_NAMESPACE" = "$EXPECTED_NAMESPACE" ] && echo yes)"
echo "label=$APP_LABEL"
echo "ip-set=$([ -n "$POD_IP" ] && echo yes)"
echo "env-from=$CFG_MODE"
echo "optional=${OPTIONAL:-unset}"
echo "config-file=$(cat "${CONTEXTOS_ROOT:-}/etc/settings/greeting.txt")"
echo "secret-file=$(cat "${CONTEXTOS_ROOT:-}/etc/creds/token")"
echo "podinfo=$(cat "${CONTEXTOS_ROOT:-}/etc/podinfo/labels")"
echo scratch > "${CONTEXTOS_ROOT:-}/scratch/note" && echo "scratch=$(cat "${CONTEXTOS_ROOT:-}/scratch/note")"
echo "pwd=${PWD#"${CONTEXTOS_ROOT:-}"}"
"#;

/// A pod using every way a container gets configuration: env literals and expansion,
/// ConfigMap/Secret keys, downward-API fields, envFrom, and ConfigMap, Secret, downward-API and
/// emptyDir volumes, with a working directory inside a mount.
fn env_test_pod(env: &TestEnv, namespace: &str) -> Result<Pod> {
    let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
    let mut pod = serde_json::to_value(shell_pod(
        env,
        "env",
        ENV_SCRIPT,
        json!({
            "volumes": [
                { "name": "settings", "configMap": { "name": "settings" } },
                { "name": "creds", "secret": { "secretName": "creds" } },
                { "name": "scratch", "emptyDir": {} },
                { "name": "podinfo", "downwardAPI": { "items": [{ "path": "labels", "fieldRef": { "fieldPath": "metadata.labels['app']" } }] } },
            ],
        }),
    )?)?;
    pod["metadata"]["labels"] = json!({ "app": "env-test" });
    let container = &mut pod["spec"]["containers"][0];
    container["workingDir"] = json!("/scratch");
    container["env"] = json!([
        { "name": "LITERAL", "value": "plain" },
        { "name": "EXPANDED", "value": "$(LITERAL)-expanded" },
        { "name": "MODE", "valueFrom": { "configMapKeyRef": { "name": "settings", "key": "MODE" } } },
        { "name": "TOKEN", "valueFrom": { "secretKeyRef": { "name": "creds", "key": "token" } } },
        { "name": "POD_NAME", "valueFrom": field("metadata.name") },
        { "name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace") },
        { "name": "EXPECTED_NAMESPACE", "value": namespace },
        { "name": "APP_LABEL", "valueFrom": field("metadata.labels['app']") },
        { "name": "POD_IP", "valueFrom": field("status.podIP") },
        { "name": "OPTIONAL", "valueFrom": { "configMapKeyRef": { "name": "absent", "key": "x", "optional": true } } },
    ]);
    container["envFrom"] = json!([{ "prefix": "CFG_", "configMapRef": { "name": "settings" } }]);
    container["volumeMounts"] = json!([
        { "name": "settings", "mountPath": "/etc/settings", "readOnly": true },
        { "name": "creds", "mountPath": "/etc/creds", "readOnly": true },
        { "name": "podinfo", "mountPath": "/etc/podinfo" },
        { "name": "scratch", "mountPath": "/scratch" },
    ]);
    Ok(serde_json::from_value(pod)?)
}

#[tokio::test]
async fn env_and_volumes_reach_the_process() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "env-volumes").await?;
    let params = PostParams::default();
    let settings = config_map("settings", &[("MODE", "fast"), ("greeting.txt", "hi there")]);
    ns.api::<ConfigMap>().create(&params, &settings).await?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(b"s3cret".to_vec()),
        )])),
        ..Default::default()
    };
    ns.api::<Secret>().create(&params, &secret).await?;
    ns.api::<Pod>()
        .create(&params, &env_test_pod(env, ns.name())?)
        .await?;
    wait_for_phase(&ns, "env", "Succeeded").await?;
    let log = env
        .container_log(ns.name(), "env", "main")
        .await
        .map_err(anyhow::Error::msg)?;
    let expected = [
        "literal=plain",
        "expanded=plain-expanded",
        "from-configmap=fast",
        "from-secret=s3cret",
        "pod=env ns-matches=yes",
        "label=env-test",
        "ip-set=yes",
        "env-from=fast",
        "optional=unset",
        "config-file=hi there",
        "secret-file=s3cret",
        "podinfo=env-test",
        "scratch=scratch",
        "pwd=/scratch",
    ];
    let lines: Vec<&str> = log.lines().collect();
    ensure!(
        lines == expected,
        "the process saw:\n{log}\nexpected:\n{}",
        expected.join("\n")
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn on_failure_restarts_until_the_container_succeeds() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "on-failure").await?;
    let script = r#"
marker="${CONTEXTOS_ROOT:-}/state/failed-once"
if [ -e "$marker" ]; then echo second run; exit 0; fi
touch "$marker"; echo first run; exit 1
"#;
    let pod = shell_pod(
        env,
        "retry",
        script,
        json!({
            "restartPolicy": "OnFailure",
            "volumes": [{ "name": "state", "emptyDir": {} }],
            "containers": [{
                "name": "main", "image": env.busybox_image(), "command": ["sh", "-c", script],
                "volumeMounts": [{ "name": "state", "mountPath": "/state" }],
            }],
        }),
    )?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "retry", "Succeeded").await?;
    let status = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .context("container status")?;
    let last_exit = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    ensure!(
        status.restart_count == 1 && last_exit == Some(1),
        "expected one restart after exit 1: {}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn active_deadline_fails_a_running_pod() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "deadline").await?;
    let pod = shell_pod(env, "slow", "sleep 300", json!({ "activeDeadlineSeconds": 2 }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "slow", "Failed").await?;
    let reason = pod.status.as_ref().and_then(|s| s.reason.as_deref());
    ensure!(
        reason == Some("DeadlineExceeded"),
        "failed for the wrong reason: {}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_missing_program_is_a_start_error() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "start-error").await?;
    let pod = shell_pod(
        env,
        "missing",
        "",
        json!({
            "containers": [{ "name": "main", "image": env.busybox_image(), "command": ["/nonexistent/program"] }],
        }),
    )?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "missing", "Failed").await?;
    let state = terminated(&pod).with_context(|| pod_summary(&pod))?;
    ensure!(
        state.exit_code == 128 && state.reason.as_deref() == Some("StartError"),
        "{}",
        pod_summary(&pod)
    );
    ensure!(
        state
            .message
            .as_deref()
            .is_some_and(|m| m.contains("/nonexistent/program")),
        "the message should name the program: {}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_missing_config_map_holds_the_pod_until_it_exists() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "late-config").await?;
    let pod = shell_pod(
        env,
        "late",
        "echo \"mode=$MODE\"",
        json!({
            "containers": [{
                "name": "main", "image": env.busybox_image(), "command": ["sh", "-c", "echo \"mode=$MODE\""],
                "env": [{ "name": "MODE", "valueFrom": { "configMapKeyRef": { "name": "later", "key": "MODE" } } }],
            }],
        }),
    )?;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod).await?;
    wait_for_object(
        &pods,
        "late",
        "waiting with CreateContainerConfigError",
        POD_TIMEOUT,
        |pod| {
            Check::when(waiting_reason(pod) == Some("CreateContainerConfigError"), || {
                pod_summary(pod)
            })
        },
    )
    .await?;
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &config_map("later", &[("MODE", "ready")]))
        .await?;
    wait_for_phase(&ns, "late", "Succeeded").await?;
    let log = env
        .container_log(ns.name(), "late", "main")
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(log.trim() == "mode=ready", "log: {log:?}");
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn init_containers_run_before_the_app() -> Result<()> {
    let env = TestEnv::process_node().await?;
    let ns = TestNamespace::new(env, "init").await?;
    let mount = json!([{ "name": "shared", "mountPath": "/shared" }]);
    let pod = shell_pod(
        env,
        "init",
        "",
        json!({
            "volumes": [{ "name": "shared", "emptyDir": {} }],
            "initContainers": [{
                "name": "setup", "image": env.busybox_image(), "volumeMounts": mount,
                "command": ["sh", "-c", "echo prepared > \"${CONTEXTOS_ROOT:-}/shared/state\""],
            }],
            "containers": [{
                "name": "main", "image": env.busybox_image(), "volumeMounts": mount,
                "command": ["sh", "-c", "cat \"${CONTEXTOS_ROOT:-}/shared/state\""],
            }],
        }),
    )?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "init", "Succeeded").await?;
    let log = env
        .container_log(ns.name(), "init", "main")
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        log.trim() == "prepared",
        "main saw {log:?}: {}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn process_node_only_unknown_images_fail_with_a_fix() -> Result<()> {
    let env = TestEnv::process_node().await?;
    if !env.is_local() {
        eprintln!("skipped: a real kubelet pulls images instead (KUBECONFIG is set)");
        return Ok(());
    }
    let ns = TestNamespace::new(env, "unknown-image").await?;
    let pod = shell_pod(
        env,
        "nope",
        "",
        json!({
            "containers": [{ "name": "main", "image": "registry.invalid/app:1", "command": ["app"] }],
        }),
    )?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "nope", "Failed").await?;
    let status = pod.status.clone().unwrap_or_default();
    let message = status.message.unwrap_or_default();
    ensure!(
        status.reason.as_deref() == Some("ErrImageNeverPull"),
        "{}",
        pod_summary(&pod)
    );
    ensure!(
        message.contains("registry.invalid/app:1") && message.contains("CONTEXTOS_PROCESS_NODE_IMAGES"),
        "the message should name the image and how to map it: {message}"
    );
    ensure!(
        waiting_reason(&pod) == Some("ErrImageNeverPull"),
        "{}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn process_node_only_unsupported_volumes_fail_the_pod() -> Result<()> {
    let env = TestEnv::process_node().await?;
    if !env.is_local() {
        eprintln!("skipped: a real cluster would wait for the claim (KUBECONFIG is set)");
        return Ok(());
    }
    let ns = TestNamespace::new(env, "unsupported").await?;
    let pod = shell_pod(
        env,
        "pvc",
        "true",
        json!({
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data" } }],
        }),
    )?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let pod = wait_for_phase(&ns, "pvc", "Failed").await?;
    let message = pod
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    ensure!(
        phase(&pod) == "Failed" && message.contains("\"data\""),
        "expected a Failed pod naming the volume: {}",
        pod_summary(&pod)
    );
    ns.pass();
    Ok(())
}
