//! The link from a worker to the hub: one `StreamTelemetry` stream, re-opened with backoff.
//!
//! Events leave the emitter's buffer in sequence order and stay there until the hub confirms
//! receipt (`TelemetryControl.received`); a new stream replays whatever the last one did not get
//! confirmed, so a hub restart loses nothing the buffer could hold. On the same stream the hub
//! sends the worker's control state; the link applies it and acknowledges the version in-band
//! (`bridge.control.applied`), ahead of buffered events so that a backlog does not delay it. The
//! emitter's counters travel the same way (`bridge.worker.stats`) when they changed.

use std::{sync::Arc, time::Duration};

use async_stream::stream;
use bridge_proto::{
    connect::{ClientSecurity, SecurityError, error_chain},
    control::{ControlState, parse_patterns},
    encoded::EncodedEvent,
    identity::{InvalidName, NameKind, check_label_key, check_label_value, check_name},
    limits::EventLimits,
    protocol::{DEFAULT_BUFFER_EVENTS, events, headers as header},
    sampling::Rate,
    v1::{self, telemetry_control::Control},
    worker_client::telemetry_bridge_client::TelemetryBridgeClient,
};
use prost::Message;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{
    Request,
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::{Channel, Endpoint},
};
use tracing::{debug, info, warn};

use crate::{
    backoff::Backoff,
    counters::Snapshot,
    emitter::{Emitter, Shared, now_ns},
};

/// Events handed to the transport per wake-up, so that acknowledgements interleave.
const SEND_BATCH: usize = 256;

/// How to reach the hub and who this worker is.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Hub URL, e.g. `http://127.0.0.1:50051`, or `unix:///run/bridge/worker.sock` for a
    /// sidecar's local endpoint.
    pub hub: String,
    /// Worker id; empty lets the hub generate one.
    pub id: String,
    pub pool: String,
    pub pid: u32,
    pub labels: Vec<(String, String)>,
    /// What GPUs this worker sees ("none" when it has none); empty: not reported.
    pub gpu: String,
    /// Events held until the hub confirms them (e.g. while it is away); when full, the oldest
    /// are dropped and counted.
    pub buffer_events: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    pub stats_interval: Duration,
    /// HTTP/2 ping interval, and how long a ping may go unanswered before the link is
    /// declared lost: the bound on noticing a hub that vanished without closing the connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long events that follow a send closely wait to travel together; zero sends each
    /// event as soon as it is emitted.
    pub linger: Duration,
    /// Token and TLS settings for reaching the hub.
    pub security: ClientSecurity,
}

impl LinkOptions {
    pub fn new(hub: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            hub: hub.into(),
            id: id.into(),
            pool: String::new(),
            pid: std::process::id(),
            labels: Vec::new(),
            gpu: String::new(),
            buffer_events: DEFAULT_BUFFER_EVENTS,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            stats_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            linger: Duration::from_millis(100),
            security: ClientSecurity::default(),
        }
    }
}

/// What the link is doing, for callers that want to wait for it or show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    /// Streaming; `applied` is the last control version applied on this stream.
    Connected {
        applied: Option<u64>,
    },
    /// Lost or refused; retrying after a backoff.
    Disconnected {
        error: String,
    },
    Closed,
}

/// Errors that stop a link from starting at all.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid hub address `{0}`: {1}")]
    InvalidHub(String, String),
    #[error("invalid worker identity: {0}")]
    InvalidIdentity(String),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// A running link and the emitter that feeds it.
#[derive(Debug)]
pub struct Link {
    emitter: Emitter,
    closing: CancellationToken,
    state: watch::Receiver<LinkState>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts linking to the hub on the current Tokio runtime. Fails only on options that can
    /// never work; an unreachable hub is retried for as long as the link lives.
    pub fn start(options: LinkOptions) -> Result<Self, LinkError> {
        let endpoint = endpoint(&options)?;
        let headers = headers(&options)?;
        let emitter = Emitter::detached(options.buffer_events);
        let closing = CancellationToken::new();
        let (state_tx, state) = watch::channel(LinkState::Connecting);
        let task = tokio::spawn(run(
            emitter.shared.clone(),
            endpoint,
            headers,
            options,
            closing.clone(),
            state_tx,
        ));
        Ok(Self {
            emitter,
            closing,
            state,
            task,
        })
    }

    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    /// Follows the link's state.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Sends what is buffered and waits for the hub to confirm it; gives up after `timeout`
    /// (what is still unconfirmed then is lost and shows as `buffered` in the counters).
    pub async fn close(self, timeout: Duration) -> Snapshot {
        self.closing.cancel();
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            warn!(
                ?timeout,
                unconfirmed = self.emitter.shared.buffer.unconfirmed(),
                "telemetry link did not drain in time; abandoning unconfirmed events"
            );
            task.abort();
        }
        self.emitter.counters()
    }
}

