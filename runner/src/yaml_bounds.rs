//! What a YAML text may stand for once its aliases are expanded. A few kilobytes of anchors
//! and aliases to them (`b: [*a, *a, …]` where `a` is itself a list of aliases) stand for
//! billions of values, and the YAML reader builds every one: a manifest in a shared GitOps
//! checkout could make `contextos run` or `contextos audit` (in a platform's CI) run out of
//! memory. Texts are measured first, counting as the aliases expand, and refused past the
//! bounds before anything is built.

use serde::de::{DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// Values and bytes of text every load may expand to, whatever it reads.
pub const BASE_VALUES: usize = 1_000_000;
pub const BASE_TEXT: usize = 16 << 20;
/// Values, and bytes of text, each byte read adds to what a load may expand to: plain YAML holds
/// at most one value per two bytes, so twice its size leaves room for anchors used a few times,
/// not for aliases that multiply.
pub const PER_BYTE_READ: usize = 2;
/// What a load expands to at most, however much it reads (comments and blank lines earn room
/// too).
pub const MAX_LOAD_VALUES: usize = 8_000_000;
pub const MAX_LOAD_TEXT: usize = 128 << 20;

/// What the texts of one load (the files of one `contextos run -f`, of one audit) may expand
/// to: one budget for all of them, so that many files, each within a bound of its own, cannot
/// add up to what no bound allows.
#[derive(Debug, Default)]
pub struct Expansion {
    /// Bytes of text read so far.
    read: usize,
    /// Values and bytes of text the texts read so far expanded to.
    values: usize,
    bytes: usize,
}

impl Expansion {
    /// `Ok` if the documents of `text` fit what is left once their aliases are expanded (and
    /// what they hold is counted as spent); otherwise what they pass. A text that is not YAML
    /// passes: its reader says what is wrong with it.
    pub fn check(&mut self, text: &str) -> Result<(), String> {
        self.read = self.read.saturating_add(text.len());
        let earned = self.read.saturating_mul(PER_BYTE_READ);
        let allowed = (
            BASE_VALUES.saturating_add(earned).min(MAX_LOAD_VALUES),
            BASE_TEXT.saturating_add(earned).min(MAX_LOAD_TEXT),
        );
        let left = std::cell::Cell::new((
            allowed.0.saturating_sub(self.values),
            allowed.1.saturating_sub(self.bytes),
        ));
        let before = left.get();
        let counted = serde_yaml::Deserializer::from_str(text)
            .try_for_each(|document| (Counted { left: &left }).deserialize(document));
        let after = left.get();
        self.values += before.0 - after.0;
        self.bytes += before.1 - after.1;
        match counted {
            Ok(()) => Ok(()),
            Err(_) if after.0 == 0 => Err(format!(
                "it holds more than {} values once its YAML aliases are expanded (with the files read before it: {BASE_VALUES}, {PER_BYTE_READ} a byte read, at most {MAX_LOAD_VALUES}); write repeated blocks out instead of aliasing them, or read fewer files at once",
                before.0
            )),
            Err(_) if after.1 == 0 => Err(format!(
                "it holds more than {} MiB of text once its YAML aliases are expanded (with the files read before it: {} MiB, {PER_BYTE_READ} bytes a byte read, at most {} MiB); write repeated blocks out instead of aliasing them, or read fewer files at once",
                before.1 >> 20,
                BASE_TEXT >> 20,
                MAX_LOAD_TEXT >> 20
            )),
            // Not YAML: its reader reports that, where it is.
            Err(_) => Ok(()),
        }
    }
}

/// [`Expansion::check`] for one text read on its own.
pub fn check(text: &str) -> Result<(), String> {
    Expansion::default().check(text)
}

/// Walks a document without keeping it, counting every value against `left`.
#[derive(Clone, Copy)]
struct Counted<'a> {
    /// Values and bytes of text still allowed.
    left: &'a std::cell::Cell<(usize, usize)>,
}

impl Counted<'_> {
    fn take<E: serde::de::Error>(self, bytes: usize) -> Result<(), E> {
        let (values, text) = self.left.get();
        match (values.checked_sub(1), text.checked_sub(bytes)) {
            (Some(values), Some(text)) => {
                self.left.set((values, text));
                Ok(())
            }
            (None, _) => {
                self.left.set((0, text));
                Err(E::custom("too many values"))
            }
            (_, None) => {
                self.left.set((values, 0));
                Err(E::custom("too much text"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Counted<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.take(0)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.take(0)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.take(0)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.take(0)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.take(v.len())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(0)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(0)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    /// A tagged value (`!Tag value`): its tag as text, then its value.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list of 3,000 values, and 3,000 aliases of it: 21 KB standing for 9 million values
    /// (within the YAML reader's own limit on aliases, which counts aliases, not what they
    /// expand to).
    fn alias_bomb() -> String {
        let values = vec!["0"; 3_000].join(", ");
        let aliases = vec!["*a"; 3_000].join(", ");
        format!("a: &a [{values}]\nb: [{aliases}]\n")
    }

    #[test]
    fn aliases_that_stand_for_billions_of_values_are_refused_before_they_are_built() {
        let text = alias_bomb();
        assert!(text.len() < 24_000);
        let refused = check(&text).expect_err("refused");
        assert!(refused.contains("more than 1042"), "{refused}");
    }

    /// Many files, each within what it could expand to alone, share one load's budget.
    #[test]
    fn the_files_of_one_load_share_what_they_may_expand_to() {
        // 300 values and 300 aliases of them: 90,000 values from about 2 KB.
        let values = vec!["0"; 300].join(", ");
        let aliases = vec!["*a"; 300].join(", ");
        let text = format!("a: &a [{values}]\nb: [{aliases}]\n");
        assert_eq!(check(&text), Ok(()), "one file alone");
        let mut load = Expansion::default();
        let passed = (0..20).take_while(|_| load.check(&text).is_ok()).count();
        assert_eq!(
            passed, 11,
            "a million values and two a byte read, for all of them"
        );
    }

    /// Room earned by reading (comments, blank lines) stops at the load's bound.
    #[test]
    fn what_reading_earns_stops_at_the_loads_bound() {
        let padding = format!("# {}\n", "x".repeat(8 << 20));
        let mut load = Expansion::default();
        assert_eq!(load.check(&padding), Ok(()));
        let values = vec!["0"; 3_000].join(", ");
        let aliases = vec!["*a"; 3_000].join(", ");
        let bomb = format!("a: &a [{values}]\nb: [{aliases}]\n");
        let refused = load.check(&bomb).expect_err("past the load's bound");
        assert!(refused.contains("at most 8000000"), "{refused}");
    }

    #[test]
    fn one_long_string_repeated_counts_its_text_each_time() {
        let long = "y".repeat(1 << 20);
        let aliases = vec!["*s"; 80].join(", ");
        let text = format!("s: &s {long}\nmany: [{aliases}]\n");
        let refused = check(&text).expect_err("refused");
        assert!(refused.contains("more than 18 MiB of text"), "{refused}");
    }

    #[test]
    fn ordinary_manifests_and_texts_that_are_not_yaml_pass() {
        let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        for entry in std::fs::read_dir(quickstart).expect("the quickstart") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                assert_eq!(check(&text), Ok(()), "{}", path.display());
            }
        }
        assert_eq!(
            check("base: &b {x: 1}\nother:\n  <<: *b\n  tagged: !Thing {y: 2}\n"),
            Ok(())
        );
        assert_eq!(check("a: [unclosed"), Ok(()), "left to the reader to report");
    }
}
