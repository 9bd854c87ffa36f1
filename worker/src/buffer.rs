//! The outage buffer: events a worker accepted, in sequence order, until the hub confirms them.
//!
//! Every accepted event gets the next sequence number and is kept, encoded, until the hub's
//! cumulative receipt covers it. A stream sends what it has not sent yet; after a reconnect the
//! next stream starts again from the oldest unconfirmed event, so a hub that died mid-stream
//! loses nothing it did not confirm. The buffer is bounded: when full, the oldest event is
//! dropped and counted, leaving a gap in the sequence that the hub and subscribers can see.
//!
//! Events are written, once, into shared 64 KiB chunks, and the buffer notes where each lies.
//! Accepting one takes no reference count and allocates nothing: the bytes written since the
//! last hand-over become one shared [`Bytes`] when the link takes events to send (or a chunk
//! fills), and each event it sends is a slice of that. A chunk is freed when the last event in it
//! is confirmed or dropped.
//!
//! What became of the accepted events is counted here, under the same lock, so that accepted =
//! confirmed + dropped + kept holds in every [`Counts`] read.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use bridge_proto::{encoded::EncodedEvent, fields::telemetry_event::SEQUENCE};
use bytes::{Bytes, BytesMut};
use prost::encoding::{WireType, encoded_len_varint};
use tokio::sync::Notify;

use crate::encode::Writer;

/// Size of the chunks events are written into.
const ARENA_CHUNK: usize = 64 * 1024;

/// Where an event's bytes lie in the stream of everything written: a byte's position counts
/// every byte written before it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sequence: u64,
    at: u64,
    len: usize,
}

#[derive(Debug)]
struct Inner {
    /// Unconfirmed events, oldest first.
    events: VecDeque<Entry>,
    /// Written bytes already shared, oldest first, each with the position of its first byte.
    sealed: VecDeque<(u64, Bytes)>,
    /// Where events are written; its first byte is at position `open_at`.
    open: BytesMut,
    open_at: u64,
    next_sequence: u64,
    /// How many of the newest events the current stream has not sent yet.
    unsent: usize,
    capacity: usize,
    counts: Counts,
}

/// What became of the events the buffer accepted, counted as it happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub accepted: u64,
    pub confirmed: u64,
    /// The oldest, dropped to make room.
    pub dropped_full: u64,
    /// Found larger than the hub's message limit when about to be sent.
    pub dropped_over_limit: u64,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pushed {
    pub sequence: u64,
    /// The oldest event was dropped to make room.
    pub evicted: bool,
}

#[derive(Debug)]
pub(crate) struct Buffer {
    inner: Mutex<Inner>,
    /// Woken when there is something new to send.
    pub(crate) ready: Notify,
    /// Woken (by the link, once it has counted them) when the hub confirmed events.
    pub(crate) confirmed: Notify,
}

impl Inner {
    /// Shares what was written since the last time, so that slices of it can be handed out.
    fn seal(&mut self) {
        if !self.open.is_empty() {
            let bytes = self.open.split().freeze();
            let at = self.open_at;
            self.open_at += bytes.len() as u64;
            self.sealed.push_back((at, bytes));
        }
    }

    /// The bytes of a kept event (sealed first if they were not).
    fn bytes(&mut self, entry: Entry) -> EncodedEvent {
        if entry.at >= self.open_at {
            self.seal();
        }
        let index = self.sealed.partition_point(|(at, _)| *at <= entry.at) - 1;
        let (at, bytes) = &self.sealed[index];
        let start = (entry.at - at) as usize;
        EncodedEvent::from_bytes(bytes.slice(start..start + entry.len))
    }

    /// Frees the chunks no kept event lies in any more.
    fn release(&mut self) {
        match self.events.front() {
            Some(oldest) => {
                while self
                    .sealed
                    .front()
                    .is_some_and(|(at, bytes)| at + bytes.len() as u64 <= oldest.at)
                {
                    self.sealed.pop_front();
                }
            }
            None => {
                self.sealed.clear();
                self.open_at += self.open.len() as u64;
                self.open.clear();
            }
        }
    }
}

