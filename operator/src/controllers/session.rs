//! Sessions: resolve the Agent and pin its revisions into an immutable run bundle, then run it
//! in one sandboxed pod per attempt (deterministic names, owned by the Session), read each
//! attempt's outcome from its termination message, pause for approvals, and retry crashed
//! attempts — resuming from the last checkpoint — up to a bound.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use contextos_crds::{
    Agent, SandboxProfile, SandboxProfileSpec, Session, annotations,
    conditions::{self, reason},
    session::{
        BudgetUsage, CheckpointRef, PendingApproval, PinnedRevisions, SessionPhase, SessionStatus,
        UnresolvedCallStatus,
    },
};
use contextos_runner::{
    capability,
    gateway::approvals::{ApprovalRequest, Attested, UnresolvedReport},
    run::{
        bundle::{Composition, RunBundle, spec_digest},
        issue_run_context,
        pod::{PodBundle, PodReport},
    },
};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use super::{
    Context, Error, Invalid, Result, apply, apply_status, condition_message, is_ready, now, ready_message,
    revisions,
};
use crate::{
    capability_pods,
    conditions::{Wanted, merge},
    session_children as children,
};

/// Reconciles a Session.
pub async fn reconcile_session(session: Arc<Session>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Session");
    let phase = session.status.as_ref().and_then(|s| s.phase);
    if phase.is_some_and(SessionPhase::is_terminal) {
        return Ok(Action::await_change());
    }
    let namespace = session.namespace().unwrap_or_default();
    let attempt = session.status.as_ref().and_then(|s| s.attempt).unwrap_or(1);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
    if session.spec.cancel {
        return cancel(&ctx, &session, &pods, attempt).await;
    }
    let (pod_bundle, sandbox) = match pinned(&ctx, &session).await? {
        Ok(pinned) => pinned,
        Err(invalid) => {
            // An override that loosens the agent's limits can never become valid: the spec is
            // immutable. Anything else (a missing or unready reference) may be fixed later.
            let terminal = invalid.reason == reason::OVERRIDE_LOOSENS;
            let phase = if terminal {
                SessionPhase::Failed
            } else {
                SessionPhase::Pending
            };
            let untrusted = invalid.reason == reason::UNTRUSTED_CHILD;
            write_status(
                &ctx,
                &session,
                Update::phase(phase, invalid.reason, invalid.message),
            )
            .await?;
            // Sessions do not watch ConfigMaps: look again for the planted one's removal.
            return Ok(if untrusted {
                Action::requeue(Duration::from_secs(15))
            } else {
                Action::await_change()
            });
        }
    };
    let name = session.name_any();
    let policy = children::network_policy(&session, &ctx.runner);
    apply(&Api::namespaced(ctx.client.clone(), &namespace), &policy).await?;
    start_capabilities(&ctx, &session, &pod_bundle, &sandbox, &pods).await?;

    let pod = pods.get_opt(&children::pod_name(&name, attempt)).await?;
    if let Some(pod) = &pod
        && !owned_by(pod.metadata.owner_references.as_deref(), &session)
    {
        // A pod of an earlier Session with this name, not yet garbage-collected.
        return Err(Error::Run(format!(
            "pod {} belongs to an earlier Session named {name}; waiting for it to be removed",
            pod.name_any()
        )));
    }
    let Some(pod) = pod else {
        start_attempt(&ctx, &session, &pod_bundle, &sandbox, attempt, None, None).await?;
        return Ok(Action::await_change());
    };
    let pod_phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    match pod_phase.as_str() {
        "Succeeded" | "Failed" => finished(&ctx, &session, &pod_bundle, &sandbox, attempt, &pod).await,
        _ => {
            let update = Update::phase(
                SessionPhase::Running,
                reason::RUNNING,
                format!("runner pod {} is {pod_phase}", pod.name_any()),
            )
            .attempt(attempt);
            write_status(&ctx, &session, update).await?;
            Ok(Action::await_change())
        }
    }
}

