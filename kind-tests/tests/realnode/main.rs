//! The sandbox, enforced: tests on the real node (kubelet, containerd with runc, CNI,
//! kube-proxy, kube-router for NetworkPolicy, kube-scheduler; `kind-tests/realnode/`) next to the
//! local control plane. Runner pods run the workspace's `contextos` binary packed into an image;
//! probes run in the very pod spec and NetworkPolicy the operator writes, and each protection is
//! shown to matter: the same probe in a pod without it gets through.
//!
//! Needs root. Without it every test is skipped with the reason, unless
//! `CONTEXTOS_REQUIRE_REALNODE=1` (CI) makes that a failure.

#[path = "../cluster/objects.rs"]
#[allow(dead_code)]
mod objects;

mod network;
mod sandbox;
mod session;
mod support;
