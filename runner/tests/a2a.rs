//! The A2A adapter against agents served by the official A2A SDKs: Python (`a2a-sdk` from PyPI,
//! installed by `runner/tests/support/a2a_peer.sh`; `make unit` sets `CONTEXTOS_A2A_PYTHON`) and
//! JavaScript (`@a2a-js/sdk` from npm, installed by `runner/tests/support/a2a_peer_js.sh`;
//! `CONTEXTOS_A2A_JS_MODULES`): a task answered over JSON-RPC and over a stream, a remote
//! question that pauses the call until a person answers it, a declined question and a timeout
//! that cancel the remote task, and the card checks that refuse before anything is sent — each
//! also checked in the record and in what the peer saw.

#[path = "support/a2a_peers.rs"]
mod a2a_peers;

use std::{process::Command, time::Duration};

use a2a_peers::{Peer, Sdk};

use contextos_crds::{
    Policy,
    common::{SafetyMode, ToolKind, ToolRisk},
    session::{Resolution, ResolvedOutcome},
};
use contextos_runner::{
    gateway::{
        CallOutcome, CatalogTool, ToolGateway,
        envelope::CallEnvelope,
        session_watch::{Ends, SessionEnded, SessionWatch},
    },
    keys::KeyPair,
    policy::{PolicySet, StateFacts, compile_policy},
    records::{
        EmbeddedStore, EntryBody, PinnedDigests, RecordEntry, RecordStore as _, Recorder, RunStart, TenantId,
        entry::ToolResultRecord, verify_run,
    },
    run_context::{AgentIdentity, RunContext, SignedRunContext, UserDelegation},
};
use serde_json::{Value, json};

const BOTH: [Sdk; 2] = [Sdk::Python, Sdk::JavaScript];
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const RUN: &str = "run-a2a";

/// The remote agents as tools: `(name, path, skill, timeout, extra adapter fields)`.
fn tools(base: &str) -> Vec<CatalogTool> {
    let declared = [
        ("echo", "plain", "echo", 10, ""),
        ("echo_stream", "stream", "echo", 10, ""),
        ("refund", "plain", "ask", 10, ""),
        ("refund_stream", "stream", "ask", 10, ""),
        ("slow", "plain", "slow", 1, ""),
        ("slow_stream", "stream", "slow", 1, ""),
        ("slow_long", "plain", "slow", 60, ""),
        ("slow_long_stream", "stream", "slow", 60, ""),
        ("fail", "stream", "fail", 10, ""),
        ("chargeback", "plain", "chargeback", 10, ""),
        ("ceiling", "ceiling", "echo", 10, ""),
        ("elsewhere", "elsewhere", "echo", 10, ""),
        ("echo_small", "plain", "echo", 10, ", maxResponseBytes: 200"),
        ("nag", "plain", "nag", 10, ""),
    ];
    declared
        .iter()
        .map(|(name, path, skill, timeout, extra)| {
            let yaml = format!(
                r#"{{name: {name}, description: "the {skill} agent", risk: delegated, kind: act, timeoutSeconds: {timeout},
                   adapter: {{a2a: {{url: "{base}/{path}", skill: {skill}, riskCeiling: delegated{extra}}}}}}}"#
            );
            let mut tool = CatalogTool::new(serde_yaml::from_str(&yaml).expect("tool")).expect("valid tool");
            // The refund agent is a paid API: 0.25 EUR a call.
            if name.starts_with("refund") {
                tool.price = Some(contextos_runner::pricing::PinnedToolPrice {
                    price_list: "partners".into(),
                    currency: "EUR".into(),
                    per_call: contextos_runner::pricing::Nanos(250_000_000),
                });
            }
            tool
        })
        .collect()
}

fn policies() -> PolicySet {
    let policy: Policy = serde_yaml::from_str(
        "{apiVersion: contextos.dev/v1alpha1, kind: Policy, metadata: {name: allow}, spec: {defaultEffect: allow, rules: []}}",
    )
    .expect("policy");
    PolicySet {
        policies: vec![compile_policy("allow", &policy.spec).expect("compiles")],
    }
}

