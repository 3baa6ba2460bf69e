//! ContextOS agents as A2A agents: the quickstart's Agent, exposed with `spec.a2a`, is called
//! through the gateway's A2A endpoint by the official SDKs — a2a-sdk from PyPI (streamed) and
//! @a2a-js/sdk from npm (polled) — each with a service account's token that RBAC lets `invoke`
//! it. Each message becomes a Session acting for the caller, in a runner pod; the approval it
//! waits for shows as input-required, naming the call; once an approver decides, the task
//! completes with the validated output as its artifact; a second task is cancelled. The record
//! of each run verifies and starts with the caller as the delegating identity. And what a
//! caller may not do: call without a token or without the permission, see another caller's
//! task, start a second task by sending the same message again.
//!
//! The SDKs are installed by runner/tests/support/a2a_peer.sh and a2a_peer_js.sh (`make test`
//! exports CONTEXTOS_A2A_PYTHON and CONTEXTOS_A2A_JS_MODULES); without them the test is skipped.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::{Agent, Session, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::ServiceAccount,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::{
    objects::apply,
    operator::{TIMEOUT, condition, objects_for},
};

const AGENT: &str = "oncall-assistant";

fn support(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../runner/tests/support")
        .join(file)
}

/// A caller script: its JSON lines, and a line on its stdin when the test has done its part.
struct Caller {
    name: &'static str,
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<Value>,
}

impl Caller {
    fn start(name: &'static str, program: &str, args: &[&str]) -> Result<Self> {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{name}: cannot start {program}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(Self {
            name,
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
            seen: Vec::new(),
        })
    }

    /// The next line saying `event` (the lines before it are kept in `seen`).
    async fn next(&mut self, event: &str) -> Result<Value> {
        loop {
            let line = tokio::time::timeout(TIMEOUT, self.lines.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    let value: Value = serde_json::from_str(&line)
                        .with_context(|| format!("{}: not a JSON line: {line}", self.name))?;
                    self.seen.push(value.clone());
                    if value["event"] == event {
                        return Ok(value);
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let stderr = self.stderr().await;
                    bail!("{}: ended before {event}: {stderr}", self.name)
                }
                Err(_) => bail!(
                    "{}: no {event} within {TIMEOUT:?}; saw {:?}",
                    self.name,
                    self.seen
                ),
            }
        }
    }

    async fn go_on(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn stderr(&mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut text)).await;
        }
        text
    }

    async fn finish(mut self) -> Result<()> {
        let status = tokio::time::timeout(TIMEOUT, self.child.wait()).await??;
        if !status.success() {
            let stderr = self.stderr().await;
            bail!("{}: exited with {status}: {stderr}", self.name);
        }
        Ok(())
    }
}

/// A token of service account `name` (created if need be) for `audience`.
async fn token_for(accounts: &Api<ServiceAccount>, name: &str, audience: &str) -> Result<String> {
    if accounts.get_opt(name).await?.is_none() {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    let request: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": [audience],
        "expirationSeconds": 3600,
    }}))?;
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("the token request returned no token")
}

/// Approves the call the Session `name` waits for, as the quickstart's approver.
async fn approve(sessions: &Api<Session>, name: &str) -> Result<()> {
    let paused = crate::operator::phase_is(sessions, name, SessionPhase::AwaitingApproval).await?;
    let pending = paused
        .status
        .and_then(|s| s.pending_approval)
        .context("AwaitingApproval shows the pending call")?;
    let approval = json!({"spec": {"approvals": [{
        "callHash": pending.call_hash,
        "decision": "approve",
        "approver": "dana@example.com",
    }]}});
    sessions
        .patch(name, &PatchParams::default(), &Patch::Merge(&approval))
        .await?;
    Ok(())
}

/// One JSON-RPC request to the agent as `token`.
async fn rpc(http: &reqwest::Client, url: &str, token: &str, method: &str, params: Value) -> Result<Value> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    Ok(http
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?
        .json()
        .await?)
}

