//! Rules about Policies: what they let through by default, rules that can never decide, conditions
//! that cannot compile or never hold, budgets, approvals nobody can give, and promotion gates
//! (which ContextPacks share).

use contextos_crds::{
    PolicySpec,
    common::{PromotionSpec, ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode, RuleMatch},
};

use super::{Check, Sink, spec};
use crate::{
    audit::{
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
    },
    policy::{compile_condition, compile_policy, glob::Glob},
};

/// Above these, a budget no longer stops a runaway loop before it does damage.
const LARGE_MAX_CALLS: u32 = 1_000;
const LARGE_MAX_DESTRUCTIVE_CALLS: u32 = 10;
/// A replay gate that tolerates more divergence than this passes most behaviour changes.
const TOLERANT_DIVERGENCE_PERCENT: u32 = 20;
/// Fewer replayed sessions than this say little about a change.
const SMALL_REPLAY_SAMPLE: u32 = 10;

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("policy/default-allow"),
            severity: Severity::High,
            title: "a Policy that allows every call no rule covers",
            why: "a tool added to an Agent later is allowed before anyone writes a rule for it; governance should fail closed",
            fix: "set `spec.defaultEffect: deny` (the default) and allow what is needed with explicit rules",
        },
        default_allow,
    ),
    (
        Rule {
            id: RuleId("policy/dry-run"),
            severity: Severity::Medium,
            title: "a Policy in dryRun mode",
            why: "a dryRun Policy records what it would decide and enforces nothing; left on, it is a policy in name only",
            fix: "after checking its would-be decisions (`contextos records`), set `spec.mode: enforce`",
        },
        dry_run,
    ),
    (
        Rule {
            id: RuleId("policy/shadowed-rule"),
            severity: Severity::Medium,
            title: "a rule that can never decide (an earlier rule matches everything it matches)",
            why: "the first matching rule decides; a shadowed rule is dead code that reviewers believe is in force",
            fix: "move the narrower rule above the broader one, or remove it",
        },
        shadowed_rules,
    ),
    (
        Rule {
            id: RuleId("policy/condition-invalid"),
            severity: Severity::High,
            title: "a rule condition that does not compile",
            why: "the Policy is Ready=False and never becomes the promoted revision: the Agents using it do not run",
            fix: "correct the CEL expression; it may read `call`, `run` and `state` only",
        },
        invalid_conditions,
    ),
    (
        Rule {
            id: RuleId("policy/condition-never-true"),
            severity: Severity::Medium,
            title: "a rule condition that can never hold",
            why: "it compares a field with a value the field never takes (a risk or kind that does not exist), so the rule never applies",
            fix: "compare with one of the values the field takes (risks: read_only, local_write, network, delegated, destructive)",
        },
        never_true_conditions,
    ),
    (
        Rule {
            id: RuleId("policy/rule-matches-no-tool"),
            severity: Severity::Low,
            title: "a rule whose match selects no tool of the Agents using the Policy",
            why: "usually a renamed tool or a typo in a glob: the rule meant to govern it governs nothing",
            fix: "correct `match.tools`, `match.risks` or `match.kinds`, or remove the rule",
        },
        rules_matching_no_tool,
    ),
    (
        Rule {
            id: RuleId("policy/no-budget"),
            severity: Severity::Low,
            title: "a Policy without a call budget",
            why: "only the Agent's run budget bounds how many calls a looping model makes",
            fix: "set `spec.budget` (maxCalls, maxCallsPerTool, maxDestructiveCalls)",
        },
        no_budget,
    ),
    (
        Rule {
            id: RuleId("policy/budget-very-large"),
            severity: Severity::Medium,
            title: "a call budget too large to stop a runaway run",
            why: "above 1,000 calls (or 10 destructive calls) per run, a loop does its damage before the budget stops it",
            fix: "lower `spec.budget` to what one run needs",
        },
        large_budgets,
    ),
    (
        Rule {
            id: RuleId("policy/approval-without-approvers"),
            severity: Severity::Medium,
            title: "a require_approval rule nobody can approve",
            why: "neither the rule nor an Agent using it names approvers, so every such call waits for good (its Session stays AwaitingApproval until cancelled)",
            fix: "name `approvers` on the rule or `spec.approvers` on the Agent",
        },
        approvals_without_approvers,
    ),
    (
        Rule {
            id: RuleId("promotion/ungated"),
            severity: Severity::Medium,
            title: "a Policy or ContextPack without a promotion gate",
            why: "every change is in force at once, for every Agent using it, without replaying recorded sessions first",
            fix: "set `spec.promotion` (a replay gate; `mode: manual` with approvers for sensitive changes)",
        },
        ungated,
    ),
    (
        Rule {
            id: RuleId("promotion/manual-without-approvers"),
            severity: Severity::High,
            title: "a manual promotion gate that names no approver",
            why: "nobody can pass it: the API server refuses the object, and an Agent using it never gets a promoted revision",
            fix: "name `spec.promotion.approvers` (users or groups), or use `mode: automatic`",
        },
        manual_without_approvers,
    ),
    (
        Rule {
            id: RuleId("promotion/tolerant-replay"),
            severity: Severity::Medium,
            title: "a replay gate that tolerates much divergence",
            why: "a gate that passes when more than 20 % of replayed decisions change passes most behaviour changes",
            fix: "lower `spec.promotion.replay.maxDivergencePercent`",
        },
        tolerant_replay,
    ),
    (
        Rule {
            id: RuleId("promotion/small-replay-sample"),
            severity: Severity::Low,
            title: "a replay gate over very few sessions",
            why: "fewer than 10 replayed sessions rarely include the case a change breaks",
            fix: "raise `spec.promotion.replay.sampleSize`",
        },
        small_replay_sample,
    ),
];

