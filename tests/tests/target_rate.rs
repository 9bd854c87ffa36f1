//! A target event rate (`bridge sample --target 60/s`): the hub keeps choosing a level's
//! sampling rate so that what its workers deliver approaches the goal, follows the offered
//! load, and stops when a fixed rate is set; bad goals are refused.

use std::time::{Duration, Instant};

use bridge::command::Selector;
use bridge_proto::v1;
use bridge_tests::{HubProcess, NatsServer, WorkerProcess, eventually, run_cli};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
/// How long the delivered rate may take to settle within the band (the figure).
const SETTLE: Duration = Duration::from_secs(15);
/// The window a delivered rate is measured over.
const WINDOW: Duration = Duration::from_secs(2);

/// `bridge workers --pool POOL --format json`, connected workers only.
async fn pool_workers(hub: &HubProcess, pool: &str) -> Vec<serde_json::Value> {
    let out = run_cli(&hub.url, &["workers", "--pool", pool, "--format", "json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let workers: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("json");
    workers
        .into_iter()
        .filter(|w| w["connected"].as_bool() == Some(true))
        .collect()
}

/// Events per second the pool's workers are offered, as the hub counts them arriving at rate 1.
async fn offered(hub: &HubProcess, pool: &str) -> f64 {
    pool_workers(hub, pool)
        .await
        .iter()
        .map(|w| w["events_per_second"].as_f64().unwrap_or(0.0))
        .sum()
}

/// Events delivered from the pool's workers so far.
async fn delivered(hub: &HubProcess, pool: &str) -> u64 {
    pool_workers(hub, pool)
        .await
        .iter()
        .map(|w| w["events_delivered"].as_u64().unwrap_or(0))
        .sum()
}

/// Measures the pool's delivered events per second over [`WINDOW`]s until one falls within
/// `band`; returns it, or panics with every measurement after `within`.
async fn settles(
    hub: &HubProcess,
    pool: &str,
    band: std::ops::RangeInclusive<f64>,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut last = (Instant::now(), delivered(hub, pool).await);
    loop {
        // The window is the measurement itself, not a wait for something to happen.
        tokio::time::sleep(WINDOW).await;
        let now = (Instant::now(), delivered(hub, pool).await);
        #[allow(clippy::cast_precision_loss)]
        let rate = now.1.saturating_sub(last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        seen.push(rate.round());
        if band.contains(&rate) {
            return rate;
        }
        assert!(
            Instant::now() < deadline,
            "delivered events/s never within {band:?} in {within:?}: {seen:?}; log:\n{}",
            hub.log()
        );
        last = now;
    }
}

async fn control_text(hub: &HubProcess, pool: &str) -> String {
    let out = run_cli(&hub.url, &["control", "--pool", pool]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_under_a_target_settles_near_it_follows_the_load_and_a_fixed_rate_ends_it() {
    let hub = HubProcess::start();
    // Two events a request: about 600 events/s.
    let _first = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "300"]);
    let offered_alone = eventually("gpu-1 to offer about 600 events/s", WAIT, || async {
        let offered = offered(&hub, "llama").await;
        (offered > 400.0).then_some(offered)
    })
    .await;

    let out = run_cli(&hub.url, &["sample", "--pool", "llama", "--target", "60/s"]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let shown = control_text(&hub, "llama").await;
    assert!(shown.contains("target 60/s, rate chosen"), "{shown}");

    let first = settles(&hub, "llama", 40.0..=80.0, SETTLE).await;
    let workers = pool_workers(&hub, "llama").await;
    assert_eq!(workers[0]["target_events_per_second"], 60.0, "{workers:?}");
    let rate = workers[0]["control"]["sampling_rate"].as_f64().unwrap();
    assert!(
        rate < 0.3,
        "offered {offered_alone}/s, delivering {first}/s at rate {rate}"
    );
    let out = run_cli(&hub.url, &["workers", "--pool", "llama"]).await;
    assert!(out.stdout.contains("target 60/s"), "{}", out.stdout);

    // The offered load doubles: a second worker joins the pool, at the pool's rate.
    let _second = WorkerProcess::start(&hub.url, "gpu-2", "llama", &["--simulate", "300"]);
    eventually("gpu-2 to connect", WAIT, || async {
        (pool_workers(&hub, "llama").await.len() == 2).then_some(())
    })
    .await;
    // It first delivers about twice the goal; the hub brings it back.
    settles(&hub, "llama", 40.0..=80.0, SETTLE).await;
    let lowered = pool_workers(&hub, "llama").await[0]["control"]["sampling_rate"]
        .as_f64()
        .unwrap();
    assert!(
        lowered < rate,
        "the rate went from {rate} to {lowered} for twice the load"
    );

    // A fixed rate ends the target: it stays, and nothing steers it any more.
    let out = run_cli(&hub.url, &["sample", "--pool", "llama", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shown = control_text(&hub, "llama").await;
    assert!(!shown.contains("target"), "{shown}");
    assert!(shown.contains("rate=0.5"), "{shown}");
    // Two adjustment periods (3 s each) pass: the passing of time is the condition here.
    settles(&hub, "llama", 400.0..=f64::MAX, SETTLE).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    for worker in pool_workers(&hub, "llama").await {
        assert_eq!(worker["control"]["sampling_rate"], 0.5, "{worker}");
        assert!(worker["target_events_per_second"].is_null(), "{worker}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_one_hub_steers_a_target_counting_the_workers_of_every_hub() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // hub-a steers (the smallest node name); the worker streams to hub-b, where the target is
    // set.
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    let _first = WorkerProcess::start(&b.url, "gpu-1", "llama", &["--simulate", "300"]);
    eventually("hub A to see gpu-1 offer its load", WAIT, || async {
        (offered(&a, "llama").await > 400.0).then_some(())
    })
    .await;
    let out = run_cli(&b.url, &["sample", "--pool", "llama", "--target", "60/s"]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    settles(&b, "llama", 40.0..=80.0, SETTLE).await;

    // Twice the load, half of it on the other hub.
    let _second = WorkerProcess::start(&a.url, "gpu-2", "llama", &["--simulate", "300"]);
    eventually("both workers to be listed", WAIT, || async {
        (pool_workers(&b, "llama").await.len() == 2).then_some(())
    })
    .await;
    settles(&a, "llama", 40.0..=80.0, SETTLE).await;
    for hub in [&a, &b] {
        let shown = control_text(hub, "llama").await;
        assert!(shown.contains("target 60/s, rate chosen"), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_fixed_rate_suspends_a_workers_target_until_it_reverts() {
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "50"]);
    let show = || async {
        let out = run_cli(&hub.url, &["control", "gpu-1"]).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.stdout
    };
    eventually("gpu-1 to connect", WAIT, || async {
        (pool_workers(&hub, "llama").await.len() == 1).then_some(())
    })
    .await;
    let out = run_cli(&hub.url, &["sample", "gpu-1", "--target", "600/m"]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let shown = show().await;
    assert!(shown.contains("target 10/s, rate chosen"), "{shown}");

    let out = run_cli(&hub.url, &["sample", "gpu-1", "0.9", "--for", "2s"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shown = show().await;
    assert!(shown.contains("rate=0.9"), "{shown}");
    assert!(shown.contains("target reverts in"), "{shown}");
    assert!(shown.contains("to 10/s"), "{shown}");
    // When the timed rate reverts, the target is back, steering again.
    eventually("the target to come back", WAIT, || async {
        show()
            .await
            .contains("target 10/s, rate chosen")
            .then_some(())
    })
    .await;
    let out = run_cli(&hub.url, &["sample", "gpu-1", "0.3"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shown = show().await;
    assert!(!shown.contains("target"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_are_refused_in_one_line() {
    let hub = HubProcess::start();
    for bad in ["0", "-5/s", "fast", "10/h", "1e10/s"] {
        let out = run_cli(&hub.url, &["sample", "--pool", "llama", "--target", bad]).await;
        assert_eq!(out.code, Some(2), "{bad}: {}{}", out.stdout, out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{bad}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("must be a number of events above 0"),
            "{bad}: {}",
            out.stderr
        );
    }
    for (args, says) in [
        (
            &[
                "sample", "--pool", "llama", "--target", "60/s", "--for", "1m",
            ][..],
            "a target rate cannot be timed",
        ),
        (
            &["sample", "--pool", "llama", "0.5", "--target", "60/s"][..],
            "--target replaces the RATE",
        ),
    ] {
        let out = run_cli(&hub.url, args).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    let out = run_cli(
        &hub.url,
        &[
            "sample",
            "--pool",
            "llama",
            "--target",
            "60/s",
            "--pattern",
            "a.*",
        ],
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);

    let mut client = hub.client().await;
    let pool = || Some(v1::Selector::from(&Selector::Pool("llama".into())));
    for (events_per_second, for_ms) in
        [(0.0, 0), (-5.0, 0), (f64::NAN, 0), (2e9, 0), (60.0, 60_000)]
    {
        let status = client
            .raw()
            .update_control(v1::UpdateControlRequest {
                selector: pool(),
                change: Some(v1::update_control_request::Change::Target(v1::TargetRate {
                    events_per_second,
                })),
                wait_ms: 0,
                for_ms,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // Nothing was set.
    let shown = control_text(&hub, "llama").await;
    assert!(!shown.contains("target"), "{shown}");
}
