//! The replay gate as the gateway service runs it. The operator orders a gate in a replay Job's
//! read grant (which candidate, by digest, and how to sample); the Job's pod hands the gateway
//! the candidate; the gateway checks it is the ordered one, replays the tenant's recorded runs
//! itself and signs the verdict with the tenant's key. The operator believes a verdict only
//! with that signature: a pod's termination message is the tenant's to write (its own pod, a
//! pod labelled like the Job's, `kubectl exec`), a gateway signature is not.

use std::{collections::BTreeMap, sync::Arc};

use contextos_crds::{
    PolicySpec,
    common::{ReexecuteSpec, ReplaySpec},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    gateway::bundle::NamedPolicy,
    keys::{KeyPair, PublicKey},
    model::metered::Meter,
    records::{RecordStore, RunFilter, TenantId, canonical::canonical_bytes_of},
    run::{
        bundle::{Candidate, Composition, PackRevision, spec_digest},
        reexecute::{ModelSource, Reexecution},
        replay::{Judging, ReplayError, ReplayGate, intended_calls, replay_runs},
    },
};

/// Where a replay Job's pod asks the gateway for its gate (under the service root).
pub const GATE_PATH: &str = "/v1/records/gate";

/// The longest a gate runs in the gateway; one that runs longer fails, saying so (a replay
/// Job's deadline is 30 minutes).
pub const GATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// Gates one gateway replica runs at once, for one tenant and for all.
pub const GATES_PER_TENANT: usize = 2;
pub const GATES_PER_REPLICA: usize = 8;

/// The code of a gate the gateway does not start now: the tenant's or the replica's gates are
/// all running.
pub const GATES_BUSY: &str = "gates_busy";
/// The code of a gate whose Job's gate already runs (started by an earlier request of its pod).
pub const GATE_RUNNING: &str = "gate_running";

/// How long a replay Job's pod keeps asking a gateway whose gates are busy: the Job's 30
/// minutes less the gate's own [`GATE_DEADLINE`], the 2 minutes its answer is waited for
/// beyond it, and 3 for the pod to start (on a busy node it took that long). A Job's pod ends
/// once, and an ended pod without a verdict spends one of the gate's few attempts: busy gates
/// (another tenant's long replays) must not spend them, nor a gate started too late to end
/// before its Job's deadline.
pub const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The pause before asking a busy gateway again, the `retry`th time (from 0): 5 s, doubling
/// to a minute, and up to a fifth more by `jitter` (0–255), so gates refused together do not
/// all come back together.
pub fn busy_pause(retry: u32, jitter: u8) -> std::time::Duration {
    let base = std::time::Duration::from_secs(5 << retry.min(4)).min(std::time::Duration::from_secs(60));
    base + base * u32::from(jitter) / (5 * 255)
}

/// [`busy_pause`] with a random jitter.
pub fn jittered_busy_pause(retry: u32) -> std::time::Duration {
    let mut jitter = [0u8];
    let _ = getrandom::fill(&mut jitter);
    busy_pause(retry, jitter[0])
}

/// Asks with `ask` until the gateway answers other than that its gates are busy, pausing
/// `pause(retry)` in between, or until `patience` has passed — then the last refusal is the
/// answer, saying that this pod stopped asking (the gateway's own text says to ask again).
pub async fn asked_until_started<T, F, Fut>(
    mut ask: F,
    patience: std::time::Duration,
    pause: impl Fn(u32) -> std::time::Duration,
) -> Result<T, crate::records::store::remote::RemoteError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::records::store::remote::RemoteError>>,
{
    use crate::records::store::remote::RemoteError;
    let until = tokio::time::Instant::now() + patience;
    for retry in 0.. {
        match ask().await {
            Err(RemoteError::Refused { code, error, .. })
                if (code == GATES_BUSY || code == GATE_RUNNING) && tokio::time::Instant::now() < until =>
            {
                let pause = pause(retry).min(until - tokio::time::Instant::now());
                tracing::warn!(%error, pause_s = pause.as_secs(), "the gateway did not start the gate yet; asking again");
                tokio::time::sleep(pause).await;
            }
            Err(RemoteError::Refused {
                code,
                error,
                status,
                retry_after,
            }) if code == GATES_BUSY || code == GATE_RUNNING => {
                return Err(RemoteError::Refused {
                    error: format!(
                        "{error} — this pod asked for {} s and stopped asking: the gate did not start in time for this Job's deadline",
                        patience.as_secs()
                    ),
                    code,
                    status,
                    retry_after,
                });
            }
            answered => return answered,
        }
    }
    unreachable!("the loop returns")
}

