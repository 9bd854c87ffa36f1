//! A target event rate for a level: the hub keeps choosing the level's sampling rate so that
//! the events delivered from its workers approach the goal while the offered load moves.
//!
//! Each adjustment estimates the offered load from what was delivered over the last period
//! at the rate in force (`delivered / rate`), and moves the rate toward `goal / offered`. The
//! move is damped (a weighted geometric mean of the old rate and that ideal one), because the
//! estimate is noisy, and skipped when delivery is already within a band around the goal, so
//! a steady load does not make a new control version every period. Trace and correlation
//! consistency hold as for any rate: it is still one rate per level at a time.

use std::time::Duration;

use bridge_proto::sampling::Rate;

pub use crate::event_rate::{EventRate, EventRateError};

/// How often a target level's rate may change. A period must also be long enough to count
/// what the workers delivered at the last rate chosen, after they applied it.
pub const ADJUST_EVERY: Duration = Duration::from_secs(3);

/// The weight of the ideal rate in each move (in log space): 0.6 closes most of a tenfold
/// gap in three periods without overshooting on a noisy estimate.
const STEP: f64 = 0.6;

/// Delivery within this fraction of the goal leaves the rate alone.
const BAND: f64 = 0.1;

/// The least rate chosen, so that a level under a goal always shows some of its events and
/// the estimate of its load never rests on nothing.
const MIN_RATE: f64 = 1e-6;

/// The rate to set after a period in which the level's workers delivered `delivered` events
/// per second at `current`; `None` to leave it as it is.
///
/// Nothing delivered at all says little of the load, except that a rate this low kept none
/// of it: the rate doubles, so an idle level drifts back to 1 and a quiet one is found again.
pub fn next_rate(current: Rate, delivered_per_second: f64, goal: EventRate) -> Option<Rate> {
    let rate = current.get().max(MIN_RATE);
    let goal = goal.get();
    let next = if delivered_per_second <= 0.0 || !delivered_per_second.is_finite() {
        rate * 2.0
    } else {
        if (delivered_per_second - goal).abs() <= BAND * goal {
            return None;
        }
        let ideal = goal * rate / delivered_per_second;
        rate.powf(1.0 - STEP) * ideal.powf(STEP)
    };
    let next = round_to_significant(next.clamp(MIN_RATE, 1.0), 3);
    (next != current.get())
        .then(|| Rate::new(next).ok())
        .flatten()
}

/// Rates people read in `bridge control`: three significant digits are all the estimate
/// carries.
fn round_to_significant(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits - 1 - value.log10().floor() as i32);
    ((value * scale).round() / scale).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goal(per_second: f64) -> EventRate {
        EventRate::per_second(per_second).unwrap()
    }

    /// Runs the controller against a load offering `offered` events/s, from `rate`, for
    /// `periods` periods; returns the delivered rate of each period.
    fn run(offered: f64, mut rate: Rate, target: EventRate, periods: usize) -> (Rate, Vec<f64>) {
        let mut delivered = Vec::new();
        for _ in 0..periods {
            let now = offered * rate.get();
            delivered.push(now);
            if let Some(next) = next_rate(rate, now, target) {
                rate = next;
            }
        }
        (rate, delivered)
    }

    #[test]
    fn settles_within_the_band_in_a_few_periods_and_follows_a_doubled_load() {
        // The case: 600/s offered, goal 60/s, within 40–80/s inside 15 s (5 periods).
        let (rate, delivered) = run(600.0, Rate::ALL, goal(60.0), 5);
        let last = *delivered.last().unwrap();
        assert!((40.0..=80.0).contains(&last), "{delivered:?}");
        let (_, doubled) = run(1200.0, rate, goal(60.0), 5);
        let last = *doubled.last().unwrap();
        assert!((40.0..=80.0).contains(&last), "{doubled:?}");
    }

    #[test]
    fn a_steady_load_near_the_goal_changes_nothing() {
        assert_eq!(next_rate(Rate::new(0.1).unwrap(), 63.0, goal(60.0)), None);
        assert_eq!(next_rate(Rate::ALL, 20.0, goal(60.0)), None, "already at 1");
    }

    #[test]
    fn a_quiet_level_drifts_back_up_and_never_goes_to_zero() {
        let next = next_rate(Rate::new(0.2).unwrap(), 0.0, goal(60.0)).unwrap();
        assert_eq!(next.get(), 0.4);
        let floor = next_rate(Rate::new(1e-6).unwrap(), 1e12, goal(1.0)).unwrap_or(Rate::ALL);
        assert!(floor.get() >= MIN_RATE);
        let zero = next_rate(Rate::NONE, 0.0, goal(1.0)).unwrap();
        assert!(zero.get() > 0.0);
    }

    #[test]
    fn rates_are_rounded_for_people() {
        assert_eq!(round_to_significant(0.123456, 3), 0.123);
        assert_eq!(round_to_significant(0.000123456, 3), 0.000123);
        assert_eq!(round_to_significant(0.9996, 3), 1.0);
    }
}
