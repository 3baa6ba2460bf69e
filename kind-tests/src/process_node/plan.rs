//! From a pod spec to what the node will execute: which objects a pod refers to, and for each
//! container its argv, environment, mounts, working directory and user. Pure: every lookup result
//! is passed in, so a malformed pod becomes an error value, never a panic.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccountTokenProjection};
use thiserror::Error;

use super::{
    env_vars::{Environment, resolve_env},
    images::{ImageError, ImageMap},
    volumes::{MountPlan, VolumePlan, plan_mounts},
};

/// Default expiry the API server gives projected service-account tokens (kubelet default).
const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3607;
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Facts about a pod that env vars and downward-API files can refer to.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub node_name: &'a str,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
}

impl PodFacts<'_> {
    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }
}

/// A projected service-account token, identified the way the kubelet caches them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenKey {
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

impl TokenKey {
    pub fn new(audience: Option<String>, expiration_seconds: Option<i64>) -> Self {
        Self {
            audience: audience.filter(|a| !a.is_empty()),
            expiration_seconds: expiration_seconds.unwrap_or(DEFAULT_TOKEN_EXPIRATION_SECONDS),
        }
    }

    pub fn of(projection: &ServiceAccountTokenProjection) -> Self {
        Self::new(projection.audience.clone(), projection.expiration_seconds)
    }
}

/// The ConfigMaps, Secrets and tokens a pod refers to, as far as they exist (absent ones are
/// simply not in the maps).
#[derive(Clone, Debug, Default)]
pub struct Lookups {
    pub configmaps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    pub tokens: BTreeMap<TokenKey, String>,
}

/// Names a pod refers to; the node fetches these into [`Lookups`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    pub configmaps: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
    pub tokens: BTreeSet<TokenKey>,
}

/// Why a container cannot be configured.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Something the pod needs is not there yet (a ConfigMap, Secret or key) or the pod cannot run
    /// as asked; like the kubelet, the node reports `CreateContainerConfigError` and retries.
    #[error("{0}")]
    Waiting(String),
    /// The pod uses something the process node does not implement, or is malformed; the pod fails.
    #[error("{0}")]
    Unsupported(String),
}

/// Why a container has no plan.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The user a process runs as (only honoured when the node itself runs as root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Everything needed to start one container as a local process. Paths are container paths
/// (absolute, as written in the pod spec); the sandbox maps them under the container's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPlan {
    pub name: String,
    pub image: String,
    pub argv: Vec<String>,
    pub env: Environment,
    pub working_dir: Option<PathBuf>,
    pub mounts: Vec<MountPlan>,
    pub run_as: Option<RunAs>,
    pub termination_message_path: PathBuf,
    /// `terminationMessagePolicy: FallbackToLogsOnError`.
    pub fallback_to_logs: bool,
}

/// Every ConfigMap, Secret and token the pod's containers and volumes refer to.
pub fn references(pod: &Pod) -> References {
    let mut refs = References::default();
    let Some(spec) = &pod.spec else { return refs };
    let containers = spec.init_containers.iter().flatten().chain(&spec.containers);
    for container in containers {
        for source in container.env_from.iter().flatten() {
            refs.configmaps
                .extend(source.config_map_ref.as_ref().map(|c| c.name.clone()));
            refs.secrets
                .extend(source.secret_ref.as_ref().map(|s| s.name.clone()));
        }
        for from in container
            .env
            .iter()
            .flatten()
            .filter_map(|v| v.value_from.as_ref())
        {
            refs.configmaps
                .extend(from.config_map_key_ref.as_ref().map(|c| c.name.clone()));
            refs.secrets
                .extend(from.secret_key_ref.as_ref().map(|s| s.name.clone()));
        }
    }
    for volume in spec.volumes.iter().flatten() {
        refs.configmaps
            .extend(volume.config_map.as_ref().map(|c| c.name.clone()));
        refs.secrets
            .extend(volume.secret.as_ref().and_then(|s| s.secret_name.clone()));
        let sources = volume.projected.as_ref().and_then(|p| p.sources.as_ref());
        for source in sources.into_iter().flatten() {
            refs.configmaps
                .extend(source.config_map.as_ref().map(|c| c.name.clone()));
            refs.secrets
                .extend(source.secret.as_ref().map(|s| s.name.clone()));
            refs.tokens
                .extend(source.service_account_token.as_ref().map(TokenKey::of));
        }
    }
    refs
}

/// The plan for one container. `node_is_root`: whether the node can switch users.
pub fn plan_container(
    container: &Container,
    facts: &PodFacts,
    lookups: &Lookups,
    images: &ImageMap,
    volumes: &[VolumePlan],
    node_is_root: bool,
) -> Result<ContainerPlan, PlanError> {
    let image = container.image.clone().unwrap_or_default();
    let env = resolve_env(container, facts, lookups)?;
    let command: Vec<String> = container
        .command
        .iter()
        .flatten()
        .map(|c| env.expand(c))
        .collect();
    let args: Vec<String> = container.args.iter().flatten().map(|a| env.expand(a)).collect();
    let argv = images.argv(&container.name, &image, &command, &args)?;
    let mounts = plan_mounts(container, volumes, &env)?;
    let run_as = run_as(container, facts, node_is_root)?;
    Ok(ContainerPlan {
        name: container.name.clone(),
        image,
        argv,
        env,
        working_dir: container
            .working_dir
            .as_ref()
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        mounts,
        run_as,
        termination_message_path: PathBuf::from(
            container
                .termination_message_path
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH),
        ),
        fallback_to_logs: container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"),
    })
}