/// What kind of object a candidate revision is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatedKind {
    Policy,
    ContextPack,
    /// An Agent's composition (see [`Composition`]).
    Agent,
    /// A Skill with the policies its suite runs under (see
    /// [`crate::skills::SkillCandidate`]): its gate runs the evaluation suite, not a replay.
    Skill,
}

impl GatedKind {
    /// The `kind` of the object's manifest.
    pub fn api_kind(self) -> &'static str {
        match self {
            Self::Policy => "Policy",
            Self::ContextPack => "ContextPack",
            Self::Agent => "Agent",
            Self::Skill => "Skill",
        }
    }
}

/// The operator's order for one gate, carried in the replay Job's signed read grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateOrder {
    pub kind: GatedKind,
    pub name: String,
    /// `spec_digest` of the candidate's spec: the only candidate this gate replays.
    pub candidate_digest: String,
    pub replay: ReplaySpec,
    /// For a Proposal's replay: the calls its evidence names. Divergences from each on, in its
    /// run, are the change it means to make and are shown but not counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected: Vec<ExpectedChange>,
    /// An Agent candidate's model prices, by routing name (`primary` for its own model), as the
    /// cluster's PriceLists price them when the gate is ordered: what the replay reports the
    /// candidate's routing would cost (a model no price is given for is priced as the runs
    /// pinned it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, crate::pricing::PinnedPrice>,
    /// Which round of the object's gate this is (echoed in the verdict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<GateRound>,
}

/// One round of an object's gate: the object (by uid, so one deleted and made again under its
/// name starts afresh) and its candidate's serial number (`status.revisions.candidateSerial`;
/// a Proposal's `status.round`, one more each time it went Stale or Invalid). The same candidate digest ordered again later — after the object
/// had others — is another round, replayed against what ran since: the verdict of the earlier
/// one does not count for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateRound {
    pub uid: String,
    pub serial: u64,
}

/// A recorded call a proposal means to change, as its evidence names it: the entry's position
/// and hash, which the gateway checks against the record before excusing anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpectedChange {
    pub run_id: String,
    pub call_id: String,
    pub seq: u64,
    /// The entry's hash (hex).
    pub hash: String,
}

/// The most expected changes one gate takes (a Proposal's evidence is bounded the same).
pub const MAX_EXPECTED: usize = 64;

/// Why `expected` does not name entries of the tenant's record, if it does not.
async fn unrecorded<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    expected: &[ExpectedChange],
) -> Result<Option<String>, ReplayError> {
    if expected.len() > MAX_EXPECTED {
        return Ok(Some(format!(
            "the proposal names {} evidence entries, more than {MAX_EXPECTED}",
            expected.len()
        )));
    }
    for e in expected {
        // The one entry it names, not the run from there on.
        let entries = match crate::records::read::read_stored_page(store, tenant, &e.run_id, e.seq, 1).await {
            Ok(entries) => entries,
            Err(crate::records::read::ReadError::Store(error)) => return Err(error.into()),
            Err(_) => Vec::new(),
        };
        let matches = entries.first().is_some_and(|(hash, entry)| {
            entry.seq == e.seq && hash.to_hex() == e.hash && entry.body.call_id() == Some(e.call_id.as_str())
        });
        if !matches {
            return Ok(Some(format!(
                "evidence entry {} of run {} (call {}) is not that call's entry in the record; nothing is excused on its word",
                e.seq, e.run_id, e.call_id
            )));
        }
    }
    Ok(None)
}

