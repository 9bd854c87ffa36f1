//! Encodes `emit` arguments straight into `TelemetryEvent` bytes.
//!
//! Building the generated struct first would allocate a `String` per token, key and value and
//! two `HashMap`s, only to encode and drop them; this writes the same bytes from the borrowed
//! arguments. The length is worked out first, so that the limits are checked before anything
//! is written and the bytes are written once, where the buffer keeps them. The sequence number
//! is appended later, when the event is accepted.

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
use prost::encoding::{WireType, encoded_len_varint};

use crate::value::Value;

/// Writes into a slice exactly as long as what is written: the length was worked out first.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, at: 0 }
    }

    /// How much was written.
    pub(crate) fn written(&self) -> usize {
        self.at
    }

    #[inline]
    fn byte(&mut self, byte: u8) {
        self.buf[self.at] = byte;
        self.at += 1;
    }

    /// A field key; every tag here is below 16, so a key is one byte.
    #[inline]
    fn key(&mut self, tag: u32, wire_type: WireType) {
        debug_assert!(tag < 16);
        self.byte(((tag << 3) | wire_type as u32) as u8);
    }

    #[inline]
    pub(crate) fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.byte((value as u8) | 0x80);
            value >>= 7;
        }
        self.byte(value as u8);
    }

    #[inline]
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        copy_short(&mut self.buf[self.at..end], bytes);
        self.at = end;
    }

    #[inline]
    fn string(&mut self, tag: u32, bytes: &[u8]) {
        self.key(tag, WireType::LengthDelimited);
        self.varint(bytes.len() as u64);
        self.bytes(bytes);
    }

    /// Map keys and values equal to the default are left out, as the generated code does.
    #[inline]
    fn entry_string(&mut self, tag: u32, text: &str) {
        if !text.is_empty() {
            self.string(tag, text.as_bytes());
        }
    }

    #[inline]
    fn value(&mut self, value: &Value<'_>) {
        match value {
            Value::Int(v) => {
                self.key(INT_VALUE, WireType::Varint);
                self.varint(*v as u64);
            }
            Value::Float(v) => {
                self.key(FLOAT_VALUE, WireType::SixtyFourBit);
                self.bytes(&v.to_le_bytes());
            }
            Value::Str(s) => self.string(STRING_VALUE, s.as_bytes()),
        }
    }
}

/// Copies `src` into `dst`, of the same length. Keys, values and ids are mostly a few to 32
/// bytes; a call to `memcpy` for each was a tenth of `emit`, so those are copied as two
/// overlapping words of a fixed size, which compile to a few moves.
#[inline]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        17..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// The length of a length-delimited field with a one-byte key.
#[inline]
fn len_delimited(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

#[inline]
fn entry_string_len(text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        len_delimited(text.len())
    }
}

/// Length of a `TelemetryValue` message body (the oneof field is always present).
#[inline]
fn value_len(value: &Value<'_>) -> usize {
    match value {
        Value::Int(v) => 1 + encoded_len_varint(*v as u64),
        Value::Float(_) => 1 + 8,
        Value::Str(s) => len_delimited(s.len()),
    }
}

#[inline]
fn measurement_entry_len(key: &str, value: &Value<'_>) -> usize {
    entry_string_len(key) + len_delimited(value_len(value))
}

#[inline]
fn metadata_entry_len(key: &str, value: &str) -> usize {
    entry_string_len(key) + entry_string_len(value)
}

/// A dotted name's tokens as `event_parts` fields, and how many there are. An event's name
/// is written from these bytes, which a caller emitting the same name again keeps.
pub(crate) fn name_parts(name: &str, out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut parts = 0;
    for token in name.split('.') {
        out.push(((EVENT_PARTS << 3) | WireType::LengthDelimited as u32) as u8);
        prost::encoding::encode_varint(token.len() as u64, out);
        out.extend_from_slice(token.as_bytes());
        parts += 1;
    }
    parts
}

/// A `TelemetryEvent` as `emit` describes it, without a sequence number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event<'a> {
    /// The name, as [`name_parts`] encodes it.
    pub parts: &'a [u8],
    pub measurements: &'a [(&'a str, Value<'a>)],
    pub metadata: &'a [(&'a str, &'a str)],
    pub timestamp_ns: i64,
    pub request: RequestContext<'a>,
    pub decision: Decision,
}

