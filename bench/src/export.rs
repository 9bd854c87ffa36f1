//! OTLP export: log records per second the hub exports to an OTLP receiver while 8 workers send
//! as fast as flow control allows, and the hub's CPU for it, next to the same hub without export
//! in the same run.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    Plan, Section,
    process::{RoleProcess, Server, ServerProcess, load, number},
    repeat,
    report::{Figure, median},
};

/// Events per second offered: well below the hub's ingest ceiling, so that the CPU the export
/// adds is measured at the same load with and without it.
const RATE: f64 = 200_000.0;

struct Export {
    events_per_second: f64,
    records_per_second: f64,
    cpu_seconds_per_million_events: f64,
}

fn receiver() -> Result<(RoleProcess, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut process = RoleProcess::spawn(
        Command::new(exe).args(["role", "otlp-receiver"]),
        &[("RUST_LOG", "error")],
    )?;
    let line = process.line(Duration::from_secs(30))?;
    let address = line
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected first line `{line}`"))?
        .to_owned();
    process.ready(Duration::from_secs(30))?;
    Ok((process, address))
}

/// How the hub under test exports.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Exporting {
    No,
    Gzip,
    Plain,
}

fn measure(plan: &Plan, exporting: Exporting) -> Result<Export, String> {
    let (mut receiver, address) = receiver()?;
    let gzip = exporting == Exporting::Gzip;
    let config = (exporting != Exporting::No).then(|| {
        format!(
            "[export.otlp]\nendpoint = \"http://{address}\"\nlogs = [\"inference.>\"]\ntraces = false\nmetrics = false\ngzip = {gzip}\n"
        )
    });
    let server = ServerProcess::start_with(plan, Server::Hub, config.as_deref())?;
    let mut load = load(&server.url, 8, Some(RATE))?;
    std::thread::sleep(plan.warmup);
    let mut mark = || -> Result<(f64, f64, f64, Instant), String> {
        Ok((
            number(&load.mark()?, "events")?,
            number(&receiver.mark()?, "records")?,
            server.stat()?.cpu_seconds,
            Instant::now(),
        ))
    };
    let (events0, records0, cpu0, at0) = mark()?;
    std::thread::sleep(plan.window);
    let (events1, records1, cpu1, at1) = mark()?;
    let seconds = at1.duration_since(at0).as_secs_f64();
    let events = events1 - events0;
    Ok(Export {
        events_per_second: events / seconds,
        records_per_second: (records1 - records0) / seconds,
        cpu_seconds_per_million_events: (cpu1 - cpu0) / events.max(1.0) * 1e6,
    })
}

pub(crate) fn export(plan: &Plan) -> Result<Vec<Figure>, String> {
    let with = repeat(plan, "ingest with OTLP log export", || {
        measure(plan, Exporting::Gzip)
    })?;
    let plain = repeat(plan, "ingest with OTLP log export, no gzip", || {
        measure(plan, Exporting::Plain)
    })?;
    let without = repeat(plan, "ingest without export", || {
        measure(plan, Exporting::No)
    })?;
    let median_of =
        |runs: &[Export], figure: fn(&Export) -> f64| median(runs.iter().map(figure).collect());
    let cpu_without = median_of(&without, |r| r.cpu_seconds_per_million_events);
    // The cores the export adds at this load, and the records it exported with them.
    let per_core = |runs: &[Export]| {
        let cpu = median_of(runs, |r| r.cpu_seconds_per_million_events);
        let events = median_of(runs, |r| r.events_per_second);
        let records = median_of(runs, |r| r.records_per_second);
        records / ((cpu - cpu_without) * events / 1e6).max(f64::EPSILON)
    };
    let per_core_gzip = per_core(&with);
    Ok(vec![
        Figure::new(
            Section::Export,
            "OTLP log records exported",
            "records/s",
            median_of(&with, |r| r.records_per_second),
        ),
        Figure::new(
            Section::Export,
            "  ingest with export",
            "events/s",
            median_of(&with, |r| r.events_per_second),
        )
        .baseline(median_of(&without, |r| r.events_per_second)),
        Figure::new(
            Section::Export,
            "  hub CPU per million events, with export",
            "CPU-s",
            median_of(&with, |r| r.cpu_seconds_per_million_events),
        )
        .baseline(cpu_without),
        Figure::new(
            Section::Export,
            "  log records per core the export costs",
            "records/s",
            per_core_gzip,
        )
        .target(">= 500000", per_core_gzip >= 500_000.0),
        Figure::new(
            Section::Export,
            "  log records per core the export costs, without gzip",
            "records/s",
            per_core(&plain),
        ),
    ])
}
