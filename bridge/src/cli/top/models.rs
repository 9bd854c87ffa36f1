//! The models view's numbers: per pool and model, over a sliding window of the last
//! [`WINDOW_SECONDS`] seconds, from `inference.stop` and `inference.exception` events.
//!
//! Cheap per event and bounded in memory whatever arrives:
//! - Time is a ring of one-second slots per model, each tagged with the second it holds: a slot
//!   is reset when a later second reuses it, and a reading adds up the slots still in the
//!   window, so nothing expires on a timer.
//! - Durations go into log-linear histograms (16 buckets per power of two: a percentile is
//!   within about 3% of the value it stands for) that a reading adds up over the window. An event
//!   is a short scan for its model and a few adds; nothing is allocated once its model is known.
//! - At most [`MAX_MODELS`] pool and model pairs are tracked; events of any further one count in
//!   one `other` row, until a tracked pair is quiet for a whole window and is forgotten.
//!
//! Weights: an event stands for `1 / sampling_rate` requests (the rate that applied to it, which
//! the hub delivers with it), in the request and token rates and in the error share, so the view
//! estimates the traffic served, not the part of it that was sampled. Percentiles weigh events
//! the same way. Sampling never looks at a request's duration, so when every worker serving a
//! model is sampled at one rate the kept events are a fair sample and the weights change nothing;
//! but when a pool mixes rates (one worker at 0.1, its neighbour at 1) unweighted percentiles
//! would describe the fully sampled worker, while weighted each worker counts for the traffic it
//! served. With histograms the weights cost nothing.

use std::time::{Duration, Instant};

use bridge::render::printable;

/// How far back the view looks.
pub const WINDOW_SECONDS: u64 = 10;
/// The window's whole seconds and the current, partial one.
const SLOTS: usize = WINDOW_SECONDS as usize + 1;
/// Pool and model pairs tracked by name; the rest are `other`.
pub const MAX_MODELS: usize = 32;
/// Longest model name shown, in characters.
const MAX_LABEL: usize = 48;

/// What one `inference.stop` or `inference.exception` says, as the models view needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// An `inference.exception`.
    pub failed: bool,
    /// The requests this event stands for ([`weight`]).
    pub weight: f64,
    pub duration_ns: Option<u64>,
    pub time_to_first_token_ns: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// The requests an event delivered at `sampling_rate` stands for: `1 / rate`. A rate outside
/// `(0, 1]` cannot come from a hub; such an event counts once rather than infinitely often.
pub fn weight(sampling_rate: f64) -> f64 {
    if sampling_rate.is_finite() && sampling_rate > 0.0 {
        1.0 / sampling_rate.min(1.0)
    } else {
        1.0
    }
}

/// The window of every model seen: see the module documentation.
#[derive(Debug)]
pub struct Models {
    /// Second 0 of the slots' clock.
    origin: Instant,
    /// The tracked pairs, scanned per event: with at most [`MAX_MODELS`] of them, comparing
    /// strings beats hashing them.
    named: Vec<Series>,
    other: Option<Series>,
    /// Events the hub skipped because this subscriber fell behind, per second.
    skipped: [(u64, u64); SLOTS],
    skipped_total: u64,
}

/// The window as the view shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub rows: Vec<Row>,
    /// Events skipped by the hub (this subscriber lagged) within the window, and ever.
    pub skipped: u64,
    pub skipped_total: u64,
}

/// One pool and model over the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Printable and at most [`MAX_LABEL`] characters, `-` for none (`*` for `other`).
    pub pool: String,
    /// As `pool`.
    pub model: String,
    /// The row of every pair past [`MAX_MODELS`].
    pub other: bool,
    pub requests_per_second: f64,
    /// Failed requests over all requests, 0 to 1.
    pub error_share: f64,
    pub output_tokens_per_second: f64,
    pub duration_p50_ns: Option<u64>,
    pub duration_p99_ns: Option<u64>,
    pub time_to_first_token_p50_ns: Option<u64>,
    pub time_to_first_token_p99_ns: Option<u64>,
    /// Events received (not weighted): how much the percentiles rest on.
    pub events: u64,
}

