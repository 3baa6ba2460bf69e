//! Capability sandboxes: code an Agent names (a stdio MCP server) never runs in the runner pod
//! or in the gateway service, next to credentials and other tenants' runs. In a cluster each
//! such server runs in a pod of its own per Session, which only the gateway may reach:
//!
//! - the operator creates the pod ([`pod_name`], [`ServerDigest`]) with the Session's
//!   SandboxProfile applied and no token, Secret or store address in it;
//! - inside it, `contextos capability serve` ([`serve`]) bridges one TCP connection to one
//!   freshly started server process, with a clean environment;
//! - the gateway ([`dial`]) connects to it and says which Session and server it wants
//!   ([`Hello`]), with a fresh nonce; the bridge answers only for its own Session, with a proof
//!   keyed by the pod's channel key ([`ChannelKey`], which the operator put in the pod's spec
//!   and the gateway reads from there). Pod addresses are reused: whatever answers at an old
//!   address of another tenant's pod cannot prove to be this one.
//!
//! What a capability answers is data, like every tool's output: the bridge bounds nothing the
//! gateway's MCP client does not bound again.

use std::{collections::VecDeque, net::SocketAddr, process::Stdio, sync::Arc, time::Duration};

use contextos_crds::agent::Tool;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

use crate::run::execution::executes_code;

/// Port a capability pod's bridge listens on.
pub const PORT: u16 = 7450;
/// `contextos.dev/role` of capability pods.
pub const ROLE: &str = "capability";
/// Label naming the server (its [`ServerDigest`]) a capability pod runs.
pub const SERVER_LABEL: &str = "contextos.dev/capability-server";
/// Greeted connections one bridge serves at once (one per gateway replica and run is the usual
/// load); a new one ends the oldest, which belongs to an attempt that is most likely over.
const MAX_CONNECTIONS: usize = 8;
/// Connections not yet greeted at once (readiness probes, strangers); more are closed.
const MAX_GREETING: usize = 16;
/// Longest a hello line may be, and how long the gateway has to send it.
const HELLO_LIMIT: u64 = 4096;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may go on once the gateway has closed its side of the connection.
const INPUT_CLOSED_GRACE: Duration = Duration::from_secs(30);
/// The environment a server starts with: a search path and a writable home, nothing else.
const SERVER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Which server of an Agent a capability pod runs: a digest of its command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServerDigest(String);