struct Harness {
    peer: Peer,
    gateway: ToolGateway,
    key: KeyPair,
    store: EmbeddedStore,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(sdk: Sdk) -> Option<Self> {
        let peer = Peer::start(sdk)?;
        let key = KeyPair::from_seed([21; 32]);
        let gateway = gateway(&peer.base, &key);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        Some(Self {
            peer,
            gateway,
            key,
            store,
            _dir: dir,
        })
    }

    async fn recorder(&self) -> Recorder<'_, EmbeddedStore> {
        let start = RunStart {
            run_id: RUN.into(),
            session_id: "refunds".into(),
            agent: "support".into(),
            run_context: json!({}),
            pinned: PinnedDigests::default(),
            bundle: None,
        };
        Recorder::start(&self.store, tenant(), self.key.clone(), start)
            .await
            .expect("recorder")
    }

    fn envelope(&self, call_id: &str, tool: &str, args: Value) -> CallEnvelope {
        CallEnvelope {
            call_id: call_id.into(),
            tool: tool.into(),
            arguments: args,
            risk: ToolRisk::Delegated,
            kind: ToolKind::Act,
            idempotency_key: format!("idem-{call_id}"),
            traceparent: format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
            run_context: run_context(&self.key),
            approval: None,
            resolution: None,
        }
    }

    async fn handle(&self, rec: &mut Recorder<'_, EmbeddedStore>, call: &CallEnvelope) -> CallOutcome {
        self.gateway
            .handle(call, rec, &StateFacts::default())
            .await
            .expect("handled")
    }

    async fn entries(&self) -> Vec<RecordEntry> {
        verify_run(&self.store, &tenant(), RUN, &self.key.public())
            .await
            .expect("the record verifies");
        self.store
            .read_chain(&tenant(), RUN, 0)
            .await
            .expect("read")
            .iter()
            .map(|e| RecordEntry::decode(&e.bytes).expect("decodes"))
            .collect()
    }

    /// `call` sent again in a new attempt of the run (see [`Harness::resumed`]).
    async fn resume(&self, rec: &mut Recorder<'_, EmbeddedStore>, call: &CallEnvelope) -> CallOutcome {
        self.resumed()
            .await
            .handle(call, rec, &StateFacts::default())
            .await
            .expect("handled")
    }

    /// A new attempt of the run, as after a pause: a gateway that knows the run only from its
    /// record.
    async fn resumed(&self) -> ToolGateway {
        let gateway = gateway(&self.peer.base, &self.key);
        gateway.restore(&self.entries().await);
        gateway
    }
}

fn gateway(base: &str, key: &KeyPair) -> ToolGateway {
    ToolGateway::new(
        "shop",
        "support",
        key.public(),
        tools(base),
        policies(),
        Default::default(),
    )
    .with_breakers(100, Duration::from_secs(60))
}

fn tenant() -> TenantId {
    TenantId::new("shop").expect("tenant")
}

fn run_context(key: &KeyPair) -> SignedRunContext {
    let now = contextos_runner::records::recorder::now_ms();
    let allowed = [
        "echo",
        "echo_stream",
        "refund",
        "refund_stream",
        "slow",
        "slow_stream",
        "slow_long",
        "slow_long_stream",
        "fail",
        "chargeback",
        "ceiling",
        "elsewhere",
        "echo_small",
        "nag",
    ];
    SignedRunContext::sign(
        RunContext {
            run_id: RUN.into(),
            trace_id: TRACE_ID.into(),
            session_id: "refunds".into(),
            tenant_id: "shop".into(),
            user: Some(UserDelegation {
                subject: "dana@example.com".into(),
                groups: vec![],
                scopes: vec![],
            }),
            agent: AgentIdentity::new("shop", "support"),
            safety_mode: SafetyMode::Autonomous,
            budget: contextos_crds::common::RunBudget {
                max_steps: 10,
                max_tokens: 10_000,
                max_tool_calls: 50,
                max_wall_seconds: 600,
                max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            },
            pinned: PinnedDigests::default(),
            allowed_tools: allowed.map(str::to_owned).to_vec(),
            issued_at_ms: now,
            expires_at_ms: now + 600_000,
            pod: None,
            session_uid: None,
            bundle_digest: None,
            subject: None,
            trace_sampled: None,
        },
        key,
    )
}

