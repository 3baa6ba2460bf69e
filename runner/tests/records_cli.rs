//! `contextos records` on records written by the library: list, show, verify (including a
//! tampered store) and export.

use std::{path::Path, process::Command};

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
};
use contextos_runner::{
    keys::KeyPair,
    records::{
        EmbeddedStore, EntryBody, PinnedDigests, Recorder, RunStart, TenantId,
        entry::{PolicyDecisionRecord, ToolCallRecord, ToolResultRecord},
    },
};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde_json::json;

/// The embedded store's entries table, opened directly to simulate tampering on disk.
const ENTRIES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("entries");

async fn write_run(data_dir: &Path) {
    let key = KeyPair::load_or_create(&data_dir.join("keys/signing.key")).expect("key");
    let store = EmbeddedStore::open(&data_dir.join("records.redb")).expect("store");
    let tenant = TenantId::new("shop").expect("tenant");
    let start = RunStart {
        run_id: "run-checkout".into(),
        session_id: "checkout-5xx".into(),
        agent: "oncall-assistant".into(),
        run_context: json!({"tenant_id": "shop"}),
        pinned: PinnedDigests {
            context_pack: "sha256:aaaa".into(),
            policies: vec!["sha256:bbbb".into()],
            sandbox_profile: None,
        },
        bundle: None,
    };
    let mut rec = Recorder::start(&store, tenant, key, start)
        .await
        .expect("start")
        .with_blob_threshold(2048);
    rec.stage(EntryBody::ToolCallRequested(ToolCallRecord {
        call_id: "c1".into(),
        tool: "delete_namespace".into(),
        risk: ToolRisk::Destructive,
        kind: ToolKind::Act,
        arguments: json!({"namespace": "checkout-canary"}),
        idempotency_key: "k1".into(),
        call_hash: "ab".repeat(32),
    }));
    rec.stage(EntryBody::PolicyDecision(PolicyDecisionRecord {
        call_id: "c1".into(),
        effect: PolicyEffect::Deny,
        enforced: PolicyEffect::Deny,
        rule: "oncall-guardrails/no-namespace-deletion".into(),
        reason: "Deleting namespaces is never done by an agent".into(),
        dry_run: false,
    }));
    rec.stage(EntryBody::ToolResult(ToolResultRecord {
        call_id: "c2".into(),
        ok: true,
        output: json!({"log": "z".repeat(5000)}),
        error: None,
        attempts: 1,
        truncated: false,
        cost: None,
        cached: None,
    }));
    rec.stage(EntryBody::DeadLettered {
        call_id: "c3".into(),
        tool: "post_status_update".into(),
        idempotency_key: "k3".into(),
        attempts: 3,
        // A hostile tool's answer: terminal commands that would erase the line above and
        // print something else.
        error: "the tool answered HTTP 503: overloaded\u{1b}[1A\u{1b}[2Kall good".into(),
    });
    rec.stage(EntryBody::Completed {
        output: "{\"resolved\": true}".into(),
        validators: vec!["summary-shape".into()],
    });
    rec.flush().await.expect("flush");
}

