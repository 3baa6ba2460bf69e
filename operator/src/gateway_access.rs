//! Where the gateway service may read Secrets: only in namespaces that have an Agent. The
//! gateway's own ClusterRole reads no Secret; for each namespace an Agent is in, the operator
//! binds ClusterRole [`AGENT_SECRETS_ROLE`] (get Secrets) to the gateway's service account
//! there. So the gateway never reads contextos-system (the operator's RunContext-signing key),
//! kube-system, or any namespace of other software, and the operator needs `bind` on that one
//! role rather than any right to read Secrets itself.

use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::{Api, api::ObjectMeta};

use crate::{
    controllers::{Context, Result, apply},
    session_children::RunnerSettings,
};

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
                [("app.kubernetes.io/part-of".to_owned(), "contextos".to_owned())]
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

/// Lets the gateway read the Secrets of `namespace`, which has an Agent (applied on every
/// reconcile of one, so a binding removed by hand comes back with the next change).
pub async fn ensure(ctx: &Context, namespace: &str) -> Result<()> {
    if ctx.runner.gateway_account.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
