//! Per-model inference metrics on `/metrics`: exact at full rate, estimates of the truth while
//! sampled, bounded labels, and an exposition that stays valid whatever the names.

use std::{net::SocketAddr, time::Duration};

use bridge_proto::{
    protocol::{gpu, headers, inference},
    v1::{self, TelemetryValue, telemetry_value::Value},
};
use bridge_tests::{
    HubOptions, HubProcess, Recorder, WorkerProcess, eventually, http_get, int, matching,
    metric_sample as sample, name, open_stream, promtool_check, run_cli,
};

const WAIT: Duration = Duration::from_secs(20);

fn scrape(http: SocketAddr) -> String {
    let response = tokio::task::block_in_place(|| http_get(http, "/metrics", &[]));
    assert_eq!(response.status, 200, "{response:?}");
    response.body
}

/// An event as a plain client generated from the .proto sends it, saying it sampled nothing.
fn event(
    name: &str,
    measurements: &[(&str, Value)],
    metadata: &[(&str, &str)],
    correlation_id: &str,
) -> v1::TelemetryEvent {
    v1::TelemetryEvent {
        event_parts: name.split('.').map(str::to_owned).collect(),
        measurements: measurements
            .iter()
            .map(|(k, v)| {
                let value = Some(v.clone());
                ((*k).to_owned(), TelemetryValue { value })
            })
            .collect(),
        metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        correlation_id: correlation_id.to_owned(),
        sampling_rate: 1.0,
        ..Default::default()
    }
}

fn stop(model: &str) -> v1::TelemetryEvent {
    event(inference::STOP, &[], &[(inference::MODEL, model)], "")
}

/// Sends `events` as worker `id` of `pool`, and waits until the hub has passed them all on or
/// dropped them; returns how many it passed on.
async fn send(hub: &HubProcess, id: &str, pool: &str, events: Vec<v1::TelemetryEvent>) -> f64 {
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(
        &mut client,
        &[(headers::WORKER_ID, id), (headers::WORKER_POOL, pool)],
    )
    .await
    .expect("stream");
    let count = events.len() as f64;
    for event in events {
        sender.send(event).await.expect("send");
    }
    // As a label value: quotes and backslashes escaped.
    let id = id.replace('\\', "\\\\").replace('"', "\\\"");
    let (received, delivered) = (
        format!("bridge_events_received_total{{worker=\"{id}\"}}"),
        format!("bridge_events_delivered_total{{worker=\"{id}\"}}"),
    );
    let sampled_out =
        format!("bridge_hub_dropped_events_total{{worker=\"{id}\",reason=\"sampled_out\"}}");
    eventually("the hub to take every event", WAIT, || async {
        let text = scrape(hub.http);
        let delivered = sample(&text, &delivered).unwrap_or(0.0);
        let dropped = sample(&text, &sampled_out).unwrap_or(0.0);
        (sample(&text, &received) == Some(count) && delivered + dropped == count)
            .then_some(delivered)
    })
    .await
}

