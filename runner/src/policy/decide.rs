//! Deterministic decisions: given the compiled policies of an agent and the facts of one call,
//! which effect applies, which rule decided it, and why. Pure: no IO, no clock.

use contextos_crds::{
    common::{Approvers, SafetyMode, ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode},
};
use serde::Serialize;
use serde_json::Value;

use super::compile::CompiledPolicy;

/// The call being decided.
#[derive(Clone, Copy, Debug)]
pub struct CallFacts<'a> {
    pub tool: &'a str,
    pub risk: ToolRisk,
    pub kind: ToolKind,
    pub args: &'a Value,
    /// The entities the call touches (see [`crate::ontology::Ontology::of_call`]).
    pub entities: &'a crate::ontology::CallEntities,
}

/// What the run has done so far and who it acts for (CEL: `run`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunFacts {
    pub tenant: String,
    pub agent: String,
    pub user: String,
    pub groups: Vec<String>,
    /// The scopes the Session's user was granted for this run (`spec.user.scopes`, each one
    /// the Session's creator may `use`, admission checks).
    pub scopes: Vec<String>,
    pub safety_mode: String,
    /// Calls decided before this one.
    pub tool_calls: u32,
    /// Calls of this tool decided before this one.
    pub calls_of_tool: u32,
    /// Destructive calls allowed before this one.
    pub destructive_calls: u32,
    pub steps: u32,
    pub tokens: u64,
    pub input: Value,
}

/// Functional State signals, 0.0 (no pressure) to 1.0 (CEL: `state`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StateFacts {
    pub budget: f64,
    #[serde(rename = "loop")]
    pub loop_: f64,
    pub evidence: f64,
    pub gate: f64,
    pub conflict: f64,
}

/// The outcome for one call.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The effect applied.
    pub effect: PolicyEffect,
    /// `policy/rule`, `policy/default`, `policy/budget.<limit>`, or `safety/<mode>`.
    pub rule: String,
    pub reason: String,
    /// Who may approve, when `effect` is require_approval.
    pub approvers: Approvers,
    /// Decisions of dryRun policies: recorded, never applied.
    pub dry_run: Vec<ShadowDecision>,
}

/// What a dryRun policy would have decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowDecision {
    pub effect: PolicyEffect,
    pub rule: String,
    pub reason: String,
}

/// An agent's policies in `policyRefs` order.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<CompiledPolicy>,
}

/// How strict an effect is: of several policies' verdicts the strictest applies.
pub fn strictness(effect: PolicyEffect) -> u8 {
    match effect {
        PolicyEffect::Allow => 0,
        PolicyEffect::RequireApproval => 1,
        PolicyEffect::Deny => 2,
    }
}

/// Variables for CEL conditions, built once per decision and only when a condition runs.
struct CelScope {
    context: cel::Context<'static>,
    /// Size of the variables as JSON, measured only when a condition loops over them.
    input_bytes: usize,
}

impl CelScope {
    /// Converts only the variables some condition reads (`variables`: bits of `call`, `run`,
    /// `state`); the conversion is most of a decision's cost.
    /// `measure`: some condition loops, so the input's size is needed for its cost bound.
    fn new(call: &CallFacts<'_>, run: &RunFacts, state: &StateFacts, variables: u8, measure: bool) -> Self {
        let mut context = cel::Context::default();
        let mut input_bytes = 0usize;
        let mut add = |context: &mut cel::Context<'static>, name: &str, value: Value| {
            if measure {
                let size = serde_json::to_vec(&value).map_or(usize::MAX, |b| b.len());
                input_bytes = input_bytes.saturating_add(size);
            }
            add(context, name, value);
        };
        if variables & 0b001 != 0 {
            let call_value = serde_json::json!({
                "tool": call.tool,
                "risk": call.risk.as_str(),
                "kind": call.kind.as_str(),
                "args": call.args,
                "entities": call.entities.entities,
                "entityTypes": call.entities.types,
            });
            add(&mut context, "call", call_value);
        }
        if variables & 0b010 != 0 {
            add(
                &mut context,
                "run",
                serde_json::to_value(run).unwrap_or(Value::Null),
            );
        }
        if variables & 0b100 != 0 {
            add(
                &mut context,
                "state",
                serde_json::to_value(state).unwrap_or(Value::Null),
            );
        }
        Self { context, input_bytes }
    }
}

