//! Per-model inference metrics: an output that counts the `inference.stop` and
//! `inference.exception` events of this hub's own workers, by pool and model, for `/metrics` to
//! read at scrape time.
//!
//! Each event counts `1 / rate`, the rate the hub delivered it at, so that while the fleet is
//! sampled the figures estimate the calls made rather than the events kept; histogram buckets
//! and sums are weighted the same way, so they are floats. Events from other hubs are theirs to
//! count (Prometheus sums the hubs), and the hub's own `bridge.*` events are not calls.
//!
//! Ingest pays, per event: the name's tokens (every other event stops there), one walk over the
//! event's entries where they lie ([`EventView::lookup`]), two map lookups that take no lock
//! ([`ArcSwap`]), and an atomic add per figure. A lock is taken only to add a pool or a model,
//! which happens at most `max_models_per_pool` + 2 times per pool: an event whose model has no
//! room goes to `other` without one.
//!
//! Labels are bounded. In each pool, the first `max_models_per_pool` models seen have series of
//! their own; the events of later ones, and of model names longer than [`MAX_MODEL_BYTES`] or
//! holding control characters, are counted under [`OTHER_MODEL`] and in the pool's folded count.
//! Events without a model are counted under [`UNKNOWN_MODEL`]. Pools come from the workers'
//! streams (`x-worker-pool`, at most 256 printable bytes).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use arc_swap::ArcSwap;
use bridge_proto::{
    protocol::{inference, span},
    view::{EventView, ValueRef},
};

use super::{Delivery, Origin, Output};

/// The model label of events that name none (or an empty one).
pub const UNKNOWN_MODEL: &str = "unknown";
/// The model label of events whose model has no series of its own.
pub const OTHER_MODEL: &str = "other";
/// Longest model name with series of its own, in bytes.
pub const MAX_MODEL_BYTES: usize = 128;

/// `duration_ns`: 5 ms (a cached or tiny request) to 60 s (a long generation); beyond it, +Inf.
pub const DURATION_BOUNDS_NS: [u64; 14] = [
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    20_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// `time_to_first_token_ns`: 1 ms to 10 s, OpenTelemetry's advisory buckets for
/// `gen_ai.server.time_to_first_token`, finer where interactive serving aims (under 100 ms).
pub const TIME_TO_FIRST_TOKEN_BOUNDS_NS: [u64; 16] = [
    1_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    40_000_000,
    60_000_000,
    80_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    750_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    7_500_000_000,
    10_000_000_000,
];

/// `queue_wait_ns`: 100 µs (an idle server) to 10 s (an overloaded one).
pub const QUEUE_WAIT_BOUNDS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const STOP: [&str; 2] = [inference::OPERATION, span::STOP];
const EXCEPTION: [&str; 2] = [inference::OPERATION, span::EXCEPTION];

/// The output; a cheap-clone handle that the hub adds to its outputs and `/metrics` reads.
#[derive(Debug, Clone)]
pub struct InferenceMetrics {
    shared: Arc<Shared>,
}

/// Keyed by pool or model name. Hashed with foldhash, not SipHash: the two lookups per event
/// cost a third as much, and the maps hold few keys, at most `max_models` of them chosen by
/// workers.
type Names<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Shared {
    max_models: usize,
    pools: ArcSwap<Names<Arc<Pool>>>,
    /// Held while a pool is added, so that two streams adding the same one make one.
    adding: Mutex<()>,
}

#[derive(Debug, Default)]
struct Pool {
    /// Models with series of their own, at most `max_models`.
    models: ArcSwap<Names<Arc<Stats>>>,
    adding: Mutex<()>,
    other: OnceLock<Stats>,
    unknown: OnceLock<Stats>,
    /// Weighted events counted under `other` because their model had no room.
    folded: AtomicF64,
}

/// What the hub knows of one model's calls, weighted.
#[derive(Debug, Default)]
struct Stats {
    success: AtomicF64,
    error: AtomicF64,
    input_tokens: AtomicF64,
    output_tokens: AtomicF64,
    duration: Histogram<14>,
    time_to_first_token: Histogram<16>,
    queue_wait: Histogram<16>,
}

/// Weighted counts per bucket (not cumulative); `B` bounds and a last bucket for the rest.
#[derive(Debug)]
struct Histogram<const B: usize> {
    counts: [AtomicF64; B],
    above: AtomicF64,
    sum_ns: AtomicF64,
}

/// The fields of one call that the metrics read.
#[derive(Debug, Default, PartialEq)]
struct Call<'a> {
    model: &'a str,
    failed: bool,
    duration_ns: Option<u64>,
    time_to_first_token_ns: Option<u64>,
    queue_wait_ns: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl InferenceMetrics {
    /// `max_models_per_pool`: models with series of their own in each pool.
    pub fn new(max_models_per_pool: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_models: max_models_per_pool,
                pools: ArcSwap::default(),
                adding: Mutex::new(()),
            }),
        }
    }

    /// Every pool's figures so far, pools and models in name order.
    pub fn snapshot(&self) -> Vec<PoolSnapshot> {
        let pools = self.shared.pools.load();
        let mut snapshot: Vec<PoolSnapshot> = pools
            .iter()
            .map(|(name, pool)| pool.snapshot(name))
            .collect();
        snapshot.sort_by(|a, b| a.pool.cmp(&b.pool));
        snapshot
    }
}

