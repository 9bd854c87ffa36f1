//! The batches of events hubs pass one another in cluster mode: `EventBatch` in
//! `bridge.proto`, written and read by hand.
//!
//! A hub's publisher sends whatever events are waiting for it, up to [`MAX_BATCH_BYTES`], as
//! one NATS message: a message per event cost the hubs and nats-server more than the events
//! themselves (BENCHMARKS.md, "Issue 19: batched cluster crossing"). It never waits for more:
//! at a low rate a batch holds one event. Each event is the delivery the publishing hub's own
//! subscribers received (worker, pool, event, sampling rate, receipt time), copied as it is,
//! with the number of its worker's label set; each set is written once per batch.
//!
//! A batch is input from the network. [`Batch::read`] checks its framing and its label sets
//! (keys and values as [`crate::identity`] has them) and refuses the whole batch when they are
//! wrong; each event's delivery is then checked on its own
//! ([`RelayedDelivery::check`](crate::view::RelayedDelivery::check)), so that a bad event
//! costs only itself.

use std::{collections::BTreeMap, sync::Arc};

use bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::{
    fields::{batched_event, event_batch, map_entry, worker_labels},
    identity::{check_label_key, check_label_value},
};

/// The size a batch is kept under, unless a single event is larger: well under NATS's
/// `max_payload` (1 MiB by default).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// A worker's labels, shared by its events.
pub type Labels = Arc<BTreeMap<String, String>>;

/// Builds a batch.
#[derive(Debug, Default)]
pub struct BatchWriter {
    buf: Vec<u8>,
    events: usize,
    /// The label sets written so far, numbered from 1 in order. A set is recognised by its
    /// `Arc` (a worker's events share one); holding them keeps their addresses unique.
    label_sets: Vec<Labels>,
}

impl BatchWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an event: `delivery` is an encoded `SubscribeResponse`. Returns `false`, having
    /// appended nothing, when the batch holds events already and this one would take it past
    /// [`MAX_BATCH_BYTES`]: send the batch, then add the event to the next.
    pub fn add(&mut self, delivery: &[u8], labels: Option<&Labels>) -> bool {
        let (mark, sets) = (self.buf.len(), self.label_sets.len());
        let number = match labels {
            Some(labels) if !labels.is_empty() => self.label_set(labels),
            _ => 0,
        };
        let body_len = key_len(batched_event::DELIVERY)
            + encoded_len_varint(delivery.len() as u64)
            + delivery.len()
            + if number > 0 {
                key_len(batched_event::LABELS) + encoded_len_varint(u64::from(number))
            } else {
                0
            };
        if self.events > 0
            && self.buf.len()
                + key_len(event_batch::EVENTS)
                + encoded_len_varint(body_len as u64)
                + body_len
                > MAX_BATCH_BYTES
        {
            self.buf.truncate(mark);
            self.label_sets.truncate(sets);
            return false;
        }
        encode_key(
            event_batch::EVENTS,
            WireType::LengthDelimited,
            &mut self.buf,
        );
        encode_varint(body_len as u64, &mut self.buf);
        encode_key(
            batched_event::DELIVERY,
            WireType::LengthDelimited,
            &mut self.buf,
        );
        encode_varint(delivery.len() as u64, &mut self.buf);
        self.buf.put_slice(delivery);
        if number > 0 {
            encode_key(batched_event::LABELS, WireType::Varint, &mut self.buf);
            encode_varint(u64::from(number), &mut self.buf);
        }
        self.events += 1;
        true
    }

    /// The number of `labels` in this batch, written now if it is new.
    fn label_set(&mut self, labels: &Labels) -> u32 {
        // Most events of a batch come from few workers, usually in runs: the last set first.
        if let Some(at) = self
            .label_sets
            .iter()
            .rposition(|known| Arc::ptr_eq(known, labels))
        {
            return at as u32 + 1;
        }
        let string_len =
            |tag: u32, s: &str| key_len(tag) + encoded_len_varint(s.len() as u64) + s.len();
        let entry_len = |key: &str, value: &str| {
            string_len(map_entry::KEY, key) + string_len(map_entry::VALUE, value)
        };
        let set_len: usize = labels
            .iter()
            .map(|(key, value)| {
                let len = entry_len(key, value);
                key_len(worker_labels::LABELS) + encoded_len_varint(len as u64) + len
            })
            .sum();
        let buf = &mut self.buf;
        encode_key(event_batch::LABELS, WireType::LengthDelimited, buf);
        encode_varint(set_len as u64, buf);
        for (key, value) in labels.iter() {
            encode_key(worker_labels::LABELS, WireType::LengthDelimited, buf);
            encode_varint(entry_len(key, value) as u64, buf);
            for (tag, text) in [(map_entry::KEY, key), (map_entry::VALUE, value)] {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(text.len() as u64, buf);
                buf.put_slice(text.as_bytes());
            }
        }
        self.label_sets.push(labels.clone());
        self.label_sets.len() as u32
    }

    /// Events in the batch.
    pub fn events(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The encoded batch; the writer starts a new one.
    pub fn take(&mut self) -> Bytes {
        self.events = 0;
        self.label_sets.clear();
        Bytes::from(std::mem::take(&mut self.buf))
    }
}

