//! The real node (`kind-tests/realnode/`): kubelet, containerd with runc, the CNI plugins,
//! kube-proxy, kube-router (NetworkPolicy) and kube-scheduler, started next to the local control
//! plane for the tests that must see the sandbox *enforced*, not only written into pod specs.
//!
//! The node is driven by its shell scripts (build, start, stop, image); this module only starts
//! them and makes sure they are undone: a watchdog process, which outlives a killed test binary,
//! runs `stop.sh` as soon as the test process is gone, so no container, mount, cgroup, iptables
//! rule or address survives the tests.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
};

use crate::env::{EnvError, repo_root};

/// The node's address (on `lo`): the kubelet listens there, and pods reach services the tests
/// run on the host (the gateway) through it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 255, 1);
/// The image the ContextOS binaries are packed into (its digest is added at build time).
pub const CONTEXTOS_IMAGE: &str = "localhost/contextos/contextos:dev";
/// The busybox image `build.sh` makes from Debian's busybox-static (probes run in it).
pub const BUSYBOX_IMAGE: &str = "localhost/contextos/busybox:1.35.0";
/// The CoreDNS image `build.sh` makes (the cluster DNS runs it).
pub const COREDNS_IMAGE: &str = "localhost/contextos/coredns:1.15.0";
/// Set to `1` to turn a missing real node (not root) from a skip into a failure (CI sets it).
pub const REQUIRE_ENV: &str = "CONTEXTOS_REQUIRE_REALNODE";

/// A running real node; stopped by its watchdog when the test process ends.
#[derive(Debug)]
pub struct RealNode {
    dir: PathBuf,
    name: String,
    build: PathBuf,
    /// `REF@sha256:…` of the imported ContextOS image.
    contextos_image: String,
    /// Closing it (the test process exiting, however it ends) starts the teardown.
    _watchdog: ChildStdin,
}

/// Why the real node cannot run on this machine, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "the real node needs root (containerd, runc, CNI, iptables); run `make kind-tests` as root"
                .into(),
        );
    }
    None
}

/// A node built and holding the machine's lock, its address on `lo`, not started yet: the
/// control plane is started in between, listening on that address.
#[derive(Debug)]
pub struct PreparedNode {
    dir: PathBuf,
    build: PathBuf,
    watchdog: ChildStdin,
}

impl RealNode {
    /// Builds the node (cached), takes the machine's real-node lock through the watchdog and puts
    /// [`NODE_IP`] on `lo` (the watchdog removes it again if it was not there before).
    pub fn prepare() -> Result<PreparedNode, EnvError> {
        let io = |what: String| move |source| EnvError::Io { what, source };
        let dir = tempfile::Builder::new()
            .prefix("contextos-realnode-")
            .tempdir()
            .map_err(io("create the real node's directory".into()))?
            .keep();
        let scripts = repo_root().join("kind-tests/realnode");
        let build = last_line(
            Command::new("bash")
                .arg(scripts.join("build.sh"))
                .env("REALNODE_KUBE_ROUTER", "1")
                .stderr(Stdio::inherit()),
            "kind-tests/realnode/build.sh",
        )?;
        let watchdog = start_watchdog(&scripts, &dir).map_err(io("start the real node's watchdog".into()))?;
        add_node_address(&dir)?;
        Ok(PreparedNode {
            dir,
            build: PathBuf::from(build),
            watchdog,
        })
    }
}

