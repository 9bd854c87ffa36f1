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
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use bridge_proto::{
    control::{ControlState, Verdict},
    limits::{EventLimits, OverLimit},
    pattern::{validate_event_name, validate_event_parts},
    protocol::{events, span},
    sampling::{Draw, Presampled, SamplingKey},
    trace::{SpanContext, SpanId, TraceId, TraceParent, trace_id_for},
    v1,
};
use prost::Message;
use tokio::sync::watch;

pub use crate::clock::now_ns;
use crate::{
    buffer::Buffer,
    clock,
    counters::{Counters, DropReason, Snapshot},
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
    /// The hub's limits on one event: the defaults until the link hears the hub's.
    limits: AtomicLimits,
    /// Whether an event over them was logged (once per emitter).
    warned_over_limit: AtomicBool,
    /// Follows `control`, for whoever forwards it (the sidecar's local clients).
    pub(crate) control_changes: watch::Sender<Arc<ControlState>>,
    /// Follows `limits`, likewise.
    limit_changes: watch::Sender<EventLimits>,
}

impl Shared {
    #[inline]
    pub(crate) fn limits(&self) -> EventLimits {
        self.limits.load()
    }

    pub(crate) fn apply_limits(&self, limits: EventLimits) {
        self.limits.store(limits);
        // Followers (the sidecar's local clients) are told too.
        self.limit_changes.send_replace(limits);
    }

