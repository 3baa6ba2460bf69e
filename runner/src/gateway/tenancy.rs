//! What the gateway service reads from the cluster on a caller's behalf, always inside the
//! caller's own namespace (the tenant it was verified to be): the Secrets a run's tools and
//! model reference, read when the run's gateway is built (never handed to the runner), the
//! Session's approvals, which admission checked when a human wrote them, and which controller
//! owns a calling pod (a replay Job's pods read records, nothing else does) — and, of the
//! caller's Namespace itself, its bound on what it keeps in the record store.

use crate::gateway::fair::away;
pub use crate::gateway::session_watch::SessionState;
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use contextos_crds::{
    Session, SpendQuota,
    session::{Approval, Resolution},
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::{Api, Client, Resource};

/// The label a Secret carries when its owner lets Agents use it: an Agent may name any Secret of
/// its namespace, and the gateway sends what it names to the tool or model endpoint the Agent
/// chooses — so only Secrets meant for that are ever read.
pub const AGENT_SECRET_LABEL: &str = "contextos.dev/agent-secret";

/// Whether a Secret may be used by Agents: labelled for it, and not a service-account token.
pub fn usable_by_agents(secret: &Secret) -> Result<(), String> {
    if secret.type_.as_deref() == Some("kubernetes.io/service-account-token") {
        return Err("service-account tokens are never handed to tools or models".into());
    }
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(AGENT_SECRET_LABEL))
        .is_some_and(|v| v == "true");
    if labelled {
        Ok(())
    } else {
        Err(format!(
            "not labelled {AGENT_SECRET_LABEL}=true; label it if Agents may send it to their tools and models"
        ))
    }
}

/// Why a tenant's object could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The API server could not be asked (worth retrying).
    #[error("{0}")]
    Unavailable(String),
    /// The object exists but may not be used this way (retrying changes nothing).
    #[error("{0}")]
    Refused(String),
}

/// The object controlling a pod (its controller owner reference), and the pod's own uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodController {
    /// The owner's `apiVersion` (`group/version`, or `version` for the core group).
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// The owner's uid (a replay Job's verdict names it: one made again under the name is
    /// another Job). The test double gives `uid-<name>`.
    pub owner_uid: String,
    /// The uid of the pod read (to tell it from another pod since created under its name).
    /// Always given by the API server; the test double gives one only if told (`None`: any).
    pub pod_uid: Option<String>,
    /// The pod's `contextos.dev/role` label (`replay` on a replay Job's pods, which only the
    /// job controller may make such: admission policy contextos-replay-pods).
    pub role: Option<String>,
}

impl PodController {
    /// Whether this is the pod `pod_uid` (where the uid is known), controlled by `kind` `name`
    /// of API group `group` — the group too: an owner reference may name any `apiVersion`, and
    /// a `Session` of another group is not ContextOS's.
    pub fn is(&self, group: &str, kind: &str, name: &str, pod_uid: &str) -> bool {
        let owner_group = self.api_version.rsplit_once('/').map_or("", |(group, _)| group);
        owner_group == group
            && self.kind == kind
            && self.name == name
            && self.pod_uid.as_deref().is_none_or(|uid| uid == pod_uid)
    }
}

