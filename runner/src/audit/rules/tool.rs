//! Rules about an Agent's tools one by one: declared risk against what the adapter does, retries,
//! argument schemas, credentials on the wire, response and time caps, and code execution the
//! SandboxProfile does not allow.

use contextos_crds::{
    AgentSpec,
    agent::{Adapter, HttpMethod, Tool},
    common::ToolRisk,
};

use super::{Check, Sink, plain_http_off_cluster, spec};
use crate::{
    audit::{
        field::FieldPath,
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
    },
    gateway::CatalogTool,
    run::execution::{executes_code, execution_refused},
};

/// Responses above this are rarely what a model should read in one turn.
const LARGE_RESPONSE_BYTES: u32 = 4 * 1024 * 1024;
/// Calls that may take longer than this hold a run (and an approval slot) for minutes.
const LONG_TIMEOUT_SECONDS: u32 = 300;
/// A cached answer older than this is rarely what an incident needs.
const LONG_CACHE_SECONDS: u32 = 900;

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("tool/retry-not-idempotent"),
            severity: Severity::High,
            title: "a tool retried although a repeat is not harmless",
            why: "a retry after a timeout can perform the effect twice (two restarts, two payments); the API server refuses this combination",
            fix: "mark the tool `idempotent: true` if its server deduplicates by the idempotency key, or set `retry.maxAttempts: 1`",
        },
        retried_not_idempotent,
    ),
    (
        Rule {
            id: RuleId("tool/risk-contradicts-method"),
            severity: Severity::High,
            title: "a read_only tool bound to a PUT, PATCH or DELETE endpoint",
            why: "policies and the safety mode let read_only tools through; a mislabelled tool that changes state skips every approval",
            fix: "declare the risk the endpoint has (local_write, network or destructive)",
        },
        read_only_mutating_method,
    ),
    (
        Rule {
            id: RuleId("tool/read-only-post"),
            severity: Severity::Low,
            title: "a read_only tool bound to a POST endpoint",
            why: "POST usually changes state; a read-only POST (a search or a computation) is fine, but someone should have checked",
            fix: "confirm the endpoint changes nothing, or declare its real risk",
        },
        read_only_post,
    ),
    (
        Rule {
            id: RuleId("tool/secret-over-http"),
            severity: Severity::High,
            title: "a tool credential sent over plain HTTP outside the cluster",
            why: "the gateway sends the Secret as a bearer token; over plain HTTP anyone on the path can take it",
            fix: "use an `https://` URL",
        },
        secret_over_http,
    ),
    (
        Rule {
            id: RuleId("tool/no-input-schema"),
            severity: Severity::Medium,
            title: "a tool that acts without an input schema",
            why: "without `inputSchema` the gateway cannot refuse malformed or injected arguments before they reach the tool",
            fix: "declare `inputSchema` (JSON Schema) for the tool's arguments",
        },
        no_input_schema,
    ),
    (
        Rule {
            id: RuleId("tool/input-schema-invalid"),
            severity: Severity::High,
            title: "a tool input schema that is not a valid JSON Schema",
            why: "the Agent is Ready=False and its Sessions do not start",
            fix: "correct `inputSchema`",
        },
        invalid_input_schema,
    ),
    (
        Rule {
            id: RuleId("tool/large-response-cap"),
            severity: Severity::Low,
            title: "a tool whose responses may be very large",
            why: "above 4 MiB a response costs a turn's whole context and can carry injected instructions no one reads",
            fix: "lower `maxResponseBytes` to what the model needs",
        },
        large_response_cap,
    ),
    (
        Rule {
            id: RuleId("tool/long-timeout"),
            severity: Severity::Low,
            title: "a tool call allowed to take more than five minutes",
            why: "a hung tool holds the run; with retries the wait multiplies",
            fix: "lower `timeoutSeconds`; long work belongs in a job the tool starts and another tool polls",
        },
        long_timeout,
    ),
    (
        Rule {
            id: RuleId("tool/cache-long-ttl"),
            severity: Severity::Low,
            title: "a read-only tool's answers reused for more than 15 minutes",
            why: "the gateway forgets a cached answer when this Agent writes, a revision is promoted or a Secret rotates — not when anyone else changes what the tool reads; until the TTL passes the model reads an answer that may no longer hold",
            fix: "lower `cache.ttlSeconds` to how stale an answer may be",
        },
        long_cache,
    ),
    (
        Rule {
            id: RuleId("tool/code-not-allowed"),
            severity: Severity::High,
            title: "a tool that executes code its SandboxProfile does not allow",
            why: "the Agent is Ready=False (ExecutionNotAllowed): the profile decides which tools may run code in a capability pod",
            fix: "add the tool to the SandboxProfile's `execution.allowedTools` (and `maxRisk`), or serve it over `adapter.mcp.url`",
        },
        code_not_allowed,
    ),
];

