//! `contextos consent`: grant and revoke append to the subject's chain, show prints the history
//! and what is in force, and bad input names the flag and the fix without writing anything.

use std::process::{Command, Output};

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

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn refused(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn grants_and_revocations_are_appended_and_what_is_in_force_is_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let about = ["--subject", "subj:7f3a", "--purpose", "incident-follow-up"];
    let granted = stdout(&contextos(
        dir.path(),
        &[
            &["consent", "grant"][..],
            &about,
            &[
                "--categories",
                "phone,email",
                "--evidence",
                "PRIV-1042",
                "--by",
                "privacy-desk",
            ],
        ]
        .concat(),
    ));
    assert!(
        granted.starts_with("granted: subject subj:7f3a link 0 "),
        "{granted}"
    );
    let revoked = stdout(&contextos(
        dir.path(),
        &[
            &["consent", "revoke"][..],
            &about,
            &["--categories", "phone", "--by", "privacy-desk"],
        ]
        .concat(),
    ));
    assert!(
        revoked.starts_with("revoked: subject subj:7f3a link 1 "),
        "{revoked}"
    );

    let shown = stdout(&contextos(dir.path(), &["consent", "show", "subj:7f3a"]));
    assert!(
        shown.contains("in force for incident-follow-up: email\n"),
        "{shown}"
    );
    assert!(shown.contains("chain verified: 2 records"), "{shown}");
    // A certifier vouches for the keys a gateway publishes: it has nothing to check here, and
    // says so.
    let certified = contextos(
        dir.path(),
        &["consent", "show", "subj:7f3a", "--certifier", &"ab".repeat(32)],
    );
    assert_eq!(stdout(&certified), shown);
    let note = String::from_utf8_lossy(&certified.stderr);
    assert!(note.contains("--certifier is not used"), "{note}");
    assert_eq!(
        stdout(&contextos(dir.path(), &["consent", "list"])),
        "subj:7f3a\n"
    );

    // Refused, naming the flag and the fix; nothing is appended.
    for (args, expected) in [
        (
            vec![
                "--subject",
                "Ana@example.org",
                "--purpose",
                "p",
                "--categories",
                "phone",
                "--evidence",
                "e",
            ],
            "--subject",
        ),
        (
            vec![
                "--subject",
                "s1",
                "--purpose",
                "p",
                "--categories",
                "fax",
                "--evidence",
                "e",
            ],
            "unknown personal-data category \"fax\": use email",
        ),
        (
            vec![
                "--subject",
                "s1",
                "--purpose",
                "p",
                "--categories",
                "phone",
                "--evidence",
                "",
            ],
            "a grant says where the person's decision is kept",
        ),
        (
            vec![
                "--subject",
                "s1",
                "--purpose",
                "p",
                "--categories",
                "phone",
                "--evidence",
                "e",
                "--expires-in",
                "5y",
            ],
            "--expires-in \"5y\": the unit must be s, m, h or d",
        ),
    ] {
        let message = refused(&contextos(
            dir.path(),
            &[&["consent", "grant"][..], &args].concat(),
        ));
        assert!(message.contains(expected), "{args:?}: {message}");
    }
    assert_eq!(
        stdout(&contextos(dir.path(), &["consent", "list"])),
        "subj:7f3a\n"
    );
    let unknown = refused(&contextos(dir.path(), &["consent", "show", "subj:nobody"]));
    assert!(
        unknown.contains("subject subj:nobody has no consent records in tenant shop"),
        "{unknown}"
    );
}
