//! Recall of 20 items from 100,000 memory items of one tenant in the embedded store, next to a
//! baseline measured in the same run on the same store: reading the same 20 items by their
//! keys in one call (what any recall must at least do).
//!
//! Run: `cargo bench -p contextos-runner --bench memory`. Targets: recall p50 ≤ 2 ms; erasing
//! one subject with 10,000 items in seconds, not a store rewrite (printed next to the time
//! keeping those items took, in the same run). An erasure forgets the items and rotates the
//! tenant's key-encryption key, rewrapping the data keys of the other subjects (1,000 here).
//!
//! The tenant's items: 60 % in one agent's scope, 20 % in another's, 10 % tenant-wide, 10 %
//! spread over 1,000 subjects; four types; texts of 12–20 words from a 2,000-word vocabulary,
//! where "checkout" is in half of the items and "gateway" in one in fifty. Queries: the newest
//! 20 of the big scope; of one type; by a common word; by a common and a rare word; a subject's
//! items with consent checked for each.

use std::{collections::BTreeSet, hint::black_box, time::Instant};

use contextos_runner::{
    consent::{ConsentAction, ConsentLedger, ConsentRecord, Purpose, SubjectHandle},
    memory::{
        ItemScope, MemoryItem, MemoryType, Provenance, RecallQuery, admit,
        backend::MemoryBackend,
        bank::{MAX_KEEP_BATCH, MemoryBank},
    },
    personal_data::Category,
    records::{EmbeddedStore, TenantId},
    vault::{Vault, kek::KeyRings},
};

const ITEMS: usize = 100_000;
const SUBJECTS: usize = 1_000;
const ITERATIONS: usize = 2_000;

/// A deterministic generator (xorshift), so every run keeps the same items.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn items() -> Vec<MemoryItem> {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let vocabulary: Vec<String> = (0..2_000).map(|i| format!("w{i:04}x")).collect();
    let purpose = Purpose::new("incident-follow-up").expect("purpose");
    (0..ITEMS)
        .map(|i| {
            let scope = match rng.below(10) {
                0..=5 => ItemScope::Agent("sre-agent".into()),
                6 | 7 => ItemScope::Agent("billing-agent".into()),
                8 => ItemScope::Tenant,
                _ => ItemScope::Subject(
                    SubjectHandle::new(&format!("subj:{}", rng.below(SUBJECTS))).expect("handle"),
                ),
            };
            let memory_type = [
                MemoryType::Fact,
                MemoryType::Preference,
                MemoryType::Procedure,
                MemoryType::Episode,
            ][rng.below(4)];
            let mut words: Vec<&str> = (0..12 + rng.below(9))
                .map(|_| vocabulary[rng.below(2_000)].as_str())
                .collect();
            if rng.below(2) == 0 {
                words.push("checkout");
            }
            if rng.below(50) == 0 {
                words.push("gateway");
            }
            let subject = matches!(scope, ItemScope::Subject(_));
            MemoryItem {
                scope,
                memory_type,
                text: words.join(" "),
                categories: if subject {
                    BTreeSet::from([Category::Phone])
                } else {
                    BTreeSet::new()
                },
                purpose: subject.then(|| purpose.clone()),
                provenance: Provenance {
                    run_id: format!("run-{}", i / 10),
                    evidence: Vec::new(),
                    at_ms: 1_700_000_000_000 + i as i64 * 1_000,
                    context_pack: "sha256:pack".into(),
                    policies: vec!["sha256:policy".into()],
                    reviewed_by: None,
                },
                expires_at_ms: None,
                entities: Default::default(),
            }
        })
        .collect()
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
}

async fn measure<F: AsyncFnMut() -> usize>(mut f: F) -> (f64, f64, usize) {
    let mut found = 0;
    for _ in 0..100 {
        found = f().await;
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let t = Instant::now();
        black_box(f().await);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99) = percentiles(samples);
    (p50, p99, found)
}

