//! The improvement loop in the installed cluster (`examples/improvement`, unchanged apart from
//! the image pin): two prod Sessions restart a deployment without asking and one staging
//! Session does too; the on-call lead says, with two Feedback objects, that the prod restarts
//! should have been asked for (in someone else's name it is refused); `contextos propose`,
//! reading the records and corrections through the gateway and the specs from the cluster,
//! drafts a typed Policy proposal — a require_approval rule for restarts in prod — whose own
//! replay Job shows its intended effect on the corrected runs and nothing else; a non-reviewer's
//! acceptance, or one in another's name, is refused; a reviewer accepts; the Policy is promoted
//! through the proposal; the next prod Session waits for approval while staging still runs.
//! A proposal whose replay breaks recorded runs fails and cannot be accepted; a ContextPack
//! proposal is judged by re-executing the recorded sessions (the model asked again).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::{
    ContextPack, Feedback, Policy, Proposal, Session,
    common::PromotedBy,
    proposal::{ProposalPhase, ProposalStatus},
    session::SessionPhase,
};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, env::repo_root, wait_for_object};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

use super::{done_run_id, kubectl, memory::Records, phase, relative, reports, said, write_kustomization};

/// The on-call lead who corrects runs and drafts proposals (edit and feedback rights).
const LEAD: &str = "lee@example.com";
/// A reviewer: a member of the Policy's approvers (group sre-leads).
const REVIEWER: &str = "kim@example.com";
/// How long a proposal's replay and promotion may take.
const TIMEOUT: Duration = Duration::from_secs(180);

