//! Rules about Agents as a whole: what their policies actually let through (decided by the same
//! policy engine the gateway runs), references that do not resolve, output checks, the critic,
//! budgets and the model's credentials.

use contextos_crds::{
    PolicySpec,
    agent::Tool,
    common::{SafetyMode, ToolRisk},
    policy::{PolicyEffect, PolicyMode},
};

use super::{Check, Sink, plain_http_off_cluster, spec};
use crate::{
    audit::{
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
    },
    policy::{CompiledPolicy, compile_policy},
    run::validate,
};

/// Run budgets above these bound nothing a reviewer would accept for one run.
const LARGE_MAX_STEPS: u32 = 200;
const LARGE_MAX_TOOL_CALLS: u32 = 1_000;
const LARGE_MAX_TOKENS: u64 = 5_000_000;
const LARGE_MAX_WALL_SECONDS: u32 = 86_400;

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("agent/destructive-without-approval"),
            severity: Severity::Critical,
            title: "a destructive or delegated tool the Agent's policies may allow without approval",
            why: "the model alone decides to take an action that cannot be undone (or hands authority to another agent); nobody is asked",
            fix: "add a rule with `effect: require_approval` (or deny) matching the tool's risk, without a condition, before any rule that allows it; or run the Agent `supervised`",
        },
        destructive_without_approval,
    ),
    (
        Rule {
            id: RuleId("agent/ungoverned"),
            severity: Severity::Critical,
            title: "an Agent all of whose Policies are in dryRun mode",
            why: "with no enforcing Policy every call is allowed: the Agent runs ungoverned while looking governed",
            fix: "set `spec.mode: enforce` on at least one of its Policies",
        },
        ungoverned,
    ),
    (
        Rule {
            id: RuleId("agent/missing-reference"),
            severity: Severity::Medium,
            title: "an Agent naming a Policy, ContextPack, SandboxProfile or Skill that is not there",
            why: "the Agent stays Ready=False and its Sessions do not start; in a repository it may also mean the object lives elsewhere, unreviewed with it — and a missing Skill's tools are not audited at all",
            fix: "add the object next to the Agent, or correct the name",
        },
        missing_references,
    ),
    (
        Rule {
            id: RuleId("agent/no-validators"),
            severity: Severity::Medium,
            title: "an Agent that acts but checks none of its outputs",
            why: "with tools that act on the network or destroy, a malformed or hallucinated final answer is passed on unchecked",
            fix: "add `spec.validators` (a JSON Schema or a CEL check of the output)",
        },
        no_validators,
    ),
    (
        Rule {
            id: RuleId("agent/a2a-exposed-autonomous"),
            severity: Severity::High,
            title: "an Agent offered over A2A (`spec.a2a`) that runs autonomous",
            why: "every caller granted `invoke` starts runs in which the policies alone decide: nobody of the team that owns the agent is asked before it acts on another team's request",
            fix: "run it `supervised` (approval above local_write), or give its policies `require_approval` for every risk above read_only; grant `invoke` (ClusterRole contextos-a2a-caller, or a Role naming the agent) only to the callers who need it",
        },
        a2a_exposed_autonomous,
    ),
    (
        Rule {
            id: RuleId("agent/critic-disabled"),
            severity: Severity::Medium,
            title: "an Agent whose critic may not ask for a revision",
            why: "with `critic.maxRevisions: 0` a failed output check ends the run instead of letting the model correct itself",
            fix: "leave `spec.critic.maxRevisions` at its default (2) or set it above 0",
        },
        critic_disabled,
    ),
    (
        Rule {
            id: RuleId("agent/budget-very-large"),
            severity: Severity::Medium,
            title: "a run budget too large to stop a runaway run",
            why: "budgets are the last stop for a looping model: above 200 steps, 1,000 calls, 5 M tokens or a day they stop nothing in time",
            fix: "lower `spec.budget` to what one run needs; a Session may lower it further",
        },
        large_budget,
    ),
    (
        Rule {
            id: RuleId("agent/model-key-over-http"),
            severity: Severity::High,
            title: "a model API key sent over plain HTTP",
            why: "the key (and every prompt) crosses the network unencrypted to an endpoint outside the cluster",
            fix: "use an `https://` endpoint",
        },
        model_key_over_http,
    ),
    (
        Rule {
            id: RuleId("agent/validator-invalid"),
            severity: Severity::High,
            title: "an output validator that does not compile",
            why: "the Agent is Ready=False and none of its Sessions start",
            fix: "correct the validator's JSON Schema or CEL (it may read `output` and `json`)",
        },
        invalid_validators,
    ),
    (
        Rule {
            id: RuleId("agent/a2a-risk-below-ceiling"),
            severity: Severity::High,
            title: "an A2A tool whose remote agent may do more than the tool's own risk says",
            why: "policies judge a call by its tool's risk, so a delegation to an agent that may act destructively would be judged as something milder; the Agent is refused (Ready=False, InvalidSpec)",
            fix: "raise the tool's risk to at least its adapter.a2a.riskCeiling (and review the policies that match it), or call an agent with a lower ceiling",
        },
        a2a_below_ceiling,
    ),
    (
        Rule {
            id: RuleId("agent/unpriced-model"),
            severity: Severity::High,
            title: "a model, or a model turns are routed to, that no PriceList prices, in a cluster that prices models",
            why: "the Agent is Ready=False (PriceMissing) and none of its Sessions start: once a cluster has PriceLists, a call is never free by omission (two lists pricing the model differently count too)",
            fix: "price the model (provider, model name and endpoint) in one PriceList's `spec.models`",
        },
        unpriced_models,
    ),
    (
        Rule {
            id: RuleId("agent/tool-price-conflict"),
            severity: Severity::High,
            title: "a tool two PriceList prices cover differently, with URL prefixes as long as each other",
            why: "the Agent is Ready=False (PriceMissing) and none of its Sessions start: the call's cost would be a guess, and quotas count what it costs",
            fix: "keep one price for the tool's URL, or make the one that should win a longer prefix",
        },
        tool_price_conflicts,
    ),
];

