//! Another agent as a tool, over A2A (protocol 1.x, JSON-RPC binding).
//!
//! A call reads the remote agent's card (`<url>/.well-known/agent-card.json`, kept for a
//! minute), checks what the Agent declared against it (the skill is listed; the remote's own
//! risk ceiling, when its card declares one, is not above the declared `riskCeiling`; the
//! JSON-RPC endpoint is on the adapter's own origin, so a card cannot send calls elsewhere),
//! then sends the arguments as one message: streamed (`SendStreamingMessage`) when the card
//! says the agent streams, otherwise `SendMessage` (answered as soon as the task exists)
//! followed by `GetTask` until the task ends.
//! A task still running when the tool's timeout passes is cancelled (`CancelTask`). A task
//! that stops to ask for input is handed back as a [`RemoteQuestion`]: the gateway records it
//! and the Session waits for a person, whose answer continues the same task.
//!
//! The remote agent is not trusted: every body and every stream is bounded in bytes while it
//! is read (`maxResponseBytes`), the card in its own bound, and what it says (ids, the question)
//! is cut to a size a person can read. Every request carries `A2A-Version`, `traceparent` and
//! `Idempotency-Key`; the message id is derived from the call's idempotency key, so a resent
//! call is the same message; the delegation (tenant, agent, run, user) rides in the message's
//! metadata under `contextos.dev/delegation`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use contextos_crds::{agent::A2aAdapter, common::ToolRisk};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    AdapterError, AdapterResponse, CallContext, Reply,
    http::{classify, read_bounded},
};

/// Where an agent publishes its card, below its base URL.
pub const CARD_PATH: &str = "/.well-known/agent-card.json";
/// The card extension in which an agent declares the most it may do on a caller's behalf
/// (`params.maxRisk`, a ContextOS risk name).
pub const RISK_CEILING_EXTENSION: &str = "https://contextos.dev/a2a/risk-ceiling/v1";
/// The protocol version every request names.
pub const PROTOCOL_VERSION: &str = "1.0";
/// Metadata key of the delegation a message carries.
pub const DELEGATION_KEY: &str = "contextos.dev/delegation";

const CARD_MAX_BYTES: usize = 256 * 1024;
const CARD_TTL: Duration = Duration::from_secs(60);
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest remote id (task, context) accepted.
const ID_MAX_CHARS: usize = 256;
/// Longest question shown to a person, in bytes; the rest is cut. It travels in the runner's
/// report inside a signed reason, which cannot be shortened later, so it stays well within a
/// termination message whatever it is made of.
pub const QUESTION_MAX_BYTES: usize = 300;
const FIRST_POLL: Duration = Duration::from_millis(100);
const LONGEST_POLL: Duration = Duration::from_secs(2);

/// What a call sends: a task's first message, or a person's answer to the question a task
/// stopped on.
#[derive(Clone, Copy, Debug)]
pub enum Turn<'a> {
    First,
    Answer {
        task: &'a RemoteTask,
        /// The answer.
        text: &'a str,
        /// The question it answers, as recorded.
        asked: &'a RemoteQuestion,
        /// Which question of the call this answers (1 for the first), for the message id.
        question: u32,
        /// The answer may have been sent before (a resumed call): look at the task first, and
        /// send the answer only if the task still waits on this very question.
        resent: bool,
    },
}

/// A remote task, as its agent named it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteTask {
    pub task_id: String,
    pub context_id: String,
}

/// A remote task stopped to ask for input (`TASK_STATE_INPUT_REQUIRED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteQuestion {
    pub task: RemoteTask,
    /// What it asks, as one line of text (see [`question_text`]).
    pub text: String,
    /// The id of the status message that asked it, when the agent gave one: what tells this
    /// question from the same words asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// What a question says when its agent says nothing.
const SAYS_NOTHING: &str = "(the remote agent asks for input but says nothing about it)";

/// The A2A side of a gateway: one HTTP client (the gateway's, egress-guarded in the service)
/// and the cards it read.
#[derive(Debug)]
pub struct A2aClient {
    http: reqwest::Client,
    cards: Mutex<HashMap<String, (Instant, Arc<Card>)>>,
}

