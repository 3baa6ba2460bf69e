//! Compiles Policy specs once into matchers: risk and kind sets as bitmasks, tool globs, and
//! parsed CEL conditions whose variables are checked against what a decision provides.

use contextos_crds::{
    common::{Approvers, ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode, PolicySpec, ToolCallBudget},
};

use super::glob::Glob;
use crate::records::canonical::digest_of;

/// Variables a rule condition may use.
pub const CONDITION_VARIABLES: [&str; 3] = ["call", "run", "state"];

/// A rule that could not be compiled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: spec.rules[{index}] ({rule}): {problem}")]
pub struct PolicyCompileError {
    pub policy: String,
    pub index: usize,
    pub rule: String,
    pub problem: String,
}

/// One compiled rule.
#[derive(Debug)]
pub struct CompiledRule {
    pub name: String,
    risks: u8,
    kinds: u8,
    tools: Vec<Glob>,
    pub condition: Option<Condition>,
    pub effect: PolicyEffect,
    pub reason: String,
    pub approvers: Option<Approvers>,
}

/// A parsed CEL condition and its source (for records and errors).
pub struct Condition {
    pub source: String,
    pub program: cel::Program,
    /// Which of `call`, `run`, `state` it reads (bit i = `CONDITION_VARIABLES[i]`), so a
    /// decision converts only those into CEL values.
    pub variables: u8,
    /// How its cost grows with the input (checked before each evaluation).
    pub cost: super::cost::CostShape,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A compiled Policy: what `decide` evaluates.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub name: String,
    /// `sha256:` digest of the spec this was compiled from.
    pub digest: String,
    pub mode: PolicyMode,
    pub default_effect: PolicyEffect,
    pub rules: Vec<CompiledRule>,
    pub budget: Option<ToolCallBudget>,
    /// Union of the variables its conditions read.
    pub condition_variables: u8,
    /// Whether some condition loops (its input is then measured for the cost bound).
    pub condition_loops: bool,
}

pub(crate) fn risk_bit(risk: ToolRisk) -> u8 {
    1 << (risk as u8)
}

pub(crate) fn kind_bit(kind: ToolKind) -> u8 {
    1 << (kind as u8)
}

impl CompiledRule {
    /// Whether the static part of the match (risk, kind, tool name) applies.
    pub fn matches(&self, tool: &str, risk: ToolRisk, kind: ToolKind) -> bool {
        (self.risks == 0 || self.risks & risk_bit(risk) != 0)
            && (self.kinds == 0 || self.kinds & kind_bit(kind) != 0)
            && (self.tools.is_empty() || self.tools.iter().any(|g| g.matches(tool)))
    }
}

/// Compiles a Policy named `name`. Every rule's CEL condition is parsed and its variables
/// checked, so a typo is reported here, with the rule's index, rather than at the first call.
pub fn compile_policy(name: &str, spec: &PolicySpec) -> Result<CompiledPolicy, PolicyCompileError> {
    let digest = digest_of(spec).map_err(|e| PolicyCompileError {
        policy: name.into(),
        index: 0,
        rule: String::new(),
        problem: format!("spec cannot be encoded: {e}"),
    })?;
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (index, rule) in spec.rules.iter().enumerate() {
        let error = |problem: String| PolicyCompileError {
            policy: name.into(),
            index,
            rule: rule.name.clone(),
            problem,
        };
        let condition = match &rule.condition {
            Some(source) => Some(compile_condition(source).map_err(error)?),
            None => None,
        };
        rules.push(CompiledRule {
            name: rule.name.clone(),
            risks: rule.match_.risks.iter().fold(0, |acc, r| acc | risk_bit(*r)),
            kinds: rule.match_.kinds.iter().fold(0, |acc, k| acc | kind_bit(*k)),
            tools: rule.match_.tools.iter().map(|t| Glob::new(t)).collect(),
            condition,
            effect: rule.effect,
            reason: rule.reason.clone(),
            approvers: rule.approvers.clone(),
        });
    }
    let condition_variables = rules
        .iter()
        .filter_map(|r| r.condition.as_ref())
        .fold(0, |acc, c| acc | c.variables);
    let condition_loops = rules
        .iter()
        .filter_map(|r| r.condition.as_ref())
        .any(|c| c.cost.loop_nodes > 0);
    Ok(CompiledPolicy {
        condition_variables,
        condition_loops,
        name: name.into(),
        digest,
        mode: spec.mode,
        default_effect: spec.default_effect,
        rules,
        budget: spec.budget.clone(),
    })
}

/// Parses a condition and checks it only reads `call`, `run` and `state`.
pub fn compile_condition(source: &str) -> Result<Condition, String> {
    let (program, cost) = super::cost::compile_bounded(source).map_err(|e| format!("condition {e}"))?;
    let free = super::cel_vars::free_variables(&program);
    let unknown: Vec<&str> = free
        .iter()
        .map(String::as_str)
        .filter(|v| !CONDITION_VARIABLES.contains(v))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "condition uses unknown variable(s) {}; available: call (tool, risk, kind, args, entities, entityTypes), run (tenant, agent, user, groups, scopes, safetyMode, toolCalls, callsOfTool, destructiveCalls, steps, tokens, input), state (budget, loop, evidence, gate, conflict)",
            unknown.join(", ")
        ));
    }
    let variables = CONDITION_VARIABLES
        .iter()
        .enumerate()
        .filter(|(_, name)| free.contains(**name))
        .fold(0, |acc, (i, _)| acc | (1 << i));
    Ok(Condition {
        source: source.to_owned(),
        program,
        variables,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use contextos_crds::policy::{PolicyRule, RuleMatch};

    use super::*;

    fn rule(name: &str, condition: Option<&str>) -> PolicyRule {
        PolicyRule {
            name: name.into(),
            match_: RuleMatch::default(),
            condition: condition.map(str::to_owned),
            effect: PolicyEffect::Deny,
            reason: "r".into(),
            approvers: None,
        }
    }

    fn spec(rules: Vec<PolicyRule>) -> PolicySpec {
        PolicySpec {
            rules,
            default_effect: PolicyEffect::Deny,
            mode: PolicyMode::Enforce,
            budget: None,
            promotion: None,
        }
    }

    #[test]
    fn a_broken_condition_is_reported_with_its_rule_index() {
        let err = compile_policy(
            "guard",
            &spec(vec![
                rule("ok", Some("call.args.n > 1")),
                rule("bad", Some("call.args.n >")),
            ]),
        )
        .expect_err("does not compile");
        assert_eq!((err.index, err.rule.as_str()), (1, "bad"));
        assert!(
            err.to_string()
                .starts_with("policy guard: spec.rules[1] (bad): condition does not compile"),
            "{err}"
        );
    }

    #[test]
    fn unknown_variables_are_refused_at_compile_time() {
        let err = compile_policy("guard", &spec(vec![rule("typo", Some("cal.tool == 'x'"))]))
            .expect_err("unknown variable");
        assert!(err.problem.contains("unknown variable(s) cal"), "{err}");
    }

    #[test]
    fn the_digest_follows_the_spec() {
        let a = compile_policy("p", &spec(vec![rule("a", None)])).expect("compiles");
        let b = compile_policy("p", &spec(vec![rule("b", None)])).expect("compiles");
        assert_ne!(a.digest, b.digest);
        assert!(a.digest.starts_with("sha256:"));
    }
}
