//! The A2A endpoint: Agents that opt in (`spec.a2a`) answer other agents at
//! `/a2a/<namespace>/<agent>`. A caller is a person or workload with a Kubernetes token (the
//! same tokens as for reading records) whom RBAC lets `invoke` that Agent; each message they
//! send starts a Session of the Agent acting for them, and its task is that Session as it goes:
//! waiting for an approval is `input-required`, success is `completed` with the validated output
//! as the artifact. Everything the run does is governed and recorded as for any Session.
//!
//! Nothing here runs an agent: Sessions are created, read and cancelled through the API server
//! (see [`crate::gateway::a2a_server::sessions`]), where the operator picks them up.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::body::Bytes;
use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use contextos_crds::Session;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::{GatewayService, Refusal, bearer, forbidden, not_authenticated, unavailable};
use crate::{
    gateway::{
        a2a_server::{
            sessions::{AgentSessions, DeskError},
            wire::{self, Method, Request, RpcError, TaskState},
        },
        identity::Authenticator,
        readers::{A2A_AUDIENCE, Reader, ReaderAuthority},
        tenancy::TenantView,
    },
    memory::backend::MemoryBackend,
    records::{RecordStore, TenantId},
    telemetry::parse_traceparent,
};

/// Requests and streams one replica serves A2A callers at once (more are answered 503).
const MAX_A2A_IN_FLIGHT: usize = 256;
/// Of those, what the callers of one namespace's agents may hold: callers of one tenant cannot
/// take every other tenant's share.
const MAX_A2A_PER_NAMESPACE: usize = 32;
/// Of a namespace's share, what one caller may hold — the service accounts of one namespace
/// count as one caller (see [`wire::origin_of`]): one caller's streams cannot take every other caller's.
const MAX_A2A_PER_CALLER: usize = 8;
/// What the callers from one place may hold across every namespace they call: the service
/// accounts of one namespace (which its tenant can make as many of as it likes), or one user.
/// Without it, a tenant's accounts calling agents that many namespaces offer to every
/// authenticated caller could hold the whole replica.
const MAX_A2A_PER_ORIGIN: usize = 32;
/// Tasks one caller may have going in one namespace at once — the service accounts of one
/// namespace count as one caller (see [`wire::origin_of`]) — (more messages are refused until
/// one ends): every task is a run, a pod and an object the API server keeps.
const MAX_OPEN_TASKS_PER_CALLER: usize = 16;
/// Largest message body (read within the service's body timeout).
const MAX_A2A_BODY_BYTES: usize = 1 << 20;
/// How long `SendMessage` waits for its task to end or to wait on a person (then the task is
/// answered as it is, and the caller follows it with `GetTask`).
const SEND_WAIT: Duration = Duration::from_secs(60);
/// How long `CancelTask` waits for the Session to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How long a stream is kept open (then it ends; `SubscribeToTask` goes on following).
const STREAM_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// A comment sent on a quiet stream, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Semaphores by key, made as keys come.
type Bounds<K> = std::sync::Mutex<std::collections::HashMap<K, Arc<tokio::sync::Semaphore>>>;
/// What one caller's messages take turns on.
type Turns = Arc<tokio::sync::Mutex<()>>;

/// The A2A endpoint's settings.
pub(super) struct A2aSettings {
    pub sessions: Arc<dyn AgentSessions>,
    /// The gateway's URL as callers reach it (for the endpoint its cards name); without it,
    /// the request's own `Host` over http.
    pub public_url: Option<String>,
    slots: Slots,
    /// Held by a caller's message while its open tasks are counted and its Session created, so
    /// that messages sent at once through this replica are counted one after the other.
    starting: std::sync::Mutex<std::collections::HashMap<(String, String), Turns>>,
}

impl A2aSettings {
    pub fn new(sessions: Arc<dyn AgentSessions>, public_url: Option<String>) -> Self {
        Self {
            sessions,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            slots: Slots::default(),
            starting: Default::default(),
        }
    }

