//! How deliveries, workers and control state look as text (for people) and JSON (for the CLI's
//! `--format json` and the HTTP API, which promise the same shapes).

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bridge_proto::{
    protocol::counters,
    trace,
    v1::{self, telemetry_value::Value},
};
use serde_json::{Map, Value as Json, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

fn value_json(value: Option<&Value>) -> Json {
    match value {
        Some(Value::IntValue(v)) => json!(v),
        Some(Value::FloatValue(v)) if v.is_finite() => json!(v),
        // JSON has no NaN or infinity; keep them visible rather than null.
        Some(Value::FloatValue(v)) => json!(v.to_string()),
        Some(Value::StringValue(v)) => json!(v),
        None => Json::Null,
    }
}

fn value_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::IntValue(v)) => v.to_string(),
        Some(Value::FloatValue(v)) => format!("{v}"),
        Some(Value::StringValue(v)) => quoted(v),
        None => "null".into(),
    }
}

/// `text` as it is safe to put on a terminal: a control character (escape sequences start with
/// one) or an invisible character that reorders or hides text (bidirectional overrides,
/// zero-width spaces) is written as an escape (`\u{1b}`), so a string from the network can
/// neither drive the terminal nor pass for another. Borrowed when nothing needs escaping.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hidden(c) {
            let _ = write!(shown, "\\u{{{:x}}}", u32::from(c));
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

/// Characters a terminal acts on or does not show.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{61c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `text` as one token of a text line: quoted and escaped when it is empty or holds what would
/// split the line, or a character [`printable`] would escape.
fn quoted(text: &str) -> String {
    if text.is_empty()
        || text.contains(|c: char| c.is_whitespace() || hidden(c) || c == '"' || c == '=')
    {
        format!("{text:?}")
    } else {
        text.to_owned()
    }
}

/// One JSON object per delivery, the shape `bridge subscribe --format json` promises.
pub fn delivery_json(delivery: &v1::EventDelivery) -> Json {
    let event = delivery.event.clone().unwrap_or_default();
    let measurements: Map<String, Json> = event
        .measurements
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v.value.as_ref())))
        .collect();
    let metadata: Map<String, Json> = event
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let mut object = json!({
        "type": "event",
        "worker_id": delivery.worker_id,
        "pool": delivery.pool,
        "event": event.event_parts.join("."),
        "measurements": measurements,
        "metadata": metadata,
        "timestamp_ns": event.timestamp_ns,
        "correlation_id": event.correlation_id,
        "sequence": (event.sequence != 0).then_some(event.sequence),
        "sampling_rate": delivery.sampling_rate,
        "received_ns": delivery.received_ns,
    });
    if let Json::Object(fields) = &mut object {
        for (key, id) in trace_ids(&event) {
            fields.insert(key.to_owned(), json!(id));
        }
    }
    object
}

/// The event's trace context as lower-case hex, each id only when present.
fn trace_ids(event: &v1::TelemetryEvent) -> impl Iterator<Item = (&'static str, String)> + '_ {
    [
        ("trace_id", &event.trace_id),
        ("span_id", &event.span_id),
        ("parent_span_id", &event.parent_span_id),
    ]
    .into_iter()
    .filter(|(_, id)| !id.is_empty())
    .map(|(key, id)| (key, trace::hex(id)))
}

pub fn lag_json(skipped: u64) -> Json {
    json!({ "type": "lag", "skipped": skipped })
}

/// `2026-11-22T05:33:44.123Z gpu-3/llama inference.stop tokens=5 {model=llama} cid=ab rate=0.1`
pub fn delivery_text(delivery: &v1::EventDelivery) -> String {
    let event = delivery.event.clone().unwrap_or_default();
    let mut line = format!(
        "{} {}",
        timestamp(event.timestamp_ns),
        if delivery.pool.is_empty() {
            delivery.worker_id.clone()
        } else {
            format!("{}/{}", delivery.worker_id, delivery.pool)
        }
    );
    let _ = write!(line, " {}", event.event_parts.join("."));
    for (key, value) in event.measurements.iter().collect::<BTreeMap<_, _>>() {
        let _ = write!(
            line,
            " {}={}",
            quoted(key),
            value_text(value.value.as_ref())
        );
    }
    if !event.metadata.is_empty() {
        let metadata: Vec<String> = event
            .metadata
            .iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, v)| format!("{}={}", quoted(k), quoted(v)))
            .collect();
        let _ = write!(line, " {{{}}}", metadata.join(" "));
    }
    if !event.correlation_id.is_empty() {
        let _ = write!(line, " cid={}", quoted(&event.correlation_id));
    }
    for (key, id) in trace_ids(&event) {
        let _ = write!(line, " {key}={id}");
    }
    if event.sequence != 0 {
        let _ = write!(line, " seq={}", event.sequence);
    }
    if delivery.sampling_rate < 1.0 {
        let _ = write!(line, " rate={}", delivery.sampling_rate);
    }
    line
}

