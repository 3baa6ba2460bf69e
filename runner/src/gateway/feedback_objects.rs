//! Feedback objects — the `Feedback` kind, applied with `kubectl` or from Git — chained into
//! the corrections of the run they are about (see [`super::object_chains`]): the run they pin
//! (`spec.runId`, which must be of their Session) or the Session's latest run
//! (`status.runId`), with the entry they name checked against its verified record,
//! signed with the tenant's key, and named as given by `spec.givenBy` (admission policy
//! `contextos-feedback-author` makes that the user who created the object) at the time the API
//! server accepted it.

use std::sync::Arc;

use contextos_crds::{Feedback, FeedbackStatus, Session};
use kube::{Api, ResourceExt as _};

use super::object_chains::{ChainedObject, Chaining, OBJECT_REQUEST_PREFIX, chain_objects, conditions};
use crate::{
    feedback::{FeedbackBook, FeedbackError, FeedbackRecord, FeedbackRequest},
    keys::TenantKeys,
    memory::{MemoryError, chain::Link},
    personal_data::Classifier,
    records::{RecordStore, StoreError, TenantId, read::ReadError},
};

/// The correction a Feedback object stands for, on run `run_id` (which must be a run of its
/// `sessionRef`), or what is wrong with it.
pub fn request_of(feedback: &Feedback, run_id: String) -> Result<(FeedbackRequest, i64), String> {
    let uid = feedback
        .metadata
        .uid
        .as_deref()
        .ok_or("metadata.uid: the object has none (it was never stored)")?;
    let created = feedback
        .metadata
        .creation_timestamp
        .as_ref()
        .ok_or("metadata.creationTimestamp: the object has none (it was never stored)")?;
    let spec = &feedback.spec;
    Ok((
        FeedbackRequest {
            run_id,
            session: Some(spec.session_ref.name.clone()),
            entry: spec.entry,
            label: spec.label,
            correction: spec.correction.clone(),
            request_id: Some(format!("{OBJECT_REQUEST_PREFIX}{uid}")),
        },
        created.0.as_millisecond(),
    ))
}

impl ChainedObject for Feedback {
    fn decided(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| super::object_chains::decided(&s.conditions, self.metadata.generation))
    }

    async fn chain<S: RecordStore>(&self, client: &kube::Client, store: &S, keys: &TenantKeys) -> Chaining {
        let namespace = self.namespace().unwrap_or_default();
        let session = &self.spec.session_ref.name;
        // A pinned run is the one its author corrected, whatever became of its Session since
        // (`give` checks that it is a run of that Session).
        let run_id = if let Some(pinned) = &self.spec.run_id {
            pinned.clone()
        } else {
            match latest_run(self, client, &namespace, session).await {
                Ok(run_id) => run_id,
                Err(chaining) => return chaining,
            }
        };
        // The object's text stays in the cluster as written, where erasing a person cannot
        // reach it: personal data has no place in it.
        if let Some(found) = personal_data(&self.spec.correction) {
            return done(refused(
                self,
                "PersonalData",
                format!(
                    "spec.correction holds personal data ({found}); a Feedback object is kept as written, where erasure cannot reach it: say what should have happened without it"
                ),
            ));
        }
        let (request, at_ms) = match request_of(self, run_id.clone()) {
            Ok(found) => found,
            Err(problem) => return done(refused(self, "InvalidFeedback", problem)),
        };
        let tenant = match TenantId::new(namespace.clone()) {
            Ok(tenant) => tenant,
            Err(e) => return done(refused(self, "InvalidNamespace", e.to_string())),
        };
        let given = FeedbackBook::new(store, &tenant)
            .give(
                request,
                self.spec.given_by.clone(),
                at_ms,
                &keys.for_tenant(&namespace),
            )
            .await;
        match given {
            Ok(link) => done(recorded(self, &link)),
            // The store is away (TiKV restarting, say): this object waits.
            Err(
                FeedbackError::Memory(MemoryError::Store(e @ StoreError::Backend(_)))
                | FeedbackError::Read(ReadError::Store(e @ StoreError::Backend(_))),
            ) => Chaining::Wait(e.to_string()),
            // Said of the field that chose the run, when the object pinned it.
            Err(e) if self.spec.run_id.is_some() => {
                done(refused(self, "NotRecorded", format!("spec.runId: {e}")))
            }
            Err(e) => done(refused(self, "NotRecorded", e.to_string())),
        }
    }
}

