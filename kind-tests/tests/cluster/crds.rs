//! The CRDs are established and discoverable the way `kubectl` finds them.

use anyhow::{Result, ensure};
use contextos_kind_tests::TestEnv;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

#[tokio::test]
async fn crds_are_established_and_discoverable() -> Result<()> {
    let env = TestEnv::shared().await?;
    let client = env.client();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let discovered = client
        .list_api_group_resources(&format!("{}/{}", contextos_crds::GROUP, contextos_crds::VERSION))
        .await?;
    for crd in contextos_crds::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let live = api.get(&name).await?;
        let conditions = live
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            ensure!(
                conditions.iter().any(|c| c.type_ == wanted && c.status == "True"),
                "CRD {name} is not {wanted}: {conditions:?}"
            );
        }
        // What `kubectl get contextos` and the short names rely on.
        let plural = &crd.spec.names.plural;
        let resource = discovered
            .resources
            .iter()
            .find(|r| &r.name == plural)
            .ok_or_else(|| anyhow::anyhow!("{plural} is not in API discovery"))?;
        ensure!(
            resource
                .categories
                .iter()
                .flatten()
                .any(|c| c == contextos_crds::CATEGORY),
            "{plural} is not in category {:?}: {:?}",
            contextos_crds::CATEGORY,
            resource.categories
        );
        ensure!(
            resource.short_names == crd.spec.names.short_names,
            "{plural}: short names {:?}, expected {:?}",
            resource.short_names,
            crd.spec.names.short_names
        );
        // Every kind is a tenant's, but prices: those are the cluster's.
        let namespaced = plural != "pricelists";
        ensure!(
            resource.namespaced == namespaced,
            "{plural} must be {}",
            if namespaced {
                "namespaced"
            } else {
                "cluster-scoped"
            }
        );
    }
    Ok(())
}
