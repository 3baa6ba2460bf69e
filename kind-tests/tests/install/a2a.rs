//! The quickstart's Agent offered over A2A, called through the installed gateway (`kubectl
//! port-forward` to its Service) by a service account bound to ClusterRole contextos-a2a-caller:
//! with the manifests' own RBAC and admission, the gateway's account starts a Session acting
//! for the caller (the Session identity policy lets it delegate), follows it to the approval it
//! waits on (input-required, naming the call) and cancels it for the caller.

use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Agent, Session};
use contextos_kind_tests::{TestEnv, TestNamespace};
use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount, rbac::v1::RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::{TIMEOUT, gateway_port_forward};

const AGENT: &str = "oncall-assistant";

pub async fn called_through_the_installed_gateway(env: &TestEnv, tenant: &TestNamespace) -> Result<()> {
    let exposed = json!({"spec": {"a2a": {
        "description": "Looks into incidents of the shop's services",
        "skills": [{"id": "triage", "name": "Incident triage", "description": "Finds what is wrong with a service"}],
    }}});
    tenant
        .api::<Agent>()
        .patch(AGENT, &PatchParams::default(), &Patch::Merge(&exposed))
        .await?;
    let accounts = tenant.api::<ServiceAccount>();
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "partner"}}))?;
    accounts.create(&PostParams::default(), &account).await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "partner-calls-agents"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-a2a-caller"},
        "subjects": [{"kind": "ServiceAccount", "name": "partner", "namespace": tenant.name()}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let request: TokenRequest = serde_json::from_value(json!({"spec": {
                "audiences": [contextos_runner::gateway::readers::A2A_AUDIENCE],
        "expirationSeconds": 600,
    }}))?;
    let token = accounts
        .create_token_request("partner", &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("the token request returned no token")?;

    let (_forward, local) = gateway_port_forward(env).await?;
    let url = format!("http://{local}/a2a/{}/{AGENT}", tenant.name());
    let http = reqwest::Client::new();
    let rpc = |method: &'static str, params: Value| {
        let http = http.clone();
        let url = url.clone();
        let token = token.clone();
        async move {
            let body = json!({"jsonrpc": "2.0", "id": method, "method": method, "params": params});
            let answer: Value = http
                .post(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(answer)
        }
    };
    // The card names the endpoint as the caller reached it (the gateway runs without
    // --a2a-public-url here).
    let card: Value = http
        .get(format!("{url}/.well-known/agent-card.json"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    ensure!(card["supportedInterfaces"][0]["url"] == url.as_str(), "{card}");

    let sent = rpc(
        "SendMessage",
        json!({"message": {"messageId": "install-1", "role": "ROLE_USER", "parts": [{"text": "checkout-api returns 5xx"}]},
               "configuration": {"returnImmediately": true}}),
    )
    .await?;
    let task = sent["result"]["task"]["id"]
        .as_str()
        .with_context(|| format!("SendMessage: {sent}"))?
        .to_owned();
    let subject = format!("system:serviceaccount:{}:partner", tenant.name());
    let session: Session = tenant.api::<Session>().get(&task).await?;
    ensure!(
        session.spec.user.as_ref().is_some_and(|u| u.subject == subject),
        "the Session acts for {:?}",
        session.spec.user
    );
    let started = Instant::now();
    let paused = loop {
        let current = rpc("GetTask", json!({"id": task})).await?;
        if current["result"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED" {
            break current;
        }
        ensure!(
            started.elapsed() < TIMEOUT,
            "the task never waited for its approval: {current}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    ensure!(
        paused["result"]["status"]["message"]
            .to_string()
            .contains("restart_deployment"),
        "{paused}"
    );
    let cancelled = rpc("CancelTask", json!({"id": task})).await?;
    ensure!(
        cancelled["result"]["status"]["state"] == "TASK_STATE_CANCELED",
        "{cancelled}"
    );
    Ok(())
}
