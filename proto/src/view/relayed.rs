//! An event delivery that another hub passed on (cluster mode), checked where it lies.
//!
//! The receiving hub hands such a delivery to its subscribers as the bytes it came in, so it
//! must know first that any subscriber's decoder reads them: [`RelayedDelivery::check`] walks
//! the `SubscribeResponse`, its `EventDelivery` and the `TelemetryEvent` once, without copying
//! or building anything, and reads what the hub's filters need on the way (worker, pool, name
//! tokens, trace id, receipt time). It refuses, with a reason, what a decoder would refuse
//! (wrong wire types, lengths out of bounds, strings that are not UTF-8, malformed map
//! entries) and what no hub passes on: an event without a name, a trace or span id that is not
//! one, and a delivery or event in several parts (which a decoder would merge).

use std::ops::Range;

use prost::encoding::WireType;
use smallvec::SmallVec;

use super::{check_entry, delimited, id_problem, skip};
use crate::fields::{
    event_delivery, subscribe_response,
    telemetry_event::{
        CONTROL_VERSION, CORRELATION_ID, EVENT_PARTS, MEASUREMENTS, METADATA, PARENT_SPAN_ID,
        SAMPLING_RATE, SEQUENCE, SPAN_ID, TIMESTAMP_NS, TRACE_ID,
    },
};

/// A delivery from another hub that [`RelayedDelivery::check`] passed.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayedDelivery<'a> {
    /// The whole encoded `SubscribeResponse`, as subscribers receive it.
    pub response: &'a [u8],
    pub worker_id: &'a str,
    pub pool: &'a str,
    /// The encoded `TelemetryEvent`.
    pub event: &'a [u8],
    /// Where the event's name tokens (at least one) lie in `event`. Ranges rather than
    /// `&str`s: a `SmallVec` of references would tie a borrow of the delivery to the lifetime
    /// of the bytes.
    parts: SmallVec<[Range<u32>; 4]>,
    /// 16 bytes, or none.
    pub trace_id: &'a [u8],
    /// When the first hub received the event, Unix nanoseconds.
    pub received_ns: i64,
}

const BAD_KEY: &str = "a field key is malformed";
const WIRE_TYPE: &str = "a field has the wrong wire type";

