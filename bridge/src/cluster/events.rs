//! Events across hubs.
//!
//! Each hub's publisher, one of its outputs, queues its own events (its workers' and its
//! own lifecycle events) and sends what it finds waiting as one NATS message, a batch
//! (`bridge_proto::batch`: each event as the delivery its own subscribers got, which carries
//! the time the hub received it, with its worker's labels), to `<prefix>.batch.<node>`. After
//! each batch it gathers events for the link's linger (`cluster.linger_ms`) before it sends
//! the next, so a busy hub wakes NATS and the other hubs once per linger rather than once per
//! read, while a quiet hub sends each event at once.
//!
//! A hub takes the batches of every other hub from `<prefix>.batch.*` while it has at least
//! one subscription of its own (with none, NATS sends it nothing), checks each event (input
//! from the network) and hands it to its outputs once, as [`Origin::OtherHub`]: subscribers'
//! filters match it as they match local events (labels included), so each subscription gets
//! each event once, same queues, same lag notices. Matching happens here rather than in NATS
//! because a message per event, which subject matching needs, cost more than the events
//! (BENCHMARKS.md, "Issue 19: batched cluster crossing").
//!
//! The connection is made with `no_echo`, so NATS never sends a hub its own messages: its own
//! subscribers got them directly. Publishing never waits: when NATS is slow or away the backlog
//! is bounded and what does not fit is counted, while local delivery goes on.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use bridge_proto::{
    batch::{Batch, BatchWriter, Labels},
    encoded::EncodedSubscribeResponse,
    pattern::plain_token_byte,
    view::RelayedDelivery,
};
use futures_util::StreamExt;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ClusterLink, token};
use crate::outputs::{Delivery, Origin, Output};

/// Events waiting for the NATS connection; beyond this they are dropped and counted.
pub(super) const BACKLOG: usize = 65_536;
/// Events the publisher takes from the backlog at a time; a batch also ends at
/// `bridge_proto::batch::MAX_BATCH_BYTES`.
const TAKE: usize = 1024;

/// One event on its way to NATS.
#[derive(Debug)]
pub struct Outbound {
    response: EncodedSubscribeResponse,
    labels: Option<Labels>,
}

/// What crossed between this hub and the others, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events sent to the other hubs, and the NATS messages (batches) they went in.
    pub published_events: AtomicU64,
    pub published_batches: AtomicU64,
    /// Events not sent: the backlog was full (NATS slow or away too long), or NATS refused
    /// the batch.
    pub dropped_events: AtomicU64,
    /// Well-formed events received from other hubs (each once, however many of this hub's
    /// subscriptions take it), and the batches they came in.
    pub received_events: AtomicU64,
    pub received_batches: AtomicU64,
    /// Messages on the batch subject refused whole (not a well-formed batch), and events of
    /// well-formed batches refused alone (not a well-formed event delivery).
    pub malformed_batches: AtomicU64,
    pub malformed_events: AtomicU64,
}

impl ClusterLink {
    /// The output that publishes this hub's events to the cluster.
    pub fn publisher(self: &Arc<Self>) -> Arc<dyn Output> {
        Arc::new(Publisher { link: self.clone() })
    }

    /// Makes this hub receive the other hubs' events until `closed` completes (a local
    /// subscription is open until then). The events go to every output; subscriptions pick
    /// theirs by their filters.
    pub fn receive_while(&self, closed: impl Future<Output = ()> + Send + 'static) {
        self.listeners.send_modify(|open| *open += 1);
        let listeners = self.listeners.clone();
        tokio::spawn(async move {
            closed.await;
            listeners.send_modify(|open| *open -= 1);
        });
    }

    /// The subject this hub publishes its batches on.
    fn batch_subject(&self) -> String {
        self.scoped(&format!("batch.{}", subject_token(&self.node)))
    }

    /// Checks a batch from another hub and hands its events to the outputs.
    fn take_batch(&self, message: &async_nats::Message) {
        let counters = &self.counters;
        let batch = match Batch::read(&message.payload) {
            Ok(batch) => batch,
            Err(error) => {
                counters.malformed_batches.fetch_add(1, Relaxed);
                debug!(subject = %message.subject, %error, "cluster: skipping a message that is not a batch of event deliveries");
                return;
            }
        };
        counters.received_batches.fetch_add(1, Relaxed);
        let (mut received, mut malformed) = (0, 0);
        for event in batch.events() {
            let relayed = match RelayedDelivery::check(event.delivery) {
                Ok(relayed) => relayed,
                Err(problem) => {
                    malformed += 1;
                    debug!(subject = %message.subject, problem, "cluster: skipping an event that is not an event delivery");
                    continue;
                }
            };
            received += 1;
            let delivery = Delivery::from_other_hub(&relayed);
            let delivery = match event.labels {
                Some(labels) => delivery.with_worker_labels(labels),
                None => delivery,
            };
            self.outputs.publish(&delivery);
        }
        counters.received_events.fetch_add(received, Relaxed);
        if malformed > 0 {
            counters.malformed_events.fetch_add(malformed, Relaxed);
        }
    }
}

