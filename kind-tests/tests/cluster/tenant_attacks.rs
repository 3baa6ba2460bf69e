//! Attacks by a tenant — someone who may create and change any object in their own namespace —
//! on what the operator trusts. Each attack must be refused or detected with a condition that
//! names the object, and the legitimate flow must work right after it.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Session, session::SessionPhase};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{Api, api::DeleteParams};
use serde_json::json;

use crate::{
    objects::apply,
    operator::{TIMEOUT, condition, objects_for, phase_is, session},
};

/// The tenant creates a Session whose Agent does not exist yet, plants the Session's bundle
/// ConfigMap (owned by the Session's uid, as the operator's would be) holding its own sandbox
/// and no Policies, then creates the Agent. The operator must not run the planted bundle.
#[tokio::test]
async fn a_tenant_cannot_plant_a_sessions_run_bundle() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "tenant-plants-bundle").await?;
    let client = env.client();
    let objects = objects_for(env, &op.tools_url)?;
    let (agents, others): (Vec<_>, Vec<_>) = objects.into_iter().partition(|o| o["kind"] == "Agent");
    for object in &others {
        apply(&client, ns.name(), object).await?;
    }
    apply(&client, ns.name(), &session("planted")?).await?;
    let sessions: Api<Session> = ns.api();
    let waiting = phase_is(&sessions, "planted", SessionPhase::Pending).await?;
    let uid = waiting.metadata.uid.clone().context("the Session's uid")?;

    let planted = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "planted-bundle",
            "labels": {"contextos.dev/session": "planted"},
            "ownerReferences": [{"apiVersion": "contextos.dev/v1alpha1", "kind": "Session",
                "name": "planted", "uid": uid, "controller": true}],
        },
        "data": {"bundle.json": json!({
            "bundle": {"tenant": "contextos-system", "policies": []},
            "sandbox": {"image": "registry.example.com/tenant/anything@sha256:0",
                        "egress": [{"cidr": "0.0.0.0/0", "ports": [{"port": 443}]}]},
        }).to_string()},
    });
    apply(&client, ns.name(), &planted).await?;
    for agent in &agents {
        apply(&client, ns.name(), agent).await?;
    }
    let refused = wait_for_object(
        &sessions,
        "planted",
        "Ready=False naming the planted bundle",
        TIMEOUT,
        |s: &Session| {
            let ready = condition(&s.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(ready.contains("UntrustedChild"), || ready.clone())
        },
    )
    .await?;
    let ready = condition(&refused.status.unwrap_or_default().conditions, "Ready");
    ensure!(
        ready.contains("ConfigMap planted-bundle is not the run bundle the operator wrote"),
        "the condition does not name the planted ConfigMap: {ready}"
    );
    let pods: Api<Pod> = ns.api();
    ensure!(
        pods.get_opt("planted-run-1").await?.is_none(),
        "a runner pod was started from the planted bundle"
    );

    // Removing the planted object lets the operator pin the Agent's revisions itself.
    let config_maps: Api<ConfigMap> = ns.api();
    config_maps
        .delete("planted-bundle", &DeleteParams::default())
        .await?;
    phase_is(&sessions, "planted", SessionPhase::AwaitingApproval).await?;
    let bundle = config_maps.get("planted-bundle").await?;
    ensure!(
        bundle
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("contextos.dev/seal"),
        "the operator's bundle carries no seal"
    );

    // Once the run started, that bundle is what it runs: deleted, it is not pinned again from
    // the Agent's revisions (later attempts would run under other revisions than the record
    // and status say). The Session ends, naming it. (A label change brings it back: Sessions
    // do not watch ConfigMaps.)
    config_maps
        .delete("planted-bundle", &DeleteParams::default())
        .await?;
    sessions
        .patch(
            "planted",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"nudge": "1"}}})),
        )
        .await?;
    let ended = phase_is(&sessions, "planted", SessionPhase::Failed).await?;
    let ready = condition(&ended.status.unwrap_or_default().conditions, "Ready");
    ensure!(
        ready.contains("BundleLost") && ready.contains("ConfigMap planted-bundle"),
        "the Session does not say its bundle was lost: {ready}"
    );
    ensure!(
        config_maps.get_opt("planted-bundle").await?.is_none(),
        "the operator pinned the Session's revisions again"
    );
    ns.pass();
    Ok(())
}

