//! The built-in detectors: the shapes of personal data as regular expressions, compiled once per
//! process, and how a match becomes a piece of a category once its check passes.

use std::{net::Ipv4Addr, ops::Range, sync::LazyLock};

use regex::Regex;
use regex_automata::{Anchored, Input, meta};

use super::{
    Category,
    checks::{
        card_prefix, dotted_neighbour, grouped_neighbour, iban_prefix, is_nino, is_phone, is_public_v4,
        is_ssn,
    },
};

/// One family of shapes that start on the same kind of byte, searched in one pass: a
/// multi-pattern automaton finds the leftmost place where any of them matches (patterns listed
/// first win at the same place), and the others are tried anchored there only when the first
/// fails its check. A place where none passes is left one byte later, not after the match, so
/// a failed long match (16 digits with a wrong Luhn digit) cannot hide a phone number inside it.
///
/// Digits and capital letters are frequent in operational text, so these searches run without
/// a prefilter: the automaton reads the text once instead of restarting at every digit.
pub(super) struct Shapes<K> {
    any: meta::Regex,
    each: Vec<(K, meta::Regex)>,
}

impl<K: Copy> Shapes<K> {
    fn new(shapes: &[(K, &str)]) -> Self {
        let config = meta::Regex::config().auto_prefilter(false);
        let build = |patterns: &[&str]| {
            meta::Regex::builder()
                .configure(config.clone())
                .build_many(patterns)
                .expect("built-in personal-data pattern")
        };
        let patterns: Vec<&str> = shapes.iter().map(|(_, p)| *p).collect();
        Self {
            any: build(&patterns),
            each: shapes.iter().map(|(kind, p)| (*kind, build(&[p]))).collect(),
        }
    }

    /// Calls `check` with each place a shape matches until it accepts one there; `check` returns
    /// the piece it accepted (perhaps shorter than the match).
    pub(super) fn scan(&self, text: &str, mut check: impl FnMut(K, Range<usize>) -> Option<Range<usize>>) {
        let mut at = 0;
        while at < text.len() {
            let Some(found) = self.any.search(&Input::new(text).range(at..)) else {
                break;
            };
            let start = found.start();
            let first = found.pattern().as_usize();
            let accepted = check(self.each[first].0, found.range()).or_else(|| {
                self.each
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != first)
                    .find_map(|(_, (kind, regex))| {
                        let input = Input::new(text).range(start..).anchored(Anchored::Yes);
                        regex.search(&input).and_then(|m| check(*kind, m.range()))
                    })
            });
            // Every shape is ASCII, so the byte after a match's start is a character boundary.
            at = accepted.map_or(start + 1, |piece| piece.end.max(start + 1));
        }
    }
}

/// The shapes that start with a digit (or the parenthesis of an area code).
#[derive(Clone, Copy, Debug)]
pub(super) enum Numeric {
    Card,
    Ssn,
    Ipv4,
    NationalPhone,
}

/// The shapes that start with two capital letters.
#[derive(Clone, Copy, Debug)]
pub(super) enum Lettered {
    Iban,
    Nino,
}

/// The built-in detectors, compiled once per process. Word boundaries are ASCII (`(?-u:\b)`):
/// the detectors look for ASCII shapes, and Unicode boundaries would keep the regex engine off
/// its fast path on non-ASCII text.
pub(super) struct BuiltIn {
    pub(super) email: Regex,
    pub(super) international_phone: Regex,
    pub(super) ipv6: Regex,
    pub(super) numeric: Shapes<Numeric>,
    pub(super) lettered: Shapes<Lettered>,
}

pub(super) static BUILT_IN: LazyLock<BuiltIn> = LazyLock::new(|| {
    let re = |pattern: &str| Regex::new(pattern).expect("built-in personal-data pattern");
    BuiltIn {
        email: re(
            r"(?i)(?-u:\b)[a-z0-9._%+-]{1,64}@[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63}){0,8}\.[a-z]{2,24}(?-u:\b)",
        ),
        international_phone: re(r"\+[0-9][0-9 ().-]{6,22}[0-9](?-u:\b)"),
        ipv6: re(r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}"),
        numeric: Shapes::new(&[
            (Numeric::Card, r"(?-u:\b)[0-9](?:[ .-]?[0-9]){12,18}(?-u:\b)"),
            (Numeric::Ssn, r"(?-u:\b)[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}(?-u:\b)"),
            (Numeric::Ipv4, r"(?-u:\b)(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?-u:\b)"),
            (
                Numeric::NationalPhone,
                r"(?:\(|(?-u:\b))[0-9]{2,4}\)?[ .-][0-9]{3,4}[ .-][0-9]{3,4}(?-u:\b)",
            ),
        ]),
        lettered: Shapes::new(&[
            (
                Lettered::Iban,
                r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?-u:\b)",
            ),
            (
                Lettered::Nino,
                r"(?-u:\b)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D](?-u:\b)",
            ),
        ]),
    }
});

impl BuiltIn {
    /// The category and extent of the piece a numeric shape's match is, if its check passes.
    pub(super) fn numeric(
        text: &str,
        shape: Numeric,
        span: Range<usize>,
    ) -> Option<(u8, Category, Range<usize>)> {
        let bytes = text.as_bytes();
        let matched = &text[span.clone()];
        let accepted = match shape {
            Numeric::Card => {
                return card_prefix(matched)
                    .map(|len| (4, Category::PaymentCard, span.start..span.start + len));
            }
            Numeric::Ssn => is_ssn(matched).then_some((4, Category::GovernmentId)),
            Numeric::Ipv4 => (!dotted_neighbour(bytes, span.clone())
                && matched.parse::<Ipv4Addr>().is_ok_and(is_public_v4))
            .then_some((3, Category::IpAddress)),
            Numeric::NationalPhone => (is_phone(matched, 9..=12) && !grouped_neighbour(bytes, span.clone()))
                .then_some((1, Category::Phone)),
        };
        accepted.map(|(rank, category)| (rank, category, span))
    }

    /// The same for a shape that starts with letters.
    pub(super) fn lettered(
        text: &str,
        shape: Lettered,
        span: Range<usize>,
    ) -> Option<(u8, Category, Range<usize>)> {
        let matched = &text[span.clone()];
        match shape {
            Lettered::Iban => {
                iban_prefix(matched).map(|len| (4, Category::Iban, span.start..span.start + len))
            }
            Lettered::Nino => is_nino(matched).then_some((4, Category::GovernmentId, span)),
        }
    }
}
