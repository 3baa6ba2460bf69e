//! Typed patches applied to a target's spec (pure): each operation finds what it names or says
//! which field of the patch is wrong, and says in one line what it changed. The result is then
//! checked like any hand-written spec (the API server's admission, the operator's own checks).

use contextos_crds::{
    AgentSpec, ContextPackSpec, PolicySpec,
    proposal::{AgentPatch, ContextPackPatch, PolicyPatch, ProposalPatch, TargetKind},
};

/// A patch that does not apply: the patch field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct PatchError {
    pub field: String,
    pub why: String,
}

/// A patched spec and what changed, one line per operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Patched<T> {
    pub spec: T,
    pub changes: Vec<String>,
}

fn error(field: String, why: impl Into<String>) -> PatchError {
    PatchError {
        field,
        why: why.into(),
    }
}

/// The patch of `kind`, or which field is missing.
pub fn for_kind(patch: &ProposalPatch, kind: TargetKind) -> Result<(), PatchError> {
    let present = match kind {
        TargetKind::Policy => patch.policy.is_some(),
        TargetKind::ContextPack => patch.context_pack.is_some(),
        TargetKind::Agent => patch.agent.is_some(),
    };
    if present {
        Ok(())
    } else {
        Err(error(
            "spec.patch".into(),
            format!("a {} target takes a patch of its kind", kind.as_str()),
        ))
    }
}

/// Applies `patch` to a Policy's spec.
pub fn apply_policy(spec: &PolicySpec, patch: &PolicyPatch) -> Result<Patched<PolicySpec>, PatchError> {
    let mut spec = spec.clone();
    let mut changes = Vec::new();
    for (i, op) in patch.operations.iter().enumerate() {
        let at = |what: &str| format!("spec.patch.policy.operations[{i}].{what}");
        let position = |spec: &PolicySpec, rule: &str, what: &str| {
            spec.rules
                .iter()
                .position(|r| r.name == rule)
                .ok_or_else(|| error(at(what), format!("the Policy has no rule named {rule:?}")))
        };
        if let Some(add) = &op.add_rule {
            if spec.rules.iter().any(|r| r.name == add.rule.name) {
                return Err(error(
                    at("addRule.rule.name"),
                    format!("the Policy already has a rule named {:?}", add.rule.name),
                ));
            }
            let index = match &add.before {
                Some(before) => position(&spec, before, "addRule.before")?,
                None => spec.rules.len(),
            };
            // The whole rule: what it matches, its condition and approvers are the change.
            let rule = serde_json::to_string(&add.rule).unwrap_or_default();
            changes.push(match &add.before {
                Some(before) => format!("add rule {rule} before {before}"),
                None => format!("add rule {rule} last"),
            });
            spec.rules.insert(index, add.rule.clone());
        } else if let Some(set) = &op.set_effect {
            let index = position(&spec, &set.rule, "setEffect.rule")?;
            let rule = &mut spec.rules[index];
            changes.push(format!(
                "rule {}: {} → {}",
                rule.name,
                rule.effect.as_str(),
                set.effect.as_str()
            ));
            rule.effect = set.effect;
            if let Some(reason) = &set.reason {
                rule.reason.clone_from(reason);
            }
            if set.effect != contextos_crds::policy::PolicyEffect::RequireApproval {
                // Approvers only mean something on an approval rule (admission refuses them).
                rule.approvers = None;
            }
        } else if let Some(set) = &op.set_condition {
            let index = position(&spec, &set.rule, "setCondition.rule")?;
            let rule = &mut spec.rules[index];
            changes.push(match &set.condition {
                Some(condition) => format!("rule {}: condition {condition}", rule.name),
                None => format!("rule {}: no condition", rule.name),
            });
            rule.condition.clone_from(&set.condition);
        } else if let Some(remove) = &op.remove_rule {
            let index = position(&spec, &remove.rule, "removeRule.rule")?;
            spec.rules.remove(index);
            changes.push(format!("remove rule {}", remove.rule));
        } else if let Some(budget) = &op.set_budget {
            spec.budget = Some(budget.clone());
            changes.push(format!(
                "tool-call budget: {}",
                serde_json::to_string(budget).unwrap_or_default()
            ));
        } else if let Some(effect) = op.set_default_effect {
            changes.push(format!(
                "default effect: {} → {}",
                spec.default_effect.as_str(),
                effect.as_str()
            ));
            spec.default_effect = effect;
        } else if let Some(mode) = op.set_mode {
            changes.push(format!("mode: {:?} → {mode:?}", spec.mode));
            spec.mode = mode;
        } else {
            return Err(error(at(""), "the entry sets no operation"));
        }
    }
    Ok(Patched { spec, changes })
}