fn executed(outcome: &CallOutcome) -> &ToolResultRecord {
    match outcome {
        CallOutcome::Executed(result) => result,
        other => panic!("expected the call to execute, got {other:?}"),
    }
}

/// The question a call waits on: `(question id, reason shown to the person)`.
fn asked(outcome: &CallOutcome, call: &str) -> (String, String) {
    match outcome {
        CallOutcome::OutcomeUnknown {
            call_id,
            reason,
            for_call,
            ..
        } => {
            assert_eq!(for_call.as_deref(), Some(call), "a question names its call");
            (call_id.clone(), reason.clone())
        }
        other => panic!("expected a question, got {other:?}"),
    }
}

fn answer(question: &str, outcome: ResolvedOutcome, note: &str) -> Resolution {
    Resolution {
        call_id: question.into(),
        outcome,
        resolver: "dana@example.com".into(),
        note: Some(note.into()),
    }
}

#[tokio::test]
async fn a_remote_agent_answers_over_json_rpc_and_over_a_stream() {
    for sdk in BOTH {
        a_remote_agent_answers_over_json_rpc_and_over_a_stream_with(sdk).await;
    }
}

async fn a_remote_agent_answers_over_json_rpc_and_over_a_stream_with(sdk: Sdk) {
    let Some(h) = Harness::new(sdk) else { return };
    let mut rec = h.recorder().await;
    for (call, tool, path, method) in [
        ("1.0", "echo", "/plain/rpc", "SendMessage"),
        ("2.0", "echo_stream", "/stream/rpc", "SendStreamingMessage"),
    ] {
        let envelope = h.envelope(call, tool, json!({"message": "refund order 7", "order": 7}));
        let result = executed(&h.handle(&mut rec, &envelope).await).clone();
        assert!(result.ok, "{sdk:?} {tool}: {result:?}");
        assert_eq!(result.output["state"], "completed");
        assert!(
            result.output["text"]
                .as_str()
                .unwrap_or_default()
                .contains("echo: refund order 7"),
            "{sdk:?} {tool}: {}",
            result.output
        );
        // What the remote agent received: the arguments, the delegation from the verified
        // RunContext, and the call's idempotency key as the message id.
        let received = &result.output["artifacts"][1]["parts"][0]["data"];
        assert_eq!(
            received["data"][0]["order"].as_f64(),
            Some(7.0),
            "{sdk:?} {tool}: {received}"
        );
        assert_eq!(
            received["delegation"],
            json!({"tenant": "shop", "agent": "support", "run": RUN, "user": "dana@example.com"}),
            "{sdk:?} {tool}"
        );
        assert_eq!(received["messageId"], format!("idem-{call}"));
        let methods = h.peer.methods(path).await;
        assert_eq!(
            methods.first().map(String::as_str),
            Some(method),
            "{sdk:?} {tool}: {methods:?}"
        );
    }
    for request in h.peer.seen().await {
        assert_eq!(request["a2aVersion"], "1.0", "{request}");
        assert!(
            request["traceparent"]
                .as_str()
                .unwrap_or_default()
                .contains(TRACE_ID),
            "{request}"
        );
    }
    let results = h
        .entries()
        .await
        .iter()
        .filter(|e| matches!(&e.body, EntryBody::ToolResult(r) if r.ok))
        .count();
    assert_eq!(results, 2);
}

