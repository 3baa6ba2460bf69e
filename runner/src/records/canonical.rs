//! Canonical JSON: the one byte encoding that record hashes, RunContext signatures and revision
//! digests are computed over.
//!
//! Objects are written with keys in byte order and no insignificant whitespace, whatever order
//! the value was built in (serde_json may preserve insertion order when another crate enables
//! `preserve_order`, so the order is imposed here rather than assumed).

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// The canonical encoding of `value`.
pub fn to_canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out);
    out
}

/// Serializes `value` to JSON and returns its canonical encoding.
pub fn canonical_bytes_of<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    Ok(to_canonical_bytes(&serde_json::to_value(value)?))
}

/// `sha256:<hex>` of the canonical encoding: the digest format used for revisions and pins.
pub fn digest_of<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical_bytes_of(value)?))
    ))
}

fn write_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(s, out),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
        // serde_json renders a number one way only (integers as is, floats shortest round-trip).
        Value::Number(n) => {
            let _ = serde_json::to_writer(&mut *out, n);
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // serde_json's string escaping is deterministic; reuse it rather than re-implementing JSON
    // escapes. Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).expect("json");
        assert_eq!(to_canonical_bytes(&a), to_canonical_bytes(&b));
        assert_eq!(to_canonical_bytes(&a), br#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(to_canonical_bytes(&json!({"k": "a\"b\n"})), br#"{"k":"a\"b\n"}"#);
    }

    #[test]
    fn digest_is_prefixed_sha256() {
        let digest = digest_of(&json!({"a": 1})).expect("digest");
        assert!(
            digest.starts_with("sha256:") && digest.len() == 7 + 64,
            "{digest}"
        );
    }
}