impl PreparedNode {
    /// Starts the node against the control plane of `kubeconfig` (testenv in node mode), with
    /// kube-proxy, kube-router, kube-scheduler and the cluster DNS, and imports the ContextOS
    /// image.
    pub fn start(self, kubeconfig: &Path) -> Result<RealNode, EnvError> {
        let Self { dir, build, watchdog } = self;
        // A start that fails is torn down and tried once more: a node component that loses a
        // race at start-up on a loaded host should not fail every cluster test. The first
        // failure's diagnosis is printed, and a second failure reports its own.
        let ready = match run_start(&dir, kubeconfig, None) {
            Ok(ready) => ready,
            Err(first) => {
                eprintln!(
                    "kind-tests: the real node did not start; stopping it and trying once more.\n{first}"
                );
                // The first start set ip_forward; the second must restore what was there before.
                let forward = std::fs::read_to_string(dir.join("realnode.env"))
                    .ok()
                    .and_then(|env| {
                        env.lines()
                            .find_map(|l| l.strip_prefix("IP_FORWARD_BEFORE='"))
                            .map(|v| v.trim_end_matches('\'').to_owned())
                    });
                stop_failed_start(&dir)
                    .map_err(|stop| EnvError::Build(format!("{stop}\nThe start it followed: {first}")))?;
                // The second attempt's diagnosis must quote its own logs, not the first's.
                let _ = std::fs::rename(dir.join("logs"), dir.join("logs.first-attempt"));
                run_start(&dir, kubeconfig, forward.as_deref()).map_err(|second| {
                    EnvError::Build(format!(
                        "the real node did not start twice.\nFirst attempt: {first}\nSecond attempt: {second}"
                    ))
                })?
            }
        };
        let name = ready
            .strip_prefix("READY ")
            .ok_or_else(|| EnvError::Build(format!("start.sh ended with {ready:?}, not READY <node>")))?
            .to_owned();
        let mut node = RealNode {
            dir,
            name,
            build,
            contextos_image: String::new(),
            _watchdog: watchdog,
        };
        node.contextos_image = node.import_contextos_image()?;
        Ok(node)
    }
}

/// Runs `start.sh` for the node in `dir` and returns its `READY <node>` line, or an error that
/// carries what the logs say (they are removed with the node when the test process ends, so a
/// CI run's failure must show them in the error itself).
fn run_start(dir: &Path, kubeconfig: &Path, ip_forward_before: Option<&str>) -> Result<String, EnvError> {
    let io = |what: String| move |source| EnvError::Io { what, source };
    // start.sh is chatty (every image it imports); its output is kept with the node's logs.
    let start_log = dir.with_extension("start.log");
    let log_file =
        std::fs::File::create(&start_log).map_err(io(format!("create {}", start_log.display())))?;
    let mut start = Command::new("bash");
    start
        .arg(repo_root().join("kind-tests/realnode/start.sh"))
        .arg(dir)
        .arg(kubeconfig)
        .env("REALNODE_KUBE_PROXY", "1")
        .env("REALNODE_KUBE_ROUTER", "1")
        .env("REALNODE_SCHEDULER", "1")
        .env("REALNODE_DNS", "1")
        .stderr(log_file);
    if let Some(value) = ip_forward_before {
        start.env("REALNODE_IP_FORWARD_BEFORE", value);
    }
    last_line(&mut start, "kind-tests/realnode/start.sh")
        .map_err(|error| EnvError::Build(format!("{error}\n{}", start_diagnosis(dir, &start_log))))
}

/// Runs `stop.sh` on a node whose start failed, so that the next start finds a clean machine
/// (`stop.sh` keeps `logs/`; `start.sh` refuses a directory that still holds `realnode.env`).
fn stop_failed_start(dir: &Path) -> Result<(), EnvError> {
    let status = Command::new("bash")
        .arg(repo_root().join("kind-tests/realnode/stop.sh"))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| EnvError::Build(format!("cannot run stop.sh: {e}")))?;
    if !status.success() {
        return Err(EnvError::Build(format!(
            "stop.sh {} failed ({status}) after a failed start",
            dir.display()
        )));
    }
    Ok(())
}

/// How many lines of each log a failed start's error quotes.
const DIAGNOSIS_LINES: usize = 25;

/// The end of `start.sh`'s own output (without the image-import chatter), then the errors
/// each component logged (klog `E` lines, containerd's `level=error`), most recent last.
fn start_diagnosis(dir: &Path, start_log: &Path) -> String {
    let mut out = String::new();
    let start = std::fs::read_to_string(start_log).unwrap_or_default();
    let quoted = last_lines(&start, |line| {
        !line.starts_with("unpacking ") && !line.contains("level=warning") && !line.starts_with("Importing")
    });
    out.push_str(&format!("--- {} (last lines)\n{quoted}", start_log.display()));
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.join("logs"))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let errors = last_lines(&text, |line| {
            line.starts_with('E') && line.as_bytes().get(1).is_some_and(u8::is_ascii_digit)
                || line.contains("level=error")
                || line.contains("level=fatal")
                || line.starts_with('F') && line.as_bytes().get(1).is_some_and(u8::is_ascii_digit)
        });
        if !errors.is_empty() {
            out.push_str(&format!("--- {} (errors, last lines)\n{errors}", log.display()));
        }
    }
    out
}

