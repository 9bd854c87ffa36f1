//! Hub configuration: built-in defaults < `config.toml` < command-line flags.
//!
//! The shipped `config.toml` documents every key; a test checks that it parses to exactly
//! the built-in defaults, so the file and the code cannot drift apart.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bridge_proto::limits::EventLimits;
use serde::Deserialize;

pub use crate::{
    control::config::{ControlConfig, LayerConfig},
    outputs::otlp::{ExportConfig, OtlpConfig},
};

/// The whole configuration file. `[worker]` belongs to the `worker` sidecar and is checked there.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hub: HubConfig,
    pub control: ControlConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    pub export: ExportConfig,
    pub metrics: MetricsConfig,
    pub worker: toml::Table,
}

/// `[metrics]`: what `/metrics` derives from events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Models with series of their own in each pool's inference metrics; events of models
    /// beyond them are counted under `model="other"`.
    pub max_models_per_pool: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_models_per_pool: 50,
        }
    }
}

impl MetricsConfig {
    /// Keeps a typo (an extra zero or three) from costing Prometheus millions of series.
    pub const MAX_MODELS_PER_POOL: usize = 10_000;
}

/// `[cluster]`: several hubs as one, through NATS. Off while `nats_url` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server(s), e.g. "nats://10.0.0.5:4222"; empty: this hub runs alone.
    pub nats_url: String,
    /// This hub's name in the cluster; empty: host name and gRPC port.
    pub node: String,
    /// First token of every subject the hubs use.
    pub subject_prefix: String,
    /// Copies JetStream keeps of the cluster's control state (1, or 3 or 5 on a NATS cluster).
    pub replicas: usize,
    /// How long, after sending a batch, the publisher gathers events before it sends the next
    /// (0: never waits; see `ClusterConfig::linger`).
    pub linger_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            node: String::new(),
            subject_prefix: "bridge".into(),
            replicas: 1,
            linger_ms: LINGER_MS,
        }
    }
}

/// The publisher's default linger: see `config.toml`, and BENCHMARKS.md, "Issue 19: a linger
/// for the cluster crossing".
const LINGER_MS: u64 = 1;

/// The longest linger accepted: a second is already a stall to anyone tailing the stream on
/// another hub.
const MAX_LINGER_MS: u64 = 1000;

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.nats_url.trim().is_empty()
    }

    /// How long the publisher gathers events after sending a batch: a hub that sent nothing
    /// for this long sends its next event at once, a busy one sends at most one batch per
    /// linger (or per full batch), so that NATS wakes up that much less often.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

/// `[auth]`: who may call what. No tokens: every caller may do everything (loopback only,
/// unless the hub is started with `--insecure`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
}

/// `[[auth.tokens]]`: one bearer token and its role. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it, for logs and errors (the token itself is never logged).
    pub name: String,
    pub role: Role,
    /// The token; or `token_file`, a file holding it (surrounding whitespace ignored).
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub token_file: PathBuf,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &"<redacted>")
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `StreamTelemetry` only.
    Worker,
    /// `Subscribe`, `ListWorkers` and `GetControl`.
    Reader,
    /// Everything.
    Admin,
}

/// `[tls]`: serve TLS when `cert` and `key` are set; require client certificates signed by
/// `client_ca` when it is set (mutual TLS; a worker's id must then be a name in its
/// certificate).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

