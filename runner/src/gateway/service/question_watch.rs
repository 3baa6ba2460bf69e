//! A remote agent's question a Session waits on, watched by the replica that recorded it. The
//! remote task waits for an answer for as long as the Session does; if the Session is
//! cancelled, deleted, made again under its name or ends otherwise while the question stands,
//! no attempt of the run will come to answer or decline it, so this replica declines it in
//! the run's name — the task is cancelled and the call fails, on record, as when a person
//! declines (`did_not_act`). Whether the question still stands is what the record says: the
//! entries after it, read as they come, a period at a time (the runner's own writes — its
//! checkpoint as it pauses — leave it standing; the call's answer, its decline, its result, a
//! new question of it or the run's end do not, and a new question is watched anew). The
//! decline is checked once more against the record under the run's log, and written only on
//! the record as it was read, before the task is cancelled.
//!
//! Known limit: the watch lives in the replica's memory. A replica that stops (an upgrade, a
//! crash) leaves the questions it watched unwatched.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{gateway::session_watch::SessionEnded, records::EntryBody};

/// How often a standing question's run and Session are read, unless the service was told
/// otherwise: questions wait for people, so a slow look costs little.
pub const EVERY: Duration = Duration::from_secs(30);
/// Questions one replica watches at most, and of one namespace (each is one task holding the
/// call's identifiers, and a read of the Session and of the run's new entries a period); past
/// either a question goes unwatched, and the replica says so in its log.
pub const MAX_WATCHED: usize = 4_096;
pub const MAX_WATCHED_PER_TENANT: usize = 256;
/// Who declines a question for a Session that ended, as the record names them.
pub const RESOLVER: &str = "contextos-gateway";
/// Looks in a row that could not read the run's record after which a question is no longer
/// watched (a run whose record is gone or damaged).
pub const MAX_UNREAD: u32 = 20;

/// Whether entries recorded after a question (in order) show its call moved on: the call was
/// answered or declined (`call_resolved`), ended (`tool_result`), asked another question, or
/// the run ended. Anything else — the runner's checkpoint, other calls — leaves it standing.
pub fn moves_on(entries: &[&EntryBody], call_id: &str, question: &str) -> bool {
    entries.iter().any(|body| match body {
        EntryBody::CallResolved { call_id: id, .. } => id == call_id,
        EntryBody::ToolResult(result) => result.call_id == call_id,
        EntryBody::RemoteInputRequired {
            call_id: id,
            question_id,
            ..
        } => id == call_id && question_id != question,
        EntryBody::Completed { .. } | EntryBody::Failed { .. } => true,
        _ => false,
    })
}

/// What a look at the run and its Session says to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The question stands and the Session wants the run (or either could not be read): look
    /// again later.
    Wait,
    /// The question no longer stands: an attempt took it over, or the run ended.
    Leave,
    /// The Session ended while the question stood: decline it.
    Decline(SessionEnded),
}

/// What to do, given whether the question still stands (`None`: the record could not be
/// read) and whether the Session has ended (`None`: it has not, or could not be read).
pub fn next(stands: Option<bool>, ended: Option<SessionEnded>) -> Next {
    match (stands, ended) {
        (Some(false), _) => Next::Leave,
        (Some(true), Some(ended)) => Next::Decline(ended),
        _ => Next::Wait,
    }
}

/// The questions this replica watches, by namespace: one watch per question, within the
/// bounds above.
#[derive(Debug, Default)]
pub struct Watched(Mutex<HashMap<String, HashSet<(String, String)>>>);

/// Why a question goes unwatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotWatched {
    /// Another watch of this replica has it already.
    Already,
    /// The replica, or the namespace, watches as many as it may.
    Full,
}

/// A question's place among those watched, given back when dropped.
#[derive(Debug)]
pub struct Place {
    watched: Arc<Watched>,
    tenant: String,
    key: (String, String),
}

