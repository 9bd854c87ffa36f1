//! `TelemetryEvent` as the hub receives it: the event's own bytes, and where the few fields the
//! hub reads are.
//!
//! Decoding every event into the generated struct builds two hash maps and a string per key and
//! value, only for the hub to encode them again for its subscribers; that was the largest part
//! of the hub's work per event. An [`EventView`] keeps the received encoding in one buffer,
//! records the name tokens, correlation id, trace context, timestamp, sequence, sampling rate
//! and control version, and checks (without building anything) that the measurements and metadata are
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

mod delivered;
mod inference;
mod relayed;

use self::inference::CallIndex;
pub use self::{
    delivered::{DeliveredEvent, DeliveryRef, UncheckedEntry},
    inference::{CallEnd, InferenceCall},
    relayed::RelayedDelivery,
};

use crate::{
    fields::{
        event_delivery, map_entry, subscribe_response,
        telemetry_event::{
            CONTROL_VERSION, CORRELATION_ID, EVENT_PARTS, MEASUREMENTS, METADATA, PARENT_SPAN_ID,
            SAMPLING_RATE, SEQUENCE, SPAN_ID, TIMESTAMP_NS, TRACE_ID,
        },
        telemetry_value::{FLOAT_VALUE, INT_VALUE, STRING_VALUE},
    },
    sampling::SamplingKey,
    trace::{SpanId, TraceId},
    v1::TelemetryEvent,
};

/// A received `TelemetryEvent`; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventView {
    /// The event re-assembled field by field, in the order received: the same encoding.
    bytes: Vec<u8>,
    parts: SmallVec<[Range<u32>; 4]>,
    correlation_id: Range<u32>,
    trace_id: Range<u32>,
    span_id: Range<u32>,
    parent_span_id: Range<u32>,
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
    /// Where the fields of an inference call's end lie, if the event is one.
    call: CallIndex,
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

    /// The trace id's bytes: 16, or none (a view with another length has a problem).
    pub fn trace_id(&self) -> &[u8] {
        self.slice(&self.trace_id)
    }

    /// The span id's bytes: 8, or none.
    pub fn span_id(&self) -> &[u8] {
        self.slice(&self.span_id)
    }

    /// The parent span id's bytes: 8, or none.
    pub fn parent_span_id(&self) -> &[u8] {
        self.slice(&self.parent_span_id)
    }

    /// What the event's sampling decision is a function of.
    #[inline]
    pub fn sampling_key(&self) -> SamplingKey<'_> {
        SamplingKey::new(self.trace_id(), self.correlation_id())
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

    fn slice(&self, range: &Range<u32>) -> &[u8] {
        &self.bytes[range.start as usize..range.end as usize]
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
                let measurement = tag == MEASUREMENTS;
                let indexing = self.indexes_call();
                let range = self.copy_delimited(tag, buf)?;
                let entry = &self.bytes[range.start as usize..range.end as usize];
                self.entries = self.entries.saturating_add(1);
                match check_entry(entry, measurement) {
                    Ok(checked) => {
                        if indexing && let Some(slot) = CallIndex::slot(checked.key, measurement) {
                            self.call.found(slot, checked.value, self.bytes.as_ptr());
                        }
                        self.longest_string = self.longest_string.max(checked.longest);
                    }
                    Err(problem) => self.note(problem),
                }
            }
            TRACE_ID | SPAN_ID | PARENT_SPAN_ID => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
                let range = self.copy_delimited(tag, buf)?;
                if let Some(problem) = id_problem(tag, self.slice(&range)) {
                    self.note(problem);
                }
                match tag {
                    TRACE_ID => self.trace_id = range,
                    SPAN_ID => self.span_id = range,
                    _ => self.parent_span_id = range,
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

/// A map entry that [`check_entry`] checked: its longest string, key, and value as a decoder
/// reads it (a measurement's `None`: nothing set).
struct CheckedEntry<'a> {
    longest: u32,
    key: &'a [u8],
    value: Option<RawValue<'a>>,
}

