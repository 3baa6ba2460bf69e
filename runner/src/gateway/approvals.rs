//! Single-use approvals: each approved call hash may execute once.

use std::{collections::HashSet, sync::Mutex};

/// Call hashes whose approval has been used.
#[derive(Debug, Default)]
pub struct ApprovalBook {
    used: Mutex<HashSet<String>>,
}

impl ApprovalBook {
    /// Marks `call_hash` used; false if it was used before.
    pub fn consume(&self, call_hash: &str) -> bool {
        self.used
            .lock()
            .map(|mut used| used.insert(call_hash.to_owned()))
            .unwrap_or(false)
    }

    /// Forgets every used approval (before they are restored from a record again).
    pub fn clear(&self) {
        if let Ok(mut used) = self.used.lock() {
            used.clear();
        }
    }

    /// Restores used approvals (e.g. read back from a run's record after a restart).
    pub fn restore(&self, hashes: impl IntoIterator<Item = String>) {
        if let Ok(mut used) = self.used.lock() {
            used.extend(hashes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ApprovalBook;

    #[test]
    fn an_approval_is_used_once() {
        let book = ApprovalBook::default();
        assert!(book.consume("h"));
        assert!(!book.consume("h"));
        book.restore(["g".to_owned()]);
        assert!(!book.consume("g"));
    }
}
