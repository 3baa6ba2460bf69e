//! OpenAPI 3 documents as the gateway and the audit read them: references resolved and
//! schemas inlined within fixed bounds (a document is untrusted input), and methods as HTTP
//! writes them.

use contextos_crds::agent::HttpMethod;
use serde_json::{Map, Value, json};

/// Deepest `$ref` chain followed.
const MAX_REF_DEPTH: usize = 32;
/// Most schema nodes one operation's arguments inline (references may fan out exponentially).
pub const MAX_INLINED_NODES: usize = 100_000;
/// Most bytes of text (keys and strings) one operation's arguments inline: a reference costs a
/// node however long the text it points at, so thousands of references to one long
/// description would otherwise copy it thousands of times.
pub const MAX_INLINED_BYTES: usize = 16 << 20;

/// How many times one operation's bounds every operation of a document may inline together,
/// when all are read at once (the audit, `contextos tools import`).
pub const DOCUMENT_INLINED_OPERATIONS: usize = 8;

/// What is left of the bounds on what schemas inline: one operation's (the default), or a whole
/// document's.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    nodes: usize,
    bytes: usize,
    /// What it started from (for the message when it is spent).
    whole: (usize, usize),
}

impl Default for Budget {
    fn default() -> Self {
        Self::of(MAX_INLINED_NODES, MAX_INLINED_BYTES)
    }
}

impl Budget {
    fn of(nodes: usize, bytes: usize) -> Self {
        Self {
            nodes,
            bytes,
            whole: (nodes, bytes),
        }
    }

    /// The bound on what every operation of one document inlines together: without it, a
    /// document of thousands of parameters, each naming one large schema, would inline each
    /// within its own operation's bound.
    pub fn for_document() -> Self {
        Self::of(
            MAX_INLINED_NODES * DOCUMENT_INLINED_OPERATIONS,
            MAX_INLINED_BYTES * DOCUMENT_INLINED_OPERATIONS,
        )
    }

    fn take(&mut self, nodes: usize, bytes: usize) -> Result<(), String> {
        let (all_nodes, all_bytes) = self.whole;
        self.nodes = self
            .nodes
            .checked_sub(nodes)
            .ok_or_else(|| format!("schemas that inline to more than {all_nodes} nodes"))?;
        self.bytes = self
            .bytes
            .checked_sub(bytes)
            .ok_or_else(|| format!("schemas that inline to more than {all_bytes} bytes of text"))?;
        Ok(())
    }
}

/// `value`, or what its `$ref` (`#/components/…`) points at (borrowed: resolving copies
/// nothing).
pub fn resolve<'a>(document: &'a Value, value: &'a Value, depth: usize) -> Result<&'a Value, String> {
    let Some(reference) = value["$ref"].as_str() else {
        return Ok(value);
    };
    if depth > MAX_REF_DEPTH {
        return Err(format!(
            "$ref {reference}: more than {MAX_REF_DEPTH} references deep (a cycle?)"
        ));
    }
    let pointer = reference
        .strip_prefix('#')
        .ok_or_else(|| format!("$ref {reference}: only references inside the document are followed"))?;
    let target = document
        .pointer(pointer)
        .ok_or_else(|| format!("$ref {reference}: not in the document"))?;
    resolve(document, target, depth + 1)
}

/// Most values a document may hold once its YAML aliases are expanded: a few kilobytes of
/// aliases to aliases can otherwise stand for billions of values.
pub const MAX_DOCUMENT_VALUES: usize = 4_000_000;
/// Most bytes of text (keys and strings) a document may hold once its YAML aliases are
/// expanded: an alias of one long string, repeated, costs a value each but copies the string.
pub const MAX_DOCUMENT_TEXT: usize = 32 << 20;

/// A document's content: JSON, or YAML within [`MAX_DOCUMENT_VALUES`] and
/// [`MAX_DOCUMENT_TEXT`] (counted as aliases expand, while it is read).
pub fn parse_document(text: &str) -> Result<Value, String> {
    if let Ok(value) = serde_json::from_str(text) {
        return Ok(value);
    }
    let left = std::cell::Cell::new((MAX_DOCUMENT_VALUES, MAX_DOCUMENT_TEXT));
    let seed = Bounded {
        left: &left,
        key: false,
    };
    serde::de::DeserializeSeed::deserialize(seed, serde_yaml::Deserializer::from_str(text))
        .map_err(|e| e.to_string())
}

/// Builds a JSON value from YAML, counting every value against `left`.
#[derive(Clone, Copy)]
struct Bounded<'a> {
    /// Values and bytes of text still allowed.
    left: &'a std::cell::Cell<(usize, usize)>,
    /// A mapping key: a scalar, as JSON's keys are text. (A mapping as a key would be written
    /// out as text inside its parent's key, escaped once more at every level: twice as long
    /// each time.)
    key: bool,
}

