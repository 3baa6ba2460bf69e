//! The A2A peer agents the interop tests call (`a2a_peer.py` on the official Python SDK,
//! `a2a_peer.mjs` on the JavaScript one; see their headers for the agents and skills), each
//! started as its own process on a loopback port and stopped when dropped. Without the SDK
//! installed (`make unit` exports where), a test says it is skipped.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

const PYTHON_ENV: &str = "CONTEXTOS_A2A_PYTHON";
const JS_MODULES_ENV: &str = "CONTEXTOS_A2A_JS_MODULES";

/// Which SDK serves the peer agents.
#[derive(Clone, Copy, Debug)]
pub enum Sdk {
    Python,
    JavaScript,
}

/// The peer process, stopped when the test ends.
pub struct Peer {
    child: Child,
    pub base: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// Starts the peer of `sdk`, or `None` (the test says it is skipped) without the SDK.
    pub fn start(sdk: Sdk) -> Option<Self> {
        let support = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
        let (env, installer) = match sdk {
            Sdk::Python => (PYTHON_ENV, "a2a_peer.sh"),
            Sdk::JavaScript => (JS_MODULES_ENV, "a2a_peer_js.sh"),
        };
        let Some(installed) = std::env::var_os(env) else {
            eprintln!(
                "skipped: {env} is not set (`make unit` sets it: bash runner/tests/support/{installer})"
            );
            return None;
        };
        let mut command = match sdk {
            Sdk::Python => {
                let mut python = Command::new(installed);
                python.arg(support.join("a2a_peer.py"));
                python
            }
            Sdk::JavaScript => {
                let mut node = Command::new("node");
                node.arg(support.join("a2a_peer.mjs")).arg(installed);
                node
            }
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the A2A peer starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the peer prints its port");
        let port: u16 = line.trim().parse().expect("a port");
        Some(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The JSON-RPC requests the peer received, in order.
    pub async fn seen(&self) -> Vec<Value> {
        contextos_runner::http::client()
            .get(format!("{}/seen", self.base))
            .send()
            .await
            .expect("seen")
            .json()
            .await
            .expect("json")
    }

    /// The JSON-RPC methods the peer received at `path`, in order.
    pub async fn methods(&self, path: &str) -> Vec<String> {
        self.seen()
            .await
            .iter()
            .filter(|r| r["path"] == path)
            .map(|r| r["method"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}