/// Reads a tenant's Secrets, pod owners and Session decisions.
pub trait TenantView: Send + Sync {
    /// The value of `key` in Secret `name` of `namespace`; `None` if the Secret or key is absent.
    fn secret(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>, TenantError>> + Send;

    /// The controller of pod `pod` of `namespace`, if the pod exists and has one.
    fn pod_controller(
        &self,
        namespace: &str,
        pod: &str,
    ) -> impl Future<Output = Result<Option<PodController>, String>> + Send;

    /// What humans decided in Session `session`'s spec (nothing when the Session is gone).
    fn decisions(
        &self,
        namespace: &str,
        session: &str,
    ) -> impl Future<Output = Result<SessionDecisions, String>> + Send;

    /// Whether Session `session` is there, and whether it says cancel.
    fn session_state(
        &self,
        namespace: &str,
        session: &str,
    ) -> impl Future<Output = Result<SessionState, String>> + Send;

    /// The SpendQuotas of `namespace` (none where the kind is not installed).
    fn spend_quotas(&self, namespace: &str) -> impl Future<Output = Result<Vec<SpendQuota>, String>> + Send;

    /// Writes what the gateway measured of a quota into its status (the gateway's fields only).
    fn report_quota(
        &self,
        namespace: &str,
        quota: &str,
        report: QuotaReport,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// The namespace's own bound on what it keeps in the record store, as its annotation
    /// `contextos.dev/max-store-bytes` says it (unread), if it has one.
    fn store_bound(&self, namespace: &str) -> impl Future<Output = Result<Option<String>, String>> + Send;
}

/// What the gateway writes into a SpendQuota: usage against its limits, and the thresholds
/// crossed since the last report (each an Event).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuotaReport {
    pub usage: Vec<contextos_crds::spend_quota::LimitUsage>,
    pub summary: QuotaSummary,
    /// RFC 3339.
    pub measured_at: String,
    /// (reason, message) of each Event due.
    pub events: Vec<(String, String)>,
}

/// The gateway's columns of `kubectl get spendquota`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuotaSummary {
    pub spend: Option<String>,
    pub tokens: Option<String>,
    pub tool_calls: Option<String>,
}

/// The human decisions of one Session: approvals of calls, and findings on calls whose
/// outcome was unknown. Admission checked who wrote each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SessionDecisions {
    pub approvals: Vec<Approval>,
    pub resolutions: Vec<Resolution>,
    /// The uid of the Session they were read from (the test double gives none).
    pub session_uid: Option<String>,
}

/// The API server, with the gateway's own service account (`get` on Secrets and Sessions).
#[derive(Clone)]
pub struct KubeTenants {
    client: Client,
}

impl std::fmt::Debug for KubeTenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTenants").finish_non_exhaustive()
    }
}

impl KubeTenants {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl TenantView for KubeTenants {
    async fn store_bound(&self, namespace: &str) -> Result<Option<String>, String> {
        let found = away(Api::<Namespace>::all(self.client.clone()).get_opt(namespace))
            .await
            .map_err(|e| format!("reading Namespace {namespace}: {e}"))?;
        Ok(found.and_then(|mut n| {
            n.metadata
                .annotations
                .as_mut()
                .and_then(|a| a.remove(crate::gateway::service::tenant_bytes::STORE_BOUND_ANNOTATION))
        }))
    }

