//! The ContextOS harness library: everything a run needs on one machine or in a runner pod.
//!
//! Planes land here module by module; see the repository README for the status of each.

pub use contextos_crds as crds;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "audit")]
pub mod audit;
pub mod capability;
pub mod consent;
pub mod context;
pub mod cost;
pub mod digest;
pub mod discovery;
pub mod feedback;
pub mod field_path;
pub mod gateway;
pub mod http;
pub mod insights;
pub mod json_schema;
pub mod key_secrets;
pub mod keys;
pub mod known_fields;
pub mod manifests;
pub mod memory;
pub mod model;
pub mod ontology;
pub mod openapi;
pub mod personal_data;
pub mod policy;
pub mod pricing;
pub mod proposals;
pub mod quota;
pub mod read_grant;
pub mod records;
pub mod run;
pub mod run_context;
pub mod serve;
pub mod signals;
pub mod skills;
pub mod telemetry;
pub mod text;
pub mod vault;
pub mod whole_file;
pub mod yaml_bounds;
