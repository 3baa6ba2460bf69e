//! The cluster a test binary runs against, started once per test process: an existing cluster
//! when `KUBECONFIG` is set, otherwise the local control plane (`testenv`) plus a node — the
//! in-process process node ([`TestEnv::shared`]) or the real node of `kind-tests/realnode`
//! ([`TestEnv::real_node`]). Either way the project's CRDs are installed first.

pub mod control_plane;
pub mod crds;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    api::LogParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use thiserror::Error;
use tokio::runtime::Runtime;

use crate::{
    process_node::{NodeError, ProcessNode, ProcessNodeConfig, RUNNER_IMAGE},
    real_node::RealNode,
};

/// Name of the Node the process node registers.
pub const PROCESS_NODE_NAME: &str = "contextos-process-node";

/// The test environment could not start.
#[derive(Debug, Error)]
pub enum EnvError {
    #[error("testenv binary: {0}")]
    Build(String),
    #[error(
        "the local control plane did not start: {reason}\n--- last lines of {} ---\n{stderr_tail}",
        stderr_path.display()
    )]
    NotReady {
        reason: String,
        stderr_path: PathBuf,
        stderr_tail: String,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build a client for {cluster}: {reason}")]
    Client { cluster: String, reason: String },
    #[error("CRD {file}: {reason}")]
    Crd { file: String, reason: String },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("the test environment failed to start (first attempt in this test binary): {0}")]
    Earlier(String),
}

/// Where the tests run.
#[derive(Debug)]
enum Backend {
    /// testenv + the process node, owned by this test process.
    Local {
        plane: control_plane::ControlPlane,
        node: ProcessNode,
    },
    /// testenv + the real node (kubelet, containerd, CNI, kube-proxy, kube-router), owned by this
    /// test process.
    RealNode {
        plane: control_plane::ControlPlane,
        node: RealNode,
    },
    /// A cluster from `KUBECONFIG`; nothing is started.
    External { server: String },
}

/// Which node the local control plane gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeKind {
    Process,
    Real,
}

/// How long start-up took, for the record.
#[derive(Clone, Copy, Debug)]
pub struct StartupTimings {
    /// Spawning testenv until its READY line (zero for an external cluster).
    pub control_plane: Duration,
    pub crds: Duration,
    pub total: Duration,
}

