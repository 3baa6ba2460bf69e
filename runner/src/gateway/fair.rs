//! Fair turns: which tenant's request a gateway replica works on next.
//!
//! A replica bounds each tenant's requests in flight, but the requests it admits are all
//! scheduled alike: a tenant with 64 requests being worked on gets 64 times the CPU of a tenant
//! with one, and that one waits behind them all. Here a replica works on at most `capacity`
//! requests at once; the others wait in one line per tenant, and a turn that ends is handed to
//! the tenants in rotation, one request each. A tenant that keeps its lines full therefore
//! delays another's request by about one request of its own, not by all of them.
//!
//! A turn is for work — checks, policy, the store. A request waiting on something outside the
//! replica (a tool, a model, another request of the same run) steps out of its turn with
//! [`away`] and queues again when it has what it waited for, so a tenant whose tool hangs
//! holds no turns while it hangs. Code that runs outside a turn (locally, `contextos run`)
//! passes through [`away`] unchanged.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

tokio::task_local! {
    /// The turn of the request this task works for.
    static TURN: Arc<TurnHandle>;
}

/// The turns of one replica.
#[derive(Debug)]
pub struct FairTurns {
    capacity: usize,
    line: Mutex<Line>,
}

/// Who holds and who waits for turns. Its decisions are pure; [`FairTurns`] does the waiting.
#[derive(Debug, Default)]
struct Line {
    busy: usize,
    waiting: HashMap<String, VecDeque<oneshot::Sender<()>>>,
    /// Tenants with someone waiting, in the order their next request is served.
    rotation: VecDeque<String>,
}

impl Line {
    /// Takes a turn at once if one is free and nobody waits (waiting requests go first).
    fn take_free(&mut self, capacity: usize) -> bool {
        let free = self.busy < capacity && self.rotation.is_empty();
        if free {
            self.busy += 1;
        }
        free
    }

    /// Puts a request of `tenant` in its tenant's line. A tenant is in the rotation once, for
    /// as long as it has a line (whoever in it has given up).
    fn enqueue(&mut self, tenant: &str, waiter: oneshot::Sender<()>) {
        match self.waiting.get_mut(tenant) {
            Some(line) => {
                // Requests whose callers gave up are dropped from the line as it is joined.
                line.retain(|w| !w.is_closed());
                line.push_back(waiter);
            }
            None => {
                self.waiting.insert(tenant.to_owned(), VecDeque::from([waiter]));
                self.rotation.push_back(tenant.to_owned());
            }
        }
    }

    /// The request that gets a turn just ended: the first still waiting of the next tenant in
    /// rotation, who then goes to the back if it has more waiting. `None` if nobody waits.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<()>> {
        while let Some(tenant) = self.rotation.pop_front() {
            let Some(line) = self.waiting.get_mut(&tenant) else {
                continue;
            };
            let waiter = std::iter::from_fn(|| line.pop_front()).find(|w| !w.is_closed());
            if line.is_empty() {
                self.waiting.remove(&tenant);
            } else {
                self.rotation.push_back(tenant);
            }
            if waiter.is_some() {
                return waiter;
            }
        }
        None
    }
}

impl FairTurns {
    /// Turns for `capacity` requests worked on at once (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            line: Mutex::new(Line::default()),
        })
    }

    /// Waits for a turn for a request of `tenant`.
    pub async fn take(self: &Arc<Self>, tenant: &str) -> Turn {
        loop {
            let waiting = {
                let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
                if line.take_free(self.capacity) {
                    return Turn { turns: self.clone() };
                }
                let (given, waiting) = oneshot::channel();
                line.enqueue(tenant, given);
                waiting
            };
            let mut waiter = Waiter {
                turns: self.clone(),
                waiting,
                granted: false,
            };
            if (&mut waiter.waiting).await.is_ok() {
                waiter.granted = true;
                return Turn { turns: self.clone() };
            }
            // Dropped unsent (only if the line dropped it): in line again.
        }
    }

    /// Hands an ended turn to the next request waiting, or frees it.
    fn hand_over(&self) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(waiter) = line.next_waiter() {
            // A waiter whose caller went away refuses the turn: the next one gets it.
            if waiter.send(()).is_ok() {
                return;
            }
        }
        line.busy = line.busy.saturating_sub(1);
    }

    /// Requests being worked on, and waiting (for tests and metrics).
    pub fn counts(&self) -> (usize, usize) {
        let line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = line
            .waiting
            .values()
            .map(|l| l.iter().filter(|w| !w.is_closed()).count());
        (line.busy, waiting.sum())
    }
}

/// One request's turn; ending it (dropping it) hands it on.
#[derive(Debug)]
pub struct Turn {
    turns: Arc<FairTurns>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns.hand_over();
    }
}

/// A request waiting in line. Dropped before its turn came (its caller went away), it leaves
/// the line; dropped just as its turn came, it hands that turn on.
struct Waiter {
    turns: Arc<FairTurns>,
    waiting: oneshot::Receiver<()>,
    granted: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        self.waiting.close();
        if self.waiting.try_recv().is_ok() {
            self.turns.hand_over();
        }
    }
}

/// The turn a request holds, which the tasks working for it share: they step out of it while
/// they wait ([`away`]).
#[derive(Debug)]
pub struct TurnHandle {
    turns: Arc<FairTurns>,
    tenant: String,
    held: Mutex<Option<Turn>>,
}