    /// The lock the messages of a caller's origin to `namespace` take turns on at this replica.
    fn starting(&self, namespace: &str, caller: &str) -> Turns {
        let caller = wire::origin_of(caller);
        let mut locks = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 4096 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry((namespace.to_owned(), caller)).or_default().clone()
    }
}

/// What A2A requests and streams hold at this replica: each takes a slot of its caller's in
/// the namespace it calls, of that namespace's, of its caller's origin and of the replica's.
struct Slots {
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Each namespace's share of `in_flight`.
    per_namespace: Bounds<String>,
    /// Each (namespace, caller's origin)'s share of its namespace's.
    per_caller: Bounds<(String, String)>,
    /// Each origin's share of `in_flight` (see [`wire::origin_of`]).
    per_origin: Bounds<String>,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_A2A_IN_FLIGHT)),
            per_namespace: Default::default(),
            per_caller: Default::default(),
            per_origin: Default::default(),
        }
    }
}

impl Slots {
    /// A slot for `caller` calling an agent of `namespace`, if every bound it counts against
    /// has one free.
    fn take(&self, namespace: &str, caller: &str) -> Option<Slot> {
        let take = |bound: Option<Arc<tokio::sync::Semaphore>>| bound?.try_acquire_owned().ok();
        let origin = wire::origin_of(caller);
        // The narrowest first: a caller at its bound takes none of the wider ones, even for a
        // moment.
        let caller_slot = take(shared_bound(
            &self.per_caller,
            (namespace.to_owned(), origin.clone()),
            MAX_A2A_PER_CALLER,
        ))?;
        let origin_slot = take(shared_bound(&self.per_origin, origin, MAX_A2A_PER_ORIGIN))?;
        let namespace_slot = take(shared_bound(
            &self.per_namespace,
            namespace.to_owned(),
            MAX_A2A_PER_NAMESPACE,
        ))?;
        let replica = self.in_flight.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _caller: caller_slot,
            _namespace: namespace_slot,
            _origin: origin_slot,
            _replica: replica,
        })
    }
}

/// The bound of `key` among `bounds`, each `permits` wide (idle ones are forgotten now and then;
/// only permitted callers get here).
fn shared_bound<K: std::hash::Hash + Eq>(
    bounds: &Bounds<K>,
    key: K,
    permits: usize,
) -> Option<Arc<tokio::sync::Semaphore>> {
    let mut bounds = bounds.lock().ok()?;
    if bounds.len() > 4096 {
        bounds.retain(|_, s| s.available_permits() < permits);
    }
    Some(
        bounds
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(permits)))
            .clone(),
    )
}

/// What an A2A request or stream holds while it is served.
struct Slot {
    _caller: tokio::sync::OwnedSemaphorePermit,
    _namespace: tokio::sync::OwnedSemaphorePermit,
    _origin: tokio::sync::OwnedSemaphorePermit,
    _replica: tokio::sync::OwnedSemaphorePermit,
}

