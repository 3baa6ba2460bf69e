//! Consent objects — the `Consent` kind, applied with `kubectl` or from Git — chained into their
//! subjects' consent histories. The gateway watches them in every namespace and appends each to
//! its subject's chain in that namespace's store, once (the object's uid is the request id: every
//! replica may append it, the chain holds it once), signed with the tenant's key, then says so
//! on the object's status (`Recorded`). Objects are chained in the order the API server accepted
//! them, so a revocation applied after a grant is the newer record.
//!
//! The spec never changes (admission refuses it), and deleting an object does not undo what it
//! recorded: the history is append-only. Withdrawing consent is a new Consent with
//! `action: revoke`.

use std::{sync::Arc, time::Duration};

use contextos_crds::{
    Consent,
    consent::{ConsentAction as ObjectAction, ConsentLinkRef, ConsentStatus},
};
use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{
    consent::{ConsentAction, ConsentRecord, Purpose, SubjectHandle},
    keys::TenantKeys,
    memory::{
        MemoryError,
        backend::MemoryBackend,
        consents::{ConsentBook, ConsentLink},
    },
    personal_data::Category,
    records::{StoreError, TenantId},
};

/// The field manager of the status the gateway writes.
const FIELD_MANAGER: &str = "contextos.dev/gateway";
/// The condition on a Consent that says whether it is in the subject's history.
pub const RECORDED: &str = "Recorded";
/// Request ids the gateway gives Consent objects' records (`object.<uid>`); the consent API
/// refuses them from anyone else, so no one can take an object's place in a chain.
pub const OBJECT_REQUEST_PREFIX: &str = "object.";
/// The longest wait between two attempts to chain an object while the store is unavailable.
const MAX_RETRY: Duration = Duration::from_secs(30);

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

/// Whether the object's status already says what became of it — chained, or refused for good
/// (its spec cannot change, so neither can the answer). Only a hint: chaining it again finds
/// its record by request id and appends nothing.
fn already_decided(consent: &Consent) -> bool {
    consent.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == RECORDED
                && c.observed_generation == consent.metadata.generation
                && (c.status == "True" || c.reason != STORE_UNAVAILABLE)
        })
    })
}

/// The reason on a Consent whose chaining waits for the store.
const STORE_UNAVAILABLE: &str = "StoreUnavailable";
/// Attempts to write a Consent's status.
const STATUS_ATTEMPTS: u32 = 5;

/// Watches Consent objects in every namespace and chains each new one, for as long as the
/// gateway runs. Objects listed at start (or after the watch is lost) are chained oldest first.
pub async fn chain_consent_objects<S: MemoryBackend>(client: kube::Client, store: Arc<S>, keys: TenantKeys) {
    let api = Api::<Consent>::all(client.clone());
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listed: Vec<Consent> = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(consent)) => listed.push(consent),
            Ok(watcher::Event::InitDone) => {
                let mut batch = std::mem::take(&mut listed);
                // The API server lists by name; what was accepted first is chained first.
                batch.sort_by(|a, b| {
                    a.metadata
                        .creation_timestamp
                        .cmp(&b.metadata.creation_timestamp)
                        .then_with(|| a.metadata.namespace.cmp(&b.metadata.namespace))
                        .then_with(|| a.name_any().cmp(&b.name_any()))
                });
                for consent in batch {
                    chain_one(&client, &*store, &keys, &consent).await;
                }
            }
            Ok(watcher::Event::Apply(consent)) => chain_one(&client, &*store, &keys, &consent).await,
            Ok(watcher::Event::Delete(_)) => {}
            Err(e) => tracing::warn!(error = %e, "watching Consent objects failed; watching again"),
        }
    }
}

/// Chains one object (waiting out a store that is unavailable: the objects after it must come
/// after it in the chain) and writes its status.
async fn chain_one<S: MemoryBackend>(client: &kube::Client, store: &S, keys: &TenantKeys, consent: &Consent) {
    if already_decided(consent) {
        return;
    }
    let Some(namespace) = consent.namespace() else {
        return;
    };
    let status = match (record_of(consent), TenantId::new(namespace.clone())) {
        (Err(problem), _) => refused(consent, "InvalidConsent", problem),
        (_, Err(e)) => refused(consent, "InvalidNamespace", e.to_string()),
        (Ok(record), Ok(tenant)) => {
            let key = keys.for_tenant(&namespace);
            let mut wait = Duration::from_secs(1);
            loop {
                match ConsentBook::new(store, &tenant)
                    .append(record.clone(), &key)
                    .await
                {
                    Ok(link) => break recorded(consent, &link),
                    // The store is away (TiKV restarting, say): this object waits, and so do the
                    // ones after it.
                    Err(MemoryError::Store(e @ StoreError::Backend(_))) => {
                        tracing::warn!(consent = %consent.name_any(), %namespace, error = %e, "cannot chain a Consent yet; trying again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_RETRY);
                    }
                    Err(e) => break refused(consent, "NotRecorded", e.to_string()),
                }
            }
        }
    };
    let api = Api::<Consent>::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": "contextos.dev/v1alpha1",
        "kind": "Consent",
        "status": status,
    });
    // Written again until it lands: a status that never says Recorded leaves the object to be
    // chained again on the next listing (harmless — found by its request id — but a wait for
    // `kubectl wait` that never ends).
    for attempt in 1..=STATUS_ATTEMPTS {
        match api
            .patch_status(
                &consent.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => return,
            // Deleted meanwhile: what it recorded stays recorded.
            Err(kube::Error::Api(status)) if status.code == 404 => return,
            Err(e) => {
                tracing::warn!(consent = %consent.name_any(), %namespace, attempt, error = %e, "cannot write a Consent's status");
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
            }
        }
    }
}

/// `Recorded`, and `Ready` saying the same (what `kubectl wait`, kstatus and Argo CD read).
fn conditions(consent: &Consent, status: &str, reason: &str, message: String) -> Vec<Condition> {
    [RECORDED, "Ready"]
        .into_iter()
        .map(|type_| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.clone(),
            observed_generation: consent.metadata.generation,
            last_transition_time: Time(jiff::Timestamp::now()),
        })
        .collect()
}

fn recorded(consent: &Consent, link: &ConsentLink) -> ConsentStatus {
    ConsentStatus {
        conditions: conditions(
            consent,
            "True",
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
        conditions: conditions(consent, "False", reason, problem),
        observed_generation: consent.metadata.generation,
        link: None,
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::consent::{ConsentCategory, ConsentSpec};

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
