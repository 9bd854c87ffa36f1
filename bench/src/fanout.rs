//! Fan-out: deliveries per second to 1, 10 and 100 subscribers matching every event, and to
//! 100 matching 1 % each, at the highest event rate the server sustains without dropping any;
//! and the server's CPU per delivery at fixed delivery rates both servers sustain. The hub is
//! also measured with its subscriptions asking for a linger, and (for the costs) with its
//! connections on one thread of their own.

use std::time::{Duration, Instant};

use crate::{
    Plan, Section,
    process::{RoleProcess, Server, ServerProcess, load, load_buckets, number, subscribers_of},
    repeat,
    report::{Figure, median},
};

pub(crate) struct Fanout {
    pub(crate) deliveries_per_second: f64,
    pub(crate) dropped: f64,
    pub(crate) events_per_second: f64,
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
    linger_ms: u32,
) -> Result<Fanout, String> {
    let server = ServerProcess::start(plan, kind)?;
    probe_fanout(plan, &server.url, &server.url, count, buckets, linger_ms)
}

/// [`measure_fanout`] with the load sent to `load_url` and the subscribers on `subs_url`.
pub(crate) fn probe_fanout(
    plan: &Plan,
    load_url: &str,
    subs_url: &str,
    count: usize,
    buckets: bool,
    linger_ms: u32,
) -> Result<Fanout, String> {
    let mut subs = subscribers_of(subs_url, count, buckets, false, &[], linger_ms)?;
    let deliveries_per_event = if buckets { 1.0 } else { count as f64 };
    let mut rate = (100_000.0 / deliveries_per_event).max(1000.0);
    let mut load = if buckets {
        load_buckets(load_url, 4, Some(rate))?
    } else {
        load(load_url, 4, Some(rate))?
    };
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
        // A window can deliver more than was offered in it: events of the faster probes before
        // it, which waited in queues and socket buffers (megabytes, at 100 subscribers). Those
        // are no rate the server sustains, and counting them ranked two servers that held the
        // same rate by the backlog each had left.
        deliveries_per_second: delivered.min(rate * deliveries_per_event),
        dropped,
        events_per_second: rate,
    })
}

/// Subscribers, and the events per second sent to them, for the fixed-load cost figures: rates
/// both servers sustain on a 2-core machine shared with the load and the subscribers.
const COST_LOADS: [(usize, f64); 3] = [(1, 200_000.0), (10, 50_000.0), (100, 6_000.0)];

/// What a server spends per delivery at a fixed load.
struct Cost {
    cpu_seconds_per_million: f64,
    dropped: f64,
}

/// The hub's other layout, measured beside the default one: every connection on one thread of
/// its own (cheaper per delivery at a steady load, capped at one core).
const ONE_CONNECTION_THREAD: &str = "[hub]\nconnection_threads = 1\n";

/// The latency budget the hub's subscriptions ask for in the rows measured with one
/// (`SubscribeRequest.linger_ms`): fewer, larger writes, which the baseline cannot offer.
const LINGER_MS: u32 = 1;

/// The server's CPU per million deliveries to `count` subscribers matching every event, with
/// `rate` events per second offered, over one window after the warm-up; a hub with `config`.
///
/// Steadier than the probe of [`probe_fanout`]: the probe's limit is reached when hub,
/// generator and subscribers saturate the two cores together, so it moves with scheduling,
/// while the cost of a delivery at a load all of them sustain moves much less.
fn measure_cost(
    plan: &Plan,
    kind: Server,
    config: Option<&str>,
    count: usize,
    rate: f64,
    linger_ms: u32,
) -> Result<Cost, String> {
    let server = ServerProcess::start_with(plan, kind, config)?;
    let mut subs = subscribers_of(&server.url, count, false, false, &[], linger_ms)?;
    let _load = load(&server.url, 4, Some(rate))?;
    std::thread::sleep(plan.warmup);
    let (first, cpu0) = (subs.mark()?, server.stat()?.cpu_seconds);
    std::thread::sleep(plan.window);
    let (last, cpu1) = (subs.mark()?, server.stat()?.cpu_seconds);
    let delivered = number(&last, "deliveries")? - number(&first, "deliveries")?;
    Ok(Cost {
        cpu_seconds_per_million: (cpu1 - cpu0) / delivered.max(1.0) * 1e6,
        dropped: number(&last, "lagged")? - number(&first, "lagged")?,
    })
}

