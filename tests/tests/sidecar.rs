//! The `worker` sidecar around real child processes: pass-through, signals, exit codes, the
//! TELEMETRY line format, outage buffering across a hub restart, GPU metrics and the local
//! endpoint.

use std::{
    collections::{BTreeSet, HashSet},
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use bridge_proto::protocol::{counters, gpu, hub_drops, inference};
use bridge_proto::{
    sampling::{Rate, SamplingKey},
    v1,
};
use bridge_tests::{
    HubOptions, HubProcess, Proxy, ProxyMode, PythonGrpc, QUICK_WORKER_CONFIG, Recorder,
    WorkerProcess, eventually, int, matching, name, read_line_within, run_cli, sequence, signal,
    worker_info,
};
use worker::gpu::{GpuSource, NvmlSource};

const WAIT: Duration = Duration::from_secs(30);

/// A shell script in a temporary directory.
fn script(body: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.sh");
    std::fs::write(&path, body).expect("write script");
    let path = path.to_str().expect("utf-8 path").to_owned();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_runs_with_its_output_untouched_and_its_telemetry_relayed() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let (_dir, app) = script(
        r#"printf 'line one\n\001\377 binary\n'
printf 'plain stderr \377\n' >&2
echo 'TELEMETRY:{"event":"inference.stop","measurements":{"output_tokens":512,"batch_fill_ratio":0.5,"device":"cuda:0"},"metadata":{"model":"llama"},"correlation_id":"req-1"}' >&2
echo 'TELEMETRY:{"event": oops' >&2
echo 'TELEMETRY:{"event":["tool","stop"],"timestamp_ns":1700000000000000000}' >&2
printf 'last line without newline' >&2
exit 7
"#,
    );
    let mut command = WorkerProcess::command(
        &hub.url,
        "app-1",
        "llama",
        QUICK_WORKER_CONFIG,
        &["--", "sh", &app],
    );
    // Byte-for-byte comparison: the sidecar's own diagnostics off.
    command.command.env("RUST_LOG", "off");
    let output = tokio::task::spawn_blocking(move || command.command.output())
        .await
        .expect("join")
        .expect("run worker");
    assert_eq!(
        output.status.code(),
        Some(7),
        "the app's exit code is the sidecar's"
    );
    assert_eq!(output.stdout, b"line one\n\x01\xff binary\n");
    assert_eq!(
        output.stderr,
        &b"plain stderr \xff\nTELEMETRY:{\"event\": oops\nlast line without newline"[..],
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let deliveries = eventually("the app's events", WAIT, || async {
        let deliveries = tail.deliveries();
        deliveries
            .iter()
            .any(|d| name(d) == "worker.exit")
            .then_some(deliveries)
    })
    .await;
    let from_app: Vec<_> = deliveries
        .iter()
        .filter(|d| d.worker_id == "app-1")
        .collect();
    let names: Vec<String> = from_app.iter().map(|d| name(d)).collect();
    let position = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} in {names:?}"))
    };
    assert!(position("worker.ready") < position(inference::STOP));
    assert!(position("tool.stop") < position("worker.exit"));

    let stop = from_app[position(inference::STOP)]
        .event
        .clone()
        .expect("event");
    use v1::telemetry_value::Value;
    assert_eq!(
        stop.measurements[inference::OUTPUT_TOKENS].value,
        Some(Value::IntValue(512))
    );
    assert_eq!(
        stop.measurements[inference::BATCH_FILL_RATIO].value,
        Some(Value::FloatValue(0.5))
    );
    assert_eq!(
        stop.measurements["device"].value,
        Some(Value::StringValue("cuda:0".into()))
    );
    assert_eq!(
        (
            stop.metadata["model"].as_str(),
            stop.correlation_id.as_str()
        ),
        ("llama", "req-1")
    );
    assert!(stop.timestamp_ns > 0 && stop.sequence > 0);
    let tool = from_app[position("tool.stop")]
        .event
        .clone()
        .expect("event");
    assert_eq!(tool.timestamp_ns, 1_700_000_000_000_000_000);
    let exit = from_app[position("worker.exit")];
    assert_eq!(int(exit, "exit_code"), Some(7));
    assert_eq!(
        int(exit, "pid"),
        int(from_app[position("worker.ready")], "pid")
    );

    let info = eventually("the final counters", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "app-1")
                .await
                .filter(|w| !w.connected && w.worker_counters.contains_key(counters::CONFIRMED))
        }
    })
    .await;
    assert_eq!(
        info.worker_counters[counters::DROPPED_PARSE_ERROR],
        1,
        "{:?}",
        info.worker_counters
    );
    assert_eq!(
        info.worker_counters[counters::CONFIRMED],
        info.worker_counters[counters::ACCEPTED],
        "everything accepted was confirmed before exit"
    );
}

