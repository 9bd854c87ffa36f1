//! `[limits]`: oversized events and a worker over its quota are dropped and counted, and
//! calls beyond the hub's capacity fail with RESOURCE_EXHAUSTED, while everything else flows.

use std::{collections::HashMap, time::Duration};

use bridge::client::HubClient;
use bridge_proto::protocol::{counters, events, headers};
use bridge_proto::v1;
use bridge_tests::{
    HubOptions, HubProcess, Recorder, eventually, matching, open_stream, worker_info,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

fn event(parts: &[&str], entries: usize, correlation_id: &str) -> v1::TelemetryEvent {
    v1::TelemetryEvent {
        event_parts: parts.iter().map(|p| (*p).to_owned()).collect(),
        metadata: (0..entries)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect(),
        correlation_id: correlation_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_limits_are_counted_and_the_rest_flows() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(
            "[limits]\nmax_event_parts = 3\nmax_event_entries = 2\nmax_string_bytes = 8\nworker_events_per_second = 50\nmax_subscribers = 2\n"
                .into(),
        ),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["ok.>"])).await;

    let (sizes, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "sizes")])
        .await
        .expect("stream");
    for event in [
        event(&["ok", "a"], 2, "12345678"),
        event(&["ok", "a", "b", "c"], 0, ""),
        event(&["ok", "b"], 3, ""),
        event(&["ok", "c"], 0, "123456789"),
        event(&["ok", "toolongtoken"], 0, ""),
        event(&["ok", "b", "c"], 1, ""),
    ] {
        sizes.send(event).await.expect("send");
    }
    let info = eventually("the size checks", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "sizes")
                .await
                .filter(|w| w.events_received == 6)
        }
    })
    .await;
    assert_eq!(info.hub_drops["over_limit"], 4, "{:?}", info.hub_drops);
    eventually("the two events within limits", WAIT, || async {
        (tail.deliveries().len() == 2).then_some(())
    })
    .await;

    // A worker at ten times its quota: about a second's worth gets through (the burst plus
    // what the quota refills while it sends), the rest is counted, nothing is unaccounted.
    let (flood, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "flood")])
        .await
        .expect("stream");
    for _ in 0..500 {
        flood
            .send(event(&["ok", "flood"], 0, ""))
            .await
            .expect("send");
    }
    let info = eventually("the flood to be counted", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "flood")
                .await
                .filter(|w| w.events_received == 500)
        }
    })
    .await;
    let limited = info.hub_drops["rate_limited"];
    let drops: HashMap<_, _> = info.hub_drops.iter().filter(|(_, n)| **n > 0).collect();
    assert_eq!(drops.len(), 1, "only rate_limited: {drops:?}");
    assert!((350..=450).contains(&limited), "rate_limited {limited}");
    let delivered = eventually("the flood's deliveries", WAIT, || async {
        let n = tail
            .deliveries()
            .iter()
            .filter(|d| d.worker_id == "flood")
            .count() as u64;
        (n + limited == 500).then_some(n)
    })
    .await;
    assert!(delivered >= 50, "at least the burst: {delivered}");

    // Two subscriptions at most: the third is refused until one goes.
    let second = client
        .subscribe(v1::SubscribeRequest::default())
        .await
        .expect("second subscription");
    let third = client.subscribe(v1::SubscribeRequest::default()).await;
    let Err(bridge::client::ClientError::Status(status)) = third else {
        panic!("a third subscription was accepted");
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_subscribers"),
        "{status:?}"
    );
    drop(second);
    eventually("room for a subscription again", WAIT, || {
        let mut client = client.clone();
        async move { client.subscribe(v1::SubscribeRequest::default()).await.ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_streams_beyond_the_limit_are_refused_but_a_reconnect_is_not() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[limits]\nmax_worker_streams = 2\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let _first = open_stream(&mut client, &[(headers::WORKER_ID, "w1")])
        .await
        .expect("first");
    let _second = open_stream(&mut client, &[(headers::WORKER_ID, "w2")])
        .await
        .expect("second");
    eventually("both to be connected", WAIT, || {
        let mut client = client.clone();
        async move {
            let workers = client.list_workers(None).await.ok()?;
            (workers.iter().filter(|w| w.connected).count() == 2).then_some(())
        }
    })
    .await;
    let status = open_stream(&mut client, &[(headers::WORKER_ID, "w3")])
        .await
        .map(drop)
        .expect_err("a third worker");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_worker_streams"),
        "{status:?}"
    );
    // A worker that reconnects replaces its own stream: it takes no extra room.
    let _again = open_stream(&mut client, &[(headers::WORKER_ID, "w1")])
        .await
        .expect("w1 reconnecting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_until_one_goes() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[limits]\nmax_connections = 2\n".into()),
        ..Default::default()
    });
    let mut first = hub.client().await;
    let mut second = hub.client().await;
    assert!(first.list_workers(None).await.is_ok());
    assert!(second.list_workers(None).await.is_ok());
    let third = HubClient::connect(&hub.url, Duration::from_secs(5)).await;
    let refused = match third {
        Err(_) => true,
        Ok(mut client) => client.list_workers(None).await.is_err(),
    };
    assert!(refused, "a third connection was served");
    drop((first, second));
    eventually("room for a connection again", WAIT, || async {
        let mut client = HubClient::connect(&hub.url, Duration::from_secs(5))
            .await
            .ok()?;
        client.list_workers(None).await.ok()
    })
    .await;
    assert!(hub.log().contains("limits.max_connections reached"));

    // The HTTP port has the same limit, on connections of its own.
    let open = |addr| {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
    };
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", hub.http);
    let served = |stream: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut reply = [0u8; 12];
        stream.read_exact(&mut reply).is_ok() && reply.starts_with(b"HTTP/1.1 200")
    };
    let (mut a, mut b) = (open(hub.http), open(hub.http));
    assert!(
        served(&mut a) && served(&mut b),
        "two keep-alive connections"
    );
    let mut c = open(hub.http);
    assert!(!served(&mut c), "a third HTTP connection was served");
    drop((a, b));
    eventually("room for an HTTP connection again", WAIT, || async {
        tokio::task::block_in_place(|| served(&mut open(hub.http))).then_some(())
    })
    .await;
}

