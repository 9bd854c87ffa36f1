//! The simple mode of the telemetry-stream design: an app writes one line per event on stderr,
//!
//! ```text
//! TELEMETRY:{"event": "inference.stop", "measurements": {"output_tokens": 512, "duration_ns": 12500},
//!            "metadata": {"model": "llama"}, "correlation_id": "req-1", "timestamp_ns": 123}
//! ```
//!
//! (on one line). Only `event` is required, as a dotted name or a list of parts. A line of a
//! trace adds `"traceparent": "00-<trace id>-<span id>-<flags>"` (W3C: the event's trace id and
//! its own span id) and, for a child span, `"parent_span_id": "<16 hex>"`. JSON integers
//! become `int_value`, other numbers `float_value`, strings `string_value`. Metadata values are
//! strings; numbers and booleans are taken as their JSON text. Anything else is an error that
//! says what is wrong, so that the sidecar can count the line and pass it through untouched.

use std::collections::HashMap;

use bridge_proto::{
    pattern::validate_event_parts,
    trace::{SpanId, TraceParent},
    v1::{TelemetryEvent, TelemetryValue, telemetry_value},
};
use serde_json::{Map, Value as Json};

/// The prefix that marks a telemetry line.
pub const PREFIX: &[u8] = b"TELEMETRY:";

/// Whether a stderr line (without its line ending) is meant as telemetry.
pub fn is_telemetry(line: &[u8]) -> bool {
    line.starts_with(PREFIX)
}

/// Parses a line that starts with [`PREFIX`] (line ending allowed).
pub fn parse(line: &[u8]) -> Result<TelemetryEvent, String> {
    let body = line
        .strip_prefix(PREFIX)
        .ok_or("the line does not start with TELEMETRY:")?;
    let body = std::str::from_utf8(body).map_err(|_| "the line is not UTF-8".to_owned())?;
    let object: Map<String, Json> = match serde_json::from_str(body.trim_end()) {
        Ok(Json::Object(object)) => object,
        Ok(_) => return Err("expected a JSON object after TELEMETRY:".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let mut event = TelemetryEvent::default();
    let mut has_event = false;
    for (key, value) in object {
        match key.as_str() {
            "event" => {
                event.event_parts = event_parts(value)?;
                has_event = true;
            }
            "measurements" => event.measurements = measurements(value)?,
            "metadata" => event.metadata = metadata(value)?,
            "correlation_id" => match value {
                Json::String(id) => event.correlation_id = id,
                Json::Null => {}
                _ => return Err("`correlation_id` must be a string".into()),
            },
            "timestamp_ns" => match value.as_i64() {
                Some(ns) => event.timestamp_ns = ns,
                None => return Err("`timestamp_ns` must be an integer (nanoseconds)".into()),
            },
            "traceparent" => {
                let parent: TraceParent = string(value, "traceparent")?
                    .parse()
                    .map_err(|e| format!("`traceparent`: {e}"))?;
                event.trace_id = parent.trace_id.as_bytes().to_vec();
                event.span_id = parent.span_id.as_bytes().to_vec();
            }
            "parent_span_id" => {
                let id: SpanId = string(value, "parent_span_id")?
                    .parse()
                    .map_err(|e| format!("`parent_span_id`: {e}"))?;
                event.parent_span_id = id.as_bytes().to_vec();
            }
            other => {
                return Err(format!(
                    "unknown key `{other}` (expected event, measurements, metadata, correlation_id, timestamp_ns, traceparent, parent_span_id)"
                ));
            }
        }
    }
    if !has_event {
        return Err("`event` is required".into());
    }
    if !event.parent_span_id.is_empty() && event.trace_id.is_empty() {
        return Err("`parent_span_id` needs a `traceparent` (the trace it is in)".into());
    }
    validate_event_parts(&event.event_parts).map_err(|e| format!("`event`: {e}"))?;
    Ok(event)
}

fn string(value: Json, key: &str) -> Result<String, String> {
    match value {
        Json::String(text) => Ok(text),
        other => Err(format!("`{key}` must be a string, not {}", kind(&other))),
    }
}

fn event_parts(value: Json) -> Result<Vec<String>, String> {
    match value {
        Json::String(name) => Ok(name.split('.').map(str::to_owned).collect()),
        Json::Array(parts) => parts
            .into_iter()
            .map(|part| match part {
                Json::String(part) => Ok(part),
                _ => Err("`event` parts must be strings".to_owned()),
            })
            .collect(),
        _ => Err("`event` must be a dotted name or a list of parts".into()),
    }
}

fn measurements(value: Json) -> Result<HashMap<String, TelemetryValue>, String> {
    let Json::Object(object) = value else {
        return Err("`measurements` must be an object".into());
    };
    object
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Json::Number(n) => match n.as_i64() {
                    Some(int) => telemetry_value::Value::IntValue(int),
                    None => telemetry_value::Value::FloatValue(n.as_f64().unwrap_or(f64::NAN)),
                },
                Json::String(text) => telemetry_value::Value::StringValue(text),
                other => {
                    return Err(format!(
                        "measurement `{key}`: {} is not a number or a string",
                        kind(&other)
                    ));
                }
            };
            Ok((key, TelemetryValue { value: Some(value) }))
        })
        .collect()
}

