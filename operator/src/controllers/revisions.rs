//! ContextPack, Policy and SandboxProfile: each revision gets a digest; packs and policies get
//! an immutable revision snapshot (a ControllerRevision) once their promotion gate promotes
//! them. A pack's revision is its spec and what its ConfigMap sources hold: editing one of
//! those ConfigMaps makes a candidate like editing the spec. A Policy whose CEL does not
//! compile, or a pack whose ConfigMap source is missing or whose required sources do not fit
//! its budget, is `Ready=False` with the field to fix.

use std::{sync::Arc, time::Duration};

use contextos_crds::{
    ContextPack, ContextPackSpec, Policy, SandboxProfile,
    common::{PromotedBy, PromotionMode, PromotionSpec, ReplaySummary, RevisionStatus},
    conditions::{self, reason},
    labels,
};
use contextos_runner::{
    context::{self, ResolvedSource},
    policy::compile_policy,
    run::{
        bundle::{PackRevision, spec_digest},
        gate::{GateRound, GatedKind},
    },
};
use k8s_openapi::{
    api::{
        apps::v1::ControllerRevision,
        batch::v1::Job,
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, PostParams},
    runtime::controller::Action,
};
use serde_json::json;

use super::{Context, Error, Invalid, Result, apply, apply_status, now};
use crate::{
    conditions::{Wanted, merge},
    replay_job::{self, GateTarget, JobOutcome},
};

/// The ControllerRevision holding a snapshot of `kind`/`name` at `digest`.
pub fn snapshot_name(kind: &str, name: &str, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("{kind}-{name}-{}", &hex[..hex.len().min(10)])
}

async fn snapshot<K>(
    ctx: &Context,
    object: &K,
    kind: &str,
    spec: &impl serde::Serialize,
    digest: &str,
) -> Result<String>
where
    K: kube::Resource<DynamicType = ()>,
{
    let name = snapshot_name(kind, &object.name_any(), digest);
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let data = serde_json::to_value(spec).map_err(|source| Error::Build {
        what: "ControllerRevision",
        source,
    })?;
    let revision = ControllerRevision {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(std::collections::BTreeMap::from([(
                labels::REVISION_OF.to_owned(),
                format!("{kind}.{}", object.name_any()),
            )])),
            annotations: Some(std::collections::BTreeMap::from([(
                "contextos.dev/digest".to_owned(),
                digest.to_owned(),
            )])),
            owner_references: object.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(k8s_openapi::apimachinery::pkg::runtime::RawExtension(
            serde_json::json!({"spec": data}),
        )),
        revision: object.meta().generation.unwrap_or(1),
    };
    apply(
        &Api::<ControllerRevision>::namespaced(ctx.client.clone(), &namespace),
        &revision,
    )
    .await?;
    Ok(name)
}

/// The spec of the promoted revision, from its ControllerRevision snapshot: Sessions run the
/// promoted revision even while a newer candidate waits for its replay gate.
/// The snapshot must hold the promoted digest's spec: a snapshot someone else wrote at that
/// name is not the promoted revision.
pub(super) async fn promoted_spec<T: serde::de::DeserializeOwned + serde::Serialize>(
    ctx: &Context,
    namespace: &str,
    revisions: Option<&contextos_crds::common::RevisionStatus>,
) -> Result<Option<T>> {
    let (Some(snapshot), Some(promoted)) = (
        revisions.and_then(|r| r.promoted_snapshot.as_deref()),
        revisions.and_then(|r| r.promoted.as_deref()),
    ) else {
        return Ok(None);
    };
    let api =
        Api::<k8s_openapi::api::apps::v1::ControllerRevision>::namespaced(ctx.client.clone(), namespace);
    let Some(revision) = api.get_opt(snapshot).await? else {
        return Ok(None);
    };
    let spec = revision
        .data
        .map(|d| d.0["spec"].clone())
        .unwrap_or(serde_json::Value::Null);
    let Ok(spec) = serde_json::from_value::<T>(spec) else {
        return Ok(None);
    };
    if spec_digest(&spec) != promoted {
        tracing::warn!(%namespace, snapshot, promoted, "a revision snapshot does not hold the promoted spec");
        return Ok(None);
    }
    Ok(Some(spec))
}

