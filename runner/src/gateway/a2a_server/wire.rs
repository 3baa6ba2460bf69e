//! What an A2A caller and the gateway say to each other (pure): the agent card generated from
//! an Agent, an incoming message read into the Session it starts, a Session shown as a task,
//! and JSON-RPC answers and errors. Protocol 1.0, JSON-RPC binding — the wire names of the
//! protocol's own schema (`TASK_STATE_WORKING`, `ROLE_AGENT`, `statusUpdate`, …).

use std::collections::BTreeMap;

use contextos_crds::{
    Agent, Session,
    common::{LocalRef, ToolRisk},
    session::{SessionInput, SessionPhase, SessionSpec, UserDelegation},
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{
    gateway::{
        adapters::a2a::{PROTOCOL_VERSION, RISK_CEILING_EXTENSION, cut},
        readers::Reader,
    },
    telemetry::TRACEPARENT_ANNOTATION,
};

/// Where the gateway serves A2A: `/a2a/<namespace>/<agent>` (JSON-RPC), its card below.
pub const PATH_PREFIX: &str = "/a2a";
/// Sessions started over A2A carry this label (value `true`).
pub const A2A_LABEL: &str = "contextos.dev/a2a";
/// The A2A caller a Session was started for (also its `spec.user.subject`).
pub const CALLER_ANNOTATION: &str = "contextos.dev/a2a-caller";
/// The caller's uid as the API server's TokenReview gave it (empty for callers it gives none):
/// a service account deleted and created again under the same name is someone else, and sees
/// none of the earlier one's tasks.
pub const CALLER_UID_ANNOTATION: &str = "contextos.dev/a2a-caller-uid";
/// The caller, as a label (a digest of their name and uid): what their open tasks are counted by.
pub const CALLER_LABEL: &str = "contextos.dev/a2a-caller-id";
/// The label a task carries with its caller's origin (see [`origin_of`]) as a digest: the
/// tasks of one origin are counted together.
pub const ORIGIN_LABEL: &str = "contextos.dev/a2a-origin-id";
/// The caller's message id that started the Session.
pub const MESSAGE_ANNOTATION: &str = "contextos.dev/a2a-message-id";
/// The A2A context the task belongs to.
pub const CONTEXT_ANNOTATION: &str = "contextos.dev/a2a-context-id";
/// The key of an input-required status's data part saying who the task waits for — its own
/// people (`approval`, `resolution` or `person`), never the caller: what tells a caller
/// (ContextOS's A2A adapter among them) that it is not asked anything.
pub const AWAITS_KEY: &str = "contextos.dev/awaits";
/// Beside it, the call waiting to be approved.
pub const PENDING_APPROVAL_KEY: &str = "pendingApproval";

/// Longest message id or context id taken from a caller.
const ID_MAX_CHARS: usize = 128;
/// Parts one message may have.
const MAX_PARTS: usize = 64;
/// Longest prompt (the Session's `spec.input.prompt` bound).
const PROMPT_MAX_BYTES: usize = 65536;
/// Groups a Session's user may have (the Session's `spec.user.groups` bound).
const MAX_GROUPS: usize = 32;
/// Largest data part (the run's input), as JSON: a message is one request, not a bulk upload,
/// and every Session is kept by the API server.
const DATA_MAX_BYTES: usize = 64 * 1024;

/// A JSON-RPC error of the A2A binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn parse(detail: impl std::fmt::Display) -> Self {
        Self::new(-32700, format!("the request is not JSON: {detail}"))
    }
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(-32600, message)
    }
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            -32601,
            format!(
                "method {:?} is not served here; this agent answers SendMessage, SendStreamingMessage, GetTask, CancelTask and SubscribeToTask",
                cut(method, 64)
            ),
        )
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(-32602, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(-32603, message)
    }
    pub fn task_not_found(id: &str) -> Self {
        Self::new(-32001, format!("task {:?} was not found", cut(id, ID_MAX_CHARS)))
    }
    pub fn not_cancelable(id: &str, state: TaskState) -> Self {
        Self::new(
            -32002,
            format!("task {id} has ended ({}); it cannot be cancelled", state.wire()),
        )
    }
    pub fn push_not_supported() -> Self {
        Self::new(
            -32003,
            "push notifications are not offered; follow a task with SubscribeToTask or GetTask",
        )
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(-32004, message)
    }
    pub fn content_not_supported(message: impl Into<String>) -> Self {
        Self::new(-32005, message)
    }
    pub fn no_extended_card() -> Self {
        Self::new(
            -32007,
            "this agent has no extended card; its card is the whole of it",
        )
    }
}