impl Models {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            named: Vec::new(),
            other: None,
            skipped: [(u64::MAX, 0); SLOTS],
            skipped_total: 0,
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Counts `request`, an event of `model` from a worker of `pool`, received at `now`.
    pub fn record(&mut self, now: Instant, pool: &str, model: &str, request: &Request) {
        let second = self.second(now);
        let series = match self
            .named
            .iter()
            .position(|s| s.pool == pool && s.model == model)
        {
            Some(index) => &mut self.named[index],
            None if self.named.len() < MAX_MODELS => {
                self.named.push(Series::new(pool, model));
                let last = self.named.len() - 1;
                &mut self.named[last]
            }
            None => self.other.get_or_insert_with(|| Series::new("", "")),
        };
        series.slot(second).add(request);
    }

    /// Counts a lag notice: the hub skipped `skipped` events this subscriber fell behind on.
    pub fn lagged(&mut self, now: Instant, skipped: u64) {
        let second = self.second(now);
        let slot = &mut self.skipped[slot_index(second)];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += skipped;
        self.skipped_total += skipped;
    }

    /// The window ending at `now`, in no particular order. Pairs quiet for the whole window are
    /// forgotten, which makes room for new ones.
    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        let second = self.second(now);
        self.named.retain(|s| s.active(second));
        if self.other.as_ref().is_some_and(|s| !s.active(second)) {
            self.other = None;
        }
        // The window spans the slots still in it: up to WINDOW_SECONDS whole seconds and the
        // current one so far, less before the view has run that long. Under a second, the rates
        // would jump on the first few events.
        let elapsed = now.saturating_duration_since(self.origin);
        let start = second.saturating_sub(WINDOW_SECONDS);
        let span = (elapsed - Duration::from_secs(start)).max(Duration::from_secs(1));
        let mut scratch = Vec::new();
        let mut rows: Vec<Row> = self
            .named
            .iter()
            .map(|s| s.row(second, span, &mut scratch, false))
            .collect();
        if let Some(other) = &self.other {
            rows.push(other.row(second, span, &mut scratch, true));
        }
        Snapshot {
            rows,
            skipped: self
                .skipped
                .iter()
                .filter(|(at, _)| in_window(*at, second))
                .map(|(_, n)| n)
                .sum(),
            skipped_total: self.skipped_total,
        }
    }
}

fn slot_index(second: u64) -> usize {
    (second % SLOTS as u64) as usize
}

/// Whether a slot of second `at` is in the window that ends in second `now`.
fn in_window(at: u64, now: u64) -> bool {
    at <= now && now - at <= WINDOW_SECONDS
}

/// One pool and model's slots.
#[derive(Debug)]
struct Series {
    /// As received, to compare with events.
    pool: String,
    model: String,
    slots: Vec<Slot>,
}

impl Series {
    fn new(pool: &str, model: &str) -> Self {
        Self {
            pool: pool.to_owned(),
            model: model.to_owned(),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    /// The slot of `second`, emptied first if it held an older one.
    fn slot(&mut self, second: u64) -> &mut Slot {
        let slot = &mut self.slots[slot_index(second)];
        if slot.second != second {
            slot.reset(second);
        }
        slot
    }

    fn active(&self, now: u64) -> bool {
        self.slots
            .iter()
            .any(|s| s.events > 0 && in_window(s.second, now))
    }

    fn row(&self, now: u64, span: Duration, scratch: &mut Vec<f64>, other: bool) -> Row {
        let slots: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| in_window(s.second, now))
            .collect();
        let requests: f64 = slots.iter().map(|s| s.requests).sum();
        let failed: f64 = slots.iter().map(|s| s.failed).sum();
        let output_tokens: f64 = slots.iter().map(|s| s.output_tokens).sum();
        let seconds = span.as_secs_f64();
        let mut percentiles = |histogram: fn(&Slot) -> &Histogram| {
            Histogram::sum_into(slots.iter().map(|s| histogram(s)), scratch);
            (quantile(scratch, 0.5), quantile(scratch, 0.99))
        };
        let (duration_p50_ns, duration_p99_ns) = percentiles(|s| &s.duration);
        let (time_to_first_token_p50_ns, time_to_first_token_p99_ns) =
            percentiles(|s| &s.time_to_first_token);
        Row {
            pool: if other {
                "*".into()
            } else {
                label(&self.pool, MAX_LABEL)
            },
            model: if other {
                "other".into()
            } else {
                label(&self.model, MAX_LABEL)
            },
            other,
            requests_per_second: requests / seconds,
            error_share: if requests > 0.0 {
                failed / requests
            } else {
                0.0
            },
            output_tokens_per_second: output_tokens / seconds,
            duration_p50_ns,
            duration_p99_ns,
            time_to_first_token_p50_ns,
            time_to_first_token_p99_ns,
            events: slots.iter().map(|s| s.events).sum(),
        }
    }
}

/// A name from the network as the terminal may show it: escaped where it could drive the
/// terminal or hide text, cut at `max` characters, `-` for none.
fn label(text: &str, max: usize) -> String {
    if text.is_empty() {
        return "-".into();
    }
    let shown = printable(text);
    if shown.chars().count() <= max {
        return shown.into_owned();
    }
    let mut cut: String = shown.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// One second of one pool and model.
#[derive(Debug)]
struct Slot {
    second: u64,
    /// Weighted, as are `failed` and `output_tokens`.
    requests: f64,
    failed: f64,
    output_tokens: f64,
    events: u64,
    duration: Histogram,
    time_to_first_token: Histogram,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            // No second: never in a window.
            second: u64::MAX,
            requests: 0.0,
            failed: 0.0,
            output_tokens: 0.0,
            events: 0,
            duration: Histogram::default(),
            time_to_first_token: Histogram::default(),
        }
    }
}

