//! Personal data in text: which categories a memory candidate holds, and where.
//!
//! The candidate stage of memory promotes an item only if every category of personal data in it
//! is covered by a consent in force for its subject and purpose. This module finds those
//! categories; it decides nothing. Built-in detectors cover e-mail addresses, phone numbers,
//! payment cards, IBANs, public IP addresses and two government-ID shapes (US SSN, UK NINO). A
//! shape with a check is confirmed by it — a card's Luhn digit and issuer prefix, an IBAN's
//! mod-97, an SSN's reserved ranges — so order numbers and timestamps are not reported. A
//! tenant adds its own categories as patterns ([`TenantPattern`]).
//!
//! Everything here runs in time linear in the text (the `regex` crate's guarantee, tenant
//! patterns included), on at most [`MAX_TEXT_BYTES`] of it.

mod checks;
mod shapes;

use std::{collections::BTreeSet, fmt, net::Ipv6Addr, ops::Range, str::FromStr, sync::LazyLock};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use self::{
    checks::{is_phone, is_public_v6},
    shapes::{BUILT_IN, BuiltIn},
};

/// The most bytes one text may have (a candidate above it is split by its caller or refused).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// The most patterns a tenant may define.
pub const MAX_PATTERNS: usize = 32;
/// The longest pattern a tenant may write.
pub const MAX_PATTERN_BYTES: usize = 512;
/// The most memory one tenant pattern may compile to.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A category of personal data, as consents name it (`email`, `payment-card`, `tenant:badge-id`…).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Category {
    Email,
    Phone,
    PaymentCard,
    Iban,
    /// A publicly routable IPv4 or IPv6 address (private, loopback, link-local, documentation and
    /// other special-purpose ranges are infrastructure, not a person's).
    IpAddress,
    /// A US Social Security number or a UK National Insurance number.
    GovernmentId,
    /// A category a tenant defined with a pattern.
    Tenant(PatternName),
}

impl Category {
    /// The built-in categories, in the order they are documented.
    pub const BUILT_IN: [Category; 6] = [
        Category::Email,
        Category::Phone,
        Category::PaymentCard,
        Category::Iban,
        Category::IpAddress,
        Category::GovernmentId,
    ];
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Category::Email => f.write_str("email"),
            Category::Phone => f.write_str("phone"),
            Category::PaymentCard => f.write_str("payment-card"),
            Category::Iban => f.write_str("iban"),
            Category::IpAddress => f.write_str("ip-address"),
            Category::GovernmentId => f.write_str("government-id"),
            Category::Tenant(name) => write!(f, "tenant:{name}"),
        }
    }
}

/// A category name that is neither built in nor `tenant:<name>`.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown personal-data category {0:?}: use email, phone, payment-card, iban, ip-address, government-id or tenant:<pattern name>"
)]
pub struct UnknownCategory(String);

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "email" => Category::Email,
            "phone" => Category::Phone,
            "payment-card" => Category::PaymentCard,
            "iban" => Category::Iban,
            "ip-address" => Category::IpAddress,
            "government-id" => Category::GovernmentId,
            other => match other.strip_prefix("tenant:").map(PatternName::new) {
                Some(Ok(name)) => Category::Tenant(name),
                _ => return Err(UnknownCategory(other.to_owned())),
            },
        })
    }
}

impl From<Category> for String {
    fn from(category: Category) -> Self {
        category.to_string()
    }
}

