//! What happened to every event a worker produced.
//!
//! The accounting rule: `produced = queued + sampled_out + filtered + disabled + dropped`
//! (by reason), and of the queued ones `sent` have been handed to the hub. Only outcomes are
//! counted, never `produced` itself, so an emit touches one counter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why an event was dropped after it passed toggle, filters and sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue to the hub was full.
    QueueFull,
    /// The event name is malformed.
    InvalidName,
    /// The emitter was closed.
    Closed,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    queued: AtomicU64,
    sent: AtomicU64,
    sampled_out: AtomicU64,
    filtered: AtomicU64,
    disabled: AtomicU64,
    queue_full: AtomicU64,
    invalid_name: AtomicU64,
    closed: AtomicU64,
}

impl Counters {
    #[inline]
    pub(crate) fn queued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }
    #[inline]
    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }
    #[inline]
    pub(crate) fn sampled_out(&self) {
        self.sampled_out.fetch_add(1, Relaxed);
    }
    #[inline]
    pub(crate) fn filtered(&self) {
        self.filtered.fetch_add(1, Relaxed);
    }
    #[inline]
    pub(crate) fn disabled(&self) {
        self.disabled.fetch_add(1, Relaxed);
    }
    #[inline]
    pub(crate) fn dropped(&self, reason: DropReason) {
        match reason {
            DropReason::QueueFull => &self.queue_full,
            DropReason::InvalidName => &self.invalid_name,
            DropReason::Closed => &self.closed,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            queued: self.queued.load(Relaxed),
            sent: self.sent.load(Relaxed),
            sampled_out: self.sampled_out.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            disabled: self.disabled.load(Relaxed),
            dropped_queue_full: self.queue_full.load(Relaxed),
            dropped_invalid_name: self.invalid_name.load(Relaxed),
            dropped_closed: self.closed.load(Relaxed),
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub queued: u64,
    pub sent: u64,
    pub sampled_out: u64,
    pub filtered: u64,
    pub disabled: u64,
    pub dropped_queue_full: u64,
    pub dropped_invalid_name: u64,
    pub dropped_closed: u64,
}

impl Snapshot {
    /// Every event emitted, whatever became of it.
    pub fn produced(&self) -> u64 {
        self.queued
            + self.sampled_out
            + self.filtered
            + self.disabled
            + self.dropped_queue_full
            + self.dropped_invalid_name
            + self.dropped_closed
    }

    /// The counters as `bridge.worker.stats` measurements.
    pub fn measurements(&self) -> [(&'static str, u64); 9] {
        [
            ("produced", self.produced()),
            ("queued", self.queued),
            ("sent", self.sent),
            ("sampled_out", self.sampled_out),
            ("filtered", self.filtered),
            ("disabled", self.disabled),
            ("dropped.queue_full", self.dropped_queue_full),
            ("dropped.invalid_name", self.dropped_invalid_name),
            ("dropped.closed", self.dropped_closed),
        ]
    }
}