impl A2aClient {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            cards: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one turn of a call to the agent at `adapter.url` (already rewritten by any
    /// endpoint override; `rewrite` applies the same override to the endpoint the card names)
    /// and follows its task until it ends, asks, `ctx.timeout` passes or `until` resolves (the
    /// run's Session ended). Once the task exists, a call that fails or is stopped for any
    /// reason cancels it: a failed call must not act later.
    pub async fn call(
        &self,
        adapter: &A2aAdapter,
        rewrite: &(dyn Fn(&str) -> String + Sync),
        args: &Value,
        ctx: &CallContext,
        turn: Turn<'_>,
        until: Option<crate::gateway::session_watch::Ends>,
    ) -> Result<Reply, AdapterError> {
        let deadline = Instant::now() + ctx.timeout;
        let card = self.card(&adapter.url, ctx).await?;
        let endpoint = card.check(adapter, rewrite)?;
        let rpc = Rpc {
            http: &self.http,
            endpoint: &endpoint,
            ctx,
            cap: ctx.max_response_bytes,
        };
        let mut progress = Progress::for_turn(turn);
        let following = rpc.follow(
            &card,
            args,
            adapter.skill.as_deref(),
            turn,
            deadline,
            &mut progress,
        );
        let sent = match until {
            None => following.await,
            Some(ended) => tokio::select! {
                sent = following => sent,
                why = ended => Err(AdapterError::Stopped(why.to_string())),
            },
        };
        match (sent, &progress.task_id) {
            (Err(error), Some(task)) => {
                let cancelled = self.cancel_task(&endpoint, task, ctx).await;
                let now = if cancelled {
                    "was cancelled"
                } else {
                    "was asked to cancel"
                };
                // Its task is gone (or going): sending the turn again would meet a cancelled
                // task, or start a second one.
                Err(match error {
                    AdapterError::Stopped(why) => {
                        AdapterError::Stopped(format!("{why}; its task {task} {now}"))
                    }
                    error if error.is_retryable() => {
                        AdapterError::ToolFailed(format!("{error}; its task {task} {now}"))
                    }
                    error => error,
                })
            }
            (Err(AdapterError::Stopped(why)), None) => Err(AdapterError::Stopped(format!(
                "{why}; the call was stopped before the remote agent named its task, so a task it made may still run"
            ))),
            (sent, _) => sent,
        }
    }

    /// Asks the agent at `adapter.url` to cancel `task` (a person declined its question).
    /// Whether it did is the answer: `false` when it could not be asked or said no.
    pub async fn cancel(
        &self,
        adapter: &A2aAdapter,
        rewrite: &(dyn Fn(&str) -> String + Sync),
        task: &RemoteTask,
        ctx: &CallContext,
    ) -> bool {
        let Ok(card) = self.card(&adapter.url, ctx).await else {
            return false;
        };
        let Ok(endpoint) = card.check(adapter, rewrite) else {
            return false;
        };
        self.cancel_task(&endpoint, &task.task_id, ctx).await
    }

    async fn cancel_task(&self, endpoint: &str, task: &str, ctx: &CallContext) -> bool {
        let rpc = Rpc {
            http: &self.http,
            endpoint,
            ctx,
            cap: 64 * 1024,
        };
        let deadline = Instant::now() + CANCEL_TIMEOUT;
        rpc.send("CancelTask", &json!({"id": task}), None, deadline)
            .await
            .is_ok()
    }

    /// The card of the agent at `base`, read at most once a minute.
    async fn card(&self, base: &str, ctx: &CallContext) -> Result<Arc<Card>, AdapterError> {
        let base = base.trim_end_matches('/');
        if let Ok(cards) = self.cards.lock()
            && let Some((at, card)) = cards.get(base)
            && at.elapsed() < CARD_TTL
        {
            return Ok(card.clone());
        }
        let url = format!("{base}{CARD_PATH}");
        let response = self
            .http
            .get(&url)
            .timeout(ctx.timeout.min(Duration::from_secs(10)))
            .header("a2a-version", PROTOCOL_VERSION)
            .header("traceparent", &ctx.traceparent)
            .send()
            .await
            .map_err(|e| classify(base, ctx, &e))?;
        let status = response.status().as_u16();
        let bytes = read_bounded(response, CARD_MAX_BYTES, base, ctx)
            .await?
            .ok_or_else(|| {
                AdapterError::Protocol(format!(
                    "the agent card at {url} is larger than {CARD_MAX_BYTES} bytes"
                ))
            })?;
        if !(200..300).contains(&status) {
            return Err(AdapterError::Status {
                status,
                body: excerpt(&bytes),
            });
        }
        let card: Card = serde_json::from_slice::<CardJson>(&bytes)
            .map_err(|e| {
                AdapterError::Protocol(format!("the agent card at {url} is not an A2A agent card: {e}"))
            })?
            .into_card(base);
        let card = Arc::new(card);
        if let Ok(mut cards) = self.cards.lock() {
            if cards.len() >= 256 {
                cards.clear();
            }
            cards.insert(base.to_owned(), (Instant::now(), card.clone()));
        }
        Ok(card)
    }
}

/// What a call needs of an agent card.
#[derive(Clone, Debug, PartialEq)]
pub struct Card {
    pub name: String,
    /// The JSON-RPC endpoint of protocol 1.x, if the card offers one.
    pub jsonrpc: Option<String>,
    /// The interfaces it offers, as `binding version` (for the refusal when none fits).
    pub offered: Vec<String>,
    pub streaming: bool,
    pub skills: Vec<String>,
    /// The most it says it may do on a caller's behalf ([`RISK_CEILING_EXTENSION`]).
    pub risk_ceiling: Option<ToolRisk>,
    /// The card named a risk ceiling this release does not know.
    pub unknown_ceiling: Option<String>,
    base: String,
}

impl Card {
    /// The endpoint to call, once what the Agent declared holds against the card (pure):
    /// `rewrite` is the endpoint override the adapter's URL went through.
    pub fn check(
        &self,
        adapter: &A2aAdapter,
        rewrite: &dyn Fn(&str) -> String,
    ) -> Result<String, AdapterError> {
        let Some(endpoint) = &self.jsonrpc else {
            return Err(AdapterError::Refused(format!(
                "the agent at {} offers no JSON-RPC interface of A2A 1.x (it offers: {})",
                self.base,
                if self.offered.is_empty() {
                    "nothing".to_owned()
                } else {
                    self.offered.join(", ")
                }
            )));
        };
        let endpoint = rewrite(endpoint);
        if !within(&endpoint, &self.base) {
            return Err(AdapterError::Refused(format!(
                "the agent card at {} sends calls to {endpoint}, which is not below the adapter's URL (same scheme, host, port and path); only the URL the Agent names is reached",
                self.base
            )));
        }
        if let Some(skill) = &adapter.skill
            && !self.skills.iter().any(|s| s == skill)
        {
            return Err(AdapterError::Refused(format!(
                "agent {} ({}) has no skill {skill}; its card lists: {}",
                self.name,
                self.base,
                self.skills.join(", ")
            )));
        }
        if let Some(unknown) = &self.unknown_ceiling {
            return Err(AdapterError::Refused(format!(
                "agent {} declares risk ceiling {unknown:?}, which is not a ContextOS risk; it cannot be checked against riskCeiling {}",
                self.name,
                adapter.risk_ceiling.as_str()
            )));
        }
        if let Some(ceiling) = self.risk_ceiling
            && ceiling > adapter.risk_ceiling
        {
            return Err(AdapterError::Refused(format!(
                "agent {} declares it may act up to risk {}, above the riskCeiling {} its tool declares: raise the tool's riskCeiling and risk (and review its policies) or call another agent",
                self.name,
                ceiling.as_str(),
                adapter.risk_ceiling.as_str()
            )));
        }
        Ok(endpoint)
    }
}

/// An agent card as published (only the fields a call reads; everything else is ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardJson {
    #[serde(default)]
    name: String,
    #[serde(default)]
    supported_interfaces: Vec<InterfaceJson>,
    #[serde(default)]
    capabilities: CapabilitiesJson,
    #[serde(default)]
    skills: Vec<SkillJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InterfaceJson {
    url: String,
    #[serde(default)]
    protocol_binding: String,
    #[serde(default)]
    protocol_version: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CapabilitiesJson {
    #[serde(default)]
    streaming: bool,
    #[serde(default)]
    extensions: Vec<ExtensionJson>,
}

#[derive(Deserialize)]
struct ExtensionJson {
    uri: String,
    #[serde(default)]
    params: Value,
}

#[derive(Deserialize)]
struct SkillJson {
    id: String,
}

impl CardJson {
    fn into_card(self, base: &str) -> Card {
        let fits = |i: &&InterfaceJson| {
            i.protocol_binding.eq_ignore_ascii_case("JSONRPC")
                && (i.protocol_version.is_empty() || i.protocol_version.split('.').next() == Some("1"))
        };
        let jsonrpc = self.supported_interfaces.iter().find(fits).map(|i| i.url.clone());
        let offered = self
            .supported_interfaces
            .iter()
            .take(8)
            .map(|i| {
                format!(
                    "{} {}",
                    cut(&i.protocol_binding, 32),
                    cut(&i.protocol_version, 16)
                )
            })
            .collect();
        let declared = self
            .capabilities
            .extensions
            .iter()
            .find(|e| e.uri == RISK_CEILING_EXTENSION)
            .map(|e| {
                e.params
                    .get("maxRisk")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            });
        let (risk_ceiling, unknown_ceiling) = match declared {
            None => (None, None),
            Some(name) => match ToolRisk::ALL.into_iter().find(|r| r.as_str() == name) {
                Some(risk) => (Some(risk), None),
                None => (None, Some(cut(&name, 64))),
            },
        };
        Card {
            name: cut(&self.name, 128),
            jsonrpc,
            offered,
            streaming: self.capabilities.streaming,
            skills: self
                .skills
                .into_iter()
                .take(256)
                .map(|s| cut(&s.id, 128))
                .collect(),
            risk_ceiling,
            unknown_ceiling,
            base: base.to_owned(),
        }
    }
}

/// Whether `endpoint` is on `base`'s scheme, host and port, at or below its path, with no
/// user info (pure).
fn within(endpoint: &str, base: &str) -> bool {
    let (Ok(endpoint), Ok(base)) = (reqwest::Url::parse(endpoint), reqwest::Url::parse(base)) else {
        return false;
    };
    let origin = |u: &reqwest::Url| {
        Some((
            u.scheme().to_owned(),
            u.host_str()?.to_ascii_lowercase(),
            u.port_or_known_default()?,
        ))
    };
    let path = base.path().trim_end_matches('/');
    let below = endpoint.path() == path || endpoint.path().starts_with(&format!("{path}/"));
    origin(&endpoint).is_some()
        && origin(&endpoint) == origin(&base)
        && endpoint.username().is_empty()
        && endpoint.password().is_none()
        && below
}

fn configuration(return_immediately: bool) -> Value {
    json!({
        "acceptedOutputModes": ["text/plain", "application/json"],
        "returnImmediately": return_immediately,
    })
}

/// The message a turn sends (pure). The arguments go as one `data` part; a string argument
/// `message` also goes first as a `text` part, for agents that read text only.
fn message(args: &Value, ctx: &CallContext, turn: Turn<'_>, skill: Option<&str>) -> Value {
    let mut metadata = serde_json::Map::new();
    if let Some(skill) = skill {
        metadata.insert("skill".into(), json!(skill));
    }
    if let Some(delegation) = &ctx.delegation {
        metadata.insert(DELEGATION_KEY.into(), json!(delegation));
    }
    match turn {
        Turn::First => {
            let mut parts = Vec::new();
            if let Some(text) = args.get("message").and_then(Value::as_str) {
                parts.push(json!({"text": text}));
            }
            parts.push(json!({"data": args}));
            json!({
                "messageId": message_id(ctx, turn),
                "role": "ROLE_USER",
                "parts": parts,
                "metadata": metadata,
            })
        }
        Turn::Answer { task, text, .. } => json!({
            "messageId": message_id(ctx, turn),
            "role": "ROLE_USER",
            "taskId": task.task_id,
            "contextId": task.context_id,
            "parts": [{"text": text}],
            "metadata": metadata,
        }),
    }
}

/// The id of a turn's message: the call's idempotency key for its first, and one per answer, so
/// a turn sent again is the same message.
fn message_id(ctx: &CallContext, turn: Turn<'_>) -> String {
    match turn {
        Turn::First => ctx.idempotency_key.clone(),
        Turn::Answer { question, .. } => format!("{}.a{question}", ctx.idempotency_key),
    }
}

/// One agent's JSON-RPC endpoint, for one call.
struct Rpc<'a> {
    http: &'a reqwest::Client,
    endpoint: &'a str,
    ctx: &'a CallContext,
    cap: usize,
}

impl Rpc<'_> {
    /// Sends `turn` (unless it is an answer the task already has) and follows the task until
    /// it ends or asks, folding what is heard into `progress`.
    async fn follow(
        &self,
        card: &Card,
        args: &Value,
        skill: Option<&str>,
        turn: Turn<'_>,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<Reply, AdapterError> {
        let mut send = true;
        if let Turn::Answer {
            task,
            asked,
            resent: true,
            ..
        } = turn
        {
            // Only a task still waiting on this question lacks the answer.
            let current = self
                .send("GetTask", &get_task(&task.task_id), None, deadline)
                .await?;
            progress.absorb(&json!({"task": current}))?;
            send = progress.state == Some(TaskState::InputRequired) && progress.shows(asked);
        }
        if send {
            let message = message(args, self.ctx, turn, skill);
            let id = message_id(self.ctx, turn);
            if card.streaming {
                let params = json!({"message": message, "configuration": configuration(false)});
                self.stream(&params, &id, deadline, progress).await?;
            } else {
                // Answered as soon as the task exists, so its id is known and it can be
                // cancelled when the timeout passes; then followed by polling.
                let params = json!({"message": message, "configuration": configuration(true)});
                let result = self.send("SendMessage", &params, Some(&id), deadline).await?;
                progress.absorb(&result)?;
            }
        }
        // Followed by polling when the answer came back before the task ended (a stream that
        // closed early, or an agent that answers at once).
        let mut pause = FIRST_POLL;
        loop {
            if let Some(reply) = progress.settled()? {
                return Ok(reply);
            }
            let Some(task) = progress.task_id.clone() else {
                return Err(AdapterError::Protocol(
                    "the remote agent answered with neither a finished task nor a message".into(),
                ));
            };
            if Instant::now() + pause >= deadline {
                return Err(AdapterError::Timeout(self.ctx.timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_POLL);
            let current = self.send("GetTask", &get_task(&task), None, deadline).await?;
            progress.absorb(&json!({"task": current}))?;
        }
    }

    fn request(
        &self,
        method: &str,
        params: &Value,
        key: Option<&str>,
        deadline: Instant,
    ) -> reqwest::RequestBuilder {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let mut request = self
            .http
            .post(self.endpoint)
            .timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
            .header("content-type", "application/json")
            .header("a2a-version", PROTOCOL_VERSION)
            .header("traceparent", &self.ctx.traceparent)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(token) = &self.ctx.bearer_token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// One request and its `result`, its answer bounded by the call's byte cap. `key` is the
    /// idempotency key of a request that sends a message.
    async fn send(
        &self,
        method: &str,
        params: &Value,
        key: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, AdapterError> {
        let response = self
            .request(method, params, key, deadline)
            .send()
            .await
            .map_err(|e| classify(self.endpoint, self.ctx, &e))?;
        let status = response.status().as_u16();
        let bytes = read_bounded(response, self.cap, self.endpoint, self.ctx)
            .await?
            .ok_or_else(|| self.too_large())?;
        if !(200..300).contains(&status) {
            return Err(AdapterError::Status {
                status,
                body: excerpt(&bytes),
            });
        }
        let reply: Value = serde_json::from_slice(&bytes)
            .map_err(|e| AdapterError::Protocol(format!("{method}: the answer is not JSON-RPC: {e}")))?;
        result_of(method, reply)
    }

    /// `SendStreamingMessage`, folding each event into `progress` until the task ends, asks,
    /// or the stream closes; the whole stream is bounded by the call's byte cap.
    async fn stream(
        &self,
        params: &Value,
        key: &str,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<(), AdapterError> {
        let mut response = self
            .request("SendStreamingMessage", params, Some(key), deadline)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| classify(self.endpoint, self.ctx, &e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = read_bounded(response, 4096, self.endpoint, self.ctx)
                .await?
                .unwrap_or_default();
            return Err(AdapterError::Status {
                status,
                body: excerpt(&bytes),
            });
        }
        let mut events = SseEvents::default();
        let mut budget = self.cap;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok(()),
                // A stream cut off after the task began: its id is known, so the task is
                // followed by polling (and cancelled if the timeout passes).
                Err(_) if progress.task_id.is_some() => return Ok(()),
                Err(e) => return Err(classify(self.endpoint, self.ctx, &e)),
            };
            if chunk.len() > budget {
                return Err(self.too_large());
            }
            budget -= chunk.len();
            for data in events.push(&chunk) {
                let reply: Value = serde_json::from_str(&data).map_err(|e| {
                    AdapterError::Protocol(format!("SendStreamingMessage: an event is not JSON-RPC: {e}"))
                })?;
                progress.absorb(&result_of("SendStreamingMessage", reply)?)?;
                if progress.settled()?.is_some() {
                    return Ok(());
                }
            }
        }
    }

    fn too_large(&self) -> AdapterError {
        AdapterError::Protocol(format!(
            "the remote agent's answer is larger than maxResponseBytes ({} bytes); it was not read further",
            self.cap
        ))
    }
}

/// `GetTask`'s parameters: the task with as little history as the agent will leave out (not
/// all agents read 0 as none).
fn get_task(task: &str) -> Value {
    json!({"id": task, "historyLength": 1})
}

/// The `result` of a JSON-RPC answer, or its error as the adapter's.
fn result_of(method: &str, mut reply: Value) -> Result<Value, AdapterError> {
    if let Some(error) = reply.get("error") {
        let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
        let text = error.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(AdapterError::ToolFailed(format!(
            "{method}: the remote agent answered error {code}: {}",
            cut(text, 512)
        )));
    }
    match reply.get_mut("result") {
        Some(result) => Ok(result.take()),
        None => Err(AdapterError::Protocol(format!(
            "{method}: the answer has neither result nor error"
        ))),
    }
}

/// Server-sent events, split as their bytes arrive: the `data` of each complete event.
/// Each byte is looked at once and the buffer shifted once per chunk, however the stream is
/// cut and however many events a chunk holds.
#[derive(Default)]
struct SseEvents {
    pending: Vec<u8>,
    /// How much of `pending` was looked at.
    scanned: usize,
}

impl SseEvents {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        for at in self.scanned..self.pending.len() {
            if self.pending[at] != b'\n' {
                continue;
            }
            // An event ends at a blank line: `\n\n` or `\r\n\r\n`.
            let event = &self.pending[start..=at];
            let end = if event.ends_with(b"\r\n\r\n") {
                Some(event.len() - 4)
            } else if event.ends_with(b"\n\n") {
                Some(event.len() - 2)
            } else {
                None
            };
            if let Some(end) = end {
                if let Some(data) = event_data(&event[..end]) {
                    out.push(data);
                }
                start = at + 1;
            }
        }
        self.scanned = self.pending.len() - start;
        self.pending.drain(..start);
        out
    }
}

/// The `data` lines of one event, joined; `None` for an event without any (a comment).
fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    (!data.is_empty()).then(|| data.join("\n"))
}

/// A task's state, protocol 1.x names (`TASK_STATE_COMPLETED`) or 0.x ones (`completed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskState {
    Running,
    Completed,
    Failed,
    Canceled,
    Rejected,
    InputRequired,
    AuthRequired,
}

