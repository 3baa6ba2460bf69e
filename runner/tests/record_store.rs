//! RecordStore conformance: one suite, generic over the backend, run on the embedded store
//! always and on TiKV when `CONTEXTOS_TEST_TIKV_PD` names a PD endpoint, or, failing that, on
//! `kind-tests/tikv-testserver` (the TiKV project's mock TiKV behind the real PD and TiKV gRPC
//! services) when `CONTEXTOS_TIKV_TESTSERVER_BIN` names its binary, as `make test` does. Covers
//! append/read/list, fork refusal under racing writers, tenant isolation, checkpoints, blobs,
//! and crash safety (a child process appending in a loop is killed with SIGKILL).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use contextos_runner::{
    keys::KeyPair,
    memory::backend::{Change, Guard, MemoryBackend as _, Write},
    records::{
        EmbeddedStore, EntryBody, Hash, PinnedDigests, RecordStore, Recorder, RunFilter, RunStart,
        StoreError, StoredEntry, TenantId,
        entry::{RecordEntry, Verdict},
        store::{AppendBatch, SignedHead},
        verify_run,
    },
};
use serde_json::json;

#[cfg(feature = "tikv")]
#[path = "support/tikv_testserver.rs"]
mod tikv_testserver;

#[cfg(feature = "tikv")]
const TIKV_ENV: &str = "CONTEXTOS_TEST_TIKV_PD";
const CHILD_STORE_ENV: &str = "CONTEXTOS_CRASH_CHILD_STORE";
const CHILD_RUN_ENV: &str = "CONTEXTOS_CRASH_CHILD_RUN";

fn key() -> KeyPair {
    KeyPair::from_seed([42; 32])
}

/// Ids unique per test run, so a shared TiKV cluster can be reused.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}-{}", nanos, std::process::id())
}

fn tenant(prefix: &str) -> TenantId {
    TenantId::new(unique(prefix)).expect("valid tenant")
}

fn start(run_id: &str, session: &str, agent: &str) -> RunStart {
    RunStart {
        run_id: run_id.into(),
        session_id: session.into(),
        agent: agent.into(),
        run_context: json!({"run_id": run_id, "tenant": "t"}),
        pinned: PinnedDigests {
            context_pack: "sha256:pack".into(),
            policies: vec!["sha256:pol".into()],
            sandbox_profile: None,
        },
        bundle: None,
    }
}

fn verdict(step: u32) -> EntryBody {
    EntryBody::CriticVerdict {
        step,
        verdict: Verdict::Continue,
        reason: format!("step {step} ok"),
        functional_state: json!({"budget": 0.1}),
    }
}

// ---------------------------------------------------------------- the suite

