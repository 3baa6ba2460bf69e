//! Sessions: resolve the Agent and pin its revisions into an immutable run bundle, then run it
//! in one sandboxed pod per attempt (deterministic names, owned by the Session), read each
//! attempt's outcome from its termination message, pause for approvals, and retry crashed
//! attempts — resuming from the last checkpoint — up to a bound.
//!
//! Each pass: fetch what is observed of the Session (its pinned bundle, the attempt's pod and
//! what it reported, checked against the gateway's signatures) → [`plan::plan`], which decides
//! the next [`Step`] without touching the API → apply the step → write the status
//! ([`status::Update`]).

mod plan;
mod status;

use std::{collections::BTreeMap, sync::Arc};

use contextos_crds::{
    Agent, SandboxProfile, SandboxProfileSpec, Session, annotations,
    conditions::{self, reason},
    session::{PinnedRevisions, SessionPhase},
};
use contextos_runner::{
    capability,
    gateway::approvals::{ApprovalRequest, Attested, UnresolvedReport},
    run::{
        bundle::{Composition, RunBundle, spec_digest},
        issue_runner_context,
        pod::{PodBundle, PodReport, ReportedOutcome},
    },
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use self::{
    plan::{AfterCrash, AttemptPod, Ended, Observed, Step},
    status::Update,
};
use super::{
    Context, Error, Invalid, Result, apply, apply_status, condition_message, is_ready, now, ready_message,
    revisions,
};
use crate::{capability_pods, session_children as children};

/// Reconciles a Session.
pub async fn reconcile_session(session: Arc<Session>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Session");
    let phase = session.status.as_ref().and_then(|s| s.phase);
    // A Session being deleted (its children go first, its bundle among them) is left to the
    // garbage collector: nothing is started, pinned or reported for it.
    if phase.is_some_and(SessionPhase::is_terminal) || session.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let attempt = session.status.as_ref().and_then(|s| s.attempt).unwrap_or(1);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    if session.spec.cancel {
        let pod = attempt_pod(&pods, &session, attempt).await?;
        return run(&ctx, &session, None, plan::cancelled(&pod)).await;
    }
    let (pod_bundle, sandbox) = match pinned(&ctx, &session).await? {
        Ok(pinned) => pinned,
        Err(invalid) => return run(&ctx, &session, None, plan::held(&invalid)).await,
    };
    runner_policy(&ctx, &session.namespace().unwrap_or_default(), false).await?;
    let mut pod = attempt_pod(&pods, &session, attempt).await?;
    // Capability pods are made once an attempt's start is admitted (see `run`), and kept up
    // while its runner pod lives (one its deadline ended is made again): never held by a
    // Session its quota keeps waiting.
    if matches!(pod, AttemptPod::Live { .. }) {
        start_capabilities(&ctx, &session, &pod_bundle, &sandbox, &pods).await?;
    }
    if let AttemptPod::Ended(ended) = &mut pod {
        observe_end(&ctx, &session, &pods, attempt, ended).await?;
    }
    let step = plan::plan(&Observed {
        session: &session,
        bundle: &pod_bundle.bundle,
        attempt,
        pod: &pod,
        max_crash_attempts: ctx.max_crash_attempts,
        now: now(),
    });
    run(&ctx, &session, Some((&pod_bundle, &sandbox)), step).await
}

/// Applies `step`. `pinned` is the Session's bundle and sandbox, which starting an attempt needs.
async fn run(
    ctx: &Context,
    session: &Session,
    pinned: Option<(&PodBundle, &SandboxProfileSpec)>,
    step: Step,
) -> Result<Action> {
    match step {
        Step::WaitForForeignPod { name } => Err(Error::Run(format!(
            "pod {name} belongs to an earlier Session named {}; waiting for it to be removed",
            session.name_any()
        ))),
        Step::Start {
            attempt,
            resumed_for,
            after_crash,
        } => {
            let (pod_bundle, sandbox) =
                pinned.ok_or_else(|| Error::Run("an attempt starts only from a pinned bundle".into()))?;
            // Where quotas limit Sessions, a start is decided and made under the namespace's
            // lock, so the next start counts this one. A start that finds the lock taken comes
            // back shortly instead of holding a worker every other tenant needs.
            let namespace = session.namespace().unwrap_or_default();
            let lock = ctx.start_lock(&namespace);
            let _held = if super::spend_quota::limits_sessions(ctx, &namespace).await? {
                let Ok(held) = lock.try_lock() else {
                    return Ok(Action::requeue(std::time::Duration::from_millis(500)));
                };
                let first = attempt == 1 && resumed_for.is_none() && after_crash.is_none();
                if let Err(wait) = super::spend_quota::admit_start(ctx, session, first).await? {
                    // A resumed attempt's capability pods, if an earlier pass kept them.
                    if !capability::servers(&pod_bundle.bundle.agent_spec.tools).is_empty() {
                        stop_capabilities(ctx, session).await?;
                    }
                    let update = Update::phase(SessionPhase::Pending, reason::QUOTA_WAIT, wait.message);
                    write_status(ctx, session, update).await?;
                    return Ok(Action::requeue(super::spend_quota::WAIT_RECHECK));
                }
                Some(held)
            } else {
                None
            };
            // Before the runner pod: its first call may need them (the gateway waits for them
            // a while, too).
            let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
            let replacing = start_capabilities(ctx, session, pod_bundle, sandbox, &pods).await?;
            if !replacing.is_empty() {
                // Said on the Session (a pod that never goes — a finalizer someone added — is
                // for a person to see), and retried as a failure is, further apart each time.
                let message = format!(
                    "attempt {attempt} waits for its ended capability pods {} to be gone, to make them again before its runner pod; one that stays past its grace period is held by a finalizer or a lost node",
                    replacing.join(", ")
                );
                let update = Update::phase(
                    SessionPhase::Pending,
                    reason::CAPABILITY_PODS_WAIT,
                    message.clone(),
                );
                write_status(ctx, session, update).await?;
                return Err(Error::Run(message));
            }
            start_attempt(
                ctx,
                session,
                pod_bundle,
                sandbox,
                attempt,
                resumed_for.as_deref(),
                after_crash.as_ref(),
            )
            .await
        }
        Step::Report { update, recheck } => {
            write_status(ctx, session, *update).await?;
            Ok(recheck.map_or_else(Action::await_change, Action::requeue))
        }
        Step::Wait(after) => Ok(Action::requeue(after)),
        Step::Cancel { stop } => {
            if let Some(name) = stop {
                let pods =
                    Api::<Pod>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let update = Update::phase(
                SessionPhase::Cancelled,
                reason::CANCELLED,
                "cancelled by spec.cancel",
            );
            write_status(ctx, session, update.completed()).await?;
            Ok(Action::await_change())
        }
    }
}

/// The attempt's pod as the plan sees it.
async fn attempt_pod(pods: &Api<Pod>, session: &Session, attempt: u32) -> Result<AttemptPod> {
    let Some(pod) = pods
        .get_opt(&children::pod_name(&session.name_any(), attempt))
        .await?
    else {
        return Ok(AttemptPod::Missing);
    };
    let name = pod.name_any();
    if !owned_by(pod.metadata.owner_references.as_deref(), session) {
        return Ok(AttemptPod::Foreign { name });
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase != "Succeeded" && phase != "Failed" {
        return Ok(AttemptPod::Live { name, phase });
    }
    Ok(AttemptPod::Ended(Box::new(Ended {
        name,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        report: termination_report(&pod),
        attestation: None,
        progress: None,
        // What the attempt was started for (a decision or a finding), as its pod says.
        resumed_for: pod.annotations().get(annotations::RESUMED_FOR).cloned(),
        finished_at: pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.finished_at.as_ref())
            .map(|t| t.0),
        cause: crate::crash::crash_cause(&pod),
        crashes: 0,
        crash_counted: false,
    })))
}

/// What an ended attempt's plan needs beyond its pod: whether the gateway signed what its
/// report relays for people, or — when it reported nothing — how many attempts crashed.
async fn observe_end(
    ctx: &Context,
    session: &Session,
    pods: &Api<Pod>,
    attempt: u32,
    ended: &mut Ended,
) -> Result<()> {
    // A completion the gateway did not sign is no report: the attempt counts as crashed and the
    // next resumes from the record (a termination message can be written by whoever can write
    // the pod's files; the gateway's signature cannot).
    if let Some(report) = &ended.report {
        let key = if report.outcome == ReportedOutcome::Completed || report.progress.is_some() {
            Some(tenant_key(ctx, session).await?)
        } else {
            None
        };
        if let Err(why) = believed(report, &crate::session_children::run_id(session), key.as_ref()) {
            ended.report = None;
            ended.cause = crate::crash::CrashCause::Unverified { why };
        } else if let Some(key) = &key {
            ended.progress = attested_progress(report, key, (&ended.name, &ended.uid));
        }
    }
    match &ended.report {
        // Counted in the status once seen (where a tenant cannot take one back by deleting
        // its pod), each attempt once; counted from the pods too, for crashes from before the
        // status counted them.
        None => {
            let status = session.status.as_ref();
            ended.crash_counted = status.and_then(|s| s.last_crashed_attempt) == Some(attempt);
            let recorded = status.and_then(|s| s.crashed_attempts).unwrap_or(0);
            let counted = match ended.crash_counted {
                true => recorded,
                false => recorded.saturating_add(1),
            };
            ended.crashes = counted.max(crashed_attempts(ctx, pods, session).await?);
        }
        Some(report) => {
            ended.attestation = match (report.outcome, &report.awaiting, &report.unresolved) {
                (ReportedOutcome::AwaitingApproval, Some(awaiting), _) => {
                    Some(attested(ctx, session, &report.run_id, awaiting).await)
                }
                (ReportedOutcome::AwaitingResolution, _, Some(unresolved)) => {
                    Some(attested_unresolved(ctx, session, &report.run_id, unresolved).await)
                }
                _ => None,
            }
        }
    }
    Ok(())
}

/// The key the gateway signs the Session's tenant's statements with; an error (retried) while
/// the gateway cannot be asked.
async fn tenant_key(ctx: &Context, session: &Session) -> Result<contextos_runner::keys::PublicKey> {
    ctx.tenant_keys
        .get(
            &ctx.client,
            &ctx.runner.gateway,
            &session.namespace().unwrap_or_default(),
        )
        .await
        .map_err(|e| Error::Run(e.to_string()))
}

/// Whether the operator believes `report` of an attempt of the Session whose run is `run_id`:
/// a report of another run is not this attempt's (a signed completion of another Session must
/// not pass for this one's), and a completion must be the gateway's word (`key`: the tenant's).
fn believed(
    report: &PodReport,
    run_id: &str,
    key: Option<&contextos_runner::keys::PublicKey>,
) -> std::result::Result<(), String> {
    if report.run_id != run_id {
        return Err(format!(
            "its report is of run {:?}, not of this Session's run {run_id}",
            report.run_id.chars().take(64).collect::<String>()
        ));
    }
    match (report.outcome, key) {
        (ReportedOutcome::Completed, Some(key)) => completion_attested(report, key),
        (ReportedOutcome::Completed, None) => Err("no key to check its completion with".into()),
        _ => Ok(()),
    }
}

/// How far `report`'s run got, if the gateway signed what the report relays of it for that run
/// (`report`'s run is the Session's: see [`believed`]), asked by the attempt's own pod (`pod`:
/// name and uid) — and, for a completion, once the run had ended, so it is the run's last
/// word. Anything else — no signature, another key's, another run's or attempt's, figures
/// edited after signing, one asked before the end it reports — shows nothing: the Session
/// keeps the progress it showed. (An attempt that did not end the run can still relay one it
/// asked earlier in the attempt; the run's end, or its next attempt, shows the record's.)
fn attested_progress(
    report: &PodReport,
    key: &contextos_runner::keys::PublicKey,
    pod: (&str, &str),
) -> Option<contextos_runner::gateway::approvals::RunProgress> {
    let signed = report.progress.as_ref()?;
    let progress = signed.verify(key).filter(|p| {
        p.run_id == report.run_id
            && (p.pod.as_str(), p.pod_uid.as_str()) == pod
            && (p.ended || report.outcome != ReportedOutcome::Completed)
    });
    if progress.is_none() {
        tracing::warn!(run = %report.run_id, "a runner's report relays progress the gateway did not sign for its run; none of it is shown");
    }
    progress.cloned()
}

/// Whether `report`'s completion is the gateway's word: its signature over the run, the output
/// as shown and the whole output's digest.
fn completion_attested(
    report: &PodReport,
    key: &contextos_runner::keys::PublicKey,
) -> std::result::Result<(), String> {
    let (Some(digest), Some(signature)) = (&report.output_digest, &report.completion_attestation) else {
        return Err("the report carries no signature of the gateway service".into());
    };
    let statement = contextos_runner::gateway::approvals::CompletedRun {
        run_id: &report.run_id,
        shown_output: report.output.as_deref().unwrap_or_default(),
        output_digest: digest.clone(),
    };
    if statement.verify(key, signature) {
        Ok(())
    } else {
        Err("its signature does not match the completion the report says".into())
    }
}

/// Attempts of this Session whose pod is still there and ended without a report: the crashes
/// the retry bound counts (attempts started by approvals, and attempts that reported, do not
/// count). A tenant can delete pods: the status's count is the one that holds.
async fn crashed_attempts(ctx: &Context, pods: &Api<Pod>, session: &Session) -> Result<u32> {
    let pods = pods
        .list(&kube::api::ListParams::default().labels(&format!(
            "{}={}",
            contextos_crds::labels::SESSION,
            session.name_any()
        )))
        .await?;
    let ended: Vec<Option<PodReport>> = pods
        .items
        .iter()
        .filter(|p| owned_by(p.metadata.owner_references.as_deref(), session))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            matches!(phase, Some("Failed" | "Succeeded"))
        })
        .map(termination_report)
        .collect();
    // No report, or one not believed (another run's, a completion the gateway did not sign).
    let unsigned = ended.iter().any(|r| {
        r.as_ref()
            .is_some_and(|r| r.outcome == ReportedOutcome::Completed)
    });
    let key = match unsigned {
        true => Some(tenant_key(ctx, session).await?),
        false => None,
    };
    let run_id = crate::session_children::run_id(session);
    let crashed = ended
        .iter()
        .filter(|report| match report {
            None => true,
            Some(r) => believed(r, &run_id, key.as_ref()).is_err(),
        })
        .count();
    Ok(u32::try_from(crashed).unwrap_or(u32::MAX))
}