fn add(context: &mut cel::Context<'static>, name: &str, value: Value) {
    // JSON always converts to a CEL value.
    if let Ok(v) = cel::to_value(value) {
        context.add_variable_from_value(name.to_owned(), v);
    }
}

/// One policy's own verdict.
struct Verdict {
    effect: PolicyEffect,
    rule: String,
    reason: String,
    approvers: Option<Approvers>,
}

impl PolicySet {
    /// Whether some condition reads the call (`call.…`): only then are the entities it touches
    /// worth finding.
    pub fn reads_call(&self) -> bool {
        self.policies.iter().any(|p| p.condition_variables & 0b001 != 0)
    }

    /// Whether every call of this tool is denied whatever its arguments and whatever the run
    /// has done: by the run's safety mode, or by an enforcing policy whose rules, read in
    /// order, reach a deny that no condition can turn (a conditional rule that allows or asks
    /// may match first, so it stops the reading: the tool may then be allowed). Such a tool
    /// is never offered to the model (see `crate::discovery`); its calls are denied anyway.
    pub fn denies_outright(&self, tool: &str, risk: ToolRisk, kind: ToolKind, safety: SafetyMode) -> bool {
        if safety == SafetyMode::ReadOnly && risk > ToolRisk::ReadOnly {
            return true;
        }
        let denies = |policy: &CompiledPolicy| {
            // A budget of zero denies every call it counts, before any rule is read.
            if let Some(budget) = &policy.budget
                && (budget.max_calls == Some(0)
                    || budget.max_calls_per_tool == Some(0)
                    || (risk == ToolRisk::Destructive && budget.max_destructive_calls == Some(0)))
            {
                return true;
            }
            for rule in policy.rules.iter().filter(|r| r.matches(tool, risk, kind)) {
                if rule.effect != PolicyEffect::Deny {
                    return false;
                }
                if rule.condition.is_none() {
                    return true;
                }
                // A conditional deny either denies or lets the next rule decide.
            }
            policy.default_effect == PolicyEffect::Deny
        };
        self.policies
            .iter()
            .filter(|p| p.mode == PolicyMode::Enforce)
            .any(denies)
    }

    /// Whether some call of this tool may be allowed by every enforcing policy (safety mode
    /// aside): in each, read in order, a rule that matches it and allows comes before any rule
    /// that matches it unconditionally and does not, or none does and the default allows.
    pub fn may_allow(&self, tool: &str, risk: ToolRisk, kind: ToolKind) -> bool {
        let allows = |policy: &CompiledPolicy| {
            for rule in policy.rules.iter().filter(|r| r.matches(tool, risk, kind)) {
                if rule.effect == PolicyEffect::Allow {
                    return true;
                }
                if rule.condition.is_none() {
                    return false;
                }
            }
            policy.default_effect == PolicyEffect::Allow
        };
        self.policies
            .iter()
            .filter(|p| p.mode == PolicyMode::Enforce)
            .all(allows)
    }

    /// Decides one call. `fallback_approvers` are the Agent's, used when a rule names none.
    pub fn decide(
        &self,
        call: &CallFacts<'_>,
        run: &RunFacts,
        state: &StateFacts,
        safety: SafetyMode,
        fallback_approvers: &Approvers,
    ) -> Decision {
        let mut scope: Option<CelScope> = None;
        let variables = self.policies.iter().fold(0, |acc, p| acc | p.condition_variables);
        // One scope serves every policy's conditions: it is measured if any of them loops, not
        // only the first policy to build it (the next one's loop would be checked against 0).
        let measure = self.policies.iter().any(|p| p.condition_loops);
        let mut enforced: Option<Verdict> = None;
        let mut dry_run = Vec::new();
        for policy in &self.policies {
            let verdict = budget_verdict(policy, call, run)
                .unwrap_or_else(|| rule_verdict(policy, call, run, state, (variables, measure), &mut scope));
            match policy.mode {
                PolicyMode::DryRun => dry_run.push(ShadowDecision {
                    effect: verdict.effect,
                    rule: verdict.rule,
                    reason: verdict.reason,
                }),
                PolicyMode::Enforce => {
                    if enforced
                        .as_ref()
                        .is_none_or(|e| strictness(verdict.effect) > strictness(e.effect))
                    {
                        enforced = Some(verdict);
                    }
                }
            }
        }
        let verdict = enforced.unwrap_or_else(|| Verdict {
            effect: PolicyEffect::Allow,
            rule: "dry-run/no-enforcing-policy".into(),
            reason: "every policy of this agent is in dryRun mode; decisions are recorded, not enforced"
                .into(),
            approvers: None,
        });
        let verdict = apply_safety_mode(verdict, call.risk, safety);
        Decision {
            effect: verdict.effect,
            rule: verdict.rule,
            reason: verdict.reason,
            approvers: verdict.approvers.unwrap_or_else(|| fallback_approvers.clone()),
            dry_run,
        }
    }
}