/// Reconciles a ContextPack.
pub async fn reconcile_context_pack(pack: Arc<ContextPack>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("ContextPack");
    let namespace = pack.namespace().unwrap_or_default();
    let (revision, problem) = match resolve_pack(&ctx, &namespace, &pack.spec).await? {
        Ok(revision) => (revision, None),
        Err(problem) => (
            PackRevision {
                spec: pack.spec.clone(),
                source_contents: Default::default(),
            },
            Some(problem),
        ),
    };
    let gate = Gated {
        kind: GatedKind::ContextPack,
        promotion: pack.spec.promotion.as_ref(),
        ungated: Gated::NO_GATE,
        first_replayed: false,
        reviewers: pack.spec.promotion.as_ref().and_then(|p| p.approvers.clone()),
        spec_digest: spec_digest(&pack.spec),
        revisions: pack
            .status
            .as_ref()
            .and_then(|s| s.revisions.clone())
            .unwrap_or_default(),
        conditions: pack
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        prices: Default::default(),
    };
    let api = Api::<ContextPack>::namespaced(ctx.client.clone(), &namespace);
    finish(&ctx, &api, pack.as_ref(), &revision, gate, problem).await
}

/// At most this many bytes of ConfigMap contents in one pack revision: the revision is kept
/// whole in its snapshot, in the Agents' compositions and in each Session's bundle, each of
/// them one Kubernetes object (about 1 MiB at most).
pub const MAX_SOURCE_CONTENTS: usize = 512 * 1024;

/// The revision of a ContextPack's `spec` in `namespace`: the spec with what its ConfigMap
/// sources hold now. `Ok(Err(..))` names what is wrong: a ConfigMap source that is missing,
/// contents too large to be kept, a memory source that cannot be, required sources that do not
/// fit the budget.
pub(super) async fn resolve_pack(
    ctx: &Context,
    namespace: &str,
    spec: &ContextPackSpec,
) -> Result<Result<PackRevision, Invalid>> {
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace);
    let mut contents = std::collections::BTreeMap::new();
    let mut total = 0usize;
    for (i, source) in spec.sources.iter().enumerate() {
        let Some(key) = &source.config_map_ref else {
            continue;
        };
        let content = config_maps
            .get_opt(&key.name)
            .await?
            .and_then(|cm| cm.data.and_then(|d| d.get(&key.key).cloned()));
        let Some(content) = content else {
            return Ok(Err(Invalid::new(
                reason::REFERENCE_NOT_FOUND,
                format!(
                    "spec.sources[{i}].configMapRef: ConfigMap {} with key {} does not exist in namespace {namespace}; create it or fix the reference",
                    key.name, key.key
                ),
            )));
        };
        total = total.saturating_add(content.len());
        if total > MAX_SOURCE_CONTENTS {
            return Ok(Err(Invalid::new(
                reason::INVALID_SPEC,
                format!(
                    "spec.sources[{i}].configMapRef: with ConfigMap {} key {}, the pack's ConfigMap sources hold more than {} KiB; a pack revision keeps them whole, so split the pack or shorten the sources",
                    key.name,
                    key.key,
                    MAX_SOURCE_CONTENTS / 1024
                ),
            )));
        }
        contents.insert(source.name.clone(), content);
    }
    Ok(match revision_problem(spec, &contents) {
        Some(problem) => Err(problem),
        None => Ok(PackRevision {
            spec: spec.clone(),
            source_contents: contents,
        }),
    })
}

/// What is wrong with a pack `spec` whose ConfigMap sources hold `contents` (pure): a memory
/// source that cannot be, required sources that do not fit the budget with the instructions
/// (an empty request stands in).
pub(super) fn revision_problem(
    spec: &ContextPackSpec,
    contents: &std::collections::BTreeMap<String, String>,
) -> Option<Invalid> {
    if let Some(why) = contextos_runner::memory::desk::source_problem(spec) {
        return Some(Invalid::new(reason::INVALID_SPEC, why));
    }
    let resolved = ResolvedSource::all(contents);
    if context::certainly_fits(spec, &resolved) {
        return None;
    }
    context::compile(spec, &resolved, "", &[])
        .err()
        .map(|e| Invalid::new(reason::INVALID_SPEC, e.to_string()))
}

/// Reconciles a Policy.
pub async fn reconcile_policy(policy: Arc<Policy>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Policy");
    let namespace = policy.namespace().unwrap_or_default();
    let problem = compile_policy(&policy.name_any(), &policy.spec)
        .err()
        .map(|e| Invalid::new(reason::INVALID_EXPRESSION, e.to_string()));
    let gate = Gated {
        kind: GatedKind::Policy,
        promotion: policy.spec.promotion.as_ref(),
        ungated: Gated::NO_GATE,
        first_replayed: false,
        reviewers: policy.spec.promotion.as_ref().and_then(|p| p.approvers.clone()),
        spec_digest: spec_digest(&policy.spec),
        revisions: policy
            .status
            .as_ref()
            .and_then(|s| s.revisions.clone())
            .unwrap_or_default(),
        conditions: policy
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        prices: Default::default(),
    };
    let api = Api::<Policy>::namespaced(ctx.client.clone(), &namespace);
    finish(&ctx, &api, policy.as_ref(), &policy.spec, gate, problem).await
}