impl ServerDigest {
    /// The digest of `command` (program and arguments): 12 hex characters, unique among the
    /// few servers of one Session.
    pub fn of(command: &[String]) -> Self {
        let mut hash = Sha256::new();
        for part in command {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        Self(hex::encode(&hash.finalize()[..6]))
    }

    /// Accepts what a pod's label or a bridge's flag carries, if it has the digest's shape.
    pub fn parse(text: &str) -> Option<Self> {
        lowercase_hex(text, 12).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ServerDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `text` is `len` lowercase hex characters.
fn lowercase_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A server an Agent starts from a command, and where it runs in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapabilityServer {
    pub digest: ServerDigest,
    pub command: Vec<String>,
}

/// The distinct command-started servers of `tools`, in a stable order (one pod each).
pub fn servers(tools: &[Tool]) -> Vec<CapabilityServer> {
    let mut servers: Vec<CapabilityServer> = tools
        .iter()
        .filter(|t| executes_code(t))
        .filter_map(|t| t.adapter.mcp.as_ref()?.command.clone())
        .map(|command| CapabilityServer {
            digest: ServerDigest::of(&command),
            command,
        })
        .collect();
    servers.sort_by(|a, b| a.digest.cmp(&b.digest));
    servers.dedup_by(|a, b| a.digest == b.digest);
    servers
}

/// Name of the pod running `server` for Session `session`.
pub fn pod_name(session: &str, server: &ServerDigest) -> String {
    format!("{session}-cap-{server}")
}

/// Whose server a connection is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub namespace: String,
    pub session: String,
    pub server: ServerDigest,
}

/// The key a capability pod proves itself with: random per pod, written by the operator into
/// the pod's arguments (readable by whoever may read pods in the namespace, which is the
/// tenant itself and the gateway), never a credential for anything else.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelKey(String);

impl ChannelKey {
    /// A fresh key from the system's random source (an error if there is none: a predictable
    /// key would let any pod prove to be this one).
    pub fn generate() -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no random source for a channel key: {e}"))?;
        Ok(Self(hex::encode(bytes)))
    }

    /// Accepts 64 lowercase hex characters.
    pub fn parse(text: &str) -> Option<Self> {
        lowercase_hex(text, 64).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The bridge's proof for `hello` with `nonce`: HMAC-SHA256 over both.
    fn prove(&self, hello: &Hello, nonce: &str) -> Result<String, String> {
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.0.as_bytes()).map_err(|e| e.to_string())?;
        mac.update(
            format!(
                "contextos-capability/v1\n{}\n{}\n{}\n{nonce}",
                hello.namespace, hello.session, hello.server
            )
            .as_bytes(),
        );
        Ok(hex::encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

/// What the gateway says first on a connection: whose server, and a nonce to prove against.
#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    #[serde(flatten)]
    hello: Hello,
    nonce: String,
}

/// The bridge's answer to a [`Greeting`].
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proof: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Serves `command` to every connection on `listener` that greets with `expected`: each
/// connection gets its own server process, ended when the connection ends.
pub async fn serve(
    listener: TcpListener,
    expected: Hello,
    key: ChannelKey,
    command: Vec<String>,
) -> std::io::Result<()> {
    let context = Arc::new((expected, key, command));
    // Connections still to greet (probes, strangers) are bounded apart from greeted ones, so
    // they never end a server in use.
    let greeting = Arc::new(tokio::sync::Semaphore::new(MAX_GREETING));
    let open: Arc<std::sync::Mutex<VecDeque<tokio::task::AbortHandle>>> = Arc::default();
    loop {
        let (socket, peer) = listener.accept().await?;
        let Ok(permit) = greeting.clone().try_acquire_owned() else {
            continue;
        };
        let (context, open) = (context.clone(), open.clone());
        tokio::spawn(async move {
            let greeted = greet(socket, &context.0).await;
            drop(permit);
            let (read, write, nonce) = match greeted {
                Ok(greeted) => greeted,
                Err(why) => {
                    tracing::warn!(%peer, "capability: connection refused: {why}");
                    return;
                }
            };
            let context = context.clone();
            let served = tokio::spawn(async move {
                let (expected, key, command) = &*context;
                if let Err(why) = bridge(read, write, &nonce, expected, key, command).await {
                    tracing::warn!(%peer, "capability: connection ended: {why}");
                }
            });
            if let Ok(mut open) = open.lock() {
                open.retain(|task| !task.is_finished());
                if open.len() >= MAX_CONNECTIONS
                    && let Some(oldest) = open.pop_front()
                {
                    // Ending the task drops its server process, which is killed with it.
                    tracing::warn!(%peer, "capability: {MAX_CONNECTIONS} connections open, ending the oldest");
                    oldest.abort();
                }
                open.push_back(served.abort_handle());
            }
        });
    }
}

/// The two halves of a greeted connection and the nonce to prove against.
type Greeted = (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
    String,
);

/// Reads the hello and checks it names this pod's Session and server.
async fn greet(socket: TcpStream, expected: &Hello) -> Result<Greeted, String> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut read))
        .await
        .map_err(|_| "no hello in time".to_owned())??;
    match serde_json::from_str::<Greeting>(&hello) {
        Ok(greeting) if greeting.hello == *expected && (1..=128).contains(&greeting.nonce.len()) => {
            Ok((read, write, greeting.nonce))
        }
        Ok(greeting) => {
            let why = format!(
                "this pod serves {} for Session {}/{}, not {} for {}/{} (or the nonce is not 1 to 128 bytes)",
                expected.server,
                expected.namespace,
                expected.session,
                greeting.hello.server,
                greeting.hello.namespace,
                greeting.hello.session
            );
            let answer = Answer {
                ok: false,
                proof: None,
                error: Some(why.clone()),
            };
            let _ = write_line(&mut write, &answer).await;
            Err(why)
        }
        Err(e) => Err(format!("not a hello: {e}")),
    }
}

