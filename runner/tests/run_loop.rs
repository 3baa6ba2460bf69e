//! The run loop end to end through the `contextos` binary against the real ops-tools server:
//! the quickstart session (read, denied call, approval, completion), validation of the record,
//! same-version replay (byte-identical decisions), replay under a stricter candidate (the gate
//! fails), and SIGKILL at every durable boundary with no duplicate tool effects.

#[path = "support/quickstart.rs"]
mod quickstart;

use quickstart::{HMAC_KEY, Quickstart, kill};
use serde_json::Value;

/// The effects an uninterrupted quickstart has: one restart and one status update, each once.
fn assert_effects_once(q: &Quickstart, context: &str) {
    let keys = q.tools.effect_keys();
    let paths: Vec<&str> = keys.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/deployments/restart", "/hooks/status"],
        "{context}: effects {keys:?}"
    );
}

#[test]
fn the_quickstart_pauses_for_approval_completes_and_replays() {
    let q = Quickstart::new(&[]);
    let first = q.step(false, None);
    assert_eq!(
        first.code,
        Some(4),
        "pauses for approval:\n{}\n{}",
        first.stdout,
        first.stderr
    );
    assert!(
        first.stdout.contains("search_runbooks: executed"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stdout
            .contains("delete_namespace: DENIED by oncall-guardrails/no-namespace-deletion")
    );
    assert!(
        first.stdout.contains("paused: restart_deployment"),
        "{}",
        first.stdout
    );
    assert!(q.tools.effect_keys().is_empty(), "nothing acts before approval");

    let hash = q.pending_hash();
    let stranger = q.cli(&[
        "approve",
        "checkout-5xx",
        "--call",
        &hash,
        "--as",
        "mallory@example.com",
    ]);
    assert_eq!(stranger.code, Some(1));
    assert!(
        stranger.stderr.contains("may not decide this call"),
        "{}",
        stranger.stderr
    );
    let early = q.step(true, None);
    assert_eq!(
        early.code,
        Some(4),
        "still waiting without an approval: {}",
        early.stdout
    );

    q.approve();
    let done = q.step(true, None);
    assert_eq!(done.code, Some(0), "completes:\n{}\n{}", done.stdout, done.stderr);
    assert!(
        done.stdout
            .contains("validators passed: summary-shape, mentions-a-cause"),
        "{}",
        done.stdout
    );
    assert_effects_once(&q, "uninterrupted");

    let verify = q.cli(&["records", "verify", "--all"]);
    assert_eq!(verify.code, Some(0), "{}{}", verify.stdout, verify.stderr);

    // Same versions: byte-identical decisions.
    let same = q.cli(&["replay", "--session", "checkout-5xx", "--output", "json"]);
    let report: Value = serde_json::from_str(&same.stdout).expect("json");
    assert_eq!(same.code, Some(0), "{}", same.stdout);
    assert_eq!(report["identical_runs"], 1, "{report:#}");

    // A finished session can run again (a new run); an unfinished one must be resumed instead.
    assert_eq!(
        q.step(false, None).code,
        Some(4),
        "a second run pauses at the restart again"
    );
    let twice = q.step(false, None);
    assert_eq!(twice.code, Some(1));
    assert!(
        twice.stderr.contains("already has an unfinished run"),
        "{}",
        twice.stderr
    );
}

#[test]
fn a_stricter_candidate_policy_fails_the_replay_gate_and_names_the_divergence() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let run_id = {
        let list = q.cli(&["records", "list", "--session", "checkout-5xx"]);
        list.stdout
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .expect("run listed")
            .to_owned()
    };
    let strict = Quickstart::examples().join("candidates/policy-no-restarts.yaml");
    let out = q.cli(&[
        "replay",
        "--run",
        &run_id,
        "--candidate",
        &strict.display().to_string(),
        "--output",
        "json",
    ]);
    assert_eq!(out.code, Some(3), "the gate fails: {}{}", out.stdout, out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("json");
    let divergences = report["replays"][0]["divergences"].as_array().expect("list");
    let restart = divergences
        .iter()
        .find(|d| d["tool"] == "restart_deployment")
        .expect("the restart diverges");
    assert_eq!(restart["kind"], "newly_denied", "{restart:#}");
    assert_eq!(restart["step"], 4);
    assert_eq!(report["passed"], false);

    let text = q.cli(&[
        "replay",
        "--run",
        &run_id,
        "--candidate",
        &strict.display().to_string(),
    ]);
    assert!(
        text.stdout.contains("step 4 restart_deployment: newly denied"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("→ FAIL"), "{}", text.stdout);
    let lenient = q.cli(&[
        "replay",
        "--run",
        &run_id,
        "--candidate",
        &strict.display().to_string(),
        "--max-divergence-percent",
        "50",
    ]);
    assert_eq!(
        lenient.code,
        Some(0),
        "under the threshold the gate passes: {}",
        lenient.stdout
    );
}

/// A data directory can come with a checkout: a link left at a name an approval once wrote
/// through is not followed (the decisions go to a new file, then renamed into place).
#[test]
fn an_approval_never_writes_through_a_link_left_in_the_data_directory() {
    let q = Quickstart::new(&[]);
    let paused = q.step(false, None);
    assert_eq!(paused.code, Some(4), "{paused:?}");
    let victim = q.data.path().join("victim.txt");
    std::fs::write(&victim, "keep me").expect("write");
    let approvals = q.data.path().join("approvals/shop");
    std::fs::create_dir_all(&approvals).expect("dir");
    std::os::unix::fs::symlink(&victim, approvals.join("checkout-5xx.json.tmp")).expect("link");
    q.approve();
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep me");
    let decisions = approvals.join("checkout-5xx.json");
    assert!(std::fs::symlink_metadata(&decisions).expect("written").is_file());
    let done = q.step(true, None);
    assert_eq!(done.code, Some(0), "{done:?}");
}

/// Sessions that make no tool call, or call only tools a Policy change does not reach, started
/// just before the change is gated, cannot crowd the run that would show it out of the sample:
/// the change decides them as recorded, so they take no place in it. A tool the change may
/// open more widely that no run calls fails the gate; one it only closes does not.
#[test]
fn runs_a_policy_change_does_not_reach_take_no_place_in_its_gates_sample() {
    let files = tempfile::tempdir().expect("files");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("quickstart") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), files.path().join(entry.file_name())).expect("copy");
        }
    }
    let q = Quickstart::with_files(&[], files.path().to_owned());
    q.drive(None);

    // Then two Sessions of the same Agent whose model answers at once, calling nothing.
    let configmaps = files.path().join("configmaps.yaml");
    let text = std::fs::read_to_string(&configmaps).expect("configmaps.yaml");
    let start = text.find("    {\n      \"turns\"").expect("the script");
    let answer = r#"    {"turns": [{"content": "{\"summary\": \"nothing to do here, all is well today\", \"actions\": [], \"resolved\": true}"}]}
