//! The Chief-of-Staff digest (pure): for the people who review, what the agents of a tenant did
//! in a window, what failed and why, what recurs (insights and open questions), the proposals
//! waiting for a decision with their replay verdicts, and what was promoted — as text, JSON, or
//! one self-contained HTML page (no script, no external resource; every value escaped).

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::insights::{Gathered, Insight, Question, signals::EntryRef};

/// One agent's window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentDigest {
    pub runs: u64,
    pub completed: u64,
    /// Failed runs by reason, with the newest of them.
    pub failed: BTreeMap<String, (u64, Vec<String>)>,
    pub tool_calls: u64,
    pub denied_calls: u64,
    pub approvals_granted: u64,
    pub approvals_refused: u64,
}

/// A proposal as the digest shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProposalLine {
    pub name: String,
    pub target: String,
    pub phase: String,
    /// The change, one line per operation.
    pub changes: Vec<String>,
    /// The replay verdict in a sentence, when there is one.
    pub replay: Option<String>,
    pub why: Option<String>,
    pub decided_by: Option<String>,
}

/// A revision promoted in the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// `Policy/oncall-guardrails`.
    pub object: String,
    pub revision: String,
    /// How (`replay`, `proposal`, `bypass`, …).
    pub by: String,
    /// When it came into force (RFC 3339).
    pub at: String,
}

/// Everything the digest says.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Digest {
    pub tenant: String,
    pub since: String,
    pub runs: usize,
    pub agents: BTreeMap<String, AgentDigest>,
    pub insights: Vec<Insight>,
    pub open_questions: Vec<Question>,
    /// None: not read (no cluster named).
    pub proposals: Option<Vec<ProposalLine>>,
    pub promotions: Option<Vec<Promotion>>,
    /// Runs left out, and why.
    pub unreadable: Vec<(String, String)>,
}

/// The most failed runs a digest names per reason.
const NAMED_RUNS: usize = 5;

impl Digest {
    /// The digest of `gathered` with its insights and questions.
    pub fn new(
        tenant: &str,
        since: &str,
        gathered: &Gathered,
        insights: Vec<Insight>,
        open_questions: Vec<Question>,
    ) -> Self {
        let agents = gathered
            .signals
            .agents
            .iter()
            .map(|(name, s)| {
                let runs_of = |evidence: &[EntryRef]| {
                    let mut runs: Vec<String> = Vec::new();
                    for e in evidence {
                        if !runs.contains(&e.run_id) && runs.len() < NAMED_RUNS {
                            runs.push(e.run_id.clone());
                        }
                    }
                    runs
                };
                let digest = AgentDigest {
                    runs: s.runs,
                    completed: s.completed,
                    failed: s
                        .failed
                        .iter()
                        .map(|(reason, t)| (reason.clone(), (t.runs, runs_of(&t.evidence))))
                        .collect(),
                    tool_calls: s.tools.values().map(|t| t.calls).sum(),
                    denied_calls: s
                        .tools
                        .values()
                        .map(|t| t.denied.values().map(|d| d.count).sum::<u64>())
                        .sum(),
                    approvals_granted: s.tools.values().map(|t| t.approvals_granted.count).sum(),
                    approvals_refused: s.tools.values().map(|t| t.approvals_refused.count).sum(),
                };
                (name.clone(), digest)
            })
            .collect();
        Self {
            tenant: tenant.to_owned(),
            since: since.to_owned(),
            runs: gathered.runs,
            agents,
            insights,
            open_questions,
            proposals: None,
            promotions: None,
            unreadable: gathered.unreadable.clone(),
        }
    }

    /// Proposals that wait for a decision (or for their replay), first.
    fn waiting(&self) -> Vec<&ProposalLine> {
        let mut lines: Vec<&ProposalLine> = self.proposals.iter().flatten().collect();
        let rank = |p: &ProposalLine| match p.phase.as_str() {
            "Reviewable" => 0,
            "Replaying" => 1,
            _ => 2,
        };
        lines.sort_by_key(|p| (rank(p), p.name.clone()));
        lines
    }

