//! One signal's way to the collector: a bounded queue, batches by size and age, and export
//! requests retried with backoff while the collector is unavailable.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bridge_proto::{
    encoded::{EncodedSubscribeResponse, PreEncoded},
    v1::{self, subscribe_response::Item},
};
use opentelemetry_proto::tonic::collector::{
    logs::v1::ExportLogsServiceResponse, trace::v1::ExportTraceServiceResponse,
};
use prost::Message;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, codec::CompressionEncoding, metadata::MetadataMap, transport::Channel};
use tonic_types::StatusExt;
use tracing::{info, warn};

use super::convert::{self, ByWorker, WorkerDirectory};

/// What is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Logs,
    Traces,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Traces => "traces",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
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
}

impl Dropped {
    pub const ALL: [Dropped; 4] = [
        Dropped::QueueFull,
        Dropped::Rejected,
        Dropped::NotASpan,
        Dropped::Shutdown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Rejected => "rejected",
            Dropped::NotASpan => "not_a_span",
            Dropped::Shutdown => "shutdown",
        }
    }
}

/// A signal's counts: offered = exported + dropped + pending, at every moment a scrape sees
/// them settle.
#[derive(Debug, Default)]
pub struct SignalStats {
    pub offered: AtomicU64,
    pub exported: AtomicU64,
    dropped: [AtomicU64; 4],
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
    let exporter = Exporter {
        signal,
        destination,
        directory,
        stats: stats.clone(),
        unreachable_since: None,
    };
    tokio::spawn(exporter.run(receiver, shutdown));
    Queue { sender, stats }
}

struct Exporter {
    signal: Signal,
    destination: Destination,
    directory: Arc<dyn WorkerDirectory>,
    stats: Arc<SignalStats>,
    /// Set while the collector is away, to log its going and coming back once each.
    unreachable_since: Option<Instant>,
}

/// Retries start here and double up to [`MAX_RETRY_DELAY`], unless the collector says when.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

impl Exporter {
    async fn run(
        mut self,
        mut receiver: mpsc::Receiver<EncodedSubscribeResponse>,
        shutdown: CancellationToken,
    ) {
        let size = self.destination.batch_size;
        let mut batch = Vec::with_capacity(size);
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
            let count = batch.len() as u64;
            if !self.export(&batch, &shutdown).await {
                self.stats.drop_n(Dropped::Shutdown, count);
            }
            self.stats.pending.fetch_sub(count, Relaxed);
            batch.clear();
        }
        // Stopping: one last try, without retries, for what is queued.
        receiver.close();
        while let Some(item) = receiver.recv().await {
            batch.push(item);
        }
        let no_retries = CancellationToken::new();
        no_retries.cancel();
        for chunk in batch.chunks(size) {
            let count = chunk.len() as u64;
            if !self.export(chunk, &no_retries).await {
                self.stats.drop_n(Dropped::Shutdown, count);
            }
            self.stats.pending.fetch_sub(count, Relaxed);
        }
    }

    /// Exports `batch`, retrying while the collector is unavailable; `false` when `shutdown`
    /// came first (the batch is then not counted as exported or dropped here).
    async fn export(
        &mut self,
        batch: &[EncodedSubscribeResponse],
        shutdown: &CancellationToken,
    ) -> bool {
        let (request, records) = self.request(batch);
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
                    if let Some(since) = self.unreachable_since.take() {
                        info!(signal = self.signal.name(), endpoint = %self.destination.endpoint, down_for = ?since.elapsed(), "otlp: the collector is back");
                    }
                    return true;
                }
                Err(status) if retryable(status.code()) => {
                    self.stats.unreachable.store(true, Relaxed);
                    if self.unreachable_since.is_none() {
                        self.unreachable_since = Some(Instant::now());
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

    /// The export request for `batch`, encoded, and how many records it holds (the rest were
    /// counted as dropped).
    fn request(&self, batch: &[EncodedSubscribeResponse]) -> (PreEncoded, u64) {
        let deliveries = batch.iter().filter_map(|item| {
            match v1::SubscribeResponse::decode(item.as_bytes().clone()) {
                Ok(v1::SubscribeResponse {
                    item: Some(Item::Event(delivery)),
                }) => Some(delivery),
                _ => None,
            }
        });
        let directory = self.directory.as_ref();
        match self.signal {
            Signal::Logs => {
                let mut records = ByWorker::default();
                let mut count = 0;
                for delivery in deliveries {
                    records.push(&delivery, convert::log_record(&delivery));
                    count += 1;
                }
                self.stats
                    .drop_n(Dropped::Rejected, batch.len() as u64 - count);
                (
                    PreEncoded::new(&convert::logs_request(records, directory)),
                    count,
                )
            }
            Signal::Traces => {
                let mut spans = ByWorker::default();
                let mut count = 0;
                for delivery in deliveries {
                    match convert::span(&delivery) {
                        Ok(span) => {
                            spans.push(&delivery, span);
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
            Signal::Logs => {
                let codec =
                    tonic_prost::ProstCodec::<PreEncoded, ExportLogsServiceResponse>::default();
                let response = grpc.unary(request, path, codec).await?.into_inner();
                response
                    .partial_success
                    .map_or(0, |p| p.rejected_log_records)
            }
            Signal::Traces => {
                let codec =
                    tonic_prost::ProstCodec::<PreEncoded, ExportTraceServiceResponse>::default();
                let response = grpc.unary(request, path, codec).await?.into_inner();
                response.partial_success.map_or(0, |p| p.rejected_spans)
            }
        };
        Ok(u64::try_from(rejected).unwrap_or(0))
    }
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