/// Checks everything [`Link::start`] checks (addresses, identity, credentials and their files)
/// without starting anything.
pub fn validate(options: &LinkOptions) -> Result<(), LinkError> {
    endpoint(options)?;
    headers(options)?;
    Ok(())
}

fn endpoint(options: &LinkOptions) -> Result<Endpoint, LinkError> {
    let invalid =
        |e: &dyn std::fmt::Display| LinkError::InvalidHub(options.hub.clone(), e.to_string());
    // `unix:///PATH` reaches a sidecar's local endpoint (`worker --local PATH`); tonic dials
    // the socket itself and sends a well-formed `:authority`, not the path.
    let unix = options.hub.starts_with("unix:");
    if unix
        && options
            .hub
            .trim_start_matches("unix:")
            .trim_start_matches("//")
            .is_empty()
    {
        return Err(invalid(&"a unix:// address needs a socket path"));
    }
    if !(unix || options.hub.starts_with("http://") || options.hub.starts_with("https://")) {
        return Err(invalid(
            &"it must start with http:// or https:// (or unix:// for a sidecar's socket)",
        ));
    }
    let endpoint = Endpoint::from_shared(options.hub.clone())
        .map_err(|e| invalid(&e))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024));
    Ok(options.security.configure(endpoint, &options.hub)?)
}

type Headers = Vec<(AsciiMetadataKey, AsciiMetadataValue)>;

fn headers(options: &LinkOptions) -> Result<Headers, LinkError> {
    let mut headers = Vec::new();
    let mut add = |key: String, value: &str| -> Result<(), LinkError> {
        if value.is_empty() {
            return Ok(());
        }
        let bad = |what: &str| LinkError::InvalidIdentity(format!("{key}: {what}"));
        let parsed_key = AsciiMetadataKey::from_bytes(key.as_bytes())
            .map_err(|_| bad("not a valid header name"))?;
        let parsed_value =
            AsciiMetadataValue::try_from(value).map_err(|_| bad("must be printable ASCII"))?;
        headers.push((parsed_key, parsed_value));
        Ok(())
    };
    // The hub's rule for names (`bridge_proto::identity`), checked here so that a name it would
    // refuse stops the link from starting instead of failing every reconnect.
    let invalid = |e: InvalidName| LinkError::InvalidIdentity(e.to_string());
    if !options.id.is_empty() {
        check_name(NameKind::WorkerId, &options.id).map_err(invalid)?;
    }
    if !options.pool.is_empty() {
        check_name(NameKind::Pool, &options.pool).map_err(invalid)?;
    }
    add(header::WORKER_ID.into(), &options.id)?;
    add(header::WORKER_POOL.into(), &options.pool)?;
    if options.pid != 0 {
        add(header::WORKER_PID.into(), &options.pid.to_string())?;
    }
    for (key, value) in &options.labels {
        let key = key.to_ascii_lowercase();
        check_label_key(&key).map_err(invalid)?;
        check_label_value(value).map_err(invalid)?;
        add(format!("{}{key}", header::WORKER_LABEL_PREFIX), value)?;
    }
    add(header::WORKER_GPU.into(), &options.gpu)?;
    let host = bridge_proto::connect::host_name();
    if AsciiMetadataValue::try_from(host.as_str()).is_ok() && !host.contains(char::is_whitespace) {
        add(header::WORKER_HOST.into(), &host)?;
    }
    // One run of this process: sequence numbers restart with it.
    add(
        header::WORKER_INSTANCE.into(),
        &format!("{:016x}", rand::random::<u64>()),
    )?;
    add(header::CONTROL_ACK.into(), header::CONTROL_ACK_YES)?;
    if let Some(authorization) = options.security.authorization()? {
        headers.push((
            AsciiMetadataKey::from_static("authorization"),
            authorization,
        ));
    }
    Ok(headers)
}

