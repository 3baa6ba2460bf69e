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

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contextos"));
        command
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(["--tenant", "shop"])
            .env_remove("CONTEXTOS_STORE");
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

    consent(cli, "revoke", &["--evidence", "phone call 2026-12-03"]);
    let (_, third) = cli.session("ticket-4712");
    let record = cli.ok(&["records", "show", &third]);
    assert!(
        record.contains("recalled 0 item(s) of subject:cust-7f3a9c for source customer-memory; held back 2"),
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
    let judged = cli.run(&[
        "replay",
        "--run",
        &second,
        "--candidate",
        candidate.to_str().expect("path"),
    ]);
    assert!(!judged.status.success(), "{}", said(&judged));
    assert!(
        said(&judged).contains("ContextPack memory source customer-memory asks for other memory"),
        "{}",
        said(&judged)
    );
    cli.ok(&["records", "verify", "--all"]);
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
