//! Events from real worker processes reach real subscribers, filtered on the hub.

use std::time::Duration;

use bridge_proto::protocol::{events, headers, inference};
use bridge_proto::v1::{self, subscribe_response::Item};
use bridge_tests::{
    HubOptions, HubProcess, Recorder, WorkerProcess, eventually, http_get, matching, name,
    open_stream, run_cli,
};
use worker::{Link, LinkOptions, LinkState, Value};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_subscribers_with_different_filters() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let lifecycle = Recorder::start(&mut client, matching(&["bridge.worker.>"])).await;
    let stops = Recorder::start(&mut client, matching(&["inference.stop"])).await;
    let only_a = Recorder::start(
        &mut client,
        v1::SubscribeRequest {
            worker_ids: vec!["gpu-a".into()],
            ..Default::default()
        },
    )
    .await;
    let pool_b = Recorder::start(
        &mut client,
        v1::SubscribeRequest {
            patterns: vec!["inference.*".into()],
            pool: "mistral".into(),
            ..Default::default()
        },
    )
    .await;

    let a = WorkerProcess::start(&hub.url, "gpu-a", "llama", &["--simulate", "200"]);
    let b = WorkerProcess::start(&hub.url, "gpu-b", "mistral", &["--simulate", "200"]);

    for tail in [&stops, &only_a, &pool_b] {
        eventually("every subscriber to receive events", WAIT, || async {
            (tail.deliveries().len() >= 50).then_some(())
        })
        .await;
    }
    let stops = stops.deliveries();
    assert!(stops.iter().all(|d| name(d) == "inference.stop"));
    assert!(
        stops.iter().any(|d| d.worker_id == "gpu-a")
            && stops.iter().any(|d| d.worker_id == "gpu-b")
    );

    let only_a = only_a.deliveries();
    assert!(
        only_a
            .iter()
            .all(|d| d.worker_id == "gpu-a" && d.pool == "llama")
    );
    assert!(only_a.iter().any(|d| name(d) == "inference.start"));

    let pool_b = pool_b.deliveries();
    assert!(
        pool_b
            .iter()
            .all(|d| d.pool == "mistral" && d.worker_id == "gpu-b")
    );
    assert!(pool_b.iter().all(|d| name(d).starts_with("inference.")));
    assert!(
        pool_b
            .iter()
            .all(|d| d.sampling_rate == 1.0 && d.received_ns > 0)
    );

    drop(a);
    eventually("gpu-a's disconnect to be announced", WAIT, || async {
        lifecycle
            .deliveries()
            .iter()
            .any(|d| d.worker_id == "gpu-a" && name(d) == events::WORKER_DISCONNECTED.join("."))
            .then_some(())
    })
    .await;
    let events = lifecycle.deliveries();
    let connected: Vec<_> = events
        .iter()
        .filter(|d| name(d) == events::WORKER_CONNECTED.join("."))
        .collect();
    assert_eq!(connected.len(), 2, "{events:?}");
    let a_connected = connected
        .iter()
        .find(|d| d.worker_id == "gpu-a")
        .expect("gpu-a connected");
    let metadata = &a_connected.event.as_ref().expect("event").metadata;
    assert_eq!(metadata["pool"], "llama");
    assert_eq!(metadata["acknowledges"], "true");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tail_prints_json_lines_and_stops_after_the_limit() {
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(&hub.url, "gpu-7", "llama", &["--simulate", "100"]);
    let out = run_cli(
        &hub.url,
        &[
            "subscribe",
            "inference.>",
            "--worker",
            "gpu-7",
            "--format",
            "json",
            "--limit",
            "5",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 5);
    for line in &lines {
        assert_eq!(line["type"], "event");
        assert_eq!(line["worker_id"], "gpu-7");
        assert_eq!(line["pool"], "llama");
        assert!(
            [inference::START, inference::STOP, inference::EXCEPTION]
                .contains(&line["event"].as_str().expect("event"))
        );
        assert!(line["timestamp_ns"].as_i64().expect("timestamp") > 0);
        assert!(!line["correlation_id"].as_str().expect("cid").is_empty());
        assert_eq!(line["metadata"][inference::MODEL], "llama-3-8b");
        assert!(
            line["measurements"][inference::SYSTEM_TIME_NS].is_i64(),
            "ints stay ints: {line}"
        );
    }
    let end = lines.iter().find(|l| l["event"] != inference::START);
    if let Some(end) = end {
        assert!(
            end["measurements"][inference::BATCH_FILL_RATIO].is_f64(),
            "floats stay numbers: {end}"
        );
    }
}

/// A subscriber that stops reading is told how much it missed; one that keeps reading gets
/// every event, in order, without a single lag notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_gets_a_lag_notice_while_a_fast_one_keeps_up() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[hub]\nsubscriber_queue = 64\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let request = matching(&["load.>"]);
    let fast = Recorder::start(&mut client, request.clone()).await;

    // The slow subscriber's connection has the smallest HTTP/2 window, so that it is the
    // hub's queue, not the transport, that fills up while it does not read.
    let channel = tonic::transport::Endpoint::from_shared(hub.url.clone())
        .expect("url")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .expect("connect");
    let mut slow_client = v1::telemetry_bridge_client::TelemetryBridgeClient::new(channel);
    let mut slow = slow_client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();

    let link = Link::start(LinkOptions::new(hub.url.clone(), "loader")).expect("link");
    let mut state = link.state();
    state
        .wait_for(|s| matches!(s, LinkState::Connected { applied: Some(_) }))
        .await
        .expect("connected");
    let emitter = link.emitter();
    // In steps smaller than the hub's subscriber queue, each step waiting for the fast
    // subscriber: it keeps up by construction, while the slow one reads nothing at all.
    const TOTAL: i64 = 6_000;
    const STEP: i64 = 50;
    for step in 0..TOTAL / STEP {
        for i in step * STEP..(step + 1) * STEP {
            emitter.emit("load.tick", &[("seq", Value::Int(i))], &[], None);
        }
        eventually("the fast subscriber to keep up", WAIT, || async {
            (fast.deliveries().len() as i64 >= (step + 1) * STEP).then_some(())
        })
        .await;
    }
    eventually(
        "the fast subscriber to receive every event",
        WAIT,
        || async { (fast.deliveries().len() as i64 >= TOTAL).then_some(()) },
    )
    .await;
    let seqs: Vec<i64> = fast
        .deliveries()
        .iter()
        .map(|d| {
            match d
                .event
                .as_ref()
                .and_then(|e| e.measurements["seq"].value.clone())
            {
                Some(v1::telemetry_value::Value::IntValue(v)) => v,
                other => panic!("seq: {other:?}"),
            }
        })
        .collect();
    assert_eq!(
        seqs,
        (0..TOTAL).collect::<Vec<_>>(),
        "fast subscriber: all events, in order"
    );
    assert!(
        fast.items().iter().all(|i| matches!(i, Item::Event(_))),
        "fast subscriber never lagged"
    );

    let (mut received, mut skipped) = (0i64, 0i64);
    while received + skipped < TOTAL {
        let item = tokio::time::timeout(WAIT, slow.message())
            .await
            .expect("slow subscriber keeps receiving")
            .expect("stream ok")
            .expect("stream open")
            .item;
        match item {
            Some(Item::Event(_)) => received += 1,
            Some(Item::Lagged(lag)) => skipped += lag.skipped as i64,
            None => {}
        }
    }
    assert!(skipped > 0, "the stalled subscriber was told it lagged");
    assert_eq!(
        received + skipped,
        TOTAL,
        "every event is either delivered or counted"
    );
    link.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_with_the_same_id_replaces_the_first() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    // The first stream is a bare client, so that nothing reconnects it once it is replaced.
    let (_events, mut first) = open_stream(&mut client, &[(headers::WORKER_ID, "twin")])
        .await
        .expect("first stream opens");
    eventually("the first twin to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            bridge_tests::worker_info(&mut client, "twin")
                .await
                .filter(|w| w.connected)
        }
    })
    .await;
    let lifecycle = Recorder::start(&mut client, matching(&["bridge.worker.>"])).await;

    let _second = WorkerProcess::start(&hub.url, "twin", "other-pool", &[]);
    let status = loop {
        match tokio::time::timeout(WAIT, first.message())
            .await
            .expect("first stream ends")
        {
            Ok(Some(_control)) => continue,
            Ok(None) => panic!("the replaced stream must end with a status, not silently"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("replaced"),
        "{}",
        status.message()
    );

    eventually("the replacement to be announced", WAIT, || async {
        let events = lifecycle.deliveries();
        let replaced = events.iter().any(|d| {
            name(d) == events::WORKER_DISCONNECTED.join(".")
                && d.event
                    .as_ref()
                    .is_some_and(|e| e.metadata["reason"].contains("replaced"))
        });
        let reconnected = events
            .iter()
            .any(|d| name(d) == events::WORKER_CONNECTED.join(".") && d.pool == "other-pool");
        (replaced && reconnected).then_some(())
    })
    .await;
    drop(first);
    let info = bridge_tests::worker_info(&mut client, "twin")
        .await
        .expect("twin");
    assert!(
        info.connected,
        "the replaced stream ending does not disconnect the worker"
    );
    assert_eq!(info.pool, "other-pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_threads_carry_events_and_control_between_their_connections() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[hub]\nconnection_threads = 2\n".into()),
        ..Default::default()
    });
    eventually("the hub to start two connection threads", WAIT, || async {
        (connection_threads(hub.pid()) == ["bridge-conn-0", "bridge-conn-1"]).then_some(())
    })
    .await;
    // Each on a connection of its own, handed to the thread with the fewest open: the two
    // subscribers go to different threads, and each worker's events reach both.
    let first = Recorder::start(&mut hub.client().await, matching(&["inference.stop"])).await;
    let second = Recorder::start(&mut hub.client().await, matching(&["inference.stop"])).await;
    let _a = WorkerProcess::start(&hub.url, "gpu-a", "llama", &["--simulate", "200"]);
    let _b = WorkerProcess::start(&hub.url, "gpu-b", "llama", &["--simulate", "200"]);
    for tail in [&first, &second] {
        eventually(
            "both workers' events on both subscriptions",
            WAIT,
            || async {
                let deliveries = tail.deliveries();
                let from = |id: &str| deliveries.iter().any(|d| d.worker_id == id);
                (from("gpu-a") && from("gpu-b")).then_some(())
            },
        )
        .await;
    }
    // Two connections on each thread (a subscriber and a worker), as `/metrics` shows.
    let metrics = tokio::task::block_in_place(|| http_get(hub.http, "/metrics", &[])).body;
    for thread in ["0", "1"] {
        let line = format!("bridge_connection_thread_connections{{thread=\"{thread}\"}} 2");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let out = run_cli(&hub.url, &["sample", "gpu-b", "0.1"]).await;
    assert!(
        out.stdout.starts_with("gpu-b: sampling 0.1 applied in "),
        "{out:?}"
    );
    eventually("gpu-b's events to carry the new rate", WAIT, || async {
        first
            .deliveries()
            .iter()
            .any(|d| d.worker_id == "gpu-b" && d.sampling_rate == 0.1)
            .then_some(())
    })
    .await;
}

/// Names of the hub's connection threads, sorted.
fn connection_threads(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the hub's threads");
    let mut names: Vec<String> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("bridge-conn-"))
        .collect();
    names.sort();
    names
}
