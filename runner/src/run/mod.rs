//! The run loop: a Session's bundle becomes a governed, recorded, resumable run — context
//! compiled under budget, model turns, every effect through the Tool Gateway, a critic verdict
//! and a checkpoint after every step — and the replay that re-executes a recorded run under the
//! same or a candidate Policy/ContextPack.

pub mod aliases;
pub mod bundle;
mod calls;
pub mod checkpoint;
pub mod critic;
pub mod engine;
pub mod execution;
pub mod gate;
pub mod offer;
pub mod pod;
pub mod policy_change;
pub mod reexecute;
pub mod replay;
pub mod routing_effect;
mod service_tail;
pub mod state;
pub mod validate;

use contextos_crds::session::SessionSpec;
use serde_json::Value;

use self::bundle::RunBundle;
use crate::{
    consent::SubjectHandle,
    keys::KeyPair,
    run_context::{
        AgentIdentity, OverrideError, RunContext, SignedRunContext, UserDelegation, effective_limits,
    },
};

pub use engine::{Harness, Progress, RunError, RunOutcome, RunReport};

/// How long a RunContext stays valid beyond the run's wall-time budget: room for a resumed
/// attempt after a crash. A run paused for approval gets a fresh context when it resumes.
const CONTEXT_GRACE_MS: i64 = 5 * 60 * 1000;

/// Issues the RunContext of a new run of `bundle`'s Session: the effective budget and safety
/// mode (the Session may only tighten the Agent's), the delegating user, the agent's identity,
/// the pinned digests, the bundle's content digest, the tools it may call and — in a cluster —
/// the runner pod it is issued to, signed with `key`.
pub fn issue_run_context(
    bundle: &RunBundle,
    run_id: &str,
    trace_id: &str,
    pod: Option<&str>,
    key: &KeyPair,
    now_ms: i64,
) -> Result<SignedRunContext, OverrideError> {
    let context = run_context(bundle, run_id, trace_id, pod, now_ms)?;
    Ok(SignedRunContext::sign(context, key))
}

/// The run id of Session `name` whose uid is `uid`, as the operator names its run: stable
/// across attempts, another for a Session made again under the same name. The gateway finds a
/// runner pod's run from its controlling Session by it.
pub fn session_run_id(name: &str, uid: &str) -> String {
    let short: String = uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    format!("{name}-{short}")
}

/// [`issue_run_context`] for runner pod `pod` of the Session whose uid is `session_uid` (what the
/// operator issues): the gateway serves it only to a pod that very Session controls.
pub fn issue_runner_context(
    bundle: &RunBundle,
    run_id: &str,
    trace_id: &str,
    pod: &str,
    session_uid: &str,
    key: &KeyPair,
    now_ms: i64,
) -> Result<SignedRunContext, OverrideError> {
    let mut context = run_context(bundle, run_id, trace_id, Some(pod), now_ms)?;
    context.session_uid = Some(session_uid.to_owned());
    Ok(SignedRunContext::sign(context, key))
}

fn run_context(
    bundle: &RunBundle,
    run_id: &str,
    trace_id: &str,
    pod: Option<&str>,
    now_ms: i64,
) -> Result<RunContext, OverrideError> {
    let agent = &bundle.agent_spec;
    let (budget, safety_mode) = effective_limits(
        &agent.budget,
        agent.safety_mode,
        bundle.session_spec.overrides.as_ref(),
    )?;
    // Checked when the harness is built (RunError::BadSubject); admission checks it in a cluster.
    let subject = bundle
        .session_spec
        .subject
        .as_deref()
        .and_then(|s| SubjectHandle::new(s).ok());
    let expires_at_ms = now_ms + i64::from(budget.max_wall_seconds) * 1000 + CONTEXT_GRACE_MS;
    let context = RunContext {
        run_id: run_id.to_owned(),
        trace_id: trace_id.to_owned(),
        session_id: bundle.session.clone(),
        tenant_id: bundle.tenant.clone(),
        user: user_of(&bundle.session_spec),
        agent: AgentIdentity::new(&bundle.tenant, &bundle.agent),
        safety_mode,
        budget,
        pinned: bundle.pinned(),
        allowed_tools: agent.tools.iter().map(|t| t.name.clone()).collect(),
        issued_at_ms: now_ms,
        expires_at_ms,
        pod: pod.map(str::to_owned),
        session_uid: None,
        bundle_digest: Some(bundle.content_digest().to_hex()),
        subject,
        // Decided here, once, by this process's sampler when it exports traces: the run's every
        // process follows it. An issuer that exports nothing leaves it to each process's own.
        trace_sampled: crate::telemetry::configured()
            .then(|| crate::telemetry::trace_id_of(trace_id).map(crate::telemetry::session_sampled))
            .flatten(),
    };
    Ok(context)
}

/// A recorded RunContext re-signed for a new attempt (after a crash or an approval): same run,
/// trace, limits and pins; a fresh validity window.
pub fn reissue_run_context(recorded: &RunContext, key: &KeyPair, now_ms: i64) -> SignedRunContext {
    let mut context = recorded.clone();
    let window = recorded.expires_at_ms - recorded.issued_at_ms;
    context.issued_at_ms = now_ms;
    context.expires_at_ms = now_ms + window.max(CONTEXT_GRACE_MS);
    SignedRunContext::sign(context, key)
}

fn user_of(session: &SessionSpec) -> Option<UserDelegation> {
    session.user.as_ref().map(|u| UserDelegation {
        subject: u.subject.clone(),
        groups: u.groups.clone(),
        scopes: u.scopes.clone(),
    })
}

/// The request the model is given: the Session's prompt, and its structured input if any.
pub fn request_text(session: &SessionSpec) -> String {
    match &session.input.data {
        Some(data) if !data.is_null() => format!(
            "{}\n\nInput data (JSON): {}",
            session.input.prompt.trim_end(),
            String::from_utf8_lossy(&crate::records::canonical::to_canonical_bytes(data))
        ),
        _ => session.input.prompt.clone(),
    }
}

/// The Session input as policy conditions read it (`run.input`).
pub fn input_value(session: &SessionSpec) -> Value {
    serde_json::json!({
        "prompt": session.input.prompt,
        "data": session.input.data.clone().unwrap_or(Value::Null),
    })
}