async fn append_read_and_list<S: RecordStore>(store: &S) {
    let t = tenant("arl");
    let run = unique("run");
    let mut rec = Recorder::start(store, t.clone(), key(), start(&run, "sess-1", "agent-a"))
        .await
        .expect("start");
    for step in 0..5 {
        rec.stage(verdict(step));
    }
    rec.flush().await.expect("batched flush");
    rec.record(EntryBody::Completed {
        output: "done".into(),
        validators: vec!["shape".into()],
    })
    .await
    .expect("complete");

    let chain = store.read_chain(&t, &run, 0).await.expect("read");
    assert_eq!(chain.len(), 7, "run_started + 5 verdicts + completed");
    let decoded: Vec<RecordEntry> = chain
        .iter()
        .map(|e| RecordEntry::decode(&e.bytes).expect("decodes"))
        .collect();
    assert!(matches!(decoded[0].body, EntryBody::RunStarted { .. }));
    assert!(matches!(decoded[6].body, EntryBody::Completed { .. }));
    assert_eq!(store.read_chain(&t, &run, 5).await.expect("tail").len(), 2);
    // A page: at most `limit` entries from where it is asked, the chain's end when short.
    let page = store.read_chain_page(&t, &run, 2, 3).await.expect("page");
    assert_eq!(page, chain[2..5]);
    assert_eq!(
        store.read_chain_page(&t, &run, 5, 3).await.expect("last page"),
        chain[5..]
    );
    assert!(
        store
            .read_chain_page(&t, &run, 7, 3)
            .await
            .expect("past the end")
            .is_empty()
    );
    let verified = verify_run(store, &t, &run, &key().public())
        .await
        .expect("verifies");
    assert_eq!(verified.entries, 7);
    // The summary kept beside the head, read without the entries: what the chain says.
    let kept = store.run_summary(&t, &run).await.expect("summary").expect("kept");
    assert_eq!(
        (kept.outcome.as_str(), kept.entries, kept.head),
        ("completed", 7, verified.head)
    );
    assert_eq!(store.run_summary(&t, "no-such-run").await.expect("summary"), None);
    assert_eq!(
        store.run_summary(&tenant("other"), &run).await.expect("summary"),
        None,
        "another tenant's"
    );

    // A second run of another agent, started later.
    let run2 = unique("run");
    tokio::time::sleep(Duration::from_millis(3)).await; // distinct start timestamps, not synchronization
    Recorder::start(store, t.clone(), key(), start(&run2, "sess-2", "agent-b"))
        .await
        .expect("start 2");
    let all = store.list_runs(&t, &RunFilter::default()).await.expect("list");
    assert_eq!(
        all.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        vec![run2.as_str(), run.as_str()],
        "newest first"
    );
    assert_eq!(all[1].outcome, "completed");
    assert_eq!(all[1].entries, 7);
    let by_agent = store
        .list_runs(
            &t,
            &RunFilter {
                agent: Some("agent-a".into()),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(by_agent.len(), 1);
    let limited = store
        .list_runs(
            &t,
            &RunFilter {
                limit: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(limited[0].run_id, run2);
    let future = store
        .list_runs(
            &t,
            &RunFilter {
                since_ms: Some(all[0].started_at_ms + 1),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert!(future.is_empty());
    let window = RunFilter {
        since_ms: Some(all[1].started_at_ms),
        until_ms: Some(all[0].started_at_ms),
        ..Default::default()
    };
    assert_eq!(store.list_runs(&t, &window).await.expect("list").len(), 1);
}

fn raw_batch(t: &TenantId, run: &str, prev: &SignedHead, marker: &str) -> AppendBatch {
    let entry = RecordEntry {
        run_id: run.into(),
        seq: prev.seq + 1,
        prev: Some(prev.hash),
        at_ms: 1,
        body: EntryBody::Failed {
            reason: marker.into(),
            message: String::new(),
        },
        vaulted: None,
    };
    sealed_batch(t, &entry, 0)
}

/// A batch of `entry` alone, extending the entry it names, for a run started at `started_at_ms`.
fn sealed_batch(t: &TenantId, entry: &RecordEntry, started_at_ms: i64) -> AppendBatch {
    let run = entry.run_id.as_str();
    let sealed = StoredEntry::seal(entry);
    let k = key();
    let message = SignedHead::message(t, run, sealed.seq, &sealed.hash);
    let head = SignedHead {
        seq: sealed.seq,
        hash: sealed.hash,
        key_id: k.key_id(),
        signature: k.sign_hex(&message),
    };
    let summary = contextos_runner::records::RunSummary {
        run_id: run.into(),
        session_id: "s".into(),
        agent: "a".into(),
        started_at_ms,
        outcome: "failed".into(),
        entries: sealed.seq + 1,
        head: sealed.hash,
        bytes: 0,
    };
    AppendBatch {
        run_id: run.into(),
        expected_head: entry.prev,
        entries: vec![sealed],
        head,
        summary,
        checkpoint: None,
    }
}

async fn fork_refusal<S: RecordStore>(store: &S) {
    let t = tenant("fork");
    let run = unique("run");
    Recorder::start(store, t.clone(), key(), start(&run, "s", "a"))
        .await
        .expect("start");
    let head = store.head(&t, &run).await.expect("head").expect("exists");
    for _ in 0..5 {
        let current = store.head(&t, &run).await.expect("head").expect("exists");
        let (a, b) = tokio::join!(
            store.append(&t, raw_batch(&t, &run, &current, "writer-a")),
            store.append(&t, raw_batch(&t, &run, &current, "writer-b")),
        );
        let wins = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(
            wins, 1,
            "exactly one racing writer may extend the head: {a:?} / {b:?}"
        );
        let loser = if a.is_err() { a } else { b };
        assert!(
            matches!(loser, Err(StoreError::HeadMoved { .. })),
            "the loser is told the head moved: {loser:?}"
        );
    }
    // A stale writer is refused too.
    assert!(matches!(
        store.append(&t, raw_batch(&t, &run, &head, "stale")).await,
        Err(StoreError::HeadMoved { .. })
    ));
    verify_run(store, &t, &run, &key().public())
        .await
        .expect("chain still verifies");

    // Two recorders on one run (runner and gateway) interleave into one linear chain.
    let mut one = Recorder::resume(store, t.clone(), key(), &run)
        .await
        .expect("resume");
    let mut two = Recorder::resume(store, t.clone(), key(), &run)
        .await
        .expect("resume");
    let before = store.head(&t, &run).await.expect("head").expect("exists").seq;
    let (r1, r2) = tokio::join!(
        async {
            for step in 0..20 {
                one.record(verdict(step)).await?;
            }
            Ok::<_, contextos_runner::records::RecordError>(())
        },
        async {
            for step in 100..120 {
                two.record(verdict(step)).await?;
            }
            Ok::<_, contextos_runner::records::RecordError>(())
        },
    );
    r1.expect("writer one");
    r2.expect("writer two");
    let after = store.head(&t, &run).await.expect("head").expect("exists").seq;
    assert_eq!(
        after - before,
        40,
        "every entry of both writers landed exactly once"
    );
    verify_run(store, &t, &run, &key().public())
        .await
        .expect("interleaved chain verifies");

    // A runner told the head by the gateway moves to it without reading. Told a head past the
    // record's end (the gateway answered and then lost what it wrote), its next append is
    // refused and it stops: nothing is chained past entries it heard of that the record lost.
    let mut runner = Recorder::resume(store, t.clone(), key(), &run)
        .await
        .expect("resume");
    let mut gateway = Recorder::resume(store, t.clone(), key(), &run)
        .await
        .expect("resume");
    gateway.record(verdict(500)).await.expect("gateway writes");
    let told = store.head(&t, &run).await.expect("head").expect("exists");
    assert_eq!(told.hash, gateway.head().expect("head").1);
    runner.follow(Some((told.seq, told.hash))).await.expect("follow");
    runner
        .record(verdict(501))
        .await
        .expect("appends on the head it was told");
    gateway.sync().await.expect("sync");
    gateway.record(verdict(502)).await.expect("gateway writes");
    runner
        .follow(Some((told.seq + 40, Hash::of(b"a head that never was"))))
        .await
        .expect("follow");
    match runner.record(verdict(503)).await {
        Err(contextos_runner::records::RecordError::Lost { known, found, .. }) => {
            assert_eq!((known, found), (told.seq + 40, told.seq + 2));
        }
        other => panic!("a head past the record's end must stop the writer, got {other:?}"),
    }
    let mut resumed = Recorder::resume(store, t.clone(), key(), &run)
        .await
        .expect("resume");
    resumed
        .record(verdict(503))
        .await
        .expect("a writer that read the record writes on it");
    let end = store.head(&t, &run).await.expect("head").expect("exists");
    assert_eq!(end.seq, told.seq + 3, "each of the three entries landed once");
    verify_run(store, &t, &run, &key().public())
        .await
        .expect("the chain verifies after a wrong head");
}

async fn tenant_isolation<S: RecordStore>(store: &S) {
    let a = tenant("team-a");
    let b = tenant("team-b");
    let run = unique("run");
    let mut rec = Recorder::start(store, a.clone(), key(), start(&run, "shared-session", "agent"))
        .await
        .expect("start");
    rec.record(EntryBody::Checkpoint {
        step: 1,
        state: json!({}),
    })
    .await
    .expect("checkpoint");
    let blob = store
        .put_blob(&a, b"secret of team a".to_vec())
        .await
        .expect("blob");

    assert!(
        store.head(&b, &run).await.expect("head").is_none(),
        "another tenant cannot see the head"
    );
    assert!(
        store.read_chain(&b, &run, 0).await.expect("read").is_empty(),
        "nor the entries"
    );
    assert!(
        store
            .list_runs(&b, &RunFilter::default())
            .await
            .expect("list")
            .is_empty(),
        "nor the run list"
    );
    assert!(
        store.get_blob(&b, &blob).await.expect("get").is_none(),
        "nor blobs"
    );
    assert!(
        store
            .latest_checkpoint(&b, "shared-session")
            .await
            .expect("cp")
            .is_none(),
        "nor checkpoints"
    );
    assert!(verify_run(store, &b, &run, &key().public()).await.is_err());
    // A signature made for tenant a does not verify if the chain is presented as tenant b's.
    let head = store.head(&a, &run).await.expect("head").expect("exists");
    let chain = store.read_chain(&a, &run, 0).await.expect("read");
    assert!(contextos_runner::records::verify_entries(&b, &run, &chain, &head, &key().public()).is_err());
    assert!(TenantId::new("../etc").is_err() && TenantId::new("A").is_err() && TenantId::new("").is_err());
}

async fn checkpoints<S: RecordStore>(store: &S) {
    let t = tenant("cp");
    let run = unique("run");
    let mut rec = Recorder::start(store, t.clone(), key(), start(&run, "sess-cp", "agent"))
        .await
        .expect("start");
    assert!(
        store
            .latest_checkpoint(&t, "sess-cp")
            .await
            .expect("cp")
            .is_none()
    );
    for step in 1..=3 {
        rec.record(verdict(step)).await.expect("verdict");
        rec.record(EntryBody::Checkpoint {
            step,
            state: json!({"step": step}),
        })
        .await
        .expect("checkpoint");
    }
    let cp = store
        .latest_checkpoint(&t, "sess-cp")
        .await
        .expect("cp")
        .expect("exists");
    assert_eq!((cp.step, cp.run_id.as_str(), cp.seq), (3, run.as_str(), 6));
    let chain = store.read_chain(&t, &run, cp.seq).await.expect("read");
    assert_eq!(chain[0].hash, cp.entry_hash, "the checkpoint points at its entry");
    // A resumed run (second attempt) of the same session moves the checkpoint.
    let run2 = unique("run");
    let mut rec2 = Recorder::start(store, t.clone(), key(), start(&run2, "sess-cp", "agent"))
        .await
        .expect("start 2");
    rec2.record(EntryBody::Checkpoint {
        step: 4,
        state: json!({}),
    })
    .await
    .expect("checkpoint");
    let cp = store
        .latest_checkpoint(&t, "sess-cp")
        .await
        .expect("cp")
        .expect("exists");
    assert_eq!((cp.step, cp.run_id.as_str()), (4, run2.as_str()));
}

async fn blobs<S: RecordStore>(store: &S) {
    let t = tenant("blob");
    let run = unique("run");
    let mut rec = Recorder::start(store, t.clone(), key(), start(&run, "s", "a"))
        .await
        .expect("start")
        .with_blob_threshold(1024);
    let big = "x".repeat(50_000);
    rec.record(EntryBody::Completed {
        output: big.clone(),
        validators: vec![],
    })
    .await
    .expect("big entry");
    let chain = store.read_chain(&t, &run, 1).await.expect("read");
    assert!(
        chain[0].bytes.len() < 1024,
        "the large body is stored out of line"
    );
    let EntryBody::Blob {
        blob,
        size,
        body_type,
    } = RecordEntry::decode(&chain[0].bytes).expect("decodes").body
    else {
        panic!("expected a blob reference");
    };
    assert_eq!(body_type, "completed");
    let bytes = store.get_blob(&t, &blob).await.expect("get").expect("present");
    assert_eq!(bytes.len() as u64, size);
    assert!(String::from_utf8_lossy(&bytes).contains(&big));
    assert_eq!(
        store.put_blob(&t, bytes.clone()).await.expect("again"),
        blob,
        "content addressed and idempotent"
    );
    verify_run(store, &t, &run, &key().public())
        .await
        .expect("verifies with its blob");
    assert!(store.list_runs(&t, &RunFilter::default()).await.expect("list")[0].outcome == "completed");
    assert_eq!(
        store.get_blob(&t, &Hash::of(b"never stored")).await.expect("get"),
        None
    );
}

/// Runs the child appender against `store_spec`, kills it with SIGKILL after `kill_after`
/// acknowledged entries, and returns what it acknowledged as (seq, hash).
fn run_child_until_killed(store_spec: &str, run_id: &str, kill_after: usize) -> Vec<(u64, String)> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_STORE_ENV, store_spec)
        .env(CHILD_RUN_ENV, run_id)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (seq, hash) = rest.split_once(' ').expect("ACK <seq> <hash>");
            acked.push((seq.parse().expect("seq"), hash.to_owned()));
            if acked.len() >= kill_after {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("kill");
                break;
            }
        }
    }
    let status = child.wait().expect("wait");
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
    acked
}

async fn crash_safety<S: RecordStore>(store_spec: &str, reopen: impl AsyncFn() -> S) {
    let run = unique("crash");
    let t = TenantId::new("crash-tests").expect("tenant");
    let mut all_acked = Vec::new();
    for kill_after in [37, 121, 260] {
        all_acked.extend(run_child_until_killed(store_spec, &run, kill_after));
        let store = reopen().await;
        let chain = store.read_chain(&t, &run, 0).await.expect("read after crash");
        for (seq, hash) in &all_acked {
            let entry = chain
                .get(*seq as usize)
                .unwrap_or_else(|| panic!("acknowledged entry {seq} lost in the crash"));
            assert_eq!(&entry.hash.to_hex(), hash, "acknowledged entry {seq} changed");
        }
        verify_run(&store, &t, &run, &key().public())
            .await
            .expect("after SIGKILL the chain verifies: nothing partial");
    }
}

/// The crash-safety child: appends to a run in small batches forever, printing each acknowledged
/// entry. Only meaningful when started by `crash_safety`; ignored in normal runs.
#[tokio::test]
#[ignore = "child process of the crash-safety tests; started by them with --ignored --exact"]
async fn crash_child_appends_until_killed() {
    let (Ok(spec), Ok(run)) = (std::env::var(CHILD_STORE_ENV), std::env::var(CHILD_RUN_ENV)) else {
        panic!("run only by the crash-safety tests ({CHILD_STORE_ENV} unset)");
    };
    let t = TenantId::new("crash-tests").expect("tenant");
    if let Some(path) = spec.strip_prefix("embedded:") {
        let store = EmbeddedStore::open(std::path::Path::new(path)).expect("open");
        // A blob with every batch: the store's log fills up and is folded into the database
        // several times before the child is killed, so the kill also lands around folds.
        child_loop(&store, t, &run, 1 << 20).await;
    } else if let Some(pd) = spec.strip_prefix("tikv:") {
        #[cfg(feature = "tikv")]
        {
            let store = contextos_runner::records::store::tikv::TikvStore::connect(pd)
                .await
                .expect("connect");
            child_loop(&store, t, &run, 0).await;
        }
        #[cfg(not(feature = "tikv"))]
        panic!("built without the tikv feature; cannot reach {pd}");
    }
}

async fn child_loop<S: RecordStore>(store: &S, t: TenantId, run: &str, blob_bytes: usize) {
    let mut rec = match Recorder::resume(store, t.clone(), key(), run).await {
        Ok(rec) => rec,
        Err(_) => Recorder::start(store, t, key(), start(run, "crash-session", "agent"))
            .await
            .expect("start"),
    };
    let mut step = 0u32;
    loop {
        let batch = 1 + (step % 4);
        if blob_bytes > 0 {
            let mut blob = step.to_le_bytes().to_vec();
            blob.resize(blob_bytes, 7);
            store.put_blob(rec.tenant(), blob).await.expect("blob");
        }
        for _ in 0..batch {
            step += 1;
            rec.stage(verdict(step));
        }
        let head = rec.flush().await.expect("append");
        // Acknowledge every entry of the batch that just became durable.
        let chain = store
            .read_chain(rec.tenant(), run, head.seq + 1 - u64::from(batch))
            .await
            .expect("read back");
        for entry in chain {
            println!("ACK {} {}", entry.seq, entry.hash.to_hex());
        }
    }
}

/// A memory write's changes, removals included, survive a crash that leaves the store's log to
/// be replayed: the log replays what each write left, in order, so an older row written
/// through the log never comes back over a newer change (which a durable database commit
/// outside the log would not stop).
#[tokio::test]
async fn embedded_memory_writes_survive_sigkill_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("records.redb");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "crash_child_writes_memory_then_waits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_STORE_ENV, format!("embedded:{}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    // (The test harness may print the test's name on the same line first.)
    let written = BufReader::new(stdout)
        .lines()
        .any(|line| line.expect("child output").ends_with("WRITTEN"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(!child.wait().expect("wait").success(), "the child was killed");
    assert!(written, "the child wrote its rows before it was killed");
    let store = EmbeddedStore::open(&path).expect("reopen after crash");
    let t = TenantId::new("crash-tests").expect("tenant");
    let got = store
        .memory_get(&t, vec![MEMORY_REMOVED.to_vec(), MEMORY_COUNTED.to_vec()])
        .await
        .expect("read");
    assert_eq!(
        got[0], None,
        "a removed row stays removed after the log is replayed"
    );
    assert_eq!(
        got[1],
        Some(2u64.to_be_bytes().to_vec()),
        "a counted row keeps its last count"
    );
}

const MEMORY_REMOVED: &[u8] = b"cx/crash-tests/m/removed";
const MEMORY_COUNTED: &[u8] = b"cx/crash-tests/m/counted";

/// The child of `embedded_memory_writes_survive_sigkill_in_order`: writes a row to be flushed
/// with the next write, counts another, removes the first and counts again — each durable —
/// then says so and waits to be killed, never closing the store (a close folds the log).
#[tokio::test]
#[ignore = "child process of a crash-safety test; started by it with --ignored --exact"]
async fn crash_child_writes_memory_then_waits() {
    let Ok(spec) = std::env::var(CHILD_STORE_ENV) else {
        panic!("run only by the crash-safety tests ({CHILD_STORE_ENV} unset)");
    };
    let path = spec.strip_prefix("embedded:").expect("an embedded store");
    let store = EmbeddedStore::open(std::path::Path::new(path)).expect("open");
    let t = TenantId::new("crash-tests").expect("tenant");
    let write = |change| Write {
        guard: Guard::All(Vec::new()),
        changes: vec![change],
    };
    store
        .memory_write_unflushed(
            &t,
            vec![write(Change::Put(MEMORY_REMOVED.to_vec(), b"old".to_vec()))],
        )
        .await
        .expect("put");
    for change in [
        Change::Count(MEMORY_COUNTED.to_vec(), 1),
        Change::Delete(MEMORY_REMOVED.to_vec()),
        Change::Count(MEMORY_COUNTED.to_vec(), 1),
    ] {
        store.memory_write(&t, vec![write(change)]).await.expect("write");
    }
    println!("WRITTEN");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

// ---------------------------------------------------------------- backends

/// What each run keeps — what its writer counted before, and every batch it wrote since — is
/// kept with its summary and summed per tenant (a tenant's store bound reads it), never lowered
/// by a later count of less.
async fn recorded_bytes<S: RecordStore>(store: &S) {
    let (a, b) = (tenant("bytes-a"), tenant("bytes-b"));
    let mut expected = std::collections::HashMap::<&TenantId, u64>::new();
    for (t, run, counted) in [(&a, "run-1", 1_000), (&a, "run-2", 500), (&b, "run-1", 7)] {
        let mut rec = Recorder::begin(store, t.clone(), key(), start(run, "s", "agent")).expect("begin");
        rec.count_stored_bytes(counted);
        rec.record(verdict(1)).await.expect("written");
        rec.count_stored_bytes(1);
        rec.record(verdict(2)).await.expect("written");
        let chain: u64 = store
            .read_chain(t, run, 0)
            .await
            .expect("read")
            .iter()
            .map(|e| e.bytes.len() as u64)
            .sum();
        *expected.entry(t).or_default() += counted + chain;
    }
    assert_eq!(store.recorded_bytes(&a).await.expect("a"), expected[&a]);
    assert_eq!(store.recorded_bytes(&b).await.expect("b"), expected[&b]);
    assert_eq!(
        store.recorded_bytes(&tenant("bytes-none")).await.expect("none"),
        0
    );
}

/// Seven runs of two agents, listed newest first whatever the backend reads at a time: by
/// agent with a limit, within a window, and not at all in a window that ends before it starts.
async fn listing_many_runs<S: RecordStore>(store: &S) {
    let t = tenant("many");
    let mut runs = Vec::new();
    for i in 0..7 {
        let run = unique(&format!("run{i}"));
        let agent = if i % 2 == 0 { "even" } else { "odd" };
        let mut rec =
            Recorder::begin(store, t.clone(), key(), start(&run, &format!("s{i}"), agent)).expect("begin");
        rec.record(verdict(1)).await.expect("written");
        runs.push(run);
        tokio::time::sleep(Duration::from_millis(3)).await; // distinct start times, not synchronization
    }
    let ids = |listed: Vec<contextos_runner::records::RunSummary>| {
        listed.into_iter().map(|r| r.run_id).collect::<Vec<_>>()
    };
    let all = store.list_runs(&t, &RunFilter::default()).await.expect("list");
    let times: Vec<i64> = all.iter().map(|r| r.started_at_ms).collect();
    assert_eq!(
        ids(all),
        runs.iter().rev().cloned().collect::<Vec<_>>(),
        "newest first"
    );
    let odd = RunFilter {
        agent: Some("odd".into()),
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_runs(&t, &odd).await.expect("list")),
        vec![runs[5].clone(), runs[3].clone()],
        "the newest two of one agent"
    );
    // times[k] is run 6 - k's: from run 2's start to run 5's (run 5 left out).
    let window = RunFilter {
        since_ms: Some(times[4]),
        until_ms: Some(times[1]),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_runs(&t, &window).await.expect("list")),
        vec![runs[4].clone(), runs[3].clone(), runs[2].clone()]
    );
    let inverted = RunFilter {
        since_ms: Some(times[1]),
        until_ms: Some(times[4]),
        ..Default::default()
    };
    assert!(store.list_runs(&t, &inverted).await.expect("list").is_empty());
    let none = RunFilter {
        agent: Some("nobody".into()),
        ..Default::default()
    };
    assert!(store.list_runs(&t, &none).await.expect("list").is_empty());

    // Runs that started in one millisecond, listed after a place among them (where a page of
    // a listing read a page at a time ended): those whose id sorts before it, then the older.
    let tied = tenant("tied");
    for (run, started_at_ms) in [
        ("tie-a", 5_000),
        ("tie-b", 5_000),
        ("tie-c", 5_000),
        ("tie-d", 5_000),
        ("older", 4_000),
    ] {
        store
            .append(&tied, first_batch(&tied, run, started_at_ms))
            .await
            .expect("appended");
    }
    let after = |started_at_ms: i64, run: &str| {
        Some(contextos_runner::records::RunCursor {
            started_at_ms,
            run_id: run.into(),
        })
    };
    let listed = async |filter: RunFilter| ids(store.list_runs(&tied, &filter).await.expect("list"));
    assert_eq!(
        listed(RunFilter::default()).await,
        ["tie-d", "tie-c", "tie-b", "tie-a", "older"]
    );
    let cases = [
        (
            RunFilter {
                after: after(5_000, "tie-c"),
                ..Default::default()
            },
            vec!["tie-b", "tie-a", "older"],
        ),
        (
            RunFilter {
                after: after(5_000, "tie-c"),
                limit: Some(1),
                ..Default::default()
            },
            vec!["tie-b"],
        ),
        (
            RunFilter {
                after: after(4_000, "older"),
                ..Default::default()
            },
            vec![],
        ),
        // The window's end, where it comes before the place.
        (
            RunFilter {
                after: after(5_000, "tie-c"),
                until_ms: Some(4_500),
                ..Default::default()
            },
            vec!["older"],
        ),
        (
            RunFilter {
                after: after(6_000, "zzz"),
                since_ms: Some(4_500),
                ..Default::default()
            },
            vec!["tie-d", "tie-c", "tie-b", "tie-a"],
        ),
        (
            RunFilter {
                after: after(5_000, "tie-b"),
                since_ms: Some(4_500),
                ..Default::default()
            },
            vec!["tie-a"],
        ),
    ];
    for (filter, expected) in cases {
        assert_eq!(listed(filter.clone()).await, expected, "{filter:?}");
    }
}

/// The first batch of run `run`, started at `started_at_ms`.
fn first_batch(t: &TenantId, run: &str, started_at_ms: i64) -> AppendBatch {
    let entry = RecordEntry {
        run_id: run.into(),
        seq: 0,
        prev: None,
        at_ms: started_at_ms,
        body: EntryBody::Failed {
            reason: "tied".into(),
            message: String::new(),
        },
        vaulted: None,
    };
    sealed_batch(t, &entry, started_at_ms)
}

/// The whole suite on one store.
async fn conformance<S: RecordStore>(store: &S) {
    append_read_and_list(store).await;
    listing_many_runs(store).await;
    fork_refusal(store).await;
    tenant_isolation(store).await;
    recorded_bytes(store).await;
    checkpoints(store).await;
    blobs(store).await;
}

#[tokio::test]
async fn embedded_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("open");
    conformance(&store).await;
}

/// The same suite on a multi-threaded runtime, where the store works in place on the calling
/// worker (as in the gateway service) instead of on a blocking thread; and writers racing from
/// tasks on both workers, of which exactly one extends the head each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_conformance_suite_on_a_multi_threaded_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("open");
    conformance(&store).await;

    let t = tenant("race");
    let run = unique("run");
    Recorder::start(&store, t.clone(), key(), start(&run, "s", "a"))
        .await
        .expect("start");
    let started = store.head(&t, &run).await.expect("head").expect("exists").seq;
    for round in 0..20 {
        let current = store.head(&t, &run).await.expect("head").expect("exists");
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let (store, t) = (store.clone(), t.clone());
                let batch = raw_batch(&t, &run, &current, &format!("round-{round}-writer-{writer}"));
                tokio::spawn(async move { store.append(&t, batch).await })
            })
            .collect();
        let mut wins = 0;
        for writer in writers {
            match writer.await.expect("writer task") {
                Ok(()) => wins += 1,
                Err(StoreError::HeadMoved { .. }) => {}
                Err(other) => panic!("a losing writer is told the head moved, got {other:?}"),
            }
        }
        assert_eq!(
            wins, 1,
            "round {round}: exactly one racing writer extends the head"
        );
    }
    assert_eq!(
        store.head(&t, &run).await.expect("head").expect("exists").seq,
        started + 20,
        "one entry a round"
    );
    verify_run(&store, &t, &run, &key().public())
        .await
        .expect("the raced chain verifies");
}