#[test]
fn signals_reach_the_app_and_its_exit_status_is_passed_on() {
    let cases = [
        (
            "trap 'echo got-term >&2; exit 42' TERM; echo ready; while :; do sleep 0.02; done",
            "TERM",
            42,
        ),
        (
            "trap 'exit 3' INT; echo ready; while :; do sleep 0.02; done",
            "INT",
            3,
        ),
        ("echo ready; exec sleep 30", "TERM", 128 + 15),
        ("echo ready; exec sleep 30", "KILL", 128 + 9),
    ];
    for (body, signal_name, expected) in cases {
        let (_dir, app) = script(body);
        // Nobody listens on the hub's address: the app must not care.
        let mut command = WorkerProcess::command(
            "http://127.0.0.1:9",
            "sig",
            "",
            QUICK_WORKER_CONFIG,
            &["--drain-timeout", "100ms", "--", "sh", &app],
        );
        command
            .command
            .stdout(Stdio::piped())
            .env("RUST_LOG", "off");
        let mut worker = WorkerProcess::spawn(command, true);
        let stdout = worker.child().stdout.take().expect("stdout");
        assert_eq!(
            read_line_within(stdout, Duration::from_secs(10)).as_deref(),
            Some("ready\n"),
            "{body}"
        );
        if signal_name == "KILL" {
            // SIGKILL cannot be forwarded: kill the app itself, as the OOM killer would.
            let app_pid = std::process::Command::new("pgrep")
                .args(["-P", &worker.pid().to_string()])
                .output()
                .expect("pgrep");
            signal(
                String::from_utf8_lossy(&app_pid.stdout)
                    .trim()
                    .parse()
                    .expect("app pid"),
                "KILL",
            );
        } else {
            signal(worker.pid(), signal_name);
        }
        let status = worker.wait(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(expected),
            "{body} with SIG{signal_name}"
        );
    }

    let mut command = WorkerProcess::command(
        "http://127.0.0.1:9",
        "sig",
        "",
        QUICK_WORKER_CONFIG,
        &["--", "no-such-command-anywhere"],
    );
    command.command.env("RUST_LOG", "off");
    let output = command.command.output().expect("run worker");
    assert_eq!(output.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .starts_with("worker: cannot run `no-such-command-anywhere`"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A steady stream through a proxy, so the test decides when the worker can reach which hub.
const STEADY_APP: &str = r#"
import json, sys, time
for i in range(1500):
    print("TELEMETRY:" + json.dumps({"event": "load.tick", "measurements": {"i": i}}), file=sys.stderr, flush=True)
    if i % 10 == 0:
        print('TELEMETRY:{"event": "debug.trace"}', file=sys.stderr, flush=True)
    time.sleep(0.002)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_or_delivered_twice_across_a_hub_restart() {
    let state = tempfile::tempdir().expect("state dir");
    let mut hub = HubProcess::start_with(HubOptions {
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let proxy = Proxy::start(hub.addr, true).await.expect("proxy");
    let mut client = hub.client().await;
    let first = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    // Set before the worker exists (a pool's settings reach workers that join it later), so
    // that it holds for every event.
    let out = run_cli(
        &hub.url,
        &["filter", "--pool", "steady-pool", "--block", "debug.>"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let python = std::env::var("BRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut worker = WorkerProcess::spawn(
        WorkerProcess::command(
            &proxy.url(),
            "steady",
            "steady-pool",
            "[worker]\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\nstats_interval_ms = 100\n",
            &["--", &python, "-c", STEADY_APP],
        ),
        true,
    );
    let before = eventually("the sidecar to apply its pool's filter", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "steady")
                .await
                .filter(|w| w.applied_version.is_some_and(|v| v == w.desired_version))
        }
    })
    .await;
    eventually("events to flow", WAIT, || async {
        (first
            .deliveries()
            .iter()
            .filter(|d| name(d) == "load.tick")
            .count()
            >= 300)
            .then_some(())
    })
    .await;

    // Events the sidecar decided before the pool's filter reached it were filtered by the hub
    // instead: they hold sequence numbers that no subscriber sees.
    let filtered_by_first_hub = worker_info(&mut client, "steady")
        .await
        .expect("steady")
        .hub_drops
        .get(hub_drops::FILTERED)
        .copied()
        .unwrap_or(0);

    // The hub dies mid-stream; the sidecar buffers while it is away.
    hub.kill();
    proxy.close();
    let hub = HubProcess::start_with(HubOptions {
        state_dir: Some(state.path().to_owned()),
        listen: Some(hub.addr),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let second = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    proxy.open();

    let status = tokio::task::block_in_place(|| worker.wait(WAIT));
    assert_eq!(status.code(), Some(0));

    let numbered = |tail: &Recorder| -> Vec<v1::EventDelivery> {
        tail.deliveries()
            .into_iter()
            .filter(|d| d.worker_id == "steady" && sequence(d) > 0)
            .collect()
    };
    let (first, second) = (numbered(&first), numbered(&second));
    let second_sequences: Vec<u64> = second.iter().map(sequence).collect();
    let unique: HashSet<u64> = second_sequences.iter().copied().collect();
    assert_eq!(
        unique.len(),
        second_sequences.len(),
        "no event delivered twice by the new hub"
    );
    let all: BTreeSet<u64> = first.iter().chain(&second).map(sequence).collect();
    let last = *all.last().expect("events");
    let gaps: Vec<u64> = (1..=last).filter(|s| !all.contains(s)).collect();
    assert_eq!(
        gaps.len() as u64,
        filtered_by_first_hub,
        "the only sequence numbers missing across the restart are events the hub filtered: {gaps:?}"
    );
    let ticks: BTreeSet<i64> = first
        .iter()
        .chain(&second)
        .filter(|d| name(d) == "load.tick")
        .filter_map(|d| int(d, "i"))
        .collect();
    assert_eq!(
        ticks,
        (0..1500).collect(),
        "every event the app wrote arrived"
    );
    assert!(
        first
            .iter()
            .chain(&second)
            .all(|d| !name(d).starts_with("debug.")),
        "the filter held before and after the restart"
    );

    let after = worker_info(&mut client, "steady").await.expect("steady");
    assert!(after.desired_version > before.desired_version);
    assert_eq!(
        after.applied_version,
        Some(after.desired_version),
        "state re-applied"
    );
    let control = after.control.expect("control");
    assert_eq!(control.blocked_events, ["debug.>"]);
    assert_eq!(after.worker_counters[counters::DROPPED_BUFFER_FULL], 0);
    assert!(
        after.worker_counters[counters::REPLAYED] > 0,
        "{:?}",
        after.worker_counters
    );
    assert_eq!(after.missing_events, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_buffer_drops_the_oldest_and_reports_exactly_what_is_missing() {
    let hub = HubProcess::start();
    let proxy = Proxy::start(hub.addr, false).await.expect("proxy");
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let (_dir, app) = script(
        r#"i=0
while [ $i -lt 500 ]; do
  echo "TELEMETRY:{\"event\":\"load.tick\",\"measurements\":{\"i\":$i}}" >&2
  i=$((i+1))
done
echo done >&2
exec sleep 60
"#,
    );
    let mut command = WorkerProcess::command(
        &proxy.url(),
        "overflow",
        "",
        QUICK_WORKER_CONFIG,
        &["--buffer-events", "100", "--", "sh", &app],
    );
    command
        .command
        .stderr(Stdio::piped())
        .env("RUST_LOG", "off");
    let mut worker = WorkerProcess::spawn(command, false);
    let stderr = worker.child().stderr.take().expect("stderr");
    // The sidecar relays stderr in order: once `done` comes through, every line before it has
    // been turned into an event.
    let done = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "done")
    });
    assert!(
        tokio::time::timeout(WAIT, done)
            .await
            .expect("in time")
            .expect("join")
    );

    proxy.open();
    let info = eventually("the buffer to drain", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "overflow").await.filter(|w| {
                let c = &w.worker_counters;
                c.get(counters::BUFFERED) == Some(&0)
                    && c.get(counters::ACCEPTED).is_some_and(|a| *a >= 501)
            })
        }
    })
    .await;
    let dropped = info.worker_counters[counters::DROPPED_BUFFER_FULL];
    let delivered: Vec<v1::EventDelivery> = tail
        .deliveries()
        .into_iter()
        .filter(|d| d.worker_id == "overflow" && sequence(d) > 0)
        .collect();
    let last = delivered.iter().map(sequence).max().expect("events");
    let missing = last - delivered.len() as u64;
    assert_eq!(
        missing, dropped,
        "the drop count equals the events missing from the sequence"
    );
    assert!(dropped >= 400, "{dropped}");
    let ticks: Vec<i64> = delivered
        .iter()
        .filter(|d| name(d) == "load.tick")
        .filter_map(|d| int(d, "i"))
        .collect();
    let oldest_kept = 500 - ticks.len() as i64;
    assert_eq!(
        ticks,
        (oldest_kept..500).collect::<Vec<_>>(),
        "the newest events were kept, in order"
    );
    drop(worker);
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_telemetry_lines_at_a_stuck_hub_neither_blocks_the_app_nor_grows_memory() {
    const LINES: u64 = 300_000;
    let hub = HubProcess::start();
    let proxy = Proxy::start(hub.addr, true).await.expect("proxy");
    let client = hub.client().await;
    let python = std::env::var("BRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    // Waits on stdin for the go, then writes as fast as it can and says when it is done.
    let app = format!(
        r#"
import sys
sys.stdin.readline()
line = 'TELEMETRY:{{"event": "load.tick", "measurements": {{"bytes": 4096}}, "metadata": {{"model": "llama-3-8b"}}}}\n'
for _ in range({LINES}):
    sys.stderr.write(line)
sys.stderr.flush()
print("done", flush=True)
"#
    );
    let mut command = WorkerProcess::command(
        &proxy.url(),
        "flood",
        "",
        QUICK_WORKER_CONFIG,
        &["--buffer-events", "1000", "--", &python, "-c", &app],
    );
    command
        .command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("RUST_LOG", "off");
    let mut worker = WorkerProcess::spawn(command, false);
    eventually("the sidecar to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "flood")
                .await
                .filter(|w| w.connected)
        }
    })
    .await;
    // The hub stops answering: the connection stays up and nothing moves.
    proxy.set(ProxyMode::Blackhole);
    let mut stdin = worker.child().stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"go\n").expect("go");
    let stdout = worker.child().stdout.take().expect("stdout");
    let done = tokio::task::spawn_blocking(move || read_line_within(stdout, WAIT));
    assert_eq!(
        done.await.expect("join").as_deref().map(str::trim),
        Some("done"),
        "the app finished its {LINES} lines while the hub was stuck"
    );
    let peak_mib = peak_rss_kib(worker.pid()) / 1024;
    assert!(peak_mib < 48, "the sidecar peaked at {peak_mib} MiB");

    proxy.open();
    let info = eventually("the sidecar to report after the hub is back", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "flood").await.filter(|w| {
                let c = &w.worker_counters;
                c.get(counters::BUFFERED) == Some(&0)
                    && c.get(counters::PRODUCED).is_some_and(|p| *p >= LINES)
            })
        }
    })
    .await;
    let c = &info.worker_counters;
    assert_eq!(
        c[counters::PRODUCED],
        c[counters::CONFIRMED] + c[counters::DROPPED_BUFFER_FULL],
        "every line was confirmed or counted as dropped: {c:?}"
    );
    assert!(c[counters::DROPPED_BUFFER_FULL] > LINES / 2, "{c:?}");
    drop(stdin);
}

