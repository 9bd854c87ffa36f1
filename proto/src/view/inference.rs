//! The fields of an inference call's end (`inference.stop` / `.exception`) that the hub's
//! per-model metrics read, found by the walk that checks the event while it is decoded.
//!
//! Reading them afterwards with [`EventView::lookup`] walks every entry a second time, which was
//! most of what the metrics cost ingest per call. Instead, the decoding walk, once it meets the
//! first map entry of an event named `inference.stop` or `.exception`, keeps the value of each of
//! the conventions' fields as it parses it for its check; other events pay one branch per entry. Encoders write the name
//! (field 1) before the maps; for an event that does not, the index is not trusted and the
//! fields are looked up.

use std::ops::Range;

use super::{EventView, RawValue, ValueRef};
use crate::protocol::{inference, span};

/// How an inference call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// `inference.stop`.
    Stop,
    /// `inference.exception`.
    Exception,
}

/// The conventions' fields of an `inference.stop` or `.exception`, as they lie in the event:
/// values the event does not carry are `None`. Measurements are returned as sent (the
/// conventions make them ints; what to do with another type is the reader's choice). The
/// metadata values are bytes as they lie, checked to be UTF-8 when the event was received and
/// not again: the hub's metrics compare them with the last model and the result values, and
/// read a model's name as text only when they first meet it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InferenceCall<'a> {
    pub end: CallEnd,
    pub model: Option<&'a [u8]>,
    pub result: Option<&'a [u8]>,
    pub duration_ns: Option<ValueRef<'a>>,
    pub time_to_first_token_ns: Option<ValueRef<'a>>,
    pub queue_wait_ns: Option<ValueRef<'a>>,
    pub input_tokens: Option<ValueRef<'a>>,
    pub output_tokens: Option<ValueRef<'a>>,
}

const MEASUREMENTS: [&str; 5] = [
    inference::DURATION_NS,
    inference::TIME_TO_FIRST_TOKEN_NS,
    inference::QUEUE_WAIT_NS,
    inference::INPUT_TOKENS,
    inference::OUTPUT_TOKENS,
];
const METADATA: [&str; 2] = [inference::MODEL, inference::RESULT];
const FIELDS: usize = MEASUREMENTS.len() + METADATA.len();

const STOP: [&str; 2] = [inference::OPERATION, span::STOP];
const EXCEPTION: [&str; 2] = [inference::OPERATION, span::EXCEPTION];

/// What the decoding walk read of the fields, in the order of [`MEASUREMENTS`] then
/// [`METADATA`]: the values it parsed while checking them, so that reading the call does not
/// parse them again.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct CallIndex {
    /// How many name tokens the event had when its first map entry was decoded: the index
    /// describes the event only while that is still the count.
    decided_at_parts: Option<u32>,
    end: Option<CallEnd>,
    values: [Indexed; FIELDS],
}

/// A field's value as the walk found it; text as where it lies in the view's bytes.
#[derive(Debug, Clone, Default, PartialEq)]
enum Indexed {
    /// No entry, or a measurement with nothing set.
    #[default]
    Absent,
    Int(i64),
    Float(f64),
    Text(Range<u32>),
}

impl CallIndex {
    /// The slot of a checked map entry's key, if it is one of the fields read.
    #[inline]
    pub(super) fn slot(key: &[u8], measurement: bool) -> Option<usize> {
        if measurement {
            MEASUREMENTS.iter().position(|k| k.as_bytes() == key)
        } else {
            METADATA
                .iter()
                .position(|k| k.as_bytes() == key)
                .map(|at| MEASUREMENTS.len() + at)
        }
    }

    /// Notes the value of the field in `slot`, read from the view's bytes starting at `base`;
    /// a later entry with the same key replaces it, as a decoder keeps the last.
    #[inline]
    pub(super) fn found(&mut self, slot: usize, value: Option<RawValue<'_>>, base: *const u8) {
        self.values[slot] = match value {
            None => Indexed::Absent,
            Some(RawValue::Int(v)) => Indexed::Int(v),
            Some(RawValue::Float(v)) => Indexed::Float(v),
            Some(RawValue::String([])) => Indexed::Text(0..0),
            Some(RawValue::String(text)) => {
                // `text` lies in the bytes that start at `base`, whose length fits in u32.
                let start = (text.as_ptr() as usize).saturating_sub(base as usize);
                match (u32::try_from(start), u32::try_from(start + text.len())) {
                    (Ok(start), Ok(end)) => Indexed::Text(start..end),
                    _ => Indexed::Absent,
                }
            }
        };
    }
}

impl EventView {
    /// Whether the map entries being decoded are to be indexed: decided at the first one, from
    /// the name so far.
    #[inline]
    pub(super) fn indexes_call(&mut self) -> bool {
        if self.call.decided_at_parts.is_none() {
            self.call.decided_at_parts = Some(u32::try_from(self.parts.len()).unwrap_or(u32::MAX));
            self.call.end = self.call_end();
        }
        self.call.end.is_some()
    }

    fn call_end(&self) -> Option<CallEnd> {
        if self.is_named(&STOP) {
            Some(CallEnd::Stop)
        } else if self.is_named(&EXCEPTION) {
            Some(CallEnd::Exception)
        } else {
            None
        }
    }

