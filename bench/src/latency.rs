//! Latency: emit -> subscriber percentiles at fractions of the hub's maximum ingest rate and at
//! two fixed delivery rates, from an open-loop generator that stamps each event with the time
//! it was due (so that no delay, the generator's own included, is omitted).

use std::time::Instant;

use crate::{
    Plan, Section,
    process::{Server, ServerProcess, load, number, subscribers},
    repeat,
    report::{Figure, median},
};

pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) delivered_per_second: f64,
}

fn measure_latency(plan: &Plan, kind: Server, rate: f64) -> Result<Latency, String> {
    let server = ServerProcess::start(plan, kind)?;
    probe_latency(plan, &server.url, &server.url, rate)
}

/// [`measure_latency`] with the load sent to `load_url` and the subscriber on `subs_url`.
pub(crate) fn probe_latency(
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

pub(crate) fn latency(plan: &Plan, max_ingest: f64) -> Result<Vec<Figure>, String> {
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
