//! A skill's evaluation suite: each scenario runs the real harness — context compiler, policy
//! engine, approvals, budgets, critic — with the scenario's scripted model and tool answers,
//! into a scratch record that nothing outlives; the checks read that record. Nothing leaves the
//! process: no tool is reached and no model is asked, so the gateway service can evaluate a
//! candidate and sign the verdict without acting for anyone.

use std::collections::BTreeMap;

use contextos_crds::{
    AgentSpec, ContextPackSpec, SessionSpec, common::ToolRisk, policy::PolicyEffect, skill::EvalScenario,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{SkillCandidate, SkillUse, pack_with_fragments};
use crate::{
    keys::KeyPair,
    model::{Model, scripted::ScriptedModel},
    records::{EntryBody, ScratchStore, read::read_run, store::TenantId},
    run::{
        bundle::{NamedPack, RunBundle},
        engine::{Harness, RunOutcome},
        validate,
    },
};

/// The tenant a scenario's scratch record is kept under (it never leaves the process).
const EVAL_TENANT: &str = "skill-eval";

/// The budget of a scenario that sets none.
fn default_budget() -> contextos_crds::common::RunBudget {
    contextos_crds::common::RunBudget {
        max_steps: 12,
        max_tokens: 60_000,
        max_tool_calls: 16,
        max_wall_seconds: 300,
        max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
    }
}

/// One scenario's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioResult {
    pub name: String,
    /// How the run ended (`completed`, `awaiting_approval`, `failed`, …).
    pub outcome: String,
    /// Checks made.
    pub checks: u32,
    /// One line per failed check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// A suite's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuiteReport {
    pub skill: String,
    pub version: String,
    pub scenarios: Vec<ScenarioResult>,
}

impl SuiteReport {
    pub fn passed(&self) -> bool {
        !self.scenarios.is_empty() && self.scenarios.iter().all(ScenarioResult::passed)
    }

    pub fn checks(&self) -> u32 {
        self.scenarios.iter().map(|s| s.checks).sum()
    }

    pub fn failed_checks(&self) -> u32 {
        let failed: usize = self.scenarios.iter().map(|s| s.failures.len()).sum();
        u32::try_from(failed).unwrap_or(u32::MAX)
    }

    /// Failed checks, `scenario: why`, in order.
    pub fn failures(&self) -> impl Iterator<Item = String> + '_ {
        self.scenarios
            .iter()
            .flat_map(|s| s.failures.iter().map(move |f| format!("{}: {f}", s.name)))
    }

    /// The verdict in the shape every promotion gate reports (`runs` scenarios, `steps`
    /// checks, `divergent_steps` failed checks), for the Skill's status.
    pub fn as_gate(&self) -> crate::run::replay::ReplayGate {
        let checks = self.checks();
        let failed = self.failed_checks();
        crate::run::replay::ReplayGate {
            runs: self.scenarios.len(),
            steps: checks,
            divergent_steps: failed,
            intended_steps: 0,
            divergence_percent: if checks == 0 {
                0.0
            } else {
                f64::from(failed) * 100.0 / f64::from(checks)
            },
            max_divergence_percent: 0.0,
            worst_run: None,
            passed: self.passed(),
            no_history: false,
            top: self.failures().take(5).collect(),
            report: None,
            reexecution: None,
            routing: None,
        }
    }
}

/// Runs every scenario of skill `name`'s candidate.
pub async fn evaluate(name: &str, candidate: &SkillCandidate) -> SuiteReport {
    let mut scenarios = Vec::with_capacity(candidate.skill.evals.scenarios.len());
    for scenario in &candidate.skill.evals.scenarios {
        scenarios.push(run_scenario(name, candidate, scenario).await);
    }
    SuiteReport {
        skill: name.to_owned(),
        version: candidate.skill.version.clone(),
        scenarios,
    }
}

/// A scenario that could not run at all fails with one line saying why.
fn could_not_run(scenario: &EvalScenario, why: String) -> ScenarioResult {
    ScenarioResult {
        name: scenario.name.clone(),
        outcome: "not_run".into(),
        checks: 1,
        failures: vec![why],
    }
}