impl TaskState {
    fn parse(name: &str) -> Option<Self> {
        let name = name
            .trim_start_matches("TASK_STATE_")
            .to_ascii_lowercase()
            .replace('_', "-");
        Some(match name.as_str() {
            "submitted" | "working" | "unspecified" | "unknown" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "canceled" | "cancelled" => Self::Canceled,
            "rejected" => Self::Rejected,
            "input-required" => Self::InputRequired,
            "auth-required" => Self::AuthRequired,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Running => "working",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Rejected => "rejected",
            Self::InputRequired => "input-required",
            Self::AuthRequired => "auth-required",
        }
    }
}

/// What is known of the call's task so far, from answers and stream events.
#[derive(Debug, Default)]
struct Progress {
    task_id: Option<String>,
    context_id: Option<String>,
    state: Option<TaskState>,
    /// The status message of the latest state (what a finished or asking task says).
    status_message: Option<Value>,
    /// Artifacts by id, in the order they first came.
    artifacts: Vec<(String, Value)>,
    /// A plain message answered instead of a task: the whole answer.
    message: Option<Value>,
    /// The question this turn answers: a task still showing it has not taken the answer in
    /// yet (a snapshot from before it), and is not asking again.
    answered: Option<RemoteQuestion>,
}

impl Progress {
    /// Whether the task waits for its own agent's people (an approver, a resolver), not for
    /// this caller: a ContextOS agent's status says so in a data part (see
    /// [`crate::gateway::a2a_server::wire::AWAITS_KEY`]).
    fn awaits_remote_approvers(&self) -> bool {
        self.status_message
            .as_ref()
            .and_then(|m| m.get("parts"))
            .and_then(Value::as_array)
            .is_some_and(|parts| {
                parts.iter().any(|p| {
                    p.get("data")
                        .and_then(|d| d.get(crate::gateway::a2a_server::wire::AWAITS_KEY))
                        .is_some_and(Value::is_string)
                })
            })
    }

