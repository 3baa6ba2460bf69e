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
                let key = keys.for_tenant(&namespace);
                let book = ConsentBook::new(store, &tenant);
                match book.append(record.clone(), &key).await {
                    Ok(link) => {
                        let standing = match record.action {
                            ConsentAction::Grant => Some(grant_standing(&book, &record, &link, &key).await),
                            ConsentAction::Revoke => None,
                        };
                        recorded(self, &link, standing)
                    }
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

/// Where `grant`, just chained as `link`, stands: a grant chained late may count for nothing
/// (a revocation made through the gateway after the object was created stands) — said, not
/// hidden. The history is read back whole, so only when short: a tenant chaining grant after
/// grant for one subject must not cost the watcher every tenant shares a history read each.
async fn grant_standing<S: RecordStore>(
    book: &ConsentBook<'_, S>,
    grant: &ConsentRecord,
    link: &ConsentLink,
    key: &crate::keys::KeyPair,
) -> GrantStanding {
    if link.seq >= MAX_CHECKED_HISTORY {
        return GrantStanding::Unknown(format!(
            "the subject's history has {} links, more than are read back to check",
            link.seq + 1
        ));
    }
    match book.history(&grant.subject, &key.public()).await {
        Ok(history) => GrantStanding::of(grant, &history.ledger(), jiff::Timestamp::now().as_millisecond()),
        Err(e) => GrantStanding::Unknown(format!("the history could not be read back: {e}")),
    }
}

/// Histories longer than this are not read back to say where a grant chained into them stands.
const MAX_CHECKED_HISTORY: u64 = 1_000;

/// Whether a grant, once chained, is what stands for each of its categories (as of then: a
/// grant that expires later is not marked again).
#[derive(Debug, PartialEq, Eq)]
enum GrantStanding {
    /// Every category it names is granted now.
    InForce,
    /// It has expired already.
    Expired,
    /// These categories are not granted now: a revocation dated after the grant stands.
    Overruled(std::collections::BTreeSet<Category>),
    /// Not checked, and why.
    Unknown(String),
}

impl GrantStanding {
    /// Where `grant` stands in `ledger` (its subject's history, the grant included) at `now_ms`.
    fn of(grant: &ConsentRecord, ledger: &crate::consent::ConsentLedger, now_ms: i64) -> Self {
        if grant.expires_at_ms.is_some_and(|until| until <= now_ms) {
            return Self::Expired;
        }
        let wanted = grant.categories.clone();
        let uncovered = ledger.uncovered(&grant.subject, &grant.purpose, &wanted, now_ms);
        if uncovered.is_empty() {
            Self::InForce
        } else {
            Self::Overruled(uncovered)
        }
    }
}

/// `standing`: where a grant stands once chained (`None` for a revocation, or when the history
/// could not be read back to say).
fn recorded(consent: &Consent, link: &ConsentLink, standing: Option<GrantStanding>) -> ConsentStatus {
    let chained = format!(
        "link {} of subject {}'s consent history",
        link.seq, link.record.subject
    );
    let (reason, message) = match standing {
        None | Some(GrantStanding::InForce) => ("Chained", chained),
        Some(GrantStanding::Unknown(why)) => (
            "Chained",
            format!(
                "{chained}; whether it is in force was not checked ({why}): `contextos consent show` says"
            ),
        ),
        Some(GrantStanding::Expired) => (
            "ChainedExpired",
            format!("{chained}; it grants nothing: spec.expiresAt has passed"),
        ),
        Some(GrantStanding::Overruled(categories)) => (
            "ChainedOverruled",
            format!(
                "{chained}; it grants nothing for {}: a revocation dated after this object's creation stands (recorded while this object waited to be chained); to grant them now, apply a new Consent",
                categories
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    };
    ConsentStatus {
        conditions: conditions(consent.metadata.generation, true, reason, message),
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

    /// A grant object chained after a later-dated revocation made through the gateway (the
    /// store was away when it was created) is said to grant nothing, naming what; an expired
    /// one too; one that stands is in force.
    #[test]
    fn a_chained_grant_says_whether_it_is_in_force() {
        let grant = record_of(&consent(&["email", "phone"])).expect("record");
        let now = grant.at_ms + 60_000;
        let mut revocation = grant.clone();
        revocation.action = ConsentAction::Revoke;
        revocation.categories = ["email".parse().expect("category")].into();
        revocation.at_ms = grant.at_ms + 1_000;
        revocation.request_id = Some("gateway-request-1".into());
        // Appended in that order: the revocation, then the object that waited.
        let ledger = crate::consent::ConsentLedger::from_records([&revocation, &grant]);
        assert_eq!(
            GrantStanding::of(&grant, &ledger, now),
            GrantStanding::Overruled(["email".parse().expect("category")].into())
        );
        let ledger = crate::consent::ConsentLedger::from_records([&grant]);
        assert_eq!(GrantStanding::of(&grant, &ledger, now), GrantStanding::InForce);
        let mut expired = grant.clone();
        expired.expires_at_ms = Some(grant.at_ms + 30_000);
        let ledger = crate::consent::ConsentLedger::from_records([&expired]);
        assert_eq!(GrantStanding::of(&expired, &ledger, now), GrantStanding::Expired);

        let link = ConsentLink {
            seq: 4,
            prev: None,
            hash: crate::records::Hash::of(b"link"),
            record: grant.clone(),
        };
        let status = recorded(
            &consent(&["email", "phone"]),
            &link,
            Some(GrantStanding::Overruled(
                ["email".parse().expect("category")].into(),
            )),
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.reason, "ChainedOverruled");
        assert!(
            ready.message.contains("grants nothing for email")
                && ready.message.contains("apply a new Consent"),
            "{}",
            ready.message
        );
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