/// Why a candidate is not the one the order names.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the candidate is a {found} named {name:?}; the gate was ordered for {kind} {expected:?}")]
    WrongObject {
        kind: &'static str,
        expected: String,
        found: String,
        name: String,
    },
    #[error("the candidate's spec cannot be read as a {kind}: {detail}")]
    Unreadable { kind: &'static str, detail: String },
    #[error("the candidate's spec has digest {found}; the gate was ordered for {expected}")]
    WrongDigest { expected: String, found: String },
}

impl GateOrder {
    /// The candidate in `object` (a manifest), if it is exactly the ordered one.
    pub fn candidate(&self, object: &Value) -> Result<Candidate, GateError> {
        let kind = self.kind.api_kind();
        let found_kind = object["kind"].as_str().unwrap_or_default();
        let found_name = object["metadata"]["name"].as_str().unwrap_or_default();
        if found_kind != kind || found_name != self.name {
            return Err(GateError::WrongObject {
                kind,
                expected: self.name.clone(),
                found: found_kind.to_owned(),
                name: found_name.to_owned(),
            });
        }
        let unreadable = |e: serde_json::Error| GateError::Unreadable {
            kind,
            detail: e.to_string(),
        };
        let spec = object["spec"].clone();
        let (digest, candidate) = match self.kind {
            GatedKind::Policy => {
                let spec: PolicySpec = serde_json::from_value(spec).map_err(unreadable)?;
                let digest = spec_digest(&spec);
                let policy = NamedPolicy {
                    name: self.name.clone(),
                    spec,
                };
                (
                    digest,
                    Candidate {
                        policies: vec![policy],
                        ..Candidate::default()
                    },
                )
            }
            GatedKind::ContextPack => {
                // The revision: its spec and what its ConfigMap sources held.
                let revision: PackRevision = serde_json::from_value(spec).map_err(unreadable)?;
                let digest = revision.digest();
                let pack = revision.named(self.name.clone());
                (
                    digest,
                    Candidate {
                        context_pack: Some(pack),
                        ..Candidate::default()
                    },
                )
            }
            GatedKind::Skill => {
                let skill: crate::skills::SkillCandidate =
                    serde_json::from_value(spec).map_err(unreadable)?;
                (
                    skill.digest(),
                    Candidate {
                        skill: Some(skill),
                        ..Candidate::default()
                    },
                )
            }
            GatedKind::Agent => {
                let composition: Composition = serde_json::from_value(spec).map_err(unreadable)?;
                (
                    composition.digest(),
                    Candidate {
                        composition: Some(composition),
                        ..Candidate::default()
                    },
                )
            }
        };
        if digest != self.candidate_digest {
            return Err(GateError::WrongDigest {
                expected: self.candidate_digest.clone(),
                found: digest,
            });
        }
        Ok(Candidate {
            prices: self.prices.clone(),
            ..candidate
        })
    }
}

/// Whether and how a gate re-executes: `replay.reexecute` when set (0 samples: not at all);
/// unset, a ContextPack's or an Agent's gate re-executes with the default samples, since only
/// the model's answers can judge a change to what it is told, and a Policy's does not. A
/// Proposal's gate on a ContextPack always re-executes (`proposal`).
pub fn reexecution_of(kind: GatedKind, replay: &ReplaySpec, proposal: bool) -> Option<ReexecuteSpec> {
    let default = ReexecuteSpec {
        samples: ReexecuteSpec::DEFAULT_SAMPLES,
        max_tokens: None,
    };
    let spec = match (&replay.reexecute, kind) {
        (Some(spec), _) => spec.clone(),
        (None, GatedKind::ContextPack | GatedKind::Agent) => default.clone(),
        (None, GatedKind::Policy) => return None,
        // A skill's gate runs its suite; nothing recorded is re-executed.
        (_, GatedKind::Skill) => return None,
    };
    match spec.samples {
        0 if proposal && kind == GatedKind::ContextPack => Some(ReexecuteSpec {
            samples: default.samples,
            ..spec
        }),
        0 => None,
        _ => Some(spec),
    }
}