#[tokio::test]
async fn scratch_store_passes_the_conformance_suite() {
    let store = contextos_runner::records::ScratchStore::new();
    conformance(&store).await;
}

#[tokio::test]
async fn embedded_store_survives_sigkill_mid_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("records.redb");
    let spec = format!("embedded:{}", path.display());
    crash_safety(&spec, async || {
        EmbeddedStore::open(&path).expect("reopen after crash")
    })
    .await;
}

#[cfg(feature = "tikv")]
#[tokio::test]
async fn tikv_store_passes_the_conformance_suite() {
    use contextos_runner::records::store::tikv::TikvStore;
    use std::io::Write as _;
    use tikv_testserver::{TESTSERVER_ENV, TestServer};
    // A real cluster if one is named; otherwise the test server if it was built. The server
    // lives until the end of the test (dropping it stops it).
    let (pd, _server) = match (std::env::var(TIKV_ENV), std::env::var(TESTSERVER_ENV)) {
        (Ok(pd), _) => (pd, None),
        (Err(_), Ok(bin)) => {
            // Two regions, split inside the crash-safety tenant between the entries (`e/`) and
            // the head, summary and time index (`h/`, `r/`, `t/`): every crash-child append is
            // then a two-region transaction, and the locks a SIGKILL leaves behind span regions.
            let server = TestServer::start(&bin, &["-split".into(), "cx/crash-tests/f".into()]);
            (server.pd.clone(), Some(server))
        }
        (Err(_), Err(_)) => {
            // Written past the test harness's output capture so the skip is visible in every run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP tikv_store_passes_the_conformance_suite: neither {TIKV_ENV} (a PD address, host:port, of a TiKV cluster) nor {TESTSERVER_ENV} (a built kind-tests/tikv-testserver; `make test` sets it) is set"
            );
            return;
        }
    };
    let store = TikvStore::connect(&pd).await.expect("connect to PD");
    conformance(&store).await;
    // Listings and the bytes a tenant keeps read a page at a time: with pages of two, every
    // listing above crosses page boundaries.
    let paged = TikvStore::connect(&pd)
        .await
        .expect("connect to PD")
        .with_scan_page(2);
    append_read_and_list(&paged).await;
    listing_many_runs(&paged).await;
    recorded_bytes(&paged).await;
    let spec = format!("tikv:{pd}");
    crash_safety(&spec, async || TikvStore::connect(&pd).await.expect("reconnect")).await;
}

