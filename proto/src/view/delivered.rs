//! An event delivery as the hub encodes it, read where it lies, for outputs that re-encode
//! every delivery in another protocol (the OTLP log export).
//!
//! Unlike [`EventView`](super::EventView), nothing is copied and strings are not checked to be
//! UTF-8 again: every delivery holds an event the hub checked when it received it (from a
//! worker, or from another hub, whose deliveries pass
//! [`RelayedDelivery::check`](super::RelayedDelivery::check) before they are fanned out), so its
//! strings can be passed on as bytes. Anything that does not parse as a delivery, or holds a
//! delivery or event in several parts (which a decoder would merge, and the hub never writes),
//! is `None`, never a panic.

use prost::encoding::WireType;
use smallvec::SmallVec;

use super::{RawEntries, RawValue, field_key, skip_field, take_delimited, varint};
use crate::fields::{
    event_delivery, subscribe_response,
    telemetry_event::{CORRELATION_ID, EVENT_PARTS, SPAN_ID, TIMESTAMP_NS, TRACE_ID},
};

/// An encoded `SubscribeResponse` that delivers an event, its fields where they lie.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRef<'a> {
    pub worker_id: &'a [u8],
    pub pool: &'a [u8],
    pub sampling_rate: f64,
    pub received_ns: i64,
    pub event: DeliveredEvent<'a>,
}

/// The event of a [`DeliveryRef`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveredEvent<'a> {
    bytes: &'a [u8],
    pub parts: SmallVec<[&'a [u8]; 4]>,
    pub correlation_id: &'a [u8],
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub timestamp_ns: i64,
}

/// A measurement or metadata entry as it lies; see [`DeliveredEvent::entries`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UncheckedEntry<'a> {
    /// A measurement's key and value (`None`: a `TelemetryValue` with nothing set).
    Measurement(&'a [u8], Option<RawValue<'a>>),
    Metadata(&'a [u8], &'a [u8]),
}

impl<'a> DeliveryRef<'a> {
    /// The delivery in an encoded `SubscribeResponse`; `None` for any other item, or bytes
    /// that do not parse.
    pub fn read(mut response: &'a [u8]) -> Option<Self> {
        let mut delivery = None;
        while !response.is_empty() {
            match field_key(&mut response)? {
                // A second delivery would be merged into the first by a decoder; the hub
                // never writes one, and this reader does not merge.
                (subscribe_response::EVENT, WireType::LengthDelimited) if delivery.is_none() => {
                    delivery = Some(take_delimited(&mut response)?);
                }
                (subscribe_response::EVENT, _) => return None,
                (_, wire_type) => skip_field(wire_type, &mut response)?,
            }
        }
        Self::read_delivery(delivery?)
    }

    fn read_delivery(mut fields: &'a [u8]) -> Option<Self> {
        let (mut worker_id, mut pool, mut event) = (&[][..], &[][..], None);
        let (mut sampling_rate, mut received_ns) = (0.0, 0);
        while !fields.is_empty() {
            match field_key(&mut fields)? {
                (event_delivery::WORKER_ID, WireType::LengthDelimited) => {
                    worker_id = take_delimited(&mut fields)?;
                }
                (event_delivery::POOL, WireType::LengthDelimited) => {
                    pool = take_delimited(&mut fields)?;
                }
                (event_delivery::EVENT, WireType::LengthDelimited) if event.is_none() => {
                    event = Some(take_delimited(&mut fields)?);
                }
                (event_delivery::SAMPLING_RATE, WireType::SixtyFourBit) => {
                    let (le, rest) = fields.split_first_chunk::<8>()?;
                    sampling_rate = f64::from_le_bytes(*le);
                    fields = rest;
                }
                (event_delivery::RECEIVED_NS, WireType::Varint) => {
                    // int64 travels as its two's complement.
                    received_ns = varint(&mut fields)? as i64;
                }
                (
                    event_delivery::WORKER_ID
                    | event_delivery::POOL
                    | event_delivery::EVENT
                    | event_delivery::SAMPLING_RATE
                    | event_delivery::RECEIVED_NS,
                    _,
                ) => return None,
                (_, wire_type) => skip_field(wire_type, &mut fields)?,
            }
        }
        Some(Self {
            worker_id,
            pool,
            sampling_rate,
            received_ns,
            event: DeliveredEvent::read(event?)?,
        })
    }
}

