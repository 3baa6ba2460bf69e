//! The table and the encoder checked against tiktoken-rs, the reference implementation of
//! o200k_base: the same vocabulary rank for rank, and the same tokens for every text tried.

use crate::{Rank, Tokenizer, table};

/// Every o200k_base token's bytes, by rank, as the reference has them.
fn reference_tokens(reference: &tiktoken_rs::CoreBPE) -> Vec<Vec<u8>> {
    let mut tokens = Vec::new();
    while let Ok(bytes) = reference.decode_bytes(&[tokens.len() as Rank]) {
        tokens.push(bytes);
    }
    tokens
}

/// The table compiled in is the reference's vocabulary. `CONTEXTOS_WRITE_TOKEN_TABLE=1` writes
/// it anew from the reference (how the file was made).
#[test]
fn the_table_is_o200k_base() {
    let reference = tiktoken_rs::o200k_base().expect("the reference tokenizer builds");
    let expected = table::write(&reference_tokens(&reference));
    if std::env::var_os("CONTEXTOS_WRITE_TOKEN_TABLE").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/o200k_base.table");
        std::fs::write(path, &expected).expect("the table is written");
    }
    assert_eq!(Tokenizer::o200k().len(), 199_998);
    assert!(
        table::O200K == expected.as_slice(),
        "o200k_base.table differs from the reference's vocabulary"
    );
}

/// A small deterministic generator, so the random texts are the same in every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn texts() -> Vec<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut texts: Vec<String> = [
        "README.md",
        "runner/src/context/mod.rs",
        "examples/quickstart/agent.yaml",
    ]
    .iter()
    .filter_map(|file| std::fs::read_to_string(format!("{root}/{file}")).ok())
    .collect();
    assert!(
        !texts.is_empty(),
        "the repository's texts are readable from the crate"
    );
    texts.extend(
        [
            "naïve café ✓ — 東京タワー 👩‍💻 Здравствуй, мир! مرحبا بالعالم",
            "DON'T you've we'LL it's I'm 'tis",
            "1234567890 3.14159 1,000,000 0x1F ½ ² ٣٤٥",
            "  leading\t\ttabs \n\n\n  trailing   \r\n\r\n x  ",
            "{\"k\": [1, 2, {\"v\": null}]}\n<<<>>>////\\\\",
        ]
        .map(str::to_owned),
    );
    // Long single pieces: a run of letters, of symbols, of digits, of spaces.
    texts.push("a".repeat(20_000));
    texts.push("abcdefghij".repeat(3_000));
    texts.push("=+".repeat(10_000));
    texts.push("7".repeat(9_999));
    texts.push(format!("{}x", " ".repeat(10_000)));
    // Random characters from a mixed alphabet, and random bytes read as text.
    let alphabet: Vec<char> = "aAzZ09 \n\t.,;'\"-_/\\()[]{}éüßøç中文日本語한국어😀🚀ab cd ef "
        .chars()
        .collect();
    let mut rng = XorShift(0x5EED_C0DE);
    for _ in 0..200 {
        let len = (rng.next() % 400) as usize;
        texts.push(
            (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect(),
        );
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        texts.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    texts
}

#[test]
fn encodes_every_text_as_the_reference_does() {
    let reference = tiktoken_rs::o200k_base().expect("the reference tokenizer builds");
    let ours = Tokenizer::o200k();
    for text in texts() {
        let expected = reference.encode_ordinary(&text);
        let got = ours.encode(&text);
        assert!(
            got == expected,
            "tokens differ from the reference for the text starting {:?} ({} bytes)",
            text.chars().take(60).collect::<String>(),
            text.len()
        );
        assert_eq!(ours.count(&text), expected.len());
    }
}