/// A JSON-RPC answer carrying `result`.
pub fn result_reply(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// A JSON-RPC answer carrying `error`.
pub fn error_reply(id: &Value, error: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": error.code, "message": error.message}})
}

/// What a caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    SendMessage,
    SendStreamingMessage,
    GetTask,
    CancelTask,
    SubscribeToTask,
}

/// A JSON-RPC request: its id, and the method with its parameters.
#[derive(Debug)]
pub struct Request {
    pub id: Value,
    pub method: Method,
    pub params: Value,
}

impl Request {
    /// Reads a request body. An error comes with the id to answer it under (null when the body
    /// names none).
    pub fn parse(body: &[u8]) -> Result<Self, (Value, RpcError)> {
        let value: Value = serde_json::from_slice(body).map_err(|e| (Value::Null, RpcError::parse(e)))?;
        let Value::Object(mut request) = value else {
            return Err((
                Value::Null,
                RpcError::invalid_request("a JSON-RPC request is an object (batches are not taken)"),
            ));
        };
        let id = match request.remove("id") {
            Some(id @ (Value::String(_) | Value::Number(_))) => id,
            _ => {
                return Err((
                    Value::Null,
                    RpcError::invalid_request("the request needs an id (a string or a number)"),
                ));
            }
        };
        if request.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err((id, RpcError::invalid_request("jsonrpc must be \"2.0\"")));
        }
        let name = request.get("method").and_then(Value::as_str).unwrap_or_default();
        let method = match name {
            "SendMessage" => Method::SendMessage,
            "SendStreamingMessage" => Method::SendStreamingMessage,
            "GetTask" => Method::GetTask,
            "CancelTask" => Method::CancelTask,
            "SubscribeToTask" => Method::SubscribeToTask,
            "CreateTaskPushNotificationConfig"
            | "GetTaskPushNotificationConfig"
            | "ListTaskPushNotificationConfigs"
            | "DeleteTaskPushNotificationConfig" => return Err((id, RpcError::push_not_supported())),
            "GetExtendedAgentCard" => return Err((id, RpcError::no_extended_card())),
            "ListTasks" => {
                return Err((
                    id,
                    RpcError::unsupported(
                        "tasks are not listed here; each is a Session (kubectl get sessions -l contextos.dev/a2a=true)",
                    ),
                ));
            }
            other => return Err((id, RpcError::method_not_found(other))),
        };
        let params = request.remove("params").unwrap_or(Value::Null);
        if !params.is_object() {
            return Err((id, RpcError::invalid_params("params must be an object")));
        }
        Ok(Self { id, method, params })
    }
}

/// The task id a `GetTask`, `CancelTask` or `SubscribeToTask` names.
pub fn task_id(params: &Value) -> Result<&str, RpcError> {
    params
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| RpcError::invalid_params("params.id must name the task"))
}

/// A message a caller sent, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    pub message_id: String,
    pub context_id: Option<String>,
    /// The task the message continues, when it names one.
    pub task_id: Option<String>,
    /// Its text parts, joined: the Session's prompt.
    pub prompt: String,
    /// Its data part: the Session's structured input (`run.input.data` to policies).
    pub data: Option<Value>,
    /// Answer as soon as the task exists rather than when it ends or waits.
    pub return_immediately: bool,
}