/// The limits of a Policy's `budget` a call can run into, as its refusal's rule names them
/// (`<policy>/budget.<limit>`).
pub(crate) const BUDGET_LIMITS: [&str; 3] = ["maxCalls", "maxCallsPerTool", "maxDestructiveCalls"];

/// Whether `rule` is a Policy's budget refusing a call (not a rule a tenant named alike).
pub fn is_budget_refusal(effect: PolicyEffect, rule: &str) -> bool {
    effect == PolicyEffect::Deny
        && rule
            .split_once('/')
            .and_then(|(_, limit)| limit.strip_prefix("budget."))
            .is_some_and(|limit| BUDGET_LIMITS.contains(&limit))
}

fn budget_verdict(policy: &CompiledPolicy, call: &CallFacts<'_>, run: &RunFacts) -> Option<Verdict> {
    let budget = policy.budget.as_ref()?;
    let exceeded = |limit: &str, max: u32, used: u32| Verdict {
        effect: PolicyEffect::Deny,
        rule: format!("{}/budget.{limit}", policy.name),
        reason: format!("{limit} is {max} per run and {used} were already used"),
        approvers: None,
    };
    if let Some(max) = budget.max_calls.filter(|max| run.tool_calls >= *max) {
        return Some(exceeded("maxCalls", max, run.tool_calls));
    }
    if let Some(max) = budget.max_calls_per_tool.filter(|max| run.calls_of_tool >= *max) {
        return Some(exceeded("maxCallsPerTool", max, run.calls_of_tool));
    }
    if call.risk == ToolRisk::Destructive
        && let Some(max) = budget
            .max_destructive_calls
            .filter(|max| run.destructive_calls >= *max)
    {
        return Some(exceeded("maxDestructiveCalls", max, run.destructive_calls));
    }
    None
}

fn rule_verdict(
    policy: &CompiledPolicy,
    call: &CallFacts<'_>,
    run: &RunFacts,
    state: &StateFacts,
    (variables, measure): (u8, bool),
    scope: &mut Option<CelScope>,
) -> Verdict {
    for rule in &policy.rules {
        if !rule.matches(call.tool, call.risk, call.kind) {
            continue;
        }
        if let Some(condition) = &rule.condition {
            let scope = scope.get_or_insert_with(|| CelScope::new(call, run, state, variables, measure));
            if condition.cost.loop_nodes > 0
                && let Err(e) = condition.cost.check(scope.input_bytes)
            {
                return condition_failure(policy, &rule.name, e);
            }
            match condition.program.execute(&scope.context) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => continue,
                // Fail closed: a condition that cannot be evaluated denies, and says why.
                Ok(other) => {
                    return condition_failure(policy, &rule.name, format!("returned {other:?}, not a bool"));
                }
                Err(e) => return condition_failure(policy, &rule.name, e.to_string()),
            }
        }
        return Verdict {
            effect: rule.effect,
            rule: format!("{}/{}", policy.name, rule.name),
            reason: rule.reason.clone(),
            approvers: rule.approvers.clone(),
        };
    }
    Verdict {
        effect: policy.default_effect,
        rule: format!("{}/default", policy.name),
        reason: format!(
            "no rule of policy {} matched; its defaultEffect applies",
            policy.name
        ),
        approvers: None,
    }
}

fn condition_failure(policy: &CompiledPolicy, rule: &str, problem: String) -> Verdict {
    Verdict {
        effect: PolicyEffect::Deny,
        rule: format!("{}/{rule}", policy.name),
        reason: format!(
            "the condition of rule {rule} could not be evaluated ({problem}); denied to fail closed"
        ),
        approvers: None,
    }
}

