//! The live subscriptions, an output: events fanned out to subscribers by their filters.
//!
//! Each subscriber has a bounded queue. Publishing never waits: an event that does not fit is
//! counted as skipped, and the subscriber's next item carries the count so that its stream shows
//! a lag notice exactly where the gap is. An event is encoded once, on the first subscriber that
//! matches, and every other subscriber receives a clone of the same bytes. The subscriber list
//! is swapped atomically on (rare) subscribe/unsubscribe, so publishing takes no lock.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    hash::{BuildHasher, Hasher},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use bridge_proto::{
    condition::Condition, encoded::EncodedSubscribeResponse, labels::LabelSet, pattern::Pattern,
    trace::TraceId, v1,
};
use foldhash::fast::FixedState;
use smallvec::SmallVec;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Delivery, Output};
use crate::{
    error::{Error, Result},
    latency::{FANOUT_BOUNDS_NS, LatencyHistogram, elapsed_ns, unix_nanos},
};

/// The longest a subscription may ask the hub to hold its events (`linger_ms`).
pub const MAX_LINGER: Duration = Duration::from_secs(1);

/// The subscription's latency budget from its request: `None` for none (`linger_ms` 0).
pub fn linger_of(request: &v1::SubscribeRequest) -> Result<Option<Duration>> {
    let linger = Duration::from_millis(u64::from(request.linger_ms));
    if linger > MAX_LINGER {
        return Err(Error::invalid(format!(
            "linger_ms: must be at most {}, not {}",
            MAX_LINGER.as_millis(),
            request.linger_ms
        )));
    }
    Ok(Some(linger).filter(|l| !l.is_zero()))
}

