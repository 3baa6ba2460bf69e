//! Agents: every reference resolves in the same namespace and is Ready, every tool's input
//! schema and every output validator compiles. What the Agent runs — its spec with the
//! promoted revisions of its pack and policies, its *composition* — is promoted through the
//! replay gate that `agent_gate` derives, and new Sessions pin the promoted composition.
//! References can only name objects in the Agent's own namespace (they carry no namespace), so
//! one tenant can never point at another's objects.

use std::{collections::BTreeMap, sync::Arc};

use contextos_crds::{
    Agent, AgentSpec, ContextPack, Ontology, Policy, PriceList, SandboxProfile, Skill,
    agent::AgentStatus,
    common::RevisionStatus,
    conditions::{self, reason},
};
use contextos_runner::{
    gateway::{CatalogTool, adapters::adapter_problem, bundle::NamedPolicy},
    run::{
        bundle::{Composition, PackRevision, spec_digest},
        execution::execution_refused,
        gate::GatedKind,
        validate,
    },
    skills::{NamedSkill, SkillCandidate, SkillUse, ToolCeiling},
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt as _, runtime::controller::Action};

use super::{
    Context, Error, Invalid, Result, apply_status, is_ready, now, ontology, ready_message,
    revisions::{self, Gated},
};
use crate::{
    agent_gate::{self, InForce, Member, Need},
    conditions::{Wanted, merge},
};

/// What an Agent's references resolved to.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The Agent's spec with its skills' tools after its own (see
    /// `contextos_runner::skills::compose`).
    pub spec: AgentSpec,
    /// The skills it uses, at their promoted revisions.
    pub skills: Vec<SkillUse>,
    pub pack: ContextPack,
    /// In `policyRefs` order.
    pub policies: Vec<Policy>,
    /// The namespace's Ontology, when it has one.
    pub ontology: Option<Ontology>,
}

