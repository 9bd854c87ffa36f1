//! Cluster mode: hubs sharing events through a real nats-server on loopback. Subscribers on any
//! hub receive the events of workers on every hub, filtered as on one hub, exactly once.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use bridge_proto::{
    batch::{Batch, BatchWriter},
    encoded::EncodedSubscribeResponse,
    protocol::events,
    v1,
};
use bridge_tests::{
    HubOptions, HubProcess, NatsServer, Recorder, WorkerProcess, eventually, http_get,
    metric_sample, name, run_cli, sequence,
};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(30);

/// Sequence numbers of `worker`'s events in `tail`, checking each arrived once.
fn sequences_once(tail: &Recorder, worker: &str) -> Vec<u64> {
    let sequences: Vec<u64> = tail
        .deliveries()
        .iter()
        .filter(|d| d.worker_id == worker && d.event.as_ref().is_some_and(|e| e.sequence > 0))
        .map(sequence)
        .collect();
    let unique: HashSet<u64> = sequences.iter().copied().collect();
    assert_eq!(
        unique.len(),
        sequences.len(),
        "{worker}: an event arrived twice"
    );
    sequences
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_any_hub_see_workers_on_every_hub_once() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    let (mut client_a, mut client_b) = (a.client().await, b.client().await);
    let request = |patterns: &[&str], workers: &[&str]| v1::SubscribeRequest {
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        worker_ids: workers.iter().map(|w| (*w).to_owned()).collect(),
        ..Default::default()
    };
    // On B: gpu-a's inference events (gpu-a streams to A); everything; and gpu-a's GPU events.
    let b_inference = Recorder::start(&mut client_b, request(&["inference.>"], &["gpu-a"])).await;
    let b_all = Recorder::start(&mut client_b, request(&[], &[])).await;
    // The same filter twice: the two share one NATS subscription, and each gets every event.
    let b_all_again = Recorder::start(&mut client_b, request(&[], &[])).await;
    let b_gpu_b_only = Recorder::start(&mut client_b, request(&[], &["gpu-b"])).await;
    // On A: everything, local and remote.
    let a_all = Recorder::start(&mut client_a, request(&[], &[])).await;

    let _gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "100"]);
    let _gpu_b = WorkerProcess::start(&b.url, "gpu-b", "mistral", &["--simulate", "100"]);

    eventually("events of both workers on both hubs", WAIT, || async {
        let enough = |tail: &Recorder, worker: &str| {
            tail.deliveries()
                .iter()
                .filter(|d| d.worker_id == worker)
                .count()
                > 200
        };
        (enough(&b_inference, "gpu-a")
            && enough(&b_all, "gpu-a")
            && enough(&b_all, "gpu-b")
            && enough(&b_all_again, "gpu-a")
            && enough(&a_all, "gpu-a")
            && enough(&a_all, "gpu-b"))
        .then_some(())
    })
    .await;

    // The filters hold across hubs.
    for delivery in b_inference.deliveries() {
        assert_eq!(delivery.worker_id, "gpu-a");
        assert!(
            name(&delivery).starts_with("inference."),
            "{}",
            name(&delivery)
        );
        assert_eq!(delivery.pool, "llama");
    }
    assert!(
        b_gpu_b_only
            .deliveries()
            .iter()
            .all(|d| d.worker_id == "gpu-b"),
        "a worker filter let another worker through"
    );
    // Exactly once, local or remote: no echo of a hub's own events, no duplicates.
    for (tail, worker) in [
        (&a_all, "gpu-a"),
        (&a_all, "gpu-b"),
        (&b_all, "gpu-a"),
        (&b_all, "gpu-b"),
        (&b_all_again, "gpu-a"),
    ] {
        let sequences = sequences_once(tail, worker);
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "{worker}'s events out of order"
        );
    }
    // Lifecycle events travel too: B heard that gpu-a connected to A.
    assert!(
        b_all
            .deliveries()
            .iter()
            .any(|d| name(d) == events::WORKER_CONNECTED.join(".") && d.worker_id == "gpu-a"),
        "B never heard of gpu-a connecting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_without_nats_serves_locally_says_so_and_rejoins() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    let (mut client_a, mut client_b) = (a.client().await, b.client().await);
    let local = Recorder::start(&mut client_a, v1::SubscribeRequest::default()).await;
    let remote = Recorder::start(&mut client_b, v1::SubscribeRequest::default()).await;
    let _gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "100"]);
    let from_a = |tail: &Recorder| {
        tail.deliveries()
            .iter()
            .filter(|d| d.worker_id == "gpu-a")
            .count()
    };
    eventually("gpu-a's events on B", WAIT, || async {
        (from_a(&remote) > 50).then_some(())
    })
    .await;
    let ready =
        |hub: &HubProcess| tokio::task::block_in_place(|| http_get(hub.http, "/readyz", &[]));
    assert_eq!(ready(&a).body.trim(), "ready");

    // NATS goes away: A keeps serving its own subscriber and says it is degraded.
    nats.kill();
    eventually("A to report the lost connection", WAIT, || async {
        let answer = ready(&a);
        (answer.status == 200 && answer.body.contains("degraded")).then_some(())
    })
    .await;
    let metrics = tokio::task::block_in_place(|| http_get(a.http, "/metrics", &[])).body;
    assert!(
        metrics.contains("bridge_cluster_connected{node=\"hub-a\"} 0"),
        "{metrics}"
    );
    // Its subscribers are told that events from other hubs may be missing from now on.
    let announced = |tail: &Recorder, event: &str| {
        tail.deliveries()
            .iter()
            .rposition(|d| name(d) == event && d.worker_id == "hub-a")
    };
    eventually("A's subscriber to hear that A lost NATS", WAIT, || async {
        announced(&local, &events::CLUSTER_DISCONNECTED.join(".")).map(|_| ())
    })
    .await;
    let before = from_a(&local);
    eventually("A's local subscriber to keep receiving", WAIT, || async {
        (from_a(&local) > before + 100).then_some(())
    })
    .await;
    let remote_before = from_a(&remote);

    // NATS returns on the same address: both hubs reconnect and B hears from gpu-a again.
    nats.restart();
    eventually("B to receive gpu-a's events again", WAIT, || async {
        (from_a(&remote) > remote_before + 50).then_some(())
    })
    .await;
    assert_eq!(ready(&a).body.trim(), "ready");
    // ... and when it is back.
    eventually("A's subscriber to hear that A is back", WAIT, || async {
        let lost = announced(&local, &events::CLUSTER_DISCONNECTED.join("."))?;
        (announced(&local, &events::CLUSTER_CONNECTED.join("."))? > lost).then_some(())
    })
    .await;
    sequences_once(&remote, "gpu-a");
    sequences_once(&local, "gpu-a");
}

