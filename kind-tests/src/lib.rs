//! Test harness for running ContextOS against a real Kubernetes API server: the local control
//! plane (`testenv/`), the real node (`realnode/`: kubelet, containerd, CNI, NetworkPolicy) and
//! the process node that stands in for it without root (pods as local processes), per-test
//! namespaces, and waits that explain themselves.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use contextos_kind_tests::{TestEnv, TestNamespace};
//! let env = TestEnv::shared().await?; // KUBECONFIG, or testenv + the real or process node
//! let ns = TestNamespace::new(env, "my-test").await?;
//! // ... create objects in ns.name(), wait_for(...) on them ...
//! ns.pass();
//! # Ok(())
//! # }
//! ```

pub mod describe;
pub mod dump;
pub mod env;
pub mod namespace;
pub mod operator_env;
pub mod process_node;
pub mod real_node;
pub mod wait;

pub use env::{EnvError, TestEnv};
pub use namespace::TestNamespace;
pub use wait::{Check, WaitError, wait_for, wait_for_deletion, wait_for_object};

/// `kubectl` arguments that act as a node (a cluster admin in the nodes' group too, so that no
/// pod need be bound to it): what may have a token for the gateway's audience.
pub const AS_A_NODE: [&str; 6] = [
    "--as",
    "system:node:example",
    "--as-group",
    "system:nodes",
    "--as-group",
    "system:masters",
];

/// Field manager of the harness's server-side applies.
pub const FIELD_MANAGER: &str = "contextos.dev/kind-tests";