async fn run(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    headers: Headers,
    options: LinkOptions,
    closing: CancellationToken,
    state: watch::Sender<LinkState>,
) {
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    let mut failures = 0u32;
    loop {
        state.send_replace(LinkState::Connecting);
        let result = stream_once(
            &shared,
            &endpoint,
            &headers,
            &options,
            &closing,
            &state,
            &mut backoff,
        )
        .await;
        if closing.is_cancelled() && (result.is_ok() || shared.buffer.unconfirmed() == 0) {
            break;
        }
        // Replaced means another live stream uses this worker id: reconnecting at once would
        // only take it back and start a tug of war, so wait the longest delay.
        let replaced = matches!(&result, Err(status) if status.code() == tonic::Code::Aborted);
        let error = match result {
            Ok(()) => "the hub closed the stream".to_owned(),
            Err(status) => describe(&status),
        };
        failures += 1;
        if failures == 1 || failures.is_power_of_two() {
            warn!(hub = %options.hub, %error, attempts = failures, unconfirmed = shared.buffer.unconfirmed(), "telemetry link down; buffering and retrying with backoff");
        } else {
            debug!(hub = %options.hub, %error, "telemetry link still down");
        }
        if replaced {
            warn!(worker.id = %options.id, "another stream with this worker id replaced ours; is the id unique?");
        }
        state.send_replace(LinkState::Disconnected { error });
        let delay = if replaced {
            options.backoff_max
        } else {
            backoff.next_delay()
        };
        tokio::time::sleep(delay).await;
    }
    state.send_replace(LinkState::Closed);
}

