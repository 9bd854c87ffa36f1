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

use std::{cell::OnceCell, collections::BTreeMap, sync::Arc};

use arc_swap::ArcSwap;
use bridge_proto::{
    encoded::EncodedSubscribeResponse,
    trace::TraceId,
    view::{self, Entry, EventView},
};
use smallvec::SmallVec;

use self::subscribers::SubscriberId;

/// An output: takes each event or counts it as dropped, and never waits.
pub trait Output: Send + Sync + std::fmt::Debug {
    fn offer(&self, delivery: &Delivery<'_>);
}

/// Where a delivery comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A worker of this hub, or the hub itself.
    Local,
    /// Another hub, received on the cluster subscription made for these local subscribers (in
    /// id order): only they may receive it (another of this hub's cluster subscriptions can carry the same
    /// event for others). Each hub passes on its own workers' events to every other output.
    OtherHub { subscribers: &'a [SubscriberId] },
}

/// One event on its way to the outputs.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub worker_id: &'a str,
    pub pool: &'a str,
    /// The worker's labels, when known: this hub's workers' events have them, other hubs'
    /// do not (their messages carry no labels).
    pub worker_labels: Option<&'a BTreeMap<String, String>>,
    pub origin: Origin<'a>,
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
    /// Encoded already, by the hub that received it.
    Encoded {
        name: &'a str,
        trace_id: Option<TraceId>,
        response: EncodedSubscribeResponse,
    },
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

    /// An event another hub published, `encoded` as its subscribers receive it.
    pub fn from_other_hub(
        worker_id: &'a str,
        pool: &'a str,
        name: &'a str,
        trace_id: Option<TraceId>,
        encoded: EncodedSubscribeResponse,
        received_ns: i64,
        subscribers: &'a [SubscriberId],
    ) -> Self {
        Self {
            worker_id,
            pool,
            worker_labels: None,
            origin: Origin::OtherHub { subscribers },
            received_ns,
            event: Event::Encoded {
                name,
                trace_id,
                response: encoded,
            },
            encoded: OnceCell::new(),
            metadata: OnceCell::new(),
        }
    }

    /// The same delivery, from a worker with these labels.
    pub fn with_worker_labels(self, labels: &'a BTreeMap<String, String>) -> Self {
        Self {
            worker_labels: Some(labels),
            ..self
        }
    }

    /// The event name's tokens.
    #[inline]
    pub fn parts(&self) -> impl Iterator<Item = &'a str> + Clone + use<'a> {
        match &self.event {
            Event::Received { view, .. } => Tokens::View(view.parts()),
            Event::Encoded { name, .. } => Tokens::Dotted(name.split('.')),
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
            Event::Encoded { .. } => None,
        }
    }

    /// The event's trace id (empty: none).
    #[inline]
    pub fn trace_id(&self) -> &[u8] {
        match &self.event {
            Event::Received { view, .. } => view.trace_id(),
            Event::Encoded { trace_id, .. } => trace_id.as_ref().map_or(&[], |id| id.as_bytes()),
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
            Event::Encoded { response, .. } => {
                view::delivered_event(response.as_bytes()).and_then(|e| view::metadata_in(e, key))
            }
        }
    }

    /// The delivery as subscribers receive it, encoded on first use. An event without a
    /// timestamp is stamped with the time the hub received it.
    #[inline]
    pub fn encoded(&self) -> &EncodedSubscribeResponse {
        match &self.event {
            Event::Encoded { response, .. } => response,
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
    Dotted(D),
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
            Tokens::Dotted(tokens) => tokens.next(),
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