pub fn lag_text(skipped: u64) -> String {
    format!("-- lagged: {skipped} events skipped (this subscriber fell behind) --")
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(unix_ns: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_ns).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// `on rate=0.5 inference.*=0.1 allow=[a.>] block=[debug.>]`
pub fn control_text(state: &v1::ControlState) -> String {
    let mut text = format!(
        "{} rate={}",
        if state.enabled { "on" } else { "off" },
        state.sampling_rate
    );
    for rule in &state.rules {
        let _ = write!(text, " {}={}", rule.pattern, rule.sampling_rate);
    }
    if !state.allowed_events.is_empty() {
        let _ = write!(text, " allow=[{}]", state.allowed_events.join(","));
    }
    if !state.blocked_events.is_empty() {
        let _ = write!(text, " block=[{}]", state.blocked_events.join(","));
    }
    text
}

pub fn control_json(state: &v1::ControlState) -> Json {
    let rules: Map<String, Json> = state
        .rules
        .iter()
        .map(|r| (r.pattern.clone(), json!(r.sampling_rate)))
        .collect();
    json!({
        "version": state.version,
        "enabled": state.enabled,
        "sampling_rate": state.sampling_rate,
        "rules": rules,
        "allow": state.allowed_events,
        "block": state.blocked_events,
    })
}

fn layer_json(layer: &v1::ControlLayer) -> Json {
    let rules: Map<String, Json> = layer
        .rules
        .iter()
        .map(|r| (r.pattern.clone(), json!(r.sampling_rate)))
        .collect();
    json!({
        "version": layer.version,
        "enabled": layer.enabled,
        "sampling_rate": layer.sampling_rate,
        "rules": rules,
        "filter": layer.filter.as_ref().map(|f| json!({"allow": f.allowed_events, "block": f.blocked_events})),
        "timed": layer.timed.iter().map(timed_json).collect::<Vec<_>>(),
        "target_events_per_second": layer.target_events_per_second,
    })
}

/// A setting made by a timed change: which, the time left, and what it returns to (`null`:
/// unset at this level, so inherited).
fn timed_json(timed: &v1::TimedSetting) -> Json {
    json!({
        "setting": timed.setting,
        "pattern": (!timed.pattern.is_empty()).then_some(&timed.pattern),
        "expires_in_ms": timed.expires_in_ms,
        "reverts_to": timed.reverts_to,
    })
}

/// `rate=0.1 for 1m29s more, then 0.5` (or `then inherited`).
fn timed_text(timed: &v1::TimedSetting) -> String {
    let setting = match timed.setting.as_str() {
        "rule" => printable(&timed.pattern).into_owned(),
        "sampling_rate" => "rate".to_owned(),
        other => other.to_owned(),
    };
    format!(
        "{setting} reverts in {} to {}",
        time_left(timed.expires_in_ms),
        timed.reverts_to.as_deref().unwrap_or("inherited")
    )
}

/// Milliseconds left, for a person: `1m29s`, `350ms`.
pub fn time_left(ms: u64) -> String {
    let left = if ms < 1000 {
        Duration::from_millis(ms)
    } else {
        Duration::from_secs(ms.div_ceil(1000))
    };
    humantime::format_duration(left)
        .to_string()
        .replace(' ', "")
}

fn layer_text(layer: &v1::ControlLayer) -> String {
    let mut parts = Vec::new();
    if let Some(enabled) = layer.enabled {
        parts.push(if enabled {
            "on".to_owned()
        } else {
            "off".to_owned()
        });
    }
    match (layer.target_events_per_second, layer.sampling_rate) {
        (Some(goal), Some(rate)) => parts.push(format!("target {goal}/s, rate chosen {rate}")),
        (Some(goal), None) => parts.push(format!("target {goal}/s")),
        (None, Some(rate)) => parts.push(format!("rate={rate}")),
        (None, None) => {}
    }
    for rule in &layer.rules {
        parts.push(format!("{}={}", rule.pattern, rule.sampling_rate));
    }
    if let Some(filter) = &layer.filter {
        parts.push(format!(
            "allow=[{}] block=[{}]",
            filter.allowed_events.join(","),
            filter.blocked_events.join(",")
        ));
    }
    if parts.is_empty() {
        parts.push("(nothing set)".into());
    }
    format!("{} (v{})", parts.join(" "), layer.version)
}

/// The effective control state and the layers it comes from (`GetControl`).
pub fn describe_control_json(response: &v1::GetControlResponse) -> Json {
    json!({
        "effective": control_json(&response.effective.clone().unwrap_or_default()),
        "global": response.global.as_ref().map(layer_json),
        "pool": response.pool.as_ref().map(layer_json),
        "labels": response.labels.iter().map(|level| json!({
            "labels": level.labels.iter().collect::<BTreeMap<_, _>>(),
            "layer": level.layer.as_ref().map(layer_json),
        })).collect::<Vec<_>>(),
        "worker": response.worker.as_ref().map(layer_json),
    })
}

/// The line saying that an answer from a cluster is partial, if it is: `unanswered` as
/// `ListWorkersResponse` and `UpdateControlResponse` name them.
pub fn unanswered_warning(unanswered: &[String], consequence: &str) -> Option<String> {
    match unanswered {
        [] => None,
        [all] if all == "*" => Some(format!(
            "warning: the hub cannot reach the other hubs of its cluster (NATS); {consequence}"
        )),
        hubs => Some(format!(
            "warning: no answer in time from hub{} {}; {consequence}",
            if hubs.len() == 1 { "" } else { "s" },
            hubs.join(", ")
        )),
    }
}

/// The outcome of a control change (`UpdateControl`).
pub fn update_json(response: &v1::UpdateControlResponse) -> Json {
    let targets: Vec<Json> = response
        .targets
        .iter()
        .map(|t| {
            json!({
                "worker_id": t.worker_id,
                "acknowledges": t.acknowledges,
                "applied": t.applied,
                "ack_latency_us": t.applied.then_some(t.ack_latency_us),
            })
        })
        .collect();
    json!({
        "version": response.version,
        "targets": targets,
        "unanswered_hubs": response.unanswered_hubs,
        "expires_at_ms": (response.expires_at_ms != 0).then_some(response.expires_at_ms),
    })
}

pub fn describe_control(response: &v1::GetControlResponse, format: Format) -> String {
    let effective = response.effective.clone().unwrap_or_default();
    match format {
        Format::Json => describe_control_json(response).to_string(),
        Format::Text => {
            let mut text = format!(
                "effective  v{} {}",
                effective.version,
                control_text(&effective)
            );
            let labels = response.labels.iter().map(|level| {
                let mut names: Vec<String> = level
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                names.sort();
                (format!("labels {}", names.join(",")), &level.layer)
            });
            let levels = [
                ("global".to_owned(), &response.global),
                ("pool".to_owned(), &response.pool),
            ]
            .into_iter()
            .chain(labels)
            .chain([("worker".to_owned(), &response.worker)]);
            for (name, layer) in levels {
                if let Some(layer) = layer {
                    let _ = write!(text, "\n{name:<10} {}", layer_text(layer));
                    for timed in &layer.timed {
                        let _ = write!(text, "\n{:<10}   {}", "", timed_text(timed));
                    }
                }
            }
            text
        }
    }
}

fn drops(worker: &v1::WorkerInfo) -> (Map<String, Json>, Map<String, Json>) {
    let worker_side = worker
        .worker_counters
        .iter()
        .filter_map(|(k, v)| {
            let reason = k
                .strip_prefix(counters::DROPPED_PREFIX)
                .or(match k.as_str() {
                    counters::SAMPLED_OUT | counters::FILTERED | counters::DISABLED => {
                        Some(k.as_str())
                    }
                    _ => None,
                })?;
            Some((reason.to_owned(), json!(v)))
        })
        .collect();
    let hub_side = worker
        .hub_drops
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    (worker_side, hub_side)
}

/// The DROPS of `bridge workers`, each reason with its count: the worker's own (sampled out,
/// filtered, disabled, dropped by reason), the hub's (`hub:` first) and `missing` (gaps in the
/// sequence). Reasons with nothing to count are left out.
pub fn drop_entries(worker: &v1::WorkerInfo) -> Vec<(String, u64)> {
    let (worker_drops, hub_drops) = drops(worker);
    let count = |v: &Json| v.as_u64().unwrap_or(0);
    let mut entries: Vec<(String, u64)> = worker_drops
        .iter()
        .map(|(k, v)| (k.clone(), count(v)))
        .chain(
            hub_drops
                .iter()
                .map(|(k, v)| (format!("hub:{k}"), count(v))),
        )
        .filter(|(_, v)| *v != 0)
        .collect();
    if worker.missing_events > 0 {
        entries.push(("missing".into(), worker.missing_events));
    }
    entries
}

/// All of [`drop_entries`] in one figure: `bridge top`'s DROPS, so that it is the sum of what
/// `bridge workers` lists for the same worker.
pub fn drop_total(worker: &v1::WorkerInfo) -> u64 {
    drop_entries(worker)
        .iter()
        .fold(0u64, |total, (_, v)| total.saturating_add(*v))
}

/// The GPUs a worker reported: `none` when it has none, `-` when it does not say.
pub fn gpu_text(worker: &v1::WorkerInfo) -> Cow<'_, str> {
    if worker.gpu.is_empty() {
        Cow::Borrowed("-")
    } else {
        printable(&worker.gpu)
    }
}