/// Reconciles a SandboxProfile: its digest, and Ready — False when a value would have the API
/// server refuse its runner pods (admission checked the schema; see `sandbox_values`) or its
/// RuntimeClass does not exist (looked at again every minute).
pub async fn reconcile_sandbox_profile(profile: Arc<SandboxProfile>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("SandboxProfile");
    let namespace = profile.namespace().unwrap_or_default();
    let previous = profile
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let bad_value = crate::sandbox_values::problem(&profile.spec);
    let class_missing = match bad_value {
        Some(_) => None,
        None => missing_runtime_class(&ctx, profile.spec.runtime_class_name.as_deref()).await?,
    };
    // A RuntimeClass may be installed after the profile that names it; a bad value changes only
    // with the profile.
    let look_again = class_missing.is_some();
    let problem = bad_value.or(class_missing);
    let ready = [match &problem {
        Some(problem) => Wanted::new(conditions::READY, false, reason::INVALID_SPEC, problem.clone()),
        None => Wanted::new(conditions::READY, true, reason::RESOLVED, "the profile is valid"),
    }];
    let status = json!({
        "conditions": merge(&previous, &ready, profile.metadata.generation, now()),
        "observedGeneration": profile.metadata.generation,
        "digest": spec_digest(&profile.spec),
    });
    apply_status(
        &Api::<SandboxProfile>::namespaced(ctx.client.clone(), &namespace),
        profile.as_ref(),
        status,
    )
    .await?;
    Ok(if look_again {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::await_change()
    })
}