/// An app that writes a huge line and holds it open: the sidecar passes the bytes through as
/// they come instead of holding the line (`worker.max_line_bytes`, 1 MiB by default), so its
/// memory stays flat; the telemetry line lost that way is counted, and the next one relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_without_end_passes_through_without_growing_the_sidecar() {
    // Far over the cap and over the memory bound below, so that holding it would show.
    const LINE: u64 = 64 << 20;
    const HEAD: &str = r#"TELEMETRY:{"event":"long.line","measurements":{"pad":""#;
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["after.>"])).await;
    // The line stays open until the test says so on stdin.
    let (_dir, app) = script(&format!(
        r#"printf '%s' '{HEAD}' >&2
head -c {LINE} /dev/zero | tr '\0' x >&2
read go
printf '"}}}}\nTELEMETRY:{{"event":"after.long"}}\n' >&2
"#
    ));
    let mut command = WorkerProcess::command(
        &hub.url,
        "long-line",
        "",
        QUICK_WORKER_CONFIG,
        &["--", "sh", &app],
    );
    command
        .command
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "off");
    let mut worker = WorkerProcess::spawn(command, false);
    let stderr = worker.child().stderr.take().expect("stderr");
    let passed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The app's stderr as the sidecar passes it on: the x's counted, anything else kept.
    let reader = std::thread::spawn({
        let passed = passed.clone();
        move || {
            let mut stderr = stderr;
            let mut other = Vec::new();
            let mut buffer = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stderr, &mut buffer) {
                let xs = buffer[..n].iter().filter(|&&b| b == b'x').count();
                other.extend(buffer[..n].iter().filter(|&&b| b != b'x'));
                passed.fetch_add(xs as u64, std::sync::atomic::Ordering::SeqCst);
            }
            other
        }
    });
    eventually("the open line to come out on stderr", WAIT, || async {
        (passed.load(std::sync::atomic::Ordering::SeqCst) == LINE).then_some(())
    })
    .await;
    let peak_mib = peak_rss_kib(worker.pid()) / 1024;
    assert!(peak_mib < 48, "the sidecar peaked at {peak_mib} MiB");

    let mut stdin = worker.child().stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"go\n").expect("go");
    drop(stdin);
    assert_eq!(worker.wait(WAIT).code(), Some(0));
    let other = reader.join().expect("stderr reader");
    assert_eq!(
        String::from_utf8_lossy(&other),
        format!("{HEAD}\"}}}}\n"),
        "the line passed through unchanged, and only it"
    );
    eventually("the next telemetry line as an event", WAIT, || async {
        tail.deliveries()
            .iter()
            .any(|d| d.worker_id == "long-line" && name(d) == "after.long")
            .then_some(())
    })
    .await;
    let info = eventually("the final counters", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "long-line")
                .await
                .filter(|w| !w.connected && w.worker_counters.contains_key(counters::CONFIRMED))
        }
    })
    .await;
    let reported = &info.worker_counters;
    assert_eq!(
        reported.get(counters::DROPPED_LINE_TOO_LONG),
        Some(&1),
        "{reported:?}"
    );
    assert_eq!(
        reported.get(counters::DROPPED_PARSE_ERROR),
        Some(&0),
        "{reported:?}"
    );
}

