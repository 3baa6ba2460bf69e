use super::*;

fn adapter(skill: Option<&str>, ceiling: ToolRisk) -> A2aAdapter {
    A2aAdapter {
        url: "http://billing.example:8080/agent".into(),
        skill: skill.map(str::to_owned),
        risk_ceiling: ceiling,
        max_response_bytes: 1 << 20,
        secret_ref: None,
    }
}

fn card(value: Value) -> Card {
    serde_json::from_value::<CardJson>(value)
        .expect("card")
        .into_card("http://billing.example:8080/agent")
}

fn billing_card(extensions: Value) -> Card {
    card(json!({
        "name": "billing",
        "supportedInterfaces": [
            {"url": "http://billing.example:8080/agent/grpc", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
            {"url": "http://billing.example:8080/agent/rpc", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        ],
        "capabilities": {"streaming": true, "extensions": extensions},
        "skills": [{"id": "refund", "name": "Refund"}],
    }))
}

fn ctx() -> CallContext {
    CallContext {
        idempotency_key: "key-1".into(),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        bearer_token: None,
        hmac_key: None,
        delegation: Some(super::super::Delegation {
            tenant: "team-a".into(),
            agent: "support".into(),
            run: "run-1".into(),
            user: Some("alice".into()),
        }),
    }
}

#[test]
fn a_card_is_checked_against_what_the_agent_declared() {
    let card = billing_card(json!([]));
    assert!(card.streaming);
    assert_eq!(
        card.check(&adapter(Some("refund"), ToolRisk::Network), &str::to_owned)
            .expect("fits"),
        "http://billing.example:8080/agent/rpc"
    );
    let missing = card.check(&adapter(Some("chargeback"), ToolRisk::Network), &str::to_owned);
    assert!(
        matches!(&missing, Err(AdapterError::Refused(why)) if why.contains("no skill chargeback") && why.contains("refund")),
        "{missing:?}"
    );
}

#[test]
fn a_card_cannot_send_calls_to_another_origin() {
    for elsewhere in [
        "http://metadata.internal/rpc",
        "https://billing.example:8080/agent/rpc",
        "http://billing.example:8081/agent/rpc",
        // The same host and port, but another agent's path, or someone's credentials.
        "http://billing.example:8080/admin/rpc",
        "http://billing.example:8080/agentx/rpc",
        "http://user:pw@billing.example:8080/agent/rpc",
        "not a url",
    ] {
        let card = card(json!({
            "name": "billing",
            "supportedInterfaces": [{"url": elsewhere, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}],
        }));
        let refused = card.check(&adapter(None, ToolRisk::Network), &str::to_owned);
        assert!(
            matches!(&refused, Err(AdapterError::Refused(why)) if why.contains("not below the adapter's URL")),
            "{elsewhere}: {refused:?}"
        );
    }
    // Host names compare without case, and a default port is the same port.
    let card = serde_json::from_value::<CardJson>(json!({
        "supportedInterfaces": [{"url": "http://BILLING.example/agent/rpc", "protocolBinding": "jsonrpc"}],
    }))
    .expect("card")
    .into_card("http://billing.example:80/agent");
    assert!(
        card.check(&adapter(None, ToolRisk::Network), &str::to_owned)
            .is_ok()
    );
}

#[test]
fn only_a_json_rpc_interface_of_protocol_1_is_used() {
    let card = card(json!({
        "supportedInterfaces": [
            {"url": "http://billing.example:8080/agent/v03", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
            {"url": "http://billing.example:8080/agent/rest", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
        ],
    }));
    let refused = card.check(&adapter(None, ToolRisk::Network), &str::to_owned);
    assert!(
        matches!(&refused, Err(AdapterError::Refused(why)) if why.contains("no JSON-RPC interface") && why.contains("HTTP+JSON 1.0")),
        "{refused:?}"
    );
}

#[test]
fn a_remote_ceiling_above_the_declared_one_is_refused() {
    let declares =
        |risk: &str| billing_card(json!([{"uri": RISK_CEILING_EXTENSION, "params": {"maxRisk": risk}}]));
    assert_eq!(declares("destructive").risk_ceiling, Some(ToolRisk::Destructive));
    let refused = declares("destructive").check(&adapter(None, ToolRisk::Delegated), &str::to_owned);
    assert!(
        matches!(&refused, Err(AdapterError::Refused(why)) if why.contains("up to risk destructive") && why.contains("riskCeiling delegated")),
        "{refused:?}"
    );
    assert!(
        declares("delegated")
            .check(&adapter(None, ToolRisk::Delegated), &str::to_owned)
            .is_ok()
    );
    assert!(
        declares("read_only")
            .check(&adapter(None, ToolRisk::Delegated), &str::to_owned)
            .is_ok()
    );
    // A ceiling that cannot be read is not taken as none.
    let refused = declares("anything").check(&adapter(None, ToolRisk::Destructive), &str::to_owned);
    assert!(
        matches!(&refused, Err(AdapterError::Refused(why)) if why.contains("not a ContextOS risk")),
        "{refused:?}"
    );
    // Other extensions say nothing about risk.
    let other =
        billing_card(json!([{"uri": "https://example.com/ext", "params": {"maxRisk": "destructive"}}]));
    assert!(
        other
            .check(&adapter(None, ToolRisk::ReadOnly), &str::to_owned)
            .is_ok()
    );
}

#[test]
fn a_first_message_carries_the_arguments_skill_and_delegation() {
    let args = json!({"message": "refund order 7", "order": 7});
    let sent = message(&args, &ctx(), Turn::First, Some("refund"));
    assert_eq!(sent["messageId"], "key-1");
    assert_eq!(sent["role"], "ROLE_USER");
    assert_eq!(sent["parts"], json!([{"text": "refund order 7"}, {"data": args}]));
    assert_eq!(sent["metadata"]["skill"], "refund");
    assert_eq!(
        sent["metadata"][DELEGATION_KEY],
        json!({"tenant": "team-a", "agent": "support", "run": "run-1", "user": "alice"})
    );
    assert!(sent.get("taskId").is_none());
}

#[test]
fn an_answer_continues_the_task_as_a_new_message() {
    let task = RemoteTask {
        task_id: "t-1".into(),
        context_id: "c-1".into(),
    };
    let asked = RemoteQuestion {
        task: task.clone(),
        text: "Which region?".into(),
        message_id: None,
    };
    let sent = message(
        &json!({"order": 7}),
        &ctx(),
        Turn::Answer {
            task: &task,
            text: "EU only",
            asked: &asked,
            question: 2,
            resent: false,
        },
        None,
    );
    assert_eq!(sent["messageId"], "key-1.a2");
    assert_eq!(sent["taskId"], "t-1");
    assert_eq!(sent["contextId"], "c-1");
    assert_eq!(sent["parts"], json!([{"text": "EU only"}]));
}

#[test]
fn events_split_across_chunks_and_line_endings() {
    let mut events = SseEvents::default();
    assert!(events.push(b"data: {\"a\":").is_empty());
    assert_eq!(events.push(b"1}\n\nda"), vec!["{\"a\":1}".to_owned()]);
    assert_eq!(
        events.push(b"ta: {\"b\":2}\r\n\r\n: comment\n\ndata: x\ndata: y\n\n"),
        vec!["{\"b\":2}".to_owned(), "x\ny".to_owned()]
    );
}

#[test]
fn a_streamed_task_folds_into_its_result() {
    let mut progress = Progress::default();
    let events = [
        json!({"task": {"id": "t-1", "contextId": "c-1", "status": {"state": "TASK_STATE_SUBMITTED"}}}),
        json!({"statusUpdate": {"taskId": "t-1", "contextId": "c-1", "status": {"state": "TASK_STATE_WORKING"}}}),
        json!({"artifactUpdate": {"taskId": "t-1", "artifact": {"artifactId": "a", "name": "refund", "parts": [{"text": "refunded"}]}}}),
        json!({"artifactUpdate": {"taskId": "t-1", "append": true, "artifact": {"artifactId": "a", "parts": [{"text": "7 EUR"}]}}}),
    ];
    for event in &events {
        progress.absorb(event).expect("event");
        assert!(progress.settled().expect("running").is_none());
    }
    progress
        .absorb(&json!({"statusUpdate": {"taskId": "t-1", "status": {"state": "TASK_STATE_COMPLETED"}}}))
        .expect("final");
    let Some(Reply::Done(done)) = progress.settled().expect("done") else {
        panic!("not done");
    };
    assert_eq!(done.body["taskId"], "t-1");
    assert_eq!(done.body["state"], "completed");
    assert_eq!(done.body["text"], "refunded\n7 EUR");
    assert_eq!(done.body["artifacts"][0]["name"], "refund");
}

#[test]
fn a_task_that_asks_is_a_question_and_one_that_fails_an_error() {
    let mut progress = Progress::default();
    progress
        .absorb(&json!({"task": {"id": "t-1", "contextId": "c-1", "status": {
            "state": "TASK_STATE_INPUT_REQUIRED",
            "message": {"role": "ROLE_AGENT", "parts": [{"text": "Which region?\u{7}"}]}}}}))
        .expect("task");
    assert_eq!(
        progress.settled().expect("asks"),
        Some(Reply::Asks(RemoteQuestion {
            task: RemoteTask {
                task_id: "t-1".into(),
                context_id: "c-1".into()
            },
            text: "Which region?".into(),
            message_id: None,
        }))
    );
    let mut failed = Progress::default();
    failed
        .absorb(&json!({"task": {"id": "t-2", "status": {"state": "failed", "message": {"parts": [{"text": "no such order"}]}}}}))
        .expect("task");
    let error = failed.settled().expect_err("failed");
    assert_eq!(
        error,
        AdapterError::ToolFailed("remote task t-2 ended failed: no such order".into())
    );
    assert!(!error.is_retryable());
}

#[test]
fn a_plain_message_is_a_whole_answer() {
    let mut progress = Progress::default();
    progress
        .absorb(&json!({"message": {"role": "ROLE_AGENT", "contextId": "c-9", "parts": [{"text": "hi"}, {"data": {"n": 1}}]}}))
        .expect("message");
    let Some(Reply::Done(done)) = progress.settled().expect("done") else {
        panic!("not done");
    };
    assert_eq!(done.body["text"], "hi");
    assert_eq!(done.body["parts"][1]["data"]["n"], 1);
}

#[test]
fn what_the_remote_says_is_bounded_and_checked() {
    let mut progress = Progress::default();
    let long = "x".repeat(ID_MAX_CHARS + 1);
    assert!(matches!(
        progress.absorb(&json!({"task": {"id": long, "status": {"state": "working"}}})),
        Err(AdapterError::Protocol(_))
    ));
    assert!(matches!(
        progress.absorb(&json!({"task": {"id": "t\n1", "status": {"state": "working"}}})),
        Err(AdapterError::Protocol(_))
    ));
    progress
        .absorb(&json!({"task": {"id": "t-1", "status": {"state": "working"}}}))
        .expect("task");
    assert!(matches!(
        progress.absorb(&json!({"statusUpdate": {"taskId": "t-2", "status": {"state": "completed"}}})),
        Err(AdapterError::Protocol(why)) if why.contains("switched tasks")
    ));
    assert!(matches!(
        progress.absorb(&json!({"statusUpdate": {"taskId": "t-1", "status": {"state": "TASK_STATE_DANCING"}}})),
        Err(AdapterError::Protocol(why)) if why.contains("unknown state")
    ));
    let question = "\u{202E}Which\nregion\u{200B}?\" ".repeat(QUESTION_MAX_BYTES);
    progress
        .absorb(
            &json!({"statusUpdate": {"taskId": "t-1", "status": {"state": "input-required",
            "message": {"parts": [{"text": question}]}}}}),
        )
        .expect("asks");
    let Some(Reply::Asks(asked)) = progress.settled().expect("asks") else {
        panic!("no question");
    };
    assert!(asked.text.len() <= QUESTION_MAX_BYTES, "{}", asked.text.len());
    assert!(
        asked.text.starts_with("Which region?\" Which region?"),
        "{}",
        asked.text
    );
    assert!(
        !asked
            .text
            .chars()
            .any(|c| c == '\n' || c == '\u{202E}' || c == '\u{200B}')
    );
}

#[test]
fn a_contextos_agent_waiting_for_its_own_approvers_asks_this_caller_nothing() {
    // As a ContextOS agent's task shows an approval it waits for: followed, not asked about.
    let mut progress = Progress::default();
    let waiting = crate::gateway::a2a_server::wire::task_status(&{
        let mut session: contextos_crds::Session = serde_json::from_value(json!({
            "apiVersion": "contextos.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": "a2a-1", "namespace": "shop"},
            "spec": {"agentRef": {"name": "triage"}, "input": {"prompt": "look"}},
            "status": {"phase": "AwaitingApproval", "pendingApproval": {
                "callHash": "c0ffee", "tool": "restart", "risk": "destructive", "arguments": "{}",
                "rule": "p/r", "reason": "needs a person", "approvers": {"users": ["dana"]}}},
        }))
        .expect("session");
        session.metadata.annotations = None;
        session
    });
    progress
        .absorb(&json!({"task": {"id": "a2a-1", "status": waiting}}))
        .expect("task");
    assert!(progress.settled().expect("settled").is_none(), "still followed");
    // Any other question is handed to a person.
    progress
        .absorb(
            &json!({"statusUpdate": {"taskId": "a2a-1", "status": {"state": "input-required",
            "message": {"parts": [{"text": "Which region?"}]}}}}),
        )
        .expect("asks");
    assert!(matches!(progress.settled().expect("asks"), Some(Reply::Asks(_))));
}

#[test]
fn a_json_rpc_error_names_its_code() {
    let error = result_of(
        "GetTask",
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "Task not found"}}),
    )
    .expect_err("error");
    assert_eq!(
        error,
        AdapterError::ToolFailed("GetTask: the remote agent answered error -32001: Task not found".into())
    );
}

