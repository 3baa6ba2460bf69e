//! The replay gate's Jobs (pure builders and readers): a batch/v1 Job per attempt, named after
//! the candidate's digest, that runs `contextos replay-gate` sandboxed like a runner pod and,
//! like it, reaching nothing but the gateway service. Its read grant orders the gate — which
//! candidate (by digest) and how to sample — and the gateway replays the tenant's recorded
//! runs itself and signs the verdict with the tenant's key; the pod only carries that verdict
//! to its termination file. A verdict without the gateway's signature is no verdict: the
//! attempt is inconclusive, and the gate retries a bounded number of times.

use contextos_crds::{
    common::{ReexecutionSummary, ReplaySpec, ReplaySummary},
    labels,
};
use contextos_runner::{
    keys::{KeyPair, PublicKey},
    read_grant::{READ_GRANT_ENV, ReadGrant, SignedReadGrant},
    records::store::remote::TOKEN_FILE_ENV,
    run::{
        gate::{ExpectedChange, GateOrder, GateRound, GatedKind, SignedGateVerdict, reexecution_of},
        pod::paths,
        replay::ReplayGate,
    },
};
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            ConfigMap, ConfigMapVolumeSource, Container, EnvVar, Pod, PodSpec, PodTemplateSpec,
            ResourceRequirements, SeccompProfile, Volume, VolumeMount,
        },
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference},
    },
};
use serde_json::Value;

use crate::{pod_parts, session_children::RunnerSettings};

/// Where the candidate is mounted in the Job's pod.
const CANDIDATE_DIR: &str = "/var/run/contextos/candidate";
const CANDIDATE_KEY: &str = "candidate.yaml";

/// What identifies one gate run.
#[derive(Clone, Debug)]
pub struct GateTarget<'a> {
    pub kind: GatedKind,
    pub name: &'a str,
    pub namespace: &'a str,
    pub digest: &'a str,
    pub owner: Option<OwnerReference>,
    /// The Proposal whose candidate this replays (its Jobs are its own, never the target's
    /// gate's), and the calls its evidence names.
    pub proposal: Option<&'a str>,
    pub expected: &'a [ExpectedChange],
    /// An Agent candidate's model prices by routing name (see [`GateOrder::prices`]).
    pub prices: &'a std::collections::BTreeMap<String, contextos_runner::pricing::PinnedPrice>,
    /// Which round of the object's gate this is: a Job's order and verdict count only for it.
    pub round: GateRound,
    /// Whether the object's status holds `round` already: a Job is ordered only for a round
    /// on record, so that a round never ordered twice for different candidates (a status write
    /// that failed after its Job was made would otherwise leave its number free).
    pub round_saved: bool,
}

/// Automatic attempts at one candidate's gate: an attempt that ends without a verdict
/// (evicted, past its deadline, no report) is retried until this many were made.
pub const MAX_ATTEMPTS: u32 = 3;

/// The label value naming the object a gate is for (`policy.<name>`).
pub fn revision_of(target: &GateTarget<'_>) -> String {
    format!("{}.{}", kind_label(target.kind), target.name)
}

/// The lowercase kind used in names and labels.
pub fn kind_label(kind: GatedKind) -> &'static str {
    match kind {
        GatedKind::Policy => "policy",
        GatedKind::ContextPack => "contextpack",
        GatedKind::Agent => "agent",
        GatedKind::Skill => "skill",
    }
}

/// Deterministic name of the candidate's ConfigMap and of its first Job; later attempts add
/// `-a<n>`. A name cut to fit ends in a few characters of the object's uid: two objects whose
/// names begin alike never share a gate's Jobs.
pub fn job_name(target: &GateTarget<'_>) -> String {
    const WHOLE: usize = 48;
    let hex = target.digest.strip_prefix("sha256:").unwrap_or(target.digest);
    let mut name = match target.proposal {
        // Named after the Proposal's uid already, within the length.
        Some(proposal) => format!("proposal-{proposal}"),
        None => format!("replay-{}-{}", kind_label(target.kind), target.name),
    };
    if name.len() > WHOLE {
        let uid: String = target
            .round
            .uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(6)
            .collect();
        name.truncate(WHOLE - 1 - uid.len());
        name = format!("{}-{uid}", name.trim_end_matches(['-', '.']));
    }
    format!("{name}-{}", &hex[..hex.len().min(10)])
}

