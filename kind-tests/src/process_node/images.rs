//! The image map: which local program stands in for a container image, and how a container's
//! `command`/`args` combine with it into the argv the process node executes.

use std::collections::BTreeMap;

use thiserror::Error;

/// Environment variable with extra image mappings for the process node, read by
/// [`ImageMap::with_env_overrides`]: `image=program [args...]` entries separated by `;` or newlines,
/// e.g. `ghcr.io/contextos/runner:dev=/work/target/debug/contextos`.
pub const IMAGE_MAP_ENV: &str = "CONTEXTOS_PROCESS_NODE_IMAGES";

/// The runner image the examples and the e2e tests pin (`examples/quickstart/sandboxprofile.yaml`).
pub const RUNNER_IMAGE: &str =
    "ghcr.io/contextos/runner:0.1.0@sha256:8efb2271583453e455faacdc1941d214c2a8e6c6beb667cbc5b69589baf7d3b2";

/// A binary of this workspace in the target directory the running test binary was built in
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let candidate = profile_dir.join(name);
    candidate.is_file().then_some(candidate)
}

/// What an image provides when it runs as a local process: the equivalent of its OCI `Entrypoint`
/// and `Cmd`. Kubernetes rules apply: a container's `command` replaces `entrypoint` (and drops
/// `cmd`), its `args` replace `cmd`. A program name without a `/` is looked up in `PATH`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageEntry {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

impl ImageEntry {
    /// An image whose entrypoint is `program` (like a `FROM scratch` image with one binary).
    pub fn program(program: impl Into<String>) -> Self {
        Self {
            entrypoint: vec![program.into()],
            cmd: Vec::new(),
        }
    }
}

/// Image name → local program. Names are compared after normalisation, so `busybox:1.36`,
/// `library/busybox:1.36` and `docker.io/library/busybox:1.36` are one image, and a name without
/// a tag means `:latest`.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    entries: BTreeMap<String, ImageEntry>,
}

/// The image map cannot produce a command line for a container.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "image {image:?} is not in the process node's image map; map it to a local program with \
         {IMAGE_MAP_ENV}=\"{image}=/path/to/program\" (or ProcessNodeConfig::images), or use one of: {known}"
    )]
    Unknown { image: String, known: String },
    #[error(
        "container {container:?} has no command, and image {image:?} has no entrypoint or cmd in the \
         image map; set the container's command"
    )]
    NoCommand { container: String, image: String },
}

/// A line of [`IMAGE_MAP_ENV`] is not `image=program [args...]`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{IMAGE_MAP_ENV}: entry {entry:?} is not `image=program [args...]`")]
pub struct ImageMapSyntaxError {
    pub entry: String,
}

impl ImageMap {
    /// A map with no images.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The images the cluster tests use, so the same pod specs run on a real cluster and here:
    /// `busybox` (any of `1.36`, `1.37`, `latest`) behaves like its image: no entrypoint, `cmd`
    /// is `sh`, and tests give an explicit command such as `["sh", "-c", "..."]`, which runs with
    /// the host's `sh` and tools from the host's `PATH`.
    ///
    /// The ContextOS runner image the examples pin ([`RUNNER_IMAGE`]) runs the workspace's own
    /// `contextos` binary, when it has been built next to the test binary.
    pub fn with_defaults() -> Self {
        let mut map = Self::empty();
        if let Some(contextos) = workspace_binary("contextos") {
            map.insert(RUNNER_IMAGE, ImageEntry::program(contextos.display().to_string()));
        }
        for tag in ["1.36", "1.37", "latest"] {
            map.insert(
                &format!("busybox:{tag}"),
                ImageEntry {
                    entrypoint: Vec::new(),
                    cmd: vec!["sh".to_owned()],
                },
            );
        }
        map
    }

    /// Adds or replaces one image.
    pub fn insert(&mut self, image: &str, entry: ImageEntry) {
        self.entries.insert(normalize(image), entry);
    }

    /// Adds the entries of a [`IMAGE_MAP_ENV`]-style specification.
    pub fn extend_from_spec(&mut self, spec: &str) -> Result<(), ImageMapSyntaxError> {
        for entry in spec.split([';', '\n']).map(str::trim).filter(|e| !e.is_empty()) {
            let syntax = || ImageMapSyntaxError {
                entry: entry.to_owned(),
            };
            let (image, program) = entry.split_once('=').ok_or_else(syntax)?;
            let mut words = program.split_whitespace().map(str::to_owned);
            let first = words.next().ok_or_else(syntax)?;
            if image.trim().is_empty() {
                return Err(syntax());
            }
            let mut entrypoint = vec![first];
            entrypoint.extend(words);
            self.insert(
                image.trim(),
                ImageEntry {
                    entrypoint,
                    cmd: Vec::new(),
                },
            );
        }
        Ok(())
    }

