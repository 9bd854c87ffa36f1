//! Per-model inference metrics: an output that counts the `inference.stop` and
//! `inference.exception` events of this hub's own workers, by pool and model, for `/metrics` to
//! read at scrape time.
//!
//! Each event counts `1 / rate`, the rate the hub delivered it at, so that while the fleet is
//! sampled the figures estimate the calls made rather than the events kept; histogram buckets
//! and sums are weighted the same way, so they are floats. Events from other hubs are theirs to
//! count (Prometheus sums the hubs), and the hub's own `bridge.*` events are not calls.
//!
//! Each worker stream records into a [`StreamRecorder`] of its own, which only that stream
//! writes; a read sums the streams' figures (and those of streams that have ended). Ingest pays,
//! per event: one branch for any event but a call's end; for a call's end, reading seven fields
//! where the decoding walk found them ([`EventView::inference_call`]), one string comparison
//! with the stream's last model, and a load and a store per figure, on cache lines no other
//! stream writes. A lock is taken only to add a pool, a model or a stream, and to read: a
//! model is added at most `max_models_per_pool` times per pool, and an event whose model has no
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
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use arc_swap::ArcSwap;
use bridge_proto::{
    protocol::inference,
    view::{CallEnd, EventView, ValueRef},
};

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

/// The output; a cheap-clone handle that worker streams record into and `/metrics` reads.
#[derive(Debug, Clone)]
pub struct InferenceMetrics {
    shared: Arc<Shared>,
}

/// Keyed by pool or model name. Hashed with foldhash, not SipHash: lookups cost a third as
/// much, and the maps hold few keys, at most `max_models` of them chosen by workers.
type Names<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Shared {
    max_models: usize,
    pools: ArcSwap<Names<Arc<Pool>>>,
    /// Held while a pool is added, so that two streams adding the same one make one.
    adding: Mutex<()>,
}

/// Where a model's figures are, in a pool: its index in [`Ledger::names`].
type Slot = usize;
const OTHER_SLOT: Slot = 0;
const UNKNOWN_SLOT: Slot = 1;

#[derive(Debug)]
struct Pool {
    /// Models with series of their own, at most `max_models`, and their slots; read without a
    /// lock, replaced under the ledger's.
    models: ArcSwap<Names<Slot>>,
    ledger: Mutex<Ledger>,
}

/// A pool's models and streams: taken to add a model, to add or retire a stream, and to read.
#[derive(Debug)]
struct Ledger {
    /// Every slot's model: [`OTHER_MODEL`], [`UNKNOWN_MODEL`], then models in the order met.
    names: Vec<Box<str>>,
    /// Figures of streams that have ended, by slot.
    retired: Vec<Option<Stats>>,
    retired_folded: f64,
    live: Vec<Arc<StreamFigures>>,
}

/// One stream's figures in its pool, which that stream alone writes.
#[derive(Debug, Default)]
struct StreamFigures {
    /// The slots it has met; locked by the stream to add one, and by readers.
    stats: Mutex<Vec<(Slot, Arc<Stats>)>>,
    /// Weighted events counted under [`OTHER_MODEL`] because their model had no room.
    folded: Tally,
}

/// One worker stream's recorder: ingest calls [`StreamRecorder::record`] for each event the
/// stream delivers. Each stream writes figures of its own, which `/metrics` sums, so streams
/// running on different cores never write the same cache line, and a figure costs a load and a
/// store instead of a compare-and-swap loop. Dropping it folds its figures into the pool's.
#[derive(Debug)]
pub struct StreamRecorder {
    pool: Arc<Pool>,
    max_models: usize,
    figures: Arc<StreamFigures>,
    /// This stream's stats, by slot, for the slots it has met.
    stats: Vec<Option<Arc<Stats>>>,
    /// Models with series of their own that this stream has met, and their slots, by the
    /// names' bytes: a name is read as text only the first time the stream meets it.
    slots: HashMap<Box<[u8]>, Slot, foldhash::fast::RandomState>,
    /// The last of them met, checked first (most streams serve one model); the buffer is
    /// reused, so a stream that alternates between models allocates nothing per event.
    last_model: Vec<u8>,
    last_slot: Option<Slot>,
}

