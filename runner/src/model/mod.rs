//! Model providers: the one interface the decision loop asks for a turn, and its backends —
//! any OpenAI-compatible chat-completions endpoint, a scripted model for demos and tests, and
//! the replay model that serves a recorded run's turns.

pub mod charged;
pub mod metered;
pub mod openai;
pub mod replay;
pub mod routing;
pub mod scripted;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who said a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message of the conversation sent to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Tool calls the assistant made in this message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallRequest>,
    /// For `tool` messages: the call this result answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `tool` messages with a read-only result an Agent shows by alias: its alias (see
    /// `run::aliases`). The model is sent the rendered form, never this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<crate::run::aliases::ReadAlias>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            read: None,
        }
    }
}

/// A tool the model may call, as the model sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: Value,
}

/// A tool call the model asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRequest {
    pub id: String,
    pub tool: String,
    pub arguments: Value,
}

/// What the loop asks the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_output_tokens: Option<u32>,
}

/// One answer of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelTurn {
    pub content: String,
    #[serde(default)]
    pub tool_calls: Vec<ToolCallRequest>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those the endpoint served from its cache (priced apart).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub cached_prompt_tokens: u64,
    /// Calls the model asked for past the budget's per-turn cap: dropped, never decided.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_tool_calls: u32,
    /// Which of the Agent's models answered, and why (an Agent with `routing` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<routing::Route>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

impl ModelTurn {
    /// The turn's usage as it is charged: a model that reports none is charged an estimate
    /// (≈ 4 bytes a token), never nothing, and one that reports less than half the estimate (8
    /// bytes a token and more: no real tokenizer) is charged half of it — an endpoint cannot
    /// make its turns cheap by saying so. Cached tokens are at most the prompt's, and
    /// completion tokens at most what the request allowed.
    pub fn accounted(mut self, request: &ModelRequest) -> Self {
        let written: usize = self.content.len()
            + self
                .tool_calls
                .iter()
                .map(|c| c.tool.len() + c.arguments.to_string().len())
                .sum::<usize>();
        let (prompt, completion) = (estimated_tokens(request), (written as u64).div_ceil(4));
        if self.prompt_tokens == 0 && self.completion_tokens == 0 {
            self.prompt_tokens = prompt;
            self.completion_tokens = completion;
        }
        self.prompt_tokens = self.prompt_tokens.max(prompt / 2);
        self.completion_tokens = self.completion_tokens.max(completion / 2);
        self.cached_prompt_tokens = self.cached_prompt_tokens.min(self.prompt_tokens);
        if let Some(most) = request.max_output_tokens {
            self.completion_tokens = self.completion_tokens.min(u64::from(most));
        }
        self
    }

    /// Keeps the first `cap` calls of the turn and counts the rest as dropped: a model (or
    /// whoever answers for it) cannot flood one step with calls.
    pub fn cap_tool_calls(&mut self, cap: u32) {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        if self.tool_calls.len() > cap {
            let dropped = self.tool_calls.len() - cap;
            self.tool_calls.truncate(cap);
            self.dropped_tool_calls = self
                .dropped_tool_calls
                .saturating_add(u32::try_from(dropped).unwrap_or(u32::MAX));
        }
    }
}

/// Why a model turn could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model endpoint {endpoint} cannot be reached: {detail}")]
    Unreachable { endpoint: String, detail: String },
    /// The request may have reached the endpoint, but no whole answer came back (a timeout while
    /// the model generates, a connection dropped mid-answer): it may have cost.
    #[error("model endpoint {endpoint} did not finish answering: {detail}")]
    Interrupted { endpoint: String, detail: String },
    #[error("model endpoint {endpoint} answered HTTP {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("model endpoint {endpoint} sent an answer that is not a chat completion: {detail}")]
    Malformed { endpoint: String, detail: String },
    #[error(
        "the model script {script} has no turn {turn} (it has {available}); add turns or lower the step budget"
    )]
    ScriptExhausted {
        script: String,
        turn: usize,
        available: usize,
    },
    #[error("the run's token budget is spent: {detail}")]
    TokenBudget { detail: String },
    /// A SpendQuota refused the turn (the message names it and its window).
    #[error("{detail}")]
    QuotaExceeded { detail: String },
    /// The gateway service refused to write the turn: the run, or its namespace, keeps as much
    /// in the record store as it may (the message says which bound).
    #[error("{detail}")]
    StoreQuotaExceeded { detail: String },
    #[error(
        "{spent} model tokens spent of a limit of {limit} shared by several runs; no more turns are asked for"
    )]
    SpendLimit { spent: u64, limit: u64 },
    #[error("the model script {script} is not valid: {detail}")]
    BadScript { script: String, detail: String },
    #[error(
        "run {run_id} recorded no model turn for step {step} (it recorded {recorded}); the replay went further than the original run"
    )]
    NotRecorded {
        run_id: String,
        step: u32,
        recorded: usize,
    },
    /// Replaying: the recorded run ended here because its model could not answer (its script
    /// ran out, its token budget or a quota was spent); the replay ends as it did.
    #[error("{message}")]
    RecordedEnd { reason: String, message: String },
}

/// A model of an Agent, as [`Model::for_spec`] builds one: whose it is, the field that says it
/// (for errors), its spec, and its script if it is scripted.
#[derive(Clone, Copy, Debug)]
pub struct Named<'a> {
    pub agent: &'a str,
    pub field: &'a str,
    pub spec: &'a contextos_crds::agent::ModelSpec,
    pub script: Option<&'a str>,
}