impl Buffer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                events: VecDeque::with_capacity(capacity.clamp(1, 4096)),
                sealed: VecDeque::new(),
                open: BytesMut::with_capacity(ARENA_CHUNK),
                open_at: 0,
                next_sequence: 1,
                unsent: 0,
                capacity: capacity.max(1),
                counts: Counts::default(),
            }),
            ready: Notify::new(),
            confirmed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers an event and keeps it: `write` writes its encoding, exactly `len` bytes and
    /// without a sequence number, straight into the buffer.
    #[inline]
    pub(crate) fn push(&self, len: usize, write: impl FnOnce(&mut Writer<'_>)) -> Pushed {
        let pushed = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let sequence = inner.next_sequence;
            inner.next_sequence += 1;
            let total = len + 1 + encoded_len_varint(sequence);
            if inner.open.capacity() - inner.open.len() < total {
                inner.seal();
                inner.open.reserve(total.max(ARENA_CHUNK));
            }
            let start = inner.open.len();
            inner.open.resize(start + total, 0);
            let mut out = Writer::new(&mut inner.open[start..]);
            write(&mut out);
            debug_assert_eq!(out.written(), len, "the length given is the length written");
            out.varint(u64::from((SEQUENCE << 3) | WireType::Varint as u32));
            out.varint(sequence);
            inner.events.push_back(Entry {
                sequence,
                at: inner.open_at + start as u64,
                len: total,
            });
            inner.counts.accepted += 1;
            inner.unsent += 1;
            let evicted = inner.events.len() > inner.capacity;
            if evicted {
                inner.events.pop_front();
                inner.counts.dropped_full += 1;
                inner.unsent = inner.unsent.min(inner.events.len());
                inner.release();
            }
            Pushed { sequence, evicted }
        };
        self.ready.notify_one();
        pushed
    }

    /// Up to `max` events the current stream has not sent, oldest first.
    #[cfg(test)]
    pub(crate) fn take_unsent(&self, max: usize) -> Vec<EncodedEvent> {
        self.take_unsent_within(max, usize::MAX).0
    }

    /// Up to `max` events the current stream has not sent, oldest first, and how many events
    /// were dropped instead because they are longer than `max_bytes` (the hub's message limit,
    /// which they were buffered before the worker knew): sent, such an event would end the
    /// stream, and be replayed to end the next one.
    pub(crate) fn take_unsent_within(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> (Vec<EncodedEvent>, usize) {
        let mut inner = self.lock();
        let mut dropped = 0;
        let mut batch = Vec::with_capacity(inner.unsent.min(max));
        while batch.len() < max && inner.unsent > 0 {
            let at = inner.events.len() - inner.unsent;
            let entry = inner.events[at];
            if entry.len > max_bytes {
                inner.events.remove(at);
                dropped += 1;
            } else {
                let event = inner.bytes(entry);
                batch.push(event);
            }
            inner.unsent -= 1;
        }
        if dropped > 0 {
            inner.counts.dropped_over_limit += dropped as u64;
            inner.release();
        }
        (batch, dropped)
    }

    /// Forgets events the hub confirmed; returns how many.
    pub(crate) fn confirm(&self, through_sequence: u64) -> usize {
        let mut inner = self.lock();
        let before = inner.events.len();
        while inner
            .events
            .front()
            .is_some_and(|entry| entry.sequence <= through_sequence)
        {
            inner.events.pop_front();
        }
        inner.unsent = inner.unsent.min(inner.events.len());
        let confirmed = before - inner.events.len();
        inner.counts.confirmed += confirmed as u64;
        inner.release();
        confirmed
    }

    /// Makes every unconfirmed event unsent again, for the next stream to replay.
    pub(crate) fn rewind(&self) -> usize {
        let mut inner = self.lock();
        let replay = inner.events.len() - inner.unsent;
        inner.unsent = inner.events.len();
        replay
    }

    /// Events kept (sent or not) that the hub has not confirmed.
    pub(crate) fn unconfirmed(&self) -> usize {
        self.lock().events.len()
    }

    /// What became of the events accepted so far.
    pub(crate) fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Copies of the kept events, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<EncodedEvent> {
        let mut inner = self.lock();
        let entries: Vec<Entry> = inner.events.iter().copied().collect();
        entries.into_iter().map(|e| inner.bytes(e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::v1::TelemetryEvent;
    use proptest::prelude::*;
    use prost::Message;

    fn event(name: &str) -> Vec<u8> {
        TelemetryEvent {
            event_parts: vec![name.into()],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn push(buffer: &Buffer, encoded: &[u8]) -> Pushed {
        buffer.push(encoded.len(), |out| out.bytes(encoded))
    }

    fn sequences(events: &[EncodedEvent]) -> Vec<u64> {
        events
            .iter()
            .map(|e| {
                TelemetryEvent::decode(e.as_bytes().clone())
                    .unwrap()
                    .sequence
            })
            .collect()
    }

    #[test]
    fn numbers_sends_confirms_and_replays() {
        let buffer = Buffer::new(10);
        for _ in 0..5 {
            push(&buffer, &event("a"));
        }
        assert_eq!(sequences(&buffer.take_unsent(3)), [1, 2, 3]);
        assert_eq!(sequences(&buffer.take_unsent(10)), [4, 5]);
        assert!(buffer.take_unsent(10).is_empty());
        assert_eq!(buffer.confirm(2), 2);
        // The connection dies: the next one replays what was not confirmed.
        assert_eq!(buffer.rewind(), 3);
        push(&buffer, &event("a"));
        assert_eq!(sequences(&buffer.take_unsent(10)), [3, 4, 5, 6]);
        assert_eq!(buffer.confirm(6), 4);
        assert_eq!(buffer.unconfirmed(), 0);
    }

    /// An event buffered before the worker knew the hub's message limit is dropped instead of
    /// sent, once: it is gone from the buffer, so the next replay does not meet it again.
    #[test]
    fn events_over_the_message_limit_are_dropped_not_sent() {
        let buffer = Buffer::new(10);
        push(&buffer, &event("a"));
        push(&buffer, &event(&"b".repeat(100)));
        push(&buffer, &event("c"));
        let (batch, dropped) = buffer.take_unsent_within(10, 50);
        assert_eq!((sequences(&batch), dropped), (vec![1, 3], 1));
        assert_eq!(buffer.rewind(), 2);
        let (batch, dropped) = buffer.take_unsent_within(10, 50);
        assert_eq!((sequences(&batch), dropped), (vec![1, 3], 0));
        assert_eq!(buffer.confirm(3), 2);
        let counts = buffer.counts();
        assert_eq!(
            (counts.accepted, counts.confirmed, counts.dropped_over_limit),
            (3, 2, 1)
        );
    }

    #[test]
    fn a_full_buffer_drops_the_oldest() {
        let buffer = Buffer::new(3);
        let evicted: Vec<bool> = (0..5).map(|_| push(&buffer, &event("a")).evicted).collect();
        assert_eq!(evicted, [false, false, false, true, true]);
        assert_eq!(sequences(&buffer.take_unsent(10)), [3, 4, 5]);
        push(&buffer, &event("a"));
        assert_eq!(sequences(&buffer.take_unsent(10)), [6]);
        assert_eq!(sequences(&buffer.snapshot()), [4, 5, 6]);
        assert_eq!(buffer.counts().dropped_full, 3);
    }

    /// A buffer that keeps dropping its oldest events (a worker whose hub is away) holds on to
    /// no more chunks than its events lie in, and none once every event is confirmed.
    #[test]
    fn chunks_are_freed_with_their_last_event() {
        let buffer = Buffer::new(100);
        let encoded = event(&"x".repeat(200));
        for _ in 0..100_000 {
            push(&buffer, &encoded);
            if buffer.counts().accepted.is_multiple_of(1_000) {
                // Hand-overs seal the chunk being written; writing goes on after them.
                assert_eq!(buffer.take_unsent(1_000).len(), 100);
            }
        }
        let chunks = |buffer: &Buffer| {
            let inner = buffer.lock();
            (inner.sealed.len(), inner.open.len())
        };
        let (sealed, _) = chunks(&buffer);
        assert!(
            sealed <= 2,
            "{sealed} chunks kept for 100 events of 200 bytes"
        );
        assert_eq!(buffer.confirm(u64::MAX), 100);
        assert_eq!(chunks(&buffer), (0, 0));
        push(&buffer, &encoded);
        assert_eq!(sequences(&buffer.snapshot()), [100_001]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        Take(usize, usize),
        Confirm(usize),
        Rewind,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop_oneof![9 => 0usize..300, 1 => 60_000usize..140_000].prop_map(Op::Push),
            2 => (1usize..8, prop_oneof![Just(usize::MAX), 50usize..400])
                .prop_map(|(max, bytes)| Op::Take(max, bytes)),
            1 => (0usize..6).prop_map(Op::Confirm),
            1 => Just(Op::Rewind),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the pushes, hand-overs, receipts and reconnects, the buffer sends what a
        /// plain list of events would, byte for byte, and counts every event once.
        #[test]
        fn behaves_as_a_list_of_events(capacity in 1usize..12, ops in proptest::collection::vec(op(), 1..80)) {
            let buffer = Buffer::new(capacity);
            // The model: kept events (sequence, bytes) and how many of the newest are unsent.
            let mut kept: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut unsent = 0;
            let mut next = 1;
            let mut dropped = 0;
            for op in ops {
                match op {
                    Op::Push(len) => {
                        let encoded = event(&"e".repeat(len));
                        let pushed = push(&buffer, &encoded);
                        prop_assert_eq!(pushed.sequence, next);
                        let mut with_sequence = encoded;
                        EncodedEvent::append_sequence(&mut with_sequence, next);
                        kept.push_back((next, with_sequence));
                        next += 1;
                        unsent += 1;
                        prop_assert_eq!(pushed.evicted, kept.len() > capacity);
                        if kept.len() > capacity {
                            kept.pop_front();
                            unsent = unsent.min(kept.len());
                        }
                    }
                    Op::Take(max, max_bytes) => {
                        let (batch, over) = buffer.take_unsent_within(max, max_bytes);
                        let mut expected = Vec::new();
                        let mut expected_over = 0;
                        while expected.len() < max && unsent > 0 {
                            let at = kept.len() - unsent;
                            if kept[at].1.len() > max_bytes {
                                kept.remove(at);
                                expected_over += 1;
                                dropped += 1;
                            } else {
                                expected.push(kept[at].1.clone());
                            }
                            unsent -= 1;
                        }
                        let got: Vec<Vec<u8>> = batch.iter().map(|e| e.as_bytes().to_vec()).collect();
                        prop_assert_eq!(got, expected);
                        prop_assert_eq!(over, expected_over);
                    }
                    Op::Confirm(count) => {
                        let through = kept.get(count).map_or(next, |(sequence, _)| *sequence) - 1;
                        let before = kept.len();
                        kept.retain(|(sequence, _)| *sequence > through);
                        unsent = unsent.min(kept.len());
                        prop_assert_eq!(buffer.confirm(through), before - kept.len());
                    }
                    Op::Rewind => {
                        prop_assert_eq!(buffer.rewind(), kept.len() - unsent);
                        unsent = kept.len();
                    }
                }
                let snapshot: Vec<Vec<u8>> =
                    buffer.snapshot().iter().map(|e| e.as_bytes().to_vec()).collect();
                let expected: Vec<Vec<u8>> = kept.iter().map(|(_, bytes)| bytes.clone()).collect();
                prop_assert_eq!(snapshot, expected);
                let counts = buffer.counts();
                prop_assert_eq!(counts.accepted, next - 1);
                prop_assert_eq!(counts.dropped_over_limit, dropped);
                prop_assert_eq!(
                    counts.accepted,
                    counts.confirmed + counts.dropped_full + counts.dropped_over_limit + kept.len() as u64
                );
            }
        }
    }
}
