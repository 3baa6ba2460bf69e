//! The process node: a stand-in kubelet that registers a Node, binds unscheduled pods to it and
//! runs each container's command as a local process (image → local program map), reporting real
//! pod status, exit codes and restarts.
//!
//! What it implements, and how it maps container concepts onto plain processes:
//!
//! - **Images**: an [`ImageMap`] says which local program an image stands for; `command`/`args`
//!   follow Kubernetes rules. An unmapped image fails the pod (`ErrImageNeverPull`) with a message
//!   naming the image and [`images::IMAGE_MAP_ENV`].
//! - **Environment**: `env` (literals with `$(VAR)` expansion, ConfigMap/Secret keys with
//!   `optional`, downward-API `fieldRef`), `envFrom`; processes get a clean environment plus
//!   `PATH` (the node's), `HOME`, `HOSTNAME` and the `CONTEXTOS_*` variables below.
//! - **Volumes**: emptyDir, hostPath, configMap, secret, downwardAPI and projected (including
//!   service-account tokens) are written under the node directory; a mount at `mountPath: /x`
//!   is reachable at `$CONTEXTOS_ROOT/x`, and volume `my-vol` at `$CONTEXTOS_VOLUME_MY_VOL`.
//!   The working directory is `$CONTEXTOS_ROOT/<workingDir>`. See [`sandbox`] for the layout.
//! - **Users**: `runAsUser`/`runAsGroup` are honoured when the node runs as root;
//!   `runAsNonRoot` without a non-zero `runAsUser` waits with `CreateContainerConfigError`, as
//!   the kubelet does for an image that runs as root.
//! - **Lifecycle**: init containers in order; `restartPolicy` with CrashLoopBackOff delays and
//!   `restartCount`; `activeDeadlineSeconds` (`DeadlineExceeded`); graceful deletion (SIGTERM to
//!   the process group, SIGKILL after the grace period, terminal status, then a final `DELETE`
//!   with grace 0 and a UID precondition); `terminationMessagePath` (`$CONTEXTOS_ROOT/dev/
//!   termination-log` by default) and `FallbackToLogsOnError`.
//! - **Logs**: stdout and stderr of a container go to
//!   `<node dir>/logs/<namespace>/<pod>/<container>.log` ([`ProcessNode::log_file`]); the API
//!   server's `pods/log` is not served.
//!
//! Not implemented: probes, lifecycle hooks, resource limits, networking (every pod has the
//! node's IP, 127.0.0.1), ephemeral containers, sidecar (restartable init) containers as such.

mod containers;
pub mod env_vars;
pub mod images;
pub mod node;
pub mod plan;
pub mod pods;
pub mod process;
mod report;
pub mod sandbox;
pub mod status;
mod supervisor;
mod termination;
pub mod volumes;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use images::{ImageEntry, ImageMap, RUNNER_IMAGE, workspace_binary};
use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use thiserror::Error;
use tokio::task::JoinHandle;

use self::{node::HostFacts, process::Watchdog, sandbox::NodeDirs};

/// How a process node runs.
#[derive(Clone, Debug)]
pub struct ProcessNodeConfig {
    /// Name of the Node object.
    pub node_name: String,
    /// Directory for pod files and container logs.
    pub dir: PathBuf,
    /// The node's address, also every pod's IP.
    pub host_ip: String,
    pub images: ImageMap,
    /// First CrashLoopBackOff delay (the kubelet's is 10 s) and its cap (300 s).
    pub crash_loop_backoff: (Duration, Duration),
    /// How often the node Lease is renewed.
    pub lease_renew_interval: Duration,
    /// How often node status is posted (the kubelet's nodeStatusReportFrequency).
    pub status_report_interval: Duration,
}

impl ProcessNodeConfig {
    /// Kubelet-like defaults with the default image map plus `CONTEXTOS_PROCESS_NODE_IMAGES`.
    pub fn new(node_name: &str, dir: &Path) -> Result<Self, NodeError> {
        Ok(Self {
            node_name: node_name.to_owned(),
            dir: dir.to_path_buf(),
            host_ip: "127.0.0.1".to_owned(),
            images: ImageMap::with_env_overrides().map_err(NodeError::ImageMap)?,
            crash_loop_backoff: (Duration::from_secs(10), Duration::from_secs(300)),
            lease_renew_interval: Duration::from_secs(10),
            status_report_interval: Duration::from_secs(300),
        })
    }
}