impl TryFrom<String> for Category {
    type Error = UnknownCategory;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// The name of a tenant's pattern: a DNS label (lowercase letters, digits, `-`; at most 63).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PatternName(std::sync::Arc<str>);

impl PatternName {
    pub fn new(name: &str) -> Result<Self, String> {
        if crate::records::store::is_dns_label(name) {
            Ok(Self(name.into()))
        } else {
            Err(format!(
                "{name:?} is not a pattern name: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PatternName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A category a tenant defines: text matching `regex` is personal data of category
/// `tenant:<name>` (e.g. an employee badge number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantPattern {
    pub name: String,
    pub regex: String,
}

/// Why a tenant's patterns cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("{count} personal-data patterns; at most {MAX_PATTERNS}")]
    TooMany { count: usize },
    #[error("personal-data pattern {index}: {why}")]
    BadName { index: usize, why: String },
    #[error("personal-data pattern {name:?} is defined twice")]
    Duplicate { name: String },
    #[error("personal-data pattern {name:?} has {bytes} bytes; at most {MAX_PATTERN_BYTES}")]
    TooLong { name: String, bytes: usize },
    #[error("personal-data pattern {name:?} is not a regular expression the gateway accepts: {error}")]
    Invalid { name: String, error: String },
}

/// Why a text was not classified.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    #[error("the text has {0} bytes; at most {MAX_TEXT_BYTES} are classified at once (split it)")]
    TooLarge(usize),
}

/// One piece of personal data found: its category and where it is (byte offsets, on character
/// boundaries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub category: Category,
    pub span: Range<usize>,
}

/// What a text holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classification {
    /// In order of position; pieces never overlap (where two detectors claim the same text, the
    /// piece is reported once, as the stronger one), and at most [`MAX_FINDINGS`] are kept.
    pub findings: Vec<Finding>,
    /// Every category any detector found, including those whose pieces overlap a stronger one
    /// (`tenant:customer-email` on an address the e-mail detector also found): consent must
    /// cover all of them.
    categories: BTreeSet<Category>,
}

/// The most pieces one classification reports (their categories are all counted, whatever
/// their number).
pub const MAX_FINDINGS: usize = 4096;

impl Classification {
    /// The categories found, each once.
    pub fn categories(&self) -> BTreeSet<Category> {
        self.categories.clone()
    }

    pub fn is_personal(&self) -> bool {
        !self.categories.is_empty()
    }
}

/// Finds personal data: the built-in detectors and a tenant's own patterns.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    tenant: Vec<(Category, Regex)>,
}

impl Classifier {
    /// The built-in detectors only.
    pub fn built_in() -> Self {
        Self::default()
    }

