//! `TelemetryEvent` as the hub receives it: the event's own bytes, and where the few fields the
//! hub reads are.
//!
//! Decoding every event into the generated struct builds two hash maps and a string per key and
//! value, only for the hub to encode them again for its subscribers; that was the largest part
//! of the hub's work per event. An [`EventView`] keeps the received encoding in one buffer,
//! records the name tokens, correlation id, timestamp, sequence, sampling rate and control
//! version, and checks (without building anything) that the measurements and metadata are
//! well-formed, so that every subscriber can decode what it is sent. A delivery then copies
//! the bytes as they are.

use std::ops::Range;

use bytes::{Buf, BufMut};
use prost::{
    DecodeError, Message,
    encoding::{
        DecodeContext, WireType, check_wire_type, decode_key, decode_varint, encode_key,
        encode_varint,
    },
};
use smallvec::SmallVec;

use crate::{
    fields::{
        map_entry,
        telemetry_event::{
            CONTROL_VERSION, CORRELATION_ID, EVENT_PARTS, MEASUREMENTS, METADATA, SAMPLING_RATE,
            SEQUENCE, TIMESTAMP_NS,
        },
        telemetry_value::{FLOAT_VALUE, INT_VALUE, STRING_VALUE},
    },
    v1::TelemetryEvent,
};

/// A received `TelemetryEvent`; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventView {
    /// The event re-assembled field by field, in the order received: the same encoding.
    bytes: Vec<u8>,
    parts: SmallVec<[Range<u32>; 4]>,
    correlation_id: Range<u32>,
    pub timestamp_ns: i64,
    pub sequence: u64,
    pub sampling_rate: f64,
    pub control_version: u64,
    /// What is wrong with the event, if anything (its bytes are kept either way).
    problem: Option<&'static str>,
    /// Measurement and metadata entries.
    entries: u32,
    /// Longest name token, correlation id, map key or string value, in bytes.
    longest_string: u32,
}

impl EventView {
    /// The event's name tokens.
    pub fn parts(&self) -> impl Iterator<Item = &str> + Clone {
        self.parts.iter().map(|range| self.text(range))
    }

    /// The dotted name, for messages.
    pub fn name(&self) -> String {
        self.parts().collect::<Vec<_>>().join(".")
    }

    pub fn first_part(&self) -> Option<&str> {
        self.parts.first().map(|range| self.text(range))
    }

    pub fn correlation_id(&self) -> &str {
        self.text(&self.correlation_id)
    }

    /// Why the event cannot be delivered (bad UTF-8 or a malformed map entry), if so.
    pub fn problem(&self) -> Option<&'static str> {
        self.problem
    }

    /// How big the event is, for the hub's limits.
    pub fn shape(&self) -> EventShape {
        EventShape {
            parts: self.parts.len(),
            entries: self.entries as usize,
            longest_string: self.longest_string as usize,
        }
    }

    /// The encoded event, as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole event, decoded (for the rare events whose measurements the hub reads).
    pub fn to_event(&self) -> Result<TelemetryEvent, DecodeError> {
        TelemetryEvent::decode(self.bytes.as_slice())
    }

    /// A view of an event built locally.
    pub fn from_event(event: &TelemetryEvent) -> Result<Self, DecodeError> {
        <Self as Message>::decode(event.encode_to_vec().as_slice())
    }

    fn text(&self, range: &Range<u32>) -> &str {
        // Ranges are recorded only for fields that were checked to be UTF-8.
        std::str::from_utf8(&self.bytes[range.start as usize..range.end as usize]).unwrap_or("")
    }

    /// Copies a length-delimited field's payload; returns its range in `bytes`.
    fn copy_delimited(&mut self, tag: u32, buf: &mut impl Buf) -> Result<Range<u32>, DecodeError> {
        let len = decode_varint(buf)?;
        let len = usize::try_from(len).map_err(|_| malformed("length overflow"))?;
        if len > buf.remaining() {
            return Err(malformed("buffer underflow"));
        }
        encode_key(tag, WireType::LengthDelimited, &mut self.bytes);
        encode_varint(len as u64, &mut self.bytes);
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        buf.copy_to_slice(&mut self.bytes[start..]);
        let end = u32::try_from(self.bytes.len()).map_err(|_| malformed("event too large"))?;
        Ok(start as u32..end)
    }

    fn note(&mut self, problem: &'static str) {
        self.problem.get_or_insert(problem);
    }

    fn utf8(&mut self, range: &Range<u32>, problem: &'static str) {
        if std::str::from_utf8(&self.bytes[range.start as usize..range.end as usize]).is_err() {
            self.note(problem);
        }
    }
}

