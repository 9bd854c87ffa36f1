//! Encodes `emit` arguments straight into `TelemetryEvent` bytes.
//!
//! Building the generated struct first would allocate a `String` per token, key and value and
//! two `HashMap`s, only to encode and drop them; this writes the same bytes from the borrowed
//! arguments with one allocation. The sequence number is appended later, when the event is
//! accepted, so the capacity leaves room for it.

use bridge_proto::v1;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::emitter::Value;

/// Room for the sequence field (key and a 10-byte varint).
const SEQUENCE_ROOM: usize = 11;

fn len_delimited(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn string_len(tag: u32, text: &str) -> usize {
    len_delimited(tag, text.len())
}

fn put_string(buf: &mut Vec<u8>, tag: u32, text: &str) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(text.len() as u64, buf);
    buf.extend_from_slice(text.as_bytes());
}

/// Map keys and values equal to the default are left out, as the generated code does.
fn entry_string_len(tag: u32, text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        string_len(tag, text)
    }
}

fn put_entry_string(buf: &mut Vec<u8>, tag: u32, text: &str) {
    if !text.is_empty() {
        put_string(buf, tag, text);
    }
}

/// Length of a `TelemetryValue` message body (the oneof field is always present).
fn value_len(value: &Value<'_>) -> usize {
    match value {
        Value::Int(v) => key_len(1) + encoded_len_varint(*v as u64),
        Value::Float(_) => key_len(2) + 8,
        Value::Str(s) => string_len(3, s),
    }
}

fn put_value(buf: &mut Vec<u8>, value: &Value<'_>) {
    match value {
        Value::Int(v) => {
            encode_key(1, WireType::Varint, buf);
            encode_varint(*v as u64, buf);
        }
        Value::Float(v) => {
            encode_key(2, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Value::Str(s) => put_string(buf, 3, s),
    }
}

fn measurement_entry_len(key: &str, value: &Value<'_>) -> usize {
    entry_string_len(1, key) + len_delimited(2, value_len(value))
}

fn metadata_entry_len(key: &str, value: &str) -> usize {
    entry_string_len(1, key) + entry_string_len(2, value)
}

/// The encoding of the `TelemetryEvent` these arguments describe, without a sequence number.
pub(crate) fn event(
    name: &str,
    measurements: &[(&str, Value<'_>)],
    metadata: &[(&str, &str)],
    timestamp_ns: i64,
    correlation_id: &str,
    decision: Decision,
) -> Vec<u8> {
    let Decision {
        sampling_rate,
        control_version,
    } = decision;
    let sampled = sampling_rate > 0.0 && sampling_rate < 1.0;
    let len = name.split('.').map(|t| string_len(1, t)).sum::<usize>()
        + if sampled { key_len(7) + 8 } else { 0 }
        + if control_version != 0 {
            key_len(8) + encoded_len_varint(control_version)
        } else {
            0
        }
        + measurements
            .iter()
            .map(|(k, v)| len_delimited(2, measurement_entry_len(k, v)))
            .sum::<usize>()
        + metadata
            .iter()
            .map(|(k, v)| len_delimited(3, metadata_entry_len(k, v)))
            .sum::<usize>()
        + if timestamp_ns != 0 {
            key_len(4) + encoded_len_varint(timestamp_ns as u64)
        } else {
            0
        }
        + if correlation_id.is_empty() {
            0
        } else {
            string_len(5, correlation_id)
        };
    let mut buf = Vec::with_capacity(len + SEQUENCE_ROOM);
    for token in name.split('.') {
        put_string(&mut buf, 1, token);
    }
    for (key, value) in measurements {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(measurement_entry_len(key, value) as u64, &mut buf);
        put_entry_string(&mut buf, 1, key);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(value_len(value) as u64, &mut buf);
        put_value(&mut buf, value);
    }
    for (key, value) in metadata {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(metadata_entry_len(key, value) as u64, &mut buf);
        put_entry_string(&mut buf, 1, key);
        put_entry_string(&mut buf, 2, value);
    }
    if timestamp_ns != 0 {
        encode_key(4, WireType::Varint, &mut buf);
        encode_varint(timestamp_ns as u64, &mut buf);
    }
    if !correlation_id.is_empty() {
        put_string(&mut buf, 5, correlation_id);
    }
    if sampled {
        encode_key(7, WireType::SixtyFourBit, &mut buf);
        buf.extend_from_slice(&sampling_rate.to_le_bytes());
    }
    if control_version != 0 {
        encode_key(8, WireType::Varint, &mut buf);
        encode_varint(control_version, &mut buf);
    }
    buf
}

/// How an event was decided: the rate it was kept at and the control version that said so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decision {
    pub sampling_rate: f64,
    pub control_version: u64,
}

/// The encoding of an event built elsewhere (a relayed one), without its sequence number.
pub(crate) fn message(mut event: v1::TelemetryEvent) -> Vec<u8> {
    use prost::Message;
    event.sequence = 0;
    let mut buf = Vec::with_capacity(event.encoded_len() + SEQUENCE_ROOM);
    event.encode_raw(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::v1::{TelemetryValue, telemetry_value};
    use prost::Message;

    #[test]
    fn matches_the_generated_encoding() {
        let bytes = event(
            "inference.stop",
            &[
                ("tokens", Value::Int(512)),
                ("zero", Value::Int(0)),
                ("negative", Value::Int(-3)),
                ("latency_ms", Value::Float(12.5)),
                ("state", Value::Str("warm")),
                ("empty", Value::Str("")),
            ],
            &[("model", "llama"), ("", "")],
            1_700_000_000_000_000_000,
            "req-1",
            Decision {
                sampling_rate: 0.25,
                control_version: 9,
            },
        );
        assert!(bytes.capacity() >= bytes.len() + SEQUENCE_ROOM);
        let decoded = v1::TelemetryEvent::decode(bytes.as_slice()).unwrap();
        let value = |v| TelemetryValue { value: Some(v) };
        use telemetry_value::Value as V;
        let expected = v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            measurements: [
                ("tokens".to_owned(), value(V::IntValue(512))),
                ("zero".to_owned(), value(V::IntValue(0))),
                ("negative".to_owned(), value(V::IntValue(-3))),
                ("latency_ms".to_owned(), value(V::FloatValue(12.5))),
                ("state".to_owned(), value(V::StringValue("warm".into()))),
                ("empty".to_owned(), value(V::StringValue(String::new()))),
            ]
            .into(),
            metadata: [
                ("model".to_owned(), "llama".to_owned()),
                (String::new(), String::new()),
            ]
            .into(),
            timestamp_ns: 1_700_000_000_000_000_000,
            correlation_id: "req-1".into(),
            sequence: 0,
            sampling_rate: 0.25,
            control_version: 9,
        };
        assert_eq!(decoded, expected);
        assert_eq!(bytes.len(), expected.encoded_len());
    }

    #[test]
    fn a_relayed_message_loses_any_sequence_it_came_with() {
        let event = v1::TelemetryEvent {
            event_parts: vec!["a".into()],
            sequence: 99,
            ..Default::default()
        };
        let decoded = v1::TelemetryEvent::decode(message(event).as_slice()).unwrap();
        assert_eq!(decoded.sequence, 0);
    }
}
