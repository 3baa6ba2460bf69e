//! Prompt density: the tokens a multi-step run sends its model with read-only results shown by
//! alias (`spec.aliases`), next to the same run without aliases (the baseline), measured in
//! the same process — and whether the run decided the same.
//!
//! The scenario: an incident across three services. The agent reads each service's status and
//! searches the runbooks, round after round to confirm what it saw (the gateway answers those
//! repeats from its cache), then restarts the services whose status shows a high error rate
//! when the runbook says a restart helps, and answers. The model is a deterministic reader
//! served over the OpenAI chat-completions API by this process: it decides only from what
//! its request shows — a result it is shown by alias only, it reads again with
//! `contextos_deref` before deciding — so a run that hid something it needs would decide
//! differently, and one that shows too much costs more tokens. Tokens are counted with the
//! harness's tokenizer (o200k_base) over everything sent: messages, tool calls and tool schemas.
//!
//! Run: `cargo bench -p contextos-runner --bench prompt_density`. Target: ≥ 30 % fewer prompt
//! tokens than the baseline, with identical decisions.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::Query, routing::get, routing::post};
use contextos_crds::{agent::ReadAliases, common::ToolRisk};
use contextos_runner::{
    gateway::bundle::NamedPolicy,
    keys::KeyPair,
    manifests::ManifestSet,
    model::{Model, openai::OpenAiCompatible},
    records::{EntryBody, ScratchStore, TenantId, read_run},
    run::{Harness, RunOutcome, bundle::RunBundle},
};
use serde_json::{Value, json};

const SERVICES: [&str; 3] = ["checkout-api", "payments-api", "search-api"];
const RUNBOOK_QUERY: &str = "5xx after a deploy";

/// A service's status: a sizeable read, as a metrics endpoint answers.
fn status_of(service: &str) -> Value {
    let failing = service == "checkout-api";
    let recent: Vec<Value> = (0..8)
        .map(|i| {
            json!({"minute": format!("14:{:02}", 2 + i), "requests": 1200 + 17 * i,
                   "errors": if failing { 90 + 3 * i } else { i % 2 }, "p99Millis": if failing { 2300 - 40 * i } else { 180 + i }})
        })
        .collect();
    json!({
        "service": service,
        "state": if failing { "degraded" } else { "healthy" },
        "errorRate": if failing { 0.074 } else { 0.0004 },
        "lastDeploy": if failing { "14:02" } else { "09:30" },
        "replicas": {"desired": 6, "ready": if failing { 4 } else { 6 }},
        "recent": recent,
    })
}

fn runbooks() -> Value {
    let hits: Vec<Value> = (0..5)
        .map(|i| {
            json!({"id": format!("rb-{}", 17 + i), "title": format!("Elevated 5xx, case {i}"),
                   "snippet": if i == 0 {
                       "After a bad deploy the quickest mitigation is a rolling restart of the deployment; roll back if the error rate does not fall within ten minutes. Check saturation and the last deploy time first, and confirm the failing replicas before acting."
                   } else {
                       "Collect the error budget, compare the p99 latency with the last week, and page the owning team when the budget burns faster than two percent an hour; restarts rarely help here."
                   }})
        })
        .collect();
    json!({"query": RUNBOOK_QUERY, "hits": hits})
}