#[tokio::test]
async fn a_remote_question_waits_for_a_person_and_the_answer_continues_the_task() {
    let Some(h) = Harness::new(Sdk::Python) else {
        return;
    };
    let mut rec = h.recorder().await;
    let mut call = h.envelope("1.0", "refund", json!({"message": "refund order 7"}));
    let (q1, reason) = asked(&h.handle(&mut rec, &call).await, "1.0");
    assert!(q1.starts_with("1.0.q1-"), "{q1}");
    // What to do comes first; the question is quoted after it.
    assert!(
        reason.starts_with("the remote agent of refund asks a question")
            && reason.ends_with("It asks: \"Which region should the refund go to?\""),
        "{reason}"
    );
    assert!(
        reason.contains("Which region should the refund go to?"),
        "{reason}"
    );
    let sent = h.peer.methods("/plain/rpc").await.len();

    // Asked again without an answer (a new attempt, or another replica): the same question,
    // and nothing is sent.
    let again = h.resume(&mut rec, &call).await;
    assert_eq!(asked(&again, "1.0").0, q1);
    assert_eq!(
        h.peer.methods("/plain/rpc").await.len(),
        sent,
        "nothing sent without an answer"
    );

    // An answer for a question that is not the one asked is not used.
    call.resolution = Some(answer(
        &q1.replace(".q1-", ".q7-"),
        ResolvedOutcome::Answered,
        "EU",
    ));
    let stale = h.resume(&mut rec, &call).await;
    assert_eq!(asked(&stale, "1.0").0, q1);

    // The answer continues the same task; the remote agent asks once more.
    call.resolution = Some(answer(&q1, ResolvedOutcome::Answered, "again"));
    let second = h.resume(&mut rec, &call).await;
    let (q2, reason) = asked(&second, "1.0");
    assert_eq!(q2, q1.replace(".q1-", ".q2-"));
    assert!(reason.contains("Are you sure?"), "{reason}");

    // The first answer, presented again, does not answer the second question.
    let replayed = h.resume(&mut rec, &call).await;
    assert_eq!(asked(&replayed, "1.0").0, q2);

    call.resolution = Some(answer(&q2, ResolvedOutcome::Answered, "EU"));
    let done = executed(&h.resume(&mut rec, &call).await).clone();
    assert!(done.ok, "{done:?}");
    assert_eq!(done.output["text"], "refund sent to EU");

    // One task from first message to result, every turn on record.
    let seen = h.peer.seen().await;
    let turns: Vec<&Value> = seen.iter().filter(|r| r["method"] == "SendMessage").collect();
    assert_eq!(turns.len(), 3, "{seen:?}");
    assert_eq!(turns[1]["messageId"], "idem-1.0.a1");
    assert_eq!(turns[2]["messageId"], "idem-1.0.a2");
    assert_eq!(turns[1]["taskId"], turns[2]["taskId"]);
    let entries = h.entries().await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e.body.type_name())
        .filter(|t| matches!(*t, "remote_input_required" | "call_resolved" | "tool_result"))
        .collect();
    // The paid call is charged once, with its first question.
    let costs: Vec<u64> = entries
        .iter()
        .filter_map(|e| match &e.body {
            EntryBody::RemoteInputRequired { cost, .. } => Some(cost.as_ref().map_or(0, |c| c.nanos.0)),
            EntryBody::ToolResult(r) => Some(r.cost.as_ref().map_or(0, |c| c.nanos.0)),
            _ => None,
        })
        .collect();
    assert_eq!(costs, [250_000_000, 0, 0]);
    assert_eq!(
        kinds,
        [
            "remote_input_required",
            "call_resolved",
            "remote_input_required",
            "call_resolved",
            "tool_result"
        ]
    );
}

#[tokio::test]
async fn a_streamed_task_that_asks_is_a_question_too() {
    for sdk in BOTH {
        a_streamed_task_that_asks_is_a_question_too_with(sdk).await;
    }
}

