//! The common control state — no rules, no filters — kept in plain atomics, so that `emit`
//! decides with a few loads instead of reaching through the shared state's pointer.
//!
//! A sequence lock keeps the rate and the version consistent: readers retry while a (rare)
//! write is in progress.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering, fence},
};

use bridge_proto::{control::ControlState, sampling::Rate};

#[derive(Debug, Default)]
pub(crate) struct FastControl {
    sequence: AtomicU64,
    simple: AtomicBool,
    rate: AtomicU64,
    version: AtomicU64,
    writing: Mutex<()>,
}

impl FastControl {
    pub(crate) fn store(&self, state: &ControlState) {
        let _writer = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.sequence.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        let simple = state.rules().is_empty() && state.allow.is_empty() && state.block.is_empty();
        self.simple.store(simple, Ordering::Relaxed);
        self.rate
            .store(state.default_rate.get().to_bits(), Ordering::Relaxed);
        self.version.store(state.version, Ordering::Relaxed);
        self.sequence.fetch_add(1, Ordering::Release);
    }

    /// The rate and version, when the state is simple enough for them to decide alone.
    #[inline]
    pub(crate) fn load(&self) -> Option<(Rate, u64)> {
        loop {
            let before = self.sequence.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let simple = self.simple.load(Ordering::Relaxed);
            let rate = self.rate.load(Ordering::Relaxed);
            let version = self.version.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Relaxed) == before {
                return simple
                    .then(|| Rate::new(f64::from_bits(rate)).ok().map(|r| (r, version)))
                    .flatten();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::{control::SamplingRule, pattern::Pattern};

    #[test]
    fn simple_states_only() {
        let fast = FastControl::default();
        assert_eq!(fast.load(), None, "nothing stored yet is not simple");
        fast.store(&ControlState::new(
            3,
            true,
            Rate::new(0.25).unwrap(),
            vec![],
            vec![],
            vec![],
        ));
        assert_eq!(fast.load(), Some((Rate::new(0.25).unwrap(), 3)));
        let rule = SamplingRule {
            pattern: Pattern::parse("a.*").unwrap(),
            rate: Rate::NONE,
        };
        fast.store(&ControlState::new(
            4,
            true,
            Rate::ALL,
            vec![rule],
            vec![],
            vec![],
        ));
        assert_eq!(fast.load(), None);
    }
}