/// A rule (or default) of one Policy that may let a call of `tool` through: the first matching
/// rule that allows it, reached before any unconditional deny or approval. A conditional deny or
/// approval may not apply, so the search goes past it; a conditional allow may apply, so it
/// counts (named with its condition).
fn may_allow(policy: &Object<PolicySpec>, compiled: &CompiledPolicy, tool: &Tool) -> Option<String> {
    let destructive_forbidden = tool.risk == ToolRisk::Destructive
        && policy.spec.budget.as_ref().and_then(|b| b.max_destructive_calls) == Some(0);
    if destructive_forbidden {
        return None;
    }
    for (rule, compiled_rule) in policy.spec.rules.iter().zip(&compiled.rules) {
        if !compiled_rule.matches(&tool.name, tool.risk, tool.kind) {
            continue;
        }
        let condition = rule.condition.as_deref().map(str::trim).filter(|c| *c != "true");
        match (rule.effect, condition) {
            (PolicyEffect::Allow, None) => return Some(format!("{}/{}", policy.id.name, rule.name)),
            (PolicyEffect::Allow, Some(condition)) => {
                return Some(format!("{}/{} when `{condition}`", policy.id.name, rule.name));
            }
            (_, None) => return None,
            (_, Some(_)) => {}
        }
    }
    (policy.spec.default_effect == PolicyEffect::Allow).then(|| format!("{}/default", policy.id.name))
}

