//! The ContextOS operator: controllers for Agents, ContextPacks, Ontologies, Policies,
//! SandboxProfiles and Sessions. It resolves and validates what users apply (a `Ready` condition that names the
//! field and the fix), snapshots revisions, and runs each Session in sandboxed runner pods.

pub mod agent_gate;
pub mod capability_pods;
pub mod conditions;
pub mod controllers;
pub mod crash;
#[cfg(test)]
mod fixtures;
pub mod gateway_access;
pub mod leader;
pub mod metrics;
pub mod pod_parts;
pub mod pod_turns;
pub mod replay_job;
pub mod sandbox_values;
pub mod session_children;
pub mod tenant_keys;

use std::sync::Arc;

use contextos_crds::{
    Agent, ContextPack, Ontology, Policy, PriceList, Proposal, SandboxProfile, Session, Skill, SpendQuota,
    proposal::TargetKind,
};
use contextos_runner::key_secrets;
use futures::StreamExt as _;
use k8s_openapi::api::{batch::v1::Job, core::v1::ConfigMap};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt as _,
        reflector::{self, ObjectRef},
        watcher,
    },
};

use crate::{
    controllers::{Context, agent, error_policy, ontology, proposal, revisions, session, skill, spend_quota},
    metrics::Metrics,
    session_children::RunnerSettings,
};

/// How the operator is set up.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespace of the operator's own objects (the signing-key Secret).
    pub namespace: String,
    pub runner: RunnerSettings,
    pub max_crash_attempts: u32,
    /// Objects reconciled at once per kind.
    pub concurrency: u16,
    /// Image of replay Jobs (the runner image).
    pub replay_image: String,
    /// Only ContextOS objects matching this label selector are reconciled (for running several
    /// operators side by side, e.g. in tests); `None`: all.
    pub selector: Option<String>,
}

