//! Latency histograms the hot paths record into, read by `/metrics` at scrape time.
//!
//! Fixed buckets of relaxed atomic counters, in shards so that streams on different cores do
//! not write the same cache line: a record is a short bucket search and two uncontended atomic
//! adds. A scrape sums the shards.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{SystemTime, UNIX_EPOCH},
};

const SHARDS: usize = 16;
/// Room for the bounds of any histogram here, plus the +Inf bucket.
const MAX_BUCKETS: usize = 16;

/// From an event's timestamp to the hub receiving it: the worker's buffering and the network
/// (and any clock difference between the two machines), 0.5 ms to 10 s.
pub const INGEST_BOUNDS_NS: &[u64] = &[
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

/// From the hub receiving an event to a subscriber's stream taking it from its queue,
/// 50 µs to 1 s.
pub const FANOUT_BOUNDS_NS: &[u64] = &[
    50_000,
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
    1_000_000_000,
];

#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

/// A histogram of durations with fixed bucket bounds.
#[derive(Debug)]
pub struct LatencyHistogram {
    bounds_ns: &'static [u64],
    shards: Box<[Shard]>,
}

/// A histogram's totals: sum in seconds, count, and per-bucket counts with their upper bounds
/// in seconds (the last is `f64::MAX`, +Inf), as the Prometheus encoder takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub sum_seconds: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    /// # Panics
    /// If `bounds_ns` has more than 15 bounds or is not increasing (a programming error).
    pub fn new(bounds_ns: &'static [u64]) -> Self {
        assert!(bounds_ns.len() < MAX_BUCKETS, "too many buckets");
        assert!(
            bounds_ns.windows(2).all(|w| w[0] < w[1]),
            "bounds must increase"
        );
        Self {
            bounds_ns,
            shards: (0..SHARDS)
                .map(|_| Shard {
                    buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                    sum_ns: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Counts one duration of `nanos`; `shard` is any number that stays the same for one
    /// recording task (a stream's id), spreading tasks over the shards.
    #[inline]
    pub fn record(&self, shard: u64, nanos: u64) {
        // Bucket i holds durations up to and including bounds[i]; the last one, the rest.
        let bucket = self.bounds_ns.partition_point(|bound| *bound < nanos);
        #[allow(clippy::cast_possible_truncation)] // the remainder is below SHARDS
        let shard = &self.shards[(shard % SHARDS as u64) as usize];
        shard.buckets[bucket].fetch_add(1, Relaxed);
        shard.sum_ns.fetch_add(nanos, Relaxed);
    }

    /// Counts each of `durations_ns`, adding to each shared counter once for the lot: a
    /// subscriber's feed records a whole queue drain at a time.
    pub fn record_each(&self, shard: u64, durations_ns: impl IntoIterator<Item = u64>) {
        let mut counts = [0u64; MAX_BUCKETS];
        let mut sum_ns = 0u64;
        for nanos in durations_ns {
            counts[self.bounds_ns.partition_point(|bound| *bound < nanos)] += 1;
            sum_ns = sum_ns.wrapping_add(nanos);
        }
        #[allow(clippy::cast_possible_truncation)] // the remainder is below SHARDS
        let shard = &self.shards[(shard % SHARDS as u64) as usize];
        for (bucket, count) in shard.buckets.iter().zip(counts) {
            if count > 0 {
                bucket.fetch_add(count, Relaxed);
            }
        }
        shard.sum_ns.fetch_add(sum_ns, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds_ns
            .iter()
            .map(|bound| (*bound as f64 / 1e9, 0))
            .chain(std::iter::once((f64::MAX, 0)))
            .collect();
        let mut sum_ns = 0u64;
        for shard in &self.shards {
            for (total, count) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += count.load(Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Relaxed));
        }
        Snapshot {
            sum_seconds: sum_ns as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

/// Nanoseconds from `earlier_ns` to `later_ns` (Unix nanoseconds), 0 when the clocks say the
/// second came first.
#[inline]
pub fn elapsed_ns(earlier_ns: i64, later_ns: i64) -> u64 {
    u64::try_from(later_ns.saturating_sub(earlier_ns)).unwrap_or(0)
}

/// Nanoseconds since the Unix epoch (0 for times before it).
pub fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_first_bucket_that_holds_them() {
        let histogram = LatencyHistogram::new(&[10, 100]);
        for (shard, nanos) in [(0, 5), (1, 10), (2, 11), (3, 100), (17, 1000)] {
            histogram.record(shard, nanos);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 5);
        assert_eq!(
            snapshot.buckets,
            vec![(10e-9, 2), (100e-9, 2), (f64::MAX, 1)]
        );
        assert!((snapshot.sum_seconds - 1126e-9).abs() < 1e-15);
        histogram.record_each(3, [5, 5, 1000, 50]);
        let snapshot = histogram.snapshot();
        assert_eq!(
            snapshot.buckets,
            vec![(10e-9, 4), (100e-9, 3), (f64::MAX, 2)]
        );
        assert!((snapshot.sum_seconds - 2186e-9).abs() < 1e-15);
        assert_eq!(elapsed_ns(10, 5), 0);
        assert_eq!(elapsed_ns(5, 10), 5);
    }
}
