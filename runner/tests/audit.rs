//! `contextos audit` against its fixture corpus (`tests/audit/`): a harness it finds nothing in
//! (`good/`), and for every rule a fixture (`violations/<group>--<name>.yaml`, variants
//! `<group>--<name>.<variant>.yaml`) that changes that harness so the rule fires — each with the findings it must produce, and nothing else. Also:
//! the quickstart has no high finding, the README's rule table is the catalogue's, and the three
//! output formats carry every finding.
//!
//! A fixture's documents are merged into the good harness's object of the same kind, namespace
//! and name (objects merge key by key, lists of named items by `name`, other values replace), or
//! added when there is none. Its header says what to expect:
//!
//! ```text
//! # expect: policy/default-allow @12     (a finding in this file, at that line)
//! # expect: install/admission-policy-missing   (a finding elsewhere)
//! # remove: ValidatingAdmissionPolicy contextos-session-identity
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

#[path = "support/audit_cli.rs"]
#[allow(dead_code)]
mod audit_cli;

use contextos_runner::audit::{self, Harness, Severity, report::rules_markdown, rules, source};
use serde_json::Value;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/audit")
}

fn identity(value: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        text(&value["kind"]),
        text(&value["metadata"]["namespace"]),
        text(&value["metadata"]["name"]),
    )
}

