//! Cached read-only results and aliases in runs, through the `contextos` binary against the
//! real ops-tools server: a status read repeated within its TTL is answered from the gateway's
//! cache (the MCP server is asked once, the record says which call the answer came from); with
//! `spec.aliases` the repeat enters the model's context by alias, so fewer tokens are sent for
//! the same decisions; the model reads an alias again with `contextos_deref`; a replay
//! reproduces it all; and a newly pinned revision never reuses a result cached under another.

#[path = "support/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

use std::path::Path;

use quickstart::Quickstart;
use serde_json::{Value, json};

const STATUS: &str = r#"{"tool": "get_service_status", "arguments": {"service": "checkout-api"}}"#;
const RUNBOOKS: &str = r#"{"tool": "search_runbooks", "arguments": {"query": "checkout-api 5xx"}}"#;
/// The runbook search's alias (its result is long enough for one; the status is not).
const RUNBOOKS_ALIAS: &str = "@search_runbooks.checkout-api-5xx#1";
const ANSWER: &str = r#"{"content": "{\"summary\": \"checkout-api 5xx started right after the 14:02 deploy.\", \"actions\": [], \"resolved\": false}"}"#;

/// A copy of the quickstart whose status tool is cached, whose Agent has `agent_extra` (YAML
/// under `spec`) and whose model plays `turns` (JSON objects).
fn copy_with(agent_extra: &str, turns: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = path.file_name().expect("name").to_owned();
        let mut text = std::fs::read_to_string(&path).expect("read");
        match name.to_str() {
            Some("agent.yaml") => text = replace_once(&text, "  safetyMode: autonomous\n", agent_extra),
            Some("skills.yaml") => {
                let at = "      adapter:\n        mcp:\n          url: http://ops-tools.shop-platform.svc:8081/mcp";
                text = replace_once(&text, at, "      cache: {ttlSeconds: 600}\n");
            }
            Some("configmaps.yaml") => text = with_script(&text, turns),
            _ => {}
        }
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

fn replace_once(text: &str, marker: &str, with: &str) -> String {
    assert_eq!(
        text.matches(marker).count(),
        1,
        "the quickstart changed: {marker:?}"
    );
    text.replacen(marker, &format!("{with}{marker}"), 1)
}

/// The quickstart's ConfigMaps with the model's turns replaced by `turns`.
fn with_script(text: &str, turns: &[String]) -> String {
    let start = text.find("      \"turns\": [").expect("the script's turns");
    let end = start + text[start..].find("\n      ]\n").expect("their end") + "\n      ]".len();
    let turns = turns.join(",\n        ");
    format!(
        "{}      \"turns\": [\n        {turns}\n      ]{}",
        &text[..start],
        &text[end..]
    )
}

fn turn(content: &str, call: &str) -> String {
    format!(r#"{{"content": "{content}", "toolCalls": [{call}]}}"#)
}

/// The script every run here plays, with `extra` turns before the answer.
fn script(extra: &[String]) -> Vec<String> {
    let mut turns = vec![
        turn("Checking the live status.", STATUS),
        turn("Looking up the runbook.", RUNBOOKS),
        turn("Checking the status again.", STATUS),
        turn("Looking the runbook up again.", RUNBOOKS),
    ];
    turns.extend_from_slice(extra);
    turns.push(ANSWER.to_owned());
    turns
}

/// The entry bodies of the session's newest run.
fn bodies(q: &Quickstart) -> Vec<Value> {
    q.newest_run_entries()
        .into_iter()
        .map(|e| e["entry"]["body"].clone())
        .collect()
}

fn of_type<'a>(bodies: &'a [Value], kind: &str) -> Vec<&'a Value> {
    bodies.iter().filter(|b| b["type"] == kind).collect()
}

/// What the run decided: each call (tool, arguments) and the output.
fn decisions(bodies: &[Value]) -> (Vec<(Value, Value)>, Value) {
    let calls = of_type(bodies, "tool_call_requested")
        .into_iter()
        .map(|c| (c["tool"].clone(), c["arguments"].clone()))
        .collect();
    (calls, of_type(bodies, "completed")[0]["output"].clone())
}

fn prompt_tokens(bodies: &[Value]) -> u64 {
    of_type(bodies, "model_turn")
        .iter()
        .map(|t| t["prompt_tokens"].as_u64().unwrap_or(0))
        .sum()
}

