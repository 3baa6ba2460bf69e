//! The Strategy Compiler (pure): an insight and the objects it is about become a typed
//! proposal — a patch to a Policy, ContextPack or Agent — or an open question saying why no
//! patch follows from the evidence alone. Rule-based and deterministic: the same insight, specs
//! and samples give the same proposal, byte for byte, so compiling twice names one object.
//!
//! Rules:
//!
//! | insight | proposal |
//! |---|---|
//! | corrections `should-have-asked` on tool T | Policy: a `require_approval` rule for T before the rule that let the corrected calls through, with a condition on an argument that sets them apart when one does |
//! | corrections `should-not-have-acted` on T | the same rule with `deny` |
//! | corrections `wrong-tool` on T | ContextPack: instructions naming when T was the wrong tool |
//! | repeated denial of T by rule R | ContextPack: instructions saying R denies T |
//! | approvals under rule R always refused | Policy: R denies |
//! | approvals under rule R always granted | Policy: R allows |
//! | a dryRun rule that would change decisions | Policy: enforce it |
//! | a context source cut to fit | ContextPack: the source's priority raised |
//!
//! Budgets are autotune's (a measured search over replays), not a rule's guess.

use std::collections::{BTreeMap, BTreeSet};

use contextos_crds::{
    AgentSpec, ContextPackSpec, PolicySpec,
    policy::{PolicyEffect, PolicyMode, PolicyRule, RuleMatch},
    proposal::{
        AddRule, ContextPackOperation, ContextPackPatch, EvidenceEntry, PolicyOperation, PolicyPatch,
        ProposalInsight, ProposalPatch, ProposalTarget, SetEffect, SetSourcePriority, TargetKind,
    },
};
use serde_json::Value;

use crate::{
    insights::{Insight, InsightKind, signals::CallSample},
    personal_data::Classifier,
    run::bundle::spec_digest,
};

/// What an agent runs with, as the compiler sees it: the current specs of the agent, its pack
/// and its policies (in `policyRefs` order).
#[derive(Clone, Debug)]
pub struct World<'a> {
    pub agent: &'a str,
    /// The Agent's own spec (what a proposal for it patches).
    pub agent_spec: &'a AgentSpec,
    pub pack: (&'a str, &'a ContextPackSpec),
    pub policies: Vec<(&'a str, &'a PolicySpec)>,
    /// The tools it has from its skills (after its own, as its runs have them).
    pub skill_tools: Vec<&'a str>,
}

/// A proposal ready to be written as a Proposal object.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    pub target: ProposalTarget,
    pub base_digest: String,
    pub patch: ProposalPatch,
    pub insight: ProposalInsight,
}

/// What became of an insight.
#[derive(Clone, Debug, PartialEq)]
pub enum Compiled {
    Draft(Box<Draft>),
    /// No patch follows from the evidence alone; why, in a sentence.
    Open(String),
}

/// The most evidence entries a proposal carries.
const MAX_EVIDENCE: usize = 64;

