//! Drives the quickstart through the real `contextos` binary against the real ops-tools server
//! (`examples/ops_tools.rs`): run, approve, resume, with optional SIGKILLs at durable
//! boundaries.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

pub const HMAC_KEY: &str = "quickstart-test-key";
const SERVICE: &str = "http://ops-tools.shop-platform.svc";

/// A running ops-tools server; killed on drop.
pub struct OpsTools {
    child: Child,
    pub url: String,
}

/// The example binary `name`, built next to `contextos`.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_contextos"))
        .parent()
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p contextos-runner --examples` first",
        binary.display()
    );
    binary
}

impl OpsTools {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// [`OpsTools::start`] with `env` set for the service (e.g. where it exports traces).
    pub fn start_with_env(extra: &[&str], env: &[(String, String)]) -> Self {
        let binary = example_binary("ops_tools");
        let mut child = Command::new(binary)
            .args(["--hmac-key", HMAC_KEY, "--exit-on-stdin-eof"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ops-tools");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("banner");
        let url = line
            .trim()
            .strip_prefix("ops-tools listening on ")
            .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
            .to_owned();
        Self { child, url }
    }

    /// `GET /effects`.
    pub fn effects(&self) -> Value {
        let output = Command::new("curl")
            .args(["-sf", &format!("{}/effects", self.url)])
            .output()
            .expect("curl");
        serde_json::from_slice(&output.stdout).expect("effects JSON")
    }

    /// Effects as (path, idempotency key), in order.
    pub fn effect_keys(&self) -> Vec<(String, String)> {
        self.effects()["effects"]
            .as_array()
            .expect("effects")
            .iter()
            .map(|e| {
                (
                    e["path"].as_str().unwrap_or_default().to_owned(),
                    e["idempotencyKey"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for OpsTools {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `contextos` invocation did.
#[derive(Debug)]
pub struct Invocation {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Durable boundaries it reported (only with a fault armed).
    pub boundaries: u32,
    pub killed: bool,
}

/// One data directory and tenant, and the tools it talks to.
pub struct Quickstart {
    pub data: tempfile::TempDir,
    pub tools: OpsTools,
    /// The manifests run (the quickstart's, or a changed copy).
    pub files: PathBuf,
    /// Environment every `contextos` invocation gets besides the test's.
    pub env: Vec<(String, String)>,
}

impl Quickstart {
    pub fn new(tool_args: &[&str]) -> Self {
        Self::with_files(tool_args, Self::examples())
    }

    /// The quickstart's flow over other manifests.
    pub fn with_files(tool_args: &[&str], files: PathBuf) -> Self {
        Self {
            data: tempfile::tempdir().expect("tempdir"),
            tools: OpsTools::start(tool_args),
            files,
            env: Vec::new(),
        }
    }

    pub fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contextos"));
        command
            .arg("--data-dir")
            .arg(self.data.path())
            .args(["--tenant", "shop"])
            .args(args)
            .env_remove("CONTEXTOS_FAULT_PAUSE_AT_BOUNDARY")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn access(&self) -> Vec<String> {
        vec![
            "--secret".into(),
            format!("ops-tools-webhook/hmac-key={HMAC_KEY}"),
            "--endpoint-override".into(),
            format!("{SERVICE}:8080={}", self.tools.url),
            "--endpoint-override".into(),
            format!("{SERVICE}:8081={}", self.tools.url),
        ]
    }

    /// Runs `contextos <args>` to the end.
    pub fn cli(&self, args: &[&str]) -> Invocation {
        let output = self.command(args).output().expect("run contextos");
        Invocation {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            boundaries: 0,
            killed: false,
        }
    }

    /// `contextos run -f examples/quickstart` (or `resume`), SIGKILLed at boundary `kill_at`.
    pub fn step(&self, resume: bool, kill_at: Option<u32>) -> Invocation {
        let mut args: Vec<String> = if resume {
            vec!["resume".into(), "checkout-5xx".into()]
        } else {
            vec!["run".into(), "-f".into(), self.files.display().to_string()]
        };
        args.extend(self.access());
        let mut command = self.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if let Some(k) = kill_at {
            command.env("CONTEXTOS_FAULT_PAUSE_AT_BOUNDARY", k.to_string());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn contextos");
        let (lines, killed_at) = watch(&mut child, |line| line.starts_with("fault: paused"));
        let killed = killed_at;
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        Invocation {
            code: status.code(),
            boundaries: lines.iter().filter(|l| l.starts_with("fault: boundary")).count() as u32,
            stdout: lines.join("\n"),
            stderr,
            killed,
        }
    }

    /// Approves the pending restart as an on-call engineer.
    pub fn approve(&self) {
        let hash = self.pending_hash();
        let out = self.cli(&[
            "approve",
            "checkout-5xx",
            "--call",
            &hash,
            "--as",
            "dana@example.com",
            "--group",
            "sre-oncall",
        ]);
        assert_eq!(out.code, Some(0), "approve failed: {}{}", out.stdout, out.stderr);
    }

    /// The pending call hash, as `contextos approve` names it when given a wrong one (keeps the
    /// test on the CLI surface a user has).
    pub fn pending_hash(&self) -> String {
        let probe = self.cli(&["approve", "checkout-5xx", "--call", "000000000000", "--as", "x"]);
        let marker = "waits for approval of call ";
        let at = probe
            .stderr
            .find(marker)
            .unwrap_or_else(|| panic!("no pending approval: {}", probe.stderr));
        probe.stderr[at + marker.len()..].chars().take(64).collect()
    }

    /// The id of the session's newest run, as `contextos records list` shows it.
    #[allow(dead_code)] // not every test binary reads records
    pub fn newest_run(&self) -> String {
        let runs = self.cli(&["records", "list"]);
        runs.stdout
            .lines()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("checkout-5xx-")))
            .unwrap_or_else(|| panic!("a run: {}", runs.stdout))
            .to_owned()
    }

    /// The entries of the session's newest run, as `contextos records export` writes them.
    #[allow(dead_code)] // not every test binary reads records
    pub fn newest_run_entries(&self) -> Vec<Value> {
        let export = self.cli(&["records", "export", &self.newest_run()]);
        assert_eq!(export.code, Some(0), "{}", export.stderr);
        export
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The recorded decision trace of the session's run, via `contextos replay`.
    pub fn recorded_trace(&self) -> Value {
        let out = self.cli(&["replay", "--session", "checkout-5xx", "--output", "json"]);
        assert_eq!(
            out.code,
            Some(0),
            "same-version replay must pass: {}{}",
            out.stdout,
            out.stderr
        );
        let report: Value = serde_json::from_str(&out.stdout).expect("replay JSON");
        report["replays"][0]["recorded"].clone()
    }

    /// Drives the whole session — run, approve, resume — killing the `kill_at`-th durable
    /// boundary counted across every process (`None`: no kill). Returns how many boundaries the
    /// flow passed and whether a kill happened.
    pub fn drive(&self, kill_at: Option<u32>) -> (u32, bool) {
        let mut remaining = kill_at;
        let mut passed = 0;
        let mut killed_once = false;
        let mut resume = false;
        for _ in 0..8 {
            let out = self.step(resume, remaining.or(Some(u32::MAX)));
            passed += out.boundaries;
            resume = true;
            if out.killed {
                killed_once = true;
                remaining = None;
                continue;
            }
            remaining = remaining.map(|k| k - out.boundaries);
            match out.code {
                Some(0) => return (passed, killed_once),
                Some(4) => self.approve(),
                other => panic!("contextos exited {other:?}:\n{}\n{}", out.stdout, out.stderr),
            }
        }
        panic!("the session did not complete in 8 invocations");
    }
}

/// Reads stdout lines until the process exits or `stop` matches (then SIGKILLs it).
fn watch(child: &mut Child, stop: impl Fn(&str) -> bool) -> (Vec<String>, bool) {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let hit = stop(&line);
                lines.push(line);
                if hit {
                    kill(child);
                    return (lines, true);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return (lines, false),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill(child);
                panic!("contextos printed nothing for 60 s:\n{}", lines.join("\n"));
            }
        }
    }
}

pub fn kill(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}