/// Applies the namespace's runner NetworkPolicy unless this process already applied the same
/// one there (`always`: whatever was applied; before every runner pod). Not on every pass: each
/// would be a server-side apply, and wake the NetworkPolicy enforcer.
async fn runner_policy(ctx: &Context, namespace: &str, always: bool) -> Result<()> {
    let policy = children::network_policy(namespace, &ctx.runner);
    let digest = {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&policy)
            .unwrap_or_default()
            .hash(&mut hasher);
        hasher.finish()
    };
    if always || !ctx.runner_policies.applied(namespace, digest) {
        apply(&Api::namespaced(ctx.client.clone(), namespace), &policy).await?;
        ctx.runner_policies.record(namespace, digest);
    }
    Ok(())
}

/// Makes the capability pods of the Session's command-started MCP servers that are missing,
/// and the NetworkPolicy confining them, and removes those that ended (their deadline passed
/// while the Session waited, say). The pods still going away, to be made again (none: every
/// one is there): an attempt's runner pod is started only once none is, so its first call
/// finds its servers.
async fn start_capabilities(
    ctx: &Context,
    session: &Session,
    pod_bundle: &PodBundle,
    sandbox: &SandboxProfileSpec,
    pods: &Api<Pod>,
) -> Result<Vec<String>> {
    let servers = capability::servers(&pod_bundle.bundle.agent_spec.tools);
    if servers.is_empty() {
        return Ok(Vec::new());
    }
    let mut replacing = Vec::new();
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
                replacing.push(name.clone());
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Going away (deleted above on an earlier pass): made again once it is gone. One
            // still there long after its grace period (its node is gone) is removed at once.
            Some(existing) if existing.metadata.deletion_timestamp.is_some() => {
                replacing.push(name.clone());
                let since = existing.metadata.deletion_timestamp.as_ref().map(|t| t.0);
                if since.is_some_and(|t| {
                    now().duration_since(t) > k8s_openapi::jiff::SignedDuration::from_secs(30)
                }) {
                    let at_once = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    };
                    match pods.delete(&name, &at_once).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
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
    Ok(replacing)
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

/// How long a Session whose runner pod the API server refused waits before it is tried again.
const POD_REJECTED_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Issues a fresh RunContext and applies the attempt's pod; what to do next.
async fn start_attempt(
    ctx: &Context,
    session: &Session,
    pod_bundle: &PodBundle,
    sandbox: &SandboxProfileSpec,
    attempt: u32,
    resumed_for: Option<&str>,
    after_crash: Option<&AfterCrash>,
) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let pod_name = children::pod_name(&session.name_any(), attempt);
    let signed = issue_runner_context(
        &pod_bundle.bundle,
        &children::run_id(session),
        &children::trace_id(session),
        &pod_name,
        session.metadata.uid.as_deref().unwrap_or_default(),
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
    // Whatever this process applied before: a policy deleted since is back before the pod is.
    runner_policy(ctx, &namespace, true).await?;
    // A pod's spec is immutable and each attempt's RunContext is fresh, so the pod is created
    // once: if a concurrent reconcile (or an earlier pass whose status write was lost) created
    // it, that pod is the attempt.
    match Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => ctx.metrics.runner_pod_created(),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        // Refused by admission or validation (a ResourceQuota, Pod Security, a LimitRange, a
        // value the profile's schema let through): said on the Session, which a person can act
        // on, rather than only in this process's log at every retry.
        Err(kube::Error::Api(e))
            if e.code == 422 || (e.code == 403 && !e.message.contains("being terminated")) =>
        {
            let message: String = e.message.chars().take(1024).collect();
            let update = Update::phase(
                SessionPhase::Pending,
                reason::POD_REJECTED,
                format!(
                    "the API server refused runner pod {pod_name}: {message} (fix what refused it — the \
                     SandboxProfile's values, the namespace's quota or limits, an admission policy; \
                     tried again every {} s)",
                    POD_REJECTED_RECHECK.as_secs()
                ),
            );
            write_status(ctx, session, update).await?;
            return Ok(Action::requeue(POD_REJECTED_RECHECK));
        }
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
            Some(crashed) => format!("runner pod {} started ({})", pod.name_any(), crashed.why),
            None => format!("runner pod {} started", pod.name_any()),
        },
    )
    .attempt(attempt)
    .pinned(pinned)
    .run_id(children::run_id(session))
    .clear_pending();
    let update = match after_crash {
        Some(crashed) => update.crashed_attempts(crashed.crashes, attempt - 1),
        None => update,
    };
    write_status(ctx, session, update).await?;
    Ok(Action::await_change())
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
                            "ConfigMap {} is not the run bundle the operator wrote for this Session ({why}); it is not used. Delete it and the operator pins the Agent's revisions again (if the run had not started: a started run whose bundle is gone ends)",
                            existing.name_any()
                        ),
                    ))
                }
            },
        );
    }
    // A run that started was pinned to that bundle: pinned again from the Agent's revisions
    // now, its later attempts would run under other revisions than its record and status
    // say. Whoever deleted it ended the run.
    if let Some(run) = session.status.as_ref().and_then(|s| s.run_id.as_deref()) {
        return Ok(Err(Invalid::new(
            reason::BUNDLE_LOST,
            format!(
                "ConfigMap {}, the run bundle run {run} was pinned to, was deleted; a Session's revisions cannot change while it runs, so it goes no further (start another Session)",
                children::bundle_name(&session.name_any())
            ),
        )));
    }
    if let Some(problem) = contextos_crds::free_form::session_problem(&session.spec) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
    if let Some(value) = children::traceparent_annotation(session)
        && contextos_runner::telemetry::traceparent_trace_id(value).is_none()
    {
        return Ok(Err(Invalid::new(
            reason::INVALID_SPEC,
            format!(
                "metadata.annotations[{}]: {value:?} is not a W3C traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>); fix it or remove it",
                contextos_runner::telemetry::TRACEPARENT_ANNOTATION
            ),
        )));
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
    match contextos_runner::run_context::effective_limits(
        &composition.agent_spec.budget,
        composition.agent_spec.safety_mode,
        session.spec.overrides.as_ref(),
    ) {
        Err(e) => return Ok(Err(Invalid::new(reason::OVERRIDE_LOOSENS, e.to_string()))),
        // A Session that makes its run supervised where nobody may approve would wait for good.
        Ok((_, safety)) if safety != composition.agent_spec.safety_mode => {
            if let Some(problem) = contextos_runner::policy::decide::unapprovable(
                &composition.agent_spec,
                safety,
                &composition.policies,
            ) {
                return Ok(Err(Invalid::new(
                    reason::INVALID_SPEC,
                    format!("spec.overrides.safetyMode: Agent {agent_name}'s {problem}"),
                )));
            }
        }
        Ok(_) => {}
    }
    let Some(sandbox) = sandbox else {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            "the Agent's SandboxProfile is gone",
        )));
    };
    // The profile as it is now confines what was promoted under an earlier one: a tool it no
    // longer allows (its own or a skill's) keeps every new Session from starting.
    if let Some(problem) = profile_refuses(&composition.agent_spec.tools, &sandbox) {
        return Ok(Err(Invalid::new(reason::EXECUTION_NOT_ALLOWED, problem)));
    }
    let bundle = match resolve_bundle(ctx, session, composition, agent.labels().clone(), &sandbox).await? {
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
    if let Some(problem) = children::bundle_too_large(&config_map, session) {
        return Ok(Err(Invalid::new(reason::INVALID_SPEC, problem)));
    }
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

/// The run bundle of the Agent's promoted composition: its pack's ConfigMap contents and its
/// model scripts are the composition's, as promoted, never read from the ConfigMaps now.
async fn resolve_bundle(
    ctx: &Context,
    session: &Session,
    composition: Composition,
    agent_labels: BTreeMap<String, String>,
    sandbox: &SandboxProfile,
) -> Result<Result<RunBundle, Invalid>> {
    let namespace = session.namespace().unwrap_or_default();
    if let Some(missing) = unpinned_content(&composition) {
        return Ok(Err(Invalid::new(
            reason::REFERENCE_NOT_READY,
            format!(
                "spec.agentRef.name: the promoted revision of Agent {} does not hold {missing}: it was promoted by an operator that read it when a Session started; a Session starts once the Agent's revision with it is promoted (see its Promoted condition)",
                session.spec.agent_ref.name
            ),
        )));
    }
    let Composition {
        agent_spec,
        context_pack,
        policies,
        ontology,
        skills,
        model_script,
        routed_scripts,
    } = composition;
    // Pinned now: the run, its resume and its replays cost what the model cost when it started.
    let prices = match super::agent::model_price(ctx, &agent_spec).await? {
        Ok(prices) => prices,
        Err(invalid) => return Ok(Err(invalid)),
    };
    Ok(Ok(RunBundle {
        tenant: namespace,
        session: session.name_any(),
        session_spec: session.spec.clone(),
        agent: session.spec.agent_ref.name.clone(),
        agent_spec,
        context_pack,
        sources: BTreeMap::new(),
        policies,
        sandbox_profile_digest: Some(spec_digest(&sandbox.spec)),
        model_script,
        session_labels: session.labels().clone(),
        agent_labels,
        ontology,
        model_price: prices.primary,
        routed_scripts,
        routed_prices: prices.routed,
        tool_prices: prices.tools,
        skills,
    }))
}

/// Why `profile` does not allow the promoted revision's `tools`, if it does not (pure).
fn profile_refuses(tools: &[contextos_crds::agent::Tool], profile: &SandboxProfile) -> Option<String> {
    let name = profile.name_any();
    if let Some(max) = profile.spec.max_tool_risk
        && let Some(tool) = tools.iter().find(|t| t.risk > max)
    {
        return Some(format!(
            "the Agent's promoted revision has tool {} with risk {}, above SandboxProfile {name}'s maxToolRisk {}; no Session of it starts until a revision without it is promoted",
            tool.name,
            tool.risk.as_str(),
            max.as_str()
        ));
    }
    contextos_runner::run::execution::execution_refused(tools, &profile.spec.execution, &name)
        .map(|problem| format!("the Agent's promoted revision: {problem}"))
}

/// What a promoted `composition` names but does not hold (pure): a ConfigMap source's contents
/// or a model script. Compositions promoted before they held them name them only.
fn unpinned_content(composition: &Composition) -> Option<String> {
    let pack = &composition.context_pack;
    if let Some(source) = pack
        .spec
        .sources
        .iter()
        .find(|s| s.config_map_ref.is_some() && !pack.contents.contains_key(&s.name))
    {
        return Some(format!(
            "the contents of ContextPack {}'s source {}",
            pack.name, source.name
        ));
    }
    let spec = &composition.agent_spec;
    if spec.model.script_ref.is_some() && composition.model_script.is_none() {
        return Some("its model's script (spec.model.scriptRef)".into());
    }
    spec.routing
        .iter()
        .flat_map(|r| r.models.iter())
        .find(|m| m.model.script_ref.is_some() && !composition.routed_scripts.contains_key(&m.name))
        .map(|m| format!("the script of routed model {}", m.name))
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
        reason: &ApprovalRequest::shown_reason(&awaiting.reason),
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
        for_call: unresolved.for_call.as_deref(),
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
        .get(
            &ctx.client,
            &ctx.runner.gateway,
            &session.namespace().unwrap_or_default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    if statement.verify(&key, signature) {
        Ok(())
    } else {
        Err("its signature does not match what the runner reported".into())
    }
}

/// Exports the root span of a Session that has ended (its runs' spans are parented on its id
/// while it runs; see `contextos_runner::telemetry::session_span_id`).
fn export_session_root(session: &Session, status: &contextos_crds::SessionStatus) {
    let Some(trace) = contextos_runner::telemetry::trace_id_of(&children::trace_id(session)) else {
        return;
    };
    let now = std::time::SystemTime::now();
    let started = status
        .start_time
        .as_ref()
        .or(session.metadata.creation_timestamp.as_ref())
        .map_or(now, |t| std::time::SystemTime::from(t.0));
    let ended = status
        .completion_time
        .as_ref()
        .map_or(now, |t| std::time::SystemTime::from(t.0));
    let outcome = match status.phase {
        Some(SessionPhase::Succeeded) => "Succeeded",
        Some(SessionPhase::Cancelled) => "Cancelled",
        _ => "Failed",
    };
    contextos_runner::telemetry::export_session_root(&contextos_runner::telemetry::SessionRoot {
        tenant: &session.namespace().unwrap_or_default(),
        session: &session.name_any(),
        agent: &session.spec.agent_ref.name,
        trace,
        caller: children::traceparent_annotation(session),
        started,
        ended: ended.max(started),
        outcome,
        attempts: status.attempt.unwrap_or(0),
    });
}

/// Applies `update` to the Session's status and announces a new Ready condition.
async fn write_status(ctx: &Context, session: &Session, update: Update) -> Result<()> {
    let current = session.status.clone().unwrap_or_default();
    let mut status = current.clone();
    let announced = update.apply(&mut status, session.metadata.generation, now());
    // A finished Session's capability pods stop with it — before the status says so, because a
    // finished Session is not reconciled again: if stopping fails, the next pass tries again.
    let ends = status.phase.is_some_and(SessionPhase::is_terminal)
        && !current.phase.is_some_and(SessionPhase::is_terminal);
    if ends {
        stop_capabilities(ctx, session).await?;
    }
    if status == current {
        // Nothing to say: each write would bring the Session back for another pass (its own
        // watch sees every status write), and costs the API server a server-side apply.
        return Ok(());
    }
    let ended = ends.then(|| status.clone());
    let status = serde_json::to_value(&status).map_err(|source| Error::Build {
        what: "Session status",
        source,
    })?;
    let api = Api::<Session>::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    // The status is computed from the observed one (pins, attempt, run id are written once and
    // carried on): a pass working from a cache that has not caught up with the previous write
    // must not apply a status without them. It is refused, and the next pass decides again.
    apply_status(&api, session, status).await?;
    // Once, when the write that ends it was taken (a replica that fails in between leaves the
    // runs' spans without their root: nothing is exported twice).
    if let Some(ended) = ended {
        export_session_root(session, &ended);
    }
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

    /// A composition promoted before it held its pack's ConfigMap contents and its scripts
    /// starts no Session: the ConfigMaps as they are now are never read in their place.
    #[test]
    fn a_composition_without_the_contents_it_names_is_not_run() {
        let bundle = crate::fixtures::run_bundle(&crate::fixtures::session());
        let mut composition = Composition::new(&bundle.agent_spec, bundle.context_pack.clone(), Vec::new());
        let missing = unpinned_content(&composition).expect("the runbook's contents are missing");
        assert!(missing.contains("source checkout-runbook"), "{missing}");
        composition
            .context_pack
            .contents
            .insert("checkout-runbook".into(), "# runbook".into());
        // The quickstart's model is scripted.
        assert!(composition.agent_spec.model.script_ref.is_some());
        assert!(unpinned_content(&composition).is_some_and(|m| m.contains("spec.model.scriptRef")));
        composition.model_script = Some("{}".into());
        assert_eq!(unpinned_content(&composition), None);
    }

    #[test]
    fn a_completion_is_believed_only_as_the_gateway_signed_it() {
        use contextos_runner::{
            gateway::approvals::{Attested as _, CompletedRun},
            keys::KeyPair,
        };
        let tenant = KeyPair::generate().expect("key");
        let output = "{\"summary\": \"restarted checkout-api\"}";
        let signed = CompletedRun {
            run_id: "r-1",
            shown_output: output,
            output_digest: CompletedRun::digest_of(output),
        }
        .sign(&tenant);
        let report = |output: &str, signature: Option<&str>| -> PodReport {
            serde_json::from_value(json!({
                "outcome": "completed", "runId": "r-1", "steps": 3,
                "usage": {"steps": 3, "tokens": 10, "tool_calls": 1, "wall_ms": 10},
                "output": output, "outputDigest": CompletedRun::digest_of(output),
                "completionAttestation": signature,
            }))
            .expect("report")
        };
        let key = tenant.public();
        assert_eq!(completion_attested(&report(output, Some(&signed)), &key), Ok(()));
        // Another output (written into the termination message), no signature, or another
        // tenant's key: not believed.
        let forged = completion_attested(&report("all good", Some(&signed)), &key);
        assert!(forged.is_err(), "{forged:?}");
        assert!(completion_attested(&report(output, None), &key).is_err());
        let other = KeyPair::generate().expect("key").public();
        assert!(completion_attested(&report(output, Some(&signed)), &other).is_err());
        // A completion signed for another run (another Session's, of the same tenant) is not
        // this Session's, however well signed.
        assert_eq!(
            believed(&report(output, Some(&signed)), "r-1", Some(&key)),
            Ok(())
        );
        let elsewhere = believed(&report(output, Some(&signed)), "r-2", Some(&key));
        assert!(
            elsewhere
                .as_ref()
                .is_err_and(|why| why.contains("not of this Session's run r-2")),
            "{elsewhere:?}"
        );
    }

    #[test]
    fn progress_is_shown_only_as_the_gateway_signed_it_for_the_run() {
        use contextos_runner::{
            gateway::approvals::{RunProgress, SignedRunProgress},
            keys::KeyPair,
        };
        let tenant = KeyPair::generate().expect("key");
        let progress = |run: &str| RunProgress {
            run_id: run.into(),
            pod: "s-run-2".into(),
            pod_uid: "uid-2".into(),
            ended: false,
            head: Some("ab".repeat(32)),
            steps: 4,
            tokens: 900,
            tool_calls: 3,
            checkpoint: Some((3, "cd".repeat(32))),
        };
        let report = |signed: Option<SignedRunProgress>| -> PodReport {
            let mut report: PodReport = serde_json::from_value(json!({
                "outcome": "failed", "runId": "r-1", "steps": 1,
                "usage": {"steps": 1, "tokens": 10, "tool_calls": 1, "wall_ms": 10},
                "head": "00",
            }))
            .expect("report");
            report.progress = signed;
            report
        };
        let key = tenant.public();
        let attested_progress = |report: &PodReport, key: &contextos_runner::keys::PublicKey| {
            attested_progress(report, key, ("s-run-2", "uid-2"))
        };
        let genuine = SignedRunProgress::sign(progress("r-1"), &tenant);
        assert_eq!(
            attested_progress(&report(Some(genuine.clone())), &key),
            Some(progress("r-1"))
        );
        // Asked by an earlier attempt's pod (kept, and relayed again).
        let earlier = SignedRunProgress::sign(
            RunProgress {
                pod: "s-run-1".into(),
                pod_uid: "uid-1".into(),
                ..progress("r-1")
            },
            &tenant,
        );
        assert_eq!(attested_progress(&report(Some(earlier)), &key), None);
        // A completion relaying a progress asked before the run ended (which would show a head
        // short of its end); the one asked after the end is believed.
        let mut completed = report(Some(genuine.clone()));
        completed.outcome = ReportedOutcome::Completed;
        assert_eq!(attested_progress(&completed, &key), None);
        completed.progress = Some(SignedRunProgress::sign(
            RunProgress {
                ended: true,
                ..progress("r-1")
            },
            &tenant,
        ));
        assert!(attested_progress(&completed, &key).is_some());
        // None relayed; another tenant's signature; another run's (same tenant); figures
        // edited after signing (a head that hides the run's last entries, fewer tokens).
        let mut edited = genuine.clone();
        edited.progress.head = Some("00".repeat(32));
        let mut fewer = genuine.clone();
        fewer.progress.tokens = 1;
        for signed in [
            None,
            Some(SignedRunProgress::sign(
                progress("r-1"),
                &KeyPair::generate().expect("key"),
            )),
            Some(SignedRunProgress::sign(progress("r-2"), &tenant)),
            Some(edited),
            Some(fewer),
        ] {
            assert_eq!(
                attested_progress(&report(signed.clone()), &key),
                None,
                "{signed:?}"
            );
        }
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
