//! Record store benchmark: append latency and throughput of the embedded store (one entry per
//! transaction and 100 per transaction) next to raw redb inserts of the same bytes into the
//! same engine, measured in the same run, and chain verification throughput.
//!
//! Run: `cargo bench -p contextos-runner --bench records`. Targets: ≥ 10k entries/s batched,
//! overhead ≤ 1.5× raw, verification ≥ 100 MB/s.
//!
//! With `CONTEXTOS_TIKV_TESTSERVER_BIN` set (to the path `kind-tests/tikv-testserver/build.sh`
//! prints) it adds a row for the TiKV backend against tikv-testserver: the same batched appends
//! through tikv-client, gRPC and the TiKV project's in-memory mock store. That measures our client
//! path and protocol overhead only, not TiKV performance (no Raft, no RocksDB, no network).

use std::time::{Duration, Instant};

use contextos_runner::{
    keys::KeyPair,
    records::{
        EmbeddedStore, EntryBody, PinnedDigests, RecordEntry, RecordStore, Recorder, RunStart, StoredEntry,
        TenantId,
        entry::{Hash, ToolResultRecord},
        store::SignedHead,
        verify_entries,
    },
};
use redb::{Database, TableDefinition};
use serde_json::json;

#[cfg(feature = "tikv")]
#[path = "../tests/support/tikv_testserver.rs"]
mod tikv_testserver;

const RAW: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("raw_entries");
const SINGLE_ENTRIES: u64 = 300;
const BATCHED_ENTRIES: u64 = 20_000;
const BATCH: u64 = 100;
/// Entries appended to the TiKV backend (in batches of `BATCH`).
#[cfg(feature = "tikv")]
const TIKV_ENTRIES: u64 = 5_000;

fn body(i: u64) -> EntryBody {
    EntryBody::ToolResult(ToolResultRecord {
        call_id: format!("call-{i}"),
        ok: true,
        output: json!({"status": 200, "items": ["runbook-7", "runbook-12"], "text": "x".repeat(320)}),
        error: None,
        attempts: 1,
        truncated: false,
        cost: None,
        cached: None,
    })
}

/// Encoded entries as the recorder would store them, for the raw baseline.
fn encoded(n: u64) -> Vec<Vec<u8>> {
    let mut prev = None;
    (0..n)
        .map(|seq| {
            let entry = RecordEntry {
                run_id: "raw".into(),
                seq,
                prev,
                at_ms: 1,
                body: body(seq),
                vaulted: None,
            };
            let sealed = StoredEntry::seal(&entry);
            prev = Some(sealed.hash);
            sealed.to_value_bytes()
        })
        .collect()
}

struct Measured {
    entries: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    }
}

