//! Skills against the real API server, the operator and the gateway service: each quickstart
//! skill is promoted only once its evaluation suite passed in a Job (the gateway's signed
//! verdict), the Agent composes the promoted revisions; a candidate whose suite fails is held —
//! even with the bypass annotation a replay gate would honour — and Agents keep the revision in
//! force; the next passing candidate is the one Agents pick up.

use anyhow::{Context as _, Result, ensure};
use contextos_crds::{Agent, Skill};
use contextos_kind_tests::{Check, TestEnv, TestNamespace, operator_env, wait_for_object};
use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::Api;
use serde_json::{Value, json};

use crate::{
    objects::apply,
    operator::{TIMEOUT, condition, objects_for},
};

/// Waits until Skill `name`'s condition `type_` reads `<status> <reason> …` starting with
/// `prefix`.
async fn skill_condition(api: &Api<Skill>, name: &str, type_: &str, prefix: &str) -> Result<Skill> {
    Ok(
        wait_for_object(api, name, &format!("{type_}: {prefix}"), TIMEOUT, |s: &Skill| {
            let text = condition(&s.status.clone().unwrap_or_default().conditions, type_);
            Check::when(text.starts_with(prefix), || text.clone())
        })
        .await?,
    )
}

fn promoted(skill: &Skill) -> Option<String> {
    skill.status.as_ref()?.revisions.as_ref()?.promoted.clone()
}