    /// [`ImageMap::with_defaults`] plus whatever [`IMAGE_MAP_ENV`] adds.
    pub fn with_env_overrides() -> Result<Self, ImageMapSyntaxError> {
        let mut map = Self::with_defaults();
        if let Ok(spec) = std::env::var(IMAGE_MAP_ENV) {
            map.extend_from_spec(&spec)?;
        }
        Ok(map)
    }

    /// The entry for an image, if mapped.
    pub fn get(&self, image: &str) -> Option<&ImageEntry> {
        self.entries.get(&normalize(image))
    }

    /// The argv a container runs, following the Kubernetes `command`/`args` rules.
    pub fn argv(
        &self,
        container: &str,
        image: &str,
        command: &[String],
        args: &[String],
    ) -> Result<Vec<String>, ImageError> {
        let entry = self.get(image).ok_or_else(|| ImageError::Unknown {
            image: image.to_owned(),
            known: self.entries.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let argv: Vec<String> = if !command.is_empty() {
            command.iter().chain(args).cloned().collect()
        } else if !args.is_empty() {
            entry.entrypoint.iter().chain(args).cloned().collect()
        } else {
            entry.entrypoint.iter().chain(&entry.cmd).cloned().collect()
        };
        if argv.is_empty() {
            return Err(ImageError::NoCommand {
                container: container.to_owned(),
                image: image.to_owned(),
            });
        }
        Ok(argv)
    }
}

/// `docker.io/library/busybox` → `busybox:latest`; digests and other registries are kept.
fn normalize(image: &str) -> String {
    let image = image.trim();
    let image = image.strip_prefix("docker.io/").unwrap_or(image);
    let image = image.strip_prefix("library/").unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || last.contains('@') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn busybox_names_are_one_image() {
        let map = ImageMap::with_defaults();
        for name in [
            "busybox:1.36",
            "docker.io/library/busybox:1.36",
            "library/busybox:1.36",
            "busybox",
        ] {
            assert!(map.get(name).is_some(), "{name} is mapped");
        }
        assert!(map.get("busybox:1.20").is_none());
    }

    #[test]
    fn command_replaces_entrypoint_and_cmd() {
        let mut map = ImageMap::empty();
        map.insert(
            "tool:1",
            ImageEntry {
                entrypoint: strings(&["/bin/tool"]),
                cmd: strings(&["--default"]),
            },
        );
        let argv =
            |command: &[&str], args: &[&str]| map.argv("c", "tool:1", &strings(command), &strings(args));
        assert_eq!(argv(&[], &[]), Ok(strings(&["/bin/tool", "--default"])));
        assert_eq!(argv(&[], &["x"]), Ok(strings(&["/bin/tool", "x"])));
        assert_eq!(argv(&["sh"], &[]), Ok(strings(&["sh"])));
        assert_eq!(argv(&["sh", "-c"], &["echo"]), Ok(strings(&["sh", "-c", "echo"])));
    }

    #[test]
    fn unknown_image_names_the_image_and_the_fix() {
        let map = ImageMap::with_defaults();
        let err = map
            .argv("main", "nginx:1.27", &[], &[])
            .expect_err("nginx is not mapped");
        let text = err.to_string();
        assert!(text.contains("\"nginx:1.27\""), "{text}");
        assert!(text.contains(IMAGE_MAP_ENV), "{text}");
        assert!(text.contains("busybox:1.36"), "{text}");
    }

    #[test]
    fn image_without_command_needs_one() {
        let mut map = ImageMap::empty();
        map.insert("empty:1", ImageEntry::default());
        assert!(matches!(
            map.argv("main", "empty:1", &[], &[]),
            Err(ImageError::NoCommand { .. })
        ));
    }

    #[test]
    fn spec_adds_programs_and_rejects_garbage() {
        let mut map = ImageMap::empty();
        map.extend_from_spec("ghcr.io/x/runner:dev=/opt/runner serve; other:2=/bin/true\n")
            .expect("valid spec");
        assert_eq!(
            map.get("ghcr.io/x/runner:dev"),
            Some(&ImageEntry {
                entrypoint: strings(&["/opt/runner", "serve"]),
                cmd: Vec::new()
            })
        );
        assert!(map.get("other:2").is_some());
        assert!(map.extend_from_spec("no-equals-sign").is_err());
        assert!(map.extend_from_spec("img:1=").is_err());
        assert!(map.extend_from_spec("=/bin/true").is_err());
    }
}