/// An exposed Agent a caller may invoke, found.
struct Invocation {
    namespace: String,
    agent: contextos_crds::Agent,
    caller: Reader,
    sessions: Arc<dyn AgentSessions>,
    /// What this caller's messages to the namespace take turns on (see [`A2aSettings`]).
    starting: Turns,
    _slot: Slot,
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// Who calls, whether they may invoke the Agent, and the Agent, if it is exposed — in that
    /// order, so nobody learns which Agents exist where they may not invoke them.
    async fn invocation(
        &self,
        namespace: &str,
        agent: &str,
        headers: &HeaderMap,
    ) -> Result<Invocation, Refusal> {
        let Some(settings) = &self.a2a else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "this gateway does not serve A2A (it runs without the Kubernetes API)".into(),
            ));
        };
        let tenant = TenantId::new(namespace).map_err(|_| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{namespace:?} is not a namespace"),
            )
        })?;
        if self.is_own(tenant.as_str()) || !is_name(agent) {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("there is no agent {namespace}/{agent} to call"),
            ));
        }
        let token = bearer(headers);
        let caller = self
            .reviewed(A2A_AUDIENCE, token, self.auth.authenticate_a2a_caller(token))
            .await
            .map_err(|e| {
                not_authenticated(
                    e,
                    &format!("calling an agent needs a Kubernetes token for audience {A2A_AUDIENCE} (e.g. `kubectl create token <service account> --audience {A2A_AUDIENCE}`, or a projected token of your workload)"),
                )
            })?;
        let allowed = self.auth.may_invoke(&caller, namespace, agent).await.map_err(|e| {
            if let crate::gateway::identity::AuthError::AccessThrottled(_) = e {
                return super::throttled(&e);
            }
            tracing::warn!(error = %e, user = %caller.username, %namespace, %agent, "cannot review an A2A caller");
            unavailable("the gateway cannot ask the API server whether you may call this agent now; try again")
        })?;
        if !allowed {
            tracing::info!(user = %caller.username, %namespace, %agent, "refused an A2A caller without permission");
            return Err(forbidden(format!(
                "user {} may not call agent {agent} in namespace {namespace}: that needs RBAC verb `invoke` on agents.contextos.dev (resourceName {agent}) there, e.g. a RoleBinding to ClusterRole contextos-a2a-caller",
                caller.username
            )));
        }
        // Only callers who may invoke it get this far, so only they can take the namespace's
        // share of the replica; the slot is taken before the Agent is read, so that reading
        // it is bounded too.
        let Some(slot) = settings.slots.take(namespace, &caller.username) else {
            return Err(unavailable(format!(
                "this gateway replica serves {MAX_A2A_IN_FLIGHT} A2A requests and streams at once, {MAX_A2A_PER_NAMESPACE} for the agents of namespace {namespace}, {MAX_A2A_PER_CALLER} for one caller of them, {MAX_A2A_PER_ORIGIN} for the callers of one namespace's service accounts (or one user) across namespaces; try again"
            )));
        };
        let found = settings.sessions.agent(namespace, agent).await.map_err(|e| {
            tracing::warn!(error = %e, %namespace, %agent, "cannot read an Agent for an A2A caller");
            unavailable("the gateway cannot read the agent now; try again")
        })?;
        let starting = settings.starting(namespace, &caller.username);
        match found {
            Some(found) if found.spec.a2a.is_some() => Ok(Invocation {
                namespace: namespace.to_owned(),
                agent: found,
                caller,
                sessions: settings.sessions.clone(),
                starting,
                _slot: slot,
            }),
            _ => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "agent {namespace}/{agent} is not offered over A2A (it does not exist, or its spec.a2a is not set)"
                ),
            )),
        }
    }

    /// `GET /a2a/<namespace>/<agent>/.well-known/agent-card.json`.
    pub(super) async fn a2a_card(
        State(service): State<Arc<Self>>,
        Path((namespace, agent)): Path<(String, String)>,
        headers: HeaderMap,
    ) -> Response {
        let invocation = match service.invocation(&namespace, &agent, &headers).await {
            Ok(invocation) => invocation,
            Err(refusal) => return refusal.into_response(),
        };
        let endpoint = service.a2a_endpoint(&headers, &namespace, &agent);
        match wire::card(&invocation.agent, &endpoint) {
            Some(card) => Json(card).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }

    /// Where callers send requests for `namespace/agent`.
    fn a2a_endpoint(&self, headers: &HeaderMap, namespace: &str, agent: &str) -> String {
        let base = self
            .a2a
            .as_ref()
            .and_then(|s| s.public_url.clone())
            .unwrap_or_else(|| {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .filter(|h| {
                        h.chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                    })
                    .unwrap_or("localhost");
                format!("http://{host}")
            });
        format!("{base}{}/{namespace}/{agent}", wire::PATH_PREFIX)
    }

    /// `POST /a2a/<namespace>/<agent>`: one JSON-RPC request.
    pub(super) async fn a2a_rpc(
        State(service): State<Arc<Self>>,
        Path((namespace, agent)): Path<(String, String)>,
        headers: HeaderMap,
        body: axum::body::Body,
    ) -> Response {
        let invocation = match service.invocation(&namespace, &agent, &headers).await {
            Ok(invocation) => invocation,
            Err(refusal) => return refusal.into_response(),
        };
        // Charged, while it is read and parsed, to a share of the namespace's own beside its
        // pods': its callers cannot take what the namespace's runners need to be heard (a
        // namespace name holds no `:`).
        let bytes = super::declared_bytes(&body, MAX_A2A_BODY_BYTES);
        let held = match service
            .bodies
            .take(&format!("a2a:{namespace}"), crate::gateway::shares::kib(bytes))
        {
            Ok(held) => held,
            Err(exhausted) => return super::bodies_refused(&namespace, bytes, exhausted).into_response(),
        };
        let body = match super::read_body(body, MAX_A2A_BODY_BYTES).await {
            Ok(body) => body,
            Err(refusal) => return refusal.into_response(),
        };
        let parsed = Request::parse(&body);
        drop((body, held));
        let request = match parsed {
            Ok(request) => request,
            Err((id, error)) => return Json(wire::error_reply(&id, &error)).into_response(),
        };
        if let Some(version) = headers.get("a2a-version").and_then(|v| v.to_str().ok())
            && !version.trim().is_empty()
            && version.trim().split('.').next() != Some("1")
        {
            let error = RpcError {
                code: -32009,
                message: format!("A2A version {version} is not served; this agent speaks 1.0"),
            };
            return Json(wire::error_reply(&request.id, &error)).into_response();
        }
        let traceparent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| parse_traceparent(v).is_some())
            .map(str::to_owned);
        let streams = matches!(
            request.method,
            Method::SendStreamingMessage | Method::SubscribeToTask
        );
        // `SendMessage` answers with a task or a message (`{"task": …}`); `GetTask` and
        // `CancelTask` with the task itself.
        let wrapped = request.method == Method::SendMessage;
        let id = request.id.clone();
        let answered = match request.method {
            Method::SendMessage | Method::SendStreamingMessage => {
                send(invocation, &request, traceparent.as_deref()).await
            }
            Method::GetTask => own_task(&invocation, &request.params)
                .await
                .map(|s| Answer::Now(Box::new(s))),
            Method::CancelTask => cancel(&invocation, &request.params)
                .await
                .map(|s| Answer::Now(Box::new(s))),
            Method::SubscribeToTask => subscribe(invocation, &request.params).await,
        };
        match (answered, streams) {
            (Ok(Answer::Now(session)), false) => {
                let task = wire::task(&session);
                let result = if wrapped { json!({"task": task}) } else { task };
                Json(wire::result_reply(&id, result)).into_response()
            }
            (Ok(Answer::Now(session)), true) => {
                event_stream(vec![event(&id, json!({"task": wire::task(&session)}))], None)
            }
            (Ok(Answer::Follow(state, ends)), _) => {
                let (invocation, session) = *state;
                follow_stream(id, invocation, session, ends)
            }
            // A streaming method's error is an event of its stream, as callers read it.
            (Err(error), true) => event_stream(vec![event_error(&id, &error)], None),
            (Err(error), false) => Json(wire::error_reply(&id, &error)).into_response(),
        }
    }
}

