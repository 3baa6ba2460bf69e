//! Pod Security admission in a `restricted` namespace: privileged and root pods are refused with
//! a PodSecurity message; a compliant pod is admitted and runs as its non-root user.

use anyhow::{Result, bail, ensure};
use contextos_kind_tests::{TestEnv, TestNamespace};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;

use crate::workloads::{shell_pod, wait_for_phase};

const NON_ROOT_UID: u32 = 1000;

#[tokio::test]
async fn restricted_namespace_refuses_privileged_pods_and_runs_compliant_ones() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::with_labels(
        env,
        "pod-security",
        &[
            ("pod-security.kubernetes.io/enforce", "restricted"),
            ("pod-security.kubernetes.io/enforce-version", "latest"),
        ],
    )
    .await?;
    let pods: Api<Pod> = ns.api();

    let (privileged, root) = refused_pods(env)?;
    for (what, pod, violation) in [
        ("privileged", privileged, "privileged"),
        ("root", root, "runAsNonRoot"),
    ] {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => bail!("the {what} pod was admitted in a restricted namespace"),
            Err(kube::Error::Api(status)) => {
                let message = status.message;
                ensure!(
                    status.code == 403
                        && message.contains("violates PodSecurity \"restricted:latest\"")
                        && message.contains(violation),
                    "the {what} pod was refused, but not by PodSecurity for {violation:?}: {} {message}",
                    status.code
                );
            }
            Err(err) => return Err(err.into()),
        }
    }

    let compliant = compliant_pod(env)?;
    pods.create(&PostParams::default(), &compliant).await?;
    wait_for_phase(&ns, "compliant", "Succeeded").await?;
    let log = env
        .container_log(ns.name(), "compliant", "main")
        .await
        .map_err(anyhow::Error::msg)?;
    // A process node that is not root cannot switch users; its processes run as its own user.
    let node_cannot_switch = env.is_local() && !nix::unistd::geteuid().is_root();
    let expected = if node_cannot_switch {
        nix::unistd::geteuid().as_raw()
    } else {
        NON_ROOT_UID
    };
    ensure!(
        log.trim() == expected.to_string(),
        "the pod ran as uid {:?}, expected {expected}",
        log.trim()
    );
    ns.pass();
    Ok(())
}

/// A privileged pod and one that runs as root: both break the restricted profile.
fn refused_pods(env: &TestEnv) -> Result<(Pod, Pod)> {
    let privileged = shell_pod(
        env,
        "privileged",
        "true",
        json!({
            "containers": [{
                "name": "main", "image": env.busybox_image(), "command": ["true"],
                "securityContext": { "privileged": true },
            }],
        }),
    )?;
    let root = shell_pod(
        env,
        "root",
        "true",
        json!({ "securityContext": { "runAsUser": 0 } }),
    )?;
    Ok((privileged, root))
}

/// Everything the restricted profile asks for; it prints the uid it runs as.
fn compliant_pod(env: &TestEnv) -> Result<Pod> {
    shell_pod(
        env,
        "compliant",
        "id -u",
        json!({
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": NON_ROOT_UID,
                "seccompProfile": { "type": "RuntimeDefault" },
            },
            "containers": [{
                "name": "main", "image": env.busybox_image(), "command": ["sh", "-c", "id -u"],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                },
            }],
        }),
    )
}