async fn run_scenario(skill: &str, candidate: &SkillCandidate, scenario: &EvalScenario) -> ScenarioResult {
    let bundle = match scenario_bundle(skill, candidate, scenario) {
        Ok(bundle) => bundle,
        Err(why) => return could_not_run(scenario, why),
    };
    let script = bundle.model_script.clone().unwrap_or_default();
    let model = match ScriptedModel::parse(&format!("scenario {}", scenario.name), &script) {
        Ok(model) => Model::Scripted(model),
        Err(e) => return could_not_run(scenario, format!("script: {e}")),
    };
    let key = match KeyPair::generate() {
        Ok(key) => key,
        Err(e) => return could_not_run(scenario, format!("no signing key for the scratch record: {e}")),
    };
    let gateway = match bundle.gateway_bundle(BTreeMap::new()).build_offline(key.public()) {
        Ok(gateway) => gateway.answering_canned(scenario.tool_results.clone()),
        Err(e) => return could_not_run(scenario, e),
    };
    let scratch = ScratchStore::new();
    let harness = match Harness::new(&scratch, key, bundle, gateway, model) {
        Ok(harness) => harness,
        Err(e) => return could_not_run(scenario, e.to_string()),
    };
    let run_id = format!("eval-{}", scenario.name);
    let trace_id = crate::run_context::random_hex(16);
    let report = match harness.start(&run_id, &trace_id, &mut |_| {}).await {
        Ok(report) => report,
        Err(e) => return could_not_run(scenario, format!("the run could not start: {e}")),
    };
    let entries = match TenantId::new(EVAL_TENANT.to_owned()) {
        Ok(tenant) => read_run(&scratch, &tenant, &run_id)
            .await
            .map(|e| e.into_iter().map(|(_, e)| e.body).collect::<Vec<_>>()),
        Err(e) => return could_not_run(scenario, e.to_string()),
    };
    match entries {
        Ok(bodies) => check(scenario, &report.outcome, report.usage.tokens, &bodies),
        Err(e) => could_not_run(scenario, format!("its record cannot be read: {e}")),
    }
}

/// The run bundle of one scenario: an agent made of the skill's tools under the suite's
/// policies, its fragments in the context, the scenario's script as the model.
fn scenario_bundle(
    skill: &str,
    candidate: &SkillCandidate,
    scenario: &EvalScenario,
) -> Result<RunBundle, String> {
    let spec = &candidate.skill;
    let script = serde_json::to_string(&scenario.script).map_err(|e| format!("script: {e}"))?;
    let agent_spec: AgentSpec = serde_json::from_value(json!({
        "model": {"provider": "scripted", "model": format!("scenario-{}", scenario.name)},
        "contextPackRef": {"name": format!("skill-{skill}")},
        "policyRefs": candidate.policies.iter().map(|p| json!({"name": p.name})).collect::<Vec<_>>(),
        "sandboxProfileRef": {"name": "skill-eval"},
        "tools": spec.tools,
        "budget": scenario.budget.clone().unwrap_or_else(default_budget),
        "safetyMode": scenario.safety_mode,
    }))
    .map_err(|e| format!("the skill's tools do not make an agent: {e}"))?;
    let uses = [SkillUse {
        name: skill.to_owned(),
        version: spec.version.clone(),
        digest: candidate.digest(),
        tools: spec.tools.iter().map(|t| t.name.clone()).collect(),
        fragments: spec.prompt_fragments.clone(),
    }];
    let pack: ContextPackSpec = serde_json::from_value(json!({
        "instructions": format!("You are evaluated on the skill {skill} (version {}). Use its tools to answer the request.", spec.version),
        "tokenBudget": 32_000,
    }))
    .map_err(|e| format!("pack: {e}"))?;
    let session_spec: SessionSpec = serde_json::from_value(json!({
        "agentRef": {"name": format!("skill-{skill}")},
        "input": {"prompt": scenario.request, "data": scenario.data},
    }))
    .map_err(|e| format!("request: {e}"))?;
    Ok(RunBundle {
        tenant: EVAL_TENANT.to_owned(),
        session: format!("eval-{}", scenario.name),
        session_spec,
        agent: format!("skill-{skill}"),
        agent_spec,
        context_pack: NamedPack {
            name: format!("skill-{skill}"),
            spec: pack_with_fragments(&pack, &uses),
        },
        sources: BTreeMap::new(),
        policies: candidate.policies.clone(),
        sandbox_profile_digest: None,
        model_script: Some(script),
        session_labels: BTreeMap::new(),
        agent_labels: BTreeMap::new(),
        ontology: None,
        model_price: None,
        routed_scripts: BTreeMap::new(),
        routed_prices: BTreeMap::new(),
        tool_prices: BTreeMap::new(),
        skills: Vec::new(),
    })
}