/// Why a batch was refused whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed event batch: {0}")]
pub struct MalformedBatch(&'static str);

/// A batch whose framing and label sets were checked; its events are not yet.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    labels: Vec<Labels>,
    /// Each event's delivery (empty when it had none) and label set number.
    events: Vec<(&'a [u8], u32)>,
}

/// One event of a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchedEvent<'a, 'b> {
    /// An encoded `SubscribeResponse`, unchecked.
    pub delivery: &'a [u8],
    /// Its worker's labels (`None`: none).
    pub labels: Option<&'b Labels>,
}

impl<'a> Batch<'a> {
    /// Reads an encoded `EventBatch`; see the module documentation.
    pub fn read(mut bytes: &'a [u8]) -> Result<Self, MalformedBatch> {
        let mut batch = Self::default();
        while !bytes.is_empty() {
            match key(&mut bytes)? {
                (event_batch::LABELS, WireType::LengthDelimited) => {
                    batch
                        .labels
                        .push(Arc::new(label_set(delimited(&mut bytes)?)?));
                }
                (event_batch::EVENTS, WireType::LengthDelimited) => {
                    batch.events.push(event(delimited(&mut bytes)?)?);
                }
                (event_batch::LABELS | event_batch::EVENTS, _) => return Err(WIRE_TYPE),
                (_, wire_type) => skip(wire_type, &mut bytes)?,
            }
        }
        if batch
            .events
            .iter()
            .any(|(_, labels)| *labels as usize > batch.labels.len())
        {
            return Err(MalformedBatch("an event names a label set the batch lacks"));
        }
        Ok(batch)
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events, in the order written.
    pub fn events(&self) -> impl Iterator<Item = BatchedEvent<'a, '_>> {
        self.events.iter().map(|&(delivery, labels)| BatchedEvent {
            delivery,
            labels: labels
                .checked_sub(1)
                .and_then(|at| self.labels.get(at as usize)),
        })
    }
}

const WIRE_TYPE: MalformedBatch = MalformedBatch("a field has the wrong wire type");

fn event(mut fields: &[u8]) -> Result<(&[u8], u32), MalformedBatch> {
    let (mut delivery, mut labels) = (None, 0);
    while !fields.is_empty() {
        match key(&mut fields)? {
            (batched_event::DELIVERY, WireType::LengthDelimited) if delivery.is_none() => {
                delivery = Some(delimited(&mut fields)?);
            }
            (batched_event::DELIVERY, WireType::LengthDelimited) => {
                return Err(MalformedBatch("an event has several deliveries"));
            }
            (batched_event::LABELS, WireType::Varint) => {
                labels = u32::try_from(varint(&mut fields)?)
                    .map_err(|_| MalformedBatch("a label set number is out of range"))?;
            }
            (batched_event::DELIVERY | batched_event::LABELS, _) => return Err(WIRE_TYPE),
            (_, wire_type) => skip(wire_type, &mut fields)?,
        }
    }
    // An event without a delivery is the event's fault, not the batch's: its check refuses it.
    Ok((delivery.unwrap_or_default(), labels))
}

fn label_set(mut fields: &[u8]) -> Result<BTreeMap<String, String>, MalformedBatch> {
    const BAD_LABEL: MalformedBatch = MalformedBatch("a worker label is not valid");
    let mut labels = BTreeMap::new();
    while !fields.is_empty() {
        match key(&mut fields)? {
            (worker_labels::LABELS, WireType::LengthDelimited) => {
                let mut entry = delimited(&mut fields)?;
                let (mut label, mut value) = ("", "");
                while !entry.is_empty() {
                    match key(&mut entry)? {
                        (map_entry::KEY, WireType::LengthDelimited) => {
                            label = text(delimited(&mut entry)?)?;
                        }
                        (map_entry::VALUE, WireType::LengthDelimited) => {
                            value = text(delimited(&mut entry)?)?;
                        }
                        (map_entry::KEY | map_entry::VALUE, _) => return Err(WIRE_TYPE),
                        (_, wire_type) => skip(wire_type, &mut entry)?,
                    }
                }
                // A worker's empty label is not kept, so no hub writes one.
                if check_label_key(label).is_err()
                    || check_label_value(value).is_err()
                    || value.is_empty()
                {
                    return Err(BAD_LABEL);
                }
                labels.insert(label.to_owned(), value.to_owned());
            }
            (worker_labels::LABELS, _) => return Err(WIRE_TYPE),
            (_, wire_type) => skip(wire_type, &mut fields)?,
        }
    }
    Ok(labels)
}

fn key(bytes: &mut &[u8]) -> Result<(u32, WireType), MalformedBatch> {
    const BAD: MalformedBatch = MalformedBatch("a field key is malformed");
    let key = varint(bytes).map_err(|_| BAD)?;
    let tag = u32::try_from(key >> 3)
        .ok()
        .filter(|tag| *tag > 0)
        .ok_or(BAD)?;
    Ok((tag, WireType::try_from(key & 0x07).map_err(|_| BAD)?))
}

fn varint(bytes: &mut &[u8]) -> Result<u64, MalformedBatch> {
    prost::encoding::decode_varint(bytes).map_err(|_| MalformedBatch("a varint is malformed"))
}

fn delimited<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], MalformedBatch> {
    const BAD: MalformedBatch = MalformedBatch("a length is out of bounds");
    let len = usize::try_from(varint(bytes)?).map_err(|_| BAD)?;
    let (body, rest) = bytes.split_at_checked(len).ok_or(BAD)?;
    *bytes = rest;
    Ok(body)
}

