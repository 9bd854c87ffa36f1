//! The emitting side of the worker library: `emit`, spans, and what happens before an event is
//! queued.
//!
//! Toggle, filters and sampling are decided before anything is allocated, so a disabled,
//! filtered or sampled-out event costs a few nanoseconds. A kept event is encoded once, numbered
//! and put in the bounded outage buffer, which never blocks the caller: when it is full the
//! oldest event is dropped and counted.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bridge_proto::{
    control::{ControlState, Verdict},
    pattern::{validate_event_name, validate_event_parts},
    protocol::{events, span},
    sampling::{Draw, Presampled},
    v1,
};
use prost::Message;
use tokio::sync::watch;

use crate::{
    buffer::Buffer,
    counters::{Counters, DropReason},
    encode,
    fast_control::FastControl,
    value::Value,
};

/// State shared by an emitter's clones and its link to the hub.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Mirrors `control.enabled`, checked first so that a disabled emit reads one atomic.
    pub(crate) enabled: AtomicBool,
    pub(crate) control: ArcSwap<ControlState>,
    /// `control` when it has no rules and no filters, for the fast path of `emit`.
    fast: FastControl,
    pub(crate) counters: Counters,
    pub(crate) buffer: Buffer,
    /// Follows `control`, for whoever forwards it (the sidecar's local clients).
    pub(crate) control_changes: watch::Sender<Arc<ControlState>>,
}

impl Shared {
    pub(crate) fn apply(&self, state: ControlState) {
        let state = Arc::new(state);
        self.fast.store(&state);
        self.enabled.store(state.enabled, Relaxed);
        self.control.store(state.clone());
        self.control_changes.send_replace(state);
    }
}

/// Emits telemetry events. Cheap to clone; every clone feeds the same queue and link.
#[derive(Debug, Clone)]
pub struct Emitter {
    pub(crate) shared: Arc<Shared>,
}

impl Emitter {
    /// An emitter whose buffer holds up to `capacity` events, with no link to send them:
    /// [`Emitter::buffered`] shows what it would send. Links make their own.
    pub fn detached(capacity: usize) -> Self {
        let initial = ControlState::default();
        let fast = FastControl::default();
        fast.store(&initial);
        Self {
            shared: Arc::new(Shared {
                enabled: AtomicBool::new(true),
                control: ArcSwap::from_pointee(initial.clone()),
                fast,
                counters: Counters::default(),
                buffer: Buffer::new(capacity),
                control_changes: watch::Sender::new(Arc::new(initial)),
            }),
        }
    }

