//! Operators change control state from the CLI; workers apply and acknowledge it, and what
//! subscribers receive changes accordingly, across reconnects and hub restarts.

use std::{collections::HashSet, time::Duration};

use bridge_proto::protocol::{counters, hub_drops};
use bridge_proto::{
    sampling::{Rate, SamplingKey},
    v1::{self, telemetry_control::Control},
};
use bridge_tests::{
    HubOptions, HubProcess, Recorder, WorkerProcess, eventually, first_connected, matching, name,
    open_stream, run_cli, worker_info,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// Inference events per second over the span of their timestamps.
fn rate_per_second(deliveries: &[&v1::EventDelivery]) -> f64 {
    let stamps: Vec<i64> = deliveries
        .iter()
        .filter_map(|d| d.event.as_ref().map(|e| e.timestamp_ns))
        .collect();
    let (Some(first), Some(last)) = (stamps.iter().min(), stamps.iter().max()) else {
        return 0.0;
    };
    stamps.len() as f64 / ((last - first) as f64 / 1e9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampling_change_reaches_a_running_worker_and_shows_in_the_delivered_rate() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(
        &mut client,
        v1::SubscribeRequest {
            patterns: vec!["inference.>".into()],
            worker_ids: vec!["gpu-1".into()],
            ..Default::default()
        },
    )
    .await;
    let _worker = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "200"]);
    eventually("events at full rate", WAIT, || async {
        (tail.deliveries().len() >= 400).then_some(())
    })
    .await;

    let out = run_cli(&hub.url, &["sample", "gpu-1", "0.1"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.starts_with("gpu-1: sampling 0.1 applied in ")
            && out.stdout.contains("ms (version"),
        "{}",
        out.stdout
    );

    eventually("events sampled at 0.1", WAIT, || async {
        (tail.count_at_rate(0.1) >= 80).then_some(())
    })
    .await;
    let deliveries = tail.deliveries();
    let full: Vec<_> = deliveries
        .iter()
        .filter(|d| d.sampling_rate == 1.0)
        .collect();
    let sampled: Vec<_> = deliveries
        .iter()
        .filter(|d| d.sampling_rate == 0.1)
        .collect();
    let (before, after) = (rate_per_second(&full), rate_per_second(&sampled));
    assert!(
        after < before * 0.3 && after > before * 0.02,
        "delivered rate went from {before:.0}/s to {after:.0}/s"
    );
    // Sampling is a function of the correlation id: exactly the ids the shared function keeps.
    let rate = Rate::new(0.1).expect("rate");
    for delivery in &sampled {
        let event = delivery.event.as_ref().expect("event");
        let cid = &event.correlation_id;
        let key = SamplingKey::new(&event.trace_id, cid);
        assert!(rate.keep(key), "{cid} should have been sampled out");
    }
    // ... so a request's start and stop are kept together.
    let starts: HashSet<_> = sampled
        .iter()
        .filter(|d| name(d) == "inference.start")
        .map(|d| d.event.as_ref().expect("event").correlation_id.clone())
        .collect();
    let stops_with_start = sampled
        .iter()
        .filter(|d| name(d) != "inference.start")
        .filter(|d| starts.contains(&d.event.as_ref().expect("event").correlation_id))
        .count();
    assert!(
        stops_with_start + 2 >= starts.len(),
        "starts and stops sampled together"
    );

    let out = run_cli(&hub.url, &["workers", "--format", "json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let workers: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let worker = &workers[0];
    assert_eq!(worker["id"], "gpu-1");
    assert_eq!(worker["connected"], true);
    assert_eq!(worker["applied_version"], worker["desired_version"]);
    assert_eq!(worker["control"]["sampling_rate"], 0.1);
    assert!(worker["events_received"].as_u64().expect("count") > 0);
    assert!(
        worker["drops"]["worker"]["sampled_out"]
            .as_u64()
            .expect("sampled_out")
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_is_reapplied_after_the_worker_reconnects_and_after_the_hub_restarts() {
    let state = tempfile::tempdir().expect("state dir");
    let mut hub = HubProcess::start_with(HubOptions {
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let client = hub.client().await;
    let mut worker = WorkerProcess::start(&hub.url, "gpu-2", "llama", &["--simulate", "100"]);
    eventually("gpu-2 to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-2")
                .await
                .filter(|w| w.applied_version.is_some())
        }
    })
    .await;
    let out = run_cli(
        &hub.url,
        &["sample", "gpu-2", "0.25", "--pattern", "inference.*"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);

    let has_rule = |w: &v1::WorkerInfo| {
        w.control.as_ref().is_some_and(|c| {
            c.rules
                .iter()
                .any(|r| r.pattern == "inference.*" && r.sampling_rate == 0.25)
        })
    };
    let applied = |w: &v1::WorkerInfo| w.connected && w.applied_version == Some(w.desired_version);

    // The worker process dies and a new one with the same id connects.
    worker.kill();
    eventually("gpu-2 to be seen as gone", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-2")
                .await
                .filter(|w| !w.connected)
        }
    })
    .await;
    let _worker = WorkerProcess::start(&hub.url, "gpu-2", "llama", &["--simulate", "100"]);
    let before_restart = eventually("the new process to apply the stored state", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-2")
                .await
                .filter(|w| applied(w) && has_rule(w))
        }
    })
    .await;

    // The hub dies without warning and comes back on the same address and state directory.
    let addr = hub.addr;
    hub.kill();
    drop(hub);
    let hub = HubProcess::start_with(HubOptions {
        state_dir: Some(state.path().to_owned()),
        listen: Some(addr),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["inference.*"])).await;
    let after_restart = eventually(
        "the worker to reconnect and apply the stored state",
        WAIT,
        || {
            let mut client = client.clone();
            async move {
                worker_info(&mut client, "gpu-2")
                    .await
                    .filter(|w| applied(w) && has_rule(w))
            }
        },
    )
    .await;
    assert!(
        after_restart.desired_version > before_restart.desired_version,
        "versions only grow"
    );
    eventually("deliveries sampled at the stored rate", WAIT, || async {
        let deliveries = tail.deliveries();
        (deliveries.len() >= 10).then_some(())?;
        deliveries
            .iter()
            .all(|d| d.sampling_rate == 0.25)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_global_settings_reach_workers_including_those_that_join_later() {
    let hub = HubProcess::start();
    let client = hub.client().await;
    let out = run_cli(&hub.url, &["sample", "--pool", "llama", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("no worker of pool `llama` is connected"),
        "{}",
        out.stdout
    );

    let _late = WorkerProcess::start(&hub.url, "late", "llama", &["--simulate", "50"]);
    let _other = WorkerProcess::start(&hub.url, "other", "mistral", &["--simulate", "50"]);
    let late = eventually("the late joiner to apply its pool's rate", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "late")
                .await
                .filter(|w| w.applied_version == Some(w.desired_version))
        }
    })
    .await;
    assert_eq!(late.control.as_ref().expect("control").sampling_rate, 0.5);
    eventually("the other pool to be connected", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "other")
                .await
                .filter(|w| w.applied_version.is_some())
        }
    })
    .await;

    let out = run_cli(&hub.url, &["toggle", "--all", "off"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("late: telemetry off applied in"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("other: telemetry off applied in"),
        "{}",
        out.stdout
    );
    for id in ["late", "other"] {
        eventually("the worker to count what it no longer emits", WAIT, || {
            let mut client = client.clone();
            async move {
                worker_info(&mut client, id).await.filter(|w| {
                    w.worker_counters
                        .get(counters::DISABLED)
                        .is_some_and(|n| *n > 0)
                })
            }
        })
        .await;
    }
    let out = run_cli(&hub.url, &["control", "late"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.starts_with("effective  v"), "{}", out.stdout);
    assert!(out.stdout.contains(" off rate=0.5"), "{}", out.stdout);
    assert!(
        out.stdout.contains("\npool       rate=0.5"),
        "{}",
        out.stdout
    );
}

/// A client that sends no identity and ignores control (as generated from the .proto by anyone)
/// still has every command take effect: the hub applies it to its events. It says it samples
/// nothing itself (`sampling_rate` 1), so the hub does not take it to have applied the rate it
/// was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_enforces_control_on_a_client_that_never_acknowledges() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["inference.>"])).await;

    let (events, mut controls) = open_stream(&mut client, &[]).await.expect("stream opens");
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(control)) = controls.message().await {
            let _ = control_tx.send(control);
        }
    });
    tokio::spawn(async move {
        for i in 0u64.. {
            let event = v1::TelemetryEvent {
                event_parts: vec![
                    "inference".into(),
                    if i % 2 == 0 { "start" } else { "stop" }.into(),
                ],
                correlation_id: format!("req-{}", i / 2),
                sampling_rate: 1.0,
                ..Default::default()
            };
            if events.send(event).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    let plain = eventually("the plain client to be listed", WAIT, || {
        first_connected(&client)
    })
    .await;
    assert!(
        plain.id.starts_with("anon-"),
        "a generated id: {}",
        plain.id
    );
    assert!(!plain.acknowledges);

    let out = run_cli(&hub.url, &["sample", &plain.id, "0.2"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("does not acknowledge control"),
        "{}",
        out.stdout
    );
    eventually("events sampled by the hub", WAIT, || async {
        (tail.count_at_rate(0.2) >= 100).then_some(())
    })
    .await;
    let rate = Rate::new(0.2).expect("rate");
    for delivery in tail.deliveries().iter().filter(|d| d.sampling_rate == 0.2) {
        let event = delivery.event.as_ref().expect("event");
        let cid = &event.correlation_id;
        assert!(
            rate.keep(SamplingKey::new(&event.trace_id, cid)),
            "the hub kept {cid}, which the shared sampler drops"
        );
    }

    let out = run_cli(&hub.url, &["toggle", &plain.id, "off"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let toggle = eventually("the plain client to be told", WAIT, || {
        let found = std::iter::from_fn(|| control_rx.try_recv().ok()).find(|c| {
            matches!(
                c.control,
                Some(Control::Toggle(v1::TelemetryToggle { enabled: false }))
            )
        });
        async move { found }
    })
    .await;
    assert!(matches!(toggle.control, Some(Control::Toggle(_))));
    let disabled = |n: u64| {
        let client = client.clone();
        let id = plain.id.clone();
        move || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                worker_info(&mut client, &id).await.filter(|w| {
                    w.hub_drops
                        .get(hub_drops::DISABLED)
                        .is_some_and(|d| *d >= n)
                })
            }
        }
    };
    eventually(
        "the hub to drop the disabled client's events",
        WAIT,
        disabled(20),
    )
    .await;
    let delivered = tail.deliveries().len();
    eventually("many more events to be dropped", WAIT, disabled(200)).await;
    assert_eq!(
        tail.deliveries().len(),
        delivered,
        "nothing delivered while disabled"
    );

    let out = run_cli(&hub.url, &["toggle", &plain.id, "on"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run_cli(
        &hub.url,
        &["filter", &plain.id, "--block", "inference.stop"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let seen = tail.deliveries().len();
    eventually(
        "deliveries to resume, without blocked events",
        WAIT,
        || async { (tail.deliveries().len() >= seen + 50).then_some(()) },
    )
    .await;
    let recent = &tail.deliveries()[seen + 5..];
    assert!(
        recent.iter().all(|d| name(d) == "inference.start"),
        "blocked events were delivered"
    );
}

fn json_object(out: &bridge_tests::CliOutput) -> serde_json::Value {
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "one object: {}", out.stdout);
    serde_json::from_str(&out.stdout).expect("JSON")
}

/// What an operator expects from similar tools: `--format json` on changes, `workers --pool`,
/// a warning for a `--worker` nobody knows; and a change that leaves a rule of another level
/// in force says so (a pool's `inference.*` rule outlives `sample --all 1.0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_print_json_and_name_the_rules_they_leave_in_force() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let _llama = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "50"]);
    let _mistral = WorkerProcess::start(&hub.url, "gpu-2", "mistral", &["--simulate", "50"]);
    for id in ["gpu-1", "gpu-2"] {
        eventually("both workers to apply their control", WAIT, || {
            let mut client = client.clone();
            async move {
                worker_info(&mut client, id)
                    .await
                    .filter(|w| w.applied_version.is_some())
            }
        })
        .await;
    }

    let out = run_cli(
        &hub.url,
        &[
            "sample",
            "--pool",
            "llama",
            "0.1",
            "--pattern",
            "inference.*",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run_cli(&hub.url, &["sample", "--all", "1.0"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("note: pool llama keeps rule inference.* 0.1, which still decides"),
        "{}",
        out.stderr
    );
    let gpu_1 = worker_info(&mut client, "gpu-1").await.expect("listed");
    let rules = gpu_1.control.expect("control").rules;
    assert!(
        rules
            .iter()
            .any(|r| r.pattern == "inference.*" && r.sampling_rate == 0.1),
        "the pool's rule is in force, as the note says: {rules:?}"
    );

    let change =
        json_object(&run_cli(&hub.url, &["sample", "--all", "1.0", "--format", "json"]).await);
    assert_eq!(change["selector"], serde_json::json!({"all": true}));
    assert_eq!(change["change"], "sampling 1");
    assert_eq!(change["not_acknowledged"], serde_json::json!([]));
    assert_eq!(
        change["rules_still_deciding"],
        serde_json::json!([{"level": "pool llama", "pattern": "inference.*", "sampling_rate": 0.1}])
    );
    let mut reached: Vec<(String, bool)> = change["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            (
                t["worker_id"].as_str().unwrap_or_default().to_owned(),
                t["applied"] == true,
            )
        })
        .collect();
    reached.sort();
    assert_eq!(reached, [("gpu-1".into(), true), ("gpu-2".into(), true)]);
    assert!(change["version"].as_u64() > Some(0));

    // The same rule set anew at its own pattern leaves nothing to note.
    let change = json_object(
        &run_cli(
            &hub.url,
            &[
                "sample",
                "--all",
                "1",
                "--pattern",
                "inference.*",
                "--format",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(change["rules_still_deciding"], serde_json::json!([]));
    for command in [
        &["toggle", "gpu-1", "on", "--format", "json"][..],
        &[
            "filter", "--pool", "llama", "--block", "debug.>", "--format", "json",
        ],
        &["reset", "--pool", "llama", "--format", "json", "--no-wait"],
    ] {
        let change = json_object(&run_cli(&hub.url, command).await);
        assert!(change["version"].as_u64() > Some(0), "{change}");
        assert!(
            change["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{change}"
        );
        assert!(change["change"].is_string(), "{change}");
    }

    let listed = json_object(
        &run_cli(
            &hub.url,
            &["workers", "--pool", "llama", "--format", "json"],
        )
        .await,
    );
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(ids, ["gpu-1"]);

    let out = run_cli(
        &hub.url,
        &[
            "subscribe",
            "--worker",
            "gpu-1",
            "--worker",
            "gpu-9",
            "--limit",
            "1",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "warning: no worker `gpu-9` is known to the hub (`bridge workers` lists them); waiting for it to connect"
    );

    // A reset names the narrower levels that keep settings of their own: gpu-2's rate, and
    // gpu-1's `toggle on` above (equal to what it inherits, but still its own).
    let out = run_cli(&hub.url, &["sample", "gpu-2", "0.5", "--no-wait"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run_cli(&hub.url, &["reset", "--pool", "mistral", "--no-wait"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "note: worker gpu-2 keeps settings of its own, which still apply to it \
             (`bridge reset gpu-2` forgets them)"
        ),
        "{}",
        out.stderr
    );
    let change = json_object(
        &run_cli(
            &hub.url,
            &["reset", "--all", "--format", "json", "--no-wait"],
        )
        .await,
    );
    assert_eq!(
        change["levels_keeping_settings"],
        serde_json::json!(["worker gpu-1", "worker gpu-2"])
    );
    let change = json_object(
        &run_cli(
            &hub.url,
            &["reset", "gpu-2", "--format", "json", "--no-wait"],
        )
        .await,
    );
    assert_eq!(change["levels_keeping_settings"], serde_json::json!([]));
}

#[test]
fn shell_completions_load_in_bash() {
    let bridge = bridge_tests::bin("bridge");
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(&bridge)
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("subscribe") && script.contains("request-timeout"),
            "{shell}"
        );
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({:?} completions bash) && complete -p bridge",
            bridge
        ))
        .output()
        .expect("run bash");
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && registered.contains("complete") && registered.ends_with("bridge\n"),
        "{registered} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