/// Checks a `measurements` (`TelemetryValue` values) or `metadata` (string values) map entry
/// the way a subscriber's decoder will read it, without building anything; the value read on
/// the way is kept for the fields an inference call's end is indexed by.
/// What is wrong with the bytes of a trace id (`TRACE_ID`) or span id (`SPAN_ID`,
/// `PARENT_SPAN_ID`), if anything. Empty is proto3's "absent"; anything else must be an id an
/// OTLP receiver (or any tracing backend) would accept.
fn id_problem(tag: u32, id: &[u8]) -> Option<&'static str> {
    let valid = if tag == TRACE_ID {
        TraceId::from_bytes(id).is_ok()
    } else {
        SpanId::from_bytes(id).is_ok()
    };
    (!id.is_empty() && !valid).then_some(match tag {
        TRACE_ID => "the trace id is not 16 bytes, or is all zero",
        SPAN_ID => "the span id is not 8 bytes, or is all zero",
        _ => "the parent span id is not 8 bytes, or is all zero",
    })
}

fn check_entry(mut entry: &[u8], measurement: bool) -> Result<CheckedEntry<'_>, &'static str> {
    const BAD: &str = "a measurement or metadata entry is malformed";
    let mut longest = 0;
    let mut last_key: &[u8] = &[];
    // A metadata entry without a value holds the empty string, as a decoder reads it.
    let mut last_value = (!measurement).then_some(RawValue::String(&[]));
    while entry.has_remaining() {
        let (tag, wire_type) = decode_key(&mut entry).map_err(|_| BAD)?;
        match (tag, wire_type) {
            (map_entry::KEY, WireType::LengthDelimited) => {
                let key = delimited(&mut entry)?;
                longest = longest.max(key.len());
                std::str::from_utf8(key).map_err(|_| "a map key is not UTF-8")?;
                last_key = key;
            }
            (map_entry::VALUE, WireType::LengthDelimited) if measurement => {
                let (text, value) = check_value(delimited(&mut entry)?)?;
                longest = longest.max(text);
                // A decoder merges the parts of a value: one with nothing set keeps the last.
                last_value = value.or(last_value);
            }
            (map_entry::VALUE, WireType::LengthDelimited) => {
                let value = delimited(&mut entry)?;
                longest = longest.max(value.len());
                std::str::from_utf8(value).map_err(|_| "a metadata value is not UTF-8")?;
                last_value = Some(RawValue::String(value));
            }
            (map_entry::KEY | map_entry::VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut entry)?,
        }
    }
    Ok(CheckedEntry {
        // Entries are slices of a message whose length fits in u32.
        longest: u32::try_from(longest).unwrap_or(u32::MAX),
        key: last_key,
        value: last_value,
    })
}

