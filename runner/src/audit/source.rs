//! Manifests as the audit reads them: every YAML (or JSON) document of the files and directories
//! given — directories walked recursively, as a GitOps repository or `kustomize build` output is
//! laid out — each with the line of every field, so a finding says where to look.
//!
//! Values come from serde_yaml (as everywhere else in ContextOS); lines come from a second pass
//! over the same text with an event parser that keeps positions. Every input is bounded while it
//! is read: a file above [`MAX_FILE_BYTES`] or a walk above [`MAX_FILES`] is refused, not read.

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
    for file in files {
        documents.extend(read(&file)?);
    }
    Ok(documents)
}

fn collect(path: &Path, named: bool, files: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
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
    let io = |source| SourceError::Io {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse(path, &text)
}

/// The documents of `text`, read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Document>, SourceError> {
    let yaml_error = |problem: String| SourceError::Yaml {
        path: path.to_owned(),
        problem,
    };
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|e| yaml_error(e.to_string()))?;
        values.push(value);
    }
    let placed = line_index(text).map_err(yaml_error)?;
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
