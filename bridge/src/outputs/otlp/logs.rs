//! Export requests of log records, written straight from the deliveries' bytes.
//!
//! Building the generated `LogRecord` of every delivery (a `String` per attribute key and
//! value, nested `Vec`s, and prost working out each nested length again at every level, then
//! freeing it all) was most of what the log export cost the hub per record (see
//! BENCHMARKS.md). The bytes written here decode, with the `opentelemetry-proto` types, to the
//! request that `convert::logs_request` builds with them, which states the mapping; the tests
//! hold the two equal. Resources and the scope, once per worker and batch, are still built with
//! the generated types.

use std::collections::HashMap;

use bridge_proto::{
    encoded::{EncodedSubscribeResponse, PreEncoded},
    protocol::span,
    view::{DeliveredEvent, DeliveryRef, RawValue, UncheckedEntry},
};
use opentelemetry_proto::tonic::logs::v1::SeverityNumber;
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};
use smallvec::SmallVec;

use super::convert::{WorkerDirectory, failed_end, resource, scope};

// Field numbers of the OpenTelemetry messages written here (opentelemetry/proto/...).
const REQUEST_RESOURCE_LOGS: u32 = 1;
const RESOURCE_LOGS_RESOURCE: u32 = 1;
const RESOURCE_LOGS_SCOPE_LOGS: u32 = 2;
const SCOPE_LOGS_SCOPE: u32 = 1;
const SCOPE_LOGS_LOG_RECORDS: u32 = 2;
const RECORD_TIME: u32 = 1;
const RECORD_SEVERITY_NUMBER: u32 = 2;
const RECORD_SEVERITY_TEXT: u32 = 3;
const RECORD_BODY: u32 = 5;
const RECORD_ATTRIBUTES: u32 = 6;
const RECORD_TRACE_ID: u32 = 9;
const RECORD_SPAN_ID: u32 = 10;
const RECORD_OBSERVED_TIME: u32 = 11;
const RECORD_EVENT_NAME: u32 = 12;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;

/// The request exporting `batch` as log records, and how many it holds: a delivery that does
/// not parse is left out (the caller counts it).
pub(super) fn request(
    batch: &[EncodedSubscribeResponse],
    directory: &dyn WorkerDirectory,
) -> (PreEncoded, u64) {
    let mut writer = Writer::default();
    let mut count = 0;
    for item in batch {
        if let Some(delivery) = DeliveryRef::read(item.as_bytes()) {
            writer.record(&delivery);
            count += 1;
        }
    }
    (PreEncoded::from_encoded(writer.finish(directory)), count)
}

/// Log records written so far, grouped by the worker that sent them (in the order first met).
#[derive(Default)]
struct Writer<'a> {
    groups: Vec<Group<'a>>,
    by_worker: HashMap<(&'a [u8], &'a [u8]), usize, foldhash::fast::RandomState>,
    /// One record's fields, before its length is known.
    scratch: Vec<u8>,
    entries: SmallVec<[UncheckedEntry<'a>; 16]>,
}

struct Group<'a> {
    worker_id: &'a [u8],
    pool: &'a [u8],
    /// `ScopeLogs.log_records` fields, each with its key and length.
    records: Vec<u8>,
}

