//! The deployable `manifests/` base: `kubectl apply -k manifests --server-side` installs every
//! object, applying it again changes nothing, the TiKV overlay renders, and the approvals
//! admission policy stops anyone approving a Session in someone else's name.
//!
//! The base installs cluster-scoped objects (the `contextos-system` namespace, RBAC, the admission
//! policy), so the tests here take turns, and each removes what it installed, except the CRDs,
//! which the environment installed before and every other test uses.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use contextos_kind_tests::{
    Check, TestEnv, TestNamespace, env::repo_root, wait::wait_for, wait_for_deletion,
};
use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    apps::v1::Deployment,
    core::v1::{Namespace, PersistentVolumeClaim, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::objects::{api_for, apply, yaml_documents};

const SYSTEM_NAMESPACE: &str = "contextos-system";
const APPROVALS_POLICY: &str = "contextos-session-approvals";
const IDENTITY_POLICY: &str = "contextos-session-identity";
/// What the policy's refusal says (its messageExpression).
const REFUSAL: &str = "a new approval's approver must be the user making the change";
const TIMEOUT: Duration = Duration::from_secs(60);

/// One installation of the base at a time.
static INSTALL: Mutex<()> = Mutex::const_new(());

#[tokio::test]
async fn base_applies_server_side_and_reapplying_changes_nothing() -> Result<()> {
    let env = TestEnv::shared().await?;
    let _turn = INSTALL.lock().await;
    if already_installed(env).await? {
        return Ok(());
    }
    // The approvals policy is bound to contextos-system only, where no test creates Sessions.
    let install = Install::apply(env, SYSTEM_NAMESPACE).await?;
    let checked = check_base(env, &install).await;
    let removed = install.remove().await;
    first_error(checked, removed)
}

async fn check_base(env: &'static TestEnv, install: &Install) -> Result<()> {
    let client = env.client();
    let namespace = Api::<Namespace>::all(client.clone())
        .get(SYSTEM_NAMESPACE)
        .await?;
    let enforce = namespace
        .metadata
        .labels
        .unwrap_or_default()
        .remove("pod-security.kubernetes.io/enforce");
    ensure!(
        enforce.as_deref() == Some("restricted"),
        "{SYSTEM_NAMESPACE} enforces Pod Security {enforce:?}, want restricted"
    );
    Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get("contextos-operator")
        .await?;
    Api::<ClusterRole>::all(client.clone())
        .get("contextos-operator")
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .get("contextos-operator")
        .await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    for name in ["contextos-operator", "contextos-gateway"] {
        deployments
            .get(name)
            .await
            .with_context(|| format!("Deployment {name}"))?;
    }
    let services = Api::<Service>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    for name in [
        "contextos-operator-metrics",
        "contextos-gateway",
        "contextos-gateway-metrics",
    ] {
        services
            .get(name)
            .await
            .with_context(|| format!("Service {name}"))?;
    }
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    for name in ["contextos-operator", "contextos-gateway"] {
        policies
            .get(name)
            .await
            .with_context(|| format!("NetworkPolicy {name}"))?;
    }
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .get(APPROVALS_POLICY)
        .await?;
    Api::<ValidatingAdmissionPolicyBinding>::all(client)
        .get(APPROVALS_POLICY)
        .await?;
    check_rbac(env).await?;

    // A GitOps tool re-applies on every sync: that must succeed and change nothing.
    let first = install.resource_versions().await?;
    install.apply_again().await?;
    let second = install.resource_versions().await?;
    // The API server rewrites a PersistentVolumeClaim on its first update of any kind: it
    // stores the claim's defaulted status.phase only then. That is one write, not churn, so the
    // claim is held to the next apply.
    let changed: Vec<&String> = first
        .iter()
        .filter(|(key, version)| second.get(*key) != Some(*version))
        .map(|(key, _)| key)
        .collect();
    ensure!(
        changed
            .iter()
            .all(|key| key.starts_with("PersistentVolumeClaim ")),
        "re-applying the base changed {changed:?}"
    );
    install.apply_again().await?;
    let third = install.resource_versions().await?;
    ensure!(
        second == third,
        "applying the base a third time changed objects (resourceVersions before {second:?}, after {third:?})"
    );
    check_tikv_overlay(env).await
}

/// The operator's and the gateway's accounts may do what they need and nothing broader.
async fn check_rbac(env: &TestEnv) -> Result<()> {
    let operator = format!("system:serviceaccount:{SYSTEM_NAMESPACE}:contextos-operator");
    let gateway = format!("system:serviceaccount:{SYSTEM_NAMESPACE}:contextos-gateway");
    let gateway_expectations: &[(&[&str], bool)] = &[
        (&["create", "tokenreviews.authentication.k8s.io"], true),
        (&["create", "subjectaccessreviews.authorization.k8s.io"], true),
        // Secrets only where the operator bound it (namespaces with an Agent; none here), and
        // in its own namespace only its own key: never the operator's signing key.
        (&["get", "secrets", "-n", "default"], false),
        (&["get", "secrets", "-n", "kube-system"], false),
        (&["list", "secrets", "-A"], false),
        (&["create", "secrets", "-n", "default"], false),
        (&["create", "secrets", "-n", SYSTEM_NAMESPACE], true),
        (
            &["get", "secrets/contextos-record-keys", "-n", SYSTEM_NAMESPACE],
            true,
        ),
        (
            &["get", "secrets/contextos-signing-key", "-n", SYSTEM_NAMESPACE],
            false,
        ),
        // The ConfigMap it publishes its record-key certifier in: not the one holding the key
        // it trusts RunContexts by, no other, and none anywhere else.
        (
            &[
                "patch",
                "configmaps/contextos-gateway-keys",
                "-n",
                SYSTEM_NAMESPACE,
            ],
            true,
        ),
        (
            &[
                "patch",
                "configmaps/contextos-public-keys",
                "-n",
                SYSTEM_NAMESPACE,
            ],
            false,
        ),
        (
            &["patch", "configmaps/contextos-pack", "-n", SYSTEM_NAMESPACE],
            false,
        ),
        (&["create", "configmaps", "-n", SYSTEM_NAMESPACE], false),
        (&["patch", "configmaps", "-n", "default"], false),
        (&["get", "sessions.contextos.dev", "-n", "default"], true),
        // A2A callers' Sessions: started (acting for the caller), followed and cancelled —
        // never their status, never deleted, never an Agent changed.
        (&["create", "sessions.contextos.dev", "-n", "default"], true),
        (&["delegate", "sessions.contextos.dev", "-n", "default"], true),
        (&["patch", "sessions.contextos.dev", "-A"], true),
        (
            &["patch", "sessions.contextos.dev", "--subresource=status", "-A"],
            false,
        ),
        (&["delete", "sessions.contextos.dev", "-A"], false),
        (&["get", "agents.contextos.dev", "-n", "default"], true),
        (&["patch", "agents.contextos.dev", "-A"], false),
        (&["invoke", "agents.contextos.dev", "-A"], false),
        (&["create", "pods", "-A"], false),
        // Consent objects are chained by the gateway, and their status written: nothing more.
        (&["watch", "consents.contextos.dev", "-A"], true),
        (
            &["patch", "consents.contextos.dev", "--subresource=status", "-A"],
            true,
        ),
        (&["patch", "consents.contextos.dev", "-A"], false),
        (&["delete", "consents.contextos.dev", "-A"], false),
        // A namespace's store bound is read from its annotation, which it never writes.
        (&["get", "namespaces/default"], true),
        (&["list", "namespaces"], false),
        (&["patch", "namespaces/default"], false),
    ];
    check_can_i(env, &gateway, gateway_expectations).await?;
    let expectations: &[(&[&str], bool)] = &[
        (
            &["patch", "sessions.contextos.dev", "--subresource=status", "-A"],
            true,
        ),
        // It writes the status of Sessions, never their spec.
        (&["update", "sessions.contextos.dev", "-A"], false),
        (&["patch", "sessions.contextos.dev", "-A"], false),
        (&["create", "pods", "-A"], true),
        (&["delete", "jobs.batch", "-A"], true),
        (
            &["create", "leases.coordination.k8s.io", "-n", SYSTEM_NAMESPACE],
            true,
        ),
        (&["create", "leases.coordination.k8s.io", "-n", "default"], false),
        (&["delete", "sessions.contextos.dev", "-A"], false),
        (&["update", "agents.contextos.dev", "-A"], false),
        (&["get", "nodes"], false),
        // Tenants' Secrets are the gateway's to read, never the operator's.
        (&["get", "secrets", "-n", "default"], false),
        (&["create", "secrets", "-n", SYSTEM_NAMESPACE], true),
        // It binds the gateway's Secret reading where Agents are, and can bind nothing else.
        (
            &[
                "bind",
                "clusterroles.rbac.authorization.k8s.io/contextos-gateway-agent-secrets",
            ],
            true,
        ),
        (&["bind", "clusterroles.rbac.authorization.k8s.io/admin"], false),
        (&["escalate", "clusterroles.rbac.authorization.k8s.io"], false),
        (
            &[
                "patch",
                "rolebindings.rbac.authorization.k8s.io/contextos-gateway-agent-secrets",
                "-n",
                "default",
            ],
            true,
        ),
        (
            &[
                "patch",
                "rolebindings.rbac.authorization.k8s.io/admins",
                "-n",
                "default",
            ],
            false,
        ),
        // It removes that binding with a namespace's last Agent: it watches that name alone.
        (
            &[
                "watch",
                "rolebindings.rbac.authorization.k8s.io/contextos-gateway-agent-secrets",
                "-A",
            ],
            true,
        ),
        (&["list", "rolebindings.rbac.authorization.k8s.io", "-A"], false),
    ];
    check_can_i(env, &operator, expectations).await?;
    // What its binding controller asks, asked as the operator: only with the name selected.
    let mut as_operator = vec!["get", "rolebindings", "-A", "--as", &operator];
    succeed(
        env,
        &[
            as_operator.as_slice(),
            &["--field-selector=metadata.name=contextos-gateway-agent-secrets"],
        ]
        .concat(),
    )
    .await?;
    as_operator.push("--field-selector=metadata.name=admins");
    let refused = run(env, &as_operator).await?;
    ensure!(
        !refused.status.success(),
        "the operator may list RoleBindings other than contextos-gateway-agent-secrets"
    );
    Ok(())
}

/// Asks the API server, as `account`, about each request and compares with what is expected.
async fn check_can_i(env: &TestEnv, account: &str, expectations: &[(&[&str], bool)]) -> Result<()> {
    for (request, allowed) in expectations {
        let mut args = vec!["auth", "can-i", "--as", account];
        args.extend_from_slice(request);
        let answer = run(env, &args).await?;
        let yes = String::from_utf8_lossy(&answer.stdout).trim() == "yes";
        ensure!(
            yes == *allowed,
            "{account} {} `{}` (kubectl {}: {})",
            if yes { "may" } else { "may not" },
            request.join(" "),
            args.join(" "),
            String::from_utf8_lossy(&answer.stderr).trim()
        );
    }
    Ok(())
}

/// The TiKV overlay renders: two gateway replicas point at the PD Service it deploys, no claim
/// is left, it keeps every other object of the base, and only the gateway's pods reach PD/TiKV.
async fn check_tikv_overlay(env: &TestEnv) -> Result<()> {
    let overlay = render(env, &repo_root().join("manifests/overlays/tikv")).await?;
    let base = render(env, &repo_root().join("manifests")).await?;
    let key = |o: &Value| {
        format!(
            "{} {}/{}",
            o["kind"].as_str().unwrap_or_default(),
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            o["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    let rendered: Vec<String> = overlay.iter().map(key).collect();
    for object in &base {
        let kind = object["kind"].as_str().unwrap_or_default();
        if kind != "CustomResourceDefinition" && kind != "PersistentVolumeClaim" {
            ensure!(
                rendered.contains(&key(object)),
                "the TiKV overlay lacks {} of the base",
                key(object)
            );
        }
    }
    ensure!(
        !rendered.iter().any(|k| k.starts_with("PersistentVolumeClaim ")),
        "the TiKV overlay still has a claim: {rendered:?}"
    );
    ensure!(
        rendered.contains(&"Service contextos-records/pd".to_owned()),
        "the TiKV overlay has no PD Service contextos-records/pd: {rendered:?}"
    );
    let gateway = overlay
        .iter()
        .find(|o| key(o) == format!("Deployment {SYSTEM_NAMESPACE}/contextos-gateway"))
        .context("the TiKV overlay has no gateway Deployment")?;
    let pod = &gateway["spec"]["template"]["spec"];
    let args = &pod["containers"][0]["args"];
    ensure!(
        args.as_array()
            .is_some_and(|a| a.contains(&json!("--store=tikv://pd.contextos-records.svc:2379"))),
        "the gateway's args do not name the PD Service: {args}"
    );
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    ensure!(
        volumes.iter().all(|v| v.get("persistentVolumeClaim").is_none()),
        "the gateway still mounts a claim: {volumes:?}"
    );
    ensure!(
        gateway["spec"]["replicas"] == json!(2),
        "the TiKV overlay runs two gateway replicas"
    );
    let store_policy = overlay
        .iter()
        .find(|o| key(o) == "NetworkPolicy contextos-records/records-clients-only")
        .context("the TiKV overlay has no NetworkPolicy for the store")?;
    let peers: Vec<Value> = store_policy["spec"]["ingress"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .flat_map(|rule| rule["from"].as_array().cloned().unwrap_or_default())
        .collect();
    ensure!(peers.len() == 2, "the store's peers: {peers:?}");
    for peer in peers.iter().filter(|p| p.get("namespaceSelector").is_some()) {
        ensure!(
            peer["namespaceSelector"]["matchLabels"]
                == json!({"kubernetes.io/metadata.name": SYSTEM_NAMESPACE})
                && peer["podSelector"]["matchLabels"]
                    == json!({"app.kubernetes.io/name": "contextos-gateway"}),
            "the store admits more than the gateway's pods: {peer}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn approvals_can_only_be_given_in_the_approvers_own_name() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "manifests-approvals").await?;
    let _turn = INSTALL.lock().await;
    if already_installed(env).await? {
        ns.pass();
        return Ok(());
    }
    let install = Install::apply(env, ns.name()).await?;
    let checked = check_approvals(env, ns.name()).await;
    let removed = install.remove().await;
    first_error(checked, removed)?;
    ns.pass();
    Ok(())
}

async fn check_approvals(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let mut session = yaml_documents(&repo_root().join("examples/quickstart/session.yaml"))?.remove(0);
    no_operator(&mut session);
    apply(&client, namespace, &session).await?;
    allow_to_approve(
        &client,
        namespace,
        &["alice@example.com", "bob@example.com", "carol@example.com"],
    )
    .await?;
    let session = SessionPatches {
        env,
        namespace,
        name: session["metadata"]["name"].as_str().unwrap_or_default(),
    };
    let approval =
        |hash: &str, approver: &str| json!({"callHash": hash, "decision": "approve", "approver": approver});
    let first = "9f2c6a41d3b8e7f0c5a2d9e4b1f8c3a6d0e7b4f1a8c5d2e9b6f3a0c7d4e1b8f5";
    let second = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
    let waits_for = |hash: &str, approvers: Value| {
        json!({"status": {"pendingApproval": {
            "callHash": hash, "tool": "restart_deployment", "risk": "destructive",
            "arguments": "{}", "rule": "oncall-guardrails/destructive-needs-oncall",
            "reason": "on-call must agree", "approvers": approvers,
        }}})
    };
    let set_pending = |status: Value| {
        let client = client.clone();
        async move {
            Api::<contextos_crds::Session>::namespaced(client, namespace)
                .patch_status(
                    session.name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&status),
                )
                .await
        }
    };
    // Nothing is pending yet: an approval decided in advance (the call hash is predictable) is
    // refused, even in the approver's own name.
    let add_first = |approver: &str| json!([{"op": "add", "path": "/spec/approvals", "value": [approval(first, approver)]}]);
    session
        .wait_until_refused("alice@example.com", &add_first("alice@example.com"))
        .await?;
    let refusal = session
        .patch("alice@example.com", &add_first("alice@example.com"), false)
        .await?
        .err()
        .context("alice approved a call nothing waits for")?;
    ensure!(
        refusal.contains("only the call the Session waits for"),
        "unexpected refusal: {refusal}"
    );
    set_pending(waits_for(
        first,
        json!({"users": ["alice@example.com", "bob@example.com"]}),
    ))
    .await?;

    let in_bobs_name = add_first("bob@example.com");
    let refusal = session
        .patch("alice@example.com", &in_bobs_name, false)
        .await?
        .err()
        .context("alice recorded an approval in bob's name")?;
    ensure!(
        refusal.contains(REFUSAL) && refusal.contains("(alice@example.com), not bob@example.com"),
        "unexpected refusal: {refusal}"
    );
    ensure!(session.approvers(&client).await?.is_empty());

    session
        .patch("alice@example.com", &add_first("alice@example.com"), false)
        .await?
        .map_err(|refusal| anyhow::anyhow!("alice's own approval was refused: {refusal}"))?;

    // A call other than the pending one cannot be decided, whoever asks.
    let other =
        json!([{"op": "add", "path": "/spec/approvals/-", "value": approval(second, "bob@example.com")}]);
    let refusal = session
        .patch("bob@example.com", &other, false)
        .await?
        .err()
        .context("bob decided a call nothing waits for")?;
    ensure!(
        refusal.contains("only the call the Session waits for"),
        "unexpected refusal: {refusal}"
    );

    // The next call waits: a new approval put ahead of the recorded ones is still a new approval.
    set_pending(waits_for(
        second,
        json!({"users": ["alice@example.com", "bob@example.com"]}),
    ))
    .await?;
    let insert =
        json!([{"op": "add", "path": "/spec/approvals/0", "value": approval(second, "alice@example.com")}]);
    let refusal = session
        .patch("bob@example.com", &insert, false)
        .await?
        .err()
        .context("bob recorded an approval in alice's name by inserting it first")?;
    ensure!(refusal.contains(REFUSAL), "unexpected refusal: {refusal}");

    // Approvals recorded earlier do not stand in the way of one's own.
    session
        .patch("bob@example.com", &other, false)
        .await?
        .map_err(|refusal| anyhow::anyhow!("bob's own approval was refused: {refusal}"))?;
    let recorded = session.approvers(&client).await?;
    ensure!(
        recorded == ["alice@example.com", "bob@example.com"],
        "recorded approvers: {recorded:?}"
    );

    // The call the Session waits for can only be decided by one of its approvers.
    let pending = "7c4b9e2f1a8d3c6b5e0f9a2d7c4b1e8f3a6d9c2b5e8f1a4d7c0b3e6f9a2d5c8b";
    set_pending(waits_for(pending, json!({"groups": ["sre-oncall"]}))).await?;
    let decide =
        json!([{"op": "add", "path": "/spec/approvals/-", "value": approval(pending, "carol@example.com")}]);
    let refusal = session
        .patch_in_groups("carol@example.com", &[], &decide)
        .await?
        .err()
        .context("carol, in no approver group, decided the pending call")?;
    ensure!(
        refusal.contains("is not an approver of the pending call"),
        "unexpected refusal: {refusal}"
    );
    session
        .patch_in_groups("carol@example.com", &["sre-oncall"], &decide)
        .await?
        .map_err(|refusal| anyhow::anyhow!("carol, in sre-oncall, was refused: {refusal}"))?;
    // Findings on a call whose outcome is unknown: only that call, only in one's own name.
    let unknown_call = |call_id: &str| {
        json!({"status": {"unresolvedCall": {
            "callId": call_id, "tool": "restart_deployment", "arguments": "{}", "reason": "interrupted",
        }}})
    };
    set_pending(unknown_call("4.0")).await?;
    let finding = |call_id: &str, resolver: &str| {
        json!([{"op": "add", "path": "/spec/resolutions", "value": [
            {"callId": call_id, "outcome": "acted", "resolver": resolver, "note": "seen in the rollout"}
        ]}])
    };
    let refusal = session
        .patch("alice@example.com", &finding("5.0", "alice@example.com"), false)
        .await?
        .err()
        .context("alice resolved a call nothing waits on")?;
    ensure!(
        refusal.contains("a finding can only be about the call whose outcome the Session waits to know"),
        "unexpected refusal: {refusal}"
    );
    let refusal = session
        .patch("alice@example.com", &finding("4.0", "bob@example.com"), false)
        .await?
        .err()
        .context("alice recorded a finding in bob's name")?;
    ensure!(
        refusal.contains("resolver must be the user making the change (alice@example.com)"),
        "unexpected refusal: {refusal}"
    );
    // "answered" is for a remote agent's question only: the gateway would not take it here,
    // and the Session would wait for good.
    let answered = |call_id: &str, path: &str| {
        let value =
            json!({"callId": call_id, "outcome": "answered", "resolver": "alice@example.com", "note": "EU"});
        let value = if path.ends_with('-') {
            value
        } else {
            json!([value])
        };
        json!([{"op": "add", "path": path, "value": value}])
    };
    let refusal = session
        .patch("alice@example.com", &answered("4.0", "/spec/resolutions"), false)
        .await?
        .err()
        .context("alice answered a call that asked no question")?;
    ensure!(
        refusal.contains("a remote agent's question (status.unresolvedCall.forCall set) is answered"),
        "unexpected refusal: {refusal}"
    );
    session
        .patch("alice@example.com", &finding("4.0", "alice@example.com"), false)
        .await?
        .map_err(|refusal| anyhow::anyhow!("alice's own finding was refused: {refusal}"))?;
    // A remote agent's question is answered or declined, never found to have acted.
    set_pending(json!({"status": {"unresolvedCall": {
        "callId": "6.0.q1-0a1b2c3d", "forCall": "6.0", "tool": "ask_billing", "arguments": "{}",
        "reason": "the remote agent of ask_billing asks a question",
    }}}))
    .await?;
    let acted = json!([{"op": "add", "path": "/spec/resolutions/-", "value":
        {"callId": "6.0.q1-0a1b2c3d", "outcome": "acted", "resolver": "alice@example.com"}
    }]);
    let refusal = session
        .patch("alice@example.com", &acted, false)
        .await?
        .err()
        .context("alice found that a question acted")?;
    ensure!(
        refusal.contains("is answered (outcome answered, the answer in note) or declined"),
        "unexpected refusal: {refusal}"
    );
    let empty = json!([{"op": "add", "path": "/spec/resolutions/-", "value":
        {"callId": "6.0.q1-0a1b2c3d", "outcome": "answered", "resolver": "alice@example.com"}
    }]);
    let refusal = session
        .patch("alice@example.com", &empty, false)
        .await?
        .err()
        .context("alice answered with no answer")?;
    ensure!(refusal.contains("set note"), "unexpected refusal: {refusal}");
    session
        .patch(
            "alice@example.com",
            &answered("6.0.q1-0a1b2c3d", "/spec/resolutions/-"),
            false,
        )
        .await?
        .map_err(|refusal| anyhow::anyhow!("alice's answer was refused: {refusal}"))?;
    check_promotion_approvals(env, namespace).await?;
    check_agent_promotion_approvals(env, namespace).await?;
    check_status_writers(env, namespace).await?;
    check_store_bounds(env, namespace).await?;
    check_sandbox_images(env, namespace).await?;
    check_runner_pod_owners(env, namespace).await?;
    check_replay_pod_owners(env, namespace).await?;
    check_pod_exec(env, namespace).await?;
    check_gateway_tokens(env, namespace).await?;
    check_session_identity(env, namespace).await?;
    check_a2a_sessions(env, namespace).await
}

/// Sessions of A2A callers: only the gateway's account marks a Session as one (a tenant cannot
/// make any Session a caller's task), and it creates and changes nothing else — no Session about
/// a person, no change but spec.cancel.
async fn check_a2a_sessions(env: &'static TestEnv, namespace: &str) -> Result<()> {
    const POLICY: &str = "contextos-a2a-sessions";
    const GATEWAY: &str = "system:serviceaccount:contextos-system:contextos-gateway";
    let mut template = yaml_documents(&repo_root().join("examples/quickstart/session.yaml"))?.remove(0);
    no_operator(&mut template);
    template["metadata"]["namespace"] = json!(namespace);
    let dir = tempfile::tempdir().context("create a directory for the Sessions")?;
    // `kubectl <verb> …` on a Session as `user` (the admin when None): Err holds the refusal.
    let kubectl = |user: Option<&'static str>, args: Vec<String>| async move {
        let mut args = args;
        if let Some(user) = user {
            args.extend(["--as".to_owned(), user.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(env, &args).await?;
        anyhow::Ok(if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        })
    };
    let create = |name: &str, user: Option<&'static str>, edit: &dyn Fn(&mut Value)| {
        let mut session = template.clone();
        session["metadata"]["name"] = json!(name);
        edit(&mut session);
        let file = dir.path().join(format!("{name}.json"));
        let written = std::fs::write(&file, session.to_string());
        let args = vec![
            "create".to_owned(),
            "-f".to_owned(),
            file.to_string_lossy().into_owned(),
        ];
        async move {
            written?;
            kubectl(user, args).await
        }
    };
    let patch = |name: &str, user: Option<&'static str>, patch: Value| {
        let args = vec![
            "patch".to_owned(),
            "sessions.contextos.dev".to_owned(),
            name.to_owned(),
            "-n".to_owned(),
            namespace.to_owned(),
            "--type=merge".to_owned(),
            "-p".to_owned(),
            patch.to_string(),
        ];
        kubectl(user, args)
    };
    // As the gateway writes them: marked (the label keeping the e2e operator away stays), for
    // the caller, without the quickstart's overrides.
    let marked = |s: &mut Value| {
        s["metadata"]["labels"]["contextos.dev/a2a"] = json!("true");
        s["metadata"]["annotations"] = json!({"contextos.dev/a2a-caller": "partner"});
        s["spec"]["user"] = json!({"subject": "partner"});
        if let Some(spec) = s["spec"].as_object_mut() {
            spec.remove("overrides");
        }
    };
    // A tenant (here the admin) marking a Session as a caller's task: refused.
    let refusal = wait_for("the A2A policy to refuse a marked Session", TIMEOUT, || async {
        match create("tenant-marked", None, &marked).await {
            Ok(Err(refusal)) if refusal.contains(POLICY) => Check::Done(refusal),
            Ok(Err(refusal)) => Check::NotYet(refusal),
            Ok(Ok(())) => Check::NotYet("accepted".to_owned()),
            Err(err) => Check::NotYet(format!("{err:#}")),
        }
    })
    .await?;
    ensure!(refusal.contains("only the gateway sets them"), "{refusal}");
    // The gateway: no Session with scopes for its caller (nor about a person, which the
    // identity policy refuses it first) — even with a scope it may use, which the identity
    // policy would let through.
    grant_scope(
        &env.client(),
        namespace,
        "gateway-may-use-a-scope",
        "incidents:write",
        &[GATEWAY],
    )
    .await?;
    let scoped = |s: &mut Value| {
        marked(s);
        s["spec"]["user"]["scopes"] = json!(["incidents:write"]);
    };
    let refusal = wait_for("the A2A policy to refuse a caller's scopes", TIMEOUT, || async {
        match create("a2a-scoped", Some(GATEWAY), &scoped).await {
            Ok(Err(refusal)) if refusal.contains(POLICY) => Check::Done(refusal),
            Ok(Err(refusal)) => Check::NotYet(refusal),
            Ok(Ok(())) => Check::NotYet("the gateway created a Session with scopes".to_owned()),
            Err(err) => Check::NotYet(format!("{err:#}")),
        }
    })
    .await?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    create("a2a-task", Some(GATEWAY), &marked)
        .await?
        .map_err(|refusal| anyhow::anyhow!("the gateway's A2A task was refused: {refusal}"))?;
    // Its marks are the gateway's: a tenant cannot change them, nor mark another Session.
    let refusal = patch(
        "a2a-task",
        None,
        json!({"metadata": {"annotations": {"contextos.dev/a2a-caller": "mallory"}}}),
    )
    .await?
    .err()
    .context("a tenant changed whose task it is")?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    create("plain", None, &|_| {})
        .await?
        .map_err(|refusal| anyhow::anyhow!("an unmarked Session was refused: {refusal}"))?;
    let refusal = patch(
        "plain",
        None,
        json!({"metadata": {"labels": {"contextos.dev/a2a": "true"}}}),
    )
    .await?
    .err()
    .context("a tenant made a Session an A2A task")?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    // The gateway changes spec.cancel and nothing else.
    let refusal = patch(
        "plain",
        Some(GATEWAY),
        json!({"metadata": {"labels": {"team": "x"}}}),
    )
    .await?
    .err()
    .context("the gateway relabelled a Session")?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    // Nor cancels a Session that is not an A2A task, nor gives a task an owner (which the
    // garbage collector would delete it for).
    let refusal = patch("plain", Some(GATEWAY), json!({"spec": {"cancel": true}}))
        .await?
        .err()
        .context("the gateway cancelled a Session that is not an A2A task")?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    let owned = json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "00000000-0000-0000-0000-000000000000",
    }]}, "spec": {"cancel": true}});
    let refusal = patch("a2a-task", Some(GATEWAY), owned)
        .await?
        .err()
        .context("the gateway gave a task an owner")?;
    ensure!(refusal.contains(POLICY), "{refusal}");
    patch("a2a-task", Some(GATEWAY), json!({"spec": {"cancel": true}}))
        .await?
        .map_err(|refusal| anyhow::anyhow!("the gateway's cancel was refused: {refusal}"))?;
    // A Session's trace is set when it is created, by whoever creates it, and then stays.
    let refusal = patch(
        "plain",
        None,
        json!({"metadata": {"annotations": {"contextos.dev/traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}}),
    )
    .await?
    .err()
    .context("a Session's trace was set after it was created")?;
    ensure!(refusal.contains("cannot be set, changed or removed"), "{refusal}");
    Ok(())
}

/// A Session acts for the user who creates it: nobody starts one in someone else's name, in
/// groups they are not in or with scopes they were not granted — unless they hold the
/// delegation right — and no Session is born with approvals.
async fn check_session_identity(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let mut session = yaml_documents(&repo_root().join("examples/quickstart/session.yaml"))?.remove(0);
    no_operator(&mut session);
    session["metadata"]["namespace"] = json!(namespace);
    let dir = tempfile::tempdir().context("create a directory for the Sessions")?;
    let create = |name: &str, user: Value, approvals: Value, as_user: &str, groups: &[&str]| {
        let mut session = session.clone();
        session["metadata"]["name"] = json!(name);
        session["spec"]["user"] = user;
        if !approvals.is_null() {
            session["spec"]["approvals"] = approvals;
        }
        let file = dir.path().join(format!("{name}.json"));
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        let as_user = as_user.to_owned();
        async move {
            std::fs::write(&file, session.to_string())?;
            let file = file.to_string_lossy().into_owned();
            let mut args = vec!["create", "-f", &file, "--as", &as_user];
            for group in &groups {
                args.push("--as-group");
                args.push(group);
            }
            let output = run(env, &args).await?;
            anyhow::Ok(if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
            })
        }
    };
    let dana =
        || json!({"subject": "dana@example.com", "groups": ["sre-oncall"], "scopes": ["incidents:write"]});
    // In someone else's name: refused (waiting until the binding reaches the API server).
    let refusal = wait_for(
        "the identity policy to refuse a Session for another user",
        TIMEOUT,
        || async {
            match create("for-dana", dana(), Value::Null, "alice@example.com", &[]).await {
                Ok(Err(refusal)) if refusal.contains(IDENTITY_POLICY) => Check::Done(refusal),
                Ok(Err(refusal)) => Check::NotYet(refusal),
                Ok(Ok(())) => Check::NotYet("accepted".to_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    ensure!(
        refusal.contains("spec.user.subject: dana@example.com is not you (alice@example.com)"),
        "unexpected refusal: {refusal}"
    );
    // In her own name but claiming a group she is not in: refused; in it: the scope is next.
    let alice = |groups: Value, scopes: Value| json!({"subject": "alice@example.com", "groups": groups, "scopes": scopes});
    let refusal = create(
        "alice-1",
        alice(json!(["sre-oncall"]), json!([])),
        Value::Null,
        "alice@example.com",
        &[],
    )
    .await?
    .err()
    .context("alice claimed a group she is not in")?;
    ensure!(
        refusal.contains("spec.user.groups: you (alice@example.com) are not in sre-oncall"),
        "unexpected refusal: {refusal}"
    );
    let with_scope = alice(json!(["sre-oncall"]), json!(["incidents:write"]));
    let refusal = create(
        "alice-2",
        with_scope.clone(),
        Value::Null,
        "alice@example.com",
        &["sre-oncall"],
    )
    .await?
    .err()
    .context("alice claimed a scope nobody granted her")?;
    ensure!(
        refusal.contains("spec.user.scopes: you (alice@example.com) may not use all of incidents:write"),
        "unexpected refusal: {refusal}"
    );
    grant_scope(
        &client,
        namespace,
        "scope-incidents-write",
        "incidents:write",
        &["alice@example.com"],
    )
    .await?;
    wait_for(
        "alice's own Session with her granted scope to be admitted",
        TIMEOUT,
        || async {
            match create(
                "alice-3",
                with_scope.clone(),
                Value::Null,
                "alice@example.com",
                &["sre-oncall"],
            )
            .await
            {
                Ok(Ok(())) => Check::Done(()),
                Ok(Err(refusal)) => Check::NotYet(refusal),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    // Nothing is decided before the Session exists, whoever creates it.
    let approval = json!([{"callHash": "9f2c6a41d3b8e7f0c5a2d9e4b1f8c3a6d0e7b4f1a8c5d2e9b6f3a0c7d4e1b8f5",
        "decision": "approve", "approver": "alice@example.com"}]);
    let refusal = create(
        "alice-4",
        alice(json!([]), json!([])),
        approval,
        "alice@example.com",
        &[],
    )
    .await?
    .err()
    .context("a Session was created with an approval in it")?;
    ensure!(
        refusal.contains("a new Session cannot carry approvals"),
        "unexpected refusal: {refusal}"
    );
    let mut with_finding = session.clone();
    with_finding["metadata"]["name"] = json!("alice-5");
    with_finding["spec"]["user"] = alice(json!([]), json!([]));
    with_finding["spec"]["resolutions"] =
        json!([{"callId": "1.0", "outcome": "did_not_act", "resolver": "alice@example.com"}]);
    let refused = apply(&client, namespace, &with_finding).await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("a new Session cannot carry resolutions")),
        "a Session was created with a resolution in it: {refused:?}"
    );
    // A Session about a person reads their memory: only for whoever may read memory there.
    let mut about_ana = session.clone();
    about_ana["metadata"]["name"] = json!("alice-about-ana");
    about_ana["spec"]["user"] = alice(json!([]), json!([]));
    about_ana["spec"]["subject"] = json!("cust-ana");
    let about_file = dir.path().join("alice-about-ana.json");
    std::fs::write(&about_file, about_ana.to_string())?;
    let about_path = about_file.to_string_lossy().into_owned();
    let output = run(env, &["create", "-f", &about_path, "--as", "alice@example.com"]).await?;
    let refusal = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        !output.status.success()
            && refusal
                .contains("spec.subject: a Session about cust-ana lets its agent read that person's memory"),
        "a Session about a person was admitted for someone who may not read memory: {refusal}"
    );
    grant(
        &client,
        namespace,
        "alice-reads-memory",
        PolicyRule {
            api_groups: Some(vec!["contextos.dev".to_owned()]),
            resources: Some(vec!["memories".to_owned()]),
            verbs: vec!["get".to_owned()],
            ..Default::default()
        },
        &["alice@example.com"],
    )
    .await?;
    wait_for(
        "a Session about a person to be admitted once its creator may read memory",
        TIMEOUT,
        || async {
            let output = run(env, &["create", "-f", &about_path, "--as", "alice@example.com"]).await;
            match output {
                Ok(output) if output.status.success() => Check::Done(()),
                Ok(output) => Check::NotYet(String::from_utf8_lossy(&output.stderr).into_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    // A pipeline granted the delegation right starts Sessions for others.
    grant(
        &client,
        namespace,
        "pipeline-delegates",
        PolicyRule {
            api_groups: Some(vec!["contextos.dev".to_owned()]),
            resources: Some(vec!["sessions".to_owned()]),
            verbs: vec!["delegate".to_owned()],
            ..Default::default()
        },
        &["bob@example.com"],
    )
    .await?;
    // … but passes on only scopes it may use itself: Policies grant calls by them.
    let refusal = wait_for(
        "a delegating pipeline to be refused a scope it was not granted",
        TIMEOUT,
        || async {
            match create("pipeline-for-dana", dana(), Value::Null, "bob@example.com", &[]).await {
                Ok(Err(refusal)) if refusal.contains("spec.user.scopes") => Check::Done(refusal),
                Ok(Err(refusal)) => Check::NotYet(refusal),
                Ok(Ok(())) => Check::NotYet("admitted with a scope bob may not use".to_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    ensure!(
        refusal.contains("you (bob@example.com) may not use all of incidents:write"),
        "unexpected refusal: {refusal}"
    );
    grant_scope(
        &client,
        namespace,
        "pipeline-scope",
        "incidents:write",
        &["bob@example.com"],
    )
    .await?;
    wait_for(
        "a delegating pipeline's Session for dana to be admitted",
        TIMEOUT,
        || async {
            match create("pipeline-for-dana", dana(), Value::Null, "bob@example.com", &[]).await {
                Ok(Ok(())) => Check::Done(()),
                Ok(Err(refusal)) => Check::NotYet(refusal),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    Ok(())
}

/// Lets `users` use scope `scope` in `namespace` (RBAC verb `use` on scopes.contextos.dev).
async fn grant_scope(
    client: &Client,
    namespace: &str,
    name: &str,
    scope: &str,
    users: &[&str],
) -> Result<()> {
    let rule = PolicyRule {
        api_groups: Some(vec!["contextos.dev".to_owned()]),
        resources: Some(vec!["scopes".to_owned()]),
        resource_names: Some(vec![scope.to_owned()]),
        verbs: vec!["use".to_owned()],
        ..Default::default()
    };
    grant(client, namespace, name, rule, users).await
}

/// A Role with `rule`, bound to `users`, in `namespace`.
async fn grant(client: &Client, namespace: &str, name: &str, rule: PolicyRule, users: &[&str]) -> Result<()> {
    let meta = ObjectMeta {
        name: Some(name.to_owned()),
        ..Default::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![rule]),
    };
    Api::<Role>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(
            users
                .iter()
                .map(|user| Subject {
                    api_group: Some("rbac.authorization.k8s.io".to_owned()),
                    kind: "User".to_owned(),
                    name: (*user).to_owned(),
                    ..Default::default()
                })
                .collect(),
        ),
    };
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// Status is the operator's word: a tenant holding every right in its namespace (`*` on `*`,
/// as cluster-admin bound by a RoleBinding gives) still cannot mark a candidate promoted, nor
/// write any other status; the operator's account can.
async fn check_status_writers(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let everything = PolicyRule {
        api_groups: Some(vec!["*".to_owned()]),
        resources: Some(vec!["*".to_owned()]),
        verbs: vec!["*".to_owned()],
        ..Default::default()
    };
    let admin = "nadia@example.com";
    grant(&client, namespace, "namespace-admin", everything, &[admin]).await?;
    let promoted =
        json!({"status": {"revisions": {"promoted": format!("sha256:{}", "0".repeat(64))}}}).to_string();
    let patch = |kind: &'static str, name: &'static str, user: &'static str| {
        let promoted = promoted.clone();
        async move {
            let args = [
                "patch",
                kind,
                name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &promoted,
                "--as",
                user,
                "--dry-run=server",
            ];
            let out = run(env, &args).await?;
            anyhow::Ok(if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            })
        }
    };
    for (kind, name) in [
        ("agents.contextos.dev", "oncall-assistant"),
        ("policies.contextos.dev", "oncall-guardrails"),
    ] {
        // Refused by the policy, not by RBAC (which lets her write anything in the namespace,
        // once her binding reaches the API server's cache).
        wait_for("a tenant's status write refused", TIMEOUT, || async {
            match patch(kind, name, admin).await {
                Ok(Err(e)) if e.contains("is written by the ContextOS operator only") => Check::Done(()),
                Ok(Err(e)) => Check::NotYet(e),
                Ok(Ok(())) => Check::NotYet(format!("{kind} {name}: {admin}'s status write was accepted")),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        })
        .await?;
    }
    // The operator's account writes status as the operator does: a patch of the status alone
    // (kubectl would read the status first, which the account may not).
    let kubeconfig = env.kubeconfig().context("the test cluster's kubeconfig")?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &Default::default(),
    )
    .await?;
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{SYSTEM_NAMESPACE}:contextos-operator"
    ));
    let as_operator = Client::try_from(config)?;
    let params = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let promoted: Value = serde_json::from_str(&promoted)?;
    Api::<contextos_crds::Agent>::namespaced(as_operator, namespace)
        .patch_status("oncall-assistant", &params, &Patch::Merge(&promoted))
        .await
        .context("the operator's status write was refused")?;
    Ok(())
}

/// A namespace's store bound is the cluster admin's: a tenant allowed to edit its own Namespace
/// (as a tenancy controller may let it) cannot set or raise it, and a value the gateway could
/// not read is refused at admission.
async fn check_store_bounds(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let editor = "tara@example.com";
    let name = format!("contextos-test-namespace-editor-{namespace}");
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["namespaces".to_owned()]),
            resource_names: Some(vec![namespace.to_owned()]),
            verbs: vec!["get".to_owned(), "patch".to_owned(), "update".to_owned()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: role.metadata.clone(),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: editor.to_owned(),
            ..Default::default()
        }]),
    };
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let annotate = |value: &'static str, user: Option<&'static str>| async move {
        let setting = format!("contextos.dev/max-store-bytes={value}");
        let mut args = vec![
            "annotate",
            "namespace",
            namespace,
            setting.as_str(),
            "--overwrite",
            "--dry-run=server",
        ];
        if let Some(user) = user {
            args.extend(["--as", user]);
        }
        let out = run(env, &args).await?;
        anyhow::Ok(if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        })
    };
    // Refused by the policy, not by RBAC (which lets her patch her Namespace once her binding
    // reaches the API server's cache).
    let checked = wait_for("a tenant's store bound refused", TIMEOUT, || async {
        match annotate("1Ti", Some(editor)).await {
            Ok(Err(e)) if e.contains("is set by a cluster admin") => Check::Done(()),
            Ok(Err(e)) => Check::NotYet(e),
            Ok(Ok(())) => Check::NotYet(format!("{editor} set her own namespace's store bound")),
            Err(e) => Check::NotYet(format!("{e:#}")),
        }
    })
    .await;
    let cleaned = async {
        Api::<ClusterRoleBinding>::all(client.clone())
            .delete(&name, &Default::default())
            .await?;
        Api::<ClusterRole>::all(client.clone())
            .delete(&name, &Default::default())
            .await?;
        anyhow::Ok(())
    }
    .await;
    checked?;
    cleaned?;
    // The cluster admin (this test) sets it — to a size only.
    match annotate("lots", None).await? {
        Err(e) if e.contains("is not a size") => {}
        other => bail!("a store bound that is not a size was not refused: {other:?}"),
    }
    annotate("50Gi", None)
        .await?
        .map_err(|e| anyhow::anyhow!("the cluster admin's store bound was refused: {e}"))?;
    Ok(())
}

/// A SandboxProfile may only name the ContextOS runner image.
async fn check_sandbox_images(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let mut profile = yaml_documents(&repo_root().join("examples/quickstart/sandboxprofile.yaml"))?.remove(0);
    apply(&client, namespace, &profile).await?;
    profile["spec"]["image"] = json!(
        "registry.example.com/tenant/runner@sha256:8efb2271583453e455faacdc1941d214c2a8e6c6beb667cbc5b69589baf7d3b2"
    );
    let refused = wait_for("the image policy to refuse another image", TIMEOUT, || async {
        match apply(&client, namespace, &profile).await {
            Err(err) => {
                let text = format!("{err:#}");
                Check::when(text.contains("is not the ContextOS runner image"), || {
                    text.clone()
                })
            }
            Ok(_) => Check::NotYet("accepted".to_owned()),
        }
    })
    .await;
    refused?;
    Ok(())
}

/// Only the operator makes a pod a Session's runner pod (the gateway lets a pod act for a run
/// only if the run's Session controls it): a tenant's pod claiming a Session as its owner is
/// refused, and so is adding a Session to the owners of a pod the tenant made; the same pod
/// without the claim, and the claim made by the operator's account, are admitted.
async fn check_runner_pod_owners(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let tenant = "mallory@example.com";
    grant(
        &client,
        namespace,
        "mallory-runs-pods",
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_owned(), "pods/status".to_owned()]),
            verbs: vec!["get".to_owned(), "create".to_owned(), "patch".to_owned()],
            ..Default::default()
        },
        &[tenant],
    )
    .await?;
    let session = json!([{
        "apiVersion": "contextos.dev/v1alpha1", "kind": "Session", "name": "victim",
        "uid": "6f1c8a52-0000-4000-8000-000000000001", "controller": true,
    }]);
    let pod = |name: &str, owners: &Value| tenant_pod(env, namespace, name, owners, &json!({}));
    let dir = tempfile::tempdir()?;
    let file = |name: &str, value: &Value| json_file(dir.path(), name, value);
    let marks = json!({"contextos.dev/role": "runner", "contextos.dev/session": "victim"});
    let claimed = file(
        "claimed",
        &tenant_pod(env, namespace, "victim-run-1", &session, &marks),
    )?;
    let refusal = "only the ContextOS operator makes a pod a Session's runner pod";
    wait_for(
        "the runner-pods policy to refuse a tenant's pod owned by a Session",
        TIMEOUT,
        || async {
            let args = ["create", "-f", &claimed, "--as", tenant, "--dry-run=server"];
            match run(env, &args).await {
                Ok(output) if !output.status.success() => {
                    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                    Check::when(stderr.contains(refusal), || stderr.clone())
                }
                Ok(_) => Check::NotYet("admitted".to_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    // The same pod owned by nothing is the tenant's to make …
    let plain = file("plain", &pod("plain", &json!([])))?;
    succeed(env, &["create", "-f", &plain, "--as", tenant]).await?;
    // … but not to make a Session's afterwards.
    let claim = json!({"metadata": {"ownerReferences": session}}).to_string();
    let patched = run(
        env,
        &[
            "patch",
            "pod",
            "plain",
            "-n",
            namespace,
            "--as",
            tenant,
            "--type=merge",
            "-p",
            &claim,
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&patched.stderr);
    ensure!(
        !patched.status.success() && stderr.contains(refusal),
        "a tenant made its pod a Session's: {stderr}"
    );
    // Nor a Session of another API group (the gateway believes no such owner either).
    let elsewhere = json!([{
        "apiVersion": "example.com/v1", "kind": "Session", "name": "victim",
        "uid": "6f1c8a52-0000-4000-8000-000000000002", "controller": true,
    }]);
    let elsewhere = file("elsewhere", &pod("victim-run-2", &elsewhere))?;
    let made = run(
        env,
        &["create", "-f", &elsewhere, "--as", tenant, "--dry-run=server"],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&made.stderr);
    ensure!(
        !made.status.success() && stderr.contains(refusal),
        "a tenant's pod claiming a Session of another group was admitted: {stderr}"
    );
    // The operator's account makes runner pods …
    let operator = format!("system:serviceaccount:{SYSTEM_NAMESPACE}:contextos-operator");
    let made = run(env, &["create", "-f", &claimed, "--as", &operator]).await?;
    ensure!(
        made.status.success(),
        "the operator could not make a runner pod: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    // … which are not the tenant's to change, as the tenant patches it (`--type` json or merge),
    // itself or its status.
    let patch_runner_at = |kind: &str, patch: Value, subresource: &str| {
        let args: Vec<String> = [
            "patch",
            "pod",
            "victim-run-1",
            "-n",
            namespace,
            "--as",
            tenant,
            &format!("--type={kind}"),
            "-p",
            &patch.to_string(),
            &format!("--subresource={subresource}"),
        ]
        .into_iter()
        .filter(|a| *a != "--subresource=")
        .map(str::to_owned)
        .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(env, &args).await
        }
    };
    let patch_runner = |kind: &str, patch: Value| patch_runner_at(kind, patch, "");
    // Another image would run in the runner pod, with its token.
    let swap = json!([{
        "op": "replace", "path": "/spec/containers/0/image",
        "value": "registry.example.com/tenant/anything:1",
    }]);
    let patched = patch_runner("json", swap).await?;
    let stderr = String::from_utf8_lossy(&patched.stderr);
    ensure!(
        !patched.status.success() && stderr.contains(refusal),
        "a tenant changed a runner pod's image: {stderr}"
    );
    // Nor its marks: without its role label the runner NetworkPolicy would no longer select it
    // (its egress open), without its Session label its crashes would not count.
    for marks in [
        // Nor may it take the Session owner away first, after which the pod would no longer be
        // a runner pod to admission, its spec and marks anyone's. (By now this pod, whose
        // Session does not exist, is being deleted by the garbage collector and waits for a
        // node that never confirms it: a pod going is no exception.)
        json!({"metadata": {"ownerReferences": null}}),
        json!({"metadata": {"labels": {"contextos.dev/role": null}}}),
        json!({"metadata": {"labels": {"contextos.dev/session": "another"}}}),
        json!({"metadata": {"annotations": {"contextos.dev/resumed-for": "sha256:0"}}}),
    ] {
        let patched = patch_runner("merge", marks.clone()).await?;
        let stderr = String::from_utf8_lossy(&patched.stderr);
        ensure!(
            !patched.status.success() && stderr.contains(refusal),
            "a tenant changed a runner pod's marks ({marks}): {stderr}"
        );
    }
    // Nor through the pod's status, where the API server keeps the spec and owners but takes
    // labels and annotations as they come.
    let unmarked = json!({"metadata": {"labels": {"contextos.dev/role": null}}});
    let patched = patch_runner_at("merge", unmarked, "status").await?;
    let stderr = String::from_utf8_lossy(&patched.stderr);
    ensure!(
        !patched.status.success() && stderr.contains(refusal),
        "a tenant changed a runner pod's marks through its status: {stderr}"
    );
    // Labels of its own are the tenant's.
    let labelled = patch_runner("merge", json!({"metadata": {"labels": {"team": "payments"}}})).await?;
    ensure!(
        labelled.status.success(),
        "a tenant could not label a runner pod with a label of its own: {}",
        String::from_utf8_lossy(&labelled.stderr)
    );
    Ok(())
}

/// No one but a cluster admin (or whoever holds `exec` on `sessions/runner`) runs a command in,
/// or attaches to, a runner pod's `runner` container or a replay pod's `replay` container — a
/// command there could read the pod's gateway token — though a tenant holds `pods/exec` and
/// `pods/attach` as Kubernetes' `edit` role grants them; the tenant's other pods and containers
/// are theirs to exec into. The pods are bound to no node: admission decides before the API
/// server reaches a node, so what is not refused fails later, with another error.
async fn check_pod_exec(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let tenant = "mallory@example.com";
    let trusted = "carol@example.com";
    let exec_rule = PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec![
            "pods".to_owned(),
            "pods/exec".to_owned(),
            "pods/attach".to_owned(),
        ]),
        verbs: vec!["get".to_owned(), "create".to_owned()],
        ..Default::default()
    };
    grant(
        &client,
        namespace,
        "edit-like-exec",
        exec_rule,
        &[tenant, trusted],
    )
    .await?;
    let runner_exec = PolicyRule {
        api_groups: Some(vec!["contextos.dev".to_owned()]),
        resources: Some(vec!["sessions/runner".to_owned()]),
        verbs: vec!["exec".to_owned()],
        ..Default::default()
    };
    grant(&client, namespace, "trusted-runner-exec", runner_exec, &[trusted]).await?;
    let dir = tempfile::tempdir()?;
    let pod_with = |name: &str, container: &str| -> Result<String> {
        let mut pod = tenant_pod(env, namespace, name, &json!([]), &json!({}));
        pod["spec"]["containers"][0]["name"] = json!(container);
        json_file(dir.path(), name, &pod)
    };
    for (name, container) in [
        ("exec-run-1", "runner"),
        ("replay-agent-exec-0123456789-x7k2p", "replay"),
        ("mine-run-2", "app"),
    ] {
        succeed(env, &["create", "-f", &pod_with(name, container)?]).await?;
    }
    let refusal = "is a ContextOS runner or replay pod";
    let exec = |user: &'static str, pod: &'static str, container: Option<&'static str>| async move {
        let mut args = vec!["exec", "-n", namespace, pod, "--as", user];
        if let Some(container) = container {
            args.extend(["-c", container]);
        }
        args.extend(["--", "true"]);
        let output = run(env, &args).await?;
        anyhow::Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    };
    wait_for(
        "the exec policy to refuse exec into a runner pod",
        TIMEOUT,
        || async {
            match exec(tenant, "exec-run-1", None).await {
                Ok(stderr) => Check::when(stderr.contains(refusal), || stderr.clone()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    for (pod, container) in [
        ("exec-run-1", Some("runner")),
        ("replay-agent-exec-0123456789-x7k2p", None),
        ("replay-agent-exec-0123456789-x7k2p", Some("replay")),
    ] {
        let stderr = exec(tenant, pod, container).await?;
        ensure!(
            stderr.contains(refusal),
            "exec into {pod} {container:?} was not refused: {stderr}"
        );
    }
    // Attach, asked for directly (kubectl attach waits for a running pod first).
    let empty = json_file(dir.path(), "empty", &json!({}))?;
    let attach =
        format!("/api/v1/namespaces/{namespace}/pods/exec-run-1/attach?container=runner&stdout=true");
    let attached = run(env, &["create", "--raw", &attach, "-f", &empty, "--as", tenant]).await?;
    let stderr = String::from_utf8_lossy(&attached.stderr);
    ensure!(
        stderr.contains(refusal),
        "attach to a runner pod was not refused: {stderr}"
    );
    // The tenant's own pods, another container, and the trusted user pass admission (and fail at
    // the node, which does not exist).
    for (user, pod, container) in [
        (tenant, "mine-run-2", None),
        (tenant, "plain", None),
        (tenant, "exec-run-1", Some("other")),
        (trusted, "exec-run-1", None),
    ] {
        let stderr = exec(user, pod, container).await?;
        ensure!(
            !stderr.contains(refusal) && !stderr.contains("forbidden"),
            "{user}'s exec into {pod} {container:?} was refused: {stderr}"
        );
    }
    Ok(())
}

/// No one but a node gets a token for the gateway's audience (bound to a runner pod it would
/// act as that pod): a tenant who may create `serviceaccounts/token`, as Kubernetes' `edit` role
/// grants, is refused, and so is a cluster admin; other audiences are the tenant's; a node is
/// given one.
async fn check_gateway_tokens(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let tenant = "mallory@example.com";
    let tokens = PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["serviceaccounts/token".to_owned()]),
        verbs: vec!["create".to_owned()],
        ..Default::default()
    };
    grant(&client, namespace, "edit-like-tokens", tokens, &[tenant]).await?;
    let audience = contextos_runner::gateway::identity::GATEWAY_AUDIENCE;
    let refusal = "only a node's kubelet gets a token for audience contextos-gateway";
    let token = |audience: &'static str, identity: &'static [&'static str]| async move {
        let mut args = vec![
            "create",
            "token",
            "default",
            "-n",
            namespace,
            "--audience",
            audience,
        ];
        args.extend_from_slice(identity);
        run(env, &args).await
    };
    wait_for("the token policy to refuse a tenant", TIMEOUT, || async {
        match token(audience, &["--as", "mallory@example.com"]).await {
            Ok(output) if !output.status.success() => {
                let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                Check::when(stderr.contains(refusal), || stderr.clone())
            }
            Ok(_) => Check::NotYet("a token was given".to_owned()),
            Err(err) => Check::NotYet(format!("{err:#}")),
        }
    })
    .await?;
    let admin = token(audience, &[]).await?;
    let stderr = String::from_utf8_lossy(&admin.stderr);
    ensure!(
        !admin.status.success() && stderr.contains(refusal),
        "a cluster admin was given a gateway token: {stderr}"
    );
    let other = token("example.com/other", &["--as", "mallory@example.com"]).await?;
    ensure!(
        other.status.success(),
        "a tenant's token for another audience was refused: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    // Someone an identity provider puts in a group named like the nodes' is no node.
    const IN_NODES_GROUP: [&str; 6] = [
        "--as",
        "mallory@example.com",
        "--as-group",
        "system:nodes",
        "--as-group",
        "system:masters",
    ];
    let grouped = token(audience, &IN_NODES_GROUP).await?;
    let stderr = String::from_utf8_lossy(&grouped.stderr);
    ensure!(
        !grouped.status.success() && stderr.contains(refusal),
        "a user in a group named system:nodes was given a gateway token: {stderr}"
    );
    let given = token(audience, &contextos_kind_tests::AS_A_NODE).await?;
    ensure!(
        given.status.success(),
        "a node was refused a gateway token: {}",
        String::from_utf8_lossy(&given.stderr)
    );
    Ok(())
}

/// A pod a tenant could write, with these owners and labels: bound to no node (nothing runs it),
/// and within the restricted Pod Security profile.
fn tenant_pod(env: &TestEnv, namespace: &str, name: &str, owners: &Value, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": owners, "labels": labels},
        "spec": {
            "nodeName": "nowhere",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "c", "image": env.busybox_image(),
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    })
}

/// `value` written as JSON to `<dir>/<name>.json` (for `kubectl create -f`), and that path.
fn json_file(dir: &std::path::Path, name: &str, value: &Value) -> Result<String> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, value.to_string())?;
    Ok(path.to_string_lossy().into_owned())
}

/// Only the operator makes a replay Job and only the job controller a replay pod (the gateway
/// honours a Job's read grant only from a pod labelled contextos.dev/role=replay that the Job
/// controls): a tenant's labelled pod is refused, owned by a Job or not (the job controller
/// would adopt an orphan matching its selector), and so is the label given to a pod later and a
/// tenant's Job whose pods carry it; the job controller's and the operator's accounts are
/// admitted.
async fn check_replay_pod_owners(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    // Pods are the tenant's to make and patch (granted in check_runner_pod_owners); Jobs too.
    let tenant = "mallory@example.com";
    grant(
        &client,
        namespace,
        "mallory-runs-jobs",
        PolicyRule {
            api_groups: Some(vec!["batch".to_owned()]),
            resources: Some(vec!["jobs".to_owned()]),
            verbs: vec!["get".to_owned(), "create".to_owned(), "delete".to_owned()],
            ..Default::default()
        },
        &[tenant],
    )
    .await?;
    let job = json!([{
        "apiVersion": "batch/v1", "kind": "Job", "name": "replay-policy-guardrails-0123456789",
        "uid": "6f1c8a52-0000-4000-8000-000000000003", "controller": true,
    }]);
    let replay = json!({"contextos.dev/role": "replay"});
    let pod = |name: &str, owners: &Value, labels: &Value| tenant_pod(env, namespace, name, owners, labels);
    let dir = tempfile::tempdir()?;
    let file = |name: &str, value: &Value| json_file(dir.path(), name, value);
    let refused = |output: &std::process::Output, needle: &str| {
        !output.status.success() && String::from_utf8_lossy(&output.stderr).contains(needle)
    };
    let pod_refusal = "only the job controller makes a replay Job's pod";
    let claimed = file("claimed", &pod("replay-copy", &job, &replay))?;
    wait_for(
        "the replay-pods policy to refuse a tenant's replay pod owned by a Job",
        TIMEOUT,
        || async {
            let args = ["create", "-f", &claimed, "--as", tenant, "--dry-run=server"];
            match run(env, &args).await {
                Ok(output) if refused(&output, pod_refusal) => Check::Done(()),
                Ok(output) => Check::NotYet(String::from_utf8_lossy(&output.stderr).into_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await?;
    // Nor without an owner (the job controller adopts a pod its selector matches) …
    let orphan = file("orphan", &pod("replay-orphan", &json!([]), &replay))?;
    let made = run(
        env,
        &["create", "-f", &orphan, "--as", tenant, "--dry-run=server"],
    )
    .await?;
    ensure!(
        refused(&made, pod_refusal),
        "a tenant made a labelled pod: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    // … nor by labelling a pod afterwards; a Job-owned pod without the label is the tenant's to
    // make (the gateway honours no grant from it; made as a dry run, as the garbage collector
    // removes a pod whose owner does not exist).
    let owned = file("owned", &pod("owned", &job, &json!({})))?;
    succeed(env, &["create", "-f", &owned, "--as", tenant, "--dry-run=server"]).await?;
    let plain = file("unlabelled", &pod("unlabelled", &json!([]), &json!({})))?;
    succeed(env, &["create", "-f", &plain, "--as", tenant]).await?;
    let label = json!({"metadata": {"labels": replay}}).to_string();
    let patched = run(
        env,
        &[
            "patch",
            "pod",
            "unlabelled",
            "-n",
            namespace,
            "--as",
            tenant,
            "--type=merge",
            "-p",
            &label,
        ],
    )
    .await?;
    ensure!(
        refused(&patched, pod_refusal),
        "a tenant labelled its pod a replay pod: {}",
        String::from_utf8_lossy(&patched.stderr)
    );
    // The job controller's account makes replay pods.
    let made = run(
        env,
        &[
            "create",
            "-f",
            &claimed,
            "--as",
            "system:serviceaccount:kube-system:job-controller",
            "--dry-run=server",
        ],
    )
    .await?;
    ensure!(
        made.status.success(),
        "the job controller could not make a replay pod: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    // A tenant's Job under a replay Job's name (the operator's deleted), with the copied grant:
    // refused; the operator's account makes it.
    let replay_job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "replay-policy-guardrails-0123456789", "namespace": namespace},
        "spec": {"template": {
            "metadata": {"labels": replay},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pod("template", &json!([]), &json!({}))["spec"]["securityContext"],
                "containers": pod("template", &json!([]), &json!({}))["spec"]["containers"],
            },
        }},
    });
    let replay_job = file("replay-job", &replay_job)?;
    let made = run(
        env,
        &["create", "-f", &replay_job, "--as", tenant, "--dry-run=server"],
    )
    .await?;
    ensure!(
        refused(&made, "only the ContextOS operator makes a replay Job"),
        "a tenant made a replay Job: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let operator = format!("system:serviceaccount:{SYSTEM_NAMESPACE}:contextos-operator");
    let made = run(
        env,
        &["create", "-f", &replay_job, "--as", &operator, "--dry-run=server"],
    )
    .await?;
    ensure!(
        made.status.success(),
        "the operator could not make a replay Job: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    Ok(())
}

/// Only a Policy's promotion approvers may approve its candidate (the quickstart Policy lists
/// group sre-leads).
async fn check_promotion_approvals(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let policy = yaml_documents(&repo_root().join("examples/quickstart/policy.yaml"))?.remove(0);
    apply(&client, namespace, &policy).await?;
    let approve =
        json!({"metadata": {"annotations": {"contextos.dev/approve-promotion": "sha256:0123"}}}).to_string();
    // Probes are server-side dry runs, so nothing is recorded while the policy is not in force yet.
    let annotate = |groups: &'static [&'static str], dry_run: bool| {
        let approve = approve.clone();
        async move {
            let mut args = vec![
                "patch",
                "policies.contextos.dev",
                "oncall-guardrails",
                "-n",
                namespace,
                "--as",
                "carol@example.com",
                "--type=merge",
                "-p",
                &approve,
            ];
            for group in groups {
                args.push("--as-group");
                args.push(group);
            }
            if dry_run {
                args.push("--dry-run=server");
            }
            run(env, &args).await
        }
    };
    let refused = wait_for(
        "the promotion policy to refuse a non-approver",
        TIMEOUT,
        || async {
            match annotate(&[], true).await {
                Ok(out) if !out.status.success() => {
                    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                    Check::when(stderr.contains("is not one of spec.promotion.approvers"), || {
                        stderr.clone()
                    })
                }
                Ok(_) => Check::NotYet("accepted".to_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        },
    )
    .await;
    refused?;
    let refused = annotate(&[], false).await?;
    ensure!(!refused.status.success(), "a non-approver approved the promotion");
    // Nor can they first make themselves an approver.
    let widen = json!({"spec": {"promotion": {"approvers": {"users": ["carol@example.com"], "groups": ["sre-leads"]}}}})
        .to_string();
    let widened = run(
        env,
        &[
            "patch",
            "policies.contextos.dev",
            "oncall-guardrails",
            "-n",
            namespace,
            "--as",
            "carol@example.com",
            "--type=merge",
            "-p",
            &widen,
        ],
    )
    .await?;
    ensure!(
        !widened.status.success()
            && String::from_utf8_lossy(&widened.stderr).contains("may change the promotion gate"),
        "a non-approver widened the approvers: {}",
        String::from_utf8_lossy(&widened.stderr)
    );
    let allowed = annotate(&["sre-leads"], false).await?;
    ensure!(
        allowed.status.success(),
        "a member of sre-leads was refused: {}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    check_promote_verb(env, namespace, &policy).await
}

/// Where no approver is listed, editing is not deciding: a new Policy that names its author as
/// its gate's approver, a bypass of a gate that lists nobody, and a change to that gate all take
/// the `promote` verb (ClusterRole contextos-promoter).
async fn check_promote_verb(env: &'static TestEnv, namespace: &str, policy: &Value) -> Result<()> {
    let client = env.client();
    let dir = tempfile::tempdir()?;
    let as_carol = |args: Vec<String>| async move {
        let mut args = args;
        args.extend([
            "-n".to_owned(),
            namespace.to_owned(),
            "--as".to_owned(),
            "carol@example.com".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(env, &args).await?;
        anyhow::Ok(if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        })
    };
    let create = |name: &str, promotion: Value| {
        let mut object = policy.clone();
        object["metadata"] = json!({"name": name, "namespace": namespace});
        object["spec"]["promotion"] = promotion;
        let file = dir.path().join(format!("{name}.json"));
        async move {
            std::fs::write(&file, object.to_string())?;
            as_carol(vec![
                "create".into(),
                "-f".into(),
                file.to_string_lossy().into_owned(),
            ])
            .await
        }
    };
    let named = create(
        "self-governed",
        json!({"approvers": {"users": ["carol@example.com"]}}),
    )
    .await?;
    ensure!(
        named
            .as_ref()
            .is_err_and(|e| e.contains("may not choose who governs a new object's promotions")),
        "carol named herself the approver of a new Policy: {named:?}"
    );
    let unlisted = create("unlisted-gate", json!({"mode": "automatic"})).await?;
    ensure!(
        unlisted.is_ok(),
        "a gate without approvers was refused: {unlisted:?}"
    );
    let bypass =
        json!({"metadata": {"annotations": {"contextos.dev/promote-without-replay": "sha256:0123"}}})
            .to_string();
    let patch = |body: String| {
        as_carol(vec![
            "patch".into(),
            "policies.contextos.dev".into(),
            "unlisted-gate".into(),
            "--type=merge".into(),
            "-p".into(),
            body,
        ])
    };
    let refused = patch(bypass.clone()).await?;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("it takes the 'promote' verb on policies")),
        "an editor bypassed a gate that lists no approver: {refused:?}"
    );
    let loosen = json!({"spec": {"promotion": {"replay": {"maxDivergencePercent": 100}}}}).to_string();
    let loosened = patch(loosen).await?;
    ensure!(
        loosened
            .as_ref()
            .is_err_and(|e| e.contains("may not change the promotion gate")),
        "an editor loosened a gate that lists no approver: {loosened:?}"
    );
    let rule = PolicyRule {
        api_groups: Some(vec!["contextos.dev".to_owned()]),
        resources: Some(vec!["policies".to_owned()]),
        verbs: vec!["promote".to_owned()],
        ..Default::default()
    };
    grant(
        &client,
        namespace,
        "policy-promoters",
        rule,
        &["carol@example.com"],
    )
    .await?;
    wait_for("a promoter's bypass admitted", TIMEOUT, || async {
        match patch(bypass.clone()).await {
            Ok(Ok(())) => Check::Done(()),
            Ok(Err(e)) => Check::NotYet(e),
            Err(e) => Check::NotYet(format!("{e:#}")),
        }
    })
    .await?;
    Ok(())
}

/// An Agent's promotion is governed by the approvers the operator derived for its gate
/// (status.promotionGate, which only the operator writes): not by whoever edits the Agent, not
/// before the gate is derived, and not by adding oneself through the Agent's own spec.promotion.
async fn check_agent_promotion_approvals(env: &'static TestEnv, namespace: &str) -> Result<()> {
    let client = env.client();
    let mut agent = yaml_documents(&repo_root().join("examples/quickstart/agent.yaml"))?.remove(0);
    no_operator(&mut agent);
    let name = agent["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    apply(&client, namespace, &agent).await?;
    let rule = PolicyRule {
        api_groups: Some(vec!["contextos.dev".to_owned()]),
        resources: Some(vec!["agents".to_owned()]),
        verbs: vec!["get".to_owned(), "patch".to_owned(), "create".to_owned()],
        ..Default::default()
    };
    grant(
        &client,
        namespace,
        "agent-editors",
        rule,
        &["carol@example.com", "rel@example.com"],
    )
    .await?;
    let bypass =
        json!({"metadata": {"annotations": {"contextos.dev/promote-without-replay": "sha256:0123"}}})
            .to_string();
    let patch = |user: &'static str, body: String, dry_run: bool| {
        let name = name.clone();
        async move {
            let mut args = vec![
                "patch",
                "agents.contextos.dev",
                &name,
                "-n",
                namespace,
                "--as",
                user,
                "--type=merge",
                "-p",
                &body,
            ];
            if dry_run {
                args.push("--dry-run=server");
            }
            let out = run(env, &args).await?;
            anyhow::Ok(if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            })
        }
    };
    // Before the operator derived the gate, nobody approves.
    let early = wait_for(
        "agent promotion refused before its gate is derived",
        TIMEOUT,
        || async {
            match patch("rel@example.com", bypass.clone(), true).await {
                Ok(Err(e)) if e.contains("after the operator has derived its gate") => Check::Done(e),
                Ok(Err(e)) => Check::NotYet(e),
                Ok(Ok(())) => Check::NotYet("accepted".to_owned()),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        },
    )
    .await?;
    ensure!(
        early.contains("metadata.annotations[contextos.dev/promote-without-replay]"),
        "{early}"
    );
    // The gate as the operator would derive it from a gated Policy with one approver. (An
    // operator would write it; the e2e operator is kept away from this Agent by a label.)
    let gate = json!({"status": {"promotionGate": {"from": ["Policy/oncall-guardrails"], "approvers": {"users": ["rel@example.com"]}}}})
        .to_string();
    let refused = wait_for("a non-approver refused by the derived gate", TIMEOUT, || async {
        let status = run(
            env,
            &[
                "patch",
                "agents.contextos.dev",
                &name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &gate,
            ],
        )
        .await;
        if let Err(e) = status {
            return Check::NotYet(format!("{e:#}"));
        }
        match patch("carol@example.com", bypass.clone(), true).await {
            Ok(Err(e)) if e.contains("is not one of status.promotionGate.approvers") => Check::Done(e),
            Ok(Err(e)) => Check::NotYet(e),
            Ok(Ok(())) => Check::NotYet("accepted".to_owned()),
            Err(e) => Check::NotYet(format!("{e:#}")),
        }
    })
    .await?;
    ensure!(refused.contains("carol@example.com"), "{refused}");
    // Nor may she give the Agent a gate of its own that lists her.
    let own = json!({"spec": {"promotion": {"approvers": {"users": ["carol@example.com"]}}}}).to_string();
    let widened = patch("carol@example.com", own, false).await?;
    ensure!(
        widened
            .as_ref()
            .is_err_and(|e| e.contains("may change the promotion gate")),
        "a non-approver gave the Agent her own gate: {widened:?}"
    );
    let allowed = patch("rel@example.com", bypass.clone(), false).await?;
    ensure!(allowed.is_ok(), "the derived approver was refused: {allowed:?}");
    // A new Agent cannot be born approved.
    let mut born = agent.clone();
    born["metadata"]["name"] = json!("born-approved");
    born["metadata"]["annotations"] = json!({"contextos.dev/promote-without-replay": "sha256:0123"});
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("born.json");
    std::fs::write(&file, born.to_string())?;
    let file = file.to_string_lossy().into_owned();
    let created = run(
        env,
        &["create", "-f", &file, "-n", namespace, "--as", "rel@example.com"],
    )
    .await?;
    ensure!(
        !created.status.success()
            && String::from_utf8_lossy(&created.stderr).contains("after the operator has derived its gate"),
        "an Agent was created with a promotion bypass: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    Ok(())
}

/// Keeps the e2e operator (which other tests in this binary run) away from an object whose
/// status these tests write themselves, as the operator would.
fn no_operator(object: &mut Value) {
    contextos_kind_tests::operator_env::add_labels(
        object,
        &json!({contextos_kind_tests::operator_env::CHAOS_LABEL: "admission-only"}),
    );
}

/// JSON patches of one Session, made as an impersonated user with kubectl.
struct SessionPatches<'a> {
    env: &'a TestEnv,
    namespace: &'a str,
    name: &'a str,
}

impl SessionPatches<'_> {
    /// `Ok(Err(stderr))` when the API server refused the patch.
    async fn patch(&self, user: &str, patch: &Value, dry_run: bool) -> Result<Result<(), String>> {
        self.patch_as(user, &[], patch, dry_run).await
    }

    /// Like `patch`, as `user` in `groups` (impersonated).
    async fn patch_in_groups(
        &self,
        user: &str,
        groups: &[&str],
        patch: &Value,
    ) -> Result<Result<(), String>> {
        self.patch_as(user, groups, patch, false).await
    }

    async fn patch_as(
        &self,
        user: &str,
        groups: &[&str],
        patch: &Value,
        dry_run: bool,
    ) -> Result<Result<(), String>> {
        let patch = patch.to_string();
        let mut args = vec![
            "patch",
            "sessions.contextos.dev",
            self.name,
            "-n",
            self.namespace,
            "--as",
            user,
            "--type=json",
            "-p",
            &patch,
        ];
        for group in groups {
            args.push("--as-group");
            args.push(group);
        }
        if dry_run {
            args.push("--dry-run=server");
        }
        let output = run(self.env, &args).await?;
        Ok(if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        })
    }

    /// Waits until the approvals policy refuses `patch` by `user`: the binding and the RBAC
    /// grants take a moment to reach the API server's caches. Dry runs change nothing meanwhile.
    async fn wait_until_refused(&self, user: &str, patch: &Value) -> Result<()> {
        wait_for("the approvals policy to refuse the patch", TIMEOUT, || async {
            match self.patch(user, patch, true).await {
                Ok(Err(refusal)) if refusal.contains(APPROVALS_POLICY) => Check::Done(()),
                Ok(Err(refusal)) => Check::NotYet(refusal),
                Ok(Ok(())) => Check::NotYet("accepted".to_owned()),
                Err(err) => Check::NotYet(format!("{err:#}")),
            }
        })
        .await?;
        Ok(())
    }

    async fn approvers(&self, client: &Client) -> Result<Vec<String>> {
        let kind = json!({"apiVersion": "contextos.dev/v1alpha1", "kind": "Session"});
        let session = api_for(client, self.namespace, &kind)
            .await?
            .get(self.name)
            .await?;
        Ok(session.data["spec"]["approvals"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a["approver"].as_str().unwrap_or_default().to_owned())
            .collect())
    }
}

/// A Role letting `users` read, create and patch Sessions (and Policies) in `namespace`.
async fn allow_to_approve(client: &Client, namespace: &str, users: &[&str]) -> Result<()> {
    let rule = PolicyRule {
        api_groups: Some(vec!["contextos.dev".to_owned()]),
        resources: Some(vec!["sessions".to_owned(), "policies".to_owned()]),
        verbs: vec!["get".to_owned(), "patch".to_owned(), "create".to_owned()],
        ..Default::default()
    };
    grant(client, namespace, "session-approvers", rule, users).await
}

/// On a cluster where ContextOS is installed for real, the tests only dry-run the base: applying
/// it would rebind the live policy, and cleaning up would uninstall it.
async fn already_installed(env: &TestEnv) -> Result<bool> {
    if Api::<Namespace>::all(env.client())
        .get_opt(SYSTEM_NAMESPACE)
        .await?
        .is_none()
    {
        return Ok(false);
    }
    let manifests = repo_root().join("manifests");
    let manifests = manifests.to_string_lossy();
    succeed(
        env,
        &["apply", "--server-side", "--dry-run=server", "-k", &manifests],
    )
    .await?;
    eprintln!(
        "manifests: {SYSTEM_NAMESPACE} exists (ContextOS is installed on this cluster); the base was \
         only dry-run, nothing was changed"
    );
    Ok(true)
}

/// The base, applied through a throwaway overlay that binds every admission policy to one
/// namespace: other tests in this binary append approvals, change promotion gates and name
/// images as the admin user, which the policies (rightly) refuse.
struct Install {
    env: &'static TestEnv,
    overlay: tempfile::TempDir,
}

impl Install {
    async fn apply(env: &'static TestEnv, sessions_namespace: &str) -> Result<Self> {
        let overlay = tempfile::tempdir().context("create the overlay directory")?;
        let bind_to_namespace = json!([{
            "op": "add",
            "path": "/spec/matchResources",
            "value": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": sessions_namespace}}}
        }]);
        // Every binding, named or not: one left cluster-wide refuses other tests' requests.
        let patches = [json!({
            "target": {"kind": "ValidatingAdmissionPolicyBinding"},
            "patch": bind_to_namespace.to_string(),
        })];
        let kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            // kustomize takes only relative paths.
            "resources": [relative_path(overlay.path(), &repo_root().join("manifests"))?],
            // Bound to the test's namespace only, so other tests running meanwhile are unaffected.
            "patches": patches,
        });
        std::fs::write(
            overlay.path().join("kustomization.yaml"),
            kustomization.to_string(),
        )
        .context("write the overlay")?;
        let install = Self { env, overlay };
        match install.apply_again().await {
            Ok(()) => Ok(install),
            Err(err) => {
                let removed = install.remove().await;
                first_error(Err(err), removed)
            }
        }
    }

    /// `kubectl apply -k --server-side`. The environment installed the CRDs with its own field
    /// manager; kubectl's apply of the same values shares their ownership without a conflict, so
    /// no `--force-conflicts` is needed (a conflict would mean the CRDs differ from the files).
    async fn apply_again(&self) -> Result<()> {
        succeed(self.env, &["apply", "--server-side", "-k", &self.dir()]).await?;
        Ok(())
    }

    fn dir(&self) -> String {
        self.overlay.path().to_string_lossy().into_owned()
    }

    /// `kind namespace/name` → resourceVersion of every object of the base.
    async fn resource_versions(&self) -> Result<BTreeMap<String, String>> {
        let output = succeed(self.env, &["get", "-k", &self.dir(), "-o", "json"]).await?;
        let list: Value = serde_json::from_slice(&output.stdout).context("kubectl get -o json")?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let meta = &o["metadata"];
                (
                    format!(
                        "{} {}/{}",
                        o["kind"].as_str().unwrap_or_default(),
                        meta["namespace"].as_str().unwrap_or_default(),
                        meta["name"].as_str().unwrap_or_default()
                    ),
                    meta["resourceVersion"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// Deletes everything the base installed except the CRDs, and waits for the namespace to go.
    async fn remove(self) -> Result<()> {
        let rendered = render(self.env, self.overlay.path()).await?;
        let installed: Vec<Value> = rendered
            .into_iter()
            .filter(|o| o["kind"] != "CustomResourceDefinition")
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": installed});
        let file = self.overlay.path().join("installed.json");
        std::fs::write(&file, list.to_string()).context("write the list of installed objects")?;
        let file = file.to_string_lossy();
        succeed(
            self.env,
            &["delete", "--ignore-not-found", "--wait=false", "-f", &file],
        )
        .await?;
        // testenv runs no pvc-protection controller to lift the claim's finalizer (on a real
        // cluster it does, once no pod uses the claim); without this the namespace never goes.
        let client = self.env.client();
        let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), SYSTEM_NAMESPACE);
        for claim in claims.list(&Default::default()).await? {
            let name = claim.metadata.name.unwrap_or_default();
            let lift = json!({"metadata": {"finalizers": null}});
            claims
                .patch(&name, &PatchParams::default(), &Patch::Merge(&lift))
                .await
                .with_context(|| format!("lift the finalizers of claim {name}"))?;
        }
        wait_for_deletion(
            &Api::<Namespace>::all(client),
            SYSTEM_NAMESPACE,
            None,
            TIMEOUT,
            |ns| format!("{:?}", ns.status),
        )
        .await?;
        Ok(())
    }
}

/// `first`'s error if it failed (reporting `second`'s too), else `second`.
fn first_error<T>(first: Result<T>, second: Result<()>) -> Result<T> {
    match (first, second) {
        (Err(err), Err(also)) => {
            eprintln!("manifests: cleaning up failed too: {also:#}");
            Err(err)
        }
        (first, second) => second.and(first),
    }
}

/// The objects `kubectl kustomize dir` renders.
async fn render(env: &TestEnv, dir: &Path) -> Result<Vec<Value>> {
    let dir = dir.to_string_lossy();
    let output = succeed(env, &["kustomize", &dir]).await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: Value = serde::Deserialize::deserialize(document).context("kubectl kustomize output")?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    Ok(objects)
}

async fn run(env: &TestEnv, args: &[&str]) -> Result<Output> {
    env.kubectl()
        .args(args)
        .output()
        .await
        .with_context(|| format!("run kubectl {}", args.join(" ")))
}

/// Runs kubectl; a non-zero exit is an error carrying its stderr.
async fn succeed(env: &TestEnv, args: &[&str]) -> Result<Output> {
    let output = run(env, args).await?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// `to` relative to the directory `from` (both absolute).
fn relative_path(from: &Path, to: &Path) -> Result<String> {
    let from = from
        .canonicalize()
        .with_context(|| format!("resolve {}", from.display()))?;
    let to = to
        .canonicalize()
        .with_context(|| format!("resolve {}", to.display()))?;
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    path.extend(&to[common..]);
    Ok(path.to_string_lossy().into_owned())
}
