//! Both halves of a worker's `StreamTelemetry` stream: events in, control out.
//!
//! Inbound, each event is validated, checked against the worker's desired control state unless
//! it was decided under that very version (so a command takes effect at once, even on clients
//! that ignore control), and fanned out with the rate it was kept at. Acknowledgements and counter reports arrive in-band as reserved
//! event names. Outbound, the worker receives its full desired state on connect and after every
//! change.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use async_stream::stream;
use bridge_proto::{
    control::{ControlState, Verdict},
    limits::EventLimits,
    pattern::validate_event_tokens,
    protocol::{
        MAX_SEQUENCE_JUMP,
        events::{CONTROL_APPLIED, CONTROL_APPLIED_VERSION, RESERVED_PREFIX, WORKER_STATS},
    },
    sampling::{Draw, Presampled},
    v1::{self, telemetry_control::Control, telemetry_value::Value},
    view::EventView,
};
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use crate::{
    config::Config,
    hub::Hub,
    latency::{elapsed_ns, unix_nanos},
    outputs::{Delivery, inference_metrics::StreamRecorder},
    registry::{HubDrop, Sequenced, Session},
};

/// Events taken without waiting, with one receipt time, before the ingest loop looks at
/// whether the hub ended the stream (and reads the clock) again: a bound on how much earlier
/// than its actual arrival an event can be stamped (the time the hub takes for this many,
/// tens of microseconds).
const READ_TOGETHER: u32 = 32;

/// Reads the worker's events until the stream ends or the hub ends it.
pub async fn ingest(hub: Hub, session: Session, mut inbound: Streaming<EventView>) {
    let mut stream = StreamState {
        admission: Admission::new(hub.config()),
        enforcer: Enforcer::new(session.worker.watch_desired(), session.acknowledges),
        inference: hub.inference_metrics().recorder(&session.pool),
    };
    let mut warned = false;
    // Made once: a fresh future per message costs a measurable share of a trickling stream.
    let cancelled = session.cancel.cancelled();
    tokio::pin!(cancelled);
    // When the events being taken were read: messages that are ready without waiting came in
    // together, so they share one clock read (up to `READ_TOGETHER` of them). The first one
    // reads the clock.
    let mut received_ns = 0;
    let mut together = READ_TOGETHER;
    let reason = loop {
        let ready = if together < READ_TOGETHER {
            inbound.message().now_or_never()
        } else {
            None
        };
        let message = match ready {
            Some(message) => {
                together += 1;
                message
            }
            None => {
                let message = tokio::select! {
                    biased;
                    () = &mut cancelled => {
                        break session
                            .ended_with()
                            .map_or_else(|| "closed by the hub".to_owned(), |s| s.message().to_owned());
                    }
                    message = inbound.message() => message,
                };
                received_ns = unix_nanos(SystemTime::now());
                together = 0;
                message
            }
        };
        match message {
            Ok(Some(event)) => {
                if let Err(error) = accept(&hub, &session, &mut stream, event, received_ns)
                    && !warned
                {
                    warn!(worker.id = %session.worker.id, %error, "dropping invalid events from this worker (logged once per stream; counted as drop reason `invalid`)");
                    warned = true;
                }
            }
            Ok(None) => break "stream closed by the worker".to_owned(),
            Err(status) => {
                if status.code() == tonic::Code::InvalidArgument {
                    // A message that did not decode (see `bridge_proto::codec`): refused, and
                    // counted like any other invalid event of the worker.
                    session.worker.counters.received.fetch_add(1, Relaxed);
                    session.worker.counters.drop(HubDrop::Invalid);
                    warn!(worker.id = %session.worker.id, error = %status.message(), "ending the stream of a worker that sent a malformed message (counted as drop reason `invalid`)");
                }
                let status = inbound_failure(status);
                let reason = format!("stream failed: {}", status.message());
                // Tell the worker why (it may be a message of ours it cannot see otherwise).
                session.end(status);
                break reason;
            }
        }
    };
    hub.disconnect(&session, &reason);
}

/// gRPC says RESOURCE_EXHAUSTED for a message over the receive limit; tonic says OUT_OF_RANGE.
fn inbound_failure(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        Status::resource_exhausted(format!(
            "event message too large (raise hub.max_message_bytes to accept it): {}",
            status.message()
        ))
    } else {
        status
    }
}

