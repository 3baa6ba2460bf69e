//! The local control plane process: finding or building the `testenv` binary, starting it in a
//! fresh directory, waiting for its `READY <kubeconfig>` line, and making sure that it and its
//! directory go away when the test process exits, even on abort.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::EnvError;

/// Path of a prebuilt testenv binary; without it, `kind-tests/testenv/build.sh` is run.
pub const TESTENV_BIN_ENV: &str = "CONTEXTOS_TESTENV_BIN";
/// `1` keeps the control plane's directory (logs, kubeconfig) after the tests.
pub const KEEP_DIR_ENV: &str = "CONTEXTOS_KEEP_TESTENV";
/// How long testenv may take to print READY (it usually takes 3–4 s).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of testenv's stderr shown when it fails.
const STDERR_TAIL_LINES: usize = 40;

/// Waits for stdin to close (the test process is gone), then for testenv ($1) to exit, then
/// removes the directory ($2). A zombie counts as exited (PID 1 may be slow to reap it).
const REAPER_SCRIPT: &str = r#"
cat >/dev/null
i=0
while kill -0 "$1" 2>/dev/null && [ "$i" -lt 100 ]; do
  case "$(cat "/proc/$1/stat" 2>/dev/null)" in *") Z "*) break ;; esac
  sleep 0.2
  i=$((i + 1))
done
rm -rf "$2"
"#;

/// A running testenv.
#[derive(Debug)]
pub struct ControlPlane {
    /// The testenv binary, which is also `kubectl` (`testenv kubectl ARGS...`).
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// From spawning testenv to its READY line.
    pub startup: Duration,
    pub pid: u32,
    _child: Child,
    _reaper: Option<ChildStdin>,
}

/// The testenv binary: `$CONTEXTOS_TESTENV_BIN`, or the last line `build.sh` prints.
pub fn testenv_binary(repo_root: &Path) -> Result<PathBuf, EnvError> {
    if let Some(bin) = std::env::var_os(TESTENV_BIN_ENV).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(EnvError::Build(format!(
                "{TESTENV_BIN_ENV}={} is not a file; unset it to build testenv with kind-tests/testenv/build.sh",
                bin.display()
            )))
        };
    }
    let script = repo_root.join("kind-tests/testenv/build.sh");
    // build.sh writes progress to stderr (inherited, so a cold build shows what it does) and
    // the binary's path as its last stdout line.
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| EnvError::Build(format!("cannot run {}: {e}", script.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default();
    if !output.status.success() || last.is_empty() {
        return Err(EnvError::Build(format!(
            "{} failed ({}); it needs Go >= 1.26 and the Go module proxy. Or set {TESTENV_BIN_ENV} to a \
             built binary, or KUBECONFIG to run against an existing cluster",
            script.display(),
            output.status
        )));
    }
    Ok(PathBuf::from(last))
}

/// Starts testenv with its state in `dir`/control-plane and waits for READY. With `node`, testenv
/// runs in node mode for a real node at that address (see `kind-tests/testenv/node.go`): the
/// apiserver listens there so that pods reach it, and Deployments, Services and claims work.
pub fn start(bin: &Path, dir: &Path, node: Option<std::net::Ipv4Addr>) -> Result<ControlPlane, EnvError> {
    let io = |what: String| move |source| EnvError::Io { what, source };
    let state = dir.join("control-plane");
    let stderr_path = dir.join("testenv.stderr");
    let stderr = fs::File::create(&stderr_path).map_err(io(format!("create {}", stderr_path.display())))?;
    let started = Instant::now();
    let mut command = Command::new(bin);
    if let Some(address) = node {
        command.env("TESTENV_NODE_ADDRESS", address.to_string());
    }
    let mut child = command
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(io(format!("start {}", bin.display())))?;
    let reaper = if std::env::var(KEEP_DIR_ENV).as_deref() == Ok("1") {
        eprintln!(
            "kind-tests: keeping the control plane directory {}",
            dir.display()
        );
        None
    } else {
        Some(start_reaper(child.id(), dir).map_err(io("start the cleanup process (/bin/sh)".to_owned()))?)
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| EnvError::Build("testenv stdout not captured".into()))?;
    match wait_ready(stdout, &mut child) {
        Ok(kubeconfig) => Ok(ControlPlane {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            kubeconfig,
            startup: started.elapsed(),
            pid: child.id(),
            _child: child,
            _reaper: reaper,
        }),
        Err(reason) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(EnvError::NotReady {
                reason,
                stderr_path: stderr_path.clone(),
                stderr_tail: tail(&stderr_path, STDERR_TAIL_LINES),
            })
        }
    }
}

fn start_reaper(testenv_pid: u32, dir: &Path) -> std::io::Result<ChildStdin> {
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", REAPER_SCRIPT, "kind-tests-reaper"])
        .arg(testenv_pid.to_string())
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut reaper = command.spawn()?;
    reaper
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("reaper stdin not captured"))
}

/// Reads stdout lines until `READY <path>`, testenv exits, or the timeout passes.
fn wait_ready(stdout: impl Read + Send + 'static, child: &mut Child) -> Result<PathBuf, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                if let Some(path) = line.strip_prefix("READY ") {
                    return Ok(PathBuf::from(path.trim()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("testenv exited before READY ({status})"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                return Err(format!("no READY line within {READY_TIMEOUT:?}"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The last `lines` lines of a file (at most 64 KiB are read).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A fresh directory for one test process: `contextos-kind-tests-XXXXXX` in the temp dir,
/// traversable (not listable) by other users, since pods may run as another uid.
pub fn fresh_dir() -> Result<PathBuf, EnvError> {
    let dir = tempfile::Builder::new()
        .prefix("contextos-kind-tests-")
        .tempdir()
        .map_err(|source| EnvError::Io {
            what: "create a temporary directory".to_owned(),
            source,
        })?
        .keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).map_err(|source| EnvError::Io {
        what: format!("chmod {}", dir.display()),
        source,
    })?;
    Ok(dir)
}
