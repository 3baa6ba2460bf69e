//! An audit's result: findings in order of severity, a score per Agent (so progress is visible
//! over time), and the three renderings — text for people, JSON for scripts, SARIF 2.1.0 for
//! code-scanning UIs. Also the rule table the README carries, generated from the catalogue.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use serde_json::{Value, json};

use super::{
    finding::{Finding, Rule, Severity},
    harness::{Harness, ObjectRef},
    rules,
};

/// The findings of one audit, and each Agent's score.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Per Agent: 100 minus the weight of every finding on it or on what it uses (its Policies,
    /// ContextPack, SandboxProfile and Sessions), at least 0.
    pub scores: BTreeMap<String, u32>,
    pub summary: BTreeMap<Severity, usize>,
}

impl Report {
    pub fn new(harness: &Harness, mut findings: Vec<Finding>) -> Self {
        findings.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then_with(|| a.file.cmp(&b.file))
                .then_with(|| a.line.cmp(&b.line))
                .then_with(|| a.rule.cmp(&b.rule))
                .then_with(|| a.message.cmp(&b.message))
        });
        let mut summary = BTreeMap::new();
        for finding in &findings {
            *summary.entry(finding.severity).or_insert(0) += 1;
        }
        let scores = harness
            .agents
            .iter()
            .map(|agent| {
                let uses = used_by(harness, agent);
                let lost: u32 = findings
                    .iter()
                    .filter(|f| f.object == agent.id || uses.contains(&f.object))
                    .map(|f| f.severity.weight())
                    .sum();
                (agent.id.to_string(), 100u32.saturating_sub(lost))
            })
            .collect();
        Self {
            findings,
            scores,
            summary,
        }
    }

    /// Whether a finding at `threshold` or above was made (`--fail-on`).
    pub fn fails(&self, threshold: Severity) -> bool {
        self.findings.iter().any(|f| f.severity >= threshold)
    }

    /// For people: grouped by severity, each finding with where it is, what, and the fix.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let fixes: BTreeMap<&str, &Rule> = rules::catalogue().map(|(r, _)| (r.id.0, r)).collect();
        for severity in Severity::ALL {
            let of: Vec<&Finding> = self.findings.iter().filter(|f| f.severity == severity).collect();
            if of.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{} ({})", severity.as_str().to_uppercase(), of.len());
            for finding in of {
                let place = match (&finding.file, finding.line) {
                    (Some(file), Some(line)) => format!("{}:{line}", file.display()),
                    (Some(file), None) => file.display().to_string(),
                    _ => "(cluster)".to_owned(),
                };
                let _ = writeln!(out, "  {place}  {}  {}", finding.object, finding.field);
                let _ = writeln!(out, "    {}: {}", finding.rule, finding.message);
                if let Some(rule) = fixes.get(finding.rule.0) {
                    let _ = writeln!(out, "    why: {}", rule.why);
                    let _ = writeln!(out, "    fix: {}", rule.fix);
                }
            }
            out.push('\n');
        }
        if self.findings.is_empty() {
            out.push_str("no findings\n");
        }
        if !self.scores.is_empty() {
            out.push_str("scores (100 = no findings on the Agent or what it uses)\n");
            for (agent, score) in &self.scores {
                let _ = writeln!(out, "  {agent}: {score}");
            }
        }
        let counts: Vec<String> = Severity::ALL
            .iter()
            .map(|s| format!("{} {}", self.summary.get(s).copied().unwrap_or(0), s.as_str()))
            .collect();
        let _ = writeln!(out, "{} findings: {}", self.findings.len(), counts.join(", "));
        out
    }

    /// For scripts: the report as JSON.
    pub fn json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// For code-scanning UIs: SARIF 2.1.0, one run, every rule described.
    pub fn sarif(&self) -> Value {
        let rules: Vec<Value> = rules::catalogue()
            .map(|(rule, _)| {
                json!({
                    "id": rule.id.0,
                    "shortDescription": {"text": rule.title},
                    "fullDescription": {"text": rule.why},
                    "help": {"text": rule.fix},
                    "defaultConfiguration": {"level": sarif_level(rule.severity)},
                    "properties": {"severity": rule.severity.as_str()},
                })
            })
            .collect();
        let results: Vec<Value> = self
            .findings
            .iter()
            .map(|finding| {
                let mut result = json!({
                    "ruleId": finding.rule.0,
                    "level": sarif_level(finding.severity),
                    "message": {"text": format!("{} {}: {}", finding.object, finding.field, finding.message)},
                    "properties": {"severity": finding.severity.as_str(), "object": finding.object, "field": finding.field},
                });
                if let Some(file) = &finding.file {
                    let mut location = json!({"artifactLocation": artifact_location(file)});
                    if let Some(line) = finding.line {
                        location["region"] = json!({"startLine": line});
                    }
                    result["locations"] = json!([{"physicalLocation": location}]);
                }
                result
            })
            .collect();
        json!({
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [{
                "tool": {"driver": {
                    "name": "contextos audit",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }},
                "results": results,
            }],
        })
    }
}

