//! Rules comparing what live MCP servers list (`--mcp`, `--mcp-command`) with what Agents
//! declare for them: tools declared but gone, tools listed but not declared, input schemas that
//! drifted, and annotations that contradict the declared risk or idempotency. They apply only
//! when servers were read.

use contextos_crds::{AgentSpec, agent::Tool, common::ToolRisk};

use super::{Check, Sink, spec};
use crate::{
    audit::{
        field::FieldPath,
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
        live::ServerListing,
    },
    gateway::adapters::ServerTool,
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("live/missing-tool"),
            severity: Severity::High,
            title: "a declared MCP tool the server no longer lists",
            why: "every call of it fails (and is dead-lettered): the Agent plans with a tool that is gone",
            fix: "remove the tool, or point `adapter.mcp.tool` at the server's current name",
        },
        missing_tools,
    ),
    (
        Rule {
            id: RuleId("live/server-matches-no-tool"),
            severity: Severity::Medium,
            title: "a server given to the audit that no declared tool reaches",
            why: "nothing was compared: the URL or command differs from what the Agents declare (or no Agent uses the server), so a clean result means nothing",
            fix: "give --mcp/--mcp-command exactly as the Agents' `adapter.mcp.url` or `adapter.mcp.command` say",
        },
        servers_matching_nothing,
    ),
    (
        Rule {
            id: RuleId("live/undeclared-tool"),
            severity: Severity::Info,
            title: "a tool the server lists that no Agent declares",
            why: "nothing reaches it (the gateway only calls declared tools), but it may be what an Agent needs, or a new capability nobody reviewed",
            fix: "declare it (`contextos tools import`) with the risk it has, or leave it undeclared on purpose",
        },
        undeclared_tools,
    ),
    (
        Rule {
            id: RuleId("live/schema-drift"),
            severity: Severity::Medium,
            title: "a declared input schema that differs from the server's",
            why: "the gateway validates arguments against the declared schema; the server expects another shape, so calls fail or mean something else",
            fix: "update `inputSchema` from the server (`contextos tools import`)",
        },
        schema_drift,
    ),
    (
        Rule {
            id: RuleId("live/hints-contradict-risk"),
            severity: Severity::High,
            title: "a declared risk lower than the server's own annotations",
            why: "the server says the tool changes or destroys state; declared lower, policies and the safety mode let it through without the approval its real risk needs",
            fix: "declare the risk the server's annotations give (or confirm with its authors that they are wrong)",
        },
        hints_contradict_risk,
    ),
    (
        Rule {
            id: RuleId("live/hints-contradict-idempotency"),
            severity: Severity::Medium,
            title: "a tool declared idempotent that its server says is not",
            why: "an idempotent tool is retried and re-sent after a crash; this one may then act twice",
            fix: "declare `idempotent: false`, or confirm the server deduplicates by the idempotency key",
        },
        hints_contradict_idempotency,
    ),
];

/// A declared MCP tool on a server that was read, and the server's listing of it (`None`: the
/// server does not list it).
struct Declared<'a> {
    agent: &'a Object<AgentSpec>,
    field: FieldPath,
    tool: &'a Tool,
    server: &'a ServerListing,
    listed: Option<&'a ServerTool>,
}

/// Every declared MCP tool on a server that was read.
fn declared(harness: &Harness) -> impl Iterator<Item = Declared<'_>> {
    harness.agents.iter().flat_map(move |agent| {
        agent.spec.tools.iter().enumerate().filter_map(move |(i, tool)| {
            let mcp = tool.adapter.mcp.as_ref()?;
            let server = harness.live.iter().find(|s| s.serves(mcp))?;
            let name = mcp.tool.as_deref().unwrap_or(&tool.name);
            let listed = server.tools.iter().find(|t| t.name == name);
            Some(Declared {
                agent,
                field: spec(&["tools"]).index(i),
                tool,
                server,
                listed,
            })
        })
    })
}

fn missing_tools(harness: &Harness, sink: &mut Sink<'_>) {
    for d in declared(harness) {
        if d.listed.is_none() {
            let name = d
                .tool
                .adapter
                .mcp
                .as_ref()
                .and_then(|m| m.tool.as_deref())
                .unwrap_or(&d.tool.name);
            sink.report(
                d.agent,
                d.field,
                format!("{} lists no tool {name}", d.server.server()),
            );
        }
    }
}

