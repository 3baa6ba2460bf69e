//! The operator under faults and between tenants: leader election hands over only after the
//! holder stops renewing; a runner pod killed while a tool acts is replaced and resumes without
//! a second effect; an operator killed and restarted 20 times mid-reconcile leaves exactly one
//! pod per attempt and no orphans; a Session's status decided from an out-of-date copy does not
//! overwrite a newer one, nor an Agent's decided for a deleted object its re-created successor; an
//! operator started beside a Session nested past a JSON decoder's limit still lists Sessions and
//! runs every other tenant's; and a namespace cannot resolve another namespace's objects nor read
//! its records.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Agent, Session, session::SessionPhase};
use contextos_kind_tests::{
    Check, TestEnv, TestNamespace,
    operator_env::{self, CHAOS_LABEL, OPERATOR_NAMESPACE, QUICK_SCRIPT},
    wait_for, wait_for_deletion, wait_for_object,
};
use contextos_operator::{
    OperatorConfig,
    leader::{LeaderElection, Standing},
};
use contextos_runner::records::{RecordStore as _, TenantId, store::tikv::TikvStore};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    objects::apply,
    operator::{TIMEOUT, condition, objects_for, phase_is, session},
};

#[tokio::test]
async fn leadership_moves_only_when_the_holder_stops_renewing() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "leader-election").await?;
    let client = env.client();
    let replica = |identity: &str| LeaderElection {
        namespace: ns.name().to_owned(),
        lease: "contextos-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(300),
    };
    let (a, b) = (replica("replica-a"), replica("replica-b"));
    ensure!(
        a.try_acquire(&client).await? == Standing::Leader,
        "the first replica leads"
    );
    for _ in 0..3 {
        ensure!(
            b.try_acquire(&client).await?
                == Standing::Follower {
                    holder: "replica-a".into()
                },
            "the second follows while the first renews"
        );
        ensure!(
            a.try_acquire(&client).await? == Standing::Leader,
            "the holder renews"
        );
    }
    // The holder stops renewing; after the lease duration the follower takes over.
    let taken = wait_for(
        "replica-b takes the expired lease",
        Duration::from_secs(10),
        || async {
            match b.try_acquire(&client).await {
                Ok(Standing::Leader) => Check::Done(()),
                other => Check::NotYet(format!("{other:?}")),
            }
        },
    )
    .await;
    taken?;
    ensure!(
        a.try_acquire(&client).await?
            == Standing::Follower {
                holder: "replica-b".into()
            },
        "the old holder now follows"
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_runner_killed_while_a_tool_acts_is_replaced_and_the_tool_is_asked_once() -> Result<()> {
    let env = TestEnv::shared().await?;
    if operator_env::shared(env)
        .await
        .map_err(anyhow::Error::msg)?
        .is_none()
    {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    }
    let (mut tools, tools_url) = operator_env::start_tools_with(&["--slow", "/deployments/restart=4000"])
        .map_err(anyhow::Error::msg)?;
    let result = async {
        let ns = TestNamespace::new(env, "operator-runner-killed").await?;
        let client = env.client();
        for object in objects_for(env, &tools_url)? {
            apply(&client, ns.name(), &object).await?;
        }
        apply(&client, ns.name(), &session("killed")?).await?;
        let sessions: Api<Session> = ns.api();
        let paused = phase_is(&sessions, "killed", SessionPhase::AwaitingApproval).await?;
        let hash = paused.status.and_then(|s| s.pending_approval).context("pending")?.call_hash;
        let approval = json!({"spec": {"approvals": [{"callHash": hash, "decision": "approve", "approver": "dana@example.com"}]}});
        sessions.patch("killed", &PatchParams::default(), &Patch::Merge(&approval)).await?;
        // Wait until the restart has acted (its answer is held back 4 s), then kill the pod.
        wait_for("the restart reaches the tool", TIMEOUT, || async {
            let effects = effects(&tools_url).await;
            Check::when(effects.iter().any(|e| e["path"] == "/deployments/restart"), || format!("{effects:?}"))
        })
        .await?;
        let pods: Api<Pod> = ns.api();
        pods.delete("killed-run-2", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
            .await?;
        phase_is(&sessions, "killed", SessionPhase::Succeeded).await?;
        let effects = effects(&tools_url).await;
        let restarts = effects.iter().filter(|e| e["path"] == "/deployments/restart").count();
        ensure!(restarts == 1, "one restart despite the kill: {effects:?}");
        // The gateway carried the call through although its runner died mid-call, and recorded
        // the result: the next attempt was answered from the record, so the tool was asked once.
        let requests = reqwest_json(&format!("{tools_url}/effects")).await["requests"].as_u64().unwrap_or(0);
        ensure!(requests == 2, "one restart request and one status update reached the tools: {requests}");
        ns.pass();
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = tools.kill();
    result
}

#[tokio::test]
async fn an_operator_killed_twenty_times_mid_reconcile_leaves_one_pod_per_attempt() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "operator-restarts").await?;
    let client = env.client();
    let label = json!({CHAOS_LABEL: "restarts"});
    for mut object in objects_for(env, &op.tools_url)? {
        if object["kind"] == "ConfigMap" && object["metadata"]["name"] == "quickstart-script" {
            // Two reads and an answer: no approval, so every Session can finish on its own.
            object["data"]["script.json"] = json!(QUICK_SCRIPT);
        }
        operator_env::add_labels(&mut object, &label);
        apply(&client, ns.name(), &object).await?;
    }
    let names: Vec<String> = (0..6).map(|i| format!("restarts-{i}")).collect();
    for name in &names {
        let mut session = session(name)?;
        session["metadata"]["labels"] = label.clone();
        apply(&client, ns.name(), &session).await?;
    }
    let config = OperatorConfig {
        namespace: OPERATOR_NAMESPACE.into(),
        runner: operator_env::runner_settings(&op.gateway),
        max_crash_attempts: 3,
        concurrency: 8,
        replay_image: env.runner_image().to_owned(),
        selector: Some(format!("{CHAOS_LABEL}=restarts")),
    };
    let start = |config: OperatorConfig| {
        let client = env.client();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let _ = contextos_operator::run(client, config, Default::default(), stopped).await;
        });
        (task, stop)
    };
    // Kill it at varied points: mid-resolution, mid-pod-creation, mid-status-write.
    for round in 0u64..20 {
        let (task, _stop) = start(config.clone());
        tokio::time::sleep(Duration::from_millis(60 + (round * 37) % 300)).await;
        task.abort();
        let _ = task.await;
    }
    let (task, stop) = start(config);
    let sessions: Api<Session> = ns.api();
    for name in &names {
        phase_is(&sessions, name, SessionPhase::Succeeded).await?;
    }
    let _ = stop.send(true);
    let _ = task.await;
    // Runner pods (the Agent's replay gate runs pods of its own).
    let pods: Api<Pod> = ns.api();
    let mut pod_names: Vec<String> = pods
        .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
        .await?
        .items
        .into_iter()
        .map(|p| {
            ensure!(
                p.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|r| r.kind == "Session")),
                "pod {:?} has no owning Session",
                p.metadata.name
            );
            Ok(p.metadata.name.unwrap_or_default())
        })
        .collect::<Result<_>>()?;
    pod_names.sort();
    let expected: Vec<String> = names.iter().map(|n| format!("{n}-run-1")).collect();
    ensure!(
        pod_names == expected,
        "exactly one pod per attempt: {pod_names:?}"
    );
    for name in &names {
        let status = sessions.get(name).await?.status.unwrap_or_default();
        ensure!(status.attempt == Some(1), "{name}: attempt {:?}", status.attempt);
    }
    let bundles = Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
        .await?;
    ensure!(
        bundles.items.len() == names.len(),
        "one bundle per Session: {}",
        bundles.items.len()
    );
    // Runner pods hold no key: nothing but the bundle is created in the tenant's namespace.
    let secrets = Api::<Secret>::namespaced(client.clone(), ns.name())
        .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
        .await?;
    ensure!(
        secrets.items.is_empty(),
        "no Secret per Session: {}",
        secrets.items.len()
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_namespace_cannot_use_another_namespaces_objects_or_read_its_records() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: needs a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let shop = TestNamespace::new(env, "tenant-shop").await?;
    let bank = TestNamespace::new(env, "tenant-bank").await?;
    let client = env.client();
    for object in objects_for(env, &op.tools_url)? {
        apply(&client, shop.name(), &object).await?;
        // The bank tenant gets only the Agent: its references name objects that exist in shop.
        if object["kind"] == "Agent" {
            apply(&client, bank.name(), &object).await?;
        }
    }
    let bank_agents: Api<Agent> = bank.api();
    wait_for_object(
        &bank_agents,
        "oncall-assistant",
        "Ready=False: nothing resolves across namespaces",
        TIMEOUT,
        |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(text.starts_with("False ReferenceNotFound"), || text.clone())
        },
    )
    .await?;
    // A shop session's record is invisible to the bank tenant, even by its exact run id.
    let mut quick = session("isolated")?;
    quick["spec"]["input"]["prompt"] = json!("checkout-api 5xx");
    apply(&client, shop.name(), &quick).await?;
    let sessions: Api<Session> = shop.api();
    let paused = phase_is(&sessions, "isolated", SessionPhase::AwaitingApproval).await?;
    let run_id = paused.status.and_then(|s| s.run_id).context("runId")?;
    let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
    ensure!(
        store.head(&TenantId::new(shop.name())?, &run_id).await?.is_some(),
        "the shop tenant sees its run"
    );
    ensure!(
        store.head(&TenantId::new(bank.name())?, &run_id).await?.is_none()
            && store
                .read_chain(&TenantId::new(bank.name())?, &run_id, 0)
                .await?
                .is_empty(),
        "the bank tenant cannot read the shop's run"
    );
    shop.pass();
    bank.pass();
    Ok(())
}