/// What the hub knows of one model's calls, weighted.
#[derive(Debug, Default)]
struct Stats {
    success: Tally,
    error: Tally,
    input_tokens: Tally,
    output_tokens: Tally,
    duration: Histogram<14>,
    time_to_first_token: Histogram<16>,
    queue_wait: Histogram<16>,
}

/// Weighted counts per bucket (not cumulative); `B` bounds and a last bucket for the rest.
#[derive(Debug)]
struct Histogram<const B: usize> {
    counts: [Tally; B],
    above: Tally,
    sum_ns: Tally,
}

/// The fields of one call that the metrics read.
#[derive(Debug, Default, PartialEq)]
struct Call<'a> {
    model: &'a [u8],
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

    /// A recorder for one stream of a worker in `pool`, for the stream's life.
    pub fn recorder(&self, pool: &str) -> StreamRecorder {
        let pool = self.shared.pool(pool);
        let figures = Arc::new(StreamFigures::default());
        pool.lock().live.push(figures.clone());
        StreamRecorder {
            pool,
            max_models: self.shared.max_models,
            figures,
            stats: Vec::new(),
            slots: HashMap::default(),
            last_model: Vec::new(),
            last_slot: None,
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

impl StreamRecorder {
    /// Counts `view` if it is an `inference.stop` or `.exception`, delivered at `rate`.
    #[inline]
    pub fn record(&mut self, view: &EventView, rate: f64) {
        let Some(call) = Call::read(view) else {
            return;
        };
        // The hub delivers at rates in (0, 1]; anything else would be a bug, counted as 1.
        let weight = if rate > 0.0 && rate <= 1.0 {
            1.0 / rate
        } else {
            1.0
        };
        let slot = match self.last_slot {
            Some(slot) if self.last_model.as_slice() == call.model => slot,
            _ => self.slot(call.model, weight),
        };
        self.stats(slot).record(&call, weight);
    }

    /// The slot of a model other than the last one met; counts a fold.
    fn slot(&mut self, model: &[u8], weight: f64) -> Slot {
        if model.is_empty() || model == UNKNOWN_MODEL.as_bytes() {
            return UNKNOWN_SLOT;
        }
        if model == OTHER_MODEL.as_bytes() {
            return OTHER_SLOT;
        }
        let slot = match self.slots.get(model) {
            Some(slot) => Some(*slot),
            // Checked when the event was received: never anything but UTF-8.
            None => std::str::from_utf8(model)
                .ok()
                .and_then(|name| self.pool.slot(name, self.max_models)),
        };
        match slot {
            Some(slot) => {
                // Bounded: a model met here has a series of its own, of which there are at
                // most `max_models`.
                if !self.slots.contains_key(model) {
                    self.slots.insert(model.into(), slot);
                }
                self.last_model.clear();
                self.last_model.extend_from_slice(model);
                self.last_slot = Some(slot);
                slot
            }
            None => {
                self.figures.folded.add(weight);
                OTHER_SLOT
            }
        }
    }

    fn stats(&mut self, slot: Slot) -> &Stats {
        if self.stats.len() <= slot {
            self.stats.resize(slot + 1, None);
        }
        self.stats[slot].get_or_insert_with(|| {
            let stats = Arc::new(Stats::default());
            lock(&self.figures.stats).push((slot, stats.clone()));
            stats
        })
    }
}

impl Drop for StreamRecorder {
    /// Folds the stream's figures into the pool's, under the lock readers take, so that a read
    /// counts them exactly once.
    fn drop(&mut self) {
        let mut ledger = self.pool.lock();
        for (slot, stats) in lock(&self.figures.stats).iter() {
            ledger.retired[*slot]
                .get_or_insert_with(Stats::default)
                .absorb(stats);
        }
        ledger.retired_folded += self.figures.folded.get();
        ledger
            .live
            .retain(|figures| !Arc::ptr_eq(figures, &self.figures));
    }
}

impl<'a> Call<'a> {
    /// The call an `inference.stop` or `.exception` reports; `None` for any other event.
    #[inline]
    fn read(view: &'a EventView) -> Option<Self> {
        let call = view.inference_call()?;
        // The conventions make these ints; a float, a string or a negative value is a broken
        // emitter's, and only that field is left out.
        let count = |value| match value {
            Some(ValueRef::Int(n)) => u64::try_from(n).ok(),
            _ => None,
        };
        Some(Call {
            model: call.model.unwrap_or_default(),
            failed: match call.result {
                Some(result) if result == inference::RESULT_SUCCESS.as_bytes() => false,
                Some(result) if result == inference::RESULT_ERROR.as_bytes() => true,
                // Any other value would be a label without bound: the name says.
                _ => call.end == CallEnd::Exception,
            },
            duration_ns: count(call.duration_ns),
            time_to_first_token_ns: count(call.time_to_first_token_ns),
            queue_wait_ns: count(call.queue_wait_ns),
            input_tokens: count(call.input_tokens),
            output_tokens: count(call.output_tokens),
        })
    }
}

impl Shared {
    fn pool(&self, name: &str) -> Arc<Pool> {
        if let Some(found) = self.pools.load().get(name) {
            return found.clone();
        }
        let _adding = lock(&self.adding);
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

impl Default for Pool {
    fn default() -> Self {
        Self {
            models: ArcSwap::default(),
            ledger: Mutex::new(Ledger {
                names: vec![OTHER_MODEL.into(), UNKNOWN_MODEL.into()],
                retired: vec![None, None],
                retired_folded: 0.0,
                live: Vec::new(),
            }),
        }
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// The slot of a model with a series of its own, added if there is room; `None`: it has
    /// none, and is counted under `other`.
    fn slot(&self, model: &str, max_models: usize) -> Option<Slot> {
        let models = self.models.load();
        if let Some(slot) = models.get(model) {
            return Some(*slot);
        }
        // Without a lock: the events of a model with no room (of which there may be many per
        // second, from every stream) must not contend for the ledger.
        if models.len() >= max_models || !labelable(model) {
            return None;
        }
        drop(models);
        self.add_model(model, max_models)
    }

    #[cold]
    fn add_model(&self, name: &str, max_models: usize) -> Option<Slot> {
        let mut ledger = self.lock();
        let models = self.models.load_full();
        if let Some(slot) = models.get(name) {
            return Some(*slot);
        }
        if models.len() >= max_models {
            return None;
        }
        let slot = ledger.names.len();
        ledger.names.push(name.into());
        ledger.retired.push(None);
        let mut grown = Names::clone(&models);
        grown.insert(name.into(), slot);
        self.models.store(Arc::new(grown));
        Some(slot)
    }

    fn snapshot(&self, name: &str) -> PoolSnapshot {
        let ledger = self.lock();
        let mut sums: Vec<Option<Stats>> = (0..ledger.names.len()).map(|_| None).collect();
        let mut folded = ledger.retired_folded;
        for figures in &ledger.live {
            folded += figures.folded.get();
            for (slot, stats) in lock(&figures.stats).iter() {
                sums[*slot].get_or_insert_with(Stats::default).absorb(stats);
            }
        }
        for (slot, stats) in ledger.retired.iter().enumerate() {
            if let Some(stats) = stats {
                sums[slot].get_or_insert_with(Stats::default).absorb(stats);
            }
        }
        let mut models: Vec<ModelSnapshot> = sums
            .iter()
            .zip(&ledger.names)
            .filter_map(|(stats, model)| Some(stats.as_ref()?.snapshot(model)))
            .collect();
        models.sort_by(|a, b| a.model.cmp(&b.model));
        PoolSnapshot {
            pool: name.to_owned(),
            folded,
            models,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a model name can be a label value that dashboards can show and match: bounded, and
/// on one line. Quotes, backslashes and any other Unicode are fine (escaped where needed).
fn labelable(model: &str) -> bool {
    model.len() <= MAX_MODEL_BYTES && !model.chars().any(char::is_control)
}

impl Stats {
    #[inline]
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

    /// Adds `other`'s figures to these.
    fn absorb(&self, other: &Stats) {
        for (mine, theirs) in [
            (&self.success, &other.success),
            (&self.error, &other.error),
            (&self.input_tokens, &other.input_tokens),
            (&self.output_tokens, &other.output_tokens),
        ] {
            mine.add(theirs.get());
        }
        self.duration.absorb(&other.duration);
        self.time_to_first_token.absorb(&other.time_to_first_token);
        self.queue_wait.absorb(&other.queue_wait);
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
            counts: std::array::from_fn(|_| Tally::default()),
            above: Tally::default(),
            sum_ns: Tally::default(),
        }
    }
}

impl<const B: usize> Histogram<B> {
    #[inline]
    fn record(&self, bounds_ns: &[u64; B], ns: u64, weight: f64) {
        // Bucket i holds values up to and including bounds[i].
        let bucket = bounds_ns.partition_point(|bound| *bound < ns);
        self.counts.get(bucket).unwrap_or(&self.above).add(weight);
        self.sum_ns.add(weight * ns as f64);
    }

    fn absorb(&self, other: &Self) {
        for (mine, theirs) in self.counts.iter().zip(&other.counts) {
            mine.add(theirs.get());
        }
        self.above.add(other.above.get());
        self.sum_ns.add(other.sum_ns.get());
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

/// An `f64` with one writer at a time (its stream, or whoever holds the pool's ledger) and any
/// number of readers: adding is a load and a store, which cannot lose an add without a second
/// writer.
#[derive(Debug, Default)]
struct Tally(AtomicU64);

impl Tally {
    #[inline]
    fn add(&self, value: f64) {
        let sum = f64::from_bits(self.0.load(Relaxed)) + value;
        self.0.store(sum.to_bits(), Relaxed);
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

    /// One stream's event, counted once the stream has ended.
    fn offer(metrics: &InferenceMetrics, pool: &str, view: &EventView, rate: f64) {
        metrics.recorder(pool).record(view, rate);
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
    fn only_inference_ends_count() {
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
        assert_eq!(metrics.snapshot()[0].models, []);
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
                    let mut recorder = metrics.recorder(&format!("p{}", thread % 2));
                    for i in 0..1000 {
                        recorder.record(&views[i % 8], 1.0);
                    }
                });
            }
            // Reads while streams record (and end) see each figure once at most.
            for _ in 0..100 {
                for pool in metrics.snapshot() {
                    let calls: f64 = pool.models.iter().map(|m| m.success).sum();
                    assert!(calls <= 2000.0, "{pool:#?}");
                }
            }
        });
        for pool in metrics.snapshot() {
            assert_eq!(pool.models.len(), 5, "{pool:#?}");
            let calls: f64 = pool.models.iter().map(|m| m.success).sum();
            let tokens: f64 = pool.models.iter().map(|m| m.input_tokens).sum();
            assert_eq!((calls, tokens, pool.folded), (2000.0, 6000.0, 1000.0));
        }
    }

    #[test]
    fn a_live_stream_is_read_and_its_end_counts_it_once() {
        let metrics = InferenceMetrics::new(4);
        let mut live = metrics.recorder("p");
        live.record(&stop("m", &[]), 0.5);
        offer(&metrics, "p", &stop("m", &[]), 1.0);
        let read = |metrics: &InferenceMetrics| model(&metrics.snapshot(), "p", "m").success;
        assert_eq!(read(&metrics), 3.0);
        live.record(&stop("m", &[]), 1.0);
        assert_eq!(read(&metrics), 4.0);
        drop(live);
        assert_eq!(read(&metrics), 4.0);
        let pools = metrics.shared.pools.load();
        assert!(
            pools["p"].lock().live.is_empty(),
            "ended streams stay listed"
        );
    }
}
