//! The replay gate's Job (pure builders): a batch/v1 Job, named after the candidate's digest so
//! it is created once per candidate, that runs `contextos replay` over recorded sessions of the
//! tenant against the candidate spec (mounted from a ConfigMap), sandboxed like a runner pod and,
//! like it, reaching nothing but the gateway service (which lets it read its tenant's records
//! with the operator's read grant), and reports its [`ReplayGate`] summary in its termination
//! message. Its exit code is the gate:
//! 0 passed, 3 diverged past the threshold, 4 nothing recorded to replay.

use contextos_crds::{common::ReplaySpec, labels};
use contextos_runner::{
    keys::KeyPair,
    read_grant::{READ_GRANT_ENV, ReadGrant, SignedReadGrant},
    records::store::remote::TOKEN_FILE_ENV,
    run::{pod::paths, replay::ReplayGate},
};
use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::{Value, json};

use crate::session_children::{RunnerSettings, gateway_egress, gateway_token_volume};

/// Where the candidate is mounted in the Job's pod.
const CANDIDATE_DIR: &str = "/var/run/contextos/candidate";
const CANDIDATE_KEY: &str = "candidate.yaml";

/// What identifies one gate run.
#[derive(Clone, Debug)]
pub struct GateTarget<'a> {
    /// `contextpack` or `policy`.
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub digest: &'a str,
    pub owner: Option<OwnerReference>,
}

/// Deterministic Job (and candidate ConfigMap) name for a candidate digest.
pub fn job_name(target: &GateTarget<'_>) -> String {
    let hex = target.digest.strip_prefix("sha256:").unwrap_or(target.digest);
    let mut name = format!("replay-{}-{}", target.kind, target.name);
    name.truncate(52);
    format!("{name}-{}", &hex[..hex.len().min(10)])
}

fn metadata(target: &GateTarget<'_>) -> Value {
    json!({
        "name": job_name(target),
        "namespace": target.namespace,
        "labels": {labels::REVISION_OF: format!("{}.{}", target.kind, target.name)},
        "annotations": {"contextos.dev/digest": target.digest},
        "ownerReferences": target.owner.iter().collect::<Vec<_>>(),
    })
}

/// The candidate object, as `contextos replay --candidate` reads it.
pub fn candidate_config_map(target: &GateTarget<'_>, object: &Value) -> Result<ConfigMap, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(target),
        "immutable": true,
        "data": {CANDIDATE_KEY: serde_json::to_string(object)?},
    }))
}

/// How long a replay Job's read grant is valid (beyond the Job's deadline: it starts late when
/// the cluster is busy).
const GRANT_SECONDS: i64 = 3 * 3600;

/// The read grant of a replay Job: its tenant's records, for its own pods only.
pub fn read_grant(target: &GateTarget<'_>, key: &KeyPair, now_ms: i64) -> SignedReadGrant {
    SignedReadGrant::sign(
        ReadGrant {
            tenant_id: target.namespace.to_owned(),
            job: job_name(target),
            issued_at_ms: now_ms,
            expires_at_ms: now_ms + GRANT_SECONDS * 1000,
        },
        key,
    )
}

/// The replay Job: it reads the tenant's records through the gateway service with its pod's
/// projected token and the operator's read grant, and holds nothing else.
pub fn job(
    target: &GateTarget<'_>,
    replay: &ReplaySpec,
    image: &str,
    settings: &RunnerSettings,
    grant: &SignedReadGrant,
) -> Result<Job, serde_json::Error> {
    let name = job_name(target);
    let mut args = vec![
        "replay".to_owned(),
        "--sample".into(),
        replay.sample_size.to_string(),
        "--since".into(),
        format!("{}h", replay.window_hours),
        "--candidate".into(),
        format!("{CANDIDATE_DIR}/{CANDIDATE_KEY}"),
        "--max-divergence-percent".into(),
        replay.max_divergence_percent.to_string(),
        "--summary".into(),
        "/dev/termination-log".into(),
    ];
    for agent in &replay.selector.agents {
        args.extend(["--agent".to_owned(), agent.clone()]);
    }
    if !replay.selector.match_labels.is_empty() {
        let selector: Vec<String> = replay
            .selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        args.extend(["--selector".to_owned(), selector.join(",")]);
    }
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(target),
        "spec": {
            // The exit code is the verdict: never retried.
            "backoffLimit": 0,
            "activeDeadlineSeconds": 1800,
            "template": {
                "metadata": {"labels": {labels::ROLE: "replay"}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "replay",
                        "image": image,
                        "args": args,
                        "env": [
                            {"name": "CONTEXTOS_STORE", "value": format!("gateway+{}", settings.gateway)},
                            {"name": "CONTEXTOS_TENANT", "value": target.namespace},
                            {"name": READ_GRANT_ENV, "value": serde_json::to_string(grant)?},
                            {"name": TOKEN_FILE_ENV, "value": format!("{}/{}", paths::TOKEN_DIR, paths::TOKEN_FILE)},
                        ],
                        "resources": {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        // Only the file counts: logs may hold recorded (hostile) tool text.
                        "terminationMessagePolicy": "File",
                        "volumeMounts": [
                            {"name": "candidate", "mountPath": CANDIDATE_DIR, "readOnly": true},
                            {"name": "gateway-token", "mountPath": paths::TOKEN_DIR, "readOnly": true},
                        ],
                    }],
                    "volumes": [{"name": "candidate", "configMap": {"name": name}}, gateway_token_volume()],
                },
            },
        },
    }))
}

/// The replay pod's NetworkPolicy: no ingress; egress only to the cluster DNS pods and the
/// gateway service's pods. A replay calls no tool and no model.
pub fn network_policy(
    target: &GateTarget<'_>,
    settings: &RunnerSettings,
) -> Result<k8s_openapi::api::networking::v1::NetworkPolicy, serde_json::Error> {
    let rules = gateway_egress(settings);
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(target),
        "spec": {
            "podSelector": {"matchLabels": {"job-name": job_name(target)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": rules,
        },
    }))
}

/// How a replay Job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum JobOutcome {
    Running,
    /// Finished; its summary (when the pod reported one) and exit code.
    Finished {
        gate: Option<ReplayGate>,
        exit_code: Option<i32>,
    },
}

/// Reads a Job and its pod.
pub fn outcome(job: &Job, pods: &[Pod]) -> JobOutcome {
    let status = job.status.clone().unwrap_or_default();
    let finished = status.succeeded.unwrap_or(0) > 0 || status.failed.unwrap_or(0) > 0;
    if !finished {
        return JobOutcome::Running;
    }
    let terminated = pods
        .iter()
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?
                .terminated
                .clone()
        })
        .next();
    let gate = terminated
        .as_ref()
        .and_then(|t| t.message.as_deref())
        .and_then(|m| {
            m.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<ReplayGate>(l.trim()).ok())
        });
    JobOutcome::Finished {
        gate,
        exit_code: terminated.map(|t| t.exit_code),
    }
}
