use std::collections::BTreeMap;

use contextos_crds::{
    Agent, Session,
    common::{Approvers, ToolRisk},
    session::{PendingApproval, SessionPhase, SessionStatus},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use super::*;

fn caller(name: &str) -> Reader {
    Reader {
        username: name.into(),
        uid: String::new(),
        groups: vec!["system:authenticated".into(), "billing".into()],
        extra: BTreeMap::new(),
    }
}

fn agent(exposed: bool) -> Agent {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/quickstart/agent.yaml"
    ))
    .expect("quickstart agent");
    let mut agent: Agent = serde_yaml::from_str(&text).expect("agent");
    agent.spec = crate::manifests::ManifestSet::load(&[
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
    ])
    .and_then(|set| set.agent_with_skills("oncall-assistant"))
    .expect("the quickstart agent with its skills");
    if exposed {
        agent.spec.a2a = Some(serde_json::from_value(json!({
            "description": "Triage of checkout incidents",
            "skills": [{"id": "triage", "name": "Triage", "description": "Looks into an incident", "examples": ["checkout 5xx"]}],
        })).expect("a2a"));
    }
    agent
}

fn params(message: Value) -> Value {
    json!({"message": message})
}

fn message(parts: Value) -> Value {
    json!({"messageId": "m-1", "role": "ROLE_USER", "parts": parts})
}

#[test]
fn a_message_becomes_a_prompt_and_its_data_the_input() {
    let incoming = incoming(&params(message(json!([
        {"text": "checkout returns 5xx"},
        {"data": {"service": "checkout"}},
        {"text": "since 10:00"}
    ]))))
    .expect("read");
    assert_eq!(incoming.prompt, "checkout returns 5xx\n\nsince 10:00");
    assert_eq!(incoming.data, Some(json!({"service": "checkout"})));
    assert_eq!(incoming.message_id, "m-1");
    assert!(!incoming.return_immediately);
}