/// A cluster shared by every test of one test binary.
pub struct TestEnv {
    /// The client of the environment's own runtime (process node, reports, cleanup).
    client: Client,
    config: Config,
    /// One client per test runtime: hyper binds a pooled connection to the runtime that opened
    /// it, and each `#[tokio::test]` has its own runtime, which ends with the test; sharing one
    /// client across tests hands later tests connections whose runtime is gone.
    clients: Mutex<Vec<(tokio::runtime::Id, Client)>>,
    backend: Backend,
    timings: StartupTimings,
    /// Runs the process node and the client's connections; lives as long as the process, so
    /// every test's own runtime can use the client.
    runtime: Runtime,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Result<TestEnv, String>> = OnceLock::new();
static REAL: OnceLock<Result<TestEnv, String>> = OnceLock::new();

impl TestEnv {
    /// The environment of this test binary, started by the first caller: `KUBECONFIG`, or the
    /// local control plane with the node [`cluster_node`] chooses (the real node when this
    /// machine can run it, the process node otherwise).
    pub async fn shared() -> Result<&'static TestEnv, EnvError> {
        if std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty()) {
            return Self::started(&SHARED, NodeKind::Process).await;
        }
        match cluster_node()? {
            NodeKind::Real => Self::real_node().await,
            NodeKind::Process => Self::started(&SHARED, NodeKind::Process).await,
        }
    }

    /// `KUBECONFIG`, or the local control plane with the process node, whichever node the other
    /// tests run on: for the tests of the process node itself.
    pub async fn process_node() -> Result<&'static TestEnv, EnvError> {
        Self::started(&SHARED, NodeKind::Process).await
    }

    /// The local control plane with the real node (`KUBECONFIG` is ignored: the tests start and
    /// inspect the node itself). Check [`crate::real_node::unavailable`] first.
    pub async fn real_node() -> Result<&'static TestEnv, EnvError> {
        Self::started(&REAL, NodeKind::Real).await
    }

    async fn started(
        cell: &'static OnceLock<Result<TestEnv, String>>,
        kind: NodeKind,
    ) -> Result<&'static TestEnv, EnvError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Start-up blocks (and may build testenv), so it runs on its own thread.
        std::thread::Builder::new()
            .name("kind-tests-env-start".to_owned())
            .spawn(move || {
                let _ = tx.send(cell.get_or_init(|| Self::start(kind).map_err(|e| error_chain(&e))));
            })
            .map_err(|source| EnvError::Io {
                what: "spawn the start-up thread".to_owned(),
                source,
            })?;
        let started = rx
            .await
            .map_err(|_| EnvError::Earlier("the start-up thread panicked".to_owned()))?;
        started.as_ref().map_err(|e| EnvError::Earlier(e.clone()))
    }

    fn start(kind: NodeKind) -> Result<Self, EnvError> {
        init_tracing();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kind-tests-env")
            .enable_all()
            .build()
            .map_err(|source| EnvError::Io {
                what: "start the background runtime".to_owned(),
                source,
            })?;
        let started = Instant::now();
        let (config, client, backend, control_plane) = runtime.block_on(connect(kind))?;
        let crds_started = Instant::now();
        runtime.block_on(crds::install_crds(&client, &repo_root().join("manifests/crds")))?;
        let timings = StartupTimings {
            control_plane,
            crds: crds_started.elapsed(),
            total: started.elapsed(),
        };
        let env = Self {
            client,
            config,
            clients: Mutex::new(Vec::new()),
            backend,
            timings,
            runtime,
        };
        eprintln!("kind-tests: {}", env.describe());
        Ok(env)
    }

    /// A client for the cluster, bound to the calling runtime (see `clients`).
    pub fn client(&self) -> Client {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return self.client.clone();
        };
        let id = handle.id();
        if id == self.runtime.handle().id() {
            return self.client.clone();
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, client)) = clients.iter().find(|(runtime, _)| *runtime == id) {
            return client.clone();
        }
        // The same config already made a client once, so this conversion cannot fail in practice.
        let client = Client::try_from(self.config.clone()).unwrap_or_else(|_| self.client.clone());
        clients.push((id, client.clone()));
        client
    }

    /// The local control plane's kubeconfig (for programs started by a test or benchmark).
    pub fn kubeconfig(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local { plane, .. } | Backend::RealNode { plane, .. } => Some(&plane.kubeconfig),
            Backend::External { .. } => None,
        }
    }

    /// Whether this is the local control plane (with either node), not a `KUBECONFIG`.
    pub fn is_local(&self) -> bool {
        !matches!(self.backend, Backend::External { .. })
    }

    /// The real node, when the tests run on it.
    pub fn real(&self) -> Option<&RealNode> {
        match &self.backend {
            Backend::RealNode { node, .. } => Some(node),
            _ => None,
        }
    }

    /// The image runner pods and replay Jobs run: the workspace's binaries packed for the real
    /// node, or the image the examples pin (which the process node maps to the same binaries).
    pub fn runner_image(&self) -> &str {
        match &self.backend {
            Backend::RealNode { node, .. } => node.contextos_image(),
            _ => RUNNER_IMAGE,
        }
    }

    /// A busybox image the node has: the one the real node builds from Debian's busybox-static,
    /// or `busybox:1.36` (which the process node maps to the host's `sh`, and a real cluster pulls).
    pub fn busybox_image(&self) -> &'static str {
        match &self.backend {
            Backend::RealNode { .. } => crate::real_node::BUSYBOX_IMAGE,
            _ => "busybox:1.36",
        }
    }

    /// Where sandboxed pods reach services the tests run on this machine (the gateway): the
    /// real node's address, or loopback for the process node (its pods are host processes).
    pub fn host_address(&self) -> std::net::Ipv4Addr {
        match &self.backend {
            Backend::RealNode { .. } => crate::real_node::NODE_IP,
            _ => std::net::Ipv4Addr::LOCALHOST,
        }
    }

    pub fn timings(&self) -> StartupTimings {
        self.timings
    }

    /// The process node's directory (local environment only).
    pub fn node_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local { node, .. } => Some(node.dir()),
            Backend::RealNode { .. } | Backend::External { .. } => None,
        }
    }

    /// One line about where the tests run.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local { plane, node } => format!(
                "local control plane (testenv pid {}) ready in {:.1?}, CRDs established in {:.1?}, \
                 process node {:?}; files in {}",
                plane.pid,
                self.timings.control_plane,
                self.timings.crds,
                node.name(),
                plane.dir.display()
            ),
            Backend::RealNode { plane, node } => format!(
                "local control plane (testenv pid {}) ready in {:.1?}, CRDs established in {:.1?}, \
                 real node {:?} (image {}); files in {} and {}",
                plane.pid,
                self.timings.control_plane,
                self.timings.crds,
                node.name(),
                node.contextos_image(),
                plane.dir.display(),
                node.dir().display()
            ),
            Backend::External { server } => format!(
                "cluster from KUBECONFIG ({server}), CRDs established in {:.1?}",
                self.timings.crds
            ),
        }
    }

    /// `kubectl` for this cluster: testenv's own kubectl with the control plane's kubeconfig, or
    /// `kubectl` from `PATH` with the inherited `KUBECONFIG`. Killed if the test drops it.
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut command = match &self.backend {
            Backend::Local { plane, .. } | Backend::RealNode { plane, .. } => {
                let mut command = tokio::process::Command::new(&plane.bin);
                command.arg("kubectl").arg("--kubeconfig").arg(&plane.kubeconfig);
                command
            }
            Backend::External { .. } => tokio::process::Command::new("kubectl"),
        };
        command.stdin(std::process::Stdio::null()).kill_on_drop(true);
        command
    }

    /// What a container printed: the process node's log file locally, the `pods/log` API on a
    /// real cluster. A container that has not started yet has an empty log.
    pub async fn container_log(&self, namespace: &str, pod: &str, container: &str) -> Result<String, String> {
        match &self.backend {
            Backend::Local { node, .. } => {
                let path = node.log_file(namespace, pod, container);
                match tokio::fs::read_to_string(&path).await {
                    Ok(text) => Ok(text),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                    Err(err) => Err(format!("read {}: {err}", path.display())),
                }
            }
            Backend::RealNode { .. } | Backend::External { .. } => {
                let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
                let params = LogParams {
                    container: Some(container.to_owned()),
                    ..Default::default()
                };
                pods.logs(pod, &params).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Runs `future` on the environment's runtime and waits for it from any thread, even one
    /// inside another runtime (a `Drop`), for at most `timeout`.
    pub fn block_on<F>(&self, timeout: Duration, future: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv_timeout(timeout).ok()
    }
}

/// Chooses the shared environment's node: `CONTEXTOS_CLUSTER_NODE=real|process`, or by default
/// the real node where it can run (root), the process node otherwise. With
/// `CONTEXTOS_REQUIRE_REALNODE=1` (CI) the process node is never chosen by default.
fn cluster_node() -> Result<NodeKind, EnvError> {
    match std::env::var(CLUSTER_NODE_ENV).as_deref() {
        Ok("real") => Ok(NodeKind::Real),
        Ok("process") => Ok(NodeKind::Process),
        Ok(other) if !other.is_empty() => Err(EnvError::Build(format!(
            "{CLUSTER_NODE_ENV}={other:?}: use `real` (kubelet, containerd, CNI; needs root) or \
             `process` (pods as host processes)"
        ))),
        _ => match crate::real_node::unavailable() {
            None => Ok(NodeKind::Real),
            Some(why) if std::env::var(crate::real_node::REQUIRE_ENV).as_deref() == Ok("1") => Err(
                EnvError::Build(format!("{}=1 but {why}", crate::real_node::REQUIRE_ENV)),
            ),
            Some(_) => Ok(NodeKind::Process),
        },
    }
}

/// Chooses the cluster tests' node (see [`cluster_node`]).
pub const CLUSTER_NODE_ENV: &str = "CONTEXTOS_CLUSTER_NODE";

/// Connects to `KUBECONFIG` or starts the local control plane and the node.
async fn connect(kind: NodeKind) -> Result<(Config, Client, Backend, Duration), EnvError> {
    if kind == NodeKind::Process && std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty()) {
        let client_error = |reason: String| EnvError::Client {
            cluster: "KUBECONFIG".to_owned(),
            reason,
        };
        let config = Config::infer().await.map_err(|e| client_error(e.to_string()))?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config.clone()).map_err(|e| client_error(e.to_string()))?;
        return Ok((config, client, Backend::External { server }, Duration::ZERO));
    }
    // A real node is prepared first (built, its address on `lo`, the machine's lock taken): the
    // control plane listens on the node's address so that pods reach it.
    let prepared = if kind == NodeKind::Real {
        Some(
            tokio::task::spawn_blocking(RealNode::prepare)
                .await
                .map_err(|e| EnvError::Build(format!("real node preparation task failed: {e}")))??,
        )
    } else {
        None
    };
    let bin = control_plane::testenv_binary(&repo_root())?;
    let dir = control_plane::fresh_dir()?;
    let node_address = prepared.as_ref().map(|_| crate::real_node::NODE_IP);
    let plane = tokio::task::spawn_blocking(move || control_plane::start(&bin, &dir, node_address))
        .await
        .map_err(|e| EnvError::Build(format!("start-up task failed: {e}")))??;
    let client_error = |reason: String| EnvError::Client {
        cluster: plane.kubeconfig.display().to_string(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(&plane.kubeconfig).map_err(|e| client_error(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| client_error(e.to_string()))?;
    let client = Client::try_from(config.clone()).map_err(|e| client_error(e.to_string()))?;
    if let Some(prepared) = prepared {
        let kubeconfig = plane.kubeconfig.clone();
        let node = tokio::task::spawn_blocking(move || prepared.start(&kubeconfig))
            .await
            .map_err(|e| EnvError::Build(format!("real node start-up task failed: {e}")))??;
        let startup = plane.startup;
        return Ok((config, client, Backend::RealNode { plane, node }, startup));
    }
    let node_config = ProcessNodeConfig::new(PROCESS_NODE_NAME, &plane.dir.join("node"))?;
    let node = ProcessNode::start(&config, node_config).await?;
    let startup = plane.startup;
    Ok((config, client, Backend::Local { plane, node }, startup))
}

/// Root of the repository (this crate lives in `kind-tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `RUST_LOG` controls the harness's and the process node's logs (default: warnings).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