fn contextos(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_contextos"))
        .args(args)
        .env("CONTEXTOS_DATA_DIR", data_dir)
        .env("CONTEXTOS_TENANT", "shop")
        .output()
        .expect("run contextos");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn records_cli_lists_shows_verifies_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_run(dir.path()).await;

    let (ok, out, err) = contextos(dir.path(), &["records", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("run-checkout") && out.contains("oncall-assistant") && out.contains("completed"),
        "{out}"
    );

    let (ok, out, err) = contextos(dir.path(), &["records", "show", "run-checkout"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("deny by oncall-guardrails/no-namespace-deletion: Deleting namespaces"),
        "{out}"
    );
    assert!(
        out.contains("asked to call delete_namespace [destructive/act]"),
        "{out}"
    );
    assert!(
        out.contains("tool_result"),
        "the blob-stored result is shown resolved: {out}"
    );

    let (ok, out, err) = contextos(dir.path(), &["records", "verify", "run-checkout"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("run run-checkout: OK — 6 entries"), "{out}");

    let (ok, out, err) = contextos(dir.path(), &["records", "dead-letters"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("run run-checkout entry #4: post_status_update (call c3, idempotency key k3) failed after 3 attempt(s)"),
        "{out}"
    );
    assert!(
        out.contains("overloaded\\u{1b}[1A\\u{1b}[2Kall good") && !out.contains('\u{1b}'),
        "what the tool wrote is shown as text, never as a terminal's commands: {out:?}"
    );
    let (_, shown, _) = contextos(dir.path(), &["records", "show", "run-checkout"]);
    assert!(!shown.contains('\u{1b}'), "{shown:?}");

    let export = dir.path().join("run.jsonl");
    let (ok, _, err) = contextos(
        dir.path(),
        &[
            "records",
            "export",
            "run-checkout",
            "-o",
            export.to_str().expect("utf8"),
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .expect("export written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[3]["entry"]["body"]["type"], "tool_result",
        "blobs are inlined on export"
    );
    assert_eq!(lines[3]["hash"].as_str().map(str::len), Some(64));

    let (ok, _, err) = contextos(dir.path(), &["records", "show", "no-such-run"]);
    assert!(
        !ok && err.contains("run no-such-run not found in tenant shop"),
        "{err}"
    );
}

#[tokio::test]
async fn records_verify_names_the_tampered_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_run(dir.path()).await;
    {
        let db = redb::Database::create(dir.path().join("records.redb")).expect("open raw");
        let txn = db.begin_write().expect("write");
        {
            let mut entries = txn.open_table(ENTRIES).expect("table");
            let mut value = entries
                .get(("shop", "run-checkout", 2))
                .expect("get")
                .expect("entry 2")
                .value()
                .to_vec();
            let last = value.len() - 10;
            value[last] ^= 0x20; // one flipped bit inside the stored reason text
            entries
                .insert(("shop", "run-checkout", 2), value.as_slice())
                .expect("put");
        }
        txn.commit().expect("commit");
        let _ = db.begin_read();
    }
    let (ok, out, _) = contextos(dir.path(), &["records", "verify", "--all"]);
    assert!(!ok, "verification must fail: {out}");
    assert!(
        out.contains("run run-checkout: FAILED — entry 2 was altered"),
        "{out}"
    );

    let other_key = KeyPair::from_seed([9; 32]).public().to_hex();
    write_fresh_and_check_wrong_key(&other_key).await;
}

async fn write_fresh_and_check_wrong_key(other_key: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_run(dir.path()).await;
    let (ok, out, _) = contextos(
        dir.path(),
        &["records", "verify", "run-checkout", "--public-key", other_key],
    );
    assert!(!ok);
    assert!(
        out.contains("signed by key") && out.contains("but verification uses key"),
        "{out}"
    );
}

/// The embedded store's blobs table, opened directly to simulate tampering on disk.
const BLOBS: TableDefinition<(&str, &[u8; 32]), &[u8]> = TableDefinition::new("blobs");

/// The bundle a run recorded is what a replay re-runs it under: altering it on disk fails
/// verification, and reading it returns an error, never the altered bytes — also when the run's
/// start is too large for an entry and is stored as a blob itself.
#[tokio::test]
async fn an_altered_run_bundle_fails_verification_and_is_not_read() {
    for padding in [0, 40_000] {
        altered_bundle_is_caught(padding).await;
    }
}

async fn altered_bundle_is_caught(padding: usize) {
    use contextos_runner::records::RecordStore as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = TenantId::new("shop").expect("tenant");
    let bundle = {
        let key = KeyPair::load_or_create(&dir.path().join("keys/signing.key")).expect("key");
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        let bundle = store
            .put_blob(
                &tenant,
                br#"{"policies":[{"name":"oncall-guardrails"}]}"#.to_vec(),
            )
            .await
            .expect("bundle");
        let start = RunStart {
            run_id: "run-bundled".into(),
            session_id: "checkout-5xx".into(),
            agent: "oncall-assistant".into(),
            run_context: json!({"tenant_id": "shop", "padding": "x".repeat(padding)}),
            pinned: PinnedDigests::default(),
            bundle: Some(bundle),
        };
        let mut rec = Recorder::start(&store, tenant.clone(), key, start)
            .await
            .expect("start");
        rec.stage(EntryBody::Completed {
            output: "{}".into(),
            validators: Vec::new(),
        });
        rec.flush().await.expect("flush");
        bundle
    };
    let (ok, out, _) = contextos(dir.path(), &["records", "verify", "--all"]);
    assert!(ok, "an intact run verifies: {out}");
    // Opened again, the store folds its log into the database: what is altered below stays.
    drop(EmbeddedStore::open(&dir.path().join("records.redb")).expect("store"));
    {
        let db = redb::Database::create(dir.path().join("records.redb")).expect("open raw");
        let txn = db.begin_write().expect("write");
        {
            let mut blobs = txn.open_table(BLOBS).expect("table");
            blobs
                .insert(("shop", &bundle.0), br#"{"policies":[]}"#.as_slice())
                .expect("put");
        }
        txn.commit().expect("commit");
    }
    let (ok, out, _) = contextos(dir.path(), &["records", "verify", "--all"]);
    assert!(!ok, "verification must fail: {out}");
    assert!(
        out.contains(&format!(
            "blob {} referenced by entry 0 was altered",
            bundle.to_hex()
        )),
        "{out}"
    );
    let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
    let read = store.get_blob(&tenant, &bundle).await;
    assert!(
        matches!(read, Err(contextos_runner::records::StoreError::Corrupt { .. })),
        "{read:?}"
    );
}
