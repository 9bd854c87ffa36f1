//! The sampling decision shared by workers and the hub.
//!
//! With a sampling key the decision is a pure function of the key and the rate, so the
//! `.start` and `.stop` of one request, and every worker on its path, keep or drop it together:
//! `h = fmix64(fnv1a64(key))`, keep iff `(h >> 11) / 2^53 < rate`. The key is the event's trace
//! id when it has one (so a whole trace, across services, is kept or dropped together), else its
//! correlation id. The function is written out in `bridge.proto` so that clients in other
//! languages can implement it bit for bit. Events without a key are sampled at random.

use std::fmt;

/// A sampling rate: finite and within `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Rate(f64);

/// A rate that is not a finite number within `[0, 1]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sampling rate {0} is invalid: it must be a number from 0 to 1 (0.05 keeps 5 % of events)")]
pub struct RateError(pub String);

impl Rate {
    pub const ALL: Rate = Rate(1.0);
    pub const NONE: Rate = Rate(0.0);

    pub fn new(rate: f64) -> Result<Self, RateError> {
        if rate.is_finite() && (0.0..=1.0).contains(&rate) {
            Ok(Self(rate))
        } else {
            Err(RateError(rate.to_string()))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether to keep an event with this sampling key (none: decided at random).
    #[inline]
    pub fn keep(self, key: SamplingKey<'_>) -> bool {
        self.keep_drawing(key, draw_from_thread)
    }

    /// [`Rate::keep`] drawing from `rng` for events without a sampling key.
    #[inline]
    pub fn keep_with<R: rand::Rng + ?Sized>(self, key: SamplingKey<'_>, rng: &mut R) -> bool {
        self.keep_drawing(key, || rand::RngExt::random::<f64>(rng))
    }

    /// [`Rate::keep`] with `draw` giving a uniform number in [0, 1) when one is needed (only
    /// then: taking the thread's generator costs a thread-local access per event at rate 1).
    #[inline]
    fn keep_drawing(self, key: SamplingKey<'_>, draw: impl FnOnce() -> f64) -> bool {
        if self.0 >= 1.0 {
            true
        } else if self.0 <= 0.0 {
            false
        } else if key.is_none() {
            draw() < self.0
        } else {
            key.fraction() < self.0
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Rate {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || RateError(format!("`{}`", s.trim()));
        let value: f64 = s.trim().parse().map_err(|_| invalid())?;
        Self::new(value).map_err(|_| invalid())
    }
}

/// What an event's sampling decision is a function of: its trace id when it has one, else its
/// correlation id; with neither, the decision is random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplingKey<'a>(&'a [u8]);

impl<'a> SamplingKey<'a> {
    /// No key: decided at random.
    pub const NONE: SamplingKey<'static> = SamplingKey(&[]);

    /// The key of an event with this trace id and correlation id (either may be empty).
    #[inline]
    pub fn new(trace_id: &'a [u8], correlation_id: &'a str) -> Self {
        if trace_id.is_empty() {
            Self(correlation_id.as_bytes())
        } else {
            Self(trace_id)
        }
    }

    /// The key of an event with a correlation id and no trace id.
    #[inline]
    pub fn correlation(correlation_id: &'a str) -> Self {
        Self(correlation_id.as_bytes())
    }

    #[inline]
    pub fn is_none(self) -> bool {
        self.0.is_empty()
    }

    /// The key mapped to a fraction in `[0, 1)`, uniformly for distinct keys.
    #[inline]
    pub fn fraction(self) -> f64 {
        (hash(self.0) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How the sender of an event drew the sampling decision it already made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// [`Rate::keep`]: the sampling key's hash when there is one, at random otherwise. Workers
    /// that apply `ControlState` draw this way (bridge.proto states the hash).
    Consistent,
    /// At random for every event, ignoring sampling keys: plain clients applying
    /// `TelemetrySamplingUpdate`, such as the original telemetry-stream design's emitter.
    Independent,
}

/// How an event that arrives from elsewhere was sampled before: kept at `rate` by a draw of
/// kind `draw`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Presampled {
    rate: f64,
    pub draw: Draw,
}

impl Presampled {
    /// Not sampled before: every event like it was kept.
    pub const NOT: Presampled = Presampled {
        rate: 1.0,
        draw: Draw::Consistent,
    };

    /// Kept at `rate`; anything but a rate within (0, 1) means it was not sampled (the wire's
    /// 0 for "unset" included).
    pub fn new(rate: f64, draw: Draw) -> Self {
        let rate = if rate > 0.0 && rate < 1.0 { rate } else { 1.0 };
        Self { rate, draw }
    }

    pub fn rate(self) -> f64 {
        self.rate
    }

    /// Samples the event again so that, counting the earlier draw, it is kept with probability
    /// `target`; `Some(rate it was kept at overall)`, or `None` when it is dropped.
    ///
    /// The second draw is conditional on the first, not a draw at `target` again, which would
    /// keep `earlier × target`. After a consistent draw with a sampling key the hash is the
    /// same, so `hash < target` is already the right condition; after an independent one the
    /// hub keeps `target / earlier` of what arrived (by the hash when there is a key, so that
    /// the events of one request that got through stay together). An event kept at a
    /// lower rate than `target` is kept, at its own rate: what was dropped cannot be restored.
    #[inline]
    pub fn resample(self, target: Rate, key: SamplingKey<'_>) -> Option<Rate> {
        self.resample_drawing(target, key, draw_from_thread)
    }

    /// [`Presampled::resample`] drawing from `rng` for events without a sampling key.
    #[inline]
    pub fn resample_with<R: rand::Rng + ?Sized>(
        self,
        target: Rate,
        key: SamplingKey<'_>,
        rng: &mut R,
    ) -> Option<Rate> {
        self.resample_drawing(target, key, || rand::RngExt::random::<f64>(rng))
    }

    #[inline]
    fn resample_drawing(
        self,
        target: Rate,
        key: SamplingKey<'_>,
        draw: impl FnOnce() -> f64,
    ) -> Option<Rate> {
        if target.0 >= self.rate {
            return Some(Rate(self.rate));
        }
        let keep = if self.rate >= 1.0 || (self.draw == Draw::Consistent && !key.is_none()) {
            target.keep_drawing(key, draw)
        } else {
            Rate(target.0 / self.rate).keep_drawing(key, draw)
        };
        keep.then_some(target)
    }
}

/// A uniform number in [0, 1) from the thread's generator.
fn draw_from_thread() -> f64 {
    rand::RngExt::random::<f64>(&mut rand::rng())
}

/// `fmix64(fnv1a64(bytes))`, the hash sampling decisions are made on.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(bytes))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// MurmurHash3's finaliser: FNV-1a alone leaves the high bits of ids that differ only in their
/// last characters (`req-1`, `req-2`) nearly equal, which would sample them together.
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(r: f64) -> Rate {
        Rate::new(r).unwrap()
    }

    fn id(id: &str) -> SamplingKey<'_> {
        SamplingKey::correlation(id)
    }

    #[test]
    fn rejects_rates_outside_zero_to_one() {
        for bad in [1.5, -0.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(Rate::new(bad).is_err(), "{bad}");
        }
        assert!("nan".parse::<Rate>().is_err());
        assert!("1.5".parse::<Rate>().is_err());
        assert!(
            "abc"
                .parse::<Rate>()
                .unwrap_err()
                .to_string()
                .contains("abc")
        );
        assert_eq!("0.25".parse::<Rate>().unwrap().get(), 0.25);
        assert!(Rate::new(0.0).is_ok() && Rate::new(1.0).is_ok());
    }

    #[test]
    fn decision_is_deterministic_per_correlation_id() {
        for id in [
            "req-1",
            "req-2",
            "a",
            "0b2c6f9e-1f1e-4b0e-9d55-5c7d86d0c0de",
        ] {
            for r in [0.01, 0.3, 0.5, 0.99] {
                let first = rate(r).keep(self::id(id));
                assert!(
                    (0..20).all(|_| rate(r).keep(self::id(id)) == first),
                    "{id} at {r}"
                );
            }
        }
    }

    #[test]
    fn a_kept_id_stays_kept_at_higher_rates() {
        for i in 0..1000 {
            let id = format!("req-{i}");
            if rate(0.2).keep(self::id(&id)) {
                assert!(rate(0.5).keep(self::id(&id)));
            }
        }
    }

    #[test]
    fn zero_keeps_nothing_and_one_keeps_everything() {
        for i in 0..10_000 {
            let id = format!("req-{i}");
            assert!(!Rate::NONE.keep(self::id(&id)));
            assert!(Rate::ALL.keep(self::id(&id)));
        }
        assert!((0..1000).all(|_| !Rate::NONE.keep(SamplingKey::NONE)));
        assert!((0..1000).all(|_| Rate::ALL.keep(SamplingKey::NONE)));
    }

    /// With n = 100,000 ids the kept count is Binomial(n, r); six standard deviations make a
    /// false failure practically impossible while still catching a biased hash.
    #[test]
    fn kept_fraction_of_sequential_ids_is_within_statistical_bounds() {
        let n = 100_000;
        for r in [0.01, 0.1, 0.25, 0.5, 0.9] {
            let kept = (0..n)
                .filter(|i| rate(r).keep(id(&format!("req-{i}"))))
                .count() as f64;
            let sd = (n as f64 * r * (1.0 - r)).sqrt();
            assert!(
                (kept - n as f64 * r).abs() < 6.0 * sd,
                "rate {r}: kept {kept} of {n}"
            );
        }
    }

    #[test]
    fn kept_fraction_without_correlation_id_is_within_statistical_bounds() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let n = 100_000;
        for r in [0.05, 0.5, 0.8] {
            let kept = (0..n)
                .filter(|_| rate(r).keep_with(SamplingKey::NONE, &mut rng))
                .count() as f64;
            let sd = (n as f64 * r * (1.0 - r)).sqrt();
            assert!(
                (kept - n as f64 * r).abs() < 6.0 * sd,
                "rate {r}: kept {kept}"
            );
        }
    }

    #[test]
    fn an_event_not_sampled_before_is_sampled_as_usual() {
        for draw in [Draw::Consistent, Draw::Independent] {
            for earlier in [0.0, 1.0, f64::NAN, 7.0] {
                let before = Presampled::new(earlier, draw);
                for i in 0..1000 {
                    let id = format!("req-{i}");
                    let kept = before.resample(rate(0.3), self::id(&id));
                    assert_eq!(kept.is_some(), rate(0.3).keep(self::id(&id)), "{id}");
                    assert!(kept.is_none_or(|r| r == rate(0.3)));
                }
            }
        }
    }

    #[test]
    fn an_event_kept_below_the_target_is_kept_at_its_own_rate() {
        for draw in [Draw::Consistent, Draw::Independent] {
            let before = Presampled::new(0.1, draw);
            assert_eq!(before.resample(rate(0.5), id("id")), Some(rate(0.1)));
            assert_eq!(
                before.resample(rate(0.1), SamplingKey::NONE),
                Some(rate(0.1))
            );
        }
    }

    /// The sender keeps `earlier` of n events, then the second draw: overall `target` of them
    /// must survive, not `earlier × target` (six standard deviations, as above).
    #[test]
    fn two_draws_compose_to_the_target_rate() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let n = 200_000;
        for (earlier, target) in [(0.5, 0.1), (0.2, 0.15), (1.0, 0.3)] {
            for draw in [Draw::Consistent, Draw::Independent] {
                for with_id in [true, false] {
                    let before = Presampled::new(earlier, draw);
                    let kept = (0..n)
                        .filter(|i| {
                            let id = if with_id {
                                format!("req-{i}")
                            } else {
                                String::new()
                            };
                            let first = match draw {
                                Draw::Consistent => {
                                    rate(earlier).keep_with(self::id(&id), &mut rng)
                                }
                                Draw::Independent => rng.random::<f64>() < earlier,
                            };
                            first
                                && before
                                    .resample_with(rate(target), self::id(&id), &mut rng)
                                    .is_some()
                        })
                        .count() as f64;
                    let sd = (n as f64 * target * (1.0 - target)).sqrt();
                    assert!(
                        (kept - n as f64 * target).abs() < 6.0 * sd,
                        "{draw:?} {earlier} then {target} (ids: {with_id}): kept {kept} of {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn after_an_independent_draw_the_events_of_one_request_stay_together() {
        let before = Presampled::new(0.5, Draw::Independent);
        for i in 0..1000 {
            let id = format!("req-{i}");
            let first = before.resample(rate(0.2), self::id(&id));
            assert!((0..5).all(|_| before.resample(rate(0.2), self::id(&id)) == first));
        }
    }

    #[test]
    fn hash_matches_the_published_reference_values() {
        // Pinned so a change to the function, which would split requests between workers
        // running different versions, cannot go unnoticed.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fmix64(0), 0);
        let f = id("req-1").fraction();
        assert!((0.0..1.0).contains(&f));
    }

    /// A trace id, when there is one, is the key: events of one trace with different
    /// correlation ids (a gateway's and a model server's) are decided alike.
    #[test]
    fn the_trace_id_wins_over_the_correlation_id() {
        let trace = [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36,
        ];
        assert_eq!(
            SamplingKey::new(&trace, "req-1"),
            SamplingKey::new(&trace, "other")
        );
        assert_eq!(SamplingKey::new(&[], "req-1"), id("req-1"));
        assert!(SamplingKey::new(&[], "").is_none());
        for r in [0.1, 0.5, 0.9] {
            let first = rate(r).keep(SamplingKey::new(&trace, "a"));
            assert_eq!(rate(r).keep(SamplingKey::new(&trace, "b")), first);
        }
    }
}
