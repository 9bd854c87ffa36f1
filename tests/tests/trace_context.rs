//! W3C trace context end to end: from an app's `TELEMETRY:` lines through sidecars and the hub
//! to `bridge subscribe --trace`, and trace-consistent sampling across workers.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use bridge_proto::{protocol::counters, trace, v1};
use bridge_tests::{
    HubProcess, QUICK_WORKER_CONFIG, Recorder, WorkerProcess, bin, eventually, http_get, name,
    run_cli, worker_info,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";
const GATEWAY_SPAN: &str = "00f067aa0ba902b7";
const MODEL_SPAN: &str = "b7ad6b7169203331";

/// A shell script in a temporary directory that writes `lines` to stderr.
fn app(lines: &[String]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.sh");
    let body: String = lines
        .iter()
        .map(|line| format!("echo '{line}' >&2\n"))
        .collect();
    std::fs::write(&path, body).expect("write script");
    let path = path.to_str().expect("utf-8 path").to_owned();
    (dir, path)
}

/// Runs `sh app` under a sidecar named `id` until it exits; its stderr.
async fn run_sidecar(hub: &HubProcess, id: &str, app: &str) -> String {
    let mut command = WorkerProcess::command(
        &hub.url,
        id,
        "llama",
        QUICK_WORKER_CONFIG,
        &["--", "sh", app],
    );
    command.command.env("RUST_LOG", "off");
    let output = tokio::task::spawn_blocking(move || command.command.output())
        .await
        .expect("join")
        .expect("run worker");
    assert_eq!(output.status.code(), Some(0));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn line(event: &str, traceparent: &str, extra: &str) -> String {
    format!(r#"TELEMETRY:{{"event":"{event}","traceparent":"{traceparent}"{extra}}}"#)
}

/// A gateway and a model server, each behind a sidecar, report two requests; following one
/// trace id shows that request's events from both, with their span tree, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_followed_by_its_trace_id_across_workers() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let everything = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    // Upper case, as someone might paste it: still the same trace.
    let mut follow = Command::new(bin("bridge"))
        .args(["--hub", &hub.url, "subscribe", "--format", "json"])
        .args(["--trace", &TRACE_A.to_uppercase(), "--limit", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge subscribe");
    hub.wait_for_subscribers(2, WAIT).await;

    let gateway_span = |trace: &str| format!("00-{trace}-{GATEWAY_SPAN}-01");
    let model_span = |trace: &str| format!("00-{trace}-{MODEL_SPAN}-01");
    let child = format!(r#","parent_span_id":"{GATEWAY_SPAN}""#);
    let bad =
        r#"TELEMETRY:{"event":"gateway.request","traceparent":"00-4bf92f35-00f067aa0ba902b7-01"}"#;
    let (_g, gateway) = app(&[
        line("gateway.request", &gateway_span(TRACE_A), ""),
        line("gateway.request", &gateway_span(TRACE_B), ""),
        bad.to_owned(),
    ]);
    let (_m, model) = app(&[
        line("inference.start", &model_span(TRACE_A), &child),
        line("inference.stop", &model_span(TRACE_A), &child),
        line("inference.stop", &model_span(TRACE_B), &child),
    ]);
    let gateway_stderr = run_sidecar(&hub, "gateway", &gateway).await;
    run_sidecar(&hub, "model", &model).await;
    assert_eq!(
        gateway_stderr.trim(),
        bad,
        "a line with a bad traceparent passes through"
    );

    let stdout = follow.stdout.take().expect("stdout");
    let lines: Vec<Value> = tokio::task::block_in_place(|| {
        BufReader::new(stdout)
            .lines()
            .map(|line| serde_json::from_str(&line.expect("a line")).expect("JSON"))
            .collect()
    });
    assert_eq!(follow.wait().expect("exit").code(), Some(0));
    let summary: Vec<(String, String, String, Option<String>)> = lines
        .iter()
        .map(|event| {
            assert_eq!(event["trace_id"], TRACE_A, "{event}");
            (
                event["worker_id"].as_str().unwrap_or("").to_owned(),
                event["event"].as_str().unwrap_or("").to_owned(),
                event["span_id"].as_str().unwrap_or("").to_owned(),
                event
                    .get("parent_span_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            )
        })
        .collect();
    let span = |w: &str, e: &str, s: &str, p: Option<&str>| {
        (
            w.to_owned(),
            e.to_owned(),
            s.to_owned(),
            p.map(str::to_owned),
        )
    };
    assert_eq!(
        summary,
        [
            span("gateway", "gateway.request", GATEWAY_SPAN, None),
            span("model", "inference.start", MODEL_SPAN, Some(GATEWAY_SPAN)),
            span("model", "inference.stop", MODEL_SPAN, Some(GATEWAY_SPAN)),
        ]
    );

    // Everyone else saw trace B too; the bad line was counted, not sent.
    let traces: BTreeSet<String> = everything
        .deliveries()
        .iter()
        .filter_map(|d| d.event.as_ref())
        .filter(|e| !e.trace_id.is_empty())
        .map(|e| trace::hex(&e.trace_id))
        .collect();
    assert_eq!(traces, [TRACE_B.to_owned(), TRACE_A.to_owned()].into());
    let info = eventually("the gateway's final counters", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gateway")
                .await
                .filter(|w| !w.connected && w.worker_counters.contains_key(counters::CONFIRMED))
        }
    })
    .await;
    assert_eq!(info.worker_counters[counters::DROPPED_PARSE_ERROR], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_that_is_not_one_is_refused_with_a_clear_error() {
    let hub = HubProcess::start();
    for bad in ["4bf92f35", "00000000000000000000000000000000", "zz"] {
        let output = run_cli(&hub.url, &["subscribe", "--trace", bad]).await;
        assert_eq!(output.code, Some(2), "{output:?}");
        assert_eq!(output.stderr.trim().lines().count(), 1, "{output:?}");
        assert!(output.stderr.contains("--trace"), "{output:?}");
        let refused = http_get(hub.http, &format!("/api/events?trace={bad}"), &[]);
        assert_eq!(refused.status, 400, "{refused:?}");
        assert!(refused.body.contains("trace"), "{refused:?}");
    }
}

/// Two workers see the same 1,000 traces (each under its own correlation ids) while their
/// pool is sampled at 0.3: they keep the same traces, about 30 % of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sampling_the_same_traces_keep_the_same_ones() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    // A rule, so that the workers' own `worker.exit` (at the default 1.0) marks their end.
    let sampled = run_cli(
        &hub.url,
        &[
            "sample",
            "--pool",
            "llama",
            "--pattern",
            "inference.>",
            "--no-wait",
            "0.3",
        ],
    )
    .await;
    assert_eq!(sampled.code, Some(0), "{sampled:?}");
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let traces = 1000;
    let lines = |worker: &str| -> Vec<String> {
        (1..=traces)
            .map(|i| {
                let traceparent = format!("00-{i:032x}-{i:016x}-01");
                line(
                    "inference.stop",
                    &traceparent,
                    &format!(r#","correlation_id":"{worker}-{i}""#),
                )
            })
            .collect()
    };
    let (_a, app_a) = app(&lines("a"));
    let (_b, app_b) = app(&lines("b"));
    let (a, b) = tokio::join!(
        run_sidecar(&hub, "worker-a", &app_a),
        run_sidecar(&hub, "worker-b", &app_b)
    );
    assert_eq!((a.as_str(), b.as_str()), ("", ""));
    let kept = eventually("both workers' exits", WAIT, || async {
        let deliveries = tail.deliveries();
        let exits = deliveries
            .iter()
            .filter(|d| name(d) == "worker.exit")
            .count();
        (exits == 2).then_some(deliveries)
    })
    .await;
    let traces_of = |worker: &str| -> BTreeSet<String> {
        kept.iter()
            .filter(|d| d.worker_id == worker && name(d) == "inference.stop")
            .map(|d| trace::hex(&d.event.as_ref().expect("event").trace_id))
            .collect()
    };
    let (a, b) = (traces_of("worker-a"), traces_of("worker-b"));
    assert_eq!(a, b, "the two workers kept different traces");
    // Binomial(1000, 0.3): sd ≈ 14.5; six of them.
    assert!(
        (213..=387).contains(&a.len()),
        "kept {} of {traces}",
        a.len()
    );
}