    /// What is known before a turn is sent: for an answer, its task.
    fn for_turn(turn: Turn<'_>) -> Self {
        match turn {
            Turn::First => Self::default(),
            Turn::Answer { task, asked, .. } => Self {
                task_id: Some(task.task_id.clone()),
                context_id: Some(task.context_id.clone()).filter(|c| !c.is_empty()),
                answered: Some(asked.clone()),
                ..Self::default()
            },
        }
    }

    /// Whether the latest status is `question` still: the same status message when the agent
    /// names its messages, otherwise the same words.
    fn shows(&self, question: &RemoteQuestion) -> bool {
        match (self.status_message_id(), &question.message_id) {
            (Some(now), Some(then)) => now == *then,
            _ => {
                let said = self.said();
                said == question.text || (said.is_empty() && question.text == SAYS_NOTHING)
            }
        }
    }

    fn status_message_id(&self) -> Option<String> {
        let id = self.status_message.as_ref()?.get("messageId")?.as_str()?;
        Some(cut(id, ID_MAX_CHARS)).filter(|id| !id.is_empty())
    }

    /// What the latest status says, as a question would be recorded.
    fn said(&self) -> String {
        question_text(&self.status_text())
    }

    /// The text of the latest status message.
    fn status_text(&self) -> String {
        self.status_message
            .as_ref()
            .and_then(|m| m.get("parts"))
            .map(text_of)
            .unwrap_or_default()
    }