impl<'a> RelayedDelivery<'a> {
    /// Checks an encoded `SubscribeResponse` that must deliver an event; see the module
    /// documentation.
    pub fn check(response: &'a [u8]) -> Result<Self, &'static str> {
        let mut rest = response;
        let mut delivery = None;
        while !rest.is_empty() {
            match key(&mut rest)? {
                (subscribe_response::EVENT, WireType::LengthDelimited) if delivery.is_none() => {
                    delivery = Some(delimited(&mut rest)?);
                }
                (subscribe_response::EVENT, WireType::LengthDelimited) => {
                    return Err("the delivery comes in several parts");
                }
                (subscribe_response::EVENT, _) => return Err(WIRE_TYPE),
                // A hub writes the delivery alone; another member of the oneof (a lag notice)
                // would replace it.
                _ => return Err("not an event delivery"),
            }
        }
        let delivery = delivery.ok_or("not an event delivery")?;
        let mut relayed = Self {
            response,
            worker_id: "",
            pool: "",
            event: &[],
            parts: SmallVec::new(),
            trace_id: &[],
            received_ns: 0,
        };
        relayed.check_delivery(delivery)?;
        Ok(relayed)
    }

    fn check_delivery(&mut self, mut fields: &'a [u8]) -> Result<(), &'static str> {
        let mut event = None;
        while !fields.is_empty() {
            match key(&mut fields)? {
                (event_delivery::WORKER_ID, WireType::LengthDelimited) => {
                    self.worker_id = text(delimited(&mut fields)?)?;
                }
                (event_delivery::POOL, WireType::LengthDelimited) => {
                    self.pool = text(delimited(&mut fields)?)?;
                }
                (event_delivery::EVENT, WireType::LengthDelimited) if event.is_none() => {
                    event = Some(delimited(&mut fields)?);
                }
                (event_delivery::EVENT, WireType::LengthDelimited) => {
                    return Err("the event comes in several parts");
                }
                (event_delivery::SAMPLING_RATE, WireType::SixtyFourBit) => {
                    skip(WireType::SixtyFourBit, &mut fields)?;
                }
                (event_delivery::RECEIVED_NS, WireType::Varint) => {
                    // int64 travels as its two's complement.
                    self.received_ns = varint(&mut fields)? as i64;
                }
                (
                    event_delivery::WORKER_ID
                    | event_delivery::POOL
                    | event_delivery::EVENT
                    | event_delivery::SAMPLING_RATE
                    | event_delivery::RECEIVED_NS,
                    _,
                ) => return Err(WIRE_TYPE),
                (_, wire_type) => skip(wire_type, &mut fields)?,
            }
        }
        self.event = event.ok_or("the delivery holds no event")?;
        self.check_event()
    }

    fn check_event(&mut self) -> Result<(), &'static str> {
        let mut rest = self.event;
        while !rest.is_empty() {
            match key(&mut rest)? {
                (EVENT_PARTS, WireType::LengthDelimited) => {
                    let part = text(delimited(&mut rest)?)?;
                    let end = self.event.len() - rest.len();
                    let range = u32::try_from(end - part.len())
                        .and_then(|start| Ok(start..u32::try_from(end)?))
                        .map_err(|_| "the event is too large")?;
                    self.parts.push(range);
                }
                (CORRELATION_ID, WireType::LengthDelimited) => {
                    text(delimited(&mut rest)?)?;
                }
                (tag @ (MEASUREMENTS | METADATA), WireType::LengthDelimited) => {
                    check_entry(delimited(&mut rest)?, tag == MEASUREMENTS)?;
                }
                (tag @ (TRACE_ID | SPAN_ID | PARENT_SPAN_ID), WireType::LengthDelimited) => {
                    let id = delimited(&mut rest)?;
                    if let Some(problem) = id_problem(tag, id) {
                        return Err(problem);
                    }
                    if tag == TRACE_ID {
                        self.trace_id = id;
                    }
                }
                (TIMESTAMP_NS | SEQUENCE | CONTROL_VERSION, WireType::Varint) => {
                    varint(&mut rest)?;
                }
                (SAMPLING_RATE, WireType::SixtyFourBit) => {
                    skip(WireType::SixtyFourBit, &mut rest)?;
                }
                (
                    EVENT_PARTS | CORRELATION_ID | MEASUREMENTS | METADATA | TRACE_ID | SPAN_ID
                    | PARENT_SPAN_ID | TIMESTAMP_NS | SEQUENCE | CONTROL_VERSION | SAMPLING_RATE,
                    _,
                ) => return Err(WIRE_TYPE),
                (_, wire_type) => skip(wire_type, &mut rest)?,
            }
        }
        if self.parts.is_empty() {
            return Err("the event has no name");
        }
        Ok(())
    }
}

impl<'a> RelayedDelivery<'a> {
    /// The event's name tokens.
    pub fn parts(&self) -> impl Iterator<Item = &'a str> + Clone + '_ {
        let event = self.event;
        self.parts.iter().map(move |range| {
            // Ranges are recorded only for tokens that were checked to be UTF-8.
            std::str::from_utf8(&event[range.start as usize..range.end as usize]).unwrap_or("")
        })
    }
}

fn key(bytes: &mut &[u8]) -> Result<(u32, WireType), &'static str> {
    super::field_key(bytes).ok_or(BAD_KEY)
}

fn varint(bytes: &mut &[u8]) -> Result<u64, &'static str> {
    super::varint(bytes).ok_or("a varint is malformed")
}

