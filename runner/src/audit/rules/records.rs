//! Rules about what the records show agents did in the audited window (`--records`): rules that
//! never decided, tools never used, calls that fell to a default, dryRun policies that would
//! change outcomes, dead letters, and runs that keep failing the same way. Each finding names
//! the runs it saw. They apply only when records were read, to the tenant's objects.

use std::collections::{BTreeMap, BTreeSet};

use contextos_crds::{
    AgentSpec,
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
};

use super::{Check, Sink, spec};
use crate::{
    audit::{
        evidence::{Evidence, RunEvidence},
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
    },
    policy::{compile_policy, strictness},
};

/// Runs named in a finding before "and N more".
const RUNS_SHOWN: usize = 5;

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("records/rule-never-matched"),
            severity: Severity::Low,
            title: "a Policy rule whose match selected none of the calls in the window",
            why: "a rule that never applies is either dead (its tools are gone or renamed) or covers a case the agents never reach; both deserve a look before someone relies on it",
            fix: "check the rule's match against the tools the agents call; remove it if it is dead",
        },
        rules_never_matched,
    ),
    (
        Rule {
            id: RuleId("records/tool-never-used"),
            severity: Severity::Low,
            title: "a tool an Agent never called in the window",
            why: "every tool offered is attack surface and prompt space; one no run needs is better removed",
            fix: "remove the tool from the Agent, or confirm it is there for rare cases",
        },
        tools_never_used,
    ),
    (
        Rule {
            id: RuleId("records/default-effect-decided"),
            severity: Severity::Medium,
            title: "calls decided by a Policy's default effect",
            why: "no rule covers these calls: they are governed by accident of the default, not by decision",
            fix: "write rules for the tools named, with the effect each should have",
        },
        default_effect_decided,
    ),
    (
        Rule {
            id: RuleId("records/dry-run-would-change"),
            severity: Severity::Medium,
            title: "a dryRun Policy that would have changed decisions",
            why: "enforcing it changes what agents may do: the calls named would be denied or wait for approval",
            fix: "review the calls named before setting the Policy to `mode: enforce`",
        },
        dry_run_would_change,
    ),
    (
        Rule {
            id: RuleId("records/dead-lettered"),
            severity: Severity::Medium,
            title: "calls of a tool that failed after every retry",
            why: "a dead-lettered call is an effect that did not happen (or happened without a result): runs went on without it",
            fix: "look at the tool's errors in the runs named (`contextos records show <run>`), fix the tool or its adapter settings",
        },
        dead_lettered,
    ),
    (
        Rule {
            id: RuleId("records/failing-the-same-way"),
            severity: Severity::Medium,
            title: "runs of an Agent that failed for the same reason",
            why: "a failure that repeats is a problem in the harness (a budget, a validator, a tool), not bad luck",
            fix: "read one of the runs named; fix what the reason points at",
        },
        failing_the_same_way,
    ),
];

fn stricter_wording(effect: PolicyEffect) -> &'static str {
    match effect {
        PolicyEffect::Deny => "deny",
        _ => "ask for approval of",
    }
}

/// The runs of `agent` in the evidence, when it was read for the Agent's namespace.
fn runs_of<'a>(evidence: &'a Evidence, agent: &Object<AgentSpec>) -> Vec<&'a RunEvidence> {
    let namespace_matches = agent
        .id
        .namespace
        .as_deref()
        .is_none_or(|ns| ns == evidence.tenant);
    if !namespace_matches {
        return Vec::new();
    }
    evidence
        .runs
        .iter()
        .filter(|r| r.agent == agent.id.name)
        .collect()
}

/// `run-a, run-b and 3 more`.
fn named(runs: &BTreeSet<&str>) -> String {
    let shown: Vec<&str> = runs.iter().take(RUNS_SHOWN).copied().collect();
    match runs.len().saturating_sub(RUNS_SHOWN) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn rules_never_matched(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for policy in &harness.policies {
        let runs: Vec<&RunEvidence> = harness
            .agents_using_policy(policy)
            .flat_map(|a| runs_of(evidence, a))
            .collect();
        if runs.is_empty() {
            continue;
        }
        let Ok(compiled) = compile_policy(&policy.id.name, &policy.spec) else {
            continue;
        };
        // Judged by the rule's match, not by which rule the record names: with several
        // Policies only the strictest verdict is recorded, and a safety mode may replace it.
        let calls: Vec<(&str, ToolRisk, ToolKind)> = runs
            .iter()
            .flat_map(|r| &r.calls)
            .filter_map(|c| Some((c.tool.as_str(), c.risk?, c.kind?)))
            .collect();
        for (i, rule) in compiled.rules.iter().enumerate() {
            let matched = calls
                .iter()
                .any(|(tool, risk, kind)| rule.matches(tool, *risk, *kind));
            if !matched {
                sink.report(
                    policy,
                    spec(&["rules"]).index(i),
                    format!(
                        "rule {} matches none of the {} calls of {} runs",
                        rule.name,
                        calls.len(),
                        runs.len()
                    ),
                );
            }
        }
    }
}

fn tools_never_used(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for agent in &harness.agents {
        let runs = runs_of(evidence, agent);
        if runs.is_empty() {
            continue;
        }
        let used: BTreeSet<&str> = runs
            .iter()
            .flat_map(|r| &r.calls)
            .map(|c| c.tool.as_str())
            .collect();
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            if !used.contains(tool.name.as_str()) {
                sink.report(
                    agent,
                    spec(&["tools"]).index(i),
                    format!("{} was called in none of {} runs", tool.name, runs.len()),
                );
            }
        }
    }
}