/// Reads `SendMessage`'s parameters (pure). Only what a Session can hold is taken: text (its
/// prompt) and at most one JSON object (its input data); files and raw bytes are refused.
pub fn incoming(params: &Value) -> Result<Incoming, RpcError> {
    let message = params
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| RpcError::invalid_params("params.message must be a message object"))?;
    let id = |field: &str| -> Result<Option<String>, RpcError> {
        match message.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s))
                if s.chars().count() <= ID_MAX_CHARS
                    && !s.chars().any(|c| c.is_control() || crate::text::is_invisible(c)) =>
            {
                Ok(Some(s.clone()))
            }
            Some(_) => Err(RpcError::invalid_params(format!(
                "message.{field} must be a string of at most {ID_MAX_CHARS} printable characters (no control or invisible ones)"
            ))),
        }
    };
    let message_id =
        id("messageId")?.ok_or_else(|| RpcError::invalid_params("message.messageId is required"))?;
    let role = message.get("role").and_then(Value::as_str).unwrap_or_default();
    if !matches!(role, "ROLE_USER" | "user") {
        return Err(RpcError::invalid_params(format!(
            "message.role is {:?}; a caller's message has role ROLE_USER",
            cut(role, 32)
        )));
    }
    let parts = message
        .get("parts")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| RpcError::invalid_params("message.parts must list at least one part"))?;
    if parts.len() > MAX_PARTS {
        return Err(RpcError::invalid_params(format!(
            "message.parts has {} parts; at most {MAX_PARTS} are taken",
            parts.len()
        )));
    }
    let mut texts = Vec::new();
    let mut data = None;
    for (i, part) in parts.iter().enumerate() {
        if let Some(text) = part.get("text").and_then(Value::as_str) {
            texts.push(text);
        } else if let Some(value) = part.get("data") {
            if data.is_some() {
                return Err(RpcError::invalid_params(
                    "message.parts has two data parts; send one JSON object (it becomes the run's input)",
                ));
            }
            if !value.is_object() {
                return Err(RpcError::invalid_params(format!(
                    "message.parts[{i}].data must be a JSON object (it becomes the run's input)"
                )));
            }
            let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
            if size > DATA_MAX_BYTES {
                return Err(RpcError::invalid_params(format!(
                    "message.parts[{i}].data is {size} bytes of JSON; at most {DATA_MAX_BYTES} are taken"
                )));
            }
            data = Some(value.clone());
        } else {
            return Err(RpcError::content_not_supported(format!(
                "message.parts[{i}] is neither text nor data; this agent takes text and one JSON object, not files or raw bytes"
            )));
        }
    }
    let prompt = texts.join("\n\n");
    if prompt.trim().is_empty() {
        return Err(RpcError::invalid_params(
            "the message has no text: say what the agent should do in a text part (data alone is its input, not its task)",
        ));
    }
    if prompt.len() > PROMPT_MAX_BYTES {
        return Err(RpcError::invalid_params(format!(
            "the message's text is {} bytes; at most {PROMPT_MAX_BYTES} are taken",
            prompt.len()
        )));
    }
    if params
        .pointer("/configuration/taskPushNotificationConfig")
        .is_some_and(|c| !c.is_null())
    {
        return Err(RpcError::push_not_supported());
    }
    let return_immediately = params
        .pointer("/configuration/returnImmediately")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Incoming {
        message_id,
        context_id: id("contextId")?,
        task_id: id("taskId")?,
        prompt,
        data,
        return_immediately,
    })
}