pub async fn proposals_through_the_gate(
    env: &'static TestEnv,
    install: &Path,
    runner_image: &str,
) -> Result<()> {
    let tenant = TestNamespace::with_labels(
        env,
        "install-improve",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let result = improve(env, install, runner_image, &tenant).await;
    if let Err(err) = result {
        bail!("{err:#}\n{}", reports(env, &tenant).await);
    }
    tenant.pass();
    Ok(())
}

async fn improve(
    env: &'static TestEnv,
    install: &Path,
    runner_image: &str,
    tenant: &TestNamespace,
) -> Result<()> {
    let dir = install.join("improvement");
    write_kustomization(
        &dir,
        &format!(
            r#"resources: [{example}]
namespace: {namespace}
patches:
  - target: {{kind: SandboxProfile, name: restricted-runner}}
    patch: |-
      - op: replace
        path: /spec/image
        value: "{runner_image}"
"#,
            example = relative(&dir, &repo_root().join("examples/improvement")),
            namespace = tenant.name(),
        ),
    )?;
    super::webhook_secret(tenant).await?;
    kubectl(env, &["apply", "--server-side", "-k"], &dir).await?;
    for (role, subject) in [
        ("contextos-tenant-edit", json!({"kind": "User", "name": LEAD})),
        ("contextos-feedback-giver", json!({"kind": "User", "name": LEAD})),
        // Someone who may give feedback too, though only in their own name.
        (
            "contextos-feedback-giver",
            json!({"kind": "User", "name": "mallory@example.com"}),
        ),
        (
            "contextos-tenant-edit",
            json!({"kind": "Group", "name": "sre-leads"}),
        ),
    ] {
        let mut subject = subject;
        subject["apiGroup"] = json!("rbac.authorization.k8s.io");
        let name = format!(
            "{role}-{}",
            subject["name"].as_str().unwrap_or("x").replace(['@', '.'], "-")
        );
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject],
        }))?;
        tenant
            .api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await?;
    }

    // Three incidents, one after the other.
    let sessions: Api<Session> = tenant.api();
    let examples = yaml_documents(&repo_root().join("examples/improvement/sessions.yaml"))?;
    for session in &examples {
        let name = session["metadata"]["name"].as_str().context("a Session name")?;
        sessions
            .create(&PostParams::default(), &serde_json::from_value(session.clone())?)
            .await?;
        phase(&sessions, name, SessionPhase::Succeeded).await?;
    }

    // The lead's corrections: not in someone else's name, then in their own.
    let feedback_file = repo_root().join("examples/improvement/feedback.yaml");
    let forged = as_user(
        env,
        tenant,
        "mallory@example.com",
        &[],
        &["create", "-f"],
        &feedback_file,
    )
    .await?;
    ensure!(
        !forged.status.success() && said(&forged).contains("is not you"),
        "Feedback in the lead's name by someone else was not refused: {}",
        said(&forged)
    );
    let given = as_user(env, tenant, LEAD, &[], &["create", "-f"], &feedback_file).await?;
    ensure!(
        given.status.success(),
        "the lead's Feedback was refused: {}",
        said(&given)
    );
    let feedbacks: Api<Feedback> = tenant.api();
    for name in ["prod-5xx-1-restart", "prod-5xx-2-restart"] {
        let status = settled(&feedbacks, name).await?.status.unwrap_or_default();
        ensure!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Recorded" && c.status == "True"),
            "Feedback {name} was not chained: {:?}",
            status.conditions
        );
    }

    // A correction pinning a run (`spec.runId`) is chained only to a run of its Session: one
    // naming prod-5xx-1's run under prod-5xx-2 is refused, naming the Session the run is of.
    let first_run = sessions
        .get("prod-5xx-1")
        .await?
        .status
        .and_then(|s| s.run_id)
        .context("prod-5xx-1's run id")?;
    let misfiled = dir.join("misfiled-feedback.yaml");
    std::fs::write(
        &misfiled,
        serde_yaml::to_string(&json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "Feedback",
            "metadata": {"name": "prod-5xx-2-misfiled"},
            "spec": {
                "sessionRef": {"name": "prod-5xx-2"},
                "runId": first_run,
                "label": "should-have-asked",
                "correction": "Filed under the wrong Session.",
                "givenBy": LEAD,
            },
        }))?,
    )?;
    let given = as_user(env, tenant, LEAD, &[], &["create", "-f"], &misfiled).await?;
    ensure!(
        given.status.success(),
        "the pinned Feedback was refused: {}",
        said(&given)
    );
    let misfiled = settled(&feedbacks, "prod-5xx-2-misfiled").await?;
    let status = misfiled.status.unwrap_or_default();
    ensure!(
        status.run_id.is_none()
            && status.conditions.iter().any(|c| c.type_ == "Recorded"
                && c.status == "False"
                && c.message.contains(&format!(
                    "{first_run} is a run of Session prod-5xx-1, not of prod-5xx-2"
                ))),
        "a Feedback pinning another Session's run was not refused: {:?}",
        status.conditions
    );

    // An auditor drafts the proposal from the records and corrections (through the gateway) and
    // the specs in the cluster.
    let records = Records::open(env, tenant).await?;
    let kubeconfig = env.kubeconfig().context("the cluster's kubeconfig")?;
    let mut drafted = None;
    for _ in 0..30 {
        let output = records
            .command(&["propose", "--since", "1h"])
            .env("KUBECONFIG", kubeconfig)
            .output()
            .await?;
        let yaml = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() && yaml.contains("kind: Proposal") {
            drafted = Some((yaml, said(&output)));
            break;
        }
        drafted = None;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !output.status.success() {
            eprintln!("propose: {}", said(&output));
        }
    }
    let (yaml, said_propose) = drafted.context("contextos propose drafted no proposal within 30 s")?;
    let drafts = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
        .collect::<Result<Vec<Value>>>()?;
    ensure!(drafts.len() == 1, "one proposal expected:\n{said_propose}");
    let draft = &drafts[0];
    let rule = &draft["spec"]["patch"]["policy"]["operations"][0]["addRule"];
    ensure!(
        rule["before"] == "allow-restarts"
            && rule["rule"]["effect"] == "require_approval"
            && rule["rule"]["condition"] == r#""namespace" in call.args && call.args["namespace"] == "prod""#,
        "not the proposal the corrections call for:\n{yaml}"
    );
    let name = draft["metadata"]["name"].as_str().context("a name")?.to_owned();
    let file = dir.join("drafted.yaml");
    std::fs::write(&file, &yaml)?;
    let applied = as_user(env, tenant, LEAD, &[], &["apply", "-f"], &file).await?;
    ensure!(
        applied.status.success(),
        "the lead could not apply the proposal: {}",
        said(&applied)
    );

    // Its own replay: the corrected calls change as meant; the staging run does not change.
    let proposals: Api<Proposal> = tenant.api();
    let reviewable = phase_of(&proposals, &name, ProposalPhase::Reviewable).await?;
    let replay = reviewable.replay.clone().context("the replay summary")?;
    ensure!(
        replay.passed && replay.divergences == 0 && replay.sessions >= 3,
        "the replay of the proposal: {replay:?}"
    );
    ensure!(
        reviewable.intended_divergences.unwrap_or(0) >= 2,
        "the corrected calls did not change as intended: {reviewable:?}"
    );
    ensure!(
        reviewable
            .reviewers
            .as_ref()
            .is_some_and(|r| r.groups == ["sre-leads"]),
        "the reviewers are the Policy's approvers: {:?}",
        reviewable.reviewers
    );
    let candidate = reviewable.candidate.clone().context("a candidate")?;

    // Only a reviewer decides, and only in their own name.
    let accept = |by: &str| {
        json!({"spec": {"decision": {"action": "accept", "by": by, "candidate": candidate}}}).to_string()
    };
    let patch = |user: &'static str, groups: &'static [&'static str], body: String| {
        let name = name.clone();
        async move {
            as_user(
                env,
                tenant,
                user,
                groups,
                &[
                    "patch",
                    "proposals.contextos.dev",
                    &name,
                    "--type=merge",
                    "-p",
                    &body,
                ],
                Path::new(""),
            )
            .await
        }
    };
    let refused = patch(LEAD, &[], accept(LEAD)).await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("is not one of status.reviewers"),
        "a non-reviewer accepted: {}",
        said(&refused)
    );
    let refused = patch(REVIEWER, &["sre-leads"], accept(LEAD)).await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("is not you"),
        "a reviewer accepted in someone else's name: {}",
        said(&refused)
    );
    let accepted = patch(REVIEWER, &["sre-leads"], accept(REVIEWER)).await?;
    ensure!(
        accepted.status.success(),
        "the reviewer could not accept: {}",
        said(&accepted)
    );
    phase_of(&proposals, &name, ProposalPhase::Promoted).await?;
    let policy = Api::<Policy>::namespaced(env.client(), tenant.name())
        .get("oncall-guardrails")
        .await?;
    let revisions = policy.status.and_then(|s| s.revisions).context("revisions")?;
    ensure!(
        revisions.promoted.as_deref() == Some(candidate.as_str())
            && revisions.promoted_by == Some(PromotedBy::Proposal),
        "the Policy was not promoted through the proposal: {revisions:?}"
    );

    // Both Agents run it once their compositions are promoted (no second replay: the
    // proposal's replay was the Policy's gate), and the next Sessions follow it: prod waits for
    // on-call, staging does not.
    let agents: Api<contextos_crds::Agent> = tenant.api();
    for agent in ["oncall-assistant", "oncall-staging"] {
        let promoted = wait_for_object(
            &agents,
            agent,
            "running the promoted Policy",
            TIMEOUT,
            |a: &contextos_crds::Agent| {
                let status = a.status.clone().unwrap_or_default();
                let revisions = status.revisions.clone().unwrap_or_default();
                Check::when(
                    status.policy_digests == [candidate.clone()]
                        && revisions.promoted.is_some()
                        && revisions.promoted == revisions.candidate,
                    || format!("{:?} {revisions:?}", status.policy_digests),
                )
            },
        )
        .await?;
        let by = promoted
            .status
            .and_then(|s| s.revisions)
            .and_then(|r| r.promoted_by);
        ensure!(
            by == Some(PromotedBy::Members),
            "Agent {agent} promoted by {by:?}"
        );
    }
    for (template, name) in [(0, "prod-5xx-3"), (2, "staging-5xx-2")] {
        let mut session = examples[template].clone();
        session["metadata"]["name"] = json!(name);
        sessions
            .create(&PostParams::default(), &serde_json::from_value(session)?)
            .await?;
    }
    let paused = phase(&sessions, "prod-5xx-3", SessionPhase::AwaitingApproval).await?;
    let pending = paused
        .status
        .and_then(|s| s.pending_approval)
        .context("the pending call")?;
    ensure!(pending.tool == "restart_deployment", "pending {pending:?}");
    phase(&sessions, "staging-5xx-2", SessionPhase::Succeeded).await?;
    done_run_id(&sessions, "staging-5xx-2").await?;

    // A proposal that would break recorded runs: its replay fails, and nobody can accept it.
    let current = Api::<Policy>::namespaced(env.client(), tenant.name())
        .get("oncall-guardrails")
        .await?
        .status
        .and_then(|s| s.revisions)
        .and_then(|r| r.candidate)
        .context("the Policy's digest")?;
    let mut breaking = yaml_documents(&repo_root().join("examples/improvement/proposal.yaml"))?.remove(0);
    breaking["spec"]["baseDigest"] = json!(current);
    let file = super::memory::yaml_file(&dir, "breaking.yaml", &breaking)?;
    let applied = as_user(env, tenant, LEAD, &[], &["apply", "-f"], &file).await?;
    ensure!(applied.status.success(), "{}", said(&applied));
    let failed = phase_of(&proposals, "deny-status-reads", ProposalPhase::ReplayFailed).await?;
    ensure!(
        failed
            .replay
            .as_ref()
            .is_some_and(|r| !r.passed && r.divergences > 0),
        "the breaking proposal's replay: {failed:?}"
    );
    let candidate = failed.candidate.clone().unwrap_or_default();
    let body = json!({"spec": {"decision": {"action": "accept", "by": REVIEWER, "candidate": candidate}}})
        .to_string();
    let refused = as_user(
        env,
        tenant,
        REVIEWER,
        &["sre-leads"],
        &[
            "patch",
            "proposals.contextos.dev",
            "deny-status-reads",
            "--type=merge",
            "-p",
            &body,
        ],
        Path::new(""),
    )
    .await?;
    ensure!(
        !refused.status.success() && said(&refused).contains("only a candidate whose replay passed"),
        "a proposal whose replay failed was accepted: {}",
        said(&refused)
    );

    // A pack proposal: replaying the recorded model turns cannot judge what the model is told,
    // so its gate re-executes the recorded sessions with the amended pack. Told to act fast,
    // the prod agent restarts before it looks: the replay fails, saying what it cost, and the
    // pack stays as it was.
    let packs = Api::<ContextPack>::namespaced(env.client(), tenant.name());
    let pack = packs.get("oncall-pack").await?;
    let pack_digest = contextos_runner::run::bundle::spec_digest(&pack.spec);
    let mut hasty = yaml_documents(&repo_root().join("examples/improvement/pack-proposal.yaml"))?.remove(0);
    hasty["spec"]["baseDigest"] = json!(pack_digest);
    let file = super::memory::yaml_file(&dir, "act-fast.yaml", &hasty)?;
    let applied = as_user(env, tenant, LEAD, &[], &["apply", "-f"], &file).await?;
    ensure!(applied.status.success(), "{}", said(&applied));
    let failed = phase_of(&proposals, "act-fast", ProposalPhase::ReplayFailed).await?;
    let replay = failed.replay.clone().context("the pack proposal's replay")?;
    let reexecution = replay
        .reexecution
        .clone()
        .with_context(|| format!("the pack proposal was not re-executed: {replay:?}"))?;
    ensure!(
        reexecution.samples == 3
            && reexecution.diverged_samples >= 3
            && reexecution.diverged_samples <= 3 * replay.sessions
            && reexecution.tokens > 0,
        "the re-execution: {reexecution:?} over {} session(s)",
        replay.sessions
    );
    ensure!(
        replay
            .top_divergences
            .iter()
            .any(|l| l.contains("a different call") && l.contains("restart_deployment")),
        "what diverged: {:?}",
        replay.top_divergences
    );
    let now = packs.get("oncall-pack").await?;
    ensure!(
        contextos_runner::run::bundle::spec_digest(&now.spec) == pack_digest,
        "the pack changed under a failed proposal"
    );

    // An acceptance is used once: the lead reverts the Policy to what it was before; the
    // accepted proposal is done (Superseded) and does not put its candidate back.
    let base = draft["spec"]["baseDigest"]
        .as_str()
        .context("the base digest")?
        .to_owned();
    let policies = Api::<Policy>::namespaced(env.client(), tenant.name());
    let mut reverted = serde_json::to_value(policies.get("oncall-guardrails").await?)?;
    let rules = reverted["spec"]["rules"].as_array_mut().context("rules")?;
    rules.retain(|r| r["name"] != "restart_deployment-ask");
    let revert = json!({"spec": {"rules": reverted["spec"]["rules"].clone()}}).to_string();
    let patched = as_user(
        env,
        tenant,
        LEAD,
        &[],
        &[
            "patch",
            "policies.contextos.dev",
            "oncall-guardrails",
            "--type=merge",
            "-p",
            &revert,
        ],
        Path::new(""),
    )
    .await?;
    ensure!(patched.status.success(), "{}", said(&patched));
    phase_of(&proposals, &name, ProposalPhase::Superseded).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = policies.get("oncall-guardrails").await?;
    ensure!(
        contextos_runner::run::bundle::spec_digest(&now.spec) == base,
        "the reverted Policy was changed again: {:?}",
        now.spec.rules.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    Ok(())
}

