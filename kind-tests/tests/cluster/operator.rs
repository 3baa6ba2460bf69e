//! The operator end to end against the real API server: the quickstart becomes Ready, a
//! Session runs in a sandboxed runner pod (the real `contextos` binary on the local node, in a
//! namespace enforcing Pod Security "restricted"), pauses for approval, resumes when an
//! approver patches `spec.approvals`, succeeds with a verifiable record in the store and each
//! tool effect once; and invalid objects get `Ready=False` naming the field.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Agent, Policy, Session, session::SessionPhase};
use contextos_kind_tests::{
    Check, TestEnv, TestNamespace,
    operator_env::{self, OperatorEnv},
    wait_for_object,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::objects::apply;

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The quickstart, with the agent's tools pointed at the test's ops-tools server and the
/// webhook key in a Secret; the Session is left out.
fn objects(env: &TestEnv, op: &OperatorEnv) -> Result<Vec<Value>> {
    objects_for(env, &op.tools_url)
}

/// [`objects`] for the ops-tools server at `tools_url`.
pub fn objects_for(env: &TestEnv, tools_url: &str) -> Result<Vec<Value>> {
    operator_env::quickstart_for(env, tools_url).map_err(anyhow::Error::msg)
}

pub fn session(name: &str) -> Result<Value> {
    operator_env::quickstart_session(name).map_err(anyhow::Error::msg)
}

pub fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> String {
    conditions.iter().find(|c| c.type_ == type_).map_or_else(
        || "none".into(),
        |c| format!("{} {} {}", c.status, c.reason, c.message),
    )
}

/// Waits until the Policy's condition `type_` reads `<status> <reason> <message>` starting with
/// `prefix`.
pub async fn policy_condition(api: &Api<Policy>, name: &str, type_: &str, prefix: &str) -> Result<Policy> {
    Ok(
        wait_for_object(api, name, &format!("{type_}: {prefix}"), TIMEOUT, |p: &Policy| {
            let text = condition(&p.status.clone().unwrap_or_default().conditions, type_);
            Check::when(text.starts_with(prefix), || text.clone())
        })
        .await?,
    )
}

/// Waits until the quickstart's Agent in `ns` is Ready.
pub async fn agent_ready(ns: &TestNamespace) -> Result<Agent> {
    let agents: Api<Agent> = ns.api();
    Ok(
        wait_for_object(&agents, "oncall-assistant", "Ready", TIMEOUT, |a: &Agent| {
            let conditions = a.status.clone().unwrap_or_default().conditions;
            Check::when(contextos_operator::controllers::is_ready(&conditions), || {
                condition(&conditions, "Ready")
            })
        })
        .await?,
    )
}

pub async fn phase_is(api: &Api<Session>, name: &str, wanted: SessionPhase) -> Result<Session> {
    Ok(
        wait_for_object(api, name, &format!("phase {wanted:?}"), TIMEOUT, |s: &Session| {
            let status = s.status.clone().unwrap_or_default();
            Check::when(status.phase == Some(wanted), || {
                format!(
                    "phase {:?}, Ready: {}",
                    status.phase,
                    condition(&status.conditions, "Ready")
                )
            })
        })
        .await?,
    )
}

#[tokio::test]
async fn a_session_runs_in_a_restricted_pod_pauses_for_approval_and_succeeds_with_its_record() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::with_labels(
        env,
        "operator-session",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let client = env.client();
    for object in objects(env, op)? {
        apply(&client, ns.name(), &object).await?;
    }
    agent_ready(&ns).await?;

    apply(&client, ns.name(), &session("checkout")?).await?;
    let sessions: Api<Session> = ns.api();
    let paused = phase_is(&sessions, "checkout", SessionPhase::AwaitingApproval).await?;
    let pending = paused
        .status
        .clone()
        .and_then(|s| s.pending_approval)
        .context("AwaitingApproval shows the pending call")?;
    ensure!(pending.tool == "restart_deployment", "pending {pending:?}");
    let pods: Api<Pod> = ns.api();
    let first = pods.get("checkout-run-1").await?;
    let spec = first.spec.clone().unwrap_or_default();
    ensure!(
        spec.automount_service_account_token == Some(false),
        "no service-account token"
    );
    ensure!(
        first
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o.iter().any(|r| r.kind == "Session")),
        "the pod is owned by its Session"
    );

    let approval = json!({"spec": {"approvals": [{
        "callHash": pending.call_hash,
        "decision": "approve",
        "approver": "dana@example.com",
    }]}});
    sessions
        .patch("checkout", &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    let done = phase_is(&sessions, "checkout", SessionPhase::Succeeded).await?;
    let status = done.status.clone().unwrap_or_default();
    ensure!(
        status.attempt == Some(2),
        "the approval started attempt 2: {:?}",
        status.attempt
    );
    ensure!(
        status
            .output
            .as_deref()
            .is_some_and(|o| o.contains("checkout-api")),
        "output {:?}",
        status.output
    );
    ensure!(
        pods.get_opt("checkout-run-2").await?.is_some(),
        "one pod per attempt"
    );
    // The answer came at step 6; its checkpoint is the last one.
    let checkpoint = status.last_checkpoint.clone().context("lastCheckpoint")?;
    ensure!(
        checkpoint.step == 6 && checkpoint.entry_hash.len() == 64,
        "{checkpoint:?}"
    );

    // The record is in the store, verifies with the tenant's published key (the gateway's), and
    // ends at the reported head.
    op.verify_session_record(ns.name(), &status)
        .await
        .map_err(anyhow::Error::msg)?;

    // `contextos audit --records` over the run's record in the cluster's store finds what it
    // did: the tool the script never calls, and no rule unused (the namespace deletion was
    // refused by its deny rule, the restart waited on its approval rule).
    audit_records(env, op, ns.name()).await?;
    ns.pass();
    Ok(())
}

/// The quickstart's manifests audited against the records of `namespace` in the e2e store.
async fn audit_records(env: &TestEnv, op: &OperatorEnv, namespace: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (i, object) in objects(env, op)?.iter().enumerate() {
        let mut object = object.clone();
        object["metadata"]["namespace"] = json!(namespace);
        std::fs::write(
            dir.path().join(format!("{i:02}.yaml")),
            serde_yaml::to_string(&object)?,
        )?;
    }
    let contextos = contextos_kind_tests::process_node::workspace_binary("contextos")
        .context("target/<profile>/contextos is missing: `make kind-tests` builds it")?;
    let output = tokio::process::Command::new(contextos)
        .args([
            "--store",
            &op.store,
            "--tenant",
            namespace,
            "audit",
            "--records",
            "--format",
            "json",
        ])
        .arg(dir.path())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "contextos audit --records failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&stdout)?;
    let findings: Vec<(String, String)> = report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let text = |key: &str| f[key].as_str().unwrap_or_default().to_owned();
            (text("rule"), text("message"))
        })
        .collect();
    let has = |rule: &str, text: &str| findings.iter().any(|(r, m)| r == rule && m.contains(text));
    ensure!(
        has(
            "records/tool-never-used",
            "error_budget was called in none of 1 runs"
        ),
        "{findings:#?}"
    );
    ensure!(
        !findings.iter().any(|(r, _)| r == "records/rule-never-matched"),
        "every rule's match selected a call of the run: {findings:#?}"
    );
    ensure!(
        !has("records/tool-never-used", "delete_namespace"),
        "{findings:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_objects_are_not_ready_and_say_which_field_to_fix() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: needs a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "operator-invalid").await?;
    let client = env.client();
    for object in objects(env, op)? {
        let mut object = object;
        if object["kind"] == "Agent" {
            object["spec"]["contextPackRef"]["name"] = json!("no-such-pack");
        }
        if object["kind"] == "Policy" {
            object["spec"]["rules"][2]["condition"] = json!("call.args.severity ==");
        }
        apply(&client, ns.name(), &object).await?;
    }
    let agents: Api<Agent> = ns.api();
    wait_for_object(
        &agents,
        "oncall-assistant",
        "Ready=False naming the reference",
        TIMEOUT,
        |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(
                text.starts_with(
                    "False ReferenceNotFound spec.contextPackRef.name: ContextPack no-such-pack",
                ),
                || text.clone(),
            )
        },
    )
    .await?;
    let policies: Api<Policy> = ns.api();
    policy_condition(
        &policies,
        "oncall-guardrails",
        "Ready",
        "False InvalidExpression policy oncall-guardrails: spec.rules[2]",
    )
    .await?;
    // Health tools that follow kstatus (Argo CD, Flux, kubectl wait pipelines) see it failed, not
    // forever progressing; the Agent waiting on it is still on its way.
    policy_condition(
        &policies,
        "oncall-guardrails",
        "Stalled",
        "True InvalidExpression policy oncall-guardrails: spec.rules[2]",
    )
    .await?;
    policy_condition(
        &policies,
        "oncall-guardrails",
        "Reconciling",
        "False InvalidExpression",
    )
    .await?;
    apply(&client, ns.name(), &session("waiting")?).await?;
    let sessions: Api<Session> = ns.api();
    wait_for_object(
        &sessions,
        "waiting",
        "Pending on its agent",
        TIMEOUT,
        |s: &Session| {
            let status = s.status.clone().unwrap_or_default();
            let text = condition(&status.conditions, "Ready");
            Check::when(
                status.phase == Some(SessionPhase::Pending) && text.contains("ReferenceNotReady"),
                || format!("{:?} {text}", status.phase),
            )
        },
    )
    .await?;
    ensure!(
        Api::<Pod>::namespaced(client.clone(), ns.name())
            .list(&Default::default())
            .await?
            .items
            .is_empty(),
        "no runner pod for a Session whose agent is not Ready"
    );
    // An Agent whose tool would start code from a command that its SandboxProfile does not let
    // execute code (the quickstart's allows none); its other references are valid.
    let mut policy = objects(env, op)?
        .into_iter()
        .find(|o| o["kind"] == "Policy")
        .context("the quickstart's Policy")?;
    policy["metadata"]["name"] = json!("stdio-policy");
    apply(&client, ns.name(), &policy).await?;
    let quickstart = objects(env, op)?;
    let mut stdio = quickstart
        .iter()
        .find(|o| o["kind"] == "Agent")
        .cloned()
        .context("the quickstart's Agent")?;
    // The diagnosis skill's tools as the Agent's own.
    stdio["spec"]["tools"] = quickstart
        .iter()
        .find(|o| o["kind"] == "Skill" && o["metadata"]["name"] == "diagnosis")
        .map(|s| s["spec"]["tools"].clone())
        .context("the quickstart's diagnosis Skill")?;
    if let Some(spec) = stdio["spec"].as_object_mut() {
        spec.remove("skillRefs");
    }
    stdio["metadata"]["name"] = json!("stdio-agent");
    stdio["spec"]["policyRefs"] = json!([{"name": "stdio-policy"}]);
    stdio["spec"]["tools"][1]["adapter"] = json!({"mcp": {"command": ["/bin/sh", "-c", "env"]}});
    apply(&client, ns.name(), &stdio).await?;
    wait_for_object(
        &agents,
        "stdio-agent",
        "Ready=False for a command-started tool",
        TIMEOUT,
        |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(
                text.contains("ExecutionNotAllowed")
                    && text.contains("spec.tools[1] (get_service_status)")
                    && text.contains("spec.execution.allowedTools"),
                || text.clone(),
            )
        },
    )
    .await?;
    entity_types_are_the_namespaces_ontology(env, op, &ns).await?;
    ns.pass();
    Ok(())
}