/// The skills (name, digest) of the composition Agent `oncall-assistant` runs, once it is
/// `wanted`.
async fn composed_skills(
    ns: &TestNamespace,
    wanted: impl Fn(&[(String, String)]) -> bool,
) -> Result<Vec<(String, String)>> {
    let agents: Api<Agent> = ns.api();
    let revisions: Api<ControllerRevision> = ns.api();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let agent = agents.get("oncall-assistant").await?;
        let snapshot = agent
            .status
            .as_ref()
            .and_then(|s| s.revisions.as_ref())
            .and_then(|r| r.promoted_snapshot.clone());
        let mut skills = Vec::new();
        if let Some(snapshot) = snapshot
            && let Some(revision) = revisions.get_opt(&snapshot).await?
        {
            let spec = revision.data.map(|d| d.0["spec"].clone()).unwrap_or(Value::Null);
            for skill in spec["skills"].as_array().into_iter().flatten() {
                skills.push((
                    skill["name"].as_str().unwrap_or_default().to_owned(),
                    skill["digest"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        if wanted(&skills) {
            return Ok(skills);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the Agent's promoted composition uses skills {skills:?}; Ready: {}",
            condition(&agent.status.unwrap_or_default().conditions, "Ready")
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_skill_is_promoted_only_when_its_suite_passes_and_agents_run_the_promoted_revision() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(op) = operator_env::shared(env).await.map_err(anyhow::Error::msg)? else {
        eprintln!("skipped: evaluation Jobs need a local node (KUBECONFIG is set)");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "skills").await?;
    let client = env.client();
    let mut mitigation = Value::Null;
    let mut agent_object = Value::Null;
    for mut object in objects_for(env, &op.tools_url)? {
        // No gate on the Agent's composition: a skill's promoted revision is picked up at once.
        if object["kind"] == "Policy"
            && let Some(spec) = object["spec"].as_object_mut()
        {
            spec.remove("promotion");
        }
        if object["kind"] == "Skill" && object["metadata"]["name"] == "mitigation" {
            mitigation = object.clone();
        }
        if object["kind"] == "Agent" {
            agent_object = object.clone();
        }
        apply(&client, ns.name(), &object).await?;
    }
    let skills: Api<Skill> = ns.api();
    let mut promoted_first = Vec::new();
    for name in ["diagnosis", "mitigation"] {
        let passed = skill_condition(&skills, name, "EvalsPassed", "True EvalsPassed").await?;
        let summary = passed
            .status
            .as_ref()
            .and_then(|s| s.revisions.as_ref())
            .and_then(|r| r.replay.clone())
            .context("the suite's summary is in status")?;
        ensure!(
            summary.passed && summary.sessions >= 1 && summary.decisions > 0 && summary.divergences == 0,
            "{name}: {summary:?}"
        );
        let skill = skill_condition(&skills, name, "Promoted", "True").await?;
        promoted_first.push(promoted(&skill).context("promoted")?);
    }
    // The Agent runs both, at the promoted revisions (pinned by their specs' digests), with
    // their six tools.
    let first = composed_skills(&ns, |s| {
        s.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>() == ["diagnosis", "mitigation"]
    })
    .await?;
    let agent: Agent = ns.api::<Agent>().get("oncall-assistant").await?;
    ensure!(
        agent.status.as_ref().and_then(|s| s.tool_count) == Some(6),
        "the Agent counts its skills' tools: {:?}",
        agent.status.as_ref().map(|s| s.tool_count)
    );

    // A candidate whose suite fails: it claims the namespace deletion runs, which the policy
    // denies. Even with the annotation that bypasses a replay gate, it is not promoted.
    let mut failing = mitigation.clone();
    failing["spec"]["version"] = json!("1.1.0");
    failing["spec"]["evals"]["scenarios"][1]["expect"] = json!({"called": ["delete_namespace"]});
    apply(&client, ns.name(), &failing).await?;
    let failed = skill_condition(&skills, "mitigation", "EvalsPassed", "False EvalsFailed").await?;
    let message = condition(
        &failed.status.clone().unwrap_or_default().conditions,
        "EvalsPassed",
    );
    ensure!(
        message.contains("never-deletes-a-namespace: expected delete_namespace to run"),
        "EvalsPassed names the failed check: {message}"
    );
    let candidate = failed
        .status
        .as_ref()
        .and_then(|s| s.revisions.as_ref())
        .and_then(|r| r.candidate.clone())
        .context("a candidate")?;
    failing["metadata"]["annotations"] = json!({"contextos.dev/promote-without-replay": candidate});
    apply(&client, ns.name(), &failing).await?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let held = skills.get("mitigation").await?;
    ensure!(
        promoted(&held).as_deref() == Some(promoted_first[1].as_str()),
        "the failed candidate is not promoted, annotation or not: {:?}",
        held.status
    );
    ensure!(
        condition(&held.status.clone().unwrap_or_default().conditions, "Promoted")
            .starts_with("False EvalsFailed"),
        "Promoted says why"
    );
    // Agents keep the revision in force.
    composed_skills(&ns, |s| s == first.as_slice()).await?;

    // A passing candidate is promoted, and the Agent picks it up.
    let mut fixed = mitigation.clone();
    fixed["spec"]["version"] = json!("1.2.0");
    fixed["spec"]["description"] = json!("Acts on a diagnosed incident, under on-call approval.");
    apply(&client, ns.name(), &fixed).await?;
    let second = wait_for_object(
        &skills,
        "mitigation",
        "a new promoted revision",
        TIMEOUT,
        |s: &Skill| {
            let now = promoted(s);
            Check::when(
                now.is_some() && now.as_deref() != Some(promoted_first[1].as_str()),
                || condition(&s.status.clone().unwrap_or_default().conditions, "EvalsPassed"),
            )
        },
    )
    .await?;
    ensure!(promoted(&second).is_some(), "promoted");
    // The Agent's composition changed: it passes the Agent's own gate, which replays its
    // sessions (a suite is no replay of them). None is recorded here, so it waits for an
    // approver to promote it without replay.
    let agents: Api<Agent> = ns.api();
    let waiting = wait_for_object(
        &agents,
        "oncall-assistant",
        "a new candidate composition",
        TIMEOUT,
        |a: &Agent| {
            let revisions = a
                .status
                .as_ref()
                .and_then(|s| s.revisions.clone())
                .unwrap_or_default();
            Check::when(
                revisions.candidate.is_some() && revisions.candidate != revisions.promoted,
                || format!("{revisions:?}"),
            )
        },
    )
    .await?;
    composed_skills(&ns, |s| s == first.as_slice()).await?;
    let candidate = waiting
        .status
        .and_then(|s| s.revisions)
        .and_then(|r| r.candidate)
        .context("a candidate")?;
    let mut approved = agent_object.clone();
    approved["metadata"]["annotations"] = json!({"contextos.dev/promote-without-replay": candidate});
    apply(&client, ns.name(), &approved).await?;
    let picked = composed_skills(&ns, |s| s.get(1).is_some_and(|(_, digest)| *digest != first[1].1)).await?;
    ensure!(
        picked[0] == first[0],
        "the diagnosis skill is unchanged: {picked:?}"
    );

    // An Agent that declares a tool of a skill's name itself cannot run: both are named.
    let mut conflicted = agent_object.clone();
    conflicted["metadata"]["name"] = json!("conflicted");
    conflicted["spec"]["tools"] = json!([{
        "name": "restart_deployment", "risk": "destructive", "kind": "act",
        "adapter": {"http": {"url": format!("{}/deployments/restart", op.tools_url), "method": "POST"}},
    }]);
    apply(&client, ns.name(), &conflicted).await?;
    let refused = wait_for_object(
        &agents,
        "conflicted",
        "Ready False SkillConflict",
        TIMEOUT,
        |a: &Agent| {
            let text = condition(&a.status.clone().unwrap_or_default().conditions, "Ready");
            Check::when(text.starts_with("False SkillConflict"), || text.clone())
        },
    )
    .await?;
    let message = condition(&refused.status.unwrap_or_default().conditions, "Ready");
    ensure!(
        message.contains("spec.skillRefs[1]")
            && message.contains("Skill mitigation (version 1.2.0) declares tool restart_deployment")
            && message.contains("the Agent's spec.tools"),
        "{message}"
    );
    ns.pass();
    Ok(())
}