/// Compiles `insight` about `world`; `samples` are the calls of the insight's tool in the
/// window (empty when it is not about a tool).
pub fn compile(insight: &Insight, world: &World<'_>, samples: &[CallSample]) -> Compiled {
    let open = |why: &str| Compiled::Open(why.to_owned());
    match insight.kind {
        InsightKind::Corrections => match insight.label.as_deref() {
            Some("should-have-asked") => guard_tool(insight, world, samples, PolicyEffect::RequireApproval),
            Some("should-not-have-acted") => guard_tool(insight, world, samples, PolicyEffect::Deny),
            Some("wrong-tool") if is_tool(world, &insight.about) => amend(
                insight,
                world,
                format!(
                    "People corrected the use of the tool {} as the wrong tool in {} recorded run(s). Before calling it, check that it is the tool the request needs; if another tool fits better, use that one.",
                    insight.about, insight.strength.runs
                ),
            ),
            Some("missing-context") => {
                open("which knowledge was missing is for a person to say: add a ContextPack source")
            }
            Some("wrong-answer") => {
                open("what a right answer is is for a person to say: add an output validator")
            }
            Some("too-slow-or-costly") => open("a budget is autotune's to measure: contextos autotune"),
            _ => open("corrections of the runs as a whole name no tool or rule to change"),
        },
        InsightKind::RepeatedDenial => {
            let rule = samples
                .iter()
                .find(|s| s.effect == PolicyEffect::Deny && !s.rule.starts_with("gateway/"))
                .map_or("a policy rule", |s| s.rule.as_str());
            amend(
                insight,
                world,
                format!(
                    "Do not call the tool {}: {rule} denies it, and asking again will not change that.",
                    insight.about
                ),
            )
        }
        InsightKind::ApprovalsAlwaysRefused => set_rule_effect(insight, world, PolicyEffect::Deny),
        InsightKind::ApprovalsAlwaysGranted => set_rule_effect(insight, world, PolicyEffect::Allow),
        InsightKind::DryRunWouldChange => {
            let Some((policy, spec, _)) = rule_of(world, &insight.about) else {
                return open("the rule is in none of the agent's policies");
            };
            if spec.mode != PolicyMode::DryRun {
                return open("the policy is already enforced");
            }
            let patch = PolicyPatch {
                operations: vec![PolicyOperation {
                    set_mode: Some(PolicyMode::Enforce),
                    ..PolicyOperation::default()
                }],
            };
            policy_draft(insight, policy, spec, patch)
        }
        InsightKind::SourceCut => {
            let (pack, spec) = world.pack;
            let Some(source) = spec.sources.iter().find(|s| s.name == insight.about) else {
                return open("the source is not in the agent's ContextPack any more");
            };
            if source.priority >= 1000 {
                return open(
                    "the source already has the highest priority: give it more tokens or shorten it",
                );
            }
            let patch = ContextPackPatch {
                operations: vec![ContextPackOperation {
                    set_source_priority: Some(SetSourcePriority {
                        source: source.name.clone(),
                        priority: (source.priority + 100).min(1000),
                    }),
                    ..ContextPackOperation::default()
                }],
            };
            pack_draft(insight, pack, spec, patch)
        }
        InsightKind::RecurringFailure | InsightKind::Pressure => {
            open("a budget or a loop limit is autotune's to measure: contextos autotune")
        }
        InsightKind::Escalations => open("what the escalations have in common is for a person to read"),
        InsightKind::DeadLetters => open("a failing endpoint is fixed where it runs, not by a policy"),
    }
}

fn is_tool(world: &World<'_>, name: &str) -> bool {
    world.agent_spec.tools.iter().any(|t| t.name == name) || world.skill_tools.contains(&name)
}

