//! The quickstart's Session and SandboxProfile, as the operator's unit tests start from.

use contextos_crds::{Session, sandbox_profile::SandboxProfileSpec};
use serde_json::Value;

/// The quickstart's Session, in namespace `shop`, with a uid.
pub fn session() -> Session {
    let mut session: Session =
        serde_yaml::from_str(include_str!("../../examples/quickstart/session.yaml")).expect("session");
    session.metadata.namespace = Some("shop".into());
    session.metadata.uid = Some("0f8fad5b-d9cb-469f-a165-70867728950e".into());
    session
}

/// The quickstart's SandboxProfile spec.
pub fn sandbox() -> SandboxProfileSpec {
    let value: Value =
        serde_yaml::from_str(include_str!("../../examples/quickstart/sandboxprofile.yaml")).expect("yaml");
    serde_json::from_value(value["spec"].clone()).expect("sandbox spec")
}
