//! Serving the HTTP port, one HTTP/1.1 connection at a time, so that no client can hold a
//! connection (and its file descriptor) without using it:
//!
//! - a connection must start talking within the handshake timeout ([`listener::incoming`]),
//!   and with `[tls]` finish its TLS handshake within it too;
//! - each request head must arrive whole within `limits.http_header_timeout_ms`, counted from
//!   its first byte (from the handshake for a connection's first request): a client that sends
//!   one header line a second is cut off;
//! - between requests, a keep-alive connection may stay silent for
//!   `limits.http_idle_timeout_ms`.
//!
//! While a response is being sent (a server-sent event stream for hours) neither applies.
//!
//! The first request line is read before the HTTP stack sees it, so that a target it would
//! refuse with an empty 400 (curl sends the `>` of `?pattern=inference.>` as it is), or an
//! overlong one, gets an answer in the API's error shape that says what is wrong.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes, HttpBody},
    extract::ConnectInfo,
    http::{Request, Response, StatusCode},
};
use futures_util::StreamExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
    sync::Notify,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

use super::{ApiError, PeerAddr};
use crate::{hub::Hub, listener};

/// Longest request line read ahead; a longer one is answered 414.
pub const MAX_REQUEST_LINE: usize = 16 * 1024;

/// The timeouts one connection is held to.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    header: Duration,
    idle: Duration,
}

/// Serves `router` for `hub` on `listener` until `shutdown` completes; then asks every open
/// connection to close once its current response is sent.
pub async fn serve(
    hub: Hub,
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = &hub.config().limits;
    let timeouts = Timeouts {
        handshake: limits.handshake_timeout(),
        header: Duration::from_millis(limits.http_header_timeout_ms),
        idle: Duration::from_millis(limits.http_idle_timeout_ms),
    };
    let tls = hub.tls().map(crate::tls::ServerTls::http);
    let mut connections = pin!(listener::incoming(
        listener,
        timeouts.handshake,
        limits.max_connections
    ));
    let mut shutdown = pin!(shutdown);
    let stop = CancellationToken::new();
    loop {
        let connection = tokio::select! {
            () = &mut shutdown => break,
            next = connections.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let Ok(peer) = connection.peer_addr() else {
            // Gone already; nothing to serve.
            continue;
        };
        let router = router.clone();
        let stop = stop.clone();
        match tls.clone() {
            None => {
                tokio::spawn(serve_connection(connection, peer, router, timeouts, stop));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tokio::time::timeout(timeouts.handshake, acceptor.accept(connection))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, timeouts, stop).await;
                        }
                        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "closing a connection whose TLS handshake stalled"),
                    }
                });
            }
        }
    }
    stop.cancel();
    Ok(())
}

/// Where a connection is between requests, and when it is closed if nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is arriving.
    Head,
    /// Requests are being answered: no deadline.
    Busy,
    /// Waiting for the next request.
    Idle,
}

async fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut deadline = Some(Instant::now() + timeouts.header);
    let read_ahead = tokio::time::timeout(timeouts.header, read_request_line(&mut stream)).await;
    let read_ahead = match read_ahead {
        Ok(Some(read_ahead)) => read_ahead,
        // Answered, or gone.
        Ok(None) => return,
        Err(_) => {
            debug!(%peer, timeout = ?timeouts.header, "closing a connection whose request head did not arrive in time");
            return;
        }
    };
    let activity = Arc::new(Activity::default());
    let io = Watched {
        stream,
        read_ahead: Bytes::from(read_ahead),
        activity: activity.clone(),
    };
    let requests = Requests {
        router,
        peer,
        activity: activity.clone(),
    };
    let mut connection = pin!(
        hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), requests)
    );
    let mut phase = Phase::Head;
    let mut stopping = false;
    loop {
        let until = deadline.unwrap_or_else(Instant::now);
        tokio::select! {
            _ = connection.as_mut() => return,
            () = activity.changed.notified() => {
                // A request started since the last look (and perhaps already answered).
                let answered = activity.started.swap(0, Relaxed) > 0;
                let next = if activity.in_flight.load(Relaxed) > 0 {
                    Phase::Busy
                } else if phase == Phase::Busy || answered {
                    // Bytes read while busy (a pipelined request) are already with the HTTP
                    // stack, which is about to call again if they make a request.
                    activity.read.store(false, Relaxed);
                    Phase::Idle
                } else if phase == Phase::Idle && activity.read.load(Relaxed) {
                    Phase::Head
                } else {
                    phase
                };
                if next != phase || answered {
                    deadline = match next {
                        Phase::Busy => None,
                        Phase::Idle => Some(Instant::now() + timeouts.idle),
                        Phase::Head => Some(Instant::now() + timeouts.header),
                    };
                    phase = next;
                }
            }
            () = tokio::time::sleep_until(until), if deadline.is_some() => {
                match phase {
                    Phase::Idle => debug!(%peer, timeout = ?timeouts.idle, "closing an idle keep-alive connection"),
                    _ => debug!(%peer, timeout = ?timeouts.header, "closing a connection whose request head did not arrive in time"),
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What the connection's requests and reads tell its timeouts.
#[derive(Debug, Default)]
struct Activity {
    /// Requests being answered (their responses not yet sent whole).
    in_flight: AtomicUsize,
    /// Requests started, so that one answered between two looks still counts.
    started: AtomicUsize,
    /// Bytes arrived since the connection went idle.
    read: AtomicBool,
    changed: Notify,
}

/// A request being answered; dropped with its response's body.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Activity {
    fn start(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        self.changed.notify_one();
        Busy(self.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        self.0.changed.notify_one();
    }
}

/// The router as the HTTP stack calls it, for one connection.
#[derive(Debug, Clone)]
struct Requests {
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Requests {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let busy = self.activity.start();
        request
            .extensions_mut()
            .insert(ConnectInfo(PeerAddr(self.peer)));
        let router = self.router.clone();
        Box::pin(async move {
            let response = router.oneshot(request).await?;
            Ok(response.map(|body| Body::new(Tracked { body, _busy: busy })))
        })
    }
}

/// A response body that marks its request answered when it is dropped (sent whole, or the
/// connection gone).
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's stream, with the bytes read ahead served first, and its reads reported.
struct Watched<S> {
    stream: S,
    read_ahead: Bytes,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.remaining());
            let chunk = self.read_ahead.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Only the first read after going idle wakes the connection's task.
            if !self.activity.read.swap(true, Relaxed) {
                self.activity.changed.notify_one();
            }
        }
        polled
    }
}

listener::forward_writes!(impl[S: AsyncWrite + Unpin] Watched<S>);

/// Reads the first request line (and whatever came with it); `None` when the peer left or was
/// answered here.
async fn read_request_line<S>(stream: &mut S) -> Option<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut read = Vec::with_capacity(1024);
    loop {
        let line = read.iter().position(|&b| b == b'\n');
        if line.unwrap_or(read.len()) > MAX_REQUEST_LINE {
            let error = ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!(
                    "the request line is longer than {MAX_REQUEST_LINE} bytes; send long pattern lists as several requests"
                ),
            );
            refuse(stream, &error).await;
            return None;
        }
        if line.is_some() {
            break;
        }
        read.reserve(1024);
        match stream.read_buf(&mut read).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
    if let Some(problem) = refused_target(&read) {
        refuse(stream, &ApiError::invalid(problem)).await;
        return None;
    }
    Some(read)
}

/// Answers `error` and closes the connection.
async fn refuse<S>(stream: &mut S, error: &ApiError)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let body = error.body();
    let reason = error.status.canonical_reason().unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        error.status.as_u16(),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    linger(stream).await;
}

