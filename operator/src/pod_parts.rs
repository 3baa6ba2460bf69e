//! The parts every sandboxed pod ContextOS creates is built from (runner, capability and replay
//! pods), as typed Kubernetes objects: Pod Security "restricted" contexts, the SandboxProfile's
//! caps and seccomp profile, the projected gateway token, scratch space, and NetworkPolicy
//! peers and rules. Pure.

use std::collections::BTreeMap;

use contextos_crds::sandbox_profile::{EgressProtocol, EgressRule, SandboxProfileSpec, SeccompType};
use contextos_runner::{gateway::identity::GATEWAY_AUDIENCE, run::pod::paths};
use k8s_openapi::{
    api::{
        core::v1::{
            Capabilities, EmptyDirVolumeSource, PodSecurityContext, ProjectedVolumeSource, SeccompProfile,
            SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
        },
        networking::v1::{IPBlock, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::session_children::{GATEWAY_POD_LABEL, GATEWAY_PORT, RunnerSettings};

/// Lifetime asked for a pod's projected gateway token (the kubelet refreshes it at 80 %).
const TOKEN_SECONDS: i64 = 600;

/// A label selector matching exactly `labels`.
pub fn selector<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        ),
        match_expressions: None,
    }
}

/// Pod-level security: non-root as `user`, whose group owns the pod's volumes (the projected
/// token is readable by it), and the profile's seccomp profile.
pub fn pod_security(user: i64, seccomp: SeccompProfile) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        run_as_group: Some(user),
        fs_group: Some(user),
        seccomp_profile: Some(seccomp),
        ..PodSecurityContext::default()
    }
}

/// Container-level security Pod Security "restricted" asks for.
pub fn container_security(read_only_root: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(read_only_root),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The profile's seccomp profile.
pub fn seccomp(sandbox: &SandboxProfileSpec) -> SeccompProfile {
    match sandbox.seccomp_profile.type_ {
        SeccompType::RuntimeDefault => SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        },
        SeccompType::Localhost => SeccompProfile {
            type_: "Localhost".into(),
            localhost_profile: sandbox.seccomp_profile.localhost_profile.clone(),
        },
    }
}

/// The profile's caps, as limits (and requests: the pod gets exactly this much).
pub fn caps(sandbox: &SandboxProfileSpec) -> BTreeMap<String, Quantity> {
    let mut limits = BTreeMap::from([
        ("cpu".to_owned(), sandbox.resources.cpu.clone()),
        ("memory".to_owned(), sandbox.resources.memory.clone()),
    ]);
    if let Some(storage) = &sandbox.resources.ephemeral_storage {
        limits.insert("ephemeral-storage".to_owned(), storage.clone());
    }
    limits
}

/// Writable scratch space at `/tmp` (the root filesystem is read-only): volume and mount.
pub fn scratch() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    )
}

/// The projected token a pod authenticates to the gateway with (its audience only), and its
/// read-only mount.
pub fn gateway_token() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "gateway-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(GATEWAY_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: paths::TOKEN_FILE.into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "gateway-token".into(),
            mount_path: paths::TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// Pods labelled `key=value` in namespace `namespace` — one peer with both selectors. The
/// namespace's name label is set by the API server: a tenant cannot give it to its own.
pub fn pods_in(namespace: &str, key: &str, value: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector([("kubernetes.io/metadata.name", namespace)])),
        pod_selector: Some(selector([(key, value)])),
        ip_block: None,
    }
}

/// `protocol`/`port` in a NetworkPolicy rule.
pub fn port(protocol: &str, port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.to_owned()),
        port: Some(IntOrString::Int(i32::from(port))),
        end_port: None,
    }
}

/// Egress to the cluster DNS pods, on port 53 only.
pub fn dns_egress() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![pods_in("kube-system", "k8s-app", "kube-dns")]),
        ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
    }
}

/// Egress every pod that talks to the gateway has (runner, replay): the cluster DNS pods, the
/// gateway service's pods, and the operator's extra `cidr:port` rules — nothing else.
pub fn gateway_egress(settings: &RunnerSettings) -> Vec<NetworkPolicyEgressRule> {
    let mut egress = vec![
        dns_egress(),
        NetworkPolicyEgressRule {
            to: Some(vec![pods_in(
                &settings.gateway_namespace,
                GATEWAY_POD_LABEL.0,
                GATEWAY_POD_LABEL.1,
            )]),
            ports: Some(vec![port("TCP", GATEWAY_PORT)]),
        },
    ];
    egress.extend(settings.egress.iter().map(|(cidr, p)| NetworkPolicyEgressRule {
        to: Some(vec![to_cidr(cidr)]),
        ports: Some(vec![port("TCP", *p)]),
    }));
    egress
}

/// A SandboxProfile's egress rule.
pub fn allowlisted(rule: &EgressRule) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![to_cidr(&rule.cidr)]),
        ports: Some(
            rule.ports
                .iter()
                .map(|p| {
                    let protocol = match p.protocol {
                        EgressProtocol::Tcp => "TCP",
                        EgressProtocol::Udp => "UDP",
                    };
                    port(protocol, p.port)
                })
                .collect(),
        ),
    }
}

fn to_cidr(cidr: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_owned(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    }
}
