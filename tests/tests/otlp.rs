//! The hub's OTLP export, received by a server built on the official OpenTelemetry protobufs
//! (`tests/python/otlp_receiver.py`, PyPI `opentelemetry-proto`): what arrives, a collector that
//! refuses for a while, and one that never answers.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bridge_proto::{protocol::headers, v1};
use bridge_tests::{
    HubOptions, HubProcess, eventually, http_get, open_stream, python_with, repo_root,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// The receiver process and every line it printed after its address.
struct Receiver {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// `None` (skipped, said on stderr) without a Python that has grpcio and
    /// opentelemetry-proto, unless BRIDGE_REQUIRE_PYTHON is set (./test.sh sets it).
    fn start(mode: &str) -> Option<Self> {
        let python = python_with(&["grpc", "opentelemetry.proto"])?;
        let mut child = Command::new(&python)
            .arg(repo_root().join("tests/python/otlp_receiver.py"))
            .arg(mode)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout
            .read_line(&mut first)
            .expect("the receiver's address");
        let port = first
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line).expect("the receiver prints JSON");
                sink.lock().expect("lines").push(value);
            }
        });
        Some(Self { child, port, lines })
    }

    fn received(&self, signal: &str) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|line| line["signal"] == signal && line.get("refused").is_none())
            .filter(|line| line.get("hanging").is_none())
            .cloned()
            .collect()
    }

    fn refusals(&self) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|line| line.get("refused").is_some())
            .count()
    }

    fn hub(&self, extra: &str) -> HubProcess {
        HubProcess::start_with(HubOptions {
            config: Some(format!(
                "[export.otlp]\nendpoint = \"http://127.0.0.1:{}\"\nlogs = [\"inference.>\"]\nbatch_age_ms = 50\n{extra}",
                self.port
            )),
            ..Default::default()
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` (sum of its samples with these labels) from the hub's /metrics.
fn metric(hub: &HubProcess, name: &str, labels: &str) -> u64 {
    let text = http_get(hub.http, "/metrics", &[]).body;
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn int(i: i64) -> v1::TelemetryValue {
    v1::TelemetryValue {
        value: Some(v1::telemetry_value::Value::IntValue(i)),
    }
}

fn event(name: &str, trace: u8, span: u8, timestamp_ns: i64) -> v1::TelemetryEvent {
    v1::TelemetryEvent {
        event_parts: name.split('.').map(str::to_owned).collect(),
        timestamp_ns,
        trace_id: vec![trace; 16],
        span_id: vec![span; 8],
        parent_span_id: vec![0xee; 8],
        metadata: [("model".to_owned(), "llama-70b".to_owned())].into(),
        ..Default::default()
    }
}

/// Log records and spans arrive with their names, times, typed attributes, ids, status and the
/// worker as their resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_log_records_and_spans() {
    let Some(receiver) = Receiver::start("ok") else {
        return;
    };
    let hub = receiver.hub("");
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(
        &mut client,
        &[
            (headers::WORKER_ID, "gpu-3"),
            (headers::WORKER_POOL, "llama"),
            ("x-worker-label-zone", "b"),
            (headers::WORKER_HOST, "node-7"),
        ],
    )
    .await
    .expect("worker stream");
    let start = event("inference.start", 0x4b, 0x0a, 1_700_000_000_000_000_000);
    let mut stop = event("inference.stop", 0x4b, 0x0a, 1_700_000_000_500_000_000);
    stop.measurements = [
        ("duration_ns".to_owned(), int(500_000_000)),
        ("output_tokens".to_owned(), int(212)),
        (
            "batch_fill_ratio".to_owned(),
            v1::TelemetryValue {
                value: Some(v1::telemetry_value::Value::FloatValue(0.5)),
            },
        ),
    ]
    .into();
    let mut failed = event("inference.exception", 0x4c, 0x0c, 1_700_000_001_000_000_000);
    failed.measurements = [("duration_ns".to_owned(), int(1_000))].into();
    failed
        .metadata
        .insert("error_message".into(), "CUDA out of memory".into());
    let unexported = event("cache.hit", 0x4b, 0x0d, 1_700_000_000_000_000_000);
    for event in [start, stop, failed, unexported] {
        sender.send(event).await.expect("send");
    }

    let (logs, spans) = eventually("3 log records and 2 spans", WAIT, || async {
        let (logs, spans) = (receiver.received("logs"), receiver.received("traces"));
        (logs.len() >= 3 && spans.len() >= 2).then_some((logs, spans))
    })
    .await;
    let resource = json!({
        "service.name": ["string_value", "llama"],
        "service.instance.id": ["string_value", "gpu-3"],
        "host.name": ["string_value", "node-7"],
        "zone": ["string_value", "b"],
    });
    let names: Vec<&str> = logs
        .iter()
        .filter_map(|l| l["event_name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["inference.start", "inference.stop", "inference.exception"]
    );
    let stop = &logs[1];
    assert_eq!(stop["resource"], resource);
    assert_eq!(stop["scope"], "telemetry-bridge");
    assert_eq!(stop["time"], 1_700_000_000_500_000_000_u64);
    assert!(stop["observed"].as_u64().unwrap_or(0) > 1_700_000_000_500_000_000);
    assert_eq!(stop["trace_id"], "4b".repeat(16));
    assert_eq!(stop["span_id"], "0a".repeat(8));
    assert_eq!(
        stop["attributes"]["output_tokens"],
        json!(["int_value", 212])
    );
    assert_eq!(
        stop["attributes"]["batch_fill_ratio"],
        json!(["double_value", 0.5])
    );
    assert_eq!(
        stop["attributes"]["model"],
        json!(["string_value", "llama-70b"])
    );
    assert_eq!(
        stop["attributes"]["bridge.sampling_rate"],
        json!(["double_value", 1.0])
    );
    assert_eq!(logs[2]["severity"], "ERROR");

    let by_name: BTreeMap<String, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap_or("").to_owned(), s))
        .collect();
    let ok = by_name["0a".repeat(8).as_str()];
    assert_eq!(ok["name"], "inference");
    assert_eq!(ok["resource"], resource);
    assert_eq!(ok["parent_span_id"], "ee".repeat(8));
    assert_eq!(ok["start"], 1_700_000_000_000_000_000_u64);
    assert_eq!(ok["end"], 1_700_000_000_500_000_000_u64);
    assert_eq!(ok["status_code"], 0);
    let error = by_name["0c".repeat(8).as_str()];
    assert_eq!(error["status_code"], 2, "{error}");
    assert_eq!(error["status_message"], "CUDA out of memory");

    let exported = eventually("the export counted", WAIT, || async {
        let hub = &hub;
        let counts = tokio::task::block_in_place(|| {
            (
                metric(hub, "bridge_otlp_exported_total", "signal=\"logs\""),
                metric(hub, "bridge_otlp_exported_total", "signal=\"traces\""),
            )
        });
        (counts == (3, 2)).then_some(counts)
    })
    .await;
    assert_eq!(exported, (3, 2));
}

/// A collector answering UNAVAILABLE for 4 s while events flow gets every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_away_for_a_while_gets_everything_exactly_once() {
    let Some(receiver) = Receiver::start("unavailable:4") else {
        return;
    };
    let hub = receiver.hub("traces = false\n");
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-3")])
        .await
        .expect("worker stream");
    let total = 3000;
    // About 500 a second, for six seconds: before, during and after the refusals.
    for i in 0..total {
        let mut tick = event("inference.tick", 0x4b, 0x0a, 1_700_000_000_000_000_000 + i);
        tick.measurements = [("i".to_owned(), int(i))].into();
        sender.send(tick).await.expect("send");
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let logs = eventually("every record", Duration::from_secs(60), || async {
        let logs = receiver.received("logs");
        (logs.len() >= total as usize).then_some(logs)
    })
    .await;
    let mut seen: Vec<i64> = logs
        .iter()
        .filter_map(|l| l["attributes"]["i"][1].as_i64())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..total).collect::<Vec<_>>(), "each exactly once");
    assert!(receiver.refusals() > 0, "the receiver never refused");
    assert_eq!(
        metric(&hub, "bridge_otlp_dropped_total", "signal=\"logs\""),
        0
    );
    let readyz = http_get(hub.http, "/readyz", &[]);
    assert_eq!(readyz.body.trim(), "ready", "{readyz:?}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A collector that never answers: the hub's memory stays bounded by the queue, and every
/// record offered is exported, dropped (counted by reason) or still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_a_bounded_queue_and_exact_counts() {
    let Some(receiver) = Receiver::start("hang") else {
        return;
    };
    let hub =
        receiver.hub("traces = false\nqueue_size = 1000\nbatch_size = 100\ntimeout_ms = 500\n");
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-3")])
        .await
        .expect("worker stream");
    let pad = "x".repeat(2000);
    let before = rss_kib(hub.pid());
    let total: u64 = 30_000;
    for i in 0..total {
        let mut tick = event("inference.tick", 0x4b, 0x0a, 1);
        tick.metadata.insert("pad".into(), pad.clone());
        tick.measurements = [("i".to_owned(), int(i as i64))].into();
        sender.send(tick).await.expect("send");
    }
    let offered = eventually("every record offered", WAIT, || async {
        let offered = tokio::task::block_in_place(|| {
            metric(&hub, "bridge_otlp_offered_total", "signal=\"logs\"")
        });
        (offered == total).then_some(offered)
    })
    .await;
    let grown = rss_kib(hub.pid()).saturating_sub(before);
    // 30,000 records of 2 KiB would be 60 MiB; the queue holds 1,000 (2 MiB).
    assert!(grown < 30 * 1024, "the hub grew by {grown} KiB");
    let exported = metric(&hub, "bridge_otlp_exported_total", "signal=\"logs\"");
    let dropped = metric(&hub, "bridge_otlp_dropped_total", "signal=\"logs\"");
    let full = metric(
        &hub,
        "bridge_otlp_dropped_total",
        "signal=\"logs\",reason=\"queue_full\"",
    );
    let queued = metric(&hub, "bridge_otlp_queue_items", "signal=\"logs\"");
    assert_eq!(exported, 0);
    assert_eq!(
        offered,
        exported + dropped + queued,
        "{dropped} dropped, {queued} queued"
    );
    assert_eq!(full, dropped);
    // The queue, and a batch in each of the 4 requests in flight and in the one being built.
    assert!(queued <= 1000 + 5 * 100, "{queued}");
    let readyz = http_get(hub.http, "/readyz", &[]);
    assert!(readyz.body.contains("degraded"), "{readyz:?}");
}

/// The per-model metrics are pushed as cumulative OTLP sums and histograms, per pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_model_metrics_are_pushed() {
    let Some(receiver) = Receiver::start("ok") else {
        return;
    };
    let hub = receiver.hub("metrics_interval_ms = 200\n");
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(
        &mut client,
        &[
            (headers::WORKER_ID, "gpu-3"),
            (headers::WORKER_POOL, "llama"),
        ],
    )
    .await
    .expect("worker stream");
    for (name, tokens) in [
        ("inference.stop", 100),
        ("inference.stop", 50),
        ("inference.exception", 0),
    ] {
        let mut call = event(name, 0x4b, 0x0a, 1);
        call.measurements = [
            ("duration_ns".to_owned(), int(250_000_000)),
            ("output_tokens".to_owned(), int(tokens)),
        ]
        .into();
        sender.send(call).await.expect("send");
    }
    let point = |name: &'static str, key: &'static str, value: &'static str| {
        let receiver = &receiver;
        move || {
            receiver
                .received("metrics")
                .into_iter()
                .rev()
                .find(|m| m["name"] == name && m["attributes"][key][1] == value)
        }
    };
    let success = eventually("3 calls counted", WAIT, || {
        let found = point("bridge.inference.requests", "result", "success")();
        async move { found.filter(|m| m["value"] == 2.0) }
    })
    .await;
    assert_eq!(
        success["resource"]["service.name"],
        json!(["string_value", "llama"])
    );
    assert_eq!(
        success["attributes"]["model"],
        json!(["string_value", "llama-70b"])
    );
    assert_eq!(success["monotonic"], true);
    let error = point("bridge.inference.requests", "result", "error")().expect("errors");
    assert_eq!(error["value"], 1.0);
    let output = point("bridge.inference.tokens", "direction", "output")().expect("tokens");
    assert_eq!(output["value"], 150.0);
    let duration = point("bridge.inference.duration", "model", "llama-70b")().expect("duration");
    assert_eq!(
        (duration["count"].as_u64(), duration["unit"].as_str()),
        (Some(3), Some("s"))
    );
    assert!(
        (duration["sum"].as_f64().unwrap_or(0.0) - 0.75).abs() < 1e-9,
        "{duration}"
    );
}