impl Message for EventView {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// prost's loop, after reserving room for the whole event: re-encoding never makes a field
    /// longer, so this is the one allocation the event takes (instead of one per doubling).
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), DecodeError> {
        self.bytes.reserve(buf.remaining());
        let ctx = DecodeContext::default();
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            self.merge_field(tag, wire_type, &mut buf, ctx.clone())?;
        }
        Ok(())
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            EVENT_PARTS | CORRELATION_ID => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
                let range = self.copy_delimited(tag, buf)?;
                self.longest_string = self.longest_string.max(range.end - range.start);
                self.utf8(&range, "a name token or the correlation id is not UTF-8");
                if tag == EVENT_PARTS {
                    self.parts.push(range);
                } else {
                    self.correlation_id = range;
                }
            }
            MEASUREMENTS | METADATA => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
                let range = self.copy_delimited(tag, buf)?;
                let entry = &self.bytes[range.start as usize..range.end as usize];
                self.entries = self.entries.saturating_add(1);
                match check_entry(entry, tag == MEASUREMENTS) {
                    Ok(longest) => self.longest_string = self.longest_string.max(longest),
                    Err(problem) => self.note(problem),
                }
            }
            TIMESTAMP_NS | SEQUENCE | CONTROL_VERSION => {
                check_wire_type(WireType::Varint, wire_type)?;
                let value = decode_varint(buf)?;
                encode_key(tag, WireType::Varint, &mut self.bytes);
                encode_varint(value, &mut self.bytes);
                match tag {
                    TIMESTAMP_NS => self.timestamp_ns = value as i64,
                    SEQUENCE => self.sequence = value,
                    _ => self.control_version = value,
                }
            }
            SAMPLING_RATE => {
                check_wire_type(WireType::SixtyFourBit, wire_type)?;
                if buf.remaining() < 8 {
                    return Err(malformed("buffer underflow"));
                }
                self.sampling_rate = buf.get_f64_le();
                encode_key(tag, WireType::SixtyFourBit, &mut self.bytes);
                self.bytes.put_f64_le(self.sampling_rate);
            }
            _ => {
                // A field from a newer contract: passed on as it came.
                match wire_type {
                    WireType::LengthDelimited => {
                        self.copy_delimited(tag, buf)?;
                    }
                    WireType::Varint => {
                        let value = decode_varint(buf)?;
                        encode_key(tag, WireType::Varint, &mut self.bytes);
                        encode_varint(value, &mut self.bytes);
                    }
                    _ => prost::encoding::skip_field(wire_type, tag, buf, ctx)?,
                }
            }
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// prost has no public constructor for its decode error other than this deprecated one, and a
/// truncated message must fail like it would with the generated code.
#[allow(deprecated)]
fn malformed(what: &'static str) -> DecodeError {
    DecodeError::new(what)
}

/// An event's size in the terms of the hub's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventShape {
    /// Name tokens.
    pub parts: usize,
    /// Measurement and metadata entries.
    pub entries: usize,
    /// Longest name token, correlation id, map key or string value, in bytes.
    pub longest_string: usize,
}

