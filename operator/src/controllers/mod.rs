//! The controllers: one per kind, sharing one [`Context`]. Each reconcile follows the same
//! steps — fetch (IO), validate and build (pure), apply with server-side apply (IO), write
//! status — and an invalid object gets `Ready=False` with the field and the fix, and waits for
//! a change instead of being retried in a loop.

pub mod agent;
pub mod ontology;
pub mod proposal;
pub mod retries;
pub mod revisions;
pub mod session;
pub mod skill;
pub mod spend_quota;

use std::{sync::Arc, time::Duration};

use contextos_crds::{FIELD_MANAGER, conditions};
use contextos_runner::keys::KeyPair;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{metrics::Metrics, session_children::RunnerSettings};

/// What every reconcile gets.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    /// Signs RunContexts; runner pods trust only its public key.
    pub key: KeyPair,
    pub runner: RunnerSettings,
    /// Runner attempts a Session may make after crashes (approvals start new attempts too, and
    /// do not count against this).
    pub max_crash_attempts: u32,
    pub metrics: Arc<Metrics>,
    /// Publishes Events (`kubectl describe`, `kubectl events`).
    pub recorder: kube::runtime::events::Recorder,
    /// Image of replay Jobs (the runner image: its entrypoint is `contextos`).
    pub replay_image: String,
    /// The operator's own namespace (its RunContext-signing key, its Lease).
    pub namespace: String,
    /// Tenants' public record keys, fetched from the gateway service.
    pub tenant_keys: Arc<crate::tenant_keys::TenantKeys>,
    /// One lock per namespace, held while a Session's start is decided and made (see
    /// [`spend_quota`]).
    pub start_locks: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The runner NetworkPolicies this process applied (see [`RunnerPolicies`]).
    pub runner_policies: Arc<RunnerPolicies>,
    /// Consecutive failures of each object, which space its retries out.
    pub retries: Arc<retries::Retries>,
}

impl Context {
    /// ContextOS's own namespaces: the operator's and the gateway's.
    pub fn own_namespaces(&self) -> [&str; 2] {
        [self.namespace.as_str(), self.runner.gateway_namespace.as_str()]
    }
}

