//! Accepting connections without letting silent or surplus ones pile up.
//!
//! A connection is handed to the server only once its first bytes (the TLS client hello or the
//! HTTP/2 preface) arrive; one that stays silent for the handshake timeout is closed. Without
//! this, every socket opened and abandoned would hold its resources until the kernel gives up
//! on it, since HTTP/2 keepalive only starts after the preface. Past `limits.max_connections`
//! open connections, new ones are closed at once (and logged once a second at most).
//!
//! On the HTTP port the first request line is read before the connection is handed over, so
//! that a target the HTTP stack would refuse with an empty 400 (curl sends the `>` of
//! `?pattern=inference.>` as it is) gets a 400 that says what is wrong.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_stream::stream;
use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// Connections waiting for their first bytes; past this, accepting waits (the kernel's backlog
/// holds the rest).
const MAX_PENDING: usize = 4096;

/// Past this, a request line is handed to the server unread (it will refuse it as too long).
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// A connection that holds one of the hub's connection slots until it closes.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// Bytes read before the connection was handed over, served before the stream's.
    read_ahead: Bytes,
    _slot: OwnedSemaphorePermit,
}

/// What a connection must send before it is handed to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Any byte: a TLS client hello or the HTTP/2 preface.
    AnyByte,
    /// An HTTP/1.1 request line (see the module's documentation).
    RequestLine,
}

/// Connections from `listener` that started talking within `timeout`, at most
/// `max_connections` open at once, with TCP_NODELAY set.
pub fn incoming(
    listener: TcpListener,
    opening: Opening,
    timeout: Duration,
    max_connections: usize,
) -> impl Stream<Item = io::Result<Connection>> {
    let slots = Arc::new(Semaphore::new(max_connections));
    stream! {
        let mut pending = FuturesUnordered::new();
        let mut last_refusal: Option<Instant> = None;
        loop {
            tokio::select! {
                accepted = listener.accept(), if pending.len() < MAX_PENDING => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            if last_refusal.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                                warn!(%peer, max_connections, "refusing connections: limits.max_connections reached");
                                last_refusal = Some(Instant::now());
                            }
                            continue;
                        };
                        // Small writes must not wait for delayed acknowledgements (40 ms stalls).
                        let _ = stream.set_nodelay(true);
                        pending.push(async move {
                            let opened = tokio::time::timeout(timeout, open(stream, opening)).await;
                            match opened {
                                Ok(Some((stream, read_ahead))) => Some(Connection {
                                    stream,
                                    read_ahead: Bytes::from(read_ahead),
                                    _slot: slot,
                                }),
                                Ok(None) => None,
                                Err(_) => {
                                    debug!(%peer, ?timeout, "closing a connection that sent nothing");
                                    None
                                }
                            }
                        });
                    }
                    Err(error) => {
                        // Out of file descriptors or similar: retrying at once would spin.
                        warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(ready) = pending.next(), if !pending.is_empty() => {
                    if let Some(connection) = ready {
                        yield Ok(connection);
                    }
                }
            }
        }
    }
}

/// Waits for what `opening` asks; `None` when the peer left or was answered here.
async fn open(mut stream: TcpStream, opening: Opening) -> Option<(TcpStream, Vec<u8>)> {
    match opening {
        Opening::AnyByte => {
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                Ok(n) if n > 0 => Some((stream, Vec::new())),
                _ => None,
            }
        }
        Opening::RequestLine => {
            let mut read = Vec::with_capacity(1024);
            while !read.contains(&b'\n') && read.len() < MAX_REQUEST_LINE {
                read.reserve(1024);
                match stream.read_buf(&mut read).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
            if let Some(problem) = refused_target(&read) {
                let body = serde_json::json!({"error": {
                    "code": 400, "status": "INVALID_ARGUMENT", "message": problem,
                }})
                .to_string();
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
                linger(stream).await;
                return None;
            }
            Some((stream, read))
        }
    }
}

/// Reads and discards what the peer still sends after the answer, until it closes or
/// `MAX_REQUEST_LINE` more bytes came (the caller's timeout bounds the wait): closing a socket
/// with unread bytes sends a reset, which can destroy the answer before the peer reads it.
async fn linger(mut stream: TcpStream) {
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

impl Connection {
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }
}

/// [`incoming`] as a listener for the HTTP port (axum), so that it is held to the same limits
/// as the gRPC port.
pub struct HttpListener {
    connections: Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>>,
    local: std::net::SocketAddr,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl HttpListener {
    pub fn new(
        listener: TcpListener,
        timeout: Duration,
        max_connections: usize,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            connections: Box::pin(incoming(
                listener,
                Opening::RequestLine,
                timeout,
                max_connections,
            )),
            local,
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.next().await {
                Some(Ok(connection)) => match connection.peer_addr() {
                    Ok(peer) => return (connection, peer),
                    // Gone already; nothing to serve.
                    Err(_) => continue,
                },
                Some(Err(_)) => continue,
                // `incoming` never ends; if it did, there would be nothing left to accept.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.remaining());
            buf.put_slice(&self.read_ahead.split_to(n));
            if self.read_ahead.is_empty() {
                // Lets the read buffer go.
                self.read_ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
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

    #[tokio::test]
    async fn a_request_line_read_ahead_reaches_the_server_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connections = Box::pin(incoming(
            listener,
            Opening::RequestLine,
            Duration::from_secs(5),
            4,
        ));
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // In two pieces, the first without the end of the request line.
            stream.write_all(&request[..7]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.write_all(&request[7..]).await.unwrap();
            stream
        });
        let mut connection = connections.next().await.unwrap().unwrap();
        let _stream = client.await.unwrap();
        let mut got = vec![0u8; request.len()];
        connection.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
    }

    /// A client that sends its headers after the refused request line (or in several writes)
    /// still reads the whole 400: the hub does not close with its bytes unread.
    #[tokio::test]
    async fn a_refused_request_is_answered_whole_however_it_is_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = incoming(listener, Opening::RequestLine, Duration::from_secs(5), 4);
        tokio::spawn(async move {
            let mut connections = Box::pin(connections);
            while connections.next().await.is_some() {}
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
}