/// `runAsUser`/`runAsGroup`/`runAsNonRoot` from the container, falling back to the pod. When the
/// node is not root it cannot switch users, and the process simply runs as the node's user.
fn run_as(container: &Container, facts: &PodFacts, node_is_root: bool) -> Result<Option<RunAs>, ConfigError> {
    let pod_sc = facts.pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        == Some(true);
    if !node_is_root {
        return Ok(None);
    }
    let pod_name = facts.pod.metadata.name.as_deref().unwrap_or_default();
    match uid {
        Some(0) if non_root => Err(ConfigError::Waiting(format!(
            "container's runAsUser breaks non-root policy (pod: \"{pod_name}_{}\", container: {})",
            facts.namespace(),
            container.name
        ))),
        // The mapped images run as root, like busybox does.
        None if non_root => Err(ConfigError::Waiting(
            "container has runAsNonRoot and image will run as root (set runAsUser to a non-zero id)"
                .to_owned(),
        )),
        None => Ok(None),
        Some(uid) => {
            let to_id = |id: i64, what: &str| {
                u32::try_from(id)
                    .map_err(|_| ConfigError::Unsupported(format!("{what} {id} is out of range")))
            };
            let uid = to_id(uid, "runAsUser")?;
            let gid = gid.map(|g| to_id(g, "runAsGroup")).transpose()?.unwrap_or(0);
            Ok(Some(RunAs { uid, gid }))
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            ConfigMapKeySelector, EnvVar, EnvVarSource, PodSecurityContext, PodSpec, SecurityContext,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn pod(containers: Vec<Container>, sc: Option<PodSecurityContext>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                security_context: sc,
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

    fn busybox(command: &[&str]) -> Container {
        Container {
            name: "main".into(),
            image: Some("busybox:1.36".into()),
            command: Some(command.iter().map(|c| (*c).to_owned()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn command_is_expanded_with_the_environment() {
        let mut container = busybox(&["sh", "-c", "echo $(GREETING) $HOME"]);
        container.env = Some(vec![EnvVar {
            name: "GREETING".into(),
            value: Some("hi".into()),
            value_from: None,
        }]);
        let pod = pod(vec![container.clone()], None);
        let plan = plan_container(
            &container,
            &facts(&pod),
            &Lookups::default(),
            &ImageMap::with_defaults(),
            &[],
            false,
        )
        .expect("plans");
        assert_eq!(plan.argv, vec!["sh", "-c", "echo hi $HOME"]);
        assert_eq!(
            plan.termination_message_path,
            PathBuf::from("/dev/termination-log")
        );
        assert_eq!(plan.run_as, None);
    }

    #[test]
    fn unknown_image_is_an_image_error() {
        let mut container = busybox(&["true"]);
        container.image = Some("ghcr.io/acme/app:1".into());
        let pod = pod(vec![container.clone()], None);
        let err = plan_container(
            &container,
            &facts(&pod),
            &Lookups::default(),
            &ImageMap::with_defaults(),
            &[],
            false,
        )
        .expect_err("unknown image");
        assert!(matches!(err, PlanError::Image(ImageError::Unknown { .. })));
    }

    #[test]
    fn users_follow_the_security_context_when_root() {
        let container = Container {
            security_context: Some(SecurityContext {
                run_as_user: Some(1000),
                ..Default::default()
            }),
            ..busybox(&["id"])
        };
        let non_root = Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_group: Some(3000),
            ..Default::default()
        });
        let p = pod(vec![container.clone()], non_root.clone());
        let plan = |c: &Container, p: &Pod, root| {
            plan_container(
                c,
                &facts(p),
                &Lookups::default(),
                &ImageMap::with_defaults(),
                &[],
                root,
            )
        };
        assert_eq!(
            plan(&container, &p, true).expect("plans").run_as,
            Some(RunAs { uid: 1000, gid: 3000 })
        );
        assert_eq!(plan(&container, &p, false).expect("plans").run_as, None);
        // runAsNonRoot with the image's (root) user waits, like the kubelet.
        let plain = busybox(&["id"]);
        let p = pod(vec![plain.clone()], non_root);
        assert!(matches!(
            plan(&plain, &p, true),
            Err(PlanError::Config(ConfigError::Waiting(_)))
        ));
    }

    #[test]
    fn references_cover_env_and_volumes() {
        let mut container = busybox(&["true"]);
        container.env = Some(vec![EnvVar {
            name: "X".into(),
            value: None,
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "cm".into(),
                    key: "k".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        }]);
        let refs = references(&pod(vec![container], None));
        assert_eq!(refs.configmaps, BTreeSet::from(["cm".to_owned()]));
        assert!(refs.secrets.is_empty());
    }
}