/// Reconciles an Agent: validity, then the promotion gate of its composition (what new
/// Sessions run).
pub async fn reconcile_agent(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Agent");
    let namespace = agent.namespace().unwrap_or_default();
    // Its tools' and model's Secrets are read by the gateway, at call time, in this namespace.
    crate::gateway_access::ensure(&ctx, &namespace).await?;
    // What is wrong in the spec itself is reported before anything it references.
    let outcome = match crate::gateway_access::refused_namespace(&namespace, ctx.own_namespaces())
        .map_or_else(
            || check_spec(&agent.name_any(), &agent.spec),
            |why| Err(Invalid::new(reason::INVALID_SPEC, why)),
        ) {
        Ok(()) => resolve(&ctx, &namespace, &agent.spec).await?,
        Err(invalid) => Err(invalid),
    };
    let status = agent.status.clone().unwrap_or_default();
    let previous = status.conditions.clone();
    let mut wanted = Vec::new();
    let mut requeue = None;
    let mut revisions = status.revisions.clone();
    let mut promotion_gate = status.promotion_gate.clone();
    let mut promoted_gates = status.promoted_gates.clone();
    let mut digests = (None, Vec::new());
    // With its skills' once they resolve.
    let tool_count = match &outcome {
        Ok(resolved) => resolved.spec.tools.len(),
        Err(_) => agent.spec.tools.len(),
    };
    let ready = match outcome {
        Err(p) => Wanted::new(conditions::READY, false, p.reason, p.message.clone()),
        Ok(resolved) => match composition(&ctx, &namespace, &resolved).await? {
            Err(p) => Wanted::new(conditions::READY, false, p.reason, p.message.clone()),
            Ok(candidate) => {
                let members = members(&resolved);
                digests = (
                    Some(candidate.context_pack.digest()),
                    candidate.policies.iter().map(|p| spec_digest(&p.spec)).collect(),
                );
                let promoted =
                    revisions::promoted_spec::<Composition>(&ctx, &namespace, status.revisions.as_ref())
                        .await?;
                let own = agent.spec.promotion.as_ref();
                let in_force = InForce {
                    composition: promoted.as_ref(),
                    gates: &status.promoted_gates,
                };
                let need = agent_gate::decide(&agent.name_any(), own, in_force, &candidate, &members);
                let gate = match &need {
                    Need::Replay(gate) => Some(gate),
                    Need::Direct(..) => None,
                };
                let gated = Gated {
                    kind: GatedKind::Agent,
                    promotion: gate,
                    ungated: match need {
                        Need::Direct(by, why) => (by, why),
                        Need::Replay(_) => Gated::NO_GATE,
                    },
                    first_replayed: true,
                    reviewers: status.promotion_gate.as_ref().and_then(|g| g.approvers.clone()),
                    spec_digest: spec_digest(&agent.spec),
                    revisions: status.revisions.clone().unwrap_or_default(),
                    conditions: previous.clone(),
                    // Its gate reports what its model routing would cost at these prices.
                    prices: model_price(&ctx, &agent.spec)
                        .await?
                        .map(|prices| prices.by_route())
                        .unwrap_or_default(),
                };
                let digest = candidate.digest();
                let step =
                    revisions::promotion_step(&ctx, agent.as_ref(), &candidate, &gated, &digest).await?;
                if let Some(by) = step.promoted_now {
                    promoted_gates = agent_gate::gates_after_promotion(
                        &agent.name_any(),
                        by,
                        own,
                        &status.promoted_gates,
                        &members,
                    );
                }
                promotion_gate = Some(agent_gate::gate_status(own, &promoted_gates, &members));
                revisions = Some(step.revisions);
                requeue = step.requeue;
                wanted.extend(step.wanted);
                Wanted::new(
                    conditions::READY,
                    true,
                    reason::RESOLVED,
                    "every reference resolved and the spec is valid",
                )
            }
        },
    };
    wanted.insert(0, ready.clone());
    let status = AgentStatus {
        conditions: merge(&previous, &wanted, agent.metadata.generation, now()),
        observed_generation: agent.metadata.generation,
        tool_count: Some(u32::try_from(tool_count).unwrap_or(u32::MAX)),
        context_pack_digest: digests.0,
        policy_digests: digests.1,
        revisions,
        promotion_gate,
        promoted_gates,
    };
    let status = serde_json::to_value(&status).map_err(|source| Error::Build {
        what: "Agent status",
        source,
    })?;
    apply_status(
        &Api::<Agent>::namespaced(ctx.client.clone(), &namespace),
        agent.as_ref(),
        status,
    )
    .await?;
    super::announce(&ctx, agent.as_ref(), &previous, &ready).await;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// The composition an Agent named `agent` would run with `spec` — its spec checked and its
/// references resolved as for the Agent itself (a Proposal's candidate) — and the replay it
/// must pass: the Agent's effective gate with `gates_in_force` (its `status.promotedGates`).
pub async fn candidate_composition(
    ctx: &Context,
    namespace: &str,
    agent: &str,
    spec: &AgentSpec,
    gates_in_force: &[contextos_crds::agent::MemberGate],
) -> Result<Result<(Composition, contextos_crds::common::PromotionSpec), Invalid>> {
    if let Err(invalid) = check_spec(agent, spec) {
        return Ok(Err(invalid));
    }
    let resolved = match resolve(ctx, namespace, spec).await? {
        Ok(resolved) => resolved,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let gate = agent_gate::replay_gate(
        agent,
        spec.promotion.as_ref(),
        gates_in_force,
        &members(&resolved),
    );
    Ok(composition(ctx, namespace, &resolved)
        .await?
        .map(|composition| (composition, gate)))
}

/// The objects the composition uses, as the gate decision sees them.
fn members(resolved: &Resolved) -> Vec<Member<'_>> {
    let pack = &resolved.pack;
    std::iter::once(member(
        GatedKind::ContextPack,
        &pack.metadata,
        pack.status.as_ref().and_then(|s| s.revisions.as_ref()),
        pack.spec.promotion.as_ref(),
    ))
    .chain(resolved.policies.iter().map(|p| {
        member(
            GatedKind::Policy,
            &p.metadata,
            p.status.as_ref().and_then(|s| s.revisions.as_ref()),
            p.spec.promotion.as_ref(),
        )
    }))
    .collect()
}

fn member<'a>(
    kind: GatedKind,
    meta: &'a kube::api::ObjectMeta,
    revisions: Option<&'a RevisionStatus>,
    promotion: Option<&'a contextos_crds::common::PromotionSpec>,
) -> Member<'a> {
    Member {
        kind,
        name: meta.name.as_deref().unwrap_or_default(),
        digest: revisions.and_then(|r| r.promoted.as_deref()).unwrap_or_default(),
        promotion,
        promoted_by: revisions.and_then(|r| r.promoted_by),
        promoted_from: revisions.and_then(|r| r.promoted_from.as_deref()),
    }
}