/// `[limits]`: what one client may cost the hub.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Name tokens per event.
    pub max_event_parts: usize,
    /// Measurement plus metadata entries per event.
    pub max_event_entries: usize,
    /// Bytes in any name token, correlation id, map key or string value.
    pub max_string_bytes: usize,
    /// Open connections; new ones beyond it are closed at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Worker streams open at once, over all connections.
    pub max_worker_streams: usize,
    /// Subscriptions open at once.
    pub max_subscribers: usize,
    /// Events per second one worker may send (bursts of up to one second's worth); the excess
    /// is dropped and counted as `rate_limited`. 0: no limit.
    pub worker_events_per_second: u32,
    /// Time a new connection has to start talking (TLS handshake, or the HTTP/2 preface).
    pub handshake_timeout_ms: u64,
    /// Time an HTTP request head has to arrive whole, from its first byte.
    pub http_header_timeout_ms: u64,
    /// Time a keep-alive HTTP connection may stay silent between requests.
    pub http_idle_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_event_parts: EventLimits::DEFAULT.max_event_parts,
            max_event_entries: EventLimits::DEFAULT.max_event_entries,
            max_string_bytes: EventLimits::DEFAULT.max_string_bytes,
            max_connections: 50_000,
            max_streams_per_connection: 1024,
            max_worker_streams: 50_000,
            max_subscribers: 1024,
            worker_events_per_second: 0,
            handshake_timeout_ms: 10_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
        }
    }
}

impl LimitsConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// `[hub]`: where and how the hub serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Address the gRPC service listens on.
    pub listen: SocketAddr,
    /// Address of the HTTP port (/metrics, /healthz, /readyz, /api), or "off".
    pub http: String,
    /// Origins whose web pages may call the HTTP API (CORS); "*" for any.
    pub http_allowed_origins: Vec<String>,
    /// Host names the HTTP port answers to besides loopback ones, while no tokens are
    /// configured (DNS rebinding); "*" for any.
    pub http_allowed_hosts: Vec<String>,
    /// Directory for the control state file; empty means the platform's state directory.
    pub state_dir: PathBuf,
    /// Reject worker streams that do not name themselves with `x-worker-id`.
    pub require_worker_id: bool,
    /// Events buffered per subscriber before it is told it lagged.
    pub subscriber_queue: usize,
    /// Largest message accepted from any client, in bytes.
    pub max_message_bytes: usize,
    /// How long shutdown waits for streams to close before exiting anyway, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Disconnected workers remembered for `bridge workers` (oldest forgotten first).
    pub max_remembered_workers: usize,
    /// HTTP/2 flow-control window per stream, in bytes.
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection, in bytes.
    pub connection_window_bytes: u32,
    /// Interval of HTTP/2 keepalive pings, in seconds (0: off).
    pub keepalive_secs: u64,
    /// Threads that each own a share of the gRPC port's connections; 0: the connections share
    /// the runtime's threads, one per core.
    pub connection_threads: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http: "127.0.0.1:9464".into(),
            http_allowed_origins: Vec::new(),
            http_allowed_hosts: Vec::new(),
            state_dir: PathBuf::new(),
            require_worker_id: false,
            subscriber_queue: 8192,
            max_message_bytes: EventLimits::DEFAULT.max_message_bytes,
            shutdown_grace_ms: 5000,
            max_remembered_workers: 10_000,
            stream_window_bytes: 4 * 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            keepalive_secs: 20,
            connection_threads: 0,
        }
    }
}

/// More threads than any machine has cores is a typo, not a layout.
const MAX_CONNECTION_THREADS: usize = 1024;