/// Merges `patch` into `target`: objects key by key, lists of named objects by name (an empty
/// list replaces), everything else (`null` too) replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(patch))
            if !patch.is_empty()
                && patch.iter().all(|item| item["name"].is_string())
                && target.iter().all(|item| item["name"].is_string()) =>
        {
            for item in patch {
                match target.iter_mut().find(|t| t["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// What a fixture's header asks for.
struct Header {
    /// (rule, line in the fixture if the finding is there).
    expected: Vec<(String, Option<usize>)>,
    removed: Vec<(String, String)>,
}

fn header(text: &str) -> Header {
    let mut expected = Vec::new();
    let mut removed = Vec::new();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(rest) = line.strip_prefix("# expect:") {
            let mut parts = rest.split_whitespace();
            let rule = parts.next().expect("a rule id after expect:").to_owned();
            let at = parts
                .next()
                .map(|l| l.trim_start_matches('@').parse().expect("@<line>"));
            expected.push((rule, at));
        }
        if let Some(rest) = line.strip_prefix("# remove:") {
            let (kind, name) = rest.trim().split_once(' ').expect("# remove: <Kind> <name>");
            removed.push((kind.to_owned(), name.to_owned()));
        }
    }
    Header { expected, removed }
}

/// The good harness with `fixture` merged in.
fn harness_with(fixture: &Path) -> (Harness, Header) {
    let text = std::fs::read_to_string(fixture).expect("fixture");
    let header = header(&text);
    let mut documents = source::load(&[corpus().join("good")]).expect("good harness");
    documents.retain(|d| {
        let (kind, _, name) = identity(&d.value);
        !header.removed.iter().any(|(k, n)| *k == kind && *n == name)
    });
    // Patches apply to the good harness's objects only: a fixture may declare one object twice.
    let good = documents.len();
    for patch in source::read(fixture).expect("fixture parses") {
        match documents[..good]
            .iter()
            .position(|d| identity(&d.value) == identity(&patch.value))
        {
            Some(i) => {
                let mut value = documents[i].value.clone();
                merge(&mut value, &patch.value);
                // The merged object, placed where the fixture is (its changed fields' lines).
                documents[i] = patch;
                documents[i].value = value;
            }
            None => documents.push(patch),
        }
    }
    (Harness::from_documents(documents, false), header)
}

fn fixture_name(rule: &str) -> String {
    format!("{}.yaml", rule.replace('/', "--"))
}

/// A rule's fixtures: `<group>--<name>.yaml` and its variants `<group>--<name>.<variant>.yaml`.
fn fixtures_of(rule: &str) -> Vec<PathBuf> {
    let base = rule.replace('/', "--");
    let mut found: Vec<PathBuf> = std::fs::read_dir(corpus().join("violations"))
        .expect("violations")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name == format!("{base}.yaml")
                || (name.starts_with(&format!("{base}.")) && name.ends_with(".yaml"))
        })
        .collect();
    found.sort();
    found
}

#[test]
fn the_good_harness_has_no_finding() {
    let documents = source::load(&[corpus().join("good")]).expect("good harness");
    let report = audit::audit(&Harness::from_documents(documents, false));
    assert!(report.findings.is_empty(), "{}", report.text());
    assert_eq!(report.scores.values().copied().collect::<Vec<_>>(), [100]);
}

#[test]
fn every_rule_has_a_fixture_that_makes_exactly_its_findings() {
    let mut failures = Vec::new();
    let mut covered = BTreeSet::new();
    // The records, live and openapi rules judge runs, servers and documents, not manifests:
    // their tests are in `rules/records.rs` and `rules/live.rs` (both ways), `run_loop.rs` (over
    // the quickstart's records), `audit_live.rs` (against the MCP reference server) and
    // `audit_openapi.rs` (against the ops-tools service's document).
    let judged_by_manifests = |rule: &str| {
        !["records/", "live/", "openapi/"]
            .iter()
            .any(|group| rule.starts_with(group))
    };
    for (rule, _) in rules::catalogue().filter(|(r, _)| judged_by_manifests(r.id.0)) {
        let fixtures = fixtures_of(rule.id.0);
        if fixtures.is_empty() {
            failures.push(format!("{}: no fixture {}", rule.id, fixture_name(rule.id.0)));
        }
        for fixture in fixtures {
            let (harness, header) = harness_with(&fixture);
            let report = audit::audit(&harness);
            let mut found: Vec<(String, Option<usize>)> = report
                .findings
                .iter()
                .map(|f| {
                    let here = f.file.as_deref() == Some(fixture.as_path());
                    (f.rule.0.to_owned(), if here { f.line } else { None })
                })
                .collect();
            let mut expected = header.expected.clone();
            found.sort();
            expected.sort();
            let name = fixture
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !expected.iter().any(|(r, _)| r == rule.id.0) {
                failures.push(format!("{name}: expects no finding of its own rule {}", rule.id));
            }
            if found != expected {
                failures.push(format!(
                    "{name}: expected {expected:?}, found {found:?}\n{}",
                    report.text()
                ));
            }
        }
        covered.insert(rule.id.0);
    }
    // A fixture for a rule that does not exist (a renamed id) is a mistake too.
    for entry in std::fs::read_dir(corpus().join("violations")).expect("violations") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        let base = name.trim_end_matches(".yaml");
        let rule = base
            .split_once('.')
            .map_or(base, |(rule, _variant)| rule)
            .replace("--", "/");
        if !covered.contains(rule.as_str()) {
            failures.push(format!("{name}: no rule {rule}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_quickstart_and_every_example_have_no_high_finding() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let quickstart = examples.join("quickstart");
    let mut audited = 0;
    for entry in std::fs::read_dir(&examples).expect("examples") {
        let dir = entry.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        // An example that adds to the quickstart (prices, quotas) is audited with it.
        let mut paths = vec![dir.clone()];
        if dir != quickstart && !dir.join("agent.yaml").exists() {
            paths.push(quickstart.clone());
        }
        let report = audit::audit(&Harness::from_documents(
            source::load(&paths).expect("the example loads"),
            false,
        ));
        assert!(
            !report.fails(Severity::High),
            "{}:\n{}",
            dir.display(),
            report.text()
        );
        audited += 1;
    }
    assert!(audited >= 5, "{audited} examples");
}

#[test]
fn the_readme_carries_the_rule_table() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README");
    let table = rules_markdown();
    assert!(
        readme.contains(&table),
        "the README's audit rule table is out of date; replace it with the output of `contextos audit --rules`:\n{table}"
    );
}

#[test]
fn every_format_carries_every_finding() {
    let fixture = corpus()
        .join("violations")
        .join(fixture_name("policy/default-allow"));
    let (harness, _) = harness_with(&fixture);
    let report = audit::audit(&harness);
    assert!(!report.findings.is_empty());
    let json = report.json();
    assert_eq!(
        json["findings"].as_array().map(Vec::len),
        Some(report.findings.len())
    );
    assert_eq!(json["findings"][0]["rule"], "policy/default-allow");
    let sarif = report.sarif();
    let run = &sarif["runs"][0];
    assert_eq!(sarif["version"], "2.1.0");
    assert_eq!(
        run["results"].as_array().map(Vec::len),
        Some(report.findings.len())
    );
    let result = &run["results"][0];
    assert_eq!(result["ruleId"], "policy/default-allow");
    assert_eq!(result["level"], "error");
    assert!(
        result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            .as_str()
            .is_some_and(|uri| uri.ends_with("policy--default-allow.yaml")),
        "{result}"
    );
    assert!(
        result["locations"][0]["physicalLocation"]["region"]["startLine"]
            .as_u64()
            .is_some_and(|l| l > 0)
    );
    let described: BTreeSet<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(described.len(), rules::catalogue().count());
    let text = report.text();
    assert!(
        text.contains("policy/default-allow") && text.contains("fix: "),
        "{text}"
    );
    assert!(report.fails(Severity::High) && !report.fails(Severity::Critical));
}

/// The CLI: exit 3 on a finding at or above `--fail-on`, 0 below it, and an error (not "no
/// findings") when the paths hold nothing to audit.
#[test]
fn the_cli_gates_ci_and_refuses_to_audit_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let audit = |args: &[&str]| {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        audit_cli::contextos(&all)
    };
    let path = dir.path().display().to_string();
    let (code, _, stderr) = audit(&[&path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nothing to audit"), "{stderr}");

    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: contextos.dev/v1alpha1\nkind: Policy\nmetadata: {name: open}\nspec:\n  defaultEffect: allow\n  budget: {maxCalls: 10}\n  promotion: {replay: {sampleSize: 20}}\n",
    )
    .expect("write");
    let (code, stdout, stderr) = audit(&[&path, "--fail-on", "high"]);
    assert_eq!(code, Some(3), "{stdout}{stderr}");
    assert!(
        stdout.contains("policy/default-allow") && stdout.contains("policy.yaml:5"),
        "{stdout}"
    );
    let (code, _, stderr) = audit(&[&path, "--fail-on", "critical"]);
    assert_eq!(code, Some(0), "{stderr}");
}