/// A rule that catches the tool's corrected calls: `effect` for them, before the rule that let
/// them through.
fn guard_tool(
    insight: &Insight,
    world: &World<'_>,
    samples: &[CallSample],
    effect: PolicyEffect,
) -> Compiled {
    let tool = &insight.about;
    if !is_tool(world, tool) {
        return Compiled::Open(format!("{tool} is not one of the agent's tools"));
    }
    let corrected: BTreeSet<(&str, &str)> = insight
        .evidence
        .iter()
        .filter_map(|e| Some((e.run_id.as_str(), e.call_id.as_deref()?)))
        .collect();
    let (hits, others): (Vec<&CallSample>, Vec<&CallSample>) = samples
        .iter()
        .partition(|s| corrected.contains(&(s.run_id.as_str(), s.call_id.as_str())));
    // Where the rule goes: before the rule that decided the corrected calls, in its policy.
    let deciders: BTreeSet<&str> = hits.iter().map(|s| s.rule.as_str()).collect();
    let place = deciders
        .iter()
        .find_map(|rule| rule_of(world, rule).map(|(policy, spec, name)| (policy, spec, Some(name))));
    let (policy, spec, before) = match place {
        Some(found) => found,
        None => match world.policies.first() {
            Some((policy, spec)) => (*policy, *spec, None),
            None => return Compiled::Open("the agent has no policy".into()),
        },
    };
    // A rule named after the default (`policy/default`) is not a rule to go before: the new
    // rule goes last, just ahead of the default effect.
    let before = before.filter(|name| spec.rules.iter().any(|r| r.name == *name));
    let condition = discriminating_condition(&hits, &others);
    let verb = match effect {
        PolicyEffect::RequireApproval => "ask",
        PolicyEffect::Deny => "deny",
        PolicyEffect::Allow => "allow",
    };
    let rule = PolicyRule {
        name: unique_rule_name(spec, &format!("{tool}-{verb}")),
        match_: RuleMatch {
            tools: vec![tool.clone()],
            ..RuleMatch::default()
        },
        condition,
        effect,
        reason: format!(
            "people said agent {} {} {tool} ({} correction(s) in {} run(s))",
            world.agent,
            match effect {
                PolicyEffect::RequireApproval => "should have asked before",
                _ => "should not have called",
            },
            insight.strength.count,
            insight.strength.runs
        ),
        approvers: None,
    };
    let patch = PolicyPatch {
        operations: vec![PolicyOperation {
            add_rule: Some(AddRule {
                rule,
                before: before.map(str::to_owned),
            }),
            ..PolicyOperation::default()
        }],
    };
    policy_draft(insight, policy, spec, patch)
}

/// The condition that holds for every corrected call (two at least) and for no other recorded
/// call of the tool: one string or boolean argument with the same value in all corrected calls
/// that no other call had. None when there is no such argument (the rule then covers every call of
/// the tool, and the replay shows what that changes). A value that looks like personal data is
/// never written into a rule.
pub fn discriminating_condition(hits: &[&CallSample], others: &[&CallSample]) -> Option<String> {
    // One corrected call sets nothing apart: any of its values would (a model can add a
    // one-off argument to every call), so it takes a value shared by two at least.
    if hits.len() < 2 {
        return None;
    }
    let first = hits.first()?;
    let classifier = Classifier::built_in();
    let shared: BTreeMap<&String, &Value> = first
        .arguments
        .iter()
        .filter(|(k, v)| {
            matches!(v, Value::String(_) | Value::Bool(_))
                && hits.iter().all(|h| h.arguments.get(*k) == Some(*v))
        })
        .collect();
    shared
        .into_iter()
        .find(|(k, v)| {
            !others.iter().any(|o| o.arguments.get(*k) == Some(*v))
                && v.as_str().is_none_or(|text| {
                    classifier
                        .classify(text)
                        .map(|c| !c.is_personal())
                        .unwrap_or(false)
                })
        })
        .map(|(key, value)| {
            // JSON's string escapes are CEL's (\", \\, \uXXXX).
            let key = serde_json::to_string(key).unwrap_or_default();
            let value = serde_json::to_string(value).unwrap_or_default();
            format!("{key} in call.args && call.args[{key}] == {value}")
        })
}

/// `name`, or `name-2`, `name-3`, … : the first the policy does not have.
fn unique_rule_name(spec: &PolicySpec, name: &str) -> String {
    let base: String = sanitize(name).chars().take(58).collect();
    let base = base.trim_end_matches(['-', '_', '.']).to_owned();
    (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|candidate| !spec.rules.iter().any(|r| r.name == *candidate))
        .unwrap_or(base)
}

/// Lowercase letters, digits, `-`, `_`, `.`; anything else becomes `-`.
fn sanitize(text: &str) -> String {
    let out: String = text
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '_' | '.') => c,
            _ => '-',
        })
        .collect();
    let out = out.trim_matches(['-', '_', '.']).to_owned();
    if out.is_empty() { "proposed".into() } else { out }
}