impl<'a> DeliveredEvent<'a> {
    /// An encoded `TelemetryEvent`'s fields that outputs read; `None` if it does not parse.
    pub fn read(bytes: &'a [u8]) -> Option<Self> {
        let mut event = Self {
            bytes,
            parts: SmallVec::new(),
            correlation_id: &[],
            trace_id: &[],
            span_id: &[],
            timestamp_ns: 0,
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            match field_key(&mut rest)? {
                (EVENT_PARTS, WireType::LengthDelimited) => {
                    event.parts.push(take_delimited(&mut rest)?);
                }
                (CORRELATION_ID, WireType::LengthDelimited) => {
                    event.correlation_id = take_delimited(&mut rest)?;
                }
                (TRACE_ID, WireType::LengthDelimited) => {
                    event.trace_id = take_delimited(&mut rest)?;
                }
                (SPAN_ID, WireType::LengthDelimited) => {
                    event.span_id = take_delimited(&mut rest)?;
                }
                (TIMESTAMP_NS, WireType::Varint) => {
                    event.timestamp_ns = varint(&mut rest)? as i64;
                }
                (EVENT_PARTS | CORRELATION_ID | TRACE_ID | SPAN_ID | TIMESTAMP_NS, _) => {
                    return None;
                }
                (_, wire_type) => skip_field(wire_type, &mut rest)?,
            }
        }
        Some(event)
    }

    /// The length of the event's name: its tokens joined by dots.
    pub fn name_len(&self) -> usize {
        self.parts.iter().map(|part| part.len()).sum::<usize>() + self.parts.len().saturating_sub(1)
    }

    /// Every measurement and metadata entry, in the order received; the walk ends at an entry
    /// that does not parse.
    pub fn entries(&self) -> impl Iterator<Item = UncheckedEntry<'a>> + use<'a> {
        let mut raw = RawEntries { rest: self.bytes };
        std::iter::from_fn(move || {
            let entry = raw.next()?;
            let read = if entry.measurement {
                entry
                    .raw_measurement()
                    .map(|value| UncheckedEntry::Measurement(entry.key, value))
            } else {
                Some(UncheckedEntry::Metadata(entry.key, entry.value))
            };
            if read.is_none() {
                raw.rest = &[];
            }
            read
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{
        encoded::EncodedSubscribeResponse,
        v1::{self, TelemetryValue, telemetry_value::Value},
    };

    fn delivery() -> v1::EventDelivery {
        let value = |v| TelemetryValue { value: Some(v) };
        v1::EventDelivery {
            worker_id: "gpu-3".into(),
            pool: "llama".into(),
            sampling_rate: 0.25,
            received_ns: 1_700_000_000_123,
            event: Some(v1::TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                measurements: [("tokens".to_owned(), value(Value::IntValue(-5)))].into(),
                metadata: [("model".to_owned(), "llama-70b".to_owned())].into(),
                timestamp_ns: -3,
                correlation_id: "req-1".into(),
                trace_id: vec![7; 16],
                span_id: vec![8; 8],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_delivery_reads_as_the_generated_code_decodes_it() {
        let encoded = EncodedSubscribeResponse::event(delivery());
        let read = DeliveryRef::read(encoded.as_bytes()).unwrap();
        assert_eq!((read.worker_id, read.pool), (&b"gpu-3"[..], &b"llama"[..]));
        assert_eq!(
            (read.sampling_rate, read.received_ns),
            (0.25, 1_700_000_000_123)
        );
        let event = &read.event;
        assert_eq!(event.parts.as_slice(), [&b"inference"[..], b"stop"]);
        assert_eq!(event.name_len(), "inference.stop".len());
        assert_eq!(event.timestamp_ns, -3);
        assert_eq!(event.correlation_id, b"req-1");
        assert_eq!((event.trace_id.len(), event.span_id.len()), (16, 8));
        let entries: Vec<_> = event.entries().collect();
        assert_eq!(
            entries,
            [
                UncheckedEntry::Measurement(b"tokens", Some(RawValue::Int(-5))),
                UncheckedEntry::Metadata(b"model", b"llama-70b"),
            ]
        );
    }

    #[test]
    fn what_is_not_a_delivery_reads_as_none() {
        let lag = EncodedSubscribeResponse::lagged(3);
        assert_eq!(DeliveryRef::read(lag.as_bytes()), None);
        let encoded = EncodedSubscribeResponse::event(delivery())
            .as_bytes()
            .to_vec();
        for cut in 1..encoded.len() {
            // Never a panic; a prefix either fails or reads fields that were complete.
            let _ = DeliveryRef::read(&encoded[..cut]);
        }
        let mut wrong_type = v1::SubscribeResponse::default().encode_to_vec();
        wrong_type.extend([0x0a, 0x02, 0x08, 0x01]); // delivery whose worker_id is a varint
        assert_eq!(DeliveryRef::read(&wrong_type), None);
        let twice = [encoded.clone(), encoded].concat();
        assert_eq!(
            DeliveryRef::read(&twice),
            None,
            "two parts a decoder would merge"
        );
    }
}