/// Checks a `TelemetryValue`; returns the length of its string, if it holds one, and the
/// member of its oneof set last.
fn check_value(mut value: &[u8]) -> Result<(usize, Option<RawValue<'_>>), &'static str> {
    const BAD: &str = "a measurement value is malformed";
    let mut longest = 0;
    let mut last = None;
    while value.has_remaining() {
        let (tag, wire_type) = decode_key(&mut value).map_err(|_| BAD)?;
        match (tag, wire_type) {
            (INT_VALUE, WireType::Varint) => {
                // int64 travels as its two's complement.
                last = Some(RawValue::Int(
                    decode_varint(&mut value).map_err(|_| BAD)? as i64
                ));
            }
            (FLOAT_VALUE, WireType::SixtyFourBit) => {
                let (le, rest) = value.split_first_chunk::<8>().ok_or(BAD)?;
                last = Some(RawValue::Float(f64::from_le_bytes(*le)));
                value = rest;
            }
            (STRING_VALUE, WireType::LengthDelimited) => {
                let text = delimited(&mut value)?;
                longest = longest.max(text.len());
                std::str::from_utf8(text).map_err(|_| "a measurement string is not UTF-8")?;
                last = Some(RawValue::String(text));
            }
            (INT_VALUE | FLOAT_VALUE | STRING_VALUE, _) => return Err(BAD),
            (_, wire_type) => skip(wire_type, &mut value)?,
        }
    }
    Ok((longest, last))
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

/// A measurement's value as it lies in the event: a string is not checked to be UTF-8 again
/// (see [`delivered`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue<'a> {
    Int(i64),
    Float(f64),
    String(&'a [u8]),
}

/// A measurement or metadata entry, read where it lies in the event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry<'a> {
    /// A measurement's key and value (`None`: a `TelemetryValue` with nothing set).
    Measurement(&'a str, Option<ValueRef<'a>>),
    Metadata(&'a str, &'a str),
}

/// The values [`EventView::lookup`] found, in the order of the keys asked for.
pub type Found<'a, const M: usize, const D: usize> =
    ([Option<ValueRef<'a>>; M], [Option<&'a str>; D]);

/// Entries are read where they lie, for the hub's readers of a few fields (per-model metrics),
/// which must not pay for [`EventView::to_event`]'s maps on every event. Where a key repeats, a
/// decoder keeps the last entry, and so do [`EventView::lookup`], [`EventView::measurement`]
/// and [`EventView::metadata`]. A walk ends at anything malformed, which a view without a
/// [`EventView::problem`] has none of.
impl EventView {
    /// Every measurement and metadata entry, in the order received.
    pub fn entries(&self) -> Entries<'_> {
        Entries {
            raw: RawEntries { rest: &self.bytes },
        }
    }

    /// The values of the measurements and metadata named, in one walk over the event that
    /// checks and reads only the values asked for.
    pub fn lookup<const M: usize, const D: usize>(
        &self,
        measurements: [&str; M],
        metadata: [&str; D],
    ) -> Found<'_, M, D> {
        let mut found = ([None; M], [None; D]);
        let position = |keys: &[&str], key: &[u8]| keys.iter().position(|k| k.as_bytes() == key);
        for raw in (RawEntries { rest: &self.bytes }) {
            let read = if raw.measurement {
                position(&measurements, raw.key)
                    .map(|at| raw.measurement().map(|value| found.0[at] = value))
            } else {
                position(&metadata, raw.key)
                    .map(|at| utf8(raw.value).map(|value| found.1[at] = Some(value)))
            };
            if read == Some(None) {
                break;
            }
        }
        found
    }

    /// Whether the event's name tokens are `tokens`: [`EventView::parts`] compared as bytes,
    /// without checking UTF-8 again (for a filter that every event meets).
    pub fn is_named(&self, tokens: &[&str]) -> bool {
        self.parts.len() == tokens.len()
            && self.parts.iter().zip(tokens).all(|(range, token)| {
                self.bytes.get(range.start as usize..range.end as usize) == Some(token.as_bytes())
            })
    }

    /// The value of measurement `key`.
    pub fn measurement(&self, key: &str) -> Option<ValueRef<'_>> {
        let ([value], []) = self.lookup([key], []);
        value
    }

    /// The value of metadata `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        let ([], [value]) = self.lookup([], [key]);
        value
    }
}

/// The value of metadata `key` in an event's encoding, read where it lies (for events the hub
/// holds encoded in a delivery, not as a view); `None` also for bytes that are not an event.
pub fn metadata_in<'a>(event: &'a [u8], key: &str) -> Option<&'a str> {
    let mut found = None;
    for raw in (RawEntries { rest: event }) {
        if !raw.measurement && raw.key == key.as_bytes() {
            found = Some(utf8(raw.value)?);
        }
    }
    found
}

/// The event in an encoded `SubscribeResponse` that delivers one, as the hub encodes them.
pub fn delivered_event(response: &[u8]) -> Option<&[u8]> {
    let delivery = field_of(response, subscribe_response::EVENT)?;
    field_of(delivery, event_delivery::EVENT)
}

/// The last occurrence of length-delimited field `tag` in a message.
fn field_of(mut message: &[u8], tag: u32) -> Option<&[u8]> {
    let mut found = None;
    while !message.is_empty() {
        match field_key(&mut message)? {
            (field, WireType::LengthDelimited) if field == tag => {
                found = Some(take_delimited(&mut message)?);
            }
            (_, wire_type) => skip_field(wire_type, &mut message)?,
        }
    }
    found
}

/// The iterator of [`EventView::entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    raw: RawEntries<'a>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        let raw = self.raw.next()?;
        let key = utf8(raw.key);
        let entry = key.and_then(|key| {
            Some(if raw.measurement {
                Entry::Measurement(key, raw.measurement()?)
            } else {
                Entry::Metadata(key, utf8(raw.value)?)
            })
        });
        if entry.is_none() {
            self.raw.rest = &[];
        }
        entry
    }
}

// The walk below returns `None` for anything malformed; it only ever stops there, so it carries
// no reason (and stays in registers: this runs for every inference event the hub receives).

/// The entries of an event, their keys and values not yet checked.
#[derive(Debug, Clone)]
struct RawEntries<'a> {
    rest: &'a [u8],
}