/// One greeted connection: start the server, prove this pod, copy bytes both ways until
/// either side ends, then stop the server.
async fn bridge(
    mut read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    nonce: &str,
    expected: &Hello,
    key: &ChannelKey,
    command: &[String],
) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", SERVER_PATH)
        .env("HOME", "/tmp")
        .current_dir("/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // The server's own diagnostics go to this pod's log, never into the MCP stream.
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(format!("{program} has no stdio pipes"));
    };
    let answer = Answer {
        ok: true,
        proof: Some(key.prove(expected, nonce)?),
        error: None,
    };
    write_line(&mut write, &answer).await?;
    // The connection lives as long as the server's output. The gateway closing its side closes
    // the server's input, and the server then has a grace period to finish; dropping the child
    // kills it.
    let from_server = async {
        let _ = tokio::io::copy(&mut stdout, &mut write).await;
        let _ = write.shutdown().await;
    };
    tokio::pin!(from_server);
    tokio::select! {
        () = &mut from_server => return Ok(()),
        _ = tokio::io::copy(&mut read, &mut stdin) => {}
    }
    drop(stdin);
    let _ = tokio::time::timeout(INPUT_CLOSED_GRACE, from_server).await;
    drop(child);
    Ok(())
}

/// Connects to the bridge at `address`, greets it and checks its proof with `key` (the one in
/// the pod's spec); the stream is then the server's stdio. The returned reader may hold bytes
/// already read past the answer.
pub async fn dial(
    address: SocketAddr,
    hello: &Hello,
    key: &ChannelKey,
    timeout: Duration,
) -> Result<
    (
        BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    ),
    String,
> {
    let socket = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| format!("no connection to {address} within {timeout:?}"))?
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let greeting = Greeting {
        hello: hello.clone(),
        nonce: crate::run_context::random_hex(16),
    };
    write_line(&mut write, &greeting).await?;
    let answer = tokio::time::timeout(timeout, read_line(&mut read))
        .await
        .map_err(|_| format!("{address} did not answer the hello within {timeout:?}"))??;
    let answer: Answer =
        serde_json::from_str(&answer).map_err(|e| format!("{address} answered no hello: {e}"))?;
    if !answer.ok {
        return Err(format!("{address} refused: {}", answer.error.unwrap_or_default()));
    }
    let expected = key.prove(hello, &greeting.nonce)?;
    // Constant-time comparison is not needed: the nonce is fresh and the proof is not a secret.
    if answer.proof.as_deref() != Some(expected.as_str()) {
        return Err(format!(
            "{address} is not the capability pod the gateway looked up (its proof does not check); the pod may have been replaced"
        ));
    }
    Ok((read, write))
}

/// One line of at most [`HELLO_LIMIT`] bytes, without its newline.
async fn read_line<R: AsyncRead + Unpin>(read: &mut BufReader<R>) -> Result<String, String> {
    let mut line = String::new();
    (&mut *read)
        .take(HELLO_LIMIT)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the hello: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!("the hello is not a line of at most {HELLO_LIMIT} bytes"));
    }
    line.pop();
    Ok(line)
}

