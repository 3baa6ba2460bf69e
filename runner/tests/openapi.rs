//! The OpenAPI adapter against a real service described by its own document: a FastAPI service
//! (`runner/tests/support/openapi_peer.py`, FastAPI from PyPI installed by
//! `runner/tests/support/openapi_peer.sh`; `make unit` sets `CONTEXTOS_OPENAPI_PYTHON`) whose
//! OpenAPI 3.1 document FastAPI writes from the code that serves it. Path, query, header and body
//! parameters mapped from the arguments; answers checked against the document; and the checks
//! that refuse before anything is sent (arguments the operation does not take, a method above the
//! tool's declared risk, a changed document) — each also checked in what the service received.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use contextos_crds::{
    Policy,
    common::{SafetyMode, ToolKind, ToolRisk},
};
use contextos_runner::{
    gateway::{CallOutcome, CatalogTool, ToolGateway, envelope::CallEnvelope},
    keys::KeyPair,
    policy::{PolicySet, StateFacts, compile_policy},
    records::{
        EmbeddedStore, EntryBody, PinnedDigests, RecordEntry, RecordStore as _, Recorder, RunStart, TenantId,
        entry::ToolResultRecord, verify_run,
    },
    run_context::{AgentIdentity, RunContext, SignedRunContext},
};
use serde_json::{Value, json};
use sha2::Digest as _;

const PYTHON_ENV: &str = "CONTEXTOS_OPENAPI_PYTHON";
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const RUN: &str = "run-openapi";
const TOKEN: &str = "tickets-token";

/// The service, stopped when the test ends.
struct Service {
    child: Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Starts the service, or `None` (the test says it is skipped) without FastAPI.
    fn start() -> Option<Self> {
        let Some(python) = std::env::var_os(PYTHON_ENV) else {
            eprintln!(
                "skipped: {PYTHON_ENV} is not set (`make unit` sets it: bash runner/tests/support/openapi_peer.sh)"
            );
            return None;
        };
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/openapi_peer.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the ticket service starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the service prints its port");
        let port: u16 = line.trim().parse().expect("a port");
        Some(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The requests the operations received, in order.
    async fn seen(&self) -> Vec<Value> {
        contextos_runner::http::client()
            .get(format!("{}/_seen", self.base))
            .send()
            .await
            .expect("seen")
            .json()
            .await
            .expect("json")
    }

    /// SHA-256 of the document the service serves now.
    async fn document_sha256(&self) -> String {
        let bytes = contextos_runner::http::client()
            .get(format!("{}/openapi.json", self.base))
            .send()
            .await
            .expect("document")
            .bytes()
            .await
            .expect("bytes");
        hex::encode(sha2::Sha256::digest(&bytes))
    }
}

/// The tools: `(name, operationId, risk, extra adapter fields)`.
fn declared(pin: &str) -> [(&'static str, &'static str, &'static str, String); 8] {
    [
        ("get_ticket", "get_ticket", "read_only", String::new()),
        ("create_ticket", "create_ticket", "network", String::new()),
        ("close_ticket", "close_ticket", "destructive", String::new()),
        // Declared below what its DELETE can do.
        ("close_quietly", "close_ticket", "network", String::new()),
        ("broken_ticket", "broken_ticket", "read_only", String::new()),
        (
            "pinned",
            "get_ticket",
            "read_only",
            format!(", documentSha256: {pin}"),
        ),
        (
            "stale_pin",
            "get_ticket",
            "read_only",
            format!(", documentSha256: {}", "0".repeat(64)),
        ),
        ("missing", "list_everything", "read_only", String::new()),
    ]
}

fn tools(base: &str, pin: &str) -> Vec<CatalogTool> {
    declared(pin)
        .iter()
        .map(|(name, operation, risk, extra)| {
            let yaml = format!(
                r#"{{name: {name}, description: "tickets", risk: {risk}, kind: act,
                   adapter: {{openapi: {{document: "{base}/openapi.json", operationId: {operation}{extra}}}}}}}"#
            );
            let mut tool = CatalogTool::new(serde_yaml::from_str(&yaml).expect("tool")).expect("valid tool");
            tool.bearer_token = Some(TOKEN.into());
            tool
        })
        .collect()
}

const TOOLS: [&str; 8] = [
    "get_ticket",
    "create_ticket",
    "close_ticket",
    "close_quietly",
    "broken_ticket",
    "pinned",
    "stale_pin",
    "missing",
];

struct Harness {
    service: Service,
    gateway: ToolGateway,
    key: KeyPair,
    store: EmbeddedStore,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Option<Self> {
        let service = Service::start()?;
        let key = KeyPair::from_seed([23; 32]);
        let pin = service.document_sha256().await;
        let policy: Policy = serde_yaml::from_str(
            "{apiVersion: contextos.dev/v1alpha1, kind: Policy, metadata: {name: allow}, spec: {defaultEffect: allow, rules: []}}",
        )
        .expect("policy");
        let policies = PolicySet {
            policies: vec![compile_policy("allow", &policy.spec).expect("compiles")],
        };
        let gateway = ToolGateway::new(
            "ops",
            "triage",
            key.public(),
            tools(&service.base, &pin),
            policies,
            Default::default(),
        )
        .with_breakers(100, Duration::from_secs(60));
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("records.redb")).expect("store");
        Some(Self {
            service,
            gateway,
            key,
            store,
            _dir: dir,
        })
    }