/// Why `name` cannot be the runner pods' RuntimeClass: none of that name exists. (An operator
/// not allowed to read RuntimeClasses, as installed before it checked them, leaves it to the
/// API server.)
async fn missing_runtime_class(ctx: &Context, name: Option<&str>) -> Result<Option<String>> {
    let Some(name) = name else {
        return Ok(None);
    };
    let classes = Api::<k8s_openapi::api::node::v1::RuntimeClass>::all(ctx.client.clone());
    match classes.get_opt(name).await {
        Ok(Some(_)) => Ok(None),
        Ok(None) => Ok(Some(format!(
            "spec.runtimeClassName: RuntimeClass {name} does not exist in this cluster, and runner \
             pods naming it are refused; install it (e.g. gVisor's runsc) or remove the field"
        ))),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Wait before the second attempt at a gate whose first ended without a verdict (doubling).
const RETRY_BACKOFF: Duration = Duration::from_secs(10);

pub use contextos_crds::annotations::{APPROVE_PROMOTION, PROMOTE_WITHOUT_REPLAY};

/// What the promotion gate of one object needs.
pub(super) struct Gated<'a> {
    pub kind: GatedKind,
    /// The gate; `None` promotes directly, for the reason given in `ungated`.
    pub promotion: Option<&'a PromotionSpec>,
    pub ungated: (PromotedBy, &'static str),
    /// Whether a first revision is replayed too (an Agent deleted and created again has
    /// recorded sessions; a Policy's first revision is covered by the Agents' gates).
    pub first_replayed: bool,
    /// Who decides its promotions (admission reads the same): an accepted Proposal counts
    /// only while its reviewers are still these.
    pub reviewers: Option<contextos_crds::common::Approvers>,
    /// Digest of the object's own spec (an Agent's candidate is its composition's).
    pub spec_digest: String,
    pub revisions: RevisionStatus,
    pub conditions: Vec<Condition>,
    /// An Agent candidate's model prices by routing name (empty for a pack or a policy).
    pub prices: std::collections::BTreeMap<String, contextos_runner::pricing::PinnedPrice>,
}

impl Gated<'_> {
    pub const NO_GATE: (PromotedBy, &'static str) = (PromotedBy::Ungated, "no promotion gate");
}

/// Where a candidate stands after this pass.
struct Verdict {
    /// Look again after this long (a retry waiting out its backoff).
    requeue: Option<std::time::Duration>,
    /// How the candidate is promoted now, if it is.
    promote: Option<PromotedBy>,
    promoted: Wanted,
    replay: Option<Wanted>,
    awaiting: Option<Wanted>,
    summary: Option<ReplaySummary>,
}

/// The promotion gate's outcome for a valid candidate: the revisions to show, the conditions
/// to set, when to look again.
pub(super) struct GateStep {
    pub revisions: RevisionStatus,
    /// Whether the candidate was promoted in this pass.
    pub promoted_now: Option<PromotedBy>,
    pub wanted: Vec<Wanted>,
    pub requeue: Option<Duration>,
}

/// Runs the promotion gate for `spec` (digest `digest`) and snapshots it if it is promoted.
pub(super) async fn promotion_step<K, S>(
    ctx: &Context,
    object: &K,
    spec: &S,
    gate: &Gated<'_>,
    digest: &str,
) -> Result<GateStep>
where
    K: kube::Resource<DynamicType = ()>,
    S: serde::Serialize,
{
    let mut revisions = gate.revisions.with_candidate(digest);
    let round = GateRound {
        uid: object.meta().uid.clone().unwrap_or_default(),
        serial: revisions.candidate_serial.unwrap_or(0),
    };
    let saved =
        gate.revisions.candidate.as_deref() == Some(digest) && gate.revisions.candidate_serial.is_some();
    let verdict = gate_candidate(ctx, object, spec, gate, digest, (round, saved)).await?;
    let mut wanted = Vec::new();
    if let Some(by) = verdict.promote {
        let kind = replay_job::kind_label(gate.kind);
        revisions.promoted_snapshot = Some(snapshot(ctx, object, kind, spec, digest).await?);
        revisions.promoted_from = revisions.promoted.replace(digest.to_owned());
        revisions.promoted_by = Some(by);
    } else if revisions.promoted.as_deref() == Some(digest) {
        // The revision in force keeps its snapshot: one deleted (by hand, or by a restore that
        // skipped it) is written again from the same spec, or Sessions could not pin it.
        let kind = replay_job::kind_label(gate.kind);
        revisions.promoted_snapshot = Some(snapshot(ctx, object, kind, spec, digest).await?);
    }
    if verdict.summary.is_some() {
        revisions.replay = verdict.summary;
    }
    super::announce(ctx, object, &gate.conditions, &verdict.promoted).await;
    wanted.push(verdict.promoted);
    if let Some(replay) = verdict.replay {
        super::announce(ctx, object, &gate.conditions, &replay).await;
        wanted.push(replay);
    }
    wanted.push(verdict.awaiting.unwrap_or_else(|| {
        Wanted::new(
            conditions::AWAITING_PROMOTION,
            false,
            reason::PROMOTED,
            "nothing waits for a human",
        )
    }));
    Ok(GateStep {
        revisions,
        promoted_now: verdict.promote,
        wanted,
        requeue: verdict.requeue,
    })
}

/// Validity, the promotion gate, status and Events for a ContextPack, Policy or Skill.
pub(super) async fn finish<K, S>(
    ctx: &Context,
    api: &Api<K>,
    object: &K,
    spec: &S,
    gate: Gated<'_>,
    problem: Option<Invalid>,
) -> Result<Action>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let digest = spec_digest(spec);
    let ready = match &problem {
        Some(p) => Wanted::new(conditions::READY, false, p.reason, p.message.clone()),
        None => Wanted::new(conditions::READY, true, reason::RESOLVED, "the spec is valid"),
    };
    let mut wanted = vec![ready.clone()];
    let (revisions, requeue) = if problem.is_none() {
        let step = promotion_step(ctx, object, spec, &gate, &digest).await?;
        wanted.extend(step.wanted);
        (step.revisions, step.requeue)
    } else {
        (gate.revisions.with_candidate(&digest), None)
    };
    let status = json!({
        "conditions": merge(&gate.conditions, &wanted, object.meta().generation, now()),
        "observedGeneration": object.meta().generation,
        "revisions": revisions,
    });
    apply_status(api, object, status).await?;
    super::announce(ctx, object, &gate.conditions, &ready).await;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// The promotion decision for the object's current spec (digest `digest`), in `round` of its
/// gate (and whether the object's status holds that round already).
async fn gate_candidate<K, S>(
    ctx: &Context,
    object: &K,
    spec: &S,
    gate: &Gated<'_>,
    digest: &str,
    (round, round_saved): (GateRound, bool),
) -> Result<Verdict>
where
    K: kube::Resource<DynamicType = ()>,
    S: serde::Serialize,
{
    let promoted_digest = gate.revisions.promoted.clone();
    let in_force = |message: String| Wanted::new(conditions::PROMOTED, true, reason::PROMOTED, message);
    let direct = |by: PromotedBy, why: &str| Verdict {
        requeue: None,
        promote: Some(by),
        promoted: in_force(format!("revision {digest} is in force ({why})")),
        replay: None,
        awaiting: None,
        summary: None,
    };
    let (promotion, old) = match (gate.promotion, promoted_digest) {
        (_, Some(old)) if old == digest => {
            return Ok(Verdict {
                requeue: None,
                promote: None,
                promoted: in_force(format!("revision {digest} is in force")),
                replay: None,
                awaiting: None,
                summary: None,
            });
        }
        (None, _) => return Ok(direct(gate.ungated.0, gate.ungated.1)),
        (Some(_), None) if !gate.first_replayed => {
            return Ok(direct(
                PromotedBy::FirstRevision,
                "first revision: nothing recorded ran under an earlier one",
            ));
        }
        (Some(promotion), old) => (promotion, old),
    };
    let first = old.is_none();
    // What stays in force meanwhile, for the messages.
    let keep = old.map_or_else(
        || "no revision is in force until then".to_owned(),
        |old| format!("{old} stays in force"),
    );
    let annotation = |key: &str| {
        object
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(key).cloned())
    };
    // A Skill is promoted by its suite alone (the annotations' admission rules do not cover
    // Skills, and nothing else decides what a skill may do).
    let skill = gate.kind == GatedKind::Skill;
    if !skill && annotation(PROMOTE_WITHOUT_REPLAY).as_deref() == Some(digest) {
        return Ok(direct(
            PromotedBy::Bypass,
            "promoted without replay by the contextos.dev/promote-without-replay annotation",
        ));
    }
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let name = object.name_any();
    // A reviewer accepted exactly this candidate in a Proposal, after its own replay passed.
    if let Some(accepted) = super::proposal::accepted_for(
        ctx,
        &namespace,
        gate.kind,
        &name,
        digest,
        &gate.spec_digest,
        gate.reviewers.as_ref(),
    )
    .await?
    {
        return Ok(Verdict {
            summary: accepted.replay,
            ..direct(PromotedBy::Proposal, &accepted.why)
        });
    }
    let target = GateTarget {
        kind: gate.kind,
        name: &name,
        namespace: &namespace,
        digest,
        owner: object.controller_owner_ref(&()),
        proposal: None,
        expected: &[],
        prices: &gate.prices,
        round,
        round_saved,
    };
    let held =
        |reason: &'static str, message: String| Wanted::new(conditions::PROMOTED, false, reason, message);
    if skill {
        return skill_verdict(ctx, spec, &target, promotion, digest, &keep).await;
    }
    // A Job the operator did not make (planted before it) sends no events to its owner: look
    // again now and then.
    let replaying = |job_name: &str| Verdict {
        requeue: Some(Duration::from_secs(20)),
        promote: None,
        promoted: held(
            reason::REPLAY_PENDING,
            format!("candidate {digest} is being replayed by Job {job_name}; {keep}"),
        ),
        replay: Some(Wanted::new(
            conditions::REPLAY_PASSED,
            false,
            reason::REPLAY_PENDING,
            format!("Job {job_name} is replaying recorded sessions"),
        )),
        awaiting: None,
        summary: None,
    };
    let inconclusive = |message: String, requeue: Option<Duration>| Verdict {
        requeue,
        promote: None,
        promoted: held(
            reason::REPLAY_INCONCLUSIVE,
            format!("candidate {digest} has no replay verdict; {keep}"),
        ),
        replay: Some(Wanted::new(
            conditions::REPLAY_PASSED,
            false,
            reason::REPLAY_INCONCLUSIVE,
            message,
        )),
        awaiting: None,
        summary: None,
    };
    let (job_name, gate_result) = match replay_attempts(ctx, spec, &target, &promotion.replay).await? {
        Progress::Running(job_name) => return Ok(replaying(&job_name)),
        Progress::Saving => {
            return Ok(Verdict {
                requeue: Some(SAVING_RECHECK),
                promote: None,
                promoted: held(
                    reason::REPLAY_PENDING,
                    format!("candidate {digest} is about to be replayed; {keep}"),
                ),
                replay: Some(Wanted::new(
                    conditions::REPLAY_PASSED,
                    false,
                    reason::REPLAY_PENDING,
                    SAVING_ROUND,
                )),
                awaiting: None,
                summary: None,
            });
        }
        Progress::Refused(problem) => return Ok(inconclusive(problem, Some(Duration::from_secs(30)))),
        Progress::Backoff { attempt, why, wait } => {
            return Ok(inconclusive(retrying(attempt, &why, wait), Some(wait)));
        }
        Progress::Exhausted { attempts, why } => {
            let label = replay_job::revision_of(&target);
            return Ok(inconclusive(
                format!(
                    "{attempts} replay attempts ended without a verdict (last: {why}); delete the Jobs labelled {}={label} to replay again, or an approver sets annotation {PROMOTE_WITHOUT_REPLAY}={digest}",
                    labels::REVISION_OF
                ),
                None,
            ));
        }
        Progress::Verdict(job_name, gate) => (job_name, gate),
    };
    let summary = Some(replay_job::summary_of(&job_name, &gate_result));
    let verdict = |promote, promoted, replay, awaiting| Verdict {
        requeue: None,
        promote,
        promoted,
        replay: Some(replay),
        awaiting,
        summary: summary.clone(),
    };
    let g = gate_result;
    Ok(match g {
        ref g if g.passed => {
            let passed = Wanted::new(
                conditions::REPLAY_PASSED,
                true,
                reason::REPLAY_PASSED,
                format!(
                    "{} recorded session(s), {} step(s): {:.1}% diverged (at most {:.1}%)",
                    g.runs, g.steps, g.divergence_percent, g.max_divergence_percent
                ),
            );
            let approved = annotation(APPROVE_PROMOTION).as_deref() == Some(digest);
            if promotion.mode == PromotionMode::Automatic || approved {
                verdict(
                    Some(PromotedBy::Replay),
                    in_force(format!("revision {digest} is in force (replay passed)")),
                    passed,
                    None,
                )
            } else {
                let waiting = Wanted::new(
                    conditions::AWAITING_PROMOTION,
                    true,
                    reason::REPLAY_PASSED,
                    format!(
                        "replay passed; an approver promotes it by setting annotation {APPROVE_PROMOTION}={digest}"
                    ),
                );
                verdict(
                    None,
                    held(
                        reason::REPLAY_PASSED,
                        format!("candidate {digest} waits for approval; {keep}"),
                    ),
                    passed,
                    Some(waiting),
                )
            }
        }
        // A first revision with nothing recorded to replay it against has nothing to diverge
        // from (an Agent created for the first time).
        ref g if g.no_history && first => verdict(
            Some(PromotedBy::NoHistory),
            in_force(format!(
                "revision {digest} is in force (its gate found no recorded session to replay)"
            )),
            Wanted::new(
                conditions::REPLAY_PASSED,
                true,
                reason::NO_RECORDED_HISTORY,
                "no recorded session: nothing to replay",
            ),
            None,
        ),
        ref g if g.no_history => verdict(
            None,
            held(
                reason::NO_RECORDED_HISTORY,
                format!("candidate {digest} cannot be replayed: no recorded sessions yet; {keep}"),
            ),
            Wanted::new(
                conditions::REPLAY_PASSED,
                false,
                reason::NO_RECORDED_HISTORY,
                format!(
                    "no finished session to replay; to promote anyway set annotation {PROMOTE_WITHOUT_REPLAY}={digest}"
                ),
            ),
            None,
        ),
        ref g => verdict(
            None,
            held(
                reason::REPLAY_FAILED,
                format!("candidate {digest} failed its replay gate; {keep}"),
            ),
            Wanted::new(
                conditions::REPLAY_PASSED,
                false,
                reason::REPLAY_FAILED,
                format!(
                    "{} of {} step(s) diverged ({:.1}% > {:.1}%): {}",
                    g.divergent_steps,
                    g.steps,
                    g.divergence_percent,
                    g.max_divergence_percent,
                    g.top.join("; ")
                ),
            ),
            None,
        ),
    })
}

/// A Skill candidate's gate: its suite's verdict, from the gateway through the Job (pending,
/// inconclusive, passed: promoted, failed: held).
async fn skill_verdict<S: serde::Serialize>(
    ctx: &Context,
    spec: &S,
    target: &GateTarget<'_>,
    promotion: &PromotionSpec,
    digest: &str,
    keep: &str,
) -> Result<Verdict> {
    let held =
        |reason: &'static str, message: String| Wanted::new(conditions::PROMOTED, false, reason, message);
    let evals = |status: bool, reason: &'static str, message: String| {
        Some(Wanted::new(conditions::EVALS_PASSED, status, reason, message))
    };
    let pending = |requeue, reason: &'static str, held_message: String, message: String| Verdict {
        requeue,
        promote: None,
        promoted: held(reason, held_message),
        replay: evals(false, reason, message),
        awaiting: None,
        summary: None,
    };
    let inconclusive = |message: String, requeue| {
        pending(
            requeue,
            reason::EVALS_INCONCLUSIVE,
            format!("candidate {digest} has no evaluation verdict; {keep}"),
            message,
        )
    };
    let (job_name, gate) = match replay_attempts(ctx, spec, target, &promotion.replay).await? {
        Progress::Saving => {
            return Ok(pending(
                Some(SAVING_RECHECK),
                reason::EVALS_RUNNING,
                format!("candidate {digest} is about to be evaluated; {keep}"),
                SAVING_ROUND.to_owned(),
            ));
        }
        Progress::Running(job) => {
            return Ok(pending(
                Some(Duration::from_secs(20)),
                reason::EVALS_RUNNING,
                format!("candidate {digest} is being evaluated by Job {job}; {keep}"),
                format!("Job {job} is running the evaluation suite"),
            ));
        }
        Progress::Refused(problem) => return Ok(inconclusive(problem, Some(Duration::from_secs(30)))),
        Progress::Backoff { attempt, why, wait } => {
            return Ok(inconclusive(retrying(attempt, &why, wait), Some(wait)));
        }
        Progress::Exhausted { attempts, why } => {
            let label = replay_job::revision_of(target);
            return Ok(inconclusive(
                format!(
                    "{attempts} evaluation attempts ended without a verdict (last: {why}); delete the Jobs labelled {}={label} to evaluate again",
                    labels::REVISION_OF
                ),
                None,
            ));
        }
        Progress::Verdict(job, gate) => (job, gate),
    };
    let summary = Some(replay_job::summary_of(&job_name, &gate));
    Ok(if gate.passed {
        Verdict {
            requeue: None,
            promote: Some(PromotedBy::Evals),
            promoted: Wanted::new(
                conditions::PROMOTED,
                true,
                reason::PROMOTED,
                format!("revision {digest} is in force (its evaluation suite passed)"),
            ),
            replay: evals(
                true,
                reason::EVALS_PASSED,
                format!("{} scenario(s), {} check(s): all passed", gate.runs, gate.steps),
            ),
            awaiting: None,
            summary,
        }
    } else {
        Verdict {
            requeue: None,
            promote: None,
            promoted: held(
                reason::EVALS_FAILED,
                format!("candidate {digest} failed its evaluation suite; {keep}"),
            ),
            replay: evals(
                false,
                reason::EVALS_FAILED,
                format!(
                    "{} of {} check(s) failed: {}",
                    gate.divergent_steps,
                    gate.steps,
                    gate.top.join("; ")
                ),
            ),
            awaiting: None,
            summary,
        }
    })
}

