//! Tool-name globs: `*` matches any run of characters, `?` exactly one.

/// A compiled glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<char>,
    literal: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.chars().collect(),
            literal: !pattern.contains(['*', '?']),
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.literal {
            return self.pattern.iter().copied().eq(name.chars());
        }
        let text: Vec<char> = name.chars().collect();
        matches_from(&self.pattern, &text)
    }
}

/// Iterative wildcard matching with backtracking to the last `*` (linear in practice).
fn matches_from(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(Glob::new("delete_*").matches("delete_namespace"));
        assert!(Glob::new("delete_*").matches("delete_"));
        assert!(!Glob::new("delete_*").matches("undelete_x"));
        assert!(Glob::new("*_status*").matches("post_status_update"));
        assert!(Glob::new("get_?").matches("get_a"));
        assert!(!Glob::new("get_?").matches("get_ab"));
        assert!(Glob::new("search").matches("search"));
        assert!(!Glob::new("search").matches("search2"));
        assert!(Glob::new("*").matches(""));
    }
}