fn servers_matching_nothing(harness: &Harness, sink: &mut Sink<'_>) {
    for server in &harness.live {
        let used = harness
            .agents
            .iter()
            .flat_map(|a| &a.spec.tools)
            .any(|t| t.adapter.mcp.as_ref().is_some_and(|m| server.serves(m)));
        if !used {
            let id = crate::audit::harness::ObjectRef {
                kind: "MCPServer".into(),
                namespace: None,
                name: server.server(),
            };
            let message = format!("no declared tool's adapter.mcp names {}", server.server());
            let unplaced = crate::audit::source::Document::unplaced(serde_json::Value::Null);
            sink.report_at(&id, &unplaced, FieldPath::root(), message);
        }
    }
}

fn undeclared_tools(harness: &Harness, sink: &mut Sink<'_>) {
    for server in &harness.live {
        // Reported on each Agent using the server (the findings need an object to stand on).
        for agent in &harness.agents {
            let on_server: Vec<&str> = agent
                .spec
                .tools
                .iter()
                .filter_map(|t| {
                    let mcp = t.adapter.mcp.as_ref()?;
                    server.serves(mcp).then(|| mcp.tool.as_deref().unwrap_or(&t.name))
                })
                .collect();
            if on_server.is_empty() {
                continue;
            }
            for listed in server
                .tools
                .iter()
                .filter(|t| !on_server.contains(&t.name.as_str()))
            {
                sink.report(
                    agent,
                    spec(&["tools"]),
                    format!(
                        "{} also lists {}, which Agent {} does not declare",
                        server.server(),
                        crate::text::for_terminal(&listed.name),
                        agent.id.name
                    ),
                );
            }
        }
    }
}

fn schema_drift(harness: &Harness, sink: &mut Sink<'_>) {
    for d in declared(harness) {
        let (Some(declared), Some(listed)) = (&d.tool.input_schema, d.listed) else {
            continue;
        };
        if declared != &listed.input_schema {
            let message = format!(
                "{}'s inputSchema differs from what {} lists",
                d.tool.name,
                d.server.server()
            );
            sink.report(d.agent, d.field.key("inputSchema"), message);
        }
    }
}

/// The lowest risk the server's hints allow, if they say anything.
fn hinted_floor(listed: &ServerTool) -> Option<(ToolRisk, &'static str)> {
    let hints = listed.hints;
    if hints.read_only == Some(true) {
        return None;
    }
    if hints.destructive == Some(true) {
        return Some((ToolRisk::Destructive, "destructiveHint: true"));
    }
    if hints.read_only == Some(false) {
        // MCP's defaults: destructive and open world unless the server says otherwise.
        if hints.destructive.is_none() {
            return Some((
                ToolRisk::Destructive,
                "readOnlyHint: false (destructive unless it says not)",
            ));
        }
        if hints.open_world != Some(false) {
            return Some((ToolRisk::Network, "readOnlyHint: false, reaching an open world"));
        }
        return Some((ToolRisk::LocalWrite, "readOnlyHint: false"));
    }
    None
}

fn hints_contradict_risk(harness: &Harness, sink: &mut Sink<'_>) {
    for d in declared(harness) {
        let Some((floor, hint)) = d.listed.and_then(hinted_floor) else {
            continue;
        };
        if d.tool.risk < floor {
            let (name, risk, server) = (&d.tool.name, d.tool.risk.as_str(), d.server.server());
            let message = format!("{name} is declared {risk} and {server} annotates it {hint}");
            sink.report(d.agent, d.field.key("risk"), message);
        }
    }
}