/// What one call came to in the record.
#[derive(Debug, Default)]
struct CallFate {
    tool: String,
    risk: Option<ToolRisk>,
    denied: bool,
    asked_approval: bool,
    approved: bool,
    ran: bool,
}

/// The scenario's checks over its record (pure).
fn check(scenario: &EvalScenario, outcome: &RunOutcome, tokens: u64, bodies: &[EntryBody]) -> ScenarioResult {
    let expect = &scenario.expect;
    let mut calls: Vec<(String, CallFate)> = Vec::new();
    let fate = |calls: &mut Vec<(String, CallFate)>, id: &str| calls.iter().position(|(c, _)| c == id);
    for body in bodies {
        match body {
            EntryBody::ToolCallRequested(call) => calls.push((
                call.call_id.clone(),
                CallFate {
                    tool: call.tool.clone(),
                    risk: Some(call.risk),
                    ..CallFate::default()
                },
            )),
            EntryBody::PolicyDecision(decision) => {
                if let Some(i) = fate(&mut calls, &decision.call_id) {
                    match decision.enforced {
                        PolicyEffect::Deny => calls[i].1.denied = true,
                        PolicyEffect::RequireApproval => calls[i].1.asked_approval = true,
                        PolicyEffect::Allow => {}
                    }
                }
            }
            EntryBody::ApprovalRequested { call_id, .. } => {
                if let Some(i) = fate(&mut calls, call_id) {
                    calls[i].1.asked_approval = true;
                }
            }
            EntryBody::ApprovalGranted { call_id, .. } => {
                if let Some(i) = fate(&mut calls, call_id) {
                    calls[i].1.approved = true;
                }
            }
            EntryBody::ToolResult(result) if result.attempts > 0 => {
                if let Some(i) = fate(&mut calls, &result.call_id) {
                    calls[i].1.ran = !calls[i].1.denied;
                }
            }
            _ => {}
        }
    }
    let calls: Vec<CallFate> = calls.into_iter().map(|(_, f)| f).collect();
    let mut checks = 0u32;
    let mut failures = Vec::new();
    let mut expect_that = |holds: bool, why: String| {
        checks += 1;
        if !holds {
            failures.push(why);
        }
    };
    if let Some(wanted) = expect.outcome {
        expect_that(
            outcome.name() == wanted.as_str(),
            format!(
                "expected the run to end {}, it ended {}",
                wanted.as_str(),
                describe(outcome)
            ),
        );
    }
    let ran: Vec<&str> = calls.iter().filter(|c| c.ran).map(|c| c.tool.as_str()).collect();
    let mut rest = ran.iter();
    for tool in &expect.called {
        expect_that(
            rest.any(|t| t == tool),
            format!(
                "expected {tool} to run (in the order of expect.called); the calls that ran: [{}]",
                ran.join(", ")
            ),
        );
    }
    for tool in &expect.not_called {
        expect_that(
            !ran.contains(&tool.as_str()),
            format!("{tool} ran, and expect.notCalled lists it"),
        );
    }
    for tool in &expect.denied {
        expect_that(
            calls.iter().any(|c| c.denied && c.tool == *tool),
            format!("expected a policy to deny a call of {tool}; none was denied"),
        );
    }
    for tool in &expect.approval_requested {
        expect_that(
            calls.iter().any(|c| c.asked_approval && c.tool == *tool),
            format!("expected a call of {tool} to wait for a person's approval; none did"),
        );
    }
    if expect.no_approval_bypass {
        let bypassed: Vec<&str> = calls
            .iter()
            .filter(|c| c.ran && !c.approved && c.risk.is_some_and(|r| r >= ToolRisk::Delegated))
            .map(|c| c.tool.as_str())
            .collect();
        expect_that(
            bypassed.is_empty(),
            format!(
                "{} ran without a person's approval ({} risk): the policies let the skill act unsupervised",
                bypassed.join(", "),
                "delegated or destructive"
            ),
        );
    }
    if let Some(max) = expect.max_tool_calls {
        let made = u32::try_from(calls.len()).unwrap_or(u32::MAX);
        expect_that(
            made <= max,
            format!("{made} tool calls, more than expect.maxToolCalls {max}"),
        );
    }
    if let Some(max) = expect.max_tokens {
        expect_that(
            tokens <= max,
            format!("{tokens} model tokens, more than expect.maxTokens {max}"),
        );
    }
    if !expect.output.is_empty() {
        match (validate::compile("skill-eval", &expect.output), outcome) {
            (Err(e), _) => expect_that(false, format!("expect.output: {e}")),
            (Ok(validators), RunOutcome::Completed { output, .. }) => {
                let validation = validate::check(&validators, output);
                for _ in &validation.passed {
                    expect_that(true, String::new());
                }
                for failure in validation.failures {
                    expect_that(false, format!("the output fails {failure}"));
                }
            }
            (Ok(_), other) => expect_that(
                false,
                format!(
                    "expect.output checks the final answer, and the run ended {}",
                    describe(other)
                ),
            ),
        }
    }
    ScenarioResult {
        name: scenario.name.clone(),
        outcome: outcome.name().to_owned(),
        checks,
        failures,
    }
}

