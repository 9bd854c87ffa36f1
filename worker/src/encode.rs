//! Encodes `emit` arguments straight into `TelemetryEvent` bytes.
//!
//! Building the generated struct first would allocate a `String` per token, key and value and
//! two `HashMap`s, only to encode and drop them; this writes the same bytes from the borrowed
//! arguments into a reused buffer. The sequence number is appended later, when the event is
//! accepted.

use bridge_proto::{
    fields::{
        map_entry::{KEY, VALUE},
        telemetry_event::{
            CONTROL_VERSION, CORRELATION_ID, EVENT_PARTS, MEASUREMENTS, METADATA, PARENT_SPAN_ID,
            SAMPLING_RATE, SPAN_ID, TIMESTAMP_NS, TRACE_ID,
        },
        telemetry_value::{FLOAT_VALUE, INT_VALUE, STRING_VALUE},
    },
    trace::SpanContext,
    v1,
};
use prost::encoding::{WireType, encoded_len_varint, key_len};

use crate::value::Value;

/// Writes a field key; every tag here is below 16, so a key is one byte.
#[inline]
fn encode_key(tag: u32, wire_type: WireType, buf: &mut Vec<u8>) {
    debug_assert!(tag < 16);
    buf.push(((tag << 3) | wire_type as u32) as u8);
}

/// prost's varint writer, specialised to `Vec` so that it inlines.
#[inline]
fn encode_varint(mut value: u64, buf: &mut Vec<u8>) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn len_delimited(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn string_len(tag: u32, text: &str) -> usize {
    len_delimited(tag, text.len())
}

fn put_string(buf: &mut Vec<u8>, tag: u32, text: &str) {
    put_bytes(buf, tag, text.as_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
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
        Value::Int(v) => key_len(INT_VALUE) + encoded_len_varint(*v as u64),
        Value::Float(_) => key_len(FLOAT_VALUE) + 8,
        Value::Str(s) => string_len(STRING_VALUE, s),
    }
}

fn put_value(buf: &mut Vec<u8>, value: &Value<'_>) {
    match value {
        Value::Int(v) => {
            encode_key(INT_VALUE, WireType::Varint, buf);
            encode_varint(*v as u64, buf);
        }
        Value::Float(v) => {
            encode_key(FLOAT_VALUE, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Value::Str(s) => put_string(buf, STRING_VALUE, s),
    }
}

fn measurement_entry_len(key: &str, value: &Value<'_>) -> usize {
    entry_string_len(KEY, key) + len_delimited(VALUE, value_len(value))
}

fn metadata_entry_len(key: &str, value: &str) -> usize {
    entry_string_len(KEY, key) + entry_string_len(VALUE, value)
}

/// The encoding of the `TelemetryEvent` these arguments describe, without a sequence number.
pub(crate) fn event(
    name: &str,
    measurements: &[(&str, Value<'_>)],
    metadata: &[(&str, &str)],
    timestamp_ns: i64,
    request: RequestContext<'_>,
    decision: Decision,
    buf: &mut Vec<u8>,
) {
    let RequestContext {
        correlation_id,
        trace,
    } = request;
    let Decision {
        sampling_rate,
        control_version,
    } = decision;
    let sampled = sampling_rate > 0.0 && sampling_rate < 1.0;
    // `buf` is a reused scratch buffer: it is already as large as the events it has held, so
    // the total is not computed up front (only nested messages need their lengths).
    for token in name.split('.') {
        put_string(buf, EVENT_PARTS, token);
    }
    for (key, value) in measurements {
        encode_key(MEASUREMENTS, WireType::LengthDelimited, buf);
        encode_varint(measurement_entry_len(key, value) as u64, buf);
        put_entry_string(buf, KEY, key);
        encode_key(VALUE, WireType::LengthDelimited, buf);
        encode_varint(value_len(value) as u64, buf);
        put_value(buf, value);
    }
    for (key, value) in metadata {
        encode_key(METADATA, WireType::LengthDelimited, buf);
        encode_varint(metadata_entry_len(key, value) as u64, buf);
        put_entry_string(buf, KEY, key);
        put_entry_string(buf, VALUE, value);
    }
    if timestamp_ns != 0 {
        encode_key(TIMESTAMP_NS, WireType::Varint, buf);
        encode_varint(timestamp_ns as u64, buf);
    }
    if !correlation_id.is_empty() {
        put_string(buf, CORRELATION_ID, correlation_id);
    }
    if sampled {
        encode_key(SAMPLING_RATE, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&sampling_rate.to_le_bytes());
    }
    if control_version != 0 {
        encode_key(CONTROL_VERSION, WireType::Varint, buf);
        encode_varint(control_version, buf);
    }
    if let Some(trace) = trace {
        put_bytes(buf, TRACE_ID, trace.trace_id.as_bytes());
        put_bytes(buf, SPAN_ID, trace.span_id.as_bytes());
        if let Some(parent) = trace.parent_span_id {
            put_bytes(buf, PARENT_SPAN_ID, parent.as_bytes());
        }
    }
}

/// The request an event belongs to: its correlation id (empty: none) and trace context.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestContext<'a> {
    pub correlation_id: &'a str,
    pub trace: Option<&'a SpanContext>,
}

/// How an event was decided: the rate it was kept at and the control version that said so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decision {
    pub sampling_rate: f64,
    pub control_version: u64,
}

/// The encoding of an event built elsewhere (a relayed one), without its sequence number.
pub(crate) fn message(mut event: v1::TelemetryEvent, buf: &mut Vec<u8>) {
    use prost::Message;
    event.sequence = 0;
    buf.reserve(event.encoded_len());
    event.encode_raw(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::v1::{TelemetryValue, telemetry_value};
    use prost::Message;

    #[test]
    fn matches_the_generated_encoding() {
        let trace: bridge_proto::trace::TraceParent =
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap();
        let trace = SpanContext::child_of(trace.trace_id, trace.span_id);
        let mut bytes = Vec::new();
        event(
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
            RequestContext {
                correlation_id: "req-1",
                trace: Some(&trace),
            },
            Decision {
                sampling_rate: 0.25,
                control_version: 9,
            },
            &mut bytes,
        );
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
            trace_id: trace.trace_id.as_bytes().to_vec(),
            span_id: trace.span_id.as_bytes().to_vec(),
            parent_span_id: trace.parent_span_id.unwrap().as_bytes().to_vec(),
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
        let mut bytes = Vec::new();
        message(event, &mut bytes);
        let decoded = v1::TelemetryEvent::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.sequence, 0);
    }
}
