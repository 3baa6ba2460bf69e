//! SpendQuotas in a cluster: the operator keeps a Session past `concurrentSessions` Pending
//! (QuotaWait, naming the quota and the Session running) until the running one ends; the
//! gateway service counts the runs' tool calls in the quota's status, beside the operator's
//! Session columns, as `kubectl get spendquota` shows them.

use anyhow::{Result, ensure};
use contextos_crds::{Session, SpendQuota, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    objects::apply,
    operator::{TIMEOUT, agent_ready, condition, objects_for, phase_is, session},
};

#[tokio::test]
async fn a_session_past_the_concurrency_quota_waits_pending_until_the_running_one_ends() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(_op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    // The approved restart answers after 1.5 s: the first resumed run is still running when
    // the second's start, which found the first's start under way, looks again (500 ms later).
    // With answers in milliseconds the first had ended by then, and nothing waited.
    let (_tools, tools_url) = operator_env::start_tools_with(&["--slow", "/deployments/restart=1500"])
        .map_err(anyhow::Error::msg)?;
    let ns = TestNamespace::new(env, "quotas").await?;
    let client = env.client();
    for object in objects_for(env, &tools_url)? {
        apply(&client, ns.name(), &object).await?;
    }
    let quota = json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "SpendQuota",
        "metadata": {"name": "tenant"},
        "spec": {
            "concurrentSessions": 1,
            "limits": [{"window": "hour", "toolCalls": 100}],
        },
    });
    apply(&client, ns.name(), &quota).await?;
    agent_ready(&ns).await?;
    // One after the other: each runs until its restart waits for approval (a Session waiting
    // for a human holds no pod, and counts against no concurrency limit).
    let sessions: Api<Session> = ns.api();
    let mut calls = Vec::new();
    for name in ["first", "second"] {
        apply(&client, ns.name(), &session(name)?).await?;
        let paused = phase_is(&sessions, name, SessionPhase::AwaitingApproval).await?;
        let pending = paused.status.and_then(|s| s.pending_approval);
        ensure!(pending.is_some(), "{name} shows its pending call");
        calls.push(pending.map(|p| p.call_hash).unwrap_or_default());
    }
    // Both approved at once: one resumes, the other waits for it to end.
    for (name, call_hash) in ["first", "second"].iter().zip(&calls) {
        let approval = json!({"spec": {"approvals": [{
            "callHash": call_hash,
            "decision": "approve",
            "approver": "dana@example.com",
        }]}});
        sessions
            .patch(name, &PatchParams::default(), &Patch::Merge(&approval))
            .await?;
    }
    // Watched until both succeed: never two runner containers running at once, as the API
    // server shows the pods (what the operator decides on).
    let pods: Api<Pod> = ns.api();
    let runner_pods = ListParams::default().labels(&format!("{}=runner", contextos_crds::labels::ROLE));
    let mut seen_wait = None;
    let mut most_running = 0;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        let running: std::collections::BTreeSet<String> = pods
            .list(&runner_pods)
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                    })
            })
            .filter_map(|p| p.labels().get(contextos_crds::labels::SESSION).cloned())
            .collect();
        ensure!(
            running.len() <= 1,
            "two Sessions ran at once under concurrentSessions 1: {running:?}"
        );
        most_running = most_running.max(running.len());
        for name in ["first", "second"] {
            let status = sessions.get(name).await?.status.unwrap_or_default();
            let ready = condition(&status.conditions, "Ready");
            if seen_wait.is_none() && ready.contains("QuotaWait") {
                seen_wait = Some((name, status.phase, ready));
            }
        }
        let done = futures::future::join_all(["first", "second"].map(|n| sessions.get(n))).await;
        if done
            .iter()
            .all(|s| s.as_ref().ok().and_then(|s| s.status.as_ref()?.phase) == Some(SessionPhase::Succeeded))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ensure!(most_running == 1, "a runner was seen running");
    let (waiting, phase, ready) =
        seen_wait.ok_or_else(|| anyhow::anyhow!("neither Session waited for the quota"))?;
    ensure!(
        phase == Some(SessionPhase::Pending),
        "{waiting} waits Pending: {phase:?}"
    );
    let other = if waiting == "first" { "second" } else { "first" };
    ensure!(
        ready.contains("SpendQuota tenant allows 1 Sessions running at once and 1 are (")
            && ready.contains(other),
        "{ready}"
    );
    // Once the other ends, it runs and succeeds too.
    phase_is(&sessions, "first", SessionPhase::Succeeded).await?;
    phase_is(&sessions, "second", SessionPhase::Succeeded).await?;
    // The gateway counted both runs' tool calls in the quota's status, beside the operator's
    // Sessions-running column.
    let quotas: Api<SpendQuota> = ns.api();
    let counted = wait_for_object(
        &quotas,
        "tenant",
        "tool calls counted",
        TIMEOUT,
        |q: &SpendQuota| {
            let status = q.status.clone().unwrap_or_default();
            let summary = status.summary.clone().unwrap_or_default();
            let calls = status
                .usage
                .iter()
                .find(|u| u.resource == "toolCalls")
                .and_then(|u| u.used.parse::<u64>().ok())
                .unwrap_or(0);
            Check::when(calls >= 2 && summary.running.as_deref() == Some("0/1"), || {
                format!("{summary:?}, usage {:?}", status.usage)
            })
        },
    )
    .await?;
    let status = counted.status.unwrap_or_default();
    ensure!(
        condition(&status.conditions, "Ready").starts_with("True Resolved enforced: 100 toolCalls per hour"),
        "{:?}",
        status.conditions
    );
    ns.pass();
    Ok(())
}