fn destructive_without_approval(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        // A supervised run asks for approval above local_write, a read_only run denies it,
        // whatever the policies say.
        if agent.spec.safety_mode != SafetyMode::Autonomous {
            continue;
        }
        let policies = harness.policies_of(agent);
        if policies.len() != agent.spec.policy_refs.len() {
            continue;
        }
        let Some(compiled) = policies
            .iter()
            .map(|p| compile_policy(&p.id.name, &p.spec).ok())
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let enforced: Vec<_> = policies
            .iter()
            .zip(&compiled)
            .filter(|(p, _)| p.spec.mode == PolicyMode::Enforce)
            .collect();
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            if tool.risk < ToolRisk::Delegated {
                continue;
            }
            // The strictest enforced verdict applies: the call goes ahead only if every enforcing
            // Policy may allow it (with none enforcing, every call does).
            let witnesses: Option<Vec<String>> = if enforced.is_empty() {
                Some(vec!["no enforcing Policy (all are dryRun)".to_owned()])
            } else {
                enforced.iter().map(|(p, c)| may_allow(p, c, tool)).collect()
            };
            if let Some(witnesses) = witnesses {
                sink.report(
                    agent,
                    spec(&["tools"]).index(i),
                    format!(
                        "{} ({}) can run without approval: {}",
                        tool.name,
                        tool.risk.as_str(),
                        witnesses.join("; ")
                    ),
                );
            }
        }
    }
}

fn ungoverned(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let policies = harness.policies_of(agent);
        if !policies.is_empty()
            && policies.len() == agent.spec.policy_refs.len()
            && policies.iter().all(|p| p.spec.mode == PolicyMode::DryRun)
        {
            let names: Vec<&str> = policies.iter().map(|p| p.id.name.as_str()).collect();
            sink.report(
                agent,
                spec(&["policyRefs"]),
                format!(
                    "every Policy of Agent {} is in dryRun mode ({})",
                    agent.id.name,
                    names.join(", ")
                ),
            );
        }
    }
}

fn missing_references(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        for (i, reference) in agent.spec.policy_refs.iter().enumerate() {
            if harness.find(&harness.policies, agent, &reference.name).is_none() {
                sink.report(
                    agent,
                    spec(&["policyRefs"]).index(i),
                    format!("Policy {} is not in the audited objects", reference.name),
                );
            }
        }
        let pack = &agent.spec.context_pack_ref.name;
        if harness.find(&harness.context_packs, agent, pack).is_none() {
            sink.report(
                agent,
                spec(&["contextPackRef"]),
                format!("ContextPack {pack} is not in the audited objects"),
            );
        }
        let sandbox = &agent.spec.sandbox_profile_ref.name;
        if harness.find(&harness.sandbox_profiles, agent, sandbox).is_none() {
            sink.report(
                agent,
                spec(&["sandboxProfileRef"]),
                format!("SandboxProfile {sandbox} is not in the audited objects"),
            );
        }
        for (i, reference) in agent.spec.skill_refs.iter().enumerate() {
            if harness.find(&harness.skills, agent, &reference.name).is_none() {
                sink.report(
                    agent,
                    spec(&["skillRefs"]).index(i),
                    format!(
                        "Skill {} is not in the audited objects: its tools were not audited",
                        reference.name
                    ),
                );
            }
        }
    }
}

fn no_validators(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in harness.agents.iter().filter(|a| a.spec.validators.is_empty()) {
        if let Some(tool) = agent.spec.tools.iter().find(|t| t.risk >= ToolRisk::Network) {
            sink.report(
                agent,
                spec(&["validators"]),
                format!(
                    "Agent {} has {} ({}) and no output validator",
                    agent.id.name,
                    tool.name,
                    tool.risk.as_str()
                ),
            );
        }
    }
}

fn a2a_exposed_autonomous(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in harness
        .agents
        .iter()
        .filter(|a| a.spec.a2a.is_some() && a.spec.safety_mode == SafetyMode::Autonomous)
    {
        sink.report(
            agent,
            spec(&["safetyMode"]),
            "offered over A2A (spec.a2a) and autonomous: its callers' requests are acted on with no person of the owning team asked",
        );
    }
}

fn critic_disabled(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in harness.agents.iter().filter(|a| a.spec.critic.max_revisions == 0) {
        sink.report(
            agent,
            spec(&["critic", "maxRevisions"]),
            "the critic may ask for no revision",
        );
    }
}

