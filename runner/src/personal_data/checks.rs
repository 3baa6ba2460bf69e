//! The checks that confirm a shape is what it looks like: a card's issuer and Luhn digit, an
//! IBAN's mod-97, the ranges no SSN or NINO is issued in, which addresses are a person's, and
//! when a number is only part of a longer one.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
};

/// Whether the match is one part of a longer dotted number (a version, an OID, a longer
/// address): `1.2.3.4.5` is not an address, `10.0.0.1` inside `10.0.0.10` is not one either.
pub(super) fn dotted_neighbour(bytes: &[u8], span: Range<usize>) -> bool {
    let before = span.start >= 2 && bytes[span.start - 1] == b'.' && bytes[span.start - 2].is_ascii_digit();
    let after = bytes.get(span.end) == Some(&b'.') && bytes.get(span.end + 1).is_some_and(u8::is_ascii_digit);
    before || after
}

/// Whether the match is three groups of a longer, regularly grouped number: a group of the same
/// length follows (or precedes) it with the same separator. Three groups of
/// `4111 1111 1111 1112` are not a phone number; `555-123-4567 2 times` and
/// `030 1234 5678 24/7` are phone numbers.
pub(super) fn grouped_neighbour(bytes: &[u8], span: Range<usize>) -> bool {
    let inner = &bytes[span.clone()];
    let run = |from: usize, step: isize| {
        let mut at = from as isize;
        let mut n = 0;
        while at >= 0 && bytes.get(at as usize).is_some_and(u8::is_ascii_digit) {
            n += 1;
            at += step;
        }
        n
    };
    // The lengths of the match's first and last groups of digits.
    let first = inner.iter().take_while(|b| b.is_ascii_digit()).count();
    let last = inner.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    // (A match that opens with the parenthesis of an area code has no first group to repeat.)
    let before = first > 0
        && span.start >= 2
        && inner.contains(&bytes[span.start - 1])
        && run(span.start - 2, -1) == first;
    let after = bytes
        .get(span.end)
        .is_some_and(|separator| inner.contains(separator))
        && run(span.end + 1, 1) == last;
    before || after
}

pub(super) fn digits(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
}

/// A phone number has `count` digits and at most one separator between two digits.
pub(super) fn is_phone(text: &str, count: std::ops::RangeInclusive<usize>) -> bool {
    let n = digits(text).count();
    if !count.contains(&n) {
        return false;
    }
    let mut run = 0;
    for b in text.bytes() {
        if b.is_ascii_digit() {
            run = 0;
        } else if b != b'+' {
            run += 1;
            // "(0) " and ") " are two separators in a row; anything longer is not a number.
            if run > 2 {
                return false;
            }
        }
    }
    true
}

/// The byte length of the payment card number at the start of `text`: the longest prefix that
/// ends a group of digits (`4111 1111 1111 1111` in `4111 1111 1111 1111 123 times`) and has an
/// issuer's prefix, a length that issuer uses, and the Luhn check digit right.
pub(super) fn card_prefix(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut number: Vec<u32> = Vec::with_capacity(19);
    let mut ends = Vec::new(); // (digits so far, byte end) at the end of each group
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            number.push(u32::from(b - b'0'));
            if bytes.get(i + 1).is_none_or(|next| !next.is_ascii_digit()) {
                ends.push((number.len(), i + 1));
            }
        }
    }
    ends.into_iter()
        .rev()
        .find(|&(len, _)| is_payment_card(&number[..len]))
        .map(|(_, end)| end)
}

