//! A Session's capability pods (pure; the Session controller applies them): one per
//! command-started MCP server of its Agent, running `contextos capability serve` in the
//! SandboxProfile's image with the profile applied — Pod Security "restricted", no token, no
//! Secret, no environment — and a NetworkPolicy that lets only the gateway's pods in and lets
//! out only what the profile's egress allowlist names (and cluster DNS).

use contextos_crds::{Session, labels, sandbox_profile::SandboxProfileSpec};
use contextos_runner::capability::{self, CapabilityServer, ChannelKey};
use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Pod, PodSpec, Probe, ResourceRequirements, TCPSocketAction},
        networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicySpec},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    pod_parts,
    session_children::{GATEWAY_POD_LABEL, RunnerSettings, metadata},
};

/// Name of the NetworkPolicy confining a Session's capability pods.
pub fn network_policy_name(session: &str) -> String {
    format!("{session}-capabilities")
}

/// The pod serving `server` to the gateway for `session`, proving itself with `key`.
pub fn capability_pod(
    session: &Session,
    sandbox: &SandboxProfileSpec,
    server: &CapabilityServer,
    key: &ChannelKey,
) -> Pod {
    let name = session.metadata.name.as_deref().unwrap_or_default();
    let namespace = session.metadata.namespace.as_deref().unwrap_or_default();
    let mut args = vec![
        "capability".to_owned(),
        "serve".to_owned(),
        format!("--namespace={namespace}"),
        format!("--session={name}"),
        format!("--server={}", server.digest),
        format!("--key={}", key.as_str()),
        "--".to_owned(),
    ];
    args.extend(server.command.iter().cloned());
    let (scratch, scratch_mount) = pod_parts::scratch();
    let caps = pod_parts::caps(sandbox);
    let container = Container {
        name: "capability".into(),
        image: Some(sandbox.image.clone()),
        // The image's entrypoint is `contextos`; the server is a program in the same image.
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("capability".into()),
            container_port: i32::from(capability::PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(capability::PORT)),
                host: None,
            }),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            limits: Some(caps.clone()),
            requests: Some(caps),
            ..ResourceRequirements::default()
        }),
        security_context: Some(pod_parts::container_security(sandbox.read_only_root_filesystem)),
        volume_mounts: Some(vec![scratch_mount]),
        ..Container::default()
    };
    let digest = server.digest.to_string();
    Pod {
        metadata: metadata(
            session,
            capability::pod_name(name, &server.digest),
            [
                (labels::ROLE, capability::ROLE),
                (capability::SERVER_LABEL, digest.as_str()),
            ],
        ),
        spec: Some(PodSpec {
            // The bridge is a server: restarted in place if it dies, until the Session ends (the
            // operator deletes the pod then) or the profile's deadline passes.
            restart_policy: Some("Always".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // Nothing in the pod is worth waiting for once its Session has ended.
            termination_grace_period_seconds: Some(5),
            active_deadline_seconds: Some(i64::from(sandbox.active_deadline_seconds)),
            runtime_class_name: sandbox.runtime_class_name.clone(),
            security_context: Some(pod_parts::pod_security(
                sandbox.run_as_user,
                pod_parts::seccomp(sandbox),
            )),
            containers: vec![container],
            volumes: Some(vec![scratch]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Ingress only from the gateway's pods, to the bridge's port; egress only to the cluster DNS
/// pods and the profile's allowlist. Nothing else: not the runner, not the store, not other
/// tools, not the gateway's API.
pub fn network_policy(
    session: &Session,
    sandbox: &SandboxProfileSpec,
    settings: &RunnerSettings,
) -> NetworkPolicy {
    let name = session.metadata.name.as_deref().unwrap_or_default();
    let mut egress = vec![pod_parts::dns_egress()];
    egress.extend(sandbox.egress.iter().map(pod_parts::allowlisted));
    NetworkPolicy {
        metadata: metadata(
            session,
            network_policy_name(name),
            [(labels::ROLE, capability::ROLE)],
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_parts::selector([
                (labels::SESSION, name),
                (labels::ROLE, capability::ROLE),
            ])),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![pod_parts::pods_in(
                    &settings.gateway_namespace,
                    GATEWAY_POD_LABEL.0,
                    GATEWAY_POD_LABEL.1,
                )]),
                ports: Some(vec![pod_parts::port("TCP", capability::PORT)]),
            }]),
            egress: Some(egress),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use contextos_runner::capability::ServerDigest;

    use super::*;
    use crate::fixtures::{sandbox, session};

    /// The labels every capability pod of `session` carries.
    fn selector(session: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::SESSION.to_owned(), session.to_owned()),
            (labels::ROLE.to_owned(), capability::ROLE.to_owned()),
        ])
    }

    fn server() -> CapabilityServer {
        let command = vec!["mcp-fs".to_owned(), "--root=/tmp".to_owned()];
        CapabilityServer {
            digest: ServerDigest::of(&command),
            command,
        }
    }

    #[test]
    fn a_capability_pod_is_restricted_holds_nothing_and_runs_only_its_server() {
        let pod = capability_pod(
            &session(),
            &sandbox(),
            &server(),
            &ChannelKey::generate().expect("key"),
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        let volumes = spec.volumes.unwrap_or_default();
        assert!(
            volumes.iter().all(|v| v.empty_dir.is_some()),
            "only scratch space"
        );
        let container = &spec.containers[0];
        assert!(container.env.is_none() && container.env_from.is_none());
        let args = container.args.clone().unwrap_or_default();
        let digest = server().digest;
        assert_eq!(
            args[args.len() - 3..],
            ["--".to_owned(), "mcp-fs".to_owned(), "--root=/tmp".to_owned()]
        );
        assert!(args.contains(&format!("--server={digest}")));
        let security = container.security_context.clone().expect("security");
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".into()])
        );
        let labels = pod.metadata.labels.expect("labels");
        assert_eq!(
            labels.get(labels::ROLE).map(String::as_str),
            Some(capability::ROLE)
        );
        assert_eq!(
            labels.get(capability::SERVER_LABEL).map(String::as_str),
            Some(digest.as_str())
        );
        assert_eq!(pod.metadata.owner_references.map(|o| o.len()), Some(1));
    }

    #[test]
    fn only_the_gateway_gets_in_and_only_dns_and_the_allowlist_get_out() {
        let settings = RunnerSettings {
            gateway: "http://contextos-gateway.contextos-system.svc:8480".into(),
            gateway_namespace: "contextos-system".into(),
            gateway_account: "contextos-gateway".into(),
            egress: vec![("10.0.0.5/32".into(), 8480)],
            relay_traces: false,
        };
        let policy = network_policy(&session(), &sandbox(), &settings);
        let spec = policy.spec.expect("spec");
        assert_eq!(
            spec.pod_selector.and_then(|s| s.match_labels),
            Some(selector("checkout-5xx")),
            "the Session's capability pods, by Session and role"
        );
        let ingress = spec.ingress.expect("ingress");
        assert_eq!(ingress.len(), 1);
        let from = ingress[0].from.clone().expect("peers");
        assert_eq!(from.len(), 1);
        // One peer with both selectors: the gateway's pods in the gateway's namespace, by the
        // name label the API server sets (a tenant cannot give it to its own namespace).
        assert!(from[0].ip_block.is_none());
        assert_eq!(
            from[0].namespace_selector.clone().and_then(|s| s.match_labels),
            Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                "contextos-system".to_owned()
            )]))
        );
        assert_eq!(
            from[0].pod_selector.clone().and_then(|s| s.match_labels),
            Some(BTreeMap::from([(
                GATEWAY_POD_LABEL.0.to_owned(),
                GATEWAY_POD_LABEL.1.to_owned()
            )]))
        );
        assert_eq!(
            ingress[0].ports.clone().unwrap_or_default().len(),
            1,
            "the bridge's port only"
        );
        let egress = spec.egress.expect("egress");
        assert!(
            egress
                .iter()
                .all(|r| r.to.as_ref().is_some_and(|to| !to.is_empty())),
            "a rule without a destination would allow every address"
        );
        assert_eq!(
            egress[0].to.clone().unwrap_or_default()[0]
                .pod_selector
                .clone()
                .and_then(|s| s.match_labels),
            Some(BTreeMap::from([("k8s-app".to_owned(), "kube-dns".to_owned())]))
        );
        assert_eq!(
            egress.len(),
            1 + sandbox().egress.len(),
            "DNS pods and the profile's rules; not the gateway, not the operator's extra rules"
        );
    }
}