fn large_budget(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let budget = &agent.spec.budget;
        let limits = [
            (
                "maxSteps",
                u64::from(budget.max_steps),
                u64::from(LARGE_MAX_STEPS),
            ),
            (
                "maxToolCalls",
                u64::from(budget.max_tool_calls),
                u64::from(LARGE_MAX_TOOL_CALLS),
            ),
            ("maxTokens", budget.max_tokens, LARGE_MAX_TOKENS),
            (
                "maxWallSeconds",
                u64::from(budget.max_wall_seconds),
                u64::from(LARGE_MAX_WALL_SECONDS),
            ),
        ];
        for (name, value, limit) in limits {
            if value > limit {
                sink.report(
                    agent,
                    spec(&["budget", name]),
                    format!("{name} is {value} (above {limit})"),
                );
            }
        }
    }
}

fn model_key_over_http(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let model = &agent.spec.model;
        if let (Some(endpoint), Some(_)) = (&model.endpoint, &model.secret_ref)
            && plain_http_off_cluster(endpoint)
        {
            sink.report(
                agent,
                spec(&["model", "endpoint"]),
                format!("the API key goes to {endpoint} unencrypted"),
            );
        }
    }
}

fn unpriced_models(harness: &Harness, sink: &mut Sink<'_>) {
    let mut lists: Vec<(String, contextos_crds::PriceListSpec)> = Vec::new();
    for list in harness.others_of("PriceList") {
        match serde_json::from_value(list.spec["spec"].clone()) {
            Ok(spec) => lists.push((list.id.name.clone(), spec)),
            // A list that does not read prices nothing: the Agents it was meant for are not priced.
            Err(e) => sink.report(
                list,
                spec(&[]),
                format!("PriceList {} cannot be read: {e}", list.id.name),
            ),
        }
    }
    for agent in &harness.agents {
        if let Err(e) = crate::pricing::price_for(&lists, &agent.spec.model) {
            sink.report(agent, spec(&["model"]), e.to_string());
        }
        // Every model a turn may be routed to is priced too (a fallback is no free call).
        let routed = agent
            .spec
            .routing
            .iter()
            .flat_map(|r| r.models.iter().enumerate());
        for (i, routed) in routed {
            if let Err(e) = crate::pricing::price_for(&lists, &routed.model) {
                let field = spec(&["routing", "models"]).index(i).key("model");
                sink.report(agent, field, format!("routed model {}: {e}", routed.name));
            }
        }
    }
}

fn tool_price_conflicts(harness: &Harness, sink: &mut Sink<'_>) {
    let lists = price_lists(harness);
    for agent in &harness.agents {
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            if let Err(e) = crate::pricing::tool_prices(&lists, std::slice::from_ref(tool)) {
                sink.report(agent, spec(&["tools"]).index(i), e.to_string());
            }
        }
    }
}

/// The PriceLists that read (one that does not is reported by `agent/unpriced-model`).
fn price_lists(harness: &Harness) -> Vec<(String, contextos_crds::PriceListSpec)> {
    harness
        .others_of("PriceList")
        .filter_map(|list| {
            let spec = serde_json::from_value(list.spec["spec"].clone()).ok()?;
            Some((list.id.name.clone(), spec))
        })
        .collect()
}

fn invalid_validators(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        if let Err(error) = validate::compile(&agent.id.name, &agent.spec.validators) {
            sink.report(
                agent,
                spec(&["validators"]).index(error.index),
                format!("{}: {}", error.name, error.problem),
            );
        }
    }
}

fn a2a_below_ceiling(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            if let Some(a2a) = &tool.adapter.a2a
                && a2a.risk_ceiling > tool.risk
            {
                sink.report(
                    agent,
                    spec(&["tools"])
                        .index(i)
                        .key("adapter")
                        .key("a2a")
                        .key("riskCeiling"),
                    format!(
                        "{}: its remote agent may act up to {}, the tool is declared {}",
                        tool.name,
                        a2a.risk_ceiling.as_str(),
                        tool.risk.as_str()
                    ),
                );
            }
        }
    }
}