/// What an attempt that ended without a verdict says while the next one waits.
fn retrying(attempt: u32, why: &str, wait: Duration) -> String {
    format!(
        "attempt {attempt} of {}: {why}; retrying in {}s",
        replay_job::MAX_ATTEMPTS,
        wait.as_secs()
    )
}

/// What a gate says while its round is written to the object's status, before its first Job.
const SAVING_ROUND: &str = "the gate's round is written to status.revisions.candidateSerial before its Job is made (if this stays, the installed CRDs predate the operator: apply manifests/crds)";
/// Look again this soon (the status write itself brings the object back sooner).
const SAVING_RECHECK: Duration = Duration::from_secs(5);

/// Where the replay of one candidate stands.
pub(super) enum Progress {
    /// No Job yet: the round is not on record in the object's status (see
    /// [`GateTarget::round_saved`]); the status write brings the object back.
    Saving,
    /// The Job of the current attempt runs (or was just created).
    Running(String),
    /// The gateway's verdict, from this Job.
    Verdict(String, Box<contextos_runner::run::replay::ReplayGate>),
    /// No Job could be started: why.
    Refused(String),
    /// Attempt `attempt` ended without a verdict; the next starts after `wait`.
    Backoff {
        attempt: u32,
        why: String,
        wait: Duration,
    },
    /// Every attempt ended without a verdict; the last one's why.
    Exhausted { attempts: u32, why: String },
}