fn raw_inserts(db: &Database, values: &[Vec<u8>], batch: u64) -> Measured {
    let started = Instant::now();
    let mut latencies = Vec::new();
    for (chunk_index, chunk) in values.chunks(batch as usize).enumerate() {
        let t = Instant::now();
        let txn = db.begin_write().expect("write txn");
        {
            let mut table = txn.open_table(RAW).expect("table");
            for (i, value) in chunk.iter().enumerate() {
                let seq = chunk_index as u64 * batch + i as u64;
                table
                    .insert(("bench", "raw", seq), value.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
        latencies.push(t.elapsed());
    }
    Measured {
        entries: values.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

async fn recorder_appends<S: RecordStore>(store: &S, run: &str, n: u64, batch: u64) -> Measured {
    let tenant = TenantId::new("bench").expect("tenant");
    let start = RunStart {
        run_id: run.into(),
        session_id: format!("{run}-session"),
        agent: "bench".into(),
        run_context: json!({}),
        pinned: PinnedDigests::default(),
        bundle: None,
    };
    let mut rec = Recorder::start(store, tenant, KeyPair::from_seed([1; 32]), start)
        .await
        .expect("start");
    // Bodies are built before timing starts, as the raw baseline's bytes are.
    let mut bodies = (0..n).map(body);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut i = 0;
    while i < n {
        let t = Instant::now();
        for body in bodies.by_ref().take(batch.min(n - i) as usize) {
            rec.stage(body);
            i += 1;
        }
        rec.flush().await.expect("flush");
        latencies.push(t.elapsed());
    }
    Measured {
        entries: n,
        elapsed: started.elapsed(),
        latencies,
    }
}

fn verification(n: u64) -> (f64, f64) {
    let key = KeyPair::from_seed([2; 32]);
    let tenant = TenantId::new("bench").expect("tenant");
    let mut prev: Option<Hash> = None;
    let entries: Vec<StoredEntry> = (0..n)
        .map(|seq| {
            let entry = RecordEntry {
                run_id: "verify".into(),
                seq,
                prev,
                at_ms: 1,
                body: body(seq),
                vaulted: None,
            };
            let sealed = StoredEntry::seal(&entry);
            prev = Some(sealed.hash);
            sealed
        })
        .collect();
    let last = entries.last().expect("entries");
    let message = SignedHead::message(&tenant, "verify", last.seq, &last.hash);
    let head = SignedHead {
        seq: last.seq,
        hash: last.hash,
        key_id: key.key_id(),
        signature: key.sign_hex(&message),
    };
    let bytes: usize = entries.iter().map(|e| e.bytes.len()).sum();
    let started = Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        verify_entries(&tenant, "verify", &entries, &head, &key.public()).expect("verifies");
    }
    let secs = started.elapsed().as_secs_f64() / rounds as f64;
    (bytes as f64 / secs / 1e6, n as f64 / secs)
}

fn row(label: &str, m: &Measured) {
    println!(
        "  {label:<34} {:>12.0} entries/s   append p50 {:>9.3} ms   p99 {:>9.3} ms",
        m.per_second(),
        m.percentile(0.5).as_secs_f64() * 1e3,
        m.percentile(0.99).as_secs_f64() * 1e3
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let raw_db = Database::create(dir.path().join("raw.redb")).expect("raw db");
    let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
    let size = encoded(1)[0].len();
    println!("records benchmark — embedded store (redb), entries of {size} bytes, same disk, same run");

    let raw_single = raw_inserts(&raw_db, &encoded(SINGLE_ENTRIES), 1);
    let ours_single = runtime.block_on(recorder_appends(&store, "single", SINGLE_ENTRIES, 1));
    let raw_batched = raw_inserts(&raw_db, &encoded(BATCHED_ENTRIES), BATCH);
    let ours_batched = runtime.block_on(recorder_appends(&store, "batched", BATCHED_ENTRIES, BATCH));

    row("raw redb insert, 1 per txn", &raw_single);
    row("recorder append, 1 per txn", &ours_single);
    row(&format!("raw redb insert, {BATCH} per txn"), &raw_batched);
    row(&format!("recorder append, {BATCH} per txn"), &ours_batched);
    println!(
        "  overhead vs raw (time per entry):   single {:.2}x   batched {:.2}x   (target ≤ 1.5x)",
        raw_single.per_second() / ours_single.per_second(),
        raw_batched.per_second() / ours_batched.per_second()
    );
    println!(
        "  batched throughput target ≥ 10000 entries/s: {:.0}",
        ours_batched.per_second()
    );
    let started = Instant::now();
    let encoded_bytes: usize = (0..BATCHED_ENTRIES).map(|i| body(i).encode().len()).sum();
    let encode_us = started.elapsed().as_secs_f64() * 1e6 / BATCHED_ENTRIES as f64;
    println!(
        "  of the recorder's time per entry ({:.1} µs batched), encoding the body canonically takes {encode_us:.1} µs ({encoded_bytes} bytes in all)",
        1e6 / ours_batched.per_second()
    );
    let (mb_per_s, entries_per_s) = verification(BATCHED_ENTRIES);
    println!("  chain verification: {mb_per_s:.0} MB/s ({entries_per_s:.0} entries/s)   (target ≥ 100 MB/s)");
    #[cfg(feature = "tikv")]
    tikv_testserver_row(&runtime, &ours_batched);
}

/// The TiKV backend against tikv-testserver, next to the embedded store's batched row.
#[cfg(feature = "tikv")]
fn tikv_testserver_row(runtime: &tokio::runtime::Runtime, embedded_batched: &Measured) {
    use contextos_runner::records::store::tikv::TikvStore;
    use tikv_testserver::{TESTSERVER_ENV, TestServer};
    let label = "tikv backend via tikv-testserver (protocol overhead only, not TiKV performance)";
    let Ok(bin) = std::env::var(TESTSERVER_ENV) else {
        println!(
            "  {label}: skipped; set {TESTSERVER_ENV}=\"$(bash kind-tests/tikv-testserver/build.sh | tail -n1)\" to add it"
        );
        return;
    };
    let server = TestServer::start(&bin, &[]);
    let measured = runtime.block_on(async {
        let store = TikvStore::connect(&server.pd)
            .await
            .expect("connect to tikv-testserver");
        recorder_appends(&store, "tikv-batched", TIKV_ENTRIES, BATCH).await
    });
    println!("  {label}:");
    row(&format!("recorder append, {BATCH} per txn"), &measured);
    println!(
        "  time per entry vs the embedded store, {BATCH} per txn: {:.1}x",
        embedded_batched.per_second() / measured.per_second()
    );
}