    /// As a person reads it in a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "ContextOS digest — tenant {}, the last {}: {} run(s)\n",
            self.tenant, self.since, self.runs
        );
        out.push_str("\nWhat the agents did\n");
        if self.agents.is_empty() {
            out.push_str("  no runs\n");
        }
        for (name, a) in &self.agents {
            let _ = writeln!(
                out,
                "  {name}: {} run(s), {} completed, {} failed; {} tool call(s), {} denied; approvals {} granted, {} refused",
                a.runs,
                a.completed,
                a.failed.values().map(|(n, _)| n).sum::<u64>(),
                a.tool_calls,
                a.denied_calls,
                a.approvals_granted,
                a.approvals_refused
            );
        }
        out.push_str("\nWhat failed and why\n");
        let mut any = false;
        for (name, a) in &self.agents {
            for (reason, (runs, named)) in &a.failed {
                any = true;
                let _ = writeln!(
                    out,
                    "  {name}: {} in {runs} run(s): {}",
                    crate::text::for_terminal(reason),
                    named.join(" ")
                );
            }
        }
        if !any {
            out.push_str("  nothing failed\n");
        }
        out.push_str("\nWhat recurs\n");
        if self.insights.is_empty() {
            out.push_str("  no insights\n");
        }
        for i in &self.insights {
            let _ = writeln!(
                out,
                "  {} — {}\n    consider: {}",
                i.kind.as_str(),
                i.summary,
                i.consider
            );
        }
        for q in &self.open_questions {
            let _ = writeln!(out, "  open: {} (settled by {})", q.insight.summary, q.settle);
        }
        out.push_str("\nProposals\n");
        match &self.proposals {
            None => out.push_str("  not read (name --cluster to read them)\n"),
            Some(list) if list.is_empty() => out.push_str("  none\n"),
            Some(_) => {
                for p in self.waiting() {
                    let _ = writeln!(
                        out,
                        "  {} ({}): {}{}{}\n    {}",
                        p.name,
                        p.target,
                        p.phase,
                        p.replay
                            .as_ref()
                            .map(|r| format!("; replay: {r}"))
                            .unwrap_or_default(),
                        p.decided_by
                            .as_ref()
                            .map(|d| format!("; decided by {d}"))
                            .unwrap_or_default(),
                        p.changes.join("; ")
                    );
                }
            }
        }
        out.push_str("\nPromoted\n");
        match &self.promotions {
            None => out.push_str("  not read (name --cluster to read them)\n"),
            Some(list) if list.is_empty() => out.push_str("  nothing in the window\n"),
            Some(list) => {
                for p in list {
                    let _ = writeln!(out, "  {} {} ({}, {})", p.object, short(&p.revision), p.by, p.at);
                }
            }
        }
        for (run, why) in &self.unreadable {
            let _ = writeln!(out, "left out: run {run}: {why}");
        }
        out
    }

    /// One self-contained HTML page.
    pub fn html(&self) -> String {
        let mut out = String::from(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
             <title>ContextOS digest</title><style>\
             body{font:15px/1.5 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}\
             h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd}\
             table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eee;vertical-align:top}\
             .ok{color:#176f2c}.bad{color:#a4161a}.muted{color:#666}code{font-size:.9em}\
             </style></head><body>\n",
        );
        let _ = writeln!(
            out,
            "<h1>ContextOS digest — tenant {}</h1><p class=\"muted\">the last {}: {} run(s)</p>",
            esc(&self.tenant),
            esc(&self.since),
            self.runs
        );
        out.push_str("<h2>What the agents did</h2><table><tr><th>agent</th><th>runs</th><th>completed</th><th>failed</th><th>tool calls</th><th>denied</th><th>approvals granted / refused</th></tr>\n");
        for (name, a) in &self.agents {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td class=\"ok\">{}</td><td class=\"bad\">{}</td><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
                esc(name),
                a.runs,
                a.completed,
                a.failed.values().map(|(n, _)| n).sum::<u64>(),
                a.tool_calls,
                a.denied_calls,
                a.approvals_granted,
                a.approvals_refused
            );
        }
        out.push_str("</table>\n<h2>What failed and why</h2><ul>\n");
        for (name, a) in &self.agents {
            for (reason, (runs, named)) in &a.failed {
                let _ = writeln!(
                    out,
                    "<li>{}: <b>{}</b> in {} run(s) <span class=\"muted\">{}</span></li>",
                    esc(name),
                    esc(reason),
                    runs,
                    esc(&named.join(" "))
                );
            }
        }
        out.push_str("</ul>\n<h2>What recurs</h2><ul>\n");
        for i in &self.insights {
            let _ = writeln!(
                out,
                "<li><b>{}</b> — {}<br><span class=\"muted\">consider: {}</span></li>",
                esc(i.kind.as_str()),
                esc(&i.summary),
                esc(&i.consider)
            );
        }
        for q in &self.open_questions {
            let _ = writeln!(
                out,
                "<li class=\"muted\">open: {} (settled by {})</li>",
                esc(&q.insight.summary),
                esc(&q.settle)
            );
        }
        out.push_str("</ul>\n<h2>Proposals</h2>\n");
        match &self.proposals {
            None => out.push_str("<p class=\"muted\">not read</p>\n"),
            Some(_) => {
                out.push_str("<table><tr><th>proposal</th><th>target</th><th>phase</th><th>change</th><th>replay</th></tr>\n");
                for p in self.waiting() {
                    let _ = writeln!(
                        out,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&p.name),
                        esc(&p.target),
                        esc(&p.phase),
                        esc(&p.changes.join("; ")),
                        esc(p.replay.as_deref().unwrap_or("—"))
                    );
                }
                out.push_str("</table>\n");
            }
        }
        out.push_str("<h2>Promoted</h2>\n");
        match &self.promotions {
            None => out.push_str("<p class=\"muted\">not read</p>\n"),
            Some(list) => {
                out.push_str("<ul>\n");
                for p in list {
                    let _ = writeln!(
                        out,
                        "<li>{} <code>{}</code> by {} at {}</li>",
                        esc(&p.object),
                        esc(short(&p.revision)),
                        esc(&p.by),
                        esc(&p.at)
                    );
                }
                out.push_str("</ul>\n");
            }
        }
        out.push_str("</body></html>\n");
        out
    }
}

/// The first 12 characters of a digest's hex, for people to tell digests apart. Whatever the
/// text is (a runner wrote some of it), it is cut between characters, never inside one.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.char_indices().nth(12).map_or(hex, |(end, _)| &hex[..end])
}

/// `text` safe in HTML text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insights::{Signals, Thresholds, synthesize};

    #[test]
    fn what_a_run_said_is_escaped_in_the_page() {
        let gathered = Gathered {
            signals: Signals::default(),
            runs: 0,
            unreadable: Vec::new(),
            truncated: false,
        };
        let mut digest = Digest::new(
            "shop",
            "7d",
            &gathered,
            synthesize(&Signals::default(), Thresholds::default()),
            Vec::new(),
        );
        digest.proposals = Some(vec![ProposalLine {
            name: "p".into(),
            target: "Policy/x".into(),
            phase: "Reviewable".into(),
            changes: vec!["add rule <script>alert(1)</script>".into()],
            replay: Some("passed".into()),
            why: None,
            decided_by: None,
        }]);
        let page = digest.html();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("default-src 'none'"), "no resource may be loaded");
        assert!(digest.text().contains("p (Policy/x): Reviewable; replay: passed"));
    }
}