/// Replays `spec` as `target`'s candidate: starts the Job of the first attempt, reads the
/// verdict of a finished one, and starts the next attempt after a backoff when one ended
/// without a verdict. Attempts are Jobs of their own: one that ended without a verdict stays
/// for people to inspect, up to [`replay_job::MAX_ATTEMPTS`].
pub(super) async fn replay_attempts<S: serde::Serialize>(
    ctx: &Context,
    spec: &S,
    target: &GateTarget<'_>,
    replay: &contextos_crds::common::ReplaySpec,
) -> Result<Progress> {
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), target.namespace);
    let mut attempt = 1;
    loop {
        let job_name = replay_job::attempt_job_name(target, attempt);
        let Some(job) = jobs.get_opt(&job_name).await? else {
            if !target.round_saved {
                return Ok(Progress::Saving);
            }
            if let Some(problem) = start_replay(ctx, spec, target, replay, attempt).await? {
                return Ok(Progress::Refused(problem));
            }
            return Ok(Progress::Running(job_name));
        };
        if let Some(why) = replay_job::not_this_round(target, replay, &job, &ctx.key.public()) {
            // Deleted (this very Job, by uid: not one made since) and made again by a later
            // pass, with this round's order.
            tracing::warn!(namespace = %target.namespace, job = %job_name, %why, "replacing a replay Job");
            let delete = kube::api::DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: job.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..kube::api::DeleteParams::background()
            };
            match jobs.delete(&job_name, &delete).await {
                Ok(_) => {}
                // Gone already, or replaced since.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(Progress::Running(job_name));
        }
        let key = ctx
            .tenant_keys
            .get(&ctx.client, &ctx.runner.gateway, target.namespace)
            .await
            .map_err(|e| Error::Run(e.to_string()))?;
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), target.namespace)
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await?
            .items;
        match replay_job::outcome(target, &job, &pods, &key) {
            JobOutcome::Running => return Ok(Progress::Running(job_name)),
            JobOutcome::Verdict(gate) => return Ok(Progress::Verdict(job_name, Box::new(gate))),
            JobOutcome::Inconclusive { why, finished_at } => {
                tracing::warn!(namespace = %target.namespace, job = %job_name, %why, "replay attempt without a verdict");
                if attempt >= replay_job::MAX_ATTEMPTS {
                    return Ok(Progress::Exhausted {
                        attempts: attempt,
                        why,
                    });
                }
                let backoff = RETRY_BACKOFF.saturating_mul(1 << (attempt - 1));
                let waited = finished_at.map_or(backoff, |t| {
                    Duration::from_secs(u64::try_from(now().duration_since(t.0).as_secs()).unwrap_or(0))
                });
                if waited < backoff {
                    return Ok(Progress::Backoff {
                        attempt,
                        why,
                        wait: backoff - waited,
                    });
                }
                attempt += 1;
            }
        }
    }
}