fn apply_safety_mode(verdict: Verdict, risk: ToolRisk, safety: SafetyMode) -> Verdict {
    match safety {
        SafetyMode::ReadOnly if risk > ToolRisk::ReadOnly && verdict.effect != PolicyEffect::Deny => {
            Verdict {
                effect: PolicyEffect::Deny,
                rule: "safety/read_only".into(),
                reason: format!(
                    "the run's safety mode is read_only and this tool's risk is {}; {} would otherwise have applied ({})",
                    risk.as_str(),
                    verdict.effect.as_str(),
                    verdict.rule
                ),
                approvers: None,
            }
        }
        SafetyMode::Supervised if risk > ToolRisk::LocalWrite && verdict.effect == PolicyEffect::Allow => {
            Verdict {
                effect: PolicyEffect::RequireApproval,
                rule: "safety/supervised".into(),
                reason: format!(
                    "the run is supervised and this tool's risk is {}; {} allowed it, a human must confirm",
                    risk.as_str(),
                    verdict.rule
                ),
                approvers: verdict.approvers,
            }
        }
        _ => verdict,
    }
}

/// Why runs of an Agent with `spec` and `policies` under `safety` would wait for good: a tool
/// whose calls the policies may allow, which supervised mode then holds for a person's approval
/// (risk above local_write), while the Agent names nobody who may give one — its
/// `spec.approvers`, which such a hold falls back to, is empty. (Calls every policy denies, or
/// holds under a rule naming approvers of its own, wait for nobody.)
pub fn unapprovable(
    spec: &contextos_crds::AgentSpec,
    safety: SafetyMode,
    policies: &[crate::gateway::bundle::NamedPolicy],
) -> Option<String> {
    let nobody = spec
        .approvers
        .as_ref()
        .is_none_or(|a| a.users.is_empty() && a.groups.is_empty());
    if safety != SafetyMode::Supervised || !nobody {
        return None;
    }
    let set = PolicySet {
        // A Policy that does not compile is not Ready, and its Agent waits on it anyway.
        policies: policies
            .iter()
            .filter_map(|p| super::compile_policy(&p.name, &p.spec).ok())
            .collect(),
    };
    let (i, tool) = spec.tools.iter().enumerate().find(|(_, t)| {
        t.risk > ToolRisk::LocalWrite
            && !set.denies_outright(&t.name, t.risk, t.kind, safety)
            && set.may_allow(&t.name, t.risk, t.kind)
    })?;
    Some(format!(
        "spec.approvers: under safetyMode supervised (the default) every call of spec.tools[{i}] \
         ({}, risk {}) that its policies allow waits for a person's approval, and the Agent names \
         nobody who may give it; list spec.approvers (users or groups), set safetyMode: \
         autonomous (its policies still decide every call), or lower the tool's risk",
        tool.name,
        tool.risk.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use contextos_crds::{Agent, Policy};
    use serde_json::json;

    use super::*;
    use crate::policy::compile_policy;

    #[test]
    fn a_tool_is_denied_outright_only_when_no_call_of_it_could_pass() {
        let spec: contextos_crds::PolicySpec = serde_yaml::from_str(
            "
defaultEffect: deny
rules:
  - {name: no-deletes, match: {tools: ['delete-*']}, effect: deny, reason: never}
  - {name: big-scale, match: {tools: ['scale-*']}, effect: deny, reason: too many, condition: 'call.args.replicas > 10'}
  - {name: scale, match: {tools: ['scale-*']}, effect: allow, reason: fine}
  - {name: restart, match: {tools: ['restart-*']}, effect: require_approval, reason: ask, condition: 'run.steps > 1'}
",
        )
        .expect("spec");
        let set = PolicySet {
            policies: vec![compile_policy("guard", &spec).expect("compiles")],
        };
        let denied = |tool: &str, risk: ToolRisk, safety: SafetyMode| {
            set.denies_outright(tool, risk, ToolKind::Act, safety)
        };
        let autonomous = SafetyMode::Autonomous;
        assert!(denied("delete-namespace", ToolRisk::Destructive, autonomous));
        assert!(
            !denied("scale-deployment", ToolRisk::LocalWrite, autonomous),
            "the deny is conditional"
        );
        assert!(
            !denied("restart-deployment", ToolRisk::LocalWrite, autonomous),
            "a conditional rule that asks may match first"
        );
        assert!(
            denied("get-logs", ToolRisk::ReadOnly, autonomous),
            "no rule matches: the default denies"
        );
        assert!(denied(
            "scale-deployment",
            ToolRisk::LocalWrite,
            SafetyMode::ReadOnly
        ));
        let dry = contextos_crds::PolicySpec {
            mode: PolicyMode::DryRun,
            ..spec
        };
        let set = PolicySet {
            policies: vec![compile_policy("guard", &dry).expect("compiles")],
        };
        assert!(!set.denies_outright(
            "delete-namespace",
            ToolRisk::Destructive,
            ToolKind::Act,
            autonomous
        ));
    }

    fn quickstart() -> (PolicySet, Agent) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let policy: Policy =
            serde_yaml::from_str(&std::fs::read_to_string(root.join("policy.yaml")).expect("policy"))
                .expect("parses");
        let mut agent: Agent =
            serde_yaml::from_str(&std::fs::read_to_string(root.join("agent.yaml")).expect("agent"))
                .expect("parses");
        agent.spec = crate::manifests::ManifestSet::load(&[root])
            .and_then(|set| set.agent_with_skills("oncall-assistant"))
            .expect("the quickstart agent with its skills");
        let compiled = compile_policy("oncall-guardrails", &policy.spec).expect("compiles");
        (
            PolicySet {
                policies: vec![compiled],
            },
            agent,
        )
    }

    /// Incidents by id pattern; services only where a tool declares them.
    fn entity_ontology() -> crate::ontology::Ontology {
        let spec: contextos_crds::OntologySpec = serde_yaml::from_str(
            "entityTypes: [{name: incident, idPattern: 'INC-[0-9]{3,8}'}, {name: service}, {name: customer-db}]",
        )
        .expect("spec");
        crate::ontology::Ontology::compile(&spec).expect("compiles")
    }

    fn decide(
        set: &PolicySet,
        agent: &Agent,
        tool: &str,
        args: Value,
        run: &RunFacts,
        safety: SafetyMode,
    ) -> Decision {
        let spec = agent
            .spec
            .tools
            .iter()
            .find(|t| t.name == tool)
            .expect("tool exists");
        let ontology = entity_ontology();
        let entities = ontology.of_call(&spec.touches, &args);
        let call = CallFacts {
            tool,
            risk: spec.risk,
            kind: spec.kind,
            args: &args,
            entities: &entities,
        };
        set.decide(
            &call,
            run,
            &StateFacts::default(),
            safety,
            &agent.spec.approvers.clone().unwrap_or_default(),
        )
    }

    #[test]
    fn the_quickstart_policy_allows_reads_gates_destructive_calls_and_denies_deletion() {
        let (set, agent) = quickstart();
        let run = RunFacts::default();
        let auto = SafetyMode::Autonomous;
        let read = decide(
            &set,
            &agent,
            "search_runbooks",
            json!({"query": "5xx"}),
            &run,
            auto,
        );
        assert_eq!(
            (read.effect, read.rule.as_str()),
            (PolicyEffect::Allow, "oncall-guardrails/allow-reads")
        );
        let restart = decide(&set, &agent, "restart_deployment", json!({}), &run, auto);
        assert_eq!(restart.effect, PolicyEffect::RequireApproval);
        assert_eq!(restart.rule, "oncall-guardrails/destructive-needs-oncall");
        assert_eq!(restart.approvers.groups, vec!["sre-oncall".to_owned()]);
        let delete = decide(
            &set,
            &agent,
            "delete_namespace",
            json!({"namespace": "x"}),
            &run,
            auto,
        );
        assert_eq!(
            (delete.effect, delete.rule.as_str()),
            (PolicyEffect::Deny, "oncall-guardrails/no-namespace-deletion")
        );
        assert!(delete.reason.contains("never done by an agent"));
    }

    #[test]
    fn cel_conditions_read_the_call_arguments() {
        let (set, agent) = quickstart();
        let run = RunFacts::default();
        let auto = SafetyMode::Autonomous;
        let sev2 = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"severity": "sev2"}),
            &run,
            auto,
        );
        assert_eq!(sev2.rule, "oncall-guardrails/allow-status-updates");
        let sev1 = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"severity": "sev1"}),
            &run,
            auto,
        );
        assert_eq!(
            (sev1.effect, sev1.rule.as_str()),
            (
                PolicyEffect::RequireApproval,
                "oncall-guardrails/sev1-updates-need-a-human"
            )
        );
        assert_eq!(sev1.approvers.groups, vec!["incident-commanders".to_owned()]);
    }

    /// A hostile model sends arguments that would make a looping condition run for minutes: the
    /// condition is not evaluated and the call is denied, saying why.
    #[test]
    fn a_looping_condition_over_a_flood_of_arguments_denies_without_evaluating() {
        let (_, agent) = quickstart();
        let spec: contextos_crds::PolicySpec = serde_yaml::from_str(
            r#"
defaultEffect: deny
rules:
  - name: small-batches
    match: {tools: ["post_status_update"]}
    condition: "call.args.lines.all(l, size(l) < 200)"
    effect: allow
    reason: status lines are short
"#,
        )
        .expect("policy");
        let set = PolicySet {
            policies: vec![compile_policy("p", &spec).expect("compiles")],
        };
        let run = RunFacts::default();
        let auto = SafetyMode::Autonomous;
        let small = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"lines": ["ok"]}),
            &run,
            auto,
        );
        assert_eq!(small.effect, PolicyEffect::Allow);
        let flood: Vec<&str> = vec!["x"; 2_000_000];
        let flooded = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"lines": flood}),
            &run,
            auto,
        );
        assert_eq!(flooded.effect, PolicyEffect::Deny, "{flooded:?}");
        assert!(flooded.reason.contains("not evaluated"), "{}", flooded.reason);
    }

    /// The same flood, where another policy's plain condition is read first: the scope they
    /// share is measured all the same.
    #[test]
    fn a_looping_condition_is_bounded_behind_another_policys_plain_one() {
        let (_, agent) = quickstart();
        let policy = |yaml: &str, name: &str| {
            let spec: contextos_crds::PolicySpec = serde_yaml::from_str(yaml).expect("policy");
            compile_policy(name, &spec).expect("compiles")
        };
        let set = PolicySet {
            policies: vec![
                policy(
                    r#"
defaultEffect: allow
rules:
  - name: has-lines
    match: {tools: ["post_status_update"]}
    condition: "has(call.args.lines)"
    effect: allow
    reason: lines are fine here
"#,
                    "first",
                ),
                policy(
                    r#"
defaultEffect: deny
rules:
  - name: small-batches
    match: {tools: ["post_status_update"]}
    condition: "call.args.lines.all(l, size(l) < 200)"
    effect: allow
    reason: status lines are short
"#,
                    "second",
                ),
            ],
        };
        let flood: Vec<&str> = vec!["x"; 2_000_000];
        let flooded = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"lines": flood}),
            &RunFacts::default(),
            SafetyMode::Autonomous,
        );
        assert_eq!(flooded.effect, PolicyEffect::Deny, "{flooded:?}");
        assert!(flooded.reason.contains("not evaluated"), "{}", flooded.reason);
    }

    #[test]
    fn safety_modes_tighten_but_never_loosen() {
        let (set, agent) = quickstart();
        let run = RunFacts::default();
        let ro = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"severity": "sev3"}),
            &run,
            SafetyMode::ReadOnly,
        );
        assert_eq!(
            (ro.effect, ro.rule.as_str()),
            (PolicyEffect::Deny, "safety/read_only")
        );
        let read = decide(
            &set,
            &agent,
            "search_runbooks",
            json!({}),
            &run,
            SafetyMode::ReadOnly,
        );
        assert_eq!(read.effect, PolicyEffect::Allow);
        let sup = decide(
            &set,
            &agent,
            "post_status_update",
            json!({"severity": "sev3"}),
            &run,
            SafetyMode::Supervised,
        );
        assert_eq!(
            (sup.effect, sup.rule.as_str()),
            (PolicyEffect::RequireApproval, "safety/supervised")
        );
        let denied = decide(
            &set,
            &agent,
            "delete_namespace",
            json!({}),
            &run,
            SafetyMode::Supervised,
        );
        assert_eq!(
            denied.rule, "oncall-guardrails/no-namespace-deletion",
            "a deny stays a deny"
        );
    }

    #[test]
    fn budgets_deny_once_used_up() {
        let (set, agent) = quickstart();
        let run = RunFacts {
            tool_calls: 20,
            ..Default::default()
        };
        let d = decide(
            &set,
            &agent,
            "search_runbooks",
            json!({}),
            &run,
            SafetyMode::Autonomous,
        );
        assert_eq!(
            (d.effect, d.rule.as_str()),
            (PolicyEffect::Deny, "oncall-guardrails/budget.maxCalls")
        );
        let run = RunFacts {
            destructive_calls: 1,
            ..Default::default()
        };
        let d = decide(
            &set,
            &agent,
            "restart_deployment",
            json!({}),
            &run,
            SafetyMode::Autonomous,
        );
        assert_eq!(d.rule, "oncall-guardrails/budget.maxDestructiveCalls");
    }

    #[test]
    fn dry_run_policies_are_recorded_not_enforced() {
        let (mut set, agent) = quickstart();
        set.policies[0].mode = PolicyMode::DryRun;
        let d = decide(
            &set,
            &agent,
            "delete_namespace",
            json!({}),
            &RunFacts::default(),
            SafetyMode::Autonomous,
        );
        assert_eq!(d.effect, PolicyEffect::Allow);
        assert_eq!(d.dry_run[0].effect, PolicyEffect::Deny);
        assert_eq!(d.dry_run[0].rule, "oncall-guardrails/no-namespace-deletion");
    }

    #[test]
    fn a_condition_that_fails_at_runtime_denies() {
        let spec: contextos_crds::PolicySpec = serde_yaml::from_str(
            "rules: [{name: r, condition: \"call.args.amount > 'x'\", effect: allow, reason: r}]\ndefaultEffect: allow",
        )
        .expect("spec");
        let set = PolicySet {
            policies: vec![compile_policy("p", &spec).expect("compiles")],
        };
        let args = json!({"amount": 5});
        let call = CallFacts {
            tool: "t",
            risk: ToolRisk::ReadOnly,
            kind: ToolKind::Observe,
            args: &args,
            entities: &crate::ontology::CallEntities::default(),
        };
        let d = set.decide(
            &call,
            &RunFacts::default(),
            &StateFacts::default(),
            SafetyMode::Autonomous,
            &Approvers::default(),
        );
        assert_eq!(d.effect, PolicyEffect::Deny);
        assert!(d.reason.contains("could not be evaluated"), "{}", d.reason);
    }

    /// A rule can ask for a scope the Session's user was granted (`spec.user.scopes`).
    #[test]
    fn conditions_read_the_scopes_the_user_was_granted() {
        let spec: contextos_crds::PolicySpec = serde_yaml::from_str(
            "rules: [{name: refunds, condition: \"call.tool == 'refund' && !('payments:write' in run.scopes)\", effect: deny, reason: refunds need the payments:write scope}]\ndefaultEffect: allow",
        )
        .expect("spec");
        let set = PolicySet {
            policies: vec![compile_policy("p", &spec).expect("compiles")],
        };
        let args = json!({});
        let call = CallFacts {
            tool: "refund",
            risk: ToolRisk::Network,
            kind: ToolKind::Act,
            args: &args,
            entities: &crate::ontology::CallEntities::default(),
        };
        let decide = |scopes: &[&str]| {
            let run = RunFacts {
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ..RunFacts::default()
            };
            set.decide(
                &call,
                &run,
                &StateFacts::default(),
                SafetyMode::Autonomous,
                &Approvers::default(),
            )
            .effect
        };
        assert_eq!(decide(&[]), PolicyEffect::Deny);
        assert_eq!(decide(&["payments:read"]), PolicyEffect::Deny);
        assert_eq!(decide(&["payments:read", "payments:write"]), PolicyEffect::Allow);
    }

    /// A policy keeps agents away from a kind of entity whatever tool reaches it and however
    /// the model spells the arguments.
    #[test]
    fn conditions_read_the_types_of_the_entities_a_call_touches() {
        let spec: contextos_crds::PolicySpec = serde_yaml::from_str(
            r#"
rules:
  - {name: no-customer-db, condition: "'customer-db' in call.entityTypes", effect: deny, reason: agents never touch customer databases}
  - {name: incidents-need-a-human, condition: "call.entities.exists(e, e.type == 'incident' && e.id.startsWith('INC-9'))", effect: require_approval, reason: major incidents}
defaultEffect: allow
"#,
        )
        .expect("spec");
        let set = PolicySet {
            policies: vec![compile_policy("p", &spec).expect("compiles")],
        };
        assert!(set.reads_call());
        let (_, mut agent) = quickstart();
        agent.spec.tools.push(
            serde_yaml::from_str(
                r#"
name: query
risk: read_only
kind: observe
adapter: {http: {url: "http://db/query"}}
touches: [{type: customer-db, argument: /database}, {type: service, argument: /service}]
"#,
            )
            .expect("tool"),
        );
        agent.spec.approvers = None;
        let run = RunFacts::default();
        let auto = SafetyMode::Autonomous;
        let d = decide(&set, &agent, "query", json!({"database": "billing"}), &run, auto);
        assert_eq!(
            (d.effect, d.rule.as_str()),
            (PolicyEffect::Deny, "p/no-customer-db")
        );
        // Another shape of the same argument still touches a customer database.
        let d = decide(
            &set,
            &agent,
            "query",
            json!({"database": {"name": "billing"}}),
            &run,
            auto,
        );
        assert_eq!(d.effect, PolicyEffect::Deny);
        let d = decide(
            &set,
            &agent,
            "query",
            json!({"service": "checkout", "q": "INC-9001"}),
            &run,
            auto,
        );
        assert_eq!(
            (d.effect, d.rule.as_str()),
            (PolicyEffect::RequireApproval, "p/incidents-need-a-human")
        );
        let d = decide(
            &set,
            &agent,
            "query",
            json!({"service": "checkout", "q": "INC-1001"}),
            &run,
            auto,
        );
        assert_eq!((d.effect, d.rule.as_str()), (PolicyEffect::Allow, "p/default"));
    }

    #[test]
    fn a_supervised_agent_with_calls_to_approve_must_name_who_may_approve() {
        let set = crate::manifests::ManifestSet::load(&[
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
        ])
        .expect("the quickstart");
        let quickstart = set
            .agent_with_skills("oncall-assistant")
            .expect("the quickstart agent");
        let policy = |default: &str, rules: serde_json::Value| crate::gateway::bundle::NamedPolicy {
            name: "guard".into(),
            spec: serde_json::from_value(serde_json::json!({"defaultEffect": default, "rules": rules}))
                .expect("policy"),
        };
        let allow_all = [policy("allow", serde_json::json!([]))];
        // As shipped: approvers listed.
        assert_eq!(
            unapprovable(&quickstart, SafetyMode::Supervised, &allow_all),
            None
        );
        let mut nobody = quickstart.clone();
        nobody.approvers = None;
        let problem = unapprovable(&nobody, SafetyMode::Supervised, &allow_all).expect("refused");
        assert!(
            problem.starts_with("spec.approvers: under safetyMode supervised"),
            "{problem}"
        );
        nobody.approvers = Some(Approvers::default());
        assert!(
            unapprovable(&nobody, SafetyMode::Supervised, &allow_all).is_some(),
            "an empty list is nobody"
        );
        // No policy at all allows everything.
        assert!(unapprovable(&nobody, SafetyMode::Supervised, &[]).is_some());
        // Policies that deny those tools, or hold them under rules naming approvers, leave
        // nothing waiting for nobody.
        let denied = [policy(
            "deny",
            serde_json::json!([
                {"name": "reads", "match": {"risks": ["read_only", "local_write"]}, "effect": "allow", "reason": "r"},
            ]),
        )];
        assert_eq!(unapprovable(&nobody, SafetyMode::Supervised, &denied), None);
        let held = [policy(
            "allow",
            serde_json::json!([
                {"name": "held", "match": {"risks": ["network", "delegated", "destructive"]}, "effect": "require_approval",
                 "reason": "r", "approvers": {"groups": ["sre-oncall"]}},
            ]),
        )];
        assert_eq!(unapprovable(&nobody, SafetyMode::Supervised, &held), None);
        // A rule that holds only some calls (a condition) leaves the others allowed.
        let some = [policy(
            "allow",
            serde_json::json!([
                {"name": "sev1", "match": {"risks": ["network", "delegated", "destructive"]}, "condition": "call.args.severity == 'sev1'",
                 "effect": "require_approval", "reason": "r", "approvers": {"groups": ["sre-oncall"]}},
            ]),
        )];
        assert!(unapprovable(&nobody, SafetyMode::Supervised, &some).is_some());
        // Autonomous or read-only runs hold no call for supervision; read-only tools never wait.
        assert_eq!(unapprovable(&nobody, SafetyMode::Autonomous, &allow_all), None);
        assert_eq!(unapprovable(&nobody, SafetyMode::ReadOnly, &allow_all), None);
        nobody.tools.retain(|t| t.risk <= ToolRisk::LocalWrite);
        assert_eq!(unapprovable(&nobody, SafetyMode::Supervised, &allow_all), None);
    }
}