/// The tenant plants the replay Job the operator will create for a candidate (its name follows
/// from the candidate's digest), whose pod reports a passing verdict, then commits a Policy
/// change that the recorded sessions would fail. The forged report must not promote it: the
/// planted Job carries no order of the operator's for this round of the gate, so it is
/// replaced by the operator's own, which gets the gateway's verdict, and the gate fails as it
/// should.
#[tokio::test]
async fn a_tenant_cannot_pass_a_replay_gate_with_a_planted_job() -> Result<()> {
    use contextos_crds::Policy;
    use contextos_operator::replay_job::{GateTarget, attempt_job_name, job_name};
    use contextos_runner::run::{
        bundle::spec_digest,
        gate::{GateRound, GatedKind},
    };
    use k8s_openapi::api::batch::v1::Job;
    use kube::api::{Patch, PatchParams};

    use crate::operator::policy_condition;

    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner and replay pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "tenant-plants-job").await?;
    let client = env.client();
    let policy = crate::promotion::install(env, ns.name(), &op.tools_url, |_| {}).await?;
    let sessions: Api<Session> = ns.api();
    apply(&client, ns.name(), &session("recorded")?).await?;
    phase_is(&sessions, "recorded", SessionPhase::Succeeded).await?;
    let policies: Api<Policy> = ns.api();
    let first = crate::promotion::promoted_guardrails(&policies).await?;

    // The change denies the reads the recorded session made. Its digest, as the operator will
    // compute it, from a server-side dry run.
    let mut strict = policy.clone();
    strict["spec"]["rules"][1]["effect"] = json!("deny");
    let dry = policies
        .patch(
            "oncall-guardrails",
            &PatchParams::apply("tenant").force().dry_run(),
            &Patch::Apply(&strict),
        )
        .await?;
    let digest = spec_digest(&dry.spec);
    let target = GateTarget {
        kind: GatedKind::Policy,
        name: "oncall-guardrails",
        namespace: ns.name(),
        digest: &digest,
        owner: None,
        proposal: None,
        expected: &[],
        prices: &Default::default(),
        // Only names are made of it here.
        round: GateRound {
            uid: String::new(),
            serial: 0,
        },
        round_saved: true,
    };
    let planted_name = job_name(&target);
    let forged = json!({
        "verdict": {
            "job": planted_name, "kind": "policy", "name": "oncall-guardrails",
            "candidateDigest": digest,
            "gate": {"runs": 1, "steps": 3, "divergentSteps": 0, "divergencePercent": 0.0,
                     "maxDivergencePercent": 0.0, "passed": true},
        },
        "signature": "00",
    });
    let planted = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": planted_name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "replay", "image": env.busybox_image(),
                "command": ["sh", "-c", "printf %s \"$VERDICT\" > \"${CONTEXTOS_ROOT:-}/dev/termination-log\""],
                "env": [{"name": "VERDICT", "value": forged.to_string()}],
            }],
        }}},
    });
    apply(&client, ns.name(), &planted).await?;
    let jobs: Api<Job> = ns.api();
    let planted_uid = jobs.get(&planted_name).await?.metadata.uid;
    apply(&client, ns.name(), &strict).await?;

    let failed = policy_condition(
        &policies,
        "oncall-guardrails",
        "ReplayPassed",
        "False ReplayFailed",
    )
    .await?;
    let revisions = failed.status.and_then(|s| s.revisions).unwrap_or_default();
    ensure!(
        revisions.promoted.as_deref() == Some(first.as_str()),
        "the forged verdict promoted the change: {revisions:?}"
    );
    let summary = revisions.replay.context("the replay summary")?;
    ensure!(
        summary.job.as_deref() == Some(planted_name.as_str()) && summary.divergences > 0,
        "the verdict is not the operator's first attempt's: {summary:?}"
    );
    let operators = jobs.get(&planted_name).await?.metadata.uid;
    ensure!(
        operators != planted_uid,
        "the verdict was read from the planted Job"
    );
    ensure!(
        jobs.get_opt(&attempt_job_name(&target, 2)).await?.is_none(),
        "no second attempt was needed"
    );
    ns.pass();
    Ok(())
}

