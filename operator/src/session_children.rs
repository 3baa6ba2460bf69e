//! What a Session owns, built from pinned specs (pure; the Session controller applies them):
//! the immutable run bundle ConfigMap and one runner Pod per attempt with its SandboxProfile
//! applied; and the namespace's runner NetworkPolicy that confines every such pod. A runner pod
//! holds no credential, key or store address: it reaches the gateway service with a projected
//! token, and nothing else.

use std::collections::BTreeMap;

use contextos_crds::{
    FIELD_MANAGER, Session, SessionSpec, annotations, labels, sandbox_profile::SandboxProfileSpec,
};
use contextos_runner::{
    keys::{KeyPair, PublicKey},
    run::pod::{APPROVALS_ENV, BUNDLE_KEY, GATEWAY_ENV, PodBundle, RESOLUTIONS_ENV, RUN_CONTEXT_ENV, paths},
};
use k8s_openapi::{
    api::{
        core::v1::{
            ConfigMap, ConfigMapVolumeSource, Container, EnvVar, Pod, PodSpec, ResourceRequirements, Volume,
            VolumeMount,
        },
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource as _;

use crate::pod_parts;

/// Settings that come from the operator's configuration rather than the Session.
#[derive(Clone, Debug, Default)]
pub struct RunnerSettings {
    /// The gateway service runner pods send every effect to (its base URL).
    pub gateway: String,
    /// Namespace of the gateway pods (the NetworkPolicy lets runners reach only them).
    pub gateway_namespace: String,
    /// The gateway's service account there, which the operator lets read Secrets in each
    /// namespace with an Agent (see [`crate::gateway_access`]); empty: an admin binds it.
    pub gateway_account: String,
    /// Extra egress every runner needs, as `cidr:port` (a gateway outside the cluster's pod
    /// network, e.g. in tests).
    pub egress: Vec<(String, u16)>,
    /// Whether runner pods export their spans, to the gateway's relay (`/v1/run/traces`), the
    /// only place they reach. Which Sessions are traced is decided where their RunContexts are
    /// issued (here), and carried in them.
    pub relay_traces: bool,
}

/// The runner container's environment pointing its exporter at the gateway's relay.
fn relay_env(gateway: &str) -> Vec<EnvVar> {
    let env = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    vec![
        env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{}/v1/run/traces", gateway.trim_end_matches('/')),
        ),
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf".into()),
    ]
}

/// Label of the gateway service's pods (the runner NetworkPolicy's only destination besides DNS).
pub const GATEWAY_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "contextos-gateway");
/// Port of the gateway service's pods.
pub const GATEWAY_PORT: u16 = 8480;

/// Names of a Session's children.
pub fn bundle_name(session: &str) -> String {
    format!("{session}-bundle")
}

pub fn pod_name(session: &str, attempt: u32) -> String {
    format!("{session}-run-{attempt}")
}

/// The NetworkPolicy every runner pod of a namespace is under. One per namespace, not one per
/// Session: its rules are the same for every Session, and with a policy per Session the node's
/// policy enforcer rebuilt its rules for all of them at each new pod (kube-router used 88 of the
/// 420 CPU seconds 200 runner pods took to start, README "Scale benchmark").
pub const RUNNER_NETWORK_POLICY: &str = "contextos-runners";

/// The run id of a Session: stable across attempts, unique across Sessions of the same name.
pub fn run_id(session: &Session) -> String {
    contextos_runner::run::session_run_id(
        session.metadata.name.as_deref().unwrap_or("session"),
        session.metadata.uid.as_deref().unwrap_or_default(),
    )
}

/// The W3C trace id of a Session's run: the one its `contextos.dev/traceparent` annotation
/// names (an A2A caller's, an application's), else 32 hex characters derived from its uid.
pub fn trace_id(session: &Session) -> String {
    use sha2::{Digest as _, Sha256};
    if let Some(trace) =
        traceparent_annotation(session).and_then(contextos_runner::telemetry::traceparent_trace_id)
    {
        return trace;
    }
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    hex::encode(&Sha256::digest(uid.as_bytes())[..16])
}

/// The Session's `contextos.dev/traceparent` annotation, if it has one.
pub fn traceparent_annotation(session: &Session) -> Option<&str> {
    session
        .metadata
        .annotations
        .as_ref()?
        .get(contextos_runner::telemetry::TRACEPARENT_ANNOTATION)
        .map(String::as_str)
}