/// The Job of attempt `attempt` (from 1).
pub fn attempt_job_name(target: &GateTarget<'_>, attempt: u32) -> String {
    match attempt {
        0 | 1 => job_name(target),
        n => format!("{}-a{n}", job_name(target)),
    }
}

fn metadata(target: &GateTarget<'_>) -> ObjectMeta {
    metadata_named(target, job_name(target))
}

fn metadata_named(target: &GateTarget<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(target.namespace.to_owned()),
        labels: Some(BTreeMap::from([(
            labels::REVISION_OF.to_owned(),
            revision_of(target),
        )])),
        annotations: Some(BTreeMap::from([(
            "contextos.dev/digest".to_owned(),
            target.digest.to_owned(),
        )])),
        owner_references: target.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The labels of a replay Job's pods (its NetworkPolicy selects them).
fn pod_labels(target: &GateTarget<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::ROLE.to_owned(), "replay".to_owned()),
        (labels::REVISION_OF.to_owned(), revision_of(target)),
    ])
}

/// The candidate object, as `contextos replay --candidate` reads it.
pub fn candidate_config_map(target: &GateTarget<'_>, object: &Value) -> Result<ConfigMap, serde_json::Error> {
    Ok(ConfigMap {
        metadata: metadata(target),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            CANDIDATE_KEY.to_owned(),
            serde_json::to_string(object)?,
        )])),
        ..ConfigMap::default()
    })
}

/// How long a replay Job's read grant is valid (beyond the Job's deadline: it starts late when
/// the cluster is busy).
const GRANT_SECONDS: i64 = 3 * 3600;

/// The read grant of a replay Job: its tenant's records, for its own pods only, and the gate
/// it orders.
pub fn read_grant(
    target: &GateTarget<'_>,
    replay: &ReplaySpec,
    attempt: u32,
    key: &KeyPair,
    now_ms: i64,
) -> SignedReadGrant {
    SignedReadGrant::sign(
        ReadGrant {
            tenant_id: target.namespace.to_owned(),
            job: attempt_job_name(target, attempt),
            issued_at_ms: now_ms,
            expires_at_ms: now_ms + GRANT_SECONDS * 1000,
            gate: Some(order(target, replay)),
        },
        key,
    )
}

/// The gate `target`'s Jobs order, sampled and judged as `replay` says.
fn order(target: &GateTarget<'_>, replay: &ReplaySpec) -> GateOrder {
    GateOrder {
        kind: target.kind,
        name: target.name.to_owned(),
        candidate_digest: target.digest.to_owned(),
        // The gateway takes the order literally: whether to re-execute is decided here.
        replay: ReplaySpec {
            reexecute: reexecution_of(target.kind, replay, target.proposal.is_some()),
            ..replay.clone()
        },
        expected: target.expected.to_vec(),
        prices: target.prices.clone(),
        round: Some(target.round.clone()),
    }
}