    /// Folds in one `result`: `{task}`, `{message}`, `{statusUpdate}` or `{artifactUpdate}`.
    fn absorb(&mut self, result: &Value) -> Result<(), AdapterError> {
        if let Some(task) = result.get("task") {
            self.ids(task.get("id"), task.get("contextId"))?;
            if let Some(status) = task.get("status") {
                self.status(status)?;
            }
            if let Some(artifacts) = task.get("artifacts").and_then(Value::as_array) {
                self.artifacts.clear();
                for artifact in artifacts {
                    self.artifact(artifact, false);
                }
            }
        } else if let Some(message) = result.get("message") {
            self.ids(message.get("taskId"), message.get("contextId"))?;
            if self.task_id.is_none() {
                self.message = Some(message.clone());
            }
        } else if let Some(update) = result.get("statusUpdate") {
            self.ids(update.get("taskId"), update.get("contextId"))?;
            if let Some(status) = update.get("status") {
                self.status(status)?;
            }
        } else if let Some(update) = result.get("artifactUpdate") {
            self.ids(update.get("taskId"), update.get("contextId"))?;
            if let Some(artifact) = update.get("artifact") {
                let append = update.get("append").and_then(Value::as_bool).unwrap_or(false);
                self.artifact(artifact, append);
            }
        } else {
            return Err(AdapterError::Protocol(
                "the remote agent answered with none of task, message, statusUpdate or artifactUpdate".into(),
            ));
        }
        Ok(())
    }

