//! Ontologies: a namespace's entity types. The object only has to compile (every id pattern a
//! regular expression that finds something); Agents read it when they resolve, pin it in their
//! composition, and report an unknown type they or their pack name.

use std::sync::Arc;

use contextos_crds::{
    Ontology, OntologyStatus,
    conditions::{self, reason},
};
use contextos_runner::ontology;
use kube::{Api, ResourceExt as _, runtime::controller::Action};

use super::{Context, Result, apply_status, now};
use crate::conditions::{Wanted, merge};

/// The name of the Ontology a namespace's Agents read.
pub use contextos_runner::ontology::ONTOLOGY_NAME as NAME;

/// Reconciles an Ontology: Ready when it compiles, or Ready=False naming the field.
pub async fn reconcile_ontology(object: Arc<Ontology>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("Ontology");
    let namespace = object.namespace().unwrap_or_default();
    let previous = object
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = readiness(&object);
    let status = OntologyStatus {
        conditions: merge(
            &previous,
            std::slice::from_ref(&ready),
            object.metadata.generation,
            now(),
        ),
        observed_generation: object.metadata.generation,
        type_count: Some(u32::try_from(object.spec.entity_types.len()).unwrap_or(u32::MAX)),
    };
    apply_status(
        &Api::<Ontology>::namespaced(ctx.client.clone(), &namespace),
        object.as_ref(),
        status,
    )
    .await?;
    super::announce(&ctx, object.as_ref(), &previous, &ready).await;
    Ok(Action::await_change())
}

/// The Ready condition an Ontology earns (pure).
fn readiness(object: &Ontology) -> Wanted {
    if object.name_any() != NAME {
        // Admission refuses other names; one created before that rule existed is still named.
        return Wanted::new(
            conditions::READY,
            false,
            reason::INVALID_SPEC,
            format!("a namespace has one Ontology, named {NAME}; Agents do not read this one: rename it"),
        );
    }
    match ontology::Ontology::compile(&object.spec) {
        Ok(_) => Wanted::new(
            conditions::READY,
            true,
            reason::RESOLVED,
            format!(
                "{} entity types; every id pattern compiles",
                object.spec.entity_types.len()
            ),
        ),
        Err(e) => Wanted::new(conditions::READY, false, reason::INVALID_SPEC, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ontology(name: &str, pattern: &str) -> Ontology {
        let mut object = Ontology::new(
            name,
            serde_yaml::from_str(&format!(
                "entityTypes: [{{name: incident, idPattern: '{pattern}'}}]"
            ))
            .expect("spec"),
        );
        object.metadata.namespace = Some("shop".into());
        object
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_named_with_its_field() {
        assert!(readiness(&ontology("default", "INC-[0-9]+")).status);
        let bad = readiness(&ontology("default", "INC-("));
        assert!(!bad.status);
        assert!(
            bad.message.starts_with("spec.entityTypes[0].idPattern:"),
            "{}",
            bad.message
        );
        let other = readiness(&ontology("incidents", "INC-[0-9]+"));
        assert!(!other.status && other.message.contains("named default"));
    }
}
