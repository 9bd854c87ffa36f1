//! `worker`: the telemetry-bridge sidecar.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use tokio_util::sync::CancellationToken;
use worker::{Link, config::WorkerConfig, simulate};

/// Streams telemetry to a telemetry-bridge hub and applies the hub's control.
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
    /// Emit simulated inference traffic at this many requests per second (two events each).
    #[arg(long, value_name = "REQUESTS_PER_SEC")]
    simulate: Option<f64>,
    /// Model name for simulated traffic.
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Log format on stderr.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: a label is key=value"))?;
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{key}`: label keys are letters, digits, '-' and '_'"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut config = WorkerConfig::load(args.config.as_deref())?;
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
    config
        .validate()
        .map_err(|(key, message)| format!("{key}: {message}"))?;
    if let Some(rate) = args.simulate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!(
            "--simulate {rate}: give a positive number of requests per second"
        ));
    }

    let options = config.link_options();
    tracing::info!(hub = %options.hub, worker.id = %options.id, worker.pool = %options.pool, "worker starting");
    let link = Link::start(options).map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    if let Some(rate) = args.simulate {
        tokio::spawn(simulate::run(
            link.emitter(),
            simulate::Simulation {
                model: args.model,
                requests_per_second: rate,
            },
            stop.clone(),
        ));
    }
    shutdown_signal().await;
    stop.cancel();
    let counters = link.close(Duration::from_secs(5)).await;
    tracing::info!(?counters, "worker stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
