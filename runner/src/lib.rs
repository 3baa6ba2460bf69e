//! The ContextOS harness library: everything a run needs on one machine or in a runner pod.
//!
//! The planes land here module by module (records, gateway and policy, context compiler,
//! decision loop, replay); see the repository README for the status of each.

pub use contextos_crds as crds;
