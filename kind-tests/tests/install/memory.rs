//! Memory across Sessions in the installed cluster (`examples/memory`, unchanged apart from the
//! image pin): the customer's consent is applied with `kubectl` by the privacy officer (in
//! someone else's name it is refused), and the gateway chains it (`kubectl wait
//! --for=condition=Ready`); the first ticket's Session keeps what it learned, the second recalls
//! it into its context (and, through the namespace's Ontology, what is about an invoice into
//! the invoice source); the customer's revocation, applied with `kubectl`, is honoured by the
//! very next Session. What each run was offered is read from its record through the gateway, as
//! an auditor would.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{TestEnv, TestNamespace, env::repo_root};
use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount, rbac::v1::RoleBinding};
use kube::api::PostParams;
use serde_json::json;

use super::{
    as_person, done_run_id, gateway_port_forward, kubectl, phase, relative, reports, said,
    write_kustomization,
};

const OFFICER: &str = "priya@example.com";
const CUSTOMER: &str = "cust-7f3a9c";

pub async fn remembered_across_sessions(
    env: &'static TestEnv,
    install: &Path,
    runner_image: &str,
) -> Result<()> {
    let tenant = TestNamespace::with_labels(
        env,
        "install-memory",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let dir = install.join("memory");
    // Everything but the Sessions, which are created one after the other below.
    write_kustomization(
        &dir,
        &format!(
            r#"resources: [{example}]
namespace: {namespace}
patches:
  - target: {{kind: SandboxProfile, name: support-runner}}
    patch: |-
      - op: replace
        path: /spec/image
        value: "{runner_image}"
  - target: {{kind: Session}}
    patch: |-
      $patch: delete
      apiVersion: contextos.dev/v1alpha1
      kind: Session
      metadata: {{name: any}}
"#,
            example = relative(&dir, &repo_root().join("examples/memory")),
            namespace = tenant.name(),
        ),
    )?;
    kubectl(env, &["apply", "--server-side", "-k"], &dir).await?;
    let result = sessions_within_consent(env, &tenant).await;
    if let Err(err) = result {
        anyhow::bail!("{err:#}\n{}", reports(env, &tenant).await);
    }
    tenant.pass();
    Ok(())
}

async fn sessions_within_consent(env: &'static TestEnv, tenant: &TestNamespace) -> Result<()> {
    // The privacy desk records consent: the officer in their own name; someone else of the desk
    // cannot put the officer's name on it.
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "privacy-desk"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "contextos-consent-keeper"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "privacy-desk"}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    let grant = repo_root().join("examples/memory/consent/grant.yaml");
    let forged = apply_consent(env, tenant, &grant, "mallory@example.com").await?;
    ensure!(
        !forged.status.success() && said(&forged).contains("spec.recordedBy: priya@example.com is not you"),
        "a consent in someone else's name was not refused as such: {}",
        said(&forged)
    );
    let mut applied = None;
    // The binding reaches the API server's authorizer within moments.
    for _ in 0..30 {
        let output = apply_consent(env, tenant, &grant, OFFICER).await?;
        if output.status.success() {
            applied = Some(output);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    applied.context("the privacy officer could not apply the consent within 30 s")?;
    wait_recorded(env, tenant, "cust-7f3a9c-support-history-grant").await?;

    let sessions = tenant.api::<Session>();
    let first = start_ticket(
        &sessions,
        "ticket-4711",
        "Ticket 4711: the invoice shows the wrong VAT number.",
    )
    .await?;
    let second = start_ticket(
        &sessions,
        "ticket-4712",
        "Ticket 4712: is the corrected invoice on its way?",
    )
    .await?;

    // The customer withdraws their consent, on the phone; the officer records it.
    let files = tempfile::tempdir()?;
    let revoke = yaml_file(
        files.path(),
        "revoke.yaml",
        &json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "Consent",
            "metadata": {"name": "cust-7f3a9c-support-history-revoke"},
            "spec": {"subject": CUSTOMER, "purpose": "support-history", "action": "revoke",
                     "evidence": "phone call, ticket 4712", "recordedBy": OFFICER},
        }),
    )?;
    let output = apply_consent(env, tenant, &revoke, OFFICER).await?;
    ensure!(
        output.status.success(),
        "the revocation was refused: {}",
        said(&output)
    );
    wait_recorded(env, tenant, "cust-7f3a9c-support-history-revoke").await?;
    let third = start_ticket(
        &sessions,
        "ticket-4713",
        "Ticket 4713: please confirm my address.",
    )
    .await?;

    // What each run was offered, from its record, read by an auditor through the gateway.
    let records = Records::open(env, tenant).await?;
    let shown = records.show(&first).await?;
    ensure!(
        shown.contains("memory candidate of call 3.0 kept: its personal data (email) is covered by consent"),
        "the first ticket did not keep the e-mail address under the consent:\n{shown}"
    );
    let shown = records.show(&second).await?;
    ensure!(
        shown.contains("recalled 2 item(s) of subject:cust-7f3a9c for source customer-memory"),
        "the second ticket did not recall what the first learned:\n{shown}"
    );
    ensure!(
        shown.contains("recalled 1 item(s) of subject:cust-7f3a9c about an entity of type invoice for source invoice-memory"),
        "the second ticket's invoice source (the namespace's Ontology) did not recall the item about an invoice:\n{shown}"
    );
    let shown = records.show(&third).await?;
    ensure!(
        shown.contains("recalled 0 item(s) of subject:cust-7f3a9c for source customer-memory; held back 2"),
        "the revocation was not honoured by the next Session:\n{shown}"
    );
    erased_through_the_gateway(env, tenant, &records, &sessions, &first).await
}

