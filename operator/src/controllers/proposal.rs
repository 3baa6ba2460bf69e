//! Proposals: a typed patch is applied to its target's current spec, the result is checked as
//! a hand-written change would be (the API server's admission by a dry run, then the checks
//! the target's own controller makes), and replayed against the target's recorded sessions by
//! a replay Job of the proposal's own, with the calls its evidence names as the intended
//! change. The target's promotion approvers are its reviewers. Only their acceptance (taken by
//! admission policy `contextos-proposal-decisions`) puts the candidate on the target — and
//! then the target's gate, seeing the accepted proposal for exactly that candidate, promotes
//! it. A target that changed meanwhile makes the proposal stale: it is never applied to a spec
//! it was not replayed with.

use std::{sync::Arc, time::Duration};

use contextos_crds::{
    Agent, AgentSpec, ContextPack, ContextPackSpec, Policy, PolicySpec, Proposal,
    common::{Approvers, PromotionSpec, ReplaySpec, ReplaySummary, RevisionStatus},
    conditions::{self, reason},
    proposal::{DecisionAction, ProposalPhase, ProposalStatus, TargetKind},
};
use contextos_runner::{
    policy::compile_policy,
    proposals::patch,
    run::{
        bundle::{Composition, spec_digest},
        gate::{ExpectedChange, GatedKind},
    },
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    runtime::controller::Action,
};
use serde_json::{Value, json};

use super::{Context, Error, Invalid, Result, apply_status, now, revisions};
use crate::{
    conditions::{Wanted, merge},
    replay_job::{self, GateTarget},
};

/// The target as a proposal sees it.
struct Target {
    kind: TargetKind,
    name: String,
    resource_version: String,
    spec: Value,
    digest: String,
    /// The target's revision in force (a composition's digest for an Agent).
    promoted: Option<String>,
    reviewers: Option<Approvers>,
    replay: ReplaySpec,
    /// An Agent's gates in force (`status.promotedGates`): its proposals replay under the
    /// strictest of them, as its own gate would.
    agent_gates: Vec<contextos_crds::agent::MemberGate>,
}

impl Target {
    async fn read(ctx: &Context, namespace: &str, kind: TargetKind, name: &str) -> Result<Option<Self>> {
        let client = ctx.client.clone();
        let target = |resource_version: Option<String>,
                      spec: Value,
                      digest: String,
                      promoted: Option<String>,
                      reviewers: Option<Approvers>,
                      replay: Option<ReplaySpec>| Self {
            kind,
            name: name.to_owned(),
            resource_version: resource_version.unwrap_or_default(),
            spec,
            digest,
            promoted,
            reviewers: reviewers.filter(|a| !a.is_empty()),
            replay: replay.unwrap_or_default(),
            agent_gates: Vec::new(),
        };
        // A Policy or ContextPack: its own gate names the reviewers and the replay.
        let gated = |resource_version,
                     spec: Value,
                     digest,
                     revisions: Option<RevisionStatus>,
                     promotion: Option<PromotionSpec>| {
            target(
                resource_version,
                spec,
                digest,
                revisions.and_then(|r| r.promoted),
                promotion.as_ref().and_then(|g| g.approvers.clone()),
                promotion.map(|g| g.replay),
            )
        };
        Ok(match kind {
            TargetKind::Policy => Api::<Policy>::namespaced(client, namespace)
                .get_opt(name)
                .await?
                .map(|p| {
                    let (spec, digest) = (value_of(&p.spec), spec_digest(&p.spec));
                    let revisions = p.status.and_then(|s| s.revisions);
                    gated(
                        p.metadata.resource_version,
                        spec,
                        digest,
                        revisions,
                        p.spec.promotion,
                    )
                }),
            TargetKind::ContextPack => Api::<ContextPack>::namespaced(client, namespace)
                .get_opt(name)
                .await?
                .map(|p| {
                    let (spec, digest) = (value_of(&p.spec), spec_digest(&p.spec));
                    let revisions = p.status.and_then(|s| s.revisions);
                    gated(
                        p.metadata.resource_version,
                        spec,
                        digest,
                        revisions,
                        p.spec.promotion,
                    )
                }),
            // An Agent: the gate derived from everything it uses names the reviewers.
            TargetKind::Agent => Api::<Agent>::namespaced(client, namespace)
                .get_opt(name)
                .await?
                .map(|a| {
                    let replay = a.spec.promotion.clone().map(|g| g.replay);
                    let status = a.status.unwrap_or_default();
                    Self {
                        agent_gates: status.promoted_gates.clone(),
                        ..target(
                            a.metadata.resource_version.clone(),
                            value_of(&a.spec),
                            spec_digest(&a.spec),
                            status.revisions.and_then(|r| r.promoted),
                            status.promotion_gate.and_then(|g| g.approvers),
                            replay,
                        )
                    }
                }),
        })
    }

