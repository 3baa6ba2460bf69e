//! Where A2A tasks live: Sessions in the Agent's namespace, read and written through the API
//! server with the gateway's own service account (`get` on agents; `create`, `get`, `list`,
//! `watch`, `patch` and `delegate` on sessions — see manifests/gateway/rbac.yaml). Creating
//! them goes through admission like any Session: the CRD's schema, Pod Security of what they
//! run, the Session identity policy (the gateway may delegate: the caller becomes the user).

use std::pin::Pin;

use contextos_crds::{Agent, Session};
use futures::{Stream, StreamExt as _};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};

/// What went wrong asking the API server.
#[derive(Debug, thiserror::Error)]
pub enum DeskError {
    /// A Session of that name exists.
    #[error("a Session of that name exists")]
    Exists,
    /// The API server refused it (admission, schema): its words, for the caller.
    #[error("{0}")]
    Refused(String),
    /// The API server could not be asked.
    #[error("the API server is unavailable: {0}")]
    Unavailable(String),
}

pub type DeskFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = Result<T, DeskError>> + Send + 'a>>;
/// A Session as it changes: `None` once it is deleted.
pub type Changes = Pin<Box<dyn Stream<Item = Result<Option<Session>, DeskError>> + Send>>;

/// The Agents and Sessions of tenants, as the A2A endpoint needs them.
pub trait AgentSessions: Send + Sync {
    /// The Agent `name` in `namespace`, if it exists.
    fn agent<'a>(&'a self, namespace: &'a str, name: &'a str) -> DeskFuture<'a, Option<Agent>>;
    /// Creates `session` (its namespace is set).
    fn create<'a>(&'a self, session: &'a Session) -> DeskFuture<'a, Session>;
    /// The Session `name` in `namespace`, if it exists.
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> DeskFuture<'a, Option<Session>>;
    /// Sets `spec.cancel` on the Session `name` — only if it is still the one with `uid` (not
    /// another Session of that name created since).
    fn cancel<'a>(&'a self, namespace: &'a str, name: &'a str, uid: &'a str) -> DeskFuture<'a, Session>;
    /// The Session as it changes, from now on (its current state first).
    fn changes(&self, namespace: &str, name: &str) -> Changes;
    /// The Sessions in `namespace` carrying `label` (`key=value`) that have not ended.
    fn open<'a>(&'a self, namespace: &'a str, label: &'a str) -> DeskFuture<'a, usize>;
}

/// The field selector of Sessions that have not ended (`status.phase` is a selectable field of
/// the Session CRD).
const OPEN_PHASES: &str = "status.phase!=Succeeded,status.phase!=Failed,status.phase!=Cancelled";
/// Open tasks counted at most: past the limit a caller may have, the exact count does not
/// matter.
const OPEN_COUNTED_AT_MOST: u32 = 64;

/// Field manager of what the gateway writes to Sessions.
const MANAGER: &str = "contextos-gateway";

/// The API server, with the gateway's own service account.
#[derive(Clone)]
pub struct KubeSessions {
    client: Client,
}

impl std::fmt::Debug for KubeSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSessions").finish_non_exhaustive()
    }
}

impl KubeSessions {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

fn desk_error(e: kube::Error) -> DeskError {
    match e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => DeskError::Exists,
        kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429 => DeskError::Refused(s.message),
        other => DeskError::Unavailable(other.to_string()),
    }
}

impl AgentSessions for KubeSessions {
    fn agent<'a>(&'a self, namespace: &'a str, name: &'a str) -> DeskFuture<'a, Option<Agent>> {
        Box::pin(async move {
            Api::<Agent>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(desk_error)
        })
    }

    fn create<'a>(&'a self, session: &'a Session) -> DeskFuture<'a, Session> {
        Box::pin(async move {
            let namespace = session.metadata.namespace.as_deref().unwrap_or_default();
            Api::<Session>::namespaced(self.client.clone(), namespace)
                .create(
                    &PostParams {
                        field_manager: Some(MANAGER.into()),
                        ..Default::default()
                    },
                    session,
                )
                .await
                .map_err(desk_error)
        })
    }

    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> DeskFuture<'a, Option<Session>> {
        Box::pin(async move {
            Api::<Session>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(desk_error)
        })
    }

    fn cancel<'a>(&'a self, namespace: &'a str, name: &'a str, uid: &'a str) -> DeskFuture<'a, Session> {
        Box::pin(async move {
            // The uid in the patch is a precondition: the API server refuses it for another
            // Session of the same name.
            let patch = serde_json::json!({"metadata": {"uid": uid}, "spec": {"cancel": true}});
            Api::<Session>::namespaced(self.client.clone(), namespace)
                .patch(
                    name,
                    &PatchParams {
                        field_manager: Some(MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(patch),
                )
                .await
                .map_err(desk_error)
        })
    }

    fn open<'a>(&'a self, namespace: &'a str, label: &'a str) -> DeskFuture<'a, usize> {
        Box::pin(async move {
            // Only the Sessions that have not ended, selected by the API server (a caller who
            // started and cancelled thousands of tasks is not read back in full each time), and
            // no more than the count needs.
            let open = ListParams::default()
                .labels(label)
                .fields(OPEN_PHASES)
                .limit(OPEN_COUNTED_AT_MOST);
            let listed = Api::<Session>::namespaced(self.client.clone(), namespace)
                .list(&open)
                .await
                .map_err(desk_error)?;
            Ok(listed.items.len())
        })
    }

    fn changes(&self, namespace: &str, name: &str) -> Changes {
        let api = Api::<Session>::namespaced(self.client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        // A Session deleted while the watch was being re-listed shows as a list without it.
        let mut listed = true;
        watcher(api, config)
            .default_backoff()
            .filter_map(move |event| {
                futures::future::ready(match event {
                    Ok(watcher::Event::Apply(session)) => Some(Ok(Some(session))),
                    Ok(watcher::Event::InitApply(session)) => {
                        listed = true;
                        Some(Ok(Some(session)))
                    }
                    Ok(watcher::Event::Delete(_)) => Some(Ok(None)),
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        None
                    }
                    Ok(watcher::Event::InitDone) => (!listed).then_some(Ok(None)),
                    Err(e) => Some(Err(DeskError::Unavailable(e.to_string()))),
                })
            })
            .boxed()
    }
}