async fn tool_server() -> String {
    #[derive(serde::Deserialize)]
    struct Asked {
        service: Option<String>,
    }
    let app = Router::new()
        .route(
            "/status",
            get(|Query(asked): Query<Asked>| async move {
                Json(status_of(asked.service.as_deref().unwrap_or("")))
            }),
        )
        .route("/runbooks", get(|| async { Json(runbooks()) }))
        .route("/restart", post(|| async { Json(json!({"restarted": true})) }));
    serve(app).await
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// What the reader model was sent, turn by turn (prompt tokens), and what it decided.
#[derive(Default)]
struct Seen {
    /// Prompt tokens of each request, in order.
    prompt_tokens: Vec<u64>,
    derefs: u32,
}

/// Rounds of status reads the agent makes before it decides (it confirms what it saw).
const ROUNDS: usize = 3;

/// The reads the agent makes before it decides, in order: every status, then the runbooks,
/// round after round (the last round without the runbooks).
fn plan() -> Vec<(String, Value)> {
    let mut plan = Vec::new();
    for round in 0..ROUNDS {
        plan.extend(
            SERVICES
                .iter()
                .map(|s| ("service_status".to_owned(), json!({"service": s}))),
        );
        if round + 1 < ROUNDS {
            plan.push(("search_runbooks".to_owned(), json!({"query": RUNBOOK_QUERY})));
        }
    }
    plan
}

/// One read the request shows: which call, and its content when the request shows it.
struct Read {
    /// Position of its message in the request.
    index: usize,
    tool: String,
    arguments: Value,
    content: Option<String>,
    alias: Option<String>,
}

/// What a request shows of each result: content in full (plain, or `@alias = …`), a repeat
/// (`@alias: unchanged, as shown above`: the content of the alias shown earlier), or an alias
/// only (`…no longer shown…`: nothing until it is read again).
fn reads_in(messages: &[Value]) -> Vec<Read> {
    let mut calls: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut reads = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        for call in message["tool_calls"].as_array().into_iter().flatten() {
            let arguments = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}"))
                .unwrap_or(Value::Null);
            let tool = call["function"]["name"].as_str().unwrap_or("").to_owned();
            calls.insert(call["id"].as_str().unwrap_or("").to_owned(), (tool, arguments));
        }
        if message["role"] != "tool" {
            continue;
        }
        let Some((tool, arguments)) = calls.get(message["tool_call_id"].as_str().unwrap_or("")).cloned()
        else {
            continue;
        };
        let text = message["content"].as_str().unwrap_or("");
        let (alias, content) = if text.starts_with('@') {
            let (alias, rest) = text.split_once([' ', ':']).unwrap_or((text, ""));
            let content = if let Some(full) = text.strip_prefix(&format!("{alias} = ")) {
                shown.insert(alias.to_owned(), full.to_owned());
                Some(full.to_owned())
            } else if rest.contains("unchanged") {
                shown.get(alias).cloned()
            } else {
                None
            };
            (Some(alias.to_owned()), content)
        } else {
            (None, Some(text.to_owned()))
        };
        let (tool, arguments) = if tool == "contextos_deref" {
            // A dereference answers the question its alias was for.
            match reads.iter().rev().find(|r: &&Read| r.alias == alias) {
                Some(first) => (first.tool.clone(), first.arguments.clone()),
                None => continue,
            }
        } else {
            (tool, arguments)
        };
        reads.push(Read {
            index,
            tool,
            arguments,
            content,
            alias,
        });
    }
    reads
}

