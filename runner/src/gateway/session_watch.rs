//! Whether a run's Session still wants the run's work done. A remote agent's task (A2A) can run
//! for as long as its tool's timeout allows, and the gateway service follows it even after the
//! runner pod went away (a call is carried through and recorded, see `service::run_api`); a
//! task that asked a question waits for a person for as long as the Session does. When the
//! Session is cancelled, deleted or ends otherwise, nobody would stop that task; so the gateway
//! service watches the Session while it follows a task, or while the task's question stands,
//! and cancels the task once the Session no longer wants it. What ended it is decided here from
//! what the API server says; the service asks it (`service::session_polls`). Locally there is
//! no Session to watch.

use std::{future::Future, pin::Pin};

use contextos_crds::session::SessionPhase;

/// What the API server says of a run's Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    Present {
        uid: Option<String>,
        /// `spec.cancel`.
        cancel: bool,
        /// `status.phase`, where it is one the Session never leaves.
        finished: Option<SessionPhase>,
    },
    Absent,
}

/// Why a run's Session no longer wants the run's work done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnded {
    Cancelled,
    Deleted,
    /// Deleted and made again under its name: the new Session is not the run's.
    Replaced,
    /// It ended otherwise (failed past its deadline or its attempts): no attempt of the run
    /// comes any more.
    Finished(SessionPhase),
}

impl std::fmt::Display for SessionEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cancelled => f.write_str("the run's Session was cancelled (spec.cancel)"),
            Self::Deleted => f.write_str("the run's Session was deleted"),
            Self::Replaced => f.write_str("the run's Session was deleted (another was made under its name)"),
            Self::Finished(phase) => write!(f, "the run's Session has ended ({phase:?})"),
        }
    }
}

impl SessionState {
    /// Whether the Session the run was issued for (`issued_uid`, where the RunContext names
    /// one) has ended, as this state shows it.
    pub fn ended(&self, issued_uid: Option<&str>) -> Option<SessionEnded> {
        match self {
            Self::Absent => Some(SessionEnded::Deleted),
            Self::Present { uid, .. }
                if issued_uid.is_some_and(|issued| uid.as_deref().is_some_and(|found| found != issued)) =>
            {
                Some(SessionEnded::Replaced)
            }
            Self::Present { cancel: true, .. } => Some(SessionEnded::Cancelled),
            Self::Present {
                finished: Some(phase),
                ..
            } => Some(SessionEnded::Finished(*phase)),
            Self::Present { .. } => None,
        }
    }
}

/// What successive looks at a run's Session say. A Session is taken to be gone only when two
/// looks in a row do not find it: one answer of "not found" may be the API server's, for a
/// moment, about the resource type rather than the object.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sightings {
    absent_before: bool,
}

impl Sightings {
    /// Whether the Session has ended, given what this look found.
    pub fn look(&mut self, state: &SessionState, issued_uid: Option<&str>) -> Option<SessionEnded> {
        let absent = *state == SessionState::Absent;
        let confirmed = !absent || self.absent_before;
        self.absent_before = absent;
        if confirmed { state.ended(issued_uid) } else { None }
    }
}

/// A future that resolves once the run's Session has ended, saying why.
pub type Ends = Pin<Box<dyn Future<Output = SessionEnded> + Send>>;

/// Watches one run's Session.
pub trait SessionWatch: Send + Sync + std::fmt::Debug {
    /// Resolves once the Session has ended; never, while it has not (or cannot be read).
    fn ended(&self) -> Ends;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_for_its_run_when_cancelled_deleted_or_replaced() {
        let present = |uid: Option<&str>, cancel| SessionState::Present {
            uid: uid.map(str::to_owned),
            cancel,
            finished: None,
        };
        let failed = SessionState::Present {
            uid: Some("u1".into()),
            cancel: false,
            finished: Some(SessionPhase::Failed),
        };
        let cases = [
            (present(Some("u1"), false), Some("u1"), None),
            (
                present(Some("u1"), true),
                Some("u1"),
                Some(SessionEnded::Cancelled),
            ),
            (SessionState::Absent, Some("u1"), Some(SessionEnded::Deleted)),
            (
                present(Some("u2"), false),
                Some("u1"),
                Some(SessionEnded::Replaced),
            ),
            // A new Session of that name, cancelled or not, is not the run's.
            (
                present(Some("u2"), true),
                Some("u1"),
                Some(SessionEnded::Replaced),
            ),
            // A RunContext without a uid (or a Session read without one) goes by cancel alone.
            (present(Some("u2"), false), None, None),
            (present(None, false), Some("u1"), None),
            (present(None, true), None, Some(SessionEnded::Cancelled)),
            (
                failed,
                Some("u1"),
                Some(SessionEnded::Finished(SessionPhase::Failed)),
            ),
        ];
        for (state, issued, expected) in cases {
            assert_eq!(state.ended(issued), expected, "{state:?} issued {issued:?}");
        }
    }

    #[test]
    fn a_session_is_gone_only_when_two_looks_in_a_row_do_not_find_it() {
        let standing = SessionState::Present {
            uid: None,
            cancel: false,
            finished: None,
        };
        let mut sightings = Sightings::default();
        assert_eq!(sightings.look(&SessionState::Absent, None), None);
        assert_eq!(sightings.look(&standing, None), None);
        assert_eq!(sightings.look(&SessionState::Absent, None), None);
        assert_eq!(
            sightings.look(&SessionState::Absent, None),
            Some(SessionEnded::Deleted)
        );
    }
}
