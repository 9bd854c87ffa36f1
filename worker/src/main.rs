//! `worker`: the telemetry-bridge sidecar.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use bridge_proto::{
    connect::ClientSecurity,
    identity::{check_label_key, check_label_value},
};
use clap::Parser;
use worker::{
    config::WorkerConfig,
    local::LocalAddress,
    sidecar::{self, SidecarOptions},
    simulate,
};

/// Relays an app's telemetry to a telemetry-bridge hub, with GPU metrics, and applies the hub's
/// control.
///
/// Run an app: `worker --hub http://hub:50051 --id gpu-3 --pool llama -- python serve.py`.
/// Its stdout and stderr pass through; stderr lines `TELEMETRY:{json}` become events.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
struct Args {
    /// Configuration file; its [worker] section is used.
    #[arg(long, env = "BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Hub URL [default: http://127.0.0.1:50051].
    #[arg(long, env = "BRIDGE_HUB")]
    hub: Option<String>,
    /// Worker id [default: the host name].
    #[arg(long, env = "BRIDGE_WORKER_ID")]
    id: Option<String>,
    /// Pool the worker belongs to, e.g. the model it serves.
    #[arg(long)]
    pool: Option<String>,
    /// Label sent to the hub, as key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Events kept until the hub confirms them; when full the oldest are dropped and counted.
    #[arg(long, value_name = "N")]
    buffer_events: Option<usize>,
    /// Interval of GPU and app metrics, e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    gpu_interval: Option<Duration>,
    /// Local endpoint for apps' own gRPC clients: 127.0.0.1:PORT or a unix socket path.
    #[arg(long, value_name = "ADDR")]
    local: Option<String>,
    /// How long to wait for the hub to confirm buffered events when exiting.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// How long the app has to exit after a forwarded SIGTERM or SIGINT before it is killed
    /// (SIGKILL); a second signal kills it at once.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// Without an app: emit simulated inference traffic at this many requests per second.
    #[arg(long, value_name = "REQUESTS_PER_SEC", conflicts_with = "command")]
    simulate: Option<f64>,
    /// Model name for simulated traffic.
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Report this many fake GPUs instead of asking NVML (for tests and demos).
    #[arg(long, hide = true)]
    fake_gpus: Option<u32>,
    /// Log format on stderr.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(flatten)]
    security: ClientSecurity,
    /// The app to run, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `KEY=VALUE`, both held to the hub's rule for labels (`bridge_proto::identity`); the key is
/// sent in lower case.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: a label is key=value"))?;
    let key = key.to_ascii_lowercase();
    check_label_key(&key).map_err(|e| e.to_string())?;
    check_label_value(value).map_err(|e| e.to_string())?;
    Ok((key, value.to_owned()))
}

fn main() -> ExitCode {
    if let Some(code) = worker::launcher::run_if_launcher() {
        return code;
    }
    let args = Args::parse();
    // Wrapping an app, the sidecar keeps its stderr for the app and says only what is wrong.
    init_logging(
        &args.log_format,
        if args.command.is_empty() {
            "info"
        } else {
            "warn"
        },
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, message }) => {
            eprintln!("worker: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

async fn run(args: Args) -> Result<u8, Failure> {
    let mut config = WorkerConfig::load(args.config.as_deref()).map_err(usage)?;
    if let Some(hub) = args.hub {
        config.hub = hub;
    }
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(pool) = args.pool {
        config.pool = pool;
    }
    config.labels.extend(args.labels);
    if let Some(events) = args.buffer_events {
        config.buffer_events = events;
    }
    if let Some(interval) = args.gpu_interval {
        config.gpu_interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    }
    if let Some(local) = args.local {
        config.local = local;
    }
    config
        .validate()
        .map_err(|(key, message)| usage(format!("{key}: {message}")))?;
    let local = if config.local.is_empty() {
        None
    } else {
        Some(
            config
                .local
                .parse::<LocalAddress>()
                .map_err(|e| usage(format!("--local: {e}")))?,
        )
    };
    if let Some(rate) = args.simulate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(usage(format!(
            "--simulate {rate}: give a positive number of requests per second"
        )));
    }

    let mut link = config.link_options();
    // Read now, so that a missing certificate is a usage error and not a retry loop.
    link.security = args.security;
    worker::link::validate(&link).map_err(|e| usage(e.to_string()))?;
    let options = SidecarOptions {
        link,
        command: args.command,
        metrics_interval: Duration::from_millis(config.gpu_interval_ms),
        local,
        fake_gpus: args.fake_gpus,
        drain_timeout: args.drain_timeout,
        simulate: args.simulate.map(|rate| simulate::Simulation {
            model: args.model,
            requests_per_second: rate,
        }),
        max_line_bytes: config.max_line_bytes,
        kill_grace: args.kill_grace,
    };
    tracing::info!(hub = %options.link.hub, worker.id = %options.link.id, worker.pool = %options.link.pool, "worker starting");
    sidecar::run(options).await.map_err(|message| Failure {
        // A command that cannot be started is the shell's 127.
        code: if message.starts_with("cannot run") {
            127
        } else {
            1
        },
        message,
    })
}

fn init_logging(format: &str, default_level: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour only for a person at a terminal: a log file or collector gets plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
