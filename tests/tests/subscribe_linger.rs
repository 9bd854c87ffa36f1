//! `bridge subscribe --linger`, `?linger_ms=` and `SubscribeRequest.linger_ms`: a subscription
//! that lets the hub hold its events after each send gets what arrives meanwhile together, and
//! the first event after a quiet spell at once.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bridge_proto::{protocol::headers, v1};
use bridge_tests::{
    HubOptions, HubProcess, bin, http_get, matching, open_stream, read_lines_within, run_cli,
    sequence,
};

const WAIT: Duration = Duration::from_secs(20);

fn job(sequence: u64) -> v1::TelemetryEvent {
    v1::TelemetryEvent {
        event_parts: vec!["job".into(), "step".into()],
        sequence,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_subscription_gets_the_first_event_at_once_and_later_ones_together() {
    first_at_once_and_later_ones_together("").await;
}

/// A connection thread's runtime holds the subscription's timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_subscription_on_a_connection_thread_gets_later_events_together() {
    first_at_once_and_later_ones_together("connection_threads = 1\n").await;
}

/// With `hub_config` as the `[hub]` table.
async fn first_at_once_and_later_ones_together(hub_config: &str) {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(format!("[hub]\n{hub_config}")),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let mut subscription = client
        .raw()
        .subscribe(v1::SubscribeRequest {
            linger_ms: 1000,
            ..matching(&["job.>"])
        })
        .await
        .expect("subscribe")
        .into_inner();
    hub.wait_for_subscribers(1, WAIT).await;
    let (events, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-1")])
        .await
        .expect("stream opens");
    let mut next = async || {
        let response = tokio::time::timeout(WAIT, subscription.message())
            .await
            .expect("a delivery in time")
            .expect("the subscription stays open")
            .expect("an item");
        match response.item {
            Some(v1::subscribe_response::Item::Event(delivery)) => sequence(&delivery),
            other => panic!("{other:?}"),
        }
    };

    let sent = Instant::now();
    events.send(job(1)).await.expect("send");
    assert_eq!(next().await, 1);
    let first = Instant::now();
    // Nothing was sent to this subscription before: the hub did not hold the event for the
    // second it may hold later ones.
    assert!(
        first - sent < Duration::from_millis(500),
        "the first event took {:?}",
        first - sent
    );
    for n in 2..=21 {
        events.send(job(n)).await.expect("send");
    }
    let mut received = Vec::new();
    while received.len() < 20 {
        received.push(next().await);
    }
    let held = first.elapsed();
    assert_eq!(received, (2..=21).collect::<Vec<_>>());
    // Sent just after the first went out, so held until a second after it (asserted with half
    // of it to spare for the first's own transit).
    assert!(
        held >= Duration::from_millis(500),
        "the later events came {held:?} after the first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_subscribe_linger_tails_events_and_refuses_a_bad_duration_in_one_line() {
    let hub = HubProcess::start();
    let mut tail = Command::new(bin("bridge"))
        .args(["--hub", &hub.url, "subscribe", "job.>", "--format", "json"])
        .args(["--linger", "20ms", "--limit", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge subscribe");
    hub.wait_for_subscribers(1, WAIT).await;
    let mut client = hub.client().await;
    let (events, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-1")])
        .await
        .expect("stream opens");
    for n in 1..=3 {
        events.send(job(n)).await.expect("send");
    }
    let lines = read_lines_within(tail.stdout.take().expect("stdout"), 3, WAIT)
        .expect("three events within the wait");
    assert!(
        lines.iter().all(|line| line.contains("job.step")),
        "{lines:?}"
    );
    let _ = tail.wait();

    for bad in ["2s", "1500us", "soon"] {
        let output = run_cli(&hub.url, &["subscribe", "--linger", bad]).await;
        assert_eq!(output.code, Some(2), "{bad}: {output:?}");
        assert_eq!(output.stderr.trim().lines().count(), 1, "{output:?}");
        assert!(output.stderr.contains("--linger"), "{output:?}");
    }
    for bad in ["1001", "soon", "-1"] {
        let refused = http_get(hub.http, &format!("/api/events?linger_ms={bad}"), &[]);
        assert_eq!(refused.status, 400, "{bad}: {refused:?}");
        assert!(refused.body.contains("linger_ms"), "{refused:?}");
    }
    let refused = client
        .raw()
        .subscribe(v1::SubscribeRequest {
            linger_ms: 5000,
            ..Default::default()
        })
        .await
        .expect_err("a linger over a second is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("linger_ms"), "{refused:?}");
}
