//! What a Session owns, built from pinned specs (pure; the Session controller applies them):
//! the immutable run bundle ConfigMap, the record-key Secret, one runner Pod per attempt with
//! its SandboxProfile applied, and the NetworkPolicy that confines it.

use std::collections::BTreeSet;

use contextos_crds::{
    FIELD_MANAGER, Session, SessionSpec, labels,
    sandbox_profile::{EgressProtocol, SandboxProfileSpec, SeccompType},
};
use contextos_runner::run::pod::{APPROVALS_ENV, BUNDLE_KEY, PodBundle, RECORD_KEY, RUN_CONTEXT_ENV, paths};
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Pod, Secret},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::Resource as _;
use serde_json::{Value, json};

/// Settings that come from the operator's configuration rather than the Session.
#[derive(Clone, Debug, Default)]
pub struct RunnerSettings {
    /// Record store URL runner pods write to (e.g. `tikv://pd.contextos-system.svc:2379`).
    pub store: String,
    /// Extra egress every runner needs (the record store), as `cidr:port`.
    pub egress: Vec<(String, u16)>,
}

/// Names of a Session's children.
pub fn bundle_name(session: &str) -> String {
    format!("{session}-bundle")
}

pub fn keys_name(session: &str) -> String {
    format!("{session}-keys")
}

pub fn pod_name(session: &str, attempt: u32) -> String {
    format!("{session}-run-{attempt}")
}

pub fn network_policy_name(session: &str) -> String {
    format!("{session}-runner")
}

/// The run id of a Session: stable across attempts, unique across Sessions of the same name.
pub fn run_id(session: &Session) -> String {
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    let short: String = uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    format!(
        "{}-{short}",
        session.metadata.name.as_deref().unwrap_or("session")
    )
}

/// The W3C trace id of a Session's run (32 hex characters derived from its uid).
pub fn trace_id(session: &Session) -> String {
    use sha2::{Digest as _, Sha256};
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    hex::encode(&Sha256::digest(uid.as_bytes())[..16])
}

fn owner(session: &Session) -> Option<OwnerReference> {
    session.controller_owner_ref(&())
}

fn metadata(session: &Session, name: String) -> Value {
    json!({
        "name": name,
        "namespace": session.metadata.namespace,
        "labels": {labels::SESSION: session.metadata.name},
        "ownerReferences": owner(session).into_iter().collect::<Vec<_>>(),
    })
}

/// The immutable bundle: pinned specs and the key the pod's gateway trusts.
pub fn bundle_config_map(session: &Session, pod_bundle: &PodBundle) -> Result<ConfigMap, serde_json::Error> {
    let name = bundle_name(session.metadata.name.as_deref().unwrap_or_default());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(session, name),
        "immutable": true,
        "data": {BUNDLE_KEY: serde_json::to_string(pod_bundle)?},
    }))
}

/// The Secret holding the key a Session's runner signs its record heads with.
pub fn keys_secret(session: &Session, record_key_hex: &str) -> Result<Secret, serde_json::Error> {
    let name = keys_name(session.metadata.name.as_deref().unwrap_or_default());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(session, name),
        "immutable": true,
        "type": "Opaque",
        "stringData": {RECORD_KEY: record_key_hex},
    }))
}

/// The runner pod of one attempt, confined by the SandboxProfile: Pod Security "restricted",
/// no service-account token, no host mounts, hard resource caps, a deadline, the digest-pinned
/// image, the Secrets its tools reference mounted read-only.
pub fn runner_pod(
    session: &Session,
    sandbox: &SandboxProfileSpec,
    secrets: &BTreeSet<String>,
    attempt: u32,
    run_context_json: &str,
    settings: &RunnerSettings,
) -> Result<Pod, serde_json::Error> {
    let name = session.metadata.name.as_deref().unwrap_or_default();
    let mut meta = metadata(session, pod_name(name, attempt));
    meta["labels"][labels::ATTEMPT] = json!(attempt.to_string());
    meta["labels"][labels::ROLE] = json!("runner");
    let approvals = serde_json::to_string(&session.spec.approvals)?;
    let mut volumes = vec![
        json!({"name": "bundle", "configMap": {"name": bundle_name(name)}}),
        json!({"name": "keys", "secret": {"secretName": keys_name(name), "defaultMode": 0o440}}),
        json!({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}),
    ];
    let mut mounts = vec![
        json!({"name": "bundle", "mountPath": paths::BUNDLE_DIR, "readOnly": true}),
        json!({"name": "keys", "mountPath": paths::KEYS_DIR, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    for (i, secret) in secrets.iter().enumerate() {
        let volume = format!("secret-{i}");
        volumes.push(json!({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}}));
        mounts.push(json!({"name": volume, "mountPath": format!("{}/{secret}", paths::SECRETS_DIR), "readOnly": true}));
    }
    let mut limits = json!({"cpu": sandbox.resources.cpu, "memory": sandbox.resources.memory});
    if let Some(storage) = &sandbox.resources.ephemeral_storage {
        limits["ephemeral-storage"] = json!(storage);
    }
    let seccomp = match sandbox.seccomp_profile.type_ {
        SeccompType::RuntimeDefault => json!({"type": "RuntimeDefault"}),
        SeccompType::Localhost => {
            json!({"type": "Localhost", "localhostProfile": sandbox.seccomp_profile.localhost_profile})
        }
    };
    let mut spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "activeDeadlineSeconds": sandbox.active_deadline_seconds,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": sandbox.run_as_user,
            "runAsGroup": sandbox.run_as_user,
            // Secret volumes are group-readable by this group, so the non-root runner can read
            // its keys and credentials (mode 0440).
            "fsGroup": sandbox.run_as_user,
            "seccompProfile": seccomp,
        },
        "containers": [{
            "name": "runner",
            "image": sandbox.image,
            // The image's entrypoint is `contextos`.
            "args": ["session-run"],
            "env": [
                {"name": "CONTEXTOS_STORE", "value": settings.store},
                {"name": "CONTEXTOS_TENANT", "value": session.metadata.namespace},
                {"name": RUN_CONTEXT_ENV, "value": run_context_json},
                {"name": APPROVALS_ENV, "value": approvals},
            ],
            "resources": {"limits": limits, "requests": limits},
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": sandbox.read_only_root_filesystem,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "terminationMessagePath": paths::TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(class) = &sandbox.runtime_class_name {
        spec["runtimeClassName"] = json!(class);
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}))
}