/// What a request is answered with.
enum Answer {
    /// The task as it is.
    Now(Box<Session>),
    /// A stream of the task from this state on, until `ends` holds for its state.
    Follow(Box<(Invocation, Session)>, fn(TaskState) -> bool),
}

/// Whether `name` can be an object's name.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn desk_failure(e: &DeskError) -> RpcError {
    match e {
        DeskError::Refused(message) => RpcError::invalid_request(format!(
            "the Session this message would start was refused: {message}"
        )),
        other => {
            tracing::warn!(error = %other, "an A2A request could not reach the API server");
            RpcError::internal(
                "the gateway cannot reach the API server now; send the same message again (it starts the task once)",
            )
        }
    }
}

/// The caller's own task that `params.id` names.
async fn own_task(invocation: &Invocation, params: &Value) -> Result<Session, RpcError> {
    let id = wire::task_id(params)?;
    task_of(invocation, id).await
}

async fn task_of(invocation: &Invocation, id: &str) -> Result<Session, RpcError> {
    let agent = invocation.agent.metadata.name.as_deref().unwrap_or_default();
    if !is_name(id) {
        return Err(RpcError::task_not_found(id));
    }
    match invocation.sessions.get(&invocation.namespace, id).await {
        Ok(Some(session))
            if wire::is_task_of(&session, &invocation.caller) && session.spec.agent_ref.name == agent =>
        {
            Ok(session)
        }
        // Someone else's Session, or another Agent's, is not there for this caller.
        Ok(_) => Err(RpcError::task_not_found(id)),
        Err(e) => Err(desk_failure(&e)),
    }
}