/// This hub's events on their way to NATS: an output.
#[derive(Debug)]
struct Publisher {
    link: Arc<ClusterLink>,
}

impl Output for Publisher {
    /// Queues the hub's own events for the publisher task; never waits. The delivery is only
    /// encoded when the backlog has room, so an overloaded or cut-off hub does not encode what
    /// it would drop.
    fn offer(&self, delivery: &Delivery<'_>) {
        if delivery.origin != Origin::Local {
            return;
        }
        let link = &self.link;
        match link.outbound.try_reserve() {
            Ok(slot) => slot.send(Outbound {
                response: delivery.encoded().clone(),
                labels: delivery.worker_labels.cloned(),
            }),
            Err(_) => {
                link.counters.dropped_events.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Sends the hub's queued events, a batch at a time.
///
/// Events that come within the link's linger of the last batch wait for the linger to pass
/// (or for their batch to fill), so that a busy hub sends a batch per linger rather than per
/// read; an event after a quiet spell goes at once.
pub(super) async fn publish(link: Arc<ClusterLink>, mut backlog: mpsc::Receiver<Outbound>) {
    let subject = async_nats::Subject::from(link.batch_subject());
    let mut waiting = Vec::with_capacity(TAKE);
    let mut batch = BatchWriter::new();
    let mut last_sent: Option<Instant> = None;
    while backlog.recv_many(&mut waiting, TAKE).await > 0 {
        add(&link, &subject, &mut batch, &mut waiting).await;
        if let Some(due) = last_sent.map(|sent| sent + link.linger) {
            let linger = tokio::time::sleep_until(due);
            tokio::pin!(linger);
            loop {
                tokio::select! {
                    biased;
                    () = &mut linger => break,
                    taken = backlog.recv_many(&mut waiting, TAKE) => {
                        if taken == 0 {
                            break;
                        }
                        add(&link, &subject, &mut batch, &mut waiting).await;
                    }
                }
            }
        }
        send(&link, &subject, &mut batch).await;
        last_sent = (!link.linger.is_zero()).then(Instant::now);
    }
}

/// Adds `waiting` to `batch`, sending the batch whenever it is full.
async fn add(
    link: &ClusterLink,
    subject: &async_nats::Subject,
    batch: &mut BatchWriter,
    waiting: &mut Vec<Outbound>,
) {
    for event in waiting.drain(..) {
        let bytes = event.response.as_bytes();
        if !batch.add(bytes, event.labels.as_ref()) {
            send(link, subject, batch).await;
            // An empty batch takes any event.
            batch.add(bytes, event.labels.as_ref());
        }
    }
}

async fn send(link: &ClusterLink, subject: &async_nats::Subject, batch: &mut BatchWriter) {
    let events = batch.events() as u64;
    let counters = &link.counters;
    match link.client.publish(subject.clone(), batch.take()).await {
        Ok(()) => {
            counters.published_events.fetch_add(events, Relaxed);
            counters.published_batches.fetch_add(1, Relaxed);
        }
        Err(error) => {
            counters.dropped_events.fetch_add(events, Relaxed);
            debug!(%error, events, "cluster: NATS refused a batch");
        }
    }
}

/// Takes the other hubs' batches while this hub has subscriptions of its own, until
/// `shutdown`. One task, so that two NATS subscriptions never overlap (an event would arrive
/// twice).
pub(super) async fn receive(link: Arc<ClusterLink>, shutdown: CancellationToken) {
    let subject = link.scoped("batch.*");
    let mut listeners = link.listeners.subscribe();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            opened = listeners.wait_for(|open| *open > 0) => if opened.is_err() { return },
        }
        let mut messages = match link.client.subscribe(subject.clone()).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(%subject, %error, "cluster: cannot subscribe; subscribers see this hub's events only until they have all gone");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    closed = listeners.wait_for(|open| *open == 0) => if closed.is_err() { return },
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                closed = listeners.wait_for(|open| *open == 0) => {
                    if closed.is_err() {
                        return;
                    }
                    break;
                }
                message = messages.next() => match message {
                    Some(message) => link.take_batch(&message),
                    None => break,
                },
            }
        }
        // Dropping the subscription unsubscribes.
    }
}

/// A name as one subject token: characters NATS gives a meaning to ('.', '*', '>',
/// whitespace), '~' and non-ASCII are written `~HH`; the empty string is `~`.
pub fn subject_token(text: &str) -> String {
    token::escape(text, b'~', plain_token_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_contain_subject_syntax() {
        for text in [
            "gpu-3",
            "",
            "a.b",
            "x*y>z",
            "tilde~",
            "two words",
            "ünï",
            "_",
        ] {
            let token = subject_token(text);
            assert!(!token.contains(['.', '*', '>', ' ']), "{token}");
            assert!(!token.is_empty());
            assert_eq!(
                token::unescape(&token, b'~').as_deref(),
                Some(text),
                "{token}"
            );
        }
        assert_eq!(subject_token("gpu-3"), "gpu-3");
        assert_eq!(subject_token("host:50051"), "host:50051");
    }
}
