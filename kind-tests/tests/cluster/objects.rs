//! Applying and reading arbitrary objects (the examples, admission cases) by their
//! `apiVersion`/`kind`, through API discovery.

use std::path::Path;

use anyhow::{Context, Result, bail};
use contextos_kind_tests::FIELD_MANAGER;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::pinned_kind,
};
use serde_json::Value;

/// An API for the object's kind in `namespace`.
pub async fn api_for(client: &Client, namespace: &str, object: &Value) -> Result<Api<DynamicObject>> {
    let api_version = object["apiVersion"]
        .as_str()
        .context("object has no apiVersion")?;
    let kind = object["kind"].as_str().context("object has no kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, _) = pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {api_version} {kind}"))?;
    Ok(Api::namespaced_with(client.clone(), namespace, &resource))
}

/// Server-side applies `object` into `namespace`.
pub async fn apply(client: &Client, namespace: &str, object: &Value) -> Result<DynamicObject> {
    let mut object = object.clone();
    object["metadata"]["namespace"] = Value::String(namespace.to_owned());
    let name = object["metadata"]["name"]
        .as_str()
        .context("object has no name")?
        .to_owned();
    let api = api_for(client, namespace, &object).await?;
    let applied = api
        .patch(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&object))
        .await
        .with_context(|| format!("apply {} {name}", object["kind"]))?;
    Ok(applied)
}

/// Every document of a YAML file (skipping empty ones).
pub fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Value =
            serde::Deserialize::deserialize(document).with_context(|| format!("parse {}", path.display()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    if documents.is_empty() {
        bail!("{} holds no objects", path.display());
    }
    Ok(documents)
}

/// The objects of `examples/quickstart/*.yaml` except the kustomization, with their files.
pub fn quickstart_objects() -> Result<Vec<(String, Value)>> {
    let dir = contextos_kind_tests::env::repo_root().join("examples/quickstart");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for object in yaml_documents(&file)? {
            objects.push((name.clone(), object));
        }
    }
    Ok(objects)
}
