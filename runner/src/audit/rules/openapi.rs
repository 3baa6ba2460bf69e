//! Rules comparing Agents' HTTP and OpenAPI tools with the OpenAPI documents of the APIs they
//! call (`--openapi`): a tool whose operation the document does not have (or has in a form the
//! gateway refuses), a declared input schema that differs from the operation's, and an OpenAPI
//! tool declared below what its operation's method can do. They apply only when documents were
//! read: to HTTP tools whose URL is under a document's server, and to OpenAPI tools whose
//! `document` is the URL a document was read from.

use contextos_crds::agent::{AgentSpec, OpenApiAdapter, Tool};

use super::{Check, Sink, spec};
use crate::{
    audit::{
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
        openapi::{ApiDocument, method_name},
    },
    gateway::adapters::openapi::Binding,
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("openapi/undocumented-operation"),
            severity: Severity::Medium,
            title: "a tool calling an operation its API's document does not have, or has in a form the gateway cannot call",
            why: "the method or path is wrong (every call fails) or the API changed; either way the tool's declared risk was judged against an operation nobody documented",
            fix: "point the tool at a documented operation (`contextos tools import --openapi` writes one), or update the document",
        },
        undocumented_operations,
    ),
    (
        Rule {
            id: RuleId("openapi/schema-drift"),
            severity: Severity::Medium,
            title: "a declared input schema that differs from the API's document",
            why: "the gateway validates arguments against the declared schema; the API expects another shape, so calls fail or mean something else",
            fix: "update `inputSchema` from the document (`contextos tools import --openapi`)",
        },
        schema_drift,
    ),
    (
        Rule {
            id: RuleId("openapi/risk-below-method"),
            severity: Severity::High,
            title: "an OpenAPI tool declared below what its operation's method can do",
            why: "policies judge a call by its tool's declared risk; the gateway refuses every call of a tool declared below its method (only GET may be read_only, DELETE is destructive), so the tool never works, and the declaration misleads its reviewers",
            fix: "raise the tool's `risk` to the method's (and review the policies that match it), or bind it to another operation",
        },
        risk_below_method,
    ),
    (
        Rule {
            id: RuleId("openapi/document-changed"),
            severity: Severity::High,
            title: "an OpenAPI tool pinned to a document that has changed since",
            why: "the gateway reads the document at call time and refuses every call while it differs from `documentSha256`: the tool does not work, and what it calls now was never reviewed",
            fix: "review the document's changes, then import the tools again (`contextos tools import --openapi`, which pins the document read) or update `documentSha256`",
        },
        document_changed,
    ),
];

/// An OpenAPI tool of an Agent whose document was read, and its operation bound from that
/// document (or why it cannot be).
struct BoundTool<'h> {
    agent: &'h Object<AgentSpec>,
    /// Its index in `spec.tools`.
    index: usize,
    tool: &'h Tool,
    adapter: &'h OpenApiAdapter,
    api: &'h ApiDocument,
    binding: Result<Binding, String>,
}

fn bound_tools(harness: &Harness) -> impl Iterator<Item = BoundTool<'_>> {
    harness.agents.iter().flat_map(move |agent| {
        agent.spec.tools.iter().enumerate().flat_map(move |(i, tool)| {
            tool.adapter.openapi.iter().flat_map(move |adapter| {
                harness
                    .apis
                    .iter()
                    .filter(|api| api.source == adapter.document)
                    .map(move |api| {
                        let binding = Binding::new(
                            &api.source,
                            &api.content,
                            &adapter.operation_id,
                            adapter.server.as_deref(),
                        );
                        BoundTool {
                            agent,
                            index: i,
                            tool,
                            adapter,
                            api,
                            binding,
                        }
                    })
            })
        })
    })
}

fn risk_below_method(harness: &Harness, sink: &mut Sink<'_>) {
    for bound in bound_tools(harness) {
        let tool = bound.tool;
        if let Some(problem) = bound
            .binding
            .ok()
            .and_then(|b| b.risk_problem(&tool.name, tool.risk))
        {
            sink.report(
                bound.agent,
                spec(&["tools"]).index(bound.index).key("risk"),
                problem,
            );
        }
    }
}

fn document_changed(harness: &Harness, sink: &mut Sink<'_>) {
    for bound in bound_tools(harness) {
        if let Some(pinned) = &bound.adapter.document_sha256
            && !pinned.eq_ignore_ascii_case(&bound.api.sha256)
        {
            sink.report(
                bound.agent,
                spec(&["tools"])
                    .index(bound.index)
                    .key("adapter")
                    .key("openapi")
                    .key("documentSha256"),
                format!(
                    "{} is pinned to {} at {pinned}, which now reads as {}",
                    bound.tool.name, bound.api.source, bound.api.sha256
                ),
            );
        }
    }
}

fn undocumented_operations(harness: &Harness, sink: &mut Sink<'_>) {
    for bound in bound_tools(harness) {
        if let Err(why) = &bound.binding {
            sink.report(
                bound.agent,
                spec(&["tools"]).index(bound.index).key("adapter").key("openapi"),
                format!(
                    "{} cannot call its operation in {}: {why}",
                    bound.tool.name, bound.api.source
                ),
            );
        }
    }
    for agent in &harness.agents {
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            let Some(http) = &tool.adapter.http else { continue };
            for api in &harness.apis {
                if let Some(None) = api.find(&http.url, http.method) {
                    let documented: Vec<String> = api
                        .operations
                        .iter()
                        .filter(|op| http.url.ends_with(&op.path))
                        .map(|op| method_name(op.method).to_owned())
                        .collect();
                    let hint = if documented.is_empty() {
                        "no operation has that path".to_owned()
                    } else {
                        format!("that path is documented for {}", documented.join(", "))
                    };
                    sink.report(
                        agent,
                        spec(&["tools"]).index(i).key("adapter").key("http"),
                        format!(
                            "{} calls {} {}, which {} does not document ({hint})",
                            tool.name,
                            method_name(http.method),
                            http.url,
                            api.source
                        ),
                    );
                }
            }
        }
    }
}

fn schema_drift(harness: &Harness, sink: &mut Sink<'_>) {
    for bound in bound_tools(harness) {
        if let (Ok(binding), Some(declared)) = (&bound.binding, &bound.tool.input_schema)
            && binding.arguments_schema != *declared
        {
            sink.report(
                bound.agent,
                spec(&["tools"]).index(bound.index).key("inputSchema"),
                format!(
                    "{}'s inputSchema differs from the arguments operation {} of {} takes",
                    bound.tool.name, bound.adapter.operation_id, bound.api.source
                ),
            );
        }
    }
    for agent in &harness.agents {
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            let (Some(http), Some(declared)) = (&tool.adapter.http, &tool.input_schema) else {
                continue;
            };
            for api in &harness.apis {
                if let Some(Some(operation)) = api.find(&http.url, http.method)
                    && &operation.input_schema != declared
                {
                    sink.report(
                        agent,
                        spec(&["tools"]).index(i).key("inputSchema"),
                        format!(
                            "{}'s inputSchema differs from operation {} of {}",
                            tool.name, operation.id, api.source
                        ),
                    );
                }
            }
        }
    }
}
