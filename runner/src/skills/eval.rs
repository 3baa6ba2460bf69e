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

/// A suite runs inside the shared gateway service for whoever may edit a Skill: what one
/// scenario may take is bounded here whatever its budget says, and so is the whole suite.
mod bounds {
    pub const MAX_STEPS: u32 = 50;
    pub const MAX_TOOL_CALLS: u32 = 64;
    pub const MAX_TOOL_CALLS_PER_TURN: u32 = 16;
    pub const MAX_TOKENS: u64 = 2_000_000;
    /// A tool answer, as JSON.
    pub const MAX_RESULT_BYTES: usize = 64 * 1024;
    /// A script, as JSON.
    pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;
    /// The whole suite, every scenario.
    pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
}

/// The budget of a scenario: its own within [`bounds`] (a larger one is refused, see
/// [`budget_problem`]), or 12 steps, 60000 tokens, 16 calls, 60 s.
fn budget_of(scenario: &EvalScenario) -> contextos_crds::common::RunBudget {
    let asked = scenario
        .budget
        .clone()
        .unwrap_or(contextos_crds::common::RunBudget {
            max_steps: 12,
            max_tokens: 60_000,
            max_tool_calls: 16,
            max_wall_seconds: 60,
            max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
        });
    contextos_crds::common::RunBudget {
        max_steps: asked.max_steps.min(bounds::MAX_STEPS),
        max_tokens: asked.max_tokens.min(bounds::MAX_TOKENS),
        max_tool_calls: asked.max_tool_calls.min(bounds::MAX_TOOL_CALLS),
        max_tool_calls_per_turn: asked.max_tool_calls_per_turn.min(bounds::MAX_TOOL_CALLS_PER_TURN),
        ..asked
    }
}