/// Fake devices report every documented metric; the real NVML path reports what NVML itself
/// sees. The test asks NVML the way the sidecar does and expects the matching behaviour, so it
/// passes on a GPU host (the devices, their uuids, the description) and without one, as on CI
/// (no GPU events, `GPU none`, one log line saying why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_metrics_come_from_nvml_or_say_clearly_there_is_no_gpu() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["gpu.>"])).await;
    let _fake = WorkerProcess::start(
        &hub.url,
        "fake-gpu",
        "",
        &["--fake-gpus", "2", "--gpu-interval", "200ms"],
    );
    let real = WorkerProcess::start(&hub.url, "real-gpu", "", &["--gpu-interval", "200ms"]);
    let nvml = NvmlSource::open().map(|mut source| (source.describe(), source.sample()));

    let from = |worker: &str| -> Vec<v1::EventDelivery> {
        tail.deliveries()
            .into_iter()
            .filter(|d| d.worker_id == worker)
            .collect()
    };
    let devices = |deliveries: &[v1::EventDelivery]| -> BTreeSet<(String, String)> {
        deliveries
            .iter()
            .filter(|d| name(d) == "gpu.metrics")
            .filter_map(|d| d.event.as_ref())
            .map(|e| (e.metadata["device"].clone(), e.metadata["uuid"].clone()))
            .collect()
    };
    // Three rounds of both fake devices: the real path has had as long to report.
    let fake = eventually("the fake devices to report three times", WAIT, || async {
        let fake = from("fake-gpu");
        let rounds = fake.iter().filter(|d| name(d) == "gpu.metrics").count();
        (devices(&fake).len() == 2 && rounds >= 6).then_some(fake)
    })
    .await;
    let metrics = fake
        .iter()
        .find(|d| name(d) == "gpu.metrics")
        .and_then(|d| d.event.as_ref())
        .expect("metrics");
    for key in [
        "utilization_gpu_percent",
        "utilization_memory_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "temperature_celsius",
        "power_watts",
        "sm_clock_mhz",
        "compute_processes",
    ] {
        assert!(
            metrics.measurements.contains_key(key),
            "{key} in {:?}",
            metrics.measurements.keys()
        );
    }
    assert!(metrics.metadata["uuid"].starts_with("GPU-fake-"));
    assert!(fake.iter().any(|d| name(d) == "gpu.process"));

    let (fake_gpu, real_gpu) = eventually("both workers listed", WAIT, || {
        let mut client = client.clone();
        async move {
            let a = worker_info(&mut client, "fake-gpu").await?;
            let b = worker_info(&mut client, "real-gpu").await?;
            Some((a.gpu, b.gpu))
        }
    })
    .await;
    assert_eq!(fake_gpu, "2x Fake GPU");
    let table = run_cli(&hub.url, &["workers"]).await.stdout;
    assert!(table.contains("2x Fake GPU"), "{table}");
    let log = real.log();
    let no_gpu: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no GPU metrics"))
        .collect();
    match nvml {
        Ok((description, samples)) => {
            // A GPU host: the worker has NVML's devices, and says so.
            assert_eq!(real_gpu, description);
            assert!(table.contains(&description), "{table}");
            assert!(no_gpu.is_empty(), "{log}");
            let expected: BTreeSet<(String, String)> = samples
                .iter()
                .map(|s| (s.index.to_string(), s.uuid.clone()))
                .collect();
            eventually("every NVML device to report", WAIT, || async {
                (devices(&from("real-gpu")) == expected).then_some(())
            })
            .await;
            for delivery in from("real-gpu") {
                if let Some(percent) = int(&delivery, "utilization_gpu_percent") {
                    assert!((0..=100).contains(&percent), "{delivery:?}");
                }
            }
        }
        Err(reason) => {
            // No NVIDIA driver or no GPU (CI): nothing to report, and one line saying why.
            assert_eq!(real_gpu, "none");
            assert!(table.contains(" none "), "{table}");
            assert_eq!(from("real-gpu"), [], "no GPU events without a GPU");
            assert_eq!(no_gpu.len(), 1, "{log}");
            assert!(no_gpu[0].contains(&reason), "{} lacks {reason}", no_gpu[0]);
        }
    }
}