fn default_effect_decided(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for policy in &harness.policies {
        let default_rule = format!("{}/default", policy.id.name);
        // tool → runs whose calls of it fell to this Policy's default.
        let mut fell: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for agent in harness.agents_using_policy(policy) {
            for run in runs_of(evidence, agent) {
                for call in &run.calls {
                    let decided_by_default = call
                        .decision
                        .iter()
                        .chain(&call.shadows)
                        .any(|(r, _)| *r == default_rule);
                    if decided_by_default {
                        fell.entry(call.tool.as_str())
                            .or_default()
                            .insert(run.run_id.as_str());
                    }
                }
            }
        }
        for (tool, runs) in fell {
            sink.report(
                policy,
                spec(&["defaultEffect"]),
                format!(
                    "calls of {} fell to the default effect in {}",
                    crate::text::for_terminal(tool),
                    named(&runs)
                ),
            );
        }
    }
}

fn dry_run_would_change(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for policy in &harness.policies {
        let prefix = format!("{}/", policy.id.name);
        // (would-be effect, tool) → runs.
        let mut changes: BTreeMap<(&'static str, &str), BTreeSet<&str>> = BTreeMap::new();
        for agent in harness.agents_using_policy(policy) {
            for run in runs_of(evidence, agent) {
                for call in &run.calls {
                    let applied = call.decision.as_ref().map_or(PolicyEffect::Allow, |(_, e)| *e);
                    for (_, effect) in call.shadows.iter().filter(|(r, _)| r.starts_with(&prefix)) {
                        // Enforcing a Policy can only add strictness: the strictest verdict wins.
                        if strictness(*effect) > strictness(applied) {
                            changes
                                .entry((stricter_wording(*effect), call.tool.as_str()))
                                .or_default()
                                .insert(run.run_id.as_str());
                        }
                    }
                }
            }
        }
        for ((effect, tool), runs) in changes {
            sink.report(
                policy,
                spec(&["mode"]),
                format!(
                    "enforced, it would {effect} calls of {} that were decided more leniently, in {}",
                    crate::text::for_terminal(tool),
                    named(&runs)
                ),
            );
        }
    }
}

fn dead_lettered(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for agent in &harness.agents {
        let mut failed: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for run in runs_of(evidence, agent) {
            for call in run.calls.iter().filter(|c| c.dead_lettered) {
                failed
                    .entry(call.tool.as_str())
                    .or_default()
                    .insert(run.run_id.as_str());
            }
        }
        for (tool, runs) in failed {
            let index = agent.spec.tools.iter().position(|t| t.name == tool);
            let field = index.map_or_else(|| spec(&["tools"]), |i| spec(&["tools"]).index(i));
            sink.report(
                agent,
                field,
                format!(
                    "calls of {} were dead-lettered in {}",
                    crate::text::for_terminal(tool),
                    named(&runs)
                ),
            );
        }
    }
}

fn failing_the_same_way(harness: &Harness, sink: &mut Sink<'_>) {
    let Some(evidence) = &harness.evidence else { return };
    for agent in &harness.agents {
        let mut by_reason: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for run in runs_of(evidence, agent) {
            if let Some((reason, _)) = &run.failure {
                by_reason
                    .entry(reason.as_str())
                    .or_default()
                    .insert(run.run_id.as_str());
            }
        }
        for (reason, runs) in by_reason.into_iter().filter(|(_, runs)| runs.len() >= 2) {
            sink.report(
                agent,
                spec(&[]),
                format!(
                    "{} runs failed with {}: {}",
                    runs.len(),
                    crate::text::for_terminal(reason),
                    named(&runs)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::{evidence::CallEvidence, source};

    const GOOD: &str = include_str!("../../../tests/audit/good/harness.yaml");

    /// A call of one of the good harness's tools, as requested (risk and kind as declared) and
    /// decided by `rule`.
    fn call(tool: &str, rule: &str, effect: PolicyEffect) -> CallEvidence {
        let (risk, kind) = match tool {
            "search_runbooks" => (ToolRisk::ReadOnly, ToolKind::Observe),
            "lint_manifest" => (ToolRisk::LocalWrite, ToolKind::Verify),
            "post_status_update" => (ToolRisk::Network, ToolKind::Act),
            _ => (ToolRisk::Destructive, ToolKind::Act),
        };
        CallEvidence {
            tool: tool.into(),
            risk: Some(risk),
            kind: Some(kind),
            decision: Some((rule.into(), effect)),
            ..CallEvidence::default()
        }
    }

    /// A run of the good harness's Agent that calls every tool, each decided by its own rule.
    fn thorough_run(run_id: &str) -> RunEvidence {
        RunEvidence {
            run_id: run_id.into(),
            agent: "oncall".into(),
            failure: None,
            calls: vec![
                call("search_runbooks", "guardrails/reads", PolicyEffect::Allow),
                call("lint_manifest", "guardrails/lint", PolicyEffect::Allow),
                // A supervised run records the safety mode, not the rule that allowed it.
                call(
                    "post_status_update",
                    "safety/supervised",
                    PolicyEffect::RequireApproval,
                ),
                call(
                    "restart_deployment",
                    "guardrails/destructive-needs-oncall",
                    PolicyEffect::RequireApproval,
                ),
            ],
        }
    }

    fn findings(runs: Vec<RunEvidence>, tenant: &str) -> Vec<(String, String)> {
        let documents = source::parse(Path::new("harness.yaml"), GOOD).expect("good harness");
        let harness = Harness::from_documents(documents, false).with_evidence(Evidence {
            tenant: tenant.into(),
            runs,
            ..Evidence::default()
        });
        super::super::findings_of(RULES, &harness)
    }

    #[test]
    fn runs_that_use_everything_as_intended_make_no_finding() {
        assert!(findings(vec![thorough_run("r1"), thorough_run("r2")], "shop").is_empty());
        // Nothing is judged without runs of the Agent in its namespace.
        assert!(findings(Vec::new(), "shop").is_empty());
        assert!(findings(vec![thorough_run("r1")], "elsewhere").is_empty());
    }

    #[test]
    fn what_the_runs_show_is_reported_with_the_runs() {
        let mut odd = thorough_run("r2");
        odd.calls = vec![
            CallEvidence {
                dead_lettered: true,
                ..call("restart_deployment", "guardrails/default", PolicyEffect::Deny)
            },
            CallEvidence {
                // A dryRun rule that would deny what was allowed.
                shadows: vec![("guardrails/trial-no-search".into(), PolicyEffect::Deny)],
                ..call("search_runbooks", "guardrails/reads", PolicyEffect::Allow)
            },
            CallEvidence {
                // A dryRun rule looser than what applied is no change when enforced.
                shadows: vec![("guardrails/trial-allow".into(), PolicyEffect::Allow)],
                ..call(
                    "restart_deployment",
                    "guardrails/destructive-needs-oncall",
                    PolicyEffect::RequireApproval,
                )
            },
        ];
        odd.failure = Some(("BudgetExhausted".into(), "steps".into()));
        let mut again = thorough_run("r3");
        again.failure = Some(("BudgetExhausted".into(), "steps".into()));
        let found = findings(vec![odd, again], "shop");
        let has = |rule: &str, text: &str| found.iter().any(|(r, m)| r == rule && m.contains(text));
        assert!(
            has(
                "records/default-effect-decided",
                "restart_deployment fell to the default effect in r2"
            ),
            "{found:#?}"
        );
        assert!(
            has(
                "records/dry-run-would-change",
                "it would deny calls of search_runbooks that were decided more leniently"
            ),
            "{found:#?}"
        );
        assert!(
            !found
                .iter()
                .any(|(r, m)| r == "records/dry-run-would-change" && m.contains("restart_deployment")),
            "{found:#?}"
        );
        assert!(
            has(
                "records/dead-lettered",
                "restart_deployment were dead-lettered in r2"
            ),
            "{found:#?}"
        );
        assert!(
            has(
                "records/failing-the-same-way",
                "2 runs failed with BudgetExhausted: r2, r3"
            ),
            "{found:#?}"
        );
        // r3 called every tool, so no rule or tool is "never" used, although the status update's
        // record names the safety mode instead of the rule that allowed it.
        assert!(
            !found
                .iter()
                .any(|(r, _)| r == "records/rule-never-matched" || r == "records/tool-never-used")
        );

        let mut lean = thorough_run("r1");
        lean.calls.truncate(1);
        let unused = findings(vec![lean], "shop");
        assert!(
            unused
                .iter()
                .any(|(r, m)| r == "records/tool-never-used" && m.contains("lint_manifest")),
            "{unused:#?}"
        );
        assert!(
            unused
                .iter()
                .any(|(r, m)| r == "records/rule-never-matched" && m.contains("rule lint ")),
            "{unused:#?}"
        );
        assert!(
            !unused
                .iter()
                .any(|(r, m)| r == "records/rule-never-matched" && m.contains("rule reads ")),
            "{unused:#?}"
        );
    }

    #[test]
    fn long_run_lists_are_cut() {
        let runs: BTreeSet<&str> = ["a", "b", "c", "d", "e", "f", "g"].into_iter().collect();
        assert_eq!(named(&runs), "a, b, c, d, e and 2 more");
    }
}
