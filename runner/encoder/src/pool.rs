//! Helper threads a projection is split over: started once and waiting for work, so a split
//! costs a wake-up (microseconds) rather than starting a thread (tens of them) — which for a
//! short text's projections is the difference between gaining and losing by the split.

use std::sync::{Arc, Mutex, OnceLock, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// The helpers, one fewer than the cores a product is split over.
#[derive(Debug)]
pub(crate) struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
    helpers: usize,
}

/// The process's helpers (started on first use).
pub(crate) fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::start(super::dense::cores().saturating_sub(1)))
}

impl Pool {
    fn start(helpers: usize) -> Self {
        let (jobs, waiting) = mpsc::channel::<Job>();
        let waiting = Arc::new(Mutex::new(waiting));
        let mut started = 0;
        for i in 0..helpers {
            let waiting = waiting.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("contextos-encoder-{i}"))
                .spawn(move || {
                    loop {
                        let job = match waiting.lock() {
                            Ok(receiver) => spin_then_wait(&receiver),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // A job that panics (a bug) drops its answer's sender: its caller sees
                        // no answer and does the work itself. The helper stays.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        Self {
            jobs: Mutex::new(jobs),
            helpers: started,
        }
    }

    /// How many helpers there are (0: every product is computed by its caller alone).
    pub(crate) fn helpers(&self) -> usize {
        self.helpers
    }

    /// Runs `job` on a helper; its answer arrives on the receiver (which closes without one if
    /// the job could not run or panicked).
    pub(crate) fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> mpsc::Receiver<T> {
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = answer.send(job());
        });
        if let Ok(jobs) = self.jobs.lock() {
            let _ = jobs.send(job);
        }
        answered
    }
}

/// How long a thread waiting for a job or an answer spins before it sleeps. A text's
/// projections come one after another, each split in two: a helper that slept between them
/// (or a caller sleeping on its answer) would be woken by the kernel each time — tens of
/// microseconds on a virtual machine, a few hundred per text — while one spinning takes the
/// next at once. After a text, a helper spins this long and then sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The next value `receiver` gets: spinning for up to [`SPIN`], then sleeping until it comes
/// (or every sender is gone).
pub(crate) fn spin_then_wait<T>(receiver: &mpsc::Receiver<T>) -> Result<T, mpsc::RecvError> {
    let start = std::time::Instant::now();
    loop {
        match receiver.try_recv() {
            Ok(value) => return Ok(value),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) if start.elapsed() < SPIN => std::hint::spin_loop(),
            Err(mpsc::TryRecvError::Empty) => return receiver.recv(),
        }
    }
}