/// Delivers or drops one event; `Err` says why an event was invalid (already counted).
///
/// The reserved `bridge.*` events (acknowledgements, counter reports) pass the same checks and
/// limits as any other before they are decoded. One the hub takes in is neither received nor
/// delivered telemetry; one it refuses is counted as received and dropped, so the counts
/// balance either way.
fn accept(
    hub: &Hub,
    session: &Session,
    stream: &mut StreamState,
    event: EventView,
    received_ns: i64,
) -> Result<(), String> {
    let StreamState {
        admission,
        enforcer,
        inference,
    } = stream;
    let worker = &session.worker;
    let protocol = event.first_part() == Some(RESERVED_PREFIX);
    if protocol {
        if let Err(refused) = admit(&event, admission) {
            worker.counters.received.fetch_add(1, Relaxed);
            worker.counters.drop(refused.reason());
            return refused.into_result(&event);
        }
        let decoded = event.to_event().map_err(|e| e.to_string())?;
        return protocol_event(session, &decoded);
    }
    worker.counters.received.fetch_add(1, Relaxed);
    if event.sequence > 0 {
        let followed = worker.counters.follow_sequence(event.sequence);
        if followed == Sequenced::Implausible {
            // Not confirmed either: a receipt through it would confirm what never arrived.
            worker.counters.drop(HubDrop::Invalid);
            return Err(format!(
                "sequence {} jumps more than {MAX_SEQUENCE_JUMP} past the last one received",
                event.sequence
            ));
        }
        session.receipts.received(event.sequence);
        if followed == Sequenced::Replay {
            worker.counters.drop(HubDrop::Duplicate);
            return Ok(());
        }
    }
    if let Err(refused) = admit(&event, admission) {
        worker.counters.drop(refused.reason());
        return refused.into_result(&event);
    }
    let rate = match enforcer.verdict(&event) {
        Ok(rate) => rate,
        Err(reason) => {
            worker.counters.drop(reason);
            return Ok(());
        }
    };
    hub.outputs().publish(
        &Delivery::local(&worker.id, &session.pool, &event, rate, received_ns)
            .with_worker_labels(&session.labels),
    );
    inference.record(&event, rate);
    worker.counters.delivered.fetch_add(1, Relaxed);
    if event.timestamp_ns > 0 {
        let age = elapsed_ns(event.timestamp_ns, received_ns);
        hub.ingest_latency().record(session.generation, age);
    }
    Ok(())
}

/// What the ingest loop keeps for the stream's life, beside its session.
struct StreamState {
    admission: Admission,
    enforcer: Enforcer,
    /// The stream's share of the per-model metrics, which it alone writes.
    inference: StreamRecorder,
}

/// Whether the event is well formed and within `[limits]`.
fn admit(event: &EventView, admission: &mut Admission) -> Result<(), Refused> {
    if let Some(problem) = event.problem() {
        return Err(Refused::Invalid(problem.to_owned()));
    }
    validate_event_tokens(event.parts()).map_err(|e| Refused::Invalid(e.to_string()))?;
    admission.check(event)
}

/// Why [`admit`] (or the [`Admission`] limits) refused an event.
enum Refused {
    Invalid(String),
    Size(String),
    Rate,
}

impl Refused {
    fn reason(&self) -> HubDrop {
        match self {
            Refused::Invalid(_) => HubDrop::Invalid,
            Refused::Size(_) => HubDrop::OverLimit,
            Refused::Rate => HubDrop::RateLimited,
        }
    }

    /// What the ingest loop logs (once per stream), if anything.
    fn into_result(self, event: &EventView) -> Result<(), String> {
        match self {
            Refused::Invalid(problem) => Err(problem),
            Refused::Size(what) => Err(format!("`{}`: {what}", event.name())),
            // Expected under a quota, and counted: not worth a warning.
            Refused::Rate => Ok(()),
        }
    }
}

/// Handles the reserved `bridge.*` names a worker may send.
fn protocol_event(session: &Session, event: &v1::TelemetryEvent) -> Result<(), String> {
    let worker = &session.worker;
    let int = |key: &str| match event.measurements.get(key).and_then(|v| v.value.as_ref()) {
        Some(Value::IntValue(v)) => u64::try_from(*v).ok(),
        _ => None,
    };
    if event.event_parts == CONTROL_APPLIED {
        let version = int(CONTROL_APPLIED_VERSION).ok_or_else(|| {
            format!(
                "{} needs an int measurement `{CONTROL_APPLIED_VERSION}`",
                CONTROL_APPLIED.join(".")
            )
        })?;
        let latency = worker.acknowledge(version);
        debug!(worker.id = %worker.id, control.version = version, ?latency, "control acknowledged");
        Ok(())
    } else if event.event_parts == WORKER_STATS {
        let counters = event
            .measurements
            .iter()
            .filter_map(|(k, v)| match v.value {
                Some(Value::IntValue(n)) => Some((k.clone(), u64::try_from(n).unwrap_or(0))),
                _ => None,
            })
            .collect();
        worker.details().reported = counters;
        Ok(())
    } else {
        worker.counters.received.fetch_add(1, Relaxed);
        worker.counters.drop(HubDrop::Invalid);
        Err(format!(
            "`{}`: event names starting with `{RESERVED_PREFIX}.` are reserved",
            event.event_parts.join(".")
        ))
    }
}

/// `[limits]` as one worker stream applies them: event shape (the rule workers apply too,
/// `bridge_proto::limits`), and a token bucket for the worker's event rate (bursts of up to
/// one second's worth).
struct Admission {
    limits: EventLimits,
    per_second: f64,
    bucket: Option<(f64, Instant)>,
}

impl Admission {
    fn new(config: &Config) -> Self {
        let per_second = f64::from(config.limits.worker_events_per_second);
        Self {
            limits: config.event_limits(),
            per_second,
            bucket: (per_second > 0.0).then(|| (per_second, Instant::now())),
        }
    }

