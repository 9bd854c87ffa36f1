//! The OTLP export: the hub as an OpenTelemetry source, an output beside the subscribers.
//!
//! Events matching `[export.otlp] logs` become log records; every `X.stop` / `X.exception` with
//! a trace context becomes the span `X` (no pairing state: the end event carries the duration);
//! the per-model inference metrics are pushed as OTLP metrics (`metrics`).
//! Each signal has its own bounded queue of the deliveries the subscribers share (encoded once,
//! a reference count per record here) and one task that batches, converts and exports them, so a
//! slow or absent collector costs ingest one failed `try_send` per record, counted.

pub mod config;
mod convert;
mod logs;
mod metrics;
mod sender;

use std::sync::Arc;

use bridge_proto::{connect::ClientSecurity, pattern::Pattern, protocol::span};
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap},
    transport::Endpoint,
};

pub use self::{
    config::{ExportConfig, OtlpConfig},
    convert::{WorkerDescription, WorkerDirectory},
    sender::{Dropped, Signal, SignalStats},
};
use super::{Delivery, Origin, Output, inference_metrics::InferenceMetrics};

/// The export output; see the module documentation.
#[derive(Debug)]
pub struct OtlpExport {
    log_patterns: Vec<Pattern>,
    logs: Option<sender::Queue>,
    traces: Option<sender::Queue>,
    metrics: Option<Arc<SignalStats>>,
}

impl OtlpExport {
    /// Starts exporting to the configured collector (connecting lazily: a collector that is
    /// not there yet is retried like one that went away).
    pub fn start(
        config: &OtlpConfig,
        directory: Arc<dyn WorkerDirectory>,
        inference_metrics: InferenceMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let log_patterns = config
            .log_patterns()
            .map_err(|(key, e)| format!("{key}: {e}"))?;
        let endpoint = config.endpoint.trim();
        let security = ClientSecurity {
            token: None,
            ca: non_empty(&config.ca),
            cert: non_empty(&config.cert),
            key: non_empty(&config.key),
        };
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| format!("export.otlp.endpoint: {e}"))
            .and_then(|e| {
                security
                    .configure(e, endpoint)
                    .map_err(|e| format!("export.otlp: {e}"))
            })?
            .connect_lazy();
        let mut headers = MetadataMap::new();
        for (name, value) in &config.headers {
            let (Ok(name), Ok(value)) = (
                AsciiMetadataKey::from_bytes(name.as_bytes()),
                AsciiMetadataValue::try_from(value.as_str()),
            ) else {
                return Err(format!("export.otlp.headers: `{name}` cannot be sent"));
            };
            headers.insert(name, value);
        }
        let destination = sender::Destination {
            channel,
            endpoint: endpoint.to_owned(),
            headers,
            gzip: config.gzip,
            timeout: config.timeout(),
            batch_size: config.batch_size,
            batch_age: config.batch_age(),
        };
        let queue = |signal| {
            sender::start(
                signal,
                config.queue_size,
                destination.clone(),
                directory.clone(),
                shutdown.clone(),
            )
        };
        Ok(Self {
            logs: (!log_patterns.is_empty()).then(|| queue(Signal::Logs)),
            traces: config.traces.then(|| queue(Signal::Traces)),
            metrics: config.metrics.then(|| {
                sender::start_metrics(
                    config.metrics_interval(),
                    destination.clone(),
                    directory.clone(),
                    inference_metrics,
                    shutdown.clone(),
                )
            }),
            log_patterns,
        })
    }

    /// Whether the collector answered the last export of every signal (or none was tried).
    pub fn reachable(&self) -> bool {
        self.stats()
            .all(|(_, stats)| !stats.unreachable.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Each exporting signal's counts.
    pub fn stats(&self) -> impl Iterator<Item = (Signal, &SignalStats)> {
        let queues = [(Signal::Logs, &self.logs), (Signal::Traces, &self.traces)]
            .into_iter()
            .filter_map(|(signal, queue)| Some((signal, queue.as_ref()?.stats.as_ref())));
        queues.chain(
            self.metrics
                .as_deref()
                .map(|stats| (Signal::Metrics, stats)),
        )
    }
}

fn non_empty(path: &std::path::Path) -> Option<std::path::PathBuf> {
    (!path.as_os_str().is_empty()).then(|| path.to_owned())
}

impl Output for OtlpExport {
    /// Each hub exports its own workers' events (other hubs export theirs).
    #[inline]
    fn offer(&self, delivery: &Delivery<'_>) {
        if !matches!(delivery.origin, Origin::Local) {
            return;
        }
        if let Some(logs) = &self.logs
            && self
                .log_patterns
                .iter()
                .any(|p| p.matches_tokens(delivery.parts()))
        {
            logs.offer(delivery.encoded());
        }
        if let Some(traces) = &self.traces
            && !delivery.trace_id().is_empty()
            && delivery
                .parts()
                .last()
                .is_some_and(|last| last == span::STOP || last == span::EXCEPTION)
        {
            traces.offer(delivery.encoded());
        }
    }
}