/// Region boundaries inside one run's chain and between a tenant's entries and its head: appends
/// become multi-region transactions and chain reads cross regions. Runs on tikv-testserver only,
/// which can be told where to split (on a real cluster, regions split by size).
#[cfg(feature = "tikv")]
#[tokio::test]
async fn tikv_store_works_across_region_boundaries() {
    use contextos_runner::records::store::tikv::TikvStore;
    use std::io::Write as _;
    use tikv_testserver::{TESTSERVER_ENV, TestServer};
    let Ok(bin) = std::env::var(TESTSERVER_ENV) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP tikv_store_works_across_region_boundaries: {TESTSERVER_ENV} (a built kind-tests/tikv-testserver; `make test` sets it) is not set"
        );
        return;
    };
    let (tenant_id, run) = ("regions", "run-1");
    // The backend's key layout: entries are `cx/<tenant>/e/<run>/<seq as 8 big-endian bytes>`,
    // heads `cx/<tenant>/h/<run>`.
    let entry_key = |seq: u64| {
        let mut key = format!("cx/{tenant_id}/e/{run}/").into_bytes();
        key.extend_from_slice(&seq.to_be_bytes());
        key
    };
    let splits = [
        entry_key(100),
        entry_key(200),
        format!("cx/{tenant_id}/f").into_bytes(),
    ];
    let mut args = Vec::new();
    for split in &splits {
        // The server takes split keys with Go string escapes.
        let escaped: String = split.iter().map(|b| format!("\\x{b:02x}")).collect();
        args.extend(["-split".to_owned(), escaped]);
    }
    let server = TestServer::start(&bin, &args);
    for split in &splits {
        let line = format!("region boundary at raw key {}", hex::encode(split));
        assert!(
            server.wait_for_stderr(&line, Duration::from_secs(5)),
            "the server split the key space at {split:?}: {}",
            server.stderr_text()
        );
    }
    let store = TikvStore::connect(&server.pd).await.expect("connect to PD");
    let t = TenantId::new(tenant_id).expect("tenant");
    let mut rec = Recorder::start(&store, t.clone(), key(), start(run, "sess", "agent"))
        .await
        .expect("start");
    // Batches of 32 from seq 1: several batches straddle seq 100 and 200.
    for chunk in (1..=300u32).collect::<Vec<_>>().chunks(32) {
        for step in chunk {
            rec.stage(verdict(*step));
        }
        rec.flush().await.expect("multi-region append");
    }
    let chain = store.read_chain(&t, run, 0).await.expect("read across regions");
    assert_eq!(
        chain.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..=300).collect::<Vec<_>>(),
        "one scan over three regions returns every entry once, in order"
    );
    let tail = store
        .read_chain(&t, run, 150)
        .await
        .expect("read from the middle");
    assert_eq!((tail.len(), tail[0].seq), (151, 150));
    // A page across a region boundary holds exactly what was asked for.
    let page = store
        .read_chain_page(&t, run, 95, 10)
        .await
        .expect("page across regions");
    assert_eq!(page, chain[95..105]);
    let verified = verify_run(&store, &t, run, &key().public())
        .await
        .expect("verifies");
    assert_eq!(verified.entries, 301);
    let runs = store.list_runs(&t, &RunFilter::default()).await.expect("list");
    assert_eq!((runs.len(), runs[0].entries), (1, 301));
}

