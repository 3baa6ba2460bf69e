//! Runs that use memory, through the `contextos` binary on the embedded store and on TiKV: the
//! memory example's two tickets of one customer. A proposal holding personal data is never kept
//! without the customer's consent; with it, it is, and the next Session recalls it into its
//! context; after a revocation the very next Session is offered nothing; the run that did
//! recall still replays identically, and every record verifies.

#[path = "support/tikv_testserver.rs"]
mod tikv_testserver;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/memory")
}

struct Cli<'a> {
    data_dir: &'a Path,
    store: Option<String>,
}

/// What the customer said and what the run learned about them, none of which may ever be in
/// the store in the clear (a run about a subject records it under their key).
const THEIR_DATA: [&str; 5] = [
    "wrong VAT number",
    "ana.lopez@example.com",
    "INV-204518",
    "Prefers replies in German",
    "Wir melden uns kurz",
];

impl Cli<'_> {
    /// Every byte the store holds: the embedded store's files, or every key and value of the
    /// tenant's range in TiKV.
    fn raw_store(&self) -> Vec<u8> {
        match &self.store {
            None => {
                let mut bytes = Vec::new();
                for entry in std::fs::read_dir(self.data_dir).expect("data dir") {
                    let path = entry.expect("entry").path();
                    if path.is_file() {
                        bytes.extend(std::fs::read(&path).expect("read"));
                    }
                }
                bytes
            }
            Some(url) => tikv_raw(url.strip_prefix("tikv://").expect("tikv url")),
        }
    }
}

#[cfg(feature = "tikv")]
fn tikv_raw(pd: &str) -> Vec<u8> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = tikv_client::TransactionClient::new(vec![pd.to_owned()])
            .await
            .expect("tikv");
        let mut txn = client.begin_optimistic().await.expect("txn");
        let mut bytes = Vec::new();
        let pairs = txn
            .scan(b"cx/".to_vec()..b"cx0".to_vec(), u32::MAX)
            .await
            .expect("scan");
        for pair in pairs {
            bytes.extend_from_slice(Vec::<u8>::from(pair.0.clone()).as_slice());
            bytes.extend_from_slice(pair.1.as_slice());
        }
        txn.rollback().await.expect("rollback");
        bytes
    })
}