impl Output for InferenceMetrics {
    fn offer(&self, delivery: &Delivery<'_>) {
        if !matches!(delivery.origin, Origin::Local) {
            return;
        }
        let Some((view, rate)) = delivery.received() else {
            return;
        };
        let Some(call) = Call::read(view) else {
            return;
        };
        // The hub delivers at rates in (0, 1]; anything else would be a bug, counted as 1.
        let weight = if rate > 0.0 && rate <= 1.0 {
            1.0 / rate
        } else {
            1.0
        };
        self.shared.record(delivery.pool, &call, weight);
    }
}

impl<'a> Call<'a> {
    /// The call an `inference.stop` or `.exception` reports; `None` for any other event.
    fn read(view: &'a EventView) -> Option<Self> {
        let failed = if view.is_named(&STOP) {
            false
        } else if view.is_named(&EXCEPTION) {
            true
        } else {
            return None;
        };
        let ([duration, first_token, queue_wait, input, output], [model, result]) = view.lookup(
            [
                inference::DURATION_NS,
                inference::TIME_TO_FIRST_TOKEN_NS,
                inference::QUEUE_WAIT_NS,
                inference::INPUT_TOKENS,
                inference::OUTPUT_TOKENS,
            ],
            [inference::MODEL, inference::RESULT],
        );
        // The conventions make these ints; a float, a string or a negative value is a broken
        // emitter's, and only that field is left out.
        let count = |value| match value {
            Some(ValueRef::Int(n)) => u64::try_from(n).ok(),
            _ => None,
        };
        let call = Call {
            model: model.unwrap_or_default(),
            failed: match result {
                Some(inference::RESULT_SUCCESS) => false,
                Some(inference::RESULT_ERROR) => true,
                // Any other value would be a label without bound: the name says.
                _ => failed,
            },
            duration_ns: count(duration),
            time_to_first_token_ns: count(first_token),
            queue_wait_ns: count(queue_wait),
            input_tokens: count(input),
            output_tokens: count(output),
        };
        Some(call)
    }
}

impl Shared {
    fn record(&self, pool: &str, call: &Call<'_>, weight: f64) {
        if let Some(found) = self.pools.load().get(pool) {
            return found.record(call, weight, self.max_models);
        }
        self.add_pool(pool).record(call, weight, self.max_models);
    }

    #[cold]
    fn add_pool(&self, name: &str) -> Arc<Pool> {
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let pools = self.pools.load_full();
        if let Some(pool) = pools.get(name) {
            return pool.clone();
        }
        let pool = Arc::new(Pool::default());
        let mut grown = Names::clone(&pools);
        grown.insert(name.into(), pool.clone());
        self.pools.store(Arc::new(grown));
        pool
    }
}

impl Pool {
    fn record(&self, call: &Call<'_>, weight: f64, max_models: usize) {
        let model = call.model;
        if model.is_empty() || model == UNKNOWN_MODEL {
            return self
                .unknown
                .get_or_init(Stats::default)
                .record(call, weight);
        }
        if model == OTHER_MODEL {
            return self.other().record(call, weight);
        }
        let models = self.models.load();
        if let Some(stats) = models.get(model) {
            return stats.record(call, weight);
        }
        let room = models.len() < max_models && labelable(model);
        drop(models);
        match room.then(|| self.add_model(model, max_models)).flatten() {
            Some(stats) => stats.record(call, weight),
            None => {
                self.folded.add(weight);
                self.other().record(call, weight);
            }
        }
    }