/// `SendMessage` and `SendStreamingMessage`: the Session the message starts (or started, when
/// it is sent again).
async fn send(
    invocation: Invocation,
    request: &Request,
    traceparent: Option<&str>,
) -> Result<Answer, RpcError> {
    let incoming = wire::incoming(&request.params)?;
    if let Some(task) = &incoming.task_id {
        let session = task_of(&invocation, task).await?;
        let state = wire::state(&session);
        return Err(RpcError::unsupported(if state.is_terminal() {
            format!(
                "task {task} has ended ({}); send a new message without taskId to start another",
                state.wire()
            )
        } else {
            format!(
                "task {task} takes no further messages: it is a Session of its own, which goes on by itself; when it waits on a person (input-required), an approver decides on Session {}/{task}",
                invocation.namespace
            )
        }));
    }
    let agent = invocation.agent.metadata.name.clone().unwrap_or_default();
    let wanted = wire::session(
        &invocation.namespace,
        &agent,
        &invocation.caller,
        &incoming,
        traceparent,
    )?;
    // A caller with many tasks going starts no more (a message sent again still meets its task).
    // Its messages are counted one after the other at this replica; replicas count apart.
    let starting = invocation.starting.clone();
    let counted = starting.lock().await;
    let label = format!("{}={}", wire::ORIGIN_LABEL, wire::origin_id(&invocation.caller));
    let open = invocation
        .sessions
        .open(&invocation.namespace, &label)
        .await
        .map_err(|e| desk_failure(&e))?;
    let created = if open >= MAX_OPEN_TASKS_PER_CALLER {
        Err(DeskError::Exists)
    } else {
        invocation.sessions.create(&wanted).await
    };
    let session = match created {
        Ok(created) => {
            tracing::info!(
                namespace = %invocation.namespace,
                %agent,
                caller = %invocation.caller.username,
                session = created.metadata.name.as_deref().unwrap_or_default(),
                "an A2A message started a Session"
            );
            created
        }
        Err(DeskError::Exists) => {
            let name = wanted.metadata.name.as_deref().unwrap_or_default();
            match invocation.sessions.get(&invocation.namespace, name).await {
                Ok(Some(existing))
                    if wire::is_task_of(&existing, &invocation.caller)
                        && wire::same_request(&existing, &wanted) =>
                {
                    existing
                }
                Ok(None) if open >= MAX_OPEN_TASKS_PER_CALLER => {
                    return Err(RpcError::unsupported(format!(
                        "you have {open} tasks going with the agents of namespace {} (the service accounts of one namespace count as one caller); at most {MAX_OPEN_TASKS_PER_CALLER} at once: wait for one to end, or cancel one",
                        invocation.namespace
                    )));
                }
                Ok(_) => {
                    return Err(RpcError::invalid_params(format!(
                        "message id {} was already used for another request; give each new message its own messageId",
                        incoming.message_id
                    )));
                }
                Err(e) => return Err(desk_failure(&e)),
            }
        }
        Err(e) => return Err(desk_failure(&e)),
    };
    drop(counted);
    match request.method {
        // The stream of a new task ends where the caller has to wait: its end, or a person.
        Method::SendStreamingMessage => Ok(Answer::Follow(
            Box::new((invocation, session)),
            TaskState::ends_stream,
        )),
        _ if incoming.return_immediately => Ok(Answer::Now(Box::new(session))),
        _ => Ok(Answer::Now(Box::new(
            wait(&invocation, session, SEND_WAIT, TaskState::ends_stream).await,
        ))),
    }
}