/// Replays the order's sample of `tenant`'s recorded runs under `candidate` (re-executing them
/// with the model from `models` when the order says so), keeps the full report as a blob with
/// the tenant's records, and returns the gate.
pub async fn run_gate<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    order: &GateOrder,
    candidate: &Candidate,
    models: Arc<dyn ModelSource>,
    now_ms: i64,
) -> Result<ReplayGate, ReplayError> {
    let replay = &order.replay;
    let window_ms = i64::from(replay.window_hours).saturating_mul(3_600_000);
    let filter = RunFilter {
        since_ms: Some(now_ms.saturating_sub(window_ms)),
        limit: Some(usize::try_from(replay.sample_size).unwrap_or(usize::MAX)),
        ..RunFilter::default()
    };
    let labels: BTreeMap<String, String> = replay.selector.match_labels.clone();
    if let Some(why) = unrecorded(store, tenant, &order.expected).await? {
        return Ok(ReplayGate::refused(&why));
    }
    let expected: Vec<(String, String)> = order
        .expected
        .iter()
        .map(|e| (e.run_id.clone(), e.call_id.clone()))
        .collect();
    let summary = replay_runs(
        store,
        tenant,
        &filter,
        &replay.selector.agents,
        &labels,
        candidate,
        &Judging {
            max_divergence_percent: f64::from(replay.max_divergence_percent),
            intended: intended_calls(&expected),
            reexecution: replay
                .reexecute
                .as_ref()
                .filter(|r| r.samples > 0)
                .map(|r| Reexecution {
                    samples: r.samples,
                    models,
                    meter: Meter::new(r.max_tokens),
                }),
            examine_at_most: None,
        },
    )
    .await?;
    if summary.runs == 0 {
        // Runs were there but none could be judged (the re-execution's limit, or a quota, was
        // spent in the first; its model could not be asked): the gate fails, saying why. Only
        // a gate that found nothing to replay has no history.
        if let Some(why) = &summary.stopped {
            return Ok(ReplayGate::refused(why));
        }
        return Ok(ReplayGate::no_history(&summary.skipped));
    }
    let report = serde_json::to_vec_pretty(&summary).unwrap_or_default();
    let hash = store.put_blob(tenant, report).await?;
    let mut gate = ReplayGate::of(&summary);
    gate.report = Some(hash.to_hex());
    Ok(gate)
}

/// A gate's outcome as the gateway vouches for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateVerdict {
    /// The replay Job whose read grant ordered it.
    pub job: String,
    /// The uid of the Job whose pod asked, as the gateway read the pod's controller: a verdict
    /// of a Job since deleted and made again under the name is not the new Job's.
    #[serde(default)]
    pub job_uid: String,
    /// The round its order named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<GateRound>,
    pub kind: GatedKind,
    pub name: String,
    pub candidate_digest: String,
    pub gate: ReplayGate,
}

/// A verdict and the gateway's signature over it with the tenant's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedGateVerdict {
    pub verdict: GateVerdict,
    pub signature: String,
}

/// The kubelet keeps at most 4096 bytes of a termination message, where a replay Job's pod
/// carries the signed verdict; a verdict cut there would be no verdict at all.
pub const VERDICT_BYTES: usize = 3800;

impl SignedGateVerdict {
    /// Signs `verdict`, its divergence lines shortened first if it would not fit
    /// [`VERDICT_BYTES`] (the full report is a blob of its own, named in it).
    pub fn sign(mut verdict: GateVerdict, key: &KeyPair) -> Self {
        fit(&mut verdict);
        let signature = key.sign_hex(&signing_bytes(&verdict));
        Self { verdict, signature }
    }

    /// The verdict, if `key` (the tenant's) signed it.
    pub fn verify(&self, key: &PublicKey) -> Option<&GateVerdict> {
        key.verify_hex(&signing_bytes(&self.verdict), &self.signature)
            .then_some(&self.verdict)
    }
}