/// The name of the Session a caller's message starts: the same message (by id) from the same
/// caller to the same agent is the same Session, so a resent message starts nothing new. (By
/// name only, as before uids were kept: a message resent across that change still meets its
/// task. An account made again under an old name that sends an old message id meets a task
/// that is not its own, and is told the id was used.)
pub fn session_name(namespace: &str, agent: &str, caller: &Reader, message_id: &str) -> String {
    let mut hash = Sha256::new();
    for part in [namespace, agent, caller.username.as_str(), message_id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("a2a-{hex}")
}

/// The Session a caller's message starts (pure): the Agent's run for the caller, who is its
/// user (`spec.user`, the delegating identity the record keeps).
pub fn session(
    namespace: &str,
    agent: &str,
    caller: &Reader,
    incoming: &Incoming,
    traceparent: Option<&str>,
) -> Result<Session, RpcError> {
    if caller.groups.len() > MAX_GROUPS {
        // Dropping groups could lift a policy that denies by group: the caller is refused.
        return Err(RpcError::invalid_request(format!(
            "you are in {} groups; a Session's user may have at most {MAX_GROUPS}, so it cannot act for you",
            caller.groups.len()
        )));
    }
    let name = session_name(namespace, agent, caller, &incoming.message_id);
    let mut annotations = BTreeMap::from([
        (CALLER_ANNOTATION.to_owned(), caller.username.clone()),
        (CALLER_UID_ANNOTATION.to_owned(), caller.uid.clone()),
        (MESSAGE_ANNOTATION.to_owned(), incoming.message_id.clone()),
        (
            CONTEXT_ANNOTATION.to_owned(),
            incoming.context_id.clone().unwrap_or_else(|| name.clone()),
        ),
    ]);
    if let Some(traceparent) = traceparent {
        annotations.insert(TRACEPARENT_ANNOTATION.to_owned(), traceparent.to_owned());
    }
    let mut session = Session::new(
        &name,
        SessionSpec {
            agent_ref: LocalRef {
                name: agent.to_owned(),
            },
            input: SessionInput {
                prompt: incoming.prompt.clone(),
                data: incoming.data.clone(),
            },
            user: Some(UserDelegation {
                subject: caller.username.clone(),
                groups: caller.groups.clone(),
                scopes: Vec::new(),
            }),
            subject: None,
            overrides: None,
            approvals: Vec::new(),
            resolutions: Vec::new(),
            cancel: false,
        },
    );
    session.metadata.namespace = Some(namespace.to_owned());
    session.metadata.labels = Some(BTreeMap::from([
        (A2A_LABEL.to_owned(), "true".to_owned()),
        (CALLER_LABEL.to_owned(), caller_id(caller)),
        (ORIGIN_LABEL.to_owned(), origin_id(caller)),
    ]));
    session.metadata.annotations = Some(annotations);
    Ok(session)
}

/// A caller as a label value: a digest of their name and uid (names hold characters labels
/// may not).
pub fn caller_id(caller: &Reader) -> String {
    let mut hash = Sha256::new();
    for part in [&caller.username, &caller.uid] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

/// Where a caller comes from: the namespace of a service account (every account of one
/// namespace is one origin: its tenant can make as many as it likes), or the user.
pub fn origin_of(username: &str) -> String {
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((namespace, _)) => format!("namespace {namespace}"),
        None => format!("user {username}"),
    }
}

/// A caller's origin as a label value (a digest, as [`caller_id`]).
pub fn origin_id(caller: &Reader) -> String {
    let origin = origin_of(&caller.username);
    let digest = Sha256::digest(origin.as_bytes());
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

/// Whether `session` is a task `caller` started (pure): started over A2A, acting for them. A
/// Session's user cannot change after creation, and is the API server's word on who created it
/// (or who a delegate created it for); its caller uid is the gateway's alone to write
/// (admission policy contextos-a2a-sessions). So nobody else's tasks are ever shown or
/// cancelled — nor, to an account made again under an old one's name, the old one's.
pub fn is_task_of(session: &Session, caller: &Reader) -> bool {
    let a2a = session
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(A2A_LABEL))
        .is_some_and(|v| v == "true");
    // A task made before callers' uids were kept has no uid mark (nobody but the gateway
    // writes or removes the marks): its caller is known by name only.
    let uid = session
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CALLER_UID_ANNOTATION));
    a2a && uid.is_none_or(|uid| *uid == caller.uid)
        && session
            .spec
            .user
            .as_ref()
            .is_some_and(|u| u.subject == caller.username)
}

/// Whether a resent message meets the Session it started, unchanged (pure).
pub fn same_request(existing: &Session, wanted: &Session) -> bool {
    existing.spec.agent_ref == wanted.spec.agent_ref
        && existing.spec.input == wanted.spec.input
        && existing.spec.user == wanted.spec.user
}

/// A task's state, as the protocol names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    Submitted,
    Working,
    InputRequired,
    Completed,
    Failed,
    Canceled,
}

