//! Messages encoded once and sent as bytes.
//!
//! - [`EncodedSubscribeResponse`]: fan-out to N subscribers would otherwise encode the same event
//!   N times. The hub encodes a `SubscribeResponse` once into [`Bytes`]; each subscriber's stream
//!   holds a cheap clone.
//! - [`EncodedEvent`]: a worker encodes an event when it accepts it, keeps the bytes until the hub
//!   confirms receipt, and replays the same bytes after a reconnect.
//!
//! Their [`prost::Message`] impls write the bytes verbatim; on the wire they are exactly the
//! generated messages, so peers decode them with the generated types.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, skip_field},
};

use crate::v1::{
    EventDelivery, LagNotice, SubscribeResponse, TelemetryEvent, subscribe_response::Item,
};
use crate::view::RelayedDelivery;

/// Implements [`prost::Message`] for a wrapper of already-encoded bytes: encoding writes them
/// verbatim. Only the side that sends these types uses them, so decoding skips every field.
macro_rules! bytes_message {
    ($type:ty) => {
        impl Message for $type {
            fn encode_raw(&self, buf: &mut impl BufMut) {
                buf.put_slice(&self.bytes);
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                skip_field(wire_type, tag, buf, ctx)
            }

            fn encoded_len(&self) -> usize {
                self.bytes.len()
            }

            fn clear(&mut self) {
                self.bytes = Bytes::new();
            }
        }
    };
}

/// A `SubscribeResponse` already encoded; cloning it is a reference-count increment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedSubscribeResponse {
    bytes: Bytes,
}

impl EncodedSubscribeResponse {
    /// Encodes an event delivery.
    pub fn event(delivery: EventDelivery) -> Self {
        Self::encode(SubscribeResponse {
            item: Some(Item::Event(delivery)),
        })
    }

    /// Encodes the delivery of `event` without copying it into an `EventDelivery` first: the
    /// bytes are those of `SubscribeResponse { event: EventDelivery { .. } }`.
    pub fn delivery(
        worker_id: &str,
        pool: &str,
        event: &TelemetryEvent,
        sampling_rate: f64,
        received_ns: i64,
    ) -> Self {
        Self::delivery_of_bytes(
            worker_id,
            pool,
            &event.encode_to_vec(),
            None,
            sampling_rate,
            received_ns,
        )
    }

    /// The same for an event given as its encoding (as the hub receives it), which is copied
    /// as it is; `timestamp_ns` is appended when given (for events sent without one; the last
    /// occurrence of a field is the one that counts).
    pub fn delivery_of_bytes(
        worker_id: &str,
        pool: &str,
        event: &[u8],
        timestamp_ns: Option<i64>,
        sampling_rate: f64,
        received_ns: i64,
    ) -> Self {
        use prost::encoding::{
            double, encode_key, encode_varint, encoded_len_varint, int64, key_len,
        };
        let string_len = |tag: u32, s: &str| {
            if s.is_empty() {
                0
            } else {
                key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
            }
        };
        let put_string = |buf: &mut Vec<u8>, tag: u32, s: &str| {
            if !s.is_empty() {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(s.len() as u64, buf);
                buf.put_slice(s.as_bytes());
            }
        };
        use crate::fields::{event_delivery as delivery, subscribe_response, telemetry_event};
        let event_len = event.len()
            + timestamp_ns.map_or(0, |ns| {
                int64::encoded_len(telemetry_event::TIMESTAMP_NS, &ns)
            });
        let body_len = string_len(delivery::WORKER_ID, worker_id)
            + string_len(delivery::POOL, pool)
            + key_len(delivery::EVENT)
            + encoded_len_varint(event_len as u64)
            + event_len
            + if sampling_rate != 0.0 {
                double::encoded_len(delivery::SAMPLING_RATE, &sampling_rate)
            } else {
                0
            }
            + if received_ns != 0 {
                int64::encoded_len(delivery::RECEIVED_NS, &received_ns)
            } else {
                0
            };
        let mut buf = Vec::with_capacity(
            key_len(subscribe_response::EVENT) + encoded_len_varint(body_len as u64) + body_len,
        );
        encode_key(
            subscribe_response::EVENT,
            WireType::LengthDelimited,
            &mut buf,
        );
        encode_varint(body_len as u64, &mut buf);
        put_string(&mut buf, delivery::WORKER_ID, worker_id);
        put_string(&mut buf, delivery::POOL, pool);
        encode_key(delivery::EVENT, WireType::LengthDelimited, &mut buf);
        encode_varint(event_len as u64, &mut buf);
        buf.put_slice(event);
        if let Some(ns) = timestamp_ns {
            int64::encode(telemetry_event::TIMESTAMP_NS, &ns, &mut buf);
        }
        if sampling_rate != 0.0 {
            double::encode(delivery::SAMPLING_RATE, &sampling_rate, &mut buf);
        }
        if received_ns != 0 {
            int64::encode(delivery::RECEIVED_NS, &received_ns, &mut buf);
        }
        Self {
            bytes: Bytes::from(buf),
        }
    }