/// Checks a `measurements` (`TelemetryValue` values) or `metadata` (string values) map entry
/// the way a subscriber's decoder will read it, without building anything. Returns the length
/// of its longest string.
fn check_entry(mut entry: &[u8], measurement: bool) -> Result<u32, &'static str> {
    const BAD: &str = "a measurement or metadata entry is malformed";
    let mut longest = 0;
    while entry.has_remaining() {
        let (tag, wire_type) = decode_key(&mut entry).map_err(|_| BAD)?;
        match (tag, wire_type) {
            (map_entry::KEY, WireType::LengthDelimited) => {
                let key = delimited(&mut entry)?;
                longest = longest.max(key.len());
                std::str::from_utf8(key).map_err(|_| "a map key is not UTF-8")?;
            }
            (map_entry::VALUE, WireType::LengthDelimited) if measurement => {
                longest = longest.max(check_value(delimited(&mut entry)?)?);
            }
            (map_entry::VALUE, WireType::LengthDelimited) => {
                let value = delimited(&mut entry)?;
                longest = longest.max(value.len());
                std::str::from_utf8(value).map_err(|_| "a metadata value is not UTF-8")?;
            }
            (map_entry::KEY | map_entry::VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut entry)?,
        }
    }
    // Entries are slices of a message whose length fits in u32.
    Ok(u32::try_from(longest).unwrap_or(u32::MAX))
}

/// Checks a `TelemetryValue`; returns the length of its string, if it holds one.
fn check_value(mut value: &[u8]) -> Result<usize, &'static str> {
    const BAD: &str = "a measurement value is malformed";
    let mut longest = 0;
    while value.has_remaining() {
        let (tag, wire_type) = decode_key(&mut value).map_err(|_| BAD)?;
        match (tag, wire_type) {
            (INT_VALUE, WireType::Varint) => {
                decode_varint(&mut value).map_err(|_| BAD)?;
            }
            (FLOAT_VALUE, WireType::SixtyFourBit) => {
                value = value.get(8..).ok_or(BAD)?;
            }
            (STRING_VALUE, WireType::LengthDelimited) => {
                let text = delimited(&mut value)?;
                longest = longest.max(text.len());
                std::str::from_utf8(text).map_err(|_| "a measurement string is not UTF-8")?;
            }
            (INT_VALUE | FLOAT_VALUE | STRING_VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut value)?,
        }
    }
    Ok(longest)
}

fn delimited<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], &'static str> {
    const BAD: &str = "a length is out of bounds";
    let len = usize::try_from(decode_varint(bytes).map_err(|_| BAD)?).map_err(|_| BAD)?;
    let (body, rest) = bytes.split_at_checked(len).ok_or(BAD)?;
    *bytes = rest;
    Ok(body)
}

fn skip(wire_type: WireType, bytes: &mut &[u8]) -> Result<(), &'static str> {
    const BAD: &str = "an unknown field is malformed";
    match wire_type {
        WireType::Varint => decode_varint(bytes).map(drop).map_err(|_| BAD),
        WireType::LengthDelimited => delimited(bytes).map(drop),
        WireType::SixtyFourBit => {
            *bytes = bytes.get(8..).ok_or(BAD)?;
            Ok(())
        }
        WireType::ThirtyTwoBit => {
            *bytes = bytes.get(4..).ok_or(BAD)?;
            Ok(())
        }
        _ => Err(BAD),
    }
}

/// A measurement's value, read where it lies in the event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Int(i64),
    Float(f64),
    String(&'a str),
}

/// A measurement or metadata entry, read where it lies in the event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry<'a> {
    /// A measurement's key and value (`None`: a `TelemetryValue` with nothing set).
    Measurement(&'a str, Option<ValueRef<'a>>),
    Metadata(&'a str, &'a str),
}

impl EventView {
    /// The measurement and metadata entries in the order received, read in place.
    ///
    /// For the hub's readers of a few fields (per-model metrics), which must not pay for
    /// [`EventView::to_event`]'s maps on every event. A key that repeats is read each time; a
    /// decoder keeps the last, as [`EventView::measurement`] and [`EventView::metadata`] do.
    /// The walk ends at anything malformed, which a view without a [`EventView::problem`] has
    /// none of.
    pub fn entries(&self) -> Entries<'_> {
        Entries { rest: &self.bytes }
    }

    /// The value of measurement `key`, as a decoder would read it.
    pub fn measurement(&self, key: &str) -> Option<ValueRef<'_>> {
        self.entries()
            .filter_map(|entry| match entry {
                Entry::Measurement(k, value) if k == key => Some(value),
                _ => None,
            })
            .last()
            .flatten()
    }

    /// The value of metadata `key`, as a decoder would read it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.entries()
            .filter_map(|entry| match entry {
                Entry::Metadata(k, value) if k == key => Some(value),
                _ => None,
            })
            .last()
    }
}