async fn effects(tools_url: &str) -> Vec<Value> {
    reqwest_json(&format!("{tools_url}/effects")).await["effects"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn reqwest_json(url: &str) -> Value {
    let output = tokio::process::Command::new("curl")
        .args(["-sf", url])
        .output()
        .await;
    output
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

/// A namespace `prefix`-… with the quickstart (its tools at `tools_url`) whose Agent's model
/// endpoint refuses connections, and Session `name` of it: every attempt errors out before it
/// can report, which the operator treats like a crash.
async fn crashing_session(
    env: &'static TestEnv,
    prefix: &str,
    tools_url: &str,
    name: &str,
) -> Result<TestNamespace> {
    let ns = TestNamespace::new(env, prefix).await?;
    let client = env.client();
    for mut object in objects_for(env, tools_url)? {
        if object["kind"] == "Agent" {
            object["spec"]["model"] = json!({"provider": "openai_compatible", "endpoint": "http://127.0.0.1:9/v1", "model": "gpt-test"});
        }
        apply(&client, ns.name(), &object).await?;
    }
    apply(&client, ns.name(), &session(name)?).await?;
    Ok(ns)
}

#[tokio::test]
async fn runner_attempts_that_crash_are_retried_up_to_the_bound() -> Result<()> {
    let env = TestEnv::shared().await?;
    if operator_env::shared(env)
        .await
        .map_err(anyhow::Error::msg)?
        .is_none()
    {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    }
    let (mut tools, tools_url) = operator_env::start_tools_with(&[]).map_err(anyhow::Error::msg)?;
    let result = async {
        let ns = crashing_session(env, "operator-crashes", &tools_url, "crashing").await?;
        let sessions: Api<Session> = ns.api();
        let failed = phase_is(&sessions, "crashing", SessionPhase::Failed).await?;
        let status = failed.status.unwrap_or_default();
        let ready = condition(&status.conditions, "Ready");
        ensure!(
            ready.starts_with("False AttemptsExhausted 3 runner attempts"),
            "{ready}"
        );
        let pods: Api<Pod> = ns.api();
        let names: Vec<String> = pods
            .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        ensure!(names.len() == 3, "one pod per attempt, three attempts: {names:?}");
        ns.pass();
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = tools.kill();
    result
}

/// A tenant who deletes each crashed attempt's pod (tenants may delete pods in their namespace)
/// — as soon as its crash is counted, before the backoff is over — does not take the crashes
/// back: the Session still fails after the operator's bound, three attempts, with the count in
/// its status.
#[tokio::test]
async fn deleting_crashed_pods_does_not_reset_the_retry_bound() -> Result<()> {
    let env = TestEnv::shared().await?;
    if operator_env::shared(env)
        .await
        .map_err(anyhow::Error::msg)?
        .is_none()
    {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    }
    let (mut tools, tools_url) = operator_env::start_tools_with(&[]).map_err(anyhow::Error::msg)?;
    let result = async {
        let ns = crashing_session(env, "operator-crash-reset", &tools_url, "resetting").await?;
        let sessions: Api<Session> = ns.api();
        let pods: Api<Pod> = ns.api();
        // The tenant: each attempt's pod is deleted once its crash is counted (or the next
        // attempt started).
        let deleter = {
            let (sessions, pods) = (sessions.clone(), pods.clone());
            tokio::spawn(async move {
                let mut deleted = std::collections::BTreeSet::new();
                loop {
                    let status = sessions.get("resetting").await.ok().and_then(|s| s.status);
                    let current = status.as_ref().and_then(|s| s.attempt).unwrap_or(1);
                    let counted = status.as_ref().and_then(|s| s.last_crashed_attempt).unwrap_or(0);
                    if status
                        .and_then(|s| s.phase)
                        .is_some_and(SessionPhase::is_terminal)
                    {
                        return deleted;
                    }
                    // Earlier attempts' pods, and the current one's once its crash is counted.
                    let last = if counted == current { current } else { current - 1 };
                    for attempt in 1..=last {
                        let name = format!("resetting-run-{attempt}");
                        if !deleted.contains(&name) && pods.delete(&name, &Default::default()).await.is_ok() {
                            deleted.insert(name);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let failed = phase_is(&sessions, "resetting", SessionPhase::Failed).await;
        deleter.abort();
        let failed = failed?;
        let status = failed.status.unwrap_or_default();
        let ready = condition(&status.conditions, "Ready");
        ensure!(
            ready.starts_with("False AttemptsExhausted 3 runner attempts"),
            "{ready}"
        );
        ensure!(
            (status.attempt, status.crashed_attempts) == (Some(3), Some(3)),
            "attempt {:?}, crashed {:?}",
            status.attempt,
            status.crashed_attempts
        );
        let left: Vec<String> = pods
            .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        ensure!(
            left == ["resetting-run-3"],
            "the first two attempts' pods deleted, the last left: {left:?}"
        );
        ns.pass();
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = tools.kill();
    result
}

/// A `contextos gateway` process, started (and started again) on one port of the address pods
/// reach this machine at.
struct GatewayProcess {
    child: tokio::process::Child,
}

impl GatewayProcess {
    /// Starts the gateway on `port` (0: any) against `store`; returns it and its URL once it
    /// serves.
    async fn start(
        env: &TestEnv,
        store: &str,
        trust: &str,
        port: u16,
        data: &std::path::Path,
    ) -> Result<(Self, String)> {
        use tokio::io::AsyncBufReadExt as _;
        let contextos =
            contextos_kind_tests::process_node::workspace_binary("contextos").context("contextos binary")?;
        let kubeconfig = env.kubeconfig().context("the local control plane's kubeconfig")?;
        let mut child = tokio::process::Command::new(contextos)
            .env("KUBECONFIG", kubeconfig)
            .arg("--data-dir")
            .arg(data)
            .args([
                "--store",
                store,
                "gateway",
                "--namespace",
                OPERATOR_NAMESPACE,
                "--trust-key",
                trust,
                // Its tools (ops-tools) listen on this machine's loopback.
                "--allow-loopback-destinations",
            ])
            .args(["--listen", &format!("{}:{port}", env.host_address())])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start contextos gateway")?;
        let stderr = child.stderr.take().context("gateway stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let url = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("contextos gateway: serving on ") {
                    return anyhow::Ok(url.trim().to_owned());
                }
            }
            anyhow::bail!("the gateway exited before serving")
        })
        .await
        .context("the gateway did not start serving in time")??;
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((Self { child }, url))
    }

    /// SIGKILL: nothing in flight is finished or recorded.
    async fn kill(mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// The gateway service is killed while a restart it sent is acting, and the tool cannot dedupe
/// (`idempotent: false`). The call's intent is on record with no result: the next attempt must
/// not send it again. The Session pauses `AwaitingResolution`, showing the call as the gateway
/// signed it; a human says it acted (spec.resolutions); the run resumes with that finding as the
/// call's result, and the tool saw exactly one restart.
#[tokio::test]
async fn a_gateway_killed_while_a_tool_that_cannot_dedupe_acts_leaves_the_outcome_to_a_human() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let (mut tools, tools_url) = operator_env::start_tools_with(&["--slow", "/deployments/restart=6000"])
        .map_err(anyhow::Error::msg)?;
    let data = tempfile::tempdir()?;
    let trust = contextos_runner::key_secrets::published_run_context_key(&env.client(), OPERATOR_NAMESPACE)
        .await?
        .context("the operator's published RunContext key")?
        .to_hex();
    let (gateway, gateway_url) = GatewayProcess::start(env, &op.store, &trust, 0, data.path()).await?;
    let port: u16 = gateway_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the gateway's port")?;
    let label = json!({CHAOS_LABEL: "unknown-outcome"});
    let config = OperatorConfig {
        namespace: OPERATOR_NAMESPACE.into(),
        runner: operator_env::runner_settings(&gateway_url),
        max_crash_attempts: 5,
        concurrency: 4,
        replay_image: env.runner_image().to_owned(),
        selector: Some(format!("{CHAOS_LABEL}=unknown-outcome")),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let client = env.client();
    let operator = tokio::spawn(async move {
        let _ = contextos_operator::run(client, config, Default::default(), stopped).await;
    });
    let result = async {
        let ns = TestNamespace::new(env, "gateway-killed").await?;
        let client = env.client();
        for mut object in objects_for(env, &tools_url)? {
                        if object["kind"] == "Skill" && object["metadata"]["name"] == "mitigation" {
                let tools = object["spec"]["tools"].as_array_mut().context("the skill's tools")?;
                for tool in tools.iter_mut().filter(|t| t["name"] == "restart_deployment") {
                    tool["idempotent"] = json!(false);
                }
            }
            operator_env::add_labels(&mut object, &label);
            apply(&client, ns.name(), &object).await?;
        }
        let mut started = session("unsure")?;
        started["metadata"]["labels"] = label.clone();
        apply(&client, ns.name(), &started).await?;
        let sessions: Api<Session> = ns.api();
        let paused = phase_is(&sessions, "unsure", SessionPhase::AwaitingApproval).await?;
        let hash = paused.status.and_then(|s| s.pending_approval).context("pending")?.call_hash;
        let approval = json!({"spec": {"approvals": [{"callHash": hash, "decision": "approve", "approver": "dana@example.com"}]}});
        sessions.patch("unsure", &PatchParams::default(), &Patch::Merge(&approval)).await?;
        wait_for("the restart reaches the tool", TIMEOUT, || async {
            let effects = effects(&tools_url).await;
            Check::when(effects.iter().any(|e| e["path"] == "/deployments/restart"), || format!("{effects:?}"))
        })
        .await?;
        gateway.kill().await?;
        let (_gateway, _) = GatewayProcess::start(env, &op.store, &trust, port, data.path()).await?;

        let waiting = phase_is(&sessions, "unsure", SessionPhase::AwaitingResolution).await?;
        let unresolved = waiting
            .status
            .clone()
            .and_then(|s| s.unresolved_call)
            .context("status.unresolvedCall")?;
        ensure!(
            unresolved.tool == "restart_deployment",
            "the unresolved call is not the restart: {unresolved:?}"
        );
        let resolution = json!({"spec": {"resolutions": [{
            "callId": unresolved.call_id, "outcome": "acted", "resolver": "dana@example.com",
            "note": "checked the rollout: it restarted",
        }]}});
        sessions.patch("unsure", &PatchParams::default(), &Patch::Merge(&resolution)).await?;
        let done = phase_is(&sessions, "unsure", SessionPhase::Succeeded).await?;

        let effects = effects(&tools_url).await;
        let restarts = effects.iter().filter(|e| e["path"] == "/deployments/restart").count();
        ensure!(restarts == 1, "the restart was sent again: {effects:?}");
        let run_id = done.status.and_then(|s| s.run_id).context("runId")?;
        let store = TikvStore::connect(op.store.trim_start_matches("tikv://")).await?;
        let entries = contextos_runner::records::read_run(&store, &TenantId::new(ns.name())?, &run_id).await?;
        let resolved = entries.iter().find_map(|(_, e)| match &e.body {
            contextos_runner::records::EntryBody::CallResolved { call_id, .. } => Some((call_id.clone(), serde_json::to_value(&e.body).unwrap_or_default())),
            _ => None,
        });
        let (call_id, body) = resolved.context("the record holds the human's finding")?;
        ensure!(
            call_id == unresolved.call_id && body.to_string().contains("dana@example.com"),
            "the finding is not the resolver's on that call: {body}"
        );
        ns.pass();
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = stop.send(true);
    let _ = operator.await;
    let _ = tools.kill();
    result
}

/// The operator decides a Session's status from its cached copy. When the run ends before the
/// cache shows the operator's own "Running" write (seen on the process node, where a run takes
/// a second), applying the whole status from the stale copy would drop what that write added —
/// the pinned revisions. The operator's status writes are conditioned on the copy's
/// resourceVersion: the stale one is refused (and decided again from the newer object), and the
/// same write without the condition shows what it would have lost.
#[tokio::test]
async fn a_status_decided_from_an_out_of_date_session_does_not_overwrite_a_newer_one() -> Result<()> {
    use contextos_crds::session::{PinnedRevisions, SessionStatus};
    use contextos_operator::controllers::apply_status;
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "stale-status").await?;
    let client = env.client();
    let mut object = session("stale")?;
    // No operator of this suite reconciles it: the test writes its status itself.
    object["metadata"]["labels"] = json!({CHAOS_LABEL: "stale-status"});
    apply(&client, ns.name(), &object).await?;
    let sessions: Api<Session> = ns.api();
    let observed = sessions.get("stale").await?;

    let pinned = PinnedRevisions {
        policies: vec!["sha256:1111".into()],
        ..Default::default()
    };
    let running = SessionStatus {
        phase: Some(SessionPhase::Running),
        pinned: Some(pinned.clone()),
        ..Default::default()
    };
    apply_status(&sessions, &observed, &running).await?;

    // Decided from the copy read before that write: no pins.
    let finished = SessionStatus {
        phase: Some(SessionPhase::Succeeded),
        ..Default::default()
    };
    let refused = apply_status(&sessions, &observed, &finished).await;
    ensure!(
        refused.as_ref().is_err_and(|e| e.stale()),
        "a status from an out-of-date copy was not refused as stale: {refused:?}"
    );
    let kept = sessions.get("stale").await?.status.unwrap_or_default();
    ensure!(
        kept.pinned.as_ref() == Some(&pinned) && kept.phase == Some(SessionPhase::Running),
        "the newer status was changed: {kept:?}"
    );

    // The control: the same write without the condition loses the pins.
    apply_status_by_name(&sessions, "stale", &finished).await?;
    let overwritten = sessions.get("stale").await?.status.unwrap_or_default();
    ensure!(
        overwritten.pinned.is_none(),
        "an unconditioned apply kept the pins, so the refusal above proves nothing: {overwritten:?}"
    );
    ns.pass();
    Ok(())
}

/// A GitOps committer deletes an Agent whose revision was promoted and re-creates it under the
/// same name with a new spec. A pass for the old object still in flight when the new one appears
/// must not hand the new one the old one's status: its promoted revision would put the new spec
/// in force without its gate. (The API server ignores a uid in a status apply; only the
/// resourceVersion precondition tells the two objects apart.)
#[tokio::test]
async fn a_status_decided_for_a_deleted_object_does_not_land_on_its_re_created_successor() -> Result<()> {
    use contextos_crds::{agent::AgentStatus, common::RevisionStatus};
    use contextos_operator::controllers::apply_status;
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "recreated-status").await?;
    let client = env.client();
    let mut object = crate::objects::quickstart_objects()?
        .into_iter()
        .map(|(_, object)| object)
        .find(|object| object["kind"] == "Agent")
        .context("the quickstart has an Agent")?;
    let name = object["metadata"]["name"]
        .as_str()
        .context("the Agent's name")?
        .to_owned();
    // No operator of this suite reconciles it: the test writes its status itself.
    object["metadata"]["labels"] = json!({CHAOS_LABEL: "recreated-status"});
    apply(&client, ns.name(), &object).await?;
    let agents: Api<Agent> = ns.api();
    let predecessor = agents.get(&name).await?;
    let promoted = AgentStatus {
        revisions: Some(RevisionStatus {
            promoted: Some("sha256:1111".into()),
            ..Default::default()
        }),
        ..Default::default()
    };

    agents.delete(&name, &DeleteParams::default()).await?;
    wait_for_deletion(
        &agents,
        &name,
        predecessor.metadata.uid.as_deref(),
        TIMEOUT,
        |a: &Agent| format!("{:?}", a.metadata.finalizers),
    )
    .await?;
    apply(&client, ns.name(), &object).await?;
    let successor = agents.get(&name).await?;
    ensure!(
        successor.metadata.uid != predecessor.metadata.uid,
        "the Agent was not re-created"
    );

    let refused = apply_status(&agents, &predecessor, &promoted).await;
    ensure!(
        refused.as_ref().is_err_and(|e| e.stale()),
        "a status decided for the deleted Agent was not refused: {refused:?}"
    );
    let kept = agents.get(&name).await?.status.unwrap_or_default();
    ensure!(
        kept.revisions
            .as_ref()
            .and_then(|r| r.promoted.as_ref())
            .is_none(),
        "the re-created Agent received its predecessor's promoted revision: {kept:?}"
    );

    // The control: the same write by name alone lands on the successor.
    apply_status_by_name(&agents, &name, &promoted).await?;
    let overwritten = agents.get(&name).await?.status.unwrap_or_default();
    ensure!(
        overwritten.revisions.as_ref().and_then(|r| r.promoted.as_deref()) == Some("sha256:1111"),
        "a write by name alone did not reach the successor, so the refusal above proves nothing: {overwritten:?}"
    );
    ns.pass();
    Ok(())
}

/// The status write the operator does not make: server-side apply by name, with no precondition.
async fn apply_status_by_name<K>(api: &Api<K>, name: &str, status: &impl serde::Serialize) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(contextos_crds::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Objects nested `depth` deep: `{"a": {"a": … }}` (objects only: the API server tracks who
/// set each field of an object, and its record of the fields — managedFields — would nest as
/// deep, were the field not one unit).
fn nested(depth: usize) -> Value {
    let mut value = json!("deep");
    for _ in 0..depth {
        value = json!({"a": value});
    }
    value
}

/// Free-form JSON (a Session's input data, a tool's schema) is the tenant's to shape, and the
/// API server stores it nested far deeper than a JSON decoder's default limit (128). An operator
/// that starts lists every Session first: were one such Session to fail the whole list, the
/// operator would never get past it, and no tenant's Session would run again. This operator
/// starts with one present; it refuses that one alone, naming the field, and runs another
/// tenant's.
#[tokio::test]
async fn an_operator_started_beside_a_session_nested_too_deep_runs_every_other_session() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let label = json!({CHAOS_LABEL: "deep-json"});
    let hostile = TestNamespace::new(env, "tenant-deep-json").await?;
    let mut deep = session("deep")?;
    deep["metadata"]["labels"] = label.clone();
    deep["spec"]["input"]["data"] = json!({"nested": nested(300)});
    // Through kubectl: the API server answers with the object, as deep (past a plain JSON
    // decoder's limit, as the test's generic client is).
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), deep.to_string())?;
    let created = env
        .kubectl()
        .args(["create", "-n", hostile.name(), "-o", "name", "-f"])
        .arg(file.path())
        .output()
        .await?;
    ensure!(
        created.status.success(),
        "the API server refused the deep Session: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let other = TestNamespace::new(env, "tenant-beside-deep").await?;
    let client = env.client();
    for mut object in objects_for(env, &op.tools_url)? {
        if object["kind"] == "ConfigMap" && object["metadata"]["name"] == "quickstart-script" {
            object["data"]["script.json"] = json!(QUICK_SCRIPT);
        }
        operator_env::add_labels(&mut object, &label);
        apply(&client, other.name(), &object).await?;
    }
    let mut beside = session("beside")?;
    beside["metadata"]["labels"] = label.clone();
    apply(&client, other.name(), &beside).await?;
    let config = OperatorConfig {
        namespace: OPERATOR_NAMESPACE.into(),
        runner: operator_env::runner_settings(&op.gateway),
        max_crash_attempts: 3,
        concurrency: 4,
        replay_image: env.runner_image().to_owned(),
        selector: Some(format!("{CHAOS_LABEL}=deep-json")),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(async move {
        let _ = contextos_operator::run(client, config, Default::default(), stopped).await;
    });
    let result = async {
        phase_is(&other.api(), "beside", SessionPhase::Succeeded).await?;
        let sessions: Api<Session> = hostile.api();
        wait_for_object(
            &sessions,
            "deep",
            "refused, naming the field",
            TIMEOUT,
            |s: &Session| {
                let ready = condition(&s.status.clone().unwrap_or_default().conditions, "Ready");
                Check::when(
                    ready.starts_with("False InvalidSpec")
                        && ready.contains("spec.input.data: nests more than 32"),
                    || ready.clone(),
                )
            },
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = stop.send(true);
    let _ = operator.await;
    result?;
    other.pass();
    hostile.pass();
    Ok(())
}