/// Shortens the divergence lines (escaping can make a line several times longer than its
/// characters), then drops them from the last, until the signed verdict fits [`VERDICT_BYTES`].
/// What else a verdict holds is short: numbers, names and digests.
fn fit(verdict: &mut GateVerdict) {
    let size = |verdict: &GateVerdict| {
        let signed = SignedGateVerdict {
            verdict: verdict.clone(),
            // As it will be: an Ed25519 signature in hex.
            signature: "0".repeat(128),
        };
        serde_json::to_vec(&signed).map_or(usize::MAX, |b| b.len())
    };
    if size(verdict) <= VERDICT_BYTES {
        return;
    }
    for line in &mut verdict.gate.top {
        if line.chars().count() > 120 {
            *line = line.chars().take(120).collect::<String>() + "…";
        }
    }
    while size(verdict) > VERDICT_BYTES && verdict.gate.top.pop().is_some() {}
    if size(verdict) > VERDICT_BYTES {
        // What is left is names, digests and numbers: never this long as the operator makes
        // them. Signed as it is; the operator will say the pod reported no whole verdict.
        tracing::warn!(job = %verdict.job, bytes = size(verdict), "a gate verdict does not fit a termination message");
    }
}

fn signing_bytes(verdict: &GateVerdict) -> Vec<u8> {
    let mut out = b"contextos-gate-verdict/v1\n".to_vec();
    // Plain data: serialization cannot fail.
    out.extend(canonical_bytes_of(verdict).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::run::bundle::NamedPack;

    fn policy() -> Value {
        serde_yaml::from_str(include_str!("../../../examples/quickstart/policy.yaml")).expect("policy")
    }

    #[test]
    fn a_busy_gateway_is_asked_again_later_and_later_not_all_at_once() {
        let s = std::time::Duration::from_secs;
        assert_eq!(busy_pause(0, 0), s(5));
        assert_eq!(busy_pause(1, 0), s(10));
        assert_eq!(busy_pause(3, 0), s(40));
        assert_eq!(busy_pause(4, 0), s(60));
        assert_eq!(busy_pause(40, 0), s(60));
        assert_eq!(busy_pause(4, 255), s(72), "at most a fifth more");
    }

    fn busy(code: &str) -> crate::records::store::remote::RemoteError {
        crate::records::store::remote::RemoteError::Refused {
            code: code.into(),
            error: "busy".into(),
            status: 429,
            retry_after: None,
        }
    }

    /// A Job's pod ends once: a gateway whose gates are taken by others must not make it end
    /// without a verdict (each such end spends one of the gate's attempts).
    #[tokio::test]
    async fn a_gate_refused_while_gates_are_busy_is_asked_again_until_it_starts() {
        use crate::records::store::remote::RemoteError;
        let ms = std::time::Duration::from_millis;
        let asked = std::sync::atomic::AtomicU32::new(0);
        let answer = asked_until_started(
            || async {
                match asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 => Err(busy(GATES_BUSY)),
                    1 => Err(busy(GATE_RUNNING)),
                    _ => Ok("verdict"),
                }
            },
            BUSY_PATIENCE,
            |_| ms(1),
        )
        .await;
        assert_eq!(answer.expect("started"), "verdict");
        assert_eq!(asked.into_inner(), 3);
        // Any other refusal is the answer at once.
        let asked = std::sync::atomic::AtomicU32::new(0);
        let other = asked_until_started(
            || async {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err::<(), _>(busy("forbidden"))
            },
            BUSY_PATIENCE,
            |_| ms(1),
        )
        .await;
        assert!(matches!(other, Err(RemoteError::Refused { code, .. }) if code == "forbidden"));
        assert_eq!(asked.into_inner(), 1);
        // Busy for longer than its patience: the last refusal is the answer.
        let started = tokio::time::Instant::now();
        let gave_up =
            asked_until_started(|| async { Err::<(), _>(busy(GATES_BUSY)) }, ms(50), |_| ms(5)).await;
        assert!(
            matches!(&gave_up, Err(RemoteError::Refused { code, error, .. }) if code == GATES_BUSY && error.contains("stopped asking")),
            "{gave_up:?}"
        );
        assert!(started.elapsed() >= ms(50));
    }

    fn order_for(object: &Value) -> GateOrder {
        let spec: PolicySpec = serde_json::from_value(object["spec"].clone()).expect("spec");
        GateOrder {
            kind: GatedKind::Policy,
            name: object["metadata"]["name"].as_str().expect("name").to_owned(),
            candidate_digest: spec_digest(&spec),
            replay: ReplaySpec::default(),
            expected: Vec::new(),
            prices: Default::default(),
            round: None,
        }
    }

    #[test]
    fn the_candidate_is_priced_as_the_order_says() {
        let object = policy();
        let price = crate::pricing::PinnedPrice {
            price_list: "usd".into(),
            currency: "USD".into(),
            input_per_million: crate::pricing::Nanos(1),
            output_per_million: crate::pricing::Nanos(2),
            cached_input_per_million: crate::pricing::Nanos(1),
        };
        let order = GateOrder {
            prices: BTreeMap::from([("cheap".to_owned(), price.clone())]),
            ..order_for(&object)
        };
        let candidate = order.candidate(&object).expect("the ordered candidate");
        assert_eq!(candidate.prices.get("cheap"), Some(&price));
    }

    #[test]
    fn only_the_ordered_candidate_is_replayed() {
        let object = policy();
        let order = order_for(&object);
        assert!(order.candidate(&object).is_ok());

        // An older (or any other) spec under the same name: a planted candidate ConfigMap.
        let mut other = object.clone();
        other["spec"]["rules"] = json!([]);
        assert!(matches!(
            order.candidate(&other),
            Err(GateError::WrongDigest { .. })
        ));
        let mut renamed = object.clone();
        renamed["metadata"]["name"] = json!("other");
        assert!(matches!(
            order.candidate(&renamed),
            Err(GateError::WrongObject { .. })
        ));
        let mut pack = object;
        pack["kind"] = json!("ContextPack");
        assert!(matches!(
            order.candidate(&pack),
            Err(GateError::WrongObject { .. })
        ));
    }

    #[test]
    fn an_agent_gate_replays_exactly_the_ordered_composition() {
        let agent: contextos_crds::AgentSpec = serde_json::from_value(json!({
            "model": {"provider": "scripted", "model": "m"},
            "contextPackRef": {"name": "ops"},
            "policyRefs": [{"name": "guardrails"}],
            "sandboxProfileRef": {"name": "default"},
            "budget": {"maxSteps": 4, "maxToolCalls": 4, "maxTokens": 1000, "maxWallSeconds": 60},
        }))
        .expect("agent");
        let pack = NamedPack::new(
            "ops",
            serde_json::from_value(json!({"instructions": "help", "tokenBudget": 1000})).expect("pack"),
        );
        let policy = NamedPolicy {
            name: "guardrails".into(),
            spec: serde_json::from_value(policy()["spec"].clone()).expect("policy"),
        };
        let composition = Composition::new(&agent, pack, vec![policy]);
        let order = GateOrder {
            kind: GatedKind::Agent,
            name: "ops".into(),
            candidate_digest: composition.digest(),
            replay: ReplaySpec::default(),
            expected: Vec::new(),
            prices: Default::default(),
            round: None,
        };
        let object = json!({"kind": "Agent", "metadata": {"name": "ops"}, "spec": composition});
        let candidate = order.candidate(&object).expect("the ordered composition");
        assert_eq!(candidate.composition.as_ref(), Some(&composition));
        // The same agent pointed at another policy is another candidate.
        let mut other = object;
        other["spec"]["policies"][0]["name"] = json!("guardrails-v2");
        assert!(matches!(
            order.candidate(&other),
            Err(GateError::WrongDigest { .. })
        ));
    }

    #[test]
    fn what_changes_what_the_model_is_told_is_re_executed_unless_the_gate_says_otherwise() {
        let with = |reexecute: Option<ReexecuteSpec>| ReplaySpec {
            reexecute,
            ..ReplaySpec::default()
        };
        let set = |samples, max_tokens| Some(ReexecuteSpec { samples, max_tokens });
        let default = set(ReexecuteSpec::DEFAULT_SAMPLES, None);
        let cases = [
            // kind, gate's reexecute, a proposal's gate → what the gateway is ordered
            (GatedKind::ContextPack, None, false, default.clone()),
            (GatedKind::Agent, None, false, default.clone()),
            (GatedKind::Policy, None, false, None),
            (GatedKind::Policy, set(2, Some(5000)), false, set(2, Some(5000))),
            (GatedKind::ContextPack, set(0, None), false, None),
            (GatedKind::Agent, set(0, None), true, None),
            // A pack proposal is judged by what the model does, whatever the gate says.
            (GatedKind::ContextPack, set(0, Some(900)), true, set(3, Some(900))),
            (GatedKind::ContextPack, set(5, None), true, set(5, None)),
        ];
        for (kind, gate, proposal, wanted) in cases {
            assert_eq!(
                reexecution_of(kind, &with(gate.clone()), proposal),
                wanted,
                "{kind:?} {gate:?} proposal={proposal}"
            );
        }
    }

    #[test]
    fn a_verdict_counts_only_with_the_tenants_signature_over_it() {
        let key = KeyPair::from_seed([3; 32]);
        let verdict = GateVerdict {
            job: "replay-policy-p-0123456789".into(),
            job_uid: "uid-1".into(),
            round: Some(GateRound {
                uid: "uid-p".into(),
                serial: 2,
            }),
            kind: GatedKind::Policy,
            name: "p".into(),
            candidate_digest: "sha256:01".into(),
            gate: ReplayGate::no_history(&[]),
        };
        let signed = SignedGateVerdict::sign(verdict, &key);
        // Through JSON, as it travels in a termination message.
        let read: SignedGateVerdict =
            serde_json::from_str(&serde_json::to_string(&signed).expect("json")).expect("read");
        assert!(read.verify(&key.public()).is_some());

        let mut forged = read.clone();
        forged.verdict.gate.passed = true;
        assert!(forged.verify(&key.public()).is_none());
        // Nor may a verdict be moved to another round of the gate, or another Job.
        let mut moved = read.clone();
        moved.verdict.round = Some(GateRound {
            uid: "uid-p".into(),
            serial: 3,
        });
        assert!(moved.verify(&key.public()).is_none());
        let mut moved = read.clone();
        moved.verdict.job_uid = "uid-2".into();
        assert!(moved.verify(&key.public()).is_none());
        let other_tenant = KeyPair::from_seed([4; 32]);
        assert!(read.verify(&other_tenant.public()).is_none());
    }

    #[test]
    fn a_signed_verdict_always_fits_a_termination_message() {
        let key = KeyPair::from_seed([3; 32]);
        // Recorded text is anyone's: quotes and control characters escape to 2 and 6 bytes,
        // wide characters take 4; five lines of 300 characters each.
        for fill in ['"', '\u{1}', '😀', 'a'] {
            let mut gate = ReplayGate::no_history(&[]);
            gate.no_history = false;
            gate.top = vec![fill.to_string().repeat(300); 5];
            let verdict = GateVerdict {
                job: "replay-policy-p-0123456789".into(),
                job_uid: "0d4c6a1e-5b7f-4c39-9e2a-7f1b2c3d4e5f".into(),
                round: Some(GateRound {
                    uid: "6e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b".into(),
                    serial: u64::MAX,
                }),
                kind: GatedKind::Policy,
                name: "p".repeat(253),
                candidate_digest: format!("sha256:{}", "0".repeat(64)),
                gate,
            };
            let signed = SignedGateVerdict::sign(verdict, &key);
            let bytes = serde_json::to_vec(&signed).expect("json").len();
            assert!(bytes <= VERDICT_BYTES, "{fill:?}: {bytes} bytes");
            assert!(signed.verify(&key.public()).is_some());
            assert!(
                !signed.verdict.gate.top.is_empty(),
                "{fill:?}: some lines are kept"
            );
        }
    }
}