/// Waits until every `(series, value)` is exposed exactly (sums within rounding), and returns
/// the exposition; on timeout, fails naming the first that is not.
async fn expect(http: SocketAddr, expected: &[(String, f64)]) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = scrape(http);
        let wrong = expected.iter().find(|(series, value)| {
            sample(&text, series).is_none_or(|found| (found - value).abs() > 1e-9 * value.abs())
        });
        match wrong {
            None => return text,
            Some((series, value)) if std::time::Instant::now() > deadline => {
                panic!(
                    "expected `{series} {value}`, found {:?} in\n{text}",
                    sample(&text, series)
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn series(name: &str, labels: &str, value: f64) -> (String, f64) {
    (format!("{name}{{{labels}}}"), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_metrics_are_exact_at_full_rate() {
    let hub = HubProcess::start();
    let ms = |n: i64| Value::IntValue(n * 1_000_000);
    let llama = |name, measurements: &[(&str, Value)], result| {
        let metadata = [(inference::MODEL, "llama"), (inference::RESULT, result)];
        event(name, measurements, &metadata, "")
    };
    let full = [
        (inference::DURATION_NS, ms(50)),
        (inference::TIME_TO_FIRST_TOKEN_NS, ms(10)),
        (inference::QUEUE_WAIT_NS, ms(1)),
        (inference::INPUT_TOKENS, Value::IntValue(100)),
        (inference::OUTPUT_TOKENS, Value::IntValue(20)),
    ];
    let events = vec![
        llama(inference::STOP, &full, "success"),
        llama(inference::STOP, &full, "success"),
        llama(inference::STOP, &full, "success"),
        llama(
            inference::EXCEPTION,
            &[
                (inference::DURATION_NS, ms(2000)),
                (inference::INPUT_TOKENS, Value::IntValue(7)),
            ],
            "error",
        ),
        // `result` says more than the name.
        llama(inference::STOP, &[(inference::DURATION_NS, ms(3))], "error"),
        // Fields of the wrong type or sign are left out; the call still counts.
        event(
            inference::STOP,
            &[
                (inference::DURATION_NS, Value::FloatValue(5e8)),
                (inference::TIME_TO_FIRST_TOKEN_NS, Value::IntValue(-1)),
                (inference::INPUT_TOKENS, Value::IntValue(5)),
                (inference::OUTPUT_TOKENS, Value::IntValue(6)),
            ],
            &[(inference::MODEL, "mistral")],
            "",
        ),
        // No model; longer than the last bucket.
        event(
            inference::STOP,
            &[(inference::DURATION_NS, ms(70_000))],
            &[],
            "",
        ),
        // Not calls.
        event(inference::START, &[], &[(inference::MODEL, "llama")], ""),
        event(gpu::METRICS_EVENT, &[], &[(inference::MODEL, "llama")], ""),
    ];
    assert_eq!(send(&hub, "exact-1", "exact", events).await, 9.0);

    let llama = r#"pool="exact",model="llama""#;
    let mistral = r#"pool="exact",model="mistral""#;
    let unknown = r#"pool="exact",model="unknown""#;
    let requests = "bridge_inference_requests_total";
    let tokens = "bridge_inference_tokens_total";
    let duration = "bridge_inference_duration_seconds";
    let text = expect(
        hub.http,
        &[
            series(requests, &format!("{llama},result=\"success\""), 3.0),
            series(requests, &format!("{llama},result=\"error\""), 2.0),
            series(tokens, &format!("{llama},direction=\"input\""), 307.0),
            series(tokens, &format!("{llama},direction=\"output\""), 60.0),
            series(&format!("{duration}_count"), llama, 5.0),
            series(&format!("{duration}_sum"), llama, 2.153),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"0.005\""),
                1.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"0.025\""),
                1.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"0.05\""),
                4.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"1.0\""),
                4.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"2.5\""),
                5.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{llama},le=\"+Inf\""),
                5.0,
            ),
            series(
                "bridge_inference_time_to_first_token_seconds_count",
                llama,
                3.0,
            ),
            series(
                "bridge_inference_time_to_first_token_seconds_sum",
                llama,
                0.03,
            ),
            series("bridge_inference_queue_wait_seconds_count", llama, 3.0),
            series("bridge_inference_queue_wait_seconds_sum", llama, 0.003),
            series(requests, &format!("{mistral},result=\"success\""), 1.0),
            series(requests, &format!("{mistral},result=\"error\""), 0.0),
            series(tokens, &format!("{mistral},direction=\"input\""), 5.0),
            series(tokens, &format!("{mistral},direction=\"output\""), 6.0),
            series(&format!("{duration}_count"), mistral, 0.0),
            series(
                "bridge_inference_time_to_first_token_seconds_count",
                mistral,
                0.0,
            ),
            series(requests, &format!("{unknown},result=\"success\""), 1.0),
            series(
                &format!("{duration}_bucket"),
                &format!("{unknown},le=\"60.0\""),
                0.0,
            ),
            series(
                &format!("{duration}_bucket"),
                &format!("{unknown},le=\"+Inf\""),
                1.0,
            ),
            series(&format!("{duration}_sum"), unknown, 70.0),
            series(
                "bridge_inference_models_folded_total",
                r#"pool="exact""#,
                0.0,
            ),
        ],
    )
    .await;
    // Three models and nothing else: the hub's own events are not calls.
    let models = text
        .lines()
        .filter(|l| l.starts_with("bridge_inference_requests_total{"))
        .count();
    assert_eq!(models, 6, "{text}");
    promtool_check(&text);
}