/// A SARIF artifact location: a percent-encoded URI, relative to the source root (the current
/// directory) when the file is under it, a `file://` URI otherwise.
fn artifact_location(file: &std::path::Path) -> Value {
    let cwd = std::env::current_dir().ok();
    let relative = if file.is_relative() {
        Some(file.to_path_buf())
    } else {
        cwd.as_deref()
            .and_then(|cwd| file.strip_prefix(cwd).ok())
            .map(std::path::Path::to_path_buf)
    };
    match relative {
        Some(path) => json!({"uri": percent_encode(&path.to_string_lossy()), "uriBaseId": "%SRCROOT%"}),
        None => json!({"uri": format!("file://{}", percent_encode(&file.to_string_lossy()))}),
    }
}

/// Every byte but RFC 3986's unreserved characters and `/` as `%XX`.
fn percent_encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn sarif_level(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical | Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low | Severity::Info => "note",
    }
}

/// The objects an Agent uses: its Policies, ContextPack, SandboxProfile and its Sessions.
fn used_by(harness: &Harness, agent: &super::harness::Object<contextos_crds::AgentSpec>) -> Vec<ObjectRef> {
    let mut uses: Vec<ObjectRef> = harness
        .policies_of(agent)
        .into_iter()
        .map(|p| p.id.clone())
        .collect();
    uses.extend(
        harness
            .find(&harness.context_packs, agent, &agent.spec.context_pack_ref.name)
            .map(|p| p.id.clone()),
    );
    uses.extend(harness.sandbox_of(agent).map(|s| s.id.clone()));
    uses.extend(
        harness
            .sessions
            .iter()
            .filter(|s| s.same_namespace(agent) && s.spec.agent_ref.name == agent.id.name)
            .map(|s| s.id.clone()),
    );
    uses
}

/// The rule table (Markdown) the README carries: id, severity, what, why, fix.
pub fn rules_markdown() -> String {
    let mut out = String::from("| rule | severity | what | why | fix |\n|---|---|---|---|---|\n");
    for (rule, _) in rules::catalogue() {
        let cell = |text: &str| text.replace('|', "\\|");
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            rule.id,
            rule.severity,
            cell(rule.title),
            cell(rule.why),
            cell(rule.fix)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sarif_locations_are_uris() {
        assert_eq!(percent_encode("sp ace/pol#1.yaml"), "sp%20ace/pol%231.yaml");
        let relative = artifact_location(std::path::Path::new("deploy/a b.yaml"));
        assert_eq!(relative["uri"], "deploy/a%20b.yaml");
        assert_eq!(relative["uriBaseId"], "%SRCROOT%");
        let elsewhere = artifact_location(std::path::Path::new("/nonexistent-root/x.yaml"));
        assert_eq!(elsewhere["uri"], "file:///nonexistent-root/x.yaml");
    }
}