#[test]
fn an_override_applies_to_the_endpoint_the_card_names() {
    // The card names the in-cluster address; the call goes to the override, as the card did.
    let card = serde_json::from_value::<CardJson>(json!({
        "supportedInterfaces": [{"url": "http://billing.shop.svc:9999/agent/rpc", "protocolBinding": "JSONRPC"}],
    }))
    .expect("card")
    .into_card("http://127.0.0.1:4000/agent");
    let rewrite = |url: &str| url.replace("http://billing.shop.svc:9999", "http://127.0.0.1:4000");
    let mut local = adapter(None, ToolRisk::Network);
    local.url = "http://127.0.0.1:4000/agent".into();
    assert_eq!(
        card.check(&local, &rewrite).expect("fits"),
        "http://127.0.0.1:4000/agent/rpc"
    );
    assert!(card.check(&local, &str::to_owned).is_err());
}

#[test]
fn a_snapshot_still_showing_the_answered_question_is_not_a_new_one() {
    let task = RemoteTask {
        task_id: "t-1".into(),
        context_id: "c-1".into(),
    };
    let asking = |words: &str, id: Option<&str>| {
        json!({"task": {"id": "t-1", "status": {"state": "TASK_STATE_INPUT_REQUIRED",
            "message": {"messageId": id, "parts": [{"text": words}]}}}})
    };
    // Without message ids, the same words are the same question.
    let asked = RemoteQuestion {
        task: task.clone(),
        text: "Which region?".into(),
        message_id: None,
    };
    let turn = Turn::Answer {
        task: &task,
        text: "EU",
        asked: &asked,
        question: 1,
        resent: false,
    };
    let mut progress = Progress::for_turn(turn);
    progress
        .absorb(&asking("Which  region?", None))
        .expect("snapshot");
    assert_eq!(progress.settled().expect("waits"), None);
    progress
        .absorb(&asking("Are you sure?", None))
        .expect("asks again");
    assert!(matches!(progress.settled(), Ok(Some(Reply::Asks(q))) if q.text == "Are you sure?"));
    // With them, the same words in a new message are a new question; a question that said
    // nothing is recognised too.
    let named = RemoteQuestion {
        message_id: Some("m-1".into()),
        ..asked.clone()
    };
    let turn = Turn::Answer {
        task: &task,
        text: "EU",
        asked: &named,
        question: 1,
        resent: false,
    };
    let mut progress = Progress::for_turn(turn);
    progress
        .absorb(&asking("Which region?", Some("m-1")))
        .expect("snapshot");
    assert_eq!(progress.settled().expect("waits"), None);
    progress
        .absorb(&asking("Which region?", Some("m-2")))
        .expect("asked again");
    assert!(matches!(progress.settled(), Ok(Some(Reply::Asks(q))) if q.message_id.as_deref() == Some("m-2")));
    let silent = RemoteQuestion {
        text: SAYS_NOTHING.into(),
        ..asked.clone()
    };
    let turn = Turn::Answer {
        task: &task,
        text: "EU",
        asked: &silent,
        question: 1,
        resent: false,
    };
    let mut progress = Progress::for_turn(turn);
    progress.absorb(&asking("", None)).expect("snapshot");
    assert_eq!(progress.settled().expect("waits"), None);
    // Another task's event is refused: the answer belongs to the task it was given for.
    assert!(matches!(
        progress.absorb(&json!({"statusUpdate": {"taskId": "t-9", "status": {"state": "completed"}}})),
        Err(AdapterError::Protocol(_))
    ));
}

#[test]
fn an_event_cut_into_single_bytes_is_read_once() {
    let mut events = SseEvents::default();
    let stream = format!("data: {}\n\n", "x".repeat(10_000));
    let mut got = Vec::new();
    for byte in stream.as_bytes() {
        got.extend(events.push(std::slice::from_ref(byte)));
        assert!(events.scanned <= events.pending.len());
    }
    assert_eq!(got, vec!["x".repeat(10_000)]);
}

#[test]
fn many_events_and_comments_in_one_chunk_are_all_read() {
    let mut events = SseEvents::default();
    let mut stream = String::new();
    for i in 0..1_000 {
        stream.push_str(&format!(":\n\ndata: {i}\r\n\r\n"));
    }
    stream.push_str("data: partial");
    let got = events.push(stream.as_bytes());
    assert_eq!(got.len(), 1_000);
    assert_eq!(got[999], "999");
    assert_eq!(events.pending, b"data: partial");
    assert_eq!(events.push(b"\n\n"), vec!["partial".to_owned()]);
    assert!(events.pending.is_empty());
}