impl Bounded<'_> {
    fn scalar_key<E: serde::de::Error>(self) -> Result<(), E> {
        if self.key {
            return Err(E::custom("a mapping key that is a mapping or a sequence"));
        }
        Ok(())
    }

    fn take<E: serde::de::Error>(self) -> Result<(), E> {
        self.take_text(0)
    }

    /// Takes a value holding `bytes` of text.
    fn take_text<E: serde::de::Error>(self, bytes: usize) -> Result<(), E> {
        let (values, text) = self.left.get();
        let values = values.checked_sub(1).ok_or_else(|| {
            E::custom(format!(
                "more than {MAX_DOCUMENT_VALUES} values once its aliases are expanded"
            ))
        })?;
        let text = text.checked_sub(bytes).ok_or_else(|| {
            E::custom(format!(
                "more than {MAX_DOCUMENT_TEXT} bytes of text once its aliases are expanded"
            ))
        })?;
        self.left.set((values, text));
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.take_text(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.scalar_key()?;
        self.take()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.scalar_key()?;
        self.take()?;
        let mut out = Map::new();
        let (key_seed, value_seed) = (Self { key: true, ..self }, Self { key: false, ..self });
        while let Some(key) = map.next_key_seed(key_seed)? {
            // YAML keys may be numbers (`200:` in `responses`) or booleans: JSON's are text.
            let key = match key {
                Value::String(text) => text,
                other => other.to_string(),
            };
            let value = map.next_value_seed(value_seed)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A schema with every `$ref` inside it replaced by its target (tools carry self-contained
/// schemas), within [`MAX_REF_DEPTH`], [`MAX_INLINED_NODES`] and [`MAX_INLINED_BYTES`].
pub fn inline(document: &Value, schema: &Value, depth: usize) -> Result<Value, String> {
    inline_within(document, schema, depth, &mut Budget::default())
}

/// [`inline`] within what is `left` of a budget shared by several schemas (one operation's).
pub fn inline_within(
    document: &Value,
    schema: &Value,
    depth: usize,
    left: &mut Budget,
) -> Result<Value, String> {
    left.take(1, 0)?;
    if depth > MAX_REF_DEPTH * 4 {
        return Err(format!(
            "a schema nested more than {} levels deep (a recursive $ref?)",
            MAX_REF_DEPTH * 4
        ));
    }
    // Keywords next to a `$ref` (OpenAPI 3.1, JSON Schema 2020-12) constrain too: both hold.
    if let Some(map) = schema.as_object()
        && map.contains_key("$ref")
        && map
            .keys()
            .any(|k| !matches!(k.as_str(), "$ref" | "description" | "summary"))
    {
        let mut siblings = map.clone();
        let reference = siblings.remove("$ref").unwrap_or_default();
        let target = inline_within(document, &json!({"$ref": reference}), depth + 1, left)?;
        let siblings = inline_within(document, &Value::Object(siblings), depth + 1, left)?;
        return Ok(json!({"allOf": [target, siblings]}));
    }
    let schema = resolve(document, schema, depth / 4)?;
    let budget = left;
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                budget.take(0, key.len())?;
                out.insert(key.clone(), inline_within(document, value, depth + 1, budget)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .map(|v| inline_within(document, v, depth + 1, budget))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::String(text) => {
            budget.take(0, text.len())?;
            Ok(schema.clone())
        }
        other => Ok(other.clone()),
    }
}

/// `GET`, `POST`, … as HTTP writes them.
pub fn method_name(method: HttpMethod) -> &'static str {
    match method {
        HttpMethod::Get => "GET",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Patch => "PATCH",
        HttpMethod::Delete => "DELETE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_mappings_are_refused_before_they_cost_anything() {
        // Each level's key would be the previous level written out and escaped again: 2^n.
        let nested = format!("a: {}{}", "{".repeat(60), "}".repeat(60));
        let refused = parse_document(&nested).expect_err("a mapping as a key");
        assert!(refused.contains("mapping key that is a mapping"), "{refused}");
        assert!(parse_document("? [1, 2]\n: x\n").is_err());
        let scalars = parse_document("200: {a: 1}\ntrue: 2\n~: 3\n1.5: 4\n").expect("scalar keys");
        assert_eq!(scalars, json!({"200": {"a": 1}, "true": 2, "null": 3, "1.5": 4}));
    }

    #[test]
    fn an_alias_of_a_long_string_counts_its_text_each_time() {
        // 1 MiB once, named 40 times: a few hundred bytes of aliases for 40 MiB of text.
        let document = format!(
            "long: &x \"{}\"\nmany: [{}]\n",
            "a".repeat(1 << 20),
            vec!["*x"; 40].join(", ")
        );
        let refused = parse_document(&document).expect_err("40 MiB of text");
        assert!(refused.contains("bytes of text"), "{refused}");
        let few = format!("long: &x \"{}\"\nmany: [*x, *x]\n", "a".repeat(1 << 20));
        assert!(parse_document(&few).is_ok());
    }

    #[test]
    fn a_reference_to_a_long_text_counts_its_text_each_time() {
        let document = json!({"components": {"schemas": {
            "B": {"description": "d".repeat(1 << 20)},
            "Many": {"type": "array", "items": vec![json!({"$ref": "#/components/schemas/B"}); 40]},
        }}});
        let refused =
            inline(&document, &json!({"$ref": "#/components/schemas/Many"}), 0).expect_err("40 MiB of text");
        assert!(refused.contains("bytes of text"), "{refused}");
        let few = json!({"$ref": "#/components/schemas/B"});
        assert_eq!(
            inline(&document, &few, 0).expect("one copy"),
            document["components"]["schemas"]["B"]
        );
    }
}
