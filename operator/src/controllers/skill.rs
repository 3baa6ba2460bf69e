//! Skills: a spec whose tools compile and whose suite checks something, under Policies that
//! exist and are promoted, is a candidate; it is promoted only when every scenario of its
//! suite passes, evaluated by the gateway service for a Job (like a replay gate) and signed
//! with the tenant's key. No annotation and no Proposal promotes a Skill past its suite.

use std::sync::Arc;

use contextos_crds::{Policy, Skill, common::PromotionSpec, conditions::reason};
use contextos_runner::{
    gateway::{CatalogTool, adapters::adapter_problem, bundle::NamedPolicy},
    run::gate::GatedKind,
    skills::{SkillCandidate, eval::suite_problem},
};
use kube::{Api, ResourceExt as _, runtime::controller::Action};

use super::{
    Context, Invalid, Result, is_ready, ready_message,
    revisions::{self, Gated},
};

/// Reconciles a Skill.
pub async fn reconcile_skill(skill: Arc<Skill>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Skill");
    let namespace = skill.namespace().unwrap_or_default();
    let (candidate, problem) = match candidate(&ctx, &namespace, &skill).await? {
        Ok(candidate) => (candidate, None),
        Err(invalid) => (
            SkillCandidate {
                skill: skill.spec.clone(),
                policies: Vec::new(),
            },
            Some(invalid),
        ),
    };
    // The suite is the gate: always run, promoted automatically when it passes.
    let suite = PromotionSpec::default();
    let status = skill.status.clone().unwrap_or_default();
    let gate = Gated {
        kind: GatedKind::Skill,
        promotion: Some(&suite),
        ungated: Gated::NO_GATE,
        first_replayed: true,
        reviewers: None,
        spec_digest: candidate.digest(),
        revisions: status.revisions.clone().unwrap_or_default(),
        conditions: status.conditions.clone(),
        prices: Default::default(),
    };
    let api = Api::<Skill>::namespaced(ctx.client.clone(), &namespace);
    revisions::finish(&ctx, &api, skill.as_ref(), &candidate, gate, problem).await
}

/// What the gate evaluates: the spec with the promoted revisions of its suite's Policies, or
/// what keeps it from being evaluated.
async fn candidate(ctx: &Context, namespace: &str, skill: &Skill) -> Result<Result<SkillCandidate, Invalid>> {
    let spec = &skill.spec;
    if let Some(problem) = contextos_crds::free_form::skill_problem(spec) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    if let Some(problem) = adapter_problem(&spec.tools) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    for (i, tool) in spec.tools.iter().enumerate() {
        if let Err(e) = CatalogTool::new(tool.clone()) {
            return Ok(Err(Invalid::new(
                reason::INVALID_SPEC,
                format!("spec.tools[{i}].inputSchema: {e}"),
            )));
        }
        if tool.adapter.memory.is_some() {
            return Ok(Err(Invalid::new(
                reason::INVALID_SPEC,
                format!(
                    "spec.tools[{i}]: a skill cannot bring a memory tool (what an agent may keep is the Agent's spec.memory); declare it on the Agent"
                ),
            )));
        }
    }
    let policies_api = Api::<Policy>::namespaced(ctx.client.clone(), namespace);
    let mut policies = Vec::new();
    for (i, reference) in spec.evals.policy_refs.iter().enumerate() {
        let field = format!("spec.evals.policyRefs[{i}].name");
        let Some(policy) = policies_api.get_opt(&reference.name).await? else {
            return Ok(Err(Invalid::new(
                reason::REFERENCE_NOT_FOUND,
                format!(
                    "{field}: Policy {} does not exist in namespace {namespace}; create it or fix the reference",
                    reference.name
                ),
            )));
        };
        let conditions = policy
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        if !is_ready(&conditions) {
            return Ok(Err(Invalid::new(
                reason::REFERENCE_NOT_READY,
                format!(
                    "{field}: Policy {} is not Ready: {}",
                    reference.name,
                    ready_message(&conditions)
                ),
            )));
        }
        let revisions = policy.status.as_ref().and_then(|s| s.revisions.as_ref());
        let Some(promoted) = revisions::promoted_spec(ctx, namespace, revisions).await? else {
            return Ok(Err(Invalid::new(
                reason::REFERENCE_NOT_READY,
                format!(
                    "{field}: Policy {} has no promoted revision yet; see its Promoted condition",
                    reference.name
                ),
            )));
        };
        policies.push(NamedPolicy {
            name: reference.name.clone(),
            spec: promoted,
        });
    }
    let candidate = SkillCandidate {
        skill: spec.clone(),
        policies,
    };
    if let Some(problem) = suite_problem(&candidate) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    Ok(Ok(candidate))
}