impl<'a> Writer<'a> {
    fn record(&mut self, delivery: &DeliveryRef<'a>) {
        let key = (delivery.worker_id, delivery.pool);
        let group = *self.by_worker.entry(key).or_insert_with(|| {
            self.groups.push(Group {
                worker_id: delivery.worker_id,
                pool: delivery.pool,
                records: Vec::new(),
            });
            self.groups.len() - 1
        });
        let event = &delivery.event;
        self.entries.clear();
        self.entries.extend(event.entries());
        let record = &mut self.scratch;
        record.clear();
        write_times_and_severity(record, delivery, &self.entries);
        let name_len = event.name_len();
        write_key(record, RECORD_BODY);
        encode_varint(string_value_len(name_len) as u64, record);
        write_key(record, ANY_STRING);
        write_name(record, event, name_len);
        write_attributes(record, &self.entries);
        if !event.correlation_id.is_empty() {
            write_attribute(
                record,
                b"bridge.correlation_id",
                Attribute::String(event.correlation_id),
            );
        }
        write_attribute(
            record,
            b"bridge.sampling_rate",
            Attribute::Double(delivery.sampling_rate),
        );
        // Left out when absent, as proto3 leaves out an empty `bytes`.
        if !event.trace_id.is_empty() {
            write_bytes(record, RECORD_TRACE_ID, event.trace_id);
        }
        if !event.span_id.is_empty() {
            write_bytes(record, RECORD_SPAN_ID, event.span_id);
        }
        if name_len > 0 {
            write_key(record, RECORD_EVENT_NAME);
            write_name(record, event, name_len);
        }
        let records = &mut self.groups[group].records;
        write_key(records, SCOPE_LOGS_LOG_RECORDS);
        encode_varint(record.len() as u64, records);
        records.extend_from_slice(record);
    }

    fn finish(self, directory: &dyn WorkerDirectory) -> Vec<u8> {
        let scope = scope().encode_to_vec();
        let mut request = Vec::with_capacity(
            self.groups
                .iter()
                .map(|g| g.records.len() + 256)
                .sum::<usize>(),
        );
        for group in &self.groups {
            // Names the hub checked when the worker connected; never anything but UTF-8.
            let worker_id = String::from_utf8_lossy(group.worker_id);
            let pool = String::from_utf8_lossy(group.pool);
            let resource =
                resource(&worker_id, &pool, &directory.describe(&worker_id)).encode_to_vec();
            let scope_logs_len = field_len(scope.len()) + group.records.len();
            let resource_logs_len = field_len(resource.len()) + field_len(scope_logs_len);
            write_key(&mut request, REQUEST_RESOURCE_LOGS);
            encode_varint(resource_logs_len as u64, &mut request);
            write_bytes(&mut request, RESOURCE_LOGS_RESOURCE, &resource);
            write_key(&mut request, RESOURCE_LOGS_SCOPE_LOGS);
            encode_varint(scope_logs_len as u64, &mut request);
            write_bytes(&mut request, SCOPE_LOGS_SCOPE, &scope);
            request.extend_from_slice(&group.records);
        }
        request
    }
}