/// An attempt's pod has ended: read what it reported and decide what comes next.
async fn finished(
    ctx: &Context,
    session: &Session,
    pod_bundle: &PodBundle,
    sandbox: &SandboxProfileSpec,
    attempt: u32,
    pod: &Pod,
) -> Result<Action> {
    let report = termination_report(pod);
    let mut update = Update::default().attempt(attempt);
    if let Some(report) = &report {
        update = update.report(report);
    }
    match report.as_ref().map(|r| r.outcome.as_str()) {
        Some("completed") => {
            let update = update.with_phase(
                SessionPhase::Succeeded,
                reason::SUCCEEDED,
                "the run completed and its output passed validation",
            );
            write_status(ctx, session, update.completed()).await?;
            Ok(Action::await_change())
        }
        Some("failed") => {
            let why = report
                .as_ref()
                .map(|r| {
                    format!(
                        "{}: {}",
                        r.reason.clone().unwrap_or_default(),
                        r.message.clone().unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            write_status(
                ctx,
                session,
                update
                    .with_phase(SessionPhase::Failed, reason::RUN_FAILED, why)
                    .completed(),
            )
            .await?;
            Ok(Action::await_change())
        }
        Some("awaiting_approval") => {
            let run_id = report.as_ref().map(|r| r.run_id.clone()).unwrap_or_default();
            let awaiting = report.as_ref().and_then(|r| r.awaiting.clone());
            // What the runner relays is shown to approvers (and checked by admission) only if the
            // gateway signed it: a runner cannot choose who may approve which call.
            let awaiting = match awaiting {
                Some(a) => match attested(ctx, session, &run_id, &a).await {
                    Ok(()) => Some(a),
                    Err(why) => {
                        let update = update.with_phase(
                            SessionPhase::AwaitingApproval,
                            reason::AWAITING_APPROVAL,
                            format!("a call waits for approval, but its request cannot be shown: {why}"),
                        );
                        write_status(ctx, session, update.clear_pending()).await?;
                        return Ok(Action::requeue(Duration::from_secs(30)));
                    }
                },
                None => None,
            };
            let decided = awaiting.as_ref().is_some_and(|a| {
                session
                    .spec
                    .approvals
                    .iter()
                    .any(|d| d.call_hash == a.call_hash && approver_allowed(&d.approver, &a.approvers))
            });
            // An attempt started for this very decision that waits for it again: the gateway
            // did not accept the decision (see the record). Starting yet another attempt would
            // loop; a new decision is needed.
            let refused = awaiting
                .as_ref()
                .is_some_and(|a| pod.annotations().get(annotations::RESUMED_FOR) == Some(&a.call_hash));
            if decided && !refused {
                let hash = awaiting.as_ref().map(|a| a.call_hash.as_str());
                start_attempt(ctx, session, pod_bundle, sandbox, attempt + 1, hash, None).await?;
                return Ok(Action::await_change());
            }
            let message = awaiting.as_ref().map_or_else(String::new, |a| {
                let refusal = if refused {
                    "the decision in spec.approvals was not accepted by the gateway (see the run's record); "
                } else {
                    ""
                };
                format!(
                    "{refusal}{} needs approval ({}): {}; add {{callHash: {}, decision: approve|reject, approver: <you>}} to spec.approvals",
                    a.tool, a.rule, a.reason, a.call_hash
                )
            });
            let update = update
                .with_phase(SessionPhase::AwaitingApproval, reason::AWAITING_APPROVAL, message)
                .pending(awaiting.map(|a| pending_approval(&pod_bundle.bundle, a)));
            write_status(ctx, session, update).await?;
            Ok(Action::await_change())
        }
        Some("awaiting_resolution") => {
            let run_id = report.as_ref().map(|r| r.run_id.clone()).unwrap_or_default();
            let unresolved = report.as_ref().and_then(|r| r.unresolved.clone());
            // Shown to people (and checked by admission) only as the gateway signed it.
            if let Some(u) = &unresolved
                && let Err(why) = attested_unresolved(ctx, session, &run_id, u).await
            {
                let update = update.with_phase(
                    SessionPhase::AwaitingResolution,
                    reason::AWAITING_RESOLUTION,
                    format!("a call's outcome is unknown, but the report of it cannot be shown: {why}"),
                );
                write_status(ctx, session, update.clear_pending()).await?;
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            let marker = unresolved.as_ref().map(|u| format!("resolution/{}", u.call_id));
            let resolved = unresolved
                .as_ref()
                .is_some_and(|u| session.spec.resolutions.iter().any(|r| r.call_id == u.call_id));
            // An attempt started for this very finding that waits for it again: the gateway
            // did not accept it (see the record); another attempt would loop.
            let refused = marker
                .as_ref()
                .is_some_and(|m| pod.annotations().get(annotations::RESUMED_FOR) == Some(m));
            if resolved && !refused {
                start_attempt(
                    ctx,
                    session,
                    pod_bundle,
                    sandbox,
                    attempt + 1,
                    marker.as_deref(),
                    None,
                )
                .await?;
                return Ok(Action::await_change());
            }
            let message = unresolved.as_ref().map_or_else(String::new, |u| {
                let refusal = if refused {
                    "the finding in spec.resolutions was not accepted by the gateway (see the run's record); "
                } else {
                    ""
                };
                format!(
                    "{refusal}the outcome of {} (call {}) is unknown: {}; once you know whether it acted, add {{callId: {}, outcome: acted|did_not_act, resolver: <you>, note: <what you found>}} to spec.resolutions",
                    u.tool, u.call_id, u.reason, u.call_id
                )
            });
            let update = update
                .with_phase(
                    SessionPhase::AwaitingResolution,
                    reason::AWAITING_RESOLUTION,
                    message,
                )
                .unresolved(unresolved.map(|u| UnresolvedCallStatus {
                    call_id: u.call_id,
                    tool: u.tool,
                    arguments: u.arguments.to_string().chars().take(4096).collect(),
                    reason: u.reason,
                }));
            write_status(ctx, session, update).await?;
            Ok(Action::await_change())
        }
        _ => {
            // The attempt crashed (killed, evicted, out of memory, past its deadline) before it
            // could report: retry from the last checkpoint, with backoff, up to the bound.
            let crashes = crashed_attempts(ctx, session).await?;
            let ended = format!("pod {} {}", pod.name_any(), crate::crash::crash_cause(pod));
            if crashes >= ctx.max_crash_attempts {
                let message = format!(
                    "{crashes} runner attempts ended without a result; the last: {ended}; see its events and logs"
                );
                write_status(
                    ctx,
                    session,
                    update
                        .with_phase(SessionPhase::Failed, reason::ATTEMPTS_EXHAUSTED, message)
                        .completed(),
                )
                .await?;
                return Ok(Action::await_change());
            }
            let backoff = Duration::from_secs(2u64.saturating_pow(crashes.min(6)));
            let finished_at = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.finished_at.clone());
            let waited =
                finished_at.is_none_or(|t| now().duration_since(t.0).as_secs() >= backoff.as_secs() as i64);
            if !waited {
                return Ok(Action::requeue(backoff));
            }
            let crashed = format!("{ended}; resuming from the last checkpoint");
            start_attempt(
                ctx,
                session,
                pod_bundle,
                sandbox,
                attempt + 1,
                None,
                Some(&crashed),
            )
            .await?;
            Ok(Action::await_change())
        }
    }
}

/// Attempts of this Session whose pod ended without a report: the crashes the retry bound
/// counts (attempts started by approvals, and attempts that reported, do not count).
async fn crashed_attempts(ctx: &Context, session: &Session) -> Result<u32> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default())
        .list(&kube::api::ListParams::default().labels(&format!(
            "{}={}",
            contextos_crds::labels::SESSION,
            session.name_any()
        )))
        .await?;
    let crashed = pods
        .items
        .iter()
        .filter(|p| owned_by(p.metadata.owner_references.as_deref(), session))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            matches!(phase, Some("Failed" | "Succeeded")) && termination_report(p).is_none()
        })
        .count();
    Ok(u32::try_from(crashed).unwrap_or(u32::MAX))
}