/// A Policy condition nested deep enough to exhaust a worker thread's stack while parsing (90
/// parentheses) or evaluating (64 terms in a row) once crashed every process that compiled it —
/// the operator first, for every tenant. The operator must stay up and refuse both, naming the
/// problem.
#[tokio::test]
async fn a_tenant_cannot_crash_the_operator_with_a_deeply_nested_condition() -> Result<()> {
    use contextos_crds::Policy;

    use crate::operator::policy_condition;

    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: needs the local operator");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "tenant-deep-cel").await?;
    let client = env.client();
    let policy = objects_for(env, &op.tools_url)?
        .into_iter()
        .find(|o| o["kind"] == "Policy")
        .context("the quickstart has a Policy")?;
    let with_condition = |name: &str, condition: String| {
        let mut policy = policy.clone();
        policy["metadata"]["name"] = json!(name);
        policy["spec"]["rules"][0]["condition"] = json!(condition);
        policy
    };
    let parens = format!("{}true{}", "(".repeat(90), ")".repeat(90));
    apply(&client, ns.name(), &with_condition("parens", parens)).await?;
    let chain = format!("{} > 0", vec!["size(call.args)"; 64].join(" + "));
    apply(&client, ns.name(), &with_condition("chain", chain)).await?;
    let policies: Api<Policy> = ns.api();
    let parens = policy_condition(&policies, "parens", "Ready", "False InvalidExpression").await?;
    let ready = condition(&parens.status.unwrap_or_default().conditions, "Ready");
    ensure!(ready.contains("nests brackets 90 deep"), "{ready}");
    let refused = policy_condition(&policies, "chain", "Ready", "False InvalidExpression").await?;
    let ready = condition(&refused.status.unwrap_or_default().conditions, "Ready");
    ensure!(ready.contains("nested more than"), "{ready}");
    // Still serving: an ordinary Policy becomes Ready.
    apply(&client, ns.name(), &with_condition("ordinary", "true".into())).await?;
    policy_condition(&policies, "ordinary", "Ready", "True").await?;
    ns.pass();
    Ok(())
}