impl Slot {
    fn reset(&mut self, second: u64) {
        self.second = second;
        self.requests = 0.0;
        self.failed = 0.0;
        self.output_tokens = 0.0;
        self.events = 0;
        self.duration.clear();
        self.time_to_first_token.clear();
    }

    fn add(&mut self, request: &Request) {
        let weight = request.weight;
        self.events += 1;
        self.requests += weight;
        if request.failed {
            self.failed += weight;
        }
        if let Some(tokens) = request.output_tokens {
            self.output_tokens += weight * tokens as f64;
        }
        if let Some(ns) = request.duration_ns {
            self.duration.add(ns, weight);
        }
        if let Some(ns) = request.time_to_first_token_ns {
            self.time_to_first_token.add(ns, weight);
        }
    }
}

/// Bits of a value kept below its leading one: 16 buckets per power of two.
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Larger values (about 37 minutes, in nanoseconds) count as this one.
const MAX_VALUE: u64 = (1 << 41) - 1;
const BUCKETS: usize = bucket(MAX_VALUE) + 1;

/// The bucket of `value`: values below [`SUB`] have one each; above, each power of two is cut
/// into [`SUB`] equal buckets, so a bucket is at most 1/16 of its values wide.
const fn bucket(value: u64) -> usize {
    let value = if value > MAX_VALUE { MAX_VALUE } else { value };
    if value < SUB {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let mantissa = (value >> (exponent - SUB_BITS)) & (SUB - 1);
    ((exponent - SUB_BITS + 1) as u64 * SUB + mantissa) as usize
}

/// The middle of the values in bucket `index`.
fn midpoint(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let shift = index / SUB - 1;
    let low = (SUB + index % SUB) << shift;
    low + ((1 << shift) >> 1)
}

/// Weighted counts per [`bucket`], allocated on the first value.
#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<f64>,
}

impl Histogram {
    fn add(&mut self, value: u64, weight: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0.0; BUCKETS];
        }
        self.counts[bucket(value)] += weight;
    }

    fn clear(&mut self) {
        self.counts.fill(0.0);
    }

    /// Adds up `histograms` into `into`.
    fn sum_into<'a>(histograms: impl Iterator<Item = &'a Histogram>, into: &mut Vec<f64>) {
        into.clear();
        into.resize(BUCKETS, 0.0);
        for histogram in histograms {
            for (sum, count) in into.iter_mut().zip(&histogram.counts) {
                *sum += count;
            }
        }
    }
}

