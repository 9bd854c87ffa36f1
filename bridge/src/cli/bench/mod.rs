//! `bridge bench`: the performance figures we track, each next to a baseline measured in the
//! same invocation.
//!
//! Every figure comes from separate processes on loopback: a server (the hub, or the baseline
//! server of [`baseline`]) and load processes ([`role`]) started from this same binary. The
//! orchestrator reads the load processes' counters (`mark`) and the server's CPU time and memory
//! from `/proc` at the same moments, and reports the median over runs. The baseline is a
//! minimal server with the same contract and HTTP/2 settings that only counts (ingest) or
//! forwards each event encoded once (fan-out, latency); the ratio to it is the number to watch.

mod baseline;
mod cluster;
mod emit;
mod payload;
mod pressure;
pub mod role;
mod soak;
mod wire;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{sampling::Rate, v1};
use serde::Serialize;
use serde_json::{Value as Json, json};
use worker::process::ProcessStat;

use super::{Failure, Outcome};

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
    #[value(skip)]
    Soak,
}

/// How long and how often to measure.
#[derive(Debug, Clone)]
struct Plan {
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
    fn new(args: &Args) -> Self {
        if args.quick {
            Self {
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
                pressure_waves: 2,
            }
        } else {
            Self {
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
                pressure_waves: 3,
            }
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    section: Section,
    name: String,
    unit: &'static str,
    value: f64,
    baseline: Option<f64>,
    /// value / baseline.
    ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
}

impl Figure {
    fn new(section: Section, name: impl Into<String>, unit: &'static str, value: f64) -> Self {
        Self {
            section,
            name: name.into(),
            unit,
            value,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    fn baseline(mut self, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        self.ratio = (baseline != 0.0).then(|| self.value / baseline);
        self
    }

    fn target(mut self, description: &str, met: bool) -> Self {
        self.target = Some(description.to_owned());
        self.met = Some(met);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    Hub,
    Baseline,
}

pub async fn run(args: Args) -> Outcome {
    let plan = Plan::new(&args);
    let wanted =
        |s: Section| args.soak.is_none() && (args.only.is_empty() || args.only.contains(&s));
    let mut figures = Vec::new();
    let started = Instant::now();
    let fail = |e: String| Failure::new(1, format!("benchmark failed: {e}"));
    let mut max_ingest = None;
    if let Some(minutes) = args.soak {
        if !(minutes.is_finite() && minutes > 0.0) {
            return Err(Failure::invalid(format!(
                "--soak {minutes}: give a positive number of minutes"
            )));
        }
        figures.extend(soak::soak(minutes).await.map_err(fail)?);
    } else if wanted(Section::Ingest) {
        let (section, max) = ingest(&plan).map_err(fail)?;
        figures.extend(section);
        max_ingest = Some(max);
    }
    if wanted(Section::Fanout) {
        figures.extend(fanout(&plan).map_err(fail)?);
    }
    if wanted(Section::Latency) {
        figures.extend(latency(&plan, max_ingest.unwrap_or(200_000.0)).map_err(fail)?);
    }
    if wanted(Section::Control) {
        figures.extend(control(&plan).await.map_err(fail)?);
    }
    if wanted(Section::Memory) {
        figures.extend(memory(&plan).map_err(fail)?);
    }
    if wanted(Section::Pressure) {
        figures.extend(pressure::pressure(&plan).await.map_err(fail)?);
    }
    if wanted(Section::Emit) {
        figures.extend(emit_cost(&plan));
    }
    if wanted(Section::Cluster) {
        let asked = args.only.contains(&Section::Cluster);
        figures.extend(cluster::cluster(&plan, asked).await.map_err(fail)?);
    }
    let report = json!({
        "commit": commit(),
        "machine": machine(),
        "quick": args.quick,
        "runs": plan.runs,
        "event_bytes": payload::Payload::default().size(),
        "seconds": started.elapsed().as_secs_f64(),
        "figures": figures,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report, &figures);
    }
    Ok(())
}

fn progress(message: &str) {
    eprintln!("bench: {message}");
}

/// The `q` quantile of `values` (nearest rank); NaN when there are none.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((n as f64 - 1.0) * q).round() as usize],
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A process of this binary whose stdout lines the orchestrator reads and whose stdin it
/// writes `mark` to. Killed when dropped.
struct RoleProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl RoleProcess {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {args:?}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    fn line(&mut self, timeout: Duration) -> Result<String, String> {
        self.lines.recv_timeout(timeout).map_err(|_| {
            format!(
                "no answer from process {} within {timeout:?}",
                self.child.id()
            )
        })
    }

    fn ready(&mut self, timeout: Duration) -> Result<(), String> {
        match self.line(timeout)?.as_str() {
            "ready" => Ok(()),
            other => Err(format!("expected `ready`, got `{other}`")),
        }
    }

    fn mark(&mut self) -> Result<Json, String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "mark").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let line = self.line(Duration::from_secs(30))?;
        serde_json::from_str(&line).map_err(|e| format!("`{line}`: {e}"))
    }

    fn set_rate(&mut self, rate: f64) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "rate {rate}").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub or a baseline server on a free loopback port.
struct ServerProcess {
    process: RoleProcess,
    url: String,
    _state: tempfile::TempDir,
}

impl ServerProcess {
    fn start(kind: Server) -> Result<Self, String> {
        Self::start_with(kind, None)
    }

    /// Starts a server; a hub with `config` (TOML) when given.
    fn start_with(kind: Server, config: Option<&str>) -> Result<Self, String> {
        let state = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut args: Vec<String> = match kind {
            Server::Hub => vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--http".into(),
                "off".into(),
                "--state-dir".into(),
                state.path().display().to_string(),
            ],
            Server::Baseline => vec!["bench-role".into(), "baseline".into()],
        };
        if let (Server::Hub, Some(config)) = (kind, config) {
            let path = state.path().join("config.toml");
            std::fs::write(&path, config).map_err(|e| e.to_string())?;
            args.extend(["--config".into(), path.display().to_string()]);
        }
        let mut process = RoleProcess::spawn(&args, &[("RUST_LOG", "error")])?;
        let line = process.line(Duration::from_secs(30))?;
        let address = line
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("unexpected first line `{line}`"))?;
        Ok(Self {
            url: format!("http://{address}"),
            process,
            _state: state,
        })
    }

    fn stat(&self) -> Result<ProcessStat, String> {
        ProcessStat::read(self.process.pid()).ok_or_else(|| "the server exited".to_owned())
    }
}

fn load(url: &str, streams: usize, rate: Option<f64>) -> Result<RoleProcess, String> {
    load_named(url, "bench", streams, rate)
}

/// [`load`] with worker ids `PREFIX-N`.
fn load_named(
    url: &str,
    prefix: &str,
    streams: usize,
    rate: Option<f64>,
) -> Result<RoleProcess, String> {
    let mut args = vec![
        "bench-role".into(),
        "load".into(),
        "--target".into(),
        url.into(),
        "--streams".into(),
        streams.to_string(),
        "--prefix".into(),
        prefix.into(),
    ];
    if let Some(rate) = rate {
        args.extend(["--rate".into(), rate.to_string()]);
    }
    let mut process = RoleProcess::spawn(&args, &[])?;
    process.ready(Duration::from_secs(120))?;
    Ok(process)
}

/// `workers` worker-library workers emitting `rate` events per second each.
fn library_workers(url: &str, workers: usize, rate: f64) -> Result<RoleProcess, String> {
    let args = vec![
        "bench-role".into(),
        "workers".into(),
        "--target".into(),
        url.into(),
        "--workers".into(),
        workers.to_string(),
        "--rate".into(),
        rate.to_string(),
    ];
    let mut process = RoleProcess::spawn(&args, &[("RUST_LOG", "error")])?;
    process.ready(Duration::from_secs(120))?;
    Ok(process)
}

fn subscribers(
    url: &str,
    count: usize,
    buckets: bool,
    latency: bool,
) -> Result<RoleProcess, String> {
    subscribers_of(url, count, buckets, latency, &[])
}

/// [`subscribers`] to the events of `workers` only.
fn subscribers_of(
    url: &str,
    count: usize,
    buckets: bool,
    latency: bool,
    workers: &[String],
) -> Result<RoleProcess, String> {
    let mut args = vec![
        "bench-role".into(),
        "subscribe".into(),
        "--target".into(),
        url.into(),
        "--subscribers".into(),
        count.to_string(),
    ];
    for worker in workers {
        args.extend(["--worker".into(), worker.clone()]);
    }
    if buckets {
        args.push("--buckets".into());
    }
    if latency {
        args.push("--latency".into());
    }
    let mut process = RoleProcess::spawn(&args, &[])?;
    process.ready(Duration::from_secs(60))?;
    Ok(process)
}

fn idle(url: &str, workers: usize) -> Result<RoleProcess, String> {
    idle_named(url, "bench", workers, Duration::ZERO)
}

/// [`idle`] with worker ids `PREFIX-N`, each sending a numbered event `every` (zero: never).
fn idle_named(
    url: &str,
    prefix: &str,
    workers: usize,
    every: Duration,
) -> Result<RoleProcess, String> {
    let args = vec![
        "bench-role".into(),
        "idle".into(),
        "--target".into(),
        url.into(),
        "--workers".into(),
        workers.to_string(),
        "--prefix".into(),
        prefix.into(),
        "--every-ms".into(),
        every.as_millis().to_string(),
    ];
    let mut process = RoleProcess::spawn(&args, &[])?;
    process.ready(Duration::from_secs(300))?;
    Ok(process)
}

/// Subscriptions that are never read.
fn stalled(url: &str, count: usize) -> Result<RoleProcess, String> {
    let args = vec![
        "bench-role".into(),
        "stall".into(),
        "--target".into(),
        url.into(),
        "--subscribers".into(),
        count.to_string(),
    ];
    let mut process = RoleProcess::spawn(&args, &[])?;
    process.ready(Duration::from_secs(60))?;
    Ok(process)
}

fn number(report: &Json, key: &str) -> Result<f64, String> {
    report[key]
        .as_f64()
        .ok_or_else(|| format!("no `{key}` in {report}"))
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// Events per second into a server from `streams` workers, and the server's CPU.
struct Ingest {
    events_per_second: f64,
    cpu_cores: f64,
    cpu_seconds_per_million: f64,
}

/// What loads the server in an ingest measurement.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Pre-encoded events from this many streams, as fast as flow control allows.
    Streams(usize),
    /// This many worker-library workers at this many events per second each.
    Library(usize, f64),
}

fn measure_ingest(plan: &Plan, kind: Server, how: Load) -> Result<Ingest, String> {
    let server = ServerProcess::start(kind)?;
    let mut load = match how {
        Load::Streams(streams) => load(&server.url, streams, None)?,
        Load::Library(workers, rate) => library_workers(&server.url, workers, rate)?,
    };
    std::thread::sleep(plan.warmup);
    let mut window = || -> Result<(f64, f64, f64), String> {
        let (events0, cpu0, at0) = (
            number(&load.mark()?, "events")?,
            server.stat()?.cpu_seconds,
            Instant::now(),
        );
        std::thread::sleep(plan.window);
        let (events1, cpu1, at1) = (
            number(&load.mark()?, "events")?,
            server.stat()?.cpu_seconds,
            Instant::now(),
        );
        Ok((
            events1 - events0,
            cpu1 - cpu0,
            at1.duration_since(at0).as_secs_f64(),
        ))
    };
    let (mut events, mut cpu, mut seconds) = window()?;
    // A window in which nothing arrived is a stall, not a figure (seen with the debug build of
    // the baseline server and 64 streams under `--quick`): measured again, as fan-out does.
    for _ in 0..3 {
        if events > 0.0 {
            break;
        }
        (events, cpu, seconds) = window()?;
    }
    Ok(Ingest {
        events_per_second: events / seconds,
        cpu_cores: cpu / seconds,
        cpu_seconds_per_million: cpu / events.max(1.0) * 1e6,
    })
}

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

/// Returns the figures and the hub's maximum ingest rate (8 workers), for the latency section.
fn ingest(plan: &Plan) -> Result<(Vec<Figure>, f64), String> {
    let mut figures = Vec::new();
    let mut max = 0.0;
    for streams in [1, 8, 64] {
        let hub = repeat(plan, &format!("ingest from {streams} workers, hub"), || {
            measure_ingest(plan, Server::Hub, Load::Streams(streams))
        })?;
        let base = repeat(
            plan,
            &format!("ingest from {streams} workers, baseline"),
            || measure_ingest(plan, Server::Baseline, Load::Streams(streams)),
        )?;
        let rate = median(hub.iter().map(|r| r.events_per_second).collect());
        let base_rate = median(base.iter().map(|r| r.events_per_second).collect());
        let mut figure = Figure::new(
            Section::Ingest,
            format!("ingest, {streams} workers"),
            "events/s",
            rate,
        )
        .baseline(base_rate);
        if streams == 8 {
            max = rate;
            let met = rate >= 800_000.0 && figure.ratio.is_some_and(|r| r >= 0.85);
            figure = figure.target(">= 800000 and >= 0.85 x baseline", met);
        }
        figures.push(figure);
        figures.push(
            Figure::new(
                Section::Ingest,
                format!("  hub CPU per million events, {streams} workers"),
                "CPU-s",
                median(hub.iter().map(|r| r.cpu_seconds_per_million).collect()),
            )
            .baseline(median(
                base.iter().map(|r| r.cpu_seconds_per_million).collect(),
            )),
        );
    }
    let workers = plan.trickling_workers;
    let trickle = Load::Library(workers, 50.0);
    let hub = repeat(
        plan,
        &format!("{workers} worker-library workers trickling 50 events/s, hub"),
        || measure_ingest(plan, Server::Hub, trickle),
    )?;
    let base = repeat(
        plan,
        &format!("{workers} worker-library workers trickling 50 events/s, baseline"),
        || measure_ingest(plan, Server::Baseline, trickle),
    )?;
    let cores = median(hub.iter().map(|r| r.cpu_cores).collect());
    figures.push(
        Figure::new(
            Section::Ingest,
            format!("{workers} workers x 50 events/s, hub CPU"),
            "cores",
            cores,
        )
        .baseline(median(base.iter().map(|r| r.cpu_cores).collect()))
        .target("<= 0.3", cores <= 0.3),
    );
    figures.push(
        Figure::new(
            Section::Ingest,
            format!("  hub CPU per million events, {workers} trickling"),
            "CPU-s",
            median(hub.iter().map(|r| r.cpu_seconds_per_million).collect()),
        )
        .baseline(median(
            base.iter().map(|r| r.cpu_seconds_per_million).collect(),
        )),
    );
    Ok((figures, max))
}

struct Fanout {
    deliveries_per_second: f64,
    dropped: f64,
    events_per_second: f64,
}

/// Deliveries per second at the highest event rate the server sustains without dropping any.
///
/// Found by probing: the event rate doubles while every subscriber keeps up and the deliveries
/// follow the rate, then a bisection narrows down between the last good and the first bad rate;
/// the best good rate is then measured over a full window (stepping down 15 % at a time, up to
/// three times, while that window still shows drops).
fn measure_fanout(
    plan: &Plan,
    kind: Server,
    count: usize,
    buckets: bool,
) -> Result<Fanout, String> {
    let server = ServerProcess::start(kind)?;
    probe_fanout(plan, &server.url, &server.url, count, buckets)
}

/// [`measure_fanout`] with the load sent to `load_url` and the subscribers on `subs_url`.
fn probe_fanout(
    plan: &Plan,
    load_url: &str,
    subs_url: &str,
    count: usize,
    buckets: bool,
) -> Result<Fanout, String> {
    let mut subs = subscribers(subs_url, count, buckets, false)?;
    let deliveries_per_event = if buckets { 1.0 } else { count as f64 };
    let mut rate = (100_000.0 / deliveries_per_event).max(1000.0);
    let mut load = load(load_url, 4, Some(rate))?;
    let settle = plan.window / 5;
    let measure = |subs: &mut RoleProcess,
                   load: &mut RoleProcess,
                   rate: f64,
                   length: Duration|
     -> Result<(f64, f64), String> {
        load.set_rate(rate)?;
        std::thread::sleep(settle);
        let (first, at0) = (subs.mark()?, Instant::now());
        std::thread::sleep(length);
        let (last, at1) = (subs.mark()?, Instant::now());
        let seconds = at1.duration_since(at0).as_secs_f64();
        Ok((
            (number(&last, "deliveries")? - number(&first, "deliveries")?) / seconds,
            number(&last, "lagged")? - number(&first, "lagged")?,
        ))
    };
    let keeps_up = |delivered: f64, dropped: f64, rate: f64| {
        dropped == 0.0 && delivered >= 0.9 * rate * deliveries_per_event
    };
    let (mut good, mut bad) = (0.0_f64, f64::INFINITY);
    for _ in 0..plan.fanout_probes {
        let (delivered, dropped) = measure(&mut subs, &mut load, rate, plan.window / 4)?;
        if keeps_up(delivered, dropped, rate) {
            good = good.max(rate);
        } else {
            bad = bad.min(rate);
        }
        rate = if bad.is_infinite() {
            rate * 2.0
        } else {
            (good.max(bad / 4.0) + bad) / 2.0
        };
    }
    let mut rate = if good > 0.0 { good } else { rate };
    let (mut delivered, mut dropped) = measure(&mut subs, &mut load, rate, plan.window)?;
    // A short probe can pass at a rate a full window cannot hold: step down until one does.
    // A window with no deliveries at all (seen once on a machine busy compiling, for the
    // baseline) is a stall of the load processes, not a figure: measured again the same way.
    for _ in 0..3 {
        if dropped == 0.0 && delivered > 0.0 {
            break;
        }
        rate *= 0.85;
        (delivered, dropped) = measure(&mut subs, &mut load, rate, plan.window)?;
    }
    Ok(Fanout {
        deliveries_per_second: delivered,
        dropped,
        events_per_second: rate,
    })
}

fn fanout(plan: &Plan) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    for (count, buckets) in [(1, false), (10, false), (100, false), (100, true)] {
        let label = if buckets {
            format!("fan-out, {count} subscribers matching 1 % each")
        } else {
            format!("fan-out, {count} subscribers matching all")
        };
        let hub = repeat(plan, &format!("{label}, hub"), || {
            measure_fanout(plan, Server::Hub, count, buckets)
        })?;
        let base = repeat(plan, &format!("{label}, baseline"), || {
            measure_fanout(plan, Server::Baseline, count, buckets)
        })?;
        let rate = median(hub.iter().map(|r| r.deliveries_per_second).collect());
        let dropped = median(hub.iter().map(|r| r.dropped).collect());
        let mut figure = Figure::new(Section::Fanout, label.clone(), "deliveries/s", rate)
            .baseline(median(
                base.iter().map(|r| r.deliveries_per_second).collect(),
            ));
        match (count, buckets) {
            (10, false) => {
                figure = figure.target(
                    ">= 2000000, zero drops",
                    rate >= 2_000_000.0 && dropped == 0.0,
                )
            }
            (100, false) => {
                figure = figure.target(
                    ">= 2500000, zero drops",
                    rate >= 2_500_000.0 && dropped == 0.0,
                )
            }
            _ => {}
        }
        figures.push(figure);
        figures.push(
            Figure::new(
                Section::Fanout,
                "  at an ingest rate of",
                "events/s",
                median(hub.iter().map(|r| r.events_per_second).collect()),
            )
            .baseline(median(base.iter().map(|r| r.events_per_second).collect())),
        );
        figures.push(
            Figure::new(
                Section::Fanout,
                "  dropped in the measured window",
                "events",
                dropped,
            )
            .baseline(median(base.iter().map(|r| r.dropped).collect())),
        );
    }
    Ok(figures)
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    delivered_per_second: f64,
}

