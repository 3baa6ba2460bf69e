//! The `o200k_base` byte-pair tokenizer: the unit every ContextPack budget, tool schema and
//! cached result is counted in. It gives the same tokens as OpenAI's tiktoken (checked token for
//! token in this crate's tests) but starts in milliseconds: its 199,998 tokens are read from a
//! compact table compiled into the binary (`o200k_base.table`, see `TABLE.md`) as byte strings
//! borrowed from it (a list by rank and a map back), instead of decoding the published text file
//! into three owned copies (≈ 100–190 ms and ≈ 43 MiB kept, which every runner pod, replay Job
//! and CLI call paid when it started; `benches/load.rs` measures both).
//!
//! It is a crate of its own so that it is optimised in every build profile (see the workspace's
//! `[profile.dev.package.contextos-tokenizer]`): the debug binaries the tests run start runners
//! by the hundred.

#[cfg(test)]
mod against_tiktoken;
mod merge;
mod table;

use std::sync::OnceLock;

use fancy_regex::Regex;
use rustc_hash::FxHashMap;

/// A token: its rank in the vocabulary (lower ranks were merged first in training).
pub type Rank = u32;

/// How text is cut into pieces before byte-pair merging, as o200k_base was trained: words with
/// their leading punctuation and contractions, runs of up to three digits, punctuation runs,
/// line breaks, and whitespace (a run before a word leaves its last space to the word).
const O200K_PIECES: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// A byte-pair tokenizer: its vocabulary both ways and its pre-tokenizing pattern.
#[derive(Debug)]
pub struct Tokenizer {
    /// Token bytes → rank.
    ranks: FxHashMap<&'static [u8], Rank>,
    /// Rank → token bytes.
    tokens: Vec<&'static [u8]>,
    pieces: Regex,
}

impl Tokenizer {
    /// The `o200k_base` tokenizer (GPT-4o and its successors), loaded on first use.
    pub fn o200k() -> &'static Tokenizer {
        static O200K: OnceLock<Tokenizer> = OnceLock::new();
        O200K.get_or_init(Tokenizer::load_o200k)
    }

    /// A tokenizer of its own for `o200k_base` (what [`Tokenizer::o200k`] loads once per
    /// process; the benchmark measures it).
    pub fn load_o200k() -> Tokenizer {
        let tokens = table::o200k();
        let mut ranks = FxHashMap::with_capacity_and_hasher(tokens.len(), Default::default());
        for (rank, bytes) in (0..).zip(&tokens) {
            ranks.insert(*bytes, rank);
        }
        Tokenizer {
            ranks,
            tokens,
            pieces: Regex::new(O200K_PIECES).expect("the o200k pattern is a valid regular expression"),
        }
    }

    /// The tokens of `text`, special tokens read as plain text.
    pub fn encode(&self, text: &str) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.each_token(text, |rank| out.push(rank));
        out
    }

    /// How many tokens `text` is, without keeping them.
    pub fn count(&self, text: &str) -> usize {
        let mut n = 0;
        self.each_token(text, |_| n += 1);
        n
    }

    /// The bytes `tokens` stand for, or `None` if one of them is not in the vocabulary. A prefix
    /// of a text's tokens may end inside a character: check the bytes before reading them as text.
    pub fn decode(&self, tokens: &[Rank]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(tokens.len() * 4);
        for rank in tokens {
            out.extend_from_slice(self.tokens.get(usize::try_from(*rank).ok()?)?);
        }
        Some(out)
    }

    /// The vocabulary's size.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty (never, for a built tokenizer).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn each_token(&self, text: &str, mut emit: impl FnMut(Rank)) {
        let mut done = 0;
        for found in self.pieces.find_iter(text) {
            let Ok(piece) = found else {
                // The pattern's look-ahead ran out of its backtracking allowance (no input seen so
                // far does this). The rest is cut at every character instead: the count stays
                // deterministic, so a replay counts the same, and no input can make it fail.
                for (at, c) in text[done..].char_indices() {
                    let start = done + at;
                    self.piece_tokens(&text.as_bytes()[start..start + c.len_utf8()], &mut emit);
                }
                return;
            };
            self.piece_tokens(piece.as_str().as_bytes(), &mut emit);
            done = piece.end();
        }
    }

    fn piece_tokens(&self, piece: &[u8], emit: &mut impl FnMut(Rank)) {
        match self.ranks.get(piece) {
            Some(rank) => emit(*rank),
            None => merge::byte_pairs(piece, |bytes| self.ranks.get(bytes).copied(), emit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_in_every_script() {
        let bpe = Tokenizer::o200k();
        for text in [
            "",
            "hello world",
            "naïve café ✓ — 東京 👩‍💻",
            "  \n\n\t x",
            "1234567 don't",
        ] {
            let tokens = bpe.encode(text);
            assert_eq!(bpe.count(text), tokens.len());
            assert_eq!(bpe.decode(&tokens).as_deref(), Some(text.as_bytes()), "{text:?}");
        }
    }

    #[test]
    fn a_pattern_out_of_backtracking_counts_by_character_and_still_round_trips() {
        // The same tokenizer with a pattern allowed no backtracking at all: the look-ahead
        // branch fails on the first run of spaces, and the rest is cut at every character.
        let o200k = Tokenizer::o200k();
        let starved = Tokenizer {
            ranks: o200k.ranks.clone(),
            tokens: o200k.tokens.clone(),
            pieces: fancy_regex::RegexBuilder::new(O200K_PIECES)
                .backtrack_limit(1)
                .build()
                .expect("the pattern builds"),
        };
        let text = "plan:   scale the checkout-api   up, then   check";
        let tokens = starved.encode(text);
        assert_eq!(starved.decode(&tokens).as_deref(), Some(text.as_bytes()));
        assert!(
            tokens.len() > o200k.count(text),
            "cut at every character past the failure"
        );
        assert_eq!(
            starved.encode(text),
            tokens,
            "the same text is counted the same way again"
        );
    }

    #[test]
    fn an_unknown_rank_decodes_to_nothing() {
        let bpe = Tokenizer::o200k();
        assert_eq!(bpe.decode(&[0, Rank::MAX]), None);
        assert_eq!(bpe.decode(&[bpe.len() as Rank]), None);
    }
}