/// A `bridge.worker.stats` report with int measurements `name=value`.
fn stats(counters: &[(&str, i64)]) -> v1::TelemetryEvent {
    use v1::telemetry_value::Value;
    v1::TelemetryEvent {
        event_parts: events::WORKER_STATS.map(str::to_owned).to_vec(),
        measurements: counters
            .iter()
            .map(|(name, n)| {
                let value = v1::TelemetryValue {
                    value: Some(Value::IntValue(*n)),
                };
                ((*name).to_owned(), value)
            })
            .collect(),
        ..Default::default()
    }
}

/// The reserved `bridge.*` events are held to the same limits as any other, before the hub
/// decodes them: an oversized report is dropped and counted, and a flood of them is rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_events_are_held_to_the_same_limits() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[limits]\nmax_event_entries = 4\nworker_events_per_second = 50\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let (reports, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "reporter")])
        .await
        .expect("stream");
    let oversized: Vec<(String, i64)> = (0..10).map(|i| (format!("extra{i}"), i)).collect();
    let oversized: Vec<(&str, i64)> = oversized.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    reports.send(stats(&oversized)).await.expect("send");
    reports
        .send(stats(&[(counters::PRODUCED, 2), (counters::SENT, 2)]))
        .await
        .expect("send");
    let info = eventually("the report within limits", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "reporter")
                .await
                .filter(|w| w.worker_counters.get(counters::PRODUCED) == Some(&2))
        }
    })
    .await;
    assert_eq!(info.hub_drops["over_limit"], 1, "{:?}", info.hub_drops);
    assert_eq!(
        info.events_received, 1,
        "the refused report is accounted for"
    );
    assert!(
        !info.worker_counters.contains_key("extra0"),
        "the oversized report was not taken in: {:?}",
        info.worker_counters
    );

    for i in 0..500 {
        reports
            .send(stats(&[(counters::PRODUCED, 1000 + i)]))
            .await
            .expect("send");
    }
    drop(reports);
    let info = eventually("the flood to be read to its end", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "reporter")
                .await
                .filter(|w| !w.connected)
        }
    })
    .await;
    // At least the burst of 50 less the report taken earlier gets through, and not much more.
    let limited = info.hub_drops["rate_limited"];
    assert!((350..=451).contains(&limited), "rate_limited {limited}");
    assert_eq!(info.events_received, 1 + limited);
}
