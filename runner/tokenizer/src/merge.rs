//! Byte-pair merging of one piece that is not itself a token: every byte starts as a part, and
//! the adjacent pair whose join has the lowest rank is joined (the leftmost of equal ranks),
//! until no adjacent pair joins into a token. Short pieces (nearly all of them) rescan their
//! few parts on the stack; longer ones keep a heap, O(n log n) in the piece's length: a piece is
//! a tenant's text (a long run of letters or symbols is one piece), so the quadratic rescan a
//! short piece can afford must never be what a long one costs.

use std::{cmp::Reverse, collections::BinaryHeap};

use crate::Rank;

/// No join: the part is the piece's last, or its join with the next is not a token.
const NONE: Rank = Rank::MAX;

/// Pieces up to this many bytes are merged by rescanning their parts, held on the stack.
const SHORT: usize = 32;

/// Emits the ranks of `piece`'s parts once merged, in order. `rank_of` looks a byte string up in
/// the vocabulary, which holds every single byte.
pub(crate) fn byte_pairs(piece: &[u8], rank_of: impl Fn(&[u8]) -> Option<Rank>, emit: &mut impl FnMut(Rank)) {
    if piece.len() <= SHORT {
        by_rescan(piece, rank_of, emit);
    } else {
        by_heap(piece, rank_of, emit);
    }
}

/// Merging by finding the lowest join among all parts after every join.
fn by_rescan(piece: &[u8], rank_of: impl Fn(&[u8]) -> Option<Rank>, emit: &mut impl FnMut(Rank)) {
    // `starts[..=parts]`: where each part starts, then the piece's end; `joins[i]`: the rank of
    // part i joined with part i + 1.
    let mut starts = [0usize; SHORT + 1];
    let mut joins = [NONE; SHORT];
    let mut parts = piece.len();
    for (i, start) in starts.iter_mut().enumerate().take(parts + 1) {
        *start = i;
    }
    let join = |starts: &[usize], parts: usize, i: usize| -> Rank {
        if i + 1 < parts {
            rank_of(&piece[starts[i]..starts[i + 2]]).unwrap_or(NONE)
        } else {
            NONE
        }
    };
    for (i, rank) in joins.iter_mut().enumerate().take(parts) {
        *rank = join(&starts, parts, i);
    }
    loop {
        let mut lowest = (NONE, 0);
        for (i, rank) in joins.iter().enumerate().take(parts) {
            if *rank < lowest.0 {
                lowest = (*rank, i);
            }
        }
        let (rank, i) = lowest;
        if rank == NONE {
            break;
        }
        // Part i + 1 is absorbed into part i.
        starts.copy_within(i + 2..=parts, i + 1);
        joins.copy_within(i + 2..parts, i + 1);
        parts -= 1;
        joins[i] = join(&starts, parts, i);
        if i > 0 {
            joins[i - 1] = join(&starts, parts, i - 1);
        }
    }
    for i in 0..parts {
        // Every part is a single byte or a join that was found in the vocabulary.
        emit(rank_of(&piece[starts[i]..starts[i + 1]]).unwrap_or(NONE));
    }
}

/// Merging with a heap of candidate joins, each checked when it comes up.
fn by_heap(piece: &[u8], rank_of: impl Fn(&[u8]) -> Option<Rank>, emit: &mut impl FnMut(Rank)) {
    let len = piece.len();
    // Parts are identified by their first byte's index; `next[i]` is where the part after it
    // starts (`len` for none), `prev[i]` where the one before it does.
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; len];
    // `join[i]`: the rank of part i joined with the part after it.
    let mut join = vec![NONE; len];
    let mut heap = BinaryHeap::with_capacity(len);
    let rank_at = |start: usize, next: &[usize]| -> Rank {
        let after = next[start];
        if after >= len {
            return NONE;
        }
        rank_of(&piece[start..next[after]]).unwrap_or(NONE)
    };
    for (start, rank) in join.iter_mut().enumerate().take(len - 1) {
        *rank = rank_at(start, &next);
        if *rank != NONE {
            heap.push(Reverse((*rank, start)));
        }
    }
    while let Some(Reverse((rank, start))) = heap.pop() {
        // Entries are never removed, only outdated: skip one whose part is gone or whose join
        // changed since it was pushed.
        if !alive[start] || join[start] != rank {
            continue;
        }
        let right = next[start];
        alive[right] = false;
        next[start] = next[right];
        if next[start] < len {
            prev[next[start]] = start;
        }
        join[start] = rank_at(start, &next);
        if join[start] != NONE {
            heap.push(Reverse((join[start], start)));
        }
        let before = prev[start];
        if before < len {
            join[before] = rank_at(before, &next);
            if join[before] != NONE {
                heap.push(Reverse((join[before], before)));
            }
        }
    }
    let mut start = 0;
    while start < len {
        let end = next[start];
        // Every part is a single byte or a join that was found in the vocabulary.
        emit(rank_of(&piece[start..end]).unwrap_or(NONE));
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn merged(vocab: &[(&str, Rank)], piece: &str) -> Vec<String> {
        let by_bytes: HashMap<&[u8], Rank> = vocab.iter().map(|(s, r)| (s.as_bytes(), *r)).collect();
        let by_rank: HashMap<Rank, &str> = vocab.iter().map(|(s, r)| (*r, *s)).collect();
        let mut out = Vec::new();
        byte_pairs(piece.as_bytes(), |b| by_bytes.get(b).copied(), &mut |r| {
            out.push(by_rank[&r].to_owned())
        });
        out
    }

    #[test]
    fn the_rescan_and_the_heap_merge_alike() {
        // A vocabulary of every byte of a small alphabet plus random joins, and random pieces
        // of every length up to the rescan's limit.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut vocab: HashMap<Vec<u8>, Rank> =
            (b'a'..=b'e').map(|b| (vec![b], 1_000 + Rank::from(b))).collect();
        for rank in 0..300 {
            let len = 2 + (random() % 4) as usize;
            let join: Vec<u8> = (0..len).map(|_| b'a' + (random() % 5) as u8).collect();
            vocab.entry(join).or_insert(rank);
        }
        for _ in 0..2_000 {
            let len = 1 + (random() % SHORT as u64) as usize;
            let piece: Vec<u8> = (0..len).map(|_| b'a' + (random() % 5) as u8).collect();
            let (mut rescanned, mut heaped) = (Vec::new(), Vec::new());
            by_rescan(&piece, |b| vocab.get(b).copied(), &mut |r| rescanned.push(r));
            by_heap(&piece, |b| vocab.get(b).copied(), &mut |r| heaped.push(r));
            assert_eq!(rescanned, heaped, "{:?}", String::from_utf8_lossy(&piece));
        }
    }

    #[test]
    fn joins_the_lowest_rank_first_and_the_leftmost_of_equals() {
        let vocab = [
            ("a", 0),
            ("b", 1),
            ("c", 2),
            ("ab", 3),
            ("bc", 4),
            ("abc", 5),
            ("aa", 6),
        ];
        // "ab" (3) is joined before "bc" (4); then "ab"+"c" = "abc".
        assert_eq!(merged(&vocab, "abc"), ["abc"]);
        // Three a's: the leftmost pair joins, the third a stays alone.
        assert_eq!(merged(&vocab, "aaa"), ["aa", "a"]);
        assert_eq!(merged(&vocab, "cab"), ["c", "ab"]);
        assert_eq!(merged(&vocab, "b"), ["b"]);
    }
}