impl ModelError {
    /// Whether the request may have been worked on although no usable answer came back (cut
    /// off, or answered unreadably): a provider may charge for it.
    pub fn may_have_cost(&self) -> bool {
        matches!(self, Self::Interrupted { .. } | Self::Malformed { .. })
    }
}

/// The model a run asks.
#[derive(Clone, Debug)]
pub enum Model {
    OpenAi(openai::OpenAiCompatible),
    Scripted(scripted::ScriptedModel),
    Replay(replay::ReplayModel),
    /// Another model, its spend counted against a limit several runs share.
    Metered(Box<Model>, metered::Meter),
    /// Another model, its turns charged by someone else (a replay gate's, to the tenant's
    /// SpendQuotas).
    Charged(Box<Model>, charged::Charger),
}

/// How long one model endpoint is given to answer a turn.
pub const MODEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// What a request's prompt will cost, estimated before asking (≈ 4 bytes a token): a model
/// that reports no usage is charged this, never nothing.
pub fn estimated_tokens(request: &ModelRequest) -> u64 {
    prompt_bytes(request).div_ceil(4)
}

/// The most tokens `request`'s prompt can be: no tokenizer makes more tokens than bytes (what a
/// quota holds for a prompt, however the text tokenizes).
pub fn most_prompt_tokens(request: &ModelRequest) -> u64 {
    prompt_bytes(request)
}

/// Every byte of text the endpoint is sent counts — the runner writes all of it: the messages'
/// contents, their calls' ids, tools and arguments, the ids tool results answer, and the
/// tools' names, descriptions and schemas.
fn prompt_bytes(request: &ModelRequest) -> u64 {
    let message = |m: &Message| {
        m.content.len()
            + m.tool_call_id.as_ref().map_or(0, String::len)
            + m.tool_calls
                .iter()
                .map(|c| c.id.len() + c.tool.len() + c.arguments.to_string().len())
                .sum::<usize>()
    };
    let tool = |t: &ToolSpec| t.name.len() + t.description.len() + t.parameters.to_string().len();
    let bytes =
        request.messages.iter().map(message).sum::<usize>() + request.tools.iter().map(tool).sum::<usize>();
    bytes as u64
}

impl Model {
    /// The model `bundle`'s Agent names, with its API key from `secrets` (`<secret>/<key>` →
    /// value); errors name the field to fix.
    pub fn for_bundle(
        bundle: &crate::run::bundle::RunBundle,
        secrets: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let named = Named {
            agent: &bundle.agent,
            field: "spec.model",
            spec: &bundle.agent_spec.model,
            script: bundle.model_script.as_deref(),
        };
        Self::for_spec(&named, secrets)
    }

    /// The model `named` says, with its API key from `secrets` (`<secret>/<key>` → value).
    pub fn for_spec(
        named: &Named<'_>,
        secrets: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        use contextos_crds::agent::ModelProvider;
        let Named {
            agent, field, spec, ..
        } = named;
        match spec.provider {
            ModelProvider::Scripted => {
                let script = named
                    .script
                    .ok_or_else(|| format!("agent {agent}: {field}.scriptRef was not resolved"))?;
                scripted::ScriptedModel::parse(&spec.model, script)
                    .map(Self::Scripted)
                    .map_err(|e| e.to_string())
            }
            ModelProvider::OpenaiCompatible => {
                let endpoint = spec
                    .endpoint
                    .as_deref()
                    .ok_or_else(|| format!("agent {agent}: {field}.endpoint is required"))?;
                let api_key =
                    match &spec.secret_ref {
                        Some(key) => {
                            let id = format!("{}/{}", key.name, key.key);
                            Some(secrets.get(&id).cloned().ok_or_else(|| {
                                format!("agent {agent}: {field}.secretRef needs secret {id}")
                            })?)
                        }
                        None => None,
                    };
                let timeout = MODEL_TIMEOUT;
                Ok(Self::OpenAi(openai::OpenAiCompatible::new(
                    endpoint, api_key, timeout,
                )))
            }
        }
    }

    /// One turn for `request`, the `step`-th of the run (1-based).
    pub async fn complete(&self, request: &ModelRequest, step: u32) -> Result<ModelTurn, ModelError> {
        let turn = match self {
            Self::OpenAi(model) => model.complete(request).await?,
            Self::Scripted(model) => model.complete(request)?,
            // A recorded turn is what was recorded.
            Self::Replay(model) => return model.complete(step),
            Self::Metered(inner, meter) => return meter.complete(inner, request, step).await,
            Self::Charged(inner, charger) => return charger.0.complete(inner, request, step).await,
        };
        Ok(turn.accounted(request))
    }
}

#[cfg(test)]
mod prompt_size {
    use super::*;

    /// Text hidden in the fields beside a message's content — a call's id, the id a result
    /// answers, a tool's name — is sent to the model and billed: it counts.
    #[test]
    fn every_string_sent_counts_toward_the_prompt() {
        let padded = "x".repeat(1 << 20);
        let request = |message: Message| ModelRequest {
            model: "m".into(),
            messages: vec![message],
            tools: Vec::new(),
            max_output_tokens: None,
        };
        let answer = Message {
            role: Role::Tool,
            content: String::new(),
            tool_calls: Vec::new(),
            tool_call_id: Some(padded.clone()),
            read: None,
        };
        assert!(estimated_tokens(&request(answer)) >= 250_000);
        let call = Message {
            role: Role::Assistant,
            content: String::new(),
            tool_calls: vec![ToolCallRequest {
                id: padded.clone(),
                tool: padded.clone(),
                arguments: serde_json::json!({}),
            }],
            tool_call_id: None,
            read: None,
        };
        assert!(most_prompt_tokens(&request(call)) >= 2 << 20);
    }
}