    /// A JSON patch replacing the spec, conditioned on the target being the one read.
    fn replace_spec(&self, spec: &Value) -> Value {
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": self.resource_version},
            {"op": "replace", "path": "/spec", "value": spec},
        ])
    }

    /// Writes `spec` on the target (`dry_run`: only has the API server check it, admission
    /// included). `Ok(Err(..))` is the API server's refusal, as it says it.
    async fn write(
        &self,
        ctx: &Context,
        namespace: &str,
        spec: &Value,
        dry_run: bool,
    ) -> Result<Result<(), String>> {
        let patch = self.replace_spec(spec);
        let params = PatchParams {
            dry_run,
            field_manager: Some(contextos_crds::FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let client = ctx.client.clone();
        let result = match self.kind {
            TargetKind::Policy => Api::<Policy>::namespaced(client, namespace)
                .patch(
                    &self.name,
                    &params,
                    &Patch::<Value>::Json(serde_json::from_value(patch).map_err(build)?),
                )
                .await
                .map(drop),
            TargetKind::ContextPack => Api::<ContextPack>::namespaced(client, namespace)
                .patch(
                    &self.name,
                    &params,
                    &Patch::<Value>::Json(serde_json::from_value(patch).map_err(build)?),
                )
                .await
                .map(drop),
            TargetKind::Agent => Api::<Agent>::namespaced(client, namespace)
                .patch(
                    &self.name,
                    &params,
                    &Patch::<Value>::Json(serde_json::from_value(patch).map_err(build)?),
                )
                .await
                .map(drop),
        };
        match result {
            Ok(()) => Ok(Ok(())),
            // The target changed since it was read: decided again from the newer one.
            Err(kube::Error::Api(e)) if e.message.contains("/metadata/resourceVersion") => {
                Err(Error::Run(format!(
                    "{} {} changed while it was being written; deciding again",
                    self.kind.as_str(),
                    self.name
                )))
            }
            // 422 (schema, CEL), 403 (an admission policy), 400: the change is refused as such.
            Err(kube::Error::Api(e)) if [400, 403, 422].contains(&e.code) => Ok(Err(e.message)),
            Err(e) => Err(e.into()),
        }
    }
}

fn build(source: serde_json::Error) -> Error {
    Error::Build {
        what: "a target's spec patch",
        source,
    }
}

/// A spec as JSON (plain data: it cannot fail).
fn value_of<T: serde::Serialize>(spec: &T) -> Value {
    serde_json::to_value(spec).unwrap_or_default()
}

/// A candidate: the patched spec, and what its replay replays (the spec itself, or for an
/// Agent its composition with the promoted revisions of what it uses).
struct Candidate {
    spec: Value,
    /// Digest of the patched spec: the target's spec once applied.
    spec_digest: String,
    changes: Vec<String>,
    replayed: Value,
    /// Digest of what is replayed: what a reviewer accepts and the target's gate promotes.
    digest: String,
    kind: GatedKind,
    /// The replay it passes when not the target's own (an Agent's effective gate).
    replay: Option<ReplaySpec>,
}

/// The patch applied to the target's spec and checked as the target's controller checks a
/// hand-written spec.
async fn candidate(
    ctx: &Context,
    namespace: &str,
    proposal: &Proposal,
    target: &Target,
) -> Result<std::result::Result<Candidate, Invalid>> {
    let invalid = |message: String| Ok(Err(Invalid::new(reason::INVALID_SPEC, message)));
    let unreadable = |e: serde_json::Error| {
        Invalid::new(
            reason::INVALID_SPEC,
            format!(
                "spec.target: {} {} cannot be read: {e}",
                target.kind.as_str(),
                target.name
            ),
        )
    };
    let patch = &proposal.spec.patch;
    if let Err(e) = patch::for_kind(patch, target.kind) {
        return invalid(e.to_string());
    }
    let made = match target.kind {
        TargetKind::Policy => {
            let base: PolicySpec = match serde_json::from_value(target.spec.clone()) {
                Ok(spec) => spec,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            let patched = match patch::apply_policy(&base, patch.policy.as_ref().expect("checked")) {
                Ok(p) => p,
                Err(e) => return invalid(e.to_string()),
            };
            if let Err(e) = compile_policy(&target.name, &patched.spec) {
                return Ok(Err(Invalid::new(
                    reason::INVALID_EXPRESSION,
                    format!("the patched Policy does not compile: {e}"),
                )));
            }
            let value = serde_json::to_value(&patched.spec).map_err(build)?;
            let digest = spec_digest(&patched.spec);
            Candidate {
                spec: value.clone(),
                spec_digest: digest.clone(),
                changes: patched.changes,
                replayed: value,
                digest,
                kind: GatedKind::Policy,
                replay: None,
            }
        }
        TargetKind::ContextPack => {
            let base: ContextPackSpec = match serde_json::from_value(target.spec.clone()) {
                Ok(spec) => spec,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            let patched =
                match patch::apply_context_pack(&base, patch.context_pack.as_ref().expect("checked")) {
                    Ok(p) => p,
                    Err(e) => return invalid(e.to_string()),
                };
            // Its revision with what the pack's ConfigMap sources hold now: an edit to one
            // later makes the pack another candidate than the one reviewed.
            let revision = match revisions::resolve_pack(ctx, namespace, &patched.spec).await? {
                Ok(revision) => revision,
                Err(problem) => {
                    return Ok(Err(Invalid::new(
                        problem.reason,
                        format!("the patched ContextPack: {}", problem.message),
                    )));
                }
            };
            let value = serde_json::to_value(&patched.spec).map_err(build)?;
            Candidate {
                spec_digest: spec_digest(&patched.spec),
                spec: value,
                changes: patched.changes,
                replayed: serde_json::to_value(&revision).map_err(build)?,
                digest: revision.digest(),
                kind: GatedKind::ContextPack,
                replay: None,
            }
        }
        TargetKind::Agent => {
            let base: AgentSpec = match serde_json::from_value(target.spec.clone()) {
                Ok(spec) => spec,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            let patched = match patch::apply_agent(&base, patch.agent.as_ref().expect("checked")) {
                Ok(p) => p,
                Err(e) => return invalid(e.to_string()),
            };
            let (composition, gate): (Composition, _) = match super::agent::candidate_composition(
                ctx,
                namespace,
                &target.name,
                &patched.spec,
                &target.agent_gates,
            )
            .await?
            {
                Ok(found) => found,
                Err(problem) => {
                    return Ok(Err(Invalid::new(
                        problem.reason,
                        format!("the patched Agent: {}", problem.message),
                    )));
                }
            };
            Candidate {
                spec: serde_json::to_value(&patched.spec).map_err(build)?,
                spec_digest: spec_digest(&patched.spec),
                changes: patched.changes,
                replayed: serde_json::to_value(&composition).map_err(build)?,
                digest: composition.digest(),
                kind: GatedKind::Agent,
                replay: Some(gate.replay),
            }
        }
    };
    if let Err(refusal) = target.write(ctx, namespace, &made.spec, true).await? {
        return invalid(format!(
            "the API server would refuse the patched {} {}: {refusal}",
            target.kind.as_str(),
            target.name
        ));
    }
    Ok(Ok(made))
}

/// What this pass decided.
struct Step {
    phase: ProposalPhase,
    ready: Wanted,
    others: Vec<Wanted>,
    candidate: Option<String>,
    target_digest: Option<String>,
    changes: Vec<String>,
    replay: Option<ReplaySummary>,
    intended: Option<u32>,
    requeue: Option<Duration>,
}

impl Step {
    /// Keeps what earlier passes found (the candidate, its changes and replay).
    fn from_previous(previous: &ProposalStatus, phase: ProposalPhase, ready: Wanted) -> Self {
        Self {
            phase,
            ready,
            others: Vec::new(),
            candidate: previous.candidate.clone(),
            target_digest: previous.target_digest.clone(),
            changes: previous.changes.clone(),
            replay: previous.replay.clone(),
            intended: previous.intended_divergences,
            requeue: None,
        }
    }
}

/// The replay round a Proposal's status holds after a pass that leaves it in `phase`: one more
/// on going Stale or Invalid — its target changed or went, and may come back after other runs,
/// when a replay from before counts no more — the same otherwise.
fn round_after(previous: &ProposalStatus, phase: ProposalPhase) -> Option<u64> {
    let away = |phase| matches!(phase, ProposalPhase::Stale | ProposalPhase::Invalid);
    match (previous.round, previous.phase) {
        // Went away before rounds were kept: its replay from before counts no more either.
        (None, Some(before)) if away(before) => Some(1),
        (round, _) if away(phase) && previous.phase != Some(phase) => Some(round.unwrap_or(0) + 1),
        (round, _) => round,
    }
}

/// Reconciles a Proposal.
pub async fn reconcile_proposal(proposal: Arc<Proposal>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Proposal");
    let namespace = proposal.namespace().unwrap_or_default();
    let previous = proposal.status.clone().unwrap_or_default();
    let target = Target::read(
        &ctx,
        &namespace,
        proposal.spec.target.kind,
        &proposal.spec.target.name,
    )
    .await?;
    let step = match &target {
        None => Step::from_previous(
            &previous,
            ProposalPhase::Invalid,
            Wanted::new(
                conditions::READY,
                false,
                reason::REFERENCE_NOT_FOUND,
                format!(
                    "spec.target: {} {} does not exist in namespace {namespace}",
                    proposal.spec.target.kind.as_str(),
                    proposal.spec.target.name
                ),
            ),
        ),
        Some(target) => decide(&ctx, &namespace, &proposal, target, &previous).await?,
    };
    let mut wanted = vec![step.ready.clone()];
    wanted.extend(step.others.iter().cloned());
    let status = ProposalStatus {
        conditions: merge(&previous.conditions, &wanted, proposal.metadata.generation, now()),
        observed_generation: proposal.metadata.generation,
        phase: Some(step.phase),
        candidate: step.candidate,
        target_digest: step.target_digest,
        changes: step.changes,
        replay: step.replay,
        intended_divergences: step.intended,
        round: round_after(&previous, step.phase),
        // Frozen once decided: the target's gate honours the decision only while these are
        // still the target's approvers.
        reviewers: if proposal.spec.decision.is_some() {
            previous.reviewers.clone()
        } else {
            target.and_then(|t| t.reviewers)
        },
    };
    let status = serde_json::to_value(&status).map_err(|source| Error::Build {
        what: "Proposal status",
        source,
    })?;
    apply_status(
        &Api::<Proposal>::namespaced(ctx.client.clone(), &namespace),
        proposal.as_ref(),
        status,
    )
    .await?;
    for condition in &wanted {
        super::announce(&ctx, proposal.as_ref(), &previous.conditions, condition).await;
    }
    Ok(step.requeue.map_or_else(Action::await_change, Action::requeue))
}

/// Where the proposal stands against its (existing) target.
async fn decide(
    ctx: &Context,
    namespace: &str,
    proposal: &Proposal,
    target: &Target,
    previous: &ProposalStatus,
) -> Result<Step> {
    let spec = &proposal.spec;
    let what = format!("{} {}", target.kind.as_str(), target.name);
    let settled = |why: &'static str, message: String| Wanted::new(conditions::READY, true, why, message);
    if let Some(decision) = spec
        .decision
        .as_ref()
        .filter(|d| d.action == DecisionAction::Reject)
    {
        let mut step = Step::from_previous(
            previous,
            ProposalPhase::Rejected,
            settled(reason::REJECTED, format!("rejected by {}", decision.by)),
        );
        step.others.push(Wanted::new(
            conditions::ACCEPTED,
            false,
            reason::REJECTED,
            format!(
                "rejected by {}: {}",
                decision.by,
                decision.reason.as_deref().unwrap_or_default()
            ),
        ));
        return Ok(step);
    }
    let accepted = spec
        .decision
        .as_ref()
        .filter(|d| d.action == DecisionAction::Accept);
    let superseded = |message: String| {
        let mut step = Step::from_previous(
            previous,
            ProposalPhase::Superseded,
            settled(reason::SUPERSEDED, message),
        );
        step.others.push(Wanted::new(
            conditions::PROMOTED,
            false,
            reason::SUPERSEDED,
            "the proposal is done; draft a new one",
        ));
        step
    };
    if previous.phase == Some(ProposalPhase::Superseded) {
        return Ok(Step::from_previous(
            previous,
            ProposalPhase::Superseded,
            settled(reason::SUPERSEDED, ready_message(previous)),
        ));
    }
    if let Some(decision) = accepted {
        // Applied: the target holds the accepted candidate (written by this controller, or the
        // same spec from Git); its gate takes it from here.
        let applied = previous.target_digest.as_deref() == Some(target.digest.as_str())
            && decision.candidate.is_some()
            && decision.candidate == previous.candidate;
        if applied {
            // Once in force it stays said so, though an Agent's composition moves on when
            // what it uses is promoted.
            let promoted = previous.phase == Some(ProposalPhase::Promoted)
                || (target.promoted.is_some() && target.promoted == previous.candidate);
            let mut step = Step::from_previous(
                previous,
                ProposalPhase::Accepted,
                settled(reason::ACCEPTED, String::new()),
            );
            on_target(&mut step, &decision.by, &what, promoted);
            return Ok(step);
        }
        // Applied once already, and the target moved on (another revision, a revert): a
        // proposal is never applied twice.
        if matches!(
            previous.phase,
            Some(ProposalPhase::Accepted | ProposalPhase::Promoted)
        ) {
            return Ok(superseded(format!(
                "{what} moved on from the accepted candidate (it is at {}): the proposal is done",
                target.digest
            )));
        }
    }
    if target.digest != spec.base_digest {
        let step = Step::from_previous(
            previous,
            ProposalPhase::Stale,
            Wanted::new(
                conditions::READY,
                false,
                reason::STALE,
                format!(
                    "{what} changed since the proposal was drafted (it is at {}, the proposal at {}): it was never replayed on the spec it would change; draft it again",
                    target.digest, spec.base_digest
                ),
            ),
        );
        return Ok(step);
    }
    let made = match candidate(ctx, namespace, proposal, target).await? {
        Ok(made) => made,
        Err(invalid) => {
            return Ok(Step::from_previous(
                previous,
                ProposalPhase::Invalid,
                Wanted::new(conditions::READY, false, invalid.reason, invalid.message),
            ));
        }
    };
    let expected: Vec<ExpectedChange> = spec
        .insight
        .iter()
        .flat_map(|i| &i.evidence)
        .filter_map(|e| {
            Some(ExpectedChange {
                run_id: e.run.clone(),
                call_id: e.call.clone()?,
                seq: e.seq,
                hash: e.hash.clone(),
            })
        })
        .collect();
    let name = proposal.name_any();
    // Its Jobs are named after this very object (a proposal deleted and created again, or
    // another whose name starts alike, never reads them).
    let uid = proposal.metadata.uid.clone().unwrap_or_default();
    let prefix: String = name.chars().take(30).collect();
    let jobs_of = format!(
        "{}-{}",
        prefix.trim_end_matches(['-', '.']),
        uid.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
    );
    let gate = GateTarget {
        kind: made.kind,
        name: &target.name,
        namespace,
        digest: &made.digest,
        owner: proposal.controller_owner_ref(&()),
        proposal: Some(&jobs_of),
        expected: &expected,
        // A Proposal changes a pack or a policy: no model routing of its own.
        prices: &Default::default(),
        // What it changes cannot change (admission), but its target can move away and back:
        // the round its status holds, one more each time it went Stale or Invalid.
        round: contextos_runner::run::gate::GateRound {
            uid: uid.clone(),
            serial: previous.round.unwrap_or(0),
        },
        round_saved: true,
    };
    let replay = made.replay.as_ref().unwrap_or(&target.replay);
    let progress = revisions::replay_attempts(ctx, &made.replayed, &gate, replay).await?;
    let mut step = Step {
        phase: ProposalPhase::Replaying,
        ready: Wanted::new(
            conditions::READY,
            false,
            reason::REPLAY_PENDING,
            "the candidate is being replayed",
        ),
        others: Vec::new(),
        candidate: Some(made.digest.clone()),
        target_digest: Some(made.spec_digest.clone()),
        changes: made.changes.clone(),
        replay: None,
        intended: None,
        requeue: None,
    };
    let verdict = match progress {
        // Never: a Proposal's round is the one its status holds.
        revisions::Progress::Saving => {
            step.requeue = Some(Duration::from_secs(5));
            return Ok(step);
        }
        revisions::Progress::Running(job) => {
            step.others.push(replay_condition(
                false,
                reason::REPLAY_PENDING,
                format!("Job {job} is replaying recorded sessions"),
            ));
            step.requeue = Some(Duration::from_secs(20));
            return Ok(step);
        }
        revisions::Progress::Refused(problem) => {
            step.others
                .push(replay_condition(false, reason::REPLAY_INCONCLUSIVE, problem));
            step.requeue = Some(Duration::from_secs(30));
            return Ok(step);
        }
        revisions::Progress::Backoff { attempt, why, wait } => {
            step.others.push(replay_condition(
                false,
                reason::REPLAY_INCONCLUSIVE,
                format!(
                    "attempt {attempt} of {}: {why}; retrying in {}s",
                    replay_job::MAX_ATTEMPTS,
                    wait.as_secs()
                ),
            ));
            step.requeue = Some(wait);
            return Ok(step);
        }
        revisions::Progress::Exhausted { attempts, why } => {
            step.phase = ProposalPhase::ReplayFailed;
            step.ready = Wanted::new(
                conditions::READY,
                false,
                reason::REPLAY_INCONCLUSIVE,
                format!(
                    "{attempts} replay attempts ended without a verdict (last: {why}); create the proposal again to retry"
                ),
            );
            step.others
                .push(replay_condition(false, reason::REPLAY_INCONCLUSIVE, why));
            return Ok(step);
        }
        revisions::Progress::Verdict(job, gate) => (job, gate),
    };
    let (job, gate) = verdict;
    step.replay = Some(replay_job::summary_of(&job, &gate));
    step.intended = Some(gate.intended_steps);
    if !gate.passed {
        let why = if gate.no_history {
            "no finished session of the target to replay it against".to_owned()
        } else {
            format!(
                "{} step(s) of recorded runs would change beyond what the evidence names ({:.1}% > {:.1}%): {}",
                gate.divergent_steps,
                gate.divergence_percent,
                gate.max_divergence_percent,
                gate.top.join("; ")
            )
        };
        step.phase = ProposalPhase::ReplayFailed;
        step.ready = Wanted::new(
            conditions::READY,
            false,
            reason::REPLAY_FAILED,
            format!("it cannot be accepted: {why}"),
        );
        let why_reason = if gate.no_history {
            reason::NO_RECORDED_HISTORY
        } else {
            reason::REPLAY_FAILED
        };
        step.others.push(replay_condition(false, why_reason, why));
        return Ok(step);
    }
    step.others.push(replay_condition(
        true,
        reason::REPLAY_PASSED,
        format!(
            "{} recorded session(s): {} step(s) change as the evidence says{}, {} other(s) diverge ({:.1}%, at most {:.1}%)",
            gate.runs,
            gate.intended_steps,
            loosened(gate.intended_loosening),
            gate.divergent_steps,
            gate.divergence_percent,
            gate.max_divergence_percent
        ),
    ));
    let Some(decision) = accepted else {
        step.phase = ProposalPhase::Reviewable;
        step.ready = settled(
            reason::AWAITING_DECISION,
            match &target.reviewers {
                Some(r) => format!("replayed; one of {} decides (spec.decision)", approvers_text(r)),
                None => format!(
                    "replayed; a holder of the promote verb on {} decides (spec.decision)",
                    target.kind.plural()
                ),
            },
        );
        return Ok(step);
    };
    if decision.candidate.as_deref() != Some(made.digest.as_str()) {
        return Ok(superseded(format!(
            "accepted by {} for candidate {}, but the candidate is now {} (what {what} uses changed): not applied; draft it again",
            decision.by,
            decision.candidate.as_deref().unwrap_or("(none)"),
            made.digest
        )));
    }
    if let Err(refusal) = target.write(ctx, namespace, &made.spec, false).await? {
        step.phase = ProposalPhase::Invalid;
        step.ready = Wanted::new(
            conditions::READY,
            false,
            reason::INVALID_SPEC,
            format!(
                "accepted by {}, but the API server refused the patched {what}: {refusal}",
                decision.by
            ),
        );
        return Ok(step);
    }
    tracing::info!(%namespace, proposal = %name, target = %what, by = %decision.by, "proposal accepted: candidate written on its target");
    on_target(&mut step, &decision.by, &what, false);
    Ok(step)
}

/// An accepted proposal whose candidate is on the target: Accepted, then Promoted once the
/// target's gate put the candidate in force.
fn on_target(step: &mut Step, by: &str, what: &str, promoted: bool) {
    step.phase = if promoted {
        ProposalPhase::Promoted
    } else {
        ProposalPhase::Accepted
    };
    step.ready = Wanted::new(
        conditions::READY,
        true,
        reason::ACCEPTED,
        format!("accepted by {by}"),
    );
    step.others.push(Wanted::new(
        conditions::ACCEPTED,
        true,
        reason::ACCEPTED,
        format!("accepted by {by}; the candidate is on {what}"),
    ));
    step.others.push(if promoted {
        Wanted::new(
            conditions::PROMOTED,
            true,
            reason::PROMOTED,
            format!("the candidate is the revision of {what} in force"),
        )
    } else {
        Wanted::new(
            conditions::PROMOTED,
            false,
            reason::REPLAY_PENDING,
            format!("{what}'s promotion gate decides; see its Promoted condition"),
        )
    });
}

fn ready_message(status: &ProposalStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// What a reviewer is told of the changes the evidence excuses that open what the recorded
/// runs kept shut (pure): the evidence is the proposer's own choice of calls, checked against
/// the record but not against what the insight claims of them.
fn loosened(opened: u32) -> String {
    match opened {
        0 => String::new(),
        n => format!(
            " (the proposer's evidence excuses them; {n} of them let through, or hold for approval instead of denying, or let go on, what the recorded runs did not)"
        ),
    }
}

fn replay_condition(passed: bool, why: &'static str, message: String) -> Wanted {
    Wanted::new(conditions::REPLAY_PASSED, passed, why, message)
}

fn approvers_text(approvers: &Approvers) -> String {
    approvers
        .users
        .iter()
        .cloned()
        .chain(approvers.groups.iter().map(|g| format!("group {g}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A proposal accepted for exactly `digest` of `kind`/`name` (whose own spec is at
/// `target_digest`) by its reviewers — frozen at the decision, and still the target's
/// (`reviewers`) — whose replay passed, and that was applied and not yet promoted: the target's
/// gate promotes it without another replay or approval. The proposal's status is the operator's alone to write and its
/// decision is admitted only from a reviewer, so neither can be forged by a tenant.
pub(super) struct AcceptedProposal {
    pub why: String,
    pub replay: Option<ReplaySummary>,
}

pub(super) async fn accepted_for(
    ctx: &Context,
    namespace: &str,
    kind: GatedKind,
    name: &str,
    digest: &str,
    target_digest: &str,
    reviewers: Option<&Approvers>,
) -> Result<Option<AcceptedProposal>> {
    let kind = match kind {
        GatedKind::Policy => TargetKind::Policy,
        GatedKind::ContextPack => TargetKind::ContextPack,
        GatedKind::Agent => TargetKind::Agent,
        // No Proposal targets a Skill: only its suite promotes it.
        GatedKind::Skill => return Ok(None),
    };
    let proposals = Api::<Proposal>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let reviewers = reviewers.filter(|r| !r.is_empty());
    Ok(proposals.into_iter().find_map(|p| {
        let status = p.status.as_ref()?;
        let decision = p.spec.decision.as_ref()?;
        let replayed = status.conditions.iter().any(|c: &Condition| {
            c.type_ == conditions::REPLAY_PASSED && c.status == conditions::status::TRUE
        });
        (p.spec.target.kind == kind
            && p.spec.target.name == name
            && decision.action == DecisionAction::Accept
            && decision.candidate.as_deref() == Some(digest)
            && status.candidate.as_deref() == Some(digest)
            // Applied and not yet promoted: an acceptance counts once, for the spec it put on
            // the target, never for a later return to it.
            && status.phase == Some(ProposalPhase::Accepted)
            && status.target_digest.as_deref() == Some(target_digest)
            && replayed
            && status.reviewers.as_ref() == reviewers)
            .then(|| AcceptedProposal {
                why: format!(
                    "Proposal {} accepted by {} after its replay passed",
                    p.name_any(),
                    decision.by
                ),
                replay: status.replay.clone(),
            })
    }))
}

#[cfg(test)]
mod tests {
    use contextos_crds::proposal::{ProposalPhase, ProposalStatus};

    use super::round_after;

    #[test]
    fn a_proposals_round_moves_on_each_time_its_target_moved_away() {
        let at = |phase, round| ProposalStatus {
            phase: Some(phase),
            round,
            ..ProposalStatus::default()
        };
        assert_eq!(
            round_after(&ProposalStatus::default(), ProposalPhase::Replaying),
            None
        );
        assert_eq!(
            round_after(&at(ProposalPhase::Replaying, None), ProposalPhase::Stale),
            Some(1)
        );
        // Once per time away, however many passes it stays so.
        assert_eq!(
            round_after(&at(ProposalPhase::Stale, Some(1)), ProposalPhase::Stale),
            Some(1)
        );
        // Back: the replay runs again in the new round.
        assert_eq!(
            round_after(&at(ProposalPhase::Stale, Some(1)), ProposalPhase::Replaying),
            Some(1)
        );
        assert_eq!(
            round_after(&at(ProposalPhase::Stale, Some(1)), ProposalPhase::Invalid),
            Some(2)
        );
        // Stale before rounds were kept.
        assert_eq!(
            round_after(&at(ProposalPhase::Stale, None), ProposalPhase::Replaying),
            Some(1)
        );
    }
}
