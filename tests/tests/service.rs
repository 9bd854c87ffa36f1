//! The hub as generic tools and other languages see it: health, reflection, a client generated
//! from the .proto in Python, graceful shutdown, and the demo.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use bridge_proto::protocol::{events, inference};
use bridge_proto::v1::telemetry_bridge_client::TelemetryBridgeClient;
use bridge_proto::{SERVICE_NAME, v1};
use bridge_tests::{
    HubOptions, HubProcess, PythonGrpc, Recorder, WorkerProcess, bin, eventually, first_connected,
    matching, name, run_cli, signal, wait_exit,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served_on_the_same_port() {
    let hub = HubProcess::start();
    let channel = tonic::transport::Endpoint::from_shared(hub.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", SERVICE_NAME] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }

    // Both reflection versions: older grpcurl releases and Postman speak only v1alpha. The two
    // have the same messages in different packages, so one body serves for both.
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut reflection = ServerReflectionClient::new(channel.clone());
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut responses = reflection
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect(concat!("reflection ", stringify!($version)))
                .into_inner();
            let response = responses
                .message()
                .await
                .expect("response")
                .expect("one response");
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response
            else {
                panic!("unexpected reflection response");
            };
            list.service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>()
        }};
    }
    for names in [list_services!(v1), list_services!(v1alpha)] {
        assert!(names.iter().any(|n| n == SERVICE_NAME), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_with_unavailable_and_exits_promptly() {
    sigterm_ends_streams_with_unavailable("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_on_connection_threads_too() {
    sigterm_ends_streams_with_unavailable("connection_threads = 2\n").await;
}

/// With `hub_config` as the `[hub]` table.
async fn sigterm_ends_streams_with_unavailable(hub_config: &str) {
    let mut hub = HubProcess::start_with(HubOptions {
        config: Some(format!("[hub]\n{hub_config}")),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let mut stream = client
        .subscribe(v1::SubscribeRequest::default())
        .await
        .expect("subscribe");
    let _worker = WorkerProcess::start(&hub.url, "busy", "", &["--simulate", "100"]);
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("events flow");
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let started = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| hub.terminate());
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = end.expect_err("the subscription ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    assert!(hub.log().contains("shutting down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_even_with_stalled_subscribers() {
    sigterm_exits_within_the_grace_period("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_on_connection_threads_too() {
    sigterm_exits_within_the_grace_period("connection_threads = 2\n").await;
}

/// With `hub_config` added to the `[hub]` table.
async fn sigterm_exits_within_the_grace_period(hub_config: &str) {
    let mut hub = HubProcess::start_with(HubOptions {
        config: Some(format!("[hub]\nshutdown_grace_ms = 1000\n{hub_config}")),
        ..Default::default()
    });
    // A subscriber that never reads, with the smallest windows HTTP/2 allows: the hub soon
    // cannot send it anything, not even the end of its stream.
    let channel = tonic::transport::Endpoint::from_shared(hub.url.clone())
        .expect("url")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .expect("connect");
    let _stalled = TelemetryBridgeClient::new(channel)
        .subscribe(v1::SubscribeRequest::default())
        .await
        .expect("subscribe");
    // And one over HTTP (server-sent events) that never reads either.
    let mut stalled_http = std::net::TcpStream::connect(hub.http).expect("connect http");
    std::io::Write::write_all(
        &mut stalled_http,
        format!("GET /api/events HTTP/1.1\r\nHost: {}\r\n\r\n", hub.http).as_bytes(),
    )
    .expect("send the request");
    let mut client = hub.client().await;
    let reader = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let _worker = WorkerProcess::start(&hub.url, "busy", "", &["--simulate", "2000"]);
    // Well past what the stalled subscriber's window holds.
    eventually("events to flow", WAIT, || async {
        (reader.deliveries().len() > 2000).then_some(())
    })
    .await;

    let started = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| hub.terminate());
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let log = hub.log();
    assert!(log.contains("still open after the grace period"), "{log}");
    assert!(log.contains("control state flushed"), "{log}");
}

#[test]
fn the_demo_shows_the_whole_loop_and_exits_zero() {
    let output = Command::new(bin("bridge"))
        .args(["demo", "--duration", "4"])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&events::WORKER_CONNECTED.join(".")),
        "{stdout}"
    );
    assert!(
        stdout.contains("$ bridge sample gpu-1 0.1\ngpu-1: sampling 0.1 applied in"),
        "{stdout}"
    );
    assert!(stdout.contains("$ bridge workers\nWORKER"), "{stdout}");
    assert!(stdout.contains("gpu-1 went from"), "{stdout}");
}

/// Ctrl-C (SIGINT) or SIGTERM ends the demo with its simulated workers: none is left running.
#[test]
fn an_interrupted_demo_leaves_no_worker_running() {
    for sig in ["INT", "TERM"] {
        let mut demo = Command::new(bin("bridge"))
            .args(["demo", "--duration", "60"])
            // Outside cargo, so it runs the worker beside it instead of building one.
            .env_remove("CARGO")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run demo");
        let started = std::time::Instant::now();
        let workers = loop {
            let workers = children(demo.id(), "worker");
            if workers.len() == 3 {
                break workers;
            }
            assert!(started.elapsed() < WAIT, "the demo started {workers:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        signal(demo.id(), sig);
        let status = wait_exit(&mut demo, WAIT).expect("the demo exits");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut demo.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_eq!(status.code(), Some(130), "SIG{sig}: {stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        let left: Vec<u32> = workers.into_iter().filter(|pid| running(*pid)).collect();
        assert!(left.is_empty(), "SIG{sig} left workers {left:?} running");
    }
}

/// The processes whose parent is `parent` and whose command name is `comm`.
fn children(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; the name may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && head.split_once('(')?.1 == comm).then_some(pid)
        })
        .collect()
}

/// Whether `pid` is a live process (a zombie has exited and is only waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Outside cargo the demo runs the `worker` installed beside `bridge`; without one it says so
/// in one line, before starting anything.
#[test]
fn the_demo_without_a_worker_binary_says_so_in_one_line() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let lonely = dir.path().join("bridge");
    if std::fs::hard_link(bin("bridge"), &lonely).is_err() {
        std::fs::copy(bin("bridge"), &lonely).expect("copy bridge");
    }
    let output = Command::new(&lonely)
        .args(["demo", "--duration", "4"])
        .env_remove("CARGO")
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "there is no {}",
            dir.path().join("worker").display()
        )),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
}

/// The seed design's Python emitter, generated from our .proto by grpcio-tools, sends no
/// metadata and never acknowledges: it is listed, its events reach subscribers with their
/// types, and it receives control messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_proto_interoperates() {
    let Some(python) = PythonGrpc::set_up() else {
        return;
    };

    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["inference.>"])).await;
    let mut child = python
        .script("seed_emitter.py")
        .arg(hub.addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python emitter");
    let stdout = child.stdout.take().expect("stdout");
    let (controls_tx, controls) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = controls_tx.send(value);
            }
        }
    });

    let worker = eventually("the Python client to be listed", WAIT, || {
        first_connected(&client)
    })
    .await;
    assert!(
        !worker.acknowledges && worker.id.starts_with("anon-"),
        "{worker:?}"
    );
    let delivery = eventually("its events to reach the subscriber", WAIT, || async {
        tail.deliveries()
            .into_iter()
            .find(|d| d.worker_id == worker.id && name(d) == inference::STOP)
    })
    .await;
    let event = delivery.event.expect("event");
    assert_eq!(event.event_parts, ["inference", "stop"]);
    assert_eq!(event.metadata[inference::MODEL], "seed-model");
    use v1::telemetry_value::Value;
    assert!(matches!(
        event.measurements["tokens"].value,
        Some(Value::IntValue(_))
    ));
    assert_eq!(
        event.measurements["latency_ms"].value,
        Some(Value::FloatValue(12.5))
    );
    assert_eq!(
        event.measurements["device"].value,
        Some(Value::StringValue("cuda:0".into()))
    );

    let tail_cli = run_cli(
        &hub.url,
        &[
            "subscribe",
            "--worker",
            &worker.id,
            "--limit",
            "2",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(tail_cli.code, Some(0), "{}", tail_cli.stderr);
    assert_eq!(tail_cli.stdout.lines().count(), 2);

    let out = run_cli(&hub.url, &["toggle", &worker.id, "off"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let toggled = (0..20)
        .filter_map(|_| controls.recv_timeout(WAIT).ok())
        .find(|c| c["toggle"].is_object() && c["toggle"].get("enabled").is_none());
    assert!(
        toggled.is_some(),
        "the Python client received toggle off (enabled=false is proto3's default)"
    );

    drop(child.stdin.take());
    let _ = child.wait();
}
