//! ContextPack, Policy and SandboxProfile: each spec gets a digest; packs and policies get an
//! immutable revision snapshot (a ControllerRevision) and, until replay-gated promotion lands,
//! the new revision is promoted directly. A Policy whose CEL does not compile, or a pack whose
//! ConfigMap source is missing or whose required sources do not fit its budget, is
//! `Ready=False` with the field to fix.

use std::sync::Arc;

use contextos_crds::{
    ContextPack, ContextPackSpec, Policy, SandboxProfile,
    common::RevisionStatus,
    conditions::{self, reason},
    labels,
};
use contextos_runner::{
    context::{self, ResolvedSource},
    policy::compile_policy,
    run::bundle::spec_digest,
};
use k8s_openapi::api::{apps::v1::ControllerRevision, core::v1::ConfigMap};
use kube::{Api, ResourceExt as _, runtime::controller::Action};
use serde_json::json;

use super::{Context, Error, Invalid, Result, apply, apply_status, now};
use crate::conditions::{Wanted, merge};

/// The ControllerRevision holding a snapshot of `kind`/`name` at `digest`.
pub fn snapshot_name(kind: &str, name: &str, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("{kind}-{name}-{}", &hex[..hex.len().min(10)])
}

async fn snapshot<K>(
    ctx: &Context,
    object: &K,
    kind: &str,
    spec: &impl serde::Serialize,
    digest: &str,
) -> Result<String>
where
    K: kube::Resource<DynamicType = ()>,
{
    let name = snapshot_name(kind, &object.name_any(), digest);
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let revision: ControllerRevision = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {labels::REVISION_OF: format!("{kind}.{}", object.name_any())},
            "annotations": {"contextos.dev/digest": digest},
            "ownerReferences": object.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
        },
        "data": {"spec": spec},
        "revision": object.meta().generation.unwrap_or(1),
    }))
    .map_err(|source| Error::Build {
        what: "ControllerRevision",
        source,
    })?;
    apply(
        &Api::<ControllerRevision>::namespaced(ctx.client.clone(), &namespace),
        &revision,
    )
    .await?;
    Ok(name)
}

fn revision_conditions(problem: Option<&Invalid>, digest: &str) -> Vec<Wanted> {
    match problem {
        Some(p) => vec![Wanted::new(conditions::READY, false, p.reason, p.message.clone())],
        None => vec![
            Wanted::new(conditions::READY, true, reason::RESOLVED, "the spec is valid"),
            Wanted::new(
                conditions::PROMOTED,
                true,
                reason::PROMOTED,
                format!("revision {digest} is in force"),
            ),
        ],
    }
}

/// Reconciles a ContextPack.
pub async fn reconcile_context_pack(pack: Arc<ContextPack>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("ContextPack");
    let namespace = pack.namespace().unwrap_or_default();
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace);
    let mut resolved = Vec::new();
    let mut problem = None;
    for (i, source) in pack.spec.sources.iter().enumerate() {
        let Some(key) = &source.config_map_ref else {
            continue;
        };
        let content = config_maps
            .get_opt(&key.name)
            .await?
            .and_then(|cm| cm.data.and_then(|d| d.get(&key.key).cloned()));
        match content {
            Some(content) => resolved.push(ResolvedSource {
                name: source.name.clone(),
                content,
            }),
            None => {
                problem = Some(Invalid::new(
                    reason::REFERENCE_NOT_FOUND,
                    format!(
                        "spec.sources[{i}].configMapRef: ConfigMap {} with key {} does not exist in namespace {namespace}; create it or fix the reference",
                        key.name, key.key
                    ),
                ));
                break;
            }
        }
    }
    if problem.is_none() {
        problem = fits(&pack.spec, &resolved);
    }
    let digest = spec_digest(&pack.spec);
    let mut revisions = RevisionStatus {
        candidate: Some(digest.clone()),
        ..pack
            .status
            .as_ref()
            .and_then(|s| s.revisions.clone())
            .unwrap_or_default()
    };
    if problem.is_none() {
        revisions.promoted_snapshot =
            Some(snapshot(&ctx, pack.as_ref(), "contextpack", &pack.spec, &digest).await?);
        revisions.promoted = Some(digest.clone());
    }
    let previous = pack
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = json!({
        "conditions": merge(&previous, &revision_conditions(problem.as_ref(), &digest), pack.metadata.generation, now()),
        "observedGeneration": pack.metadata.generation,
        "revisions": revisions,
    });
    apply_status(
        &Api::<ContextPack>::namespaced(ctx.client.clone(), &namespace),
        &pack.name_any(),
        status,
    )
    .await?;
    super::announce(
        &ctx,
        pack.as_ref(),
        &previous,
        &revision_conditions(problem.as_ref(), &digest)[0],
    )
    .await;
    Ok(Action::await_change())
}

/// Required sources must fit the budget with the instructions (an empty request stands in).
fn fits(spec: &ContextPackSpec, resolved: &[ResolvedSource]) -> Option<Invalid> {
    context::compile(spec, resolved, "", &[])
        .err()
        .map(|e| Invalid::new(reason::INVALID_SPEC, e.to_string()))
}

/// Reconciles a Policy.
pub async fn reconcile_policy(policy: Arc<Policy>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Policy");
    let namespace = policy.namespace().unwrap_or_default();
    let problem = compile_policy(&policy.name_any(), &policy.spec)
        .err()
        .map(|e| Invalid::new(reason::INVALID_EXPRESSION, e.to_string()));
    let digest = spec_digest(&policy.spec);
    let mut revisions = RevisionStatus {
        candidate: Some(digest.clone()),
        ..policy
            .status
            .as_ref()
            .and_then(|s| s.revisions.clone())
            .unwrap_or_default()
    };
    if problem.is_none() {
        revisions.promoted_snapshot =
            Some(snapshot(&ctx, policy.as_ref(), "policy", &policy.spec, &digest).await?);
        revisions.promoted = Some(digest.clone());
    }
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = json!({
        "conditions": merge(&previous, &revision_conditions(problem.as_ref(), &digest), policy.metadata.generation, now()),
        "observedGeneration": policy.metadata.generation,
        "revisions": revisions,
    });
    apply_status(
        &Api::<Policy>::namespaced(ctx.client.clone(), &namespace),
        &policy.name_any(),
        status,
    )
    .await?;
    super::announce(
        &ctx,
        policy.as_ref(),
        &previous,
        &revision_conditions(problem.as_ref(), &digest)[0],
    )
    .await;
    Ok(Action::await_change())
}

/// Reconciles a SandboxProfile: its digest, and Ready (admission already checked the spec).
pub async fn reconcile_sandbox_profile(profile: Arc<SandboxProfile>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("SandboxProfile");
    let namespace = profile.namespace().unwrap_or_default();
    let previous = profile
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = [Wanted::new(
        conditions::READY,
        true,
        reason::RESOLVED,
        "the profile is valid",
    )];
    let status = json!({
        "conditions": merge(&previous, &ready, profile.metadata.generation, now()),
        "observedGeneration": profile.metadata.generation,
        "digest": spec_digest(&profile.spec),
    });
    apply_status(
        &Api::<SandboxProfile>::namespaced(ctx.client.clone(), &namespace),
        &profile.name_any(),
        status,
    )
    .await?;
    Ok(Action::await_change())
}