/// Whether `approver` may decide (a listed user; group membership is checked by who may patch
/// the Session, and admission checks the approver is the user making the change).
fn approver_allowed(approver: &str, approvers: &contextos_crds::common::Approvers) -> bool {
    approvers.users.iter().any(|u| u == approver) || !approvers.groups.is_empty()
}

/// Creates the capability pods of the Session's command-started MCP servers that do not exist
/// (before the runner's first call needs them), and the NetworkPolicy confining them.
async fn start_capabilities(
    ctx: &Context,
    session: &Session,
    pod_bundle: &PodBundle,
    sandbox: &SandboxProfileSpec,
    pods: &Api<Pod>,
) -> Result<()> {
    let servers = capability::servers(&pod_bundle.bundle.agent_spec.tools);
    if servers.is_empty() {
        return Ok(());
    }
    let namespace = session.namespace().unwrap_or_default();
    let policy = capability_pods::network_policy(session, sandbox, &ctx.runner);
    apply(&Api::namespaced(ctx.client.clone(), &namespace), &policy).await?;
    for server in &servers {
        let name = capability::pod_name(&session.name_any(), &server.digest);
        match pods.get_opt(&name).await? {
            Some(existing) if !owned_by(existing.metadata.owner_references.as_deref(), session) => {
                return Err(Error::Run(format!(
                    "pod {name} is not this Session's capability pod (an earlier Session's, or made by someone else); waiting for it to be removed"
                )));
            }
            // Ended (its deadline, an eviction): removed now, made again on the next pass.
            Some(existing)
                if existing
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Failed" || p == "Succeeded") =>
            {
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(_) => {}
            None => {
                // Each pod gets a key of its own, made when the pod is.
                let key = capability::ChannelKey::generate().map_err(Error::Run)?;
                let pod = capability_pods::capability_pod(session, sandbox, server, &key);
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Deletes the Session's capability pods (the Session keeps its record; nothing calls them
/// any more). Only pods it owns: labels are anyone's to write in the namespace.
async fn stop_capabilities(ctx: &Context, session: &Session) -> Result<()> {
    let selector = format!(
        "{}={},{}={}",
        contextos_crds::labels::SESSION,
        session.name_any(),
        contextos_crds::labels::ROLE,
        capability::ROLE
    );
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    for pod in pods
        .list_metadata(&kube::api::ListParams::default().labels(&selector))
        .await?
        .items
    {
        if owned_by(pod.metadata.owner_references.as_deref(), session) {
            match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Issues a fresh RunContext and applies the attempt's pod.
async fn start_attempt(
    ctx: &Context,
    session: &Session,
    pod_bundle: &PodBundle,
    sandbox: &SandboxProfileSpec,
    attempt: u32,
    resumed_for: Option<&str>,
    after_crash: Option<&str>,
) -> Result<()> {
    let namespace = session.namespace().unwrap_or_default();
    let pod_name = children::pod_name(&session.name_any(), attempt);
    let signed = issue_run_context(
        &pod_bundle.bundle,
        &children::run_id(session),
        &children::trace_id(session),
        Some(&pod_name),
        &ctx.key,
        now().as_millisecond(),
    )
    .map_err(|e| Error::Run(e.to_string()))?;
    let run_context = serde_json::to_string(&signed).map_err(|source| Error::Build {
        what: "RunContext",
        source,
    })?;
    let mut pod =
        children::runner_pod(session, sandbox, attempt, &run_context, &ctx.runner).map_err(|source| {
            Error::Build {
                what: "runner Pod",
                source,
            }
        })?;
    if let Some(hash) = resumed_for {
        pod.annotations_mut()
            .insert(annotations::RESUMED_FOR.to_owned(), hash.to_owned());
    }
    // A pod's spec is immutable and each attempt's RunContext is fresh, so the pod is created
    // once: if a concurrent reconcile (or an earlier pass whose status write was lost) created
    // it, that pod is the attempt.
    match Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => ctx.metrics.runner_pod_created(),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let pinned = PinnedRevisions {
        context_pack: Some(pod_bundle.bundle.pinned().context_pack),
        policies: pod_bundle.bundle.pinned().policies,
        sandbox_profile: pod_bundle.bundle.sandbox_profile_digest.clone(),
    };
    let update = Update::phase(
        SessionPhase::Running,
        reason::RUNNING,
        match after_crash {
            Some(crashed) => format!("runner pod {} started ({crashed})", pod.name_any()),
            None => format!("runner pod {} started", pod.name_any()),
        },
    )
    .attempt(attempt)
    .pinned(pinned)
    .run_id(children::run_id(session))
    .clear_pending();
    write_status(ctx, session, update).await
}

/// The Session's pinned bundle: read from its ConfigMap when the run already started (pins
/// never change), otherwise resolved now and written once.
async fn pinned(
    ctx: &Context,
    session: &Session,
) -> Result<Result<(PodBundle, SandboxProfileSpec), Invalid>> {
    let namespace = session.namespace().unwrap_or_default();
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace);
    // Once the run started, its bundle is the truth: the Agent, its revisions and its sandbox
    // may change or go away without changing what this Session runs.
    if let Some(existing) = config_maps
        .get_opt(&children::bundle_name(&session.name_any()))
        .await?
    {
        if !owned_by(existing.metadata.owner_references.as_deref(), session) {
            return Err(Error::Run(format!(
                "ConfigMap {} belongs to an earlier Session named {}; waiting for it to be removed",
                existing.name_any(),
                session.name_any()
            )));
        }
        // Owner references are anyone's to write: only the operator's seal says this is the
        // bundle it pinned for this Session, and not one planted before the Agent existed.
        return Ok(
            match children::sealed_bundle(session, &existing, &ctx.key.public()) {
                Ok(bundle) => match bundle.sandbox.clone() {
                    Some(sandbox) => Ok((bundle, sandbox)),
                    None => Err(Invalid::new(
                        reason::UNTRUSTED_CHILD,
                        format!(
                            "ConfigMap {} holds a bundle without its sandbox",
                            existing.name_any()
                        ),
                    )),
                },
                Err(why) => {
                    tracing::warn!(namespace = %namespace, configmap = %existing.name_any(), %why,
                        "refused a run bundle the operator did not write");
                    Err(Invalid::new(
                        reason::UNTRUSTED_CHILD,
                        format!(
                            "ConfigMap {} is not the run bundle the operator wrote for this Session ({why}); it is not used. Delete it and the operator pins the Agent's revisions again",
                            existing.name_any()
                        ),
                    ))
                }
            },
        );
    }
    let agents = Api::<Agent>::namespaced(ctx.client.clone(), &namespace);
    let agent_name = &session.spec.agent_ref.name;
    let Some(agent) = agents.get_opt(agent_name).await? else {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_FOUND,
            format!(
                "spec.agentRef.name: Agent {agent_name} does not exist in namespace {namespace}; create it (spec.agentRef cannot be changed)"
            ),
        )));
    };
    let agent_conditions = agent
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if !is_ready(&agent_conditions) {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            format!(
                "spec.agentRef.name: Agent {agent_name} is not Ready: {}",
                ready_message(&agent_conditions)
            ),
        )));
    }
    // The Agent's promoted composition, not its current spec: a change to what it runs is a
    // candidate until its gate promotes it.
    let revisions = agent.status.as_ref().and_then(|s| s.revisions.as_ref());
    let Some(composition) = revisions::promoted_spec::<Composition>(ctx, &namespace, revisions).await? else {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            format!(
                "spec.agentRef.name: Agent {agent_name} has no promoted revision yet: {}",
                condition_message(&agent_conditions, conditions::PROMOTED)
            ),
        )));
    };
    let sandbox = Api::<SandboxProfile>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&composition.agent_spec.sandbox_profile_ref.name)
        .await?;
    if let Err(e) = contextos_runner::run_context::effective_limits(
        &composition.agent_spec.budget,
        composition.agent_spec.safety_mode,
        session.spec.overrides.as_ref(),
    ) {
        return Ok(Err(Invalid::new(reason::OVERRIDE_LOOSENS, e.to_string())));
    }
    let Some(sandbox) = sandbox else {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            "the Agent's SandboxProfile is gone",
        )));
    };
    let bundle = match resolve_bundle(ctx, session, composition, &sandbox).await? {
        Ok(bundle) => bundle,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let pod_bundle = PodBundle {
        bundle,
        sandbox: Some(sandbox.spec.clone()),
    };
    let config_map =
        children::bundle_config_map(session, &pod_bundle, &ctx.key).map_err(|source| Error::Build {
            what: "bundle ConfigMap",
            source,
        })?;
    // Created once and immutable: a concurrent reconcile that created it first wins, and the
    // run keeps the pins it started with.
    match config_maps.create(&PostParams::default(), &config_map).await {
        Ok(_) => Ok(Ok((pod_bundle, sandbox.spec))),
        Err(kube::Error::Api(e)) if e.code == 409 => Box::pin(pinned(ctx, session)).await,
        Err(e) => Err(e.into()),
    }
}