    async fn recorder(&self) -> Recorder<'_, EmbeddedStore> {
        let start = RunStart {
            run_id: RUN.into(),
            session_id: "triage".into(),
            agent: "triage".into(),
            run_context: json!({}),
            pinned: PinnedDigests::default(),
            bundle: None,
        };
        Recorder::start(&self.store, tenant(), self.key.clone(), start)
            .await
            .expect("recorder")
    }

    /// Calls `tool` with `args` as call `call_id`; the tool's result.
    async fn call(
        &self,
        rec: &mut Recorder<'_, EmbeddedStore>,
        call_id: &str,
        tool: &str,
        args: Value,
    ) -> ToolResultRecord {
        let envelope = CallEnvelope {
            call_id: call_id.into(),
            tool: tool.into(),
            arguments: args,
            risk: risk_of(tool),
            kind: ToolKind::Act,
            idempotency_key: format!("idem-{call_id}"),
            traceparent: format!("00-{TRACE_ID}-00f067aa0ba902b7-01"),
            run_context: run_context(&self.key),
            approval: None,
            resolution: None,
        };
        match self
            .gateway
            .handle(&envelope, rec, &StateFacts::default())
            .await
            .expect("handled")
        {
            CallOutcome::Executed(result) => result,
            other => panic!("expected {tool} to execute, got {other:?}"),
        }
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
}

/// The risk `tool` is declared with (a call names it, and the gateway checks it).
fn risk_of(tool: &str) -> ToolRisk {
    let (_, _, risk, _) = declared("")
        .into_iter()
        .find(|(name, ..)| *name == tool)
        .expect("a declared tool");
    serde_yaml::from_str(risk).expect("a risk")
}

fn tenant() -> TenantId {
    TenantId::new("ops").expect("tenant")
}