/// The policy (name, spec) and rule name of `policy/rule` among the agent's policies.
fn rule_of<'w>(world: &World<'w>, qualified: &'w str) -> Option<(&'w str, &'w PolicySpec, &'w str)> {
    let (policy, rule) = qualified.split_once('/')?;
    world
        .policies
        .iter()
        .find(|(name, _)| *name == policy)
        .map(|(name, spec)| (*name, *spec, rule))
}

/// The rule of the insight set to `effect`.
fn set_rule_effect(insight: &Insight, world: &World<'_>, effect: PolicyEffect) -> Compiled {
    let Some((policy, spec, rule)) = rule_of(world, &insight.about) else {
        return Compiled::Open("the rule is in none of the agent's policies".into());
    };
    if !spec.rules.iter().any(|r| r.name == rule) {
        return Compiled::Open(format!(
            "{} is the policy's default effect, not a rule; change defaultEffect by hand if you mean it",
            insight.about
        ));
    }
    let patch = PolicyPatch {
        operations: vec![PolicyOperation {
            set_effect: Some(SetEffect {
                rule: rule.to_owned(),
                effect,
                reason: Some(
                    format!(
                        "{} (changed from require_approval: {})",
                        match effect {
                            PolicyEffect::Deny => "nobody approves these calls",
                            _ => "every one of these calls was approved",
                        },
                        insight.summary
                    )
                    .chars()
                    .take(1024)
                    .collect(),
                ),
            }),
            ..PolicyOperation::default()
        }],
    };
    policy_draft(insight, policy, spec, patch)
}

/// A paragraph added to the agent's ContextPack instructions.
fn amend(insight: &Insight, world: &World<'_>, text: String) -> Compiled {
    let (pack, spec) = world.pack;
    let patch = ContextPackPatch {
        operations: vec![ContextPackOperation {
            amend_instructions: Some(text),
            ..ContextPackOperation::default()
        }],
    };
    pack_draft(insight, pack, spec, patch)
}

/// A draft of `patch` to Policy `name` (now at `spec`).
fn policy_draft(insight: &Insight, name: &str, spec: &PolicySpec, patch: PolicyPatch) -> Compiled {
    let patch = ProposalPatch {
        policy: Some(patch),
        ..ProposalPatch::default()
    };
    draft(insight, TargetKind::Policy, name, spec_digest(spec), patch)
}

/// A draft of `patch` to ContextPack `name` (now at `spec`).
fn pack_draft(insight: &Insight, name: &str, spec: &ContextPackSpec, patch: ContextPackPatch) -> Compiled {
    let patch = ProposalPatch {
        context_pack: Some(patch),
        ..ProposalPatch::default()
    };
    draft(insight, TargetKind::ContextPack, name, spec_digest(spec), patch)
}

fn draft(
    insight: &Insight,
    kind: TargetKind,
    name: &str,
    base_digest: String,
    patch: ProposalPatch,
) -> Compiled {
    Compiled::Draft(Box::new(Draft {
        target: ProposalTarget {
            kind,
            name: name.to_owned(),
        },
        base_digest,
        patch,
        insight: proposal_insight(insight),
    }))
}

/// The insight as a Proposal carries it.
pub fn proposal_insight(insight: &Insight) -> ProposalInsight {
    ProposalInsight {
        kind: insight.kind.as_str().to_owned(),
        agent: insight.agent.clone(),
        about: insight.about.chars().take(253).collect(),
        summary: insight.summary.chars().take(1024).collect(),
        runs: insight.strength.runs,
        evidence: insight
            .evidence
            .iter()
            .take(MAX_EVIDENCE)
            .map(|e| EvidenceEntry {
                run: e.run_id.clone(),
                seq: e.seq,
                hash: e.hash.to_hex(),
                call: e.call_id.clone(),
            })
            .collect(),
    }
}