/// Whether `owners` names this very Session (by uid, not just by name).
fn owned_by(
    owners: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]>,
    session: &Session,
) -> bool {
    let uid = session.metadata.uid.as_deref();
    owners
        .unwrap_or_default()
        .iter()
        .any(|o| o.kind == "Session" && Some(o.uid.as_str()) == uid)
}

/// Stops the Session: its running attempt is deleted and it ends `Cancelled`.
async fn cancel(ctx: &Context, session: &Session, pods: &Api<Pod>, attempt: u32) -> Result<Action> {
    if let Some(pod) = pods
        .get_opt(&children::pod_name(&session.name_any(), attempt))
        .await?
        && owned_by(pod.metadata.owner_references.as_deref(), session)
        && pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running" || p == "Pending")
    {
        pods.delete(&pod.name_any(), &DeleteParams::default()).await?;
    }
    let update = Update::phase(
        SessionPhase::Cancelled,
        reason::CANCELLED,
        "cancelled by spec.cancel",
    );
    write_status(ctx, session, update.completed()).await?;
    Ok(Action::await_change())
}

/// The run bundle of the Agent's promoted composition, with its pack's sources and the model
/// script read now.
async fn resolve_bundle(
    ctx: &Context,
    session: &Session,
    composition: Composition,
    sandbox: &SandboxProfile,
) -> Result<Result<RunBundle, Invalid>> {
    let namespace = session.namespace().unwrap_or_default();
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace);
    let Composition {
        agent_spec,
        context_pack,
        policies,
    } = composition;
    let mut sources = BTreeMap::new();
    for source in &context_pack.spec.sources {
        if let Some(key) = &source.config_map_ref {
            match config_map_key(&config_maps, &key.name, &key.key).await? {
                Some(content) => {
                    sources.insert(source.name.clone(), content);
                }
                None => {
                    return Ok(Err(Invalid::new(
                        reason::REFERENCE_NOT_READY,
                        format!(
                            "ContextPack {}: ConfigMap {} has no key {}",
                            context_pack.name, key.name, key.key
                        ),
                    )));
                }
            }
        }
    }
    let model_script = match &agent_spec.model.script_ref {
        Some(key) => config_map_key(&config_maps, &key.name, &key.key).await?,
        None => None,
    };
    Ok(Ok(RunBundle {
        tenant: namespace,
        session: session.name_any(),
        session_spec: session.spec.clone(),
        agent: session.spec.agent_ref.name.clone(),
        agent_spec,
        context_pack,
        sources,
        policies,
        sandbox_profile_digest: Some(spec_digest(&sandbox.spec)),
        model_script,
        session_labels: session.labels().clone(),
    }))
}