/// The reader's next turn, from what its request shows. Like a careful model it notes the
/// facts it will act on as it reads them (its own messages stay in the context): each
/// service's error rate and the runbook that recommends a restart. It makes the planned reads,
/// restarts the failing services when a runbook says a restart helps, and answers quoting
/// each restarted service's p99 latency at 14:05 — a detail it did not note, so it reads the
/// status again (`contextos_deref`) when its request shows that status by alias only.
fn next_turn(messages: &[Value], seen: &Mutex<Seen>) -> Value {
    let reads = reads_in(messages);
    let last_turn = messages.iter().rposition(|m| m["role"] == "assistant");
    let fresh: Vec<String> = reads
        .iter()
        .filter(|r| last_turn.is_none_or(|at| r.index > at))
        .filter_map(note_of)
        .collect();
    let notes: Vec<String> = messages
        .iter()
        .filter(|m| m["role"] == "assistant")
        .flat_map(|m| {
            m["content"]
                .as_str()
                .unwrap_or("")
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .chain(fresh.iter().cloned())
        .collect();
    let content = fresh.join("\n");
    let made: Vec<(String, Value)> = messages
        .iter()
        .flat_map(|m| m["tool_calls"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["function"]["name"] != "contextos_deref")
        .map(|c| {
            let arguments = serde_json::from_str(c["function"]["arguments"].as_str().unwrap_or("{}"))
                .unwrap_or(Value::Null);
            (c["function"]["name"].as_str().unwrap_or("").to_owned(), arguments)
        })
        .collect();
    if let Some((tool, arguments)) = plan().get(made.len()) {
        return calls(&content, &[(tool.as_str(), arguments.clone())]);
    }
    let failing: Vec<&str> = SERVICES
        .iter()
        .copied()
        .filter(|s| {
            notes
                .iter()
                .filter_map(|n| n.strip_prefix(&format!("noted: {s} error rate ")))
                .filter_map(|rate| rate.parse::<f64>().ok())
                .next_back()
                .is_some_and(|rate| rate > 0.05)
        })
        .collect();
    let runbook = notes
        .iter()
        .find_map(|n| n.strip_prefix("noted: restart recommended by runbook "))
        .map(str::to_owned);
    let restarted = made.iter().any(|(tool, _)| tool == "restart_deployment");
    if !restarted && runbook.is_some() && !failing.is_empty() {
        let restarts: Vec<(&str, Value)> = failing
            .iter()
            .map(|s| ("restart_deployment", json!({"service": s})))
            .collect();
        return calls(&content, &restarts);
    }
    // The detail for the answer, from the latest status of each failing service it is shown.
    let mut details = Vec::new();
    let mut hidden = Vec::new();
    for service in &failing {
        let latest = reads
            .iter()
            .rev()
            .find(|r| r.tool == "service_status" && r.arguments == json!({"service": service}));
        match latest.map(|r| (r.content.as_deref(), r.alias.clone())) {
            Some((Some(content), _)) => {
                let status: Value = serde_json::from_str(content).unwrap_or(Value::Null);
                let p99 = status["recent"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["minute"] == "14:05")
                    .map_or(Value::Null, |m| m["p99Millis"].clone());
                details.push(format!("{service} p99 {p99} ms at 14:05"));
            }
            Some((None, Some(alias))) => hidden.push(alias),
            _ => details.push(format!("{service}: no status")),
        }
    }
    if !hidden.is_empty() {
        if let Ok(mut seen) = seen.lock() {
            seen.derefs += hidden.len() as u32;
        }
        let derefs: Vec<(&str, Value)> = hidden
            .iter()
            .map(|alias| ("contextos_deref", json!({"alias": alias})))
            .collect();
        return calls(&content, &derefs);
    }
    let summary = json!({
        "summary": format!("restarted {} per runbook {}; {}", failing.join(", "), runbook.unwrap_or_default(), details.join("; ")),
        "actions": if restarted { vec!["restart_deployment"] } else { vec![] },
        "resolved": restarted,
    });
    answer(&summary.to_string())
}

/// What the reader notes of a result it is shown.
fn note_of(read: &Read) -> Option<String> {
    let content: Value = serde_json::from_str(read.content.as_deref()?).ok()?;
    match read.tool.as_str() {
        "service_status" => Some(format!(
            "noted: {} error rate {}",
            content["service"].as_str()?,
            content["errorRate"].as_f64()?
        )),
        "search_runbooks" => content["hits"]
            .as_array()?
            .iter()
            .find(|h| {
                h["snippet"]
                    .as_str()
                    .is_some_and(|s| s.contains("rolling restart"))
            })
            .map(|h| {
                format!(
                    "noted: restart recommended by runbook {}",
                    h["id"].as_str().unwrap_or("?")
                )
            }),
        _ => None,
    }
}

fn calls(content: &str, calls: &[(&str, Value)]) -> Value {
    let tool_calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, (tool, arguments))| {
            json!({"id": format!("call-{i}-{}", uuid_like(tool, arguments)), "type": "function",
                   "function": {"name": tool, "arguments": arguments.to_string()}})
        })
        .collect();
    json!({"role": "assistant", "content": content, "tool_calls": tool_calls})
}

fn uuid_like(tool: &str, arguments: &Value) -> String {
    let text = format!("{tool}{arguments}");
    format!(
        "{:x}",
        text.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
    )
}

fn answer(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// Tokens of everything a request sends: messages (with their tool calls) and tool schemas.
fn prompt_tokens(body: &Value) -> u64 {
    let bpe = contextos_runner::context::tokenizer();
    let mut tokens = 0;
    for message in body["messages"].as_array().into_iter().flatten() {
        tokens += bpe.count(message["content"].as_str().unwrap_or("")) as u64 + 4;
        if let Some(calls) = message.get("tool_calls") {
            tokens += bpe.count(&calls.to_string()) as u64;
        }
    }
    if let Some(tools) = body.get("tools") {
        tokens += bpe.count(&tools.to_string()) as u64;
    }
    tokens
}

async fn model_server(seen: Arc<Mutex<Seen>>) -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let seen = seen.clone();
            async move {
                let tokens = prompt_tokens(&body);
                let message = next_turn(body["messages"].as_array().map_or(&[][..], Vec::as_slice), &seen);
                if let Ok(mut seen) = seen.lock() {
                    seen.prompt_tokens.push(tokens);
                }
                Json(json!({
                    "choices": [{"message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": tokens, "completion_tokens": 20},
                }))
            }
        }),
    );
    format!("{}/v1", serve(app).await)
}