/// The gateway keeps tools away from the TiKV nodes behind PD: it asks PD where they are. Against
/// tikv-testserver, PD names the node the records are served from (it accepts connections); a PD
/// that does not answer is an error naming it.
#[cfg(feature = "tikv")]
#[tokio::test]
async fn pd_names_the_tikv_nodes_tools_must_never_reach() {
    use contextos_runner::records::store::pd_stores::store_addresses;
    use std::io::Write as _;
    use tikv_testserver::{TESTSERVER_ENV, TestServer};
    let Ok(bin) = std::env::var(TESTSERVER_ENV) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP pd_names_the_tikv_nodes_tools_must_never_reach: {TESTSERVER_ENV} (a built kind-tests/tikv-testserver; `make test` sets it) is not set"
        );
        return;
    };
    let server = TestServer::start(&bin, &[]);
    let nodes = store_addresses(&server.pd).await.expect("PD lists its stores");
    assert!(!nodes.is_empty(), "PD named no TiKV node");
    for node in &nodes {
        tokio::net::TcpStream::connect(node.as_str())
            .await
            .unwrap_or_else(|e| panic!("TiKV node {node} named by PD does not accept connections: {e}"));
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let nobody = closed.local_addr().expect("address").to_string();
    drop(closed);
    let error = store_addresses(&nobody).await.expect_err("nothing listens there");
    assert!(error.to_string().contains(&nobody), "{error}");
}
