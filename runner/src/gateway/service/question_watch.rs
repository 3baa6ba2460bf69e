//! A remote agent's question a Session waits on, watched by the replica that recorded it. The
//! remote task waits for an answer for as long as the Session does; if the Session is
//! cancelled, deleted, made again under its name or ends otherwise while the question stands,
//! no attempt of the run will come to answer or decline it, so this replica declines it in
//! the run's name — the task is cancelled and the call fails, on record, as when a person
//! declines (`did_not_act`). The question stands while the run's record ends where it ended
//! once the question was on record: any later write is a new attempt of the run, which takes
//! the question over (answers it, declines it, or asks again and is watched again).
//!
//! Known limit: the watch lives in the replica's memory. A replica that stops (an upgrade, a
//! crash) leaves the questions it watched unwatched.

use std::time::Duration;

use crate::{
    gateway::session_watch::{SessionEnded, SessionState},
    records::Hash,
};

/// How often a standing question's run and Session are read, unless the service was told
/// otherwise: questions wait for people, so a slow look costs little.
pub const EVERY: Duration = Duration::from_secs(30);
/// Questions one replica watches at most (each is one task and two reads a period); past it a
/// question goes unwatched, and the replica says so in its log.
pub const MAX_WATCHED: usize = 4_096;
/// Who declines a question for a Session that ended, as the record names them.
pub const RESOLVER: &str = "contextos-gateway";

/// What a look at the run and its Session says to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The question stands and the Session wants the run: look again later.
    Wait,
    /// The run was written to since: an attempt took the question over.
    Leave,
    /// The Session ended while the question stood: decline it.
    Decline(SessionEnded),
}

/// What to do, given the run's head when the question was on record (`asked_at`), its head
/// now (`None`: could not be read), and the Session as the API server answered (`None`: could
/// not be read). Whatever cannot be read is looked at again later; a run that moved on is left
/// even when its Session ended — whoever wrote to it has the question now.
pub fn next(
    asked_at: (u64, Hash),
    head_now: Option<(u64, Hash)>,
    session: Option<&SessionState>,
    issued_uid: Option<&str>,
) -> Next {
    let Some(head_now) = head_now else {
        return Next::Wait;
    };
    if head_now != asked_at {
        return Next::Leave;
    }
    match session.and_then(|state| state.ended(issued_uid)) {
        Some(ended) => Next::Decline(ended),
        None => Next::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standing_question_is_declined_only_once_its_session_ended() {
        let asked_at = (7, Hash::of(b"seven"));
        let moved = (8, Hash::of(b"eight"));
        let standing = SessionState::Present {
            uid: Some("u1".into()),
            cancel: false,
            finished: None,
        };
        let cancelled = SessionState::Present {
            uid: Some("u1".into()),
            cancel: true,
            finished: None,
        };
        let uid = Some("u1");
        assert_eq!(next(asked_at, Some(asked_at), Some(&standing), uid), Next::Wait);
        assert_eq!(
            next(asked_at, Some(asked_at), Some(&cancelled), uid),
            Next::Decline(SessionEnded::Cancelled)
        );
        assert_eq!(
            next(asked_at, Some(asked_at), Some(&SessionState::Absent), uid),
            Next::Decline(SessionEnded::Deleted)
        );
        // Another attempt wrote to the run: it has the question, cancelled Session or not.
        assert_eq!(next(asked_at, Some(moved), Some(&cancelled), uid), Next::Leave);
        assert_eq!(next(asked_at, Some(moved), Some(&standing), uid), Next::Leave);
        // Nothing unread is taken for an end.
        assert_eq!(next(asked_at, None, Some(&cancelled), uid), Next::Wait);
        assert_eq!(next(asked_at, Some(asked_at), None, uid), Next::Wait);
    }
}