/// No ingress at all; egress only to DNS, the record store and the profile's allowlist (which
/// must name the model endpoint and the tool services).
pub fn network_policy(
    session: &Session,
    sandbox: &SandboxProfileSpec,
    settings: &RunnerSettings,
) -> Result<NetworkPolicy, serde_json::Error> {
    let name = session.metadata.name.as_deref().unwrap_or_default();
    let mut egress = vec![json!({
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    })];
    for rule in &sandbox.egress {
        let ports: Vec<Value> = rule
            .ports
            .iter()
            .map(|p| {
                let protocol = match p.protocol {
                    EgressProtocol::Tcp => "TCP",
                    EgressProtocol::Udp => "UDP",
                };
                json!({"protocol": protocol, "port": p.port})
            })
            .collect();
        egress.push(json!({"to": [{"ipBlock": {"cidr": rule.cidr}}], "ports": ports}));
    }
    for (cidr, port) in &settings.egress {
        egress
            .push(json!({"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]}));
    }
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(session, network_policy_name(name)),
        "spec": {
            "podSelector": {"matchLabels": {labels::SESSION: name, labels::ROLE: "runner"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }))
}

/// The Secrets an agent's tools and model reference (mounted into the runner pod).
pub fn referenced_secrets(agent: &contextos_crds::AgentSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(key) = &agent.model.secret_ref {
        out.insert(key.name.clone());
    }
    for tool in &agent.tools {
        if let Some(key) = tool.adapter.http.as_ref().and_then(|h| h.secret_ref.as_ref()) {
            out.insert(key.name.clone());
        }
        if let Some(hook) = &tool.adapter.webhook {
            out.insert(hook.secret_ref.name.clone());
        }
    }
    out
}

/// Whether `spec` asks to stop.
pub fn cancelled(spec: &SessionSpec) -> bool {
    spec.cancel
}

/// The field manager every child is applied with.
pub const MANAGER: &str = FIELD_MANAGER;

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let mut session: Session =
            serde_yaml::from_str(include_str!("../../examples/quickstart/session.yaml")).expect("session");
        session.metadata.namespace = Some("shop".into());
        session.metadata.uid = Some("0f8fad5b-d9cb-469f-a165-70867728950e".into());
        session
    }

    fn sandbox() -> SandboxProfileSpec {
        let value: Value =
            serde_yaml::from_str(include_str!("../../examples/quickstart/sandboxprofile.yaml"))
                .expect("yaml");
        serde_json::from_value(value["spec"].clone()).expect("sandbox spec")
    }

    #[test]
    fn the_runner_pod_meets_pod_security_restricted_and_carries_no_token() {
        let pod = runner_pod(
            &session(),
            &sandbox(),
            &BTreeSet::from(["ops-tools-webhook".to_owned()]),
            2,
            "{}",
            &RunnerSettings::default(),
        )
        .expect("pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("checkout-5xx-run-2"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let container = &spec.containers[0];
        let security = container.security_context.as_ref().expect("security context");
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()));
        assert!(container.image.as_deref().is_some_and(|i| i.contains("@sha256:")));
        assert_eq!(pod.metadata.owner_references.map(|o| o.len()), Some(1));
    }

    #[test]
    fn the_network_policy_denies_ingress_and_allows_only_listed_egress() {
        let settings = RunnerSettings {
            store: "tikv://pd:2379".into(),
            egress: vec![("10.0.0.5/32".into(), 2379)],
        };
        let policy = network_policy(&session(), &sandbox(), &settings).expect("policy");
        let spec = policy.spec.expect("spec");
        assert_eq!(spec.ingress, Some(vec![]));
        let egress = spec.egress.expect("egress");
        assert_eq!(egress.len(), 3, "DNS, the profile's rule, the store");
    }
}