/// A map entry as it lies in the event.
struct RawEntry<'a> {
    measurement: bool,
    /// Empty when unset, as a decoder reads it.
    key: &'a [u8],
    value: &'a [u8],
    /// The whole entry, when its value comes in several parts (which a decoder merges).
    parts: Option<&'a [u8]>,
}

impl<'a> Iterator for RawEntries<'a> {
    type Item = RawEntry<'a>;

    #[inline]
    fn next(&mut self) -> Option<RawEntry<'a>> {
        while !self.rest.is_empty() {
            let entry = field_key(&mut self.rest).and_then(|key| match key {
                (MEASUREMENTS | METADATA, WireType::LengthDelimited) => {
                    let entry = take_delimited(&mut self.rest)?;
                    RawEntry::read(entry, key.0 == MEASUREMENTS).map(Some)
                }
                (_, wire_type) => skip_field(wire_type, &mut self.rest).map(|()| None),
            });
            match entry {
                Some(Some(entry)) => return Some(entry),
                Some(None) => {}
                None => self.rest = &[],
            }
        }
        None
    }
}

/// The first bytes of a map entry's key and value fields.
const ENTRY_KEY: u8 = (map_entry::KEY as u8) << 3 | WireType::LengthDelimited as u8;
const ENTRY_VALUE: u8 = (map_entry::VALUE as u8) << 3 | WireType::LengthDelimited as u8;

impl<'a> RawEntry<'a> {
    #[inline(always)]
    fn read(entry: &'a [u8], measurement: bool) -> Option<Self> {
        // What encoders write: the key, then the value, each shorter than 128 bytes.
        if let [ENTRY_KEY, key_len @ 0..0x80, rest @ ..] = entry
            && let Some((key, rest)) = rest.split_at_checked(usize::from(*key_len))
            && let [ENTRY_VALUE, value_len @ 0..0x80, value @ ..] = rest
            && value.len() == usize::from(*value_len)
        {
            return Some(Self {
                measurement,
                key,
                value,
                parts: None,
            });
        }
        Self::read_any(entry, measurement)
    }

    /// Any other layout that a decoder accepts: fields in any order, repeated, or unknown.
    fn read_any(mut entry: &'a [u8], measurement: bool) -> Option<Self> {
        let whole = entry;
        let (mut key, mut value, mut values) = (&[][..], &[][..], 0);
        while !entry.is_empty() {
            match field_key(&mut entry)? {
                (map_entry::KEY, WireType::LengthDelimited) => key = take_delimited(&mut entry)?,
                (map_entry::VALUE, WireType::LengthDelimited) => {
                    value = take_delimited(&mut entry)?;
                    values += 1;
                }
                (map_entry::KEY | map_entry::VALUE, _) => return None,
                (_, wire_type) => skip_field(wire_type, &mut entry)?,
            }
        }
        Some(Self {
            measurement,
            key,
            value,
            parts: (values > 1).then_some(whole),
        })
    }

    /// The `TelemetryValue` of a measurement (`Some(None)`: nothing set); a part with nothing
    /// set keeps the value before.
    #[inline]
    fn measurement(&self) -> Option<Option<ValueRef<'a>>> {
        checked(self.raw_measurement()?)
    }

    /// [`RawEntry::measurement`] with a string value as it lies, not checked to be UTF-8.
    #[inline]
    fn raw_measurement(&self) -> Option<Option<RawValue<'a>>> {
        let Some(mut entry) = self.parts else {
            return read_value(self.value);
        };
        let mut value = None;
        while !entry.is_empty() {
            match field_key(&mut entry)? {
                (map_entry::VALUE, WireType::LengthDelimited) => {
                    value = read_value(take_delimited(&mut entry)?)?.or(value);
                }
                (_, wire_type) => skip_field(wire_type, &mut entry)?,
            }
        }
        Some(value)
    }
}

