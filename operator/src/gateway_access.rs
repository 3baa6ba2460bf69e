//! Where the gateway service may read Secrets: only in namespaces that have an Agent. The
//! gateway's own ClusterRole reads no Secret; for each namespace an Agent is in, the operator
//! binds ClusterRole [`AGENT_SECRETS_ROLE`] (get Secrets) to the gateway's service account
//! there, and removes the binding once the namespace's last Agent is gone. So the gateway never
//! reads contextos-system (the operator's RunContext-signing key), kube-system, or any
//! namespace of other software or that stopped running agents, and the operator needs `bind`
//! on that one role rather than any right to read Secrets itself.

use std::{sync::Arc, time::Duration};

use contextos_crds::Agent;
use futures::StreamExt as _;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, PartialObjectMeta, Preconditions},
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};

use crate::{
    controllers::{Context, Result, apply},
    session_children::RunnerSettings,
};

/// How often a namespace's binding is checked again while Agents are there: the deletion of its
/// last Agent is normally seen at once; this bounds how long one the watch missed (the operator
/// was down, its watch restarted) leaves the gateway reading the namespace's Secrets.
const RECHECK: Duration = Duration::from_secs(600);

/// The ClusterRole bound in each namespace with an Agent, and the RoleBinding's name there.
pub const AGENT_SECRETS_ROLE: &str = "contextos-gateway-agent-secrets";

/// The RoleBinding that lets the gateway's service account (`settings.gateway_account` in
/// `settings.gateway_namespace`) read the Secrets of `namespace` (pure).
pub fn binding(namespace: &str, settings: &RunnerSettings) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(AGENT_SECRETS_ROLE.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [(PART_OF.0.to_owned(), PART_OF.1.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: AGENT_SECRETS_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: settings.gateway_account.clone(),
            namespace: Some(settings.gateway_namespace.clone()),
            api_group: None,
        }]),
    }
}

/// Why Agents cannot run in `namespace` (pure): it is one of ContextOS's own (`own`: the
/// operator's, where its RunContext-signing key is, and the gateway's, where the record keys
/// are) or the cluster's, where the gateway must never read Secrets — whoever may create an
/// Agent there.
pub fn refused_namespace(namespace: &str, own: [&str; 2]) -> Option<String> {
    const CLUSTER: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
    (own.contains(&namespace) || CLUSTER.contains(&namespace)).then(|| {
        format!(
            "Agents do not run in namespace {namespace}: the gateway would be given the Secrets there (ContextOS's own keys, or the cluster's); create the Agent in a tenant namespace"
        )
    })
}