fn measure_latency(plan: &Plan, kind: Server, rate: f64) -> Result<Latency, String> {
    let server = ServerProcess::start(kind)?;
    probe_latency(plan, &server.url, &server.url, rate)
}

/// [`measure_latency`] with the load sent to `load_url` and the subscriber on `subs_url`.
fn probe_latency(
    plan: &Plan,
    load_url: &str,
    subs_url: &str,
    rate: f64,
) -> Result<Latency, String> {
    let mut subs = subscribers(subs_url, 1, false, true)?;
    let _load = load(load_url, 8, Some(rate))?;
    std::thread::sleep(plan.warmup);
    // Resets the histogram: only the window counts.
    let (first, at0) = (subs.mark()?, Instant::now());
    std::thread::sleep(plan.window);
    let (last, at1) = (subs.mark()?, Instant::now());
    let latency = &last["latency_us"];
    Ok(Latency {
        p50_us: number(latency, "p50")?,
        p99_us: number(latency, "p99")?,
        p999_us: number(latency, "p999")?,
        delivered_per_second: (number(&last, "deliveries")? - number(&first, "deliveries")?)
            / at1.duration_since(at0).as_secs_f64(),
    })
}

fn latency(plan: &Plan, max_ingest: f64) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    let rates = [
        (
            format!("25 % of max ingest ({:.0}/s)", max_ingest * 0.25),
            max_ingest * 0.25,
            None,
        ),
        (
            format!("50 % of max ingest ({:.0}/s)", max_ingest * 0.5),
            max_ingest * 0.5,
            None,
        ),
        (
            format!("75 % of max ingest ({:.0}/s)", max_ingest * 0.75),
            max_ingest * 0.75,
            None,
        ),
        ("50000 deliveries/s".to_owned(), 50_000.0, Some(1000.0)),
        ("400000 deliveries/s".to_owned(), 400_000.0, Some(3000.0)),
    ];
    for (label, rate, p99_target_us) in rates {
        let hub = repeat(plan, &format!("latency at {label}, hub"), || {
            measure_latency(plan, Server::Hub, rate)
        })?;
        let base = repeat(plan, &format!("latency at {label}, baseline"), || {
            measure_latency(plan, Server::Baseline, rate)
        })?;
        let pick = |runs: &[Latency], f: fn(&Latency) -> f64| median(runs.iter().map(f).collect());
        for (name, f) in [
            ("p50", (|l: &Latency| l.p50_us) as fn(&Latency) -> f64),
            ("p99", |l: &Latency| l.p99_us),
            ("p99.9", |l: &Latency| l.p999_us),
        ] {
            let value = pick(&hub, f) / 1000.0;
            let mut figure = Figure::new(
                Section::Latency,
                format!("emit -> subscriber {name}, {label}"),
                "ms",
                value,
            )
            .baseline(pick(&base, f) / 1000.0);
            if let (Some(target), "p99") = (p99_target_us, name) {
                figure = figure.target(
                    &format!("<= {} ms", target / 1000.0),
                    value * 1000.0 <= target,
                );
            }
            figures.push(figure);
        }
        figures.push(
            Figure::new(
                Section::Latency,
                format!("  delivered, {label}"),
                "events/s",
                pick(&hub, |l| l.delivered_per_second),
            )
            .baseline(pick(&base, |l| l.delivered_per_second)),
        );
    }
    Ok(figures)
}