pub fn worker_json(worker: &v1::WorkerInfo) -> Json {
    let (worker_drops, hub_drops) = drops(worker);
    let counters: Map<String, Json> = worker
        .worker_counters
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "id": worker.id,
        "pool": worker.pool,
        "hub": (!worker.hub.is_empty()).then_some(&worker.hub),
        "connected": worker.connected,
        "connected_since": timestamp(worker.connected_since_ns),
        "disconnected_at": (worker.disconnected_ns != 0).then(|| timestamp(worker.disconnected_ns)),
        "pid": (worker.pid != 0).then_some(worker.pid),
        "peer": worker.peer,
        "labels": worker.labels,
        "gpu": worker.gpu,
        "events_received": worker.events_received,
        "events_delivered": worker.events_delivered,
        "last_sequence": worker.last_sequence,
        "missing_events": worker.missing_events,
        "events_per_second": (worker.events_per_second * 10.0).round() / 10.0,
        "drops": { "worker": worker_drops, "hub": hub_drops },
        "worker_counters": counters,
        "acknowledges": worker.acknowledges,
        "desired_version": worker.desired_version,
        "applied_version": worker.applied_version,
        "last_ack_latency_us": (worker.last_ack_latency_us != 0).then_some(worker.last_ack_latency_us),
        "control": worker.control.as_ref().map(control_json),
        "control_expires_in_ms": (worker.control_expires_in_ms != 0).then_some(worker.control_expires_in_ms),
        "target_events_per_second": worker.target_events_per_second,
    })
}

