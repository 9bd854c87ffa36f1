//! `[export.otlp]`: where and what the hub exports over OTLP/gRPC.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use bridge_proto::pattern::Pattern;
use serde::Deserialize;

/// `[export]`: the hub's ways out to the tools where history lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    pub otlp: OtlpConfig,
}

/// `[export.otlp]`. Off while `endpoint` is empty.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// OTLP/gRPC endpoint, e.g. "http://collector:4317" (https:// for TLS).
    pub endpoint: String,
    /// Request headers (an API key...); never logged.
    pub headers: BTreeMap<String, String>,
    /// Event patterns exported as log records.
    pub logs: Vec<String>,
    /// Finished spans (`X.stop` / `X.exception` with a span id) exported as OTLP spans.
    pub traces: bool,
    /// The per-model inference metrics pushed as OTLP metrics.
    pub metrics: bool,
    /// CA certificate (PEM) the collector's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Gzip request bodies.
    pub gzip: bool,
    /// Records per export request.
    pub batch_size: usize,
    /// How long a record may wait for its batch to fill.
    pub batch_age_ms: u64,
    /// Records waiting per signal; past it new ones are dropped and counted (up to five
    /// batches more are held in export requests).
    pub queue_size: usize,
    /// How long one export request may take before it is retried.
    pub timeout_ms: u64,
    /// How often the metrics are pushed.
    pub metrics_interval_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            headers: BTreeMap::new(),
            logs: Vec::new(),
            traces: true,
            metrics: true,
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            gzip: true,
            batch_size: 2048,
            batch_age_ms: 1000,
            queue_size: 65_536,
            timeout_ms: 10_000,
            metrics_interval_ms: 10_000,
        }
    }
}

/// Header values are secrets (API keys): `Debug` shows only their names.
impl std::fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("logs", &self.logs)
            .field("traces", &self.traces)
            .field("metrics", &self.metrics)
            .field("gzip", &self.gzip)
            .field("batch_size", &self.batch_size)
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

impl OtlpConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.trim().is_empty()
    }

    pub fn batch_age(&self) -> Duration {
        Duration::from_millis(self.batch_age_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn metrics_interval(&self) -> Duration {
        Duration::from_millis(self.metrics_interval_ms)
    }

    /// The `logs` patterns, parsed.
    pub fn log_patterns(&self) -> Result<Vec<Pattern>, (String, String)> {
        self.logs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::parse(p).map_err(|e| (format!("export.otlp.logs[{i}]"), e.to_string()))
            })
            .collect()
    }

    /// Checks every value, returning the key and what is wrong with it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.log_patterns()?;
        if !self.enabled() {
            return Ok(());
        }
        let endpoint = self.endpoint.trim();
        let valid_url = endpoint.parse::<tonic::transport::Uri>().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
        });
        if !valid_url {
            return Err((
                "export.otlp.endpoint".into(),
                format!("`{endpoint}` is not an OTLP/gRPC URL such as http://collector:4317"),
            ));
        }
        for name in self.headers.keys() {
            if tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()).is_err() {
                return Err((
                    "export.otlp.headers".into(),
                    format!("`{name}` is not a valid header name (lower-case ASCII)"),
                ));
            }
        }
        for (name, value) in &self.headers {
            if tonic::metadata::AsciiMetadataValue::try_from(value.as_str()).is_err() {
                return Err((
                    "export.otlp.headers".into(),
                    format!("the value of `{name}` is not printable ASCII"),
                ));
            }
        }
        if self.cert.as_os_str().is_empty() != self.key.as_os_str().is_empty() {
            return Err((
                "export.otlp.cert".into(),
                "export.otlp.cert and export.otlp.key go together".into(),
            ));
        }
        for (key, value) in [
            ("export.otlp.batch_size", self.batch_size as u64),
            ("export.otlp.batch_age_ms", self.batch_age_ms),
            ("export.otlp.queue_size", self.queue_size as u64),
            ("export.otlp.timeout_ms", self.timeout_ms),
            ("export.otlp.metrics_interval_ms", self.metrics_interval_ms),
        ] {
            if value == 0 {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        if self.batch_size > self.queue_size {
            return Err((
                "export.otlp.batch_size".into(),
                format!(
                    "{} is more than export.otlp.queue_size ({}): a batch could never fill",
                    self.batch_size, self.queue_size
                ),
            ));
        }
        Ok(())
    }
}