/// A value read as it lies, its string checked to be UTF-8 (`None` when it is not).
#[inline]
fn checked(value: Option<RawValue<'_>>) -> Option<Option<ValueRef<'_>>> {
    Some(match value {
        None => None,
        Some(RawValue::Int(v)) => Some(ValueRef::Int(v)),
        Some(RawValue::Float(v)) => Some(ValueRef::Float(v)),
        Some(RawValue::String(s)) => Some(ValueRef::String(utf8(s)?)),
    })
}

/// A `TelemetryValue`: the member of its oneof set last, if any.
#[inline]
fn read_value(mut bytes: &[u8]) -> Option<Option<RawValue<'_>>> {
    let mut value = None;
    while !bytes.is_empty() {
        match field_key(&mut bytes)? {
            // int64 travels as its two's complement, as a varint.
            (INT_VALUE, WireType::Varint) => {
                value = Some(RawValue::Int(varint(&mut bytes)? as i64))
            }
            (FLOAT_VALUE, WireType::SixtyFourBit) => {
                let (le, rest) = bytes.split_first_chunk::<8>()?;
                value = Some(RawValue::Float(f64::from_le_bytes(*le)));
                bytes = rest;
            }
            (STRING_VALUE, WireType::LengthDelimited) => {
                value = Some(RawValue::String(take_delimited(&mut bytes)?));
            }
            (INT_VALUE | FLOAT_VALUE | STRING_VALUE, _) => return None,
            (_, wire_type) => skip_field(wire_type, &mut bytes)?,
        }
    }
    Some(value)
}

/// A field's key, as prost's `decode_key` reads it.
#[inline(always)]
fn field_key(bytes: &mut &[u8]) -> Option<(u32, WireType)> {
    let key = varint(bytes)?;
    let tag = u32::try_from(key >> 3).ok().filter(|tag| *tag > 0)?;
    Some((tag, WireType::try_from(key & 0x07).ok()?))
}

/// A varint, with the one-byte case (keys, short lengths, small ints) first.
#[inline(always)]
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    match bytes.split_first() {
        Some((&byte, rest)) if byte < 0x80 => {
            *bytes = rest;
            Some(u64::from(byte))
        }
        _ => long_varint(bytes),
    }
}

/// A varint of up to ten bytes, the tenth holding the 64th bit only, as prost reads them (its
/// own reader goes through `Buf`, which costs more than the loop).
#[inline]
fn long_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            if i == 9 && byte > 1 {
                return None;
            }
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

#[inline(always)]
fn take_delimited<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(bytes)?).ok()?;
    let (body, rest) = bytes.split_at_checked(len)?;
    *bytes = rest;
    Some(body)
}