    /// The conventions' fields, if the event is an `inference.stop` or `.exception`.
    #[inline]
    pub fn inference_call(&self) -> Option<InferenceCall<'_>> {
        let indexed = self
            .call
            .decided_at_parts
            .is_some_and(|parts| usize::try_from(parts).is_ok_and(|p| p == self.parts.len()));
        if !indexed {
            return self.inference_call_looked_up();
        }
        let end = self.call.end?;
        let measurement = |slot: usize| match &self.call.values[slot] {
            Indexed::Absent => None,
            Indexed::Int(v) => Some(ValueRef::Int(*v)),
            Indexed::Float(v) => Some(ValueRef::Float(*v)),
            Indexed::Text(range) => Some(ValueRef::String(self.text(range))),
        };
        let metadata = |slot: usize| match &self.call.values[slot] {
            Indexed::Text(range) => Some(self.slice(range)),
            _ => None,
        };
        Some(InferenceCall {
            end,
            duration_ns: measurement(0),
            time_to_first_token_ns: measurement(1),
            queue_wait_ns: measurement(2),
            input_tokens: measurement(3),
            output_tokens: measurement(4),
            model: metadata(5),
            result: metadata(6),
        })
    }

    /// For an event whose name came after its maps (or that has none).
    #[cold]
    fn inference_call_looked_up(&self) -> Option<InferenceCall<'_>> {
        let end = self.call_end()?;
        let (
            [
                duration_ns,
                time_to_first_token_ns,
                queue_wait_ns,
                input_tokens,
                output_tokens,
            ],
            [model, result],
        ) = self.lookup(MEASUREMENTS, METADATA);
        Some(InferenceCall {
            end,
            model: model.map(str::as_bytes),
            result: result.map(str::as_bytes),
            duration_ns,
            time_to_first_token_ns,
            queue_wait_ns,
            input_tokens,
            output_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::v1::{TelemetryEvent, TelemetryValue, telemetry_value::Value};

    fn as_ref(value: &Value) -> ValueRef<'_> {
        match value {
            Value::IntValue(v) => ValueRef::Int(*v),
            Value::FloatValue(v) => ValueRef::Float(*v),
            Value::StringValue(v) => ValueRef::String(v),
        }
    }

    /// What the generated decoder makes of the same bytes.
    fn expected(decoded: &TelemetryEvent) -> Option<InferenceCall<'_>> {
        let end = match decoded.event_parts.join(".").as_str() {
            inference::STOP => CallEnd::Stop,
            inference::EXCEPTION => CallEnd::Exception,
            _ => return None,
        };
        let measurement = |key| decoded.measurements.get(key)?.value.as_ref().map(as_ref);
        let metadata = |key| decoded.metadata.get(key).map(String::as_bytes);
        Some(InferenceCall {
            end,
            model: metadata(inference::MODEL),
            result: metadata(inference::RESULT),
            duration_ns: measurement(inference::DURATION_NS),
            time_to_first_token_ns: measurement(inference::TIME_TO_FIRST_TOKEN_NS),
            queue_wait_ns: measurement(inference::QUEUE_WAIT_NS),
            input_tokens: measurement(inference::INPUT_TOKENS),
            output_tokens: measurement(inference::OUTPUT_TOKENS),
        })
    }

    fn any_key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(MEASUREMENTS.to_vec()).prop_map(str::to_owned),
            prop::sample::select(METADATA.to_vec()).prop_map(str::to_owned),
            "[a-z_]{0,6}",
        ]
    }

    fn any_maps() -> impl Strategy<Value = TelemetryEvent> {
        let value = prop_oneof![
            any::<i64>().prop_map(Value::IntValue),
            (0.0..1e12f64).prop_map(Value::FloatValue),
            ".{0,8}".prop_map(Value::StringValue),
        ];
        (
            prop::collection::hash_map(any_key(), prop::option::of(value), 0..8),
            prop::collection::hash_map(any_key(), ".{0,8}", 0..5),
        )
            .prop_map(|(measurements, metadata)| TelemetryEvent {
                measurements: measurements
                    .into_iter()
                    .map(|(k, value)| (k, TelemetryValue { value }))
                    .collect(),
                metadata,
                ..Default::default()
            })
    }

    fn any_name() -> impl Strategy<Value = Vec<String>> {
        prop::sample::select(vec![
            inference::STOP,
            inference::EXCEPTION,
            inference::START,
            "inference.stop.late",
            "inference",
            "gpu.metrics",
        ])
        .prop_map(|name| name.split('.').map(str::to_owned).collect())
    }

    proptest! {
        /// Whatever the entries, however they repeat (two messages back to back merge) and
        /// wherever the name lies, the call read agrees with the generated decoder.
        #[test]
        fn reads_what_the_decoder_reads(
            name in any_name(),
            a in any_maps(),
            b in any_maps(),
            name_first in any::<bool>(),
        ) {
            let name = TelemetryEvent { event_parts: name, ..Default::default() }.encode_to_vec();
            let mut bytes = Vec::new();
            if name_first {
                bytes.extend(&name);
            }
            bytes.extend(a.encode_to_vec());
            bytes.extend(b.encode_to_vec());
            if !name_first {
                bytes.extend(&name);
            }
            let decoded = TelemetryEvent::decode(bytes.as_slice()).unwrap();
            let view = EventView::decode(bytes.as_slice()).unwrap();
            prop_assert_eq!(view.inference_call(), expected(&decoded));
        }
    }

    #[test]
    fn a_call_without_fields_has_none() {
        let event = TelemetryEvent {
            event_parts: vec!["inference".into(), "exception".into()],
            ..Default::default()
        };
        let view = EventView::decode(event.encode_to_vec().as_slice()).unwrap();
        let call = view.inference_call().unwrap();
        assert_eq!(
            (call.end, call.model, call.duration_ns),
            (CallEnd::Exception, None, None)
        );
    }
}
