//! Every quickstart example is accepted by the API server, and applying it again changes nothing.

use anyhow::{Result, ensure};
use contextos_kind_tests::{TestEnv, TestNamespace};
use kube::ResourceExt;

use crate::objects::{apply, quickstart_objects};

#[tokio::test]
async fn quickstart_examples_apply_with_server_side_apply() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "quickstart").await?;
    let client = env.client();
    let objects = quickstart_objects()?;
    ensure!(
        objects.len() >= 6,
        "expected the whole quickstart, found {} objects",
        objects.len()
    );
    let mut first = Vec::new();
    for (file, object) in &objects {
        let applied = apply(&client, ns.name(), object)
            .await
            .map_err(|e| anyhow::anyhow!("{file}: {e:#}"))?;
        first.push(applied);
    }
    // A GitOps tool re-applies on every sync: that must not change what it applied. (The
    // operator may be writing status meanwhile, which moves resourceVersion but not the spec's
    // generation; ConfigMaps have no generation, and their data must be unchanged.)
    for ((file, object), before) in objects.iter().zip(&first) {
        let again = apply(&client, ns.name(), object).await?;
        let unchanged = match before.metadata.generation {
            Some(generation) => again.metadata.generation == Some(generation),
            None => again.data.get("data") == before.data.get("data"),
        };
        ensure!(
            unchanged,
            "{file}: re-applying {} {} changed it (generation {:?} -> {:?})",
            object["kind"],
            before.name_any(),
            before.metadata.generation,
            again.metadata.generation
        );
    }
    ns.pass();
    Ok(())
}

/// `contextos audit --cluster -n <namespace>` against the API server: the namespace's ContextOS
/// objects (not other namespaces'), its Namespace object and the installation (the CRDs) are
/// read, so findings name the live objects — the quickstart's read-only POST tool, the
/// namespace running an Agent without Pod Security `restricted`, and a tool touching an entity
/// type the namespace's live Ontology does not declare.
#[tokio::test]
async fn the_audit_reads_a_namespace_of_the_live_cluster() -> Result<()> {
    let env = TestEnv::shared().await?;
    let Some(kubeconfig) = env.kubeconfig() else {
        eprintln!("skipped: the audit is pointed at the local control plane's kubeconfig");
        return Ok(());
    };
    let ns = TestNamespace::new(env, "audit").await?;
    let client = env.client();
    for (file, mut object) in quickstart_objects()? {
        if object["kind"] == "Skill" && object["metadata"]["name"] == "diagnosis" {
            // A tool touching a type the namespace's Ontology (below) does not declare.
            object["spec"]["tools"][0]["touches"] =
                serde_json::json!([{"type": "service", "argument": "/query"}]);
        }
        apply(&client, ns.name(), &object)
            .await
            .map_err(|e| anyhow::anyhow!("{file}: {e:#}"))?;
    }
    let ontology = serde_json::json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "Ontology",
        "metadata": {"name": "default"},
        "spec": {"entityTypes": [{"name": "incident", "idPattern": "INC-[0-9]+"}]},
    });
    apply(&client, ns.name(), &ontology).await?;
    let contextos = contextos_kind_tests::process_node::workspace_binary("contextos").ok_or_else(|| {
        anyhow::anyhow!("target/<profile>/contextos is missing: `make kind-tests` builds it")
    })?;
    let output = tokio::process::Command::new(contextos)
        .env("KUBECONFIG", kubeconfig)
        .args(["audit", "--cluster", "-n", ns.name(), "--format", "json"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "contextos audit --cluster failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    let has = |rule: &str, name: &str| {
        findings
            .iter()
            .any(|f| f["rule"] == rule && f["object"]["name"] == name && f["file"].is_null())
    };
    // The skills' tools are audited with the Agent that uses them, and found in the Skill.
    ensure!(has("tool/read-only-post", "diagnosis"), "{stdout}");
    ensure!(has("install/namespace-not-restricted", ns.name()), "{stdout}");
    // The live Ontology is read: the finding names its types, not a missing Ontology.
    ensure!(
        findings.iter().any(|f| f["rule"] == "agent/unknown-entity-type"
            && f["object"]["name"] == "diagnosis"
            && f["message"]
                .as_str()
                .is_some_and(|m| m.contains("its types: incident"))),
        "{stdout}"
    );
    let contextos_kinds = [
        "Agent",
        "Policy",
        "ContextPack",
        "SandboxProfile",
        "Session",
        "Skill",
    ];
    let foreign: Vec<&serde_json::Value> = findings
        .iter()
        .filter(|f| {
            contextos_kinds.contains(&f["object"]["kind"].as_str().unwrap_or_default())
                && f["object"]["namespace"] != ns.name()
        })
        .collect();
    ensure!(
        foreign.is_empty(),
        "objects of other namespaces were audited: {foreign:#?}"
    );
    ensure!(
        report["scores"]
            .as_object()
            .is_some_and(|s| s.contains_key(&format!("Agent {}/oncall-assistant", ns.name()))),
        "{stdout}"
    );
    ns.pass();
    Ok(())
}
