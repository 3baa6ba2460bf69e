//! `contextos audit` over 1,000 objects (250 Agents, each with its Policy, ContextPack and
//! SandboxProfile, one file per object, in the shape of `tests/audit/good`): the whole audit
//! (read with every field's line, sort into a harness, run every rule), its reading alone, and as
//! the baseline measured in the same run, reading and parsing the same files with serde_yaml
//! alone (what any YAML tool must do). Target: the whole audit ≤ 1 s.
//!
//! Run: `cargo bench -p contextos-runner --bench audit`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use contextos_runner::audit::{self, Harness, source};

const AGENTS: usize = 250;
const RUNS: usize = 7;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_objects(dir.path());
    let paths = [dir.path().to_owned()];

    let baseline = median(|| {
        let mut documents = 0;
        for entry in std::fs::read_dir(dir.path()).expect("dir") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
            for document in serde_yaml::Deserializer::from_str(&text) {
                let _: serde_json::Value = serde::Deserialize::deserialize(document).expect("yaml");
                documents += 1;
            }
        }
        assert_eq!(documents, AGENTS * 4);
    });
    let reading = median(|| {
        let documents = source::load(&paths).expect("load");
        assert_eq!(documents.len(), AGENTS * 4);
    });
    let mut findings = 0;
    let whole = median(|| {
        let harness = Harness::from_documents(source::load(&paths).expect("load"), false);
        findings = audit::audit(&harness).findings.len();
    });
    println!(
        "audit — {} objects ({AGENTS} Agents with a Policy, ContextPack and SandboxProfile each), median of {RUNS}",
        AGENTS * 4
    );
    println!(
        "  baseline: read and parse the files (serde_yaml)   {:>8.1} ms",
        ms(baseline)
    );
    println!(
        "  read with every field's line (source::load)        {:>8.1} ms",
        ms(reading)
    );
    println!(
        "  whole audit (read, harness, every rule)            {:>8.1} ms   (target ≤ 1,000 ms; {findings} findings)",
        ms(whole)
    );
    println!(
        "  the audit's own share over the baseline            {:>8.1} ms",
        ms(whole.saturating_sub(baseline))
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut run: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

/// The objects of `tests/audit/good/harness.yaml`, `AGENTS` times under other names, one file
/// per object.
fn write_objects(dir: &Path) {
    let template =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/audit/good/harness.yaml"))
            .expect("the good harness");
    let documents: Vec<&str> = template
        .split("\n---\n")
        .filter(|d| {
            [
                "kind: Agent",
                "kind: Policy",
                "kind: ContextPack",
                "kind: SandboxProfile",
            ]
            .iter()
            .any(|k| d.contains(k))
        })
        .collect();
    assert_eq!(documents.len(), 4);
    for i in 0..AGENTS {
        for (j, document) in documents.iter().enumerate() {
            let renamed = document
                .replace("name: oncall\n", &format!("name: oncall-{i}\n"))
                .replace("name: guardrails", &format!("name: guardrails-{i}"))
                .replace("name: oncall-pack", &format!("name: oncall-pack-{i}"))
                .replace("name: runner", &format!("name: runner-{i}"))
                .replace("{name: oncall-pack}", &format!("{{name: oncall-pack-{i}}}"))
                .replace("{name: runner}", &format!("{{name: runner-{i}}}"));
            std::fs::write(dir.join(format!("{i:03}-{j}.yaml")), renamed).expect("write");
        }
    }
}
