//! Cluster mode, control: commands against any hub reach workers on every hub and are
//! acknowledged back to the hub that was asked; the desired state lives in NATS JetStream, so it
//! survives a restart of every hub and follows a worker that moves to another hub.

use std::time::Duration;

use bridge::command::{Change, Selector};
use bridge_proto::{sampling::Rate, v1};
use bridge_tests::{
    HubOptions, HubProcess, NatsServer, WorkerProcess, eventually, http_get, run_cli, worker_info,
};

const WAIT: Duration = Duration::from_secs(30);
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Waits until `hub` answers /readyz with "ready" and no degradation: connected to NATS and
/// following the cluster's control state.
async fn ready(hub: &HubProcess) {
    eventually("the hub to follow the cluster", WAIT, || async {
        let answer = tokio::task::block_in_place(|| http_get(hub.http, "/readyz", &[]));
        (answer.status == 200 && answer.body.trim() == "ready").then_some(())
    })
    .await;
}

/// The control state `worker` has applied, as `hub` (any hub) reports it, once its applied
/// version is the desired one.
async fn applied_control(hub: &HubProcess, worker: &str) -> Option<v1::ControlState> {
    let mut client = hub.client().await;
    let info = worker_info(&mut client, worker).await?;
    (info.connected && info.applied_version == Some(info.desired_version))
        .then_some(info.control)
        .flatten()
}

/// The sampling rate `worker` has applied (see [`applied_control`]).
async fn applied_rate(hub: &HubProcess, worker: &str) -> Option<f64> {
    applied_control(hub, worker).await.map(|c| c.sampling_rate)
}

async fn wait_for_rate(hub: &HubProcess, worker: &str, rate: f64) {
    eventually(
        &format!("{worker} to apply sampling {rate}"),
        WAIT,
        || async { (applied_rate(hub, worker).await == Some(rate)).then_some(()) },
    )
    .await;
}

