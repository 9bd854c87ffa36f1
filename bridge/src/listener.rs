//! Accepting connections without letting silent or surplus ones pile up.
//!
//! A connection is handed to the server only once its first bytes (the TLS client hello or the
//! HTTP/2 preface) arrive; one that stays silent for the handshake timeout is closed. Without
//! this, every socket opened and abandoned would hold its resources until the kernel gives up
//! on it, since HTTP/2 keepalive only starts after the preface. Past `limits.max_connections`
//! open connections, new ones are closed at once (and logged once a second at most).
//!
//! Both ports accept through [`incoming`]; what the HTTP port does next (TLS, timeouts on
//! request heads and idle connections) is the `http` module's business.

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
    io::{AsyncRead, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// Connections waiting for their first bytes; past this, accepting waits (the kernel's backlog
/// holds the rest).
const MAX_PENDING: usize = 4096;

/// A connection that holds one of the hub's connection slots until it closes, and one of its
/// connection thread's when it has one.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slots: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
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
                            let opened = tokio::time::timeout(timeout, first_byte(&stream)).await;
                            match opened {
                                Ok(true) => Some(Connection { stream, _slots: (slot, None) }),
                                Ok(false) => None,
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

/// Waits for the first byte (left unread); false when the peer left first.
async fn first_byte(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(n) if n > 0)
}

/// File descriptors a hub needs besides its connections' (state file, NATS, OTLP, the runtime).
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft limit on open files to the hard one; returns the limit now in force.
pub fn raise_descriptor_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= hard {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    Ok(hard)
}

/// A connection on its way to the thread that will own it: a socket is registered with one
/// runtime's reactor, so it leaves this one's and joins the other's.
#[derive(Debug)]
pub struct Handoff {
    stream: std::net::TcpStream,
    slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Handoff {
    /// The connection, registered with the runtime this is called on.
    pub fn into_connection(self) -> io::Result<Connection> {
        let (hub, thread) = self.slots;
        Ok(Connection {
            stream: TcpStream::from_std(self.stream)?,
            _slots: (hub, Some(thread)),
        })
    }
}

impl Connection {
    /// The connection on its way to a thread, taking up `thread_slot` there until it closes.
    pub fn into_handoff(self, thread_slot: OwnedSemaphorePermit) -> io::Result<Handoff> {
        Ok(Handoff {
            stream: self.stream.into_std()?,
            slots: (self._slots.0, thread_slot),
        })
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
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

/// `AsyncWrite` for a wrapper that watches only reads: every write goes to its `stream` field.
macro_rules! forward_writes {
    (impl[$($generics:tt)*] $wrapper:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.stream), cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(&mut self.stream), cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                tokio::io::AsyncWrite::is_write_vectored(&self.stream)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.stream), cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.stream), cx)
            }
        }
    };
}
pub(crate) use forward_writes;

forward_writes!(impl[] Connection);