/// A configuration that cannot be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    /// The limits on one event, as workers are told them (`TelemetryControl.limits`).
    pub fn event_limits(&self) -> EventLimits {
        EventLimits {
            max_message_bytes: self.hub.max_message_bytes,
            max_event_parts: self.limits.max_event_parts,
            max_event_entries: self.limits.max_event_entries,
            max_string_bytes: self.limits.max_string_bytes,
        }
    }

    /// Loads `path`, or the built-in defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks every value, returning the key and what is wrong with it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let hub = &self.hub;
        if let Err(message) = hub.http_address() {
            return Err(("hub.http".into(), message));
        }
        let cluster = &self.cluster;
        if cluster.enabled() {
            for url in cluster.nats_url.split(',').map(str::trim) {
                if let Err(error) = url.parse::<async_nats::ServerAddr>() {
                    return Err((
                        "cluster.nats_url".into(),
                        format!(
                            "`{url}` is not a NATS server address such as nats://10.0.0.5:4222: {error}"
                        ),
                    ));
                }
            }
        }
        if !(1..=5).contains(&cluster.replicas) {
            return Err((
                "cluster.replicas".into(),
                format!(
                    "{} is not a number of JetStream replicas: 1 to 5 (3 on a three-server NATS cluster)",
                    cluster.replicas
                ),
            ));
        }
        if cluster.linger_ms > MAX_LINGER_MS {
            return Err((
                "cluster.linger_ms".into(),
                format!(
                    "{} ms is longer than the {MAX_LINGER_MS} ms other hubs' subscribers can be kept waiting (0 to send at once)",
                    cluster.linger_ms
                ),
            ));
        }
        let prefix = &self.cluster.subject_prefix;
        if prefix.is_empty()
            || prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ', '\t']))
        {
            return Err((
                "cluster.subject_prefix".into(),
                format!("`{prefix}` is not a NATS subject prefix such as \"bridge\""),
            ));
        }
        for (i, origin) in hub.http_allowed_origins.iter().enumerate() {
            if let Err(message) = check_origin(origin) {
                return Err((format!("hub.http_allowed_origins[{i}]"), message));
            }
        }
        for (i, host) in hub.http_allowed_hosts.iter().enumerate() {
            if let Err(message) = check_host(host) {
                return Err((format!("hub.http_allowed_hosts[{i}]"), message));
            }
        }
        if hub.subscriber_queue == 0 {
            return Err(("hub.subscriber_queue".into(), "must be at least 1".into()));
        }
        if hub.max_message_bytes < 1024 {
            return Err((
                "hub.max_message_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if hub.stream_window_bytes < 65_535 || hub.connection_window_bytes < 65_535 {
            return Err((
                "hub.stream_window_bytes".into(),
                "HTTP/2 windows must be at least 65535 bytes".into(),
            ));
        }
        if hub.connection_threads > MAX_CONNECTION_THREADS {
            return Err((
                "hub.connection_threads".into(),
                format!("must be at most {MAX_CONNECTION_THREADS} (0: the shared runtime)"),
            ));
        }
        let limits = &self.limits;
        for (key, value) in [
            ("limits.max_event_parts", limits.max_event_parts),
            ("limits.max_event_entries", limits.max_event_entries),
            ("limits.max_string_bytes", limits.max_string_bytes),
            ("limits.max_worker_streams", limits.max_worker_streams),
            ("limits.max_subscribers", limits.max_subscribers),
            ("limits.max_connections", limits.max_connections),
            (
                "limits.max_streams_per_connection",
                limits.max_streams_per_connection as usize,
            ),
            (
                "limits.handshake_timeout_ms",
                usize::try_from(limits.handshake_timeout_ms).unwrap_or(usize::MAX),
            ),
            (
                "limits.http_header_timeout_ms",
                usize::try_from(limits.http_header_timeout_ms).unwrap_or(usize::MAX),
            ),
            (
                "limits.http_idle_timeout_ms",
                usize::try_from(limits.http_idle_timeout_ms).unwrap_or(usize::MAX),
            ),
        ] {
            if value == 0 {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        let models = self.metrics.max_models_per_pool;
        if !(1..=MetricsConfig::MAX_MODELS_PER_POOL).contains(&models) {
            return Err((
                "metrics.max_models_per_pool".into(),
                format!(
                    "{models} is not a number of models from 1 to {}",
                    MetricsConfig::MAX_MODELS_PER_POOL
                ),
            ));
        }
        let tls = &self.tls;
        if tls.cert.as_os_str().is_empty() != tls.key.as_os_str().is_empty() {
            return Err(("tls.cert".into(), "tls.cert and tls.key go together".into()));
        }
        if !tls.client_ca.as_os_str().is_empty() && !tls.enabled() {
            return Err((
                "tls.client_ca".into(),
                "client certificates need TLS: set tls.cert and tls.key too".into(),
            ));
        }
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if token.name.trim().is_empty() {
                return Err((format!("{key}.name"), "must not be empty".into()));
            }
            if let Some(first) = self.auth.tokens[..i]
                .iter()
                .position(|other| other.name.trim() == token.name.trim())
            {
                return Err((
                    format!("{key}.name"),
                    format!(
                        "`{}` is already the name of auth.tokens[{first}]; each token needs a name of its own (logs and errors name the holder by it)",
                        token.name.trim()
                    ),
                ));
            }
            if token.token.is_empty() == token.token_file.as_os_str().is_empty() {
                return Err((
                    key,
                    format!(
                        "`{}`: give exactly one of `token` and `token_file`",
                        token.name
                    ),
                ));
            }
        }
        crate::control::Configured::from_config(&self.control)
            .map_err(|invalid| (invalid.field, invalid.message))?;
        self.export.otlp.validate()?;
        Ok(())
    }
}

impl HubConfig {
    /// The state directory to use: the configured one, else `$XDG_STATE_HOME/telemetry-bridge`,
    /// else `~/.local/state/telemetry-bridge`, else `./bridge-state`.
    pub fn resolved_state_dir(&self) -> PathBuf {
        if !self.state_dir.as_os_str().is_empty() {
            return self.state_dir.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
            });
        base.map_or_else(
            || PathBuf::from("bridge-state"),
            |b| b.join("telemetry-bridge"),
        )
    }

    /// The HTTP port's address; `None` when it is off.
    pub fn http_address(&self) -> Result<Option<SocketAddr>, String> {
        match self.http.trim() {
            "off" | "" => Ok(None),
            address => address.parse().map(Some).map_err(|_| {
                format!("`{address}` is not an address such as 127.0.0.1:9464 (or `off`)")
            }),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// A host is a name or an address as a client writes it in a URL, without scheme or port.
fn check_host(host: &str) -> Result<(), String> {
    let bracketed_v6 = host.starts_with('[') && host.ends_with(']');
    let well_formed = host == "*"
        || (!host.is_empty()
            && !host.contains(['/', '?', '#', '@', ' ', '\t', '*'])
            && (bracketed_v6 || !host.contains(':')));
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a host name such as bridge.example.com or 10.0.0.5 (no scheme or port; \"*\" for any)"
        ))
    }
}

/// An origin is what a browser sends in `Origin`: `scheme://host[:port]`, nothing after.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let well_formed = origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "`{origin}` is not an origin such as https://grafana.example.com (or \"*\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn shipped_config_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.toml");
        let shipped = Config::load(Some(&path)).expect("shipped config.toml loads");
        assert_eq!(shipped.hub, HubConfig::default());
        assert_eq!(shipped.control, ControlConfig::default());
        assert_eq!(shipped.auth, AuthConfig::default());
        assert_eq!(shipped.tls, TlsConfig::default());
        assert_eq!(shipped.limits, LimitsConfig::default());
        assert_eq!(shipped.cluster, ClusterConfig::default());
        assert_eq!(shipped.metrics, MetricsConfig::default());
    }

    #[test]
    fn overrides_parse() {
        let config = parse(
            r#"
            [control]
            default_sampling_rate = 0.5
            rules = { "inference.*" = 0.1 }
            [control.pools.llama]
            sampling_rate = 0.25
            block = ["debug.>"]
            [control.workers."gpu-3"]
            enabled = false
            "#,
        )
        .unwrap();
        assert_eq!(config.control.default_sampling_rate, 0.5);
        assert_eq!(config.control.pools["llama"].sampling_rate, Some(0.25));
        assert_eq!(config.control.workers["gpu-3"].enabled, Some(false));
    }

    #[test]
    fn errors_name_the_key() {
        let err = parse("[control]\ndefault_sampling_rate = 1.5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`control.default_sampling_rate`"), "{err}");
        let err = parse("[control.pools.a]\nrules = { \"a..b\" = 0.5 }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control.pools.a.rules.\"a..b\""), "{err}");
        let err = parse("[hub]\nlisten_addr = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `listen_addr`"), "{err}");
        let err = parse("[control.workers.w]\nblock = [\"a.>.b\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control.workers.w.block[0]"), "{err}");
        for (text, key) in [
            ("[cluster]\nnats_url = \"::bad::\"", "`cluster.nats_url`"),
            (
                "[cluster]\nsubject_prefix = \"a.*\"",
                "`cluster.subject_prefix`",
            ),
            ("[cluster]\nreplicas = 0", "`cluster.replicas`"),
            ("[cluster]\nlinger_ms = 60000", "`cluster.linger_ms`"),
            (
                "[hub]\nconnection_threads = 5000",
                "`hub.connection_threads`",
            ),
            (
                "[metrics]\nmax_models_per_pool = 0",
                "`metrics.max_models_per_pool`",
            ),
            (
                "[metrics]\nmax_models_per_pool = 50000",
                "`metrics.max_models_per_pool`",
            ),
            (
                "[hub]\nhttp_allowed_origins = [\"example.com/x\"]",
                "http_allowed_origins[0]",
            ),
            (
                "[hub]\nhttp_allowed_hosts = [\"ok.example\", \"http://x.example:80\"]",
                "`hub.http_allowed_hosts[1]`",
            ),
            (
                "[limits]\nhttp_idle_timeout_ms = 0",
                "`limits.http_idle_timeout_ms`",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let cluster = parse("[cluster]\nnats_url = \"nats://a:4222, nats://b:4222\"").unwrap();
        assert!(cluster.cluster.enabled());
    }

    mod hostile {
        use proptest::prelude::*;

        use super::*;

        /// Configuration files an operator might get wrong: real sections and keys, values of
        /// any type, and stray keys.
        fn near_miss() -> impl Strategy<Value = String> {
            let section = prop_oneof![
                Just("hub"),
                Just("control"),
                Just("auth"),
                Just("tls"),
                Just("limits"),
                Just("cluster"),
                Just("metrics"),
                Just("control.pools.a"),
                Just("control.workers.\"gpu-1\""),
                Just("nope"),
            ];
            let key = prop_oneof![
                Just("listen"),
                Just("subscriber_queue"),
                Just("max_message_bytes"),
                Just("default_sampling_rate"),
                Just("rules"),
                Just("allow"),
                Just("block"),
                Just("sampling_rate"),
                Just("enabled"),
                Just("tokens"),
                Just("cert"),
                Just("client_ca"),
                Just("max_event_parts"),
                Just("nats_url"),
                Just("subject_prefix"),
                Just("handshake_timeout_ms"),
                Just("worker_events_per_second"),
                Just("max_models_per_pool"),
                Just("typo"),
            ];
            let value = prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                // TOML spells NaN `nan`.
                any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
                any::<bool>().prop_map(|b| b.to_string()),
                "[a-z0-9.:*>]{0,10}".prop_map(|s| format!("{s:?}")),
                prop::collection::vec("[a-z.*>]{0,6}", 0..3).prop_map(|v| format!("{v:?}")),
                ("[a-z.*>]{1,6}", any::<f64>()).prop_map(|(k, v)| format!("{{ {k:?} = {v:?} }}")),
                Just("[{ name = \"a\", role = \"root\" }]".to_owned()),
            ];
            prop::collection::vec((section, prop::collection::vec((key, value), 0..4)), 0..4)
                .prop_map(|sections| {
                    sections
                        .into_iter()
                        .map(|(section, keys)| {
                            let keys: Vec<String> = keys
                                .into_iter()
                                .map(|(k, v)| format!("{k} = {v}"))
                                .collect();
                            format!("[{section}]\n{}\n", keys.join("\n"))
                        })
                        .collect()
                })
        }

        proptest! {
            /// Never a panic; an error is one line naming the file.
            #[test]
            fn any_text_loads_or_says_why(text in "\\PC{0,200}") {
                if let Err(error) = parse(&text) {
                    let message = error.to_string();
                    prop_assert!(message.starts_with("test.toml"), "{}", message);
                }
            }

            #[test]
            fn near_miss_files_load_valid_or_say_which_key(text in near_miss()) {
                match parse(&text) {
                    Ok(config) => prop_assert!(config.validate().is_ok()),
                    Err(error) => {
                        let message = error.to_string();
                        prop_assert!(message.starts_with("test.toml"), "{}", message);
                        prop_assert!(!message.contains('\n'), "{}", message);
                    }
                }
            }
        }
    }
}