async fn a_streamed_task_that_asks_is_a_question_too_with(sdk: Sdk) {
    let Some(h) = Harness::new(sdk) else { return };
    let mut rec = h.recorder().await;
    let mut call = h.envelope("1.0", "refund_stream", json!({"message": "refund order 9"}));
    let (q1, _) = asked(&h.handle(&mut rec, &call).await, "1.0");
    call.resolution = Some(answer(&q1, ResolvedOutcome::Answered, "US"));
    let done = executed(&h.resume(&mut rec, &call).await).clone();
    assert_eq!(done.output["text"], "refund sent to US", "{done:?}");
    assert_eq!(
        h.peer.methods("/stream/rpc").await,
        ["SendStreamingMessage", "SendStreamingMessage"]
    );
}

#[tokio::test]
async fn a_declined_question_cancels_the_remote_task() {
    for sdk in BOTH {
        a_declined_question_cancels_the_remote_task_with(sdk).await;
    }
}

async fn a_declined_question_cancels_the_remote_task_with(sdk: Sdk) {
    let Some(h) = Harness::new(sdk) else { return };
    let mut rec = h.recorder().await;
    let mut call = h.envelope("1.0", "refund", json!({"message": "refund order 7"}));
    let (q1, _) = asked(&h.handle(&mut rec, &call).await, "1.0");
    call.resolution = Some(answer(&q1, ResolvedOutcome::DidNotAct, "not our customer"));
    let declined = executed(&h.resume(&mut rec, &call).await).clone();
    assert!(!declined.ok);
    let error = declined.error.unwrap_or_default();
    assert!(
        error.contains("declined") && error.contains("was cancelled"),
        "{error}"
    );
    let seen = h.peer.seen().await;
    let task = seen
        .iter()
        .find(|r| r["method"] == "SendMessage")
        .map(|r| r["taskId"].clone());
    let cancelled = seen
        .iter()
        .find(|r| r["method"] == "CancelTask")
        .map(|r| r["taskId"].clone());
    assert!(cancelled.is_some(), "{seen:?}");
    // The cancelled task is the one that asked (its id came back with the question).
    let question_task = h.entries().await.iter().find_map(|e| match &e.body {
        EntryBody::RemoteInputRequired { task, .. } => Some(task.task_id.clone()),
        _ => None,
    });
    assert_eq!(
        cancelled.and_then(|t| t.as_str().map(str::to_owned)),
        question_task
    );
    assert_eq!(task, Some(Value::Null), "the first message starts a new task");
}

#[tokio::test]
async fn a_task_still_running_at_the_timeout_is_cancelled() {
    for sdk in BOTH {
        a_task_still_running_at_the_timeout_is_cancelled_with(sdk).await;
    }
}

async fn a_task_still_running_at_the_timeout_is_cancelled_with(sdk: Sdk) {
    let Some(h) = Harness::new(sdk) else { return };
    let mut rec = h.recorder().await;
    for (call, tool, path) in [
        ("1.0", "slow", "/plain/rpc"),
        ("2.0", "slow_stream", "/stream/rpc"),
    ] {
        let started = std::time::Instant::now();
        let result = executed(&h.handle(&mut rec, &h.envelope(call, tool, json!({}))).await).clone();
        assert!(!result.ok);
        assert!(
            result
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("no answer within 1s"),
            "{sdk:?} {tool}: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{sdk:?} {tool}: bounded by its timeout"
        );
        let methods = h.peer.methods(path).await;
        assert_eq!(
            methods.last().map(String::as_str),
            Some("CancelTask"),
            "{sdk:?} {tool}: {methods:?}"
        );
    }
}

/// Says the run's Session ended (cancelled) once `0` has passed: the gateway service's watch
/// reads the API server instead.
#[derive(Debug)]
struct EndsAfter(Duration);

impl SessionWatch for EndsAfter {
    fn ended(&self) -> Ends {
        let after = self.0;
        Box::pin(async move {
            tokio::time::sleep(after).await;
            SessionEnded::Cancelled
        })
    }
}

