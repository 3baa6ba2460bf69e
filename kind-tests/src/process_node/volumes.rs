//! Pod volumes and container mounts as plans: which files each volume holds (ConfigMap, Secret,
//! downward API, service-account token, projected), and where each mount appears under the
//! container's root. Pure; `sandbox.rs` writes the plans to disk.

use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, DownwardAPIVolumeFile, KeyToPath, Volume, VolumeProjection};

use super::{
    env_vars::{Environment, field_value},
    plan::{ConfigError, Lookups, PodFacts, TokenKey},
};

/// Default file mode of ConfigMap, Secret, downward-API and projected volumes (`0644`).
const DEFAULT_MODE: u32 = 0o644;

/// What a volume is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeContent {
    /// An empty, world-writable directory (`emptyDir`).
    EmptyDir,
    /// A directory on the host (`hostPath`), used in place.
    HostPath(PathBuf),
    /// A directory holding exactly these files.
    Files(Vec<VolumeFile>),
}

/// One file of a ConfigMap/Secret/downward-API/projected volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFile {
    /// Relative path inside the volume, without `..`.
    pub path: PathBuf,
    pub data: Vec<u8>,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePlan {
    pub name: String,
    pub content: VolumeContent,
}

/// A volume mount of one container: `mount_path` (absolute, as in the pod spec) shows the volume's
/// directory, or `sub_path` inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountPlan {
    pub mount_path: PathBuf,
    pub volume: String,
    pub sub_path: Option<PathBuf>,
}

/// Plans every volume of the pod.
pub fn plan_volumes(facts: &PodFacts, lookups: &Lookups) -> Result<Vec<VolumePlan>, ConfigError> {
    let volumes = facts.pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .map(|volume| {
            Ok(VolumePlan {
                name: volume.name.clone(),
                content: plan_volume(volume, facts, lookups)?,
            })
        })
        .collect()
}

fn plan_volume(volume: &Volume, facts: &PodFacts, lookups: &Lookups) -> Result<VolumeContent, ConfigError> {
    if volume.empty_dir.is_some() {
        return Ok(VolumeContent::EmptyDir);
    }
    if let Some(host) = &volume.host_path {
        return Ok(VolumeContent::HostPath(PathBuf::from(&host.path)));
    }
    let mut files = Vec::new();
    if let Some(cm) = &volume.config_map {
        let mode = mode_or_default(cm.default_mode);
        config_map_files(
            facts,
            lookups,
            &cm.name,
            cm.items.as_deref(),
            cm.optional,
            mode,
            &mut files,
        )?;
    } else if let Some(secret) = &volume.secret {
        let mode = mode_or_default(secret.default_mode);
        let name = secret.secret_name.as_deref().unwrap_or_default();
        secret_files(
            facts,
            lookups,
            name,
            secret.items.as_deref(),
            secret.optional,
            mode,
            &mut files,
        )?;
    } else if let Some(downward) = &volume.downward_api {
        let mode = mode_or_default(downward.default_mode);
        downward_files(facts, downward.items.as_deref(), mode, &mut files)?;
    } else if let Some(projected) = &volume.projected {
        let mode = mode_or_default(projected.default_mode);
        for source in projected.sources.iter().flatten() {
            projection_files(source, facts, lookups, mode, &mut files)?;
        }
    } else {
        return Err(ConfigError::Unsupported(format!(
            "volume {:?} has a type the process node does not support; supported: emptyDir, hostPath, \
             configMap, secret, downwardAPI, projected",
            volume.name
        )));
    }
    Ok(VolumeContent::Files(files))
}

