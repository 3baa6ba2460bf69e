//! `kubectl get` output: the API server renders each CRD's printer columns into a server-side
//! Table, with the values taken from the objects.

use anyhow::{Context, Result, bail, ensure};
use contextos_crds::{Agent, Session, kube::CustomResourceExt};
use contextos_kind_tests::{TestEnv, TestNamespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceColumnDefinition;
use kube::Client;
use serde_json::Value;

use crate::objects::{apply, quickstart_objects};

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

#[tokio::test]
async fn session_and_agent_show_their_printer_columns() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "printer-columns").await?;
    let client = env.client();
    let objects = quickstart_objects()?;
    for kind in ["Agent", "Session"] {
        let (_, object) = objects
            .iter()
            .find(|(_, o)| o["kind"] == kind)
            .with_context(|| format!("no {kind} in the quickstart"))?;
        let applied = serde_json::to_value(apply(&client, ns.name(), object).await?)?;
        let crd = if kind == "Agent" {
            Agent::crd()
        } else {
            Session::crd()
        };
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        ensure!(!columns.is_empty(), "{kind} has no printer columns");
        let table = get_table(&client, ns.name(), &crd.spec.names.plural).await?;
        check_table(kind, &table, &columns, &applied)?;
    }
    ns.pass();
    Ok(())
}

async fn get_table(client: &Client, namespace: &str, plural: &str) -> Result<Value> {
    // Each row carries the object it was rendered from, so the cells are checked against that
    // object even while the operator updates statuses concurrently.
    let path = format!(
        "/apis/{}/{}/namespaces/{namespace}/{plural}?includeObject=Object",
        contextos_crds::GROUP,
        contextos_crds::VERSION
    );
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, TABLE)
        .body(Vec::new())?;
    let table: Value = client.request(request).await?;
    ensure!(
        table["kind"] == "Table",
        "expected a Table, got {}",
        table["kind"]
    );
    Ok(table)
}

fn check_table(
    kind: &str,
    table: &Value,
    columns: &[CustomResourceColumnDefinition],
    object: &Value,
) -> Result<()> {
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .context("columnDefinitions")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let expected: Vec<&str> = std::iter::once("Name")
        .chain(columns.iter().map(|c| c.name.as_str()))
        .collect();
    ensure!(
        names == expected,
        "{kind}: columns {names:?}, expected {expected:?}"
    );
    let name = object["metadata"]["name"].as_str().context("object name")?;
    let rows = table["rows"].as_array().context("rows")?;
    let Some(row) = rows.iter().find(|r| r["cells"][0] == name) else {
        bail!("{kind}: no row for {name} in {rows:?}");
    };
    let object = &row["object"];
    for (index, column) in columns.iter().enumerate() {
        let cell = &row["cells"][index + 1];
        if column.type_ == "date" {
            ensure!(
                cell.as_str().is_some_and(|s| !s.is_empty()),
                "{kind} {}: {cell}",
                column.name
            );
            continue;
        }
        // Plain paths can be checked against the object; filters are left to the server.
        let Some(pointer) = simple_pointer(&column.json_path) else {
            continue;
        };
        let value = object.pointer(&pointer).cloned().unwrap_or(Value::Null);
        let shown = if cell.is_null() || cell == "<none>" {
            Value::Null
        } else {
            cell.clone()
        };
        ensure!(
            shown == value,
            "{kind} column {} ({}): table shows {cell}, object has {value}",
            column.name,
            column.json_path
        );
    }
    Ok(())
}

/// `.spec.agentRef.name` → `/spec/agentRef/name`; `None` for paths with filters or indexes.
fn simple_pointer(json_path: &str) -> Option<String> {
    let path = json_path.strip_prefix('.')?;
    path.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        .then(|| format!("/{}", path.replace('.', "/")))
}