/// The conversation the checkpoints recorded.
fn messages(bodies: &[Value]) -> Vec<Value> {
    of_type(bodies, "checkpoint")
        .iter()
        .flat_map(|c| c["state"]["new_messages"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn run(dir: &Path) -> (Quickstart, Vec<Value>) {
    let q = Quickstart::with_files(&[], dir.to_owned());
    q.drive(None);
    let bodies = bodies(&q);
    (q, bodies)
}

#[test]
fn a_repeated_read_is_cached_and_enters_the_context_once_for_the_same_decisions() {
    let plain = copy_with("", &script(&[]));
    let (q, plain_bodies) = run(plain.path());
    assert_eq!(
        q.tools.effects()["mcpCalls"],
        1,
        "the repeated status read is answered from the cache"
    );
    let results = of_type(&plain_bodies, "tool_result");
    let statuses: Vec<&&Value> = results
        .iter()
        .filter(|r| r["output"]["service"] == "checkout-api")
        .collect();
    assert_eq!(statuses.len(), 2, "{results:#?}");
    assert!(statuses[0]["cached"].is_null());
    assert_eq!(statuses[1]["cached"]["call_id"], "1.0", "{:#}", statuses[1]);
    assert_eq!(statuses[1]["attempts"], 0);
    assert_eq!(statuses[0]["output"], statuses[1]["output"]);

    let aliased = copy_with("  aliases: {}\n", &script(&[]));
    let (q, aliased_bodies) = run(aliased.path());
    assert_eq!(q.tools.effects()["mcpCalls"], 1);
    assert_eq!(
        decisions(&plain_bodies),
        decisions(&aliased_bodies),
        "aliases change what the model reads, not what the run does"
    );
    let (plain_tokens, aliased_tokens) = (prompt_tokens(&plain_bodies), prompt_tokens(&aliased_bodies));
    assert!(
        aliased_tokens < plain_tokens,
        "the repeat is sent by alias: {aliased_tokens} vs {plain_tokens} prompt tokens"
    );
    let reads: Vec<String> = messages(&aliased_bodies)
        .iter()
        .filter_map(|m| m["read"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        reads,
        [RUNBOOKS_ALIAS, RUNBOOKS_ALIAS],
        "short results are not aliased"
    );
}

#[test]
fn the_model_reads_an_alias_again_and_a_replay_reproduces_the_run() {
    let deref = |alias: &str| {
        turn(
            "Reading the first status again.",
            &json!({"tool": "contextos_deref", "arguments": {"alias": alias}}).to_string(),
        )
    };
    let dir = copy_with(
        "  aliases: {fullForSteps: 1}\n",
        &script(&[deref(RUNBOOKS_ALIAS), deref("@nothing#9")]),
    );
    let (q, bodies) = run(dir.path());
    let conversation = messages(&bodies);
    let tool_messages: Vec<&Value> = conversation.iter().filter(|m| m["role"] == "tool").collect();
    let first = tool_messages[1];
    let again = tool_messages[4];
    assert_eq!(again["content"], first["content"], "{conversation:#?}");
    assert_eq!(again["read"]["name"], RUNBOOKS_ALIAS);
    assert_eq!(again["read"]["step"], 5);
    let unknown = tool_messages[5]["content"].as_str().unwrap_or_default();
    assert_eq!(
        unknown,
        format!("error: this run has read no result called @nothing#9; its aliases: {RUNBOOKS_ALIAS}")
    );
    assert!(
        of_type(&bodies, "tool_call_requested")
            .iter()
            .all(|c| c["tool"] != "contextos_deref"),
        "a dereference reaches no gateway"
    );

    let same = q.cli(&["replay", "--session", "checkout-5xx", "--output", "json"]);
    assert_eq!(same.code, Some(0), "{}{}", same.stdout, same.stderr);
    let report: Value = serde_json::from_str(&same.stdout).expect("json");
    assert_eq!(report["identical_runs"], 1, "{report:#}");
    assert_eq!(q.tools.effects()["mcpCalls"], 1, "a replay reaches no tool");
}

#[test]
fn a_tool_that_is_not_read_only_cannot_be_cached_or_take_a_reserved_name() {
    let dir = copy_with("", &script(&[]));
    let skills = dir.path().join("skills.yaml");
    let text = std::fs::read_to_string(&skills).expect("skills");
    let marker = "      adapter:\n        http:\n          url: http://ops-tools.shop-platform.svc:8080/deployments/restart";
    assert_eq!(text.matches(marker).count(), 1, "the quickstart changed");
    std::fs::write(
        &skills,
        text.replacen(marker, &format!("      cache: {{ttlSeconds: 60}}\n{marker}"), 1),
    )
    .expect("write");
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    let out = q.step(false, None);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("only a read_only tool's results may be cached"),
        "{}",
        out.stderr
    );
    assert_eq!(q.tools.effects()["requests"], 0);

    let dir = copy_with("", &script(&[]));
    let skills = dir.path().join("skills.yaml");
    let text = std::fs::read_to_string(&skills).expect("skills");
    assert_eq!(
        text.matches("- name: error_budget\n").count(),
        1,
        "the quickstart changed"
    );
    std::fs::write(
        &skills,
        text.replacen("- name: error_budget\n", "- name: contextos_deref\n", 1),
    )
    .expect("write");
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    let out = q.step(false, None);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("reserved for built-in tools"),
        "{}",
        out.stderr
    );
}
