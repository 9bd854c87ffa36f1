//! Fan-out of events to subscribers.
//!
//! Each subscriber has a bounded queue. Publishing never waits: an event that does not fit is
//! counted as skipped, and the subscriber's next item carries the count so that its stream shows
//! a lag notice exactly where the gap is. An event is encoded once, on the first subscriber that
//! matches, and every other subscriber receives a clone of the same bytes. The subscriber list
//! is swapped atomically on (rare) subscribe/unsubscribe, so publishing takes no lock.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::SystemTime,
};

use arc_swap::ArcSwap;
use async_stream::stream;
use bridge_proto::{encoded::EncodedSubscribeResponse, pattern::Pattern, v1, view::EventView};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::{ClusterLink, Outbound},
    error::{Error, Result},
    hub::unix_nanos,
    latency::{FANOUT_BOUNDS_NS, LatencyHistogram, elapsed_ns},
};

/// Which events a subscriber wants; all given parts must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Any of these (empty: every event).
    pub patterns: Vec<Pattern>,
    /// Only these workers (empty: all).
    pub worker_ids: HashSet<String>,
    /// Only this pool.
    pub pool: Option<String>,
}

impl Filter {
    /// Whether an event from `worker_id` in `pool` with these name tokens passes.
    #[inline]
    pub fn matches_parts<'a>(
        &self,
        worker_id: &str,
        pool: &str,
        parts: impl Iterator<Item = &'a str> + Clone,
    ) -> bool {
        (self.worker_ids.is_empty() || self.worker_ids.contains(worker_id))
            && self.pool.as_deref().is_none_or(|p| p == pool)
            && (self.patterns.is_empty()
                || self
                    .patterns
                    .iter()
                    .any(|p| p.matches_tokens(parts.clone())))
    }

    #[inline]
    pub fn matches(&self, worker_id: &str, pool: &str, event: &EventView) -> bool {
        self.matches_parts(worker_id, pool, event.parts())
    }
}

impl TryFrom<v1::SubscribeRequest> for Filter {
    type Error = Error;
    fn try_from(request: v1::SubscribeRequest) -> Result<Self> {
        let patterns = request
            .patterns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::parse(p).map_err(|e| Error::invalid(format!("patterns[{i}]: {e}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patterns,
            worker_ids: request
                .worker_ids
                .into_iter()
                .filter(|id| !id.is_empty())
                .collect(),
            pool: Some(request.pool).filter(|p| !p.is_empty()),
        })
    }
}

/// One queued item: an encoded delivery, when the hub received its event, and how many events
/// were skipped just before it.
#[derive(Debug)]
pub struct Item {
    pub skipped_before: u64,
    pub received_ns: i64,
    pub response: EncodedSubscribeResponse,
}

/// One subscription's end of the fan-out: its filter and its queue.
#[derive(Debug)]
pub struct Subscriber {
    id: u64,
    filter: Filter,
    queue: mpsc::Sender<Item>,
    /// Skipped since the last item that made it into the queue.
    skipped: AtomicU64,
    delivered: AtomicU64,
    skipped_total: AtomicU64,
}

impl Subscriber {
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Completes when the subscription has gone.
    pub async fn closed(&self) {
        self.queue.closed().await;
    }