/// A task the gateway follows is cancelled as soon as the run's Session ends — in a cluster the
/// runner pod is gone by then, and nothing else would stop the task before its tool's
/// timeout (a minute here). The call ends failed, saying why, and that is what is recorded.
#[tokio::test]
async fn a_task_followed_when_its_session_ends_is_cancelled() {
    for sdk in BOTH {
        a_task_followed_when_its_session_ends_is_cancelled_with(sdk).await;
    }
}

async fn a_task_followed_when_its_session_ends_is_cancelled_with(sdk: Sdk) {
    let Some(mut h) = Harness::new(sdk) else { return };
    h.gateway = gateway(&h.peer.base, &h.key)
        .with_session_watch(std::sync::Arc::new(EndsAfter(Duration::from_millis(700))));
    let mut rec = h.recorder().await;
    for (call, tool, path) in [
        ("1.0", "slow_long", "/plain/rpc"),
        ("2.0", "slow_long_stream", "/stream/rpc"),
    ] {
        let started = std::time::Instant::now();
        let result = executed(&h.handle(&mut rec, &h.envelope(call, tool, json!({}))).await).clone();
        let error = result.error.clone().unwrap_or_default();
        assert!(
            !result.ok
                && error.contains("the run's Session was cancelled")
                && error.contains("was cancelled"),
            "{sdk:?} {tool}: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{sdk:?} {tool}: stopped when the Session ended, not at the timeout"
        );
        let methods = h.peer.methods(path).await;
        assert_eq!(
            methods.last().map(String::as_str),
            Some("CancelTask"),
            "{sdk:?} {tool}: {methods:?}"
        );
    }
    let recorded: Vec<String> = h
        .entries()
        .await
        .into_iter()
        .filter_map(|entry| match entry.body {
            EntryBody::ToolResult(result) => result.error,
            _ => None,
        })
        .collect();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(
        recorded
            .iter()
            .all(|e| e.contains("the run's Session was cancelled")),
        "{recorded:?}"
    );
}

#[tokio::test]
async fn what_the_card_does_not_allow_is_refused_before_anything_is_sent() {
    let Some(h) = Harness::new(Sdk::Python) else {
        return;
    };
    let mut rec = h.recorder().await;
    for (call, tool, why) in [
        ("1.0", "chargeback", "has no skill chargeback"),
        (
            "2.0",
            "ceiling",
            "up to risk destructive, above the riskCeiling delegated",
        ),
        ("3.0", "elsewhere", "not below the adapter's URL"),
    ] {
        let result = executed(&h.handle(&mut rec, &h.envelope(call, tool, json!({}))).await).clone();
        assert!(!result.ok);
        let error = result.error.unwrap_or_default();
        assert!(
            error.contains("destination refused") && error.contains(why),
            "{tool}: {error}"
        );
    }
    assert_eq!(h.peer.seen().await, Vec::<Value>::new(), "no message went out");
}

#[tokio::test]
async fn a_failed_task_and_an_oversized_answer_are_failed_calls() {
    for sdk in BOTH {
        a_failed_task_and_an_oversized_answer_are_failed_calls_with(sdk).await;
    }
}

async fn a_failed_task_and_an_oversized_answer_are_failed_calls_with(sdk: Sdk) {
    let Some(h) = Harness::new(sdk) else { return };
    let mut rec = h.recorder().await;
    let failed = executed(&h.handle(&mut rec, &h.envelope("1.0", "fail", json!({}))).await).clone();
    let error = failed.error.unwrap_or_default();
    assert!(
        error.starts_with("the tool reported an error: remote task ")
            && error.ends_with(" ended failed: no such order"),
        "{error}"
    );
    let big = executed(
        &h.handle(
            &mut rec,
            &h.envelope("2.0", "echo_small", json!({"message": "x"})),
        )
        .await,
    )
    .clone();
    assert!(
        big.error
            .as_deref()
            .unwrap_or_default()
            .contains("larger than maxResponseBytes (200 bytes)"),
        "{big:?}"
    );
    let dead_letters = h
        .entries()
        .await
        .iter()
        .filter(|e| matches!(e.body, EntryBody::DeadLettered { .. }))
        .count();
    assert_eq!(dead_letters, 2);
}

