//! `bridge-bench`: the telemetry-bridge benchmark. The library says what it measures and how.

use std::{process::ExitCode, time::Duration};

use bridge_bench::{Args, Error, role::Role};
use clap::{Parser, Subcommand};

/// The allocator of `bridge`: the baseline server and the load processes run in this binary,
/// and a slower allocator here would flatter the hub's ratios.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure the `bridge` hub's throughput, latency, control round trips, memory and emit cost
/// against a baseline server, in separate processes on loopback.
///
/// The hub measured is the `bridge` binary next to this one; `cargo run -p bridge-bench`
/// builds it first.
#[derive(Debug, Parser)]
#[command(
    name = "bridge-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    args: Args,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// A process of the benchmark (internal).
    #[command(hide = true)]
    Role {
        #[command(subcommand)]
        role: Role,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = cli.internal.map(|Internal::Role { role }| role);
    init_logging(role.is_some());
    // A benchmark's load processes share the machine with the server they measure: one
    // thread each leaves the cores to it and keeps the scheduling noise out of the figures.
    // The baseline is a server measured, not load: it runs on the runtime a plain tonic server
    // gets (`#[tokio::main]`: a thread per core), as the hub does, so that the two compare
    // the code and not the runtimes (on one thread it needed about a quarter less CPU per
    // delivery than on two, and so did the hub: see BENCHMARKS.md).
    let mut builder = if role.is_some() && !matches!(role, Some(Role::Baseline { .. })) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match role {
            Some(role) => bridge_bench::role::run(role).await,
            None => bridge_bench::run(cli.args).await,
        }
    });
    // Streams still open (a load process's, at the end) must not hold the process.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            // 2 for invalid input, as clap's usage errors and `bridge` have it.
            ExitCode::from(if matches!(error, Error::Invalid(_)) {
                2
            } else {
                1
            })
        }
    }
}

fn init_logging(role: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    // The soak's workers meet injected faults on purpose and would warn about each; the load
    // processes keep the warnings a client command would show.
    let default = if role { "warn" } else { "error" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
