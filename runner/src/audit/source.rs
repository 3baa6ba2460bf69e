//! Manifests as the audit reads them: every YAML (or JSON) document of the files and directories
//! given — directories walked recursively, as a GitOps repository or `kustomize build` output is
//! laid out — each with the line of every field, so a finding says where to look.
//!
//! Values come from serde_yaml (as everywhere else in ContextOS, with YAML merge keys resolved as
//! kubectl resolves them); lines come from a second pass over the same text with an event parser
//! that keeps positions. Every input is bounded while it is read: a file above
//! [`MAX_FILE_BYTES`], a walk above [`MAX_FILES`] files or [`MAX_TOTAL_BYTES`], or nesting deeper
//! than [`MAX_DEPTH`] is refused. A walk reads regular files only and does not follow links to
//! directories (a link loop or a link to `/` cannot run it away); paths named explicitly are
//! followed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use granit_parser::{Event, Parser};
use serde_json::Value;
use thiserror::Error;

use super::field::FieldPath;

/// Largest manifest file read (a `kustomize build` of a big repository stays far below it).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most files one walk reads.
pub const MAX_FILES: usize = 10_000;
/// Most bytes one audit reads, all files together.
pub const MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
/// Deepest nesting of collections in a document (manifests stay far below; parsing time grows
/// with depth squared).
pub const MAX_DEPTH: usize = 256;

/// A manifest file could not be read.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {size} bytes is more than the {MAX_FILE_BYTES} an audit reads from one file", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("more than {MAX_FILES} manifest files under the paths given; audit a narrower directory")]
    TooManyFiles,
    #[error(
        "the manifests under the paths given hold more than {MAX_TOTAL_BYTES} bytes; audit a narrower directory"
    )]
    TooManyBytes,
    #[error("{}: collections nested more than {MAX_DEPTH} deep; this is not a manifest", path.display())]
    TooDeep { path: PathBuf },
    #[error("{}: not valid YAML: {problem}", path.display())]
    Yaml { path: PathBuf, problem: String },
}

/// One document of a manifest file.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: PathBuf,
    /// Line (1-based) where the document starts.
    pub line: usize,
    pub value: Value,
    /// Line of each field, by path.
    lines: BTreeMap<FieldPath, usize>,
}

impl Document {
    /// A document that came from somewhere other than a file (a live cluster): no lines.
    pub fn unplaced(value: Value) -> Self {
        Self {
            file: PathBuf::new(),
            line: 0,
            value,
            lines: BTreeMap::new(),
        }
    }

    /// The line of `field`, or of the nearest enclosing field the file has (a finding about a
    /// missing field points at its parent); `None` for documents without a file.
    pub fn line_of(&self, field: &FieldPath) -> Option<usize> {
        if self.file.as_os_str().is_empty() {
            return None;
        }
        std::iter::successors(Some(field.clone()), FieldPath::parent)
            .find_map(|path| self.lines.get(&path).copied())
            .or(Some(self.line))
            .filter(|line| *line > 0)
    }
}

/// Every manifest document under `paths` (files as given; directories recursively, `.yaml`,
/// `.yml` and `.json` files in name order, `kustomization.*` skipped). Empty documents are left
/// out.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Document>, SourceError> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, true, &mut files)?;
    }
    let mut documents = Vec::new();
    let mut total = 0u64;
    let mut expansion = crate::yaml_bounds::Expansion::default();
    for file in files {
        let (read, bytes) = read_counted(&file, &mut expansion)?;
        total += bytes;
        if total > MAX_TOTAL_BYTES {
            return Err(SourceError::TooManyBytes);
        }
        documents.extend(read);
    }
    Ok(documents)
}

