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
    // A GitOps tool re-applies on every sync: that must be a no-op.
    for ((file, object), before) in objects.iter().zip(&first) {
        let again = apply(&client, ns.name(), object).await?;
        ensure!(
            again.resource_version() == before.resource_version(),
            "{file}: re-applying {} {} changed it (resourceVersion {:?} -> {:?})",
            object["kind"],
            before.name_any(),
            before.resource_version(),
            again.resource_version()
        );
    }
    ns.pass();
    Ok(())
}