/// The value below which a share `q` of the weight lies, as its bucket's middle; `None` when
/// there is no weight.
fn quantile(counts: &[f64], q: f64) -> Option<u64> {
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut seen = 0.0;
    let mut last = None;
    for (index, count) in counts.iter().enumerate().filter(|(_, c)| **c > 0.0) {
        seen += count;
        last = Some(index);
        if seen >= target {
            break;
        }
    }
    last.map(midpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ok(duration_ms: u64) -> Request {
        Request {
            failed: false,
            weight: 1.0,
            duration_ns: Some(duration_ms * MS),
            time_to_first_token_ns: Some(duration_ms * MS / 10),
            output_tokens: Some(100),
        }
    }

    fn at(origin: Instant, millis: u64) -> Instant {
        origin + Duration::from_millis(millis)
    }

    /// Within the histograms' 1/32 either side.
    fn near(value: Option<u64>, expected: u64) -> bool {
        value.is_some_and(|v| v.abs_diff(expected) * 32 <= expected)
    }

    #[test]
    fn buckets_cover_every_value_in_order_and_their_middles_are_close() {
        let mut previous = 0;
        for value in (0..100_000).chain([MAX_VALUE - 1, MAX_VALUE, u64::MAX]) {
            let index = bucket(value);
            assert!(index >= previous && index < BUCKETS, "{value}");
            previous = index;
            let middle = midpoint(index);
            assert!(
                bucket(middle) == index,
                "{value}: middle {middle} elsewhere"
            );
            if value < MAX_VALUE {
                assert!(
                    value.abs_diff(middle) * 32 <= value.max(1),
                    "{value}: {middle}"
                );
            }
        }
        assert_eq!(bucket(15), 15);
        assert_eq!(bucket(16), 16);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn rates_are_per_second_of_the_window_and_percentiles_rank_the_events() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        // 1 ms to 100 ms, one each, over the first two seconds; one of them failed.
        for ms in 1..=100 {
            let mut request = ok(ms);
            request.failed = ms == 100;
            models.record(at(origin, ms * 20), "llama", "llama-70b", &request);
        }
        let snapshot = models.snapshot(at(origin, 2_000));
        let [row] = &snapshot.rows[..] else {
            panic!("{snapshot:?}")
        };
        assert_eq!(
            (row.pool.as_str(), row.model.as_str()),
            ("llama", "llama-70b")
        );
        assert!((row.requests_per_second - 50.0).abs() < 1e-9, "{row:?}");
        assert!((row.output_tokens_per_second - 5_000.0).abs() < 1e-9);
        assert!((row.error_share - 0.01).abs() < 1e-9);
        assert!(near(row.duration_p50_ns, 50 * MS), "{row:?}");
        assert!(near(row.duration_p99_ns, 99 * MS), "{row:?}");
        assert!(near(row.time_to_first_token_p50_ns, 5 * MS), "{row:?}");
        assert_eq!(row.events, 100);
    }

    #[test]
    fn each_event_weighs_one_over_its_sampling_rate() {
        assert_eq!(weight(0.25), 4.0);
        assert_eq!(weight(1.0), 1.0);
        for nonsense in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(weight(nonsense), 1.0, "{nonsense}");
        }
        assert_eq!(weight(2.0), 1.0);

        // Two workers serve one model: one keeps every request (10 of 10 ms), the other one in
        // ten (1 of 10 kept, each 100 ms). The estimate is the 20 requests served, half of them
        // slow: the p99 is the slow worker's, as is half the traffic.
        let origin = Instant::now();
        let mut models = Models::new(origin);
        for i in 0..10 {
            models.record(at(origin, i * 100), "llama", "m", &ok(10));
        }
        let mut sampled = ok(100);
        sampled.weight = weight(0.1);
        sampled.output_tokens = Some(7);
        models.record(at(origin, 500), "llama", "m", &sampled);
        let row = &models.snapshot(at(origin, 1_000)).rows[0];
        assert!((row.requests_per_second - 20.0).abs() < 1e-9, "{row:?}");
        assert!(
            (row.output_tokens_per_second - 1_070.0).abs() < 1e-9,
            "{row:?}"
        );
        assert!(near(row.duration_p50_ns, 10 * MS), "{row:?}");
        assert!(near(row.duration_p99_ns, 100 * MS), "{row:?}");
        assert_eq!(row.events, 11);
    }

    #[test]
    fn the_window_forgets_what_is_older_than_ten_seconds() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        // 10 requests/s for 20 s.
        for ms in (0..20_000).step_by(100) {
            models.record(
                at(origin, ms),
                "p",
                "m",
                &ok(if ms < 10_000 { 500 } else { 5 }),
            );
        }
        models.lagged(at(origin, 1_000), 7);
        models.lagged(at(origin, 15_000), 3);
        let snapshot = models.snapshot(at(origin, 20_000));
        let row = &snapshot.rows[0];
        // Seconds 10 to 19, and none yet of second 20.
        assert!((row.requests_per_second - 10.0).abs() < 1e-9, "{row:?}");
        assert!(
            near(row.duration_p99_ns, 5 * MS),
            "the slow first half expired: {row:?}"
        );
        assert_eq!((snapshot.skipped, snapshot.skipped_total), (3, 10));

        // Halfway through second 25: seconds 15 to 24 and the half of 25 are the window.
        let row = &models.snapshot(at(origin, 25_500)).rows[0];
        assert!(
            (row.requests_per_second - 50.0 / 10.5).abs() < 1e-9,
            "{row:?}"
        );

        // A slot reused by a later second starts empty.
        models.record(at(origin, 30_000), "p", "m", &ok(1));
        let row = &models.snapshot(at(origin, 30_000)).rows[0];
        assert_eq!(row.events, 1, "{row:?}");

        // Quiet for a whole window: forgotten.
        assert!(models.snapshot(at(origin, 41_000)).rows.is_empty());
    }

    #[test]
    fn the_first_second_is_not_extrapolated() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        models.record(at(origin, 10), "p", "m", &ok(1));
        let row = &models.snapshot(at(origin, 20)).rows[0];
        assert!((row.requests_per_second - 1.0).abs() < 1e-9, "{row:?}");
    }

    #[test]
    fn past_the_cap_models_count_as_other_until_one_is_forgotten() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        for i in 0..MAX_MODELS + 5 {
            models.record(origin, "p", &format!("model-{i}"), &ok(1));
        }
        let snapshot = models.snapshot(origin);
        assert_eq!(snapshot.rows.len(), MAX_MODELS + 1);
        let other = snapshot.rows.iter().find(|r| r.other).expect("other");
        assert_eq!((other.pool.as_str(), other.model.as_str()), ("*", "other"));
        assert_eq!(other.events, 5);

        // model-0 stays busy; the others go quiet and are forgotten, so a new one has a row.
        let later = at(origin, 12_000);
        models.record(later, "p", "model-0", &ok(1));
        models.record(later, "p", "new", &ok(1));
        let snapshot = models.snapshot(later);
        let mut names: Vec<&str> = snapshot.rows.iter().map(|r| r.model.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["model-0", "other"],
            "new came while the cap was full"
        );
        models.record(later, "p", "new", &ok(1));
        let names: Vec<String> = models
            .snapshot(later)
            .rows
            .into_iter()
            .map(|r| r.model)
            .collect();
        assert!(names.contains(&"new".to_owned()), "{names:?}");
    }

    #[test]
    fn names_from_the_network_are_made_printable_and_short() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}llama\u{202e}";
        models.record(origin, "", hostile, &ok(1));
        models.record(origin, "p", &"x".repeat(200), &ok(1));
        let rows = models.snapshot(origin).rows;
        assert_eq!(rows[0].pool, "-");
        assert_eq!(
            rows[0].model,
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7}llama\\u{202e}"
        );
        assert!(!rows[0].model.contains(|c: char| c.is_control()));
        assert_eq!(rows[1].model.chars().count(), MAX_LABEL);
        assert!(rows[1].model.ends_with('…'));
    }

    #[test]
    fn events_without_durations_count_in_rates_only() {
        let origin = Instant::now();
        let mut models = Models::new(origin);
        let bare = Request {
            failed: true,
            weight: 1.0,
            duration_ns: None,
            time_to_first_token_ns: None,
            output_tokens: None,
        };
        models.record(origin, "p", "m", &bare);
        let row = &models.snapshot(origin).rows[0];
        assert_eq!(row.error_share, 1.0);
        assert_eq!(
            (row.duration_p50_ns, row.time_to_first_token_p99_ns),
            (None, None)
        );
    }
}