/// The quickstart's Session and pack with this scenario's tools, an allowing policy, and
/// `aliases`.
fn bundle(tools_url: &str, aliases: Option<ReadAliases>) -> RunBundle {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let mut bundle = ManifestSet::load(&[examples])
        .expect("quickstart")
        .bundle("bench", None)
        .expect("bundle");
    let agent = &mut bundle.agent_spec;
    agent.tools = serde_yaml::from_str(&format!(
        r#"
- {{name: service_status, description: "Error rate, latency and replicas of a service, minute by minute.", risk: read_only, kind: observe, idempotent: true, cache: {{ttlSeconds: 600}},
   adapter: {{http: {{url: "{tools_url}/status", method: GET}}}},
   inputSchema: {{type: object, required: [service], properties: {{service: {{type: string}}}}}}}}
- {{name: search_runbooks, description: "Full-text search over the team's runbooks.", risk: read_only, kind: observe, idempotent: true, cache: {{ttlSeconds: 600}},
   adapter: {{http: {{url: "{tools_url}/runbooks", method: GET}}}},
   inputSchema: {{type: object, required: [query], properties: {{query: {{type: string}}}}}}}}
- {{name: restart_deployment, description: "Rolling restart of a service's deployment.", risk: destructive, kind: act, idempotent: true,
   adapter: {{http: {{url: "{tools_url}/restart", method: POST}}}},
   inputSchema: {{type: object, required: [service], properties: {{service: {{type: string}}}}}}}}
"#
    ))
    .expect("tools");
    agent.discovery = None;
    agent.aliases = aliases;
    agent.budget.max_steps = 30;
    agent.budget.max_tool_calls = 30;
    agent.budget.max_tokens = 10_000_000;
    agent.validators.clear();
    bundle.session_spec.overrides = None;
    bundle.policies = vec![NamedPolicy {
        name: "bench".into(),
        spec: serde_yaml::from_str(
            "rules: [{name: all, match: {risks: [read_only, destructive]}, effect: allow, reason: the bench decides nothing}]",
        )
        .expect("policy"),
    }];
    bundle
}