/// The candidate composition: the Agent's spec with the promoted revisions of what it uses
/// (`Ok(Err(..))` names one without a promoted revision).
async fn composition(
    ctx: &Context,
    namespace: &str,
    resolved: &Resolved,
) -> Result<Result<Composition, Invalid>> {
    let spec = &resolved.spec;
    let not_promoted = |field: &str, kind: &str, name: &str| {
        Invalid::new(
            reason::REFERENCE_NOT_READY,
            format!("{field}: {kind} {name} has no promoted revision yet; see its Promoted condition"),
        )
    };
    let pack_name = resolved.pack.name_any();
    let pack_revisions = resolved.pack.status.as_ref().and_then(|s| s.revisions.as_ref());
    let Some(pack) = revisions::promoted_spec::<PackRevision>(ctx, namespace, pack_revisions).await? else {
        return Ok(Err(not_promoted(
            "spec.contextPackRef.name",
            "ContextPack",
            &pack_name,
        )));
    };
    // The revision the Agent runs, not the one being edited, must recall only declared types
    // (`resolve` refused an Ontology that does not compile).
    let ontology = resolved
        .ontology
        .as_ref()
        .and_then(|o| contextos_runner::ontology::Ontology::compile(&o.spec).ok())
        .unwrap_or_default();
    let pack = pack.named(pack_name.clone());
    if let Some(problem) = ontology.sources_problem(&pack.spec) {
        return Ok(Err(Invalid::new(
            reason::INVALID_SPEC,
            format!("spec.contextPackRef.name: ContextPack {pack_name} (its promoted revision): {problem}"),
        )));
    }
    let mut policies = Vec::new();
    for (i, policy) in resolved.policies.iter().enumerate() {
        let name = policy.name_any();
        let revisions = policy.status.as_ref().and_then(|s| s.revisions.as_ref());
        let Some(spec) = revisions::promoted_spec(ctx, namespace, revisions).await? else {
            return Ok(Err(not_promoted(
                &format!("spec.policyRefs[{i}].name"),
                "Policy",
                &name,
            )));
        };
        policies.push(NamedPolicy { name, spec });
    }
    // Against the Policies' promoted revisions, which its runs get, not the Policies as edited:
    // a rule an unpromoted revision adds or drops changes nothing for a run yet.
    if let Some(problem) = contextos_runner::policy::decide::unapprovable(spec, spec.safety_mode, &policies) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    if let Some(clash) = contextos_runner::skills::fragment_clash(&pack_name, &pack.spec, &resolved.skills) {
        return Ok(Err(Invalid::new(clash.reason, clash.to_string())));
    }
    // The skills' required fragments must fit the pack's budget with its required sources.
    if !resolved.skills.is_empty() {
        let with_fragments = contextos_runner::skills::pack_with_fragments(&pack.spec, &resolved.skills);
        if let Some(problem) = revisions::revision_problem(&with_fragments, &pack.contents) {
            return Ok(Err(Invalid::new(
                reason::SKILL_CONFLICT,
                format!(
                    "spec.skillRefs: with its skills' prompt fragments, ContextPack {pack_name} (its promoted revision): {}",
                    problem.message
                ),
            )));
        }
    }
    let (model_script, routed_scripts) = match model_scripts(ctx, namespace, spec).await? {
        Ok(scripts) => scripts,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let composition = Composition::new(spec, pack, policies)
        .with_ontology(resolved.ontology.as_ref().map(|o| o.spec.clone()))
        .with_skills(resolved.skills.clone())
        .with_scripts(model_script, routed_scripts);
    Ok(match too_large(&composition) {
        Some(problem) => Err(problem),
        None => Ok(composition),
    })
}

/// Why `composition` is too large to be kept whole, if it is (pure).
fn too_large(composition: &Composition) -> Option<Invalid> {
    let size = serde_json::to_vec(composition).map_or(usize::MAX, |json| json.len());
    (size > MAX_COMPOSITION_BYTES).then(|| {
        Invalid::new(
            reason::INVALID_SPEC,
            format!(
                "spec: what the Agent runs (its spec, its skills, its pack's revision with the contents of its ConfigMap sources, its model scripts) takes {} KiB, more than the {} KiB a revision may; shorten the model scripts or the pack's sources",
                size / 1024,
                MAX_COMPOSITION_BYTES / 1024
            ),
        )
    })
}

/// At most this many bytes of an Agent's composition (as JSON): it is kept whole in its revision
/// snapshot, in a replay Job's candidate ConfigMap and in each Session's bundle ConfigMap, which
/// holds at most 1 MiB with the Session's own spec beside it.
pub const MAX_COMPOSITION_BYTES: usize = 768 * 1024;

/// The scripts `spec`'s models name by `scriptRef` (its own, and each one `spec.routing`
/// names, by routing name), read now from their ConfigMaps: a composition holds them, so an
/// edit to one is a candidate for the Agent's gate, never what a new Session reads unpromoted.
/// `Ok(Err(..))` names a script that is missing.
async fn model_scripts(
    ctx: &Context,
    namespace: &str,
    spec: &AgentSpec,
) -> Result<Result<(Option<String>, BTreeMap<String, String>), Invalid>> {
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace);
    let read = async |field: String,
                      key: &contextos_crds::common::KeyRef|
           -> Result<Result<String, Invalid>> {
        let script = config_maps
            .get_opt(&key.name)
            .await?
            .and_then(|cm| cm.data)
            .and_then(|mut d| d.remove(&key.key));
        Ok(script.ok_or_else(|| {
            Invalid::new(
                reason::REFERENCE_NOT_FOUND,
                format!(
                    "{field}: ConfigMap {} with key {} does not exist in namespace {namespace}; create it or fix the reference",
                    key.name, key.key
                ),
            )
        }))
    };
    let model_script = match &spec.model.script_ref {
        Some(key) => match read("spec.model.scriptRef".into(), key).await? {
            Ok(script) => Some(script),
            Err(invalid) => return Ok(Err(invalid)),
        },
        None => None,
    };
    let mut routed = BTreeMap::new();
    for (i, model) in spec.routing.iter().flat_map(|r| r.models.iter().enumerate()) {
        let Some(key) = &model.model.script_ref else {
            continue;
        };
        match read(format!("spec.routing.models[{i}].model.scriptRef"), key).await? {
            Ok(script) => {
                routed.insert(model.name.clone(), script);
            }
            Err(invalid) => return Ok(Err(invalid)),
        }
    }
    Ok(Ok((model_script, routed)))
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
    let pack_conditions = pack
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if !is_ready(&pack_conditions) {
        return Ok(Err(not_ready(
            "spec.contextPackRef.name",
            "ContextPack",
            pack_name,
            &pack_conditions,
        )));
    }
    let policies = Api::<Policy>::namespaced(ctx.client.clone(), namespace);
    let mut used = Vec::new();
    for (i, reference) in spec.policy_refs.iter().enumerate() {
        let field = format!("spec.policyRefs[{i}].name");
        let Some(policy) = policies.get_opt(&reference.name).await? else {
            return Ok(Err(missing(&field, "Policy", &reference.name, namespace)));
        };
        let conditions = policy
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        if !is_ready(&conditions) {
            return Ok(Err(not_ready(&field, "Policy", &reference.name, &conditions)));
        }
        used.push(policy);
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
    let (skills, spec) = match compose_skills(ctx, namespace, spec, sandbox_name, &sandbox.spec).await? {
        Ok(composed) => composed,
        Err(invalid) => return Ok(Err(invalid)),
    };
    if let Err(invalid) = check_spec("", &spec) {
        return Ok(Err(invalid));
    }
    if let Some(problem) = execution_refused(&spec.tools, &sandbox.spec.execution, sandbox_name) {
        return Ok(Err(Invalid::new(reason::EXECUTION_NOT_ALLOWED, problem)));
    }
    let (ontology, compiled) = match namespace_ontology(ctx, namespace).await? {
        Ok(found) => found,
        Err(invalid) => return Ok(Err(invalid)),
    };
    if let Some(problem) = compiled.touches_problem(&spec.tools) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    if let Err(invalid) = model_price(ctx, &spec).await? {
        return Ok(Err(invalid));
    }
    Ok(Ok(Resolved {
        spec,
        skills,
        pack,
        policies: used,
        ontology,
    }))
}

/// The promoted revisions of the skills `spec` lists, and `spec` with their tools, or the
/// first skill missing, not promoted, or in conflict (see `contextos_runner::skills::compose`).
async fn compose_skills(
    ctx: &Context,
    namespace: &str,
    spec: &AgentSpec,
    sandbox_name: &str,
    sandbox: &contextos_crds::SandboxProfileSpec,
) -> Result<Result<(Vec<SkillUse>, AgentSpec), Invalid>> {
    let api = Api::<Skill>::namespaced(ctx.client.clone(), namespace);
    let mut skills = Vec::with_capacity(spec.skill_refs.len());
    for (i, reference) in spec.skill_refs.iter().enumerate() {
        let field = format!("spec.skillRefs[{i}].name");
        let Some(skill) = api.get_opt(&reference.name).await? else {
            return Ok(Err(missing(&field, "Skill", &reference.name, namespace)));
        };
        // The revision in force, whatever candidate waits on its suite.
        let revisions = skill.status.as_ref().and_then(|s| s.revisions.as_ref());
        let Some(promoted) = revisions::promoted_spec::<SkillCandidate>(ctx, namespace, revisions).await?
        else {
            return Ok(Err(Invalid::new(
                reason::REFERENCE_NOT_READY,
                format!(
                    "{field}: Skill {} has no promoted revision yet (a revision is promoted when its evaluation suite passes); see its Promoted and EvalsPassed conditions",
                    reference.name
                ),
            )));
        };
        // What the Agent runs is the skill's spec: a new candidate that differs only in the
        // suite's Policies changes nothing the Agent runs.
        skills.push(NamedSkill {
            name: reference.name.clone(),
            digest: spec_digest(&promoted.skill),
            spec: promoted.skill,
        });
    }
    let ceiling = ToolCeiling {
        profile: sandbox_name,
        max_risk: sandbox.max_tool_risk,
    };
    Ok(match contextos_runner::skills::compose(spec, &skills, ceiling) {
        Ok((tools, uses)) => Ok((
            uses,
            AgentSpec {
                tools,
                ..spec.clone()
            },
        )),
        Err(conflict) => Err(Invalid::new(conflict.reason, conflict.to_string())),
    })
}

/// The namespace's Ontology (none: it declares no entity types) and its compiled types, or why
/// Agents cannot use it yet: not Ready, or not compiling (checked here too: a status written
/// before a change says nothing of it).
async fn namespace_ontology(
    ctx: &Context,
    namespace: &str,
) -> Result<Result<(Option<Ontology>, contextos_runner::ontology::Ontology), Invalid>> {
    let Some(found) = Api::<Ontology>::namespaced(ctx.client.clone(), namespace)
        .get_opt(ontology::NAME)
        .await?
    else {
        return Ok(Ok((None, contextos_runner::ontology::Ontology::default())));
    };
    let conditions = found
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    Ok(match contextos_runner::ontology::Ontology::compile(&found.spec) {
        Ok(compiled) if is_ready(&conditions) => Ok((Some(found), compiled)),
        Ok(_) => Err(not_ready(
            "the namespace's entity types",
            "Ontology",
            ontology::NAME,
            &conditions,
        )),
        Err(e) => Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            format!("the namespace's entity types: Ontology {}: {e}", ontology::NAME),
        )),
    })
}

