//! The process node's files: per-pod volume directories, per-container roots with each mount
//! linked in at its mount path, termination-message files, and container log files.
//!
//! Layout under the node directory:
//!
//! ```text
//! logs/<namespace>/<pod>/<container>.log      stdout+stderr, appended across restarts; kept
//! pods/<uid>/volumes/<volume>/...             emptyDir, ConfigMap, Secret, projected files
//! pods/<uid>/containers/<container>/root/     the container's root ($CONTEXTOS_ROOT)
//!     <mountPath> -> ../../volumes/<volume>[/<subPath>]   (symlinks)
//!     dev/termination-log                     terminationMessagePath
//! ```
//!
//! A process finds a mount declared at `mountPath: /etc/app` at `$CONTEXTOS_ROOT/etc/app`, and a
//! volume `app-config` also at `$CONTEXTOS_VOLUME_APP_CONFIG`. Scripts written as
//! `cat "${CONTEXTOS_ROOT}/etc/app/key"` work unchanged in a real container, where the variable
//! is unset. The working directory is `$CONTEXTOS_ROOT/<workingDir>` (or `$CONTEXTOS_ROOT`).

use std::{
    fs, io,
    os::unix::fs::{PermissionsExt, chown, symlink},
    path::{Path, PathBuf},
};

use super::{
    plan::ContainerPlan,
    volumes::{VolumeContent, VolumePlan},
};

/// Where the node keeps its files.
#[derive(Clone, Debug)]
pub struct NodeDirs {
    root: PathBuf,
}