fn text(bytes: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::{
        encoded::EncodedSubscribeResponse,
        v1::{
            EventDelivery, SubscribeResponse, TelemetryEvent, TelemetryValue, subscribe_response,
            telemetry_value::Value,
        },
    };

    const TRACE: [u8; 16] = [7; 16];

    fn event() -> TelemetryEvent {
        TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            measurements: [(
                "tokens".to_owned(),
                TelemetryValue {
                    value: Some(Value::IntValue(12)),
                },
            )]
            .into(),
            metadata: [("model".to_owned(), "llama".to_owned())].into(),
            trace_id: TRACE.to_vec(),
            span_id: vec![1; 8],
            ..Default::default()
        }
    }

    fn delivery(event: TelemetryEvent) -> Vec<u8> {
        EncodedSubscribeResponse::delivery("gpu-3", "llama", &event, 0.5, 42)
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn reads_what_filters_need_from_a_delivery_the_hub_encoded() {
        let bytes = delivery(event());
        let relayed = RelayedDelivery::check(&bytes).unwrap();
        assert_eq!((relayed.worker_id, relayed.pool), ("gpu-3", "llama"));
        assert_eq!(relayed.parts().collect::<Vec<_>>(), ["inference", "stop"]);
        assert_eq!(relayed.trace_id, TRACE);
        assert_eq!(relayed.received_ns, 42);
        assert_eq!(relayed.response, bytes.as_slice());
        assert_eq!(relayed.event, event().encode_to_vec().as_slice());
        assert_eq!(
            EncodedSubscribeResponse::relayed(&relayed).as_bytes(),
            &bytes[..]
        );
    }

    #[test]
    fn refuses_what_no_hub_passes_on() {
        let refused = |bytes: &[u8]| RelayedDelivery::check(bytes).err();
        let lag = SubscribeResponse {
            item: Some(subscribe_response::Item::Lagged(Default::default())),
        }
        .encode_to_vec();
        assert_eq!(refused(&lag), Some("not an event delivery"));
        assert_eq!(refused(&[]), Some("not an event delivery"));
        let nameless = TelemetryEvent {
            event_parts: vec![],
            ..event()
        };
        assert_eq!(refused(&delivery(nameless)), Some("the event has no name"));
        let bad_trace = TelemetryEvent {
            trace_id: vec![1; 5],
            ..event()
        };
        assert!(refused(&delivery(bad_trace)).is_some());
        let no_event = SubscribeResponse {
            item: Some(subscribe_response::Item::Event(EventDelivery::default())),
        }
        .encode_to_vec();
        assert_eq!(refused(&no_event), Some("the delivery holds no event"));
        // A name token that is not UTF-8: field 1 of the event, bytes 0xff.
        let mut bad_utf8 = event().encode_to_vec();
        bad_utf8.extend([0x0a, 1, 0xff]);
        let response =
            EncodedSubscribeResponse::delivery_of_bytes("w", "", &bad_utf8, None, 1.0, 1);
        assert_eq!(refused(response.as_bytes()), Some("a string is not UTF-8"));
        // Every truncation of a good delivery is refused (the lengths no longer add up).
        let good = delivery(event());
        for end in 0..good.len() {
            assert!(refused(&good[..end]).is_some(), "cut at {end}");
        }
        // Two deliveries back to back would be merged by a decoder.
        assert_eq!(
            refused(&[good.clone(), good].concat()),
            Some("the delivery comes in several parts")
        );
    }

    proptest! {
        /// Whatever arrives from another hub: a refusal or a delivery, never a panic; and what
        /// passes is something every subscriber's generated decoder reads, with the same name.
        #[test]
        fn arbitrary_bytes_never_panic_and_what_passes_decodes(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            flip in any::<(usize, u8)>(),
        ) {
            for candidate in [bytes.clone(), {
                let mut good = delivery(event());
                let at = flip.0 % good.len();
                good[at] ^= flip.1;
                good
            }] {
                if let Ok(relayed) = RelayedDelivery::check(&candidate) {
                    let decoded = SubscribeResponse::decode(candidate.as_slice());
                    prop_assert!(decoded.is_ok(), "{:?}", candidate);
                    let Some(subscribe_response::Item::Event(delivery)) = decoded.unwrap().item else {
                        panic!("not a delivery: {candidate:?}");
                    };
                    prop_assert_eq!(delivery.worker_id.as_str(), relayed.worker_id);
                    prop_assert_eq!(
                        delivery.event.unwrap().event_parts,
                        relayed.parts().map(String::from).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
}