/// Metadata of a child named `name`: in the Session's namespace, labelled with it (plus
/// `labels`), controlled by it.
pub fn metadata<'a>(
    session: &Session,
    name: String,
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> ObjectMeta {
    let mut all = BTreeMap::from([(
        labels::SESSION.to_owned(),
        session.metadata.name.clone().unwrap_or_default(),
    )]);
    all.extend(labels.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
    ObjectMeta {
        name: Some(name),
        namespace: session.metadata.namespace.clone(),
        labels: Some(all),
        owner_references: session.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The immutable bundle: the pinned specs the Session runs, sealed by the operator.
/// The most a ConfigMap may hold (the API server refuses more): a run bundle, the Agent's
/// composition and the Session's spec together, must fit.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// Why the bundle in `config_map` cannot be written: it is larger than a ConfigMap may be. Says
/// how much of it is the Session's own spec, the part its author can shorten.
pub fn bundle_too_large(config_map: &ConfigMap, session: &Session) -> Option<String> {
    let size: usize = config_map.data.iter().flatten().map(|(_, v)| v.len()).sum();
    if size <= MAX_BUNDLE_BYTES {
        return None;
    }
    let own = serde_json::to_string(&session.spec).map_or(0, |s| s.len());
    Some(format!(
        "spec.input: the run bundle (the Agent's promoted composition with this Session's spec, \
         {} KiB of it) is {} KiB, more than the {} KiB a ConfigMap holds; shorten spec.input.data \
         or spec.input.prompt (or pass large inputs through a tool)",
        own.div_ceil(1024),
        size.div_ceil(1024),
        MAX_BUNDLE_BYTES / 1024
    ))
}

pub fn bundle_config_map(
    session: &Session,
    pod_bundle: &PodBundle,
    key: &KeyPair,
) -> Result<ConfigMap, serde_json::Error> {
    let name = bundle_name(session.metadata.name.as_deref().unwrap_or_default());
    let text = serde_json::to_string(pod_bundle)?;
    let mut meta = metadata(session, name, []);
    meta.annotations = Some(BTreeMap::from([(
        annotations::SEAL.to_owned(),
        seal(session, &text, key),
    )]));
    Ok(ConfigMap {
        metadata: meta,
        immutable: Some(true),
        data: Some(BTreeMap::from([(BUNDLE_KEY.to_owned(), text)])),
        ..ConfigMap::default()
    })
}

/// Why a ConfigMap at a Session's bundle name is not the bundle the operator wrote for it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsealed {
    #[error("it carries no {} annotation", annotations::SEAL)]
    NoSeal,
    #[error(
        "its {} annotation is not the operator's signature over this Session and content",
        annotations::SEAL
    )]
    BadSeal,
    #[error("its {BUNDLE_KEY} is not a run bundle: {0}")]
    NotABundle(String),
}

/// The bundle in `config_map`, if the operator sealed it for this very Session (its uid):
/// ownerReferences and labels are the tenant's to write, a seal is not.
pub fn sealed_bundle(
    session: &Session,
    config_map: &ConfigMap,
    key: &PublicKey,
) -> Result<PodBundle, Unsealed> {
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .map(String::as_str)
        .unwrap_or_default();
    let signature = config_map
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::SEAL))
        .ok_or(Unsealed::NoSeal)?;
    if !key.verify_hex(&seal_bytes(session, text), signature) {
        return Err(Unsealed::BadSeal);
    }
    serde_json::from_str(text).map_err(|e| Unsealed::NotABundle(e.to_string()))
}

fn seal(session: &Session, text: &str, key: &KeyPair) -> String {
    key.sign_hex(&seal_bytes(session, text))
}