/// The replay Job: it reads the tenant's records through the gateway service with its pod's
/// projected token and the operator's read grant, and holds nothing else.
pub fn job(
    target: &GateTarget<'_>,
    attempt: u32,
    image: &str,
    settings: &RunnerSettings,
    grant: &SignedReadGrant,
) -> Result<Job, serde_json::Error> {
    let name = job_name(target);
    let args = vec![
        "replay-gate".to_owned(),
        "--candidate".into(),
        format!("{CANDIDATE_DIR}/{CANDIDATE_KEY}"),
        "--summary".into(),
        "/dev/termination-log".into(),
    ];
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ])
    };
    let (token, token_mount) = pod_parts::gateway_token();
    let container = Container {
        name: "replay".into(),
        image: Some(image.to_owned()),
        args: Some(args),
        env: Some(vec![
            env("CONTEXTOS_STORE", format!("gateway+{}", settings.gateway)),
            env("CONTEXTOS_TENANT", target.namespace.to_owned()),
            env(READ_GRANT_ENV, serde_json::to_string(grant)?),
            env(
                TOKEN_FILE_ENV,
                format!("{}/{}", paths::TOKEN_DIR, paths::TOKEN_FILE),
            ),
        ]),
        resources: Some(ResourceRequirements {
            limits: Some(quantities("1", "512Mi")),
            requests: Some(quantities("100m", "128Mi")),
            ..ResourceRequirements::default()
        }),
        security_context: Some(pod_parts::container_security(true)),
        // Only the file counts: logs may hold recorded (hostile) tool text.
        termination_message_policy: Some("File".into()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "candidate".into(),
                mount_path: CANDIDATE_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            token_mount,
        ]),
        ..Container::default()
    };
    let candidate = Volume {
        name: "candidate".into(),
        config_map: Some(ConfigMapVolumeSource {
            name,
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    let runtime_default = SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    };
    Ok(Job {
        metadata: metadata_named(target, attempt_job_name(target, attempt)),
        spec: Some(JobSpec {
            // The verdict is the gateway's; a failed pod is retried as a new attempt (a new
            // Job), never by the Job itself.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(1800),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(target)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_parts::pod_security(65532, runtime_default)),
                    containers: vec![container],
                    volumes: Some(vec![candidate, token]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// The replay pod's NetworkPolicy: no ingress; egress only to the cluster DNS pods and the
/// gateway service's pods. A replay calls no tool and no model.
pub fn network_policy(target: &GateTarget<'_>, settings: &RunnerSettings) -> NetworkPolicy {
    NetworkPolicy {
        metadata: metadata(target),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some(pod_labels(target)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(Vec::new()),
            egress: Some(pod_parts::gateway_egress(settings)),
        }),
    }
}

/// Why `job`, at one of `target`'s attempt names, is not this round's, if it is not: it must
/// make replay pods, and its pod's read grant must be one the operator signed (`operator`)
/// ordering exactly this gate now — candidate, round, sampling and thresholds (`replay`), the
/// evidence and the prices. A Job left from an earlier round (the object had this candidate
/// before, then others) would report a verdict on what ran then; one ordered before the gate
/// was tightened, a verdict under the looser one; one planted at the name carries no grant of
/// its own, or a copied one on pods the gateway does not hear.
pub fn not_this_round(
    target: &GateTarget<'_>,
    replay: &ReplaySpec,
    job: &Job,
    operator: &PublicKey,
) -> Option<String> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let template = job.spec.as_ref().map(|s| &s.template);
    let replay_pods = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get(labels::ROLE))
        .is_some_and(|role| role == "replay");
    if !replay_pods {
        return Some(format!("Job {name} does not make replay pods"));
    }
    let grant = template
        .and_then(|t| t.spec.as_ref())
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == READ_GRANT_ENV)
        .and_then(|e| e.value.as_deref())
        .and_then(|v| serde_json::from_str::<SignedReadGrant>(v).ok());
    let Some(grant) = grant.as_ref().and_then(|g| g.signed_by(operator)) else {
        return Some(format!("Job {name} carries no read grant the operator signed"));
    };
    let now = order(target, replay);
    let ordered = grant
        .gate
        .as_ref()
        .filter(|_| grant.job == name && grant.tenant_id == target.namespace);
    match ordered {
        Some(ordered) if *ordered == now => None,
        Some(GateOrder {
            round: Some(round),
            candidate_digest,
            ..
        }) if *candidate_digest == now.candidate_digest
            && round.uid == target.round.uid
            && *round != target.round =>
        {
            Some(format!(
                "Job {name} replays this candidate for round {} of the gate (now round {}), against what ran then",
                round.serial, target.round.serial
            ))
        }
        Some(_) => Some(format!(
            "Job {name} was ordered for another gate, an object of this name since deleted, or under other settings (sampling, thresholds, prices) than the gate's now"
        )),
        None => Some(format!("Job {name} carries no read grant for this gate")),
    }
}

/// How a replay Job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum JobOutcome {
    Running,
    /// Finished with the gateway's verdict for this very Job and candidate.
    Verdict(ReplayGate),
    /// Finished without one: why, and when it finished (RFC 3339), for the retry's backoff.
    Inconclusive {
        why: String,
        finished_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    },
}

/// Reads a Job of `target`'s gate and its pods. Only pods the Job controls (by uid) count, and
/// only a termination message that is the gateway's verdict, signed with the tenant's `key`,
/// for this Job and candidate: labels, owner references and messages are the tenant's to
/// write.
pub fn outcome(target: &GateTarget<'_>, job: &Job, pods: &[Pod], key: &PublicKey) -> JobOutcome {
    let status = job.status.clone().unwrap_or_default();
    let finished = status.succeeded.unwrap_or(0) > 0 || status.failed.unwrap_or(0) > 0;
    let ended_at = status
        .conditions
        .iter()
        .flatten()
        .filter(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .filter_map(|c| c.last_transition_time.clone())
        .max_by_key(|t| t.0);
    if !finished && ended_at.is_none() {
        return JobOutcome::Running;
    }
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let uid = job.metadata.uid.as_deref();
    // Only the job controller makes pods labelled as replay pods (admission policy
    // contextos-replay-pods); anyone may make an unlabelled pod naming the Job as its
    // controller, and have it report first.
    let messages: Vec<(String, i32)> = pods
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::ROLE))
                .is_some_and(|role| role == "replay")
        })
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.kind == "Job" && Some(o.uid.as_str()) == uid)
        })
        .filter_map(|p| {
            let terminated = p
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?
                .terminated
                .clone()?;
            Some((terminated.message.unwrap_or_default(), terminated.exit_code))
        })
        .collect();
    let inconclusive = |why: String| JobOutcome::Inconclusive {
        why,
        finished_at: ended_at.clone(),
    };
    let Some((message, exit_code)) = messages.first() else {
        return inconclusive(format!("Job {job_name} ended without a pod that reported"));
    };
    let Ok(signed) = serde_json::from_str::<SignedGateVerdict>(message.trim()) else {
        return inconclusive(format!(
            "Job {job_name}'s pod ended (exit code {exit_code}) without the gateway's verdict; see its log"
        ));
    };
    match signed.verify(key) {
        Some(v)
            if v.job == job_name
                && Some(v.job_uid.as_str()) == uid
                && v.round.as_ref() == Some(&target.round)
                && v.kind == target.kind
                && v.name == target.name
                && v.candidate_digest == target.digest =>
        {
            JobOutcome::Verdict(v.gate.clone())
        }
        Some(v) if v.round.is_none() => inconclusive(format!(
            "Job {job_name} reported a verdict of a gateway service older than the operator (it names no gate round): upgrade the gateway to the operator's release"
        )),
        Some(_) => inconclusive(format!(
            "Job {job_name} reported a verdict of another Job, round or candidate; it is ignored"
        )),
        None => inconclusive(format!(
            "Job {job_name} reported a verdict the gateway did not sign; it is ignored"
        )),
    }
}