#[cfg(not(feature = "tikv"))]
fn tikv_raw(_: &str) -> Vec<u8> {
    unreachable!("TiKV tests need the tikv feature")
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Erases the customer: their data is unreadable everywhere (it never was in the store in
/// the clear, and now their key is gone, and a copy of the key ring from before does not open
/// the store either), every record still verifies, and their runs still replay.
fn erased_and_still_verifiable(cli: &Cli<'_>, first: &str, second: &str) {
    // A person's correction of a run about the customer is theirs too: kept encrypted under
    // the run's key, readable until the customer is erased.
    let given = cli.ok(&[
        "feedback",
        "give",
        first,
        "--label",
        "wrong-answer",
        "--correction",
        "Follow-ups about INV-204518 go to ana.lopez@example.com, answer in German",
        "--by",
        "rita@example.com",
    ]);
    assert!(given.starts_with("kept: correction 0"), "{given}");
    let corrections = cli.ok(&["feedback", "list", first]);
    assert!(
        corrections.contains("ana.lopez@example.com") && corrections.contains("wrong-answer"),
        "{corrections}"
    );
    let raw = cli.raw_store();
    for text in THEIR_DATA {
        assert!(!holds(&raw, text), "the store holds {text:?} in the clear");
    }
    let shown = cli.ok(&["records", "show", first]);
    assert!(
        shown.contains("ana.lopez@example.com"),
        "readable before: {shown}"
    );
    // A copy of the store taken before the erasure (the embedded store's files).
    let backup = tempfile::tempdir().expect("tempdir");
    if cli.store.is_none() {
        for name in ["records.redb", "records.redb.wal"] {
            let from = cli.data_dir.join(name);
            if from.exists() {
                std::fs::copy(&from, backup.path().join(name)).expect("copy");
            }
        }
    }

    let refused = cli.run(&["subject", "erase", "cust-7f3a9c"]);
    assert!(!refused.status.success(), "erasure wants --yes");
    let erased = cli.ok(&[
        "subject",
        "erase",
        "cust-7f3a9c",
        "--yes",
        "--by",
        "dpo@example.com",
    ]);
    assert!(erased.contains("erased: subject cust-7f3a9c"), "{erased}");
    assert!(erased.contains("forgotten: 2"), "{erased}");
    let shown = cli.ok(&["subject", "show", "cust-7f3a9c"]);
    assert!(
        shown.contains("erased at") && shown.contains("dpo@example.com"),
        "{shown}"
    );

    cli.ok(&["records", "verify", "--all"]);
    for run in [first, second] {
        let shown = cli.ok(&["records", "show", run]);
        assert!(shown.contains("[erased]"), "{shown}");
        for text in THEIR_DATA {
            assert!(!shown.contains(text), "{text:?} still readable: {shown}");
        }
    }
    let listed = cli.ok(&["memory", "list", "--scope", "subject:cust-7f3a9c"]);
    assert!(listed.contains("no items"), "{listed}");
    let corrections = cli.ok(&["feedback", "list", first]);
    assert!(
        corrections.contains("[erased]") && !corrections.contains("ana.lopez"),
        "{corrections}"
    );
    // A replay of an erased run still runs, and says what it could not see.
    let replay = cli.run(&["replay", "--run", second]);
    let text = said(&replay);
    assert!(text.contains(second), "{text}");
    assert!(!text.contains("cannot be read"), "{text}");
    // Nothing is kept about the handle again.
    let again = cli.run(&[
        "run",
        "-f",
        example().to_str().expect("path"),
        "--session",
        "ticket-4712",
    ]);
    assert!(!again.status.success());
    assert!(said(&again).contains("was erased"), "{}", said(&again));

    // The copy taken before still holds their wrapped data key, but under a key-encryption
    // key the erasure destroyed: nothing of theirs opens from it.
    if cli.store.is_none() {
        let copy = format!("embedded:{}", backup.path().join("records.redb").display());
        let from_backup = Cli {
            data_dir: cli.data_dir,
            store: Some(copy),
        };
        let shown = from_backup.run(&["records", "show", first]);
        let text = said(&shown);
        assert!(!text.contains("ana.lopez@example.com"), "{text}");
        assert!(
            text.contains("key epoch 1, which the key ring no longer holds"),
            "{text}"
        );
        from_backup.ok(&["records", "verify", "--all"]);
    }
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contextos"));
        command
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(["--tenant", "shop"])
            .env_remove("CONTEXTOS_STORE")
            // The vault's key rings: kept apart from the store, as they are by default.
            .env("CONTEXTOS_VAULT_KEYS", self.data_dir.join("vault-keys"));
        if let Some(store) = &self.store {
            command.env("CONTEXTOS_STORE", store);
        }
        command.args(args).output().expect("run contextos")
    }

    /// Runs `args`, which must succeed; what it printed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let text = said(&output);
        assert!(output.status.success(), "contextos {args:?} failed:\n{text}");
        text
    }

    /// Runs one Session of the example; what it printed and its run id.
    fn session(&self, session: &str) -> (String, String) {
        self.session_in(&example(), session)
    }

    /// Runs one Session of the manifests in `dir`; what it printed and its run id.
    fn session_in(&self, dir: &Path, session: &str) -> (String, String) {
        let text = self.ok(&["run", "-f", dir.to_str().expect("path"), "--session", session]);
        let run = text
            .split_whitespace()
            .find(|w| w.starts_with(&format!("{session}-")))
            .expect("the run's id is printed")
            .to_owned();
        (text, run)
    }
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn consent(cli: &Cli<'_>, action: &str, extra: &[&str]) {
    let mut args = vec![
        "consent",
        action,
        "--subject",
        "cust-7f3a9c",
        "--purpose",
        "support-history",
    ];
    args.extend_from_slice(extra);
    cli.ok(&args);
}

fn remembered_and_recalled_within_consent(cli: &Cli<'_>) {
    // No consent yet: the preference (about the customer) and the e-mail address are dropped.
    let (text, _) = cli.session("ticket-4711");
    assert_eq!(text.matches("\"outcome\":\"dropped\"").count(), 2, "{text}");
    let listed = cli.ok(&["memory", "list", "--scope", "subject:cust-7f3a9c"]);
    assert!(!listed.contains("example.com"), "nothing kept: {listed}");

    consent(
        cli,
        "grant",
        &["--categories", "email", "--evidence", "form SUP-88"],
    );
    let (text, first) = cli.session("ticket-4711");
    assert_eq!(text.matches("\"outcome\":\"kept\"").count(), 2, "{text}");
    let record = cli.ok(&["records", "show", &first]);
    assert!(
        record.contains("memory candidate of call 3.0 kept: its personal data (email) is covered by consent of subject cust-7f3a9c for purpose support-history"),
        "{record}"
    );

    let (_, second) = cli.session("ticket-4712");
    let record = cli.ok(&["records", "show", &second]);
    assert!(
        record.contains("recalled 2 item(s) of subject:cust-7f3a9c for source customer-memory"),
        "{record}"
    );
    // The address names an invoice (the Ontology's INV- pattern): the invoice source offers it
    // alone, and a person listing memory can ask for the same.
    assert!(
        record.contains(
            "recalled 1 item(s) of subject:cust-7f3a9c about an entity of type invoice for source invoice-memory"
        ),
        "{record}"
    );
    let about = cli.ok(&[
        "memory",
        "list",
        "--scope",
        "subject:cust-7f3a9c",
        "--entity-type",
        "invoice",
    ]);
    assert!(
        about.contains("about: invoice/INV-204518") && !about.contains("Prefers replies in German"),
        "{about}"
    );

    consent(cli, "revoke", &["--evidence", "phone call 2026-12-03"]);
    let (_, third) = cli.session("ticket-4712");
    let record = cli.ok(&["records", "show", &third]);
    assert!(
        record.contains("recalled 0 item(s) of subject:cust-7f3a9c for source customer-memory; held back 2"),
        "{record}"
    );
    assert!(
        record.contains(
            "recalled 0 item(s) of subject:cust-7f3a9c about an entity of type invoice for source invoice-memory; held back 1"
        ),
        "{record}"
    );

    // The run that recalled replays with what it recalled then, not with what is allowed now.
    let replay = cli.ok(&["replay", "--run", &second]);
    assert!(replay.contains("decisions identical"), "{replay}");
    // A candidate pack that recalls other memory cannot be judged by replaying it: refused,
    // naming the source, never passed on what the run happened to be offered.
    let candidate = cli.data_dir.join("candidate-pack.yaml");
    let pack = std::fs::read_to_string(example().join("contextpack.yaml")).expect("pack");
    std::fs::write(
        &candidate,
        pack.replace(
            "        maxItems: 20\n",
            "        maxItems: 20\n        query: invoice\n",
        ),
    )
    .expect("write");
    let replayed_under = |file: &Path| {
        cli.run(&[
            "replay",
            "--run",
            &second,
            "--candidate",
            file.to_str().expect("path"),
        ])
    };
    let judged = replayed_under(&candidate);
    assert!(!judged.status.success(), "{}", said(&judged));
    assert!(
        said(&judged).contains("ContextPack memory source customer-memory asks for other memory"),
        "{}",
        said(&judged)
    );
    // A candidate Ontology is replayed like any revision: one that still declares invoices
    // replays identically; one that no longer does would leave the pack's invoice source
    // recalling an unknown type, and is refused naming it.
    let ontology = cli.data_dir.join("candidate-ontology.yaml");
    std::fs::copy(example().join("ontology.yaml"), &ontology).expect("copy");
    let same = replayed_under(&ontology);
    assert!(same.status.success(), "{}", said(&same));
    assert!(said(&same).contains("decisions identical"), "{}", said(&same));
    std::fs::write(
        &ontology,
        "apiVersion: contextos.dev/v1alpha1\nkind: Ontology\nmetadata: {name: default}\nspec:\n  entityTypes:\n    - {name: ticket, idPattern: \"TCK-[0-9]{4,8}\"}\n",
    )
    .expect("write");
    let judged = replayed_under(&ontology);
    assert!(!judged.status.success(), "{}", said(&judged));
    assert!(
        said(&judged).contains("under the candidate Ontology")
            && said(&judged).contains("spec.sources[1].memory.entityType"),
        "{}",
        said(&judged)
    );
    cli.ok(&["records", "verify", "--all"]);
    erased_and_still_verifiable(cli, &first, &second);
}

#[test]
fn on_the_embedded_store_memory_is_kept_and_recalled_only_within_consent() {
    let dir = tempfile::tempdir().expect("tempdir");
    remembered_and_recalled_within_consent(&Cli {
        data_dir: dir.path(),
        store: None,
    });
}

#[cfg(feature = "tikv")]
#[test]
fn on_tikv_memory_is_kept_and_recalled_only_within_consent() {
    use std::io::Write as _;

    use tikv_testserver::{TESTSERVER_ENV, TestServer};
    let Ok(bin) = std::env::var(TESTSERVER_ENV) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP on_tikv_memory_is_kept_and_recalled_only_within_consent: {TESTSERVER_ENV} is not set"
        );
        return;
    };
    let server = TestServer::start(&bin, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    remembered_and_recalled_within_consent(&Cli {
        data_dir: dir.path(),
        store: Some(format!("tikv://{}", server.pd)),
    });
}