    /// Encodes a lag notice for `skipped` missed events.
    pub fn lagged(skipped: u64) -> Self {
        Self::encode(SubscribeResponse {
            item: Some(Item::Lagged(LagNotice { skipped })),
        })
    }

    fn encode(message: SubscribeResponse) -> Self {
        Self {
            bytes: Bytes::from(message.encode_to_vec()),
        }
    }

    /// The encoded `SubscribeResponse`.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A copy of a delivery received from another hub, which [`RelayedDelivery::check`]
    /// passed: a copy, so that an event a subscriber keeps queued does not keep the whole
    /// message it came in alive.
    pub fn relayed(delivery: &RelayedDelivery<'_>) -> Self {
        Self {
            bytes: Bytes::copy_from_slice(delivery.response),
        }
    }
}

bytes_message!(EncodedSubscribeResponse);

/// Any message, already encoded: sent as it is, so that a request retried is not built again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreEncoded {
    bytes: Bytes,
}

impl PreEncoded {
    pub fn new(message: &impl Message) -> Self {
        Self {
            bytes: Bytes::from(message.encode_to_vec()),
        }
    }

    /// A message encoded by hand, sent as it is.
    pub fn from_encoded(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Bytes::from(bytes),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

bytes_message!(PreEncoded);

/// An encoded `TelemetryEvent`; cloning it is a reference-count increment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedEvent {
    bytes: Bytes,
}

impl EncodedEvent {
    /// Wraps bytes that are the encoding of a `TelemetryEvent`.
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self { bytes }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Appends the `sequence` field to an encoded event that has none. Protobuf fields may come
    /// in any order, so this is the same message as one encoded with the sequence set.
    pub fn append_sequence(encoded: &mut Vec<u8>, sequence: u64) {
        prost::encoding::uint64::encode(
            crate::fields::telemetry_event::SEQUENCE,
            &sequence,
            encoded,
        );
    }
}

bytes_message!(EncodedEvent);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::TelemetryValue;

    #[test]
    fn encodes_exactly_as_the_generated_message() {
        let delivery = EventDelivery {
            worker_id: "gpu-3".into(),
            pool: "llama".into(),
            event: Some(TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                correlation_id: "req-1".into(),
                ..Default::default()
            }),
            sampling_rate: 0.5,
            received_ns: 7,
        };
        let encoded = EncodedSubscribeResponse::event(delivery.clone());
        let decoded = SubscribeResponse::decode(encoded.encode_to_vec().as_slice())
            .expect("decodes as SubscribeResponse");
        assert_eq!(decoded.item, Some(Item::Event(delivery.clone())));

        let event = delivery.event.clone().unwrap();
        let by_ref = EncodedSubscribeResponse::delivery("gpu-3", "llama", &event, 0.5, 7);
        assert_eq!(by_ref, encoded, "encoding by reference is byte-identical");

        let mut rich = event;
        rich.measurements.insert(
            "tokens".into(),
            TelemetryValue {
                value: Some(crate::v1::telemetry_value::Value::IntValue(512)),
            },
        );
        rich.metadata.insert("model".into(), "llama".into());
        let owned = EncodedSubscribeResponse::event(EventDelivery {
            worker_id: String::new(),
            pool: String::new(),
            event: Some(rich.clone()),
            sampling_rate: 0.0,
            received_ns: 0,
        });
        assert_eq!(
            EncodedSubscribeResponse::delivery("", "", &rich, 0.0, 0),
            owned
        );

        let mut bytes = rich.encode_to_vec();
        EncodedEvent::append_sequence(&mut bytes, 77);
        let decoded = TelemetryEvent::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(
            decoded,
            TelemetryEvent {
                sequence: 77,
                ..rich
            }
        );

        let lag = EncodedSubscribeResponse::lagged(42).encode_to_vec();
        let decoded = SubscribeResponse::decode(lag.as_slice()).expect("decodes");
        assert_eq!(decoded.item, Some(Item::Lagged(LagNotice { skipped: 42 })));
    }
}