/// Waits until the proposal reaches `wanted` (failing early on Invalid or Stale).
async fn phase_of(api: &Api<Proposal>, name: &str, wanted: ProposalPhase) -> Result<ProposalStatus> {
    // Settled at `wanted`, or somewhere it cannot leave.
    let found = wait_for_object(
        api,
        name,
        &format!("phase {wanted:?}"),
        TIMEOUT,
        |p: &Proposal| {
            let status = p.status.clone().unwrap_or_default();
            Check::when(
                status.phase == Some(wanted)
                    || matches!(status.phase, Some(ProposalPhase::Invalid | ProposalPhase::Stale)),
                || format!("{:?}: {:?}", status.phase, status.conditions),
            )
        },
    )
    .await?;
    let status = found.status.unwrap_or_default();
    ensure!(
        status.phase == Some(wanted),
        "proposal {name} is {:?}, not {wanted:?}: {:?}",
        status.phase,
        status.conditions
    );
    Ok(status)
}

/// `kubectl <args> [file]` in the tenant as `user` in `groups`.
async fn as_user(
    env: &TestEnv,
    tenant: &TestNamespace,
    user: &str,
    groups: &[&str],
    args: &[&str],
    file: &Path,
) -> Result<std::process::Output> {
    let mut command = env.kubectl();
    command.args(["-n", tenant.name(), "--as", user]);
    for group in groups {
        command.args(["--as-group", group]);
    }
    command.args(args);
    if !file.as_os_str().is_empty() {
        command.arg(file);
    }
    Ok(command.output().await?)
}

fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
        .collect()
}

/// Feedback `name` once the gateway settled it: chained, or refused for good.
async fn settled(feedbacks: &Api<Feedback>, name: &str) -> Result<Feedback> {
    let settled = wait_for_object(
        feedbacks,
        name,
        "settled by the gateway",
        TIMEOUT,
        |f: &Feedback| {
            let status = f.status.clone().unwrap_or_default();
            let recorded = status.conditions.iter().find(|c| c.type_ == "Recorded");
            Check::when(
                recorded.is_some_and(|c| c.status == "True" || c.reason != "StoreUnavailable"),
                || format!("{recorded:?}"),
            )
        },
    )
    .await?;
    Ok(settled)
}