/// A table, one worker a row.
pub fn workers_table(workers: &[v1::WorkerInfo]) -> String {
    let now = SystemTime::now();
    // Which hub each worker streams to matters only in cluster mode.
    let clustered = workers.iter().any(|w| !w.hub.is_empty());
    let mut header = vec![
        "WORKER", "POOL", "STATUS", "GPU", "EVENTS", "EV/S", "DROPS", "CONTROL", "STATE",
    ];
    if clustered {
        header.insert(2, "HUB");
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let since = |ns: i64| {
                let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
                let secs = now.duration_since(at).unwrap_or_default().as_secs();
                humantime::format_duration(Duration::from_secs(secs))
                    .to_string()
                    .replace(' ', "")
            };
            let status = if w.connected {
                format!("up {}", since(w.connected_since_ns))
            } else {
                format!("gone {} ago", since(w.disconnected_ns))
            };
            let drop_text: Vec<String> = drop_entries(w)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let control = if !w.acknowledges {
                format!("v{} unacknowledged (hub enforces)", w.desired_version)
            } else {
                match w.applied_version {
                    Some(applied) if applied == w.desired_version => format!("v{applied} applied"),
                    Some(applied) => format!("v{} (applied v{applied})", w.desired_version),
                    None => format!("v{} pending", w.desired_version),
                }
            };
            let control = if w.control_expires_in_ms == 0 {
                control
            } else {
                format!(
                    "{control}, reverts in {}",
                    time_left(w.control_expires_in_ms)
                )
            };
            let mut row = vec![
                w.id.clone(),
                if w.pool.is_empty() {
                    "-".into()
                } else {
                    w.pool.clone()
                },
                status,
                gpu_text(w).into_owned(),
                w.events_received.to_string(),
                format!("{:.1}", w.events_per_second),
                if drop_text.is_empty() {
                    "-".into()
                } else {
                    drop_text.join(" ")
                },
                control,
                match (
                    w.control.as_ref().map(control_text),
                    w.target_events_per_second,
                ) {
                    (Some(state), Some(goal)) => format!("{state} target {goal}/s"),
                    (state, _) => state.unwrap_or_default(),
                },
            ];
            if clustered {
                row.insert(2, w.hub.clone());
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for row in &rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(event: v1::TelemetryEvent) -> v1::EventDelivery {
        v1::EventDelivery {
            worker_id: "gpu-3".into(),
            pool: "llama".into(),
            event: Some(event),
            sampling_rate: 1.0,
            received_ns: 1,
        }
    }

    #[test]
    fn trace_context_shows_as_hex_and_only_when_present() {
        let traced = delivery(v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            trace_id: vec![0x4b; 16],
            span_id: vec![0x0a; 8],
            ..Default::default()
        });
        let json = delivery_json(&traced);
        assert_eq!(json["trace_id"], "4b".repeat(16));
        assert_eq!(json["span_id"], "0a".repeat(8));
        assert!(json.get("parent_span_id").is_none());
        let text = delivery_text(&traced);
        assert!(
            text.contains(&format!(
                " trace_id={} span_id={}",
                "4b".repeat(16),
                "0a".repeat(8)
            )),
            "{text}"
        );
        let untraced = delivery(v1::TelemetryEvent {
            event_parts: vec!["a".into()],
            ..Default::default()
        });
        assert!(delivery_json(&untraced).get("trace_id").is_none());
        assert!(!delivery_text(&untraced).contains("trace_id"));
    }

    /// A peer's strings cannot steer the terminal `bridge subscribe` prints to.
    #[test]
    fn control_characters_in_keys_and_values_are_escaped() {
        let hostile = delivery(v1::TelemetryEvent {
            event_parts: vec!["a".into()],
            metadata: [("k\u{1b}[2J".to_owned(), "v\u{1b}]0;owned\u{7}".to_owned())].into(),
            measurements: [(
                "m\u{1b}".to_owned(),
                v1::TelemetryValue {
                    value: Some(Value::StringValue("\u{9b}31m".into())),
                },
            )]
            .into(),
            correlation_id: "c\u{202e}".into(),
            ..Default::default()
        });
        let text = delivery_text(&hostile);
        assert!(!text.contains(hidden), "{text:?}");
        assert!(text.contains(r"\u{1b}"), "{text}");
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on_or_hide() {
        assert!(matches!(printable("llama-3-8b ünï 模型"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}[31mb\nc\u{7}\u{9b}d"),
            "a\\u{1b}[31mb\\u{a}c\\u{7}\\u{9b}d"
        );
        assert_eq!(printable("\u{202e}gpt\u{200b}"), "\\u{202e}gpt\\u{200b}");
    }
}
