//! Label levels: a change for `--label zone=a` reaches exactly the workers with that label,
//! including ones that join later, sits between the pool's settings and the worker's own, shows
//! in `bridge control`, and survives a hub restart; subscriptions filter on workers' labels; bad
//! label syntax is refused.

use std::time::Duration;

use bridge::client::HubClient;
use bridge_proto::v1::{self, selector::Target, update_control_request::Change};
use bridge_tests::{
    HubOptions, HubProcess, Recorder, WorkerProcess, eventually, run_cli, worker_info,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// The sampling rate `id` has applied, once it applied the version the hub wants.
async fn applied_rate(client: &HubClient, id: &str) -> Option<f64> {
    let info = worker_info(&mut client.clone(), id).await?;
    (info.connected && info.applied_version == Some(info.desired_version))
        .then_some(info.control?.sampling_rate)
}

async fn wait_for_rate(client: &HubClient, id: &str, rate: f64) {
    eventually(&format!("{id} to apply sampling {rate}"), WAIT, || async {
        (applied_rate(client, id).await == Some(rate)).then_some(())
    })
    .await;
}

fn worker(hub: &HubProcess, id: &str, labels: &[&str]) -> WorkerProcess {
    let mut args = vec!["--simulate", "20"];
    for label in labels {
        args.extend(["--label", label]);
    }
    WorkerProcess::start(&hub.url, id, "llama", &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_level_reaches_only_matching_workers_including_later_ones_and_outlives_a_restart() {
    let state = tempfile::tempdir().expect("state dir");
    // Configured ties: the label level wins over the pool's.
    let config = "[control.pools.llama]\nsampling_rate = 0.9\n\
                  [control.labels.\"zone=a\"]\nsampling_rate = 0.8\n";
    let options = HubOptions {
        state_dir: Some(state.path().to_owned()),
        config: Some(config.into()),
        ..Default::default()
    };
    let mut hub = HubProcess::start_with(options.clone());
    let client = hub.client().await;
    let _a = worker(&hub, "gpu-a", &["zone=a", "rack=1"]);
    let _b = worker(&hub, "gpu-b", &["zone=b", "rack=1"]);
    wait_for_rate(&client, "gpu-a", 0.8).await;
    wait_for_rate(&client, "gpu-b", 0.9).await;

    let out = run_cli(&hub.url, &["sample", "--label", "zone=a", "0.25"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("gpu-a: sampling 0.25 applied in ") && !out.stdout.contains("gpu-b"),
        "{}",
        out.stdout
    );
    assert_eq!(applied_rate(&client, "gpu-a").await, Some(0.25));
    assert_eq!(applied_rate(&client, "gpu-b").await, Some(0.9));
    assert!(
        hub.log()
            .lines()
            .any(|l| l.contains("control changed") && l.contains("workers labelled zone=a")),
        "{}",
        hub.log()
    );

    // `bridge control WORKER` shows the label level among the levels that apply.
    let out = run_cli(&hub.url, &["control", "gpu-a"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("labels zone=a"))
        .unwrap_or_else(|| panic!("no label level in:\n{}", out.stdout));
    assert!(line.contains("rate=0.25"), "{line}");
    let out = run_cli(&hub.url, &["control", "gpu-b"]).await;
    assert!(!out.stdout.contains("labels"), "{}", out.stdout);
    let out = run_cli(
        &hub.url,
        &["control", "--label", "zone=a", "--format", "json"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let shown: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(shown["effective"]["sampling_rate"], 0.25, "{shown}");
    assert_eq!(shown["labels"][0]["labels"]["zone"], "a", "{shown}");

    // `bridge workers --label` lists the matching workers only.
    let out = run_cli(
        &hub.url,
        &["workers", "--label", "rack=1", "--label", "zone=b"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("gpu-b") && !out.stdout.contains("gpu-a"),
        "{}",
        out.stdout
    );

    // A worker that joins later with the label gets the setting; one without it does not.
    let _c = worker(&hub, "gpu-c", &["zone=a", "rack=2"]);
    let _d = worker(&hub, "gpu-d", &[]);
    wait_for_rate(&client, "gpu-c", 0.25).await;
    wait_for_rate(&client, "gpu-d", 0.9).await;

    // The hub dies and comes back on the same address and state directory.
    let addr = hub.addr;
    hub.kill();
    drop(hub);
    let hub = HubProcess::start_with(HubOptions {
        listen: Some(addr),
        ..options
    });
    let client = hub.client().await;
    wait_for_rate(&client, "gpu-a", 0.25).await;
    wait_for_rate(&client, "gpu-c", 0.25).await;
    wait_for_rate(&client, "gpu-b", 0.9).await;

    // A reset of the pool names the label level that keeps its settings.
    let out = run_cli(&hub.url, &["reset", "--pool", "llama"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains(
            "note: labels zone=a keeps settings of its own, which still apply to its workers \
             (`bridge reset --label zone=a` forgets them)"
        ),
        "{}",
        out.stderr
    );
    let out = run_cli(&hub.url, &["reset", "--label", "zone=a"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // Back to the configured label level (config.toml's settings are never reset).
    wait_for_rate(&client, "gpu-a", 0.8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_labels_receives_only_matching_workers_events() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(
        &mut client,
        v1::SubscribeRequest {
            patterns: vec!["inference.>".into()],
            worker_labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        },
    )
    .await;
    let everything = Recorder::start(
        &mut client,
        v1::SubscribeRequest {
            patterns: vec!["inference.>".into()],
            ..Default::default()
        },
    )
    .await;
    let _a = worker(&hub, "gpu-a", &["zone=a"]);
    let _b = worker(&hub, "gpu-b", &["zone=b"]);
    eventually("events from both workers", WAIT, || async {
        let from = |id: &str| everything.deliveries().iter().any(|d| d.worker_id == id);
        (from("gpu-a") && from("gpu-b") && tail.deliveries().len() >= 20).then_some(())
    })
    .await;
    assert!(
        tail.deliveries().iter().all(|d| d.worker_id == "gpu-a"),
        "only gpu-a's events"
    );

    let out = run_cli(
        &hub.url,
        &[
            "subscribe",
            "inference.>",
            "--label",
            "zone=b",
            "--format",
            "json",
            "--limit",
            "10",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.json_lines();
    assert_eq!(lines.len(), 10, "{}", out.stdout);
    assert!(
        lines.iter().all(|l| l["worker_id"] == "gpu-b"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_label_syntax_is_refused_with_one_line() {
    let hub = HubProcess::start();
    for (label, problem) in [
        ("zone", "`zone`: write it as key=value"),
        ("=x", "`=x`: write it as key=value"),
        ("Zone=x", "label key: \"Zone\" is not a valid label key"),
        ("zone=a\u{7}b", "label `zone`: label value"),
        ("zone=", "the value is empty"),
    ] {
        for args in [
            &["sample", "--label", label, "0.5"][..],
            &["workers", "--label", label],
            &["subscribe", "--label", label],
        ] {
            let out = run_cli(&hub.url, args).await;
            assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
            let stderr = out.stderr.trim_end();
            assert!(
                !stderr.contains('\n') && stderr.contains(problem),
                "{args:?}: {stderr}"
            );
        }
    }
    let out = run_cli(&hub.url, &["sample", "gpu-1", "--label", "zone=a", "0.5"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = run_cli(&hub.url, &["reset", "--pool", "llama", "--label", "zone=a"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");

    let mut client = hub.client().await;
    let raw = client.raw();
    let labels = |items: &[(&str, &str)]| {
        Target::Labels(v1::LabelSelector {
            labels: items
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
    };
    let too_many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let too_many: Vec<(&str, &str)> = too_many
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (target, problem) in [
        (labels(&[]), "selector.labels: no labels"),
        (
            labels(&[("Zone", "a")]),
            "selector.labels: label key: \"Zone\"",
        ),
        (labels(&[("zone", "a\nb")]), "selector.labels: label `zone`"),
        (labels(&too_many), "17 labels; at most 16"),
    ] {
        let status = raw
            .update_control(v1::UpdateControlRequest {
                selector: Some(v1::Selector {
                    target: Some(target),
                }),
                change: Some(Change::Toggle(v1::TelemetryToggle { enabled: false })),
                wait_ms: 0,
                for_ms: 0,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(problem), "{status:?}");
    }
    let status = raw
        .subscribe(v1::SubscribeRequest {
            worker_labels: [("zone".to_owned(), String::new())].into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("worker_labels: label `zone`"),
        "{status:?}"
    );
}