async fn config_map_key(api: &Api<ConfigMap>, name: &str, key: &str) -> Result<Option<String>> {
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(key).cloned()))
}

fn termination_report(pod: &Pod) -> Option<PodReport> {
    let message = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "runner")?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()?;
    // The pod writes its report to the termination file only (terminationMessagePolicy: File),
    // so the message is the report as a whole: text around it is not a report.
    serde_json::from_str::<PodReport>(message.trim()).ok()
}

/// Checks the gateway's signature over a relayed approval request.
async fn attested(
    ctx: &Context,
    session: &Session,
    run_id: &str,
    awaiting: &contextos_runner::run::checkpoint::AwaitingApproval,
) -> std::result::Result<(), String> {
    let request = ApprovalRequest {
        run_id,
        call_id: &awaiting.call_id,
        call_hash: &awaiting.call_hash,
        tool: &awaiting.tool,
        arguments_digest: awaiting
            .arguments_digest
            .clone()
            .unwrap_or_else(|| ApprovalRequest::digest_of(&awaiting.arguments)),
        rule: &awaiting.rule,
        approvers: &awaiting.approvers,
    };
    signed_by_gateway(ctx, session, &request, awaiting.attestation.as_deref()).await
}

/// Checks the gateway's signature over a relayed report of a call whose outcome is unknown.
async fn attested_unresolved(
    ctx: &Context,
    session: &Session,
    run_id: &str,
    unresolved: &contextos_runner::run::checkpoint::UnresolvedCall,
) -> std::result::Result<(), String> {
    let report = UnresolvedReport {
        run_id,
        call_id: &unresolved.call_id,
        tool: &unresolved.tool,
        arguments_digest: unresolved
            .arguments_digest
            .clone()
            .unwrap_or_else(|| ApprovalRequest::digest_of(&unresolved.arguments)),
        reason: &unresolved.reason,
    };
    signed_by_gateway(ctx, session, &report, unresolved.attestation.as_deref()).await
}

