//! The benchmark's events: realistic inference events of about 140 bytes, encoded once as
//! templates; each send only appends its timestamp and sequence number.

use bridge_proto::{
    encoded::EncodedEvent,
    fields,
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
    fn default() -> Self {
        let templates = (0..BUCKETS)
            .map(|k| {
                let value = |v| TelemetryValue { value: Some(v) };
                TelemetryEvent {
                    event_parts: bucket_name(k).split('.').map(str::to_owned).collect(),
                    measurements: [
                        ("tokens_in".to_owned(), value(Value::IntValue(1_337))),
                        ("tokens_out".to_owned(), value(Value::IntValue(211))),
                        ("duration_ms".to_owned(), value(Value::FloatValue(48.25))),
                    ]
                    .into(),
                    metadata: [("model".to_owned(), "llama-3-8b".to_owned())].into(),
                    correlation_id: format!("{:032x}", 0x5eed_u128 * (k as u128 + 1)),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        Self { templates }
    }
}

impl Payload {
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
    fn events_decode_and_are_about_140_bytes() {
        let payload = Payload::default();
        let event = TelemetryEvent::decode(payload.event(7, 42).as_bytes().clone()).unwrap();
        assert_eq!(event.event_parts, ["bench", "b7"]);
        assert_eq!((event.sequence, event.timestamp_ns), (7, 42));
        assert!((120..=160).contains(&payload.size()), "{}", payload.size());
    }
}
