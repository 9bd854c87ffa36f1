//! One signal's way to the collector: a bounded queue, batches by size and age, and export
//! requests retried with backoff while the collector is unavailable.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bridge_proto::encoded::{EncodedSubscribeResponse, PreEncoded};
use opentelemetry_proto::tonic::collector::{
    logs::v1::ExportLogsServiceResponse, metrics::v1::ExportMetricsServiceResponse,
    trace::v1::ExportTraceServiceResponse,
};
use prost::Message;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, codec::CompressionEncoding, metadata::MetadataMap, transport::Channel};
use tonic_types::StatusExt;
use tracing::{info, warn};

use super::{
    convert::{self, ByWorker, WorkerDirectory},
    logs,
};
use crate::outputs::inference_metrics::InferenceMetrics;

/// What is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Logs,
    Traces,
    Metrics,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
}

/// Why a record was not exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The queue was full (the collector is slower than the events, or away).
    QueueFull,
    /// The collector refused it (a partial success, or a request it will never accept).
    Rejected,
    /// A `.stop` or `.exception` without the span's ids or `duration_ns`.
    NotASpan,
    /// Still queued when the hub stopped.
    Shutdown,
    /// Metrics not exported before the next push (which carries their cumulative values).
    Superseded,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::QueueFull,
        Dropped::Rejected,
        Dropped::NotASpan,
        Dropped::Shutdown,
        Dropped::Superseded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Rejected => "rejected",
            Dropped::NotASpan => "not_a_span",
            Dropped::Shutdown => "shutdown",
            Dropped::Superseded => "superseded",
        }
    }
}

/// A signal's counts: offered = exported + dropped + pending, at every moment a scrape sees
/// them settle.
#[derive(Debug, Default)]
pub struct SignalStats {
    pub offered: AtomicU64,
    pub exported: AtomicU64,
    dropped: [AtomicU64; 5],
    /// Queued or in an export request.
    pub pending: AtomicU64,
    /// The last export found the collector unavailable.
    pub unreachable: AtomicBool,
}

impl SignalStats {
    pub fn dropped(&self, reason: Dropped) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }

    fn drop_n(&self, reason: Dropped, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Relaxed);
    }
}

/// The ingest side of a signal: never waits.
#[derive(Debug)]
pub struct Queue {
    sender: mpsc::Sender<EncodedSubscribeResponse>,
    pub stats: Arc<SignalStats>,
}

impl Queue {
    #[inline]
    pub fn offer(&self, delivery: &EncodedSubscribeResponse) {
        let stats = &self.stats;
        stats.offered.fetch_add(1, Relaxed);
        stats.pending.fetch_add(1, Relaxed);
        if self.sender.try_send(delivery.clone()).is_err() {
            stats.pending.fetch_sub(1, Relaxed);
            stats.drop_n(Dropped::QueueFull, 1);
        }
    }
}

/// How a sender talks to the collector.
#[derive(Debug, Clone)]
pub struct Destination {
    pub channel: Channel,
    pub endpoint: String,
    pub headers: MetadataMap,
    pub gzip: bool,
    pub timeout: Duration,
    pub batch_size: usize,
    pub batch_age: Duration,
}

/// Starts a signal's queue of `capacity` and the task that exports it until `shutdown`.
pub fn start(
    signal: Signal,
    capacity: usize,
    destination: Destination,
    directory: Arc<dyn WorkerDirectory>,
    shutdown: CancellationToken,
) -> Queue {
    let (sender, receiver) = mpsc::channel(capacity);
    let stats = Arc::new(SignalStats::default());
    let exporter = Arc::new(Exporter {
        signal,
        destination,
        directory,
        stats: stats.clone(),
        unreachable_since: Mutex::new(None),
    });
    tokio::spawn(exporter.run(receiver, shutdown));
    Queue { sender, stats }
}