    fn other(&self) -> &Stats {
        self.other.get_or_init(Stats::default)
    }

    /// The model's stats, added unless the pool filled up meanwhile.
    #[cold]
    fn add_model(&self, name: &str, max_models: usize) -> Option<Arc<Stats>> {
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let models = self.models.load_full();
        if let Some(stats) = models.get(name) {
            return Some(stats.clone());
        }
        if models.len() >= max_models {
            return None;
        }
        let stats = Arc::new(Stats::default());
        let mut grown = Names::clone(&models);
        grown.insert(name.into(), stats.clone());
        self.models.store(Arc::new(grown));
        Some(stats)
    }

    fn snapshot(&self, name: &str) -> PoolSnapshot {
        let models = self.models.load();
        let mut snapshot: Vec<ModelSnapshot> = models
            .iter()
            .map(|(model, stats)| stats.snapshot(model))
            .chain(self.other.get().map(|stats| stats.snapshot(OTHER_MODEL)))
            .chain(
                self.unknown
                    .get()
                    .map(|stats| stats.snapshot(UNKNOWN_MODEL)),
            )
            .collect();
        snapshot.sort_by(|a, b| a.model.cmp(&b.model));
        PoolSnapshot {
            pool: name.to_owned(),
            folded: self.folded.get(),
            models: snapshot,
        }
    }
}

/// Whether a model name can be a label value that dashboards can show and match: bounded, and
/// on one line. Quotes, backslashes and any other Unicode are fine (escaped where needed).
fn labelable(model: &str) -> bool {
    model.len() <= MAX_MODEL_BYTES && !model.chars().any(char::is_control)
}

impl Stats {
    fn record(&self, call: &Call<'_>, weight: f64) {
        if call.failed {
            self.error.add(weight);
        } else {
            self.success.add(weight);
        }
        if let Some(n) = call.input_tokens {
            self.input_tokens.add(weight * n as f64);
        }
        if let Some(n) = call.output_tokens {
            self.output_tokens.add(weight * n as f64);
        }
        if let Some(ns) = call.duration_ns {
            self.duration.record(&DURATION_BOUNDS_NS, ns, weight);
        }
        if let Some(ns) = call.time_to_first_token_ns {
            self.time_to_first_token
                .record(&TIME_TO_FIRST_TOKEN_BOUNDS_NS, ns, weight);
        }
        if let Some(ns) = call.queue_wait_ns {
            self.queue_wait.record(&QUEUE_WAIT_BOUNDS_NS, ns, weight);
        }
    }

    fn snapshot(&self, model: &str) -> ModelSnapshot {
        ModelSnapshot {
            model: model.to_owned(),
            success: self.success.get(),
            error: self.error.get(),
            input_tokens: self.input_tokens.get(),
            output_tokens: self.output_tokens.get(),
            duration: self.duration.snapshot(&DURATION_BOUNDS_NS),
            time_to_first_token: self
                .time_to_first_token
                .snapshot(&TIME_TO_FIRST_TOKEN_BOUNDS_NS),
            queue_wait: self.queue_wait.snapshot(&QUEUE_WAIT_BOUNDS_NS),
        }
    }
}

impl<const B: usize> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicF64::default()),
            above: AtomicF64::default(),
            sum_ns: AtomicF64::default(),
        }
    }
}

impl<const B: usize> Histogram<B> {
    fn record(&self, bounds_ns: &[u64; B], ns: u64, weight: f64) {
        // Bucket i holds values up to and including bounds[i].
        let bucket = bounds_ns.partition_point(|bound| *bound < ns);
        self.counts.get(bucket).unwrap_or(&self.above).add(weight);
        self.sum_ns.add(weight * ns as f64);
    }

    fn snapshot(&self, bounds_ns: &[u64; B]) -> HistogramSnapshot {
        let mut cumulative = 0.0;
        let buckets = bounds_ns
            .iter()
            .map(|bound| *bound as f64 / 1e9)
            .chain([f64::INFINITY])
            .zip(self.counts.iter().chain([&self.above]))
            .map(|(le, count)| {
                cumulative += count.get();
                (le, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: cumulative,
            sum_seconds: self.sum_ns.get() / 1e9,
        }
    }
}

/// An `f64` that threads add to without a lock.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn add(&self, value: f64) {
        let _ = self.0.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// One pool's figures, read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSnapshot {
    pub pool: String,
    /// Weighted events counted under [`OTHER_MODEL`] because their model had no room.
    pub folded: f64,
    pub models: Vec<ModelSnapshot>,
}

/// One model's figures in a pool, weighted by `1 / rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    pub model: String,
    pub success: f64,
    pub error: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
    pub duration: HistogramSnapshot,
    pub time_to_first_token: HistogramSnapshot,
    pub queue_wait: HistogramSnapshot,
}