/// The iterator of [`EventView::entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        while !self.rest.is_empty() {
            match self.field() {
                Ok(Some(entry)) => return Some(entry),
                Ok(None) => {}
                Err(_) => self.rest = &[],
            }
        }
        None
    }
}

impl<'a> Entries<'a> {
    /// Reads the next field of the event: an entry, or `None` for any other field.
    fn field(&mut self) -> Result<Option<Entry<'a>>, &'static str> {
        let (tag, wire_type) = decode_key(&mut self.rest).map_err(|_| "a key is malformed")?;
        match (tag, wire_type) {
            (MEASUREMENTS | METADATA, WireType::LengthDelimited) => {
                read_entry(delimited(&mut self.rest)?, tag == MEASUREMENTS).map(Some)
            }
            (_, wire_type) => skip(wire_type, &mut self.rest).map(|()| None),
        }
    }
}

/// A map entry that [`check_entry`] accepts, read in place. Unset fields read as a decoder's
/// defaults; a field set twice, as its last value (for a `TelemetryValue`, a later one with
/// nothing set keeps the earlier value, as merging does).
fn read_entry(mut entry: &[u8], measurement: bool) -> Result<Entry<'_>, &'static str> {
    const BAD: &str = "a measurement or metadata entry is malformed";
    let (mut key, mut text, mut value) = ("", "", None);
    while entry.has_remaining() {
        let (tag, wire_type) = decode_key(&mut entry).map_err(|_| BAD)?;
        match (tag, wire_type) {
            (map_entry::KEY, WireType::LengthDelimited) => key = utf8(delimited(&mut entry)?)?,
            (map_entry::VALUE, WireType::LengthDelimited) if measurement => {
                value = read_value(delimited(&mut entry)?)?.or(value);
            }
            (map_entry::VALUE, WireType::LengthDelimited) => text = utf8(delimited(&mut entry)?)?,
            (map_entry::KEY | map_entry::VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut entry)?,
        }
    }
    Ok(if measurement {
        Entry::Measurement(key, value)
    } else {
        Entry::Metadata(key, text)
    })
}

/// A `TelemetryValue`: the member of its oneof set last, if any.
fn read_value(mut bytes: &[u8]) -> Result<Option<ValueRef<'_>>, &'static str> {
    const BAD: &str = "a measurement value is malformed";
    let mut value = None;
    while bytes.has_remaining() {
        let (tag, wire_type) = decode_key(&mut bytes).map_err(|_| BAD)?;
        match (tag, wire_type) {
            // int64 travels as its two's complement, as a varint.
            (INT_VALUE, WireType::Varint) => {
                value = Some(ValueRef::Int(
                    decode_varint(&mut bytes).map_err(|_| BAD)? as i64
                ));
            }
            (FLOAT_VALUE, WireType::SixtyFourBit) => {
                let (le, rest) = bytes.split_first_chunk::<8>().ok_or(BAD)?;
                value = Some(ValueRef::Float(f64::from_le_bytes(*le)));
                bytes = rest;
            }
            (STRING_VALUE, WireType::LengthDelimited) => {
                value = Some(ValueRef::String(utf8(delimited(&mut bytes)?)?));
            }
            (INT_VALUE | FLOAT_VALUE | STRING_VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut bytes)?,
        }
    }
    Ok(value)
}