/// Capability pods (an MCP server the Agent starts from a command) are made once an attempt's
/// start is admitted: a Session its quota keeps waiting holds none — so waiting Sessions cannot
/// run a tenant's commands, nor use up a namespace's ResourceQuota that running ones need.
#[tokio::test]
async fn a_session_waiting_for_its_quota_holds_no_capability_pod() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(_op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let (_tools, tools_url) = operator_env::start_tools_with(&[]).map_err(anyhow::Error::msg)?;
    let ns = TestNamespace::new(env, "quota-capabilities").await?;
    let client = env.client();
    for mut object in objects_for(env, &tools_url)? {
        match object["kind"].as_str() {
            Some("SandboxProfile") => {
                object["spec"]["execution"] = json!({"allowedTools": ["probe_*"], "maxRisk": "read_only"});
            }
            Some("Agent") => {
                let tool = operator_env::capability_probe_tool();
                match object["spec"]["tools"].as_array_mut() {
                    Some(tools) => tools.push(tool),
                    None => object["spec"]["tools"] = json!([tool]),
                }
            }
            _ => {}
        }
        apply(&client, ns.name(), &object).await?;
    }
    // No Session may start until the quota is raised.
    let mut quota = json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "SpendQuota",
        "metadata": {"name": "tenant"},
        "spec": {"concurrentSessions": 0},
    });
    apply(&client, ns.name(), &quota).await?;
    agent_ready(&ns).await?;
    apply(&client, ns.name(), &session("held")?).await?;
    let sessions: Api<Session> = ns.api();
    wait_for_object(&sessions, "held", "QuotaWait", TIMEOUT, |s: &Session| {
        let ready = condition(&s.status.clone().unwrap_or_default().conditions, "Ready");
        Check::when(ready.contains("QuotaWait"), || ready.clone())
    })
    .await?;
    let pods: Api<Pod> = ns.api();
    let capabilities = ListParams::default().labels(&format!(
        "{}=held,{}={}",
        contextos_crds::labels::SESSION,
        contextos_crds::labels::ROLE,
        contextos_runner::capability::ROLE
    ));
    let held = pods.list_metadata(&capabilities).await?.items;
    ensure!(
        held.is_empty(),
        "a Session waiting for its quota holds capability pods: {:?}",
        held.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    // Let it start: its capability pod is made just before its runner pod. (This suite's
    // gateway reaches no capability pods, and refuses the run at its start, saying so.)
    quota["spec"]["concurrentSessions"] = json!(1);
    apply(&client, ns.name(), &quota).await?;
    let failed = phase_is(&sessions, "held", SessionPhase::Failed).await?;
    let ready = condition(&failed.status.unwrap_or_default().conditions, "Ready");
    ensure!(
        ready.contains("GatewayRefused") && ready.contains("reaches no capability pods"),
        "{ready}"
    );
    contextos_kind_tests::wait_for("no capability pod once the Session ended", TIMEOUT, || async {
        match pods.list_metadata(&capabilities).await {
            Ok(list) if list.items.iter().all(|p| p.metadata.deletion_timestamp.is_some()) => Check::Done(()),
            Ok(list) => Check::NotYet(format!(
                "capability pods {:?}",
                list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
            )),
            Err(e) => Check::NotYet(e.to_string()),
        }
    })
    .await?;
    ns.pass();
    Ok(())
}