/// A SandboxProfile whose values no runner pod could be made with, or whose RuntimeClass does
/// not exist, is Ready=False naming the field (and its Agent waits on it); a runner pod the API
/// server refuses (here a ResourceQuota allowing no pod) is said on its Session, which starts
/// once the pod is allowed.
#[tokio::test]
async fn a_sandbox_no_pod_can_have_is_not_ready_and_a_refused_runner_pod_is_said_on_its_session() -> Result<()>
{
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: needs a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "operator-sandbox-values").await?;
    let client = env.client();
    let quickstart = objects(env, op)?;
    let profile = quickstart
        .iter()
        .find(|o| o["kind"] == "SandboxProfile")
        .cloned()
        .context("the quickstart's SandboxProfile")?;
    for object in &quickstart {
        let mut object = object.clone();
        if object["kind"] == "SandboxProfile" {
            object["spec"]["resources"]["memory"] = json!("-1");
        }
        apply(&client, ns.name(), &object).await?;
    }
    let profiles: Api<contextos_crds::SandboxProfile> = ns.api();
    let name = profile["metadata"]["name"]
        .as_str()
        .context("profile name")?
        .to_owned();
    let not_ready = |prefix: &'static str| {
        let (profiles, name) = (profiles.clone(), name.clone());
        async move {
            wait_for_object(
                &profiles,
                &name,
                prefix,
                TIMEOUT,
                |p: &contextos_crds::SandboxProfile| {
                    let text = condition(&p.status.clone().unwrap_or_default().conditions, "Ready");
                    Check::when(text.starts_with(prefix), || text.clone())
                },
            )
            .await
        }
    };
    not_ready("False InvalidSpec spec.resources.memory: \"-1\" is negative").await?;
    let agents: Api<Agent> = ns.api();
    wait_for_object(
        &agents,
        "oncall-assistant",
        "waiting on its profile",
        TIMEOUT,
        |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(
                text.starts_with("False ReferenceNotReady spec.sandboxProfileRef.name"),
                || text.clone(),
            )
        },
    )
    .await?;
    let mut missing_class = profile.clone();
    missing_class["spec"]["runtimeClassName"] = json!("no-such-runtime");
    apply(&client, ns.name(), &missing_class).await?;
    not_ready("False InvalidSpec spec.runtimeClassName: RuntimeClass no-such-runtime does not exist").await?;
    apply(&client, ns.name(), &profile).await?;
    agent_ready(&ns).await?;

    // No pod may be made in the namespace (an admission policy of the test's own, as a platform
    // might have): the Session says why it does not start.
    let policy_name = format!("no-pods-{}", ns.name());
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy_name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
            }]},
            "validations": [{"expression": "false", "message": "no pods in this namespace (test policy)"}],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy_name},
        "spec": {
            "policyName": policy_name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}}},
        },
    });
    let policies =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>::all(client.clone());
    let bindings = Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>::all(
        client.clone(),
    );
    policies
        .create(&Default::default(), &serde_json::from_value(policy)?)
        .await?;
    bindings
        .create(&Default::default(), &serde_json::from_value(binding)?)
        .await?;
    // The policy takes effect once the API server has loaded it: wait until it refuses a pod
    // (asked as a dry run).
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "policy-probe"},
        "spec": {"containers": [{"name": "probe", "image": "busybox"}]},
    }))?;
    let pods: Api<Pod> = ns.api();
    let dry_run = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match pods.create(&dry_run, &probe).await {
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => break,
            answer if std::time::Instant::now() > deadline => {
                anyhow::bail!("the policy never refused a pod: {:?}", answer.map(|_| "created"))
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    apply(&client, ns.name(), &session("refused")?).await?;
    let sessions: Api<Session> = ns.api();
    wait_for_object(
        &sessions,
        "refused",
        "Pending, its pod refused",
        TIMEOUT,
        |s: &Session| {
            let status = s.status.clone().unwrap_or_default();
            let text = condition(&status.conditions, "Ready");
            Check::when(
                status.phase == Some(SessionPhase::Pending)
                    && text.contains("PodRejected the API server refused runner pod refused-run-1")
                    && text.contains("no pods in this namespace"),
                || format!("{:?} {text}", status.phase),
            )
        },
    )
    .await?;
    bindings.delete(&policy_name, &Default::default()).await?;
    policies.delete(&policy_name, &Default::default()).await?;
    wait_for_object(
        &sessions,
        "refused",
        "started once allowed",
        TIMEOUT,
        |s: &Session| {
            let status = s.status.clone().unwrap_or_default();
            Check::when(status.phase.is_some_and(|p| p != SessionPhase::Pending), || {
                format!("{:?} {}", status.phase, condition(&status.conditions, "Ready"))
            })
        },
    )
    .await?;
    ns.pass();
    Ok(())
}

/// A tool that touches an entity type the namespace does not declare leaves its Agent
/// Ready=False naming the field; an Ontology that does not compile is Ready=False naming its
/// field, one named otherwise is refused at admission; the fixed Ontology makes the Agent Ready.
async fn entity_types_are_the_namespaces_ontology(
    env: &TestEnv,
    op: &OperatorEnv,
    ns: &TestNamespace,
) -> Result<()> {
    let client = env.client();
    let mut policy = objects(env, op)?
        .into_iter()
        .find(|o| o["kind"] == "Policy")
        .context("the quickstart's Policy")?;
    policy["metadata"]["name"] = json!("entity-policy");
    apply(&client, ns.name(), &policy).await?;
    let quickstart = objects(env, op)?;
    let mut agent = quickstart
        .iter()
        .find(|o| o["kind"] == "Agent")
        .cloned()
        .context("the quickstart's Agent")?;
    // The diagnosis skill's tools as the Agent's own.
    agent["spec"]["tools"] = quickstart
        .iter()
        .find(|o| o["kind"] == "Skill" && o["metadata"]["name"] == "diagnosis")
        .map(|s| s["spec"]["tools"].clone())
        .context("the quickstart's diagnosis Skill")?;
    if let Some(spec) = agent["spec"].as_object_mut() {
        spec.remove("skillRefs");
    }
    agent["metadata"]["name"] = json!("entity-agent");
    agent["spec"]["policyRefs"] = json!([{"name": "entity-policy"}]);
    agent["spec"]["tools"][0]["touches"] = json!([{"type": "service", "argument": "/service"}]);
    apply(&client, ns.name(), &agent).await?;
    let agents: Api<Agent> = ns.api();
    let ready = |wanted: &'static str| {
        move |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(text.starts_with(wanted), || text.clone())
        }
    };
    wait_for_object(
        &agents,
        "entity-agent",
        "Ready=False naming the unknown entity type",
        TIMEOUT,
        ready("False InvalidSpec spec.tools[0].touches[0].type (search_runbooks): \"service\" is not an entity type"),
    )
    .await?;
    let ontology = |name: &str, pattern: &str| {
        json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "Ontology",
            "metadata": {"name": name},
            "spec": {"entityTypes": [{"name": "service"}, {"name": "incident", "idPattern": pattern}]},
        })
    };
    let refused = apply(&client, ns.name(), &ontology("incidents", "INC-[0-9]+"))
        .await
        .expect_err("an Ontology not named default is refused");
    ensure!(
        format!("{refused:#}").contains("named default"),
        "refused without saying why: {refused:#}"
    );
    apply(&client, ns.name(), &ontology("default", "INC-(")).await?;
    wait_for_object(
        &agents,
        "entity-agent",
        "Ready=False naming the Ontology's field",
        TIMEOUT,
        ready("False ReferenceNotReady the namespace's entity types: Ontology default: spec.entityTypes[1].idPattern"),
    )
    .await?;
    apply(&client, ns.name(), &ontology("default", "INC-[0-9]+")).await?;
    wait_for_object(
        &agents,
        "entity-agent",
        "Ready once the type is declared",
        TIMEOUT,
        ready("True"),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_gateway_reads_a_namespaces_secrets_only_while_an_agent_is_there() -> Result<()> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: needs a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "operator-access").await?;
    let client = env.client();
    let agent = objects(env, op)?
        .into_iter()
        .find(|o| o["kind"] == "Agent")
        .context("the quickstart has an Agent")?;
    let mut second = agent.clone();
    second["metadata"]["name"] = json!("second-assistant");
    let bindings: Api<RoleBinding> = ns.api();
    let binding = contextos_operator::gateway_access::AGENT_SECRETS_ROLE;
    let bound = || async { Ok::<_, anyhow::Error>(bindings.get_opt(binding).await?.is_some()) };
    let until = |wanted: bool, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while bound().await? != wanted {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, anyhow::Error>(())
    };
    apply(&client, ns.name(), &agent).await?;
    apply(&client, ns.name(), &second).await?;
    until(true, "the namespace's Agents bind the gateway's Secret reading").await?;
    let agents: Api<Agent> = ns.api();
    agents.delete("oncall-assistant", &Default::default()).await?;
    // The binding controller is woken by the deletion; another Agent is there, so it stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        bound().await?,
        "the binding went with one Agent while another is there"
    );
    agents.delete("second-assistant", &Default::default()).await?;
    until(false, "the binding goes with the namespace's last Agent").await?;
    apply(&client, ns.name(), &agent).await?;
    until(true, "a new Agent binds it again").await
}