#[test]
fn messages_a_session_cannot_hold_are_refused_with_the_reason() {
    let code = |p: Value| incoming(&p).expect_err("refused").code;
    // No message id, or an agent's message.
    assert_eq!(
        code(json!({"message": {"role": "ROLE_USER", "parts": [{"text": "x"}]}})),
        -32602
    );
    assert_eq!(
        code(params(
            json!({"messageId": "m", "role": "ROLE_AGENT", "parts": [{"text": "x"}]})
        )),
        -32602
    );
    // Files and raw bytes: the content type is not taken.
    assert_eq!(
        code(params(message(
            json!([{"text": "x"}, {"url": "https://example.com/f"}])
        ))),
        -32005
    );
    assert_eq!(code(params(message(json!([{"raw": "AAAA"}])))), -32005);
    // Two data parts, data that is not an object, data without words.
    assert_eq!(
        code(params(message(
            json!([{"text": "x"}, {"data": {}}, {"data": {}}])
        ))),
        -32602
    );
    assert_eq!(
        code(params(message(json!([{"text": "x"}, {"data": [1]}])))),
        -32602
    );
    assert_eq!(code(params(message(json!([{"data": {"a": 1}}])))), -32602);
    let bulk = "x".repeat(64 * 1024);
    assert_eq!(
        code(params(message(json!([{"text": "x"}, {"data": {"bulk": bulk}}])))),
        -32602
    );
    // Push notifications are not offered: a message asking for them is refused, not ignored.
    let mut push = params(message(json!([{"text": "x"}])));
    push["configuration"] = json!({"taskPushNotificationConfig": {"url": "https://example.com/hook"}});
    assert_eq!(code(push), -32003);
    // More than a prompt holds; more parts than taken; an id with a line break.
    assert_eq!(
        code(params(message(json!([{"text": "x".repeat(65537)}])))),
        -32602
    );
    let many: Vec<Value> = (0..65).map(|_| json!({"text": "x"})).collect();
    assert_eq!(code(params(message(json!(many)))), -32602);
    assert_eq!(
        code(params(
            json!({"messageId": "a\nb", "role": "ROLE_USER", "parts": [{"text": "x"}]})
        )),
        -32602
    );
    // Nor ids that read otherwise than they are (a direction override, a zero-width space):
    // they end up in the Session's annotations, which people read.
    for id in ["task-\u{202E}1kcab", "ta\u{200B}sk-1"] {
        for field in ["messageId", "contextId"] {
            let mut message = json!({"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}]});
            message[field] = json!(id);
            assert_eq!(code(params(message)), -32602, "{field} {id:?}");
        }
    }
}

#[test]
fn the_session_acts_for_the_caller_and_a_resent_message_is_the_same_session() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let alice = session("shop", "triage", &caller("alice"), &incoming, None).expect("session");
    let again = session("shop", "triage", &caller("alice"), &incoming, None).expect("session");
    let bob = session("shop", "triage", &caller("bob"), &incoming, None).expect("session");
    assert_eq!(alice.metadata.name, again.metadata.name);
    assert_ne!(
        alice.metadata.name, bob.metadata.name,
        "callers' messages never meet"
    );
    let user = alice.spec.user.clone().expect("user");
    assert_eq!(user.subject, "alice");
    assert_eq!(user.groups, ["system:authenticated", "billing"]);
    assert!(user.scopes.is_empty(), "a caller delegates no scopes");
    assert!(alice.spec.approvals.is_empty() && !alice.spec.cancel);
    assert!(is_task_of(&alice, &caller("alice")));
    assert!(!is_task_of(&alice, &caller("bob")));
    assert!(same_request(&alice, &again));
    assert!(!same_request(&alice, &bob));
}

#[test]
fn an_account_made_again_under_an_old_name_is_another_caller() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let with_uid = |uid: &str| Reader {
        uid: uid.into(),
        ..caller("system:serviceaccount:partner:bot")
    };
    let (old, new) = (with_uid("3f0c-old"), with_uid("9a1d-new"));
    let task = session("shop", "triage", &old, &incoming, None).expect("session");
    assert!(is_task_of(&task, &old));
    // The new account meets none of the old one's tasks by lookup (sending an old message id
    // again, it meets the old task's name and is told the id was used); its open tasks are
    // counted with its namespace's other accounts' (below).
    assert!(
        !is_task_of(&task, &new),
        "the old account's task is not the new one's"
    );
    assert_ne!(caller_id(&old), caller_id(&new));
    // A task made before uids were kept (no uid mark, which only the gateway writes) is its
    // caller's by name, so a message resent across the upgrade still meets it, by its name.
    let mut earlier = task.clone();
    earlier
        .metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .remove(CALLER_UID_ANNOTATION);
    assert!(is_task_of(&earlier, &old));
    let resent = session("shop", "triage", &old, &incoming, None).expect("session");
    assert_eq!(earlier.metadata.name, resent.metadata.name);
}

#[test]
fn a_session_not_started_over_a2a_is_nobodys_task() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let mut applied = session("shop", "triage", &caller("alice"), &incoming, None).expect("session");
    applied.metadata.labels = None;
    assert!(!is_task_of(&applied, &caller("alice")));
}

#[test]
fn a_caller_in_more_groups_than_a_session_holds_is_refused_rather_than_cut() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let mut many = caller("alice");
    many.groups = (0..33).map(|i| format!("g{i}")).collect();
    assert_eq!(
        session("shop", "triage", &many, &incoming, None)
            .expect_err("refused")
            .code,
        -32600
    );
}

#[test]
fn the_callers_trace_is_continued() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let session = session("shop", "triage", &caller("alice"), &incoming, Some(traceparent)).expect("session");
    assert_eq!(
        session
            .metadata
            .annotations
            .expect("annotations")
            .get(TRACEPARENT_ANNOTATION),
        Some(&traceparent.to_owned())
    );
}

