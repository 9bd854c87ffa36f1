//! Connection threads (`hub.connection_threads`): threads that each own a share of the gRPC
//! port's connections for their whole life, each on a one-thread runtime of its own.
//!
//! On the shared multi-thread runtime, a worker's events and the subscriber they go to are
//! served by whichever thread is free, so at a steady load most deliveries wake another thread
//! (a futex or eventfd write, and a context switch on each side) and the subscriber writes
//! whatever little has queued by then. On a thread that owns both connections, the subscriber's
//! task runs after the worker's has handed over everything it read, and writes it at once.
//! Connections are handed to the thread with the fewest open; nothing moves after that.

use std::{io, sync::Arc};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::{Stream, wrappers::UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tracing::{info, warn};

use crate::listener::{Connection, Handoff};

/// The connections each thread has open: where the next goes, and what `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct ThreadLoad(Arc<[Arc<Semaphore>]>);

impl ThreadLoad {
    pub fn new(threads: usize) -> Self {
        Self(
            (0..threads)
                .map(|_| Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)))
                .collect(),
        )
    }

    /// Open connections per thread; empty on the shared runtime.
    pub fn open(&self) -> Vec<usize> {
        self.0.iter().map(|slots| open(slots)).collect()
    }
}

/// Connections open on the thread whose slots these are.
fn open(slots: &Semaphore) -> usize {
    Semaphore::MAX_PERMITS - slots.available_permits()
}

/// One connection thread, as the accepting side sees it.
struct Owner {
    handoffs: mpsc::UnboundedSender<Handoff>,
    /// A permit per open connection, held by the connection: the fewer open, the more left.
    slots: Arc<Semaphore>,
    stopped: oneshot::Receiver<()>,
}

/// Serves the connections of `incoming` on a thread for each of `load`'s, each with a router
/// from `router`, until `stop` is cancelled and their connections have closed, or until
/// `abandon` is cancelled (connections still open are then dropped).
pub async fn serve(
    load: &ThreadLoad,
    router: impl Fn() -> anyhow::Result<Router>,
    incoming: impl Stream<Item = io::Result<Connection>>,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> anyhow::Result<()> {
    let count = load.0.len();
    let mut owners = Vec::with_capacity(count);
    for (index, slots) in load.0.iter().enumerate() {
        let started = router().and_then(|router| {
            Ok(start(
                index,
                router,
                slots.clone(),
                stop.clone(),
                abandon.clone(),
            )?)
        });
        match started {
            Ok(owner) => owners.push(owner),
            Err(error) => {
                // The threads already started would otherwise serve nothing, forever.
                abandon.cancel();
                return Err(error);
            }
        }
    }
    info!(
        threads = count,
        "connections are served on threads of their own"
    );
    let accepting = async {
        tokio::pin!(incoming);
        while let Some(accepted) = incoming.next().await {
            let Ok(connection) = accepted else { continue };
            // A thread that stopped early (it cannot, short of a bug) gets nothing more.
            let Some(owner) = owners
                .iter()
                .filter(|owner| !owner.handoffs.is_closed())
                .min_by_key(|owner| open(&owner.slots))
            else {
                warn!("every connection thread has stopped; closing a new connection");
                continue;
            };
            let Ok(slot) = owner.slots.clone().try_acquire_owned() else {
                continue;
            };
            match connection.into_handoff(slot) {
                // Fails only if the thread has just stopped: the connection closes with it.
                Ok(handoff) => drop(owner.handoffs.send(handoff)),
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
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> io::Result<Owner> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (handoffs, received) = mpsc::unbounded_channel::<Handoff>();
    let (stopped_tx, stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("bridge-conn-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                // Each registered with this thread's runtime as it arrives.
                let incoming = UnboundedReceiverStream::new(received).map(Handoff::into_connection);
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
        slots,
        stopped,
    })
}
