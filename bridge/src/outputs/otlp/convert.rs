//! Deliveries as OTLP log records and spans, grouped by the worker (the OTLP resource) that sent
//! them.

use std::collections::{BTreeMap, HashMap};

use bridge_proto::{
    protocol::span,
    view::{Entry, EventView, ValueRef},
};
#[cfg(test)]
use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use smallvec::SmallVec;

/// What the exporter knows of a worker beyond its events.
pub trait WorkerDirectory: Send + Sync + std::fmt::Debug {
    fn describe(&self, worker_id: &str) -> WorkerDescription;
}

/// A worker's labels and host, for its OTLP resource.
#[derive(Debug, Clone, Default)]
pub struct WorkerDescription {
    pub labels: BTreeMap<String, String>,
    /// Empty when the worker did not say.
    pub host: String,
}

/// Why a delivery was not turned into a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotASpan {
    /// It has no trace id, span id or `duration_ns` (an int).
    Incomplete,
}

/// The resource of a worker, per OpenTelemetry's semantic conventions: `service.name` is the
/// pool (the service the fleet runs), else the worker id; `service.instance.id` the worker;
/// `host.name` its machine, when it said.
pub fn resource(worker_id: &str, pool: &str, worker: &WorkerDescription) -> Resource {
    let service = if pool.is_empty() { worker_id } else { pool };
    let mut attributes = vec![
        string("service.name", service),
        string("service.instance.id", worker_id),
    ];
    if !worker.host.is_empty() {
        attributes.push(string("host.name", &worker.host));
    }
    attributes.extend(
        worker
            .labels
            .iter()
            .filter(|(key, _)| {
                !matches!(
                    key.as_str(),
                    "service.name" | "service.instance.id" | "host.name"
                )
            })
            .map(|(key, value)| string(key, value)),
    );
    Resource {
        attributes,
        ..Default::default()
    }
}

pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "telemetry-bridge".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

pub(super) fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn typed(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// A delivery as subscribers receive it (`SubscribeResponse`), read without building the
/// event's maps: its event is a view, whose entries are read where they lie.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Delivered {
    #[prost(message, optional, tag = "1")]
    delivery: Option<DeliveryFields>,
}

/// `EventDelivery`, with the event as a view.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeliveryFields {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub pool: String,
    #[prost(message, optional, tag = "3")]
    pub event: Option<EventView>,
    #[prost(double, tag = "4")]
    pub sampling_rate: f64,
    #[prost(int64, tag = "5")]
    pub received_ns: i64,
}

impl Delivered {
    /// The delivery an encoded `SubscribeResponse` carries, if it is one with an event that
    /// a subscriber could decode.
    pub fn read(encoded: &[u8]) -> Option<DeliveryFields> {
        use prost::Message;
        let delivery = Self::decode(encoded).ok()?.delivery?;
        let event = delivery.event.as_ref()?;
        event.problem().is_none().then_some(delivery)
    }
}

/// Measurements (typed), metadata (strings) and the rate the event was kept at, so that a
/// backend can scale counts by `1 / bridge.sampling_rate`. Where a key repeats in a map, the
/// last entry counts, as a decoder keeps it.
fn attributes(event: &EventView, sampling_rate: f64) -> Vec<KeyValue> {
    let entries: SmallVec<[Entry<'_>; 16]> = event.entries().collect();
    let mut attributes = Vec::with_capacity(entries.len() + 2);
    for (at, entry) in entries.iter().enumerate() {
        let superseded = entries[at + 1..].iter().any(|later| match (entry, later) {
            (Entry::Measurement(key, _), Entry::Measurement(later, _))
            | (Entry::Metadata(key, _), Entry::Metadata(later, _)) => key == later,
            _ => false,
        });
        if superseded {
            continue;
        }
        match entry {
            Entry::Measurement(key, Some(value)) => attributes.push(typed(
                key,
                match *value {
                    ValueRef::Int(v) => any_value::Value::IntValue(v),
                    ValueRef::Float(v) => any_value::Value::DoubleValue(v),
                    ValueRef::String(v) => any_value::Value::StringValue(v.to_owned()),
                },
            )),
            Entry::Measurement(_, None) => {}
            Entry::Metadata(key, value) => attributes.push(string(key, value)),
        }
    }
    if !event.correlation_id().is_empty() {
        attributes.push(string("bridge.correlation_id", event.correlation_id()));
    }
    attributes.push(typed(
        "bridge.sampling_rate",
        any_value::Value::DoubleValue(sampling_rate),
    ));
    attributes
}

fn failed(event: &EventView) -> bool {
    failed_end(
        event.parts().last().map(str::as_bytes),
        event.metadata(span::RESULT).map(str::as_bytes),
    )
}

/// Whether an event ending in `last_part`, with metadata `result`, is a failure (a log
/// record's ERROR severity, a span's error status): an `.exception`, or `result=error`.
pub(super) fn failed_end(last_part: Option<&[u8]>, result: Option<&[u8]>) -> bool {
    last_part == Some(span::EXCEPTION.as_bytes()) || result == Some(span::RESULT_ERROR.as_bytes())
}

fn unsigned(ns: i64) -> u64 {
    u64::try_from(ns).unwrap_or(0)
}

/// One log record per delivery. The export writes the records by hand (`logs`): this is the
/// mapping stated with the generated types, which the tests hold the hand-written bytes to.
#[cfg(test)]
pub fn log_record(delivery: &DeliveryFields) -> LogRecord {
    let default = EventView::default();
    let event = delivery.event.as_ref().unwrap_or(&default);
    let (severity, text) = if failed(event) {
        (SeverityNumber::Error, "ERROR")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    let name = event.name();
    LogRecord {
        time_unix_nano: unsigned(event.timestamp_ns),
        observed_time_unix_nano: unsigned(delivery.received_ns),
        severity_number: severity as i32,
        severity_text: text.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(name.clone())),
        }),
        attributes: attributes(event, delivery.sampling_rate),
        trace_id: event.trace_id().to_vec(),
        span_id: event.span_id().to_vec(),
        event_name: name,
        ..Default::default()
    }
}