    async fn secret(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, TenantError> {
        // Every read of the API server here is waited for out of the request's turn at a
        // gateway replica (the API server queues a tenant's reads per namespace).
        let secret = away(Api::<Secret>::namespaced(self.client.clone(), namespace).get_opt(name))
            .await
            .map_err(|e| TenantError::Unavailable(format!("reading Secret {namespace}/{name}: {e}")))?;
        let Some(secret) = secret else {
            return Ok(None);
        };
        usable_by_agents(&secret)
            .map_err(|why| TenantError::Refused(format!("Secret {namespace}/{name}: {why}")))?;
        Ok(secret
            .data
            .and_then(|mut d| d.remove(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned()))
    }

    async fn pod_controller(&self, namespace: &str, pod: &str) -> Result<Option<PodController>, String> {
        let found = away(Api::<Pod>::namespaced(self.client.clone(), namespace).get_opt(pod))
            .await
            .map_err(|e| format!("reading Pod {namespace}/{pod}: {e}"))?;
        Ok(found.and_then(|mut p| {
            // The API server gives every pod a uid; one without would match no caller.
            let pod_uid = Some(p.metadata.uid.unwrap_or_default());
            let role = p
                .metadata
                .labels
                .as_mut()
                .and_then(|l| l.remove(contextos_crds::labels::ROLE));
            p.metadata
                .owner_references?
                .into_iter()
                .find(|o| o.controller == Some(true))
                .map(|o| PodController {
                    api_version: o.api_version,
                    kind: o.kind,
                    name: o.name,
                    owner_uid: o.uid,
                    pod_uid,
                    role,
                })
        }))
    }

    async fn decisions(&self, namespace: &str, session: &str) -> Result<SessionDecisions, String> {
        let found = away(Api::<Session>::namespaced(self.client.clone(), namespace).get_opt(session))
            .await
            .map_err(|e| format!("reading Session {namespace}/{session}: {e}"))?;
        Ok(found
            .map(|s| SessionDecisions {
                approvals: s.spec.approvals,
                resolutions: s.spec.resolutions,
                session_uid: s.metadata.uid,
            })
            .unwrap_or_default())
    }

    async fn session_state(&self, namespace: &str, session: &str) -> Result<SessionState, String> {
        let found = away(Api::<Session>::namespaced(self.client.clone(), namespace).get_opt(session))
            .await
            .map_err(|e| format!("reading Session {namespace}/{session}: {e}"))?;
        Ok(found.map_or(SessionState::Absent, |s| SessionState::Present {
            uid: s.metadata.uid,
            cancel: s.spec.cancel,
            finished: s
                .status
                .and_then(|status| status.phase)
                .filter(|p| p.is_terminal()),
        }))
    }

    async fn spend_quotas(&self, namespace: &str) -> Result<Vec<SpendQuota>, String> {
        let api = Api::<SpendQuota>::namespaced(self.client.clone(), namespace);
        match away(api.list(&kube::api::ListParams::default())).await {
            Ok(list) => Ok(list.items),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
            Err(e) => Err(format!("listing the SpendQuotas of {namespace}: {e}")),
        }
    }

    async fn report_quota(&self, namespace: &str, quota: &str, report: QuotaReport) -> Result<(), String> {
        let api = Api::<SpendQuota>::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "SpendQuota",
            "status": {
                "usage": report.usage,
                "measuredAt": report.measured_at,
                "summary": {
                    "spend": report.summary.spend,
                    "tokens": report.summary.tokens,
                    "toolCalls": report.summary.tool_calls,
                },
            },
        });
        // Its own field manager: the operator owns the status's Session fields and conditions.
        let written = away(api.patch_status(
            quota,
            &kube::api::PatchParams::apply("contextos.dev/gateway").force(),
            &kube::api::Patch::Apply(&patch),
        ))
        .await
        .map_err(|e| format!("writing the status of SpendQuota {namespace}/{quota}: {e}"))?;
        away(self.publish_quota_events(&written, &report.events)).await;
        Ok(())
    }
}

impl KubeTenants {
    async fn publish_quota_events(&self, quota: &SpendQuota, events: &[(String, String)]) {
        let reporter = kube::runtime::events::Reporter {
            controller: "contextos-gateway".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = kube::runtime::events::Recorder::new(self.client.clone(), reporter);
        for (reason, message) in events {
            let event = kube::runtime::events::Event {
                type_: if reason == QUOTA_REACHED {
                    kube::runtime::events::EventType::Warning
                } else {
                    kube::runtime::events::EventType::Normal
                },
                reason: reason.clone(),
                note: Some(message.chars().take(1024).collect()),
                action: "Measure".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &quota.object_ref(&())).await {
                tracing::debug!(%error, "cannot publish a SpendQuota Event");
            }
        }
    }
}

/// The Event reason of a limit fully used.
pub const QUOTA_REACHED: &str = "QuotaReached";
/// The Event reason of a limit nearly used (80 %).
pub const QUOTA_NEARLY_REACHED: &str = "QuotaNearlyReached";

/// Fixed Secrets and approvals per namespace: a test double of the API server (the real one is
/// exercised by the cluster tests), also what `contextos gateway --secret` serves locally.
#[derive(Clone, Debug, Default)]
pub struct StaticTenants {
    /// `<namespace>/<secret>/<key>` → value.
    pub secrets: HashMap<String, String>,
    /// `<namespace>/<pod>` → its controller.
    pub controllers: HashMap<String, PodController>,
    /// `<namespace>/<session>` → decisions (shared by clones, so a test can decide later).
    decisions: Arc<Mutex<HashMap<String, SessionDecisions>>>,
    /// `<namespace>` → its SpendQuotas (shared by clones, so a test can change them later).
    quotas: Arc<Mutex<HashMap<String, Vec<SpendQuota>>>>,
    /// Every report written, `(namespace, quota, report)`, in order.
    reports: Arc<Mutex<Vec<(String, String, QuotaReport)>>>,
    /// `<namespace>` → its store bound annotation (shared by clones, so a test can set it later).
    store_bounds: Arc<Mutex<HashMap<String, String>>>,
    /// `<namespace>/<session>` → what the API server would say of it (shared by clones); a
    /// Session not set is there, without a uid, and not cancelled.
    sessions: Arc<Mutex<HashMap<String, SessionState>>>,
}

impl StaticTenants {
    /// Adds a Secret value.
    pub fn with_secret(mut self, namespace: &str, name: &str, key: &str, value: &str) -> Self {
        self.secrets
            .insert(format!("{namespace}/{name}/{key}"), value.to_owned());
        self
    }