/// The example, copied into `dir` with its Agent's YAML changed by `edit`.
fn example_with_agent(dir: &Path, edit: impl Fn(&str) -> String) {
    for entry in std::fs::read_dir(example()).expect("example") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            // consent/: applied by a person, never read by a run.
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let text = if path.ends_with("agent.yaml") {
            edit(&text)
        } else {
            text
        };
        std::fs::write(dir.join(path.file_name().expect("name")), text).expect("write");
    }
}

#[test]
fn candidates_held_for_review_are_kept_only_when_a_person_approves_them_under_consent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("dir");
    example_with_agent(&manifests, |text| {
        text.replace(
            "    retainDays: 365\n",
            "    retainDays: 365\n    review: required\n",
        )
    });
    let cli = Cli {
        data_dir: dir.path(),
        store: None,
    };
    consent(
        &cli,
        "grant",
        &["--categories", "email,phone", "--evidence", "form SUP-88"],
    );
    let run = cli.ok(&[
        "run",
        "-f",
        manifests.to_str().expect("path"),
        "--session",
        "ticket-4711",
    ]);
    assert_eq!(run.matches("\"outcome\":\"held\"").count(), 2, "{run}");
    let listed = cli.ok(&["memory", "list", "--scope", "subject:cust-7f3a9c"]);
    assert!(
        listed.contains("no items"),
        "held candidates are not memory: {listed}"
    );
    let held = cli.ok(&["memory", "held", "--scope", "subject:cust-7f3a9c"]);
    assert!(held.contains("requires a person's review"), "{held}");
    let id_of = |needle: &str| {
        let mut lines = held.lines();
        let mut id = None;
        while let Some(line) = lines.next() {
            if let Some(text) = lines.clone().next()
                && text.contains(needle)
            {
                id = line.split_whitespace().next().map(str::to_owned);
            }
        }
        id.unwrap_or_else(|| panic!("no held candidate says {needle:?}: {held}"))
    };
    let (address, preference) = (id_of("example.com"), id_of("German"));

    // The customer withdraws the e-mail consent: the address can no longer be approved.
    consent(
        &cli,
        "revoke",
        &["--categories", "email", "--evidence", "phone call"],
    );
    let refused = cli.run(&["memory", "approve", &address, "--by", "rita@example.com"]);
    assert!(!refused.status.success());
    assert!(
        said(&refused).contains("cannot be kept now: no consent of subject cust-7f3a9c for purpose support-history covers its email"),
        "{}",
        said(&refused)
    );
    let approved = cli.ok(&["memory", "approve", &preference, "--by", "rita@example.com"]);
    assert!(approved.starts_with("kept: "), "{approved}");
    cli.ok(&["memory", "reject", &address]);
    let held = cli.ok(&["memory", "held"]);
    assert!(held.contains("no candidates held"), "{held}");
    let listed = cli.ok(&["memory", "list", "--scope", "subject:cust-7f3a9c"]);
    assert!(
        listed.contains("Prefers replies in German") && !listed.contains("example.com"),
        "{listed}"
    );
    // The next Session recalls what was approved, and only that.
    let (_, next) = cli.session_in(&manifests, "ticket-4712");
    let record = cli.ok(&["records", "show", &next]);
    assert!(
        record.contains("recalled 1 item(s) of subject:cust-7f3a9c for source customer-memory"),
        "{record}"
    );
}

#[test]
fn a_memory_tool_without_the_agents_memory_rules_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    example_with_agent(dir.path(), |text| {
        let start = text.find("  memory:\n").expect("spec.memory");
        let end = text.find("  tools:\n").expect("spec.tools");
        format!("{}{}", &text[..start], &text[end..])
    });
    let cli = Cli {
        data_dir: dir.path(),
        store: None,
    };
    let output = cli.run(&[
        "run",
        "-f",
        dir.path().to_str().expect("path"),
        "--session",
        "ticket-4711",
    ]);
    assert!(!output.status.success());
    let text = said(&output);
    assert!(
        text.contains("spec.tools[0].adapter.memory (remember): the Agent has no spec.memory"),
        "{text}"
    );
}