/// A GitOps committer who may edit the Agent but not approve the Policy's promotion tries to
/// shed the Policy's replay gate: first by pointing the Agent at a new Policy that denies what
/// the recorded session did (a new Policy's first revision is in force at once), then by
/// deleting the gated Policy and creating it again with that content. Both are candidates of
/// the Agent, replayed against its recorded session; both fail, and Sessions keep running the
/// promoted composition. Pointing the Agent back is in force at once. Last, the Agent itself is
/// deleted and created again: its first composition is replayed against its recorded sessions
/// too, fails, and new Sessions wait instead of running it.
#[tokio::test]
async fn a_gitops_committer_cannot_shed_a_policys_gate_by_renaming_or_re_creating_it() -> Result<()> {
    use contextos_crds::{Agent, Policy};

    use crate::operator::policy_condition;

    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: runner and replay pods need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "committer-sheds-gate").await?;
    let client = env.client();
    let policy = crate::promotion::install(env, ns.name(), &op.tools_url, |_| {}).await?;
    let agent = objects_for(env, &op.tools_url)?
        .into_iter()
        .find(|o| o["kind"] == "Agent")
        .context("the quickstart has an Agent")?;
    let agent_name = agent["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let sessions: Api<Session> = ns.api();
    apply(&client, ns.name(), &session("recorded")?).await?;
    phase_is(&sessions, "recorded", SessionPhase::Succeeded).await?;
    let policies: Api<Policy> = ns.api();
    let first_policy = crate::promotion::promoted_guardrails(&policies).await?;
    let agents: Api<Agent> = ns.api();
    let promoted = agents
        .get(&agent_name)
        .await?
        .status
        .and_then(|s| s.revisions)
        .and_then(|r| r.promoted)
        .context("the Agent's composition is promoted")?;

    let mut strict = policy.clone();
    strict["spec"]["rules"][1]["effect"] = json!("deny");
    let agent_fails = |what: &'static str| {
        let agents = agents.clone();
        let agent_name = agent_name.clone();
        let promoted = promoted.clone();
        async move {
            let failed = wait_for_object(&agents, &agent_name, what, TIMEOUT, |a: &Agent| {
                let status = a.status.clone().unwrap_or_default();
                let replay = condition(&status.conditions, "ReplayPassed");
                Check::when(replay.starts_with("False ReplayFailed"), || {
                    format!(
                        "ReplayPassed: {replay}; Promoted: {}",
                        condition(&status.conditions, "Promoted")
                    )
                })
            })
            .await?;
            let status = failed.status.unwrap_or_default();
            let revisions = status.revisions.unwrap_or_default();
            ensure!(
                revisions.promoted.as_deref() == Some(promoted.as_str()),
                "{what}: the candidate was promoted: {revisions:?}"
            );
            let gate = status.promotion_gate.unwrap_or_default();
            ensure!(
                gate.from.iter().any(|f| f == "Policy/oncall-guardrails"),
                "{what}: the gate does not come from the Policy it sheds: {gate:?}"
            );
            anyhow::Ok(())
        }
    };

    // 1. A new Policy, and the Agent pointed at it.
    let mut renamed = strict.clone();
    renamed["metadata"]["name"] = json!("guardrails-v2");
    renamed["spec"]
        .as_object_mut()
        .context("a Policy spec")?
        .remove("promotion");
    apply(&client, ns.name(), &renamed).await?;
    policy_condition(&policies, "guardrails-v2", "Promoted", "True").await?;
    let mut pointed = agent.clone();
    pointed["spec"]["policyRefs"] = json!([{"name": "guardrails-v2"}]);
    apply(&client, ns.name(), &pointed).await?;
    agent_fails("the Agent pointed at a new Policy fails its replay gate").await?;
    apply(&client, ns.name(), &session("after-rename")?).await?;
    let after = phase_is(&sessions, "after-rename", SessionPhase::Succeeded).await?;
    let pinned = after.status.and_then(|s| s.pinned).context("pinned")?;
    ensure!(
        pinned.policies == [first_policy.clone()],
        "the Session ran the candidate: pinned {pinned:?}, promoted policy {first_policy}"
    );

    // The legitimate flow right after: pointing back is the promoted composition again.
    apply(&client, ns.name(), &agent).await?;
    wait_for_object(
        &agents,
        &agent_name,
        "the promoted composition in force",
        TIMEOUT,
        |a: &Agent| {
            let status = a.status.clone().unwrap_or_default();
            let revisions = status.revisions.clone().unwrap_or_default();
            let text = condition(&status.conditions, "Promoted");
            Check::when(
                text.starts_with("True") && revisions.candidate == revisions.promoted,
                || format!("{text}; {revisions:?}"),
            )
        },
    )
    .await?;

    // 2. The gated Policy deleted and created again with the strict content.
    policies
        .delete("oncall-guardrails", &DeleteParams::default())
        .await?;
    wait_for_object(
        &agents,
        &agent_name,
        "Ready=False without its Policy",
        TIMEOUT,
        |a: &Agent| {
            let ready = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(ready.starts_with("False"), || ready.clone())
        },
    )
    .await?;
    apply(&client, ns.name(), &strict).await?;
    agent_fails("the Agent whose gated Policy was re-created fails its replay gate").await?;
    apply(&client, ns.name(), &session("after-recreate")?).await?;
    let after = phase_is(&sessions, "after-recreate", SessionPhase::Succeeded).await?;
    let pinned = after.status.and_then(|s| s.pinned).context("pinned")?;
    ensure!(
        pinned.policies == [first_policy.clone()],
        "the Session ran the re-created Policy: pinned {pinned:?}, promoted {first_policy}"
    );

    // 3. The Agent deleted and created again (its status, and the gates it remembered, gone):
    // its first composition is replayed against its recorded sessions, fails, and nothing runs.
    let uid = agents.get(&agent_name).await?.metadata.uid;
    agents.delete(&agent_name, &DeleteParams::default()).await?;
    contextos_kind_tests::wait_for_deletion(&agents, &agent_name, uid.as_deref(), TIMEOUT, |a: &Agent| {
        format!("{:?}", a.metadata.deletion_timestamp)
    })
    .await?;
    apply(&client, ns.name(), &agent).await?;
    let failed = wait_for_object(
        &agents,
        &agent_name,
        "the re-created Agent fails its replay",
        TIMEOUT,
        |a: &Agent| {
            let status = a.status.clone().unwrap_or_default();
            let replay = condition(&status.conditions, "ReplayPassed");
            Check::when(replay.starts_with("False ReplayFailed"), || replay.clone())
        },
    )
    .await?;
    let revisions = failed.status.and_then(|s| s.revisions).unwrap_or_default();
    ensure!(
        revisions.promoted.is_none(),
        "the re-created Agent's composition was promoted: {revisions:?}"
    );
    apply(&client, ns.name(), &session("after-agent-recreate")?).await?;
    let held = wait_for_object(
        &sessions,
        "after-agent-recreate",
        "held without a promoted revision",
        TIMEOUT,
        |s: &Session| {
            let ready = condition(&s.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(ready.contains("has no promoted revision yet"), || ready.clone())
        },
    )
    .await?;
    ensure!(
        held.status.and_then(|s| s.pinned).is_none(),
        "a Session pinned the re-created Agent's unpromoted composition"
    );
    ns.pass();
    Ok(())
}
