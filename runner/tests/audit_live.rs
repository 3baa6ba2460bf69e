//! `contextos tools import` and `contextos audit --mcp` against the real MCP reference server
//! (`@modelcontextprotocol/server-everything` from the npm registry; `make unit` installs it and
//! sets `CONTEXTOS_MCP_EVERYTHING` to its entry point), over stdio and streamable HTTP: what is
//! imported is what the server lists, importing then auditing reports no drift, and changing a
//! declaration away from the server is reported.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

#[path = "support/audit_cli.rs"]
mod audit_cli;

use audit_cli::{contextos, findings_in};

const ENTRY_ENV: &str = "CONTEXTOS_MCP_EVERYTHING";

/// The reference server's entry point, or `None` (the test says it is skipped).
fn entry() -> Option<PathBuf> {
    match std::env::var_os(ENTRY_ENV) {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            eprintln!(
                "skipped: {ENTRY_ENV} is not set (`make unit` sets it: bash runner/tests/support/mcp_everything.sh)"
            );
            None
        }
    }
}

/// `node` by absolute path: a stdio server starts with a clean environment (no PATH).
fn node() -> String {
    let output = Command::new("sh")
        .args(["-c", "command -v node"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(!path.is_empty(), "node is not installed");
    path
}

/// The imported tools, as JSON.
fn import(server: &[&str]) -> (String, Vec<Value>) {
    let mut args = vec!["tools", "import"];
    args.extend_from_slice(server);
    let (code, stdout, stderr) = contextos(&args);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let parsed: Value = serde_yaml::from_str(&stdout).expect("import prints YAML");
    let tools = parsed["tools"].as_array().cloned().expect("a tools: list");
    (stdout, tools)
}

/// A harness around `tools`: the Agent and what it references, in `dir`.
fn write_harness(dir: &Path, tools: &[Value]) {
    let agent = serde_json::json!({
        "apiVersion": "contextos.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": "everything"},
        "spec": {
            "model": {"provider": "scripted", "model": "m", "scriptRef": {"name": "s", "key": "k"}},
            "contextPackRef": {"name": "pack"}, "policyRefs": [{"name": "policy"}],
            "sandboxProfileRef": {"name": "runner"},
            "budget": {"maxSteps": 5, "maxTokens": 1000, "maxToolCalls": 5, "maxWallSeconds": 60},
            "tools": tools,
        },
    });
    std::fs::write(
        dir.join("agent.yaml"),
        serde_yaml::to_string(&agent).expect("yaml"),
    )
    .expect("write");
}

/// The live findings of auditing `dir` against `server`.
fn live_findings(dir: &Path, server: &[&str]) -> Vec<(String, String)> {
    let dir = dir.display().to_string();
    let mut args = vec![dir.as_str()];
    args.extend_from_slice(server);
    findings_in("live/", &args)
}

#[test]
fn import_then_audit_over_stdio_reports_no_drift_and_a_changed_declaration_is_caught() {
    let Some(entry) = entry() else { return };
    let command = format!("{} {} stdio", node(), entry.display());
    let server = ["--mcp-command", command.as_str()];
    let (yaml, tools) = import(&server);
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(
        names.contains(&"echo"),
        "the reference server's echo tool: {names:?}\n{yaml}"
    );
    assert!(
        tools
            .iter()
            .all(|t| t["adapter"]["mcp"]["command"].is_array() && t["inputSchema"].is_object())
    );
    // The echo tool is annotated read-only by the server.
    let echo = tools.iter().find(|t| t["name"] == "echo").expect("echo");
    assert_eq!(echo["risk"], "read_only", "{yaml}");

    let dir = tempfile::tempdir().expect("dir");
    write_harness(dir.path(), &tools);
    let clean = live_findings(dir.path(), &server);
    assert!(
        clean.is_empty(),
        "importing then auditing reports drift: {clean:#?}"
    );

    // Away from the server: a tool it does not list, a changed schema, one tool left out.
    let mut changed = tools.clone();
    changed[0]["adapter"]["mcp"]["tool"] = Value::String("no_such_tool".into());
    changed[1]["inputSchema"] =
        serde_json::json!({"type": "object", "properties": {"x": {"type": "string"}}});
    let left_out = changed.pop().expect("a tool")["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    write_harness(dir.path(), &changed);
    let drifted = live_findings(dir.path(), &server);
    let has = |rule: &str, text: &str| drifted.iter().any(|(r, m)| r == rule && m.contains(text));
    assert!(
        has("live/missing-tool", "lists no tool no_such_tool"),
        "{drifted:#?}"
    );
    assert!(has("live/schema-drift", "inputSchema differs"), "{drifted:#?}");
    assert!(
        has("live/undeclared-tool", ""),
        "{left_out} left out: {drifted:#?}"
    );
}

/// The server over streamable HTTP on a loopback port, killed on drop.
struct HttpServer {
    child: Child,
    url: String,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_http(entry: &Path) -> HttpServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let preload = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/loopback.cjs");
    let mut child = Command::new(node())
        .arg("--require")
        .arg(preload)
        .arg(entry)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference server");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listening on port") => break,
            Some(Ok(_)) => {}
            _ => panic!("the reference server exited before listening"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    HttpServer {
        child,
        url: format!("http://127.0.0.1:{port}/mcp"),
    }
}

#[test]
fn over_streamable_http_the_same_tools_are_imported_and_audit_clean() {
    let Some(entry) = entry() else { return };
    let http = start_http(&entry);
    let server = ["--mcp-url", http.url.as_str()];
    let (_, tools) = import(&server);
    let stdio = format!("{} {} stdio", node(), entry.display());
    let (_, over_stdio) = import(&["--mcp-command", stdio.as_str()]);
    let names = |tools: &[Value]| -> Vec<String> {
        let mut names: Vec<String> = tools
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&tools), names(&over_stdio));
    assert!(
        tools
            .iter()
            .all(|t| t["adapter"]["mcp"]["url"] == http.url.as_str())
    );
    let dir = tempfile::tempdir().expect("dir");
    write_harness(dir.path(), &tools);
    let clean = live_findings(dir.path(), &server);
    assert!(clean.is_empty(), "{clean:#?}");
    // The URL as the Agents write it matched (not merely nothing compared): a changed schema is
    // caught, and a server nobody declares is said to match nothing.
    let mut changed = tools.clone();
    changed[0]["inputSchema"] = serde_json::json!({"type": "object"});
    write_harness(dir.path(), &changed);
    let drifted = live_findings(dir.path(), &server);
    assert!(
        drifted.iter().any(|(r, _)| r == "live/schema-drift"),
        "{drifted:#?}"
    );
    let command = format!("{} {} stdio", node(), entry.display());
    let elsewhere = live_findings(dir.path(), &["--mcp-command", command.as_str()]);
    assert!(
        elsewhere.iter().any(|(r, _)| r == "live/server-matches-no-tool"),
        "{elsewhere:#?}"
    );
}