fn seal_bytes(session: &Session, text: &str) -> Vec<u8> {
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    let mut bytes = format!("contextos-bundle-seal/v1\n{uid}\n").into_bytes();
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

/// The runner pod of one attempt, confined by the SandboxProfile: Pod Security "restricted",
/// no service-account token but a projected one for the gateway's audience only, no Secret, no
/// host mounts, hard resource caps, a deadline, the digest-pinned image.
pub fn runner_pod(
    session: &Session,
    sandbox: &SandboxProfileSpec,
    attempt: u32,
    run_context_json: &str,
    settings: &RunnerSettings,
) -> Result<Pod, serde_json::Error> {
    let name = session.metadata.name.as_deref().unwrap_or_default();
    let attempt_label = attempt.to_string();
    let metadata = metadata(
        session,
        pod_name(name, attempt),
        [
            (labels::ATTEMPT, attempt_label.as_str()),
            (labels::ROLE, "runner"),
        ],
    );
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    let (token, token_mount) = pod_parts::gateway_token();
    let (scratch, scratch_mount) = pod_parts::scratch();
    let bundle = Volume {
        name: "bundle".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: bundle_name(name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    let bundle_mount = VolumeMount {
        name: "bundle".into(),
        mount_path: paths::BUNDLE_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let caps = pod_parts::caps(sandbox);
    let container = Container {
        name: "runner".into(),
        image: Some(sandbox.image.clone()),
        // The image's entrypoint is `contextos`.
        args: Some(vec!["session-run".into()]),
        env: Some(
            [
                env(GATEWAY_ENV, settings.gateway.clone()),
                env(RUN_CONTEXT_ENV, run_context_json.to_owned()),
                env(APPROVALS_ENV, serde_json::to_string(&session.spec.approvals)?),
                env(RESOLUTIONS_ENV, serde_json::to_string(&session.spec.resolutions)?),
            ]
            .into_iter()
            .chain(
                settings
                    .relay_traces
                    .then(|| relay_env(&settings.gateway))
                    .into_iter()
                    .flatten(),
            )
            .collect(),
        ),
        resources: Some(ResourceRequirements {
            limits: Some(caps.clone()),
            requests: Some(caps),
            ..ResourceRequirements::default()
        }),
        security_context: Some(pod_parts::container_security(sandbox.read_only_root_filesystem)),
        termination_message_path: Some(paths::TERMINATION_LOG.into()),
        // Only the file counts: logs may hold a hostile tool's text.
        termination_message_policy: Some("File".into()),
        volume_mounts: Some(vec![bundle_mount, token_mount, scratch_mount]),
        ..Container::default()
    };
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            active_deadline_seconds: Some(i64::from(sandbox.active_deadline_seconds)),
            runtime_class_name: sandbox.runtime_class_name.clone(),
            security_context: Some(pod_parts::pod_security(
                sandbox.run_as_user,
                pod_parts::seccomp(sandbox),
            )),
            containers: vec![container],
            volumes: Some(vec![bundle, token, scratch]),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The runner pods of `namespace`: no ingress at all; egress only to the cluster DNS pods and the
/// gateway service's pods. The profile's allowlist is for a Session's capability pods: a runner
/// reaches tools and models only through the gateway. Owned by no Session (it outlives each);
/// applied before every runner pod, so a deleted one comes back before the next pod starts.
pub fn network_policy(namespace: &str, settings: &RunnerSettings) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(RUNNER_NETWORK_POLICY.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(labels::ROLE.to_owned(), "runner".to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_parts::selector([(labels::ROLE, "runner")])),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(Vec::new()),
            egress: Some(pod_parts::gateway_egress(settings)),
        }),
    }
}

/// Whether `spec` asks to stop.
pub fn cancelled(spec: &SessionSpec) -> bool {
    spec.cancel
}

/// The field manager every child is applied with.
pub const MANAGER: &str = FIELD_MANAGER;

#[cfg(test)]
mod tests {
    use contextos_runner::gateway::identity::GATEWAY_AUDIENCE;

    use super::*;
    use crate::fixtures::{run_bundle, sandbox, session};

    fn settings() -> RunnerSettings {
        RunnerSettings {
            gateway: "http://contextos-gateway.contextos-system.svc:8480".into(),
            gateway_namespace: "contextos-system".into(),
            gateway_account: "contextos-gateway".into(),
            egress: vec![("10.0.0.5/32".into(), 8480)],
            relay_traces: false,
        }
    }

    #[test]
    fn a_sessions_trace_is_the_one_its_annotation_names_else_its_own() {
        let own = trace_id(&session());
        assert_eq!(own.len(), 32);
        let mut annotated = session();
        annotated.metadata.annotations = Some(BTreeMap::from([(
            contextos_runner::telemetry::TRACEPARENT_ANNOTATION.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]));
        assert_eq!(trace_id(&annotated), "4bf92f3577b34da6a3ce929d0e0e4736");
        // Not a traceparent: the Session's own (the controller reports the annotation).
        annotated.metadata.annotations = Some(BTreeMap::from([(
            contextos_runner::telemetry::TRACEPARENT_ANNOTATION.to_owned(),
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_owned(),
        )]));
        assert_eq!(trace_id(&annotated), own);
    }

    #[test]
    fn a_runner_exports_its_spans_only_to_the_gateways_relay() {
        let traced = RunnerSettings {
            relay_traces: true,
            ..settings()
        };
        let pod = runner_pod(&session(), &sandbox(), 1, "{}", &traced).expect("pod");
        let env: BTreeMap<String, String> = pod.spec.expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"],
            "http://contextos-gateway.contextos-system.svc:8480/v1/run/traces"
        );
        // Whether the Session is traced is its RunContext's to say, not a sampler's here.
        assert!(!env.keys().any(|k| k.starts_with("OTEL_TRACES_SAMPLER")));
        // Nothing that names another destination or carries a credential.
        assert!(!env.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert!(!env.keys().any(|k| k.contains("HEADERS")));
    }

    #[test]
    fn the_runner_pod_meets_pod_security_restricted_and_carries_no_credential() {
        let pod = runner_pod(&session(), &sandbox(), 2, "{}", &settings()).expect("pod");
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
        assert_eq!(container.termination_message_policy.as_deref(), Some("File"));
        let volumes = spec.volumes.clone().unwrap_or_default();
        assert!(
            volumes
                .iter()
                .all(|v| v.host_path.is_none() && v.secret.is_none())
        );
        // The only token is projected for the gateway's audience.
        let tokens: Vec<_> = volumes
            .iter()
            .filter_map(|v| v.projected.as_ref())
            .flat_map(|p| p.sources.clone().unwrap_or_default())
            .filter_map(|s| s.service_account_token)
            .collect();
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].audience.as_deref(), Some(GATEWAY_AUDIENCE));
        let env: Vec<String> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
        assert_eq!(
            env,
            [GATEWAY_ENV, RUN_CONTEXT_ENV, APPROVALS_ENV, RESOLUTIONS_ENV]
        );
        assert!(container.env_from.is_none());
        assert!(container.image.as_deref().is_some_and(|i| i.contains("@sha256:")));
        assert_eq!(pod.metadata.owner_references.map(|o| o.len()), Some(1));
    }

    fn pod_bundle(session: &Session) -> PodBundle {
        PodBundle {
            bundle: run_bundle(session),
            sandbox: Some(sandbox()),
        }
    }

    #[test]
    fn a_bundle_a_configmap_cannot_hold_is_the_sessions_input_to_shorten() {
        let key = KeyPair::from_seed([7; 32]);
        let mut session = session();
        let fits = bundle_config_map(&session, &pod_bundle(&session), &key).expect("bundle");
        assert_eq!(bundle_too_large(&fits, &session), None);
        // Structured input the API server takes in a Session (an object may be 1.5 MiB) but not
        // in a ConfigMap.
        session.spec.input.data = Some(serde_json::json!({"log": "x".repeat(1_100_000)}));
        let large = bundle_config_map(&session, &pod_bundle(&session), &key).expect("bundle");
        let problem = bundle_too_large(&large, &session).expect("too large");
        assert!(problem.starts_with("spec.input: the run bundle"), "{problem}");
        assert!(
            problem.contains("more than the 1024 KiB a ConfigMap holds"),
            "{problem}"
        );
    }

    #[test]
    fn only_a_bundle_the_operator_sealed_for_this_very_session_is_trusted() {
        let key = KeyPair::from_seed([7; 32]);
        let session = session();
        let bundle = pod_bundle(&session);
        let sealed = bundle_config_map(&session, &bundle, &key).expect("bundle");
        assert_eq!(
            sealed_bundle(&session, &sealed, &key.public()),
            Ok(bundle.clone())
        );

        // Planted by a tenant: owner reference and labels copied, no seal.
        let mut planted = sealed.clone();
        planted.metadata.annotations = None;
        assert_eq!(
            sealed_bundle(&session, &planted, &key.public()),
            Err(Unsealed::NoSeal)
        );
        // A genuine seal over other content (another image, wider egress, no policies).
        let mut altered = bundle.clone();
        if let Some(sandbox) = altered.sandbox.as_mut() {
            sandbox.image = "registry.example.com/evil@sha256:0".into();
        }
        let mut swapped = sealed.clone();
        swapped.data = bundle_config_map(&session, &altered, &KeyPair::from_seed([9; 32]))
            .expect("bundle")
            .data;
        assert_eq!(
            sealed_bundle(&session, &swapped, &key.public()),
            Err(Unsealed::BadSeal)
        );
        // The operator's own seal of another Session's bundle.
        let mut other = session.clone();
        other.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
        let elsewhere = bundle_config_map(&other, &bundle, &key).expect("bundle");
        assert_eq!(
            sealed_bundle(&session, &elsewhere, &key.public()),
            Err(Unsealed::BadSeal)
        );
    }

    #[test]
    fn the_network_policy_denies_ingress_and_allows_only_dns_pods_and_the_gateway() {
        let policy = network_policy("team-a", &settings());
        assert_eq!(policy.metadata.owner_references, None, "no one Session's");
        let spec = policy.spec.expect("spec");
        let selected = spec.pod_selector.as_ref().and_then(|s| s.match_labels.clone());
        assert_eq!(
            selected,
            Some(BTreeMap::from([(labels::ROLE.to_owned(), "runner".to_owned())])),
            "every runner pod of the namespace, and only runner pods"
        );
        assert_eq!(spec.ingress, Some(vec![]));
        let egress = spec.egress.expect("egress");
        assert_eq!(
            egress.len(),
            3,
            "DNS pods, gateway pods, the operator's extra rule; never the profile's allowlist"
        );
        assert!(
            !sandbox().egress.is_empty(),
            "the profile's allowlist exists and is left to capability pods"
        );
        for rule in &egress[..2] {
            let peers = rule.to.as_ref().expect("a destination");
            assert!(
                peers
                    .iter()
                    .all(|p| p.ip_block.is_none() && p.namespace_selector.is_some())
            );
        }
    }
}