/// Which events a subscriber wants; all given parts must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Any of these (empty: every event).
    pub patterns: Vec<Pattern>,
    /// Only these workers (empty: all).
    pub worker_ids: HashSet<String>,
    /// Only this pool.
    pub pool: Option<String>,
    /// Only events of this trace.
    pub trace_id: Option<TraceId>,
    /// Only events whose metadata meets all of these.
    pub metadata: Vec<Condition>,
    /// Only events from workers whose labels include these.
    pub worker_labels: Option<LabelSet>,
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
    pub fn matches(&self, delivery: &Delivery<'_>) -> bool {
        self.trace_id
            .is_none_or(|id| id.as_bytes()[..] == *delivery.trace_id())
            && self.matches_parts(delivery.worker_id, delivery.pool, delivery.parts())
            && self.worker_labels.as_ref().is_none_or(|set| {
                delivery
                    .worker_labels
                    .is_some_and(|labels| set.matched_by(labels))
            })
            && (self.metadata.is_empty() || self.meets_metadata(delivery))
    }

    /// Each condition reads its key where it lies (a walk over the entries): subscriptions
    /// carry one or two, and only events that passed every cheaper test get this far.
    fn meets_metadata(&self, delivery: &Delivery<'_>) -> bool {
        self.metadata
            .iter()
            .all(|condition| condition.holds(delivery.metadata(&condition.key)))
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
        let trace_id = match request.trace_id.as_slice() {
            [] => None,
            id => Some(
                TraceId::from_bytes(id).map_err(|e| Error::invalid(format!("trace_id: {e}")))?,
            ),
        };
        let metadata = Condition::from_request(&request.metadata_conditions)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let worker_labels = match request.worker_labels.len() {
            0 => None,
            _ => Some(
                LabelSet::new(request.worker_labels.into_iter().collect())
                    .map_err(|e| Error::invalid(format!("worker_labels: {e}")))?,
            ),
        };
        Ok(Self {
            worker_labels,
            trace_id,
            metadata,
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

/// Names a subscription among this hub's, for as long as the hub runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriberId(u64);

/// One subscription's end of the fan-out: its filter and its queue.
#[derive(Debug)]
struct Subscriber {
    id: SubscriberId,
    filter: Filter,
    queue: mpsc::Sender<Item>,
    /// Skipped since the last item that made it into the queue.
    skipped: AtomicU64,
    delivered: AtomicU64,
    skipped_total: AtomicU64,
}

impl Subscriber {
    /// Queues a delivery, or counts it as skipped when the queue is full.
    #[inline]
    fn offer(&self, response: &EncodedSubscribeResponse, received_ns: i64) {
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

/// The subscribers as publishing walks them, rebuilt on every subscribe and unsubscribe.
#[derive(Debug, Default)]
struct Audience {
    /// Every subscriber, in id order.
    all: Vec<Arc<Subscriber>>,
    /// Subscribers whose every pattern names one event exactly, by [`name_hash`] of each name
    /// (as indexes into `all`, each at most once per hash): an event looks up its own name
    /// instead of every such subscriber trying its patterns. Their whole filter is still
    /// checked, so a hash shared by two names costs a check, never a wrong delivery.
    by_name: HashMap<u64, SmallVec<[u32; 2]>, FixedState>,
    /// The others (no pattern, or one with a wildcard), as indexes into `all`.
    rest: Vec<u32>,
}

/// The seed of [`name_hash`]: any constant, the same for the index and the lookups.
const NAME_HASH_SEED: u64 = 0x6272_6964_6765;

/// A hash of an event name's tokens.
fn name_hash<'a>(parts: impl Iterator<Item = &'a str>) -> u64 {
    let mut hasher = FixedState::with_seed(NAME_HASH_SEED).build_hasher();
    for part in parts {
        hasher.write(part.as_bytes());
        // Never part of a UTF-8 string: `a.bc` and `ab.c` hash apart.
        hasher.write_u8(0xff);
    }
    hasher.finish()
}

impl Audience {
    fn new(all: Vec<Arc<Subscriber>>) -> Self {
        let mut by_name: HashMap<u64, SmallVec<[u32; 2]>, FixedState> = HashMap::default();
        let mut rest = Vec::new();
        for (index, subscriber) in (0u32..).zip(&all) {
            let patterns = &subscriber.filter.patterns;
            let names: Option<Vec<u64>> = (!patterns.is_empty())
                .then(|| {
                    patterns
                        .iter()
                        .map(|p| p.exact_name().map(name_hash))
                        .collect()
                })
                .flatten();
            match names {
                Some(mut hashes) => {
                    hashes.sort_unstable();
                    hashes.dedup();
                    for hash in hashes {
                        by_name.entry(hash).or_default().push(index);
                    }
                }
                None => rest.push(index),
            }
        }
        Self { all, by_name, rest }
    }

    /// The subscribers that may want an event with these name tokens: every one whose filter
    /// matches it is among them, exactly once.
    #[inline]
    fn candidates<'a>(&self, parts: impl Iterator<Item = &'a str>) -> Candidates<'_> {
        let named: &[u32] = if self.by_name.is_empty() {
            &[]
        } else {
            self.by_name.get(&name_hash(parts)).map_or(&[], |n| n)
        };
        Candidates {
            all: &self.all,
            indexes: self.rest.iter().chain(named),
        }
    }
}

/// See [`Audience::candidates`].
struct Candidates<'a> {
    all: &'a [Arc<Subscriber>],
    indexes: std::iter::Chain<std::slice::Iter<'a, u32>, std::slice::Iter<'a, u32>>,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Subscriber;

    #[inline]
    fn next(&mut self) -> Option<&'a Subscriber> {
        self.indexes.next().map(|index| &*self.all[*index as usize])
    }
}

#[derive(Debug)]
struct Shared {
    subscribers: ArcSwap<Audience>,
    edit: Mutex<()>,
    next_id: AtomicU64,
    queue_capacity: usize,
    /// Deliveries and skips of subscribers that have gone, so totals never go down.
    retired_delivered: AtomicU64,
    retired_skipped: AtomicU64,
    /// From the hub receiving an event to a subscriber's stream taking it from its queue.
    latency: LatencyHistogram,
}

/// The set of subscribers; a cheap-clone handle.
#[derive(Debug, Clone)]
pub struct Subscribers {
    shared: Arc<Shared>,
}

/// A live subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub queue: mpsc::Receiver<Item>,
    subscriber: Arc<Subscriber>,
    subscribers: Subscribers,
}

impl Subscription {
    pub fn id(&self) -> SubscriberId {
        self.subscriber.id
    }

    pub fn filter(&self) -> &Filter {
        &self.subscriber.filter
    }

    /// Completes when the subscription has gone (its stream dropped).
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let queue = self.subscriber.queue.clone();
        async move { queue.closed().await }
    }

    /// Takes the count of events skipped since the last queued item (for a lag notice when
    /// the queue has drained).
    pub fn take_skipped(&self) -> u64 {
        match self.subscriber.skipped.load(Relaxed) {
            0 => 0,
            _ => self.subscriber.skipped.swap(0, Relaxed),
        }
    }
}