impl TaskState {
    pub fn wire(self) -> &'static str {
        match self {
            Self::Submitted => "TASK_STATE_SUBMITTED",
            Self::Working => "TASK_STATE_WORKING",
            Self::InputRequired => "TASK_STATE_INPUT_REQUIRED",
            Self::Completed => "TASK_STATE_COMPLETED",
            Self::Failed => "TASK_STATE_FAILED",
            Self::Canceled => "TASK_STATE_CANCELED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }

    /// Whether a stream of the task ends here: it ended, or waits on a person.
    pub fn ends_stream(self) -> bool {
        self.is_terminal() || self == Self::InputRequired
    }
}

/// The state a Session shows as (pure).
pub fn state(session: &Session) -> TaskState {
    let status = session.status.as_ref();
    match status.and_then(|s| s.phase) {
        None | Some(SessionPhase::Pending) => {
            if session.spec.cancel {
                TaskState::Working
            } else {
                TaskState::Submitted
            }
        }
        Some(SessionPhase::Running) => TaskState::Working,
        Some(SessionPhase::AwaitingApproval | SessionPhase::AwaitingResolution) => TaskState::InputRequired,
        Some(SessionPhase::Succeeded) => TaskState::Completed,
        Some(SessionPhase::Failed) => TaskState::Failed,
        Some(SessionPhase::Cancelled) => TaskState::Canceled,
    }
}

/// What the task's status message says, if anything (pure): that it waits on a person and
/// where they decide, or why it failed. Neither the waiting call's arguments (they may hold
/// what the agent read with the tenant's tools) nor the rule, its reason or its approvers are
/// shown: they are the tenant's policy, and a caller told "amounts over 500 need finance"
/// learns to send 499s — the caller is granted `invoke`, not a reading of the Policies.
fn status_text(session: &Session, state: TaskState) -> Option<String> {
    let status = session.status.as_ref()?;
    let namespace = session.metadata.namespace.as_deref().unwrap_or_default();
    let name = session.metadata.name.as_deref().unwrap_or_default();
    match state {
        TaskState::InputRequired => {
            if let Some(pending) = &status.pending_approval {
                Some(format!(
                    "waiting for a person to approve the call of tool {} (risk {}), which the agent's policy holds for approval; one of its approvers decides on Session {namespace}/{name} (spec.approvals, callHash {}); this task goes on by itself once they do.",
                    pending.tool,
                    pending.risk.as_str(),
                    pending.call_hash
                ))
            } else if let Some(unresolved) = &status.unresolved_call {
                Some(format!(
                    "waiting for a person to say whether the call of tool {} acted (its outcome is unknown after an interruption): they record it on Session {namespace}/{name} (spec.resolutions, callId {}); this task goes on by itself once they do.",
                    unresolved.tool, unresolved.call_id
                ))
            } else {
                Some(format!("waiting for a person on Session {namespace}/{name}"))
            }
        }
        TaskState::Failed | TaskState::Canceled => status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| format!("{}: {}", c.reason, c.message)),
        _ => None,
    }
}

/// When the Session last changed state, as RFC 3339 (its Ready condition's transition).
fn timestamp(session: &Session) -> Option<String> {
    session
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.last_transition_time.0.to_string())
}

fn ids(session: &Session) -> (String, String) {
    let id = session.metadata.name.clone().unwrap_or_default();
    let context = session
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONTEXT_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| id.clone());
    (id, context)
}

/// Who a task waiting on a person waits for, as data (pure): its own people — an approver, or
/// whoever says whether a call acted — never the caller, who is asked nothing.
fn awaits(session: &Session, id: &str) -> Value {
    let namespace = session.metadata.namespace.as_deref().unwrap_or_default();
    let at = format!("{namespace}/{id}");
    let status = session.status.as_ref();
    if let Some(pending) = status.and_then(|s| s.pending_approval.as_ref()) {
        json!({AWAITS_KEY: "approval", PENDING_APPROVAL_KEY: {
            "tool": pending.tool,
            "risk": pending.risk.as_str(),
            "callHash": pending.call_hash,
            "session": at,
        }})
    } else if let Some(unresolved) = status.and_then(|s| s.unresolved_call.as_ref()) {
        json!({AWAITS_KEY: "resolution", "unresolvedCall": {
            "tool": unresolved.tool,
            "callId": unresolved.call_id,
            "session": at,
        }})
    } else {
        json!({AWAITS_KEY: "person", "session": at})
    }
}

/// The task's status object (pure).
pub fn task_status(session: &Session) -> Value {
    let state = state(session);
    let mut status = json!({"state": state.wire()});
    if let Some(text) = status_text(session, state) {
        let (id, context) = ids(session);
        let mut parts = vec![json!({"text": text})];
        if state == TaskState::InputRequired {
            parts.push(json!({"data": awaits(session, &id)}));
        }
        status["message"] = json!({
            "messageId": format!("{id}.{}", state.wire().trim_start_matches("TASK_STATE_").to_ascii_lowercase()),
            "contextId": context,
            "taskId": id,
            "role": "ROLE_AGENT",
            "parts": parts,
        });
    }
    if let Some(at) = timestamp(session) {
        status["timestamp"] = json!(at);
    }
    status
}

/// The validated output of a Session that succeeded, as an artifact: a JSON output as data,
/// anything else as text.
pub fn artifact(session: &Session) -> Option<Value> {
    if state(session) != TaskState::Completed {
        return None;
    }
    let output = session.status.as_ref()?.output.as_deref()?;
    let part = match serde_json::from_str::<Value>(output) {
        Ok(value @ Value::Object(_)) => json!({"data": value}),
        _ => json!({"text": output}),
    };
    Some(json!({"artifactId": "output", "name": "output", "parts": [part]}))
}