#[inline]
fn skip_field(wire_type: WireType, bytes: &mut &[u8]) -> Option<()> {
    let len = match wire_type {
        WireType::Varint => return varint(bytes).map(drop),
        WireType::LengthDelimited => return take_delimited(bytes).map(drop),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    *bytes = bytes.get(len..)?;
    Some(())
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
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
            trace_id: vec![0x4b; 16],
            span_id: vec![0x0a; 8],
            parent_span_id: vec![0x0b; 8],
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
            (view.trace_id(), view.span_id(), view.parent_span_id()),
            (&[0x4b; 16][..], &[0x0a; 8][..], &[0x0b; 8][..])
        );
        assert_eq!(view.sampling_key(), SamplingKey::new(&[0x4b; 16], "other"));
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

    /// Ids that no tracing backend would accept are the event's problem (dropped and counted
    /// where it enters); absent ones are fine.
    #[test]
    fn trace_context_of_the_wrong_length_or_zero_is_a_problem() {
        let with = |trace_id: Vec<u8>, span_id: Vec<u8>, parent_span_id: Vec<u8>| {
            let event = TelemetryEvent {
                trace_id,
                span_id,
                parent_span_id,
                ..event()
            };
            EventView::from_event(&event).unwrap().problem()
        };
        assert_eq!(with(vec![], vec![], vec![]), None);
        assert_eq!(with(vec![1; 16], vec![], vec![]), None);
        assert!(
            with(vec![1; 15], vec![1; 8], vec![])
                .unwrap()
                .contains("trace id")
        );
        assert!(
            with(vec![0; 16], vec![1; 8], vec![])
                .unwrap()
                .contains("trace id")
        );
        assert!(
            with(vec![1; 16], vec![1; 9], vec![])
                .unwrap()
                .contains("span id")
        );
        assert!(
            with(vec![1; 16], vec![1; 8], vec![0; 8])
                .unwrap()
                .contains("parent span")
        );
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
                prop::option::of((any::<[u8; 16]>(), any::<[u8; 8]>(), any::<[u8; 8]>())),
            )
                .prop_map(|(parts, measurements, metadata, rest, trace)| {
                    TelemetryEvent {
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
                        // A zero id is a problem; `| 1` keeps these valid.
                        trace_id: trace.map_or(vec![], |t| [&t.0[..15], &[t.0[15] | 1]].concat()),
                        span_id: trace.map_or(vec![], |t| [&t.1[..7], &[t.1[7] | 1]].concat()),
                        parent_span_id: trace
                            .map_or(vec![], |t| [&t.2[..7], &[t.2[7] | 1]].concat()),
                    }
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
                prop_assert_eq!(view.trace_id(), original.trace_id.as_slice());
                prop_assert_eq!(view.span_id(), original.span_id.as_slice());
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
        fn lookup_reads_the_keys_asked_for_in_one_walk() {
            let view = view(&TelemetryEvent {
                measurements: [
                    ("a".to_owned(), value(Value::IntValue(1))),
                    ("b".to_owned(), value(Value::StringValue("two".into()))),
                    ("model".to_owned(), value(Value::IntValue(3))),
                ]
                .into(),
                metadata: [
                    ("model".to_owned(), "llama".to_owned()),
                    ("a".to_owned(), "meta".to_owned()),
                ]
                .into(),
                ..Default::default()
            });
            assert_eq!(
                view.lookup(["b", "absent", "a"], ["model", "b"]),
                (
                    [Some(ValueRef::String("two")), None, Some(ValueRef::Int(1))],
                    [Some("llama"), None]
                )
            );
            assert_eq!(view.lookup([], []), ([], []));
        }

        #[test]
        fn varints_read_as_prost_reads_them() {
            let mut cases: Vec<Vec<u8>> = [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX]
                .iter()
                .map(|n| {
                    let mut bytes = Vec::new();
                    encode_varint(*n, &mut bytes);
                    bytes
                })
                .collect();
            // Cut short, too long, and a tenth byte beyond the 64th bit.
            cases.extend([
                vec![0x80],
                vec![0xff; 11],
                [&[0xff; 9][..], &[0x02]].concat(),
            ]);
            for case in cases {
                let mut ours = case.as_slice();
                let mut theirs = case.as_slice();
                let read = varint(&mut ours);
                assert_eq!(read, decode_varint(&mut theirs).ok(), "{case:?}");
                if read.is_some() {
                    assert_eq!(ours, theirs, "{case:?}");
                }
            }
        }

        #[test]
        fn is_named_compares_every_token() {
            let view = view(&TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                ..Default::default()
            });
            assert!(view.is_named(&["inference", "stop"]));
            for other in [
                &["inference"][..],
                &["inference", "sto"],
                &["inference", "stop", "x"],
                &[],
            ] {
                assert!(!view.is_named(other), "{other:?}");
            }
        }

        #[test]
        fn a_value_in_parts_is_merged_as_a_decoder_merges_it() {
            // Measurement entry {1: "n", 2: {1: 5}, 2: {}, 2: {2: 0.5}, 2: {}}.
            let mut entry = vec![
                0x0a, 0x01, b'n', 0x12, 0x02, 0x08, 0x05, 0x12, 0x00, 0x12, 0x09, 0x11,
            ];
            entry.extend(0.5f64.to_le_bytes());
            entry.extend([0x12, 0x00]);
            let mut bytes = vec![0x12, entry.len() as u8];
            bytes.extend(&entry);
            let decoded = TelemetryEvent::decode(bytes.as_slice()).unwrap();
            assert_eq!(decoded.measurements["n"], value(Value::FloatValue(0.5)));
            let view = EventView::decode(bytes.as_slice()).unwrap();
            assert_eq!(view.measurement("n"), Some(ValueRef::Float(0.5)));
            assert_eq!(
                view.entries().collect::<Vec<_>>(),
                [Entry::Measurement("n", Some(ValueRef::Float(0.5)))]
            );
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
                let keys = ["", "a", "b", "c", "ab"];
                let (measurements, metadata) = view.lookup(keys, keys);
                for (i, key) in keys.iter().enumerate() {
                    let measurement = decoded.measurements.get(*key).and_then(|v| v.value.as_ref());
                    prop_assert_eq!(measurements[i], measurement.map(as_ref));
                    prop_assert_eq!(metadata[i], decoded.metadata.get(*key).map(String::as_str));
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