/// What a subscription's feed yields, in order.
#[derive(Debug)]
pub enum FeedItem {
    Event(EncodedSubscribeResponse),
    /// This many matching events were skipped here because the subscriber fell behind.
    Lagged(u64),
    /// The hub is shutting down; nothing follows.
    ShuttingDown,
}

/// Items a feed takes from its queue at a time, with one clock read and one update of the
/// latency histogram for them all. Small: a subscription that has been busy keeps room for
/// this many.
const TAKE: usize = 64;

impl Subscription {
    /// The subscription as a stream of deliveries, with a lag notice wherever events were
    /// skipped; it ends (after [`FeedItem::ShuttingDown`]) when `shutdown` is cancelled. Every
    /// transport (gRPC, server-sent events) serves this one stream, so lag is reported alike.
    /// With a `linger` (see [`linger_of`]) the feed holds events after each send, so that the
    /// transport writes them together; it must then be made on a tokio runtime with a timer.
    pub fn into_feed(self, shutdown: CancellationToken, linger: Option<Duration>) -> Feed {
        let quarter = (self.subscribers.shared.queue_capacity / 4).max(1);
        Feed {
            subscription: self,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            taken: Vec::new(),
            after_notice: None,
            ended: false,
            linger: linger.map(|asked| Box::new(Linger::new(asked, quarter))),
        }
    }
}

/// tokio's timer resolution: a shorter hold would last this long anyway, so the feed does not
/// hold at all rather than for less.
const MIN_HOLD: Duration = Duration::from_millis(1);

/// A feed's hold between sends, for a subscription that asked for one.
///
/// After the feed has sent (yielded events, then found its queue empty) it waits out the hold
/// before taking again, so what arrives meanwhile leaves in one write; if nothing has arrived
/// by then, the next event goes at once. While waiting nothing wakes the feed but its timer
/// (and shutdown). The hold shortens in proportion while one would gather more than a quarter of
/// the queue (below [`MIN_HOLD`] the feed does not hold at all), so that a subscription that
/// asked for a long one at a high rate does not lag for it, and doubles back towards what was
/// asked while holds gather less than an eighth.
#[derive(Debug)]
struct Linger {
    asked: Duration,
    hold: Duration,
    /// A quarter of the subscription's queue.
    quarter: usize,
    /// Set while holding.
    timer: Pin<Box<Sleep>>,
    holding: bool,
    /// Events yielded since the last hold ended.
    sent: usize,
}

impl Linger {
    fn new(asked: Duration, quarter: usize) -> Self {
        Self {
            asked,
            hold: asked,
            quarter,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            holding: false,
            sent: 0,
        }
    }

    /// The queue has drained after `sent` events went out: hold, if any went.
    fn drained(&mut self) {
        if self.sent == 0 {
            return;
        }
        if self.sent > self.quarter {
            self.hold = self.hold.mul_f64(self.quarter as f64 / self.sent as f64);
            if self.hold < MIN_HOLD {
                self.hold = Duration::ZERO;
            }
        } else if self.sent < self.quarter / 2 && self.hold < self.asked {
            self.hold = (self.hold * 2).clamp(MIN_HOLD, self.asked);
        }
        self.sent = 0;
        if !self.hold.is_zero() {
            self.holding = true;
            self.timer.as_mut().reset(Instant::now() + self.hold);
        }
    }

    /// Whether the feed is still holding (and will be woken when it is not).
    fn holds(&mut self, cx: &mut Context<'_>) -> bool {
        if self.holding && self.timer.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.holding = false;
        false
    }
}

/// A subscription's deliveries as a stream: see [`Subscription::into_feed`].
///
/// Takes what its queue holds in one go (up to [`TAKE`]), which hands the queue's capacity back
/// once per take rather than once per event and reads the clock once for the lot; the
/// transport then writes as many as it can take in one write.
#[derive(Debug)]
pub struct Feed {
    subscription: Subscription,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Taken from the queue and not yet yielded, the next one last.
    taken: Vec<Item>,
    /// An event whose lag notice was yielded just before it.
    after_notice: Option<EncodedSubscribeResponse>,
    ended: bool,
    linger: Option<Box<Linger>>,
}