async fn control(plan: &Plan) -> Result<Vec<Figure>, String> {
    let workers = plan.control_workers;
    progress(&format!(
        "control with {workers} connected workers sending an event a second each, hub"
    ));
    let hub = ServerProcess::start(Server::Hub)?;
    // Trickling, numbered events: the hub's receipts for them must never hold a change back.
    let _idle = idle_named(&hub.url, "bench", workers, Duration::from_secs(1))?;
    let mut client = HubClient::connect(&hub.url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut round_trips = Vec::with_capacity(plan.control_rounds);
    let mut unacknowledged = Vec::with_capacity(plan.control_rounds);
    for i in 0..plan.control_rounds * 2 {
        let id = format!("bench-{}", rand::random_range(0..workers));
        let rate = Rate::new(if i % 2 == 0 { 0.5 } else { 1.0 }).map_err(|e| e.to_string())?;
        // Every other pair of changes does not wait: what the hub itself takes to save and
        // send a change.
        let wait = i % 4 < 2;
        let started = Instant::now();
        let response = client
            .update_control(
                &Selector::Worker(id.clone()),
                &Change::Sampling {
                    rate,
                    patterns: vec![],
                },
                if wait {
                    Duration::from_secs(5)
                } else {
                    Duration::ZERO
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        if !wait {
            unacknowledged.push(elapsed);
            continue;
        }
        round_trips.push(elapsed);
        if !response.targets.first().is_some_and(|t| t.applied) {
            return Err(format!("{id} did not acknowledge"));
        }
    }
    let started = Instant::now();
    let response = client
        .update_control(
            &Selector::All,
            &Change::Sampling {
                rate: Rate::new(0.9).map_err(|e| e.to_string())?,
                patterns: vec![],
            },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| e.to_string())?;
    let all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let applied = response.targets.iter().filter(|t| t.applied).count();
    if applied != workers {
        return Err(format!(
            "only {applied} of {workers} workers acknowledged the change to --all"
        ));
    }

    progress("control round trip, baseline (a unary call)");
    let base = ServerProcess::start(Server::Baseline)?;
    let mut base_client = HubClient::connect(&base.url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut base_trips = Vec::with_capacity(plan.control_rounds);
    for _ in 0..plan.control_rounds {
        let started = Instant::now();
        base_client
            .raw()
            .get_control(v1::GetControlRequest::default())
            .await
            .map_err(|e| e.to_string())?;
        base_trips.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let p99 = percentile(&round_trips, 0.99);
    Ok(vec![
        Figure::new(
            Section::Control,
            format!("sample one worker -> acknowledged p50, {workers} connected"),
            "ms",
            percentile(&round_trips, 0.5),
        )
        .baseline(percentile(&base_trips, 0.5)),
        Figure::new(
            Section::Control,
            format!("sample one worker -> acknowledged p99, {workers} connected"),
            "ms",
            p99,
        )
        .baseline(percentile(&base_trips, 0.99))
        .target("<= 2 ms", p99 <= 2.0),
        Figure::new(
            Section::Control,
            "  of which saved and sent by the hub (not waiting), p50",
            "ms",
            percentile(&unacknowledged, 0.5),
        )
        .baseline(percentile(&base_trips, 0.5)),
        Figure::new(
            Section::Control,
            format!("sample --all -> acknowledged by all {workers}"),
            "ms",
            all_ms,
        )
        .target("<= 50 ms", all_ms <= 50.0),
    ])
}

fn measure_memory(kind: Server, workers: usize) -> Result<f64, String> {
    let server = ServerProcess::start(kind)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = server.stat()?.rss_bytes;
    let _idle = idle(&server.url, workers)?;
    std::thread::sleep(Duration::from_secs(1));
    let after = server.stat()?.rss_bytes;
    Ok(after.saturating_sub(before) as f64 / workers as f64)
}

fn memory(plan: &Plan) -> Result<Vec<Figure>, String> {
    let workers = plan.idle_workers;
    let hub = repeat(
        plan,
        &format!("memory with {workers} idle workers, hub"),
        || measure_memory(Server::Hub, workers),
    )?;
    let base = repeat(
        plan,
        &format!("memory with {workers} idle workers, baseline"),
        || measure_memory(Server::Baseline, workers),
    )?;
    let per_worker = median(hub) / 1024.0;
    Ok(vec![
        Figure::new(
            Section::Memory,
            format!("hub memory per idle worker, {workers} connected"),
            "KiB",
            per_worker,
        )
        .baseline(median(base) / 1024.0)
        .target("<= 32 KiB", per_worker <= 32.0),
    ])
}

fn emit_cost(plan: &Plan) -> Vec<Figure> {
    let runs: Vec<emit::EmitCost> = (0..plan.runs.max(3))
        .map(|i| {
            progress(&format!("emit cost (run {})", i + 1));
            emit::measure(plan.emit_scale)
        })
        .collect();
    let pick = |f: fn(&emit::EmitCost) -> f64| median(runs.iter().map(f).collect());
    let naive = pick(|c| c.naive_ns);
    let disabled = pick(|c| c.disabled_ns);
    let sampled_out = pick(|c| c.sampled_out_ns);
    let queued = pick(|c| c.queued_ns);
    vec![
        Figure::new(Section::Emit, "emit, telemetry disabled", "ns", disabled)
            .baseline(naive)
            .target("<= 20 ns", disabled <= 20.0),
        Figure::new(Section::Emit, "emit, sampled out", "ns", sampled_out)
            .baseline(naive)
            .target("<= 20 ns", sampled_out <= 20.0),
        Figure::new(Section::Emit, "emit, queued", "ns", queued)
            .baseline(naive)
            .target("<= 150 ns", queued <= 150.0),
    ]
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| format!("v{}", env!("CARGO_PKG_VERSION")))
}

fn machine() -> Json {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map(|m| m.trim().to_owned())
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "model": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "executable": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
    })
}

fn human(value: f64, unit: &str) -> String {
    if value.is_nan() {
        return "-".into();
    }
    match unit {
        "events/s" | "deliveries/s" | "events" => {
            let rounded = value.round() as i64;
            let digits = rounded.abs().to_string();
            let mut grouped = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i).is_multiple_of(3) {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            if rounded < 0 {
                format!("-{grouped}")
            } else {
                grouped
            }
        }
        "ms" => format!("{value:.3}"),
        "ns" | "KiB" => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

fn print_table(report: &Json, figures: &[Figure]) {
    println!(
        "telemetry-bridge benchmark: commit {}, {} cores ({}), {} run(s) per figure, events of {} bytes, {:.0} s",
        report["commit"].as_str().unwrap_or("?"),
        report["machine"]["cores"],
        report["machine"]["model"].as_str().unwrap_or("?"),
        report["runs"],
        report["event_bytes"],
        report["seconds"].as_f64().unwrap_or(0.0),
    );
    let rows: Vec<[String; 6]> = figures
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                format!("{} {}", human(f.value, f.unit), f.unit),
                f.baseline.map_or_else(|| "-".into(), |b| human(b, f.unit)),
                f.ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}")),
                f.target.clone().unwrap_or_default(),
                match f.met {
                    Some(true) => "met".into(),
                    Some(false) => "NOT MET".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let header = ["figure", "value", "baseline", "ratio", "target", ""].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 || i >= 4 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