/// The last [`DIAGNOSIS_LINES`] lines of `text` that `keep` accepts, each ending in a newline.
fn last_lines(text: &str, keep: impl Fn(&str) -> bool) -> String {
    let kept: Vec<&str> = text.lines().filter(|line| keep(line)).collect();
    kept[kept.len().saturating_sub(DIAGNOSIS_LINES)..]
        .iter()
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Puts [`NODE_IP`] on `lo` unless it is there; when this added it, `<dir>.address` tells the
/// watchdog to remove it after the node is stopped.
fn add_node_address(dir: &Path) -> Result<(), EnvError> {
    let cidr = format!("{NODE_IP}/32");
    let shown = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "lo"])
        .output()
        .map_err(|e| EnvError::Build(format!("cannot run ip: {e}")))?;
    if String::from_utf8_lossy(&shown.stdout).contains(&format!(" {cidr} ")) {
        return Ok(());
    }
    let marker = dir.with_extension("address");
    std::fs::write(&marker, &cidr).map_err(|source| EnvError::Io {
        what: format!("write {}", marker.display()),
        source,
    })?;
    let status = Command::new("ip")
        .args(["addr", "add", &cidr, "dev", "lo"])
        .status()
        .map_err(|e| EnvError::Build(format!("cannot run ip: {e}")))?;
    if !status.success() {
        return Err(EnvError::Build(format!(
            "ip addr add {cidr} dev lo failed ({status})"
        )));
    }
    Ok(())
}

impl RealNode {
    /// Packs the workspace's binaries (next to the test binary: `contextos`, and
    /// `contextos-operator` and the `ops_tools` and `hostile_mcp` examples when built) into the
    /// ContextOS image, with the TiKV test server when `CONTEXTOS_TIKV_TESTSERVER_BIN` names it
    /// (the fresh install's stand-in for PD and TiKV), imports it into the node's containerd and
    /// returns `REF@digest`.
    fn import_contextos_image(&self) -> Result<String, EnvError> {
        let contextos = crate::process_node::workspace_binary("contextos").ok_or_else(|| {
            EnvError::Build("target/<profile>/contextos is missing: `make kind-tests` builds it".into())
        })?;
        let others = ["contextos-operator", "examples/ops_tools", "examples/hostile_mcp"]
            .into_iter()
            .filter_map(crate::process_node::workspace_binary)
            .chain(
                std::env::var_os(crate::operator_env::tikv_testserver::TESTSERVER_ENV)
                    .map(std::path::PathBuf::from)
                    .filter(|path| path.is_file()),
            );
        let output = Command::new("bash")
            .arg(repo_root().join("kind-tests/realnode/image.sh"))
            .arg(CONTEXTOS_IMAGE)
            .arg(&contextos)
            .args(others)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| EnvError::Build(format!("cannot run image.sh: {e}")))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines().rev();
        let (Some(reference), Some(archive)) = (lines.next(), lines.next()) else {
            return Err(EnvError::Build(format!("image.sh failed ({})", output.status)));
        };
        if !output.status.success() {
            return Err(EnvError::Build(format!("image.sh failed ({})", output.status)));
        }
        self.ctr(&["images", "import", archive])?;
        let (tagged, _) = reference
            .split_once('@')
            .ok_or_else(|| EnvError::Build(format!("image.sh printed {reference:?}, not REF@DIGEST")))?;
        let repository = tagged.rsplit_once(':').map_or(tagged, |(repo, _)| repo);
        self.name_image(reference, repository)?;
        Ok(reference.to_owned())
    }

    /// Names the imported image `reference` (`REPO:TAG@sha256:…`) also `repository@sha256:…`
    /// (same content, same digest) and returns that name: the CRI finds an image named by digest
    /// only under a `repo@sha256:…` name (a pull records one; an import does not). The install
    /// test uses it to give the workspace's build the repository names the manifests use.
    pub fn name_image(&self, reference: &str, repository: &str) -> Result<String, EnvError> {
        let (tagged, digest) = reference
            .split_once('@')
            .ok_or_else(|| EnvError::Build(format!("{reference:?} is not REF@DIGEST")))?;
        let name = format!("{repository}@{digest}");
        self.ctr(&["images", "tag", "--force", tagged, &name])?;
        Ok(name)
    }

    /// Runs `ctr -n k8s.io ARGS` against the node's containerd.
    fn ctr(&self, args: &[&str]) -> Result<(), EnvError> {
        let status = Command::new(self.build.join("bin/ctr"))
            .arg("-a")
            .arg(self.dir.join("containerd/containerd.sock"))
            .args(["-n", "k8s.io"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| EnvError::Build(format!("cannot run ctr: {e}")))?;
        if !status.success() {
            return Err(EnvError::Build(format!(
                "ctr {} failed ({status})",
                args.join(" ")
            )));
        }
        Ok(())
    }

    /// The Node's name (its address).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's working directory (`logs/` holds every component's log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `localhost/contextos/contextos:dev@sha256:…`: the workspace's binaries, as pods name them.
    pub fn contextos_image(&self) -> &str {
        &self.contextos_image
    }
}