/// The span a `X.stop` / `X.exception` delivery ends: named `X`, from its timestamp minus
/// `duration_ns` to its timestamp, in error for `.exception` or `result=error`.
pub fn span(delivery: &DeliveryFields) -> Result<Span, NotASpan> {
    let event = delivery.event.as_ref().ok_or(NotASpan::Incomplete)?;
    let duration = match event.measurement(span::DURATION_NS) {
        Some(ValueRef::Int(ns)) if ns >= 0 => ns,
        _ => return Err(NotASpan::Incomplete),
    };
    let parts: SmallVec<[&str; 4]> = event.parts().collect();
    if event.trace_id().len() != 16 || event.span_id().len() != 8 || parts.len() < 2 {
        return Err(NotASpan::Incomplete);
    }
    let end = unsigned(event.timestamp_ns);
    let status = if failed(event) {
        Status {
            code: StatusCode::Error as i32,
            message: event
                .metadata(span::ERROR_MESSAGE)
                .unwrap_or_default()
                .to_owned(),
        }
    } else {
        Status::default()
    };
    Ok(Span {
        trace_id: event.trace_id().to_vec(),
        span_id: event.span_id().to_vec(),
        parent_span_id: event.parent_span_id().to_vec(),
        name: parts[..parts.len() - 1].join("."),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: end.saturating_sub(unsigned(duration)),
        end_time_unix_nano: end,
        attributes: attributes(event, delivery.sampling_rate),
        status: Some(status),
        ..Default::default()
    })
}

/// Records grouped by the worker that sent them, each worker's resource looked up once.
#[derive(Debug)]
pub struct ByWorker<T> {
    groups: HashMap<(String, String), Vec<T>>,
}

impl<T> Default for ByWorker<T> {
    fn default() -> Self {
        Self {
            groups: HashMap::new(),
        }
    }
}

impl<T> ByWorker<T> {
    /// Adds `item`, from the worker and pool of `delivery` (whose names it takes).
    pub fn push(&mut self, delivery: &mut DeliveryFields, item: T) {
        let key = (
            std::mem::take(&mut delivery.worker_id),
            std::mem::take(&mut delivery.pool),
        );
        self.groups.entry(key).or_default().push(item);
    }

    fn into_resources(
        self,
        directory: &dyn WorkerDirectory,
    ) -> impl Iterator<Item = (Resource, Vec<T>)> + use<'_, T> {
        self.groups.into_iter().map(move |((worker, pool), items)| {
            (
                resource(&worker, &pool, &directory.describe(&worker)),
                items,
            )
        })
    }
}

