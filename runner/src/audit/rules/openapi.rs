//! Rules comparing Agents' HTTP tools with the OpenAPI documents of the APIs they call
//! (`--openapi`): a tool whose method and path the document does not have, and a declared input
//! schema that differs from the operation's. They apply only when documents were read, to tools
//! whose URL is under a document's server.

use super::{Check, Sink, spec};
use crate::audit::{
    finding::{Rule, RuleId, Severity},
    harness::Harness,
    openapi::method_name,
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("openapi/undocumented-operation"),
            severity: Severity::Medium,
            title: "an HTTP tool calling an operation its API's document does not have",
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
];

fn undocumented_operations(harness: &Harness, sink: &mut Sink<'_>) {
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