/// What this process last applied as each namespace's runner NetworkPolicy, as a hash of the
/// policy. A Session's pass applies the policy only when it is not recorded here (after a
/// restart, or an upgrade that changed it), and every runner pod is preceded by an apply
/// whatever this says. (Not watched: a watch that brought the namespace's live Sessions back at
/// each change of the policy also heard the operator's own applies, one before every pod, and
/// brought every live Session back for each — 127 API requests per Session instead of 48 while
/// 200 started.)
#[derive(Debug, Default)]
pub struct RunnerPolicies(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl RunnerPolicies {
    /// Whether `policy` is what this process last applied in `namespace`.
    pub fn applied(&self, namespace: &str, policy: u64) -> bool {
        self.0
            .lock()
            .map(|applied| applied.get(namespace) == Some(&policy))
            .unwrap_or(false)
    }

    pub fn record(&self, namespace: &str, policy: u64) {
        if let Ok(mut applied) = self.0.lock() {
            applied.insert(namespace.to_owned(), policy);
        }
    }
}

impl Context {
    /// The lock Session starts in `namespace` are decided under.
    pub fn start_lock(&self, namespace: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.start_locks.lock() {
            Ok(mut locks) => locks.entry(namespace.to_owned()).or_default().clone(),
            // Poisoned only by a panic elsewhere: a fresh lock is no worse than none.
            Err(_) => Arc::default(),
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("runner", &self.runner)
            .field("max_crash_attempts", &self.max_crash_attempts)
            .finish_non_exhaustive()
    }
}

/// Why a reconcile failed (transient: retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot build {what}: {source}")]
    Build {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Run(String),
}

impl Error {
    /// The object was deleted while it was being reconciled.
    pub fn gone(&self) -> bool {
        matches!(self, Self::Kube(kube::Error::Api(e)) if e.code == 404)
    }

    /// The API server refused because the object's namespace is being deleted.
    pub fn namespace_terminating(&self) -> bool {
        matches!(self, Self::Kube(kube::Error::Api(e)) if e.code == 403 && e.message.contains("being terminated"))
    }

    /// A write conditioned on the object's resourceVersion found a newer object: what this pass
    /// decided from is out of date, and the next pass (on the newer object) decides again.
    pub fn stale(&self) -> bool {
        matches!(self, Self::Kube(kube::Error::Api(e)) if e.code == 409)
    }

    /// A low-cardinality label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Build { .. } => "build",
            Self::Run(_) => "run",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Transient failures are retried, each object's consecutive failures further apart (see
/// [`retries`]); each is counted. A namespace being deleted refuses new objects for good: its
/// objects are going away, so nothing is retried.
pub fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let name = object.meta().name.clone().unwrap_or_default();
    if error.namespace_terminating() || error.gone() {
        tracing::debug!(%kind, %namespace, %name, %error, "the object or its namespace is being deleted; not retrying");
        return Action::await_change();
    }
    if error.stale() {
        tracing::debug!(%kind, %namespace, %name, %error, "decided from an out-of-date object; deciding again");
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.failure(error.metric_label());
    let wait = ctx.retries.failed(retries::key(object.as_ref()));
    tracing::warn!(%kind, %namespace, %name, %error, retry_in_s = wait.as_secs(), "reconcile failed");
    Action::requeue(wait)
}

/// A problem with an object that only a change to it (or what it references) can fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Writes `status` of the object `observed` with server-side apply (one field manager, forced),
/// only if the object is still the one observed: its resourceVersion is the apply's
/// precondition (409 Conflict otherwise, see [`Error::stale`]).
///
/// Every status this operator writes is decided from an observed object, and a status applied
/// by name alone lands on whatever object holds that name when the write arrives:
/// - a pass working from a cached copy that has not yet seen this operator's previous write
///   would drop what that write added (the apply names every field this manager owns);
/// - an object deleted and re-created under the same name while a pass for the old one was in
///   flight would receive the old one's status: its promoted revisions, its gate verdicts. (The
///   API server ignores a uid in a status apply, so only the resourceVersion tells them apart.)
///
/// A refused write is decided again from the newer object by the next pass.
pub async fn apply_status<K>(api: &Api<K>, observed: &K, status: impl Serialize) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let meta = observed.meta();
    let (Some(name), Some(version)) = (meta.name.as_deref(), meta.resource_version.as_deref()) else {
        // Only an object read from the API server can be the basis of a status.
        return Err(Error::Run(format!(
            "cannot write the status of a {} that was not read from the API server (it has no name or resourceVersion)",
            K::kind(&())
        )));
    };
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        // Server-side apply takes a resourceVersion in the applied object as a precondition.
        "metadata": {"resourceVersion": version},
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Applies a child object with server-side apply.
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Whether an object's `Ready` condition is True.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == conditions::READY && c.status == conditions::status::TRUE)
}

/// The Ready condition's message, for "not ready" explanations.
pub fn ready_message(conditions: &[Condition]) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map_or_else(|| "it has not been reconciled yet".into(), |c| c.message.clone())
}

/// The message of condition `type_`, for explanations.
pub fn condition_message(conditions: &[Condition], type_: &str) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map_or_else(|| "it has not been reconciled yet".into(), |c| c.message.clone())
}

/// Publishes an Event on `object` when one of its conditions changes: Normal when it becomes
/// True, Warning (with the reason and the message naming the fix) when it becomes False.
/// Events are best effort (the namespace may be going away); the status says it all.
pub async fn announce<K>(ctx: &Context, object: &K, before: &[Condition], wanted: &crate::conditions::Wanted)
where
    K: Resource<DynamicType = ()>,
{
    let status = if wanted.status {
        conditions::status::TRUE
    } else {
        conditions::status::FALSE
    };
    if before
        .iter()
        .any(|c| c.type_ == wanted.type_ && c.status == status && c.reason == wanted.reason)
    {
        return;
    }
    let note = if wanted.type_ == conditions::READY {
        wanted.message.clone()
    } else {
        format!("{}: {}", wanted.type_, wanted.message)
    };
    // A Warning is for what someone should look at; progress (a runner started, an approval
    // awaited, a replay pending) is Normal.
    let warning = !wanted.status
        && (conditions::is_stalled(wanted.reason)
            || [
                conditions::reason::REFERENCE_NOT_FOUND,
                conditions::reason::REFERENCE_NOT_READY,
                conditions::reason::REPLAY_FAILED,
            ]
            .contains(&wanted.reason));
    let event = kube::runtime::events::Event {
        type_: if warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        },
        reason: wanted.reason.to_owned(),
        note: Some(note.chars().take(1024).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::debug!(%error, "cannot publish an Event");
    }
}

/// The time now, as status conditions record it.
pub fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