/// Times, severity (`ERROR` for an `.exception` or `result=error`, else `INFO`).
fn write_times_and_severity(
    record: &mut Vec<u8>,
    delivery: &DeliveryRef<'_>,
    entries: &[UncheckedEntry<'_>],
) {
    let event = &delivery.event;
    let result = entries.iter().rev().find_map(|entry| match entry {
        UncheckedEntry::Metadata(key, value) if *key == span::RESULT.as_bytes() => Some(*value),
        _ => None,
    });
    let (severity, text) = if failed_end(event.parts.last().copied(), result) {
        (SeverityNumber::Error, "ERROR")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    write_fixed64(record, RECORD_TIME, unsigned(event.timestamp_ns));
    write_fixed64(record, RECORD_OBSERVED_TIME, unsigned(delivery.received_ns));
    encode_key(RECORD_SEVERITY_NUMBER, WireType::Varint, record);
    encode_varint(severity as u64, record);
    write_bytes(record, RECORD_SEVERITY_TEXT, text.as_bytes());
}

/// Measurements (typed) and metadata (strings); where a key repeats in a map, the last entry
/// counts, as a decoder keeps it.
fn write_attributes(record: &mut Vec<u8>, entries: &[UncheckedEntry<'_>]) {
    for (at, entry) in entries.iter().enumerate() {
        let superseded = entries[at + 1..].iter().any(|later| match (entry, later) {
            (UncheckedEntry::Measurement(key, _), UncheckedEntry::Measurement(later, _))
            | (UncheckedEntry::Metadata(key, _), UncheckedEntry::Metadata(later, _)) => {
                key == later
            }
            _ => false,
        });
        if superseded {
            continue;
        }
        match *entry {
            UncheckedEntry::Measurement(key, Some(value)) => {
                let value = match value {
                    RawValue::Int(v) => Attribute::Int(v),
                    RawValue::Float(v) => Attribute::Double(v),
                    RawValue::String(v) => Attribute::String(v),
                };
                write_attribute(record, key, value);
            }
            UncheckedEntry::Measurement(_, None) => {}
            UncheckedEntry::Metadata(key, value) => {
                write_attribute(record, key, Attribute::String(value));
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Attribute<'a> {
    String(&'a [u8]),
    Int(i64),
    Double(f64),
}

/// One `KeyValue` in `LogRecord.attributes`.
fn write_attribute(record: &mut Vec<u8>, key: &[u8], value: Attribute<'_>) {
    let any_len = match value {
        Attribute::String(text) => string_value_len(text.len()),
        // int64 travels as its two's complement.
        Attribute::Int(n) => 1 + encoded_len_varint(n as u64),
        Attribute::Double(_) => 1 + 8,
    };
    let key_len = if key.is_empty() {
        0
    } else {
        field_len(key.len())
    };
    write_key(record, RECORD_ATTRIBUTES);
    encode_varint((key_len + field_len(any_len)) as u64, record);
    if !key.is_empty() {
        write_bytes(record, KEY_VALUE_KEY, key);
    }
    write_key(record, KEY_VALUE_VALUE);
    encode_varint(any_len as u64, record);
    match value {
        Attribute::String(text) => write_bytes(record, ANY_STRING, text),
        Attribute::Int(n) => {
            encode_key(ANY_INT, WireType::Varint, record);
            encode_varint(n as u64, record);
        }
        Attribute::Double(x) => {
            encode_key(ANY_DOUBLE, WireType::SixtyFourBit, record);
            record.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// The name as a string field's length and bytes (its key already written): the tokens
/// joined by dots.
fn write_name(record: &mut Vec<u8>, event: &DeliveredEvent<'_>, name_len: usize) {
    encode_varint(name_len as u64, record);
    for (at, part) in event.parts.iter().enumerate() {
        if at > 0 {
            record.push(b'.');
        }
        record.extend_from_slice(part);
    }
}

/// An `AnyValue` holding a string of `len` bytes: its encoded length. A oneof member is
/// written even when empty.
fn string_value_len(len: usize) -> usize {
    field_len(len)
}

/// A length-delimited field of `len` bytes (key of one byte: field numbers below 16).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn write_key(out: &mut Vec<u8>, tag: u32) {
    encode_key(tag, WireType::LengthDelimited, out);
}

/// A length-delimited field: bytes, a string or an encoded message.
fn write_bytes(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    write_key(out, tag);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A fixed64 field, left out when 0.
fn write_fixed64(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn unsigned(ns: i64) -> u64 {
    u64::try_from(ns).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bridge_proto::v1::{self, telemetry_value::Value};
    use opentelemetry_proto::tonic::{
        collector::logs::v1::ExportLogsServiceRequest, common::v1::any_value,
    };

    use super::*;
    use crate::outputs::otlp::convert::{
        ByWorker, Delivered, WorkerDescription, log_record, logs_request,
    };

    #[derive(Debug)]
    struct Directory;

    impl WorkerDirectory for Directory {
        fn describe(&self, worker_id: &str) -> WorkerDescription {
            WorkerDescription {
                labels: BTreeMap::from([("zone".to_owned(), format!("zone-of-{worker_id}"))]),
                host: format!("host-{worker_id}"),
            }
        }
    }

    fn value(value: Value) -> v1::TelemetryValue {
        v1::TelemetryValue { value: Some(value) }
    }

    /// Deliveries of many shapes, as the hub encodes them.
    fn batch() -> Vec<EncodedSubscribeResponse> {
        let stop = v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            measurements: [
                ("output_tokens".to_owned(), value(Value::IntValue(212))),
                ("negative".to_owned(), value(Value::IntValue(-7))),
                ("ratio".to_owned(), value(Value::FloatValue(0.25))),
                (
                    "state".to_owned(),
                    value(Value::StringValue("wärm ✓".into())),
                ),
                ("unset".to_owned(), v1::TelemetryValue { value: None }),
            ]
            .into(),
            metadata: [
                ("model".to_owned(), "llama-70b".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
            .into(),
            timestamp_ns: 2_000_000_000,
            correlation_id: "req-9".into(),
            trace_id: vec![0x4b; 16],
            span_id: vec![0x0a; 8],
            parent_span_id: vec![0x0b; 8],
            ..Default::default()
        };
        let failed = v1::TelemetryEvent {
            event_parts: vec!["app".into(), "step".into()],
            metadata: [("result".to_owned(), "error".to_owned())].into(),
            timestamp_ns: -5,
            ..Default::default()
        };
        let exception = v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "exception".into()],
            ..Default::default()
        };
        // A map key repeated (the last counts), as a client may send it.
        let mut repeated = v1::TelemetryEvent {
            event_parts: vec!["app".into(), "done".into()],
            metadata: [("model".to_owned(), "llama".to_owned())].into(),
            ..Default::default()
        }
        .encode_to_vec();
        repeated.extend(
            v1::TelemetryEvent {
                metadata: [("model".to_owned(), "mistral".to_owned())].into(),
                measurements: [("n".to_owned(), value(Value::IntValue(1)))].into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let delivery = |worker: &str, pool: &str, event: &v1::TelemetryEvent, rate: f64| {
            EncodedSubscribeResponse::delivery(worker, pool, event, rate, 2_000_000_500)
        };
        vec![
            delivery("gpu-3", "llama", &stop, 0.5),
            delivery("gpu-4", "", &failed, 1.0),
            delivery("gpu-3", "llama", &exception, 0.125),
            EncodedSubscribeResponse::delivery_of_bytes(
                "gpu-3",
                "llama",
                &repeated,
                Some(3_000),
                1.0,
                0,
            ),
            delivery("gpu-3", "mistral", &stop, 1.0),
            EncodedSubscribeResponse::lagged(4),
        ]
    }

    /// The request as the generated types build it, resources in the order first met.
    fn typed(batch: &[EncodedSubscribeResponse]) -> ExportLogsServiceRequest {
        let mut records = ByWorker::default();
        for item in batch {
            if let Some(mut delivery) = Delivered::read(item.as_bytes()) {
                let record = log_record(&delivery);
                records.push(&mut delivery, record);
            }
        }
        logs_request(records, &Directory)
    }

    fn sorted(mut request: ExportLogsServiceRequest) -> ExportLogsServiceRequest {
        request
            .resource_logs
            .sort_by_key(|logs| format!("{:?}", logs.resource));
        request
    }

    #[test]
    fn the_bytes_decode_to_the_request_the_generated_types_build() {
        let batch = batch();
        let (encoded, count) = request(&batch, &Directory);
        assert_eq!(count, 5, "every delivery but the lag notice");
        let decoded = ExportLogsServiceRequest::decode(encoded.encode_to_vec().as_slice())
            .expect("a valid request");
        assert_eq!(sorted(decoded.clone()), sorted(typed(&batch)));
        // And what the comparison rests on is there: three resources, typed attributes.
        assert_eq!(decoded.resource_logs.len(), 3);
        let records = &decoded.resource_logs[0].scope_logs[0].log_records;
        assert_eq!(records.len(), 3);
        let attribute = |key: &str| {
            records[0]
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(attribute("negative"), Some(any_value::Value::IntValue(-7)));
        assert_eq!(
            attribute("ratio"),
            Some(any_value::Value::DoubleValue(0.25))
        );
        assert_eq!(
            attribute("bridge.sampling_rate"),
            Some(any_value::Value::DoubleValue(0.5))
        );
        assert_eq!(records[1].severity_text, "ERROR");
        let models: Vec<_> = records[2]
            .attributes
            .iter()
            .filter(|kv| kv.key == "model")
            .collect();
        assert_eq!(models.len(), 1);
        assert_eq!(records[2].time_unix_nano, 3_000);
    }

    #[test]
    fn an_empty_batch_or_one_of_notices_is_an_empty_request() {
        let (encoded, count) = request(&[EncodedSubscribeResponse::lagged(1)], &Directory);
        assert_eq!((encoded.len(), count), (0, 0));
    }
}