fn projection_files(
    source: &VolumeProjection,
    facts: &PodFacts,
    lookups: &Lookups,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), ConfigError> {
    if let Some(cm) = &source.config_map {
        config_map_files(
            facts,
            lookups,
            &cm.name,
            cm.items.as_deref(),
            cm.optional,
            mode,
            files,
        )
    } else if let Some(secret) = &source.secret {
        secret_files(
            facts,
            lookups,
            &secret.name,
            secret.items.as_deref(),
            secret.optional,
            mode,
            files,
        )
    } else if let Some(downward) = &source.downward_api {
        downward_files(facts, downward.items.as_deref(), mode, files)
    } else if let Some(token) = &source.service_account_token {
        let key = TokenKey::of(token);
        let value = lookups.tokens.get(&key).ok_or_else(|| {
            ConfigError::Waiting(format!(
                "no service account token yet for audience {:?}",
                key.audience
            ))
        })?;
        files.push(volume_file(&token.path, value.as_bytes().to_vec(), mode)?);
        Ok(())
    } else {
        Err(ConfigError::Unsupported(
            "a projected volume source the process node does not support (clusterTrustBundle or \
             podCertificate); supported: configMap, secret, downwardAPI, serviceAccountToken"
                .to_owned(),
        ))
    }
}

fn config_map_files(
    facts: &PodFacts,
    lookups: &Lookups,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), ConfigError> {
    let Some(cm) = lookups.configmaps.get(name) else {
        return absent("configmap", facts, name, optional);
    };
    let mut data: Vec<(String, Vec<u8>)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    data.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    keyed_files(&format!("ConfigMap {name:?}"), data, items, optional, mode, files)
}

fn secret_files(
    facts: &PodFacts,
    lookups: &Lookups,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), ConfigError> {
    let Some(secret) = lookups.secrets.get(name) else {
        return absent("secret", facts, name, optional);
    };
    let data = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    keyed_files(&format!("Secret {name:?}"), data, items, optional, mode, files)
}

fn absent(kind: &str, facts: &PodFacts, name: &str, optional: Option<bool>) -> Result<(), ConfigError> {
    if optional == Some(true) {
        Ok(())
    } else {
        Err(ConfigError::Waiting(format!(
            "{kind} \"{name}\" not found in namespace \"{}\"",
            facts.namespace()
        )))
    }
}

/// Every key as a file, or only `items` (key → path, optional mode).
fn keyed_files(
    what: &str,
    data: Vec<(String, Vec<u8>)>,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), ConfigError> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        for (key, value) in data {
            files.push(volume_file(&key, value, mode)?);
        }
        return Ok(());
    };
    for item in items {
        match data.iter().find(|(k, _)| *k == item.key) {
            Some((_, value)) => {
                files.push(volume_file(
                    &item.path,
                    value.clone(),
                    item_mode(item.mode, mode),
                )?);
            }
            None if optional == Some(true) => {}
            None => {
                return Err(ConfigError::Waiting(format!(
                    "{what} has no key {:?} (volume item {:?})",
                    item.key, item.path
                )));
            }
        }
    }
    Ok(())
}

fn downward_files(
    facts: &PodFacts,
    items: Option<&[DownwardAPIVolumeFile]>,
    mode: u32,
    files: &mut Vec<VolumeFile>,
) -> Result<(), ConfigError> {
    for item in items.into_iter().flatten() {
        let Some(field) = &item.field_ref else {
            return Err(ConfigError::Unsupported(format!(
                "downward-API file {:?} uses resourceFieldRef, which the process node does not support",
                item.path
            )));
        };
        let value = field_value(facts, &field.field_path)?;
        files.push(volume_file(
            &item.path,
            value.into_bytes(),
            item_mode(item.mode, mode),
        )?);
    }
    Ok(())
}

fn mode_or_default(mode: Option<i32>) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map_or(DEFAULT_MODE, |m| m & 0o777)
}

fn item_mode(mode: Option<i32>, default: u32) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map_or(default, |m| m & 0o777)
}

fn volume_file(path: &str, data: Vec<u8>, mode: u32) -> Result<VolumeFile, ConfigError> {
    Ok(VolumeFile {
        path: relative_path(path, "volume file path")?,
        data,
        mode,
    })
}

/// A relative path with no `..`, `.` or root components (the API server validates the same).
pub fn relative_path(path: &str, what: &str) -> Result<PathBuf, ConfigError> {
    let parsed = Path::new(path);
    let clean = !path.is_empty() && parsed.components().all(|c| matches!(c, Component::Normal(_)));
    if clean {
        Ok(parsed.to_path_buf())
    } else {
        Err(ConfigError::Unsupported(format!(
            "{what} {path:?} must be relative, without '..'"
        )))
    }
}