/// Whether `signature` is the gateway's (the Session's tenant key) over `statement`, as a
/// runner relayed both.
async fn signed_by_gateway(
    ctx: &Context,
    session: &Session,
    statement: &impl Attested,
    signature: Option<&str>,
) -> std::result::Result<(), String> {
    let signature = signature.ok_or("the gateway service did not sign it")?;
    let key = ctx
        .tenant_keys
        .get(&ctx.runner.gateway, &session.namespace().unwrap_or_default())
        .await
        .map_err(|e| e.to_string())?;
    if statement.verify(&key, signature) {
        Ok(())
    } else {
        Err("its signature does not match what the runner reported".into())
    }
}

fn pending_approval(
    bundle: &RunBundle,
    awaiting: contextos_runner::run::checkpoint::AwaitingApproval,
) -> PendingApproval {
    let risk = bundle
        .agent_spec
        .tools
        .iter()
        .find(|t| t.name == awaiting.tool)
        .map(|t| t.risk)
        // The gateway asks approval only for the Agent's own tools; never seen otherwise.
        .unwrap_or(contextos_crds::common::ToolRisk::ReadOnly);
    // Arguments the report had to cut were signed only as a digest: show none of them rather
    // than text the signature does not cover. Otherwise cut on a character boundary.
    let arguments: String = if awaiting.arguments_digest.is_some() {
        "(too long for the report; see the run's record)".into()
    } else {
        awaiting.arguments.to_string().chars().take(4096).collect()
    };
    PendingApproval {
        call_hash: awaiting.call_hash,
        tool: awaiting.tool,
        risk,
        arguments,
        rule: awaiting.rule,
        reason: awaiting.reason,
        approvers: awaiting.approvers,
    }
}

/// A change to one optional status field.
#[derive(Debug, Default)]
enum Change<T> {
    #[default]
    Keep,
    Set(T),
    Clear,
}

impl<T> Change<T> {
    fn apply_to(self, field: &mut Option<T>) {
        match self {
            Self::Keep => {}
            Self::Set(value) => *field = Some(value),
            Self::Clear => *field = None,
        }
    }
}

/// A status change for a Session, applied over what is there (see [`Update::apply`]).
#[derive(Debug, Default)]
struct Update {
    phase: Option<(SessionPhase, &'static str, String)>,
    attempt: Option<u32>,
    pinned: Option<PinnedRevisions>,
    run_id: Option<String>,
    pending: Change<PendingApproval>,
    unresolved: Change<UnresolvedCallStatus>,
    progress: Option<Progress>,
    completed: bool,
}

/// What a runner's report says about the run so far.
#[derive(Debug)]
struct Progress {
    steps: u32,
    budget_used: BudgetUsage,
    record_head: Option<String>,
    output: Option<String>,
    last_checkpoint: Option<CheckpointRef>,
}

impl Update {
    fn phase(phase: SessionPhase, reason: &'static str, message: impl Into<String>) -> Self {
        Self::default().with_phase(phase, reason, message)
    }

    fn with_phase(mut self, phase: SessionPhase, reason: &'static str, message: impl Into<String>) -> Self {
        self.phase = Some((phase, reason, message.into()));
        self
    }

    fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    fn pinned(mut self, pinned: PinnedRevisions) -> Self {
        self.pinned = Some(pinned);
        self
    }

    fn run_id(mut self, run_id: String) -> Self {
        self.run_id = Some(run_id);
        self
    }

