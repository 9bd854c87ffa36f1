//! `--soak MINUTES`: everything at once, for a long time. Worker-library workers
//! stream through a fault-injecting proxy (delays, partitions, resets, cuts) while operators
//! change their sampling, filters and toggles and a subscriber reads everything. The hub runs
//! as its own process; its memory is sampled throughout. At the end every worker's books must
//! balance exactly: each event emitted was delivered to the subscriber once, or counted as
//! sampled out, filtered, disabled or dropped (by reason) at the worker or the hub.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{pattern::Pattern, sampling::Rate, v1};
use worker::{Link, LinkOptions, Value, counters::Snapshot};

use crate::{
    Plan, Section,
    fault_proxy::{Mode, Proxy},
    process::{Server, ServerProcess},
    progress,
    report::Figure,
};

const WORKERS: usize = 50;
/// Events per second per worker.
const RATE: f64 = 100.0;
const POOLS: [&str; 2] = ["soak-a", "soak-b"];

/// Per worker: events emitted, and events the subscriber received.
#[derive(Default)]
struct Books {
    emitted: Vec<AtomicU64>,
    delivered: Mutex<HashMap<String, u64>>,
    lagged: AtomicU64,
}

pub(crate) async fn soak(plan: &Plan, minutes: f64) -> Result<Vec<Figure>, String> {
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let hub = ServerProcess::start(plan, Server::Hub)?;
    let hub_addr: SocketAddr = hub
        .url
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("hub address: {e}"))?;
    let proxy = Arc::new(
        Proxy::start(hub_addr, true)
            .await
            .map_err(|e| e.to_string())?,
    );
    let mut client = HubClient::connect(&hub.url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let books = Arc::new(Books {
        emitted: (0..WORKERS).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let reader = tokio::spawn(read_all(client.clone(), books.clone()));

    let mut links = Vec::with_capacity(WORKERS);
    for k in 0..WORKERS {
        let mut options = LinkOptions::new(format!("http://{}", proxy.addr), format!("soak-{k}"));
        options.pool = POOLS[k % POOLS.len()].into();
        options.keepalive_interval = Duration::from_secs(1);
        options.keepalive_timeout = Duration::from_secs(1);
        options.backoff_max = Duration::from_secs(1);
        links.push(Link::start(options).map_err(|e| e.to_string())?);
    }
    let running = Arc::new(AtomicBool::new(true));
    let emitters: Vec<_> = links
        .iter()
        .enumerate()
        .map(|(k, link)| tokio::spawn(emit(k, link.emitter(), books.clone(), running.clone())))
        .collect();
    let operator = tokio::spawn(operate(client.clone(), running.clone()));
    let network = tokio::spawn(misbehave(proxy.clone(), running.clone()));

    // Memory once things have settled (a tenth of the run, at most a minute), then at the end.
    let settle = (duration / 10).min(Duration::from_secs(60));
    let started = Instant::now();
    tokio::time::sleep(settle).await;
    let rss_early = hub.stat()?.rss_bytes;
    let mut peak = rss_early;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(5).min(duration.saturating_sub(started.elapsed())))
            .await;
        peak = peak.max(hub.stat()?.rss_bytes);
        progress(&format!(
            "soak: {:.0} s of {:.0} s, hub RSS {:.1} MiB",
            started.elapsed().as_secs_f64(),
            duration.as_secs_f64(),
            hub.stat()?.rss_bytes as f64 / 1048576.0
        ));
    }
    let rss_late = hub.stat()?.rss_bytes;

    running.store(false, Relaxed);
    for task in emitters {
        let _ = task.await;
    }
    let _ = (operator.await, network.await);
    proxy.open();
    let mut finals: Vec<Snapshot> = Vec::with_capacity(WORKERS);
    for link in links {
        finals.push(link.close(Duration::from_secs(30)).await);
    }
    let unbalanced = settle_books(&mut client, &books, &finals).await?;
    reader.abort();

    let emitted: u64 = books.emitted.iter().map(|e| e.load(Relaxed)).sum();
    let delivered: u64 = books
        .delivered
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    let drift = (mib(rss_late) - mib(rss_early)) / mib(rss_early);
    Ok(vec![
        Figure::new(
            Section::Soak,
            "soak: events emitted",
            "events",
            emitted as f64,
        ),
        Figure::new(
            Section::Soak,
            "soak: events delivered to the subscriber",
            "events",
            delivered as f64,
        ),
        Figure::new(
            Section::Soak,
            format!("soak: workers whose books do not balance (of {WORKERS})"),
            "workers",
            unbalanced.len() as f64,
        )
        .target("0", unbalanced.is_empty()),
        Figure::new(
            Section::Soak,
            "soak: hub RSS after settling",
            "MiB",
            mib(rss_early),
        ),
        Figure::new(
            Section::Soak,
            "soak: hub RSS at the end",
            "MiB",
            mib(rss_late),
        )
        .baseline(mib(rss_early))
        .target("within 10 % of after settling", drift.abs() <= 0.10),
        Figure::new(Section::Soak, "soak: hub RSS, peak", "MiB", mib(peak)),
    ])
}