/// The process node could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("process node directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the process-node watchdog (/bin/sh): {0}")]
    Watchdog(#[source] std::io::Error),
    #[error("cannot register Node {name:?}: {source}")]
    Register {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    ImageMap(images::ImageMapSyntaxError),
    #[error("cannot make the process node's API client: {0}")]
    Client(#[source] kube::Error),
}

/// State shared by the pod loop and every pod supervisor.
pub(crate) struct NodeShared {
    pub client: Client,
    /// The same API server as this node (user `system:node:<name>`, group `system:nodes`): what
    /// a kubelet asks for pods' service-account tokens with. The Node authorizer lets it have
    /// tokens only for pods bound to this node, and only a node gets one for the gateway's
    /// audience (admission policy contextos-gateway-tokens).
    pub as_node: Client,
    pub node_name: String,
    pub host_ip: String,
    pub images: ImageMap,
    pub dirs: NodeDirs,
    pub watchdog: Arc<Watchdog>,
    pub node_is_root: bool,
    /// `PATH` for container processes: the node's own.
    pub host_path: String,
    pub crash_loop_backoff: (Duration, Duration),
    pub recorder: Recorder,
}

/// Aborts a task when dropped, so stopping the node stops every pod supervisor, and dropping a
/// supervisor kills its processes.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running process node. Dropping it stops the pod loop and kills every container process.
#[derive(Debug)]
pub struct ProcessNode {
    name: String,
    dirs: NodeDirs,
    _tasks: Vec<AbortOnDrop>,
    _watchdog: Arc<Watchdog>,
}

impl ProcessNode {
    /// Registers the Node and starts the heartbeat and pod loops on the current Tokio runtime.
    /// `cluster` is an administrator's configuration: the node acts with it, except that it asks
    /// for pods' tokens as the node itself (impersonated), as a kubelet does.
    pub async fn start(cluster: &kube::Config, config: ProcessNodeConfig) -> Result<Self, NodeError> {
        let client = Client::try_from(cluster.clone()).map_err(NodeError::Client)?;
        let mut node = cluster.clone();
        node.auth_info.impersonate = Some(format!("system:node:{}", config.node_name));
        node.auth_info.impersonate_groups =
            Some(vec!["system:nodes".to_owned(), "system:authenticated".to_owned()]);
        let as_node = Client::try_from(node).map_err(NodeError::Client)?;
        let dirs = NodeDirs::create(&config.dir).map_err(|source| NodeError::Dir {
            dir: config.dir.clone(),
            source,
        })?;
        let watchdog = Arc::new(Watchdog::start().map_err(NodeError::Watchdog)?);
        let host = HostFacts::read();
        let register = |source| NodeError::Register {
            name: config.node_name.clone(),
            source,
        };
        let node_uid = node::register(&client, &config.node_name, &config.host_ip, &host)
            .await
            .map_err(register)?;
        let labels: BTreeMap<String, String> =
            serde_json::from_value(node::node_object(&config.node_name)["metadata"]["labels"].clone())
                .unwrap_or_default();
        let shared = Arc::new(NodeShared {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "contextos-process-node".to_owned(),
                    instance: Some(config.node_name.clone()),
                },
            ),
            client: client.clone(),
            as_node,
            node_name: config.node_name.clone(),
            host_ip: config.host_ip.clone(),
            images: config.images.clone(),
            dirs: dirs.clone(),
            watchdog: watchdog.clone(),
            node_is_root: nix::unistd::geteuid().is_root(),
            host_path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
            crash_loop_backoff: config.crash_loop_backoff,
        });
        let heartbeat = tokio::spawn(node::heartbeat(
            client,
            config.node_name.clone(),
            node_uid,
            config.host_ip.clone(),
            host,
            config.lease_renew_interval,
            config.status_report_interval,
        ));
        let pods = tokio::spawn(pods::run(shared, labels));
        tracing::info!(node = %config.node_name, dir = %config.dir.display(), "process node started");
        Ok(Self {
            name: config.node_name,
            dirs,
            _tasks: vec![AbortOnDrop(heartbeat), AbortOnDrop(pods)],
            _watchdog: watchdog,
        })
    }

    /// Name of the Node object.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node directory.
    pub fn dir(&self) -> &Path {
        self.dirs.root()
    }

    /// The file a container's stdout and stderr go to.
    pub fn log_file(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.dirs.log_file(namespace, pod, container)
    }
}