    fn pending(mut self, pending: Option<PendingApproval>) -> Self {
        if let Some(pending) = pending {
            self.pending = Change::Set(pending);
        }
        self
    }

    fn clear_pending(mut self) -> Self {
        self.pending = Change::Clear;
        self.unresolved = Change::Clear;
        self
    }

    fn unresolved(mut self, unresolved: Option<UnresolvedCallStatus>) -> Self {
        if let Some(unresolved) = unresolved {
            self.unresolved = Change::Set(unresolved);
        }
        self
    }

    fn completed(mut self) -> Self {
        self.completed = true;
        self
    }

    fn report(mut self, report: &PodReport) -> Self {
        self.run_id = Some(report.run_id.clone());
        self.progress = Some(Progress {
            steps: report.steps,
            budget_used: BudgetUsage {
                steps: report.usage.steps,
                tokens: report.usage.tokens,
                tool_calls: report.usage.tool_calls,
                wall_seconds: u32::try_from(report.usage.wall_ms / 1000).unwrap_or(u32::MAX),
            },
            record_head: report.head.clone(),
            output: report.output.clone(),
            last_checkpoint: report
                .checkpoint
                .as_ref()
                .map(|(step, entry_hash)| CheckpointRef {
                    step: *step,
                    entry_hash: entry_hash.clone(),
                }),
        });
        self
    }

