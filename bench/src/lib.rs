//! `bridge-bench`: the performance figures we track, each next to a baseline measured in the
//! same invocation, and the fault-injecting proxy the soak run and the integration tests use.
//!
//! Every figure comes from separate processes on loopback: a server (the real `bridge serve`,
//! or the baseline server of `baseline`) and load processes ([`role`]) started from the
//! `bridge-bench` binary. The orchestrator reads the load processes' counters (`mark`) and the
//! server's CPU time and memory from `/proc` at the same moments, and reports the median over
//! runs. The baseline is a minimal server with the same contract and HTTP/2 settings that only
//! counts (ingest) or forwards each event encoded once (fan-out, latency); the ratio to it is
//! the number to watch.
//!
//! # Layout
//! - `hub_binary`: the `bridge` binary under test, next to this one (built first under cargo).
//! - `process`: the hub, baseline and load processes, and how the orchestrator talks to them.
//! - [`role`]: what those load processes (and the baseline server) do; `baseline`: the
//!   baseline server; `wire`: their raw worker and subscriber clients; `payload`: the events
//!   they send.
//! - The sections, one module each: `ingest`, `fanout`, `latency`, `control`,
//!   `memory`, `pressure`, `emit`, `cluster`, and `soak` (`--soak`).
//! - `report`: figures, medians, and the table and JSON they are printed as.
//! - [`fault_proxy`]: a TCP proxy that injects network faults, for `--soak` and the tests.

mod baseline;
mod cluster;
mod control;
mod emit;
mod export;
mod fanout;
pub mod fault_proxy;
mod hub_binary;
mod ingest;
mod latency;
mod memory;
mod payload;
mod pressure;
mod process;
mod report;
pub mod role;
mod soak;
mod wire;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;

/// Why the benchmark (or one of its processes) did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag value it cannot use.
    #[error("{0}")]
    Invalid(String),
    /// The `bridge` binary to measure is missing, or did not build.
    #[error("{0}")]
    Hub(String),
    /// A measurement did not complete: a process did not start or answer, or a check failed.
    #[error("benchmark failed: {0}")]
    Failed(String),
    /// A load process or the baseline server failed.
    #[error("{0}")]
    Role(String),
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Short windows and one run per figure (about a minute and a half): for CI and a first look.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Runs per figure; the median is reported [default: 3, 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// Only these sections (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Instead of the sections: run workers, a subscriber, control changes and network faults
    /// together for this many minutes, then check the hub's memory and every worker's books.
    #[arg(long, value_name = "MINUTES", conflicts_with = "only")]
    soak: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Section {
    Ingest,
    Fanout,
    Latency,
    Control,
    Memory,
    Pressure,
    Emit,
    /// Two hubs and a nats-server (needs nats-server on PATH; skipped without it unless asked
    /// for with --only).
    Cluster,
    Export,
    #[value(skip)]
    Soak,
}

/// The hub under test, and how long and how often to measure it.
#[derive(Debug, Clone)]
struct Plan {
    /// The `bridge` binary every hub process runs.
    hub: PathBuf,
    runs: usize,
    warmup: Duration,
    window: Duration,
    trickling_workers: usize,
    control_workers: usize,
    control_rounds: usize,
    idle_workers: usize,
    fanout_probes: usize,
    emit_scale: u64,
    /// Silent worker streams per wave of the pressure section, and the waves.
    pressure_silent: usize,
    pressure_waves: usize,
}

impl Plan {
    fn new(args: &Args, hub: PathBuf) -> Self {
        if args.quick {
            Self {
                hub,
                runs: args.runs.unwrap_or(1),
                warmup: Duration::from_millis(500),
                window: Duration::from_millis(1000),
                trickling_workers: 1000,
                control_workers: 1000,
                control_rounds: 50,
                idle_workers: 10_000,
                fanout_probes: 7,
                emit_scale: 4,
                pressure_silent: 2000,
                pressure_waves: 3,
            }
        } else {
            Self {
                hub,
                runs: args.runs.unwrap_or(3),
                warmup: Duration::from_secs(1),
                window: Duration::from_secs(3),
                trickling_workers: 1000,
                control_workers: 1000,
                control_rounds: 300,
                idle_workers: 10_000,
                fanout_probes: 10,
                emit_scale: 1,
                pressure_silent: 10_000,
                pressure_waves: 4,
            }
        }
    }
}

/// Runs the sections `args` ask for (or the soak) and prints the report on stdout; progress
/// goes to stderr.
pub async fn run(args: Args) -> Result<(), Error> {
    if let Some(minutes) = args.soak
        && !(minutes.is_finite() && minutes > 0.0)
    {
        return Err(Error::Invalid(format!(
            "--soak {minutes}: give a positive number of minutes"
        )));
    }
    let plan = Plan::new(&args, hub_binary::locate()?);
    let wanted =
        |s: Section| args.soak.is_none() && (args.only.is_empty() || args.only.contains(&s));
    let mut figures = Vec::new();
    let started = Instant::now();
    let fail = Error::Failed;
    let mut max_ingest = None;
    if let Some(minutes) = args.soak {
        figures.extend(soak::soak(&plan, minutes).await.map_err(fail)?);
    } else if wanted(Section::Ingest) {
        let (section, max) = ingest::ingest(&plan).map_err(fail)?;
        figures.extend(section);
        max_ingest = Some(max);
    }
    if wanted(Section::Fanout) {
        figures.extend(fanout::fanout(&plan).map_err(fail)?);
    }
    if wanted(Section::Latency) {
        figures.extend(latency::latency(&plan, max_ingest.unwrap_or(200_000.0)).map_err(fail)?);
    }
    if wanted(Section::Control) {
        figures.extend(control::control(&plan).await.map_err(fail)?);
    }
    if wanted(Section::Memory) {
        figures.extend(memory::memory(&plan).map_err(fail)?);
    }
    if wanted(Section::Pressure) {
        figures.extend(pressure::pressure(&plan).await.map_err(fail)?);
    }
    if wanted(Section::Emit) {
        figures.extend(emit::emit_cost(&plan));
    }
    if wanted(Section::Cluster) {
        let asked = args.only.contains(&Section::Cluster);
        figures.extend(cluster::cluster(&plan, asked).await.map_err(fail)?);
    }
    if wanted(Section::Export) {
        figures.extend(export::export(&plan).map_err(fail)?);
    }
    let report = json!({
        "commit": report::commit(),
        "machine": report::machine(),
        "quick": args.quick,
        "runs": plan.runs,
        "event_bytes": payload::Payload::default().size(),
        "seconds": started.elapsed().as_secs_f64(),
        "figures": figures,
    });
    if args.json {
        println!("{report}");
    } else {
        report::print_table(&report, &figures);
    }
    Ok(())
}

fn progress(message: &str) {
    eprintln!("bench: {message}");
}

/// `run` once per run of the plan, each announced.
fn repeat<T>(
    plan: &Plan,
    what: &str,
    mut run: impl FnMut() -> Result<T, String>,
) -> Result<Vec<T>, String> {
    (0..plan.runs)
        .map(|i| {
            progress(&format!("{what} (run {}/{})", i + 1, plan.runs));
            run()
        })
        .collect()
}
