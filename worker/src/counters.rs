//! What happened to every event a worker produced.
//!
//! The accounting rule: `produced = accepted + sampled_out + filtered + disabled + invalid`
//! (invalid: a malformed name or TELEMETRY line, a TELEMETRY line too long to hold, or an event
//! over the hub's limits), and of the accepted events each is, in the end, `confirmed` by the
//! hub, `dropped.buffer_full`, or dropped from the buffer as over the hub's limits; the rest are
//! still buffered. Only outcomes are counted, never `produced` itself, so an emit
//! touches one counter. What becomes of accepted events is counted by the outage buffer, under
//! its lock (`buffer::Counts`), so that an accepted event costs no atomic operation of its own
//! and a snapshot's accepted, confirmed, dropped and buffered always add up.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::buffer::Counts;

/// Why an event was not accepted. (Accepted events dropped later, to make room in the buffer
/// or as over the hub's limits when about to be sent, are counted by the buffer.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The event name is malformed.
    InvalidName,
    /// A `TELEMETRY:` line that is not valid JSON of the expected shape.
    ParseError,
    /// A `TELEMETRY:` line longer than the sidecar holds (`worker.max_line_bytes`). Apart from
    /// `ParseError` because its fix differs: a larger cap or smaller events, not better JSON.
    LineTooLong,
    /// A relayed event with a trace or span id the hub would refuse (wrong length, all zero).
    InvalidTraceContext,
    /// Over the hub's limits (`bridge_proto::limits`), so never buffered.
    OverLimit,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    replayed: AtomicU64,
    sampled_out: AtomicU64,
    filtered: AtomicU64,
    disabled: AtomicU64,
    invalid_name: AtomicU64,
    parse_error: AtomicU64,
    line_too_long: AtomicU64,
    invalid_trace_context: AtomicU64,
    over_limit: AtomicU64,
}

macro_rules! bump {
    ($($name:ident),*) => {$(
        #[inline]
        pub(crate) fn $name(&self) {
            self.$name.fetch_add(1, Relaxed);
        }
    )*};
}

impl Counters {
    bump!(sampled_out, filtered, disabled);

    pub(crate) fn sent(&self, count: usize) {
        self.sent.fetch_add(count as u64, Relaxed);
    }

    pub(crate) fn replayed(&self, count: usize) {
        self.replayed.fetch_add(count as u64, Relaxed);
    }

    #[inline]
    pub(crate) fn dropped(&self, reason: DropReason) {
        match reason {
            DropReason::InvalidName => &self.invalid_name,
            DropReason::ParseError => &self.parse_error,
            DropReason::LineTooLong => &self.line_too_long,
            DropReason::InvalidTraceContext => &self.invalid_trace_context,
            DropReason::OverLimit => &self.over_limit,
        }
        .fetch_add(1, Relaxed);
    }

    /// These counters with what the buffer counted (`buffer`, read once).
    pub(crate) fn snapshot(&self, buffer: Counts) -> Snapshot {
        Snapshot {
            accepted: buffer.accepted,
            sent: self.sent.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            confirmed: buffer.confirmed,
            sampled_out: self.sampled_out.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            disabled: self.disabled.load(Relaxed),
            dropped_buffer_full: buffer.dropped_full,
            dropped_invalid_name: self.invalid_name.load(Relaxed),
            dropped_parse_error: self.parse_error.load(Relaxed),
            dropped_line_too_long: self.line_too_long.load(Relaxed),
            dropped_invalid_trace_context: self.invalid_trace_context.load(Relaxed),
            dropped_over_limit: self.over_limit.load(Relaxed),
            dropped_over_limit_buffered: buffer.dropped_over_limit,
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Numbered and buffered for the hub.
    pub accepted: u64,
    /// Handed to a stream, replays included.
    pub sent: u64,
    /// Sent again after a reconnect because the hub had not confirmed them.
    pub replayed: u64,
    /// Confirmed received by the hub.
    pub confirmed: u64,
    pub sampled_out: u64,
    pub filtered: u64,
    pub disabled: u64,
    pub dropped_buffer_full: u64,
    pub dropped_invalid_name: u64,
    pub dropped_parse_error: u64,
    pub dropped_line_too_long: u64,
    pub dropped_invalid_trace_context: u64,
    /// Over the hub's limits, never buffered.
    pub dropped_over_limit: u64,
    /// Accepted, then dropped from the buffer as over the hub's limits instead of being sent.
    pub dropped_over_limit_buffered: u64,
}

impl Snapshot {
    /// Every event emitted, whatever became of it.
    pub fn produced(&self) -> u64 {
        self.accepted
            + self.sampled_out
            + self.filtered
            + self.disabled
            + self.dropped_invalid_name
            + self.dropped_parse_error
            + self.dropped_line_too_long
            + self.dropped_invalid_trace_context
            + self.dropped_over_limit
    }

    /// Accepted events neither confirmed nor dropped: still in the buffer.
    pub fn buffered(&self) -> u64 {
        self.accepted.saturating_sub(
            self.confirmed + self.dropped_buffer_full + self.dropped_over_limit_buffered,
        )
    }

    /// The counters as `bridge.worker.stats` measurements.
    pub fn measurements(&self) -> [(&'static str, u64); 15] {
        use bridge_proto::protocol::counters as key;
        [
            (key::PRODUCED, self.produced()),
            (key::ACCEPTED, self.accepted),
            (key::SENT, self.sent),
            (key::REPLAYED, self.replayed),
            (key::CONFIRMED, self.confirmed),
            (key::BUFFERED, self.buffered()),
            (key::SAMPLED_OUT, self.sampled_out),
            (key::FILTERED, self.filtered),
            (key::DISABLED, self.disabled),
            (key::DROPPED_BUFFER_FULL, self.dropped_buffer_full),
            (key::DROPPED_INVALID_NAME, self.dropped_invalid_name),
            (key::DROPPED_PARSE_ERROR, self.dropped_parse_error),
            (key::DROPPED_LINE_TOO_LONG, self.dropped_line_too_long),
            (
                key::DROPPED_INVALID_TRACE_CONTEXT,
                self.dropped_invalid_trace_context,
            ),
            (
                key::DROPPED_OVER_LIMIT,
                self.dropped_over_limit + self.dropped_over_limit_buffered,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counter the contract documents is reported, and nothing else.
    #[test]
    fn reports_exactly_the_documented_counters() {
        let keys = Snapshot::default().measurements().map(|(key, _)| key);
        assert_eq!(keys, bridge_proto::protocol::counters::ALL);
    }
}