    /// The built-in detectors and `patterns` (bounded in number, length and compiled size).
    pub fn with_patterns(patterns: &[TenantPattern]) -> Result<Self, PatternError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(PatternError::TooMany {
                count: patterns.len(),
            });
        }
        let mut tenant: Vec<(Category, Regex)> = Vec::with_capacity(patterns.len());
        for (index, pattern) in patterns.iter().enumerate() {
            let name = PatternName::new(&pattern.name).map_err(|why| PatternError::BadName { index, why })?;
            let category = Category::Tenant(name);
            if tenant.iter().any(|(known, _)| *known == category) {
                return Err(PatternError::Duplicate {
                    name: pattern.name.clone(),
                });
            }
            if pattern.regex.len() > MAX_PATTERN_BYTES {
                return Err(PatternError::TooLong {
                    name: pattern.name.clone(),
                    bytes: pattern.regex.len(),
                });
            }
            let regex = RegexBuilder::new(&pattern.regex)
                .size_limit(PATTERN_SIZE_LIMIT)
                .dfa_size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| PatternError::Invalid {
                    name: pattern.name.clone(),
                    error: e.to_string(),
                })?;
            if regex.is_match("") {
                return Err(PatternError::Invalid {
                    name: pattern.name.clone(),
                    error: "it matches the empty text, so it would find personal data everywhere".into(),
                });
            }
            tenant.push((category, regex));
        }
        // Built once here: the first classification should not pay for it.
        LazyLock::force(&BUILT_IN);
        Ok(Self { tenant })
    }

    /// The personal data in `text`. Where two detectors claim overlapping text, the one with a
    /// check (card, IBAN, government ID) or the longer match wins, and each piece is reported
    /// once. The text is also read in its plain form (see [`plain_form`]): a card number written
    /// with tabs, full-width digits or zero-width spaces between its groups is still a card —
    /// its categories count, its pieces are reported where they are in `text` only.
    pub fn classify(&self, text: &str) -> Result<Classification, ClassifyError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(ClassifyError::TooLarge(text.len()));
        }
        let mut classification = self.classify_as_written(text);
        if let Some(plain) = plain_form(text) {
            let more = self.classify_as_written(&plain);
            classification.categories.extend(more.categories);
        }
        Ok(classification)
    }

    /// [`Self::classify`] of the text exactly as it is written.
    fn classify_as_written(&self, text: &str) -> Classification {
        let built = &*BUILT_IN;
        let mut found: Vec<(u8, Finding)> = Vec::new();
        let mut categories = BTreeSet::new();
        let mut add = |rank: u8, category: Category, span: Range<usize>| {
            if !categories.contains(&category) {
                categories.insert(category.clone());
            }
            // Past the bound, pieces still count for their category; only their spans are not
            // kept (a tenant pattern as broad as `[A-Z]` would otherwise keep one per letter).
            if found.len() < 4 * MAX_FINDINGS {
                found.push((rank, Finding { category, span }));
            }
        };
        // Cheap gates: most detectors need a byte the text may not have at all.
        let bytes = text.as_bytes();
        let has_digit = bytes.iter().any(u8::is_ascii_digit);
        if bytes.contains(&b'@') {
            for m in built.email.find_iter(text) {
                add(3, Category::Email, m.range());
            }
        }
        if has_digit {
            built.numeric.scan(text, |shape, span| {
                let (rank, category, piece) = BuiltIn::numeric(text, shape, span)?;
                add(rank, category, piece.clone());
                Some(piece)
            });
            built.lettered.scan(text, |shape, span| {
                let (rank, category, piece) = BuiltIn::lettered(text, shape, span)?;
                add(rank, category, piece.clone());
                Some(piece)
            });
            // IBANs and NI numbers are written in either case; in capitals their pieces are
            // where they are in `text` (ASCII capitals take the same bytes).
            if lowercase_lettered_shape(bytes) {
                let upper = text.to_ascii_uppercase();
                built.lettered.scan(&upper, |shape, span| {
                    let (rank, category, piece) = BuiltIn::lettered(&upper, shape, span)?;
                    add(rank, category, piece.clone());
                    Some(piece)
                });
            }
            for m in built.international_phone.find_iter(text) {
                if is_phone(m.as_str(), 8..=15) {
                    add(1, Category::Phone, m.range());
                }
            }
        }
        if bytes.contains(&b':') {
            for m in built.ipv6.find_iter(text) {
                if bytes
                    .get(m.end())
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.')
                {
                    continue;
                }
                // The match may take a colon of the text around it (`ip:2606:4700::1111`,
                // `2606:4700::1111: refused`): then the address is the match without it.
                let (start, end) = (m.start(), m.end());
                let lead = usize::from(bytes[start] == b':');
                let trail = usize::from(bytes[end - 1] == b':');
                let address = [(0, 0), (lead, 0), (0, trail), (lead, trail)]
                    .into_iter()
                    .filter(|&(l, t)| start + l < end - t)
                    .map(|(l, t)| start + l..end - t)
                    .find_map(|span| text[span.clone()].parse::<Ipv6Addr>().ok().map(|ip| (ip, span)));
                if let Some((ip, span)) = address
                    && is_public_v6(ip)
                {
                    add(3, Category::IpAddress, span);
                }
            }
        }
        for (category, regex) in &self.tenant {
            for m in regex.find_iter(text) {
                if !m.is_empty() {
                    add(2, category.clone(), m.range());
                }
            }
        }
        let mut findings = without_overlaps(found);
        findings.truncate(MAX_FINDINGS);
        Classification { findings, categories }
    }
}

/// `text` as a reader (or a model) takes it in, when that differs from how it is written:
/// compatibility forms folded (NFKC: full-width digits and `＠` become ASCII, a no-break space a
/// space), digits of other scripts as ASCII digits, invisible characters (zero-width spaces and
/// joiners, soft hyphens, direction marks), combining marks and control characters other than
/// whitespace dropped, and every run of whitespace one space (as recalled memory is rendered).
/// At most [`MAX_TEXT_BYTES`] of it (folding can lengthen a text). Printable ASCII with single
/// spaces only is its own plain form: nothing is computed for it.
fn plain_form(text: &str) -> Option<String> {
    use unicode_normalization::UnicodeNormalization as _;
    let bytes = text.as_bytes();
    let as_read = bytes.iter().all(|b| (0x20..=0x7e).contains(b)) && !bytes.windows(2).any(|w| w == b"  ");
    if as_read {
        return None;
    }
    let mut plain = String::with_capacity(text.len());
    let mut space = false;
    for c in text.nfkc() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if c.is_control() || crate::text::is_invisible(c) || crate::text::is_combining_mark(c) {
            continue;
        }
        if space {
            plain.push(' ');
            space = false;
        }
        let c = crate::text::ascii_digit(c).unwrap_or(c);
        if plain.len() + c.len_utf8() > MAX_TEXT_BYTES {
            break;
        }
        plain.push(c);
    }
    (plain != text).then_some(plain)
}