    /// Records that `pod` of `namespace` is controlled by `kind`/`name` (whatever its uid) —
    /// a Session of contextos.dev, a Job of batch (a replay pod, labelled so), anything else of
    /// a group of its own.
    pub fn with_controller(self, namespace: &str, pod: &str, kind: &str, name: &str) -> Self {
        let api_version = match kind {
            "Session" => "contextos.dev/v1alpha1",
            "Job" => "batch/v1",
            _ => "example.com/v1",
        };
        let role = (kind == "Job").then_some("replay");
        self.with_owner(namespace, pod, api_version, kind, name)
            .with_role(namespace, pod, role)
    }

    /// Records the `contextos.dev/role` label of `pod` (`None`: it has none).
    pub fn with_role(mut self, namespace: &str, pod: &str, role: Option<&str>) -> Self {
        if let Some(controller) = self.controllers.get_mut(&format!("{namespace}/{pod}")) {
            controller.role = role.map(str::to_owned);
        }
        self
    }

    /// Records that `pod` of `namespace` is controlled by `kind`/`name` of `api_version`.
    pub fn with_owner(
        mut self,
        namespace: &str,
        pod: &str,
        api_version: &str,
        kind: &str,
        name: &str,
    ) -> Self {
        let controller = PodController {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            owner_uid: format!("uid-{name}"),
            pod_uid: None,
            role: None,
        };
        self.controllers.insert(format!("{namespace}/{pod}"), controller);
        self
    }

    /// Records that the pod now under the name `pod` of `namespace` has uid `uid` (another pod
    /// created under a name a runner pod had).
    pub fn with_pod_uid(mut self, namespace: &str, pod: &str, uid: &str) -> Self {
        if let Some(controller) = self.controllers.get_mut(&format!("{namespace}/{pod}")) {
            controller.pod_uid = Some(uid.to_owned());
        }
        self
    }

    /// Appends an approval to a Session's spec.
    pub fn approve(&self, namespace: &str, session: &str, approval: Approval) {
        if let Ok(mut decisions) = self.decisions.lock() {
            decisions
                .entry(format!("{namespace}/{session}"))
                .or_default()
                .approvals
                .push(approval);
        }
    }

    /// Sets the SpendQuotas of `namespace`.
    pub fn set_quotas(&self, namespace: &str, quotas: Vec<SpendQuota>) {
        if let Ok(mut all) = self.quotas.lock() {
            all.insert(namespace.to_owned(), quotas);
        }
    }