fn enforced(policy: &Object<PolicySpec>) -> bool {
    policy.spec.mode == PolicyMode::Enforce
}

fn default_allow(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in harness.policies.iter().filter(|p| enforced(p)) {
        if policy.spec.default_effect == PolicyEffect::Allow {
            sink.report(
                policy,
                spec(&["defaultEffect"]),
                format!(
                    "Policy {} allows every call its {} rules do not match",
                    policy.id.name,
                    policy.spec.rules.len()
                ),
            );
        }
    }
}

fn dry_run(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in harness.policies.iter().filter(|p| !enforced(p)) {
        // Read from a cluster, the object's age says how long a dryRun may have been left on.
        let age = policy.doc.value["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|created| (jiff::Timestamp::now().as_second() - created.as_second()) / 86_400)
            .map_or_else(String::new, |days| {
                format!(" (the Policy was created {days} days ago)")
            });
        sink.report(
            policy,
            spec(&["mode"]),
            format!(
                "Policy {} is in dryRun mode: it enforces nothing{age}",
                policy.id.name
            ),
        );
    }
}

/// Whether every call `narrow` matches is matched by `broad` too.
fn covers(broad: &RuleMatch, narrow: &RuleMatch) -> bool {
    fn set_covers<T: PartialEq>(broad: &[T], narrow: &[T]) -> bool {
        broad.is_empty() || (!narrow.is_empty() && narrow.iter().all(|n| broad.contains(n)))
    }
    let tools = broad.tools.is_empty()
        || (!narrow.tools.is_empty()
            && narrow.tools.iter().all(|n| {
                broad
                    .tools
                    .iter()
                    .any(|b| b == n || b == "*" || (!n.contains(['*', '?']) && Glob::new(b).matches(n)))
            }));
    set_covers::<ToolRisk>(&broad.risks, &narrow.risks)
        && set_covers::<ToolKind>(&broad.kinds, &narrow.kinds)
        && tools
}

fn shadowed_rules(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in &harness.policies {
        let rules = &policy.spec.rules;
        for (i, rule) in rules.iter().enumerate() {
            let shadow = rules[..i]
                .iter()
                .enumerate()
                .find(|(_, earlier)| earlier.condition.is_none() && covers(&earlier.match_, &rule.match_));
            if let Some((j, earlier)) = shadow {
                sink.report(
                    policy,
                    spec(&["rules"]).index(i),
                    format!(
                        "rule {} can never decide: rule {} (spec.rules[{j}]) has no condition and matches every call it matches",
                        rule.name, earlier.name
                    ),
                );
            }
        }
    }
}

fn invalid_conditions(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in &harness.policies {
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            let Some(source) = &rule.condition else { continue };
            if let Err(problem) = compile_condition(source) {
                sink.report(
                    policy,
                    spec(&["rules"]).index(i).key("condition"),
                    format!("rule {}: {problem}", rule.name),
                );
            }
        }
    }
}

