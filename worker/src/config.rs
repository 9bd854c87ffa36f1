//! The `[worker]` section of `config.toml`: built-in defaults < file < environment < flags.

use std::{collections::BTreeMap, path::Path, time::Duration};

use bridge_proto::{
    connect::host_name,
    identity::{NameKind, check_label_key, check_label_value, check_name},
    protocol::DEFAULT_BUFFER_EVENTS,
};
use serde::Deserialize;

use crate::link::LinkOptions;

/// The configuration file as the sidecar reads it; the other sections belong to the hub.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct File {
    worker: WorkerConfig,
    hub: toml::Table,
    control: toml::Table,
    auth: toml::Table,
    tls: toml::Table,
    limits: toml::Table,
    cluster: toml::Table,
    export: toml::Table,
    metrics: toml::Table,
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub hub: String,
    /// Empty: the host name.
    pub id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    /// Events held until the hub confirms them.
    pub buffer_events: usize,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub stats_interval_ms: u64,
    /// HTTP/2 keepalive ping interval, and how long a ping may go unanswered.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// How long events that closely follow a send wait to travel with the next ones.
    pub linger_ms: u64,
    /// GPU and app process metrics interval.
    pub gpu_interval_ms: u64,
    /// Local endpoint for apps' own gRPC clients: `127.0.0.1:PORT`, a unix socket path, or empty.
    pub local: String,
    /// The most of one stderr line of the app the sidecar holds; the rest of a longer line is
    /// passed through as it comes, so an app that never ends a line cannot grow the sidecar.
    pub max_line_bytes: usize,
}

/// Bounds of `max_line_bytes`: room for a real `TELEMETRY:` line, and well short of what would
/// make the cap pointless.
const MAX_LINE_BYTES: std::ops::RangeInclusive<usize> = 1024..=(1 << 30);

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            hub: "http://127.0.0.1:50051".into(),
            id: String::new(),
            pool: String::new(),
            labels: BTreeMap::new(),
            buffer_events: DEFAULT_BUFFER_EVENTS,
            backoff_initial_ms: 100,
            backoff_max_ms: 5000,
            stats_interval_ms: 1000,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 5000,
            linger_ms: 100,
            gpu_interval_ms: 10_000,
            local: String::new(),
            max_line_bytes: 1 << 20,
        }
    }
}

impl WorkerConfig {
    /// Loads `[worker]` from `path`, or the defaults without one. Errors name the file and key.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: File = toml::from_str(&text).map_err(|e| {
            format!(
                "{}: {}",
                path.display(),
                e.to_string().trim_end().replace('\n', " ")
            )
        })?;
        let config = file.worker;
        config
            .validate()
            .map_err(|(key, message)| format!("{}: `worker.{key}`: {message}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.hub.starts_with("http://") || self.hub.starts_with("https://")) {
            return Err((
                "hub",
                format!("`{}` must start with http:// or https://", self.hub),
            ));
        }
        if self.keepalive_interval_ms < 100 || self.keepalive_timeout_ms < 100 {
            return Err((
                "keepalive_interval_ms",
                "keepalive interval and timeout must be at least 100 ms".into(),
            ));
        }
        if self.buffer_events == 0 {
            return Err(("buffer_events", "must be at least 1".into()));
        }
        if self.gpu_interval_ms < 100 {
            return Err(("gpu_interval_ms", "must be at least 100".into()));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err((
                "backoff_max_ms",
                "backoff delays must be positive, with the cap at least the first delay".into(),
            ));
        }
        if self.stats_interval_ms == 0 {
            return Err(("stats_interval_ms", "must be positive".into()));
        }
        if !self.id.is_empty() {
            check_name(NameKind::WorkerId, &self.id).map_err(|e| ("id", e.to_string()))?;
        }
        if !self.pool.is_empty() {
            check_name(NameKind::Pool, &self.pool).map_err(|e| ("pool", e.to_string()))?;
        }
        for (key, value) in &self.labels {
            check_label_key(&key.to_ascii_lowercase())
                .and_then(|()| check_label_value(value))
                .map_err(|e| ("labels", e.to_string()))?;
        }
        if !MAX_LINE_BYTES.contains(&self.max_line_bytes) {
            return Err((
                "max_line_bytes",
                format!(
                    "{} is out of range: from {} to {} bytes",
                    self.max_line_bytes,
                    MAX_LINE_BYTES.start(),
                    MAX_LINE_BYTES.end()
                ),
            ));
        }
        Ok(())
    }

    /// Link options for this configuration; an empty id becomes the host name.
    pub fn link_options(&self) -> LinkOptions {
        let id = if self.id.is_empty() {
            host_name()
        } else {
            self.id.clone()
        };
        let mut options = LinkOptions::new(self.hub.clone(), id);
        options.pool.clone_from(&self.pool);
        options.labels = self.labels.clone().into_iter().collect();
        options.buffer_events = self.buffer_events;
        options.backoff_initial = Duration::from_millis(self.backoff_initial_ms);
        options.backoff_max = Duration::from_millis(self.backoff_max_ms);
        options.stats_interval = Duration::from_millis(self.stats_interval_ms);
        options.keepalive_interval = Duration::from_millis(self.keepalive_interval_ms);
        options.keepalive_timeout = Duration::from_millis(self.keepalive_timeout_ms);
        options.linger = Duration::from_millis(self.linger_ms);
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.toml");
        assert_eq!(
            WorkerConfig::load(Some(&path)).unwrap(),
            WorkerConfig::default()
        );
    }

    #[test]
    fn errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("worker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[worker]\nhub = \"localhost:50051\"\n").unwrap();
        let err = WorkerConfig::load(Some(&path)).unwrap_err();
        assert!(
            err.contains("`worker.hub`") && err.contains("http://"),
            "{err}"
        );
        std::fs::write(&path, "[worker]\nqueue = 5\n").unwrap();
        let err = WorkerConfig::load(Some(&path)).unwrap_err();
        assert!(err.contains("unknown field `queue`"), "{err}");
        for (bad, key) in [
            ("id = \"../../etc/passwd\"", "`worker.id`"),
            ("pool = \" \"", "`worker.pool`"),
            ("labels = { \"z/one\" = \"b\" }", "`worker.labels`"),
        ] {
            std::fs::write(&path, format!("[worker]\n{bad}\n")).unwrap();
            let err = WorkerConfig::load(Some(&path)).unwrap_err();
            assert!(err.contains(key) && err.contains("not allowed"), "{err}");
        }
        for bad in [0, 1023, (1 << 30) + 1] {
            std::fs::write(&path, format!("[worker]\nmax_line_bytes = {bad}\n")).unwrap();
            let err = WorkerConfig::load(Some(&path)).unwrap_err();
            assert!(
                err.contains("`worker.max_line_bytes`") && err.contains("out of range"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
