//! The `bridge` command line: one module per subcommand.
//!
//! Every failure prints one readable line on stderr and exits with a code scripts can test:
//! 1 other failure, 2 invalid input (also clap's usage errors), 3 hub unreachable,
//! 4 unknown worker, 5 not acknowledged in time, 6 not authenticated (missing or wrong token),
//! 7 not permitted (the token's role does not allow it), 8 a hub limit was reached.

mod control;
mod demo;
use bridge::render;
mod serve;
mod subscribe;
mod top;
mod workers;

use std::{process::ExitCode, time::Duration};

use bridge::client::{ClientError, HubClient};
use bridge_proto::connect::ClientSecurity;
use clap::{Parser, Subcommand};

/// Live telemetry from ML workers, and control back to them.
#[derive(Debug, Parser)]
#[command(name = "bridge", version, about, propagate_version = true)]
struct Cli {
    /// Hub to talk to.
    #[arg(
        long,
        global = true,
        env = "BRIDGE_HUB",
        default_value = "http://127.0.0.1:50051"
    )]
    hub: String,
    /// Log format for diagnostics on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    security: ClientSecurity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub.
    Serve(serve::Args),
    /// Tail live events, filtered on the hub.
    Subscribe(subscribe::Args),
    /// List workers with their rates, drops and control state.
    Workers(workers::Args),
    /// A live view of the workers and the models they serve; change a worker's sampling or
    /// toggle it from the keyboard.
    Top(top::Args),
    /// Set the sampling rate of a worker, a pool, or all workers.
    Sample(control::SampleArgs),
    /// Turn telemetry on or off for a worker, a pool, or all workers.
    Toggle(control::ToggleArgs),
    /// Set allow/block filters of a worker, a pool, or all workers.
    Filter(control::FilterArgs),
    /// Forget the runtime settings of a worker, a pool, or all workers, so they inherit again.
    Reset(control::ResetArgs),
    /// Show the effective control state of a worker, a pool, or all workers, and its sources.
    Control(control::ShowArgs),
    /// Run a hub, three simulated workers and a tail, and change a sampling rate live.
    Demo(demo::Args),
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }

    pub fn new(code: u8, message: impl std::fmt::Display) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        use tonic::Code;
        let code = match &error {
            ClientError::InvalidAddress { .. } | ClientError::Security(_) => 2,
            ClientError::Unreachable { .. } => 3,
            ClientError::Status(status) => match status.code() {
                Code::InvalidArgument => 2,
                Code::Unavailable => 3,
                Code::NotFound => 4,
                Code::DeadlineExceeded => 5,
                Code::Unauthenticated => 6,
                Code::PermissionDenied => 7,
                Code::ResourceExhausted => 8,
                _ => 1,
            },
        };
        Self::new(code, error)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::new(1, format!("{error:#}"))
    }
}

pub type Outcome = Result<(), Failure>;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.command);
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
    let outcome = runtime.block_on(run(cli));
    // Streams still open (e.g. a tail cut short) must not hold the process.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Outcome {
    let hub = HubTarget {
        url: cli.hub,
        security: cli.security,
    };
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Subscribe(args) => subscribe::run(&hub, args).await,
        Command::Workers(args) => workers::run(&hub, args).await,
        Command::Top(args) => top::run(&hub, args).await,
        Command::Sample(args) => control::sample(&hub, args).await,
        Command::Toggle(args) => control::toggle(&hub, args).await,
        Command::Filter(args) => control::filter(&hub, args).await,
        Command::Reset(args) => control::reset(&hub, args).await,
        Command::Control(args) => control::show(&hub, args).await,
    }
}

/// The hub a command talks to, and how it proves who it is.
#[derive(Debug)]
pub struct HubTarget {
    url: String,
    security: ClientSecurity,
}

impl std::fmt::Display for HubTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Connects to the hub, with the timeout every command uses for that.
pub async fn connect(hub: &HubTarget) -> Result<HubClient, Failure> {
    Ok(HubClient::connect_with(&hub.url, &hub.security, Duration::from_secs(5)).await?)
}

fn init_logging(format: LogFormat, command: &Command) {
    use tracing_subscriber::{EnvFilter, fmt};
    // Client commands keep stderr for their own errors unless asked (RUST_LOG) for more.
    let default = match command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    // A log line would tear the full-screen view; its status line reports failures instead.
    let filter = if matches!(command, Command::Top(_)) {
        EnvFilter::new("off")
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
    };
    // Colour only for a person at a terminal: a log file or collector gets plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Peer strings reach log lines: escaped and cut so that they cannot forge or bloat them.
    match format {
        LogFormat::Text => builder
            .with_writer(std::io::stderr)
            .fmt_fields(bridge::logging::SafeFields)
            .init(),
        LogFormat::Json => builder
            .json()
            .with_writer(bridge::logging::CappedJson)
            .init(),
    }
}