    /// Queues a delivery, or counts it as skipped when the queue is full.
    #[inline]
    pub fn offer(&self, response: &EncodedSubscribeResponse, received_ns: i64) {
        let skipped_before = match self.skipped.load(Relaxed) {
            0 => 0,
            _ => self.skipped.swap(0, Relaxed),
        };
        match self.queue.try_send(Item {
            skipped_before,
            received_ns,
            response: response.clone(),
        }) {
            Ok(()) => {
                self.delivered.fetch_add(1, Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.skipped.fetch_add(item.skipped_before + 1, Relaxed);
                self.skipped_total.fetch_add(1, Relaxed);
            }
            // The subscription is going away; its guard removes it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[derive(Debug)]
struct Shared {
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    edit: Mutex<()>,
    next_id: AtomicU64,
    queue_capacity: usize,
    /// Deliveries and skips of subscribers that have gone, so totals never go down.
    retired_delivered: AtomicU64,
    retired_skipped: AtomicU64,
    /// From the hub receiving an event to a subscriber's stream taking it from its queue.
    latency: LatencyHistogram,
    /// Set when the hub joins a cluster.
    cluster: OnceLock<Arc<ClusterLink>>,
}

/// The set of subscribers; a cheap-clone handle.
#[derive(Debug, Clone)]
pub struct Fanout {
    shared: Arc<Shared>,
}

/// A live subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub queue: mpsc::Receiver<Item>,
    subscriber: Arc<Subscriber>,
    fanout: Fanout,
}

impl Subscription {
    /// Takes the count of events skipped since the last queued item (for a lag notice when
    /// the queue has drained).
    pub fn take_skipped(&self) -> u64 {
        match self.subscriber.skipped.load(Relaxed) {
            0 => 0,
            _ => self.subscriber.skipped.swap(0, Relaxed),
        }
    }
}

/// What a subscription yields, in order.
#[derive(Debug)]
pub enum Tail {
    Event(EncodedSubscribeResponse),
    /// This many matching events were skipped here because the subscriber fell behind.
    Lagged(u64),
    /// The hub is shutting down; nothing follows.
    ShuttingDown,
}

impl Subscription {
    /// The subscription as a stream of deliveries, with a lag notice wherever events were
    /// skipped; it ends (after [`Tail::ShuttingDown`]) when `shutdown` is cancelled. Every
    /// transport (gRPC, server-sent events) serves this one stream, so lag is reported alike.
    pub fn into_tail(mut self, shutdown: CancellationToken) -> impl Stream<Item = Tail> + Send {
        stream! {
            loop {
                let item = match self.queue.try_recv() {
                    Ok(item) => item,
                    Err(_) => {
                        // Drained: report events skipped since the last queued one before
                        // waiting, so a lag is never hidden behind a quiet period.
                        let skipped = self.take_skipped();
                        if skipped > 0 {
                            yield Tail::Lagged(skipped);
                        }
                        tokio::select! {
                            item = self.queue.recv() => match item {
                                Some(item) => item,
                                None => break,
                            },
                            () = shutdown.cancelled() => {
                                yield Tail::ShuttingDown;
                                break;
                            }
                        }
                    }
                };
                if item.skipped_before > 0 {
                    yield Tail::Lagged(item.skipped_before);
                }
                let waited = elapsed_ns(item.received_ns, unix_nanos(SystemTime::now()));
                self.fanout.latency().record(self.subscriber.id, waited);
                yield Tail::Event(item.response);
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.fanout.remove(self.subscriber.id);
    }
}

/// What a publisher knows about where an event comes from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub worker_id: &'a str,
    pub pool: &'a str,
}

impl Fanout {
    pub fn new(queue_capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                subscribers: ArcSwap::from_pointee(Vec::new()),
                edit: Mutex::new(()),
                next_id: AtomicU64::new(1),
                queue_capacity,
                retired_delivered: AtomicU64::new(0),
                retired_skipped: AtomicU64::new(0),
                latency: LatencyHistogram::new(FANOUT_BOUNDS_NS),
                cluster: OnceLock::new(),
            }),
        }
    }

    pub fn subscribe(&self, filter: Filter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.shared.queue_capacity);
        let subscriber = Arc::new(Subscriber {
            id: self.shared.next_id.fetch_add(1, Relaxed),
            filter,
            queue: tx,
            skipped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            skipped_total: AtomicU64::new(0),
        });
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = Vec::clone(&self.shared.subscribers.load());
        list.push(subscriber.clone());
        self.shared.subscribers.store(Arc::new(list));
        if let Some(cluster) = self.shared.cluster.get() {
            cluster.mirror(subscriber.clone());
        }
        Subscription {
            queue: rx,
            subscriber,
            fanout: self.clone(),
        }
    }

    fn remove(&self, id: u64) {
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = Vec::clone(&self.shared.subscribers.load());
        if let Some(gone) = list.iter().find(|s| s.id == id) {
            let shared = &self.shared;
            shared
                .retired_delivered
                .fetch_add(gone.delivered.load(Relaxed), Relaxed);
            shared
                .retired_skipped
                .fetch_add(gone.skipped_total.load(Relaxed), Relaxed);
        }
        list.retain(|s| s.id != id);
        self.shared.subscribers.store(Arc::new(list));
    }