impl Feed {
    /// Records the wait of every item just taken, and puts them in yielding order.
    fn took(&mut self) {
        let now = unix_nanos(SystemTime::now());
        let subscription = &self.subscription;
        subscription.subscribers.latency().record_each(
            subscription.subscriber.id.0,
            self.taken
                .iter()
                .map(|item| elapsed_ns(item.received_ns, now)),
        );
        self.taken.reverse();
    }
}

impl Stream for Feed {
    type Item = FeedItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FeedItem>> {
        let this = self.get_mut();
        if let Some(response) = this.after_notice.take() {
            return Poll::Ready(Some(FeedItem::Event(response)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if this.taken.is_empty() {
            if let Some(linger) = this.linger.as_mut()
                && linger.holds(cx)
            {
                if this.shutdown.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                linger.holding = false;
            }
            match this
                .subscription
                .queue
                .poll_recv_many(cx, &mut this.taken, TAKE)
            {
                Poll::Ready(0) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(_) => this.took(),
                Poll::Pending => {
                    if let Some(linger) = this.linger.as_mut() {
                        linger.drained();
                    }
                    // Drained: report events skipped since the last queued one before
                    // waiting, so a lag is never hidden behind a quiet period.
                    let skipped = this.subscription.take_skipped();
                    if skipped > 0 {
                        return Poll::Ready(Some(FeedItem::Lagged(skipped)));
                    }
                    if this.shutdown.as_mut().poll(cx).is_ready() {
                        this.ended = true;
                        return Poll::Ready(Some(FeedItem::ShuttingDown));
                    }
                    return Poll::Pending;
                }
            }
        }
        let Some(item) = this.taken.pop() else {
            return Poll::Pending;
        };
        if let Some(linger) = this.linger.as_mut() {
            linger.sent += 1;
        }
        if item.skipped_before > 0 {
            this.after_notice = Some(item.response);
            return Poll::Ready(Some(FeedItem::Lagged(item.skipped_before)));
        }
        Poll::Ready(Some(FeedItem::Event(item.response)))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.remove(self.subscriber.id);
    }
}

impl Subscribers {
    pub fn new(queue_capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                subscribers: ArcSwap::from_pointee(Audience::default()),
                edit: Mutex::new(()),
                next_id: AtomicU64::new(1),
                queue_capacity,
                retired_delivered: AtomicU64::new(0),
                retired_skipped: AtomicU64::new(0),
                latency: LatencyHistogram::new(FANOUT_BOUNDS_NS),
            }),
        }
    }

    pub fn subscribe(&self, filter: Filter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.shared.queue_capacity);
        let subscriber = Arc::new(Subscriber {
            id: SubscriberId(self.shared.next_id.fetch_add(1, Relaxed)),
            filter,
            queue: tx,
            skipped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            skipped_total: AtomicU64::new(0),
        });
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.shared.subscribers.load().all.clone();
        // In id order (ids are taken before the lock).
        let at = list.partition_point(|s| s.id < subscriber.id);
        list.insert(at, subscriber.clone());
        self.shared.subscribers.store(Arc::new(Audience::new(list)));
        Subscription {
            queue: rx,
            subscriber,
            subscribers: self.clone(),
        }
    }

    fn remove(&self, id: SubscriberId) {
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.shared.subscribers.load().all.clone();
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
        self.shared.subscribers.store(Arc::new(Audience::new(list)));
    }

    /// Events queued for subscribers, and events subscribers skipped because they lagged,
    /// since the hub started.
    pub fn totals(&self) -> (u64, u64) {
        // Under the edit lock, so a subscriber leaving is never counted twice or not at all.
        let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
        let live = &self.shared.subscribers.load().all;
        let delivered: u64 = live.iter().map(|s| s.delivered.load(Relaxed)).sum();
        let skipped: u64 = live.iter().map(|s| s.skipped_total.load(Relaxed)).sum();
        (
            delivered + self.shared.retired_delivered.load(Relaxed),
            skipped + self.shared.retired_skipped.load(Relaxed),
        )
    }

    /// Time from receipt to a subscriber's stream, over every delivery.
    pub fn latency(&self) -> &LatencyHistogram {
        &self.shared.latency
    }

    pub fn subscriber_count(&self) -> usize {
        self.shared.subscribers.load().all.len()
    }
}