fn hints_contradict_idempotency(harness: &Harness, sink: &mut Sink<'_>) {
    for d in declared(harness) {
        let says_not = d
            .listed
            .is_some_and(|l| l.hints.idempotent == Some(false) && l.hints.read_only != Some(true));
        if d.tool.idempotent && says_not {
            let message = format!(
                "{} is declared idempotent and {} annotates it idempotentHint: false",
                d.tool.name,
                d.server.server()
            );
            sink.report(d.agent, d.field.key("idempotent"), message);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{audit::source, gateway::adapters::ToolHints};

    const AGENT: &str = "apiVersion: contextos.dev/v1alpha1
kind: Agent
metadata: {name: a}
spec:
  model: {provider: scripted, model: m, scriptRef: {name: s, key: k}}
  contextPackRef: {name: p}
  policyRefs: [{name: q}]
  sandboxProfileRef: {name: r}
  budget: {maxSteps: 5, maxTokens: 1000, maxToolCalls: 5, maxWallSeconds: 60}
  tools:
    - name: echo
      risk: read_only
      kind: observe
      idempotent: true
      adapter: {mcp: {url: 'http://mcp.local/mcp'}}
      inputSchema: {type: object}
    - name: zap
      risk: local_write
      kind: act
      idempotent: true
      adapter: {mcp: {url: 'http://mcp.local/mcp'}}
";

    fn findings(tools: Vec<ServerTool>) -> Vec<(String, String)> {
        let documents = source::parse(Path::new("a.yaml"), AGENT).expect("agent");
        let mut harness = Harness::from_documents(documents, false);
        harness.live.push(ServerListing {
            adapter: serde_json::from_value(serde_json::json!({"url": "http://mcp.local/mcp"}))
                .expect("adapter"),
            tools,
        });
        super::super::findings_of(RULES, &harness)
    }

    fn listed(name: &str, schema: serde_json::Value, hints: ToolHints) -> ServerTool {
        ServerTool {
            name: name.into(),
            description: String::new(),
            input_schema: schema,
            hints,
        }
    }

    #[test]
    fn a_server_matching_the_declarations_makes_no_finding() {
        let read = ToolHints {
            read_only: Some(true),
            ..ToolHints::default()
        };
        let local = ToolHints {
            read_only: Some(false),
            destructive: Some(false),
            idempotent: Some(true),
            open_world: Some(false),
        };
        let found = findings(vec![
            listed("echo", serde_json::json!({"type": "object"}), read),
            listed("zap", serde_json::json!({"type": "object"}), local),
        ]);
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn drift_missing_and_contradicting_tools_are_reported() {
        let destructive = ToolHints {
            read_only: Some(false),
            destructive: Some(true),
            idempotent: Some(false),
            open_world: None,
        };
        let found = findings(vec![
            listed(
                "echo",
                serde_json::json!({"type": "object", "required": ["message"]}),
                ToolHints::default(),
            ),
            listed("zap", serde_json::json!({}), destructive),
            listed("new_tool", serde_json::json!({}), ToolHints::default()),
        ]);
        let has = |rule: &str, text: &str| found.iter().any(|(r, m)| r == rule && m.contains(text));
        assert!(
            has("live/schema-drift", "echo's inputSchema differs"),
            "{found:#?}"
        );
        assert!(
            has("live/hints-contradict-risk", "zap is declared local_write"),
            "{found:#?}"
        );
        assert!(
            has("live/hints-contradict-idempotency", "zap is declared idempotent"),
            "{found:#?}"
        );
        assert!(has("live/undeclared-tool", "also lists new_tool"), "{found:#?}");
        let open = ToolHints {
            read_only: Some(false),
            destructive: Some(false),
            idempotent: Some(true),
            open_world: None,
        };
        let reaching = findings(vec![
            listed(
                "echo",
                serde_json::json!({"type": "object"}),
                ToolHints {
                    read_only: Some(true),
                    ..ToolHints::default()
                },
            ),
            listed("zap", serde_json::json!({"type": "object"}), open),
        ]);
        assert!(
            reaching
                .iter()
                .any(|(r, m)| r == "live/hints-contradict-risk" && m.contains("open world")),
            "{reaching:#?}"
        );
        let gone = findings(vec![listed(
            "echo",
            serde_json::json!({"type": "object"}),
            ToolHints::default(),
        )]);
        assert!(
            gone.iter()
                .any(|(r, m)| r == "live/missing-tool" && m.contains("lists no tool zap")),
            "{gone:#?}"
        );
    }
}