    /// Sets (or, with `None`, removes) the store bound annotation of `namespace`.
    pub fn set_store_bound(&self, namespace: &str, bound: Option<&str>) {
        if let Ok(mut all) = self.store_bounds.lock() {
            match bound {
                Some(bound) => all.insert(namespace.to_owned(), bound.to_owned()),
                None => all.remove(namespace),
            };
        }
    }

    /// The reports written so far.
    pub fn quota_reports(&self) -> Vec<(String, String, QuotaReport)> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Says what the API server would answer for Session `session` of `namespace`.
    pub fn set_session(&self, namespace: &str, session: &str, state: SessionState) {
        if let Ok(mut all) = self.sessions.lock() {
            all.insert(format!("{namespace}/{session}"), state);
        }
    }

    /// Appends a resolution to a Session's spec.
    pub fn resolve(&self, namespace: &str, session: &str, resolution: Resolution) {
        if let Ok(mut decisions) = self.decisions.lock() {
            decisions
                .entry(format!("{namespace}/{session}"))
                .or_default()
                .resolutions
                .push(resolution);
        }
    }
}

impl TenantView for StaticTenants {
    async fn store_bound(&self, namespace: &str) -> Result<Option<String>, String> {
        Ok(self
            .store_bounds
            .lock()
            .map_err(|_| "poisoned".to_owned())?
            .get(namespace)
            .cloned())
    }

    async fn secret(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, TenantError> {
        Ok(self.secrets.get(&format!("{namespace}/{name}/{key}")).cloned())
    }

    async fn pod_controller(&self, namespace: &str, pod: &str) -> Result<Option<PodController>, String> {
        Ok(self.controllers.get(&format!("{namespace}/{pod}")).cloned())
    }

    async fn decisions(&self, namespace: &str, session: &str) -> Result<SessionDecisions, String> {
        Ok(self
            .decisions
            .lock()
            .map_err(|_| "the decisions lock is poisoned".to_owned())?
            .get(&format!("{namespace}/{session}"))
            .cloned()
            .unwrap_or_default())
    }

    async fn session_state(&self, namespace: &str, session: &str) -> Result<SessionState, String> {
        Ok(self
            .sessions
            .lock()
            .map_err(|_| "the sessions lock is poisoned".to_owned())?
            .get(&format!("{namespace}/{session}"))
            .cloned()
            .unwrap_or(SessionState::Present {
                uid: None,
                cancel: false,
                finished: None,
            }))
    }

    async fn spend_quotas(&self, namespace: &str) -> Result<Vec<SpendQuota>, String> {
        Ok(self
            .quotas
            .lock()
            .map_err(|_| "the quotas lock is poisoned".to_owned())?
            .get(namespace)
            .cloned()
            .unwrap_or_default())
    }

    async fn report_quota(&self, namespace: &str, quota: &str, report: QuotaReport) -> Result<(), String> {
        self.reports
            .lock()
            .map_err(|_| "the reports lock is poisoned".to_owned())?
            .push((namespace.to_owned(), quota.to_owned(), report));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(labels: &[(&str, &str)], type_: Option<&str>) -> Secret {
        Secret {
            type_: type_.map(str::to_owned),
            metadata: kube::api::ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_secrets_labelled_for_agents_and_no_service_account_tokens_are_used() {
        assert!(usable_by_agents(&secret(&[(AGENT_SECRET_LABEL, "true")], None)).is_ok());
        assert!(usable_by_agents(&secret(&[], None)).is_err());
        assert!(usable_by_agents(&secret(&[(AGENT_SECRET_LABEL, "yes")], None)).is_err());
        let token = secret(
            &[(AGENT_SECRET_LABEL, "true")],
            Some("kubernetes.io/service-account-token"),
        );
        assert!(usable_by_agents(&token).is_err());
    }
}