/// Runs every controller until `shutdown` turns true (in-flight reconciles finish first).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let shutdown = move || {
        let mut rx = shutdown.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let key = key_secrets::ensure_key(&client, &config.namespace, key_secrets::RUN_CONTEXT_KEY).await?;
    // The gateway service verifies RunContexts with the public half.
    key_secrets::publish_run_context_key(&client, &config.namespace, &key).await?;
    // Where the gateway publishes the certifier of tenants' record keys (see `tenant_keys`).
    key_secrets::make_gateway_keys_config_map(&client, &config.namespace).await?;
    let reporter = kube::runtime::events::Reporter {
        controller: "contextos-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        key,
        runner: config.runner.clone(),
        max_crash_attempts: config.max_crash_attempts,
        metrics,
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
        replay_image: config.replay_image.clone(),
        namespace: config.namespace.clone(),
        tenant_keys: Arc::new(tenant_keys::TenantKeys::published_in(config.namespace.clone())),
        start_locks: Default::default(),
        runner_policies: Default::default(),
        retries: Default::default(),
    });
    let selector = config.selector.clone();
    let watch = move || match &selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let controller_config = kube::runtime::controller::Config::default().concurrency(config.concurrency);

    let packs = lean_controller(Api::<ContextPack>::all(client.clone()), watch());
    let pack_store = packs.store();
    let packs = packs
        .with_config(controller_config.clone())
        // Every ConfigMap in the cluster may be a pack's source: watch their metadata only (the
        // content is read when a pack is reconciled), so memory does not grow with their data.
        .watches(
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            watch(),
            move |cm: PartialObjectMeta<ConfigMap>| {
                let (namespace, name) = (cm.namespace(), cm.name_any());
                pack_store
                    .state()
                    .into_iter()
                    .filter(|p| p.namespace() == namespace)
                    .filter(|p| {
                        p.spec
                            .sources
                            .iter()
                            .any(|s| s.config_map_ref.as_ref().is_some_and(|r| r.name == name))
                    })
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .owns(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().labels(contextos_crds::labels::REVISION_OF),
        )
        .watches(Api::<Proposal>::all(client.clone()), watch(), |p: Proposal| {
            proposal_target::<ContextPack>(&p, TargetKind::ContextPack)
        })
        .graceful_shutdown_on(shutdown())
        .run(
            timed("ContextPack", revisions::reconcile_context_pack),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let policies = lean_controller(Api::<Policy>::all(client.clone()), watch())
        .with_config(controller_config.clone())
        .owns(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().labels(contextos_crds::labels::REVISION_OF),
        )
        .watches(Api::<Proposal>::all(client.clone()), watch(), |p: Proposal| {
            proposal_target::<Policy>(&p, TargetKind::Policy)
        })
        .graceful_shutdown_on(shutdown())
        .run(
            timed("Policy", revisions::reconcile_policy),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    // A Skill is evaluated again when a Policy its suite runs under is promoted.
    let skills = lean_controller(Api::<Skill>::all(client.clone()), watch());
    let skills_by_policy = skills.store();
    let skills = skills
        .with_config(controller_config.clone())
        .owns(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().labels(contextos_crds::labels::REVISION_OF),
        )
        .watches(Api::<Policy>::all(client.clone()), watch(), move |p: Policy| {
            let namespace = p.namespace();
            skills_by_policy
                .state()
                .into_iter()
                .filter(|s| s.namespace() == namespace)
                .filter(|s| s.spec.evals.policy_refs.iter().any(|r| r.name == p.name_any()))
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown())
        .run(timed("Skill", skill::reconcile_skill), error_policy, ctx.clone())
        .for_each(|_| async {});

    let profiles = lean_controller(Api::<SandboxProfile>::all(client.clone()), watch())
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown())
        .run(
            timed("SandboxProfile", revisions::reconcile_sandbox_profile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let ontologies = lean_controller(Api::<Ontology>::all(client.clone()), watch())
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown())
        .run(
            timed("Ontology", ontology::reconcile_ontology),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let agents = lean_controller(Api::<Agent>::all(client.clone()), watch());
    let (by_pack, by_policy, by_profile, by_ontology, by_price, by_skill, by_script) = (
        agents.store(),
        agents.store(),
        agents.store(),
        agents.store(),
        agents.store(),
        agents.store(),
        agents.store(),
    );
    let agents = agents
        .with_config(controller_config.clone())
        .watches(
            Api::<ContextPack>::all(client.clone()),
            watch(),
            move |p: ContextPack| {
                referring_agents(&by_pack, &p, |a| a.spec.context_pack_ref.name == p.name_any())
            },
        )
        .watches(Api::<Policy>::all(client.clone()), watch(), move |p: Policy| {
            referring_agents(&by_policy, &p, |a| {
                a.spec.policy_refs.iter().any(|r| r.name == p.name_any())
            })
        })
        .watches(Api::<Skill>::all(client.clone()), watch(), move |s: Skill| {
            referring_agents(&by_skill, &s, |a| {
                a.spec.skill_refs.iter().any(|r| r.name == s.name_any())
            })
        })
        .watches(
            Api::<SandboxProfile>::all(client.clone()),
            watch(),
            move |p: SandboxProfile| {
                referring_agents(&by_profile, &p, |a| {
                    a.spec.sandbox_profile_ref.name == p.name_any()
                })
            },
        )
        // A model script is part of the composition: its ConfigMap's change is a candidate.
        .watches(
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            watch(),
            move |cm: PartialObjectMeta<ConfigMap>| {
                let name = cm.name_any();
                referring_agents(&by_script, &cm, |a| {
                    std::iter::once(&a.spec.model)
                        .chain(
                            a.spec
                                .routing
                                .iter()
                                .flat_map(|r| r.models.iter().map(|m| &m.model)),
                        )
                        .any(|m| m.script_ref.as_ref().is_some_and(|r| r.name == name))
                })
            },
        )
        // Every Agent of a namespace pins its Ontology.
        .watches(
            Api::<Ontology>::all(client.clone()),
            watch(),
            move |o: Ontology| referring_agents(&by_ontology, &o, |_| true),
        )
        // Prices are the cluster's: a PriceList's change is every Agent's to check.
        .watches(
            Api::<PriceList>::all(client.clone()),
            watch(),
            move |_: PriceList| {
                by_price
                    .state()
                    .into_iter()
                    .map(|a| ObjectRef::from_obj(a.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .owns(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().labels(contextos_crds::labels::REVISION_OF),
        )
        .watches(Api::<Proposal>::all(client.clone()), watch(), |p: Proposal| {
            proposal_target::<Agent>(&p, TargetKind::Agent)
        })
        .graceful_shutdown_on(shutdown())
        .run(timed("Agent", agent::reconcile_agent), error_policy, ctx.clone())
        .for_each(|_| async {});

    // A proposal follows its target: a change makes it stale, a promotion promotes it.
    let proposals = lean_controller(Api::<Proposal>::all(client.clone()), watch());
    let (for_policy, for_pack, for_agent) = (proposals.store(), proposals.store(), proposals.store());
    let proposals = proposals
        .with_config(controller_config.clone())
        .owns(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().labels(contextos_crds::labels::REVISION_OF),
        )
        .watches(Api::<Policy>::all(client.clone()), watch(), move |o: Policy| {
            proposals_for(&for_policy, &o, TargetKind::Policy)
        })
        .watches(
            Api::<ContextPack>::all(client.clone()),
            watch(),
            move |o: ContextPack| proposals_for(&for_pack, &o, TargetKind::ContextPack),
        )
        .watches(Api::<Agent>::all(client.clone()), watch(), move |o: Agent| {
            proposals_for(&for_agent, &o, TargetKind::Agent)
        })
        .graceful_shutdown_on(shutdown())
        .run(
            timed("Proposal", proposal::reconcile_proposal),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let sessions = lean_controller(Api::<Session>::all(client.clone()), watch());
    let session_store = sessions.store();
    let sessions = sessions
        .with_config(controller_config.clone())
        // Runner and capability pods, heard of only when what a Session waits on changes.
        .owns_stream(pod_turns::turns(&client, contextos_crds::labels::SESSION))
        .watches(Api::<Agent>::all(client.clone()), watch(), move |a: Agent| {
            let (namespace, name) = (a.namespace(), a.name_any());
            session_store
                .state()
                .into_iter()
                .filter(|s| s.namespace() == namespace && s.spec.agent_ref.name == name)
                .filter(|s| {
                    !s.status
                        .as_ref()
                        .and_then(|st| st.phase)
                        .is_some_and(|p| p.is_terminal())
                })
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown())
        .run(
            timed("Session", session::reconcile_session),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    // Quotas count the Sessions they limit (starts are decided in the Session controller).
    let quotas = lean_controller(Api::<SpendQuota>::all(client.clone()), watch())
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown())
        .run(
            timed("SpendQuota", spend_quota::reconcile_spend_quota),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    // The gateway stops reading a namespace's Secrets once its last Agent is gone.
    let bindings = async {
        if config.runner.gateway_account.is_empty() {
            return;
        }
        crate::gateway_access::controller(&client)
            .with_config(controller_config.clone())
            .graceful_shutdown_on(shutdown())
            .run(
                timed("RoleBinding", crate::gateway_access::reconcile_binding),
                error_policy,
                ctx.clone(),
            )
            .for_each(|_| async {})
            .await;
    };

    futures::join!(
        packs, policies, skills, profiles, ontologies, agents, proposals, sessions, quotas, bindings
    );
    Ok(())
}

/// A controller for `K`, as `Controller::new` makes it, whose cache keeps each object without
/// its `metadata.managedFields`. Nothing here reads them, and for the small objects users apply
/// server-side they are most of what an object takes in memory: with ≈ 1,000 objects cached
/// (`make kind-bench`) the operator's RSS fell from 76.7 to 56.3 MiB without them.
fn lean_controller<K>(api: Api<K>, wc: watcher::Config) -> Controller<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let writer = reflector::store::Writer::<K>::default();
    let reader = writer.as_reader();
    let objects = watcher(api, wc)
        .modify(|object| object.meta_mut().managed_fields = None)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, reader)
}

/// The target of a proposal, when it is of kind `K`.
fn proposal_target<K>(proposal: &Proposal, kind: TargetKind) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    (proposal.spec.target.kind == kind).then(|| {
        let target = ObjectRef::new(&proposal.spec.target.name);
        match proposal.namespace() {
            Some(namespace) => target.within(&namespace),
            None => target,
        }
    })
}

/// The proposals in `object`'s namespace that target it.
fn proposals_for<K: kube::Resource>(
    store: &kube::runtime::reflector::Store<Proposal>,
    object: &K,
    kind: TargetKind,
) -> Vec<ObjectRef<Proposal>> {
    let namespace = object.meta().namespace.clone();
    let name = object.meta().name.clone().unwrap_or_default();
    store
        .state()
        .into_iter()
        .filter(|p| p.namespace() == namespace && p.spec.target.kind == kind && p.spec.target.name == name)
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Agents in `object`'s namespace that `refers` to it.
fn referring_agents<K: kube::Resource>(
    store: &kube::runtime::reflector::Store<Agent>,
    object: &K,
    refers: impl Fn(&Agent) -> bool,
) -> Vec<ObjectRef<Agent>> {
    let namespace = object.meta().namespace.clone();
    store
        .state()
        .into_iter()
        .filter(|a| a.namespace() == namespace && refers(a))
        .map(|a| ObjectRef::from_obj(a.as_ref()))
        .collect()
}

/// `reconcile`, with how long each pass took counted under `kind`, and an object's failures
/// forgotten once a pass succeeds (see [`controllers::retries`]).
fn timed<K, F, Fut>(
    kind: &'static str,
    reconcile: F,
) -> impl FnMut(
    Arc<K>,
    Arc<Context>,
) -> futures::future::BoxFuture<'static, controllers::Result<kube::runtime::controller::Action>>
where
    K: kube::Resource<DynamicType = ()>,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut:
        std::future::Future<Output = controllers::Result<kube::runtime::controller::Action>> + Send + 'static,
{
    move |object, ctx| {
        let started = std::time::Instant::now();
        let metrics = ctx.metrics.clone();
        let retries = ctx.retries.clone();
        let key = controllers::retries::key(object.as_ref());
        let pass = reconcile(object, ctx);
        Box::pin(async move {
            let result = pass.await;
            metrics.reconciled(kind, started.elapsed());
            if result.is_ok() {
                retries.succeeded(&key);
            }
            result
        })
    }
}