impl Event<'_> {
    fn sampled(&self) -> bool {
        let rate = self.decision.sampling_rate;
        rate > 0.0 && rate < 1.0
    }

    /// The length of its encoding.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        let mut len = self.parts.len();
        for (key, value) in self.measurements {
            len += len_delimited(measurement_entry_len(key, value));
        }
        for (key, value) in self.metadata {
            len += len_delimited(metadata_entry_len(key, value));
        }
        if self.timestamp_ns != 0 {
            len += 1 + encoded_len_varint(self.timestamp_ns as u64);
        }
        if !self.request.correlation_id.is_empty() {
            len += len_delimited(self.request.correlation_id.len());
        }
        if self.sampled() {
            len += 1 + 8;
        }
        if self.decision.control_version != 0 {
            len += 1 + encoded_len_varint(self.decision.control_version);
        }
        if let Some(trace) = self.request.trace {
            len += len_delimited(trace.trace_id.as_bytes().len())
                + len_delimited(trace.span_id.as_bytes().len());
            if let Some(parent) = trace.parent_span_id {
                len += len_delimited(parent.as_bytes().len());
            }
        }
        len
    }

    /// Writes its encoding: [`Event::encoded_len`] bytes.
    #[inline]
    pub(crate) fn write(&self, out: &mut Writer<'_>) {
        out.bytes(self.parts);
        for (key, value) in self.measurements {
            out.key(MEASUREMENTS, WireType::LengthDelimited);
            out.varint(measurement_entry_len(key, value) as u64);
            out.entry_string(KEY, key);
            out.key(VALUE, WireType::LengthDelimited);
            out.varint(value_len(value) as u64);
            out.value(value);
        }
        for (key, value) in self.metadata {
            out.key(METADATA, WireType::LengthDelimited);
            out.varint(metadata_entry_len(key, value) as u64);
            out.entry_string(KEY, key);
            out.entry_string(VALUE, value);
        }
        if self.timestamp_ns != 0 {
            out.key(TIMESTAMP_NS, WireType::Varint);
            out.varint(self.timestamp_ns as u64);
        }
        let correlation_id = self.request.correlation_id;
        if !correlation_id.is_empty() {
            out.string(CORRELATION_ID, correlation_id.as_bytes());
        }
        if self.sampled() {
            out.key(SAMPLING_RATE, WireType::SixtyFourBit);
            out.bytes(&self.decision.sampling_rate.to_le_bytes());
        }
        if self.decision.control_version != 0 {
            out.key(CONTROL_VERSION, WireType::Varint);
            out.varint(self.decision.control_version);
        }
        if let Some(trace) = self.request.trace {
            out.string(TRACE_ID, trace.trace_id.as_bytes());
            out.string(SPAN_ID, trace.span_id.as_bytes());
            if let Some(parent) = trace.parent_span_id {
                out.string(PARENT_SPAN_ID, parent.as_bytes());
            }
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

/// Writes an event built elsewhere (a relayed one), whose sequence the caller cleared:
/// `event.encoded_len()` bytes.
pub(crate) fn write_message(event: &v1::TelemetryEvent, out: &mut Writer<'_>) {
    use prost::Message;
    debug_assert_eq!(event.sequence, 0);
    let mut rest = &mut out.buf[out.at..];
    let room = rest.len();
    event.encode_raw(&mut rest);
    out.at += room - rest.len();
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::{
        trace::{SpanId, TraceId},
        v1::{TelemetryValue, telemetry_value},
    };
    use proptest::prelude::*;
    use prost::Message;

    /// What the emitter does: the length first, then exactly that many bytes.
    fn encode(event: &Event<'_>) -> Vec<u8> {
        let mut bytes = vec![0; event.encoded_len()];
        let mut out = Writer::new(&mut bytes);
        event.write(&mut out);
        assert_eq!(out.written(), bytes.len(), "encoded_len is exact");
        bytes
    }

    fn parts(name: &str) -> Vec<u8> {
        let mut parts = Vec::new();
        name_parts(name, &mut parts);
        parts
    }

    /// The generated message the same arguments describe.
    fn expected(
        name: &str,
        measurements: &[(&str, Value<'_>)],
        metadata: &[(&str, &str)],
        timestamp_ns: i64,
        request: RequestContext<'_>,
        decision: Decision,
    ) -> v1::TelemetryEvent {
        use telemetry_value::Value as V;
        let value = |v: &Value<'_>| TelemetryValue {
            value: Some(match *v {
                Value::Int(v) => V::IntValue(v),
                Value::Float(v) => V::FloatValue(v),
                Value::Str(v) => V::StringValue(v.into()),
            }),
        };
        let sampled = decision.sampling_rate > 0.0 && decision.sampling_rate < 1.0;
        v1::TelemetryEvent {
            event_parts: name.split('.').map(str::to_owned).collect(),
            measurements: measurements
                .iter()
                .map(|(k, v)| ((*k).to_owned(), value(v)))
                .collect(),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            timestamp_ns,
            correlation_id: request.correlation_id.into(),
            sequence: 0,
            sampling_rate: if sampled { decision.sampling_rate } else { 0.0 },
            control_version: decision.control_version,
            trace_id: request
                .trace
                .map_or_else(Vec::new, |t| t.trace_id.as_bytes().to_vec()),
            span_id: request
                .trace
                .map_or_else(Vec::new, |t| t.span_id.as_bytes().to_vec()),
            parent_span_id: request
                .trace
                .and_then(|t| t.parent_span_id)
                .map_or_else(Vec::new, |p| p.as_bytes().to_vec()),
        }
    }

    #[test]
    fn matches_the_generated_encoding() {
        let trace: bridge_proto::trace::TraceParent =
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap();
        let trace = SpanContext::child_of(trace.trace_id, trace.span_id);
        let measurements = [
            ("tokens", Value::Int(512)),
            ("zero", Value::Int(0)),
            ("negative", Value::Int(-3)),
            ("latency_ms", Value::Float(12.5)),
            ("state", Value::Str("warm")),
            ("empty", Value::Str("")),
        ];
        let metadata = [("model", "llama"), ("", "")];
        let request = RequestContext {
            correlation_id: "req-1",
            trace: Some(&trace),
        };
        let decision = Decision {
            sampling_rate: 0.25,
            control_version: 9,
        };
        let name = parts("inference.stop");
        let bytes = encode(&Event {
            parts: &name,
            measurements: &measurements,
            metadata: &metadata,
            timestamp_ns: 1_700_000_000_000_000_000,
            request,
            decision,
        });
        let decoded = v1::TelemetryEvent::decode(bytes.as_slice()).unwrap();
        let expected = expected(
            "inference.stop",
            &measurements,
            &metadata,
            1_700_000_000_000_000_000,
            request,
            decision,
        );
        assert_eq!(decoded, expected);
        assert_eq!(bytes.len(), expected.encoded_len());
        assert_eq!(decoded.parent_span_id.len(), 8);
    }

    #[test]
    fn short_copies_copy_every_byte() {
        let source: Vec<u8> = (1..=80).collect();
        for len in 0..=80 {
            let mut copy = vec![0; len];
            copy_short(&mut copy, &source[..len]);
            assert_eq!(copy, source[..len], "{len} bytes");
        }
    }

    #[test]
    fn a_relayed_message_is_written_as_prost_encodes_it() {
        let mut event = v1::TelemetryEvent {
            event_parts: vec!["a".into(), "b".into()],
            correlation_id: "c".into(),
            timestamp_ns: 5,
            ..Default::default()
        };
        event.metadata.insert("k".into(), "v".into());
        let mut bytes = vec![0; event.encoded_len()];
        let mut out = Writer::new(&mut bytes);
        write_message(&event, &mut out);
        assert_eq!(out.written(), bytes.len());
        assert_eq!(bytes, event.encode_to_vec());
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z_]{1,12}",
            ".{0,40}",
            "[a-z]{120,200}",
        ]
    }

    fn value() -> impl Strategy<Value = (i64, f64, String, u8)> {
        // NaN is never equal to itself, so the comparison below could not hold.
        let float = any::<f64>().prop_filter("a number", |f| !f.is_nan());
        (any::<i64>(), float, text(), 0u8..3)
    }

    proptest! {
        /// Whatever the arguments, the bytes decode to the event the generated code would
        /// build from them, and are as long as `encoded_len` says.
        #[test]
        fn any_event_decodes_to_what_its_arguments_describe(
            name in "[a-z0-9_]{1,20}(\\.[a-z0-9_]{1,20}){0,5}",
            measurements in proptest::collection::vec((text(), value()), 0..6),
            metadata in proptest::collection::vec((text(), text()), 0..6),
            timestamp_ns in prop_oneof![Just(0i64), any::<i64>()],
            correlation_id in text(),
            trace in proptest::option::of((any::<[u8; 16]>(), any::<[u8; 8]>(), proptest::option::of(any::<[u8; 8]>()))),
            sampling_rate in prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0],
            control_version in prop_oneof![Just(0u64), any::<u64>()],
        ) {
            let measurements: Vec<(&str, Value<'_>)> = measurements
                .iter()
                .map(|(k, (i, f, s, kind))| {
                    let value = match kind {
                        0 => Value::Int(*i),
                        1 => Value::Float(*f),
                        _ => Value::Str(s),
                    };
                    (k.as_str(), value)
                })
                .collect();
            let metadata: Vec<(&str, &str)> =
                metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let trace = trace.and_then(|(trace, span, parent)| {
                let trace = TraceId::from_bytes(&trace).ok()?;
                let span = SpanId::from_bytes(&span).ok()?;
                let parent = parent.and_then(|p| SpanId::from_bytes(&p).ok());
                Some(SpanContext { trace_id: trace, span_id: span, parent_span_id: parent })
            });
            let request = RequestContext { correlation_id: &correlation_id, trace: trace.as_ref() };
            let decision = Decision { sampling_rate, control_version };
            let name_bytes = parts(&name);
            let bytes = encode(&Event {
                parts: &name_bytes,
                measurements: &measurements,
                metadata: &metadata,
                timestamp_ns,
                request,
                decision,
            });
            let decoded = v1::TelemetryEvent::decode(bytes.as_slice()).unwrap();
            let expected = expected(&name, &measurements, &metadata, timestamp_ns, request, decision);
            prop_assert_eq!(decoded, expected);
        }
    }
}