impl Output for Subscribers {
    /// Queues the event for every subscriber whose filter it matches, wherever it comes from
    /// (another hub's events reach this hub once).
    #[inline]
    fn offer(&self, delivery: &Delivery<'_>) {
        let audience = self.shared.subscribers.load();
        for subscriber in audience.candidates(delivery.parts()) {
            if subscriber.filter.matches(delivery) {
                subscriber.offer(delivery.encoded(), delivery.received_ns);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bridge_proto::view::{EventView, RelayedDelivery};

    use super::*;
    use futures_util::FutureExt;
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

    /// Offers `name` from gpu-3 in pool llama; how many subscribers it was queued for or
    /// skipped by.
    fn publish(subscribers: &Subscribers, name: &str, rate: f64, received_ns: i64) -> usize {
        let view = event(name);
        let delivery = Delivery::local("gpu-3", "llama", &view, rate, received_ns);
        let matching = subscribers
            .shared
            .subscribers
            .load()
            .all
            .iter()
            .filter(|s| s.filter.matches(&delivery))
            .count();
        subscribers.offer(&delivery);
        matching
    }

    #[test]
    fn metadata_conditions_hold_alike_on_received_and_relayed_events() {
        let view = EventView::from_event(&v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            metadata: [
                ("model".to_owned(), "llama-70b".to_owned()),
                ("result".to_owned(), "error".to_owned()),
            ]
            .into(),
            ..Default::default()
        })
        .unwrap();
        let received = Delivery::local("gpu-3", "llama", &view, 1.0, 1);
        let encoded = received.encoded().clone();
        let checked = RelayedDelivery::check(encoded.as_bytes()).unwrap();
        let relayed = Delivery::from_other_hub(&checked);
        let filter = |conditions: &[&str]| Filter {
            metadata: conditions
                .iter()
                .map(|c| Condition::parse(c).unwrap())
                .collect(),
            ..Default::default()
        };
        for (conditions, expected) in [
            (&["model=llama-70b"][..], true),
            (&["model=llama-70b", "result!=success"], true),
            (&["model=llama-70b", "result=success"], false),
            (&["model!=llama-70b"], false),
            (&["tier!=l2"], true),
            (&["tier=l2"], false),
        ] {
            let filter = filter(conditions);
            assert_eq!(filter.matches(&received), expected, "{conditions:?}");
            assert_eq!(filter.matches(&relayed), expected, "{conditions:?} relayed");
        }
    }

    #[test]
    fn delivers_to_matching_subscribers_only() {
        let subscribers = Subscribers::new(16);
        let mut inference = subscribers.subscribe(Filter {
            patterns: vec![Pattern::parse("inference.>").unwrap()],
            ..Default::default()
        });
        let mut other_pool = subscribers.subscribe(Filter {
            pool: Some("mistral".into()),
            ..Default::default()
        });
        assert_eq!(publish(&subscribers, "inference.stop", 0.5, 1), 1);
        assert_eq!(publish(&subscribers, "gpu.util", 1.0, 2), 0);
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
        let subscribers = Subscribers::new(2);
        let mut slow = subscribers.subscribe(Filter::default());
        for _ in 0..5 {
            publish(&subscribers, "a", 1.0, 0);
        }
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 0);
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 0);
        publish(&subscribers, "a", 1.0, 0);
        assert_eq!(slow.queue.try_recv().unwrap().skipped_before, 3);
        assert_eq!(slow.take_skipped(), 0);
    }

    /// An event from another hub reaches each subscription whose filter matches it once,
    /// however many there are, as the bytes the other hub's subscribers received.
    #[test]
    fn an_event_from_another_hub_reaches_each_matching_subscription_once() {
        let subscribers = Subscribers::new(16);
        let pattern = |p: &str| Filter {
            patterns: vec![Pattern::parse(p).unwrap()],
            ..Default::default()
        };
        let mut queues = [
            subscribers.subscribe(pattern("inference.>")),
            subscribers.subscribe(pattern("gpu.>")),
            subscribers.subscribe(pattern("inference.>")),
            subscribers.subscribe(Filter::default()),
        ];
        let view = event("inference.stop");
        let encoded = Delivery::local("gpu-9", "llama", &view, 1.0, 7)
            .encoded()
            .clone();
        let checked = RelayedDelivery::check(encoded.as_bytes()).unwrap();
        subscribers.offer(&Delivery::from_other_hub(&checked));
        let received: Vec<usize> = queues
            .iter_mut()
            .map(|q| {
                std::iter::from_fn(|| q.queue.try_recv().ok())
                    .inspect(|item| assert_eq!(item.response, encoded))
                    .count()
            })
            .collect();
        assert_eq!(received, [1, 0, 1, 1]);
    }

