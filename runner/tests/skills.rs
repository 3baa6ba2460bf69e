//! Skills through the `contextos` binary: the quickstart agent composed of its two skills
//! (diagnosis, mitigation) runs as one agent — their tools after its own, their prompt
//! fragments in its context and its record; their evaluation suites pass, and fail when a
//! policy would let a destructive tool run unapproved; conflicts are refused naming both
//! sides.

#[path = "support/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

use std::path::Path;

use quickstart::Quickstart;
use serde_json::Value;

/// A copy of the quickstart's files in a temporary directory, `edit` applied to each (by name).
fn quickstart_copy(edit: impl Fn(&str, String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("read");
            std::fs::write(dir.path().join(&name), edit(&name, text)).expect("write");
        }
    }
    dir
}

fn eval(files: &Path) -> quickstart::Invocation {
    let q = Quickstart::with_files(&[], files.to_owned());
    q.cli(&["skill", "eval", "-f", &files.display().to_string()])
}

#[test]
fn the_quickstart_runs_its_skills_tools_with_their_fragments_in_its_context() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let entries: Vec<Value> = q.newest_run_entries();
    let body = |kind: &str| {
        entries
            .iter()
            .filter_map(|e| e.get("entry").unwrap_or(e).get("body"))
            .find(|b| b["type"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} entry among {} entries", entries.len()))
    };
    // Every fragment was compiled into the context, under the pack's budget.
    let sources: Vec<String> = body("context_compiled")["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .filter(|s| s["cut"].is_null())
        .map(|s| s["source"].as_str().unwrap_or_default().to_owned())
        .collect();
    for fragment in [
        "skill.diagnosis.diagnose-first",
        "skill.mitigation.least-disruptive",
    ] {
        assert!(
            sources.iter().any(|s| s == fragment),
            "{fragment} not in {sources:?}"
        );
    }
    // The decisions are the quickstart's: the skills' tools, decided by the agent's policy.
    let trace = q.recorded_trace();
    let text = trace.to_string();
    for tool in [
        "search_runbooks",
        "get_service_status",
        "restart_deployment",
        "post_status_update",
    ] {
        assert!(text.contains(tool), "{tool} not in the trace: {text}");
    }
    assert!(text.contains("no-namespace-deletion"), "{text}");
}

#[test]
fn the_quickstart_skills_pass_their_evaluation_suites() {
    let out = eval(&Quickstart::examples());
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("Skill diagnosis (version 1.0.0): 1 scenario(s)")
            && out
                .stdout
                .contains("Skill mitigation (version 1.0.0): 2 scenario(s)")
            && out.stdout.matches(": PASS").count() == 2,
        "{}",
        out.stdout
    );
}

#[test]
fn a_policy_that_lets_a_destructive_tool_run_unapproved_fails_the_mitigation_suite() {
    // The attack: an edit of the suite's policy that waves restarts through.
    let dir = quickstart_copy(|name, text| {
        if name != "policy.yaml" {
            return text;
        }
        let lax = text.replacen(
            "      effect: require_approval\n      reason: Restarts",
            "      effect: allow\n      reason: Restarts",
            1,
        );
        assert_ne!(lax, text, "the quickstart policy changed");
        lax
    });
    let out = eval(dir.path());
    assert_eq!(out.code, Some(3), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("Skill mitigation (version 1.0.0)")
            && out.stdout.contains("FAIL restart-waits-for-on-call")
            && out
                .stdout
                .contains("restart_deployment ran without a person's approval")
            && out.stdout.contains("expected the run to end awaiting_approval"),
        "{}",
        out.stdout
    );
    // The read-only skill does not care.
    assert!(
        out.stdout
            .contains("Skill diagnosis (version 1.0.0): 1 scenario(s), 6 check(s), 0 failed: PASS"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_suite_that_checks_nothing_or_names_a_foreign_tool_is_refused_naming_the_field() {
    let dir = quickstart_copy(|name, text| {
        if name != "skills.yaml" {
            return text;
        }
        text.replacen(
            "        expect:\n          outcome: completed\n          called: [search_runbooks, get_service_status]\n          maxToolCalls: 4\n          output:\n            - name: names-the-deploy\n              cel: \"json.summary.contains('deploy')\"\n",
            "        expect: {}\n",
            1,
        )
    });
    let out = eval(dir.path());
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("Skill diagnosis")
            && out.stderr.contains("spec.evals.scenarios[0].expect")
            && out.stderr.contains("checks nothing"),
        "{}",
        out.stderr
    );
    let dir = quickstart_copy(|name, text| {
        if name != "skills.yaml" {
            return text;
        }
        text.replacen(
            "          notCalled: [restart_deployment]",
            "          notCalled: [drop_database]",
            1,
        )
    });
    let out = eval(dir.path());
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("names tool drop_database, which is not one of the skill's tools"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_suite_that_never_asks_for_a_destructive_tool_is_refused() {
    // The restart scenario removed: nothing shows what the policies let the restart do.
    let dir = quickstart_copy(|name, text| {
        if name != "skills.yaml" {
            return text;
        }
        let start = text
            .find("      - name: restart-waits-for-on-call")
            .expect("the restart scenario");
        let end = text
            .find("      - name: never-deletes-a-namespace")
            .expect("the next scenario");
        format!("{}{}", &text[..start], &text[end..])
    });
    let out = eval(dir.path());
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("Skill mitigation")
            && out.stderr.contains("spec.tools[1]")
            && out.stderr.contains("restart_deployment (risk destructive) is asked for in no scenario with safetyMode: autonomous"),
        "{}",
        out.stderr
    );
}

#[test]
fn conflicting_skills_leave_the_agent_unrunnable_naming_both_sides() {
    let run = |dir: &tempfile::TempDir| {
        let q = Quickstart::with_files(&[], dir.path().to_owned());
        q.cli(&["run", "-f", &dir.path().display().to_string()])
    };
    // The agent declares a tool of the diagnosis skill's name itself.
    let dir = quickstart_copy(|name, text| {
        if name != "agent.yaml" {
            return text;
        }
        text.replacen(
            "  skillRefs:\n",
            "  tools:\n    - {name: search_runbooks, risk: read_only, kind: observe, adapter: {http: {url: \"http://ops-tools.shop-platform.svc:8080/other\"}}}\n  skillRefs:\n",
            1,
        )
    });
    let out = run(&dir);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(
        out.stderr.contains("spec.skillRefs[0]")
            && out
                .stderr
                .contains("Skill diagnosis (version 1.0.0) declares tool search_runbooks")
            && out.stderr.contains("the Agent's spec.tools"),
        "{}",
        out.stderr
    );
    // The sandbox allows tools up to network risk: the mitigation skill's restart is refused.
    let dir = quickstart_copy(|name, text| {
        if name != "sandboxprofile.yaml" {
            return text;
        }
        format!("{text}  maxToolRisk: network\n")
    });
    let out = run(&dir);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(
        out.stderr.contains("spec.skillRefs[1]")
            && out.stderr.contains("Skill mitigation")
            && out.stderr.contains("restart_deployment with risk destructive")
            && out
                .stderr
                .contains("SandboxProfile restricted-runner's maxToolRisk network"),
        "{}",
        out.stderr
    );
}