/// `CancelTask`: sets the Session's `spec.cancel`, and answers once it stopped (or after a
/// while, still stopping).
async fn cancel(invocation: &Invocation, params: &Value) -> Result<Session, RpcError> {
    let session = own_task(invocation, params).await?;
    let state = wire::state(&session);
    let name = session.metadata.name.clone().unwrap_or_default();
    if state.is_terminal() {
        return Err(RpcError::not_cancelable(&name, state));
    }
    let cancelled = invocation
        .sessions
        .cancel(
            &invocation.namespace,
            &name,
            session.metadata.uid.as_deref().unwrap_or_default(),
        )
        .await
        .map_err(|e| desk_failure(&e))?;
    tracing::info!(namespace = %invocation.namespace, session = %name, caller = %invocation.caller.username, "an A2A caller cancelled its task");
    Ok(wait(invocation, cancelled, CANCEL_WAIT, TaskState::is_terminal).await)
}

/// `SubscribeToTask`: a stream of the caller's task until it ends, unless it has (a caller
/// subscribing to a task waiting on a person waits with it).
async fn subscribe(invocation: Invocation, params: &Value) -> Result<Answer, RpcError> {
    let session = own_task(&invocation, params).await?;
    let state = wire::state(&session);
    if state.is_terminal() {
        return Err(RpcError::unsupported(format!(
            "task {} has ended ({}); GetTask shows its outcome",
            session.metadata.name.as_deref().unwrap_or_default(),
            state.wire()
        )));
    }
    Ok(Answer::Follow(
        Box::new((invocation, session)),
        TaskState::is_terminal,
    ))
}

/// The Session once `done` holds for its state, or as it is after `within`.
async fn wait(
    invocation: &Invocation,
    mut session: Session,
    within: Duration,
    done: fn(TaskState) -> bool,
) -> Session {
    if done(wire::state(&session)) {
        return session;
    }
    let name = session.metadata.name.clone().unwrap_or_default();
    let mut changes = invocation.sessions.changes(&invocation.namespace, &name);
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(next)) = tokio::time::timeout_at(deadline, changes.next()).await {
        match next {
            Ok(Some(next)) => {
                session = next;
                if done(wire::state(&session)) {
                    break;
                }
            }
            // Deleted: the caller gets the task as last seen.
            Ok(None) => break,
            // The watch retries by itself; the caller gets the task as last seen.
            Err(e) => tracing::debug!(error = %e, "watching an A2A task"),
        }
    }
    session
}

/// One stream event: a JSON-RPC answer carrying `result`.
fn event(id: &Value, result: Value) -> Bytes {
    sse(&wire::result_reply(id, result))
}

