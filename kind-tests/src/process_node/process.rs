//! Container processes: each runs in its own process group with stdout and stderr appended to one
//! log file; the group is signalled as a whole (like a container's cgroup) and killed when its
//! handle drops. A watchdog process kills every live group if this process dies without cleanup
//! (panic, abort, SIGKILL), because it sees its stdin pipe close.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// Reads `+PGID` / `-PGID` lines; at end of input (its parent died or dropped the pipe) it
/// SIGKILLs every group still registered.
const WATCHDOG_SCRIPT: &str = r#"
groups=' '
while read -r line; do
  case "$line" in
    +*) groups="$groups${line#+} " ;;
    -*) keep=' '
        for g in $groups; do [ "$g" = "${line#-}" ] || keep="$keep$g "; done
        groups=$keep ;;
  esac
done
for g in $groups; do kill -KILL "-$g" 2>/dev/null; done
"#;

/// The watchdog process (see the module docs).
#[derive(Debug)]
pub struct Watchdog {
    stdin: Mutex<Option<std::process::ChildStdin>>,
    child: Mutex<std::process::Child>,
}

impl Watchdog {
    pub fn start() -> io::Result<Self> {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", WATCHDOG_SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a Ctrl-C in the terminal must not kill it before the groups.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self {
            stdin: Mutex::new(stdin),
            child: Mutex::new(child),
        })
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pipe) = stdin.as_mut()
            && pipe.write_all(line.as_bytes()).is_err()
        {
            tracing::warn!("process-node watchdog is gone; container processes may outlive the tests");
            *stdin = None;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing stdin makes the watchdog kill what is left and exit.
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).wait();
    }
}

/// A running container's process group. Dropping it SIGKILLs the whole group.
#[derive(Debug)]
pub struct ProcessGroup {
    pgid: Pid,
    watchdog: Arc<Watchdog>,
}

impl ProcessGroup {
    fn new(pid: u32, watchdog: Arc<Watchdog>) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        watchdog.send(&format!("+{pid}\n"));
        Some(Self {
            pgid: Pid::from_raw(pid),
            watchdog,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Sends `signal` to every process of the group; a group that is already gone is fine.
    pub fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => tracing::warn!(pgid = self.pgid.as_raw(), %err, "cannot signal process group"),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Also reaps stragglers after the main process exited (a container's cgroup dies whole).
        self.signal(Signal::SIGKILL);
        self.watchdog.send(&format!("-{}\n", self.pgid.as_raw()));
    }
}

/// What to execute, with host paths.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    pub user: Option<(u32, u32)>,
}

/// A started container process.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    pub group: ProcessGroup,
}

/// Starts a process in its own group, appending stdout and stderr to `spec.log`. The error text
/// is what the pod's container status shows (`StartError`).
pub fn launch(spec: &LaunchSpec, watchdog: &Arc<Watchdog>) -> Result<Launched, String> {
    let log = open_log(&spec.log).map_err(|e| format!("open log file {}: {e}", spec.log.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("open log file {}: {e}", spec.log.display()))?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = spec.user {
        command.uid(uid).gid(gid);
    }
    let child = command
        .spawn()
        .map_err(|e| format!("exec {:?}: {e}", spec.program.display().to_string()))?;
    let pid = child.id().ok_or("process exited before it could be tracked")?;
    let group = ProcessGroup::new(pid, watchdog.clone()).ok_or("process id out of range")?;
    Ok(Launched { child, group })
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Exit code as Kubernetes reports it: the code, or 128 + signal for a killed process.
pub fn exit_code(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (255, None),
    }
}

/// Resolves a program name like `execvp` would: names with a `/` are taken relative to `cwd`,
/// others are searched in `path`.
pub fn resolve_program(name: &str, path: &str, cwd: &Path) -> Result<PathBuf, String> {
    if name.contains('/') {
        let program = cwd.join(name);
        return if program.exists() {
            Ok(program)
        } else {
            Err(format!("exec: {name:?}: stat {name}: no such file or directory"))
        };
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("exec: {name:?}: executable file not found in $PATH"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn resolves_programs_like_execvp() {
        let cwd = Path::new("/");
        assert_eq!(
            resolve_program("sh", "/nonexistent:/bin", cwd),
            Ok(PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve_program("/bin/sh", "", cwd), Ok(PathBuf::from("/bin/sh")));
        let err = resolve_program("no-such-tool-xyz", "/bin:/usr/bin", cwd).expect_err("missing");
        assert!(err.contains("executable file not found in $PATH"), "{err}");
        assert!(resolve_program("./nope", "/bin", cwd).is_err());
    }

    #[test]
    fn signals_map_to_exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), (3, None));
        assert_eq!(exit_code(ExitStatus::from_raw(15)), (143, Some(15)));
        assert_eq!(exit_code(ExitStatus::from_raw(9)), (137, Some(9)));
    }

    fn sh(dir: &Path, script: &str) -> LaunchSpec {
        LaunchSpec {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: dir.to_path_buf(),
            log: dir.join("logs/c.log"),
            user: None,
        }
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_env_is_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watchdog = Arc::new(Watchdog::start().expect("watchdog"));
        let script = "echo out $GREETING; echo err >&2; echo home=${HOME:-unset}; exit 7";
        let mut launched = launch(&sh(dir.path(), script), &watchdog).expect("starts");
        let status = launched.child.wait().await.expect("waits");
        assert_eq!(exit_code(status), (7, None));
        let log = fs::read_to_string(dir.path().join("logs/c.log")).expect("log");
        assert_eq!(log, "out hi\nerr\nhome=unset\n");
    }

    #[tokio::test]
    async fn dropping_the_group_kills_background_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watchdog = Arc::new(Watchdog::start().expect("watchdog"));
        let pid_file = dir.path().join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let launched = launch(&sh(dir.path(), &script), &watchdog).expect("starts");
        let bg_pid = wait_for_pid(&pid_file).await;
        drop(launched);
        assert!(process_gone(bg_pid).await, "background sleep {bg_pid} survived");
    }

    #[tokio::test]
    async fn the_watchdog_kills_groups_when_its_pipe_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watchdog = Arc::new(Watchdog::start().expect("watchdog"));
        let pid_file = dir.path().join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let launched = launch(&sh(dir.path(), &script), &watchdog).expect("starts");
        let bg_pid = wait_for_pid(&pid_file).await;
        // Simulate this process dying: the handle is leaked and the pipe closes, as the kernel
        // closes it when a process dies; only the watchdog can clean up.
        std::mem::forget(launched);
        drop(watchdog.stdin.lock().expect("watchdog lock").take());
        assert!(
            process_gone(bg_pid).await,
            "background sleep {bg_pid} survived the watchdog"
        );
    }

    async fn wait_for_pid(file: &Path) -> i32 {
        for _ in 0..200 {
            if let Some(pid) = fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()) {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} was never written", file.display());
    }

    /// Polls until `pid` no longer names a live process (zombies count as gone).
    async fn process_gone(pid: i32) -> bool {
        for _ in 0..200 {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
