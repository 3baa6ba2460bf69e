//! The supervisor's container steps: read what the pod refers to and plan it, start a container's
//! process in its prepared root, and turn an exit (or a failed start) into a `Terminated` record.

use std::{io, path::PathBuf, process::ExitStatus};

use jiff::Timestamp;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
};
use kube::{Api, Client, ResourceExt, api::PostParams, runtime::events::EventType};

use super::{
    env_vars::Environment,
    plan::{ConfigError, ContainerPlan, Lookups, PlanError, PodFacts, TokenKey, plan_container, references},
    process::{LaunchSpec, Launched, ProcessGroup, exit_code, launch, resolve_program},
    sandbox::{ContainerRoot, termination_message},
    status::{ContainerPhase, ContainerRuntime, PodRuntime, Terminated},
    supervisor::Supervisor,
    volumes::plan_volumes,
};

/// Exit code container runtimes report when a process could not be started.
const START_ERROR_EXIT_CODE: i32 = 128;

/// A container position in the pod: init containers run first, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Init(usize),
    App(usize),
}

impl PodRuntime {
    pub fn container_mut(&mut self, slot: Slot) -> Option<&mut ContainerRuntime> {
        match slot {
            Slot::Init(i) => self.init.get_mut(i),
            Slot::App(i) => self.containers.get_mut(i),
        }
    }
}

/// A container whose process runs. Dropping it kills the process group.
#[derive(Debug)]
pub struct RunningContainer {
    pub group: ProcessGroup,
    started_at: Timestamp,
    container_id: String,
    termination_log: PathBuf,
    log: PathBuf,
    fallback_to_logs: bool,
}

impl RunningContainer {
    /// The record of a finished run; any processes left in the group are killed.
    pub fn finished(self, status: io::Result<ExitStatus>) -> Terminated {
        let (code, signal) = match status {
            Ok(status) => exit_code(status),
            Err(err) => {
                tracing::warn!(%err, "cannot wait for container process");
                (255, None)
            }
        };
        Terminated {
            exit_code: code,
            signal,
            reason: Terminated::reason_for(code).to_owned(),
            message: termination_message(&self.termination_log, &self.log, self.fallback_to_logs, code),
            started_at: Some(self.started_at),
            finished_at: Timestamp::now(),
            container_id: Some(self.container_id),
        }
    }
}

impl Supervisor {
    /// Reads the ConfigMaps, Secrets and tokens the pod refers to, then plans volumes and every
    /// container.
    pub(super) async fn plan_pod(&mut self) -> Result<(), PlanError> {
        let lookups = fetch_lookups(&self.shared.client, &self.shared.as_node, &self.pod).await?;
        let pod = self.pod.clone();
        let facts = PodFacts {
            pod: &pod,
            node_name: &self.shared.node_name,
            pod_ip: &self.shared.host_ip,
            host_ip: &self.shared.host_ip,
        };
        let volumes = plan_volumes(&facts, &lookups)?;
        let spec = pod.spec.as_ref();
        let init = spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten();
        let app = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let slots = init
            .enumerate()
            .map(|(i, c)| (Slot::Init(i), c))
            .chain(app.iter().enumerate().map(|(i, c)| (Slot::App(i), c)));
        let mut plans = std::collections::BTreeMap::new();
        for (slot, container) in slots {
            let plan = plan_container(
                container,
                &facts,
                &lookups,
                &self.shared.images,
                &volumes,
                self.shared.node_is_root,
            )?;
            plans.insert(slot, plan);
        }
        self.volumes = volumes;
        self.plans = plans;
        Ok(())
    }

    /// Starts the container in `slot`. A failure to start is reported like a container runtime
    /// does: terminated with exit code 128 and reason `StartError`.
    pub(super) fn start_container(&mut self, slot: Slot) {
        let Some(plan) = self.plans.get(&slot).cloned() else {
            return;
        };
        let log = self.log_for(slot, &plan.name);
        let spec = match self.sandbox.prepare_container(&plan, &self.volumes) {
            Ok(root) => launch_spec(
                &plan,
                &root,
                &self.shared.host_path,
                &self.pod.name_any(),
                log.clone(),
            ),
            Err(err) => Err(format!("cannot prepare the container's root: {err}")),
        };
        let launched = spec.and_then(|(spec, termination_log)| {
            launch(&spec, &self.shared.watchdog).map(|launched| (launched, termination_log))
        });
        let (Launched { child, group }, termination_log) = match launched {
            Ok(launched) => launched,
            Err(message) => return self.start_failed(slot, message),
        };
        let started_at = Timestamp::now();
        let container_id = format!("process://{}", group.pid());
        if let Some(c) = self.rt.container_mut(slot) {
            c.state = ContainerPhase::Running {
                started_at,
                container_id: container_id.clone(),
            };
        }
        let running = RunningContainer {
            group,
            started_at,
            container_id,
            termination_log,
            log,
            fallback_to_logs: plan.fallback_to_logs,
        };
        self.running.insert(slot, running);
        self.push_exit(slot, child);
        self.event(
            EventType::Normal,
            "Started",
            &format!("Started container {}", plan.name),
        );
    }

