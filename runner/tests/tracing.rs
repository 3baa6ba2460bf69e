//! One trace per Session, read back from a real trace backend: Jaeger (its all-in-one, built
//! from the `github.com/jaegertracing/jaeger` Go module by `runner/tests/support/jaeger.sh`;
//! `make unit` sets `CONTEXTOS_JAEGER_BIN`) with in-memory storage and its OTLP receiver, queried
//! through its HTTP API. The quickstart runs through the `contextos` binary (paused for an
//! approval, approved, resumed) with its tool service, ops-tools, exporting too: the trace named
//! by the Session's `contextos.dev/traceparent` annotation holds the Session's root span under
//! that caller, both attempts' run spans under the root, steps, model calls, critic verdicts,
//! tool calls with their gateway decisions and approval waits, record appends — and the tool
//! service's spans under the tool calls that reached it.

#[path = "support/jaeger.rs"]
mod jaeger;
#[path = "support/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

use jaeger::{Jaeger, Span, get};
use quickstart::{OpsTools, Quickstart};
use serde_json::Value;

/// The trace the Session's annotation names, and the caller's span in it.
const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const CALLER_SPAN: &str = "eee19b7ec3c1b174";

#[test]
fn a_session_is_one_trace_from_its_caller_through_runs_gateway_and_tool_service() {
    let Some(jaeger) = Jaeger::start("127.0.0.1") else {
        return;
    };
    let exporting = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), jaeger.otlp.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    // The quickstart's manifests, its Session annotated with the caller's traceparent.
    let files = tempfile::tempdir().expect("files");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("quickstart") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), files.path().join(entry.file_name())).expect("copy");
        }
    }
    let session = files.path().join("session.yaml");
    let text = std::fs::read_to_string(&session).expect("session.yaml");
    let annotated = text.replacen(
        "metadata:\n",
        &format!(
            "metadata:\n  annotations:\n    contextos.dev/traceparent: 00-{TRACE_ID}-{CALLER_SPAN}-01\n"
        ),
        1,
    );
    assert_ne!(annotated, text, "session.yaml has metadata");
    std::fs::write(&session, annotated).expect("write");
    // A model that names a tool the Agent does not declare, with a person's address for a
    // name: refused, and never exported as it is.
    let script = files.path().join("configmaps.yaml");
    let text = std::fs::read_to_string(&script).expect("configmaps.yaml");
    let injected = text.replacen(
        r#"[{"tool": "delete_namespace", "arguments": {"namespace": "checkout-canary"}}]"#,
        r#"[{"tool": "delete_namespace", "arguments": {"namespace": "checkout-canary"}}, {"tool": "jane.doe@example.com", "arguments": {}}]"#,
        1,
    );
    assert_ne!(injected, text, "the script's third turn");
    std::fs::write(&script, injected).expect("write");

    let mut q = Quickstart::with_files(&[], files.path().to_owned());
    q.tools = OpsTools::start_with_env(&[], &exporting);
    q.env = exporting;
    let paused = q.step(false, None);
    assert_eq!(paused.code, Some(4), "pauses for approval: {paused:?}");
    q.approve();
    let done = q.step(true, None);
    assert_eq!(done.code, Some(0), "{done:?}");

    let trace = jaeger.trace(TRACE_ID, &["contextos", "ops-tools"]);
    let names: Vec<&str> = trace.spans.iter().map(|s| s.name.as_str()).collect();

    // The Session's root, under the caller's span; both attempts under the root.
    let roots = trace.named("session");
    assert_eq!(roots.len(), 1, "{names:?}");
    let root = roots[0];
    assert_eq!(root.parent.as_deref(), Some(CALLER_SPAN));
    assert_eq!(root.tags["contextos.session"], "checkout-5xx");
    let runs = trace.named("run");
    assert_eq!(runs.len(), 2, "{names:?}");
    for run in &runs {
        assert_eq!(run.parent.as_deref(), Some(root.id.as_str()), "{run:?}");
        assert_eq!(run.tags["contextos.tenant"], "shop");
    }
    assert!(runs.iter().any(|r| r.tags["contextos.resumed"] == true));
    assert!(
        runs.iter().any(|r| r.tags["contextos.outcome"] == "completed"),
        "{runs:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.tags["contextos.outcome"] == "awaiting_approval"),
        "{runs:?}"
    );

    // Every span but the root has its parent in the trace: nothing dangles.
    for span in &trace.spans {
        if span.id != root.id {
            let parent = span.parent.as_deref().unwrap_or_default();
            assert!(
                trace.by_id(parent).is_some(),
                "{} ({}) has no parent in the trace",
                span.name,
                span.service
            );
        }
    }
    // Steps under runs; model calls, tool calls and verdicts under steps.
    for step in trace.named("step") {
        assert_eq!(trace.parent_name(step), Some("run"), "{step:?}");
    }
    // The first attempt asked for the approval, the resumed one was granted it and acted.
    let attempt_of = |span: &Span| -> String {
        let mut at = span;
        while at.name != "run" {
            at = trace
                .by_id(at.parent.as_deref().unwrap_or_default())
                .expect("an ancestor");
        }
        at.id.clone()
    };
    let first = runs
        .iter()
        .find(|r| r.tags["contextos.resumed"] == false)
        .expect("first attempt");
    let resumed = runs
        .iter()
        .find(|r| r.tags["contextos.resumed"] == true)
        .expect("resumed attempt");
    for wait in trace.named("approval.wait") {
        let expected = if wait.tags["contextos.approval"] == "requested" {
            &first.id
        } else {
            &resumed.id
        };
        assert_eq!(&attempt_of(wait), expected, "{wait:?}");
    }
    for (name, parent) in [
        ("model.call", "step"),
        ("critic.verdict", "step"),
        ("tool.call", "step"),
        ("gateway.decision", "tool.call"),
        ("approval.wait", "tool.call"),
        ("context.compile", "run"),
    ] {
        let spans = trace.named(name);
        assert!(!spans.is_empty(), "no {name} span: {names:?}");
        for span in spans {
            assert_eq!(trace.parent_name(span), Some(parent), "{name}: {span:?}");
        }
    }
    assert!(!trace.named("record.append").is_empty(), "{names:?}");
    let waits: Vec<&Value> = trace
        .named("approval.wait")
        .iter()
        .map(|s| &s.tags["contextos.approval"])
        .collect();
    assert!(
        waits.contains(&&Value::from("requested")) && waits.contains(&&Value::from("granted")),
        "{waits:?}"
    );
    let decisions: Vec<&Value> = trace
        .named("gateway.decision")
        .iter()
        .map(|s| &s.tags["contextos.effect"])
        .collect();
    assert!(
        decisions.contains(&&Value::from("require_approval")),
        "{decisions:?}"
    );

    // The tool service continued the trace: each of its spans is under the tool call that
    // reached it, named by the call's tool.
    let served = trace.named("ops-tools.request");
    assert!(!served.is_empty(), "{names:?}");
    for span in &served {
        assert_eq!(span.service, "ops-tools");
        let call = trace
            .by_id(span.parent.as_deref().unwrap_or_default())
            .unwrap_or_else(|| panic!("{span:?} has no parent in the trace"));
        assert_eq!(call.name, "tool.call", "{span:?}");
        assert_eq!(call.service, "contextos");
    }
    let restart = served
        .iter()
        .find(|s| s.tags["url.path"] == "/deployments/restart")
        .expect("the restart reached ops-tools");
    let call = trace
        .by_id(restart.parent.as_deref().unwrap_or_default())
        .expect("its call");
    assert_eq!(call.tags["contextos.tool"], "restart_deployment");
    assert_eq!(call.tags["contextos.outcome"], "executed");
    let tools: Vec<&Value> = trace
        .named("tool.call")
        .iter()
        .map(|c| &c.tags["contextos.tool"])
        .collect();
    assert!(
        tools.iter().any(|t| **t == "(undeclared)") && !tools.iter().any(|t| **t == "jane.doe@example.com"),
        "{tools:?}"
    );

    // Nothing of this Session went into another trace.
    let others = get(&format!(
        "{}/api/traces?service=contextos&limit=20&lookback=1h",
        jaeger.query
    ))
    .expect("a search");
    let traces: Vec<&str> = others["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["traceID"].as_str())
        .collect();
    assert_eq!(traces, vec![TRACE_ID], "the service's traces");

    // What the spans say names things, never arguments, answers or people.
    for span in &trace.spans {
        for key in span.tags.keys() {
            assert!(
                ![
                    "arguments",
                    "output",
                    "prompt",
                    "content",
                    "user",
                    "secret",
                    "note",
                    "text"
                ]
                .iter()
                .any(|word| key == word || key.ends_with(&format!(".{word}"))),
                "{}: {key}",
                span.name
            );
        }
    }
}
