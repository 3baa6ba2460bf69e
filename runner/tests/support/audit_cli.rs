//! Running `contextos` in the audit tests and reading its JSON report.

use std::process::Command;

use serde_json::Value;

/// `contextos ARGS`: exit code, stdout, stderr.
pub fn contextos(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_contextos"))
        .args(args)
        .output()
        .expect("run contextos");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `contextos audit ARGS --format json` (which must succeed): the (rule, message) of each
/// finding whose rule is in `group` (`live/`, `openapi/`).
pub fn findings_in(group: &str, args: &[&str]) -> Vec<(String, String)> {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    all.extend(["--format", "json"]);
    let (code, stdout, stderr) = contextos(&all);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["rule"].as_str().is_some_and(|r| r.starts_with(group)))
        .map(|f| {
            let text = |key: &str| f[key].as_str().unwrap_or_default().to_owned();
            (text("rule"), text("message"))
        })
        .collect()
}