/// The latest run of Session `session` (`status.runId`), for a Feedback that pins none — or
/// what to do with the Feedback instead.
async fn latest_run(
    feedback: &Feedback,
    client: &kube::Client,
    namespace: &str,
    session: &str,
) -> Result<String, Chaining> {
    let refuse = |reason: &str, problem: String| Err(done(refused(feedback, reason, problem)));
    match Api::<Session>::namespaced(client.clone(), namespace)
        .get_opt(session)
        .await
    {
        // A Session made after the Feedback (deleted and created again meanwhile) is not the
        // one its author corrected; nor, since creation times count whole seconds, one made in
        // the same second (a Session that ran before its Feedback was written was made seconds
        // before it at least). A Feedback pinning `runId` is not asked this.
        Ok(Some(found))
            if found.metadata.creation_timestamp.as_ref().map(|t| t.0)
                >= feedback.metadata.creation_timestamp.as_ref().map(|t| t.0) =>
        {
            refuse(
                "SessionReplaced",
                format!(
                    "spec.sessionRef: Session {session} was created after this Feedback (or in the same second): it is not the run that was corrected; name that run in spec.runId"
                ),
            )
        }
        Ok(Some(found)) => match found.status.and_then(|s| s.run_id) {
            Some(run_id) => Ok(run_id),
            None => refuse(
                "NotRun",
                format!("spec.sessionRef: Session {session} has not run yet; give feedback once it has"),
            ),
        },
        Ok(None) => refuse(
            "SessionNotFound",
            format!(
                "spec.sessionRef: there is no Session {session} in namespace {namespace}; for a run of a Session since deleted, name the run in spec.runId"
            ),
        ),
        Err(e) => Err(Chaining::Wait(format!("reading Session {session}: {e}"))),
    }
}

/// Watches Feedback objects in every namespace and chains each new one, for as long as the
/// gateway runs.
pub async fn chain_feedback_objects<S: RecordStore>(client: kube::Client, store: Arc<S>, keys: TenantKeys) {
    chain_objects::<Feedback, S>(client, store, keys).await;
}

/// The categories of personal data in `text`, if it holds any (text too large to classify is
/// refused as if it did).
fn personal_data(text: &str) -> Option<String> {
    match Classifier::built_in().classify(text) {
        Ok(found) if !found.is_personal() => None,
        Ok(found) => Some(
            found
                .categories()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Err(e) => Some(e.to_string()),
    }
}

fn done(status: FeedbackStatus) -> Chaining {
    Chaining::Done(serde_json::to_value(status).unwrap_or_default())
}

fn recorded(feedback: &Feedback, link: &Link<FeedbackRecord>) -> FeedbackStatus {
    FeedbackStatus {
        conditions: conditions(
            feedback.metadata.generation,
            true,
            "Chained",
            format!(
                "correction {} of run {} ({})",
                link.seq, link.record.run_id, link.record.label
            ),
        ),
        observed_generation: feedback.metadata.generation,
        run_id: Some(link.record.run_id.clone()),
        seq: Some(link.seq),
    }
}

fn refused(feedback: &Feedback, reason: &str, problem: String) -> FeedbackStatus {
    FeedbackStatus {
        conditions: conditions(feedback.metadata.generation, false, reason, problem),
        observed_generation: feedback.metadata.generation,
        run_id: None,
        seq: None,
    }
}
