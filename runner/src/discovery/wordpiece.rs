//! The BERT WordPiece tokenizer (uncased) that sentence-embedding models of the BERT family
//! were trained with: text to the token ids the model reads.
//!
//! It follows the reference tokenizer's steps — clean the text, lowercase and strip accents,
//! split on whitespace and punctuation, then cut each word into the longest pieces the
//! vocabulary holds — so the model sees what it saw in training. One difference, on purpose:
//! punctuation outside ASCII is recognised by a short list rather than by Unicode category
//! (std has no categories); text with exotic punctuation may then embed slightly differently.

use std::collections::HashMap;

use serde::Deserialize;
use unicode_normalization::{UnicodeNormalization as _, char::is_combining_mark};

/// Words longer than this (in characters) become `[UNK]`, as in the reference.
const MAX_WORD_CHARS: usize = 100;

/// A loaded vocabulary and the special tokens around a sequence.
#[derive(Debug)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    cls: u32,
    sep: u32,
    unk: u32,
}

/// Why a tokenizer file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the tokenizer file is not a Hugging Face tokenizer.json: {0}")]
    Format(#[from] serde_json::Error),
    #[error("the tokenizer's model is {found}, not WordPiece")]
    NotWordPiece { found: String },
    #[error("the tokenizer's vocabulary has no {token} token")]
    MissingToken { token: &'static str },
}

#[derive(Deserialize)]
struct TokenizerFile {
    model: ModelSection,
}

#[derive(Deserialize)]
struct ModelSection {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    vocab: HashMap<String, u32>,
}

impl WordPiece {
    /// Reads the `model.vocab` of a Hugging Face `tokenizer.json` (WordPiece models only).
    pub fn from_tokenizer_json(json: &[u8]) -> Result<Self, TokenizerError> {
        let file: TokenizerFile = serde_json::from_slice(json)?;
        if file.model.kind != "WordPiece" {
            return Err(TokenizerError::NotWordPiece {
                found: file.model.kind,
            });
        }
        Self::from_vocab(file.model.vocab)
    }

    /// A tokenizer over `vocab` (piece → id), which must hold `[CLS]`, `[SEP]` and `[UNK]`.
    pub fn from_vocab(vocab: HashMap<String, u32>) -> Result<Self, TokenizerError> {
        let id = |token: &'static str| {
            vocab
                .get(token)
                .copied()
                .ok_or(TokenizerError::MissingToken { token })
        };
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            unk: id("[UNK]")?,
            vocab,
        })
    }

    /// The largest id this tokenizer gives: the model must have an embedding for it.
    pub fn largest_id(&self) -> usize {
        let largest = self.vocab.values().copied().max().unwrap_or(0);
        largest.max(self.cls).max(self.sep).max(self.unk) as usize
    }

    /// The ids of `text` as the model reads it: `[CLS]`, at most `max_len - 2` pieces, `[SEP]`.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let room = max_len.saturating_sub(2);
        let mut ids = Vec::with_capacity(room.min(64) + 2);
        ids.push(self.cls);
        'words: for word in words(&normalize(text)) {
            for piece in self.pieces(&word) {
                if ids.len() > room {
                    break 'words;
                }
                ids.push(piece);
            }
        }
        ids.push(self.sep);
        ids
    }

    /// The longest-match-first pieces of one word, or `[UNK]` if it cannot be cut.
    fn pieces(&self, word: &str) -> Vec<u32> {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            return vec![self.unk];
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut candidate = String::with_capacity(word.len() + 2);
        while start < chars.len() {
            let mut end = chars.len();
            let found = loop {
                if end == start {
                    break None;
                }
                candidate.clear();
                if start > 0 {
                    candidate.push_str("##");
                }
                candidate.extend(&chars[start..end]);
                if let Some(id) = self.vocab.get(&candidate) {
                    break Some(*id);
                }
                end -= 1;
            };
            match found {
                Some(id) => pieces.push(id),
                None => return vec![self.unk],
            }
            start = end;
        }
        pieces
    }
}