fn describe(status: &tonic::Status) -> String {
    let text = format!("{}: {}", status.code(), status.message());
    match std::error::Error::source(status) {
        Some(cause) => format!("{text}: {}", error_chain(cause)),
        None => text,
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_once(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    headers: &Headers,
    options: &LinkOptions,
    closing: &CancellationToken,
    state: &watch::Sender<LinkState>,
    backoff: &mut Backoff,
) -> Result<(), tonic::Status> {
    let channel: Channel = endpoint.connect().await.map_err(|e| {
        tonic::Status::unavailable(format!(
            "cannot connect to {}: {}",
            options.hub,
            error_chain(&e)
        ))
    })?;
    let mut client =
        TelemetryBridgeClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
    let replay = shared.buffer.rewind();
    if replay > 0 {
        shared.counters.replayed(replay);
        info!(
            events = replay,
            "replaying events the hub has not confirmed"
        );
    }
    let (acks, ack_rx) = watch::channel(0u64);
    let (heard, heard_rx) = watch::channel(false);
    // Ends this stream's outbound half when the stream is over, so a transport that keeps the
    // old request body alive cannot keep sending from it.
    let over = CancellationToken::new();
    let _over_guard = over.clone().drop_guard();
    let mut request = Request::new(outbound(
        shared.clone(),
        heard_rx,
        ack_rx,
        options.stats_interval,
        options.linger,
        closing.clone(),
        over,
    ));
    for (key, value) in headers {
        request.metadata_mut().insert(key.clone(), value.clone());
    }
    let mut inbound = client.stream_telemetry(request).await?.into_inner();
    info!(hub = %options.hub, worker.id = %options.id, "telemetry link connected");
    state.send_replace(LinkState::Connected { applied: None });
    while let Some(control) = inbound.message().await? {
        backoff.reset();
        if let Some(Control::Received(receipt)) = &control.control {
            shared.buffer.confirm(receipt.through_sequence);
            shared.buffer.confirmed.notify_one();
            continue;
        }
        let version = apply(shared, control);
        heard.send_replace(true);
        if let Some(version) = version {
            acks.send_replace(version);
            state.send_replace(LinkState::Connected {
                applied: Some(version),
            });
        }
    }
    Ok(())
}

/// Acknowledgements, buffered events and counter reports, in that priority, once the hub's
/// first message arrived. When closing, it sends everything still unsent and a last report,
/// then ends the stream.
///
/// Events that arrive soon after a flush wait until `linger` has passed since it, so that a
/// worker emitting steadily sends several events per write instead of one write per event
/// (each write costs the hub a wake-up and a system call). A backlog goes out at once, and so
/// does an event after a quiet spell.
fn outbound(
    shared: Arc<Shared>,
    mut heard: watch::Receiver<bool>,
    mut acks: watch::Receiver<u64>,
    stats_interval: Duration,
    linger: Duration,
    closing: CancellationToken,
    over: CancellationToken,
) -> impl tokio_stream::Stream<Item = EncodedEvent> {
    stream! {
        let mut stats = tokio::time::interval(stats_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Option<Snapshot> = None;
        let mut last_flush: Option<Instant> = None;
        let mut flush_at: Option<Instant> = None;
        // A report waiting to travel with the next events rather than in a write of its own.
        let mut report_due = false;
        // Nothing goes out before the hub's first message, which carries its limits (a hub
        // that has none sends its control state first): a replay sent before them could hold
        // an event the hub refuses.
        let heard_first = tokio::select! {
            () = over.cancelled() => false,
            heard = heard.wait_for(|heard| *heard) => heard.is_ok(),
        };
        loop {
            if !heard_first {
                break;
            }
            if flush_at.is_none_or(|at| at <= Instant::now()) {
                flush_at = None;
                let batch = take_batch(&shared);
                if !batch.is_empty() {
                    let full = batch.len() == SEND_BATCH;
                    shared.counters.sent(batch.len());
                    for event in batch {
                        yield event;
                    }
                    last_flush = Some(Instant::now());
                    if full {
                        // More may be waiting, with no wake-up left to say so.
                        continue;
                    }
                    if std::mem::take(&mut report_due) {
                        let now = shared.counters();
                        reported = Some(now);
                        yield stats_event(&now);
                    }
                }
            }
            let linger_over = tokio::time::sleep_until(
                flush_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                biased;
                () = over.cancelled() => break,
                changed = acks.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let version = *acks.borrow_and_update();
                    yield protocol_event(&events::CONTROL_APPLIED, &[(events::CONTROL_APPLIED_VERSION, version)]);
                }
                () = closing.cancelled() => {
                    loop {
                        let batch = take_batch(&shared);
                        if batch.is_empty() {
                            break;
                        }
                        shared.counters.sent(batch.len());
                        for event in batch {
                            yield event;
                        }
                    }
                    // The last report should say what the hub confirmed, so wait for it.
                    while shared.buffer.unconfirmed() > 0 {
                        tokio::select! {
                            () = over.cancelled() => break,
                            () = shared.buffer.confirmed.notified() => {}
                        }
                    }
                    yield stats_event(&shared.counters());
                    break;
                }
                _ = stats.tick() => {
                    let now = shared.counters();
                    if reported != Some(now) {
                        if flush_at.is_some() {
                            report_due = true;
                        } else {
                            reported = Some(now);
                            yield stats_event(&now);
                        }
                    }
                }
                () = linger_over, if flush_at.is_some() => {}
                // A push while this loop was busy left a permit, so nothing is missed.
                () = shared.buffer.ready.notified(), if flush_at.is_none() => {
                    if let Some(last) = last_flush
                        && last.elapsed() < linger
                    {
                        flush_at = Some(last + linger);
                    }
                }
            }
        }
    }
}

/// The next events to send. Events buffered before the worker knew the hub's message limit
/// and over it are dropped and counted instead: the hub would end the stream on each, and the
/// next stream would replay it again.
fn take_batch(shared: &Shared) -> Vec<EncodedEvent> {
    let limit = shared.limits().max_message_bytes;
    let (batch, dropped) = shared.buffer.take_unsent_within(SEND_BATCH, limit);
    if dropped > 0 {
        warn!(
            events = dropped,
            max_message_bytes = limit,
            "dropped buffered events larger than the hub accepts (counted as dropped.over_limit)"
        );
    }
    batch
}

fn stats_event(snapshot: &Snapshot) -> EncodedEvent {
    protocol_event(&events::WORKER_STATS, &snapshot.measurements())
}

/// A protocol event; these carry no sequence number, since they are never replayed.
fn protocol_event(name: &[&str], measurements: &[(&str, u64)]) -> EncodedEvent {
    let event = v1::TelemetryEvent {
        event_parts: name.iter().map(|s| (*s).to_owned()).collect(),
        measurements: measurements
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    v1::TelemetryValue {
                        value: Some(v1::telemetry_value::Value::IntValue(
                            i64::try_from(*v).unwrap_or(i64::MAX),
                        )),
                    },
                )
            })
            .collect(),
        timestamp_ns: now_ns(),
        ..Default::default()
    };
    EncodedEvent::from_bytes(event.encode_to_vec().into())
}

