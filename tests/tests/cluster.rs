//! Cluster mode: hubs sharing events through a real nats-server on loopback. Subscribers on any
//! hub receive the events of workers on every hub, filtered as on one hub, exactly once.

use std::{collections::HashSet, time::Duration};

use bridge_proto::protocol::events;
use bridge_proto::v1;
use bridge_tests::{
    HubProcess, NatsServer, Recorder, WorkerProcess, eventually, http_get, name, sequence,
};

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
