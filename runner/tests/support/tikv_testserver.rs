//! Starts `kind-tests/tikv-testserver` (PD + TiKV gRPC in front of the TiKV project's mock
//! TiKV) for the RecordStore tests and the records benchmark. Shared by both through `#[path]`;
//! nothing in the TiKV backend knows about it.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Names the built binary; `make test` sets it (see the root Makefile).
pub const TESTSERVER_ENV: &str = "CONTEXTOS_TIKV_TESTSERVER_BIN";

/// How long the server may take to print `READY` (it usually takes a few milliseconds).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running tikv-testserver. Dropping it stops the server (SIGTERM, then SIGKILL) and reaps
/// it; the server also exits by itself if this process dies.
pub struct TestServer {
    child: Child,
    /// The PD address (`host:port`) the server printed.
    pub pd: String,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts `bin` with `args` (for example `-split KEY`) and waits for its `READY <pd>`
    /// line. Panics, with the server's stderr, if it does not come up.
    pub fn start(bin: &str, args: &[String]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{TESTSERVER_ENV}={bin}: cannot start: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_thread = {
            let mut pipe = child.stderr.take().expect("piped stderr");
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            })
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(pd) = line.strip_prefix("READY ") {
                    let _ = ready_tx.send(pd.trim().to_owned());
                }
            }
        });
        let mut server = Self {
            child,
            pd: String::new(),
            stderr,
            stderr_thread: Some(stderr_thread),
        };
        let started = Instant::now();
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(pd) => server.pd = pd,
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => format!("no READY line within {READY_TIMEOUT:?}"),
                    mpsc::RecvTimeoutError::Disconnected => "exited before READY".to_owned(),
                };
                server.stop();
                panic!(
                    "tikv-testserver ({bin}): {why}; its stderr:\n{}",
                    server.stderr_text()
                );
            }
        }
        eprintln!(
            "tikv-testserver: PD at {} (ready after {:?})",
            server.pd,
            started.elapsed()
        );
        server
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear on the server's stderr (read on another
    /// thread, so a line written before `READY` may arrive after it).
    #[allow(dead_code, reason = "not every target that includes this file uses it")]
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr_text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(thread) = self.stderr_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        // Captured by the test harness: shown with the failure output (or with --nocapture),
        // including any "UNIMPLEMENTED <method>" line and the per-method call counts.
        eprintln!("tikv-testserver stderr:\n{}", self.stderr_text());
    }
}