/// `--simulate` is a simulated model server with its one simulated GPU: it leaves NVML alone,
/// so on a GPU host no real device's events contradict the simulated one, and without a GPU
/// there is no warning about the missing driver (`bridge demo` runs three of these).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_worker_reports_only_its_simulated_gpu() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["gpu.>"])).await;
    let worker = WorkerProcess::start(
        &hub.url,
        "sim",
        "",
        &["--simulate", "5", "--gpu-interval", "200ms"],
    );
    // Three simulated reports (one a second): a real device would have reported many times.
    let reports = eventually("three simulated GPU reports", WAIT, || async {
        let reports = tail.deliveries();
        (reports.len() >= 3).then_some(reports)
    })
    .await;
    for report in &reports {
        let event = report.event.as_ref().expect("event");
        assert_eq!(name(report), gpu::METRICS_EVENT, "{report:?}");
        assert_eq!(
            event.metadata[gpu::UUID],
            "GPU-simulated-0000",
            "{report:?}"
        );
    }
    let info = worker_info(&mut client, "sim").await.expect("listed");
    assert_eq!(info.gpu, worker::simulate::GPU_DESCRIPTION);
    let log = worker.log();
    assert!(!log.contains("NVML") && !log.contains("no GPU"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_on_the_local_endpoint_relays_through_the_sidecar() {
    let Some(python) = PythonGrpc::set_up() else {
        return;
    };
    let hub = HubProcess::start();
    let socket_dir = tempfile::tempdir().expect("temp dir");
    let socket = socket_dir.path().join("worker.sock");
    let socket = socket.to_str().expect("utf-8");
    let _sidecar = WorkerProcess::start(&hub.url, "side-py", "llama", &["--local", socket]);
    let mut client = hub.client().await;
    eventually("the sidecar to connect", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "side-py")
                .await
                .filter(|w| w.applied_version.is_some())
        }
    })
    .await;
    let tail = Recorder::start(&mut client, matching(&["app.>"])).await;

    let mut app = python
        .script("local_client.py")
        .arg(format!("unix:{socket}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python client");
    let (controls_tx, controls) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = app.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = controls_tx.send(value);
            }
        }
    });

    let out = run_cli(
        &hub.url,
        &[
            "subscribe",
            "app.request",
            "--limit",
            "3",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for line in out.stdout.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(
            event["worker_id"], "side-py",
            "relayed under the sidecar's id"
        );
        assert_eq!(event["pool"], "llama");
        assert!(
            event["sequence"].as_u64().is_some(),
            "numbered by the sidecar"
        );
    }

    let out = run_cli(&hub.url, &["sample", "side-py", "0.5"]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let state = (0..10)
        .filter_map(|_| controls.recv_timeout(WAIT).ok())
        .find(|c| c["state"]["samplingRate"] == 0.5);
    assert!(
        state.is_some(),
        "the Python client received the sampling change"
    );

    let seen = tail.count_at_rate(0.5);
    eventually("sampled events from the Python client", WAIT, || async {
        (tail.count_at_rate(0.5) >= seen + 20).then_some(())
    })
    .await;
    let rate = Rate::new(0.5).expect("rate");
    let sampled: Vec<_> = tail
        .deliveries()
        .into_iter()
        .filter(|d| d.sampling_rate == 0.5)
        .collect();
    // The client applied the contract's sampling function itself; the same ids survive.
    let late = &sampled[sampled.len().min(10)..];
    for delivery in late {
        let cid = &delivery.event.as_ref().expect("event").correlation_id;
        assert!(
            rate.keep(SamplingKey::correlation(cid)),
            "{cid}: the Python client's sampler disagrees with the hub's"
        );
    }
    drop(app.stdin.take());
    let _ = app.wait();
}

/// The state letter of `/proc/PID/stat`, `None` once the process is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.chars().next()
}