/// The mounts of `container`; `subPathExpr` is expanded with the container's environment.
pub fn plan_mounts(
    container: &Container,
    volumes: &[VolumePlan],
    env: &Environment,
) -> Result<Vec<MountPlan>, ConfigError> {
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        if !volumes.iter().any(|v| v.name == mount.name) {
            return Err(ConfigError::Unsupported(format!(
                "container {:?} mounts volume {:?}, which the pod does not define",
                container.name, mount.name
            )));
        }
        let mount_path = PathBuf::from(&mount.mount_path);
        if !mount_path.is_absolute() || mount_path.components().any(|c| c == Component::ParentDir) {
            return Err(ConfigError::Unsupported(format!(
                "mountPath {:?} must be an absolute path without '..'",
                mount.mount_path
            )));
        }
        let sub_path = match (&mount.sub_path, &mount.sub_path_expr) {
            (Some(sub), _) if !sub.is_empty() => Some(relative_path(sub, "subPath")?),
            (_, Some(expr)) if !expr.is_empty() => Some(relative_path(&env.expand(expr), "subPathExpr")?),
            _ => None,
        };
        mounts.push(MountPlan {
            mount_path,
            volume: mount.name.clone(),
            sub_path,
        });
    }
    // Parents first, so a mount nested in another lands inside it.
    mounts.sort_by(|a, b| a.mount_path.cmp(&b.mount_path));
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        ByteString,
        api::core::v1::{
            ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, DownwardAPIProjection,
            ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodSpec, ProjectedVolumeSource,
            Secret, SecretVolumeSource, ServiceAccountTokenProjection, VolumeMount,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn pod(volumes: Vec<Volume>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: Some(volumes),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn facts(pod: &Pod) -> PodFacts<'_> {
        PodFacts {
            pod,
            node_name: "n",
            pod_ip: "127.0.0.1",
            host_ip: "127.0.0.1",
        }
    }

    fn lookups() -> Lookups {
        let mut lookups = Lookups::default();
        lookups.configmaps.insert(
            "cfg".into(),
            ConfigMap {
                data: Some(BTreeMap::from([
                    ("a.txt".into(), "A".into()),
                    ("b.txt".into(), "B".into()),
                ])),
                binary_data: Some(BTreeMap::from([("bin".into(), ByteString(vec![0, 1]))])),
                ..Default::default()
            },
        );
        lookups.secrets.insert(
            "sec".into(),
            Secret {
                data: Some(BTreeMap::from([("token".into(), ByteString(b"t0k".to_vec()))])),
                ..Default::default()
            },
        );
        lookups.tokens.insert(TokenKey::new(None, None), "jwt".to_owned());
        lookups
    }

    fn volume(name: &str) -> Volume {
        Volume {
            name: name.into(),
            ..Default::default()
        }
    }

    fn files(plan: &VolumePlan) -> Vec<(String, Vec<u8>, u32)> {
        let VolumeContent::Files(files) = &plan.content else {
            panic!("{plan:?} has no files")
        };
        files
            .iter()
            .map(|f| (f.path.display().to_string(), f.data.clone(), f.mode))
            .collect()
    }

    #[test]
    fn config_map_items_and_modes() {
        let all = Volume {
            config_map: Some(ConfigMapVolumeSource {
                name: "cfg".into(),
                default_mode: Some(0o600),
                ..Default::default()
            }),
            ..volume("all")
        };
        let some = Volume {
            config_map: Some(ConfigMapVolumeSource {
                name: "cfg".into(),
                items: Some(vec![KeyToPath {
                    key: "b.txt".into(),
                    path: "sub/renamed".into(),
                    mode: Some(0o400),
                }]),
                ..Default::default()
            }),
            ..volume("some")
        };
        let pod = pod(vec![all, some]);
        let plans = plan_volumes(&facts(&pod), &lookups()).expect("plans");
        assert_eq!(
            files(&plans[0]),
            vec![
                ("a.txt".into(), b"A".to_vec(), 0o600),
                ("b.txt".into(), b"B".to_vec(), 0o600),
                ("bin".into(), vec![0, 1], 0o600),
            ]
        );
        assert_eq!(
            files(&plans[1]),
            vec![("sub/renamed".into(), b"B".to_vec(), 0o400)]
        );
    }

    #[test]
    fn projected_service_account_volume() {
        let projected = Volume {
            projected: Some(ProjectedVolumeSource {
                default_mode: None,
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: "token".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: "cfg".into(),
                            items: Some(vec![KeyToPath {
                                key: "a.txt".into(),
                                path: "ca.crt".into(),
                                mode: None,
                            }]),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: "namespace".into(),
                                field_ref: Some(ObjectFieldSelector {
                                    api_version: None,
                                    field_path: "metadata.namespace".into(),
                                }),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    },
                ]),
            }),
            ..volume("kube-api-access")
        };
        let pod = pod(vec![projected]);
        let plans = plan_volumes(&facts(&pod), &lookups()).expect("plans");
        assert_eq!(
            files(&plans[0]),
            vec![
                ("token".into(), b"jwt".to_vec(), 0o644),
                ("ca.crt".into(), b"A".to_vec(), 0o644),
                ("namespace".into(), b"ns".to_vec(), 0o644),
            ]
        );
    }

    #[test]
    fn missing_and_optional_sources() {
        let secret = |name: &str, optional| Volume {
            secret: Some(SecretVolumeSource {
                secret_name: Some(name.into()),
                optional,
                ..Default::default()
            }),
            ..volume("s")
        };
        let ok = pod(vec![secret("sec", None), secret("absent", Some(true))]);
        let plans = plan_volumes(&facts(&ok), &lookups()).expect("plans");
        assert_eq!(files(&plans[0]), vec![("token".into(), b"t0k".to_vec(), 0o644)]);
        assert_eq!(files(&plans[1]), vec![]);
        let missing = pod(vec![secret("absent", None)]);
        assert!(matches!(
            plan_volumes(&facts(&missing), &lookups()),
            Err(ConfigError::Waiting(_))
        ));
    }

    #[test]
    fn unsupported_volume_types_are_named() {
        let pvc = Volume {
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "data".into(),
                read_only: None,
            }),
            ..volume("data")
        };
        let pod = pod(vec![pvc]);
        let err = plan_volumes(&facts(&pod), &lookups()).expect_err("unsupported");
        assert!(
            matches!(&err, ConfigError::Unsupported(m) if m.contains("\"data\"")),
            "{err:?}"
        );
    }

    #[test]
    fn mounts_are_checked_and_sorted() {
        let plans = vec![
            VolumePlan {
                name: "work".into(),
                content: VolumeContent::EmptyDir,
            },
            VolumePlan {
                name: "cfg".into(),
                content: VolumeContent::Files(vec![]),
            },
        ];
        let mount = |name: &str, path: &str, sub: Option<&str>| VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub.map(Into::into),
            ..Default::default()
        };
        let container = Container {
            name: "c".into(),
            volume_mounts: Some(vec![
                mount("cfg", "/work/cfg", None),
                mount("work", "/work", Some("x/y")),
            ]),
            ..Default::default()
        };
        let mounts = plan_mounts(&container, &plans, &Environment::default()).expect("mounts");
        assert_eq!(mounts[0].mount_path, PathBuf::from("/work"));
        assert_eq!(mounts[0].sub_path, Some(PathBuf::from("x/y")));
        assert_eq!(mounts[1].volume, "cfg");

        for bad in [
            mount("nope", "/x", None),
            mount("work", "/x", Some("../etc")),
            mount("work", "rel", None),
        ] {
            let container = Container {
                name: "c".into(),
                volume_mounts: Some(vec![bad]),
                ..Default::default()
            };
            assert!(plan_mounts(&container, &plans, &Environment::default()).is_err());
        }
    }
}