/// Creates the candidate ConfigMap (once per candidate), the replay NetworkPolicy and the Job
/// of `attempt`. A ConfigMap already at the candidate's name that holds anything else was not
/// written by the operator: it is named as the problem, and no Job is started.
async fn start_replay<S: serde::Serialize>(
    ctx: &Context,
    spec: &S,
    target: &GateTarget<'_>,
    replay: &contextos_crds::common::ReplaySpec,
    attempt: u32,
) -> Result<Option<String>> {
    let candidate = json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": target.kind.api_kind(),
        "metadata": {"name": target.name},
        "spec": spec,
    });
    let build = |what: &'static str| move |source| Error::Build { what, source };
    let config_map =
        replay_job::candidate_config_map(target, &candidate).map_err(build("candidate ConfigMap"))?;
    let grant = replay_job::read_grant(target, replay, attempt, &ctx.key, super::now().as_millisecond());
    let job = replay_job::job(target, attempt, &ctx.replay_image, &ctx.runner, &grant)
        .map_err(build("replay Job"))?;
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), target.namespace);
    if let Err(existing) = create_once(&config_maps, &config_map).await?
        && existing.data != config_map.data
    {
        return Ok(Some(format!(
            "ConfigMap {} is not the candidate the operator wrote ({}); delete it and the gate starts again",
            existing.name_any(),
            reason::UNTRUSTED_CHILD
        )));
    }
    let policy = replay_job::network_policy(target, &ctx.runner);
    // One already there only confines the replay pod differently: at worst its attempt cannot
    // reach the gateway and ends without a verdict.
    let _ = create_once(
        &Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
            ctx.client.clone(),
            target.namespace,
        ),
        &policy,
    )
    .await?;
    // A Job already at this name (a concurrent pass made it, or a tenant planted it) is read
    // like any other: one not ordered for this round is replaced, and only the gateway's
    // signed verdict counts.
    let _ = create_once(
        &Api::<Job>::namespaced(ctx.client.clone(), target.namespace),
        &job,
    )
    .await?;
    Ok(None)
}

/// Creates `object` unless one of its name exists; `Err` holds the one that does.
async fn create_once<K>(api: &Api<K>, object: &K) -> Result<std::result::Result<(), K>>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err(api.get(&object.name_any()).await?)),
        Err(e) => Err(e.into()),
    }
}