/// Applies `patch` to a ContextPack's spec.
pub fn apply_context_pack(
    spec: &ContextPackSpec,
    patch: &ContextPackPatch,
) -> Result<Patched<ContextPackSpec>, PatchError> {
    let mut spec = spec.clone();
    let mut changes = Vec::new();
    for (i, op) in patch.operations.iter().enumerate() {
        let at = |what: &str| format!("spec.patch.contextPack.operations[{i}].{what}");
        let source = |spec: &ContextPackSpec, name: &str, what: &str| {
            spec.sources
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| error(at(what), format!("the ContextPack has no source named {name:?}")))
        };
        if let Some(text) = &op.amend_instructions {
            spec.instructions = format!("{}\n\n{}", spec.instructions.trim_end(), text.trim());
            changes.push(format!("instructions: add {:?}", clip(text, 120)));
        } else if let Some(added) = &op.add_source {
            if spec.sources.iter().any(|s| s.name == added.name) {
                return Err(error(
                    at("addSource.name"),
                    format!("the ContextPack already has a source named {:?}", added.name),
                ));
            }
            changes.push(format!("add source {} (priority {})", added.name, added.priority));
            spec.sources.push(added.clone());
        } else if let Some(set) = &op.set_source_priority {
            let index = source(&spec, &set.source, "setSourcePriority.source")?;
            changes.push(format!(
                "source {}: priority {} → {}",
                set.source, spec.sources[index].priority, set.priority
            ));
            spec.sources[index].priority = set.priority;
        } else if let Some(set) = &op.set_source_max_tokens {
            let index = source(&spec, &set.source, "setSourceMaxTokens.source")?;
            let text = |v: Option<u32>| v.map_or_else(|| "uncapped".to_owned(), |v| v.to_string());
            changes.push(format!(
                "source {}: maxTokens {} → {}",
                set.source,
                text(spec.sources[index].max_tokens),
                text(set.max_tokens)
            ));
            spec.sources[index].max_tokens = set.max_tokens;
        } else if let Some(budget) = op.set_token_budget {
            changes.push(format!("tokenBudget: {} → {budget}", spec.token_budget));
            spec.token_budget = budget;
        } else {
            return Err(error(at(""), "the entry sets no operation"));
        }
    }
    Ok(Patched { spec, changes })
}

/// Applies `patch` to an Agent's spec.
pub fn apply_agent(spec: &AgentSpec, patch: &AgentPatch) -> Result<Patched<AgentSpec>, PatchError> {
    let mut spec = spec.clone();
    let mut changes = Vec::new();
    for (i, op) in patch.operations.iter().enumerate() {
        let at = |what: &str| format!("spec.patch.agent.operations[{i}].{what}");
        if let Some(budget) = &op.set_budget {
            let b = &mut spec.budget;
            let mut set = |name: &str, old: u64, new: Option<u64>| {
                if let Some(new) = new {
                    changes.push(format!("budget.{name}: {old} → {new}"));
                }
            };
            set("maxSteps", b.max_steps.into(), budget.max_steps.map(u64::from));
            set("maxTokens", b.max_tokens, budget.max_tokens);
            set(
                "maxToolCalls",
                b.max_tool_calls.into(),
                budget.max_tool_calls.map(u64::from),
            );
            set(
                "maxWallSeconds",
                b.max_wall_seconds.into(),
                budget.max_wall_seconds.map(u64::from),
            );
            b.max_steps = budget.max_steps.unwrap_or(b.max_steps);
            b.max_tokens = budget.max_tokens.unwrap_or(b.max_tokens);
            b.max_tool_calls = budget.max_tool_calls.unwrap_or(b.max_tool_calls);
            b.max_wall_seconds = budget.max_wall_seconds.unwrap_or(b.max_wall_seconds);
        } else if let Some(set) = &op.set_tool_risk {
            let tool = spec
                .tools
                .iter_mut()
                .find(|t| t.name == set.tool)
                .ok_or_else(|| {
                    error(
                        at("setToolRisk.tool"),
                        format!("the Agent has no tool named {:?}", set.tool),
                    )
                })?;
            changes.push(format!(
                "tool {}: risk {} → {}",
                tool.name,
                tool.risk.as_str(),
                set.risk.as_str()
            ));
            tool.risk = set.risk;
        } else if let Some(validator) = &op.add_validator {
            if spec.validators.iter().any(|v| v.name == validator.name) {
                return Err(error(
                    at("addValidator.name"),
                    format!("the Agent already has a validator named {:?}", validator.name),
                ));
            }
            changes.push(format!("add output validator {}", validator.name));
            spec.validators.push(validator.clone());
        } else if let Some(critic) = &op.set_critic {
            if let Some(max) = critic.max_revisions {
                changes.push(format!(
                    "critic.maxRevisions: {} → {max}",
                    spec.critic.max_revisions
                ));
                spec.critic.max_revisions = max;
            }
            if let Some(on) = &critic.escalate_on {
                changes.push(format!("critic.escalateOn: {on:?}"));
                spec.critic.escalate_on.clone_from(on);
            }
        } else {
            return Err(error(at(""), "the entry sets no operation"));
        }
    }
    Ok(Patched { spec, changes })
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max).collect();
    out.push('…');
    out
}