/// Runs `command` and returns its last non-empty stdout line.
fn last_line(command: &mut Command, what: &str) -> Result<String, EnvError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EnvError::Build(format!("cannot run {what}: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default();
    if !output.status.success() || last.is_empty() {
        return Err(EnvError::Build(format!("{what} failed ({})", output.status)));
    }
    Ok(last.to_owned())
}

/// The teardown: holds the machine's real-node lock (one node per machine: fixed address and
/// ports; a second test run waits here until the first one's teardown is over), waits for its
/// stdin to close (the test process is gone, or dropped the node), then runs `stop.sh` and
/// removes the node's directory (its logs are kept with `CONTEXTOS_KEEP_TESTENV=1`). Its own
/// process group, so a signal to the test's group does not take it along.
fn start_watchdog(scripts: &Path, dir: &Path) -> std::io::Result<ChildStdin> {
    const SCRIPT: &str = r#"
exec 9>/run/contextos-realnode.lock
flock -w 300 9 || { echo "another real node did not stop within 300 s (lock /run/contextos-realnode.lock)"; exit 1; }
# Nodes of runs that ended without their teardown (the machine restarted, or the watchdog was
# killed): the lock is free, so none of them is running any more; stop what they left (mounts,
# iptables chains, cgroups, the node address) before this node starts.
for old in "$(dirname "$2")"/contextos-realnode-*; do
  [ -e "$old/realnode.env" ] && [ "$old" != "$2" ] || continue
  echo "kind-tests: stopping the real node a previous run left in $old" >&2
  bash "$1/stop.sh" "$old" >"$old.stop.log" 2>&1
  if [ -e "$old.address" ]; then ip addr del "$(cat "$old.address")" dev lo 2>/dev/null; fi
  rm -rf --one-file-system "$old" "$old.start.log" "$old.stop.log" "$old.address" 2>/dev/null
done
echo locked
cat >/dev/null
bash "$1/stop.sh" "$2" >"$2.stop.log" 2>&1
if [ -e "$2.address" ]; then ip addr del "$(cat "$2.address")" dev lo 2>/dev/null; rm -f "$2.address"; fi
if [ "${CONTEXTOS_KEEP_TESTENV:-}" = 1 ]; then
  echo "kind-tests: kept the real node's logs in $2/logs and $2.*.log" >&2
else
  rm -rf "$2" "$2.start.log" "$2.stop.log"
fi
"#;
    let mut child = Command::new("/bin/sh")
        .args(["-c", SCRIPT, "kind-tests-realnode-watchdog"])
        .arg(scripts)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        BufReader::new(stdout).read_line(&mut line)?;
    }
    if line.trim() != "locked" {
        return Err(std::io::Error::other(if line.is_empty() {
            "the watchdog ended before taking the real-node lock".to_owned()
        } else {
            line.trim().to_owned()
        }));
    }
    child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("watchdog stdin not captured"))
}
