//! Serving a router to callers who may be hostile. `axum::serve` gives hyper no timer, which
//! turns hyper's limit on how long a request's head may take off: a caller that opens
//! connections and sends nothing, or a byte now and then, would hold a socket and its buffers
//! for ever, and enough of them would leave the process no file descriptor for anyone else.
//! Here every request head — the first on a connection, or the next on a kept-alive one — must
//! arrive within [`Limits::head_timeout`]; an answer the caller does not read for
//! [`Limits::write_timeout`] ends its connection; a connection buffers at most
//! [`Limits::max_buffer`] of what it was sent; and a listener holds at most
//! [`Limits::max_connections`] connections, [`Limits::max_per_peer`] of them from one address
//! (past them, a new one is closed at once) — so one pod cannot take every connection, the
//! kubelet's probes among them.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tower::Service as _;

/// What a listener allows its callers.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a request's head may take to arrive, counted from when the server waits for
    /// it: an idle kept-alive connection is closed after as long.
    pub head_timeout: Duration,
    /// How long an answer may wait for the caller to read it.
    pub write_timeout: Duration,
    /// What a connection buffers of what it was sent (a request's head must fit in it).
    pub max_buffer: usize,
    /// Connections held at once.
    pub max_connections: usize,
    /// Connections held at once from one address.
    pub max_per_peer: usize,
    /// Whether connections from the loopback are held to [`Limits::max_connections`] only: in a
    /// cluster only the process's own pod connects from there, on a test node every pod does.
    pub loopback_unlimited: bool,
    /// How long a shutdown waits for the requests under way.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Longer than the gateway's own clients keep idle connections (20 s, `RemoteStore`)
            // and than a scraper's usual interval (15–60 s), so a kept-alive connection is
            // rarely closed just as a request is sent on it; a slow head holds a place this long
            // at most, within the limits on connections below.
            head_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            max_buffer: 64 << 10,
            max_connections: 8192,
            max_per_peer: 256,
            loopback_unlimited: true,
            // Within Kubernetes' 30 s grace before it kills the pod.
            drain: Duration::from_secs(25),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the requests under way
/// finish (for [`Limits::drain`] at most). Each request carries its connection's address
/// (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Mutex::new(HashMap::new()));
    let (closing, closed) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: whatever it is passes or not, but a loop
                    // that does nothing else must not spin on it.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Over a limit: closed at once, before a byte is read.
        let per_peer = match limits.loopback_unlimited && peer.ip().is_loopback() {
            true => limits.max_connections,
            false => limits.max_per_peer,
        };
        let Some(from_peer) = PeerConnection::open(&peers, peer.ip(), per_peer) else {
            drop(stream);
            continue;
        };
        let Ok(held) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                router.clone().call(request)
            });
            let stream = WriteDeadline::new(stream, limits.write_timeout);
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(limits.max_buffer)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closed.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop((held, from_peer));
        });
    }
    drop(listener);
    let _ = closing.send(());
    // Every connection gives its place back once its requests are answered.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.drain, connections.acquire_many(all)).await;
    Ok(())
}

/// One of a peer's connections, counted while it lives.
struct PeerConnection {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerConnection {
    /// Counts a connection from `peer`, unless it holds `max` already.
    fn open(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, peer: IpAddr, max: usize) -> Option<Self> {
        let mut counts = peers.lock().ok()?;
        let count = counts.entry(peer).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            peer,
        })
    }
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.peers.lock()
            && let Some(count) = counts.get_mut(&self.peer)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// A connection whose writes fail once one has waited [`Limits::write_timeout`] for the peer to
/// read: hyper has no write timeout, and a caller that sends requests without reading the
/// answers would hold its connection for ever once the socket's buffers are full.
struct WriteDeadline {
    stream: TcpStream,
    limit: Duration,
    /// Since when a write waits, as a timer.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, limit: Duration) -> Self {
        Self {
            stream,
            limit,
            waiting: None,
        }
    }

    /// `written` if it is ready; otherwise pending until the deadline, then timed out.
    fn within<T>(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.waiting = None;
            return written;
        }
        let limit = self.limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer did not read its answer in time",
        )))
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.within(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.within(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        self.within(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server under `limits`; its address. `/` answers the caller's address, `/large` 1 MiB.
    async fn started(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let router = Router::new()
            .route(
                "/",
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    peer.ip().to_string()
                }),
            )
            .route("/large", axum::routing::get(|| async { vec![b'x'; 1 << 20] }));
        tokio::spawn(serve(listener, router, limits, std::future::pending()));
        address
    }

    /// Asserts a new connection to `address` is served within about a second (a place given
    /// back is seen by the server a moment after the client lets go).
    async fn served_again(address: SocketAddr) {
        let mut answered = None;
        for _ in 0..50 {
            let mut next = tokio::net::TcpStream::connect(address).await.expect("connect");
            let _ = next
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            answered = until_closed(&mut next).await;
            if answered.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not served again: {answered:?}");
    }

    /// What the server sends on `stream` until it closes it, if it does within 5 s.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> Option<String> {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .ok()
            .map(|_| String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_head_in_time_is_closed_and_requests_know_their_caller() {
        let address = started(Limits {
            head_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        // Nothing sent: closed (hyper answers 408 or just closes).
        let mut silent = tokio::net::TcpStream::connect(address).await.expect("connect");
        assert!(
            until_closed(&mut silent).await.is_some(),
            "a silent connection stays open"
        );
        // Half a head, then nothing: closed too.
        let mut slow = tokio::net::TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert!(
            until_closed(&mut slow).await.is_some(),
            "a slow head keeps its connection"
        );
        // A whole request is answered, with its caller's address.
        let mut caller = tokio::net::TcpStream::connect(address).await.expect("connect");
        caller
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut caller).await.expect("answered and closed");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn past_the_connection_limit_a_new_connection_is_closed_at_once() {
        let address = started(Limits {
            head_timeout: Duration::from_secs(60),
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
        }
        // The two are open (the server waits for their heads): a third is closed unanswered.
        let mut third = tokio::net::TcpStream::connect(address).await.expect("connect");
        assert_eq!(until_closed(&mut third).await.as_deref(), Some(""));
        // Once one goes, a new connection is served.
        drop(held.pop());
        served_again(address).await;
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_connections() {
        let address = started(Limits {
            head_timeout: Duration::from_secs(60),
            max_per_peer: 2,
            loopback_unlimited: false,
            ..Limits::default()
        })
        .await;
        let held = [
            tokio::net::TcpStream::connect(address).await.expect("connect"),
            tokio::net::TcpStream::connect(address).await.expect("connect"),
        ];
        let mut third = tokio::net::TcpStream::connect(address).await.expect("connect");
        assert_eq!(
            until_closed(&mut third).await.as_deref(),
            Some(""),
            "past the address's share"
        );
        drop(held);
        served_again(address).await;
    }

    #[tokio::test]
    async fn a_caller_that_does_not_read_its_answers_loses_its_connection() {
        let address = started(Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        // Many answers of 1 MiB asked for and none read: the socket's buffers fill, the server's
        // write waits, and the connection is ended.
        let asked = b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
        let _ = stream.write_all(&asked).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Reading now: what was buffered, then the end (not 64 MiB of answers).
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "the connection was not ended"
        );
        assert!(answer.len() < 32 << 20, "{} bytes answered", answer.len());
    }
}
