//! The HTTP port: Prometheus metrics that move as events flow, health and readiness, and the
//! same tokens as the gRPC API.

use std::time::Duration;

use bridge_proto::protocol::headers;
use bridge_proto::v1;
use bridge_tests::{
    HubOptions, HubProcess, READER_TOKEN, Recorder, WORKER_TOKEN, WorkerProcess, eventually,
    http_get, metric_sample as sample, promtool_check, run_cli, tokens_config,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_events_flow_and_health_is_served() {
    let hub = HubProcess::start();
    let scrape = || http_get(hub.http, "/metrics", &[]);
    let first = tokio::task::block_in_place(scrape);
    assert_eq!(first.status, 200, "{first:?}");
    assert!(
        first
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        first.headers
    );
    // Prometheus itself asks for OpenMetrics and gets it.
    let openmetrics = tokio::task::block_in_place(|| {
        http_get(
            hub.http,
            "/metrics",
            &[("Accept", "application/openmetrics-text; version=1.0.0")],
        )
    });
    assert!(
        openmetrics
            .headers
            .contains("content-type: application/openmetrics-text"),
        "{}",
        openmetrics.headers
    );
    assert!(
        openmetrics.body.ends_with("# EOF\n"),
        "{}",
        openmetrics.body
    );
    assert_eq!(sample(&first.body, "bridge_workers_connected"), Some(0.0));
    assert!(first.body.contains("bridge_build_info{version=\""));
    // Every sample line is `name{labels} value`, every name starts with bridge_.
    for line in first.body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        assert!(series.starts_with("bridge_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }

    let mut client = hub.client().await;
    let _tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let _worker = WorkerProcess::start(&hub.url, "m1", "metrics-pool", &["--simulate", "50"]);
    let received = "bridge_events_received_total{worker=\"m1\"}";
    let before = eventually("m1's events to be counted", WAIT, || async {
        let text = tokio::task::block_in_place(scrape).body;
        sample(&text, received).filter(|n| *n > 0.0)
    })
    .await;
    eventually("the counter to keep moving", WAIT, || async {
        let text = tokio::task::block_in_place(scrape).body;
        sample(&text, received).filter(|n| *n > before)
    })
    .await;
    let text = tokio::task::block_in_place(scrape).body;
    promtool_check(&text);
    assert_eq!(
        sample(&text, "bridge_workers_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "bridge_subscribers"), Some(1.0), "{text}");
    assert!(sample(&text, "bridge_subscriber_deliveries_total").is_some_and(|n| n > 0.0));
    // Both latency histograms saw the events: every observation in a bucket, the +Inf bucket
    // holding them all, and times that are plausible for loopback.
    for name in [
        "bridge_ingest_latency_seconds",
        "bridge_fanout_latency_seconds",
    ] {
        let count = sample(&text, &format!("{name}_count")).unwrap_or_default();
        assert!(count > 0.0, "{name} recorded nothing:\n{text}");
        let all = sample(&text, &format!("{name}_bucket{{le=\"+Inf\"}}"));
        assert_eq!(all, Some(count), "{name}");
        let sum = sample(&text, &format!("{name}_sum")).unwrap_or_default();
        assert!(sum / count < 1.0, "{name}: mean {} s", sum / count);
    }

    // A sampling change shows as a new desired version, then applied, then sampled-out drops.
    let out = run_cli(&hub.url, &["sample", "m1", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eventually("the worker to apply it and report drops", WAIT, || async {
        let text = tokio::task::block_in_place(scrape).body;
        let desired = sample(&text, "bridge_control_version_desired{worker=\"m1\"}")?;
        let applied = sample(&text, "bridge_control_version_applied{worker=\"m1\"}")?;
        let sampled_out = sample(
            &text,
            "bridge_worker_dropped_events_total{worker=\"m1\",reason=\"sampled_out\"}",
        )?;
        (desired == applied && sampled_out > 0.0).then_some(())
    })
    .await;

    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = tokio::task::block_in_place(|| http_get(hub.http, path, &[]));
        assert_eq!(
            (response.status, response.body.trim()),
            (200, body),
            "{path}"
        );
    }
    let missing = tokio::task::block_in_place(|| http_get(hub.http, "/nope", &[]));
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_reader_token_when_tokens_are_configured() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(tokens_config()),
        ..Default::default()
    });
    let get = |token: Option<&str>| {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        tokio::task::block_in_place(|| http_get(hub.http, "/metrics", &headers))
    };
    assert_eq!(get(None).status, 401);
    assert_eq!(get(Some("not-a-token-of-this-hub")).status, 401);
    let denied = get(Some(WORKER_TOKEN));
    assert_eq!(denied.status, 403);
    assert!(denied.body.contains("needs role reader"), "{}", denied.body);
    assert_eq!(get(Some(READER_TOKEN)).status, 200);
    // Probes stay open, like gRPC health.
    let health = tokio::task::block_in_place(|| http_get(hub.http, "/healthz", &[]));
    assert_eq!(health.status, 200);
}

/// `bridge_events_delivered_total` is counted where events are delivered, so it never moves
/// backwards, even scraped while a worker's events are dropped as fast as they arrive (derived
/// as received minus drops, read at different moments, it fell below zero: a panic in a debug
/// build, 1.8e19 in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_counted_where_they_are_delivered() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[control]\nenabled = false\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let (events, _controls) =
        bridge_tests::open_stream(&mut client, &[(headers::WORKER_ID, "noisy")])
            .await
            .expect("stream");
    let sender = tokio::spawn(async move {
        let event = v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            ..Default::default()
        };
        while events.send(event.clone()).await.is_ok() {}
    });
    let series = "bridge_events_delivered_total{worker=\"noisy\"}";
    let mut received = 0.0;
    let mut scrapes = 0;
    while scrapes < 500 && received < 50_000.0 {
        let addr = hub.http;
        let text = tokio::task::spawn_blocking(move || http_get(addr, "/metrics", &[]))
            .await
            .expect("scrape");
        assert_eq!(text.status, 200, "scrape {scrapes}: {}", text.body);
        if let Some(delivered) = sample(&text.body, series) {
            assert_eq!(delivered, 0.0, "scrape {scrapes}: every event is dropped");
        }
        received =
            sample(&text.body, "bridge_events_received_total{worker=\"noisy\"}").unwrap_or(0.0);
        scrapes += 1;
    }
    sender.abort();
    assert!(received > 0.0, "events flowed while scraping");
}