    /// Events queued for subscribers, and events subscribers skipped because they lagged,
    /// since the hub started.
    pub fn totals(&self) -> (u64, u64) {
        // Under the edit lock, so a subscriber leaving is never counted twice or not at all.
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.shared.subscribers.load();
        let delivered: u64 = live.iter().map(|s| s.delivered.load(Relaxed)).sum();
        let skipped: u64 = live.iter().map(|s| s.skipped_total.load(Relaxed)).sum();
        (
            delivered + self.shared.retired_delivered.load(Relaxed),
            skipped + self.shared.retired_skipped.load(Relaxed),
        )
    }

    /// From now on, publishes every event to the cluster too, and feeds each new subscription
    /// the events other hubs publish. Once only; later calls change nothing.
    pub fn join_cluster(&self, link: Arc<ClusterLink>) {
        let _ = self.shared.cluster.set(link);
    }

    pub fn cluster(&self) -> Option<&Arc<ClusterLink>> {
        self.shared.cluster.get()
    }

    /// Time from receipt to a subscriber's stream, over every delivery.
    pub fn latency(&self) -> &LatencyHistogram {
        &self.shared.latency
    }

    pub fn subscriber_count(&self) -> usize {
        self.shared.subscribers.load().len()
    }

    /// Offers an event to every matching subscriber; returns how many it was queued for or
    /// skipped by (matching subscribers).
    /// An event without a timestamp is stamped with `received_ns`.
    pub fn publish(
        &self,
        source: Source<'_>,
        event: &EventView,
        sampling_rate: f64,
        received_ns: i64,
    ) -> usize {
        let subscribers = self.shared.subscribers.load();
        let mut encoded: Option<EncodedSubscribeResponse> = None;
        let encode = || {
            EncodedSubscribeResponse::delivery_of_bytes(
                source.worker_id,
                source.pool,
                event.as_bytes(),
                (event.timestamp_ns == 0).then_some(received_ns),
                sampling_rate,
                received_ns,
            )
        };
        let mut matched = 0;
        for subscriber in subscribers.iter() {
            if !subscriber
                .filter
                .matches(source.worker_id, source.pool, event)
            {
                continue;
            }
            matched += 1;
            let response = encoded.get_or_insert_with(encode);
            subscriber.offer(response, received_ns);
        }
        if let Some(cluster) = self.shared.cluster.get() {
            cluster.offer(|| Outbound {
                subject: cluster.subject(source.pool, source.worker_id, event.parts()),
                response: encoded.unwrap_or_else(encode),
            });
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn event(name: &str) -> EventView {
        EventView::from_event(&v1::TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn decode(item: &Item) -> v1::subscribe_response::Item {
        v1::SubscribeResponse::decode(item.response.as_bytes().clone())
            .unwrap()
            .item
            .unwrap()
    }

    const SRC: Source<'static> = Source {
        worker_id: "gpu-3",
        pool: "llama",
    };

    #[test]
    fn delivers_to_matching_subscribers_only() {
        let fanout = Fanout::new(16);
        let mut inference = fanout.subscribe(Filter {
            patterns: vec![Pattern::parse("inference.>").unwrap()],
            ..Default::default()
        });
        let mut other_pool = fanout.subscribe(Filter {
            pool: Some("mistral".into()),
            ..Default::default()
        });
        assert_eq!(fanout.publish(SRC, &event("inference.stop"), 0.5, 1), 1);
        assert_eq!(fanout.publish(SRC, &event("gpu.util"), 1.0, 2), 0);
        let item = inference.queue.try_recv().unwrap();
        match decode(&item) {
            v1::subscribe_response::Item::Event(d) => {
                assert_eq!((d.worker_id.as_str(), d.pool.as_str()), ("gpu-3", "llama"));
                assert_eq!(d.sampling_rate, 0.5);
                assert_eq!(d.event.unwrap().event_parts, ["inference", "stop"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(inference.queue.try_recv().is_err());
        assert!(other_pool.queue.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_counts_skips_and_reports_them_on_the_next_item() {
        let fanout = Fanout::new(2);
        let mut slow = fanout.subscribe(Filter::default());
        for _ in 0..5 {
            fanout.publish(SRC, &event("a"), 1.0, 0);
        }
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 0);
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 0);
        fanout.publish(SRC, &event("a"), 1.0, 0);
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 3);
        assert_eq!(slow.take_skipped(), 0);
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let fanout = Fanout::new(2);
        let sub = fanout.subscribe(Filter::default());
        assert_eq!(fanout.subscriber_count(), 1);
        drop(sub);
        assert_eq!(fanout.subscriber_count(), 0);
    }
}