fn query(scope: ItemScope, memory_type: Option<MemoryType>, text: &str) -> RecallQuery {
    RecallQuery {
        scope,
        memory_type,
        text: text.into(),
        max_items: 20,
        purpose: None,
        entity_type: None,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("records.redb"))
        .expect("open")
        .with_key_rings(KeyRings::in_memory());
    let tenant = TenantId::new("bench").expect("tenant");
    let bank = MemoryBank::new(&store, &tenant);

    let all = items();
    let started = Instant::now();
    for batch in all.chunks(MAX_KEEP_BATCH) {
        bank.keep_all(batch).await.expect("keep");
    }
    let load = started.elapsed();
    println!(
        "kept {ITEMS} items in {:.1} s ({:.0} items/s, batches of {MAX_KEEP_BATCH})",
        load.as_secs_f64(),
        ITEMS as f64 / load.as_secs_f64()
    );

    let sre = ItemScope::Agent("sre-agent".into());
    let newest = bank
        .recall(&query(sre.clone(), None, ""), |_| Ok(()))
        .await
        .expect("recall");
    let keys: Vec<Vec<u8>> = newest
        .offered
        .iter()
        .map(|(id, _)| [format!("cx/{tenant}/m/i/").into_bytes(), id.0.0.to_vec()].concat())
        .collect();
    let (base50, base99, _) = measure(async || {
        store
            .memory_get(&tenant, keys.clone())
            .await
            .expect("get")
            .iter()
            .flatten()
            .count()
    })
    .await;
    println!(
        "{:<58} p50 {base50:>7.1} µs  p99 {base99:>7.1} µs",
        "baseline: the same 20 items read by key"
    );

    let subject = SubjectHandle::new("subj:7").expect("handle");
    let purpose = Purpose::new("incident-follow-up").expect("purpose");
    let ledger = ConsentLedger::from_records(&[ConsentRecord {
        subject: subject.clone(),
        purpose: purpose.clone(),
        action: ConsentAction::Grant,
        categories: BTreeSet::from([Category::Phone]),
        by: "bench".into(),
        evidence: "BENCH-1".into(),
        at_ms: 0,
        expires_at_ms: None,
        request_id: None,
    }]);
    let mut subject_query = query(ItemScope::Subject(subject), None, "");
    subject_query.purpose = Some(purpose);
    // As the gateway recalls: a new bank per recall, so the subject's key is read from the
    // vault (their wrapped data key, unwrapped) every time.
    let (p50, p99, found) = measure(async || {
        MemoryBank::new(&store, &tenant)
            .recall(&subject_query, |item| {
                admit(item, subject_query.purpose.as_ref(), &ledger, 1)
            })
            .await
            .expect("recall")
            .offered
            .len()
    })
    .await;
    println!(
        "{:<58} p50 {p50:>7.1} µs  p99 {p99:>7.1} µs  ({found} offered, {:.1}× baseline; target p50 ≤ 2,000 µs)",
        "a subject's items, their key read from the vault",
        p50 / base50
    );
    let cases = [
        ("newest 20 of an agent's 60,000", query(sre.clone(), None, "")),
        (
            "newest 20 facts of it",
            query(sre.clone(), Some(MemoryType::Fact), ""),
        ),
        (
            "20 holding \"checkout\" (in half the items)",
            query(sre.clone(), None, "checkout"),
        ),
        (
            "20 holding \"checkout gateway\" (rare word scanned)",
            query(sre.clone(), None, "checkout gateway"),
        ),
        ("a subject's items (~10), consent checked", subject_query),
    ];
    for (what, q) in cases {
        let (p50, p99, found) = measure(async || {
            bank.recall(&q, |item| admit(item, q.purpose.as_ref(), &ledger, 1))
                .await
                .expect("recall")
                .offered
                .len()
        })
        .await;
        println!(
            "{what:<58} p50 {p50:>7.1} µs  p99 {p99:>7.1} µs  ({found} offered, {:.1}× baseline; target p50 ≤ 2,000 µs)",
            p50 / base50
        );
    }

    // Erasure: one subject with 10,000 items among the 100,000.
    let erased = SubjectHandle::new("subj:erase-me").expect("handle");
    let purpose = Purpose::new("incident-follow-up").expect("purpose");
    let theirs: Vec<MemoryItem> = (0..10_000)
        .map(|i| MemoryItem {
            scope: ItemScope::Subject(erased.clone()),
            memory_type: MemoryType::Preference,
            text: format!("w{:04}x prefers summaries for incident {i} checkout", i % 2_000),
            categories: BTreeSet::new(),
            purpose: Some(purpose.clone()),
            provenance: Provenance {
                run_id: format!("run-erase-{}", i / 10),
                evidence: Vec::new(),
                at_ms: 1_800_000_000_000 + i,
                context_pack: "sha256:pack".into(),
                policies: vec!["sha256:policy".into()],
                reviewed_by: None,
            },
            expires_at_ms: None,
            entities: Default::default(),
        })
        .collect();
    let started = Instant::now();
    for batch in theirs.chunks(MAX_KEEP_BATCH) {
        bank.keep_all(batch).await.expect("keep");
    }
    let keeping = started.elapsed();
    let started = Instant::now();
    let erasure = Vault::new(&store, tenant.clone())
        .erase(&erased, "bench", 1_900_000_000_000)
        .await
        .expect("erase");
    let erasing = started.elapsed();
    println!(
        "{:<58} {:>7.2} s  ({} items forgotten, {} other data keys wrapped anew; baseline: keeping the items took {:.2} s; target: seconds)",
        "erase one subject with 10,000 items",
        erasing.as_secs_f64(),
        erasure.memory_forgotten,
        erasure.rotation.rewrapped,
        keeping.as_secs_f64()
    );
}