fn describe(outcome: &RunOutcome) -> String {
    match outcome {
        RunOutcome::Failed { reason, message } => format!("failed ({reason}: {message})"),
        RunOutcome::AwaitingApproval(waiting) => format!("awaiting approval of {}", waiting.tool),
        other => other.name().to_owned(),
    }
}

/// What is wrong with a suite before it runs: a scenario that checks nothing (it would pass
/// whatever the skill did), names a tool the skill does not have, or whose script or output
/// checks do not compile.
pub fn suite_problem(candidate: &SkillCandidate) -> Option<String> {
    let tools: Vec<&str> = candidate.skill.tools.iter().map(|t| t.name.as_str()).collect();
    for (i, scenario) in candidate.skill.evals.scenarios.iter().enumerate() {
        let field = format!("spec.evals.scenarios[{i}]");
        let e = &scenario.expect;
        let checks_something = e.outcome.is_some()
            || !e.called.is_empty()
            || !e.not_called.is_empty()
            || !e.denied.is_empty()
            || !e.approval_requested.is_empty()
            || !e.output.is_empty()
            || e.max_tool_calls.is_some()
            || e.max_tokens.is_some();
        if !checks_something {
            return Some(format!(
                "{field}.expect: the scenario checks nothing; give an outcome, tools called or denied, or output checks"
            ));
        }
        let named = e
            .called
            .iter()
            .chain(&e.not_called)
            .chain(&e.denied)
            .chain(&e.approval_requested)
            .chain(scenario.tool_results.iter().map(|r| &r.tool));
        for tool in named {
            if !tools.contains(&tool.as_str()) {
                return Some(format!(
                    "{field}: names tool {tool}, which is not one of the skill's tools ({})",
                    tools.join(", ")
                ));
            }
        }
        if let Err(e) = ScriptedModel::parse(&scenario.name, &scenario.script.to_string()) {
            return Some(format!("{field}.script: {e}"));
        }
        if let Err(e) = validate::compile("skill-eval", &e.output) {
            return Some(format!("{field}.expect.output: {e}"));
        }
    }
    None
}