/// `examples/a2a` through the `contextos` binary: the delegation waits for a support lead's
/// approval, then the run pauses on the billing agent's question, names it, a person answers it
/// with `contextos resolve --answer`, the run resumes and completes with the remote task's
/// result; the record shows question and answer, and a replay of it decides the same without
/// reaching the remote agent.
#[test]
fn a_session_pauses_on_a_remote_question_and_resumes_with_the_answer() {
    let Some(peer) = Peer::start(Sdk::Python) else {
        return;
    };
    let data = tempfile::tempdir().expect("tempdir");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/a2a");
    let cli = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_contextos"))
            .arg("--data-dir")
            .arg(data.path())
            .args(["--tenant", "shop"])
            .args(args)
            .output()
            .expect("contextos runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let example = example.to_str().expect("utf-8 path");
    let override_ = format!("http://billing-agent.shop.svc:9999={}", peer.base);
    let access = ["--endpoint-override", override_.as_str()];

    let (code, out, err) = cli(&[&["run", "-f", example][..], &access].concat());
    assert_eq!(code, Some(4), "the delegation waits for approval\n{out}\n{err}");
    assert_eq!(
        blocking(peer.methods("/plain/rpc")).len(),
        0,
        "nothing reaches the billing agent before a lead approves"
    );
    let call_hash = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("call hash: "))
        .expect("the pause names the call")
        .to_owned();
    let (code, out, err) = cli(&[
        "approve",
        "refund-7",
        "--call",
        &call_hash,
        "--as",
        "lee@example.com",
        "--group",
        "support-leads",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = cli(&[&["resume", "refund-7"][..], &access].concat());
    assert_eq!(code, Some(4), "the run pauses on the question\n{out}\n{err}");
    assert!(out.contains("Which region should the refund go to?"), "{out}");
    let question = out
        .split("--call ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the pause says how to answer")
        .to_owned();
    assert!(question.starts_with("1.0.q1-"), "{out}");

    // Not an answer to a call that asked nothing, nor a finding that it acted.
    let (code, out, _) = cli(&[
        "resolve",
        "refund-7",
        "--call",
        &question,
        "--acted",
        "--as",
        "dana@example.com",
    ]);
    assert_ne!(code, Some(0), "{out}");
    let (code, out, err) = cli(&[
        "resolve",
        "refund-7",
        "--call",
        &question,
        "--answer",
        "EU",
        "--as",
        "dana@example.com",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");

    let (code, out, err) = cli(&[&["resume", "refund-7"][..], &access].concat());
    assert_eq!(code, Some(0), "the run completes\n{out}\n{err}");
    let run = out
        .split("record: run ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the run id")
        .to_owned();
    let (_, timeline, _) = cli(&["records", "show", &run]);
    assert!(
        timeline.contains(&format!("asks a person ({question}")) && timeline.contains("Which region"),
        "{timeline}"
    );
    assert!(
        timeline.contains("dana@example.com answered the remote agent of call 1.0: EU"),
        "{timeline}"
    );
    assert!(timeline.contains("refund sent to EU"), "{timeline}");
    let sent = blocking(peer.methods("/plain/rpc")).len();
    let (code, out, err) = cli(&["replay", "--run", &run]);
    assert_eq!(code, Some(0), "the replay decides the same\n{out}\n{err}");
    assert_eq!(
        blocking(peer.methods("/plain/rpc")).len(),
        sent,
        "a replay never reaches the remote agent"
    );
}

fn blocking<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// A crash after the answer went on record and before the result: the resumed call follows
/// the remote task — it never sends the first message again — and sends nothing the task
/// already has.
#[tokio::test]
async fn a_call_resumed_after_its_answer_follows_the_task_without_sending_again() {
    let Some(h) = Harness::new(Sdk::Python) else {
        return;
    };
    let mut rec = h.recorder().await;
    let mut call = h.envelope("1.0", "refund", json!({"message": "refund order 7"}));
    let (q1, _) = asked(&h.handle(&mut rec, &call).await, "1.0");
    call.resolution = Some(answer(&q1, ResolvedOutcome::Answered, "EU"));
    {
        // The answer is made durable before it is sent; the result, staged after it, is lost
        // with the process.
        let resumed = h.resumed().await;
        let outcome = resumed
            .handle_in_run(&call, &mut rec, &StateFacts::default(), &Default::default())
            .await
            .expect("handled");
        assert!(executed(&outcome).ok);
        rec.discard_staged();
    }
    let before = h.peer.seen().await.len();
    let result = executed(&h.resume(&mut rec, &call).await).clone();
    assert_eq!(result.output["text"], "refund sent to EU", "{result:?}");
    let after: Vec<String> = h.peer.seen().await[before..]
        .iter()
        .map(|r| r["method"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(after, ["GetTask"], "the task was looked at, nothing sent");
}

/// A runner that sends another call under a call id that already asked gets its own question:
/// a person's answer to the first is not taken for it.
#[tokio::test]
async fn an_answer_never_answers_another_call_under_the_same_call_id() {
    let Some(h) = Harness::new(Sdk::Python) else {
        return;
    };
    let mut rec = h.recorder().await;
    let mut first = h.envelope("1.0", "refund", json!({"message": "refund order 7"}));
    let (q1, _) = asked(&h.handle(&mut rec, &first).await, "1.0");
    first.resolution = Some(answer(&q1, ResolvedOutcome::Answered, "EU"));
    let done = h.resume(&mut rec, &first).await;
    assert!(executed(&done).ok);

    let mut other = h.envelope(
        "1.0",
        "refund",
        json!({"message": "refund order 8 to my other account"}),
    );
    other.idempotency_key = "idem-1.0-again".into();
    let asked_again = h.resume(&mut rec, &other).await;
    let (q_other, _) = asked(&asked_again, "1.0");
    assert_ne!(q_other, q1);
    let sent = h.peer.methods("/plain/rpc").await.len();
    other.resolution = first.resolution.clone();
    let still = h.resume(&mut rec, &other).await;
    assert_eq!(asked(&still, "1.0").0, q_other);
    assert_eq!(
        h.peer.methods("/plain/rpc").await.len(),
        sent,
        "the old answer was not sent"
    );
}

/// A remote agent that asks after every answer is stopped at the fifth question of one call:
/// the call fails and its task is cancelled.
#[tokio::test]
async fn a_remote_agent_that_keeps_asking_is_stopped() {
    let Some(h) = Harness::new(Sdk::Python) else {
        return;
    };
    let mut rec = h.recorder().await;
    let mut call = h.envelope("1.0", "nag", json!({"message": "refund order 7"}));
    let mut outcome = h.handle(&mut rec, &call).await;
    for n in 1..=contextos_runner::gateway::MAX_QUESTIONS {
        let (question, reason) = asked(&outcome, "1.0");
        assert!(question.starts_with(&format!("1.0.q{n}-")), "{question}");
        // The same words each time, each in a new status message: each a new question.
        assert!(reason.ends_with("It asks: \"Are you sure?\""), "{reason}");
        call.resolution = Some(answer(&question, ResolvedOutcome::Answered, "yes"));
        outcome = h.resume(&mut rec, &call).await;
    }
    let stopped = executed(&outcome);
    assert!(!stopped.ok);
    let error = stopped.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("a call may ask 4") && error.contains("was cancelled"),
        "{error}"
    );
    let methods = h.peer.methods("/plain/rpc").await;
    assert_eq!(
        methods.last().map(String::as_str),
        Some("CancelTask"),
        "{methods:?}"
    );
}
