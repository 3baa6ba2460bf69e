//! `contextos tools import --openapi` and `contextos audit --openapi` against the OpenAPI
//! document a real local HTTP service serves (the quickstart's ops-tools, `/openapi.json`):
//! importing its operations gives the quickstart's declarations, the quickstart audits clean
//! against it, and a tool moved off the document (another method, another schema) is reported;
//! the same with the operations imported as OpenAPI tools (bound by `operationId`), where a tool
//! declared below its method is reported too.

#[path = "support/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

#[path = "support/audit_cli.rs"]
mod audit_cli;

use audit_cli::{contextos, findings_in};
use quickstart::{OpsTools, Quickstart};
use serde_json::Value;

/// What the quickstart's files name the service by.
const SERVICE: &str = "http://ops-tools.shop-platform.svc:8080";

fn openapi_findings(dir: &str, document: &str) -> Vec<(String, String)> {
    findings_in("openapi/", &[dir, "--openapi", document])
}

#[test]
fn the_services_document_imports_the_quickstarts_tools_and_catches_what_moves_off_it() {
    let tools = OpsTools::start(&[]);
    let document = format!("{}/openapi.json", tools.url);

    let (code, yaml, stderr) = contextos(&[
        "tools",
        "import",
        "--openapi",
        &document,
        "--server-url",
        SERVICE,
        "--adapter",
        "http",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let imported: Value = serde_yaml::from_str(&yaml).expect("YAML");
    let imported = imported["tools"].as_array().cloned().expect("tools");
    let quickstart = quickstart_tools();
    for tool in &imported {
        let name = tool["name"].as_str().expect("name");
        let declared = quickstart
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("the quickstart declares no {name}"));
        assert_eq!(
            tool["adapter"]["http"]["url"], declared["adapter"]["http"]["url"],
            "{name}"
        );
        assert_eq!(tool["inputSchema"], declared["inputSchema"], "{name}");
    }
    assert_eq!(imported.len(), 4, "{yaml}");
    let search = imported
        .iter()
        .find(|t| t["name"] == "search_runbooks")
        .expect("search");
    assert_eq!(search["risk"], "read_only");
    assert!(yaml.contains("# review: POST /namespaces/delete"), "{yaml}");

    // The quickstart as it is: every HTTP tool is a documented operation with its schema.
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().display().to_string();
    // The document names the service by its in-cluster URL, as the files do.
    for file in ["agent.yaml", "skills.yaml"] {
        std::fs::copy(Quickstart::examples().join(file), dir.path().join(file)).expect("copy");
    }
    let local = std::fs::read_to_string(Quickstart::examples().join("skills.yaml")).expect("skills");
    let clean = openapi_findings(&path, &document);
    assert!(clean.is_empty(), "{clean:#?}");

    // Off the document: search by POST, error_budget with another schema.
    let moved = local.replacen("method: GET", "method: POST", 1).replace(
        "errorRate: {type: number, minimum: 0}",
        "errorRate: {type: string}",
    );
    assert_ne!(moved, local);
    // The tools are the skills': findings point there.
    std::fs::write(dir.path().join("skills.yaml"), &moved).expect("write");
    let found = openapi_findings(&path, &document);
    let has = |rule: &str, text: &str| found.iter().any(|(r, m)| r == rule && m.contains(text));
    assert!(
        has("openapi/undocumented-operation", "search_runbooks calls POST")
            && has("openapi/undocumented-operation", "documented for GET"),
        "{found:#?}"
    );
    assert!(
        has("openapi/schema-drift", "error_budget's inputSchema differs"),
        "{found:#?}"
    );
    drop(tools);
}

#[test]
fn operations_import_as_openapi_tools_that_audit_clean_until_they_move_off_the_document() {
    let tools = OpsTools::start(&[]);
    let document = format!("{}/openapi.json", tools.url);
    let (code, yaml, stderr) =
        contextos(&["tools", "import", "--openapi", &document, "--server-url", SERVICE]);
    assert_eq!(code, Some(0), "{stderr}");
    let imported: Value = serde_yaml::from_str(&yaml).expect("YAML");
    let imported = imported["tools"].clone();
    assert_eq!(imported.as_array().map(Vec::len), Some(4), "{yaml}");
    for tool in imported.as_array().into_iter().flatten() {
        let adapter = &tool["adapter"]["openapi"];
        assert_eq!(adapter["document"], document.as_str(), "{tool}");
        assert_eq!(adapter["server"], SERVICE, "{tool}");
        assert_eq!(adapter["operationId"], tool["name"], "{tool}");
        // Pinned to the document read: 64 hex digits.
        assert!(
            adapter["documentSha256"]
                .as_str()
                .is_some_and(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit())),
            "{tool}"
        );
        assert!(tool["adapter"]["http"].is_null(), "{tool}");
    }

    // An Agent with exactly those tools audits clean against the document.
    let mut agent: Value = serde_yaml::from_str(
        &std::fs::read_to_string(Quickstart::examples().join("agent.yaml")).expect("agent.yaml"),
    )
    .expect("agent");
    agent["spec"]["tools"] = imported;
    if let Some(spec) = agent["spec"].as_object_mut() {
        spec.remove("skillRefs");
    }
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().display().to_string();
    let write = |agent: &Value| {
        std::fs::write(
            dir.path().join("agent.yaml"),
            serde_yaml::to_string(agent).expect("yaml"),
        )
        .expect("write")
    };
    write(&agent);
    let clean = openapi_findings(&path, &document);
    assert!(clean.is_empty(), "{clean:#?}");

    // Moved off it: a POST declared read_only, an operation it does not have, another schema.
    let set = |agent: &mut Value, name: &str, pointer: &str, value: Value| {
        let tools = agent["spec"]["tools"].as_array_mut().expect("tools");
        let tool = tools.iter_mut().find(|t| t["name"] == name).expect("a tool");
        *tool.pointer_mut(pointer).expect("a field") = value;
    };
    set(&mut agent, "error_budget", "/risk", Value::from("read_only"));
    set(
        &mut agent,
        "restart_deployment",
        "/adapter/openapi/operationId",
        Value::from("restart"),
    );
    set(
        &mut agent,
        "search_runbooks",
        "/inputSchema",
        serde_json::json!({"type": "object", "properties": {"query": {"type": "integer"}}}),
    );
    // A pin to another version of the document.
    set(
        &mut agent,
        "delete_namespace",
        "/adapter/openapi/documentSha256",
        Value::from("0".repeat(64)),
    );
    write(&agent);
    let found = openapi_findings(&path, &document);
    let has = |rule: &str, text: &str| found.iter().any(|(r, m)| r == rule && m.contains(text));
    assert!(
        has(
            "openapi/risk-below-method",
            "error_budget declares risk read_only, but operation error_budget is POST"
        ),
        "{found:#?}"
    );
    assert!(
        has(
            "openapi/undocumented-operation",
            "no operation has operationId \"restart\""
        ),
        "{found:#?}"
    );
    assert!(
        has(
            "openapi/schema-drift",
            "search_runbooks's inputSchema differs from the arguments operation search_runbooks"
        ),
        "{found:#?}"
    );
    assert!(
        has("openapi/document-changed", "delete_namespace is pinned to"),
        "{found:#?}"
    );
    assert_eq!(found.len(), 4, "{found:#?}");
    drop(tools);
}

/// The quickstart agent's tools: those of its skills (`skills.yaml`).
fn quickstart_tools() -> Vec<Value> {
    let text = std::fs::read_to_string(Quickstart::examples().join("skills.yaml")).expect("skills.yaml");
    let mut tools = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let skill: Value = serde::Deserialize::deserialize(document).expect("a skill");
        tools.extend(skill["spec"]["tools"].as_array().cloned().unwrap_or_default());
    }
    tools
}
