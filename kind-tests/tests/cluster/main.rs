//! Cluster tests: the ContextOS API and the Kubernetes behaviour it relies on, against a real
//! API server — the local control plane with the real node (kubelet, containerd, CNI,
//! NetworkPolicy; root), with the process node where root is missing, or any cluster in
//! `KUBECONFIG`. Every test works in its own namespace and passes unchanged on all three.

// The shared admission table; some of its helpers are only used by crds/tests.
#[path = "../../../crds/tests/support/cases.rs"]
#[allow(dead_code)]
mod cases;

mod a2a;
mod admission;
mod aliases;
mod consents;
mod crds;
mod discovery;
mod hostile_peers;
mod jobs;
mod manifests;
mod objects;
mod operator;
mod operator_resilience;
mod pod_lifecycle;
mod pod_security;
mod printer_columns;
mod process_node;
mod promotion;
mod quickstart;
mod quotas;
mod sandbox_attacks;
mod skills;
mod tenant_attacks;
mod workloads;