"#;
    std::fs::write(&configmaps, format!("{}{answer}", &text[..start])).expect("write");
    let session = files.path().join("session.yaml");
    let text = std::fs::read_to_string(&session).expect("session.yaml");
    for name in ["hello-1", "hello-2"] {
        std::fs::write(
            &session,
            text.replacen("name: checkout-5xx", &format!("name: {name}"), 1),
        )
        .expect("write");
        // (The critic asks for evidence and the script has no more turns: the run ends, failed,
        // having called nothing — finished, as a gate's sample takes runs.)
        let quiet = q.step(false, None);
        assert!(quiet.stdout.contains("0 tool call(s)"), "{quiet:?}");
    }

    // Replayed, a run whose model could not answer ends as it did (not "the replay went
    // further than the original run"): it does not count as diverged in every gate.
    let same = q.cli(&["replay", "--session", "hello-1"]);
    assert_eq!(same.code, Some(0), "{}{}", same.stdout, same.stderr);
    assert!(same.stdout.contains("1 identical, 0 diverged"), "{}", same.stdout);

    // And two newest Sessions that only read a runbook.
    let reads = r#"    {"turns": [{"content": "Reading the runbook.", "toolCalls": [{"tool": "search_runbooks", "arguments": {"query": "checkout-api"}}]}, {"content": "{\"summary\": \"the runbook says to wait, nothing to do today\", \"actions\": [], \"resolved\": true}"}]}
"#;
    let current = std::fs::read_to_string(&configmaps).expect("configmaps.yaml");
    let start = current.find("    {\"turns\"").expect("the script");
    std::fs::write(&configmaps, format!("{}{reads}", &current[..start])).expect("write");
    for name in ["reader-1", "reader-2"] {
        std::fs::write(
            &session,
            text.replacen("name: checkout-5xx", &format!("name: {name}"), 1),
        )
        .expect("write");
        let read = q.step(false, None);
        assert!(read.stdout.contains("1 tool call(s)"), "{read:?}");
    }

    // A Policy that lets the agent delete namespaces, replayed on a sample of two.
    let policy = std::fs::read_to_string(Quickstart::examples().join("policy.yaml")).expect("policy.yaml");
    let loosened = policy.replacen(
        "      effect: deny\n      reason: Deleting namespaces",
        "      effect: allow\n      reason: Deleting namespaces",
        1,
    );
    assert_ne!(loosened, policy);
    let candidate = files.path().join("candidate-policy.yaml.txt");
    std::fs::write(&candidate, loosened).expect("write");
    let out = q.cli(&[
        "replay",
        "--sample",
        "2",
        "--candidate",
        &candidate.display().to_string(),
    ]);
    assert_eq!(out.code, Some(3), "the gate fails: {}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("delete_namespace: newly allowed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("2 run(s) made no tool call"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("2 run(s) call no tool whose rules the candidate changes"),
        "{}",
        out.stdout
    );
    // Read no further than the two newest runs (the readers), the sample holds no run that
    // calls the tool the change opens, while the window holds more: it does not pass on what
    // is left.
    let short = q.cli(&[
        "replay",
        "--sample",
        "2",
        "--examine",
        "2",
        "--candidate",
        &candidate.display().to_string(),
    ]);
    assert_ne!(short.code, Some(0), "{}{}", short.stdout, short.stderr);
    assert!(
        format!("{}{}", short.stdout, short.stderr).contains(
            "may decide calls of delete_namespace more leniently than the policies the runs ran under, and none of the newest 2 runs of the window calls it"
        ),
        "{}{}",
        short.stdout,
        short.stderr
    );

    // A rule denying error_budget, which no run ever called, can only close: nothing fails,
    // and with no run to judge the gate has no history (as a new Agent's has none: an approver
    // promotes without replay).
    let closing = policy.replacen(
        "  rules:\n",
        "  rules:\n    - name: no-budget-math\n      match:\n        tools: [error_budget]\n      effect: deny\n      reason: Arithmetic.\n",
        1,
    );
    assert_ne!(closing, policy);
    std::fs::write(&candidate, &closing).expect("write");
    let closing = q.cli(&[
        "replay",
        "--sample",
        "2",
        "--candidate",
        &candidate.display().to_string(),
    ]);
    let said = format!("{}{}", closing.stdout, closing.stderr);
    assert!(
        said.contains("no finished run matched")
            && said.contains("3 run(s) call no tool whose rules the candidate changes")
            && !said.contains("more leniently"),
        "{said}"
    );
}