    fn ids(&mut self, task: Option<&Value>, context: Option<&Value>) -> Result<(), AdapterError> {
        if let Some(task) = task.and_then(Value::as_str).filter(|t| !t.is_empty()) {
            let task = checked_id("task", task)?;
            match &self.task_id {
                Some(known) if *known != task => {
                    return Err(AdapterError::Protocol(format!(
                        "the remote agent switched tasks mid-call ({known}, then {task})"
                    )));
                }
                _ => self.task_id = Some(task),
            }
        }
        if let Some(context) = context.and_then(Value::as_str).filter(|c| !c.is_empty()) {
            self.context_id = Some(checked_id("context", context)?);
        }
        Ok(())
    }

    fn status(&mut self, status: &Value) -> Result<(), AdapterError> {
        let name = status.get("state").and_then(Value::as_str).unwrap_or("");
        let state = TaskState::parse(name).ok_or_else(|| {
            AdapterError::Protocol(format!(
                "the remote task is in an unknown state {:?}",
                cut(name, 64)
            ))
        })?;
        self.state = Some(state);
        self.status_message = status.get("message").cloned();
        Ok(())
    }

    fn artifact(&mut self, artifact: &Value, append: bool) {
        let id = artifact
            .get("artifactId")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        match self.artifacts.iter_mut().find(|(known, _)| *known == id) {
            Some((_, known)) if append => {
                let more = artifact
                    .get("parts")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if let Some(parts) = known.get_mut("parts").and_then(Value::as_array_mut) {
                    parts.extend(more);
                }
            }
            Some((_, known)) => *known = artifact.clone(),
            None => self.artifacts.push((id, artifact.clone())),
        }
    }

