//! The network misbehaves between a sidecar and its hub (delay, partition, reset, cut): the
//! sidecar notices within its keepalive bounds, reconnects, replays, and every event the app
//! wrote is accounted for exactly once.

use std::{collections::BTreeSet, time::Duration};

use bridge_proto::protocol::{counters, hub_drops};
use bridge_proto::{
    sampling::{Rate, SamplingKey},
    v1,
};
use bridge_tests::{
    HubProcess, Proxy, ProxyMode, Recorder, WorkerProcess, eventually, int, name, run_cli,
    sequence, worker_info,
};

const WAIT: Duration = Duration::from_secs(30);
const TICKS: i64 = 3000;

/// 3,000 `load.tick` events with correlation ids, and a `debug.trace` every 10th, over ~6 s.
const APP: &str = r#"
import json, sys, time
for i in range(3000):
    print("TELEMETRY:" + json.dumps({"event": "load.tick", "measurements": {"i": i}, "correlation_id": "req-%d" % i}), file=sys.stderr, flush=True)
    if i % 10 == 0:
        print('TELEMETRY:{"event": "debug.trace"}', file=sys.stderr, flush=True)
    time.sleep(0.002)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_partitions_and_resets_lose_and_duplicate_nothing() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    // Sampling and a filter, so the accounting covers every outcome.
    for args in [
        &["sample", "--pool", "faulty", "0.5", "--pattern", "load.*"][..],
        &["filter", "--pool", "faulty", "--block", "debug.>"],
    ] {
        let out = run_cli(&hub.url, args).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }
    let proxy = Proxy::start(hub.addr, true).await.expect("proxy");
    let python = std::env::var("BRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut worker = WorkerProcess::spawn(
        WorkerProcess::command(
            &proxy.url(),
            "flaky",
            "faulty",
            "[worker]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\nstats_interval_ms = 100\nkeepalive_interval_ms = 200\nkeepalive_timeout_ms = 300\nlinger_ms = 5\n",
            &["--", &python, "-c", APP],
        ),
        true,
    );
    let ticks_seen = || {
        tail.deliveries()
            .iter()
            .filter(|d| name(d) == "load.tick")
            .count()
    };
    let more_ticks = |what: &'static str| {
        let target = ticks_seen() + 150;
        eventually(what, WAIT, move || async move {
            (ticks_seen() >= target).then_some(())
        })
    };
    let link_downs = || worker.log().matches("telemetry link down").count();

    more_ticks("events to flow").await;
    proxy.set(ProxyMode::Delay(Duration::from_millis(30)));
    more_ticks("events to flow through a slow network").await;

    // A partition: the connection stays up but nothing moves. Keepalive must notice it.
    let downs = link_downs();
    proxy.set(ProxyMode::Blackhole);
    let started = std::time::Instant::now();
    eventually("the sidecar to notice the partition", WAIT, || async {
        (link_downs() > downs).then_some(())
    })
    .await;
    let noticed = started.elapsed();
    assert!(
        noticed < Duration::from_millis(1500),
        "noticed after {noticed:?}; keepalive allows 200 + 300 ms"
    );
    proxy.open();
    more_ticks("events to flow after the partition").await;

    let downs = link_downs();
    proxy.reset();
    eventually("the sidecar to notice the reset", WAIT, || async {
        (link_downs() > downs).then_some(())
    })
    .await;
    more_ticks("events to flow after the reset").await;

    let downs = link_downs();
    proxy.close();
    eventually("the sidecar to notice the cut", WAIT, || async {
        (link_downs() > downs).then_some(())
    })
    .await;
    proxy.open();

    let status = tokio::task::block_in_place(|| worker.wait(Duration::from_secs(60)));
    assert_eq!(status.code(), Some(0), "{}", worker.log());

    // Exactly the ticks the sampler keeps arrived, each once.
    let rate = Rate::new(0.5).expect("rate");
    let expected: BTreeSet<i64> = (0..TICKS)
        .filter(|i| rate.keep(SamplingKey::correlation(&format!("req-{i}"))))
        .collect();
    let deliveries: Vec<v1::EventDelivery> = tail
        .deliveries()
        .into_iter()
        .filter(|d| d.worker_id == "flaky" && sequence(d) > 0)
        .collect();
    let ticks: Vec<i64> = deliveries
        .iter()
        .filter(|d| name(d) == "load.tick")
        .filter_map(|d| int(d, "i"))
        .collect();
    let unique: BTreeSet<i64> = ticks.iter().copied().collect();
    assert_eq!(unique.len(), ticks.len(), "a tick was delivered twice");
    assert_eq!(
        unique, expected,
        "delivered ticks differ from the sampler's choice"
    );
    assert!(deliveries.iter().all(|d| !name(d).starts_with("debug.")));

    // And the books balance, per the worker's and the hub's counters.
    let info = worker_info(&mut client, "flaky").await.expect("flaky");
    let worker_count = |key: &str| info.worker_counters.get(key).copied().unwrap_or(0);
    let hub_drop = |key: &str| info.hub_drops.get(key).copied().unwrap_or(0);
    let sequences: BTreeSet<u64> = deliveries.iter().map(sequence).collect();
    assert_eq!(sequences.len(), deliveries.len(), "a sequence number twice");
    let delivered = deliveries.len() as u64;
    let hub_dropped: u64 = info
        .hub_drops
        .iter()
        .filter(|(reason, _)| *reason != hub_drops::DUPLICATE)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        worker_count(counters::CONFIRMED),
        info.events_received - hub_drop(hub_drops::DUPLICATE),
        "the hub confirmed exactly what it received once: {info:?}"
    );
    assert_eq!(worker_count(counters::BUFFERED), 0, "{info:?}");
    assert_eq!(
        worker_count(counters::ACCEPTED),
        delivered + hub_dropped + worker_count(counters::DROPPED_BUFFER_FULL),
        "accepted = delivered + dropped at the hub + dropped from the buffer: {info:?}"
    );
    assert_eq!(
        worker_count(counters::FILTERED) + hub_drop(hub_drops::FILTERED),
        (TICKS as u64).div_ceil(10),
        "every debug.trace was filtered once: {info:?}"
    );
    assert!(worker_count(counters::REPLAYED) > 0, "{info:?}");
    assert_eq!(info.missing_events, 0, "{info:?}");
}