fn skip(wire_type: WireType, bytes: &mut &[u8]) -> Result<(), MalformedBatch> {
    const BAD: MalformedBatch = MalformedBatch("an unknown field is malformed");
    let len = match wire_type {
        WireType::Varint => return varint(bytes).map(drop),
        WireType::LengthDelimited => return delimited(bytes).map(drop),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::StartGroup | WireType::EndGroup => return Err(BAD),
    };
    *bytes = bytes.get(len..).ok_or(BAD)?;
    Ok(())
}

fn text(bytes: &[u8]) -> Result<&str, MalformedBatch> {
    std::str::from_utf8(bytes).map_err(|_| MalformedBatch("a string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::{
        encoded::EncodedSubscribeResponse,
        v1::{self, TelemetryEvent, subscribe_response::Item},
    };

    fn delivery(worker: &str, name: &str) -> Vec<u8> {
        let event = TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            ..Default::default()
        };
        EncodedSubscribeResponse::delivery(worker, "llama", &event, 1.0, 7)
            .as_bytes()
            .to_vec()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Arc::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// An event read back: its delivery and its worker's labels.
    type Read = (Vec<u8>, Option<BTreeMap<String, String>>);

    fn read(bytes: &[u8]) -> Result<Vec<Read>, MalformedBatch> {
        Ok(Batch::read(bytes)?
            .events()
            .map(|e| (e.delivery.to_vec(), e.labels.map(|l| (**l).clone())))
            .collect())
    }

    #[test]
    fn a_batch_reads_back_as_written_and_as_the_contract_says() {
        let zone_a = labels(&[("zone", "a"), ("rack", "3")]);
        let zone_b = labels(&[("zone", "b")]);
        let none = labels(&[]);
        let mut writer = BatchWriter::new();
        let written = [
            (delivery("gpu-1", "inference.stop"), Some(&zone_a)),
            (delivery("gpu-2", "gpu.util"), Some(&zone_b)),
            (delivery("gpu-1", "inference.start"), Some(&zone_a)),
            (delivery("gpu-3", "a"), None),
            (delivery("gpu-4", "b"), Some(&none)),
        ];
        for (bytes, labels) in &written {
            assert!(writer.add(bytes, *labels));
        }
        assert_eq!(writer.events(), 5);
        let bytes = writer.take();
        assert!(writer.is_empty());

        let read = read(&bytes).unwrap();
        assert_eq!(read.len(), 5);
        for ((bytes, labels), (read_bytes, read_labels)) in written.iter().zip(&read) {
            assert_eq!(bytes, read_bytes);
            let expected = labels.filter(|l| !l.is_empty()).map(|l| (**l).clone());
            assert_eq!(&expected, read_labels);
        }
        // Each set once, however many events name it.
        let decoded = v1::EventBatch::decode(bytes.clone()).unwrap();
        assert_eq!(decoded.labels.len(), 2);
        assert_eq!(
            decoded.labels[0].labels,
            (*zone_a).clone().into_iter().collect()
        );
        assert_eq!(
            decoded.events.iter().map(|e| e.labels).collect::<Vec<_>>(),
            [1, 2, 1, 0, 0]
        );
        let Some(Item::Event(first)) = decoded.events[0].delivery.clone().unwrap().item else {
            panic!("not a delivery");
        };
        assert_eq!(first.worker_id, "gpu-1");
        // What a generated encoder writes reads back the same.
        assert_eq!(self::read(&decoded.encode_to_vec()).unwrap(), read);
    }

    #[test]
    fn a_batch_stays_under_its_size_unless_one_event_is_larger() {
        let mut writer = BatchWriter::new();
        let event = delivery("gpu-1", &"x".repeat(1000));
        let set = labels(&[("zone", "a")]);
        let mut added = 0;
        while writer.add(&event, Some(&set)) {
            added += 1;
        }
        let bytes = writer.take();
        assert!(bytes.len() <= MAX_BATCH_BYTES, "{}", bytes.len());
        assert!(bytes.len() + event.len() + 8 > MAX_BATCH_BYTES);
        assert_eq!(read(&bytes).unwrap().len(), added);
        // The event that did not fit left nothing behind, and starts the next batch with its
        // label set.
        assert!(writer.add(&event, Some(&set)));
        assert_eq!(read(&writer.take()).unwrap()[0].1, Some((*set).clone()));
        let huge = delivery("gpu-1", &"x".repeat(2 * MAX_BATCH_BYTES));
        assert!(writer.add(&huge, None));
        assert!(!writer.add(&event, None));
        assert_eq!(read(&writer.take()).unwrap().len(), 1);
    }

    #[test]
    fn malformed_batches_are_refused_whole() {
        let mut writer = BatchWriter::new();
        writer.add(&delivery("gpu-1", "a"), Some(&labels(&[("zone", "a")])));
        writer.add(&delivery("gpu-2", "b"), None);
        let good = writer.take().to_vec();
        // Every truncation: a length that runs past the end, or a set named but missing.
        for end in 1..good.len() {
            match read(&good[..end]) {
                Err(_) => {}
                // Cut exactly between the fields: what is left is a smaller batch.
                Ok(events) => assert!(events.len() < 2, "cut at {end}"),
            }
        }
        let refused = |batch: v1::EventBatch| Batch::read(&batch.encode_to_vec()).err();
        let event = |labels| v1::BatchedEvent {
            delivery: v1::SubscribeResponse::decode(delivery("gpu-1", "a").as_slice()).ok(),
            labels,
        };
        assert_eq!(
            refused(v1::EventBatch {
                labels: vec![],
                events: vec![event(1)],
            }),
            Some(MalformedBatch("an event names a label set the batch lacks"))
        );
        for (key, value) in [
            ("Zone", "a"),
            ("zone", ""),
            ("zone", "tab\there"),
            ("", "a"),
        ] {
            let set = v1::WorkerLabels {
                labels: [(key.to_owned(), value.to_owned())].into(),
            };
            assert_eq!(
                refused(v1::EventBatch {
                    labels: vec![set],
                    events: vec![event(1)],
                }),
                Some(MalformedBatch("a worker label is not valid")),
                "{key}={value}"
            );
        }
        // An event field that is not a message.
        assert_eq!(
            Batch::read(&[0x10, 0x01]).err(),
            Some(MalformedBatch("a field has the wrong wire type"))
        );
        // An event without a delivery is left to the event's check.
        let empty = read(
            &v1::EventBatch {
                labels: vec![],
                events: vec![v1::BatchedEvent::default()],
            }
            .encode_to_vec(),
        )
        .unwrap();
        assert_eq!(empty, [(vec![], None)]);
    }

    proptest! {
        /// Whatever arrives from the network: a refusal or a batch whose events and label sets
        /// lie within it, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(batch) = Batch::read(&bytes) {
                for event in batch.events() {
                    prop_assert!(event.delivery.len() <= bytes.len());
                }
            }
        }
    }
}