/// The string literals `variable` is compared with by `==` in `source` (either side).
fn compared_literals(source: &str, variable: &str) -> Vec<String> {
    let mut found = Vec::new();
    // Triple-quoted CEL strings (`'''x'''`) are left alone: only plain one-quote literals are read.
    let literal_after = |rest: &str| -> Option<String> {
        let rest = rest.trim_start().strip_prefix("==")?.trim_start();
        let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let body = &rest[1..];
        if body.starts_with(quote) {
            return None;
        }
        Some(body[..body.find(quote)?].to_owned())
    };
    let literal_before = |before: &str| -> Option<String> {
        let before = before.trim_end().strip_suffix("==")?.trim_end();
        let quote = before.chars().last().filter(|c| *c == '\'' || *c == '"')?;
        let body = &before[..before.len() - 1];
        if body.ends_with(quote) {
            return None;
        }
        Some(body[body.rfind(quote)? + 1..].to_owned())
    };
    let mut from = 0;
    while let Some(at) = source[from..].find(variable).map(|i| i + from) {
        let end = at + variable.len();
        // `call.risk` but not `call.riskier`.
        let whole = !source[end..].starts_with(|c: char| c.is_alphanumeric() || c == '_');
        if whole {
            found.extend(literal_after(&source[end..]));
            found.extend(literal_before(&source[..at]));
        }
        from = end;
    }
    found
}

