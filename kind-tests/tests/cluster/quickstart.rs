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