/// A subscription on hub B with these filters.
fn request(patterns: &[&str], workers: &[&str], labels: &[(&str, &str)]) -> v1::SubscribeRequest {
    v1::SubscribeRequest {
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        worker_ids: workers.iter().map(|w| (*w).to_owned()).collect(),
        worker_labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn metric(hub: &HubProcess, series: &str) -> f64 {
    let text = tokio::task::block_in_place(|| http_get(hub.http, "/metrics", &[])).body;
    metric_sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// An event from hub A reaches every subscription on hub B whose filter matches it, once each
/// (B receives it once and matches it against all of them), and the worker's labels travel
/// with it, so `subscribe --label` on B sees A's labelled workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_matching_subscription_on_another_hub_gets_an_event_once_labels_included() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    let mut client_b = b.client().await;
    // Two different filters that both match gpu-a's inference events, and two on labels.
    let by_name = Recorder::start(&mut client_b, request(&["inference.>"], &[], &[])).await;
    let by_worker = Recorder::start(&mut client_b, request(&[], &["gpu-a"], &[])).await;
    let eu = Recorder::start(&mut client_b, request(&[], &[], &[("zone", "eu")])).await;
    let us_rack = Recorder::start(
        &mut client_b,
        request(&[], &[], &[("zone", "us"), ("rack", "7")]),
    )
    .await;
    let _gpu_a = WorkerProcess::start(
        &a.url,
        "gpu-a",
        "llama",
        &["--simulate", "100", "--label", "zone=eu"],
    );
    let _gpu_c = WorkerProcess::start(
        &a.url,
        "gpu-c",
        "llama",
        &[
            "--simulate",
            "100",
            "--label",
            "zone=us",
            "--label",
            "rack=7",
        ],
    );
    // Sequence numbers of `worker`'s inference events, checking each arrived once.
    let inference_of = |tail: &Recorder, worker: &str| -> Vec<u64> {
        sequences_once(tail, worker);
        tail.deliveries()
            .iter()
            .filter(|d| d.worker_id == worker && name(d).starts_with("inference."))
            .map(sequence)
            .collect()
    };
    eventually("gpu-a's and gpu-c's events on B", WAIT, || async {
        (inference_of(&by_name, "gpu-a").len() > 100
            && inference_of(&by_worker, "gpu-a").len() > 100
            && sequences_once(&eu, "gpu-a").len() > 100
            && sequences_once(&us_rack, "gpu-c").len() > 100)
            .then_some(())
    })
    .await;

    // The two subscriptions that match the same events got the same ones, each once (both
    // were open before gpu-a started; compared up to where the shorter tail ends).
    let (named, from_worker) = (
        inference_of(&by_name, "gpu-a"),
        inference_of(&by_worker, "gpu-a"),
    );
    let upto = *named.last().unwrap().min(from_worker.last().unwrap());
    let upto = |sequences: &[u64]| -> Vec<u64> {
        sequences.iter().copied().filter(|s| *s <= upto).collect()
    };
    assert_eq!(upto(&named), upto(&from_worker));
    assert!(upto(&named).len() > 50);
    // Labels crossed with the events: each label subscription sees its worker only.
    assert!(
        eu.deliveries().iter().all(|d| d.worker_id == "gpu-a"),
        "zone=eu let another worker through"
    );
    assert!(
        us_rack.deliveries().iter().all(|d| d.worker_id == "gpu-c"),
        "zone=us,rack=7 let another worker through"
    );
    // As `bridge subscribe --label` on B shows it.
    let out = run_cli(
        &b.url,
        &[
            "subscribe",
            "--label",
            "zone=eu",
            "--format",
            "json",
            "--limit",
            "5",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.json_lines();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert!(
        lines.iter().all(|l| l["worker_id"] == "gpu-a"),
        "{}",
        out.stdout
    );

    // A sent them in batches; B counted each event once (not once per subscription that took
    // it: four here), and nothing was malformed.
    // (Read in this order, since the counts keep growing: taken <= received <= published.)
    let crossed = eu.deliveries().len() + us_rack.deliveries().len();
    let received = metric(&b, "bridge_cluster_received_events_total");
    let published = metric(&a, "bridge_cluster_published_events_total");
    let batches = metric(&a, "bridge_cluster_published_batches_total");
    assert!(
        (1.0..=published).contains(&batches),
        "{published} events in {batches} batches"
    );
    assert!(
        received >= crossed as f64 && received <= published,
        "{received} received, {crossed} taken, {published} published"
    );
    assert_eq!(metric(&b, "bridge_cluster_malformed_batches_total"), 0.0);
    assert_eq!(metric(&b, "bridge_cluster_malformed_events_total"), 0.0);
}

/// A delivery as a hub encodes it, of an event named `injected` from `worker`.
fn injected(worker: &str) -> Vec<u8> {
    let event = v1::TelemetryEvent {
        event_parts: vec!["injected".into()],
        ..Default::default()
    };
    EncodedSubscribeResponse::delivery(worker, "", &event, 1.0, 1)
        .as_bytes()
        .to_vec()
}

fn batch(deliveries: &[&[u8]]) -> bytes::Bytes {
    let mut batch = BatchWriter::new();
    for delivery in deliveries {
        assert!(batch.add(delivery, None));
    }
    batch.take()
}

/// What arrives on the batch subject is input from the network: a message that is not a batch
/// is dropped whole, a malformed event alone, each counted, and nothing malformed reaches a
/// subscriber while the well-formed events of the same batch do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_and_events_are_dropped_and_counted() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let b = nats.hub("hub-b");
    let mut client_b = b.client().await;
    let tail = Recorder::start(&mut client_b, v1::SubscribeRequest::default()).await;
    let client = async_nats::connect(nats.url.as_str())
        .await
        .expect("connect to NATS");
    let from = |tail: &Recorder, worker: &str| {
        tail.deliveries()
            .iter()
            .filter(|d| d.worker_id == worker)
            .count()
    };
    // B takes batches once its NATS subscription is in place.
    eventually("B to take a batch", WAIT, || async {
        client
            .publish("bridge.batch.probe", batch(&[&injected("probe")]))
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        (from(&tail, "probe") > 0).then_some(())
    })
    .await;
    let probes = metric(&b, "bridge_cluster_received_events_total");

    for payload in [
        bytes::Bytes::from_static(b"\xff\xff\xff not a batch"),
        batch(&[&injected("fine"), b"not a delivery", &injected("fine too")]),
    ] {
        client
            .publish("bridge.batch.intruder", payload)
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    eventually(
        "the well-formed events to arrive and be counted",
        WAIT,
        || async {
            (from(&tail, "fine") == 1
                && from(&tail, "fine too") == 1
                && metric(&b, "bridge_cluster_received_events_total") >= probes + 2.0
                && metric(&b, "bridge_cluster_malformed_events_total") == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(metric(&b, "bridge_cluster_malformed_batches_total"), 1.0);
    assert!(
        tail.deliveries()
            .iter()
            .all(|d| ["probe", "fine", "fine too", "hub-b"].contains(&d.worker_id.as_str())),
        "{:?}",
        tail.deliveries()
    );
}

/// `cluster.linger_ms`: a hub whose workers keep sending gathers their events for the linger
/// after each batch, so the other hubs get one NATS message per linger, holding every event of
/// it, instead of one per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_hub_sends_one_batch_per_linger() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let client = async_nats::connect(nats.url.as_str())
        .await
        .expect("connect to NATS");
    let mut batches = client
        .subscribe("bridge.batch.hub-a")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let a = nats.hub_with(
        "hub-a",
        HubOptions {
            config: Some("linger_ms = 1000\n".into()),
            ..Default::default()
        },
    );
    // About 20 requests a second, several events each: well under a batch's 64 KiB a second.
    let _gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "20"]);
    let mut arrivals: Vec<(Instant, usize)> = Vec::new();
    tokio::time::timeout(WAIT, async {
        while arrivals.len() < 4 {
            let message = batches.next().await.expect("the subscription ended");
            let events = Batch::read(&message.payload).expect("a batch").len();
            arrivals.push((Instant::now(), events));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("four batches within {WAIT:?}: {arrivals:?}"));
    // The hub waits out the linger after each batch (asserted with half of it to spare for the
    // delivery of one batch being held up more than the next).
    for pair in arrivals.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(500),
            "batches {gap:?} apart with a 1 s linger: {arrivals:?}"
        );
    }
    // And gathers: a second of a busy worker's events in one message (the first batches may
    // hold only the hub's and the worker's lifecycle events, from before its traffic began).
    assert!(
        arrivals[2..].iter().all(|(_, events)| *events > 10),
        "{arrivals:?}"
    );
}