/// The privacy desk erases the customer through the gateway: the auditor can no longer read
/// what their runs recorded about them, every record still verifies, the tenant's key ring in
/// `contextos-vault` was rotated, and a new Session about them fails saying why.
async fn erased_through_the_gateway(
    env: &'static TestEnv,
    tenant: &TestNamespace,
    records: &Records,
    sessions: &kube::Api<Session>,
    first: &str,
) -> Result<()> {
    // The runner recorded what it learned encrypted; the records reader opens it.
    let shown = records.show(first).await?;
    ensure!(
        shown.contains("ana.lopez@example.com"),
        "a records reader could not read what the first ticket recorded:\n{shown}"
    );
    // Erasing needs its own right: the auditor is refused until bound to it.
    let refused = records.person(&["subject", "erase", CUSTOMER, "--yes"]).await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("contextos-subject-eraser"),
        "an erasure without the right was not refused naming it: {}",
        said(&refused)
    );
    bind_auditor(tenant, "contextos-subject-eraser").await?;
    let mut erased = None;
    for _ in 0..30 {
        let output = records.person(&["subject", "erase", CUSTOMER, "--yes"]).await?;
        if output.status.success() {
            erased = Some(said(&output));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let erased = erased.context("the eraser could not erase the customer within 30 s")?;
    ensure!(
        erased.contains("erased: subject cust-7f3a9c") && erased.contains("memory-auditor"),
        "the erasure did not say who erased whom: {erased}"
    );
    let shown = records.show(first).await?;
    ensure!(
        shown.contains("[erased]") && !shown.contains("ana.lopez@example.com"),
        "the first ticket's record still reads what it learned about the customer:\n{shown}"
    );
    let published = super::http_get(
        records.store.trim_start_matches("gateway+http://"),
        &format!("/v1/tenants/{}/record-key", tenant.name()),
    )
    .await?;
    let published: serde_json::Value = serde_json::from_str(&published)?;
    let key = published["publicKey"].as_str().context("publicKey")?.to_owned();
    let verified = records
        .person(&["records", "verify", "--all", "--public-key", &key])
        .await?;
    ensure!(
        verified.status.success(),
        "the records no longer verify after the erasure: {}",
        said(&verified)
    );
    let ring = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(env.client(), "contextos-vault")
        .get(&format!("contextos-vault-{}", tenant.name()))
        .await
        .context("the tenant's key ring Secret in contextos-vault")?;
    let ring = ring
        .data
        .and_then(|d| d.get("ring.json").cloned())
        .context("the key ring Secret holds no ring.json")?;
    ensure!(
        String::from_utf8_lossy(&ring.0).contains("\"epoch\":2"),
        "the erasure did not rotate the tenant's key ring"
    );
    // Nothing is kept about the handle again: a new ticket about them fails, saying why.
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "Session",
        "metadata": {"name": "ticket-4714"},
        "spec": {"agentRef": {"name": "support-assistant"}, "subject": CUSTOMER, "input": {"prompt": "Ticket 4714: hello again."}},
    }))?;
    sessions.create(&PostParams::default(), &session).await?;
    let failed = phase(sessions, "ticket-4714", SessionPhase::Failed).await?;
    let why = serde_json::to_string(&failed.status)?;
    ensure!(
        why.contains("erased"),
        "the Session about an erased subject failed without saying why: {why}"
    );
    Ok(())
}