/// Every tool of every Agent, with its path.
fn tools(harness: &Harness) -> impl Iterator<Item = (&Object<AgentSpec>, FieldPath, &Tool)> {
    harness.agents.iter().flat_map(|a| {
        a.spec
            .tools
            .iter()
            .enumerate()
            .map(move |(i, t)| (a, spec(&["tools"]).index(i), t))
    })
}

fn retried_not_idempotent(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        let attempts = tool.retry.as_ref().map_or(1, |r| r.max_attempts);
        if attempts > 1 && !tool.idempotent && tool.risk != ToolRisk::ReadOnly {
            sink.report(
                agent,
                field.key("retry").key("maxAttempts"),
                format!(
                    "{} ({}) is tried up to {attempts} times and is not idempotent",
                    tool.name,
                    tool.risk.as_str()
                ),
            );
        }
    }
}

fn http_method(tool: &Tool) -> Option<HttpMethod> {
    tool.adapter.http.as_ref().map(|h| h.method)
}

fn read_only_mutating_method(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        let mutating = matches!(
            http_method(tool),
            Some(HttpMethod::Put | HttpMethod::Patch | HttpMethod::Delete)
        );
        if tool.risk == ToolRisk::ReadOnly && mutating {
            sink.report(
                agent,
                field.key("risk"),
                format!(
                    "{} is declared read_only and calls {:?}",
                    tool.name,
                    http_method(tool).unwrap_or_default()
                ),
            );
        }
    }
}

fn read_only_post(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if tool.risk == ToolRisk::ReadOnly && http_method(tool) == Some(HttpMethod::Post) {
            sink.report(
                agent,
                field.key("risk"),
                format!("{} is declared read_only and calls POST", tool.name),
            );
        }
    }
}

fn secret_over_http(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if let Some((_, url)) = tool.adapter.bearer_secret()
            && plain_http_off_cluster(url)
        {
            let key = match tool.adapter.chosen() {
                Some(Adapter::OpenApi(api)) if api.server.is_some() => "server",
                Some(Adapter::OpenApi(_)) => "document",
                _ => "url",
            };
            let adapter = tool.adapter.chosen().map_or("http", Adapter::name);
            sink.report(
                agent,
                field.key("adapter").key(adapter).key(key),
                format!("{} sends its Secret to {url} unencrypted", tool.name),
            );
        }
    }
}

fn no_input_schema(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if tool.input_schema.is_none() && tool.risk >= ToolRisk::Network {
            sink.report(
                agent,
                field,
                format!("{} ({}) accepts any arguments", tool.name, tool.risk.as_str()),
            );
        }
    }
}

fn invalid_input_schema(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if tool.input_schema.is_some()
            && let Err(problem) = CatalogTool::new(tool.clone())
        {
            sink.report(agent, field.key("inputSchema"), problem);
        }
    }
}

fn large_response_cap(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if let Some(adapter) = tool.adapter.chosen()
            && let Some(cap) = adapter.max_response_bytes().filter(|c| *c > LARGE_RESPONSE_BYTES)
        {
            sink.report(
                agent,
                field.key("adapter").key(adapter.name()).key("maxResponseBytes"),
                format!("{} may return {cap} bytes", tool.name),
            );
        }
    }
}

fn long_timeout(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if tool.timeout_seconds > LONG_TIMEOUT_SECONDS {
            sink.report(
                agent,
                field.key("timeoutSeconds"),
                format!("{} may take {} s per attempt", tool.name, tool.timeout_seconds),
            );
        }
    }
}

fn long_cache(harness: &Harness, sink: &mut Sink<'_>) {
    for (agent, field, tool) in tools(harness) {
        if let Some(cache) = &tool.cache
            && cache.ttl_seconds > LONG_CACHE_SECONDS
        {
            sink.report(
                agent,
                field.key("cache").key("ttlSeconds"),
                format!("{}'s answers are reused for {} s", tool.name, cache.ttl_seconds),
            );
        }
    }
}

fn code_not_allowed(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let Some(sandbox) = harness.sandbox_of(agent) else {
            continue;
        };
        for (i, tool) in agent
            .spec
            .tools
            .iter()
            .enumerate()
            .filter(|(_, t)| executes_code(t))
        {
            if let Some(problem) = execution_refused(
                std::slice::from_ref(tool),
                &sandbox.spec.execution,
                &sandbox.id.name,
            ) {
                // The message names `spec.tools[0]` (the one tool checked); say which it is.
                sink.report(
                    agent,
                    spec(&["tools"]).index(i).key("adapter").key("mcp").key("command"),
                    problem.replacen("spec.tools[0]", &format!("spec.tools[{i}]"), 1),
                );
            }
        }
    }
}
