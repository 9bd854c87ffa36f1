//! The outage buffer: events a worker accepted, in sequence order, until the hub confirms them.
//!
//! Every accepted event gets the next sequence number and is kept, encoded, until the hub's
//! cumulative receipt covers it. A stream sends what it has not sent yet; after a reconnect the
//! next stream starts again from the oldest unconfirmed event, so a hub that died mid-stream
//! loses nothing it did not confirm. The buffer is bounded: when full, the oldest event is
//! dropped and counted, leaving a gap in the sequence that the hub and subscribers can see.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use bridge_proto::{encoded::EncodedEvent, fields::telemetry_event::SEQUENCE};
use bytes::BytesMut;

/// Size of the chunks events are copied into.
const ARENA_CHUNK: usize = 64 * 1024;
use tokio::sync::Notify;

#[derive(Debug)]
struct Inner {
    /// Unconfirmed events, oldest first, with their sequence numbers.
    events: VecDeque<(u64, EncodedEvent)>,
    /// Where events are copied: each is a slice of a shared chunk, so accepting one allocates
    /// nothing; a chunk is freed when its last event is confirmed or dropped.
    arena: BytesMut,
    next_sequence: u64,
    /// How many of the newest events the current stream has not sent yet.
    unsent: usize,
    capacity: usize,
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

impl Buffer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                events: VecDeque::with_capacity(capacity.clamp(1, 4096)),
                arena: BytesMut::with_capacity(ARENA_CHUNK),
                next_sequence: 1,
                unsent: 0,
                capacity: capacity.max(1),
            }),
            ready: Notify::new(),
            confirmed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers an encoded event (which must not have a sequence yet) and keeps a copy.
    pub(crate) fn push(&self, encoded: &[u8]) -> Pushed {
        let pushed = {
            let mut inner = self.lock();
            let sequence = inner.next_sequence;
            inner.next_sequence += 1;
            // Room for the sequence field: a one-byte key and up to ten bytes of varint.
            inner.arena.reserve(encoded.len() + 11);
            inner.arena.extend_from_slice(encoded);
            prost::encoding::uint64::encode(SEQUENCE, &sequence, &mut inner.arena);
            let bytes = inner.arena.split().freeze();
            inner
                .events
                .push_back((sequence, EncodedEvent::from_bytes(bytes)));
            inner.unsent += 1;
            let evicted = inner.events.len() > inner.capacity;
            if evicted {
                inner.events.pop_front();
                inner.unsent = inner.unsent.min(inner.events.len());
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
            if inner.events[at].1.as_bytes().len() > max_bytes {
                inner.events.remove(at);
                dropped += 1;
            } else {
                batch.push(inner.events[at].1.clone());
            }
            inner.unsent -= 1;
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
            .is_some_and(|(sequence, _)| *sequence <= through_sequence)
        {
            inner.events.pop_front();
        }
        inner.unsent = inner.unsent.min(inner.events.len());
        before - inner.events.len()
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

    /// Copies of the kept events, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<EncodedEvent> {
        self.lock().events.iter().map(|(_, e)| e.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::v1::TelemetryEvent;
    use prost::Message;

    fn event(name: &str) -> Vec<u8> {
        TelemetryEvent {
            event_parts: vec![name.into()],
            ..Default::default()
        }
        .encode_to_vec()
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
            buffer.push(&event("a"));
        }
        assert_eq!(sequences(&buffer.take_unsent(3)), [1, 2, 3]);
        assert_eq!(sequences(&buffer.take_unsent(10)), [4, 5]);
        assert!(buffer.take_unsent(10).is_empty());
        assert_eq!(buffer.confirm(2), 2);
        // The connection dies: the next one replays what was not confirmed.
        assert_eq!(buffer.rewind(), 3);
        buffer.push(&event("a"));
        assert_eq!(sequences(&buffer.take_unsent(10)), [3, 4, 5, 6]);
        assert_eq!(buffer.confirm(6), 4);
        assert_eq!(buffer.unconfirmed(), 0);
    }

    /// An event buffered before the worker knew the hub's message limit is dropped instead of
    /// sent, once: it is gone from the buffer, so the next replay does not meet it again.
    #[test]
    fn events_over_the_message_limit_are_dropped_not_sent() {
        let buffer = Buffer::new(10);
        buffer.push(&event("a"));
        buffer.push(&event(&"b".repeat(100)));
        buffer.push(&event("c"));
        let (batch, dropped) = buffer.take_unsent_within(10, 50);
        assert_eq!((sequences(&batch), dropped), (vec![1, 3], 1));
        assert_eq!(buffer.rewind(), 2);
        let (batch, dropped) = buffer.take_unsent_within(10, 50);
        assert_eq!((sequences(&batch), dropped), (vec![1, 3], 0));
        assert_eq!(buffer.confirm(3), 2);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest() {
        let buffer = Buffer::new(3);
        let evicted: Vec<bool> = (0..5).map(|_| buffer.push(&event("a")).evicted).collect();
        assert_eq!(evicted, [false, false, false, true, true]);
        assert_eq!(sequences(&buffer.take_unsent(10)), [3, 4, 5]);
        buffer.push(&event("a"));
        assert_eq!(sequences(&buffer.take_unsent(10)), [6]);
        assert_eq!(sequences(&buffer.snapshot()), [4, 5, 6]);
    }
}