/// Lets the gateway read the Secrets of `namespace`, which has an Agent (applied on every
/// reconcile of one, so a binding removed by hand comes back with the next change). Never in
/// a namespace [`refused_namespace`] names.
pub async fn ensure(ctx: &Context, namespace: &str) -> Result<()> {
    if ctx.runner.gateway_account.is_empty() || refused_namespace(namespace, ctx.own_namespaces()).is_some() {
        return Ok(());
    }
    let api = Api::<RoleBinding>::namespaced(ctx.client.clone(), namespace);
    let wanted = binding(namespace, &ctx.runner);
    match apply(&api, &wanted).await {
        Ok(_) => Ok(()),
        // A binding of that name made by someone else to another role: its roleRef cannot be
        // changed, so it is replaced.
        Err(crate::controllers::Error::Kube(kube::Error::Api(e))) if e.code == 422 => {
            api.delete(AGENT_SECRETS_ROLE, &Default::default()).await?;
            apply(&api, &wanted).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// The operator's bindings, each reconciled when an Agent is deleted (in its namespace) and
/// every [`RECHECK`] (see [`reconcile_binding`]). Watched by metadata, by name: the operator may
/// list and watch no other RoleBinding.
pub fn controller(client: &Client) -> Controller<PartialObjectMeta<RoleBinding>> {
    let ours = watcher::Config::default()
        .fields(&format!("metadata.name={AGENT_SECRETS_ROLE}"))
        .labels(&format!("{}={}", PART_OF.0, PART_OF.1));
    let agents = Api::<PartialObjectMeta<Agent>>::all(client.clone());
    let deleted_agents = watcher(agents, Default::default()).filter_map(|event| {
        std::future::ready(match event {
            Ok(watcher::Event::Delete(agent)) => Some(Ok(agent)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    });
    Controller::new(Api::<PartialObjectMeta<RoleBinding>>::all(client.clone()), ours).watches_stream(
        deleted_agents,
        |agent: PartialObjectMeta<Agent>| {
            agent
                .namespace()
                .map(|namespace| ObjectRef::new(AGENT_SECRETS_ROLE).within(&namespace))
        },
    )
}

/// What becomes of a namespace's binding (pure): kept while an Agent is there — never in a
/// namespace Agents may not run in (one made before they were refused there goes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Keep,
    Remove,
}

impl Access {
    pub fn for_namespace_with(agents: usize, refused: bool) -> Self {
        if agents > 0 && !refused {
            Self::Keep
        } else {
            Self::Remove
        }
    }
}

/// Removes `binding` once its namespace has no Agent. Counted from the API server (any Agent,
/// also those another operator's selector takes), not from a cache that may not have seen the
/// latest one. An Agent created while it is removed has its own reconcile bind the namespace
/// again; one whose reconcile ran before the removal is seen by the second count, which binds
/// it again here.
pub async fn reconcile_binding(
    binding: Arc<PartialObjectMeta<RoleBinding>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let Some(namespace) = binding.namespace() else {
        return Ok(Action::await_change());
    };
    let refused = refused_namespace(&namespace, ctx.own_namespaces()).is_some();
    if Access::for_namespace_with(agents_in(&ctx.client, &namespace).await?, refused) == Access::Keep {
        return Ok(Action::requeue(RECHECK));
    }
    let api = Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace);
    // Only the binding that was read: one made again meanwhile has another uid.
    let only_this = DeleteParams {
        preconditions: Some(Preconditions {
            uid: binding.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(AGENT_SECRETS_ROLE, &only_this).await {
        Ok(_) if refused => {
            tracing::warn!(%namespace, "Agents do not run in this namespace: the gateway no longer reads its Secrets")
        }
        Ok(_) => {
            tracing::info!(%namespace, "the namespace's last Agent is gone: the gateway no longer reads its Secrets")
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // Retried here, not by requeueing: the binding is gone from the cache, and a requeue of
    // it would find nothing to reconcile.
    let mut tries = 0;
    loop {
        match rebind_if_an_agent_came(&ctx, &namespace).await {
            Ok(()) => return Ok(Action::await_change()),
            Err(e) if tries >= 4 => {
                tracing::error!(%namespace, error = %e, "cannot check whether an Agent came while the gateway's binding was removed; an Agent's next change binds it again");
                return Err(e);
            }
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250 << tries)).await;
            }
        }
    }
}

/// Binds `namespace` again if an Agent is there now.
async fn rebind_if_an_agent_came(ctx: &Context, namespace: &str) -> Result<()> {
    if Access::for_namespace_with(agents_in(&ctx.client, namespace).await?, false) == Access::Keep {
        // (`ensure` binds no namespace Agents may not run in.)
        ensure(ctx, namespace).await?;
    }
    Ok(())
}

/// How many Agents `namespace` has (0 or 1: one is enough to know).
async fn agents_in(client: &Client, namespace: &str) -> Result<usize> {
    let agents = Api::<Agent>::namespaced(client.clone(), namespace)
        .list_metadata(&ListParams::default().limit(1))
        .await?;
    Ok(agents.items.len())
}

/// The label every binding the operator makes carries (its controller selects by it).
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "contextos");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_keeps_the_binding_while_it_has_an_agent() {
        assert_eq!(Access::for_namespace_with(1, false), Access::Keep);
        assert_eq!(Access::for_namespace_with(0, false), Access::Remove);
        assert_eq!(
            Access::for_namespace_with(1, true),
            Access::Remove,
            "a binding made before Agents were refused there goes"
        );
    }

    #[test]
    fn the_gateway_is_never_given_the_secrets_of_its_own_namespace_or_the_clusters() {
        let own = ["contextos-operator", "contextos-gateway"];
        for namespace in [
            "contextos-operator",
            "contextos-gateway",
            "kube-system",
            "kube-public",
            "kube-node-lease",
        ] {
            let why = refused_namespace(namespace, own).expect(namespace);
            assert!(
                why.contains(namespace) && why.contains("tenant namespace"),
                "{why}"
            );
        }
        assert_eq!(refused_namespace("shop", own), None);
    }

    #[test]
    fn the_binding_carries_the_label_its_controller_selects() {
        let settings = RunnerSettings::default();
        let binding = binding("shop", &settings);
        assert_eq!(
            binding.labels().get(PART_OF.0).map(String::as_str),
            Some(PART_OF.1)
        );
    }

    #[test]
    fn the_binding_grants_the_gateway_the_agent_secrets_role_in_that_namespace_only() {
        let settings = RunnerSettings {
            gateway_namespace: "contextos-system".into(),
            gateway_account: "contextos-gateway".into(),
            ..RunnerSettings::default()
        };
        let binding = binding("shop", &settings);
        assert_eq!(binding.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, AGENT_SECRETS_ROLE);
        let subjects = binding.subjects.expect("subjects");
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, "contextos-gateway");
        assert_eq!(subjects[0].namespace.as_deref(), Some("contextos-system"));
    }
}
