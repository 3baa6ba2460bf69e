//! The HTTP client of one MCP session, whose requests end when the session does.
//!
//! rmcp's streamable-HTTP transport sends MCP's greeting, and each message, from a task of its
//! own that does not watch for the session being dropped while a request waits for its answer:
//! a server that takes a request and never answers would hold that request, its task and its
//! connection for ever — one more every time a call gives up on it. Every request made through
//! an [`Ending`] client ends (as a closed transport) once its session's [`Session`] guard is
//! dropped: when the call that was connecting gives up, or the session is forgotten and its
//! last call is done. Only the session's closing request (its DELETE, sent as it ends) outlives
//! the guard, for [`CLOSING`] at most.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use futures::stream::BoxStream;
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::{
    model::ClientJsonRpcMessage,
    transport::streamable_http_client::{
        SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
        StreamableHttpResponseLimits,
    },
};
use sse_stream::Sse;
use tokio::sync::watch;

/// Held for as long as a session's requests may go on; dropping it ends them.
pub struct Session(#[allow(dead_code)] watch::Sender<()>);

/// reqwest's client, its requests ending with their [`Session`].
#[derive(Clone)]
pub struct Ending {
    http: reqwest::Client,
    ended: watch::Receiver<()>,
}

/// A client for one session, and the guard that ends its requests.
pub fn client(http: reqwest::Client) -> (Ending, Session) {
    let (guard, ended) = watch::channel(());
    (Ending { http, ended }, Session(guard))
}

type Failed = StreamableHttpError<reqwest::Error>;

/// How long a session's closing request may take.
const CLOSING: Duration = Duration::from_secs(5);

impl Ending {
    /// `request`, unless the session ends first.
    fn until_ended<T: Send>(
        &self,
        request: impl Future<Output = Result<T, Failed>> + Send,
    ) -> impl Future<Output = Result<T, Failed>> + Send {
        let mut ended = self.ended.clone();
        async move {
            tokio::select! {
                answered = request => answered,
                // Nothing is ever sent: this resolves only when the guard is dropped.
                _ = ended.changed() => Err(StreamableHttpError::TransportChannelClosed),
            }
        }
    }
}

impl StreamableHttpClient for Ending {
    type Error = reqwest::Error;

    fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> impl Future<Output = Result<StreamableHttpPostResponse, Failed>> + Send + '_ {
        self.until_ended(
            self.http
                .post_message(uri, message, session_id, auth_header, custom_headers),
        )
    }

    fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> impl Future<Output = Result<StreamableHttpPostResponse, Failed>> + Send + '_ {
        self.until_ended(self.http.post_message_with_max_sse_event_size(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            max_sse_event_size,
        ))
    }

    fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> impl Future<Output = Result<StreamableHttpPostResponse, Failed>> + Send + '_ {
        self.until_ended(self.http.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            limits,
        ))
    }

    fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> impl Future<Output = Result<(), Failed>> + Send + '_ {
        // Sent as the session ends (its guard may be gone already): a server that never
        // answers keeps it for a few seconds, not for ever.
        let closing = self
            .http
            .delete_session(uri, session_id, auth_header, custom_headers);
        async move {
            tokio::time::timeout(CLOSING, closing)
                .await
                .unwrap_or(Err(StreamableHttpError::TransportChannelClosed))
        }
    }

    fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<Sse, SseError>>, Failed>> + Send + '_ {
        self.until_ended(
            self.http
                .get_stream(uri, session_id, last_event_id, auth_header, custom_headers),
        )
    }

    fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<Sse, SseError>>, Failed>> + Send + '_ {
        self.until_ended(self.http.get_stream_with_max_sse_event_size(
            uri,
            session_id,
            last_event_id,
            auth_header,
            custom_headers,
            max_sse_event_size,
        ))
    }
}