/// Every adapter must be declared so it can be governed (see `adapter_problem`), and tool schemas and output validators must
/// compile (pure). Whether a tool may execute code is the SandboxProfile's to say (see
/// `resolve`): such tools run in capability pods.
pub fn check_spec(agent: &str, spec: &AgentSpec) -> Result<(), Invalid> {
    if let Some(problem) = contextos_crds::free_form::agent_problem(spec) {
        return Err(Invalid::new(reason::INVALID_SPEC, problem));
    }
    if let Some(problem) = adapter_problem(&spec.tools) {
        return Err(Invalid::new(reason::INVALID_SPEC, problem));
    }
    if let Some(problem) = contextos_runner::memory::desk::memory_problem(spec) {
        return Err(Invalid::new(reason::INVALID_SPEC, problem));
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

/// The prices of the Agent's models and paid tools in the cluster's PriceLists (no model price:
/// the cluster prices no models, or a scripted model none prices), or why they cannot be had.
pub async fn model_price(ctx: &Context, spec: &AgentSpec) -> Result<Result<ModelPrices, Invalid>> {
    let listed = match Api::<PriceList>::all(ctx.client.clone())
        .list(&Default::default())
        .await
    {
        Ok(listed) => listed.items,
        // The PriceList CRD is not installed (an operator upgraded before its CRDs): the
        // cluster prices nothing yet.
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let lists: Vec<_> = listed
        .into_iter()
        .map(|list| (list.name_any(), list.spec))
        .collect();
    Ok(prices_of(&lists, spec))
}

/// The prices of an Agent's models (its own, and those its routing names) and of its paid
/// tools, pinned by a run.
#[derive(Clone, Debug, Default)]
pub struct ModelPrices {
    pub primary: Option<contextos_runner::pricing::PinnedPrice>,
    /// By routing name.
    pub routed: std::collections::BTreeMap<String, contextos_runner::pricing::PinnedPrice>,
    /// The per-call prices of its paid tools, by tool name.
    pub tools: std::collections::BTreeMap<String, contextos_runner::pricing::PinnedToolPrice>,
}

impl ModelPrices {
    /// The model prices by routing name (`primary` for the Agent's own model).
    pub fn by_route(&self) -> std::collections::BTreeMap<String, contextos_runner::pricing::PinnedPrice> {
        let mut prices = self.routed.clone();
        if let Some(primary) = &self.primary {
            prices.insert(contextos_crds::model_routing::PRIMARY.to_owned(), primary.clone());
        }
        prices
    }
}

/// The prices of `spec`'s models and tools in `lists`, or the model none (or two) price, or the
/// tool two price alike (pure).
fn prices_of(
    lists: &[(String, contextos_crds::PriceListSpec)],
    spec: &AgentSpec,
) -> Result<ModelPrices, Invalid> {
    let price = |model, field: &str| {
        contextos_runner::pricing::price_for(lists, model)
            .map_err(|e| Invalid::new(reason::PRICE_MISSING, format!("{field}: {e}")))
    };
    let mut prices = ModelPrices {
        primary: price(&spec.model, "spec.model")?,
        routed: Default::default(),
        tools: contextos_runner::pricing::tool_prices(lists, &spec.tools)
            .map_err(|e| Invalid::new(reason::PRICE_MISSING, format!("spec.tools: {e}")))?,
    };
    for (i, routed) in spec.routing.iter().flat_map(|r| r.models.iter().enumerate()) {
        if let Some(p) = price(&routed.model, &format!("spec.routing.models[{i}].model"))? {
            prices.routed.insert(routed.name.clone(), p);
        }
    }
    Ok(prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A composition is kept whole in objects of 1 MiB at most: one whose model script alone is
    /// larger is refused, naming what to shorten, instead of every Session failing to start.
    #[test]
    fn a_composition_too_large_to_keep_is_refused() {
        let bundle = crate::fixtures::run_bundle(&crate::fixtures::session());
        let composition = Composition::new(&bundle.agent_spec, bundle.context_pack.clone(), Vec::new());
        assert!(too_large(&composition).is_none());
        let large = composition.with_scripts(Some("\"".repeat(MAX_COMPOSITION_BYTES / 2)), BTreeMap::new());
        let problem = too_large(&large).expect("refused");
        assert!(
            problem.message.contains("shorten the model scripts"),
            "{}",
            problem.message
        );
    }
}