/// A caller's open tasks are counted on the API server, by phase (the Session CRD's selectable
/// `status.phase`): a caller who started and ended many tasks is not read back in full at each
/// message, and only the tasks still going count.
#[tokio::test]
async fn a_callers_open_tasks_are_counted_by_phase_on_the_api_server() -> Result<()> {
    use contextos_runner::gateway::a2a_server::sessions::{AgentSessions as _, KubeSessions};
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "a2a-open").await?;
    let sessions: Api<Session> = ns.api();
    let label = "contextos.dev/a2a-caller-id=c-open-count";
    let phases = [
        None,
        Some("Running"),
        Some("AwaitingApproval"),
        Some("Succeeded"),
        Some("Failed"),
        Some("Cancelled"),
        Some("Succeeded"),
    ];
    for (i, phase) in phases.iter().enumerate() {
        let name = format!("task-{i}");
        let session: Session = serde_json::from_value(json!({
            "apiVersion": "contextos.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": name, "labels": {
                // No operator of this suite runs it: the test writes its phase itself.
                contextos_kind_tests::operator_env::CHAOS_LABEL: "a2a-open-count",
                "contextos.dev/a2a-caller-id": "c-open-count",
            }},
            "spec": {"agentRef": {"name": AGENT}, "input": {"prompt": "look"}},
        }))?;
        sessions.create(&PostParams::default(), &session).await?;
        if let Some(phase) = phase {
            let status = json!({"status": {"phase": phase}});
            sessions
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
        }
    }
    let open = KubeSessions::new(env.client())
        .open(ns.name(), label)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(
        open == 3,
        "{open} open tasks counted, not 3 (one new, one running, one waiting)"
    );
    ns.pass();
    Ok(())
}

