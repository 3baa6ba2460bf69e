//! The words an item is found by: its text cut at anything that is not a letter or digit,
//! lowercased, each word kept once. A recall's query is cut the same way and matches items
//! holding every one of its words.
//!
//! The index keeps a keyed hash of each word, never the word: an index row says nothing about
//! the text that the item itself (under its own protection) would not.

use std::collections::BTreeSet;

use sha2::{Digest as _, Sha256};

/// Words shorter than this (in characters) are not indexed: "a", "of".
const MIN_CHARS: usize = 2;
/// Words longer than this (in bytes) are not indexed: hashes, base64 blobs.
const MAX_BYTES: usize = 64;
/// The most distinct words of one item that are indexed (the first ones in the text).
pub const MAX_ITEM_TERMS: usize = 256;
/// The most words a recall's query may have.
pub const MAX_QUERY_TERMS: usize = 8;

/// One indexed word, as the index keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TermKey(pub [u8; 32]);

impl TermKey {
    fn of(word: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"contextos-memory-term/v1\n");
        hasher.update(word.as_bytes());
        Self(hasher.finalize().into())
    }
}

/// The index key of "refers to an entity of type `name`" (never a word: words are hashed
/// under another domain).
pub fn entity_type_term(name: &crate::ontology::EntityTypeName) -> TermKey {
    let mut hasher = Sha256::new();
    hasher.update(b"contextos-memory-entity-type/v1\n");
    hasher.update(name.as_str().as_bytes());
    TermKey(hasher.finalize().into())
}

/// The distinct words of `text`, in the order they first appear, at most `max`.
pub fn words(text: &str, max: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if out.len() >= max {
            break;
        }
        if word.chars().nth(MIN_CHARS - 1).is_none() || word.len() > MAX_BYTES {
            continue;
        }
        let word = word.to_lowercase();
        if seen.insert(word.clone()) {
            out.push(word);
        }
    }
    out
}

/// Whether `text` holds every one of `wanted` (words as [`words`] cuts them) among the words the
/// index keeps of it.
pub fn holds_all(text: &str, wanted: &[String]) -> bool {
    let held: BTreeSet<String> = words(text, MAX_ITEM_TERMS).into_iter().collect();
    wanted.iter().all(|w| held.contains(w))
}

/// The index keys of an item's text.
pub fn item_terms(text: &str) -> BTreeSet<TermKey> {
    words(text, MAX_ITEM_TERMS)
        .iter()
        .map(|w| TermKey::of(w))
        .collect()
}

/// The index keys a query's text asks for, or why it cannot be asked.
pub fn query_terms(text: &str) -> Result<BTreeSet<TermKey>, String> {
    let found = words(text, MAX_QUERY_TERMS + 1);
    if found.len() > MAX_QUERY_TERMS {
        return Err(format!(
            "the query has more than {MAX_QUERY_TERMS} words; name the few that matter"
        ));
    }
    Ok(found.iter().map(|w| TermKey::of(w)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_cut_at_non_alphanumerics_lowercased_and_kept_once() {
        assert_eq!(
            words(
                "Checkout-API: 503s after deploy; checkout api rolled back (a)",
                100
            ),
            ["checkout", "api", "503s", "after", "deploy", "rolled", "back"]
        );
        assert_eq!(words("Größe ÄNDERN", 100), ["größe", "ändern"]);
        assert!(
            words(&"x".repeat(65), 100).is_empty(),
            "over-long words are not indexed"
        );
        assert_eq!(words("one two three", 2), ["one", "two"]);
    }

    #[test]
    fn a_query_matches_the_keys_of_the_same_words_in_any_case() {
        let item = item_terms("The checkout API failed");
        let query = query_terms("CHECKOUT failed").expect("query");
        assert!(query.is_subset(&item));
        assert!(holds_all("The checkout API failed", &words("CHECKOUT failed", 8)));
        assert!(!holds_all(
            "The checkout API failed",
            &words("checkout refunds", 8)
        ));
        assert!(!query_terms("checkout refunds").expect("query").is_subset(&item));
        assert!(
            query_terms("a b c d e f g h i j k")
                .expect("one-letter words are not terms")
                .is_empty()
        );
        assert!(query_terms("w1 w2 w3 w4 w5 w6 w7 w8 w9").is_err());
    }
}