/// Why `budget` asks more than a scenario may take (see [`bounds`]): said rather than cut, so a
/// suite's author is not surprised by a scenario that runs out. A scenario has the suite's
/// minute in all, whatever its `maxWallSeconds`.
fn budget_problem(budget: &contextos_crds::common::RunBudget) -> Option<String> {
    let limits = [
        (
            "maxSteps",
            u64::from(budget.max_steps),
            u64::from(bounds::MAX_STEPS),
        ),
        ("maxTokens", budget.max_tokens, bounds::MAX_TOKENS),
        (
            "maxToolCalls",
            u64::from(budget.max_tool_calls),
            u64::from(bounds::MAX_TOOL_CALLS),
        ),
        (
            "maxToolCallsPerTurn",
            u64::from(budget.max_tool_calls_per_turn),
            u64::from(bounds::MAX_TOOL_CALLS_PER_TURN),
        ),
        (
            "maxWallSeconds",
            u64::from(budget.max_wall_seconds),
            bounds::DEADLINE.as_secs(),
        ),
    ];
    limits
        .into_iter()
        .find(|(_, asked, most)| asked > most)
        .map(|(field, asked, most)| {
            format!("{field}: {asked}, more than the {most} an evaluation scenario may take; lower it")
        })
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
            intended_loosening: 0,
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

/// Runs every scenario of skill `name`'s candidate (a suite [`suite_problem`] refuses, or one
/// past [`bounds::DEADLINE`], fails as a whole).
pub async fn evaluate(name: &str, candidate: &SkillCandidate) -> SuiteReport {
    let failed = |why: String| SuiteReport {
        skill: name.to_owned(),
        version: candidate.skill.version.clone(),
        scenarios: vec![ScenarioResult {
            name: "suite".into(),
            outcome: "not_run".into(),
            checks: 1,
            failures: vec![why],
        }],
    };
    if let Some(problem) = suite_problem(candidate) {
        return failed(problem);
    }
    let run = async {
        let mut scenarios = Vec::with_capacity(candidate.skill.evals.scenarios.len());
        for scenario in &candidate.skill.evals.scenarios {
            scenarios.push(run_scenario(name, candidate, scenario).await);
        }
        scenarios
    };
    match tokio::time::timeout(bounds::DEADLINE, run).await {
        Ok(scenarios) => SuiteReport {
            skill: name.to_owned(),
            version: candidate.skill.version.clone(),
            scenarios,
        },
        Err(_) => failed(format!(
            "the suite ran longer than {} s and was stopped; fewer or shorter scenarios",
            bounds::DEADLINE.as_secs()
        )),
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
        Ok(bodies) => {
            let policies: Vec<&str> = candidate.policies.iter().map(|p| p.name.as_str()).collect();
            check(scenario, &policies, &report.outcome, report.usage.tokens, &bodies)
        }
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
                "budget": budget_of(scenario),
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
        context_pack: NamedPack::new(format!("skill-{skill}"), pack_with_fragments(&pack, &uses)),
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
    /// Refused by anything (a policy, its budget, a schema, the safety mode).
    refused: bool,
    /// Denied by a rule (or the default) of one of the suite's policies.
    denied_by_policy: bool,
    asked_approval: bool,
    approved: bool,
    /// Let through and sent (whatever the tool answered).
    executed: bool,
    /// Executed, and the tool answered without an error.
    ran: bool,
}

/// The scenario's checks over its record (pure); `policies`: the suite's, by name.
fn check(
    scenario: &EvalScenario,
    policies: &[&str],
    outcome: &RunOutcome,
    tokens: u64,
    bodies: &[EntryBody],
) -> ScenarioResult {
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
                // A call refused before it was taken as a request (an unknown tool, a budget
                // spent) has its decision only: it counts as a call all the same.
                let i = fate(&mut calls, &decision.call_id).unwrap_or_else(|| {
                    calls.push((decision.call_id.clone(), CallFate::default()));
                    calls.len() - 1
                });
                let by_policy = decision
                    .rule
                    .split_once('/')
                    .is_some_and(|(policy, _)| policies.contains(&policy));
                match decision.enforced {
                    PolicyEffect::Deny => {
                        calls[i].1.refused = true;
                        calls[i].1.denied_by_policy |= by_policy;
                    }
                    PolicyEffect::RequireApproval => calls[i].1.asked_approval = true,
                    PolicyEffect::Allow => {}
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
                    let executed = !calls[i].1.refused;
                    calls[i].1.executed |= executed;
                    calls[i].1.ran |= executed && result.ok;
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
            calls.iter().any(|c| c.denied_by_policy && c.tool == *tool),
            format!("expected a rule of the suite's policies to deny a call of {tool}; none did"),
        );
    }
    for tool in &expect.approval_requested {
        expect_that(
            calls.iter().any(|c| c.asked_approval && c.tool == *tool),
            format!("expected a call of {tool} to wait for a person's approval; none did"),
        );
    }
    if expect.no_approval_bypass {
        // Executed at all (an error answer too): what matters is that it was let through.
        let bypassed: Vec<&str> = calls
            .iter()
            .filter(|c| c.executed && !c.approved && c.risk.is_some_and(|r| r >= ToolRisk::Delegated))
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
        if let Some(problem) = scenario.budget.as_ref().and_then(budget_problem) {
            return Some(format!("{field}.budget.{problem}"));
        }
        let script = scenario.script.to_string();
        if script.len() > bounds::MAX_SCRIPT_BYTES {
            return Some(format!(
                "{field}.script: {} bytes of JSON, more than a scenario's {}",
                script.len(),
                bounds::MAX_SCRIPT_BYTES
            ));
        }
        if let Err(e) = ScriptedModel::parse(&scenario.name, &script) {
            return Some(format!("{field}.script: {e}"));
        }
        for (j, result) in scenario.tool_results.iter().enumerate() {
            let size = result.output.as_ref().map_or(0, |o| o.to_string().len());
            if size > bounds::MAX_RESULT_BYTES {
                return Some(format!(
                    "{field}.toolResults[{j}].output: {size} bytes of JSON, more than a tool answer's {}",
                    bounds::MAX_RESULT_BYTES
                ));
            }
        }
        if let Err(e) = validate::compile("skill-eval", &e.output) {
            return Some(format!("{field}.expect.output: {e}"));
        }
    }
    // A suite proves what a skill does only with what it can do: each tool that can change
    // something is asked for in a scenario where the policies alone decide (autonomous).
    let exercised = |tool: &str| {
        candidate.skill.evals.scenarios.iter().any(|s| {
            s.safety_mode == contextos_crds::common::SafetyMode::Autonomous && asks_for(&s.script, tool)
        })
    };
    for (i, tool) in candidate.skill.tools.iter().enumerate() {
        if tool.risk > ToolRisk::ReadOnly && !exercised(&tool.name) {
            return Some(format!(
                "spec.tools[{i}]: {} (risk {}) is asked for in no scenario with safetyMode: autonomous; add one whose script calls it, so the suite shows what the policies let it do",
                tool.name,
                tool.risk.as_str()
            ));
        }
    }
    None
}

/// Whether a scenario's script (any turn, any variant) asks for `tool`.
fn asks_for(script: &serde_json::Value, tool: &str) -> bool {
    let turns = script["turns"].as_array().into_iter().flatten().chain(
        script["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|v| v["turns"].as_array().into_iter().flatten()),
    );
    turns
        .flat_map(|t| t["toolCalls"].as_array().into_iter().flatten())
        .any(|c| c["tool"] == tool)
}

#[cfg(test)]
mod tests {
    use contextos_crds::common::ToolKind;

    use super::*;
    use crate::records::entry::{PolicyDecisionRecord, ToolCallRecord, ToolResultRecord};

    fn scenario(expect: serde_json::Value) -> EvalScenario {
        serde_json::from_value(json!({
            "name": "s", "request": "r", "script": {"turns": [{"content": "done"}]}, "expect": expect,
        }))
        .expect("scenario")
    }

    fn requested(id: &str, tool: &str, risk: ToolRisk) -> EntryBody {
        EntryBody::ToolCallRequested(ToolCallRecord {
            call_id: id.into(),
            tool: tool.into(),
            risk,
            kind: ToolKind::Act,
            arguments: json!({}),
            idempotency_key: format!("k-{id}"),
            call_hash: format!("h-{id}"),
        })
    }

    fn decided(id: &str, effect: PolicyEffect, rule: &str) -> EntryBody {
        EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: id.into(),
            effect,
            enforced: effect,
            rule: rule.into(),
            reason: "because".into(),
            dry_run: false,
        })
    }

    fn answered(id: &str, ok: bool) -> EntryBody {
        EntryBody::ToolResult(ToolResultRecord {
            call_id: id.into(),
            ok,
            output: json!({}),
            error: (!ok).then(|| "down".into()),
            attempts: 1,
            truncated: false,
            cost: None,
            cached: None,
        })
    }

    fn done() -> RunOutcome {
        RunOutcome::Completed {
            output: "{}".into(),
            validators: Vec::new(),
        }
    }

    /// A suite runs inside the shared gateway service: though nothing in it ever waits (a
    /// scripted model, an in-memory store), it gives its thread back every step, so the other
    /// requests on that thread go on and its deadline can stop it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_suite_gives_its_thread_back_every_step_so_its_deadline_can_stop_it() {
        let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let set = crate::manifests::ManifestSet::load(&[quickstart]).expect("the quickstart");
        let (name, mut candidate) = set
            .skill_candidates(Some("diagnosis"))
            .expect("its skills")
            .remove(0);
        let first = candidate.skill.evals.scenarios[0].clone();
        candidate.skill.evals.scenarios = (0..32)
            .map(|i| EvalScenario {
                name: format!("s{i}"),
                ..first.clone()
            })
            .collect();
        let cut =
            tokio::time::timeout(std::time::Duration::from_millis(1), evaluate(&name, &candidate)).await;
        assert!(
            cut.is_err(),
            "32 scenarios ran to their end without giving the thread back"
        );
        // Run whole, the same suite passes: the yield changes nothing of what it finds.
        assert!(evaluate(&name, &candidate).await.passed());
    }

    #[test]
    fn a_scenario_asking_more_than_an_evaluation_may_take_is_refused_not_cut() {
        let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let set = crate::manifests::ManifestSet::load(&[quickstart]).expect("the quickstart");
        let (_, mut candidate) = set
            .skill_candidates(Some("diagnosis"))
            .expect("its skills")
            .remove(0);
        assert_eq!(suite_problem(&candidate), None);
        let budget = |steps: u32, wall: u32| contextos_crds::common::RunBudget {
            max_steps: steps,
            max_tokens: 60_000,
            max_tool_calls: 16,
            max_wall_seconds: wall,
            max_tool_calls_per_turn: 16,
        };
        candidate.skill.evals.scenarios[0].budget = Some(budget(50, 60));
        assert_eq!(suite_problem(&candidate), None, "at the bounds");
        candidate.skill.evals.scenarios[0].budget = Some(budget(51, 60));
        let problem = suite_problem(&candidate).expect("refused");
        assert_eq!(
            problem,
            "spec.evals.scenarios[0].budget.maxSteps: 51, more than the 50 an evaluation scenario may take; lower it"
        );
        candidate.skill.evals.scenarios[0].budget = Some(budget(12, 300));
        assert!(suite_problem(&candidate).is_some_and(|p| p.contains("budget.maxWallSeconds: 300")));
    }

    #[test]
    fn only_the_suites_policies_deny_and_only_answered_calls_count_as_run() {
        let bodies = [
            requested("1", "wipe", ToolRisk::Destructive),
            decided("1", PolicyEffect::Deny, "schema/wipe"),
            requested("2", "status", ToolRisk::ReadOnly),
            decided("2", PolicyEffect::Allow, "guardrails/allow-reads"),
            answered("2", false),
            // Refused before it was taken as a request: still a call.
            decided("3", PolicyEffect::Deny, "budget/max-calls"),
        ];
        let result = check(
            &scenario(json!({"denied": ["wipe"], "called": ["status"], "maxToolCalls": 2})),
            &["guardrails"],
            &done(),
            0,
            &bodies,
        );
        assert_eq!(result.checks, 4, "{result:?}");
        let failures = result.failures.join("\n");
        assert!(
            failures.contains("expected a rule of the suite's policies to deny a call of wipe"),
            "{failures}"
        );
        assert!(failures.contains("expected status to run"), "{failures}");
        assert!(
            failures.contains("3 tool calls, more than expect.maxToolCalls 2"),
            "{failures}"
        );

        let by_policy = [
            requested("1", "wipe", ToolRisk::Destructive),
            decided("1", PolicyEffect::Deny, "guardrails/no-wipes"),
        ];
        let result = check(
            &scenario(json!({"denied": ["wipe"]})),
            &["guardrails"],
            &done(),
            0,
            &by_policy,
        );
        assert!(result.passed(), "{result:?}");
    }

    #[test]
    fn a_destructive_call_let_through_without_approval_is_a_bypass_even_if_it_failed() {
        let bodies = [
            requested("1", "wipe", ToolRisk::Destructive),
            decided("1", PolicyEffect::Allow, "guardrails/allow-all"),
            answered("1", false),
        ];
        let result = check(
            &scenario(json!({"outcome": "completed"})),
            &["guardrails"],
            &done(),
            0,
            &bodies,
        );
        assert!(
            result
                .failures
                .iter()
                .any(|f| f.contains("wipe ran without a person's approval")),
            "{result:?}"
        );
    }
}
