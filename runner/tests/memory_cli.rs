//! `contextos memory`: list a scope's items, forget one, forget a subject's whole memory; bad
//! input names the flag and the fix.

use std::process::{Command, Output};

use contextos_runner::{
    consent::{Purpose, SubjectHandle},
    memory::{ItemScope, MemoryItem, MemoryType, Provenance, bank::MemoryBank},
    records::{EmbeddedStore, TenantId},
};

fn contextos(data_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contextos"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--tenant", "shop"])
        .args(args)
        .env_remove("CONTEXTOS_STORE")
        .output()
        .expect("run contextos")
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn a_subjects_memory_is_listed_and_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ana = ItemScope::Subject(SubjectHandle::new("subj:ana").expect("handle"));
    let item = |text: &str, at_ms: i64| MemoryItem {
        scope: ana.clone(),
        memory_type: MemoryType::Preference,
        text: text.into(),
        categories: Default::default(),
        purpose: Some(Purpose::new("incident-follow-up").expect("purpose")),
        provenance: Provenance {
            run_id: "run-1".into(),
            evidence: Vec::new(),
            at_ms,
            context_pack: "sha256:pack".into(),
            policies: Vec::new(),
            reviewed_by: None,
        },
        expires_at_ms: None,
        entities: Default::default(),
    };
    let items = [
        item("prefers short summaries", 1_000),
        // A Hangul filler shows as a space that is not one.
        item("prefers calls after six\n0000  forged line\u{3164}", 2_000),
        item("prefers the phone", 3_000),
    ];
    {
        // The store is one process's at a time: closed before the CLI opens it.
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        let tenant = TenantId::new("shop").expect("tenant");
        MemoryBank::new(&store, &tenant)
            .keep_all(&items)
            .await
            .expect("keep");
    }

    let listed = contextos(dir.path(), &["memory", "list", "--scope", "subject:subj:ana"]);
    assert!(listed.status.success(), "{}", said(&listed));
    let text = said(&listed);
    assert!(
        text.contains("prefers the phone") && text.contains("prefers short summaries"),
        "{text}"
    );
    assert!(
        text.contains("after six\\n0000  forged line") && text.contains("forged line\\u{3164}"),
        "an item's text printed raw: {text}"
    );
    let words = contextos(
        dir.path(),
        &[
            "memory",
            "list",
            "--scope",
            "subject:subj:ana",
            "--query",
            "phone",
        ],
    );
    assert_eq!(said(&words).matches("prefers").count(), 1, "{}", said(&words));

    let id = items[2].id().to_string();
    let forgotten = contextos(dir.path(), &["memory", "forget", &id]);
    assert!(said(&forgotten).contains("forgotten: "), "{}", said(&forgotten));
    let again = contextos(dir.path(), &["memory", "forget", &id]);
    assert!(
        !again.status.success() && said(&again).contains("keeps no item"),
        "{}",
        said(&again)
    );
    let scope = contextos(dir.path(), &["memory", "forget", "--scope", "subject:subj:ana"]);
    assert!(
        said(&scope).contains("forgotten: 2 items of scope subject:subj:ana"),
        "{}",
        said(&scope)
    );
    let empty = contextos(dir.path(), &["memory", "list", "--scope", "subject:subj:ana"]);
    assert!(
        said(&empty).contains("no items in scope subject:subj:ana"),
        "{}",
        said(&empty)
    );

    for (args, expected) in [
        (
            vec!["memory", "list", "--scope", "team:sre"],
            "use agent:<name>, subject:<handle> or tenant",
        ),
        (
            vec!["memory", "list", "--scope", "tenant", "--type", "note"],
            "use fact, preference, procedure or episode",
        ),
        (
            vec!["memory", "list", "--scope", "tenant", "--max", "500"],
            "list 1 to 100 items",
        ),
        (vec!["memory", "forget", "not-an-id"], "is no item id"),
    ] {
        let output = contextos(dir.path(), &args);
        assert!(
            !output.status.success() && said(&output).contains(expected),
            "{args:?}: {}",
            said(&output)
        );
    }
}