fn utf8(bytes: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{TelemetryValue, telemetry_value::Value};

    fn event() -> TelemetryEvent {
        let value = |v| TelemetryValue { value: Some(v) };
        TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            measurements: [
                ("tokens".to_owned(), value(Value::IntValue(512))),
                ("ms".to_owned(), value(Value::FloatValue(1.5))),
                ("state".to_owned(), value(Value::StringValue("warm".into()))),
            ]
            .into(),
            metadata: [("model".to_owned(), "llama".to_owned())].into(),
            timestamp_ns: 1_795_000_000_000_000_000,
            correlation_id: "req-1".into(),
            sequence: 42,
            sampling_rate: 0.25,
            control_version: 7,
        }
    }

    #[test]
    fn reads_the_fields_the_hub_needs_and_keeps_the_encoding() {
        let original = event();
        let view = EventView::from_event(&original).unwrap();
        assert_eq!(view.parts().collect::<Vec<_>>(), ["inference", "stop"]);
        assert_eq!(view.name(), "inference.stop");
        assert_eq!(view.correlation_id(), "req-1");
        assert_eq!(
            (
                view.timestamp_ns,
                view.sequence,
                view.sampling_rate,
                view.control_version
            ),
            (1_795_000_000_000_000_000, 42, 0.25, 7)
        );
        assert_eq!(view.problem(), None);
        assert_eq!(view.as_bytes(), original.encode_to_vec().as_slice());
        assert_eq!(view.to_event().unwrap(), original);
    }

    #[test]
    fn malformed_maps_and_bad_utf8_are_problems_not_errors() {
        // A metadata entry whose value is not UTF-8: field 3, entry { 1: "k", 2: [0xff] }.
        let mut bytes = TelemetryEvent {
            event_parts: vec!["a".into()],
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0x1a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, 0xff]);
        let view = EventView::decode(bytes.as_slice()).unwrap();
        assert_eq!(view.problem(), Some("a metadata value is not UTF-8"));

        let mut bytes = vec![0x0a, 0x02, 0xc3, 0x28];
        bytes.extend_from_slice(&[0x2a, 0x01, b'x']);
        let view = EventView::decode(bytes.as_slice()).unwrap();
        assert!(view.problem().is_some());

        // A measurement whose value says int but carries a string: malformed.
        let bytes = [
            0x0a, 0x01, b'a', 0x12, 0x07, 0x0a, 0x01, b'k', 0x12, 0x02, 0x08, 0xff,
        ];
        assert!(EventView::decode(&bytes[..]).unwrap().problem().is_some());
    }

    #[test]
    fn shape_counts_what_the_limits_bound() {
        let view = EventView::from_event(&event()).unwrap();
        assert_eq!(
            view.shape(),
            EventShape {
                parts: 2,
                entries: 4,
                longest_string: "inference".len()
            }
        );
    }

    mod hostile {
        use proptest::prelude::*;

        use super::*;

        fn any_event() -> impl Strategy<Value = TelemetryEvent> {
            let value = prop_oneof![
                any::<i64>().prop_map(Value::IntValue),
                (-1e12..1e12f64).prop_map(Value::FloatValue),
                ".{0,12}".prop_map(Value::StringValue),
            ];
            (
                prop::collection::vec("[a-z]{1,6}", 0..5),
                prop::collection::hash_map(".{0,8}", value, 0..5),
                prop::collection::hash_map(".{0,8}", ".{0,8}", 0..5),
                (
                    any::<i64>(),
                    ".{0,10}",
                    any::<u64>(),
                    0.0..=1.0f64,
                    any::<u64>(),
                ),
            )
                .prop_map(|(parts, measurements, metadata, rest)| TelemetryEvent {
                    event_parts: parts,
                    measurements: measurements
                        .into_iter()
                        .map(|(k, v)| (k, TelemetryValue { value: Some(v) }))
                        .collect(),
                    metadata,
                    timestamp_ns: rest.0,
                    correlation_id: rest.1,
                    sequence: rest.2,
                    sampling_rate: rest.3,
                    control_version: rest.4,
                })
        }

        proptest! {
            /// Whatever arrives from the network: an error or a view, never a panic; and a view
            /// without a problem is something every subscriber's generated decoder accepts.
            #[test]
            fn arbitrary_bytes_never_panic_and_clean_views_decode(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(view) = EventView::decode(bytes.as_slice()) {
                    let _ = (view.name(), view.correlation_id(), view.shape());
                    if view.problem().is_none() {
                        prop_assert!(view.to_event().is_ok());
                    }
                }
            }

            /// A well-formed event is read exactly, and delivered byte for byte.
            #[test]
            fn well_formed_events_round_trip(original in any_event()) {
                let bytes = original.encode_to_vec();
                let view = EventView::decode(bytes.as_slice()).unwrap();
                prop_assert_eq!(view.problem(), None);
                prop_assert_eq!(view.as_bytes(), bytes.as_slice());
                prop_assert_eq!(view.parts().collect::<Vec<_>>(), original.event_parts.clone());
                prop_assert_eq!(view.correlation_id(), original.correlation_id.as_str());
                let entries = original.measurements.len() + original.metadata.len();
                prop_assert_eq!(view.shape().entries, entries);
                prop_assert_eq!(view.to_event().unwrap(), original);
            }

            /// Damaging a well-formed event anywhere gives an error or a flagged view, never a
            /// panic or a view that subscribers cannot decode.
            #[test]
            fn damaged_events_are_caught(original in any_event(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
                let mut bytes = original.encode_to_vec();
                if bytes.is_empty() {
                    return Ok(());
                }
                let at = at.index(bytes.len());
                bytes[at] = byte;
                bytes.truncate(cut.index(bytes.len()) + 1);
                if let Ok(view) = EventView::decode(bytes.as_slice())
                    && view.problem().is_none()
                {
                    prop_assert!(view.to_event().is_ok());
                }
            }
        }
    }

    #[test]
    fn unknown_fields_pass_through() {
        let mut bytes = event().encode_to_vec();
        // Field 99, varint 5; field 100, bytes "zz".
        bytes.extend_from_slice(&[0x98, 0x06, 0x05, 0xa2, 0x06, 0x02, b'z', b'z']);
        let view = EventView::decode(bytes.as_slice()).unwrap();
        assert_eq!(view.as_bytes(), bytes.as_slice());
        assert_eq!(view.to_event().unwrap(), event());
    }

    /// Reading entries in place, as the per-model metrics do.
    mod entries {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        fn value(v: Value) -> TelemetryValue {
            TelemetryValue { value: Some(v) }
        }

        fn view(event: &TelemetryEvent) -> EventView {
            EventView::from_event(event).unwrap()
        }

        #[test]
        fn reads_each_type_and_tells_measurements_from_metadata() {
            let view = view(&TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                measurements: [
                    ("duration_ns".to_owned(), value(Value::IntValue(48_250_000))),
                    ("behind_ns".to_owned(), value(Value::IntValue(-7))),
                    ("ratio".to_owned(), value(Value::FloatValue(0.5))),
                    ("state".to_owned(), value(Value::StringValue("warm".into()))),
                    ("unset".to_owned(), TelemetryValue { value: None }),
                ]
                .into(),
                metadata: [("model".to_owned(), "llama".to_owned())].into(),
                correlation_id: "req-1".into(),
                ..Default::default()
            });
            assert_eq!(
                view.measurement("duration_ns"),
                Some(ValueRef::Int(48_250_000))
            );
            assert_eq!(view.measurement("behind_ns"), Some(ValueRef::Int(-7)));
            assert_eq!(view.measurement("ratio"), Some(ValueRef::Float(0.5)));
            assert_eq!(view.measurement("state"), Some(ValueRef::String("warm")));
            assert_eq!(view.measurement("unset"), None);
            assert_eq!(view.measurement("absent"), None);
            assert_eq!(view.measurement("model"), None);
            assert_eq!(view.metadata("model"), Some("llama"));
            assert_eq!(view.metadata("duration_ns"), None);
            assert_eq!(view.entries().count(), 6);
        }

        #[test]
        fn a_repeated_key_reads_as_its_last_value() {
            // Two encodings back to back are one message, merged: the later entry wins.
            let first = TelemetryEvent {
                measurements: [("n".to_owned(), value(Value::IntValue(1)))].into(),
                metadata: [("model".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            };
            let second = TelemetryEvent {
                measurements: [("n".to_owned(), value(Value::FloatValue(2.0)))].into(),
                metadata: [("model".to_owned(), "b".to_owned())].into(),
                ..Default::default()
            };
            let mut bytes = first.encode_to_vec();
            bytes.extend(second.encode_to_vec());
            let view = EventView::decode(bytes.as_slice()).unwrap();
            assert_eq!(view.measurement("n"), Some(ValueRef::Float(2.0)));
            assert_eq!(view.metadata("model"), Some("b"));
            assert_eq!(view.entries().count(), 4);
        }

        #[test]
        fn entries_without_key_or_value_read_as_defaults() {
            // Field 2 entry {2: {}} (no key, an empty value); field 3 entry {1: "k"} (no value).
            let bytes = [0x12, 0x02, 0x12, 0x00, 0x1a, 0x03, 0x0a, 0x01, b'k'];
            let view = EventView::decode(&bytes[..]).unwrap();
            assert_eq!(view.problem(), None);
            assert_eq!(
                view.entries().collect::<Vec<_>>(),
                [Entry::Measurement("", None), Entry::Metadata("k", "")]
            );
        }

        #[test]
        fn the_walk_stops_at_a_malformed_entry() {
            // A good metadata entry, then a measurement whose int value is cut short.
            let bytes = [
                0x1a, 0x03, 0x0a, 0x01, b'k', 0x12, 0x07, 0x0a, 0x01, b'n', 0x12, 0x02, 0x08, 0xff,
            ];
            let view = EventView::decode(&bytes[..]).unwrap();
            assert!(view.problem().is_some());
            assert_eq!(
                view.entries().collect::<Vec<_>>(),
                [Entry::Metadata("k", "")]
            );
            assert_eq!(view.measurement("n"), None);
        }

        fn any_maps() -> impl Strategy<Value = TelemetryEvent> {
            let value = prop_oneof![
                any::<i64>().prop_map(Value::IntValue),
                any::<f64>()
                    .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                    .prop_map(Value::FloatValue),
                ".{0,12}".prop_map(Value::StringValue),
            ];
            (
                prop::collection::hash_map("[a-c]{0,2}", prop::option::of(value), 0..5),
                prop::collection::hash_map("[a-c]{0,2}", ".{0,8}", 0..5),
            )
                .prop_map(|(measurements, metadata)| TelemetryEvent {
                    event_parts: vec!["inference".into(), "stop".into()],
                    measurements: measurements
                        .into_iter()
                        .map(|(k, value)| (k, TelemetryValue { value }))
                        .collect(),
                    metadata,
                    ..Default::default()
                })
        }

        fn as_ref(value: &Value) -> ValueRef<'_> {
            match value {
                Value::IntValue(v) => ValueRef::Int(*v),
                Value::FloatValue(v) => ValueRef::Float(*v),
                Value::StringValue(v) => ValueRef::String(v),
            }
        }

        proptest! {
            /// Whatever the entries and however they repeat (two messages back to back merge),
            /// reading in place agrees with the generated decoder.
            #[test]
            fn reads_what_the_decoder_reads(a in any_maps(), b in any_maps()) {
                let mut bytes = a.encode_to_vec();
                bytes.extend(b.encode_to_vec());
                let decoded = TelemetryEvent::decode(bytes.as_slice()).unwrap();
                let view = EventView::decode(bytes.as_slice()).unwrap();
                for (key, value) in &decoded.measurements {
                    prop_assert_eq!(view.measurement(key), value.value.as_ref().map(as_ref), "{}", key);
                }
                for (key, value) in &decoded.metadata {
                    prop_assert_eq!(view.metadata(key), Some(value.as_str()), "{}", key);
                }
                let mut measurements = HashMap::new();
                let mut metadata = HashMap::new();
                for entry in view.entries() {
                    match entry {
                        Entry::Measurement(k, v) => {
                            measurements.insert(k, v);
                        }
                        Entry::Metadata(k, v) => {
                            metadata.insert(k, v);
                        }
                    }
                }
                prop_assert_eq!(measurements.len(), decoded.measurements.len());
                prop_assert_eq!(metadata.len(), decoded.metadata.len());
            }

            /// Reading the entries of anything that decodes never panics.
            #[test]
            fn entries_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(view) = EventView::decode(bytes.as_slice()) {
                    let _ = (view.entries().count(), view.measurement("a"), view.metadata("a"));
                }
            }
        }
    }
}
