//! The committed CRD YAML matches the types, every example parses into the typed structs, and
//! the API surface GitOps tools rely on (categories, short names, list-map conditions, printer
//! columns) is present.

mod support;

use std::{collections::BTreeSet, fs};

use contextos_crds::{
    Agent, ContextPack, Policy, SandboxProfile, Session, all_crds, crd_file_name, crd_yaml,
    kube::core::DynamicObject,
};
use support::cases::repo_root;

#[test]
fn committed_crd_yaml_is_current() {
    let dir = repo_root().join("manifests/crds");
    let mut expected_files = BTreeSet::new();
    for crd in all_crds() {
        let file = crd_file_name(&crd);
        let committed = fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            committed == crd_yaml(&crd).expect("CRD serializes"),
            "manifests/crds/{file} is stale: run `cargo run -p contextos-crds --bin crdgen` and commit the result"
        );
        expected_files.insert(file);
    }
    let kustomization = fs::read_to_string(dir.join("kustomization.yaml")).unwrap_or_default();
    assert!(
        kustomization == contextos_crds::crds_kustomization(),
        "manifests/crds/kustomization.yaml is stale: run `cargo run -p contextos-crds --bin crdgen` and commit the result"
    );
    expected_files.insert("kustomization.yaml".to_owned());
    let present: BTreeSet<String> = fs::read_dir(&dir)
        .expect("manifests/crds exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    assert_eq!(
        present, expected_files,
        "manifests/crds holds files crdgen does not write"
    );
}

#[test]
fn every_example_parses_into_its_typed_struct() {
    let mut seen_kinds = BTreeSet::new();
    for entry in walk(&repo_root().join("examples")) {
        if entry.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let text = fs::read_to_string(&entry).expect("example readable");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).expect("valid YAML");
            let object: DynamicObject = serde_yaml::from_value(value.clone())
                .unwrap_or_else(|e| panic!("{}: not a Kubernetes object: {e}", entry.display()));
            let kind = object.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
            let parsed = match kind.as_str() {
                "Agent" => serde_yaml::from_value::<Agent>(value).map(drop),
                "ContextPack" => serde_yaml::from_value::<ContextPack>(value).map(drop),
                "Policy" => serde_yaml::from_value::<Policy>(value).map(drop),
                "SandboxProfile" => serde_yaml::from_value::<SandboxProfile>(value).map(drop),
                "Session" => serde_yaml::from_value::<Session>(value).map(drop),
                "Consent" => serde_yaml::from_value::<contextos_crds::Consent>(value).map(drop),
                "Ontology" => serde_yaml::from_value::<contextos_crds::Ontology>(value).map(drop),
                "Feedback" => serde_yaml::from_value::<contextos_crds::Feedback>(value).map(drop),
                "Proposal" => serde_yaml::from_value::<contextos_crds::Proposal>(value).map(drop),
                "PriceList" => serde_yaml::from_value::<contextos_crds::PriceList>(value).map(drop),
                "SpendQuota" => serde_yaml::from_value::<contextos_crds::SpendQuota>(value).map(drop),
                "Skill" => serde_yaml::from_value::<contextos_crds::Skill>(value).map(drop),
                "ConfigMap" | "Secret" => Ok(()),
                other => panic!("{}: unexpected kind {other}", entry.display()),
            };
            parsed.unwrap_or_else(|e| panic!("{} ({kind}): {e}", entry.display()));
            seen_kinds.insert(kind);
        }
    }
    for kind in [
        "Agent",
        "ContextPack",
        "Policy",
        "SandboxProfile",
        "Session",
        "Ontology",
        "Feedback",
        "Proposal",
        "PriceList",
        "SpendQuota",
        "Skill",
    ] {
        assert!(seen_kinds.contains(kind), "examples have no {kind}");
    }
}

#[test]
fn quickstart_agent_covers_the_risk_spectrum() {
    let text = fs::read_to_string(repo_root().join("examples/quickstart/agent.yaml")).expect("agent example");
    let agent: Agent = serde_yaml::from_str(&text).expect("agent parses");
    let text =
        fs::read_to_string(repo_root().join("examples/quickstart/skills.yaml")).expect("skills example");
    let mut tools = agent.spec.tools.clone();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let skill: contextos_crds::Skill = serde::Deserialize::deserialize(document).expect("skill parses");
        assert!(
            agent
                .spec
                .skill_refs
                .iter()
                .any(|r| Some(&r.name) == skill.metadata.name.as_ref()),
            "the quickstart agent does not use skill {:?}",
            skill.metadata.name
        );
        tools.extend(skill.spec.tools);
    }
    let risks: BTreeSet<_> = tools.iter().map(|t| t.risk).collect();
    use contextos_crds::common::ToolRisk::*;
    for risk in [ReadOnly, Network, Destructive] {
        assert!(risks.contains(&risk), "quickstart agent has no {risk:?} tool");
    }
    assert!((4..=6).contains(&tools.len()));
}

#[test]
fn every_crd_is_discoverable_and_kstatus_compatible() {
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // Prices are the cluster's, kept by admins and reconciled by nobody: data, no status.
        let data_only = name == "pricelists.contextos.dev";
        let scope = if data_only { "Cluster" } else { "Namespaced" };
        assert_eq!(crd.spec.scope, scope, "{name}");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["contextos".to_owned()][..]),
            "{name}"
        );
        assert!(
            crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let version = &crd.spec.versions[0];
        if data_only {
            assert!(version.subresources.is_none(), "{name} has no status to write");
            continue;
        }
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}"
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.contains(&"Age"), "{name} has no Age column: {columns:?}");
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        let schema = serde_json::to_value(schema.expect("CRD has a schema")).expect("schema serializes");
        let status = &schema["properties"]["status"]["properties"];
        assert!(
            status["observedGeneration"].is_object(),
            "{name} status lacks observedGeneration"
        );
        let conditions = &status["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{name} conditions are not a list-map"
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{name}"
        );
        let undocumented = describe_everything(&schema["properties"]["spec"], "spec", &name);
        assert!(
            undocumented.is_empty(),
            "fields without a description (kubectl explain shows nothing): {undocumented:?}"
        );
    }
}

/// Paths of spec fields that have no description.
fn describe_everything(schema: &serde_json::Value, path: &str, crd: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if schema.get("description").is_none() {
        missing.push(format!("{crd}: {path}"));
    }
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (key, child) in props {
            missing.extend(describe_everything(child, &format!("{path}.{key}"), crd));
        }
    }
    if let Some(props) = schema
        .get("items")
        .and_then(|i| i.get("properties"))
        .and_then(|p| p.as_object())
    {
        for (key, child) in props {
            missing.extend(describe_everything(child, &format!("{path}[].{key}"), crd));
        }
    }
    missing
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("directory readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

use serde::Deserialize;
