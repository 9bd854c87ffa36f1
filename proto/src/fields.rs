//! Field numbers of the messages that are encoded or read by hand rather than by the generated
//! code: the worker's event encoder, the hub's `EventView` and its once-encoded deliveries
//! (the `view` and `encoded` modules), the outage buffer's sequence numbers, and the batches
//! hubs pass one another in cluster mode (the `batch` module).
//!
//! They must equal the numbers in `bridge.proto`; the test below reads them back from the
//! compiled descriptors, so that a change to the contract cannot leave a hand-written codec
//! behind.

/// `TelemetryEvent`.
pub mod telemetry_event {
    pub const EVENT_PARTS: u32 = 1;
    pub const MEASUREMENTS: u32 = 2;
    pub const METADATA: u32 = 3;
    pub const TIMESTAMP_NS: u32 = 4;
    pub const CORRELATION_ID: u32 = 5;
    pub const SEQUENCE: u32 = 6;
    pub const SAMPLING_RATE: u32 = 7;
    pub const CONTROL_VERSION: u32 = 8;
    pub const TRACE_ID: u32 = 9;
    pub const SPAN_ID: u32 = 10;
    pub const PARENT_SPAN_ID: u32 = 11;
}

/// `TelemetryValue` (the members of its `value` oneof).
pub mod telemetry_value {
    pub const INT_VALUE: u32 = 1;
    pub const FLOAT_VALUE: u32 = 2;
    pub const STRING_VALUE: u32 = 3;
}

/// The entries of a protobuf map (`measurements`, `metadata`).
pub mod map_entry {
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
}

/// `SubscribeResponse` (its `item` oneof; lag notices are encoded by the generated code).
pub mod subscribe_response {
    pub const EVENT: u32 = 1;
}

/// `EventDelivery`.
pub mod event_delivery {
    pub const WORKER_ID: u32 = 1;
    pub const POOL: u32 = 2;
    pub const EVENT: u32 = 3;
    pub const SAMPLING_RATE: u32 = 4;
    pub const RECEIVED_NS: u32 = 5;
}

/// `EventBatch`.
pub mod event_batch {
    pub const LABELS: u32 = 1;
    pub const EVENTS: u32 = 2;
}

/// `WorkerLabels` (its `labels` map; entries as [`map_entry`](super::map_entry)).
pub mod worker_labels {
    pub const LABELS: u32 = 1;
}

/// `BatchedEvent`.
pub mod batched_event {
    pub const DELIVERY: u32 = 1;
    pub const LABELS: u32 = 2;
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::{DescriptorProto, FileDescriptorSet};

    use super::*;

    fn message(name: &str) -> DescriptorProto {
        let set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptors");
        set.file
            .iter()
            .flat_map(|file| &file.message_type)
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no message {name}"))
            .clone()
    }

    /// `(field name, number)` of every field of `message`, sorted by number.
    fn fields(message: &DescriptorProto) -> Vec<(String, u32)> {
        let mut fields: Vec<_> = message
            .field
            .iter()
            .map(|f| (f.name().to_owned(), f.number() as u32))
            .collect();
        fields.sort_by_key(|(_, number)| *number);
        fields
    }

    fn named(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect()
    }

    /// The encoders write whole messages, so every field must have its constant: a field added
    /// to the contract fails here until the hand-written code knows it.
    #[test]
    fn hand_written_field_numbers_match_the_contract() {
        use event_delivery as d;
        use telemetry_event as e;
        use telemetry_value as v;
        let event = message("TelemetryEvent");
        assert_eq!(
            fields(&event),
            named(&[
                ("event_parts", e::EVENT_PARTS),
                ("measurements", e::MEASUREMENTS),
                ("metadata", e::METADATA),
                ("timestamp_ns", e::TIMESTAMP_NS),
                ("correlation_id", e::CORRELATION_ID),
                ("sequence", e::SEQUENCE),
                ("sampling_rate", e::SAMPLING_RATE),
                ("control_version", e::CONTROL_VERSION),
                ("trace_id", e::TRACE_ID),
                ("span_id", e::SPAN_ID),
                ("parent_span_id", e::PARENT_SPAN_ID),
            ])
        );
        for entry in &event.nested_type {
            assert_eq!(
                fields(entry),
                named(&[("key", map_entry::KEY), ("value", map_entry::VALUE)]),
                "{}",
                entry.name()
            );
        }
        assert_eq!(
            fields(&message("TelemetryValue")),
            named(&[
                ("int_value", v::INT_VALUE),
                ("float_value", v::FLOAT_VALUE),
                ("string_value", v::STRING_VALUE),
            ])
        );
        assert_eq!(
            fields(&message("EventDelivery")),
            named(&[
                ("worker_id", d::WORKER_ID),
                ("pool", d::POOL),
                ("event", d::EVENT),
                ("sampling_rate", d::SAMPLING_RATE),
                ("received_ns", d::RECEIVED_NS),
            ])
        );
        assert_eq!(
            fields(&message("EventBatch")),
            named(&[
                ("labels", event_batch::LABELS),
                ("events", event_batch::EVENTS)
            ])
        );
        let labels = message("WorkerLabels");
        assert_eq!(fields(&labels), named(&[("labels", worker_labels::LABELS)]));
        assert_eq!(
            fields(&labels.nested_type[0]),
            named(&[("key", map_entry::KEY), ("value", map_entry::VALUE)])
        );
        assert_eq!(
            fields(&message("BatchedEvent")),
            named(&[
                ("delivery", batched_event::DELIVERY),
                ("labels", batched_event::LABELS)
            ])
        );
        let response = fields(&message("SubscribeResponse"));
        assert!(
            response.contains(&("event".to_owned(), subscribe_response::EVENT)),
            "{response:?}"
        );
    }

    /// The worker's encoder writes keys as one byte, which holds field numbers below 16.
    #[test]
    fn telemetry_event_and_value_keys_fit_one_byte() {
        for (_, number) in fields(&message("TelemetryEvent"))
            .into_iter()
            .chain(fields(&message("TelemetryValue")))
        {
            assert!(number < 16, "{number}");
        }
    }
}
