//! Where events go once the hub has let them through: one hand-off point, [`Outputs`], and the
//! outputs behind it, which are peers.
//!
//! Every event a worker stream admits, every event the hub announces itself, and every event
//! another hub publishes enters through [`Outputs::publish`] as a [`Delivery`]. Each output owns
//! its queue, its drops and its metrics, and takes an event without waiting, so none can slow
//! ingest or another output. A delivery is encoded once, by the first output that needs the
//! bytes, and the others share them.
//!
//! - [`subscribers`]: live subscriptions (gRPC `Subscribe`, server-sent events): filters,
//!   bounded queues, lag notices.
//! - [`inference_metrics`]: per-model inference metrics from this hub's workers' events, read
//!   by `/metrics`. Not behind [`Outputs`]: it keeps figures per worker stream, so each stream
//!   records into its own share where it admits an event (`worker_stream`), and streams on
//!   different cores never write the same memory.
//! - The cluster publisher (`cluster::events`), added when the hub joins a cluster.

pub mod inference_metrics;
pub mod otlp;
pub mod subscribers;

use std::{cell::OnceCell, sync::Arc};

use arc_swap::ArcSwap;
use bridge_proto::{
    batch::Labels,
    encoded::EncodedSubscribeResponse,
    view::{self, Entry, EventView, RelayedDelivery},
};
use smallvec::SmallVec;

/// An output: takes each event or counts it as dropped, and never waits.
pub trait Output: Send + Sync + std::fmt::Debug {
    fn offer(&self, delivery: &Delivery<'_>);
}

/// Where a delivery comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A worker of this hub, or the hub itself.
    Local,
    /// Another hub (cluster mode): it reaches this hub once, and goes to the subscribers whose
    /// filters match it. Each hub passes on its own workers' events to every other output
    /// (the cluster, OTLP export), so those take local events only.
    OtherHub,
}

/// One event on its way to the outputs.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub worker_id: &'a str,
    pub pool: &'a str,
    /// The worker's labels, when it has any (other hubs send theirs along).
    pub worker_labels: Option<&'a Labels>,
    pub origin: Origin,
    /// When the (first) hub received the event, Unix nanoseconds.
    pub received_ns: i64,
    event: Event<'a>,
    encoded: OnceCell<EncodedSubscribeResponse>,
    /// The metadata of a received event, listed on first use.
    metadata: OnceCell<SmallVec<[(&'a str, &'a str); 8]>>,
}

#[derive(Debug)]
enum Event<'a> {
    /// As a worker sent it, kept at `sampling_rate`.
    Received {
        view: &'a EventView,
        sampling_rate: f64,
    },
    /// Encoded already, by the hub that received it, and checked by this one.
    Relayed(&'a RelayedDelivery<'a>),
}

impl<'a> Delivery<'a> {
    /// An event this hub received (or made), kept at `sampling_rate`.
    pub fn local(
        worker_id: &'a str,
        pool: &'a str,
        view: &'a EventView,
        sampling_rate: f64,
        received_ns: i64,
    ) -> Self {
        Self {
            worker_id,
            pool,
            worker_labels: None,
            origin: Origin::Local,
            received_ns,
            event: Event::Received {
                view,
                sampling_rate,
            },
            encoded: OnceCell::new(),
            metadata: OnceCell::new(),
        }
    }

    /// An event another hub passed on, as its subscribers received it.
    pub fn from_other_hub(delivery: &'a RelayedDelivery<'a>) -> Self {
        Self {
            worker_id: delivery.worker_id,
            pool: delivery.pool,
            worker_labels: None,
            origin: Origin::OtherHub,
            received_ns: delivery.received_ns,
            event: Event::Relayed(delivery),
            encoded: OnceCell::new(),
            metadata: OnceCell::new(),
        }
    }

    /// The same delivery, from a worker with these labels.
    pub fn with_worker_labels(self, labels: &'a Labels) -> Self {
        Self {
            worker_labels: (!labels.is_empty()).then_some(labels),
            ..self
        }
    }

    /// The event name's tokens.
    #[inline]
    pub fn parts(&self) -> impl Iterator<Item = &'a str> + Clone + use<'a> {
        match &self.event {
            Event::Received { view, .. } => Tokens::View(view.parts()),
            Event::Relayed(delivery) => Tokens::Listed(delivery.parts()),
        }
    }

    /// The event as this hub received it, and the rate it was kept at; `None` for an event
    /// another hub encoded.
    #[inline]
    pub fn received(&self) -> Option<(&'a EventView, f64)> {
        match self.event {
            Event::Received {
                view,
                sampling_rate,
            } => Some((view, sampling_rate)),
            Event::Relayed(_) => None,
        }
    }

    /// The event's trace id (empty: none).
    #[inline]
    pub fn trace_id(&self) -> &[u8] {
        match &self.event {
            Event::Received { view, .. } => view.trace_id(),
            Event::Relayed(delivery) => delivery.trace_id,
        }
    }

    /// The event's metadata `key`, read where it lies. The first call on an event this hub
    /// received lists its metadata in one walk, which every later call (the next condition, the
    /// next subscriber) reads instead of walking the event again.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        match &self.event {
            Event::Received { view, .. } => {
                let entries = self.metadata.get_or_init(|| {
                    view.entries()
                        .filter_map(|entry| match entry {
                            Entry::Metadata(key, value) => Some((key, value)),
                            Entry::Measurement(..) => None,
                        })
                        .collect()
                });
                // A repeated key counts as its last entry, as a decoder keeps it.
                entries
                    .iter()
                    .rev()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| *v)
            }
            Event::Relayed(delivery) => view::metadata_in(delivery.event, key),
        }
    }

    /// The delivery as subscribers receive it, encoded (or copied from the other hub's
    /// message) on first use. An event without a timestamp is stamped with the time the hub
    /// received it.
    #[inline]
    pub fn encoded(&self) -> &EncodedSubscribeResponse {
        match &self.event {
            Event::Relayed(delivery) => self
                .encoded
                .get_or_init(|| EncodedSubscribeResponse::relayed(delivery)),
            Event::Received {
                view,
                sampling_rate,
            } => self.encoded.get_or_init(|| {
                EncodedSubscribeResponse::delivery_of_bytes(
                    self.worker_id,
                    self.pool,
                    view.as_bytes(),
                    (view.timestamp_ns == 0).then_some(self.received_ns),
                    *sampling_rate,
                    self.received_ns,
                )
            }),
        }
    }
}

/// The tokens of a name held either way, as one iterator type.
#[derive(Clone)]
enum Tokens<V, D> {
    View(V),
    Listed(D),
}

impl<'a, V, D> Iterator for Tokens<V, D>
where
    V: Iterator<Item = &'a str>,
    D: Iterator<Item = &'a str>,
{
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        match self {
            Tokens::View(tokens) => tokens.next(),
            Tokens::Listed(tokens) => tokens.next(),
        }
    }
}

/// The hand-off point; a cheap-clone handle. Outputs join at start (subscribers) or later (the
/// cluster publisher, once connected), and are never removed.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    outputs: Arc<ArcSwap<Vec<Arc<dyn Output>>>>,
}

impl Outputs {
    pub fn add(&self, output: Arc<dyn Output>) {
        self.outputs.rcu(|outputs| {
            let mut outputs = Vec::clone(outputs);
            outputs.push(output.clone());
            outputs
        });
    }

    /// Offers `delivery` to every output.
    #[inline]
    pub fn publish(&self, delivery: &Delivery<'_>) {
        for output in self.outputs.load().iter() {
            output.offer(delivery);
        }
    }
}