/// Pushes the per-model metrics every `every` until `shutdown`; a push not done when the next
/// is due gives way to it (cumulative values lose nothing).
pub fn start_metrics(
    every: Duration,
    destination: Destination,
    directory: Arc<dyn WorkerDirectory>,
    metrics: InferenceMetrics,
    shutdown: CancellationToken,
) -> Arc<SignalStats> {
    let stats = Arc::new(SignalStats::default());
    let exporter = Arc::new(Exporter {
        signal: Signal::Metrics,
        destination,
        directory,
        stats: stats.clone(),
        unreachable_since: Mutex::new(None),
    });
    tokio::spawn(async move {
        let started = unix_nanos();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let (request, points) =
                super::metrics::request(&metrics.snapshot(), started, unix_nanos());
            if points == 0 {
                continue;
            }
            let stats = &exporter.stats;
            stats.offered.fetch_add(points, Relaxed);
            stats.pending.fetch_add(points, Relaxed);
            let next_due = shutdown.child_token();
            let timer = next_due.clone();
            tokio::spawn(async move {
                tokio::time::sleep(every).await;
                timer.cancel();
            });
            if !exporter
                .export((PreEncoded::new(&request), points), &next_due)
                .await
            {
                let reason = if shutdown.is_cancelled() {
                    Dropped::Shutdown
                } else {
                    Dropped::Superseded
                };
                stats.drop_n(reason, points);
            }
            stats.pending.fetch_sub(points, Relaxed);
        }
    });
    stats
}

fn unix_nanos() -> u64 {
    u64::try_from(crate::latency::unix_nanos(std::time::SystemTime::now())).unwrap_or(0)
}

struct Exporter {
    signal: Signal,
    destination: Destination,
    directory: Arc<dyn WorkerDirectory>,
    stats: Arc<SignalStats>,
    /// Set while the collector is away, to log its going and coming back once each.
    unreachable_since: Mutex<Option<Instant>>,
}

/// Export requests in flight at once per signal: while one waits for the collector the next is
/// built and sent, so a signal's throughput is not one round trip per batch.
const IN_FLIGHT: usize = 4;

/// Retries start here and double up to [`MAX_RETRY_DELAY`], unless the collector says when.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

