//! The OpenAI-compatible provider against a local HTTP server that checks the request shape
//! the way OpenAI, vLLM, Ollama and llama.cpp's server read it.

use std::sync::{Arc, Mutex};

use axum::{Json, Router, http::HeaderMap, routing::post};
use contextos_runner::model::{
    Message, Model, ModelError, ModelRequest, Role, ToolCallRequest, ToolSpec, openai::OpenAiCompatible,
};
use serde_json::{Value, json};

async fn server(reply: Value, status: u16) -> (String, Arc<Mutex<Vec<(HeaderMap, Value)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, Json(body): Json<Value>| {
            let log = log.clone();
            let reply = reply.clone();
            async move {
                log.lock().expect("lock").push((headers, body));
                (
                    axum::http::StatusCode::from_u16(status).expect("status"),
                    Json(reply),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn request() -> ModelRequest {
    let mut assistant = Message::new(Role::Assistant, "Looking up the runbook.");
    assistant.tool_calls = vec![ToolCallRequest {
        id: "call-1".into(),
        tool: "search_runbooks".into(),
        arguments: json!({"query": "5xx"}),
    }];
    let mut tool = Message::new(Role::Tool, "{\"results\": [\"restart\"]}");
    tool.tool_call_id = Some("call-1".into());
    ModelRequest {
        model: "llama3.1:8b".into(),
        messages: vec![
            Message::new(Role::System, "You are on call."),
            Message::new(Role::User, "checkout 5xx"),
            assistant,
            tool,
        ],
        tools: vec![ToolSpec {
            name: "restart_deployment".into(),
            description: "Rolling restart".into(),
            parameters: json!({"type": "object", "required": ["deployment"], "properties": {"deployment": {"type": "string"}}}),
        }],
        max_output_tokens: Some(512),
    }
}

#[tokio::test]
async fn a_tool_call_round_trip_has_the_openai_shape() {
    let reply = json!({
        "id": "chatcmpl-1", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "restart_deployment", "arguments": "{\"deployment\":\"checkout-api\"}"}}]}}],
        "usage": {"prompt_tokens": 321, "completion_tokens": 17, "total_tokens": 338}
    });
    let (url, seen) = server(reply, 200).await;
    let model = OpenAiCompatible::new(&url, Some("sk-test".into()), std::time::Duration::from_secs(5));
    let turn = model.complete(&request()).await.expect("turn");
    assert_eq!(
        turn.tool_calls,
        vec![ToolCallRequest {
            id: "call_9".into(),
            tool: "restart_deployment".into(),
            arguments: json!({"deployment": "checkout-api"})
        }]
    );
    assert_eq!((turn.prompt_tokens, turn.completion_tokens), (321, 17));

    let (headers, body) = seen.lock().expect("lock")[0].clone();
    assert_eq!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer sk-test")
    );
    assert_eq!(body["model"], "llama3.1:8b");
    assert_eq!(body["max_tokens"], 512);
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "restart_deployment");
    assert_eq!(
        body["tools"][0]["function"]["parameters"]["required"][0],
        "deployment"
    );
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(
        messages
            .iter()
            .map(|m| m["role"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["system", "user", "assistant", "tool"]
    );
    assert_eq!(
        messages[2]["tool_calls"][0]["function"]["arguments"], "{\"query\":\"5xx\"}",
        "arguments are a JSON string"
    );
    assert_eq!(messages[3]["tool_call_id"], "call-1");
}

#[tokio::test]
async fn usage_is_charged_as_reported_within_bounds_and_estimated_when_missing() {
    let answer = |usage: Value| {
        json!({
            "id": "chatcmpl-2", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Restart it."}}],
            "usage": usage,
        })
    };
    let ask = |reply: Value| async move {
        let (url, _) = server(reply, 200).await;
        let model = Model::OpenAi(OpenAiCompatible::new(
            &url,
            None,
            std::time::Duration::from_secs(5),
        ));
        model.complete(&request(), 1).await.expect("turn")
    };
    // Cached tokens, as OpenAI reports them, count at most the prompt's.
    let cached = ask(answer(json!({"prompt_tokens": 300, "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 900}})))
    .await;
    assert_eq!(
        (
            cached.prompt_tokens,
            cached.cached_prompt_tokens,
            cached.completion_tokens
        ),
        (300, 300, 20)
    );
    // More completion tokens than the request allowed (512) are not believed.
    let inflated = ask(answer(
        json!({"prompt_tokens": 10, "completion_tokens": 1_000_000}),
    ))
    .await;
    assert_eq!(inflated.completion_tokens, 512);
    // No usage at all: charged an estimate of the prompt and the answer, never nothing.
    let silent = ask(answer(serde_json::Value::Null)).await;
    assert_eq!(
        (silent.prompt_tokens, silent.completion_tokens),
        (contextos_runner::model::estimated_tokens(&request()), 3)
    );
}

#[tokio::test]
async fn errors_name_the_endpoint_and_the_problem() {
    let (url, _) = server(json!({"error": {"message": "model not found"}}), 404).await;
    let model = OpenAiCompatible::new(&url, None, std::time::Duration::from_secs(5));
    let err = model.complete(&request()).await.expect_err("404");
    assert!(
        matches!(err, ModelError::Status { status: 404, .. }) && err.to_string().contains("model not found"),
        "{err}"
    );

    let (url, _) = server(json!({"unexpected": true}), 200).await;
    let err = OpenAiCompatible::new(&url, None, std::time::Duration::from_secs(5))
        .complete(&request())
        .await
        .expect_err("malformed");
    assert!(err.to_string().contains("no choices[0].message"), "{err}");

    let err = OpenAiCompatible::new("http://127.0.0.1:9", None, std::time::Duration::from_secs(2))
        .complete(&request())
        .await
        .expect_err("unreachable");
    assert!(matches!(err, ModelError::Unreachable { .. }), "{err}");
}

/// A hostile endpoint streams an endless answer: it is refused once past the bound, without
/// the client holding more than that.
#[tokio::test]
async fn an_endless_answer_is_refused_at_the_bound() {
    use futures::stream;
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let chunk = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
            // 64 MiB of whitespace after an opening brace: never a whole answer.
            let body = stream::iter(
                std::iter::once(axum::body::Bytes::from_static(b"{"))
                    .chain(std::iter::repeat_n(chunk, 1024))
                    .map(Ok::<_, std::io::Error>),
            );
            axum::body::Body::from_stream(body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = OpenAiCompatible::new(&url, None, std::time::Duration::from_secs(30));
    let refused = client.complete(&request()).await.expect_err("refused");
    assert!(
        matches!(&refused, ModelError::Malformed { detail, .. } if detail.contains("longer than")),
        "{refused}"
    );
}

/// Set in the child process [`a_process_without_ca_certificates_still_speaks_plain_http`] starts.
const NO_ROOTS_CHILD: &str = "CONTEXTOS_TEST_NO_ROOTS_CHILD";

/// A minimal image (a runner pod's) has no CA certificates: clients must still build — plain
/// HTTP works, HTTPS is refused — instead of the process failing on its first client. The
/// platform roots are looked up once per process, so the check runs in a child process of this
/// test binary whose environment points the lookup at an empty directory.
#[test]
fn a_process_without_ca_certificates_still_speaks_plain_http() {
    if std::env::var_os(NO_ROOTS_CHILD).is_some() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(speak_plain_http_without_roots());
        return;
    }
    let empty = tempfile::tempdir().expect("temp dir");
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_process_without_ca_certificates_still_speaks_plain_http",
            "--nocapture",
        ])
        .env(NO_ROOTS_CHILD, "1")
        .env("SSL_CERT_FILE", empty.path().join("none.pem"))
        .env("SSL_CERT_DIR", empty.path())
        .output()
        .expect("run the child test");
    assert!(
        output.status.success(),
        "the child failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child ran the check: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

async fn speak_plain_http_without_roots() {
    let (url, seen) = server(
        json!({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}),
        200,
    )
    .await;
    let model = OpenAiCompatible::new(&url, None, std::time::Duration::from_secs(5));
    let turn = model
        .complete(&request())
        .await
        .expect("plain HTTP works without CA roots");
    assert_eq!(turn.content, "ok");
    assert_eq!(seen.lock().expect("lock").len(), 1);
    let refused = OpenAiCompatible::new("https://127.0.0.1:9/v1", None, std::time::Duration::from_secs(2))
        .complete(&request())
        .await;
    assert!(refused.is_err(), "HTTPS without roots is refused");
}