    /// Emits an event named `name` (dotted, e.g. `inference.stop`).
    ///
    /// Never blocks and never fails: an event that is disabled, filtered, sampled out or badly
    /// named is counted by reason, and so is the oldest event when the buffer is full (see
    /// [`Emitter::counters`]).
    #[inline]
    pub fn emit(
        &self,
        name: &str,
        measurements: &[(&str, Value<'_>)],
        metadata: &[(&str, &str)],
        correlation_id: Option<&str>,
    ) {
        let counters = &self.shared.counters;
        if !self.shared.enabled.load(Relaxed) {
            counters.disabled();
            return;
        }
        let correlation_id = correlation_id.unwrap_or("");
        let (rate, control_version) = match self.shared.fast.load() {
            Some((rate, version)) if rate.keep(correlation_id) => (rate, version),
            Some(_) => return counters.sampled_out(),
            None => {
                let control = self.shared.control.load();
                match control.decide_name(name, correlation_id) {
                    Verdict::Keep(rate) => (rate, control.version),
                    Verdict::Disabled => return counters.disabled(),
                    Verdict::Filtered => return counters.filtered(),
                    Verdict::SampledOut(_) => return counters.sampled_out(),
                }
            }
        };
        if !valid_name(name) {
            return counters.dropped(DropReason::InvalidName);
        }
        let decision = encode::Decision {
            sampling_rate: rate.get(),
            control_version,
        };
        let timestamp = now_ns();
        self.accept(|buf| {
            encode::event(
                name,
                measurements,
                metadata,
                timestamp,
                correlation_id,
                decision,
                buf,
            )
        });
    }

    /// Emits an event built elsewhere (e.g. relayed from another process), applying the same
    /// toggle, filters and sampling as [`Emitter::emit`]. An event its source sampled already
    /// (`sampling_rate`, by a draw of kind `draw`) is sampled again so that overall it is kept
    /// at this emitter's rate, not the product of the two. Its sequence number, if it had one, is
    /// replaced by this worker's. A missing timestamp becomes now.
    pub fn emit_event(&self, event: v1::TelemetryEvent, draw: Draw) {
        let counters = &self.shared.counters;
        if !self.shared.enabled.load(Relaxed) {
            return counters.disabled();
        }
        if !acceptable(&event.event_parts) {
            return counters.dropped(DropReason::InvalidName);
        }
        let control = self.shared.control.load();
        let before = Presampled::new(event.sampling_rate, draw);
        match control.decide_presampled(
            || event.event_parts.iter().map(String::as_str),
            &event.correlation_id,
            before,
        ) {
            Verdict::Keep(rate) => {
                let mut event = event;
                event.sampling_rate = rate.get();
                event.control_version = control.version;
                self.accept_message(event);
            }
            Verdict::Disabled => counters.disabled(),
            Verdict::Filtered => counters.filtered(),
            Verdict::SampledOut(_) => counters.sampled_out(),
        }
    }

    /// Buffers an event whose toggle, filter and sampling its source already decided under
    /// this emitter's current control state (a local client that applied it itself). Unless the
    /// event says otherwise, it was sampled at the rate that state sets for it.
    pub fn emit_decided(&self, mut event: v1::TelemetryEvent) {
        let control = self.shared.control.load();
        if event.control_version == 0 {
            event.control_version = control.version;
        }
        if event.sampling_rate == 0.0 {
            event.sampling_rate = control.rate_for_parts(&event.event_parts).get();
        }
        self.accept_message(event);
    }

    fn accept_message(&self, mut event: v1::TelemetryEvent) {
        if !acceptable(&event.event_parts) {
            return self.shared.counters.dropped(DropReason::InvalidName);
        }
        if event.timestamp_ns == 0 {
            event.timestamp_ns = now_ns();
        }
        self.accept(|buf| encode::message(event, buf));
    }

    /// Counts a `TELEMETRY:` line (or other relayed input) that could not be parsed.
    pub fn count_parse_error(&self) {
        self.shared.counters.dropped(DropReason::ParseError);
    }

    /// Encodes with `encode` into this thread's scratch buffer and buffers a copy.
    fn accept(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let evicted = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            encode(&mut scratch);
            self.shared.buffer.push(&scratch).evicted
        });
        let counters = &self.shared.counters;
        counters.accepted();
        if evicted {
            counters.dropped(DropReason::BufferFull);
        }
    }

    /// Starts a span: emits `{operation}.start` now, and `.stop` or `.exception` (with the
    /// duration and what was recorded on the span meanwhile) when the span ends. All three share
    /// one correlation id (generated when `correlation_id` is `None`), so sampling keeps or drops
    /// them together. `docs/conventions.md` names the fields of an inference span.
    pub fn span(
        &self,
        operation: &str,
        metadata: &[(&str, &str)],
        correlation_id: Option<&str>,
    ) -> Span {
        let correlation_id = correlation_id.map_or_else(new_correlation_id, str::to_owned);
        let span = Span {
            emitter: self.clone(),
            operation: operation.to_owned(),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            correlation_id,
            recorded: Vec::new(),
            started: Instant::now(),
            finished: false,
        };
        span.emit(
            span::START,
            &[(span::SYSTEM_TIME_NS, Value::Int(now_ns()))],
            &[],
        );
        span
    }

    /// The control state this emitter applies now.
    pub fn control(&self) -> Arc<ControlState> {
        self.shared.control.load_full()
    }

    /// Follows the control state this emitter applies.
    pub fn watch_control(&self) -> watch::Receiver<Arc<ControlState>> {
        self.shared.control_changes.subscribe()
    }

    /// What happened to every event emitted so far.
    pub fn counters(&self) -> crate::counters::Snapshot {
        self.shared.counters.snapshot()
    }

    /// Applies a control state locally, as a link does when the hub sends one.
    pub fn apply_control(&self, state: ControlState) {
        self.shared.apply(state);
    }

    /// The events buffered and not yet confirmed by a hub, oldest first, decoded.
    pub fn buffered(&self) -> Vec<v1::TelemetryEvent> {
        self.shared
            .buffer
            .snapshot()
            .iter()
            .filter_map(|e| v1::TelemetryEvent::decode(e.as_bytes().clone()).ok())
            .collect()
    }

    /// The dotted names of what [`Emitter::buffered`] holds, for tests.
    #[cfg(test)]
    pub(crate) fn buffered_names(&self) -> Vec<String> {
        self.buffered()
            .iter()
            .map(|e| e.event_parts.join("."))
            .collect()
    }
}

