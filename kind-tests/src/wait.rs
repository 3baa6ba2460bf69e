//! Waiting on a condition with a timeout. Every wait says what it waited for and, when it times
//! out, what it last saw — never a bare sleep.

use std::{fmt::Debug, future::Future, time::Duration};

use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::time::Instant;

/// One look at the thing being waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check<T> {
    /// The condition holds.
    Done(T),
    /// Not yet; the text describes what was observed (shown if the wait times out).
    NotYet(String),
}

impl Check<()> {
    /// `Done(())` if `condition`, otherwise `NotYet(observed())`.
    pub fn when(condition: bool, observed: impl FnOnce() -> String) -> Self {
        if condition {
            Self::Done(())
        } else {
            Self::NotYet(observed())
        }
    }
}

/// A wait ran out of time.
#[derive(Debug, Error)]
#[error("timed out after {timeout:?} waiting for {what}; last observed: {last_observed}")]
pub struct WaitError {
    pub what: String,
    pub timeout: Duration,
    pub last_observed: String,
}

/// Polls `check` (50 ms, backing off to 1 s) until it returns [`Check::Done`] or `timeout`
/// passes. A check that itself hangs is cut off at the deadline.
pub async fn wait_for<T, F, Fut>(
    what: impl Into<String>,
    timeout: Duration,
    mut check: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    let mut last_observed = "nothing yet (the check never completed)".to_owned();
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Check::Done(value)) => return Ok(value),
            Ok(Check::NotYet(observed)) => last_observed = observed,
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError {
                what: what.into(),
                timeout,
                last_observed,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Waits until the object `name` satisfies `done`; returns the object. A missing object or an
/// API error counts as "not yet".
pub async fn wait_for_object<K, F>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    done: F,
) -> Result<K, WaitError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
    F: Fn(&K) -> Check<()>,
{
    let kind = K::kind(&Default::default()).into_owned();
    let done = &done;
    wait_for(format!("{kind} {name:?}: {what}"), timeout, || async move {
        match api.get_opt(name).await {
            Ok(Some(object)) => match done(&object) {
                Check::Done(()) => Check::Done(object),
                Check::NotYet(observed) => Check::NotYet(observed),
            },
            Ok(None) => Check::NotYet("not found".to_owned()),
            Err(err) => Check::NotYet(format!("error reading it: {err}")),
        }
    })
    .await
}

/// Waits until the object `name` no longer exists (or has a different uid, if `uid` is given).
pub async fn wait_for_deletion<K>(
    api: &Api<K>,
    name: &str,
    uid: Option<&str>,
    timeout: Duration,
    describe: impl Fn(&K) -> String,
) -> Result<(), WaitError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).into_owned();
    wait_for(format!("{kind} {name:?} to be deleted"), timeout, || async {
        match api.get_opt(name).await {
            Ok(None) => Check::Done(()),
            Ok(Some(object)) if uid.is_some() && object.meta().uid.as_deref() != uid => Check::Done(()),
            Ok(Some(object)) => Check::NotYet(format!("still there: {}", describe(&object))),
            Err(err) => Check::NotYet(format!("error reading it: {err}")),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_done() {
        let calls = AtomicU32::new(0);
        let value = wait_for("the third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 3 {
                Check::Done(n)
            } else {
                Check::NotYet(format!("call {n}"))
            }
        })
        .await
        .expect("done before the timeout");
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn timeout_names_the_wait_and_the_last_state() {
        let err = wait_for(
            "a thing that never happens",
            Duration::from_millis(200),
            || async { Check::<()>::NotYet("phase=Pending".to_owned()) },
        )
        .await
        .expect_err("times out");
        let text = err.to_string();
        assert!(text.contains("a thing that never happens"), "{text}");
        assert!(text.contains("phase=Pending"), "{text}");
    }

    #[tokio::test]
    async fn a_hanging_check_is_cut_off() {
        let started = Instant::now();
        let err = wait_for("a hanging check", Duration::from_millis(200), || {
            futures::future::pending::<Check<()>>()
        })
        .await
        .expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.last_observed.contains("never completed"));
    }
}