    /// What a feed yields now, without waiting: events as their names, lag notices as counts.
    fn ready(feed: &mut Feed) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(Some(item)) = futures_util::StreamExt::next(feed).now_or_never() {
            seen.push(match item {
                FeedItem::Event(response) => {
                    match v1::SubscribeResponse::decode(response.as_bytes().clone())
                        .unwrap()
                        .item
                        .unwrap()
                    {
                        v1::subscribe_response::Item::Event(d) => {
                            d.event.unwrap().event_parts[0].clone()
                        }
                        other => panic!("{other:?}"),
                    }
                }
                FeedItem::Lagged(n) => format!("lagged {n}"),
                FeedItem::ShuttingDown => "shutting down".to_owned(),
            });
        }
        seen
    }

    #[test]
    fn a_feed_yields_what_its_queue_took_in_order_with_lag_notices_where_the_gaps_are() {
        let subscribers = Subscribers::new(2);
        let shutdown = CancellationToken::new();
        let mut feed = subscribers
            .subscribe(Filter::default())
            .into_feed(shutdown.clone(), None);
        for name in ["a", "b", "c", "d"] {
            publish(&subscribers, name, 1.0, 0);
        }
        // The queue held two; the two skipped are reported once it has drained.
        assert_eq!(ready(&mut feed), ["a", "b", "lagged 2"]);
        for name in ["e", "f", "g", "h"] {
            publish(&subscribers, name, 1.0, 0);
        }
        assert_eq!(ready(&mut feed), ["e", "f", "lagged 2"]);
        for name in ["i", "j", "k"] {
            publish(&subscribers, name, 1.0, 0);
        }
        // Taking `i` takes `j` from the queue too, which makes room for `l`: the skip of `k`
        // travels with `l`, just before it.
        assert!(
            futures_util::StreamExt::next(&mut feed)
                .now_or_never()
                .is_some()
        );
        publish(&subscribers, "l", 1.0, 0);
        assert_eq!(ready(&mut feed), ["j", "lagged 1", "l"]);
        assert_eq!(subscribers.latency().snapshot().count, 7);
        shutdown.cancel();
        assert_eq!(ready(&mut feed), ["shutting down"]);
        assert!(matches!(
            futures_util::StreamExt::next(&mut feed).now_or_never(),
            Some(None)
        ));
    }

    /// `linger_ms`: the first event after a quiet spell goes at once; what arrives after a
    /// send waits out the hold and goes together; a hold that gathers nothing ends the waiting.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_feed_holds_events_after_a_send_and_none_after_a_quiet_spell() {
        let subscribers = Subscribers::new(64);
        let hold = Duration::from_millis(10);
        let mut feed = subscribers
            .subscribe(Filter::default())
            .into_feed(CancellationToken::new(), Some(hold));
        publish(&subscribers, "a", 1.0, 0);
        assert_eq!(ready(&mut feed), ["a"]);
        publish(&subscribers, "b", 1.0, 0);
        publish(&subscribers, "c", 1.0, 0);
        assert!(ready(&mut feed).is_empty());
        tokio::time::advance(Duration::from_millis(9)).await;
        assert!(ready(&mut feed).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ready(&mut feed), ["b", "c"]);
        // A hold passes with nothing gathered: the next event is not held.
        tokio::time::advance(hold).await;
        assert!(ready(&mut feed).is_empty());
        publish(&subscribers, "d", 1.0, 0);
        assert_eq!(ready(&mut feed), ["d"]);
    }

    /// A hold that gathers more than a quarter of the queue is shortened in proportion, so a
    /// long linger at a high rate does not fill the queue; it grows back when the rate falls.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_feed_shortens_its_hold_while_holds_gather_over_a_quarter_queue() {
        let subscribers = Subscribers::new(16);
        let mut feed = subscribers
            .subscribe(Filter::default())
            .into_feed(CancellationToken::new(), Some(Duration::from_millis(40)));
        publish(&subscribers, "a", 1.0, 0);
        assert_eq!(ready(&mut feed), ["a"]);
        let burst = ["b", "c", "d", "e", "f", "g", "h", "i"];
        for name in burst {
            publish(&subscribers, name, 1.0, 0);
        }
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(ready(&mut feed), burst);
        // Eight gathered, the quarter is four: the next hold is half as long.
        publish(&subscribers, "j", 1.0, 0);
        tokio::time::advance(Duration::from_millis(19)).await;
        assert!(ready(&mut feed).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ready(&mut feed), ["j"]);
        // One gathered: back to the whole linger.
        publish(&subscribers, "k", 1.0, 0);
        tokio::time::advance(Duration::from_millis(39)).await;
        assert!(ready(&mut feed).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ready(&mut feed), ["k"]);
    }

    /// Shutting down does not wait out a hold: what was held goes, then the notice.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_feed_sends_what_it_holds_when_the_hub_shuts_down() {
        let subscribers = Subscribers::new(64);
        let shutdown = CancellationToken::new();
        let mut feed = subscribers
            .subscribe(Filter::default())
            .into_feed(shutdown.clone(), Some(Duration::from_secs(1)));
        publish(&subscribers, "a", 1.0, 0);
        assert_eq!(ready(&mut feed), ["a"]);
        publish(&subscribers, "b", 1.0, 0);
        assert!(ready(&mut feed).is_empty());
        shutdown.cancel();
        assert_eq!(ready(&mut feed), ["b", "shutting down"]);
    }

    #[test]
    fn a_linger_over_a_second_is_refused_naming_the_field() {
        let asking = |linger_ms| v1::SubscribeRequest {
            linger_ms,
            ..Default::default()
        };
        assert_eq!(linger_of(&asking(0)).unwrap(), None);
        assert_eq!(
            linger_of(&asking(1000)).unwrap(),
            Some(Duration::from_secs(1))
        );
        let refused = linger_of(&asking(1001)).unwrap_err().to_string();
        assert!(refused.contains("linger_ms"), "{refused}");
    }

    /// Subscribers that name their events exactly are found by the name, the others by their
    /// patterns; each matching one gets an event once, whatever its patterns repeat.
    #[test]
    fn every_matching_subscriber_gets_an_event_once_whether_named_or_patterned() {
        let subscribers = Subscribers::new(64);
        let with = |patterns: &[&str], pool: Option<&str>| {
            subscribers.subscribe(Filter {
                patterns: patterns
                    .iter()
                    .map(|p| Pattern::parse(p).unwrap())
                    .collect(),
                pool: pool.map(String::from),
                ..Default::default()
            })
        };
        let mut subscriptions = [
            with(&["inference.stop"], None),
            with(&["inference.stop", "inference.stop", "gpu.util"], None),
            with(&["inference.stop"], Some("mistral")),
            with(&["inference.*"], None),
            with(&[], None),
            with(&["inference.start", "inference.stop.late"], None),
            with(&["inference"], None),
        ];
        for name in [
            "inference.stop",
            "gpu.util",
            "inference.start",
            "infer.ence",
        ] {
            publish(&subscribers, name, 1.0, 0);
        }
        let received: Vec<Vec<String>> = subscriptions
            .iter_mut()
            .map(|s| {
                std::iter::from_fn(|| s.queue.try_recv().ok())
                    .map(|item| match decode(&item) {
                        v1::subscribe_response::Item::Event(d) => {
                            d.event.unwrap().event_parts.join(".")
                        }
                        other => panic!("{other:?}"),
                    })
                    .collect()
            })
            .collect();
        let expected: [&[&str]; 7] = [
            &["inference.stop"],
            &["inference.stop", "gpu.util"],
            &[],
            &["inference.stop", "inference.start"],
            &[
                "inference.stop",
                "gpu.util",
                "inference.start",
                "infer.ence",
            ],
            &["inference.start"],
            &[],
        ];
        assert_eq!(received, expected);
        // Unsubscribing rebuilds the index.
        let [first, second, ..] = subscriptions;
        drop(first);
        assert_eq!(publish(&subscribers, "inference.stop", 1.0, 0), 3);
        assert_eq!(second.queue.len(), 1);
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let subscribers = Subscribers::new(2);
        let sub = subscribers.subscribe(Filter::default());
        assert_eq!(subscribers.subscriber_count(), 1);
        drop(sub);
        assert_eq!(subscribers.subscriber_count(), 0);
    }
}
