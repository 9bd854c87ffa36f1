//! Timed control changes (`--for`): they reach workers, then undo themselves on time, on one hub,
//! across a hub restart and in cluster mode, and bad durations are refused.

use std::time::{Duration, Instant};

use bridge::command::Selector;
use bridge_proto::v1;
use bridge_tests::{
    HubOptions, HubProcess, NatsServer, WorkerProcess, eventually, run_cli, worker_info,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
/// How late after its expiry a revert may reach a worker.
const ON_TIME: Duration = Duration::from_secs(1);
const REVERT_LINE: &str = "timed control change reverted";

/// Runs a timed change with `--format json`; returns when it reverts, as an `Instant`.
async fn timed(hub: &str, args: &[&str]) -> Instant {
    let mut args = args.to_vec();
    args.extend(["--format", "json"]);
    let out = run_cli(hub, &args).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let answer: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let left = answer["expires_in_ms"].as_u64().expect("expires_in_ms");
    Instant::now() + Duration::from_millis(left)
}

/// The sampling rate gpu `id` has applied (acknowledged), if it applied its desired state.
async fn applied_rate(hub: &HubProcess, id: &str) -> Option<f64> {
    let mut client = hub.client().await;
    let worker = worker_info(&mut client, id).await?;
    (worker.connected && worker.applied_version == Some(worker.desired_version))
        .then(|| worker.control.map(|c| c.sampling_rate))
        .flatten()
}

async fn wait_for_rate(hub: &HubProcess, id: &str, rate: f64, within: Duration) {
    eventually(&format!("{id} to apply rate {rate}"), within, || async {
        (applied_rate(hub, id).await == Some(rate)).then_some(())
    })
    .await;
}

/// Waits until `deadline`: the passing of time is the condition here.
async fn until(deadline: Instant) {
    tokio::time::sleep_until(deadline.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_sampling_change_reverts_to_the_previous_value_on_time() {
    let hub = HubProcess::start();
    let _worker = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "50"]);
    wait_for_rate(&hub, "gpu-1", 1.0, WAIT).await;
    let out = run_cli(&hub.url, &["sample", "gpu-1", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let out = run_cli(&hub.url, &["sample", "gpu-1", "0.25", "--for", "3s"]).await;
    let expiry = Instant::now() + Duration::from_secs(3);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("gpu-1: sampling 0.25 applied in "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("sampling 0.25: reverts in "),
        "{}",
        out.stdout
    );
    assert_eq!(applied_rate(&hub, "gpu-1").await, Some(0.25));

    // Shown while it lasts: by `bridge control` and `bridge workers`.
    let out = run_cli(&hub.url, &["control", "gpu-1"]).await;
    assert!(
        out.stdout.contains("rate reverts in ") && out.stdout.contains(" to 0.5"),
        "{}",
        out.stdout
    );
    let out = run_cli(&hub.url, &["control", "gpu-1", "--format", "json"]).await;
    let shown: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let timed = &shown["worker"]["timed"][0];
    assert_eq!(timed["setting"], "sampling_rate");
    assert_eq!(timed["reverts_to"], "0.5");
    assert!(
        timed["expires_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 3000),
        "{timed}"
    );
    let out = run_cli(&hub.url, &["workers", "--format", "json"]).await;
    let workers: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert!(
        workers[0]["control_expires_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms <= 3000),
        "{workers}"
    );
    let out = run_cli(&hub.url, &["workers"]).await;
    assert!(
        out.stdout.contains("applied, reverts in "),
        "{}",
        out.stdout
    );

    wait_for_rate(&hub, "gpu-1", 0.5, WAIT).await;
    assert!(Instant::now() <= expiry + ON_TIME, "reverted late");
    let log = hub.log();
    assert!(
        log.contains(REVERT_LINE) && log.contains("worker gpu-1: sampling_rate back to 0.5"),
        "{log}"
    );
    let out = run_cli(&hub.url, &["workers", "--format", "json"]).await;
    let workers: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert!(workers[0]["control_expires_in_ms"].is_null(), "{workers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_change_reverts_across_hub_restarts() {
    let state = tempfile::tempdir().expect("state dir");
    let options = |listen| HubOptions {
        state_dir: Some(state.path().to_owned()),
        listen,
        ..Default::default()
    };
    let mut hub = HubProcess::start_with(options(None));
    let addr = hub.addr;
    let _worker = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "50"]);
    wait_for_rate(&hub, "gpu-1", 1.0, WAIT).await;

    // Down before the expiry, up after it: reverted at start.
    let expiry = timed(&hub.url, &["sample", "gpu-1", "0.25", "--for", "2s"]).await;
    hub.kill();
    drop(hub);
    until(expiry + Duration::from_millis(200)).await;
    let hub = HubProcess::start_with(options(Some(addr)));
    let started = Instant::now();
    eventually("the revert at start", ON_TIME, || async {
        hub.log().contains(REVERT_LINE).then_some(())
    })
    .await;
    assert!(started.elapsed() <= ON_TIME);
    wait_for_rate(&hub, "gpu-1", 1.0, WAIT).await;

    // Restarted inside the window: reverts on time all the same.
    let expiry = timed(&hub.url, &["sample", "gpu-1", "0.1", "--for", "4s"]).await;
    let mut hub = hub;
    hub.kill();
    drop(hub);
    let hub = HubProcess::start_with(options(Some(addr)));
    wait_for_rate(&hub, "gpu-1", 0.1, WAIT).await;
    assert!(
        Instant::now() < expiry,
        "the worker came back after the expiry; lengthen --for"
    );
    wait_for_rate(&hub, "gpu-1", 1.0, WAIT).await;
    assert!(Instant::now() <= expiry + ON_TIME, "reverted late");
    assert!(
        Instant::now() >= expiry - Duration::from_millis(100),
        "reverted early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_change_replaces_the_timer_and_stacked_timed_changes_revert_to_the_original() {
    let hub = HubProcess::start();
    let describe = || async {
        let mut client = hub.client().await;
        client
            .get_control(&Selector::Pool("llama".into()))
            .await
            .expect("GetControl")
    };
    let rate =
        |response: &v1::GetControlResponse| response.effective.as_ref().map(|e| e.sampling_rate);
    let cli = |args: &'static [&'static str]| {
        let url = hub.url.clone();
        async move {
            let out = run_cli(&url, args).await;
            assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        }
    };
    cli(&["sample", "--pool", "llama", "0.5"]).await;
    cli(&["sample", "--pool", "llama", "0.1", "--for", "1s"]).await;
    // An untimed change to the same setting makes its value permanent...
    cli(&["sample", "--pool", "llama", "0.3"]).await;
    // ... while a timed change to another setting keeps its own timer, due later.
    let toggled = timed(
        &hub.url,
        &["toggle", "--pool", "llama", "off", "--for", "1500ms"],
    )
    .await;
    assert!(Instant::now() < toggled);
    eventually("the toggle to revert", WAIT, || async {
        let response = describe().await;
        response
            .effective
            .as_ref()
            .is_some_and(|e| e.enabled)
            .then_some(response)
    })
    .await;
    let response = describe().await;
    assert_eq!(rate(&response), Some(0.3), "the untimed change stayed");
    assert!(response.pool.as_ref().is_some_and(|p| p.timed.is_empty()));

    // Timed over timed: back to the value before the first.
    cli(&["sample", "--pool", "llama", "0.1", "--for", "1h"]).await;
    cli(&["sample", "--pool", "llama", "0.2", "--for", "1s"]).await;
    assert_eq!(rate(&describe().await), Some(0.2));
    let response = eventually("the stacked changes to revert", WAIT, || async {
        let response = describe().await;
        (rate(&response) != Some(0.2)).then_some(response)
    })
    .await;
    assert_eq!(rate(&response), Some(0.3));
    assert!(response.pool.as_ref().is_some_and(|p| p.timed.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_durations_are_refused_in_one_line() {
    let hub = HubProcess::start();
    for args in [
        &["sample", "--all", "0.5", "--for", "0"][..],
        &["sample", "--all", "0.5", "--for", "-5s"],
        &["toggle", "--all", "off", "--for", "soon"],
        &["filter", "--all", "--block", "a.>", "--for", "400d"],
        &["reset", "--all", "--for", "1m"],
    ] {
        let out = run_cli(&hub.url, args).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}{}", out.stdout, out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("--for"), "{args:?}: {}", out.stderr);
    }

    let mut client = hub.client().await;
    let all = || Some(v1::Selector::from(&Selector::All));
    for (change, for_ms, says) in [
        (
            v1::update_control_request::Change::Toggle(v1::TelemetryToggle { enabled: false }),
            31 * 24 * 3600 * 1000,
            "longer than the 30 days",
        ),
        (
            v1::update_control_request::Change::Reset(v1::ResetControl {}),
            60_000,
            "a reset cannot be timed",
        ),
    ] {
        let status = client
            .raw()
            .update_control(v1::UpdateControlRequest {
                selector: all(),
                change: Some(change),
                wait_ms: 0,
                for_ms,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{status:?}");
    }
    // Nothing was changed.
    let shown = client
        .get_control(&Selector::All)
        .await
        .expect("GetControl");
    assert!(
        shown
            .global
            .is_some_and(|g| g.timed.is_empty() && g.version <= 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_timed_change_made_on_one_hub_reverts_once_for_a_worker_on_another() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = nats.hub("hub-a");
    let b = nats.hub("hub-b");
    let _worker = WorkerProcess::start(&b.url, "gpu-1", "llama", &["--simulate", "50"]);
    wait_for_rate(&b, "gpu-1", 1.0, WAIT).await;
    // Hub A knows the worker (it asks B) once both follow the cluster.
    eventually("hub A to see gpu-1", WAIT, || async {
        let mut client = a.client().await;
        worker_info(&mut client, "gpu-1").await
    })
    .await;

    let expiry = timed(&a.url, &["sample", "gpu-1", "0.25", "--for", "3s"]).await;
    wait_for_rate(&b, "gpu-1", 0.25, WAIT).await;
    assert!(Instant::now() < expiry);
    wait_for_rate(&b, "gpu-1", 1.0, WAIT).await;
    assert!(Instant::now() <= expiry + ON_TIME, "reverted late");
    // Both hubs raced to revert it; the cluster's state took one.
    for hub in [&a, &b] {
        eventually("both hubs to follow the revert", WAIT, || async {
            let mut client = hub.client().await;
            let shown = client
                .get_control(&Selector::Worker("gpu-1".into()))
                .await
                .ok()?;
            shown
                .worker
                .is_some_and(|w| w.timed.is_empty())
                .then_some(())
        })
        .await;
    }
    let reverts = a.log().matches(REVERT_LINE).count() + b.log().matches(REVERT_LINE).count();
    assert_eq!(reverts, 1, "hub A:\n{}\nhub B:\n{}", a.log(), b.log());
}