/// `kubectl apply -f path` in the tenant's namespace as `user` of group `privacy-desk`.
async fn apply_consent(
    env: &TestEnv,
    tenant: &TestNamespace,
    path: &Path,
    user: &str,
) -> Result<std::process::Output> {
    Ok(env
        .kubectl()
        .args([
            "apply",
            "-n",
            tenant.name(),
            "--as",
            user,
            "--as-group",
            "privacy-desk",
            "-f",
        ])
        .arg(path)
        .output()
        .await?)
}

/// `kubectl wait --for=condition=Ready consent/<name>`: the gateway chained it.
async fn wait_recorded(env: &TestEnv, tenant: &TestNamespace, name: &str) -> Result<()> {
    let output = env
        .kubectl()
        .args([
            "wait",
            "-n",
            tenant.name(),
            "--for=condition=Ready",
            "--timeout=60s",
        ])
        .arg(format!("consents.contextos.dev/{name}"))
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "Consent {name} was not chained by the gateway: {}",
        said(&output)
    );
    Ok(())
}

/// Writes `object` as YAML into `dir`, for `kubectl apply -f`.
pub(super) fn yaml_file(dir: &Path, name: &str, object: &serde_json::Value) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(object)?)?;
    Ok(path)
}

/// Creates one ticket of the customer (the example's Session, renamed) and waits until it
/// succeeds; its run id.
async fn start_ticket(sessions: &kube::Api<Session>, name: &str, prompt: &str) -> Result<String> {
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "Session",
        "metadata": {"name": name},
        "spec": {"agentRef": {"name": "support-assistant"}, "subject": CUSTOMER, "input": {"prompt": prompt}},
    }))?;
    sessions.create(&PostParams::default(), &session).await?;
    phase(sessions, name, SessionPhase::Succeeded).await?;
    done_run_id(sessions, name).await
}

/// Binds ClusterRole `role` to the auditor's service account in the tenant.
async fn bind_auditor(tenant: &TestNamespace, role: &str) -> Result<()> {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("memory-auditor-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "memory-auditor", "namespace": tenant.name()}],
    }))?;
    tenant
        .api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// An auditor of the tenant's records, through a port-forward to the gateway.
pub(super) struct Records {
    _forward: tokio::process::Child,
    pub(super) store: String,
    token: String,
    namespace: String,
}

impl Records {
    pub(super) async fn open(env: &'static TestEnv, tenant: &TestNamespace) -> Result<Self> {
        let accounts = tenant.api::<ServiceAccount>();
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "memory-auditor"}}))?;
        accounts.create(&PostParams::default(), &account).await?;
        bind_auditor(tenant, "contextos-records-reader").await?;
        let request: TokenRequest = serde_json::from_value(json!({"spec": {
            "audiences": [contextos_runner::gateway::readers::READER_AUDIENCE], "expirationSeconds": 600}}))?;
        let token = accounts
            .create_token_request("memory-auditor", &PostParams::default(), &request)
            .await?
            .status
            .and_then(|s| s.token)
            .context("the token request returned no token")?;
        let (forward, local) = gateway_port_forward(env).await?;
        Ok(Self {
            _forward: forward,
            store: format!("gateway+http://{local}"),
            token,
            namespace: tenant.name().to_owned(),
        })
    }

    /// `contextos <args>` as the auditor, through the gateway, to be run.
    pub(super) fn command(&self, args: &[&str]) -> tokio::process::Command {
        let (command, rest) = args.split_first().map_or(("help", &[][..]), |(c, r)| (*c, r));
        as_person(command, rest, &self.store, &self.namespace, &self.token)
    }

    /// `contextos <args>` as the auditor, through the gateway.
    pub(super) async fn person(&self, args: &[&str]) -> Result<std::process::Output> {
        let (command, rest) = args.split_first().context("a command")?;
        Ok(
            as_person(command, rest, &self.store, &self.namespace, &self.token)
                .output()
                .await?,
        )
    }

    /// `contextos records show <run>` (retried while the new binding reaches the gateway).
    pub(super) async fn show(&self, run: &str) -> Result<String> {
        let mut last = String::new();
        for _ in 0..30 {
            let output = as_person(
                "records",
                &["show", run],
                &self.store,
                &self.namespace,
                &self.token,
            )
            .output()
            .await?;
            last = said(&output);
            if output.status.success() {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        anyhow::bail!("the auditor could not read run {run} within 30 s: {last}")
    }
}
