//! Wall-clock timestamps for events, read from the CPU's time-stamp counter.
//!
//! Reading the system clock costs about 45 ns through `SystemTime` (35 of them in the vDSO),
//! a fifth of a queued `emit`. Where the kernel itself keeps time with the TSC (its clocksource
//! is `tsc`: invariant, and checked to agree across CPUs), this reads the counter instead
//! (about 13 ns) and adds the nanoseconds since an anchor: a reading of the system clock
//! together with the counter, taken again once the anchor is [`REANCHOR_NS`] old, so that the
//! counter's calibration error (parts per million) never adds up to more than a few
//! nanoseconds, and a step of the system clock shows within a millisecond. Elsewhere it reads the
//! system clock, as before.

use std::{
    cell::Cell,
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

/// How old an anchor may get before the system clock is read again.
const REANCHOR_NS: u64 = 1_000_000;

/// The longest an anchor's two counter readings may lie apart: a reading interrupted (the
/// thread preempted between the counter and the system clock) would put the anchor off by as
/// long as the interruption, so it is taken again.
const ANCHOR_GAP_NS: u64 = 1_000;

/// The counter, calibrated against the monotonic clock; `None` where the kernel does not keep
/// time with it.
static COUNTER: OnceLock<Option<quanta::Clock>> = OnceLock::new();

thread_local! {
    static ANCHOR: Cell<Anchor> = const { Cell::new(Anchor { ticks: 0, unix_ns: 0 }) };
}

/// A system-clock reading and the counter at that moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Anchor {
    ticks: u64,
    unix_ns: i64,
}

impl Anchor {
    /// The time `ticks` stands for, if this anchor is recent enough to say; `nanos` converts a
    /// span of ticks. A counter behind the anchor (read on another CPU) is not trusted.
    #[inline]
    fn extend(self, ticks: u64, nanos: impl FnOnce(u64) -> u64) -> Option<i64> {
        if self.unix_ns == 0 || ticks < self.ticks {
            return None;
        }
        let since = nanos(ticks - self.ticks);
        (since < REANCHOR_NS).then(|| self.unix_ns + since as i64)
    }
}

/// Calibrates the counter (about half a millisecond, once per process), so that no `emit` pays
/// for it. Emitters call it when they are made.
pub(crate) fn init() {
    COUNTER.get_or_init(|| kernel_uses_tsc().then(quanta::Clock::new));
}

/// Whether the kernel keeps time with the TSC: then it has found the counter invariant and in
/// step across CPUs, and watches that it stays so.
fn kernel_uses_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|source| source.trim() == "tsc")
}

/// Nanoseconds since the Unix epoch.
#[inline]
pub fn now_ns() -> i64 {
    match COUNTER.get() {
        Some(Some(counter)) => from_counter(counter),
        _ => system_ns(),
    }
}

#[inline]
fn from_counter(counter: &quanta::Clock) -> i64 {
    let ticks = counter.raw();
    let anchor = ANCHOR.with(Cell::get);
    match anchor.extend(ticks, |span| counter.delta_as_nanos(0, span)) {
        Some(now) => now,
        None => reanchor(counter),
    }
}

#[cold]
fn reanchor(counter: &quanta::Clock) -> i64 {
    let anchor = read_anchor(
        || counter.raw(),
        |from, to| counter.delta_as_nanos(from, to),
        system_ns,
    );
    ANCHOR.with(|cell| cell.set(anchor));
    anchor.unix_ns
}

/// Reads the system clock between two readings of the counter, and takes the counter halfway
/// between them; again if they lie too far apart, up to a few times.
fn read_anchor(
    mut ticks: impl FnMut() -> u64,
    nanos: impl Fn(u64, u64) -> u64,
    mut wall: impl FnMut() -> i64,
) -> Anchor {
    let mut tries = 0;
    loop {
        let before = ticks();
        let unix_ns = wall();
        let after = ticks();
        tries += 1;
        if after >= before && (nanos(before, after) <= ANCHOR_GAP_NS || tries == 4) {
            return Anchor {
                ticks: before + (after - before) / 2,
                unix_ns,
            };
        }
    }
}

fn system_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reading lies between the system clock's readings around it, give or take a few
    /// microseconds, over several anchors.
    #[test]
    fn agrees_with_the_system_clock() {
        init();
        let mut worst = 0;
        for _ in 0..200_000 {
            let before = system_ns();
            let now = now_ns();
            let after = system_ns();
            let off = (before - now).max(now - after).max(0);
            worst = worst.max(off);
        }
        assert!(worst < 20_000, "off by {worst} ns");
    }

    /// A step of the system clock is followed once the anchor is a millisecond old; until then
    /// the counter carries on from the old anchor.
    #[test]
    fn an_anchor_lasts_a_millisecond() {
        let anchor = Anchor {
            ticks: 1_000,
            unix_ns: 5_000_000,
        };
        let ns = |ticks| ticks * 2;
        assert_eq!(anchor.extend(1_000, ns), Some(5_000_000));
        assert_eq!(anchor.extend(1_100, ns), Some(5_000_200));
        assert_eq!(anchor.extend(1_000 + 499_999, ns), Some(5_999_998));
        assert_eq!(anchor.extend(1_000 + 500_000, ns), None, "too old");
        assert_eq!(anchor.extend(999, ns), None, "a counter behind the anchor");
        let none = Anchor {
            ticks: 0,
            unix_ns: 0,
        };
        assert_eq!(none.extend(7, ns), None, "no anchor yet");
    }

    /// An anchor whose readings were far apart (the thread was preempted between them) is
    /// read again.
    #[test]
    fn an_interrupted_anchor_is_read_again() {
        let mut counter = [100, 90_100, 200, 300].into_iter();
        let mut wall = [7, 8].into_iter();
        let anchor = read_anchor(
            || counter.next().unwrap(),
            |from, to| to - from,
            || wall.next().unwrap(),
        );
        assert_eq!(
            anchor,
            Anchor {
                ticks: 250,
                unix_ns: 8
            }
        );
    }
}