impl Exporter {
    async fn run(
        self: Arc<Self>,
        mut receiver: mpsc::Receiver<EncodedSubscribeResponse>,
        shutdown: CancellationToken,
    ) {
        let size = self.destination.batch_size;
        let mut batch = Vec::with_capacity(size);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut in_flight = JoinSet::new();
        loop {
            tokio::select! {
                item = receiver.recv() => match item {
                    Some(item) => batch.push(item),
                    None => return,
                },
                () = shutdown.cancelled() => break,
            }
            let deadline = Instant::now() + self.destination.batch_age;
            while batch.len() < size {
                tokio::select! {
                    item = receiver.recv() => match item {
                        Some(item) => batch.push(item),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let count = batch.len() as u64;
            let request = self.request(&batch);
            batch.clear();
            let (exporter, shutdown) = (self.clone(), shutdown.clone());
            in_flight.spawn(async move {
                if !exporter.export(request, &shutdown).await {
                    exporter.stats.drop_n(Dropped::Shutdown, count);
                }
                exporter.stats.pending.fetch_sub(count, Relaxed);
                drop(slot);
            });
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
        // Stopping: one last try, without retries, for what is queued.
        receiver.close();
        while let Some(item) = receiver.recv().await {
            batch.push(item);
        }
        let no_retries = CancellationToken::new();
        no_retries.cancel();
        for chunk in batch.chunks(size) {
            let count = chunk.len() as u64;
            if !self.export(self.request(chunk), &no_retries).await {
                self.stats.drop_n(Dropped::Shutdown, count);
            }
            self.stats.pending.fetch_sub(count, Relaxed);
        }
    }

    /// Exports a request of `records`, retrying while the collector is unavailable; `false`
    /// when `shutdown` came first (the records are then not counted as exported or dropped
    /// here).
    async fn export(
        &self,
        (request, records): (PreEncoded, u64),
        shutdown: &CancellationToken,
    ) -> bool {
        if records == 0 {
            return true;
        }
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let outcome =
                tokio::time::timeout(self.destination.timeout, self.send(request.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(
                            "the collector did not answer in time",
                        ))
                    });
            match outcome {
                Ok(rejected) => {
                    let rejected = rejected.min(records);
                    self.stats.exported.fetch_add(records - rejected, Relaxed);
                    self.stats.drop_n(Dropped::Rejected, rejected);
                    self.stats.unreachable.store(false, Relaxed);
                    let back = self.unreachable().take();
                    if let Some(since) = back {
                        info!(signal = self.signal.name(), endpoint = %self.destination.endpoint, down_for = ?since.elapsed(), "otlp: the collector is back");
                    }
                    return true;
                }
                Err(status) if retryable(status.code()) => {
                    self.stats.unreachable.store(true, Relaxed);
                    let went_away = {
                        let mut since = self.unreachable();
                        let went_away = since.is_none();
                        since.get_or_insert_with(Instant::now);
                        went_away
                    };
                    if went_away {
                        warn!(signal = self.signal.name(), endpoint = %self.destination.endpoint, code = ?status.code(), message = status.message(), "otlp: the collector is unavailable; retrying while records queue");
                    }
                    let wait = status
                        .get_details_retry_info()
                        .and_then(|info| info.retry_delay)
                        .unwrap_or(delay);
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return false,
                    }
                }
                Err(status) => {
                    warn!(signal = self.signal.name(), endpoint = %self.destination.endpoint, code = ?status.code(), message = status.message(), records, "otlp: the collector refused an export; its records are dropped");
                    self.stats.drop_n(Dropped::Rejected, records);
                    return true;
                }
            }
        }
    }

    fn unreachable(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unreachable_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The export request for `batch`, encoded, and how many records it holds (the rest were
    /// counted as dropped).
    fn request(&self, batch: &[EncodedSubscribeResponse]) -> (PreEncoded, u64) {
        let directory = self.directory.as_ref();
        match self.signal {
            Signal::Logs => {
                let (request, count) = logs::request(batch, directory);
                self.stats
                    .drop_n(Dropped::Rejected, batch.len() as u64 - count);
                (request, count)
            }
            Signal::Traces => {
                let deliveries = batch
                    .iter()
                    .filter_map(|item| convert::Delivered::read(item.as_bytes()));
                let mut spans = ByWorker::default();
                let mut count = 0;
                for mut delivery in deliveries {
                    match convert::span(&delivery) {
                        Ok(span) => {
                            spans.push(&mut delivery, span);
                            count += 1;
                        }
                        Err(convert::NotASpan::Incomplete) => {}
                    }
                }
                self.stats
                    .drop_n(Dropped::NotASpan, batch.len() as u64 - count);
                (
                    PreEncoded::new(&convert::traces_request(spans, directory)),
                    count,
                )
            }
            // Pushed by `start_metrics`, never queued.
            Signal::Metrics => (PreEncoded::default(), 0),
        }
    }

    /// Sends one request; the number of records the collector rejected.
    async fn send(&self, request: PreEncoded) -> Result<u64, Status> {
        let destination = &self.destination;
        let mut grpc = tonic::client::Grpc::new(destination.channel.clone());
        if destination.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach the collector: {e}")))?;
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = destination.headers.clone();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(self.signal.path());
        let rejected = match self.signal {
            Signal::Logs => unary::<ExportLogsServiceResponse>(grpc, request, path)
                .await?
                .partial_success
                .map_or(0, |p| p.rejected_log_records),
            Signal::Traces => unary::<ExportTraceServiceResponse>(grpc, request, path)
                .await?
                .partial_success
                .map_or(0, |p| p.rejected_spans),
            Signal::Metrics => unary::<ExportMetricsServiceResponse>(grpc, request, path)
                .await?
                .partial_success
                .map_or(0, |p| p.rejected_data_points),
        };
        Ok(u64::try_from(rejected).unwrap_or(0))
    }
}

/// One export call, its response decoded as `R` (each signal's service answers its own type).
async fn unary<R: Message + Default + Send + 'static>(
    mut grpc: tonic::client::Grpc<Channel>,
    request: tonic::Request<PreEncoded>,
    path: tonic::codegen::http::uri::PathAndQuery,
) -> Result<R, Status> {
    let codec = tonic_prost::ProstCodec::<PreEncoded, R>::default();
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}

/// The codes OTLP says to retry (the collector is busy or away), as the OTLP specification
/// lists them for gRPC.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::OutOfRange
            | Code::DataLoss
    )
}