/// A histogram as Prometheus exposes it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds in seconds (the last is infinity) and cumulative weighted counts.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum_seconds: f64,
}

#[cfg(test)]
mod tests {
    use bridge_proto::v1::{TelemetryEvent, TelemetryValue, telemetry_value::Value};

    use super::*;
    use crate::outputs::subscribers::SubscriberId;

    fn event(name: &str, measurements: &[(&str, Value)], metadata: &[(&str, &str)]) -> EventView {
        EventView::from_event(&TelemetryEvent {
            event_parts: name.split('.').map(str::to_owned).collect(),
            measurements: measurements
                .iter()
                .map(|(k, v)| {
                    let value = Some(v.clone());
                    ((*k).to_owned(), TelemetryValue { value })
                })
                .collect(),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn stop(model: &str, measurements: &[(&str, Value)]) -> EventView {
        event(inference::STOP, measurements, &[(inference::MODEL, model)])
    }

    fn offer(metrics: &InferenceMetrics, pool: &str, view: &EventView, rate: f64) {
        metrics.offer(&Delivery::local("w", pool, view, rate, 1));
    }

    fn model<'a>(snapshot: &'a [PoolSnapshot], pool: &str, model: &str) -> &'a ModelSnapshot {
        snapshot
            .iter()
            .find(|p| p.pool == pool)
            .and_then(|p| p.models.iter().find(|m| m.model == model))
            .unwrap_or_else(|| panic!("no {pool}/{model} in {snapshot:#?}"))
    }

    #[test]
    fn calls_are_counted_by_pool_model_and_result() {
        let metrics = InferenceMetrics::new(50);
        let full = stop(
            "llama",
            &[
                (inference::DURATION_NS, Value::IntValue(50_000_000)),
                (
                    inference::TIME_TO_FIRST_TOKEN_NS,
                    Value::IntValue(10_000_000),
                ),
                (inference::QUEUE_WAIT_NS, Value::IntValue(1_000_000)),
                (inference::INPUT_TOKENS, Value::IntValue(100)),
                (inference::OUTPUT_TOKENS, Value::IntValue(20)),
            ],
        );
        offer(&metrics, "p", &full, 1.0);
        offer(&metrics, "p", &full, 0.25);
        let failed = event(
            inference::EXCEPTION,
            &[(inference::DURATION_NS, Value::IntValue(2_000_000_000))],
            &[(inference::MODEL, "llama")],
        );
        offer(&metrics, "p", &failed, 1.0);
        // `result` says more than the name.
        let said_error = event(
            inference::STOP,
            &[],
            &[(inference::MODEL, "llama"), (inference::RESULT, "error")],
        );
        offer(&metrics, "p", &said_error, 1.0);
        let odd_result = event(
            inference::STOP,
            &[],
            &[(inference::MODEL, "llama"), (inference::RESULT, "maybe")],
        );
        offer(&metrics, "p", &odd_result, 1.0);

        let snapshot = metrics.snapshot();
        let llama = model(&snapshot, "p", "llama");
        assert_eq!((llama.success, llama.error), (1.0 + 4.0 + 1.0, 2.0));
        assert_eq!((llama.input_tokens, llama.output_tokens), (500.0, 100.0));
        let duration = &llama.duration;
        assert_eq!(duration.count, 6.0);
        assert!((duration.sum_seconds - (5.0 * 0.05 + 2.0)).abs() < 1e-12);
        assert_eq!(duration.buckets.len(), DURATION_BOUNDS_NS.len() + 1);
        // 50 ms is the fourth bound: held by its bucket, cumulated into every later one.
        assert_eq!(duration.buckets[2], (0.025, 0.0));
        assert_eq!(duration.buckets[3], (0.05, 5.0));
        assert_eq!(duration.buckets[7], (1.0, 5.0));
        assert_eq!(duration.buckets[8], (2.5, 6.0));
        assert_eq!(*duration.buckets.last().unwrap(), (f64::INFINITY, 6.0));
        assert_eq!(llama.time_to_first_token.count, 5.0);
        assert_eq!(llama.queue_wait.count, 5.0);
        assert_eq!(snapshot[0].folded, 0.0);
    }

    #[test]
    fn fields_of_the_wrong_type_or_sign_are_left_out_not_the_call() {
        let metrics = InferenceMetrics::new(50);
        let broken = stop(
            "m",
            &[
                (inference::DURATION_NS, Value::FloatValue(5e7)),
                (inference::TIME_TO_FIRST_TOKEN_NS, Value::IntValue(-1)),
                (inference::QUEUE_WAIT_NS, Value::StringValue("1ms".into())),
                (inference::INPUT_TOKENS, Value::IntValue(-5)),
                (inference::OUTPUT_TOKENS, Value::IntValue(7)),
            ],
        );
        offer(&metrics, "p", &broken, 1.0);
        let snapshot = metrics.snapshot();
        let m = model(&snapshot, "p", "m");
        assert_eq!(
            (m.success, m.input_tokens, m.output_tokens),
            (1.0, 0.0, 7.0)
        );
        for histogram in [&m.duration, &m.time_to_first_token, &m.queue_wait] {
            assert_eq!((histogram.count, histogram.sum_seconds), (0.0, 0.0));
        }
    }

    #[test]
    fn only_inference_ends_from_this_hubs_workers_count() {
        let metrics = InferenceMetrics::new(50);
        for name in [
            "inference.start",
            "inference.stop.x",
            "gpu.metrics",
            "bridge.worker.connected",
            "inference",
        ] {
            offer(
                &metrics,
                "p",
                &event(name, &[], &[(inference::MODEL, "m")]),
                1.0,
            );
        }
        let view = stop("m", &[]);
        let encoded = Delivery::local("w", "p", &view, 1.0, 1).encoded().clone();
        let subscribers: [SubscriberId; 0] = [];
        metrics.offer(&Delivery::from_other_hub(
            "w",
            "p",
            inference::STOP,
            None,
            encoded,
            1,
            &subscribers,
        ));
        assert_eq!(metrics.snapshot(), []);
    }

    #[test]
    fn models_beyond_the_cap_or_unfit_for_a_label_fold_into_other() {
        let metrics = InferenceMetrics::new(2);
        let long = "x".repeat(MAX_MODEL_BYTES + 1);
        for name in [
            "a",
            "b",
            "c",
            "a",
            "d",
            long.as_str(),
            "line\nbreak",
            "",
            OTHER_MODEL,
        ] {
            offer(&metrics, "p", &stop(name, &[]), 0.5);
        }
        offer(&metrics, "p", &event(inference::STOP, &[], &[]), 1.0);
        // Another pool has room of its own.
        offer(&metrics, "q", &stop("c", &[]), 1.0);

        let snapshot = metrics.snapshot();
        let names = |pool: usize| -> Vec<&str> {
            snapshot[pool]
                .models
                .iter()
                .map(|m| m.model.as_str())
                .collect()
        };
        assert_eq!(names(0), ["a", "b", OTHER_MODEL, UNKNOWN_MODEL]);
        assert_eq!(names(1), ["c"]);
        assert_eq!(model(&snapshot, "p", "a").success, 4.0);
        // c, d, the long name and the line break were folded; "other" itself was not.
        assert_eq!(model(&snapshot, "p", OTHER_MODEL).success, 10.0);
        assert_eq!(snapshot[0].folded, 8.0);
        assert_eq!(model(&snapshot, "p", UNKNOWN_MODEL).success, 3.0);
        assert_eq!(snapshot[1].folded, 0.0);
    }

    #[test]
    fn concurrent_streams_lose_nothing() {
        let metrics = InferenceMetrics::new(4);
        let views: Vec<_> = (0..8)
            .map(|i| {
                stop(
                    &format!("m{i}"),
                    &[(inference::INPUT_TOKENS, Value::IntValue(3))],
                )
            })
            .collect();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (metrics, views) = (&metrics, &views);
                scope.spawn(move || {
                    for i in 0..1000 {
                        offer(metrics, &format!("p{}", thread % 2), &views[i % 8], 1.0);
                    }
                });
            }
        });
        for pool in metrics.snapshot() {
            assert_eq!(pool.models.len(), 5, "{pool:#?}");
            let calls: f64 = pool.models.iter().map(|m| m.success).sum();
            let tokens: f64 = pool.models.iter().map(|m| m.input_tokens).sum();
            assert_eq!((calls, tokens, pool.folded), (2000.0, 6000.0, 1000.0));
        }
    }
}