#[tokio::test]
async fn the_a2a_sdks_call_a_contextos_agent_through_the_gateway() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let (Ok(python), Ok(modules)) = (
        std::env::var("CONTEXTOS_A2A_PYTHON"),
        std::env::var("CONTEXTOS_A2A_JS_MODULES"),
    ) else {
        eprintln!(
            "skipped: CONTEXTOS_A2A_PYTHON and CONTEXTOS_A2A_JS_MODULES name the A2A SDKs (`make test` installs them)"
        );
        return Ok(());
    };
    let ns = TestNamespace::with_labels(
        env,
        "a2a-server",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let client = env.client();
    for mut object in objects_for(env, &op.tools_url)? {
        if object["kind"] == "Agent" {
            object["spec"]["a2a"] = json!({
                "description": "Looks into incidents of the shop's services and restarts what is stuck, with approval",
                "skills": [{
                    "id": "triage",
                    "name": "Incident triage",
                    "description": "Finds what is wrong with a service and proposes or takes the fix",
                    "tags": ["incident", "oncall"],
                    "examples": ["checkout-api returns 5xx since 10:00"],
                }],
            });
        }
        apply(&client, ns.name(), &object).await?;
    }
    let agents: Api<Agent> = ns.api();
    wait_for_object(&agents, AGENT, "Ready", TIMEOUT, |a: &Agent| {
        let conditions = a.status.clone().unwrap_or_default().conditions;
        Check::when(contextos_operator::controllers::is_ready(&conditions), || {
            condition(&conditions, "Ready")
        })
    })
    .await?;

    // Callers: `partner` may invoke the agent (a Role naming it), `other` may too, `stranger`
    // may not.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "call-oncall"},
        "rules": [{"apiGroups": ["contextos.dev"], "resources": ["agents"], "verbs": ["invoke"], "resourceNames": [AGENT]}],
    }))?;
    ns.api::<Role>().create(&PostParams::default(), &role).await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "call-oncall"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "call-oncall"},
        "subjects": [
            {"kind": "ServiceAccount", "name": "partner", "namespace": ns.name()},
            {"kind": "ServiceAccount", "name": "other", "namespace": ns.name()},
        ],
    }))?;
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let accounts = ns.api::<ServiceAccount>();
    let a2a = contextos_runner::gateway::readers::A2A_AUDIENCE;
    let partner = token_for(&accounts, "partner", a2a).await?;
    let other = token_for(&accounts, "other", a2a).await?;
    let stranger = token_for(&accounts, "stranger", a2a).await?;
    // The partner's token for reading records: not for calling agents.
    let reading = token_for(
        &accounts,
        "partner",
        contextos_runner::gateway::readers::READER_AUDIENCE,
    )
    .await?;
    let url = format!("{}/a2a/{}/{AGENT}", op.gateway, ns.name());
    let card_url = format!("{url}/.well-known/agent-card.json");
    let http = reqwest::Client::new();

    // Without a token, without the permission, or an agent that is not offered: refused alike
    // before anything is read.
    let status = |r: reqwest::Response| r.status().as_u16();
    ensure!(status(http.get(&card_url).send().await?) == 401, "no token");
    ensure!(
        status(http.get(&card_url).bearer_auth(&reading).send().await?) == 401,
        "a token for another audience is refused"
    );
    ensure!(
        status(http.get(&card_url).bearer_auth(&stranger).send().await?) == 403,
        "a caller without `invoke` is refused"
    );
    let unexposed = format!(
        "{}/a2a/{}/ops-helper/.well-known/agent-card.json",
        op.gateway,
        ns.name()
    );
    ensure!(
        status(http.get(&unexposed).bearer_auth(&partner).send().await?) == 403,
        "the Role names one agent only"
    );
    // The card, as the partner reads it.
    let card: Value = http
        .get(&card_url)
        .bearer_auth(&partner)
        .send()
        .await?
        .json()
        .await?;
    ensure!(card["supportedInterfaces"][0]["url"] == url.as_str(), "{card}");
    // The most it may do on a caller's behalf: its riskiest tool (restart_deployment).
    ensure!(
        card["capabilities"]["extensions"][0]["params"]["maxRisk"] == "destructive",
        "{card}"
    );

    // The Python SDK: a streamed task, paused for the approval, resumed and completed.
    let sessions: Api<Session> = ns.api();
    let script = support("a2a_caller.py");
    let mut py = Caller::start(
        "a2a-sdk",
        &python,
        &[script.to_str().context("path")?, &url, &partner, "py"],
    )?;
    let card = py.next("card").await?;
    ensure!(
        card["card"]["name"] == AGENT && card["card"]["capabilities"]["streaming"] == true,
        "{card}"
    );
    let paused = py.next("paused").await?;
    ensure!(
        paused["state"] == "TASK_STATE_INPUT_REQUIRED",
        "{paused}; saw {:?}",
        py.seen
    );
    let py_task = paused["task"].as_str().context("task id")?.to_owned();
    let asked = py
        .seen
        .iter()
        .filter(|e| e["event"] == "stream" && e["kind"] == "status_update")
        .filter_map(|e| e["body"]["status"]["message"]["parts"][0]["text"].as_str())
        .find(|t| t.contains("approve"))
        .with_context(|| format!("no status said what it waits for: {:?}", py.seen))?;
    ensure!(
        asked.contains("restart_deployment") && asked.contains(&py_task),
        "{asked}"
    );
    approve(&sessions, &py_task).await?;
    py.go_on().await?;
    let done = py.next("final").await?;
    ensure!(
        done["task"]["status"]["state"] == "TASK_STATE_COMPLETED",
        "{done}"
    );
    ensure!(
        done["task"]["artifacts"][0]["parts"]
            .to_string()
            .contains("checkout-api"),
        "{done}"
    );
    // The output arrived on the resumed stream before the task completed.
    let resumed: Vec<&Value> = py.seen.iter().filter(|e| e["event"] == "resumed").collect();
    let artifact_at = resumed.iter().position(|e| e["kind"] == "artifact_update");
    let completed_at = resumed
        .iter()
        .position(|e| e["kind"] == "status_update" && e["body"]["status"]["state"] == "TASK_STATE_COMPLETED");
    ensure!(
        matches!((artifact_at, completed_at), (Some(a), Some(c)) if a < c),
        "resumed stream: {resumed:?}"
    );
    let cancelled = py.next("cancelled").await?;
    ensure!(
        cancelled["task"]["status"]["state"] == "TASK_STATE_CANCELED",
        "{cancelled}"
    );
    py.finish().await?;

    // The JavaScript SDK: the same, answered at once and polled.
    let script = support("a2a_caller.mjs");
    let mut js = Caller::start(
        "@a2a-js/sdk",
        "node",
        &[script.to_str().context("path")?, &modules, &url, &partner, "js"],
    )?;
    let paused = js.next("paused").await?;
    ensure!(paused["task"]["state"] == "TASK_STATE_INPUT_REQUIRED", "{paused}");
    let js_task = paused["task"]["id"].as_str().context("task id")?.to_owned();
    ensure!(
        paused["task"]["message"]
            .to_string()
            .contains("restart_deployment"),
        "{paused}"
    );
    approve(&sessions, &js_task).await?;
    js.go_on().await?;
    let done = js.next("final").await?;
    ensure!(done["task"]["state"] == "TASK_STATE_COMPLETED", "{done}");
    ensure!(
        done["task"]["artifacts"].to_string().contains("checkout-api"),
        "{done}"
    );
    let cancelled = js.next("cancelled").await?;
    ensure!(cancelled["task"]["state"] == "TASK_STATE_CANCELED", "{cancelled}");
    js.finish().await?;

    // Another caller allowed to invoke the agent does not see the partner's task, nor cancel it.
    for method in ["GetTask", "CancelTask"] {
        let answer = rpc(&http, &url, &other, method, json!({"id": py_task})).await?;
        ensure!(
            answer["error"]["code"] == -32001,
            "{method} by another caller: {answer}"
        );
    }
    // The same message sent again is the same task, not a second run.
    let again = rpc(
        &http,
        &url,
        &partner,
        "SendMessage",
        json!({"message": {"messageId": "py-1", "role": "ROLE_USER", "parts": [
            {"text": "checkout-api returns 5xx since 10:00"}, {"data": {"service": "checkout-api"}}
        ]}, "configuration": {"returnImmediately": true}}),
    )
    .await?;
    ensure!(again["result"]["task"]["id"] == py_task.as_str(), "{again}");
    // The caller's trace is the run's: the trace its traceparent names is the one the run's
    // RunContext (and so the record and the gateway's spans) carries.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced: Value = http
        .post(&url)
        .bearer_auth(&partner)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
                "message": {"messageId": "traced-1", "role": "ROLE_USER", "parts": [{"text": "look"}]},
                "configuration": {"returnImmediately": true},
            }}),
        )
        .send()
        .await?
        .json()
        .await?;
    let traced_task = traced["result"]["task"]["id"]
        .as_str()
        .context("task")?
        .to_owned();
    let waiting = crate::operator::phase_is(&sessions, &traced_task, SessionPhase::AwaitingApproval).await?;
    let run = waiting.status.and_then(|s| s.run_id).context("run id")?;
    let context = op
        .recorded_run_context(ns.name(), &run)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(context.to_string().contains(trace), "{context}");
    let cancelled = rpc(&http, &url, &partner, "CancelTask", json!({"id": traced_task})).await?;
    ensure!(
        cancelled["result"]["status"]["state"] == "TASK_STATE_CANCELED",
        "{cancelled}"
    );
    let started = sessions
        .list(&ListParams::default().labels("contextos.dev/a2a=true"))
        .await?
        .items;
    ensure!(
        started.len() == 5,
        "five messages, five Sessions: {}",
        started.len()
    );

    // Each completed run acted for the partner, and its record verifies and says so.
    let subject = format!("system:serviceaccount:{}:partner", ns.name());
    for name in [&py_task, &js_task] {
        let session = sessions.get(name).await?;
        ensure!(
            session.spec.user.as_ref().is_some_and(|u| u.subject == subject),
            "{name}: user {:?}",
            session.spec.user
        );
        let status = session.status.clone().unwrap_or_default();
        op.verify_session_record(ns.name(), &status)
            .await
            .map_err(anyhow::Error::msg)?;
        let run = status.run_id.as_deref().context("run id")?;
        let context = op
            .recorded_run_context(ns.name(), run)
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(context.to_string().contains(&subject), "{name}: {context}");
    }
    ns.pass();
    Ok(())
}