    /// The container's log file; the first start in this pod (uid) begins a fresh one, so a pod
    /// that reuses an earlier pod's name does not inherit its output.
    fn log_for(&mut self, slot: Slot, container: &str) -> PathBuf {
        let namespace = self.pod.namespace().unwrap_or_default();
        let log = self
            .shared
            .dirs
            .log_file(&namespace, &self.pod.name_any(), container);
        if !self.logs_started.contains(&slot) {
            let _ = std::fs::remove_file(&log);
            self.logs_started.push(slot);
        }
        log
    }

    fn start_failed(&mut self, slot: Slot, message: String) {
        self.event(EventType::Warning, "Failed", &format!("Error: {message}"));
        let terminated = Terminated {
            exit_code: START_ERROR_EXIT_CODE,
            signal: None,
            reason: "StartError".to_owned(),
            message: Some(message),
            started_at: None,
            finished_at: Timestamp::now(),
            container_id: None,
        };
        self.stopped.push_back((slot, terminated));
    }
}

/// What the pod's volumes and variables name: ConfigMaps and Secrets read with `client`,
/// service-account tokens asked for with `as_node` (the node's own identity).
async fn fetch_lookups(client: &Client, as_node: &Client, pod: &Pod) -> Result<Lookups, ConfigError> {
    let refs = references(pod);
    let namespace = pod.namespace().unwrap_or_default();
    let mut lookups = Lookups::default();
    let unreadable = |kind: &str, name: &str, err: kube::Error| {
        ConfigError::Waiting(format!("cannot read {kind} \"{name}\": {err}"))
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    for name in &refs.configmaps {
        match configmaps.get_opt(name).await {
            Ok(Some(cm)) => drop(lookups.configmaps.insert(name.clone(), cm)),
            Ok(None) => {}
            Err(err) => return Err(unreadable("configmap", name, err)),
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for name in &refs.secrets {
        match secrets.get_opt(name).await {
            Ok(Some(secret)) => drop(lookups.secrets.insert(name.clone(), secret)),
            Ok(None) => {}
            Err(err) => return Err(unreadable("secret", name, err)),
        }
    }
    for key in refs.tokens {
        let token = request_token(as_node, pod, &namespace, &key).await?;
        lookups.tokens.insert(key, token);
    }
    Ok(lookups)
}

/// A service-account token bound to the pod (what the kubelet projects into
/// `kube-api-access-*` volumes).
async fn request_token(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    key: &TokenKey,
) -> Result<String, ConfigError> {
    let spec = pod.spec.as_ref();
    let account = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(key.audience.clone().into_iter().collect()),
            expiration_seconds: Some(key.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        }),
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let response: TokenRequest = accounts
        .create_subresource("token", &account, &PostParams::default(), &request)
        .await
        .map_err(|err| {
            ConfigError::Waiting(format!(
                "cannot get a token for service account \"{account}\": {err}"
            ))
        })?;
    Ok(response.status.and_then(|s| s.token).unwrap_or_default())
}

/// The process to start for `plan` in its prepared root, and its termination-message file.
/// Processes get a clean environment: `PATH` (the container's, else the node's), `HOME`,
/// `HOSTNAME`, `PWD`, the `CONTEXTOS_*` mount variables, then the container's own variables.
fn launch_spec(
    plan: &ContainerPlan,
    root: &ContainerRoot,
    host_path: &str,
    pod_name: &str,
    log: PathBuf,
) -> Result<(LaunchSpec, PathBuf), String> {
    let path = plan.env.get("PATH").unwrap_or(host_path).to_owned();
    let name = plan.argv.first().ok_or("empty command")?;
    let program = resolve_program(name, &path, &root.cwd)?;
    let mut env = Environment::default();
    env.set("PATH", path);
    env.set("HOME", root.root.display().to_string());
    env.set("HOSTNAME", pod_name.to_owned());
    // Shells take the logical working directory from PWD, so `pwd` shows the mount path under
    // $CONTEXTOS_ROOT rather than the volume directory the mount links to.
    env.set("PWD", root.cwd.display().to_string());
    for (name, value) in root.env.iter().chain(plan.env.vars()) {
        env.set(name, value.clone());
    }
    let spec = LaunchSpec {
        program,
        args: plan.argv.iter().skip(1).cloned().collect(),
        env: env.vars().to_vec(),
        cwd: root.cwd.clone(),
        log,
        user: plan.run_as.map(|r| (r.uid, r.gid)),
    };
    Ok((spec, root.termination_log.clone()))
}
