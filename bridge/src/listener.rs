//! Accepting connections without letting silent or surplus ones pile up.
//!
//! A connection is handed to the server only once its first bytes (the TLS client hello or the
//! HTTP/2 preface) arrive; one that stays silent for the handshake timeout is closed. Without
//! this, every socket opened and abandoned would hold its resources until the kernel gives up
//! on it, since HTTP/2 keepalive only starts after the preface. Past `limits.max_connections`
//! open connections, new ones are closed at once (and logged once a second at most).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_stream::stream;
use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// Connections waiting for their first bytes; past this, accepting waits (the kernel's backlog
/// holds the rest).
const MAX_PENDING: usize = 4096;

/// A connection that holds one of the hub's connection slots until it closes.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// Connections from `listener` that started talking within `timeout`, at most
/// `max_connections` open at once, with TCP_NODELAY set.
pub fn incoming(
    listener: TcpListener,
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
                            let mut first = [0u8; 1];
                            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                                Ok(Ok(n)) if n > 0 => Some(Connection { stream, _slot: slot }),
                                Ok(_) => None,
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
            connections: Box::pin(incoming(listener, timeout, max_connections)),
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