impl Watched {
    /// A place for question `question` of run `run` in namespace `tenant`.
    pub fn take(self: &Arc<Self>, tenant: &str, run: &str, question: &str) -> Result<Place, NotWatched> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = all.values().map(HashSet::len).sum();
        let key = (run.to_owned(), question.to_owned());
        let of_tenant = all.get(tenant).map_or(0, HashSet::len);
        if all.get(tenant).is_some_and(|watched| watched.contains(&key)) {
            return Err(NotWatched::Already);
        }
        if total >= MAX_WATCHED || of_tenant >= MAX_WATCHED_PER_TENANT {
            return Err(NotWatched::Full);
        }
        all.entry(tenant.to_owned()).or_default().insert(key.clone());
        Ok(Place {
            watched: self.clone(),
            tenant: tenant.to_owned(),
            key,
        })
    }

    /// How many questions are watched now.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.0
            .lock()
            .map(|all| all.values().map(HashSet::len).sum())
            .unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut all = self.watched.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(of_tenant) = all.get_mut(&self.tenant) {
            of_tenant.remove(&self.key);
            if of_tenant.is_empty() {
                all.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_is_declined_only_while_it_stands_and_once_its_session_ended() {
        let cancelled = Some(SessionEnded::Cancelled);
        assert_eq!(next(Some(true), None), Next::Wait);
        assert_eq!(
            next(Some(true), cancelled),
            Next::Decline(SessionEnded::Cancelled)
        );
        // Taken over (or the run ended): left, whatever the Session says.
        assert_eq!(next(Some(false), cancelled), Next::Leave);
        assert_eq!(next(Some(false), None), Next::Leave);
        // A record that cannot be read decides nothing.
        assert_eq!(next(None, cancelled), Next::Wait);
    }

    #[test]
    fn a_question_moves_on_only_with_its_own_calls_end_or_the_runs() {
        use crate::records::entry::ToolResultRecord;
        let result = |call: &str| {
            EntryBody::ToolResult(ToolResultRecord {
                call_id: call.into(),
                ok: true,
                output: serde_json::Value::Null,
                error: None,
                attempts: 1,
                truncated: false,
                cost: None,
                cached: None,
            })
        };
        let resolved = |call: &str| EntryBody::CallResolved {
            call_id: call.into(),
            outcome: contextos_crds::session::ResolvedOutcome::Answered,
            resolver: "dana@example.com".into(),
            note: Some("EU".into()),
        };
        let checkpoint = EntryBody::Checkpoint {
            step: 1,
            state: serde_json::json!({}),
        };
        let failed = EntryBody::Failed {
            reason: "deadline".into(),
            message: String::new(),
        };
        let moves = |bodies: &[&EntryBody]| moves_on(bodies, "1.0", "1.0.q1-ab");
        assert!(!moves(&[]));
        assert!(!moves(&[&checkpoint, &result("2.0"), &resolved("2.0")]));
        assert!(moves(&[&checkpoint, &resolved("1.0")]));
        assert!(moves(&[&result("1.0")]));
        assert!(moves(&[&failed]));
    }

    #[test]
    fn one_watch_per_question_within_the_namespaces_share() {
        let watched = Arc::new(Watched::default());
        let first = watched.take("shop", "run-1", "1.0.q1").expect("watched");
        assert_eq!(
            watched.take("shop", "run-1", "1.0.q1").err(),
            Some(NotWatched::Already)
        );
        let places: Vec<Place> = (1..MAX_WATCHED_PER_TENANT)
            .map(|i| watched.take("shop", &format!("run-{i}"), "q").expect("room"))
            .collect();
        assert_eq!(watched.take("shop", "run-x", "q").err(), Some(NotWatched::Full));
        // Another namespace still has its share.
        let other = watched.take("bank", "run-1", "1.0.q1").expect("its own share");
        assert_eq!(watched.count(), MAX_WATCHED_PER_TENANT + 1);
        drop(first);
        drop(places);
        drop(other);
        assert_eq!(watched.count(), 0, "every place is given back");
        assert!(watched.take("shop", "run-1", "1.0.q1").is_ok());
    }
}
