//! An event the hub will refuse never blacks out a worker: the sidecar and the worker library
//! drop and count it before buffering, or before replaying it, and what follows still arrives.
//! The sidecar's local endpoint answers what it cannot take with a status, and counts it.

use std::time::Duration;

use bridge_proto::protocol::counters;
use bridge_proto::v1;
use bridge_tests::{
    HubOptions, HubProcess, Proxy, QUICK_WORKER_CONFIG, Recorder, WorkerProcess, eventually, name,
    raw, worker_info,
};

const WAIT: Duration = Duration::from_secs(30);

/// Waits until worker `id` reports its counter `key` at `value`.
async fn reported(hub: &HubProcess, id: &str, key: &str, value: u64) {
    let client = hub.client().await;
    eventually(&format!("{id} to report {key} = {value}"), WAIT, || {
        let mut client = client.clone();
        async move {
            let info = worker_info(&mut client, id).await?;
            (info.worker_counters.get(key) == Some(&value)).then_some(())
        }
    })
    .await;
}

/// A 5 MB `TELEMETRY:` line once made the hub end the stream with RESOURCE_EXHAUSTED, and the
/// sidecar replay it after every reconnect: nothing after it ever arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_telemetry_line_is_dropped_and_what_follows_arrives() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let app = r#"blob=$(head -c 5000000 /dev/zero | tr '\0' x)
printf 'TELEMETRY:{"event":"too.big","metadata":{"blob":"%s"}}\n' "$blob" >&2
echo 'TELEMETRY:{"event":"after.big"}' >&2
exec sleep 60
"#;
    let config = format!("{QUICK_WORKER_CONFIG}max_line_bytes = 8388608\n");
    let mut command =
        WorkerProcess::command(&hub.url, "bulky", "", &config, &["--", "sh", "-c", app]);
    command.command.stdout(std::process::Stdio::null());
    let _worker = WorkerProcess::spawn(command, true);
    eventually("the event after the big one to arrive", WAIT, || async {
        tail.deliveries()
            .iter()
            .any(|d| name(d) == "after.big")
            .then_some(())
    })
    .await;
    reported(&hub, "bulky", counters::DROPPED_OVER_LIMIT, 1).await;
    assert!(!tail.deliveries().iter().any(|d| name(d) == "too.big"));
}

/// Events a worker buffered before it heard the hub's limits (here, a hub that accepts 64 KiB
/// messages) are dropped and counted when they are about to be replayed, instead of ending the
/// stream on every reconnect; the events behind them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_event_over_the_hubs_limit_is_dropped_not_replayed_forever() {
    use worker::{Link, LinkOptions, Value};
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[hub]\nmax_message_bytes = 65536\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    // Closed until the events are buffered.
    let proxy = Proxy::start(hub.addr, false).await.expect("proxy");
    let mut options = LinkOptions::new(proxy.url(), "buffered");
    options.backoff_initial = Duration::from_millis(20);
    options.backoff_max = Duration::from_millis(100);
    options.linger = Duration::ZERO;
    let link = Link::start(options).expect("link");
    let telemetry = link.emitter();
    // 200 entries of 1000 bytes: within the defaults a worker applies before it hears a hub
    // (4 MiB messages, 4096-byte strings, 256 entries), over this hub's 64 KiB.
    let values: Vec<String> = (0..200).map(|i| format!("{i:0>1000}")).collect();
    let measurements: Vec<(String, Value<'_>)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("m{i}"), Value::Str(v)))
        .collect();
    let measurements: Vec<(&str, Value<'_>)> =
        measurements.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    telemetry.emit("before", &[], &[], None);
    telemetry.emit("too.big", &measurements, &[], None);
    telemetry.emit("after", &[], &[], None);
    assert_eq!(
        telemetry.counters().accepted,
        3,
        "buffered while the hub is away"
    );

    proxy.open();
    eventually("the events around the big one to arrive", WAIT, || async {
        let names: Vec<String> = tail
            .deliveries()
            .iter()
            .filter(|d| d.worker_id == "buffered")
            .map(name)
            .filter(|n| !n.starts_with("bridge."))
            .collect();
        (names == ["before", "after"]).then_some(())
    })
    .await;
    let counters = link.close(WAIT).await;
    assert_eq!(counters.dropped_over_limit_buffered, 1, "{counters:?}");
    assert_eq!((counters.confirmed, counters.buffered()), (2, 0));
    // Told the limits, the worker now drops such an event before buffering it.
    let info = worker_info(&mut client, "buffered").await.expect("listed");
    assert_eq!(
        info.worker_counters.get(counters::DROPPED_OVER_LIMIT),
        Some(&1)
    );
}

/// Garbage and an over-size message from a local client once ended its stream with OK, and
/// what it sent after was dropped without a word. Now each gets the right status and a counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_endpoint_answers_what_it_cannot_take_with_a_status_and_counts_it() {
    use prost::Message;
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("worker.sock");
    let socket_arg = socket.to_str().expect("utf-8").to_owned();
    let _worker = WorkerProcess::start(&hub.url, "relay", "", &["--local", &socket_arg]);
    let address = format!("unix://{socket_arg}");
    eventually("the local endpoint to listen", WAIT, || async {
        socket.exists().then_some(())
    })
    .await;

    let valid: bytes::Bytes = v1::TelemetryEvent {
        event_parts: vec!["local".into(), "fine".into()],
        ..Default::default()
    }
    .encode_to_vec()
    .into();
    let path = "/telemetry.bridge.v1.TelemetryBridge/StreamTelemetry";
    for (message, code, key) in [
        (
            bytes::Bytes::from_static(&[0x0a, 0x05]),
            tonic::Code::InvalidArgument,
            counters::DROPPED_PARSE_ERROR,
        ),
        (
            bytes::Bytes::from(vec![0u8; 17 << 20]),
            tonic::Code::ResourceExhausted,
            counters::DROPPED_OVER_LIMIT,
        ),
    ] {
        let mut controls = raw::stream(&address, path, &[], vec![valid.clone(), message])
            .await
            .expect("opens");
        let status = loop {
            match tokio::time::timeout(WAIT, controls.message())
                .await
                .expect("the stream ends")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended with OK"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), code, "{status:?}");
        reported(&hub, "relay", key, 1).await;
    }
    eventually(
        "the valid event before each to be relayed",
        WAIT,
        || async {
            let fine = tail
                .deliveries()
                .iter()
                .filter(|d| name(d) == "local.fine")
                .count();
            (fine == 2).then_some(())
        },
    )
    .await;
}