/// Emits at [`RATE`] with a distinct correlation id per event, and a debug event every tenth.
async fn emit(k: usize, emitter: worker::Emitter, books: Arc<Books>, running: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    while running.load(Relaxed) {
        tick.tick().await;
        i += 1;
        let id = format!("req-{k}-{i}");
        let name = if i.is_multiple_of(10) {
            "soak.debug"
        } else {
            "soak.request"
        };
        emitter.emit(
            name,
            &[("i", Value::from(i))],
            &[("model", "llama-3-8b")],
            Some(&id),
        );
        books.emitted[k].fetch_add(1, Relaxed);
    }
}

/// Counts every delivery per worker, reconnecting if the subscription ends.
async fn read_all(mut client: HubClient, books: Arc<Books>) {
    loop {
        let request = v1::SubscribeRequest {
            patterns: vec!["soak.>".into()],
            ..Default::default()
        };
        let Ok(mut stream) = client.subscribe(request).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Ok(Some(response)) = stream.message().await {
            match response.item {
                Some(v1::subscribe_response::Item::Event(delivery)) => {
                    *books
                        .delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(delivery.worker_id)
                        .or_default() += 1;
                }
                Some(v1::subscribe_response::Item::Lagged(lag)) => {
                    books.lagged.fetch_add(lag.skipped, Relaxed);
                }
                None => {}
            }
        }
    }
}

/// An operator changing things every couple of seconds, through the same admin path as the CLI.
async fn operate(mut client: HubClient, running: Arc<AtomicBool>) {
    let pattern = |p: &str| Pattern::parse(p).map(|p| vec![p]).unwrap_or_default();
    let rate = |r: f64| Rate::new(r).unwrap_or(Rate::ALL);
    let steps = [
        (
            Selector::Pool(POOLS[0].into()),
            Change::Sampling {
                rate: rate(0.5),
                patterns: pattern("soak.*"),
            },
        ),
        (
            Selector::Pool(POOLS[1].into()),
            Change::Filter {
                allow: vec![],
                block: pattern("soak.debug"),
            },
        ),
        (Selector::Worker("soak-7".into()), Change::Toggle(false)),
        (
            Selector::All,
            Change::Sampling {
                rate: rate(0.8),
                patterns: vec![],
            },
        ),
        (Selector::Worker("soak-7".into()), Change::Toggle(true)),
        (Selector::Pool(POOLS[0].into()), Change::Reset),
        (Selector::All, Change::Reset),
    ];
    let mut next = 0;
    while running.load(Relaxed) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (selector, change) = &steps[next % steps.len()];
        next += 1;
        // Refusals (a worker not connected at that moment) are part of the game.
        let _ = client
            .update_control(selector, change, Duration::ZERO)
            .await;
    }
}

/// The network between workers and hub: a cycle of delay, partition, reset and cut.
async fn misbehave(proxy: Arc<Proxy>, running: Arc<AtomicBool>) {
    let phases: [(&str, Duration); 6] = [
        ("forward", Duration::from_secs(4)),
        ("delay", Duration::from_secs(3)),
        ("blackhole", Duration::from_secs(2)),
        ("forward", Duration::from_secs(3)),
        ("reset", Duration::from_secs(3)),
        ("cut", Duration::from_secs(1)),
    ];
    for (phase, length) in phases.iter().cycle() {
        if !running.load(Relaxed) {
            break;
        }
        match *phase {
            "delay" => proxy.set(Mode::Delay(Duration::from_millis(20))),
            "blackhole" => proxy.set(Mode::Blackhole),
            "reset" => {
                proxy.open();
                proxy.reset();
            }
            "cut" => proxy.close(),
            _ => proxy.open(),
        }
        tokio::time::sleep(*length).await;
    }
    proxy.open();
}

/// Waits for the hub's and the subscriber's figures to settle, then returns the workers whose
/// books do not balance, with the reason.
async fn settle_books(
    client: &mut HubClient,
    books: &Books,
    finals: &[Snapshot],
) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let workers = client.list_workers(None).await.map_err(|e| e.to_string())?;
        let by_id: HashMap<&str, &v1::WorkerInfo> =
            workers.iter().map(|w| (w.id.as_str(), w)).collect();
        let delivered = books
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lagged = books.lagged.load(Relaxed);
        let mut unbalanced = Vec::new();
        for (k, counters) in finals.iter().enumerate() {
            let id = format!("soak-{k}");
            let Some(info) = by_id.get(id.as_str()) else {
                unbalanced.push(format!("{id}: unknown to the hub"));
                continue;
            };
            let hub_dropped: u64 = info
                .hub_drops
                .iter()
                .filter(|(reason, _)| *reason != "duplicate")
                .map(|(_, n)| n)
                .sum();
            let got = delivered.get(&id).copied().unwrap_or(0);
            let emitted = books.emitted[k].load(Relaxed);
            let accounted = got
                + hub_dropped
                + counters.sampled_out
                + counters.filtered
                + counters.disabled
                + counters.dropped_buffer_full
                + counters.dropped_invalid_name
                + counters.dropped_parse_error
                + counters.dropped_line_too_long
                + counters.buffered();
            if emitted != counters.produced() || emitted != accounted {
                unbalanced.push(format!(
                    "{id}: emitted {emitted}, produced {}, delivered {got} + hub drops {hub_dropped} + worker {counters:?} = {accounted}",
                    counters.produced()
                ));
            }
        }
        if unbalanced.is_empty() || Instant::now() > deadline {
            if lagged > 0 {
                unbalanced.push(format!("the subscriber lagged by {lagged} events"));
            }
            for line in &unbalanced {
                progress(&format!("soak: unbalanced: {line}"));
            }
            return Ok(unbalanced);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