fn app_pid(worker: &WorkerProcess) -> u32 {
    let out = std::process::Command::new("pgrep")
        .args(["-P", &worker.pid().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("app pid")
}

fn app_worker(app: &str, args: &[&str]) -> (WorkerProcess, tempfile::TempDir) {
    let (dir, path) = script(app);
    let mut all = vec!["--drain-timeout", "100ms"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "sh", &path]);
    let mut command =
        WorkerProcess::command("http://127.0.0.1:9", "sig", "", QUICK_WORKER_CONFIG, &all);
    command.command.stdout(Stdio::piped());
    (WorkerProcess::spawn(command, true), dir)
}

/// An app that ignores SIGTERM once kept the sidecar waiting forever, and a second SIGTERM did
/// nothing. Now the app is killed after `--kill-grace`, or at once on a second signal.
#[test]
fn an_app_that_ignores_sigterm_is_killed_after_the_grace_or_a_second_signal() {
    let stubborn = "trap 'echo got-term' TERM; echo ready; while :; do sleep 0.02; done";
    for (grace, second) in [("200ms", false), ("10min", true)] {
        let (mut worker, _dir) = app_worker(stubborn, &["--kill-grace", grace]);
        let stdout = worker.child().stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
        signal(worker.pid(), "TERM");
        assert_eq!(
            lines.next().and_then(Result::ok).as_deref(),
            Some("got-term"),
            "forwarded"
        );
        if second {
            signal(worker.pid(), "TERM");
        }
        let status = worker.wait(Duration::from_secs(10));
        assert_eq!(status.code(), Some(128 + 9), "grace {grace}");
    }
}

/// A SIGKILLed sidecar once left its app running as an orphan; now the kernel kills the app
/// with it (parent-death signal).
#[test]
fn the_app_dies_with_a_killed_sidecar() {
    let (mut worker, _dir) = app_worker("echo ready; exec sleep 60", &[]);
    let stdout = worker.child().stdout.take().expect("stdout");
    assert_eq!(
        read_line_within(stdout, Duration::from_secs(10)).as_deref(),
        Some("ready\n")
    );
    let app = app_pid(&worker);
    worker.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_state(app).is_some_and(|state| state != 'Z') {
        assert!(
            std::time::Instant::now() < deadline,
            "the app {app} outlived its sidecar"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A second sidecar on the same `--local` socket once took the path from the first silently.
/// Now it refuses (exit 1, one line) while the first serves it, and takes over a socket file
/// left by one that died.
#[test]
fn a_local_socket_in_use_is_refused_and_a_stale_one_taken_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("worker.sock");
    let path = socket.to_str().expect("utf-8").to_owned();
    let serving = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut first = WorkerProcess::start("http://127.0.0.1:9", "one", "", &["--local", &path]);
    serving("the first");
    let log = dir.path().join("second.log");
    let mut second = std::process::Command::new(bridge_tests::bin("worker"))
        .args([
            "--hub",
            "http://127.0.0.1:9",
            "--id",
            "two",
            "--local",
            &path,
        ])
        .env("RUST_LOG", "off")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run worker");
    let status = bridge_tests::wait_exit(&mut second, Duration::from_secs(10));
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let stderr = std::fs::read_to_string(&log).expect("log");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("another process"), "{stderr}");
    serving("the first, still,");

    first.kill();
    assert!(socket.exists(), "a killed sidecar leaves its socket file");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
    let _third = WorkerProcess::start("http://127.0.0.1:9", "three", "", &["--local", &path]);
    serving("the third");
}