fn metadata(value: Json) -> Result<HashMap<String, String>, String> {
    let Json::Object(object) = value else {
        return Err("`metadata` must be an object".into());
    };
    object
        .into_iter()
        .map(|(key, value)| match value {
            Json::String(text) => Ok((key, text)),
            Json::Number(n) => Ok((key, n.to_string())),
            Json::Bool(b) => Ok((key, b.to_string())),
            other => Err(format!(
                "metadata `{key}`: {} is not a string",
                kind(&other)
            )),
        })
        .collect()
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_value::Value as V;

    fn value(event: &TelemetryEvent, key: &str) -> V {
        event.measurements[key].value.clone().unwrap()
    }

    #[test]
    fn parses_the_documented_shape() {
        let event = parse(
            br#"TELEMETRY:{"event":"inference.stop","measurements":{"tokens":512,"latency_ms":12.5,"big":1e3,"state":"warm"},"metadata":{"model":"llama","pid":42,"ok":true},"correlation_id":"req-1","timestamp_ns":123}"#,
        )
        .unwrap();
        assert_eq!(event.event_parts, ["inference", "stop"]);
        assert_eq!(value(&event, "tokens"), V::IntValue(512));
        assert_eq!(value(&event, "latency_ms"), V::FloatValue(12.5));
        assert_eq!(value(&event, "big"), V::FloatValue(1000.0));
        assert_eq!(value(&event, "state"), V::StringValue("warm".into()));
        assert_eq!(event.metadata["pid"], "42");
        assert_eq!(event.metadata["ok"], "true");
        assert_eq!(
            (event.correlation_id.as_str(), event.timestamp_ns),
            ("req-1", 123)
        );
    }

    #[test]
    fn a_line_can_carry_its_trace_context() {
        let event = parse(
            br#"TELEMETRY:{"event":"inference.stop","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","parent_span_id":"b7ad6b7169203331"}"#,
        )
        .unwrap();
        assert_eq!(
            bridge_proto::trace::hex(&event.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(bridge_proto::trace::hex(&event.span_id), "00f067aa0ba902b7");
        assert_eq!(
            bridge_proto::trace::hex(&event.parent_span_id),
            "b7ad6b7169203331"
        );
    }

    #[test]
    fn bad_trace_context_is_a_parse_error_that_says_why() {
        let err = |fields: &str| {
            parse(format!(r#"TELEMETRY:{{"event":"a",{fields}}}"#).as_bytes()).unwrap_err()
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(
            err(r#""traceparent":"00-abc""#).starts_with("`traceparent`: a traceparent is `00-")
        );
        assert!(err(r#""traceparent":7"#).contains("must be a string"));
        assert!(
            err(r#""traceparent":"00-00000000000000000000000000000000-00f067aa0ba902b7-01""#)
                .contains("all zeros")
        );
        assert!(
            err(&format!(r#""traceparent":"{good}","parent_span_id":"xyz""#))
                .contains("16 hex digits")
        );
        assert!(
            err(&format!(
                r#""traceparent":"{good}","parent_span_id":"0000000000000000""#
            ))
            .contains("all zeros")
        );
        assert!(err(r#""parent_span_id":"b7ad6b7169203331""#).contains("needs a `traceparent`"));
    }

    #[test]
    fn only_the_event_is_required_and_parts_may_be_a_list() {
        let event = parse(b"TELEMETRY:{\"event\": [\"worker\", \"ready\"]}\n").unwrap();
        assert_eq!(event.event_parts, ["worker", "ready"]);
        assert!(event.measurements.is_empty() && event.timestamp_ns == 0);
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let err = |line: &str| parse(line.as_bytes()).unwrap_err();
        assert!(err("TELEMETRY:{not json").starts_with("invalid JSON"));
        assert_eq!(
            err("TELEMETRY:[1,2]"),
            "expected a JSON object after TELEMETRY:"
        );
        assert_eq!(err("TELEMETRY:{}"), "`event` is required");
        assert!(err(r#"TELEMETRY:{"event":"a..b"}"#).contains("empty token"));
        assert!(
            err(r#"TELEMETRY:{"event":"a","measurement":{}}"#)
                .contains("unknown key `measurement`")
        );
        assert_eq!(
            err(r#"TELEMETRY:{"event":"a","measurements":{"ok":true}}"#),
            "measurement `ok`: a boolean is not a number or a string"
        );
        assert!(err(r#"TELEMETRY:{"event":"a","timestamp_ns":1.5}"#).contains("timestamp_ns"));
        assert!(err(r#"TELEMETRY:{"event":7}"#).contains("dotted name"));
    }

    #[test]
    fn recognises_the_prefix_only_at_the_start() {
        assert!(is_telemetry(b"TELEMETRY:{}"));
        assert!(!is_telemetry(b" TELEMETRY:{}"));
        assert!(!is_telemetry(b"log: TELEMETRY:{}"));
    }

    mod hostile {
        use proptest::prelude::*;

        use super::*;

        /// JSON that looks like telemetry: the right keys with values of any type.
        fn near_miss() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_owned()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| format!("{f:?}")),
                "[a-z.* >]{0,10}".prop_map(|s| format!("{s:?}")),
            ];
            let value = leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3)
                        .prop_map(|v| format!("[{}]", v.join(","))),
                    prop::collection::vec(("[a-z]{1,4}", inner), 0..3).prop_map(|v| {
                        let fields: Vec<String> =
                            v.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                        format!("{{{}}}", fields.join(","))
                    }),
                ]
            });
            let key = prop_oneof![
                Just("event"),
                Just("measurements"),
                Just("metadata"),
                Just("correlation_id"),
                Just("timestamp_ns"),
                Just("traceparent"),
                Just("parent_span_id"),
                Just("other"),
            ];
            prop::collection::vec((key, value), 0..5).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{k:?}:{v}"))
                    .collect();
                format!("TELEMETRY:{{{}}}", fields.join(","))
            })
        }

        proptest! {
            /// Whatever an app writes: an event with a valid name, or an error, never a panic.
            #[test]
            fn any_line_parses_or_says_why(tail in prop::collection::vec(any::<u8>(), 0..128)) {
                let mut line = PREFIX.to_vec();
                line.extend(tail);
                if let Ok(event) = parse(&line) {
                    prop_assert!(validate_event_parts(&event.event_parts).is_ok());
                }
            }

            #[test]
            fn near_miss_json_parses_or_says_why(line in near_miss()) {
                match parse(line.as_bytes()) {
                    Ok(event) => prop_assert!(validate_event_parts(&event.event_parts).is_ok()),
                    Err(message) => prop_assert!(!message.is_empty()),
                }
            }
        }
    }
}