/// Whether `text` has two letters, one of them lowercase, then (after a space perhaps) a digit:
/// how a lettered shape (IBAN, NI number) starts when it is not written in capitals.
fn lowercase_lettered_shape(text: &[u8]) -> bool {
    text.windows(4).any(|w| {
        w[0].is_ascii_alphabetic()
            && w[1].is_ascii_alphabetic()
            && (w[0].is_ascii_lowercase() || w[1].is_ascii_lowercase())
            && (w[2].is_ascii_digit() || (w[2] == b' ' && w[3].is_ascii_digit()))
    })
}

/// Keeps, of pieces that overlap, the one of higher rank (then the longer, then the first).
fn without_overlaps(mut found: Vec<(u8, Finding)>) -> Vec<Finding> {
    found.sort_by(|(ra, a), (rb, b)| {
        rb.cmp(ra)
            .then((b.span.end - b.span.start).cmp(&(a.span.end - a.span.start)))
            .then(a.span.start.cmp(&b.span.start))
    });
    // Kept pieces never overlap, so of those starting before a piece's end only the last
    // (the one ending last) can overlap it.
    let mut kept: std::collections::BTreeMap<usize, Finding> = std::collections::BTreeMap::new();
    for (_, finding) in found {
        let overlaps = kept
            .range(..finding.span.end)
            .next_back()
            .is_some_and(|(_, k)| k.span.end > finding.span.start);
        if !overlaps {
            kept.insert(finding.span.start, finding);
        }
    }
    kept.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(String, &str)> {
        Classifier::built_in()
            .classify(text)
            .expect("classified")
            .findings
            .into_iter()
            .map(|f| (f.category.to_string(), &text[f.span]))
            .collect()
    }

    /// What a model can write so that a reader (or the model itself, when it is recalled) sees
    /// personal data the detectors would miss as written: whitespace other than a space between
    /// groups, invisible characters inside them, full-width forms, lowercase, dots.
    #[test]
    fn personal_data_written_to_slip_past_the_detectors_is_found_in_its_plain_form() {
        let classifier = Classifier::built_in();
        let categories = |text: &str| {
            classifier
                .classify(text)
                .expect("classified")
                .categories()
                .into_iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
        };
        for (text, category) in [
            ("card 4111\t1111\t1111\t1111", "payment-card"),
            ("card 4111\n1111\n1111\n1111", "payment-card"),
            ("card 4111\u{a0}1111\u{a0}1111\u{a0}1111", "payment-card"),
            ("card 4111\u{200b}1111\u{200b}1111\u{200b}1111", "payment-card"),
            ("card 4\u{ad}111 1111 1111 1111", "payment-card"),
            (
                "card \u{ff14}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11}",
                "payment-card",
            ),
            ("card 4111.1111.1111.1111", "payment-card"),
            ("card 4111\u{b}1111\u{b}1111\u{b}1111", "payment-card"),
            ("card 4111\u{1b}1111\u{1b}1111\u{1b}1111", "payment-card"),
            (
                "card 4\u{332}1\u{332}1\u{332}1\u{332} 1111 1111 1111",
                "payment-card",
            ),
            (
                "card \u{664}\u{661}\u{661}\u{661} \u{661}\u{661}\u{661}\u{661} \u{661}\u{661}\u{661}\u{661} \u{661}\u{661}\u{661}\u{661}",
                "payment-card",
            ),
            ("card 4111\u{e0100}1111 1111 1111", "payment-card"),
            ("write to jane\u{ff20}example.com", "email"),
            ("iban gb82 west 1234 5698 7654 32", "iban"),
            ("ni ab 12 34 56 c", "government-id"),
        ] {
            let found = categories(text);
            assert!(found.iter().any(|c| c == category), "{text:?}: {found:?}");
        }
        // Operational text stays what it was.
        for text in [
            "deploy v1.2.3 to eu-west-1 at 10:30",
            "order 12345\t678 shipped",
            "build 2026.12.06.1",
        ] {
            assert!(categories(text).is_empty(), "{text:?}: {:?}", categories(text));
        }
    }

    #[test]
    fn each_built_in_category_is_found_where_it_is() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "write to jane.doe+ops@example.co.uk today",
                &[("email", "jane.doe+ops@example.co.uk")],
            ),
            ("call +44 20 7946 0958 now", &[("phone", "+44 20 7946 0958")]),
            ("call (555) 123-4567 now", &[("phone", "(555) 123-4567")]),
            ("call 030 1234 5678", &[("phone", "030 1234 5678")]),
            ("call 030 1234 5678 24/7", &[("phone", "030 1234 5678")]),
            (
                "card 4111 1111 1111 1111 exp",
                &[("payment-card", "4111 1111 1111 1111")],
            ),
            (
                "card 5500-0000-0000-0004",
                &[("payment-card", "5500-0000-0000-0004")],
            ),
            // A long number that fails its check does not hide the phone number after it.
            (
                "ref 4111 1111 1111 1113 555-123-4567",
                &[("phone", "555-123-4567")],
            ),
            // A card number followed by another number is still a card number.
            (
                "card 4111 1111 1111 1111 123 times",
                &[("payment-card", "4111 1111 1111 1111")],
            ),
            ("amex 378282246310005.", &[("payment-card", "378282246310005")]),
            (
                "iban DE89 3704 0044 0532 0130 00 for the refund",
                &[("iban", "DE89 3704 0044 0532 0130 00")],
            ),
            ("GB82WEST12345698765432", &[("iban", "GB82WEST12345698765432")]),
            ("from 8.8.4.4 at 10:00", &[("ip-address", "8.8.4.4")]),
            (
                "from 2606:4700:4700::1111 too",
                &[("ip-address", "2606:4700:4700::1111")],
            ),
            ("ssn 123-45-6789.", &[("government-id", "123-45-6789")]),
            (
                "ip:2606:4700::1111: refused",
                &[("ip-address", "2606:4700::1111")],
            ),
            ("ssn 123 45 6789", &[("government-id", "123 45 6789")]),
            (
                "unionpay 6200000000000005",
                &[("payment-card", "6200000000000005")],
            ),
            ("NINO AB 12 34 56 C", &[("government-id", "AB 12 34 56 C")]),
            ("NINO JG103759A.", &[("government-id", "JG103759A")]),
        ];
        for (text, expected) in cases {
            let expected: Vec<(String, &str)> = expected.iter().map(|(c, s)| (c.to_string(), *s)).collect();
            assert_eq!(found(text), expected, "in {text:?}");
        }
    }

    #[test]
    fn shapes_that_fail_their_check_or_are_infrastructure_are_not_personal_data() {
        for text in [
            "order 4111 1111 1111 1112 shipped", // Luhn fails
            "trace 1234567812345678",            // no issuer starts with 1
            "iban DE89 3704 0044 0532 0130 01",  // mod-97 fails
            "ssn 000-12-3456 and 666-12-3456",   // never issued
            "ssn 912-34-5678",                   // never issued
            "pod 10.244.0.17 and node 192.168.1.4 and 127.0.0.1",
            "docs 192.0.2.1, 198.51.100.7, 203.0.113.9",
            "link fe80::1 and fd00::5 and ::1 and 2001:db8::1",
            "version 1.13.2.4.7 of 10.0.0.1.5",
            "at 2026-12-03 12:30:45 for 1500 ms",
            "deadline 2026-12-03T06:30:33Z",
            "hash a3f9:c2",
            "prefix BG 12 34 56 A and QQ 12 34 56 C",
            "no @ here, just user@localhost",
        ] {
            assert_eq!(found(text), Vec::<(String, &str)>::new(), "in {text:?}");
        }
    }

    #[test]
    fn a_number_two_detectors_claim_is_reported_once_as_the_checked_kind() {
        // 16 digits in groups of four look like a phone number too.
        assert_eq!(
            found("card 4242 4242 4242 4242"),
            vec![("payment-card".to_owned(), "4242 4242 4242 4242")]
        );
        let text = "mail ops@example.com or +1 415 555 0100, card 4000056655665556";
        let categories: Vec<String> = found(text).into_iter().map(|(c, _)| c).collect();
        assert_eq!(categories, ["email", "phone", "payment-card"]);
    }

    #[test]
    fn tenant_patterns_add_categories_and_bad_ones_are_refused_with_the_reason() {
        let classifier = Classifier::with_patterns(&[TenantPattern {
            name: "badge-id".into(),
            regex: r"\bBADGE-[0-9]{6}\b".into(),
        }])
        .expect("pattern");
        let overlapping = Classifier::with_patterns(&[TenantPattern {
            name: "customer-email".into(),
            regex: r"[a-z]+@acme\.com".into(),
        }])
        .expect("pattern")
        .classify("customer jane@acme.com wrote")
        .expect("classified");
        // The e-mail detector's piece is the one reported; both categories need consent.
        assert_eq!(overlapping.findings.len(), 1);
        assert_eq!(
            overlapping
                .categories()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["email", "tenant:customer-email"]
        );
        let found = classifier
            .classify("visitor BADGE-004211 at the desk")
            .expect("classified");
        assert_eq!(
            found.categories().into_iter().collect::<Vec<_>>(),
            [Category::Tenant(PatternName::new("badge-id").expect("name"))]
        );
        let refused = |patterns: Vec<TenantPattern>| {
            Classifier::with_patterns(&patterns)
                .expect_err("refused")
                .to_string()
        };
        let p = |name: &str, regex: &str| TenantPattern {
            name: name.into(),
            regex: regex.into(),
        };
        assert!(refused(vec![p("Badge", "x")]).contains("not a pattern name"));
        assert!(refused(vec![p("a", "x"), p("a", "y")]).contains("defined twice"));
        assert!(refused(vec![p("a", "(")]).contains("not a regular expression"));
        assert!(refused(vec![p("a", "x*")]).contains("matches the empty text"));
        assert!(refused(vec![p("a", &"x".repeat(MAX_PATTERN_BYTES + 1))]).contains("at most 512"));
        assert!(refused(vec![p("a", r"\w{1000}{1000}")]).contains("not a regular expression"));
        assert!(
            refused((0..=MAX_PATTERNS).map(|i| p(&format!("p{i}"), "x")).collect()).contains("at most 32")
        );
    }

    #[test]
    fn categories_read_back_as_consents_name_them() {
        for category in Category::BUILT_IN
            .into_iter()
            .chain([Category::Tenant(PatternName::new("badge-id").expect("name"))])
        {
            assert_eq!(
                category.to_string().parse::<Category>().expect("parses"),
                category
            );
            let json = serde_json::to_string(&category).expect("json");
            assert_eq!(serde_json::from_str::<Category>(&json).expect("back"), category);
        }
        let unknown = "health".parse::<Category>().expect_err("unknown").to_string();
        assert!(
            unknown.contains("payment-card") && unknown.contains("tenant:<pattern name>"),
            "{unknown}"
        );
        assert!("tenant:".parse::<Category>().is_err());
    }

    #[test]
    fn oversized_text_is_refused_and_any_text_is_classified_without_panicking() {
        let classifier = Classifier::built_in();
        assert_eq!(
            classifier.classify(&"a".repeat(MAX_TEXT_BYTES + 1)),
            Err(ClassifyError::TooLarge(MAX_TEXT_BYTES + 1))
        );
        // A tenant pattern as broad as one capital letter, on the largest text: every piece
        // counts for its category, at most MAX_FINDINGS are kept.
        let broad = Classifier::with_patterns(&[TenantPattern {
            name: "capital".into(),
            regex: "[A-Z]".into(),
        }])
        .expect("pattern")
        .classify(&"A".repeat(MAX_TEXT_BYTES))
        .expect("classified");
        assert_eq!(broad.findings.len(), MAX_FINDINGS);
        assert_eq!(broad.categories().len(), 1);
        // Pseudo-random texts over an alphabet dense in the detectors' bytes, multi-byte
        // characters included: spans land on character boundaries, and nothing panics.
        let alphabet: Vec<char> = "0123456789 -.:+()@ADEGBQZaéx€\n".chars().collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            let len = (seed % 200) as usize;
            let text: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            for finding in classifier.classify(&text).expect("classified").findings {
                assert!(
                    text.get(finding.span.clone()).is_some(),
                    "{finding:?} in {text:?}"
                );
            }
        }
    }
}
