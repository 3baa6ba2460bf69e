//! The vocabulary table compiled into the binary: every token's bytes in rank order, stored as
//! `"CTXOSTOK" | version u32 | count u32 | length u8 × count | bytes`, so that loading it is one
//! pass that slices a static buffer (no decoding, no copy). `TABLE.md` says where it comes from
//! and how it is checked.

pub(crate) static O200K: &[u8] = include_bytes!("../o200k_base.table");

const MAGIC: &[u8; 8] = b"CTXOSTOK";
const VERSION: u32 = 1;

/// Why a table cannot be read (only ever a build that compiled in a damaged file).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Damaged(&'static str);

/// The o200k_base tokens' bytes, by rank.
pub(crate) fn o200k() -> Vec<&'static [u8]> {
    read(O200K).unwrap_or_else(|Damaged(why)| {
        panic!(
            "the o200k_base table compiled into this binary is damaged ({why}); rebuild from a clean checkout"
        )
    })
}

/// Every token's bytes, by rank, borrowed from `table`.
pub(crate) fn read(table: &'static [u8]) -> Result<Vec<&'static [u8]>, Damaged> {
    let header = table.get(..16).ok_or(Damaged("shorter than its header"))?;
    if &header[..8] != MAGIC {
        return Err(Damaged("not a token table"));
    }
    if u32_at(header, 8) != VERSION {
        return Err(Damaged("a version this build does not read"));
    }
    let count = u32_at(header, 12) as usize;
    let lengths = table
        .get(16..16 + count)
        .ok_or(Damaged("fewer lengths than tokens"))?;
    let mut bytes = &table[16 + count..];
    let mut tokens = Vec::with_capacity(count);
    for &length in lengths {
        if length == 0 || bytes.len() < usize::from(length) {
            return Err(Damaged("a token length past the end or zero"));
        }
        let (token, rest) = bytes.split_at(usize::from(length));
        tokens.push(token);
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(Damaged("bytes after the last token"));
    }
    Ok(tokens)
}

/// Writes `tokens` (by rank) as a table: how `o200k_base.table` was made (see `TABLE.md`).
#[cfg(test)]
pub(crate) fn write(tokens: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + tokens.len() + tokens.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for token in tokens {
        out.push(u8::try_from(token.len()).expect("tokens are 1 to 255 bytes long"));
    }
    for token in tokens {
        out.extend_from_slice(token);
    }
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked(bytes: Vec<u8>) -> &'static [u8] {
        Box::leak(bytes.into_boxed_slice())
    }

    #[test]
    fn reads_what_it_writes() {
        let tokens = vec![b"a".to_vec(), b"bc".to_vec(), vec![0xff; 128]];
        let read_back = read(leaked(write(&tokens))).expect("a written table reads");
        assert_eq!(read_back, tokens.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn refuses_a_damaged_table() {
        let good = write(&[b"ab".to_vec(), b"c".to_vec()]);
        let cut = good[..good.len() - 1].to_vec();
        assert_eq!(
            read(leaked(cut)),
            Err(Damaged("a token length past the end or zero"))
        );
        let mut longer = good.clone();
        longer.push(b'x');
        assert_eq!(read(leaked(longer)), Err(Damaged("bytes after the last token")));
        assert_eq!(
            read(leaked(b"CTXOSTOK".to_vec())),
            Err(Damaged("shorter than its header"))
        );
        let mut foreign = good;
        foreign[0] = b'X';
        assert_eq!(read(leaked(foreign)), Err(Damaged("not a token table")));
    }
}