    /// The call's reply once the task ended or asks; `None` while it runs.
    fn settled(&self) -> Result<Option<Reply>, AdapterError> {
        if let Some(message) = &self.message {
            let parts = message.get("parts").cloned().unwrap_or(Value::Array(Vec::new()));
            let body = json!({
                "contextId": self.context_id,
                "state": "completed",
                "text": text_of(&parts),
                "parts": parts,
            });
            return Ok(Some(Reply::Done(AdapterResponse {
                status: 200,
                body,
                truncated: false,
            })));
        }
        let (Some(state), Some(task)) = (self.state, &self.task_id) else {
            return Ok(None);
        };
        let said = self.status_text();
        match state {
            TaskState::Running => Ok(None),
            TaskState::InputRequired if self.answered.as_ref().is_some_and(|q| self.shows(q)) => Ok(None),
            // A ContextOS agent waiting for its own people asks nothing of this caller: the
            // task goes on once they decide (or the call's timeout cancels it).
            TaskState::InputRequired if self.awaits_remote_approvers() => Ok(None),
            TaskState::Completed => {
                let artifacts: Vec<Value> = self.artifacts.iter().map(|(_, a)| a.clone()).collect();
                let mut text: Vec<String> = artifacts
                    .iter()
                    .filter_map(|a| a.get("parts"))
                    .map(text_of)
                    .filter(|t| !t.is_empty())
                    .collect();
                if text.is_empty() && !said.is_empty() {
                    text.push(said);
                }
                let body = json!({
                    "taskId": task,
                    "contextId": self.context_id,
                    "state": state.name(),
                    "text": text.join("\n"),
                    "artifacts": artifacts,
                });
                Ok(Some(Reply::Done(AdapterResponse {
                    status: 200,
                    body,
                    truncated: false,
                })))
            }
            TaskState::InputRequired => Ok(Some(Reply::Asks(RemoteQuestion {
                task: RemoteTask {
                    task_id: task.clone(),
                    context_id: self.context_id.clone().unwrap_or_default(),
                },
                text: if said.is_empty() {
                    SAYS_NOTHING.into()
                } else {
                    question_text(&said)
                },
                message_id: self.status_message_id(),
            }))),
            TaskState::AuthRequired => Err(AdapterError::ToolFailed(format!(
                "remote task {task} asks for authentication the gateway cannot give{}",
                colon(&said)
            ))),
            TaskState::Failed | TaskState::Canceled | TaskState::Rejected => Err(AdapterError::ToolFailed(
                format!("remote task {task} ended {}{}", state.name(), colon(&said)),
            )),
        }
    }
}

fn colon(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        format!(": {}", cut(said, 512))
    }
}