/// The fixed-load cost figures, hub and baseline measured in alternation, run by run, so that
/// a change in the machine's load falls on both.
fn costs(plan: &Plan) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    for (count, rate) in COST_LOADS {
        let label = format!(
            "fan-out cost, {count} subscribers at {} deliveries/s",
            rate * count as f64
        );
        let (mut hub, mut one_thread, mut lingering, mut base) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in repeat(plan, &label, || {
            Ok((
                measure_cost(plan, Server::Hub, None, count, rate, 0)?,
                measure_cost(
                    plan,
                    Server::Hub,
                    Some(ONE_CONNECTION_THREAD),
                    count,
                    rate,
                    0,
                )?,
                measure_cost(plan, Server::Hub, None, count, rate, LINGER_MS)?,
                measure_cost(plan, Server::Baseline, None, count, rate, 0)?,
            ))
        })? {
            hub.push(run.0);
            one_thread.push(run.1);
            lingering.push(run.2);
            base.push(run.3);
        }
        let per_million =
            |costs: &[Cost]| median(costs.iter().map(|c| c.cpu_seconds_per_million).collect());
        let dropped = |costs: &[Cost]| median(costs.iter().map(|c| c.dropped).collect());
        let unit = "CPU-s per million deliveries";
        figures.extend([
            Figure::new(Section::Fanout, label, unit, per_million(&hub))
                .baseline(per_million(&base)),
            Figure::new(
                Section::Fanout,
                "  dropped in the window",
                "events",
                dropped(&hub),
            )
            .baseline(dropped(&base)),
            Figure::new(
                Section::Fanout,
                "  with hub.connection_threads = 1",
                unit,
                per_million(&one_thread),
            )
            .baseline(per_million(&base)),
            Figure::new(
                Section::Fanout,
                "    dropped in the window",
                "events",
                dropped(&one_thread),
            )
            .baseline(dropped(&base)),
            Figure::new(
                Section::Fanout,
                format!("  with subscriptions lingering {LINGER_MS} ms"),
                unit,
                per_million(&lingering),
            )
            .baseline(per_million(&base)),
            Figure::new(
                Section::Fanout,
                "    dropped in the window",
                "events",
                dropped(&lingering),
            )
            .baseline(dropped(&base)),
        ]);
    }
    Ok(figures)
}

pub(crate) fn fanout(plan: &Plan) -> Result<Vec<Figure>, String> {
    let mut figures = costs(plan)?;
    for (count, buckets) in [(1, false), (10, false), (100, false), (100, true)] {
        let label = if buckets {
            format!("fan-out, {count} subscribers matching 1 % each")
        } else {
            format!("fan-out, {count} subscribers matching all")
        };
        // Run by run, hub (also with lingering subscriptions where each matches all) and
        // baseline in turn, so that a change in the machine's load falls on all of them.
        let (mut hub, mut lingering, mut base) = (Vec::new(), Vec::new(), Vec::new());
        for run in repeat(plan, &label, || {
            Ok((
                measure_fanout(plan, Server::Hub, count, buckets, 0)?,
                (!buckets)
                    .then(|| measure_fanout(plan, Server::Hub, count, buckets, LINGER_MS))
                    .transpose()?,
                measure_fanout(plan, Server::Baseline, count, buckets, 0)?,
            ))
        })? {
            hub.push(run.0);
            lingering.extend(run.1);
            base.push(run.2);
        }
        let rate = median(hub.iter().map(|r| r.deliveries_per_second).collect());
        let dropped = median(hub.iter().map(|r| r.dropped).collect());
        let base_rate = median(base.iter().map(|r| r.deliveries_per_second).collect());
        let mut figure =
            Figure::new(Section::Fanout, label.clone(), "deliveries/s", rate).baseline(base_rate);
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
        if !lingering.is_empty() {
            figures.extend([
                Figure::new(
                    Section::Fanout,
                    format!("  with subscriptions lingering {LINGER_MS} ms"),
                    "deliveries/s",
                    median(lingering.iter().map(|r| r.deliveries_per_second).collect()),
                )
                .baseline(base_rate),
                Figure::new(
                    Section::Fanout,
                    "    dropped in the measured window",
                    "events",
                    median(lingering.iter().map(|r| r.dropped).collect()),
                ),
            ]);
        }
    }
    Ok(figures)
}