fn sampling(rate: f64) -> Change {
    Change::Sampling {
        rate: Rate::new(rate).expect("a valid rate"),
        patterns: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_through_any_hub_reaches_every_hub_and_outlives_them() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let mut b = nats.hub("hub-b");
    ready(&a).await;
    ready(&b).await;
    eventually("A to count both hubs", WAIT, || async {
        let metrics = tokio::task::block_in_place(|| http_get(a.http, "/metrics", &[])).body;
        (metrics.contains("bridge_cluster_hubs 2")
            && metrics.contains("bridge_cluster_following 1"))
        .then_some(())
    })
    .await;
    let gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "20"]);
    let gpu_b = WorkerProcess::start(&b.url, "gpu-b", "llama", &["--simulate", "20"]);
    let client_a = a.client().await;

    // `bridge workers` on either hub lists the workers of both, each with its hub.
    eventually("both workers listed by hub A", WAIT, || async {
        let workers = client_a.clone().list_workers(None).await.ok()?;
        let hub_of = |id: &str| {
            workers
                .iter()
                .find(|w| w.id == id && w.connected)
                .map(|w| w.hub.clone())
        };
        (hub_of("gpu-a")? == "hub-a" && hub_of("gpu-b")? == "hub-b").then_some(())
    })
    .await;
    let table = run_cli(&b.url, &["workers"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(
        table.stdout.contains("HUB") && table.stdout.contains("hub-a"),
        "{}",
        table.stdout
    );

    // A command on A for a worker on B: applied, and acknowledged back to A.
    let out = run_cli(&a.url, &["sample", "gpu-b", "0.25"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("gpu-b: sampling 0.25 applied in "),
        "{}",
        out.stdout
    );
    assert_eq!(applied_rate(&b, "gpu-b").await, Some(0.25));
    // The hub that took the command logs it; the hub that only applied it does not.
    let logged = |hub: &HubProcess| {
        hub.log()
            .lines()
            .any(|l| l.contains("control changed") && l.contains("worker gpu-b"))
    };
    assert!(logged(&a) && !logged(&b), "{}", a.log());

    // A pool-wide command on B reaches both hubs' workers; the answer lists both, applied.
    let mut client_b = b.client().await;
    let answer = client_b
        .update_control(&Selector::Pool("llama".into()), &sampling(0.5), ACK_WAIT)
        .await
        .expect("pool change");
    let mut reached: Vec<(String, bool)> = answer
        .targets
        .iter()
        .map(|t| (t.worker_id.clone(), t.applied))
        .collect();
    reached.sort();
    assert_eq!(
        reached,
        [("gpu-a".to_owned(), true), ("gpu-b".to_owned(), true)]
    );
    // Latencies count from the command, not from when each hub was asked for its answer (by
    // then the worker has usually applied the change).
    assert!(
        answer.targets.iter().all(|t| t.ack_latency_us > 0),
        "{answer:?}"
    );
    assert_eq!(applied_rate(&a, "gpu-a").await, Some(0.5));
    // The latest command wins, whichever hub took it.
    assert_eq!(applied_rate(&a, "gpu-b").await, Some(0.5));
    let out = run_cli(&a.url, &["sample", "gpu-b", "0.125"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // A worker no hub knows is refused by every hub, with the usual message.
    for hub in [&a, &b] {
        let out = run_cli(&hub.url, &["sample", "nobody", "0.5"]).await;
        assert_ne!(out.code, Some(0));
        assert!(out.stderr.contains("no worker `nobody`"), "{}", out.stderr);
    }

    // A hub that dies without a word is waited for, then named: the answer is partial.
    b.kill();
    let out = run_cli(&a.url, &["workers"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("no answer in time from hub hub-b")
            && out.stdout.contains("gpu-a")
            && !out.stdout.contains("gpu-b"),
        "{out:?}"
    );
    let out = run_cli(&a.url, &["sample", "--pool", "mistral", "0.5", "--no-wait"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("hub hub-b") && out.stderr.contains("stored in the cluster"),
        "{out:?}"
    );

    // Every hub restarts, with fresh state directories: the state comes back from JetStream.
    drop((gpu_a, gpu_b, client_a, client_b));
    drop((a, b));
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    ready(&a).await;
    ready(&b).await;
    // gpu-b moves to A, gpu-a to B: each keeps its state.
    let _gpu_b = WorkerProcess::start(&a.url, "gpu-b", "llama", &["--simulate", "20"]);
    let _gpu_a = WorkerProcess::start(&b.url, "gpu-a", "llama", &["--simulate", "20"]);
    wait_for_rate(&b, "gpu-b", 0.125).await;
    wait_for_rate(&a, "gpu-a", 0.5).await;
    let description = run_cli(&b.url, &["control", "gpu-b"]).await;
    assert_eq!(description.code, Some(0), "{description:?}");
    assert!(
        description.stdout.contains("0.125"),
        "{}",
        description.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_waits_for_nats_and_catches_up_when_it_returns() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    // Hub A's state directory outlives its process (restarted below).
    let state = tempfile::tempdir().expect("temp dir");
    let a_options = || HubOptions {
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    };
    let a = nats.hub_with("hub-a", a_options());
    let b = nats.hub("hub-b");
    ready(&a).await;
    ready(&b).await;
    let _gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "20"]);
    wait_for_rate(&a, "gpu-a", 1.0).await;
    let out = run_cli(&b.url, &["sample", "gpu-a", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_for_rate(&a, "gpu-a", 0.5).await;

    // Without NATS a change cannot be shared, so it is refused (UNAVAILABLE), not half made;
    // the worker keeps the state it had.
    nats.kill();
    eventually("B to notice NATS is gone", WAIT, || async {
        let answer = tokio::task::block_in_place(|| http_get(b.http, "/readyz", &[]));
        answer.body.contains("degraded").then_some(())
    })
    .await;
    let out = run_cli(&b.url, &["sample", "--all", "0.1"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("NATS"), "{}", out.stderr);
    assert_eq!(applied_rate(&a, "gpu-a").await, Some(0.5));

    // A hub restarted while NATS is away gives its workers the state it last saw (its copy on
    // disk), not config.toml's alone.
    let listen = a.addr;
    drop(a);
    let a = nats.hub_with(
        "hub-a",
        HubOptions {
            listen: Some(listen),
            ..a_options()
        },
    );
    wait_for_rate(&a, "gpu-a", 0.5).await;

    // NATS returns with its store: both hubs follow the state again, and changes flow.
    nats.restart();
    ready(&a).await;
    ready(&b).await;
    let out = run_cli(&b.url, &["sample", "--all", "0.2"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("gpu-a: sampling 0.2 applied in"),
        "{}",
        out.stdout
    );
    wait_for_rate(&a, "gpu-a", 0.2).await;

    // NATS comes back without its store: the operators' settings are gone with it, and the
    // hubs say so to their workers (config.toml's default, 1.0) rather than keep a state no
    // other hub has. Versions start again from 1; changes and acknowledgements still work.
    nats.restart_empty();
    wait_for_rate(&a, "gpu-a", 1.0).await;
    ready(&b).await;
    let out = run_cli(&b.url, &["sample", "gpu-a", "0.3"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("gpu-a: sampling 0.3 applied in"),
        "{}",
        out.stdout
    );
    wait_for_rate(&a, "gpu-a", 0.3).await;
}

/// A level written straight into the bucket (as `nats kv put` would) with a pattern that does
/// not validate is refused whole: the worker keeps the allow list it had, where skipping the
/// bad pattern would have emptied the list and let every event through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_that_does_not_validate_is_refused_and_the_previous_one_stays() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    // The hub's state directory outlives its process (restarted below).
    let state = tempfile::tempdir().expect("temp dir");
    let options = || HubOptions {
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    };
    let a = nats.hub_with("hub-a", options());
    ready(&a).await;
    let _gpu_a = WorkerProcess::start(&a.url, "gpu-a", "llama", &["--simulate", "20"]);
    wait_for_rate(&a, "gpu-a", 1.0).await;
    let out = run_cli(&a.url, &["filter", "gpu-a", "--allow", "inference.>"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let allowed = |control: Option<v1::ControlState>| control.map(|c| c.allowed_events);
    assert_eq!(
        allowed(applied_control(&a, "gpu-a").await),
        Some(vec!["inference.>".to_owned()])
    );

    let nats_client = async_nats::connect(&nats.url)
        .await
        .expect("connect to NATS");
    let bucket = async_nats::jetstream::new(nats_client)
        .get_key_value("bridge_control")
        .await
        .expect("the control bucket");
    let typo =
        r#"{"filter":{"value":{"allow":["inference..>"],"block":[]},"version":0},"version":0}"#;
    bucket
        .put("worker.gpu-a", typo.into())
        .await
        .expect("put the level");

    // A later change at another level arrives after the bad one and is applied; the worker's
    // own level still holds the allow list it had.
    let out = run_cli(&a.url, &["sample", "--pool", "llama", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_for_rate(&a, "gpu-a", 0.5).await;
    assert_eq!(
        allowed(applied_control(&a, "gpu-a").await),
        Some(vec!["inference.>".to_owned()])
    );
    eventually("the hub to log the refusal", WAIT, || async {
        a.log()
            .lines()
            .any(|l| {
                l.contains("refusing a control level")
                    && l.contains("worker.gpu-a")
                    && l.contains("filter.allow[0]: `inference..>` has an empty token")
            })
            .then_some(())
    })
    .await;

    // A hub that starts with the bad level in the bucket keeps what it held (its copy on disk)
    // rather than take the level as removed.
    let listen = a.addr;
    drop(a);
    let a = nats.hub_with(
        "hub-a",
        HubOptions {
            listen: Some(listen),
            ..options()
        },
    );
    ready(&a).await;
    wait_for_rate(&a, "gpu-a", 0.5).await;
    assert_eq!(
        allowed(applied_control(&a, "gpu-a").await),
        Some(vec!["inference.>".to_owned()])
    );

    // A change to that level cannot build on it and says how to get out; a reset replaces it.
    let out = run_cli(&a.url, &["sample", "gpu-a", "0.25"]).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("`worker.gpu-a` is not valid") && out.stderr.contains("reset"),
        "{}",
        out.stderr
    );
    let out = run_cli(&a.url, &["reset", "gpu-a"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        allowed(applied_control(&a, "gpu-a").await),
        Some(Vec::new())
    );
}

/// A label change taken by hub A reaches the matching worker on hub B (and only it), is
/// acknowledged back to A, reaches a matching worker that joins B later, and comes back from
/// JetStream for a worker that reconnects after both hubs restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_level_set_on_one_hub_reaches_matching_workers_on_another() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    ready(&a).await;
    ready(&b).await;
    let labelled = |hub: &HubProcess, id: &str, zone: &str| {
        let label = format!("zone={zone}");
        WorkerProcess::start(
            &hub.url,
            id,
            "llama",
            &["--simulate", "20", "--label", &label],
        )
    };
    let gpu_b1 = labelled(&b, "gpu-b1", "a");
    let gpu_b2 = labelled(&b, "gpu-b2", "b");
    wait_for_rate(&a, "gpu-b1", 1.0).await;
    wait_for_rate(&a, "gpu-b2", 1.0).await;

    let out = run_cli(&a.url, &["sample", "--label", "zone=a", "0.25"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("gpu-b1: sampling 0.25 applied in ")
            && !out.stdout.contains("gpu-b2"),
        "{}",
        out.stdout
    );
    wait_for_rate(&b, "gpu-b1", 0.25).await;
    assert_eq!(applied_rate(&b, "gpu-b2").await, Some(1.0));
    let gpu_b3 = labelled(&b, "gpu-b3", "a");
    wait_for_rate(&b, "gpu-b3", 0.25).await;
    let shown = run_cli(&b.url, &["control", "gpu-b3"]).await;
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("labels zone=a") && l.contains("rate=0.25")),
        "{}",
        shown.stdout
    );

    drop((gpu_b1, gpu_b2, gpu_b3));
    drop((a, b));
    let a = nats.hub("hub-a");
    ready(&a).await;
    let _gpu_b1 = labelled(&a, "gpu-b1", "a");
    wait_for_rate(&a, "gpu-b1", 0.25).await;
}