/// The text parts of `parts`, joined by lines.
fn text_of(parts: &Value) -> String {
    parts
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A remote id, refused when it is long or holds control characters (it is shown to people
/// and written into records).
fn checked_id(what: &str, id: &str) -> Result<String, AdapterError> {
    if id.chars().count() > ID_MAX_CHARS || id.chars().any(|c| hidden(c) || c.is_whitespace()) {
        return Err(AdapterError::Protocol(format!(
            "the remote agent's {what} id is longer than {ID_MAX_CHARS} characters or holds control characters"
        )));
    }
    Ok(id.to_owned())
}

/// At most `max` characters of `text`, control and invisible formatting characters (which
/// could make it read as something else) dropped, newlines and tabs kept.
pub(crate) fn cut(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| !hidden(*c) || *c == '\n' || *c == '\t')
        .take(max)
        .collect()
}

/// A remote agent's question as a person is shown it: one line, nothing hidden, at most
/// [`QUESTION_MAX_BYTES`].
pub fn question_text(text: &str) -> String {
    let mut out = String::new();
    for c in text.trim().chars() {
        let c = if c.is_whitespace() { ' ' } else { c };
        if hidden(c) || (c == ' ' && out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > QUESTION_MAX_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// Control characters, and the invisible ones that change how text around them reads
/// (direction overrides, zero-width characters, soft hyphens).
fn hidden(c: char) -> bool {
    c.is_control() || crate::text::is_invisible(c)
}

fn excerpt(bytes: &[u8]) -> String {
    cut(&String::from_utf8_lossy(bytes), 512)
}

#[cfg(test)]
mod tests;