/// At rate 0.5 the hub keeps about half the calls and counts each twice: the figures estimate
/// the 4,000 calls made, within 6 standard deviations of the estimate (sd = sqrt(n (1-p) / p)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_metrics_estimate_the_truth_while_sampled() {
    let hub = HubProcess::start();
    let out = run_cli(&hub.url, &["sample", "--pool", "sampled", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let calls = 4000;
    let events = (0..calls)
        .map(|i| {
            event(
                inference::STOP,
                &[
                    (inference::DURATION_NS, Value::IntValue(100_000_000)),
                    (inference::INPUT_TOKENS, Value::IntValue(10)),
                ],
                &[(inference::MODEL, "llama")],
                &format!("request-{i}"),
            )
        })
        .collect();
    let kept = send(&hub, "sampler-1", "sampled", events).await;
    let calls = f64::from(calls);
    assert!(kept > 0.0 && kept < calls, "kept {kept} of {calls}");

    let labels = r#"pool="sampled",model="llama""#;
    let estimate = 2.0 * kept;
    let text = expect(
        hub.http,
        &[
            series(
                "bridge_inference_requests_total",
                &format!("{labels},result=\"success\""),
                estimate,
            ),
            series(
                "bridge_inference_tokens_total",
                &format!("{labels},direction=\"input\""),
                10.0 * estimate,
            ),
            series("bridge_inference_duration_seconds_count", labels, estimate),
            series(
                "bridge_inference_duration_seconds_sum",
                labels,
                0.1 * estimate,
            ),
        ],
    )
    .await;
    let sd = (calls * (1.0 - 0.5) / 0.5).sqrt();
    assert!(
        (estimate - calls).abs() <= 6.0 * sd,
        "estimated {estimate} calls of {calls} (sd {sd:.1})"
    );
    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_beyond_the_cap_fold_into_other_and_are_counted() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(
            "[metrics]\nmax_models_per_pool = 2\n[limits]\nmax_string_bytes = 16384\n".into(),
        ),
        ..Default::default()
    });
    let long = "m".repeat(10 * 1024);
    let names = ["m1", "m2", "m3", "m1", "m4", long.as_str(), "other"];
    let events = names.iter().map(|m| stop(m)).collect();
    send(&hub, "capped-1", "capped", events).await;
    // Another pool has room of its own.
    send(&hub, "roomy-1", "roomy", vec![stop("m3")]).await;

    let requests = |pool: &str, model: &str, value| {
        series(
            "bridge_inference_requests_total",
            &format!("pool=\"{pool}\",model=\"{model}\",result=\"success\""),
            value,
        )
    };
    let folded = |pool: &str, value| {
        series(
            "bridge_inference_models_folded_total",
            &format!("pool=\"{pool}\""),
            value,
        )
    };
    let text = expect(
        hub.http,
        &[
            requests("capped", "m1", 2.0),
            requests("capped", "m2", 1.0),
            // m3, m4 and the long name had no room; "other" itself is not folded.
            requests("capped", "other", 4.0),
            folded("capped", 3.0),
            requests("roomy", "m3", 1.0),
            folded("roomy", 0.0),
        ],
    )
    .await;
    for absent in ["model=\"m3\"", "model=\"m4\"", "mmmmmmmmmm"] {
        assert!(
            !text
                .lines()
                .any(|l| l.contains("pool=\"capped\"") && l.contains(absent)),
            "{absent} has series of its own:\n{text}"
        );
    }
    promtool_check(&text);
}