/// A timed operation; see [`Emitter::span`].
///
/// What is measured during the call ([`Span::record`], [`Span::set_metadata`]) goes on the
/// event that ends it:
///
/// ```
/// use bridge_proto::protocol::inference::{MODEL, MODEL_VERSION, OPERATION, OUTPUT_TOKENS};
/// let telemetry = worker::Emitter::detached(8);
/// let mut span = telemetry.span(OPERATION, &[(MODEL, "llama-70b")], None);
/// // ... run the model ...
/// span.record(OUTPUT_TOKENS, 212);
/// span.set_metadata(MODEL_VERSION, "3");
/// span.stop(); // inference.stop with duration_ns, output_tokens=212, model_version=3
/// ```
#[derive(Debug)]
pub struct Span {
    emitter: Emitter,
    operation: String,
    metadata: HashMap<String, String>,
    correlation_id: String,
    /// Measurements for the end event. It allocates only when something is recorded, so a span
    /// that records nothing costs what spans did before they could record.
    recorded: Vec<(String, Recorded)>,
    started: Instant,
    finished: bool,
}

/// A recorded measurement, owned until the span ends.
#[derive(Debug, Clone, PartialEq)]
enum Recorded {
    Int(i64),
    Float(f64),
    Str(String),
}

impl Recorded {
    fn as_value(&self) -> Value<'_> {
        match self {
            Recorded::Int(v) => Value::Int(*v),
            Recorded::Float(v) => Value::Float(*v),
            Recorded::Str(v) => Value::Str(v),
        }
    }
}

impl From<Value<'_>> for Recorded {
    fn from(value: Value<'_>) -> Self {
        match value {
            Value::Int(v) => Recorded::Int(v),
            Value::Float(v) => Recorded::Float(v),
            Value::Str(v) => Recorded::Str(v.to_owned()),
        }
    }
}