/// An issuer's prefix, a length that issuer uses, and the Luhn check digit right.
pub(super) fn is_payment_card(number: &[u32]) -> bool {
    let len = number.len();
    if !(13..=19).contains(&len) {
        return false;
    }
    let prefix = |n: usize| number[..n].iter().fold(0u32, |acc, d| acc * 10 + d);
    let issued = match (prefix(2), prefix(3), prefix(4)) {
        (40..=49, _, _) => matches!(len, 13 | 16 | 19),     // Visa
        (51..=55, _, _) | (_, _, 2221..=2720) => len == 16, // Mastercard
        (34 | 37, _, _) => len == 15,                       // Amex
        (30 | 36 | 38, _, _) => (14..=16).contains(&len),   // Diners
        (35, _, _) => (16..=19).contains(&len),             // JCB
        (65, _, _) | (_, 644..=649, _) | (_, _, 6011) => (16..=19).contains(&len), // Discover
        (62, _, _) | (_, _, 2200..=2204) => (16..=19).contains(&len), // UnionPay, Mir
        (50 | 56..=58 | 63 | 67, _, _) => (13..=19).contains(&len), // Maestro
        _ => false,
    };
    issued && luhn(number)
}

pub(super) fn luhn(number: &[u32]) -> bool {
    let sum: u32 = number
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The IBAN length of the countries whose IBANs are most often seen; others take 15–34.
pub(super) fn iban_length(country: &str) -> Option<usize> {
    Some(match country {
        "NO" => 15,
        "BE" => 16,
        "DK" | "FI" | "NL" => 18,
        "AT" | "EE" | "LU" => 20,
        "CH" | "LI" => 21,
        "DE" | "GB" | "IE" => 22,
        "ES" | "SE" => 24,
        "PT" => 25,
        "FR" | "IT" | "MC" | "GR" => 27,
        "PL" | "HU" | "CY" => 28,
        _ => return None,
    })
}

/// The byte length of the valid IBAN at the start of `text` (spaces included), if there is one:
/// the longest prefix, down to the country's length or to 15 characters, that passes mod-97.
pub(super) fn iban_prefix(text: &str) -> Option<usize> {
    let mut ends = Vec::new(); // byte end after each alphanumeric character
    for (i, b) in text.bytes().enumerate() {
        if b != b' ' {
            ends.push(i + 1);
        }
    }
    let compact: Vec<u8> = text.bytes().filter(|b| *b != b' ').collect();
    let country = std::str::from_utf8(&compact[..2]).ok()?;
    let lengths: Vec<usize> = match iban_length(country) {
        Some(len) => vec![len],
        None => (15..=34).rev().collect(),
    };
    lengths
        .into_iter()
        .filter(|&len| len <= compact.len())
        .find(|&len| iban_checks(&compact[..len]))
        .map(|len| ends[len - 1])
}

/// ISO 13616: the first four characters moved to the end, letters as 10–35, the number mod 97 is 1.
pub(super) fn iban_checks(iban: &[u8]) -> bool {
    let mut rest = 0u32;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        let value = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rest = if value >= 10 {
            (rest * 100 + value) % 97
        } else {
            (rest * 10 + value) % 97
        };
    }
    rest == 1
}

/// `AAA-GG-SSSS` (or with spaces) with none of the ranges the SSA never issues.
pub(super) fn is_ssn(text: &str) -> bool {
    let b = text.as_bytes();
    let area = &b[0..3];
    let group = &b[4..6];
    let serial = &b[7..11];
    // One separator throughout: `123-45-6789` or `123 45 6789`.
    b[3] == b[6] && area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}

/// Two letters (not a prefix HMRC never allocates), six digits, a suffix A–D.
pub(super) fn is_nino(text: &str) -> bool {
    let prefix = &text.as_bytes()[..2];
    !matches!(prefix, b"BG" | b"GB" | b"NK" | b"KN" | b"TN" | b"NT" | b"ZZ")
}

/// Not private, shared, loopback, link-local, documentation, benchmarking, multicast or
/// reserved (RFC 6890).
pub(super) fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 0 && c == 0))
}

/// Not loopback, unspecified, unique-local, link-local, documentation or multicast; an
/// IPv4-mapped address is judged as its IPv4 address.
pub(super) fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}
