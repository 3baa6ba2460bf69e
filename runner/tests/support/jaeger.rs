//! Jaeger for the tests that read traces back from a real backend: its all-in-one, built from
//! the `github.com/jaegertracing/jaeger` Go module by `runner/tests/support/jaeger.sh` (`make`
//! sets `CONTEXTOS_JAEGER_BIN`), with in-memory storage and its OTLP/HTTP receiver, queried
//! through its HTTP API (with curl).

#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub const JAEGER_ENV: &str = "CONTEXTOS_JAEGER_BIN";
/// Jaeger, stopped when the test ends.
pub struct Jaeger {
    child: Child,
    /// Base URL of its OTLP/HTTP receiver.
    pub otlp: String,
    /// Base URL of its query API.
    pub query: String,
    _config: tempfile::TempDir,
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Jaeger {
    /// Starts Jaeger on ports of its own at `host` (loopback, or an address pods reach), or
    /// `None` (the test says it is skipped) without it.
    pub fn start(host: &str) -> Option<Self> {
        let Some(binary) = std::env::var_os(JAEGER_ENV) else {
            eprintln!(
                "skipped: {JAEGER_ENV} is not set (`make unit` sets it: bash runner/tests/support/jaeger.sh)"
            );
            return None;
        };
        let (otlp, query, query_grpc) = (free_port(host), free_port(host), free_port(host));
        let config = tempfile::tempdir().expect("tempdir");
        let path = config.path().join("jaeger.yaml");
        std::fs::write(
            &path,
            format!(
                "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}}
  telemetry:
    metrics: {{level: none}}
    logs: {{level: warn}}
extensions:
  jaeger_storage:
    backends:
      memory: {{memory: {{max_traces: 1000}}}}
  jaeger_query:
    storage: {{traces: memory}}
    # Its own requests are not traced (it would look for a collector on localhost:4317).
    enable_tracing: false
    http: {{endpoint: '{host}:{query}'}}
    grpc: {{endpoint: '{host}:{query_grpc}'}}
receivers:
  otlp:
    protocols:
      http: {{endpoint: '{host}:{otlp}'}}
processors:
  batch: {{timeout: 100ms}}
exporters:
  jaeger_storage_exporter: {{trace_storage: memory}}
"
            ),
        )
        .expect("config");
        let child = Command::new(binary)
            .arg(format!("--config=file:{}", path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("Jaeger starts");
        let jaeger = Self {
            child,
            otlp: format!("http://{host}:{otlp}"),
            query: format!("http://{host}:{query}"),
            _config: config,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&format!("{}/api/services", jaeger.query)).is_none() {
            assert!(
                Instant::now() < deadline,
                "Jaeger's query API did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(jaeger)
    }

    /// The trace `id` once it holds spans of every service in `services` and no new span came
    /// for a second (the exporters flush in batches), within 30 s.
    pub fn trace(&self, id: &str, services: &[&str]) -> Trace {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = (0, Instant::now());
        loop {
            if let Some(trace) = get(&format!("{}/api/traces/{id}", self.query)).map(|v| Trace::of(&v)) {
                let complete = services
                    .iter()
                    .all(|s| trace.spans.iter().any(|span| span.service == *s));
                if trace.spans.len() != last.0 {
                    last = (trace.spans.len(), Instant::now());
                } else if complete && last.1.elapsed() > Duration::from_secs(1) {
                    return trace;
                }
            }
            assert!(
                Instant::now() < deadline,
                "trace {id} incomplete after 30 s: {last:?} spans"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `GET url` as JSON, `None` until it answers 200.
pub fn get(url: &str) -> Option<Value> {
    let output = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())
        .flatten()
}

#[derive(Debug)]
pub struct Span {
    pub id: String,
    pub parent: Option<String>,
    pub name: String,
    pub service: String,
    pub tags: HashMap<String, Value>,
    /// The resource's attributes (Jaeger's process tags).
    pub process: HashMap<String, Value>,
}

#[derive(Debug)]
pub struct Trace {
    pub spans: Vec<Span>,
}

impl Trace {
    pub fn of(answer: &Value) -> Self {
        let trace = &answer["data"][0];
        let spans = trace["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|span| Span {
                id: span["spanID"].as_str().unwrap_or_default().to_owned(),
                parent: span["references"]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["refType"] == "CHILD_OF"))
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_owned),
                name: span["operationName"].as_str().unwrap_or_default().to_owned(),
                service: trace["processes"][span["processID"].as_str().unwrap_or_default()]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                tags: tags(&span["tags"]),
                process: tags(&trace["processes"][span["processID"].as_str().unwrap_or_default()]["tags"]),
            })
            .collect();
        Self { spans }
    }

    pub fn named(&self, name: &str) -> Vec<&Span> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    pub fn by_id(&self, id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.id == id)
    }

    /// The name of `span`'s parent in the trace.
    pub fn parent_name(&self, span: &Span) -> Option<&str> {
        self.by_id(span.parent.as_deref()?).map(|p| p.name.as_str())
    }
}

fn tags(list: &Value) -> HashMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["key"].as_str().unwrap_or_default().to_owned(),
                t["value"].clone(),
            )
        })
        .collect()
}