fn with_status(phase: SessionPhase, status: SessionStatus) -> Session {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let mut session = session("shop", "triage", &caller("alice"), &incoming, None).expect("session");
    session.status = Some(SessionStatus {
        phase: Some(phase),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "ToolFailed".into(),
            message: "the tool failed".into(),
            last_transition_time: Time(jiff::Timestamp::from_second(1_800_000_000).expect("time")),
            observed_generation: None,
        }],
        ..status
    });
    session
}

#[test]
fn a_session_awaiting_approval_asks_for_input_naming_the_call_but_not_its_arguments_nor_the_policy() {
    let session = with_status(
        SessionPhase::AwaitingApproval,
        SessionStatus {
            pending_approval: Some(PendingApproval {
                call_hash: "c0ffee".into(),
                tool: "post_status_update".into(),
                risk: ToolRisk::Network,
                arguments: "{\"secret\":\"do-not-show\"}".into(),
                rule: "changes/approve-writes".into(),
                reason: "writes need a person".into(),
                approvers: Approvers {
                    users: vec!["oncall-lead".into()],
                    groups: vec!["sre".into()],
                },
            }),
            ..Default::default()
        },
    );
    let task = task(&session);
    assert_eq!(task["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
    let text = task["status"]["message"]["parts"][0]["text"]
        .as_str()
        .expect("text");
    for expected in ["post_status_update", "network", "c0ffee", "shop/a2a-"] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
    // The arguments, and the tenant's policy: its rule, reason and approvers.
    for hidden in [
        "do-not-show",
        "changes/approve-writes",
        "writes need a person",
        "oncall-lead",
        "sre",
    ] {
        assert!(!task.to_string().contains(hidden), "{hidden} in {task}");
    }
    assert_eq!(task["status"]["message"]["role"], "ROLE_AGENT");
    assert_eq!(
        task["status"]["message"]["parts"][1]["data"]["pendingApproval"]["callHash"],
        "c0ffee"
    );
    assert_eq!(task["status"]["timestamp"], "2027-01-15T08:00:00Z");
}

#[test]
fn phases_map_to_task_states_and_success_hands_over_the_output() {
    let state_of = |phase| state(&with_status(phase, SessionStatus::default()));
    assert_eq!(state_of(SessionPhase::Pending), TaskState::Submitted);
    assert_eq!(state_of(SessionPhase::Running), TaskState::Working);
    assert_eq!(
        state_of(SessionPhase::AwaitingResolution),
        TaskState::InputRequired
    );
    assert_eq!(state_of(SessionPhase::Failed), TaskState::Failed);
    assert_eq!(state_of(SessionPhase::Cancelled), TaskState::Canceled);

    let json_output = with_status(
        SessionPhase::Succeeded,
        SessionStatus {
            output: Some("{\"summary\":\"rolled back\"}".into()),
            run_id: Some("r-1".into()),
            ..Default::default()
        },
    );
    let task = task(&json_output);
    assert_eq!(task["status"]["state"], "TASK_STATE_COMPLETED");
    assert_eq!(task["artifacts"][0]["parts"][0]["data"]["summary"], "rolled back");
    assert_eq!(task["metadata"]["contextos.dev/run"], "r-1");
    let text_output = with_status(
        SessionPhase::Succeeded,
        SessionStatus {
            output: Some("rolled back".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        artifact_event(&text_output).expect("artifact")["artifactUpdate"]["artifact"]["parts"][0]["text"],
        "rolled back"
    );
    // A failure says why; a run still going hands over nothing.
    let failed = task_status(&with_status(SessionPhase::Failed, SessionStatus::default()));
    assert!(
        failed["message"]["parts"][0]["text"]
            .as_str()
            .expect("text")
            .contains("the tool failed")
    );
    assert!(artifact(&with_status(SessionPhase::Running, SessionStatus::default())).is_none());
}

#[test]
fn the_card_names_the_endpoint_and_the_highest_risk_of_the_agents_tools() {
    assert!(card(&agent(false), "http://gw/a2a/shop/oncall-assistant").is_none());
    let exposed = agent(true);
    let card = card(&exposed, "http://gw/a2a/shop/oncall-assistant").expect("card");
    assert_eq!(
        card["supportedInterfaces"][0]["url"],
        "http://gw/a2a/shop/oncall-assistant"
    );
    assert_eq!(card["supportedInterfaces"][0]["protocolBinding"], "JSONRPC");
    assert_eq!(card["capabilities"]["streaming"], true);
    assert_eq!(card["skills"][0]["id"], "triage");
    let highest = exposed.spec.tools.iter().map(|t| t.risk).max().expect("tools");
    assert_eq!(
        card["capabilities"]["extensions"][0]["params"]["maxRisk"],
        highest.as_str()
    );
    // While a changed spec waits for promotion, what runs is not what the spec shows.
    let mut pending = agent(true);
    pending.spec.tools.retain(|t| t.risk == ToolRisk::ReadOnly);
    pending.status = Some(
        serde_json::from_value(json!({"revisions": {"candidate": "sha256:b", "promoted": "sha256:a"}}))
            .expect("status"),
    );
    assert_eq!(risk_ceiling(&pending), ToolRisk::Destructive);
    pending.status = Some(
        serde_json::from_value(json!({"revisions": {"candidate": "sha256:a", "promoted": "sha256:a"}}))
            .expect("status"),
    );
    // Its skills' tools are not in the Agent object: whatever they are, the highest there is.
    assert_eq!(risk_ceiling(&pending), ToolRisk::Destructive);
    pending.spec.skill_refs.clear();
    assert_eq!(risk_ceiling(&pending), ToolRisk::ReadOnly);
}

#[test]
fn requests_are_read_strictly() {
    let err = |body: &str| Request::parse(body.as_bytes()).expect_err("refused").1.code;
    assert_eq!(err("not json"), -32700);
    assert_eq!(err("[]"), -32600);
    assert_eq!(err(r#"{"jsonrpc":"2.0","method":"GetTask","params":{}}"#), -32600);
    assert_eq!(
        err(r#"{"jsonrpc":"1.0","id":1,"method":"GetTask","params":{}}"#),
        -32600
    );
    assert_eq!(
        err(r#"{"jsonrpc":"2.0","id":1,"method":"Teleport","params":{}}"#),
        -32601
    );
    assert_eq!(
        err(r#"{"jsonrpc":"2.0","id":1,"method":"CreateTaskPushNotificationConfig","params":{}}"#),
        -32003
    );
    assert_eq!(
        err(r#"{"jsonrpc":"2.0","id":1,"method":"GetTask","params":[1]}"#),
        -32602
    );
    let ok = Request::parse(br#"{"jsonrpc":"2.0","id":"7","method":"CancelTask","params":{"id":"a2a-1"}}"#)
        .expect("read");
    assert_eq!(ok.method, Method::CancelTask);
    assert_eq!(task_id(&ok.params).expect("id"), "a2a-1");
}

/// The tasks of one namespace's service accounts are counted together: a tenant minting
/// accounts gets no more tasks in another namespace than one account does.
#[test]
fn the_accounts_of_one_namespace_share_an_origin_label() {
    let incoming = incoming(&params(message(json!([{"text": "look"}])))).expect("read");
    let origin = |name: &str| {
        let task = session("shop", "triage", &caller(name), &incoming, None).expect("session");
        task.metadata.labels.expect("labels")[ORIGIN_LABEL].clone()
    };
    assert_eq!(
        origin("system:serviceaccount:partner:bot-1"),
        origin("system:serviceaccount:partner:bot-2")
    );
    assert_ne!(
        origin("system:serviceaccount:partner:bot-1"),
        origin("system:serviceaccount:other:bot-1")
    );
    assert_ne!(origin("alice@example.com"), origin("bob@example.com"));
}
