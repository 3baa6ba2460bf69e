//! Serving a router to callers who may be hostile. `axum::serve` gives hyper no timer, which
//! turns hyper's limit on how long a request's head may take off: a caller that opens
//! connections and sends nothing, or a byte now and then, would hold a socket and its buffers
//! for ever, and enough of them would leave the process no file descriptor for anyone else.
//! Here every request head — the first on a connection, or the next on a kept-alive one — must
//! arrive within [`Limits::head_timeout`], and a listener holds at most
//! [`Limits::max_connections`] connections (past them, a new one is closed at once).

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tower::Service as _;

/// What a listener allows its callers.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a request's head may take to arrive, counted from when the server waits for
    /// it: an idle kept-alive connection is closed after as long.
    pub head_timeout: Duration,
    /// Connections held at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Longer than clients keep idle connections (`crate::http`: 20 s), so a client
            // rarely sends on one the server is closing.
            head_timeout: Duration::from_secs(30),
            max_connections: 8192,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the requests under way
/// finish. Each request carries its connection's address (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
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
        let Ok(held) = connections.clone().try_acquire_owned() else {
            // Over the limit: closed at once, before a byte is read.
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
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closed.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(held);
        });
    }
    drop(listener);
    let _ = closing.send(());
    // Every connection gives its place back once its requests are answered.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server of `router` under `limits`; its address.
    async fn started(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let router = Router::new().route(
            "/",
            axum::routing::get(
                |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() },
            ),
        );
        tokio::spawn(serve(listener, router, limits, std::future::pending()));
        address
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
            max_connections: 16,
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
        let mut answered = None;
        for _ in 0..50 {
            let mut next = tokio::net::TcpStream::connect(address).await.expect("connect");
            let _ = next
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            answered = until_closed(&mut next).await;
            if answered.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            answered.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")),
            "{answered:?}"
        );
    }
}
