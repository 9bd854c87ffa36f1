//! Accepting connections without letting silent ones pile up.
//!
//! A connection is handed to the server only once its first bytes (the TLS client hello or the
//! HTTP/2 preface) arrive; one that stays silent for the handshake timeout is closed. Without
//! this, every socket opened and abandoned would hold its resources until the kernel gives up
//! on it, since HTTP/2 keepalive only starts after the preface.

use std::{io, time::Duration};

use async_stream::stream;
use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tracing::{debug, warn};

/// Connections waiting for their first bytes; past this, accepting waits (the kernel's backlog
/// holds the rest).
const MAX_PENDING: usize = 4096;

/// Connections from `listener` that started talking within `timeout`, with TCP_NODELAY set.
pub fn incoming(
    listener: TcpListener,
    timeout: Duration,
) -> impl Stream<Item = io::Result<TcpStream>> {
    stream! {
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                accepted = listener.accept(), if pending.len() < MAX_PENDING => match accepted {
                    Ok((stream, peer)) => {
                        // Small writes must not wait for delayed acknowledgements (40 ms stalls).
                        let _ = stream.set_nodelay(true);
                        pending.push(async move {
                            let mut first = [0u8; 1];
                            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                                Ok(Ok(n)) if n > 0 => Some(stream),
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
                    if let Some(stream) = ready {
                        yield Ok(stream);
                    }
                }
            }
        }
    }
}