/// What a run decided (every call but reads and dereferences, and its output), how many
/// turns it took, the prompt tokens sent, and the dereferences made.
struct Measured {
    decisions: (Vec<(String, Value)>, String),
    turns: usize,
    tokens: u64,
    first_turn: u64,
    derefs: u32,
}

async fn measure(tools_url: &str, aliases: Option<ReadAliases>, run: &str) -> Measured {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let model_url = model_server(seen.clone()).await;
    let bundle = bundle(tools_url, aliases);
    let key = KeyPair::from_seed([7; 32]);
    let gateway = bundle
        .gateway_bundle(Default::default())
        .build(key.public())
        .expect("gateway");
    let model = Model::OpenAi(OpenAiCompatible::new(&model_url, None, Duration::from_secs(30)));
    let store = ScratchStore::new();
    let tenant = TenantId::new(bundle.tenant.clone()).expect("tenant");
    let harness = Harness::new(&store, key, bundle, gateway, model).expect("harness");
    let report = harness
        .start(run, "4bf92f3577b34da6a3ce929d0e0e4736", &mut |_| {})
        .await
        .expect("run");
    let RunOutcome::Completed { output, .. } = report.outcome else {
        panic!("the run did not complete: {:?}", report.outcome);
    };
    // What acted: every call of a tool that is not read-only, as the record has it.
    let acted = read_run(&store, &tenant, run)
        .await
        .expect("the record")
        .into_iter()
        .filter_map(|(_, entry)| match entry.body {
            EntryBody::ToolCallRequested(call) if call.risk != ToolRisk::ReadOnly => {
                Some((call.tool, call.arguments))
            }
            _ => None,
        })
        .collect();
    let seen = seen.lock().expect("seen");
    Measured {
        decisions: (acted, output),
        turns: seen.prompt_tokens.len(),
        tokens: seen.prompt_tokens.iter().sum(),
        first_turn: seen.prompt_tokens.first().copied().unwrap_or(0),
        derefs: seen.derefs,
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let tools_url = tool_server().await;
        let baseline = measure(&tools_url, None, "baseline").await;
        let modes = [
            (
                "aliases (repeats by alias)",
                Some(ReadAliases { full_for_steps: None }),
            ),
            (
                "aliases, fullForSteps: 2",
                Some(ReadAliases {
                    full_for_steps: Some(2),
                }),
            ),
            (
                "aliases, fullForSteps: 1",
                Some(ReadAliases {
                    full_for_steps: Some(1),
                }),
            ),
        ];
        println!(
            "prompt density — {} reads ({} of them repeats) of {} services' status and a runbook, then a restart and the answer",
            plan().len(),
            plan().len() - SERVICES.len() - 1,
            SERVICES.len()
        );
        println!(
            "{:<30} {:>6} {:>14} {:>12} {:>8}  decisions",
            "mode", "turns", "prompt tokens", "vs baseline", "derefs"
        );
        println!(
            "{:<30} {:>6} {:>14} {:>12} {:>8}  (baseline)",
            "no aliases", baseline.turns, baseline.tokens, "—", baseline.derefs
        );
        for (label, aliases) in modes {
            let run = format!(
                "aliased-{}",
                aliases.as_ref().and_then(|a| a.full_for_steps).unwrap_or(0)
            );
            let measured = measure(&tools_url, aliases, &run).await;
            let change = 100.0 * (measured.tokens as f64 - baseline.tokens as f64) / baseline.tokens as f64;
            let same = if measured.decisions == baseline.decisions {
                "identical"
            } else {
                "DIFFERENT"
            };
            println!(
                "{label:<30} {:>6} {:>14} {:>11.1}% {:>8}  {same}",
                measured.turns, measured.tokens, change, measured.derefs
            );
        }
        println!(
            "the first request (the compiled context, the request and the tool schemas, sent again every turn): {} tokens",
            baseline.first_turn
        );
        println!("decisions: {:?}", baseline.decisions);
    });
}
