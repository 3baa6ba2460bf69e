//! How a runner's own entries reach the gateway service: not in a request of their own, but
//! with the next call or model request, chained on the head the runner was last told (see
//! [`RunnerTail`]). The service writes them and its own entries for the request in one durable
//! write and answers the new head; the runner then moves past both.

use crate::{
    gateway::remote::RunnerTail,
    records::{Hash, RecordError, RecordStore, Recorder, recorder::Prepared},
};

/// What the runner sends with its next request: its head and what it staged, chained on it.
/// A run that is not on record yet is started first (the service continues only runs it holds).
pub(super) async fn tail_of<S: RecordStore>(
    recorder: &mut Recorder<'_, S>,
) -> Result<(RunnerTail, Option<Prepared>), RecordError> {
    if recorder.head().is_none() {
        recorder.flush().await?;
    }
    let prepared = recorder.prepare().await?;
    let head = recorder.head().ok_or_else(|| RecordError::UnknownRun {
        tenant: recorder.tenant().to_string(),
        run_id: recorder.run_id().to_owned(),
    })?;
    Ok((RunnerTail::new(head, prepared.as_ref()), prepared))
}

/// After the service answered (`answered`): the runner's entries are on record and the run's
/// head is `head` (read back if the service did not say). Otherwise they wait for the next write.
pub(super) async fn after_answer<S: RecordStore>(
    recorder: &mut Recorder<'_, S>,
    prepared: Option<Prepared>,
    answered: bool,
    head: Option<(u64, Hash)>,
) -> Result<(), RecordError> {
    if !answered {
        if let Some(prepared) = prepared {
            recorder.undo(prepared);
        }
        return Ok(());
    }
    if let Some(prepared) = prepared {
        recorder.delivered(prepared);
    }
    recorder.follow(head).await
}