    fn check(&mut self, event: &EventView) -> Result<(), Refused> {
        self.limits
            .check_shape(&event.shape())
            .map_err(|over| Refused::Size(over.to_string()))?;
        if let Some((tokens, refilled)) = &mut self.bucket {
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*refilled).as_secs_f64() * self.per_second)
                .min(self.per_second);
            *refilled = now;
            if *tokens < 1.0 {
                return Err(Refused::Rate);
            }
            *tokens -= 1.0;
        }
        Ok(())
    }
}

/// The worker's desired state as its ingest loop sees it.
struct Enforcer {
    desired: watch::Receiver<Arc<ControlState>>,
    state: Arc<ControlState>,
    /// Whether the worker applies `ControlState` itself (and so samples by its hash).
    acknowledges: bool,
    /// The rate a plain client was told to sample every event at: `state`'s ceiling.
    plain_rate: f64,
}

impl Enforcer {
    fn new(mut desired: watch::Receiver<Arc<ControlState>>, acknowledges: bool) -> Self {
        let state = desired.borrow_and_update().clone();
        let plain_rate = state.ceiling().get();
        Self {
            desired,
            state,
            acknowledges,
            plain_rate,
        }
    }

    /// How the worker sampled `event` before sending it. A plain client that does not say
    /// (the original design's has no field for it) is taken to have applied the rate it was
    /// last sent; during the round trip after a change it may still apply the one before.
    fn presampled(&self, event: &EventView) -> Presampled {
        if self.acknowledges {
            Presampled::new(event.sampling_rate, Draw::Consistent)
        } else if event.sampling_rate > 0.0 {
            Presampled::new(event.sampling_rate, Draw::Independent)
        } else {
            Presampled::new(self.plain_rate, Draw::Independent)
        }
    }

    /// The sampling rate to deliver the event with, or why it is dropped.
    fn verdict(&mut self, event: &EventView) -> Result<f64, HubDrop> {
        if self.desired.has_changed().unwrap_or(false) {
            self.state = self.desired.borrow_and_update().clone();
            self.plain_rate = self.state.ceiling().get();
        }
        let before = self.presampled(event);
        if event.control_version != 0 && event.control_version == self.state.version {
            // The worker decided it under the current state; it was kept at the rate it says.
            return Ok(before.rate());
        }
        match self
            .state
            .decide_presampled(|| event.parts(), event.sampling_key(), before)
        {
            Verdict::Keep(rate) => Ok(rate.get()),
            Verdict::Disabled => Err(HubDrop::Disabled),
            Verdict::Filtered => Err(HubDrop::Filtered),
            Verdict::SampledOut(_) => Err(HubDrop::SampledOut),
        }
    }
}

/// How long a receipt waits to cover more events, unless `Receipts::BATCH` are waiting: a
/// trickling worker then gets one receipt for several events instead of one write per event.
const RECEIPT_DELAY: Duration = Duration::from_secs(1);

/// The control messages for a worker: the hub's limits on one event (to clients that
/// acknowledge control), its full state now and after every change, and receipts for its
/// numbered events. A stream the worker closed gets a last receipt before it ends, so
/// a worker that drains and closes knows everything arrived.
pub fn controls(
    session: Session,
    acknowledges: bool,
    limits: EventLimits,
) -> impl Stream<Item = Result<v1::TelemetryControl, Status>> {
    let mut desired = session.worker.watch_desired();
    let receipt = |through_sequence| v1::TelemetryControl {
        control: Some(Control::Received(v1::ReceiptAck { through_sequence })),
    };
    stream! {
        // First, so that the worker knows them before it sends (or replays) anything. Plain
        // clients, which may not know the message, do without.
        if acknowledges {
            yield Ok(v1::TelemetryControl {
                control: Some(Control::Limits(limits.into())),
            });
        }
        let mut send_state = true;
        // When the receipts waiting now go out, unless `Receipts::BATCH` are waiting first. A
        // deadline rather than a sleep, so that a control change never waits behind it.
        let mut receipt_due: Option<tokio::time::Instant> = None;
        loop {
            if send_state {
                let state = desired.borrow_and_update().clone();
                session.worker.details().last_sent = Some((state.version, Instant::now()));
                for message in state.messages(acknowledges) {
                    yield Ok(message);
                }
            }
            send_state = false;
            let receipts_ready = async {
                let due = receipt_due.unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = session.receipts.urgent.notified() => {}
                }
            };
            tokio::select! {
                () = session.cancel.cancelled() => {
                    match session.ended_with() {
                        Some(status) => yield Err(status),
                        None => if let Some(through) = session.receipts.take() {
                            yield Ok(receipt(through));
                        },
                    }
                    break;
                }
                changed = desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    send_state = true;
                }
                () = session.receipts.notify.notified(), if receipt_due.is_none() => {
                    receipt_due = Some(tokio::time::Instant::now() + RECEIPT_DELAY);
                }
                () = receipts_ready, if receipt_due.is_some() => {
                    receipt_due = None;
                    if let Some(through) = session.receipts.take() {
                        yield Ok(receipt(through));
                    }
                }
            }
        }
    }
}