/// Names come from the network: quotes, backslashes, line breaks, any Unicode, 10 KB. The
/// exposition stays valid in both formats (promtool reads the classic one). (Worker ids and
/// pools cannot hold `"` or `\`: the hub refuses them at the edge, see `errors.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_names_keep_the_exposition_valid() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[limits]\nmax_string_bytes = 16384\n".into()),
        ..Default::default()
    });
    let long = "é".repeat(5 * 1024);
    let names = [
        "quote\"d",
        "back\\slash",
        "trailing\\",
        "new\nline",
        "tab\tbed",
        "模型-ü-🚀",
        "a=\"b\",c} 1",
        "# HELP x",
        "",
        long.as_str(),
    ];
    let events = names.iter().map(|m| stop(m)).collect();
    let (worker, pool) = ("odd-worker.1", "odd_pool");
    send(&hub, worker, pool, events).await;

    let labels = |model: &str| format!(r#"pool="odd_pool",model="{model}",result="success""#);
    let requests =
        |model: &str, value| series("bridge_inference_requests_total", &labels(model), value);
    let text = expect(
        hub.http,
        &[
            requests(r#"quote\"d"#, 1.0),
            requests(r"back\\slash", 1.0),
            requests(r"trailing\\", 1.0),
            requests("模型-ü-🚀", 1.0),
            requests(r#"a=\"b\",c} 1"#, 1.0),
            requests("# HELP x", 1.0),
            requests("unknown", 1.0),
            // The line break, the tab and the 10 KB name.
            requests("other", 3.0),
            series(
                "bridge_events_received_total",
                r#"worker="odd-worker.1""#,
                names.len() as f64,
            ),
        ],
    )
    .await;
    promtool_check(&text);
    let openmetrics = tokio::task::block_in_place(|| {
        http_get(
            hub.http,
            "/metrics",
            &[("Accept", "application/openmetrics-text; version=1.0.0")],
        )
    })
    .body;
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    let series = format!(
        "bridge_inference_requests_total{{{}}} 1.0",
        labels(r#"quote\"d"#)
    );
    assert!(openmetrics.lines().any(|l| l == series), "{openmetrics}");
}

/// A real worker's spans (the worker library's own encoder): every call it reported, and
/// the tokens of each, are in the metrics, as many as a subscriber received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_workers_calls_are_counted_as_delivered() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(
        &mut client,
        matching(&[inference::STOP, inference::EXCEPTION]),
    )
    .await;
    let labels = r#"pool="sim",model="llama-3-8b""#;
    let calls = |text: &str| {
        ["success", "error"]
            .iter()
            .map(|r| {
                let series = format!("bridge_inference_requests_total{{{labels},result=\"{r}\"}}");
                sample(text, &series).unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let worker = WorkerProcess::start(&hub.url, "sim-1", "sim", &["--simulate", "200"]);
    eventually("calls to be counted", WAIT, || async {
        (calls(&scrape(hub.http)) >= 50.0).then_some(())
    })
    .await;
    // SIGTERM: the worker drains what it buffered, then leaves, and the figures stay put.
    tokio::task::block_in_place(|| drop(worker));
    eventually("the worker to leave", WAIT, || async {
        (sample(&scrape(hub.http), "bridge_workers_connected") == Some(0.0)).then_some(())
    })
    .await;
    let input = format!("bridge_inference_tokens_total{{{labels},direction=\"input\"}}");
    let output = format!("bridge_inference_tokens_total{{{labels},direction=\"output\"}}");
    eventually(
        "the subscriber to have every call the metrics counted",
        WAIT,
        || async {
            let text = scrape(hub.http);
            let delivered = tail.deliveries();
            let sum = |key| delivered.iter().filter_map(|d| int(d, key)).sum::<i64>() as f64;
            let stops = delivered
                .iter()
                .filter(|d| name(d) == inference::STOP)
                .count();
            (calls(&text) == delivered.len() as f64
                && stops > 0
                && sample(&text, &input) == Some(sum(inference::INPUT_TOKENS))
                && sample(&text, &output) == Some(sum(inference::OUTPUT_TOKENS)))
            .then_some(())
        },
    )
    .await;
}