/// How a gate's verdict reads in the gated object's status.
pub fn summary_of(job: &str, gate: &ReplayGate) -> ReplaySummary {
    ReplaySummary {
        job: Some(job.to_owned()),
        sessions: u32::try_from(gate.runs).unwrap_or(u32::MAX),
        decisions: gate.steps,
        divergences: gate.divergent_steps,
        passed: gate.passed,
        top_divergences: gate.top.clone(),
        report: gate.report.clone(),
        reexecution: gate.reexecution.as_ref().map(|r| ReexecutionSummary {
            samples: r.samples,
            diverged_samples: r.diverged_samples,
            refused_calls: r.unrecorded_calls,
            tokens: r.tokens,
        }),
        routing: gate.routing.as_ref().map(|r| {
            let money = |nanos: &std::collections::BTreeMap<String, u64>| {
                nanos
                    .iter()
                    .map(|(currency, n)| format!("{} {currency}", contextos_runner::pricing::Nanos(*n)))
                    .collect()
            };
            contextos_crds::common::RoutingChange {
                turns: r.turns,
                rerouted: r.rerouted,
                recorded_cost: money(&r.recorded_nanos),
                candidate_cost: money(&r.candidate_nanos),
                unpriced_turns: r.unpriced_turns,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use contextos_runner::run::gate::GateVerdict;

    use serde_json::json;

    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef";

    fn target() -> GateTarget<'static> {
        GateTarget {
            kind: GatedKind::Policy,
            name: "guardrails",
            namespace: "shop",
            digest: DIGEST,
            owner: None,
            proposal: None,
            expected: &[],
            prices: &NO_PRICES,
            round: round(7),
            round_saved: true,
        }
    }

    fn round(serial: u64) -> GateRound {
        GateRound {
            uid: "policy-uid".into(),
            serial,
        }
    }

    #[test]
    fn a_routing_candidates_cost_reads_in_the_status() {
        let gate = ReplayGate {
            routing: Some(contextos_runner::run::routing_effect::RoutingEffect {
                turns: 6,
                rerouted: 6,
                recorded_nanos: [("USD".to_owned(), 12_000_000)].into(),
                candidate_nanos: [("USD".to_owned(), 1_200_000)].into(),
                unpriced_turns: 0,
            }),
            ..ReplayGate::no_history(&[])
        };
        let routing = summary_of("replay-agent-a-1", &gate).routing.expect("routing");
        assert_eq!(
            (
                routing.turns,
                routing.rerouted,
                routing.recorded_cost,
                routing.candidate_cost
            ),
            (6, 6, vec!["0.012 USD".to_owned()], vec!["0.0012 USD".to_owned()])
        );
    }

    static NO_PRICES: std::collections::BTreeMap<String, contextos_runner::pricing::PinnedPrice> =
        std::collections::BTreeMap::new();

    fn finished_job(uid: &str) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": job_name(&target()), "uid": uid},
            "status": {"succeeded": 1},
        }))
        .expect("job")
    }

    fn pod(owner_uid: &str, message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"contextos.dev/role": "replay"}, "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": job_name(&target()),
                "uid": owner_uid, "controller": true}]},
            "status": {"containerStatuses": [{
                "name": "replay", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": message}},
            }]},
        }))
        .expect("pod")
    }

    fn signed(job: &str, passed: bool, key: &KeyPair) -> String {
        signed_for(job, "job-uid", round(7), passed, key)
    }

    fn signed_for(job: &str, job_uid: &str, round: GateRound, passed: bool, key: &KeyPair) -> String {
        let mut gate = ReplayGate::no_history(&[]);
        gate.no_history = false;
        gate.passed = passed;
        let verdict = GateVerdict {
            job: job.into(),
            job_uid: job_uid.into(),
            round: Some(round),
            kind: GatedKind::Policy,
            name: "guardrails".into(),
            candidate_digest: DIGEST.into(),
            gate,
        };
        serde_json::to_string(&SignedGateVerdict::sign(verdict, key)).expect("json")
    }

    #[test]
    fn only_the_gateways_verdict_from_the_jobs_own_pod_counts() {
        let tenant = KeyPair::from_seed([5; 32]);
        let key = tenant.public();
        let job = finished_job("job-uid");
        let genuine = signed(&job_name(&target()), false, &tenant);
        assert!(matches!(
            outcome(&target(), &job, &[pod("job-uid", &genuine)], &key),
            JobOutcome::Verdict(ref g) if !g.passed
        ));
        // A tenant's pod labelled like the Job's but not controlled by it.
        let forged = signed(&job_name(&target()), true, &KeyPair::from_seed([6; 32]));
        assert!(matches!(
            outcome(&target(), &job, &[pod("other-uid", &genuine)], &key),
            JobOutcome::Inconclusive { .. }
        ));
        // A verdict not signed by the gateway with the tenant's key.
        assert!(matches!(
            outcome(&target(), &job, &[pod("job-uid", &forged)], &key),
            JobOutcome::Inconclusive { .. }
        ));
        // A genuine verdict carried over from another Job (an earlier attempt, another gate).
        let elsewhere = signed("replay-policy-guardrails-other", true, &tenant);
        assert!(matches!(
            outcome(&target(), &job, &[pod("job-uid", &elsewhere)], &key),
            JobOutcome::Inconclusive { .. }
        ));
        // A pod of the tenant's naming the Job as its controller but not labelled as a replay
        // pod (which only the job controller may make) — here with the genuine verdict of an
        // earlier run of the same Job name, or a forged one to hide a failure — is not heard.
        let mut unlabelled = pod("job-uid", &signed(&job_name(&target()), true, &tenant));
        unlabelled.metadata.labels = None;
        assert!(matches!(
            outcome(&target(), &job, &[unlabelled, pod("job-uid", &genuine)], &key),
            JobOutcome::Verdict(ref g) if !g.passed
        ));
        // A genuine verdict of this Job's name and candidate, but of an earlier round (the
        // policy had this spec before, then others), or of a Job since deleted and made again
        // under the name (say, the tenant's, its pod printing what the old one reported).
        let name = job_name(&target());
        for (uid, round) in [("job-uid", round(6)), ("old-job-uid", round(7))] {
            let carried = signed_for(&name, uid, round, true, &tenant);
            assert!(matches!(
                outcome(&target(), &job, &[pod("job-uid", &carried)], &key),
                JobOutcome::Inconclusive { ref why, .. } if why.contains("round")
            ));
        }
        // A plain report, as an older runner wrote, is no verdict either.
        assert!(matches!(
            outcome(&target(), &job, &[pod("job-uid", r#"{"passed":true}"#)], &key),
            JobOutcome::Inconclusive { .. }
        ));
    }

    #[test]
    fn only_a_job_the_operator_ordered_for_this_round_is_the_rounds() {
        let operator = KeyPair::from_seed([9; 32]);
        let settings = RunnerSettings::default();
        let made = |target: &GateTarget<'_>, key: &KeyPair| {
            let grant = read_grant(target, &ReplaySpec::default(), 1, key, 1_000);
            job(target, 1, "runner:test", &settings, &grant).expect("job")
        };
        let replay = ReplaySpec::default();
        let not_this_round =
            |target: &GateTarget<'_>, job: &Job, key: &PublicKey| not_this_round(target, &replay, job, key);
        let now = target();
        assert_eq!(
            not_this_round(&now, &made(&now, &operator), &operator.public()),
            None
        );
        // Ordered before the gate was tightened (an Agent's spec.promotion is no part of its
        // composition's digest).
        let stricter = ReplaySpec {
            max_divergence_percent: 0,
            sample_size: 50,
            ..ReplaySpec::default()
        };
        assert!(super::not_this_round(&now, &stricter, &made(&now, &operator), &operator.public()).is_some());
        // Made without the replay pods' label (its pods' grants the gateway does not honour).
        let mut unlabelled = made(&now, &operator);
        if let Some(meta) = unlabelled
            .spec
            .as_mut()
            .and_then(|s| s.template.metadata.as_mut())
        {
            meta.labels = None;
        }
        assert!(not_this_round(&now, &unlabelled, &operator.public()).is_some());
        // The Job of an earlier round of the same candidate, kept since (a pass promoted it,
        // other specs came, then this one again).
        let earlier = GateTarget {
            round: round(6),
            ..target()
        };
        let why = not_this_round(&now, &made(&earlier, &operator), &operator.public());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("round 6 of the gate (now round 7)")),
            "{why:?}"
        );
        // The same object's name, made again since (another uid).
        let other_object = GateTarget {
            round: GateRound {
                uid: "another-uid".into(),
                serial: 7,
            },
            ..target()
        };
        assert!(not_this_round(&now, &made(&other_object, &operator), &operator.public()).is_some());
        // A Job planted at the name with a grant of its own signing, or none at all.
        let planted = made(&now, &KeyPair::from_seed([1; 32]));
        assert!(not_this_round(&now, &planted, &operator.public()).is_some());
        let mut bare = made(&now, &operator);
        if let Some(spec) = bare.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
            spec.containers[0].env = None;
        }
        assert!(not_this_round(&now, &bare, &operator.public()).is_some());
        // The operator's genuine grant of another candidate, copied into a Job at this name.
        let other_candidate = GateTarget {
            digest: "sha256:fedcba9876543210",
            ..target()
        };
        let mut copied = made(&now, &operator);
        let foreign = made(&other_candidate, &operator);
        copied.spec.as_mut().expect("spec").template = foreign.spec.expect("spec").template;
        assert!(not_this_round(&now, &copied, &operator.public()).is_some());
    }

    #[test]
    fn later_attempts_have_names_of_their_own_within_the_limit() {
        let long = GateTarget {
            name: "a-policy-with-a-name-that-is-as-long-as-kubernetes-allows-for-names",
            ..target()
        };
        let first = attempt_job_name(&long, 1);
        let third = attempt_job_name(&long, MAX_ATTEMPTS);
        assert_ne!(first, third);
        assert!(third.len() <= 63, "{third}");
        assert!(third.starts_with(&first));
        // Another object whose name begins alike, with the same candidate: a Job of its own
        // (each would otherwise take the other's for a Job of another gate, and replace it).
        let alike = GateTarget {
            name: "a-policy-with-a-name-that-is-as-long-as-kubernetes-allows-for-others",
            round: GateRound {
                uid: "0f9e8d7c-6b5a".into(),
                serial: 7,
            },
            ..target()
        };
        assert_ne!(job_name(&long), job_name(&alike));
        assert!(attempt_job_name(&alike, MAX_ATTEMPTS).len() <= 63);
        // A short name stays as it is.
        assert_eq!(job_name(&target()), "replay-policy-guardrails-0123456789");
    }
}