fn collect(path: &Path, named: bool, files: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    // Named paths are followed; inside a walk, links are not (loops, `/`), and only regular
    // files are read (a FIFO or a device would block or never end).
    let metadata = if named {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .map_err(io)?;
    if !named && !metadata.is_dir() && !metadata.is_file() {
        return Ok(());
    }
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        entries.sort();
        for entry in entries {
            // Hidden directories (`.git`) hold no manifests.
            let hidden = entry
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !hidden {
                collect(&entry, false, files)?;
            }
        }
        return Ok(());
    }
    if !metadata.is_file() {
        return Err(SourceError::Io {
            path: path.to_owned(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    if named || is_manifest(path) {
        if files.len() >= MAX_FILES {
            return Err(SourceError::TooManyFiles);
        }
        files.push(path.to_owned());
    }
    Ok(())
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    matches!(extension, "yaml" | "yml" | "json") && !name.starts_with("kustomization.")
}

/// The documents of one file.
pub fn read(path: &Path) -> Result<Vec<Document>, SourceError> {
    read_counted(path, &mut crate::yaml_bounds::Expansion::default()).map(|(documents, _)| documents)
}

/// The documents of one file and its size, read through a bound (the size a file claims is not
/// trusted: `/dev/zero` claims none).
fn read_counted(
    path: &Path,
    expansion: &mut crate::yaml_bounds::Expansion,
) -> Result<(Vec<Document>, u64), SourceError> {
    use std::io::Read as _;
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let size = bytes.len() as u64;
    if size > MAX_FILE_BYTES {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| SourceError::Yaml {
        path: path.to_owned(),
        problem: "not UTF-8 text".to_owned(),
    })?;
    Ok((parse_within(path, &text, expansion)?, size))
}

/// The deepest nesting of flow and block collections, roughly (brackets and indentation), to
/// refuse pathological input before parsing it.
fn too_deep(text: &str) -> bool {
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '[' | '{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    text.lines()
        .any(|line| line.len() - line.trim_start_matches([' ', '-']).len() > MAX_DEPTH * 2)
}

/// The documents of `text`, read from `path` on its own.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Document>, SourceError> {
    parse_within(path, text, &mut crate::yaml_bounds::Expansion::default())
}

/// The documents of `text`, read from `path` as one file of a load that may still `expand` so
/// far (see [`crate::yaml_bounds`]).
fn parse_within(
    path: &Path,
    text: &str,
    expansion: &mut crate::yaml_bounds::Expansion,
) -> Result<Vec<Document>, SourceError> {
    let yaml_error = |problem: String| SourceError::Yaml {
        path: path.to_owned(),
        problem,
    };
    if too_deep(text) {
        return Err(SourceError::TooDeep {
            path: path.to_owned(),
        });
    }
    expansion.check(text).map_err(yaml_error)?;
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let mut value: serde_yaml::Value =
            serde::Deserialize::deserialize(document).map_err(|e| yaml_error(e.to_string()))?;
        // `<<: *base` merges as kubectl (go-yaml) merges it.
        value.apply_merge().map_err(|e| yaml_error(e.to_string()))?;
        values.push(to_json(value));
    }
    let mut placed = line_index(text).map_err(yaml_error)?;
    if placed.len() != values.len() {
        // The two readers disagree on where documents are: no lines rather than wrong ones.
        placed.clear();
    }
    Ok(values
        .into_iter()
        .enumerate()
        .filter(|(_, value)| !value.is_null())
        .map(|(i, value)| {
            let (line, lines) = placed.get(i).cloned().unwrap_or_default();
            Document {
                file: path.to_owned(),
                line,
                value,
                lines,
            }
        })
        .collect())
}

/// A YAML value as JSON; keys that are not strings (numbers, booleans) become their text.
fn to_json(value: serde_yaml::Value) -> Value {
    use serde_yaml::Value as Yaml;
    match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => serde_json::to_value(n).unwrap_or(Value::Null),
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        Yaml::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s,
                        other => serde_yaml::to_string(&other)
                            .unwrap_or_default()
                            .trim_end()
                            .to_owned(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Tagged(tagged) => to_json(tagged.value),
    }
}

/// A document's first line and the line of each of its fields.
type Placed = (usize, BTreeMap<FieldPath, usize>);

/// A node's place while walking the event stream.
enum Frame {
    Mapping { path: FieldPath, key: Option<String> },
    Sequence { path: FieldPath, next: usize },
}

/// For each document of `text`: its first line and the line of every field.
fn line_index(text: &str) -> Result<Vec<Placed>, String> {
    let mut documents = Vec::new();
    let mut current: Option<Placed> = None;
    let mut stack: Vec<Frame> = Vec::new();
    for next in Parser::new_from_str(text) {
        let (event, span) = next.map_err(|e| e.to_string())?;
        let line = span.start.line();
        match event {
            Event::DocumentStart(..) => {
                stack.clear();
                current = Some((line, BTreeMap::new()));
            }
            Event::DocumentEnd => documents.extend(current.take()),
            Event::Scalar(text, ..) => {
                // A scalar is either a mapping's key (remembered, its line recorded) or a value.
                if let Some(Frame::Mapping { path, key }) = stack.last_mut()
                    && key.is_none()
                {
                    let field = path.key(&text);
                    if let Some((_, lines)) = current.as_mut() {
                        lines.insert(field, line);
                    }
                    *key = Some(text.into_owned());
                    continue;
                }
                place_value(&mut stack, &mut current, line);
            }
            Event::Alias(..) => {
                place_value(&mut stack, &mut current, line);
            }
            Event::MappingStart(..) => {
                let path = place_value(&mut stack, &mut current, line);
                stack.push(Frame::Mapping { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = place_value(&mut stack, &mut current, line);
                stack.push(Frame::Sequence { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    Ok(documents)
}

/// Takes the next value's place in the enclosing collection: returns its path and records its
/// line (a mapping value's line is its key's, already recorded).
fn place_value(stack: &mut [Frame], current: &mut Option<Placed>, line: usize) -> FieldPath {
    match stack.last_mut() {
        None => FieldPath::root(),
        Some(Frame::Mapping { path, key }) => {
            // A complex (non-scalar) key has no name users could write; its value is placed
            // under the mapping itself.
            key.take().map_or_else(|| path.clone(), |k| path.key(&k))
        }
        Some(Frame::Sequence { path, next }) => {
            let field = path.index(*next);
            *next += 1;
            if let Some((_, lines)) = current.as_mut() {
                lines.entry(field.clone()).or_insert(line);
            }
            field
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_DOCUMENTS: &str = "\
# a comment
apiVersion: contextos.dev/v1alpha1
kind: Policy
metadata:
  name: guardrails
  labels:
    team.example.com/owner: sre
spec:
  rules:
    - name: first
      effect: allow
    - name: second
      condition: call.risk == 'destructive'
      effect: deny
---
---
kind: Agent
spec:
  tools: [{name: a}, {name: b}]
";

    fn field(path: &str) -> FieldPath {
        // Built the way rules build paths.
        let mut out = FieldPath::root();
        for part in path.split('.') {
            match part.split_once('[') {
                Some((key, index)) => {
                    out = out
                        .key(key)
                        .index(index.trim_end_matches(']').parse().expect("index"));
                }
                None => out = out.key(part),
            }
        }
        out
    }

    #[test]
    fn every_field_has_its_line_and_empty_documents_are_left_out() {
        let documents = parse(Path::new("p.yaml"), TWO_DOCUMENTS).expect("parsed");
        assert_eq!(documents.len(), 2);
        let policy = &documents[0];
        assert_eq!(policy.line_of(&field("kind")), Some(3));
        assert_eq!(policy.line_of(&field("spec.rules[1]")), Some(12));
        assert_eq!(policy.line_of(&field("spec.rules[1].condition")), Some(13));
        assert_eq!(policy.line_of(&field("spec.rules[0].effect")), Some(11));
        let label = FieldPath::of(&["metadata", "labels"]).key("team.example.com/owner");
        assert_eq!(policy.line_of(&label), Some(7));
        // A field the file does not have points at its nearest parent.
        assert_eq!(policy.line_of(&field("spec.rules[0].approvers")), Some(10));
        let agent = &documents[1];
        assert_eq!(agent.value["kind"], "Agent");
        assert_eq!(agent.line_of(&field("spec.tools[1].name")), Some(19));
    }

    #[test]
    fn bad_yaml_names_the_file() {
        let error = parse(Path::new("broken.yaml"), "a: [1, 2\n").expect_err("refused");
        assert!(
            error.to_string().starts_with("broken.yaml: not valid YAML"),
            "{error}"
        );
    }

    #[test]
    fn merge_keys_are_resolved_as_kubectl_resolves_them() {
        let text = "base: &base {defaultEffect: allow}\nspec:\n  <<: *base\n  mode: enforce\n";
        let documents = parse(Path::new("m.yaml"), text).expect("parsed");
        assert_eq!(documents[0].value["spec"]["defaultEffect"], "allow");
        assert!(documents[0].value["spec"].get("<<").is_none());
    }

    #[test]
    fn pathological_input_is_refused_before_parsing() {
        let deep = format!("a: {}{}\n", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(matches!(
            parse(Path::new("deep.yaml"), &deep),
            Err(SourceError::TooDeep { .. })
        ));
        let dir = tempfile::tempdir().expect("dir");
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).expect("write");
        assert!(matches!(read(&big), Err(SourceError::TooLarge { .. })));
        // A device that never ends is cut at the bound, not read to the end.
        assert!(matches!(
            read(Path::new("/dev/zero")),
            Err(SourceError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_walk_reads_regular_files_only_and_does_not_follow_directory_links() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a.yaml"), "{\"kind\": \"A\"}\n").expect("write");
        nix::unistd::mkfifo(&dir.path().join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).expect("link");
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("dangling.yaml")).expect("link");
        let kinds: Vec<String> = load(&[dir.path().to_owned()])
            .expect("loaded")
            .into_iter()
            .map(|d| d.value["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(kinds, ["A"]);
    }

    #[test]
    fn walks_directories_recursively_in_name_order_skipping_kustomizations() {
        let dir = tempfile::tempdir().expect("dir");
        let nested = dir.path().join("b/c");
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::create_dir_all(dir.path().join(".git")).expect("mkdir");
        for (path, kind) in [
            ("a.yaml", "A"),
            ("b/c/d.yml", "D"),
            ("b/z.json", "Z"),
            ("kustomization.yaml", "K"),
            (".git/x.yaml", "X"),
            ("notes.txt", "T"),
        ] {
            std::fs::write(dir.path().join(path), format!("{{\"kind\": \"{kind}\"}}\n")).expect("write");
        }
        let kinds: Vec<String> = load(&[dir.path().to_owned()])
            .expect("loaded")
            .into_iter()
            .map(|d| d.value["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(kinds, ["A", "D", "Z"]);
    }
}
