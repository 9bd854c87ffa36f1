//! `bridge subscribe --where` and `?where=`: subscriptions filtered on metadata at the hub.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use bridge_proto::{protocol::headers, v1};
use bridge_tests::{
    HubProcess, Recorder, bin, eventually, http_get, open_stream, read_lines_within, run_cli,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn stop(correlation_id: &str, name: &str, metadata: &[(&str, &str)]) -> v1::TelemetryEvent {
    v1::TelemetryEvent {
        event_parts: name.split('.').map(str::to_owned).collect(),
        metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        correlation_id: correlation_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_delivers_only_events_whose_metadata_holds() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let everything = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let mut tail = Command::new(bin("bridge"))
        .args([
            "--hub",
            &hub.url,
            "subscribe",
            "inference.>",
            "--format",
            "json",
        ])
        .args(["--where", "model=llama-70b", "--where", "result!=success"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge subscribe");
    hub.wait_for_subscribers(2, WAIT).await;

    let (events, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-3")])
        .await
        .expect("stream opens");
    let llama = ("model", "llama-70b");
    let sent = [
        stop("failed", "inference.stop", &[llama, ("result", "error")]),
        stop(
            "succeeded",
            "inference.stop",
            &[llama, ("result", "success")],
        ),
        stop(
            "other-model",
            "inference.stop",
            &[("model", "mistral"), ("result", "error")],
        ),
        stop("no-result", "inference.stop", &[llama]),
        stop("other-name", "gpu.metrics", &[llama, ("result", "error")]),
        stop(
            "other-case",
            "inference.stop",
            &[("model", "LLAMA-70B"), ("result", "error")],
        ),
        stop("no-metadata", "inference.exception", &[]),
        stop(
            "last",
            "inference.exception",
            &[llama, ("result", "timeout")],
        ),
    ];
    let count = sent.len();
    for event in sent {
        events.send(event).await.expect("send");
    }
    eventually(
        "every event to reach the unfiltered subscriber",
        WAIT,
        || async {
            let names = everything.deliveries();
            (names.iter().filter(|d| d.worker_id == "gpu-3").count() >= count).then_some(())
        },
    )
    .await;

    let stdout = tail.stdout.take().expect("stdout");
    let lines = read_lines_within(stdout, 3, WAIT).expect("three matching events");
    let ids: Vec<String> = lines
        .iter()
        .map(|line| {
            let json: Value = serde_json::from_str(line).expect("json");
            json["correlation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    // `no-result`: a key that is absent is not `success`.
    assert_eq!(ids, ["failed", "no-result", "last"]);
    let _ = tail.kill();
    let _ = tail.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_is_not_one_is_refused_in_one_line() {
    let hub = HubProcess::start();
    let long = format!("model={}", "x".repeat(300));
    for bad in ["model", "=llama", "!=success", long.as_str()] {
        let output = run_cli(&hub.url, &["subscribe", "--where", bad]).await;
        assert_eq!(output.code, Some(2), "{bad}: {output:?}");
        assert_eq!(output.stderr.trim().lines().count(), 1, "{output:?}");
        assert!(output.stderr.contains("--where"), "{output:?}");
        let query = bad.replace('!', "%21").replace('=', "%3D");
        let refused = http_get(hub.http, &format!("/api/events?where={query}"), &[]);
        assert_eq!(refused.status, 400, "{bad}: {refused:?}");
        assert!(refused.body.contains("where"), "{refused:?}");
    }
    // A gRPC client that sends an empty key is told which condition.
    let mut client = hub.client().await;
    let refused = client
        .raw()
        .subscribe(v1::SubscribeRequest {
            metadata_conditions: vec![v1::MetadataCondition::default()],
            ..Default::default()
        })
        .await
        .expect_err("an empty key is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("metadata_conditions[0]"),
        "{refused:?}"
    );
}