fn event_error(id: &Value, error: &RpcError) -> Bytes {
    sse(&wire::error_reply(id, error))
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn event_stream(first: Vec<Bytes>, rest: Option<tokio::sync::mpsc::Receiver<Bytes>>) -> Response {
    let head = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>));
    let body = match rest {
        Some(mut rest) => axum::body::Body::from_stream(head.chain(futures::stream::poll_fn(move |cx| {
            rest.poll_recv(cx).map(|b| b.map(Ok))
        }))),
        None => axum::body::Body::from_stream(head),
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Puts `event` on a stream, unless its caller stops reading it until its lifetime ends (a full
/// stream waits; a stream is never held past its lifetime): whether it was put.
async fn deliver(
    sender: &tokio::sync::mpsc::Sender<Bytes>,
    event: Bytes,
    lifetime: &mut std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool {
    tokio::select! {
        sent = sender.send(event) => sent.is_ok(),
        () = lifetime.as_mut() => false,
    }
}

/// A stream of the task: the task as it is, then each change of its status (its output before
/// it completes) until `ends` holds for its state, or [`STREAM_LIFETIME`] passes.
fn follow_stream(
    id: Value,
    invocation: Invocation,
    session: Session,
    ends: fn(TaskState) -> bool,
) -> Response {
    let first = vec![event(&id, json!({"task": wire::task(&session)}))];
    if ends(wire::state(&session)) {
        return event_stream(first, None);
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let name = session.metadata.name.clone().unwrap_or_default();
        let mut changes = invocation.sessions.changes(&invocation.namespace, &name);
        let mut shown = wire::visible(&session);
        let lifetime = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(lifetime);
        // A comment on its own clock, whatever the Session does: it keeps proxies from closing
        // a quiet stream, and a caller that has gone is noticed when it cannot be written.
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            let next = tokio::select! {
                () = &mut lifetime => break,
                () = sender.closed() => break,
                _ = keep_alive.tick() => {
                    if !deliver(&sender, Bytes::from_static(b": keep-alive\n\n"), &mut lifetime).await {
                        break;
                    }
                    continue;
                }
                next = changes.next() => next,
            };
            let next = match next {
                Some(Ok(Some(next))) => next,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watching an A2A task");
                    continue;
                }
                // Deleted (or no longer watched): the task is gone.
                Some(Ok(None)) | None => {
                    let gone = event_error(&id, &RpcError::task_not_found(&name));
                    deliver(&sender, gone, &mut lifetime).await;
                    break;
                }
            };
            let visible = wire::visible(&next);
            if visible == shown {
                continue;
            }
            shown = visible;
            let state = wire::state(&next);
            if let Some(artifact) = wire::artifact_event(&next)
                && !deliver(&sender, event(&id, artifact), &mut lifetime).await
            {
                break;
            }
            if !deliver(&sender, event(&id, wire::status_event(&next)), &mut lifetime).await || ends(state) {
                break;
            }
        }
        drop(invocation);
    });
    event_stream(first, Some(receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's service accounts calling agents that many namespaces offer hold at most their
    /// origin's share of the replica, however many accounts and namespaces there are.
    #[test]
    fn the_service_accounts_of_one_namespace_share_one_origins_slots() {
        let slots = Slots::default();
        let mut held = Vec::new();
        'calls: for account in 0..64 {
            for namespace in 0..64 {
                let caller = format!("system:serviceaccount:tenant-a:caller-{account}");
                match slots.take(&format!("shop-{namespace}"), &caller) {
                    Some(slot) => held.push(slot),
                    None => break 'calls,
                }
            }
        }
        assert_eq!(held.len(), MAX_A2A_PER_ORIGIN);
        // In one namespace, a tenant's accounts hold one caller's share however many they are.
        let many: Vec<Slot> = (0..32)
            .filter_map(|account| {
                slots.take(
                    "victim",
                    &format!("system:serviceaccount:tenant-c:caller-{account}"),
                )
            })
            .collect();
        assert_eq!(many.len(), MAX_A2A_PER_CALLER);
        // Another namespace's accounts and a user are served meanwhile.
        assert!(
            slots
                .take("shop-0", "system:serviceaccount:tenant-b:caller")
                .is_some()
        );
        assert!(slots.take("shop-1", "jane@example.com").is_some());
        drop(held.pop());
        assert!(
            slots
                .take("shop-63", "system:serviceaccount:tenant-a:caller-0")
                .is_some(),
            "a slot given back is taken again"
        );
    }

    #[test]
    fn a_callers_origin_is_its_service_accounts_namespace_or_itself() {
        use wire::origin_of;
        assert_eq!(origin_of("system:serviceaccount:shop:billing"), "namespace shop");
        assert_eq!(origin_of("jane@example.com"), "user jane@example.com");
        assert_eq!(
            origin_of("system:serviceaccount:broken"),
            "user system:serviceaccount:broken"
        );
    }
}