fn run_context(key: &KeyPair) -> SignedRunContext {
    let now = contextos_runner::records::recorder::now_ms();
    SignedRunContext::sign(
        RunContext {
            run_id: RUN.into(),
            trace_id: TRACE_ID.into(),
            session_id: "triage".into(),
            tenant_id: "ops".into(),
            user: None,
            agent: AgentIdentity::new("ops", "triage"),
            safety_mode: SafetyMode::Autonomous,
            budget: contextos_crds::common::RunBudget {
                max_steps: 10,
                max_tokens: 10_000,
                max_tool_calls: 50,
                max_wall_seconds: 600,
                max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            },
            pinned: PinnedDigests::default(),
            allowed_tools: TOOLS.map(str::to_owned).to_vec(),
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

#[tokio::test]
async fn arguments_become_the_path_query_header_and_body_the_document_describes() {
    let Some(h) = Harness::new().await else { return };
    let mut rec = h.recorder().await;
    let read = h
        .call(
            &mut rec,
            "1.0",
            "get_ticket",
            json!({"ticket_id": "T 7", "fields": ["title", "owner"], "x-region": "eu-west"}),
        )
        .await;
    assert!(read.ok, "{read:?}");
    assert_eq!(
        read.output,
        json!({"id": "T 7", "title": "fields=title,owner region=eu-west", "status": "open", "priority": "low"})
    );
    let created = h
        .call(
            &mut rec,
            "2.0",
            "create_ticket",
            json!({"notify": true, "body": {"title": "disk full", "priority": "high"}}),
        )
        .await;
    assert!(created.ok, "{created:?}");
    assert_eq!(created.output["title"], "disk full notify=True");
    assert_eq!(created.output["priority"], "high");
    let closed = h
        .call(&mut rec, "3.0", "close_ticket", json!({"ticket_id": "T-100"}))
        .await;
    assert_eq!((closed.ok, &closed.output["status"]), (true, &json!("closed")));

    let seen = h.service.seen().await;
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(
        (&seen[0]["method"], &seen[0]["rawPath"], &seen[0]["query"]),
        (
            &json!("GET"),
            &json!("/tickets/T%207"),
            &json!("fields=title&fields=owner")
        )
    );
    assert_eq!(seen[0]["headers"]["x-region"], "eu-west");
    assert_eq!(seen[0]["body"], "");
    assert_eq!(
        (&seen[1]["method"], &seen[1]["rawPath"], &seen[1]["query"]),
        (&json!("POST"), &json!("/tickets"), &json!("notify=true"))
    );
    assert_eq!(
        serde_json::from_str::<Value>(seen[1]["body"].as_str().unwrap_or_default()).expect("json body"),
        json!({"title": "disk full", "priority": "high"})
    );
    assert_eq!(seen[1]["headers"]["content-type"], "application/json");
    assert_eq!(
        (&seen[2]["method"], &seen[2]["rawPath"]),
        (&json!("DELETE"), &json!("/tickets/T-100"))
    );
    for (i, request) in seen.iter().enumerate() {
        let headers = &request["headers"];
        assert_eq!(headers["authorization"], format!("Bearer {TOKEN}"));
        assert_eq!(headers["idempotency-key"], format!("idem-{}.0", i + 1));
        assert!(
            headers["traceparent"]
                .as_str()
                .unwrap_or_default()
                .contains(TRACE_ID),
            "{request}"
        );
    }
    let results: Vec<ToolResultRecord> = h
        .entries()
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            EntryBody::ToolResult(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(results, vec![read, created, closed], "recorded as answered");
}

#[tokio::test]
async fn calls_that_do_not_fit_the_document_are_refused_before_anything_is_sent() {
    let Some(h) = Harness::new().await else { return };
    let mut rec = h.recorder().await;
    let refusals = [
        ("get_ticket", json!({"ticket_id": "7", "admin": true}), "admin"),
        ("get_ticket", json!({"fields": ["title"]}), "ticket_id"),
        ("get_ticket", json!({"ticket_id": ".."}), "`..` segment"),
        ("get_ticket", json!({"ticket_id": ""}), "is empty"),
        (
            "get_ticket",
            json!({"ticket_id": "7", "x-region": "eu\r\nx-admin: yes"}),
            "header",
        ),
        (
            "create_ticket",
            json!({"body": {"title": "x", "priority": "urgent"}}),
            "/body/priority",
        ),
        (
            "close_quietly",
            json!({"ticket_id": "7"}),
            "is DELETE /tickets/{ticket_id}, which is at least destructive",
        ),
        ("stale_pin", json!({"ticket_id": "7"}), "documentSha256"),
        (
            "missing",
            json!({}),
            "no operation has operationId \"list_everything\"",
        ),
    ];
    for (i, (tool, args, says)) in refusals.into_iter().enumerate() {
        let result = h.call(&mut rec, &format!("{i}.0"), tool, args).await;
        let error = result.error.clone().unwrap_or_default();
        assert!(!result.ok && error.contains(says), "{tool}: {result:?}");
        assert!(error.contains("does not fit its OpenAPI document"), "{error}");
        assert_eq!(result.attempts, 1, "{tool}: not retried");
    }
    assert_eq!(
        h.service.seen().await,
        Vec::<Value>::new(),
        "nothing reached the service"
    );
    let pinned = h.call(&mut rec, "9.0", "pinned", json!({"ticket_id": "7"})).await;
    assert!(pinned.ok, "the document the pin names: {pinned:?}");
    h.entries().await;
}

#[tokio::test]
async fn an_answer_the_document_does_not_describe_fails_the_call() {
    let Some(h) = Harness::new().await else { return };
    let mut rec = h.recorder().await;
    let result = h
        .call(&mut rec, "1.0", "broken_ticket", json!({"ticket_id": "7"}))
        .await;
    let error = result.error.clone().unwrap_or_default();
    assert!(!result.ok, "{result:?}");
    assert!(
        error.contains("the answer of operation broken_ticket (HTTP 200) does not match the schema its document gives for 200"),
        "{error}"
    );
    assert_eq!(
        h.service.seen().await.len(),
        1,
        "sent once: the answer was wrong, not the network"
    );
    h.entries().await;
}
