//! Agents: every reference resolves in the same namespace and is Ready, every tool's input
//! schema and every output validator compiles; the status shows the revisions the agent runs
//! under. References can only name objects in the Agent's own namespace (they carry no
//! namespace), so one tenant can never point at another's objects.

use std::sync::Arc;

use contextos_crds::{
    Agent, AgentSpec, ContextPack, Policy, SandboxProfile,
    conditions::{self, reason},
};
use contextos_runner::{
    gateway::{CatalogTool, adapters::unavailable_adapter},
    run::{
        execution::{executes_code, execution_refused},
        validate,
    },
};
use kube::{Api, ResourceExt as _, runtime::controller::Action};
use serde_json::json;

use super::{Context, Invalid, Result, apply_status, is_ready, now, ready_message};
use crate::conditions::{Wanted, merge};

/// What an Agent resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub context_pack_digest: Option<String>,
    pub policy_digests: Vec<String>,
}

/// Reconciles an Agent.
pub async fn reconcile_agent(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Agent");
    let namespace = agent.namespace().unwrap_or_default();
    // What is wrong in the spec itself is reported before anything it references.
    let outcome = match check_spec(&agent.name_any(), &agent.spec) {
        Ok(()) => resolve(&ctx, &namespace, &agent.spec).await?,
        Err(invalid) => Err(invalid),
    };
    let (ready, resolved) = match &outcome {
        Ok(resolved) => (
            Wanted::new(
                conditions::READY,
                true,
                reason::RESOLVED,
                "every reference resolved and the spec is valid",
            ),
            resolved.clone(),
        ),
        Err(p) => (
            Wanted::new(conditions::READY, false, p.reason, p.message.clone()),
            Resolved::default(),
        ),
    };
    let previous = agent
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = json!({
        "conditions": merge(&previous, std::slice::from_ref(&ready), agent.metadata.generation, now()),
        "observedGeneration": agent.metadata.generation,
        "toolCount": agent.spec.tools.len(),
        "contextPackDigest": resolved.context_pack_digest,
        "policyDigests": resolved.policy_digests,
    });
    apply_status(
        &Api::<Agent>::namespaced(ctx.client.clone(), &namespace),
        &agent.name_any(),
        status,
    )
    .await?;
    super::announce(&ctx, agent.as_ref(), &previous, &ready).await;
    Ok(Action::await_change())
}

/// Fetches what the Agent references; `Ok(Err(..))` names the first reference that is missing
/// or not Ready.
pub async fn resolve(ctx: &Context, namespace: &str, spec: &AgentSpec) -> Result<Result<Resolved, Invalid>> {
    let packs = Api::<ContextPack>::namespaced(ctx.client.clone(), namespace);
    let pack_name = &spec.context_pack_ref.name;
    let Some(pack) = packs.get_opt(pack_name).await? else {
        return Ok(Err(missing(
            "spec.contextPackRef.name",
            "ContextPack",
            pack_name,
            namespace,
        )));
    };
    let pack_status = pack.status.clone().unwrap_or_default();
    if !is_ready(&pack_status.conditions) {
        return Ok(Err(not_ready(
            "spec.contextPackRef.name",
            "ContextPack",
            pack_name,
            &pack_status.conditions,
        )));
    }
    let policies = Api::<Policy>::namespaced(ctx.client.clone(), namespace);
    let mut policy_digests = Vec::new();
    for (i, reference) in spec.policy_refs.iter().enumerate() {
        let field = format!("spec.policyRefs[{i}].name");
        let Some(policy) = policies.get_opt(&reference.name).await? else {
            return Ok(Err(missing(&field, "Policy", &reference.name, namespace)));
        };
        let status = policy.status.clone().unwrap_or_default();
        if !is_ready(&status.conditions) {
            return Ok(Err(not_ready(
                &field,
                "Policy",
                &reference.name,
                &status.conditions,
            )));
        }
        policy_digests.push(status.revisions.and_then(|r| r.promoted).unwrap_or_default());
    }
    let sandboxes = Api::<SandboxProfile>::namespaced(ctx.client.clone(), namespace);
    let sandbox_name = &spec.sandbox_profile_ref.name;
    let Some(sandbox) = sandboxes.get_opt(sandbox_name).await? else {
        return Ok(Err(missing(
            "spec.sandboxProfileRef.name",
            "SandboxProfile",
            sandbox_name,
            namespace,
        )));
    };
    let sandbox_conditions = sandbox.status.map(|s| s.conditions).unwrap_or_default();
    if !is_ready(&sandbox_conditions) {
        return Ok(Err(not_ready(
            "spec.sandboxProfileRef.name",
            "SandboxProfile",
            sandbox_name,
            &sandbox_conditions,
        )));
    }
    if let Some(problem) = execution_refused(&spec.tools, &sandbox.spec.execution, sandbox_name) {
        return Ok(Err(Invalid::new(reason::EXECUTION_NOT_ALLOWED, problem)));
    }
    Ok(Ok(Resolved {
        context_pack_digest: pack_status.revisions.and_then(|r| r.promoted),
        policy_digests,
    }))
}

/// Tool schemas and output validators must compile, and no tool may need a capability sandbox
/// (pure).
pub fn check_spec(agent: &str, spec: &AgentSpec) -> Result<(), Invalid> {
    if let Some(problem) = unavailable_adapter(&spec.tools) {
        return Err(Invalid::new(reason::ADAPTER_UNAVAILABLE, problem));
    }
    // Code-executing tools run in capability sandboxes, which this operator does not create
    // yet; running them anywhere else (the gateway, the runner) would hand them credentials.
    if let Some((i, tool)) = spec.tools.iter().enumerate().find(|(_, t)| executes_code(t)) {
        return Err(Invalid::new(
            reason::CAPABILITY_SANDBOX_UNAVAILABLE,
            format!(
                "spec.tools[{i}] ({}): MCP servers started from a command (adapter.mcp.command) need a capability sandbox, which this cluster does not run yet; serve the MCP server over streamable HTTP (adapter.mcp.url) instead",
                tool.name
            ),
        ));
    }
    for (i, tool) in spec.tools.iter().enumerate() {
        CatalogTool::new(tool.clone())
            .map_err(|e| Invalid::new(reason::INVALID_SPEC, format!("spec.tools[{i}].inputSchema: {e}")))?;
    }
    validate::compile(agent, &spec.validators)
        .map_err(|e| Invalid::new(reason::INVALID_EXPRESSION, e.to_string()))?;
    Ok(())
}

fn missing(field: &str, kind: &str, name: &str, namespace: &str) -> Invalid {
    Invalid::new(
        reason::REFERENCE_NOT_FOUND,
        format!(
            "{field}: {kind} {name} does not exist in namespace {namespace}; create it or fix the reference"
        ),
    )
}

fn not_ready(
    field: &str,
    kind: &str,
    name: &str,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Invalid {
    Invalid::new(
        reason::REFERENCE_NOT_READY,
        format!(
            "{field}: {kind} {name} is not Ready: {}",
            ready_message(conditions)
        ),
    )
}