impl TurnHandle {
    pub fn new(turns: Arc<FairTurns>, tenant: &str, turn: Turn) -> Arc<Self> {
        Arc::new(Self {
            turns,
            tenant: tenant.to_owned(),
            held: Mutex::new(Some(turn)),
        })
    }

    /// Runs `work` as the request this turn is for: code in it may step [`away`].
    pub async fn scope<F: Future>(self: Arc<Self>, work: F) -> F::Output {
        TURN.scope(self, work).await
    }

    async fn away<F: Future>(&self, wait: F) -> F::Output {
        let stepped_out = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(turn) = stepped_out else {
            // Another task of the request already stepped out and takes the turn back; this
            // one goes on without a turn only after waiting (tasks of one request share one).
            return wait.await;
        };
        drop(turn);
        let output = wait.await;
        let turn = self.turns.take(&self.tenant).await;
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(turn);
        output
    }
}

/// Waits for `wait` — a tool, a model, a lock another request of the run holds — outside the
/// current request's turn, and takes a turn again (in line with the others) when it is done.
/// Outside a turn (local runs, tests of the gateway alone) it only waits.
pub async fn away<F: Future>(wait: F) -> F::Output {
    // On the heap: wrapped round deep futures (a tool call, a store write), it would otherwise
    // add their size to every caller's state on the stack.
    let wait = Box::pin(wait);
    match TURN.try_with(Arc::clone) {
        Ok(handle) => handle.away(wait).await,
        Err(_) => wait.await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn waiter() -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
        oneshot::channel()
    }

    #[test]
    fn turns_go_round_the_tenants_one_request_each() {
        let mut line = Line::default();
        assert!(line.take_free(1));
        let mut heard = Vec::new();
        for (tenant, n) in [
            ("noisy", 1),
            ("noisy", 2),
            ("noisy", 3),
            ("quiet", 1),
            ("noisy", 4),
        ] {
            let (given, waiting) = waiter();
            line.enqueue(tenant, given);
            heard.push((tenant, n, waiting));
        }
        assert!(!line.take_free(1), "waiting requests go first");
        let mut order = Vec::new();
        while let Some(next) = line.next_waiter() {
            next.send(()).expect("waiting");
            let i = heard
                .iter_mut()
                .position(|(_, _, w)| w.try_recv().is_ok())
                .expect("one was given the turn");
            let (tenant, n, _) = heard.remove(i);
            order.push(format!("{tenant}-{n}"));
        }
        assert_eq!(order, ["noisy-1", "quiet-1", "noisy-2", "noisy-3", "noisy-4"]);
    }

    #[test]
    fn requests_whose_callers_left_are_dropped_from_the_line_and_the_tenant_is_in_rotation_once() {
        let mut line = Line::default();
        for _ in 0..5 {
            let (given, waiting) = waiter();
            line.enqueue("a", given);
            drop(waiting);
        }
        let (given, mut a) = waiter();
        line.enqueue("a", given);
        assert_eq!(line.waiting["a"].len(), 1);
        assert_eq!(line.rotation, ["a"]);
        // A line of callers who all left gives the turn to the next tenant that has one.
        let (given, gone) = waiter();
        line.enqueue("b", given);
        drop(gone);
        let (given, mut c) = waiter();
        line.enqueue("c", given);
        line.next_waiter().expect("a").send(()).expect("a waits");
        assert!(a.try_recv().is_ok());
        line.next_waiter().expect("c").send(()).expect("c waits");
        assert!(c.try_recv().is_ok());
        assert!(line.next_waiter().is_none());
        assert!(line.rotation.is_empty() && line.waiting.is_empty());
    }

    #[tokio::test]
    async fn a_turn_ended_goes_to_the_next_tenant_and_a_caller_that_left_passes_it_on() {
        let turns = FairTurns::new(1);
        let first = turns.take("noisy").await;
        let gone = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("noisy").await }
        });
        let quiet = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("quiet").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(turns.counts(), (1, 2));
        gone.abort();
        let _ = gone.await;
        drop(first);
        let quiet = tokio::time::timeout(Duration::from_secs(5), quiet)
            .await
            .expect("the quiet tenant got the turn")
            .expect("task");
        assert_eq!(turns.counts(), (1, 0));
        drop(quiet);
        assert_eq!(turns.counts(), (0, 0));
    }

    #[tokio::test]
    async fn waiting_away_frees_the_turn_for_others() {
        let turns = FairTurns::new(1);
        let handle = TurnHandle::new(turns.clone(), "hangs", turns.take("hangs").await);
        let (release, hang) = oneshot::channel::<()>();
        let hanging = tokio::spawn(handle.clone().scope(async move {
            away(hang).await.expect("released");
        }));
        // While the first request waits for its tool, another tenant is worked on.
        let other = tokio::time::timeout(Duration::from_secs(5), turns.take("other"))
            .await
            .expect("a turn was free");
        let _ = release.send(());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !hanging.is_finished(),
            "the first request waits for its turn again"
        );
        drop(other);
        tokio::time::timeout(Duration::from_secs(5), hanging)
            .await
            .expect("the first request finished")
            .expect("task");
        drop(handle);
        assert_eq!(turns.counts(), (0, 0));
    }
}
