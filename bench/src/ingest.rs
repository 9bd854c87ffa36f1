//! Ingest: events per second into the server from 1, 8 and 64 streams sending pre-encoded
//! events as fast as flow control allows, and the server's CPU per million events; and the CPU
//! the server spends on 1,000 worker-library workers trickling 50 events/s each.

use std::time::Instant;

use crate::{
    Plan, Section,
    process::{Server, ServerProcess, library_workers, load, number},
    repeat,
    report::{Figure, median},
};

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
    let server = ServerProcess::start(plan, kind)?;
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

/// Returns the figures and the hub's maximum ingest rate (8 workers), for the latency section.
pub(crate) fn ingest(plan: &Plan) -> Result<(Vec<Figure>, f64), String> {
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
