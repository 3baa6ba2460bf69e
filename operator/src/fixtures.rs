//! The quickstart's Session, SandboxProfile and run bundle, as the operator's unit tests start
//! from.

use contextos_crds::{Session, sandbox_profile::SandboxProfileSpec};
use contextos_runner::run::bundle::{NamedPack, RunBundle};
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

/// The run bundle the quickstart's Session pins (its Agent and ContextPack, no policies).
pub fn run_bundle(session: &Session) -> RunBundle {
    RunBundle {
        tenant: "shop".into(),
        session: "checkout-5xx".into(),
        session_spec: session.spec.clone(),
        agent: "sre-triage".into(),
        // With its skills' tools, as a run has them.
        agent_spec: contextos_runner::manifests::ManifestSet::load(&[std::path::Path::new(env!(
            "CARGO_MANIFEST_DIR"
        ))
        .join("../examples/quickstart")])
        .and_then(|set| set.agent_with_skills("oncall-assistant"))
        .expect("the quickstart agent with its skills"),
        context_pack: NamedPack::new(
            "sre-runbooks",
            spec_of(include_str!("../../examples/quickstart/contextpack.yaml")),
        ),
        sources: Default::default(),
        policies: Vec::new(),
        sandbox_profile_digest: None,
        model_script: None,
        session_labels: Default::default(),
        agent_labels: Default::default(),
        routed_scripts: Default::default(),
        routed_prices: Default::default(),
        tool_prices: Default::default(),
        skills: Vec::new(),
        ontology: None,
        model_price: None,
    }
}

fn spec_of<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    let value: Value = serde_yaml::from_str(yaml).expect("yaml");
    serde_json::from_value(value["spec"].clone()).expect("spec")
}