/// Reads and discards what the peer still sends after the answer, until it closes or
/// `MAX_REQUEST_LINE` more bytes came (the caller's timeout bounds the wait): closing a socket
/// with unread bytes sends a reset, which can destroy the answer before the peer reads it.
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut discard = [0u8; 1024];
    let mut drained = 0;
    while drained < MAX_REQUEST_LINE {
        match stream.read(&mut discard).await {
            Ok(n) if n > 0 => drained += n,
            _ => return,
        }
    }
}

/// Why the HTTP stack would refuse the target of a request line starting `head`, for the
/// characters people type: `<`, `>` and `` ` `` in the path, `"`, `<` and `>` in the query
/// (the `http` crate follows the WHATWG URL standard there). Anything else it refuses keeps
/// its plain 400.
fn refused_target(head: &[u8]) -> Option<String> {
    let line = head.split(|&b| b == b'\n').next()?;
    let target = line.split(|&b| b == b' ').nth(1)?;
    let query_at = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    let (path, query) = target.split_at(query_at);
    let bad = path
        .iter()
        .find(|b| b"<>`".contains(b))
        .or_else(|| query.iter().find(|b| b"\"<>".contains(b)))?;
    Some(format!(
        "the request target holds `{}`, which a URL must percent-encode (as %{:02X}); curl sends it as typed unless the query is given as `curl -G URL --data-urlencode 'pattern=inference.>'`",
        char::from(*bad),
        bad
    ))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    #[test]
    fn targets_the_http_stack_refuses_are_explained() {
        let refused =
            refused_target(b"GET /api/events?pattern=inference.>&worker=gpu-3 HTTP/1.1\r\n")
                .expect("refused");
        assert!(
            refused.contains("`>`") && refused.contains("%3E"),
            "{refused}"
        );
        assert!(refused_target(b"GET /a<b HTTP/1.1\r\n").is_some());
        assert!(refused_target(b"GET /?q=\"x\" HTTP/1.1\r\n").is_some());
        for fine in [
            &b"GET /api/events?pattern=inference.%3E HTTP/1.1\r\n"[..],
            b"GET /api/events?pattern=inference.* HTTP/1.1\r\n",
            b"GET /a\"b HTTP/1.1\r\n",
            b"GET /metrics HTTP/1.1\r\nX-Odd: <>\r\n",
            b"GET /partial",
            b"",
        ] {
            assert_eq!(
                refused_target(fine),
                None,
                "{}",
                String::from_utf8_lossy(fine)
            );
        }
    }

    /// A client that sends its headers after the refused request line (or in several writes)
    /// still reads the whole 400: the hub does not close with its bytes unread.
    #[tokio::test]
    async fn a_refused_request_is_answered_whole_however_it_is_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move { read_request_line(&mut stream).await });
            }
        });
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /api/events?pattern=a.> HTTP/1.1\r\n")
                .await
                .unwrap();
            let mut status = [0u8; 12];
            stream.read_exact(&mut status).await.unwrap();
            assert_eq!(&status, b"HTTP/1.1 400");
            for header in ["Host: x\r\n", "Accept: */*\r\n", "\r\n"] {
                stream.write_all(header.as_bytes()).await.unwrap();
            }
            let mut rest = String::new();
            stream.read_to_string(&mut rest).await.unwrap();
            assert!(rest.ends_with("}}"), "{rest}");
        }
    }

    #[tokio::test]
    async fn a_request_line_read_ahead_reaches_the_server_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // In two pieces, the first without the end of the request line.
            stream.write_all(&request[..7]).await.unwrap();
            stream.flush().await.unwrap();
            tokio::task::yield_now().await;
            stream.write_all(&request[7..]).await.unwrap();
            stream
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let read_ahead = read_request_line(&mut stream)
            .await
            .expect("a request line");
        let _client = client.await.unwrap();
        let mut watched = Watched {
            stream,
            read_ahead: Bytes::from(read_ahead),
            activity: Arc::default(),
        };
        let mut got = vec![0u8; request.len()];
        watched.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
    }
}
