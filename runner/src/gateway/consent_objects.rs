//! Consent objects — the `Consent` kind, applied with `kubectl` or from Git — chained into their
//! subjects' consent histories (see [`super::object_chains`]): each is appended to its
//! subject's chain in that namespace's store, signed with the tenant's key, and dated by the API
//! server (its creation time). Between objects, the later chained counts; against a record made
//! through the gateway a grant counts only if dated after it (see `consent::ConsentLedger`), so
//! an object chained late, while the store was away, never undoes a revocation made after it.
//! Withdrawing consent is a new Consent with `action: revoke`.

use std::sync::Arc;

use contextos_crds::{
    Consent,
    consent::{ConsentAction as ObjectAction, ConsentLinkRef, ConsentStatus},
};
use kube::ResourceExt as _;

use super::object_chains::{ChainedObject, Chaining, chain_objects, conditions};
pub use super::object_chains::{OBJECT_REQUEST_PREFIX, RECORDED};
use crate::{
    consent::{ConsentAction, ConsentRecord, Purpose, SubjectHandle},
    keys::TenantKeys,
    memory::{
        MemoryError,
        consents::{ConsentBook, ConsentLink},
    },
    personal_data::Category,
    records::{RecordStore, StoreError, TenantId},
};

/// The record a Consent object stands for, or what is wrong with it (naming the field).
pub fn record_of(consent: &Consent) -> Result<ConsentRecord, String> {
    let spec = &consent.spec;
    let subject = SubjectHandle::new(&spec.subject).map_err(|e| format!("spec.subject: {e}"))?;
    let purpose = Purpose::new(&spec.purpose).map_err(|e| format!("spec.purpose: {e}"))?;
    let categories = spec
        .categories
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.0.parse::<Category>()
                .map_err(|e| format!("spec.categories[{i}]: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let created = consent
        .metadata
        .creation_timestamp
        .as_ref()
        .ok_or("metadata.creationTimestamp: the object has none (it was never stored)")?;
    let uid = consent
        .metadata
        .uid
        .as_deref()
        .ok_or("metadata.uid: the object has none (it was never stored)")?;
    let record = ConsentRecord {
        subject,
        purpose,
        action: match spec.action {
            ObjectAction::Grant => ConsentAction::Grant,
            ObjectAction::Revoke => ConsentAction::Revoke,
        },
        categories,
        by: spec.recorded_by.clone(),
        evidence: spec.evidence.clone().unwrap_or_default(),
        at_ms: created.0.as_millisecond(),
        expires_at_ms: spec.expires_at.as_ref().map(|t| t.0.as_millisecond()),
        request_id: Some(format!("{OBJECT_REQUEST_PREFIX}{uid}")),
    };
    record.validate().map_err(|e| format!("spec: {e}"))?;
    Ok(record)
}

impl ChainedObject for Consent {
    fn within_second(&self) -> u8 {
        match self.spec.action {
            ObjectAction::Grant => 0,
            ObjectAction::Revoke => 1,
        }
    }

    fn decided(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| super::object_chains::decided(&s.conditions, self.metadata.generation))
    }

    async fn chain<S: RecordStore>(&self, _: &kube::Client, store: &S, keys: &TenantKeys) -> Chaining {
        let namespace = self.namespace().unwrap_or_default();
        let status = match (record_of(self), TenantId::new(namespace.clone())) {
            (Err(problem), _) => refused(self, "InvalidConsent", problem),
            (_, Err(e)) => refused(self, "InvalidNamespace", e.to_string()),
            (Ok(record), Ok(tenant)) => {
                match ConsentBook::new(store, &tenant)
                    .append(record, &keys.for_tenant(&namespace))
                    .await
                {
                    Ok(link) => recorded(self, &link),
                    // The store is away (TiKV restarting, say): this object waits.
                    Err(MemoryError::Store(e @ StoreError::Backend(_))) => {
                        return Chaining::Wait(e.to_string());
                    }
                    Err(e) => refused(self, "NotRecorded", e.to_string()),
                }
            }
        };
        Chaining::Done(serde_json::to_value(status).unwrap_or_default())
    }
}

/// Watches Consent objects in every namespace and chains each new one, for as long as the
/// gateway runs.
pub async fn chain_consent_objects<S: RecordStore>(client: kube::Client, store: Arc<S>, keys: TenantKeys) {
    chain_objects::<Consent, S>(client, store, keys).await;
}

fn recorded(consent: &Consent, link: &ConsentLink) -> ConsentStatus {
    ConsentStatus {
        conditions: conditions(
            consent.metadata.generation,
            true,
            "Chained",
            format!(
                "link {} of subject {}'s consent history",
                link.seq, link.record.subject
            ),
        ),
        observed_generation: consent.metadata.generation,
        link: Some(ConsentLinkRef {
            seq: link.seq,
            hash: link.hash.to_hex(),
        }),
    }
}

fn refused(consent: &Consent, reason: &str, problem: String) -> ConsentStatus {
    ConsentStatus {
        conditions: conditions(consent.metadata.generation, false, reason, problem),
        observed_generation: consent.metadata.generation,
        link: None,
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::consent::{ConsentCategory, ConsentSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn consent(categories: &[&str]) -> Consent {
        let mut consent = Consent::new(
            "grant-1",
            ConsentSpec {
                subject: "cust-7f3a9c".into(),
                purpose: "support-history".into(),
                action: ObjectAction::Grant,
                categories: categories.iter().map(|c| ConsentCategory((*c).into())).collect(),
                evidence: Some("form SUP-88".into()),
                expires_at: None,
                recorded_by: "priya@example.com".into(),
            },
        );
        consent.metadata.namespace = Some("shop".into());
        consent.metadata.uid = Some("0b1c2d3e-0000-4000-8000-000000000001".into());
        consent.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(1_800_000_000).expect("time")));
        consent
    }

    #[test]
    fn an_object_becomes_the_record_it_stands_for_with_its_uid_as_request_id() {
        let record = record_of(&consent(&["email", "tenant:badge-id"])).expect("record");
        assert_eq!(record.by, "priya@example.com");
        assert_eq!(record.at_ms, 1_800_000_000_000, "dated by the API server");
        assert_eq!(
            record.request_id.as_deref(),
            Some("object.0b1c2d3e-0000-4000-8000-000000000001")
        );
        assert_eq!(record.categories.len(), 2);
    }

    #[test]
    fn what_cannot_be_recorded_is_named_by_its_field() {
        let problem = record_of(&consent(&["email", "shoe-size"])).expect_err("refused");
        assert!(problem.starts_with("spec.categories[1]:"), "{problem}");
        let mut unstored = consent(&["email"]);
        unstored.metadata.uid = None;
        assert!(
            record_of(&unstored)
                .expect_err("refused")
                .starts_with("metadata.uid")
        );
        let mut bad = consent(&["email"]);
        bad.spec.subject = "Ana Lopez".into();
        assert!(record_of(&bad).expect_err("refused").starts_with("spec.subject"));
    }
}