impl NodeDirs {
    /// Creates the node directory (traversable by the users pods run as).
    pub fn create(root: &Path) -> io::Result<Self> {
        for dir in [root.to_path_buf(), root.join("pods"), root.join("logs")] {
            fs::create_dir_all(&dir)?;
            set_mode(&dir, 0o711)?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The log file of a container: `<node dir>/logs/<namespace>/<pod>/<container>.log`.
    pub fn log_file(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        log_file(&self.root, namespace, pod, container)
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(sanitize(uid))
    }
}

/// [`NodeDirs::log_file`] without a `NodeDirs` (for harnesses that only know the directory).
pub fn log_file(node_dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    node_dir
        .join("logs")
        .join(sanitize(namespace))
        .join(sanitize(pod))
        .join(format!("{}.log", sanitize(container)))
}

/// Names come from the API server (DNS labels), but never let one escape its directory.
fn sanitize(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.chars().all(|c| c == '.') {
        format!("_{clean}")
    } else {
        clean
    }
}

/// A container's prepared root.
#[derive(Clone, Debug)]
pub struct ContainerRoot {
    pub root: PathBuf,
    pub cwd: PathBuf,
    pub termination_log: PathBuf,
    /// `CONTEXTOS_ROOT` and `CONTEXTOS_VOLUME_<NAME>` for the process.
    pub env: Vec<(String, String)>,
}

/// One pod's directory.
#[derive(Clone, Debug)]
pub struct PodSandbox {
    dir: PathBuf,
}

impl PodSandbox {
    pub fn create(dirs: &NodeDirs, uid: &str) -> io::Result<Self> {
        let dir = dirs.pod_dir(uid);
        for d in [dir.clone(), dir.join("volumes"), dir.join("containers")] {
            fs::create_dir_all(&d)?;
            set_mode(&d, 0o711)?;
        }
        Ok(Self { dir })
    }

    fn volume_dir(&self, volume: &VolumePlan) -> PathBuf {
        match &volume.content {
            VolumeContent::HostPath(path) => path.clone(),
            _ => self.dir.join("volumes").join(sanitize(&volume.name)),
        }
    }

    /// Writes every volume; ConfigMap/Secret-like volumes are rewritten from scratch. With a
    /// pod `fsGroup` (honoured when the node runs as root), files belong to that group and are
    /// group-readable, as the kubelet does, so a non-root container can read its Secrets.
    pub fn write_volumes(&self, volumes: &[VolumePlan], fs_group: Option<u32>) -> io::Result<()> {
        for volume in volumes {
            let dir = self.volume_dir(volume);
            match &volume.content {
                VolumeContent::HostPath(_) => {}
                VolumeContent::EmptyDir => {
                    fs::create_dir_all(&dir)?;
                    set_mode(&dir, 0o777)?;
                }
                VolumeContent::Files(files) => {
                    if dir.exists() {
                        fs::remove_dir_all(&dir)?;
                    }
                    fs::create_dir_all(&dir)?;
                    set_mode(&dir, 0o755)?;
                    for file in files {
                        let path = dir.join(&file.path);
                        if let Some(parent) = path.parent() {
                            fs::create_dir_all(parent)?;
                        }
                        fs::write(&path, &file.data)?;
                        match fs_group {
                            Some(gid) => {
                                chown(&path, None, Some(gid))?;
                                set_mode(&path, file.mode | 0o040)?;
                            }
                            None => set_mode(&path, file.mode)?,
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Builds the container's root: mounts as symlinks, working directory, termination-message
    /// file. Idempotent, so restarts call it again.
    pub fn prepare_container(
        &self,
        plan: &ContainerPlan,
        volumes: &[VolumePlan],
    ) -> io::Result<ContainerRoot> {
        let base = self.dir.join("containers").join(sanitize(&plan.name));
        fs::create_dir_all(&base)?;
        set_mode(&base, 0o711)?;
        let root = base.join("root");
        fs::create_dir_all(&root)?;
        set_mode(&root, 0o755)?;
        let owner = plan.run_as.map(|r| (r.uid, r.gid));
        if let Some((uid, gid)) = owner {
            chown(&root, Some(uid), Some(gid))?;
        }
        let mut env = vec![("CONTEXTOS_ROOT".to_owned(), root.display().to_string())];
        for mount in &plan.mounts {
            let Some(volume) = volumes.iter().find(|v| v.name == mount.volume) else {
                continue; // plan_mounts already refused unknown volumes
            };
            let mut target = self.volume_dir(volume);
            if let Some(sub) = &mount.sub_path {
                target = target.join(sub);
                fs::create_dir_all(&target)?;
            }
            link(&under(&root, &mount.mount_path), &target)?;
            let var = format!("CONTEXTOS_VOLUME_{}", env_name(&volume.name));
            if !env.iter().any(|(k, _)| *k == var) {
                env.push((var, self.volume_dir(volume).display().to_string()));
            }
        }
        let cwd = match &plan.working_dir {
            Some(dir) => {
                let cwd = under(&root, dir);
                fs::create_dir_all(&cwd)?;
                cwd
            }
            None => root.clone(),
        };
        let termination_log = under(&root, &plan.termination_message_path);
        if let Some(parent) = termination_log.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&termination_log, b"")?;
        set_mode(&termination_log, 0o666)?;
        Ok(ContainerRoot {
            root,
            cwd,
            termination_log,
            env,
        })
    }

    /// Removes the pod's directory (its logs stay).
    pub fn remove(&self) {
        if let Err(err) = fs::remove_dir_all(&self.dir)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), %err, "cannot remove pod directory");
        }
    }
}

/// `/etc/app` under `root` → `<root>/etc/app`.
fn under(root: &Path, container_path: &Path) -> PathBuf {
    let relative = container_path.strip_prefix("/").unwrap_or(container_path);
    root.join(relative)
}

fn link(at: &Path, target: &Path) -> io::Result<()> {
    if let Some(parent) = at.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::symlink_metadata(at) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(at)?,
        Ok(_) => fs::remove_file(at)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    symlink(target, at)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// `app-config` → `APP_CONFIG`.
pub fn env_name(volume: &str) -> String {
    volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The termination message the kubelet would report: the file's content (at most 4096 bytes),
/// or with `FallbackToLogsOnError` and a failed, silent container the end of its log.
pub fn termination_message(
    file: &Path,
    log: &Path,
    fallback_to_logs: bool,
    exit_code: i32,
) -> Option<String> {
    const MAX: usize = 4096;
    let tail = |bytes: Vec<u8>| {
        let start = bytes.len().saturating_sub(MAX);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    };
    let written = fs::read(file).map(tail).unwrap_or_default();
    if !written.is_empty() {
        return Some(written);
    }
    if fallback_to_logs && exit_code != 0 {
        return fs::read(log).ok().map(tail).filter(|t| !t.is_empty());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process_node::{
        env_vars::Environment,
        volumes::{MountPlan, VolumeFile},
    };

    fn plan(mounts: Vec<MountPlan>, working_dir: Option<&str>) -> ContainerPlan {
        ContainerPlan {
            name: "main".into(),
            image: "busybox:1.36".into(),
            argv: vec!["sh".into()],
            env: Environment::default(),
            working_dir: working_dir.map(PathBuf::from),
            mounts,
            run_as: None,
            termination_message_path: PathBuf::from("/dev/termination-log"),
            fallback_to_logs: false,
        }
    }

    #[test]
    fn mounts_appear_under_the_container_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = NodeDirs::create(tmp.path()).expect("node dirs");
        let sandbox = PodSandbox::create(&dirs, "uid-1").expect("sandbox");
        let volumes = vec![
            VolumePlan {
                name: "app-config".into(),
                content: VolumeContent::Files(vec![VolumeFile {
                    path: PathBuf::from("conf/app.yaml"),
                    data: b"a: 1".to_vec(),
                    mode: 0o600,
                }]),
            },
            VolumePlan {
                name: "scratch".into(),
                content: VolumeContent::EmptyDir,
            },
        ];
        sandbox.write_volumes(&volumes, None).expect("volumes");
        let mounts = vec![
            MountPlan {
                mount_path: PathBuf::from("/etc/app"),
                volume: "app-config".into(),
                sub_path: None,
            },
            MountPlan {
                mount_path: PathBuf::from("/data"),
                volume: "scratch".into(),
                sub_path: Some(PathBuf::from("part")),
            },
        ];
        let plan = plan(mounts, Some("/data/work"));
        let root = sandbox.prepare_container(&plan, &volumes).expect("root");
        let file = root.root.join("etc/app/conf/app.yaml");
        assert_eq!(fs::read_to_string(&file).expect("mounted file"), "a: 1");
        assert_eq!(
            fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(root.cwd.ends_with("data/work") && root.cwd.is_dir());
        assert!(
            sandbox.dir.join("volumes/scratch/part/work").is_dir(),
            "the working dir is inside the subPath"
        );
        assert!(root.env.iter().any(|(k, _)| k == "CONTEXTOS_VOLUME_APP_CONFIG"));
        assert!(root.termination_log.ends_with("dev/termination-log"));
        // Preparing again (a restart) keeps working.
        sandbox.prepare_container(&plan, &volumes).expect("prepare again");
        sandbox.remove();
        assert!(!dirs.pod_dir("uid-1").exists());
    }

    #[test]
    fn log_paths_cannot_escape() {
        let path = log_file(Path::new("/n"), "ns", "../../etc", "c/d");
        assert_eq!(path, PathBuf::from("/n/logs/ns/.._.._etc/c_d.log"));
        assert_eq!(
            log_file(Path::new("/n"), "ns", "..", "c"),
            PathBuf::from("/n/logs/ns/_../c.log")
        );
    }

    #[test]
    fn termination_messages() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (file, log) = (tmp.path().join("msg"), tmp.path().join("log"));
        fs::write(&log, "boom\n").expect("log");
        fs::write(&file, "").expect("msg");
        assert_eq!(termination_message(&file, &log, false, 1), None);
        assert_eq!(
            termination_message(&file, &log, true, 1).as_deref(),
            Some("boom\n")
        );
        assert_eq!(termination_message(&file, &log, true, 0), None);
        fs::write(&file, "done").expect("msg");
        assert_eq!(termination_message(&file, &log, true, 1).as_deref(), Some("done"));
    }
}
