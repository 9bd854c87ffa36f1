//! Connection threads (`hub.connection_threads`): threads that each own a share of the gRPC
//! port's connections for their whole life, each on a one-thread runtime of its own.
//!
//! On the shared multi-thread runtime, a worker's events and the subscriber they go to are
//! served by whichever thread is free, so at a steady load most deliveries wake another thread
//! (a futex or eventfd write, and a context switch on each side) and the subscriber writes
//! whatever little has queued by then. On a thread that owns both connections, the subscriber's
//! task runs after the worker's has handed over everything it read, and writes it at once.
//! Connections are handed to the thread with the fewest open; nothing moves after that.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use futures_util::StreamExt;
use tokio::{
    io::{AsyncRead, ReadBuf},
    sync::{mpsc, oneshot},
};
use tokio_stream::{Stream, wrappers::UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, Router, TcpConnectInfo};
use tracing::{info, warn};

use crate::listener::{Connection, Handoff, forward_writes};

/// One connection thread, as the accepting side sees it.
struct Owner {
    handoffs: mpsc::UnboundedSender<Handoff>,
    open: Arc<AtomicUsize>,
    stopped: oneshot::Receiver<()>,
}

/// Serves the connections of `incoming` on `count` threads, each with a router from `router`,
/// until `stop` is cancelled and their connections have closed, or until `abandon` is
/// cancelled (connections still open are then dropped).
pub async fn serve(
    count: usize,
    router: impl Fn() -> anyhow::Result<Router>,
    incoming: impl Stream<Item = io::Result<Connection>>,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> anyhow::Result<()> {
    let mut owners = Vec::with_capacity(count);
    for index in 0..count {
        owners.push(start(index, router()?, stop.clone(), abandon.clone())?);
    }
    info!(
        threads = count,
        "connections are served on threads of their own"
    );
    let accepting = async {
        tokio::pin!(incoming);
        while let Some(accepted) = incoming.next().await {
            let Ok(connection) = accepted else { continue };
            let owner = owners
                .iter()
                .min_by_key(|owner| owner.open.load(Relaxed))
                .expect("at least one connection thread");
            match connection.into_handoff() {
                Ok(handoff) => {
                    owner.open.fetch_add(1, Relaxed);
                    // Fails only once the thread has stopped, and the connection closes with it.
                    let _ = owner.handoffs.send(handoff);
                }
                Err(error) => warn!(%error, "cannot hand a connection to its thread"),
            }
        }
    };
    tokio::select! {
        () = accepting => {}
        () = stop.cancelled() => {}
    }
    for owner in owners {
        drop(owner.handoffs);
        let _ = owner.stopped.await;
    }
    Ok(())
}

/// Starts connection thread `index`, serving `router` on what is handed to it.
fn start(
    index: usize,
    router: Router,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> io::Result<Owner> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (handoffs, received) = mpsc::unbounded_channel::<Handoff>();
    let open = Arc::new(AtomicUsize::new(0));
    let (stopped_tx, stopped) = oneshot::channel();
    let counted = open.clone();
    std::thread::Builder::new()
        .name(format!("bridge-conn-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                // Registered with this thread's runtime, which polls it from now on.
                let incoming = UnboundedReceiverStream::new(received).map(move |handoff| {
                    let open = Open(counted.clone());
                    handoff.into_connection().map(|connection| Owned {
                        stream: connection,
                        _open: open,
                    })
                });
                let served = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned());
                tokio::select! {
                    result = served => if let Err(error) = result {
                        warn!(thread = index, %error, "a connection thread stopped serving");
                    },
                    () = abandon.cancelled() => {}
                }
            });
            // Tasks still running on this runtime (streams of connections abandoned) end here.
            drop(runtime);
            let _ = stopped_tx.send(());
        })?;
    Ok(Owner {
        handoffs,
        open,
        stopped,
    })
}

/// Counts a connection among its thread's open ones until it closes.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A connection on the thread that owns it.
struct Owned {
    stream: Connection,
    _open: Open,
}

impl Connected for Owned {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Owned {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

forward_writes!(impl[] Owned);
