//! Where in an object a field is: a path as users write it (`spec.rules[2].condition`,
//! `metadata.labels["pod-security.kubernetes.io/enforce"]`), built step by step so the audit's
//! rules, the YAML line index and a local run's refusals spell every path the same way.

use std::fmt;

/// A path from an object's root to one of its fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(String);

impl FieldPath {
    /// The object itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// A path of plain keys: `FieldPath::of(&["spec", "policyRefs"])`.
    pub fn of(keys: &[&str]) -> Self {
        keys.iter().fold(Self::root(), |path, key| path.key(key))
    }

    /// The field `key` of this object. Keys that are not plain identifiers (label keys with
    /// dots or slashes) are quoted in brackets so the path reads back unambiguously.
    pub fn key(&self, key: &str) -> Self {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let mut path = self.0.clone();
        if plain {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(key);
        } else {
            path.push_str(&format!("[{key:?}]"));
        }
        Self(path)
    }

    /// Item `index` of this list.
    pub fn index(&self, index: usize) -> Self {
        Self(format!("{}[{index}]", self.0))
    }

    /// Under item `i` of list `list` (`spec.tools`): `i` and the rest of the path after it.
    pub fn under_item(&self, list: &FieldPath) -> Option<(usize, &str)> {
        let rest = self.0.strip_prefix(list.as_str())?.strip_prefix('[')?;
        let (index, rest) = rest.split_once(']')?;
        Some((index.parse().ok()?, rest))
    }

    /// This path with item `i` of `list` (see [`FieldPath::under_item`]) moved to `to`.
    pub fn with_item(list: &FieldPath, to: usize, rest: &str) -> Self {
        Self(format!("{}[{to}]{rest}", list.0))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The enclosing field (`spec.rules[2]` of `spec.rules[2].condition`); the root has none.
    pub fn parent(&self) -> Option<Self> {
        if self.0.is_empty() {
            return None;
        }
        // A trailing `[…]` (an index or a quoted key, which may hold dots) is one step; otherwise
        // the last `.key` is.
        let cut = if self.0.ends_with(']') {
            self.0.rfind('[').unwrap_or(0)
        } else {
            self.0.rfind('.').unwrap_or(0)
        };
        Some(Self(self.0[..cut].to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(the object)")
        } else {
            f.write_str(&self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_as_users_write_them() {
        let rule = FieldPath::of(&["spec", "rules"]).index(2).key("condition");
        assert_eq!(rule.as_str(), "spec.rules[2].condition");
        let label = FieldPath::of(&["metadata", "labels"]).key("pod-security.kubernetes.io/enforce");
        assert_eq!(
            label.as_str(),
            r#"metadata.labels["pod-security.kubernetes.io/enforce"]"#
        );
        assert_eq!(FieldPath::root().to_string(), "(the object)");
    }

    #[test]
    fn parents_walk_back_to_the_root() {
        let path = FieldPath::of(&["spec", "rules"]).index(2).key("condition");
        let parents: Vec<String> = std::iter::successors(path.parent(), FieldPath::parent)
            .map(|p| p.as_str().to_owned())
            .collect();
        assert_eq!(parents, ["spec.rules[2]", "spec.rules", "spec", ""]);
        let label = FieldPath::of(&["metadata", "labels"]).key("a.b/c");
        assert_eq!(
            label.parent().map(|p| p.as_str().to_owned()),
            Some("metadata.labels".into())
        );
    }
}