async fn write_line<W: tokio::io::AsyncWrite + Unpin, T: Serialize>(
    write: &mut W,
    value: &T,
) -> Result<(), String> {
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| format!("writing the hello: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(session: &str) -> Hello {
        Hello {
            namespace: "shop".into(),
            session: session.into(),
            server: ServerDigest::of(&["cat".into()]),
        }
    }

    fn key() -> ChannelKey {
        ChannelKey::parse(&"ab".repeat(32)).expect("key")
    }

    async fn bridge_on_loopback(command: &[&str]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let command = command.iter().map(|s| (*s).to_owned()).collect();
        tokio::spawn(serve(listener, hello("s1"), key(), command));
        address
    }

    #[test]
    fn digests_name_the_command_and_have_the_label_shape() {
        let a = ServerDigest::of(&["npx".into(), "server-a".into()]);
        let b = ServerDigest::of(&["npx server-a".into()]);
        assert_ne!(a, b, "arguments are not joined into one");
        assert_eq!(ServerDigest::parse(a.as_str()), Some(a.clone()));
        assert_eq!(ServerDigest::parse("../etc"), None);
        assert_eq!(pod_name("s1", &a), format!("s1-cap-{a}"));
    }

    #[tokio::test]
    async fn a_greeted_connection_reaches_a_fresh_server_with_a_clean_environment() {
        let address = bridge_on_loopback(&["/bin/sh", "-c", "env; cat"]).await;
        let (mut read, mut write) = dial(address, &hello("s1"), &key(), Duration::from_secs(5))
            .await
            .expect("greeted");
        write.write_all(b"echoed\n").await.expect("write");
        write.shutdown().await.expect("shutdown");
        let mut out = String::new();
        read.read_to_string(&mut out).await.expect("read");
        let names: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(out.ends_with("echoed\n"), "{out}");
        for name in &names {
            assert!(
                ["PATH", "HOME", "PWD", "SHLVL", "_"].contains(name),
                "the server saw {name} of the bridge's environment: {out}"
            );
        }
    }

    #[tokio::test]
    async fn a_hello_for_another_session_or_no_hello_is_refused_before_anything_starts() {
        let marker = tempfile::tempdir().expect("dir");
        let started = marker.path().join("started");
        let script = format!("touch {}; cat", started.display());
        let address = bridge_on_loopback(&["/bin/sh", "-c", &script]).await;
        let refused = dial(address, &hello("s2"), &key(), Duration::from_secs(5))
            .await
            .expect_err("another Session");
        assert!(refused.contains("not") && refused.contains("s2"), "{refused}");

        let mut socket = TcpStream::connect(address).await.expect("connect");
        socket.write_all(&vec![b'x'; 8192]).await.expect("write");
        let mut out = Vec::new();
        let _ = socket.read_to_end(&mut out).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!started.exists(), "a refused connection started the server");
    }

    #[tokio::test]
    async fn a_bridge_that_cannot_prove_the_pods_key_is_not_talked_to() {
        // Say another tenant's pod now has the address the gateway looked up: it answers the
        // hello, but not with this pod's key.
        let address = bridge_on_loopback(&["/bin/sh", "-c", "cat"]).await;
        let other = ChannelKey::parse(&"cd".repeat(32)).expect("key");
        let refused = dial(address, &hello("s1"), &other, Duration::from_secs(5))
            .await
            .expect_err("wrong key");
        assert!(refused.contains("proof"), "{refused}");
    }

    #[tokio::test]
    async fn probes_and_strangers_never_end_a_greeted_connection() {
        let address = bridge_on_loopback(&["/bin/sh", "-c", "cat"]).await;
        let mut connections = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            connections.push(
                dial(address, &hello("s1"), &key(), Duration::from_secs(5))
                    .await
                    .expect("greeted"),
            );
        }
        // Readiness probes: connect and hang up, many times.
        for _ in 0..3 * MAX_CONNECTIONS {
            drop(TcpStream::connect(address).await.expect("connect"));
        }
        let (oldest_read, oldest_write) = &mut connections[0];
        oldest_write.write_all(b"still served\n").await.expect("write");
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), oldest_read.read_line(&mut line))
            .await
            .expect("answered in time")
            .expect("read");
        assert_eq!(line, "still served\n");
    }

    #[tokio::test]
    async fn a_new_connection_ends_the_oldest_when_the_bridge_is_full() {
        let address = bridge_on_loopback(&["/bin/sh", "-c", "cat"]).await;
        let mut connections = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 1 {
            connections.push(
                dial(address, &hello("s1"), &key(), Duration::from_secs(5))
                    .await
                    .expect("greeted"),
            );
        }
        let (oldest, _) = &mut connections[0];
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), oldest.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the oldest connection was ended: {read:?}"
        );
        let (newest_read, newest_write) = connections.last_mut().expect("newest");
        newest_write.write_all(b"still here\n").await.expect("write");
        let mut line = String::new();
        newest_read.read_line(&mut line).await.expect("read");
        assert_eq!(line, "still here\n");
    }
}