/// A Session as a task (pure).
pub fn task(session: &Session) -> Value {
    let (id, context) = ids(session);
    let mut task = json!({"id": id, "contextId": context, "status": task_status(session)});
    if let Some(artifact) = artifact(session) {
        task["artifacts"] = json!([artifact]);
    }
    if let Some(run) = session.status.as_ref().and_then(|s| s.run_id.as_deref()) {
        task["metadata"] = json!({"contextos.dev/run": run});
    }
    task
}

/// A stream event telling the task's new status.
pub fn status_event(session: &Session) -> Value {
    let (id, context) = ids(session);
    json!({"statusUpdate": {"taskId": id, "contextId": context, "status": task_status(session)}})
}

/// A stream event handing over the task's output, if it has one.
pub fn artifact_event(session: &Session) -> Option<Value> {
    let (id, context) = ids(session);
    artifact(session).map(|artifact| {
        json!({"artifactUpdate": {"taskId": id, "contextId": context, "artifact": artifact, "lastChunk": true}})
    })
}

/// What a watcher of the task would see change (pure): a new event is sent only when this does.
pub fn visible(session: &Session) -> Value {
    task_status(session)
}

/// The most an Agent may do on a caller's behalf: the highest risk among its tools — or, while
/// a changed spec waits for promotion or for the operator (its runs still use the promoted
/// revision, whose tools the live spec may no longer show), or when it uses skills (whose
/// tools the Agent object does not show), the highest there is.
pub fn risk_ceiling(agent: &Agent) -> ToolRisk {
    let status = agent.status.as_ref();
    let revisions = status.and_then(|s| s.revisions.as_ref());
    // Not yet looked at by the operator: whether it waits for promotion is not known yet.
    let unseen = status.and_then(|s| s.observed_generation) != agent.metadata.generation;
    let pending = unseen
        || revisions.is_some_and(|r| r.candidate.is_some() && r.candidate != r.promoted)
        || !agent.spec.skill_refs.is_empty();
    let highest = ToolRisk::ALL[ToolRisk::ALL.len() - 1];
    if pending {
        return highest;
    }
    agent
        .spec
        .tools
        .iter()
        .map(|t| t.risk)
        .max()
        .unwrap_or(ToolRisk::ReadOnly)
}

/// The agent card of an exposed Agent (pure), its endpoint at `endpoint`; `None` when the
/// Agent is not exposed over A2A.
pub fn card(agent: &Agent, endpoint: &str) -> Option<Value> {
    let exposed = agent.spec.a2a.as_ref()?;
    let skills: Vec<Value> = exposed
        .skills
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "description": s.description,
                "tags": s.tags,
                "examples": s.examples,
                "inputModes": ["text/plain", "application/json"],
                "outputModes": ["text/plain", "application/json"],
            })
        })
        .collect();
    Some(json!({
        "name": agent.metadata.name.as_deref().unwrap_or_default(),
        "description": exposed.description,
        "version": agent.metadata.generation.unwrap_or(1).to_string(),
        "supportedInterfaces": [{
            "url": endpoint,
            "protocolBinding": "JSONRPC",
            "protocolVersion": PROTOCOL_VERSION,
        }],
        "capabilities": {
            "streaming": true,
            "pushNotifications": false,
            "extensions": [{
                "uri": RISK_CEILING_EXTENSION,
                "description": "the most this agent may do on a caller's behalf, as a ContextOS risk",
                "params": {"maxRisk": risk_ceiling(agent).as_str()},
            }],
        },
        "securitySchemes": {
            "kubernetes": {"httpAuthSecurityScheme": {
                "scheme": "Bearer",
                                "description": "a Kubernetes token of the caller for audience contextos-a2a (kubectl create token <account> --audience contextos-a2a); the caller needs RBAC verb invoke on this agent (agents.contextos.dev)",
            }},
        },
        "securityRequirements": [{"schemes": {"kubernetes": {"list": []}}}],
        "defaultInputModes": ["text/plain", "application/json"],
        "defaultOutputModes": ["text/plain", "application/json"],
        "skills": skills,
    }))
}

#[cfg(test)]
mod tests;