#[test]
fn a_run_killed_at_every_boundary_resumes_to_the_same_decisions_without_duplicate_effects() {
    let reference = Quickstart::new(&[]);
    let (boundaries, _) = reference.drive(None);
    // The start, each model turn that asks for tools, each call, the approval pause, the end.
    assert!(
        boundaries >= 12,
        "the quickstart passes {boundaries} durable boundaries"
    );
    let expected = reference.recorded_trace();
    assert_effects_once(&reference, "reference");

    for kill_at in 1..=boundaries {
        let q = Quickstart::new(&[]);
        let (_, killed) = q.drive(Some(kill_at));
        assert!(killed, "boundary {kill_at} was reached and killed");
        let trace = q.recorded_trace();
        assert_eq!(
            trace, expected,
            "killed at boundary {kill_at}: the decisions differ from an uninterrupted run"
        );
        assert_effects_once(&q, &format!("killed at boundary {kill_at}"));
    }
}

/// Starts the approved restart (held back 4 s by the tool) and kills the run while it acts.
fn kill_while_restarting(q: &Quickstart) {
    assert_eq!(q.step(false, None).code, Some(4));
    q.approve();
    // Resume, and kill it while the restart's response is still on its way.
    let mut resume = std::process::Command::new(env!("CARGO_BIN_EXE_contextos"));
    resume
        .arg("--data-dir")
        .arg(q.data.path())
        .args(["--tenant", "shop", "resume", "checkout-5xx"])
        .args([
            "--secret",
            &format!("ops-tools-webhook/hmac-key={}", HMAC_KEY),
            "--endpoint-override",
            &format!("http://ops-tools.shop-platform.svc:8080={}", q.tools.url),
            "--endpoint-override",
            &format!("http://ops-tools.shop-platform.svc:8081={}", q.tools.url),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = resume.spawn().expect("resume");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while q.tools.effect_keys().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restart never reached the tool"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    kill(&child);
    let _ = child.wait();
}

#[test]
fn a_run_killed_while_an_idempotent_tool_acts_resends_with_the_same_key_and_the_effect_happens_once() {
    let q = Quickstart::new(&["--slow", "/deployments/restart=4000"]);
    kill_while_restarting(&q);
    let done = q.step(true, None);
    assert_eq!(done.code, Some(0), "{}\n{}", done.stdout, done.stderr);
    assert_effects_once(&q, "killed mid-call");
    let requests = q.tools.effects()["requests"].as_u64().expect("requests");
    assert_eq!(
        requests, 3,
        "the restart was sent twice with one key (plus the status update)"
    );
}

#[test]
fn a_tool_that_cannot_dedupe_is_never_sent_twice_and_a_human_resolves_whether_it_acted() {
    // The quickstart with a restart tool that does not honour idempotency keys.
    let files = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(Quickstart::examples())
        .expect("examples")
        .flatten()
    {
        let path = entry.path();
        if path.is_file() {
            let text = std::fs::read_to_string(&path).expect("read");
            let text = text.replace(
                "      idempotent: true\n      timeoutSeconds: 60",
                "      timeoutSeconds: 60",
            );
            std::fs::write(files.path().join(entry.file_name()), text).expect("write");
        }
    }
    let q = Quickstart::with_files(&["--slow", "/deployments/restart=4000"], files.path().to_owned());
    kill_while_restarting(&q);
    // Resumed, the call is not sent again: the run waits for a human to say whether it acted.
    let paused = q.step(true, None);
    assert_eq!(paused.code, Some(4), "{}\n{}", paused.stdout, paused.stderr);
    assert!(
        paused.stdout.contains("is unknown") && paused.stdout.contains("restart_deployment"),
        "the run says which call is in doubt:\n{}",
        paused.stdout
    );
    let call = paused
        .stdout
        .split("(call ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the paused run names the call")
        .to_owned();
    // Resuming again without a finding changes nothing.
    let still = q.step(true, None);
    assert_eq!(still.code, Some(4), "{}\n{}", still.stdout, still.stderr);
    // A finding on another call is refused; on this one, the run goes on.
    let wrong = q.cli(&[
        "resolve",
        "checkout-5xx",
        "--call",
        "9.9",
        "--acted",
        "--as",
        "dana@example.com",
    ]);
    assert_ne!(wrong.code, Some(0), "{}", wrong.stdout);
    let resolved = q.cli(&[
        "resolve",
        "checkout-5xx",
        "--call",
        &call,
        "--acted",
        "--as",
        "dana@example.com",
        "--note",
        "the rollout history shows the restart at 14:31",
    ]);
    assert_eq!(resolved.code, Some(0), "{}\n{}", resolved.stdout, resolved.stderr);
    let done = q.step(true, None);
    assert_eq!(done.code, Some(0), "{}\n{}", done.stdout, done.stderr);
    let requests = q.tools.effects()["requests"].as_u64().expect("requests");
    assert_eq!(
        requests, 2,
        "the restart was sent once and never again (plus the status update)"
    );
    let run = done
        .stdout
        .split("record: run ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the run id")
        .to_owned();
    let timeline = q.cli(&["records", "show", &run]);
    assert!(
        timeline.stdout.contains("dana@example.com found that call") && timeline.stdout.contains("acted"),
        "the record says who resolved it:\n{}",
        timeline.stdout
    );
}

/// `contextos audit --records` over the quickstart's own records: the tool the script never
/// calls is reported, and no rule is reported unused — every rule's match selected a call (the
/// namespace deletion its deny rule, the status update both its rules), although the record
/// names only the deciding rule of each.
#[test]
fn the_audit_of_the_quickstarts_records_finds_what_the_run_did() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let files: Vec<String> = [
        "agent.yaml",
        "skills.yaml",
        "policy.yaml",
        "contextpack.yaml",
        "sandboxprofile.yaml",
        "session.yaml",
    ]
    .iter()
    .map(|f| Quickstart::examples().join(f).display().to_string())
    .collect();
    let mut args = vec!["audit", "--records", "--format", "json"];
    args.extend(files.iter().map(String::as_str));
    let out = q.cli(&args);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("a JSON report");
    let findings: Vec<(String, String)> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap_or_default().to_owned(),
                f["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let has = |rule: &str, text: &str| findings.iter().any(|(r, m)| r == rule && m.contains(text));
    assert!(
        has(
            "records/tool-never-used",
            "error_budget was called in none of 1 runs"
        ),
        "{findings:#?}"
    );

    for used in [
        "search_runbooks",
        "get_service_status",
        "delete_namespace",
        "restart_deployment",
        "post_status_update",
    ] {
        assert!(
            !has("records/tool-never-used", &format!("{used} was")),
            "{used} was called: {findings:#?}"
        );
    }
    for decided in [
        "no-namespace-deletion",
        "allow-reads",
        "sev1-updates-need-a-human",
        "allow-status-updates",
        "destructive-needs-oncall",
    ] {
        assert!(
            !has("records/rule-never-matched", &format!("rule {decided} ")),
            "{decided} matched a call: {findings:#?}"
        );
    }
    assert!(
        !findings
            .iter()
            .any(|(r, _)| r == "records/default-effect-decided"),
        "{findings:#?}"
    );
}

/// `contextos insights` over the quickstart's own records: the denied namespace deletion is a
/// pattern once one run is enough, pointing at the decision entry of that run; the approval of
/// the restart is counted under its rule; and with the default of two runs nothing recurs.
#[test]
fn insights_over_the_quickstarts_records_point_at_what_the_run_did() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let out = q.cli(&["insights", "--since", "1d", "--min-runs", "1", "--format", "json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("a JSON report");
    assert_eq!(report["runs"], 1, "{report:#}");
    let insights = report["insights"].as_array().expect("insights");
    let denial = insights
        .iter()
        .find(|i| i["kind"] == "repeated-denial" && i["about"] == "delete_namespace")
        .unwrap_or_else(|| panic!("no denial insight: {report:#}"));
    assert!(
        denial["summary"]
            .as_str()
            .is_some_and(|s| s.contains("oncall-guardrails/no-namespace-deletion denied it")),
        "{denial:#}"
    );
    let evidence = &denial["evidence"][0];
    let run = evidence["runId"].as_str().expect("run id");
    let shown = q.cli(&["records", "show", run]);
    assert!(
        shown.stdout.contains("no-namespace-deletion"),
        "the evidence names a run whose record shows the denial:\n{}",
        shown.stdout
    );
    let signals = &report["signals"]["agents"]["oncall-assistant"];
    assert_eq!(
        signals["rules"]["oncall-guardrails/destructive-needs-oncall"]["approvalsGranted"]["count"], 1,
        "{signals:#}"
    );
    // A person corrects the run at the restart call: kept, listed with the call's tool, and
    // counted by insights against that tool.
    let shown = q.cli(&["records", "show", run]);
    let restart = shown
        .stdout
        .lines()
        .find(|l| l.contains("restart_deployment"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|seq| {
            seq.trim_start_matches('#')
                .trim_end_matches(':')
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no entry of the restart in:\n{}", shown.stdout));
    let refused = q.cli(&[
        "feedback",
        "give",
        run,
        "--label",
        "should-ask",
        "--correction",
        "x",
    ]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused
            .stderr
            .contains("use one of wrong-tool, should-have-asked"),
        "{}",
        refused.stderr
    );
    let beyond = q.cli(&[
        "feedback",
        "give",
        run,
        "--label",
        "wrong-tool",
        "--entry",
        "9999",
        "--correction",
        "x",
    ]);
    assert!(beyond.stderr.contains("has no entry 9999"), "{}", beyond.stderr);
    // A correction meant for another Session's run is not chained to this one.
    let elsewhere = q.cli(&[
        "feedback",
        "give",
        run,
        "--session",
        "checkout-5xx-tomorrow",
        "--label",
        "wrong-tool",
        "--correction",
        "x",
    ]);
    assert_ne!(elsewhere.code, Some(0));
    assert!(
        elsewhere
            .stderr
            .contains("is a run of Session checkout-5xx, not of checkout-5xx-tomorrow"),
        "{}",
        elsewhere.stderr
    );
    let given = q.cli(&[
        "feedback",
        "give",
        run,
        "--session",
        "checkout-5xx",
        "--label",
        "should-have-asked",
        "--entry",
        &restart.to_string(),
        "--correction",
        "restarts during business hours need the service owner, not only on-call",
        "--by",
        "lee@example.com",
    ]);
    assert_eq!(given.code, Some(0), "{}\n{}", given.stdout, given.stderr);
    let listed = q.cli(&["feedback", "list"]);
    assert!(
        listed
            .stdout
            .contains("(restart_deployment)  should-have-asked  by lee@example.com"),
        "{}",
        listed.stdout
    );
    let out = q.cli(&["insights", "--since", "1d", "--min-runs", "1", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("a JSON report");
    let corrected = report["insights"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["kind"] == "corrections"))
        .unwrap_or_else(|| panic!("no corrections insight: {report:#}"));
    assert_eq!(corrected["about"], "restart_deployment", "{corrected:#}");
    assert!(
        corrected["consider"]
            .as_str()
            .is_some_and(|c| c.contains("requires approval")),
        "{corrected:#}"
    );
    assert_eq!(corrected["evidence"][0]["seq"], restart, "{corrected:#}");
    let text = q.cli(&["insights", "--since", "1d"]);
    assert!(
        text.stdout.contains("1 run(s) in the last 1d") && text.stdout.contains("no insights"),
        "{}",
        text.stdout
    );
}

#[test]
fn autotune_finds_a_tighter_token_budget_and_refuses_one_that_would_halt_runs() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let examples = Quickstart::examples();
    let examples = examples.to_str().expect("utf-8 path");
    let tuned = q.cli(&[
        "autotune",
        examples,
        "--agent",
        "oncall-assistant",
        "--knob",
        "max-tokens",
    ]);
    assert_eq!(tuned.code, Some(0), "{}\n{}", tuned.stdout, tuned.stderr);
    // The tightest value, measured: the run replays unchanged there and not one token below.
    let tightest: u64 = tuned
        .stderr
        .lines()
        .find_map(|l| l.split("no new divergence down to ").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tightest value in:\n{}", tuned.stderr));
    assert!(tightest > 100 && tightest < 60_000, "{}", tuned.stderr);
    assert!(
        tuned.stderr.contains(&format!(
            "trial budget.maxTokens = {tightest}: 1 run(s), no divergence"
        )),
        "{}",
        tuned.stderr
    );
    assert!(
        tuned
            .stderr
            .contains(&format!("trial budget.maxTokens = {}: 1 run(s), ", tightest - 1))
            && !tuned.stderr.contains(&format!(
                "trial budget.maxTokens = {}: 1 run(s), no divergence",
                tightest - 1
            )),
        "the value below the tightest was measured and diverged:\n{}",
        tuned.stderr
    );
    // The proposal: the Agent's budget at the tightest value plus 20 %, drafted against the
    // Agent's spec as it is, and it applies.
    let proposal: contextos_crds::Proposal = serde_yaml::from_str(tuned.stdout.trim_start_matches("---\n"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", tuned.stdout));
    let agent: contextos_crds::Agent = serde_yaml::from_str(
        &std::fs::read_to_string(Quickstart::examples().join("agent.yaml")).expect("agent"),
    )
    .expect("agent");
    assert_eq!(
        proposal.spec.base_digest,
        contextos_runner::run::bundle::spec_digest(&agent.spec)
    );
    let patched = contextos_runner::proposals::patch::apply_agent(
        &agent.spec,
        proposal.spec.patch.agent.as_ref().expect("an Agent patch"),
    )
    .expect("applies");
    assert_eq!(patched.spec.budget.max_tokens, tightest + tightest.div_ceil(5));
    assert_eq!(
        proposal.spec.insight.as_ref().map(|i| i.kind.as_str()),
        Some("autotune")
    );

    // A value that would halt the run is refused, naming the run and what changes.
    let halted = tightest / 2;
    let refused = q.cli(&[
        "autotune",
        examples,
        "--agent",
        "oncall-assistant",
        "--value",
        &halted.to_string(),
    ]);
    assert_eq!(refused.code, Some(3), "{}\n{}", refused.stdout, refused.stderr);
    assert!(
        refused.stdout.is_empty(),
        "nothing is proposed: {}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains(&format!(
            "budget.maxTokens = {halted} would change 1 of 1 recorded run(s): run checkout-5xx-"
        )),
        "{}",
        refused.stderr
    );
    // The critic's revisions are a knob of the Agent too.
    let revisions = q.cli(&[
        "autotune",
        examples,
        "--agent",
        "oncall-assistant",
        "--knob",
        "max-revisions",
    ]);
    assert_eq!(revisions.code, Some(0), "{}", revisions.stderr);
    // The recorded run never revised: 0, the field's floor, is measured and proposed.
    assert!(
        revisions
            .stderr
            .contains("trial critic.maxRevisions = 0: 1 run(s), no divergence")
            && revisions.stdout.contains("setCritic:\n          maxRevisions: 0"),
        "{}\n{}",
        revisions.stdout,
        revisions.stderr
    );
    // The tightest value itself, named, is measured clean and proposed as it is.
    let named = q.cli(&[
        "autotune",
        examples,
        "--agent",
        "oncall-assistant",
        "--value",
        &tightest.to_string(),
    ]);
    assert_eq!(named.code, Some(0), "{}", named.stderr);
    assert!(
        named.stdout.contains(&format!("maxTokens: {tightest}")),
        "{}",
        named.stdout
    );
}

#[test]
fn the_digest_says_what_the_agents_did_in_text_json_and_one_html_page() {
    let q = Quickstart::new(&[]);
    q.drive(None);
    let text = q.cli(&["digest", "--since", "1d"]);
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(
        text.stdout
            .contains("oncall-assistant: 1 run(s), 1 completed, 0 failed; 5 tool call(s), 1 denied; approvals 1 granted, 0 refused"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("Proposals\n  not read (name --cluster to read them)"),
        "{}",
        text.stdout
    );
    let json = q.cli(&["digest", "--since", "1d", "--format", "json"]);
    let digest: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(digest["agents"]["oncall-assistant"]["runs"], 1, "{digest:#}");
    let html = q.cli(&["digest", "--since", "1d", "--format", "html"]);
    assert!(html.stdout.starts_with("<!doctype html>") && html.stdout.trim_end().ends_with("</html>"));
    assert!(
        !html.stdout.contains("<script") && !html.stdout.contains("src="),
        "self-contained"
    );
}

/// The quickstart's files, to change before a run.
/// [`quickstart_copy`] with the example PriceList beside it.
fn priced_quickstart_copy() -> tempfile::TempDir {
    let dir = quickstart_copy();
    std::fs::copy(
        Quickstart::examples().join("../pricing/pricelist.yaml"),
        dir.path().join("pricelist.yaml"),
    )
    .expect("copy the PriceList");
    dir
}

fn quickstart_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(Quickstart::examples()).expect("examples") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    dir
}

#[test]
fn each_model_turn_is_costed_at_the_price_the_run_pinned_and_spend_is_summed_by_agent_model_and_team() {
    let dir = priced_quickstart_copy();
    let session = dir.path().join("session.yaml");
    let text = std::fs::read_to_string(&session).expect("session");
    std::fs::write(
        &session,
        text.replacen(
            "    contextos.dev/scenario: quickstart",
            "    contextos.dev/scenario: quickstart\n    team: payments",
            1,
        ),
    )
    .expect("write");
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    q.drive(None);

    let json = q.cli(&["cost", "--since", "1d", "--format", "json"]);
    assert_eq!(json.code, Some(0), "{}", json.stderr);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    let total = &report["total"];
    let tokens = |key: &str| {
        total[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {report:#}"))
    };
    let (turns, prompt, completion) = (
        tokens("turns"),
        tokens("promptTokens"),
        tokens("completionTokens"),
    );
    assert!(turns >= 5 && prompt > 0 && completion > 0, "{report:#}");
    assert_eq!(total["unpricedTokens"], 0, "every turn was priced: {report:#}");
    // The runbook search is priced per call: each search the run made costs 0.002.
    let searches = tokens("pricedToolCalls");
    assert!(searches >= 1, "{report:#}");
    // At 2.50 per million prompt tokens and 10.00 per million completion tokens, each turn
    // rounded to the nearest nano-dollar, and 0.002 a search.
    let cost = total["costNanos"]["USD"].as_u64().expect("a USD cost");
    let exact = prompt * 2_500 + completion * 10_000 + searches * 2_000_000;
    assert!(
        cost.abs_diff(exact) <= turns,
        "{cost} vs {exact} over {turns} turns"
    );
    assert_eq!(report["groups"]["oncall-assistant"]["runs"], 1, "{report:#}");

    let by_model = q.cli(&["cost", "--since", "1d", "--by", "model"]);
    assert_eq!(by_model.code, Some(0), "{}", by_model.stderr);
    assert!(
        by_model
            .stdout
            .contains("spend of namespace shop in the last 1d, by model")
            && by_model
                .stdout
                .lines()
                .any(|l| l.starts_with("quickstart-script") && l.ends_with(" USD")),
        "{}",
        by_model.stdout
    );
    // By tool: the searches under their tool, the turns together.
    let by_tool = q.cli(&["cost", "--since", "1d", "--by", "tool", "--format", "json"]);
    let tools: serde_json::Value = serde_json::from_str(&by_tool.stdout).expect("JSON");
    assert_eq!(
        tools["groups"]["search_runbooks"]["costNanos"]["USD"],
        searches * 2_000_000,
        "{tools:#}"
    );
    assert_eq!(tools["groups"]["(model turns)"]["turns"], turns, "{tools:#}");
    let by_team = q.cli(&["cost", "--since", "1d", "--by", "label=team", "--format", "json"]);
    let teams: serde_json::Value = serde_json::from_str(&by_team.stdout).expect("JSON");
    assert_eq!(
        teams["groups"]["payments"]["costNanos"], total["costNanos"],
        "{teams:#}"
    );
    let wrong = q.cli(&["cost", "--by", "colour"]);
    assert!(
        wrong.code != Some(0) && wrong.stderr.contains("say agent, model, tool or label=<key>"),
        "{}",
        wrong.stderr
    );
}

#[test]
fn replaying_a_routing_candidate_reports_the_turns_it_moves_and_their_cost() {
    let dir = priced_quickstart_copy();
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    q.drive(None);
    // The same Agent, routing every turn to a model a tenth of the price.
    let agent = std::fs::read_to_string(dir.path().join("agent.yaml")).expect("agent");
    let routed = agent.replacen(
        "  contextPackRef:",
        "  routing:\n    models:\n      - name: cheap\n        model: {provider: scripted, model: cheap-script, scriptRef: {name: quickstart-script, key: script.json}}\n    rules:\n      - use: cheap\n  contextPackRef:",
        1,
    );
    assert_ne!(routed, agent, "the routing is added");
    let candidate = tempfile::tempdir().expect("tempdir");
    let agent_file = candidate.path().join("agent.yaml");
    std::fs::write(&agent_file, routed).expect("write");
    let prices = candidate.path().join("prices.yaml");
    std::fs::write(
        &prices,
        "apiVersion: contextos.dev/v1alpha1\nkind: PriceList\nmetadata: {name: cheap}\nspec:\n  currency: USD\n  models:\n    - {provider: scripted, model: cheap-script, inputPerMillion: \"0.25\", outputPerMillion: \"1.00\"}\n    - {provider: scripted, model: quickstart-script, inputPerMillion: \"2.50\", outputPerMillion: \"10.00\"}\n",
    )
    .expect("write");
    let (agent_file, prices) = (
        agent_file.to_str().expect("utf-8"),
        prices.to_str().expect("utf-8"),
    );
    let played = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--candidate",
        agent_file,
        "--candidate",
        prices,
        "--output",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&played.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", played.stdout, played.stderr));
    let routing = &report["routing"];
    let turns = routing["turns"].as_u64().expect("turns");
    assert!(turns >= 5, "{report:#}");
    assert_eq!(
        routing["rerouted"], turns,
        "every turn to the cheap model: {report:#}"
    );
    let recorded = routing["recordedNanos"]["USD"].as_u64().expect("recorded cost");
    let candidate = routing["candidateNanos"]["USD"].as_u64().expect("candidate cost");
    // A tenth of the price for the same tokens (each turn rounded to a nano-dollar).
    assert!(
        candidate.abs_diff(recorded / 10) <= turns,
        "{recorded} → {candidate}"
    );
    let text = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--candidate",
        agent_file,
        "--candidate",
        prices,
    ]);
    assert!(
        text.stdout.contains(&format!(
            "model routing: {turns} of {turns} turn(s) to another model; cost as recorded"
        )),
        "{}",
        text.stdout
    );
}

#[test]
fn autotune_tightens_a_pack_sources_cap_only_as_far_as_the_model_still_reads_what_it_acts_on() {
    // The quickstart, with a model that follows the runbook only when it reads the runbook's
    // last line; without it, it answers at once and resolves nothing.
    let dir = quickstart_copy();
    let configmaps = dir.path().join("configmaps.yaml");
    let text = std::fs::read_to_string(&configmaps).expect("configmaps");
    let (head, turns) = text.split_once(r#""turns": ["#).expect("the script's turns");
    let (turns, tail) = turns.split_once("\n      ]").expect("the end of the turns");
    let text = format!(
        r#"{head}"turns": [{{"content": "{{\"summary\": \"No runbook at hand; escalating.\", \"actions\": [], \"resolved\": false}}"}}],
      "variants": [{{"whenContextContains": "Never delete namespaces during an incident", "turns": [{turns}
      ]}}]{tail}"#
    );
    std::fs::write(&configmaps, text).expect("write");
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    q.drive(None);
    let files = dir.path().to_str().expect("utf-8");
    let autotune = |extra: &[&str]| {
        let mut args = vec![
            "autotune",
            files,
            "--agent",
            "oncall-assistant",
            "--knob",
            "source-max-tokens",
            "--source",
            "checkout-runbook",
        ];
        args.extend_from_slice(extra);
        q.cli(&args)
    };
    let tightest = |out: &str| -> u64 {
        out.lines()
            .find_map(|l| l.split("no new divergence down to ").nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tightest value in:\n{out}"))
    };
    // Replaying the recorded turns cannot see what the model no longer reads: any cap passes.
    let played = autotune(&[]);
    assert_eq!(played.code, Some(0), "{}\n{}", played.stdout, played.stderr);
    assert_eq!(tightest(&played.stderr), 1, "{}", played.stderr);
    // Re-executed, the model must still read the runbook's last line.
    let asked = autotune(&["--reexecute", "--samples", "1"]);
    assert_eq!(asked.code, Some(0), "{}\n{}", asked.stdout, asked.stderr);
    let cap = tightest(&asked.stderr);
    assert!(cap > 20 && cap < 2048, "{}", asked.stderr);
    assert!(
        asked.stderr.contains(&format!(
            "trial ContextPack oncall-pack sources[checkout-runbook].maxTokens = {}: 1 run(s), ",
            cap - 1
        )) && !asked
            .stderr
            .contains(&format!("= {}: 1 run(s), no divergence", cap - 1)),
        "one token less was measured and diverged:\n{}",
        asked.stderr
    );
    // The proposal is the pack's: the source's cap with headroom, against the pack as it is.
    let proposal: contextos_crds::Proposal = serde_yaml::from_str(asked.stdout.trim_start_matches("---\n"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", asked.stdout));
    assert_eq!(proposal.spec.target.name, "oncall-pack");
    let pack: contextos_crds::ContextPack =
        serde_yaml::from_str(&std::fs::read_to_string(dir.path().join("contextpack.yaml")).expect("pack"))
            .expect("pack");
    assert_eq!(
        proposal.spec.base_digest,
        contextos_runner::run::bundle::spec_digest(&pack.spec)
    );
    let patched = contextos_runner::proposals::patch::apply_context_pack(
        &pack.spec,
        proposal
            .spec
            .patch
            .context_pack
            .as_ref()
            .expect("a ContextPack patch"),
    )
    .expect("applies");
    let runbook = patched
        .spec
        .sources
        .iter()
        .find(|s| s.name == "checkout-runbook")
        .expect("the runbook");
    assert_eq!(
        runbook.max_tokens,
        Some(u32::try_from(cap + cap.div_ceil(5)).expect("small"))
    );
    // A cap that cuts the line the model acts on is refused.
    let cut = (cap / 2).to_string();
    let refused = autotune(&["--reexecute", "--samples", "1", "--value", &cut]);
    assert_eq!(refused.code, Some(3), "{}\n{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains(&format!(
            "sources[checkout-runbook].maxTokens = {cut} would change 1 of 1 recorded run(s)"
        )),
        "{}",
        refused.stderr
    );
    // A source the pack does not have is named.
    let unknown = q.cli(&[
        "autotune",
        files,
        "--agent",
        "oncall-assistant",
        "--knob",
        "source-max-tokens",
        "--source",
        "nope",
    ]);
    assert_ne!(unknown.code, Some(0));
    assert!(
        unknown
            .stderr
            .contains("ContextPack oncall-pack has no source nope (it has: guidelines, checkout-runbook, example-incident)"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn re_execution_judges_a_reworded_pack_that_replaying_recorded_turns_cannot() {
    // The quickstart, with a model that reads its instructions: told to act fast, it restarts
    // first and answers.
    let dir = quickstart_copy();
    let configmaps = dir.path().join("configmaps.yaml");
    let text = std::fs::read_to_string(&configmaps).expect("configmaps");
    let variant = r#"      "variants": [{"whenContextContains": "Act fast", "turns": [
        {"content": "A quick look and the error budget.",
         "toolCalls": [{"tool": "get_service_status", "arguments": {"service": "checkout-api"}},
                       {"tool": "error_budget", "arguments": {"errorRate": 0.07, "slo": 0.999}}]},
        {"content": "Restarting right away.",
         "toolCalls": [{"tool": "restart_deployment", "arguments": {"namespace": "shop", "deployment": "checkout-api"}}]},
        {"content": "{\"summary\": \"checkout-api restarted at once; diagnosis to follow.\", \"actions\": [\"restart_deployment\"], \"resolved\": true}"}
      ]}],
      "turns": ["#;
    let text = text.replacen(r#""turns": ["#, variant, 1);
    std::fs::write(&configmaps, text).expect("write");
    let q = Quickstart::with_files(&[], dir.path().to_owned());
    q.drive(None);
    let pack = std::fs::read_to_string(dir.path().join("contextpack.yaml")).expect("pack");
    assert!(pack.contains("Diagnose before you act"));
    let hasty = dir.path().join("hasty-pack.yaml");
    std::fs::write(
        &hasty,
        pack.replace("Diagnose before you act", "Act fast; diagnose later"),
    )
    .expect("write");
    let hasty = hasty.to_str().expect("utf-8");

    let requests = |q: &Quickstart| q.tools.effects()["requests"].as_u64().expect("a request count");
    let before = requests(&q);
    // Playing the recorded turns again: the decisions are the same, whatever the pack says.
    let played = q.cli(&["replay", "--session", "checkout-5xx", "--candidate", hasty]);
    assert_eq!(played.code, Some(0), "{}\n{}", played.stdout, played.stderr);
    assert!(played.stdout.contains("→ PASS"), "{}", played.stdout);

    // Asking the model again with the candidate's context: it restarts first, which needs an
    // approval the recorded run gave another call; the gate fails, and says what it cost.
    let asked = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--candidate",
        hasty,
        "--reexecute",
        "--samples",
        "2",
    ]);
    assert_eq!(asked.code, Some(3), "{}\n{}", asked.stdout, asked.stderr);
    assert!(
        asked
            .stdout
            .contains("re-executed 2 time(s) each: 2 sample(s) diverged"),
        "{}",
        asked.stdout
    );
    assert!(asked.stdout.contains("→ FAIL"), "{}", asked.stdout);
    assert!(
        asked
            .stdout
            .contains("step 1 search_runbooks: a different call — recorded search_runbooks allow"),
        "the runbook search the recorded run began with is skipped:\n{}",
        asked.stdout
    );
    assert!(
        asked.stdout.contains("→ replayed get_service_status"),
        "{}",
        asked.stdout
    );
    // The status read, recorded at another step, is answered from the record; the error budget,
    // never asked for in the recorded run, is refused in both samples and never reaches a tool.
    assert!(
        asked.stdout.contains(
            "re-executed 2 time(s) each: 2 sample(s) diverged; 2 call(s) the record never made were refused"
        ),
        "{}",
        asked.stdout
    );
    let tokens: u64 = asked
        .stdout
        .split(" model token(s)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(tokens > 0, "the cost is reported:\n{}", asked.stdout);

    // A token limit below what the samples use stops the replay, which fails and says why.
    let capped = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--reexecute",
        "--samples",
        "2",
        "--max-tokens",
        &(tokens / 4).max(1).to_string(),
    ]);
    assert_eq!(capped.code, Some(3), "{}\n{}", capped.stdout, capped.stderr);
    assert!(
        capped.stdout.contains("stopped: re-execution spent")
            && capped.stdout.contains("reaching its limit of")
            && capped.stdout.contains("→ FAIL"),
        "{}",
        capped.stdout
    );

    // A candidate that changes the model is not judged by asking the recorded one: its
    // decisions are replayed, and the report says so.
    let agent = std::fs::read_to_string(dir.path().join("agent.yaml")).expect("agent");
    let other_model = dir.path().join("other-model-agent.yaml");
    std::fs::write(
        &other_model,
        agent.replacen("model: quickstart-script", "model: quickstart-script-v2", 1),
    )
    .expect("write");
    let moved = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--candidate",
        other_model.to_str().expect("utf-8"),
        "--reexecute",
        "--samples",
        "2",
    ]);
    assert_eq!(moved.code, Some(0), "{}\n{}", moved.stdout, moved.stderr);
    assert!(
        moved.stdout.contains(
            "decisions replayed, not re-executed: the candidate changes the model (quickstart-script → quickstart-script-v2)"
        ),
        "{}",
        moved.stdout
    );

    // The pack as it is, re-executed: the model makes the recorded decisions again.
    let same = q.cli(&[
        "replay",
        "--session",
        "checkout-5xx",
        "--reexecute",
        "--samples",
        "2",
    ]);
    assert_eq!(same.code, Some(0), "{}\n{}", same.stdout, same.stderr);
    assert!(
        same.stdout
            .contains("all runs re-executed 2 time(s) each: 0 sample(s) diverged; 0 call(s)"),
        "{}",
        same.stdout
    );
    // Nothing was executed: the tool service saw no request from any replay.
    assert_eq!(requests(&q), before, "a replay reached the tool service");
}
