//! The benchmark's events: realistic inference events of about 150 bytes, encoded once as
//! templates; each send only appends its timestamp and sequence number.
//!
//! They are `inference.stop` events with the fields of `docs/conventions.md`, so that the hub
//! does for them what it does for a model server's (its per-model metrics read them), except
//! for subscribers that each match 1 % of the events, which need 100 names ([`Payload::buckets`]).

use bridge_proto::{
    encoded::EncodedEvent,
    fields,
    protocol::inference,
    v1::{TelemetryEvent, TelemetryValue, telemetry_value::Value},
};
use prost::Message;

/// Distinct event names, so that a subscriber can match exactly 1 % of the events.
pub const BUCKETS: u64 = 100;

/// The name of the events in bucket `k`.
pub fn bucket_name(k: u64) -> String {
    format!("bench.b{k}")
}

/// Encoded events without timestamp and sequence, one per bucket.
#[derive(Debug, Clone)]
pub struct Payload {
    templates: Vec<Vec<u8>>,
}

impl Default for Payload {
    /// `inference.stop` events of 100 requests.
    fn default() -> Self {
        Self::named(|_| inference::STOP.to_owned())
    }
}

impl Payload {
    /// The same events, named `bench.b0` to `bench.b99`: one name per bucket.
    pub fn buckets() -> Self {
        Self::named(bucket_name)
    }

    fn named(name: impl Fn(u64) -> String) -> Self {
        let templates = (0..BUCKETS)
            .map(|k| {
                let value = |v| TelemetryValue { value: Some(v) };
                TelemetryEvent {
                    event_parts: name(k).split('.').map(str::to_owned).collect(),
                    measurements: [
                        (inference::INPUT_TOKENS, value(Value::IntValue(1_337))),
                        (inference::OUTPUT_TOKENS, value(Value::IntValue(211))),
                        (inference::DURATION_NS, value(Value::IntValue(48_250_000))),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                    metadata: [(inference::MODEL.to_owned(), "llama-3-8b".to_owned())].into(),
                    correlation_id: format!("{:032x}", 0x5eed_u128 * (k as u128 + 1)),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        Self { templates }
    }

    /// Event number `sequence` (from 1), stamped with `timestamp_ns`; buckets rotate.
    pub fn event(&self, sequence: u64, timestamp_ns: i64) -> EncodedEvent {
        let template = &self.templates[(sequence % BUCKETS) as usize];
        let mut bytes = Vec::with_capacity(template.len() + 22);
        bytes.extend_from_slice(template);
        prost::encoding::int64::encode(
            fields::telemetry_event::TIMESTAMP_NS,
            &timestamp_ns,
            &mut bytes,
        );
        EncodedEvent::append_sequence(&mut bytes, sequence);
        EncodedEvent::from_bytes(bytes.into())
    }

    /// Size of an encoded event, for the report.
    pub fn size(&self) -> usize {
        self.event(1, 1_795_000_000_000_000_000).as_bytes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_and_are_about_150_bytes() {
        for (payload, name) in [
            (Payload::default(), ["inference", "stop"]),
            (Payload::buckets(), ["bench", "b7"]),
        ] {
            let event = TelemetryEvent::decode(payload.event(7, 42).as_bytes().clone()).unwrap();
            assert_eq!(event.event_parts, name);
            assert_eq!((event.sequence, event.timestamp_ns), (7, 42));
            assert_eq!(event.metadata[inference::MODEL], "llama-3-8b");
            assert!((120..=170).contains(&payload.size()), "{}", payload.size());
        }
    }
}