impl Span {
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Records a measurement for the event that ends the span (`.stop` or `.exception`), e.g.
    /// `span.record(OUTPUT_TOKENS, 212)`. Recording a key again replaces its value. The span's
    /// own `duration_ns` and `system_time_ns` cannot be replaced: recording them is ignored.
    pub fn record<'v>(&mut self, key: &str, value: impl Into<Value<'v>>) {
        if span::OWN_MEASUREMENTS.contains(&key) {
            return;
        }
        let value = Recorded::from(value.into());
        match self.recorded.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => self.recorded.push((key.to_owned(), value)),
        }
    }

    /// Sets metadata for the event that ends the span, besides what it started with (which a
    /// key set again replaces). The span's own `result`, `error_type` and `error_message`
    /// cannot be replaced: setting them is ignored.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        if span::OWN_METADATA.contains(&key) {
            return;
        }
        self.metadata.insert(key.to_owned(), value.to_owned());
    }

    /// Ends the span successfully: `{operation}.stop` with `duration_ns`, what was recorded,
    /// and `result=success`.
    pub fn stop(mut self) {
        self.finish(span::STOP, &[(span::RESULT, span::RESULT_SUCCESS)]);
    }

    /// Ends the span with an error: `{operation}.exception` with `duration_ns`, what was
    /// recorded, and `result=error`, `error_type` and `error_message`.
    pub fn exception(mut self, error_type: &str, error_message: &str) {
        self.fail(error_type, error_message);
    }

    fn fail(&mut self, error_type: &str, error_message: &str) {
        self.finish(
            span::EXCEPTION,
            &[
                (span::RESULT, span::RESULT_ERROR),
                (span::ERROR_TYPE, error_type),
                (span::ERROR_MESSAGE, error_message),
            ],
        );
    }

    fn finish(&mut self, suffix: &str, extra: &[(&str, &str)]) {
        self.finished = true;
        let duration = i64::try_from(self.started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        let own = [
            (span::DURATION_NS, Value::Int(duration)),
            (span::SYSTEM_TIME_NS, Value::Int(now_ns())),
        ];
        if self.recorded.is_empty() {
            return self.emit(suffix, &own, extra);
        }
        let measurements: Vec<(&str, Value<'_>)> = own
            .into_iter()
            .chain(
                self.recorded
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_value())),
            )
            .collect();
        self.emit(suffix, &measurements, extra);
    }

    fn emit(&self, suffix: &str, measurements: &[(&str, Value<'_>)], extra: &[(&str, &str)]) {
        let name = format!("{}.{suffix}", self.operation);
        let mut metadata: Vec<(&str, &str)> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        metadata.extend_from_slice(extra);
        self.emitter
            .emit(&name, measurements, &metadata, Some(&self.correlation_id));
    }
}

impl Drop for Span {
    /// A span dropped without `stop` or `exception` ended abnormally: by a panic, or by an early
    /// return (`?`). Either way it is reported, never lost.
    fn drop(&mut self) {
        if !self.finished {
            let (error_type, message) = if std::thread::panicking() {
                (span::ERROR_TYPE_PANIC, "the span's thread panicked")
            } else {
                (
                    span::ERROR_TYPE_DROPPED,
                    "the span ended without stop() or exception()",
                )
            };
            self.fail(error_type, message);
        }
    }
}

/// A well-formed name outside the `bridge.` namespace, which belongs to the protocol. Callers
/// emit the same few names over and over, so the last one found valid on this thread is
/// remembered and a repeat costs a comparison.
#[inline]
fn valid_name(name: &str) -> bool {
    thread_local! {
        static LAST_VALID: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LAST_VALID.with(|last| {
        if *last.borrow() == name {
            return true;
        }
        let valid = validate_event_name(name).is_ok() && !events::is_reserved(name);
        if valid {
            let mut last = last.borrow_mut();
            last.clear();
            last.push_str(name);
        }
        valid
    })
}

/// The same for an event given as parts.
fn acceptable(parts: &[String]) -> bool {
    validate_event_parts(parts).is_ok()
        && parts.first().is_none_or(|p| p != events::RESERVED_PREFIX)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A random 128-bit id in hex, for spans started without a correlation id.
pub fn new_correlation_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::{pattern::Pattern, sampling::Rate};

    #[test]
    fn emit_builds_the_event_with_typed_values() {
        let emitter = Emitter::detached(8);
        emitter.emit(
            "inference.stop",
            &[
                ("tokens", 512.into()),
                ("latency_ms", 12.5.into()),
                ("state", "warm".into()),
            ],
            &[("model", "llama")],
            Some("req-1"),
        );
        let event = emitter.buffered().remove(0);
        assert_eq!(event.event_parts, ["inference", "stop"]);
        assert_eq!(event.sequence, 1);
        assert_eq!(event.correlation_id, "req-1");
        assert_eq!(event.metadata["model"], "llama");
        use bridge_proto::v1::telemetry_value::Value as V;
        assert_eq!(event.measurements["tokens"].value, Some(V::IntValue(512)));
        assert_eq!(
            event.measurements["latency_ms"].value,
            Some(V::FloatValue(12.5))
        );
        assert_eq!(
            event.measurements["state"].value,
            Some(V::StringValue("warm".into()))
        );
        assert!(event.timestamp_ns > 0);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_without_blocking() {
        let emitter = Emitter::detached(2);
        for i in 0..5 {
            emitter.emit("a.b", &[("i", Value::Int(i))], &[], None);
        }
        let counters = emitter.counters();
        assert_eq!((counters.accepted, counters.dropped_buffer_full), (5, 3));
        assert_eq!((counters.produced(), counters.buffered()), (5, 2));
        let kept: Vec<u64> = emitter.buffered().iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [4, 5], "the newest events are kept");
    }

    #[test]
    fn toggle_filters_and_sampling_apply_before_queueing() {
        let emitter = Emitter::detached(64);
        let rules = vec![bridge_proto::control::SamplingRule {
            pattern: Pattern::parse("noisy.*").unwrap(),
            rate: Rate::NONE,
        }];
        emitter.apply_control(ControlState::new(
            1,
            true,
            Rate::ALL,
            rules,
            vec![],
            vec![Pattern::parse("debug.>").unwrap()],
        ));
        emitter.emit("noisy.tick", &[], &[], Some("x"));
        emitter.emit("debug.trace", &[], &[], None);
        emitter.emit("inference.stop", &[], &[], None);
        emitter.emit("bad..name", &[], &[], None);
        assert_eq!(emitter.buffered_names(), ["inference.stop"]);
        let c = emitter.counters();
        assert_eq!(
            (c.sampled_out, c.filtered, c.dropped_invalid_name),
            (1, 1, 1)
        );

        emitter.apply_control(ControlState::new(
            2,
            false,
            Rate::ALL,
            vec![],
            vec![],
            vec![],
        ));
        emitter.emit("inference.stop", &[], &[], None);
        assert_eq!(
            emitter.buffered_names(),
            ["inference.stop"],
            "nothing more was accepted"
        );
        assert_eq!(emitter.counters().disabled, 1);
    }

    #[test]
    fn spans_share_a_correlation_id_and_report_their_outcome() {
        let emitter = Emitter::detached(16);
        let span = emitter.span("inference", &[("model", "llama")], None);
        let id = span.correlation_id().to_owned();
        span.stop();
        emitter
            .span("tool", &[], Some("req-9"))
            .exception("Timeout", "took too long");
        drop(emitter.span("early", &[], None));

        let events = emitter.buffered();
        let names: Vec<_> = events.iter().map(|e| e.event_parts.join(".")).collect();
        assert_eq!(
            names,
            [
                "inference.start",
                "inference.stop",
                "tool.start",
                "tool.exception",
                "early.start",
                "early.exception"
            ]
        );
        assert!(events[..2].iter().all(|e| e.correlation_id == id));
        assert_eq!(events[1].metadata["result"], "success");
        assert_eq!(events[1].metadata["model"], "llama");
        assert!(events[1].measurements.contains_key("duration_ns"));
        assert_eq!(events[3].metadata["error_type"], "Timeout");
        assert_eq!(events[3].correlation_id, "req-9");
        assert_eq!(events[5].metadata["error_type"], "dropped");
    }

    #[test]
    fn what_a_span_records_lands_on_stop_only() {
        use bridge_proto::protocol::inference::*;
        use bridge_proto::v1::telemetry_value::Value as V;
        let emitter = Emitter::detached(16);
        let mut span = emitter.span(OPERATION, &[(MODEL, "llama")], None);
        span.record(INPUT_TOKENS, 1024);
        span.record(OUTPUT_TOKENS, 1);
        span.record(OUTPUT_TOKENS, 212);
        span.record(BATCH_FILL_RATIO, 0.5);
        span.record(DURATION_NS, 7);
        span.set_metadata(MODEL_VERSION, "3");
        span.set_metadata(RESULT, "maybe");
        span.stop();

        let events = emitter.buffered();
        let (start, stop) = (&events[0], &events[1]);
        assert_eq!(start.event_parts.join("."), START);
        let keys: Vec<&str> = start.measurements.keys().map(String::as_str).collect();
        assert_eq!(keys, [SYSTEM_TIME_NS], "recorded values are for the end");
        assert_eq!(stop.event_parts.join("."), STOP);
        let int = |key: &str| match stop.measurements[key].value {
            Some(V::IntValue(v)) => v,
            ref other => panic!("{key}: {other:?}"),
        };
        assert_eq!((int(INPUT_TOKENS), int(OUTPUT_TOKENS)), (1024, 212));
        assert_ne!(int(DURATION_NS), 7, "the span measures its own duration");
        assert!(int(SYSTEM_TIME_NS) > 0);
        assert_eq!(
            stop.measurements[BATCH_FILL_RATIO].value,
            Some(V::FloatValue(0.5))
        );
        assert_eq!(stop.measurements.len(), 5);
        assert_eq!(stop.metadata[MODEL], "llama");
        assert_eq!(stop.metadata[MODEL_VERSION], "3");
        assert_eq!(stop.metadata[RESULT], RESULT_SUCCESS);
    }

    #[test]
    fn what_a_span_records_lands_on_exception_too() {
        use bridge_proto::protocol::inference::*;
        let emitter = Emitter::detached(16);
        let mut span = emitter.span(OPERATION, &[(MODEL, "llama")], Some("req-2"));
        span.record(QUEUE_WAIT_NS, 1500);
        span.set_metadata(PIPELINE_STAGE, "inference");
        span.exception("CudaOutOfMemory", "out of memory");
        let mut dropped = emitter.span(OPERATION, &[], None);
        dropped.record(INPUT_TOKENS, 9);
        drop(dropped);

        let events = emitter.buffered();
        let exception = &events[1];
        assert_eq!(exception.event_parts.join("."), EXCEPTION);
        assert!(exception.measurements.contains_key(QUEUE_WAIT_NS));
        assert!(exception.measurements.contains_key(DURATION_NS));
        assert_eq!(exception.metadata[PIPELINE_STAGE], "inference");
        assert_eq!(exception.metadata[RESULT], RESULT_ERROR);
        assert_eq!(exception.metadata[ERROR_TYPE], "CudaOutOfMemory");
        let dropped = &events[3];
        assert_eq!(dropped.metadata[ERROR_TYPE], "dropped");
        assert!(dropped.measurements.contains_key(INPUT_TOKENS));
    }

    /// The end event of a span that records nothing is built without a heap allocation for its
    /// measurements: `recorded` never allocated.
    #[test]
    fn a_span_that_records_nothing_holds_no_recorded_buffer() {
        let span = Emitter::detached(4).span("op", &[], None);
        assert_eq!(span.recorded.capacity(), 0);
    }
}