    /// The status after this change (pure): fields set or cleared, the Ready condition merged
    /// when the phase changes, start and completion times set once. Returns the Ready condition
    /// to announce, if the phase changed.
    fn apply(self, status: &mut SessionStatus, generation: Option<i64>, now: Timestamp) -> Option<Wanted> {
        let previous = status.conditions.clone();
        if let Some(attempt) = self.attempt {
            status.attempt = Some(attempt);
        }
        if let Some(pinned) = self.pinned {
            status.pinned = Some(pinned);
        }
        if let Some(run_id) = self.run_id {
            status.run_id = Some(run_id);
        }
        self.pending.apply_to(&mut status.pending_approval);
        self.unresolved.apply_to(&mut status.unresolved_call);
        if let Some(progress) = self.progress {
            status.steps = Some(progress.steps);
            status.budget_used = Some(progress.budget_used);
            // A report without them leaves what an earlier attempt reported.
            if progress.record_head.is_some() {
                status.record_head = progress.record_head;
            }
            if progress.output.is_some() {
                status.output = progress.output;
            }
            if progress.last_checkpoint.is_some() {
                status.last_checkpoint = progress.last_checkpoint;
            }
        }
        let mut announced = None;
        if let Some((phase, why, message)) = self.phase {
            let ready = Wanted::new(conditions::READY, phase == SessionPhase::Succeeded, why, message);
            status.phase = Some(phase);
            status.conditions = merge(&previous, std::slice::from_ref(&ready), generation, now);
            announced = Some(ready);
        }
        if status.start_time.is_none() {
            status.start_time = Some(Time(now));
        }
        if self.completed && status.completion_time.is_none() {
            status.completion_time = Some(Time(now));
        }
        status.observed_generation = generation;
        announced
    }
}

/// Applies `update` to the Session's status and announces a new Ready condition.
async fn write_status(ctx: &Context, session: &Session, update: Update) -> Result<()> {
    let current = session.status.clone().unwrap_or_default();
    let mut status = current.clone();
    let announced = update.apply(&mut status, session.metadata.generation, now());
    // A finished Session's capability pods stop with it — before the status says so, because a
    // finished Session is not reconciled again: if stopping fails, the next pass tries again.
    if status.phase.is_some_and(SessionPhase::is_terminal)
        && !current.phase.is_some_and(SessionPhase::is_terminal)
    {
        stop_capabilities(ctx, session).await?;
    }
    let status = serde_json::to_value(&status).map_err(|source| Error::Build {
        what: "Session status",
        source,
    })?;
    let api = Api::<Session>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    apply_status(&api, &session.name_any(), status).await?;
    if let Some(ready) = announced {
        super::announce(ctx, session, &current.conditions, &ready).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod_with_message(message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "s-run-1"},
            "status": {"containerStatuses": [{
                "name": "runner", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": message}},
            }]},
        }))
        .expect("pod")
    }

    fn report(head: Option<&str>, checkpoint: Option<u32>) -> PodReport {
        serde_json::from_value(json!({
            "outcome": "completed", "runId": "r-1", "steps": 3,
            "usage": {"steps": 3, "tokens": 120, "tool_calls": 2, "wall_ms": 4500},
            "head": head, "output": null,
            "checkpoint": checkpoint.map(|step| json!([step, format!("h{step}")])),
        }))
        .expect("report")
    }

    fn pending(hash: &str) -> PendingApproval {
        PendingApproval {
            call_hash: hash.into(),
            tool: "restart".into(),
            risk: contextos_crds::common::ToolRisk::Destructive,
            arguments: "{}".into(),
            rule: "p/r".into(),
            reason: "why".into(),
            approvers: Default::default(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    fn ready(status: &SessionStatus) -> Option<(&str, &str)> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    /// Each row: the status before, the change, and what must hold after.
    #[test]
    fn status_changes_apply_field_by_field() {
        type Check = fn(&SessionStatus, Option<&Wanted>);
        let running = || Update::phase(SessionPhase::Running, reason::RUNNING, "pod started");
        let rows: Vec<(&str, SessionStatus, Update, Check)> = vec![
            (
                "a report sets progress, budget, head and checkpoint",
                SessionStatus::default(),
                Update::default().report(&report(Some("abc"), Some(2))),
                |s, announced| {
                    assert_eq!(s.run_id.as_deref(), Some("r-1"));
                    assert_eq!(s.steps, Some(3));
                    let used = s.budget_used.clone().expect("budget");
                    assert_eq!(
                        (used.steps, used.tokens, used.tool_calls, used.wall_seconds),
                        (3, 120, 2, 4)
                    );
                    assert_eq!(s.record_head.as_deref(), Some("abc"));
                    assert_eq!(
                        s.last_checkpoint
                            .as_ref()
                            .map(|c| (c.step, c.entry_hash.as_str())),
                        Some((2, "h2"))
                    );
                    assert!(
                        announced.is_none() && s.conditions.is_empty(),
                        "no phase, no condition"
                    );
                },
            ),
            (
                "a later report without head or checkpoint keeps the earlier ones",
                SessionStatus {
                    record_head: Some("old".into()),
                    last_checkpoint: Some(CheckpointRef {
                        step: 1,
                        entry_hash: "h1".into(),
                    }),
                    ..Default::default()
                },
                Update::default().report(&report(None, None)),
                |s, _| {
                    assert_eq!(s.record_head.as_deref(), Some("old"));
                    assert_eq!(s.last_checkpoint.as_ref().map(|c| c.step), Some(1));
                },
            ),
            (
                "a new attempt clears what waited for a human and pins its revisions",
                SessionStatus {
                    pending_approval: Some(pending("h")),
                    unresolved_call: Some(UnresolvedCallStatus {
                        call_id: "1.0".into(),
                        tool: "t".into(),
                        arguments: String::new(),
                        reason: String::new(),
                    }),
                    ..Default::default()
                },
                running()
                    .attempt(2)
                    .pinned(PinnedRevisions::default())
                    .clear_pending(),
                |s, announced| {
                    assert!(s.pending_approval.is_none() && s.unresolved_call.is_none());
                    assert_eq!(s.attempt, Some(2));
                    assert!(s.pinned.is_some());
                    assert_eq!(s.phase, Some(SessionPhase::Running));
                    assert_eq!(ready(s), Some(("False", reason::RUNNING)));
                    assert!(announced.is_some());
                },
            ),
            (
                "an approval request is shown; no request leaves the field as it was",
                SessionStatus::default(),
                Update::default().pending(Some(pending("h2"))).unresolved(None),
                |s, _| {
                    assert_eq!(
                        s.pending_approval.as_ref().map(|p| p.call_hash.as_str()),
                        Some("h2")
                    );
                    assert!(s.unresolved_call.is_none());
                },
            ),
            (
                "success completes once and is Ready",
                SessionStatus::default(),
                Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "done").completed(),
                |s, _| {
                    assert_eq!(ready(s), Some(("True", reason::SUCCEEDED)));
                    assert!(s.completion_time.is_some() && s.start_time.is_some());
                },
            ),
        ];
        for (name, mut status, update, check) in rows {
            let announced = update.apply(&mut status, Some(4), at(1_000));
            assert_eq!(status.observed_generation, Some(4), "{name}");
            check(&status, announced.as_ref());
        }
    }

    #[test]
    fn start_and_completion_times_are_set_once() {
        let mut status = SessionStatus::default();
        Update::phase(SessionPhase::Running, reason::RUNNING, "a").apply(&mut status, None, at(10));
        Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "b")
            .completed()
            .apply(&mut status, None, at(20));
        Update::phase(SessionPhase::Succeeded, reason::SUCCEEDED, "b")
            .completed()
            .apply(&mut status, None, at(30));
        assert_eq!(status.start_time, Some(Time(at(10))));
        assert_eq!(status.completion_time, Some(Time(at(20))));
    }

    #[test]
    fn only_a_whole_report_is_a_report() {
        let report = r#"{"outcome":"completed","runId":"r","steps":1,"usage":{"steps":1,"tokens":1,"tool_calls":0,"wall_ms":1},"head":null}"#;
        assert!(termination_report(&pod_with_message(report)).is_some());
        // A hostile tool's text around (or instead of) a report is not one.
        let injected = format!("tool said:\n{report}");
        assert!(termination_report(&pod_with_message(&injected)).is_none());
        assert!(termination_report(&pod_with_message("garbage")).is_none());
    }
}