/// Applies a control message; returns the version to acknowledge, if it carried one.
fn apply(shared: &Shared, control: v1::TelemetryControl) -> Option<u64> {
    let current = shared.control.load_full();
    let rebuilt = |enabled: bool, rate: Rate, rules, allow, block| {
        ControlState::new(current.version, enabled, rate, rules, allow, block)
    };
    match control.control? {
        Control::Received(_) => None,
        Control::Limits(limits) => {
            let limits = EventLimits::from(&limits);
            debug!(?limits, "applying the hub's limits");
            shared.apply_limits(limits);
            None
        }
        Control::State(state) => match ControlState::try_from(state) {
            Ok(state) => {
                let version = state.version;
                debug!(control.version = version, "applying control state");
                shared.apply(state);
                Some(version)
            }
            Err(error) => {
                warn!(%error, "ignoring a control state the hub sent: it is invalid");
                None
            }
        },
        // The original design's messages, from hubs that do not send `state`.
        Control::Toggle(toggle) => {
            shared.apply(rebuilt(
                toggle.enabled,
                current.default_rate,
                current.rules().to_vec(),
                current.allow.clone(),
                current.block.clone(),
            ));
            None
        }
        Control::Sampling(update) => {
            let Ok(rate) = Rate::new(update.sampling_rate) else {
                warn!(
                    rate = update.sampling_rate,
                    "ignoring an invalid sampling rate from the hub"
                );
                return None;
            };
            let Ok(patterns) = parse_patterns("event_patterns", &update.event_patterns) else {
                warn!("ignoring a sampling update with invalid patterns from the hub");
                return None;
            };
            let mut rules = current.rules().to_vec();
            let default_rate = if patterns.is_empty() {
                rate
            } else {
                rules.retain(|rule| !patterns.contains(&rule.pattern));
                rules.extend(
                    patterns
                        .into_iter()
                        .map(|pattern| bridge_proto::control::SamplingRule { pattern, rate }),
                );
                current.default_rate
            };
            shared.apply(rebuilt(
                current.enabled,
                default_rate,
                rules,
                current.allow.clone(),
                current.block.clone(),
            ));
            None
        }
        Control::Filter(filter) => {
            let allow = parse_patterns("allowed_events", &filter.allowed_events);
            let block = parse_patterns("blocked_events", &filter.blocked_events);
            match (allow, block) {
                (Ok(allow), Ok(block)) => shared.apply(rebuilt(
                    current.enabled,
                    current.default_rate,
                    current.rules().to_vec(),
                    allow,
                    block,
                )),
                (Err(error), _) | (_, Err(error)) => {
                    warn!(%error, "ignoring an invalid filter from the hub");
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name the hub would refuse stops the link from starting, with the rule in the message,
    /// rather than failing every reconnect.
    #[test]
    fn names_the_hub_refuses_stop_the_link_from_starting() {
        let options = |change: &dyn Fn(&mut LinkOptions)| {
            let mut options = LinkOptions::new("http://127.0.0.1:1", "gpu-3");
            change(&mut options);
            validate(&options)
        };
        assert!(options(&|_| {}).is_ok());
        assert!(options(&|o| o.id.clear()).is_ok(), "the hub names it");
        assert!(options(&|o| o.labels = vec![("Zone".into(), "us east".into())]).is_ok());
        for (change, expected) in [
            (
                &(|o: &mut LinkOptions| o.id = "../../etc/passwd".into()) as &dyn Fn(&mut _),
                "worker id",
            ),
            (&|o: &mut LinkOptions| o.id = " ".into(), "worker id"),
            (&|o: &mut LinkOptions| o.pool = "a\"b".into(), "pool name"),
            (
                &|o: &mut LinkOptions| o.labels = vec![("a.b".into(), "v".into())],
                "label key",
            ),
            (
                &|o: &mut LinkOptions| o.labels = vec![("k".into(), "v".repeat(300))],
                "label value",
            ),
        ] {
            let error = options(change).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