fn never_true_conditions(harness: &Harness, sink: &mut Sink<'_>) {
    let risks: Vec<&str> = ToolRisk::ALL.iter().map(|r| r.as_str()).collect();
    let kinds = ["observe", "recall", "think_support", "act", "verify"];
    let modes = ["read_only", "supervised", "autonomous"];
    let fields: [(&str, &[&str]); 3] = [
        ("call.risk", &risks),
        ("call.kind", &kinds),
        ("run.safetyMode", &modes),
    ];
    for policy in &harness.policies {
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            let Some(source) = &rule.condition else { continue };
            let field = spec(&["rules"]).index(i).key("condition");
            if source.trim() == "false" {
                sink.report(
                    policy,
                    field,
                    format!("rule {}: the condition is `false`", rule.name),
                );
                continue;
            }
            for (variable, values) in fields {
                for literal in compared_literals(source, variable) {
                    if !values.contains(&literal.as_str()) {
                        sink.report(
                            policy,
                            field.clone(),
                            format!(
                                "rule {}: {variable} is never {literal:?} (it is one of {})",
                                rule.name,
                                values.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn rules_matching_no_tool(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in &harness.policies {
        let agents: Vec<_> = harness.agents_using_policy(policy).collect();
        if agents.is_empty() {
            continue;
        }
        let Ok(compiled) = compile_policy(&policy.id.name, &policy.spec) else {
            continue;
        };
        for (i, rule) in compiled.rules.iter().enumerate() {
            let selective = {
                let m = &policy.spec.rules[i].match_;
                !(m.tools.is_empty() && m.risks.is_empty() && m.kinds.is_empty())
            };
            let used = agents
                .iter()
                .flat_map(|a| &a.spec.tools)
                .any(|t| rule.matches(&t.name, t.risk, t.kind));
            if selective && !used {
                let names: Vec<&str> = agents.iter().map(|a| a.id.name.as_str()).collect();
                sink.report(
                    policy,
                    spec(&["rules"]).index(i).key("match"),
                    format!("rule {} matches no tool of {}", rule.name, names.join(", ")),
                );
            }
        }
    }
}

fn no_budget(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in harness
        .policies
        .iter()
        .filter(|p| enforced(p) && p.spec.budget.is_none())
    {
        sink.report(
            policy,
            spec(&[]),
            format!("Policy {} sets no spec.budget", policy.id.name),
        );
    }
}

fn large_budgets(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in &harness.policies {
        let Some(budget) = &policy.spec.budget else {
            continue;
        };
        let limits = [
            ("maxCalls", budget.max_calls, LARGE_MAX_CALLS),
            ("maxCallsPerTool", budget.max_calls_per_tool, LARGE_MAX_CALLS),
            (
                "maxDestructiveCalls",
                budget.max_destructive_calls,
                LARGE_MAX_DESTRUCTIVE_CALLS,
            ),
        ];
        for (name, value, limit) in limits {
            if let Some(value) = value.filter(|v| *v > limit) {
                sink.report(
                    policy,
                    spec(&["budget", name]),
                    format!("{name} is {value} (above {limit})"),
                );
            }
        }
    }
}

fn approvals_without_approvers(harness: &Harness, sink: &mut Sink<'_>) {
    for policy in &harness.policies {
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            if rule.effect != PolicyEffect::RequireApproval
                || rule.approvers.as_ref().is_some_and(|a| !a.is_empty())
            {
                continue;
            }
            let stuck: Vec<&str> = harness
                .agents_using_policy(policy)
                .filter(|a| a.spec.approvers.as_ref().is_none_or(|a| a.is_empty()))
                .map(|a| a.id.name.as_str())
                .collect();
            if !stuck.is_empty() {
                sink.report(
                    policy,
                    spec(&["rules"]).index(i),
                    format!(
                        "rule {} needs an approval, and Agent {} names no approvers",
                        rule.name,
                        stuck.join(", ")
                    ),
                );
            }
        }
    }
}

/// Every Policy and ContextPack with its promotion spec, for the promotion rules.
fn gated(
    harness: &Harness,
) -> impl Iterator<
    Item = (
        &crate::audit::harness::ObjectRef,
        &crate::audit::source::Document,
        Option<&PromotionSpec>,
    ),
> {
    harness
        .policies
        .iter()
        .map(|p| (&p.id, &p.doc, p.spec.promotion.as_ref()))
        .chain(
            harness
                .context_packs
                .iter()
                .map(|c| (&c.id, &c.doc, c.spec.promotion.as_ref())),
        )
}

fn ungated(harness: &Harness, sink: &mut Sink<'_>) {
    for (id, doc, promotion) in gated(harness) {
        if promotion.is_none() {
            sink.report_at(
                id,
                doc,
                spec(&[]),
                format!("{id} has no spec.promotion: changes apply at once"),
            );
        }
    }
}

fn manual_without_approvers(harness: &Harness, sink: &mut Sink<'_>) {
    for (id, doc, promotion) in gated(harness) {
        let Some(promotion) = promotion else { continue };
        let named = promotion.approvers.as_ref().is_some_and(|a| !a.is_empty());
        if promotion.mode == contextos_crds::common::PromotionMode::Manual && !named {
            sink.report_at(
                id,
                doc,
                spec(&["promotion", "mode"]),
                format!("{id} is promoted by hand and names no one who may"),
            );
        }
    }
}

fn tolerant_replay(harness: &Harness, sink: &mut Sink<'_>) {
    for (id, doc, promotion) in gated(harness) {
        let Some(promotion) = promotion else { continue };
        let tolerated = promotion.replay.max_divergence_percent;
        if tolerated > TOLERANT_DIVERGENCE_PERCENT {
            sink.report_at(
                id,
                doc,
                spec(&["promotion", "replay", "maxDivergencePercent"]),
                format!("the gate passes with {tolerated} % of replayed decisions changed"),
            );
        }
    }
}

fn small_replay_sample(harness: &Harness, sink: &mut Sink<'_>) {
    for (id, doc, promotion) in gated(harness) {
        let Some(promotion) = promotion else { continue };
        let sample = promotion.replay.sample_size;
        if sample < SMALL_REPLAY_SAMPLE {
            sink.report_at(
                id,
                doc,
                spec(&["promotion", "replay", "sampleSize"]),
                format!("the gate replays {sample} recorded sessions"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compared_literals_are_found_on_either_side() {
        assert_eq!(
            compared_literals("call.risk == 'destructiv'", "call.risk"),
            ["destructiv"]
        );
        assert_eq!(
            compared_literals("\"network\" == call.risk && x", "call.risk"),
            ["network"]
        );
        assert!(compared_literals("call.riskier == 'x'", "call.risk").is_empty());
        assert!(compared_literals("call.risk in ['a']", "call.risk").is_empty());
        assert!(compared_literals("call.risk == \'\'\'destructive\'\'\'", "call.risk").is_empty());
        assert!(compared_literals("\'\'\'destructive\'\'\' == call.risk", "call.risk").is_empty());
    }

    #[test]
    fn a_broad_rule_covers_a_narrower_one() {
        let m = |tools: &[&str], risks: &[ToolRisk]| RuleMatch {
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
            risks: risks.to_vec(),
            kinds: Vec::new(),
        };
        assert!(covers(&m(&[], &[]), &m(&["delete_ns"], &[])));
        assert!(covers(&m(&["delete_*"], &[]), &m(&["delete_ns"], &[])));
        assert!(!covers(&m(&["delete_ns"], &[]), &m(&["delete_*"], &[])));
        assert!(covers(
            &m(&[], &[ToolRisk::Destructive]),
            &m(&["x"], &[ToolRisk::Destructive])
        ));
        assert!(!covers(&m(&[], &[ToolRisk::Destructive]), &m(&["x"], &[])));
    }
}