/// Cleans, lowercases and strips accents; spaces around CJK ideographs, so each is a word.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.nfd() {
        if c == '\0' || c == '\u{fffd}' || is_combining_mark(c) {
            continue;
        }
        if c.is_whitespace() {
            out.push(' ');
        } else if c.is_control() {
            continue;
        } else if is_cjk(c) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Whitespace-separated words, each punctuation character a word of its own.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in text.split_whitespace() {
        let mut word = String::new();
        for c in chunk.chars() {
            if is_punctuation(c) {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                words.push(c.to_string());
            } else {
                word.push(c);
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

fn is_punctuation(c: char) -> bool {
    // All ASCII non-alphanumerics count, as in the reference; beyond ASCII, the common marks.
    c.is_ascii_punctuation()
        || matches!(
            c,
            '\u{00a1}' | '\u{00a7}' | '\u{00ab}' | '\u{00b6}' | '\u{00b7}' | '\u{00bb}' | '\u{00bf}'
                | '\u{2010}'..='\u{2027}'
                | '\u{2030}'..='\u{205e}'
                | '\u{3001}'..='\u{3003}'
                | '\u{3008}'..='\u{3011}'
        )
}

fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{4e00}'..='\u{9fff}'
        | '\u{3400}'..='\u{4dbf}'
        | '\u{20000}'..='\u{2a6df}'
        | '\u{2a700}'..='\u{2b73f}'
        | '\u{2b740}'..='\u{2b81f}'
        | '\u{2b820}'..='\u{2ceaf}'
        | '\u{f900}'..='\u{faff}'
        | '\u{2f800}'..='\u{2fa1f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> WordPiece {
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "restart", "the", "check", "##out", "-", "api", "un",
            "##aff", "##able", "!", "cafe", "服",
        ];
        WordPiece::from_vocab(
            vocab
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32))
                .collect(),
        )
        .expect("the vocabulary has the special tokens")
    }

    #[test]
    fn words_are_cut_into_the_longest_pieces_the_vocabulary_holds() {
        let wp = tokenizer();
        // [CLS] restart the check ##out - api [SEP]
        assert_eq!(
            wp.encode("Restart the checkout-API", 128),
            vec![2, 4, 5, 6, 7, 8, 9, 3]
        );
        assert_eq!(wp.encode("unaffable!", 128), vec![2, 10, 11, 12, 13, 3]);
    }

    #[test]
    fn accents_case_and_control_characters_do_not_change_the_ids() {
        let wp = tokenizer();
        assert_eq!(wp.encode("CAFÉ\u{0007}", 128), wp.encode("cafe", 128));
        assert_eq!(wp.encode("服", 128), vec![2, 15, 3]);
    }

    #[test]
    fn a_word_that_cannot_be_cut_is_unknown_and_long_text_is_truncated() {
        let wp = tokenizer();
        assert_eq!(wp.encode("restartz", 128), vec![2, 1, 3]);
        let long = "the ".repeat(500);
        let ids = wp.encode(&long, 16);
        assert_eq!(ids.len(), 16);
        assert_eq!((ids[0], ids[15]), (2, 3));
        assert_eq!(wp.encode(&"x".repeat(101), 128), vec![2, 1, 3]);
    }

    #[test]
    fn a_tokenizer_file_of_another_model_is_refused() {
        let bpe = br#"{"model": {"type": "BPE", "vocab": {}}}"#;
        assert!(matches!(
            WordPiece::from_tokenizer_json(bpe),
            Err(TokenizerError::NotWordPiece { .. })
        ));
        let no_unk = br#"{"model": {"type": "WordPiece", "vocab": {"[CLS]": 0, "[SEP]": 1}}}"#;
        assert!(matches!(
            WordPiece::from_tokenizer_json(no_unk),
            Err(TokenizerError::MissingToken { token: "[UNK]" })
        ));
    }
}
