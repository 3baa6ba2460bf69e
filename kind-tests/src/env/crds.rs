//! Installs the project's CRDs (`manifests/crds/*.yaml`) with server-side apply and waits until
//! the API server has established each of them.

use std::{fs, path::Path, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use super::EnvError;
use crate::{
    FIELD_MANAGER,
    wait::{Check, wait_for, wait_for_object},
};

const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies every CRD in `dir` and waits for `Established` and `NamesAccepted`; returns their names.
pub async fn install_crds(client: &Client, dir: &Path) -> Result<Vec<String>, EnvError> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .map_err(|source| EnvError::Io {
            what: format!("read {}", dir.display()),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for file in &files {
        let crd_error = |reason: String| EnvError::Crd {
            file: file.display().to_string(),
            reason,
        };
        let text = fs::read_to_string(file).map_err(|e| crd_error(e.to_string()))?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).map_err(|e| crd_error(e.to_string()))?;
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| crd_error("no metadata.name".into()))?;
        api.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .map_err(|e| crd_error(format!("server-side apply failed: {e}")))?;
        names.push(name);
    }
    for name in &names {
        wait_for_object(
            &api,
            name,
            "Established and NamesAccepted",
            ESTABLISHED_TIMEOUT,
            |crd| {
                let conditions = crd.status.as_ref().and_then(|s| s.conditions.as_ref());
                let is_true = |type_: &str| {
                    conditions
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == type_ && c.status == "True")
                };
                Check::when(is_true("Established") && is_true("NamesAccepted"), || {
                    format!("conditions: {conditions:?}")
                })
            },
        )
        .await
        .map_err(|e| EnvError::Crd {
            file: name.clone(),
            reason: e.to_string(),
        })?;
    }
    wait_for_discovery(client, &files).await?;
    Ok(names)
}

/// Established is not the end: API discovery, which clients use to find a kind's resource, is
/// updated separately and can lag behind. Waits until discovery lists every CRD's plural.
async fn wait_for_discovery(client: &Client, files: &[std::path::PathBuf]) -> Result<(), EnvError> {
    let mut wanted: Vec<(String, String)> = Vec::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap_or_default();
        let Ok(crd) = serde_yaml::from_str::<CustomResourceDefinition>(&text) else {
            continue;
        };
        for version in crd.spec.versions.iter().filter(|v| v.served) {
            wanted.push((
                format!("{}/{}", crd.spec.group, version.name),
                crd.spec.names.plural.clone(),
            ));
        }
    }
    wait_for(
        "the CRDs to appear in API discovery",
        ESTABLISHED_TIMEOUT,
        || async {
            let mut missing = Vec::new();
            for (group_version, plural) in &wanted {
                match client.list_api_group_resources(group_version).await {
                    Ok(list) if list.resources.iter().any(|r| &r.name == plural) => {}
                    Ok(_) => missing.push(format!("{group_version} {plural}")),
                    Err(err) => missing.push(format!("{group_version} {plural} ({err})")),
                }
            }
            Check::when(missing.is_empty(), || {
                format!("not discoverable yet: {}", missing.join(", "))
            })
        },
    )
    .await
    .map_err(|e| EnvError::Crd {
        file: "manifests/crds".to_owned(),
        reason: e.to_string(),
    })
}