#[cfg(test)]
pub fn logs_request(
    records: ByWorker<LogRecord>,
    directory: &dyn WorkerDirectory,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: records
            .into_resources(directory)
            .map(|(resource, log_records)| ResourceLogs {
                resource: Some(resource),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

pub fn traces_request(
    spans: ByWorker<Span>,
    directory: &dyn WorkerDirectory,
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: spans
            .into_resources(directory)
            .map(|(resource, spans)| ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use bridge_proto::v1::{self, subscribe_response::Item, telemetry_value::Value};
    use prost::Message;

    use super::*;

    /// As the export reads it: encoded as subscribers receive it.
    fn delivery(name: &str, duration: Option<i64>, metadata: &[(&str, &str)]) -> DeliveryFields {
        let response = v1::SubscribeResponse {
            item: Some(Item::Event(event_delivery(name, duration, metadata))),
        };
        Delivered::read(&response.encode_to_vec()).expect("a delivery")
    }

    fn event_delivery(
        name: &str,
        duration: Option<i64>,
        metadata: &[(&str, &str)],
    ) -> v1::EventDelivery {
        let mut measurements = HashMap::from([(
            "output_tokens".to_owned(),
            v1::TelemetryValue {
                value: Some(Value::IntValue(212)),
            },
        )]);
        if let Some(ns) = duration {
            measurements.insert(
                span::DURATION_NS.into(),
                v1::TelemetryValue {
                    value: Some(Value::IntValue(ns)),
                },
            );
        }
        v1::EventDelivery {
            worker_id: "gpu-3".into(),
            pool: "llama".into(),
            event: Some(v1::TelemetryEvent {
                event_parts: name.split('.').map(str::to_owned).collect(),
                measurements,
                metadata: metadata
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                timestamp_ns: 2_000_000_000,
                trace_id: vec![0x4b; 16],
                span_id: vec![0x0a; 8],
                parent_span_id: vec![0x0b; 8],
                ..Default::default()
            }),
            sampling_rate: 0.5,
            received_ns: 2_000_000_500,
        }
    }

    fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn a_stop_becomes_a_span_ending_at_its_timestamp() {
        let ended = span(&delivery("inference.stop", Some(500_000_000), &[])).unwrap();
        assert_eq!(ended.name, "inference");
        assert_eq!(
            (ended.start_time_unix_nano, ended.end_time_unix_nano),
            (1_500_000_000, 2_000_000_000)
        );
        assert_eq!(ended.parent_span_id, vec![0x0b; 8]);
        assert_eq!(ended.status.clone().unwrap().code, StatusCode::Unset as i32);
        assert_eq!(
            attribute(&ended.attributes, "output_tokens"),
            Some(&any_value::Value::IntValue(212))
        );
        assert_eq!(
            attribute(&ended.attributes, "bridge.sampling_rate"),
            Some(&any_value::Value::DoubleValue(0.5))
        );
        let failed = span(&delivery(
            "inference.exception",
            Some(1),
            &[("error_message", "CUDA out of memory")],
        ))
        .unwrap();
        assert_eq!(
            failed.status.unwrap(),
            Status {
                code: StatusCode::Error as i32,
                message: "CUDA out of memory".into()
            }
        );
        let errored = span(&delivery("tool.stop", Some(1), &[("result", "error")])).unwrap();
        assert_eq!(errored.status.unwrap().code, StatusCode::Error as i32);
        assert_eq!(
            span(&delivery("inference.stop", None, &[])),
            Err(NotASpan::Incomplete)
        );
    }

    #[test]
    fn a_log_record_keeps_times_ids_and_typed_attributes() {
        let record = log_record(&delivery("inference.stop", Some(5), &[("model", "llama")]));
        assert_eq!(record.event_name, "inference.stop");
        assert_eq!(
            (record.time_unix_nano, record.observed_time_unix_nano),
            (2_000_000_000, 2_000_000_500)
        );
        assert_eq!((record.trace_id.len(), record.span_id.len()), (16, 8));
        assert_eq!(
            attribute(&record.attributes, "model"),
            Some(&any_value::Value::StringValue("llama".into()))
        );
        assert_eq!(record.severity_text, "INFO");
    }

    #[test]
    fn a_repeated_key_is_one_attribute_with_the_last_value() {
        let mut event = event_delivery("app.done", None, &[("model", "llama")]);
        let mut bytes = v1::SubscribeResponse {
            item: Some(Item::Event(event.clone())),
        }
        .encode_to_vec();
        // The same delivery again, its model changed: a decoder merges the two, the last
        // model wins.
        event.event.as_mut().unwrap().metadata = [("model".into(), "mistral".into())].into();
        bytes.extend(
            v1::SubscribeResponse {
                item: Some(Item::Event(event)),
            }
            .encode_to_vec(),
        );
        let record = log_record(&Delivered::read(&bytes).unwrap());
        let models: Vec<_> = record
            .attributes
            .iter()
            .filter(|kv| kv.key == "model")
            .collect();
        assert_eq!(models.len(), 1, "{models:?}");
        assert_eq!(
            attribute(&record.attributes, "model"),
            Some(&any_value::Value::StringValue("mistral".into()))
        );
    }

    #[test]
    fn a_delivery_with_a_malformed_event_is_not_read() {
        // An event whose metadata value is not UTF-8: a subscriber could not decode it either.
        let event = [0x1a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, 0xff];
        let mut delivery = vec![0x1a, event.len() as u8];
        delivery.extend(event);
        let mut response = vec![0x0a, delivery.len() as u8];
        response.extend(delivery);
        assert_eq!(Delivered::read(&response), None);
        assert_eq!(Delivered::read(b"\xff\xff"), None);
    }

    #[test]
    fn the_resource_names_the_service_and_the_instance() {
        let worker = WorkerDescription {
            labels: BTreeMap::from([("zone".to_owned(), "b".to_owned())]),
            host: "node-7".into(),
        };
        let keys = |r: Resource| -> Vec<(String, String)> {
            r.attributes
                .into_iter()
                .map(|kv| match kv.value.and_then(|v| v.value) {
                    Some(any_value::Value::StringValue(s)) => (kv.key, s),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            keys(resource("gpu-3", "llama", &worker)),
            [
                ("service.name".to_owned(), "llama".to_owned()),
                ("service.instance.id".into(), "gpu-3".into()),
                ("host.name".into(), "node-7".into()),
                ("zone".into(), "b".into())
            ]
        );
        assert_eq!(keys(resource("gpu-3", "", &worker))[0].1, "gpu-3");
    }
}