    /// What happened to every event emitted so far.
    pub(crate) fn counters(&self) -> Snapshot {
        self.counters.snapshot(self.buffer.counts())
    }

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
        clock::init();
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
                limits: AtomicLimits::new(EventLimits::DEFAULT),
                warned_over_limit: AtomicBool::new(false),
                control_changes: watch::Sender::new(Arc::new(initial)),
                limit_changes: watch::Sender::new(EventLimits::DEFAULT),
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
        self.emit_in(
            name,
            measurements,
            metadata,
            correlation_id.unwrap_or(""),
            None,
        );
    }

    /// [`Emitter::emit`] for an event of a trace: sampled by its trace id.
    #[inline]
    pub(crate) fn emit_in(
        &self,
        name: &str,
        measurements: &[(&str, Value<'_>)],
        metadata: &[(&str, &str)],
        correlation_id: &str,
        trace: Option<&SpanContext>,
    ) {
        let counters = &self.shared.counters;
        if !self.shared.enabled.load(Relaxed) {
            counters.disabled();
            return;
        }
        let key = match trace {
            Some(trace) => SamplingKey::new(trace.trace_id.as_bytes(), correlation_id),
            None => SamplingKey::correlation(correlation_id),
        };
        let (rate, control_version) = match self.shared.fast.load() {
            Some((rate, version)) if rate.keep(key) => (rate, version),
            Some(_) => return counters.sampled_out(),
            None => {
                let control = self.shared.control.load();
                match control.decide_name(name, key) {
                    Verdict::Keep(rate) => (rate, control.version),
                    Verdict::Disabled => return counters.disabled(),
                    Verdict::Filtered => return counters.filtered(),
                    Verdict::SampledOut(_) => return counters.sampled_out(),
                }
            }
        };
        let decision = encode::Decision {
            sampling_rate: rate.get(),
            control_version,
        };
        let request = encode::RequestContext {
            correlation_id,
            trace,
        };
        let accepted = with_name(name, |parts| {
            let (parts, count) = parts.ok_or(Refused::InvalidName)?;
            let event = encode::Event {
                parts,
                measurements,
                metadata,
                timestamp_ns: now_ns(),
                request,
                decision,
            };
            let len = event.encoded_len();
            let longest_string = || {
                let values = measurements.iter().map(|(key, value)| match value {
                    Value::Str(text) => key.len().max(text.len()),
                    _ => key.len(),
                });
                let metadata = metadata
                    .iter()
                    .map(|(key, value)| key.len().max(value.len()));
                name.split('.')
                    .map(str::len)
                    .chain([correlation_id.len()])
                    .chain(values)
                    .chain(metadata)
                    .max()
                    .unwrap_or(0)
            };
            self.limits()
                .check(
                    len,
                    count,
                    measurements.len() + metadata.len(),
                    longest_string,
                )
                .map_err(Refused::OverLimit)?;
            self.shared.buffer.push(len, |out| event.write(out));
            Ok(())
        });
        match accepted {
            Ok(()) => {}
            Err(Refused::InvalidName) => counters.dropped(DropReason::InvalidName),
            Err(Refused::OverLimit(over)) => self.over_limit(name, over),
        }
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
        if !valid_trace_context(&event) {
            return counters.dropped(DropReason::InvalidTraceContext);
        }
        let control = self.shared.control.load();
        let before = Presampled::new(event.sampling_rate, draw);
        match control.decide_presampled(
            || event.event_parts.iter().map(String::as_str),
            SamplingKey::new(&event.trace_id, &event.correlation_id),
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
        if !valid_trace_context(&event) {
            return self
                .shared
                .counters
                .dropped(DropReason::InvalidTraceContext);
        }
        if event.timestamp_ns == 0 {
            event.timestamp_ns = now_ns();
        }
        event.sequence = 0;
        let len = event.encoded_len();
        if let Err(over) = self.limits().check_event(&event, len) {
            return self.over_limit(&event.event_parts.join("."), over);
        }
        self.shared
            .buffer
            .push(len, |out| encode::write_message(&event, out));
    }

    /// Counts an event over the hub's limits, and says so the first time.
    #[cold]
    fn over_limit(&self, name: &str, over: OverLimit) {
        self.shared.counters.dropped(DropReason::OverLimit);
        if !self.shared.warned_over_limit.swap(true, Relaxed) {
            tracing::warn!(event = %name.escape_debug(), %over, "dropping events over the hub's limits (counted as dropped.over_limit; logged once)");
        }
    }

    /// Counts a `TELEMETRY:` line (or other relayed input) that could not be parsed.
    pub fn count_parse_error(&self) {
        self.shared.counters.dropped(DropReason::ParseError);
    }

    /// The hub's limits on one event as this emitter applies them before buffering: the
    /// defaults until its link hears the hub's.
    #[inline]
    pub fn limits(&self) -> EventLimits {
        self.shared.limits()
    }

    /// Applies the hub's limits on one event, as a link does when the hub sends them.
    pub fn apply_limits(&self, limits: EventLimits) {
        self.shared.apply_limits(limits);
    }

    /// Starts a span that begins a trace: emits `{operation}.start` now, and `.stop` or
    /// `.exception` (with the duration and what was recorded on the span meanwhile) when the
    /// span ends. All three carry the span's trace and span ids and one correlation id, so
    /// sampling keeps or drops them together. `docs/conventions.md` names the fields of an
    /// inference span.
    ///
    /// Without a `correlation_id` the trace id is random and the correlation id is its hex.
    /// With one, the trace id is derived from it ([`trace_id_for`]), so that every process
    /// that reports the request under that id lands in one trace. A call that arrived with a
    /// `traceparent` header continues its trace instead: [`Emitter::span_from`].
    pub fn span(
        &self,
        operation: &str,
        metadata: &[(&str, &str)],
        correlation_id: Option<&str>,
    ) -> Span {
        let trace_id = correlation_id.map_or_else(TraceId::random, trace_id_for);
        self.start_span(
            operation,
            metadata,
            correlation_id,
            SpanContext::root(trace_id),
            TraceParent::SAMPLED,
        )
    }

    /// Starts a span for a call that arrived with this `traceparent` header value: a child of
    /// the caller's span, in the caller's trace (and sampled with it, on the trace id). A
    /// missing or invalid header starts a new trace, as W3C asks, like [`Emitter::span`].
    pub fn span_from(
        &self,
        traceparent: Option<&str>,
        operation: &str,
        metadata: &[(&str, &str)],
        correlation_id: Option<&str>,
    ) -> Span {
        match traceparent.and_then(|header| header.parse::<TraceParent>().ok()) {
            Some(parent) => self.start_span(
                operation,
                metadata,
                correlation_id,
                SpanContext::child_of(parent.trace_id, parent.span_id),
                parent.flags,
            ),
            None => self.span(operation, metadata, correlation_id),
        }
    }

    fn start_span(
        &self,
        operation: &str,
        metadata: &[(&str, &str)],
        correlation_id: Option<&str>,
        context: SpanContext,
        trace_flags: u8,
    ) -> Span {
        let correlation_id =
            correlation_id.map_or_else(|| context.trace_id.to_string(), str::to_owned);
        let span = Span {
            emitter: self.clone(),
            operation: operation.to_owned(),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            correlation_id,
            context,
            trace_flags,
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

    /// Whether the hub's toggle lets events through: one atomic read, for callers (the Python
    /// SDK) that skip preparing an event nobody wants.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.shared.enabled.load(Relaxed)
    }

    /// The control state this emitter applies now.
    pub fn control(&self) -> Arc<ControlState> {
        self.shared.control.load_full()
    }

    /// Follows the control state this emitter applies.
    pub fn watch_control(&self) -> watch::Receiver<Arc<ControlState>> {
        self.shared.control_changes.subscribe()
    }

    /// Follows the limits this emitter applies.
    pub fn watch_limits(&self) -> watch::Receiver<EventLimits> {
        self.shared.limit_changes.subscribe()
    }

    /// What happened to every event emitted so far.
    pub fn counters(&self) -> Snapshot {
        self.shared.counters()
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

/// Why `emit` did not accept an event it would have kept.
enum Refused {
    InvalidName,
    OverLimit(OverLimit),
}

/// [`EventLimits`] in atomics, read on every emit without a lock.
#[derive(Debug)]
struct AtomicLimits([AtomicUsize; 4]);

impl AtomicLimits {
    fn new(limits: EventLimits) -> Self {
        let this = Self(Default::default());
        this.store(limits);
        this
    }

    #[inline]
    fn load(&self) -> EventLimits {
        let [message, parts, entries, string] = &self.0;
        EventLimits {
            max_message_bytes: message.load(Relaxed),
            max_event_parts: parts.load(Relaxed),
            max_event_entries: entries.load(Relaxed),
            max_string_bytes: string.load(Relaxed),
        }
    }

    fn store(&self, limits: EventLimits) {
        let [message, parts, entries, string] = &self.0;
        message.store(limits.max_message_bytes, Relaxed);
        parts.store(limits.max_event_parts, Relaxed);
        entries.store(limits.max_event_entries, Relaxed);
        string.store(limits.max_string_bytes, Relaxed);
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
    context: SpanContext,
    /// The `traceparent` flags passed on to calls this span makes: the caller's, or sampled.
    trace_flags: u8,
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

    /// Its trace id, span id and parent's span id, as its events carry them.
    pub fn context(&self) -> SpanContext {
        self.context
    }

    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id
    }

    pub fn span_id(&self) -> SpanId {
        self.context.span_id
    }

    /// The `traceparent` header value for a call this span makes, so that the callee's spans
    /// are children of this one.
    pub fn traceparent(&self) -> String {
        TraceParent {
            trace_id: self.context.trace_id,
            span_id: self.context.span_id,
            flags: self.trace_flags,
        }
        .to_string()
    }

    /// Starts a span within this one: its child, in its trace, with its correlation id.
    pub fn child(&self, operation: &str, metadata: &[(&str, &str)]) -> Span {
        self.emitter.start_span(
            operation,
            metadata,
            Some(&self.correlation_id),
            SpanContext::child_of(self.context.trace_id, self.context.span_id),
            self.trace_flags,
        )
    }

    /// Emits an event that happened during this span (say `inference.first_token`), with the
    /// span's trace context and correlation id.
    pub fn event(&self, name: &str, measurements: &[(&str, Value<'_>)], metadata: &[(&str, &str)]) {
        self.emitter.emit_in(
            name,
            measurements,
            metadata,
            &self.correlation_id,
            Some(&self.context),
        );
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
        self.emitter.emit_in(
            &name,
            measurements,
            &metadata,
            &self.correlation_id,
            Some(&self.context),
        );
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

/// A well-formed name outside the `bridge.` namespace, which belongs to the protocol.
fn valid_name(name: &str) -> bool {
    validate_event_name(name).is_ok() && !events::is_reserved(name)
}

/// The last valid name emitted on this thread, with its tokens encoded as `event_parts`
/// fields. Callers emit the same few names over and over, so a repeat costs a comparison.
struct KnownName {
    name: String,
    parts: Vec<u8>,
    count: usize,
}

thread_local! {
    static LAST_NAME: std::cell::RefCell<KnownName> = const {
        std::cell::RefCell::new(KnownName { name: String::new(), parts: Vec::new(), count: 0 })
    };
}

/// Calls `f` with `name`'s tokens encoded as `event_parts` fields and how many there are, or
/// with `None` if it is not a valid name.
#[inline]
fn with_name<R>(name: &str, f: impl FnOnce(Option<(&[u8], usize)>) -> R) -> R {
    let mut f = Some(f);
    let cached = LAST_NAME.try_with(|last| {
        let mut last = last.try_borrow_mut().ok()?;
        let f = f.take()?;
        if last.name != name {
            if !valid_name(name) {
                return Some(f(None));
            }
            let KnownName {
                name: known,
                parts,
                count,
            } = &mut *last;
            known.clear();
            known.push_str(name);
            *count = encode::name_parts(name, parts);
        }
        Some(f(Some((&last.parts, last.count))))
    });
    if let Ok(Some(result)) = cached {
        return result;
    }
    // The cache was out of reach (in use further up this thread's stack, or this thread's
    // locals already gone): the name is checked and encoded for this event alone.
    let f = f.expect("f is taken only where it is called");
    if !valid_name(name) {
        return f(None);
    }
    let mut parts = Vec::new();
    let count = encode::name_parts(name, &mut parts);
    f(Some((&parts, count)))
}

/// The same for an event given as parts.
fn acceptable(parts: &[String]) -> bool {
    validate_event_parts(parts).is_ok()
        && parts.first().is_none_or(|p| p != events::RESERVED_PREFIX)
}

/// Whether a relayed event's trace context is one the hub accepts: each id absent, or of its
/// length and not all zero.
fn valid_trace_context(event: &v1::TelemetryEvent) -> bool {
    (event.trace_id.is_empty() || TraceId::from_bytes(&event.trace_id).is_ok())
        && (event.span_id.is_empty() || SpanId::from_bytes(&event.span_id).is_ok())
        && (event.parent_span_id.is_empty() || SpanId::from_bytes(&event.parent_span_id).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::{pattern::Pattern, sampling::Rate};

    #[test]
    fn emit_builds_the_event_with_typed_values() {
        let emitter = Emitter::detached(8);
        let system_ns = || {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            i64::try_from(since.unwrap().as_nanos()).unwrap()
        };
        let before = system_ns();
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
        // The wall clock, read from the TSC where the kernel uses it: within a few
        // microseconds of the system clock's readings around the call.
        let after = system_ns();
        assert!(
            (before - 20_000..=after + 20_000).contains(&event.timestamp_ns),
            "{before} <= {} <= {after}",
            event.timestamp_ns
        );
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

    /// A span's events carry its trace context; a child is in its parent's trace with the
    /// parent's span id; a call it makes gets a `traceparent` naming it.
    #[test]
    fn spans_carry_w3c_trace_context_and_nest() {
        let emitter = Emitter::detached(16);
        let parent = emitter.span("request", &[], None);
        let child = parent.child("inference", &[("model", "llama")]);
        let outgoing: TraceParent = child.traceparent().parse().unwrap();
        child.stop();
        parent.stop();
        let events = emitter.buffered();
        let (trace, parent_id) = (events[0].trace_id.clone(), events[0].span_id.clone());
        assert_eq!(events[0].parent_span_id, b"", "a root span has no parent");
        assert_eq!(
            events[0].correlation_id,
            TraceId::from_bytes(&trace).unwrap().to_string()
        );
        for event in &events[1..3] {
            assert_eq!(event.event_parts[0], "inference");
            assert_eq!(event.trace_id, trace);
            assert_eq!(event.parent_span_id, parent_id);
            assert_eq!(event.correlation_id, events[0].correlation_id);
        }
        assert_eq!(
            events[1].span_id, events[2].span_id,
            "start and stop share the span"
        );
        assert_ne!(events[1].span_id, parent_id);
        assert_eq!(outgoing.trace_id.as_bytes()[..], trace[..]);
        assert_eq!(outgoing.span_id.as_bytes()[..], events[1].span_id[..]);
        assert_eq!(events[3].span_id, parent_id);
    }

    #[test]
    fn a_span_continues_the_trace_of_an_incoming_traceparent() {
        let emitter = Emitter::detached(16);
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let span = emitter.span_from(Some(header), "inference", &[], Some("req-1"));
        assert!(
            span.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        assert!(
            span.traceparent().ends_with("-00"),
            "the caller's flags pass on"
        );
        span.event("inference.first_token", &[], &[]);
        span.stop();
        for event in emitter.buffered() {
            assert_eq!(
                TraceId::from_bytes(&event.trace_id).unwrap().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(
                SpanId::from_bytes(&event.parent_span_id)
                    .unwrap()
                    .to_string(),
                "00f067aa0ba902b7"
            );
            assert_eq!(event.correlation_id, "req-1");
        }
        // A bad header starts a new trace (W3C: ignore it), and so does none.
        for bad in [Some("00-zz"), None] {
            let span = emitter.span_from(bad, "inference", &[], None);
            assert_ne!(
                span.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert!(span.context().parent_span_id.is_none());
        }
    }

    /// Two processes reporting one request under one correlation id, neither with a
    /// `traceparent`, put it in one trace.
    #[test]
    fn a_caller_chosen_correlation_id_names_one_trace() {
        let (a, b) = (Emitter::detached(4), Emitter::detached(4));
        let (x, y) = (
            a.span("x", &[], Some("req-7")),
            b.span("y", &[], Some("req-7")),
        );
        assert_eq!(x.trace_id(), y.trace_id());
        assert_ne!(x.span_id(), y.span_id());
    }

    /// Workers sampling the same traces at the same rate keep the same ones, whatever their
    /// correlation ids: the trace id is the key.
    #[test]
    fn sampling_follows_the_trace_id() {
        let at_30 = ControlState::new(2, true, Rate::new(0.3).unwrap(), vec![], vec![], vec![]);
        let (a, b) = (Emitter::detached(4096), Emitter::detached(4096));
        a.apply_control(at_30.clone());
        b.apply_control(at_30);
        let traces: Vec<TraceId> = (0..2000).map(|_| TraceId::random()).collect();
        for (i, trace) in traces.iter().enumerate() {
            let header = format!("00-{trace}-00f067aa0ba902b7-01");
            drop(a.span_from(Some(&header), "a", &[], Some(&format!("a-{i}"))));
            drop(b.span_from(Some(&header), "b", &[], Some(&format!("b-{i}"))));
        }
        let kept = |emitter: &Emitter| -> Vec<Vec<u8>> {
            let mut ids: Vec<_> = emitter.buffered().into_iter().map(|e| e.trace_id).collect();
            ids.dedup();
            ids
        };
        let (kept_a, kept_b) = (kept(&a), kept(&b));
        assert_eq!(kept_a, kept_b);
        let share = kept_a.len() as f64 / traces.len() as f64;
        assert!((0.25..0.35).contains(&share), "{share}");
        assert_eq!(
            a.buffered().len(),
            kept_a.len() * 2,
            "start and end together"
        );
    }

    /// An event the hub would refuse is never buffered: dropped and counted, whichever way it
    /// was emitted, and the events around it are kept.
    #[test]
    fn events_over_the_hubs_limits_are_never_buffered() {
        let emitter = Emitter::detached(8);
        emitter.apply_limits(EventLimits {
            max_message_bytes: 1024,
            ..EventLimits::DEFAULT
        });
        let long = "x".repeat(5000);
        let many: Vec<(String, String)> = (0..300).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        emitter.emit("before", &[], &[], None);
        emitter.emit("long.string", &[], &[("blob", &long)], None);
        emitter.emit("many.entries", &[], &many, None);
        emitter.emit(&["q"; 17].join("."), &[], &[], None);
        emitter.emit(
            "long.measurement",
            &[("text", Value::Str(&long))],
            &[],
            None,
        );
        let mut relayed = v1::TelemetryEvent {
            event_parts: vec!["relayed".into()],
            ..Default::default()
        };
        relayed.metadata.insert("blob".into(), "y".repeat(900));
        relayed.metadata.insert("more".into(), "y".repeat(900));
        emitter.emit_event(relayed, Draw::Consistent);
        emitter.emit("after", &[], &[], None);
        assert_eq!(emitter.buffered_names(), ["before", "after"]);
        let counters = emitter.counters();
        assert_eq!(counters.dropped_over_limit, 5);
        assert_eq!(counters.produced(), 7);
        assert_eq!(counters.buffered(), 2);
    }

    #[test]
    fn a_relayed_event_with_a_bad_trace_id_is_dropped_and_counted() {
        let emitter = Emitter::detached(4);
        for trace_id in [vec![1; 15], vec![0; 16]] {
            let event = v1::TelemetryEvent {
                event_parts: vec!["a".into()],
                trace_id,
                ..Default::default()
            };
            emitter.emit_event(event, Draw::Consistent);
        }
        assert!(emitter.buffered().is_empty());
        assert_eq!(emitter.counters().dropped_invalid_trace_context, 2);
        assert_eq!(emitter.counters().produced(), 2);
    }
}
